//! VolumeBackups no node agent will run. An agent runs a VolumeBackup only when its
//! claim is Bound to a PV of that agent's node (`node::backups`), and leaves every
//! other one alone, never failed: it may be another agent's. A VolumeBackup whose
//! claim does not exist, is not Bound, or is bound to a volume localnfs did not make
//! is therefore nobody's, and would sit without a status for good. The leader marks
//! it Failed, saying why, with a `BackupFailed` event.
//!
//! Rules ([`verdict`], pure):
//! 1. A VolumeBackup with any status is an agent's (or already final): left alone.
//! 2. For the grace period (the controller's `--backup-grace`, [`GRACE`] by default)
//!    after its creation it is left alone: agents look at one whose claim is not
//!    theirs every 30 s, and a claim may be bound meanwhile.
//! 3. After that, a claim missing, not Bound, or bound to a PV not provisioned by
//!    localnfs fails the object. A claim Bound to a localnfs PV is its agent's, even
//!    when that agent is down: it runs the backup when it comes back. Such an object
//!    is looked at again every grace period, so one whose claim is deleted before its
//!    agent is back is failed too.
//!
//! The status is written with the object's `resourceVersion` as a precondition, so an
//! agent that took the object up meanwhile is never overwritten (the write fails with
//! a conflict and the object is looked at again).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;

use super::ctx::Ctx;
use crate::error::{Error, Result};
use crate::objects::backups::{Phase, VolumeBackup, VolumeBackupStatus, status_patch};
use crate::objects::keys::PROVISIONED_BY;

/// How long a VolumeBackup may stay without a status before the leader looks at its
/// claim, unless `--backup-grace` says otherwise: four of the agents' 30 s looks at a
/// claim that is not theirs.
pub const GRACE: Duration = Duration::from_secs(120);

/// The event reason (the agents' own, so `kubectl describe` reads the same).
pub const FAILED: &str = "BackupFailed";

/// What the leader knows of a VolumeBackup's claim.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim<'a> {
    Missing,
    /// Exists, not Bound (its phase).
    Unbound(&'a str),
    /// Bound to this PV, provisioned by this (`None`: no annotation, or PV gone).
    Bound {
        pv: &'a str,
        provisioned_by: Option<&'a str>,
    },
}

/// What to do with a VolumeBackup.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing now (an agent's, or final).
    Leave,
    /// Look again after this long (within the grace period).
    Wait(Duration),
    /// Mark it Failed with this message.
    Fail(String),
}

/// The rules of the module doc: `has_status` whether the object has a phase, `age`
/// since its creation, `grace` the grace period, `ours` the provisioner name PVs of
/// localnfs carry.
#[allow(clippy::too_many_arguments)]
pub fn verdict(
    has_status: bool,
    age: Duration,
    grace: Duration,
    ns: &str,
    name: &str,
    claim: &Claim<'_>,
    ours: &str,
) -> Verdict {
    if has_status {
        return Verdict::Leave;
    }
    if age < grace {
        return Verdict::Wait(grace - age);
    }
    let why = match claim {
        Claim::Missing => format!("claim {ns}/{name} does not exist"),
        Claim::Unbound(phase) => {
            format!("claim {ns}/{name} is {phase}, not Bound: it has no volume to back up yet")
        }
        Claim::Bound { provisioned_by, .. } if *provisioned_by == Some(ours) => {
            return Verdict::Leave;
        }
        Claim::Bound { pv, provisioned_by } => format!(
            "claim {ns}/{name} is bound to PV {pv}, provisioned by {}, not a localnfs volume: only localnfs volumes can be backed up",
            provisioned_by.unwrap_or("nobody known")
        ),
    };
    Verdict::Fail(format!(
        "{why} (no node agent took the backup up in {} s)",
        grace.as_secs()
    ))
}

