//! The claim reconciler: drives one PersistentVolumeClaim of a localnfs class through
//! the provisioning protocol (see `protocol`) and expansion. Idempotent: every step
//! reads the claim's current annotations and does the next missing thing, so a
//! controller killed between any two steps resumes where it stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::queue::Next;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::metrics::ControllerMetrics;
use super::params::{ClassParams, quantity_bytes};
use super::protocol::*;
use super::pv::{self, NodeRoom, PvInput, SELECTED_NODE};
use super::reserve::Reservations;
use super::triggers::ClaimKey;
use crate::error::{Error, Result};

/// Shared by every reconcile.
pub struct Ctx {
    pub client: Client,
    pub provisioner: String,
    /// Namespace of the node agents' Leases.
    pub namespace: String,
    pub events: crate::events::Events,
    pub metrics: ControllerMetrics,
    /// The node agents as their Leases say (only `agents` is filled).
    pub agents: crate::scheduler::watch::Shared,
    /// StorageClasses, watched (a handful of small objects).
    pub classes: Store<StorageClass>,
    /// How long past its lease a silent node agent is waited for (`--agent-grace`).
    pub agent_grace: Duration,
    /// Space held on each node for placements in progress.
    pub reservations: std::sync::Mutex<Reservations>,
    /// Whether we may still write as leader; checked before every write.
    pub fence: super::leader::Fence,
}

const BETA_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
const GA_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";

fn has_finalizer<K: Resource>(obj: &K, f: &str) -> bool {
    obj.meta().finalizers.iter().flatten().any(|x| x == f)
}

fn annotation<'a, K: Resource>(obj: &'a K, key: &str) -> Option<&'a str> {
    obj.meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

