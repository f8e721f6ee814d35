//! The sending side of one connection: replies leave as they finish, small ones
//! coalesced into one write by the connection's writer task. Large READs are the
//! exception: the thread that ran the call splices the data from the page cache
//! straight into the socket (see `splice`), under the same send lock the writer task
//! takes, so records never interleave. A thread that finds the lock taken for more than
//! a few milliseconds hands its reply to the writer task instead of waiting, and a
//! thread whose client does not take its reply within [`THREAD_SEND_WAIT`] hands the
//! rest of it, with the send lock, to a task that finishes it: a blocking-pool thread
//! never waits on a client for longer than those two waits, so clients that stop
//! reading cannot take the workers every other client's calls need; a task waits on
//! the client, for at most the send timeout from the reply's first byte.
//!
//! A reply holds its call slot and its budget charge until it has left. What the kernel
//! still holds of it in the socket (unacknowledged by the client, measured with
//! `SIOCOUTQ` after each write, then again as it drains) stays charged, moved to the
//! connection's own charge: the socket's send buffer is bounded ([`SEND_BUFFER`]), so a
//! client that does not read its replies holds at most one send buffer, counted in the
//! budget, and stalls only itself; once it has taken nothing for a while it is the one
//! dropped when others need room (see `limits`). A connection that ends with replies
//! still unsent gives its client the send timeout to take them, then is reset, which
//! frees the kernel's copy at once.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Mutex, Notify, OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

use super::limits::{Budget, Charge, Limits, Waiting};
use super::splice::{self, Piped, Sent};

/// Replies gathered into one socket write at most.
const COALESCE_BYTES: usize = 256 * 1024;
/// Replies larger than this are written on their own rather than copied into a batch.
const SMALL_REPLY: usize = 16 * 1024;
/// How long a blocking thread waits for another writer to free the socket before it
/// hands its reply to the writer task: several 1 MiB sends to a client that reads.
const LOCK_WAIT: Duration = Duration::from_millis(5);
/// How long a blocking thread waits for its client to take a reply it writes itself
/// before it hands the rest to a task (copied out of its pipe): long enough for a client
/// that reads to take a 1 MiB READ on a gigabit link, short enough that clients that
/// stop reading, one thread each, hold the pool's [`super::pool::WORKERS`] only briefly.
const THREAD_SEND_WAIT: Duration = Duration::from_millis(10);
/// Kernel send buffer asked for each connection (Linux doubles it; `net.core.wmem_max`
/// caps it): room for a good part of a 1 MiB READ reply, so a client that reads keeps
/// the data moving, while one that does not pins at most this much (charged, see the
/// module doc) instead of the megabytes send autotuning would let it reach.
pub(super) const SEND_BUFFER: usize = 256 * 1024;
/// Kernel receive buffer asked for each connection (doubled likewise): calls waiting
/// while the server does not read (the budget or the connection's call slots are
/// full) sit here, a fixed cost per connection outside the budget, like the read
/// buffer.
pub(super) const RECEIVE_BUFFER: usize = 128 * 1024;
/// A connection with unsent bytes charged measures its socket again this long after a
/// write, doubling up to [`UNSENT_POLL_MAX`] while the client takes nothing.
const UNSENT_POLL_MIN: Duration = Duration::from_millis(1);
/// Unsent bytes below this are charged but not watched (no stall clock, no polling):
/// right after a write, loopback and LAN sockets nearly always hold the reply until the
/// client's ACK, and a timer per reply cost LOOKUP a third of its speed at depth 1
/// (measured: p50 41 → 55-85 µs). A client that stops reading holds at most this much
/// unwatched, still charged, until its next reply or its connection's end.
const WATCHED_UNSENT: usize = SMALL_REPLY;
const UNSENT_POLL_MAX: Duration = Duration::from_millis(250);

/// A reply waiting for the writer task, with the call slot and budget it holds until
/// it has left.
pub(super) struct Queued {
    pub(super) bytes: Vec<u8>,
    pub(super) held: (OwnedSemaphorePermit, Charge),
}

