//! One TCP connection: read records, run each call on the blocking pool (file system
//! calls block) except attribute-only calls, which take microseconds and run on the
//! connection task (the procedure table, `table`, says which, and how large each
//! call's reply can get). Calls bound for the pool, and read and write calls, are
//! first routed to their volume (`qos`): a call over its volume's ceiling waits on a
//! timer task (not this one, which keeps reading), and pool calls join the fair queue
//! (`pool`) rather than taking a thread each; each takes room among its volume's
//! calls first (`qos::ROOM_KIB`), and without room this connection stops reading, or,
//! if it carries other volumes' calls too, goes on past the room or answers
//! NFS3ERR_JUKEBOX (`qos::when_full`). Replies leave as they finish (how, and what they hold meanwhile,
//! is `send`). Clients keep many calls in flight on one connection, so replies may
//! leave out of order; the XID pairs them up.
//!
//! Bounds (see `limits`): [`MAX_RECORD`] per record and [`MAX_IN_FLIGHT`] calls per
//! connection (reading pauses beyond that), plus [`MAX_PARKED`] waiting for their
//! volumes' ceilings; every byte of a record and the largest
//! reply its call can produce are charged to the server-wide budget until the reply
//! has left. No wait on the client is unbounded: the next record's first byte
//! (idle timeout, while nothing is in flight), the rest of a record (record timeout),
//! a reply's way out (send timeout; then the connection is dropped). Each socket's
//! kernel buffers are bounded (`send::SEND_BUFFER`, `send::RECEIVE_BUFFER`), and what a
//! written reply still occupies in the send buffer stays charged to the budget until
//! the client has taken it (see `send`). On shutdown the connection stops reading, finishes the calls it
//! has and sends their replies, then closes; past the drain deadline it is cut.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nfs3_types::nfs3::nfsstat3;
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::buffers::BufferPool;
use super::call::{Runner, count, insecure_reply, refusal, respond};
use super::limits::{Budget, Charge, Limits, Waits};
use super::pool::{self, Pool};
use super::qos::{self, Full};
use super::rpc::{self, MAX_RECORD};
use super::send::{Outbox, Queued, RECEIVE_BUFFER, SEND_BUFFER, queue, write_replies};
use super::splice;
use super::state::Exports;
use super::stats;
use super::table;

pub const MAX_IN_FLIGHT: usize = 64;

/// Calls of one connection that may wait for their volumes' ceilings at once, beside
/// [`MAX_IN_FLIGHT`] running. Their bytes are charged to the budget like any call's,
/// and each volume's waiting calls are bounded too (`qos::PARKED_KIB`).
pub const MAX_PARKED: usize = 1024;

/// Each connection reads through a buffer this large, so a small call (every call but
/// WRITE) arrives in one `recv` rather than three (record mark, its rest, the body).
/// It sits outside the byte budget: a fixed cost per connection, like its socket's.
const READ_BUFFER: usize = 1024;

/// What every connection of one server shares.
pub struct Shared {
    pub exports: Arc<Exports>,
    pub buffers: BufferPool,
    pub budget: Budget,
    pub limits: Limits,
    /// Connections with nothing in flight, waiting for their client's next call.
    pub idle: Waits,
    /// Connections being served.
    pub connections: AtomicUsize,
    /// The blocking pool's fair queue (see `pool`).
    pub pool: Arc<Pool>,
    /// Cancelled when the drain deadline has passed after shutdown: connections still
    /// sending are cut.
    pub abort: CancellationToken,
}

