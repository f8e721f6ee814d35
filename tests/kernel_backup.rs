//! Backup and restore seen from a pod (issue 23, "done when" (d)): a test node's
//! kernel NFS client writes files into a volume; `localnfs volume backup` asks the
//! agent for a set; the volume is deleted; `localnfs volume restore` makes a new
//! volume from the set; the node mounts it and finds the same checksums, owners,
//! modes and links (`sha256sum -c` and `stat` in the node).

mod support;

use std::time::Duration;

use localnfs_testbed::kernel::{KernelNode, TestNetwork};
use support::kernel::{agent_for, mount};
use support::nfs::create_volume;

async fn localnfs(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_localnfs"))
        .args(args)
        .output()
        .await
        .expect("run localnfs")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Checksums and attributes of the pod's files, written to the node's own /tmp.
const RECORD: &str = "cd /mnt/db && find . -type f -exec sha256sum {} + | sort -k2 > /tmp/sums \
    && stat -c '%n %a %u %g %h %Y' data/sub/t.ibd data/hard data/ibdata1 > /tmp/stat \
    && readlink data/cur > /tmp/link && wc -l < /tmp/sums";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backed_up_volume_deleted_and_restored_reads_back_the_same_checksums_in_the_pod() {
    let net = TestNetwork::create().expect("test network");
    let node = KernelNode::boot(&net, "node-1", net.address(101))
        .await
        .expect("boot test node");
    let root = tempfile::tempdir_in("/var/tmp").expect("root");
    let target = tempfile::tempdir_in("/var/tmp").expect("target");
    let (root_s, to) = (
        root.path().display().to_string(),
        target.path().display().to_string(),
    );
    create_volume(root.path(), "db", 256 << 20);
    let agent = agent_for(&net, root.path(), &[&node], &[]).await;
    mount(&node, &agent, "db", "/mnt/db").await;
    let wrote = node
        .run_ok(
            "cd /mnt/db && mkdir -p data/sub && head -c 6000000 /dev/urandom > data/ibdata1 \
             && head -c 100000 /dev/urandom > data/sub/t.ibd && ln data/ibdata1 data/hard \
             && ln -s sub/t.ibd data/cur && chmod 640 data/sub/t.ibd \
             && chown 999:998 data/sub/t.ibd && sync",
            Duration::from_secs(60),
        )
        .await
        .expect("write files in the pod");
    let files = node
        .run_ok(RECORD, Duration::from_secs(60))
        .await
        .expect("record checksums in the pod");
    assert_eq!(files.trim(), "3", "{wrote}{files}");

    let out = localnfs(&[
        "volume",
        "--root",
        &root_s,
        "backup",
        "db",
        "--to",
        &to,
        "--allow-same-device",
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out));
    println!("{}", text(&out).trim_end());
    let set = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(2)
        .expect("set id")
        .to_owned();

    node.run_ok("umount /mnt/db", Duration::from_secs(30))
        .await
        .expect("unmount");
    let out = localnfs(&["volume", "--root", &root_s, "delete", "db"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let from = target.path().join("db").join(&set).display().to_string();
    let out = localnfs(&[
        "volume",
        "--root",
        &root_s,
        "restore",
        "--from",
        &from,
        "db-restored",
    ])
    .await;
    assert!(out.status.success(), "{}", text(&out));

    // The agent serves the new volume within a refresh.
    let mut tries = 0;
    loop {
        let r = node
            .mount_nfs(
                &agent.addr.ip().to_string(),
                "/db-restored",
                &localnfs::provisioner::pv::default_mount_options(agent.port),
                "/mnt/db",
            )
            .await;
        if r.is_ok() {
            break;
        }
        tries += 1;
        assert!(tries < 20, "the restored volume is never served: {r:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let check = node
        .run(
            "cd /mnt/db && sha256sum -c --quiet /tmp/sums \
             && stat -c '%n %a %u %g %h %Y' data/sub/t.ibd data/hard data/ibdata1 | diff /tmp/stat - \
             && readlink data/cur | diff /tmp/link - && echo SAME",
            Duration::from_secs(60),
        )
        .await
        .expect("check in the pod");
    assert!(
        check.rc == 0 && check.stdout.contains("SAME"),
        "restored volume differs (rc {}):\n{}\n{}",
        check.rc,
        check.stdout,
        check.stderr
    );
}
