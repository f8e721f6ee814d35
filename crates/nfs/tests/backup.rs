//! Backup sets and restore (`Exports::backup_volume`, `backup::restore_set`) against
//! the in-process server's exports and real files: what a restore gives back, what an
//! incremental set copies, unfinished sets, retention, damaged sets, refusals, and a
//! full target (a tiny tmpfs mounted for the test).

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use localnfs_nfs::Error;
use localnfs_nfs::backup::{self, BackupOptions, COMPLETE, DATA};
use localnfs_nfs::volume::VolumeName;
use support::{MIB, Served};

fn name(s: &str) -> VolumeName {
    VolumeName::new(s).expect("volume name")
}

fn same_device() -> BackupOptions {
    BackupOptions {
        allow_same_device: true,
        ..BackupOptions::default()
    }
}

/// Every object under `dir`: path → (kind and contents or target, mode, uid, gid,
/// mtime).
fn snapshot(dir: &Path) -> BTreeMap<String, (String, u32, u32, u32, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("list") {
            let p = e.expect("entry").path();
            let rel = p.strip_prefix(dir).expect("inside").display().to_string();
            let md = std::fs::symlink_metadata(&p).expect("stat");
            let what = if md.is_dir() {
                stack.push(p.clone());
                "dir".to_owned()
            } else if md.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&p).expect("readlink").display())
            } else if md.is_file() {
                let data = std::fs::read(&p).expect("read");
                let h = ring::digest::digest(&ring::digest::SHA256, &data);
                format!("{:?} links {}", h.as_ref(), md.nlink())
            } else {
                "special".to_owned()
            };
            out.insert(
                rel,
                (
                    what,
                    md.mode() & 0o7777,
                    md.uid(),
                    md.gid(),
                    md.mtime() * 1_000_000_000 + md.mtime_nsec(),
                ),
            );
        }
    }
    out
}

fn fill(dir: &Path) {
    std::fs::create_dir_all(dir.join("db/sub")).expect("mkdir");
    std::fs::write(dir.join("db/ibdata1"), vec![7u8; 3 * MIB as usize]).expect("write");
    std::fs::write(dir.join("db/sub/t1.ibd"), b"table one").expect("write");
    std::fs::write(dir.join("notes"), b"hello").expect("write");
    std::fs::hard_link(dir.join("notes"), dir.join("db/notes-link")).expect("link");
    std::os::unix::fs::symlink("db/sub/t1.ibd", dir.join("current")).expect("symlink");
    std::fs::set_permissions(dir.join("notes"), std::fs::Permissions::from_mode(0o640))
        .expect("chmod");
    std::os::unix::fs::chown(dir.join("db/sub/t1.ibd"), Some(999), Some(998)).expect("chown");
    std::os::unix::fs::chown(dir.join("db"), Some(999), Some(998)).expect("chown");
}

struct Setup {
    served: Served,
    target: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Self {
        let served = Served::start(&[("db0", 64 * MIB)]).await;
        fill(&served.exports.store().data_dir(&name("db0")));
        Setup {
            served,
            target: tempfile::tempdir().expect("target"),
        }
    }

    fn src(&self) -> PathBuf {
        self.served.exports.store().data_dir(&name("db0"))
    }

    fn backup(&self, opts: &BackupOptions) -> Result<backup::BackupReport, Error> {
        self.served
            .exports
            .backup_volume(&name("db0"), self.target.path(), opts)
    }

    fn complete_sets(&self) -> Vec<String> {
        backup::list_sets(self.target.path(), &name("db0"))
            .expect("list")
            .into_iter()
            .filter(|s| s.summary.is_some())
            .map(|s| s.id)
            .collect()
    }
}

