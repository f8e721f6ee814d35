//! Provisioning throughput on the real control plane: N claims created at once, time
//! until each is Bound (p50, p99, max), controller CPU seconds and peak RSS, under
//! Immediate and WaitForFirstConsumer binding.
//!
//! Run: `cargo bench --bench provision` (defaults: 100 and 500 claims, both modes,
//! 5 nodes), or e.g. `cargo bench --bench provision -- --counts 5000 --modes immediate`
//! for the 5,000-PV memory check. Needs scripts/k8s-binaries and etcd. Besides the
//! table it draws each burst as claims Bound over time (`--svg PATH`, default
//! `bench/provision-burst.svg`).
//!
//! `--failover` (issue 14 item 7): two controller replicas, each burst run twice, once
//! undisturbed and once with the leader SIGKILLed when half the claims are Bound; the
//! table adds the standby's takeover time, the time until all are Bound, and checks
//! that every claim has exactly one PV and every PV one directory (and nothing more).
//! Unless `--no-delete` (and not with `--failover`), every burst is then deleted at
//! once and a second table times the reclaim: deletes taken, all PVs Released, all PVs
//! gone, all volume directories gone, and delete → PV gone p50/p99.
//! `--guard`: agents run as the install runs them (shipped RBAC, pod-bound tokens)
//! behind the agents' write guard served by the scheduler helper, to see its cost.

#[path = "burst/mod.rs"]
mod burst;
#[path = "charts.rs"]
mod charts;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burst::{cpu_seconds, create_all, end_state, peak_rss_mib, percentile, rss_mib_now};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use localnfs_testbed::{TestCluster, kubelet};
use serde_json::json;
use support::cluster::{
    HEARTBEATS, Localnfs, leader_holder, storage_class, volume_dirs, wait_for_leader,
};
use support::credentials;

struct Row {
    mode: &'static str,
    count: usize,
    /// Seconds after the first create when the leader was killed (failover runs).
    killed_at: Option<f64>,
    /// Seconds from the kill until another replica held the leader Lease.
    takeover: Option<f64>,
    /// Seconds from the first create until the last claim was Bound.
    all_bound: f64,
    /// What the end state looked like: PVs, directories, and whether every claim has
    /// exactly one PV and every PV its directory.
    pvs: usize,
    dirs: usize,
    one_each: bool,
    p50: f64,
    p99: f64,
    max: f64,
    cpu: f64,
    rss_mib: f64,
    settled_mib: f64,
    /// When each claim was Bound, seconds after the first was created, in order.
    bound_after: Vec<f64>,
    /// The reclaim of the same claims, when measured (`--no-delete` skips it).
    delete: Option<DeleteRow>,
}

