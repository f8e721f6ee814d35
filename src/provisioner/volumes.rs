//! The PV reconciler: a localnfs PV with reclaim policy Delete is deleted once a
//! fresh read shows its claim is really gone (see `reclaim`); its finalizer keeps it
//! until the node agent has dealt with the directory. Data goes only through this
//! path, never because an API call failed.
//!
//! A PV is looked at when kube-controller-manager marks it Released, and as soon as
//! the claim watch sees its claim deleted (the claim is gone once kube's
//! pvc-protection has let it go): the PV binder marks PVs Released one at a time, at
//! kube-controller-manager's client rate shared with its other work (about 26 a second
//! while 10,000 claims were deleted at `--kube-api-qps=200`), and the agent need not
//! wait for it to remove the data. A Bound PV is deleted only on that same fresh read
//! of its claim; it then stays Terminating (kube's pv-protection) until the binder has
//! caught up.
//!
//! Two requests a PV: the claim read from the API server, and the delete. The PV
//! itself comes from the term's watch cache: the delete is conditional on that copy's
//! uid and resourceVersion, so a copy older than the API server's fails with a
//! conflict and nothing is deleted on stale facts (it is decided again 5 s later).
//! No event is published per PV: the PV is gone moments later, with the event
//! (`localnfs_pv_deleted_total` and the agent's log say it; refusals are warnings).

use super::queue::Next;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Preconditions};

use super::ctx::Ctx;
use super::triggers::Caches;
use crate::error::{Error, Result};
use crate::objects::keys::PROVISIONED_BY;
use crate::objects::reclaim::{ClaimState, claim_ref, claim_state};

/// How long a PV whose cached copy was out of date waits before it is decided again.
/// (The watch is usually milliseconds behind; a stalled one costs a claim read and a
/// conditional delete per PV this often.)
const STALE_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// What to do with a PV (pure).
#[derive(Debug, PartialEq, Eq)]
pub enum PvAction {
    /// Delete it, once its claim is confirmed gone ([`ClaimState::Gone`]).
    Delete,
    Nothing,
}

/// Whether a PV is a candidate for deletion: ours, Released, policy Delete, not already
/// being deleted. The phase is the PV binder's view; the reconcile confirms the claim.
pub fn decide(pv: &PersistentVolume, provisioner: &str) -> PvAction {
    if ours_to_delete(pv, provisioner, &["Released"]) {
        PvAction::Delete
    } else {
        PvAction::Nothing
    }
}

/// Whether a PV may be deleted once its claim is confirmed gone: as [`decide`], but
/// Bound as well as Released (its claim just deleted, the binder not there yet).
pub fn deletable(pv: &PersistentVolume, provisioner: &str) -> bool {
    ours_to_delete(pv, provisioner, &["Released", "Bound"])
}

/// Ours, in one of `phases`, reclaim policy Delete, not being deleted already.
fn ours_to_delete(pv: &PersistentVolume, provisioner: &str, phases: &[&str]) -> bool {
    let ours = pv.annotations().get(PROVISIONED_BY).map(String::as_str) == Some(provisioner);
    let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
    let delete = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        == Some("Delete");
    ours && phase.is_some_and(|p| phases.contains(&p))
        && delete
        && pv.metadata.deletion_timestamp.is_none()
}

/// Reconciles the PV `name` as the PV watch last saw it; errors become a retry.
pub async fn reconcile_name(name: String, ctx: &Ctx, caches: &Caches) -> Next {
    reconcile(&name, ctx, caches)
        .await
        .unwrap_or_else(|e| ctx.after_error(&e))
}

async fn reconcile(name: &str, ctx: &Ctx, caches: &Caches) -> Result<Next> {
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let Some(pv) = caches.pv(name) else {
        return Ok(Next::Wait); // gone (or not seen yet: its watch event brings it)
    };
    if !deletable(&pv, &ctx.provisioner) {
        return Ok(Next::Wait);
    }
    let found = match claim_ref(&pv) {
        Some((ns, claim)) => Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), ns)
            .get_opt(claim)
            .await
            .map_err(Error::kube(format!("read claim {ns}/{claim} of PV {name}")))?,
        None => None,
    };
    let state = claim_state(&pv, found.as_ref());
    if state != ClaimState::Gone {
        tracing::warn!(pv = name, ?state, "PV's claim is not gone: not deleting it");
        return Ok(Next::Wait);
    }
    // Only the PV as the cache has it: not one re-bound, re-created or changed since.
    let unchanged = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pv.uid(),
            resource_version: pv.resource_version(),
        }),
        ..DeleteParams::default()
    };
    ctx.fence.check()?;
    match pvs.delete(name, &unchanged).await {
        Ok(_) => {
            ctx.metrics.deleted.inc();
            tracing::info!(
                pv = name,
                "claim released with reclaim policy Delete: PV deleted, its node agent removes the data"
            );
        }
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        // The cached copy is older than the API server's: decide again from the copy
        // the watch brings (a change the watch's fingerprint ignores would not queue
        // the PV again by itself).
        Err(kube::Error::Api(s)) if s.code == 409 => return Ok(Next::After(STALE_RETRY)),
        Err(e) => return Err(Error::kube(format!("delete PV {name}"))(e)),
    }
    Ok(Next::Wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pv(by: &str, phase: &str, policy: &str, deleting: bool) -> PersistentVolume {
        let mut meta = json!({"name": "pv", "annotations": {PROVISIONED_BY: by}});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(json!({
            "metadata": meta,
            "spec": {"persistentVolumeReclaimPolicy": policy},
            "status": {"phase": phase},
        }))
        .expect("pv")
    }

    #[test]
    fn only_our_released_delete_policy_pvs_are_deleted() {
        let me = "localnfs.io/nfs";
        let cases = [
            (pv(me, "Released", "Delete", false), PvAction::Delete),
            (pv(me, "Released", "Retain", false), PvAction::Nothing),
            (pv(me, "Bound", "Delete", false), PvAction::Nothing),
            (pv(me, "Released", "Delete", true), PvAction::Nothing),
            (
                pv("someone.else/x", "Released", "Delete", false),
                PvAction::Nothing,
            ),
        ];
        for (pv, want) in cases {
            assert_eq!(decide(&pv, me), want);
        }
        // A claim deleted before the binder marked its PV Released: a candidate too
        // (the reconcile still reads the claim before deleting).
        assert!(deletable(&pv(me, "Bound", "Delete", false), me));
        assert!(deletable(&pv(me, "Released", "Delete", false), me));
        assert!(!deletable(&pv(me, "Bound", "Retain", false), me));
        assert!(!deletable(&pv(me, "Pending", "Delete", false), me));
        assert!(!deletable(&pv(me, "Bound", "Delete", true), me));
        assert!(!deletable(
            &pv("someone.else/x", "Bound", "Delete", false),
            me
        ));
    }
}
