//! The control plane at cluster scale (issue 26): N node agents (real `localnfs node`
//! processes, each with its own store in a temp dir, NFS on a free loopback port and
//! idle), two controller replicas and the scheduler helper on the real control plane
//! (etcd, kube-apiserver, kube-controller-manager), then C claims created at once
//! (Immediate binding, 16 requests in flight, `--in-flight N` for another number) with the leader SIGKILLed when half are
//! Bound, then every claim deleted (one DELETE each, 32 in flight).
//!
//! Run: `cargo bench --bench scale -- --nodes 1,100 --claims 500,10000` (one row per
//! pair; defaults 100 and 10,000). `--no-failover` keeps the leader. `--kcm-qps N`
//! gives kube-controller-manager a client limit of N requests a second (burst 2N)
//! instead of its default 20 (a cluster operator's setting, not ours: the PV binder
//! marks deleted claims' PVs Released at that pace). Prints one table:
//! time to all Bound, p50/p99 claim → Bound, the failover's takeover time, API
//! requests per claim (every client's, from the API server's `apiserver_request_total`
//! over the burst, top verb/resource pairs), etcd bytes written per second (its
//! `etcd_disk_wal_write_bytes_total`) at rest before the claims, during the burst and
//! at rest with every volume made, controller, helper and agent memory, and the delete
//! row: all claims deleted → all PVs gone → all volume directories gone. Then where
//! the burst's time went: CPU cores in use by process group (and by the rest of the
//! machine) over the burst and at rest, the leader's claim queue (its
//! `localnfs_queue_depth`), claim → PV and PV → Bound, and a timeline every 5 s.
//!
//! `--floor self|binder` runs the same claims with no localnfs at all, the bench
//! posting each claim's PV itself (and binding the pair, or leaving that to
//! kube-controller-manager): what any provisioner's claims cost this control plane
//! (see `scale/floor.rs`).

#[path = "burst/mod.rs"]
mod burst;
#[path = "scale/floor.rs"]
mod floor;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use localnfs_testbed::{TestCluster, kubelet};
use serde_json::json;
use support::cluster::{
    HEARTBEATS, Localnfs, free_port, leader_holder, storage_class, volume_dirs, wait_for_leader,
};

use burst::{create_all, peak_rss_mib, percentile, rss_mib_now};

/// How long each at-rest measurement lasts: two rounds of heartbeats (every 30 s,
/// `heartbeat::RENEW_EVERY`), so a window does not catch one round or two by chance.
const AT_REST: Duration = Duration::from_secs(60);

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn list(name: &str, default: usize) -> Vec<usize> {
    arg(name).map_or_else(
        || vec![default],
        |v| v.split(',').filter_map(|n| n.parse().ok()).collect(),
    )
}

struct Row {
    nodes: usize,
    claims: usize,
    all_bound: f64,
    p50: f64,
    p99: f64,
    takeover: Option<f64>,
    /// API requests per claim over the burst: all, and the top (verb resource, count).
    per_claim: f64,
    top: Vec<(String, f64)>,
    etcd_idle: f64,
    etcd_burst: f64,
    etcd_rest: f64,
    controller_mib: f64,
    helper_mib: f64,
    agent_mean_mib: f64,
    agent_max_mib: f64,
    one_each: bool,
    pvs_gone: f64,
    dirs_gone: f64,
    /// The delete: see [`Deleted`].
    deleted: Deleted,
    /// Where the burst's time went: see [`Where`].
    r#where: Where,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let nodes = list("--nodes", 100);
    let claims = list("--claims", 10_000);
    let failover = !std::env::args().any(|a| a == "--no-failover");
    let kcm_qps: Option<u32> = arg("--kcm-qps").and_then(|q| q.parse().ok());
    let in_flight: usize = arg("--in-flight")
        .and_then(|q| q.parse().ok())
        .unwrap_or(16);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    if let Some(mode) = arg("--floor") {
        let binds = match mode.as_str() {
            "self" => true,
            "binder" => false,
            other => panic!("--floor: `{other}` is neither `self` nor `binder`"),
        };
        let rows: Vec<floor::Floor> = (claims.iter())
            .map(|&c| {
                eprintln!("scale --floor: {c} claims, kcm qps {kcm_qps:?}");
                rt.block_on(floor::run(c, kcm_qps, in_flight, binds))
            })
            .collect();
        floor::print(&rows, kcm_qps, in_flight, binds);
        return;
    }
    let mut rows = Vec::new();
    for (&n, &c) in nodes.iter().zip(&claims) {
        eprintln!("scale: {n} nodes, {c} claims, failover {failover}, kcm qps {kcm_qps:?}");
        rows.push(rt.block_on(run(n, c, failover, kcm_qps, in_flight)));
    }
    if let Some(q) = kcm_qps {
        println!(
            "\nkube-controller-manager: --kube-api-qps={q} --kube-api-burst={}",
            2 * q
        );
    }
    print(&rows, failover, in_flight);
}

