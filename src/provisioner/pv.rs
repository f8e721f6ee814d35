//! Pure decisions of the provisioner: is a claim something we can provision, which
//! node gets it, and what its PersistentVolume looks like. No I/O; table-tested.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, TopologySelectorTerm};
use k8s_openapi::api::storage::v1::StorageClass;
use serde_json::json;

use crate::objects::claim::{DataSource, data_source, pv_name};
use crate::objects::class::{ClassParams, Locality, quantity_bytes};
use crate::objects::keys::{
    HOSTNAME_LABEL, LOCALITY_KEY, NODE_KEY, ON_DELETE_KEY, PROVISIONED_BY, PUBLISHED_NODES,
    PV_FINALIZER, VOLUME_KEY,
};

/// Mount options when the class gives none: NFSv3 over TCP on one port, no lock
/// manager, so kubelet needs no rpcbind.
pub fn default_mount_options(port: u16) -> Vec<String> {
    vec![
        "nfsvers=3".into(),
        "proto=tcp".into(),
        format!("port={port}"),
        format!("mountport={port}"),
        "nolock".into(),
        "hard".into(),
    ]
}

const ACCESS_MODES: [&str; 4] = [
    "ReadWriteOnce",
    "ReadOnlyMany",
    "ReadWriteMany",
    "ReadWriteOncePod",
];

/// What a valid claim asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRequest {
    pub size_bytes: u64,
    /// The request as the user wrote it, used for the PV's capacity.
    pub size: String,
    pub access_modes: Vec<String>,
}

/// Checks a claim is one we can provision; the error is the event message.
pub fn validate_claim(pvc: &PersistentVolumeClaim) -> Result<ClaimRequest, String> {
    let spec = pvc.spec.as_ref().ok_or("claim has no spec")?;
    if spec.volume_mode.as_deref() == Some("Block") {
        return Err("volumeMode Block is not supported: localnfs provides filesystems".into());
    }
    if spec.selector.is_some() {
        return Err("claims with a selector are not supported by dynamic provisioning".into());
    }
    if let DataSource::Unsupported(why) = data_source(pvc) {
        return Err(why);
    }
    let access_modes = spec.access_modes.clone().unwrap_or_default();
    if access_modes.is_empty() {
        return Err("claim has no accessModes".into());
    }
    if let Some(bad) = access_modes
        .iter()
        .find(|m| !ACCESS_MODES.contains(&m.as_str()))
    {
        return Err(format!("unknown access mode {bad:?}"));
    }
    let size = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .ok_or("claim requests no storage size")?
        .0
        .clone();
    let size_bytes = quantity_bytes(&size)?;
    Ok(ClaimRequest {
        size_bytes,
        size,
        access_modes,
    })
}

/// A node's free space as its agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRoom {
    pub node: String,
    pub free_bytes: u64,
}

/// Whether a claim still needs a volume from us (no event when not): not Bound, and
/// not pointed at a PV by its author (`spec.volumeName`: static binding, or a claim
/// whose PV was lost). kube's external-provisioner leaves such claims alone too.
pub fn needs_volume(pvc: &PersistentVolumeClaim) -> bool {
    let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let named = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .is_some_and(|v| !v.is_empty());
    !bound && !named
}

/// Whether a node with `labels` lies inside a class's `allowedTopologies`, read as
/// kube's volume binder reads them: no terms allow every node; terms are ORed, the
/// expressions of a term ANDed, and a term without expressions matches nothing.
pub fn topology_allows(terms: &[TopologySelectorTerm], labels: &BTreeMap<String, String>) -> bool {
    terms.is_empty()
        || terms.iter().any(|t| {
            let exprs = t.match_label_expressions.as_deref().unwrap_or_default();
            !exprs.is_empty()
                && exprs
                    .iter()
                    .all(|e| labels.get(&e.key).is_some_and(|v| e.values.contains(v)))
        })
}

