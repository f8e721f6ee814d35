//! Kernel test nodes with a standalone `localnfs node` beside them: the agent listens on
//! the test network's host address and allows only the given nodes; volumes are mounted
//! in the guests with the PVs' default mountOptions, as kubelet would.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use localnfs::provisioner::pv::default_mount_options;
use localnfs_testbed::kernel::{KernelNode, TestNetwork};

use super::nfs::{Node, create_volume};

/// A standalone agent on `net`'s first host address, allowing only `clients`, with
/// extra flags.
pub async fn agent_for(
    net: &TestNetwork,
    root: &Path,
    clients: &[&KernelNode],
    extra: &[&str],
) -> Node {
    let mut args: Vec<String> = Vec::new();
    for c in clients {
        args.push("--allow".to_owned());
        args.push(format!("{}/32", c.address()));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Node::start_on(root, SocketAddr::new(net.address(1), 0), &args).await
}

/// Mounts `volume` of `agent` at `target` in `node` with the default mountOptions.
pub async fn mount(node: &KernelNode, agent: &Node, volume: &str, target: &str) {
    node.mount_nfs(
        &agent.addr.ip().to_string(),
        &format!("/{volume}"),
        &default_mount_options(agent.port),
        target,
    )
    .await
    .expect("mount through the kernel client");
}

/// pjdfstest, built by `scripts/pjdfstest` (a test that needs it fails without it).
pub fn pjdfstest_dir() -> PathBuf {
    let dir = std::env::var_os("LOCALNFS_PJDFSTEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from("/var/cache"));
            cache.join("localnfs/pjdfstest")
        });
    assert!(
        dir.join("pjdfstest").is_file(),
        "pjdfstest is not built in {}: run scripts/pjdfstest (or set LOCALNFS_PJDFSTEST_DIR)",
        dir.display()
    );
    dir
}

/// Pass and fail counts of one pjdfstest file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapCounts {
    pub passed: usize,
    pub failed: usize,
}

/// Counts a TAP stream: `ok N`, `not ok N`, and planned tests that never ran as failed.
pub fn count_tap(tap: &str) -> TapCounts {
    let mut planned: usize = 0;
    let (mut passed, mut failed) = (0, 0);
    for line in tap.lines() {
        if let Some(plan) = line.strip_prefix("1..") {
            planned = plan.trim().parse().unwrap_or(0);
        } else if line.starts_with("ok ") {
            passed += 1;
        } else if line.starts_with("not ok ") {
            failed += 1;
        }
    }
    failed += planned.saturating_sub(passed + failed);
    TapCounts { passed, failed }
}

/// Runs pjdfstest file `file` (e.g. `chmod/00.t`) as root in a fresh directory under
/// `mountpoint` of `node`. Output that is not TAP (no `1..N` plan: the file could not
/// be run at all) fails here with what the guest printed, rather than counting as a
/// file with no tests.
pub async fn run_pjdfstest(
    node: &KernelNode,
    pjd: &Path,
    mountpoint: &str,
    file: &str,
) -> (TapCounts, String) {
    let work = format!("{mountpoint}/pjd-{}", file.replace(['/', '.'], "-"));
    let script = format!(
        "mkdir -p {w} && cd {w} && sh {t} 2>&1",
        w = localnfs_testbed::kernel::quote(&work),
        t = localnfs_testbed::kernel::quote(
            &localnfs_testbed::kernel::guest_path(&pjd.join("tests").join(file)).to_string_lossy()
        ),
    );
    let out = node
        .run(&script, Duration::from_secs(600))
        .await
        .expect("run pjdfstest in the test node");
    assert!(
        is_tap(&out.stdout),
        "pjdfstest {file} printed no TAP in test node {} (exit {}): is {} readable there?\n{}\n{}",
        node.name(),
        out.rc,
        pjd.display(),
        out.stdout.trim_end(),
        out.stderr.trim_end()
    );
    (count_tap(&out.stdout), out.stdout)
}

/// Whether `out` is a TAP stream: it has a plan line (`1..N`).
pub fn is_tap(out: &str) -> bool {
    out.lines().any(|l| l.starts_with("1.."))
}

/// A volume of a fresh agent (with `extra` flags), mounted at `/mnt/vol` in `node`.
pub async fn localnfs_mount(
    net: &TestNetwork,
    node: &KernelNode,
    root: &Path,
    extra: &[&str],
) -> Node {
    create_volume(root, "vol", 64 << 30);
    let agent = agent_for(net, root, &[node], extra).await;
    mount(node, &agent, "vol", "/mnt/vol").await;
    agent
}
