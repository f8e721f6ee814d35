//! Point-in-time copies of a live volume ([`Exports::clone_volume`]).
//!
//! The instant T: the copy takes the volume's charge lock, which every mutating call
//! (WRITE, SETATTR, CREATE, MKDIR, SYMLINK, MKNOD, REMOVE, RMDIR, RENAME, LINK) holds
//! while it changes the volume (see `quota`), so calls in flight drain; it installs
//! the copy's [`CopyJob`] and lets go. Every call acknowledged before T changed the
//! volume before T; every call after T sees the job. The pause is that lock and a
//! pointer store: it does not grow with the volume's size or file count.
//!
//! After T the copier walks the tree T saw into the store's staging directory (see
//! `volume::staging`), while every mutating call first preserves, under the same lock
//! and before it changes anything, what T saw of what it is about to change
//! ([`Watch::job`] is one atomic load when no copy runs):
//! - a directory whose entries are about to change is listed now, if nobody listed it
//!   since T (the listing is its T content: nothing changed in it before). The copier
//!   lists a directory without the job's lock and keeps its listing only if no call
//!   listed the directory meanwhile: a call's listing wins, its own may have seen the
//!   call's change;
//! - an object about to change, or to lose a name, records its T attributes (first
//!   change wins; a later object given a removed one's inode number never replaces
//!   them);
//! - a range of a regular file about to be overwritten or truncated away has its T
//!   bytes saved to `pre/<ino>` (sparse, same offsets), once per range;
//! - a regular file the copier has not finished, about to lose a name (REMOVE, RENAME
//!   over it), is hard-linked to `keep/<ino>` first, so its T data stays reachable.
//!   Keep links last until the job ends, when they go under the charge lock with the
//!   job itself: a call that counted a keep link as not the volume's while releasing
//!   a file always finds it there.
//!
//! The copier reads a file's current bytes up to its T size (`FICLONE` where the
//! filesystem shares extents, else `copy_file_range`) without any lock, then lays the
//! saved ranges over them: ranges nobody overwrote never changed. A file or directory
//! the copier has finished needs nothing more. Objects made after T are marked done at
//! once, so changes to them cost nothing.
//!
//! A hook that cannot preserve (no room for a pre-image) fails the copy, never the
//! client's call: the source's I/O is never refused because a copy runs.
//!
//! Removing the volume (reclaim, `localnfs volume delete`) goes through the store,
//! not the hooks: the copy fails if, after its walk, the source is no longer the
//! volume it started from at its path, stored and served ("the source volume was
//! removed during the copy"), rather than commit a tree emptied under it.
//!
//! What the copy holds in memory does not grow with the file count: the copier walks
//! depth first, holding the listings of the directories on its path (a finished
//! directory's listing and record go, leaving its inode number in a set), a record
//! only for files with more than one name, and writes the sha256 manifest line by
//! line to `meta/<name>.sha256` in staging as it meets files (in path order).
//!
//! Done: the staging tree and the manifest are made durable (`syncfs`), and the store
//! commits them (`VolumeStore::commit_copy`): one rename makes the volume exist. Any
//! failure leaves nothing behind.

mod walk;

pub use walk::sha256sum_text;

use std::collections::{HashMap, HashSet};
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::state::{Exports, Volume};
use super::sys::{self, Errno, raw};
use crate::error::{Error, Result};
use crate::volume::{Owner, Staging, VolumeMeta, VolumeName, VolumeSpec};

/// What a copy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Bytes of regular-file data in the copy (each inode once).
    pub bytes: u64,
    /// Regular files in the copy (each inode once).
    pub files: u64,
    /// How long the source's mutating calls were held to mark the instant.
    pub pause: Duration,
    /// The whole copy, start to commit.
    pub took: Duration,
    /// Objects of every kind in the copy (directories, links, …), root not counted.
    pub objects: u64,
    /// Bytes the source's calls saved as pre-images while the copy ran.
    pub preserved: u64,
    /// The most directory-listing entries and hard-link records the copier held at
    /// once: the listings of the directories on its path, and the files with more
    /// than one name. It does not grow with the file count.
    pub peak_records: u64,
}

/// One volume's running copy, if any: what the mutating calls look at.
#[derive(Default)]
pub struct Watch {
    /// Whether a copy runs: the one load a mutating call pays when none does.
    active: AtomicBool,
    job: Mutex<Option<Arc<CopyJob>>>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("active", &self.active.load(Ordering::Relaxed))
            .finish()
    }
}