fn print(rows: &[Row], failover: bool, in_flight: usize) {
    println!(
        "\nscale: N node agents, C claims created at once (Immediate, {in_flight} in flight){}, then all deleted\n",
        if failover {
            ", leader SIGKILLed at C/2 Bound"
        } else {
            ""
        }
    );
    println!(
        "| nodes | claims | all Bound s | p50 s | p99 s | takeover s | API req/claim | etcd KB/s idle / burst / rest | controller MiB | helper MiB | agent MiB mean / max | one PV + dir each | delete → PVs gone s | → dirs gone s |"
    );
    println!("|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|---|---|--:|--:|");
    for r in rows {
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.2} | {} | {:.1} | {:.1} / {:.1} / {:.1} | {:.0} | {:.0} | {:.0} / {:.0} | {} | {:.1} | {:.1} |",
            r.nodes,
            r.claims,
            r.all_bound,
            r.p50,
            r.p99,
            r.takeover
                .map_or_else(|| "-".to_owned(), |t| format!("{t:.1}")),
            r.per_claim,
            r.etcd_idle / 1e3,
            r.etcd_burst / 1e3,
            r.etcd_rest / 1e3,
            r.controller_mib,
            r.helper_mib,
            r.agent_mean_mib,
            r.agent_max_mib,
            if r.one_each { "yes" } else { "NO" },
            r.pvs_gone,
            r.dirs_gone,
        );
    }
    for r in rows {
        println!(
            "\nAPI requests per claim during the burst, {} nodes / {} claims (all clients):",
            r.nodes, r.claims
        );
        for (what, n) in &r.top {
            println!("  {what:<40} {n:>6.2}");
        }
        let w = &r.r#where;
        println!(
            "\nWhere the burst went, {} nodes / {} claims ({:.1} s to all Bound):",
            r.nodes, r.claims, r.all_bound
        );
        println!(
            "  last create sent at {:.1} s; claim → PV p50 {:.2} s p99 {:.2} s; PV → Bound p50 {:.2} s p99 {:.2} s",
            w.all_created, w.to_pv.0, w.to_pv.1, w.pv_to_bound.0, w.pv_to_bound.1
        );
        println!(
            "  claims waiting in the leader's queue: mean {:.0}, max {:.0}",
            w.queue_mean, w.queue_max
        );
        println!(
            "  CPU cores in use over the burst: machine {:.2} (of {})",
            w.machine_cores,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        for (g, c) in &w.cores {
            println!("    {g:<38} {c:>5.2}");
        }
        let ours: f64 = w.cores.iter().map(|(_, c)| c).sum();
        println!(
            "    {:<38} {:>5.2}",
            "others on the machine",
            (w.machine_cores - ours).max(0.0)
        );
        println!("  CPU cores in use at rest, every volume made:");
        for (g, c) in &w.rest_cores {
            println!("    {g:<38} {c:>5.2}");
        }
        println!("  timeline (s, claims seen, PVs, Bound, queue):");
        for (t, c, p, b, q) in &w.timeline {
            println!("    {t:>6.0} {c:>6} {p:>6} {b:>6} {q:>6.0}");
        }
        let d = &r.deleted;
        println!(
            "\nThe delete, {} nodes / {} claims ({:.1} s until every PV was gone; LISTs of claims and PVs left out: the bench's own counting):",
            r.nodes, r.claims, d.pvs_gone
        );
        let all: f64 = d.per_claim.iter().map(|(_, n)| n).sum();
        println!("  API requests per claim (all clients): {all:.2}");
        for (what, n) in d.per_claim.iter().take(12) {
            println!("    {what:<40} {n:>6.2}");
        }
        println!("  timeline (s, claims left, PVs left, of them Released):");
        for (t, c, p, rel) in &d.timeline {
            println!("    {t:>6.0} {c:>6} {p:>6} {rel:>6}");
        }
    }
}

