//! Which queued call runs next: weighted fair queueing between volumes (start-time
//! fair queueing), pure, no threads or clocks. `pool` owns one and runs what it picks.
//!
//! Rules (each has its test below):
//! 1. Calls of one volume run in the order they arrived, with one exception: a call
//!    queued in lane [`SKIP`] (the pool's unstable WRITEs) that the caller refuses
//!    may be passed by the calls of lane [`MAIN`] behind it; calls of each lane keep
//!    their order, and a refused call of [`MAIN`] is never passed.
//! 2. Each call gets a start tag when queued: the later of the queue's virtual time
//!    and its volume's last finish tag; its finish tag is start + cost × [`SCALE`] /
//!    weight. The call with the smallest start tag among the volumes' first calls
//!    (rule 1's) runs next, and the virtual time becomes its tag. So a volume that was idle starts at
//!    the current virtual time and is served next, not behind another's backlog.
//! 3. Busy volumes share by weight: over a long run, served cost is proportional to
//!    weight (100 and 300 → 1:3).
//! 4. Work-conserving: a call is refused only when its volume already runs as many
//!    calls as the caller allows it (`per_volume`, or `pool`'s rule for the call);
//!    any other volume's call is taken instead, and an idle volume's share goes to
//!    whoever has calls queued.
//! 5. A volume that went idle keeps no credit: its next start tag is never below
//!    the virtual time (and it keeps its debt while its last finish tag is ahead).

use std::collections::{HashMap, VecDeque};

/// Virtual time per unit of cost at weight 1: large enough that cost / weight keeps
/// precision at the largest weight (1000).
pub const SCALE: u64 = 1_000_000;

/// Lanes of a volume's queue: calls of [`MAIN`] are never passed; a call of [`SKIP`]
/// that the caller refuses may be passed by the calls of [`MAIN`] behind it.
pub const MAIN: usize = 0;
/// See [`MAIN`].
pub const SKIP: usize = 1;

/// One volume's queue and accounts.
struct Flow<T> {
    /// Queued calls with their start tags, oldest first, per lane ([`MAIN`], [`SKIP`]).
    /// Tags grow with arrival, so the smaller of the two fronts is the oldest call.
    queues: [VecDeque<(u64, T)>; 2],
    /// Finish tag of the last call queued.
    finish: u64,
    weight: u64,
    /// Calls taken and not yet [`Fair::done`].
    running: usize,
}

/// Calls queued per key (a volume id), and who goes next.
pub struct Fair<T> {
    flows: HashMap<u32, Flow<T>>,
    vtime: u64,
    queued: usize,
}

impl<T> Default for Fair<T> {
    fn default() -> Self {
        Self {
            flows: HashMap::new(),
            vtime: 0,
            queued: 0,
        }
    }
}

impl<T> Fair<T> {
    /// Queues `item` for `key` in lane [`MAIN`], whose weight is `weight` (≥ 1) and which
    /// will take `cost` units of service (≥ 1).
    #[cfg(test)]
    pub fn push(&mut self, key: u32, weight: u32, cost: u32, item: T) {
        self.push_in(key, weight, cost, MAIN, item);
    }

    /// [`Fair::push`] into `lane` ([`MAIN`] or [`SKIP`]).
    pub fn push_in(&mut self, key: u32, weight: u32, cost: u32, lane: usize, item: T) {
        let flow = self.flows.entry(key).or_insert_with(|| Flow {
            queues: [VecDeque::new(), VecDeque::new()],
            finish: 0,
            weight: 1,
            running: 0,
        });
        flow.weight = u64::from(weight.max(1));
        let start = flow.finish.max(self.vtime);
        flow.finish = start + u64::from(cost.max(1)) * SCALE / flow.weight;
        flow.queues[lane.min(SKIP)].push_back((start, item));
        self.queued += 1;
    }

    /// Takes the next call: the smallest start tag among volumes running fewer than
    /// `per_volume` calls. The caller reports its end with [`Fair::done`].
    #[cfg(test)]
    pub fn pop(&mut self, per_volume: usize) -> Option<(u32, T)> {
        self.pop_if(|_, _, running| running < per_volume)
    }

