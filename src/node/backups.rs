//! VolumeBackups (`objects::backups`) of this node's volumes: the agent watches them in
//! every namespace and runs those whose claim's volume lives here.
//!
//! Which volume is read is decided by facts a tenant cannot forge (DESIGN invariant
//! 11): the PV must be one of this node's (the agent's PV cache holds only PVs
//! labelled with its node, which only localnfs writes), Bound to the claim the object
//! names in its own namespace (`claimRef` with the claim's current uid, read fresh
//! from the API server: a Released PV of an earlier claim of that name is not it, and
//! an object whose claim has no such PV here is left alone, never failed: the leader
//! fails one no agent will run, `provisioner::backups`) ([`claims_pv`]), and the
//! volume's **owner record on disk** must be that claim
//! (uid and namespace) ([`resolve`]). A PV re-pointed at another volume, or annotations
//! a tenant writes on its claim, therefore never make the agent read someone else's
//! data: the object fails with the reason and nothing is written to the target. The
//! target is one of `--backup-target`'s names ([`super::targets`]), never a path.
//!
//! A target that is one of this agent's own volumes (an NFS mount of its export, or a
//! bind mount of its directory) would put the backup on the disk it protects: before
//! anything is written, a uniquely named probe file is created in the target and looked
//! for at the top of each of this node's volume directories ([`own_volume_behind`]);
//! found, the backup is refused. The engine's own refusals (target inside the store,
//! on the store's device) stay.
//!
//! The agent's first status write on an object ([`take_up`]: Pending, its node) carries
//! the copy's `resourceVersion`, as the leader's Failed does: of the two, one lands and
//! the other sees it, so the leader never fails a backup an agent took up, and an agent
//! never revives one the leader failed.
//!
//! One backup runs at a time per agent; others wait Pending with a message. One
//! VolumeBackup per claim is unfinished at a time: a later one fails at once
//! ([`earlier_unfinished`]), so one tenant cannot queue many ahead of the others. While one
//! runs, `status.progressBytes` and `bytesPerSecond` are written about every second, and
//! the gauge `localnfs_backup_progress_bytes` follows them. The result is the final
//! status and an event on the object: `BackupCompleted`, `BackupFailed`, or
//! `BackupTargetUnavailable` when the target was full or unreachable (the source is
//! touched only by the snapshot's pause; a schedule's next backup is tried as usual).
//!
//! Restarts: an agent that finds a VolumeBackup in Running with its own node in
//! `status.node` (written by the agent that started it) that it did not start in this
//! process marks it Failed ("the node agent restarted during the
//! backup"): rerunning it would back up a later instant than the one the object was
//! created for. The unfinished set stays on the target, never listed, and the next
//! backup of the volume removes it. Deleting a VolumeBackup does not delete its set:
//! sets are governed by `keep`/`maxAge` only.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use super::targets::BackupTargets;
use crate::error::{Error, Result};
use crate::kubeclient::annotation as ann;
use crate::nfs::Exports;
use crate::objects::backups::{Phase, VolumeBackup, VolumeBackupStatus, status_patch};
use crate::objects::keys::VOLUME_KEY;
use crate::volume::{Owner, VolumeName};
use localnfs_nfs::backup::BackupOptions;

/// How often a running backup's progress is written to its status.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// How long a VolumeBackup whose claim has no PV on this node waits before it is looked
/// at again (the claim may be bound later, to a PV of this node).
const NOT_MINE_RECHECK: Duration = Duration::from_secs(30);

/// Event reasons.
pub const COMPLETED: &str = "BackupCompleted";
pub const FAILED: &str = "BackupFailed";
pub const TARGET_UNAVAILABLE: &str = "BackupTargetUnavailable";

/// What the backup reconciler shares.
pub struct Backups {
    pub client: Client,
    pub node: String,
    pub exports: Arc<Exports>,
    pub targets: BackupTargets,
    pub events: crate::events::Events,
    /// This node's PVs (the agent's PV watch).
    pub pvs: Store<PersistentVolume>,
    /// `localnfs_backup_progress_bytes`.
    pub progress: Gauge,
    /// VolumeBackups (uid) this process started: one in Running that is not here was
    /// cut short by a restart. Forgotten once seen Completed or Failed (a cached copy
    /// may still say Running after the final write).
    started: Mutex<HashSet<String>>,
    /// Final statuses whose write failed, by uid: written again by the retry.
    results: Mutex<HashMap<String, VolumeBackupStatus>>,
    /// One backup at a time on this agent.
    slot: tokio::sync::Semaphore,
}

