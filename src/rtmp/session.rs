//! `rml_rtmp`'s server session behind two lines of defence, so that nothing a client sends can
//! cost more than its own connection:
//! 1. every byte from the client goes through [`ChunkGuard`] first, which refuses what is
//!    known to crash `rml_rtmp` (deep AMF0 nesting that overflows the stack and aborts the
//!    process, commands with too few values, interleaved chunks...) and hands it only whole,
//!    checked messages (see [`super::guard`] for the list and why);
//! 2. every call into `rml_rtmp` (input, accepting and refusing requests, serializing media)
//!    runs under `catch_unwind`: a panic the guard did not foresee ends this session (it is
//!    dropped, as its state may be broken) with [`SessionError::Panicked`], and is logged once
//!    by the caller instead of by the panic hook.
//!
//! Sans-IO: the server moves bytes; [`drive_server_session`] runs the same code on a byte
//! string for the fuzzer.

use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Once;

use bytes::Bytes;
use rml_rtmp::sessions::{
    ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult, StreamMetadata,
};
use rml_rtmp::time::RtmpTimestamp;

use super::guard::{ChunkGuard, GuardError, Limits};

pub use rml_rtmp::chunk_io::Packet;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The guard refused the client's bytes.
    #[error("refused: {0}")]
    Refused(#[from] GuardError),
    /// `rml_rtmp` returned an error (malformed input it detects itself, a bad request id...).
    #[error("rtmp: {0}")]
    Rtmp(String),
    /// `rml_rtmp` panicked; the session is gone.
    #[error("rml_rtmp panicked: {0}")]
    Panicked(String),
    /// A call after a panic.
    #[error("session ended by an earlier panic")]
    Gone,
}

/// A server session of one connection (after the handshake).
pub struct Session {
    guard: ChunkGuard,
    inner: Option<ServerSession>,
}

impl Session {
    /// A session and the bytes it sends first (chunk size, window, bandwidth).
    pub fn new(limits: Limits) -> Result<(Self, Vec<ServerSessionResult>), SessionError> {
        let (inner, initial) = quiet_catch(|| ServerSession::new(ServerSessionConfig::new()))
            .map_err(SessionError::Panicked)?
            .map_err(rml_err)?;
        let session = Self {
            guard: ChunkGuard::new(limits),
            inner: Some(inner),
        };
        Ok((session, initial))
    }

    /// Bytes from the client: checked by the guard, then handed to `rml_rtmp`.
    pub fn handle_input(&mut self, bytes: &[u8]) -> Result<Vec<ServerSessionResult>, SessionError> {
        let checked = self.guard.push(bytes)?;
        if checked.is_empty() {
            return Ok(Vec::new());
        }
        self.call(|s| s.handle_input(&checked))
    }

    pub fn accept_request(
        &mut self,
        request_id: u32,
    ) -> Result<Vec<ServerSessionResult>, SessionError> {
        self.call(|s| s.accept_request(request_id))
    }

    pub fn reject_request(
        &mut self,
        request_id: u32,
        code: &str,
        description: &str,
    ) -> Result<Vec<ServerSessionResult>, SessionError> {
        self.call(|s| s.reject_request(request_id, code, description))
    }

    pub fn send_video_data(
        &mut self,
        stream_id: u32,
        data: Bytes,
        timestamp: RtmpTimestamp,
    ) -> Result<Packet, SessionError> {
        self.call(|s| s.send_video_data(stream_id, data, timestamp, false))
    }

    pub fn send_audio_data(
        &mut self,
        stream_id: u32,
        data: Bytes,
        timestamp: RtmpTimestamp,
    ) -> Result<Packet, SessionError> {
        self.call(|s| s.send_audio_data(stream_id, data, timestamp, false))
    }

    pub fn send_metadata(
        &mut self,
        stream_id: u32,
        metadata: &StreamMetadata,
    ) -> Result<Packet, SessionError> {
        self.call(|s| s.send_metadata(stream_id, metadata))
    }

    pub fn finish_playing(&mut self, stream_id: u32) -> Result<Packet, SessionError> {
        self.call(|s| s.finish_playing(stream_id))
    }