    /// [`Fair::pop`] among the volumes whose first call `may` take, given the volume's
    /// key, that call and how many of the volume's calls run (the pool's limits). A
    /// volume's first call refused in lane [`SKIP`] is passed by its oldest call of
    /// [`MAIN`], if `may` takes that one; nothing else changes a volume's order.
    pub fn pop_if(&mut self, may: impl Fn(u32, &T, usize) -> bool) -> Option<(u32, T)> {
        let (_, key, lane) = self
            .flows
            .iter()
            .filter_map(|(k, f)| f.pick(*k, &may).map(|(tag, lane)| (tag, *k, lane)))
            .min()?;
        let flow = self.flows.get_mut(&key)?;
        let (tag, item) = flow.queues[lane].pop_front()?;
        flow.running += 1;
        self.vtime = self.vtime.max(tag);
        self.queued -= 1;
        Some((key, item))
    }

    /// A call of `key` taken by [`Fair::pop`] has finished. A volume with nothing
    /// queued or running whose debt is paid is forgotten (rule 5 needs nothing more).
    pub fn done(&mut self, key: u32) {
        let vtime = self.vtime;
        if let Some(flow) = self.flows.get_mut(&key) {
            flow.running = flow.running.saturating_sub(1);
            if flow.running == 0 && flow.is_empty() && flow.finish <= vtime {
                self.flows.remove(&key);
            }
        }
    }

    /// Calls queued, not yet taken.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Whether [`Fair::pop`] with `per_volume` would take a call.
    #[cfg(test)]
    pub fn ready(&self, per_volume: usize) -> bool {
        self.ready_if(|_, _, running| running < per_volume)
    }

    /// Whether [`Fair::pop_if`] with `may` would take a call.
    pub fn ready_if(&self, may: impl Fn(u32, &T, usize) -> bool) -> bool {
        self.flows.iter().any(|(k, f)| f.pick(*k, &may).is_some())
    }
}

impl<T> Flow<T> {
    fn is_empty(&self) -> bool {
        self.queues.iter().all(VecDeque::is_empty)
    }

