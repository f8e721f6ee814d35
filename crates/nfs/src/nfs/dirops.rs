//! NFSv3 procedures on the namespace: LOOKUP, CREATE, MKDIR, SYMLINK, MKNOD, REMOVE,
//! RMDIR, RENAME, LINK, READDIR, READDIRPLUS (RFC 1813 §3.3).
//!
//! The jail (nothing a client sends reaches outside the volume it mounted): names are single components (no `/`, no NUL), `..`
//! at a volume root is refused, every call is `*at` relative to a descriptor inside the
//! volume and never follows a symlink, and both handles of RENAME/LINK must belong to
//! the same volume.
//!
//! Accounting: every namespace change runs under the volume's charge lock (see
//! `quota`), so while a call holds it the names it changes are its own. A create whose
//! attribute step fails (an owner the caller may not give away, a size past the limit)
//! removes what it made and gives its charge back before it answers: nothing exists
//! uncharged. An object's charge is released once, by the REMOVE or RENAME that takes
//! its last link.
//!
//! Permissions: READDIRPLUS applies LOOKUP's check. A caller who may read a directory
//! but not search it gets its names, without attributes or handles (RFC 1813
//! §3.3.17), as from knfsd.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use nfs3_types::nfs3::{Nfs3Option, createverf3, nfsstat3, sattr3};

use super::ops::{Ctx, set_size};
use super::quota::{self, Charging};
use super::reply::{Answer, Early, Encode, Fh, PostOp, PostOpFh, Proc, Wcc};
use super::snapshot;
use super::state::{Obj, Volume};
use super::sys::{self, raw, to_nfsstat};
use super::xdr::{XdrIn, put_bool, put_opaque, put_u64};

/// NAME_MAX.
const NAME_MAX: usize = 255;

/// Largest READDIR/READDIRPLUS reply body we build, whatever the client asks for: the
/// largest READ we answer (FSINFO `rtmax`), 16 times the `dtpref` we advertise.
const MAX_DIR_REPLY: usize = super::limits::MAX_IO as usize;

/// A name that may be looked up: one path component.
fn check_name(name: &[u8]) -> Result<(), nfsstat3> {
    if name.is_empty() {
        return Err(nfsstat3::NFS3ERR_NOENT);
    }
    if name.len() > NAME_MAX {
        return Err(nfsstat3::NFS3ERR_NAMETOOLONG);
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(nfsstat3::NFS3ERR_ACCES);
    }
    Ok(())
}

/// A name that may be created, removed or renamed: not `.` or `..` either.
fn check_new_name(name: &[u8]) -> Result<(), nfsstat3> {
    check_name(name)?;
    if name == b"." || name == b".." {
        return Err(nfsstat3::NFS3ERR_EXIST);
    }
    Ok(())
}

/// Resolves a directory handle; fails with NOTDIR for anything else.
fn resolve_dir(ctx: &Ctx, fh: &[u8]) -> Result<(Arc<Volume>, Arc<Obj>, libc::stat), Early> {
    let (v, fd, st) = ctx.resolve(fh)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(nfsstat3::NFS3ERR_NOTDIR.into());
    }
    Ok((v, fd, st))
}

