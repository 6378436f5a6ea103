//! Replays every input the fuzzers once crashed on (fuzz/regressions/TARGET/*) and the small
//! seed corpora (fuzz/seeds/TARGET/*) through the same code the fuzz targets run
//! (fuzz/targets.rs), so a fixed crash stays fixed without a nightly toolchain or cargo-fuzz.

use std::path::Path;

#[path = "../fuzz/targets.rs"]
mod targets;

type Body = fn(&[u8]);

const TARGETS: &[(&str, Body)] = &[
    ("signaling_session", targets::signaling_session::run),
    ("flv_reader", targets::flv_reader::run),
    ("amf0_decode", targets::amf0_decode::run),
    ("h264_parsers", targets::h264_parsers::run),
    ("rtp_h264", targets::rtp_h264::run),
    ("rtmp_ingest", targets::rtmp_ingest::run),
    ("origin_signatures", targets::origin_signatures::run),
    ("rtmp_session", targets::rtmp_session::run),
    ("ws_frames", targets::ws_frames::run),
    ("whip_sdp", targets::whip_sdp::run),
    ("fmp4_mux", targets::fmp4_mux::run),
];

/// Runs `body` on every file under fuzz/DIR/TARGET; returns how many inputs ran.
fn replay(dir: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(dir);
    let mut n = 0;
    for (name, body) in TARGETS {
        let Ok(entries) = std::fs::read_dir(root.join(name)) else {
            continue;
        };
        let mut files: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for f in files.iter().filter(|f| f.is_file()) {
            let data = std::fs::read(f).expect("read fuzz input");
            eprintln!("{name}: {}", f.display());
            body(&data);
            n += 1;
        }
    }
    // A directory named after no target is a typo that would silently skip its inputs.
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.flatten() {
            let dir_name = e.file_name().to_string_lossy().into_owned();
            assert!(
                TARGETS.iter().any(|(t, _)| *t == dir_name) || !e.path().is_dir(),
                "fuzz/{dir}/{dir_name} is not a fuzz target"
            );
        }
    }
    n
}

#[test]
fn fuzz_crash_inputs_no_longer_crash() {
    let n = replay("regressions");
    eprintln!("{n} crash inputs replayed");
}

#[test]
fn fuzz_seed_inputs_run_clean() {
    let n = replay("seeds");
    assert!(n > 0, "fuzz/seeds holds the seed inputs of the new targets");
}