/// Runs the reconciler until `stop` (the leader's reconcilers' token).
pub async fn run(ctx: Arc<Ctx>, stop: CancellationToken) {
    crate::cache::controller(
        Api::<VolumeBackup>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(stop.cancelled_owned())
    .run(reconcile, error_policy, ctx)
    .for_each(|_| futures::future::ready(()))
    .await;
}

fn error_policy(_obj: Arc<VolumeBackup>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    Action::requeue(crate::kubeclient::retry_after(err))
}

async fn reconcile(vbk: Arc<VolumeBackup>, ctx: Arc<Ctx>) -> Result<Action> {
    let has_status = vbk.status.as_ref().is_some_and(|s| s.phase.is_some());
    let created = vbk
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_millisecond());
    let age_ms = Timestamp::now().as_millisecond().saturating_sub(created);
    let age = Duration::from_millis(u64::try_from(age_ms).unwrap_or(0));
    let (ns, claim_name) = (vbk.namespace().unwrap_or_default(), vbk.spec.claim.clone());
    // Decided without the claim first: most objects are an agent's or still young.
    match verdict(
        has_status,
        age,
        ctx.backup_grace,
        &ns,
        &claim_name,
        &Claim::Missing,
        "",
    ) {
        Verdict::Leave => return Ok(Action::await_change()),
        Verdict::Wait(d) => return Ok(Action::requeue(d)),
        Verdict::Fail(_) => {}
    }
    let pvc = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&claim_name)
        .await
        .map_err(Error::kube(format!("read claim {ns}/{claim_name}")))?;
    let phase = pvc
        .as_ref()
        .and_then(|c| c.status.as_ref())
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".to_owned());
    let pv_name = pvc
        .as_ref()
        .and_then(|c| c.spec.as_ref())
        .and_then(|s| s.volume_name.clone());
    let pv = match (&pv_name, phase.as_str()) {
        (Some(n), "Bound") => Api::<PersistentVolume>::all(ctx.client.clone())
            .get_opt(n)
            .await
            .map_err(Error::kube(format!("read PV {n}")))?,
        _ => None,
    };
    let provisioned_by = pv
        .as_ref()
        .and_then(|p| p.annotations().get(PROVISIONED_BY).cloned());
    let claim = match (&pvc, &pv_name) {
        (None, _) => Claim::Missing,
        (Some(_), Some(pv)) if phase == "Bound" => Claim::Bound {
            pv,
            provisioned_by: provisioned_by.as_deref(),
        },
        (Some(_), _) => Claim::Unbound(&phase),
    };
    let why = match verdict(
        has_status,
        age,
        ctx.backup_grace,
        &ns,
        &claim_name,
        &claim,
        &ctx.provisioner,
    ) {
        Verdict::Fail(why) => why,
        // The claim's agent's (maybe down): looked at again, as nothing else changes
        // the object if the claim goes before that agent is back.
        Verdict::Leave => return Ok(Action::requeue(ctx.backup_grace)),
        Verdict::Wait(d) => return Ok(Action::requeue(d)),
    };
    ctx.fence.check()?;
    let name = vbk.name_any();
    let now = Timestamp::now().to_string();
    let status = VolumeBackupStatus {
        phase: Some(Phase::Failed),
        completion_time: Some(now),
        message: Some(why.clone()),
        ..VolumeBackupStatus::default()
    };
    let mut body = status_patch::<VolumeBackup>(&status);
    // The precondition: an agent's write since this copy was read wins.
    body["metadata"] = serde_json::json!({"resourceVersion": vbk.resource_version()});
    Api::<VolumeBackup>::namespaced(ctx.client.clone(), &ns)
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(body))
        .await
        .map_err(Error::kube(format!(
            "write the status of VolumeBackup {ns}/{name}"
        )))?;
    tracing::info!(backup = %format!("{ns}/{name}"), %why, "VolumeBackup no agent runs marked Failed");
    ctx.events
        .publish(&*vbk, EventType::Warning, FAILED, "Backup", why)
        .await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: &str = "localnfs.io/nfs";
    const OLD: Duration = GRACE;

    fn fails(claim: &Claim<'_>) -> String {
        match verdict(false, OLD, GRACE, "shop", "db", claim, OURS) {
            Verdict::Fail(why) => why,
            v => panic!("{claim:?}: {v:?}"),
        }
    }

    #[test]
    fn a_backup_an_agent_took_up_is_left_to_it() {
        let v = verdict(true, OLD * 10, GRACE, "shop", "db", &Claim::Missing, OURS);
        assert_eq!(v, Verdict::Leave);
    }

    #[test]
    fn a_young_backup_waits_out_the_grace_period() {
        let v = verdict(
            false,
            Duration::from_secs(30),
            GRACE,
            "shop",
            "db",
            &Claim::Missing,
            OURS,
        );
        assert_eq!(v, Verdict::Wait(GRACE - Duration::from_secs(30)));
    }

    #[test]
    fn a_missing_claim_fails_saying_so() {
        assert!(fails(&Claim::Missing).starts_with("claim shop/db does not exist"));
    }

    #[test]
    fn an_unbound_claim_fails_with_its_phase() {
        let why = fails(&Claim::Unbound("Pending"));
        assert!(why.contains("claim shop/db is Pending, not Bound"), "{why}");
    }

    #[test]
    fn a_claim_of_another_provisioner_fails_naming_it() {
        let why = fails(&Claim::Bound {
            pv: "pv-1",
            provisioned_by: Some("example.com/other"),
        });
        assert!(why.contains("provisioned by example.com/other"), "{why}");
        let why = fails(&Claim::Bound {
            pv: "pv-1",
            provisioned_by: None,
        });
        assert!(why.contains("provisioned by nobody known"), "{why}");
    }

    #[test]
    fn a_claim_on_a_localnfs_volume_is_left_to_its_agent_even_late() {
        let claim = Claim::Bound {
            pv: "pvc-1",
            provisioned_by: Some(OURS),
        };
        assert_eq!(
            verdict(false, OLD * 100, GRACE, "shop", "db", &claim, OURS),
            Verdict::Leave
        );
    }
}
