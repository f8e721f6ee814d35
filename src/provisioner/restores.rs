//! `VolumeRestore`: claims made from a backup set. The controller makes the claims the
//! object names (or `<template>-<statefulset>-<ordinal>` for every replica of a
//! StatefulSet), records each one's uid in the object's status, and when the claim
//! reconciler places such a claim it finds it there ([`source_for`]) and asks the
//! node agent for a volume filled from the set (a version-3 request). The agent
//! checks the set's owner namespace and restores before it answers ready.
//!
//! Rules:
//! 1. Only localnfs writes the status (tenants have no `/status` rights): a claim is
//!    a restore's claim only when its uid is in that status. The claim's
//!    [`RESTORE_KEY`] annotation only says "wait, do not provision me empty yet"
//!    (between the claim's creation and its uid reaching the status); it never
//!    decides what data the claim gets.
//! 2. A claim that already exists is never written into: its entry fails with
//!    "claim exists". So is an entry left without a uid by a controller stopped
//!    between making the claim and recording it (said so in its message); an entry
//!    left without a uid whose claim does not exist (stopped before making it) has
//!    its claim made then.
//! 3. The source is resolved once, into `status.source`: a Completed VolumeBackup of
//!    the namespace (its target, volume and set), or the spec's target, volume and
//!    set. Deleting the VolumeBackup later does not change what the claims get.
//! 4. A claim's phase: Pending until placed, Restoring while its node's agent works,
//!    Completed once Bound with the controller's signed request on it restoring
//!    `status.source` (its PV exists only once the agent restored and answered
//!    ready), Failed when the agent refused (its reason), the claim was deleted, or it
//!    was Bound without that request (another provisioner's, or provisioned empty
//!    after its annotation was removed). A `storageClassName` whose class is not
//!    localnfs's is refused at the start.
//!    The object is Completed when every claim is, Failed when every claim is final
//!    and one failed; `RestoreCompleted`/`RestoreFailed` events say so.
//!
//! The decisions are pure functions with table tests; [`reconcile`] reads, decides and
//! writes.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::ctx::Ctx;
use crate::error::{Error, Result};
use crate::kubeclient::annotation;
use crate::objects::backups::{
    ClaimPhase, Phase, ResolvedSource, RestoredClaim, VolumeBackup, VolumeRestore,
    VolumeRestoreSpec, VolumeRestoreStatus, status_patch,
};
use crate::objects::class::quantity_bytes;
use crate::objects::keys::{NODE_KEY, REFUSED, REQUEST};
use crate::objects::request::{RestoreSource, VolumeRequest};
use crate::volume::VolumeName;

/// On a claim a VolumeRestore made: that object's name. Only a "wait" (rule 1).
pub const RESTORE_KEY: &str = "localnfs.io/restore";

/// How often an unfinished restore is looked at again (its claims change without
/// the object changing).
const POLL: Duration = Duration::from_secs(3);

/// The longest wait between two looks at something only a tenant's object moves
/// (a VolumeBackup still running, a claim naming a missing VolumeRestore).
const MAX_WAIT: Duration = Duration::from_secs(60);

/// How long to wait before looking again at an object that has waited `age` (since
/// its creation): a quarter of its age, between `min` and a minute. The same as a
/// doubling backoff, but kept in no memory: many tenant objects waiting long cost
/// one look a minute each, not one every few seconds.
pub fn backoff(age: Duration, min: Duration) -> Duration {
    (age / 4).clamp(min, MAX_WAIT.max(min))
}

/// The age of `obj` (zero without a creation time, or one in the future).
pub fn age_of<K: ResourceExt>(obj: &K) -> Duration {
    obj.creation_timestamp().map_or(Duration::ZERO, |t| {
        let secs = k8s_openapi::jiff::Timestamp::now().as_second() - t.0.as_second();
        Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    })
}

/// The most claims one VolumeRestore makes.
const MAX_CLAIMS: usize = 100;