impl Watch {
    /// The running copy, if any.
    pub(super) fn job(&self) -> Option<Arc<CopyJob>> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        self.job.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, job: Option<Arc<CopyJob>>) {
        let mut slot = self.job.lock().unwrap_or_else(|p| p.into_inner());
        self.active.store(job.is_some(), Ordering::Release);
        *slot = job;
    }
}

/// A kernel file handle: its type and bytes (`name_to_handle_at`).
type KernelHandle = (i32, Vec<u8>);

/// One entry of a directory as T saw it.
#[derive(Clone)]
pub(super) struct Entry {
    name: Vec<u8>,
    st: libc::stat,
    /// The kernel handle, for directories and regular files: the copier opens them by
    /// it, since their names may have changed since T.
    handle: Option<KernelHandle>,
    /// A symlink's target, read when listed (a symlink's target never changes).
    target: Option<Vec<u8>>,
}

/// What T saw of one object, recorded before its first change (or by the copier).
struct Seen {
    st: libc::stat,
    /// Ranges `[a, b)` of a regular file saved in `pre/<ino>`, disjoint and sorted.
    saved: Vec<(u64, u64)>,
    /// The copier is finished with it, or it was made after T: nothing to preserve.
    done: bool,
    /// Hard-linked in `keep/` (it lost its last name in the source).
    kept: bool,
}

#[derive(Default)]
struct JobState {
    listings: HashMap<u64, Arc<Vec<Entry>>>,
    seen: HashMap<u64, Seen>,
    /// Files and directories the copier is finished with, whose records and listings
    /// it let go: nothing to preserve for them.
    finished: HashSet<u64>,
    /// The files hard-linked in `keep/`, so the job's end drops their links without
    /// going over every record.
    kept: Vec<u64>,
    /// Why a change could not be preserved: the copy fails with it.
    failed: Option<String>,
    preserved: u64,
}

/// A copy in progress (see the module docs).
pub(super) struct CopyJob {
    /// `keep/` and `pre/` in the copy's staging directory.
    keep: OwnedFd,
    pre: OwnedFd,
    state: Mutex<JobState>,
}

fn errno_text(what: &str, e: Errno) -> String {
    format!("{what}: {}", std::io::Error::from_raw_os_error(e.0))
}

impl CopyJob {
    fn lock(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a failure to preserve; the copy fails with the first.
    fn fail(&self, st: &mut JobState, why: String) {
        if st.failed.is_none() {
            tracing::warn!(why, "a change could not be preserved; the copy will fail");
            st.failed = Some(why);
        }
    }

    /// The T listing of directory `ino`, listing it now (through `open`) if nobody has
    /// since T. Call with the state locked.
    fn listing_locked(
        &self,
        st: &mut JobState,
        ino: u64,
        open: impl FnOnce() -> Result<OwnedFd, Errno>,
    ) -> Result<Arc<Vec<Entry>>, Errno> {
        if let Some(l) = st.listings.get(&ino) {
            return Ok(l.clone());
        }
        let dir = open()?;
        let dir_st = sys::fstat(raw(&dir))?;
        st.seen.entry(ino).or_insert_with(|| Seen::of(dir_st));
        let listing = Arc::new(list_dir(&dir)?);
        st.listings.insert(ino, listing.clone());
        Ok(listing)
    }

    /// Whether the copier is finished with object `ino`, or it was made after T.
    fn done(st: &JobState, ino: u64) -> bool {
        st.finished.contains(&ino) || st.seen.get(&ino).is_some_and(|s| s.done)
    }

    /// What T saw of object `ino`; `stat` reads it now if nothing has since T.
    fn seen_locked(
        st: &mut JobState,
        ino: u64,
        stat: impl FnOnce() -> Result<libc::stat, Errno>,
    ) -> Result<&mut Seen, Errno> {
        use std::collections::hash_map::Entry as E;
        match st.seen.entry(ino) {
            E::Occupied(o) => Ok(o.into_mut()),
            E::Vacant(v) => Ok(v.insert(Seen::of(stat()?))),
        }
    }
}

impl Seen {
    fn of(st: libc::stat) -> Self {
        Self {
            st,
            saved: Vec::new(),
            done: false,
            kept: false,
        }
    }
}

/// The entries of directory `dir` (opened for reading) with their attributes, kernel
/// handles (directories, regular files) and symlink targets.
fn list_dir(dir: &OwnedFd) -> Result<Vec<Entry>, Errno> {
    let mut names = Vec::new();
    sys::read_dir_from(raw(dir), 0, 32 * 1024, |e| {
        if e.name != b"." && e.name != b".." {
            names.push(e.name);
        }
        true
    })?;
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let st = sys::stat_at(raw(dir), &name)?;
        let (handle, target) = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR | libc::S_IFREG => (Some(sys::handle_at(raw(dir), &name)?), None),
            libc::S_IFLNK => {
                let fd = sys::openat(raw(dir), &name, libc::O_PATH, 0)?;
                (None, Some(sys::readlink(raw(&fd))?))
            }
            _ => (None, None),
        };
        out.push(Entry {
            name,
            st,
            handle,
            target,
        });
    }
    Ok(out)
}

