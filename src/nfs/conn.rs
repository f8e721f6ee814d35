//! One TCP connection: read records, run each call on the blocking pool (file system
//! calls block) except attribute-only calls, which take microseconds and run on the
//! connection task; write replies as they finish, small ones coalesced into one write.
//! Large READs are the exception: the thread that ran the call splices the data from
//! the page cache straight into the socket (see `splice`), under the same send lock the
//! writer task takes, so records never interleave.
//! Clients keep many calls in flight on one connection, so replies may leave out of
//! order; the XID pairs them up.
//!
//! Bounds: [`MAX_RECORD`] per record, [`MAX_IN_FLIGHT`] calls per connection (reading
//! pauses beyond that), so a connection holds at most about 70 MiB of buffers. On
//! shutdown the connection stops reading, finishes the calls it has, sends their
//! replies, then closes.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::buffers::BufferPool;
use super::dirops;
use super::mount;
use super::ops::{self, Ctx, ReadHow};
use super::rpc::{self, AcceptStat, MAX_RECORD, Reject};
use super::splice::{self, Piped};
use super::state::Exports;
use super::xdr::Garbage;

pub const MAX_IN_FLIGHT: usize = 64;

/// Replies gathered into one socket write at most.
const COALESCE_BYTES: usize = 256 * 1024;
/// Replies larger than this are written on their own rather than copied into a batch.
const SMALL_REPLY: usize = 16 * 1024;

pub const NFS_PROGRAM: u32 = 100_003;

/// NFS procedures tried on the connection task: those that only read attributes (NULL,
/// GETATTR, ACCESS, FSSTAT, FSINFO, PATHCONF), and READ, which runs there only when the
/// page cache holds its data (else it moves to the blocking pool). Anything that may
/// wait for the disk, changes the namespace or switches the thread's credentials runs
/// on the blocking pool.
fn try_inline(record: &[u8]) -> bool {
    let word = |i: usize| {
        record
            .get(4 * i..4 * i + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    word(3) == Some(NFS_PROGRAM) && matches!(word(5), Some(0 | 1 | 4 | 6 | 18 | 19 | 20))
}
pub const MOUNT_PROGRAM: u32 = 100_005;

/// Serves one connection until the peer closes it, it breaks the protocol, or
/// `shutdown` fires.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    exports: Arc<Exports>,
    buffers: Arc<BufferPool>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    // The send lock: whoever holds it writes whole records.
    let sink = Arc::new(Mutex::new(wr));
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(MAX_IN_FLIGHT);
    let writer_sink = sink.clone();
    let writer = tokio::spawn(async move {
        // Small replies that finished together leave in one write (fewer syscalls under
        // load); large ones are written as they are, never copied again.
        let mut batch = Vec::new();
        'replies: while let Some(first) = rx.recv().await {
            let mut wr = writer_sink.lock().await;
            let mut next = Some(first);
            while let Some(reply) = next.take() {
                if reply.len() > SMALL_REPLY {
                    if !batch.is_empty() && wr.write_all(&batch).await.is_err() {
                        break 'replies;
                    }
                    batch.clear();
                    if wr.write_all(&reply).await.is_err() {
                        break 'replies;
                    }
                } else {
                    batch.extend_from_slice(&reply);
                }
                if batch.len() < COALESCE_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() && wr.write_all(&batch).await.is_err() {
                break;
            }
            batch.clear();
        }
        let _ = writer_sink.lock().await.shutdown().await;
    });
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut buf = buffers.take();
        let read = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = rpc::read_record(&mut rd, &mut buf, MAX_RECORD) => r,
        };
        match read {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "closing connection");
                break;
            }
        }
        let record = buf;
        let client = peer.ip();
        if try_inline(&record) {
            // These take microseconds when they need no disk: handing them to the
            // blocking pool (a thread wake-up each) would cost more than running them.
            // Never spliced here: the reply is all in `head`.
            let inline = respond(&exports, client, &record, Runner::AsyncTask)
                .map(|reply| reply.map(|r| r.head));
            match inline {
                Err(WouldBlock) => {}
                Ok(head) => {
                    buffers.give(record);
                    if let Some(head) = head
                        && tx.send(head).await.is_err()
                    {
                        break;
                    }
                    drop(permit);
                    continue;
                }
            }
        }
        let (ex, tx, sink, pool) = (exports.clone(), tx.clone(), sink.clone(), buffers.clone());
        tokio::task::spawn_blocking(move || {
            if let Ok(Some(reply)) = respond(&ex, client, &record, Runner::BlockingPool) {
                // Written from this thread: no hand-off to the writer task, no wake-up.
                let wr = sink.blocking_lock();
                let sock = wr.as_ref().as_raw_fd();
                if let Err(e) = reply.send(sock) {
                    tracing::debug!(%peer, errno = e.0, "closing connection: reply not sent");
                    splice::abort(sock);
                }
            }
            pool.give(record);
            drop((permit, tx));
        });
    }
    // Replies of calls still running go out before the socket closes.
    drop(tx);
    let _ = writer.await;
}

/// A framed reply: `head` (record mark included), then, for a spliced READ, its data
/// waiting in this thread's pipe (padded when sent).
pub struct Reply {
    pub head: Vec<u8>,
    pub data: Option<Piped>,
}

