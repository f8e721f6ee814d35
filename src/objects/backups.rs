//! The backup and restore objects (API group `localnfs.io`, version `v1alpha1`,
//! namespaced, status subresource; the CRDs are `deploy/base/crds.yaml`):
//! - [`VolumeBackup`] (`vbk`): one backup of a claim of its namespace to a target the
//!   operator named on the node agents (`--backup-target NAME=DIR`); the agent of the
//!   claim's node runs it and writes the status (`node::backups`).
//! - [`VolumeBackupSchedule`] (`vbks`): a 5-field cron (UTC) and a VolumeBackup
//!   template; the controller makes one VolumeBackup per due time
//!   (`provisioner::schedules`).
//! - [`VolumeRestore`] (`vrs`): claims made from a backup set.
//!
//! Tenants create, read and delete these objects in their namespace (ClusterRole
//! `localnfs-backup-user`, aggregated to `edit`), never their `/status`: only localnfs
//! components write status. Nothing in a spec is a path: a target is a name the
//! operator configured, a claim is a claim of the object's own namespace, and which
//! volume is read is decided by the agent from its on-disk owner records.
//!
//! Plain serde types with a hand-written `kube::Resource` impl (the `kube` crate's
//! `derive` feature is off). Every field is optional on the wire so that an object
//! another version wrote still reads; times are RFC 3339 strings.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::NamespaceResourceScope;
use serde::{Deserialize, Serialize};

/// The API group of the three objects.
pub const GROUP: &str = "localnfs.io";
/// Their API version.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in objects.
pub const API_VERSION: &str = "localnfs.io/v1alpha1";

/// Where a backup or restore is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    Running,
    Completed,
    Failed,
}

impl Phase {
    /// Completed or Failed: nothing more happens to the object.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::Failed)
    }
}

/// What a VolumeBackup asks for (also a schedule's template).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeBackupSpec {
    /// A claim of the object's namespace.
    pub claim: String,
    /// An operator-configured target name (never a path).
    pub target: String,
    /// Retention: keep the newest N complete sets of this volume in the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<u32>,
    /// Retention: keep complete sets younger than this (`30d`, `12h`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
}

/// What the node agent reports on a VolumeBackup.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeBackupStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The node the volume lives on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The volume's name (its directory under the target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// The set id written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<String>,
    /// The set's size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_copied: Option<u64>,
    /// Bytes hard-linked from the previous set (unchanged since it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_linked: Option<u64>,
    /// Bytes done so far, about every second while Running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<u64>,
    /// How long the source's mutating calls were held for the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// Why, when Failed (or waiting, when Pending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One backup of a claim of its namespace.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct VolumeBackup {
    pub metadata: ObjectMeta,
    pub spec: VolumeBackupSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VolumeBackupStatus>,
}

/// What a VolumeBackupSchedule asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeBackupScheduleSpec {
    /// 5-field cron (minute hour day-of-month month day-of-week), UTC.
    pub schedule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// VolumeBackup objects of this schedule kept (sets are governed by keep/maxAge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successful_backups_history_limit: Option<u32>,
    /// The spec of each VolumeBackup made.
    pub template: VolumeBackupSpec,
}

/// What the controller reports on a VolumeBackupSchedule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeBackupScheduleStatus {
    /// The due time of the last VolumeBackup made (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    /// The name of the last VolumeBackup made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<String>,
    /// Why the schedule does nothing (a bad cron expression), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Backups of a claim at the times of a cron expression.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct VolumeBackupSchedule {
    pub metadata: ObjectMeta,
    pub spec: VolumeBackupScheduleSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VolumeBackupScheduleStatus>,
}

/// Which set a restore reads: a Completed VolumeBackup of the namespace, or a
/// target, volume and set (`latest` or a set id).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<String>,
}

/// Claims of a StatefulSet to restore: `<template>-<name>-<ordinal>` for each ordinal
/// below `replicas`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatefulSetClaims {
    pub name: String,
    pub template: String,
    pub replicas: u32,
}

/// What a VolumeRestore asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRestoreSpec {
    pub source: RestoreSource,
    /// The class of the claims made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Their size (a quantity); default the backed-up volume's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// Claims to make, each with a copy of the set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<Vec<String>>,
    /// Or instead the claims of a StatefulSet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stateful_set: Option<StatefulSetClaims>,
}

/// Where one claim of a restore is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClaimPhase {
    Pending,
    Restoring,
    Completed,
    Failed,
}

impl ClaimPhase {
    /// Completed or Failed: nothing more happens to the claim's entry.
    pub fn is_final(self) -> bool {
        matches!(self, ClaimPhase::Completed | ClaimPhase::Failed)
    }
}

/// The set a restore reads, resolved once by the controller (from the spec, or the
/// VolumeBackup it names) and kept in the status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedSource {
    pub target: String,
    pub volume: String,
    /// A set id, or `latest`.
    pub set: String,
}

/// One claim a restore makes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoredClaim {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ClaimPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What localnfs reports on a VolumeRestore.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRestoreStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub claims: Vec<RestoredClaim>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What the claims are restored from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ResolvedSource>,
}