/// Deleting every claim at once (16 requests in flight), seconds after the first
/// delete: until the API server had taken every delete, until every PV was Released,
/// until every PV was gone, until no volume directory was left on any node; and
/// p50/p99 from a claim's delete to its PV being gone.
struct DeleteRow {
    deleted: f64,
    released: f64,
    pvs_gone: f64,
    dirs_gone: f64,
    p50: f64,
    p99: f64,
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let counts: Vec<usize> = arg("--counts")
        .unwrap_or_else(|| "100,500".into())
        .split(',')
        .filter_map(|c| c.parse().ok())
        .collect();
    let modes: Vec<String> = arg("--modes")
        .unwrap_or_else(|| "immediate,wffc".into())
        .split(',')
        .map(String::from)
        .collect();
    let nodes: u8 = arg("--nodes").and_then(|n| n.parse().ok()).unwrap_or(5);
    // kube-controller-manager's client limit (default 20 QPS) paces the PV binder.
    let kcm_qps: Option<u32> = arg("--kcm-qps").and_then(|n| n.parse().ok());
    let failover = std::env::args().any(|a| a == "--failover");
    let guard = std::env::args().any(|a| a == "--guard");
    let delete = !std::env::args().any(|a| a == "--no-delete");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut rows = Vec::new();
    for mode in &modes {
        for &count in &counts {
            for kill in if failover {
                &[false, true][..]
            } else {
                &[false][..]
            } {
                let s = Scenario {
                    wffc: mode == "wffc",
                    count,
                    nodes,
                    kcm_qps,
                    replicas: if failover { 2 } else { 1 },
                    kill_leader: *kill,
                    guard,
                    delete: delete && !failover,
                };
                eprintln!(
                    "provision: {count} claims, {mode}, {nodes} nodes, {} controller(s){}{}",
                    s.replicas,
                    if s.kill_leader {
                        ", leader killed midway"
                    } else {
                        ""
                    },
                    if guard {
                        ", agents behind the write guard"
                    } else {
                        ""
                    },
                );
                rows.push(rt.block_on(run(&s)));
            }
        }
    }
    if failover {
        print_failover(&rows, nodes, guard);
        return;
    }
    println!(
        "\nprovisioning: N claims created at once, {nodes} nodes, time from create to Bound{}\n",
        if guard {
            ", agents behind the write guard"
        } else {
            ""
        }
    );
    println!(
        "| binding | claims | p50 s | p99 s | max s | controller CPU s | controller peak RSS MiB | RSS 20 s later MiB |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|--:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} |",
            r.mode, r.count, r.p50, r.p99, r.max, r.cpu, r.rss_mib, r.settled_mib
        );
    }
    if rows.iter().any(|r| r.delete.is_some()) {
        println!(
            "\nreclaim: the same N claims deleted at once (16 requests in flight), seconds after the first delete\n"
        );
        println!(
            "| binding | claims | deletes taken s | all Released s | all PVs gone s | all directories gone s | delete → PV gone p50 s | p99 s |"
        );
        println!("|---|--:|--:|--:|--:|--:|--:|--:|");
        for r in &rows {
            if let Some(d) = &r.delete {
                println!(
                    "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                    r.mode, r.count, d.deleted, d.released, d.pvs_gone, d.dirs_gone, d.p50, d.p99
                );
            }
        }
    }
    let svg = charts::svg_path("provision-burst.svg");
    let series: Vec<charts::Steps> = rows
        .iter()
        .map(|r| charts::Steps {
            name: format!("{}, {} claims (p50 {:.1} s)", r.mode, r.count, r.p50),
            points: r
                .bound_after
                .iter()
                .enumerate()
                .map(|(i, t)| (*t, (i + 1) as f64))
                .collect(),
        })
        .collect();
    let title =
        format!("Claims created 16 at a time on {nodes} nodes: how many are Bound, over time");
    match charts::step_lines(
        &svg,
        &title,
        "seconds since the first claim was created",
        "claims Bound",
        &series,
    ) {
        Ok(()) => eprintln!("provision: chart written to {}", svg.display()),
        Err(e) => eprintln!("provision: {e}"),
    }
}

fn print_failover(rows: &[Row], nodes: u8, guard: bool) {
    println!(
        "\nprovisioning with 2 controller replicas: N claims created at once (16 requests in flight), {nodes} nodes{}\n",
        if guard {
            ", agents behind the write guard"
        } else {
            ""
        }
    );
    println!(
        "| binding | claims | leader | killed at s | takeover s | all Bound s | p50 s | p99 s | PVs | dirs | one PV per claim, one dir per PV |"
    );
    println!("|---|--:|---|--:|--:|--:|--:|--:|--:|--:|---|");
    let secs = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |s| format!("{s:.1}"));
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {} | {} | {} |",
            r.mode,
            r.count,
            if r.killed_at.is_some() {
                "SIGKILL midway"
            } else {
                "kept"
            },
            secs(r.killed_at),
            secs(r.takeover),
            r.all_bound,
            r.p50,
            r.p99,
            r.pvs,
            r.dirs,
            if r.one_each { "yes" } else { "NO" },
        );
    }
}

/// One benchmark run.
struct Scenario {
    wffc: bool,
    count: usize,
    nodes: u8,
    kcm_qps: Option<u32>,
    /// Controller replicas (one leads).
    replicas: usize,
    /// SIGKILL the leader once half the claims are Bound.
    kill_leader: bool,
    /// Agents with pod-bound tokens behind the write guard (helper running).
    guard: bool,
    /// Delete every claim once all are Bound and time the reclaim.
    delete: bool,
}