/// Looks `name` up in `dir` as the caller, refusing `..` at the volume root. With
/// `ctx.cached_only`, from the dentry cache only: a lookup that would read the disk
/// (or a kernel without `RESOLVE_CACHED`) stops with [`Early::WouldBlock`].
fn lookup_in(
    ctx: &Ctx,
    v: &Volume,
    dir: &OwnedFd,
    dir_st: &libc::stat,
    name: &[u8],
) -> Result<Result<OwnedFd, nfsstat3>, Early> {
    let checked = check_name(name).and_then(|()| {
        if name == b".." && v.is_root(dir_st) {
            return Err(nfsstat3::NFS3ERR_ACCES);
        }
        Ok(())
    });
    let as_caller = match checked.and_then(|()| ctx.become_caller(v)) {
        Ok(g) => g,
        Err(s) => return Ok(Err(s)),
    };
    if !ctx.cached_only {
        return Ok(sys::openat(raw(dir), name, libc::O_PATH, 0).map_err(to_nfsstat));
    }
    let found = sys::open_path_cached(raw(dir), name);
    drop(as_caller);
    match found {
        Ok(fd) => Ok(Ok(fd)),
        // Answers the caches can give for sure.
        Err(e) if matches!(e.0, libc::ENOENT | libc::EACCES | libc::ENOTDIR) => {
            Ok(Err(to_nfsstat(e)))
        }
        Err(_) => Err(Early::WouldBlock),
    }
}

/// LOOKUP: the object's handle and attributes, then the directory's either way.
pub fn lookup(ctx: &Ctx, args: &mut XdrIn) -> Proc<(Fh, PostOp), (), PostOp> {
    let dir_fh = args.fh()?;
    let name = args.filename()?;
    let (v, dir, dir_st) = resolve_dir(ctx, dir_fh)?;
    let found = lookup_in(ctx, &v, &dir, &dir_st, name)?.and_then(|fd| {
        let st = sys::fstat(raw(&fd)).map_err(to_nfsstat)?;
        let fh = Fh(ctx.ex.handle_for(&v, raw(&fd))?);
        Ok((fh, PostOp::of(Some(&st), v.meta.id)))
    });
    Ok(Answer::then(found, PostOp::of(Some(&dir_st), v.meta.id)))
}

/// Shared shape of CREATE, MKDIR, SYMLINK and MKNOD: resolve the directory, then
/// under the volume's charge lock run `make` as the caller (it makes `name` and says
/// whether the object is new) and charge the volume for what now exists, then `finish`
/// as the caller (the attributes beyond the mode; a size it charges itself). If
/// `finish` fails on a new object, the object is removed again and its charge given
/// back, still under the lock: a refused create leaves nothing behind, and nothing
/// exists that is not charged. Then make it durable and answer with the new object's
/// handle and attributes and the directory's wcc data.
///
/// Every namespace change of the server holds the charge lock, so while it is held
/// `name` is the object `make` made.
fn create_common(
    ctx: &Ctx,
    dir_fh: &[u8],
    name: &[u8],
    make: impl FnOnce(&OwnedFd) -> Result<bool, nfsstat3>,
    finish: impl FnOnce(&Volume, &Charging, &OwnedFd, bool) -> Result<(), nfsstat3>,
) -> Proc<Made, (), Wcc> {
    let (v, dir, before) = resolve_dir(ctx, dir_fh)?;
    let made = check_new_name(name).and_then(|()| {
        let fd = {
            let charging = v.charging();
            let dir_before = dir_charge(&v, &dir);
            charging.add_inode()?;
            if let Err(s) = charging.reserve(quota::NAMESPACE_RESERVE) {
                charging.remove_inode();
                return Err(s);
            }
            snapshot::before_dir_change(&v, raw(&dir));
            let mut new = false;
            let made = ctx.become_caller(&v).and_then(|_as| {
                new = make(&dir)?;
                sys::openat(raw(&dir), name, libc::O_PATH, 0).map_err(to_nfsstat)
            });
            if new && let Ok(fd) = &made {
                snapshot::made(&v, raw(fd));
            }
            // What exists now is charged now, before `finish` changes it (a size it
            // sets is charged by `set_size`, as a change of this object).
            let object = if new {
                sys::stat_at(raw(&dir), name).map_or(0, |st| quota::charge_of(&st))
            } else {
                charging.remove_inode();
                0
            };
            charging.settle(
                quota::NAMESPACE_RESERVE,
                dir_before,
                dir_charge(&v, &dir) + object,
            );
            let finished = made.and_then(|fd| {
                ctx.become_caller(&v)
                    .and_then(|_as| finish(&v, &charging, &fd, new))
                    .map(|()| fd)
            });
            if finished.is_err() && new {
                unmake(&v, &charging, &dir, name);
            }
            finished?
        };
        // After the charge lock is released: syncs of concurrent calls then share
        // journal commits.
        dir.sync(&v, before.st_mode)?;
        let st = sys::fstat(raw(&fd)).map_err(to_nfsstat)?;
        let fh = PostOpFh(Some(ctx.ex.handle_for(&v, raw(&fd))?));
        Ok((fh, PostOp::of(Some(&st), v.meta.id)))
    });
    let after = sys::fstat(raw(&dir)).ok();
    Ok(Answer::then(
        made,
        Wcc::of(Some(&before), after.as_ref(), v.meta.id),
    ))
}

