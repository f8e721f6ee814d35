//! Shared test helpers: polling with a deadline, and a background test-kubelet that
//! marks every pod scheduled onto the test nodes Running and Ready.

#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod cluster;
pub mod credentials;
pub mod ganesha;
pub mod kernel;
pub mod mariadb;
pub mod nfs;
pub mod tmpfs;

use std::future::Future;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use localnfs_testbed::kubelet;
use tokio::task::JoinHandle;

/// Polls `check` every 100 ms until it returns `Some`, panicking with `what` after
/// `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A test-kubelet: watches pods in `namespace` and reports each one bound to a node
/// Running and Ready, as a kubelet would once its containers started. Aborted on drop.
pub struct TestKubelet(JoinHandle<()>);

impl TestKubelet {
    pub fn start(client: Client, namespace: &str) -> Self {
        let ns = namespace.to_owned();
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        Self(tokio::spawn(async move {
            let mut events = watcher(pods, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Some(event) = events.next().await {
                let Ok(pod) = event else { continue };
                if pod.metadata.deletion_timestamp.is_some() {
                    let _ = kubelet::finish_pod_deletion(&client, &pod).await;
                    continue;
                }
                let scheduled = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
                let deleting = pod.metadata.deletion_timestamp.is_some();
                if scheduled && !deleting && !kubelet::is_running_and_ready(&pod) {
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    if let Err(e) = kubelet::mark_pod_ready(&client, &ns, &name).await {
                        eprintln!("test-kubelet: marking {ns}/{name} ready: {e}");
                    }
                }
            }
        }))
    }
}

impl Drop for TestKubelet {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether a process with this PID still exists (zombies count as gone).
pub fn process_exists(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A plain `GET` over HTTP/1.0: returns the status code and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, "").await
}

/// A `POST` of a JSON `body` over HTTP/1.0: returns the status code and body.
pub async fn http_post(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    http(addr, "POST", path, body).await
}

async fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to HTTP listener");
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(format!("{head}{body}").as_bytes())
        .await
        .expect("send request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

/// The Prometheus text of the admin listener at `addr`.
pub async fn scrape(addr: std::net::SocketAddr) -> Metrics {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    Metrics(body)
}

/// One scrape, read the way a Prometheus query would.
pub struct Metrics(pub String);

impl Metrics {
    /// The sample `name` whose labels include all of `labels` (summed if several
    /// match); 0 if none does, as a series not yet created counts nothing.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name, labels).map(|(_, v)| v).sum()
    }

    /// Whether any sample `name` has all of `labels`.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.samples(name, labels).next().is_some()
    }

    /// (labels, value) of the samples `name` that have all of `labels`.
    pub fn samples<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (Vec<(String, String)>, f64)> + 'a {
        self.0.lines().filter_map(move |line| {
            if line.starts_with('#') {
                return None;
            }
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            let have = parse_labels(rest.strip_suffix('}')?);
            let all = labels
                .iter()
                .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v));
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().ok()?,
            };
            all.then_some((have, value))
        })
    }
}

/// `a="x",b="y"` (values without escapes, as ours are).
fn parse_labels(s: &str) -> Vec<(String, String)> {
    s.split("\",")
        .filter_map(|kv| {
            let (k, v) = kv.split_once("=\"")?;
            Some((k.to_owned(), v.trim_end_matches('"').to_owned()))
        })
        .collect()
}

/// Fills `dir` with 2,000 files of 192 KiB and 12,000 of 4 KiB in 20 directories
/// (about 420 MiB): enough per-file work that a backup or restore of it runs for
/// seconds on a quiet machine, so a test can catch it part-way.
pub fn fill_many_files(dir: &std::path::Path) {
    for d in 0..20 {
        let sub = dir.join(format!("d{d}"));
        std::fs::create_dir_all(&sub).expect("mkdir");
        for f in 0..100 {
            std::fs::write(sub.join(format!("f{f}")), vec![(d * f) as u8; 192 << 10])
                .expect("write");
        }
        for f in 0..600 {
            std::fs::write(sub.join(format!("s{f}")), vec![(d + f) as u8; 4 << 10]).expect("write");
        }
    }
}
