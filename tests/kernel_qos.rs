//! Per-volume quality of service (issue #24) through the Linux kernel NFS client of a
//! test node: a volume's write-bandwidth ceiling holds a writer near it, and one
//! volume's write flood does not starve another volume's durable calls. Both assert on
//! ratios (rate ÷ ceiling, rate with the flood ÷ rate alone) with bands wide enough for
//! two loaded cores. The second's bound is below issue 24's goal: see its constant.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use localnfs::volume::{VolumeName, VolumeSpec};
use localnfs_testbed::kernel::{KernelNode, TestNetwork};
use nfs3_client::Nfs3Client;
use nfs3_types::nfs3::stable_how;
use nfs3_types::rpc::opaque_auth;
use support::kernel::{agent_for, mount};
use support::nfs::{Client, auth, create_volume, create_volume_with, tcp_to};

const MIB: u64 = 1 << 20;

/// The victim: `open(O_CREAT); write(4 KiB); fsync(); close(); unlink()` in a loop, as a
/// database's small durable files are, until `COUNT` files or `SECS` seconds; prints
/// files per second. One process, so the guest's fork/exec cost is not measured.
const DURABLE_LOOP: &str = r#"
import os, time
d = "/mnt/a/victim-TAG"
os.makedirs(d, exist_ok=True)
data = b"x" * 4096
start = time.monotonic()
n = 0
while n < COUNT and time.monotonic() - start < SECS:
    p = "%s/f%d" % (d, n)
    fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    os.unlink(p)
    n += 1
print(n / (time.monotonic() - start))
"#;

/// Files per second of [`DURABLE_LOOP`] on `/mnt/a` of `node`.
async fn durable_rate(node: &KernelNode, tag: &str) -> f64 {
    let script = DURABLE_LOOP
        .replace("TAG", tag)
        .replace("COUNT", "200")
        .replace("SECS", "25");
    let out = node
        .run_ok(
            &format!("python3 -c {}", localnfs_testbed::kernel::quote(&script)),
            Duration::from_secs(120),
        )
        .await
        .expect("durable loop in the test node");
    out.trim().parse().expect("files per second")
}

/// Host clients flooding a volume with 1 MiB UNSTABLE writes, 8 files × 4 in flight,
/// each writer going through its file in order and COMMITting at each 128 MiB wrap,
/// as a streaming writer's `fsync` would. Stopped (and awaited) by [`Flood::stop`].
struct Flood {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<u64>>,
}

impl Flood {
    async fn start(server: SocketAddr, from: IpAddr, volume: &str) -> Flood {
        const FILES: usize = 8;
        const DEPTH: usize = 4;
        const WRAP: u64 = 128;
        // Each flood writes its own files (a test may flood a volume more than once).
        static FLOODS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = FLOODS.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let mut setup = Client::mount_at(server, volume, from, 0, 0).await;
        let data = Arc::new(vec![0x5a_u8; MIB as usize]);
        let mut tasks = Vec::new();
        for f in 0..FILES {
            let root = setup.root.clone();
            let fh = setup
                .create(&root, format!("flood-{n}-{f}").as_bytes(), 0o644)
                .await
                .expect("create the flood's file");
            let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
            for _ in 0..DEPTH {
                let mut c = Client {
                    nfs: Nfs3Client::new_with_auth(
                        tcp_to(server, from).await,
                        auth(0, 0),
                        opaque_auth::default(),
                    ),
                    root: root.clone(),
                };
                let (stop, data, fh, next) = (stop.clone(), data.clone(), fh.clone(), next.clone());
                tasks.push(tokio::spawn(async move {
                    let mut written = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed) % WRAP;
                        c.write(&fh, i * MIB, &data, stable_how::UNSTABLE)
                            .await
                            .expect("flood WRITE");
                        if i == WRAP - 1 {
                            c.commit(&fh).await.expect("flood COMMIT");
                        }
                        written += MIB;
                    }
                    written
                }));
            }
        }
        Flood { stop, tasks }
    }

    /// Stops every writer after its call in flight; the bytes they wrote.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for t in self.tasks {
            total += t.await.expect("flood writer");
        }
        total
    }
}

/// An agent serving `clients` and the host end's first address (the flood's clients).
async fn agent(
    net: &TestNetwork,
    root: &std::path::Path,
    clients: &[&KernelNode],
) -> support::nfs::Node {
    let host = format!("{}/32", net.address(1));
    agent_for(net, root, clients, &["--insecure-ports", "--allow", &host]).await
}