// The hooks the mutating calls run, with the volume's charge lock held, before they
// change anything. Each costs one atomic load when no copy runs.

/// Before a change to the entries of directory `dir` (O_PATH): lists it if nobody has
/// since T.
pub fn before_dir_change(v: &Volume, dir: RawFd) {
    let Some(job) = v.copy.job() else { return };
    let _root = sys::AsRoot::begin();
    let mut st = job.lock();
    if st.failed.is_some() {
        return;
    }
    let r = sys::fstat(dir).and_then(|d| {
        // A directory made after T is in no listing the copier reads.
        if CopyJob::done(&st, d.st_ino) {
            return Ok(());
        }
        job.listing_locked(&mut st, d.st_ino, || {
            sys::reopen(dir, libc::O_RDONLY | libc::O_DIRECTORY)
        })
        .map(drop)
    });
    if let Err(e) = r {
        job.fail(&mut st, errno_text("list a directory before it changed", e));
    }
}

/// Before `name` in directory `dir` (O_PATH) loses that name (REMOVE, RMDIR, RENAME
/// from or over it): lists `dir`, lists the victim if it is a directory, keeps a
/// regular file the copier has not finished reachable in `keep/`, and records the T
/// attributes of any other victim (its inode number may be reused). Returns whether the
/// victim has a keep link (the caller's accounting counts that link as not the
/// volume's).
pub fn before_unlink(v: &Volume, dir: RawFd, name: &[u8]) -> bool {
    let Some(job) = v.copy.job() else {
        return false;
    };
    before_dir_change(v, dir);
    let _root = sys::AsRoot::begin();
    let Ok(victim) = sys::stat_at(dir, name) else {
        return false;
    };
    let mut st = job.lock();
    if st.failed.is_some() {
        return false;
    }
    let r = match victim.st_mode & libc::S_IFMT {
        // Finished (its listing let go), or made after T.
        libc::S_IFDIR if CopyJob::done(&st, victim.st_ino) => Ok(false),
        libc::S_IFREG
            if !st.seen.contains_key(&victim.st_ino) && CopyJob::done(&st, victim.st_ino) =>
        {
            Ok(false)
        }
        libc::S_IFDIR => job
            .listing_locked(&mut st, victim.st_ino, || {
                sys::openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
            })
            .map(|_| false),
        libc::S_IFREG => {
            let keep = raw(&job.keep);
            let linked =
                CopyJob::seen_locked(&mut st, victim.st_ino, || Ok(victim)).and_then(|seen| {
                    // A keep link lasts as long as the job, done or not.
                    if seen.kept {
                        return Ok((true, false));
                    }
                    // Done: the copier needs nothing more of it.
                    if seen.done {
                        return Ok((false, false));
                    }
                    sys::linkat(dir, name, keep, victim.st_ino.to_string().as_bytes())?;
                    seen.kept = true;
                    Ok((true, true))
                });
            if let Ok((_, true)) = linked {
                st.kept.push(victim.st_ino);
            }
            linked.map(|(kept, _)| kept)
        }
        // A symlink, FIFO, socket or device: its number is free once it goes, and the
        // next object made may get it; what T saw of it is recorded now, so the
        // copier never takes the newcomer's attributes for it.
        _ => CopyJob::seen_locked(&mut st, victim.st_ino, || Ok(victim)).map(|_| false),
    };
    match r {
        Ok(kept) => kept,
        Err(e) => {
            job.fail(&mut st, errno_text("keep a removed file", e));
            false
        }
    }
}