/// Removes the object a create call just made as `name` in `dir`, whose attributes
/// could not be applied, and gives back what it was charged (object, directory
/// growth). Runs with the server's own rights: the object is the call's own, and the
/// caller's rights may be what refused it. If it cannot be removed it stays, charged.
/// Call with the charge lock held.
fn unmake(v: &Volume, charging: &Charging, dir: &Obj, name: &[u8]) {
    let Ok(st) = sys::stat_at(raw(dir), name) else {
        return;
    };
    let flags = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        libc::AT_REMOVEDIR
    } else {
        0
    };
    let dir_before = dir_charge(v, dir);
    match sys::unlinkat(raw(dir), name, flags) {
        Ok(()) => {
            charging.settle(0, quota::charge_of(&st) + dir_before, dir_charge(v, dir));
            charging.remove_inode();
        }
        Err(e) => tracing::warn!(
            volume = %v.meta.name,
            errno = e.0,
            "cannot remove an object whose create failed; it stays, charged"
        ),
    }
}

/// The results of CREATE, MKDIR, SYMLINK and MKNOD: the new object's handle and
/// attributes (the directory's wcc data follows them either way).
type Made = (PostOpFh, PostOp);

/// What a directory is charged now: 0 for the volume's root, which its usage does not
/// count (`VolumeStore::usage`), and if it cannot be read (the settle then charges
/// nothing for it).
fn dir_charge(v: &Volume, dir: &Obj) -> u64 {
    match sys::fstat(raw(dir)) {
        Ok(st) if !v.is_root(&st) => quota::charge_of(&st),
        _ => 0,
    }
}

/// Applies the attributes a create call carried beyond the mode.
fn apply_sattr(v: &Volume, charging: &Charging, fd: &OwnedFd, s: &sattr3) -> Result<(), nfsstat3> {
    set_owner(fd, s)?;
    if let Nfs3Option::Some(size) = s.size {
        // Opening anything but a regular file could block (a FIFO) or reach a device.
        if sys::fstat(raw(fd)).map_err(to_nfsstat)?.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(nfsstat3::NFS3ERR_INVAL);
        }
        let wfd = sys::reopen(raw(fd), libc::O_WRONLY).map_err(to_nfsstat)?;
        set_size(v, charging, raw(&wfd), size)?;
    }
    Ok(())
}

/// Gives `fd` the owner and group a create call asked for, if any.
fn set_owner(fd: &OwnedFd, s: &sattr3) -> Result<(), nfsstat3> {
    let uid = if let Nfs3Option::Some(u) = s.uid {
        u
    } else {
        u32::MAX
    };
    let gid = if let Nfs3Option::Some(g) = s.gid {
        g
    } else {
        u32::MAX
    };
    if uid != u32::MAX || gid != u32::MAX {
        sys::fchownat_empty(raw(fd), uid, gid).map_err(to_nfsstat)?;
    }
    Ok(())
}