async fn run(s: &Scenario) -> Row {
    let (wffc, count, nodes) = (s.wffc, s.count, s.nodes);
    let mut opts = localnfs_testbed::ClusterOptions::default();
    if let Some(q) = s.kcm_qps {
        opts.controller_manager_args = vec![
            format!("--kube-api-qps={q}"),
            format!("--kube-api-burst={}", q * 2),
        ];
    }
    let cluster = TestCluster::start_with(opts).await.expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    if s.guard {
        let kc = cluster.kubeconfig();
        credentials::apply_namespace_and_rbac(kc);
        let (webhook, extender) = (support::cluster::free_port(), support::cluster::free_port());
        credentials::register_agent_guard(&client, kc, webhook).await;
        lnfs.start_scheduler(&client, webhook, extender).await;
    }
    for i in 1..=nodes {
        let name = format!("node-{i}");
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 1, i));
        kubelet::add_node(&client, &name, ip).await.expect("node");
        if s.guard {
            lnfs.use_pod_credentials(&client, &name).await;
        }
        lnfs.start_agent_with(&name, ip, &["--capacity", "100Ti"]);
    }
    for _ in 0..s.replicas {
        lnfs.start_controller();
    }
    let mode = if wffc {
        "WaitForFirstConsumer"
    } else {
        "Immediate"
    };
    storage_class(&client, "bench", json!({"volumeBindingMode": mode})).await;
    // The agents' heartbeat Leases live in a namespace of their own (the leader's
    // Lease is waited for below).
    let leases: Api<Lease> = Api::namespaced(client.clone(), HEARTBEATS);
    support::eventually("node agents up", Duration::from_secs(60), || async {
        let n = leases.list(&Default::default()).await.ok()?.items.len();
        (n >= usize::from(nodes)).then_some(())
    })
    .await;
    let (leader, leader_pid) = wait_for_leader(&client).await;
    let ctl = lnfs.controller_with_pid(leader_pid);
    let cpu_before = cpu_seconds(leader_pid);

    let bound_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = {
        let bound_at = bound_at.clone();
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
        tokio::spawn(async move {
            let mut s = watcher(claims, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Some(Ok(c)) = s.next().await {
                if c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound") {
                    bound_at
                        .lock()
                        .expect("lock")
                        .entry(c.name_any())
                        .or_insert_with(Instant::now);
                }
            }
        })
    };
    let start = Instant::now();
    let creating = tokio::spawn(create_all(client.clone(), count, wffc, 16));
    let (mut killed_at, mut takeover, mut cpu, mut rss_mib) = (None, None, 0.0, 0.0);
    if s.kill_leader {
        while bound_at.lock().expect("lock").len() < count / 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // What it used up to here; it keeps nothing after the kill.
        cpu = cpu_seconds(leader_pid) - cpu_before;
        rss_mib = peak_rss_mib(leader_pid);
        lnfs.kill_controller(ctl).await;
        let t = Instant::now();
        killed_at = Some(start.elapsed().as_secs_f64());
        support::eventually("the standby leads", Duration::from_secs(120), || async {
            leader_holder(&client)
                .await
                .filter(|h| *h != leader)
                .map(drop)
        })
        .await;
        takeover = Some(t.elapsed().as_secs_f64());
    }
    let created_at = creating.await.expect("create claims");
    let deadline = Instant::now() + Duration::from_secs(900);
    while bound_at.lock().expect("lock").len() < count {
        assert!(
            Instant::now() < deadline,
            "not all bound after 15 min\n{}",
            lnfs.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_bound = start.elapsed().as_secs_f64();
    watch.abort();
    if !s.kill_leader {
        cpu = cpu_seconds(leader_pid) - cpu_before;
        rss_mib = peak_rss_mib(leader_pid);
    }
    // What the controller keeps while it holds `count` PVs once the burst is over; the
    // end state settles meanwhile (nothing more may appear).
    tokio::time::sleep(Duration::from_secs(20)).await;
    let settled_mib = lnfs
        .controllers
        .iter()
        .filter_map(|c| c.id())
        .map(rss_mib_now)
        .fold(0.0, f64::max);
    let (pvs, dirs, one_each) = end_state(&client, &lnfs, nodes).await;
    let delete = if s.delete {
        Some(delete_all(&client, &lnfs, count, wffc, nodes).await)
    } else {
        None
    };
    let bound = bound_at.lock().expect("lock").clone();
    let mut lat: Vec<f64> = created_at
        .iter()
        .map(|(name, t)| bound[name].saturating_duration_since(*t).as_secs_f64())
        .collect();
    lat.sort_by(f64::total_cmp);
    let first = created_at.values().min().copied().expect("claims created");
    let mut bound_after: Vec<f64> = created_at
        .keys()
        .map(|name| bound[name].saturating_duration_since(first).as_secs_f64())
        .collect();
    bound_after.sort_by(f64::total_cmp);
    Row {
        mode: if wffc {
            "WaitForFirstConsumer"
        } else {
            "Immediate"
        },
        count,
        killed_at,
        takeover,
        all_bound,
        pvs,
        dirs,
        one_each,
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        max: lat[lat.len() - 1],
        cpu,
        rss_mib,
        settled_mib,
        bound_after,
        delete,
    }
}

/// Deletes every claim (and under WaitForFirstConsumer first their pods, at once: no
/// kubelet runs to confirm a graceful stop) and times the reclaim (see [`DeleteRow`]).
async fn delete_all(
    client: &Client,
    lnfs: &Localnfs,
    count: usize,
    wffc: bool,
    nodes: u8,
) -> DeleteRow {
    use kube::api::DeleteParams;
    let names: Vec<String> = (0..count).map(|i| format!("claim-{i:05}")).collect();
    if wffc {
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        futures::stream::iter(names.iter().map(|name| {
            let pods = pods.clone();
            async move {
                let _ = pods
                    .delete(
                        &format!("pod-{name}"),
                        &DeleteParams::default().grace_period(0),
                    )
                    .await;
            }
        }))
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    }
    // PV name → claim name, and what the PV went through, watched from before the
    // first delete.
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv_of: HashMap<String, String> = pvs
        .list(&Default::default())
        .await
        .expect("PVs")
        .items
        .iter()
        .filter_map(|pv| {
            let claim = pv.spec.as_ref()?.claim_ref.as_ref()?.name.clone()?;
            Some((pv.name_any(), claim))
        })
        .collect();
    let released: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let gone: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = {
        let (released, gone) = (released.clone(), gone.clone());
        let pvs = pvs.clone();
        tokio::spawn(async move {
            let mut s = watcher(pvs, watcher::Config::default()).boxed();
            while let Some(Ok(ev)) = s.next().await {
                match ev {
                    watcher::Event::Apply(pv) | watcher::Event::InitApply(pv)
                        if pv.status.as_ref().and_then(|s| s.phase.as_deref())
                            == Some("Released") =>
                    {
                        released
                            .lock()
                            .expect("lock")
                            .entry(pv.name_any())
                            .or_insert_with(Instant::now);
                    }
                    watcher::Event::Delete(pv) => {
                        gone.lock()
                            .expect("lock")
                            .entry(pv.name_any())
                            .or_insert_with(Instant::now);
                    }
                    _ => {}
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    let deleted_at: HashMap<String, Instant> =
        futures::stream::iter(names.into_iter().map(|name| {
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
            async move {
                let t = Instant::now();
                claims
                    .delete(&name, &DeleteParams::default())
                    .await
                    .expect("delete claim");
                (name, t)
            }
        }))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect();
    let deleted = start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(900);
    while gone.lock().expect("lock").len() < pv_of.len() {
        assert!(
            Instant::now() < deadline,
            "PVs not all gone after 15 min\n{}",
            lnfs.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pvs_gone = start.elapsed().as_secs_f64();
    while (1..=nodes).any(|i| !volume_dirs(lnfs, &format!("node-{i}")).is_empty()) {
        assert!(
            Instant::now() < deadline,
            "volume directories left after 15 min\n{}",
            lnfs.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dirs_gone = start.elapsed().as_secs_f64();
    watch.abort();
    let secs_after_start = |t: &Instant| t.saturating_duration_since(start).as_secs_f64();
    let released = released
        .lock()
        .expect("lock")
        .values()
        .map(secs_after_start)
        .fold(0.0, f64::max);
    let gone = gone.lock().expect("lock").clone();
    let mut lat: Vec<f64> = pv_of
        .iter()
        .map(|(pv, claim)| {
            gone[pv]
                .saturating_duration_since(deleted_at[claim])
                .as_secs_f64()
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    DeleteRow {
        deleted,
        released,
        pvs_gone,
        dirs_gone,
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
    }
}
