//! The on-disk volume store: create, resize, delete, list, usage.
//!
//! Ownership: a volume made for a claim records that claim ([`Owner`]) in its
//! metadata, and the claim-facing calls ([`VolumeStore::create_for`],
//! [`VolumeStore::remove_for`]) check it: a volume is made, answered for, deleted or
//! archived only for the claim that owns it. A volume without a record (made by a
//! version before owners, or by `localnfs volume create`) is adopted by a claim only
//! while it holds nothing, or through [`VolumeStore::adopt`] from a PV (which only the
//! controller writes), and removed for a claim only while it holds nothing.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{VolumeName, VolumeSpec};
use crate::error::{Error, Result};

/// The claim a volume was made for, as the store records it. The claim's uid is the
/// identity (a claim deleted and re-created under the same name gets a new uid); the
/// namespace and name are for people reading the record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub claim_uid: String,
    pub namespace: String,
    pub claim: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "claim {}/{} (uid {})",
            self.namespace, self.claim, self.claim_uid
        )
    }
}

/// A volume's persisted metadata (`meta/<name>.json`): its spec, flattened so the
/// file keeps the field names every version wrote and reads (see `spec`), plus what
/// the store adds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// Stable numeric id, carried in file handles; never reused.
    pub id: u32,
    #[serde(flatten)]
    pub spec: VolumeSpec,
    /// The claim the volume belongs to; absent for volumes made outside a cluster or
    /// before owners were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
}

/// Metadata reads as the spec it records (`meta.name`, `meta.squash`): a volume's
/// metadata is its spec plus an id and an owner, and the NFS side reads only the spec.
impl std::ops::Deref for VolumeMeta {
    type Target = VolumeSpec;
    fn deref(&self) -> &VolumeSpec {
        &self.spec
    }
}

/// The volumes under one node root.
#[derive(Clone, Debug)]
pub struct VolumeStore {
    root: PathBuf,
    /// What this process knows of the ids taken (shared by the store's clones): see
    /// [`IdsTaken`].
    ids_taken: Arc<Mutex<Option<IdsTaken>>>,
}

/// The highest volume id this process knows to be taken, and which `last-id` file it
/// wrote last. `last-id` is the record; the ids in use are the truth, and reading
/// them all (every volume's metadata) at each creation made a creation cost O(n): 37%
/// of an agent's CPU in a burst of 2,000 claims on one node. So they are read once,
/// and again whenever `last-id` is not the very file this process wrote last (another
/// process's creation, or a hand edit or restore that may have put back an older
/// number while volumes above it exist).
#[derive(Clone, Copy, Debug)]
struct IdsTaken {
    floor: u32,
    /// `last-id`'s inode and change time right after this process wrote it (`None`:
    /// not known, read the volumes again).
    file: Option<(u64, i64, i64)>,
}

/// `path`'s inode and change time (any write, rename or chmod changes the latter).
fn file_mark(path: &Path) -> Option<(u64, i64, i64)> {
    let m = fs::metadata(path).ok()?;
    Some((m.ino(), m.ctime(), m.ctime_nsec()))
}

pub(super) fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::VolumeIo {
        action,
        path,
        source,
    }
}

/// Held while the store changes; released when dropped.
pub(super) struct StoreLock(
    #[expect(dead_code, reason = "held for its drop, which unlocks")] fs::File,
);