    /// The tag and lane of the call of this flow (`key`) that `may` takes next: its
    /// oldest, or if that one is in [`SKIP`] and refused, the oldest in [`MAIN`].
    fn pick(&self, key: u32, may: &impl Fn(u32, &T, usize) -> bool) -> Option<(u64, usize)> {
        let main = self.queues[MAIN].front();
        let skip = self.queues[SKIP].front();
        let ok =
            |(tag, item): &(u64, T), lane| may(key, item, self.running).then_some((*tag, lane));
        match (main, skip) {
            (Some(m), Some(s)) if s.0 < m.0 => ok(s, SKIP).or_else(|| ok(m, MAIN)),
            (Some(m), _) => ok(m, MAIN),
            (None, Some(s)) => ok(s, SKIP),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(f: &mut Fair<u32>, n: usize) -> Vec<u32> {
        (0..n)
            .filter_map(|_| {
                let (k, _) = f.pop(usize::MAX)?;
                f.done(k);
                Some(k)
            })
            .collect()
    }

    #[test]
    fn calls_of_one_volume_run_in_arrival_order() {
        let mut f = Fair::default();
        for i in 0..5 {
            f.push(1, 100, 1, i);
        }
        let order: Vec<u32> = (0..5)
            .filter_map(|_| f.pop(usize::MAX).map(|p| p.1))
            .collect();
        assert_eq!(order, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_lone_call_runs_next_not_behind_a_backlog() {
        let mut f = Fair::default();
        for i in 0..500 {
            f.push(1, 100, 1, i);
        }
        drain(&mut f, 10);
        f.push(2, 100, 1, 0);
        // At most one of the backlog's calls (a tie on the tag) before it.
        let next = drain(&mut f, 2);
        assert!(next.contains(&2), "{next:?}");
    }

    #[test]
    fn busy_volumes_share_by_weight() {
        let mut f = Fair::default();
        for i in 0..4000 {
            f.push(1, 100, 1, i);
            f.push(2, 300, 1, i);
        }
        let served = drain(&mut f, 2000);
        let a = served.iter().filter(|k| **k == 1).count();
        let b = served.len() - a;
        assert!(
            (a as i64 - 500).abs() <= 2 && (b as i64 - 1500).abs() <= 2,
            "{a}:{b}"
        );
    }

    #[test]
    fn cost_counts_against_the_share() {
        let mut f = Fair::default();
        for i in 0..1000 {
            f.push(1, 100, 4, i);
            f.push(2, 100, 1, i);
        }
        let served = drain(&mut f, 500);
        let a = served.iter().filter(|k| **k == 1).count();
        assert!((a as i64 - 100).abs() <= 2, "{a}");
    }

    #[test]
    fn a_volume_at_its_running_cap_lets_others_run() {
        let mut f = Fair::default();
        for i in 0..10 {
            f.push(1, 100, 1, i);
        }
        assert_eq!(f.pop(2).map(|p| p.0), Some(1));
        assert_eq!(f.pop(2).map(|p| p.0), Some(1));
        // Volume 1 runs two: it gets no third, and volume 2 (tiny weight, queued after
        // the virtual time moved on) runs.
        assert!(f.pop(2).is_none());
        f.push(2, 1, 1, 0);
        assert_eq!(f.pop(2).map(|p| p.0), Some(2));
        assert!(f.pop(2).is_none());
        assert!(!f.ready(2));
        f.done(1);
        assert!(f.ready(2));
        assert_eq!(f.pop(2).map(|p| p.0), Some(1));
    }

    #[test]
    fn an_idle_share_goes_to_whoever_asks() {
        let mut f = Fair::default();
        for i in 0..100 {
            f.push(1, 1, 1, i);
        }
        // Volume 2 (weight 1000) has nothing queued: volume 1 gets everything.
        assert_eq!(drain(&mut f, 100).len(), 100);
        assert_eq!(f.queued(), 0);
    }

    #[test]
    fn a_refused_write_lets_the_calls_behind_it_run_in_their_order() {
        // Volume 1: WRITE 0 (held by the caller), READ 1, WRITE 2, COMMIT 3.
        let mut f = Fair::default();
        f.push_in(1, 100, 1, SKIP, 0);
        f.push_in(1, 100, 1, MAIN, 1);
        f.push_in(1, 100, 1, SKIP, 2);
        f.push_in(1, 100, 1, MAIN, 3);
        let held = |_: u32, item: &u32, _: usize| item % 2 == 1;
        assert!(f.ready_if(held));
        assert_eq!(f.pop_if(held), Some((1, 1)));
        assert_eq!(f.pop_if(held), Some((1, 3)));
        assert_eq!(f.pop_if(held), None, "the writes stay held");
        // Once let go, the writes run in their order.
        let order: Vec<u32> = (0..2)
            .filter_map(|_| f.pop(usize::MAX).map(|p| p.1))
            .collect();
        assert_eq!(order, vec![0, 2]);
    }

    #[test]
    fn a_refused_call_of_the_main_lane_is_never_passed() {
        let mut f = Fair::default();
        f.push_in(1, 100, 1, MAIN, 0);
        f.push_in(1, 100, 1, SKIP, 1);
        f.push_in(1, 100, 1, MAIN, 2);
        assert_eq!(f.pop_if(|_, item, _| *item != 0), None);
    }

    #[test]
    fn an_idle_volume_saves_no_credit() {
        let mut f = Fair::default();
        f.push(2, 100, 1, 0);
        drain(&mut f, 1);
        for i in 0..1000 {
            f.push(1, 100, 1, i);
        }
        drain(&mut f, 500);
        // Volume 2 was idle while 1 was served 500 times: it now alternates with 1,
        // not 500 calls in a row.
        for i in 0..100 {
            f.push(2, 100, 1, i);
        }
        let next = drain(&mut f, 20);
        let twos = next.iter().filter(|k| **k == 2).count();
        assert!((9..=11).contains(&twos), "{next:?}");
    }
}
