//! The copier: walks the tree T saw (the job's listings, made by it or by the calls
//! that changed a directory first) into the staging directory, copies each regular
//! file's T bytes, gives every object its T attributes, and writes the manifest.
//! Objects are opened by kernel handle, never by path: a name may have moved since T.
//! Paths on the staging side are relative to the staging tree's root descriptor.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{OwnedFd, RawFd};

use super::{CopyJob, Entry, KernelHandle, errno_text, insert_range, uncovered};
use crate::nfs::quota::charge_of;
use crate::nfs::state::Volume;
use crate::nfs::sys::{self, Errno, raw};
use crate::volume::Staging;

/// How much the new volume may hold.
#[derive(Clone, Copy)]
pub(super) struct Limits {
    pub bytes: u64,
    pub objects: u64,
}

/// What the copy holds.
#[derive(Clone, Copy, Default)]
pub(super) struct Totals {
    /// Regular-file data, each inode once.
    pub bytes: u64,
    pub files: u64,
    pub objects: u64,
    /// What the new volume is charged (as `VolumeStore::usage` counts).
    pub charged: u64,
}

pub(super) enum Stop {
    TooLarge { bytes: u64, objects: u64 },
    Failed(String),
}

fn failed(what: &str) -> impl FnOnce(Errno) -> Stop + '_ {
    move |e| {
        if e.0 == libc::ENOSPC || e.0 == libc::EDQUOT {
            Stop::Failed(errno_text(
                &format!("{what} (no room on the node's disk)"),
                e,
            ))
        } else {
            Stop::Failed(errno_text(what, e))
        }
    }
}

/// `parent/name`, or `name` under the root (`.`).
fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent == b"." {
        return name.to_vec();
    }
    let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
    p.extend_from_slice(parent);
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

struct Walk<'a> {
    v: &'a Volume,
    job: &'a CopyJob,
    data: OwnedFd,
    limits: Limits,
    totals: Totals,
    /// Staging path of the first name of each regular file copied, and its sha256
    /// (further names are hard links to it).
    copied: HashMap<u64, (Vec<u8>, String)>,
    manifest: Vec<(Vec<u8>, String)>,
}

/// Copies the tree T saw of `v` into `staging` (see the module docs), makes it durable
/// and writes the manifest.
pub(super) fn copy_tree(
    v: &Volume,
    job: &CopyJob,
    staging: &Staging,
    limits: Limits,
) -> Result<Totals, Stop> {
    let _root = sys::AsRoot::begin();
    let data_path = staging.data();
    let data_bytes = data_path.as_os_str().as_encoded_bytes();
    sys::mkdirat(libc::AT_FDCWD, data_bytes, 0o700).map_err(failed("create the copy's root"))?;
    let data = sys::openat(
        libc::AT_FDCWD,
        data_bytes,
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    )
    .map_err(failed("open the copy's root"))?;
    let mut w = Walk {
        v,
        job,
        data,
        limits,
        totals: Totals::default(),
        copied: HashMap::new(),
        manifest: Vec::new(),
    };
    let root_ino = sys::fstat(raw(&v.root))
        .map_err(failed("stat the volume's root"))?
        .st_ino;
    // Directories get their attributes after their children are in (an entry added
    // changes a directory's times).
    let mut dirs = Vec::new();
    let mut stack: Vec<(Vec<u8>, u64, Option<KernelHandle>)> =
        vec![(b".".to_vec(), root_ino, None)];
    while let Some((rel, ino, handle)) = stack.pop() {
        let listing = {
            let mut st = job.lock();
            // A change that could not be preserved dooms the copy: stop now.
            if let Some(why) = &st.failed {
                return Err(Stop::Failed(why.clone()));
            }
            job.listing_locked(&mut st, ino, || match &handle {
                None => sys::reopen(raw(&v.root), libc::O_RDONLY | libc::O_DIRECTORY),
                Some((kind, bytes)) => sys::open_by_handle(
                    v.mount_fd(),
                    *kind,
                    bytes,
                    libc::O_RDONLY | libc::O_DIRECTORY,
                ),
            })
            .map_err(failed("list a directory"))?
        };
        for e in listing.iter() {
            let child = join(&rel, &e.name);
            let kind = e.st.st_mode & libc::S_IFMT;
            if kind == libc::S_IFDIR {
                sys::mkdirat(raw(&w.data), &child, 0o700).map_err(failed("create a directory"))?;
                w.count(charge_of(&e.st))?;
                stack.push((child, e.st.st_ino, e.handle.clone()));
            } else if kind == libc::S_IFREG {
                w.file(&child, e)?;
            } else {
                w.special(&child, e)?;
            }
        }
        dirs.push((rel, ino));
    }
    for (rel, ino) in dirs.iter().rev() {
        let st = job
            .lock()
            .seen
            .get(ino)
            .map(|s| s.st)
            .ok_or_else(|| Stop::Failed("a directory's attributes were not recorded".into()))?;
        sys::set_attrs_at(raw(&w.data), rel, &st)
            .map_err(failed("set a directory's attributes"))?;
    }
    sys::syncfs(raw(&w.data)).map_err(failed("make the copy durable"))?;
    w.write_manifest(staging)?;
    Ok(w.totals)
}

