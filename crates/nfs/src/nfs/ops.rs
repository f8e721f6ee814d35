//! NFSv3 procedures on attributes and file data: GETATTR, SETATTR, ACCESS, READLINK,
//! READ, WRITE, COMMIT, FSSTAT, FSINFO, PATHCONF (RFC 1813 §3.3).
//!
//! Every procedure resolves its handle as root (open_by_handle_at needs
//! CAP_DAC_READ_SEARCH), then acts with the caller's fs credentials so the kernel
//! enforces permissions and ownership: a call never runs with more rights than its caller.
//! A procedure decodes its arguments, resolves its handle with `?` (a call that stops
//! there is answered with empty attributes) and returns its results with the attributes
//! its reply carries; `reply::encode` writes them.
//!
//! SETATTR's size, mode and owner and WRITE's data and set-id clearing each run under
//! the volume's charge lock (`quota`): charges stay exact, and a WRITE's set-id
//! clearing never undoes a chmod that raced it. Under that lock, before changing
//! anything, they let a running point-in-time copy preserve what they change
//! (`snapshot`).

use std::cell::Cell;
use std::net::IpAddr;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::Arc;

use nfs3_types::nfs3::{Nfs3Option, fattr3, nfsstat3, set_atime, set_mtime, stable_how};

use super::attr::{self, Caller};
use super::handle::FileHandle;
use super::limits::MAX_IO;
use super::quota;
use super::reply::{Answer, Early, Encode, PostOp, Proc, Results, Target, Wcc};
use super::rpc::Credential;
use super::snapshot;
use super::splice::Piped;
use super::state::{Exports, Obj, Volume};
use super::sys::{self, AsCaller, raw, to_nfsstat};
use super::writeback;
use super::xdr::{XdrIn, put_bool, put_u32, put_u64};

/// One request's context.
pub struct Ctx<'a> {
    pub ex: &'a Exports,
    pub client: IpAddr,
    pub cred: &'a Credential,
    /// The volume the call's (first) handle resolved to, for its metrics.
    pub volume: Cell<Option<Arc<Volume>>>,
    /// Data bytes a READ returned or a WRITE wrote, for the metrics.
    pub bytes: Cell<u64>,
    /// The call runs on the connection's async task, which must not wait for a disk:
    /// a READ or LOOKUP the page and dentry caches cannot answer stops with
    /// [`Early::WouldBlock`] (nothing done) and runs again on the blocking pool.
    pub cached_only: bool,
    /// The call's first handle as routing (`qos::route`) found it in the record and
    /// opened it: resolving those very bytes does not check their MAC again.
    pub checked: Option<(&'a [u8], &'a FileHandle)>,
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

    /// Resolves a handle to its volume, object and the object's attributes now. With
    /// `cached_only`, a handle whose object is not open already stops the call with
    /// [`Early::WouldBlock`]: opening it may read the inode (and a directory's parents)
    /// from the disk.
    pub fn resolve(&self, fh: &[u8]) -> Result<(Arc<Volume>, Arc<Obj>, libc::stat), Early> {
        if self.cached_only && !self.ex.holds(fh) {
            return Err(Early::WouldBlock);
        }
        let opened = self
            .checked
            .filter(|(wire, _)| std::ptr::eq(*wire, fh))
            .map(|(_, h)| h);
        let (v, obj, st) = self.ex.resolve_opened(self.client, fh, opened)?;
        // Removed while a copy runs: only the copy's keep link holds it, and its
        // handle is as stale as it would be without the copy.
        if snapshot::only_kept(&v, &st) {
            return Err(nfsstat3::NFS3ERR_STALE.into());
        }
        self.counts_for(&v);
        Ok((v, obj, st))
    }

    /// Counts the call for `v` in the metrics (unless a handle resolved before).
    pub fn counts_for(&self, v: &Arc<Volume>) {
        let first = self.volume.take().unwrap_or_else(|| v.clone());
        self.volume.set(Some(first));
    }
}

