//! Recording: the one owner of writing rooms' output to disk. A recording follows a room's
//! stream on the embedded origin (the bridge's output, named after the room, passthrough or
//! mixed) as a player does, and writes it as fragmented MP4 (H.264 + AAC) files
//! `{recording.dir}/{room}/{room}-{UTC start}.mp4`.
//!
//! - One recording per room at a time, at most `recording.max_concurrent` in the server.
//! - It starts on request (REST, the host's `start_recording`) or, with `recording.auto`, when
//!   a room's stream is published; it ends when stopped, when its room ends, on a write error,
//!   or at shutdown. Meanwhile it outlives its stream: while the room has no stream (the
//!   bridge not started yet, or restarting) it waits, and the next stream goes into a new file.
//! - Within one stream, files rotate by duration/size at keyframes (see `session.rs`);
//!   passthrough <-> mix switches stay in the same file (one sequence header).
//! - The origin drops a player whose 1024-tag queue fills. The recorder only muxes in its task
//!   (no I/O) and hands the disk work to a blocking writer through a bounded queue; if the
//!   disk is so slow that the queue stays full, the origin drops the recorder, the file is
//!   closed and the recording goes on in a new one (logged).

pub mod session;
pub mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::config::RecordingConfig;
use crate::room::{Lifecycle, Registry, Room};
use crate::rtmp::origin::Origin;
use crate::signaling::protocol::ServerMessage;
use crate::webhooks::RecordingEnd;
use session::{Limits, Op, Session};
use writer::{Counters, Live, Writer};

/// Ops waiting for the writer (each a fragment of about `recording.fragment`, or less).
const WRITER_QUEUE: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordingError {
    #[error("no such room (nobody joined it)")]
    NoRoom,
    #[error("the room is already being recorded")]
    AlreadyRecording,
    #[error("the room is not being recorded")]
    NotRecording,
    #[error("at most {0} recordings at once (recording.max_concurrent)")]
    TooMany(usize),
    #[error("bad room or file name")]
    BadName,
    #[error("no such recording")]
    NotFound,
    #[error("reading the recordings: {0}")]
    Io(String),
}

/// Why a recording ended (`recording_stopped`'s `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Stopped over REST or signaling.
    Requested,
    /// Its room ended.
    RoomEnded,
    /// Writing failed (disk full, I/O error).
    WriteError,
    /// The server is shutting down.
    ServerShutdown,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Requested => "requested",
            StopReason::RoomEnded => "room_ended",
            StopReason::WriteError => "write_error",
            StopReason::ServerShutdown => "server_shutdown",
        }
    }
}

/// One running recording.
struct Active {
    id: u64,
    stop: watch::Sender<Option<StopReason>>,
    live: Arc<Live>,
    /// The room instance it records (a later room of the same name is another room).
    room: Weak<Room>,
    started: SystemTime,
    /// Waiting for its stream (no file open).
    waiting: Arc<std::sync::atomic::AtomicBool>,
}

/// A recording file as listed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FileInfo {
    pub file: String,
    /// UTC start time (RFC 3339), from the name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// Media duration; absent for a file that was never closed (server crash) or one still
    /// being written that has no fragment yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    pub size: u64,
    /// `recording` (being written), `complete`, or `incomplete` (never closed: its duration
    /// was not written; it plays fragment by fragment up to where it stopped).
    pub state: &'static str,
}

/// The status of a room's recording.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// `waiting` (for the room's stream) or `recording`.
    pub state: &'static str,
    /// Unix ms when the recording was started.
    pub started_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub files_finished: u64,
}

pub struct Recordings {
    cfg: RecordingConfig,
    origin: Arc<Origin>,
    rooms: Arc<Registry>,
    active: Mutex<HashMap<String, Active>>,
    next_id: AtomicU64,
    counters: Arc<Counters>,
}

