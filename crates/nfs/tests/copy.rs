//! Point-in-time copies of a live volume (`Exports::clone_volume`) against the
//! in-process server, with a client changing the source over RPC while the copy runs:
//! the copy is the source as it was at one instant between the call and its return
//! (every call acknowledged before it started is in, the state is one the source
//! really had), and a copy that cannot finish leaves nothing.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use localnfs_nfs::Error;
use localnfs_nfs::volume::{Owner, VolumeName, VolumeSpec, VolumeStore};
use nfs3_types::nfs3::*;
use support::{MIB, Served};

fn name(s: &str) -> VolumeName {
    VolumeName::new(s).expect("volume name")
}

fn owner() -> Owner {
    Owner {
        claim_uid: "uid-copy".into(),
        namespace: "db".into(),
        claim: "data-1".into(),
    }
}

/// Every regular file under `dir` (relative path → bytes); directories as `path/`.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("list") {
            let p = e.expect("entry").path();
            let rel = p
                .strip_prefix(dir)
                .expect("inside")
                .to_string_lossy()
                .into_owned();
            if p.is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                stack.push(p);
            } else {
                out.insert(rel, std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

/// One acknowledged change, as the writer's model applies it.
#[derive(Clone, Debug)]
enum Op {
    Write(String, u64, Vec<u8>),
    Truncate(String, u64),
    Create(String),
    Remove(String),
    Rename(String, String),
}

fn apply(model: &mut BTreeMap<String, Vec<u8>>, op: &Op) -> Vec<String> {
    match op {
        Op::Write(p, off, data) => {
            let f = model.get_mut(p).expect("written file exists");
            let end = *off as usize + data.len();
            if f.len() < end {
                f.resize(end, 0);
            }
            f[*off as usize..end].copy_from_slice(data);
            vec![p.clone()]
        }
        Op::Truncate(p, size) => {
            model
                .get_mut(p)
                .expect("truncated file exists")
                .resize(*size as usize, 0);
            vec![p.clone()]
        }
        Op::Create(p) => {
            model.insert(p.clone(), Vec::new());
            vec![p.clone()]
        }
        Op::Remove(p) => {
            model.remove(p);
            vec![p.clone()]
        }
        Op::Rename(a, b) => {
            let data = model.remove(a).expect("renamed file exists");
            model.insert(b.clone(), data);
            vec![a.clone(), b.clone()]
        }
    }
}

/// A small deterministic generator (no dependency, same run every time).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const FILES: usize = 300;
const FILE_SIZE: usize = 128 * 1024;

/// The source as the test writes it before serving: `FILES` files of `FILE_SIZE`
/// distinct bytes in the root and in `sub/`.
fn preload(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::create_dir(dir.join("sub")).expect("mkdir");
    let mut model = BTreeMap::new();
    model.insert("sub/".to_string(), Vec::new());
    for i in 0..FILES {
        let rel = if i % 3 == 0 {
            format!("sub/f{i}")
        } else {
            format!("f{i}")
        };
        let data: Vec<u8> = (0..FILE_SIZE).map(|b| (b * 7 + i) as u8).collect();
        std::fs::write(dir.join(&rel), &data).expect("write");
        model.insert(rel, data);
    }
    model
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_volume_being_written_is_the_volume_at_one_instant_with_every_acknowledged_call()
 {
    let server = Served::start(&[("src", 256 * MIB)]).await;
    let ex = server.exports.clone();
    let initial = preload(&ex.store().data_dir(&name("src")));
    ex.recount_usage();

    let mut c = server.mount("src").await;
    let root = c.root.clone();
    let sub = c.lookup(&root, b"sub").await.expect("LOOKUP sub");
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        let mut model = initial.clone();
        tokio::spawn(async move {
            let mut rng = Lcg(23);
            let mut log = Vec::new();
            let mut serial = 0u32;
            let dir_of = |p: &str| if p.starts_with("sub/") { 1 } else { 0 };
            let base = |p: &str| p.rsplit('/').next().unwrap_or(p).as_bytes().to_vec();
            while !stop.load(Ordering::Acquire) || log.len() < 50 {
                let files: Vec<String> = model
                    .keys()
                    .filter(|k| !k.ends_with('/'))
                    .cloned()
                    .collect();
                let pick = files[rng.below(files.len() as u64) as usize].clone();
                let dirs = [&root, &sub];
                let fh = c
                    .lookup(dirs[dir_of(&pick)], &base(&pick))
                    .await
                    .expect("LOOKUP a file the model has");
                serial += 1;
                let size = model[&pick].len() as u64;
                let op = match rng.below(10) {
                    0..=3 => {
                        let off = rng.below(size + 1);
                        let len = 1 + rng.below(48 * 1024) as usize;
                        let data: Vec<u8> = (0..len).map(|b| (b as u32 ^ serial) as u8).collect();
                        c.write(&fh, off, &data, stable_how::FILE_SYNC)
                            .await
                            .expect("WRITE");
                        Op::Write(pick, off, data)
                    }
                    4 => {
                        let data = serial.to_be_bytes().repeat(1024);
                        c.write(&fh, size, &data, stable_how::FILE_SYNC)
                            .await
                            .expect("append");
                        Op::Write(pick, size, data)
                    }
                    5 => {
                        let to = rng.below(size + 1);
                        c.truncate(&fh, to).await.expect("SETATTR size");
                        Op::Truncate(pick, to)
                    }
                    6 if files.len() > 20 => {
                        c.remove(dirs[dir_of(&pick)], &base(&pick))
                            .await
                            .expect("REMOVE");
                        Op::Remove(pick)
                    }
                    7 | 8 => {
                        // To a new name or over another file, maybe across directories.
                        let to = if rng.below(2) == 0 {
                            files[rng.below(files.len() as u64) as usize].clone()
                        } else if rng.below(2) == 0 {
                            format!("sub/n{serial}")
                        } else {
                            format!("n{serial}")
                        };
                        if to == pick {
                            continue;
                        }
                        c.rename(
                            (dirs[dir_of(&pick)], &base(&pick)),
                            (dirs[dir_of(&to)], &base(&to)),
                        )
                        .await
                        .expect("RENAME");
                        Op::Rename(pick, to)
                    }
                    _ => {
                        let p = format!("c{serial}");
                        let fh = c.create(&root, p.as_bytes()).await.expect("CREATE");
                        log.push(Op::Create(p.clone()));
                        apply(&mut model, log.last().expect("just pushed"));
                        acked.fetch_add(1, Ordering::AcqRel);
                        let data = vec![serial as u8; 8192];
                        c.write(&fh, 0, &data, stable_how::FILE_SYNC)
                            .await
                            .expect("WRITE new file");
                        Op::Write(p, 0, data)
                    }
                };
                apply(&mut model, &op);
                log.push(op);
                acked.fetch_add(1, Ordering::AcqRel);
            }
            log
        })
    };
    // Let the writer get going, then copy. Which files the writer changes before the
    // copier reaches them is up to timing, so copy again (into a new volume each time)
    // until one copy had to preserve a change for the copier: each copy is checked.
    while acked.load(Ordering::Acquire) < 20 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let mut copies = Vec::new();
    for attempt in 0..5 {
        let target = name(&format!("copy{attempt}"));
        let before = acked.load(Ordering::Acquire);
        let copied = {
            let (ex, target) = (ex.clone(), target.clone());
            tokio::task::spawn_blocking(move || {
                ex.clone_volume(&name("src"), &VolumeSpec::new(target, 256 * MIB), &owner())
            })
            .await
            .expect("copy task")
        };
        let after = acked.load(Ordering::Acquire);
        let (meta, report) = copied.expect("copy");
        println!(
            "copy {attempt}: {report:?}; {before} calls acknowledged before it, {} while it ran",
            after - before
        );
        assert_eq!(meta.owner, Some(owner()));
        assert!(after - before >= 5, "the writer barely ran during the copy");
        let overlapped = report.preserved > 0;
        copies.push((target, before, after, report));
        if overlapped {
            break;
        }
    }
    stop.store(true, Ordering::Release);
    let log = writer.await.expect("writer");

    for (target, before, after, report) in &copies {
        let copy = tree(&ex.store().data_dir(target));
        let k = prefix_matching(&initial, &log, *before, *after, &copy);
        println!(
            "{target}: the copy is the source after call {k} of {}",
            log.len()
        );
        assert_eq!(
            report.files as usize,
            copy.keys().filter(|p| !p.ends_with('/')).count()
        );
        // The manifest names every file with its checksum.
        let manifest = std::fs::read_to_string(ex.store().manifest_path(target)).expect("manifest");
        let mut listed = 0;
        for line in manifest.lines() {
            let (hash, path) = line.split_once("  ").expect("sha256sum line");
            let digest = ring::digest::digest(&ring::digest::SHA256, &copy[path]);
            let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hash, hex, "{path}");
            listed += 1;
        }
        assert_eq!(listed, report.files);
    }
    assert!(
        copies.iter().any(|c| c.3.preserved > 0),
        "no change had to be preserved in {} copies: none overlapped the writer",
        copies.len()
    );

    // The copy is a volume the server serves.
    let mut cc = server.mount(copies[0].0.as_str()).await;
    let croot = cc.root.clone();
    let (names, _) = cc.list(&croot, 8192).await.expect("READDIRPLUS the copy");
    assert!(names.iter().any(|n| n == b"sub"));
    server.stop().await;
}

/// The number of calls of `log` after which the source was `copy`: at least every
/// call acknowledged before the copy started (`before`), at most one more than were
/// acknowledged when it returned (`after`, plus the one in flight then). Panics when
/// the copy is no state the source had in that window.
fn prefix_matching(
    initial: &BTreeMap<String, Vec<u8>>,
    log: &[Op],
    before: usize,
    after: usize,
    copy: &BTreeMap<String, Vec<u8>>,
) -> usize {
    let mut model = initial.clone();
    for op in &log[..before] {
        apply(&mut model, op);
    }
    let differs = |model: &BTreeMap<String, Vec<u8>>, p: &String| model.get(p) != copy.get(p);
    let mut bad: std::collections::BTreeSet<String> = model
        .keys()
        .chain(copy.keys())
        .filter(|p| differs(&model, p))
        .cloned()
        .collect();
    for k in before..=(after + 1).min(log.len()) {
        if bad.is_empty() {
            return k;
        }
        if k == log.len() {
            break;
        }
        for p in apply(&mut model, &log[k]) {
            if differs(&model, &p) {
                bad.insert(p);
            } else {
                bad.remove(&p);
            }
        }
    }
    panic!(
        "the copy is no state the source had between calls {before} and {after}; paths that differ at the last: {:?}",
        bad.iter().take(10).collect::<Vec<_>>()
    )
}

#[tokio::test]
async fn a_copy_into_a_volume_smaller_than_the_data_fails_and_leaves_nothing() {
    let server = Served::start(&[("src", 64 * MIB)]).await;
    let ex = server.exports.clone();
    let dir = ex.store().data_dir(&name("src"));
    std::fs::write(dir.join("big"), vec![1u8; 4 * MIB as usize]).expect("write");
    ex.recount_usage();
    let ex2 = ex.clone();
    let r = tokio::task::spawn_blocking(move || {
        ex2.clone_volume(&name("src"), &VolumeSpec::new(name("small"), MIB), &owner())
    })
    .await
    .expect("task");
    assert!(
        matches!(r, Err(Error::CloneTooLarge { .. })),
        "too small a target: {r:?}"
    );
    assert!(ex.store().get(&name("small")).expect("get").is_none());
    assert!(!ex.store().data_dir(&name("small")).exists());
    let staging = ex.store().root().join("staging");
    let left: Vec<_> = std::fs::read_dir(&staging)
        .map(|d| d.map(|e| e.expect("entry").file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "staging leftovers: {left:?}");

    let r = ex.clone_volume(&name("nope"), &VolumeSpec::new(name("x"), MIB), &owner());
    assert!(matches!(r, Err(Error::VolumeNotFound { .. })), "{r:?}");
    let r = ex.clone_volume(
        &name("src"),
        &VolumeSpec::new(name("src"), 64 * MIB),
        &owner(),
    );
    assert!(matches!(r, Err(Error::VolumeExists { .. })), "{r:?}");
    server.stop().await;
}

#[test]
fn leftovers_of_an_interrupted_copy_are_removed_when_the_store_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = VolumeStore::open(dir.path()).expect("store");
    store
        .create(&VolumeSpec::new(name("kept"), MIB))
        .expect("create");
    std::fs::write(store.data_dir(&name("kept")).join("f"), b"data").expect("write");
    // A copy killed while building (a staging tree, no lock holder) and one killed
    // between moving its data into place and writing its metadata.
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(staging.join("dead.partial/data/sub")).expect("mkdir");
    std::fs::write(staging.join("dead.partial/data/sub/x"), b"half").expect("write");
    std::fs::create_dir_all(staging.join("moved.partial")).expect("mkdir");
    std::fs::create_dir_all(store.data_dir(&name("moved"))).expect("mkdir");
    std::fs::write(store.data_dir(&name("moved")).join("x"), b"half").expect("write");
    // A copy a live process is building stays.
    let live = store.begin_copy(&name("live")).expect("begin");

    let reopened = VolumeStore::open(dir.path()).expect("reopen");
    let names: Vec<String> = reopened
        .list()
        .expect("list")
        .iter()
        .map(|m| m.name.to_string())
        .collect();
    assert_eq!(names, ["kept"]);
    assert!(!staging.join("dead.partial").exists());
    assert!(!staging.join("moved.partial").exists());
    assert!(
        !reopened.data_dir(&name("moved")).exists(),
        "half-made volume left"
    );
    assert!(
        staging.join("live.partial").exists(),
        "a live copy was removed"
    );
    assert_eq!(
        std::fs::read(reopened.data_dir(&name("kept")).join("f")).expect("read"),
        b"data"
    );
    drop(live);
    assert!(!staging.join("live.partial").exists());
}

/// Makes `src`'s data a 384 MiB `big` file in the root and an empty directory `z/`,
/// returning the data directory. The copier takes entries by name: `big` keeps it
/// busy while a test changes `z/`, which it has not reached.
fn busy_source(ex: &localnfs_nfs::nfs::Exports) -> std::path::PathBuf {
    let dir = ex.store().data_dir(&name("src"));
    std::fs::write(dir.join("big"), vec![9u8; 384 << 20]).expect("big");
    // Allocated now, extent blocks and all, so the usage counted later is final.
    std::fs::File::open(dir.join("big"))
        .and_then(|f| f.sync_all())
        .expect("sync big");
    std::fs::create_dir(dir.join("z")).expect("mkdir");
    dir
}

type CopyTask = tokio::task::JoinHandle<
    Result<
        (
            localnfs_nfs::volume::VolumeMeta,
            localnfs_nfs::nfs::CopyReport,
        ),
        Error,
    >,
>;

/// Starts cloning `src` into `copy` and returns once the instant is marked (the
/// copy's tree exists only after it).
async fn copy_started(ex: &Arc<localnfs_nfs::nfs::Exports>) -> CopyTask {
    let copy = {
        let ex = ex.clone();
        tokio::task::spawn_blocking(move || {
            ex.clone_volume(
                &name("src"),
                &VolumeSpec::new(name("copy"), 1 << 30),
                &owner(),
            )
        })
    };
    let data = ex.store().root().join("staging/copy.partial/data");
    let started = std::time::Instant::now();
    while !data.exists() {
        assert!(started.elapsed().as_secs() < 30, "the copy never started");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    copy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_changed_after_the_instant_are_in_the_copy_as_they_were_at_it() {
    let server = Served::start(&[("src", 1 << 30)]).await;
    let ex = server.exports.clone();
    let dir = busy_source(&ex);
    let t_bytes = |i: u8| {
        (0..256 * 1024u32)
            .map(|b| (b as u8) ^ i)
            .collect::<Vec<u8>>()
    };
    for (i, f) in [
        "removed",
        "overwritten",
        "truncated",
        "renamed",
        "moved-over",
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(dir.join("z").join(f), t_bytes(i as u8)).expect("write");
    }
    ex.recount_usage();
    let mut c = server.mount("src").await;
    let root = c.root.clone();
    let z = c.lookup(&root, b"z").await.expect("LOOKUP z");
    let over = c.lookup(&z, b"overwritten").await.expect("LOOKUP");
    let trunc = c.lookup(&z, b"truncated").await.expect("LOOKUP");
    let removed = c.lookup(&z, b"removed").await.expect("LOOKUP");

    let copy = copy_started(&ex).await;
    c.remove(&z, b"removed").await.expect("REMOVE");
    // The copy keeps its data, not its name: to clients it is gone.
    assert_eq!(
        c.write(&removed, 0, b"late", stable_how::FILE_SYNC)
            .await
            .err(),
        Some(nfsstat3::NFS3ERR_STALE),
        "a WRITE to a removed file"
    );
    c.write(&over, 1000, &[0xee; 70_000], stable_how::FILE_SYNC)
        .await
        .expect("WRITE");
    c.write(&over, 300_000, b"grown", stable_how::FILE_SYNC)
        .await
        .expect("WRITE past the end");
    c.truncate(&trunc, 10).await.expect("truncate");
    c.write(&trunc, 100, b"again", stable_how::FILE_SYNC)
        .await
        .expect("WRITE after truncate");
    c.rename((&z, b"renamed"), (&root, b"renamed-away"))
        .await
        .expect("RENAME");
    c.rename((&z, b"overwritten"), (&z, b"moved-over"))
        .await
        .expect("RENAME over");
    c.create(&z, b"new").await.expect("CREATE");
    let (_, report) = copy.await.expect("copy task").expect("copy");
    println!("{report:?}");

    let copied = ex.store().data_dir(&name("copy"));
    for (i, f) in [
        "removed",
        "overwritten",
        "truncated",
        "renamed",
        "moved-over",
    ]
    .iter()
    .enumerate()
    {
        assert_eq!(
            std::fs::read(copied.join("z").join(f)).expect("in the copy"),
            t_bytes(i as u8),
            "z/{f} is not as it was at the instant"
        );
    }
    assert!(!copied.join("z/new").exists(), "made after the instant");
    assert!(
        !copied.join("renamed-away").exists(),
        "renamed after the instant"
    );
    assert_eq!(
        std::fs::read(copied.join("big")).expect("big").len(),
        384 << 20
    );
    // The source has every change.
    assert!(!dir.join("z/removed").exists());
    assert_eq!(
        std::fs::metadata(dir.join("z/moved-over"))
            .expect("src")
            .len(),
        300_005
    );
    assert!(
        report.preserved > 0,
        "the copier reached z/ before the changes: nothing was exercised"
    );
    // What the source is charged is what it holds: nothing the copy kept counts.
    let v = ex.by_name(&name("src")).expect("served");
    let usage = ex.store().usage(&name("src")).expect("usage");
    assert_eq!(
        (
            v.used.load(Ordering::Acquire),
            v.inodes.load(Ordering::Acquire)
        ),
        (usage.bytes, usage.inodes),
        "the source's charge drifted"
    );
    server.stop().await;
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted when dropped.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir_in("/var/tmp").expect("mount point");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(ok.success(), "mounting a small tmpfs needs root");
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

#[test]
fn a_copy_that_runs_out_of_disk_fails_with_that_reason_and_leaves_nothing() {
    let disk = SmallDisk::mount("8m");
    let store = VolumeStore::open(disk.0.path()).expect("store");
    store
        .create(&VolumeSpec::new(name("src"), 64 * MIB))
        .expect("create");
    std::fs::write(store.data_dir(&name("src")).join("a"), vec![1u8; 3 << 20]).expect("a");
    std::fs::write(store.data_dir(&name("src")).join("b"), vec![2u8; 2 << 20]).expect("b");
    let allow = localnfs_nfs::nfs::AllowList::new(vec!["127.0.0.1".parse().expect("network")]);
    let ex = localnfs_nfs::nfs::Exports::load(store, allow).expect("exports");
    let r = ex.clone_volume(
        &name("src"),
        &VolumeSpec::new(name("copy"), 64 * MIB),
        &owner(),
    );
    match &r {
        Err(Error::CopyFailed { why, .. }) => assert!(why.contains("no room"), "{why}"),
        other => panic!("a copy that cannot fit on the disk: {other:?}"),
    }
    assert!(ex.store().get(&name("copy")).expect("get").is_none());
    assert!(!ex.store().data_dir(&name("copy")).exists());
    let staging: Vec<_> = std::fs::read_dir(disk.0.path().join("staging"))
        .expect("staging")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(staging.is_empty(), "left: {staging:?}");
    // The source is whole.
    assert_eq!(
        std::fs::read(ex.store().data_dir(&name("src")).join("a")).expect("a"),
        vec![1u8; 3 << 20]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_and_fifos_replaced_after_the_instant_are_those_in_the_copy() {
    // Many, so a few have their freed inode numbers go to this test's new files even
    // while other processes make files on the same disk.
    const N: usize = 40;
    let server = Served::start(&[("src", 1 << 30)]).await;
    let ex = server.exports.clone();
    let dir = busy_source(&ex);
    let mut t_inos = std::collections::HashSet::new();
    for k in 0..N {
        let link = dir.join(format!("z/link{k}"));
        std::os::unix::fs::symlink(format!("target{k}"), &link).expect("symlink");
        let pipe = dir.join(format!("z/pipe{k}"));
        let made = std::process::Command::new("mkfifo")
            .arg(&pipe)
            .status()
            .expect("run mkfifo");
        assert!(made.success(), "mkfifo");
        for p in [link, pipe] {
            let st = std::fs::symlink_metadata(p).expect("lstat");
            t_inos.insert(std::os::unix::fs::MetadataExt::ino(&st));
        }
    }
    ex.recount_usage();
    let mut c = server.mount("src").await;
    let root = c.root.clone();
    let z = c.lookup(&root, b"z").await.expect("LOOKUP z");

    let copy = copy_started(&ex).await;
    let mut reused = 0;
    for k in 0..N {
        // `ln -sfn`: a new link under a temporary name, renamed over the old one.
        c.symlink(&z, b"tmp", b"later").await.expect("SYMLINK");
        c.rename((&z, b"tmp"), (&z, format!("link{k}").as_bytes()))
            .await
            .expect("RENAME over the link");
        c.remove(&z, format!("pipe{k}").as_bytes())
            .await
            .expect("REMOVE the FIFO");
        // ext4 hands a freed inode number to the next new file.
        for n in ["a", "b"] {
            let fh = c
                .create(&z, format!("new{k}{n}").as_bytes())
                .await
                .expect("CREATE");
            if t_inos.contains(&c.getattr(&fh).await.expect("GETATTR").fileid) {
                reused += 1;
            }
        }
    }
    assert!(
        !copy.is_finished(),
        "the copier finished before the changes: nothing was exercised"
    );
    copy.await.expect("copy task").expect("copy");

    let copied = ex.store().data_dir(&name("copy")).join("z");
    for k in 0..N {
        let link = copied.join(format!("link{k}"));
        assert!(
            std::fs::symlink_metadata(&link)
                .expect("link in the copy")
                .file_type()
                .is_symlink(),
            "z/link{k} is not a symlink in the copy"
        );
        assert_eq!(
            std::fs::read_link(&link).expect("readlink"),
            Path::new(&format!("target{k}"))
        );
        let pipe = std::fs::symlink_metadata(copied.join(format!("pipe{k}"))).expect("pipe");
        assert!(
            std::os::unix::fs::FileTypeExt::is_fifo(&pipe.file_type()),
            "z/pipe{k} is not a FIFO in the copy"
        );
    }
    assert!(
        reused > 0,
        "no new file got an old inode number: nothing was exercised"
    );
    server.stop().await;
}

/// Removes `src` through the store while a copy of it runs (as reclaim does, past the
/// NFS calls' hooks): the copy must fail with that reason and make nothing.
async fn remove_source_during_its_copy(remove: impl FnOnce(&VolumeStore)) {
    let server = Served::start(&[("src", 1 << 30)]).await;
    let ex = server.exports.clone();
    let dir = busy_source(&ex);
    for i in 0..50 {
        std::fs::write(dir.join("z").join(format!("f{i}")), [i as u8; 4096]).expect("write");
    }
    ex.recount_usage();

    let copy = copy_started(&ex).await;
    remove(ex.store());
    assert!(
        !copy.is_finished(),
        "the copier finished before the removal: nothing was exercised"
    );
    match copy.await.expect("copy task") {
        Err(Error::CopyFailed { why, .. }) => assert!(
            why.contains("the source volume was removed during the copy"),
            "{why}"
        ),
        other => panic!("a copy of a volume removed under it: {other:?}"),
    }
    assert!(ex.store().get(&name("copy")).expect("get").is_none());
    assert!(!ex.store().data_dir(&name("copy")).exists());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_deleted_during_its_copy_fails_the_copy_and_makes_no_volume() {
    remove_source_during_its_copy(|s| s.delete(&name("src")).expect("delete")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_archived_during_its_copy_fails_the_copy_and_makes_no_volume() {
    remove_source_during_its_copy(|s| {
        s.archive(&name("src")).expect("archive");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_names_of_files_the_copier_is_finishing_keeps_the_source_charged_right() {
    const N: usize = 400;
    let server = Served::start(&[("src", 1 << 30)]).await;
    let ex = server.exports.clone();
    let dir = busy_source(&ex);
    // Files with three names each: the first goes before the copier reaches them
    // (the copy keeps them), the second while it finishes them, the third stays.
    let z = dir.join("z");
    for i in 0..N {
        std::fs::write(z.join(format!("a{i}")), vec![i as u8; 64 << 10]).expect("write");
        std::fs::hard_link(z.join(format!("a{i}")), z.join(format!("b{i}"))).expect("link");
        std::fs::hard_link(z.join(format!("a{i}")), z.join(format!("c{i}"))).expect("link");
    }
    // The order the copier takes them in (the directory's), by the first name of each.
    let mut order = Vec::new();
    let mut placed = std::collections::HashSet::new();
    for e in std::fs::read_dir(&z).expect("list z") {
        let n = e.expect("entry").file_name().into_string().expect("utf-8");
        let i: usize = n[1..].parse().expect("numbered");
        if placed.insert(i) {
            order.push((i, n));
        }
    }
    ex.recount_usage();
    let mut c = server.mount("src").await;
    let root = c.root.clone();
    let zh = c.lookup(&root, b"z").await.expect("LOOKUP z");

    let copy = copy_started(&ex).await;
    for i in 0..N {
        c.remove(&zh, format!("a{i}").as_bytes())
            .await
            .expect("REMOVE a");
    }
    // Each second name goes as the copier makes the copy of that file or the one
    // before it, so REMOVEs land while the copier finishes their file.
    let copied_z = ex.store().root().join("staging/copy.partial/data/z");
    let mut removed = vec![false; N];
    for (j, (_, first)) in order.iter().enumerate() {
        while !copied_z.join(first).exists() && !copy.is_finished() {
            std::hint::spin_loop();
        }
        let Some((i, _)) = order.get(j + j % 2) else {
            break;
        };
        if !std::mem::replace(&mut removed[*i], true) {
            c.remove(&zh, format!("b{i}").as_bytes())
                .await
                .expect("REMOVE b");
        }
    }
    copy.await.expect("copy task").expect("copy");
    let v = ex.by_name(&name("src")).expect("served");
    let usage = ex.store().usage(&name("src")).expect("usage");
    assert_eq!(
        (
            v.used.load(Ordering::Acquire),
            v.inodes.load(Ordering::Acquire)
        ),
        (usage.bytes, usage.inodes),
        "the source's charge drifted"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_removed_during_a_copy_is_stale_through_its_handle() {
    let server = Served::start(&[("src", 1 << 30)]).await;
    let ex = server.exports.clone();
    let dir = busy_source(&ex);
    std::fs::write(dir.join("z/f"), b"at the instant").expect("write");
    ex.recount_usage();
    let mut c = server.mount("src").await;
    let root = c.root.clone();
    let z = c.lookup(&root, b"z").await.expect("LOOKUP z");
    let f = c.lookup(&z, b"f").await.expect("LOOKUP f");

    let copy = copy_started(&ex).await;
    c.remove(&z, b"f").await.expect("REMOVE");
    // The copy keeps its data, not its name: to clients it is gone, as without a copy.
    assert_eq!(
        c.getattr(&f).await.err(),
        Some(nfsstat3::NFS3ERR_STALE),
        "GETATTR"
    );
    assert_eq!(
        c.read(&f, 0, 100).await.err(),
        Some(nfsstat3::NFS3ERR_STALE),
        "READ"
    );
    assert_eq!(
        c.link(&f, &z, b"back").await.err(),
        Some(nfsstat3::NFS3ERR_STALE),
        "LINK brought a removed file back"
    );
    assert!(
        !copy.is_finished(),
        "the copier finished before the changes: nothing was exercised"
    );
    copy.await.expect("copy task").expect("copy");
    let copied = ex.store().data_dir(&name("copy"));
    assert_eq!(
        std::fs::read(copied.join("z/f")).expect("in the copy"),
        b"at the instant"
    );
    assert!(!dir.join("z/back").exists());
    let v = ex.by_name(&name("src")).expect("served");
    let usage = ex.store().usage(&name("src")).expect("usage");
    assert_eq!(
        (
            v.used.load(Ordering::Acquire),
            v.inodes.load(Ordering::Acquire)
        ),
        (usage.bytes, usage.inodes),
        "the source's charge drifted"
    );
    server.stop().await;
}

#[tokio::test]
async fn copying_many_files_holds_only_the_directories_on_its_path_and_writes_a_sorted_manifest() {
    let server = Served::start(&[("src", 64 * MIB)]).await;
    let ex = server.exports.clone();
    let dir = ex.store().data_dir(&name("src"));
    // 20 directories of 50 files (names chosen so a directory sorts between files of
    // its parent, as `a.x` < `a/` < `a0`), some hard links across directories, and a
    // chain of long names.
    let mut files = 0;
    for d in 0..20 {
        let sub = dir.join(format!("d{d:02}"));
        std::fs::create_dir(&sub).expect("mkdir");
        std::fs::write(dir.join(format!("d{d:02}.x")), format!("top {d}")).expect("write");
        std::fs::write(dir.join(format!("d{d:02}0")), format!("after {d}")).expect("write");
        files += 2;
        for f in 0..50 {
            std::fs::write(sub.join(format!("f{f:02}")), format!("{d} {f}")).expect("write");
            files += 1;
        }
    }
    for d in 1..5 {
        std::fs::hard_link(dir.join("d00/f00"), dir.join(format!("d{d:02}/link"))).expect("link");
        files += 1;
    }
    let mut deep = dir.clone();
    for i in 0..8 {
        deep = deep.join(format!("{i}{}", "n".repeat(200)));
        std::fs::create_dir(&deep).expect("mkdir deep");
        std::fs::write(deep.join("leaf"), b"deep").expect("write deep");
        files += 1;
    }
    ex.recount_usage();
    let ex2 = ex.clone();
    let (_, report) = tokio::task::spawn_blocking(move || {
        ex2.clone_volume(
            &name("src"),
            &VolumeSpec::new(name("copy"), 64 * MIB),
            &owner(),
        )
    })
    .await
    .expect("task")
    .expect("copy");
    // The root's 69 entries, one directory's 51, and the file linked four times: the
    // copy holds no record per file.
    assert!(
        report.peak_records < 130,
        "the copier held {} records for {files} files",
        report.peak_records
    );

    // The manifest is sha256sum's, every name of every file, sorted by path.
    let copy = tree(&ex.store().data_dir(&name("copy")));
    let manifest =
        std::fs::read_to_string(ex.store().manifest_path(&name("copy"))).expect("manifest");
    let mut paths = Vec::new();
    for line in manifest.lines() {
        let (hash, path) = line.split_once("  ").expect("sha256sum line");
        let digest = ring::digest::digest(&ring::digest::SHA256, &copy[path]);
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hash, hex, "{path}");
        paths.push(path.to_owned());
    }
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted, "the manifest is not sorted by path");
    assert_eq!(paths.len(), files);
    assert_eq!(
        copy.keys().filter(|p| !p.ends_with('/')).count(),
        files,
        "the copy misses files"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_made_and_removed_in_a_large_directory_while_the_copier_lists_it_are_as_at_the_instant()
 {
    const N: usize = 5_000;
    let server = Served::start(&[("src", 1 << 30)]).await;
    let ex = server.exports.clone();
    let dir = ex.store().data_dir(&name("src"));
    std::fs::create_dir(dir.join("z")).expect("mkdir");
    for k in 0..N {
        std::fs::write(dir.join(format!("z/f{k:05}")), k.to_string()).expect("write");
    }
    ex.recount_usage();
    let t = tree(&dir);
    let mut c = server.mount("src").await;
    let root = c.root.clone();
    let z = c.lookup(&root, b"z").await.expect("LOOKUP z");

    let copy = copy_started(&ex).await;
    // The copier makes `z` in the copy just before it lists the source's `z`: the
    // changes start while it lists.
    let copied_z = ex.store().root().join("staging/copy.partial/data/z");
    let started = std::time::Instant::now();
    while !copied_z.exists() {
        assert!(
            started.elapsed().as_secs() < 60,
            "the copier never reached z"
        );
        tokio::time::sleep(std::time::Duration::from_micros(200)).await;
    }
    let mut k = 0;
    while !copy.is_finished() && k < N {
        c.remove(&z, format!("f{k:05}").as_bytes())
            .await
            .expect("REMOVE");
        c.create(&z, format!("g{k:05}").as_bytes())
            .await
            .expect("CREATE");
        k += 1;
    }
    assert!(
        k > 0,
        "the copier finished before any change: nothing was exercised"
    );
    copy.await.expect("copy task").expect("copy");
    println!("{k} files removed and {k} made while the copy ran");

    let copied = tree(&ex.store().data_dir(&name("copy")));
    assert_eq!(copied.len(), t.len(), "the copy has other names than at T");
    for (p, data) in &t {
        assert_eq!(copied.get(p), Some(data), "{p} differs from T in the copy");
    }
    server.stop().await;
}
