//! The shipped configuration file documents the defaults: it must parse to exactly them.

use cohost::config::Config;

#[test]
fn shipped_config_file_parses_to_the_defaults() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/cohost.toml"))
        .expect("config/cohost.toml");
    let cfg = Config::from_toml_str(&text).expect("parses");
    assert_eq!(cfg, Config::default());
}

#[test]
fn unknown_key_is_rejected_by_name() {
    let err = Config::from_toml_str("[room]\nmax_partcipants = 3\n")
        .expect_err("typo must be an error")
        .to_string();
    assert!(err.contains("max_partcipants"), "{err}");
    let err = Config::from_toml_str("[nosuchsection]\nx = 1\n")
        .expect_err("unknown section")
        .to_string();
    assert!(err.contains("nosuchsection"), "{err}");
}

#[test]
fn invalid_values_are_explained() {
    let err = Config::from_toml_str("[webrtc]\nudp_port_min = 6000\nudp_port_max = 5000\n")
        .expect_err("bad range")
        .to_string();
    assert!(err.contains("udp_port_min"), "{err}");
    let err = Config::from_toml_str("[signaling]\nping_interval = \"soon\"\n")
        .expect_err("bad duration")
        .to_string();
    assert!(
        err.contains("ping_interval") || err.contains("soon"),
        "{err}"
    );
}

#[test]
fn non_loopback_with_dev_secret_refuses_to_start() {
    let cfg = Config::from_toml_str("[server]\nhttp_listen = \"0.0.0.0:8080\"\n").unwrap();
    let err = cohost::app::check_secret(&cfg).expect_err("must refuse");
    assert!(err.to_string().contains("development secret"), "{err}");
    let cfg = Config::from_toml_str(
        "[server]\nhttp_listen = \"0.0.0.0:8080\"\nallow_dev_secret = true\n",
    )
    .unwrap();
    assert!(cohost::app::check_secret(&cfg).is_ok());
}

#[test]
fn webhooks_need_a_key_and_http_urls_and_never_show_the_key() {
    let err = Config::from_toml_str("[webhooks]\nurls = [\"http://127.0.0.1:9/h\"]\n")
        .expect_err("no key")
        .to_string();
    assert!(err.contains("webhooks.key"), "{err}");
    Config::from_toml_str(
        "[webhooks]\nurls = [\"https://example.com/h\"]\nkey = \"0123456789abcdef\"\n",
    )
    .expect("https is fine");
    let err = Config::from_toml_str(
        "[webhooks]\nurls = [\"ftp://example.com/h\"]\nkey = \"0123456789abcdef\"\n",
    )
    .expect_err("ftp")
    .to_string();
    assert!(err.contains("webhooks.urls"), "{err}");
    let err = Config::from_toml_str(
        "[webhooks]\nurls = [\"https://h/x\"]\nkey = \"0123456789abcdef\"\nca_file = \"/nonexistent/ca.pem\"\n",
    )
    .expect_err("missing CA file")
    .to_string();
    assert!(err.contains("webhooks.ca_file"), "{err}");
    let err = Config::from_toml_str(
        "[webhooks]\nurls = [\"https://h/x\"]\nkey = \"0123456789abcdef\"\nca_file = \"Cargo.toml\"\n",
    )
    .expect_err("not a certificate")
    .to_string();
    assert!(err.contains("no PEM certificate"), "{err}");
    let err =
        Config::from_toml_str("[webhooks]\nurls = [\"http://\"]\nkey = \"0123456789abcdef\"\n")
            .expect_err("no host")
            .to_string();
    assert!(err.contains("webhooks.urls"), "{err}");
    let err = Config::from_toml_str(
        "[webhooks]\nurls = [\"http://h/x\"]\nkey = \"0123456789abcdef\"\nmax_attempts = 0\n",
    )
    .expect_err("no attempts")
    .to_string();
    assert!(err.contains("max_attempts"), "{err}");
    let cfg = Config::from_toml_str(
        "[webhooks]\nurls = [\"http://backend:8000/x?token=t\"]\nkey = \"a-secret-key-of-16+\"\n",
    )
    .expect("valid");
    let shown = format!("{cfg:?}");
    assert!(!shown.contains("a-secret-key-of-16+"), "{shown}");
    assert!(shown.contains("<redacted>"), "{shown}");
}

#[test]
fn hls_settings_are_range_checked_and_unknown_keys_rejected() {
    for (bad, key) in [
        ("part_target = \"100ms\"", "hls.part_target"),
        ("part_target = \"1500ms\"", "hls.part_target"),
        ("segment_target = \"500ms\"", "hls.segment_target"),
        ("window_segments = 2", "hls.window_segments"),
        ("max_stream_bytes = 1000", "hls.max_stream_bytes"),
        ("idle_stop = \"0s\"", "hls.idle_stop"),
        ("max_blocking_requests = 0", "hls.max_blocking_requests"),
    ] {
        let err = Config::from_toml_str(&format!("[hls]\n{bad}\n"))
            .expect_err(bad)
            .to_string();
        assert!(err.contains(key), "{bad}: {err}");
    }
    let err = Config::from_toml_str("[hls]\npart_targt = \"300ms\"\n")
        .expect_err("typo")
        .to_string();
    assert!(err.contains("part_targt"), "{err}");
    let cfg = Config::from_toml_str("[hls]\nsegment_target = \"4s\"\npart_target = \"500ms\"\n")
        .expect("valid");
    assert_eq!(cfg.hls.part_target, std::time::Duration::from_millis(500));
}
