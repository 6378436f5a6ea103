//! Signatures that are not JWTs: RTMP stream keys, signed origin URLs (anti-hotlinking) and the
//! URL signing schemes CDNs expect on push URLs. Pure functions: the caller passes the time.
//!
//! - Stream key: `{room}~{identity}~{role}~{issued}~{expiry}~{mac}`, `mac` = the first 16 bytes
//!   (hex) of HMAC-SHA256(auth secret,
//!   "cohost-stream-key-v2\n{room}\n{identity}\n{role}\n{issued}\n{expiry}"). The domain prefix
//!   keeps a stream key from ever verifying as anything else (and a JWT access token is never a
//!   stream key), so a key leaked from an OBS screen only lets someone publish as that identity
//!   until it expires or the room's keys are revoked. `issued` is what revocation compares
//!   (keys issued at or before a room's revocation time are refused, see `auth::keys`); keys of
//!   the first format (no `issued`) are refused as malformed.
//! - Signed URL: `?sign=...&expires=UNIX` with `sign` = HMAC-SHA256(secret, "{path}\n{expires}")
//!   in hex or base64url (unpadded), `path` = `/{app}/{stream}` (the same for RTMP and HTTP-FLV:
//!   `/live/room1.flv` is signed as `/live/room1`).
//! - CDN push URLs: `txSecret`/`txTime` (Tencent-style) and `auth_key` (Alibaba-style).
//!
//! Every comparison of a MAC is constant time (`hmac`'s `verify_*`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha2::Sha256;

use super::{Role, valid_name};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the stream key MAC kept (128 bits).
const KEY_MAC_BYTES: usize = 16;
const KEY_DOMAIN: &str = "cohost-stream-key-v2";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("malformed stream key")]
    MalformedKey,
    #[error("bad signature")]
    BadSignature,
    #[error("expired")]
    Expired,
    #[error("missing sign or expires parameter")]
    Missing,
    #[error("{0}")]
    BadGrant(String),
    /// The room's keys were revoked after this one was issued.
    #[error("the room's stream keys were revoked")]
    Revoked,
    /// The key lives longer than `origin.key_max_ttl` allows.
    #[error("lifetime above the server's limit (origin.key_max_ttl)")]
    TooLong,
}

impl SignError {
    /// Stable code for logs and RTMP status descriptions.
    pub fn code(&self) -> &'static str {
        match self {
            SignError::MalformedKey => "malformed_key",
            SignError::BadSignature => "bad_signature",
            SignError::Expired => "expired",
            SignError::Missing => "signature_required",
            SignError::BadGrant(_) => "bad_grant",
            SignError::Revoked => "key_revoked",
            SignError::TooLong => "key_ttl_too_long",
        }
    }
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes any key length"),
    }
}

fn key_message(room: &str, identity: &str, role: Role, issued: u64, expiry: u64) -> String {
    format!(
        "{KEY_DOMAIN}\n{room}\n{identity}\n{}\n{issued}\n{expiry}",
        role.as_str()
    )
}

/// What a verified stream key grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamGrant {
    pub room: String,
    pub identity: String,
    pub role: Role,
    /// When the key was minted (Unix seconds): revocation compares this.
    pub issued: u64,
    pub expiry: u64,
}

/// Mint a stream key for publishing into `room` as `identity` until `expiry` (Unix seconds),
/// issued now.
pub fn mint_stream_key(
    secret: &[u8],
    room: &str,
    identity: &str,
    role: Role,
    expiry: u64,
) -> Result<String, SignError> {
    let issued = super::now_secs().min(expiry);
    mint_stream_key_at(secret, room, identity, role, issued, expiry)
}