/// The Prometheus text the API server serves on `/metrics`.
async fn apiserver_metrics(client: &Client) -> support::Metrics {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("request");
    support::Metrics(client.request_text(req).await.expect("apiserver /metrics"))
}

/// `apiserver_request_total` summed per `verb resource` (watches left out: a watch is
/// one long request, counted when it ends).
fn requests(m: &support::Metrics) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (labels, v) in m.samples("apiserver_request_total", &[]) {
        let get = |k: &str| {
            labels
                .iter()
                .find(|(lk, _)| lk == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let verb = get("verb");
        if verb == "WATCH" {
            continue;
        }
        let sub = get("subresource");
        let resource = if sub.is_empty() {
            get("resource")
        } else {
            format!("{}/{sub}", get("resource"))
        };
        // Failed answers apart (a 409 is a write that lost a race and is retried).
        let code = get("code");
        let key = if code.starts_with('2') {
            format!("{verb} {resource}")
        } else {
            format!("{verb} {resource} ({code})")
        };
        *out.entry(key).or_default() += v;
    }
    out
}

/// Requests per claim between two [`requests`] readings, at least 0.01 each, most first.
fn per_claim(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    count: usize,
) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = (after.iter())
        .map(|(k, v)| {
            (
                k.clone(),
                (v - before.get(k).unwrap_or(&0.0)) / count as f64,
            )
        })
        .filter(|(_, v)| *v >= 0.01)
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

/// The test control plane, kube-controller-manager at `kcm_qps` requests a second
/// (burst twice that) if given.
async fn control_plane(kcm_qps: Option<u32>) -> TestCluster {
    let mut opts = localnfs_testbed::ClusterOptions::default();
    if let Some(q) = kcm_qps {
        opts.controller_manager_args = vec![
            format!("--kube-api-qps={q}"),
            format!("--kube-api-burst={}", 2 * q),
        ];
    }
    TestCluster::start_with(opts).await.expect("control plane")
}

/// When each claim in `default` was first seen Bound, filled by a watch until the
/// returned task is aborted.
type BoundAt = Arc<Mutex<HashMap<String, Instant>>>;
fn watch_bound(client: &Client) -> (BoundAt, tokio::task::JoinHandle<()>) {
    let bound_at: BoundAt = Arc::default();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let filling = bound_at.clone();
    let task = tokio::spawn(async move {
        let mut s = watcher(claims, watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Some(Ok(c)) = s.next().await {
            if c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound") {
                (filling.lock().expect("lock"))
                    .entry(c.name_any())
                    .or_insert_with(Instant::now);
            }
        }
    });
    (bound_at, task)
}

/// etcd's client URL, read from its command line.
fn etcd_url(cluster: &TestCluster) -> String {
    let etcd = cluster
        .processes()
        .iter()
        .find(|p| p.name() == "etcd")
        .expect("etcd process");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", etcd.pid())).expect("etcd cmdline");
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    args.iter()
        .position(|a| a == "--listen-client-urls")
        .and_then(|i| args.get(i + 1).cloned())
        .expect("--listen-client-urls")
}

/// Bytes etcd has written to its write-ahead log.
async fn etcd_wal_bytes(url: &str) -> f64 {
    let addr: std::net::SocketAddr = url
        .trim_start_matches("http://")
        .parse()
        .expect("etcd address");
    let (status, body) = support::http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "etcd /metrics");
    support::Metrics(body).get("etcd_disk_wal_write_bytes_total", &[])
}

