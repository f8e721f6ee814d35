//! What the scheduler helper knows about the cluster, kept small: for each of our
//! StorageClasses, claims, PersistentVolumes and node agents only the few fields a
//! decision reads, not the whole object. Filled by watches ([`super::watch`]) in
//! production and directly by tests and benchmarks; no I/O here.

use std::collections::HashMap;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;

use crate::provisioner::params::{ClassParams, Locality};
use crate::provisioner::protocol::{FREE_BYTES, NFS_PORT, NODE_LEASE_PREFIX};
use crate::provisioner::pv::{LOCALITY_KEY, NODE_KEY, PROVISIONED_BY};

/// One of our StorageClasses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassInfo {
    pub locality: Locality,
    /// `volumeBindingMode: WaitForFirstConsumer`: the scheduler picks the node, so the
    /// extender must only offer nodes with room.
    pub wait_for_consumer: bool,
}

/// A claim, any class (a pod's claims are looked up by name before their class is
/// known to be ours).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimInfo {
    pub class: Option<String>,
    /// The bound PV's name.
    pub volume: Option<String>,
    pub request_bytes: u64,
}

/// One of our PersistentVolumes: where its data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub node: String,
    pub locality: Locality,
}

/// A node agent's last heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentInfo {
    pub free_bytes: u64,
    /// The agent's NFS port (kubelet mounts with `port=`/`mountport=` this).
    pub nfs_port: u16,
    /// Unix seconds after which the agent counts as gone.
    pub expires: i64,
}

/// The cluster as the helper's decisions see it.
#[derive(Debug, Default)]
pub struct Inventory {
    pub classes: HashMap<String, ClassInfo>,
    /// Keyed by `namespace/name`.
    pub claims: HashMap<String, ClaimInfo>,
    /// Keyed by PV name.
    pub volumes: HashMap<String, VolumeInfo>,
    /// Keyed by node name.
    pub agents: HashMap<String, AgentInfo>,
}

impl Inventory {
    /// The live agent on `node` at `now` (unix seconds), if any.
    pub fn agent(&self, node: &str, now: i64) -> Option<&AgentInfo> {
        self.agents.get(node).filter(|a| a.expires >= now)
    }
}

