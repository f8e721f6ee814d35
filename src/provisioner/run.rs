//! `localnfs controller`: leader election, then the claim, PV and publish reconcilers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::CancellationToken;

use super::claims;
use super::ctx::Ctx;
use super::leader::{LeaderElector, RENEW_EVERY, round_budget};
use super::metrics::ControllerMetrics;
use super::pods::{self, Usage};
use super::queue::{WorkQueue, run_workers};
use super::triggers;
use super::volumes;
use crate::admin;
use crate::cli::ControllerArgs;
use crate::error::Result;
use crate::objects::keys::NODE_KEY;

/// The Lease the controllers compete for.
pub const LEADER_LEASE: &str = "localnfs-controller";

pub async fn run(args: ControllerArgs) -> Result<()> {
    let shutdown = crate::shutdown::on_signals()?;
    let client = crate::kubeclient::limited_client(
        args.kube.kubeconfig.as_deref(),
        args.kube.rate(crate::kubeclient::CONTROLLER_RATE),
    )
    .await?;
    // The leader Lease's client: its own bucket, whatever the workers queue (see
    // `kubeclient::LIVENESS_RATE`).
    let liveness = crate::kubeclient::limited_client(
        args.kube.kubeconfig.as_deref(),
        crate::kubeclient::LIVENESS_RATE,
    )
    .await?;
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let mut registry = crate::metrics::registry("controller");
    let metrics = ControllerMetrics::register(&mut registry);
    let admin = admin::start(args.admin.admin_addr, registry, &shutdown).await?;
    let readiness = admin.readiness.clone();
    let agents = crate::kubeclient::Shared::default();
    let mut agents_listed = crate::heartbeat::watch(
        &client,
        &args.install.heartbeats.heartbeat_namespace,
        &agents,
        |a| a,
        &shutdown,
    );
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        provisioner: args.install.provisioner_name.clone(),
        namespace: args.install.namespace.clone(),
        events: crate::events::Events::new(client.clone(), "localnfs-controller", &identity),
        metrics: metrics.clone(),
        agents,
        classes: watch_classes(&client, &shutdown),
        agent_grace: args.agent_grace,
        backup_grace: args.backup_grace,
        reservations: Default::default(),
        fence: Default::default(),
        signer: super::keys::controller_signer(&client, &args.install.namespace).await?,
        node_ips: Default::default(),
    });
    // Placing a volume needs the agents' free space: know it before leading.
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        r = agents_listed.wait_for(|listed| *listed) => {
            if r.is_err() {
                return Ok(()); // the watch ended: only on shutdown
            }
        }
    }
    let elector = LeaderElector::new(
        Api::<Lease>::namespaced(liveness, &args.install.namespace),
        LEADER_LEASE,
        &identity,
    );
    tracing::info!(%identity, provisioner = %args.install.provisioner_name, "controller starting");
    let mut leading: Leading = None;
    loop {
        let round_started = Instant::now();
        let budget = round_budget(leading.is_some(), &ctx.fence, round_started);
        match elector.try_lead(budget).await {
            Ok(true) => {
                ctx.fence.renewed(round_started);
                readiness.set(true);
                if leading.is_none() {
                    tracing::info!(%identity, "became leader");
                    metrics.leader.set(1);
                    let stop = shutdown.child_token();
                    tokio::spawn(watchdog(ctx.clone(), stop.clone()));
                    tokio::spawn(key_check(ctx.clone(), stop.clone()));
                    leading = Some((stop.clone(), tokio::spawn(controllers(ctx.clone(), stop))));
                }
            }
            Ok(false) => {
                readiness.set(true);
                if leading.is_some() {
                    // Someone else holds the lease: stop at once, in-flight writes too.
                    give_up("another replica holds the leader lease");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "leader election round failed");
                if leading.is_some() && !ctx.fence.holds_at(Instant::now()) {
                    give_up("could not renew the leader lease in time");
                }
            }
        }
        // Candidates look more often than the leader renews, so they see the last
        // renewal of a leader that stopped soon after it was made.
        let next_round = if leading.is_some() {
            RENEW_EVERY
        } else {
            RENEW_EVERY / 2
        };
        // Counted from the round's start: a slow round does not push the next one
        // later still.
        let next_at = tokio::time::Instant::from_std(round_started + next_round);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(next_at) => {}
        }
    }
    step_down(&mut leading, &metrics, "shutting down").await;
    let _ = admin.task.await;
    tracing::info!("controller stopped");
    Ok(())
}

