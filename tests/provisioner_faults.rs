//! Faults: the leader dies, processes restart mid-provisioning, the API server
//! restarts. Afterwards there is exactly one PV per claim and no orphan directory.

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use localnfs_testbed::{TestCluster, kubelet};
use serde_json::json;
use support::cluster::*;
use support::eventually;

const WAIT: Duration = Duration::from_secs(180);

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn claim(name: &str) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "now",
            "resources": {"requests": {"storage": "1Mi"}},
        },
    }))
    .expect("claim")
}

#[tokio::test]
async fn a_standby_controller_takes_over_within_15_seconds() {
    let cluster = TestCluster::start().await.expect("control plane");
    let client = cluster.client();
    kubelet::add_node(&client, "node-1", ip(71))
        .await
        .expect("node");
    let mut lnfs = Localnfs::new(&cluster).await;
    lnfs.start_agent("node-1", ip(71));
    lnfs.start_controller();
    lnfs.start_controller();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    let (first, leader_pid) = wait_for_leader(&client).await;
    let idx = lnfs.controller_with_pid(leader_pid);

    lnfs.kill_controller(idx).await;
    let killed = Instant::now();
    let next = eventually("a new leader", WAIT, || async {
        leader_holder(&client).await.filter(|h| *h != first)
    })
    .await;
    let takeover = killed.elapsed();
    eprintln!(
        "leader {first} killed; {next} took over after {:.1} s",
        takeover.as_secs_f64()
    );
    assert!(
        takeover < Duration::from_secs(15),
        "takeover took {takeover:?}"
    );

    // The new leader actually provisions.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    claims
        .create(&PostParams::default(), &claim("after"))
        .await
        .expect("create");
    eventually("claim Bound under the new leader", WAIT, || async {
        (claims.get("after").await.ok()?.status?.phase? == "Bound").then_some(())
    })
    .await;
}

#[tokio::test]
async fn provisioning_finishes_through_controller_agent_and_apiserver_restarts() {
    let mut cluster = TestCluster::start().await.expect("control plane");
    let client = cluster.client();
    kubelet::add_node(&client, "node-1", ip(81))
        .await
        .expect("node");
    let mut lnfs = Localnfs::new(&cluster).await;
    lnfs.start_agent("node-1", ip(81));
    let mut ctl = lnfs.start_controller();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    wait_for_heartbeat(&client, "node-1").await;

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let names: Vec<String> = (0..20).map(|i| format!("c{i:02}")).collect();
    for (i, name) in names.iter().enumerate() {
        claims
            .create(&PostParams::default(), &claim(name))
            .await
            .expect("create");
        // Kill things between steps while claims are in every stage.
        match i {
            4 | 12 => {
                lnfs.kill_controller(ctl).await;
                ctl = lnfs.start_controller();
            }
            8 => {
                lnfs.stop_agent("node-1").await;
                lnfs.start_agent("node-1", ip(81));
            }
            15 => cluster
                .restart("kube-apiserver")
                .await
                .expect("apiserver restarts"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    lnfs.kill_controller(ctl).await;
    lnfs.start_controller();

    let deadline = Instant::now() + WAIT;
    loop {
        let list = claims.list(&ListParams::default()).await;
        let bound = list
            .as_ref()
            .map(|l| {
                l.items
                    .iter()
                    .filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
                    .count()
            })
            .unwrap_or(0);
        if bound == names.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{bound}/{} bound\n{}",
            names.len(),
            lnfs.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let pvs: Vec<PersistentVolume> = Api::<PersistentVolume>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("pvs")
        .items;
    assert_eq!(pvs.len(), names.len(), "exactly one PV per claim");
    let mut volumes = BTreeSet::new();
    for c in claims
        .list(&ListParams::default())
        .await
        .expect("claims")
        .items
    {
        let pv_name = c
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .expect("bound");
        assert_eq!(pv_name, format!("pvc-{}", c.uid().expect("uid")));
        assert!(
            !c.finalizers()
                .iter()
                .any(|f| f == "localnfs.io/provisioning"),
            "finalizer left on {}",
            c.name_any()
        );
        volumes.insert(pv_name);
    }
    let on_disk: BTreeSet<String> = std::fs::read_dir(lnfs.root("node-1").join("volumes"))
        .expect("volumes dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(on_disk, volumes, "orphan or missing directories");
}