impl Ctx {
    fn claims(&self, ns: &str) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.client.clone(), ns)
    }

    async fn event(
        &self,
        pvc: &PersistentVolumeClaim,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        self.events
            .publish(pvc, type_, reason, "Provision", note)
            .await;
    }

    async fn patch_meta(
        &self,
        pvc: &PersistentVolumeClaim,
        patch: serde_json::Value,
    ) -> Result<()> {
        let (ns, name) = (pvc.namespace().unwrap_or_default(), pvc.name_any());
        self.fence.check()?;
        self.claims(&ns)
            .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(Error::kube(format!("patch claim {ns}/{name}")))?;
        Ok(())
    }

    async fn patch_finalizers(
        &self,
        pvc: &PersistentVolumeClaim,
        patch: kube::api::Patch<()>,
    ) -> Result<()> {
        let (ns, name) = (pvc.namespace().unwrap_or_default(), pvc.name_any());
        self.fence.check()?;
        self.claims(&ns)
            .patch(&name, &PatchParams::default(), &patch)
            .await
            .map_err(Error::kube(format!(
                "update finalizers of claim {ns}/{name}"
            )))?;
        Ok(())
    }

    async fn add_finalizer(&self, pvc: &PersistentVolumeClaim) -> Result<()> {
        self.patch_finalizers(
            pvc,
            crate::kubeclient::add_finalizer(pvc.finalizers(), CLAIM_FINALIZER),
        )
        .await
    }

    /// Finishes binding the claim to its pre-bound PV the way kube-controller-manager's
    /// PV binder would (claim `volumeName` and bind annotations, PV and claim phase
    /// Bound). The binder would get there too, but it is paced by its client's QPS
    /// (20 by default: about 100 s for 500 claims); ours are a few writes per claim at
    /// API-server speed. Each step is skipped when already done, so a controller that
    /// died half-way finishes the job on its next reconcile, and the binder, should it
    /// get there first, leaves nothing for us to do.
    async fn complete_binding(
        &self,
        pvc: &PersistentVolumeClaim,
        pv: &PersistentVolume,
    ) -> Result<()> {
        let (ns, name) = (pvc.namespace().unwrap_or_default(), pvc.name_any());
        let pv_name = pv.name_any();
        let spec = pv.spec.clone().unwrap_or_default();
        let ours = spec
            .claim_ref
            .as_ref()
            .is_some_and(|r| r.uid.is_some() && r.uid == pvc.uid());
        let volume_name = pvc.spec.as_ref().and_then(|s| s.volume_name.as_deref());
        if !ours || pv.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        match volume_name {
            None | Some("") => {
                self.patch_meta(
                    pvc,
                    json!({
                        "metadata": {"annotations": {BIND_COMPLETED: "yes", BOUND_BY_CONTROLLER: "yes"}},
                        "spec": {"volumeName": pv_name},
                    }),
                )
                .await?
            }
            Some(v) if v == pv_name => {}
            Some(_) => return Ok(()), // bound elsewhere by someone else: not ours to touch
        }
        let pv_phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
        self.fence.check()?;
        if pv_phase != Some("Bound") && pv_phase != Some("Released") {
            Api::<PersistentVolume>::all(self.client.clone())
                .patch_status(
                    &pv_name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"phase": "Bound"}})),
                )
                .await
                .map_err(Error::kube(format!("set PV {pv_name} Bound")))?;
        }
        if pvc.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound") {
            self.fence.check()?;
            self.claims(&ns)
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {
                        "phase": "Bound",
                        "accessModes": spec.access_modes,
                        "capacity": spec.capacity,
                    }})),
                )
                .await
                .map_err(Error::kube(format!("set claim {ns}/{name} Bound")))?;
        }
        Ok(())
    }

    async fn remove_finalizer(&self, pvc: &PersistentVolumeClaim) -> Result<()> {
        match crate::kubeclient::remove_finalizer(pvc.finalizers(), CLAIM_FINALIZER) {
            Some(patch) => self.patch_finalizers(pvc, patch).await,
            None => Ok(()),
        }
    }

    /// The space held for placements in progress (never held across an await).
    fn reservations(&self) -> std::sync::MutexGuard<'_, Reservations> {
        self.reservations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Picks a node as [`pv::choose_node`] does from free space less what placements in
    /// progress hold, and holds the claim's bytes there, in one step: concurrent
    /// workers never both count the same free bytes.
    fn choose_and_hold(
        &self,
        uid: &str,
        selected: Option<&str>,
        rooms: &[NodeRoom],
        size: u64,
        allowed: Option<&BTreeSet<String>>,
    ) -> std::result::Result<String, String> {
        let now = Instant::now();
        let mut held = self.reservations();
        held.expire(now);
        let node = pv::choose_node(selected, &held.discount(rooms), size, allowed)?;
        held.hold(uid, &node, size, now);
        Ok(node)
    }

    /// Why we stop waiting for `node`'s agent, when it has been silent past its lease
    /// and the grace ([`pv::agent_given_up`]); `None` while it may still answer.
    fn agent_gone(&self, node: &str) -> Option<String> {
        let now = crate::scheduler::inventory::unix_now();
        let expires = crate::scheduler::watch::with(&self.agents, |inv| {
            inv.agents.get(node).map(|a| a.expires)
        });
        let grace = i64::try_from(self.agent_grace.as_secs()).unwrap_or(i64::MAX);
        if !pv::agent_given_up(expires, now, grace) {
            return None;
        }
        Some(match expires {
            Some(e) => format!(
                "has not renewed its heartbeat lease, which ran out {} s ago",
                now - e
            ),
            None => "has no heartbeat lease".to_owned(),
        })
    }

    /// Live node agents, their free space and NFS port, from the heartbeat Leases
    /// (watched, not listed per claim: the Leases also carry per-volume usage).
    fn node_rooms(&self) -> Vec<(NodeRoom, u16)> {
        let now = crate::scheduler::inventory::unix_now();
        crate::scheduler::watch::with(&self.agents, |inv| {
            inv.agents
                .iter()
                .filter(|(_, a)| a.expires >= now)
                .map(|(node, a)| {
                    let room = NodeRoom {
                        node: node.clone(),
                        free_bytes: a.free_bytes,
                    };
                    (room, a.nfs_port)
                })
                .collect()
        })
    }
}