#[tokio::test]
async fn a_restored_volume_has_the_backed_up_files_owners_modes_and_links() {
    let s = Setup::new().await;
    let before = snapshot(&s.src());
    let r = s.backup(&same_device()).expect("backup");
    assert_eq!(r.summary.files, 3, "{r:?}");
    assert_eq!(r.summary.bytes_linked, 0, "a first set links nothing");
    assert_eq!(r.summary.bytes_copied, r.summary.bytes);
    // The source is gone; the set alone brings it back.
    s.served
        .exports
        .store()
        .delete(&name("db0"))
        .expect("delete");
    let store = s.served.exports.store();
    let (meta, rr) =
        backup::restore_set(store, &r.path, &name("db0-restored"), None).expect("restore");
    assert_eq!(
        meta.size_bytes,
        64 * MIB,
        "the backed-up volume's size by default"
    );
    assert_eq!(rr.files, 3);
    let after = snapshot(&store.data_dir(&name("db0-restored")));
    assert_eq!(before, after);
    assert!(store.get(&name("db0-restored")).expect("get").is_some());
}

#[tokio::test]
async fn a_second_backup_copies_only_the_file_that_changed() {
    let s = Setup::new().await;
    let first = s.backup(&same_device()).expect("first backup");
    std::fs::write(s.src().join("db/sub/t1.ibd"), b"table one, changed").expect("change");
    let second = s.backup(&same_device()).expect("second backup");
    assert_eq!(second.summary.base.as_deref(), Some(first.id.as_str()));
    assert_eq!(second.summary.bytes_copied, 18, "{second:?}");
    assert_eq!(second.summary.bytes_linked, 3 * MIB + 5);
    let ino = |set: &Path, p: &str| {
        std::fs::metadata(set.join(DATA).join(p))
            .expect("stat")
            .ino()
    };
    assert_eq!(
        ino(&first.path, "db/ibdata1"),
        ino(&second.path, "db/ibdata1")
    );
    assert_ne!(
        ino(&first.path, "db/sub/t1.ibd"),
        ino(&second.path, "db/sub/t1.ibd")
    );
    // Deleting the older set leaves the newer one whole.
    std::fs::remove_dir_all(&first.path).expect("remove first set");
    let before = snapshot(&s.src());
    let store = s.served.exports.store();
    backup::restore_set(store, &second.path, &name("again"), None).expect("restore");
    assert_eq!(before, snapshot(&store.data_dir(&name("again"))));
}

#[tokio::test]
async fn an_unfinished_set_is_not_listed_not_restorable_and_removed_by_the_next_backup() {
    let s = Setup::new().await;
    let done = s.backup(&same_device()).expect("backup");
    // What a killed backup leaves: a .partial, and a set whose marker never came.
    let vol = s.target.path().join("db0");
    let partial = vol.join("20300101T000000.000Z.partial");
    let unmarked = vol.join("20300101T000001.000Z");
    for d in [&partial, &unmarked] {
        std::fs::create_dir_all(d.join(DATA)).expect("mkdir");
        std::fs::copy(done.path.join("manifest.json"), d.join("manifest.json")).expect("copy");
    }
    assert_eq!(s.complete_sets(), vec![done.id.clone()]);
    let store = s.served.exports.store();
    for d in [&partial, &unmarked] {
        let e = backup::restore_set(store, d, &name("nope"), None).expect_err("not a set");
        assert!(e.to_string().contains("not a complete backup set"), "{e}");
    }
    assert!(store.get(&name("nope")).expect("get").is_none());
    let next = s.backup(&same_device()).expect("next backup");
    assert!(!partial.exists() && !unmarked.exists());
    assert_eq!(s.complete_sets(), vec![done.id, next.id]);
}

#[tokio::test]
async fn retention_keeps_the_newest_sets() {
    let s = Setup::new().await;
    let mut ids = Vec::new();
    for i in 0..4 {
        std::fs::write(s.src().join("notes"), format!("round {i}")).expect("change");
        let r = s
            .backup(&BackupOptions {
                keep: Some(2),
                ..same_device()
            })
            .expect("backup");
        ids.push(r.id);
    }
    assert_eq!(s.complete_sets(), ids[2..].to_vec());
}

#[tokio::test]
async fn a_damaged_file_in_a_set_fails_the_restore_and_makes_nothing() {
    let s = Setup::new().await;
    let r = s.backup(&same_device()).expect("backup");
    let victim = r.path.join(DATA).join("db/ibdata1");
    let mut data = std::fs::read(&victim).expect("read");
    data[12345] ^= 1;
    std::fs::write(&victim, data).expect("damage");
    let store = s.served.exports.store();
    let e = backup::restore_set(store, &r.path, &name("bad"), None).expect_err("damaged");
    assert!(
        e.to_string().contains("db/ibdata1 in the set is damaged"),
        "{e}"
    );
    assert!(store.get(&name("bad")).expect("get").is_none());
    assert!(!store.data_dir(&name("bad")).exists());
    let staging = store.root().join("staging");
    let left: Vec<_> = std::fs::read_dir(&staging)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "staging holds {left:?}");
}