/// What MKDIR, SYMLINK and MKNOD apply to the object they made: the owner the call
/// asked for (its mode was set when it was made; a size means nothing to it).
fn finish_owner(
    s: &sattr3,
) -> impl FnOnce(&Volume, &Charging, &OwnedFd, bool) -> Result<(), nfsstat3> {
    move |_, _, fd, _| set_owner(fd, s)
}

fn mode_or(s: &sattr3, default: u32) -> u32 {
    match s.mode {
        Nfs3Option::Some(m) => m & 0o7777,
        Nfs3Option::None => default,
    }
}

enum How {
    Unchecked(sattr3),
    Guarded(sattr3),
    Exclusive(createverf3),
}

pub fn create(ctx: &Ctx, args: &mut XdrIn) -> Proc<Made, (), Wcc> {
    let dir_fh = args.fh()?;
    let name = args.filename()?;
    let how = match args.u32()? {
        0 => How::Unchecked(args.sattr()?),
        1 => How::Guarded(args.sattr()?),
        2 => How::Exclusive(args.createverf()?),
        _ => return Err(Early::Garbage),
    };
    let make = |dir: &OwnedFd| {
        // The file is made with mknod, never opened: an existing name may be a FIFO
        // (an open would wait for a writer forever), a socket or a device, and no
        // CREATE opens it (nothing a client does may block a worker forever).
        match sys::mknodat(raw(dir), name, libc::S_IFREG | create_mode(&how), 0) {
            Ok(()) => Ok(true),
            // RFC 1813 §3.3.8: UNCHECKED takes an existing object as it is; EXCLUSIVE
            // finds its own file when the CREATE is retransmitted.
            Err(e) if e.0 == libc::EEXIST && !matches!(how, How::Guarded(_)) => Ok(false),
            Err(e) => Err(to_nfsstat(e)),
        }
    };
    let finish = |v: &Volume, charging: &Charging, fd: &OwnedFd, new: bool| match (&how, new) {
        (How::Unchecked(s) | How::Guarded(s), true) => apply_sattr(v, charging, fd, s),
        // As knfsd, only a size is applied to an existing object, and only to a
        // regular file.
        (How::Unchecked(s), false) => {
            let st = sys::fstat(raw(fd)).map_err(to_nfsstat)?;
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Ok(());
            }
            let size_only = sattr3 {
                size: s.size,
                ..sattr3::default()
            };
            apply_sattr(v, charging, fd, &size_only)
        }
        (How::Guarded(_), false) => Err(nfsstat3::NFS3ERR_EXIST),
        // The verifier lives in atime/mtime, as RFC 1813 §3.3.8 suggests, so a
        // retransmitted CREATE finds its own file and succeeds.
        (How::Exclusive(verf), true) => {
            let (a, m) = verf_times(verf);
            sys::utimes_fd(raw(fd), Some(Some(a)), Some(Some(m))).map_err(to_nfsstat)
        }
        (How::Exclusive(verf), false) => {
            let (a, m) = verf_times(verf);
            let st = sys::fstat(raw(fd)).map_err(to_nfsstat)?;
            if st.st_mode & libc::S_IFMT == libc::S_IFREG
                && (st.st_atime, st.st_atime_nsec, st.st_mtime, st.st_mtime_nsec)
                    == (a.0, a.1, m.0, m.1)
            {
                Ok(())
            } else {
                Err(nfsstat3::NFS3ERR_EXIST)
            }
        }
    };
    create_common(ctx, dir_fh, name, make, finish)
}

/// The mode a CREATE makes a new file with.
fn create_mode(how: &How) -> u32 {
    match how {
        How::Unchecked(s) | How::Guarded(s) => mode_or(s, 0o644),
        How::Exclusive(_) => 0o600,
    }
}

fn verf_times(v: &createverf3) -> ((i64, i64), (i64, i64)) {
    let a = u32::from_be_bytes([v.0[0], v.0[1], v.0[2], v.0[3]]);
    let m = u32::from_be_bytes([v.0[4], v.0[5], v.0[6], v.0[7]]);
    // Nanoseconds must stay below 1e9; keep the low bits there.
    (
        (i64::from(a >> 2), i64::from(a & 0x3)),
        (i64::from(m >> 2), i64::from(m & 0x3)),
    )
}

