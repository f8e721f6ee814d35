//! A work queue of object keys, as client-go's: a key waits in the queue at most once;
//! a key added while it is being reconciled runs once more after that reconcile ends
//! (never twice at the same time); workers take keys in the order they came, those
//! added with [`WorkQueue::add_first`] (in their own order) before the rest;
//! [`WorkQueue::add_after`] adds a key later (a requeue).
//!
//! Keys are all it holds: the reconcilers read the objects from the watch caches
//! (`triggers::Caches`) when a key's turn comes, so a key queued many times is read
//! once, as it is then.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

/// A claim's key in the queue: namespace and name.
pub type ClaimKey = (String, String);

/// What a reconcile asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing until the object changes.
    Wait,
    /// Run again after this long, changed or not.
    After(Duration),
}

impl<K: Clone + Eq + Hash> State<K> {
    /// The next waiting key: the first list's oldest, else the other's.
    fn pop(&mut self) -> Option<K> {
        for in_first in [true, false] {
            loop {
                let list = if in_first {
                    &mut self.first
                } else {
                    &mut self.order
                };
                let Some(key) = list.pop_front() else {
                    break;
                };
                if self.queued.get(&key) == Some(&in_first) {
                    self.queued.remove(&key);
                    return Some(key);
                }
            }
        }
        None
    }
}

pub struct WorkQueue<K> {
    state: Mutex<State<K>>,
    ready: Notify,
    /// Keys waiting, for the metrics; set under the state lock.
    depth: Gauge,
}

struct State<K> {
    /// Keys added with [`WorkQueue::add_first`], in the order they came: served first.
    first: VecDeque<K>,
    /// Keys added with [`WorkQueue::add`], in the order they came.
    order: VecDeque<K>,
    /// Each waiting key, and whether it waits in `first`. A key moved from `order` to
    /// `first` leaves a stale entry in `order`, skipped when reached (as is any entry
    /// whose key no longer waits in that list).
    queued: HashMap<K, bool>,
    running: HashSet<K>,
    /// Added while running: queued again when done (first, if any add was).
    again: HashMap<K, bool>,
    closed: bool,
}

