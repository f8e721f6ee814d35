//! Scheduler helper latency at cluster scale: 1,000 node agents and 10,000 localnfs
//! PVs (and their claims) known, then extender filter and prioritize calls (1,000
//! node names each, as a node-cache-capable kube-scheduler sends them) over HTTP, and
//! webhook calls over HTTPS, one connection each, kept alive, as the callers do.
//! Webhook rows: a pod naming no claim (most pods; answered from its own body, no
//! lookup), a pod whose claim is of another class (answered from the caches), and a
//! pod with localnfs claims (patched). Prints p50/p99/max per call and the
//! inventory's memory.
//!
//! Run: `cargo bench --bench scheduler` (`-- --calls N` to change the 2,000 calls).

use std::sync::Arc;
use std::time::{Duration, Instant};

use localnfs::objects::agents::AgentInfo;
use localnfs::objects::class::Locality;
use localnfs::scheduler::inventory::{ClaimInfo, ClassInfo, VolumeInfo, claim_key};
use localnfs::scheduler::routes::{Helper, HelperMetrics};
use localnfs::scheduler::tls::{self, Resolver};
use localnfs::scheduler::watch::Shared;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

const NODES: usize = 1_000;
const VOLUMES: usize = 10_000;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn node(i: usize) -> String {
    format!("node-{i:04}")
}

/// 1,000 agents, classes `local` (preferred, WFFC) and `pinned` (strict), 10,000 bound
/// claims over 100 namespaces, each on a PV of its own, plus one unbound claim.
fn fill(inv: &Shared) {
    let mut inv = inv.write().expect("inventory");
    for i in 0..NODES {
        inv.agents.insert(
            node(i),
            AgentInfo {
                free_bytes: (i as u64 + 1) << 30,
                nfs_port: 2049,
                peer_port: None,
                expires: i64::MAX,
                key: None,
            },
        );
    }
    for (name, locality) in [("local", Locality::Preferred), ("pinned", Locality::Strict)] {
        inv.classes.insert(
            name.into(),
            ClassInfo {
                locality,
                wait_for_consumer: true,
            },
        );
    }
    for v in 0..VOLUMES {
        let pv = format!("pvc-{v:08x}-0000-4000-8000-000000000000");
        let strict = v % 7 == 0;
        inv.volumes.insert(
            pv.clone(),
            VolumeInfo {
                node: node(v % NODES),
                locality: if strict {
                    Locality::Strict
                } else {
                    Locality::Preferred
                },
            },
        );
        inv.claims.insert(
            claim_key(&format!("ns-{}", v % 100), &format!("data-db-{v}")),
            ClaimInfo {
                class: Some(if strict { "pinned" } else { "local" }.into()),
                volume: Some(pv),
                request_bytes: 10 << 30,
                clone_of: None,
            },
        );
    }
    inv.claims.insert(
        claim_key("ns-1", "new"),
        ClaimInfo {
            class: Some("local".into()),
            volume: None,
            request_bytes: 50 << 30,
            clone_of: None,
        },
    );
    // A bound claim of a class that is not ours (its PV is not in the inventory).
    inv.claims.insert(
        claim_key("ns-1", "logs"),
        ClaimInfo {
            class: Some("standard".into()),
            volume: Some("pv-standard".into()),
            request_bytes: 1 << 30,
            clone_of: None,
        },
    );
}

/// A pod naming no claim (what most pods the webhook sees are): containers with
/// requests, an emptyDir and a configMap.
fn pod_without_claims() -> serde_json::Value {
    json!({
        "metadata": {"name": "web-1", "namespace": "ns-1", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "web", "image": "nginx:1",
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}],
                 "volumes": [
                    {"name": "cache", "emptyDir": {}},
                    {"name": "cfg", "configMap": {"name": "web"}}]},
    })
}

/// A pod whose only claim is of another class.
fn pod_with_other_claim() -> serde_json::Value {
    json!({
        "metadata": {"name": "app-1", "namespace": "ns-1", "labels": {"app": "app"}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}],
                 "volumes": [{"name": "logs", "persistentVolumeClaim": {"claimName": "logs"}}]},
    })
}