impl Backups {
    pub fn new(
        client: Client,
        node: String,
        exports: Arc<Exports>,
        targets: BackupTargets,
        pvs: Store<PersistentVolume>,
        progress: Gauge,
    ) -> Self {
        Backups {
            events: crate::events::Events::new(client.clone(), "localnfs-node", &node),
            client,
            node,
            exports,
            targets,
            pvs,
            progress,
            started: Mutex::default(),
            results: Mutex::default(),
            slot: tokio::sync::Semaphore::new(1),
        }
    }
}

/// Runs the VolumeBackup reconciler until `shutdown`.
pub async fn run(ctx: Arc<Backups>, shutdown: CancellationToken) {
    // Which VolumeBackups are this node's is read from the PV cache: nothing is
    // decided before it holds its first list (a Running one found after a restart is
    // then told apart at once).
    tokio::select! {
        _ = shutdown.cancelled() => return,
        r = ctx.pvs.wait_until_ready() => if r.is_err() {
            return;
        },
    }
    crate::cache::controller(
        Api::<VolumeBackup>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(shutdown.cancelled_owned())
    .run(reconcile, error_policy, ctx)
    .for_each(|_| futures::future::ready(()))
    .await;
}

fn error_policy(_obj: Arc<VolumeBackup>, err: &Error, _ctx: Arc<Backups>) -> Action {
    Action::requeue(crate::kubeclient::retry_after(err))
}

/// Why a backup is not run, as the object's message.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal(pub String);

/// Which volume of this node a VolumeBackup reads (see the module doc): the PV's
/// volume, if the PV is bound to the claim (`claim_uid`, read fresh) and the volume's
/// owner record names that claim in the object's namespace.
pub fn resolve(
    node: &str,
    namespace: &str,
    claim: &str,
    claim_uid: Option<&str>,
    pv_claim_uid: Option<&str>,
    volume: Option<&str>,
    owner: Option<&Owner>,
) -> Result<VolumeName, Refusal> {
    let Some(uid) = claim_uid else {
        return Err(Refusal(format!("claim {namespace}/{claim} does not exist")));
    };
    if pv_claim_uid != Some(uid) {
        return Err(Refusal(format!(
            "claim {namespace}/{claim} (uid {uid}) is not the claim its PV on node {node} is bound to"
        )));
    }
    let Some(volume) = volume.and_then(|v| VolumeName::new(v).ok()) else {
        return Err(Refusal(format!(
            "the PV of claim {namespace}/{claim} names no volume of node {node}"
        )));
    };
    match owner {
        Some(o) if o.claim_uid == uid && o.namespace == namespace => Ok(volume),
        Some(o) => Err(Refusal(format!(
            "volume {volume} on node {node} belongs to {o}, not to claim {namespace}/{claim} (uid {uid}): nothing was read"
        ))),
        None => Err(Refusal(format!(
            "volume {volume} on node {node} has no owner record naming claim {namespace}/{claim}: nothing was read"
        ))),
    }
}

/// Whether `pv`'s `claimRef` names claim `claim` of namespace `ns` (any uid).
fn claim_ref_names(pv: &PersistentVolume, ns: &str, claim: &str) -> bool {
    pv.spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .is_some_and(|r| r.namespace.as_deref() == Some(ns) && r.name.as_deref() == Some(claim))
}

/// The PV of `pvs` (this node's) that holds claim `ns/claim` now: Bound, with the
/// claim's current uid (`claim_uid`, read fresh) in its `claimRef`. `None`: the claim
/// is not this node's (or does not exist): the VolumeBackup is another agent's, or
/// nobody's yet.
pub fn claims_pv<'a, P: std::ops::Deref<Target = PersistentVolume>>(
    pvs: &'a [P],
    ns: &str,
    claim: &str,
    claim_uid: Option<&str>,
) -> Option<&'a PersistentVolume> {
    let uid = claim_uid?;
    pvs.iter().map(|p| &**p).find(|pv| {
        let bound = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        let same_uid = pv
            .spec
            .as_ref()
            .and_then(|s| s.claim_ref.as_ref())
            .is_some_and(|r| r.uid.as_deref() == Some(uid));
        bound && same_uid && claim_ref_names(pv, ns, claim)
    })
}

