//! The agent's side of a `VolumeRestore`: a request of version 3 names a backup set
//! (`objects::request::RestoreSource`), and the agent fills the claim's new volume
//! from it before it answers ready, so no pod can use the volume until it holds the
//! whole set.
//!
//! - The target is a NAME, resolved among this agent's `--backup-target`s
//!   ([`find_set`]); an unknown name is refused, never read as a path. The set is a set
//!   id or `latest` (the newest complete set at the time of the restore); anything else
//!   is refused, so no request can lead the agent outside `<target>/<volume>/`.
//! - The set's owner record must be in the claim's namespace (`backup::owner_check`,
//!   done by the restore as it reads the manifest): naming another namespace's volume
//!   or set gets nothing.
//! - The set must have been made since the claim's namespace was created
//!   ([`namespace_since`], [`find_set`]): a namespace deleted and created again with
//!   the same name does not inherit the sets of the earlier one, though their owner
//!   records name the same namespace. Sets are named by their UTC time, so a set id
//!   older than the end of the second of the namespace's `creationTimestamp` is an
//!   earlier namespace's. Only
//!   an operator restores such a set, with `localnfs volume restore` on the node. (The
//!   set id is the agent's clock, the namespace's time the API server's: clocks apart
//!   by more than the time between a backup and the namespace's re-creation could let
//!   one through.)
//! - The restore is the store's (`backup::restore_set_with`): every file's sha256
//!   checked, built in staging and committed whole or not at all; an agent restarted
//!   mid-way finds nothing made and starts over from the request.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Namespace;
use localnfs_nfs::backup;

use super::targets::BackupTargets;
use crate::objects::request::RestoreSource;

/// The first set id of namespace `ns` (see the module doc): the end of the second it
/// was created in (`creationTimestamp` is to the second, so a namespace shown created
/// at 08:08:39 may be younger than a set of 08:08:39.182). A set of a claim of that
/// namespace is named no earlier; one made in the namespace's first second is
/// refused, the safe side. `Ok(Err)`: the namespace is gone (why, for the claim);
/// `Err`: it could not be read (tried again).
pub async fn namespace_since(
    client: &kube::Client,
    ns: &str,
) -> crate::error::Result<Result<String, String>> {
    let found = kube::Api::<Namespace>::all(client.clone())
        .get_opt(ns)
        .await
        .map_err(crate::error::Error::kube(format!("read namespace {ns}")))?;
    let created = found
        .and_then(|n| n.metadata.creation_timestamp)
        .map(|t| t.0.as_millisecond());
    Ok(match created {
        Some(ms) => Ok(backup::set_id(
            u64::try_from(ms).unwrap_or(0).saturating_add(1000),
        )),
        None => Err(format!("namespace {ns} does not exist")),
    })
}