/// The API server's AdmissionReview of a CREATE of `pod`.
fn review_of(pod: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": "bench", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "ns-1", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:statefulset-controller"},
            "object": pod,
        }
    }))
    .expect("json")
}

/// A pod in ns-1 with a preferred and a strict bound claim on different nodes and one
/// new claim.
fn pod() -> serde_json::Value {
    json!({
        "metadata": {"name": "db-1", "namespace": "ns-1", "labels": {"app": "db"}},
        "spec": {"containers": [{"name": "db", "image": "mysql:8",
                 "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}],
                 "volumes": [
                    {"name": "a", "persistentVolumeClaim": {"claimName": "data-db-1"}},
                    {"name": "b", "persistentVolumeClaim": {"claimName": "data-db-301"}},
                    {"name": "c", "persistentVolumeClaim": {"claimName": "new"}}]},
    })
}

/// One HTTP/1.1 call on a kept-alive connection; returns the status and body.
async fn call<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut BufReader<S>,
    path: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let stream = conn.get_mut();
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request).await.expect("write");
    stream.flush().await.expect("flush");
    let mut status = 0;
    let mut length = 0;
    let mut line = String::new();
    loop {
        line.clear();
        conn.read_line(&mut line).await.expect("read");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some(code) = l.strip_prefix("HTTP/1.1 ") {
            status = code[..3].parse().expect("status");
        } else if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().expect("length");
        }
    }
    let mut out = vec![0; length];
    conn.read_exact(&mut out).await.expect("body");
    (status, out)
}