impl VolumeStore {
    /// Serialises changes to the store, across threads and processes (the agent and a
    /// `localnfs volume` command on the same root): volume ids come from a
    /// read-increment-write of `last-id`, and two creations at once must not get the
    /// same id (a handle carries it; the same id twice would let one volume's handles
    /// open the other's files). It covers metadata changes only: a deleted volume's
    /// tree is removed from the trash after it is released (see `detach_locked`), so
    /// many reclaims at once wait on each other for a rename and two fsyncs, not for
    /// each other's data.
    pub(super) fn lock(&self) -> Result<StoreLock> {
        let path = self.root.join("lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io("open the store lock", &path))?;
        loop {
            // SAFETY: a valid descriptor we own for the duration of the call.
            if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) } == 0 {
                return Ok(StoreLock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io("lock the store", &path)(e));
            }
        }
    }

    /// Opens (creating if needed) the store at `root` and finishes any deletion a crash
    /// interrupted.
    pub fn open(root: &Path) -> Result<Self> {
        let store = Self {
            root: root.to_owned(),
            ids_taken: Arc::default(),
        };
        for dir in [store.volumes_dir(), store.meta_dir(), store.trash_dir()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o711)
                .create(&dir)
                .map_err(io("create store directory", &dir))?;
        }
        let trash = store.trash_dir();
        for entry in fs::read_dir(&trash).map_err(io("list trash", &trash))? {
            let path = entry.map_err(io("list trash", &trash))?.path();
            remove_tree(&path)?;
        }
        store.remove_unfinished_copies()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }

    pub(super) fn meta_dir(&self) -> PathBuf {
        self.root.join("meta")
    }

    fn trash_dir(&self) -> PathBuf {
        self.root.join("trash")
    }

    /// Directory holding the volume's data.
    pub fn data_dir(&self, name: &VolumeName) -> PathBuf {
        self.volumes_dir().join(name.as_str())
    }

    pub(super) fn meta_path(&self, name: &VolumeName) -> PathBuf {
        self.meta_dir().join(format!("{name}.json"))
    }

    /// The per-node handle key, created on first use. Stable across restarts and
    /// upgrades, so handles stay valid and mounted pods never see ESTALE.
    pub fn node_key(&self) -> Result<[u8; 32]> {
        let path = self.root.join("node.key");
        let bytes = self.secret("node.key", || {
            let mut key = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
                .ok()
                .map(|()| key.to_vec())
        })?;
        bytes.as_slice().try_into().map_err(|_| Error::VolumeIo {
            action: "read node key (wrong length)",
            path,
            source: std::io::ErrorKind::InvalidData.into(),
        })
    }

    /// The secret kept in `<root>/<file>` (0600), made by `generate` on first use.
    /// Another process may race the first use: whatever is on disk afterwards wins.
    pub fn secret(
        &self,
        file: &str,
        generate: impl FnOnce() -> Option<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let path = self.root.join(file);
        match fs::read(&path) {
            Ok(bytes) if !bytes.is_empty() => return Ok(bytes),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("read secret", &path)(e)),
        }
        let fresh = generate().ok_or_else(|| Error::VolumeIo {
            action: "generate secret",
            path: path.clone(),
            source: std::io::ErrorKind::Other.into(),
        })?;
        write_atomic(&path, &fresh, 0o600)?;
        fs::read(&path).map_err(io("read secret", &path))
    }

    /// Creates the volume, or returns it if it already exists with the same spec.
    /// A directory left by a crash before its metadata was written is adopted. No
    /// owner is recorded (standalone volumes); claims use [`Self::create_for`].
    pub fn create(&self, spec: &VolumeSpec) -> Result<VolumeMeta> {
        self.create_owned(spec, None)
    }

    /// Creates the volume for `owner`, or returns it if it already exists with the same
    /// spec and belongs to `owner`. A volume of another claim is refused
    /// ([`Error::VolumeOwned`]); one without an owner record is adopted only while it
    /// holds nothing.
    pub fn create_for(&self, spec: &VolumeSpec, owner: &Owner) -> Result<VolumeMeta> {
        self.create_owned(spec, Some(owner))
    }

    fn create_owned(&self, spec: &VolumeSpec, owner: Option<&Owner>) -> Result<VolumeMeta> {
        let _lock = self.lock()?;
        if spec.size_bytes == 0 {
            return Err(Error::InvalidVolumeSize {
                name: spec.name.to_string(),
            });
        }
        if spec.max_files == Some(0) {
            return Err(Error::InvalidVolumeSpec {
                name: spec.name.to_string(),
                why: "the object limit must be at least 1",
            });
        }
        if spec.anon_uid == u32::MAX || spec.anon_gid == u32::MAX {
            // The kernel cannot switch to it: squashed calls would all be refused.
            return Err(Error::InvalidVolumeSpec {
                name: spec.name.to_string(),
                why: "the anonymous uid and gid must be below 4294967295",
            });
        }
        if let Some(mut meta) = self.get(&spec.name)? {
            if let Some(want) = owner {
                self.check_owner(&meta, want)?;
            }
            if meta.spec != *spec {
                return Err(Error::VolumeConflict {
                    name: spec.name.to_string(),
                });
            }
            if let (None, Some(want)) = (&meta.owner, owner) {
                meta.owner = Some(want.clone());
                self.write_meta(&meta)?;
            }
            return Ok(meta);
        }
        let dir = self.data_dir(&spec.name);
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io("create volume directory", &dir)(e)),
        }
        std::os::unix::fs::chown(&dir, Some(spec.uid), Some(spec.gid))
            .map_err(io("set owner of volume directory", &dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(spec.mode & 0o7777))
            .map_err(io("set mode of volume directory", &dir))?;
        sync_dir(&self.volumes_dir())?;
        let meta = VolumeMeta {
            id: self.next_id()?,
            spec: spec.clone(),
            owner: owner.cloned(),
        };
        self.write_meta(&meta)?;
        Ok(meta)
    }

    /// Whether `meta` may be used for `want`: it is `want`'s, or it has no owner and
    /// holds nothing (a volume made for `want` by a version before owner records, or
    /// left empty).
    fn check_owner(&self, meta: &VolumeMeta, want: &Owner) -> Result<()> {
        match &meta.owner {
            Some(o) if o.claim_uid == want.claim_uid => Ok(()),
            Some(o) => Err(Error::VolumeOwned {
                name: meta.name.to_string(),
                owner: o.to_string(),
            }),
            None if self.usage(&meta.name)?.inodes == 0 => Ok(()),
            None => Err(Error::VolumeOwned {
                name: meta.name.to_string(),
                owner: "no recorded claim (made by an earlier version or by hand) and holds data"
                    .into(),
            }),
        }
    }

    /// Records `owner` on a volume that has none (a volume made before owners were
    /// recorded, named by a PV whose claim is `owner`). Returns the metadata; a volume
    /// already owned by another claim is refused, one owned by `owner` is unchanged.
    pub fn adopt(&self, name: &VolumeName, owner: &Owner) -> Result<Option<VolumeMeta>> {
        let _lock = self.lock()?;
        let Some(mut meta) = self.get(name)? else {
            return Ok(None);
        };
        match &meta.owner {
            Some(o) if o.claim_uid == owner.claim_uid => {}
            Some(o) => {
                return Err(Error::VolumeOwned {
                    name: name.to_string(),
                    owner: o.to_string(),
                });
            }
            None => {
                meta.owner = Some(owner.clone());
                self.write_meta(&meta)?;
            }
        }
        Ok(Some(meta))
    }

    /// Deletes (or, with `archive`, archives) the volume for the claim `claim_uid`:
    /// only if it is that claim's (see [`Self::check_owner`]). A missing volume
    /// succeeds; the archive's path is returned when one was made.
    pub fn remove_for(
        &self,
        name: &VolumeName,
        claim_uid: &str,
        archive: bool,
    ) -> Result<Option<PathBuf>> {
        let trash = {
            let _lock = self.lock()?;
            let Some(meta) = self.get(name)? else {
                return Ok(None);
            };
            let want = Owner {
                claim_uid: claim_uid.to_owned(),
                namespace: String::new(),
                claim: String::new(),
            };
            self.check_owner(&meta, &want)?;
            if archive {
                return self.archive_locked(name).map(Some);
            }
            self.detach_locked(&meta)?
        };
        remove_tree(&trash).map(|()| None)
    }

    /// Changes the size limit. Shrinking below what is already stored is refused.
    pub fn resize(&self, name: &VolumeName, size_bytes: u64) -> Result<VolumeMeta> {
        let _lock = self.lock()?;
        let mut meta = self.get(name)?.ok_or_else(|| Error::VolumeNotFound {
            name: name.to_string(),
        })?;
        if size_bytes == 0 {
            return Err(Error::InvalidVolumeSize {
                name: name.to_string(),
            });
        }
        let used = self.usage(name)?.bytes;
        if size_bytes < used {
            return Err(Error::ShrinkBelowUsage {
                name: name.to_string(),
                used,
                requested: size_bytes,
            });
        }
        meta.spec.size_bytes = size_bytes;
        self.write_meta(&meta)?;
        Ok(meta)
    }

    /// Deletes the volume and its data, whoever owns it (`localnfs volume delete`).
    /// Deleting a missing volume succeeds.
    pub fn delete(&self, name: &VolumeName) -> Result<()> {
        let trash = {
            let _lock = self.lock()?;
            match self.get(name)? {
                Some(meta) => self.detach_locked(&meta)?,
                None => return Ok(()),
            }
        };
        remove_tree(&trash)
    }

    /// Forgets the volume (its metadata is gone, durably) and moves its data into the
    /// trash, returning where: the caller removes that tree after releasing the store
    /// lock, so one large volume's removal does not hold up every other change. The
    /// trash name carries the volume's id, never reused, so no later volume's data
    /// lands there; a crash before the tree is gone is finished by [`Self::open`].
    fn detach_locked(&self, meta: &VolumeMeta) -> Result<PathBuf> {
        let name = &meta.name;
        let dir = self.data_dir(name);
        let trash = self.trash_dir().join(format!("{name}.{}", meta.id));
        match fs::rename(&dir, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("move volume to trash", &dir)(e)),
        }
        sync_dir(&self.volumes_dir())?;
        let meta_path = self.meta_path(name);
        fs::remove_file(&meta_path).map_err(io("remove volume metadata", &meta_path))?;
        self.remove_manifest(name)?;
        sync_dir(&self.meta_dir())?;
        Ok(trash)
    }

    /// Moves the volume's data to `<root>/archive/<name>-<unix seconds>` and forgets the
    /// volume. Archiving a missing volume succeeds.
    pub fn archive(&self, name: &VolumeName) -> Result<Option<PathBuf>> {
        let _lock = self.lock()?;
        if self.get(name)?.is_none() {
            return Ok(None);
        }
        self.archive_locked(name).map(Some)
    }

    fn archive_locked(&self, name: &VolumeName) -> Result<PathBuf> {
        let archive = self.root.join("archive");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&archive)
            .map_err(io("create archive directory", &archive))?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let dest = archive.join(format!("{name}-{stamp}"));
        let dir = self.data_dir(name);
        fs::rename(&dir, &dest).map_err(io("move volume to the archive", &dir))?;
        sync_dir(&self.volumes_dir())?;
        let meta_path = self.meta_path(name);
        fs::remove_file(&meta_path).map_err(io("remove volume metadata", &meta_path))?;
        self.remove_manifest(name)?;
        sync_dir(&self.meta_dir())?;
        Ok(dest)
    }

    /// The volume's metadata, if it exists.
    pub fn get(&self, name: &VolumeName) -> Result<Option<VolumeMeta>> {
        let path = self.meta_path(name);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::VolumeIo {
                    action: "parse volume metadata",
                    path,
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read volume metadata", &path)(e)),
        }
    }

    /// Every volume, sorted by name.
    pub fn list(&self) -> Result<Vec<VolumeMeta>> {
        let dir = self.meta_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io("list volume metadata", &dir))? {
            let entry = entry.map_err(io("list volume metadata", &dir))?;
            let file = entry.file_name();
            let Some(stem) = file.to_str().and_then(|f| f.strip_suffix(".json")) else {
                continue;
            };
            let Ok(name) = VolumeName::new(stem) else {
                continue;
            };
            if let Some(meta) = self.get(&name)? {
                out.push(meta);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// What the volume holds: bytes charged ([`charge`]) and objects, each inode once,
    /// the volume's root not counted.
    pub fn usage(&self, name: &VolumeName) -> Result<Usage> {
        let mut seen = HashSet::new();
        let mut usage = Usage::default();
        let mut stack = vec![self.data_dir(name)];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("walk volume", &dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io("walk volume", &dir))?;
                let md = match entry.metadata() {
                    Ok(md) => md,
                    // Removed while we walk (a running server's volume).
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io("stat volume file", &entry.path())(e)),
                };
                if md.is_dir() {
                    stack.push(entry.path());
                } else if md.nlink() > 1 && !seen.insert(md.ino()) {
                    continue;
                }
                usage.bytes += charge(md.is_file(), md.size(), md.blocks());
                usage.inodes += 1;
            }
        }
        Ok(usage)
    }

    pub(super) fn write_meta(&self, meta: &VolumeMeta) -> Result<()> {
        let path = self.meta_path(&meta.name);
        let bytes = serde_json::to_vec_pretty(meta).map_err(|e| Error::VolumeIo {
            action: "encode volume metadata",
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        write_atomic(&path, &bytes, 0o644)
    }

    /// The next volume id; called with the store locked (`lock`), so the
    /// read-increment-write of `last-id` is one at a time across processes.
    pub(super) fn next_id(&self) -> Result<u32> {
        let path = self.root.join("last-id");
        let last = match fs::read_to_string(&path) {
            Ok(s) => s.trim().parse::<u32>().ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("read last volume id", &path)(e)),
        };
        let mut taken = self.ids_taken.lock().unwrap_or_else(|p| p.into_inner());
        // Never below an id some volume has or this process handed out (a volume
        // deleted since keeps its id retired): the volumes are read unless `last-id`
        // is the file this process wrote last.
        let floor = match *taken {
            Some(t) if last.is_some() && t.file.is_some() && t.file == file_mark(&path) => t.floor,
            known => {
                let in_use = self.list()?.iter().map(|m| m.id).max().unwrap_or(0);
                in_use.max(known.map_or(0, |t| t.floor))
            }
        };
        let id = (last.unwrap_or(0).max(floor).checked_add(1)).ok_or_else(|| Error::VolumeIo {
            action: "issue a volume id",
            path: path.clone(),
            source: std::io::Error::other("every volume id is taken (last-id is at its maximum)"),
        })?;
        write_atomic(&path, id.to_string().as_bytes(), 0o644)?;
        *taken = Some(IdsTaken {
            floor: id,
            file: file_mark(&path),
        });
        Ok(id)
    }
}

