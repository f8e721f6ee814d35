//! The claim reconciler: drives one PersistentVolumeClaim of a localnfs class through
//! the provisioning protocol (see `objects`) and expansion. It reads the claim, its
//! class, its PV and its node's agent, does the step [`super::step::next`] decides,
//! and comes back; so a controller killed between any two steps resumes where it
//! stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::queue::{ClaimKey, Next};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use serde_json::json;

use super::clone;
use super::ctx::Ctx;
use super::pv::{self, NodeRoom, PvInput};
use super::restores;
use super::step::{self, Facts, Failure, Placement, Step, Then};
use super::triggers::Caches;
use crate::error::{Error, Result};
use crate::kubeclient::annotation;
use crate::objects::claim::{claimed_by, pv_name};
use crate::objects::keys::*;
use crate::objects::request::RestoreSource;
use crate::objects::signed::{self, Message, VolumeRequest};

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

    /// Every claim write below is remembered in `caches` ([`Caches::wrote`]), so a
    /// cached copy older than it is not acted on again.
    async fn patch_meta(
        &self,
        caches: &Caches,
        pvc: &PersistentVolumeClaim,
        patch: serde_json::Value,
    ) -> Result<()> {
        let (ns, name) = (pvc.namespace().unwrap_or_default(), pvc.name_any());
        self.fence.check()?;
        let written = self
            .claims(&ns)
            .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(Error::kube(format!("patch claim {ns}/{name}")))?;
        caches.wrote(&written);
        Ok(())
    }

    async fn patch_finalizers(
        &self,
        caches: &Caches,
        pvc: &PersistentVolumeClaim,
        patch: kube::api::Patch<()>,
    ) -> Result<()> {
        let (ns, name) = (pvc.namespace().unwrap_or_default(), pvc.name_any());
        self.fence.check()?;
        let written = self
            .claims(&ns)
            .patch(&name, &PatchParams::default(), &patch)
            .await
            .map_err(Error::kube(format!(
                "update finalizers of claim {ns}/{name}"
            )))?;
        caches.wrote(&written);
        Ok(())
    }

    async fn add_finalizer(&self, caches: &Caches, pvc: &PersistentVolumeClaim) -> Result<()> {
        self.patch_finalizers(
            caches,
            pvc,
            crate::kubeclient::add_finalizer(pvc, CLAIM_FINALIZER),
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
    ///
    /// The PV exists, so our finalizer has done its job: the claim patch that sets
    /// `volumeName` also drops it (one write, not two; conditional on the claim as
    /// read, since it replaces the finalizer list). Returns whether it did; if not,
    /// the caller still has to.
    async fn complete_binding(
        &self,
        caches: &Caches,
        pvc: &PersistentVolumeClaim,
        pv: &PersistentVolume,
    ) -> Result<bool> {
        let (ns, name) = (pvc.namespace().unwrap_or_default(), pvc.name_any());
        let pv_name = pv.name_any();
        let spec = pv.spec.clone().unwrap_or_default();
        let ours = spec
            .claim_ref
            .as_ref()
            .is_some_and(|r| r.uid.is_some() && r.uid == pvc.uid());
        let volume_name = pvc.spec.as_ref().and_then(|s| s.volume_name.as_deref());
        if !ours || pv.metadata.deletion_timestamp.is_some() {
            return Ok(false);
        }
        let mut released = false;
        match volume_name {
            None | Some("") => {
                let mut patch = json!({
                    "metadata": {"annotations": {BIND_COMPLETED: "yes", BOUND_BY_CONTROLLER: "yes"}},
                    "spec": {"volumeName": pv_name},
                });
                if crate::kubeclient::has_finalizer(pvc, CLAIM_FINALIZER) {
                    let rest: Vec<&String> = pvc
                        .finalizers()
                        .iter()
                        .filter(|f| *f != CLAIM_FINALIZER)
                        .collect();
                    patch["metadata"]["finalizers"] = json!(rest);
                    patch["metadata"]["resourceVersion"] = json!(pvc.resource_version());
                    released = true;
                }
                self.patch_meta(caches, pvc, patch).await?
            }
            Some(v) if v == pv_name => {}
            Some(_) => return Ok(false), // bound elsewhere by someone else: not ours to touch
        }
        // The two phases at once: neither depends on the other, and in a burst each
        // claim's worker waits on the API server's answers, so a round trip less per
        // claim is more claims a second (whichever fails, the next reconcile redoes
        // only what is missing).
        let pv_phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
        let pv_bound = async {
            if pv_phase == Some("Bound") || pv_phase == Some("Released") {
                return Ok(());
            }
            self.fence.check()?;
            // Only the PV as read (a cached copy may be older than a Released).
            let mut status = json!({"status": {"phase": "Bound"}});
            if let Some(rv) = pv.resource_version() {
                status["metadata"] = json!({"resourceVersion": rv});
            }
            let written = Api::<PersistentVolume>::all(self.client.clone())
                .patch_status(&pv_name, &PatchParams::default(), &Patch::Merge(status))
                .await
                .map_err(Error::kube(format!("set PV {pv_name} Bound")))?;
            caches.wrote(&written);
            Ok::<(), Error>(())
        };
        let claim_bound = async {
            if pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound") {
                return Ok(());
            }
            self.fence.check()?;
            let written = self
                .claims(&ns)
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    // The uid as a precondition: a claim of that name deleted and
                    // made again since the copy was read (a StatefulSet's) is not
                    // marked Bound to this PV (the API server refuses a changed uid).
                    &Patch::Merge(json!({
                        "metadata": {"uid": pvc.uid()},
                        "status": {
                            "phase": "Bound",
                            "accessModes": spec.access_modes,
                            "capacity": spec.capacity,
                        },
                    })),
                )
                .await
                .map_err(Error::kube(format!("set claim {ns}/{name} Bound")))?;
            caches.wrote(&written);
            Ok::<(), Error>(())
        };
        let (pv_bound, claim_bound) = tokio::join!(pv_bound, claim_bound);
        pv_bound.and(claim_bound)?;
        Ok(released)
    }

    /// [`Self::complete_binding`], then our finalizer off the claim if that did not
    /// take it.
    async fn bind_and_release(
        &self,
        caches: &Caches,
        pvc: &PersistentVolumeClaim,
        pv: &PersistentVolume,
    ) -> Result<()> {
        if !self.complete_binding(caches, pvc, pv).await? {
            self.remove_finalizer(caches, pvc).await?;
        }
        Ok(())
    }

    async fn remove_finalizer(&self, caches: &Caches, pvc: &PersistentVolumeClaim) -> Result<()> {
        match crate::kubeclient::remove_finalizer(pvc.finalizers(), CLAIM_FINALIZER) {
            Some(patch) => self.patch_finalizers(caches, pvc, patch).await,
            None => Ok(()),
        }
    }
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

