//! VolumeBackupSchedules (`objects::backups`): the leader makes one VolumeBackup per
//! due time of the schedule's cron expression ([`super::cron`], UTC), named
//! `<schedule>-<YYYYMMDDHHMM>` with an ownerReference to the schedule and the label
//! [`SCHEDULE_LABEL`]. The name makes it idempotent across leader changes: a create
//! that finds the object already there means that time is done.
//!
//! What is due ([`due`], pure): the latest due time after the last one made
//! (`status.lastScheduleTime`, else the schedule's creation), so after a controller
//! outage at most one missed backup runs. `suspend: true` makes nothing (and a time
//! missed while suspended is not made up after). A due time that comes while the
//! schedule's previous VolumeBackup is still Pending or Running is skipped (said in
//! `status.message` until the next backup is made). A bad expression is reported in
//! `status.message`. Of the VolumeBackups a schedule made, the newest
//! `successfulBackupsHistoryLimit` (default 3) Completed and as many Failed are kept;
//! older ones are deleted (their sets stay: sets are governed by `keep`/`maxAge`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::cron::{Civil, Cron};
use super::ctx::Ctx;
use crate::error::{Error, Result};
use crate::objects::backups::{
    Phase, VolumeBackup, VolumeBackupSchedule, VolumeBackupScheduleStatus, status_patch,
};

/// Label on each VolumeBackup a schedule made: the schedule's name.
pub const SCHEDULE_LABEL: &str = "localnfs.io/schedule";

/// VolumeBackups kept per schedule and phase without `successfulBackupsHistoryLimit`.
pub const DEFAULT_HISTORY: u32 = 3;

/// Longest sleep between two looks at a schedule (a clock that jumped, a missed
/// wake-up: the next look puts it right).
const MAX_WAIT: Duration = Duration::from_secs(600);

/// Runs the schedule reconciler until `stop` (the leader's reconcilers' token).
pub async fn run(ctx: Arc<Ctx>, stop: CancellationToken) {
    crate::cache::controller(
        Api::<VolumeBackupSchedule>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(stop.cancelled_owned())
    .run(reconcile, error_policy, ctx)
    .for_each(|_| futures::future::ready(()))
    .await;
}

fn error_policy(_obj: Arc<VolumeBackupSchedule>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    Action::requeue(crate::kubeclient::retry_after(err))
}

/// Unix minutes of an RFC 3339 time.
fn minutes(rfc3339: &str) -> Option<i64> {
    rfc3339
        .parse::<Timestamp>()
        .ok()
        .map(|t| t.as_second().div_euclid(60))
}

fn rfc3339(minute: i64) -> String {
    Timestamp::from_second(minute * 60).map_or_else(|_| String::new(), |t| t.to_string())
}

/// What a schedule should do now.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    /// Make the VolumeBackup of this due minute, then look again.
    Run(i64),
    /// Nothing is due; look again at this minute (if ever).
    Wait(Option<i64>),
}

/// The decision (see the module doc): `since` is the last due minute made (or the
/// schedule's creation), `now` the current minute.
pub fn due(cron: &Cron, suspend: bool, since: i64, now: i64) -> Due {
    if suspend {
        return Due::Wait(None);
    }
    match cron.latest_due(since, now) {
        Some(m) => Due::Run(m),
        None => Due::Wait(cron.next_due(now)),
    }
}

/// The name of the VolumeBackup of `schedule` due at `minute`.
pub fn backup_name(schedule: &str, minute: i64) -> String {
    format!("{schedule}-{}", Civil::of(minute).stamp())
}

