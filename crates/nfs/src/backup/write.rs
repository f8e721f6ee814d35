//! Writing a set: check the target (outside the store, writable: a small file is
//! created, synced and removed) and the node's room for the snapshot (free space less
//! what volumes are promised must cover the source's used bytes), snapshot the volume, lay the snapshot out as a set beside the
//! previous one (linking what did not change), make it durable, mark it complete, and
//! apply retention (see the module docs of `backup`).

use std::collections::HashMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{
    COMPLETE, DATA, Item, Kind, MANIFEST, Manifest, PARTIAL, Summary, list_sets, metrics,
    parse_sha256sum, prune_plan, read_manifest, set_id, target_error,
};
use crate::error::{Error, Result};
use crate::nfs::Exports;
use crate::volume::{VolumeName, VolumeSpec};

/// How a backup runs.
#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    /// Keep the newest N complete sets (retention by count).
    pub keep: Option<usize>,
    /// Keep complete sets younger than this (retention by age).
    pub max_age: Option<Duration>,
    /// Accept a target on the same device as the volume store (tests, single-disk
    /// labs): such a backup does not survive the disk.
    pub allow_same_device: bool,
    /// Bytes of regular files laid out so far (copied or linked) are added here as
    /// the set is written, for a caller that reports progress while it runs.
    pub progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

/// What a backup did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupReport {
    pub id: String,
    pub path: PathBuf,
    pub summary: Summary,
    /// How long the source's mutating calls were held.
    pub pause: Duration,
    pub took: Duration,
    /// Sets retention removed.
    pub pruned: Vec<String>,
    /// What went wrong after the set was complete (retention), which does not fail
    /// the backup.
    pub warnings: Vec<String>,
}

