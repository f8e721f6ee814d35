//! What the scheduler helper knows about the cluster, kept small: for each of our
//! StorageClasses, claims, PersistentVolumes and node agents only the few fields a
//! decision reads, not the whole object. Filled by watches ([`super::watch`]) in
//! production and directly by tests and benchmarks; no I/O here.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;

use crate::objects::agents::AgentInfo;
use crate::objects::claim::{DataSource, data_source, requested_bytes};
use crate::objects::class::{ClassParams, Locality};
use crate::objects::keys::{LOCALITY_KEY, NODE_KEY, PROVISIONED_BY};

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
    /// The claim (same namespace) whose volume this one clones (its `dataSource`; not
    /// the claim itself, which starts empty): its volume is made on that claim's node.
    pub clone_of: Option<String>,
}

/// One of our PersistentVolumes: where its data lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub node: String,
    pub locality: Locality,
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
    /// The live agent on `node` at `now` ([`crate::objects::agents::observer_now`]),
    /// if any.
    pub fn agent(&self, node: &str, now: i64) -> Option<&AgentInfo> {
        self.agents.get(node).filter(|a| a.expires >= now)
    }
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
            request_bytes: requested_bytes(pvc).unwrap_or(0),
            clone_of: match data_source(pvc) {
                DataSource::Claim(name) if Some(name) != pvc.metadata.name.as_deref() => {
                    Some(name.to_owned())
                }
                _ => None,
            },
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
    fn agents_count_until_their_heartbeat_expires() {
        let info = AgentInfo {
            free_bytes: 1000,
            nfs_port: 2049,
            peer_port: None,
            expires: 100,
            key: None,
        };
        let mut inv = Inventory::default();
        inv.agents.insert("n1".into(), info);
        assert!(inv.agent("n1", 100).is_some());
        assert!(inv.agent("n1", 101).is_none());
        assert!(inv.agent("n2", 0).is_none());
    }
}
