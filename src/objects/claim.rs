//! What a claim asks for, read the same way by every component.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;

use super::class::quantity_bytes;
use super::keys::{BETA_PROVISIONER, GA_PROVISIONER};
use crate::kubeclient::annotation;

/// The name of the PV provisioned for the claim with uid `pvc_uid` (as kube's
/// external-provisioner names them, so one claim can never get two).
pub fn pv_name(pvc_uid: &str) -> String {
    format!("pvc-{pvc_uid}")
}

/// The size a claim requests, in bytes.
pub fn requested_bytes(pvc: &PersistentVolumeClaim) -> Option<u64> {
    let q = pvc
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")?;
    quantity_bytes(&q.0).ok()
}

/// Whether a claim is for provisioner `me`: its class names `me`, or the control
/// plane annotated it for `me` ([`BETA_PROVISIONER`] up to 1.22, [`GA_PROVISIONER`]
/// from 1.23).
pub fn claimed_by(pvc: &PersistentVolumeClaim, class_provisioner: &str, me: &str) -> bool {
    class_provisioner == me
        || [BETA_PROVISIONER, GA_PROVISIONER]
            .iter()
            .any(|k| annotation(pvc, k) == Some(me))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_annotated_with_either_provisioner_key_are_ours() {
        // Recorded from a newer API server: only the GA key is set.
        let ga: PersistentVolumeClaim = serde_json::from_str(include_str!(
            "../../tests/fixtures/pvc-ga-provisioner-annotation.json"
        ))
        .expect("fixture");
        assert!(claimed_by(&ga, "someone.else/x", "localnfs.io/nfs"));
        let mut beta = ga.clone();
        let ann = beta.metadata.annotations.get_or_insert_default();
        let v = ann.remove(GA_PROVISIONER).expect("annotation");
        ann.insert(BETA_PROVISIONER.into(), v);
        assert!(claimed_by(&beta, "someone.else/x", "localnfs.io/nfs"));
        let mut none = ga.clone();
        none.metadata.annotations = None;
        assert!(!claimed_by(&none, "someone.else/x", "localnfs.io/nfs"));
        assert!(claimed_by(&none, "localnfs.io/nfs", "localnfs.io/nfs"));
    }
}
