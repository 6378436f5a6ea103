//! Wiring: build the services from the config, bind the listener, serve until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::participant::Services;
use crate::peer::PeerFactory;
use crate::room::Registry;

pub struct Server {
    pub addr: SocketAddr,
    /// Where the RTMP origin listens, when enabled.
    pub rtmp_addr: Option<SocketAddr>,
    pub services: Arc<Services>,
    shutdown_tx: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Server {
    /// Stop accepting, tell every connection to close, wait for them (bounded).
    pub async fn shutdown(self) {
        let timeout = self.services.cfg.server.shutdown_timeout;
        let _ = self.shutdown_tx.send(true);
        if tokio::time::timeout(timeout + Duration::from_secs(1), self.task)
            .await
            .is_err()
        {
            tracing::warn!("shutdown timed out");
        }
    }
}

/// Refuse to serve a non-loopback address with the public development secret.
pub fn check_secret(cfg: &Config) -> anyhow::Result<()> {
    if cfg.dev_secret_exposed() {
        if cfg.server.allow_dev_secret {
            tracing::warn!(
                "SERVING A NON-LOOPBACK ADDRESS WITH THE DEVELOPMENT SECRET: anyone can mint tokens. \
                 Set auth.secret (COHOST_AUTH__SECRET)."
            );
        } else {
            anyhow::bail!(
                "refusing to listen on {} with the built-in development secret: set auth.secret \
                 (or COHOST_AUTH__SECRET), or server.allow_dev_secret = true to override",
                cfg.server.http_listen
            );
        }
    }
    Ok(())
}

/// Co-host requests, invitations and host grace periods end on deadlines the rooms keep; this
/// checks them a few times a second (a host gone for good is announced to the rooms'
/// lifecycle hooks, which the bridge follows).
async fn room_deadlines(svc: Arc<Services>, mut shutdown: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        svc.rooms.tick(std::time::Instant::now());
    }
}

/// The bridge follows its room's life (one owner, whatever kind of participant the host is):
/// it ends when the room ends and applies `bridge.on_host_gone`.
fn follow_rooms(svc: &Arc<Services>) {
    let weak = Arc::downgrade(svc);
    svc.rooms.on_lifecycle(Arc::new(move |room, change| {
        if let Some(svc) = weak.upgrade() {
            crate::bridge::control::follow_room(&svc.bridges, &svc.cfg.bridge, room, change);
            // A recording ends with its room.
            svc.recordings.follow_room(room, change);
        }
    }));
}

/// The RTMP server's view of the services; an RTMP host's first track starts the room's bridge
/// when `bridge.auto_start` is on, like a WebRTC host's does.
fn rtmp_context(svc: &Arc<Services>) -> Arc<crate::rtmp::server::RtmpContext> {
    let weak = Arc::downgrade(svc);
    let on_published = move |room: &str, role: crate::auth::Role| {
        if let Some(svc) = weak.upgrade() {
            crate::bridge::control::auto_start(&svc.bridge_ctl(None), room, role);
        }
    };
    Arc::new(crate::rtmp::server::RtmpContext {
        origin: svc.origin.clone(),
        cfg: svc.cfg.origin.clone(),
        authorize: svc.authorize.clone(),
        publishers: Arc::new(crate::participant::rtmp::RtmpRooms {
            rooms: svc.rooms.clone(),
            key_secret: svc.cfg.auth.secret.as_bytes().to_vec(),
            cfg: svc.cfg.origin.clone(),
            stream_keys: svc.stream_keys.clone(),
            authorize: svc.authorize.clone(),
            on_published: Some(Arc::new(on_published)),
        }),
    })
}

pub async fn start(cfg: Config) -> anyhow::Result<Server> {
    check_secret(&cfg)?;
    let cfg = Arc::new(cfg);
    let auth = Authenticator::new(&cfg.auth).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let rooms = Arc::new(Registry::with_webhooks(
        cfg.room.clone(),
        crate::webhooks::Webhooks::start(&cfg.webhooks),
    ));
    let origin = crate::rtmp::origin::Origin::new();
    let recordings =
        crate::recording::Recordings::new(cfg.recording.clone(), origin.clone(), rooms.clone());
    let services = Arc::new(Services {
        cfg: cfg.clone(),
        auth,
        rooms,
        peers: Arc::new(PeerFactory::new(cfg.webrtc.clone())),
        metrics: Arc::new(Metrics::default()),
        origin,
        recordings,
        bridges: dashmap::DashMap::new(),
        whip: Default::default(),
        resumable: Default::default(),
        stream_keys: Arc::new(crate::auth::keys::StreamKeys::new(cfg.origin.key_max_ttl)),
        authorize: crate::webhooks::auth::Authorizer::from_config(&cfg.webhooks),
        shutdown: shutdown_rx.clone(),
    });
    follow_rooms(&services);
    services.recordings.spawn_auto(shutdown_rx.clone());
    let listener = tokio::net::TcpListener::bind(cfg.server.http_listen)
        .await
        .with_context(|| format!("binding {}", cfg.server.http_listen))?;
    let addr = listener.local_addr()?;
    let rtmp_addr = if cfg.server.rtmp_listen.is_empty() {
        None
    } else {
        let l = tokio::net::TcpListener::bind(cfg.server.rtmp_listen.as_str())
            .await
            .with_context(|| format!("binding RTMP {}", cfg.server.rtmp_listen))?;
        let a = l.local_addr()?;
        tokio::spawn(crate::rtmp::server::serve(
            l,
            rtmp_context(&services),
            shutdown_rx.clone(),
        ));
        Some(a)
    };
    tokio::spawn(room_deadlines(services.clone(), shutdown_rx.clone()));
    let app = crate::http::router(services.clone());
    let svc = services.clone();
    let task = tokio::spawn(async move {
        let signalled = crate::http::serve::serve(
            listener,
            app,
            svc.cfg.server.clone(),
            svc.metrics.clone(),
            shutdown_rx,
        )
        .await;
        // Connections got the shutdown signal; give them time to close their peers and to
        // flush their close frames (a WebSocket counts until its writer has finished). The
        // budget counts from the signal, HTTP connections' drain included.
        let deadline = signalled + svc.cfg.server.shutdown_timeout;
        // Recordings first: each completes its file (duration written) while the streams
        // still run, rather than being cut off when the rooms are gone or the budget is spent.
        svc.recordings.shutdown(deadline).await;
        let busy = || {
            svc.rooms.room_count() > 0
                || svc
                    .metrics
                    .ws_connections
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > 0
        };
        while busy() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The rooms' last events (participants leaving, rooms ending, recordings finished)
        // within the same budget.
        svc.rooms.webhooks().flush(deadline).await;
    });
    info!(%addr, ?rtmp_addr, "cohost listening");
    Ok(Server {
        addr,
        rtmp_addr,
        services,
        shutdown_tx,
        task,
    })
}
