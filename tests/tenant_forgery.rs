//! A tenant who may create and delete claims, and nothing more, cannot name, make,
//! move or delete a volume through the `localnfs.io/` keys of their claims (issue 22):
//! the controller and the agents act only on what the other signed for that very
//! claim (`objects::signed`), and each volume records the claim it belongs to.
//!
//! Each test is one forgery against the real v1.20.2 control plane, controller and
//! node agent, with no admission webhook (webhooks can be down): the forged keys are
//! written by the tenant as any claim editor can.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use support::cluster::*;
use support::eventually;

/// How long the agent is given to act on a forgery (the attack these tests replay
/// deleted the other claim's volume within 20 s; the agent reacts to a watch event in
/// well under a second).
const ACT: Duration = Duration::from_secs(15);

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A bound claim `name` in `default` with a file in its volume; returns the claim as
/// the API server has it now (annotations included) and the file.
async fn victim(client: &Client, lnfs: &Localnfs, name: &str) -> (PersistentVolumeClaim, PathBuf) {
    let (_, file) = claim_with_data(client, lnfs, name).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    (claims.get(name).await.expect("claim"), file)
}

/// Every `localnfs.io/` label and annotation of `c`, as a tenant reading it (or its
/// saved YAML) would copy them.
fn localnfs_keys(c: &PersistentVolumeClaim) -> (Value, Value) {
    let pick = |m: Option<&std::collections::BTreeMap<String, String>>| {
        let map: serde_json::Map<String, Value> = m
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.starts_with("localnfs.io/"))
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        Value::Object(map)
    };
    (
        pick(c.metadata.labels.as_ref()),
        pick(c.metadata.annotations.as_ref()),
    )
}

async fn namespace(client: &Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
}

/// A claim in `ns` of a class localnfs does not serve (so the controller never looks
/// at it and only the agent could be fooled), carrying `labels` and `annotations` and
/// a finalizer of the tenant's, so it stays around deleted.
fn tenant_claim(ns: &str, name: &str, labels: Value, annotations: Value) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "metadata": {
            "name": name, "namespace": ns, "labels": labels, "annotations": annotations,
            "finalizers": ["tenant.example/hold"],
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "someone-elses",
            "resources": {"requests": {"storage": "1Mi"}},
        },
    }))
    .expect("claim")
}

fn still_there(file: &PathBuf, what: &str) {
    assert_eq!(
        std::fs::read(file).ok().as_deref(),
        Some(&b"rows"[..]),
        "{what}: another claim's data was removed"
    );
}

#[tokio::test]
async fn a_deleted_claim_carrying_a_copy_of_another_claims_keys_removes_nothing_of_it() {
    let (cluster, lnfs) = start_localnfs(&[("node-1", ip(121), "10Gi")]).await;
    let client = cluster.client();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    let (victim, file) = victim(&client, &lnfs, "db-0").await;
    let (labels, mut annotations) = localnfs_keys(&victim);
    assert!(labels.get("localnfs.io/node").is_some(), "{labels}");
    // The copy says the volume was abandoned, with every signature the victim carries.
    annotations["localnfs.io/abandon"] = json!("true");
    annotations["localnfs.io/abandon-signature"] =
        annotations["localnfs.io/volume-ready-signature"].clone();

    // Another namespace: the tenant has no rights over `default`.
    namespace(&client, "tenant").await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "tenant");
    claims
        .create(
            &PostParams::default(),
            &tenant_claim("tenant", "thief", labels, annotations),
        )
        .await
        .expect("create the tenant's claim");
    claims
        .delete("thief", &DeleteParams::default())
        .await
        .expect("delete the tenant's claim");
    tokio::time::sleep(ACT).await;
    still_there(
        &file,
        "a deleted claim carried the victim's keys and an abandon",
    );

    // Let the tenant's claim go: nothing of the victim's goes with it.
    claims
        .patch(
            "thief",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("release the tenant's finalizer");
    tokio::time::sleep(Duration::from_secs(2)).await;
    still_there(&file, "the forged claim went away");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv = pvs
        .get(&format!("pvc-{}", victim.uid().expect("uid")))
        .await
        .expect("victim's PV kept");
    assert!(pv.metadata.deletion_timestamp.is_none());
}

#[tokio::test]
async fn a_hand_written_or_copied_request_on_a_claim_of_another_class_makes_no_volume() {
    let (cluster, lnfs) = start_localnfs(&[("node-1", ip(122), "10Gi")]).await;
    let client = cluster.client();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    let (victim, file) = victim(&client, &lnfs, "db-0").await;
    let before = volume_dirs(&lnfs, "node-1");
    let (labels, copied) = localnfs_keys(&victim);

    // A request written by hand: a 1 TiB volume outside any reservation.
    let request = json!({"name": "pvc-hand-made", "sizeBytes": 1u64 << 40, "uid": 0, "gid": 0,
        "mode": 511, "squash": "none", "anonUid": 65534, "anonGid": 65534,
        "claimUid": "whatever", "node": "node-1"});
    let hand = json!({"localnfs.io/volume-request": request.to_string(),
                      "localnfs.io/volume-request-signature": "00".repeat(64)});
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    for (name, annotations) in [("hand", hand), ("copy", copied)] {
        claims
            .create(
                &PostParams::default(),
                &tenant_claim("default", name, labels.clone(), annotations),
            )
            .await
            .expect("create the tenant's claim");
    }
    tokio::time::sleep(ACT).await;
    assert_eq!(
        volume_dirs(&lnfs, "node-1"),
        before,
        "a volume was made for a forged request"
    );
    let hand = claims.get("hand").await.expect("claim");
    assert!(
        !hand.annotations().contains_key("localnfs.io/volume-ready"),
        "the agent answered a hand-written request"
    );
    // The copy keeps exactly what the tenant wrote: no answer of the agent's for it.
    let copy = claims.get("copy").await.expect("claim");
    assert_eq!(localnfs_keys(&copy).1, localnfs_keys(&victim).1);
    still_there(&file, "forged requests");
}

