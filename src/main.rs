//! The `cohost` command: `serve` (default) runs the server, `token` mints an access token,
//! `check-config` validates a configuration file.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cohost::auth::{Authenticator, Role, sign};
use cohost::config::Config;

#[derive(Parser)]
#[command(name = "cohost", version, about = "Co-host live streaming server")]
struct Cli {
    /// Configuration file (TOML). Defaults are embedded; see config/cohost.toml.
    #[arg(long, global = true, env = "COHOST_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (the default).
    Serve {
        /// Override server.http_listen, e.g. 127.0.0.1:0 for an ephemeral port.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Override server.rtmp_listen ("" disables RTMP).
        #[arg(long)]
        rtmp_listen: Option<String>,
    },
    /// Print an access token (JWT) for a room.
    Token {
        #[arg(long)]
        room: String,
        #[arg(long)]
        identity: String,
        /// host, cohost, audience or admin
        #[arg(long)]
        role: Role,
        /// Lifetime, e.g. 30m, 1h, 7d (default: auth.token_ttl; origin.key_ttl for stream keys).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Print an RTMP stream key (OBS/ffmpeg ingest) and the full publish URL instead of a JWT.
        #[arg(long)]
        stream_key: bool,
        /// Host (and port) put in the printed RTMP URL (default: server.rtmp_listen).
        #[arg(long)]
        host: Option<String>,
    },
    /// Print signed play URLs (RTMP and HTTP-FLV) of an origin stream (origin.sign_secret).
    SignUrl {
        /// Stream name (the room name for a room's bridge output).
        #[arg(long)]
        stream: String,
        /// Lifetime, e.g. 30m, 1h (default: origin.key_ttl).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Host put in the URLs (default: the listen addresses).
        #[arg(long)]
        host: Option<String>,
    },
    /// Validate the configuration and print the effective values (secrets redacted).
    CheckConfig,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COHOST_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,webrtc=warn,rtc=warn,rtc_dtls=error")
    });
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // RtcNoise turns rtc's per-packet SRTP warnings into counters (peer/noise.rs).
    tracing_subscriber::registry()
        .with(filter)
        .with(cohost::peer::noise::RtcNoise)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cohost: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match cli.cmd.unwrap_or(Cmd::Serve {
        listen: None,
        rtmp_listen: None,
    }) {
        Cmd::Token {
            room,
            identity,
            role,
            ttl,
            stream_key: true,
            host,
        } => {
            let ttl = ttl.unwrap_or(cfg.origin.key_ttl);
            if ttl > cfg.origin.key_max_ttl {
                eprintln!(
                    "cohost: --ttl {} is above origin.key_max_ttl ({})",
                    humantime::format_duration(ttl),
                    humantime::format_duration(cfg.origin.key_max_ttl)
                );
                return std::process::ExitCode::from(2);
            }
            let expires = cohost::auth::now_secs().saturating_add(ttl.as_secs());
            match sign::mint_stream_key(cfg.auth.secret.as_bytes(), &room, &identity, role, expires)
            {
                Ok(key) => {
                    let host = host.unwrap_or_else(|| cfg.server.rtmp_listen.clone());
                    let mut url = format!("rtmp://{host}/live/{key}");
                    if cfg.origin.sign_publish {
                        let q = sign::signed_query(
                            cfg.origin.sign_secret.as_bytes(),
                            &format!("/live/{key}"),
                            expires,
                        );
                        url = format!("{url}?{q}");
                    }
                    println!("stream key: {key}");
                    println!("server:     rtmp://{host}/live");
                    println!("url:        {url}");
                    println!("expires:    {expires}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cohost: {e}");
                    std::process::ExitCode::from(2)
                }
            }
        }
        Cmd::SignUrl { stream, ttl, host } => {
            if cfg.origin.sign_secret.is_empty() {
                eprintln!("cohost: origin.sign_secret is not configured");
                return std::process::ExitCode::from(2);
            }
            if !cohost::auth::valid_name(&stream) {
                eprintln!("cohost: stream must be 1-64 chars of [A-Za-z0-9._-]");
                return std::process::ExitCode::from(2);
            }
            let ttl = ttl.unwrap_or(cfg.origin.key_ttl);
            if ttl > cfg.origin.key_max_ttl {
                eprintln!(
                    "cohost: --ttl {} is above origin.key_max_ttl ({})",
                    humantime::format_duration(ttl),
                    humantime::format_duration(cfg.origin.key_max_ttl)
                );
                return std::process::ExitCode::from(2);
            }
            let expires = cohost::auth::now_secs().saturating_add(ttl.as_secs());
            let q = sign::signed_query(
                cfg.origin.sign_secret.as_bytes(),
                &format!("/live/{stream}"),
                expires,
            );
            let (rtmp, http) = match host {
                Some(h) => (h.clone(), h),
                None => (
                    cfg.server.rtmp_listen.clone(),
                    cfg.server.http_listen.to_string(),
                ),
            };
            println!("rtmp://{rtmp}/live/{stream}?{q}");
            println!("http://{http}/live/{stream}.flv?{q}");
            std::process::ExitCode::SUCCESS
        }
        Cmd::Token {
            room,
            identity,
            role,
            ttl,
            ..
        } => {
            let auth = match Authenticator::new(&cfg.auth) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("cohost: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            match auth.mint(&room, &identity, role, ttl) {
                Ok(t) => {
                    println!("{t}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cohost: {e}");
                    std::process::ExitCode::from(2)
                }
            }
        }
        Cmd::CheckConfig => {
            let mut shown = cfg.clone();
            shown.auth.secret = "<redacted>".into();
            if !shown.origin.sign_secret.is_empty() {
                shown.origin.sign_secret = "<redacted>".into();
            }
            if !shown.webhooks.key.is_empty() {
                shown.webhooks.key = "<redacted>".into();
            }
            match toml::to_string_pretty(&shown) {
                Ok(s) => {
                    println!("{s}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cohost: {e}");
                    std::process::ExitCode::from(2)
                }
            }
        }
        Cmd::Serve {
            listen,
            rtmp_listen,
        } => {
            init_tracing();
            let mut cfg = cfg;
            if let Some(l) = listen {
                cfg.server.http_listen = l;
            }
            if let Some(r) = rtmp_listen {
                cfg.server.rtmp_listen = r;
            }
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cohost: runtime: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            rt.block_on(serve(cfg))
        }
    }
}

async fn serve(cfg: Config) -> std::process::ExitCode {
    let server = match cohost::app::start(cfg).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cohost: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Machine-readable line for scripts and tests that start the server on port 0.
    println!("cohost listening on http://{}", server.addr);
    if let Some(a) = server.rtmp_addr {
        println!("cohost rtmp on rtmp://{a}/live");
    }
    wait_for_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await;
    std::process::ExitCode::SUCCESS
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