/// A room or file name used as a path component: the validated name characters, never a
/// dot name (`.`, `..`, hidden files), bounded.
pub fn safe_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Recordings {
    pub fn new(cfg: RecordingConfig, origin: Arc<Origin>, rooms: Arc<Registry>) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            origin,
            rooms,
            active: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            counters: Arc::default(),
        })
    }

    /// `cohost_recordings_*` for `/metrics`.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        for (name, help, kind, v) in [
            (
                "cohost_recordings_active",
                "Recordings running (waiting for their stream or writing).",
                "gauge",
                self.count() as u64,
            ),
            (
                "cohost_recording_files_total",
                "Recording files completed and closed.",
                "counter",
                self.counters.files.load(Ordering::Relaxed),
            ),
            (
                "cohost_recording_write_errors_total",
                "Recordings stopped by a write error (disk full, I/O error).",
                "counter",
                self.counters.write_errors.load(Ordering::Relaxed),
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            ));
        }
        out
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Active>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn room_dir(&self, room: &str) -> Result<PathBuf, RecordingError> {
        if !crate::auth::valid_name(room) || !safe_component(room) {
            return Err(RecordingError::BadName);
        }
        Ok(Path::new(&self.cfg.dir).join(room))
    }

    /// Start recording `room`'s output (now if it is live, else as soon as it is).
    pub fn start(self: &Arc<Self>, room: &str) -> Result<Status, RecordingError> {
        let dir = self.room_dir(room)?;
        let r = self.rooms.get(room).ok_or(RecordingError::NoRoom)?;
        if r.is_closed() {
            return Err(RecordingError::NoRoom);
        }
        let mut active = self.lock();
        // One left over from an earlier room of this name is not this room's: it goes.
        if let Some(a) = active.get(room)
            && a.room.upgrade().is_none_or(|old| !Arc::ptr_eq(&old, &r))
        {
            let _ = a.stop.send(Some(StopReason::RoomEnded));
            active.remove(room);
        }
        if active.contains_key(room) {
            return Err(RecordingError::AlreadyRecording);
        }
        if active.len() >= self.cfg.max_concurrent {
            return Err(RecordingError::TooMany(self.cfg.max_concurrent));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (stop, stop_rx) = watch::channel(None);
        let live = Arc::new(Live::default());
        let waiting = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let started = SystemTime::now();
        active.insert(
            room.to_string(),
            Active {
                id,
                stop,
                live: live.clone(),
                room: Arc::downgrade(&r),
                started,
                waiting: waiting.clone(),
            },
        );
        drop(active);
        let rec = Recorder {
            recordings: self.clone(),
            id,
            name: room.to_string(),
            room: Arc::downgrade(&r),
            dir,
            live,
            waiting,
        };
        tokio::spawn(rec.run(stop_rx));
        tracing::info!(%room, "recording started");
        r.tell_all(&ServerMessage::RecordingStarted {});
        Ok(self.status(room).unwrap_or(Status {
            state: "waiting",
            started_at: unix_ms(started),
            file: None,
            files_finished: 0,
        }))
    }

    /// Stop `room`'s recording: the file being written is completed and closed.
    pub fn stop(&self, room: &str, reason: StopReason) -> Result<(), RecordingError> {
        let active = self.lock();
        let a = active.get(room).ok_or(RecordingError::NotRecording)?;
        // The recorder removes itself once its file is closed.
        let _ = a.stop.send(Some(reason));
        Ok(())
    }

    pub fn status(&self, room: &str) -> Option<Status> {
        let active = self.lock();
        let a = active.get(room)?;
        let current = a.live.current();
        Some(Status {
            state: if a.waiting.load(Ordering::Relaxed) || current.is_none() {
                "waiting"
            } else {
                "recording"
            },
            started_at: unix_ms(a.started),
            file: current.map(|c| c.name),
            files_finished: a.live.files(),
        })
    }

    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Follow a room's life: its recording ends with it.
    pub fn follow_room(&self, room: &Arc<Room>, change: Lifecycle) {
        if change != Lifecycle::Ended {
            return;
        }
        let active = self.lock();
        if let Some(a) = active.get(&room.name)
            && a.room.upgrade().is_none_or(|r| Arc::ptr_eq(&r, room))
        {
            let _ = a.stop.send(Some(StopReason::RoomEnded));
        }
    }

    /// `recording.auto`: record every room whose stream is published, until the room ends.
    pub fn spawn_auto(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if !self.cfg.auto {
            return;
        }
        let weak = Arc::downgrade(self);
        let mut publishes = self.origin.publishes();
        tokio::spawn(async move {
            // Streams live at the last look: only a stream newly published starts a recording
            // (one stopped by request stays stopped while its stream runs).
            let mut seen = std::collections::HashSet::new();
            loop {
                let Some(me) = weak.upgrade() else { return };
                let names: std::collections::HashSet<String> =
                    me.origin.stream_names().into_iter().collect();
                for name in names.difference(&seen) {
                    if me.lock().contains_key(name) {
                        continue;
                    }
                    match me.start(name) {
                        Ok(_) => tracing::info!(room = %name, "recording started automatically"),
                        Err(RecordingError::AlreadyRecording | RecordingError::NoRoom) => {}
                        Err(e) => {
                            tracing::warn!(room = %name, "automatic recording not started: {e}")
                        }
                    }
                }
                seen = names;
                drop(me);
                tokio::select! {
                    r = publishes.changed() => if r.is_err() { return },
                    _ = shutdown.changed() => return,
                }
            }
        });
    }

    /// Graceful shutdown: every recording closes its file (duration written), within
    /// `deadline`.
    pub async fn shutdown(&self, deadline: tokio::time::Instant) {
        for a in self.lock().values() {
            let _ = a.stop.send(Some(StopReason::ServerShutdown));
        }
        while self.count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The room's files, newest first, at most `recording.list_limit`, those before `before`
    /// (a file name of an earlier page) when given.
    pub fn list(&self, room: &str, before: Option<&str>) -> Result<Vec<FileInfo>, RecordingError> {
        let dir = self.room_dir(room)?;
        let current = self.lock().get(room).and_then(|a| a.live.current());
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(RecordingError::Io(e.to_string())),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(".mp4") && safe_component(n))
            .filter(|n| before.is_none_or(|b| n.as_str() < b))
            .collect();
        // Names carry the UTC start: sorting them sorts by time.
        names.sort_unstable_by(|a, b| b.cmp(a));
        names.truncate(self.cfg.list_limit);
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let path = dir.join(&name);
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let start = start_of(room, &name);
            if let Some(c) = current.as_ref().filter(|c| c.name == name) {
                out.push(FileInfo {
                    file: name,
                    start,
                    duration_ms: Some(c.duration_ms),
                    size: meta.len(),
                    state: "recording",
                });
                continue;
            }
            let duration_ms = read_head(&path).and_then(|h| writer::mehd_duration_ms(&h));
            out.push(FileInfo {
                file: name,
                start,
                duration_ms,
                size: meta.len(),
                state: if duration_ms.is_some() {
                    "complete"
                } else {
                    "incomplete"
                },
            });
        }
        Ok(out)
    }

    /// The path of one of the room's files, if it exists.
    pub fn file_path(&self, room: &str, file: &str) -> Result<PathBuf, RecordingError> {
        let dir = self.room_dir(room)?;
        if !safe_component(file) || !file.ends_with(".mp4") {
            return Err(RecordingError::BadName);
        }
        let p = dir.join(file);
        if p.is_file() {
            Ok(p)
        } else {
            Err(RecordingError::NotFound)
        }
    }

    /// A recorder is done: it leaves the table (if it is still the one there).
    fn remove(&self, room: &str, id: u64) {
        let mut active = self.lock();
        if active.get(room).is_some_and(|a| a.id == id) {
            active.remove(room);
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The first bytes of a file, enough for its init segment.
fn read_head(p: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(p).ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return None,
        }
    }
    buf.truncate(n);
    Some(buf)
}

