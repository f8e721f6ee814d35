//! Thin, safe wrappers over the Linux system calls the NFS layer needs: `*at` calls
//! relative to directory descriptors (never a path walk from `/`, never following a
//! symlink), kernel file handles, per-thread credentials, and raw directory reading.
//!
//! Every failure comes back as `Errno`; [`to_nfsstat`] is the one place an errno becomes
//! an NFS status (STYLE habit 4).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nfs3_types::nfs3::nfsstat3;

/// A raw errno value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

pub type SysResult<T> = Result<T, Errno>;

fn last() -> Errno {
    Errno(
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    )
}

fn check(ret: libc::c_int) -> SysResult<libc::c_int> {
    if ret < 0 { Err(last()) } else { Ok(ret) }
}

/// The single errno → NFSv3 status mapping (RFC 1813 §2.6).
pub fn to_nfsstat(e: Errno) -> nfsstat3 {
    match e.0 {
        libc::EPERM => nfsstat3::NFS3ERR_PERM,
        libc::ENOENT => nfsstat3::NFS3ERR_NOENT,
        libc::ENXIO | libc::ENODEV => nfsstat3::NFS3ERR_NXIO,
        libc::EACCES => nfsstat3::NFS3ERR_ACCES,
        libc::EEXIST => nfsstat3::NFS3ERR_EXIST,
        libc::EXDEV => nfsstat3::NFS3ERR_XDEV,
        libc::ENOTDIR => nfsstat3::NFS3ERR_NOTDIR,
        libc::EISDIR => nfsstat3::NFS3ERR_ISDIR,
        libc::EINVAL | libc::ELOOP => nfsstat3::NFS3ERR_INVAL,
        libc::EFBIG => nfsstat3::NFS3ERR_FBIG,
        libc::ENOSPC => nfsstat3::NFS3ERR_NOSPC,
        libc::EROFS => nfsstat3::NFS3ERR_ROFS,
        libc::EMLINK => nfsstat3::NFS3ERR_MLINK,
        libc::ENAMETOOLONG => nfsstat3::NFS3ERR_NAMETOOLONG,
        libc::ENOTEMPTY => nfsstat3::NFS3ERR_NOTEMPTY,
        libc::EDQUOT => nfsstat3::NFS3ERR_DQUOT,
        libc::ESTALE => nfsstat3::NFS3ERR_STALE,
        libc::EOPNOTSUPP | libc::ENOTTY => nfsstat3::NFS3ERR_NOTSUPP,
        libc::EBADF => nfsstat3::NFS3ERR_BADHANDLE,
        _ => nfsstat3::NFS3ERR_IO,
    }
}

fn cstr(name: &[u8]) -> SysResult<CString> {
    CString::new(name).map_err(|_| Errno(libc::EINVAL))
}

const EMPTY: &[u8] = b"\0";

/// Runs `f` with `name` as a C string; the empty name (the descriptor itself, with
/// `AT_EMPTY_PATH`) costs no allocation, as it is on every attribute call.
fn with_cname<T>(name: &[u8], f: impl FnOnce(*const libc::c_char) -> SysResult<T>) -> SysResult<T> {
    if name.is_empty() {
        return f(EMPTY.as_ptr().cast());
    }
    let c = cstr(name)?;
    f(c.as_ptr())
}

/// `fstatat(fd, "", AT_EMPTY_PATH)`: works on O_PATH descriptors.
pub fn fstat(fd: RawFd) -> SysResult<libc::stat> {
    stat_at(fd, b"")
}

/// Attributes of `name` in `dir` (of `dir` itself when `name` is empty), never
/// following a symlink.
pub fn stat_at(dir: RawFd, name: &[u8]) -> SysResult<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    with_cname(name, |path| {
        // SAFETY: valid NUL-terminated path and an out-pointer the kernel fills.
        check(unsafe {
            libc::fstatat(
                dir,
                path,
                st.as_mut_ptr(),
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        })
    })?;
    // SAFETY: fstatat succeeded, so the struct is initialised.
    Ok(unsafe { st.assume_init() })
}

