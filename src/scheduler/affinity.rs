//! The webhook's decision: the node affinity a new pod gets so it starts where its data
//! is. Pure: pod + [`PodClaims`] in, a JSON patch and warnings out.
//!
//! - `locality: preferred` volumes: a preferred term per home node, weight 100 when all
//!   of them live on one node, otherwise split by how many live on each (at least 1).
//!   The pod still runs elsewhere (over NFS) when its home cannot take it.
//! - `locality: strict` volumes: a required term for their node, added to every
//!   existing required term (terms are ORed, so adding it to each keeps the pod's own
//!   constraints and adds ours). When strict volumes live on different nodes no node
//!   can satisfy them all: no required term is added (the PVs' own node affinity keeps
//!   the pod Pending, with the scheduler's "volume node affinity conflict" event) and
//!   the API answer carries a warning naming the nodes.
//! - New claims that clone a bound claim (`PodClaims::clones`): a preferred term,
//!   weight 100, for the source volume's node, where the clone costs least (elsewhere it is
//!   streamed from that node's agent). Preferred, not
//!   required: the extender's filter is what keeps the pod there; this steers the pod
//!   when kube-scheduler runs without the extender (a clone claim the webhook's caches
//!   have not seen yet, as a StatefulSet makes it just before the pod, gets nothing).
//! - A pod annotated [`OPT_OUT`]`: "true"` is left alone.
//!
//! Terms already present are not added again, so the patch is idempotent when the API
//! server calls the webhook twice (reinvocation).

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Affinity, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
    PreferredSchedulingTerm,
};
use serde_json::json;

use super::decide::PodClaims;
use crate::objects::class::Locality;
use crate::objects::keys::HOSTNAME_LABEL;

/// Pod annotation: `"true"` skips the webhook's affinity.
pub const OPT_OUT: &str = "localnfs.io/skip-affinity";

/// What the webhook answers for a pod.
#[derive(Debug, Default, PartialEq)]
pub struct Mutation {
    /// JSON patch (empty: leave the pod as it is).
    pub patch: Patch,
    pub warnings: Vec<String>,
}

fn on_node(node: &str) -> NodeSelectorTerm {
    NodeSelectorTerm {
        match_expressions: Some(vec![NodeSelectorRequirement {
            key: HOSTNAME_LABEL.to_owned(),
            operator: "In".to_owned(),
            values: Some(vec![node.to_owned()]),
        }]),
        match_fields: None,
    }
}

/// Computes the mutation for `pod`.
pub fn mutate(pod: &Pod, claims: &PodClaims) -> Mutation {
    let opted_out = crate::kubeclient::annotation(pod, OPT_OUT) == Some("true");
    if opted_out || (claims.homes.is_empty() && claims.clones.is_empty()) {
        return Mutation::default();
    }
    let spec_affinity = pod.spec.as_ref().and_then(|s| s.affinity.as_ref());
    let mut node_affinity = spec_affinity
        .and_then(|a| a.node_affinity.clone())
        .unwrap_or_default();
    let before = node_affinity.clone();
    let mut warnings = Vec::new();

    let strict = claims.strict_nodes();
    match strict.as_slice() {
        [] => {}
        [node] => require(&mut node_affinity, node),
        several => warnings.push(format!(
            "localnfs: this pod's strict volumes live on different nodes ({}); no node can \
             run it until they are on one",
            several.join(", ")
        )),
    }
    let preferred: Vec<_> = claims
        .homes
        .iter()
        .filter(|h| h.locality == Locality::Preferred)
        .collect();
    let total = preferred.len();
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for h in &preferred {
        *counts.entry(h.node.as_str()).or_default() += 1;
    }
    for (node, n) in counts {
        let weight = ((100 * n + total / 2) / total).clamp(1, 100) as i32;
        prefer(&mut node_affinity, node, weight);
    }
    for node in claims.clone_nodes() {
        prefer(&mut node_affinity, node, 100);
    }
    if node_affinity == before {
        return Mutation {
            patch: Patch::default(),
            warnings,
        };
    }
    // "add" on an existing member replaces it (RFC 6902 §4.1), so one operation covers
    // both a pod with and without node affinity.
    let (path, value) = match spec_affinity {
        None => (
            &["spec", "affinity"][..],
            json!(Affinity {
                node_affinity: Some(node_affinity),
                ..Affinity::default()
            }),
        ),
        Some(_) => (
            &["spec", "affinity", "nodeAffinity"][..],
            json!(node_affinity),
        ),
    };
    let add = AddOperation {
        path: PointerBuf::from_tokens(path.iter().copied()),
        value,
    };
    Mutation {
        patch: Patch(vec![PatchOperation::Add(add)]),
        warnings,
    }
}

fn require(aff: &mut NodeAffinity, node: &str) {
    let ours = on_node(node);
    let selector = aff
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(NodeSelector::default);
    if selector.node_selector_terms.is_empty() {
        selector.node_selector_terms.push(ours);
        return;
    }
    let want = ours.match_expressions.unwrap_or_default();
    for term in &mut selector.node_selector_terms {
        let exprs = term.match_expressions.get_or_insert_with(Vec::new);
        if !exprs.contains(&want[0]) {
            exprs.extend(want.iter().cloned());
        }
    }
}

