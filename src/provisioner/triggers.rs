//! What makes a claim or PV worth reconciling. Two watches (every claim; our PVs) keep
//! one fingerprint per object: a hash of the parts the reconcilers act on (labels,
//! annotations, finalizers, deletion, spec, phase). An event whose fingerprint changed
//! queues the object's key; status-only writes, our own included, queue nothing.
//!
//! The same watches fill [`Caches`], which the reconcilers read instead of GETting the
//! claim and its PV on every pass (two requests a pass, four or five passes a claim).
//! Objects are trimmed first (`cache::trim`), and a PV is cached as a [`CachedPv`]
//! (only the fields a localnfs PV has): a few KB a claim or PV with their strings, so
//! 10,000 of each are a few tens of megabytes. A store is updated before the event that queues
//! the key is seen, so a reconcile never reads an object older than what woke it; a
//! write decided from a cached copy carries that copy's `resourceVersion` (or a
//! `test` of what it read), so a copy that went stale since fails with a conflict and
//! is retried on the newer copy the watch brings, never written over.
//!
//! The caches lag our own writes: a claim queued again while its reconcile was
//! writing it is read back as it was before that write, and the step it was at
//! decided again (a second claim-status write, or a conditional write that can only
//! fail). So [`Caches`] remembers the `resourceVersion` of our last write to each
//! claim and PV until the cache shows that version ([`Caches::behind`]); a reconcile
//! that would read an older copy waits for the watch event our write brings instead.
//!
//! A new term starts with a list of every claim and PV. Queuing them all would make
//! the new leader read every claim (and its PV) again, tens of thousands of GETs on
//! a large cluster, just when it should be catching up: so the first list queues
//! only claims with something left to do ([`settled`] says which have nothing), and
//! a listed PV queues its claim only while it is not yet Bound or is being deleted
//! (the claim list covers the rest). Changes seen after the list queue as always.
//!
//! Claims an agent has answered (its signature checked: a tenant's forged answer does
//! not count) and claims of changed PVs (only the controller makes our PVs) go to the
//! front of the queue, in the order they came: what is left for them is a PV and the
//! binding. In arrival order, a burst's answers waited
//! behind every placement queued before them: after a failover mid-burst the new
//! leader placed 4,900 claims before it made a single PV (25 s without one, 10,000
//! claims on 100 nodes).

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::Api;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::cached_pv::CachedPv;
use super::pods::Usage;
use super::queue::{ClaimKey, WorkQueue};
use super::volumes::{PvAction, decide};
use crate::kubeclient::has_finalizer;
use crate::objects::claim::{pv_name, requested_bytes};
use crate::objects::class::quantity_bytes;
use crate::objects::keys::{BIND_COMPLETED, CLAIM_FINALIZER, PROVISIONED_BY};

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
pub fn pv_fingerprint(pv: &CachedPv) -> u64 {
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

/// Whether the claim reconciler has nothing left to do for `pvc` until it changes:
/// not being deleted, our finalizer gone, Bound (binding completed) to the PV made for
/// it, and no expansion pending (status capacity at least the request). For such a
/// claim `step::next` ends in `Finish`, which then writes nothing.
pub fn settled(pvc: &PersistentVolumeClaim) -> bool {
    let status = pvc.status.as_ref();
    let capacity = status
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .and_then(|q| quantity_bytes(&q.0).ok());
    let requested = requested_bytes(pvc);
    let uid = pvc.uid().unwrap_or_default();
    pvc.metadata.deletion_timestamp.is_none()
        && !has_finalizer(pvc, CLAIM_FINALIZER)
        && status.and_then(|s| s.phase.as_deref()) == Some("Bound")
        && !uid.is_empty()
        && pvc.spec.as_ref().and_then(|s| s.volume_name.as_deref()) == Some(&pv_name(&uid))
        && pvc.annotations().contains_key(BIND_COMPLETED)
        && matches!((capacity, requested), (Some(c), Some(r)) if c >= r)
}

/// The claims and our PVs as the term's watches last saw them (see the module doc).
#[derive(Clone)]
pub struct Caches {
    pub claims: Store<PersistentVolumeClaim>,
    /// Slim copies (`cached_pv`): [`Caches::pv`] reads them as whole PVs.
    pub pvs: Store<CachedPv>,
    /// Object key (`ns/name` for a claim, the name for a PV) → the resourceVersion our
    /// last write to it returned, until the cache shows it (then the entry goes): a
    /// few entries per claim in flight. An object deleted before its cache caught up
    /// leaves its entry until the term ends (a new term has new caches).
    own_writes: Arc<Mutex<HashMap<String, u64>>>,
}

/// The rule: a cached copy at `cached` (a resourceVersion) is older than our own
/// write at `own`. Versions are compared as numbers: the API server hands out etcd's
/// revisions, which only grow. A version that is not a number, or an object not in
/// the cache at all, never counts as behind, so nothing waits on what it cannot
/// compare.
pub fn behind(cached: Option<&str>, own: Option<u64>) -> bool {
    match (cached.and_then(|v| v.parse::<u64>().ok()), own) {
        (Some(cached), Some(own)) => cached < own,
        _ => false,
    }
}

/// The key [`Caches::wrote`] and [`Caches::behind`] file an object under.
fn own_key<K: Resource>(obj: &K) -> String {
    match &obj.meta().namespace {
        Some(ns) => format!("{ns}/{}", obj.meta().name.as_deref().unwrap_or_default()),
        None => obj.meta().name.clone().unwrap_or_default(),
    }
}

/// The writers [`watch_claims`] and [`watch_pvs`] fill, and the caches they fill.
pub fn caches() -> (Caches, Writer<PersistentVolumeClaim>, Writer<CachedPv>) {
    let (claims, claim_writer) = reflector::store();
    let (pvs, pv_writer) = reflector::store();
    let own_writes = Arc::default();
    (
        Caches {
            claims,
            pvs,
            own_writes,
        },
        claim_writer,
        pv_writer,
    )
}

impl Caches {
    /// Waits until both caches hold their first list (`false`: the watches ended).
    /// Call it from one task only, before the workers start: kube's
    /// `Store::wait_until_ready` wakes only the last of several tasks waiting at once
    /// (one waker in a oneshot channel), which left 48 of 64 claim workers asleep for
    /// good in a 100-node bench when each waited for itself.
    pub async fn ready(&self) -> bool {
        self.claims.wait_until_ready().await.is_ok() && self.pvs.wait_until_ready().await.is_ok()
    }

    /// The claim `ns/name` as last seen (`None`: gone). Only after [`Self::ready`].
    pub fn claim(&self, ns: &str, name: &str) -> Option<Arc<PersistentVolumeClaim>> {
        self.claims.get(&reflector::ObjectRef::new(name).within(ns))
    }

    /// The PV `name` as last seen (`None`: not seen). Only after [`Self::ready`].
    pub fn pv(&self, name: &str) -> Option<PersistentVolume> {
        let cached = self.pvs.get(&reflector::ObjectRef::new(name))?;
        Some(cached.to_pv())
    }

    /// Remembers `written`, as the API server answered our write of it.
    pub fn wrote<K: Resource>(&self, written: &K) {
        let Some(rv) = written.meta().resource_version.as_deref() else {
            return;
        };
        if let Ok(rv) = rv.parse::<u64>() {
            let mut own = self.own_writes.lock().unwrap_or_else(|p| p.into_inner());
            own.insert(own_key(written), rv);
        }
    }

    /// Whether `cached` is older than our own last write to it ([`behind`]); forgets
    /// that write once the cache shows it.
    pub fn behind<K: Resource>(&self, cached: &K) -> bool {
        let key = own_key(cached);
        let mut own = self.own_writes.lock().unwrap_or_else(|p| p.into_inner());
        let stale = behind(
            cached.meta().resource_version.as_deref(),
            own.get(&key).copied(),
        );
        if !stale {
            own.remove(&key);
        }
        stale
    }

    /// Forgets our writes to the claim `ns/name` (it is gone).
    pub fn forget_claim(&self, ns: &str, name: &str) {
        let mut own = self.own_writes.lock().unwrap_or_else(|p| p.into_inner());
        own.remove(&format!("{ns}/{name}"));
    }
}

/// Watches `api` into `writer`'s store, calling `changed` for each object whose
/// fingerprint is new or different (with whether it came in a list rather than as a
/// change) and `gone` for each deleted one, until `stop`. After a relist, objects no
/// longer there are forgotten (without `gone`: their deletion was not seen).
#[expect(
    clippy::too_many_arguments,
    reason = "one private helper for the two watches; a struct would only rename them"
)]
async fn watch_fingerprints<K, Key>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    fingerprint: fn(&K) -> u64,
    key: fn(&K) -> Key,
    mut changed: impl FnMut(&K, bool),
    mut gone: impl FnMut(&K),
    stop: CancellationToken,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    Key: Eq + Hash,
{
    let mut seen: HashMap<Key, u64> = HashMap::new();
    let mut relist: Option<HashMap<Key, u64>> = None;
    // Objects of a list in progress whose fingerprint changed: announced once the list
    // is done, read from the store (swapped in at the list's end). Only their
    // references are kept meanwhile: a new term's list is every claim and PV, and a
    // copy of each held here until the list ended was a second copy of the cluster,
    // next to the reflector's list buffer, at the new leader's peak.
    let store = writer.as_reader();
    let mut listed_changes: Vec<reflector::ObjectRef<K>> = Vec::new();
    let events = watcher(api, config)
        .default_backoff()
        .modify(crate::cache::trim)
        .reflect(writer)
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
                let new = seen.insert(k, fp) != Some(fp);
                if let Some(r) = relist.as_mut() {
                    r.insert(key(&obj), fp);
                    if new {
                        listed_changes.push(reflector::ObjectRef::from_obj(&obj));
                    }
                } else if new {
                    changed(&obj, false);
                }
            }
            watcher::Event::InitDone => {
                if let Some(r) = relist.take() {
                    seen = r;
                }
                for r in std::mem::take(&mut listed_changes) {
                    if let Some(obj) = store.get(&r) {
                        changed(&obj, true);
                    }
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

/// Queues every claim whose fingerprint changes: ahead of the others when
/// `answered` says an agent has made its volume (what is left is its PV and binding,
/// which should not wait behind a burst's placements). `deleted` is called with each
/// claim the watch sees deleted.
pub async fn watch_claims(
    client: kube::Client,
    writer: Writer<PersistentVolumeClaim>,
    claims: Arc<WorkQueue<ClaimKey>>,
    answered: impl Fn(&PersistentVolumeClaim) -> bool,
    deleted: impl FnMut(&PersistentVolumeClaim),
    stop: CancellationToken,
) {
    watch_fingerprints(
        Api::<PersistentVolumeClaim>::all(client),
        watcher::Config::default(),
        writer,
        claim_fingerprint,
        claim_key,
        |pvc, listed| {
            if listed && settled(pvc) {
                return;
            }
            if answered(pvc) {
                claims.add_first(claim_key(pvc));
            } else {
                claims.add(claim_key(pvc));
            }
        },
        deleted,
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
    writer: Writer<CachedPv>,
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
        Api::<CachedPv>::all(client),
        config,
        writer,
        pv_fingerprint,
        |pv: &CachedPv| pv.name_any(),
        |pv, listed| {
            let pv = &pv.to_pv();
            let claim = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
            let bound = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
            let settled = listed && bound && pv.metadata.deletion_timestamp.is_none();
            if let Some((Some(ns), Some(name))) =
                claim.map(|r| (r.namespace.clone(), r.name.clone()))
                && !settled
            {
                // Its claim is bound, or about to be: ahead of placements.
                claims.add_first((ns, name));
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

    #[test]
    fn a_cached_copy_older_than_our_own_write_is_not_acted_on() {
        // (cached version, our last write) → behind.
        let cases = [
            (Some("120"), Some(130), true),
            (Some("130"), Some(130), false),
            (Some("131"), Some(130), false),
            (Some("120"), None, false),
            (None, Some(130), false),
            (Some("not-a-number"), Some(130), false),
        ];
        for (cached, own, want) in cases {
            assert_eq!(behind(cached, own), want, "{cached:?} vs {own:?}");
        }
        let (caches, _, _) = caches();
        let at = |rv: &str| -> PersistentVolumeClaim {
            serde_json::from_value(
                json!({"metadata": {"namespace": "db", "name": "data", "resourceVersion": rv}}),
            )
            .expect("claim")
        };
        caches.wrote(&at("130"));
        assert!(caches.behind(&at("120")), "older than our write");
        assert!(!caches.behind(&at("130")), "caught up");
        caches.wrote(&at("140"));
        caches.forget_claim("db", "data");
        assert!(!caches.behind(&at("120")), "forgotten with the claim");
    }

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
    fn a_new_leader_rereads_only_claims_with_something_left_to_do() {
        let done = || -> PersistentVolumeClaim {
            serde_json::from_value(json!({
                "metadata": {"name": "c", "namespace": "n", "uid": "u1",
                             "annotations": {BIND_COMPLETED: "yes"}},
                "spec": {"volumeName": "pvc-u1", "resources": {"requests": {"storage": "1Gi"}}},
                "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}},
            }))
            .expect("claim")
        };
        assert!(settled(&done()), "bound, released, not growing");
        type Change = fn(&mut PersistentVolumeClaim);
        let cases: [(&str, Change); 7] = [
            ("pending", |c| {
                c.status.as_mut().expect("status").phase = Some("Pending".into())
            }),
            ("still holds our finalizer", |c| {
                c.metadata.finalizers = Some(vec![CLAIM_FINALIZER.into()])
            }),
            ("being deleted", |c| {
                c.metadata.deletion_timestamp =
                    Some(serde_json::from_value(json!("2026-01-01T00:00:00Z")).expect("time"))
            }),
            ("bound to another PV", |c| {
                c.spec.as_mut().expect("spec").volume_name = Some("pv-by-hand".into())
            }),
            ("binding not completed", |c| {
                c.metadata.annotations = None;
            }),
            ("expansion pending", |c| {
                let r = c
                    .spec
                    .as_mut()
                    .expect("spec")
                    .resources
                    .as_mut()
                    .expect("res");
                r.requests = Some(
                    [(
                        "storage".to_owned(),
                        k8s_openapi::apimachinery::pkg::api::resource::Quantity("2Gi".into()),
                    )]
                    .into(),
                );
            }),
            ("no capacity in status", |c| {
                c.status.as_mut().expect("status").capacity = None
            }),
        ];
        for (what, change) in cases {
            let mut c = done();
            change(&mut c);
            assert!(!settled(&c), "{what}: must be reconciled");
        }
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
