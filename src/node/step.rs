//! What the node agent does for a claim: a pure function ([`claim_step`]) of the claim,
//! what its signatures say ([`Verified`]) and whether a PV names its volume. The
//! reconciler (`cluster`) reads those, asks, does the step (the store checks the
//! volume's recorded owner once more), and answers.
//!
//! Rules, in order:
//! 0. A request the controller signed for this claim and this node, in a version
//!    newer than this agent reads, is refused with its version (so the controller
//!    can place the claim elsewhere, or wait for this agent's upgrade): never read
//!    as a version it knows, never silently ignored.
//! 1. Only a request the controller signed for this claim and this node counts; a
//!    claim without one is not this agent's business, whatever its labels and
//!    annotations say (the controller reports keys it ignored).
//! 2. An abandoned claim (the controller's signed word) already answered removed is
//!    done. Its volume is removed only while the claim is being deleted and no PV
//!    names the volume: a PV means the data was handed out, and the PV's reclaim
//!    decides its fate.
//! 3. A claim being deleted but not abandoned: nothing yet (the controller abandons it
//!    next; creating a volume now would only be removed again).
//! 4. A volume a PV names is served, never made again: if it is missing (a node whose
//!    disk was replaced), an empty one would hand a database empty data as if it were
//!    its own; a mount that fails is the honest answer. This also holds when this
//!    agent's answer no longer verifies (its key was lost) and against a request the
//!    claim's tenant replayed from an earlier placement on this node.
//! 5. A claim this agent already answered ready (its own signature) is served.
//! 6. Otherwise: create the requested volume for the claim and answer ready. For a
//!    clone ([`clone_check`]), only a copy of a volume whose owner record (on this
//!    node's disk, written by this agent) is the claim the signed request names, in
//!    the new claim's own namespace: a tenant cannot have another namespace's data
//!    copied to them, even with a request the controller signed by mistake. For a
//!    restore (request version 3, `super::restore`), only a backup set whose owner
//!    record is in the claim's own namespace, checked by the restore as it reads the
//!    set.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;

use crate::objects::request::CloneSource;
use crate::objects::signed::Verified;
use crate::volume::Owner;

/// Whether the agent may fill a new volume for a claim in namespace `claim_ns` with a
/// copy of `source`, whose volume on this node records `recorded` as its owner
/// (`None`: no such volume here; `Some(None)`: a volume without an owner record).
/// `Err` says why not, for the claim's event.
pub fn clone_check(
    source: &CloneSource,
    claim_ns: &str,
    recorded: Option<Option<&Owner>>,
) -> Result<(), String> {
    let (volume, wanted) = (
        &source.volume,
        format!("{}/{}", source.namespace, source.claim),
    );
    if source.namespace != claim_ns {
        return Err(format!(
            "the clone's source is claim {wanted}, in another namespace than this claim's ({claim_ns}): a claim may clone only claims of its own namespace"
        ));
    }
    let owner = match recorded {
        None => {
            return Err(format!(
                "the clone's source volume {volume} is not on this node"
            ));
        }
        Some(None) => {
            return Err(format!(
                "the clone's source volume {volume} records no owner, so it cannot be told to be claim {wanted}'s"
            ));
        }
        Some(Some(o)) => o,
    };
    if owner.claim_uid != source.claim_uid || owner.namespace != claim_ns {
        return Err(format!(
            "the clone's source volume {volume} belongs to {owner}, not to claim {wanted} (uid {})",
            source.claim_uid
        ));
    }
    Ok(())
}

/// What the agent does next for a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimStep {
    /// Nothing: no request for this node, or nothing to do until the claim changes.
    Ignore,
    /// Create the volume for the claim (or find it made), then answer ready.
    Create,
    /// Already answered ready: keep serving (label the volume's metrics).
    Served,
    /// Remove the abandoned claim's volume, then answer removed.
    Remove,
    /// Keep an abandoned claim's volume, and say why.
    Keep(&'static str),
    /// Refuse a request of this version: newer than this agent reads.
    RefuseNewer(u32),
}