/// Before object `fd` (O_PATH) changes: records its T attributes, and for a regular
/// file saves the T bytes of `[from, to)` (the range a WRITE overwrites, or what a
/// truncate cuts off) that are not saved yet.
pub fn before_change(v: &Volume, fd: RawFd, range: Option<(u64, u64)>) {
    let Some(job) = v.copy.job() else { return };
    let _root = sys::AsRoot::begin();
    let Ok(now) = sys::fstat(fd) else { return };
    let mut st = job.lock();
    if st.failed.is_some() {
        return;
    }
    // Finished by the copier: its record is gone, nothing to preserve.
    if !st.seen.contains_key(&now.st_ino) && CopyJob::done(&st, now.st_ino) {
        return;
    }
    let pre = raw(&job.pre);
    let r = CopyJob::seen_locked(&mut st, now.st_ino, || Ok(now)).and_then(|seen| {
        if seen.done {
            return Ok(0);
        }
        let Some((from, to)) = range else {
            return Ok(0);
        };
        let t_size = seen.st.st_size as u64;
        let gaps = uncovered(&seen.saved, from, to.min(t_size));
        if gaps.is_empty() {
            return Ok(0);
        }
        let src = sys::reopen(fd, libc::O_RDONLY)?;
        let name = now.st_ino.to_string();
        let dst = sys::openat(pre, name.as_bytes(), libc::O_WRONLY | libc::O_CREAT, 0o600)?;
        let mut saved = 0;
        for (a, b) in gaps {
            walk::copy_bytes(raw(&src), raw(&dst), a, b)?;
            insert_range(&mut seen.saved, a, b);
            saved += b - a;
        }
        Ok(saved)
    });
    match r {
        Ok(n) => st.preserved += n,
        Err(e) => job.fail(&mut st, errno_text("save what a change overwrites", e)),
    }
}

/// Whether the file of `st` is reachable only through the copy's keep link: it lost
/// its last name in the volume while a copy runs. Its handles are then as stale as
/// they would be without the copy, and nothing is charged for it twice.
pub fn only_kept(v: &Volume, st: &libc::stat) -> bool {
    let Some(job) = v.copy.job() else {
        return false;
    };
    st.st_nlink == 1 && job.lock().seen.get(&st.st_ino).is_some_and(|s| s.kept)
}

/// After a call made object `fd` (O_PATH): it was not there at T, so changes to it
/// need no preserving. A record already under its inode number is a removed T
/// object's (see [`before_unlink`]): it keeps that object's attributes.
pub fn made(v: &Volume, fd: RawFd) {
    let Some(job) = v.copy.job() else { return };
    let Ok(now) = sys::fstat(fd) else { return };
    let mut st = job.lock();
    st.seen
        .entry(now.st_ino)
        .or_insert_with(|| Seen::of(now))
        .done = true;
}

/// A copy installed on its volume: ends the job when dropped, also when the copier
/// panics (unwinding), so the volume can be copied again.
struct Running<'a> {
    v: &'a Volume,
    job: &'a CopyJob,
}

impl<'a> Running<'a> {
    /// Installs `job` on `v` at the instant (see the module docs); `None` if another
    /// copy of `v` runs.
    fn start(v: &'a Volume, job: &'a Arc<CopyJob>) -> Option<Self> {
        let _drained = v.charging();
        if v.copy.job().is_some() {
            return None;
        }
        v.copy.set(Some(job.clone()));
        Some(Self { v, job })
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.job.end(self.v);
    }
}

impl CopyJob {
    /// Ends the job on `v`: under the charge lock (no call is between counting a keep
    /// link and releasing), drops every keep link and uninstalls the job.
    fn end(&self, v: &Volume) {
        let _root = sys::AsRoot::begin();
        let _charging = v.charging();
        let kept = std::mem::take(&mut self.lock().kept);
        for ino in kept {
            let _ = sys::unlinkat(raw(&self.keep), ino.to_string().as_bytes(), 0);
        }
        v.copy.set(None);
    }
}

/// The parts of `[from, to)` not covered by `saved` (sorted, disjoint).
fn uncovered(saved: &[(u64, u64)], from: u64, to: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = from;
    for &(a, b) in saved {
        if at >= to {
            break;
        }
        if b <= at {
            continue;
        }
        if a > at {
            out.push((at, a.min(to)));
        }
        at = at.max(b);
    }
    if at < to {
        out.push((at, to));
    }
    out
}

