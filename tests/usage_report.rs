//! The usage report at more volumes than one annotation holds, through the real
//! control plane: an agent with 3,000 volumes keeps its heartbeat Lease small, reports
//! every volume's use in usage shards, `localnfs status` shows it, and nothing but the
//! heartbeat is written while the volumes sit still (the agent's key is in a Lease of
//! its own, written once).

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, PostParams};
use localnfs::objects::keys::{AGENT_KEY, NODE_KEY, PROVISIONED_BY, SIZE, USED_BYTES, VOLUME_KEY};
use localnfs::objects::usage::{USAGE_SHARDS, node_usage, shard_count};
use localnfs::volume::{VolumeName, VolumeSpec, VolumeStore};
use localnfs_testbed::{TestCluster, kubelet};
use serde_json::json;
use support::cluster::{HEARTBEATS, Localnfs, status};
use support::eventually;

const VOLUMES: usize = 3000;
const MIB: u64 = 1 << 20;

fn volume(i: usize) -> String {
    format!("pvc-{i:08x}-0000-4000-8000-000000000000")
}

/// A PV as the controller would have made it for `volume` on `node`.
async fn our_pv(client: &kube::Client, node: &str, volume: &str) {
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": volume, "annotations": {
            PROVISIONED_BY: "localnfs.io/nfs", NODE_KEY: node, VOLUME_KEY: volume,
            SIZE: (4 * MIB).to_string()}},
        "spec": {"capacity": {"storage": "4Mi"}, "accessModes": ["ReadWriteOnce"],
                 "nfs": {"server": "127.0.0.1", "path": format!("/{volume}")}},
    }))
    .expect("pv");
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .expect("create PV");
}

#[tokio::test]
async fn usage_of_3000_volumes_on_one_node_reaches_status_while_the_heartbeat_stays_small() {
    let cluster = TestCluster::start().await.expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    let node = "node-1";
    let store = VolumeStore::open(&lnfs.root(node)).expect("store");
    for i in 0..VOLUMES {
        let name = VolumeName::new(&volume(i)).expect("name");
        store
            .create(&VolumeSpec::new(name, 4 * MIB))
            .expect("create volume");
    }
    // One volume holds 1 MiB when the agent starts (it charges what is on disk).
    let full = VolumeName::new(&volume(7)).expect("name");
    std::fs::write(store.data_dir(&full).join("blob"), vec![7u8; MIB as usize]).expect("write");
    drop(store);

    let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 71, 1));
    kubelet::add_node(&client, node, ip).await.expect("node");
    lnfs.start_agent(node, ip);
    let leases: Api<Lease> = Api::namespaced(client.clone(), HEARTBEATS);
    let want_shards = shard_count(VOLUMES);
    assert!(want_shards > 1, "more than one shard's worth");
    let heartbeat_name = format!("localnfs-node-{node}");
    let usage = eventually(
        "every volume's use reported",
        Duration::from_secs(120),
        || async {
            let all = localnfs::kubeclient::list_all(&leases, &Default::default())
                .await
                .ok()?;
            let hb = all
                .iter()
                .find(|l| l.metadata.name.as_deref() == Some(&heartbeat_name))?;
            let usage = node_usage(node, hb, &all);
            (usage.len() == VOLUMES).then_some((hb.clone(), usage))
        },
    )
    .await;
    let (hb, usage) = usage;
    let ann = hb.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        ann.get(USAGE_SHARDS).map(String::as_str),
        Some(want_shards.to_string().as_str())
    );
    assert!(!ann.contains_key(USED_BYTES), "no usage on the heartbeat");
    // Free bytes, NFS port and shard count only: every byte here is rewritten at every
    // renewal of every node (the key, 85 bytes more, is in the key Lease).
    let ann_bytes: usize = ann.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(
        ann_bytes < 128,
        "heartbeat annotations are {ann_bytes} bytes with {VOLUMES} volumes: {ann:?}"
    );
    let key_lease = leases
        .get(&format!("localnfs-key-{node}"))
        .await
        .expect("the agent's key Lease");
    let key = key_lease.metadata.annotations.unwrap_or_default();
    assert_eq!(key.get(AGENT_KEY).map(String::len), Some(64), "{key:?}");
    let full_use = usage[full.as_str()];
    assert!(
        full_use[0].is_some_and(|b| b >= MIB) && full_use[1] == Some(1),
        "{full_use:?}"
    );
    let empty = usage[volume(8).as_str()];
    assert_eq!(empty, [Some(0), Some(0), Some(1024)]);

    // `localnfs status` shows the use of volumes spread over different shards.
    for i in [7, 8, VOLUMES - 1] {
        our_pv(&client, node, &volume(i)).await;
    }
    let table = status(&lnfs.kubeconfig).await;
    let row = |v: &str| {
        table
            .lines()
            .find(|l| l.contains(v))
            .unwrap_or_else(|| panic!("no row for {v}:\n{table}"))
            .to_owned()
    };
    assert!(
        row(full.as_str()).contains("[###.......]  25%   1.0 MiB"),
        "{table}"
    );
    for i in [8, VOLUMES - 1] {
        assert!(
            row(&volume(i)).contains("[..........]   0%       0 B"),
            "{table}"
        );
    }
    let first_line = table.lines().nth(1).unwrap_or_default();
    assert!(
        first_line.starts_with(node) && first_line.contains("up"),
        "{table}"
    );

    // At rest only the heartbeat is written: the usage Leases keep their versions
    // across a renewal.
    let versions = |all: &[Lease]| -> BTreeMap<String, String> {
        all.iter()
            .map(|l| {
                (
                    l.metadata.name.clone().unwrap_or_default(),
                    l.metadata.resource_version.clone().unwrap_or_default(),
                )
            })
            .collect()
    };
    let before = versions(
        &localnfs::kubeclient::list_all(&leases, &Default::default())
            .await
            .expect("leases"),
    );
    eventually("the heartbeat renewed", Duration::from_secs(45), || async {
        let now = leases.get(&heartbeat_name).await.ok()?;
        (now.metadata.resource_version.as_ref() != before.get(&heartbeat_name)).then_some(())
    })
    .await;
    let after = versions(
        &localnfs::kubeclient::list_all(&leases, &Default::default())
            .await
            .expect("leases"),
    );
    let rewritten: Vec<&String> = after
        .iter()
        .filter(|(name, v)| *name != &heartbeat_name && before.get(*name) != Some(v))
        .map(|(name, _)| name)
        .collect();
    assert!(
        rewritten.is_empty(),
        "usage rewritten at rest: {rewritten:?}"
    );
    // The shards, the heartbeat and the key Lease.
    assert_eq!(after.len(), want_shards as usize + 2, "{after:?}");
}
