//! A sans-IO guard in front of `rml_rtmp`'s server session: it follows the client's chunk
//! stream itself, checks every complete message, and hands `rml_rtmp` only messages it cannot
//! be crashed by, re-encoded in the one simple form `rml_rtmp` parses safely.
//!
//! Why it exists: `rml_rtmp` 0.8 (the project's RTMP crate) can take the whole process down on
//! input any client may send before it authenticates:
//! - its AMF0 decoder (`rml_amf0` 0.3) parses objects, ECMA arrays and strict arrays by
//!   recursion without a depth limit, so a ~50 KB command nesting 10,000 arrays overflows the
//!   thread's stack and the process aborts (a stack overflow cannot be caught);
//! - its AMF0 command parsing does `drain(..3)` on the decoded values and panics on a command
//!   with fewer than three; its `@setDataFrame` handling indexes `data[0]` / `data.remove(1)`
//!   and panics on a data message with fewer than three values;
//! - its chunk deserializer keeps one partial message for all chunk streams, so interleaved
//!   chunks (legal RTMP) make `length - current_payload_length` underflow (a panic, or in
//!   release a "capacity overflow" panic on the wrapped length), and an extended timestamp
//!   below 0xFFFFFF on a type 1-3 header underflows too;
//! - a peer window acknowledgement size near `u32::MAX` overflows its byte counter after 4 GB.
//!
//! So this guard reassembles messages per chunk stream (basic header, message header types
//! 0-3, extended timestamps, the client's Set Chunk Size and Abort), with bounded message
//! sizes and a bounded number of chunk streams; scans every AMF0 payload `rml_rtmp` would decode
//! (types 20 and 17 commands, 18 and 15 data: `rml_amf0` has no AMF3 decoder, it reads those
//! as AMF0 too) iteratively with a depth and value-count limit; refuses commands and
//! `@setDataFrame` messages with too few values; and then re-encodes each message as a single
//! type-0 chunk on one chunk stream, after telling `rml_rtmp` once (a synthetic Set Chunk Size)
//! that chunks may be as large as any message. `rml_rtmp` thus never sees interleaving,
//! continuation chunks, relative timestamps or the client's own chunk size, and never decodes
//! AMF0 this guard has not walked. Any refusal is an error: the caller closes the connection.
//! The server also wraps every call into `rml_rtmp` in `catch_unwind` as a second line (see
//! [`super::session`]); this guard is the first, because stack overflow is not a panic.

use std::collections::HashMap;

/// AMF0 markers `rml_amf0` 0.3 knows (it refuses every other marker with an error).
mod marker {
    pub const NUMBER: u8 = 0x00;
    pub const BOOLEAN: u8 = 0x01;
    pub const STRING: u8 = 0x02;
    pub const OBJECT: u8 = 0x03;
    pub const NULL: u8 = 0x05;
    pub const UNDEFINED: u8 = 0x06;
    pub const ECMA_ARRAY: u8 = 0x08;
    pub const OBJECT_END: u8 = 0x09;
    pub const STRICT_ARRAY: u8 = 0x0a;
}

/// RTMP message types the guard treats specially.
mod msg {
    pub const SET_CHUNK_SIZE: u8 = 1;
    pub const ABORT: u8 = 2;
    pub const USER_CONTROL: u8 = 4;
    pub const WINDOW_ACK_SIZE: u8 = 5;
    pub const AUDIO: u8 = 8;
    pub const VIDEO: u8 = 9;
    pub const AMF3_DATA: u8 = 15;
    pub const AMF3_SHARED_OBJECT: u8 = 16;
    pub const AMF3_COMMAND: u8 = 17;
    pub const AMF0_DATA: u8 = 18;
    pub const AMF0_SHARED_OBJECT: u8 = 19;
    pub const AMF0_COMMAND: u8 = 20;
}

/// The chunk size announced to `rml_rtmp`: larger than any RTMP message (24-bit length), so
/// each re-encoded message is one chunk.
const RML_CHUNK_SIZE: u32 = 1 << 24;
/// The chunk stream re-encoded messages go on.
const RML_CSID: u8 = 3;
/// Largest protocol control / user control message (they carry at most 10 bytes).
const MAX_CONTROL_BYTES: u32 = 64;
/// Largest window acknowledgement size passed on: keeps `rml_rtmp`'s u32 byte counter from
/// overflowing (it adds at most one message, < 16 MiB, past this before it resets).
const MAX_WINDOW_ACK: u32 = 1 << 31;
/// The largest chunk header: 3-byte basic header, 11-byte type 0 header, extended timestamp.
const MAX_HEADER: usize = 3 + 11 + 4;
const TS_EXTENDED: u32 = 0x00ff_ffff;