/// Whether this claim is for us: its class names our provisioner.
/// Whether a claim is ours: its class names our provisioner, or the control plane
/// annotated it for us (`volume.beta.kubernetes.io/storage-provisioner` up to 1.22,
/// `volume.kubernetes.io/storage-provisioner` from 1.23).
pub fn claimed_by(pvc: &PersistentVolumeClaim, class_provisioner: &str, me: &str) -> bool {
    class_provisioner == me
        || [BETA_PROVISIONER, GA_PROVISIONER]
            .iter()
            .any(|k| annotation(pvc, k) == Some(me))
}

/// The claim's class if it is ours. From the class cache; a class too new for the
/// cache is read from the API server, so a claim created right after its class is not
/// taken for someone else's.
async fn our_class(ctx: &Ctx, pvc: &PersistentVolumeClaim) -> Result<Option<Arc<StorageClass>>> {
    let Some(class_name) = pvc.spec.as_ref().and_then(|s| s.storage_class_name.clone()) else {
        return Ok(None);
    };
    let class = match ctx.classes.get(&ObjectRef::new(&class_name)) {
        Some(c) => Some(c),
        None => Api::<StorageClass>::all(ctx.client.clone())
            .get_opt(&class_name)
            .await
            .map_err(Error::kube(format!("read StorageClass {class_name}")))?
            .map(Arc::new),
    };
    Ok(class.filter(|c| claimed_by(pvc, &c.provisioner, &ctx.provisioner)))
}

/// Reconciles the claim `key` as the API server has it now; errors become a retry.
pub async fn reconcile_key(key: ClaimKey, ctx: &Ctx) -> Next {
    let (ns, name) = &key;
    let result = match ctx.claims(ns).get_opt(name).await {
        Ok(Some(pvc)) => reconcile(&pvc, ctx).await,
        Ok(None) => return Next::Wait, // gone: nothing of ours can be left on it
        Err(e) => Err(Error::kube(format!("read claim {ns}/{name}"))(e)),
    };
    result.unwrap_or_else(|e| ctx.after_error(&e))
}

impl Ctx {
    /// When to retry after a failed reconcile.
    pub fn after_error(&self, err: &Error) -> Next {
        self.metrics.reconcile_errors.inc();
        if crate::kubeclient::lost_race(err) {
            // Someone updated the object between our read and write: retry on a fresh copy.
            tracing::debug!(error = %err, "lost an update race; retrying");
            return Next::After(Duration::from_millis(200));
        }
        tracing::warn!(error = %err, "reconcile failed; retrying");
        Next::After(Duration::from_secs(5))
    }
}

/// Reconciles one claim.
pub async fn reconcile(pvc: &PersistentVolumeClaim, ctx: &Ctx) -> Result<Next> {
    let Some(class) = our_class(ctx, pvc).await? else {
        // Not ours, but clean up if we were mid-way when its class vanished.
        if has_finalizer(pvc, CLAIM_FINALIZER) && pvc.metadata.deletion_timestamp.is_some() {
            return abandon(ctx, pvc).await;
        }
        return Ok(Next::Wait);
    };
    let uid = pvc.uid().unwrap_or_default();
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pv_name = pv::pv_name(&uid);
    if let Some(existing) = pvs
        .get_opt(&pv_name)
        .await
        .map_err(Error::kube(format!("read PV {pv_name}")))?
    {
        ctx.complete_binding(pvc, &existing).await?;
        ctx.remove_finalizer(pvc).await?;
        return super::expand::reconcile(ctx, pvc, &class, &existing).await;
    }
    if pvc.metadata.deletion_timestamp.is_some() {
        return abandon(ctx, pvc).await;
    }
    if !pv::needs_volume(pvc) || annotation(pvc, ABANDON).is_some() {
        return Ok(Next::Wait);
    }
    provision(ctx, pvc, &class, &pv_name).await
}