impl Walk<'_> {
    /// Counts one more object costing `bytes`; stops the copy past the limits.
    fn count(&mut self, bytes: u64) -> Result<(), Stop> {
        self.totals.objects += 1;
        self.totals.charged += bytes;
        if self.totals.charged > self.limits.bytes || self.totals.objects > self.limits.objects {
            return Err(Stop::TooLarge {
                bytes: self.totals.charged,
                objects: self.totals.objects,
            });
        }
        Ok(())
    }

    /// A symlink, FIFO, socket or device node, as T saw it.
    fn special(&mut self, rel: &[u8], e: &Entry) -> Result<(), Stop> {
        // A record of another kind is a later object's that got this one's inode
        // number: the listing's attributes are T's then.
        let kind = e.st.st_mode & libc::S_IFMT;
        let st = self
            .job
            .lock()
            .seen
            .get(&e.st.st_ino)
            .map(|s| s.st)
            .filter(|s| s.st_mode & libc::S_IFMT == kind)
            .unwrap_or(e.st);
        if kind == libc::S_IFLNK {
            let target = e.target.as_deref().unwrap_or_default();
            sys::symlinkat(target, raw(&self.data), rel).map_err(failed("create a symlink"))?;
        } else {
            sys::mknodat(raw(&self.data), rel, kind | 0o600, st.st_rdev)
                .map_err(failed("create a special file"))?;
        }
        sys::set_attrs_at(raw(&self.data), rel, &st).map_err(failed("set attributes"))?;
        let now = sys::stat_at(raw(&self.data), rel).map_err(failed("stat a copied object"))?;
        self.count(charge_of(&now))
    }

    /// A regular file: its T bytes and attributes, or a hard link to its first copy.
    fn file(&mut self, rel: &[u8], e: &Entry) -> Result<(), Stop> {
        let ino = e.st.st_ino;
        if let Some((first, hash)) = self.copied.get(&ino) {
            sys::linkat(raw(&self.data), first, raw(&self.data), rel)
                .map_err(failed("link a copied file"))?;
            self.manifest.push((rel.to_vec(), hash.clone()));
            return Ok(());
        }
        let Some((kind, handle)) = &e.handle else {
            return Err(Stop::Failed("a listed file has no handle".into()));
        };
        let src = sys::open_by_handle(self.v.mount_fd(), *kind, handle, libc::O_RDONLY)
            .map_err(failed("open a file to copy"))?;
        let t = {
            let mut st = self.job.lock();
            CopyJob::seen_locked(&mut st, ino, || sys::fstat(raw(&src)))
                .map_err(failed("stat a file to copy"))?
                .st
        };
        let size = t.st_size as u64;
        let dst = sys::openat(
            raw(&self.data),
            rel,
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
            0o600,
        )
        .map_err(failed("create a file"))?;
        // Current bytes first, without any lock: every range changed since T had its
        // T bytes saved before it changed, and goes over these below.
        if sys::ficlone(raw(&dst), raw(&src)).is_err() {
            copy_bytes(raw(&src), raw(&dst), 0, size).map_err(failed("copy a file's data"))?;
        }
        self.overlay(ino, raw(&dst))?;
        sys::ftruncate(raw(&dst), size).map_err(failed("set a copied file's size"))?;
        // Best effort: the final syncfs makes it durable either way.
        let _ = sys::start_write_back(raw(&dst));
        sys::set_attrs_at(raw(&self.data), rel, &t).map_err(failed("set attributes"))?;
        let now = sys::fstat(raw(&dst)).map_err(failed("stat a copied file"))?;
        self.count(charge_of(&now))?;
        self.totals.bytes += size;
        self.totals.files += 1;
        let hash = sha256(raw(&dst), size).map_err(failed("checksum a copied file"))?;
        self.manifest.push((rel.to_vec(), hash.clone()));
        self.copied.insert(ino, (rel.to_vec(), hash));
        Ok(())
    }

    /// Lays the T bytes the source's calls saved for `ino` over the copy `dst`, then
    /// marks the file done (its saved bytes go; a keep link stays until the job ends). The bulk of the saved data is copied without the job's
    /// lock (saved ranges never change once saved); the last round, which finds
    /// nothing new, marks it done under the lock, so no save slips in between.
    fn overlay(&self, ino: u64, dst: RawFd) -> Result<(), Stop> {
        let name = ino.to_string();
        let mut applied: Vec<(u64, u64)> = Vec::new();
        let mut pre: Option<OwnedFd> = None;
        loop {
            let todo = {
                let mut st = self.job.lock();
                let seen = st
                    .seen
                    .get_mut(&ino)
                    .ok_or_else(|| Stop::Failed("a copied file's state went missing".into()))?;
                let todo: Vec<(u64, u64)> = seen
                    .saved
                    .iter()
                    .flat_map(|&(a, b)| uncovered(&applied, a, b))
                    .collect();
                if todo.is_empty() {
                    seen.done = true;
                    // The keep link stays until the job ends (see `CopyJob::end`): a
                    // REMOVE that counted it must still find it when it releases.
                    let _ = sys::unlinkat(raw(&self.job.pre), name.as_bytes(), 0);
                    return Ok(());
                }
                todo
            };
            let src = match &pre {
                Some(f) => raw(f),
                None => {
                    let f = sys::openat(raw(&self.job.pre), name.as_bytes(), libc::O_RDONLY, 0)
                        .map_err(failed("open saved bytes"))?;
                    raw(pre.insert(f))
                }
            };
            for (a, b) in todo {
                copy_bytes(src, dst, a, b).map_err(failed("lay saved bytes over a copy"))?;
                insert_range(&mut applied, a, b);
            }
        }
    }

    /// `manifest`: `<sha256>  <path>` per regular file (each name of a hard-linked
    /// one), sorted by path, as `sha256sum` writes and `sha256sum -c` reads it from the
    /// volume's root; a path with a newline or backslash is escaped as `sha256sum`
    /// does (the line starts with `\`).
    fn write_manifest(&mut self, staging: &Staging) -> Result<(), Stop> {
        self.manifest.sort();
        let text = sha256sum_text(&self.manifest);
        let path = staging.manifest();
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(&text).and_then(|()| f.sync_all()))
            .map_err(|e| Stop::Failed(format!("write the manifest: {e}")))
    }
}