/// [`mint_stream_key`] with an explicit issue time.
pub fn mint_stream_key_at(
    secret: &[u8],
    room: &str,
    identity: &str,
    role: Role,
    issued: u64,
    expiry: u64,
) -> Result<String, SignError> {
    if !valid_name(room) || !valid_name(identity) {
        return Err(SignError::BadGrant(
            "room and identity must be 1-64 chars of [A-Za-z0-9._-]".into(),
        ));
    }
    if !role.may_publish() {
        return Err(SignError::BadGrant(format!(
            "role {} may not publish",
            role.as_str()
        )));
    }
    if issued > expiry {
        return Err(SignError::BadGrant("issued after it expires".into()));
    }
    let mut m = mac(secret);
    m.update(key_message(room, identity, role, issued, expiry).as_bytes());
    let tag = m.finalize().into_bytes();
    Ok(format!(
        "{room}~{identity}~{}~{issued}~{expiry}~{}",
        role.as_str(),
        hex::encode(&tag[..KEY_MAC_BYTES])
    ))
}

/// Check a stream key's MAC and expiry at `now` (Unix seconds). The lifetime cap and
/// revocations are checked by `auth::keys::StreamKeys::verify`, which callers should use.
pub fn verify_stream_key(secret: &[u8], key: &str, now: u64) -> Result<StreamGrant, SignError> {
    // At most 7 parts are looked at, so a key made of thousands of `~` costs nothing.
    let parts: Vec<&str> = key.splitn(7, '~').collect();
    let [room, identity, role, issued, expiry, sig] = parts[..] else {
        return Err(SignError::MalformedKey);
    };
    if !valid_name(room) || !valid_name(identity) || sig.len() != KEY_MAC_BYTES * 2 {
        return Err(SignError::MalformedKey);
    }
    let role: Role = role.parse().map_err(|_| SignError::MalformedKey)?;
    let issued: u64 = issued.parse().map_err(|_| SignError::MalformedKey)?;
    let expiry: u64 = expiry.parse().map_err(|_| SignError::MalformedKey)?;
    let sig = hex::decode(sig).map_err(|_| SignError::MalformedKey)?;
    let mut m = mac(secret);
    m.update(key_message(room, identity, role, issued, expiry).as_bytes());
    m.verify_truncated_left(&sig)
        .map_err(|_| SignError::BadSignature)?;
    if expiry < now {
        return Err(SignError::Expired);
    }
    if !role.may_publish() {
        return Err(SignError::BadGrant("role may not publish".into()));
    }
    Ok(StreamGrant {
        room: room.to_string(),
        identity: identity.to_string(),
        role,
        issued,
        expiry,
    })
}

/// The part of a stream key that is safe to log: room and identity, never the MAC.
pub fn key_for_log(key: &str) -> String {
    let mut it = key.split('~');
    match (it.next(), it.next()) {
        (Some(r), Some(i)) if valid_name(r) && valid_name(i) => format!("{r}~{i}~…"),
        _ => "<malformed>".into(),
    }
}

fn url_mac(secret: &[u8], path: &str, expires: u64) -> HmacSha256 {
    let mut m = mac(secret);
    m.update(format!("{path}\n{expires}").as_bytes());
    m
}

/// `sign` for `path` (e.g. `/live/room1`) valid until `expires`, in hex.
pub fn sign_path(secret: &[u8], path: &str, expires: u64) -> String {
    hex::encode(url_mac(secret, path, expires).finalize().into_bytes())
}

/// The query string (`sign=...&expires=...`) for `path`.
pub fn signed_query(secret: &[u8], path: &str, expires: u64) -> String {
    format!(
        "sign={}&expires={expires}",
        sign_path(secret, path, expires)
    )
}

/// Split `name?query` into the name and the query's `key=value` pairs (no percent-decoding is
/// needed: every value this server reads is hex, base64url or decimal).
pub fn split_query(s: &str) -> (&str, Vec<(&str, &str)>) {
    match s.split_once('?') {
        Some((name, q)) => (
            name,
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
                .collect(),
        ),
        None => (s, vec![]),
    }
}

