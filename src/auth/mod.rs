//! Access tokens: HMAC-signed JWTs naming a room, an identity, a role and an expiry.
//! Nothing here knows about sockets or rooms; callers decide what a verified grant may do.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub mod keys;
pub mod sign;

use crate::config::AuthConfig;

/// What a participant may do in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Goes live, publishes, runs the room.
    Host,
    /// Publishes and subscribes.
    Cohost,
    /// Subscribes only (until promoted).
    Audience,
    /// An operator's backend: REST API, any room.
    Admin,
}

impl Role {
    pub fn may_publish(self) -> bool {
        matches!(self, Role::Host | Role::Cohost)
    }
    pub fn may_subscribe(self) -> bool {
        true
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Cohost => "cohost",
            Role::Audience => "audience",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(Role::Host),
            "cohost" => Ok(Role::Cohost),
            "audience" => Ok(Role::Audience),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?} (host, cohost, audience, admin)"
            )),
        }
    }
}

/// JWT claims. `room` is `*` only for admin tokens that may act on every room.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// Room name.
    pub room: String,
    /// Identity (unique per room at a time).
    pub sub: String,
    pub role: Role,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Optional display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token is for another room")]
    WrongRoom,
    #[error("invalid grant: {0}")]
    BadGrant(String),
}

impl AuthError {
    /// Stable machine-readable code used in signaling errors and HTTP bodies.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Expired => "token_expired",
            AuthError::Invalid(_) | AuthError::BadGrant(_) => "invalid_token",
            AuthError::WrongRoom => "wrong_room",
        }
    }
}

/// Longest room / identity name accepted: both end up in URLs, logs and stream names.
pub const MAX_NAME_LEN: usize = 64;

/// Room and identity names: ASCII letters, digits, `-`, `_`, `.`; 1..=64 chars.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[derive(Clone)]
pub struct Authenticator {
    alg: Algorithm,
    enc: EncodingKey,
    dec: DecodingKey,
    leeway: u64,
    default_ttl: Duration,
}

impl std::fmt::Debug for Authenticator {
    // Never print keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Authenticator {
    pub fn new(cfg: &AuthConfig) -> Result<Self, AuthError> {
        let alg = match cfg.algorithm.as_str() {
            "HS256" => Algorithm::HS256,
            "HS384" => Algorithm::HS384,
            "HS512" => Algorithm::HS512,
            other => {
                return Err(AuthError::BadGrant(format!(
                    "unsupported algorithm {other}"
                )));
            }
        };
        Ok(Self {
            alg,
            enc: EncodingKey::from_secret(cfg.secret.as_bytes()),
            dec: DecodingKey::from_secret(cfg.secret.as_bytes()),
            leeway: cfg.leeway.as_secs(),
            default_ttl: cfg.token_ttl,
        })
    }

    /// Mint a token. `ttl` defaults to the configured token TTL.
    pub fn mint(
        &self,
        room: &str,
        identity: &str,
        role: Role,
        ttl: Option<Duration>,
    ) -> Result<String, AuthError> {
        if !(valid_name(room) || (role == Role::Admin && room == "*")) {
            return Err(AuthError::BadGrant(format!(
                "room must be 1-{MAX_NAME_LEN} chars of [A-Za-z0-9._-]"
            )));
        }
        if !valid_name(identity) {
            return Err(AuthError::BadGrant(format!(
                "identity must be 1-{MAX_NAME_LEN} chars of [A-Za-z0-9._-]"
            )));
        }
        let iat = now_secs();
        let claims = Claims {
            room: room.into(),
            sub: identity.into(),
            role,
            iat,
            exp: iat + ttl.unwrap_or(self.default_ttl).as_secs(),
            name: None,
        };
        jsonwebtoken::encode(&Header::new(self.alg), &claims, &self.enc)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }

    /// Verify signature, algorithm and expiry; returns the claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let mut v = Validation::new(self.alg);
        v.leeway = self.leeway;
        v.set_required_spec_claims(&["exp", "sub"]);
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.dec, &v).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("wrong algorithm".into()),
                ErrorKind::Json(_) | ErrorKind::MissingRequiredClaim(_) => {
                    AuthError::Invalid("missing or malformed claims".into())
                }
                _ => AuthError::Invalid("malformed token".into()),
            })?;
        let c = data.claims;
        if !valid_name(&c.sub) || !(valid_name(&c.room) || (c.role == Role::Admin && c.room == "*"))
        {
            return Err(AuthError::BadGrant("room or identity not allowed".into()));
        }
        Ok(c)
    }

    /// Verify and check the token grants access to `room`.
    pub fn verify_for_room(&self, token: &str, room: &str) -> Result<Claims, AuthError> {
        let c = self.verify(token)?;
        if c.room == room || (c.role == Role::Admin && c.room == "*") {
            Ok(c)
        } else {
            Err(AuthError::WrongRoom)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        Authenticator::new(&AuthConfig::default()).unwrap()
    }

    #[test]
    fn mint_and_verify_roundtrip() {
        let a = auth();
        let t = a.mint("r1", "alice", Role::Host, None).unwrap();
        let c = a.verify_for_room(&t, "r1").unwrap();
        assert_eq!(c.sub, "alice");
        assert_eq!(c.role, Role::Host);
        assert_eq!(a.verify_for_room(&t, "r2"), Err(AuthError::WrongRoom));
    }

    #[test]
    fn forged_and_expired_tokens_are_refused() {
        let a = auth();
        let other = Authenticator::new(&AuthConfig {
            secret: "another-secret-of-enough-length".into(),
            ..AuthConfig::default()
        })
        .unwrap();
        let t = other.mint("r1", "mallory", Role::Host, None).unwrap();
        assert!(matches!(a.verify(&t), Err(AuthError::Invalid(_))));
        // Expired beyond the leeway.
        let cfg = AuthConfig {
            leeway: Duration::ZERO,
            ..AuthConfig::default()
        };
        let a0 = Authenticator::new(&cfg).unwrap();
        let claims = Claims {
            room: "r1".into(),
            sub: "bob".into(),
            role: Role::Cohost,
            iat: 1,
            exp: 2,
            name: None,
        };
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &a0.enc).unwrap();
        assert_eq!(a0.verify(&t), Err(AuthError::Expired));
        assert!(matches!(a.verify("garbage"), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn names_are_checked() {
        let a = auth();
        assert!(a.mint("bad room", "x", Role::Host, None).is_err());
        assert!(a.mint("*", "ops", Role::Admin, None).is_ok());
        assert!(a.mint("*", "x", Role::Host, None).is_err());
    }
}