/// The claims `spec` asks for, in order; `Err` says why the spec is not valid.
pub fn claim_names(spec: &VolumeRestoreSpec) -> std::result::Result<Vec<String>, String> {
    let names = match (&spec.claims, &spec.stateful_set) {
        (Some(_), Some(_)) => {
            return Err("give either claims or statefulSet, not both".into());
        }
        (None, None) => return Err("give claims or statefulSet".into()),
        (Some(c), None) => c.clone(),
        // Checked before any name is built: a huge count must not allocate.
        (None, Some(s)) if !usize::try_from(s.replicas).is_ok_and(|n| n <= MAX_CLAIMS) => {
            return Err(format!(
                "{} claims asked for (statefulSet.replicas); at most {MAX_CLAIMS}",
                s.replicas
            ));
        }
        (None, Some(s)) => (0..s.replicas)
            .map(|i| format!("{}-{}-{i}", s.template, s.name))
            .collect(),
    };
    if names.is_empty() {
        return Err("no claims to make".into());
    }
    if names.len() > MAX_CLAIMS {
        return Err(format!(
            "{} claims asked for; at most {MAX_CLAIMS}",
            names.len()
        ));
    }
    for n in &names {
        if !is_dns_subdomain(n) {
            return Err(format!("{n:?} is not a valid claim name"));
        }
        if names.iter().filter(|m| *m == n).count() > 1 {
            return Err(format!("claim {n} is named twice"));
        }
    }
    Ok(names)
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// What the restore reads, from the spec and (for `source.backup`) that VolumeBackup
/// as read (`None`: not found). `Ok(None)`: not yet (the backup is still running).
pub fn resolve_source(
    spec: &VolumeRestoreSpec,
    backup: Option<&VolumeBackup>,
) -> std::result::Result<Option<ResolvedSource>, String> {
    let s = &spec.source;
    let resolved = match (&s.backup, &s.target, &s.volume) {
        (Some(name), None, None) => {
            let Some(b) = backup else {
                return Err(format!("VolumeBackup {name} not found in this namespace"));
            };
            let st = b.status.clone().unwrap_or_default();
            match st.phase {
                Some(Phase::Completed) => {}
                Some(Phase::Failed) => {
                    return Err(format!(
                        "VolumeBackup {name} failed: {}",
                        st.message.unwrap_or_default()
                    ));
                }
                _ => return Ok(None),
            }
            let (Some(volume), Some(set)) = (st.volume, st.set) else {
                return Err(format!(
                    "VolumeBackup {name} is Completed but names no volume and set"
                ));
            };
            ResolvedSource {
                target: b.spec.target.clone(),
                volume,
                set,
            }
        }
        (None, Some(target), Some(volume)) => ResolvedSource {
            target: target.clone(),
            volume: volume.clone(),
            set: s.set.clone().unwrap_or_else(|| "latest".into()),
        },
        _ => {
            return Err(
                "source: give backup, or target and volume (and set: latest or a set id)".into(),
            );
        }
    };
    if VolumeName::new(&resolved.volume).is_err() {
        return Err(format!("{:?} is not a volume name", resolved.volume));
    }
    Ok(Some(resolved))
}

/// Whether a claim's verified request (`objects::signed`) restores `source`: only
/// then did its volume come from this restore.
pub fn restores_source(request: Option<&VolumeRequest>, source: Option<&ResolvedSource>) -> bool {
    match (request.and_then(|r| r.restore.as_ref()), source) {
        (Some(r), Some(s)) => {
            r.target == s.target && r.volume.as_str() == s.volume && r.set == s.set
        }
        _ => false,
    }
}

/// A claim's entry as its claim stands now (`claim`: the claim of that name, if any;
/// `restored`: its verified request restores the object's source, [`restores_source`]).
pub fn claim_entry(
    entry: &RestoredClaim,
    claim: Option<&PersistentVolumeClaim>,
    restored: bool,
) -> RestoredClaim {
    let mut out = entry.clone();
    if entry.phase.is_some_and(ClaimPhase::is_final) {
        return out;
    }
    let Some(uid) = &entry.uid else {
        return out;
    };
    let Some(c) = claim.filter(|c| c.uid().as_deref() == Some(uid.as_str())) else {
        out.phase = Some(ClaimPhase::Failed);
        out.message = Some("the claim was deleted before it was restored".into());
        return out;
    };
    if let Some(node) = c.labels().get(NODE_KEY) {
        out.node = Some(node.clone());
    }
    let bound = c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    if bound && restored {
        out.phase = Some(ClaimPhase::Completed);
        out.message = None;
    } else if bound {
        // Bound by another provisioner, or provisioned empty once the tenant removed
        // the restore annotation: not this restore's data.
        out.phase = Some(ClaimPhase::Failed);
        out.message = Some("provisioned without the restore (its annotation was removed?)".into());
    } else if let Some(why) = annotation(c, REFUSED) {
        out.phase = Some(ClaimPhase::Failed);
        out.message = Some(why.to_owned());
    } else if annotation(c, REQUEST).is_some() {
        out.phase = Some(ClaimPhase::Restoring);
    } else {
        out.phase = Some(ClaimPhase::Pending);
    }
    out
}

/// Whether StorageClass `class` (its `provisioner`, `None`: not found) is ours
/// (`me`): another provisioner would bind the claims empty.
pub fn class_is_ours(
    class: &str,
    provisioner: Option<&str>,
    me: &str,
) -> std::result::Result<(), String> {
    match provisioner {
        Some(p) if p == me => Ok(()),
        Some(p) => Err(format!(
            "StorageClass {class} is provisioned by {p}, not {me}: it cannot restore"
        )),
        None => Err(format!("StorageClass {class} not found")),
    }
}

/// The object's phase from its claims' (all recorded).
pub fn overall(claims: &[RestoredClaim]) -> Phase {
    let final_ = |c: &RestoredClaim| c.phase.is_some_and(ClaimPhase::is_final);
    if claims.is_empty() {
        Phase::Pending
    } else if claims
        .iter()
        .all(|c| c.phase == Some(ClaimPhase::Completed))
    {
        Phase::Completed
    } else if claims.iter().all(final_) {
        Phase::Failed
    } else {
        Phase::Running
    }
}

/// What the claim reconciler does with a claim about to be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Not a restore's claim: provision as usual.
    Plain,
    /// A restore's claim: ask the agent for a volume filled from this set.
    From(RestoreSource),
    /// Not now (why, for the log).
    Wait(String),
}

