//! The MariaDB-under-load rows of the copy bench (issue 23): MariaDB's datadir on a
//! localnfs volume served by a release `localnfs node --standalone`, mounted by the
//! Linux kernel NFS client of a kernel test node with the PVs' default mountOptions;
//! sysbench `oltp_write_only` (4 threads, 4 tables of 10,000 rows; the server's
//! settings are in `tests/support/mariadb.rs`: a flush per commit) runs for
//! `LOAD_SECONDS`, and `localnfs volume copy` is asked `COPY_AT` seconds in,
//! `localnfs volume backup` (to a directory on the same disk, `--allow-same-device`)
//! `BACKUP_AT` seconds in.
//!
//! What the database saw: sysbench reports every second (`--report-interval=1`); the
//! guest prints its clock (the host's: User-Mode Linux reads the host's time) as
//! sysbench starts, so each second is placed against the times the copy and the backup
//! were asked for and answered. "Around" a run is every reported second that overlaps
//! the run or the 10 s from its request; "before" is the 10 whole seconds before the
//! request. Per window: mean TPS, the lowest one-second TPS, the highest one-second
//! p95 latency.
//!
//! The anchors, `cp -a` + `sync` and `tar -cf` + `sync` of the same volume directory
//! on the host, run after sysbench has ended and mariadbd has shut down (an idle
//! source; neither could give a consistent copy of a running database), page caches
//! dropped before each.

use std::path::Path;
use std::time::{Duration, SystemTime};

use localnfs_testbed::kernel::{KernelNode, TestNetwork};

use crate::support::kernel::{agent_for, mount};
use crate::support::mariadb;
use crate::support::nfs::create_volume;
use crate::{drop_caches, field};

const TABLES: u32 = 4;
const ROWS: u32 = 10_000;
const THREADS: u32 = 4;
const WORKLOAD: &str = "oltp_write_only";
const LOAD_SECONDS: u64 = 80;
const COPY_AT: u64 = 20;
const BACKUP_AT: u64 = 50;
/// Seconds of sysbench's per-second reports taken before and from each request.
const WINDOW: f64 = 10.0;

/// One second of sysbench's load: when it ended (Unix time), TPS, p95 latency (ms).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Second {
    end: f64,
    tps: f64,
    p95: f64,
}

/// sysbench's per-second lines (`[ 12s ] thds: 4 tps: 52.98 qps: … lat (ms,95%):
/// 99.33 err/s: …`), placed after `start` (Unix time).
fn seconds(report: &str, start: f64) -> Vec<Second> {
    let after = |line: &str, key: &str| -> Option<f64> {
        line.split(key)
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    report
        .lines()
        .filter_map(|line| {
            let at = line
                .trim_start()
                .strip_prefix('[')?
                .split("s ]")
                .next()?
                .trim();
            Some(Second {
                end: start + at.parse::<f64>().ok()?,
                tps: after(line, "tps:")?,
                p95: after(line, "lat (ms,95%):")?,
            })
        })
        .collect()
}

/// What the database saw in some seconds: mean TPS, lowest one-second TPS, highest
/// one-second p95 latency (ms), and how many seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seen {
    pub mean_tps: f64,
    pub min_tps: f64,
    pub max_p95: f64,
    pub seconds: usize,
}

fn seen<'a>(secs: impl Iterator<Item = &'a Second>) -> Seen {
    let secs: Vec<&Second> = secs.collect();
    let n = secs.len().max(1) as f64;
    Seen {
        mean_tps: secs.iter().map(|s| s.tps).sum::<f64>() / n,
        min_tps: secs.iter().map(|s| s.tps).fold(f64::INFINITY, f64::min),
        max_p95: secs.iter().map(|s| s.p95).fold(0.0, f64::max),
        seconds: secs.len(),
    }
}

/// The seconds around a run asked at `asked` and answered at `answered`, and the
/// 10 s before it (module docs).
fn around(secs: &[Second], asked: f64, answered: f64) -> (Seen, Seen) {
    let to = answered.max(asked + WINDOW);
    (
        seen(secs.iter().filter(|s| s.end > asked && s.end - 1.0 < to)),
        seen(
            secs.iter()
                .filter(|s| s.end <= asked && s.end - 1.0 >= asked - WINDOW),
        ),
    )
}

/// One `localnfs volume` run during the load.
pub struct Run {
    pub answer: String,
    pub around: Seen,
    pub before: Seen,
}