/// The socket's write half, and what its unsent bytes hold of the budget.
struct Sink {
    wr: OwnedWriteHalf,
    /// Bytes written but not yet taken by the client (the kernel still holds them).
    unsent: Charge,
    /// Registered while `unsent` holds bytes, anew whenever the client takes some:
    /// while others wait for room, the connection whose client has taken nothing for
    /// longest is dropped (see `limits`).
    stalled: Option<Waiting>,
    /// The writer task is measuring the socket as it drains (it alone sets this false,
    /// once nothing is unsent): a blocking-pool thread, or a task finishing a reply one
    /// began, that leaves bytes unsent wakes it only when it is not, so a spliced READ
    /// costs no wake-up in the common case.
    watched: bool,
}

/// The sending side of one connection, shared by its writer task and the blocking
/// threads that write their own replies.
pub(super) struct Outbox {
    /// The send lock: whoever holds it writes whole records (shared: a reply's sender
    /// may hand it to a task that finishes the reply).
    sink: Arc<Mutex<Sink>>,
    /// A blocking-pool thread (or a task finishing its reply) left bytes unsent: the
    /// writer task watches them drain.
    written: Notify,
    /// Cancelled when the budget drops this connection to make room.
    pub(super) dropped: CancellationToken,
    budget: Budget,
    limits: Limits,
    peer: SocketAddr,
}

/// Gives `reply` to the writer task. At most MAX_IN_FLIGHT replies exist (each holds a
/// call slot), the channel's capacity: this never waits.
pub(super) fn queue(tx: &mpsc::Sender<Queued>, reply: Queued) {
    let _ = tx.try_send(reply);
}

impl Outbox {
    /// The sending side of the connection to `peer`, writing to `wr`.
    pub(super) fn new(
        wr: OwnedWriteHalf,
        budget: Budget,
        limits: Limits,
        peer: SocketAddr,
    ) -> Outbox {
        Outbox {
            sink: Arc::new(Mutex::new(Sink {
                wr,
                unsent: budget.empty(),
                stalled: None,
                watched: false,
            })),
            written: Notify::new(),
            dropped: CancellationToken::new(),
            budget,
            limits,
            peer,
        }
    }

    /// From a blocking-pool thread: writes `reply` itself once the socket is free,
    /// else, if another writer keeps it longer than [`LOCK_WAIT`] (its client is slow
    /// or has stopped reading), hands it to the writer task. Waiting a little first
    /// keeps spliced READs zero-copy when several finish together; handing off copies
    /// the data out of the pipe. If the client takes less than the whole reply within
    /// [`THREAD_SEND_WAIT`], the rest goes to a task that keeps the send lock until it
    /// has written it: the thread returns to the pool.
    pub(super) fn send_or_hand_off(
        self: &Arc<Self>,
        reply: Reply,
        tx: &mpsc::Sender<Queued>,
        mut held: (OwnedSemaphorePermit, Charge),
    ) {
        // Called from a blocking-pool thread only (it has the runtime's context and may
        // block on it); if the runtime is shutting down the timer is gone and the
        // thread's task ends with a panic, which tokio contains in the task.
        // Parked until the holder lets go (woken by it, in turn), not polled: the holder
        // is often the previous call's thread, preempted just after its send by the
        // client it woke, and a sleep here would cost a timer tick each time.
        let wr = self.sink.clone().try_lock_owned().ok().or_else(|| {
            tokio::runtime::Handle::current()
                .block_on(tokio::time::timeout(
                    LOCK_WAIT,
                    self.sink.clone().lock_owned(),
                ))
                .ok()
        });
        let Some(mut sink) = wr else {
            match reply.into_bytes() {
                Ok(bytes) => queue(tx, Queued { bytes, held }),
                Err(e) => {
                    tracing::debug!(peer = %self.peer, errno = e.0, "reply lost: pipe read failed");
                }
            }
            return;
        };
        // Written from this thread: no hand-off to the writer task, no wake-up.
        let sock = sink.wr.as_ref().as_raw_fd();
        let waiting = self.budget.waiting(&self.dropped);
        let first = Instant::now();
        match reply.send(sock, first + THREAD_SEND_WAIT.min(self.limits.send_timeout)) {
            Ok(Sent::All) => {}
            Ok(Sent::Rest(rest)) => {
                drop(waiting);
                let out = self.clone();
                let deadline = tokio::time::Instant::from_std(first + self.limits.send_timeout);
                tokio::runtime::Handle::current().spawn(async move {
                    // Cut on failure, like a thread's failed send below.
                    out.write_by(&mut sink.wr, &rest, deadline).await;
                    out.settle_written(&mut sink, &mut held.1);
                });
                return;
            }
            Err(e) => {
                tracing::info!(peer = %self.peer, errno = e.0, "closing connection: reply could not be sent");
                splice::abort(sock);
            }
        }
        drop(waiting);
        self.settle_written(&mut sink, &mut held.1);
    }

