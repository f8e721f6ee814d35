//! ONC RPC v2 (RFC 5531) over TCP: record marking (§11), call headers, credentials and
//! reply headers. Nothing here knows NFS; it hands the dispatcher a decoded [`Call`] or
//! a ready-made rejection.
//!
//! Limits: a record (all its fragments) is at most [`MAX_RECORD`] bytes, credentials at
//! most 400 bytes (RFC 5531 §8.2), AUTH_SYS group lists at most 16 entries. Breaking a
//! record limit closes the connection; breaking the others gets an RPC error reply.

use tokio::io::{AsyncRead, AsyncReadExt};

use super::limits::Charge;
use super::xdr::{Garbage, XdrIn, put_opaque, put_u32};

/// Largest record accepted: a 1 MiB WRITE plus headers.
pub const MAX_RECORD: usize = (1 << 20) + 64 * 1024;

const LAST_FRAGMENT: u32 = 0x8000_0000;
const MAX_AUTH_BYTES: usize = 400;
const MAX_GIDS: usize = 16;

pub const AUTH_NONE: u32 = 0;
pub const AUTH_SYS: u32 = 1;

/// Who is calling, as the credential says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// AUTH_NONE: an anonymous caller.
    None,
    /// AUTH_SYS (AUTH_UNIX): the client vouches for these ids.
    Sys { uid: u32, gid: u32, gids: Vec<u32> },
}

/// A decoded call; `args` is positioned at the procedure's arguments.
#[derive(Debug)]
pub struct Call<'a> {
    pub xid: u32,
    pub prog: u32,
    pub vers: u32,
    pub procedure: u32,
    pub cred: Credential,
    pub args: XdrIn<'a>,
}

/// A decoded call's header, owned, with where its arguments start in its record: kept
/// by routing (`qos`) so the call is decoded once.
#[derive(Debug)]
pub struct Head {
    pub xid: u32,
    pub prog: u32,
    pub vers: u32,
    pub procedure: u32,
    pub cred: Credential,
    args_at: usize,
}

impl Head {
    /// `call`, decoded from `record`, as its header and its arguments.
    pub fn split<'a>(call: Call<'a>, record: &[u8]) -> (Head, XdrIn<'a>) {
        let head = Head {
            xid: call.xid,
            prog: call.prog,
            vers: call.vers,
            procedure: call.procedure,
            cred: call.cred,
            args_at: record.len() - call.args.remaining().len(),
        };
        (head, call.args)
    }

    /// The call's arguments, in the `record` it was decoded from.
    pub fn args<'a>(&self, record: &'a [u8]) -> XdrIn<'a> {
        XdrIn::new(record.get(self.args_at..).unwrap_or_default())
    }
}

/// Why a record is not a call we can serve.
#[derive(Debug, PartialEq, Eq)]
pub enum Reject {
    /// Not even an RPC call header: ignore the record (RFC 5531 has no reply for it).
    Ignore,
    /// Answer with this ready reply body.
    Reply(Vec<u8>),
}

/// First read of a record's fragment data: small, so a peer that sends a mark and then
/// stalls holds little of the budget; later reads double up to [`LAST_STEP`].
const FIRST_STEP: usize = 4 * 1024;
const LAST_STEP: usize = 256 * 1024;

/// Reads the first byte of the next record; `None` at a clean end of stream (EOF
/// between records is a normal close). Apart from the rest of the record, so the
/// caller can wait for it under a different bound.
pub async fn first_byte<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<u8>> {
    let mut b = [0u8; 1];
    Ok(match r.read(&mut b).await? {
        0 => None,
        _ => Some(b[0]),
    })
}