pub fn mkdir(ctx: &Ctx, args: &mut XdrIn) -> Proc<Made, (), Wcc> {
    let dir_fh = args.fh()?;
    let name = args.filename()?;
    let s = args.sattr()?;
    let make = |dir: &OwnedFd| {
        sys::mkdirat(raw(dir), name, mode_or(&s, 0o755)).map_err(to_nfsstat)?;
        Ok(true)
    };
    create_common(ctx, dir_fh, name, make, finish_owner(&s))
}

pub fn symlink(ctx: &Ctx, args: &mut XdrIn) -> Proc<Made, (), Wcc> {
    let dir_fh = args.fh()?;
    let name = args.filename()?;
    let s = args.sattr()?;
    let target = args.path()?;
    let make = |dir: &OwnedFd| {
        if target.is_empty() || target.contains(&0) {
            return Err(nfsstat3::NFS3ERR_INVAL);
        }
        sys::symlinkat(target, raw(dir), name).map_err(to_nfsstat)?;
        Ok(true)
    };
    create_common(ctx, dir_fh, name, make, finish_owner(&s))
}

pub fn mknod(ctx: &Ctx, args: &mut XdrIn) -> Proc<Made, (), Wcc> {
    let dir_fh = args.fh()?;
    let name = args.filename()?;
    let kind = args.u32()?;
    // FIFOs and sockets; device nodes only when the agent allows them (RFC 1813
    // §3.3.11: NF3BLK = 3 and NF3CHR = 4 carry major/minor in specdata3).
    let (s, fmt, dev) = match kind {
        3 | 4 if ctx.ex.device_nodes => {
            let s = args.sattr()?;
            let spec = args.specdata()?;
            let fmt = if kind == 3 {
                libc::S_IFBLK
            } else {
                libc::S_IFCHR
            };
            (s, fmt, libc::makedev(spec.specdata1, spec.specdata2))
        }
        3 | 4 => {
            let _ = args.sattr()?;
            let _ = args.specdata()?;
            return Err(nfsstat3::NFS3ERR_NOTSUPP.into());
        }
        6 => (args.sattr()?, libc::S_IFSOCK, 0),
        7 => (args.sattr()?, libc::S_IFIFO, 0),
        1 | 2 | 5 => return Err(nfsstat3::NFS3ERR_BADTYPE.into()),
        _ => return Err(Early::Garbage),
    };
    let make = |dir: &OwnedFd| {
        sys::mknodat(raw(dir), name, fmt | mode_or(&s, 0o644), dev).map_err(to_nfsstat)?;
        Ok(true)
    };
    create_common(ctx, dir_fh, name, make, finish_owner(&s))
}

/// After an unlink or a RENAME over it, releases what the object `fd` was charged if
/// that was its last link (checked after the fact, so a racing LINK is seen); true if
/// it is gone. Call with the charge lock held.
fn release_if_gone(charging: &Charging, fd: &OwnedFd, kept: bool) -> bool {
    // A link a running copy keeps in its staging directory is not the volume's.
    let kept = u64::from(kept);
    match sys::fstat(raw(fd)) {
        Ok(st) if st.st_nlink <= kept => {
            charging.settle(0, quota::charge_of(&st), 0);
            charging.remove_inode();
            true
        }
        _ => false,
    }
}