/// Verify `sign`/`expires` from `query` for `path` at `now`.
pub fn verify_signed(
    secret: &[u8],
    path: &str,
    query: &[(&str, &str)],
    now: u64,
) -> Result<(), SignError> {
    let get = |k: &str| query.iter().find(|(qk, _)| *qk == k).map(|(_, v)| *v);
    let (Some(sign), Some(expires)) = (get("sign"), get("expires")) else {
        return Err(SignError::Missing);
    };
    let expires: u64 = expires.parse().map_err(|_| SignError::BadSignature)?;
    let raw = if sign.len() == 64 {
        hex::decode(sign).map_err(|_| SignError::BadSignature)?
    } else {
        URL_SAFE_NO_PAD
            .decode(sign)
            .map_err(|_| SignError::BadSignature)?
    };
    url_mac(secret, path, expires)
        .verify_slice(&raw)
        .map_err(|_| SignError::BadSignature)?;
    if expires < now {
        return Err(SignError::Expired);
    }
    Ok(())
}

fn md5_hex(s: &str) -> String {
    hex::encode(Md5::digest(s.as_bytes()))
}

/// Tencent-style push signing: `(txSecret, txTime)` for `stream` (the stream name, without any
/// query) valid until `expiry`. `txTime` is the expiry as upper-case hex and `txSecret` is
/// `md5(key + stream + txTime)` in lower-case hex.
pub fn tx_secret(key: &str, stream: &str, expiry: u64) -> (String, String) {
    let tx_time = format!("{expiry:X}");
    (md5_hex(&format!("{key}{stream}{tx_time}")), tx_time)
}