/// The guard's bounds.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest audio/video (or other) message, in bytes.
    pub max_message_bytes: usize,
    /// Largest message carrying AMF (commands, data, shared objects).
    pub max_amf_message_bytes: usize,
    /// Deepest nesting of AMF0 objects and arrays.
    pub max_amf_depth: usize,
    /// Most AMF0 values (at any depth) in one message.
    pub max_amf_values: usize,
    /// Most chunk streams a client may use.
    pub max_chunk_streams: usize,
    /// Most `createStream` commands per connection (each one is a map entry in `rml_rtmp`).
    pub max_create_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 8 << 20,
            max_amf_message_bytes: 64 << 10,
            max_amf_depth: 32,
            max_amf_values: 4096,
            max_chunk_streams: 32,
            max_create_streams: 16,
        }
    }
}

/// Why a client's bytes were refused (the connection is closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error("AMF0 values nested deeper than {0} levels")]
    TooDeep(usize),
    #[error("more than {0} AMF0 values in one message")]
    TooManyValues(usize),
    #[error("malformed AMF0: {0}")]
    Amf(&'static str),
    #[error("message type {type_id} of {len} bytes is over the limit of {max}")]
    MessageTooLarge { type_id: u8, len: u32, max: usize },
    #[error("more than {0} chunk streams")]
    TooManyChunkStreams(usize),
    #[error("chunk on stream {0} continues no message")]
    NoPreviousHeader(u32),
    #[error("new message header on chunk stream {0} before its previous message ended")]
    Interleaved(u32),
    #[error("invalid chunk size {0}")]
    ChunkSize(u32),
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("command message with {0} AMF0 values (rml_rtmp needs at least 3)")]
    ShortCommand(usize),
    #[error("@setDataFrame with {0} AMF0 values (rml_rtmp needs 3)")]
    ShortDataFrame(usize),
    #[error("more than {0} createStream commands")]
    TooManyStreams(u32),
}

/// What the guard knows of one chunk stream.
#[derive(Debug, Default)]
struct ChunkStream {
    /// Absolute timestamp of the current (or last) message.
    timestamp: u32,
    /// The last timestamp field (absolute for type 0, delta otherwise): a type 3 header that
    /// starts a new message adds it again, and 0xFFFFFF means an extended timestamp follows.
    ts_field: u32,
    length: u32,
    type_id: u8,
    stream_id: u32,
    /// Bytes of the current message received so far.
    partial: Vec<u8>,
    /// A message is in progress (`partial.len() < length`).
    in_progress: bool,
}

#[derive(Debug)]
enum Stage {
    /// Reading a chunk header (bytes so far in `ChunkGuard::header`).
    Header,
    /// Reading `left` payload bytes of a chunk on `csid`.
    Payload { csid: u32, left: usize },
}

/// The chunk-stream guard of one connection (after the handshake).
#[derive(Debug)]
pub struct ChunkGuard {
    limits: Limits,
    /// The client's chunk size (128 until it sends Set Chunk Size).
    chunk_size: u32,
    streams: HashMap<u32, ChunkStream>,
    stage: Stage,
    header: Vec<u8>,
    /// Bytes buffered in partial messages over all chunk streams.
    buffered: usize,
    create_streams: u32,
    preamble_sent: bool,
    failed: Option<GuardError>,
}