#[tokio::test]
async fn a_restore_never_writes_into_an_existing_volume() {
    let s = Setup::new().await;
    let r = s.backup(&same_device()).expect("backup");
    let before = snapshot(&s.src());
    let e = backup::restore_set(s.served.exports.store(), &r.path, &name("db0"), None)
        .expect_err("exists");
    assert!(matches!(e, Error::VolumeExists { .. }), "{e}");
    assert_eq!(before, snapshot(&s.src()));
}

#[tokio::test]
async fn a_target_on_the_stores_disk_is_refused_unless_allowed() {
    let s = Setup::new().await;
    let e = s
        .backup(&BackupOptions::default())
        .expect_err("same device");
    assert!(
        e.to_string().contains("same device as the volume store"),
        "{e}"
    );
    assert!(s.complete_sets().is_empty());
}

/// A tmpfs of `size` mounted on a temp directory, unmounted when dropped.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("mountpoint");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(ok.success(), "mount a tmpfs (the test needs root)");
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_target_fails_the_backup_clearly_and_leaves_the_source_and_target_clean() {
    let s = Setup::new().await;
    let disk = SmallDisk::mount("1m");
    let before = snapshot(&s.src());
    let e = s
        .served
        .exports
        .backup_volume(&name("db0"), disk.0.path(), &BackupOptions::default())
        .expect_err("target full");
    assert!(e.to_string().contains("the backup target is full"), "{e}");
    assert_eq!(before, snapshot(&s.src()), "the source changed");
    let left: Vec<String> = std::fs::read_dir(disk.0.path().join("db0"))
        .expect("list")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "the target holds {left:?}");
    let staging = s.served.exports.store().root().join("staging");
    let snap: Vec<_> = std::fs::read_dir(&staging)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(snap.is_empty(), "the snapshot was left: {snap:?}");
    assert!(!s.target.path().join("db0").join(COMPLETE).exists());
}

/// Takes `path`'s flock as another backup would (per open file, so it holds even
/// against this process).
fn hold(path: &Path) -> std::fs::File {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let f = std::fs::File::create(path).expect("lock file");
    // SAFETY: a valid descriptor for the call.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    f
}

#[tokio::test]
async fn a_second_backup_of_a_volume_while_one_runs_is_refused_with_the_reason() {
    let s = Setup::new().await;
    {
        let _same_target = hold(&s.target.path().join("db0/.lock"));
        let e = s
            .backup(&same_device())
            .expect_err("one at a time per target");
        assert!(
            e.to_string()
                .contains("another backup of this volume to this target"),
            "{e}"
        );
    }
    {
        let root = s.served.exports.store().root().to_owned();
        let _snapshot = hold(&root.join("staging/db0.backup.partial/lock"));
        let e = s
            .backup(&same_device())
            .expect_err("one snapshot at a time");
        assert!(
            e.to_string()
                .contains("is taking its snapshot on this node"),
            "{e}"
        );
    }
    assert!(s.complete_sets().is_empty());
    s.backup(&same_device()).expect("once the others are gone");
}

#[tokio::test]
async fn a_symlink_planted_in_a_set_is_not_followed_by_a_restore() {
    let s = Setup::new().await;
    let r = s.backup(&same_device()).expect("backup");
    // Outside the set, the very bytes the manifest expects: only following the link
    // would make them match.
    let outside = tempfile::NamedTempFile::new().expect("outside file");
    std::fs::write(outside.path(), b"table one").expect("write");
    let planted = r.path.join(DATA).join("db/sub/t1.ibd");
    std::fs::remove_file(&planted).expect("remove");
    std::os::unix::fs::symlink(outside.path(), &planted).expect("plant");
    let store = s.served.exports.store();
    let e = backup::restore_set(store, &r.path, &name("evil"), None).expect_err("planted");
    assert!(
        e.to_string()
            .contains("file db/sub/t1.ibd in the set is damaged"),
        "{e}"
    );
    assert!(store.get(&name("evil")).expect("get").is_none());
}

