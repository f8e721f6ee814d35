//! NFSv3 procedures on attributes and file data: GETATTR, SETATTR, ACCESS, READLINK,
//! READ, WRITE, COMMIT, FSSTAT, FSINFO, PATHCONF (RFC 1813 §3.3).
//!
//! Every procedure resolves its handle as root (open_by_handle_at needs
//! CAP_DAC_READ_SEARCH), then acts with the caller's fs credentials so the kernel
//! enforces permissions and ownership: a call never runs with more rights than its caller.

use std::cell::Cell;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use nfs3_types::nfs3::{Nfs3Option, nfsstat3, set_atime, set_mtime, stable_how};

use super::attr::{self, Caller};
use super::quota;
use super::reply::{post_op, status, wcc};
use super::rpc::Credential;
use super::splice::{self, Piped};
use super::state::{Exports, Obj, Volume};
use super::sys::{self, AsCaller, raw, to_nfsstat};
use super::xdr::{Garbage, XdrIn, put, put_bool, put_opaque, put_u32, put_u64};

/// Largest READ/WRITE transfer we advertise and accept.
pub const MAX_IO: u32 = 1 << 20;

/// One request's context.
pub struct Ctx<'a> {
    pub ex: &'a Exports,
    pub client: IpAddr,
    pub cred: &'a Credential,
    /// The volume the call's (first) handle resolved to, for its metrics.
    pub volume: Cell<Option<Arc<Volume>>>,
    /// Data bytes a READ returned or a WRITE wrote, for the metrics.
    pub bytes: Cell<u64>,
}

impl Ctx<'_> {
    pub fn caller(&self, v: &Volume) -> Caller {
        attr::effective_caller(
            self.cred,
            v.meta.squash,
            v.meta.anon_uid,
            v.meta.anon_gid,
            sys::id_maps(),
        )
    }

    /// Switches this thread to the caller's identity until the guard drops. If the
    /// kernel refuses it (anonymous ids outside the id map), the call is refused
    /// rather than run as root.
    pub fn become_caller(&self, v: &Volume) -> Result<AsCaller, nfsstat3> {
        let c = self.caller(v);
        AsCaller::new(c.uid, c.gid, &c.gids).map_err(|e| {
            tracing::warn!(
                uid = c.uid,
                gid = c.gid,
                errno = e.0,
                "cannot switch to the caller's ids"
            );
            nfsstat3::NFS3ERR_ACCES
        })
    }

    pub fn resolve(&self, fh: &[u8]) -> Result<(Arc<Volume>, Arc<Obj>), nfsstat3> {
        let (v, obj) = self.ex.resolve(self.client, fh)?;
        self.counts_for(&v);
        Ok((v, obj))
    }

    /// Counts the call for `v` in the metrics (unless a handle resolved before).
    pub fn counts_for(&self, v: &Arc<Volume>) {
        let first = self.volume.take().unwrap_or_else(|| v.clone());
        self.volume.set(Some(first));
    }
}

/// Result of a procedure: `Err(Garbage)` becomes RPC GARBAGE_ARGS.
pub type ProcResult = Result<(), Garbage>;

fn stat_opt(fd: &OwnedFd) -> Option<libc::stat> {
    sys::fstat(raw(fd)).ok()
}

impl Ctx<'_> {
    /// Resolves a handle and stats the object.
    pub fn resolve_stat(&self, fh: &[u8]) -> Result<(Arc<Volume>, Arc<Obj>, libc::stat), nfsstat3> {
        let (v, obj) = self.resolve(fh)?;
        let st = sys::fstat(raw(&obj)).map_err(to_nfsstat)?;
        Ok((v, obj, st))
    }
}

/// The reply shape of procedures that answer `status, post_op_attr, results`: `body`
/// appends the results; on any failure the reply is the status and the attributes (if
/// the object resolved) only.
fn with_attrs(
    ctx: &Ctx,
    fh: &[u8],
    out: &mut Vec<u8>,
    body: impl FnOnce(&Volume, &Obj, &libc::stat, &mut Vec<u8>) -> Result<(), nfsstat3>,
) {
    match ctx.resolve_stat(fh) {
        Ok((v, obj, st)) => {
            let mut results = Vec::new();
            let r = body(&v, &obj, &st, &mut results);
            status(out, r.err().unwrap_or(nfsstat3::NFS3_OK));
            post_op(out, Some(&st), v.meta.id);
            if r.is_ok() {
                out.extend_from_slice(&results);
            }
        }
        Err(s) => {
            status(out, s);
            post_op(out, None, 0);
        }
    }
}

