//! Point-in-time copies of a volume a pod is writing, through the Linux kernel NFS
//! client of a test node (issue 23, "done when" (b) and (c)): a writer appends
//! numbered, fsync'd records round-robin across several files; `localnfs volume copy`
//! asks the running agent for a copy in the middle; the copy, mounted in the node,
//! holds exactly the first N records for an N no smaller than what was durable when
//! the copy was asked for. The writer's longest wait for an fsync'd append while the
//! copy ran, and before it, are printed (not asserted: two shared cores). And (a): a
//! copy of MariaDB's volume taken under sysbench load starts as a database (InnoDB
//! recovers, `CHECK TABLE` OK).

mod support;

use std::path::Path;
use std::time::{Duration, SystemTime};

use localnfs_testbed::kernel::{KernelNode, TestNetwork, quote};
use support::kernel::{agent_for, mount};
use support::nfs::create_volume;

const FILES: u64 = 4;
/// Bytes a record takes: its number, space-padded, and a newline.
const RECORD: usize = 32;
const WRITE_SECONDS: u64 = 14;

/// Appends record i (its number, padded to `RECORD` bytes) to file i % FILES and
/// fsyncs it, until the time is up; prints each acknowledgement's wall-clock time.
const WRITER: &str = r#"
import os, time
FILES = FILES_
fds = [os.open("/mnt/src/log%d" % f, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644) for f in range(FILES)]
end = time.time() + SECONDS_
i = 0
acks = []
while time.time() < end:
    fd = fds[i % FILES]
    os.write(fd, ("%d" % i).ljust(RECORD_ - 1).encode() + b"\n")
    os.fsync(fd)
    acks.append(time.time())
    i += 1
with open("/tmp/acks", "w") as f:
    f.write("\n".join("%.6f" % t for t in acks))
print(i)
"#;

/// The record numbers in file `f` of a volume, checking each is whole and in place.
fn records(text: &[u8], f: u64) -> Vec<u64> {
    assert_eq!(text.len() % RECORD, 0, "log{f} ends in a torn record");
    text.chunks(RECORD)
        .map(|r| {
            std::str::from_utf8(r)
                .expect("utf-8")
                .trim()
                .parse::<u64>()
                .expect("a record number")
        })
        .collect()
}

/// How many records the volume at `dir` holds, checking they are exactly records
/// 0..n in the writer's order: file f holds f, f+FILES, f+2·FILES, … and the files
/// together hold no gap.
fn prefix(read: impl Fn(u64) -> Vec<u8>) -> u64 {
    let mut all = Vec::new();
    for f in 0..FILES {
        let recs = records(&read(f), f);
        for (k, r) in recs.iter().enumerate() {
            assert_eq!(*r, f + k as u64 * FILES, "log{f} record {k} out of order");
        }
        all.extend(recs);
    }
    all.sort_unstable();
    for (k, r) in all.iter().enumerate() {
        assert_eq!(
            *r, k as u64,
            "record {k} missing while later ones are present"
        );
    }
    all.len() as u64
}