/// Picks the node for a new volume: the scheduler's choice under WaitForFirstConsumer
/// (it must be allowed, have an agent and room), otherwise the allowed live node with
/// the most free space that fits (ties: by name, so the choice is stable). `allowed`:
/// the nodes the class's `allowedTopologies` admit (`None`: every node).
pub fn choose_node(
    selected: Option<&str>,
    nodes: &[NodeRoom],
    size: u64,
    allowed: Option<&BTreeSet<String>>,
) -> Result<String, String> {
    let admits = |n: &str| allowed.is_none_or(|a| a.contains(n));
    if let Some(sel) = selected {
        if !admits(sel) {
            return Err(format!(
                "node {sel} is outside the StorageClass's allowedTopologies"
            ));
        }
        let room = nodes
            .iter()
            .find(|n| n.node == sel)
            .ok_or_else(|| format!("node {sel} has no running localnfs node agent"))?;
        if room.free_bytes < size {
            return Err(format!(
                "node {sel} has {} bytes free, the claim needs {size}",
                room.free_bytes
            ));
        }
        return Ok(sel.to_owned());
    }
    let candidates: Vec<&NodeRoom> = nodes.iter().filter(|n| admits(&n.node)).collect();
    candidates
        .iter()
        .filter(|n| n.free_bytes >= size)
        .max_by(|a, b| a.free_bytes.cmp(&b.free_bytes).then(b.node.cmp(&a.node)))
        .map(|n| n.node.clone())
        .ok_or_else(|| match candidates.iter().map(|n| n.free_bytes).max() {
            None if allowed.is_some() => {
                "no node in the StorageClass's allowedTopologies runs a localnfs node agent"
                    .to_owned()
            }
            None => "no node runs a localnfs node agent".to_owned(),
            Some(max) => format!("no node has room for {size} bytes (the most free is {max})"),
        })
}

/// Whether to stop waiting for a node's agent: its heartbeat lease (`expires`, on the
/// observer's own clock, as `now` is; `None`: it has none) ran out more than `grace`
/// seconds before `now`.
pub fn agent_given_up(expires: Option<i64>, now: i64, grace: i64) -> bool {
    expires.is_none_or(|e| now > e.saturating_add(grace))
}

/// Everything [`build_pv`] needs.
pub struct PvInput<'a> {
    pub pvc: &'a PersistentVolumeClaim,
    pub class: &'a StorageClass,
    pub params: &'a ClassParams,
    pub request: &'a ClaimRequest,
    pub provisioner: &'a str,
    pub node: &'a str,
    pub node_ip: &'a str,
    pub nfs_port: u16,
    pub volume: &'a str,
}

