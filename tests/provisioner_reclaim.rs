//! Reclaim never destroys live data: a PV
//! deleted while its claim exists keeps its data until the claim goes, whichever is
//! deleted first and whether or not the node agent restarts in between; an `onDelete`
//! annotation we do not know keeps the data.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use support::cluster::*;
use support::eventually;

const WAIT: Duration = Duration::from_secs(90);

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn still_there(file: &PathBuf, what: &str) {
    assert_eq!(
        std::fs::read(file).ok().as_deref(),
        Some(&b"rows"[..]),
        "{what}: data that must be kept was removed"
    );
}

#[tokio::test]
async fn deleting_a_bound_pv_keeps_its_data_until_the_claim_is_deleted() {
    let (cluster, mut lnfs) = start_localnfs(&[("node-1", ip(101), "10Gi")]).await;
    let client = cluster.client();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    let (pv, file) = claim_with_data(&client, &lnfs, "live").await;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");

    // `kubectl delete pv` on a Bound PV whose class says Delete.
    pvs.delete(&pv.name_any(), &DeleteParams::default())
        .await
        .expect("delete PV");
    tokio::time::sleep(Duration::from_secs(5)).await;
    still_there(&file, "PV deleted while Bound");
    let terminating = pvs.get(&pv.name_any()).await.expect("PV kept while Bound");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    let evs = eventually("VolumeInUse event", WAIT, || async {
        let e = pv_events(&client, &pv.name_any()).await;
        e.iter().any(|(r, _)| r == "VolumeInUse").then_some(e)
    })
    .await;
    assert!(
        evs.iter().any(|(_, m)| m.contains("default/live")),
        "{evs:?}"
    );

    // The agent restarting sees the same Terminating PV and still keeps the data.
    lnfs.stop_agent("node-1").await;
    lnfs.start_agent_with("node-1", ip(101), &["--capacity", "10Gi"]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    still_there(&file, "agent restarted with the PV Terminating");
    assert_eq!(
        claims
            .get("live")
            .await
            .expect("claim")
            .status
            .and_then(|s| s.phase),
        Some("Bound".into())
    );

    // The claim goes: now the PV is released and reclaim proceeds.
    claims
        .delete("live", &DeleteParams::default())
        .await
        .expect("delete claim");
    wait_pv_gone(&client, &pv.name_any()).await;
    assert!(
        !file.exists() && volume_dirs(&lnfs, "node-1").is_empty(),
        "directory left after reclaim: {:?}\n{}",
        volume_dirs(&lnfs, "node-1"),
        lnfs.logs()
    );
}

#[tokio::test]
async fn deleting_the_claim_first_reclaims_after_an_agent_restart_and_unknown_on_delete_keeps_data()
{
    let (cluster, mut lnfs) = start_localnfs(&[("node-1", ip(102), "10Gi")]).await;
    let client = cluster.client();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    let (pv, file) = claim_with_data(&client, &lnfs, "first").await;
    let (odd, odd_file) = claim_with_data(&client, &lnfs, "odd").await;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    // A PV whose onDelete annotation was edited to something we do not know.
    pvs.patch(
        &odd.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"localnfs.io/on-delete": "shred"}}})),
    )
    .await
    .expect("annotate");

    // The agent is down while the claims go: the PVs are Released and deleted, and
    // wait (Terminating) for the agent.
    lnfs.stop_agent("node-1").await;
    for name in ["first", "odd"] {
        claims
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete claim");
    }
    eventually("PV Terminating", WAIT, || async {
        pvs.get(&pv.name_any())
            .await
            .ok()?
            .metadata
            .deletion_timestamp
            .map(|_| ())
    })
    .await;
    still_there(&file, "agent down");
    lnfs.start_agent_with("node-1", ip(102), &["--capacity", "10Gi"]);
    for name in [pv.name_any(), odd.name_any()] {
        eventually(&format!("{name} gone"), WAIT, || async {
            pvs.get_opt(&name).await.ok()?.is_none().then_some(())
        })
        .await;
    }
    assert!(!file.exists(), "released volume not deleted");
    still_there(&odd_file, "unknown onDelete value");
    let evs = pv_events(&client, &odd.name_any()).await;
    assert!(
        evs.iter()
            .any(|(r, m)| r == "VolumeKept" && m.contains("shred")),
        "{evs:?}"
    );
}

#[tokio::test]
async fn deleting_many_claims_at_once_removes_exactly_their_directories_and_keeps_the_rest() {
    let (cluster, lnfs) = start_localnfs(&[("node-1", ip(103), "10Gi")]).await;
    let client = cluster.client();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    const CLAIMS: usize = 30;
    let made = futures::future::join_all((0..CLAIMS).map(|i| {
        let (client, lnfs) = (&client, &lnfs);
        async move { claim_with_data(client, lnfs, &format!("many-{i:02}")).await }
    }))
    .await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    // Two of every three go, all at once; the others must not be touched.
    let goes = |i: usize| i % 3 != 2;
    futures::future::join_all((0..CLAIMS).filter(|i| goes(*i)).map(|i| {
        let claims = claims.clone();
        async move {
            claims
                .delete(&format!("many-{i:02}"), &DeleteParams::default())
                .await
                .expect("delete claim")
        }
    }))
    .await;
    for (i, (pv, _)) in made.iter().enumerate().filter(|(i, _)| goes(*i)) {
        eventually(&format!("PV of many-{i:02} gone"), WAIT, || async {
            pvs.get_opt(&pv.name_any())
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await;
    }
    // Give a wrong removal time to happen before looking at what is left.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut want: Vec<String> = made
        .iter()
        .enumerate()
        .filter(|(i, _)| !goes(*i))
        .map(|(_, (pv, _))| nfs_target(pv).2)
        .collect();
    want.sort();
    let mut left = volume_dirs(&lnfs, "node-1");
    left.sort();
    assert_eq!(left, want, "wrong directories left\n{}", lnfs.logs());
    for (i, (pv, file)) in made.iter().enumerate() {
        if goes(i) {
            assert!(!file.exists(), "many-{i:02}: data left after reclaim");
        } else {
            still_there(file, &format!("many-{i:02}, not deleted"));
            assert!(
                pvs.get_opt(&pv.name_any())
                    .await
                    .expect("read PV")
                    .is_some(),
                "many-{i:02}: PV of a kept claim gone"
            );
        }
    }
}
