//! The node agent's cluster side: it heartbeats a Lease with its free space, NFS and
//! peer ports, reports per-volume usage in its usage Leases when it changed (`objects::usage`),
//! creates (for a clone: copies, after checking the source's owner record, or streams
//! it from the source node's agent, `peer`, and serves other agents' clones; for a
//! restore: fills from a backup set of the claim's namespace, see `restore`) and removes
//! volume directories for claims the controller placed on this node, reclaims and resizes its PVs, and keeps the NFS
//! allow-list and per-volume grants equal to what the Nodes and PVs say (`grants`).
//! It also runs the VolumeBackups of its volumes (`backups`, sharing its PV cache).
//! The protocol with the controller is in `objects`.
//!
//! Everything it writes is its own node's: answer annotations on claims labelled with
//! its node, the size annotation and our finalizer on its PVs, its own heartbeat and
//! usage Leases (labelled with its node), and events. The scheduler helper's validating webhook
//! (`scheduler::guard`) refuses anything else from the agents' service account, so the
//! agent must call the API server with its pod's projected (pod-bound) token.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::heartbeat::{self, Heartbeat};
use crate::kubeclient::annotation as ann;
use crate::nfs::{AllowList, Exports, Network};
use crate::objects::claim::pv_name;
use crate::objects::keys::*;
use crate::objects::reclaim::{self, Reclaim};
use crate::objects::request::{CloneSource, REQUEST_VERSION, RestoreSource};
use crate::objects::signed::{self, Message, Signer};
use crate::objects::usage;
use crate::volume::{Owner, VolumeName};
use kube::runtime::reflector::Store;
use localnfs_nfs::Error as NfsError;

use super::keys::ControllerKey;
use super::step::{self, ClaimStep};

/// How often the heartbeat Lease is renewed (it is considered dead after
/// [`heartbeat::HEARTBEAT_LEASE_SECONDS`]).
const HEARTBEAT: Duration = heartbeat::RENEW_EVERY;

/// Least time between two heartbeats woken early by a change of free space: the
/// controller holds a placement's space for far longer (`reserve`), so a free-space
/// figure a second or two late places nothing wrongly, and a burst of new volumes
/// costs a write per this long instead of two per volume.
const CHANGE_GAP: Duration = Duration::from_secs(2);

/// The same gap once the previous heartbeat was itself woken early: changes keep
/// coming (a burst of volumes on this node), and a heartbeat with its usage write every
/// 2 s on each of 100 nodes was 1.5 API requests per claim in a 2,000-claim burst
/// (bench/README.md, the scale section). A lone change is still reported within
/// [`CHANGE_GAP`]; the controller's holds (`reserve::HOLD_AFTER_READY`, 45 s) outlast
/// this and a failed renewal after it.
pub const BURST_GAP: Duration = Duration::from_secs(10);

/// PVs reconciled at once (reclaims, resizes): a burst of deleted claims is reclaimed
/// this many at a time, each one a claim read, a store change and a finalizer patch.
/// Bounded so a node with thousands of PVs released together sends the API server a
/// steady stream, not thousands of calls at once; the store serialises only the
/// metadata part of each change, so more would mostly wait on the API server.
const PVS_IN_FLIGHT: u16 = 16;

