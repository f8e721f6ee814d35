//! The publish reconciler: keeps each of our PVs' [`PUBLISHED_NODES`] equal to what
//! [`publish::decide`] says from the pods that use its claim, and tells pods that must
//! wait for another node why (event `VolumeHeldByNode`).
//!
//! A watch of scheduled, unfinished pods keeps, per pod, only its node, creation time
//! and claims ([`Usage`]); the PV watch (`triggers`) adds a small record per PV. With
//! both, a pod or PV change queues only the PVs whose publication would change, and
//! the reconcile reads the PV (and its claim) fresh before writing, with the PV's
//! resourceVersion as precondition. Nothing is reconciled before the first complete
//! list of pods: a partial one would unpublish nodes whose pods are still running.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ctx::Ctx;
use super::publish::{self, PodUse};
use super::queue::{ClaimKey, Next, WorkQueue};
use crate::error::{Error, Result};
use crate::objects::keys::{PROVISIONED_BY, PUBLISHED_NODES, VOLUME_KEY};
use crate::objects::published;
use crate::objects::reclaim::claim_ref;

/// A pod: namespace and name.
type PodKey = (String, String);

/// What the filter needs to know about one of our PVs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PvInfo {
    claim: Option<ClaimKey>,
    exclusive: bool,
    /// The annotation: absent, unreadable (`Some(None)`), or the nodes.
    current: Option<Option<Vec<String>>>,
}

impl PvInfo {
    fn of(pv: &PersistentVolume) -> Self {
        let modes = pv
            .spec
            .as_ref()
            .and_then(|s| s.access_modes.clone())
            .unwrap_or_default();
        PvInfo {
            claim: claim_ref(pv).map(|(ns, n)| (ns.to_owned(), n.to_owned())),
            exclusive: publish::exclusive(&modes),
            current: pv
                .annotations()
                .get(PUBLISHED_NODES)
                .map(|v| published::parse(v).ok()),
        }
    }
}

#[derive(Default)]
struct State {
    pods: HashMap<PodKey, (PodUse, Vec<String>)>,
    by_claim: HashMap<ClaimKey, BTreeSet<PodKey>>,
    pvs: HashMap<String, PvInfo>,
    pvs_by_claim: HashMap<ClaimKey, BTreeSet<String>>,
    /// Waiting pods already told (pod uid → the nodes holding the volume then).
    told: HashMap<String, String>,
}

impl State {
    fn pods_of(&self, claim: &ClaimKey) -> Vec<PodUse> {
        self.by_claim
            .get(claim)
            .into_iter()
            .flatten()
            .filter_map(|k| self.pods.get(k).map(|(u, _)| u.clone()))
            .collect()
    }

    /// Whether the PV's publication would change, or a waiting pod is not told yet.
    fn needs(&self, info: &PvInfo) -> bool {
        let pods = info
            .claim
            .as_ref()
            .map(|c| self.pods_of(c))
            .unwrap_or_default();
        let current = info.current.clone().flatten();
        let d = publish::decide(info.exclusive, current.as_deref(), &pods);
        let holder = d.nodes.join(", ");
        Some(&d.nodes) != current.as_ref()
            || info.current == Some(None)
            || d.waiting
                .iter()
                .any(|w| self.told.get(&w.uid) != Some(&holder))
    }

    /// Our PVs of `claims` whose publication needs a look.
    fn due<'a>(&self, claims: impl IntoIterator<Item = &'a ClaimKey>) -> Vec<String> {
        let mut due = BTreeSet::new();
        for c in claims {
            for pv in self.pvs_by_claim.get(c).into_iter().flatten() {
                if self.pvs.get(pv).is_some_and(|i| self.needs(i)) {
                    due.insert(pv.clone());
                }
            }
        }
        due.into_iter().collect()
    }

    fn remove_pod(&mut self, key: &PodKey) -> Option<(PodUse, Vec<String>)> {
        let old = self.pods.remove(key)?;
        for c in &old.1 {
            let ck = (key.0.clone(), c.clone());
            if let Some(set) = self.by_claim.get_mut(&ck) {
                set.remove(key);
                if set.is_empty() {
                    self.by_claim.remove(&ck);
                }
            }
        }
        self.told.remove(&old.0.uid);
        Some(old)
    }

    fn insert_pod(&mut self, key: PodKey, entry: (PodUse, Vec<String>)) {
        for c in &entry.1 {
            self.by_claim
                .entry((key.0.clone(), c.clone()))
                .or_default()
                .insert(key.clone());
        }
        self.pods.insert(key, entry);
    }

    /// Sets a pod's entry; returns the claims whose users changed.
    fn set_pod(&mut self, key: PodKey, entry: Option<(PodUse, Vec<String>)>) -> Vec<ClaimKey> {
        if self.pods.get(&key) == entry.as_ref() {
            return Vec::new();
        }
        let old = self.remove_pod(&key);
        let mut claims: BTreeSet<ClaimKey> = BTreeSet::new();
        for (_, cs) in old.iter().chain(entry.iter()) {
            claims.extend(cs.iter().map(|c| (key.0.clone(), c.clone())));
        }
        if let Some(e) = entry {
            self.insert_pod(key, e);
        }
        claims.into_iter().collect()
    }
}

