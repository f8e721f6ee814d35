//! A real database on a volume, through the Linux kernel NFS client of a test node:
//! MariaDB with its datadir on the mount, sysbench as the application, and the node
//! agent killed and restarted under that load.

mod support;

use std::time::Duration;

use localnfs_testbed::kernel::{KernelNode, TestNetwork};
use support::kernel::{agent_for, mount};
use support::mariadb;
use support::nfs::create_volume;

const TABLES: u32 = 2;
const ROWS: u32 = 2000;
/// How long the application runs while the agent is killed.
const LOAD_SECONDS: u64 = 45;
const KILLS: usize = 3;

/// Writes files with fsync for `LOAD_SECONDS`, remembering each one's checksum, then
/// checks every file against it. Any failed write (EIO, ESTALE) ends the loop with an
/// error.
const FSYNC_WRITER: &str = r#"
set -e
mkdir -p /mnt/db/files
end=$(( $(date +%s) + SECONDS_ ))
i=0
: > /tmp/sums
while [ $(date +%s) -lt $end ]; do
    i=$((i + 1))
    head -c 200000 /dev/urandom > /tmp/src
    dd if=/tmp/src of=/mnt/db/files/f$i bs=65536 conv=fsync status=none
    echo "$(sha256sum < /tmp/src | cut -d' ' -f1)  f$i" >> /tmp/sums
done
# Read back from the server, not from this kernel's cache of what it wrote.
sync; echo 3 > /proc/sys/vm/drop_caches
cd /mnt/db/files && sha256sum -c --quiet /tmp/sums
echo "files=$i"
"#;

#[tokio::test]
async fn mariadb_on_a_volume_survives_agent_sigkill_under_load() {
    let net = TestNetwork::create().expect("test network");
    let node = KernelNode::boot(&net, "node-1", net.address(101))
        .await
        .expect("boot test node");
    let root = tempfile::tempdir().expect("root");
    create_volume(root.path(), "db", 4 << 30);
    let mut agent = agent_for(&net, root.path(), &[&node], &[]).await;
    mount(&node, &agent, "db", "/mnt/db").await;

    mariadb::start(&node, "/mnt/db/data")
        .await
        .expect("mariadbd starts with its datadir on the volume");
    mariadb::prepare(&node, TABLES, ROWS)
        .await
        .expect("sysbench prepare");
    mariadb::check_tables(&node, TABLES).await;

    let run = format!(
        "{} --time={LOAD_SECONDS} --threads=4 run 2>&1",
        mariadb::sysbench("oltp_read_write", TABLES, ROWS)
    );
    let writer = FSYNC_WRITER.replace("SECONDS_", &LOAD_SECONDS.to_string());
    let timeout = Duration::from_secs(LOAD_SECONDS + 240);
    let faults = async {
        let mut pids = Vec::new();
        for _ in 0..KILLS {
            tokio::time::sleep(Duration::from_secs(LOAD_SECONDS / (KILLS as u64 + 1))).await;
            pids.push(agent.pid());
            agent.kill9_and_restart().await;
        }
        pids
    };
    let (load, files, killed) =
        tokio::join!(node.run(&run, timeout), node.run(&writer, timeout), faults);
    assert_eq!(killed.len(), KILLS);
    let load = load.expect("sysbench run");
    // sysbench stops at the first error other than a deadlock or lock wait (which it
    // retries, as applications do): an I/O error in InnoDB or a lost server ends it.
    assert_eq!(
        load.rc, 0,
        "sysbench failed while the agent restarted:\n{}",
        load.stdout
    );
    let (tps, p95) = mariadb::tps_and_p95(&load.stdout).expect("sysbench report");
    assert!(tps > 0.0, "no transaction completed:\n{}", load.stdout);
    println!("sysbench oltp_read_write with {KILLS} agent kills: {tps} tps, p95 {p95} ms");
    let files = files.expect("fsync writer");
    assert_eq!(
        files.rc, 0,
        "fsynced files were lost or failed: {}\n{}",
        files.stdout, files.stderr
    );

    // Crash the database too: InnoDB recovers from what the agent acknowledged.
    mariadb::crash(&node).await;
    mariadb::start(&node, "/mnt/db/data")
        .await
        .expect("mariadbd recovers its datadir on the volume");
    mariadb::check_tables(&node, TABLES).await;
    let kernel_log = node
        .run_ok("dmesg", Duration::from_secs(30))
        .await
        .expect("dmesg");
    assert!(
        !kernel_log.to_lowercase().contains("stale"),
        "the kernel client saw stale handles:\n{kernel_log}"
    );
}