/// `openat(dir, name, flags)`; `O_NOFOLLOW` is always added.
pub fn openat(dir: RawFd, name: &[u8], flags: i32, mode: u32) -> SysResult<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: valid C string; the returned descriptor is owned by us alone.
    let fd = check(unsafe {
        libc::openat(
            dir,
            c.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode,
        )
    })?;
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Cleared the first time the kernel refuses `RESOLVE_CACHED` lookups.
static CACHED_LOOKUPS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether [`open_path_cached`] may work here: false once the kernel (older than 5.12)
/// or a seccomp profile refused it, so callers stop trying.
pub fn cached_lookups() -> bool {
    CACHED_LOOKUPS.load(std::sync::atomic::Ordering::Relaxed)
}

/// `openat(dir, name, O_PATH | O_NOFOLLOW)` answered from the dentry and inode caches
/// alone (`openat2`'s `RESOLVE_CACHED`, Linux 5.12): EAGAIN where the lookup would
/// read the disk, and an error on kernels without it.
pub fn open_path_cached(dir: RawFd, name: &[u8]) -> SysResult<OwnedFd> {
    let c = cstr(name)?;
    /// `struct open_how` (openat2(2)).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_CACHED,
    };
    // SAFETY: a valid C string and an `open_how` of the size passed; the returned
    // descriptor is owned by us alone.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        let e = last();
        if matches!(e.0, libc::ENOSYS | libc::EINVAL | libc::EPERM | libc::E2BIG) {
            CACHED_LOOKUPS.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        return Err(e);
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Re-opens an O_PATH descriptor with real access flags, through /proc (the kernel
/// checks permissions against the current fs credentials).
pub fn reopen(fd: RawFd, flags: i32) -> SysResult<OwnedFd> {
    let path = format!("/proc/self/fd/{fd}");
    let c = cstr(path.as_bytes())?;
    // SAFETY: valid C string; fresh descriptor.
    let nfd = check(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(nfd) })
}

#[repr(C)]
struct RawHandle {
    handle_bytes: libc::c_uint,
    handle_type: libc::c_int,
    f_handle: [u8; 128],
}

/// The kernel's persistent handle for the object `fd` refers to.
pub fn name_to_handle(fd: RawFd) -> SysResult<(i32, Vec<u8>)> {
    handle_at(fd, b"")
}

/// The kernel's persistent handle for `name` in `dir` (for `dir` itself when `name` is
/// empty); a symlink is not followed.
pub fn handle_at(dir: RawFd, name: &[u8]) -> SysResult<(i32, Vec<u8>)> {
    let mut h = RawHandle {
        handle_bytes: 128,
        handle_type: 0,
        f_handle: [0; 128],
    };
    let mut mount_id: libc::c_int = 0;
    with_cname(name, |path| {
        // SAFETY: `h` is a file_handle with 128 bytes of room, as handle_bytes says.
        check(unsafe {
            libc::name_to_handle_at(
                dir,
                path,
                (&raw mut h).cast(),
                &mut mount_id,
                libc::AT_EMPTY_PATH,
            )
        })
    })?;
    let n = (h.handle_bytes as usize).min(128);
    Ok((h.handle_type, h.f_handle[..n].to_vec()))
}

/// Opens the object a kernel handle names, on the filesystem of `mount_fd`.
/// Needs CAP_DAC_READ_SEARCH: call it with root fs credentials.
pub fn open_by_handle(mount_fd: RawFd, kind: i32, bytes: &[u8], flags: i32) -> SysResult<OwnedFd> {
    if bytes.len() > 128 {
        return Err(Errno(libc::ESTALE));
    }
    let mut h = RawHandle {
        handle_bytes: bytes.len() as libc::c_uint,
        handle_type: kind,
        f_handle: [0; 128],
    };
    h.f_handle[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: `h` is a valid file_handle; fresh descriptor on success.
    let fd = check(unsafe {
        libc::open_by_handle_at(mount_fd, (&raw mut h).cast(), flags | libc::O_CLOEXEC)
    })?;
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn mkdirat(dir: RawFd, name: &[u8], mode: u32) -> SysResult<()> {
    let c = cstr(name)?;
    // SAFETY: valid C string.
    check(unsafe { libc::mkdirat(dir, c.as_ptr(), mode) }).map(drop)
}

pub fn symlinkat(target: &[u8], dir: RawFd, name: &[u8]) -> SysResult<()> {
    let (t, c) = (cstr(target)?, cstr(name)?);
    // SAFETY: valid C strings.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir, c.as_ptr()) }).map(drop)
}

pub fn mknodat(dir: RawFd, name: &[u8], mode: u32, dev: u64) -> SysResult<()> {
    let c = cstr(name)?;
    // SAFETY: valid C string.
    check(unsafe { libc::mknodat(dir, c.as_ptr(), mode, dev) }).map(drop)
}

pub fn unlinkat(dir: RawFd, name: &[u8], flags: i32) -> SysResult<()> {
    let c = cstr(name)?;
    // SAFETY: valid C string.
    check(unsafe { libc::unlinkat(dir, c.as_ptr(), flags) }).map(drop)
}

pub fn renameat(from_dir: RawFd, from: &[u8], to_dir: RawFd, to: &[u8]) -> SysResult<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: valid C strings.
    check(unsafe { libc::renameat(from_dir, f.as_ptr(), to_dir, t.as_ptr()) }).map(drop)
}

/// Hard-links the object `fd` refers to as `dir/name` (AT_EMPTY_PATH needs
/// CAP_DAC_READ_SEARCH, so we go through /proc like `linkat(2)` suggests).
pub fn link_fd(fd: RawFd, dir: RawFd, name: &[u8]) -> SysResult<()> {
    let from = cstr(format!("/proc/self/fd/{fd}").as_bytes())?;
    let c = cstr(name)?;
    // SAFETY: valid C strings.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            dir,
            c.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

pub fn readlink(fd: RawFd) -> SysResult<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: buffer of the length given.
    let n = unsafe {
        libc::readlinkat(
            fd,
            EMPTY.as_ptr().cast(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(last());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn fchownat_empty(fd: RawFd, uid: u32, gid: u32) -> SysResult<()> {
    // SAFETY: empty path with AT_EMPTY_PATH acts on fd itself.
    check(unsafe {
        libc::fchownat(
            fd,
            EMPTY.as_ptr().cast(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// chmod through /proc (works for O_PATH descriptors of files and directories).
pub fn chmod_fd(fd: RawFd, mode: u32) -> SysResult<()> {
    let p = cstr(format!("/proc/self/fd/{fd}").as_bytes())?;
    // SAFETY: valid C string.
    check(unsafe { libc::fchmodat(libc::AT_FDCWD, p.as_ptr(), mode, 0) }).map(drop)
}

/// Sets times through /proc; `None` leaves a time unchanged, `Some(None)` means now.
pub fn utimes_fd(
    fd: RawFd,
    atime: Option<Option<(i64, i64)>>,
    mtime: Option<Option<(i64, i64)>>,
) -> SysResult<()> {
    let conv = |t: Option<Option<(i64, i64)>>| match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(None) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(Some((s, ns))) => libc::timespec {
            tv_sec: s,
            tv_nsec: ns,
        },
    };
    let times = [conv(atime), conv(mtime)];
    let p = cstr(format!("/proc/self/fd/{fd}").as_bytes())?;
    // SAFETY: valid C string and a 2-element timespec array.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

pub fn ftruncate(fd: RawFd, len: u64) -> SysResult<()> {
    let len = i64::try_from(len).map_err(|_| Errno(libc::EFBIG))?;
    // SAFETY: plain syscall.
    check(unsafe { libc::ftruncate(fd, len) }).map(drop)
}

/// Reads up to `count` bytes at `off` and appends them to `out` without zero-filling
/// the buffer first; returns how many were read. With `nowait`, only what the page
/// cache holds (`RWF_NOWAIT`): `EAGAIN` if that is nothing, or a short count.
pub fn pread_append(
    fd: RawFd,
    out: &mut Vec<u8>,
    count: usize,
    off: u64,
    nowait: bool,
) -> SysResult<usize> {
    let off = i64::try_from(off).map_err(|_| Errno(libc::EINVAL))?;
    out.reserve(count);
    let spare = out.spare_capacity_mut();
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: count,
    };
    let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
    // SAFETY: the kernel writes at most `count` bytes into the reserved spare capacity;
    // only the `n` bytes it reports are then marked initialised.
    let n = unsafe { libc::preadv2(fd, &iov, 1, off, flags) };
    if n < 0 {
        return Err(last());
    }
    let n = n as usize;
    // SAFETY: preadv2 initialised the first `n` bytes of the spare capacity.
    unsafe { out.set_len(out.len() + n) };
    Ok(n)
}

pub fn pwrite_all(fd: RawFd, mut buf: &[u8], mut off: u64) -> SysResult<()> {
    while !buf.is_empty() {
        let o = i64::try_from(off).map_err(|_| Errno(libc::EFBIG))?;
        // SAFETY: buffer of the given length.
        let n = unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), o) };
        if n < 0 {
            let e = last();
            if e.0 == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
        off += n as u64;
    }
    Ok(())
}

pub fn fsync(fd: RawFd) -> SysResult<()> {
    // SAFETY: plain syscall.
    check(unsafe { libc::fsync(fd) }).map(drop)
}

/// Writes the file's dirty pages to the disk and waits for them (`sync_file_range(2)`
/// over the whole file: WAIT_BEFORE | WRITE | WAIT_AFTER). Makes nothing durable (no
/// metadata, no cache flush: that is fsync's job); see `writeback`.
pub fn write_back(fd: RawFd) -> SysResult<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: plain syscall.
    check(unsafe { libc::sync_file_range(fd, 0, 0, flags) }).map(drop)
}

/// Starts writing the file's dirty pages to the disk and returns at once
/// (`sync_file_range(2)` with WRITE only): a copy's data goes out as it is made, so
/// the final commit has little left to flush in front of the source's own fsyncs.
pub fn start_write_back(fd: RawFd) -> SysResult<()> {
    // SAFETY: plain syscall.
    check(unsafe { libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE) }).map(drop)
}

pub fn fdatasync(fd: RawFd) -> SysResult<()> {
    // SAFETY: plain syscall.
    check(unsafe { libc::fdatasync(fd) }).map(drop)
}

pub fn statvfs(fd: RawFd) -> SysResult<libc::statvfs> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: out-pointer filled by the kernel.
    check(unsafe { libc::fstatvfs(fd, st.as_mut_ptr()) })?;
    // SAFETY: initialised on success.
    Ok(unsafe { st.assume_init() })
}

/// One directory entry as `getdents64` returns it; `offset` is the cookie that resumes
/// listing after this entry (stable across calls on ext4/xfs/tmpfs).
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    pub offset: u64,
    pub name: Vec<u8>,
}

/// Reads entries from `dir` (opened O_RDONLY|O_DIRECTORY) starting at `cookie`, calling
/// `f` until it returns false or the directory ends. Returns true at end of directory.
/// `want` is about how many bytes of entries the caller will take: the kernel's batches
/// are sized to it (whatever a batch holds past what `f` takes is work thrown away,
/// and on a hashed ext4 directory that work is most of a listing's cost).
pub fn read_dir_from(
    dir: RawFd,
    cookie: u64,
    want: usize,
    mut f: impl FnMut(DirEntry) -> bool,
) -> SysResult<bool> {
    let start = i64::try_from(cookie).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: plain syscall.
    if unsafe { libc::lseek(dir, start, libc::SEEK_SET) } < 0 {
        return Err(last());
    }
    let mut buf = vec![0u8; want.clamp(1024, 32 * 1024)];
    loop {
        // SAFETY: buffer of the given length.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dir,
                buf.as_mut_ptr(),
                buf.len() as libc::c_uint,
            )
        };
        if n < 0 {
            return Err(last());
        }
        if n == 0 {
            return Ok(true);
        }
        let mut pos = 0usize;
        while pos + 19 <= n as usize {
            let rec = &buf[pos..];
            let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or([0; 8]));
            let off = i64::from_ne_bytes(rec[8..16].try_into().unwrap_or([0; 8]));
            let reclen = u16::from_ne_bytes([rec[16], rec[17]]) as usize;
            if reclen == 0 || pos + reclen > n as usize {
                return Err(Errno(libc::EIO));
            }
            let name_bytes = &rec[19..reclen];
            let len = name_bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_bytes.len());
            let entry = DirEntry {
                ino,
                offset: off as u64,
                name: name_bytes[..len].to_vec(),
            };
            pos += reclen;
            if !f(entry) {
                // Leave the position after the last entry taken; caller stops here.
                return Ok(false);
            }
        }
    }
}