fn stat_opt(fd: &OwnedFd) -> Option<libc::stat> {
    sys::fstat(raw(fd)).ok()
}

/// The procedures that answer `status, post_op_attr, results`: `body` computes the
/// results from the resolved object and its attributes.
fn with_attrs<T>(
    ctx: &Ctx,
    fh: &[u8],
    body: impl FnOnce(&Volume, &Obj, &libc::stat) -> Result<T, nfsstat3>,
) -> Proc<T, PostOp> {
    let (v, obj, st) = ctx.resolve(fh)?;
    let result = body(&v, &obj, &st);
    Ok(Answer::with(PostOp::of(Some(&st), v.meta.id), result))
}

/// The procedures that change one object and answer `status, wcc_data, results`:
/// `body` runs with the object and its attributes before the change; the attributes
/// after are read once it is done, whatever it returned.
fn changing<T>(
    ctx: &Ctx,
    fh: &[u8],
    body: impl FnOnce(&Volume, &Obj, &libc::stat) -> Result<T, nfsstat3>,
) -> Proc<T, Wcc> {
    let (v, obj, before) = ctx.resolve(fh)?;
    let result = body(&v, &obj, &before);
    let after = stat_opt(&obj);
    Ok(Answer::with(
        Wcc::of(Some(&before), after.as_ref(), v.meta.id),
        result,
    ))
}

pub fn getattr(ctx: &Ctx, args: &mut XdrIn) -> Proc<fattr3> {
    let fh = args.fh()?;
    let (v, _, st) = ctx.resolve(fh)?;
    Ok(Answer::with((), Ok(attr::fattr(&st, v.meta.id))))
}

pub fn setattr(ctx: &Ctx, args: &mut XdrIn) -> Proc<(), Wcc> {
    let fh = args.fh()?;
    let sattr = args.sattr()?;
    let guard = args.guard()?;
    changing(ctx, fh, |v, fd, st| {
        if let Some(ctime) = guard {
            let now = attr::wcc(st).ctime;
            if now != ctime {
                return Err(nfsstat3::NFS3ERR_NOT_SYNC);
            }
        }
        let as_caller = ctx.become_caller(v)?;
        {
            // Size, mode and owner under the volume's charge lock: the size is a
            // charge, and a WRITE clears set-id bits under the same lock
            // (`drop_setid_bits`), so it never writes back a mode read before this
            // chmod.
            let charging = v.charging();
            snapshot::before_change(v, raw(fd), None);
            if let Nfs3Option::Some(size) = sattr.size {
                if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    return Err(nfsstat3::NFS3ERR_ISDIR);
                }
                let wfd = io_for(ctx, v, fd, st, true)?;
                set_size(v, &charging, wfd, size)?;
            }
            if let Nfs3Option::Some(mode) = sattr.mode
                && st.st_mode & libc::S_IFMT != libc::S_IFLNK
            {
                sys::chmod_fd(raw(fd), mode & 0o7777).map_err(to_nfsstat)?;
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
                sys::fchownat_empty(raw(fd), uid, gid).map_err(to_nfsstat)?;
            }
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
            sys::utimes_fd(raw(fd), atime, mtime).map_err(to_nfsstat)?;
        }
        drop(as_caller);
        fd.sync(v, st.st_mode)
    })
}

