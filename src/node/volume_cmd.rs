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
//! its request if no agent answered in time. `localnfs volume backup` asks the same
//! way (`backup_cmd`), through the request helpers here.

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

pub(super) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
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
    for ext in ["json", "running"] {
        if request_file(root, &c.name, ext).exists() {
            return Err(Error::Nfs(localnfs_nfs::Error::VolumeExists {
                name: c.name.to_string(),
            }));
        }
    }
    let bytes = serde_json::to_vec(&request).map_err(|e| Error::BuildObject(e.to_string()))?;
    let answer = ask_agent(&dir, c.name.as_str(), &bytes, c.timeout, || {
        format!(
            "the node agent serving {} to copy {} into {} (is `localnfs node` running on this root?)",
            root.display(),
            c.source,
            c.name
        )
    })?;
    let answer = serde_json::from_slice::<CopyAnswer>(&answer)
        .map_err(|e| Error::BuildObject(format!("unreadable copy answer: {e}")))?;
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

/// Leaves request `bytes` for the agent as `<dir>/<key>.json`, waits for its answer
/// `<key>.result` and returns it. `what` names the wait in the timeout error.
pub(super) fn ask_agent(
    dir: &Path,
    key: &str,
    bytes: &[u8],
    timeout: Duration,
    what: impl FnOnce() -> String,
) -> Result<Vec<u8>> {
    let path = dir.join(format!("{key}.json"));
    write_atomic(&path, bytes, 0o600)?;
    let answer_path = dir.join(format!("{key}.result"));
    let started = Instant::now();
    loop {
        match std::fs::read(&answer_path) {
            Ok(b) => {
                let _ = std::fs::remove_file(&answer_path);
                return Ok(b);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("read the agent's answer", &answer_path)(e)),
        }
        if started.elapsed() > timeout {
            // Unclaimed: withdrawn, so no agent starts it later. Claimed: the agent
            // finishes it and leaves the answer.
            let _ = std::fs::remove_file(&path);
            return Err(Error::Timeout {
                what: what(),
                after: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Claims the requests waiting in `dir` (renamed `<key>.running`; one agent, once)
/// and returns them.
pub(super) fn claim_requests(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let running = path.with_extension("running");
        // A request withdrawn meanwhile is gone.
        if std::fs::rename(&path, &running).is_ok() {
            out.push(running);
        }
    }
    out
}

/// Answers every request in `dir` that an agent restart cut short with `answer`.
pub(super) fn answer_interrupted<T: Serialize>(dir: &Path, answer: &T) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "running") {
            answer_and_forget(&path, answer);
        }
    }
}

/// Answers copy requests left by a `localnfs volume copy` that an agent restart cut
/// short (call once, when the agent starts).
pub fn fail_interrupted_copies(root: &Path) {
    let answer = CopyAnswer {
        error: Some("the node agent restarted during the copy; nothing was made".into()),
        ..CopyAnswer::default()
    };
    answer_interrupted(&requests_dir(root), &answer);
}

/// Starts the copies requested since the last call, each on a thread of its own.
pub fn serve_copy_requests(exports: &Arc<Exports>) {
    serve_requests(
        exports,
        &requests_dir(exports.store().root()),
        run_copy,
        |why| CopyAnswer {
            error: Some(format!("unreadable copy request: {why}")),
            ..CopyAnswer::default()
        },
    );
}

/// Claims the requests waiting in `dir` and serves each on a thread of its own:
/// `run` answers a request that parses, `unreadable` one that does not.
pub(super) fn serve_requests<Req, Ans>(
    exports: &Arc<Exports>,
    dir: &Path,
    run: fn(&Exports, &Req) -> Ans,
    unreadable: fn(String) -> Ans,
) where
    Req: serde::de::DeserializeOwned + 'static,
    Ans: Serialize + 'static,
{
    for running in claim_requests(dir) {
        let exports = exports.clone();
        std::thread::spawn(move || {
            let answer = match std::fs::read(&running)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Req>(&b).map_err(|e| e.to_string()))
            {
                Ok(req) => run(&exports, &req),
                Err(why) => unreadable(why),
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
pub(super) fn answer_and_forget<T: Serialize>(running: &Path, answer: &T) {
    let done = running.with_extension("result");
    let written = serde_json::to_vec(answer)
        .map_err(|e| e.to_string())
        .and_then(|b| write_atomic(&done, &b, 0o600).map_err(|e| e.to_string()));
    if let Err(e) = written {
        tracing::error!(error = %e, path = %done.display(), "cannot write an answer to `localnfs volume`");
    }
    let _ = std::fs::remove_file(running);
}

pub fn run(args: VolumeArgs) -> Result<()> {
    // These need no store of their own (or open it themselves).
    let command = match args.command {
        VolumeCommand::Backup(b) => return super::backup_cmd::backup(&args.root, b),
        VolumeCommand::Backups { to, volume } => return super::backup_cmd::list(&to, volume),
        VolumeCommand::Restore(r) => return super::backup_cmd::restore(&args.root, r),
        other => other,
    };
    let store = VolumeStore::open(&args.root)?;
    match command {
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
        VolumeCommand::Backup(_) | VolumeCommand::Backups { .. } | VolumeCommand::Restore(_) => {}
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