#[tokio::test]
async fn a_manifest_that_writes_through_its_own_symlink_is_refused_by_a_restore() {
    let s = Setup::new().await;
    let r = s.backup(&same_device()).expect("backup");
    let outside = tempfile::tempdir().expect("outside");
    // A forged manifest: symlink `escape` to a directory outside, then a file under it.
    let path = r.path.join("manifest.json");
    let mut m: backup::Manifest =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("manifest");
    let file = m
        .items
        .iter()
        .find(|i| i.path == "db/sub/t1.ibd")
        .expect("file item")
        .clone();
    let mut link = file.clone();
    link.path = "escape".into();
    link.kind = backup::Kind::Symlink;
    link.target = Some(outside.path().display().to_string());
    link.sha256 = None;
    let mut through = file;
    through.path = "escape/t1.ibd".into();
    std::fs::create_dir_all(r.path.join(DATA).join("escape")).expect("mkdir");
    std::fs::copy(
        r.path.join(DATA).join("db/sub/t1.ibd"),
        r.path.join(DATA).join("escape/t1.ibd"),
    )
    .expect("copy");
    m.items.push(link);
    m.items.push(through);
    std::fs::write(&path, serde_json::to_vec(&m).expect("encode")).expect("forge");
    let store = s.served.exports.store();
    let e = backup::restore_set(store, &r.path, &name("evil"), None).expect_err("forged");
    assert!(e.to_string().contains("outside a directory it made"), "{e}");
    assert!(
        !outside.path().join("t1.ibd").exists(),
        "wrote outside the volume"
    );
    assert!(store.get(&name("evil")).expect("get").is_none());
}

#[tokio::test]
async fn a_manifest_that_hard_links_a_file_outside_the_set_is_refused_by_a_restore() {
    let s = Setup::new().await;
    let r = s.backup(&same_device()).expect("backup");
    let path = r.path.join("manifest.json");
    let mut m: backup::Manifest =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("manifest");
    // Another volume's file on the same disk, named from the new volume's root.
    let item = m
        .items
        .iter_mut()
        .find(|i| i.path == "db/notes-link")
        .expect("link item");
    item.link = Some("../../../volumes/db0/db/ibdata1".into());
    std::fs::write(&path, serde_json::to_vec(&m).expect("encode")).expect("forge");
    let store = s.served.exports.store();
    let e = backup::restore_set(store, &r.path, &name("evil"), None).expect_err("forged");
    assert!(e.to_string().contains("which it did not make"), "{e}");
    assert!(store.get(&name("evil")).expect("get").is_none());
}

#[tokio::test]
async fn a_backup_never_removes_a_directory_under_the_target_that_is_not_a_set() {
    let s = Setup::new().await;
    let vol = s.target.path().join("db0");
    let theirs = vol.join("tenant-data");
    std::fs::create_dir_all(&theirs).expect("mkdir");
    std::fs::write(theirs.join("keep-me"), b"not a backup").expect("write");
    let partial = vol.join("20300101T000000.000Z.partial");
    std::fs::create_dir_all(partial.join(DATA)).expect("mkdir");
    s.backup(&same_device()).expect("backup");
    assert_eq!(
        std::fs::read(theirs.join("keep-me")).expect("still there"),
        b"not a backup"
    );
    assert!(!partial.exists(), "an unfinished set is still removed");
}

#[tokio::test]
async fn a_target_inside_the_volume_store_is_refused_even_when_same_device_is_allowed() {
    let s = Setup::new().await;
    let store = s.served.exports.store();
    let before = snapshot(&s.src());
    // `<to>/db0` would be the live volume itself.
    let volumes = s.src().parent().expect("volumes dir").to_owned();
    for to in [
        volumes.clone(),
        store.root().to_owned(),
        volumes.join("db0/db"),
    ] {
        let e = s
            .served
            .exports
            .backup_volume(&name("db0"), &to, &same_device())
            .expect_err("inside the store");
        assert!(e.to_string().contains("inside the volume store"), "{e}");
    }
    assert_eq!(before, snapshot(&s.src()), "the volume changed");
}