/// Per-thread filesystem credentials. While a guard lives, the kernel checks
/// permissions and assigns ownership as the caller; dropping it restores root.
/// `setfsuid`/`setfsgid` and the raw `setgroups` syscall act on the calling thread
/// only (glibc's `setgroups` would change every thread). Threads run with no
/// supplementary groups ([`drop_supplementary_groups`] at start), so a caller without
/// groups needs no `setgroups`, and uid 0 with gid 0 needs no switch at all: the
/// thread already is that caller, and with root's capabilities no permission check
/// reads its supplementary groups (the Linux client sends root's as `[0]`, and
/// switching to them would cost seven system calls on every call root makes).
///
/// `setfsuid`/`setfsgid` report no error: for an id the kernel refuses (`u32::MAX`,
/// or one outside this user namespace's map) they leave the thread as it was, root
/// with every capability. So each switch is read back (`setfsuid(-1)` always fails
/// and returns the current id) and a switch that did not take is an error: a request
/// never runs with more rights than its caller.
pub struct AsCaller {
    switched: bool,
    groups: bool,
}

impl AsCaller {
    pub fn new(uid: u32, gid: u32, gids: &[u32]) -> Result<Self, Errno> {
        if uid == 0 && gid == 0 {
            return Ok(Self {
                switched: false,
                groups: false,
            });
        }
        // From here on, dropping the guard puts root's credentials back whatever
        // happened half-way.
        let guard = Self {
            switched: true,
            groups: !gids.is_empty(),
        };
        if !gids.is_empty() {
            // SAFETY: a list of `gids.len()` ids; changes this thread's groups only.
            let ret = unsafe { libc::syscall(libc::SYS_setgroups, gids.len(), gids.as_ptr()) };
            if ret < 0 {
                return Err(last());
            }
        }
        // SAFETY: these calls only change (or, with -1, read) the calling thread's
        // filesystem ids.
        let (now_gid, now_uid) = unsafe {
            libc::setfsgid(gid);
            libc::setfsuid(uid);
            (libc::setfsgid(u32::MAX), libc::setfsuid(u32::MAX))
        };
        if now_gid as u32 != gid || now_uid as u32 != uid {
            return Err(Errno(libc::EPERM));
        }
        Ok(guard)
    }
}