/// etcd bytes written per second over `d`.
/// etcd's WAL bytes per second over `d`; the window's unix times go to stderr, for
/// `bench/etcd-writes.py sum` (what was written, by key).
async fn etcd_rate(url: &str, d: Duration) -> f64 {
    let unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |t| t.as_secs_f64())
    };
    let before = etcd_wal_bytes(url).await;
    let from = unix();
    tokio::time::sleep(d).await;
    let rate = (etcd_wal_bytes(url).await - before) / d.as_secs_f64();
    eprintln!("scale: etcd window {from:.1} {:.1}: {rate:.0} B/s", unix());
    rate
}

async fn run(
    nodes: usize,
    count: usize,
    failover: bool,
    kcm_qps: Option<u32>,
    in_flight: usize,
) -> Row {
    let cluster = control_plane(kcm_qps).await;
    let client = cluster.client();
    let etcd = etcd_url(&cluster);
    let mut lnfs = Localnfs::new(&cluster).await;
    lnfs.start_scheduler(&client, free_port(), free_port())
        .await;
    for i in 1..=nodes {
        let name = format!("node-{i}");
        let ip = IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8));
        kubelet::add_node(&client, &name, ip).await.expect("node");
        lnfs.start_agent_with(&name, ip, &["--capacity", "100Ti"]);
    }
    for _ in 0..if failover { 2 } else { 1 } {
        lnfs.start_controller();
    }
    storage_class(&client, "bench", json!({"volumeBindingMode": "Immediate"})).await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), HEARTBEATS);
    support::eventually("node agents up", Duration::from_secs(300), || async {
        let hb = ListParams::default().labels("!localnfs.io/usage-shard");
        // Heartbeats only (the key Leases are written just before them).
        let n = (leases.list_metadata(&hb).await.ok()?.items.iter())
            .filter(|l| l.name_any().starts_with("localnfs-node-"))
            .count();
        (n >= nodes).then_some(())
    })
    .await;
    let (leader, leader_pid) = wait_for_leader(&client).await;
    let ctl = lnfs.controller_with_pid(leader_pid);
    // Settle (agents' first usage reports), then the cluster at rest with no volumes.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let etcd_idle = etcd_rate(&etcd, AT_REST).await;

    let (bound_at, watch) = watch_bound(&client);
    let requests_before = requests(&apiserver_metrics(&client).await);
    let wal_before = etcd_wal_bytes(&etcd).await;
    let mut groups: Vec<(u32, String)> = (cluster.processes().iter())
        .map(|p| (p.pid(), p.name().to_owned()))
        .collect();
    let localnfs = [
        (
            "localnfs controllers",
            lnfs.controllers.iter().collect::<Vec<_>>(),
        ),
        ("localnfs agents", lnfs.agents.values().collect()),
        ("localnfs scheduler helper", lnfs.scheduler.iter().collect()),
    ];
    for (g, children) in localnfs {
        groups.extend(
            children
                .iter()
                .filter_map(|c| Some((c.id()?, g.to_owned()))),
        );
    }
    groups.push((std::process::id(), "bench (creates, watches)".to_owned()));
    let admins: Vec<(u32, std::net::SocketAddr)> = (lnfs.controllers.iter().enumerate())
        .filter_map(|(i, c)| Some((c.id()?, *lnfs.admin.get(&format!("controller/{i}"))?)))
        .collect();
    let start = Instant::now();
    let sampler = Sampler::start(&client, groups.clone(), admins, bound_at.clone(), start);
    let creating = tokio::spawn(create_all(client.clone(), count, false, in_flight));
    let mut takeover = None;
    let mut controller_mib = 0.0;
    if failover {
        while bound_at.lock().expect("lock").len() < count / 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        controller_mib = peak_rss_mib(leader_pid);
        lnfs.kill_controller(ctl).await;
        let t = Instant::now();
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
    let deadline = Instant::now() + Duration::from_secs(3600);
    while bound_at.lock().expect("lock").len() < count {
        assert!(
            Instant::now() < deadline,
            "not all bound after an hour\n{}",
            lnfs.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all_bound = start.elapsed().as_secs_f64();
    let mut r#where = sampler.finish(
        all_bound,
        &created_at,
        &bound_at.lock().expect("lock"),
        start,
    );
    let etcd_burst = (etcd_wal_bytes(&etcd).await - wal_before) / all_bound;
    let requests_after = requests(&apiserver_metrics(&client).await);
    watch.abort();
    let mut top = per_claim(&requests_before, &requests_after, count);
    let per_claim: f64 = top.iter().map(|(_, v)| v).sum();
    // Said now too, so a run that fails later (the delete) still leaves its burst.
    eprintln!(
        "scale: all Bound {all_bound:.1} s, takeover {takeover:?}, {per_claim:.2} requests a claim: {top:?}"
    );
    top.truncate(12);
    let pids = |children: &[tokio::process::Child]| -> Vec<u32> {
        children
            .iter()
            .filter_map(tokio::process::Child::id)
            .collect()
    };
    for pid in pids(&lnfs.controllers) {
        controller_mib = f64::max(controller_mib, peak_rss_mib(pid));
    }
    let helper_mib = lnfs
        .scheduler
        .as_ref()
        .and_then(|s| s.id())
        .map_or(0.0, peak_rss_mib);
    let agents: Vec<f64> = lnfs
        .agents
        .values()
        .filter_map(|c| c.id())
        .map(rss_mib_now)
        .collect();
    let agent_mean_mib = agents.iter().sum::<f64>() / agents.len().max(1) as f64;
    let agent_max_mib = agents.iter().copied().fold(0.0, f64::max);

    // At rest with every volume made (after the last agents' usage reports).
    tokio::time::sleep(Duration::from_secs(15)).await;
    let cpu_before = cpu_by_group(&groups);
    let etcd_rest = etcd_rate(&etcd, AT_REST).await;
    let cpu_after = cpu_by_group(&groups);
    r#where.rest_cores = (cpu_after.iter())
        .map(|(g, c)| {
            let was = cpu_before.get(g).copied().unwrap_or(0.0);
            (g.clone(), (c - was) / AT_REST.as_secs_f64())
        })
        .collect();
    r#where.rest_cores.sort_by(|a, b| b.1.total_cmp(&a.1));
    let (one_each, deleted) = check_and_delete(&client, &lnfs, nodes, count).await;
    let (pvs_gone, dirs_gone) = (deleted.pvs_gone, deleted.dirs_gone);

    let mut lat: Vec<f64> = {
        let bound = bound_at.lock().expect("lock");
        created_at
            .iter()
            .map(|(name, t)| bound[name].saturating_duration_since(*t).as_secs_f64())
            .collect()
    };
    lat.sort_by(f64::total_cmp);
    Row {
        nodes,
        claims: count,
        all_bound,
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        takeover,
        per_claim,
        top,
        etcd_idle,
        etcd_burst,
        etcd_rest,
        controller_mib,
        helper_mib,
        agent_mean_mib,
        agent_max_mib,
        one_each,
        pvs_gone,
        dirs_gone,
        deleted,
        r#where,
    }
}

/// What deleting every claim took.
#[derive(Default)]
struct Deleted {
    pvs_gone: f64,
    dirs_gone: f64,
    /// API requests per claim from the first DELETE until every PV and directory was
    /// gone (verb resource, count), most first.
    per_claim: Vec<(String, f64)>,
    /// Every 5 s: seconds, claims left, PVs left, PVs Released (of those left).
    timeline: Vec<(f64, usize, usize, usize)>,
}

/// Objects `api` lists, from one request (`limit=1` and the remaining count).
async fn count_of<K>(api: &Api<K>) -> usize
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let page = api
        .list_metadata(&ListParams::default().limit(1))
        .await
        .expect("count");
    page.items.len() + page.metadata.remaining_item_count.unwrap_or(0).max(0) as usize
}