/// Whether claim `pvc` is one of `restore`'s claims (by uid in its status) and what
/// it restores. `marked`: the claim carries [`RESTORE_KEY`] naming `restore`.
pub fn lookup(pvc: &PersistentVolumeClaim, restore: Option<&VolumeRestore>) -> Lookup {
    let name = annotation(pvc, RESTORE_KEY).unwrap_or_default();
    let Some(r) = restore else {
        return Lookup::Wait(format!(
            "VolumeRestore {name} not found; the claim waits (remove annotation {RESTORE_KEY} to provision it empty)"
        ));
    };
    let uid = pvc.uid().unwrap_or_default();
    let status = r.status.clone().unwrap_or_default();
    let Some(entry) = status
        .claims
        .iter()
        .find(|c| c.uid.as_deref() == Some(uid.as_str()))
    else {
        return Lookup::Wait(format!("VolumeRestore {name} does not list this claim yet"));
    };
    if entry.phase.is_some_and(ClaimPhase::is_final) {
        return Lookup::Wait(format!(
            "VolumeRestore {name} is done with this claim ({:?})",
            entry.phase
        ));
    }
    let Some(src) = status.source else {
        return Lookup::Wait(format!("VolumeRestore {name} has no source yet"));
    };
    let Ok(volume) = VolumeName::new(&src.volume) else {
        return Lookup::Wait(format!(
            "VolumeRestore {name}'s volume is not a volume name"
        ));
    };
    Lookup::From(RestoreSource {
        target: src.target,
        volume,
        set: src.set,
        namespace: pvc.namespace().unwrap_or_default(),
    })
}

/// For the claim reconciler: [`lookup`] with the VolumeRestore the claim's
/// annotation names read from the API server. A claim without the annotation is
/// plain.
pub async fn source_for(ctx: &Ctx, pvc: &PersistentVolumeClaim) -> Result<Lookup> {
    let Some(name) = annotation(pvc, RESTORE_KEY) else {
        return Ok(Lookup::Plain);
    };
    let ns = pvc.namespace().unwrap_or_default();
    let restore = Api::<VolumeRestore>::namespaced(ctx.client.clone(), &ns)
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("read VolumeRestore {ns}/{name}")))?;
    Ok(lookup(pvc, restore.as_ref()))
}

/// Runs the VolumeRestore reconciler until `stop` fires (leader only).
pub async fn run(ctx: Arc<Ctx>, stop: CancellationToken) {
    // With the watch's backoff: a cluster without the CRDs yet retries calmly.
    crate::cache::controller(
        Api::<VolumeRestore>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(stop.cancelled_owned())
    .run(reconcile, error_policy, ctx)
    .for_each(|_| futures::future::ready(()))
    .await;
}

fn error_policy(_: Arc<VolumeRestore>, e: &Error, ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %e, "VolumeRestore reconcile failed");
    ctx.metrics.reconcile_errors.inc();
    Action::requeue(crate::kubeclient::retry_after(e))
}