fn remove_common(ctx: &Ctx, args: &mut XdrIn, flags: i32) -> Proc<(), Wcc> {
    let dir_fh = args.fh()?;
    let name = args.filename()?;
    let (v, dir, before) = resolve_dir(ctx, dir_fh)?;
    let r = check_name(name).and_then(|()| {
        if name == b"." {
            return Err(nfsstat3::NFS3ERR_INVAL);
        }
        if name == b".." {
            return Err(nfsstat3::NFS3ERR_NOTEMPTY);
        }
        let _as = ctx.become_caller(&v)?;
        let (victim_fd, gone) = {
            // Under the charge lock: a LINK of the victim racing the unlink can no
            // longer make us give back space that a new link still holds.
            let charging = v.charging();
            let victim_fd = sys::openat(raw(&dir), name, libc::O_PATH, 0).map_err(to_nfsstat)?;
            let dir_before = dir_charge(&v, &dir);
            let kept = snapshot::before_unlink(&v, raw(&dir), name);
            sys::unlinkat(raw(&dir), name, flags).map_err(to_nfsstat)?;
            let gone = release_if_gone(&charging, &victim_fd, kept);
            charging.settle(0, dir_before, dir_charge(&v, &dir));
            (victim_fd, gone)
        };
        dir.sync(&v, before.st_mode)?;
        if gone {
            ctx.ex.forget(&v, raw(&victim_fd));
        }
        Ok(())
    });
    let after = sys::fstat(raw(&dir)).ok();
    Ok(Answer::with(
        Wcc::of(Some(&before), after.as_ref(), v.meta.id),
        r,
    ))
}

pub fn remove(ctx: &Ctx, args: &mut XdrIn) -> Proc<(), Wcc> {
    remove_common(ctx, args, 0)
}

pub fn rmdir(ctx: &Ctx, args: &mut XdrIn) -> Proc<(), Wcc> {
    remove_common(ctx, args, libc::AT_REMOVEDIR)
}

pub fn rename(ctx: &Ctx, args: &mut XdrIn) -> Proc<(), (Wcc, Wcc)> {
    let from_fh = args.fh()?;
    let from = args.filename()?;
    let to_fh = args.fh()?;
    let to = args.filename()?;
    let (v, from_dir, from_before) = resolve_dir(ctx, from_fh)?;
    let (v2, to_dir, to_before) = resolve_dir(ctx, to_fh)?;
    let r = (|| {
        if v.meta.id != v2.meta.id {
            return Err(nfsstat3::NFS3ERR_XDEV);
        }
        check_new_name(from)?;
        check_new_name(to)?;
        let _as = ctx.become_caller(&v)?;
        let replaced_gone = {
            // Under the charge lock, as REMOVE: the object a RENAME replaces is
            // released only if its last link went.
            let charging = v.charging();
            let replaced = sys::openat(raw(&to_dir), to, libc::O_PATH, 0).ok();
            charging.reserve(quota::NAMESPACE_RESERVE)?;
            let to_before_charge = dir_charge(&v, &to_dir);
            snapshot::before_dir_change(&v, raw(&from_dir));
            let kept = snapshot::before_unlink(&v, raw(&to_dir), to);
            let r = sys::renameat(raw(&from_dir), from, raw(&to_dir), to).map_err(to_nfsstat);
            charging.settle(
                quota::NAMESPACE_RESERVE,
                to_before_charge,
                dir_charge(&v, &to_dir),
            );
            r?;
            replaced.filter(|fd| release_if_gone(&charging, fd, kept))
        };
        from_dir.sync(&v, from_before.st_mode)?;
        if (to_before.st_ino, to_before.st_dev) != (from_before.st_ino, from_before.st_dev) {
            to_dir.sync(&v, to_before.st_mode)?;
        }
        if let Some(fd) = replaced_gone {
            ctx.ex.forget(&v, raw(&fd));
        }
        Ok(())
    })();
    let from_after = sys::fstat(raw(&from_dir)).ok();
    let to_after = sys::fstat(raw(&to_dir)).ok();
    let wcc = (
        Wcc::of(Some(&from_before), from_after.as_ref(), v.meta.id),
        Wcc::of(Some(&to_before), to_after.as_ref(), v2.meta.id),
    );
    Ok(Answer::with(wcc, r))
}

