//! What the NFS server serves: the volumes of one store, their size accounting, the
//! mount table, who may use each volume, and turning a wire handle into an open
//! descriptor inside its volume.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Deref;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use nfs3_types::nfs3::nfsstat3;

use super::access::Access;
use super::allow::AllowList;
use super::handle::{FileHandle, HandleKey};
use super::qos::VolumeQos;
use super::quota;
use super::rmtab::MountTable;
use super::snapshot::Watch;
use super::stats::{ServerStats, VolumeStats};
use super::sys::{self, Errno, to_nfsstat};
use crate::error::{Error, Result};
use crate::volume::{VolumeMeta, VolumeName, VolumeStore};

/// One exported volume.
#[derive(Debug)]
pub struct Volume {
    pub meta: VolumeMeta,
    /// O_PATH descriptor of the volume directory: every lookup starts here.
    pub root: OwnedFd,
    /// The same directory opened for reading: `open_by_handle_at` refuses O_PATH
    /// descriptors as its mount reference.
    mount_fd: OwnedFd,
    pub root_ino: u64,
    pub root_dev: u64,
    /// The root's sealed handle, returned by MNT.
    pub root_fh: Vec<u8>,
    pub limit: AtomicU64,
    /// Bytes charged to the volume (see [`quota::charge_of`]).
    pub used: AtomicU64,
    /// Objects in the volume (its root not counted), and how many it may hold.
    pub inodes: AtomicU64,
    pub max_inodes: AtomicU64,
    /// Bumped by every charge, so a re-count from the disk that raced one is dropped.
    charges: AtomicU64,
    /// Held by every operation that changes what the volume is charged (see `quota`).
    charge_lock: Mutex<()>,
    /// What calls on the volume did (see `stats`).
    pub stats: VolumeStats,
    /// The claim (namespace, name) the volume was made for, once the cluster side has
    /// seen it: labels for the metrics only.
    pub claim: OnceLock<(String, String)>,
    /// Its weight, ceilings and service counters (see `qos`).
    pub qos: VolumeQos,
    /// The point-in-time copy running on it, if any (see `snapshot`).
    pub copy: Watch,
}

impl Volume {
    /// Whether `st` is this volume's root directory.
    pub fn is_root(&self, st: &libc::stat) -> bool {
        st.st_ino == self.root_ino && st.st_dev == self.root_dev
    }

    /// The volume's counters and charge lock, for `quota`.
    pub fn account(&self) -> quota::Account<'_> {
        quota::Account {
            limit: &self.limit,
            used: &self.used,
            inodes: &self.inodes,
            max_inodes: &self.max_inodes,
            charges: &self.charges,
            charge_lock: &self.charge_lock,
        }
    }

    /// Starts a change of the volume's usage: holds the charge lock until dropped.
    pub fn charging(&self) -> quota::Charging<'_> {
        self.account().charging()
    }

    pub fn free(&self) -> u64 {
        self.account().free()
    }

    /// The descriptor `open_by_handle_at` resolves this volume's handles against.
    pub fn mount_fd(&self) -> RawFd {
        sys::raw(&self.mount_fd)
    }
}

/// An object a handle resolved to, kept open so the next call with the same handle
/// costs a hash lookup instead of `open_by_handle_at`, and so reads of a file share
/// one descriptor (the kernel's readahead state lives on the open file).
#[derive(Debug)]
pub struct Obj {
    /// O_PATH descriptor of the object.
    fd: OwnedFd,
    /// Regular files: the shared descriptor for I/O, opened read-write as root (callers
    /// check the caller's permission first). Only a successful open is kept: one
    /// caller's failure never answers the next caller.
    rw: OnceLock<OwnedFd>,
    /// Regular files root cannot open for writing (a running executable, a read-only
    /// mount): a read-only descriptor, for reads only. Directories: the descriptor
    /// [`Obj::sync`] fsyncs.
    ro: OnceLock<OwnedFd>,
    /// Bytes written unstable since its write-back last started (see `writeback`).
    pub unkicked: AtomicU64,
}

impl Deref for Obj {
    type Target = OwnedFd;
    fn deref(&self) -> &OwnedFd {
        &self.fd
    }
}

impl Obj {
    fn new(fd: OwnedFd) -> Self {
        Self {
            fd,
            rw: OnceLock::new(),
            ro: OnceLock::new(),
            unkicked: AtomicU64::new(0),
        }
    }