/// Walks a snapshot into a set.
struct SetWriter {
    snap: PathBuf,
    data: PathBuf,
    hashes: HashMap<Vec<u8>, String>,
    /// The previous complete set's data and its regular files by path.
    base: Option<(PathBuf, HashMap<String, Item>)>,
    /// First name of each regular file written (hard links within the volume).
    inodes: HashMap<u64, String>,
    items: Vec<Item>,
    summary: Summary,
    /// `BackupOptions::progress`.
    progress: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Exports {
    /// Backs up `volume` as of one instant into a new set under `target` (see the
    /// `backup` module docs), then applies retention. Blocking. Fails with
    /// [`Error::BackupFailed`] saying why (target full, unreachable, same device as
    /// the store, …); whatever it wrote of the set is removed, the source untouched.
    pub fn backup_volume(
        &self,
        volume: &VolumeName,
        target: &Path,
        opts: &BackupOptions,
    ) -> Result<BackupReport> {
        let started = Instant::now();
        let _running = metrics::Running::start();
        let r = self.write_backup(volume, target, opts, started);
        let written = r
            .as_ref()
            .ok()
            .map(|r| (r.summary.bytes_copied, r.summary.bytes_linked));
        metrics::finished(written, started.elapsed());
        r
    }

    fn write_backup(
        &self,
        volume: &VolumeName,
        target: &Path,
        opts: &BackupOptions,
        started: Instant,
    ) -> Result<BackupReport> {
        let fail = |why: String| Error::BackupFailed {
            volume: volume.to_string(),
            target: target.to_owned(),
            why,
        };
        // Resolved once: the checks below and every write use the same directory.
        let target =
            &fs::canonicalize(target).map_err(|e| fail(target_error("reach the target", &e)))?;
        let t = fs::metadata(target).map_err(|e| fail(target_error("reach the target", &e)))?;
        if !t.is_dir() {
            return Err(fail("the target is not a directory".into()));
        }
        let root = fs::canonicalize(self.store().root())
            .map_err(|e| fail(format!("resolve the volume store: {e}")))?;
        // Not even with `allow_same_device`: `<target>/<volume>` could be a live
        // volume, and a backup removes unfinished sets under it.
        if target.starts_with(&root) || root.starts_with(target.join(volume.as_str())) {
            return Err(fail(format!(
                "the target is inside the volume store {} (or holds it), where it could write into live volumes; back up to a directory outside it",
                root.display()
            )));
        }
        let store_dev = fs::metadata(&root)
            .map_err(|e| fail(format!("stat the volume store: {e}")))?
            .dev();
        if t.dev() == store_dev && !opts.allow_same_device {
            return Err(fail(
                "the target is on the same device as the volume store, so the backup would not survive the node's disk (mount a network volume there, or pass --allow-same-device for a test)"
                    .into(),
            ));
        }
        let v = self.by_name(volume).ok_or_else(|| Error::VolumeNotFound {
            name: volume.to_string(),
        })?;
        let vol_dir = target.join(volume.as_str());
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&vol_dir)
            .map_err(|e| fail(target_error("create the volume's backup directory", &e)))?;
        let _lock = lock(&vol_dir.join(".lock"))
            .map_err(|e| fail(target_error("lock the volume's backup directory", &e)))?
            .ok_or_else(|| {
                fail("another backup of this volume to this target is running".into())
            })?;
        probe(&vol_dir).map_err(|e| fail(target_error("probe the target", &e)))?;
        self.room_for_snapshot(v.used.load(std::sync::atomic::Ordering::Acquire))
            .map_err(fail)?;
        let sets = list_sets(target, volume).map_err(|e| fail(e.to_string()))?;
        for s in sets.iter().filter(|s| s.summary.is_none()) {
            tracing::warn!(path = %s.path.display(), "removing an unfinished backup set");
            fs::remove_dir_all(&s.path)
                .map_err(|e| fail(target_error("remove an unfinished set", &e)))?;
        }
        let base = sets.iter().rev().find(|s| s.summary.is_some());
        let base = base.and_then(|s| match read_manifest(&s.path) {
            Ok(m) => Some((s.id.clone(), s.path.join(DATA), m)),
            Err(e) => {
                tracing::warn!(error = %e, set = %s.id, "previous set unreadable; copying everything");
                None
            }
        });

        // The instant.
        let mut created_ms = now_ms();
        let snap_name = VolumeName::new(&format!("{volume}.backup"))
            .map_err(|e| fail(format!("no name for the snapshot: {e}")))?;
        let snap_spec = VolumeSpec {
            name: snap_name,
            ..v.meta.spec.clone()
        };
        let (staging, snap) = self
            .snapshot_volume(volume, &snap_spec)
            .map_err(|e| match e {
                Error::CopyFailed { why, .. } => fail(format!("the snapshot failed: {why}")),
                Error::VolumeExists { .. } => {
                    fail("another backup of this volume is taking its snapshot on this node".into())
                }
                e => e,
            })?;
        let mut id = set_id(created_ms);
        while sets
            .iter()
            .any(|s| s.id == id || s.id == format!("{id}{PARTIAL}"))
        {
            created_ms += 1;
            id = set_id(created_ms);
        }
        let partial = vol_dir.join(format!("{id}{PARTIAL}"));
        let hashes = fs::read(staging.manifest())
            .map(|t| parse_sha256sum(&t))
            .map_err(|e| fail(format!("read the snapshot's checksums: {e}")))?;
        let mut w = SetWriter {
            snap: staging.data(),
            data: partial.join(DATA),
            hashes,
            base: base.as_ref().map(|(_, data, m)| {
                let files = m
                    .items
                    .iter()
                    .filter(|i| i.kind == Kind::File)
                    .map(|i| (i.path.clone(), i.clone()))
                    .collect();
                (data.clone(), files)
            }),
            inodes: HashMap::new(),
            items: Vec::new(),
            summary: Summary {
                created_ms,
                base: base.as_ref().map(|(id, _, _)| id.clone()),
                ..Summary::default()
            },
            progress: opts.progress.clone(),
        };
        let written = fs::DirBuilder::new()
            .mode(0o700)
            .create(&partial)
            .map_err(|e| target_error("create the set", &e))
            .and_then(|()| w.walk(Path::new("")))
            .and_then(|()| {
                let manifest = Manifest {
                    volume: volume.clone(),
                    set: id.clone(),
                    spec: v.meta.spec.clone(),
                    owner: v.meta.owner.clone(),
                    summary: w.summary.clone(),
                    items: std::mem::take(&mut w.items),
                };
                finish(&partial, &vol_dir.join(&id), &manifest)
            });
        drop(staging);
        if let Err(why) = written {
            if let Err(e) = fs::remove_dir_all(&partial)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(error = %e, path = %partial.display(), "cannot remove an unfinished set; the next backup removes it");
            }
            return Err(fail(why));
        }
        // The set is complete: retention failing does not undo that.
        let (pruned, warnings) = prune(target, volume, opts, &id);
        let report = BackupReport {
            path: vol_dir.join(&id),
            id,
            summary: w.summary,
            pause: snap.pause,
            took: started.elapsed(),
            pruned,
            warnings,
        };
        tracing::info!(
            volume = %volume,
            set = %report.id,
            bytes = report.summary.bytes,
            copied = report.summary.bytes_copied,
            linked = report.summary.bytes_linked,
            pause_ms = report.pause.as_secs_f64() * 1e3,
            took_ms = report.took.as_secs_f64() * 1e3,
            "backed up a volume as of one instant"
        );
        Ok(report)
    }
}