/// The name of a VolumeBackup of `others` (listed in `me`'s namespace) of the same
/// claim, still unfinished (no phase, Pending or Running) and made before `me`
/// (creation time, then name): one backup per claim waits or runs at a time, so one
/// tenant cannot queue many ahead of others on the node.
pub fn earlier_unfinished<'a>(me: &VolumeBackup, others: &'a [VolumeBackup]) -> Option<&'a str> {
    let key = |b: &VolumeBackup| (b.metadata.creation_timestamp.clone(), b.name_any());
    let mine = key(me);
    others
        .iter()
        .filter(|b| b.spec.claim == me.spec.claim && b.metadata.uid != me.metadata.uid)
        .filter(|b| {
            !b.status
                .as_ref()
                .and_then(|st| st.phase)
                .is_some_and(Phase::is_final)
        })
        .filter(|b| key(b) < mine)
        .find_map(|b| b.metadata.name.as_deref())
}

async fn list_backups(ctx: &Backups, ns: &str) -> Result<Vec<VolumeBackup>> {
    Ok(Api::<VolumeBackup>::namespaced(ctx.client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map_err(Error::kube(format!("list the VolumeBackups of {ns}")))?
        .items)
}

/// Whether a failure of the engine was the target's (full, unreachable, not
/// writable): those get the `BackupTargetUnavailable` event.
pub fn target_unavailable(why: &str) -> bool {
    why.contains("the backup target is full")
        || why.contains("the backup target is unreachable")
        || [
            "reach the target",
            "probe the target",
            "create the volume's backup directory",
            "lock the volume's backup directory",
        ]
        .iter()
        .any(|p| why.starts_with(p))
}

/// Creates a uniquely named file in `target` and looks for it at the top of each of
/// this agent's volume directories: found, the target is (a mount of) that volume.
/// The probe is removed either way. An error means the target cannot be written.
pub fn own_volume_behind(exports: &Exports, target: &Path) -> std::io::Result<Option<VolumeName>> {
    let probe = format!(
        ".localnfs-target-probe-{}-{}",
        std::process::id(),
        Timestamp::now().as_nanosecond()
    );
    let path = target.join(&probe);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    let store = exports.store();
    let found = store.list().ok().and_then(|vols| {
        vols.into_iter()
            .map(|m| m.spec.name)
            .find(|v| store.data_dir(v).join(&probe).exists())
    });
    std::fs::remove_file(&path)?;
    Ok(found)
}

fn now() -> String {
    Timestamp::now().to_string()
}

async fn reconcile(vbk: Arc<VolumeBackup>, ctx: Arc<Backups>) -> Result<Action> {
    let status = vbk.status.clone().unwrap_or_default();
    let uid = vbk.uid().unwrap_or_default();
    if status.phase.is_some_and(Phase::is_final) {
        if let Ok(mut s) = ctx.started.lock() {
            s.remove(&uid);
        }
        return Ok(Action::await_change());
    }
    let ns = vbk.namespace().unwrap_or_default();
    let claim = vbk.spec.claim.clone();
    if status.phase == Some(Phase::Running) {
        // Only the agent that started it wrote its node there (tenants cannot write
        // the status): another agent's Running backup is none of ours.
        if status.node.as_deref() != Some(ctx.node.as_str()) {
            return Ok(Action::await_change());
        }
        let ours = ctx
            .started
            .lock()
            .map(|s| s.contains(&uid))
            .unwrap_or(false);
        if !ours {
            let why = "the node agent restarted during the backup; no set was made (the next backup of the volume removes what it wrote)".to_owned();
            fail(&ctx, &vbk, status, FAILED, why).await?;
            return Ok(Action::await_change());
        }
        // Ours and no longer running: either the final status is on its way (this
        // copy is older), or its write failed and is retried here.
        let unwritten = ctx.results.lock().ok().and_then(|r| r.get(&uid).cloned());
        if let Some(final_status) = unwritten {
            write_final(&ctx, &vbk, &final_status).await?;
        }
        return Ok(Action::await_change());
    }
    // Only this node's PVs are cached: a claim whose PV is elsewhere is another
    // agent's business. The claim is read only if one of them names it.
    let pvs = ctx.pvs.state();
    if !pvs.iter().any(|pv| claim_ref_names(pv, &ns, &claim)) {
        return Ok(Action::requeue(NOT_MINE_RECHECK));
    }
    let fresh = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&claim)
        .await
        .map_err(Error::kube(format!("read claim {ns}/{claim}")))?;
    let claim_uid = fresh.as_ref().and_then(|c| c.uid());
    // A Released PV of an earlier claim of that name (Retained, maybe on this node
    // while the new claim's is on another) is not the claim's volume: ignored.
    let Some(pv) = claims_pv(&pvs, &ns, &claim, claim_uid.as_deref()) else {
        return Ok(Action::requeue(NOT_MINE_RECHECK));
    };
    if status.phase.is_none() && !take_up(&ctx, &vbk).await? {
        // The controller failed it meanwhile (no agent had taken it up within its
        // grace): that copy comes back through the watch and is final.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    if let Some(prev) = earlier_unfinished(&vbk, &list_backups(&ctx, &ns).await?) {
        let why = format!("another backup of this claim is unfinished: {prev}");
        fail(&ctx, &vbk, status, FAILED, why).await?;
        return Ok(Action::await_change());
    }
    let pv_claim_uid = pv
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .and_then(|r| r.uid.clone());
    let volume_ann = ann(pv, VOLUME_KEY).map(str::to_owned);
    let owner = volume_ann
        .as_deref()
        .and_then(|v| VolumeName::new(v).ok())
        .and_then(|v| ctx.exports.store().get(&v).ok().flatten())
        .and_then(|m| m.owner);
    let mut status = VolumeBackupStatus {
        node: Some(ctx.node.clone()),
        ..status
    };
    let volume = match resolve(
        &ctx.node,
        &ns,
        &claim,
        claim_uid.as_deref(),
        pv_claim_uid.as_deref(),
        volume_ann.as_deref(),
        owner.as_ref(),
    ) {
        Ok(v) => v,
        Err(Refusal(why)) => {
            fail(&ctx, &vbk, status, FAILED, why).await?;
            return Ok(Action::await_change());
        }
    };
    status.volume = Some(volume.to_string());
    let Some(target) = ctx.targets.get(&vbk.spec.target).map(Path::to_owned) else {
        let why = format!(
            "no backup target named {} on node {}; configured: {}",
            vbk.spec.target,
            ctx.node,
            ctx.targets.names()
        );
        fail(&ctx, &vbk, status, FAILED, why).await?;
        return Ok(Action::await_change());
    };
    let max_age = match vbk.spec.max_age.as_deref().map(crate::cli::parse_duration) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            fail(&ctx, &vbk, status, FAILED, format!("maxAge: {e}")).await?;
            return Ok(Action::await_change());
        }
    };
    let permit = match ctx.slot.try_acquire() {
        Ok(p) => p,
        Err(_) => {
            let waiting = format!("waiting for another backup on node {} to finish", ctx.node);
            if status.message.as_deref() != Some(&waiting) {
                status.phase = Some(Phase::Pending);
                status.message = Some(waiting);
                patch(&ctx, &vbk, &status).await?;
            }
            ctx.slot
                .acquire()
                .await
                .map_err(|_| Error::Unsupported("the backup slot closed"))?
        }
    };
    let exports = ctx.exports.clone();
    let t = target.clone();
    match tokio::task::spawn_blocking(move || own_volume_behind(&exports, &t)).await {
        Ok(Ok(None)) => {}
        Ok(Ok(Some(v))) => {
            let why = format!(
                "target {} ({}) is volume {v} of node {}, the node whose data it would back up: use a target that survives this node",
                vbk.spec.target,
                target.display(),
                ctx.node
            );
            fail(&ctx, &vbk, status, FAILED, why).await?;
            return Ok(Action::await_change());
        }
        Ok(Err(e)) => {
            let why = match e.raw_os_error() {
                Some(libc::ENOSPC | libc::EDQUOT) => {
                    format!("the backup target is full (probe the target: {e})")
                }
                _ => format!("probe the target: {e}"),
            };
            fail(&ctx, &vbk, status, TARGET_UNAVAILABLE, why).await?;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(Error::BuildObject(format!("probe task failed: {e}"))),
    }
    if let Ok(mut s) = ctx.started.lock() {
        s.insert(uid.clone());
    }
    let r = run_backup(&ctx, &vbk, status, volume, target, max_age).await;
    drop(permit);
    r?;
    Ok(Action::await_change())
}

