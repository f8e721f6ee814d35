//! The scheduler helper's decisions, as pure functions over a pod and the
//! [`Inventory`]: where the pod's data lives, which nodes may run it (extender filter),
//! how much each node is worth (extender prioritize). Table-tested; the HTTP layer only
//! decodes and encodes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use super::inventory::{Inventory, claim_key};
use crate::objects::class::Locality;

/// Highest score an extender may give (kube-scheduler's `MaxExtenderPriority`).
pub const MAX_SCORE: i64 = 10;

/// A bound claim of the pod whose data lives on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Home {
    pub claim: String,
    pub node: String,
    pub locality: Locality,
}

/// What the pod's localnfs claims mean for scheduling.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodClaims {
    /// Bound claims on our PVs (locality `none` left out: they have no home).
    pub homes: Vec<Home>,
    /// Unbound WaitForFirstConsumer claims of our classes: the node the scheduler
    /// picks will get these volumes.
    pub new_claims: Vec<String>,
    /// Their total requested size.
    pub new_bytes: u64,
    /// New claims among them that clone a bound claim of ours: the node the clone must
    /// be made on (its source's; `claim` names the clone).
    pub clones: Vec<Home>,
}

impl PodClaims {
    /// Whether the helper has anything to say about this pod.
    pub fn is_empty(&self) -> bool {
        self.homes.is_empty() && self.new_claims.is_empty()
    }

    /// The nodes clones must be made on, without repeats.
    pub fn clone_nodes(&self) -> Vec<&str> {
        let mut nodes: Vec<&str> = self.clones.iter().map(|h| h.node.as_str()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        nodes
    }

    /// The nodes that hold strict volumes, without repeats.
    pub fn strict_nodes(&self) -> Vec<&str> {
        let mut nodes: Vec<&str> = self
            .homes
            .iter()
            .filter(|h| h.locality == Locality::Strict)
            .map(|h| h.node.as_str())
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        nodes
    }

    /// How many of the pod's homed volumes live on each node.
    pub fn home_counts(&self) -> BTreeMap<&str, usize> {
        let mut counts = BTreeMap::new();
        for h in &self.homes {
            *counts.entry(h.node.as_str()).or_default() += 1;
        }
        counts
    }
}

/// Looks up the pod's claims. Claims the inventory does not know yet (a StatefulSet
/// creates a pod's claims just before the pod, and the watch may lag) are skipped:
/// the scheduler retries pods whose claims are unbound anyway.
pub fn pod_claims(pod: &Pod, inv: &Inventory) -> PodClaims {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut out = PodClaims::default();
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    for claim_name in volumes
        .into_iter()
        .flatten()
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.as_str())
    {
        let Some(claim) = inv.claims.get(&claim_key(namespace, claim_name)) else {
            continue;
        };
        match &claim.volume {
            Some(pv) => {
                if let Some(vol) = inv.volumes.get(pv)
                    && vol.locality != Locality::None
                {
                    out.homes.push(Home {
                        claim: claim_name.to_owned(),
                        node: vol.node.clone(),
                        locality: vol.locality,
                    });
                }
            }
            None => {
                let waits = claim
                    .class
                    .as_ref()
                    .and_then(|c| inv.classes.get(c))
                    .is_some_and(|c| c.wait_for_consumer);
                if waits {
                    out.new_claims.push(claim_name.to_owned());
                    out.new_bytes = out.new_bytes.saturating_add(claim.request_bytes);
                    // A clone of a claim bound to one of our PVs is made where that PV's
                    // data is; a source unknown or not ours pins nothing (the controller
                    // says why it cannot clone it).
                    let source_node = claim
                        .clone_of
                        .as_ref()
                        .and_then(|s| inv.claims.get(&claim_key(namespace, s)))
                        .and_then(|s| s.volume.as_ref())
                        .and_then(|pv| inv.volumes.get(pv));
                    if let Some(vol) = source_node {
                        out.clones.push(Home {
                            claim: claim_name.to_owned(),
                            node: vol.node.clone(),
                            locality: vol.locality,
                        });
                    }
                }
            }
        }
    }
    out
}

/// The extender filter's answer: nodes that may run the pod, and why each other one
/// may not.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Filtered {
    pub passed: Vec<String>,
    pub failed: BTreeMap<String, String>,
}