/// Rewrites `set`'s manifest with `f`.
fn forge(set: &Path, f: impl FnOnce(&mut backup::Manifest)) {
    let path = set.join("manifest.json");
    let mut m: backup::Manifest =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("manifest");
    f(&mut m);
    std::fs::write(&path, serde_json::to_vec(&m).expect("encode")).expect("forge");
}

/// Runs a restore on a thread, failing the test if it has not ended within `secs`.
fn restore_within(
    s: &Setup,
    set: &Path,
    to: &str,
    size: Option<u64>,
    secs: u64,
) -> Result<(), Error> {
    let (tx, rx) = std::sync::mpsc::channel();
    let root = s.served.exports.store().root().to_owned();
    let set = set.to_owned();
    let to = name(to);
    std::thread::spawn(move || {
        let store = localnfs_nfs::volume::VolumeStore::open(&root).expect("store");
        let _ = tx.send(backup::restore_set(&store, &set, &to, size).map(|_| ()));
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .expect("the restore hung")
}

#[tokio::test]
async fn a_fifo_in_a_set_where_a_file_belongs_fails_the_restore_instead_of_hanging_it() {
    let s = Setup::new().await;
    let r = s.backup(&same_device()).expect("backup");
    let planted = r.path.join(DATA).join("db/sub/t1.ibd");
    std::fs::remove_file(&planted).expect("remove");
    let c = std::ffi::CString::new(planted.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a NUL-terminated path valid for the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let e = restore_within(&s, &r.path, "evil", None, 20).expect_err("a FIFO");
    assert!(e.to_string().contains("not a regular file"), "{e}");
    assert!(
        s.served
            .exports
            .store()
            .get(&name("evil"))
            .expect("get")
            .is_none()
    );
}

#[tokio::test]
async fn a_set_file_bigger_than_its_manifest_entry_fails_without_reading_it_or_naming_its_hash() {
    let s = Setup::new().await;
    let r = s.backup(&same_device()).expect("backup");
    let victim = r.path.join(DATA).join("db/ibdata1");
    std::fs::remove_file(&victim).expect("remove");
    // Sparse: reading it to the end would copy 256 MiB of zeros into the store.
    std::fs::File::create(&victim)
        .and_then(|f| f.set_len(256 << 20))
        .expect("sparse file");
    let e = restore_within(&s, &r.path, "big", None, 20).expect_err("too big");
    let msg = e.to_string();
    assert!(msg.contains("db/ibdata1 in the set is damaged"), "{msg}");
    assert!(!msg.contains(&(256u64 << 20).to_string()), "{msg}");
    assert!(
        s.served
            .exports
            .store()
            .get(&name("big"))
            .expect("get")
            .is_none()
    );
}

#[tokio::test]
async fn a_symlinked_directory_planted_in_a_set_is_not_followed_by_a_restore() {
    let s = Setup::new().await;
    let r = s.backup(&same_device()).expect("backup");
    // Outside the set, the very bytes the manifest expects, under a directory that
    // the set's `db/sub` points to.
    let outside = tempfile::tempdir().expect("outside");
    std::fs::write(outside.path().join("t1.ibd"), b"table one").expect("write");
    let sub = r.path.join(DATA).join("db/sub");
    std::fs::remove_dir_all(&sub).expect("remove");
    std::os::unix::fs::symlink(outside.path(), &sub).expect("plant");
    let store = s.served.exports.store();
    let e = backup::restore_set(store, &r.path, &name("evil"), None).expect_err("planted");
    assert!(
        e.to_string()
            .contains("file db/sub/t1.ibd in the set is damaged"),
        "{e}"
    );
    assert!(store.get(&name("evil")).expect("get").is_none());
}

#[tokio::test]
async fn a_manifest_understating_its_bytes_or_objects_is_refused_before_the_restore_starts() {
    let s = Setup::new().await;
    let r = s.backup(&same_device()).expect("backup");
    let store = s.served.exports.store();
    forge(&r.path, |m| m.summary.bytes = 0);
    let e = backup::restore_set(store, &r.path, &name("small"), Some(MIB)).expect_err("too big");
    assert!(
        e.to_string().contains("more than the new volume's size"),
        "{e}"
    );
    forge(&r.path, |m| {
        m.spec.max_files = Some(2);
    });
    let e = backup::restore_set(store, &r.path, &name("few"), None).expect_err("too many");
    assert!(e.to_string().contains("more objects than"), "{e}");
    assert!(store.get(&name("small")).expect("get").is_none());
    assert!(store.get(&name("few")).expect("get").is_none());
}

#[tokio::test]
async fn a_restore_refuses_device_nodes_unless_the_store_allows_them() {
    let s = Setup::new().await;
    let r = s.backup(&same_device()).expect("backup");
    forge(&r.path, |m| {
        let mut dev = m
            .items
            .iter()
            .find(|i| i.path == "notes")
            .expect("item")
            .clone();
        dev.path = "mem".into();
        dev.kind = backup::Kind::Char;
        dev.sha256 = None;
        dev.size = 0;
        dev.rdev = libc::makedev(1, 1);
        m.items.push(dev);
    });
    let store = s.served.exports.store();
    let e = backup::restore_set(store, &r.path, &name("dev"), None).expect_err("device");
    assert!(e.to_string().contains("device node"), "{e}");
    assert!(store.get(&name("dev")).expect("get").is_none());
    assert!(!store.data_dir(&name("dev")).exists());
}

#[tokio::test]
async fn a_backup_whose_snapshot_would_take_space_promised_to_other_volumes_is_refused() {
    let served = Served::start(&[("db0", 64 * MIB), ("huge", 1 << 60)]).await;
    fill(&served.exports.store().data_dir(&name("db0")));
    // What the agent does every few seconds: the files above were written directly.
    served.exports.recount_usage();
    let target = tempfile::tempdir().expect("target");
    let e = served
        .exports
        .backup_volume(&name("db0"), target.path(), &same_device())
        .expect_err("no room");
    assert!(e.to_string().contains("promised to volumes"), "{e}");
    let staging = served.exports.store().root().join("staging");
    let snap: Vec<_> = std::fs::read_dir(&staging)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(snap.is_empty(), "a snapshot was taken: {snap:?}");
}

#[tokio::test]
async fn a_full_target_is_found_before_the_snapshot_is_taken() {
    let s = Setup::new().await;
    let disk = SmallDisk::mount("64k");
    let _ = std::fs::write(disk.0.path().join("filler"), vec![1u8; 1 << 20]);
    let e = s
        .served
        .exports
        .backup_volume(&name("db0"), disk.0.path(), &BackupOptions::default())
        .expect_err("target full");
    let msg = e.to_string();
    assert!(
        msg.contains("the backup target is full (probe the target"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_set_from_before_a_clock_step_back_does_not_make_retention_prune_the_new_one() {
    let s = Setup::new().await;
    let first = s.backup(&same_device()).expect("backup");
    // A set stamped in the future, as a node whose clock was ahead left it.
    let future = s.target.path().join("db0/20991231T000000.000Z");
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(&first.path)
        .arg(&future)
        .status()
        .expect("cp");
    assert!(ok.success());
    let r = s
        .backup(&BackupOptions {
            keep: Some(1),
            ..same_device()
        })
        .expect("backup");
    assert!(
        r.path.join(COMPLETE).exists(),
        "the set just written was pruned"
    );
    assert!(s.complete_sets().contains(&r.id));
}

#[tokio::test]
async fn a_retention_failure_after_a_complete_set_is_a_warning_not_a_failed_backup() {
    let s = Setup::new().await;
    let first = s.backup(&same_device()).expect("backup");
    // A mount inside the old set: removing it fails with EBUSY.
    let busy = SmallDisk::mount("1m");
    let inside = first.path.join(DATA).join("db");
    let ok = std::process::Command::new("mount")
        .args(["--bind"])
        .arg(busy.0.path())
        .arg(&inside)
        .status()
        .expect("mount");
    assert!(ok.success());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(inside);
    std::fs::write(s.src().join("notes"), b"changed").expect("change");
    let r = s
        .backup(&BackupOptions {
            keep: Some(1),
            ..same_device()
        })
        .expect("the set is complete; pruning is not the backup");
    assert!(r.path.join(COMPLETE).exists());
    assert!(
        r.warnings.iter().any(|w| w.contains("remove expired set")),
        "{:?}",
        r.warnings
    );
}

#[tokio::test]
async fn a_tampered_file_in_the_previous_set_is_copied_afresh_not_linked_into_the_next() {
    let s = Setup::new().await;
    let first = s.backup(&same_device()).expect("first backup");
    let data = first.path.join(DATA);
    // A symlink where a file was, to the very bytes the manifest expects…
    let outside = tempfile::NamedTempFile::new().expect("outside file");
    std::fs::write(outside.path(), b"table one").expect("write");
    std::fs::remove_file(data.join("db/sub/t1.ibd")).expect("remove");
    std::os::unix::fs::symlink(outside.path(), data.join("db/sub/t1.ibd")).expect("plant");
    // …and a file cut short.
    std::fs::File::options()
        .write(true)
        .open(data.join("db/ibdata1"))
        .and_then(|f| f.set_len(MIB))
        .expect("truncate");
    let second = s.backup(&same_device()).expect("second backup");
    assert_eq!(second.summary.bytes_linked, 5, "{second:?}");
    let store = s.served.exports.store();
    let before = snapshot(&s.src());
    backup::restore_set(store, &second.path, &name("again"), None).expect("restore");
    assert_eq!(before, snapshot(&store.data_dir(&name("again"))));
}

fn owner(ns: &str, claim: &str) -> localnfs_nfs::volume::Owner {
    localnfs_nfs::volume::Owner {
        claim_uid: format!("uid-{claim}"),
        namespace: ns.into(),
        claim: claim.into(),
    }
}

/// A restore for a claim (the node agent's, for a VolumeRestore) takes only a set of
/// the claim's own namespace: a tenant naming another namespace's volume or set gets
/// nothing, and a set without an owner record is left to the restore by hand.
#[tokio::test]
async fn a_restore_for_a_claim_takes_only_sets_of_its_own_namespace() {
    let s = Setup::new().await;
    let store = s.served.exports.store();
    let spec = localnfs_nfs::volume::VolumeSpec::new(name("owned"), 16 * MIB);
    store
        .create_for(&spec, &owner("shop", "data-0"))
        .expect("create");
    s.served
        .exports
        .refresh_volume(&name("owned"))
        .expect("serve");
    std::fs::write(store.data_dir(&name("owned")).join("orders"), b"42").expect("write");
    let owned = s
        .served
        .exports
        .backup_volume(&name("owned"), s.target.path(), &same_device())
        .expect("backup");
    let unowned = s.backup(&same_device()).expect("backup");
    let for_claim = |ns: &str, claim: &str| backup::RestoreOptions {
        owner: Some(owner(ns, claim)),
        ..backup::RestoreOptions::default()
    };

    let e = backup::restore_set_with(store, &owned.path, &name("stolen"), &for_claim("bank", "x"))
        .expect_err("another namespace's set");
    assert!(
        e.to_string().contains("the set belongs to namespace shop"),
        "{e}"
    );
    let e = backup::restore_set_with(store, &unowned.path, &name("old"), &for_claim("shop", "y"))
        .expect_err("a set without an owner");
    assert!(e.to_string().contains("made before owner records"), "{e}");
    for made in ["stolen", "old"] {
        assert!(
            store.get(&name(made)).expect("read").is_none(),
            "{made} made"
        );
        assert!(
            !store.data_dir(&name(made)).exists(),
            "{made} has a directory"
        );
    }

    let (meta, _) = backup::restore_set_with(
        store,
        &owned.path,
        &name("back"),
        &for_claim("shop", "db-restored"),
    )
    .expect("restore");
    assert_eq!(meta.owner, Some(owner("shop", "db-restored")));
    assert_eq!(
        std::fs::read(store.data_dir(&name("back")).join("orders")).expect("read"),
        b"42"
    );
    // By hand on the node (no claim), any complete set.
    backup::restore_set(store, &unowned.path, &name("by-hand"), None).expect("restore by hand");
}
