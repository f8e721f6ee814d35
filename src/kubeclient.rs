//! Kubernetes helpers every component uses: building a client (from `--kubeconfig`
//! when given, else in-cluster service account, then `$KUBECONFIG` /
//! `~/.kube/config`) with a client-side rate limit (a token bucket in front of every
//! request, [`limited_client`]; each component's default rate is here), paged lists,
//! reading metadata, finalizer patches, one mirrored watch and one retry policy.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use kube::client::ClientBuilder;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch as signal;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// A client for `kubeconfig`, or the default one, with no client-side rate limit
/// (tests and tools; the components use [`limited_client`]).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    match kubeconfig {
        Some(path) => from_kubeconfig(path).await,
        None => Client::try_default().await.map_err(Error::BuildClient),
    }
}

/// A client built from a kubeconfig file.
pub async fn from_kubeconfig(path: &Path) -> Result<Client> {
    let config = kubeconfig_config(path).await?;
    Client::try_from(config).map_err(Error::BuildClient)
}

async fn kubeconfig_config(path: &Path) -> Result<kube::Config> {
    let kubeconfig = Kubeconfig::read_from(path).map_err(|source| Error::ReadKubeconfig {
        path: path.to_owned(),
        source,
    })?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| Error::ReadKubeconfig {
            path: path.to_owned(),
            source,
        })
}

/// A client for `kubeconfig` (else the default one) that sends requests no faster
/// than `rate`.
pub async fn limited_client(kubeconfig: Option<&Path>, rate: Rate) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => kubeconfig_config(path).await?,
        None => kube::Config::infer()
            .await
            .map_err(|e| Error::BuildClient(kube::Error::InferConfig(e)))?,
    };
    let builder = ClientBuilder::try_from(config).map_err(Error::BuildClient)?;
    Ok(builder.with_layer(&RateLimit::new(rate)).build())
}

/// The controller's default rate: one replica acts for the whole cluster. A claim
/// costs it about 7 requests (bench/README.md, the scale section), so this is
/// a guard against a runaway loop rather than a budget: at 300 a second a 500-claim
/// burst took 36 s against 22 s without a limit. What keeps a large cluster's API
/// server calm is fewer requests per claim, not a lower ceiling here.
pub const CONTROLLER_RATE: Rate = Rate {
    qps: 1000.0,
    burst: 2000,
};
/// The scheduler helper's: it watches and answers from memory; its requests are the
/// watches' reconnections and its certificate Secret.
pub const SCHEDULER_RATE: Rate = Rate {
    qps: 20.0,
    burst: 40,
};
/// Each node agent's: a heartbeat every 30 s, plus about two requests per claim
/// placed on its node (its answer and its PV check; heartbeats and usage shards
/// woken by new volumes are at most one each per 2 s, per 10 s in a burst). At 10 a
/// second one node took 121 s to answer a 500-claim burst; 100 keeps one agent from
/// holding up the controller. 100 idle agents still send 5 requests a second
/// together.
pub const AGENT_RATE: Rate = Rate {
    qps: 100.0,
    burst: 200,
};
/// The leader Lease's and each agent's heartbeat's own client: liveness goes through a
/// client (and a bucket) of its own, so a burst of work queued on the main client's
/// bucket never delays a renewal past its deadline (a leader would step down mid-burst,
/// an agent would look dead). A leader round is two requests; a heartbeat round one
/// write per changed usage shard and the Lease.
pub const LIVENESS_RATE: Rate = Rate {
    qps: 10.0,
    burst: 20,
};
/// `localnfs status`: two paged lists.
pub const STATUS_RATE: Rate = Rate {
    qps: 20.0,
    burst: 40,
};

/// A client-side request rate: `qps` on average, up to `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub qps: f64,
    pub burst: u32,
}

