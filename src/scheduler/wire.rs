//! The helper's wire formats, translated to and from [`super::decide`] and
//! [`super::affinity`] and nothing more:
//!
//! - kube-scheduler extender calls (`k8s.io/kube-scheduler/extender/v1`): the Go types
//!   carry no JSON tags, so fields are Go names (`Pod`, `Nodes`, `NodeNames`,
//!   `FailedNodes`, `Error`, `Host`, `Score`). A node-cache-capable extender gets
//!   `NodeNames`; otherwise a full `NodeList` arrives and is answered filtered.
//! - admission.k8s.io/v1 `AdmissionReview` for the mutating webhook.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use serde::{Deserialize, Serialize};

use super::affinity;
use super::decide::{self, PodClaims};
use super::inventory::Inventory;

/// `ExtenderArgs`.
#[derive(Debug, Deserialize)]
pub struct ExtenderArgs {
    #[serde(rename = "Pod", alias = "pod")]
    pub pod: Pod,
    #[serde(rename = "Nodes", alias = "nodes", default)]
    pub nodes: Option<NodeList>,
    #[serde(rename = "NodeNames", alias = "nodenames", default)]
    pub node_names: Option<Vec<String>>,
}

/// A `NodeList` kept as JSON: the extender only reads names and hands back the items
/// it keeps, unchanged.
#[derive(Debug, Deserialize, Serialize)]
pub struct NodeList {
    #[serde(default)]
    pub items: Vec<serde_json::Value>,
    #[serde(flatten)]
    pub rest: serde_json::Map<String, serde_json::Value>,
}

/// `ExtenderFilterResult`.
#[derive(Debug, Default, Serialize)]
pub struct FilterResult {
    #[serde(rename = "Nodes", skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeList>,
    #[serde(rename = "NodeNames", skip_serializing_if = "Option::is_none")]
    pub node_names: Option<Vec<String>>,
    #[serde(rename = "FailedNodes")]
    pub failed_nodes: BTreeMap<String, String>,
    #[serde(rename = "Error")]
    pub error: String,
}

/// One `HostPriority`.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostPriority {
    #[serde(rename = "Host")]
    pub host: String,
    #[serde(rename = "Score")]
    pub score: i64,
}

fn node_name(item: &serde_json::Value) -> &str {
    item["metadata"]["name"].as_str().unwrap_or_default()
}

impl ExtenderArgs {
    fn names(&self) -> Vec<String> {
        match (&self.node_names, &self.nodes) {
            (Some(names), _) => names.clone(),
            (None, Some(list)) => list.items.iter().map(|n| node_name(n).to_owned()).collect(),
            (None, None) => Vec::new(),
        }
    }

    fn claims(&self, inv: &Inventory) -> PodClaims {
        decide::pod_claims(&self.pod, inv)
    }
}

/// Answers a filter call.
pub fn filter(args: ExtenderArgs, inv: &Inventory, now: i64) -> FilterResult {
    let claims = args.claims(inv);
    let names = args.names();
    let decided = decide::filter(&claims, &names, inv, now);
    let mut out = FilterResult {
        failed_nodes: decided.failed,
        ..FilterResult::default()
    };
    match args.nodes {
        Some(mut list) if args.node_names.is_none() => {
            list.items
                .retain(|n| !out.failed_nodes.contains_key(node_name(n)));
            out.nodes = Some(list);
        }
        _ => out.node_names = Some(decided.passed),
    }
    out
}

/// Answers a prioritize call.
pub fn prioritize(args: ExtenderArgs, inv: &Inventory, now: i64) -> Vec<HostPriority> {
    let claims = args.claims(inv);
    let names = args.names();
    let scores = decide::prioritize(&claims, &names, inv, now);
    names
        .into_iter()
        .zip(scores)
        .map(|(host, score)| HostPriority { host, score })
        .collect()
}

