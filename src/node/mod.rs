//! `localnfs node`: the node agent. Serves every volume under its root over NFSv3 +
//! MOUNT on one port, re-reads the volume store every second (new volumes, deletions,
//! new size limits take effect without a remount), and exposes the admin endpoints
//! (`/metrics`: per-procedure and per-volume NFS counts, see `nfs::NfsCollector`). It
//! prints `nfs listening on ADDR` and `admin listening on ADDR` (in cluster mode also
//! `peer listening on ADDR`, the [`peer`] channel) on stdout, for scripts and tests
//! that asked for port 0.
//!
//! Standalone mode (`--standalone`) needs no cluster: volumes are managed with
//! `localnfs volume`; per-volume grants come from `<root>/access.json`. In cluster mode
//! (`--node-name`) the agent also runs [`cluster`]: heartbeat, volume creation and
//! reclaim for the controller, [`grants`]: the allow-list from Nodes and each
//! volume's nodes from its PV, and [`backups`]: the VolumeBackups of its volumes, to
//! the targets of `--backup-target` ([`targets`]). It serves no NFS call before those are known (from the
//! cluster, or saved by its last run).
//!
//! At start it raises its open-file limit to the hard limit (systemd and containerd 2
//! start processes at a soft 1,024) and shares what it gets between connections, the
//! handle cache and the calls running (`nfs::share_descriptors`): the connection cap
//! is the lower of `--max-connections` and that share, so idle connections cannot
//! leave an honest call without a descriptor. On SIGTERM it stops accepting, answers
//! the calls it has for at most `--drain-timeout`, then cuts what is left, gives the
//! rest (cluster agent, admin listener) a few seconds more, and exits.

pub mod backup_cmd;
pub mod backups;
pub mod cluster;
pub mod grants;
pub mod keys;
pub mod peer;
pub mod restore;
pub mod step;
pub mod targets;
pub mod volume_cmd;

use std::sync::Arc;
use std::time::Duration;

use crate::admin;
use crate::cli::NodeArgs;
use crate::error::{Error, Result};
use crate::nfs::{self, AllowList, Exports};
use crate::volume::VolumeStore;

/// How often the store is re-read for new volumes and size changes.
const REFRESH: Duration = Duration::from_secs(1);

/// After the NFS drain, how long the cluster agent, the store refresher and the admin
/// listener get to finish (`--drain-timeout` plus this stays under the DaemonSet's
/// 30 s grace period with the defaults).
const STOP_REST: Duration = Duration::from_secs(5);