impl Exports {
    /// Whether the node's disk has room for a snapshot of a volume using `used` bytes
    /// without taking what the volumes are promised: free space less every volume's
    /// unused size (as the agent reports free bytes) must cover `used`. Conservative where the
    /// snapshot reflinks (it then shares the source's blocks).
    fn room_for_snapshot(&self, used: u64) -> Result<(), String> {
        let root = std::ffi::CString::new(self.store().root().as_os_str().as_bytes())
            .map_err(|_| "the volume store's path has a NUL".to_owned())?;
        // SAFETY: all-zero is a valid `statvfs` (plain integers).
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a struct to fill, valid for the call.
        if unsafe { libc::statvfs(root.as_ptr(), &mut st) } != 0 {
            return Err(format!(
                "stat the volume store's file system: {}",
                std::io::Error::last_os_error()
            ));
        }
        let disk = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
        let promised: u64 = self.all().iter().map(|v| v.free()).sum();
        let room = disk.saturating_sub(promised);
        if used > room {
            return Err(format!(
                "no room on the node for the snapshot: it needs up to {used} bytes, and the disk's {disk} free bytes less {promised} bytes promised to volumes leave {room}"
            ));
        }
        Ok(())
    }
}

/// Creates, syncs and removes a small file in `dir`, so a full or unreachable target
/// fails the backup before the snapshot is taken.
fn probe(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let path = dir.join(".probe");
    let _ = fs::remove_file(&path);
    let r = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(&[0u8; 4096]).and_then(|()| f.sync_all()));
    let removed = fs::remove_file(&path);
    r.and(removed)
}

/// Writes the manifest, makes the set durable, writes `COMPLETE` last, renames the
/// set into place.
fn finish(partial: &Path, dest: &Path, manifest: &Manifest) -> Result<(), String> {
    let json = serde_json::to_vec(manifest).map_err(|e| format!("encode the manifest: {e}"))?;
    write_synced(&partial.join(MANIFEST), &json)?;
    let dir = fs::File::open(partial).map_err(|e| target_error("open the set", &e))?;
    // SAFETY: a valid descriptor we own for the duration of the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(target_error(
            "make the set durable",
            &std::io::Error::last_os_error(),
        ));
    }
    let summary =
        serde_json::to_vec(&manifest.summary).map_err(|e| format!("encode the summary: {e}"))?;
    write_synced(&partial.join(COMPLETE), &summary)?;
    fs::rename(partial, dest).map_err(|e| target_error("move the set into place", &e))?;
    if let Some(parent) = dest.parent() {
        fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| target_error("make the set's name durable", &e))?;
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .map_err(|e| target_error("write the set's manifest", &e))
}

