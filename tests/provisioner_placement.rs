//! Where volumes may go, and what happens when they cannot (issue 14 items 3, 4, 5):
//! `allowedTopologies`, claims that name their volume, a scheduler's choice that
//! cannot take the volume.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use localnfs_testbed::{TestCluster, kubelet};
use serde_json::json;
use support::cluster::*;
use support::eventually;

const WAIT: Duration = Duration::from_secs(90);

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

async fn pv_count(client: &Client) -> usize {
    Api::<PersistentVolume>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("pvs")
        .items
        .len()
}

#[tokio::test]
async fn allowed_topologies_are_honoured_and_claims_naming_a_volume_are_left_alone() {
    let (cluster, lnfs) =
        start_localnfs(&[("small", ip(111), "2Gi"), ("big", ip(112), "5Gi")]).await;
    let client = cluster.client();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    storage_class(
        &client,
        "only-small",
        json!({"volumeBindingMode": "Immediate", "allowedTopologies": [{"matchLabelExpressions": [
            {"key": "kubernetes.io/hostname", "values": ["small"]}]}]}),
    )
    .await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    // A statically bound claim: its author named the PV; nothing of ours may follow.
    claims
        .create(
            &PostParams::default(),
            &claim("static", "now", "1Mi", json!({"volumeName": "manual-pv"})),
        )
        .await
        .expect("static");
    claims
        .create(
            &PostParams::default(),
            &claim("zoned", "only-small", "1Gi", json!({})),
        )
        .await
        .expect("zoned");
    let pv = bound_pv(&client, "zoned").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fixed = claims.get("static").await.expect("static");
    assert!(
        !fixed.labels().contains_key("localnfs.io/node")
            && !fixed
                .finalizers()
                .iter()
                .any(|f| f == "localnfs.io/provisioning"),
        "a claim naming its volume was provisioned: {:?}",
        fixed.metadata
    );
    assert_eq!(
        nfs_target(&pv).0,
        ip(111),
        "placed outside allowedTopologies (big has more room)"
    );
    assert_eq!(pv_count(&client).await, 1);
    assert!(volume_dirs(&lnfs, "big").is_empty());
}

#[tokio::test]
async fn a_selected_node_that_cannot_take_the_volume_is_handed_back_to_the_scheduler() {
    let (cluster, _lnfs) = start_localnfs(&[("node-1", ip(121), "10Gi")]).await;
    let client = cluster.client();
    // A node with no localnfs agent, as the scheduler may pick when the extender is
    // not configured.
    kubelet::add_node(&client, "ghost", ip(122))
        .await
        .expect("node");
    storage_class(&client, "wait", json!({})).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let mut c = claim("w", "wait", "1Mi", json!({}));
    c.metadata.annotations = Some(
        [(
            "volume.kubernetes.io/selected-node".to_owned(),
            "ghost".to_owned(),
        )]
        .into(),
    );
    claims
        .create(&PostParams::default(), &c)
        .await
        .expect("create");
    eventually("selected-node annotation removed", WAIT, || async {
        let c = claims.get("w").await.ok()?;
        (!c.annotations()
            .contains_key("volume.kubernetes.io/selected-node"))
        .then_some(())
    })
    .await;
    let evs = events(&client, "w").await;
    assert!(
        evs.iter().any(|(r, m)| r == "ProvisioningFailed"
            && m.contains("node ghost has no running localnfs node agent")
            && m.contains("asking the scheduler to choose another node")),
        "{evs:?}"
    );
    assert_eq!(pv_count(&client).await, 0);
}