/// Runs the backup with progress in the status, then writes the result.
async fn run_backup(
    ctx: &Backups,
    vbk: &VolumeBackup,
    mut status: VolumeBackupStatus,
    volume: VolumeName,
    target: PathBuf,
    max_age: Option<Duration>,
) -> Result<()> {
    let started = Instant::now();
    status.phase = Some(Phase::Running);
    status.start_time = Some(now());
    status.progress_bytes = Some(0);
    status.bytes_per_second = Some(0);
    status.message = Some(format!(
        "backing up volume {volume} to target {}",
        vbk.spec.target
    ));
    patch(ctx, vbk, &status).await?;
    let progress = Arc::new(AtomicU64::new(0));
    let opts = BackupOptions {
        keep: vbk.spec.keep.map(|k| k as usize),
        max_age,
        allow_same_device: false,
        progress: Some(progress.clone()),
    };
    let exports = ctx.exports.clone();
    let (v, t) = (volume.clone(), target.clone());
    let mut task = tokio::task::spawn_blocking(move || exports.backup_volume(&v, &t, &opts));
    let result = loop {
        tokio::select! {
            r = &mut task => break r,
            _ = tokio::time::sleep(PROGRESS_EVERY) => {
                let done = progress.load(Ordering::Relaxed);
                ctx.progress.set(i64::try_from(done).unwrap_or(i64::MAX));
                status.progress_bytes = Some(done);
                status.bytes_per_second = Some(per_second(done, started.elapsed()));
                // A missed progress write is not worth failing the backup over.
                if let Err(e) = patch(ctx, vbk, &status).await {
                    tracing::warn!(error = %e, "cannot write backup progress");
                }
            }
        }
    };
    ctx.progress.set(0);
    let took = started.elapsed();
    status.completion_time = Some(now());
    status.duration_seconds = Some(took.as_secs_f64());
    match result {
        Ok(Ok(r)) => {
            status.phase = Some(Phase::Completed);
            status.set = Some(r.id.clone());
            status.bytes = Some(r.summary.bytes);
            status.files = Some(r.summary.files);
            status.bytes_copied = Some(r.summary.bytes_copied);
            status.bytes_linked = Some(r.summary.bytes_linked);
            status.progress_bytes = Some(r.summary.bytes);
            status.bytes_per_second = Some(per_second(r.summary.bytes, took));
            status.pause_ms = Some(r.pause.as_secs_f64() * 1e3);
            let mut note = format!(
                "set {} of volume {volume} in target {}: {} bytes in {} files ({} copied, {} linked from the previous set) in {:.1} s",
                r.id,
                vbk.spec.target,
                r.summary.bytes,
                r.summary.files,
                r.summary.bytes_copied,
                r.summary.bytes_linked,
                took.as_secs_f64()
            );
            for w in &r.warnings {
                note.push_str("; warning: ");
                note.push_str(w);
            }
            status.message = Some(note.clone());
            write_final(ctx, vbk, &status).await?;
            ctx.events
                .publish(vbk, EventType::Normal, COMPLETED, "Backup", note)
                .await;
            Ok(())
        }
        Ok(Err(e)) => {
            let why = match e {
                localnfs_nfs::Error::BackupFailed { why, .. } => why,
                e => e.to_string(),
            };
            let reason = if target_unavailable(&why) {
                TARGET_UNAVAILABLE
            } else {
                FAILED
            };
            fail(ctx, vbk, status, reason, why).await
        }
        Err(e) => fail(ctx, vbk, status, FAILED, format!("backup task failed: {e}")).await,
    }
}