/// Reads the rest of a record that began with `first` (all fragments) into `buf`,
/// charging `charge` for each byte before it is read (see `limits`). A record over
/// `max` bytes or a stream ending mid-record is an error.
pub async fn read_record<R: AsyncRead + Unpin>(
    r: &mut R,
    first: u8,
    buf: &mut Vec<u8>,
    max: usize,
    charge: &mut Charge,
) -> std::io::Result<()> {
    buf.clear();
    let mut first = Some(first);
    let mut step = FIRST_STEP;
    loop {
        let mut mark = [0u8; 4];
        match first.take() {
            Some(b) => {
                mark[0] = b;
                r.read_exact(&mut mark[1..]).await?;
            }
            None => {
                r.read_exact(&mut mark).await?;
            }
        }
        let mark = u32::from_be_bytes(mark);
        let len = (mark & !LAST_FRAGMENT) as usize;
        if buf.len() + len > max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("RPC record larger than {max} bytes"),
            ));
        }
        // Read into spare capacity (no zero-filling of up to a megabyte first), as much
        // as has been charged: the budget is what bounds memory, not the mark's promise.
        let end = buf.len() + len;
        while buf.len() < end {
            let want = (end - buf.len()).min(step);
            step = (step * 2).min(LAST_STEP);
            charge.at_least(buf.len() + want).await?;
            buf.reserve(want);
            let mut chunk = (&mut *r).take(want as u64);
            while chunk.limit() > 0 {
                if chunk.read_buf(buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
        if mark & LAST_FRAGMENT != 0 {
            return Ok(());
        }
    }
}

/// Decodes the call header of `record`.
pub fn parse_call(record: &[u8]) -> Result<Call<'_>, Reject> {
    let mut x = XdrIn::new(record);
    let xid = x.u32().map_err(|_| Reject::Ignore)?;
    if x.u32() != Ok(0) {
        return Err(Reject::Ignore); // a REPLY, or garbage: nothing to answer
    }
    let garbage = |_: Garbage| Reject::Reply(accepted(xid, AcceptStat::GarbageArgs));
    let rpcvers = x.u32().map_err(garbage)?;
    if rpcvers != 2 {
        return Err(Reject::Reply(denied_rpc_mismatch(xid)));
    }
    let prog = x.u32().map_err(garbage)?;
    let vers = x.u32().map_err(garbage)?;
    let procedure = x.u32().map_err(garbage)?;
    let cred_flavor = x.u32().map_err(garbage)?;
    let cred_body = x
        .opaque(MAX_AUTH_BYTES)
        .map_err(|_| Reject::Reply(denied_auth(xid, AuthStat::BadCred)))?;
    let _verf_flavor = x.u32().map_err(garbage)?;
    x.opaque(MAX_AUTH_BYTES)
        .map_err(|_| Reject::Reply(denied_auth(xid, AuthStat::BadVerf)))?;
    let cred = match cred_flavor {
        AUTH_NONE => Credential::None,
        AUTH_SYS => parse_auth_sys(cred_body)
            .map_err(|_| Reject::Reply(denied_auth(xid, AuthStat::BadCred)))?,
        _ => return Err(Reject::Reply(denied_auth(xid, AuthStat::TooWeak))),
    };
    Ok(Call {
        xid,
        prog,
        vers,
        procedure,
        cred,
        args: x,
    })
}

/// `authsys_parms` (RFC 5531 appendix A).
fn parse_auth_sys(body: &[u8]) -> Result<Credential, Garbage> {
    let mut x = XdrIn::new(body);
    let _stamp = x.u32()?;
    let _machine = x.opaque(255)?;
    let uid = x.u32()?;
    let gid = x.u32()?;
    let n = x.u32()? as usize;
    if n > MAX_GIDS {
        return Err(Garbage);
    }
    let gids = (0..n).map(|_| x.u32()).collect::<Result<Vec<_>, _>>()?;
    Ok(Credential::Sys { uid, gid, gids })
}

/// `accept_stat` values we send (RFC 5531 §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptStat {
    Success = 0,
    ProgUnavail = 1,
    ProcUnavail = 3,
    GarbageArgs = 4,
    SystemErr = 5,
}

/// `auth_stat` values we send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStat {
    BadCred = 1,
    BadVerf = 3,
    TooWeak = 5,
}

/// Starts a reply buffer: 4 bytes reserved for the record mark, then the reply header
/// for an accepted call with `stat`. Procedure results follow for `Success`.
pub fn accepted(xid: u32, stat: AcceptStat) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&[0; 4]);
    put_u32(&mut out, xid);
    put_u32(&mut out, 1); // REPLY
    put_u32(&mut out, 0); // MSG_ACCEPTED
    put_u32(&mut out, AUTH_NONE); // verifier
    put_opaque(&mut out, &[]);
    put_u32(&mut out, stat as u32);
    out
}

/// PROG_MISMATCH with the versions we support.
pub fn prog_mismatch(xid: u32, low: u32, high: u32) -> Vec<u8> {
    let mut out = accepted(xid, AcceptStat::Success);
    out.truncate(out.len() - 4);
    put_u32(&mut out, 2); // PROG_MISMATCH
    put_u32(&mut out, low);
    put_u32(&mut out, high);
    out
}

fn denied(xid: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(&[0; 4]);
    put_u32(&mut out, xid);
    put_u32(&mut out, 1); // REPLY
    put_u32(&mut out, 1); // MSG_DENIED
    out
}

fn denied_rpc_mismatch(xid: u32) -> Vec<u8> {
    let mut out = denied(xid);
    put_u32(&mut out, 0); // RPC_MISMATCH
    put_u32(&mut out, 2);
    put_u32(&mut out, 2);
    out
}

/// MSG_DENIED / AUTH_ERROR with `stat`.
pub fn denied_auth(xid: u32, stat: AuthStat) -> Vec<u8> {
    let mut out = denied(xid);
    put_u32(&mut out, 1); // AUTH_ERROR
    put_u32(&mut out, stat as u32);
    out
}