fn prefer(aff: &mut NodeAffinity, node: &str, weight: i32) {
    let terms = aff
        .preferred_during_scheduling_ignored_during_execution
        .get_or_insert_with(Vec::new);
    let ours = on_node(node);
    if !terms.iter().any(|t| t.preference == ours) {
        terms.push(PreferredSchedulingTerm {
            preference: ours,
            weight,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::decide::Home;

    fn claims(homes: &[(&str, Locality)]) -> PodClaims {
        PodClaims {
            homes: homes
                .iter()
                .enumerate()
                .map(|(i, (node, locality))| Home {
                    claim: format!("c{i}"),
                    node: (*node).into(),
                    locality: *locality,
                })
                .collect(),
            ..PodClaims::default()
        }
    }

    fn pod(extra: serde_json::Value) -> Pod {
        let mut p = json!({"metadata": {"name": "p"}, "spec": {"containers": []}});
        if let Some(e) = extra.as_object() {
            for (k, v) in e {
                match k.as_str() {
                    "annotations" => p["metadata"]["annotations"] = v.clone(),
                    _ => p["spec"][k] = v.clone(),
                }
            }
        }
        serde_json::from_value(p).expect("pod")
    }

    /// Applies the mutation and returns the pod's node affinity as JSON.
    fn applied(p: &Pod, m: &Mutation) -> serde_json::Value {
        let mut doc = serde_json::to_value(p).expect("json");
        json_patch::patch(&mut doc, &m.patch).expect("patch applies");
        doc["spec"]["affinity"]["nodeAffinity"].clone()
    }

    fn term(node: &str) -> serde_json::Value {
        json!({"matchExpressions": [{"key": HOSTNAME_LABEL, "operator": "In", "values": [node]}]})
    }

    #[test]
    fn preferred_volumes_prefer_their_node_by_share() {
        let p = pod(json!({}));
        let m = mutate(&p, &claims(&[("a", Locality::Preferred)]));
        assert_eq!(
            applied(&p, &m),
            json!({"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "preference": term("a")}]})
        );
        let m = mutate(
            &p,
            &claims(&[
                ("a", Locality::Preferred),
                ("a", Locality::Preferred),
                ("b", Locality::Preferred),
            ]),
        );
        assert_eq!(
            applied(&p, &m)["preferredDuringSchedulingIgnoredDuringExecution"],
            json!([{"weight": 67, "preference": term("a")}, {"weight": 33, "preference": term("b")}])
        );
    }

    #[test]
    fn strict_volumes_are_required_in_every_existing_term() {
        let p = pod(json!({"affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1"]}]},
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z2"]}]},
            ]}}, "podAntiAffinity": {}}}));
        let m = mutate(&p, &claims(&[("b", Locality::Strict)]));
        let got = applied(&p, &m);
        let terms = &got["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
        for t in terms.as_array().expect("terms") {
            let exprs = t["matchExpressions"].as_array().expect("exprs");
            assert_eq!(exprs.len(), 2, "{t}");
            assert_eq!(exprs[1], term("b")["matchExpressions"][0]);
        }
        assert!(m.warnings.is_empty());
        let doc = serde_json::to_value(&p).expect("json");
        assert!(
            doc["spec"]["affinity"]["podAntiAffinity"].is_object(),
            "other affinity kept"
        );
    }

    #[test]
    fn strict_volumes_on_two_nodes_warn_instead_of_requiring() {
        let p = pod(json!({}));
        let m = mutate(
            &p,
            &claims(&[("a", Locality::Strict), ("b", Locality::Strict)]),
        );
        assert!(m.patch.0.is_empty());
        assert_eq!(m.warnings.len(), 1);
        assert!(m.warnings[0].contains("a, b"), "{}", m.warnings[0]);
    }

    #[test]
    fn nothing_to_do_gives_no_patch() {
        let p = pod(json!({}));
        assert_eq!(mutate(&p, &claims(&[])), Mutation::default(), "no homes");
        let opted = pod(json!({"annotations": {OPT_OUT: "true"}}));
        assert_eq!(
            mutate(&opted, &claims(&[("a", Locality::Strict)])),
            Mutation::default(),
            "opt-out"
        );
    }

    #[test]
    fn a_second_call_adds_nothing() {
        let homes = claims(&[("a", Locality::Preferred), ("b", Locality::Strict)]);
        let p = pod(json!({}));
        let first = mutate(&p, &homes);
        let mut doc = serde_json::to_value(&p).expect("json");
        json_patch::patch(&mut doc, &first.patch).expect("applies");
        let again: Pod = serde_json::from_value(doc).expect("pod");
        assert!(mutate(&again, &homes).patch.0.is_empty());
    }

    #[test]
    fn a_clone_prefers_its_sources_node() {
        let p = pod(json!({}));
        let clones = PodClaims {
            clones: vec![Home {
                claim: "data-1".into(),
                node: "a".into(),
                locality: Locality::Preferred,
            }],
            ..PodClaims::default()
        };
        let m = mutate(&p, &clones);
        assert_eq!(
            applied(&p, &m),
            json!({"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "preference": term("a")}]})
        );
    }
}