/// Answers an AdmissionReview for a pod. Anything that is not a pod CREATE is allowed
/// unchanged; a review we cannot read is answered as invalid (the API server then
/// applies the webhook's failurePolicy).
///
/// `claims` looks up the pod's claims (in the helper: its watch caches, under their
/// lock). It is called only for a pod that names a claim: every other pod of the
/// cluster (the webhook sees every pod CREATE) is answered from its own body, with
/// no lookup, no lock and no API call. A pod whose claims are all of other classes is
/// answered from the caches too (they hold every claim, and only our PVs): nothing
/// here ever asks the API server.
pub fn admit(
    review: AdmissionReview<Pod>,
    claims: impl FnOnce(&Pod) -> PodClaims,
) -> AdmissionReview<DynamicObject> {
    let req: AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return AdmissionResponse::invalid(e.to_string()).into_review(),
    };
    let resp = AdmissionResponse::from(&req);
    let Some(mut pod) = req.object else {
        return resp.into_review();
    };
    // The object of a CREATE may lack its namespace; the request always has it.
    if pod.metadata.namespace.is_none() {
        pod.metadata.namespace = req.namespace.clone();
    }
    let found = if names_claims(&pod) {
        claims(&pod)
    } else {
        PodClaims::default()
    };
    let mutation = affinity::mutate(&pod, &found);
    let mut resp = resp;
    if !mutation.warnings.is_empty() {
        resp.warnings = Some(mutation.warnings);
    }
    if mutation.patch.0.is_empty() {
        return resp.into_review();
    }
    match resp.clone().with_patch(mutation.patch) {
        Ok(with_patch) => with_patch.into_review(),
        // Our own patch failing to serialise is a bug; let the pod through as it is.
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the affinity patch");
            resp.into_review()
        }
    }
}

