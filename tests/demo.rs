//! `localnfs demo` as a user runs it: it comes up, provisions a StatefulSet's volumes
//! (the replicas scaled out as clones of the first's),
//! mounts them with its node's Linux kernel NFS client, shows a rebuilt pod finding
//! its data (sent home by the scheduler helper), restores a backup of the first
//! replica's volume with matching checksums, serves its admin endpoints, and on
//! SIGTERM stops every process it started (the node's kernel too) and removes its
//! directory.

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use support::{http_get, process_exists};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const COMPONENTS: [&str; 4] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];

/// The process group of `pid` (field 5 of /proc/<pid>/stat).
fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

#[tokio::test]
async fn demo_stops_everything_it_started_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_localnfs"))
        .args(["demo", "--admin-addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("demo starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut pids = Vec::new();
    let mut dir: Option<PathBuf> = None;
    let mut admin = None;
    let mut localnfs_pids = Vec::new();
    let mut rebuilt_found_data = false;
    // mysql-2 is scaled out by clone: its volume holds what mysql-0 wrote.
    let mut clone_found_data = false;
    // mysql-0's volume backed up and restored by a VolumeRestore: the same sha256.
    let mut restore_matched = false;
    let mut kernel_pid = None;
    let read_report = async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let [name, pid, log] = words[..]
                && COMPONENTS.contains(&name)
            {
                pids.push(pid.parse::<u32>().expect("pid is a number"));
                dir = PathBuf::from(log).parent().map(PathBuf::from);
            }
            if let ["localnfs", "node" | "controller" | "scheduler", pid, _log] = words[..] {
                localnfs_pids.push(pid.parse::<u32>().expect("pid is a number"));
            }
            if let ["linux.uml", "(node-1)", pid, _log] = words[..] {
                kernel_pid = Some(pid.parse::<u32>().expect("pid is a number"));
            }
            if line.contains("rebuilt on node-1: it found its data")
                && line.contains("mounted by the Linux kernel NFS client on node-1")
                && line.contains("preferred node affinity for node-1")
            {
                rebuilt_found_data = true;
            }
            if line.contains("its volume is a copy holding data-mysql-0.txt: mysql-0 wrote this") {
                clone_found_data = true;
            }
            if line.trim().starts_with("data-mysql-0.txt") && line.trim().ends_with(" match") {
                restore_matched = true;
            }
            if let Some(rest) = line.trim().strip_prefix("admin endpoints: http://") {
                let addr = rest.split('/').next().expect("address");
                admin = Some(addr.parse::<std::net::SocketAddr>().expect("admin address"));
            }
            if line.contains("press Ctrl-C") {
                return;
            }
        }
        panic!("demo ended before it was ready");
    };
    tokio::time::timeout(Duration::from_secs(120), read_report)
        .await
        .expect("demo ready within 120 s");
    assert_eq!(pids.len(), COMPONENTS.len(), "report lists every component");
    assert_eq!(
        localnfs_pids.len(),
        3,
        "report lists the node agent, the controller and the scheduler helper"
    );
    assert!(
        restore_matched,
        "the demo's restore did not show mysql-0's file with a matching sha256"
    );
    assert!(
        rebuilt_found_data,
        "the rebuilt pod did not find its data or got no affinity from the helper"
    );
    assert!(
        clone_found_data,
        "no replica scaled out by clone found mysql-0's data in its volume"
    );
    pids.extend(localnfs_pids);
    pids.push(kernel_pid.expect("report lists the node's kernel"));
    let dir = dir.expect("report names the cluster directory");
    assert!(dir.join("kubeconfig").is_file());
    let admin = admin.expect("report names the admin address");
    assert_eq!(http_get(admin, "/readyz").await.0, 200);

    let demo_pid = libc::pid_t::try_from(child.id().expect("running")).expect("pid");
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(demo_pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("demo exits within 30 s of SIGTERM")
        .expect("wait");
    assert!(status.success(), "demo exited with {status}");
    for pid in pids {
        assert!(!process_exists(pid), "pid {pid} outlived the demo");
    }
    let group = kernel_pid.expect("kernel pid");
    let leftovers: Vec<u32> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| process_exists(*pid) && process_group(*pid) == Some(group))
        .collect();
    assert!(
        leftovers.is_empty(),
        "the node kernel's processes outlived the demo: {leftovers:?}"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[tokio::test]
async fn demo_without_kubernetes_binaries_says_how_to_get_them() {
    let out = Command::new(env!("CARGO_BIN_EXE_localnfs"))
        .args(["demo", "--admin-addr", "127.0.0.1:0"])
        .args(["--k8s-bin-dir", "/nonexistent/localnfs-k8s"])
        .output()
        .await
        .expect("demo runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("scripts/k8s-binaries") && stderr.contains("/nonexistent/localnfs-k8s"),
        "unhelpful error:\n{stderr}"
    );
}
