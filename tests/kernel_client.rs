//! The Linux kernel NFS client (what every pod uses) against the real `localnfs node`:
//! each test boots User-Mode Linux test nodes on a private network and mounts volumes
//! with `mount -t nfs` and the PVs' default mountOptions.

mod support;

use std::time::Duration;

use localnfs::provisioner::pv::default_mount_options;
use localnfs_testbed::kernel::{KernelNode, TestNetwork};
use support::kernel::{agent_for, mount};
use support::nfs::create_volume;

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn kernel_client_data_survives_remount_and_matches_the_disk() {
    let net = TestNetwork::create().expect("test network");
    let node = KernelNode::boot(&net, "node-1", net.address(101))
        .await
        .expect("boot test node");
    let root = tempfile::tempdir().expect("root");
    create_volume(root.path(), "vol", 64 * MIB);
    let agent = agent_for(&net, root.path(), &[&node], &[]).await;

    mount(&node, &agent, "vol", "/mnt/vol").await;
    let written = node
        .run_ok(
            "set -e; cd /mnt/vol; head -c 12582912 /dev/urandom > data; sync data; \
             mkdir -p d/e; echo hello > d/e/f; ln -s d/e/f link; \
             sha256sum data | cut -d' ' -f1",
            Duration::from_secs(120),
        )
        .await
        .expect("write through the mount");
    node.run_ok("umount /mnt/vol", Duration::from_secs(30))
        .await
        .expect("umount");
    mount(&node, &agent, "vol", "/mnt/vol").await;
    let read = node
        .run_ok(
            "set -e; cd /mnt/vol; cat link; sha256sum data | cut -d' ' -f1",
            Duration::from_secs(120),
        )
        .await
        .expect("read back after remount");
    assert_eq!(read, format!("hello\n{written}"));
    let on_disk = std::fs::read(root.path().join("volumes/vol/data")).expect("file on disk");
    assert_eq!(on_disk.len(), 12 << 20, "the whole file reached the disk");
}

#[tokio::test]
async fn kernel_client_from_an_address_not_allowed_cannot_mount() {
    let net = TestNetwork::create().expect("test network");
    let node = KernelNode::boot(&net, "node-1", net.address(101))
        .await
        .expect("boot node");
    let stranger = KernelNode::boot(&net, "stranger", net.address(200))
        .await
        .expect("boot stranger");
    let root = tempfile::tempdir().expect("root");
    create_volume(root.path(), "vol", 16 * MIB);
    let agent = agent_for(&net, root.path(), &[&node], &[]).await;

    let opts = default_mount_options(agent.port)
        .into_iter()
        .chain([
            "retry=0".to_owned(),
            "timeo=50".to_owned(),
            "retrans=1".to_owned(),
        ])
        .collect::<Vec<_>>();
    // The control: an allowed node mounts with exactly these options.
    node.mount_nfs(&agent.addr.ip().to_string(), "/vol", &opts, "/mnt/vol")
        .await
        .expect("an allowed node mounts");
    let refused = stranger
        .mount_nfs(&agent.addr.ip().to_string(), "/vol", &opts, "/mnt/vol")
        .await;
    assert!(
        refused.is_err(),
        "a machine that is not an allowed node mounted the volume"
    );
}

#[tokio::test]
async fn one_pod_unmounting_a_shared_volume_leaves_the_other_pod_working() {
    let net = TestNetwork::create().expect("test network");
    let node = KernelNode::boot(&net, "node-1", net.address(101))
        .await
        .expect("boot test node");
    let root = tempfile::tempdir().expect("root");
    create_volume(root.path(), "shared", 64 * MIB);
    let agent = agent_for(&net, root.path(), &[&node], &[]).await;

    // Two pods on one node, one ReadWriteMany volume: kubelet mounts it once per pod.
    mount(&node, &agent, "shared", "/mnt/pod-a").await;
    mount(&node, &agent, "shared", "/mnt/pod-b").await;
    node.run_ok(
        "set -e; echo a > /mnt/pod-a/from-a; echo b > /mnt/pod-b/from-b; sync",
        Duration::from_secs(60),
    )
    .await
    .expect("both pods write");
    // Pod A goes away: its mount is unmounted (mount.nfs sends MOUNT's UMNT).
    node.run_ok("umount /mnt/pod-a", Duration::from_secs(60))
        .await
        .expect("umount pod A");
    // Pod B keeps reading and writing; drop the client's caches so it must ask.
    let out = node
        .run(
            "set -e; echo 3 > /proc/sys/vm/drop_caches; cat /mnt/pod-b/from-a; \
             echo again > /mnt/pod-b/later; sync; ls /mnt/pod-b | sort | tr '\\n' ' '",
            Duration::from_secs(60),
        )
        .await
        .expect("run in node");
    assert_eq!(
        (out.rc, out.stdout.as_str()),
        (0, "a\nfrom-a from-b later "),
        "pod B lost access when pod A unmounted: {}",
        out.stderr
    );
}
