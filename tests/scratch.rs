mod support;
use localnfs::testbed::kernel::{KernelNode, TestNetwork};
use std::time::Duration;
use support::kernel::{agent_for, mount};
use support::nfs::create_volume;

#[tokio::test]
#[ignore = "scratch"]
async fn shell() {
    let net = TestNetwork::create().expect("test network");
    let node = KernelNode::boot(&net, "node-1", net.address(101))
        .await
        .expect("boot");
    let root = tempfile::tempdir().expect("root");
    create_volume(root.path(), "vol", 4 << 30);
    let agent = agent_for(&net, root.path(), &[&node], &["--log", "debug"]).await;
    mount(&node, &agent, "vol", "/mnt/vol").await;
    println!(
        "rmtab before: {:?}",
        std::fs::read_to_string(root.path().join("rmtab"))
    );
    let script = std::fs::read_to_string("/tmp/guest.sh").unwrap();
    let out = node.run(&script, Duration::from_secs(900)).await.unwrap();
    println!(
        "rc={}\n--- stdout\n{}\n--- stderr\n{}",
        out.rc, out.stdout, out.stderr
    );
    println!(
        "rmtab after: {:?}",
        std::fs::read_to_string(root.path().join("rmtab"))
    );
}