    /// Settles a reply written by a thread or a task of its own (not the writer task),
    /// and has the writer task watch the socket drain if bytes are left in it.
    fn settle_written(&self, sink: &mut Sink, charge: &mut Charge) {
        if self.settle(sink, std::iter::once(charge)) && !sink.watched {
            sink.watched = true;
            self.written.notify_one();
        }
    }

    /// Writes `bytes` within the send timeout; false (and the connection cut) if not.
    async fn write(&self, wr: &mut OwnedWriteHalf, bytes: &[u8]) -> bool {
        let deadline = tokio::time::Instant::now() + self.limits.send_timeout;
        self.write_by(wr, bytes, deadline).await
    }

    /// Writes `bytes` by `deadline`; false (and the connection cut) if not.
    async fn write_by(
        &self,
        wr: &mut OwnedWriteHalf,
        bytes: &[u8],
        deadline: tokio::time::Instant,
    ) -> bool {
        if bytes.is_empty() {
            return true;
        }
        let _waiting = self.budget.waiting(&self.dropped);
        let sent = tokio::select! {
            r = tokio::time::timeout_at(deadline, wr.write_all(bytes)) => r,
            // Dropped for room: cut now, whether or not the connection's reader is
            // still there to do it (a client that half-closed and stopped reading).
            () = self.dropped.cancelled() => {
                tracing::info!(peer = %self.peer, "closing connection: dropped to make room");
                Ok(Err(std::io::ErrorKind::ConnectionAborted.into()))
            }
        };
        if !matches!(sent, Ok(Ok(()))) {
            if sent.is_err() {
                tracing::info!(peer = %self.peer, timeout = ?self.limits.send_timeout, "closing connection: client stopped reading");
            }
            splice::abort(wr.as_ref().as_raw_fd());
            return false;
        }
        true
    }

    /// Charges the connection exactly what the kernel still holds of its replies
    /// (`SIOCOUTQ`): what grew is moved from `sent`, the charges of the replies just
    /// written (never waiting for the budget: those bytes were charged already), what
    /// the client took goes back to the budget. Returns whether bytes are still held.
    fn settle<'a>(&self, sink: &mut Sink, sent: impl IntoIterator<Item = &'a mut Charge>) -> bool {
        let held = sink.unsent.bytes();
        // A socket that cannot be asked is closing: nothing of it is worth keeping.
        let queued = splice::unsent(sink.wr.as_ref().as_raw_fd()).unwrap_or(0);
        let mut grow = queued.saturating_sub(held);
        for charge in sent {
            if grow == 0 {
                break;
            }
            grow -= charge.move_into(grow, &mut sink.unsent);
        }
        sink.unsent.keep(queued);
        if sink.unsent.bytes() < WATCHED_UNSENT {
            sink.stalled = None;
            return false;
        }
        if queued < held || sink.stalled.is_none() {
            // The client took something (or this is the first wait): its stall starts now.
            sink.stalled = Some(self.budget.waiting(&self.dropped));
        }
        true
    }
}

/// The next wait before measuring the socket again: `None` once nothing is unsent.
fn next_poll(still_unsent: bool, last: Option<Duration>) -> Option<Duration> {
    still_unsent.then(|| last.map_or(UNSENT_POLL_MIN, |p| (p * 2).min(UNSENT_POLL_MAX)))
}