    /// The I/O descriptor of a regular file (callers check the type: opening a FIFO
    /// would block), opened on first use; `write` needs a writable one.
    pub fn io_fd(&self, write: bool) -> Result<RawFd, nfsstat3> {
        if let Some(f) = self.rw.get() {
            return Ok(sys::raw(f));
        }
        if !write && let Some(f) = self.ro.get() {
            return Ok(sys::raw(f));
        }
        // As root whoever is asking, so the descriptor everyone shares is never
        // narrowed by one caller's rights (the SETATTR of an owner of a 0444 file
        // runs as that owner).
        let _root = sys::AsRoot::begin();
        let path = sys::raw(&self.fd);
        match sys::reopen(path, libc::O_RDWR) {
            // A racing caller's descriptor may have won; ours is then dropped.
            Ok(f) => Ok(sys::raw(self.rw.get_or_init(|| f))),
            Err(e) if write => Err(to_nfsstat(e)),
            Err(_) => {
                let f = sys::reopen(path, libc::O_RDONLY).map_err(to_nfsstat)?;
                Ok(sys::raw(self.ro.get_or_init(|| f)))
            }
        }
    }

    /// Puts the object's last change on stable storage before the reply: RFC 1813
    /// §1.6 makes CREATE, MKDIR, SYMLINK, MKNOD, REMOVE, RMDIR, RENAME and LINK
    /// synchronous, and we add SETATTR (knfsd commits its metadata too): a reply
    /// means durable. `mode` is the object's `st_mode`; call it on the directory a name changed
    /// in. On a journalling filesystem (ext4, xfs) the fsync commits the transaction
    /// that holds the change, new or removed inodes included, and fsyncs running at
    /// the same time share one journal commit: the kernel does the batching.
    pub fn sync(&self, v: &Volume, mode: u32) -> Result<(), nfsstat3> {
        let fd = match mode & libc::S_IFMT {
            libc::S_IFREG => self.io_fd(false)?,
            libc::S_IFDIR => match self.ro.get() {
                Some(f) => sys::raw(f),
                None => {
                    let _root = sys::AsRoot::begin();
                    let f = sys::reopen(sys::raw(&self.fd), libc::O_RDONLY | libc::O_DIRECTORY)
                        .map_err(to_nfsstat)?;
                    sys::raw(self.ro.get_or_init(|| f))
                }
            },
            // Symlinks, FIFOs, sockets and devices cannot be opened to be synced (or
            // must not be): any fsync on the filesystem commits the running
            // transaction, so the volume root's does.
            _ => sys::raw(&v.mount_fd),
        };
        sys::fsync(fd).map_err(to_nfsstat)
    }
}

/// Wire handle → (volume id, open object).
type ObjectCache = HashMap<Vec<u8>, (u32, Arc<Obj>)>;

/// Most objects kept open by default; past it the cache starts over (cheap, and rare).
/// Lowered under a low open-file limit (see [`Exports::with_cached_objects`]).
pub const MAX_CACHED: usize = 1024;

/// The server's shared state.
pub struct Exports {
    store: VolumeStore,
    pub key: HandleKey,
    volumes: RwLock<HashMap<u32, Arc<Volume>>>,
    /// Who mounted what: for DUMP, never for access.
    pub mounts: MountTable,
    /// Who may use each volume, checked on MNT and on every call.
    pub access: Access,
    objects: Mutex<ObjectCache>,
    /// Most objects in `objects` (see `limits::share_descriptors`).
    max_cached: usize,
    /// One refresh at a time: two interleaved ones could each write a map missing the
    /// other's new volume.
    refreshing: Mutex<()>,
    /// One usage recount at a time.
    recounting: Mutex<()>,
    /// Write verifier: new on every start, so clients resend unstable writes the
    /// previous process may have lost (RFC 1813 §3.3.7: clients resend unstable writes).
    pub verifier: [u8; 8],
    /// MKNOD may make block and character devices (`--allow-device-nodes`). Off by
    /// default: a device node in a volume is a way into the node's hardware for any
    /// pod that mounts it without `nodev`.
    pub device_nodes: bool,
    /// Calls by procedure (see `stats`).
    pub stats: ServerStats,
}