impl Drop for AsCaller {
    fn drop(&mut self) {
        if !self.switched {
            return;
        }
        let none: [libc::gid_t; 0] = [];
        // SAFETY: restores root fs credentials on this thread.
        unsafe {
            libc::setfsuid(0);
            libc::setfsgid(0);
            if self.groups {
                libc::syscall(libc::SYS_setgroups, 0usize, none.as_ptr());
            }
        }
    }
}

/// Root's filesystem credentials on this thread until dropped, then whatever they were
/// (a caller's, inside an [`AsCaller`]): for opens the server makes on its own behalf,
/// such as the shared I/O descriptor of a file, which must not depend on which caller
/// happened to open it first.
pub struct AsRoot {
    uid: u32,
    gid: u32,
}

impl AsRoot {
    #[must_use = "root credentials last only while the guard lives"]
    pub fn begin() -> Self {
        // SAFETY: these calls only read and change this thread's filesystem ids;
        // capabilities come back with fsuid 0 (capabilities(7)).
        unsafe {
            let uid = libc::setfsuid(0) as u32;
            let gid = libc::setfsgid(0) as u32;
            Self { uid, gid }
        }
    }
}

impl Drop for AsRoot {
    fn drop(&mut self) {
        // SAFETY: puts back the ids `new` found; only this thread's.
        unsafe {
            libc::setfsgid(self.gid);
            libc::setfsuid(self.uid);
        }
    }
}

