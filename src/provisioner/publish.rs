//! Which nodes may mount a volume (only those running its pods; RWO one at a time):
//! the controller publishes them
//! on the PV as [`PUBLISHED_NODES`], as CSI's ControllerPublish (a VolumeAttachment)
//! says which node a volume is attached to, and the node agent serves the volume to
//! those nodes' addresses only (`node::grants`). Pure; table-tested.
//!
//! The published set is the nodes of the pods that use the PV's claim: scheduled (they
//! have a node) and not finished (Succeeded or Failed, as the attach/detach controller
//! counts them). A pod being deleted still counts until its object is gone: its kubelet
//! may still have the volume mounted.
//!
//! ReadWriteOnce and ReadWriteOncePod volumes (no ReadWriteMany or ReadOnlyMany mode)
//! go to one node at a time: the published node keeps the volume while a pod there
//! uses it; when none does, the node of the oldest waiting pod gets it. Pods elsewhere
//! wait (their mounts are refused, and kubelet retries) with an event saying which
//! node holds the volume. At node granularity RWOP is RWO: two pods on the holder node
//! share the node's mount (the scheduler keeps a second RWOP pod off the claim).
//!
//! A PV without the annotation was made before it existed: its first publication keeps
//! every node already using it, so an upgrade never cuts a running pod off; from then
//! on the set is exact (`[]`: nobody). New PVs are created with `[]`.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;

/// A scheduled, unfinished pod's use of a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodUse {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    /// Creation time, Unix seconds (the oldest waiting pod is served first).
    pub created: i64,
}

/// What to publish, and which pods must wait for another node to let go.
#[derive(Debug, PartialEq, Eq)]
pub struct Publication<'a> {
    /// Sorted node names.
    pub nodes: Vec<String>,
    pub waiting: Vec<&'a PodUse>,
}

/// Whether a volume with these access modes goes to one node at a time.
pub fn exclusive(access_modes: &[String]) -> bool {
    !access_modes
        .iter()
        .any(|m| m == "ReadWriteMany" || m == "ReadOnlyMany")
}

/// The nodes to publish for a volume, given the set published now (`None`: no
/// annotation yet) and the pods using its claim (see the module doc).
pub fn decide<'a>(
    exclusive: bool,
    current: Option<&[String]>,
    pods: &'a [PodUse],
) -> Publication<'a> {
    let in_use: BTreeSet<&str> = pods.iter().map(|p| p.node.as_str()).collect();
    if !exclusive {
        return Publication {
            nodes: in_use.into_iter().map(str::to_owned).collect(),
            waiting: Vec::new(),
        };
    }
    let mut kept: BTreeSet<&str> = match current {
        None => in_use.clone(),
        Some(cur) => cur
            .iter()
            .map(String::as_str)
            .filter(|n| in_use.contains(n))
            .collect(),
    };
    if kept.is_empty()
        && let Some(first) = pods.iter().min_by(|a, b| {
            (a.created, &a.namespace, &a.name).cmp(&(b.created, &b.namespace, &b.name))
        })
    {
        kept.insert(&first.node);
    }
    Publication {
        waiting: pods
            .iter()
            .filter(|p| !kept.contains(p.node.as_str()))
            .collect(),
        nodes: kept.into_iter().map(str::to_owned).collect(),
    }
}

/// The claims a pod uses (by name, in its namespace): its `persistentVolumeClaim`
/// volumes and the claims of its generic ephemeral volumes (`<pod>-<volume>`).
pub fn claims_of(pod: &Pod) -> Vec<String> {
    let pod_name = pod.metadata.name.as_deref().unwrap_or_default();
    let mut claims: Vec<String> = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| match (&v.persistent_volume_claim, &v.ephemeral) {
            (Some(c), _) => Some(c.claim_name.clone()),
            (None, Some(_)) => Some(format!("{pod_name}-{}", v.name)),
            (None, None) => None,
        })
        .collect();
    claims.sort();
    claims.dedup();
    claims
}