/// Checks one PV and one directory per claim, then deletes every claim (one
/// deletecollection, as `kubectl delete pvc --all` would in effect) and times until
/// the last PV and the last directory are gone.
async fn check_and_delete(
    client: &Client,
    lnfs: &Localnfs,
    nodes: usize,
    count: usize,
) -> (bool, Deleted) {
    let pvs_api: Api<PersistentVolume> = Api::all(client.clone());
    let paged = ListParams::default().limit(500);
    let pvs = localnfs::kubeclient::list_all(&pvs_api, &paged)
        .await
        .expect("PVs");
    let node_names: Vec<String> = (1..=nodes).map(|i| format!("node-{i}")).collect();
    let dirs = || -> usize { node_names.iter().map(|n| volume_dirs(lnfs, n).len()).sum() };
    let claims = uids(client).await;
    let pv_claims: HashSet<String> = pvs
        .iter()
        .filter_map(|pv| pv.spec.as_ref()?.claim_ref.as_ref()?.uid.clone())
        .collect();
    let one_each =
        pvs.len() == count && claims.len() == count && pv_claims == claims && dirs() == count;

    let claims_api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let requests_before = requests(&apiserver_metrics(client).await);
    let start = Instant::now();
    // Every 5 s until the PVs are gone: claims left, PVs left, of them Released.
    let timeline = {
        let (claims_api, pvs_api) = (claims_api.clone(), pvs_api.clone());
        tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let pvs =
                    localnfs::kubeclient::list_all(&pvs_api, &ListParams::default().limit(500))
                        .await
                        .expect("PVs");
                let released = (pvs.iter())
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released")
                    })
                    .count();
                let t = start.elapsed().as_secs_f64();
                out.push((t, count_of(&claims_api).await, pvs.len(), released));
                eprintln!("scale: delete timeline {:?}", out.last());
                if pvs.is_empty() {
                    return out;
                }
            }
        })
    };
    // One DELETE per claim, 32 in flight, as `kubectl delete pvc --all` does (one
    // deletecollection of 10,000 claims outlasted the API server's 60 s request
    // deadline and answered 500 while it went on deleting).
    let names: Vec<String> = claims_api
        .list_metadata(&ListParams::default())
        .await
        .expect("claims")
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    delete_claims(&claims_api, names).await;
    let (mut pvs_gone, mut dirs_gone) = (None, None);
    let deadline = start + Duration::from_secs(3600);
    while pvs_gone.is_none() || dirs_gone.is_none() {
        assert!(Instant::now() < deadline, "not all gone after an hour");
        tokio::time::sleep(Duration::from_millis(500)).await;
        if pvs_gone.is_none() {
            let left = pvs_api
                .list_metadata(&ListParams::default().limit(1))
                .await
                .expect("PVs")
                .items
                .len();
            if left == 0 {
                pvs_gone = Some(start.elapsed().as_secs_f64());
            }
        }
        if dirs_gone.is_none() && dirs() == 0 {
            dirs_gone = Some(start.elapsed().as_secs_f64());
        }
    }
    let requests_after = requests(&apiserver_metrics(client).await);
    let mut per_claim = per_claim(&requests_before, &requests_after, count);
    // The timeline's own LISTs are the bench's, not the delete's.
    per_claim.retain(|(k, _)| !k.starts_with("LIST persistentvolume"));
    let timeline = timeline.await.expect("delete timeline");
    (
        one_each,
        Deleted {
            pvs_gone: pvs_gone.unwrap_or_default(),
            dirs_gone: dirs_gone.unwrap_or_default(),
            per_claim,
            timeline,
        },
    )
}