/// The set a restore reads: `<target dir>/<volume>/<set>` for a set id, or the newest
/// complete set for `latest`, refused if made before `since` (the claim's namespace's
/// creation, [`namespace_since`]). Blocking (lists the target for `latest`). `Err`
/// says why not, for the claim's event and the VolumeRestore's status.
pub fn find_set(
    targets: &BackupTargets,
    source: &RestoreSource,
    since: &str,
) -> Result<PathBuf, String> {
    let Some(dir) = targets.get(&source.target) else {
        return Err(format!(
            "unknown backup target {:?}: this node agent has {}",
            source.target,
            if targets.is_empty() {
                "no backup targets (--backup-target NAME=DIR)".to_owned()
            } else {
                format!("targets {}", targets.names())
            }
        ));
    };
    if source.set != "latest" && !backup::is_set_id(&source.set) {
        return Err(format!(
            "set {:?} is neither a set id (like 20261207T011500.123Z) nor `latest`",
            source.set
        ));
    }
    let sets = backup::list_sets(dir, &source.volume)
        .map_err(|e| format!("cannot list the sets of volume {}: {e}", source.volume))?;
    let found = sets
        .iter()
        .rev()
        .filter(|s| s.summary.is_some())
        .find(|s| source.set == "latest" || s.id == source.set);
    match found {
        Some(s) if s.id.as_str() < since => Err(format!(
            "set {} of volume {} was made before namespace {} was created ({since}): it belongs to an earlier namespace of that name; only an operator may restore it, with `localnfs volume restore` on the node",
            s.id, source.volume, source.namespace
        )),
        Some(s) => Ok(s.path.clone()),
        None if sets.iter().any(|s| s.id == source.set) => Err(format!(
            "set {} of volume {} in target {} is not complete (no COMPLETE marker)",
            source.set, source.volume, source.target
        )),
        None => Err(format!(
            "no complete set {} of volume {} in target {}",
            source.set, source.volume, source.target
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::targets::{BackupTarget, BackupTargets};
    use crate::volume::VolumeName;

    fn source(target: &str, set: &str) -> RestoreSource {
        RestoreSource {
            target: target.into(),
            volume: VolumeName::new("pvc-1").expect("name"),
            set: set.into(),
            namespace: "shop".into(),
        }
    }

    /// A namespace created before every set of [`sets`].
    const SINCE: &str = "20261101T000000.000Z";

    fn targets(dir: &std::path::Path) -> BackupTargets {
        BackupTargets::new(&[BackupTarget {
            name: "nightly".into(),
            dir: dir.to_owned(),
        }])
        .expect("targets")
    }

    /// Two complete sets and an unfinished newer one, as the backup code lays them out.
    fn sets(dir: &std::path::Path) {
        for (id, complete) in [
            ("20261207T011500.123Z", true),
            ("20261208T011500.123Z", true),
            ("20261209T011500.123Z", false),
        ] {
            let set = dir.join("pvc-1").join(id);
            std::fs::create_dir_all(&set).expect("mkdir");
            if complete {
                let summary = serde_json::to_vec(&backup::Summary::default()).expect("json");
                std::fs::write(set.join(backup::COMPLETE), summary).expect("write");
            }
        }
    }

    #[test]
    fn latest_is_the_newest_complete_set() {
        let dir = tempfile::tempdir().expect("dir");
        sets(dir.path());
        let t = targets(dir.path());
        assert_eq!(
            find_set(&t, &source("nightly", "latest"), SINCE),
            Ok(dir.path().join("pvc-1/20261208T011500.123Z"))
        );
        assert_eq!(
            find_set(&t, &source("nightly", "20261207T011500.123Z"), SINCE),
            Ok(dir.path().join("pvc-1/20261207T011500.123Z"))
        );
    }

    #[test]
    fn a_restore_naming_an_unknown_target_or_a_path_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        sets(dir.path());
        let t = targets(dir.path());
        let why = find_set(&t, &source("/etc", "latest"), SINCE).expect_err("unknown");
        assert!(why.contains("unknown backup target"), "{why}");
        assert!(why.contains("nightly"), "{why}");
        let why = find_set(&t, &source("nightly", "../../etc"), SINCE).expect_err("a path");
        assert!(why.contains("neither a set id"), "{why}");
    }

    #[test]
    fn an_unfinished_or_missing_set_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        sets(dir.path());
        let t = targets(dir.path());
        let why =
            find_set(&t, &source("nightly", "20261209T011500.123Z"), SINCE).expect_err("partial");
        assert!(why.contains("not complete"), "{why}");
        let why =
            find_set(&t, &source("nightly", "20261201T011500.123Z"), SINCE).expect_err("missing");
        assert!(why.contains("no complete set"), "{why}");
    }

    #[test]
    fn a_set_made_before_the_namespace_was_created_again_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        sets(dir.path());
        let t = targets(dir.path());
        // The namespace was deleted and made again on 8 December, after the sets of
        // the 7th and at 01:15:00.123 on the 8th.
        let since = "20261208T020000.000Z";
        for set in ["20261207T011500.123Z", "latest"] {
            let why = find_set(&t, &source("nightly", set), since).expect_err("earlier");
            assert!(
                why.contains("was made before namespace shop was created")
                    && why.contains("localnfs volume restore"),
                "{set}: {why}"
            );
        }
        // A set id equal to the cut-off is the namespace's own (the cut-off itself is
        // the end of the namespace's creation second, `namespace_since`).
        assert_eq!(
            find_set(&t, &source("nightly", "latest"), "20261208T011500.123Z"),
            Ok(dir.path().join("pvc-1/20261208T011500.123Z"))
        );
    }
}
