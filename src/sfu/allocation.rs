//! One subscriber's downlink shared by its simulcast tracks, by priority, sans-IO.
//!
//! A subscriber that receives the host and co-hosts gets them all over one link. Judged each on
//! its own ([`Downlink`] per track), every track sees the same loss and steps down at once, the
//! host included, when taking the co-hosts down would have been enough. [`Allocation`] judges
//! the link once and walks one *ladder* of caps, built so that what matters most goes last
//! (audio is never touched: it is not simulcast):
//! 1. the least important tracks (co-hosts, the PK partner) step down one layer at a time, all
//!    together, to their lowest layer;
//! 2. then the next group (the room's host), to its lowest layer;
//! 3. then video pauses, least important first (the host's video last).
//!
//! Going up (probes) is the same ladder read backwards: the host's video comes back and
//! climbs before the co-hosts do. The loss-based rules (when to step, settle times, probes)
//! are [`Downlink`]'s, over the rungs of the ladder instead of one track's layers; with one
//! track the ladder is that track's layers and the behaviour is exactly [`Downlink`]'s.

use std::time::Instant;

use super::downlink::{Cap, Downlink};

/// A simulcast track in the allocation: its key (the caller's), its layer count, and its
/// priority (lower is more important: 0 for the room's host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub key: u64,
    pub layers: u8,
    pub priority: u8,
}

/// The caps, per member in order, on each rung from the bottom (everything paused) to the top
/// (no cap).
pub fn ladder(members: &[Member]) -> Vec<Vec<Cap>> {
    let n = members.len();
    // Walk down from the top, recording each rung.
    let mut caps = vec![Cap::Any; n];
    let mut rungs = vec![caps.clone()];
    let mut prios: Vec<u8> = members.iter().map(|m| m.priority).collect();
    prios.sort_unstable();
    prios.dedup();
    // Least important first.
    for &p in prios.iter().rev() {
        loop {
            let mut moved = false;
            for (i, m) in members.iter().enumerate() {
                if m.priority != p || m.layers < 2 {
                    continue;
                }
                let next = match caps[i] {
                    Cap::Any => Some(m.layers - 2),
                    Cap::AtMost(l) if l > 0 => Some(l - 1),
                    _ => None,
                };
                if let Some(l) = next {
                    caps[i] = Cap::AtMost(l);
                    moved = true;
                }
            }
            if !moved {
                break;
            }
            rungs.push(caps.clone());
        }
    }
    for &p in prios.iter().rev() {
        let mut moved = false;
        for (i, m) in members.iter().enumerate() {
            if m.priority == p && caps[i] != Cap::Paused {
                caps[i] = Cap::Paused;
                moved = true;
            }
        }
        if moved {
            rungs.push(caps.clone());
        }
    }
    rungs.reverse();
    rungs
}

/// The shared downlink of one subscriber's simulcast tracks.
#[derive(Debug)]
pub struct Allocation {
    members: Vec<Member>,
    rungs: Vec<Vec<Cap>>,
    d: Downlink,
}

impl Default for Allocation {
    fn default() -> Self {
        Self::new()
    }
}

/// Rung index of a [`Downlink`] cap over `rungs` (its "layers" are the rungs above the bottom).
fn rung(cap: Cap, top: usize) -> usize {
    match cap {
        Cap::Paused => 0,
        Cap::AtMost(l) => usize::from(l) + 1,
        Cap::Any => top,
    }
}