struct Row {
    call: &'static str,
    bytes: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

async fn measure<S: AsyncRead + AsyncWrite + Unpin>(
    name: &'static str,
    conn: &mut BufReader<S>,
    path: &str,
    body: &[u8],
    calls: usize,
    check: impl Fn(&[u8]),
) -> Row {
    for _ in 0..50 {
        call(conn, path, body).await; // warm-up
    }
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        let (status, out) = call(conn, path, body).await;
        times.push(t.elapsed());
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&out));
        check(&out);
    }
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    Row {
        call: name,
        bytes: body.len(),
        p50: at(0.50),
        p99: at(0.99),
        max: times[times.len() - 1],
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let calls: usize = args
        .iter()
        .position(|a| a == "--calls")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(2_000);

    let before = rss_kib();
    let inventory = Shared::default();
    fill(&inventory);
    let inventory_kib = rss_kib().saturating_sub(before);

    let mut registry = localnfs::metrics::registry("scheduler");
    let helper = Arc::new(Helper {
        inventory,
        metrics: HelperMetrics::register(&mut registry),
        agents: None,
        claims: localnfs::scheduler::claims_review::ClaimGuard::new(
            "localnfs-system",
            "localnfs-controller",
            "localnfs-node",
        ),
    });
    let direct = helper.clone();
    let in_process = move |route: &'static str, body: &[u8]| {
        let mut times: Vec<Duration> = (0..calls)
            .map(|_| {
                let t = Instant::now();
                let resp = direct.answer(route, body);
                let took = t.elapsed();
                assert_eq!(resp.status(), 200);
                took
            })
            .collect();
        times.sort();
        let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
        Row {
            call: route,
            bytes: body.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: times[times.len() - 1],
        }
    };
    let shutdown = CancellationToken::new();
    let now = localnfs::objects::agents::unix_now();
    let bundle = tls::issue(&["127.0.0.1".into()], None, now).expect("certificate");
    let key = tls::certified_key(&bundle.cert_pem, &bundle.key_pem).expect("key");
    let acceptor = TlsAcceptor::from(tls::server_config(Resolver::new(key)).expect("tls"));
    let plain = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let secure = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (plain_addr, secure_addr) = (
        plain.local_addr().expect("addr"),
        secure.local_addr().expect("addr"),
    );
    let servers = [
        tokio::spawn(localnfs::web::serve(
            "extender",
            plain,
            64,
            None,
            helper.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(localnfs::web::serve(
            "webhook",
            secure,
            64,
            Some(acceptor),
            helper,
            shutdown.clone(),
        )),
    ];

    let names: Vec<String> = (0..NODES).map(node).collect();
    let args_body = serde_json::to_vec(&json!({"Pod": pod(), "NodeNames": names})).expect("json");
    let review = review_of(pod());
    let review_without_claims = review_of(pod_without_claims());
    let review_other_class = review_of(pod_with_other_claim());

    let mut rows = vec![
        in_process("filter", &args_body),
        in_process("prioritize", &args_body),
        in_process("mutate", &review),
    ];
    for r in &mut rows {
        r.call = match r.call {
            "filter" => "filter, decode+decide+encode only",
            "prioritize" => "prioritize, decode+decide+encode only",
            _ => "mutate, decode+decide+encode only",
        };
    }
    let tcp = TcpStream::connect(plain_addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let mut extender = BufReader::new(tcp);
    rows.push(
        measure(
            "extender filter",
            &mut extender,
            "/filter",
            &args_body,
            calls,
            |out| {
                let v: serde_json::Value = serde_json::from_slice(out).expect("json");
                // Strict data-db-301 lives on node-0301, which has the 50 GiB free.
                assert_eq!(
                    v["NodeNames"],
                    json!(["node-0301"]),
                    "filter answer changed"
                );
            },
        )
        .await,
    );
    rows.push(
        measure(
            "extender prioritize",
            &mut extender,
            "/prioritize",
            &args_body,
            calls,
            |out| {
                let v: serde_json::Value = serde_json::from_slice(out).expect("json");
                assert_eq!(v.as_array().map(Vec::len), Some(NODES));
            },
        )
        .await,
    );
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(bundle.ca_pem.as_bytes()).expect("ca"))
        .expect("root");
    let config = ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(secure_addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let server_name = ServerName::try_from("127.0.0.1").expect("name");
    let tls = TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .expect("handshake");
    let mut webhook = BufReader::new(tls);
    let unchanged = |out: &[u8]| {
        let v: serde_json::Value = serde_json::from_slice(out).expect("json");
        assert_eq!(v["response"]["allowed"], true);
        assert!(v["response"].get("patch").is_none(), "patched: {v}");
    };
    rows.push(
        measure(
            "webhook mutate, pod without claims (TLS)",
            &mut webhook,
            "/mutate",
            &review_without_claims,
            calls,
            unchanged,
        )
        .await,
    );
    rows.push(
        measure(
            "webhook mutate, pod with a claim of another class (TLS)",
            &mut webhook,
            "/mutate",
            &review_other_class,
            calls,
            unchanged,
        )
        .await,
    );
    rows.push(
        measure(
            "webhook mutate, pod with localnfs claims (TLS)",
            &mut webhook,
            "/mutate",
            &review,
            calls,
            |out| {
                let v: serde_json::Value = serde_json::from_slice(out).expect("json");
                assert_eq!(v["response"]["allowed"], true);
                assert!(v["response"]["patch"].is_array(), "no patch");
            },
        )
        .await,
    );
    shutdown.cancel();
    drop((extender, webhook));
    for s in servers {
        let _ = s.await;
    }

    println!(
        "\nscheduler helper: {NODES} node agents, {VOLUMES} PVs + {VOLUMES} claims known; \
         {calls} calls per row, one kept-alive connection\n"
    );
    println!("| call | request bytes | p50 µs | p99 µs | max µs |");
    println!("|---|--:|--:|--:|--:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.call,
            r.bytes,
            r.p50.as_micros(),
            r.p99.as_micros(),
            r.max.as_micros()
        );
    }
    println!(
        "\ninventory memory (RSS growth while filling it): {:.1} MiB; process RSS at the end: {:.1} MiB",
        inventory_kib as f64 / 1024.0,
        rss_kib() as f64 / 1024.0
    );
}
