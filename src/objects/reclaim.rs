//! When a volume's data may go, as pure decisions shared by the
//! controller (which deletes PVs whose claim is gone) and the node agent (which deletes or
//! archives the directory of a deleted PV, then releases its finalizer).
//!
//! Data goes only when the PV is released: the claim its `claimRef` names is gone (not
//! found, or a different claim by the same name, told apart by uid), as read from the
//! API server just before acting — a deletionTimestamp alone, a `Released` phase alone
//! or a failed read never count. A PV deleted while its claim still exists stays
//! Terminating with its data (as kube's pv-protection would keep it) until the claim
//! is gone. Reclaim policy `Retain` and any `onDelete` value we do not know keep the
//! directory.

use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;

use crate::objects::class::OnDelete;
use crate::objects::keys::ON_DELETE_KEY;

/// The claim a PV's `claimRef` names, as the API server has it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimState {
    /// The claim exists (with the uid the PV was bound to): its data is live.
    InUse,
    /// Not found, or a newer claim with the same name: the PV is released.
    Gone,
    /// The PV names no claim: nothing says whether its data is still wanted.
    NoClaimRef,
}

/// The namespace and name a PV's `claimRef` points at, if any.
pub fn claim_ref(pv: &PersistentVolume) -> Option<(&str, &str)> {
    let r: &ObjectReference = pv.spec.as_ref()?.claim_ref.as_ref()?;
    Some((r.namespace.as_deref()?, r.name.as_deref()?))
}

/// Compares the claim read from the API server (`None`: 404) with the PV's `claimRef`.
pub fn claim_state(pv: &PersistentVolume, found: Option<&PersistentVolumeClaim>) -> ClaimState {
    if claim_ref(pv).is_none() {
        return ClaimState::NoClaimRef;
    }
    let bound_uid = pv
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .and_then(|r| r.uid.as_deref());
    match (found, bound_uid) {
        (None, _) => ClaimState::Gone,
        (Some(c), Some(uid)) if c.uid().as_deref() != Some(uid) => ClaimState::Gone,
        (Some(_), _) => ClaimState::InUse,
    }
}

/// What the node agent does about a PV that is being deleted (has a deletionTimestamp
/// and our finalizer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reclaim {
    /// Its claim still uses it: keep the PV (Terminating) and the data; look again later.
    Wait,
    /// Remove the directory, then release the finalizer.
    Delete,
    /// Move the directory aside, then release the finalizer.
    Archive,
    /// Leave the directory in place and release the finalizer; `warning` says why when
    /// it is not what the PV asked for.
    Keep { warning: Option<String> },
}

/// Decides the fate of a deleted PV's data from its reclaim policy, its
/// [`ON_DELETE_KEY`] annotation and its claim.
pub fn on_pv_deleted(policy: Option<&str>, on_delete: Option<&str>, claim: ClaimState) -> Reclaim {
    match claim {
        ClaimState::InUse => return Reclaim::Wait,
        ClaimState::NoClaimRef if policy == Some("Delete") => {
            return Reclaim::Keep {
                warning: Some(
                    "the PV has no claimRef, so nothing shows its claim is gone: keeping the data"
                        .into(),
                ),
            };
        }
        ClaimState::NoClaimRef | ClaimState::Gone => {}
    }
    match policy {
        Some("Delete") => {}
        Some("Retain") => return Reclaim::Keep { warning: None },
        other => {
            return Reclaim::Keep {
                warning: Some(format!(
                    "reclaim policy {other:?} is not one localnfs acts on: keeping the data"
                )),
            };
        }
    }
    match on_delete.and_then(OnDelete::parse) {
        Some(OnDelete::Delete) => Reclaim::Delete,
        Some(OnDelete::Archive) => Reclaim::Archive,
        Some(OnDelete::Retain) => Reclaim::Keep { warning: None },
        None => Reclaim::Keep {
            warning: Some(format!(
                "annotation {ON_DELETE_KEY}={on_delete:?} is not delete, archive or retain: keeping the data"
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pv(claim_ref: serde_json::Value) -> PersistentVolume {
        serde_json::from_value(json!({"metadata": {"name": "pv"}, "spec": {"claimRef": claim_ref}}))
            .expect("pv")
    }

    fn claim(uid: &str) -> PersistentVolumeClaim {
        serde_json::from_value(json!({"metadata": {"name": "c", "namespace": "n", "uid": uid}}))
            .expect("claim")
    }

    #[test]
    fn a_claim_is_gone_only_when_not_found_or_replaced() {
        let bound = pv(json!({"namespace": "n", "name": "c", "uid": "u1"}));
        let no_uid = pv(json!({"namespace": "n", "name": "c"}));
        let cases = [
            (&bound, Some(claim("u1")), ClaimState::InUse),
            (&bound, Some(claim("u2")), ClaimState::Gone),
            (&bound, None, ClaimState::Gone),
            (&no_uid, Some(claim("u9")), ClaimState::InUse),
            (&no_uid, None, ClaimState::Gone),
            (&pv(json!(null)), None, ClaimState::NoClaimRef),
            (&pv(json!({"uid": "u1"})), None, ClaimState::NoClaimRef),
        ];
        for (i, (pv, found, want)) in cases.into_iter().enumerate() {
            assert_eq!(claim_state(pv, found.as_ref()), want, "case {i}");
        }
    }

    #[test]
    fn data_goes_only_for_a_released_delete_pv_with_a_known_on_delete() {
        use ClaimState::*;
        let keep = Reclaim::Keep { warning: None };
        let cases = [
            (Some("Delete"), Some("delete"), Gone, Reclaim::Delete),
            (Some("Delete"), Some("archive"), Gone, Reclaim::Archive),
            (Some("Delete"), Some("retain"), Gone, keep.clone()),
            (Some("Retain"), Some("delete"), Gone, keep.clone()),
            // A Bound PV deleted with `kubectl delete pv`: wait for its claim, whatever
            // the policy.
            (Some("Delete"), Some("delete"), InUse, Reclaim::Wait),
            (Some("Delete"), Some("archive"), InUse, Reclaim::Wait),
            (Some("Retain"), Some("delete"), InUse, Reclaim::Wait),
            (None, None, InUse, Reclaim::Wait),
        ];
        for (i, (policy, on_delete, claim, want)) in cases.into_iter().enumerate() {
            assert_eq!(on_pv_deleted(policy, on_delete, claim), want, "case {i}");
        }
    }

    #[test]
    fn anything_unknown_keeps_the_data_with_a_warning() {
        use ClaimState::*;
        let cases = [
            (Some("Delete"), Some("shred"), Gone, "\"shred\""),
            (Some("Delete"), Some("Delete"), Gone, "not delete, archive"),
            (Some("Delete"), None, Gone, "None"),
            (Some("Recycle"), Some("delete"), Gone, "Recycle"),
            (None, Some("delete"), Gone, "None"),
            (Some("Delete"), Some("delete"), NoClaimRef, "no claimRef"),
        ];
        for (policy, on_delete, claim, want) in cases {
            match on_pv_deleted(policy, on_delete, claim) {
                Reclaim::Keep { warning: Some(w) } => {
                    assert!(w.contains(want), "{policy:?} {on_delete:?}: {w}")
                }
                other => panic!("{policy:?} {on_delete:?} {claim:?}: {other:?}"),
            }
        }
        assert_eq!(
            on_pv_deleted(Some("Retain"), None, NoClaimRef),
            Reclaim::Keep { warning: None }
        );
    }
}
