//! POSIX conformance, the whole pjdfstest suite, through the Linux kernel NFS client of
//! User-Mode Linux test nodes: against localnfs as shipped, localnfs with device nodes
//! allowed (pjdfstest uses block and character devices as fixtures in many files, so
//! their refusal cascades), and NFS-Ganesha's VFS back end as the peer, each from its
//! own test node, side by side in one run. Prints one markdown row per pjdfstest file
//! and a total; asserts nothing (CI's assertions on a fixed subset are
//! `tests/conformance.rs`).
//!
//! Run (as root): `scripts/conformance` (30-60 minutes on 2 cores), which installs
//! Ganesha and builds pjdfstest; `LOCALNFS_CONFORMANCE_FILES="chmod/00.t rename/00.t"`
//! limits the files. Results and what differs: `docs/conformance.md`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use localnfs_testbed::kernel::{KernelNode, TestNetwork};
use support::ganesha::Ganesha;
use support::kernel::{TapCounts, localnfs_mount, mount, pjdfstest_dir, run_pjdfstest};
use support::nfs::create_volume;

fn main() {
    tokio::runtime::Runtime::new()
        .expect("tokio runtime")
        .block_on(table());
}

/// Every pjdfstest file, relative to `tests/`, in order.
fn all_files(pjd: &Path) -> Vec<String> {
    let mut files = Vec::new();
    for dir in std::fs::read_dir(pjd.join("tests"))
        .expect("tests dir")
        .flatten()
    {
        if !dir.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(dir.path()).expect("dir").flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.ends_with(".t") {
                files.push(format!("{}/{name}", dir.file_name().to_string_lossy()));
            }
        }
    }
    files.sort();
    files
}

/// Runs every file in `files` on `mountpoint` of `node`, in order.
async fn run_all(
    node: &KernelNode,
    pjd: &Path,
    mountpoint: &str,
    files: &[String],
) -> Vec<TapCounts> {
    let mut counts = Vec::new();
    for file in files {
        let (c, _) = run_pjdfstest(node, pjd, mountpoint, file).await;
        eprintln!(
            "{} {mountpoint} {file}: {}/{}",
            node.name(),
            c.passed,
            c.failed
        );
        counts.push(c);
    }
    counts
}

/// The whole suite against three servers, each from its own test node (the same
/// kernel, booted three times, so the three runs go side by side); prints the table.
async fn table() {
    let pjd = pjdfstest_dir();
    let only = std::env::var("LOCALNFS_CONFORMANCE_FILES").ok();
    let files: Vec<String> = match &only {
        Some(list) => list.split_whitespace().map(String::from).collect(),
        None => all_files(&pjd),
    };
    let net = TestNetwork::create().expect("test network");
    let boot = |name: &'static str, host: u8| KernelNode::boot(&net, name, net.address(host));
    let (a, b, c) = tokio::join!(
        boot("shipped", 101),
        boot("devices", 102),
        boot("peer", 103)
    );
    let (shipped_node, devices_node, peer_node) = (
        a.expect("boot test node"),
        b.expect("boot test node"),
        c.expect("boot test node"),
    );
    let dir = tempfile::tempdir().expect("dir");
    let _shipped = localnfs_mount(&net, &shipped_node, &dir.path().join("shipped"), &[]).await;
    // The second agent listens on another host address.
    let devices_ip = net.address(3);
    net.add_host_address(devices_ip).expect("address");
    let devices_root = dir.path().join("devices");
    create_volume(&devices_root, "vol", 64 << 30);
    let devices = support::nfs::Node::start_on(
        &devices_root,
        SocketAddr::new(devices_ip, 0),
        &[
            "--allow",
            &format!("{}/32", devices_node.address()),
            "--allow-device-nodes",
        ],
    )
    .await;
    mount(&devices_node, &devices, "vol", "/mnt/vol").await;
    let ganesha_ip = net.address(2);
    net.add_host_address(ganesha_ip).expect("address");
    let ganesha_dir = dir.path().join("ganesha");
    let export = ganesha_dir.join("export");
    std::fs::create_dir_all(&export).expect("export dir");
    let ganesha = Ganesha::start(&ganesha_dir, &export, ganesha_ip).await;
    ganesha
        .mount(&peer_node, ganesha_ip, &export, "/mnt/vol")
        .await;

    let started = Instant::now();
    let (x, y, z) = tokio::join!(
        run_all(&shipped_node, &pjd, "/mnt/vol", &files),
        run_all(&devices_node, &pjd, "/mnt/vol", &files),
        run_all(&peer_node, &pjd, "/mnt/vol", &files),
    );
    let mut table = String::from(
        "| file | localnfs pass/fail | localnfs, device nodes allowed | Ganesha 4.3 VFS |\n|---|---|---|---|\n",
    );
    let mut totals = [(0, 0); 3];
    for (i, file) in files.iter().enumerate() {
        let row = [x[i], y[i], z[i]];
        let _ = write!(table, "| {file} |");
        for (t, c) in totals.iter_mut().zip(row) {
            t.0 += c.passed;
            t.1 += c.failed;
            let _ = write!(table, " {}/{} |", c.passed, c.failed);
        }
        table.push('\n');
    }
    let _ = writeln!(
        table,
        "| **all {} files** | {}/{} | {}/{} | {}/{} |",
        files.len(),
        totals[0].0,
        totals[0].1,
        totals[1].0,
        totals[1].1,
        totals[2].0,
        totals[2].1
    );
    println!(
        "\n{table}\n(pjdfstest 85a8aea through the Linux 6.1 kernel NFS client of User-Mode \
         Linux test nodes, in {:.0} min)",
        started.elapsed().as_secs_f64() / 60.0
    );
}
