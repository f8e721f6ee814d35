//! POSIX conformance (pjdfstest) through the Linux kernel NFS client, as a pod's
//! processes see the volume.

mod support;

use std::time::{Duration, Instant};

use localnfs::testbed::kernel::{KernelNode, TestNetwork};
use support::kernel::{agent_for, mount, pjdfstest_dir, run_pjdfstest};
use support::nfs::create_volume;

#[tokio::test]
#[ignore = "exploration"]
async fn explore() {
    let pjd = pjdfstest_dir();
    let net = TestNetwork::create().expect("test network");
    let node = KernelNode::boot(&net, "node-1", net.address(101))
        .await
        .expect("boot test node");
    let root = tempfile::tempdir().expect("root");
    create_volume(root.path(), "vol", 1 << 30);
    let agent = agent_for(&net, root.path(), &[&node], &["--allow-device-nodes"]).await;
    mount(&node, &agent, "vol", "/mnt/vol").await;
    let files = std::env::var("PJD_FILES").unwrap_or_default();
    for f in files.split_whitespace() {
        let t = Instant::now();
        let (c, out) = run_pjdfstest(&node, &pjd, "/mnt/vol", f).await;
        println!("{f}: {c:?} in {:?}", t.elapsed());
        if c.failed > 0 {
            for l in out.lines().filter(|l| l.starts_with("not ok")).take(8) {
                println!("    {l}");
            }
        }
    }
    let _ = Duration::ZERO;
}
