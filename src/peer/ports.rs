//! UDP port leases from the configured range. `webrtc` 0.21 binds one socket per peer
//! connection and has no port-range setting, so the server hands each connection a concrete
//! port and takes it back when the connection is dropped.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// Who a port is for. Viewers (WHEP sessions, audience subscriber connections) cannot take
/// the last [`PortPool::reserve`] free ports: however many viewers arrive, a co-host can still
/// publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortUse {
    /// A connection that publishes media, or a room member's connection with a seat.
    Publisher,
    /// A connection that only watches.
    Viewer,
}

/// Why no port was leased.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoLease {
    /// Every port of the range is in use (or held by another process).
    Exhausted,
    /// Only the ports kept for publishers are left.
    Reserved,
}

pub struct PortPool {
    min: u16,
    max: u16,
    /// Free ports only publishers may take (at most half the range).
    reserve: usize,
    /// Where leased ports will be bound: a port another process holds there is skipped.
    probe: Option<std::net::IpAddr>,
    inner: Mutex<Inner>,
}

struct Inner {
    used: BTreeSet<u16>,
    /// Next port to try: rotating spreads reuse so a just-released port (whose old packets may
    /// still be in flight) is not handed out again at once.
    cursor: u16,
}

impl PortPool {
    pub fn new(min: u16, max: u16) -> Self {
        // Start at a random point so several servers sharing a range (tests) rarely collide.
        let span = u32::from(max - min) + 1;
        let cursor = min + (rand::random::<u32>() % span) as u16;
        Self {
            min,
            max,
            reserve: 0,
            probe: None,
            inner: Mutex::new(Inner {
                used: BTreeSet::new(),
                cursor,
            }),
        }
    }

    /// Skip ports some other process already holds on `ip` (another server sharing the
    /// range, or any program): otherwise the connection given that port would fail to bind.
    pub fn probing(mut self, ip: std::net::IpAddr) -> Self {
        self.probe = Some(ip);
        self
    }

    /// Keep `ports` free ports for publishers (capped at half the range, so a small test range
    /// or a misjudged value never leaves viewers with nothing).
    pub fn with_reserve(mut self, ports: usize) -> Self {
        self.reserve = ports.min(self.capacity() / 2);
        self
    }

    pub fn reserve(&self) -> usize {
        self.reserve
    }

    fn free_on_host(&self, port: u16) -> bool {
        self.probe
            .is_none_or(|ip| std::net::UdpSocket::bind((ip, port)).is_ok())
    }

    pub fn capacity(&self) -> usize {
        usize::from(self.max - self.min) + 1
    }

    pub fn in_use(&self) -> usize {
        self.lock().used.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    pub fn lease(self: &Arc<Self>) -> Option<PortLease> {
        self.lease_for(PortUse::Publisher).ok()
    }

    pub fn lease_for(self: &Arc<Self>, use_: PortUse) -> Result<PortLease, NoLease> {
        let mut g = self.lock();
        let cap = self.capacity();
        // Counted under the same lock as the lease, so concurrent viewers cannot together
        // overshoot into the reserve.
        if use_ == PortUse::Viewer && cap.saturating_sub(g.used.len()) <= self.reserve {
            return Err(NoLease::Reserved);
        }
        for _ in 0..cap {
            let p = g.cursor;
            g.cursor = if p >= self.max { self.min } else { p + 1 };
            if !g.used.contains(&p) && self.free_on_host(p) {
                g.used.insert(p);
                return Ok(PortLease {
                    pool: self.clone(),
                    port: p,
                });
            }
        }
        Err(NoLease::Exhausted)
    }

    fn release(&self, port: u16) {
        self.lock().used.remove(&port);
    }
}

pub struct PortLease {
    pool: Arc<PortPool>,
    port: u16,
}

impl PortLease {
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        self.pool.release(self.port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_unique_and_returned() {
        let pool = Arc::new(PortPool::new(40000, 40002));
        let a = pool.lease().unwrap();
        let b = pool.lease().unwrap();
        let c = pool.lease().unwrap();
        assert!(pool.lease().is_none());
        let mut ports = vec![a.port(), b.port(), c.port()];
        ports.sort();
        assert_eq!(ports, vec![40000, 40001, 40002]);
        drop(b);
        assert_eq!(pool.in_use(), 2);
        assert!(pool.lease().is_some());
    }

    #[test]
    fn viewers_cannot_take_the_publishers_reserve() {
        let pool = Arc::new(PortPool::new(40000, 40003).with_reserve(2));
        let v1 = pool.lease_for(PortUse::Viewer).unwrap();
        let _v2 = pool.lease_for(PortUse::Viewer).unwrap();
        assert_eq!(
            pool.lease_for(PortUse::Viewer).err(),
            Some(NoLease::Reserved)
        );
        let _p1 = pool.lease_for(PortUse::Publisher).unwrap();
        let _p2 = pool.lease_for(PortUse::Publisher).unwrap();
        assert_eq!(
            pool.lease_for(PortUse::Publisher).err(),
            Some(NoLease::Exhausted)
        );
        drop(v1);
        assert_eq!(
            pool.lease_for(PortUse::Viewer).err(),
            Some(NoLease::Reserved),
            "one free port is within the reserve"
        );
        // The reserve never exceeds half the range.
        assert_eq!(PortPool::new(1, 4).with_reserve(100).reserve(), 2);
    }

    #[test]
    fn a_port_held_by_another_process_is_skipped() {
        let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let pool = Arc::new(PortPool::new(port, port).probing("127.0.0.1".parse().unwrap()));
        assert!(pool.lease().is_none(), "the only port is taken on the host");
        drop(held);
        assert_eq!(pool.lease().map(|l| l.port()), Some(port));
    }
}
