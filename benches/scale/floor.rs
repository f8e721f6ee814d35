//! `--floor`: what the control plane alone needs for C claims, with no localnfs at all.
//!
//! The bench itself plays a provisioner that costs nothing: it watches claims and, for
//! each new one, POSTs a PV already bound to it (its `claimRef` with the claim's uid,
//! the one write any external provisioner must make), and when a claim's watch event
//! says it was deleted it DELETEs that PV at once (no read, no check, no directory).
//! Two ways to finish the binding (`--floor binder|self`):
//! - `binder`: kube-controller-manager's PV binder does it, as for the external
//!   provisioners (claim `volumeName` and annotations, both phases; one claim at a
//!   time);
//! - `self`: the bench does it right after the PV, the same three writes localnfs's
//!   controller makes (`provisioner::claims`, `complete_binding`), 32 claims at once.
//!
//! kube-controller-manager does the rest as for any provisioner's claims (annotates the
//! claim, marks PVs Released, lets claims and PVs go through their protection
//! finalizers), at the same `--kcm-qps` as the real rows. So the time to all Bound and
//! to all PVs gone here is what the API server, etcd and kube-controller-manager take
//! for the claims' own requests: the real rows are compared against it.

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;

use super::burst::create_all;
use super::support::cluster::storage_class;
use super::{apiserver_metrics, requests};

/// What one floor run measured.
pub struct Floor {
    pub claims: usize,
    /// Until the last claim's POST was answered.
    pub created: f64,
    pub all_bound: f64,
    /// All requests per claim over the burst, and the top (verb resource, count).
    pub per_claim: f64,
    pub top: Vec<(String, f64)>,
    /// From the first DELETE until no PV is left.
    pub pvs_gone: f64,
    pub delete_per_claim: f64,
    pub delete_top: Vec<(String, f64)>,
    /// CPU cores the machine had in use over the burst (all processes).
    pub machine_cores: f64,
}

/// A PV for `claim` as a provisioner makes one: bound to it by uid, the class's
/// provisioner named, an NFS source nobody mounts.
fn pv_for(claim: &PersistentVolumeClaim) -> PersistentVolume {
    let uid = claim.uid().unwrap_or_default();
    serde_json::from_value(json!({
        "metadata": {"name": format!("pvc-{uid}"),
                     "annotations": {"pv.kubernetes.io/provisioned-by": "localnfs.io/nfs"}},
        "spec": {
            "capacity": {"storage": "4Mi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": "bench",
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                         "namespace": claim.namespace().unwrap_or_default(),
                         "name": claim.name_any(), "uid": uid},
            "nfs": {"server": "127.0.0.1", "path": "/floor"},
        },
    }))
    .expect("PV")
}

/// The claim and PV writes that finish a binding, as localnfs's controller makes them.
async fn bind(client: &Client, claim: &PersistentVolumeClaim, pv: &str) -> kube::Result<()> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let name = claim.name_any();
    let merge = |v| Patch::Merge(v);
    claims
        .patch(
            &name,
            &PatchParams::default(),
            &merge(json!({
                "metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes",
                                             "pv.kubernetes.io/bound-by-controller": "yes"}},
                "spec": {"volumeName": pv},
            })),
        )
        .await?;
    let params = PatchParams::default();
    let pv_status = merge(json!({"status": {"phase": "Bound"}}));
    let claim_status = merge(json!({"metadata": {"uid": claim.uid()},
                                    "status": {"phase": "Bound", "accessModes": ["ReadWriteOnce"],
                                               "capacity": {"storage": "4Mi"}}}));
    let (a, b) = tokio::join!(
        pvs.patch_status(pv, &params, &pv_status),
        claims.patch_status(&name, &params, &claim_status)
    );
    a.and(b).map(drop)
}

/// The provisioner that costs nothing: one POST per new claim (and the binding's
/// writes if `binds`), one DELETE per deleted claim, 32 claims at a time in all. It
/// panics (and the run stops, see [`run`]'s waits) on any answer but 409 and 404.
/// A delete event missed while the watch lists again (its resource version expired)
/// would leave that PV: the run then waits out its hour.
fn provisioner(client: Client, binds: bool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        watcher(claims, watcher::Config::default())
            .filter_map(|e| async move {
                match e.ok()? {
                    watcher::Event::Apply(c) | watcher::Event::InitApply(c)
                        if c.metadata.resource_version.is_some()
                            && c.spec.as_ref()?.volume_name.is_none()
                            && c.metadata.deletion_timestamp.is_none() =>
                    {
                        Some((true, c))
                    }
                    watcher::Event::Delete(c) => Some((false, c)),
                    _ => None,
                }
            })
            .map(|(made, c)| {
                let (pvs, client) = (pvs.clone(), client.clone());
                async move {
                    let pv = pv_for(&c);
                    let res = if made {
                        match pvs.create(&PostParams::default(), &pv).await {
                            Ok(_) if binds => bind(&client, &c, &pv.name_any()).await,
                            other => other.map(drop),
                        }
                    } else {
                        pvs.delete(&pv.name_any(), &DeleteParams::default())
                            .await
                            .map(drop)
                    };
                    match res {
                        // A claim updated again before it was bound (kcm's annotation)
                        // comes back here: its PV is already there.
                        Ok(()) => {}
                        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
                        Err(e) => panic!("floor provisioner: {e}"),
                    }
                }
            })
            .buffer_unordered(32)
            .for_each(|()| async {})
            .await;
    })
}

