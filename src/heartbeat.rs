//! Heartbeat Lease I/O: the agent renews its own Lease ([`renew`]); the controller and
//! the scheduler helper keep a live map of every agent's ([`watch`]). What a Lease
//! says and when its agent counts as gone are decided in `objects::agents`, which
//! does no I/O; this module only reads and writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::watch as signal;
use tokio_util::sync::CancellationToken;

use crate::kubeclient::{Mirror, Shared, mirror};
use crate::objects::agents::{
    AgentInfo, LEASE_SECONDS, Seen, lease_name, lease_node, observe, observer_now, version,
};
use crate::objects::keys::{AGENT_KEY, FREE_BYTES, NFS_PORT, NODE_KEY, USED_BYTES, USED_INODES};

/// What an agent reports in a heartbeat.
pub struct Heartbeat<'a> {
    pub node: &'a str,
    pub free_bytes: u64,
    pub nfs_port: u16,
    /// Each volume's used bytes as JSON (volume name → bytes); `None` removes the
    /// annotation (a node with too many volumes for one annotation).
    pub usage: Option<String>,
    /// Each volume's objects and object limit as JSON (volume name → `[used, limit]`);
    /// `None` removes the annotation, as for `usage`.
    pub inodes: Option<String>,
    /// The public half of the agent's signing key, hex.
    pub key: String,
}

/// Renews `hb.node`'s heartbeat Lease in `leases`' namespace, creating it the first time.
pub async fn renew(leases: &Api<Lease>, hb: &Heartbeat<'_>) -> Result<(), kube::Error> {
    let name = lease_name(hb.node);
    // `null` removes the usage annotation from the Lease when it is too long.
    let annotations: BTreeMap<&str, Option<String>> = [
        (FREE_BYTES, Some(hb.free_bytes.to_string())),
        (NFS_PORT, Some(hb.nfs_port.to_string())),
        (USED_BYTES, hb.usage.clone()),
        (USED_INODES, hb.inodes.clone()),
        (AGENT_KEY, Some(hb.key.clone())),
    ]
    .into();
    let body = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        // The node label names the node the write guard holds this Lease to (only
        // this node's agent may write it).
        "metadata": {"name": name, "labels": {NODE_KEY: hb.node}, "annotations": annotations},
        "spec": {
            "holderIdentity": hb.node,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": MicroTime(Timestamp::now()),
        },
    });
    match leases
        .patch(&name, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let mut body = body;
            if let Some(a) = body["metadata"]["annotations"].as_object_mut() {
                a.retain(|_, v| !v.is_null()); // a new object has nothing to remove
            }
            let lease: Lease = serde_json::from_value(body).map_err(kube::Error::SerdeError)?;
            leases
                .create(&PostParams::default(), &lease)
                .await
                .map(drop)
        }
        other => other.map(drop),
    }
}

/// Keeps the map that `map` picks out of `into` equal to the heartbeats in
/// `namespace` (node → last heartbeat, expiring on [`observer_now`]'s clock a
/// duration after the Lease was last seen to change); the receiver turns true once
/// listed.
pub fn watch<T: Send + Sync + 'static>(
    client: &Client,
    namespace: &str,
    into: &Shared<T>,
    map: fn(&mut T) -> &mut HashMap<String, AgentInfo>,
    shutdown: &CancellationToken,
) -> signal::Receiver<bool> {
    // One entry per node that ever heartbeated: a handful of bytes each.
    let seen: Mutex<HashMap<String, Seen>> = Mutex::default();
    mirror(
        Api::<Lease>::namespaced(client.clone(), namespace),
        Mirror {
            what: "Lease",
            map,
            key: |l| lease_node(l).map(str::to_owned),
            value: Box::new(move |l| {
                let node = lease_node(l)?;
                let now = observer_now();
                // A poisoned map only loses observations: the Lease counts as just
                // renewed, the safe side.
                let changed_at = match seen.lock() {
                    Ok(mut seen) => {
                        let s = observe(seen.get(node), &version(l), now);
                        let at = s.changed_at;
                        seen.insert(node.to_owned(), s);
                        at
                    }
                    Err(_) => now,
                };
                AgentInfo::from_lease(l, changed_at).map(|(_, a)| a)
            }),
        },
        into,
        shutdown,
    )
}
