//! Backups of a live volume (issue 23): how long `localnfs volume backup` takes on a
//! running agent, first set and then an incremental one after one file changed, the
//! source's pause, and the longest gap between a writer's acknowledged writes while
//! the backup ran; next to `tar -cf` (plus `sync`) of the same data into the same
//! target as the anchor. Prints a markdown table.
//!
//! Per data set: a fresh root and target (not on tmpfs; same disk, hence
//! `--allow-same-device`), volume `src` filled on disk, a release
//! `localnfs node --standalone` serving it, and a client appending 4 KiB `FILE_SYNC`
//! writes to `src/log` all along. Page caches are dropped before each run.
//!
//! `cargo bench --bench backup` (root; ~1 min), `-- --dir PATH` for another disk.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nfs3_types::nfs3::stable_how;
use support::nfs::{Client, Node, create_volume};

struct DataSet {
    label: &'static str,
    dirs: usize,
    files_per_dir: usize,
    file_bytes: usize,
}

const SETS: [DataSet; 2] = [
    DataSet {
        label: "1 GiB in 16 files",
        dirs: 1,
        files_per_dir: 16,
        file_bytes: 64 << 20,
    },
    DataSet {
        label: "10,000 files of 4 KiB in 100 dirs",
        dirs: 100,
        files_per_dir: 100,
        file_bytes: 4096,
    },
];

fn fill(dir: &Path, set: &DataSet) {
    for d in 0..set.dirs {
        let sub = dir.join(format!("d{d}"));
        std::fs::create_dir_all(&sub).expect("mkdir");
        for f in 0..set.files_per_dir {
            let data: Vec<u8> = (0..set.file_bytes).map(|b| (b ^ f ^ d) as u8).collect();
            std::fs::write(sub.join(format!("f{f}")), data).expect("write");
        }
    }
}

fn drop_caches() {
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// One `localnfs volume backup`: its answer, and when it was asked and answered.
async fn backup(root: &Path, to: &Path) -> (String, Instant, Instant) {
    drop_caches();
    let asked = Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_localnfs"))
        .arg("volume")
        .arg("--root")
        .arg(root)
        .args([
            "backup",
            "src",
            "--allow-same-device",
            "--timeout",
            "10m",
            "--to",
        ])
        .arg(to)
        .output()
        .await
        .expect("localnfs volume backup");
    let answered = Instant::now();
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success(),
        "backup failed: {answer}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (answer, asked, answered)
}

/// `field` of an answer: the text after `key` up to the next comma.
fn field<'a>(answer: &'a str, key: &str) -> &'a str {
    answer
        .split(key)
        .nth(1)
        .and_then(|t| t.split(',').next())
        .unwrap_or("?")
}

struct Row {
    label: &'static str,
    first: String,
    second: String,
    gap_during: Duration,
    gap_before: Duration,
    tar: Duration,
}

async fn measure(base: &Path, set: &DataSet) -> Row {
    let root = tempfile::tempdir_in(base).expect("root");
    let target = tempfile::tempdir_in(base).expect("target");
    create_volume(root.path(), "src", 8 << 30);
    let src = root.path().join("volumes/src");
    fill(&src, set);
    let agent = Node::start(root.path()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut c = Client::mount(agent.port, "src").await;
    let dir = c.root.clone();
    let changed = c.create(&dir, b"changed", 0o644).await.expect("CREATE");
    c.write(&changed, 0, b"before", stable_how::FILE_SYNC)
        .await
        .expect("WRITE");
    let writer = {
        let stop = stop.clone();
        let f = c.create(&dir, b"log", 0o644).await.expect("CREATE");
        let mut c = Client::mount(agent.port, "src").await;
        tokio::spawn(async move {
            let mut acks = Vec::new();
            let data = vec![7u8; 4096];
            let mut off = 0;
            while !stop.load(Ordering::Acquire) {
                c.write(&f, off, &data, stable_how::FILE_SYNC)
                    .await
                    .expect("WRITE");
                off += 4096;
                acks.push(Instant::now());
            }
            acks
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (first, asked, answered) = backup(root.path(), target.path()).await;
    c.write(&changed, 0, b"after!", stable_how::FILE_SYNC)
        .await
        .expect("WRITE");
    let (second, _, _) = backup(root.path(), target.path()).await;
    stop.store(true, Ordering::Release);
    let acks = writer.await.expect("writer");
    drop(agent);
    let gap = |keep: &dyn Fn(Instant) -> bool| {
        acks.windows(2)
            .filter(|w| keep(w[1]))
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    };

    drop_caches();
    let started = Instant::now();
    let tar = std::process::Command::new("tar")
        .arg("-cf")
        .arg(target.path().join("anchor.tar"))
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .expect("tar");
    assert!(tar.success());
    let _ = std::process::Command::new("sync").status();
    Row {
        label: set.label,
        gap_during: gap(&|t| t >= asked && t <= answered),
        gap_before: gap(&|t| t < asked),
        first,
        second,
        tar: started.elapsed(),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut base = PathBuf::from("/var/tmp");
    if let Some(i) = args.iter().position(|a| a == "--dir") {
        base = PathBuf::from(args.get(i + 1).expect("--dir PATH"));
    }
    let mut rows = Vec::new();
    for set in &SETS {
        let row = measure(&base, set).await;
        eprintln!("{}: {}\n  then: {}", row.label, row.first, row.second);
        rows.push(row);
    }
    println!();
    println!(
        "| data (ext4) | first backup, live source | source pause | longest gap between a writer's FILE_SYNC replies: during / before | incremental: one file changed, and the writer's log grew (bytes copied) | `tar -cf` + `sync`, idle source |"
    );
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.1} ms / {:.1} ms | {} ({}) | {:.2} s |",
            r.label,
            field(&r.first, "took "),
            field(&r.first, "source paused "),
            r.gap_during.as_secs_f64() * 1e3,
            r.gap_before.as_secs_f64() * 1e3,
            field(&r.second, "took "),
            field(&r.second, " files, ").trim_end_matches(" copied"),
            r.tar.as_secs_f64()
        );
    }
}
