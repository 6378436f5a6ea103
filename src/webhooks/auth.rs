//! Authorization callbacks (like SRS's `on_publish` / `on_play`): before an RTMP ingest or an
//! origin player (RTMP play, HTTP-FLV) is admitted, the operator's backend is asked with a
//! signed POST; a 2xx answer admits, any other answer refuses. A backend that cannot be asked
//! (connection error, `webhooks.auth_timeout`) admits or refuses per `webhooks.auth_fail_open`.
//! Only the connection being admitted waits; nothing else does.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

use super::deliver::{self, HttpClient, Signed};
use crate::auth::Role;
use crate::config::WebhooksConfig;

/// What is being admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A stream-key RTMP publisher (`webhooks.on_publish`).
    Publish,
    /// A player of the embedded origin (`webhooks.on_play`).
    Play,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Publish => "on_publish",
            Action::Play => "on_play",
        }
    }
}

/// Who asks to publish or play what.
#[derive(Debug, Clone, Serialize)]
pub struct Request<'a> {
    /// The room (publish: the stream key's room; play: the origin stream's name, which is
    /// the room's).
    pub room: &'a str,
    /// `rtmp` or `http-flv`.
    pub protocol: &'static str,
    /// The client's address, where the protocol layer knows it (RTMP).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<String>,
    /// From a verified stream key (publish only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

#[derive(Serialize)]
struct Body<'a> {
    id: &'a str,
    action: &'static str,
    created_at: u64,
    #[serde(flatten)]
    request: &'a Request<'a>,
}

/// Asks the backend; shared by the RTMP server and the HTTP-FLV handler.
pub struct Authorizer {
    client: HttpClient,
    key: Vec<u8>,
    on_publish: Option<hyper::Uri>,
    on_play: Option<hyper::Uri>,
    timeout: Duration,
    fail_open: bool,
}

impl Authorizer {
    /// `None` when neither callback is configured (nothing is asked).
    pub fn from_config(cfg: &WebhooksConfig) -> Option<Arc<Authorizer>> {
        // Validated with the config; an unparsable URL is off (and said so).
        let parse = |u: &str, what: &str| -> Option<hyper::Uri> {
            if u.is_empty() {
                return None;
            }
            match u.parse() {
                Ok(uri) => Some(uri),
                Err(e) => {
                    tracing::warn!("webhooks.{what}: not used: {e}");
                    None
                }
            }
        };
        let on_publish = parse(&cfg.on_publish, "on_publish");
        let on_play = parse(&cfg.on_play, "on_play");
        if on_publish.is_none() && on_play.is_none() {
            return None;
        }
        Some(Arc::new(Authorizer {
            client: deliver::client(cfg.auth_timeout, 8, &cfg.ca_file),
            key: cfg.key.as_bytes().to_vec(),
            on_publish,
            on_play,
            timeout: cfg.auth_timeout,
            fail_open: cfg.auth_fail_open,
        }))
    }

    /// Ask whether `req` may go ahead. `Err` is the reason to give the client.
    pub async fn allow(&self, action: Action, req: &Request<'_>) -> Result<(), String> {
        let uri = match action {
            Action::Publish => &self.on_publish,
            Action::Play => &self.on_play,
        };
        let Some(uri) = uri else {
            return Ok(());
        };
        let id = format!("AU_{:032x}", rand::random::<u128>());
        let body = match serde_json::to_vec(&Body {
            id: &id,
            action: action.name(),
            created_at: super::unix_ms(),
            request: req,
        }) {
            Ok(b) => Bytes::from(b),
            Err(e) => return Err(format!("authorization request not built: {e}")),
        };
        let signed = Signed {
            key: &self.key,
            event: action.name(),
            id: &id,
            body: &body,
            attempt: 1,
        };
        let shown = format!(
            "{}{}",
            uri.authority().map_or("", |a| a.as_str()),
            uri.path()
        );
        match deliver::send(&self.client, uri, &signed, self.timeout).await {
            Ok(s) if s.is_success() => Ok(()),
            Ok(s) => {
                tracing::info!(room = req.room, protocol = req.protocol, action = action.name(),
                    status = %s, "refused by the authorization callback");
                Err(format!("refused by the operator ({})", s.as_u16()))
            }
            Err(e) if self.fail_open => {
                tracing::warn!(room = req.room, action = action.name(), url = %shown,
                    "authorization callback failed, admitting (webhooks.auth_fail_open): {e}");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(room = req.room, action = action.name(), url = %shown,
                    "authorization callback failed, refusing: {e}");
                Err("authorization unavailable".into())
            }
        }
    }
}
