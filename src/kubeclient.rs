//! Kubernetes helpers every component uses: building a client (from `--kubeconfig`
//! when given, else in-cluster service account, then `$KUBECONFIG` /
//! `~/.kube/config`), reading metadata, finalizer patches, one mirrored watch and one
//! retry policy.

use std::collections::HashMap;
use std::fmt::Debug;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch as signal;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// A client for `kubeconfig`, or the default one.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    match kubeconfig {
        Some(path) => from_kubeconfig(path).await,
        None => Client::try_default().await.map_err(Error::BuildClient),
    }
}

/// A client built from a kubeconfig file.
pub async fn from_kubeconfig(path: &Path) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path).map_err(|source| Error::ReadKubeconfig {
        path: path.to_owned(),
        source,
    })?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| Error::ReadKubeconfig {
            path: path.to_owned(),
            source,
        })?;
    Client::try_from(config).map_err(Error::BuildClient)
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

/// A JSON patch adding finalizer `f` to an object whose finalizers were `current`.
/// Appends when the list exists, so nobody else's concurrent addition is lost.
pub fn add_finalizer(current: &[String], f: &str) -> kube::api::Patch<()> {
    let ops = if current.is_empty() {
        serde_json::json!([{"op": "add", "path": "/metadata/finalizers", "value": [f]}])
    } else {
        serde_json::json!([{"op": "add", "path": "/metadata/finalizers/-", "value": f}])
    };
    kube::api::Patch::Json(serde_json::from_value(ops).unwrap_or(json_patch::Patch(Vec::new())))
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
/// worth retrying at once on a fresh copy.
pub fn lost_race(e: &crate::error::Error) -> bool {
    matches!(e, crate::error::Error::Kube { source: kube::Error::Api(s), .. } if s.code == 409 || s.code == 422)
}

/// When a reconcile that failed with `e` runs again: at once on a fresh copy after a
/// lost race, else after a pause (logged).
pub fn retry_after(e: &crate::error::Error) -> Duration {
    if lost_race(e) {
        // Someone updated the object between our read and write.
        tracing::debug!(error = %e, "lost an update race; retrying");
        return Duration::from_millis(200);
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
        let add = serde_json::to_value(match add_finalizer(&cur, "ours") {
            kube::api::Patch::Json(p) => p,
            _ => panic!("expected a JSON patch"),
        })
        .expect("json");
        assert_eq!(add[0]["path"], "/metadata/finalizers/-");
    }
}