/// Truncates or extends a file, keeping the volume's usage right. Growth past the
/// limit fails with DQUOT and changes nothing; a file whose last link is gone fails
/// with STALE (see [`quota::linked`]).
pub fn set_size(
    v: &Volume,
    charging: &quota::Charging,
    fd: std::os::fd::RawFd,
    size: u64,
) -> Result<(), nfsstat3> {
    let st = sys::fstat(fd).map_err(to_nfsstat)?;
    quota::linked(&st)?;
    if snapshot::only_kept(v, &st) {
        return Err(nfsstat3::NFS3ERR_STALE);
    }
    // What a truncate cuts off, for a copy that has not read it yet.
    snapshot::before_change(v, fd, Some((size, u64::MAX)));
    let before = quota::charge_of(&st);
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

pub fn access(ctx: &Ctx, args: &mut XdrIn) -> Proc<u32, PostOp> {
    let fh = args.fh()?;
    let requested = args.u32()?;
    with_attrs(ctx, fh, |v, _, st| {
        let caller = ctx.caller(v);
        Ok(attr::access(
            st.st_mode, st.st_uid, st.st_gid, &caller, requested,
        ))
    })
}

pub fn readlink(ctx: &Ctx, args: &mut XdrIn) -> Proc<Target, PostOp> {
    let fh = args.fh()?;
    with_attrs(ctx, fh, |_, obj, st| {
        if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            return Err(nfsstat3::NFS3ERR_INVAL);
        }
        Ok(Target(sys::readlink(raw(obj)).map_err(to_nfsstat)?))
    })
}

/// READ's results.
pub struct ReadOk<'a> {
    /// The file's size when the call began, for `eof`.
    size: u64,
    offset: u64,
    data: ReadData,
    /// Where the count of bytes returned goes, for the metrics.
    bytes: &'a Cell<u64>,
}

enum ReadData {
    /// Read already (from the page cache, on the connection task).
    Bytes(Vec<u8>),
    /// This many bytes in this thread's pipe, spliced into the socket after the reply
    /// (and padded there).
    Piped(usize),
    /// Up to this many bytes of the file (its I/O descriptor, kept open by the object),
    /// read straight into the reply as it is written: no second buffer, so the reply
    /// is all the memory the call holds.
    File(Arc<Obj>, RawFd, usize),
}

impl Results for ReadOk<'_> {
    fn encode_results(self, out: &mut Vec<u8>) -> Result<(), nfsstat3> {
        // count, eof, then the data's length and the data.
        let at = out.len();
        out.extend_from_slice(&[0u8; 12]);
        let (n, padded) = match self.data {
            ReadData::Bytes(b) => {
                out.extend_from_slice(&b);
                (b.len(), true)
            }
            ReadData::Piped(n) => (n, false),
            ReadData::File(_obj, fd, count) => (
                sys::pread_append(fd, out, count, self.offset, false).map_err(to_nfsstat)?,
                true,
            ),
        };
        if padded {
            out.extend_from_slice(&[0u8; 3][..(4 - n % 4) % 4]);
        }
        let eof = self.offset.saturating_add(n as u64) >= self.size;
        out[at..at + 4].copy_from_slice(&(n as u32).to_be_bytes());
        out[at + 4..at + 8].copy_from_slice(&u32::from(eof).to_be_bytes());
        out[at + 8..at + 12].copy_from_slice(&(n as u32).to_be_bytes());
        self.bytes.set(n as u64);
        Ok(())
    }
}

/// READ. With `splice`, large READs go into this thread's pipe, left there to be
/// spliced into the socket after the reply; otherwise into the reply. With
/// `ctx.cached_only`, only what the page cache holds.
pub fn read<'a>(
    ctx: &'a Ctx,
    args: &mut XdrIn,
    splice: Option<&mut Option<Piped>>,
) -> Proc<ReadOk<'a>, PostOp> {
    let fh = args.fh()?;
    let offset = args.u64()?;
    let count = args.u32()?.min(MAX_IO) as usize;
    let (v, obj, st) = ctx.resolve(fh)?;
    let rfd = io_for(ctx, &v, &obj, &st, false)?;
    let size = st.st_size as u64;
    let data = match splice {
        _ if ctx.cached_only => {
            // Large READs go to the blocking pool, to be spliced.
            if count >= super::splice::MIN_SPLICE {
                return Err(Early::WouldBlock);
            }
            let mut b = Vec::with_capacity(count.min(size.saturating_sub(offset) as usize));
            match sys::pread_append(rfd, &mut b, count, offset, true) {
                // All of it, or all there is before the end of the file.
                Ok(n) if n == count || offset + n as u64 >= size => Ok(ReadData::Bytes(b)),
                // Short, not cached, or not supported here: the blocking path will tell.
                _ => return Err(Early::WouldBlock),
            }
        }
        Some(slot) if count >= super::splice::MIN_SPLICE => {
            match super::splice::file_to_pipe(rfd, offset, count) {
                Ok(Some(p)) => {
                    let n = p.len();
                    *slot = Some(p);
                    Ok(ReadData::Piped(n))
                }
                Ok(None) => Ok(ReadData::File(obj.clone(), rfd, count)),
                Err(e) => Err(to_nfsstat(e)),
            }
        }
        _ => Ok(ReadData::File(obj.clone(), rfd, count)),
    };
    let result = data.map(|data| ReadOk {
        size,
        offset,
        data,
        bytes: &ctx.bytes,
    });
    Ok(Answer::with(PostOp::of(Some(&st), v.meta.id), result))
}