#[tokio::test]
async fn a_claim_recreated_from_saved_yaml_gets_its_own_volume_not_the_originals() {
    let (cluster, lnfs) = start_localnfs(&[("node-1", ip(123), "10Gi")]).await;
    let client = cluster.client();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    let (orig, file) = victim(&client, &lnfs, "db-0").await;
    let orig_pv = bound_pv(&client, "db-0").await;

    // The saved YAML of a bound claim, restored under a new name (a namespace copy,
    // a restore): every key of ours, but not the binding to the original's PV.
    let (labels, annotations) = localnfs_keys(&orig);
    assert!(
        annotations.get("localnfs.io/volume-ready").is_some(),
        "{annotations}"
    );
    let mut copy = claim("db-0-restored", "now", "1Mi", json!({}));
    copy.metadata.labels = serde_json::from_value(labels).ok();
    copy.metadata.annotations = serde_json::from_value(annotations).ok();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    claims
        .create(&PostParams::default(), &copy)
        .await
        .expect("create the restored claim");
    let pv = bound_pv(&client, "db-0-restored").await;
    let (_, _, path) = nfs_target(&pv);
    assert_ne!(
        path,
        nfs_target(&orig_pv).2,
        "the copy's PV points at the original's directory"
    );
    let copy = claims.get("db-0-restored").await.expect("claim");
    assert_eq!(path, format!("pvc-{}", copy.uid().expect("uid")));
    let evs = eventually(
        "IgnoredAnnotations event",
        Duration::from_secs(30),
        || async {
            let e = events(&client, "db-0-restored").await;
            e.iter()
                .any(|(r, _)| r == "IgnoredAnnotations")
                .then_some(e)
        },
    )
    .await;
    assert!(
        evs.iter()
            .any(|(_, m)| m.contains("localnfs.io/volume-request")),
        "{evs:?}"
    );

    // Deleting the copy removes its own volume and nothing of the original's.
    claims
        .delete("db-0-restored", &DeleteParams::default())
        .await
        .expect("delete the copy");
    wait_pv_gone(&client, &pv.name_any()).await;
    eventually(
        "the copy's directory removed",
        Duration::from_secs(30),
        || async { (!volume_dirs(&lnfs, "node-1").contains(&path)).then_some(()) },
    )
    .await;
    still_there(&file, "the restored copy was deleted");
}

#[tokio::test]
async fn volumes_of_the_previous_version_gain_their_owner_record_and_are_reclaimed() {
    let (cluster, mut lnfs) = start_localnfs(&[("node-1", ip(124), "10Gi")]).await;
    let client = cluster.client();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    let (orig, _file) = victim(&client, &lnfs, "db-0").await;
    let volume = nfs_target(&bound_pv(&client, "db-0").await).2;
    let meta_path = lnfs
        .root("node-1")
        .join("meta")
        .join(format!("{volume}.json"));
    let owner = |path: &PathBuf| -> Option<String> {
        let meta: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        meta.pointer("/owner/claim_uid")?
            .as_str()
            .map(str::to_owned)
    };
    assert_eq!(
        owner(&meta_path),
        orig.uid(),
        "a new volume records its claim"
    );

    // As the previous version left it: no owner record.
    lnfs.stop_agent("node-1").await;
    let mut meta: Value =
        serde_json::from_slice(&std::fs::read(&meta_path).expect("meta")).expect("json");
    meta.as_object_mut().expect("object").remove("owner");
    std::fs::write(&meta_path, serde_json::to_vec(&meta).expect("encode")).expect("write meta");
    lnfs.start_agent("node-1", ip(124));
    eventually(
        "the owner record gained from the PV",
        Duration::from_secs(60),
        || async { (owner(&meta_path) == orig.uid()).then_some(()) },
    )
    .await;

    Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .delete("db-0", &DeleteParams::default())
        .await
        .expect("delete claim");
    eventually("the volume reclaimed", Duration::from_secs(90), || async {
        (!volume_dirs(&lnfs, "node-1").contains(&volume)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_node_whose_disk_was_replaced_makes_no_empty_volume_for_a_bound_claim() {
    let (cluster, mut lnfs) = start_localnfs(&[("node-1", ip(125), "10Gi")]).await;
    let client = cluster.client();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    let (_orig, _file) = victim(&client, &lnfs, "db-0").await;
    let pv = bound_pv(&client, "db-0").await;
    let volume = nfs_target(&pv).2;

    // The node's disk is replaced: the volume, its record and the agent's key are gone.
    lnfs.stop_agent("node-1").await;
    let root = lnfs.root("node-1");
    std::fs::remove_dir_all(root.join("volumes").join(&volume)).expect("remove volume");
    std::fs::remove_file(root.join("meta").join(format!("{volume}.json"))).expect("remove meta");
    std::fs::remove_file(root.join("agent.key")).expect("remove key");
    lnfs.start_agent("node-1", ip(125));

    let evs = eventually("VolumeMissing event", Duration::from_secs(60), || async {
        let e = pv_events(&client, &pv.name_any()).await;
        e.iter().any(|(r, _)| r == "VolumeMissing").then_some(e)
    })
    .await;
    assert!(evs.iter().any(|(_, m)| m.contains(&volume)), "{evs:?}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !volume_dirs(&lnfs, "node-1").contains(&volume),
        "an empty volume was made under a bound claim whose data is gone"
    );
}