/// Serves one connection until the peer closes it, it breaks the protocol, it idles
/// or stalls past a limit, or `shutdown` fires.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    // RFC 1813 leaves client authentication to the RPC layer; AUTH_SYS ids mean
    // something only if an unprivileged process on the client cannot send them, which
    // is what a source port below 1024 attests (knfsd's `secure`, the default).
    let secure = !shared.limits.require_reserved_port || peer.port() < 1024;
    if !secure {
        tracing::warn!(%peer, "calls refused: source port is not reserved (see --insecure-ports)");
    }
    let limits = shared.limits;
    let fd = stream.as_raw_fd();
    splice::bound_buffers(fd, SEND_BUFFER, RECEIVE_BUFFER);
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let (tx, rx) = mpsc::channel::<Queued>(MAX_IN_FLIGHT);
    let out = Arc::new(Outbox::new(wr, shared.budget.clone(), limits, peer));
    let mut writer = tokio::spawn(write_replies(rx, out.clone()));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let parked = Arc::new(Semaphore::new(MAX_PARKED));
    // The last free connection slot was just taken: close the connection idle longest
    // so the next client is not left in the backlog until someone's idle timeout
    // (knfsd does the same when it runs out of connections).
    let _counted = Counted::new(&shared.connections);
    if shared.connections.load(Ordering::Relaxed) >= limits.max_connections
        && shared.idle.drop_oldest(Duration::ZERO, None)
    {
        tracing::info!("connection limit reached: closed the connection idle longest");
    }
    // Cancelled when the connection ends other than by shutdown (the client left, broke
    // the protocol, or was dropped for room): calls still waiting for a ceiling are
    // then dropped unanswered, with their bytes and slots, rather than run minutes
    // later for a client that is gone (and may have rewritten the same range since).
    let gone = CancellationToken::new();
    // The first volume this connection carried calls of, and whether it has carried
    // another's since (then it never waits for one volume's room: see `qos::Full`).
    let mut carried = None;
    let mut mixed = false;
    let stop = || async {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = out.dropped.cancelled() => {}
        }
    };
    loop {
        let slot = tokio::select! {
            _ = stop() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let next = tokio::select! {
            _ = stop() => break,
            next = next_record(&mut rd, (&slots, &parked), limits, &shared.idle, &out.dropped) => next,
        };
        let first = match next {
            Ok(b) => b,
            Err(why) => {
                tracing::debug!(%peer, why, "closing connection");
                break;
            }
        };
        let mut buf = shared.buffers.take();
        let mut charge = shared.budget.charge(&out.dropped);
        let read = tokio::select! {
            _ = stop() => break,
            r = tokio::time::timeout(
                limits.record_timeout,
                rpc::read_record(&mut rd, first, &mut buf, MAX_RECORD, &mut charge),
            ) => r,
        };
        // A call's latency counts from here: waiting for the budget and for a thread is
        // part of it.
        let received = Instant::now();
        match read {
            Ok(Ok(())) => charge.complete(),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "closing connection");
                break;
            }
            Err(_) => {
                tracing::info!(%peer, timeout = ?limits.record_timeout, "closing connection: record not completed in time");
                break;
            }
        }
        let record = buf;
        if secure {
            // The reply's worst case is the client's to wait for, not the server's to
            // find room for after the fact.
            let want = record.len() + table::reply_bound(&record);
            let charged = tokio::select! {
                _ = stop() => break,
                r = charge.at_least(want) => r,
            };
            if charged.is_err() {
                break;
            }
        }
        let client = peer.ip();
        let direction = table::direction(&record);
        let run_inline = |record: &[u8], known: Option<&qos::Known>| {
            respond(
                &shared.exports,
                client,
                record,
                known,
                Runner::AsyncTask,
                received,
            )
            .ok()
            .map(|reply| reply.map(|r| r.head))
        };
        // Answered on this task: refusals, and calls that take microseconds when they
        // need no disk (handing them to the blocking pool, a thread wake-up each, would
        // cost more than running them; never spliced here: the reply is all in `head`).
        // Attribute-only calls answered here count against no ceiling and skip the
        // fair queue (they wait for nothing), so they are not even routed.
        let mut route = None;
        let mut room = None;
        let here = if !secure {
            let reply = insecure_reply(&record);
            if let Some(r) = &reply {
                count(&shared.exports, stats::slot_of_record(&record), r, received);
            }
            Some(reply)
        } else if direction.is_none() && table::try_inline(&record) {
            run_inline(&record, None)
        } else {
            let mut r = qos::route(&shared.exports, client, &record, direction);
            match (carried, r.volume.as_ref().map(|v| v.meta.id)) {
                (None, Some(key)) => carried = Some(key),
                (Some(first), Some(key)) if first != key => mixed = true,
                _ => {}
            }
            let wait = r.admit();
            if !wait.is_zero() {
                // The ceiling reserved this call's turn from now: waiting below for
                // room must count toward it, or every call that queues for room is
                // delayed twice and the volume runs below its ceiling.
                let turn = tokio::time::Instant::now() + wait;
                // Over a ceiling: the call waits on a timer, holding no worker and not
                // this connection's reading (other volumes' calls may share it), then
                // joins the fair queue.
                let room = match &r.volume {
                    Some(v) => {
                        let kib = r.parked_kib(record.len());
                        // Never `alone` here: parked calls give back their slots, so a
                        // connection of parked calls would look idle.
                        match room_for(&v.qos.parked, kib, (mixed, false), &shared.budget, stop())
                            .await
                        {
                            Roomed::Took(p) => p,
                            Roomed::Stopped => break,
                            Roomed::Refused => {
                                refuse(&shared, &tx, record, received, (slot, charge));
                                continue;
                            }
                        }
                    }
                    None => None,
                };
                // It gives its call slot back for one of the connection's parked
                // slots: a kernel client sends every volume of this server down one
                // connection, and a throttled volume's waiting calls must not use up
                // the slots its neighbours' calls need.
                let parked_slot = tokio::select! {
                    _ = stop() => break,
                    p = parked.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                drop(slot);
                let held = (parked_slot, charge);
                let job = pool_job(
                    &shared, &out, &tx, client, record, received, held, None, &mut r,
                );
                let (pool, shutdown, gone) = (shared.pool.clone(), shutdown.clone(), gone.clone());
                tokio::spawn(async move {
                    // After shutdown, draining beats a ceiling: the reply goes now.
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => {}
                        _ = gone.cancelled() => return,
                        _ = tokio::time::sleep_until(turn) => {}
                    }
                    drop(room);
                    pool.submit(r.ticket(), job);
                });
                continue;
            }
            // Room in its volume's queue (`qos::ROOM_KIB`), held until it has run.
            if let Some(v) = &r.volume {
                let kib = r.room_kib(record.len());
                // This call holds one slot: no other in flight on this connection.
                let alone = slots.available_permits() + 1 >= MAX_IN_FLIGHT;
                match room_for(&v.qos.room, kib, (mixed, alone), &shared.budget, stop()).await {
                    Roomed::Took(p) => room = p,
                    Roomed::Stopped => break,
                    Roomed::Refused => {
                        refuse(&shared, &tx, record, received, (slot, charge));
                        continue;
                    }
                }
            }
            let here = if table::try_inline(&record) {
                run_inline(&record, r.known.as_ref())
            } else {
                None
            };
            route = Some(r);
            here
        };
        if let Some(head) = here {
            drop(room);
            shared.buffers.give(record);
            if let Some(bytes) = head {
                queue(
                    &tx,
                    Queued {
                        bytes,
                        held: (slot, charge),
                    },
                );
                // The writer task sends it now, before this task looks for the next
                // record (a `recv` that, one call at a time, finds nothing).
                tokio::task::yield_now().await;
            }
            continue;
        }
        let mut r = match route {
            Some(r) => r,
            None => qos::route(&shared.exports, client, &record, direction),
        };
        let job = pool_job(
            &shared,
            &out,
            &tx,
            client,
            record,
            received,
            (slot, charge),
            room,
            &mut r,
        );
        shared.pool.submit(r.ticket(), job);
    }
    if !shutdown.is_cancelled() {
        gone.cancel();
    }
    if out.dropped.is_cancelled() {
        // Dropped for room: whatever waits on this client (the writer task, a task
        // finishing a reply a thread began) fails now instead of at its timeout,
        // giving its bytes back.
        splice::abort(fd);
    }
    // Replies of calls still running go out before the socket closes. The writer
    // ends when every sender is gone: this task's, and those of calls still running;
    // or, after shutdown, when the drain deadline cuts the connection.
    drop(tx);
    tokio::select! {
        _ = &mut writer => {}
        () = shared.abort.cancelled() => {
            tracing::info!(%peer, "closing connection: drain deadline passed");
            splice::abort(fd);
            writer.abort();
            let _ = writer.await;
        }
    }
}

