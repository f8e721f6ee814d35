//! One call, from record to framed reply: decode the RPC header, find the procedure's
//! row in the procedure table (`table`), run it with the caller's context, frame the
//! reply and count the call in `stats`. Which thread runs it is `conn`'s choice (by
//! the table's `Runs`); this module only learns it as a [`Runner`], which decides how a
//! READ returns its data.

use std::cell::Cell;
use std::net::IpAddr;
use std::time::Instant;

use super::ops::Ctx;
use super::program::{NULL, VERSION};
use super::qos::Known;
use super::reply::Early;
use super::rpc::{self, AcceptStat, AuthStat, Head, Reject};
use super::send::Reply;
use super::state::Exports;
use super::stats;
use super::table::{self, Found};
use super::xdr::put_u32;
use nfs3_types::nfs3::nfsstat3;

/// The answer to a call from an unreserved port when reserved ports are required:
/// NULL is answered (it reveals nothing and lets the client see the server is up),
/// anything else is denied as AUTH_TOOWEAK (RFC 5531 §9: "rejected for security
/// reasons"), which mount.nfs reports as "access denied".
pub fn insecure_reply(record: &[u8]) -> Option<Vec<u8>> {
    let mut out = match rpc::parse_call(record) {
        Ok(c) if c.procedure == NULL => rpc::accepted(c.xid, AcceptStat::Success),
        Ok(c) => rpc::denied_auth(c.xid, AuthStat::TooWeak),
        Err(Reject::Ignore) => return None,
        Err(Reject::Reply(r)) => r,
    };
    rpc::finish_record(&mut out, 0);
    Some(out)
}

/// The answer to the NFSv3 call in `record` that refuses it with `status` and empty
/// attributes, without running it (None for a record that is no NFSv3 call: only
/// those are routed to a volume, and so refused for one).
pub fn refusal(record: &[u8], status: nfsstat3) -> Option<Vec<u8>> {
    let call = rpc::parse_call(record).ok()?;
    if (call.prog, call.vers) != (super::program::NFS_PROGRAM, VERSION) {
        return None;
    }
    let mut out = rpc::accepted(call.xid, AcceptStat::Success);
    put_u32(&mut out, status as u32);
    for _ in 0..table::failure_words(call.procedure) {
        put_u32(&mut out, 0);
    }
    rpc::finish_record(&mut out, 0);
    Some(out)
}

/// Who runs a call, which decides how a READ gets its data.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    /// Any caller: data always travels in the reply bytes.
    Plain,
    /// A blocking-pool thread that writes the reply itself: large READs splice.
    BlockingPool,
    /// The connection's async task: a READ that would wait for the disk is refused.
    AsyncTask,
}

/// The call must move to the blocking pool; nothing was done or sent.
pub struct WouldBlock;

/// Decodes one record, runs the call, and returns the framed reply (None when the
/// record is not a call and RFC 5531 says nothing is sent back).
pub fn dispatch(ex: &Exports, client: IpAddr, record: &[u8]) -> Option<Vec<u8>> {
    respond(ex, client, record, None, Runner::Plain, Instant::now())
        .ok()
        .flatten()
        .map(|r| r.head)
}

/// Counts a call answered with `reply` that touched no volume.
pub fn count(ex: &Exports, slot: usize, reply: &[u8], received: Instant) {
    ex.stats.record(&stats::Call {
        slot,
        status: stats::outcome(slot, reply),
        took: received.elapsed(),
        volume: None,
        bytes: 0,
    });
}

/// [`dispatch`] for `runner`; the call counts in the metrics as taking from `received`
/// until its reply is ready. `known` is what routing (`qos::route`) decoded of this
/// `record`, if it was routed: the call is not decoded, nor its handle checked, twice.
pub fn respond(
    ex: &Exports,
    client: IpAddr,
    record: &[u8],
    known: Option<&Known>,
    runner: Runner,
    received: Instant,
) -> Result<Option<Reply>, WouldBlock> {
    let decoded;
    let (head, mut args, checked) = match known {
        Some(k) => {
            let handle = k
                .handle
                .as_ref()
                .and_then(|(at, fh)| Some((record.get(at.clone())?, fh)));
            (&k.head, k.head.args(record), handle)
        }
        None => match rpc::parse_call(record) {
            Ok(c) => {
                let (h, a) = Head::split(c, record);
                decoded = h;
                (&decoded, a, None)
            }
            Err(Reject::Ignore) => return Ok(None),
            Err(Reject::Reply(mut r)) => {
                rpc::finish_record(&mut r, 0);
                count(ex, stats::slot_of_record(record), &r, received);
                return Ok(Some(Reply {
                    head: r,
                    data: None,
                }));
            }
        },
    };
    let xid = head.xid;
    let mut out = rpc::accepted(xid, AcceptStat::Success);
    let ctx = Ctx {
        ex,
        client,
        cred: &head.cred,
        volume: Cell::new(None),
        bytes: Cell::new(0),
        cached_only: runner == Runner::AsyncTask,
        checked,
    };
    let mut spliced = None;
    let answered: Result<(), Early> = match table::find(head.prog, head.vers, head.procedure) {
        Found::Procedure(p) => {
            let splice = (runner == Runner::BlockingPool).then_some(&mut spliced);
            (p.handler)(&ctx, &mut args, &mut out, splice)
        }
        Found::NoProcedure => {
            out = rpc::accepted(xid, AcceptStat::ProcUnavail);
            Ok(())
        }
        Found::OtherVersion => {
            out = rpc::prog_mismatch(xid, VERSION, VERSION);
            Ok(())
        }
        Found::NoProgram => {
            out = rpc::accepted(xid, AcceptStat::ProgUnavail);
            Ok(())
        }
    };
    match answered {
        Ok(()) => {}
        Err(Early::WouldBlock) => return Err(WouldBlock),
        // `encode` answers every status itself; what is left is garbage.
        Err(Early::Garbage | Early::Status(_)) => {
            out = rpc::accepted(xid, AcceptStat::GarbageArgs);
            spliced = None;
        }
    }
    let trailing = spliced.as_ref().map_or(0, |d| d.len() + d.pad().len());
    rpc::finish_record(&mut out, trailing);
    let slot = stats::slot(head.prog, head.vers, head.procedure);
    let volume = ctx.volume.take();
    ex.stats.record(&stats::Call {
        slot,
        status: stats::outcome(slot, &out),
        took: received.elapsed(),
        volume: volume.as_deref().map(|v| &v.stats),
        bytes: ctx.bytes.get(),
    });
    Ok(Some(Reply {
        head: out,
        data: spliced,
    }))
}