struct Agent {
    client: Client,
    liveness: Client,
    node: String,
    namespace: String,
    exports: Arc<Exports>,
    nfs_port: u16,
    capacity: Option<u64>,
    events: crate::events::Events,
    /// Wakes the heartbeat early when free space changed.
    changed: Notify,
    /// (PV, reason) of warnings already published about PVs being reclaimed: events
    /// about PVs are not folded into series (see `events`), so a retry must not repeat
    /// them.
    warned: std::sync::Mutex<std::collections::HashSet<(String, &'static str)>>,
    /// PVs (by uid) whose finalizer this agent released, and when: see [`reclaim`].
    released: std::sync::Mutex<HashMap<String, Instant>>,
    /// This agent's signing key: its answers on claims carry its signature.
    signer: Signer,
    /// The controller's public key: only requests it signed are acted on.
    controller_key: ControllerKey,
    /// This node's PVs as the PV watch last saw them.
    pvs: Store<PersistentVolume>,
    /// `--backup-target`s: the sets restores may read.
    backup_targets: super::targets::BackupTargets,
    /// The peer channel: clones to and from other nodes.
    peer: Arc<super::peer::Peer>,
    peer_port: u16,
}

/// Who and where this agent is in the cluster.
pub struct ClusterConfig {
    pub client: Client,
    /// The heartbeat's own client (usage shards and the Lease), apart from the
    /// reconcilers' rate-limit bucket.
    pub liveness: Client,
    pub node: String,
    /// Namespace of the heartbeat Lease.
    pub namespace: String,
    /// localnfs's own namespace, where the controller publishes its public key.
    pub install_namespace: String,
    pub nfs_port: u16,
    /// `--capacity`: the most all volumes together may be given.
    pub capacity: Option<u64>,
    /// `--allow` networks, always allowed besides the nodes' addresses.
    pub extra_allow: Vec<Network>,
    /// The agent's signing key (see [`super::keys`]).
    pub signer: Signer,
    /// `--backup-target`: where VolumeBackups of this node's volumes may go.
    pub backup_targets: super::targets::BackupTargets,
    /// `localnfs_backup_progress_bytes` (registered by the caller).
    pub backup_progress: prometheus_client::metrics::gauge::Gauge,
    /// The peer channel's listener (`--peer-port`) and counters.
    pub peer_listener: tokio::net::TcpListener,
    pub peer_metrics: super::peer::PeerMetrics,
}

/// Runs the cluster side until `shutdown` fires; `synced` turns true once the
/// cluster's access rules are in force (see `grants`).
pub async fn run(
    cfg: ClusterConfig,
    exports: Arc<Exports>,
    allow: AllowList,
    synced: tokio::sync::watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let ClusterConfig {
        client,
        liveness,
        node,
        namespace,
        install_namespace,
        nfs_port,
        capacity,
        extra_allow,
        signer,
        backup_targets,
        backup_progress,
        peer_listener,
        peer_metrics,
    } = cfg;
    tracing::info!(targets = %backup_targets.names(), "backup targets VolumeBackups may name");
    let peer_port = peer_listener.local_addr().map_or(0, |a| a.port());
    let controller_key = ControllerKey::default();
    // The peer channel signs with the same key (read again: a key pair is not Clone).
    let peer = super::keys::agent_signer(exports.store())
        .map_err(|e| e.to_string())
        .and_then(|peer_signer| {
            super::peer::Peer::new(
                client.clone(),
                node.clone(),
                namespace.clone(),
                exports.clone(),
                peer_signer,
                controller_key.clone(),
                peer_metrics,
            )
        });
    let peer = match peer {
        Ok(p) => Arc::new(p),
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the peer channel: the node agent's cluster side does not run");
            return;
        }
    };
    let mine = watcher::Config::default().labels(&format!("{NODE_KEY}={node}"));
    let pv_controller =
        crate::cache::controller(Api::<PersistentVolume>::all(client.clone()), mine.clone());
    let agent = Arc::new(Agent {
        events: crate::events::Events::new(client.clone(), "localnfs-node", &node),
        client,
        liveness,
        node,
        namespace,
        exports,
        nfs_port,
        capacity,
        changed: Notify::new(),
        warned: Default::default(),
        released: Default::default(),
        signer,
        controller_key,
        pvs: pv_controller.store(),
        backup_targets: backup_targets.clone(),
        peer: peer.clone(),
        peer_port,
    });
    // Claims are looked at again whenever the controller's key changes (first read
    // included: until then no claim is acted on).
    let (key_changed, key_rx) = tokio::sync::watch::channel(());
    let key_changes = futures::stream::unfold(key_rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    });
    let claims = crate::cache::controller(
        Api::<PersistentVolumeClaim>::all(agent.client.clone()),
        mine,
    )
    .reconcile_all_on(key_changes)
    .graceful_shutdown_on(shutdown.clone().cancelled_owned())
    .run(reconcile_claim, error_policy, agent.clone())
    .for_each(|_| futures::future::ready(()));
    let key_watch = agent.controller_key.watch(
        agent.client.clone(),
        &install_namespace,
        move || {
            key_changed.send_replace(());
        },
        shutdown.clone(),
    );
    let backups = super::backups::run(
        Arc::new(super::backups::Backups::new(
            agent.client.clone(),
            agent.node.clone(),
            agent.exports.clone(),
            backup_targets,
            agent.pvs.clone(),
            backup_progress,
        )),
        shutdown.clone(),
    );
    let pvs = pv_controller
        .with_config(kube::runtime::controller::Config::default().concurrency(PVS_IN_FLIGHT))
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(reconcile_pv, error_policy, agent.clone())
        .for_each(|_| futures::future::ready(()));
    tokio::join!(
        claims,
        pvs,
        backups,
        key_watch,
        heartbeat(agent.clone(), shutdown.clone()),
        peer.serve(peer_listener, shutdown.clone()),
        super::grants::keep(
            agent.client.clone(),
            agent.node.clone(),
            agent.exports.clone(),
            allow,
            extra_allow,
            synced,
            shutdown
        ),
    );
}

fn error_policy<K>(_obj: Arc<K>, err: &Error, _agent: Arc<Agent>) -> Action {
    Action::requeue(crate::kubeclient::retry_after(err))
}