/// Alibaba-style push signing: the `auth_key` value
/// `{timestamp}-{rand}-{uid}-md5("/{app}/{stream}-{timestamp}-{rand}-{uid}-{key}")`, where
/// `timestamp` is the expiry (Unix seconds).
pub fn auth_key(
    app: &str,
    stream: &str,
    timestamp: u64,
    rand: &str,
    uid: &str,
    key: &str,
) -> String {
    let hash = md5_hex(&format!("/{app}/{stream}-{timestamp}-{rand}-{uid}-{key}"));
    format!("{timestamp}-{rand}-{uid}-{hash}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &[u8] = b"test-secret-of-enough-length";

    #[test]
    fn stream_key_roundtrip_expiry_and_tampering() {
        let k = mint_stream_key_at(S, "room1", "obs", Role::Host, 500, 2_000).unwrap();
        assert!(k.starts_with("room1~obs~host~500~2000~"));
        let g = verify_stream_key(S, &k, 1_000).unwrap();
        assert_eq!(
            g,
            StreamGrant {
                room: "room1".into(),
                identity: "obs".into(),
                role: Role::Host,
                issued: 500,
                expiry: 2_000
            }
        );
        assert_eq!(verify_stream_key(S, &k, 2_001), Err(SignError::Expired));
        assert_eq!(
            verify_stream_key(b"another-secret-xxxxxxxx", &k, 1_000),
            Err(SignError::BadSignature)
        );
        // Changing any field breaks the MAC.
        for forged in [
            k.replace("room1", "room2"),
            k.replace("~obs~", "~eve~"),
            k.replace("~host~", "~cohost~"),
            k.replace("~2000~", "~9000~"),
            k.replace("~500~", "~900~"),
        ] {
            assert_eq!(
                verify_stream_key(S, &forged, 1_000),
                Err(SignError::BadSignature),
                "{forged}"
            );
        }
        for bad in [
            "",
            "a~b",
            "r~i~host~0~1~zz",
            "r~i~boss~0~1~00112233445566778899aabbccddeeff",
            // The first format (no issue time) is not accepted any more.
            "r~i~host~1~00112233445566778899aabbccddeeff",
        ] {
            assert_eq!(verify_stream_key(S, bad, 0), Err(SignError::MalformedKey));
        }
        assert!(mint_stream_key(S, "r", "viewer", Role::Audience, 1).is_err());
        assert!(mint_stream_key(S, "bad room", "x", Role::Host, 1).is_err());
        assert!(mint_stream_key_at(S, "r", "x", Role::Host, 2, 1).is_err());
        assert_eq!(key_for_log(&k), "room1~obs~…");
        assert!(!key_for_log(&k).contains(&k[k.len() - 8..]));
    }

    #[test]
    fn stream_key_mac_is_hmac_sha256_of_the_documented_message() {
        let k = mint_stream_key_at(S, "r", "i", Role::Cohost, 40, 42).unwrap();
        // HMAC-SHA256(S, "cohost-stream-key-v2\nr\ni\ncohost\n40\n42"), first 16 bytes,
        // computed independently (Python's hmac).
        assert_eq!(k, "r~i~cohost~40~42~1b5ecb9b19bc71aa619795ec1e994df6");
    }

    #[test]
    fn signed_urls_hex_and_base64url() {
        let q = signed_query(S, "/live/room1", 5_000);
        let url = format!("room1?{q}");
        let (name, pairs) = split_query(&url);
        assert_eq!(name, "room1");
        assert_eq!(verify_signed(S, "/live/room1", &pairs, 4_000), Ok(()));
        assert_eq!(
            verify_signed(S, "/live/room1", &pairs, 5_001),
            Err(SignError::Expired)
        );
        assert_eq!(
            verify_signed(S, "/live/room2", &pairs, 4_000),
            Err(SignError::BadSignature)
        );
        assert_eq!(
            verify_signed(S, "/live/room1", &[], 0),
            Err(SignError::Missing)
        );
        // Computed independently (Python's hmac) over "/live/room1\n5000".
        let want = "c69090662d94b9bd7613b60b889e752d4e417ec7996fb3423fb19eb27a7f4c34";
        assert_eq!(sign_path(S, "/live/room1", 5_000), want);
        let raw = hex::decode(want).unwrap();
        let b64 = URL_SAFE_NO_PAD.encode(raw);
        let pairs = [("sign", b64.as_str()), ("expires", "5000")];
        assert_eq!(verify_signed(S, "/live/room1", &pairs, 0), Ok(()));
        let pairs = [("sign", "not-base64!"), ("expires", "5000")];
        assert_eq!(
            verify_signed(S, "/live/room1", &pairs, 0),
            Err(SignError::BadSignature)
        );
        let pairs = [("sign", "00"), ("expires", "x")];
        assert!(verify_signed(S, "/live/room1", &pairs, 0).is_err());
    }

    #[test]
    fn hmac_matches_rfc4231_vector() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let mut m = HmacSha256::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(m.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn tx_secret_known_vector() {
        // md5("abc") = 900150983cd24fb0d6963f7d28e17f72 (RFC 1321); with key "a", stream "b"
        // and expiry 0xC the signed string is "a" + "b" + "C" = "abC".
        assert_eq!(md5_hex("abc"), "900150983cd24fb0d6963f7d28e17f72");
        let (secret, time) = tx_secret("a", "b", 12);
        assert_eq!(time, "C");
        assert_eq!(secret, md5_hex("abC"));
        // A realistic one: txTime for 2019-01-01 00:00:00 UTC (1546300800) is 5C2AAD80.
        let (secret, time) = tx_secret("mykey", "room1", 1_546_300_800);
        assert_eq!(time, "5C2AAD80");
        // md5("mykeyroom15C2AAD80"), computed independently.
        assert_eq!(secret, "fa8b25e408640aa32c627665c8f948a5");
        assert_eq!(secret.len(), 32);
    }

    #[test]
    fn auth_key_known_vector() {
        let v = auth_key("live", "room1", 1_546_300_800, "0", "0", "mykey");
        // md5("/live/room1-1546300800-0-0-mykey"), computed independently.
        assert_eq!(v, "1546300800-0-0-815338df2d2d7e4016256b04ad01ecb7");
        // md5 of the empty string (RFC 1321) pins the hash function itself.
        assert_eq!(md5_hex(""), "d41d8cd98f00b204e9800998ecf8427e");
    }
}