pub fn getattr(ctx: &Ctx, args: &mut XdrIn, out: &mut Vec<u8>) -> ProcResult {
    let fh = args.fh()?;
    match ctx.resolve_stat(fh) {
        Ok((v, _, st)) => {
            status(out, nfsstat3::NFS3_OK);
            put(out, &attr::fattr(&st, v.meta.id));
        }
        Err(s) => status(out, s),
    }
    Ok(())
}

pub fn setattr(ctx: &Ctx, args: &mut XdrIn, out: &mut Vec<u8>) -> ProcResult {
    let fh = args.fh()?;
    let sattr = args.sattr()?;
    let guard = args.guard()?;
    let (v, fd) = match ctx.resolve(fh) {
        Ok(x) => x,
        Err(s) => {
            status(out, s);
            wcc(out, None, None, 0);
            return Ok(());
        }
    };
    let before = stat_opt(&fd);
    let result = (|| {
        let st = before.ok_or(nfsstat3::NFS3ERR_STALE)?;
        if let Some(ctime) = guard {
            let now = attr::wcc(&st).ctime;
            if now != ctime {
                return Err(nfsstat3::NFS3ERR_NOT_SYNC);
            }
        }
        let as_caller = ctx.become_caller(&v)?;
        if let Nfs3Option::Some(size) = sattr.size {
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                return Err(nfsstat3::NFS3ERR_ISDIR);
            }
            let wfd = io_for(ctx, &v, &fd, &st, true)?;
            set_size(&v.charging(), wfd, size)?;
        }
        if let Nfs3Option::Some(mode) = sattr.mode
            && st.st_mode & libc::S_IFMT != libc::S_IFLNK
        {
            sys::chmod_fd(raw(&fd), mode & 0o7777).map_err(to_nfsstat)?;
        }
        let uid = match sattr.uid {
            Nfs3Option::Some(u) => u,
            Nfs3Option::None => u32::MAX,
        };
        let gid = match sattr.gid {
            Nfs3Option::Some(g) => g,
            Nfs3Option::None => u32::MAX,
        };
        if uid != u32::MAX || gid != u32::MAX {
            sys::fchownat_empty(raw(&fd), uid, gid).map_err(to_nfsstat)?;
        }
        let atime = match sattr.atime {
            set_atime::DONT_CHANGE => None,
            set_atime::SET_TO_SERVER_TIME => Some(None),
            set_atime::SET_TO_CLIENT_TIME(t) => {
                Some(Some((i64::from(t.seconds), i64::from(t.nseconds))))
            }
        };
        let mtime = match sattr.mtime {
            set_mtime::DONT_CHANGE => None,
            set_mtime::SET_TO_SERVER_TIME => Some(None),
            set_mtime::SET_TO_CLIENT_TIME(t) => {
                Some(Some((i64::from(t.seconds), i64::from(t.nseconds))))
            }
        };
        if (atime.is_some() || mtime.is_some()) && st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            sys::utimes_fd(raw(&fd), atime, mtime).map_err(to_nfsstat)?;
        }
        drop(as_caller);
        fd.sync(&v, st.st_mode)
    })();
    let after = stat_opt(&fd);
    status(out, result.err().unwrap_or(nfsstat3::NFS3_OK));
    wcc(out, before.as_ref(), after.as_ref(), v.meta.id);
    Ok(())
}

/// Truncates or extends a file, keeping the volume's usage right. Growth past the
/// limit fails with DQUOT and changes nothing.
pub fn set_size(
    charging: &quota::Charging,
    fd: std::os::fd::RawFd,
    size: u64,
) -> Result<(), nfsstat3> {
    let before = quota::charge_of(&sys::fstat(fd).map_err(to_nfsstat)?);
    // A regular file is charged at least its size (truncating up allocates nothing).
    let reserve = size.saturating_sub(before);
    charging.reserve(reserve)?;
    let r = sys::ftruncate(fd, size).map_err(to_nfsstat);
    let after = sys::fstat(fd).map_or(before + reserve, |st| quota::charge_of(&st));
    charging.settle(reserve, before, after);
    r
}

