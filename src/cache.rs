//! Controllers whose caches hold trimmed objects. A kube `Controller` keeps every
//! watched object in memory. API servers with server-side apply (on by default from
//! Kubernetes 1.18, always from 1.22) send `managedFields` with each object: a field
//! tree per writer, and claims and PVs have several (the user, kube-controller-manager,
//! our controller and node agent). Nothing here reads it; it is dropped before the
//! cache, with kubectl's `last-applied-configuration` copy of the whole object.

use std::fmt::Debug;
use std::hash::Hash;

use kube::Resource;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde::de::DeserializeOwned;

/// kubectl's copy of the whole object as last applied.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Removes what no reconciler reads from an object about to be cached.
pub fn trim<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

/// `Controller::new(api, config)`, with trimmed objects in its cache.
pub fn controller<K>(api: Api<K>, config: watcher::Config) -> Controller<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Clone + Eq + Hash + Debug + Unpin,
{
    let (cache, writer) = reflector::store();
    let objects = watcher(api, config)
        .default_backoff()
        .modify(trim)
        .reflect(writer)
        .applied_objects();
    Controller::for_stream(objects, cache)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    use serde_json::json;

    #[test]
    fn trimming_keeps_what_reconcilers_read() {
        let mut pvc: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {
                "name": "data-0", "namespace": "db", "uid": "u1",
                "labels": {"localnfs.io/node": "n1"},
                "annotations": {LAST_APPLIED: "{...}", "localnfs.io/volume-ready": "v"},
                "finalizers": ["kubernetes.io/pvc-protection"],
                "managedFields": [{"manager": "kubectl", "operation": "Apply",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}],
            },
            "spec": {"storageClassName": "localnfs", "accessModes": ["ReadWriteOnce"]},
            "status": {"phase": "Pending"},
        }))
        .expect("claim");
        let before = serde_json::to_value(&pvc).expect("json");
        trim(&mut pvc);
        assert!(pvc.metadata.managed_fields.is_none());
        let ann = pvc.metadata.annotations.as_ref().expect("annotations");
        assert!(!ann.contains_key(LAST_APPLIED));
        assert_eq!(
            ann.get("localnfs.io/volume-ready").map(String::as_str),
            Some("v")
        );
        let after = serde_json::to_value(&pvc).expect("json");
        for kept in ["spec", "status"] {
            assert_eq!(after[kept], before[kept], "{kept} must be untouched");
        }
        for kept in ["labels", "finalizers", "uid", "name", "namespace"] {
            assert_eq!(after["metadata"][kept], before["metadata"][kept], "{kept}");
        }
    }
}