/// Where the pod's strict volumes let it run: `home` when they all live on one node,
/// `None` when they are spread over several (then no node can run the pod).
struct Pin<'a> {
    home: Option<&'a str>,
    /// What every other node is told.
    why: String,
}

fn strict_pin(claims: &PodClaims) -> Option<Pin<'_>> {
    let h = claims
        .homes
        .iter()
        .find(|h| h.locality == Locality::Strict)?;
    Some(Pin {
        home: (claims.strict_nodes().len() == 1).then_some(h.node.as_str()),
        why: format!(
            "localnfs: claim {} is on node {} and its class has locality: strict",
            h.claim, h.node
        ),
    })
}

/// The one node the pod's clones must go to: their sources' node, when they all are
/// on one node and it has room for the pod's new volumes. Otherwise (sources on
/// several nodes, or no room on theirs) any node with room may run the pod, and its
/// agent streams what is not local from the sources' agents (`node::peer`).
fn clone_home<'a>(claims: &'a PodClaims, inv: &Inventory, now: i64) -> Option<&'a str> {
    let [home] = claims.clone_nodes()[..] else {
        return None;
    };
    inv.agent(home, now)
        .is_some_and(|a| a.free_bytes >= claims.new_bytes)
        .then_some(home)
}

/// Why `node` cannot run the pod, or `None` when it can. `pin` is [`strict_pin`]'s
/// answer, worked out once per call rather than once per node.
fn node_refusal(
    claims: &PodClaims,
    pin: Option<&Pin>,
    node: &str,
    inv: &Inventory,
    now: i64,
) -> Option<String> {
    if let Some(pin) = pin
        && pin.home != Some(node)
    {
        return Some(pin.why.clone());
    }
    if let Some(home) = clone_home(claims, inv, now)
        && home != node
    {
        let c = claims.clones.iter().map(|c| c.claim.as_str());
        return Some(format!(
            "localnfs: claim {} clones a volume on node {home}, which has room for the pod's new volumes: clones are made on their source's node when it fits",
            c.collect::<Vec<_>>().join(", ")
        ));
    }
    if claims.new_claims.is_empty() {
        return None;
    }
    match inv.agent(node, now) {
        None => Some("localnfs: no localnfs node agent runs on this node".to_owned()),
        Some(a) if a.free_bytes < claims.new_bytes => Some(format!(
            "localnfs: not enough room for the pod's new volumes (need {} bytes, {} free)",
            claims.new_bytes, a.free_bytes
        )),
        Some(_) => None,
    }
}

/// Splits `nodes` into those that may run the pod and those that may not, with a
/// reason per refused node.
pub fn filter(claims: &PodClaims, nodes: &[String], inv: &Inventory, now: i64) -> Filtered {
    let mut out = Filtered::default();
    if claims.is_empty() {
        out.passed = nodes.to_vec();
        return out;
    }
    let pin = strict_pin(claims);
    for node in nodes {
        match node_refusal(claims, pin.as_ref(), node, inv, now) {
            None => out.passed.push(node.clone()),
            Some(why) => {
                out.failed.insert(node.clone(), why);
            }
        }
    }
    out
}

