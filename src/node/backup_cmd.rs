//! `localnfs volume backup`, `backups` and `restore` (see `localnfs_nfs::backup` for
//! the set layout).
//!
//! A backup needs the running agent, as `localnfs volume copy` does (only the process
//! serving a volume can copy it as of one instant): the command leaves
//! `<root>/backup-requests/<volume>.json` and waits for `<volume>.result`; the agent
//! claims requests on each refresh ([`serve_backup_requests`]) and runs each on a
//! thread of its own (`Exports::backup_volume`). A request a restart cut short is
//! answered with that error when the agent starts; the set it was writing stays
//! unfinished on the target (never listed) and the next backup of the volume removes
//! it. The target path is read by the agent, so in a cluster it is where the agent
//! pod mounts the backup volume.
//!
//! Listing reads the target directly. A restore makes a new volume in the store
//! directly, as `localnfs volume create` does (a running agent serves it within a
//! refresh): no live volume is read, so no agent is needed.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::volume_cmd::{answer_interrupted, ask_agent, io_err, serve_requests};
use crate::cli::{BackupVolume, RestoreVolume};
use crate::error::{Error, Result};
use crate::nfs::Exports;
use crate::volume::{VolumeName, VolumeStore};
use localnfs_nfs::backup::{self, BackupOptions};

/// A backup asked of the agent.
#[derive(Debug, Serialize, Deserialize)]
struct BackupRequest {
    volume: VolumeName,
    to: std::path::PathBuf,
    keep: Option<usize>,
    max_age_secs: Option<u64>,
    allow_same_device: bool,
}

/// The agent's answer.
#[derive(Debug, Default, Serialize, Deserialize)]
struct BackupAnswer {
    /// Why it failed; absent on success.
    error: Option<String>,
    set: String,
    bytes: u64,
    files: u64,
    bytes_copied: u64,
    bytes_linked: u64,
    pause_ms: f64,
    took_ms: f64,
    pruned: Vec<String>,
    /// What went wrong after the set was complete (retention).
    #[serde(default)]
    warnings: Vec<String>,
}

fn requests_dir(root: &Path) -> std::path::PathBuf {
    root.join("backup-requests")
}

fn failed(volume: &VolumeName, to: &Path, why: String) -> Error {
    Error::Nfs(localnfs_nfs::Error::BackupFailed {
        volume: volume.to_string(),
        target: to.to_owned(),
        why,
    })
}

/// `localnfs volume backup`: asks the agent, waits for its answer, prints it.
pub fn backup(root: &Path, b: BackupVolume) -> Result<()> {
    let dir = requests_dir(root);
    std::fs::create_dir_all(&dir).map_err(io_err("create the backup request directory", &dir))?;
    for ext in ["json", "running"] {
        if dir.join(format!("{}.{ext}", b.volume)).exists() {
            return Err(failed(
                &b.volume,
                &b.to,
                "a backup of this volume is already requested or running".into(),
            ));
        }
    }
    // The agent may run elsewhere in the file system's view (a pod): it gets the path
    // as given, made absolute here so it does not depend on the agent's directory.
    let to = std::path::absolute(&b.to).map_err(io_err("resolve the backup target", &b.to))?;
    let request = BackupRequest {
        volume: b.volume.clone(),
        to: to.clone(),
        keep: b.keep,
        max_age_secs: b.max_age.map(|d| d.as_secs()),
        allow_same_device: b.allow_same_device,
    };
    let bytes = serde_json::to_vec(&request).map_err(|e| Error::BuildObject(e.to_string()))?;
    let answer = ask_agent(&dir, b.volume.as_str(), &bytes, b.timeout, || {
        format!(
            "the node agent serving {} to back up {} (is `localnfs node` running on this root?)",
            root.display(),
            b.volume
        )
    })?;
    let a = serde_json::from_slice::<BackupAnswer>(&answer)
        .map_err(|e| Error::BuildObject(format!("unreadable backup answer: {e}")))?;
    if let Some(why) = a.error {
        return Err(failed(&b.volume, &to, why));
    }
    println!(
        "backup set {} of volume {} in {}: {} bytes in {} files, {} bytes copied, {} bytes linked from the previous set, source paused {:.3} ms, took {:.1} ms",
        a.set,
        b.volume,
        to.join(b.volume.as_str()).join(&a.set).display(),
        a.bytes,
        a.files,
        a.bytes_copied,
        a.bytes_linked,
        a.pause_ms,
        a.took_ms
    );
    for id in a.pruned {
        println!("removed expired set {id}");
    }
    for w in a.warnings {
        eprintln!("warning: {w}");
    }
    Ok(())
}

