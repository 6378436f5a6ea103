//! The disk side of one recording: a blocking loop (on tokio's blocking pool) that carries out
//! the session's [`Op`]s, so slow disks never stall the async task that reads the origin.
//!
//! A file is: the init segment (ftyp+moov with an `mehd` duration of 0), then one moof+mdat
//! fragment per [`Op::Append`], each written and `fdatasync`ed as it comes, so a crash of the
//! server (or the machine) loses at most the fragment being written; the file stays playable
//! fragment by fragment. On close the init segment is written again in place with the final
//! duration (same length: only the `mehd` value differs).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::session::Op;
use crate::media::fmp4::{Tracks, init_segment};
use crate::webhooks::{Event, RecordingEnd, Webhooks};

/// The file being written, as listings show it.
#[derive(Debug, Clone, Default)]
pub struct Current {
    pub name: String,
    pub size: u64,
    pub duration_ms: u64,
}

/// What the recording's owner can see of its writer.
#[derive(Debug, Default)]
pub struct Live {
    pub current: Mutex<Option<Current>>,
    /// Files finished so far.
    pub files: Mutex<u64>,
    /// Why writing stopped, if it failed.
    pub error: Mutex<Option<String>>,
}

impl Live {
    pub fn current(&self) -> Option<Current> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    fn set_current(&self, c: Option<Current>) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = c;
    }
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub fn files(&self) -> u64 {
        *self.files.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Open {
    file: File,
    name: String,
    tracks: Tracks,
    init_len: usize,
    size: u64,
    duration_ms: u64,
}

/// `2026-12-04T19:28:12.123Z` -> `20261204T192812.123Z` (a name part without `:`).
pub fn stamp(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t)
        .to_string()
        .replace(['-', ':'], "")
}

