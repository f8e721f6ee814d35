//! Space held for placements in progress, so a burst of claims never places more bytes
//! on a node than its agent offers (issue 14 item 4). Pure bookkeeping, no I/O.
//!
//! An agent's heartbeat reports its free space only after it has created a volume;
//! until then, and for a while after the controller sees the volume ready (the next
//! heartbeats carry the new free space: one is sent within 2 s of a lone creation,
//! within 10 s while creations keep coming, else every 30 s), the claim's bytes are
//! held here and taken off that node's free space.
//! Durations are measured on this process's monotonic clock, never compared with
//! another machine's.
//!
//! Held in memory by the leader: a new leader re-holds a placed claim when it first
//! reconciles it, so right after a takeover a node can briefly be offered twice.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::pv::NodeRoom;

/// How long a hold outlives the volume becoming ready: the early heartbeat after the
/// creation (at most `node::cluster::BURST_GAP` later while creations keep coming), or
/// should that renewal fail the next one, `heartbeat::RENEW_EVERY` after it, and a few
/// seconds for the watch to bring it.
pub const HOLD_AFTER_READY: Duration = Duration::from_secs(
    crate::node::cluster::BURST_GAP.as_secs() + crate::heartbeat::RENEW_EVERY.as_secs() + 5,
);
/// How long a hold lasts for a placement that never becomes ready and is never
/// released (its claim vanished without the controller seeing it go).
pub const HOLD_UNREADY: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Held {
    node: String,
    bytes: u64,
    placed: Instant,
    ready: Option<Instant>,
}

/// Holds by claim uid, and their sum by node (kept with every change: a placement
/// reads one sum per node instead of going over every hold once per node, so its cost
/// under the lock is one pass over the holds, in [`Reservations::expire`], not nodes
/// × holds; a 10,000-claim burst on 100 nodes spent a fifth of the leader's CPU
/// summing holds before, bench/README.md "scale").
#[derive(Debug, Default)]
pub struct Reservations {
    held: HashMap<String, Held>,
    by_node: HashMap<String, u64>,
}

impl Reservations {
    /// Drops holds the agents' reports now include, or that were never finished.
    pub fn expire(&mut self, now: Instant) {
        let by_node = &mut self.by_node;
        self.held.retain(|_, h| {
            let keep = match h.ready {
                Some(r) => now.saturating_duration_since(r) < HOLD_AFTER_READY,
                None => now.saturating_duration_since(h.placed) < HOLD_UNREADY,
            };
            if !keep {
                Self::take_off(by_node, h);
            }
            keep
        });
    }

    /// `rooms` less what is held on each node.
    pub fn discount(&self, rooms: &[NodeRoom]) -> Vec<NodeRoom> {
        rooms
            .iter()
            .map(|r| NodeRoom {
                node: r.node.clone(),
                free_bytes: r
                    .free_bytes
                    .saturating_sub(self.by_node.get(&r.node).copied().unwrap_or(0)),
            })
            .collect()
    }

    /// Holds `bytes` on `node` for claim `uid`; an existing hold for it stays as it is.
    pub fn hold(&mut self, uid: &str, node: &str, bytes: u64, now: Instant) {
        if self.held.contains_key(uid) {
            return;
        }
        if bytes > 0 {
            let sum = self.by_node.entry(node.to_owned()).or_default();
            *sum = sum.saturating_add(bytes);
        }
        self.held.insert(
            uid.to_owned(),
            Held {
                node: node.to_owned(),
                bytes,
                placed: now,
                ready: None,
            },
        );
    }

    /// Takes a hold that ends off its node's sum.
    fn take_off(by_node: &mut HashMap<String, u64>, h: &Held) {
        if let Some(sum) = by_node.get_mut(&h.node) {
            *sum = sum.saturating_sub(h.bytes);
            if *sum == 0 {
                by_node.remove(&h.node);
            }
        }
    }

    /// The claim's volume exists: its hold ends [`HOLD_AFTER_READY`] from the first
    /// time this is said.
    pub fn ready(&mut self, uid: &str, now: Instant) {
        if let Some(h) = self.held.get_mut(uid) {
            h.ready.get_or_insert(now);
        }
    }

    /// The placement was taken back or abandoned: nothing more will be created.
    pub fn release(&mut self, uid: &str) {
        if let Some(h) = self.held.remove(uid) {
            Self::take_off(&mut self.by_node, &h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provisioner::pv::tests::rooms;

    /// `by_node` as summed from the holds themselves.
    fn summed(r: &Reservations) -> HashMap<String, u64> {
        let mut sums = HashMap::new();
        for h in r.held.values().filter(|h| h.bytes > 0) {
            *sums.entry(h.node.clone()).or_default() += h.bytes;
        }
        sums
    }

    fn free(r: &Reservations) -> Vec<u64> {
        assert_eq!(r.by_node, summed(r), "the kept sums are the holds' sums");
        r.discount(&rooms(&[("a", 100), ("b", 50)]))
            .iter()
            .map(|n| n.free_bytes)
            .collect()
    }

    #[test]
    fn holds_come_off_their_node_until_reported_or_released() {
        let t0 = Instant::now();
        let mut r = Reservations::default();
        r.hold("c1", "a", 30, t0);
        r.hold("c2", "a", 30, t0);
        r.hold("c3", "b", 80, t0);
        r.hold("empty", "b", 0, t0);
        r.hold("zero", "c", 0, t0);
        assert_eq!(free(&r), vec![40, 0], "a hold of nothing takes nothing");
        r.release("zero");
        assert_eq!(free(&r), vec![40, 0], "held bytes, never below zero");
        r.hold("c1", "b", 1, t0);
        assert_eq!(
            free(&r),
            vec![40, 0],
            "a second hold for a claim changes nothing"
        );
        r.release("c3");
        r.release("empty");
        r.release("never-held");
        assert_eq!(free(&r), vec![40, 50]);

        r.ready("c1", t0 + Duration::from_secs(1));
        r.expire(t0 + HOLD_AFTER_READY);
        assert_eq!(free(&r), vec![40, 50], "still within the hold after ready");
        r.ready("c1", t0 + HOLD_AFTER_READY);
        r.expire(t0 + HOLD_AFTER_READY + Duration::from_secs(1));
        assert_eq!(
            free(&r),
            vec![70, 50],
            "the first ready counts, not a later one"
        );
        r.expire(t0 + HOLD_UNREADY);
        assert_eq!(free(&r), vec![100, 50], "never finished: dropped at last");
        r.ready("gone", t0);
        assert_eq!(free(&r), vec![100, 50]);
        assert!(r.by_node.is_empty(), "no sum outlives its holds");
    }
}