/// One VolumeRestore: resolve, make the claims, follow them (see the module doc).
async fn reconcile(cached: Arc<VolumeRestore>, ctx: Arc<Ctx>) -> Result<Action> {
    let (ns, name) = (cached.namespace().unwrap_or_default(), cached.name_any());
    // Read afresh: the watch may not have brought our own last status write yet, and
    // an entry read without the uid we just recorded would be failed (rule 2).
    let Some(vr) = Api::<VolumeRestore>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&name)
        .await
        .map_err(Error::kube(format!("read VolumeRestore {ns}/{name}")))?
    else {
        return Ok(Action::await_change());
    };
    let vr = &vr;
    let status = vr.status.clone().unwrap_or_default();
    if status.phase.is_some_and(Phase::is_final) || vr.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let claims_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    if status.claims.is_empty() {
        return start(&ctx, vr, &claims_api).await;
    }
    let mut next = status.clone();
    // Made once, and only if some entry was recorded but not made (rule 2).
    let mut shape: Option<(String, String)> = None;
    for entry in &mut next.claims {
        if entry.uid.is_none() && !entry.phase.is_some_and(ClaimPhase::is_final) {
            let claim = claims_api
                .get_opt(&entry.name)
                .await
                .map_err(Error::kube(format!("read claim {ns}/{}", entry.name)))?;
            if claim.is_none() {
                // Recorded but never made (the controller stopped in between): make
                // it now; a claim made meanwhile by someone else is a 409 below.
                if shape.is_none() {
                    shape = match claim_shape(&ctx, vr).await? {
                        Ok(s) => Some(s),
                        Err(why) => {
                            entry.phase = Some(ClaimPhase::Failed);
                            entry.message = Some(why);
                            continue;
                        }
                    };
                }
                if let Some((class, size)) = &shape {
                    make_claim(&ctx, &claims_api, &name, class, size, entry).await?;
                }
                continue;
            }
            // Rule 2: made or not, we cannot tell it is ours.
            entry.phase = Some(ClaimPhase::Failed);
            entry.message = Some(
                "claim exists, or was made by a controller stopped before it recorded it: not restored; delete the claim and this VolumeRestore and apply it again".into(),
            );
            continue;
        }
        if entry.phase.is_some_and(ClaimPhase::is_final) {
            continue;
        }
        let claim = claims_api
            .get_opt(&entry.name)
            .await
            .map_err(Error::kube(format!("read claim {ns}/{}", entry.name)))?;
        let restored = claim
            .as_ref()
            .is_some_and(|c| restores_source(ctx.verify(c).request.as_ref(), next.source.as_ref()));
        *entry = claim_entry(entry, claim.as_ref(), restored);
    }
    let phase = overall(&next.claims);
    next.phase = Some(phase);
    next.message = match phase {
        Phase::Completed => Some(format!("{} claims restored", next.claims.len())),
        Phase::Failed => Some(failed_summary(&next.claims)),
        _ => next.message.clone(),
    };
    if next != status {
        write_status(&ctx, &ns, &name, &next).await?;
        match phase {
            Phase::Completed => {
                let note = format!(
                    "restored {} from set {} of volume {}",
                    names(&next.claims),
                    next.source.as_ref().map_or("", |s| s.set.as_str()),
                    next.source.as_ref().map_or("", |s| s.volume.as_str()),
                );
                event(&ctx, vr, EventType::Normal, "RestoreCompleted", note).await;
            }
            Phase::Failed => {
                let note = failed_summary(&next.claims);
                event(&ctx, vr, EventType::Warning, "RestoreFailed", note).await;
            }
            _ => {}
        }
    }
    Ok(if phase.is_final() {
        Action::await_change()
    } else {
        Action::requeue(POLL)
    })
}

