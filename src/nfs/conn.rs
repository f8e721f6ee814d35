//! One TCP connection: read records, run each call on the blocking pool (file system
//! calls block) except attribute-only calls, which take microseconds and run on the
//! connection task; write replies as they finish, small ones coalesced into one write.
//! Clients keep many calls in flight on one connection, so replies may leave out of
//! order; the XID pairs them up.
//!
//! Bounds: [`MAX_RECORD`] per record, [`MAX_IN_FLIGHT`] calls per connection (reading
//! pauses beyond that), so a connection holds at most about 70 MiB of buffers. On
//! shutdown the connection stops reading, finishes the calls it has, sends their
//! replies, then closes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::dirops;
use super::mount;
use super::ops::{self, Ctx};
use super::rpc::{self, AcceptStat, MAX_RECORD, Reject};
use super::state::Exports;
use super::xdr::Garbage;

pub const MAX_IN_FLIGHT: usize = 64;

/// Replies gathered into one socket write at most.
const COALESCE_BYTES: usize = 256 * 1024;
/// Replies larger than this are written on their own rather than copied into a batch.
const SMALL_REPLY: usize = 16 * 1024;

pub const NFS_PROGRAM: u32 = 100_003;

/// NFS procedures that only read attributes (NULL, GETATTR, ACCESS, FSSTAT, FSINFO,
/// PATHCONF): run on the connection task. Anything that reads or writes data, changes
/// the namespace or may sync stays on the blocking pool.
fn is_cheap(record: &[u8]) -> bool {
    let word = |i: usize| {
        record
            .get(4 * i..4 * i + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    word(3) == Some(NFS_PROGRAM) && matches!(word(5), Some(0 | 1 | 4 | 18 | 19 | 20))
}
pub const MOUNT_PROGRAM: u32 = 100_005;

/// Serves one connection until the peer closes it, it breaks the protocol, or
/// `shutdown` fires.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    exports: Arc<Exports>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(async move {
        // Small replies that finished together leave in one write (fewer syscalls under
        // load); large ones (READ data) are written as they are, never copied again.
        let mut batch = Vec::new();
        'replies: while let Some(first) = rx.recv().await {
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
        let _ = wr.shutdown().await;
    });
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut buf = Vec::new();
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
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
        let record = std::mem::take(&mut buf);
        let client = peer.ip();
        if is_cheap(&record) {
            // Attribute calls on cached handles take microseconds: handing them to the
            // blocking pool would cost more than running them here.
            if let Some(reply) = dispatch(&exports, client, &record)
                && tx.send(reply).await.is_err()
            {
                break;
            }
            drop(permit);
            continue;
        }
        let (ex, tx) = (exports.clone(), tx.clone());
        tokio::task::spawn_blocking(move || {
            if let Some(reply) = dispatch(&ex, client, &record) {
                let _ = tx.blocking_send(reply);
            }
            drop(permit);
        });
    }
    // Replies of calls still running go out before the socket closes.
    drop(tx);
    let _ = writer.await;
}

/// Decodes one record, runs the call, and returns the framed reply (None when the
/// record is not a call and RFC 5531 says nothing is sent back).
pub fn dispatch(ex: &Exports, client: IpAddr, record: &[u8]) -> Option<Vec<u8>> {
    let call = match rpc::parse_call(record) {
        Ok(c) => c,
        Err(Reject::Ignore) => return None,
        Err(Reject::Reply(mut r)) => {
            rpc::finish_record(&mut r);
            return Some(r);
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
    let result: Result<(), Garbage> = match (call.prog, call.vers) {
        (NFS_PROGRAM, 3) => match call.procedure {
            0 => Ok(()),
            1 => ops::getattr(&ctx, &mut args, &mut out),
            2 => ops::setattr(&ctx, &mut args, &mut out),
            3 => dirops::lookup(&ctx, &mut args, &mut out),
            4 => ops::access(&ctx, &mut args, &mut out),
            5 => ops::readlink(&ctx, &mut args, &mut out),
            6 => ops::read(&ctx, &mut args, &mut out),
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
    if result.is_err() {
        out = rpc::accepted(xid, AcceptStat::GarbageArgs);
    }
    rpc::finish_record(&mut out);
    Some(out)
}