impl Exports {
    /// Loads every volume of `store`, the persisted mount table and the per-volume
    /// grants; clients are admitted by `allow` and the grants. Clears the process's
    /// supplementary groups (see `sys::AsCaller`).
    pub fn load(store: VolumeStore, allow: AllowList) -> Result<Self> {
        // Callers' groups are set per request; root's own must never leak into one.
        sys::drop_supplementary_groups().map_err(|e| Error::VolumeIo {
            action: "clear supplementary groups",
            path: store.root().to_owned(),
            source: std::io::Error::from_raw_os_error(e.0),
        })?;
        let key = HandleKey::new(&store.node_key()?);
        let mut verifier = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut verifier).map_err(
            |_| Error::VolumeIo {
                action: "generate write verifier",
                path: store.root().to_owned(),
                source: std::io::ErrorKind::Other.into(),
            },
        )?;
        let mounts = MountTable::load(store.root().join("rmtab"));
        let access = Access::new(allow, store.root().join("access.json"))?;
        let exports = Self {
            store,
            key,
            volumes: RwLock::new(HashMap::new()),
            mounts,
            access,
            objects: Mutex::new(HashMap::new()),
            max_cached: MAX_CACHED,
            refreshing: Mutex::new(()),
            recounting: Mutex::new(()),
            verifier,
            device_nodes: false,
            stats: ServerStats::default(),
        };
        exports.refresh()?;
        Ok(exports)
    }

    /// Keeps at most `n` objects open in the handle cache (each holds up to three
    /// descriptors).
    pub fn with_cached_objects(mut self, n: usize) -> Self {
        self.max_cached = n.max(1);
        self
    }

    /// Lets MKNOD make block and character devices (see [`Exports::device_nodes`]).
    pub fn with_device_nodes(mut self, allow: bool) -> Self {
        self.device_nodes = allow;
        self
    }

    pub fn store(&self) -> &VolumeStore {
        &self.store
    }

    /// Re-reads the store: picks up new volumes, drops deleted ones, applies new size
    /// limits (a resize takes effect without a remount).
    pub fn refresh(&self) -> Result<()> {
        let _one = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        let metas = self.store.list()?;
        let current: HashMap<u32, Arc<Volume>> = self.read_volumes().clone();
        let mut next = HashMap::with_capacity(metas.len());
        for meta in metas {
            match current.get(&meta.id) {
                Some(v) if v.meta.name == meta.name => {
                    v.account().set_limits(&meta);
                    next.insert(meta.id, v.clone());
                }
                _ => match self.open_volume(meta) {
                    Ok(v) => {
                        next.insert(v.meta.id, Arc::new(v));
                    }
                    Err(e) => tracing::error!(error = %e, "cannot export volume"),
                },
            }
        }
        // Objects of volumes that went away must not keep their data alive.
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (id, _)| next.contains_key(id));
        *self.volumes.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    /// Re-reads one volume from the store after a change to it (create, resize,
    /// adopt, delete, archive): the server sees the change at once without a walk of
    /// every volume's metadata, so the cost of a change does not grow with the number
    /// of volumes. A volume gone from the store leaves the map, and with it the objects
    /// open in it: its handles are STALE from here on (see [`Exports::resolve`]).
    pub fn refresh_volume(&self, name: &VolumeName) -> Result<()> {
        // Under the refresh lock: a full refresh building its map from an older
        // listing must not overwrite this change, nor this one a newer listing.
        let _one = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        let meta = self.store.get(name)?;
        let current = self.by_name(name);
        let stale = match (&meta, &current) {
            (Some(m), Some(v)) if v.meta.id == m.id => {
                v.account().set_limits(m);
                return Ok(());
            }
            (_, Some(v)) => Some(v.meta.id),
            (_, None) => None,
        };
        let fresh = match meta {
            Some(m) => Some(Arc::new(self.open_volume(m)?)),
            None => None,
        };
        {
            let mut volumes = self.volumes.write().unwrap_or_else(|p| p.into_inner());
            if let Some(id) = stale {
                volumes.remove(&id);
            }
            if let Some(v) = fresh {
                volumes.insert(v.meta.id, v);
            }
        }
        // After the map: a call resolving a handle from now on finds no volume, so
        // nothing re-opens an object of the old one once these are dropped.
        if let Some(id) = stale {
            self.objects
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, (vol, _)| *vol != id);
        }
        Ok(())
    }

    fn read_volumes(&self) -> std::sync::RwLockReadGuard<'_, HashMap<u32, Arc<Volume>>> {
        self.volumes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn open_volume(&self, meta: VolumeMeta) -> Result<Volume> {
        let dir = self.store.data_dir(&meta.name);
        let io = |action| {
            let dir = dir.clone();
            move |e: Errno| Error::VolumeIo {
                action,
                path: dir,
                source: std::io::Error::from_raw_os_error(e.0),
            }
        };
        let path = dir.as_os_str().as_encoded_bytes();
        let root = sys::openat(libc::AT_FDCWD, path, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(io("open volume directory"))?;
        let mount_fd = sys::openat(libc::AT_FDCWD, path, libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map_err(io("open volume directory"))?;
        let st = sys::fstat(sys::raw(&root)).map_err(io("stat volume directory"))?;
        let (kind, kernel) =
            sys::name_to_handle(sys::raw(&root)).map_err(io("get volume root handle"))?;
        let root_fh = self
            .key
            .seal(&FileHandle {
                volume: meta.id,
                kind,
                kernel,
            })
            .ok_or_else(|| io("seal volume root handle")(Errno(libc::EOVERFLOW)))?;
        let usage = self.store.usage(&meta.name)?;
        Ok(Volume {
            root,
            mount_fd,
            root_ino: st.st_ino,
            root_dev: st.st_dev,
            root_fh,
            limit: AtomicU64::new(meta.size_bytes),
            used: AtomicU64::new(usage.bytes),
            inodes: AtomicU64::new(usage.inodes),
            max_inodes: AtomicU64::new(quota::max_inodes(&meta)),
            charges: AtomicU64::new(0),
            charge_lock: Mutex::new(()),
            stats: VolumeStats::default(),
            claim: OnceLock::new(),
            qos: VolumeQos::of(&meta),
            copy: Watch::default(),
            meta,
        })
    }

    /// Re-counts every volume's usage from the disk, correcting drift; one run
    /// at a time.
    pub fn recount_usage(&self) {
        let Ok(_one) = self.recounting.try_lock() else {
            return;
        };
        for v in self.all() {
            match quota::resync(v.account(), || self.store.usage(&v.meta.name)) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!(volume = %v.meta.name, "usage changed during the recount; next time")
                }
                Err(e) => {
                    tracing::warn!(volume = %v.meta.name, error = %e, "cannot recount volume usage")
                }
            }
        }
    }

    /// The exported volume called `name`.
    pub fn by_name(&self, name: &VolumeName) -> Option<Arc<Volume>> {
        self.read_volumes()
            .values()
            .find(|v| &v.meta.name == name)
            .cloned()
    }

    /// Labels the metrics of volume `name` with the claim it was made for (a volume
    /// belongs to one claim for life: the first label stays).
    pub fn label_claim(&self, name: &VolumeName, namespace: &str, claim: &str) {
        if let Some(v) = self.by_name(name) {
            let _ = v.claim.set((namespace.to_owned(), claim.to_owned()));
        }
    }

    /// Every exported volume.
    pub fn all(&self) -> Vec<Arc<Volume>> {
        let mut v: Vec<_> = self.read_volumes().values().cloned().collect();
        v.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        v
    }

    /// Authenticates `wire`, checks `client` may use its volume, and returns the object
    /// it names (opened O_PATH, never following a symlink; cached). Forged or altered
    /// handles are BADHANDLE; deleted objects or volumes STALE; volumes the client may
    /// not use ACCES. Whether the client said MNT does not
    /// matter: a handle is proof of nothing but the server's MAC, and access is the
    /// same rule MNT applies.
    /// Whether the object of handle `wire` is open already (resolving it then needs no
    /// disk).
    pub fn holds(&self, wire: &[u8]) -> bool {
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(wire)
    }

    /// The volume of handle `wire` if it authenticates, is exported and `client` may
    /// use it: what `qos` queues and throttles a call under (nothing is opened).
    /// The volume handle `wire` names, if it authenticates and `client` may use the
    /// volume, with the handle opened (for [`Exports::resolve_opened`]).
    pub fn volume_of(&self, client: IpAddr, wire: &[u8]) -> Option<(Arc<Volume>, FileHandle)> {
        let fh = self.key.open(wire).ok()?;
        let volume = self.read_volumes().get(&fh.volume).cloned()?;
        self.access
            .allows(client, &volume.meta.name)
            .then_some((volume, fh))
    }

    pub fn resolve(
        &self,
        client: IpAddr,
        wire: &[u8],
    ) -> Result<(Arc<Volume>, Arc<Obj>, libc::stat), nfsstat3> {
        self.resolve_opened(client, wire, None)
    }

    /// [`Exports::resolve`], given `wire` already opened (its MAC checked) as `opened`
    /// by [`Exports::volume_of`]: the volume and the client's access are checked again
    /// (either may have changed since), the MAC is not.
    pub fn resolve_opened(
        &self,
        client: IpAddr,
        wire: &[u8],
        opened: Option<&FileHandle>,
    ) -> Result<(Arc<Volume>, Arc<Obj>, libc::stat), nfsstat3> {
        let own;
        let fh = match opened {
            Some(fh) => fh,
            None => {
                own = self
                    .key
                    .open(wire)
                    .map_err(|_| nfsstat3::NFS3ERR_BADHANDLE)?;
                &own
            }
        };
        let volume = self
            .read_volumes()
            .get(&fh.volume)
            .cloned()
            .ok_or(nfsstat3::NFS3ERR_STALE)?;
        if !self.access.allows(client, &volume.meta.name) {
            return Err(nfsstat3::NFS3ERR_ACCES);
        }
        let cached = self
            .objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(wire)
            .map(|(_, o)| o.clone());
        if let Some(obj) = cached {
            // Deleted since we opened it: the handle is stale now.
            if let Ok(st) = sys::fstat(sys::raw(&obj))
                && st.st_nlink > 0
            {
                return Ok((volume, obj, st));
            }
            self.objects
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(wire);
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        let fd = sys::open_by_handle(
            sys::raw(&volume.mount_fd),
            fh.kind,
            &fh.kernel,
            libc::O_PATH | libc::O_NOFOLLOW,
        )
        .map_err(|e| match e.0 {
            libc::ESTALE | libc::ENOENT | libc::EINVAL => nfsstat3::NFS3ERR_STALE,
            _ => to_nfsstat(e),
        })?;
        let st = sys::fstat(sys::raw(&fd)).map_err(to_nfsstat)?;
        if st.st_nlink == 0 {
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        let obj = Arc::new(Obj::new(fd));
        let mut cache = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= self.max_cached {
            cache.clear();
        }
        cache.insert(wire.to_vec(), (volume.meta.id, obj.clone()));
        Ok((volume, obj, st))
    }

    /// Drops the cached object for `fd` (after its last link was removed), so the
    /// cache does not keep a deleted file's blocks allocated.
    pub fn forget(&self, volume: &Volume, fd: RawFd) {
        if let Ok(wire) = self.handle_for(volume, fd) {
            self.objects
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&wire);
        }
    }

    /// Seals a handle for the object `fd` in `volume`.
    pub fn handle_for(&self, volume: &Volume, fd: RawFd) -> Result<Vec<u8>, nfsstat3> {
        self.handle_for_entry(volume, fd, b"")
    }

    /// Seals a handle for `name` in the directory `dir` of `volume` (a name straight
    /// from the directory, never a path: no `/`, and a symlink is not followed).
    pub fn handle_for_entry(
        &self,
        volume: &Volume,
        dir: RawFd,
        name: &[u8],
    ) -> Result<Vec<u8>, nfsstat3> {
        let (kind, kernel) = sys::handle_at(dir, name).map_err(to_nfsstat)?;
        self.key
            .seal(&FileHandle {
                volume: volume.meta.id,
                kind,
                kernel,
            })
            .ok_or(nfsstat3::NFS3ERR_SERVERFAULT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::{Owner, VolumeSpec};

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn owner(uid: &str) -> Owner {
        Owner {
            claim_uid: uid.into(),
            namespace: "ns".into(),
            claim: format!("c-{uid}"),
        }
    }

    fn name(s: &str) -> VolumeName {
        VolumeName::new(s).expect("valid")
    }

    /// A store with volumes `v0`…`v{n-1}` (owner `u<i>`), served.
    fn served(n: usize) -> (tempfile::TempDir, Exports) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = VolumeStore::open(dir.path()).expect("store");
        for i in 0..n {
            let spec = VolumeSpec::new(name(&format!("v{i}")), 1 << 20);
            store
                .create_for(&spec, &owner(&format!("u{i}")))
                .expect("create");
        }
        let allow = AllowList::new(vec!["127.0.0.1".parse().expect("network")]);
        let exports = Exports::load(store, allow).expect("exports");
        (dir, exports)
    }

    #[test]
    fn a_reclaimed_volume_stops_being_served_and_its_handles_go_stale_while_others_stay() {
        let (_dir, ex) = served(3);
        let gone = ex.by_name(&name("v1")).expect("served");
        let kept = ex.by_name(&name("v2")).expect("served");
        let child = {
            std::fs::write(ex.store().data_dir(&name("v1")).join("f"), b"x").expect("write");
            ex.handle_for_entry(&gone, sys::raw(&gone.root), b"f")
                .expect("handle")
        };
        assert!(ex.resolve(CLIENT, &gone.root_fh).is_ok());
        assert!(ex.resolve(CLIENT, &child).is_ok(), "cached now");

        ex.store()
            .remove_for(&name("v1"), "u1", false)
            .expect("owner removes");
        ex.refresh_volume(&name("v1")).expect("refresh");

        assert!(ex.by_name(&name("v1")).is_none(), "export still listed");
        for wire in [&gone.root_fh, &child] {
            assert_eq!(
                ex.resolve(CLIENT, wire).err(),
                Some(nfsstat3::NFS3ERR_STALE)
            );
        }
        assert!(!ex.holds(&child), "a removed volume's objects stay open");
        assert!(
            ex.resolve(CLIENT, &kept.root_fh).is_ok(),
            "another volume lost"
        );
        assert_eq!(ex.all().len(), 2);
    }

    #[test]
    fn a_volume_changed_in_the_store_is_served_as_changed_at_once() {
        let (_dir, ex) = served(1);
        let spec = VolumeSpec::new(name("new"), 1 << 20);
        ex.store().create_for(&spec, &owner("n")).expect("create");
        ex.refresh_volume(&name("new")).expect("refresh");
        let v = ex.by_name(&name("new")).expect("new volume served");
        assert!(ex.resolve(CLIENT, &v.root_fh).is_ok());

        ex.store().resize(&name("new"), 4 << 20).expect("resize");
        ex.refresh_volume(&name("new")).expect("refresh");
        assert_eq!(v.limit.load(std::sync::atomic::Ordering::Acquire), 4 << 20);

        // Deleted and made again under the same name: a new id, old handles stale.
        ex.store().delete(&name("new")).expect("delete");
        ex.store().create_for(&spec, &owner("n2")).expect("again");
        ex.refresh_volume(&name("new")).expect("refresh");
        let again = ex.by_name(&name("new")).expect("served again");
        assert_ne!(again.meta.id, v.meta.id);
        assert_eq!(
            ex.resolve(CLIENT, &v.root_fh).err(),
            Some(nfsstat3::NFS3ERR_STALE)
        );
        assert!(ex.resolve(CLIENT, &again.root_fh).is_ok());
    }

    #[test]
    fn many_reclaims_at_once_remove_exactly_their_volumes() {
        let (_dir, ex) = served(40);
        let ex = Arc::new(ex);
        // Even volumes go (each for its owner; one asked for by the wrong claim), odd
        // ones stay; a full refresh runs alongside, as the agent's timer does.
        std::thread::scope(|s| {
            for i in (0..40).step_by(2) {
                let ex = ex.clone();
                s.spawn(move || {
                    let n = name(&format!("v{i}"));
                    let claim = if i == 10 {
                        "intruder".to_owned()
                    } else {
                        format!("u{i}")
                    };
                    let r = ex.store().remove_for(&n, &claim, false);
                    assert_eq!(r.is_ok(), i != 10, "v{i}: {r:?}");
                    ex.refresh_volume(&n).expect("refresh");
                });
            }
            let ex = ex.clone();
            s.spawn(move || {
                for _ in 0..5 {
                    ex.refresh().expect("full refresh");
                }
            });
        });
        ex.refresh().expect("full refresh");
        let served: Vec<String> = ex.all().iter().map(|v| v.meta.name.to_string()).collect();
        let on_disk: Vec<String> = std::fs::read_dir(ex.store().volumes_dir())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        let mut want: Vec<String> = (0..40)
            .filter(|i| i % 2 == 1 || *i == 10)
            .map(|i| format!("v{i}"))
            .collect();
        want.sort();
        let mut on_disk = on_disk;
        on_disk.sort();
        assert_eq!(served, want);
        assert_eq!(on_disk, want);
        let trash = std::fs::read_dir(ex.store().root().join("trash"))
            .expect("trash")
            .count();
        assert_eq!(trash, 0, "removed trees left in the trash");
    }
}