async fn reconcile(s: Arc<VolumeBackupSchedule>, ctx: Arc<Ctx>) -> Result<Action> {
    let ns = s.namespace().unwrap_or_default();
    let name = s.name_any();
    let api = Api::<VolumeBackupSchedule>::namespaced(ctx.client.clone(), &ns);
    let mut status = s.status.clone().unwrap_or_default();
    let cron = match Cron::parse(&s.spec.schedule) {
        Ok(c) => c,
        Err(why) => {
            if status.message.as_deref() != Some(&why) {
                status.message = Some(why);
                patch(&api, &name, &status).await?;
            }
            return Ok(Action::await_change());
        }
    };
    // A skipped tick's note stays until a backup is made; an expression's error goes
    // once the expression parses.
    let skip_note = status
        .message
        .as_deref()
        .is_some_and(|m| m.starts_with(SKIPPED));
    if !skip_note && status.message.take().is_some() {
        patch_clear_message(&api, &name).await?;
    }
    let now_s = Timestamp::now().as_second();
    let now = now_s.div_euclid(60);
    let created = s
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(now, |t| t.0.as_second().div_euclid(60));
    let since = status
        .last_schedule_time
        .as_deref()
        .and_then(minutes)
        .unwrap_or(created);
    let made = prune(&ctx, &s).await?;
    match due(&cron, s.spec.suspend.unwrap_or(false), since, now) {
        Due::Run(minute) => {
            if let Some(prev) = unfinished(&made, &s.uid().unwrap_or_default()) {
                // One unfinished backup per schedule: a slow target or a queue on the
                // node does not pile up more behind it. The tick is spent, not kept.
                status.last_schedule_time = Some(rfc3339(minute));
                status.message = Some(format!(
                    "{SKIPPED} {}: VolumeBackup {prev} is unfinished",
                    rfc3339(minute)
                ));
                patch(&api, &name, &status).await?;
                return Ok(Action::await_change());
            }
            if skip_note && status.message.take().is_some() {
                patch_clear_message(&api, &name).await?;
            }
            let backup = backup_name(&name, minute);
            create_backup(&ctx, &s, &backup).await?;
            status.last_schedule_time = Some(rfc3339(minute));
            status.last_backup = Some(backup);
            patch(&api, &name, &status).await?;
            // The status change brings the schedule back; the next time is found then.
            Ok(Action::await_change())
        }
        Due::Wait(None) => Ok(Action::await_change()),
        Due::Wait(Some(next)) => {
            let secs = (next * 60 - now_s).max(1) as u64;
            Ok(Action::requeue(Duration::from_secs(secs).min(MAX_WAIT)))
        }
    }
}

/// Creates the VolumeBackup; one already there (another leader made it) is success.
async fn create_backup(ctx: &Ctx, s: &VolumeBackupSchedule, name: &str) -> Result<()> {
    let ns = s.namespace().unwrap_or_default();
    let owner = OwnerReference {
        api_version: VolumeBackupSchedule::api_version(&()).into_owned(),
        kind: VolumeBackupSchedule::kind(&()).into_owned(),
        name: s.name_any(),
        uid: s.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    let vbk = VolumeBackup {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(ns.clone()),
            labels: Some([(SCHEDULE_LABEL.to_owned(), s.name_any())].into()),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: s.spec.template.clone(),
        status: None,
    };
    match Api::<VolumeBackup>::namespaced(ctx.client.clone(), &ns)
        .create(&PostParams::default(), &vbk)
        .await
    {
        Ok(_) => {
            tracing::info!(backup = %format!("{ns}/{name}"), "scheduled backup created");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(Error::kube(format!("create VolumeBackup {ns}/{name}"))(e)),
    }
}

/// Which of `backups` to delete: of those owned by the schedule `owner_uid`, the
/// Completed beyond the newest `limit`, and the Failed beyond the newest `limit`
/// (names end in the due time, so they sort oldest first). Running and Pending ones
/// are never deleted.
pub fn beyond_history(backups: &[VolumeBackup], owner_uid: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    for phase in [Phase::Completed, Phase::Failed] {
        let mut done: Vec<String> = backups
            .iter()
            .filter(|b| b.owner_references().iter().any(|o| o.uid == owner_uid))
            .filter(|b| b.status.as_ref().and_then(|st| st.phase) == Some(phase))
            .map(ResourceExt::name_any)
            .collect();
        done.sort();
        let excess = done.len().saturating_sub(limit);
        out.extend(done.into_iter().take(excess));
    }
    out
}

/// The start of a schedule's message about a due time it skipped.
const SKIPPED: &str = "skipped the backup due at";

/// The name of a VolumeBackup of the schedule `owner_uid` still Pending or Running
/// (no phase yet counts: no agent has looked at it), if any.
pub fn unfinished<'a>(backups: &'a [VolumeBackup], owner_uid: &str) -> Option<&'a str> {
    backups
        .iter()
        .filter(|b| b.owner_references().iter().any(|o| o.uid == owner_uid))
        .find(|b| {
            !b.status
                .as_ref()
                .and_then(|st| st.phase)
                .is_some_and(Phase::is_final)
        })
        .and_then(|b| b.metadata.name.as_deref())
}

/// Deletes this schedule's finished VolumeBackups beyond its history limit; returns
/// the VolumeBackups it had made, as listed.
async fn prune(ctx: &Ctx, s: &VolumeBackupSchedule) -> Result<Vec<VolumeBackup>> {
    let ns = s.namespace().unwrap_or_default();
    let api = Api::<VolumeBackup>::namespaced(ctx.client.clone(), &ns);
    let list = api
        .list(&ListParams::default().labels(&format!("{SCHEDULE_LABEL}={}", s.name_any())))
        .await
        .map_err(Error::kube(format!(
            "list the VolumeBackups of schedule {ns}/{}",
            s.name_any()
        )))?;
    let limit = s
        .spec
        .successful_backups_history_limit
        .unwrap_or(DEFAULT_HISTORY) as usize;
    let uid = s.uid().unwrap_or_default();
    for name in beyond_history(&list.items, &uid, limit) {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(Error::kube(format!("delete VolumeBackup {ns}/{name}"))(e)),
        }
    }
    Ok(list.items)
}