/// A token bucket: `burst` tokens, refilled at `qps` a second; each request takes one,
/// waiting for it when there is none. Tokens are reserved when asked for (the count
/// may go below zero), so waiters are served in the order they asked.
#[derive(Debug)]
struct Bucket {
    rate: Rate,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: Rate, now: Instant) -> Self {
        Self {
            rate,
            tokens: f64::from(rate.burst.max(1)),
            at: now,
        }
    }

    /// Takes a token at `now`; how long to wait before using it.
    fn take(&mut self, now: Instant) -> Duration {
        let qps = self.rate.qps;
        if !(qps.is_finite() && qps > 0.0) {
            return Duration::ZERO; // no limit
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now.max(self.at);
        self.tokens = (self.tokens + elapsed * qps).min(f64::from(self.rate.burst.max(1)));
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / qps)
        }
    }
}

/// Tower layer putting a [`Bucket`] in front of every request of a client (watches
/// included: each (re)connection takes a token).
#[derive(Clone, Debug)]
pub struct RateLimit {
    bucket: Arc<Mutex<Bucket>>,
}

impl RateLimit {
    pub fn new(rate: Rate) -> Self {
        Self {
            bucket: Arc::new(Mutex::new(Bucket::new(rate, Instant::now()))),
        }
    }
}

impl<S> tower::Layer<S> for RateLimit {
    type Service = RateLimited<S>;

    fn layer(&self, inner: S) -> RateLimited<S> {
        RateLimited {
            inner,
            bucket: self.bucket.clone(),
            wait: None,
            has_token: false,
        }
    }
}

/// A service that is ready only once it holds a token. (kube's client drives its
/// service from one task through a buffer, so waiting in `poll_ready` delays the
/// sending of requests in order, not their answers.)
pub struct RateLimited<S> {
    inner: S,
    bucket: Arc<Mutex<Bucket>>,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
    has_token: bool,
}

impl<S, Req> tower::Service<Req> for RateLimited<S>
where
    S: tower::Service<Req>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        if !self.has_token {
            if self.wait.is_none() {
                let wait = match self.bucket.lock() {
                    Ok(mut b) => b.take(Instant::now()),
                    Err(poisoned) => poisoned.into_inner().take(Instant::now()),
                };
                if wait.is_zero() {
                    self.has_token = true;
                } else {
                    self.wait = Some(Box::pin(tokio::time::sleep(wait)));
                }
            }
            if let Some(sleep) = self.wait.as_mut() {
                std::task::ready!(sleep.as_mut().poll(cx));
                self.wait = None;
                self.has_token = true;
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> S::Future {
        self.has_token = false;
        self.inner.call(req)
    }
}

/// Objects listed per request by [`list_all`]: a large list arrives in pages the API
/// server and etcd serve without building one huge answer.
pub const PAGE: u32 = 500;

/// Every object `params` selects, listed [`PAGE`] at a time.
pub async fn list_all<K>(
    api: &Api<K>,
    params: &ListParams,
) -> std::result::Result<Vec<K>, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut params = params.clone().limit(PAGE);
    let mut out = Vec::new();
    loop {
        let page = api.list(&params).await?;
        out.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(out),
        }
    }
}

/// A JSON patch adding finalizer `f` to `obj` as read: conditional on its
/// resourceVersion (a `test`; the API answers 422 when it changed since and the
/// reconciler retries on a fresh copy), so a stale copy never adds `f` twice, and an
/// empty list is not replaced over someone else's concurrent addition. Appends when
/// the list exists.
pub fn add_finalizer<K: Resource>(obj: &K, f: &str) -> kube::api::Patch<()> {
    let mut ops = Vec::new();
    if let Some(rv) = &obj.meta().resource_version {
        ops.push(
            serde_json::json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv}),
        );
    }
    ops.push(
        if obj.meta().finalizers.as_ref().is_none_or(Vec::is_empty) {
            serde_json::json!({"op": "add", "path": "/metadata/finalizers", "value": [f]})
        } else {
            serde_json::json!({"op": "add", "path": "/metadata/finalizers/-", "value": f})
        },
    );
    kube::api::Patch::Json(
        serde_json::from_value(serde_json::Value::Array(ops))
            .unwrap_or(json_patch::Patch(Vec::new())),
    )
}