/// The ids this process can switch to: the ranges of `/proc/self/uid_map` and
/// `gid_map` (the whole 32-bit space but `u32::MAX` outside a user namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMaps {
    uids: Vec<(u32, u32)>,
    gids: Vec<(u32, u32)>,
}

impl IdMaps {
    /// Parses `/proc/self/*_map` text: `inside outside count` per line.
    pub fn parse(uid_map: &str, gid_map: &str) -> Self {
        let ranges = |text: &str| {
            text.lines()
                .filter_map(|l| {
                    let mut w = l.split_whitespace().map(|n| n.parse::<u64>().ok());
                    let (Some(Some(start)), Some(Some(_)), Some(Some(count))) =
                        (w.next(), w.next(), w.next())
                    else {
                        return None;
                    };
                    let start = u32::try_from(start).ok()?;
                    let count = u32::try_from(count).ok()?;
                    Some((start, count))
                })
                .collect()
        };
        Self {
            uids: ranges(uid_map),
            gids: ranges(gid_map),
        }
    }

    fn contains(ranges: &[(u32, u32)], id: u32) -> bool {
        // `u32::MAX` is "no id" to every set*id call, whatever the map says.
        id != u32::MAX
            && ranges.iter().any(|&(start, count)| {
                id >= start && u64::from(id) < u64::from(start) + u64::from(count)
            })
    }