/// The I/O descriptor of a regular file, after checking the caller may read (or
/// write) it: by mode bits, with the owner always allowed, as NFS servers do so an
/// owner can write a file they created read-only (RFC 1813 §4.4).
fn io_for(
    ctx: &Ctx,
    v: &Volume,
    obj: &Obj,
    st: &libc::stat,
    write: bool,
) -> Result<std::os::fd::RawFd, nfsstat3> {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => {}
        libc::S_IFDIR => return Err(nfsstat3::NFS3ERR_ISDIR),
        _ => return Err(nfsstat3::NFS3ERR_INVAL),
    }
    let caller = ctx.caller(v);
    let want = if write {
        nfs3_types::nfs3::ACCESS3_MODIFY
    } else {
        nfs3_types::nfs3::ACCESS3_READ
    };
    let allowed = caller.uid == 0
        || caller.uid == st.st_uid
        || attr::access(st.st_mode, st.st_uid, st.st_gid, &caller, want) == want;
    if !allowed {
        return Err(nfsstat3::NFS3ERR_ACCES);
    }
    obj.io_fd(write)
}

pub fn access(ctx: &Ctx, args: &mut XdrIn, out: &mut Vec<u8>) -> ProcResult {
    let fh = args.fh()?;
    let requested = args.u32()?;
    with_attrs(ctx, fh, out, |v, _, st, out| {
        let caller = ctx.caller(v);
        put_u32(
            out,
            attr::access(st.st_mode, st.st_uid, st.st_gid, &caller, requested),
        );
        Ok(())
    });
    Ok(())
}

pub fn readlink(ctx: &Ctx, args: &mut XdrIn, out: &mut Vec<u8>) -> ProcResult {
    let fh = args.fh()?;
    with_attrs(ctx, fh, out, |_, obj, st, out| {
        if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            return Err(nfsstat3::NFS3ERR_INVAL);
        }
        put_opaque(out, &sys::readlink(raw(obj)).map_err(to_nfsstat)?);
        Ok(())
    });
    Ok(())
}