/// A JSON patch removing finalizer `f`, guarded by a `test` that it is still where we
/// saw it (the API answers 422 otherwise and the reconciler retries on a fresh copy),
/// so other finalizers are never touched. `None` if `f` is absent.
pub fn remove_finalizer(current: &[String], f: &str) -> Option<kube::api::Patch<()>> {
    let i = current.iter().position(|x| x == f)?;
    let path = format!("/metadata/finalizers/{i}");
    let ops = serde_json::json!([
        {"op": "test", "path": path, "value": f},
        {"op": "remove", "path": path},
    ]);
    serde_json::from_value(ops).ok().map(kube::api::Patch::Json)
}

/// Whether a failed call lost a race (409 Conflict, or 422 from a failed patch test):
/// worth retrying on a fresh copy.
pub fn lost_race(e: &crate::error::Error) -> bool {
    matches!(e, crate::error::Error::Kube { source: kube::Error::Api(s), .. } if s.code == 409 || s.code == 422)
}

/// When a reconcile that failed with `e` runs again: after a lost race, once the
/// watch brings the winner's write (which queues the object again; the second here is
/// only the safety net: retrying sooner re-read the same stale copy and lost again),
/// else after a pause (logged).
pub fn retry_after(e: &crate::error::Error) -> Duration {
    if lost_race(e) {
        // Someone updated the object between our read and write.
        tracing::debug!(error = %e, "lost an update race; retrying");
        return Duration::from_secs(1);
    }
    tracing::warn!(error = %e, "reconcile failed; retrying");
    Duration::from_secs(5)
}

/// An object's annotation `key`.
pub fn annotation<'a, K: Resource>(obj: &'a K, key: &str) -> Option<&'a str> {
    obj.meta()
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// Whether an object carries finalizer `f`.
pub fn has_finalizer<K: Resource>(obj: &K, f: &str) -> bool {
    obj.meta().finalizers.iter().flatten().any(|x| x == f)
}

/// A node's InternalIP addresses, in the order the node lists them.
pub fn internal_ips(node: &Node) -> impl Iterator<Item = &str> {
    node.status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP")
        .map(|a| a.address.as_str())
}

/// State kept current by watches and read by request handlers.
pub type Shared<T> = Arc<RwLock<T>>;

/// Runs `f` on `shared`, whatever a panicking writer left behind.
pub fn read<T, R>(shared: &Shared<T>, f: impl FnOnce(&T) -> R) -> R {
    match shared.read() {
        Ok(i) => f(&i),
        Err(poisoned) => f(&poisoned.into_inner()),
    }
}

fn write<T, R>(shared: &Shared<T>, f: impl FnOnce(&mut T) -> R) -> R {
    match shared.write() {
        Ok(mut i) => f(&mut i),
        Err(poisoned) => f(&mut poisoned.into_inner()),
    }
}

/// Turns a watched object into its entry (`None`: not one of ours).
pub type Convert<K, V> = Box<dyn Fn(&K) -> Option<V> + Send + Sync>;

/// One watched kind mirrored into a map inside a [`Shared`] `T`: which map, and how an
/// object becomes an entry. Only the compact entry is kept, not the object.
pub struct Mirror<T, K, V> {
    /// The kind, for logs.
    pub what: &'static str,
    pub map: fn(&mut T) -> &mut HashMap<String, V>,
    pub key: fn(&K) -> Option<String>,
    pub value: Convert<K, V>,
}

impl<T, K, V> Mirror<T, K, V>
where
    K: Clone + Debug + Send + 'static,
    V: Send + 'static,
{
    async fn run(
        self,
        events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
        into: Shared<T>,
        synced: signal::Sender<bool>,
        shutdown: CancellationToken,
    ) {
        let mut relist: Option<HashMap<String, V>> = None;
        let events = events.take_until(shutdown.cancelled_owned());
        tokio::pin!(events);
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(kind = self.what, error = %e, "watch failed; retrying");
                    continue;
                }
            };
            match event {
                watcher::Event::Init => relist = Some(HashMap::new()),
                watcher::Event::InitApply(obj) => {
                    if let (Some(buf), Some(k), Some(v)) =
                        (relist.as_mut(), (self.key)(&obj), (self.value)(&obj))
                    {
                        buf.insert(k, v);
                    }
                }
                watcher::Event::InitDone => {
                    // The whole map at once: a deletion missed while disconnected does
                    // not linger.
                    if let Some(buf) = relist.take() {
                        write(&into, |i| *(self.map)(i) = buf);
                    }
                    synced.send_replace(true);
                }
                watcher::Event::Apply(obj) => {
                    let Some(k) = (self.key)(&obj) else { continue };
                    let v = (self.value)(&obj);
                    write(&into, |i| match v {
                        Some(v) => (self.map)(i).insert(k, v),
                        None => (self.map)(i).remove(&k),
                    });
                }
                watcher::Event::Delete(obj) => {
                    if let Some(k) = (self.key)(&obj) {
                        write(&into, |i| (self.map)(i).remove(&k));
                    }
                }
            }
        }
    }
}

