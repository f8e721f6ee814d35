//! The blocking pool's front door: calls that may wait for the disk are queued per
//! volume and run by at most [`WORKERS`] threads of tokio's blocking pool, in the
//! order `fair` picks (weighted fair between volumes, arrival order within one).
//!
//! Why a queue in front of the threads: with a thread per call, a volume with hundreds
//! of calls in flight holds hundreds of threads, and a lone call of another volume
//! waits behind all of them for a core and for the disk. Here it waits at most for
//! one worker to finish, and then runs next. A volume runs at most [`PER_VOLUME`]
//! calls at once (its depth at the disk), so the other volumes always find workers.
//!
//! Workers are started on demand and end when nothing is left that they may take, so
//! an idle server holds no threads, and a lone call costs one hand-off as before.
//! Draining on shutdown needs nothing here: a worker runs until the queue is empty.

use std::sync::{Arc, Mutex};

use super::fair::Fair;

/// Most calls running at once on the blocking pool, all volumes together. Few: each
/// running call is a runnable thread until it waits for the disk, and a lone call of a
/// quiet volume shares the cores with every one of them (the node has a few cores;
/// sixteen threads keep a disk's queue busy).
pub const WORKERS: usize = 16;
/// Most calls of one volume running at once: the rest of [`WORKERS`] stays free for
/// the other volumes' calls.
pub const PER_VOLUME: usize = 12;

/// A call, ready to run on a worker.
pub type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    fair: Fair<Job>,
    workers: usize,
}

/// The queue and its workers.
#[derive(Default)]
pub struct Pool {
    state: Mutex<State>,
}

impl Pool {
    /// Queues `job` for volume `key` (0: no volume) at `weight`, taking `cost` units of
    /// service (see `fair`), and starts a worker if one may take it.
    pub fn submit(self: &Arc<Self>, key: u32, weight: u32, cost: u32, job: Job) {
        let start = {
            let mut s = self.lock();
            s.fair.push(key, weight, cost, job);
            let start = s.workers < WORKERS && s.fair.ready(PER_VOLUME);
            s.workers += usize::from(start);
            start
        };
        if start {
            let pool = self.clone();
            tokio::task::spawn_blocking(move || pool.work());
        }
    }

    /// Calls queued and not yet running.
    pub fn queued(&self) -> usize {
        self.lock().fair.queued()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One worker: runs what the queue hands it until it hands nothing.
    fn work(&self) {
        let mut finished = None;
        loop {
            let job = {
                let mut s = self.lock();
                if let Some(key) = finished.take() {
                    s.fair.done(key);
                }
                match s.fair.pop(PER_VOLUME) {
                    Some((key, job)) => {
                        finished = Some(key);
                        job
                    }
                    None => {
                        s.workers -= 1;
                        return;
                    }
                }
            };
            // A panicking call must not take its worker's place in the count with it.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                tracing::error!("a call panicked on the blocking pool");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_volume_never_runs_more_than_its_share_of_workers() {
        let pool = Arc::new(Pool::default());
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..100 {
            let (running, most, done) = (running.clone(), most.clone(), done.clone());
            pool.submit(
                7,
                100,
                1,
                Box::new(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(5));
                    running.fetch_sub(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                }),
            );
        }
        // Another volume's call starts while the first one's hundred are queued.
        let (tx, rx) = tokio::sync::oneshot::channel();
        pool.submit(
            8,
            100,
            1,
            Box::new(move || {
                let _ = tx.send(());
            }),
        );
        tokio::time::timeout(Duration::from_millis(500), rx)
            .await
            .expect("the other volume's call ran")
            .expect("sent");
        while done.load(Ordering::SeqCst) < 100 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(most.load(Ordering::SeqCst) <= PER_VOLUME);
        assert!(most.load(Ordering::SeqCst) > 1, "calls ran in parallel");
        assert_eq!(pool.queued(), 0);
    }
}