/// The clock decisions compare heartbeat expiries with: unix seconds now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The key claims are stored under.
pub fn claim_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl ClassInfo {
    /// Our view of a class, or `None` when it is not ours. A class with parameters the
    /// provisioner would refuse still counts (locality as written, else preferred): its
    /// claims fail provisioning with an event, the helper need not add to that.
    pub fn from_class(class: &StorageClass, provisioner: &str) -> Option<Self> {
        if class.provisioner != provisioner {
            return None;
        }
        let locality = class
            .parameters
            .as_ref()
            .map(|p| {
                ClassParams::parse(p)
                    .map(|p| p.locality)
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        Some(Self {
            locality,
            wait_for_consumer: class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"),
        })
    }
}

impl ClaimInfo {
    pub fn from_claim(pvc: &PersistentVolumeClaim) -> Self {
        let spec = pvc.spec.as_ref();
        Self {
            class: spec.and_then(|s| s.storage_class_name.clone()),
            volume: spec
                .and_then(|s| s.volume_name.clone())
                .filter(|v| !v.is_empty()),
            request_bytes: crate::provisioner::claims::requested_bytes(pvc).unwrap_or(0),
        }
    }
}

impl VolumeInfo {
    /// Our view of a PV, or `None` when another provisioner made it.
    pub fn from_pv(pv: &PersistentVolume, provisioner: &str) -> Option<Self> {
        let ann = pv.metadata.annotations.as_ref()?;
        if ann.get(PROVISIONED_BY).map(String::as_str) != Some(provisioner) {
            return None;
        }
        let node = ann.get(NODE_KEY)?.clone();
        // PVs made before the locality annotation existed: strict ones carry required
        // node affinity, everything else was made by a preferred class.
        let locality = match ann.get(LOCALITY_KEY).and_then(|l| Locality::parse(l)) {
            Some(l) => l,
            None if pv.spec.as_ref().is_some_and(|s| s.node_affinity.is_some()) => Locality::Strict,
            None => Locality::Preferred,
        };
        Some(Self { node, locality })
    }
}

impl AgentInfo {
    /// A node agent's heartbeat Lease as `(node, info)`, or `None` for other Leases.
    pub fn from_lease(lease: &Lease) -> Option<(String, Self)> {
        let node = lease
            .metadata
            .name
            .as_deref()?
            .strip_prefix(NODE_LEASE_PREFIX)?
            .to_owned();
        let spec = lease.spec.as_ref()?;
        let renewed = spec.renew_time.as_ref()?.0.as_second();
        let ttl = i64::from(spec.lease_duration_seconds.unwrap_or(30));
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_our_pvs_and_classes_are_kept() {
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": {"name": "fast"}, "provisioner": "other.io/x"}))
        .expect("class");
        assert_eq!(ClassInfo::from_class(&class, "localnfs.io/nfs"), None);
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": {"name": "db"}, "provisioner": "localnfs.io/nfs",
            "parameters": {"locality": "strict"},
            "volumeBindingMode": "WaitForFirstConsumer"}))
        .expect("class");
        assert_eq!(
            ClassInfo::from_class(&class, "localnfs.io/nfs"),
            Some(ClassInfo {
                locality: Locality::Strict,
                wait_for_consumer: true
            })
        );
        let pv = |ann: serde_json::Value, affinity: bool| -> PersistentVolume {
            let mut spec = json!({});
            if affinity {
                spec["nodeAffinity"] = json!({"required": {"nodeSelectorTerms": []}});
            }
            serde_json::from_value(
                json!({"metadata": {"name": "pv", "annotations": ann}, "spec": spec}),
            )
            .expect("pv")
        };
        let ours = json!({PROVISIONED_BY: "localnfs.io/nfs", NODE_KEY: "n1"});
        assert_eq!(
            VolumeInfo::from_pv(&pv(ours.clone(), false), "localnfs.io/nfs"),
            Some(VolumeInfo {
                node: "n1".into(),
                locality: Locality::Preferred
            })
        );
        assert_eq!(
            VolumeInfo::from_pv(&pv(ours.clone(), true), "localnfs.io/nfs").map(|v| v.locality),
            Some(Locality::Strict),
            "older strict PVs are known by their node affinity"
        );
        let mut none = ours.clone();
        none[LOCALITY_KEY] = json!("none");
        assert_eq!(
            VolumeInfo::from_pv(&pv(none, true), "localnfs.io/nfs").map(|v| v.locality),
            Some(Locality::None)
        );
        assert_eq!(
            VolumeInfo::from_pv(
                &pv(json!({PROVISIONED_BY: "nfs.csi"}), false),
                "localnfs.io/nfs"
            ),
            None
        );
    }

    #[test]
    fn agent_heartbeats_expire() {
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": "localnfs-node-n1", "annotations": {FREE_BYTES: "1000"}},
            "spec": {"renewTime": "2026-01-01T00:00:00.000000Z", "leaseDurationSeconds": 30}}))
        .expect("lease");
        let (node, info) = AgentInfo::from_lease(&lease).expect("agent lease");
        assert_eq!(node, "n1");
        assert_eq!(info.free_bytes, 1000);
        let mut inv = Inventory::default();
        inv.agents.insert(node, info.clone());
        assert!(inv.agent("n1", info.expires).is_some());
        assert!(inv.agent("n1", info.expires + 1).is_none());
        let other: Lease =
            serde_json::from_value(json!({"metadata": {"name": "localnfs-controller"}}))
                .expect("lease");
        assert_eq!(AgentInfo::from_lease(&other), None);
    }
}