/// First pass: validate, resolve the source, record the intended claims, make them.
async fn start(
    ctx: &Ctx,
    vr: &VolumeRestore,
    claims_api: &Api<PersistentVolumeClaim>,
) -> Result<Action> {
    let (ns, name) = (vr.namespace().unwrap_or_default(), vr.name_any());
    let fail = |why: String| VolumeRestoreStatus {
        phase: Some(Phase::Failed),
        message: Some(why),
        ..VolumeRestoreStatus::default()
    };
    let names = match claim_names(&vr.spec) {
        Ok(n) => n,
        Err(why) => return give_up(ctx, vr, fail(why)).await,
    };
    let backup = source_backup(ctx, vr).await?;
    let source = match resolve_source(&vr.spec, backup.as_ref()) {
        Ok(Some(s)) => s,
        Ok(None) => {
            let waiting = VolumeRestoreStatus {
                phase: Some(Phase::Pending),
                message: Some(format!(
                    "waiting for VolumeBackup {} to complete",
                    vr.spec.source.backup.as_deref().unwrap_or_default()
                )),
                ..VolumeRestoreStatus::default()
            };
            if vr.status.as_ref() != Some(&waiting) {
                write_status(ctx, &ns, &name, &waiting).await?;
            }
            return Ok(Action::requeue(backoff(age_of(vr), POLL)));
        }
        Err(why) => return give_up(ctx, vr, fail(why)).await,
    };
    let Some(class) = vr.spec.storage_class_name.clone() else {
        return give_up(ctx, vr, fail("storageClassName is required".into())).await;
    };
    // The watched classes first; a class the watch has not brought yet is read.
    let provisioner = match ctx.classes.get(&ObjectRef::new(&class)) {
        Some(c) => Some(c.provisioner.clone()),
        None => Api::<StorageClass>::all(ctx.client.clone())
            .get_opt(&class)
            .await
            .map_err(Error::kube(format!("read StorageClass {class}")))?
            .map(|c| c.provisioner),
    };
    if let Err(why) = class_is_ours(&class, provisioner.as_deref(), &ctx.provisioner) {
        return give_up(ctx, vr, fail(why)).await;
    }
    let size = match size_of(ctx, vr, backup.as_ref()).await? {
        Ok(s) => s,
        Err(why) => return give_up(ctx, vr, fail(why)).await,
    };
    // The intent first: a claim made but not recorded is then an entry without a
    // uid, failed rather than silently adopted (rule 2).
    let mut status = VolumeRestoreStatus {
        phase: Some(Phase::Running),
        claims: names
            .iter()
            .map(|n| RestoredClaim {
                name: n.clone(),
                phase: Some(ClaimPhase::Pending),
                ..RestoredClaim::default()
            })
            .collect(),
        message: None,
        source: Some(source),
    };
    write_status(ctx, &ns, &name, &status).await?;
    for entry in &mut status.claims {
        make_claim(ctx, claims_api, &name, &class, &size, entry).await?;
    }
    write_status(ctx, &ns, &name, &status).await?;
    Ok(Action::requeue(POLL))
}

/// Makes `entry`'s claim (annotated with the VolumeRestore `restore`) and records its
/// uid in `entry`; a claim already there fails the entry (rule 2).
async fn make_claim(
    ctx: &Ctx,
    claims_api: &Api<PersistentVolumeClaim>,
    restore: &str,
    class: &str,
    size: &str,
    entry: &mut RestoredClaim,
) -> Result<()> {
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {
            "name": entry.name,
            "annotations": {RESTORE_KEY: restore},
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": class,
            "resources": {"requests": {"storage": size}},
        },
    }))
    .map_err(|e| Error::BuildObject(format!("claim {}: {e}", entry.name)))?;
    ctx.fence.check()?;
    match claims_api.create(&PostParams::default(), &claim).await {
        Ok(made) => entry.uid = made.uid(),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            entry.phase = Some(ClaimPhase::Failed);
            entry.message =
                Some("claim exists: a restore never writes into an existing claim".into());
        }
        Err(e) => {
            entry.phase = Some(ClaimPhase::Failed);
            entry.message = Some(format!("cannot create the claim: {e}"));
        }
    }
    Ok(())
}

/// The VolumeBackup `vr`'s source names, read (`None`: none named, or not found).
async fn source_backup(ctx: &Ctx, vr: &VolumeRestore) -> Result<Option<VolumeBackup>> {
    let Some(b) = &vr.spec.source.backup else {
        return Ok(None);
    };
    let ns = vr.namespace().unwrap_or_default();
    Api::<VolumeBackup>::namespaced(ctx.client.clone(), &ns)
        .get_opt(b)
        .await
        .map_err(Error::kube(format!("read VolumeBackup {ns}/{b}")))
}

/// The class and size of the claims `vr` makes, read again (for entries recorded but
/// not made). `Ok(Err)`: why there are none now.
async fn claim_shape(
    ctx: &Ctx,
    vr: &VolumeRestore,
) -> Result<std::result::Result<(String, String), String>> {
    let Some(class) = vr.spec.storage_class_name.clone() else {
        return Ok(Err("storageClassName is required".into()));
    };
    let backup = source_backup(ctx, vr).await?;
    Ok(size_of(ctx, vr, backup.as_ref())
        .await?
        .map(|size| (class, size)))
}