/// Create `{dir}/{room}-{stamp}.mp4`, or with `-1`, `-2`, ... when that exists (two files
/// started in the same millisecond). `create_new`: an existing file is never overwritten.
fn create(dir: &Path, room: &str) -> std::io::Result<(File, String)> {
    std::fs::create_dir_all(dir)?;
    let base = format!("{room}-{}", stamp(std::time::SystemTime::now()));
    for n in 0..100u32 {
        let name = if n == 0 {
            format!("{base}.mp4")
        } else {
            format!("{base}-{n}.mp4")
        };
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(&name))
        {
            Ok(f) => return Ok((f, name)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free file name"))
}

/// Server-wide counters (`/metrics`).
#[derive(Debug, Default)]
pub struct Counters {
    pub files: std::sync::atomic::AtomicU64,
    pub write_errors: std::sync::atomic::AtomicU64,
}

pub struct Writer {
    pub dir: PathBuf,
    pub room: String,
    pub hooks: Webhooks,
    pub live: Arc<Live>,
    pub counters: Arc<Counters>,
}

impl Writer {
    /// Carry out ops until the channel closes (the file still open is then closed as
    /// `stopped`) or an I/O error (the open file is reported `error` and the loop ends, which
    /// the recorder sees as its channel closing).
    pub fn run(self, mut rx: mpsc::Receiver<Op>) {
        let mut open: Option<Open> = None;
        while let Some(op) = rx.blocking_recv() {
            if let Err(e) = self.apply(op, &mut open) {
                tracing::error!(room = %self.room, dir = %self.dir.display(), "recording stopped: write failed: {e}");
                *self.live.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                self.counters
                    .write_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if let Some(o) = open.take() {
                    self.finished(&o, RecordingEnd::Error);
                }
                self.live.set_current(None);
                return;
            }
        }
        if let Some(o) = open.take()
            && let Err(e) = self.close(o, RecordingEnd::Stopped)
        {
            tracing::error!(room = %self.room, "recording: closing the file failed: {e}");
        }
    }

    fn apply(&self, op: Op, open: &mut Option<Open>) -> std::io::Result<()> {
        match op {
            Op::Open(tracks) => {
                if let Some(o) = open.take() {
                    // The session always closes first; a stray open must not lose the file.
                    self.close(o, RecordingEnd::Stopped)?;
                }
                let (mut file, name) = create(&self.dir, &self.room)?;
                let init = init_segment(&tracks, Some(0));
                file.write_all(&init)?;
                file.sync_data()?;
                tracing::info!(room = %self.room, file = %name, "recording file started");
                self.hooks
                    .emit(&self.room, Event::RecordingStarted { file: name.clone() });
                let o = Open {
                    file,
                    name,
                    tracks,
                    init_len: init.len(),
                    size: init.len() as u64,
                    duration_ms: 0,
                };
                self.show(&o);
                *open = Some(o);
            }
            Op::Append(fr) => {
                let Some(o) = open.as_mut() else {
                    return Ok(());
                };
                o.file.write_all(&fr.bytes)?;
                // A fragment on disk is a fragment a crash does not lose.
                o.file.sync_data()?;
                o.size += fr.bytes.len() as u64;
                o.duration_ms = o.duration_ms.max(fr.start_ms + fr.duration_ms);
                self.show(o);
            }
            Op::Close(reason) => {
                if let Some(o) = open.take() {
                    self.close(o, reason)?;
                }
            }
        }
        Ok(())
    }

    fn show(&self, o: &Open) {
        self.live.set_current(Some(Current {
            name: o.name.clone(),
            size: o.size,
            duration_ms: o.duration_ms,
        }));
    }

    fn close(&self, mut o: Open, reason: RecordingEnd) -> std::io::Result<()> {
        let init = init_segment(&o.tracks, Some(o.duration_ms));
        if init.len() == o.init_len {
            o.file.seek(SeekFrom::Start(0))?;
            o.file.write_all(&init)?;
        } else {
            // Would overwrite the first fragment: leave the duration at 0 (still playable).
            tracing::warn!(room = %self.room, file = %o.name, "recording: init segment changed length; duration not patched");
        }
        o.file.sync_all()?;
        self.live.set_current(None);
        *self.live.files.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.counters
            .files
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.finished(&o, reason);
        Ok(())
    }

    fn finished(&self, o: &Open, reason: RecordingEnd) {
        tracing::info!(room = %self.room, file = %o.name, duration_ms = o.duration_ms, size = o.size, ?reason, "recording file finished");
        self.hooks.emit(
            &self.room,
            Event::RecordingFinished {
                file: o.name.clone(),
                duration_ms: o.duration_ms,
                size: o.size,
                reason,
            },
        );
    }
}

/// The duration an `mehd` box says (milliseconds), from the start of an MP4 file: `None` when
/// there is no `moov`/`mvex`/`mehd` in `head`, or it says 0 (a file whose recording never
/// closed it: crashed, or still being written).
pub fn mehd_duration_ms(head: &[u8]) -> Option<u64> {
    let moov = child(head, b"moov")?;
    let mvhd = child(moov, b"mvhd")?;
    // mvhd: version(1) flags(3), then times and the timescale.
    let timescale = match *mvhd.first()? {
        0 => be32(mvhd.get(12..16)?),
        1 => be32(mvhd.get(20..24)?),
        _ => return None,
    };
    let mehd = child(child(moov, b"mvex")?, b"mehd")?;
    let d = match *mehd.first()? {
        0 => u64::from(be32(mehd.get(4..8)?)),
        1 => u64::from_be_bytes(mehd.get(4..12)?.try_into().ok()?),
        _ => return None,
    };
    if timescale == 0 || d == 0 {
        return None;
    }
    Some(d.saturating_mul(1000) / u64::from(timescale))
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// The payload of the first box of type `kind` among the boxes of `data`.
fn child<'a>(mut data: &'a [u8], kind: &[u8; 4]) -> Option<&'a [u8]> {
    while data.len() >= 8 {
        let size = be32(&data[..4]) as usize;
        let (head, size) = match size {
            1 => {
                let large = u64::from_be_bytes(data.get(8..16)?.try_into().ok()?);
                (16, usize::try_from(large).ok()?)
            }
            0 => (8, data.len()),
            s => (8, s),
        };
        if size < head || size > data.len() {
            return None;
        }
        if &data[4..8] == kind {
            return Some(&data[head..size]);
        }
        data = &data[size..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed(kind: &[u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut b = ((payload.len() + 8) as u32).to_be_bytes().to_vec();
        b.extend_from_slice(kind);
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn mehd_is_read_and_bad_boxes_are_not_a_panic() {
        let mvhd = boxed(
            b"mvhd",
            &[vec![0; 12], 1000u32.to_be_bytes().to_vec()].concat(),
        );
        let mehd = boxed(
            b"mehd",
            &[vec![0; 4], 4500u32.to_be_bytes().to_vec()].concat(),
        );
        let moov = boxed(b"moov", &[mvhd, boxed(b"mvex", &mehd)].concat());
        let file = [boxed(b"ftyp", b"isom"), moov].concat();
        assert_eq!(mehd_duration_ms(&file), Some(4500));
        for n in 0..file.len() {
            let _ = mehd_duration_ms(&file[..n]);
        }
        assert_eq!(mehd_duration_ms(b"\0\0\0\x01moov"), None);
        assert_eq!(mehd_duration_ms(&[0xff; 64]), None);
    }

    #[test]
    fn stamps_sort_and_carry_no_colons() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_800_000_000_123);
        assert_eq!(stamp(t), "20270115T080000.123Z");
    }
}