/// Adds `[a, b)` to `saved`, keeping it sorted and disjoint (merging neighbours).
fn insert_range(saved: &mut Vec<(u64, u64)>, a: u64, b: u64) {
    saved.push((a, b));
    saved.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(saved.len());
    for &(a, b) in saved.iter() {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    *saved = merged;
}

impl Exports {
    /// Makes volume `spec.name` for `owner` holding `source`'s data as of one instant
    /// (see the module docs). Blocking: async callers use `spawn_blocking`. Nothing of
    /// the new volume exists if this fails (no half-made volume, no metadata). A
    /// source unknown here is [`Error::VolumeNotFound`]; a source holding more than
    /// `spec` allows is [`Error::CloneTooLarge`], checked before anything is copied
    /// and again as the copy grows.
    pub fn clone_volume(
        &self,
        source: &VolumeName,
        spec: &VolumeSpec,
        owner: &Owner,
    ) -> Result<(VolumeMeta, CopyReport)> {
        self.copy_volume(source, spec, Some(owner))
    }

    /// [`Exports::clone_volume`] for a volume without an owner record (`localnfs
    /// volume copy`).
    pub fn copy_volume(
        &self,
        source: &VolumeName,
        spec: &VolumeSpec,
        owner: Option<&Owner>,
    ) -> Result<(VolumeMeta, CopyReport)> {
        let (staging, mut report) = self.snapshot_volume(source, spec)?;
        let meta = self.store().commit_copy(staging, spec, owner)?;
        // The volume exists now whatever happens next: a failure to serve it at once
        // is the periodic refresh's to retry, not this call's to report.
        if let Err(e) = self.refresh_volume(&spec.name) {
            tracing::warn!(volume = %spec.name, error = %e, "cannot serve the new copy yet; the next refresh retries");
        }
        report.took = report.started.elapsed();
        tracing::info!(
            source = %source,
            volume = %spec.name,
            bytes = report.bytes,
            files = report.files,
            pause_ms = report.pause.as_secs_f64() * 1e3,
            took_ms = report.took.as_secs_f64() * 1e3,
            preserved = report.preserved,
            "copied a volume as of one instant"
        );
        Ok((meta, report.into()))
    }

    /// The copy itself, up to but not including its commit: `source` as of one
    /// instant in `staging.data()`, durable, with its manifest. Dropping the
    /// [`Staging`] removes it; committing it makes volume `spec.name`. Backups
    /// (`crate::backup`) read the copy and drop it.
    pub fn snapshot_volume(
        &self,
        source: &VolumeName,
        spec: &VolumeSpec,
    ) -> Result<(Staging, Snapshot)> {
        let started = Instant::now();
        let v = self.by_name(source).ok_or_else(|| Error::VolumeNotFound {
            name: source.to_string(),
        })?;
        let max_inodes = super::quota::max_inodes(spec);
        let too_large = |used: u64, inodes: u64| Error::CloneTooLarge {
            source_volume: source.to_string(),
            name: spec.name.to_string(),
            used,
            inodes,
            size: spec.size_bytes,
            max_inodes,
        };
        let used = v.used.load(Ordering::Acquire);
        let inodes = v.inodes.load(Ordering::Acquire);
        if used > spec.size_bytes || inodes > max_inodes {
            return Err(too_large(used, inodes));
        }
        let staging = self.store().begin_copy(&spec.name)?;
        let failed = |why: String| Error::CopyFailed {
            source_volume: source.to_string(),
            name: spec.name.to_string(),
            why,
        };
        let scratch = |what| -> Result<OwnedFd> {
            let dir = staging.scratch(what)?;
            sys::openat(
                libc::AT_FDCWD,
                dir.as_os_str().as_encoded_bytes(),
                libc::O_PATH | libc::O_DIRECTORY,
                0,
            )
            .map_err(|e| failed(errno_text("open the copy's scratch directory", e)))
        };
        let job = Arc::new(CopyJob {
            keep: scratch("keep")?,
            pre: scratch("pre")?,
            state: Mutex::new(JobState::default()),
        });
        // The instant: in-flight changes drain, later ones see the job.
        let pause_started = Instant::now();
        let running = Running::start(&v, &job)
            .ok_or_else(|| failed("another copy of the volume is running".into()))?;
        let pause = pause_started.elapsed();
        let limits = walk::Limits {
            bytes: spec.size_bytes,
            objects: max_inodes,
        };
        let walked = walk::copy_tree(&v, &job, &staging, limits);
        drop(running);
        // Checked after the walk, whatever it found: a tree emptied under it makes a
        // walk fail oddly or, worse, succeed with files missing.
        if self.removed_since(source, &v) {
            return Err(failed(
                "the source volume was removed during the copy".into(),
            ));
        }
        let preserved = job.lock().preserved;
        let totals = match walked {
            Ok(t) => t,
            Err(walk::Stop::TooLarge { bytes, objects }) => return Err(too_large(bytes, objects)),
            Err(walk::Stop::Failed(why)) => return Err(failed(why)),
        };
        if let Some(why) = job.lock().failed.take() {
            return Err(failed(why));
        }
        let report = Snapshot {
            bytes: totals.bytes,
            files: totals.files,
            pause,
            took: started.elapsed(),
            objects: totals.objects,
            preserved,
            started,
            peak_records: totals.peak_records,
        };
        Ok((staging, report))
    }

    /// Whether volume `source`, served as `v`, was removed (deleted, archived) or
    /// replaced since `v` was served. Removal goes through the store, past the hooks,
    /// but always moves the data directory away (to the trash or the archive) and
    /// forgets the metadata before it touches the tree: a copy that still finds `v`'s
    /// root at the volume's path, stored and served under `v`'s id, after its walk
    /// walked a tree nobody removed anything from.
    fn removed_since(&self, source: &VolumeName, v: &Volume) -> bool {
        let same_dir = std::fs::metadata(self.store().data_dir(source))
            .is_ok_and(|m| (m.dev(), m.ino()) == (v.root_dev, v.root_ino));
        let stored = matches!(self.store().get(source), Ok(Some(m)) if m.id == v.meta.id);
        let served = self.by_name(source).is_some_and(|s| s.meta.id == v.meta.id);
        !(same_dir && stored && served)
    }
}

/// What [`Exports::snapshot_volume`] did: a [`CopyReport`] and when it started.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    pub bytes: u64,
    pub files: u64,
    pub pause: Duration,
    /// Start to the copy being durable (not committed).
    pub took: Duration,
    pub objects: u64,
    pub preserved: u64,
    pub started: Instant,
    pub peak_records: u64,
}