/// The blocking-pool run of the call in `record`: its reply goes out through `out`
/// (or the writer task), releasing `held` once sent; the time it waited for a worker
/// counts against its volume.
#[expect(
    clippy::too_many_arguments,
    reason = "one call's whole context, used once"
)]
fn pool_job(
    shared: &Arc<Shared>,
    out: &Arc<Outbox>,
    tx: &mpsc::Sender<Queued>,
    client: std::net::IpAddr,
    record: Vec<u8>,
    received: Instant,
    held: (OwnedSemaphorePermit, Charge),
    room: Option<OwnedSemaphorePermit>,
    route: &mut qos::Route,
) -> pool::Job {
    let (sh, out, tx) = (shared.clone(), out.clone(), tx.clone());
    let volume = route.volume.clone();
    let known = route.known.take();
    let queued = Instant::now();
    Box::new(move || {
        if let Some(v) = &volume {
            v.qos.queued(queued.elapsed());
        }
        let reply = respond(
            &sh.exports,
            client,
            &record,
            known.as_ref(),
            Runner::BlockingPool,
            received,
        );
        // Run: it no longer counts against its volume's room (its reply, sent or
        // not, stays charged to the byte budget).
        drop(room);
        sh.buffers.give(record);
        if let Ok(Some(reply)) = reply {
            out.send_or_hand_off(reply, &tx, held);
        }
    })
}