/// WRITE's results.
pub struct Written {
    count: u32,
    committed: stable_how,
    verifier: [u8; 8],
}

impl Encode for Written {
    fn encode(self, out: &mut Vec<u8>) {
        put_u32(out, self.count);
        put_u32(out, self.committed as u32);
        out.extend_from_slice(&self.verifier);
    }
}

pub fn write(ctx: &Ctx, args: &mut XdrIn) -> Proc<Written, Wcc> {
    let fh = args.fh()?;
    let offset = args.u64()?;
    let count = args.u32()?;
    let stable = args.u32()?;
    let data = args.opaque(MAX_IO as usize)?;
    let stable = match stable {
        0 => stable_how::UNSTABLE,
        1 => stable_how::DATA_SYNC,
        2 => stable_how::FILE_SYNC,
        _ => return Err(Early::Garbage),
    };
    let data = &data[..data.len().min(count as usize)];
    changing(ctx, fh, |v, fd, st| {
        let wfd = io_for(ctx, v, fd, st, true)?;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(nfsstat3::NFS3ERR_FBIG)?;
        {
            let charging = v.charging();
            let st = sys::fstat(wfd).map_err(to_nfsstat)?;
            quota::linked(&st)?;
            if snapshot::only_kept(v, &st) {
                return Err(nfsstat3::NFS3ERR_STALE);
            }
            let before = quota::charge_of(&st);
            // At most: the new size, rounded up to whole blocks.
            let block = (st.st_blksize as u64).max(512);
            let reserve = end
                .max(st.st_size as u64)
                .div_ceil(block)
                .saturating_mul(block)
                .saturating_sub(before);
            charging.reserve(reserve)?;
            // What this overwrites, for a copy that has not read it yet.
            snapshot::before_change(v, wfd, Some((offset, end)));
            let r = sys::pwrite_all(wfd, data, offset);
            // What the disk spent, short writes included; if even fstat fails the
            // reservation stays charged (the periodic re-count corrects it).
            let after = sys::fstat(wfd).map_or(before + reserve, |st| quota::charge_of(&st));
            charging.settle(reserve, before, after);
            r.map_err(to_nfsstat)?;
            drop_setid_bits(ctx, v, wfd, st.st_mode)?;
        }
        // Synced before the reply: acknowledged data is on disk.
        match stable {
            stable_how::FILE_SYNC => sys::fsync(wfd).map_err(to_nfsstat)?,
            stable_how::DATA_SYNC => sys::fdatasync(wfd).map_err(to_nfsstat)?,
            stable_how::UNSTABLE => {
                writeback::wrote(&v.qos.backlog, &fd.unkicked, wfd, data.len() as u64)
            }
        }
        ctx.bytes.set(data.len() as u64);
        Ok(Written {
            count: data.len() as u32,
            committed: stable,
            verifier: ctx.ex.verifier,
        })
    })
}