/// The step for `pvc` on node `me`; `pv_names_volume`: a PV names the requested
/// volume (the claim's own PV or any other).
pub fn claim_step(
    pvc: &PersistentVolumeClaim,
    v: &Verified,
    me: &str,
    pv_names_volume: bool,
) -> ClaimStep {
    let deleting = pvc.metadata.deletion_timestamp.is_some();
    if let Some((version, node)) = &v.newer {
        return if node == me && !deleting {
            ClaimStep::RefuseNewer(*version)
        } else {
            ClaimStep::Ignore
        };
    }
    let Some(request) = &v.request else {
        return ClaimStep::Ignore;
    };
    if request.node != me {
        return ClaimStep::Ignore;
    }
    if v.abandoned {
        if v.removed {
            return ClaimStep::Ignore;
        }
        if !deleting {
            return ClaimStep::Keep("abandoned but not being deleted");
        }
        if pv_names_volume {
            return ClaimStep::Keep("a PV names the volume: its reclaim decides");
        }
        return ClaimStep::Remove;
    }
    if deleting {
        return ClaimStep::Ignore;
    }
    if v.ready || pv_names_volume {
        return ClaimStep::Served;
    }
    ClaimStep::Create
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::signed::VolumeRequest;
    use crate::volume::{VolumeName, VolumeSpec};
    use serde_json::json;

    fn claim(deleting: bool) -> PersistentVolumeClaim {
        let mut meta = json!({"name": "c", "namespace": "ns", "uid": "u1"});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(json!({ "metadata": meta })).expect("claim")
    }

    fn verified(node: &str) -> Verified {
        Verified {
            request: Some(VolumeRequest::new(
                VolumeSpec::new(VolumeName::new("pvc-u1").expect("name"), 1 << 20),
                "u1".into(),
                node.into(),
            )),
            ..Verified::default()
        }
    }

    #[test]
    fn a_claim_without_a_signed_request_is_ignored_whatever_it_carries() {
        let unsigned = Verified {
            ignored: vec!["localnfs.io/volume-request", "localnfs.io/abandon"],
            ..Verified::default()
        };
        assert_eq!(
            claim_step(&claim(true), &unsigned, "n1", false),
            ClaimStep::Ignore
        );
        assert_eq!(
            claim_step(&claim(false), &unsigned, "n1", false),
            ClaimStep::Ignore
        );
    }

    #[test]
    fn a_request_for_another_node_is_ignored() {
        assert_eq!(
            claim_step(&claim(false), &verified("n2"), "n1", false),
            ClaimStep::Ignore
        );
    }

    #[test]
    fn a_new_request_is_created_and_an_answered_one_served() {
        let mut v = verified("n1");
        assert_eq!(
            claim_step(&claim(false), &v, "n1", false),
            ClaimStep::Create
        );
        v.ready = true;
        assert_eq!(claim_step(&claim(false), &v, "n1", true), ClaimStep::Served);
    }

    #[test]
    fn a_volume_a_pv_names_is_never_made_again() {
        // This agent's answer does not verify (its key was lost, or the request is one
        // the tenant replayed from an earlier placement), but a PV names the volume.
        assert_eq!(
            claim_step(&claim(false), &verified("n1"), "n1", true),
            ClaimStep::Served
        );
    }

    #[test]
    fn a_deleted_claim_gets_nothing_made_before_it_is_abandoned() {
        assert_eq!(
            claim_step(&claim(true), &verified("n1"), "n1", false),
            ClaimStep::Ignore
        );
    }

    #[test]
    fn an_abandoned_volume_is_removed_only_while_deleted_and_named_by_no_pv() {
        let mut v = verified("n1");
        v.abandoned = true;
        assert_eq!(claim_step(&claim(true), &v, "n1", false), ClaimStep::Remove);
        assert!(matches!(
            claim_step(&claim(true), &v, "n1", true),
            ClaimStep::Keep(_)
        ));
        assert!(matches!(
            claim_step(&claim(false), &v, "n1", false),
            ClaimStep::Keep(_)
        ));
        v.removed = true;
        assert_eq!(claim_step(&claim(true), &v, "n1", false), ClaimStep::Ignore);
    }

    #[test]
    fn a_request_newer_than_this_agent_reads_is_refused_not_misread() {
        let v = Verified {
            newer: Some((2, "n1".into())),
            ..Verified::default()
        };
        let cases = [
            (
                "for this node",
                claim(false),
                "n1",
                ClaimStep::RefuseNewer(2),
            ),
            ("for another node", claim(false), "n2", ClaimStep::Ignore),
            ("claim being deleted", claim(true), "n1", ClaimStep::Ignore),
        ];
        for (what, pvc, me, want) in cases {
            assert_eq!(claim_step(&pvc, &v, me, false), want, "{what}");
        }
    }

    #[test]
    fn only_a_volume_of_the_named_claim_in_the_same_namespace_is_cloned() {
        let source = CloneSource {
            volume: VolumeName::new("pvc-u0").expect("name"),
            claim_uid: "u0".into(),
            namespace: "db".into(),
            claim: "data-0".into(),
        };
        let owner = |uid: &str, ns: &str| Owner {
            claim_uid: uid.into(),
            namespace: ns.into(),
            claim: "data-0".into(),
        };
        let (right, other_ns, other_uid) =
            (owner("u0", "db"), owner("u0", "web"), owner("u9", "db"));
        let cases: [(&str, Option<Option<&Owner>>, &str, &str); 6] = [
            ("its owner, same namespace", Some(Some(&right)), "db", ""),
            (
                "claim in another namespace",
                Some(Some(&right)),
                "web",
                "another namespace",
            ),
            (
                "volume owned in another namespace",
                Some(Some(&other_ns)),
                "db",
                "belongs to claim web/data-0",
            ),
            (
                "volume of another claim",
                Some(Some(&other_uid)),
                "db",
                "(uid u9)",
            ),
            ("no owner record", Some(None), "db", "records no owner"),
            ("not on this node", None, "db", "not on this node"),
        ];
        for (what, recorded, ns, want) in cases {
            match clone_check(&source, ns, recorded) {
                Ok(()) => assert!(want.is_empty(), "{what}: allowed"),
                Err(why) => assert!(!want.is_empty() && why.contains(want), "{what}: {why}"),
            }
        }
    }
}