    pub fn valid_uid(&self, uid: u32) -> bool {
        Self::contains(&self.uids, uid)
    }

    pub fn valid_gid(&self, gid: u32) -> bool {
        Self::contains(&self.gids, gid)
    }
}

/// This process's [`IdMaps`], read once.
pub fn id_maps() -> &'static IdMaps {
    static MAPS: std::sync::OnceLock<IdMaps> = std::sync::OnceLock::new();
    MAPS.get_or_init(|| {
        let read = |p| std::fs::read_to_string(p).unwrap_or_default();
        IdMaps::parse(&read("/proc/self/uid_map"), &read("/proc/self/gid_map"))
    })
}

/// Clears the process's supplementary groups on every thread (glibc broadcasts
/// `setgroups`), so requests never carry root's groups. Call once at start.
pub fn drop_supplementary_groups() -> SysResult<()> {
    // SAFETY: an empty list; no pointer is read.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }).map(drop)
}

/// Raw descriptor helper for owned fds.
/// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off` in the kernel
/// (`copy_file_range(2)`: no trip through user memory, and a reflink where the
/// filesystem shares extents); returns how many were copied (0 at the source's end).
/// `EXDEV`, `EINVAL`, `ENOSYS` or `EOPNOTSUPP` mean: not here, copy another way.
pub fn copy_range(
    src: RawFd,
    src_off: u64,
    dst: RawFd,
    dst_off: u64,
    len: usize,
) -> SysResult<usize> {
    let mut so = i64::try_from(src_off).map_err(|_| Errno(libc::EFBIG))?;
    let mut d_o = i64::try_from(dst_off).map_err(|_| Errno(libc::EFBIG))?;
    loop {
        // SAFETY: offsets are out-pointers to our own integers.
        let n = unsafe { libc::copy_file_range(src, &mut so, dst, &mut d_o, len, 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = last();
        if e.0 != libc::EINTR {
            return Err(e);
        }
    }
}

/// Makes `dst` share all of `src`'s data (`FICLONE`: a reflink on btrfs and xfs, an
/// instant copy-on-write copy); `EOPNOTSUPP`/`EXDEV`/`EINVAL` where the filesystem
/// cannot (ext4, tmpfs).
pub fn ficlone(dst: RawFd, src: RawFd) -> SysResult<()> {
    // FICLONE = _IOW(0x94, 9, int)
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: plain ioctl with an integer argument.
    check(unsafe { libc::ioctl(dst, FICLONE as _, src) }).map(drop)
}

/// Hard-links `from_dir/from` as `to_dir/to`, never following a symlink.
pub fn linkat(from_dir: RawFd, from: &[u8], to_dir: RawFd, to: &[u8]) -> SysResult<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    // SAFETY: valid C strings.
    check(unsafe { libc::linkat(from_dir, f.as_ptr(), to_dir, t.as_ptr(), 0) }).map(drop)
}

/// Gives `name` in `dir` the owner, mode (not for symlinks) and times of `st`, never
/// following a symlink: a copied object looks as its source did.
pub fn set_attrs_at(dir: RawFd, name: &[u8], st: &libc::stat) -> SysResult<()> {
    let c = cstr(name)?;
    // SAFETY: valid C string.
    check(unsafe {
        libc::fchownat(
            dir,
            c.as_ptr(),
            st.st_uid,
            st.st_gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
        // SAFETY: valid C string (fchmodat follows nothing for a non-symlink).
        check(unsafe { libc::fchmodat(dir, c.as_ptr(), st.st_mode & 0o7777, 0) })?;
    }
    let times = [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ];
    // SAFETY: valid C string and a 2-element timespec array.
    check(unsafe { libc::utimensat(dir, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
        .map(drop)
}

/// Commits the whole filesystem `fd` is on (`syncfs(2)`): one call makes a copy of
/// many files durable, where one fsync per file would cost a journal commit each.
pub fn syncfs(fd: RawFd) -> SysResult<()> {
    // SAFETY: plain syscall.
    check(unsafe { libc::syncfs(fd) }).map(drop)
}

pub fn raw(fd: &OwnedFd) -> RawFd {
    fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn a_cached_lookup_finds_what_the_cache_holds_and_never_follows_a_link() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("file"), b"x").expect("file");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).expect("link");
        let d = openat(
            libc::AT_FDCWD,
            dir.path().as_os_str().as_encoded_bytes(),
            libc::O_PATH,
            0,
        )
        .expect("open dir");
        // Just created: in the dentry cache.
        let f = open_path_cached(raw(&d), b"file").expect("cached lookup");
        let want = std::fs::metadata(dir.path().join("file")).expect("stat");
        assert_eq!(fstat(raw(&f)).expect("fstat").st_ino, want.ino());
        let l = open_path_cached(raw(&d), b"link").expect("cached lookup of the link");
        assert_eq!(
            fstat(raw(&l)).expect("fstat").st_mode & libc::S_IFMT,
            libc::S_IFLNK,
            "the link itself, not its target"
        );
        // A name that is not there: a cached negative answer, or "ask the disk".
        let missing = open_path_cached(raw(&d), b"missing").map(drop).unwrap_err();
        assert!(
            matches!(missing.0, libc::ENOENT | libc::EAGAIN),
            "errno {}",
            missing.0
        );
    }
}