impl Reply {
    /// Writes the whole record to the non-blocking socket `sock`, waiting for room as
    /// needed; call from a blocking-pool thread holding the send lock. On error the
    /// stream may be cut mid-record: close the connection.
    fn send(self, sock: std::os::fd::RawFd) -> Result<(), super::sys::Errno> {
        match self.data {
            Some(data) => {
                let pad = data.pad();
                data.send(sock, &self.head, pad)
            }
            None => splice::send_all(sock, &self.head, 0),
        }
    }
}

/// Who runs a call, which decides how a READ gets its data.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Runner {
    /// Any caller: data always travels in the reply bytes.
    Plain,
    /// A blocking-pool thread that writes the reply itself: large READs splice.
    BlockingPool,
    /// The connection's async task: a READ that would wait for the disk is refused.
    AsyncTask,
}

/// The call must move to the blocking pool; nothing was done or sent.
struct WouldBlock;

/// Decodes one record, runs the call, and returns the framed reply (None when the
/// record is not a call and RFC 5531 says nothing is sent back).
pub fn dispatch(ex: &Exports, client: IpAddr, record: &[u8]) -> Option<Vec<u8>> {
    respond(ex, client, record, Runner::Plain)
        .ok()
        .flatten()
        .map(|r| r.head)
}

/// [`dispatch`] for `runner`.
fn respond(
    ex: &Exports,
    client: IpAddr,
    record: &[u8],
    runner: Runner,
) -> Result<Option<Reply>, WouldBlock> {
    let call = match rpc::parse_call(record) {
        Ok(c) => c,
        Err(Reject::Ignore) => return Ok(None),
        Err(Reject::Reply(mut r)) => {
            rpc::finish_record(&mut r, 0);
            return Ok(Some(Reply {
                head: r,
                data: None,
            }));
        }
    };
    let xid = call.xid;
    let mut out = rpc::accepted(xid, AcceptStat::Success);
    let ctx = Ctx {
        ex,
        client,
        cred: &call.cred,
    };
    let mut args = call.args;
    let mut spliced = None;
    let would_block = Cell::new(false);
    let result: Result<(), Garbage> = match (call.prog, call.vers) {
        (NFS_PROGRAM, 3) => match call.procedure {
            0 => Ok(()),
            1 => ops::getattr(&ctx, &mut args, &mut out),
            2 => ops::setattr(&ctx, &mut args, &mut out),
            3 => dirops::lookup(&ctx, &mut args, &mut out),
            4 => ops::access(&ctx, &mut args, &mut out),
            5 => ops::readlink(&ctx, &mut args, &mut out),
            6 => {
                let how = match runner {
                    Runner::Plain => ReadHow::Copy,
                    Runner::BlockingPool => ReadHow::Splice(&mut spliced),
                    Runner::AsyncTask => ReadHow::CachedOnly(&would_block),
                };
                ops::read(&ctx, &mut args, &mut out, how)
            }
            7 => ops::write(&ctx, &mut args, &mut out),
            8 => dirops::create(&ctx, &mut args, &mut out),
            9 => dirops::mkdir(&ctx, &mut args, &mut out),
            10 => dirops::symlink(&ctx, &mut args, &mut out),
            11 => dirops::mknod(&ctx, &mut args, &mut out),
            12 => dirops::remove(&ctx, &mut args, &mut out),
            13 => dirops::rmdir(&ctx, &mut args, &mut out),
            14 => dirops::rename(&ctx, &mut args, &mut out),
            15 => dirops::link(&ctx, &mut args, &mut out),
            16 => dirops::readdir(&ctx, &mut args, &mut out, false),
            17 => dirops::readdir(&ctx, &mut args, &mut out, true),
            18 => ops::fsstat(&ctx, &mut args, &mut out),
            19 => ops::fsinfo(&ctx, &mut args, &mut out),
            20 => ops::pathconf(&ctx, &mut args, &mut out),
            21 => ops::commit(&ctx, &mut args, &mut out),
            _ => {
                out = rpc::accepted(xid, AcceptStat::ProcUnavail);
                Ok(())
            }
        },
        (MOUNT_PROGRAM, 3) => match call.procedure {
            0 => Ok(()),
            1 => mount::mnt(&ctx, &mut args, &mut out),
            2 => mount::dump(&ctx, &mut args, &mut out),
            3 => mount::umnt(&ctx, &mut args, &mut out),
            4 => mount::umntall(&ctx, &mut args, &mut out),
            5 => mount::export(&ctx, &mut args, &mut out),
            _ => {
                out = rpc::accepted(xid, AcceptStat::ProcUnavail);
                Ok(())
            }
        },
        (NFS_PROGRAM | MOUNT_PROGRAM, _) => {
            out = rpc::prog_mismatch(xid, 3, 3);
            Ok(())
        }
        _ => {
            out = rpc::accepted(xid, AcceptStat::ProgUnavail);
            Ok(())
        }
    };
    if would_block.get() {
        return Err(WouldBlock);
    }
    if result.is_err() {
        out = rpc::accepted(xid, AcceptStat::GarbageArgs);
        spliced = None;
    }
    let trailing = spliced.as_ref().map_or(0, |d| d.len() + d.pad().len());
    rpc::finish_record(&mut out, trailing);
    Ok(Some(Reply {
        head: out,
        data: spliced,
    }))
}
