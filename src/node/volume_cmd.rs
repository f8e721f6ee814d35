//! `localnfs volume`: create, resize, delete and list volumes in a node root directly
//! on disk (standalone mode and benchmarks). A running node agent picks changes up
//! within a second.
//!
//! `localnfs volume copy` needs the running agent instead (only the process serving a
//! volume sees every write to it, so only it can copy it as of one instant): the
//! command writes a request, `<root>/copy-requests/<new>.json`, and waits for the
//! answer, `<new>.result`. The agent looks for requests on every refresh
//! ([`serve_copy_requests`]), claims one by renaming it to `<new>.running`, copies
//! (`Exports::copy_volume`) on a thread of its own and writes the answer. A `.running`
//! found when the agent starts was cut short by a restart: it is answered with that
//! error (the store removed the unfinished copy when it opened). The command removes
//! its request if no agent answered in time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cli::{CopyVolume, VolumeArgs, VolumeCommand};
use crate::error::{Error, Result};
use crate::nfs::Exports;
use crate::volume::{VolumeName, VolumeSpec, VolumeStore, write_atomic};

/// A copy asked of the agent.
#[derive(Debug, Serialize, Deserialize)]
struct CopyRequest {
    source: VolumeName,
    name: VolumeName,
    /// The new volume's size; the source's when absent.
    size: Option<u64>,
}

/// The agent's answer.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CopyAnswer {
    /// Why it failed; absent on success.
    error: Option<String>,
    id: u32,
    bytes: u64,
    files: u64,
    pause_ms: f64,
    took_ms: f64,
}

fn requests_dir(root: &Path) -> PathBuf {
    root.join("copy-requests")
}

fn request_file(root: &Path, name: &VolumeName, ext: &str) -> PathBuf {
    requests_dir(root).join(format!("{name}.{ext}"))
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| {
        Error::Nfs(localnfs_nfs::Error::VolumeIo {
            action,
            path,
            source,
        })
    }
}

/// `localnfs volume copy`: asks the agent, waits for its answer, prints it.
fn copy(root: &Path, c: CopyVolume) -> Result<()> {
    let dir = requests_dir(root);
    std::fs::create_dir_all(&dir).map_err(io_err("create the copy request directory", &dir))?;
    let request = CopyRequest {
        source: c.source.clone(),
        name: c.name.clone(),
        size: c.size,
    };
    let path = request_file(root, &c.name, "json");
    for ext in ["json", "running"] {
        if request_file(root, &c.name, ext).exists() {
            return Err(Error::Nfs(localnfs_nfs::Error::VolumeExists {
                name: c.name.to_string(),
            }));
        }
    }
    let bytes = serde_json::to_vec(&request).map_err(|e| Error::BuildObject(e.to_string()))?;
    write_atomic(&path, &bytes, 0o600)?;
    let answer_path = request_file(root, &c.name, "result");
    let started = Instant::now();
    let answer = loop {
        match std::fs::read(&answer_path) {
            Ok(b) => {
                let _ = std::fs::remove_file(&answer_path);
                break serde_json::from_slice::<CopyAnswer>(&b)
                    .map_err(|e| Error::BuildObject(format!("unreadable copy answer: {e}")))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("read the copy answer", &answer_path)(e)),
        }
        if started.elapsed() > c.timeout {
            // Unclaimed: withdrawn, so no agent starts it later. Claimed: the agent
            // finishes it and leaves the answer.
            let _ = std::fs::remove_file(&path);
            return Err(Error::Timeout {
                what: format!(
                    "the node agent serving {} to copy {} into {} (is `localnfs node` running on this root?)",
                    root.display(),
                    c.source,
                    c.name
                ),
                after: c.timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    match answer.error {
        Some(why) => Err(Error::Nfs(localnfs_nfs::Error::CopyFailed {
            source_volume: c.source.to_string(),
            name: c.name.to_string(),
            why,
        })),
        None => {
            println!(
                "volume {} (id {}) copied from {}: {} bytes in {} files, source paused {:.3} ms, took {:.1} ms",
                c.name,
                answer.id,
                c.source,
                answer.bytes,
                answer.files,
                answer.pause_ms,
                answer.took_ms
            );
            Ok(())
        }
    }
}

/// Answers copy requests left by a `localnfs volume copy` that an agent restart cut
/// short (call once, when the agent starts).
pub fn fail_interrupted_copies(root: &Path) {
    let Ok(entries) = std::fs::read_dir(requests_dir(root)) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "running") {
            let answer = CopyAnswer {
                error: Some("the node agent restarted during the copy; nothing was made".into()),
                ..CopyAnswer::default()
            };
            answer_and_forget(&path, &answer);
        }
    }
}

/// Starts the copies requested since the last call, each on a thread of its own.
pub fn serve_copy_requests(exports: &Arc<Exports>) {
    let root = exports.store().root().to_owned();
    let Ok(entries) = std::fs::read_dir(requests_dir(&root)) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let running = path.with_extension("running");
        // The claim: one agent, once; a request withdrawn meanwhile is gone.
        if std::fs::rename(&path, &running).is_err() {
            continue;
        }
        let exports = exports.clone();
        std::thread::spawn(move || {
            let answer = match std::fs::read(&running)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<CopyRequest>(&b).map_err(|e| e.to_string()))
            {
                Ok(req) => run_copy(&exports, &req),
                Err(why) => CopyAnswer {
                    error: Some(format!("unreadable copy request: {why}")),
                    ..CopyAnswer::default()
                },
            };
            answer_and_forget(&running, &answer);
        });
    }
}