pub async fn run(args: NodeArgs) -> Result<()> {
    let cluster = if args.standalone {
        None
    } else {
        let node = args.node_name.clone().ok_or(Error::Unsupported(
            "cluster mode needs --node-name (NODE_NAME); use --standalone to run without a cluster",
        ))?;
        Some((
            crate::kubeclient::limited_client(
                args.kube.kubeconfig.as_deref(),
                args.kube.rate(crate::kubeclient::AGENT_RATE),
            )
            .await?,
            // The heartbeat's client: its own bucket (see `kubeclient::LIVENESS_RATE`).
            crate::kubeclient::limited_client(
                args.kube.kubeconfig.as_deref(),
                crate::kubeclient::LIVENESS_RATE,
            )
            .await?,
            node,
        ))
    };
    // Modes and owners come from the client and the volume spec, not our umask.
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe {
        libc::umask(0);
    }
    // Validated before anything starts: a name given twice is a configuration error.
    let backup_targets =
        targets::BackupTargets::new(&args.backup_targets).map_err(Error::BadConfig)?;
    let shutdown = crate::shutdown::on_signals()?;
    let open_files = raise_open_files();
    let store = VolumeStore::open(&args.root)?;
    let allow = AllowList::new(args.allow.clone());
    let exports = tokio::task::block_in_place(|| Exports::load(store, allow.clone()))?;
    let mut limits = args.nfs_limits();
    let share = nfs::share_descriptors(
        open_files,
        exports.all().len(),
        limits.max_connections,
        nfs::MAX_CACHED,
    );
    if share.connections < limits.max_connections {
        tracing::warn!(
            open_files,
            max_connections = limits.max_connections,
            connections = share.connections,
            cached_objects = share.cached_objects,
            "open-file limit too low for --max-connections: serving fewer connections at once (raise the hard RLIMIT_NOFILE, e.g. LimitNOFILE= or the container runtime's default)"
        );
    }
    limits.max_connections = share.connections;
    let exports = Arc::new(
        exports
            .with_cached_objects(share.cached_objects)
            .with_device_nodes(args.allow_device_nodes),
    );

    // Cluster mode: nothing is served before the cluster's access rules are in force,
    // from the last run's copy or, without one, from the cluster once listed.
    let (synced_tx, mut synced) = tokio::sync::watch::channel(cluster.is_none());
    if cluster.is_some() {
        match grants::load(&args.root) {
            Some(saved) => {
                grants::apply(&saved, &args.allow, &allow, &exports);
                synced_tx.send_replace(true);
            }
            None => exports.access.set_cluster(Default::default()),
        }
    }
    let listener = crate::server::bind("NFS", args.listen).await?;
    let nfs_addr = listener.local_addr().unwrap_or(args.listen);
    let server = nfs::Server::new(exports.clone(), limits);
    let mut registry = crate::metrics::registry("node");
    registry.register_collector(Box::new(server.collector()));
    let peer_metrics = peer::PeerMetrics::default();
    peer_metrics.register(&mut registry);
    // The peer channel (cross-node clones) exists in cluster mode only.
    let peer_listener = match &cluster {
        Some(_) => Some(crate::server::bind("peer", args.peer_addr(args.listen.port())).await?),
        None => None,
    };
    let peer_line = peer_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| format!("peer listening on {a}\n"))
        .unwrap_or_default();
    registry.register_collector(Box::new(localnfs_nfs::backup::BackupCollector));
    let backup_progress = prometheus_client::metrics::gauge::Gauge::default();
    registry.register(
        "backup_progress_bytes",
        "Bytes the running VolumeBackup has laid out so far (0 when none runs)",
        backup_progress.clone(),
    );
    let admin = admin::start(args.admin.admin_addr, registry, &shutdown).await?;
    let (admin_addr, readiness) = (admin.addr, admin.readiness.clone());
    volume_cmd::fail_interrupted_copies(&args.root);
    backup_cmd::fail_interrupted_backups(&args.root);
    let refresher = {
        let (exports, shutdown) = (exports.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut last_recount = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(REFRESH) => {}
                }
                if last_recount.elapsed() >= crate::nfs::USAGE_RECOUNT {
                    last_recount = tokio::time::Instant::now();
                    let ex = exports.clone();
                    // Not awaited: a large volume's walk must not hold up the refresh.
                    tokio::task::spawn_blocking(move || ex.recount_usage());
                }
                let ex = exports.clone();
                let refreshed = tokio::task::spawn_blocking(move || {
                    // A mount table save that failed is retried here until it lands.
                    ex.mounts.flush();
                    ex.access.reload();
                    volume_cmd::serve_copy_requests(&ex);
                    backup_cmd::serve_backup_requests(&ex);
                    ex.refresh()
                });
                match refreshed.await {
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot re-read volumes"),
                    Err(e) => tracing::error!(error = %e, "volume refresh task failed"),
                    Ok(Ok(())) => {}
                }
            }
        })
    };
    tracing::info!(
        nfs = %nfs_addr,
        admin = %admin_addr,
        root = %args.root.display(),
        volumes = exports.all().len(),
        allow = %args.allow.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        "node agent serving"
    );
    // Machine-readable lines for scripts and tests that asked for port 0, in one write
    // (a reader that takes the first line and closes the pipe must not fail the second).
    let banner =
        format!("nfs listening on {nfs_addr}\nadmin listening on {admin_addr}\n{peer_line}");
    print!("{banner}");
    let signer = match &cluster {
        Some(_) => Some(keys::agent_signer(exports.store())?),
        None => None,
    };
    let agent = cluster.zip(signer).zip(peer_listener).map(
        |(((client, liveness, node), signer), peer_listener)| {
            let cfg = cluster::ClusterConfig {
                client,
                liveness,
                node,
                namespace: args.heartbeats.heartbeat_namespace.clone(),
                install_namespace: args.namespace.clone(),
                nfs_port: nfs_addr.port(),
                capacity: args.capacity,
                extra_allow: args.allow.clone(),
                signer,
                backup_targets: backup_targets.clone(),
                backup_progress: backup_progress.clone(),
                peer_listener,
                peer_metrics,
            };
            tokio::spawn(cluster::run(
                cfg,
                exports.clone(),
                allow.clone(),
                synced_tx,
                shutdown.clone(),
            ))
        },
    );
    if !*synced.borrow() {
        tracing::info!("waiting for the cluster's Nodes and PVs before serving NFS");
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = synced.wait_for(|s| *s) => {}
        }
    }
    readiness.set(true);
    server.serve(listener, allow, shutdown.clone()).await;
    readiness.set(false);
    let rest = async {
        if let Some(agent) = agent {
            let _ = agent.await;
        }
        let _ = refresher.await;
        let _ = admin.task.await;
    };
    // The rest had the NFS drain's time to stop too; a client that keeps an admin
    // request half-sent or its responses unread must not hold the exit past the
    // pod's grace period. What is cut here acknowledged nothing to an NFS client.
    if tokio::time::timeout(STOP_REST, rest).await.is_err() {
        tracing::warn!(timeout = ?STOP_REST, "admin connections or cluster calls still running after the NFS drain; exiting anyway");
    }
    tracing::info!("node agent stopped");
    Ok(())
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (or to `fs.nr_open` when the hard
/// limit is unlimited, which the kernel refuses as a soft value) and returns the soft
/// limit now in force. Best effort: a refusal is logged and the limit left as it was.
fn raise_open_files() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        tracing::error!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
        return 1024;
    }
    let before = lim.rlim_cur;
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(lim.rlim_max);
    let want = lim.rlim_max.min(ceiling);
    if want > before {
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } == 0 {
            lim.rlim_cur = want;
        } else {
            tracing::error!(error = %std::io::Error::last_os_error(), soft = before, hard = lim.rlim_max, "cannot raise the open-file limit");
        }
    }
    tracing::info!(
        soft_before = before,
        soft = lim.rlim_cur,
        hard = lim.rlim_max,
        "open-file limit"
    );
    lim.rlim_cur
}