    /// Runs `f` on the inner session under `catch_unwind`; a panic drops the session.
    fn call<T, E: std::fmt::Debug>(
        &mut self,
        f: impl FnOnce(&mut ServerSession) -> Result<T, E>,
    ) -> Result<T, SessionError> {
        let inner = self.inner.as_mut().ok_or(SessionError::Gone)?;
        match quiet_catch(|| f(inner)) {
            Ok(r) => r.map_err(rml_err),
            Err(msg) => {
                self.inner = None;
                Err(SessionError::Panicked(msg))
            }
        }
    }
}

fn rml_err(e: impl std::fmt::Debug) -> SessionError {
    SessionError::Rtmp(format!("{e:?}"))
}

thread_local! {
    /// Set while this thread runs a call into `rml_rtmp`: the panic hook stays quiet.
    static QUIET: Cell<bool> = const { Cell::new(false) };
    /// The message of the last quiet panic on this thread.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Chains a panic hook once per process that records (instead of printing) panics raised
/// inside [`quiet_catch`], so a client that trips a panic in `rml_rtmp` costs one log line
/// (the caller's) and not a backtrace per connection. Other panics go to the previous hook.
fn install_quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) {
                LAST_PANIC.with(|l| *l.borrow_mut() = Some(info.to_string()));
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs `f`, turning a panic into `Err(message)` without the panic hook printing it.
pub(crate) fn quiet_catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    install_quiet_hook();
    let was = QUIET.with(|q| q.replace(true));
    let r = catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    r.map_err(|payload| {
        LAST_PANIC
            .with(|l| l.borrow_mut().take())
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into())
    })
}

