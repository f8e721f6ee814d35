//! Keeps the [`Inventory`] current from API watches: StorageClasses, claims,
//! PersistentVolumes (all namespaces) and the node agents' heartbeat Leases. Each watch
//! keeps only the compact entry of each object; a relist replaces its whole map at
//! once, so a deletion missed while disconnected does not linger.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, RwLock};

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Client;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use serde::de::DeserializeOwned;

use super::inventory::{AgentInfo, ClaimInfo, ClassInfo, Inventory, VolumeInfo, claim_key};
use crate::provisioner::protocol::NODE_LEASE_PREFIX;

/// The inventory, shared between the watches and the request handlers.
pub type Shared = Arc<RwLock<Inventory>>;

/// Runs `f` on the inventory, whatever a panicking writer left behind.
pub fn with<T>(inv: &Shared, f: impl FnOnce(&Inventory) -> T) -> T {
    match inv.read() {
        Ok(i) => f(&i),
        Err(poisoned) => f(&poisoned.into_inner()),
    }
}

fn with_mut<T>(inv: &Shared, f: impl FnOnce(&mut Inventory) -> T) -> T {
    match inv.write() {
        Ok(mut i) => f(&mut i),
        Err(poisoned) => f(&mut poisoned.into_inner()),
    }
}

/// Turns a watched object into its inventory entry (`None`: not one of ours).
type Convert<K, V> = Box<dyn Fn(&K) -> Option<V> + Send + Sync>;

/// One watched kind: where its entries live and how an object becomes one.
struct Mirror<K, V> {
    what: &'static str,
    map: fn(&mut Inventory) -> &mut HashMap<String, V>,
    key: fn(&K) -> Option<String>,
    value: Convert<K, V>,
}

impl<K, V> Mirror<K, V>
where
    K: Clone + Debug + Send + 'static,
    V: Send + 'static,
{
    async fn run(
        self,
        events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
        inv: Shared,
        synced: watch::Sender<bool>,
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
                    if let Some(buf) = relist.take() {
                        with_mut(&inv, |i| *(self.map)(i) = buf);
                    }
                    synced.send_replace(true);
                }
                watcher::Event::Apply(obj) => {
                    let Some(k) = (self.key)(&obj) else { continue };
                    let v = (self.value)(&obj);
                    with_mut(&inv, |i| match v {
                        Some(v) => (self.map)(i).insert(k, v),
                        None => (self.map)(i).remove(&k),
                    });
                }
                watcher::Event::Delete(obj) => {
                    if let Some(k) = (self.key)(&obj) {
                        with_mut(&inv, |i| (self.map)(i).remove(&k));
                    }
                }
            }
        }
    }
}

fn spawn_mirror<K, V>(
    api: Api<K>,
    mirror: Mirror<K, V>,
    inv: &Shared,
    shutdown: &CancellationToken,
) -> watch::Receiver<bool>
where
    K: kube::Resource + Clone + Debug + DeserializeOwned + Send + 'static,
    V: Send + 'static,
{
    let (tx, rx) = watch::channel(false);
    let events = watcher(api, watcher::Config::default()).default_backoff();
    tokio::spawn(mirror.run(events, inv.clone(), tx, shutdown.clone()));
    rx
}

/// Keeps `inv.agents` current from the node agents' heartbeat Leases in `namespace`;
/// the receiver turns true once they have been listed.
pub fn watch_agents(
    client: &Client,
    namespace: &str,
    inv: &Shared,
    shutdown: &CancellationToken,
) -> watch::Receiver<bool> {
    spawn_mirror(
        Api::<Lease>::namespaced(client.clone(), namespace),
        Mirror {
            what: "Lease",
            map: |i| &mut i.agents,
            key: |l| {
                let name = l.metadata.name.as_deref()?;
                Some(name.strip_prefix(NODE_LEASE_PREFIX)?.to_owned())
            },
            value: Box::new(|l| AgentInfo::from_lease(l).map(|(_, a)| a)),
        },
        inv,
        shutdown,
    )
}

/// Starts the four watches; the returned receiver turns true once each has listed.
pub fn start(
    client: &Client,
    provisioner: &str,
    namespace: &str,
    inv: &Shared,
    shutdown: &CancellationToken,
) -> watch::Receiver<bool> {
    let (p1, p2) = (provisioner.to_owned(), provisioner.to_owned());
    let flags = [
        spawn_mirror(
            Api::<StorageClass>::all(client.clone()),
            Mirror {
                what: "StorageClass",
                map: |i| &mut i.classes,
                key: |c| c.metadata.name.clone(),
                value: Box::new(move |c| ClassInfo::from_class(c, &p1)),
            },
            inv,
            shutdown,
        ),
        spawn_mirror(
            Api::<PersistentVolumeClaim>::all(client.clone()),
            Mirror {
                what: "PersistentVolumeClaim",
                map: |i| &mut i.claims,
                key: |c| {
                    Some(claim_key(
                        c.metadata.namespace.as_deref()?,
                        c.metadata.name.as_deref()?,
                    ))
                },
                value: Box::new(|c| Some(ClaimInfo::from_claim(c))),
            },
            inv,
            shutdown,
        ),
        spawn_mirror(
            Api::<PersistentVolume>::all(client.clone()),
            Mirror {
                what: "PersistentVolume",
                map: |i| &mut i.volumes,
                key: |pv| pv.metadata.name.clone(),
                value: Box::new(move |pv| VolumeInfo::from_pv(pv, &p2)),
            },
            inv,
            shutdown,
        ),
        watch_agents(client, namespace, inv, shutdown),
    ];
    let (all_tx, all_rx) = watch::channel(false);
    tokio::spawn(async move {
        for mut rx in flags {
            if rx.wait_for(|synced| *synced).await.is_err() {
                return;
            }
        }
        all_tx.send_replace(true);
    });
    all_rx
}