/// The uids of the claims in `default`.
async fn uids(client: &Client) -> HashSet<String> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    localnfs::kubeclient::list_all(&api, &ListParams::default())
        .await
        .expect("claims")
        .iter()
        .filter_map(|c| c.uid())
        .collect()
}

/// Where a burst's time went (issue 26: what bounds the rate of Bound claims): CPU by
/// process over the burst, the leader's claim queue, and each claim's way from created
/// to PV made to Bound.
#[derive(Default)]
struct Where {
    /// CPU seconds per second of the burst (cores in use), by process group, most first.
    cores: Vec<(String, f64)>,
    /// The whole machine's busy cores over the burst (other users' work included).
    machine_cores: f64,
    /// Claims waiting in the leaders' claim queues, mean and max over the samples.
    queue_mean: f64,
    queue_max: f64,
    /// When the bench's last create returned, seconds after the first.
    all_created: f64,
    /// Claim seen by the watch → its PV seen, and PV seen → claim Bound: p50, p99.
    to_pv: (f64, f64),
    pv_to_bound: (f64, f64),
    /// Every 5 s of the burst: (s, claims seen, PVs seen, Bound, queue depth).
    timeline: Timeline,
    /// Cores in use by process group at rest, every volume made (the second etcd
    /// window), most first.
    rest_cores: Vec<(String, f64)>,
}