/// Ends the process: a leader that may have lost its lease must not write another
/// byte, and a restart (the Deployment's) is the one way to be sure nothing it
/// started is still running.
fn give_up(why: &str) -> ! {
    tracing::error!(why, "stopping: no longer sure to be the leader");
    std::process::exit(1)
}

/// While leading, checks the fence often: a leader resumed after a stall (SIGSTOP, a
/// long GC-like pause, a partition) gives up before its reconcilers write, as they also
/// check the fence before each write.
async fn watchdog(ctx: Arc<Ctx>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if !ctx.fence.holds_at(Instant::now()) {
            give_up("the leader lease was not renewed in time");
        }
    }
}

/// While leading, checks now and then that the signing key is still the Secret's (see
/// `keys::still_current`); a replaced key means a restart, to load the new one.
async fn key_check(ctx: Arc<Ctx>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(super::keys::KEY_CHECK) => {}
        }
        match super::keys::still_current(&ctx.client, &ctx.namespace, &ctx.signer).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(
                    "the signing key in the Secret is no longer this process's: restarting to load it"
                );
                std::process::exit(1)
            }
            Err(e) => tracing::warn!(error = %e, "cannot check the controller's signing key"),
        }
    }
}

type Leading = Option<(CancellationToken, tokio::task::JoinHandle<()>)>;

/// Stops the reconcilers if they run.
async fn step_down(leading: &mut Leading, metrics: &ControllerMetrics, why: &str) {
    if let Some((stop, task)) = leading.take() {
        tracing::warn!(why, "stopping the reconcilers");
        stop.cancel();
        let _ = task.await;
        metrics.leader.set(0);
    }
}