/// `<sha256>  <path>` lines for `(path, hash)` pairs (sorted by the caller), as
/// `sha256sum` writes them: a path with a newline or backslash is escaped and its
/// line starts with `\`.
pub fn sha256sum_text(lines: &[(Vec<u8>, String)]) -> Vec<u8> {
    let mut text = Vec::new();
    for (path, hash) in lines {
        let escape = path.iter().any(|&b| b == b'\n' || b == b'\\');
        if escape {
            text.push(b'\\');
        }
        text.extend_from_slice(hash.as_bytes());
        text.extend_from_slice(b"  ");
        for &b in path {
            match b {
                b'\n' if escape => text.extend_from_slice(b"\\n"),
                b'\\' if escape => text.extend_from_slice(b"\\\\"),
                _ => text.push(b),
            }
        }
        text.push(b'\n');
    }
    text
}

/// Copies bytes `[from, to)` of `src` to the same offsets of `dst`, in the kernel
/// where it can (`copy_file_range`), else through a buffer. Stops early at the
/// source's end.
pub(super) fn copy_bytes(src: RawFd, dst: RawFd, from: u64, to: u64) -> Result<(), Errno> {
    const CHUNK: u64 = 64 << 20;
    let mut at = from;
    while at < to {
        let len = (to - at).min(CHUNK) as usize;
        match sys::copy_range(src, at, dst, at, len) {
            Ok(0) => return Ok(()),
            Ok(n) => at += n as u64,
            Err(e)
                if matches!(
                    e.0,
                    libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP
                ) =>
            {
                return copy_buffered(src, dst, at, to);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn copy_buffered(src: RawFd, dst: RawFd, from: u64, to: u64) -> Result<(), Errno> {
    let mut buf = Vec::with_capacity(1 << 20);
    let mut at = from;
    while at < to {
        buf.clear();
        let want = (to - at).min(1 << 20) as usize;
        let n = sys::pread_append(src, &mut buf, want, at, false)?;
        if n == 0 {
            return Ok(());
        }
        sys::pwrite_all(dst, &buf, at)?;
        at += n as u64;
    }
    Ok(())
}

/// The sha256 of the first `size` bytes of `fd`, in hex.
fn sha256(fd: RawFd, size: u64) -> Result<String, Errno> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = Vec::with_capacity(1 << 20);
    let mut at = 0;
    while at < size {
        buf.clear();
        let n = sys::pread_append(fd, &mut buf, (size - at).min(1 << 20) as usize, at, false)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf);
        at += n as u64;
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