/// Reconciles the claim `key` as the claim watch last saw it (see `triggers`: every
/// key comes from that watch, so a claim not in its cache is gone); errors become a
/// retry.
pub async fn reconcile_key(key: ClaimKey, ctx: &Ctx, caches: &Caches) -> Next {
    let (ns, name) = &key;
    match caches.claim(ns, name) {
        Some(pvc) => reconcile(&pvc, ctx, caches)
            .await
            .unwrap_or_else(|e| ctx.after_error(&e)),
        None => {
            caches.forget_claim(ns, name);
            Next::Wait // gone: nothing of ours can be left on it
        }
    }
}

/// Whether `step`, decided while the PV watch had not seen the claim's PV, holds
/// even if the PV exists (the watch may lag a PV made a moment ago): these steps
/// change nothing a PV depends on, or are conditional on the claim as read, or (a
/// PV create) find out for themselves. Any other step is decided again after
/// reading the PV from the API server.
pub fn safe_without_pv(step: &Step) -> bool {
    matches!(
        step,
        Step::Wait
            | Step::AddFinalizer
            | Step::Place(_)
            | Step::AwaitAgent { .. }
            | Step::CreatePv(..)
    )
}

/// Reconciles one claim: reads what [`step::next`] decides from, and does the step.
pub async fn reconcile(pvc: &PersistentVolumeClaim, ctx: &Ctx, caches: &Caches) -> Result<Next> {
    let class = our_class(ctx, pvc).await?;
    let pv_name = pv_name(&pvc.uid().unwrap_or_default());
    let mut pv = match class {
        Some(_) => caches.pv(&pv_name),
        None => None,
    };
    // Decided from copies older than our own writes, the step would be one we just
    // did: wait for the watch events those writes bring (the timer is the safety net).
    if caches.behind(pvc) || pv.as_ref().is_some_and(|pv| caches.behind(pv)) {
        return Ok(Next::After(OWN_WRITE_WAIT));
    }
    let verified = ctx.verify(pvc);
    let node = verified.request.as_ref().map(|r| r.node.clone());
    // A clone not placed yet: what it copies, read fresh (never from the claim's own
    // annotations, which its tenant can write).
    let source = match clone::wanted(pvc) {
        clone::Wanted::Claim(name)
            if class.is_some()
                && pv.is_none()
                && verified.request.is_none()
                && pvc.metadata.deletion_timestamp.is_none() =>
        {
            Some(read_source(ctx, pvc, name).await?)
        }
        _ => None,
    };
    let agent_gone = node.as_deref().and_then(|n| ctx.agent_gone(n));
    let facts = |claim, pv_exists| Facts {
        claim,
        class: class.as_deref(),
        pv_exists,
        agent_gone: agent_gone.clone(),
        signed: &verified,
        source: source.as_ref(),
    };
    let mut step = step::next(&facts(pvc, pv.is_some()));
    if class.is_some() && pv.is_none() && !safe_without_pv(&step) {
        pv = Api::<PersistentVolume>::all(ctx.client.clone())
            .get_opt(&pv_name)
            .await
            .map_err(Error::kube(format!("read PV {pv_name}")))?;
        step = step::next(&facts(pvc, pv.is_some()));
    }
    // A claim about to be placed gets our finalizer in the placement's own write.
    let mut finalizers = None;
    if step == Step::AddFinalizer {
        let mut held = pvc.clone();
        held.finalizers_mut().push(CLAIM_FINALIZER.to_owned());
        if let placing @ Step::Place(_) = step::next(&facts(&held, false)) {
            step = placing;
            finalizers = Some(held.finalizers().to_vec());
        }
    }
    let uid = pvc.uid().unwrap_or_default();
    // Our own write changes what the claim watch fingerprints, which brings the claim
    // back; the timer is only the safety net should that event be missed.
    let next_step = Next::After(Duration::from_secs(15));
    if matches!(step, Step::Place(_)) && !verified.ignored.is_empty() {
        // Said once, as the claim is placed: our placement replaces these keys.
        ctx.event(
            pvc,
            EventType::Warning,
            "IgnoredAnnotations",
            format!(
                "{} on this claim were not written by localnfs for it (copied from another claim, kept from a deleted one, or edited): ignored; localnfs places the claim itself",
                verified.ignored.join(", ")
            ),
        )
        .await;
    }
    match step {
        Step::Wait => Ok(Next::Wait),
        Step::Finish => {
            let (Some(class), Some(pv)) = (class, pv) else {
                return Ok(Next::Wait);
            };
            ctx.bind_and_release(caches, pvc, &pv).await?;
            super::expand::reconcile(ctx, pvc, &class, &pv).await
        }
        Step::AddFinalizer => {
            ctx.add_finalizer(caches, pvc).await?;
            Ok(next_step)
        }
        Step::Place(placement) => match class {
            Some(class) => {
                // A VolumeRestore's claim is placed only once found in its status.
                let restore = match super::restores::source_for(ctx, pvc).await? {
                    restores::Lookup::Plain => None,
                    restores::Lookup::From(source) => Some(source),
                    restores::Lookup::Wait(why) => {
                        tracing::debug!(claim = %format!("{}/{}", pvc.namespace().unwrap_or_default(), pvc.name_any()), why, "restore claim not placed yet");
                        return Ok(Next::After(restores::backoff(
                            restores::age_of(pvc),
                            RESTORE_POLL,
                        )));
                    }
                };
                place(ctx, caches, pvc, &class, &placement, finalizers, restore).await
            }
            None => Ok(Next::Wait),
        },
        Step::AwaitAgent { node, size_bytes } => {
            // Placed by an earlier leader: hold its space here too.
            ctx.reservations()
                .hold(&uid, &node, size_bytes, Instant::now());
            // The node agent's answer brings the claim back; poll in case it is down.
            Ok(Next::After(AGENT_POLL))
        }
        Step::CreatePv(placement, volume) => {
            let (Some(class), Some(node)) = (class, node) else {
                return Ok(Next::Wait);
            };
            create_pv(ctx, caches, pvc, &class, &placement, &node, &volume).await
        }
        Step::Abandon => {
            let sig = verified.request.as_ref().map(|r| {
                ctx.signer.sign(&Message::Abandon {
                    claim_uid: &uid,
                    node: &r.node,
                    volume: r.spec.name.as_str(),
                })
            });
            ctx.patch_meta(
                caches,
                pvc,
                json!({"metadata": {"annotations": {ABANDON: "true", ABANDON_SIG: sig}}}),
            )
            .await?;
            ctx.reservations().release(&uid);
            Ok(next_step)
        }
        // The node agent's answer arrives as a watch event; poll in case it is down.
        Step::AwaitRemoval => Ok(Next::After(AGENT_POLL)),
        Step::LetGo { node, volume, why } => {
            ctx.event(
                pvc,
                EventType::Warning,
                "VolumeLeftOnNode",
                format!(
                    "node {node}'s agent {why}: releasing the deleted claim without removing its volume; directory volumes/{volume} may be left under the agent's root on node {node} (remove it when the node is back, see the README)"
                ),
            )
            .await;
            ctx.remove_finalizer(caches, pvc).await?;
            Ok(Next::Wait)
        }
        Step::Release => {
            ctx.remove_finalizer(caches, pvc).await?;
            Ok(Next::Wait)
        }
        Step::Fail(mut failure) => {
            // A restore refused by its agent stays refused: the VolumeRestore's status
            // reads the refusal from the claim, and another node would find the same
            // set (the reasons are the set's, the target's or the namespace's).
            if failure.metric == "refused"
                && verified
                    .request
                    .as_ref()
                    .is_some_and(|r| r.restore.is_some())
            {
                failure.then = Then::Retry(step::INVALID_RETRY);
            }
            fail(ctx, caches, pvc, failure, verified.ready).await
        }
    }
}

