//! POSIX conformance (pjdfstest) through the Linux kernel NFS client, as a pod's
//! processes see a volume.
//!
//! CI runs a fixed subset against localnfs (a few minutes) and asserts every subtest
//! passes. The whole suite against localnfs and NFS-Ganesha, which reports a table
//! rather than asserting, is a benchmark: `benches/conformance.rs`, run by
//! `scripts/conformance`.

mod support;

use std::fmt::Write as _;

use localnfs_testbed::kernel::{KernelNode, TestNetwork};
use support::kernel::{localnfs_mount, pjdfstest_dir, run_pjdfstest};

/// pjdfstest files CI runs: every syscall family the kernel client turns into NFS
/// procedures (SETATTR mode/owner/size/times, CREATE, MKDIR, MKNOD, SYMLINK, LINK,
/// RENAME, REMOVE, RMDIR), including set-id bits, sticky directories, permission
/// checks by uid/gid and names at the length limits.
const CI_FILES: &[&str] = &[
    "chmod/00.t",
    "chmod/05.t",
    "chmod/07.t",
    "chmod/11.t",
    "chmod/12.t",
    "chown/05.t",
    "ftruncate/00.t",
    "link/10.t",
    "mkdir/00.t",
    "mkfifo/00.t",
    "mknod/11.t",
    "open/00.t",
    "open/06.t",
    "rename/04.t",
    "rename/05.t",
    "rmdir/00.t",
    "symlink/00.t",
    "truncate/00.t",
    "unlink/00.t",
    "unlink/11.t",
    "utimensat/00.t",
];

// Two halves, each in its own test node against its own agent, run side by side: one
// node's guest keeps about one core busy, and the files are independent.

#[tokio::test]
async fn posix_conformance_subset_through_the_kernel_client_even_files() {
    subset(CI_FILES.iter().step_by(2)).await;
}

#[tokio::test]
async fn posix_conformance_subset_through_the_kernel_client_odd_files() {
    subset(CI_FILES.iter().skip(1).step_by(2)).await;
}

/// Runs pjdfstest's `files` in a fresh test node on a localnfs volume; fails with every
/// file that had a failed (or no passed) subtest.
async fn subset(files: impl Iterator<Item = &'static &'static str>) {
    let pjd = pjdfstest_dir();
    let net = TestNetwork::create().expect("test network");
    let node = KernelNode::boot(&net, "node-1", net.address(101))
        .await
        .expect("boot test node");
    let root = tempfile::tempdir().expect("root");
    let _agent = localnfs_mount(&net, &node, root.path(), &["--allow-device-nodes"]).await;
    let mut failures = String::new();
    for file in files {
        let (counts, tap) = run_pjdfstest(&node, &pjd, "/mnt/vol", file).await;
        if counts.failed > 0 || counts.passed == 0 {
            let _ = writeln!(failures, "{file}: {counts:?}");
            for line in tap.lines().filter(|l| l.starts_with("not ok")).take(10) {
                let _ = writeln!(failures, "    {line}");
            }
        }
    }
    assert!(failures.is_empty(), "pjdfstest failures:\n{failures}");
}