/// Whether the pod has a `persistentVolumeClaim` volume.
pub fn names_claims(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .is_some_and(|v| v.iter().any(|v| v.persistent_volume_claim.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::class::Locality;
    use crate::scheduler::inventory::{ClaimInfo, VolumeInfo, claim_key};
    use serde_json::json;

    fn inventory() -> Inventory {
        let mut inv = Inventory::default();
        inv.claims.insert(
            claim_key("db", "data-0"),
            ClaimInfo {
                class: Some("localnfs".into()),
                volume: Some("pv-0".into()),
                request_bytes: 1,
                clone_of: None,
            },
        );
        inv.volumes.insert(
            "pv-0".into(),
            VolumeInfo {
                node: "n2".into(),
                locality: Locality::Strict,
            },
        );
        inv
    }

    const POD: &str = r#"{"metadata": {"name": "db-0", "namespace": "db"},
        "spec": {"containers": [], "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": "data-0"}}]}}"#;

    #[test]
    fn filter_answers_in_the_shape_it_was_asked() {
        let inv = inventory();
        let by_names: ExtenderArgs =
            serde_json::from_str(&format!(r#"{{"Pod": {POD}, "NodeNames": ["n1", "n2"]}}"#))
                .expect("args");
        let out = serde_json::to_value(filter(by_names, &inv, 0)).expect("json");
        assert_eq!(out["NodeNames"], json!(["n2"]));
        assert!(
            out["FailedNodes"]["n1"]
                .as_str()
                .expect("reason")
                .contains("strict")
        );
        assert_eq!(out["Error"], "");
        assert!(out.get("Nodes").is_none());

        let by_list: ExtenderArgs = serde_json::from_str(&format!(
            r#"{{"Pod": {POD}, "Nodes": {{"kind": "NodeList", "items": [
                {{"metadata": {{"name": "n1"}}}}, {{"metadata": {{"name": "n2"}}, "spec": {{}}}}]}}}}"#
        ))
        .expect("args");
        let out = serde_json::to_value(filter(by_list, &inv, 0)).expect("json");
        assert_eq!(
            out["Nodes"],
            json!({"kind": "NodeList", "items": [{"metadata": {"name": "n2"}, "spec": {}}]})
        );
    }

    #[test]
    fn prioritize_answers_host_and_score() {
        let args: ExtenderArgs =
            serde_json::from_str(&format!(r#"{{"Pod": {POD}, "NodeNames": ["n1", "n2"]}}"#))
                .expect("args");
        let out = serde_json::to_value(prioritize(args, &inventory(), 0)).expect("json");
        assert_eq!(
            out,
            json!([{"Host": "n1", "Score": 0}, {"Host": "n2", "Score": 10}])
        );
    }

    #[test]
    fn admission_patches_pods_and_uses_the_request_namespace() {
        // Recorded shape of an apiserver v1 review; the pod object has no namespace.
        let review: AdmissionReview<Pod> = serde_json::from_value(json!({
            "kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
            "request": {
                "uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "name": "db-0", "namespace": "db", "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:statefulset-controller"},
                "object": {"metadata": {"name": "db-0"}, "spec": {"containers": [], "volumes": [
                    {"name": "data", "persistentVolumeClaim": {"claimName": "data-0"}}]}},
                "dryRun": false,
            }
        }))
        .expect("review");
        let out = serde_json::to_value(admit(review, |pod| decide::pod_claims(pod, &inventory())))
            .expect("json");
        let resp = &out["response"];
        assert_eq!(resp["uid"], "u-1");
        assert_eq!(resp["allowed"], true);
        assert_eq!(resp["patchType"], "JSONPatch");
        // kube-core sends the patch as a byte array, which the API server accepts.
        let bytes: Vec<u8> = serde_json::from_value(resp["patch"].clone()).expect("patch bytes");
        let patch: serde_json::Value = serde_json::from_slice(&bytes).expect("patch json");
        assert_eq!(patch[0]["path"], "/spec/affinity");
        assert_eq!(
            patch[0]["value"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
                [0]["matchExpressions"][0]["values"],
            json!(["n2"])
        );
    }

    fn review(volumes: serde_json::Value) -> AdmissionReview<Pod> {
        serde_json::from_value(json!({
            "kind": "AdmissionReview", "apiVersion": "admission.k8s.io/v1",
            "request": {
                "uid": "u-2", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "name": "web-0", "namespace": "db", "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": {"metadata": {"name": "web-0"}, "spec": {"containers": [], "volumes": volumes}},
            }
        }))
        .expect("review")
    }

    #[test]
    fn a_pod_naming_no_claim_is_admitted_unchanged_without_any_lookup() {
        for volumes in [
            json!(null),
            json!([]),
            json!([{"name": "cache", "emptyDir": {}}, {"name": "cfg", "configMap": {"name": "c"}}]),
        ] {
            let out = admit(review(volumes.clone()), |_| {
                panic!("a pod without claims looked up claims: {volumes}")
            });
            let resp = serde_json::to_value(out).expect("json")["response"].clone();
            assert_eq!(resp["allowed"], true, "{volumes}");
            assert!(resp.get("patch").is_none(), "{volumes}: {resp}");
        }
    }

    #[test]
    fn a_pod_whose_claims_are_of_other_classes_is_admitted_unchanged() {
        let mut inv = inventory();
        inv.claims.insert(
            claim_key("db", "logs"),
            ClaimInfo {
                class: Some("standard".into()),
                volume: Some("pv-standard".into()),
                request_bytes: 1,
                clone_of: None,
            },
        );
        let volumes = json!([
            {"name": "logs", "persistentVolumeClaim": {"claimName": "logs"}},
            {"name": "unknown", "persistentVolumeClaim": {"claimName": "not-in-any-cache"}},
        ]);
        let out = admit(review(volumes), |pod| decide::pod_claims(pod, &inv));
        let resp = serde_json::to_value(out).expect("json")["response"].clone();
        assert_eq!(resp["allowed"], true);
        assert!(resp.get("patch").is_none(), "{resp}");
    }
}
