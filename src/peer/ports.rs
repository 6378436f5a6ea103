//! UDP port leases from the configured range. `webrtc` 0.21 binds one socket per peer
//! connection and has no port-range setting, so the server hands each connection a concrete
//! port and takes it back when the connection is dropped.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

pub struct PortPool {
    min: u16,
    max: u16,
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
            inner: Mutex::new(Inner {
                used: BTreeSet::new(),
                cursor,
            }),
        }
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
        let mut g = self.lock();
        let cap = self.capacity();
        for _ in 0..cap {
            let p = g.cursor;
            g.cursor = if p >= self.max { self.min } else { p + 1 };
            if g.used.insert(p) {
                return Some(PortLease {
                    pool: self.clone(),
                    port: p,
                });
            }
        }
        None
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
}
