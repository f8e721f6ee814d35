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
//! - The restore is the store's (`backup::restore_set_with`): every file's sha256
//!   checked, built in staging and committed whole or not at all; an agent restarted
//!   mid-way finds nothing made and starts over from the request.

use std::path::PathBuf;

use localnfs_nfs::backup;

use super::targets::BackupTargets;
use crate::objects::request::RestoreSource;

/// The set a restore reads: `<target dir>/<volume>/<set>` for a set id, or the newest
/// complete set for `latest`. Blocking (lists the target for `latest`). `Err` says why
/// not, for the claim's event and the VolumeRestore's status.
pub fn find_set(targets: &BackupTargets, source: &RestoreSource) -> Result<PathBuf, String> {
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
            find_set(&t, &source("nightly", "latest")),
            Ok(dir.path().join("pvc-1/20261208T011500.123Z"))
        );
        assert_eq!(
            find_set(&t, &source("nightly", "20261207T011500.123Z")),
            Ok(dir.path().join("pvc-1/20261207T011500.123Z"))
        );
    }

    #[test]
    fn a_restore_naming_an_unknown_target_or_a_path_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        sets(dir.path());
        let t = targets(dir.path());
        let why = find_set(&t, &source("/etc", "latest")).expect_err("unknown");
        assert!(why.contains("unknown backup target"), "{why}");
        assert!(why.contains("nightly"), "{why}");
        let why = find_set(&t, &source("nightly", "../../etc")).expect_err("a path");
        assert!(why.contains("neither a set id"), "{why}");
    }

    #[test]
    fn an_unfinished_or_missing_set_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        sets(dir.path());
        let t = targets(dir.path());
        let why = find_set(&t, &source("nightly", "20261209T011500.123Z")).expect_err("partial");
        assert!(why.contains("not complete"), "{why}");
        let why = find_set(&t, &source("nightly", "20261201T011500.123Z")).expect_err("missing");
        assert!(why.contains("no complete set"), "{why}");
    }
}