/// `localnfs volume backups`: the sets under `to`.
pub fn list(to: &Path, volume: Option<VolumeName>) -> Result<()> {
    let volumes = match volume {
        Some(v) => vec![v],
        None => backup::list_volumes(to)?,
    };
    println!(
        "{:<30} {:<26} {:>14} {:>8} {:>14} {:>14} {:>8}",
        "VOLUME", "SET (UTC TIME)", "BYTES", "FILES", "COPIED", "LINKED", "COMPLETE"
    );
    for v in volumes {
        for s in backup::list_sets(to, &v)? {
            let m = s.summary.clone().unwrap_or_default();
            println!(
                "{:<30} {:<26} {:>14} {:>8} {:>14} {:>14} {:>8}",
                v.as_str(),
                s.id,
                m.bytes,
                m.files,
                m.bytes_copied,
                m.bytes_linked,
                if s.summary.is_some() { "yes" } else { "no" }
            );
        }
    }
    Ok(())
}

/// `localnfs volume restore`: the set into a new volume of the store at `root`.
pub fn restore(root: &Path, r: RestoreVolume) -> Result<()> {
    let store = VolumeStore::open(root)?;
    let opts = backup::RestoreOptions {
        size: r.size,
        device_nodes: r.allow_device_nodes,
        owner: None,
    };
    let (meta, report) = backup::restore_set_with(&store, &r.from, &r.name, &opts)?;
    println!(
        "volume {} (id {}) restored from {}: {} bytes in {} files, size {} bytes, took {:.1} ms",
        meta.name,
        meta.id,
        r.from.display(),
        report.bytes,
        report.files,
        meta.size_bytes,
        report.took.as_secs_f64() * 1e3
    );
    Ok(())
}

/// Answers backup requests an agent restart cut short (call once, at start).
pub fn fail_interrupted_backups(root: &Path) {
    let answer = BackupAnswer {
        error: Some(
            "the node agent restarted during the backup; no set was made (the next backup removes what it wrote)"
                .into(),
        ),
        ..BackupAnswer::default()
    };
    answer_interrupted(&requests_dir(root), &answer);
}

/// Starts the backups requested since the last call, each on a thread of its own.
pub fn serve_backup_requests(exports: &Arc<Exports>) {
    serve_requests(
        exports,
        &requests_dir(exports.store().root()),
        run_backup,
        |why| BackupAnswer {
            error: Some(format!("unreadable backup request: {why}")),
            ..BackupAnswer::default()
        },
    );
}

fn run_backup(exports: &Exports, req: &BackupRequest) -> BackupAnswer {
    let opts = BackupOptions {
        keep: req.keep,
        max_age: req.max_age_secs.map(std::time::Duration::from_secs),
        allow_same_device: req.allow_same_device,
        progress: None,
    };
    match exports.backup_volume(&req.volume, &req.to, &opts) {
        Ok(r) => BackupAnswer {
            error: None,
            set: r.id,
            bytes: r.summary.bytes,
            files: r.summary.files,
            bytes_copied: r.summary.bytes_copied,
            bytes_linked: r.summary.bytes_linked,
            pause_ms: r.pause.as_secs_f64() * 1e3,
            took_ms: r.took.as_secs_f64() * 1e3,
            pruned: r.pruned,
            warnings: r.warnings,
        },
        Err(e) => {
            tracing::warn!(error = %e, "backup requested by `localnfs volume backup` failed");
            // The error already names the volume and target; the command adds them.
            let why = match e {
                localnfs_nfs::Error::BackupFailed { why, .. } => why,
                e => e.to_string(),
            };
            BackupAnswer {
                error: Some(why),
                ..BackupAnswer::default()
            }
        }
    }
}