/// What a call found when it asked for room among its volume's calls.
enum Roomed {
    /// Room (None: queued past it, see `qos::Full::Overdraw`).
    Took(Option<OwnedSemaphorePermit>),
    /// To be answered NFS3ERR_JUKEBOX.
    Refused,
    /// The connection stopped while it waited.
    Stopped,
}

/// Takes `kib` of `room` for a call, as `qos::when_full` says when there is none: waits
/// (until `stop`), goes past it, or refuses the call. `alone`: the call is the only one
/// its connection has in flight, which goes past a full room: a client with one call
/// at a time is never held behind other connections' floods of the same volume (whose
/// queued calls may wait for the byte budget their unread replies hold), and the byte
/// budget and the connection cap still bound what such calls hold.
async fn room_for(
    room: &Arc<Semaphore>,
    kib: u32,
    (mixed, alone): (bool, bool),
    budget: &Budget,
    stop: impl std::future::Future<Output = ()>,
) -> Roomed {
    if let Ok(p) = room.clone().try_acquire_many_owned(kib) {
        return Roomed::Took(Some(p));
    }
    if alone {
        return Roomed::Took(None);
    }
    match qos::when_full(mixed, budget.held(), budget.limit()) {
        Full::Wait => tokio::select! {
            () = stop => Roomed::Stopped,
            p = room.clone().acquire_many_owned(kib) => Roomed::Took(p.ok()),
        },
        Full::Overdraw => Roomed::Took(None),
        Full::Jukebox => Roomed::Refused,
    }
}

/// Answers the call in `record` NFS3ERR_JUKEBOX without running it (see
/// `qos::Full::Jukebox`), releasing `held` once the reply has left.
fn refuse(
    shared: &Shared,
    tx: &mpsc::Sender<Queued>,
    record: Vec<u8>,
    received: Instant,
    held: (OwnedSemaphorePermit, Charge),
) {
    let reply = refusal(&record, nfsstat3::NFS3ERR_JUKEBOX);
    let slot = stats::slot_of_record(&record);
    shared.buffers.give(record);
    if let Some(bytes) = reply {
        count(&shared.exports, slot, &bytes, received);
        queue(tx, Queued { bytes, held });
    }
}

/// Reads the first byte of the next record, waiting as long as calls are in flight
/// (their replies are the client's reason to keep quiet), else up to the idle timeout.
/// While nothing is in flight the connection is registered in `idle`, where a new
/// connection that finds every slot taken may close it (by cancelling `conn`).
async fn next_record(
    rd: &mut BufReader<OwnedReadHalf>,
    (slots, parked): (&Semaphore, &Semaphore),
    limits: Limits,
    idle: &Waits,
    conn: &CancellationToken,
) -> Result<u8, &'static str> {
    let byte = |r: std::io::Result<Option<u8>>| match r {
        Ok(Some(b)) => Ok(b),
        Ok(None) => Err("closed by the client"),
        Err(_) => Err("read failed"),
    };
    // The other slots all free: nothing in flight, nothing queued (this loop is their
    // only taker, so waiting for all of them holds up no one).
    // Calls waiting for a ceiling are in flight too.
    let others = u32::try_from(MAX_IN_FLIGHT - 1).unwrap_or(u32::MAX);
    let all_parked = u32::try_from(MAX_PARKED).unwrap_or(u32::MAX);
    if slots.available_permits() < MAX_IN_FLIGHT - 1 || parked.available_permits() < MAX_PARKED {
        let quiet = async {
            let _running = slots.acquire_many(others).await;
            let _waiting = parked.acquire_many(all_parked).await;
        };
        // Cancel-safe: a byte is either read and returned, or not read.
        tokio::select! {
            r = rpc::first_byte(rd) => return byte(r),
            () = quiet => {}
        }
    }
    let _idle = idle.start(conn);
    match tokio::time::timeout(limits.idle_timeout, rpc::first_byte(rd)).await {
        Ok(r) => byte(r),
        Err(_) => Err("idle"),
    }
}

/// Counts a connection in `n` while alive.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Counted(n)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