/// Claims made from a backup set.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct VolumeRestore {
    pub metadata: ObjectMeta,
    pub spec: VolumeRestoreSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VolumeRestoreStatus>,
}

/// `kube::Resource` for a namespaced `localnfs.io/v1alpha1` kind (what the `derive`
/// feature would generate), and `Serialize` with `apiVersion` and `kind` (the API
/// server refuses an object without them).
macro_rules! resource {
    ($ty:ty, $kind:literal, $plural:literal) => {
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeStruct;
                let mut st = s.serialize_struct($kind, 5)?;
                st.serialize_field("apiVersion", API_VERSION)?;
                st.serialize_field("kind", $kind)?;
                st.serialize_field("metadata", &self.metadata)?;
                st.serialize_field("spec", &self.spec)?;
                if let Some(status) = &self.status {
                    st.serialize_field("status", status)?;
                }
                st.end()
            }
        }

        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(GROUP)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(VERSION)
            }
            fn api_version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(API_VERSION)
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

resource!(VolumeBackup, "VolumeBackup", "volumebackups");
resource!(
    VolumeBackupSchedule,
    "VolumeBackupSchedule",
    "volumebackupschedules"
);
resource!(VolumeRestore, "VolumeRestore", "volumerestores");

/// The body of a merge patch of an object's status subresource (`kind` and
/// `apiVersion` included: the API server wants them on custom resources' patches).
pub fn status_patch<K: kube::Resource<DynamicType = ()>>(
    status: &impl Serialize,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_reads_the_documented_shape() {
        let b: VolumeBackup = serde_json::from_value(serde_json::json!({
            "apiVersion": "localnfs.io/v1alpha1",
            "kind": "VolumeBackup",
            "metadata": {"name": "db-nightly-1", "namespace": "shop"},
            "spec": {"claim": "data-mysql-0", "target": "nightly", "keep": 7, "maxAge": "30d"},
            "status": {"phase": "Completed", "node": "node-a", "volume": "pvc-1",
                "set": "20261207T011500.123Z", "bytes": 10, "files": 2, "bytesCopied": 4,
                "bytesLinked": 6, "progressBytes": 10, "bytesPerSecond": 5, "pauseMs": 0.004,
                "startTime": "2026-12-07T01:15:00Z", "completionTime": "2026-12-07T01:15:02Z",
                "durationSeconds": 2.31, "message": "done"}
        }))
        .expect("documented VolumeBackup");
        assert_eq!(b.spec.keep, Some(7));
        assert_eq!(b.spec.max_age.as_deref(), Some("30d"));
        let st = b.status.expect("status");
        assert_eq!(st.phase, Some(Phase::Completed));
        assert_eq!(st.bytes_linked, Some(6));
        assert_eq!(st.pause_ms, Some(0.004));
    }

    #[test]
    fn schedule_and_restore_read_the_documented_shape() {
        let s: VolumeBackupSchedule = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "nightly", "namespace": "shop"},
            "spec": {"schedule": "0 3 * * *", "suspend": false,
                "successfulBackupsHistoryLimit": 3,
                "template": {"claim": "data-mysql-0", "target": "nightly", "keep": 7}},
            "status": {"lastScheduleTime": "2026-12-07T03:00:00Z", "lastBackup": "nightly-202612070300"}
        }))
        .expect("documented VolumeBackupSchedule");
        assert_eq!(s.spec.successful_backups_history_limit, Some(3));
        assert_eq!(s.spec.template.claim, "data-mysql-0");
        let r: VolumeRestore = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {"source": {"target": "nightly", "volume": "pvc-1", "set": "latest"},
                "storageClassName": "localnfs", "size": "20Gi",
                "statefulSet": {"name": "mysql", "template": "data", "replicas": 3}},
            "status": {"phase": "Running", "claims": [{"name": "data-mysql-0", "uid": "u",
                "phase": "Completed", "node": "n", "message": "m"}]}
        }))
        .expect("documented VolumeRestore");
        assert_eq!(r.spec.source.set.as_deref(), Some("latest"));
        assert_eq!(r.spec.stateful_set.map(|s| s.replicas), Some(3));
        assert_eq!(r.status.map(|s| s.claims.len()), Some(1));
    }

    #[test]
    fn objects_are_written_with_their_kind() {
        let v = serde_json::to_value(VolumeBackup::default()).expect("json");
        assert_eq!(v["apiVersion"], API_VERSION);
        assert_eq!(v["kind"], "VolumeBackup");
        assert!(v.get("status").is_none());
        let v = serde_json::to_value(VolumeRestore::default()).expect("json");
        assert_eq!(v["kind"], "VolumeRestore");
    }

    #[test]
    fn status_patches_name_the_kind() {
        let p = status_patch::<VolumeBackup>(&VolumeBackupStatus {
            phase: Some(Phase::Running),
            ..VolumeBackupStatus::default()
        });
        assert_eq!(p["kind"], "VolumeBackup");
        assert_eq!(p["apiVersion"], API_VERSION);
        assert_eq!(p["status"], serde_json::json!({"phase": "Running"}));
    }
}