/// How a READ may get its data.
pub enum ReadHow<'a> {
    /// Into the reply, however long the disk takes.
    Copy,
    /// Large READs into this thread's pipe, left in `.0` to be spliced into the socket
    /// after the reply; small ones into the reply.
    Splice(&'a mut Option<Piped>),
    /// Only if the page cache holds all of it (the caller is an async task that must not
    /// wait for a disk); otherwise nothing is written and `.0` is set.
    CachedOnly(&'a Cell<bool>),
}

/// Where a READ's data went.
enum ReadInto {
    /// This many bytes, appended to the reply.
    Reply(usize),
    /// Into this thread's pipe, to be spliced into the socket after the reply.
    Pipe(Piped),
    /// Nowhere: not all in the page cache.
    WouldBlock,
}

pub fn read(ctx: &Ctx, args: &mut XdrIn, out: &mut Vec<u8>, how: ReadHow) -> ProcResult {
    let fh = args.fh()?;
    let offset = args.u64()?;
    let count = args.u32()?.min(MAX_IO) as usize;
    let r = ctx.resolve(fh).and_then(|(v, obj)| {
        let st = sys::fstat(raw(&obj)).map_err(to_nfsstat)?;
        let rfd = io_for(ctx, &v, &obj, &st, false)?;
        Ok((v, st, obj, rfd))
    });
    let (v, st, _obj, rfd) = match r {
        Ok(x) => x,
        Err(s) => {
            status(out, s);
            post_op(out, None, 0);
            return Ok(());
        }
    };
    // Status, attributes, then count, eof and the data's length, filled in below.
    let start = out.len();
    status(out, nfsstat3::NFS3_OK);
    post_op(out, Some(&st), v.meta.id);
    let counts_at = out.len();
    out.extend_from_slice(&[0u8; 12]);
    let got = match &how {
        ReadHow::Splice(_) if count >= splice::MIN_SPLICE => {
            splice::file_to_pipe(rfd, offset, count).and_then(|piped| match piped {
                Some(p) => Ok(ReadInto::Pipe(p)),
                None => sys::pread_append(rfd, out, count, offset, false).map(ReadInto::Reply),
            })
        }
        // Large READs go to the blocking pool, to be spliced.
        ReadHow::CachedOnly(_) if count >= splice::MIN_SPLICE => Ok(ReadInto::WouldBlock),
        ReadHow::CachedOnly(_) => match sys::pread_append(rfd, out, count, offset, true) {
            // All of it, or all there is before the end of the file.
            Ok(n) if n == count || offset + n as u64 >= st.st_size as u64 => Ok(ReadInto::Reply(n)),
            // Short, not cached, or not supported here: the blocking path will tell.
            _ => Ok(ReadInto::WouldBlock),
        },
        _ => sys::pread_append(rfd, out, count, offset, false).map(ReadInto::Reply),
    };
    let n = match got {
        Ok(ReadInto::Reply(n)) => {
            out.extend_from_slice(&[0u8; 3][..(4 - n % 4) % 4]);
            n
        }
        Ok(ReadInto::Pipe(p)) => {
            let n = p.len();
            // Padded when it is sent.
            if let ReadHow::Splice(slot) = how {
                *slot = Some(p);
            }
            n
        }
        Ok(ReadInto::WouldBlock) => {
            out.truncate(start);
            if let ReadHow::CachedOnly(flag) = how {
                flag.set(true);
            }
            return Ok(());
        }
        Err(e) => {
            out.truncate(start);
            status(out, to_nfsstat(e));
            post_op(out, Some(&st), v.meta.id);
            return Ok(());
        }
    };
    ctx.bytes.set(n as u64);
    let eof = offset.saturating_add(n as u64) >= st.st_size as u64;
    out[counts_at..counts_at + 4].copy_from_slice(&(n as u32).to_be_bytes());
    out[counts_at + 4..counts_at + 8].copy_from_slice(&u32::from(eof).to_be_bytes());
    out[counts_at + 8..counts_at + 12].copy_from_slice(&(n as u32).to_be_bytes());
    Ok(())
}

pub fn write(ctx: &Ctx, args: &mut XdrIn, out: &mut Vec<u8>) -> ProcResult {
    let fh = args.fh()?;
    let offset = args.u64()?;
    let count = args.u32()?;
    let stable = args.u32()?;
    let data = args.opaque(MAX_IO as usize)?;
    let stable = match stable {
        0 => stable_how::UNSTABLE,
        1 => stable_how::DATA_SYNC,
        2 => stable_how::FILE_SYNC,
        _ => return Err(Garbage),
    };
    let data = &data[..data.len().min(count as usize)];
    let (v, fd) = match ctx.resolve(fh) {
        Ok(x) => x,
        Err(s) => {
            status(out, s);
            wcc(out, None, None, 0);
            return Ok(());
        }
    };
    let before = stat_opt(&fd);
    let result = (|| {
        let st = before.ok_or(nfsstat3::NFS3ERR_STALE)?;
        let wfd = io_for(ctx, &v, &fd, &st, true)?;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(nfsstat3::NFS3ERR_FBIG)?;
        {
            let charging = v.charging();
            let st = sys::fstat(wfd).map_err(to_nfsstat)?;
            let before = quota::charge_of(&st);
            // At most: the new size, rounded up to whole blocks.
            let block = (st.st_blksize as u64).max(512);
            let reserve = end
                .max(st.st_size as u64)
                .div_ceil(block)
                .saturating_mul(block)
                .saturating_sub(before);
            charging.reserve(reserve)?;
            let r = sys::pwrite_all(wfd, data, offset);
            // What the disk spent, short writes included; if even fstat fails the
            // reservation stays charged (the periodic re-count corrects it).
            let after = sys::fstat(wfd).map_or(before + reserve, |st| quota::charge_of(&st));
            charging.settle(reserve, before, after);
            r.map_err(to_nfsstat)?;
            drop_setid_bits(ctx, &v, wfd, st.st_mode)?;
        }
        // Synced before the reply: acknowledged data is on disk.
        match stable {
            stable_how::FILE_SYNC => sys::fsync(wfd).map_err(to_nfsstat)?,
            stable_how::DATA_SYNC => sys::fdatasync(wfd).map_err(to_nfsstat)?,
            stable_how::UNSTABLE => {}
        }
        Ok(())
    })();
    let after = stat_opt(&fd);
    match result {
        Ok(()) => {
            ctx.bytes.set(data.len() as u64);
            status(out, nfsstat3::NFS3_OK);
            wcc(out, before.as_ref(), after.as_ref(), v.meta.id);
            put_u32(out, data.len() as u32);
            put_u32(out, stable as u32);
            out.extend_from_slice(&ctx.ex.verifier);
        }
        Err(s) => {
            status(out, s);
            wcc(out, before.as_ref(), after.as_ref(), v.meta.id);
        }
    }
    Ok(())
}

/// After a WRITE: a writer other than root loses a file's set-user-ID bit, and its
/// set-group-ID bit when the group may execute it — what the kernel does to a local
/// write by a process without CAP_FSETID. The agent writes through a descriptor it
/// opened as root, so the kernel will not do it here by itself.
fn drop_setid_bits(
    ctx: &Ctx,
    v: &Volume,
    fd: std::os::fd::RawFd,
    mode: u32,
) -> Result<(), nfsstat3> {
    if ctx.caller(v).uid == 0 {
        return Ok(());
    }
    let mut keep = mode & 0o7777;
    keep &= !libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        keep &= !libc::S_ISGID;
    }
    if keep != mode & 0o7777 {
        sys::chmod_fd(fd, keep).map_err(to_nfsstat)?;
    }
    Ok(())
}