/// All requests per claim, and the top ten.
fn summed(mut top: Vec<(String, f64)>) -> (f64, Vec<(String, f64)>) {
    let all = top.iter().map(|(_, v)| v).sum();
    top.truncate(10);
    (all, top)
}

/// Fails the run if the hour since `start` is up (`what` is still true) or the
/// provisioner stopped.
fn going(start: Instant, provisioning: &tokio::task::JoinHandle<()>, what: &str) {
    assert!(
        start.elapsed() < Duration::from_secs(3600),
        "floor: {what} after an hour"
    );
    assert!(
        !provisioning.is_finished(),
        "floor: the provisioner stopped"
    );
}

pub async fn run(count: usize, kcm_qps: Option<u32>, in_flight: usize, binds: bool) -> Floor {
    let cluster = super::control_plane(kcm_qps).await;
    let client = cluster.client();
    storage_class(&client, "bench", json!({"volumeBindingMode": "Immediate"})).await;
    let (bound_at, watch) = super::watch_bound(&client);
    let provisioning = provisioner(client.clone(), binds);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = requests(&apiserver_metrics(&client).await);
    let jiffies = super::machine_jiffies();
    let start = Instant::now();
    create_all(client.clone(), count, false, in_flight).await;
    let created = start.elapsed().as_secs_f64();
    while bound_at.lock().expect("lock").len() < count {
        going(start, &provisioning, "not all Bound");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_bound = start.elapsed().as_secs_f64();
    let machine_cores = super::cores_busy_since(jiffies);
    let after = requests(&apiserver_metrics(&client).await);
    let (per, top) = summed(super::per_claim(&before, &after, count));
    eprintln!(
        "floor: created {created:.1} s, all Bound {all_bound:.1} s, {per:.2} requests a claim: {top:?}"
    );
    watch.abort();

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let before = requests(&apiserver_metrics(&client).await);
    let start = Instant::now();
    super::delete_claims(
        &claims,
        (0..count).map(|i| format!("claim-{i:05}")).collect(),
    )
    .await;
    loop {
        going(start, &provisioning, "PVs left");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let left = (pvs.list_metadata(&ListParams::default().limit(1)).await)
            .expect("PVs")
            .items
            .len();
        if left == 0 {
            break;
        }
    }
    let pvs_gone = start.elapsed().as_secs_f64();
    let after = requests(&apiserver_metrics(&client).await);
    let mut delete = super::per_claim(&before, &after, count);
    // The wait's own LISTs are the bench's, not the delete's.
    delete.retain(|(k, _)| !k.starts_with("LIST persistentvolume"));
    let (delete_per_claim, delete_top) = summed(delete);
    eprintln!("floor: PVs gone {pvs_gone:.1} s, {delete_per_claim:.2} requests a claim");
    provisioning.abort();
    Floor {
        claims: count,
        created,
        all_bound,
        per_claim: per,
        top,
        pvs_gone,
        delete_per_claim,
        delete_top,
        machine_cores,
    }
}

pub fn print(rows: &[Floor], kcm_qps: Option<u32>, in_flight: usize, binds: bool) {
    println!(
        "\nscale --floor {}: C claims created at once ({in_flight} in flight) with no localnfs (the bench POSTs each claim's PV{} and DELETEs it on the claim's delete; kube-controller-manager {}), then all deleted\n",
        if binds { "self" } else { "binder" },
        if binds {
            " and binds the pair itself"
        } else {
            ", kube-controller-manager's binder binds"
        },
        kcm_qps.map_or("at its default client rate".to_owned(), |q| format!(
            "--kube-api-qps={q}"
        ))
    );
    println!(
        "| claims | all created s | all Bound s | claims/s | API req/claim | machine cores busy | delete → PVs gone s | delete req/claim |"
    );
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in rows {
        println!(
            "| {} | {:.1} | {:.1} | {:.0} | {:.1} | {:.2} | {:.1} | {:.1} |",
            r.claims,
            r.created,
            r.all_bound,
            r.claims as f64 / r.all_bound,
            r.per_claim,
            r.machine_cores,
            r.pvs_gone,
            r.delete_per_claim
        );
    }
    for r in rows {
        println!(
            "\nrequests per claim, {} claims (create | delete):",
            r.claims
        );
        let n = r.top.len().max(r.delete_top.len());
        for i in 0..n {
            let cell = |v: &[(String, f64)]| {
                v.get(i)
                    .map_or(String::new(), |(k, c)| format!("{k:<34} {c:5.2}"))
            };
            println!("  {:<42} | {}", cell(&r.top), cell(&r.delete_top));
        }
    }
}