/// How many records are durable in the source now, read beside the running writer:
/// whole records only, and the unbroken run from record 0 (the files are read one
/// after the other while it appends, so a later file may hold a newer record).
fn on_disk(dir: &Path) -> u64 {
    let mut all: Vec<u64> = Vec::new();
    for f in 0..FILES {
        let mut text = std::fs::read(dir.join(format!("log{f}"))).unwrap_or_default();
        text.truncate(text.len() - text.len() % RECORD);
        all.extend(records(&text, f));
    }
    all.sort_unstable();
    all.iter()
        .enumerate()
        .take_while(|(k, r)| **r == *k as u64)
        .count() as u64
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_taken_while_a_pod_appends_fsynced_records_holds_an_exact_prefix_of_them() {
    let net = TestNetwork::create().expect("test network");
    let node = KernelNode::boot(&net, "node-1", net.address(101))
        .await
        .expect("boot test node");
    let root = tempfile::tempdir_in("/var/tmp").expect("root");
    create_volume(root.path(), "src", 1 << 30);
    // Data beside the log, so the copy takes a while: 64 files of 2 MiB.
    let src_dir = root.path().join("volumes/src");
    for i in 0..64u8 {
        std::fs::write(src_dir.join(format!("bulk{i}")), vec![i; 2 << 20]).expect("bulk");
    }
    let agent = agent_for(&net, root.path(), &[&node], &[]).await;
    mount(&node, &agent, "src", "/mnt/src").await;

    let script = WRITER
        .replace("FILES_", &FILES.to_string())
        .replace("RECORD_", &RECORD.to_string())
        .replace("SECONDS_", &WRITE_SECONDS.to_string());
    let command = format!("python3 -c {}", quote(&script));
    let writer = node.run(&command, Duration::from_secs(WRITE_SECONDS + 120));
    let copier = async {
        tokio::time::sleep(Duration::from_secs(WRITE_SECONDS / 2)).await;
        // Everything durable now was acknowledged before the copy was asked for.
        let durable = on_disk(&src_dir);
        let asked = SystemTime::now();
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_localnfs"))
            .args(["volume", "--root"])
            .arg(root.path())
            .args(["copy", "src", "snap", "--timeout", "60s"])
            .output()
            .await
            .expect("run localnfs volume copy");
        (durable, asked, SystemTime::now(), out)
    };
    let (written, (durable, asked, answered, out)) = tokio::join!(writer, copier);
    let written = written.expect("writer in the test node");
    assert_eq!(written.rc, 0, "writer failed: {}", written.stderr);
    let acked: u64 = written.stdout.trim().parse().expect("records written");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "localnfs volume copy failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", stdout.trim());

    mount(&node, &agent, "snap", "/mnt/snap").await;
    let mut texts = Vec::new();
    for f in 0..FILES {
        let text = node
            .run_ok(&format!("cat /mnt/snap/log{f}"), Duration::from_secs(30))
            .await
            .expect("read the copy in the test node");
        texts.push(text.into_bytes());
    }
    let n = prefix(|f| texts[f as usize].clone());
    println!(
        "the copy holds records 0..{n}: {durable} were durable when it was asked for, {acked} acknowledged in all"
    );
    assert!(
        n >= durable,
        "the copy lost acknowledged records: {n} < {durable}"
    );
    assert!(n <= acked, "the copy holds records never acknowledged");
    assert!(
        n < acked,
        "the copy was not taken in the middle of the writes"
    );
    let bulk = node
        .run_ok(
            "cmp /mnt/snap/bulk7 /mnt/src/bulk7 && echo same",
            Duration::from_secs(60),
        )
        .await
        .expect("compare bulk data");
    assert_eq!(bulk.trim(), "same");

    // (c) The writer's longest wait between acknowledgements while the copy ran
    // (from the request to the answer, the agent's pick-up delay included), and
    // before it.
    let acks = node
        .run_ok("cat /tmp/acks", Duration::from_secs(30))
        .await
        .expect("ack times");
    let times: Vec<f64> = acks.lines().filter_map(|l| l.parse().ok()).collect();
    let (from, to) = (unix(asked), unix(answered));
    let gap = |keep: &dyn Fn(f64) -> bool| {
        times
            .windows(2)
            .filter(|w| keep(w[1]))
            .map(|w| w[1] - w[0])
            .fold(0.0_f64, f64::max)
    };
    println!(
        "longest gap between fsync'd appends: {:.1} ms while the copy ran ({:.2} s), {:.1} ms before it",
        gap(&|t| t >= from && t <= to) * 1e3,
        to - from,
        gap(&|t| t < from) * 1e3
    );
}

const DB_TABLES: u32 = 2;
const DB_ROWS: u32 = 2000;
const DB_LOAD_SECONDS: u64 = 30;

/// (a) A copy of MariaDB's volume taken under sysbench load starts as a database:
/// InnoDB recovers from the crash-consistent state and every table checks OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_a_database_volume_under_load_starts_and_its_tables_check_ok() {
    let net = TestNetwork::create().expect("test network");
    let node = KernelNode::boot(&net, "node-1", net.address(101))
        .await
        .expect("boot test node");
    let root = tempfile::tempdir_in("/var/tmp").expect("root");
    create_volume(root.path(), "db", 4 << 30);
    let agent = agent_for(&net, root.path(), &[&node], &[]).await;
    mount(&node, &agent, "db", "/mnt/db").await;
    support::mariadb::start(&node, "/mnt/db/data")
        .await
        .expect("mariadbd starts with its datadir on the volume");
    support::mariadb::prepare(&node, DB_TABLES, DB_ROWS)
        .await
        .expect("sysbench prepare");

    let run = format!(
        "{} --time={DB_LOAD_SECONDS} --threads=4 run 2>&1",
        support::mariadb::sysbench("oltp_read_write", DB_TABLES, DB_ROWS)
    );
    let copier = async {
        tokio::time::sleep(Duration::from_secs(DB_LOAD_SECONDS / 2)).await;
        tokio::process::Command::new(env!("CARGO_BIN_EXE_localnfs"))
            .args(["volume", "--root"])
            .arg(root.path())
            .args(["copy", "db", "dbcopy", "--timeout", "120s"])
            .output()
            .await
            .expect("run localnfs volume copy")
    };
    let (load, out) = tokio::join!(
        node.run(&run, Duration::from_secs(DB_LOAD_SECONDS + 240)),
        copier
    );
    let load = load.expect("sysbench run");
    assert_eq!(
        load.rc, 0,
        "sysbench failed during the copy:\n{}",
        load.stdout
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "localnfs volume copy failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (tps, p95) = support::mariadb::tps_and_p95(&load.stdout).expect("sysbench report");
    println!(
        "{}; sysbench during it: {tps} tps, p95 {p95} ms",
        stdout.trim()
    );

    // The source's server goes away; the copy's starts on the copied datadir.
    support::mariadb::stop(&node).await.expect("stop mariadbd");
    mount(&node, &agent, "dbcopy", "/mnt/dbcopy").await;
    support::mariadb::start(&node, "/mnt/dbcopy/data")
        .await
        .expect("mariadbd starts on the copy: InnoDB recovered");
    support::mariadb::check_tables(&node, DB_TABLES).await;
    let rows = support::mariadb::sql(&node, "select count(*) from sbtest.sbtest1")
        .await
        .expect("count rows in the copy");
    println!("the copy's sbtest1: {}", rows.trim());
    support::mariadb::stop(&node).await.expect("stop mariadbd");
}