/// `{room}-20261204T192812.123Z[-n].mp4` -> `2026-12-04T19:28:12.123Z`.
fn start_of(room: &str, name: &str) -> Option<String> {
    let s = name.strip_prefix(room)?.strip_prefix('-')?.get(..20)?;
    let b = s.as_bytes();
    if !s.is_ascii() || b[8] != b'T' || b[15] != b'.' || b[19] != b'Z' {
        return None;
    }
    let t = format!(
        "{}-{}-{}T{}:{}:{}",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13],
        &s[13..20]
    );
    humantime::parse_rfc3339(&t).ok().map(|_| t)
}

/// Until the recording is told to stop, and why (its owner gone counts as shutdown).
async fn stopped(stop: &mut watch::Receiver<Option<StopReason>>) -> StopReason {
    match stop.wait_for(Option::is_some).await {
        Ok(v) => v.unwrap_or(StopReason::ServerShutdown),
        Err(_) => StopReason::ServerShutdown,
    }
}

/// The task of one recording.
struct Recorder {
    recordings: Arc<Recordings>,
    id: u64,
    name: String,
    room: Weak<Room>,
    dir: PathBuf,
    live: Arc<Live>,
    waiting: Arc<std::sync::atomic::AtomicBool>,
}

/// How following one stream ended.
enum Followed {
    /// The stream ended (or dropped us): wait for the next one.
    StreamEnded,
    Stopped(StopReason),
    /// The writer failed.
    WriteFailed,
}