#[tokio::test]
async fn claims_waiting_on_a_silent_agent_are_placed_again_or_let_go() {
    let cluster = TestCluster::start().await.expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    for (node, last, cap) in [("alive", 131, "2Gi"), ("dying", 132, "5Gi")] {
        kubelet::add_node(&client, node, ip(last))
            .await
            .expect("node");
        lnfs.start_agent_with(node, ip(last), &["--capacity", cap]);
        wait_for_heartbeat(&client, node).await;
    }
    lnfs.start_controller_with(&["--agent-grace", "1s"]);
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    // The roomier node's agent dies; its lease still says it is alive for a while, so
    // both claims are placed there.
    lnfs.stop_agent("dying").await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    for name in ["moved", "doomed"] {
        claims
            .create(
                &PostParams::default(),
                &claim(name, "now", "1Gi", json!({})),
            )
            .await
            .expect("create");
        eventually(&format!("{name} placed on dying"), WAIT, || async {
            let c = claims.get(name).await.ok()?;
            (c.labels().get("localnfs.io/node")? == "dying").then_some(())
        })
        .await;
    }
    claims
        .delete("doomed", &DeleteParams::default())
        .await
        .expect("delete");

    // Its last heartbeat, as if it had been written with a 3 s lease (an agent's are
    // 90 s, which the test need not wait out): placed again once that lease, counted
    // from when the controller saw the write, and the 1 s grace are over.
    let leases: Api<Lease> = Api::namespaced(client.clone(), HEARTBEATS);
    let renewed = json!({"spec": {"leaseDurationSeconds": 3,
        "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(at(0))}});
    leases
        .patch(
            &localnfs::objects::agents::lease_name("dying"),
            &PatchParams::default(),
            &Patch::Merge(&renewed),
        )
        .await
        .expect("shorten the dead agent's lease");
    eventually("moved Bound", WAIT, || async {
        let c = claims.get("moved").await.ok()?;
        (c.status?.phase.as_deref()? == "Bound").then_some(())
    })
    .await;
    let pv = bound_pv(&client, "moved").await;
    assert_eq!(
        nfs_target(&pv).0,
        ip(131),
        "not placed again on the live node"
    );
    let evs = events(&client, "moved").await;
    assert!(
        evs.iter()
            .any(|(r, m)| r == "ProvisioningFailed" && m.contains("placing the claim again")),
        "{evs:?}"
    );
    eventually("deleted claim let go", WAIT, || async {
        claims.get_opt("doomed").await.ok()?.is_none().then_some(())
    })
    .await;
    let evs = events(&client, "doomed").await;
    assert!(
        evs.iter()
            .any(|(r, m)| r == "VolumeLeftOnNode" && m.contains("node dying")),
        "{evs:?}"
    );
    assert_eq!(volume_dirs(&lnfs, "alive").len(), 1);
}

/// Names of the claims in `default`: (Bound, the rest).
async fn bound_and_pending(claims: &Api<PersistentVolumeClaim>) -> (Vec<String>, Vec<String>) {
    let list = claims.list(&ListParams::default()).await.expect("claims");
    let (bound, rest): (Vec<_>, Vec<_>) = list
        .items
        .into_iter()
        .partition(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"));
    let names = |v: Vec<PersistentVolumeClaim>| v.iter().map(|c| c.name_any()).collect();
    (names(bound), names(rest))
}

#[tokio::test]
async fn a_burst_of_claims_never_places_more_than_a_node_offers() {
    let (cluster, mut lnfs) = start_localnfs(&[("node-1", ip(141), "10Mi")]).await;
    let client = cluster.client();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    wait_for_heartbeat(&client, "node-1").await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    futures::future::join_all((0..20).map(|i| {
        let claims = claims.clone();
        async move {
            claims
                .create(
                    &PostParams::default(),
                    &claim(&format!("c{i:02}"), "now", "1Mi", json!({})),
                )
                .await
                .expect("create")
        }
    }))
    .await;
    // Room for 10: 10 Bound, and each of the other 10 told why.
    eventually("10 Bound and 10 told there is no room", WAIT, || async {
        let (bound, pending) = bound_and_pending(&claims).await;
        if bound.len() != 10 {
            return None;
        }
        for name in &pending {
            let evs = events(&client, name).await;
            if !evs
                .iter()
                .any(|(r, m)| r == "ProvisioningFailed" && m.contains("no node has room"))
            {
                return None;
            }
        }
        Some(())
    })
    .await;
    // Past the holds and a retry: still 10 and 10 directories.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (bound, _) = bound_and_pending(&claims).await;
    assert_eq!(bound.len(), 10, "overcommitted: {bound:?}");
    assert_eq!(volume_dirs(&lnfs, "node-1").len(), 10);
    assert_eq!(pv_count(&client).await, 10);

    // Room appears: the rest bind. With 25Mi the agent reports 15Mi free, of which
    // the first ten's holds (`reserve::HOLD_AFTER_READY`, 45 s from ready) still take
    // 10Mi: five are placed at once, the other five only once those holds have ended
    // (so a hold that never ends fails the test). With exactly 20Mi they were placed a
    // few at a time, one round per hold, over 85 s.
    lnfs.stop_agent("node-1").await;
    lnfs.start_agent_with("node-1", ip(141), &["--capacity", "25Mi"]);
    eventually("all 20 Bound once there is room", 2 * WAIT, || async {
        (bound_and_pending(&claims).await.0.len() == 20).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_volume_the_selected_nodes_agent_refuses_is_handed_back_to_the_scheduler() {
    let (cluster, lnfs) = start_localnfs(&[("node-1", ip(161), "10Gi")]).await;
    let client = cluster.client();
    storage_class(&client, "wait", json!({})).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let created = claims
        .create(
            &PostParams::default(),
            &claim("r", "wait", "1Mi", json!({})),
        )
        .await
        .expect("create");
    // A different volume by the name this claim's volume will have is already there.
    let name = format!("pvc-{}", created.uid().expect("uid"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_localnfs"))
        .args(["volume", "--root"])
        .arg(lnfs.root("node-1"))
        .args(["create", &name, "--size", "2Mi"])
        .output()
        .expect("localnfs volume create");
    assert!(out.status.success(), "{out:?}");
    claims
        .patch(
            "r",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"metadata": {"annotations": {"volume.kubernetes.io/selected-node": "node-1"}}}),
            ),
        )
        .await
        .expect("select node");
    let evs = eventually("refusal handed back to the scheduler", WAIT, || async {
        let e = events(&client, "r").await;
        e.iter()
            .any(|(r, m)| {
                r == "ProvisioningFailed"
                    && m.starts_with("node node-1:")
                    && m.contains("asking the scheduler to choose another node")
            })
            .then_some(e)
    })
    .await;
    let c = claims.get("r").await.expect("claim");
    assert!(
        !c.annotations()
            .contains_key("volume.kubernetes.io/selected-node")
            && !c.labels().contains_key("localnfs.io/node"),
        "{:?} {evs:?}",
        c.metadata
    );
    assert_eq!(pv_count(&client).await, 0);
}

#[tokio::test]
async fn a_node_whose_clock_is_five_minutes_off_takes_volumes_and_keeps_them() {
    let cluster = TestCluster::start().await.expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    // "ahead": a roomy agent whose clock is 5 minutes fast, which beat once and died.
    // "behind": a live agent whose clock is 5 minutes slow, renewing every second.
    let leases: Api<Lease> = Api::namespaced(client.clone(), HEARTBEATS);
    fake_heartbeat(&leases, "ahead", at(300), 100 << 30).await;
    let beating = tokio::spawn({
        let leases = leases.clone();
        async move {
            loop {
                fake_heartbeat(&leases, "behind", at(-300), 10 << 30).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
    lnfs.start_controller_with(&["--agent-grace", "1s"]);
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    // Longer than "ahead"'s 3 s lease after the controller first saw it.
    tokio::time::sleep(Duration::from_secs(6)).await;

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    claims
        .create(
            &PostParams::default(),
            &claim("data", "now", "1Gi", json!({})),
        )
        .await
        .expect("create");
    let placed = || async {
        let c = claims.get("data").await.ok()?;
        c.labels().get("localnfs.io/node").cloned()
    };
    eventually("data placed on the live node", WAIT, || async {
        (placed().await? == "behind").then_some(())
    })
    .await;
    // No agent answers here, so the claim waits on "behind": for many of its 3 s
    // leases and the 1 s grace, and is not placed again, since the node keeps beating.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(placed().await.as_deref(), Some("behind"));
    }
    let evs = events(&client, "data").await;
    assert!(
        !evs.iter()
            .any(|(_, m)| m.contains("placing the claim again")),
        "{evs:?}"
    );
    beating.abort();
}
