//! What bounds the NFS server against clients that are slow, stuck or hostile, so that
//! no client can stop it serving the others: time limits on every wait that depends on a client, and one memory
//! budget for every byte the server holds on a client's behalf.
//!
//! The budget admits bytes, not connections: a record's bytes are charged as they
//! arrive (in steps that start small, so a connection that sends a record mark and then
//! stalls holds a few KiB, not the megabyte the mark promises), and before a call runs
//! the largest reply it can produce is charged too (a 200-byte READ call can ask for a
//! 1 MiB reply). Once a reply is written, the part of it the kernel still holds in the
//! connection's socket (not yet acknowledged by the client; each socket's send buffer
//! is bounded, see `conn`) stays charged, moved from the reply's charge to the
//! connection's, until the client takes it: unread replies in kernel buffers count
//! (they count against the pod's memory limit too). The rest is returned when the reply
//! has left or the call is dropped.
//! When the budget is spent, connections stop reading (TCP pushes back on the clients)
//! until replies go out; nothing is allocated beyond it (but each connection's 1 KiB
//! read buffer, a fixed cost like its socket's). A client cannot hold its share
//! forever: records must complete within the record timeout and replies leave within
//! the send timeout, and while others wait for room the connection whose record or
//! reply has stalled longest is dropped.
//!
//! Descriptors are a budget too: [`share_descriptors`] splits the open-file limit
//! between connections (one each), the handle cache and the calls running, so that
//! idle connections can never leave an honest call without a descriptor to open its
//! file with.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Largest READ/WRITE transfer we advertise and accept (and so the largest READ or
/// READDIR reply's data).
pub const MAX_IO: u32 = 1 << 20;

/// The server's time and memory limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most connections served at once (more wait in the accept backlog).
    pub max_connections: usize,
    /// A connection with no call in flight and no byte received for this long is
    /// closed; clients reconnect when they next need the server (knfsd closes idle TCP
    /// connections after 6 minutes the same way).
    pub idle_timeout: Duration,
    /// A record must arrive whole within this long of its first byte.
    pub record_timeout: Duration,
    /// A reply must leave within this long of the first attempt to send it (the client
    /// reads its socket); else the connection is dropped.
    pub send_timeout: Duration,
    /// Bytes of records and replies held for all clients together.
    pub bytes_in_flight: usize,
    /// Whether calls from source ports >= 1024 are refused (knfsd's `secure`).
    pub require_reserved_port: bool,
    /// After shutdown is asked for, how long connections may take to send the replies
    /// of calls already received; then they are cut (Kubernetes kills the pod 30 s
    /// after SIGTERM by default; the process must have exited cleanly before that).
    pub drain_timeout: Duration,
}

/// Descriptors the agent holds whatever its clients do: standard streams, listeners,
/// the runtime's epoll and wake-up descriptors, the admin listener's connections (up
/// to 64), API server connections, the store's and log's files.
pub const FIXED_DESCRIPTORS: u64 = 128;
/// Descriptors each volume holds open (its directory, twice: see `state::Volume`).
pub const VOLUME_DESCRIPTORS: u64 = 2;
/// Descriptors a cached object can hold: its `O_PATH` handle, and read and write opens.
const CACHED_OBJECT_DESCRIPTORS: u64 = 3;

/// How the open-file limit is shared (see [`share_descriptors`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptors {
    /// Most connections served at once.
    pub connections: usize,
    /// Most objects kept open in the handle cache.
    pub cached_objects: usize,
}

/// Shares `limit` open files (RLIMIT_NOFILE, soft) between what the agent holds anyway
/// ([`FIXED_DESCRIPTORS`], and `volumes` × [`VOLUME_DESCRIPTORS`]), and then of what is
/// left: a quarter for connections, a quarter for the handle cache, and half for the
/// calls running (each blocking-pool thread's splice pipe, two descriptors, and the
/// files a call opens). Each part is at most what was asked for, and at least one
/// connection and a few cached objects (a limit that low is logged as an error where
/// it is read).
pub fn share_descriptors(
    limit: u64,
    volumes: usize,
    connections: usize,
    cached_objects: usize,
) -> Descriptors {
    let held = FIXED_DESCRIPTORS.saturating_add(VOLUME_DESCRIPTORS.saturating_mul(volumes as u64));
    let quarter = limit.saturating_sub(held) / 4;
    let fit = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    Descriptors {
        connections: connections.min(fit(quarter)).max(1),
        cached_objects: cached_objects
            .min(fit(quarter / CACHED_OBJECT_DESCRIPTORS))
            .max(8),
    }
}

/// How long a charge waits for the budget before it makes room by dropping the
/// connection stalled longest.
const PRESSURE_WAIT: Duration = Duration::from_millis(50);
/// A record younger than this is still arriving, a reply younger than this still
/// leaving: never dropped for room.
const STALLED_AFTER: Duration = Duration::from_secs(2);