impl Recorder {
    async fn run(self, mut stop: watch::Receiver<Option<StopReason>>) {
        let cfg = &self.recordings.cfg;
        let limits = Limits {
            fragment_ms: cfg.fragment.as_millis() as u64,
            max_duration_ms: cfg.max_duration.as_millis() as u64,
            max_size: cfg.max_size,
        };
        let hooks = self
            .room
            .upgrade()
            .map(|r| r.webhooks().clone())
            .unwrap_or_default();
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let writer = Writer {
            dir: self.dir.clone(),
            room: self.name.clone(),
            hooks,
            live: self.live.clone(),
            counters: self.recordings.counters.clone(),
        };
        let done = tokio::task::spawn_blocking(move || writer.run(rx));
        let origin = self.recordings.origin.clone();
        let reason = loop {
            // Subscribe before looking, so a publish in between is not missed.
            let mut publishes = origin.publishes();
            let player = match origin.play(&self.name) {
                Ok(p) => p,
                Err(_) => {
                    self.waiting.store(true, Ordering::Relaxed);
                    tokio::select! {
                        r = publishes.changed() => {
                            if r.is_err() { break StopReason::ServerShutdown; }
                            continue;
                        }
                        r = stopped(&mut stop) => break r,
                    }
                }
            };
            self.waiting.store(false, Ordering::Relaxed);
            match self
                .follow(player, Session::new(limits), &tx, &mut stop)
                .await
            {
                Followed::StreamEnded => continue,
                Followed::Stopped(r) => break r,
                Followed::WriteFailed => break StopReason::WriteError,
            }
        };
        // Closing the queue closes the open file (if any) as `stopped`.
        drop(tx);
        let _ = done.await;
        let reason = if self.live.error().is_some() {
            StopReason::WriteError
        } else {
            reason
        };
        self.recordings.remove(&self.name, self.id);
        tracing::info!(room = %self.name, reason = reason.as_str(), "recording stopped");
        if let Some(r) = self.room.upgrade() {
            r.tell_all(&ServerMessage::RecordingStopped {
                reason: reason.as_str().to_string(),
            });
        }
    }

    /// Record one origin stream until it ends, the recording stops, or writing fails.
    async fn follow(
        &self,
        player: crate::rtmp::origin::Player,
        mut session: Session,
        tx: &mpsc::Sender<Op>,
        stop: &mut watch::Receiver<Option<StopReason>>,
    ) -> Followed {
        let mut rx = player.rx;
        for tag in player.initial {
            for op in session.push(&tag) {
                if tx.send(op).await.is_err() {
                    return Followed::WriteFailed;
                }
            }
        }
        loop {
            let tag = tokio::select! {
                t = rx.recv() => t,
                reason = stopped(stop) => {
                    for op in session.end(RecordingEnd::Stopped) {
                        if tx.send(op).await.is_err() {
                            return Followed::WriteFailed;
                        }
                    }
                    return Followed::Stopped(reason);
                }
            };
            let Some(tag) = tag else {
                if self.recordings.origin.is_live(&self.name) {
                    tracing::warn!(room = %self.name, "recording fell behind its stream (slow disk?) and was dropped by the origin: continuing in a new file");
                }
                for op in session.end(RecordingEnd::StreamEnded) {
                    if tx.send(op).await.is_err() {
                        return Followed::WriteFailed;
                    }
                }
                return Followed::StreamEnded;
            };
            for op in session.push(&tag) {
                if tx.send(op).await.is_err() {
                    return Followed::WriteFailed;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_the_directory_are_refused() {
        for bad in [".", "..", ".hidden", "a/b", "a\\b", "", "a\0b"] {
            assert!(!safe_component(bad), "{bad:?}");
        }
        assert!(safe_component("room-1_x.y"));
    }

    #[test]
    fn start_time_comes_from_the_file_name() {
        assert_eq!(
            start_of("r1", "r1-20261204T192812.123Z.mp4").as_deref(),
            Some("2026-12-04T19:28:12.123Z")
        );
        assert_eq!(
            start_of("r1", "r1-20261204T192812.123Z-2.mp4").as_deref(),
            Some("2026-12-04T19:28:12.123Z")
        );
        assert_eq!(start_of("r1", "r1-nonsense.mp4"), None);
        assert_eq!(start_of("r1", "r1-2026120XT192812.123Z.mp4"), None);
    }
}