/// Fills in the record mark reserved by [`accepted`] / [`denied_auth`]: one fragment,
/// `reply` followed on the wire by `trailing` more bytes (spliced READ data).
pub fn finish_record(reply: &mut [u8], trailing: usize) {
    let len = (reply.len() - 4 + trailing) as u32 | LAST_FRAGMENT;
    reply[..4].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfs::limits::Budget;
    use crate::nfs::xdr::put_u32;

    fn call_header(rpcvers: u32, cred_flavor: u32, cred: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [7, 0, rpcvers, 100_003, 3, 0, cred_flavor] {
            put_u32(&mut b, v);
        }
        put_opaque(&mut b, cred);
        put_u32(&mut b, 0);
        put_opaque(&mut b, &[]);
        b
    }

    fn auth_sys(uid: u32, gid: u32, gids: &[u32]) -> Vec<u8> {
        let mut b = Vec::new();
        put_u32(&mut b, 0);
        put_opaque(&mut b, b"host");
        put_u32(&mut b, uid);
        put_u32(&mut b, gid);
        put_u32(&mut b, gids.len() as u32);
        for g in gids {
            put_u32(&mut b, *g);
        }
        b
    }

    #[test]
    fn auth_sys_identity_is_decoded() {
        let rec = call_header(2, AUTH_SYS, &auth_sys(999, 998, &[4, 5]));
        let call = parse_call(&rec).expect("valid call");
        assert_eq!(call.xid, 7);
        assert_eq!(
            call.cred,
            Credential::Sys {
                uid: 999,
                gid: 998,
                gids: vec![4, 5]
            }
        );
    }

    #[test]
    fn unknown_auth_flavours_are_rejected_as_too_weak() {
        let rec = call_header(2, 6, &[]);
        assert_eq!(
            parse_call(&rec).unwrap_err(),
            Reject::Reply(denied_auth(7, AuthStat::TooWeak))
        );
    }

    #[test]
    fn too_many_groups_is_a_bad_credential() {
        let gids: Vec<u32> = (0..17).collect();
        let rec = call_header(2, AUTH_SYS, &auth_sys(1, 1, &gids));
        assert_eq!(
            parse_call(&rec).unwrap_err(),
            Reject::Reply(denied_auth(7, AuthStat::BadCred))
        );
    }

    #[test]
    fn rpc_version_other_than_two_is_a_mismatch() {
        let rec = call_header(3, AUTH_NONE, &[]);
        assert!(matches!(parse_call(&rec), Err(Reject::Reply(_))));
    }

    #[test]
    fn truncated_headers_never_panic() {
        let rec = call_header(2, AUTH_SYS, &auth_sys(1, 1, &[]));
        for cut in 0..rec.len() {
            let _ = parse_call(&rec[..cut]);
        }
    }

    fn charge(budget: &Budget) -> Charge {
        budget.charge(&tokio_util::sync::CancellationToken::new())
    }

    /// A whole record from `data`, or None at a clean end of stream.
    async fn next(data: &mut &[u8], budget: &Budget) -> std::io::Result<Option<Vec<u8>>> {
        let Some(first) = first_byte(data).await? else {
            return Ok(None);
        };
        let mut buf = Vec::new();
        read_record(data, first, &mut buf, 100, &mut charge(budget)).await?;
        Ok(Some(buf))
    }

    #[tokio::test]
    async fn records_over_the_limit_are_refused_before_reading_them() {
        let mut data: &[u8] = &[0x10, 0x00, 0x00]; // after 0x80: one fragment of 1 MiB
        let mut buf = Vec::new();
        let mut charge = charge(&Budget::new(1 << 30));
        let read = read_record(&mut data, 0x80, &mut buf, 1000, &mut charge).await;
        assert!(read.is_err());
        assert!(buf.capacity() < 1000);
    }

    #[tokio::test]
    async fn fragments_are_joined_into_one_record() {
        let mut data: &[u8] = &[0, 0, 0, 2, b'a', b'b', 0x80, 0, 0, 1, b'c'];
        let budget = Budget::new(1 << 30);
        let record = next(&mut data, &budget).await.expect("reads");
        assert_eq!(record.as_deref(), Some(&b"abc"[..]));
        assert!(next(&mut data, &budget).await.expect("eof").is_none());
    }

    #[tokio::test]
    async fn a_stalled_record_holds_only_what_it_sent_and_a_small_step() {
        use tokio::io::AsyncWriteExt;
        let budget = Budget::new(1 << 30);
        let (mut client, mut server) = tokio::io::duplex(64);
        client
            .write_all(&[0x10, 0, 0, 1, 2, 3])
            .await
            .expect("send");
        let mut buf = Vec::new();
        let mut charge = charge(&budget);
        let read = read_record(&mut server, 0x80, &mut buf, 2 << 20, &mut charge);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), read)
                .await
                .is_err()
        );
        assert!(charge.bytes() <= FIRST_STEP, "held {}", charge.bytes());
    }
}