fn per_second(bytes: u64, took: Duration) -> u64 {
    let s = took.as_secs_f64();
    if s > 0.0 {
        (bytes as f64 / s) as u64
    } else {
        0
    }
}

/// Marks the object Failed with `why` and publishes the event `reason`.
async fn fail(
    ctx: &Backups,
    vbk: &VolumeBackup,
    mut status: VolumeBackupStatus,
    reason: &str,
    why: String,
) -> Result<()> {
    tracing::warn!(backup = %format!("{}/{}", vbk.namespace().unwrap_or_default(), vbk.name_any()), %why, "backup failed");
    status.phase = Some(Phase::Failed);
    status.node = Some(ctx.node.clone());
    status.completion_time.get_or_insert_with(now);
    status.message = Some(why.clone());
    write_final(ctx, vbk, &status).await?;
    ctx.events
        .publish(vbk, EventType::Warning, reason, "Backup", why)
        .await;
    Ok(())
}

/// Writes a final status, kept until written so a failed write is retried.
async fn write_final(ctx: &Backups, vbk: &VolumeBackup, status: &VolumeBackupStatus) -> Result<()> {
    let uid = vbk.uid().unwrap_or_default();
    if let Ok(mut r) = ctx.results.lock() {
        r.insert(uid.clone(), status.clone());
    }
    patch(ctx, vbk, status).await?;
    if let Ok(mut r) = ctx.results.lock() {
        r.remove(&uid);
    }
    Ok(())
}