/// A claim going away before its PV exists: have the node agent delete the volume.
async fn abandon(ctx: &Ctx, pvc: &PersistentVolumeClaim) -> Result<Next> {
    if !has_finalizer(pvc, CLAIM_FINALIZER) {
        return Ok(Next::Wait);
    }
    let placed = pvc.labels().contains_key(NODE_LABEL);
    if !placed || annotation(pvc, REMOVED).is_some() {
        ctx.remove_finalizer(pvc).await?;
        return Ok(Next::Wait);
    }
    if annotation(pvc, ABANDON).is_none() {
        ctx.patch_meta(pvc, json!({"metadata": {"annotations": {ABANDON: "true"}}}))
            .await?;
        ctx.reservations().release(&pvc.uid().unwrap_or_default());
    }
    let node = pvc.labels().get(NODE_LABEL).cloned().unwrap_or_default();
    if let Some(why) = ctx.agent_gone(&node) {
        // Waiting longer could be forever (the node may be gone for good): let the
        // claim go and say exactly what may be left on the node.
        let volume = annotation(pvc, REQUEST)
            .and_then(|r| serde_json::from_str::<VolumeRequest>(r).ok())
            .map_or_else(|| "(unknown)".to_owned(), |r| r.name.to_string());
        ctx.event(
            pvc,
            EventType::Warning,
            "VolumeLeftOnNode",
            format!(
                "node {node}'s agent {why}: releasing the deleted claim without removing its volume; directory volumes/{volume} may be left under the agent's root on node {node} (remove it when the node is back, see the README)"
            ),
        )
        .await;
        ctx.remove_finalizer(pvc).await?;
        return Ok(Next::Wait);
    }
    // The node agent's answer arrives as a watch event; poll in case it is down.
    Ok(Next::After(AGENT_POLL))
}

/// How often a claim waiting on a node agent is looked at again (its answer normally
/// arrives as a watch event; this catches an agent that went away).
const AGENT_POLL: Duration = Duration::from_secs(10);

/// The node a claim was placed on will not create its volume (its agent went silent,
/// or refused): take the placement back (only if the claim is unchanged since we read
/// it, so a volume that was just made is not lost track of) so the next reconcile, or
/// the scheduler under WaitForFirstConsumer, picks a node again. `event`: why.
async fn place_again(ctx: &Ctx, pvc: &PersistentVolumeClaim, event: String) -> Result<Next> {
    let mut annotations = json!({REQUEST: null, REFUSED: null});
    if annotation(pvc, SELECTED_NODE).is_some() {
        annotations[SELECTED_NODE] = serde_json::Value::Null;
    }
    ctx.patch_meta(
        pvc,
        json!({"metadata": {
            "resourceVersion": pvc.resource_version(),
            "labels": {NODE_LABEL: null},
            "annotations": annotations,
        }}),
    )
    .await?;
    ctx.reservations().release(&pvc.uid().unwrap_or_default());
    ctx.event(pvc, EventType::Warning, "ProvisioningFailed", event)
        .await;
    Ok(Next::Wait)
}