/// Applies retention to `volume`'s complete sets, never removing `written`; returns
/// the ids removed and, for what could not be done, warnings.
fn prune(
    target: &Path,
    volume: &VolumeName,
    opts: &BackupOptions,
    written: &str,
) -> (Vec<String>, Vec<String>) {
    let mut warnings = Vec::new();
    let sets = match list_sets(target, volume) {
        Ok(s) => s,
        Err(e) => {
            warnings.push(format!("retention skipped: {e}"));
            return (Vec::new(), warnings);
        }
    };
    let complete: Vec<(String, u64)> = sets
        .iter()
        .filter_map(|s| s.summary.as_ref().map(|m| (s.id.clone(), m.created_ms)))
        .collect();
    let plan = prune_plan(&complete, opts.keep, opts.max_age, now_ms(), written);
    let mut pruned = Vec::new();
    for id in plan {
        let path = target.join(volume.as_str()).join(&id);
        // The marker goes first: a half-removed set is no longer a set.
        let _ = fs::remove_file(path.join(COMPLETE));
        match fs::remove_dir_all(&path) {
            Ok(()) => pruned.push(id),
            Err(e) => {
                let w = target_error(&format!("remove expired set {id}"), &e);
                tracing::warn!(warning = %w, "retention could not remove a set");
                warnings.push(w);
            }
        }
    }
    (pruned, warnings)
}

/// Takes the lock file at `path` without waiting: `None` if another process holds it.
fn lock(path: &Path) -> std::io::Result<Option<fs::File>> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)?;
    // SAFETY: a valid descriptor we own for the duration of the call.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        return Ok(None);
    }
    Err(e)
}

impl SetWriter {
    /// Writes directory `rel` of the snapshot (`""` is the root) and all below it.
    fn walk(&mut self, rel: &Path) -> Result<(), String> {
        let src = self.snap.join(rel);
        let md = fs::symlink_metadata(&src).map_err(|e| format!("read the snapshot: {e}"))?;
        let path = if rel.as_os_str().is_empty() {
            ".".to_owned()
        } else {
            utf8(rel)?
        };
        fs::DirBuilder::new()
            .mode(0o700)
            .create(self.data.join(rel))
            .map_err(|e| target_error("create a directory", &e))?;
        self.items.push(item(path, Kind::Dir, &md));
        let mut names: Vec<_> = fs::read_dir(&src)
            .map_err(|e| format!("list the snapshot: {e}"))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(|e| format!("list the snapshot: {e}"))?;
        names.sort();
        for name in names {
            let rel = rel.join(&name);
            let md = fs::symlink_metadata(self.snap.join(&rel))
                .map_err(|e| format!("read the snapshot: {e}"))?;
            let ft = md.file_type();
            if ft.is_dir() {
                self.walk(&rel)?;
            } else if ft.is_file() {
                self.file(&rel, &md)?;
            } else {
                self.special(&rel, &md)?;
            }
        }
        Ok(())
    }