/// The volume the clone `pvc` copies (its dataSource claim `name`), from that claim and
/// its PV as the API server has them now ([`clone::resolve`]).
async fn read_source(
    ctx: &Ctx,
    pvc: &PersistentVolumeClaim,
    name: &str,
) -> Result<std::result::Result<clone::Source, clone::NotYet>> {
    let ns = pvc.namespace().unwrap_or_default();
    let source = ctx
        .claims(&ns)
        .get_opt(name)
        .await
        .map_err(Error::kube(format!(
            "read claim {ns}/{name}, a clone's source"
        )))?;
    let pv = match source.as_ref().and_then(|s| s.uid()) {
        Some(uid) => {
            let pv_name = pv_name(&uid);
            Api::<PersistentVolume>::all(ctx.client.clone())
                .get_opt(&pv_name)
                .await
                .map_err(Error::kube(format!("read PV {pv_name}, a clone's source")))?
        }
        None => None,
    };
    let requested = crate::objects::claim::requested_bytes(pvc).unwrap_or(0);
    Ok(clone::resolve(
        pvc,
        source.as_ref(),
        pv.as_ref(),
        &ctx.provisioner,
        requested,
    ))
}

/// How often a fresh VolumeRestore's claim not yet in its status is looked at again
/// (the controller records it a moment after making it); an older one waits longer
/// ([`restores::backoff`]: a claim naming a missing VolumeRestore may wait forever).
const RESTORE_POLL: Duration = Duration::from_secs(2);

