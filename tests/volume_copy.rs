//! `localnfs volume copy` against a running agent (the real binary): the answer it
//! prints, the errors it reports, and (issue 23 "done when" (e), the copy half) a
//! SIGKILL of the agent in the middle of a copy while a client writes: after the
//! restart the source holds what the client was told is written, no half-made volume
//! exists and the unfinished copy is gone.

mod support;

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use localnfs::volume::{VolumeName, VolumeStore};
use nfs3_types::nfs3::stable_how;
use support::nfs::{Client, Node, create_volume};

async fn volume_copy(root: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_localnfs"))
        .arg("volume")
        .arg("--root")
        .arg(root)
        .arg("copy")
        .args(args)
        .output()
        .await
        .expect("run localnfs volume copy")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sha256(path: &Path) -> Vec<u8> {
    let data = std::fs::read(path).expect("read");
    ring::digest::digest(&ring::digest::SHA256, &data)
        .as_ref()
        .to_vec()
}

fn name(s: &str) -> VolumeName {
    VolumeName::new(s).expect("name")
}

/// Nothing of volume `vol` exists under `root`: no metadata, no data, no manifest, no
/// copy under construction.
fn assert_nothing_of(root: &Path, vol: &str) {
    let store = VolumeStore::open(root).expect("store");
    assert!(
        store.get(&name(vol)).expect("get").is_none(),
        "{vol} has metadata"
    );
    assert!(
        !store.data_dir(&name(vol)).exists(),
        "{vol} has a directory"
    );
    assert!(
        !store.manifest_path(&name(vol)).exists(),
        "{vol} has a manifest"
    );
    let staging: Vec<_> = std::fs::read_dir(root.join("staging"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(staging.is_empty(), "unfinished copies left: {staging:?}");
}

#[tokio::test]
async fn volume_copy_prints_what_the_agent_copied_and_the_copy_is_served() {
    let root = tempfile::tempdir().expect("root");
    create_volume(root.path(), "src", 64 << 20);
    let dir = root.path().join("volumes/src");
    std::fs::create_dir(dir.join("d")).expect("mkdir");
    std::fs::write(dir.join("d/a"), vec![3u8; 300_000]).expect("write");
    std::fs::write(dir.join("b"), b"bee").expect("write");
    std::fs::hard_link(dir.join("d/a"), dir.join("a-too")).expect("link");
    std::os::unix::fs::symlink("d/a", dir.join("to-a")).expect("symlink");
    let agent = Node::start(root.path()).await;

    let out = volume_copy(root.path(), &["src", "copy", "--size", "32Mi"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("volume copy") && said.contains("300003 bytes in 2 files"),
        "{said}"
    );
    let store = VolumeStore::open(root.path()).expect("store");
    let meta = store.get(&name("copy")).expect("get").expect("made");
    assert_eq!(meta.size_bytes, 32 << 20);
    assert_eq!(
        sha256(&store.data_dir(&name("copy")).join("d/a")),
        sha256(&dir.join("d/a"))
    );
    let manifest = std::fs::read_to_string(store.manifest_path(&name("copy"))).expect("manifest");
    assert_eq!(manifest.lines().count(), 3, "{manifest}");
    // A hard link stays one file with two names; a symlink stays a symlink.
    use std::os::unix::fs::MetadataExt;
    let copied = store.data_dir(&name("copy"));
    let ino = |p: &str| std::fs::metadata(copied.join(p)).expect("stat").ino();
    assert_eq!(ino("d/a"), ino("a-too"));
    assert_eq!(
        std::fs::read_link(copied.join("to-a")).expect("symlink"),
        Path::new("d/a")
    );
    let mut c = Client::mount(agent.port, "copy").await;
    let root_fh = c.root.clone();
    let b = c.lookup(&root_fh, b"b").await.expect("the copy is served");
    assert_eq!(c.read(&b, 0, 16).await.expect("READ"), b"bee");

    // The same name again, an unknown source: refused with the reason.
    let again = volume_copy(root.path(), &["src", "copy"]).await;
    assert!(!again.status.success());
    assert!(text(&again).contains("already exists"), "{}", text(&again));
    let unknown = volume_copy(root.path(), &["nope", "other"]).await;
    assert!(!unknown.status.success());
    assert!(
        text(&unknown).contains("nope not found"),
        "{}",
        text(&unknown)
    );
    assert_nothing_of(root.path(), "other");
}

#[tokio::test]
async fn volume_copy_without_a_running_agent_says_so_and_leaves_no_request() {
    let root = tempfile::tempdir().expect("root");
    create_volume(root.path(), "src", 1 << 20);
    let out = volume_copy(root.path(), &["src", "copy", "--timeout", "1s"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("is `localnfs node` running"),
        "{}",
        text(&out)
    );
    let left: Vec<_> = std::fs::read_dir(root.path().join("copy-requests"))
        .expect("request dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "requests left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_agent_during_a_copy_keeps_the_source_and_makes_nothing() {
    let root = tempfile::tempdir_in("/var/tmp").expect("root");
    create_volume(root.path(), "src", 2 << 30);
    let dir = root.path().join("volumes/src");
    // Enough data that the copy is still running when the agent is killed.
    for i in 0..48u8 {
        std::fs::write(dir.join(format!("bulk{i}")), vec![i; 8 << 20]).expect("bulk");
    }
    let before: Vec<Vec<u8>> = (0..48)
        .map(|i| sha256(&dir.join(format!("bulk{i}"))))
        .collect();
    let mut agent = Node::start(root.path()).await;

    // A client appends FILE_SYNC writes; `acked` is how far it was told they landed.
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let chunk = |i: u64| vec![(i % 251) as u8; 64 << 10];
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        let mut c = Client::mount(agent.port, "src").await;
        let root_fh = c.root.clone();
        let f = c.create(&root_fh, b"log", 0o644).await.expect("CREATE");
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Acquire) {
                let off = i * (64 << 10);
                c.write(&f, off, &chunk(i), stable_how::FILE_SYNC)
                    .await
                    .expect("WRITE");
                i += 1;
                acked.store(off + (64 << 10), Ordering::Release);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let copy = {
        let root = root.path().to_owned();
        tokio::spawn(async move { volume_copy(&root, &["src", "snap", "--timeout", "60s"]).await })
    };
    // Kill once the copy is under way: its staging tree has data in it.
    let data = root.path().join("staging/snap.partial/data");
    let started = std::time::Instant::now();
    while std::fs::read_dir(&data).map_or(0, |d| d.count()) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the copy never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Release);
    agent.kill9_and_restart().await;
    // The writer's call in flight may have failed with the agent; what it was told
    // is what counts.
    let _ = writer.await;
    let acked = acked.load(Ordering::Acquire);

    let out = copy.await.expect("copy command");
    assert!(
        !out.status.success(),
        "the copy finished before the kill; nothing was tested: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("restarted during the copy"),
        "{}",
        text(&out)
    );
    assert_nothing_of(root.path(), "snap");
    for (i, want) in before.iter().enumerate() {
        assert_eq!(
            &sha256(&dir.join(format!("bulk{i}"))),
            want,
            "bulk{i} changed"
        );
    }
    let log = std::fs::read(dir.join("log")).expect("log");
    assert!(log.len() as u64 >= acked, "acknowledged writes lost");
    for (i, c) in log[..acked as usize].chunks(64 << 10).enumerate() {
        assert_eq!(c, chunk(i as u64), "chunk {i} of the log");
    }
    println!("killed mid-copy; the source holds {acked} acknowledged bytes of the log");

    // The restarted agent copies the same volume to the same name.
    let out = volume_copy(root.path(), &["src", "snap", "--timeout", "60s"]).await;
    assert!(out.status.success(), "{}", text(&out));
    drop(agent);
}