impl ChunkGuard {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            chunk_size: 128,
            streams: HashMap::new(),
            stage: Stage::Header,
            header: Vec::with_capacity(MAX_HEADER),
            buffered: 0,
            create_streams: 0,
            preamble_sent: false,
            failed: None,
        }
    }

    /// Takes bytes from the client; returns the bytes to hand `rml_rtmp` (whole, checked
    /// messages), or why the connection must be closed. After an error every call fails.
    pub fn push(&mut self, mut input: &[u8]) -> Result<Vec<u8>, GuardError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let mut out = Vec::new();
        if !self.preamble_sent {
            self.preamble_sent = true;
            write_message(
                &mut out,
                msg::SET_CHUNK_SIZE,
                0,
                0,
                &RML_CHUNK_SIZE.to_be_bytes(),
            );
        }
        // A zero-length message is whole as soon as its header is.
        while !input.is_empty() || matches!(self.stage, Stage::Payload { left: 0, .. }) {
            let step = match self.stage {
                Stage::Header => self.read_header(input),
                Stage::Payload { csid, left } => self.read_payload(csid, left, input, &mut out),
            };
            match step {
                Ok(n) => input = &input[n..],
                Err(e) => {
                    self.failed = Some(e.clone());
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// Consumes header bytes from `input`; returns how many.
    fn read_header(&mut self, input: &[u8]) -> Result<usize, GuardError> {
        let old = self.header.len();
        let take = (MAX_HEADER - old).min(input.len());
        self.header.extend_from_slice(&input[..take]);
        match self.parse_header()? {
            None => Ok(take),
            Some(used) => {
                self.header.clear();
                Ok(used - old)
            }
        }
    }

    /// Parses the chunk header at the start of `self.header`: `None` when more bytes are
    /// needed, else the header's length (and the stage moves to its payload).
    fn parse_header(&mut self) -> Result<Option<usize>, GuardError> {
        let h = &self.header;
        let Some(&b0) = h.first() else {
            return Ok(None);
        };
        let fmt = b0 >> 6;
        let (csid, mut i) = match b0 & 0x3f {
            0 => match h.get(1) {
                Some(&b) => (u32::from(b) + 64, 2),
                None => return Ok(None),
            },
            1 => match (h.get(1), h.get(2)) {
                (Some(&b1), Some(&b2)) => (u32::from(b1) + u32::from(b2) * 256 + 64, 3),
                _ => return Ok(None),
            },
            c => (u32::from(c), 1),
        };
        let msg_header = [11, 7, 3, 0][usize::from(fmt)];
        if h.len() < i + msg_header {
            return Ok(None);
        }
        let u24 = |j: usize| u32::from_be_bytes([0, h[j], h[j + 1], h[j + 2]]);
        let known = self.streams.get(&csid);
        if fmt != 0 && known.is_none() {
            return Err(GuardError::NoPreviousHeader(csid));
        }
        if fmt != 3 && known.is_some_and(|s| s.in_progress) {
            return Err(GuardError::Interleaved(csid));
        }
        // The timestamp field of this header (for type 3, the stream's last one).
        let field = if fmt == 3 {
            known.map_or(0, |s| s.ts_field)
        } else {
            u24(i)
        };
        let (length, type_id) = match fmt {
            0 | 1 => (u24(i + 3), h[i + 6]),
            _ => known.map_or((0, 0), |s| (s.length, s.type_id)),
        };
        let stream_id = if fmt == 0 {
            u32::from_le_bytes([h[i + 7], h[i + 8], h[i + 9], h[i + 10]])
        } else {
            known.map_or(0, |s| s.stream_id)
        };
        i += msg_header;
        let extended = if field == TS_EXTENDED {
            if h.len() < i + 4 {
                return Ok(None);
            }
            let v = u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
            i += 4;
            Some(v)
        } else {
            None
        };
        let max = if is_amf(type_id) {
            self.limits.max_amf_message_bytes
        } else if type_id <= 6 {
            MAX_CONTROL_BYTES as usize
        } else {
            self.limits.max_message_bytes
        };
        if length as usize > max {
            return Err(GuardError::MessageTooLarge {
                type_id,
                len: length,
                max,
            });
        }
        if known.is_none() && self.streams.len() >= self.limits.max_chunk_streams {
            return Err(GuardError::TooManyChunkStreams(
                self.limits.max_chunk_streams,
            ));
        }
        let s = self.streams.entry(csid).or_default();
        let delta = extended.unwrap_or(field);
        if fmt == 0 {
            s.timestamp = delta;
        } else if !s.in_progress {
            // Types 1 and 2, and type 3 starting a new message: the delta adds to the last
            // message's timestamp (a type 3 continuation chunk keeps it).
            s.timestamp = s.timestamp.wrapping_add(delta);
        }
        if fmt != 3 {
            s.ts_field = field;
        }
        s.length = length;
        s.type_id = type_id;
        s.stream_id = stream_id;
        s.in_progress = true;
        // Never negative: a message in progress takes only type 3 headers, which keep its length.
        let left = (length as usize)
            .saturating_sub(s.partial.len())
            .min(self.chunk_size as usize);
        self.stage = Stage::Payload { csid, left };
        Ok(Some(i))
    }

    /// Consumes payload bytes from `input` into the chunk stream's message; returns how many.
    fn read_payload(
        &mut self,
        csid: u32,
        left: usize,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<usize, GuardError> {
        let n = left.min(input.len());
        let cap = self.limits.max_message_bytes * 2;
        let s = self
            .streams
            .get_mut(&csid)
            .ok_or(GuardError::NoPreviousHeader(csid))?;
        if self.buffered + n > cap {
            return Err(GuardError::MessageTooLarge {
                type_id: s.type_id,
                len: s.length,
                max: cap,
            });
        }
        s.partial.extend_from_slice(&input[..n]);
        self.buffered += n;
        let left = left - n;
        if left > 0 {
            self.stage = Stage::Payload { csid, left };
            return Ok(n);
        }
        self.stage = Stage::Header;
        if s.partial.len() < s.length as usize {
            return Ok(n);
        }
        // A whole message.
        s.in_progress = false;
        let body = std::mem::take(&mut s.partial);
        self.buffered -= body.len();
        let (type_id, stream_id, timestamp) = (s.type_id, s.stream_id, s.timestamp);
        self.on_message(type_id, stream_id, timestamp, body, out)?;
        Ok(n)
    }

    /// Checks one whole message and re-encodes it for `rml_rtmp` (or applies it here).
    fn on_message(
        &mut self,
        type_id: u8,
        stream_id: u32,
        timestamp: u32,
        mut body: Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<(), GuardError> {
        match type_id {
            msg::SET_CHUNK_SIZE => {
                let size = be_u32(&body).ok_or(GuardError::Malformed("set chunk size"))?;
                if size == 0 || size > 0x7fff_ffff {
                    return Err(GuardError::ChunkSize(size));
                }
                // Applied here only: rml_rtmp keeps the size the preamble gave it.
                self.chunk_size = size;
                return Ok(());
            }
            msg::ABORT => {
                let csid = be_u32(&body).ok_or(GuardError::Malformed("abort"))?;
                if let Some(s) = self.streams.get_mut(&csid) {
                    self.buffered -= s.partial.len();
                    s.partial = Vec::new();
                    s.in_progress = false;
                    // A chunk of the aborted message in flight (this one cannot be on the same
                    // stream: it would have been a continuation) needs no other care.
                }
                return Ok(());
            }
            msg::WINDOW_ACK_SIZE => {
                let size = be_u32(&body).ok_or(GuardError::Malformed("window ack size"))?;
                if size > MAX_WINDOW_ACK {
                    body[..4].copy_from_slice(&MAX_WINDOW_ACK.to_be_bytes());
                }
            }
            msg::AMF0_COMMAND | msg::AMF3_COMMAND => {
                // rml_rtmp skips one leading 0 byte of an AMF3 command and reads AMF0.
                let amf = if type_id == msg::AMF3_COMMAND && body.first() == Some(&0) {
                    &body[1..]
                } else {
                    &body[..]
                };
                let scan = scan_amf0(amf, &self.limits)?;
                if scan.values < 3 {
                    return Err(GuardError::ShortCommand(scan.values));
                }
                if scan.first_string == Some(b"createStream".as_slice()) {
                    self.create_streams += 1;
                    if self.create_streams > self.limits.max_create_streams {
                        return Err(GuardError::TooManyStreams(self.limits.max_create_streams));
                    }
                }
            }
            msg::AMF0_DATA | msg::AMF3_DATA => {
                // rml_rtmp reads both as AMF0 from the first byte.
                let scan = scan_amf0(&body, &self.limits)?;
                if scan.first_string == Some(b"@setDataFrame".as_slice()) && scan.values < 3 {
                    return Err(GuardError::ShortDataFrame(scan.values));
                }
            }
            // rml_rtmp does not decode shared objects (they reach it as unknown messages); the
            // size cap above is all they need. User control, audio, video and the rest are
            // fixed-layout or opaque to it.
            msg::AMF0_SHARED_OBJECT
            | msg::AMF3_SHARED_OBJECT
            | msg::USER_CONTROL
            | msg::AUDIO
            | msg::VIDEO => {}
            _ => {}
        }
        write_message(out, type_id, stream_id, timestamp, &body);
        Ok(())
    }
}

fn is_amf(type_id: u8) -> bool {
    matches!(
        type_id,
        msg::AMF3_DATA
            | msg::AMF3_SHARED_OBJECT
            | msg::AMF3_COMMAND
            | msg::AMF0_DATA
            | msg::AMF0_SHARED_OBJECT
            | msg::AMF0_COMMAND
    )
}

fn be_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

/// One whole message as a single type 0 chunk (the preamble made the chunk size larger than
/// any message), with an extended timestamp when it does not fit 24 bits.
fn write_message(out: &mut Vec<u8>, type_id: u8, stream_id: u32, timestamp: u32, body: &[u8]) {
    out.push(RML_CSID);
    let field = timestamp.min(TS_EXTENDED);
    out.extend_from_slice(&field.to_be_bytes()[1..]);
    // Callers cap bodies far below 2^24 bytes.
    out.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    out.push(type_id);
    out.extend_from_slice(&stream_id.to_le_bytes());
    if field == TS_EXTENDED {
        out.extend_from_slice(&timestamp.to_be_bytes());
    }
    out.extend_from_slice(body);
}

/// What a scan of AMF0 values found.
#[derive(Debug, PartialEq, Eq)]
pub struct AmfScan<'a> {
    /// Top-level values, counted as `rml_amf0::deserialize` returns them.
    pub values: usize,
    /// The first top-level value when it is a string (a command or data handler name).
    pub first_string: Option<&'a [u8]>,
}

enum Frame {
    /// Object or ECMA array: name/value pairs up to an empty name and the end marker.
    Object,
    /// Strict array: `left` more values (fewer if the data ends or an end marker comes).
    Array { left: u32 },
}

/// Walks AMF0 values exactly as `rml_amf0` 0.3 would decode them, without recursion, and
/// refuses nesting deeper than `max_amf_depth` and more than `max_amf_values` values. Where
/// `rml_amf0` is lenient (a string shorter than its length, invalid UTF-8) this is stricter or
/// leaves the error to it; what matters is that nothing it would decode deeper passes.
pub fn scan_amf0<'a>(data: &'a [u8], limits: &Limits) -> Result<AmfScan<'a>, GuardError> {
    let mut r = Reader { data, pos: 0 };
    let mut stack: Vec<Frame> = Vec::new();
    let mut scan = AmfScan {
        values: 0,
        first_string: None,
    };
    let mut total = 0usize;
    loop {
        let m = match stack.last_mut() {
            None => {
                // Top level: values until the data ends or an object end marker.
                match r.byte() {
                    None | Some(marker::OBJECT_END) => return Ok(scan),
                    Some(m) => {
                        scan.values += 1;
                        m
                    }
                }
            }
            Some(Frame::Array { left }) => {
                if *left == 0 {
                    stack.pop();
                    continue;
                }
                *left -= 1;
                match r.byte() {
                    None | Some(marker::OBJECT_END) => {
                        stack.pop();
                        continue;
                    }
                    Some(m) => m,
                }
            }
            Some(Frame::Object) => {
                let label = r.u16().ok_or(GuardError::Amf("truncated property name"))?;
                if label == 0 {
                    if r.byte() != Some(marker::OBJECT_END) {
                        return Err(GuardError::Amf("empty property name"));
                    }
                    stack.pop();
                    continue;
                }
                r.skip(usize::from(label))
                    .ok_or(GuardError::Amf("truncated property name"))?;
                match r.byte() {
                    None | Some(marker::OBJECT_END) => {
                        return Err(GuardError::Amf("property without a value"));
                    }
                    Some(m) => m,
                }
            }
        };
        total += 1;
        if total > limits.max_amf_values {
            return Err(GuardError::TooManyValues(limits.max_amf_values));
        }
        let string_start = r.pos;
        let nested = match m {
            marker::NUMBER => r.skip(8).map(|_| None),
            marker::BOOLEAN => r.skip(1).map(|_| None),
            marker::STRING => r.u16().and_then(|n| r.skip(usize::from(n))).map(|_| None),
            marker::NULL | marker::UNDEFINED => Some(None),
            marker::OBJECT => Some(Some(Frame::Object)),
            marker::ECMA_ARRAY => r.skip(4).map(|_| Some(Frame::Object)),
            marker::STRICT_ARRAY => r.u32().map(|left| Some(Frame::Array { left })),
            _ => return Err(GuardError::Amf("unknown marker")),
        }
        .ok_or(GuardError::Amf("truncated value"))?;
        if m == marker::STRING && stack.is_empty() && scan.values == 1 {
            scan.first_string = data.get(string_start + 2..r.pos);
        }
        if let Some(frame) = nested {
            if stack.len() >= limits.max_amf_depth {
                return Err(GuardError::TooDeep(limits.max_amf_depth));
            }
            stack.push(frame);
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.data.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        let end = self.pos.checked_add(n)?;
        if end > self.data.len() {
            return None;
        }
        self.pos = end;
        Some(())
    }
    fn u16(&mut self) -> Option<u16> {
        let b = self.data.get(self.pos..self.pos + 2)?;
        self.pos += 2;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.data.get(self.pos..self.pos + 4)?;
        self.pos += 4;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One message as chunks of `size` bytes: a type 0 header on `csid`, type 3 after.
    fn chunks(csid: u8, type_id: u8, ts: u32, body: &[u8], size: usize) -> Vec<u8> {
        let mut v = vec![csid];
        v.extend_from_slice(&ts.min(TS_EXTENDED).to_be_bytes()[1..]);
        v.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        v.push(type_id);
        v.extend_from_slice(&1u32.to_le_bytes());
        if ts >= TS_EXTENDED {
            v.extend_from_slice(&ts.to_be_bytes());
        }
        for (i, part) in body.chunks(size).enumerate() {
            if i > 0 {
                v.push(0xc0 | csid);
                if ts >= TS_EXTENDED {
                    v.extend_from_slice(&ts.to_be_bytes());
                }
            }
            v.extend_from_slice(part);
        }
        v
    }

    /// (type, timestamp, body) of each message the guard passes on, preamble first.
    fn decode(mut out: &[u8]) -> Vec<(u8, u32, Vec<u8>)> {
        let mut v = vec![];
        while !out.is_empty() {
            assert_eq!(out[0], RML_CSID);
            let ts = u32::from_be_bytes([0, out[1], out[2], out[3]]);
            let len = u32::from_be_bytes([0, out[4], out[5], out[6]]) as usize;
            let type_id = out[7];
            let mut i = 12;
            let ts = if ts == TS_EXTENDED {
                i += 4;
                u32::from_be_bytes([out[12], out[13], out[14], out[15]])
            } else {
                ts
            };
            v.push((type_id, ts, out[i..i + len].to_vec()));
            out = &out[i + len..];
        }
        v
    }

    fn amf_str(s: &str) -> Vec<u8> {
        let mut v = vec![marker::STRING];
        v.extend_from_slice(&(s.len() as u16).to_be_bytes());
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn command(name: &str, extra: &[u8]) -> Vec<u8> {
        let mut v = amf_str(name);
        v.push(marker::NUMBER);
        v.extend_from_slice(&1f64.to_be_bytes());
        v.extend_from_slice(extra);
        v
    }

    fn nested(open: &[u8], close: &[u8], levels: usize) -> Vec<u8> {
        let mut v = command("connect", &[]);
        for _ in 0..levels {
            v.extend_from_slice(open);
        }
        v.push(marker::NULL);
        for _ in 0..levels {
            v.extend_from_slice(close);
        }
        v
    }

    #[test]
    fn nesting_is_refused_past_the_depth_limit_for_every_container() {
        let l = Limits::default();
        // Strict array of one element; object and ECMA array with one property "a".
        let end: &[u8] = &[0, 0, marker::OBJECT_END];
        let containers: [(&[u8], &[u8]); 3] = [
            (&[marker::STRICT_ARRAY, 0, 0, 0, 1], &[]),
            (&[marker::OBJECT, 0, 1, b'a'], end),
            (&[marker::ECMA_ARRAY, 0, 0, 0, 1, 0, 1, b'a'], end),
        ];
        for (open, close) in containers {
            assert_eq!(scan_amf0(&nested(open, close, 32), &l).unwrap().values, 3);
            assert_eq!(
                scan_amf0(&nested(open, close, 33), &l),
                Err(GuardError::TooDeep(32))
            );
            // The attack from issue 11: ~10,000 levels, refused without recursion.
            assert_eq!(
                scan_amf0(&nested(open, close, 10_000), &l),
                Err(GuardError::TooDeep(32))
            );
        }
    }

    #[test]
    fn scan_counts_values_like_rml_amf0() {
        let l = Limits::default();
        let play = command("play", &[marker::NULL]);
        let s = scan_amf0(&play, &l).unwrap();
        assert_eq!(s.values, 3);
        assert_eq!(s.first_string, Some(b"play".as_slice()));
        // A top-level end marker ends the values; what follows is never decoded.
        let mut v = amf_str("x");
        v.push(marker::OBJECT_END);
        v.extend_from_slice(&[0xff; 10]);
        assert_eq!(scan_amf0(&v, &l).unwrap().values, 1);
        // An array shorter than its count ends at the data's end; an end marker ends it too.
        let v = [marker::STRICT_ARRAY, 0xff, 0xff, 0xff, 0xff, marker::NULL];
        assert_eq!(scan_amf0(&v, &l).unwrap().values, 1);
        let v = [
            marker::STRICT_ARRAY,
            0,
            0,
            0,
            5,
            marker::OBJECT_END,
            marker::NULL,
        ];
        assert_eq!(scan_amf0(&v, &l).unwrap().values, 2);
        assert_eq!(
            scan_amf0(&[0x11], &l),
            Err(GuardError::Amf("unknown marker"))
        );
        assert_eq!(
            scan_amf0(&[marker::NUMBER, 1, 2], &l),
            Err(GuardError::Amf("truncated value"))
        );
        let many = vec![marker::NULL; 5000];
        assert_eq!(scan_amf0(&many, &l), Err(GuardError::TooManyValues(4096)));
    }

    #[test]
    fn short_commands_and_data_frames_are_refused() {
        let mut g = ChunkGuard::new(Limits::default());
        let e = g.push(&chunks(3, msg::AMF0_COMMAND, 0, &amf_str("connect"), 128));
        assert_eq!(e, Err(GuardError::ShortCommand(1)));
        // After an error the guard stays failed.
        assert!(g.push(&[0]).is_err());
        let mut g = ChunkGuard::new(Limits::default());
        let mut body = vec![0];
        body.extend(command("connect", &[]));
        let e = g.push(&chunks(3, msg::AMF3_COMMAND, 0, &body, 128));
        assert_eq!(e, Err(GuardError::ShortCommand(2)));
        let mut g = ChunkGuard::new(Limits::default());
        let mut body = amf_str("@setDataFrame");
        body.extend(amf_str("onMetaData"));
        let e = g.push(&chunks(3, msg::AMF0_DATA, 0, &body, 128));
        assert_eq!(e, Err(GuardError::ShortDataFrame(2)));
        let mut g = ChunkGuard::new(Limits::default());
        body.push(marker::NULL);
        assert!(g.push(&chunks(3, msg::AMF0_DATA, 0, &body, 128)).is_ok());
    }

    #[test]
    fn interleaved_messages_are_reassembled_per_chunk_stream() {
        let a: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let b = vec![0xaf; 200];
        let ca = chunks(4, msg::VIDEO, 40, &a, 128);
        let cb = chunks(5, msg::AUDIO, 20, &b, 128);
        // a's first chunk, b's first chunk, a's second, b's second, a's last.
        let (a1, rest_a) = ca.split_at(12 + 128);
        let (a2, a3) = rest_a.split_at(1 + 128);
        let (b1, b2) = cb.split_at(12 + 128);
        let input = [a1, b1, a2, b2, a3].concat();
        let mut g = ChunkGuard::new(Limits::default());
        let out = decode(&g.push(&input).unwrap());
        assert_eq!(
            out[0],
            (
                msg::SET_CHUNK_SIZE,
                0,
                RML_CHUNK_SIZE.to_be_bytes().to_vec()
            )
        );
        assert_eq!(out[1], (msg::AUDIO, 20, b));
        assert_eq!(out[2], (msg::VIDEO, 40, a));
        // Fed one byte at a time, the same messages come out.
        let mut g = ChunkGuard::new(Limits::default());
        let mut bytes = vec![];
        for byte in &input {
            bytes.extend(g.push(std::slice::from_ref(byte)).unwrap());
        }
        assert_eq!(decode(&bytes), out);
    }

    #[test]
    fn timestamps_follow_header_types_and_extended_timestamps() {
        let mut g = ChunkGuard::new(Limits::default());
        let mut input = chunks(4, msg::AUDIO, 1000, &[1], 128);
        // Type 1: delta 33, length 1, audio. Type 2: delta 33. Type 3: a new message, delta
        // again 33 (the last delta).
        input.extend_from_slice(&[0x44, 0, 0, 33, 0, 0, 1, msg::AUDIO, 2]);
        input.extend_from_slice(&[0x84, 0, 0, 33, 3]);
        input.extend_from_slice(&[0xc4, 4]);
        // Extended: type 0 at 0x01000000, continued by type 3 chunks repeating it.
        input.extend(chunks(5, msg::VIDEO, 0x0100_0000, &[9; 200], 128));
        let out = decode(&g.push(&input).unwrap());
        let ts: Vec<(u32, Vec<u8>)> = out[1..].iter().map(|(_, t, b)| (*t, b.clone())).collect();
        assert_eq!(
            ts,
            vec![
                (1000, vec![1]),
                (1033, vec![2]),
                (1066, vec![3]),
                (1099, vec![4]),
                (0x0100_0000, vec![9; 200])
            ]
        );
    }

    #[test]
    fn set_chunk_size_and_abort_are_applied_here_and_not_passed_on() {
        let mut g = ChunkGuard::new(Limits::default());
        let mut input = chunks(2, msg::SET_CHUNK_SIZE, 0, &4096u32.to_be_bytes(), 128);
        input.extend(chunks(4, msg::VIDEO, 0, &[7; 3000], 4096));
        // Half a message on stream 6, aborted, then a new one there.
        input.extend_from_slice(&chunks(6, msg::VIDEO, 0, &[1; 5000], 4096)[..12 + 4096]);
        input.extend(chunks(2, msg::ABORT, 0, &6u32.to_be_bytes(), 128));
        input.extend(chunks(6, msg::VIDEO, 0, &[2; 10], 4096));
        let out = decode(&g.push(&input).unwrap());
        let kinds: Vec<(u8, usize)> = out.iter().map(|(t, _, b)| (*t, b.len())).collect();
        assert_eq!(
            kinds,
            vec![
                (msg::SET_CHUNK_SIZE, 4),
                (msg::VIDEO, 3000),
                (msg::VIDEO, 10)
            ]
        );
        assert_eq!(g.buffered, 0);
        let mut g = ChunkGuard::new(Limits::default());
        let zero = chunks(2, msg::SET_CHUNK_SIZE, 0, &0u32.to_be_bytes(), 128);
        assert_eq!(g.push(&zero), Err(GuardError::ChunkSize(0)));
    }

    #[test]
    fn sizes_chunk_streams_and_headers_are_checked() {
        let l = Limits::default();
        let mut g = ChunkGuard::new(l.clone());
        // A 16 MB video message header is refused before any of its bytes is buffered.
        let big = [4, 0, 0, 0, 0xff, 0xff, 0xff, msg::VIDEO, 0, 0, 0, 0];
        assert!(matches!(
            g.push(&big),
            Err(GuardError::MessageTooLarge { .. })
        ));
        let mut g = ChunkGuard::new(l.clone());
        let amf = [4, 0, 0, 0, 0x01, 0, 1, msg::AMF0_COMMAND, 0, 0, 0, 0];
        assert!(matches!(
            g.push(&amf),
            Err(GuardError::MessageTooLarge { .. })
        ));
        let mut g = ChunkGuard::new(l.clone());
        assert_eq!(g.push(&[0xc7]), Err(GuardError::NoPreviousHeader(7)));
        let mut g = ChunkGuard::new(l.clone());
        let mut input = vec![];
        for csid in 3..(3 + l.max_chunk_streams as u8 + 1) {
            input.extend(chunks(csid, msg::AUDIO, 0, &[1], 128));
        }
        assert_eq!(
            g.push(&input),
            Err(GuardError::TooManyChunkStreams(l.max_chunk_streams))
        );
        // A window acknowledgement size near u32::MAX is clamped.
        let mut g = ChunkGuard::new(l.clone());
        let w = chunks(2, msg::WINDOW_ACK_SIZE, 0, &u32::MAX.to_be_bytes(), 128);
        let out = decode(&g.push(&w).unwrap());
        assert_eq!(out[1].2, MAX_WINDOW_ACK.to_be_bytes());
        // createStream is counted.
        let mut g = ChunkGuard::new(l.clone());
        let create = chunks(3, msg::AMF0_COMMAND, 0, &command("createStream", &[5]), 128);
        for _ in 0..l.max_create_streams {
            g.push(&create).unwrap();
        }
        assert_eq!(
            g.push(&create),
            Err(GuardError::TooManyStreams(l.max_create_streams))
        );
    }
}