/// What a volume holds, as its size and object limits count it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub inodes: u64,
}

/// What one object costs its volume: the blocks the filesystem allocated to it (a
/// one-byte file spends a whole block, a directory its blocks), and for a regular file
/// at least its size, so a sparse file or a truncate up cannot promise space the disk
/// may not have when the holes fill.
pub fn charge(regular: bool, size: u64, blocks: u64) -> u64 {
    let allocated = blocks.saturating_mul(512);
    if regular {
        allocated.max(size)
    } else {
        allocated
    }
}

/// Writes `bytes` to `path` so that readers see the old or the new content, never a
/// mix, and the new content survives a crash once this returns.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("write temporary file", &tmp))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io("write temporary file", &tmp))?;
    fs::rename(&tmp, path).map_err(io("replace file", path))?;
    sync_dir(path.parent().unwrap_or(Path::new("/")))
}

pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", dir))
}

pub(super) fn remove_tree(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove directory tree", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Squash;

    fn store() -> (tempfile::TempDir, VolumeStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = VolumeStore::open(dir.path()).expect("open");
        (dir, store)
    }

    fn name(s: &str) -> VolumeName {
        VolumeName::new(s).expect("valid")
    }

    /// `meta/<name>.json` as the previous version (1a9e38a) wrote it, byte for byte
    /// in shape: snake_case fields, no owner.
    const OLD_META: &str = r#"{"id":7,"name":"pvc-1","size_bytes":1048576,"uid":999,"gid":998,"mode":488,"squash":"all","anon_uid":1000,"anon_gid":1001,"max_files":5000}"#;

    /// The previous version's `VolumeMeta`, field for field: what an agent rolled
    /// back to it reads our metadata with.
    #[derive(Deserialize)]
    #[expect(dead_code, reason = "only whether it parses matters")]
    struct OldMeta {
        id: u32,
        name: VolumeName,
        size_bytes: u64,
        uid: u32,
        gid: u32,
        mode: u32,
        squash: Squash,
        anon_uid: u32,
        anon_gid: u32,
        #[serde(default)]
        max_files: Option<u64>,
    }

    #[test]
    fn metadata_written_by_the_previous_version_still_reads() {
        let (_dir, store) = store();
        fs::write(store.meta_path(&name("pvc-1")), OLD_META).expect("write");
        let meta = store.get(&name("pvc-1")).expect("read").expect("present");
        let want = VolumeSpec {
            uid: 999,
            gid: 998,
            mode: 0o750,
            squash: Squash::All,
            anon_uid: 1000,
            anon_gid: 1001,
            max_files: Some(5000),
            ..VolumeSpec::new(name("pvc-1"), 1 << 20)
        };
        assert_eq!((meta.id, &meta.spec, &meta.owner), (7, &want, &None));
    }

    #[test]
    fn metadata_we_write_reads_in_the_previous_version() {
        let (_dir, store) = store();
        let owner = Owner {
            claim_uid: "u1".into(),
            namespace: "db".into(),
            claim: "data-0".into(),
        };
        let spec = VolumeSpec {
            squash: Squash::Root,
            max_files: Some(10),
            ..VolumeSpec::new(name("pvc-1"), 1 << 20)
        };
        store.create_for(&spec, &owner).expect("create");
        let text = fs::read(store.meta_path(&name("pvc-1"))).expect("read");
        serde_json::from_slice::<OldMeta>(&text).expect("the old shape reads it");
        let json: serde_json::Value = serde_json::from_slice(&text).expect("json");
        assert_eq!(json["size_bytes"], 1 << 20);
        assert_eq!(json["anon_uid"], 65534);
        assert_eq!(json["owner"]["claim_uid"], "u1");
    }

    #[test]
    fn volumes_created_at_once_get_distinct_ids() {
        let (_d, s) = store();
        let ids: Vec<u32> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..16)
                .map(|i| {
                    let s = &s;
                    scope.spawn(move || {
                        s.create(&VolumeSpec::new(name(&format!("v{i}")), 1 << 20))
                            .expect("create")
                            .id
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), 16, "ids handed out twice: {ids:?}");
        assert_eq!(s.list().expect("list").len(), 16);
    }

    #[test]
    fn ids_stay_above_every_volume_when_last_id_is_lost_rolled_back_or_shared() {
        let (d, s) = store();
        let id = |s: &VolumeStore, n: &str| s.create(&VolumeSpec::new(name(n), 1)).expect(n).id;
        let last_id = d.path().join("last-id");
        assert_eq!((id(&s, "a"), id(&s, "b")), (1, 2));
        // Lost: every volume is read again.
        fs::remove_file(&last_id).expect("rm");
        assert_eq!(id(&s, "c"), 3);
        // Unreadable: the same.
        fs::write(&last_id, "garbage").expect("write");
        assert_eq!(id(&s, "d"), 4);
        // Older than what this process handed out.
        fs::write(&last_id, "1").expect("write");
        assert_eq!(id(&s, "e"), 5);
        // Another process on the same root (the `localnfs volume` command) moves
        // `last-id` on; this one follows it, and the other, fresh, reads every volume.
        let other = VolumeStore::open(d.path()).expect("open");
        fs::write(&last_id, "1").expect("write");
        assert_eq!(id(&other, "f"), 6);
        assert_eq!(id(&s, "g"), 7);
        // Rolled back below this process's ids after the other made one: read again.
        assert_eq!(id(&other, "h"), 8);
        fs::write(&last_id, "2").expect("write");
        assert_eq!(id(&s, "i"), 9);
        // Rolled back to a number at or above this process's ids but below the
        // other's newest: still not the file this process wrote, so read again.
        assert_eq!(id(&other, "j"), 10);
        fs::write(&last_id, "9").expect("write");
        assert_eq!(id(&s, "k"), 11);
        // A deleted volume's id stays retired even when `last-id` is lost.
        s.delete(&name("k")).expect("delete");
        fs::remove_file(&last_id).expect("rm");
        assert_eq!(id(&s, "l"), 12);
        // No id past the last one.
        fs::write(&last_id, u32::MAX.to_string()).expect("write");
        assert!(s.create(&VolumeSpec::new(name("m"), 1)).is_err());
        assert!(s.get(&name("m")).expect("read").is_none());
    }

    #[test]
    fn create_is_idempotent_and_conflicts_are_refused() {
        let (_d, s) = store();
        let spec = VolumeSpec::new(name("a"), 1 << 20);
        let first = s.create(&spec).expect("create");
        assert_eq!(s.create(&spec).expect("again"), first);
        let other = VolumeSpec::new(name("a"), 2 << 20);
        assert!(matches!(
            s.create(&other),
            Err(Error::VolumeConflict { .. })
        ));
        assert!(s.data_dir(&spec.name).is_dir());
    }

    #[test]
    fn ids_are_never_reused_after_delete() {
        let (_d, s) = store();
        let a = s.create(&VolumeSpec::new(name("a"), 1)).expect("a");
        s.delete(&name("a")).expect("delete");
        assert!(!s.data_dir(&name("a")).exists());
        let b = s.create(&VolumeSpec::new(name("a"), 1)).expect("again");
        assert!(b.id > a.id);
    }

    #[test]
    fn usage_counts_hard_links_once_and_shrink_below_it_is_refused() {
        let (_d, s) = store();
        let n = name("v");
        s.create(&VolumeSpec::new(n.clone(), 1 << 20))
            .expect("create");
        let dir = s.data_dir(&n);
        fs::create_dir(dir.join("sub")).expect("mkdir");
        fs::write(dir.join("sub/f"), vec![1u8; 1000]).expect("write");
        fs::hard_link(dir.join("sub/f"), dir.join("g")).expect("link");
        fs::write(dir.join("h"), vec![1u8; 24]).expect("write");
        let usage = s.usage(&n).expect("usage");
        // sub, f (= g) and h; each file and the directory spends at least a block.
        assert_eq!(usage.inodes, 3);
        let block = |p: &str| fs::metadata(dir.join(p)).expect("stat").blocks() * 512;
        assert!(block("h") > 0 && block("sub") > 0);
        assert_eq!(usage.bytes, block("sub") + block("g") + block("h"));
        assert!(matches!(
            s.resize(&n, 1000),
            Err(Error::ShrinkBelowUsage { .. })
        ));
        assert_eq!(s.resize(&n, 1 << 20).expect("grow").size_bytes, 1 << 20);
    }

    #[test]
    fn archive_moves_data_aside_and_forgets_the_volume() {
        let (_d, s) = store();
        let n = name("v");
        s.create(&VolumeSpec::new(n.clone(), 1 << 20))
            .expect("create");
        fs::write(s.data_dir(&n).join("keep"), b"data").expect("write");
        let dest = s.archive(&n).expect("archive").expect("moved");
        assert_eq!(fs::read(dest.join("keep")).expect("archived"), b"data");
        assert!(s.get(&n).expect("get").is_none());
        assert!(s.archive(&n).expect("again").is_none());
    }

    fn owner(uid: &str) -> Owner {
        Owner {
            claim_uid: uid.into(),
            namespace: "ns".into(),
            claim: format!("c-{uid}"),
        }
    }

    #[test]
    fn a_claims_volume_is_made_and_removed_only_for_that_claim() {
        let (_d, s) = store();
        let spec = VolumeSpec::new(name("v"), 1 << 20);
        let made = s.create_for(&spec, &owner("u1")).expect("create");
        assert_eq!(made.owner, Some(owner("u1")));
        assert_eq!(s.create_for(&spec, &owner("u1")).expect("again"), made);
        fs::write(s.data_dir(&spec.name).join("f"), b"data").expect("write");
        assert!(matches!(
            s.create_for(&spec, &owner("u2")),
            Err(Error::VolumeOwned { .. })
        ));
        assert!(matches!(
            s.remove_for(&spec.name, "u2", false),
            Err(Error::VolumeOwned { .. })
        ));
        assert!(matches!(
            s.adopt(&spec.name, &owner("u2")),
            Err(Error::VolumeOwned { .. })
        ));
        assert_eq!(
            fs::read(s.data_dir(&spec.name).join("f")).expect("kept"),
            b"data"
        );
        s.remove_for(&spec.name, "u1", false)
            .expect("owner removes");
        assert!(s.get(&spec.name).expect("get").is_none());
        assert!(
            s.remove_for(&spec.name, "u1", false)
                .expect("gone")
                .is_none()
        );
    }

    #[test]
    fn an_unowned_volume_is_taken_by_a_claim_only_while_empty() {
        let (_d, s) = store();
        let spec = VolumeSpec::new(name("v"), 1 << 20);
        s.create(&spec).expect("standalone");
        fs::write(s.data_dir(&spec.name).join("f"), b"data").expect("write");
        assert!(matches!(
            s.create_for(&spec, &owner("u1")),
            Err(Error::VolumeOwned { .. })
        ));
        assert!(matches!(
            s.remove_for(&spec.name, "u1", true),
            Err(Error::VolumeOwned { .. })
        ));
        // A PV naming it is the controller's word: the record is gained from it.
        let adopted = s
            .adopt(&spec.name, &owner("u1"))
            .expect("adopt")
            .expect("meta");
        assert_eq!(adopted.owner, Some(owner("u1")));
        let archived = s.remove_for(&spec.name, "u1", true).expect("archive");
        assert!(archived.expect("path").join("f").is_file());

        let empty = VolumeSpec::new(name("w"), 1 << 20);
        s.create(&empty).expect("standalone");
        let taken = s.create_for(&empty, &owner("u3")).expect("empty: adopted");
        assert_eq!(taken.owner, Some(owner("u3")));
    }

    #[test]
    fn metadata_without_an_owner_still_reads() {
        let (_d, s) = store();
        let n = name("old");
        s.create(&VolumeSpec::new(n.clone(), 1 << 20))
            .expect("create");
        let path = s.meta_path(&n);
        let mut json: serde_json::Value =
            serde_json::from_slice(&fs::read(&path).expect("read")).expect("json");
        assert!(
            json.get("owner").is_none(),
            "no owner written for standalone volumes"
        );
        json["future_field"] = serde_json::json!(1);
        fs::write(&path, serde_json::to_vec(&json).expect("encode")).expect("write");
        assert_eq!(s.get(&n).expect("get").expect("meta").owner, None);
    }

    #[test]
    fn node_key_is_stable() {
        let (_d, s) = store();
        assert_eq!(s.node_key().expect("key"), s.node_key().expect("key again"));
    }
}
