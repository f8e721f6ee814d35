//! What makes a claim or PV worth reconciling. Two watches (every claim; our PVs) keep
//! one fingerprint per object: a hash of the parts the reconcilers act on (labels,
//! annotations, finalizers, deletion, spec, phase). An event whose fingerprint changed
//! queues the object's key; status-only writes, our own included, queue nothing. The
//! objects themselves are dropped as they arrive, so 5,000 claims and PVs cost the
//! controller a few hundred kilobytes, not the tens of megabytes of cached copies.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::pods::Usage;
use super::queue::{ClaimKey, WorkQueue};
use super::volumes::{PvAction, decide};
use crate::objects::keys::PROVISIONED_BY;

fn hash_json(v: &serde_json::Value) -> u64 {
    let mut h = DefaultHasher::new();
    serde_json::to_vec(v).unwrap_or_default().hash(&mut h);
    h.finish()
}

fn meta_parts<K: Resource>(obj: &K) -> serde_json::Value {
    let m = obj.meta();
    json!([m.labels, m.annotations, m.finalizers, m.deletion_timestamp])
}

/// What the claim reconciler acts on; not its status beyond the phase.
pub fn claim_fingerprint(pvc: &PersistentVolumeClaim) -> u64 {
    let phase = pvc.status.as_ref().and_then(|s| s.phase.as_deref());
    hash_json(&json!([meta_parts(pvc), pvc.spec, phase]))
}

/// What the PV side acts on: phase (Released), sizes, capacity, claim, deletion.
pub fn pv_fingerprint(pv: &PersistentVolume) -> u64 {
    let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
    let spec = pv.spec.as_ref();
    hash_json(&json!([
        meta_parts(pv),
        spec.and_then(|s| s.capacity.as_ref()),
        spec.and_then(|s| s.claim_ref.as_ref()),
        spec.and_then(|s| s.persistent_volume_reclaim_policy.as_deref()),
        phase
    ]))
}

/// Watches `api`, calling `changed` for each object whose fingerprint is new or
/// different and `gone` for each deleted one, until `stop`. After a relist, objects no
/// longer there are forgotten (without `gone`: their deletion was not seen).
async fn watch_fingerprints<K, Key>(
    api: Api<K>,
    config: watcher::Config,
    fingerprint: fn(&K) -> u64,
    key: fn(&K) -> Key,
    mut changed: impl FnMut(&K),
    mut gone: impl FnMut(&K),
    stop: CancellationToken,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    Key: Eq + Hash,
{
    let mut seen: HashMap<Key, u64> = HashMap::new();
    let mut relist: Option<HashMap<Key, u64>> = None;
    let events = watcher(api, config)
        .default_backoff()
        .take_until(stop.cancelled_owned());
    tokio::pin!(events);
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "watch failed; retrying");
                continue;
            }
        };
        match event {
            watcher::Event::Init => relist = Some(HashMap::new()),
            watcher::Event::InitApply(obj) | watcher::Event::Apply(obj) => {
                let (k, fp) = (key(&obj), fingerprint(&obj));
                if seen.insert(k, fp) != Some(fp) {
                    changed(&obj);
                }
                if let Some(r) = relist.as_mut() {
                    r.insert(key(&obj), fp);
                }
            }
            watcher::Event::InitDone => {
                if let Some(r) = relist.take() {
                    seen = r;
                }
            }
            watcher::Event::Delete(obj) => {
                seen.remove(&key(&obj));
                gone(&obj);
            }
        }
    }
}

fn claim_key(pvc: &PersistentVolumeClaim) -> ClaimKey {
    (pvc.namespace().unwrap_or_default(), pvc.name_any())
}

/// Queues every claim whose fingerprint changes.
pub async fn watch_claims(
    client: kube::Client,
    claims: Arc<WorkQueue<ClaimKey>>,
    stop: CancellationToken,
) {
    watch_fingerprints(
        Api::<PersistentVolumeClaim>::all(client),
        watcher::Config::default(),
        claim_fingerprint,
        claim_key,
        |pvc| claims.add(claim_key(pvc)),
        |_| {},
        stop,
    )
    .await;
}

/// Where [`watch_pvs`] sends what it sees.
pub struct PvQueues {
    /// The claims of changed PVs.
    pub claims: Arc<WorkQueue<ClaimKey>>,
    /// PVs due for deletion.
    pub pvs: Arc<WorkQueue<String>>,
    /// PVs whose published nodes need a look (see `pods`).
    pub publish: Arc<WorkQueue<String>>,
    pub usage: Arc<Usage>,
}

/// Watches our PVs (`config` selects them): a change queues the PV's claim, a PV
/// that is due for deletion goes on `pvs`, and one whose published nodes would change
/// on `publish`.
pub async fn watch_pvs(
    client: kube::Client,
    config: watcher::Config,
    provisioner: String,
    queues: PvQueues,
    stop: CancellationToken,
) {
    let PvQueues {
        claims,
        pvs,
        publish,
        usage,
    } = queues;
    watch_fingerprints(
        Api::<PersistentVolume>::all(client),
        config,
        pv_fingerprint,
        |pv: &PersistentVolume| pv.name_any(),
        |pv| {
            let claim = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
            if let Some((Some(ns), Some(name))) =
                claim.map(|r| (r.namespace.clone(), r.name.clone()))
            {
                claims.add((ns, name));
            }
            if decide(pv, &provisioner) == PvAction::Delete {
                pvs.add(pv.name_any());
            }
            let ours = pv.annotations().get(PROVISIONED_BY) == Some(&provisioner);
            if ours && usage.pv_seen(pv) {
                publish.add(pv.name_any());
            }
        },
        |pv| usage.pv_gone(&pv.name_any()),
        stop,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(
        annotations: serde_json::Value,
        phase: &str,
        conditions: bool,
    ) -> PersistentVolumeClaim {
        let mut status = json!({"phase": phase, "capacity": {"storage": "1Gi"}});
        if conditions {
            status["conditions"] = json!([{"type": "Resizing", "status": "True"}]);
        }
        serde_json::from_value(json!({
            "metadata": {"name": "c", "namespace": "n", "resourceVersion": "7",
                         "annotations": annotations},
            "spec": {"storageClassName": "localnfs", "resources": {"requests": {"storage": "1Gi"}}},
            "status": status,
        }))
        .expect("claim")
    }

    #[test]
    fn what_the_reconciler_acts_on_changes_the_fingerprint_and_status_noise_does_not() {
        let base = claim(json!({"a": "1"}), "Pending", false);
        let fp = claim_fingerprint(&base);
        assert_eq!(fp, claim_fingerprint(&base.clone()), "stable");
        let mut rv = base.clone();
        rv.metadata.resource_version = Some("8".into());
        assert_eq!(
            claim_fingerprint(&rv),
            fp,
            "a new resourceVersion alone is noise"
        );
        assert_eq!(
            claim_fingerprint(&claim(json!({"a": "1"}), "Pending", true)),
            fp,
            "status conditions are noise"
        );
        assert_ne!(
            claim_fingerprint(&claim(json!({"a": "2"}), "Pending", false)),
            fp
        );
        assert_ne!(
            claim_fingerprint(&claim(json!({"a": "1"}), "Bound", false)),
            fp
        );
        let mut bigger = base.clone();
        if let Some(spec) = bigger.spec.as_mut() {
            spec.volume_name = Some("pv".into());
        }
        assert_ne!(claim_fingerprint(&bigger), fp);
        let mut deleting = base.clone();
        deleting.metadata.finalizers = Some(vec!["x".into()]);
        assert_ne!(claim_fingerprint(&deleting), fp);
    }
}