pub fn link(ctx: &Ctx, args: &mut XdrIn) -> Proc<(), (PostOp, Wcc)> {
    let file_fh = args.fh()?;
    let dir_fh = args.fh()?;
    let name = args.filename()?;
    let (v, file, _) = ctx.resolve(file_fh)?;
    let (v2, dir, before) = resolve_dir(ctx, dir_fh)?;
    let r = (|| {
        if v.meta.id != v2.meta.id {
            return Err(nfsstat3::NFS3ERR_XDEV);
        }
        check_new_name(name)?;
        {
            let _as = ctx.become_caller(&v)?;
            let charging = v.charging();
            // Removed since it resolved, its last link a copy's keep link: a new name
            // would bring back a file nothing is charged for.
            if sys::fstat(raw(&file)).is_ok_and(|st| snapshot::only_kept(&v, &st)) {
                return Err(nfsstat3::NFS3ERR_STALE);
            }
            charging.reserve(quota::NAMESPACE_RESERVE)?;
            let dir_before = dir_charge(&v, &dir);
            snapshot::before_dir_change(&v, raw(&dir));
            snapshot::before_change(&v, raw(&file), None);
            let r = sys::link_fd(raw(&file), raw(&dir), name).map_err(to_nfsstat);
            charging.settle(quota::NAMESPACE_RESERVE, dir_before, dir_charge(&v, &dir));
            r?;
        }
        dir.sync(&v, before.st_mode)
    })();
    let file_st = sys::fstat(raw(&file)).ok();
    let after = sys::fstat(raw(&dir)).ok();
    let attrs = (
        PostOp::of(file_st.as_ref(), v.meta.id),
        Wcc::of(Some(&before), after.as_ref(), v2.meta.id),
    );
    Ok(Answer::with(attrs, r))
}

/// READDIR (`plus == false`) and READDIRPLUS. Cookies are the directory offsets the
/// kernel reports, so they stay valid while a client pages through a large directory
/// and across server restarts; the cookie verifier is always zero.
/// READDIR's and READDIRPLUS's results: the entries, already in their XDR form.
pub struct Listing {
    entries: Vec<u8>,
    eof: bool,
}

impl Encode for Listing {
    fn encode(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[0u8; 8]); // cookieverf
        out.extend_from_slice(&self.entries);
        put_bool(out, false);
        put_bool(out, self.eof);
    }
}

pub fn readdir(ctx: &Ctx, args: &mut XdrIn, plus: bool) -> Proc<Listing, PostOp> {
    let dir_fh = args.fh()?;
    let cookie = args.u64()?;
    let _verf = args.fixed::<8>()?;
    let (dircount, maxcount) = if plus {
        (args.u32()? as usize, args.u32()? as usize)
    } else {
        let c = args.u32()? as usize;
        (c, c)
    };
    // The counts are the client's upper bounds, not a request the server must fill
    // (RFC 1813 §3.3.16, §3.3.17): a hostile 4 GiB count would otherwise build a reply
    // of the whole directory, past what memory and a record mark (31 bits) can carry.
    let (dircount, maxcount) = (dircount.min(MAX_DIR_REPLY), maxcount.min(MAX_DIR_REPLY));
    let (v, dir, dir_st) = resolve_dir(ctx, dir_fh)?;
    let listing = list(ctx, &v, &dir, &dir_st, cookie, dircount, maxcount, plus);
    Ok(Answer::with(PostOp::of(Some(&dir_st), v.meta.id), listing))
}