/// The pod's use of its claims, if it counts: scheduled, not Succeeded or Failed.
pub fn pod_use(pod: &Pod) -> Option<PodUse> {
    let node = pod.spec.as_ref()?.node_name.clone()?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) || node.is_empty() {
        return None;
    }
    Some(PodUse {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        node,
        created: pod
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, node: &str, created: i64) -> PodUse {
        PodUse {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            node: node.into(),
            created,
        }
    }

    fn names(p: &Publication) -> (Vec<String>, Vec<String>) {
        (
            p.nodes.clone(),
            p.waiting.iter().map(|w| w.name.clone()).collect(),
        )
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn shared_volumes_go_to_every_node_using_them() {
        let pods = [pod("a", "n2", 1), pod("b", "n1", 2), pod("c", "n2", 3)];
        let p = decide(false, Some(&strings(&["n3"])), &pods);
        assert_eq!(names(&p), (strings(&["n1", "n2"]), vec![]));
        assert_eq!(names(&decide(false, None, &[])), (vec![], vec![]));
    }

    #[test]
    fn a_read_write_once_volume_stays_with_its_node_while_a_pod_there_uses_it() {
        // (case, current, pods, published, waiting)
        type Case<'a> = (
            &'a str,
            Option<Vec<String>>,
            Vec<PodUse>,
            &'a [&'a str],
            &'a [&'a str],
        );
        let cases: [Case; 7] = [
            ("unused", Some(vec![]), vec![], &[], &[]),
            (
                "first user",
                Some(vec![]),
                vec![pod("a", "n1", 5)],
                &["n1"],
                &[],
            ),
            (
                "oldest of two new users wins",
                Some(vec![]),
                vec![pod("late", "n1", 9), pod("early", "n2", 3)],
                &["n2"],
                &["late"],
            ),
            (
                "holder kept though the other pod is older",
                Some(strings(&["n2"])),
                vec![pod("old", "n1", 1), pod("holder", "n2", 7)],
                &["n2"],
                &["old"],
            ),
            (
                "holder gone: next oldest waiting pod",
                Some(strings(&["n2"])),
                vec![pod("b", "n3", 4), pod("a", "n1", 2)],
                &["n1"],
                &["b"],
            ),
            (
                "two pods on the holder node share it",
                Some(strings(&["n1"])),
                vec![pod("a", "n1", 1), pod("b", "n1", 2)],
                &["n1"],
                &[],
            ),
            (
                "before the annotation: every node using it keeps it",
                None,
                vec![pod("a", "n1", 1), pod("b", "n2", 2)],
                &["n1", "n2"],
                &[],
            ),
        ];
        for (case, current, pods, want_nodes, want_waiting) in cases {
            let p = decide(true, current.as_deref(), &pods);
            assert_eq!(
                names(&p),
                (strings(want_nodes), strings(want_waiting)),
                "{case}"
            );
        }
    }

    #[test]
    fn grandfathered_nodes_shrink_to_one_as_their_pods_leave() {
        let both = strings(&["n1", "n2"]);
        let pods = [pod("b", "n2", 2), pod("c", "n3", 3)];
        let p = decide(true, Some(&both), &pods);
        assert_eq!(names(&p), (strings(&["n2"]), strings(&["c"])));
    }

    #[test]
    fn only_shared_modes_lift_the_one_node_rule() {
        for (modes, want) in [
            (vec!["ReadWriteOnce"], true),
            (vec!["ReadWriteOncePod"], true),
            (vec!["ReadWriteOnce", "ReadOnlyMany"], false),
            (vec!["ReadWriteMany"], false),
        ] {
            assert_eq!(exclusive(&strings(&modes)), want, "{modes:?}");
        }
    }

    #[test]
    fn scheduled_unfinished_pods_count_with_all_their_claims() {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u",
                         "creationTimestamp": "2026-01-01T00:00:10Z",
                         "deletionTimestamp": "2026-01-01T00:01:00Z"},
            "spec": {"nodeName": "n1", "containers": [], "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": "c1"}},
                {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}},
                {"name": "cfg", "configMap": {"name": "x"}},
                {"name": "again", "persistentVolumeClaim": {"claimName": "c1"}},
            ]},
            "status": {"phase": "Running"},
        }))
        .expect("pod");
        assert_eq!(claims_of(&p), strings(&["c1", "web-scratch"]));
        let u = pod_use(&p).expect("a pod being deleted still counts");
        assert_eq!((u.node.as_str(), u.created), ("n1", 1_767_225_610));
        for phase in ["Succeeded", "Failed"] {
            p.status.as_mut().expect("status").phase = Some(phase.into());
            assert_eq!(pod_use(&p), None, "{phase}");
        }
        p.status = None;
        p.spec.as_mut().expect("spec").node_name = None;
        assert_eq!(pod_use(&p), None, "unscheduled");
    }
}
