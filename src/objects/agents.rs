//! The node agents' heartbeat Leases: one per node (`localnfs-node-<node>` in the
//! heartbeat namespace, `--heartbeat-namespace`, which holds nothing else), renewed every few seconds with the node's free space, NFS port
//! and per-volume usage. The agent writes its own ([`renew`]); the controller, the
//! scheduler helper and `status` read them ([`AgentInfo::from_lease`], [`watch`]).
//! An agent counts as gone once its Lease's renew time plus duration has passed.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::watch as signal;
use tokio_util::sync::CancellationToken;

use super::keys::{FREE_BYTES, NFS_PORT, NODE_KEY, NODE_LEASE_PREFIX, USED_BYTES, USED_INODES};
use crate::kubeclient::{Mirror, Shared, mirror};

/// The heartbeat namespace of a default install (`--heartbeat-namespace`).
pub const HEARTBEAT_NAMESPACE: &str = "localnfs-heartbeats";

/// Seconds a heartbeat stays valid after its renewal.
pub const LEASE_SECONDS: i32 = 30;

/// A node agent's last heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentInfo {
    pub free_bytes: u64,
    /// The agent's NFS port (kubelet mounts with `port=`/`mountport=` this).
    pub nfs_port: u16,
    /// Unix seconds after which the agent counts as gone.
    pub expires: i64,
}

/// The clock heartbeat expiries are compared with: unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The name of `node`'s heartbeat Lease.
pub fn lease_name(node: &str) -> String {
    format!("{NODE_LEASE_PREFIX}{node}")
}

/// The node a Lease is the heartbeat of, or `None` for other Leases.
pub fn lease_node(lease: &Lease) -> Option<&str> {
    lease
        .metadata
        .name
        .as_deref()?
        .strip_prefix(NODE_LEASE_PREFIX)
}

impl AgentInfo {
    /// A node agent's heartbeat Lease as `(node, info)`, or `None` for other Leases.
    pub fn from_lease(lease: &Lease) -> Option<(String, Self)> {
        let node = lease_node(lease)?.to_owned();
        let spec = lease.spec.as_ref()?;
        let renewed = spec.renew_time.as_ref()?.0.as_second();
        let ttl = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
        let ann = lease.metadata.annotations.as_ref()?;
        let free_bytes = ann.get(FREE_BYTES)?.parse().ok()?;
        let nfs_port = ann
            .get(NFS_PORT)
            .and_then(|p| p.parse().ok())
            .unwrap_or(2049);
        Some((
            node,
            Self {
                free_bytes,
                nfs_port,
                expires: renewed + ttl,
            },
        ))
    }
}

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
/// `namespace` (node → last heartbeat); the receiver turns true once listed.
pub fn watch<T: Send + Sync + 'static>(
    client: &Client,
    namespace: &str,
    into: &Shared<T>,
    map: fn(&mut T) -> &mut HashMap<String, AgentInfo>,
    shutdown: &CancellationToken,
) -> signal::Receiver<bool> {
    mirror(
        Api::<Lease>::namespaced(client.clone(), namespace),
        Mirror {
            what: "Lease",
            map,
            key: |l| lease_node(l).map(str::to_owned),
            value: Box::new(|l| AgentInfo::from_lease(l).map(|(_, a)| a)),
        },
        into,
        shutdown,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_name_their_node_and_expire() {
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": "localnfs-node-n1", "annotations": {FREE_BYTES: "1000"}},
            "spec": {"renewTime": "2026-01-01T00:00:00.000000Z", "leaseDurationSeconds": 30}}))
        .expect("lease");
        let (node, info) = AgentInfo::from_lease(&lease).expect("agent lease");
        assert_eq!(
            (node.as_str(), info.free_bytes, info.nfs_port),
            ("n1", 1000, 2049)
        );
        assert_eq!(lease_name(&node), "localnfs-node-n1");
        let renewed = Timestamp::from_second(1_767_225_600)
            .expect("time")
            .as_second();
        assert_eq!(info.expires, renewed + 30);
        let other: Lease =
            serde_json::from_value(json!({"metadata": {"name": "localnfs-controller"}}))
                .expect("lease");
        assert_eq!(AgentInfo::from_lease(&other), None);
    }
}