// History: 0.08× of alone on main (one shared queue, unbounded dirty data); with the
// `qos` branch 0.09× (622bf6e), 0.04× (6d7b515), and at cc44a6d 0.57× in one run, 0.08×
// in the next. The victim's fsync waits behind the flood's data in the file system both
// volumes share. With other volumes' unstable writes held to one at a time beside
// durable calls (`pool`, branch `qos2`): 0.44×, 0.42×, 0.39×, 0.40×, 0.24×, 0.50×, 0.25× in
// seven runs under the heavy-run lock on the loaded 2-core machine (one further run
// failed after 6.7 s, before printing its ratio; its message was not kept). On a
// later 2-core machine whose disk takes the flood at ~700 MB/s, one round gave 0.11–0.34×
// (eight rounds, release build, with and without the change of that session), and a
// fresh-clone CI run failed on a single round's 0.12×: hence the median of three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_calls_on_one_volume_keep_pace_while_another_volume_is_flooded_with_writes() {
    let net = TestNetwork::create().expect("test network");
    let node = KernelNode::boot(&net, "node-1", net.address(101))
        .await
        .expect("boot test node");
    let root = tempfile::tempdir_in("/var/tmp").expect("root");
    create_volume(root.path(), "a", 1 << 30);
    create_volume(root.path(), "b", 8 << 30);
    let agent = agent(&net, root.path(), &[&node]).await;
    mount(&node, &agent, "a", "/mnt/a").await;

    // Warm-up (the guest's first run of Python, the volume's first files), then three
    // rounds of alone, then flooded: the median round decides (one round's "alone"
    // varies 2× on a shared 2-core machine, and the ratio with it).
    durable_rate(&node, "warm").await;
    let mut rounds = Vec::new();
    for round in 0..3 {
        let alone = durable_rate(&node, &format!("alone{round}")).await;
        let flood = Flood::start(agent.addr, net.address(1), "b").await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let flooded = durable_rate(&node, &format!("flooded{round}")).await;
        let written = flood.stop().await;
        println!(
            "durable create+fsync+unlink: {alone:.0}/s alone, {flooded:.0}/s while the other \
             volume took {} MiB of writes: {:.2}× of alone",
            written / MIB,
            flooded / alone
        );
        assert!(
            written >= 256 * MIB,
            "the flood wrote only {} MiB: too little to test anything",
            written / MIB
        );
        rounds.push((flooded / alone, flooded, alone));
    }
    rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ratio, flooded, alone) = rounds[1];
    assert!(
        ratio >= MIN_RATIO,
        "durable calls on volume a ran at {ratio:.2}× of their speed alone (median of three \
         rounds) while volume b was flooded ({flooded:.0}/s vs {alone:.0}/s); at least \
         {MIN_RATIO}× expected"
    );
}

/// Below the lowest median of three rounds measured with durable calls first (0.16× on
/// the machine whose disk takes the flood at ~700 MB/s; single rounds 0.24–0.50× on the
/// earlier one), above what one shared queue gave (0.08×): it catches durable calls
/// starved again, with room for a loaded machine; the issue's goal (0.8×) is not met yet.
const MIN_RATIO: f64 = 0.12;

/// The ceiling of [`a_write_bandwidth_ceiling_holds_a_kernel_writer_to_it`].
const CEILING: u64 = 8 * MIB;
/// What the writer writes: 8 s at the ceiling.
const WRITTEN_MIB: u64 = 64;

#[tokio::test]
async fn a_write_bandwidth_ceiling_holds_a_kernel_writer_to_it() {
    let net = TestNetwork::create().expect("test network");
    let node = KernelNode::boot(&net, "node-1", net.address(101))
        .await
        .expect("boot test node");
    let root = tempfile::tempdir_in("/var/tmp").expect("root");
    let mut spec = VolumeSpec::new(VolumeName::new("capped").expect("name"), 1 << 30);
    spec.write_bandwidth = Some(CEILING);
    create_volume_with(root.path(), &spec);
    let agent = agent_for(&net, root.path(), &[&node], &[]).await;
    mount(&node, &agent, "capped", "/mnt/capped").await;

    // The time includes the flush (conv=fsync): the page cache of the guest takes the
    // data at once, the server's ceiling paces the WRITEs that follow.
    let nanos = node
        .run_ok(
            &format!(
                "set -e; s=$(date +%s%N); \
                 dd if=/dev/zero of=/mnt/capped/f bs=1M count={WRITTEN_MIB} conv=fsync status=none; \
                 e=$(date +%s%N); echo $((e - s))"
            ),
            Duration::from_secs(120),
        )
        .await
        .expect("dd through the kernel client");
    let secs = nanos.trim().parse::<f64>().expect("nanoseconds") / 1e9;
    let ratio = (WRITTEN_MIB * MIB) as f64 / secs / CEILING as f64;
    println!("{WRITTEN_MIB} MiB in {secs:.2} s: {ratio:.3}× the writeBandwidth ceiling");
    assert!(
        (0.7..=1.15).contains(&ratio),
        "a writer on a volume with writeBandwidth {} MiB/s wrote at {ratio:.2}× of it",
        CEILING / MIB
    );
    let on_disk = std::fs::metadata(root.path().join("volumes/capped/f")).expect("file on disk");
    assert_eq!(
        on_disk.len(),
        WRITTEN_MIB * MIB,
        "the whole file reached the disk"
    );
}
