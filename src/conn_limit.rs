//! Admission of TCP connections on the public listeners (HTTP/WebSocket, RTMP): a cap on the
//! connections open at once, in total and per client IP. A listener asks for a permit before it
//! does any work for a new connection and drops the connection at once when it gets none, so a
//! flood of sockets from one address costs the server a bounded number of tasks and buffers.
//!
//! The per-IP map holds one entry per IP with an open connection and is pruned when the last
//! one closes, so it never holds more entries than the total cap.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many connections in total")]
    Total,
    #[error("too many connections from this address")]
    PerIp,
}

#[derive(Debug)]
pub struct ConnLimiter {
    max_total: usize,
    max_per_ip: usize,
    open: Mutex<Open>,
    /// Connections refused since start (a metric).
    pub refused: AtomicU64,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Held for as long as the connection is open; dropping it gives the slot back.
#[derive(Debug)]
pub struct ConnPermit {
    limiter: Arc<ConnLimiter>,
    ip: IpAddr,
}

impl ConnLimiter {
    /// `max_total` and `max_per_ip` of 0 mean no limit.
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total: if max_total == 0 {
                usize::MAX
            } else {
                max_total
            },
            max_per_ip: if max_per_ip == 0 {
                usize::MAX
            } else {
                max_per_ip
            },
            open: Mutex::new(Open::default()),
            refused: AtomicU64::new(0),
        })
    }

    /// Admit a connection from `ip`, or say why not.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, Refused> {
        // IPv4-mapped IPv6 addresses are the same client as their IPv4 form.
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let verdict = if open.total >= self.max_total {
            Err(Refused::Total)
        } else if open.per_ip.get(&ip).copied().unwrap_or(0) >= self.max_per_ip {
            Err(Refused::PerIp)
        } else {
            open.total += 1;
            *open.per_ip.entry(ip).or_insert(0) += 1;
            Ok(ConnPermit {
                limiter: self.clone(),
                ip,
            })
        };
        if verdict.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        verdict
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut open = self.limiter.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_ip_and_total_and_gives_slots_back() {
        let l = ConnLimiter::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let p1 = l.try_acquire(a).unwrap();
        let _p2 = l.try_acquire(a).unwrap();
        assert_eq!(l.try_acquire(a).unwrap_err(), Refused::PerIp);
        let _p3 = l.try_acquire(b).unwrap();
        assert_eq!(l.try_acquire(b).unwrap_err(), Refused::Total);
        drop(p1);
        assert!(l.try_acquire(a).is_ok());
        assert_eq!(l.refused.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn mapped_ipv6_counts_as_its_ipv4_address() {
        let l = ConnLimiter::new(0, 1);
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let _p = l.try_acquire(v4).unwrap();
        assert_eq!(l.try_acquire(mapped).unwrap_err(), Refused::PerIp);
    }

    #[test]
    fn map_is_pruned_when_connections_close() {
        let l = ConnLimiter::new(0, 0);
        for i in 0..100u8 {
            drop(l.try_acquire(IpAddr::from([10, 0, 0, i])).unwrap());
        }
        assert_eq!(l.open(), 0);
        assert!(l.open.lock().unwrap().per_ip.is_empty());
    }
}