async fn patch(
    api: &Api<VolumeBackupSchedule>,
    name: &str,
    status: &VolumeBackupScheduleStatus,
) -> Result<()> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(status_patch::<VolumeBackupSchedule>(status)),
    )
    .await
    .map_err(Error::kube(format!(
        "write the status of VolumeBackupSchedule {name}"
    )))?;
    Ok(())
}

/// Removes a message a fixed expression made stale (a merge patch drops a null).
async fn patch_clear_message(api: &Api<VolumeBackupSchedule>, name: &str) -> Result<()> {
    let body = status_patch::<VolumeBackupSchedule>(&serde_json::json!({"message": null}));
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(body))
        .await
        .map_err(Error::kube(format!(
            "write the status of VolumeBackupSchedule {name}"
        )))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_due_time_since_the_last_run_is_made_once() {
        let c = Cron::parse("*/10 * * * *").expect("valid");
        assert_eq!(due(&c, false, 100, 125), Due::Run(120));
        // Made: the next look waits for the next time.
        assert_eq!(due(&c, false, 120, 125), Due::Wait(Some(130)));
    }

    #[test]
    fn after_an_outage_only_one_missed_backup_runs() {
        let c = Cron::parse("0 * * * *").expect("valid");
        // Last made at minute 0; the controller was away for ten hours.
        assert_eq!(due(&c, false, 0, 600 + 7), Due::Run(600));
        assert_eq!(due(&c, false, 600, 600 + 7), Due::Wait(Some(660)));
    }

    #[test]
    fn a_suspended_schedule_makes_nothing() {
        let c = Cron::parse("* * * * *").expect("valid");
        assert_eq!(due(&c, true, 0, 100), Due::Wait(None));
    }

    #[test]
    fn a_new_schedule_waits_for_its_first_time() {
        let c = Cron::parse("30 * * * *").expect("valid");
        // Created at minute 40 of hour 0: nothing before its creation is made up.
        assert_eq!(due(&c, false, 40, 41), Due::Wait(Some(90)));
    }

    fn made(name: &str, owner: &str, phase: Option<Phase>) -> VolumeBackup {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "ownerReferences": [{"apiVersion": "localnfs.io/v1alpha1",
                "kind": "VolumeBackupSchedule", "name": "s", "uid": owner}]},
            "spec": {"claim": "c", "target": "t"},
            "status": {"phase": phase},
        }))
        .expect("VolumeBackup")
    }

    #[test]
    fn history_keeps_the_newest_completed_and_failed_and_never_running_ones() {
        let c = Some(Phase::Completed);
        let list = [
            made("s-202612070300", "u", c),
            made("s-202612060300", "u", c),
            made("s-202612080300", "u", c),
            made("s-202612050300", "u", Some(Phase::Failed)),
            made("s-202612040300", "u", Some(Phase::Failed)),
            made("s-202612010300", "u", Some(Phase::Running)),
            made("s-202612020300", "u", None),
            // Another schedule's (or a tenant's own object of a similar name).
            made("s-202601010300", "other", c),
        ];
        assert_eq!(beyond_history(&list, "u", 2), ["s-202612060300"]);
        let mut gone = beyond_history(&list, "u", 1);
        gone.sort();
        assert_eq!(gone, ["s-202612040300", "s-202612060300", "s-202612070300"]);
        assert!(beyond_history(&list, "u", 3).is_empty());
        assert_eq!(beyond_history(&list, "u", 0).len(), 5);
    }

    #[test]
    fn a_schedule_whose_last_backup_is_unfinished_makes_no_other() {
        let c = Some(Phase::Completed);
        let done = [made("s-1", "u", c), made("s-2", "u", Some(Phase::Failed))];
        assert_eq!(unfinished(&done, "u"), None);
        for phase in [None, Some(Phase::Pending), Some(Phase::Running)] {
            let list = [made("s-1", "u", c), made("s-2", "u", phase)];
            assert_eq!(unfinished(&list, "u"), Some("s-2"), "{phase:?}");
        }
        // Another schedule's (or a tenant's) unfinished object does not hold this one.
        assert_eq!(unfinished(&[made("x", "other", None)], "u"), None);
    }

    #[test]
    fn backup_names_carry_the_due_time() {
        // 2026-12-07 03:00 UTC.
        let t = 1_796_612_400 / 60;
        assert_eq!(backup_name("nightly", t), "nightly-202612070300");
    }
}