impl<K: Clone + Eq + Hash + Send + Sync + 'static> WorkQueue<K> {
    pub fn new() -> Arc<Self> {
        Self::with_depth(Gauge::default())
    }

    /// A queue that keeps `depth` equal to the number of keys waiting.
    pub fn with_depth(depth: Gauge) -> Arc<Self> {
        depth.set(0);
        Arc::new(WorkQueue {
            state: Mutex::new(State {
                first: VecDeque::new(),
                order: VecDeque::new(),
                queued: HashMap::new(),
                running: HashSet::new(),
                again: HashMap::new(),
                closed: false,
            }),
            ready: Notify::new(),
            depth,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<K>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `key` unless it is queued already.
    pub fn add(&self, key: K) {
        self.insert(key, false);
    }

    /// Queues `key` behind the keys added first before it and ahead of every other
    /// (a key already waiting among those moves up).
    pub fn add_first(&self, key: K) {
        self.insert(key, true);
    }

    fn insert(&self, key: K, first: bool) {
        let mut s = self.lock();
        if s.closed {
            return;
        }
        if s.running.contains(&key) {
            *s.again.entry(key).or_insert(false) |= first;
            return;
        }
        match s.queued.get(&key).copied() {
            Some(true) => return,
            Some(false) if !first => return,
            _ => {}
        }
        s.queued.insert(key.clone(), first);
        if first {
            s.first.push_back(key);
        } else {
            s.order.push_back(key);
        }
        self.depth.set(s.queued.len() as i64);
        drop(s);
        self.ready.notify_one();
    }

    /// Queues `key` after `delay` (nothing happens if the queue is gone by then).
    pub fn add_after(self: &Arc<Self>, key: K, delay: Duration) {
        let queue = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(q) = queue.upgrade() {
                q.add(key);
            }
        });
    }

    /// The next key to reconcile, once there is one; `None` once closed. Call
    /// [`WorkQueue::done`] with it when its reconcile ends.
    pub async fn next(&self) -> Option<K> {
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            // Registered before looking, so an add between the look and the wait wakes us.
            notified.as_mut().enable();
            {
                let mut s = self.lock();
                if s.closed {
                    return None;
                }
                if let Some(key) = s.pop() {
                    self.depth.set(s.queued.len() as i64);
                    s.running.insert(key.clone());
                    if !s.queued.is_empty() {
                        // Another worker may take the next one.
                        self.ready.notify_one();
                    }
                    return Some(key);
                }
            }
            notified.await;
        }
    }

    /// Ends the reconcile of `key`; it is queued again if it was added meanwhile.
    pub fn done(&self, key: &K) {
        let mut s = self.lock();
        s.running.remove(key);
        if let Some(first) = s.again.remove(key) {
            drop(s);
            self.insert(key.clone(), first);
        }
    }

    /// Stops handing out keys; workers waiting in [`WorkQueue::next`] get `None`.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        // Nothing waiting will run here any more.
        self.depth.set(0);
        drop(s);
        self.ready.notify_waiters();
    }

    /// Keys waiting (not running).
    pub fn len(&self) -> usize {
        self.lock().queued.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Runs `workers` loops that reconcile keys from `queue` with `reconcile` until the
/// queue is closed, requeueing as each reconcile asks.
pub async fn run_workers<K, F, Fut>(queue: Arc<WorkQueue<K>>, workers: usize, reconcile: F)
where
    K: Clone + Eq + Hash + Send + Sync + 'static,
    F: Fn(K) -> Fut,
    Fut: Future<Output = Next>,
{
    let loops = (0..workers).map(|_| async {
        while let Some(key) = queue.next().await {
            let next = reconcile(key.clone()).await;
            queue.done(&key);
            if let Next::After(delay) = next {
                queue.add_after(key, delay);
            }
        }
    });
    futures::future::join_all(loops).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_key_waits_once_and_runs_in_order() {
        let q = WorkQueue::new();
        for k in ["a", "b", "a", "c", "b"] {
            q.add(k);
        }
        assert_eq!(q.len(), 3);
        assert_eq!(q.depth.get(), 3);
        assert_eq!(q.next().await, Some("a"));
        assert_eq!(q.depth.get(), 2);
        assert_eq!(q.next().await, Some("b"));
        assert_eq!(q.next().await, Some("c"));
    }

    #[tokio::test]
    async fn keys_added_first_run_before_the_others_in_the_order_they_came() {
        let q = WorkQueue::new();
        for k in ["a", "b", "c"] {
            q.add(k);
        }
        q.add_first("d");
        q.add_first("b"); // waiting already: moves up, behind d
        q.add_first("d"); // first already: keeps its place
        q.add("d"); // and an ordinary add does not move it back
        assert_eq!(q.len(), 4);
        assert_eq!(q.depth.get(), 4);
        let mut got = Vec::new();
        while !q.is_empty() {
            got.push(q.next().await.expect("key"));
        }
        assert_eq!(
            got,
            ["d", "b", "a", "c"],
            "b once, not again in its old place"
        );
    }

    #[tokio::test]
    async fn a_key_added_first_while_running_comes_back_first() {
        let q = WorkQueue::new();
        q.add("a");
        let k = q.next().await.expect("key");
        q.add("b");
        q.add_first("a"); // changed while running, and its change goes first
        q.done(&k);
        assert_eq!(q.next().await, Some("a"));
        assert_eq!(q.next().await, Some("b"));
    }

    #[tokio::test]
    async fn a_key_changed_while_running_runs_again_after_not_alongside() {
        let q = WorkQueue::new();
        q.add("a");
        let k = q.next().await.expect("key");
        q.add("a"); // changed while its reconcile runs
        assert!(q.is_empty(), "must not be handed to a second worker now");
        q.done(&k);
        assert_eq!(q.next().await, Some("a"));
        q.done(&"a");
        assert!(q.is_empty(), "ran once more, not twice");
    }

    #[tokio::test]
    async fn workers_requeue_as_asked_and_stop_when_closed() {
        let q = WorkQueue::new();
        let runs = Arc::new(AtomicUsize::new(0));
        q.add(1u32);
        let (q2, r2) = (q.clone(), runs.clone());
        let workers = tokio::spawn(async move {
            run_workers(q2, 4, |_k| {
                let r = r2.clone();
                async move {
                    if r.fetch_add(1, Ordering::SeqCst) < 2 {
                        Next::After(Duration::from_millis(10))
                    } else {
                        Next::Wait
                    }
                }
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3, "first run and two requeues");
        q.close();
        tokio::time::timeout(Duration::from_secs(5), workers)
            .await
            .expect("workers stop once the queue is closed")
            .expect("join");
    }
}