/// Marks a VolumeBackup that has no status yet as this agent's (Pending, this node),
/// with the copy's `resourceVersion` as a precondition: the leader fails one no agent
/// took up within its grace (`provisioner::backups`) with the same precondition, so
/// of the two first writes exactly one lands and neither overwrites the other.
/// `false`: the object changed since this copy was read (409).
async fn take_up(ctx: &Backups, vbk: &VolumeBackup) -> Result<bool> {
    let ns = vbk.namespace().unwrap_or_default();
    let name = vbk.name_any();
    let status = VolumeBackupStatus {
        phase: Some(Phase::Pending),
        node: Some(ctx.node.clone()),
        message: Some(format!("taken up by the node agent of {}", ctx.node)),
        ..VolumeBackupStatus::default()
    };
    let mut body = status_patch::<VolumeBackup>(&status);
    body["metadata"] = serde_json::json!({"resourceVersion": vbk.resource_version()});
    match Api::<VolumeBackup>::namespaced(ctx.client.clone(), &ns)
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(body))
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(Error::kube(format!(
            "write the status of VolumeBackup {ns}/{name}"
        ))(e)),
    }
}

/// Writes `status` through the status subresource.
async fn patch(ctx: &Backups, vbk: &VolumeBackup, status: &VolumeBackupStatus) -> Result<()> {
    let ns = vbk.namespace().unwrap_or_default();
    let name = vbk.name_any();
    Api::<VolumeBackup>::namespaced(ctx.client.clone(), &ns)
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(status_patch::<VolumeBackup>(status)),
        )
        .await
        .map_err(Error::kube(format!(
            "write the status of VolumeBackup {ns}/{name}"
        )))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(uid: &str, ns: &str) -> Owner {
        Owner {
            claim_uid: uid.into(),
            namespace: ns.into(),
            claim: "data".into(),
        }
    }

    fn pv(name: &str, phase: &str, claim_uid: &str) -> Arc<PersistentVolume> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "spec": {"claimRef": {"namespace": "shop", "name": "data", "uid": claim_uid}},
                "status": {"phase": phase},
            }))
            .expect("PV"),
        )
    }

    #[test]
    fn an_old_released_pv_of_a_recreated_claim_is_not_its_volume() {
        // The claim was deleted (its PV Retained, Released) and made again: its new
        // volume is on another node, so this node has only the old PV.
        let here = [pv("pvc-old", "Released", "u-old")];
        assert!(claims_pv(&here, "shop", "data", Some("u-new")).is_none());
        // Even the old uid is not backed up once Released.
        assert!(claims_pv(&here, "shop", "data", Some("u-old")).is_none());
        let both = [
            pv("pvc-old", "Released", "u-old"),
            pv("pvc-new", "Bound", "u-new"),
        ];
        let found = claims_pv(&both, "shop", "data", Some("u-new")).expect("bound PV");
        assert_eq!(found.metadata.name.as_deref(), Some("pvc-new"));
        assert!(claims_pv(&both, "shop", "data", None).is_none(), "no claim");
        assert!(claims_pv(&both, "bank", "data", Some("u-new")).is_none());
    }

    fn vbk(name: &str, claim: &str, created: &str, phase: Option<Phase>) -> VolumeBackup {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                "creationTimestamp": created},
            "spec": {"claim": claim, "target": "t"},
            "status": {"phase": phase},
        }))
        .expect("VolumeBackup")
    }

    #[test]
    fn a_second_unfinished_backup_of_a_claim_is_refused() {
        let (t1, t2) = ("2026-12-07T01:00:00Z", "2026-12-07T01:00:05Z");
        let first = vbk("a", "data", t1, Some(Phase::Pending));
        let second = vbk("b", "data", t2, None);
        let all = [first.clone(), second.clone()];
        assert_eq!(earlier_unfinished(&second, &all), Some("a"));
        assert_eq!(earlier_unfinished(&first, &all), None, "the first runs");
        // Same second: the name decides, so exactly one of the two goes on.
        let twin = vbk("c", "data", t1, None);
        let pair = [first.clone(), twin.clone()];
        assert_eq!(earlier_unfinished(&twin, &pair), Some("a"));
        assert_eq!(earlier_unfinished(&first, &pair), None);
        // A finished one, or another claim's, does not hold it.
        for other in [
            vbk("a", "data", t1, Some(Phase::Completed)),
            vbk("a", "data", t1, Some(Phase::Failed)),
            vbk("a", "logs", t1, Some(Phase::Running)),
        ] {
            assert_eq!(
                earlier_unfinished(&second, &[other.clone(), second.clone()]),
                None
            );
        }
    }

    #[test]
    fn the_claims_own_volume_is_backed_up() {
        let o = owner("u1", "shop");
        let v = resolve(
            "n",
            "shop",
            "data",
            Some("u1"),
            Some("u1"),
            Some("pvc-u1"),
            Some(&o),
        );
        assert_eq!(v.map(|v| v.to_string()), Ok("pvc-u1".to_owned()));
    }

    #[test]
    fn a_pv_re_pointed_at_another_namespaces_volume_is_refused() {
        // The PV is bound to the tenant's claim, but names a volume whose owner record
        // is another namespace's claim.
        let other = owner("u9", "bank");
        let r = resolve(
            "n",
            "shop",
            "data",
            Some("u1"),
            Some("u1"),
            Some("pvc-u9"),
            Some(&other),
        );
        let why = r.expect_err("refused").0;
        assert!(why.contains("belongs to claim bank/data"), "{why}");
    }

    #[test]
    fn same_claim_name_in_another_namespace_is_refused() {
        let o = owner("u1", "bank");
        assert!(
            resolve(
                "n",
                "shop",
                "data",
                Some("u1"),
                Some("u1"),
                Some("v"),
                Some(&o)
            )
            .is_err()
        );
    }

    #[test]
    fn a_pv_bound_to_another_claim_is_refused() {
        let o = owner("u1", "shop");
        let why = resolve(
            "n",
            "shop",
            "data",
            Some("u2"),
            Some("u1"),
            Some("v"),
            Some(&o),
        )
        .expect_err("refused")
        .0;
        assert!(why.contains("not the claim its PV"), "{why}");
    }

    #[test]
    fn a_missing_claim_or_owner_record_is_refused() {
        let o = owner("u1", "shop");
        assert!(resolve("n", "shop", "data", None, Some("u1"), Some("v"), Some(&o)).is_err());
        let why = resolve("n", "shop", "data", Some("u1"), Some("u1"), Some("v"), None)
            .expect_err("refused")
            .0;
        assert!(why.contains("no owner record"), "{why}");
        assert!(
            resolve(
                "n",
                "shop",
                "data",
                Some("u1"),
                Some("u1"),
                Some("../x"),
                Some(&o)
            )
            .is_err()
        );
    }

    #[test]
    fn target_failures_are_told_apart_from_others() {
        assert!(target_unavailable(
            "the backup target is full (copy a file: No space left on device (os error 28))"
        ));
        assert!(target_unavailable(
            "reach the target: No such file or directory (os error 2)"
        ));
        assert!(target_unavailable(
            "probe the target: Read-only file system (os error 30)"
        ));
        assert!(!target_unavailable(
            "no room on the node for the snapshot: …"
        ));
        assert!(!target_unavailable(
            "the target is on the same device as the volume store, …"
        ));
    }
}
