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

/// What a claim's `dataSource` (or `dataSourceRef`, its newer twin) asks it to start
/// with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource<'a> {
    /// Nothing: an empty volume.
    Empty,
    /// A copy of the claim of this name, in the claim's own namespace (the only
    /// namespace `dataSource` can name).
    Claim(&'a str),
    /// Something localnfs cannot start a volume from; why.
    Unsupported(String),
}

const CLAIM_KIND: &str = "PersistentVolumeClaim";

/// Reads a claim's `dataSource` and `dataSourceRef` (API servers from 1.24 fill both
/// with the same reference; a `dataSourceRef` may name another namespace from 1.26).
pub fn data_source(pvc: &PersistentVolumeClaim) -> DataSource<'_> {
    let Some(spec) = pvc.spec.as_ref() else {
        return DataSource::Empty;
    };
    let core = |group: Option<&str>| group.is_none_or(str::is_empty);
    let own_ns = pvc.metadata.namespace.as_deref();
    let from_ref = spec.data_source_ref.as_ref().map(|r| {
        let same_ns = r.namespace.as_deref().is_none_or(|n| Some(n) == own_ns);
        (
            r.kind.as_str(),
            r.api_group.as_deref(),
            r.name.as_str(),
            same_ns,
        )
    });
    let from_source = spec.data_source.as_ref().map(|s| {
        (
            s.kind.as_str(),
            s.api_group.as_deref(),
            s.name.as_str(),
            true,
        )
    });
    let (kind, group, name, same_ns) = match (from_source, from_ref) {
        (None, None) => return DataSource::Empty,
        (Some(a), Some(b)) if (a.0, a.1, a.2) != (b.0, b.1, b.2) => {
            return DataSource::Unsupported(format!(
                "dataSource ({} {}) and dataSourceRef ({} {}) differ",
                a.0, a.2, b.0, b.2
            ));
        }
        (_, Some(r)) | (Some(r), None) => r,
    };
    if kind != CLAIM_KIND || !core(group) {
        let kind = match group {
            Some(g) if !g.is_empty() => format!("{kind}.{g}"),
            _ => kind.to_owned(),
        };
        return DataSource::Unsupported(format!(
            "dataSource of kind {kind} is not supported: localnfs clones claims (kind {CLAIM_KIND}) only"
        ));
    }
    if !same_ns {
        return DataSource::Unsupported(
            "dataSourceRef names a claim in another namespace: localnfs clones claims of the claim's own namespace only"
                .to_owned(),
        );
    }
    DataSource::Claim(name)
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

    fn with_spec(spec: serde_json::Value) -> PersistentVolumeClaim {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "data-1", "namespace": "db"}, "spec": spec,
        }))
        .expect("claim")
    }

    #[test]
    fn only_a_claim_of_the_same_namespace_is_a_data_source() {
        let src = serde_json::json!({"kind": "PersistentVolumeClaim", "name": "data-0"});
        let mut ref_other_ns = src.clone();
        ref_other_ns["namespace"] = "other".into();
        let mut ref_same_ns = src.clone();
        ref_same_ns["namespace"] = "db".into();
        let snap = serde_json::json!({"kind": "VolumeSnapshot", "apiGroup": "snapshot.storage.k8s.io", "name": "s"});
        let cases = [
            (serde_json::json!({}), "Empty"),
            (serde_json::json!({"dataSource": src}), "Claim"),
            (serde_json::json!({"dataSourceRef": src}), "Claim"),
            (
                serde_json::json!({"dataSource": src, "dataSourceRef": ref_same_ns}),
                "Claim",
            ),
            (
                serde_json::json!({"dataSource": src, "dataSourceRef": ref_other_ns}),
                "another namespace",
            ),
            (
                serde_json::json!({"dataSource": snap}),
                "VolumeSnapshot.snapshot.storage.k8s.io is not supported",
            ),
            (
                serde_json::json!({"dataSource": src, "dataSourceRef": {"kind": "PersistentVolumeClaim", "name": "x"}}),
                "differ",
            ),
        ];
        for (spec, want) in cases {
            let pvc = with_spec(spec.clone());
            let got = data_source(&pvc);
            let text = match &got {
                DataSource::Empty => "Empty".to_owned(),
                DataSource::Claim(name) => {
                    assert_eq!(*name, "data-0");
                    "Claim".to_owned()
                }
                DataSource::Unsupported(why) => why.clone(),
            };
            assert!(text.contains(want), "{spec}: {got:?}");
        }
    }

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
