//! `localnfs controller`: leader election, then the claim and PV reconcilers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;

use super::claims::{self, Ctx};
use super::leader::{LEASE_DURATION, LeaderElector, RENEW_EVERY};
use super::metrics::ControllerMetrics;
use super::protocol::NODE_LABEL;
use super::volumes;
use crate::admin;
use crate::cli::ControllerArgs;
use crate::error::{Error, Result};

/// The Lease the controllers compete for.
pub const LEADER_LEASE: &str = "localnfs-controller";

pub async fn run(args: ControllerArgs) -> Result<()> {
    let shutdown = crate::shutdown::on_signals()?;
    let client = crate::kubeclient::client(args.kube.kubeconfig.as_deref()).await?;
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let mut registry = crate::metrics::registry("controller");
    let metrics = ControllerMetrics::register(&mut registry);
    let admin = admin::start(args.admin.admin_addr, registry, &shutdown).await?;
    let readiness = admin.readiness.clone();
    let agents = crate::scheduler::watch::Shared::default();
    let mut agents_listed =
        crate::scheduler::watch::watch_agents(&client, &args.install.namespace, &agents, &shutdown);
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        provisioner: args.install.provisioner_name.clone(),
        namespace: args.install.namespace.clone(),
        events: crate::events::Events::new(client.clone(), "localnfs-controller", &identity),
        metrics: metrics.clone(),
        agents,
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
        Api::<Lease>::namespaced(client.clone(), &args.install.namespace),
        LEADER_LEASE,
        &identity,
    );
    tracing::info!(%identity, provisioner = %args.install.provisioner_name, "controller starting");
    let mut leading: Leading = None;
    let mut last_renewal = Instant::now();
    loop {
        match elector.try_lead().await {
            Ok(true) => {
                readiness.set(true);
                last_renewal = Instant::now();
                if leading.is_none() {
                    tracing::info!(%identity, "became leader");
                    metrics.leader.set(1);
                    let stop = shutdown.child_token();
                    leading = Some((stop.clone(), tokio::spawn(controllers(ctx.clone(), stop))));
                }
            }
            Ok(false) => {
                readiness.set(true);
                step_down(&mut leading, &metrics, "lost leadership").await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "leader election round failed");
                // Step down before the lease can have expired for the others.
                if last_renewal.elapsed() > LEASE_DURATION - RENEW_EVERY {
                    step_down(
                        &mut leading,
                        &metrics,
                        "could not renew the leader lease in time",
                    )
                    .await;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(RENEW_EVERY) => {}
        }
    }
    step_down(&mut leading, &metrics, "shutting down").await;
    let _ = admin.task.await;
    tracing::info!("controller stopped");
    Ok(())
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

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localnfs".into());
    format!("{host}-{}", std::process::id())
}

fn error_policy<K>(_obj: Arc<K>, err: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.metrics.reconcile_errors.inc();
    if crate::kubeclient::lost_race(err) {
        // Someone updated the object between our read and write: retry on a fresh copy.
        tracing::debug!(error = %err, "lost an update race; retrying");
        return Action::requeue(Duration::from_millis(200));
    }
    tracing::warn!(error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Runs both reconcilers until `stop` fires.
async fn controllers(ctx: Arc<Ctx>, stop: CancellationToken) {
    let client = ctx.client.clone();
    let ours = watcher::Config::default().labels(NODE_LABEL);
    let claims = crate::cache::controller(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches(
        Api::<PersistentVolume>::all(client.clone()),
        ours.clone(),
        |pv: PersistentVolume| {
            let r = pv.spec?.claim_ref?;
            Some(ObjectRef::new(r.name.as_deref()?).within(r.namespace.as_deref()?))
        },
    )
    .graceful_shutdown_on(stop.clone().cancelled_owned())
    .run(claims::reconcile, error_policy, ctx.clone())
    .for_each(|_| futures::future::ready(()));
    let pvs = crate::cache::controller(Api::<PersistentVolume>::all(client), ours)
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(volumes::reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    tokio::join!(claims, pvs);
}