/// How often a claim waiting on a node agent is looked at again (its answer normally
/// arrives as a watch event; this catches an agent that went away).
const AGENT_POLL: Duration = Duration::from_secs(10);

/// How soon a claim read older than our own last write is looked at again should the
/// watch event of that write not bring it back first (it normally does, within
/// moments); a cache read, no request.
const OWN_WRITE_WAIT: Duration = Duration::from_secs(2);

/// The one way provisioning fails: the metric, the warning event, and what follows.
/// The event goes first, so whoever sees the claim change can already read why.
async fn fail(
    ctx: &Ctx,
    caches: &Caches,
    pvc: &PersistentVolumeClaim,
    failure: Failure,
    ready: bool,
) -> Result<Next> {
    ctx.metrics.failed(failure.metric);
    ctx.event(
        pvc,
        EventType::Warning,
        "ProvisioningFailed",
        failure.message,
    )
    .await;
    let next = match failure.then {
        Then::Retry(after) => Next::After(after),
        Then::HandBack => {
            ctx.patch_meta(
                caches,
                pvc,
                json!({"metadata": {"annotations": {SELECTED_NODE: null}}}),
            )
            .await?;
            Next::Wait
        }
        Then::PlaceAgain => {
            // Only if the claim is unchanged since we read it, so a volume that was
            // just made is not lost track of.
            let mut annotations = json!({REQUEST: null, REQUEST_SIG: null, REFUSED: null});
            if annotation(pvc, SELECTED_NODE).is_some() {
                annotations[SELECTED_NODE] = serde_json::Value::Null;
            }
            ctx.patch_meta(
                caches,
                pvc,
                json!({"metadata": {
                    "resourceVersion": pvc.resource_version(),
                    "labels": {NODE_KEY: null},
                    "annotations": annotations,
                }}),
            )
            .await?;
            Next::Wait
        }
    };
    if !ready {
        // No volume is coming: hold no space for it.
        ctx.reservations().release(&pvc.uid().unwrap_or_default());
    }
    Ok(next)
}

