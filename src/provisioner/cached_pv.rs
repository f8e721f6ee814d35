//! A PV as the controller's watch cache keeps it: only the parts of the spec a
//! localnfs PV has (`pv::build_pv` writes no others), decoded straight from the watch.
//!
//! k8s-openapi's `PersistentVolumeSpec` holds every in-tree volume source inline, so
//! each cached `PersistentVolume` took 3,472 bytes before any of its strings, almost
//! all of it empty fields: 35 MB of the controller's memory at 10,000 PVs, the largest
//! single holder in a heap profile of the leader (bench/README.md, scale). This one is
//! a quarter of that. The reconcilers still read `PersistentVolume`s:
//! [`CachedPv::to_pv`] builds one when a PV is read from the cache, which for a PV
//! this controller made is the PV as the API server has it. A PV that carries our
//! node label but was made by someone else with another volume source reads as one
//! with no source at all; the controller never acts on a PV's source.

use std::borrow::Cow;

use k8s_openapi::api::core::v1::{
    NFSVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeSpec,
    PersistentVolumeStatus, VolumeNodeAffinity,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::{Deserialize, Serialize};

/// See the module doc.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct CachedPv {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<CachedPvSpec>,
    pub status: Option<PersistentVolumeStatus>,
}

/// The fields of `PersistentVolumeSpec` a localnfs PV sets.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedPvSpec {
    pub access_modes: Option<Vec<String>>,
    pub capacity: Option<std::collections::BTreeMap<String, Quantity>>,
    pub claim_ref: Option<ObjectReference>,
    pub mount_options: Option<Vec<String>>,
    pub nfs: Option<NFSVolumeSource>,
    pub node_affinity: Option<VolumeNodeAffinity>,
    pub persistent_volume_reclaim_policy: Option<String>,
    pub storage_class_name: Option<String>,
    pub volume_mode: Option<String>,
}

impl CachedPv {
    /// The PV this copy stands for (see the module doc for what it leaves out).
    pub fn to_pv(&self) -> PersistentVolume {
        PersistentVolume {
            metadata: self.metadata.clone(),
            spec: self.spec.as_ref().map(|s| PersistentVolumeSpec {
                access_modes: s.access_modes.clone(),
                capacity: s.capacity.clone(),
                claim_ref: s.claim_ref.clone(),
                mount_options: s.mount_options.clone(),
                nfs: s.nfs.clone(),
                node_affinity: s.node_affinity.clone(),
                persistent_volume_reclaim_policy: s.persistent_volume_reclaim_policy.clone(),
                storage_class_name: s.storage_class_name.clone(),
                volume_mode: s.volume_mode.clone(),
                ..Default::default()
            }),
            status: self.status.clone(),
        }
    }
}

impl Resource for CachedPv {
    type DynamicType = ();
    type Scope = k8s_openapi::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        <PersistentVolume as Resource>::kind(&())
    }
    fn group(_: &()) -> Cow<'_, str> {
        <PersistentVolume as Resource>::group(&())
    }
    fn version(_: &()) -> Cow<'_, str> {
        <PersistentVolume as Resource>::version(&())
    }
    fn plural(_: &()) -> Cow<'_, str> {
        <PersistentVolume as Resource>::plural(&())
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_localnfs_pv_reads_back_whole_from_its_cached_copy() {
        // Every field `pv::build_pv` sets, as the API server returns them.
        let pv = json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {
                "name": "pvc-u1", "uid": "p1", "resourceVersion": "42",
                "labels": {"localnfs.io/node": "n1"},
                "annotations": {"pv.kubernetes.io/provisioned-by": "localnfs.io/nfs",
                                "localnfs.io/volume": "pvc-u1"},
                "finalizers": ["localnfs.io/volume", "kubernetes.io/pv-protection"],
                "deletionTimestamp": "2026-12-07T00:00:00Z",
            },
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "capacity": {"storage": "4Mi"},
                "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                             "name": "data-0", "namespace": "db", "uid": "u1",
                             "resourceVersion": "40"},
                "mountOptions": ["nfsvers=3", "hard"],
                "nfs": {"server": "10.0.0.1", "path": "/pvc-u1"},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": ["n1"]}]}]}},
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": "localnfs",
                "volumeMode": "Filesystem",
            },
            "status": {"phase": "Released", "message": "m", "reason": "r"},
        });
        let whole: PersistentVolume = serde_json::from_value(pv.clone()).expect("pv");
        let cached: CachedPv = serde_json::from_value(pv).expect("cached");
        assert_eq!(cached.to_pv(), whole);
        assert!(
            std::mem::size_of::<CachedPv>() * 3 < std::mem::size_of::<PersistentVolume>(),
            "{} vs {} bytes",
            std::mem::size_of::<CachedPv>(),
            std::mem::size_of::<PersistentVolume>()
        );
    }

    #[test]
    fn every_pv_the_controller_builds_reads_back_whole() {
        use crate::objects::class::{ClassParams, Locality};
        for locality in [Locality::Preferred, Locality::Strict, Locality::None] {
            let params = ClassParams {
                locality,
                ..ClassParams::default()
            };
            let extra = json!({"mountOptions": ["nfsvers=3", "soft"], "reclaimPolicy": "Retain"});
            for class in [json!({}), extra] {
                let built = crate::provisioner::pv::tests::pv_for(&params, class);
                let json = serde_json::to_value(&built).expect("json");
                let cached: CachedPv = serde_json::from_value(json).expect("cached");
                assert_eq!(cached.to_pv(), built, "{locality:?}");
            }
        }
    }

    #[test]
    fn another_volume_source_reads_as_none() {
        let cached: CachedPv = serde_json::from_value(json!({
            "metadata": {"name": "foreign"},
            "spec": {"hostPath": {"path": "/etc"}, "capacity": {"storage": "1Gi"}},
        }))
        .expect("cached");
        let pv = cached.to_pv();
        let spec = pv.spec.expect("spec");
        assert!(spec.host_path.is_none() && spec.nfs.is_none());
        assert_eq!(spec.capacity.expect("capacity")["storage"].0, "1Gi");
    }
}