impl Allocation {
    pub fn new() -> Self {
        Self {
            members: vec![],
            rungs: vec![vec![]],
            d: Downlink::new(1),
        }
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The cap of each member now, in member order.
    pub fn caps(&self) -> &[Cap] {
        let top = self.rungs.len() - 1;
        &self.rungs[rung(self.d.cap(), top).min(top)]
    }

    /// The cap of the member with `key`.
    pub fn cap_of(&self, key: u64) -> Option<Cap> {
        let i = self.members.iter().position(|m| m.key == key)?;
        self.caps().get(i).copied()
    }

    /// The tracks changed (one came or went, a priority changed). The new ladder starts on
    /// the highest rung that gives no member that stays more than it has now (new members
    /// start there too), so a change of members is not a probe.
    pub fn set_members(&mut self, members: Vec<Member>, now: Instant) {
        if members == self.members {
            return;
        }
        let before: Vec<(u64, Cap)> = self
            .members
            .iter()
            .map(|m| m.key)
            .zip(self.caps().iter().copied())
            .collect();
        let rungs = ladder(&members);
        let top = rungs.len() - 1;
        let allowed = |r: &Vec<Cap>| {
            members.iter().zip(r).all(|(m, c)| {
                before
                    .iter()
                    .find(|(k, _)| *k == m.key)
                    .is_none_or(|(_, was)| !exceeds(*c, *was))
            })
        };
        let start = (0..=top).rev().find(|&i| allowed(&rungs[i])).unwrap_or(0);
        let mut d = self.d.clone();
        d.resize(
            u8::try_from(top).unwrap_or(u8::MAX),
            u8::try_from(start).unwrap_or(0),
            now,
        );
        self.d = d;
        self.members = members;
        self.rungs = rungs;
    }

    /// A receiver report (the worst fraction lost of the reports that came since the last
    /// call). Returns whether any cap changed.
    pub fn report(&mut self, fraction_lost: u8, now: Instant) -> bool {
        self.d.report(fraction_lost, now).is_some()
    }

    /// The link is queueing (`Downlink::congested`). Returns whether any cap changed.
    pub fn congested(&mut self, now: Instant) -> bool {
        self.d.congested(now).is_some()
    }

    /// Time passes with no report. Returns whether any cap changed.
    pub fn tick(&mut self, now: Instant) -> bool {
        self.d.tick(now).is_some()
    }

    /// No report for a while from any member (`Downlink::idle`). Returns whether any cap
    /// changed.
    pub fn idle(&mut self, now: Instant) -> bool {
        self.d.idle(now).is_some()
    }

    /// Every switch the last step asked for has completed.
    pub fn switched(&mut self, now: Instant) {
        self.d.switched(now);
    }
}

/// Whether `a` allows more than `b`.
fn exceeds(a: Cap, b: Cap) -> bool {
    let v = |c: Cap| match c {
        Cap::Paused => 0u16,
        Cap::AtMost(l) => u16::from(l) + 1,
        Cap::Any => u16::MAX,
    };
    v(a) > v(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sfu::downlink::{LOSS_HIGH, PROBE_FIRST, SETTLE};
    use std::time::Duration;

    const HOST: u64 = 1;
    const GUEST: u64 = 2;

    fn m(key: u64, layers: u8, priority: u8) -> Member {
        Member {
            key,
            layers,
            priority,
        }
    }

    #[test]
    fn one_track_ladder_is_its_own_layers() {
        let r = ladder(&[m(HOST, 3, 0)]);
        assert_eq!(
            r,
            vec![
                vec![Cap::Paused],
                vec![Cap::AtMost(0)],
                vec![Cap::AtMost(1)],
                vec![Cap::Any]
            ]
        );
    }

    #[test]
    fn cohosts_step_down_and_pause_before_the_host() {
        let r = ladder(&[m(HOST, 3, 0), m(GUEST, 3, 1), m(3, 2, 1)]);
        let top = r.len() - 1;
        assert_eq!(r[top], vec![Cap::Any; 3]);
        // Co-hosts first, together, to their lowest layers.
        assert_eq!(r[top - 1], vec![Cap::Any, Cap::AtMost(1), Cap::AtMost(0)]);
        assert_eq!(r[top - 2], vec![Cap::Any, Cap::AtMost(0), Cap::AtMost(0)]);
        // Then the host.
        assert_eq!(
            r[top - 3],
            vec![Cap::AtMost(1), Cap::AtMost(0), Cap::AtMost(0)]
        );
        assert_eq!(
            r[top - 4],
            vec![Cap::AtMost(0), Cap::AtMost(0), Cap::AtMost(0)]
        );
        // Then the co-hosts' video pauses, the host's last.
        assert_eq!(r[1], vec![Cap::AtMost(0), Cap::Paused, Cap::Paused]);
        assert_eq!(r[0], vec![Cap::Paused; 3]);
        assert_eq!(r.len(), 7);
    }

    #[test]
    fn heavy_loss_takes_the_cohost_down_while_the_host_keeps_its_layer() {
        let t0 = Instant::now();
        let mut a = Allocation::new();
        a.set_members(vec![m(HOST, 3, 0), m(GUEST, 3, 1)], t0);
        assert_eq!(a.caps(), &[Cap::Any, Cap::Any]);
        assert!(a.report(LOSS_HIGH + 10, t0));
        assert_eq!(a.cap_of(HOST), Some(Cap::Any));
        assert_eq!(a.cap_of(GUEST), Some(Cap::AtMost(1)));
        a.switched(t0 + Duration::from_millis(500));
        let t1 = t0 + Duration::from_millis(500) + SETTLE;
        assert!(a.report(LOSS_HIGH + 10, t1));
        assert_eq!(a.caps(), &[Cap::Any, Cap::AtMost(0)]);
        a.switched(t1);
        let t2 = t1 + SETTLE;
        assert!(a.report(LOSS_HIGH + 10, t2));
        assert_eq!(a.caps(), &[Cap::AtMost(1), Cap::AtMost(0)]);
    }

    #[test]
    fn a_track_that_comes_or_goes_keeps_the_others_where_they_are() {
        let t0 = Instant::now();
        let mut a = Allocation::new();
        a.set_members(vec![m(HOST, 3, 0)], t0);
        a.report(LOSS_HIGH + 10, t0);
        assert_eq!(a.caps(), &[Cap::AtMost(1)]);
        // A co-host arrives: the host is not raised, the co-host does not get more than the
        // host's layer allows on the ladder (it starts at its lowest).
        a.set_members(vec![m(HOST, 3, 0), m(GUEST, 3, 1)], t0);
        assert_eq!(a.cap_of(HOST), Some(Cap::AtMost(1)));
        assert_eq!(a.cap_of(GUEST), Some(Cap::AtMost(0)));
        // It leaves: the host stays.
        a.set_members(vec![m(HOST, 3, 0)], t0);
        assert_eq!(a.caps(), &[Cap::AtMost(1)]);
        // Plain (one-layer) tracks are on no rung of their own.
        a.set_members(vec![m(HOST, 3, 0), m(GUEST, 1, 1)], t0);
        assert_eq!(a.cap_of(HOST), Some(Cap::AtMost(1)));
    }

    /// The host's track goes away while the co-host is paused after a middling report: with
    /// nothing flowing no report comes, and the co-host must still be probed again.
    #[test]
    fn a_paused_cohost_is_probed_again_when_nothing_reports() {
        let t0 = Instant::now();
        let mut a = Allocation::new();
        a.set_members(vec![m(1, 2, 0), m(2, 2, 1)], t0);
        let mut t = t0;
        // Down the ladder to "host lowest, co-host paused".
        while a.cap_of(2) != Some(Cap::Paused) {
            assert!(a.report(LOSS_HIGH + 10, t));
            a.switched(t);
            t += SETTLE + Duration::from_millis(1);
        }
        // A middling report (between the marks) clears the good stretch.
        a.report(15, t);
        a.set_members(vec![m(2, 2, 1)], t);
        assert_eq!(a.caps(), &[Cap::Paused]);
        let later = t + PROBE_FIRST + Duration::from_secs(1);
        assert!(a.tick(later) || a.idle(later));
        assert_ne!(a.caps(), &[Cap::Paused]);
        // And with members still flowing but silent (a muted host), `idle` probes too.
        let mut b = Allocation::new();
        b.set_members(vec![m(1, 2, 0), m(2, 2, 1)], t0);
        assert!(b.report(LOSS_HIGH + 10, t0));
        assert_eq!(b.cap_of(2), Some(Cap::AtMost(0)));
        b.report(15, t0 + Duration::from_secs(1));
        let later = t0 + Duration::from_secs(1) + PROBE_FIRST + Duration::from_secs(1);
        assert!(!b.tick(later), "tick alone waits for reports");
        // Silence counts as a good stretch from when it is noticed.
        assert!(!b.idle(later));
        assert!(b.idle(later + PROBE_FIRST));
        assert_eq!(b.cap_of(2), Some(Cap::Any));
    }
}