/// The claims' size: the spec's, else the backed-up claim's request (a VolumeBackup
/// source whose claim still exists). `Ok(Err)`: why there is none.
async fn size_of(
    ctx: &Ctx,
    vr: &VolumeRestore,
    backup: Option<&VolumeBackup>,
) -> Result<std::result::Result<String, String>> {
    if let Some(s) = &vr.spec.size {
        return Ok(quantity_bytes(s)
            .map(|_| s.clone())
            .map_err(|e| format!("size {s:?}: {e}")));
    }
    let none = || {
        Err("size is required unless the source is a VolumeBackup whose claim still exists (its size is used)".to_owned())
    };
    let Some(b) = backup else {
        return Ok(none());
    };
    let ns = vr.namespace().unwrap_or_default();
    let claim = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&b.spec.claim)
        .await
        .map_err(Error::kube(format!("read claim {ns}/{}", b.spec.claim)))?;
    let size = claim
        .and_then(|c| c.spec)
        .and_then(|s| s.resources)
        .and_then(|r| r.requests)
        .and_then(|r| r.get("storage").cloned());
    Ok(size.map(|q| q.0).ok_or(()).or_else(|()| none()))
}

async fn give_up(ctx: &Ctx, vr: &VolumeRestore, status: VolumeRestoreStatus) -> Result<Action> {
    let (ns, name) = (vr.namespace().unwrap_or_default(), vr.name_any());
    write_status(ctx, &ns, &name, &status).await?;
    let why = status.message.unwrap_or_default();
    event(ctx, vr, EventType::Warning, "RestoreFailed", why).await;
    Ok(Action::await_change())
}

fn names(claims: &[RestoredClaim]) -> String {
    claims
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn failed_summary(claims: &[RestoredClaim]) -> String {
    claims
        .iter()
        .filter(|c| c.phase == Some(ClaimPhase::Failed))
        .map(|c| format!("{}: {}", c.name, c.message.as_deref().unwrap_or("failed")))
        .collect::<Vec<_>>()
        .join("; ")
}

async fn write_status(ctx: &Ctx, ns: &str, name: &str, status: &VolumeRestoreStatus) -> Result<()> {
    ctx.fence.check()?;
    Api::<VolumeRestore>::namespaced(ctx.client.clone(), ns)
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(status_patch::<VolumeRestore>(status)),
        )
        .await
        .map_err(Error::kube(format!(
            "write the status of VolumeRestore {ns}/{name}"
        )))?;
    Ok(())
}

