//! What a node agent advertises as free in its heartbeat, against the truth measured
//! here on the node's own small disk (a tmpfs): the disk's free bytes less what each
//! volume may still grow into (its size less what its files take on disk). Data
//! written by a pod through NFS and data already on disk when the agent starts must
//! each be counted once: as gone from the disk, not again as part of a reservation.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, PostParams};
use localnfs::objects::keys::FREE_BYTES;
use localnfs_testbed::{TestCluster, kubelet};
use nfs3_types::nfs3::stable_how;
use serde_json::json;
use support::cluster::{
    HEARTBEATS, Localnfs, bound_pv, claim, nfs_target, pod_on, storage_class, wait_published,
};
use support::eventually;
use support::nfs::Client;
use support::tmpfs::Tmpfs;

const MIB: u64 = 1 << 20;

/// Bytes the files under `dir` take on disk (allocated blocks, or the size of a
/// regular file when larger), counted here without the agent's code.
fn on_disk(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).expect("read volume dir").flatten() {
        let md = entry.metadata().expect("stat");
        let blocks = md.blocks() * 512;
        total += if md.is_dir() {
            blocks + on_disk(&entry.path())
        } else {
            blocks.max(md.size())
        };
    }
    total
}

/// The truth: the disk's free bytes less each `(directory, size)` volume's room left.
fn truth(root: &Path, volumes: &[(&Path, u64)]) -> u64 {
    let st = nix::sys::statvfs::statvfs(root).expect("statvfs");
    let disk = st.blocks_available() * st.fragment_size();
    let promised: u64 = volumes
        .iter()
        .map(|(dir, size)| size.saturating_sub(on_disk(dir)))
        .sum();
    disk.saturating_sub(promised)
}

/// What node-1's heartbeat says is free.
async fn advertised(leases: &Api<Lease>) -> Option<u64> {
    let hb = leases.get("localnfs-node-node-1").await.ok()?;
    hb.metadata.annotations?.get(FREE_BYTES)?.parse().ok()
}

/// Waits (two heartbeats at most) until node-1 advertises `want` give or take 2 MiB.
async fn advertises(leases: &Api<Lease>, what: &str, want: u64) {
    let last = std::sync::Mutex::new(None);
    let seen = tokio::time::timeout(
        Duration::from_secs(75),
        eventually(what, Duration::from_secs(75), || async {
            let free = advertised(leases).await?;
            *last.lock().expect("last") = Some(free);
            (free.abs_diff(want) <= 2 * MIB).then_some(free)
        }),
    )
    .await;
    assert!(
        seen.is_ok(),
        "{what}: node-1 advertises {:?} MiB free, the disk and reservations say {} MiB",
        last.lock().expect("last").map(|f| f / MIB),
        want / MIB
    );
}

#[tokio::test]
async fn a_nodes_free_space_counts_written_data_once_not_again_beside_its_reservation() {
    let cluster = TestCluster::start().await.expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    let root = lnfs.root("node-1");
    let _disk = Tmpfs::mount_on(&root, "256m");
    let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 73, 1));
    kubelet::add_node(&client, "node-1", ip)
        .await
        .expect("node");
    lnfs.start_agent("node-1", ip);
    lnfs.start_controller();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    for (name, size) in [("written", "128Mi"), ("filled", "64Mi")] {
        claims
            .create(&PostParams::default(), &claim(name, "now", size, json!({})))
            .await
            .expect("claim");
    }
    let written = bound_pv(&client, "written").await;
    let filled = bound_pv(&client, "filled").await;
    let (server, port, written_vol) = nfs_target(&written);
    let written_dir = root.join("volumes").join(&written_vol);
    let filled_dir = root.join("volumes").join(nfs_target(&filled).2);
    let volumes = [
        (written_dir.as_path(), 128 * MIB),
        (filled_dir.as_path(), 64 * MIB),
    ];
    let leases: Api<Lease> = Api::namespaced(client.clone(), HEARTBEATS);
    advertises(&leases, "both volumes empty", truth(&root, &volumes)).await;

    // A pod writes 96 MiB through NFS.
    pod_on(&client, "writer", "node-1", &["written"]).await;
    wait_published(
        &client,
        &written.metadata.name.clone().expect("pv name"),
        &["node-1"],
    )
    .await;
    let mut c = Client::mount_when_granted(SocketAddr::new(server, port), &written_vol, ip).await;
    let root_fh = c.root.clone();
    let f = c.create(&root_fh, b"data", 0o644).await.expect("CREATE");
    let chunk = vec![5u8; MIB as usize];
    for i in 0..96 {
        c.write(&f, i * MIB, &chunk, stable_how::UNSTABLE)
            .await
            .expect("WRITE");
    }
    c.commit(&f).await.expect("COMMIT");
    assert!(on_disk(&written_dir) >= 96 * MIB, "the data is on the disk");
    advertises(
        &leases,
        "96 MiB written through NFS",
        truth(&root, &volumes),
    )
    .await;

    // 48 MiB put in the other volume while its agent is down (as a restore or a
    // migration by hand would), then the agent started again.
    lnfs.stop_agent("node-1").await;
    std::fs::write(filled_dir.join("blob"), vec![9u8; 48 * MIB as usize]).expect("fill");
    lnfs.start_agent("node-1", ip);
    advertises(
        &leases,
        "48 MiB on disk when the agent started",
        truth(&root, &volumes),
    )
    .await;
    lnfs.stop_agent("node-1").await;
}
