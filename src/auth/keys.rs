//! What a stream key may do beyond a valid MAC: its lifetime is capped by the operator
//! (`origin.key_max_ttl`), and a host or admin can revoke every key of a room issued so far.
//!
//! Revocations live in memory (a restart forgets them; the lifetime cap bounds how long a
//! forgotten revocation matters). A room's entry is dropped once every key it revoked has
//! expired anyway (`key_max_ttl` after the revocation), so the map holds at most the rooms
//! revoked within one `key_max_ttl`, and never more than [`MAX_REVOKED_ROOMS`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use super::sign::{self, SignError, StreamGrant};

/// Rooms with a live revocation entry, at most. Revoking one more fails rather than forgetting
/// an older revocation (which would bring its keys back).
pub const MAX_REVOKED_ROOMS: usize = 100_000;

/// Stream-key checks shared by every place that accepts stream keys (RTMP ingest) and mints
/// them (the REST API).
#[derive(Debug)]
pub struct StreamKeys {
    max_ttl: u64,
    /// Room -> revocation time (Unix seconds): keys issued at or before it are refused.
    revoked: Mutex<HashMap<String, u64>>,
    /// Bumped at each revocation, so live publishers re-check their key.
    changes: watch::Sender<u64>,
}

impl StreamKeys {
    pub fn new(max_ttl: Duration) -> Self {
        Self {
            max_ttl: max_ttl.as_secs(),
            revoked: Mutex::new(HashMap::new()),
            changes: watch::channel(0).0,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.revoked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a mint request may ask for this lifetime.
    pub fn check_ttl(&self, ttl: Duration) -> Result<(), SignError> {
        if ttl.as_secs() > self.max_ttl {
            Err(SignError::TooLong)
        } else {
            Ok(())
        }
    }

    /// The issue time of a key minted now: never at or before the room's revocation, so a key
    /// minted in the same second as a revocation (after it) still works.
    pub fn issue_time(&self, room: &str, now: u64) -> u64 {
        match self.map().get(room) {
            Some(&t) if t >= now => t + 1,
            _ => now,
        }
    }

    /// Everything after the MAC: the lifetime cap and revocation.
    pub fn check(&self, g: &StreamGrant, now: u64) -> Result<(), SignError> {
        // Both: a key minted with a longer lifetime, and one whose expiry is further away than
        // the cap allows (minted under a larger cap, or with a forged-looking issue time).
        if g.expiry.saturating_sub(g.issued) > self.max_ttl
            || g.expiry > now.saturating_add(self.max_ttl)
        {
            return Err(SignError::TooLong);
        }
        if self.is_revoked(g) {
            return Err(SignError::Revoked);
        }
        Ok(())
    }

    pub fn is_revoked(&self, g: &StreamGrant) -> bool {
        self.map().get(&g.room).is_some_and(|&t| g.issued <= t)
    }

    /// MAC, expiry, lifetime cap and revocation: what RTMP ingest calls for a publish.
    pub fn verify(&self, secret: &[u8], key: &str, now: u64) -> Result<StreamGrant, SignError> {
        let g = sign::verify_stream_key(secret, key, now)?;
        self.check(&g, now)?;
        Ok(g)
    }

    /// Revoke every key of `room` issued up to `now`. Returns the revocation time.
    pub fn revoke(&self, room: &str, now: u64) -> Result<u64, SignError> {
        {
            let mut map = self.map();
            let max_ttl = self.max_ttl;
            // Entries whose keys have all expired are no longer needed.
            map.retain(|_, t| t.saturating_add(max_ttl) >= now);
            if !map.contains_key(room) && map.len() >= MAX_REVOKED_ROOMS {
                return Err(SignError::BadGrant(
                    "too many rooms with revoked keys; try again later".into(),
                ));
            }
            let t = map.entry(room.to_string()).or_insert(now);
            *t = (*t).max(now);
        }
        self.changes.send_modify(|n| *n += 1);
        Ok(now)
    }

    /// Resolves once `grant` is revoked (at once if it already is). A live publisher selects
    /// on this and disconnects when it fires.
    pub async fn revoked(&self, grant: &StreamGrant) {
        let mut rx = self.changes.subscribe();
        loop {
            if self.is_revoked(grant) {
                return;
            }
            if rx.changed().await.is_err() {
                // The store is gone (server shutting down): never fires.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    const S: &[u8] = b"test-secret-of-enough-length";
    const DAY: u64 = 86_400;

    fn keys() -> StreamKeys {
        StreamKeys::new(Duration::from_secs(7 * DAY))
    }

    #[test]
    fn lifetime_is_capped_at_mint_and_at_verify() {
        let k = keys();
        assert!(k.check_ttl(Duration::from_secs(7 * DAY)).is_ok());
        assert_eq!(
            k.check_ttl(Duration::from_secs(100 * 365 * DAY)),
            Err(SignError::TooLong)
        );
        let now = 1_000_000_000;
        let long = sign::mint_stream_key_at(S, "r", "obs", Role::Host, now, now + 100 * 365 * DAY)
            .unwrap();
        assert_eq!(k.verify(S, &long, now), Err(SignError::TooLong));
        let ok = sign::mint_stream_key_at(S, "r", "obs", Role::Host, now, now + DAY).unwrap();
        assert!(k.verify(S, &ok, now).is_ok());
    }

    #[tokio::test]
    async fn revocation_refuses_older_keys_only_and_wakes_live_publishers() {
        let k = keys();
        let now = 1_000_000_000;
        let old = sign::mint_stream_key_at(S, "r", "obs", Role::Host, now, now + DAY).unwrap();
        let other = sign::mint_stream_key_at(S, "r2", "obs", Role::Host, now, now + DAY).unwrap();
        let g = k.verify(S, &old, now).unwrap();
        // Not revoked yet: the future waits.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), k.revoked(&g))
                .await
                .is_err()
        );
        let g2 = g.clone();
        let watcher = async { k.revoked(&g2).await };
        let revoke = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            k.revoke("r", now).unwrap();
        };
        let (r, ()) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(2), watcher),
            revoke
        );
        assert!(r.is_ok(), "a live publisher hears of the revocation");
        assert_eq!(k.verify(S, &old, now), Err(SignError::Revoked));
        assert!(
            k.verify(S, &other, now).is_ok(),
            "other rooms are untouched"
        );
        // A key minted after the revocation, even in the same second, works.
        let issued = k.issue_time("r", now);
        assert!(issued > now);
        let new = sign::mint_stream_key_at(S, "r", "obs", Role::Host, issued, now + DAY).unwrap();
        assert!(k.verify(S, &new, now).is_ok());
        // Entries go once every key they revoked has expired.
        k.revoke("r3", now + 8 * DAY).unwrap();
        assert!(!k.map().contains_key("r"));
    }
}