pub struct Row {
    pub copy: Run,
    pub backup: Run,
    pub cp: Duration,
    pub tar: Duration,
    /// sysbench's own summary over the whole load: TPS and p95 (ms).
    pub whole: (f64, f64),
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// `localnfs volume ARGS` against the agent of `root`, started `at` seconds after
/// `t0`: its answer and when it was asked and answered (Unix time).
async fn volume_cmd(root: &Path, args: &[&str], t0: SystemTime, at: u64) -> (String, f64, f64) {
    let wait = (t0 + Duration::from_secs(at))
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(wait).await;
    let asked = unix(SystemTime::now());
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_localnfs"))
        .arg("volume")
        .arg("--root")
        .arg(root)
        .args(args)
        .output()
        .await
        .expect("run localnfs volume");
    let answered = unix(SystemTime::now());
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success(),
        "localnfs volume {args:?} failed: {answer}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (answer, asked, answered)
}

/// Runs `argv` with page caches dropped first, then `sync`; how long both took.
fn anchor(argv: &[&std::ffi::OsStr]) -> Duration {
    drop_caches();
    let started = std::time::Instant::now();
    let status = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .status()
        .expect("anchor command");
    assert!(status.success(), "{argv:?} failed");
    let _ = std::process::Command::new("sync").status();
    started.elapsed()
}

/// The whole measurement (module docs). Needs root and User-Mode Linux.
pub async fn measure(base: &Path) -> Row {
    let net = TestNetwork::create().expect("test network");
    let node = KernelNode::boot(&net, "node-1", net.address(101))
        .await
        .expect("boot test node");
    let root = tempfile::tempdir_in(base).expect("root");
    let target = tempfile::tempdir_in(base).expect("backup target");
    create_volume(root.path(), "db", 8 << 30);
    let agent = agent_for(&net, root.path(), &[&node], &[]).await;
    mount(&node, &agent, "db", "/mnt/db").await;
    mariadb::start(&node, "/mnt/db/data")
        .await
        .expect("mariadbd starts with its datadir on the volume");
    mariadb::prepare(&node, TABLES, ROWS)
        .await
        .expect("sysbench prepare");

    let load = format!(
        "date +%s.%N; {} --time={LOAD_SECONDS} --threads={THREADS} --report-interval=1 run 2>&1",
        mariadb::sysbench(WORKLOAD, TABLES, ROWS)
    );
    let t0 = SystemTime::now();
    let to = target.path().to_string_lossy().into_owned();
    let runs = async {
        let copy = volume_cmd(
            root.path(),
            &["copy", "db", "dbcopy", "--timeout", "10m"],
            t0,
            COPY_AT,
        )
        .await;
        let backup = volume_cmd(
            root.path(),
            &[
                "backup",
                "db",
                "--allow-same-device",
                "--timeout",
                "10m",
                "--to",
                &to,
            ],
            t0,
            BACKUP_AT,
        )
        .await;
        (copy, backup)
    };
    let (load, (copy, backup)) = tokio::join!(
        node.run_ok(&load, Duration::from_secs(LOAD_SECONDS + 300)),
        runs
    );
    let report = load.expect("sysbench run");
    let start: f64 = report
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("the guest's clock as sysbench started");
    let secs = seconds(&report, start);
    assert!(
        secs.len() as u64 + 2 >= LOAD_SECONDS,
        "sysbench reported {} seconds of {LOAD_SECONDS}:\n{report}",
        secs.len()
    );
    assert!(
        backup.2 < start + LOAD_SECONDS as f64,
        "the backup ended after the load: not taken under load"
    );
    let whole = mariadb::tps_and_p95(&report).expect("sysbench summary");
    let run = |(answer, asked, answered): (String, f64, f64)| {
        let (around, before) = around(&secs, asked, answered);
        Run {
            answer,
            around,
            before,
        }
    };
    let (copy, backup) = (run(copy), run(backup));
    eprintln!("MariaDB under load: {}", copy.answer);
    eprintln!("MariaDB under load: {}", backup.answer);
    mariadb::stop(&node).await.expect("mariadbd stops");
    node.run_ok("umount /mnt/db", Duration::from_secs(60))
        .await
        .expect("unmount");
    drop(agent);

    let volume = root.path().join("volumes/db");
    let copied = root.path().join("cp-a");
    let archive = target.path().join("anchor.tar");
    let cp = anchor(&[
        "cp".as_ref(),
        "-a".as_ref(),
        volume.as_ref(),
        copied.as_ref(),
    ]);
    let tar = anchor(&[
        "tar".as_ref(),
        "-cf".as_ref(),
        archive.as_ref(),
        "-C".as_ref(),
        volume.as_ref(),
        ".".as_ref(),
    ]);
    Row {
        copy,
        backup,
        cp,
        tar,
        whole,
    }
}

/// Prints the table of [`Row`].
pub fn print(row: &Row) {
    let seen = |s: &Seen| format!("{:.0} ({:.0}) / {:.1} ms", s.mean_tps, s.min_tps, s.max_p95);
    println!();
    println!(
        "| MariaDB datadir (ext4), sysbench {WORKLOAD} {THREADS} threads, {LOAD_SECONDS} s: {:.0} TPS, p95 {:.1} ms | took | data | source pause to mark T | sysbench around the run: mean TPS (lowest second) / highest p95 | the 10 s before | anchor, idle source after the load |",
        row.whole.0, row.whole.1
    );
    println!("|---|---|---|---|---|---|---|");
    let data = |answer: &str| {
        let bytes: f64 = field(answer, ": ")
            .split(' ')
            .next()
            .and_then(|b| b.parse().ok())
            .unwrap_or(f64::NAN);
        format!(
            "{:.0} MiB, {}",
            bytes / f64::from(1 << 20),
            field(answer, " bytes in ")
        )
    };
    for (what, run, anchor) in [
        (
            "`localnfs volume copy`",
            &row.copy,
            format!("`cp -a` + `sync` {:.2} s", row.cp.as_secs_f64()),
        ),
        (
            "`localnfs volume backup` (first set)",
            &row.backup,
            format!("`tar -cf` + `sync` {:.2} s", row.tar.as_secs_f64()),
        ),
    ] {
        println!(
            "| {what} | {} | {} | {} | {} | {} | {anchor} |",
            field(&run.answer, "took "),
            data(&run.answer),
            field(&run.answer, "source paused "),
            seen(&run.around),
            seen(&run.before),
        );
    }
}
