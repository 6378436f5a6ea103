//! AMF0, the value encoding of FLV script tags (`onMetaData`, `onTextData`) and RTMP commands.
//! Encoding covers what the muxer writes; decoding covers every AMF0 type a peer may send us
//! and is bounded (depth and length) so hostile input cannot exhaust the stack or memory.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    Boolean(bool),
    String(String),
    /// Anonymous object: ordered key/value pairs.
    Object(Vec<(String, Value)>),
    Null,
    Undefined,
    /// ECMA array (associative array; what `onMetaData` uses).
    EcmaArray(Vec<(String, Value)>),
    StrictArray(Vec<Value>),
    /// Milliseconds since the epoch, and a timezone field that is always 0 in practice.
    Date(f64),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AmfError {
    #[error("truncated AMF0 data")]
    Truncated,
    #[error("unknown AMF0 type marker {0:#04x}")]
    UnknownType(u8),
    #[error("AMF0 nesting deeper than {0}")]
    TooDeep(usize),
    #[error("invalid UTF-8 in AMF0 string")]
    Utf8,
}

const MAX_DEPTH: usize = 32;

impl Value {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::Number(n) => {
                out.push(0x00);
                out.extend_from_slice(&n.to_be_bytes());
            }
            Value::Boolean(b) => {
                out.push(0x01);
                out.push(u8::from(*b));
            }
            Value::String(s) => {
                if s.len() <= u16::MAX as usize {
                    out.push(0x02);
                    write_str16(out, s);
                } else {
                    out.push(0x0c);
                    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
            }
            Value::Object(props) => {
                out.push(0x03);
                write_props(out, props);
            }
            Value::Null => out.push(0x05),
            Value::Undefined => out.push(0x06),
            Value::EcmaArray(props) => {
                out.push(0x08);
                out.extend_from_slice(&(props.len() as u32).to_be_bytes());
                write_props(out, props);
            }
            Value::StrictArray(items) => {
                out.push(0x0a);
                out.extend_from_slice(&(items.len() as u32).to_be_bytes());
                for v in items {
                    v.encode(out);
                }
            }
            Value::Date(ms) => {
                out.push(0x0b);
                out.extend_from_slice(&ms.to_be_bytes());
                out.extend_from_slice(&0i16.to_be_bytes());
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Object(p) | Value::EcmaArray(p) => {
                p.iter().find(|(k, _)| k == key).map(|(_, v)| v)
            }
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// Build an ECMA array from key/value pairs (the usual `onMetaData` body).
pub fn ecma(pairs: impl IntoIterator<Item = (&'static str, Value)>) -> Value {
    Value::EcmaArray(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

fn write_str16(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn write_props(out: &mut Vec<u8>, props: &[(String, Value)]) {
    for (k, v) in props {
        write_str16(out, k);
        v.encode(out);
    }
    out.extend_from_slice(&[0x00, 0x00, 0x09]);
}

/// Encode a sequence of values (a script tag body is `name, value`).
pub fn encode_all(values: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in values {
        v.encode(&mut out);
    }
    out
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], AmfError> {
        let end = self.pos.checked_add(n).ok_or(AmfError::Truncated)?;
        let s = self.data.get(self.pos..end).ok_or(AmfError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, AmfError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, AmfError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, AmfError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn f64(&mut self) -> Result<f64, AmfError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(f64::from_be_bytes(a))
    }
    fn str_of(&mut self, n: usize) -> Result<String, AmfError> {
        std::str::from_utf8(self.take(n)?)
            .map(str::to_string)
            .map_err(|_| AmfError::Utf8)
    }

    fn props(&mut self, depth: usize) -> Result<Vec<(String, Value)>, AmfError> {
        let mut out = Vec::new();
        loop {
            let n = self.u16()? as usize;
            if n == 0 {
                // Empty key: the object end marker (0x09) follows.
                let m = self.u8()?;
                if m == 0x09 {
                    return Ok(out);
                }
                return Err(AmfError::UnknownType(m));
            }
            let k = self.str_of(n)?;
            let v = self.value(depth + 1)?;
            out.push((k, v));
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, AmfError> {
        if depth > MAX_DEPTH {
            return Err(AmfError::TooDeep(MAX_DEPTH));
        }
        Ok(match self.u8()? {
            0x00 => Value::Number(self.f64()?),
            0x01 => Value::Boolean(self.u8()? != 0),
            0x02 => {
                let n = self.u16()? as usize;
                Value::String(self.str_of(n)?)
            }
            0x03 => Value::Object(self.props(depth)?),
            0x05 => Value::Null,
            0x06 => Value::Undefined,
            0x08 => {
                // The count is a hint only; the terminator ends the array.
                let _ = self.u32()?;
                Value::EcmaArray(self.props(depth)?)
            }
            0x0a => {
                let n = self.u32()? as usize;
                // Each element takes at least one byte: refuse counts the data cannot hold.
                if n > self.data.len() - self.pos {
                    return Err(AmfError::Truncated);
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(depth + 1)?);
                }
                Value::StrictArray(items)
            }
            0x0b => {
                let ms = self.f64()?;
                let _tz = self.u16()?;
                Value::Date(ms)
            }
            0x0c => {
                let n = self.u32()? as usize;
                Value::String(self.str_of(n)?)
            }
            other => return Err(AmfError::UnknownType(other)),
        })
    }
}

/// Decode every value in `data`.
pub fn decode_all(data: &[u8]) -> Result<Vec<Value>, AmfError> {
    let mut r = Reader { data, pos: 0 };
    let mut out = Vec::new();
    while r.pos < data.len() {
        out.push(r.value(0)?);
    }
    Ok(out)
}

/// Flatten an object for lookups in tests and logs.
pub fn to_map(v: &Value) -> BTreeMap<String, Value> {
    match v {
        Value::Object(p) | Value::EcmaArray(p) => p.iter().cloned().collect(),
        _ => BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_metadata() {
        let meta = ecma([
            ("width", Value::Number(1280.0)),
            ("height", Value::Number(720.0)),
            ("encoder", Value::String("cohost".into())),
            ("stereo", Value::Boolean(true)),
        ]);
        let bytes = encode_all(&[Value::String("onMetaData".into()), meta.clone()]);
        let back = decode_all(&bytes).unwrap();
        assert_eq!(back[0].as_str(), Some("onMetaData"));
        assert_eq!(back[1], meta);
        assert_eq!(back[1].get("width").and_then(Value::as_f64), Some(1280.0));
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        assert_eq!(
            decode_all(&[0x02, 0x00, 0x05, b'a']),
            Err(AmfError::Truncated)
        );
        assert_eq!(decode_all(&[0x42]), Err(AmfError::UnknownType(0x42)));
        // A strict array claiming 4 billion elements.
        assert_eq!(
            decode_all(&[0x0a, 0xff, 0xff, 0xff, 0xff]),
            Err(AmfError::Truncated)
        );
        // Deep nesting.
        let mut deep = vec![];
        for _ in 0..100 {
            deep.extend_from_slice(&[0x03, 0x00, 0x01, b'a']);
        }
        assert_eq!(decode_all(&deep), Err(AmfError::TooDeep(MAX_DEPTH)));
    }
}