/// CPU seconds used so far by each process group (processes gone count nothing).
fn cpu_by_group(groups: &[(u32, String)]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (pid, g) in groups {
        *out.entry(g.clone()).or_default() += burst::cpu_seconds(*pid);
    }
    out
}

/// DELETEs the claims `names`, 32 in flight (a claim already gone counts as deleted).
async fn delete_claims(claims: &Api<PersistentVolumeClaim>, names: Vec<String>) {
    futures::stream::iter(names)
        .map(|name| async move {
            match claims.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => panic!("delete claim {name}: {e}"),
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
}

/// Cores the whole machine had busy since `from` (a [`machine_jiffies`] reading).
fn cores_busy_since(from: (f64, f64)) -> f64 {
    let (busy, all) = machine_jiffies();
    let ncpu = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
    (busy - from.0) / (all - from.1).max(1.0) * ncpu
}

/// Busy and all jiffies of the whole machine (`/proc/stat`'s first line).
fn machine_jiffies() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let all: f64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    (all - idle, all)
}

/// pid → (process group, CPU seconds at the start, last CPU seconds seen).
type CpuByPid = HashMap<u32, (String, f64, f64)>;
/// Every 5 s: (s, claims seen, PVs seen, Bound, queue depth).
type Timeline = Vec<(f64, usize, usize, usize, f64)>;

/// Follows the burst: CPU time of every process group, the controllers' claim queue
/// depth (from their `/metrics`), and when each claim and PV first appeared.
struct Sampler {
    /// pid → (group, CPU seconds at the start, last CPU seconds seen).
    cpu: Arc<Mutex<CpuByPid>>,
    machine_start: (f64, f64),
    seen_claim: Arc<Mutex<HashMap<String, Instant>>>,
    seen_pv: Arc<Mutex<HashMap<String, Instant>>>,
    timeline: Arc<Mutex<Timeline>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Sampler {
    fn start(
        client: &Client,
        groups: Vec<(u32, String)>,
        admins: Vec<(u32, std::net::SocketAddr)>,
        bound_at: Arc<Mutex<HashMap<String, Instant>>>,
        start: Instant,
    ) -> Sampler {
        let cpu: CpuByPid = groups
            .into_iter()
            .map(|(pid, g)| {
                let c = burst::cpu_seconds(pid);
                (pid, (g, c, c))
            })
            .collect();
        let s = Sampler {
            cpu: Arc::new(Mutex::new(cpu)),
            machine_start: machine_jiffies(),
            seen_claim: Arc::default(),
            seen_pv: Arc::default(),
            timeline: Arc::default(),
            tasks: Vec::new(),
        };
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
        let seen = s.seen_claim.clone();
        let watch_claims = tokio::spawn(async move {
            let mut w = watcher(claims, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Some(Ok(c)) = w.next().await {
                let mut seen = seen.lock().expect("lock");
                seen.entry(c.name_any()).or_insert_with(Instant::now);
            }
        });
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        let seen = s.seen_pv.clone();
        let watch_pvs = tokio::spawn(async move {
            let mut w = watcher(pvs, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Some(Ok(pv)) = w.next().await {
                let claim = pv.spec.and_then(|s| s.claim_ref).and_then(|r| r.name);
                if let Some(claim) = claim {
                    seen.lock()
                        .expect("lock")
                        .entry(claim)
                        .or_insert_with(Instant::now);
                }
            }
        });
        let (cpu, timeline) = (s.cpu.clone(), s.timeline.clone());
        let (seen_claim, seen_pv) = (s.seen_claim.clone(), s.seen_pv.clone());
        let sample = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                for (pid, (_, _, last)) in cpu.lock().expect("lock").iter_mut() {
                    // A killed process reads 0: keep what it had used.
                    *last = f64::max(*last, burst::cpu_seconds(*pid));
                }
                let mut depth = 0.0;
                for (pid, addr) in &admins {
                    // A killed controller's share is 0 (and its listener refuses).
                    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                        continue;
                    }
                    let got = tokio::time::timeout(
                        Duration::from_secs(2),
                        tokio::spawn(support::http_get(*addr, "/metrics")),
                    )
                    .await;
                    if let Ok(Ok((200, body))) = got {
                        depth += support::Metrics(body)
                            .get("localnfs_queue_depth", &[("queue", "claims")]);
                    }
                }
                let n = |m: &Arc<Mutex<HashMap<String, Instant>>>| m.lock().expect("lock").len();
                let row = (
                    start.elapsed().as_secs_f64(),
                    n(&seen_claim),
                    n(&seen_pv),
                    n(&bound_at),
                    depth,
                );
                eprintln!("scale: timeline {row:?}");
                timeline.lock().expect("lock").push(row);
            }
        });
        Sampler {
            tasks: vec![watch_claims, watch_pvs, sample],
            ..s
        }
    }

    /// Stops following and says where the burst's `wall` seconds went.
    fn finish(
        self,
        wall: f64,
        created_at: &HashMap<String, Instant>,
        bound_at: &HashMap<String, Instant>,
        start: Instant,
    ) -> Where {
        for t in &self.tasks {
            t.abort();
        }
        let mut by_group: BTreeMap<String, f64> = BTreeMap::new();
        for (pid, (g, first, last)) in self.cpu.lock().expect("lock").iter() {
            let now = f64::max(*last, burst::cpu_seconds(*pid));
            *by_group.entry(g.clone()).or_default() += (now - first) / wall;
        }
        let mut cores: Vec<(String, f64)> = by_group.into_iter().collect();
        cores.sort_by(|a, b| b.1.total_cmp(&a.1));
        let machine_cores = cores_busy_since(self.machine_start);
        let timeline = std::mem::take(&mut *self.timeline.lock().expect("lock"));
        let depths: Vec<f64> = timeline.iter().map(|r| r.4).collect();
        let (seen_claim, seen_pv) = (
            self.seen_claim.lock().expect("lock"),
            self.seen_pv.lock().expect("lock"),
        );
        let p50_p99 = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            if v.is_empty() {
                (0.0, 0.0)
            } else {
                (percentile(&v, 0.5), percentile(&v, 0.99))
            }
        };
        let to_pv = p50_p99(
            (seen_pv.iter())
                .filter_map(|(c, t)| Some(t.saturating_duration_since(*seen_claim.get(c)?)))
                .map(|d| d.as_secs_f64())
                .collect(),
        );
        let pv_to_bound = p50_p99(
            (bound_at.iter())
                .filter_map(|(c, t)| Some(t.saturating_duration_since(*seen_pv.get(c)?)))
                .map(|d| d.as_secs_f64())
                .collect(),
        );
        Where {
            cores,
            machine_cores,
            queue_mean: depths.iter().sum::<f64>() / depths.len().max(1) as f64,
            queue_max: depths.iter().copied().fold(0.0, f64::max),
            all_created: created_at
                .values()
                .map(|t| t.saturating_duration_since(start).as_secs_f64())
                .fold(0.0, f64::max),
            to_pv,
            pv_to_bound,
            timeline,
            rest_cores: Vec::new(),
        }
    }
}