/// Watches `api` and keeps `mirror`'s map in `into` equal to it until `shutdown`; the
/// receiver turns true once the first list is in.
pub fn mirror<T, K, V>(
    api: Api<K>,
    mirror: Mirror<T, K, V>,
    into: &Shared<T>,
    shutdown: &CancellationToken,
) -> signal::Receiver<bool>
where
    T: Send + Sync + 'static,
    K: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
    V: Send + 'static,
{
    mirror_with(api, watcher::Config::default(), mirror, into, shutdown)
}

/// [`mirror`] of the objects `config` selects.
pub fn mirror_with<T, K, V>(
    api: Api<K>,
    config: watcher::Config,
    mirror: Mirror<T, K, V>,
    into: &Shared<T>,
    shutdown: &CancellationToken,
) -> signal::Receiver<bool>
where
    T: Send + Sync + 'static,
    K: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
    V: Send + 'static,
{
    let (tx, rx) = signal::channel(false);
    let events = watcher(api, config).default_backoff();
    tokio::spawn(mirror.run(events, into.clone(), tx, shutdown.clone()));
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_past_the_burst_wait_their_turn_at_the_set_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(
            Rate {
                qps: 10.0,
                burst: 3,
            },
            t0,
        );
        let waits: Vec<u128> = (0..5).map(|_| b.take(t0).as_millis()).collect();
        assert_eq!(
            waits,
            [0, 0, 0, 100, 200],
            "a burst of 3, then one per 100 ms"
        );
        // A second later 10 tokens came back, less the 2 borrowed; capped at the burst.
        let t1 = t0 + Duration::from_secs(1);
        let waits: Vec<u128> = (0..4).map(|_| b.take(t1).as_millis()).collect();
        assert_eq!(waits, [0, 0, 0, 100]);
        let mut unlimited = Bucket::new(Rate { qps: 0.0, burst: 1 }, t0);
        assert!(
            (0..100).all(|_| unlimited.take(t0).is_zero()),
            "qps 0: no limit"
        );
    }

    #[test]
    fn finalizer_patches_touch_only_our_entry() {
        let cur = vec!["a".to_owned(), "ours".to_owned(), "b".to_owned()];
        let remove = serde_json::to_value(match remove_finalizer(&cur, "ours") {
            Some(kube::api::Patch::Json(p)) => p,
            _ => panic!("expected a JSON patch"),
        })
        .expect("json");
        assert_eq!(remove[0]["op"], "test");
        assert_eq!(remove[1]["path"], "/metadata/finalizers/1");
        assert!(remove_finalizer(&cur, "absent").is_none());
        let mut obj = k8s_openapi::api::core::v1::ConfigMap::default();
        obj.metadata.finalizers = Some(cur.clone());
        obj.metadata.resource_version = Some("42".to_owned());
        let add = |obj: &k8s_openapi::api::core::v1::ConfigMap| {
            serde_json::to_value(match add_finalizer(obj, "ours") {
                kube::api::Patch::Json(p) => p,
                _ => panic!("expected a JSON patch"),
            })
            .expect("json")
        };
        let appended = add(&obj);
        // Only onto the copy we read: a stale copy cannot add it twice.
        assert_eq!(appended[0]["op"], "test");
        assert_eq!(appended[0]["value"], "42");
        assert_eq!(appended[1]["path"], "/metadata/finalizers/-");
        obj.metadata.finalizers = None;
        assert_eq!(add(&obj)[1]["path"], "/metadata/finalizers");
    }
}