/// A cache of StorageClasses, kept current until `shutdown`.
fn watch_classes(client: &kube::Client, shutdown: &CancellationToken) -> Store<StorageClass> {
    let (store, writer) = reflector::store();
    let classes = watcher(
        Api::<StorageClass>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(crate::cache::trim)
    .reflect(writer)
    .take_until(shutdown.clone().cancelled_owned())
    .for_each(|_| futures::future::ready(()));
    tokio::spawn(classes);
    store
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localnfs".into());
    format!("{host}-{}", std::process::id())
}

/// Claims reconciled at once: enough to keep the API server busy, few enough that the
/// controller holds a few hundred requests at most (up to two each while a claim's
/// PV and claim phases are written together), not thousands. A claim's
/// worker mostly waits on the API server (about 0.2 s a write under a burst on 2
/// cores, four writes a claim), so claims a second are about workers / 1 s: at 64, a
/// 2,000-claim burst on 100 nodes queued up to 968 claims while the machine had
/// cores to spare (bench/README.md, the scale section).
const CLAIM_WORKERS: usize = 128;
/// PVs deleted at once. Each deletion is two requests one after the other (read its
/// claim, delete). When it was four (the PV read too, and an event), 4 at once capped
/// reclaim at roughly 40 PVs a second on this project's loaded 2-core machine (5,000
/// in 133 s), about the rate claims are made at: a burst of deletes should not queue
/// behind that.
const PV_WORKERS: usize = 32;
/// PVs whose published nodes are written at once.
const PUBLISH_WORKERS: usize = 8;

/// Runs the reconcilers until `stop` fires: watches queue the keys of claims and PVs
/// that changed, workers reconcile them (see `queue`, `triggers`, `pods`).
async fn controllers(ctx: Arc<Ctx>, stop: CancellationToken) {
    let claims = WorkQueue::with_depth(ctx.metrics.queue("claims"));
    let pvs = WorkQueue::with_depth(ctx.metrics.queue("pvs"));
    let publish = WorkQueue::new();
    // Fresh each term: what an earlier term saw may be stale.
    let usage = Arc::new(Usage::new(stop.clone()));
    let ours = watcher::Config::default().labels(NODE_KEY);
    // Fresh each term too, filled by the two watches below.
    let (caches, claim_writer, pv_writer) = triggers::caches();
    // An agent's answer moves a claim up the queue once its signature checks out.
    let answered = {
        let ctx = ctx.clone();
        move |pvc: &k8s_openapi::api::core::v1::PersistentVolumeClaim| {
            pvc.annotations().contains_key(crate::objects::keys::READY) && ctx.verify(pvc).ready
        }
    };
    // A deleted claim's PV is looked at at once (`volumes`), not only once
    // kube-controller-manager has marked it Released.
    let claim_deleted = {
        let pvs = pvs.clone();
        move |pvc: &k8s_openapi::api::core::v1::PersistentVolumeClaim| {
            if let Some(uid) = pvc.uid() {
                pvs.add(crate::objects::claim::pv_name(&uid));
            }
        }
    };
    let watch_claims = triggers::watch_claims(
        ctx.client.clone(),
        claim_writer,
        claims.clone(),
        answered,
        claim_deleted,
        stop.clone(),
    );
    let watch_pvs = triggers::watch_pvs(
        ctx.client.clone(),
        ours,
        pv_writer,
        ctx.provisioner.clone(),
        triggers::PvQueues {
            claims: claims.clone(),
            pvs: pvs.clone(),
            publish: publish.clone(),
            usage: usage.clone(),
        },
        stop.clone(),
    );
    let watch_pods = pods::watch_pods(
        ctx.client.clone(),
        usage.clone(),
        publish.clone(),
        stop.clone(),
    );
    let close = async {
        stop.cancelled().await;
        claims.close();
        pvs.close();
        publish.close();
    };
    let workers = async {
        // The workers read the caches: they start once both hold their first list.
        let term = Instant::now();
        tokio::select! {
            ready = caches.ready() => if !ready {
                return;
            },
            _ = stop.cancelled() => return,
        }
        tracing::info!(
            claims = caches.claims.state().len(),
            pvs = caches.pvs.state().len(),
            queued_claims = claims.len(),
            listed_in_ms = term.elapsed().as_millis() as u64,
            "the term's caches are filled: reconciling"
        );
        tokio::join!(
            run_workers(publish.clone(), PUBLISH_WORKERS, |name| {
                let (ctx, usage, caches) = (ctx.clone(), usage.clone(), caches.clone());
                async move { pods::reconcile_name(name, &ctx, &usage, &caches).await }
            }),
            run_workers(claims.clone(), CLAIM_WORKERS, |key| {
                let (ctx, caches) = (ctx.clone(), caches.clone());
                async move { claims::reconcile_key(key, &ctx, &caches).await }
            }),
            run_workers(pvs.clone(), PV_WORKERS, |name| {
                let (ctx, caches) = (ctx.clone(), caches.clone());
                async move { volumes::reconcile_name(name, &ctx, &caches).await }
            }),
        );
    };
    // VolumeBackupSchedules: their own watch, on the leader only.
    let schedules = super::schedules::run(ctx.clone(), stop.clone());
    // VolumeRestores: likewise.
    let restores = super::restores::run(ctx.clone(), stop.clone());
    // VolumeBackups no agent will run: likewise.
    let backups = super::backups::run(ctx.clone(), stop.clone());
    tokio::join!(
        watch_claims,
        watch_pvs,
        watch_pods,
        close,
        workers,
        schedules,
        restores,
        backups
    );
}
