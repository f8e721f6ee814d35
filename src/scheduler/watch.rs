//! Keeps the [`Inventory`] current from API watches: StorageClasses, claims,
//! PersistentVolumes (all namespaces) and the node agents' heartbeat Leases, each
//! mirrored by [`crate::kubeclient::mirror`] (compact entries, whole-map relists).

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Client;
use kube::api::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::inventory::{ClaimInfo, ClassInfo, Inventory, VolumeInfo, claim_key};
use crate::heartbeat;
use crate::kubeclient::{Mirror, mirror};

/// The inventory, shared between the watches and the request handlers.
pub type Shared = crate::kubeclient::Shared<Inventory>;

/// Runs `f` on the inventory.
pub fn with<T>(inv: &Shared, f: impl FnOnce(&Inventory) -> T) -> T {
    crate::kubeclient::read(inv, f)
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
        mirror(
            Api::<StorageClass>::all(client.clone()),
            Mirror {
                what: "StorageClass",
                map: |i: &mut Inventory| &mut i.classes,
                key: |c| c.metadata.name.clone(),
                value: Box::new(move |c| ClassInfo::from_class(c, &p1)),
            },
            inv,
            shutdown,
        ),
        mirror(
            Api::<PersistentVolumeClaim>::all(client.clone()),
            Mirror {
                what: "PersistentVolumeClaim",
                map: |i: &mut Inventory| &mut i.claims,
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
        mirror(
            Api::<PersistentVolume>::all(client.clone()),
            Mirror {
                what: "PersistentVolume",
                map: |i: &mut Inventory| &mut i.volumes,
                key: |pv| pv.metadata.name.clone(),
                value: Box::new(move |pv| VolumeInfo::from_pv(pv, &p2)),
            },
            inv,
            shutdown,
        ),
        heartbeat::watch(client, namespace, inv, |i| &mut i.agents, shutdown),
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
