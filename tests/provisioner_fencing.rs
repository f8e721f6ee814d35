//! A stalled leader (SIGSTOP) never writes after its standby took over (issue 14 item
//! 2): exactly one PV per claim, one directory per PV, no claim moved to another node
//! once its PV exists.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use localnfs_testbed::{TestCluster, kubelet};
use serde_json::json;
use support::cluster::*;
use support::{eventually, process_exists};

const WAIT: Duration = Duration::from_secs(120);
const CLAIMS: usize = 40;

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Each claim's node label, for claims whose PV exists.
async fn placed(client: &Client) -> BTreeMap<String, String> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let pvs: BTreeSet<String> = Api::<PersistentVolume>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("pvs")
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    claims
        .list(&ListParams::default())
        .await
        .expect("claims")
        .items
        .into_iter()
        .filter(|c| pvs.contains(&format!("pvc-{}", c.uid().unwrap_or_default())))
        .filter_map(|c| Some((c.name_any(), c.labels().get("localnfs.io/node")?.clone())))
        .collect()
}

#[tokio::test]
async fn a_stalled_leader_never_writes_after_the_standby_took_over() {
    let cluster = TestCluster::start().await.expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    for (node, last) in [("node-1", 151), ("node-2", 152)] {
        kubelet::add_node(&client, node, ip(last))
            .await
            .expect("node");
        lnfs.start_agent_with(node, ip(last), &["--capacity", "1Gi"]);
        wait_for_heartbeat(&client, node).await;
    }
    lnfs.start_controller();
    lnfs.start_controller();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    let (first, leader_pid) = wait_for_leader(&client).await;

    // A burst; the leader stalls in the middle of it, with reconciles in flight.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let create = |i: usize| {
        let claims = claims.clone();
        async move {
            let c = serde_json::from_value(json!({
                "metadata": {"name": format!("c{i:02}")},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "now",
                         "resources": {"requests": {"storage": "1Mi"}}},
            }))
            .expect("claim");
            claims
                .create(&PostParams::default(), &c)
                .await
                .expect("create")
        }
    };
    futures::future::join_all((0..CLAIMS / 2).map(create)).await;
    signal(leader_pid, "-STOP");
    futures::future::join_all((CLAIMS / 2..CLAIMS).map(create)).await;
    eventually("a new leader", WAIT, || async {
        leader_holder(&client).await.filter(|h| *h != first)
    })
    .await;
    let before = eventually("every claim has its PV", WAIT, || async {
        let p = placed(&client).await;
        (p.len() == CLAIMS).then_some(p)
    })
    .await;

    // The old leader wakes up: it must give up, not write.
    signal(leader_pid, "-CONT");
    eventually(
        "the stalled leader exits",
        Duration::from_secs(30),
        || async { (!process_exists(leader_pid)).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        placed(&client).await,
        before,
        "a claim moved after its PV existed\n{}",
        lnfs.logs()
    );
    let pvs = Api::<PersistentVolume>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("pvs")
        .items;
    assert_eq!(pvs.len(), CLAIMS, "exactly one PV per claim");
    let mut want: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for pv in &pvs {
        let node = pv.labels().get("localnfs.io/node").expect("node").clone();
        want.entry(node).or_default().insert(nfs_target(pv).2);
    }
    for node in ["node-1", "node-2"] {
        let on_disk: BTreeSet<String> = volume_dirs(&lnfs, node).into_iter().collect();
        assert_eq!(
            on_disk,
            want.remove(node).unwrap_or_default(),
            "{node}: orphan or missing directories"
        );
    }
    eventually(
        "the stalled leader exits",
        Duration::from_secs(30),
        || async { (!process_exists(leader_pid)).then_some(()) },
    )
    .await;
}