pub fn commit(ctx: &Ctx, args: &mut XdrIn, out: &mut Vec<u8>) -> ProcResult {
    let fh = args.fh()?;
    let _offset = args.u64()?;
    let _count = args.u32()?;
    let (v, fd) = match ctx.resolve(fh) {
        Ok(x) => x,
        Err(s) => {
            status(out, s);
            wcc(out, None, None, 0);
            return Ok(());
        }
    };
    let before = stat_opt(&fd);
    // Syncing needs no permission; it only makes durable what was already written.
    let result = match before.as_ref().map(|st| st.st_mode & libc::S_IFMT) {
        Some(libc::S_IFREG) => fd
            .io_fd(false)
            .and_then(|f| sys::fsync(f).map_err(to_nfsstat)),
        Some(libc::S_IFDIR) => Err(nfsstat3::NFS3ERR_ISDIR),
        _ => Err(nfsstat3::NFS3ERR_INVAL),
    };
    let after = stat_opt(&fd);
    match result {
        Ok(()) => {
            status(out, nfsstat3::NFS3_OK);
            wcc(out, before.as_ref(), after.as_ref(), v.meta.id);
            out.extend_from_slice(&ctx.ex.verifier);
        }
        Err(s) => {
            status(out, s);
            wcc(out, before.as_ref(), after.as_ref(), v.meta.id);
        }
    }
    Ok(())
}

pub fn fsstat(ctx: &Ctx, args: &mut XdrIn, out: &mut Vec<u8>) -> ProcResult {
    let fh = args.fh()?;
    with_attrs(ctx, fh, out, |v, _, _, out| {
        let vfs = sys::statvfs(raw(&v.root)).map_err(to_nfsstat)?;
        // The volume's own size and free space, so `df` shows the PVC size
        // (`df` in the pod shows the claim's size). Free space is also capped by the real disk.
        let disk_free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
        let free = v.free().min(disk_free);
        put_u64(out, v.limit.load(std::sync::atomic::Ordering::Acquire));
        put_u64(out, free);
        put_u64(out, free);
        put_u64(out, vfs.f_files);
        put_u64(out, vfs.f_ffree);
        put_u64(out, vfs.f_favail);
        put_u32(out, 0); // invarsec
        Ok(())
    });
    Ok(())
}

pub fn fsinfo(ctx: &Ctx, args: &mut XdrIn, out: &mut Vec<u8>) -> ProcResult {
    use nfs3_types::nfs3::{FSF3_CANSETTIME, FSF3_HOMOGENEOUS, FSF3_LINK, FSF3_SYMLINK};
    let fh = args.fh()?;
    with_attrs(ctx, fh, out, |_, _, _, out| {
        for x in [MAX_IO, MAX_IO, 4096, MAX_IO, MAX_IO, 4096, 64 * 1024] {
            put_u32(out, x);
        }
        put_u64(out, i64::MAX as u64); // maxfilesize
        put_u32(out, 0); // time_delta: 1 ns
        put_u32(out, 1);
        put_u32(
            out,
            FSF3_LINK | FSF3_SYMLINK | FSF3_HOMOGENEOUS | FSF3_CANSETTIME,
        );
        Ok(())
    });
    Ok(())
}

pub fn pathconf(ctx: &Ctx, args: &mut XdrIn, out: &mut Vec<u8>) -> ProcResult {
    let fh = args.fh()?;
    with_attrs(ctx, fh, out, |_, _, _, out| {
        put_u32(out, 65000); // linkmax
        put_u32(out, 255); // name_max
        put_bool(out, true); // no_trunc
        put_bool(out, true); // chown_restricted
        put_bool(out, false); // case_insensitive
        put_bool(out, true); // case_preserving
        Ok(())
    });
    Ok(())
}
