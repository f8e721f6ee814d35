//! Expansion of a bound localnfs volume: claim request grows → the node agent raises
//! the size limit → PV capacity → claim status capacity (see `protocol`).

use std::time::Duration;

use super::queue::Next;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use serde_json::json;

use super::ctx::Ctx;
use crate::error::{Error, Result};
use crate::kubeclient::annotation as ann;
use crate::objects::claim::requested_bytes;
use crate::objects::class::quantity_bytes;
use crate::objects::keys::{RESIZE_TO, SIZE};

fn pv_capacity(pv: &PersistentVolume) -> Option<(String, u64)> {
    let q = pv
        .spec
        .as_ref()?
        .capacity
        .as_ref()?
        .get("storage")?
        .0
        .clone();
    let b = quantity_bytes(&q).ok()?;
    Some((q, b))
}

pub async fn reconcile(
    ctx: &Ctx,
    pvc: &PersistentVolumeClaim,
    class: &StorageClass,
    pv: &PersistentVolume,
) -> Result<Next> {
    let (Some(want), Some((have_q, have))) = (requested_bytes(pvc), pv_capacity(pv)) else {
        return Ok(Next::Wait);
    };
    let request = pvc.spec.as_ref().and_then(|s| {
        s.resources
            .as_ref()?
            .requests
            .as_ref()?
            .get("storage")
            .cloned()
    });
    let (ns, name, pv_name) = (
        pvc.namespace().unwrap_or_default(),
        pvc.name_any(),
        pv.name_any(),
    );
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    if want <= have {
        // Finish a resize whose last step (claim status) did not land.
        let status_cap = pvc
            .status
            .as_ref()
            .and_then(|s| s.capacity.as_ref()?.get("storage"))
            .and_then(|q| quantity_bytes(&q.0).ok());
        let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        if bound && status_cap.is_some_and(|c| c < have) {
            ctx.fence.check()?;
            claims
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"capacity": {"storage": have_q}}})),
                )
                .await
                .map_err(Error::kube(format!("update capacity of claim {ns}/{name}")))?;
        }
        return Ok(Next::Wait);
    }
    if !class.allow_volume_expansion.unwrap_or(false) {
        ctx.events
            .publish(
                pvc,
                EventType::Warning,
                "ExpansionFailed",
                "Expand",
                format!(
                    "StorageClass {} does not allow volume expansion",
                    class.name_any()
                ),
            )
            .await;
        return Ok(Next::Wait);
    }
    let applied = ann(pv, SIZE).and_then(|s| s.parse::<u64>().ok());
    if applied.is_some_and(|a| a >= want) {
        let Some(request) = request else {
            return Ok(Next::Wait);
        };
        ctx.fence.check()?;
        pvs.patch(
            &pv_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"capacity": {"storage": request}}})),
        )
        .await
        .map_err(Error::kube(format!("update capacity of PV {pv_name}")))?;
        claims
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"capacity": {"storage": request}}})),
            )
            .await
            .map_err(Error::kube(format!("update capacity of claim {ns}/{name}")))?;
        ctx.events
            .publish(
                pvc,
                EventType::Normal,
                "VolumeResizeSuccessful",
                "Expand",
                format!("volume {pv_name} expanded to {want} bytes"),
            )
            .await;
        return Ok(Next::Wait);
    }
    if ann(pv, RESIZE_TO) != Some(want.to_string().as_str()) {
        ctx.fence.check()?;
        pvs.patch(
            &pv_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {RESIZE_TO: want.to_string()}}})),
        )
        .await
        .map_err(Error::kube(format!("request resize of PV {pv_name}")))?;
        ctx.events
            .publish(
                pvc,
                EventType::Normal,
                "Resizing",
                "Expand",
                format!("asking the node agent to grow {pv_name} from {have} to {want} bytes"),
            )
            .await;
    }
    Ok(Next::After(Duration::from_secs(30)))
}