/// Scores `nodes` from 0 to [`MAX_SCORE`]: with homed volumes, the share of them on
/// the node (home 10, a node with half of them 5, others 0); otherwise, for new
/// volumes, free space relative to the roomiest node; otherwise 0 everywhere.
pub fn prioritize(claims: &PodClaims, nodes: &[String], inv: &Inventory, now: i64) -> Vec<i64> {
    if !claims.homes.is_empty() {
        let counts = claims.home_counts();
        let total = claims.homes.len() as i64;
        return nodes
            .iter()
            .map(|n| {
                let here = counts.get(n.as_str()).copied().unwrap_or(0) as i64;
                (MAX_SCORE * here + total / 2) / total
            })
            .collect();
    }
    if claims.new_claims.is_empty() {
        return vec![0; nodes.len()];
    }
    if !claims.clones.is_empty() {
        // A clone's source node is where it costs least (no stream); say so.
        let homes = claims.clone_nodes();
        return nodes
            .iter()
            .map(|n| {
                if homes.contains(&n.as_str()) {
                    MAX_SCORE
                } else {
                    0
                }
            })
            .collect();
    }
    let free: Vec<u64> = nodes
        .iter()
        .map(|n| inv.agent(n, now).map_or(0, |a| a.free_bytes))
        .collect();
    let most = free.iter().copied().max().unwrap_or(0);
    free.iter()
        .map(|&f| {
            if most == 0 {
                0
            } else {
                (u128::from(f) * MAX_SCORE as u128 / u128::from(most)) as i64
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::agents::AgentInfo;
    use crate::scheduler::inventory::{ClaimInfo, ClassInfo, VolumeInfo};
    use serde_json::json;

    const NOW: i64 = 1_000;

    /// Nodes a (900 free), b (100 free), c (no agent); class `wffc` (preferred, WFFC),
    /// `imm` (Immediate); PVs on a (preferred), b (strict), c (none).
    fn inventory() -> Inventory {
        let mut inv = Inventory::default();
        for (n, free) in [("a", 900), ("b", 100)] {
            inv.agents.insert(
                n.into(),
                AgentInfo {
                    free_bytes: free,
                    nfs_port: 2049,
                    peer_port: None,
                    expires: NOW + 10,
                    key: None,
                },
            );
        }
        inv.agents.insert(
            "gone".into(),
            AgentInfo {
                free_bytes: 10_000,
                nfs_port: 2049,
                peer_port: None,
                expires: NOW - 1,
                key: None,
            },
        );
        for (c, wffc) in [("wffc", true), ("imm", false)] {
            inv.classes.insert(
                c.into(),
                ClassInfo {
                    locality: Locality::Preferred,
                    wait_for_consumer: wffc,
                },
            );
        }
        for (pv, node, locality) in [
            ("pv-a", "a", Locality::Preferred),
            ("pv-a2", "a", Locality::Preferred),
            ("pv-b", "b", Locality::Strict),
            ("pv-a-strict", "a", Locality::Strict),
            ("pv-c", "c", Locality::None),
        ] {
            inv.volumes.insert(
                pv.into(),
                VolumeInfo {
                    node: node.into(),
                    locality,
                },
            );
        }
        let claims = [
            ("on-a", Some("pv-a"), "wffc", 1),
            ("on-a2", Some("pv-a2"), "wffc", 1),
            ("on-b", Some("pv-b"), "wffc", 1),
            ("strict-a", Some("pv-a-strict"), "wffc", 1),
            ("on-c", Some("pv-c"), "wffc", 1),
            ("other", Some("pv-not-ours"), "nfs", 1),
            ("new-small", None, "wffc", 50),
            ("new-big", None, "wffc", 500),
            ("new-imm", None, "imm", 5_000),
        ];
        for (name, pv, class, bytes) in claims {
            inv.claims.insert(
                claim_key("db", name),
                ClaimInfo {
                    class: Some(class.into()),
                    volume: pv.map(Into::into),
                    request_bytes: bytes,
                    clone_of: None,
                },
            );
        }
        for (name, source, bytes) in [
            ("clone-of-a", "on-a", 50),
            ("clone-of-b", "on-b", 50),
            ("clone-big-of-b", "on-b", 500),
            ("clone-of-nothing", "missing", 50),
        ] {
            inv.claims.insert(
                claim_key("db", name),
                ClaimInfo {
                    class: Some("wffc".into()),
                    volume: None,
                    request_bytes: bytes,
                    clone_of: Some(source.into()),
                },
            );
        }
        inv
    }

    fn pod(claims: &[&str]) -> Pod {
        let volumes: Vec<_> = claims
            .iter()
            .map(|c| json!({"name": c, "persistentVolumeClaim": {"claimName": c}}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "db"},
            "spec": {"containers": [], "volumes": volumes},
        }))
        .expect("pod")
    }

    fn nodes() -> Vec<String> {
        ["a", "b", "c", "gone"].map(String::from).to_vec()
    }

    #[test]
    fn pod_claims_sort_homes_from_new_volumes() {
        let inv = inventory();
        let c = pod_claims(
            &pod(&["on-a", "on-c", "other", "new-small", "new-imm", "missing"]),
            &inv,
        );
        assert_eq!(
            c.homes,
            vec![Home {
                claim: "on-a".into(),
                node: "a".into(),
                locality: Locality::Preferred
            }],
            "locality none and other provisioners' volumes have no home"
        );
        assert_eq!(
            c.new_claims,
            vec!["new-small"],
            "Immediate claims are the controller's to place"
        );
        assert_eq!(c.new_bytes, 50);
        assert!(pod_claims(&pod(&["other", "missing"]), &inv).is_empty());
    }

    #[test]
    fn filter_keeps_strict_volumes_home_and_new_volumes_where_they_fit() {
        let inv = inventory();
        let cases: [(&[&str], &[&str], &str); 7] = [
            // (claims, nodes that pass, words every refusal contains)
            (&[], &["a", "b", "c", "gone"], ""),
            (&["on-a"], &["a", "b", "c", "gone"], ""),
            (&["on-b"], &["b"], "locality: strict"),
            (&["new-small"], &["a", "b"], "localnfs"),
            (&["new-big"], &["a"], "localnfs"),
            (&["on-b", "new-big"], &[], "localnfs"),
            (&["on-b", "strict-a"], &[], "locality: strict"),
        ];
        for (claims, want, why) in cases {
            let f = filter(&pod_claims(&pod(claims), &inv), &nodes(), &inv, NOW);
            assert_eq!(f.passed, want, "{claims:?}");
            assert_eq!(f.passed.len() + f.failed.len(), 4, "{claims:?}");
            for reason in f.failed.values() {
                assert!(reason.contains(why), "{claims:?}: {reason}");
            }
        }
        let f = filter(&pod_claims(&pod(&["new-big"]), &inv), &nodes(), &inv, NOW);
        assert_eq!(
            f.failed["b"],
            "localnfs: not enough room for the pod's new volumes (need 500 bytes, 100 free)"
        );
        assert!(f.failed["c"].contains("no localnfs node agent"));
        assert!(
            f.failed["gone"].contains("no localnfs node agent"),
            "expired heartbeat"
        );
    }

    #[test]
    fn prioritize_scores_home_then_share_then_room() {
        let inv = inventory();
        let cases: [(&[&str], [i64; 4]); 5] = [
            (&[], [0, 0, 0, 0]),
            (&["on-a"], [10, 0, 0, 0]),
            (&["on-a", "on-b"], [5, 5, 0, 0]),
            (&["on-a", "on-a2", "on-b"], [7, 3, 0, 0]),
            (&["new-small"], [10, 1, 0, 0]),
        ];
        for (claims, want) in cases {
            let got = prioritize(&pod_claims(&pod(claims), &inv), &nodes(), &inv, NOW);
            assert_eq!(got, want, "{claims:?}");
        }
    }

    #[test]
    fn a_clone_runs_where_its_source_is_when_it_fits_else_anywhere_with_room() {
        let inv = inventory();
        let cases: [(&[&str], &[&str], &str); 5] = [
            (&["clone-of-a"], &["a"], "clones a volume on node a"),
            (&["clone-of-b"], &["b"], "clones a volume on node b"),
            // Node b holds the source but has 100 bytes free: streamed to a.
            (&["clone-big-of-b"], &["a"], "localnfs"),
            // Sources on two nodes: one is streamed wherever the pod runs.
            (&["clone-of-a", "clone-of-b"], &["a", "b"], "localnfs"),
            // An unknown source pins nothing: the controller says why it cannot clone.
            (&["clone-of-nothing"], &["a", "b"], "localnfs"),
        ];
        for (claims, want, why) in cases {
            let f = filter(&pod_claims(&pod(claims), &inv), &nodes(), &inv, NOW);
            assert_eq!(f.passed, want, "{claims:?}");
            for reason in f.failed.values() {
                assert!(reason.contains(why), "{claims:?}: {reason}");
            }
        }
        let f = filter(
            &pod_claims(&pod(&["clone-big-of-b"]), &inv),
            &nodes(),
            &inv,
            NOW,
        );
        assert!(f.failed["b"].contains("not enough room"), "{:?}", f.failed);
        let scores = prioritize(
            &pod_claims(&pod(&["clone-of-b"]), &inv),
            &nodes(),
            &inv,
            NOW,
        );
        assert_eq!(scores, [0, MAX_SCORE, 0, 0]);
    }
}
