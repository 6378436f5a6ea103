//! FLV: the container of RTMP and HTTP-FLV. The writer produces the tags a live stream needs
//! (script data, AVC/AAC sequence headers, coded frames); the reader parses a byte stream
//! back into tags, incrementally and with a size limit, for the origin's ingest and for tests.

use super::amf0::{self, Value};

pub const TAG_AUDIO: u8 = 8;
pub const TAG_VIDEO: u8 = 9;
pub const TAG_SCRIPT: u8 = 18;

/// Largest tag body the reader accepts (the field allows 16 MiB). Real tags are far smaller (a
/// 4K keyframe is a few hundred KiB); the limit bounds what a hostile length field can make the
/// reader buffer.
pub const MAX_TAG_SIZE: usize = 8 * 1024 * 1024;

/// The 9-byte FLV file header followed by PreviousTagSize0.
pub fn header(audio: bool, video: bool) -> [u8; 13] {
    let flags = (u8::from(audio) << 2) | u8::from(video);
    [b'F', b'L', b'V', 1, flags, 0, 0, 0, 9, 0, 0, 0, 0]
}

/// Append one tag (11-byte tag header, body, PreviousTagSize).
pub fn write_tag(out: &mut Vec<u8>, kind: u8, timestamp_ms: u32, body: &[u8]) {
    let size = body.len() as u32;
    out.push(kind);
    out.extend_from_slice(&size.to_be_bytes()[1..]);
    out.extend_from_slice(&timestamp_ms.to_be_bytes()[1..]);
    out.push((timestamp_ms >> 24) as u8); // TimestampExtended
    out.extend_from_slice(&[0, 0, 0]); // StreamID
    out.extend_from_slice(body);
    out.extend_from_slice(&(size + 11).to_be_bytes());
}

/// Video tag body carrying an AVCDecoderConfigurationRecord.
pub fn avc_sequence_header(config: &[u8]) -> Vec<u8> {
    let mut b = vec![0x17, 0x00, 0, 0, 0];
    b.extend_from_slice(config);
    b
}

/// Video tag body of one AVC access unit in AVCC form. `cts_ms` is the composition offset
/// (0 without B-frames).
pub fn avc_frame(keyframe: bool, cts_ms: i32, avcc: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(avcc.len() + 5);
    b.push(if keyframe { 0x17 } else { 0x27 });
    b.push(0x01);
    b.extend_from_slice(&cts_ms.to_be_bytes()[1..]);
    b.extend_from_slice(avcc);
    b
}

/// AAC audio tag first byte: format 10 (AAC), 44 kHz flag, 16-bit, stereo (FLV spec: always
/// these values for AAC; the real parameters are in the AudioSpecificConfig).
const AAC_FLAGS: u8 = 0xaf;

pub fn aac_sequence_header(asc: &[u8]) -> Vec<u8> {
    let mut b = vec![AAC_FLAGS, 0x00];
    b.extend_from_slice(asc);
    b
}

pub fn aac_frame(raw: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(raw.len() + 2);
    b.push(AAC_FLAGS);
    b.push(0x01);
    b.extend_from_slice(raw);
    b
}

/// Script tag body: `name` followed by `value` (e.g. "onMetaData", ECMA array).
pub fn script(name: &str, value: &Value) -> Vec<u8> {
    amf0::encode_all(&[Value::String(name.to_string()), value.clone()])
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    pub kind: u8,
    pub timestamp_ms: u32,
    pub body: Vec<u8>,
}

impl Tag {
    pub fn is_video_keyframe(&self) -> bool {
        self.kind == TAG_VIDEO && self.body.first().is_some_and(|b| b >> 4 == 1)
    }
    pub fn is_sequence_header(&self) -> bool {
        matches!(self.kind, TAG_AUDIO | TAG_VIDEO) && self.body.get(1) == Some(&0)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlvError {
    #[error("not an FLV stream")]
    BadSignature,
    #[error("unsupported FLV tag type {0}")]
    BadTagType(u8),
    #[error("FLV tag of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

/// Incremental reader: feed bytes as they arrive, take complete tags out.
#[derive(Debug, Default)]
pub struct Reader {
    buf: Vec<u8>,
    header_done: bool,
}

impl Reader {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete tag, `Ok(None)` when more bytes are needed.
    pub fn next_tag(&mut self) -> Result<Option<Tag>, FlvError> {
        if !self.header_done {
            if self.buf.len() < 9 {
                return Ok(None);
            }
            if &self.buf[..3] != b"FLV" {
                return Err(FlvError::BadSignature);
            }
            let hlen =
                u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]]) as usize;
            if !(9..=1024).contains(&hlen) {
                return Err(FlvError::BadSignature);
            }
            // Header plus PreviousTagSize0.
            if self.buf.len() < hlen + 4 {
                return Ok(None);
            }
            self.buf.drain(..hlen + 4);
            self.header_done = true;
        }
        if self.buf.len() < 11 {
            return Ok(None);
        }
        let kind = self.buf[0] & 0x1f;
        if !matches!(kind, TAG_AUDIO | TAG_VIDEO | TAG_SCRIPT) {
            return Err(FlvError::BadTagType(kind));
        }
        let size = u32::from_be_bytes([0, self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if size > MAX_TAG_SIZE {
            return Err(FlvError::TooLarge(size));
        }
        let ts = u32::from_be_bytes([self.buf[7], self.buf[4], self.buf[5], self.buf[6]]);
        let total = 11 + size + 4;
        if self.buf.len() < total {
            return Ok(None);
        }
        let body = self.buf[11..11 + size].to_vec();
        self.buf.drain(..total);
        Ok(Some(Tag {
            kind,
            timestamp_ms: ts,
            body,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_back_in_pieces() {
        let mut out = header(true, true).to_vec();
        let meta = amf0::ecma([("width", Value::Number(640.0))]);
        write_tag(&mut out, TAG_SCRIPT, 0, &script("onMetaData", &meta));
        write_tag(&mut out, TAG_VIDEO, 0, &avc_sequence_header(&[1, 2, 3]));
        write_tag(
            &mut out,
            TAG_VIDEO,
            0x0123_4567,
            &avc_frame(true, 0, &[0, 0, 0, 1, 0x65]),
        );
        write_tag(&mut out, TAG_AUDIO, 40, &aac_frame(&[9, 9]));
        let mut r = Reader::new();
        let mut tags = vec![];
        for chunk in out.chunks(7) {
            r.push(chunk);
            while let Some(t) = r.next_tag().unwrap() {
                tags.push(t);
            }
        }
        assert_eq!(tags.len(), 4);
        let v = amf0::decode_all(&tags[0].body).unwrap();
        assert_eq!(v[1].get("width").and_then(Value::as_f64), Some(640.0));
        assert!(tags[1].is_sequence_header());
        assert!(tags[2].is_video_keyframe());
        assert_eq!(tags[2].timestamp_ms, 0x0123_4567, "extended timestamp byte");
        assert_eq!(tags[3].body, vec![0xaf, 0x01, 9, 9]);
    }

    #[test]
    fn bad_streams_are_errors() {
        let mut r = Reader::new();
        r.push(b"GIF89a....");
        assert_eq!(r.next_tag(), Err(FlvError::BadSignature));
        let mut r = Reader::new();
        r.push(&header(false, true));
        r.push(&[TAG_VIDEO, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.next_tag(), Err(FlvError::TooLarge(0xff_ffff)));
        let mut r = Reader::new();
        r.push(&header(false, true));
        r.push(&[3, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.next_tag(), Err(FlvError::BadTagType(3)));
    }
}