/// The PersistentVolume for a provisioned claim: pre-bound to it, pointing at the
/// volume's directory on its node over NFS.
pub fn build_pv(i: &PvInput) -> Result<PersistentVolume, String> {
    let meta = &i.pvc.metadata;
    let (ns, name, uid) = (
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or_default(),
        meta.uid.as_deref().unwrap_or_default(),
    );
    let mount_options = i
        .class
        .mount_options
        .clone()
        .unwrap_or_else(|| default_mount_options(i.nfs_port));
    let on_delete = i.params.on_delete.as_str();
    let mut spec = json!({
        "capacity": {"storage": i.request.size},
        "accessModes": i.request.access_modes,
        "persistentVolumeReclaimPolicy": i.class.reclaim_policy.as_deref().unwrap_or("Delete"),
        "storageClassName": i.class.metadata.name,
        "mountOptions": mount_options,
        "volumeMode": "Filesystem",
        "nfs": {"server": i.node_ip, "path": format!("/{}", i.volume)},
        "claimRef": {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "namespace": ns, "name": name, "uid": uid,
        },
    });
    if i.params.locality == Locality::Strict {
        spec["nodeAffinity"] = json!({"required": {"nodeSelectorTerms": [{
            "matchExpressions": [{"key": HOSTNAME_LABEL, "operator": "In", "values": [i.node]}],
        }]}});
    }
    let annotations: BTreeMap<&str, &str> = [
        (PROVISIONED_BY, i.provisioner),
        (NODE_KEY, i.node),
        (VOLUME_KEY, i.volume),
        (ON_DELETE_KEY, on_delete),
        (LOCALITY_KEY, i.params.locality.as_str()),
        // Exact from the start: no node may mount it until a pod there uses it.
        (PUBLISHED_NODES, "[]"),
    ]
    .into();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": pv_name(uid),
            "labels": {NODE_KEY: i.node},
            "annotations": annotations,
            "finalizers": [PV_FINALIZER],
        },
        "spec": spec,
    }))
    .map_err(|e| format!("cannot build PersistentVolume: {e}"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn claim(extra: serde_json::Value) -> PersistentVolumeClaim {
        let mut spec = json!({
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}},
            "storageClassName": "localnfs",
        });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        serde_json::from_value(json!({
            "metadata": {"name": "data-db-0", "namespace": "prod", "uid": "u-1"},
            "spec": spec,
        }))
        .expect("claim")
    }

    fn class(extra: serde_json::Value) -> StorageClass {
        let mut c = json!({"metadata": {"name": "localnfs"}, "provisioner": "localnfs.io/nfs"});
        if let (Some(s), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        serde_json::from_value(c).expect("class")
    }

    #[test]
    fn valid_claims_give_size_and_modes() {
        let r = validate_claim(&claim(json!({}))).expect("valid");
        assert_eq!(r.size_bytes, 1 << 30);
        assert_eq!(r.access_modes, vec!["ReadWriteOnce"]);
        let clone = json!({"dataSource": {"kind": "PersistentVolumeClaim", "name": "x"}});
        assert_eq!(
            validate_claim(&claim(clone)),
            Ok(r),
            "clones are provisioned"
        );
    }

    #[test]
    fn unsupported_claims_say_why() {
        let cases = [
            (json!({"volumeMode": "Block"}), "Block"),
            (json!({"selector": {"matchLabels": {"a": "b"}}}), "selector"),
            (
                json!({"dataSource": {"kind": "VolumeSnapshot", "apiGroup": "snapshot.storage.k8s.io", "name": "x"}}),
                "dataSource of kind VolumeSnapshot",
            ),
            (
                json!({"resources": {"requests": {"storage": "0"}}}),
                "greater than zero",
            ),
            (json!({"resources": {"requests": {}}}), "no storage size"),
            (
                json!({"accessModes": ["ReadWriteSometimes"]}),
                "unknown access mode",
            ),
        ];
        for (extra, want) in cases {
            let err = validate_claim(&claim(extra.clone())).expect_err("invalid");
            assert!(err.contains(want), "{extra}: {err}");
        }
    }

    /// Node rooms from `(node, free bytes)` pairs.
    pub(crate) fn rooms(v: &[(&str, u64)]) -> Vec<NodeRoom> {
        v.iter()
            .map(|(n, f)| NodeRoom {
                node: n.to_string(),
                free_bytes: *f,
            })
            .collect()
    }

    #[test]
    fn node_choice_follows_the_scheduler_or_the_most_free_space() {
        let nodes = rooms(&[("a", 100), ("b", 300), ("c", 300), ("d", 50)]);
        assert_eq!(
            choose_node(None, &nodes, 10, None),
            Ok("b".into()),
            "ties go to the first name"
        );
        assert_eq!(choose_node(Some("d"), &nodes, 10, None), Ok("d".into()));
        assert!(
            choose_node(Some("d"), &nodes, 60, None)
                .expect_err("full")
                .contains("50 bytes free")
        );
        assert!(
            choose_node(Some("x"), &nodes, 1, None)
                .expect_err("no agent")
                .contains("no running")
        );
        assert!(
            choose_node(None, &nodes, 301, None)
                .expect_err("none fits")
                .contains("most free is 300")
        );
        assert!(
            choose_node(None, &[], 1, None)
                .expect_err("empty")
                .contains("no node runs")
        );
    }

    #[test]
    fn allowed_topologies_limit_where_volumes_go() {
        let nodes = rooms(&[("a", 100), ("b", 300), ("c", 300)]);
        let a_only: BTreeSet<String> = ["a".to_owned()].into();
        let none = BTreeSet::new();
        assert_eq!(
            choose_node(None, &nodes, 10, Some(&a_only)),
            Ok("a".into()),
            "less room, but the only allowed node"
        );
        assert!(
            choose_node(None, &nodes, 200, Some(&a_only))
                .expect_err("allowed node too small")
                .contains("most free is 100")
        );
        assert!(
            choose_node(None, &nodes, 10, Some(&none))
                .expect_err("nothing allowed")
                .contains("allowedTopologies")
        );
        assert!(
            choose_node(Some("b"), &nodes, 10, Some(&a_only))
                .expect_err("selected outside")
                .contains("node b is outside")
        );
    }

    #[test]
    fn an_agent_is_given_up_only_past_its_lease_and_the_grace() {
        let cases = [
            (Some(100), 90, 60, false),
            (Some(100), 160, 60, false),
            (Some(100), 161, 60, true),
            (Some(100), 101, 0, true),
            (None, 0, 60, true),
            (Some(i64::MAX), i64::MAX, 60, false),
        ];
        for (expires, now, grace, want) in cases {
            assert_eq!(
                agent_given_up(expires, now, grace),
                want,
                "{expires:?} {now} {grace}"
            );
        }
    }

    #[test]
    fn topology_terms_are_ored_and_their_expressions_anded() {
        let terms: Vec<TopologySelectorTerm> = serde_json::from_value(json!([
            {"matchLabelExpressions": [
                {"key": "zone", "values": ["z1", "z2"]},
                {"key": "disk", "values": ["ssd"]},
            ]},
            {"matchLabelExpressions": [{"key": "kubernetes.io/hostname", "values": ["n9"]}]},
        ]))
        .expect("terms");
        let labels = |v: &[(&str, &str)]| -> BTreeMap<String, String> {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let cases = [
            (labels(&[("zone", "z2"), ("disk", "ssd")]), true),
            (labels(&[("zone", "z2")]), false),
            (labels(&[("zone", "z3"), ("disk", "ssd")]), false),
            (labels(&[("kubernetes.io/hostname", "n9")]), true),
            (labels(&[]), false),
        ];
        for (l, want) in cases {
            assert_eq!(topology_allows(&terms, &l), want, "{l:?}");
        }
        assert!(topology_allows(&[], &labels(&[])), "no terms: anywhere");
        let empty_term: Vec<TopologySelectorTerm> =
            serde_json::from_value(json!([{}])).expect("terms");
        assert!(!topology_allows(&empty_term, &labels(&[("a", "b")])));
    }

    #[test]
    fn claims_already_bound_or_naming_a_volume_are_left_alone() {
        let mut bound = claim(json!({}));
        bound.status = serde_json::from_value(json!({"phase": "Bound"})).expect("status");
        let cases = [
            (claim(json!({})), true),
            (claim(json!({"volumeName": ""})), true),
            (claim(json!({"volumeName": "someone-elses-pv"})), false),
            (bound, false),
        ];
        for (c, want) in cases {
            assert_eq!(needs_volume(&c), want, "{:?}", c.spec);
        }
    }

    pub(crate) fn pv_for(params: &ClassParams, class_extra: serde_json::Value) -> PersistentVolume {
        let pvc = claim(json!({"accessModes": ["ReadWriteOnce", "ReadOnlyMany"]}));
        let request = validate_claim(&pvc).expect("valid");
        build_pv(&PvInput {
            pvc: &pvc,
            class: &class(class_extra),
            params,
            request: &request,
            provisioner: "localnfs.io/nfs",
            node: "node-1",
            node_ip: "10.0.0.5",
            nfs_port: 2049,
            volume: "pvc-u-1",
        })
        .expect("pv")
    }

    #[test]
    fn pv_is_prebound_and_points_at_the_node() {
        let pv = pv_for(&ClassParams::default(), json!({"reclaimPolicy": "Retain"}));
        assert_eq!(pv.metadata.name.as_deref(), Some("pvc-u-1"));
        assert_eq!(pv.metadata.finalizers, Some(vec![PV_FINALIZER.to_owned()]));
        let ann = pv.metadata.annotations.clone().expect("annotations");
        assert_eq!(ann[PROVISIONED_BY], "localnfs.io/nfs");
        assert_eq!(ann[NODE_KEY], "node-1");
        let spec = pv.spec.expect("spec");
        let claim_ref = spec.claim_ref.expect("claimRef");
        assert_eq!(
            (
                claim_ref.namespace.as_deref(),
                claim_ref.name.as_deref(),
                claim_ref.uid.as_deref()
            ),
            (Some("prod"), Some("data-db-0"), Some("u-1"))
        );
        let nfs = spec.nfs.expect("nfs");
        assert_eq!(
            (nfs.server.as_str(), nfs.path.as_str()),
            ("10.0.0.5", "/pvc-u-1")
        );
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Retain")
        );
        assert_eq!(spec.capacity.expect("capacity")["storage"].0, "1Gi");
        assert_eq!(spec.access_modes.expect("modes").len(), 2);
        assert_eq!(spec.mount_options, Some(default_mount_options(2049)));
        assert!(
            spec.node_affinity.is_none(),
            "preferred locality must not pin the PV"
        );
    }

    #[test]
    fn strict_locality_pins_the_pv_and_class_mount_options_win() {
        let params = ClassParams {
            locality: Locality::Strict,
            ..ClassParams::default()
        };
        let pv = pv_for(&params, json!({"mountOptions": ["nfsvers=3", "soft"]}));
        let spec = pv.spec.expect("spec");
        let affinity = serde_json::to_value(spec.node_affinity.expect("affinity")).expect("json");
        assert_eq!(
            affinity["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]["values"][0],
            "node-1"
        );
        assert_eq!(
            spec.mount_options,
            Some(vec!["nfsvers=3".into(), "soft".into()])
        );
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Delete")
        );
    }
}
