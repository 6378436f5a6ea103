//! Receiver-side accounting and process measurements. Receivers never decode: each packet
//! carries a stamp in its last 16 bytes (written by the sender) with the send time, so the
//! one-way latency through the SFU is read on the same machine and clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rtc::rtp::Packet;

pub const STAMP_MAGIC: u32 = 0xC0_40_5E_ED;
pub const STAMP_LEN: usize = 16;

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Overwrite the last 16 bytes of a payload with [magic][video][keyframe][pad][send time ns].
pub fn stamp(payload: &mut [u8], video: bool, key: bool) {
    let n = payload.len();
    if n < STAMP_LEN {
        return;
    }
    let s = &mut payload[n - STAMP_LEN..];
    s[0..4].copy_from_slice(&STAMP_MAGIC.to_be_bytes());
    s[4] = u8::from(video);
    s[5] = u8::from(key);
    s[6..8].fill(0);
    s[8..16].copy_from_slice(&now_ns().to_be_bytes());
}

/// (is_video, is_keyframe, send time ns) from a stamped payload.
pub fn read_stamp(payload: &[u8]) -> Option<(bool, bool, u64)> {
    let n = payload.len();
    if n < STAMP_LEN {
        return None;
    }
    let s = &payload[n - STAMP_LEN..];
    if u32::from_be_bytes(s[0..4].try_into().ok()?) != STAMP_MAGIC {
        return None;
    }
    Some((
        s[4] == 1,
        s[5] == 1,
        u64::from_be_bytes(s[8..16].try_into().ok()?),
    ))
}

#[derive(Default, Clone)]
struct StreamAcc {
    packets: u64,
    bytes: u64,
    first_ext: Option<i64>,
    max_ext: i64,
    last_seq: Option<u16>,
    cycles: i64,
}

impl StreamAcc {
    fn seq(&mut self, seq: u16) {
        if let Some(last) = self.last_seq {
            // Wrap-around: a small number after a large one.
            if seq < 0x4000 && last > 0xC000 {
                self.cycles += 1;
            }
        }
        self.last_seq = Some(seq);
        let ext = self.cycles * 65536 + i64::from(seq);
        if self.first_ext.is_none() {
            self.first_ext = Some(ext);
        }
        self.max_ext = self.max_ext.max(ext);
    }
    fn expected(&self) -> u64 {
        self.first_ext
            .map(|f| (self.max_ext - f + 1).max(0) as u64)
            .unwrap_or(0)
    }
}

#[derive(Default)]
struct State {
    streams: HashMap<u32, StreamAcc>,
    latencies_us: Vec<u32>,
    /// Audio only (the tail of the mixed distribution is dominated by video bursts).
    audio_latencies_us: Vec<u32>,
    first_video: Option<Instant>,
}

/// Everything one receiving participant saw.
pub struct Sink {
    started: Mutex<Instant>,
    recording: AtomicBool,
    state: Mutex<State>,
}

/// Totals over a measurement window.
#[derive(Debug, Default, Clone)]
pub struct Window {
    pub packets: u64,
    pub bytes: u64,
    pub expected: u64,
    pub latencies_us: Vec<u32>,
    pub audio_latencies_us: Vec<u32>,
}

impl Sink {
    pub fn new() -> Self {
        Self {
            started: Mutex::new(Instant::now()),
            recording: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn on_packet(&self, p: &Packet, at: Instant) {
        let stamp = read_stamp(&p.payload);
        let rec = self.recording.load(Ordering::Relaxed);
        let mut st = self.lock();
        if let Some((video, key, sent)) = stamp {
            // "First video" = first packet of a keyframe: what a player can start from.
            if key && st.first_video.is_none() {
                st.first_video = Some(at);
            }
            if rec {
                let lat = (now_ns().saturating_sub(sent) / 1000).min(u64::from(u32::MAX)) as u32;
                st.latencies_us.push(lat);
                if !video {
                    st.audio_latencies_us.push(lat);
                }
            }
        }
        if rec {
            let s = st.streams.entry(p.header.ssrc).or_default();
            s.packets += 1;
            s.bytes += p.payload.len() as u64;
            s.seq(p.header.sequence_number);
        }
    }

    /// Start counting (after warm-up).
    pub fn record(&self, on: bool) {
        self.recording.store(on, Ordering::Relaxed);
    }

    /// Restart the join clock (for joins scheduled after the sink was made).
    pub fn reset_start(&self) {
        if let Ok(mut s) = self.started.lock() {
            *s = Instant::now();
        }
    }

    pub fn first_video_after_start(&self) -> Option<std::time::Duration> {
        let started = self.started.lock().map(|s| *s).ok()?;
        self.lock()
            .first_video
            .map(|t| t.saturating_duration_since(started))
    }

    pub fn window(&self) -> Window {
        let st = self.lock();
        let mut w = Window::default();
        for s in st.streams.values() {
            w.packets += s.packets;
            w.bytes += s.bytes;
            w.expected += s.expected();
        }
        w.latencies_us = st.latencies_us.clone();
        w.audio_latencies_us = st.audio_latencies_us.clone();
        w
    }
}

impl Default for Sink {
    fn default() -> Self {
        Self::new()
    }
}

pub fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)])
}

/// CPU time (user + system) of a process in seconds, from /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = text.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let hz = 100.0; // USER_HZ on Linux
    Some((utime + stime) / hz)
}

/// Resident memory of a process in bytes, from /proc/PID/status.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_roundtrip_and_seq_wrap() {
        let mut p = vec![0u8; 100];
        stamp(&mut p, true, true);
        let (v, k, t) = read_stamp(&p).unwrap();
        assert!(v && k && t > 0);
        let mut a = StreamAcc::default();
        for s in [65534u16, 65535, 0, 1] {
            a.seq(s);
        }
        assert_eq!(a.expected(), 4);
    }
}