impl Agent {
    async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        self.events
            .publish(obj, type_, reason, "Volume", note)
            .await;
    }

    /// Publishes a warning about a PV unless this one was already published.
    async fn warn_pv_once(&self, pv: &PersistentVolume, reason: &'static str, note: String) {
        let first = self
            .warned
            .lock()
            .map(|mut w| w.insert((pv.name_any(), reason)))
            .unwrap_or(true);
        if first {
            self.event(pv, EventType::Warning, reason, note).await;
        }
    }

    /// Whether a PV of this node other than `except` names `volume`.
    fn pv_names(&self, volume: &VolumeName, except: Option<&str>) -> bool {
        self.pvs.state().iter().any(|pv| {
            ann(pv.as_ref(), VOLUME_KEY) == Some(volume.as_str())
                && except.is_none_or(|e| pv.name_any() != e)
        })
    }

    /// Whether this agent released the finalizer of the PV `uid` within [`RELEASED_FOR`].
    fn released_lately(&self, uid: &str) -> bool {
        let released = self.released.lock().unwrap_or_else(|p| p.into_inner());
        released
            .get(uid)
            .is_some_and(|at| at.elapsed() < RELEASED_FOR)
    }

    /// Remembers that the PV `uid`'s finalizer was released (forgetting, every 256th
    /// time, what is older than [`RELEASED_FOR`]: about the PVs deleted in that time
    /// are held).
    fn released_now(&self, uid: String) {
        let mut released = self.released.lock().unwrap_or_else(|p| p.into_inner());
        if released.len() % 256 == 255 {
            released.retain(|_, at| at.elapsed() < RELEASED_FOR);
        }
        released.insert(uid, Instant::now());
    }

    /// Forgets the warnings published about a PV (it is gone).
    fn forget_pv(&self, pv_name: &str) {
        if let Ok(mut w) = self.warned.lock() {
            w.retain(|(name, _)| name != pv_name);
        }
    }

    /// Runs a blocking store operation on `volume`, then re-reads that volume (only:
    /// the cost of one change must not grow with the volumes on the node) so the NFS
    /// server sees the change at once. Operations on different volumes run at the
    /// same time; the store serialises only their metadata changes.
    async fn store_op<T: Send + 'static>(
        &self,
        volume: &VolumeName,
        op: impl FnOnce(&crate::volume::VolumeStore) -> localnfs_nfs::Result<T> + Send + 'static,
    ) -> Result<T> {
        let (exports, volume) = (self.exports.clone(), volume.clone());
        let out = tokio::task::spawn_blocking(move || {
            let r = op(exports.store());
            // Also after a failure: whatever the operation got done is served.
            exports.refresh_volume(&volume)?;
            r
        })
        .await
        .map_err(|e| Error::BuildObject(format!("volume task failed: {e}")))??;
        self.changed.notify_one();
        Ok(out)
    }
}