/// Lists `dir` from `cookie` on, as the caller, within the counts.
#[allow(clippy::too_many_arguments)]
fn list(
    ctx: &Ctx,
    v: &Volume,
    dir: &Obj,
    dir_st: &libc::stat,
    cookie: u64,
    dircount: usize,
    maxcount: usize,
    plus: bool,
) -> Result<Listing, nfsstat3> {
    let (rd, searchable) = ctx.become_caller(v).and_then(|_as| {
        let rd = sys::reopen(raw(dir), libc::O_RDONLY | libc::O_DIRECTORY).map_err(to_nfsstat)?;
        // READDIRPLUS gives an entry's attributes and handle only to a caller who
        // could LOOK it up (RFC 1813 §3.3.17: both are optional per entry), as knfsd
        // does: reading a directory lists its names, searching it reaches its
        // objects. LOOKUP needs search permission on the directory, and the kernel
        // checks exactly that, as the caller, when it resolves `.` in it.
        let searchable = plus && sys::openat(raw(dir), b".", libc::O_PATH, 0).is_ok();
        Ok((rd, searchable))
    })?;
    let at_root = v.is_root(dir_st);
    let mut body = Vec::with_capacity(maxcount);
    // Reply overhead: status, dir attributes, verifier, list end, eof (what `encode`
    // adds around the entries).
    let mut size = 4 + 88 + 8 + 8;
    let mut dsize = 0usize;
    let mut count = 0usize;
    // READDIRPLUS pages are bounded by `maxcount` alone, as the Linux server and
    // Ganesha do: the Linux client asks for `dircount` = `maxcount` / 8, which would
    // cut each page to a third of what fits and triple the round trips of `ls -l`.
    let dircount = if plus { maxcount } else { dircount };
    // A kernel dirent takes about what an entry takes of `dircount` (RFC 1813 §3.3.17:
    // fileid, name, cookie); READDIRPLUS entries also carry attributes and a handle.
    let want = if plus { maxcount / 4 } else { dircount };
    let result = sys::read_dir_from(raw(&rd), cookie, want + 512, |e| {
        let pad = (e.name.len() + 3) & !3;
        let entry_size = 4 + 8 + 4 + pad + 8;
        // The smallest entry this can be (READDIRPLUS: no attributes, no handle): no
        // system call for one that cannot fit.
        let least = if plus { 8 } else { 0 };
        if size + entry_size + least > maxcount || dsize + entry_size > dircount {
            return false;
        }
        let parent_of_root = at_root && e.name == b"..";
        let mut attrs = None;
        let mut fh = None;
        if searchable {
            // By name from the directory, no descriptor per entry; `..` of the volume
            // root shows the root itself and gets no handle (no way out of the jail).
            let name: &[u8] = if e.name == b"." || parent_of_root {
                b""
            } else {
                &e.name
            };
            attrs = sys::stat_at(raw(dir), name).ok();
            if attrs.is_some() && !parent_of_root {
                fh = ctx.ex.handle_for_entry(v, raw(dir), name).ok();
            }
        }
        // post_op_attr, then post_op_fh3 (a padded opaque).
        let plus_size = if plus {
            4 + attrs.map_or(0, |_| 84) + 4 + fh.as_ref().map_or(0, |h| 4 + ((h.len() + 3) & !3))
        } else {
            0
        };
        if size + entry_size + plus_size > maxcount {
            return false;
        }
        size += entry_size + plus_size;
        dsize += entry_size;
        count += 1;
        let fileid = if parent_of_root { dir_st.st_ino } else { e.ino };
        put_bool(&mut body, true);
        put_u64(&mut body, fileid);
        put_opaque(&mut body, &e.name);
        put_u64(&mut body, e.offset);
        if plus {
            PostOp::of(attrs.as_ref(), v.meta.id).encode(&mut body);
            PostOpFh(fh).encode(&mut body);
        }
        true
    });
    match result {
        Ok(eof) if count > 0 || eof => Ok(Listing { entries: body, eof }),
        Ok(_) => Err(nfsstat3::NFS3ERR_TOOSMALL),
        Err(e) if e.0 == libc::EINVAL => Err(nfsstat3::NFS3ERR_BAD_COOKIE),
        Err(e) => Err(to_nfsstat(e)),
    }
}