/// After a WRITE: a writer other than root loses a file's set-user-ID bit, and its
/// set-group-ID bit when the group may execute it — what the kernel does to a local
/// write by a process without CAP_FSETID. The agent writes through a descriptor it
/// opened as root, so the kernel will not do it here by itself.
///
/// `mode` was read under the volume's charge lock, and this runs under it too:
/// SETATTR changes modes under the same lock, so the mode written back is never one
/// an owner's chmod has replaced meanwhile. (The kernel has no "clear these bits"
/// call; a lock is the only way to make read-then-chmod one step. The volume's lock
/// rather than one per inode: a WRITE holds it already, and two handles of one inode
/// may be open at once, so a lock per cached object would not cover them.)
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

pub fn commit(ctx: &Ctx, args: &mut XdrIn) -> Proc<[u8; 8], Wcc> {
    let fh = args.fh()?;
    let _offset = args.u64()?;
    let _count = args.u32()?;
    // Syncing needs no permission; it only makes durable what was already written.
    changing(ctx, fh, |v, fd, st| {
        match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => {
                sys::fsync(fd.io_fd(false)?).map_err(to_nfsstat)?;
                writeback::synced(&v.qos.backlog, &fd.unkicked);
            }
            libc::S_IFDIR => return Err(nfsstat3::NFS3ERR_ISDIR),
            _ => return Err(nfsstat3::NFS3ERR_INVAL),
        }
        Ok(ctx.ex.verifier)
    })
}

/// FSSTAT's results.
pub struct FsStat {
    bytes: u64,
    free: u64,
    files: u64,
    ffree: u64,
    favail: u64,
}

impl Encode for FsStat {
    fn encode(self, out: &mut Vec<u8>) {
        for x in [
            self.bytes,
            self.free,
            self.free,
            self.files,
            self.ffree,
            self.favail,
        ] {
            put_u64(out, x);
        }
        put_u32(out, 0); // invarsec
    }
}

pub fn fsstat(ctx: &Ctx, args: &mut XdrIn) -> Proc<FsStat, PostOp> {
    let fh = args.fh()?;
    with_attrs(ctx, fh, |v, _, _| {
        let vfs = sys::statvfs(raw(&v.root)).map_err(to_nfsstat)?;
        // The volume's own size and free space, so `df` in the pod shows the claim's
        // size. Free space is also capped by the real disk.
        let disk_free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
        Ok(FsStat {
            bytes: v.limit.load(std::sync::atomic::Ordering::Acquire),
            free: v.free().min(disk_free),
            files: vfs.f_files,
            ffree: vfs.f_ffree,
            favail: vfs.f_favail,
        })
    })
}

/// FSINFO's results: the same for every volume.
pub struct FsInfo;

impl Encode for FsInfo {
    fn encode(self, out: &mut Vec<u8>) {
        use nfs3_types::nfs3::{FSF3_CANSETTIME, FSF3_HOMOGENEOUS, FSF3_LINK, FSF3_SYMLINK};
        // rtmax, rtpref, rtmult, wtmax, wtpref, wtmult, dtpref.
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
    }
}

pub fn fsinfo(ctx: &Ctx, args: &mut XdrIn) -> Proc<FsInfo, PostOp> {
    let fh = args.fh()?;
    with_attrs(ctx, fh, |_, _, _| Ok(FsInfo))
}

/// PATHCONF's results: the same for every volume.
pub struct PathConf;

impl Encode for PathConf {
    fn encode(self, out: &mut Vec<u8>) {
        put_u32(out, 65000); // linkmax
        put_u32(out, 255); // name_max
        put_bool(out, true); // no_trunc
        put_bool(out, true); // chown_restricted
        put_bool(out, false); // case_insensitive
        put_bool(out, true); // case_preserving
    }
}

pub fn pathconf(ctx: &Ctx, args: &mut XdrIn) -> Proc<PathConf, PostOp> {
    let fh = args.fh()?;
    with_attrs(ctx, fh, |_, _, _| Ok(PathConf))
}