/// Picks the claim's node, holds its space there and asks the node's agent for the
/// volume (by labelling the claim with the node and annotating the request), setting
/// the claim's `finalizers` in the same write when given.
async fn place(
    ctx: &Ctx,
    caches: &Caches,
    pvc: &PersistentVolumeClaim,
    class: &StorageClass,
    p: &Placement,
    finalizers: Option<Vec<String>>,
    restore: Option<RestoreSource>,
) -> Result<Next> {
    let uid = pvc.uid().unwrap_or_default();
    let free: Vec<NodeRoom> = ctx.node_rooms().into_iter().map(|(r, _)| r).collect();
    let allowed = allowed_nodes(ctx, class).await?;
    let selected = annotation(pvc, SELECTED_NODE);
    let size = p.request.size_bytes;
    // A clone tries the scheduler's choice, else its source's node, then any
    // (`clone::candidates`).
    let tries = match &p.clone {
        Some(source) => clone::candidates(source, selected),
        None => vec![selected],
    };
    let mut refused = Vec::new();
    let mut chosen = None;
    for target in tries {
        match ctx.choose_and_hold(&uid, target, &free, size, allowed.as_ref()) {
            Ok(n) => {
                chosen = Some(n);
                break;
            }
            Err(msg) => refused.push(msg),
        }
    }
    let Some(node) = chosen else {
        let msg = refused.join("; ");
        return fail(
            ctx,
            caches,
            pvc,
            Failure::no_room(msg, selected.is_some()),
            false,
        )
        .await;
    };
    let spec = p.params.volume_request(p.volume.clone(), size);
    let note_restore = restore.as_ref().map(|r| {
        format!(
            "restoring set {} of volume {} from backup target {} into volume {} ({size} bytes) on node {node}",
            r.set, r.volume, r.target, p.volume
        )
    });
    let req = match (&p.clone, restore) {
        (Some(source), _) => {
            VolumeRequest::clone_of(spec, uid.clone(), node.clone(), source.copy.clone())
        }
        (None, Some(source)) => VolumeRequest::restore_of(spec, uid.clone(), node.clone(), source),
        (None, None) => VolumeRequest::new(spec, uid.clone(), node.clone()),
    };
    let mut annotations = serde_json::Map::new();
    for (key, value) in
        signed::request_annotations(&ctx.signer, &req).map_err(Error::BuildObject)?
    {
        annotations.insert(key.to_owned(), value.into());
    }
    // Whatever answers the claim carries are not for this request (they were
    // ignored); clearing them keeps the claim readable.
    for key in [
        READY,
        READY_SIG,
        ABANDON,
        ABANDON_SIG,
        REMOVED,
        REMOVED_SIG,
        REFUSED,
    ] {
        if annotation(pvc, key).is_some() {
            annotations.insert(key.to_owned(), serde_json::Value::Null);
        }
    }
    // Only the claim as read: a stale leader's placement of a claim placed since by
    // another fails (409) instead of moving it, and the finalizer list, replaced
    // whole, replaces the one we read.
    let mut patch = json!({"metadata": {
        "resourceVersion": pvc.resource_version(),
        "labels": {NODE_KEY: node},
        "annotations": annotations,
    }});
    if let Some(f) = finalizers {
        patch["metadata"]["finalizers"] = json!(f);
    }
    let placed = ctx.patch_meta(caches, pvc, patch).await;
    if let Err(e) = placed {
        ctx.reservations().release(&uid);
        return Err(e);
    }
    // A plain provisioning that works has no event (the claim's node label says where
    // it is being made, its binding that it was; see `create_pv`). A clone, or a
    // claim that names itself, says here what it will hold.
    let note = match &p.clone {
        Some(source) => Some(clone::note(
            source,
            p.volume.as_str(),
            size,
            &node,
            selected,
            &refused,
        )),
        None if note_restore.is_some() => note_restore,
        None if clone::names_itself(pvc) => Some(format!(
            "creating volume {} ({size} bytes) on node {node}, empty: the claim's dataSource names the claim itself (a StatefulSet's first replica when its template clones that replica)",
            p.volume
        )),
        None => None,
    };
    if let Some(note) = note {
        ctx.event(pvc, EventType::Normal, "Provisioning", note)
            .await;
    }
    Ok(Next::After(Duration::from_secs(15)))
}

