//! A work queue of object keys, as client-go's: a key waits in the queue at most once;
//! a key added while it is being reconciled runs once more after that reconcile ends
//! (never twice at the same time); workers take keys in the order they came, but for
//! keys put ahead with [`WorkQueue::add_first`]; [`WorkQueue::add_after`] adds a key
//! later (a requeue).
//!
//! Keys are all it holds: the reconcilers read the objects from the watch caches
//! (`triggers::Caches`) when a key's turn comes, so a key queued many times is read
//! once, as it is then.

use std::collections::{HashSet, VecDeque};
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

pub struct WorkQueue<K> {
    state: Mutex<State<K>>,
    ready: Notify,
    /// Keys waiting, for the metrics; set under the state lock.
    depth: Gauge,
}

struct State<K> {
    order: VecDeque<K>,
    queued: HashSet<K>,
    running: HashSet<K>,
    /// Added while running: queued again when done.
    again: HashSet<K>,
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
                order: VecDeque::new(),
                queued: HashSet::new(),
                running: HashSet::new(),
                again: HashSet::new(),
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
        let mut s = self.lock();
        if s.closed {
            return;
        }
        if s.running.contains(&key) {
            s.again.insert(key);
        } else if s.queued.insert(key.clone()) {
            s.order.push_back(key);
            self.depth.set(s.order.len() as i64);
            drop(s);
            self.ready.notify_one();
        }
    }

    /// Queues `key` ahead of every key waiting (unless it is queued already, where it
    /// keeps its place).
    pub fn add_first(&self, key: K) {
        let mut s = self.lock();
        if s.closed {
            return;
        }
        if s.running.contains(&key) {
            s.again.insert(key);
        } else if s.queued.insert(key.clone()) {
            s.order.push_front(key);
            self.depth.set(s.order.len() as i64);
            drop(s);
            self.ready.notify_one();
        }
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
                if let Some(key) = s.order.pop_front() {
                    self.depth.set(s.order.len() as i64);
                    s.queued.remove(&key);
                    s.running.insert(key.clone());
                    if !s.order.is_empty() {
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
        if s.again.remove(key) {
            drop(s);
            self.add(key.clone());
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
        self.lock().order.len()
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
    async fn a_key_added_first_runs_before_those_waiting_and_only_once() {
        let q = WorkQueue::new();
        for k in ["a", "b"] {
            q.add(k);
        }
        q.add_first("c");
        q.add_first("a"); // queued already: keeps its place
        assert_eq!(q.len(), 3);
        assert_eq!(q.next().await, Some("c"));
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