/// Runs bytes a client sends after the handshake through the guard and a real `rml_rtmp`
/// server session, the way the server does, accepting every connect, publish and play request
/// and sending a few media messages to a player. For the fuzzer: it returns how many results
/// the session produced, or the error that would close the connection, and never panics or
/// aborts whatever `data` is. The first byte chooses how the rest is split into reads.
pub fn drive_server_session(data: &[u8]) -> Result<usize, SessionError> {
    let Some((&split, rest)) = data.split_first() else {
        return Ok(0);
    };
    let read = match split {
        0 => rest.len().max(1),
        n => usize::from(n),
    };
    let (mut session, initial) = Session::new(Limits::default())?;
    let mut count = initial.len();
    for piece in rest.chunks(read) {
        let mut pending = session.handle_input(piece)?;
        while let Some(r) = pending.pop() {
            count += 1;
            let ServerSessionResult::RaisedEvent(ev) = r else {
                continue;
            };
            match ev {
                ServerSessionEvent::ConnectionRequested { request_id, .. }
                | ServerSessionEvent::PublishStreamRequested { request_id, .. } => {
                    pending.extend(session.accept_request(request_id)?);
                }
                ServerSessionEvent::PlayStreamRequested {
                    request_id,
                    stream_id,
                    ..
                } => {
                    pending.extend(session.accept_request(request_id)?);
                    let ts = RtmpTimestamp::new(0);
                    session.send_video_data(stream_id, Bytes::from_static(&[0x17, 0]), ts)?;
                    session.send_audio_data(stream_id, Bytes::from_static(&[0xaf, 0]), ts)?;
                    session.send_metadata(stream_id, &StreamMetadata::new())?;
                    session.finish_playing(stream_id)?;
                }
                _ => {}
            }
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(csid: u8, type_id: u8, stream_id: u32, body: &[u8]) -> Vec<u8> {
        let mut v = vec![csid, 0, 0, 0];
        v.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        v.push(type_id);
        v.extend_from_slice(&stream_id.to_le_bytes());
        for (i, part) in body.chunks(128).enumerate() {
            if i > 0 {
                v.push(0xc0 | csid);
            }
            v.extend_from_slice(part);
        }
        v
    }

    fn amf_str(s: &str) -> Vec<u8> {
        let mut v = vec![2];
        v.extend_from_slice(&(s.len() as u16).to_be_bytes());
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn cmd(name: &str, tx: f64, rest: &[u8]) -> Vec<u8> {
        let mut v = amf_str(name);
        v.push(0);
        v.extend_from_slice(&tx.to_be_bytes());
        v.extend_from_slice(rest);
        v
    }

    /// A client's session: connect, createStream, publish with metadata and media, play.
    fn valid_session() -> Vec<u8> {
        let mut connect_obj = vec![3, 0, 3];
        connect_obj.extend_from_slice(b"app");
        connect_obj.extend(amf_str("live"));
        connect_obj.extend_from_slice(&[0, 0, 9]);
        let mut v = chunks(3, 20, 0, &cmd("connect", 1.0, &connect_obj));
        v.extend(chunks(3, 20, 0, &cmd("createStream", 2.0, &[5])));
        let mut publish = vec![5];
        publish.extend(amf_str("key"));
        publish.extend(amf_str("live"));
        v.extend(chunks(8, 20, 1, &cmd("publish", 3.0, &publish)));
        let mut meta = amf_str("@setDataFrame");
        meta.extend(amf_str("onMetaData"));
        meta.extend_from_slice(&[8, 0, 0, 0, 1, 0, 5]);
        meta.extend_from_slice(b"width");
        meta.extend_from_slice(&[0, 0x40, 0x84, 0, 0, 0, 0, 0, 0, 0, 0, 9]);
        v.extend(chunks(4, 18, 1, &meta));
        v.extend(chunks(6, 9, 1, &[0x17, 0, 0, 0, 0, 1, 66, 0, 30]));
        v.extend(chunks(4, 8, 1, &[0xaf, 0, 0x12, 0x10]));
        v.extend(chunks(3, 20, 0, &cmd("createStream", 4.0, &[5])));
        let mut play = vec![5];
        play.extend(amf_str("room"));
        v.extend(chunks(8, 20, 2, &cmd("play", 5.0, &play)));
        v
    }

    #[test]
    fn a_valid_session_goes_through_and_raises_its_events() {
        // In one read rml_rtmp sees publish and play before the connect is accepted and
        // answers them with errors; in small reads each request is answered in turn.
        let mut data = vec![0];
        data.extend(valid_session());
        assert!(drive_server_session(&data).unwrap() > 5);
        data[0] = 1;
        let one_by_one = drive_server_session(&data).unwrap();
        assert!(one_by_one > 15, "{one_by_one}");
        for split in 2..=7u8 {
            data[0] = split;
            let n = drive_server_session(&data).unwrap();
            assert_eq!(n, one_by_one, "split {split}");
        }
    }

    #[test]
    fn the_nesting_attack_is_refused_not_a_crash() {
        let mut body = cmd("connect", 1.0, &[]);
        for _ in 0..10_000 {
            body.extend_from_slice(&[0x0a, 0, 0, 0, 1]);
        }
        let mut data = vec![0];
        data.extend(chunks(3, 20, 0, &body));
        let e = drive_server_session(&data).unwrap_err();
        assert!(
            matches!(e, SessionError::Refused(GuardError::TooDeep(32))),
            "{e}"
        );
    }

    /// Random bytes and random mutations of a valid session: errors are fine, a panic inside
    /// rml_rtmp (caught by the second line) means the guard missed an input.
    #[test]
    fn random_and_mutated_input_never_reaches_a_panic_in_rml_rtmp() {
        let valid = valid_session();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..3000 {
            let mut data = vec![(rnd() % 16) as u8];
            if i % 3 == 0 {
                data.extend((0..rnd() % 600).map(|_| rnd() as u8));
            } else {
                data.extend_from_slice(&valid);
                for _ in 0..1 + rnd() % 6 {
                    let at = (rnd() as usize) % data.len();
                    match rnd() % 3 {
                        0 => data[at] = rnd() as u8,
                        1 => data.insert(at, rnd() as u8),
                        _ => {
                            data.remove(at);
                        }
                    }
                }
            }
            if let Err(SessionError::Panicked(m)) = drive_server_session(&data) {
                panic!("input {i}: rml_rtmp panicked: {m}; input {data:?}");
            }
        }
    }

    #[test]
    fn quiet_catch_turns_a_panic_into_an_error() {
        let r: Result<(), String> = quiet_catch(|| panic!("boom {}", 7));
        let msg = r.unwrap_err();
        assert!(msg.contains("boom 7"), "{msg}");
        assert_eq!(quiet_catch(|| 5).unwrap(), 5);
    }
}