/// Which pods use which claims, and a record of each of our PVs; shared by the pod
/// and PV watches and the publish workers.
pub struct Usage {
    state: Mutex<State>,
    synced: watch::Sender<bool>,
    /// The leadership term's end: reconciles waiting for the first list give up.
    stop: CancellationToken,
}

impl Usage {
    pub fn new(stop: CancellationToken) -> Self {
        Usage {
            state: Mutex::default(),
            synced: watch::Sender::new(false),
            stop,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// The PV watch saw `pv` (one of ours); whether it needs publishing.
    pub fn pv_seen(&self, pv: &PersistentVolume) -> bool {
        let name = pv.name_any();
        let info = PvInfo::of(pv);
        let mut s = self.lock();
        if let Some(old) = s.pvs.get(&name).and_then(|i| i.claim.clone())
            && Some(&old) != info.claim.as_ref()
            && let Some(set) = s.pvs_by_claim.get_mut(&old)
        {
            set.remove(&name);
        }
        if let Some(c) = &info.claim {
            s.pvs_by_claim
                .entry(c.clone())
                .or_default()
                .insert(name.clone());
        }
        let due = !self.is_synced() || s.needs(&info);
        s.pvs.insert(name, info);
        due
    }

    /// The PV is gone.
    pub fn pv_gone(&self, name: &str) {
        let mut s = self.lock();
        if let Some(c) = s.pvs.remove(name).and_then(|i| i.claim)
            && let Some(set) = s.pvs_by_claim.get_mut(&c)
        {
            set.remove(name);
            if set.is_empty() {
                s.pvs_by_claim.remove(&c);
            }
        }
    }
}

fn entry(pod: &Pod) -> Option<(PodUse, Vec<String>)> {
    let claims = publish::claims_of(pod);
    if claims.is_empty() {
        return None;
    }
    Some((publish::pod_use(pod)?, claims))
}

fn pod_key(pod: &Pod) -> PodKey {
    (pod.namespace().unwrap_or_default(), pod.name_any())
}

/// Watches scheduled, unfinished pods until `stop`, queueing on `publish` the PVs
/// whose publication their changes affect; marks `usage` synced after the first list.
pub async fn watch_pods(
    client: kube::Client,
    usage: Arc<Usage>,
    publish: Arc<WorkQueue<String>>,
    stop: CancellationToken,
) {
    // Finished and unscheduled pods never reach us (and one that finishes leaves the
    // watch as a deletion); `entry` checks again.
    let config = watcher::Config::default()
        .fields("spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed");
    let events = watcher(Api::<Pod>::all(client), config)
        .default_backoff()
        .take_until(stop.cancelled_owned());
    tokio::pin!(events);
    let mut relist: Option<HashMap<PodKey, (PodUse, Vec<String>)>> = None;
    while let Some(event) = events.next().await {
        let due = match event {
            Err(e) => {
                tracing::warn!(error = %e, "pod watch failed; retrying");
                continue;
            }
            Ok(watcher::Event::Init) => {
                relist = Some(HashMap::new());
                continue;
            }
            Ok(watcher::Event::InitApply(pod)) => {
                if let (Some(r), Some(e)) = (relist.as_mut(), entry(&pod)) {
                    r.insert(pod_key(&pod), e);
                }
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                let fresh = relist.take().unwrap_or_default();
                let mut s = usage.lock();
                let mut keys: BTreeSet<PodKey> = s.pods.keys().cloned().collect();
                keys.extend(fresh.keys().cloned());
                let mut claims = BTreeSet::new();
                let mut fresh = fresh;
                for k in keys {
                    let e = fresh.remove(&k);
                    claims.extend(s.set_pod(k, e));
                }
                // After the first list, every PV is looked at (those queued before
                // waited for it); after a relist, those whose pods changed.
                let first = !usage.synced.send_replace(true);
                if first {
                    let all: Vec<ClaimKey> = s.pvs_by_claim.keys().cloned().collect();
                    s.due(&all)
                } else {
                    s.due(&claims)
                }
            }
            Ok(watcher::Event::Apply(pod)) => {
                let mut s = usage.lock();
                let claims = s.set_pod(pod_key(&pod), entry(&pod));
                s.due(&claims)
            }
            Ok(watcher::Event::Delete(pod)) => {
                let mut s = usage.lock();
                let claims = s.set_pod(pod_key(&pod), None);
                s.due(&claims)
            }
        };
        for pv in due {
            publish.add(pv);
        }
    }
}

/// Reconciles the publication of PV `name`, once the pods are listed.
pub async fn reconcile_name(
    name: String,
    ctx: &Ctx,
    usage: &Usage,
    caches: &super::triggers::Caches,
) -> Next {
    let mut synced = usage.synced.subscribe();
    tokio::select! {
        _ = usage.stop.cancelled() => return Next::Wait,
        r = synced.wait_for(|s| *s) => if r.is_err() {
            return Next::Wait;
        },
    }
    reconcile(&name, ctx, usage, caches)
        .await
        .unwrap_or_else(|e| ctx.after_error(&e))
}

/// A pod as events need it (kind, namespace, name, uid).
fn pod_ref(u: &PodUse) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(u.name.clone()),
            namespace: Some(u.namespace.clone()),
            uid: Some(u.uid.clone()),
            ..ObjectMeta::default()
        },
        ..Pod::default()
    }
}