/// The writer task: small replies that finished together leave in one write (fewer
/// syscalls under load); large ones are written as they are, never copied again. While
/// the socket holds unsent bytes it measures them again now and then, so the budget
/// gets them back as the client reads (see [`Outbox::settle`]).
pub(super) async fn write_replies(mut rx: mpsc::Receiver<Queued>, out: Arc<Outbox>) {
    let mut batch = Vec::new();
    let mut sent: Vec<Queued> = Vec::new();
    let mut poll: Option<Duration> = None;
    'replies: loop {
        let first = tokio::select! {
            r = rx.recv() => match r {
                Some(q) => q,
                None => break,
            },
            () = out.written.notified() => {
                poll = Some(UNSENT_POLL_MIN);
                continue;
            }
            () = tokio::time::sleep(poll.unwrap_or_default()), if poll.is_some() => {
                // Busy: the thread or task sending now settles when it is done; look
                // again later, backing off as while the client takes nothing.
                match out.sink.try_lock() {
                    Ok(mut sink) => {
                        poll = next_poll(out.settle(&mut sink, std::iter::empty()), poll);
                        sink.watched = poll.is_some();
                    }
                    Err(_) => poll = next_poll(true, poll),
                }
                continue;
            }
        };
        let mut sink = out.sink.lock().await;
        let mut next = Some(first);
        while let Some(mut reply) = next.take() {
            if reply.bytes.len() > SMALL_REPLY {
                if !out.write(&mut sink.wr, &batch).await {
                    break 'replies;
                }
                out.settle(&mut sink, sent.iter_mut().map(|q| &mut q.held.1));
                batch.clear();
                sent.clear();
                if !out.write(&mut sink.wr, &reply.bytes).await {
                    break 'replies;
                }
                out.settle(&mut sink, std::iter::once(&mut reply.held.1));
            } else {
                batch.extend_from_slice(&reply.bytes);
                sent.push(reply);
            }
            if batch.len() < COALESCE_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if !out.write(&mut sink.wr, &batch).await {
            break;
        }
        let unsent = out.settle(&mut sink, sent.iter_mut().map(|q| &mut q.held.1));
        poll = next_poll(unsent, None);
        sink.watched = poll.is_some();
        batch.clear();
        // Their slots and the rest of their budget come back now that they have left.
        sent.clear();
    }
    // The last replies: the client gets as long as the send timeout to take them, then
    // the connection is reset (which frees the kernel's copy at once).
    let mut sink = out.sink.lock().await;
    let deadline = Instant::now() + out.limits.send_timeout;
    let mut wait = None;
    while let Some(w) = next_poll(out.settle(&mut sink, std::iter::empty()), wait) {
        if Instant::now() >= deadline || out.dropped.is_cancelled() {
            splice::abort(sink.wr.as_ref().as_raw_fd());
            break;
        }
        tokio::time::sleep(w).await;
        wait = Some(w);
    }
    let _ = sink.wr.shutdown().await;
}

/// A framed reply: `head` (record mark included), then, for a spliced READ, its data
/// waiting in this thread's pipe (padded when sent).
pub struct Reply {
    pub head: Vec<u8>,
    pub data: Option<Piped>,
}

impl Reply {
    /// Writes the record to the non-blocking socket `sock`, waiting for room until
    /// `patience`; call from a blocking-pool thread holding the send lock, and keep it
    /// until any [`Sent::Rest`] is written. On error the stream may be cut mid-record:
    /// close the connection.
    fn send(self, sock: std::os::fd::RawFd, patience: Instant) -> Result<Sent, super::sys::Errno> {
        match self.data {
            Some(data) => {
                let pad = data.pad();
                data.send(sock, &self.head, pad, patience)
            }
            None => splice::send_bytes(sock, &self.head, patience),
        }
    }

    /// The whole record as bytes (spliced data copied out of the pipe), for a writer
    /// on another thread.
    fn into_bytes(self) -> Result<Vec<u8>, super::sys::Errno> {
        let mut out = self.head;
        if let Some(data) = self.data {
            let pad = data.pad();
            data.append_to(&mut out)?;
            out.extend_from_slice(pad);
        }
        Ok(out)
    }
}