fn run_copy(exports: &Exports, req: &CopyRequest) -> CopyAnswer {
    let Some(source) = exports.by_name(&req.source) else {
        return CopyAnswer {
            error: Some(format!("volume {} not found", req.source)),
            ..CopyAnswer::default()
        };
    };
    // The new volume is made as the source was (owner, mode, squash, limits, QoS).
    let spec = VolumeSpec {
        name: req.name.clone(),
        size_bytes: req.size.unwrap_or(source.meta.size_bytes),
        ..source.meta.spec.clone()
    };
    match exports.copy_volume(&req.source, &spec, None) {
        Ok((meta, r)) => CopyAnswer {
            error: None,
            id: meta.id,
            bytes: r.bytes,
            files: r.files,
            pause_ms: r.pause.as_secs_f64() * 1e3,
            took_ms: r.took.as_secs_f64() * 1e3,
        },
        Err(e) => {
            tracing::warn!(error = %e, "copy requested by `localnfs volume copy` failed");
            CopyAnswer {
                error: Some(e.to_string()),
                ..CopyAnswer::default()
            }
        }
    }
}

/// Writes the answer beside the request `running` and removes the request.
fn answer_and_forget(running: &Path, answer: &CopyAnswer) {
    let done = running.with_extension("result");
    let written = serde_json::to_vec(answer)
        .map_err(|e| e.to_string())
        .and_then(|b| write_atomic(&done, &b, 0o600).map_err(|e| e.to_string()));
    if let Err(e) = written {
        tracing::error!(error = %e, path = %done.display(), "cannot write a copy answer");
    }
    let _ = std::fs::remove_file(running);
}

pub fn run(args: VolumeArgs) -> Result<()> {
    let store = VolumeStore::open(&args.root)?;
    match args.command {
        VolumeCommand::Create(c) => {
            let mut spec = VolumeSpec {
                uid: c.uid,
                gid: c.gid,
                mode: c.mode,
                squash: c.squash,
                anon_uid: c.anon_uid,
                anon_gid: c.anon_gid,
                max_files: c.max_files,
                // Parameters the command line has no flag for keep their defaults.
                ..VolumeSpec::new(c.name, c.size)
            };
            for (key, value) in &c.params {
                // The command line's parser ran this same call on each pair (its
                // outcome does not depend on the other fields), so it cannot fail here.
                let _checked = spec.set_param(key, value);
            }
            let meta = store.create(&spec)?;
            println!(
                "volume {} (id {}) size {} bytes",
                meta.name, meta.id, meta.size_bytes
            );
        }
        VolumeCommand::Resize { name, size } => {
            let meta = store.resize(&name, size)?;
            println!("volume {} size {} bytes", meta.name, meta.size_bytes);
        }
        VolumeCommand::Copy(c) => copy(&args.root, c)?,
        VolumeCommand::Delete { name } => {
            store.delete(&name)?;
            println!("volume {name} deleted");
        }
        VolumeCommand::List => {
            println!(
                "{:<40} {:>6} {:>14} {:>14} {:>6}",
                "NAME", "ID", "SIZE", "USED", "SQUASH"
            );
            for m in store.list()? {
                let used = store.usage(&m.name)?.bytes;
                println!(
                    "{:<40} {:>6} {:>14} {:>14} {:>6}",
                    m.name,
                    m.id,
                    m.size_bytes,
                    used,
                    format!("{:?}", m.squash).to_lowercase()
                );
            }
        }
    }
    Ok(())
}