async fn reconcile(
    name: &str,
    ctx: &Ctx,
    usage: &Usage,
    caches: &super::triggers::Caches,
) -> Result<Next> {
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    // The watched copy (the patch below is conditional on it); read only if the
    // watch has not seen it.
    let cached = caches.pv(name);
    let pv = match cached {
        Some(pv) => Some(pv),
        None => pvs
            .get_opt(name)
            .await
            .map_err(Error::kube(format!("read PV {name}")))?,
    };
    let Some(pv) = pv else {
        usage.pv_gone(name);
        return Ok(Next::Wait);
    };
    let ours = pv.annotations().get(PROVISIONED_BY) == Some(&ctx.provisioner)
        && pv.annotations().contains_key(VOLUME_KEY);
    if !ours {
        return Ok(Next::Wait);
    }
    let info = PvInfo::of(&pv);
    let mut pods = match &info.claim {
        Some(c) => usage.lock().pods_of(c),
        None => Vec::new(),
    };
    if let (Some((ns, claim)), false) = (&info.claim, pods.is_empty()) {
        // Only the claim this PV is bound to: one deleted and made again under the
        // same name is another claim, with its own PV.
        let found = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), ns)
            .get_opt(claim)
            .await
            .map_err(Error::kube(format!("read claim {ns}/{claim}")))?;
        let bound_uid = pv
            .spec
            .as_ref()
            .and_then(|s| s.claim_ref.as_ref())
            .and_then(|r| r.uid.clone());
        if found.and_then(|c| c.metadata.uid) != bound_uid {
            pods.clear();
        }
    }
    // An unreadable annotation counts as absent: nobody using the volume is cut off,
    // and it is rewritten.
    let current = info.current.clone().flatten();
    let d = publish::decide(info.exclusive, current.as_deref(), &pods);
    if Some(&d.nodes) != current.as_ref() {
        ctx.fence.check()?;
        pvs.patch(
            name,
            &PatchParams::default(),
            // Only the PV as read: a stale view must not undo a newer publication.
            &Patch::Merge(json!({"metadata": {
                "resourceVersion": pv.resource_version(),
                "annotations": {PUBLISHED_NODES: published::encode(&d.nodes)},
            }})),
        )
        .await
        .map_err(Error::kube(format!("publish nodes of PV {name}")))?;
        tracing::info!(pv = name, nodes = ?d.nodes, was = ?current, "published the nodes that may mount the volume");
    }
    let holder = d.nodes.join(", ");
    let claim = info
        .claim
        .as_ref()
        .map(|(ns, c)| format!("{ns}/{c}"))
        .unwrap_or_default();
    let volume = pv
        .annotations()
        .get(VOLUME_KEY)
        .cloned()
        .unwrap_or_default();
    let once_pod = pv
        .spec
        .as_ref()
        .and_then(|s| s.access_modes.as_ref())
        .is_some_and(|m| m.iter().any(|m| m == "ReadWriteOncePod"));
    let mode = if once_pod {
        "ReadWriteOncePod"
    } else {
        "ReadWriteOnce"
    };
    let (tell, handed): (Vec<PodUse>, Vec<(PodUse, String)>) = {
        let mut s = usage.lock();
        let tell = d
            .waiting
            .iter()
            .filter(|w| s.told.get(&w.uid) != Some(&holder))
            .map(|w| (*w).clone())
            .collect::<Vec<_>>();
        for w in &tell {
            s.told.insert(w.uid.clone(), holder.clone());
        }
        let handed = pods
            .iter()
            .filter(|p| d.nodes.contains(&p.node))
            .filter_map(|p| s.told.remove(&p.uid).map(|was| (p.clone(), was)))
            .collect();
        (tell, handed)
    };
    for w in tell {
        ctx.events
            .publish(
                &pod_ref(&w),
                EventType::Warning,
                "VolumeHeldByNode",
                "Publish",
                format!(
                    "waiting for the pods on node {holder} to release volume {volume} \
                     (PV {name}, claim {claim}): a {mode} volume is served to one node \
                     at a time, so mounts from node {} are refused until then",
                    w.node
                ),
            )
            .await;
    }
    for (p, was) in handed {
        ctx.events
            .publish(
                &pod_ref(&p),
                EventType::Normal,
                "VolumePublished",
                "Publish",
                format!(
                    "node {} may now mount volume {volume} (PV {name}), released by node {was}",
                    p.node
                ),
            )
            .await;
    }
    Ok(Next::Wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str, created: i64) -> (PodUse, Vec<String>) {
        (
            PodUse {
                namespace: "ns".into(),
                name: name.into(),
                uid: format!("u-{name}"),
                node: node.into(),
                created,
            },
            vec!["c".into()],
        )
    }

    fn info(exclusive: bool, current: Option<&[&str]>) -> PvInfo {
        PvInfo {
            claim: Some(("ns".into(), "c".into())),
            exclusive,
            current: current.map(|c| Some(c.iter().map(|s| s.to_string()).collect())),
        }
    }

    #[test]
    fn only_pvs_whose_publication_changes_are_due() {
        let mut s = State::default();
        s.pvs.insert("pv".into(), info(true, Some(&[])));
        s.pvs_by_claim
            .entry(("ns".into(), "c".into()))
            .or_default()
            .insert("pv".into());
        let claim = ("ns".to_owned(), "c".to_owned());
        assert!(
            s.due([&claim]).is_empty(),
            "nobody uses it and [] is published"
        );
        let changed = s.set_pod(("ns".into(), "a".into()), Some(pod("a", "n1", 1)));
        assert_eq!(changed, std::slice::from_ref(&claim));
        assert_eq!(s.due([&claim]), ["pv"]);
        s.pvs.insert("pv".into(), info(true, Some(&["n1"])));
        assert!(s.due([&claim]).is_empty(), "already published");
        assert!(
            s.set_pod(("ns".into(), "a".into()), Some(pod("a", "n1", 1)))
                .is_empty(),
            "an unchanged pod changes nothing"
        );
        s.set_pod(("ns".into(), "b".into()), Some(pod("b", "n2", 2)));
        assert_eq!(s.due([&claim]), ["pv"], "b must be told it waits");
        s.told.insert("u-b".into(), "n1".into());
        assert!(s.due([&claim]).is_empty(), "told once");
        assert_eq!(
            s.set_pod(("ns".into(), "a".into()), None),
            std::slice::from_ref(&claim)
        );
        assert_eq!(s.due([&claim]), ["pv"], "the holder left: b's node gets it");
        assert_eq!(s.pods_of(&claim).len(), 1);
        s.set_pod(("ns".into(), "b".into()), None);
        assert!(
            s.by_claim.is_empty() && s.told.is_empty(),
            "nothing left behind"
        );
    }
}