/// Connections waited on, oldest first: since when, and how to drop each one (by
/// cancelling its token). Dropping the oldest under pressure is what knfsd does when it
/// runs out of connections (`svc_check_conn_limits`): a client holding a resource
/// without using it cannot starve those that do.
#[derive(Debug, Clone, Default)]
pub struct Waits(Arc<WaitsInner>);

#[derive(Debug, Default)]
struct WaitsInner {
    map: Mutex<BTreeMap<WaitKey, CancellationToken>>,
    next_id: AtomicU64,
}

type WaitKey = (Instant, u64);

impl Waits {
    /// Registers a wait on connection `conn` until the guard drops.
    pub fn start(&self, conn: &CancellationToken) -> Waiting {
        let key = (
            Instant::now(),
            self.0.next_id.fetch_add(1, Ordering::Relaxed),
        );
        self.lock().insert(key, conn.clone());
        Waiting {
            waits: self.clone(),
            key,
        }
    }

    /// Drops the connection waited on longest, if for at least `min_age`, other than
    /// `except`. Returns whether one was dropped.
    pub fn drop_oldest(&self, min_age: Duration, except: Option<&Waiting>) -> bool {
        let mut map = self.lock();
        let now = Instant::now();
        let victim = map
            .keys()
            .find(|k| Some(**k) != except.map(|w| w.key))
            .filter(|(since, _)| now.duration_since(*since) >= min_age)
            .copied();
        match victim.and_then(|k| map.remove(&k)) {
            Some(conn) => {
                conn.cancel();
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<WaitKey, CancellationToken>> {
        self.0.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A registered wait; ends when dropped.
#[derive(Debug)]
pub struct Waiting {
    waits: Waits,
    key: WaitKey,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.waits.lock().remove(&self.key);
    }
}

/// The server-wide byte budget.
#[derive(Debug, Clone)]
pub struct Budget {
    bytes: Arc<Semaphore>,
    /// What the semaphore started with.
    limit: usize,
    /// Records being read and replies being written: waits on clients that hold
    /// budget.
    stalls: Waits,
}

impl Budget {
    pub fn new(bytes: usize) -> Budget {
        let limit = bytes.min(Semaphore::MAX_PERMITS);
        Budget {
            bytes: Arc::new(Semaphore::new(limit)),
            limit,
            stalls: Waits::default(),
        }
    }

    /// Bytes not charged to anyone right now.
    #[cfg(test)]
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// Bytes charged right now (for the metrics).
    pub fn held(&self) -> usize {
        self.limit.saturating_sub(self.bytes.available_permits())
    }

    /// The whole budget.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// An empty charge, for bytes that are no record's (a socket's unsent replies).
    pub fn empty(&self) -> Charge {
        Charge {
            budget: self.clone(),
            held: None,
            bytes: 0,
            partial: None,
        }
    }

    /// An empty charge for a record whose first byte has just arrived. Until
    /// [`Charge::complete`], the record counts as a wait on the client (see
    /// [`Budget::waiting`]).
    pub fn charge(&self, conn: &CancellationToken) -> Charge {
        Charge {
            budget: self.clone(),
            held: None,
            bytes: 0,
            partial: Some(self.waiting(conn)),
        }
    }

    /// Marks a wait on the client of connection `conn` (the rest of a record, or room
    /// in its socket for a reply) until the guard drops. While others wait for room in
    /// the budget, the connection waited on longest (past [`STALLED_AFTER`]) is dropped.
    pub fn waiting(&self, conn: &CancellationToken) -> Waiting {
        self.stalls.start(conn)
    }
}

/// Bytes one call holds of the budget; returned on drop.
#[derive(Debug)]
pub struct Charge {
    budget: Budget,
    held: Option<OwnedSemaphorePermit>,
    bytes: usize,
    /// The record is still arriving.
    partial: Option<Waiting>,
}

impl Charge {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The record is whole: no longer a wait on the client.
    pub fn complete(&mut self) {
        self.partial = None;
    }

    /// Moves up to `bytes` of this charge into `to` (same budget), without waiting;
    /// returns how many moved.
    pub fn move_into(&mut self, bytes: usize, to: &mut Charge) -> usize {
        let n = bytes.min(self.bytes);
        if n == 0 {
            return 0;
        }
        let Some(part) = self.held.as_mut().and_then(|p| p.split(n)) else {
            return 0;
        };
        self.bytes -= n;
        match &mut to.held {
            Some(p) => p.merge(part),
            None => to.held = Some(part),
        }
        to.bytes += n;
        n
    }

    /// Returns all but `bytes` of this charge to the budget.
    pub fn keep(&mut self, bytes: usize) {
        if bytes >= self.bytes {
            return;
        }
        if let Some(p) = self.held.as_mut() {
            drop(p.split(self.bytes - bytes));
        }
        self.bytes = bytes;
        if bytes == 0 {
            self.held = None;
        }
    }

    /// Holds at least `bytes` in total, waiting for the budget to have them; while it
    /// waits, the connection stalled longest is dropped to make room.
    pub async fn at_least(&mut self, bytes: usize) -> std::io::Result<()> {
        let more = bytes.saturating_sub(self.bytes);
        if more == 0 {
            return Ok(());
        }
        let n = u32::try_from(more).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let sem = &self.budget.bytes;
        let permit = loop {
            // The common case, room at once, costs no timer.
            if let Ok(p) = sem.clone().try_acquire_many_owned(n) {
                break p;
            }
            match tokio::time::timeout(PRESSURE_WAIT, sem.clone().acquire_many_owned(n)).await {
                Ok(Ok(p)) => break p,
                Ok(Err(_)) => return Err(std::io::ErrorKind::BrokenPipe.into()),
                Err(_) => {
                    if self
                        .budget
                        .stalls
                        .drop_oldest(STALLED_AFTER, self.partial.as_ref())
                    {
                        tracing::info!("dropped the connection stalled longest to make room");
                    }
                }
            }
        };
        match &mut self.held {
            Some(p) => p.merge(permit),
            None => self.held = Some(permit),
        }
        self.bytes = bytes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn charges_come_back_when_dropped_and_wait_when_spent() {
        let budget = Budget::new(100);
        let mut a = budget.charge(&CancellationToken::new());
        a.at_least(60).await.expect("fits");
        a.at_least(30).await.expect("already held");
        assert_eq!((a.bytes(), budget.available()), (60, 40));
        let mut b = budget.charge(&CancellationToken::new());
        let waiting = tokio::time::timeout(Duration::from_millis(50), b.at_least(50)).await;
        assert!(waiting.is_err(), "over budget must wait");
        drop(a);
        b.at_least(50).await.expect("fits once a is gone");
        assert_eq!(budget.available(), 50);
    }

    #[tokio::test]
    async fn a_stalled_record_is_dropped_for_one_that_needs_room() {
        let budget = Budget::new(100);
        let stalled_conn = CancellationToken::new();
        let mut stalled = budget.charge(&stalled_conn);
        stalled.at_least(100).await.expect("fits");
        let fresh_conn = CancellationToken::new();
        let mut fresh = budget.charge(&fresh_conn);
        // Too young to be called stalled: the newcomer waits.
        let early = tokio::time::timeout(Duration::from_millis(300), fresh.at_least(10)).await;
        assert!(early.is_err() && !stalled_conn.is_cancelled());
        tokio::time::sleep(STALLED_AFTER).await;
        let waiting = tokio::spawn(async move {
            fresh.at_least(10).await.expect("room made");
            fresh
        });
        stalled_conn.cancelled().await; // the stalled connection is told to go...
        drop(stalled); // ...and its bytes come back as it closes
        let mut fresh = waiting.await.expect("task");
        fresh.complete();
        assert!(!fresh_conn.is_cancelled());
    }

    #[tokio::test]
    async fn charges_move_between_holders_and_shrink_without_waiting() {
        let budget = Budget::new(100);
        let mut reply = budget.charge(&CancellationToken::new());
        reply.at_least(60).await.expect("fits");
        let mut socket = budget.empty();
        assert_eq!(reply.move_into(25, &mut socket), 25);
        assert_eq!((reply.bytes(), socket.bytes()), (35, 25));
        drop(reply);
        assert_eq!(budget.available(), 75, "what moved stays charged");
        socket.keep(10);
        assert_eq!((socket.bytes(), budget.available()), (10, 90));
        socket.keep(0);
        assert_eq!(budget.available(), 100);
    }

    #[test]
    fn descriptors_are_shared_so_connections_cannot_take_the_calls_ones() {
        // (open-file limit, volumes, connections asked, cache asked) -> shares
        let cases = [
            // systemd's and containerd 2's hard limit: everything asked for fits.
            ((524_288, 10, 1024, 1024), (1024, 1024)),
            // A hard limit of 1,024: connections get a quarter of what is left.
            ((1024, 0, 1024, 1024), (224, 74)),
            // Volumes' own descriptors come off first.
            ((1024, 100, 1024, 1024), (174, 58)),
            ((256, 0, 1024, 1024), (32, 10)),
            // Below what the agent holds anyway: one connection, a few objects.
            ((64, 0, 1024, 1024), (1, 8)),
        ];
        for ((limit, volumes, conns, cache), (want_conns, want_cache)) in cases {
            assert_eq!(
                share_descriptors(limit, volumes, conns, cache),
                Descriptors {
                    connections: want_conns,
                    cached_objects: want_cache
                },
                "limit {limit}, {volumes} volumes"
            );
        }
    }
}
