//! Where a point-in-time copy of a volume is built before it exists, and the one step
//! that makes it exist.
//!
//! A copy for volume `<name>` is built in `<root>/staging/<name>.partial/`:
//! ```text
//! lock        flock'ed by the process building the copy while it runs
//! data/       the new volume's tree (renamed to volumes/<name> on commit)
//! manifest    sha256 of every regular file (renamed to meta/<name>.sha256)
//! keep/ pre/  what the source's changes preserved for the copier (see nfs::snapshot)
//! ```
//! The copy becomes a volume in [`VolumeStore::commit_copy`], under the store lock:
//! `data/` is renamed into `volumes/`, the manifest into `meta/`, and the metadata is
//! written last, atomically: a volume is listed only once its metadata exists, so the
//! metadata's rename is the instant the copy appears. Anything before it leaves no
//! volume: [`VolumeStore::open`] removes every `.partial` whose lock no live process
//! holds (an agent killed mid-copy), with the data it had renamed into `volumes/` if
//! the metadata never followed, and logs why. Nothing half-made survives a restart.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::store::{io, remove_tree, sync_dir};
use super::{Owner, VolumeMeta, VolumeName, VolumeSpec, VolumeStore};
use crate::error::{Error, Result};

/// Suffix of a copy under construction in `<root>/staging/`.
const PARTIAL: &str = ".partial";

/// A copy being built; removed with everything in it when dropped uncommitted.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    name: VolumeName,
    /// Held while the copy is built: tells [`VolumeStore::open`] in another process
    /// (`localnfs volume list` during a copy) that this `.partial` is alive.
    _lock: fs::File,
    committed: bool,
}

impl Staging {
    /// The new volume's tree.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Where the per-file checksums are written before the commit.
    pub fn manifest(&self) -> PathBuf {
        self.dir.join("manifest")
    }

    /// A private directory of the copy (`keep`, `pre`), made on first use.
    pub fn scratch(&self, what: &str) -> Result<PathBuf> {
        let dir = self.dir.join(what);
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(dir),
            Err(e) => Err(io("create copy scratch directory", &dir)(e)),
        }
    }

    pub fn name(&self) -> &VolumeName {
        &self.name
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        if let Err(e) = remove_tree(&self.dir) {
            tracing::warn!(error = %e, "cannot remove an unfinished copy; the next start removes it");
        }
    }
}

impl VolumeStore {
    pub(super) fn staging_dir(&self) -> PathBuf {
        self.root().join("staging")
    }

    /// Where a volume's manifest of a copy lives: `meta/<name>.sha256`, one
    /// `sha256sum`-style line per regular file, paths relative to the volume's root.
    pub fn manifest_path(&self, name: &VolumeName) -> PathBuf {
        self.meta_dir().join(format!("{name}.sha256"))
    }