impl From<Snapshot> for CopyReport {
    fn from(s: Snapshot) -> Self {
        Self {
            bytes: s.bytes,
            files: s.files,
            pause: s.pause,
            took: s.took,
            objects: s.objects,
            preserved: s.preserved,
            peak_records: s.peak_records,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_that_panics_does_not_block_the_next_copy_of_its_volume() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::volume::VolumeStore::open(dir.path()).expect("store");
        let src = VolumeName::new("src").expect("name");
        store
            .create(&VolumeSpec::new(src.clone(), 1 << 20))
            .expect("create");
        let allow = super::super::AllowList::new(vec!["127.0.0.1".parse().expect("network")]);
        let ex = Exports::load(store, allow).expect("exports");
        let v = ex.by_name(&src).expect("served");
        let scratch = |what: &str| {
            let p = dir.path().join(what);
            std::fs::create_dir(&p).expect("mkdir");
            sys::openat(
                libc::AT_FDCWD,
                p.as_os_str().as_encoded_bytes(),
                libc::O_PATH | libc::O_DIRECTORY,
                0,
            )
            .expect("open")
        };
        let job = Arc::new(CopyJob {
            keep: scratch("keep"),
            pre: scratch("pre"),
            state: Mutex::new(JobState::default()),
        });
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _running = Running::start(&v, &job).expect("the first copy starts");
            panic!("the copier failed mid-walk");
        }));
        assert!(panicked.is_err());
        assert!(
            v.copy.job().is_none(),
            "the panicked copy is still installed"
        );
        let again = Running::start(&v, &job);
        assert!(again.is_some(), "the volume cannot be copied again");
    }

    #[test]
    fn only_ranges_not_saved_yet_are_saved_again() {
        let saved = vec![(10, 20), (30, 40)];
        assert_eq!(uncovered(&saved, 0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(uncovered(&saved, 12, 18), vec![]);
        assert_eq!(uncovered(&saved, 15, 35), vec![(20, 30)]);
        assert_eq!(uncovered(&saved, 40, 40), vec![]);
        let mut s = saved;
        insert_range(&mut s, 20, 30);
        assert_eq!(s, vec![(10, 40)]);
        insert_range(&mut s, 50, 60);
        insert_range(&mut s, 0, 5);
        assert_eq!(s, vec![(0, 5), (10, 40), (50, 60)]);
    }
}