    fn file(&mut self, rel: &Path, md: &fs::Metadata) -> Result<(), String> {
        let path = utf8(rel)?;
        let dst = self.data.join(rel);
        let mut it = item(path.clone(), Kind::File, md);
        if let Some(first) = self.inodes.get(&md.ino()) {
            fs::hard_link(self.data.join(first), &dst)
                .map_err(|e| target_error("link a file", &e))?;
            it.link = Some(first.clone());
            it.sha256 = self
                .items
                .iter()
                .find(|i| &i.path == first)
                .and_then(|i| i.sha256.clone());
            self.items.push(it);
            return Ok(());
        }
        let hash = match self.hashes.get(rel.as_os_str().as_bytes()) {
            Some(h) => h.clone(),
            None => return Err(format!("{path} has no checksum in the snapshot")),
        };
        let unchanged = self.base.as_ref().is_some_and(|(_, files)| {
            files
                .get(&path)
                .is_some_and(|b| b.size == md.len() && b.sha256.as_deref() == Some(&hash))
        });
        let linked = unchanged && self.link_from_base(rel, md.len(), &dst);
        if linked {
            self.summary.bytes_linked += md.len();
        } else {
            fs::copy(self.snap.join(rel), &dst).map_err(|e| target_error("copy a file", &e))?;
            fs::set_permissions(&dst, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(|e| target_error("set a copied file's mode", &e))?;
            self.summary.bytes_copied += md.len();
        }
        self.summary.bytes += md.len();
        self.summary.files += 1;
        if let Some(p) = &self.progress {
            p.fetch_add(md.len(), std::sync::atomic::Ordering::Relaxed);
        }
        it.sha256 = Some(hash);
        self.inodes.insert(md.ino(), path);
        self.items.push(it);
        Ok(())
    }

    /// Hard-links the previous set's file `rel` to `dst` if it is still what that
    /// set's manifest says: reached without symlinks, a regular file of `size` bytes.
    /// The link is made from the descriptor checked, not the path, so a name swapped
    /// in between is not linked. `false`: copy afresh (also when the target refuses
    /// links).
    fn link_from_base(&self, rel: &Path, size: u64, dst: &Path) -> bool {
        let Some((data, _)) = &self.base else {
            return false;
        };
        let checked = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(data)
            .and_then(|d| super::open_in_set(&d, rel))
            .and_then(|f| f.metadata().map(|md| (f, md)));
        let f = match checked {
            Ok((f, md)) if md.is_file() && md.len() == size => f,
            Ok(_) => {
                tracing::warn!(path = %rel.display(), "the previous set's file is not what its manifest says; copying it afresh");
                return false;
            }
            Err(e) => {
                tracing::warn!(path = %rel.display(), error = %e, "cannot open the previous set's file; copying it afresh");
                return false;
            }
        };
        let Ok(to) = std::ffi::CString::new(dst.as_os_str().as_bytes()) else {
            return false;
        };
        let empty = c"";
        // SAFETY: a descriptor we own, an empty and a NUL-terminated path, valid for
        // the call. AT_EMPTY_PATH links the open file itself (the agent runs as root,
        // which it needs).
        unsafe {
            libc::linkat(
                f.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_EMPTY_PATH,
            ) == 0
        }
    }

    fn special(&mut self, rel: &Path, md: &fs::Metadata) -> Result<(), String> {
        use std::os::unix::fs::FileTypeExt;
        let ft = md.file_type();
        let path = utf8(rel)?;
        let kind = if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else if ft.is_char_device() {
            Kind::Char
        } else {
            Kind::Block
        };
        let mut it = item(path, kind, md);
        if kind == Kind::Symlink {
            let target = fs::read_link(self.snap.join(rel))
                .map_err(|e| format!("read a symlink in the snapshot: {e}"))?;
            std::os::unix::fs::symlink(&target, self.data.join(rel))
                .map_err(|e| target_error("create a symlink", &e))?;
            it.target = Some(utf8(&target)?);
        } else {
            it.rdev = md.rdev();
        }
        self.items.push(it);
        Ok(())
    }
}

fn utf8(p: &Path) -> Result<String, String> {
    p.to_str().map(str::to_owned).ok_or_else(|| {
        format!(
            "{} is not a UTF-8 name; backups hold UTF-8 names only",
            p.display()
        )
    })
}

fn item(path: String, kind: Kind, md: &fs::Metadata) -> Item {
    Item {
        path,
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: if kind == Kind::File { md.len() } else { 0 },
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec(),
        sha256: None,
        target: None,
        link: None,
        rdev: 0,
    }
}