async fn provision(
    ctx: &Ctx,
    pvc: &PersistentVolumeClaim,
    class: &StorageClass,
    pv_name: &str,
) -> Result<Next> {
    let checked = ClassParams::parse(&class.parameters.clone().unwrap_or_default())
        .and_then(|p| pv::validate_claim(pvc).map(|r| (p, r)));
    let (params, request) = match checked {
        Ok(x) => x,
        Err(msg) => {
            ctx.metrics.failed("invalid");
            ctx.event(pvc, EventType::Warning, "ProvisioningFailed", msg)
                .await;
            return Ok(Next::After(Duration::from_secs(300)));
        }
    };
    // Our own write changes what the claim watch fingerprints, which brings the claim
    // back; the timer is only the safety net should that event be missed.
    let next_step = Next::After(Duration::from_secs(15));
    if !has_finalizer(pvc, CLAIM_FINALIZER) {
        ctx.add_finalizer(pvc).await?;
        return Ok(next_step);
    }
    let wait_for_scheduler = class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer");
    if wait_for_scheduler
        && annotation(pvc, SELECTED_NODE).is_none()
        && !pvc.labels().contains_key(NODE_LABEL)
    {
        // The scheduler has not picked the pod's node yet; its annotation will wake us.
        return Ok(Next::Wait);
    }
    let rooms = ctx.node_rooms();
    let Some(node) = pvc.labels().get(NODE_LABEL).cloned() else {
        let (ns, name, uid) = (
            pvc.namespace().unwrap_or_default(),
            pvc.name_any(),
            pvc.uid().unwrap_or_default(),
        );
        let volume = match params.volume_name(pv_name, &ns, &name, &uid) {
            Ok(v) => v,
            Err(msg) => {
                ctx.metrics.failed("invalid");
                ctx.event(pvc, EventType::Warning, "ProvisioningFailed", msg)
                    .await;
                return Ok(Next::After(Duration::from_secs(300)));
            }
        };
        let free: Vec<NodeRoom> = rooms.iter().map(|(r, _)| r.clone()).collect();
        let allowed = allowed_nodes(ctx, class).await?;
        let selected = annotation(pvc, SELECTED_NODE);
        let node = match ctx.choose_and_hold(
            &uid,
            selected,
            &free,
            request.size_bytes,
            allowed.as_ref(),
        ) {
            Ok(n) => n,
            Err(msg) if selected.is_some() => {
                // As kube's external-provisioner does: hand the choice back to the
                // scheduler, which picks again (the pod stays Pending meanwhile).
                ctx.metrics.failed("no-room");
                ctx.event(
                    pvc,
                    EventType::Warning,
                    "ProvisioningFailed",
                    format!("{msg}; asking the scheduler to choose another node"),
                )
                .await;
                ctx.patch_meta(
                    pvc,
                    json!({"metadata": {"annotations": {SELECTED_NODE: null}}}),
                )
                .await?;
                return Ok(Next::Wait);
            }
            Err(msg) => {
                ctx.metrics.failed("no-room");
                ctx.event(pvc, EventType::Warning, "ProvisioningFailed", msg)
                    .await;
                return Ok(Next::After(Duration::from_secs(15)));
            }
        };
        let req = VolumeRequest {
            name: volume.clone(),
            size_bytes: request.size_bytes,
            uid: params.uid,
            gid: params.gid,
            mode: params.mode,
            squash: params.squash,
            anon_uid: params.anon_uid,
            anon_gid: params.anon_gid,
            max_files: params.max_files,
        };
        let req_json = serde_json::to_string(&req).unwrap_or_default();
        let placed = ctx
            .patch_meta(
                pvc,
                // Only the claim as read: a stale leader's placement of a claim placed
                // since by another fails (409) instead of moving it.
                json!({"metadata": {
                    "resourceVersion": pvc.resource_version(),
                    "labels": {NODE_LABEL: node},
                    "annotations": {REQUEST: req_json},
                }}),
            )
            .await;
        if let Err(e) = placed {
            ctx.reservations().release(&uid);
            return Err(e);
        }
        ctx.event(
            pvc,
            EventType::Normal,
            "Provisioning",
            format!(
                "creating volume {volume} ({} bytes) on node {node}",
                request.size_bytes
            ),
        )
        .await;
        return Ok(next_step);
    };
    let uid = pvc.uid().unwrap_or_default();
    let Some(volume) = annotation(pvc, READY) else {
        if let Some(why) = ctx.agent_gone(&node) {
            return place_again(
                ctx,
                pvc,
                format!("node {node}'s agent {why} and has not created the volume: placing the claim again"),
            )
            .await;
        }
        if let Some(refusal) = annotation(pvc, REFUSED) {
            ctx.reservations().release(&uid);
            if annotation(pvc, SELECTED_NODE).is_some() {
                return place_again(
                    ctx,
                    pvc,
                    format!("{refusal}; asking the scheduler to choose another node"),
                )
                .await;
            }
            // Immediate: the agent's event says why; a person has to act.
            return Ok(Next::After(Duration::from_secs(300)));
        }
        // Placed by an earlier leader: hold its space here too.
        ctx.reservations()
            .hold(&uid, &node, request.size_bytes, Instant::now());
        // The node agent's annotation brings the claim back; poll in case it is down.
        return Ok(Next::After(AGENT_POLL));
    };
    ctx.reservations().ready(&uid, Instant::now());
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let node_obj = nodes
        .get(&node)
        .await
        .map_err(Error::kube(format!("read node {node}")))?;
    let Some(ip) = internal_ip(&node_obj) else {
        ctx.event(
            pvc,
            EventType::Warning,
            "ProvisioningFailed",
            format!("node {node} has no InternalIP"),
        )
        .await;
        return Ok(Next::After(Duration::from_secs(30)));
    };
    let port = rooms
        .iter()
        .find(|(r, _)| r.node == node)
        .map_or(2049, |(_, p)| *p);
    let pv = pv::build_pv(&PvInput {
        pvc,
        class,
        params: &params,
        request: &request,
        provisioner: &ctx.provisioner,
        node: &node,
        node_ip: &ip,
        nfs_port: port,
        volume,
    })
    .map_err(Error::BuildObject)?;
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    ctx.fence.check()?;
    match pvs.create(&PostParams::default(), &pv).await {
        Ok(_) => {
            ctx.metrics.provisioned.inc();
            if let Some(created) = &pvc.metadata.creation_timestamp {
                let secs = Timestamp::now().duration_since(created.0).as_secs_f64();
                ctx.metrics.provision_seconds.observe(secs.max(0.0));
            }
            ctx.event(
                pvc,
                EventType::Normal,
                "ProvisioningSucceeded",
                format!("created PV {pv_name}: volume {volume} on node {node} ({ip})"),
            )
            .await;
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(Error::kube(format!("create PV {pv_name}"))(e)),
    }
    // The PV as created carries the claim's uid; its status is still empty.
    ctx.complete_binding(pvc, &pv).await?;
    ctx.remove_finalizer(pvc).await?;
    Ok(Next::Wait)
}

/// The nodes a class's `allowedTopologies` admit, by their labels; `None` when the
/// class sets none (every node). Read only for such classes.
async fn allowed_nodes(ctx: &Ctx, class: &StorageClass) -> Result<Option<BTreeSet<String>>> {
    let terms = class.allowed_topologies.as_deref().unwrap_or_default();
    if terms.is_empty() {
        return Ok(None);
    }
    let nodes = Api::<Node>::all(ctx.client.clone())
        .list_metadata(&ListParams::default())
        .await
        .map_err(Error::kube("list nodes for allowedTopologies".to_owned()))?;
    Ok(Some(
        nodes
            .items
            .iter()
            .filter(|n| {
                pv::topology_allows(
                    terms,
                    n.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
                )
            })
            .map(|n| n.name_any())
            .collect(),
    ))
}

fn internal_ip(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address.clone())
}

/// The size a claim requests, in bytes.
pub fn requested_bytes(pvc: &PersistentVolumeClaim) -> Option<u64> {
    let q = pvc
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")?;
    quantity_bytes(&q.0).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_annotated_with_either_provisioner_key_are_ours() {
        // Recorded from a newer API server: only the GA key is set.
        let ga: PersistentVolumeClaim = serde_json::from_str(include_str!(
            "../../tests/fixtures/pvc-ga-provisioner-annotation.json"
        ))
        .expect("fixture");
        assert!(claimed_by(&ga, "someone.else/x", "localnfs.io/nfs"));
        let mut beta = ga.clone();
        let ann = beta.metadata.annotations.get_or_insert_default();
        let v = ann.remove(GA_PROVISIONER).expect("annotation");
        ann.insert(BETA_PROVISIONER.into(), v);
        assert!(claimed_by(&beta, "someone.else/x", "localnfs.io/nfs"));
        let mut none = ga.clone();
        none.metadata.annotations = None;
        assert!(!claimed_by(&none, "someone.else/x", "localnfs.io/nfs"));
        assert!(claimed_by(&none, "localnfs.io/nfs", "localnfs.io/nfs"));
    }
}