/// The volume exists on `node`: creates the claim's PV and completes the binding.
async fn create_pv(
    ctx: &Ctx,
    caches: &Caches,
    pvc: &PersistentVolumeClaim,
    class: &StorageClass,
    p: &Placement,
    node: &str,
    volume: &str,
) -> Result<Next> {
    let pv_name = pv_name(&pvc.uid().unwrap_or_default());
    ctx.reservations()
        .ready(&pvc.uid().unwrap_or_default(), Instant::now());
    let Some(ip) = ctx.node_ip(node).await? else {
        let failure = Failure {
            metric: "no-address",
            message: format!("node {node} has no InternalIP"),
            then: Then::Retry(Duration::from_secs(30)),
        };
        return fail(ctx, caches, pvc, failure, true).await;
    };
    let port = ctx
        .node_rooms()
        .iter()
        .find(|(r, _)| r.node == node)
        .map_or(2049, |(_, p)| *p);
    let pv = pv::build_pv(&PvInput {
        pvc,
        class,
        params: &p.params,
        request: &p.request,
        provisioner: &ctx.provisioner,
        node,
        node_ip: &ip,
        nfs_port: port,
        volume,
    })
    .map_err(Error::BuildObject)?;
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    ctx.fence.check()?;
    let mut pv = pv;
    match pvs.create(&PostParams::default(), &pv).await {
        Ok(created) => {
            pv = created; // with its resourceVersion, for the binding's conditional writes
            caches.wrote(&pv);
            ctx.metrics.provisioned.inc();
            if let Some(created) = &pvc.metadata.creation_timestamp {
                let secs = Timestamp::now().duration_since(created.0).as_secs_f64();
                ctx.metrics.provision_seconds.observe(secs.max(0.0));
            }
            // No event: the claim turning Bound to this PV says it, and the PV names
            // its node and address. An event per claim was a sixth of the
            // controller's writes in a burst (bench/README.md, the scale section).
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            // Made already (the PV watch had not shown it yet): bind to it as it is.
            match pvs
                .get_opt(&pv_name)
                .await
                .map_err(Error::kube(format!("read PV {pv_name}")))?
            {
                Some(existing) => pv = existing,
                None => return Ok(Next::After(Duration::from_secs(1))),
            }
        }
        Err(e) => return Err(Error::kube(format!("create PV {pv_name}"))(e)),
    }
    ctx.bind_and_release(caches, pvc, &pv).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lagging_pv_cache_never_lets_a_claim_with_a_pv_be_abandoned_or_released() {
        let failure = Failure {
            metric: "x",
            message: String::new(),
            then: Then::PlaceAgain,
        };
        let confirm_first = [
            Step::Finish,
            Step::Abandon,
            Step::AwaitRemoval,
            Step::Release,
            Step::LetGo {
                node: "n".into(),
                volume: "v".into(),
                why: "gone".into(),
            },
            Step::Fail(failure),
        ];
        for step in confirm_first {
            assert!(!safe_without_pv(&step), "{step:?} must read the PV first");
        }
        let decided_alone = [
            Step::Wait,
            Step::AddFinalizer,
            Step::AwaitAgent {
                node: "n".into(),
                size_bytes: 1,
            },
        ];
        for step in decided_alone {
            assert!(safe_without_pv(&step), "{step:?}");
        }
    }
}
