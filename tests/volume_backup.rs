//! `localnfs volume backup`, `backups` and `restore` against a running agent (the real
//! binary): backup → delete the volume → restore → the same checksums, served again;
//! a second backup copies only what changed; refusals say why; and (issue 23 "done
//! when" (e), the backup half) a SIGKILL of the agent while it writes a set leaves no
//! set, and the next backup removes what it wrote.

mod support;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use localnfs::volume::{VolumeName, VolumeStore};
use nfs3_types::nfs3::stable_how;
use support::nfs::{Client, Node, create_volume};

async fn volume(root: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_localnfs"))
        .arg("volume")
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .await
        .expect("run localnfs volume")
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

/// The set id in a `volume backup` answer (`backup set <id> of volume …`).
fn set_of(out: &Output) -> String {
    let said = text(out);
    said.split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no set in {said}"))
        .to_owned()
}

/// The complete sets `volume backups` lists for `vol`.
async fn complete_sets(root: &Path, to: &Path, vol: &str) -> Vec<String> {
    let out = volume(root, &["backups", "--to", &to.display().to_string(), vol]).await;
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter(|l| l.trim_end().ends_with("yes"))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn backup_delete_restore_gives_back_the_same_checksums_and_serves_them() {
    let root = tempfile::tempdir().expect("root");
    let target = tempfile::tempdir().expect("target");
    let to = target.path().display().to_string();
    create_volume(root.path(), "db", 64 << 20);
    let dir = root.path().join("volumes/db");
    std::fs::create_dir(dir.join("d")).expect("mkdir");
    std::fs::write(dir.join("d/big"), vec![5u8; 2 << 20]).expect("write");
    let agent = Node::start(root.path()).await;
    // One file written through the server, as a pod would.
    let mut c = Client::mount(agent.port, "db").await;
    let root_fh = c.root.clone();
    let f = c.create(&root_fh, b"log", 0o644).await.expect("CREATE");
    c.write(&f, 0, b"first entry\n", stable_how::FILE_SYNC)
        .await
        .expect("WRITE");

    let first = volume(
        root.path(),
        &["backup", "db", "--to", &to, "--allow-same-device"],
    )
    .await;
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("2097164 bytes in 2 files, 2097164 bytes copied"),
        "{}",
        text(&first)
    );
    // One file changes: the next set copies only it.
    c.write(&f, 12, b"second entry\n", stable_how::FILE_SYNC)
        .await
        .expect("WRITE");
    let second = volume(
        root.path(),
        &["backup", "db", "--to", &to, "--allow-same-device"],
    )
    .await;
    assert!(second.status.success(), "{}", text(&second));
    assert!(
        text(&second).contains("25 bytes copied, 2097152 bytes linked"),
        "{}",
        text(&second)
    );
    let set = set_of(&second);
    // The agent counts them: both succeeded, the bytes each wrote and linked.
    let m = support::scrape(agent.admin).await;
    assert_eq!(
        m.get("localnfs_backups_total", &[("result", "succeeded")]),
        2.0
    );
    assert_eq!(m.get("localnfs_backup_bytes_copied_total", &[]), 2097189.0);
    assert_eq!(m.get("localnfs_backup_bytes_linked_total", &[]), 2097152.0);
    assert!(m.get("localnfs_backup_seconds_total", &[]) > 0.0);
    assert_eq!(
        complete_sets(root.path(), target.path(), "db").await,
        vec![set_of(&first), set.clone()]
    );
    let want = [sha256(&dir.join("d/big")), sha256(&dir.join("log"))];
    drop(c);

    let deleted = volume(root.path(), &["delete", "db"]).await;
    assert!(deleted.status.success(), "{}", text(&deleted));
    // The agent stops serving it (a pod's old handles go stale, as for any delete).
    let local = "127.0.0.1".parse().expect("address");
    let mut tries = 0;
    while support::nfs::mount(agent.port, "db", local, 0, 0)
        .await
        .is_ok()
    {
        tries += 1;
        assert!(tries < 100, "the deleted volume is still served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let from = target.path().join("db").join(&set).display().to_string();
    let restored = volume(root.path(), &["restore", "--from", &from, "db"]).await;
    assert!(restored.status.success(), "{}", text(&restored));
    let dir = VolumeStore::open(root.path())
        .expect("store")
        .data_dir(&name("db"));
    assert_eq!(want, [sha256(&dir.join("d/big")), sha256(&dir.join("log"))]);
    // The agent serves the restored volume.
    // The agent serves the restored volume once it has re-read the store.
    tries = 0;
    while support::nfs::mount(agent.port, "db", local, 0, 0)
        .await
        .is_err()
    {
        tries += 1;
        assert!(tries < 100, "the restored volume is never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut c = Client::mount(agent.port, "db").await;
    let root_fh = c.root.clone();
    let log = c.lookup(&root_fh, b"log").await.expect("LOOKUP");
    assert_eq!(
        c.read(&log, 0, 64).await.expect("READ"),
        b"first entry\nsecond entry\n"
    );
}

#[tokio::test]
async fn backup_and_restore_refusals_say_why_and_change_nothing() {
    let root = tempfile::tempdir().expect("root");
    let target = tempfile::tempdir().expect("target");
    let to = target.path().display().to_string();
    create_volume(root.path(), "db", 1 << 20);
    std::fs::write(root.path().join("volumes/db/f"), b"data").expect("write");

    let no_agent = volume(
        root.path(),
        &["backup", "db", "--to", &to, "--timeout", "1s"],
    )
    .await;
    assert!(!no_agent.status.success());
    assert!(
        text(&no_agent).contains("is `localnfs node` running"),
        "{}",
        text(&no_agent)
    );

    let agent = Node::start(root.path()).await;
    let same = volume(root.path(), &["backup", "db", "--to", &to]).await;
    assert!(!same.status.success());
    assert!(
        text(&same).contains("same device as the volume store"),
        "{}",
        text(&same)
    );
    let unknown = volume(
        root.path(),
        &["backup", "nope", "--to", &to, "--allow-same-device"],
    )
    .await;
    assert!(!unknown.status.success());
    assert!(
        text(&unknown).contains("nope not found"),
        "{}",
        text(&unknown)
    );

    let m = support::scrape(agent.admin).await;
    assert_eq!(
        m.get("localnfs_backups_total", &[("result", "failed")]),
        2.0
    );
    assert_eq!(m.get("localnfs_backups_running", &[]), 0.0);
    let ok = volume(
        root.path(),
        &["backup", "db", "--to", &to, "--allow-same-device"],
    )
    .await;
    assert!(ok.status.success(), "{}", text(&ok));
    let from = target
        .path()
        .join("db")
        .join(set_of(&ok))
        .display()
        .to_string();
    let exists = volume(root.path(), &["restore", "--from", &from, "db"]).await;
    assert!(!exists.status.success());
    assert!(
        text(&exists).contains("already exists"),
        "{}",
        text(&exists)
    );
    assert_eq!(
        std::fs::read(root.path().join("volumes/db/f")).expect("read"),
        b"data"
    );
    let not_set = volume(
        root.path(),
        &[
            "restore",
            "--from",
            &target.path().join("db").display().to_string(),
            "other",
        ],
    )
    .await;
    assert!(!not_set.status.success());
    assert!(
        text(&not_set).contains("not a complete backup set"),
        "{}",
        text(&not_set)
    );
    let store = VolumeStore::open(root.path()).expect("store");
    assert!(store.get(&name("other")).expect("get").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_agent_during_a_backup_leaves_no_set_and_the_next_backup_cleans_up() {
    let root = tempfile::tempdir_in("/var/tmp").expect("root");
    let target = tempfile::tempdir_in("/var/tmp").expect("target");
    let to = target.path().display().to_string();
    create_volume(root.path(), "db", 2 << 30);
    let dir = root.path().join("volumes/db");
    // Enough data that the set is still being written when the agent is killed.
    for i in 0..48u8 {
        std::fs::write(dir.join(format!("bulk{i:02}")), vec![i; 8 << 20]).expect("bulk");
    }
    let mut agent = Node::start(root.path()).await;
    let backup = {
        let (root, to) = (root.path().to_owned(), to.clone());
        tokio::spawn(async move {
            volume(
                &root,
                &[
                    "backup",
                    "db",
                    "--to",
                    &to,
                    "--allow-same-device",
                    "--timeout",
                    "60s",
                ],
            )
            .await
        })
    };
    // Kill once the set is being written on the target.
    let sets = target.path().join("db");
    let started = std::time::Instant::now();
    let partial = loop {
        let found = std::fs::read_dir(&sets).ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().ends_with(".partial"))
        });
        if let Some(p) = found
            && std::fs::read_dir(p.join("data")).map_or(0, |d| d.count()) >= 2
        {
            break p;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the set was never written"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    agent.kill9_and_restart().await;
    let out = backup.await.expect("backup command");
    assert!(
        !out.status.success(),
        "the backup finished before the kill; nothing was tested: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("restarted during the backup"),
        "{}",
        text(&out)
    );
    assert!(
        complete_sets(root.path(), target.path(), "db")
            .await
            .is_empty()
    );
    // The agent's restart removed the snapshot it was reading from.
    let staging: Vec<_> = std::fs::read_dir(root.path().join("staging"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(staging.is_empty(), "snapshot left: {staging:?}");
    let store = VolumeStore::open(root.path()).expect("store");
    assert!(store.get(&name("db.backup")).expect("get").is_none());

    let next = volume(
        root.path(),
        &["backup", "db", "--to", &to, "--allow-same-device"],
    )
    .await;
    assert!(next.status.success(), "{}", text(&next));
    assert!(!partial.exists(), "the unfinished set is still there");
    assert_eq!(
        complete_sets(root.path(), target.path(), "db").await,
        vec![set_of(&next)]
    );
    let from = sets.join(set_of(&next)).display().to_string();
    let restored = volume(root.path(), &["restore", "--from", &from, "copy"]).await;
    assert!(restored.status.success(), "{}", text(&restored));
    for i in [0u8, 47] {
        let f = format!("bulk{i:02}");
        assert_eq!(
            sha256(&dir.join(&f)),
            sha256(&root.path().join("volumes/copy").join(&f))
        );
    }
}