    /// Starts building a copy that will become volume `name`. Refused if the volume
    /// exists or another copy to that name is under way.
    pub fn begin_copy(&self, name: &VolumeName) -> Result<Staging> {
        let _lock = self.lock()?;
        if self.get(name)?.is_some() || self.data_dir(name).exists() {
            return Err(Error::VolumeExists {
                name: name.to_string(),
            });
        }
        let staging = self.staging_dir();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&staging)
            .map_err(io("create staging directory", &staging))?;
        let dir = staging.join(format!("{name}{PARTIAL}"));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // A live copy holds its lock; a dead one's leftovers go now.
                if try_lock(&dir.join("lock"))?.is_none() {
                    return Err(Error::VolumeExists {
                        name: name.to_string(),
                    });
                }
                remove_tree(&dir)?;
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&dir)
                    .map_err(io("create staging directory", &dir))?;
            }
            Err(e) => return Err(io("create staging directory", &dir)(e)),
        }
        let lock = try_lock(&dir.join("lock"))?.ok_or_else(|| Error::VolumeExists {
            name: name.to_string(),
        })?;
        Ok(Staging {
            dir,
            name: name.clone(),
            _lock: lock,
            committed: false,
        })
    }

    /// Makes the finished copy volume `spec.name` for `owner` (see the module docs for
    /// the order of the steps). The caller has synced `data/` and the manifest.
    pub fn commit_copy(
        &self,
        mut staging: Staging,
        spec: &VolumeSpec,
        owner: Option<&Owner>,
    ) -> Result<VolumeMeta> {
        let _lock = self.lock()?;
        let name = &spec.name;
        let dest = self.data_dir(name);
        if self.get(name)?.is_some() || dest.exists() {
            return Err(Error::VolumeExists {
                name: name.to_string(),
            });
        }
        let data = staging.data();
        fs::rename(&data, &dest).map_err(io("move the copy into place", &data))?;
        let manifest = staging.manifest();
        let manifest_dest = self.manifest_path(name);
        // Until the metadata is written nothing here is a volume: a failure puts the
        // tree back into the staging directory, whose drop removes it.
        let undo = |e: Error| {
            let _ = fs::rename(&manifest_dest, &manifest);
            let _ = fs::rename(&dest, &data);
            e
        };
        fs::rename(&manifest, &manifest_dest)
            .map_err(io("move the copy's manifest into place", &manifest))
            .map_err(undo)?;
        let meta = sync_dir(&self.volumes_dir())
            .and_then(|()| self.next_id())
            .map(|id| VolumeMeta {
                id,
                spec: spec.clone(),
                owner: owner.cloned(),
            })
            .map_err(undo)?;
        // The instant the copy becomes a volume.
        self.write_meta(&meta).map_err(|e| {
            // It may have landed before a later step (the directory's sync) failed.
            let _ = fs::remove_file(self.meta_path(name));
            undo(e)
        })?;
        staging.committed = true;
        if let Err(e) = remove_tree(&staging.dir) {
            tracing::warn!(error = %e, "cannot remove a committed copy's scratch files");
        }
        Ok(meta)
    }

    /// Removes what copies interrupted by a crash left (see the module docs); copies a
    /// live process is building are left alone. Called by [`VolumeStore::open`].
    pub(super) fn remove_unfinished_copies(&self) -> Result<()> {
        let staging = self.staging_dir();
        let entries = match fs::read_dir(&staging) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("list staging directory", &staging)(e)),
        };
        for entry in entries {
            let dir = entry
                .map_err(io("list staging directory", &staging))?
                .path();
            let Some(_held) = try_lock(&dir.join("lock"))? else {
                continue;
            };
            let target = dir
                .file_name()
                .and_then(|f| f.to_str())
                .and_then(|f| f.strip_suffix(PARTIAL))
                .and_then(|n| VolumeName::new(n).ok());
            let _store = self.lock()?;
            if let Some(name) = &target
                && self.get(name)?.is_none()
            {
                // Renamed into place but the metadata never followed: not a volume.
                remove_tree(&self.data_dir(name))?;
                self.remove_manifest(name)?;
            }
            tracing::warn!(
                path = %dir.display(),
                "removing an unfinished copy: the process building it stopped before it was complete (agent killed or restarted mid-copy); no volume was made"
            );
            remove_tree(&dir)?;
        }
        Ok(())
    }
}

/// Takes the lock file at `path` (creating it) without waiting: `None` if another
/// process or another copy holds it.
fn try_lock(path: &Path) -> Result<Option<fs::File>> {
    let f = match fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        // The directory went away meanwhile (a copy committed or removed it).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("open copy lock", path)(e)),
    };
    // SAFETY: a valid descriptor we own for the duration of the call.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        return Ok(None);
    }
    Err(io("lock copy", path)(e))
}

impl VolumeStore {
    /// Removes a volume's copy manifest, if it has one (its data is going away).
    pub(super) fn remove_manifest(&self, name: &VolumeName) -> Result<()> {
        let path = self.manifest_path(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("remove manifest", &path)(e)),
        }
    }
}