async fn reconcile_claim(pvc: Arc<PersistentVolumeClaim>, agent: Arc<Agent>) -> Result<Action> {
    let (ns, name) = (pvc.namespace().unwrap_or_default(), pvc.name_any());
    let uid = pvc.uid().unwrap_or_default();
    let Some(controller) = agent.controller_key.get() else {
        // Nothing can be checked yet; the key's arrival brings every claim back.
        return Ok(Action::await_change());
    };
    let mine = agent.signer.public();
    let v = signed::verify(&pvc, &controller, |n| {
        (n == agent.node).then(|| mine.clone())
    });
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(agent.client.clone(), &ns);
    if let ClaimStep::RefuseNewer(version) = step::claim_step(&pvc, &v, &agent.node, false) {
        let why = format!(
            "node {}: the controller's request is version {version}, newer than this node agent reads (up to {REQUEST_VERSION}): upgrade the node agent",
            agent.node
        );
        return refuse(&agent, &pvc, &claims, why).await;
    }
    let Some(request) = v.request.clone() else {
        if !v.ignored.is_empty() {
            tracing::debug!(claim = %format!("{ns}/{name}"), ignored = ?v.ignored, "claim labelled with this node carries no request signed for it: ignored");
        }
        return Ok(Action::await_change());
    };
    let volume = request.spec.name.clone();
    let mut step = step::claim_step(&pvc, &v, &agent.node, agent.pv_names(&volume, None));
    if matches!(step, ClaimStep::Remove | ClaimStep::Create) {
        // The PV cache may not have seen a PV made a moment ago, and it holds only this
        // node's PVs: ask the API server before anything is made or removed (a failed
        // read is retried, never a go-ahead).
        let pv = Api::<PersistentVolume>::all(agent.client.clone())
            .get_opt(&pv_name(&uid))
            .await
            .map_err(Error::kube(format!("read PV {}", pv_name(&uid))))?;
        step = step::claim_step(&pvc, &v, &agent.node, pv.is_some());
    }
    match step {
        // Handled above: a request this agent cannot read leaves `request` unset.
        ClaimStep::Ignore | ClaimStep::RefuseNewer(_) => {}
        ClaimStep::Served => agent.exports.label_claim(&volume, &ns, &name),
        ClaimStep::Keep(why) => {
            tracing::warn!(claim = %format!("{ns}/{name}"), %volume, why, "keeping the volume of an abandoned claim");
        }
        ClaimStep::Remove => {
            let (vol, owner_uid) = (volume.clone(), uid.clone());
            match agent
                .store_op(&volume, move |s| s.remove_for(&vol, &owner_uid, false))
                .await
            {
                Ok(_) => {
                    tracing::info!(%volume, claim = %format!("{ns}/{name}"), "removed volume of abandoned claim");
                }
                Err(e @ Error::Nfs(NfsError::VolumeOwned { .. })) => {
                    // Nothing of this claim's is there: say so, and touch nothing.
                    agent
                        .event(
                            pvc.as_ref(),
                            EventType::Warning,
                            "VolumeKept",
                            format!("node {}: not removing: {e}", agent.node),
                        )
                        .await;
                }
                Err(e) => return Err(e),
            }
            let sig = agent.signer.sign(&Message::Removed {
                claim_uid: &uid,
                node: &agent.node,
                volume: volume.as_str(),
            });
            let removed = [(REMOVED, "true".to_owned()), (REMOVED_SIG, sig)];
            answer(&agent, &claims, &name, &removed).await?;
        }
        ClaimStep::Create => {
            let owner = Owner {
                claim_uid: uid.clone(),
                namespace: ns.clone(),
                claim: name.clone(),
            };
            let spec = request.spec.clone();
            let made = match (&request.clone, &request.restore) {
                (None, Some(source)) => match restore(&agent, &pvc, source, spec, owner).await {
                    Ok(Ok(meta)) => Ok(meta),
                    Ok(Err(why)) => {
                        let why = format!("node {}: not restoring: {why}", agent.node);
                        return refuse(&agent, &pvc, &claims, why).await;
                    }
                    Err(e) => Err(e),
                },
                (None, None) => {
                    agent
                        .store_op(&volume, move |s| s.create_for(&spec, &owner))
                        .await
                }
                (Some(source), _) => {
                    let recorded = agent
                        .exports
                        .by_name(&source.volume)
                        .map(|v| v.meta.owner.clone());
                    // The source is another node's: streamed from its agent (`peer`).
                    if recorded.is_none()
                        && let Some(from) = super::peer::source_node(&agent.client, source).await?
                        && from != agent.node
                    {
                        return fetch_clone(&agent, &pvc, &claims, &request, &from, owner).await;
                    }
                    if let Err(why) =
                        step::clone_check(source, &ns, recorded.as_ref().map(Option::as_ref))
                    {
                        let why = format!("node {}: not cloning: {why}", agent.node);
                        return refuse(&agent, &pvc, &claims, why).await;
                    }
                    clone(&agent, &pvc, source, spec, owner).await
                }
            };
            match made {
                Ok(meta) => {
                    tracing::info!(volume = %meta.name, size = meta.size_bytes, "created volume");
                    agent.exports.label_claim(&meta.name, &ns, &name);
                    let sig = agent.signer.sign(&Message::Ready {
                        claim_uid: &uid,
                        node: &agent.node,
                        volume: volume.as_str(),
                    });
                    let ready = [(READY, volume.to_string()), (READY_SIG, sig)];
                    answer(&agent, &claims, &name, &ready).await?;
                }
                Err(
                    e @ Error::Nfs(
                        NfsError::VolumeConflict { .. }
                        | NfsError::VolumeOwned { .. }
                        | NfsError::InvalidVolumeSize { .. }
                        | NfsError::InvalidVolumeSpec { .. },
                    ),
                ) => {
                    return refuse(&agent, &pvc, &claims, format!("node {}: {e}", agent.node))
                        .await;
                }
                Err(Error::Nfs(e)) if request.clone.is_some() => {
                    // A copy that could not finish left nothing behind (the engine's
                    // promise); say why, and try again when the refusal is retried.
                    let why = format!("node {}: the copy failed: {e}", agent.node);
                    return refuse(&agent, &pvc, &claims, why).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(Action::await_change())
}

/// Makes volume `spec` for `owner` as a copy of `source` (checked by
/// [`step::clone_check`]), or finds it made: a clone finished before an agent restart
/// is answered, not copied again. Says what the copy took in an event.
async fn clone(
    agent: &Agent,
    pvc: &PersistentVolumeClaim,
    source: &CloneSource,
    spec: crate::volume::VolumeSpec,
    owner: Owner,
) -> Result<crate::volume::VolumeMeta> {
    if let Some(done) = agent.exports.by_name(&spec.name)
        && done.meta.owner.as_ref() == Some(&owner)
    {
        return Ok(done.meta.clone());
    }
    let (exports, from, target) = (
        agent.exports.clone(),
        source.volume.clone(),
        spec.name.clone(),
    );
    let (meta, report) = tokio::task::spawn_blocking(move || {
        let made = exports.clone_volume(&from, &spec, &owner);
        // Also after a failure: whatever exists is served as it is.
        exports.refresh_volume(&target)?;
        made
    })
    .await
    .map_err(|e| Error::BuildObject(format!("clone task failed: {e}")))??;
    agent.changed.notify_one();
    let note = format!(
        "node {}: volume {} holds a copy of claim {}/{}'s volume {} ({} files, {} bytes) taken in {:.3} s; the source's writes paused {:.1} ms",
        agent.node,
        meta.name,
        source.namespace,
        source.claim,
        source.volume,
        report.files,
        report.bytes,
        report.took.as_secs_f64(),
        report.pause.as_secs_f64() * 1000.0,
    );
    tracing::info!(volume = %meta.name, source = %source.volume, files = report.files, bytes = report.bytes, took = ?report.took, pause = ?report.pause, "cloned volume");
    agent
        .event(pvc, EventType::Normal, "VolumeCloned", note)
        .await;
    Ok(meta)
}

/// Makes volume `spec` for `owner` from the backup set a version-3 request names
/// (see `super::restore`), or finds it made: a restore finished before an agent
/// restart is answered, not made again; one cut short left nothing (the store's
/// staging) and starts over. `Ok(Err)`: refused or failed, why (nothing made).
async fn restore(
    agent: &Agent,
    pvc: &PersistentVolumeClaim,
    source: &RestoreSource,
    spec: crate::volume::VolumeSpec,
    owner: Owner,
) -> Result<std::result::Result<crate::volume::VolumeMeta, String>> {
    if let Some(done) = agent.exports.by_name(&spec.name)
        && done.meta.owner.as_ref() == Some(&owner)
    {
        return Ok(Ok(done.meta.clone()));
    }
    // Sets of an earlier namespace of the same name are not this claim's.
    let since = match super::restore::namespace_since(&agent.client, &source.namespace).await? {
        Ok(since) => since,
        Err(why) => return Ok(Err(why)),
    };
    let (exports, targets, source_c, name) = (
        agent.exports.clone(),
        agent.backup_targets.clone(),
        source.clone(),
        spec.name.clone(),
    );
    let done = tokio::task::spawn_blocking(move || {
        let set = super::restore::find_set(&targets, &source_c, &since)?;
        let opts = localnfs_nfs::backup::RestoreOptions {
            size: Some(spec.size_bytes),
            device_nodes: exports.device_nodes,
            owner: Some(owner),
        };
        let made = localnfs_nfs::backup::restore_set_with(exports.store(), &set, &name, &opts);
        // Also after a failure: whatever exists is served as it is.
        if let Err(e) = exports.refresh_volume(&name) {
            tracing::warn!(error = %e, volume = %name, "cannot serve the restored volume yet");
        }
        made.map(|(meta, report)| (meta, report, set))
            .map_err(|e| match e {
                localnfs_nfs::Error::RestoreFailed { why, .. } => why,
                e => e.to_string(),
            })
    })
    .await
    .map_err(|e| Error::BuildObject(format!("restore task failed: {e}")))?;
    let (meta, report, set) = match done {
        Ok(d) => d,
        Err(why) => return Ok(Err(why)),
    };
    agent.changed.notify_one();
    let note = format!(
        "node {}: volume {} restored from set {} of volume {} in backup target {} ({} files, {} bytes, every sha256 checked) in {:.3} s",
        agent.node,
        meta.name,
        set.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        source.volume,
        source.target,
        report.files,
        report.bytes,
        report.took.as_secs_f64(),
    );
    tracing::info!(volume = %meta.name, set = %set.display(), files = report.files, bytes = report.bytes, took = ?report.took, "restored volume");
    agent
        .event(pvc, EventType::Normal, "VolumeRestored", note)
        .await;
    Ok(Ok(meta))
}

/// How soon a cross-node clone that failed for a reason that may pass (the source
/// agent restarting, a connection cut) starts over.
const PEER_RETRY: Duration = Duration::from_secs(5);

/// Makes the clone `request` asks for by streaming its source from node `from`'s
/// agent (`peer`), then answers ready; a refusal by that agent refuses the claim, any
/// other failure starts over after [`PEER_RETRY`]. A clone finished before an agent
/// restart is answered, not fetched again.
async fn fetch_clone(
    agent: &Agent,
    pvc: &PersistentVolumeClaim,
    claims: &Api<PersistentVolumeClaim>,
    request: &signed::VolumeRequest,
    from: &str,
    owner: Owner,
) -> Result<Action> {
    let done = agent
        .exports
        .by_name(&request.spec.name)
        .filter(|v| v.meta.owner.as_ref() == Some(&owner));
    if done.is_none() {
        let f = match agent.peer.fetch(pvc, request, from, owner).await {
            Ok(f) => f,
            Err(super::peer::FetchError::Refused(why)) => {
                let why = format!("node {}: not cloning: {why}", agent.node);
                return refuse(agent, pvc, claims, why).await;
            }
            Err(super::peer::FetchError::Failed(why)) => {
                let note = format!(
                    "node {}: streaming the clone from node {from} failed, starting over in {} s: {why}",
                    agent.node,
                    PEER_RETRY.as_secs()
                );
                tracing::warn!(claim = %pvc.name_any(), %from, %why, "cross-node clone failed; starting over");
                agent
                    .event(pvc, EventType::Warning, "CloneRetrying", note)
                    .await;
                return Ok(Action::requeue(PEER_RETRY));
            }
        };
        agent.changed.notify_one();
        let source = request.clone.as_ref().map_or_else(String::new, |s| {
            format!("claim {}/{}'s volume {}", s.namespace, s.claim, s.volume)
        });
        let note = format!(
            "node {}: volume {} holds a copy of {source} streamed from node {from} ({} files, {} bytes) in {:.3} s; the source's writes paused {:.1} ms",
            agent.node,
            f.meta.name,
            f.files,
            f.bytes,
            f.took.as_secs_f64(),
            f.pause.as_secs_f64() * 1000.0,
        );
        tracing::info!(volume = %f.meta.name, %from, files = f.files, bytes = f.bytes, took = ?f.took, pause = ?f.pause, "cloned volume from another node");
        agent
            .event(pvc, EventType::Normal, "VolumeCloned", note)
            .await;
    }
    let (uid, ns, name, volume) = (
        pvc.uid().unwrap_or_default(),
        pvc.namespace().unwrap_or_default(),
        pvc.name_any(),
        &request.spec.name,
    );
    agent.exports.label_claim(volume, &ns, &name);
    let sig = agent.signer.sign(&Message::Ready {
        claim_uid: &uid,
        node: &agent.node,
        volume: volume.as_str(),
    });
    let ready = [(READY, volume.to_string()), (READY_SIG, sig)];
    answer(agent, claims, &name, &ready).await?;
    Ok(Action::await_change())
}

/// Refuses the claim's request: a `ProvisioningFailed` event saying `why`, and the
/// [`REFUSED`] answer (once) so the controller can place the claim again.
async fn refuse(
    agent: &Agent,
    pvc: &PersistentVolumeClaim,
    claims: &Api<PersistentVolumeClaim>,
    why: String,
) -> Result<Action> {
    agent
        .event(pvc, EventType::Warning, "ProvisioningFailed", why.clone())
        .await;
    if ann(pvc, REFUSED).is_none() {
        answer(agent, claims, &pvc.name_any(), &[(REFUSED, why)]).await?;
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Sets the annotations `values` on claim `name` — only while the claim is still
/// placed on this node: the controller takes back the placement of an agent silent for
/// too long, and a READY on a claim placed elsewhere since would point its PV at a node
/// without the volume.
async fn answer(
    agent: &Agent,
    claims: &Api<PersistentVolumeClaim>,
    name: &str,
    values: &[(&str, String)],
) -> Result<()> {
    let mut ops = vec![json!({
        "op": "test",
        "path": json_pointer(&["metadata", "labels", NODE_KEY]),
        "value": agent.node,
    })];
    for (key, value) in values {
        ops.push(json!({"op": "add", "path": json_pointer(&["metadata", "annotations", key]), "value": value}));
    }
    let patch = serde_json::from_value(serde_json::Value::Array(ops))
        .map_err(|e| Error::BuildObject(format!("claim answer patch: {e}")))?;
    let keys: Vec<&str> = values.iter().map(|(k, _)| *k).collect();
    claims
        .patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await
        .map_err(Error::kube(format!(
            "annotate claim {name} with {}",
            keys.join(", ")
        )))?;
    Ok(())
}

/// An RFC 6901 pointer to the field at `path` (keys such as `localnfs.io/node` escaped).
fn json_pointer(path: &[&str]) -> String {
    path.iter()
        .map(|k| format!("/{}", k.replace('~', "~0").replace('/', "~1")))
        .collect()
}

async fn reconcile_pv(pv: Arc<PersistentVolume>, agent: Arc<Agent>) -> Result<Action> {
    let pv_name = pv.name_any();
    let pvs: Api<PersistentVolume> = Api::all(agent.client.clone());
    let Some(volume) = ann(pv.as_ref(), VOLUME_KEY).and_then(|v| VolumeName::new(v).ok()) else {
        return Ok(Action::await_change());
    };
    if let Some(owner) = pv_owner(&pv) {
        agent
            .exports
            .label_claim(&volume, &owner.namespace, &owner.claim);
        if agent.pv_names(&volume, Some(&pv_name)) {
            // Two PVs on one directory (left by a version before owner records): which
            // claim owns it is not ours to guess; neither PV's reclaim removes it.
            agent
                .warn_pv_once(
                    &pv,
                    "VolumeSharedByPvs",
                    format!("node {}: volume {volume} is named by another PV as well: its owner is not recorded and no reclaim removes it", agent.node),
                )
                .await;
        } else if agent.exports.by_name(&volume).is_none_or(|v| {
            v.meta.owner.as_ref().map(|o| o.claim_uid.as_str()) != Some(&owner.claim_uid)
        }) {
            // Volumes made before owners were recorded gain one from their PV, which
            // only the controller writes. (Read from memory first: an agent starting
            // with many volumes must not walk the store once per PV.)
            let vol = volume.clone();
            match agent
                .store_op(&volume, move |s| s.adopt(&vol, &owner))
                .await
            {
                Ok(Some(_)) => {}
                Ok(None) if pv.metadata.deletion_timestamp.is_none() => {
                    agent
                        .warn_pv_once(
                            &pv,
                            "VolumeMissing",
                            format!("node {}: volume {volume} is not on this node's disk; it is not made again (an empty volume would pass for the claim's data): restore its directory, or delete the claim", agent.node),
                        )
                        .await;
                }
                Ok(None) => {}
                Err(e) => {
                    agent
                        .warn_pv_once(
                            &pv,
                            "VolumeOwnerMismatch",
                            format!("node {}: {e}", agent.node),
                        )
                        .await;
                }
            }
        }
    }
    let finalizing = pv.metadata.deletion_timestamp.is_some()
        && pv.finalizers().iter().any(|f| f == PV_FINALIZER);
    if finalizing {
        return reclaim(&agent, &pv, &volume).await;
    }
    let want = ann(pv.as_ref(), RESIZE_TO).and_then(|s| s.parse::<u64>().ok());
    let have = ann(pv.as_ref(), SIZE).and_then(|s| s.parse::<u64>().ok());
    if let Some(want) = want.filter(|w| have.is_none_or(|h| h < *w)) {
        let vol = volume.clone();
        if let Err(e) = agent.store_op(&volume, move |s| s.resize(&vol, want)).await {
            agent
                .event(
                    pv.as_ref(),
                    EventType::Warning,
                    "VolumeResizeFailed",
                    format!("node {}: {e}", agent.node),
                )
                .await;
            return Err(e);
        }
        pvs.patch(
            &pv_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {SIZE: want.to_string()}}})),
        )
        .await
        .map_err(Error::kube(format!("annotate PV {pv_name}")))?;
    }
    Ok(Action::await_change())
}

/// The claim a PV we made was made for: its claimRef, when the PV's name is the one
/// made for that claim's uid (a PV made by hand, or re-bound, names no owner).
fn pv_owner(pv: &PersistentVolume) -> Option<Owner> {
    let r = pv.spec.as_ref()?.claim_ref.as_ref()?;
    let uid = r.uid.clone().filter(|u| !u.is_empty())?;
    (pv.name_any() == pv_name(&uid)).then(|| Owner {
        claim_uid: uid,
        namespace: r.namespace.clone().unwrap_or_default(),
        claim: r.name.clone().unwrap_or_default(),
    })
}

/// How long a PV whose finalizer this agent released is not reclaimed again (a uid
/// is never reused, so this only bounds the memory).
const RELEASED_FOR: Duration = Duration::from_secs(600);

/// How often a PV deleted while its claim still exists is looked at again (its claim's
/// deletion also shows up as the PV turning Released).
const IN_USE_RECHECK: Duration = Duration::from_secs(10);

/// A PV with our finalizer is being deleted: deal with its directory as
/// [`reclaim::on_pv_deleted`] says, from a fresh read of its claim, then let it go. A
/// failed read is an error (retried), never a reason to delete.
///
/// Once its finalizer is released the PV is gone, but a change queued before that
/// (kube-controller-manager's own finalizer coming off) still brings it back from a
/// cached copy that shows ours: such a pass would read the claim and patch a PV that no
/// longer exists (two requests, in 2 of 3 deletions of a 3,000-claim bench). PVs this
/// agent released are remembered for [`RELEASED_FOR`] and skipped.
async fn reclaim(agent: &Agent, pv: &PersistentVolume, volume: &VolumeName) -> Result<Action> {
    let pv_name = pv.name_any();
    let uid = pv.uid().unwrap_or_default();
    if !uid.is_empty() && agent.released_lately(&uid) {
        return Ok(Action::await_change());
    }
    let found = match reclaim::claim_ref(pv) {
        Some((ns, claim)) => Api::<PersistentVolumeClaim>::namespaced(agent.client.clone(), ns)
            .get_opt(claim)
            .await
            .map_err(Error::kube(format!(
                "read claim {ns}/{claim} of PV {pv_name}"
            )))?,
        None => None,
    };
    let claim = reclaim::claim_state(pv, found.as_ref());
    let policy = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref());
    let on_delete = ann(pv, ON_DELETE_KEY);
    let decision = reclaim::on_pv_deleted(policy, on_delete, claim);
    let owner_uid = pv_owner(pv).map(|o| o.claim_uid);
    let shared = agent.pv_names(volume, Some(&pv_name));
    let vol = volume.clone();
    let remove = |archive: bool| async move {
        // A volume goes only for its owner's claim, and never while another PV names
        // it; anything else keeps the data and lets this PV go with a warning.
        let Some(uid) = owner_uid.filter(|_| !shared) else {
            return Err(Error::Nfs(NfsError::VolumeOwned {
                name: vol.to_string(),
                owner: if shared {
                    "another PV as well".to_owned()
                } else {
                    "no claim this PV was made for".to_owned()
                },
            }));
        };
        agent
            .store_op(volume, move |s| s.remove_for(&vol, &uid, archive).map(drop))
            .await
    };
    let result = match &decision {
        Reclaim::Wait => {
            let (ns, name) = reclaim::claim_ref(pv).unwrap_or_default();
            agent
                .warn_pv_once(
                    pv,
                    "VolumeInUse",
                    format!(
                        "PV deleted while claim {ns}/{name} still uses it: keeping the PV (Terminating) and volume {volume} on node {} until the claim is deleted",
                        agent.node
                    ),
                )
                .await;
            return Ok(Action::requeue(IN_USE_RECHECK));
        }
        Reclaim::Delete => remove(false).await,
        Reclaim::Archive => remove(true).await,
        Reclaim::Keep { warning } => {
            if let Some(w) = warning {
                agent
                    .event(
                        pv,
                        EventType::Warning,
                        "VolumeKept",
                        format!("node {}: volume {volume}: {w}", agent.node),
                    )
                    .await;
            }
            Ok(())
        }
    };
    let result = match result {
        Err(e @ Error::Nfs(NfsError::VolumeOwned { .. })) => {
            agent
                .event(
                    pv,
                    EventType::Warning,
                    "VolumeKept",
                    format!("node {}: not removing volume {volume}: {e}", agent.node),
                )
                .await;
            Ok(())
        }
        other => other,
    };
    if let Err(e) = result {
        agent
            .warn_pv_once(
                pv,
                "VolumeFailedDelete",
                format!("node {}: {e}", agent.node),
            )
            .await;
        return Err(e);
    }
    tracing::info!(%volume, pv = %pv_name, ?decision, "PV deleted: dealt with its volume");
    if let Some(patch) = crate::kubeclient::remove_finalizer(pv.finalizers(), PV_FINALIZER) {
        Api::<PersistentVolume>::all(agent.client.clone())
            .patch(&pv_name, &PatchParams::default(), &patch)
            .await
            .map_err(Error::kube(format!("release finalizer of PV {pv_name}")))?;
        if !uid.is_empty() {
            agent.released_now(uid);
        }
    }
    agent.forget_pv(&pv_name);
    Ok(Action::await_change())
}

/// Bytes a new volume may still take: what the disk has free less what existing
/// volumes may still grow into, and (with `--capacity`) no more than the capacity
/// less every volume's size.
fn free_bytes(exports: &Exports, capacity: Option<u64>) -> u64 {
    let volumes = exports.all();
    let promised: u64 = volumes.iter().map(|v| v.free()).sum();
    let disk = nix::sys::statvfs::statvfs(exports.store().root())
        .map_or(0, |st| {
            st.blocks_available().saturating_mul(st.fragment_size())
        })
        .saturating_sub(promised);
    match capacity {
        Some(cap) => {
            let allocated: u64 = volumes
                .iter()
                .map(|v| v.limit.load(std::sync::atomic::Ordering::Acquire))
                .sum();
            disk.min(cap.saturating_sub(allocated))
        }
        None => disk,
    }
}

/// Each volume's usage report now, with its size (see `objects::usage`).
fn usage_now(exports: &Exports) -> BTreeMap<String, usage::Now> {
    use std::sync::atomic::Ordering::Acquire;
    exports
        .all()
        .iter()
        .map(|v| {
            let report = [
                v.used.load(Acquire),
                v.inodes.load(Acquire),
                v.max_inodes.load(Acquire),
            ];
            let size = v.limit.load(Acquire);
            (v.meta.name.to_string(), usage::Now { report, size })
        })
        .collect()
}

/// Renews the heartbeat every [`HEARTBEAT`] (sooner when free space changed), and
/// writes the usage shards that changed meaningfully since they were last written
/// (`objects::usage::to_write`) before it, so a heartbeat never counts a shard not
/// written yet.
async fn heartbeat(agent: Arc<Agent>, shutdown: CancellationToken) {
    let leases: Api<Lease> = Api::namespaced(agent.liveness.clone(), &agent.namespace);
    // Shard → what was last written there, by this process (a restart writes each once).
    let mut written: HashMap<u32, BTreeMap<String, usage::Report>> = HashMap::new();
    // Shard → when it was last written, for the small changes written once due.
    let mut written_at: HashMap<u32, Instant> = HashMap::new();
    let mut shards_written = 0;
    // The key is this process's: written once (retried each round until it is), so
    // heartbeats need not carry it.
    let key = agent.signer.public().to_hex();
    let mut key_written = false;
    // Whether this round was woken early by a change (then the next early one waits
    // BURST_GAP).
    let mut early = false;
    // A key Lease deleted under the running agent is written again at once.
    let key_gone = Arc::new(Notify::new());
    {
        // Ends with the agent (this loop returns only on shutdown).
        let (leases, node, gone, stop) = (
            leases.clone(),
            agent.node.clone(),
            key_gone.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move { heartbeat::watch_key(leases, &node, &gone, &stop).await });
    }
    loop {
        let round = tokio::time::Instant::now();
        if !key_written {
            match heartbeat::write_key(&leases, &agent.node, &key).await {
                Ok(()) => key_written = true,
                Err(e) => tracing::warn!(error = %e, "cannot write the agent's key Lease"),
            }
        }
        let (free_bytes, volumes) = {
            let (ex, cap) = (agent.exports.clone(), agent.capacity);
            tokio::task::spawn_blocking(move || (free_bytes(&ex, cap), usage_now(&ex)))
                .await
                .unwrap_or_default()
        };
        let shards = usage::shard_count(volumes.len());
        if shards != shards_written {
            written.clear(); // every volume may have moved to another shard
        }
        let mut all_written = true;
        let due = |shard| {
            written_at
                .get(&shard)
                .is_none_or(|t: &Instant| t.elapsed() >= usage::REFRESH)
        };
        for (shard, report) in usage::to_write(&volumes, &written, shards, due) {
            match heartbeat::write_usage(&leases, &agent.node, shard, &report).await {
                Ok(()) => {
                    written.insert(shard, report);
                    written_at.insert(shard, Instant::now());
                }
                Err(e) => {
                    all_written = false;
                    tracing::warn!(error = %e, shard, "cannot write a usage report");
                }
            }
        }
        if all_written {
            shards_written = shards;
        }
        let beat = Heartbeat {
            node: &agent.node,
            free_bytes,
            nfs_port: agent.nfs_port,
            peer_port: agent.peer_port,
            // Until the new shards are all written, readers keep reading the old ones.
            usage_shards: shards_written.max(1),
            key_until_written: (!key_written).then_some(key.as_str()),
        };
        if let Err(e) = heartbeat::renew(&leases, &beat).await {
            tracing::warn!(error = %e, "cannot renew the node heartbeat lease");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(HEARTBEAT) => early = false,
            _ = key_gone.notified() => key_written = false,
            _ = agent.changed.notified() => {
                // Volumes made on this node are reported together: one heartbeat (and
                // usage write) per CHANGE_GAP, per BURST_GAP while they keep coming,
                // not one per volume.
                let gap = if early { BURST_GAP } else { CHANGE_GAP };
                early = true;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(round + gap) => {}
                }
            }
        }
    }
}