async fn event(ctx: &Ctx, vr: &VolumeRestore, type_: EventType, reason: &str, note: String) {
    ctx.events.publish(vr, type_, reason, "Restore", note).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::backups::{
        RestoreSource as Src, StatefulSetClaims, VolumeBackupSpec, VolumeBackupStatus,
    };

    fn spec(claims: Option<Vec<&str>>, sts: Option<(&str, &str, u32)>) -> VolumeRestoreSpec {
        VolumeRestoreSpec {
            source: Src {
                target: Some("nightly".into()),
                volume: Some("pvc-1".into()),
                ..Src::default()
            },
            storage_class_name: Some("localnfs".into()),
            claims: claims.map(|c| c.into_iter().map(String::from).collect()),
            stateful_set: sts.map(|(name, template, replicas)| StatefulSetClaims {
                name: name.into(),
                template: template.into(),
                replicas,
            }),
            ..VolumeRestoreSpec::default()
        }
    }

    #[test]
    fn a_long_wait_is_looked_at_less_often() {
        let s = Duration::from_secs;
        assert_eq!(backoff(s(0), s(3)), s(3));
        assert_eq!(backoff(s(40), s(3)), s(10));
        assert_eq!(backoff(s(3600), s(3)), s(60));
        assert_eq!(backoff(s(86_400), s(2)), s(60));
    }

    #[test]
    fn a_statefulset_restore_names_every_replicas_claim() {
        assert_eq!(
            claim_names(&spec(None, Some(("mysql", "data", 3)))),
            Ok(vec![
                "data-mysql-0".into(),
                "data-mysql-1".into(),
                "data-mysql-2".into()
            ])
        );
        assert_eq!(
            claim_names(&spec(Some(vec!["db-restored"]), None)),
            Ok(vec!["db-restored".into()])
        );
    }

    #[test]
    fn a_restore_naming_claims_badly_is_refused() {
        for (s, why) in [
            (spec(None, None), "give claims or statefulSet"),
            (spec(Some(vec!["a"]), Some(("m", "d", 1))), "not both"),
            (spec(Some(vec![]), None), "no claims"),
            (spec(Some(vec!["a", "a"]), None), "named twice"),
            (spec(Some(vec!["../x"]), None), "not a valid claim name"),
            (spec(None, Some(("m", "d", 1000))), "at most"),
            (spec(None, Some(("m", "d", 101))), "at most 100"),
            // Refused before any name is built (this once allocated billions).
            (spec(None, Some(("m", "d", u32::MAX))), "at most"),
        ] {
            let got = claim_names(&s).expect_err(why);
            assert!(got.contains(why), "{got} / {why}");
        }
    }

    fn backup(phase: Phase, set: Option<&str>) -> VolumeBackup {
        VolumeBackup {
            spec: VolumeBackupSpec {
                claim: "data-mysql-0".into(),
                target: "nightly".into(),
                ..VolumeBackupSpec::default()
            },
            status: Some(VolumeBackupStatus {
                phase: Some(phase),
                volume: Some("pvc-9".into()),
                set: set.map(String::from),
                message: Some("target full".into()),
                ..VolumeBackupStatus::default()
            }),
            ..VolumeBackup::default()
        }
    }

    #[test]
    fn the_source_is_a_completed_backups_set_or_the_specs() {
        let mut s = spec(Some(vec!["x"]), None);
        assert_eq!(
            resolve_source(&s, None),
            Ok(Some(ResolvedSource {
                target: "nightly".into(),
                volume: "pvc-1".into(),
                set: "latest".into()
            }))
        );
        s.source = Src {
            backup: Some("b".into()),
            ..Src::default()
        };
        let done = backup(Phase::Completed, Some("20261207T011500.123Z"));
        assert_eq!(
            resolve_source(&s, Some(&done)),
            Ok(Some(ResolvedSource {
                target: "nightly".into(),
                volume: "pvc-9".into(),
                set: "20261207T011500.123Z".into()
            }))
        );
        assert_eq!(
            resolve_source(&s, Some(&backup(Phase::Running, None))),
            Ok(None)
        );
        let failed = resolve_source(&s, Some(&backup(Phase::Failed, None))).expect_err("failed");
        assert!(failed.contains("target full"), "{failed}");
        assert!(
            resolve_source(&s, None)
                .expect_err("missing")
                .contains("not found")
        );
        s.source.target = Some("nightly".into());
        assert!(
            resolve_source(&s, None)
                .expect_err("both")
                .contains("give backup, or")
        );
    }

    fn pvc(uid: &str, extra: serde_json::Value) -> PersistentVolumeClaim {
        let mut v = json!({"metadata": {"name": "c", "namespace": "shop", "uid": uid,
            "annotations": {RESTORE_KEY: "r"}}});
        if let (Some(m), Some(e)) = (v["metadata"].as_object_mut(), extra["metadata"].as_object()) {
            for (k, val) in e {
                if let (Some(a), Some(b)) = (
                    m.get_mut(k).and_then(|x| x.as_object_mut()),
                    val.as_object(),
                ) {
                    a.extend(b.clone());
                } else {
                    m.insert(k.clone(), val.clone());
                }
            }
        }
        if let Some(st) = extra.get("status") {
            v["status"] = st.clone();
        }
        serde_json::from_value(v).expect("claim")
    }

    fn entry(uid: Option<&str>) -> RestoredClaim {
        RestoredClaim {
            name: "c".into(),
            uid: uid.map(String::from),
            phase: Some(ClaimPhase::Pending),
            ..RestoredClaim::default()
        }
    }

    #[test]
    fn a_claims_phase_follows_its_placement_answer_and_binding() {
        let e = entry(Some("u1"));
        let phase = |c: &PersistentVolumeClaim| claim_entry(&e, Some(c), true).phase;
        assert_eq!(phase(&pvc("u1", json!({}))), Some(ClaimPhase::Pending));
        let placed = pvc(
            "u1",
            json!({"metadata": {"labels": {NODE_KEY: "n1"}, "annotations": {REQUEST: "{}"}}}),
        );
        assert_eq!(phase(&placed), Some(ClaimPhase::Restoring));
        assert_eq!(
            claim_entry(&e, Some(&placed), true).node.as_deref(),
            Some("n1")
        );
        let refused = pvc(
            "u1",
            json!({"metadata": {"annotations": {REQUEST: "{}", REFUSED: "node n1: the set belongs to namespace bank"}}}),
        );
        let r = claim_entry(&e, Some(&refused), true);
        assert_eq!(r.phase, Some(ClaimPhase::Failed));
        assert!(r.message.expect("why").contains("namespace bank"));
        let bound = pvc("u1", json!({"status": {"phase": "Bound"}}));
        assert_eq!(phase(&bound), Some(ClaimPhase::Completed));
    }

    #[test]
    fn a_claim_bound_without_the_restore_is_not_reported_restored() {
        let e = entry(Some("u1"));
        let bound = pvc("u1", json!({"status": {"phase": "Bound"}}));
        let r = claim_entry(&e, Some(&bound), false);
        assert_eq!(r.phase, Some(ClaimPhase::Failed));
        assert!(r.message.expect("why").contains("without the restore"));
    }

    #[test]
    fn only_a_request_restoring_the_objects_source_counts() {
        let src = ResolvedSource {
            target: "nightly".into(),
            volume: "pvc-9".into(),
            set: "20261207T011500.123Z".into(),
        };
        let spec = crate::volume::VolumeSpec::new(VolumeName::new("pvc-u1").expect("name"), 1);
        let from = |target: &str, volume: &str, set: &str| {
            VolumeRequest::restore_of(
                spec.clone(),
                "u1".into(),
                "n1".into(),
                RestoreSource {
                    target: target.into(),
                    volume: VolumeName::new(volume).expect("name"),
                    set: set.into(),
                    namespace: "shop".into(),
                },
            )
        };
        let right = from("nightly", "pvc-9", "20261207T011500.123Z");
        assert!(restores_source(Some(&right), Some(&src)));
        for wrong in [
            from("other", "pvc-9", "20261207T011500.123Z"),
            from("nightly", "pvc-8", "20261207T011500.123Z"),
            from("nightly", "pvc-9", "latest"),
        ] {
            assert!(!restores_source(Some(&wrong), Some(&src)), "{wrong:?}");
        }
        assert!(!restores_source(None, Some(&src)), "no verified request");
        assert!(!restores_source(Some(&right), None), "no source");
    }

    #[test]
    fn a_restore_into_another_provisioners_class_is_refused() {
        assert_eq!(
            class_is_ours("localnfs", Some("localnfs.io/nfs"), "localnfs.io/nfs"),
            Ok(())
        );
        let e = class_is_ours(
            "standard",
            Some("kubernetes.io/host-path"),
            "localnfs.io/nfs",
        )
        .expect_err("other");
        assert!(e.contains("not localnfs.io/nfs"), "{e}");
        let e = class_is_ours("gone", None, "localnfs.io/nfs").expect_err("missing");
        assert!(e.contains("not found"), "{e}");
    }

    #[test]
    fn a_claim_deleted_or_made_again_fails_its_entry() {
        let e = entry(Some("u1"));
        assert_eq!(claim_entry(&e, None, false).phase, Some(ClaimPhase::Failed));
        let again = pvc("u2", json!({"status": {"phase": "Bound"}}));
        assert_eq!(
            claim_entry(&e, Some(&again), true).phase,
            Some(ClaimPhase::Failed)
        );
    }

    #[test]
    fn the_restore_completes_when_every_claim_has() {
        let with = |phases: &[ClaimPhase]| -> Vec<RestoredClaim> {
            phases
                .iter()
                .map(|p| RestoredClaim {
                    phase: Some(*p),
                    ..entry(Some("u"))
                })
                .collect()
        };
        use ClaimPhase::*;
        assert_eq!(overall(&with(&[Completed, Completed])), Phase::Completed);
        assert_eq!(overall(&with(&[Completed, Restoring])), Phase::Running);
        assert_eq!(overall(&with(&[Completed, Failed])), Phase::Failed);
        assert_eq!(overall(&with(&[Failed, Pending])), Phase::Running);
    }

    fn restore(claims: Vec<RestoredClaim>, source: bool) -> VolumeRestore {
        VolumeRestore {
            status: Some(VolumeRestoreStatus {
                claims,
                source: source.then(|| ResolvedSource {
                    target: "nightly".into(),
                    volume: "pvc-9".into(),
                    set: "latest".into(),
                }),
                ..VolumeRestoreStatus::default()
            }),
            ..VolumeRestore::default()
        }
    }

    #[test]
    fn a_claim_is_restored_only_when_its_uid_is_in_the_status() {
        let c = pvc("u1", json!({}));
        assert_eq!(
            lookup(&c, Some(&restore(vec![entry(Some("u1"))], true))),
            Lookup::From(RestoreSource {
                target: "nightly".into(),
                volume: VolumeName::new("pvc-9").expect("name"),
                set: "latest".into(),
                namespace: "shop".into(),
            })
        );
        // The annotation alone (another claim's uid listed, or none yet) only waits.
        for r in [
            Some(restore(vec![entry(Some("u2"))], true)),
            Some(restore(vec![entry(None)], true)),
            None,
        ] {
            assert!(matches!(lookup(&c, r.as_ref()), Lookup::Wait(_)), "{r:?}");
        }
        let failed = RestoredClaim {
            phase: Some(ClaimPhase::Failed),
            ..entry(Some("u1"))
        };
        assert!(matches!(
            lookup(&c, Some(&restore(vec![failed], true))),
            Lookup::Wait(_)
        ));
    }
}
