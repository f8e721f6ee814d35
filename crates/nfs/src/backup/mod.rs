//! Backup sets: a volume as of one instant, written to a directory that survives the
//! node (a network volume mounted on the node), and restored into a new volume.
//!
//! Layout under a target directory:
//! ```text
//! <volume>/.lock                    flock'ed while a backup of <volume> writes here
//! <volume>/<set-id>/data/           the files, directories and symlinks (data only)
//! <volume>/<set-id>/manifest.json   every object: path, kind, mode, uid/gid, size,
//!                                   mtime, sha256 (regular files), symlink target,
//!                                   hard link (first name of the same inode), rdev;
//!                                   the volume's spec (size, owner, squash, …) and
//!                                   its owner record (the claim it was made for)
//! <volume>/<set-id>/COMPLETE        summary (time, bytes, files, copied, linked);
//!                                   written last
//! <volume>/<set-id>.partial/        a set being written
//! ```
//! A set id is the UTC time of its instant (`20261207T011500.123Z`), so ids sort in
//! time order. A directory is a set only when its name is a set id (no `.partial`
//! suffix) and it holds `COMPLETE`: listing and restore ignore anything else, and the
//! next backup of the volume removes a set-id or `<set-id>.partial` directory without
//! `COMPLETE`. Any other name under `<volume>/` is not ours and is left alone. A
//! target inside the volume store (or holding it under `<volume>/`) is refused, even
//! with `allow_same_device`: `<target>/<volume>` could be a live volume. A set is built in `<set-id>.partial`, made durable
//! (`syncfs` of the target), `COMPLETE` written and synced last, then renamed into
//! place: nothing half-made is ever a set.
//!
//! The copy is the point-in-time engine's (`Exports::snapshot_volume`): the source's
//! clients see only the snapshot pause. The snapshot is built in the store's staging
//! directory (reflinked where the file system can, else copied: it needs room on the
//! node's disk for what is not shared) and removed once the set is written. Before it
//! is taken, the target is probed (a small file created, synced, removed) and the
//! node's free space less what the volumes are promised must cover the source's used
//! bytes, so neither a dead target nor the snapshot eats space other volumes own.
//!
//! **Incremental**: a set after the first copies only the regular files whose size or
//! sha256 differ from the newest complete set's entry for the same path (the engine
//! already checksummed every file); an unchanged file is hard-linked from that set, or
//! copied when the target refuses links or that set's file is no longer what its
//! manifest says (reached through a symlink, not a regular file, another size). So every set holds all its data, is
//! restorable on its own, and deleting an old set never breaks a newer one. Files in
//! `data/` are plain copies owned by the agent: the manifest, not `data/`, carries
//! owners, modes and times (a file linked from an older set shares that set's inode).
//! FIFOs, sockets and device nodes live in the manifest only. Names must be UTF-8.
//!
//! **Retention** ([`prune_plan`]): after a backup, complete sets may be removed by
//! count (`keep`: the newest N) and by age (`max_age`); with both, a set is kept when
//! either rule keeps it. The newest complete set is never removed, nor the set just
//! written (after a clock step back it may not be the newest by id). Failing to remove
//! an expired set does not fail the backup: the set just written is complete, and the
//! failure is a warning in [`BackupReport::warnings`].
//!
//! **Restore** ([`restore_set`]): a complete set into a new volume, each file's sha256
//! checked as it is written (a mismatch fails the restore, leaving nothing), committed
//! like a copy (`VolumeStore::commit_copy`). A set file is opened one name at a time
//! beneath `data/` without following symlinks (a symlinked file or directory planted
//! there is refused), must be a regular file of the manifest's size (checked before
//! reading; never read past it), so a FIFO or a huge file cannot hang the restore or
//! fill the node. The items' sizes and count, not the summary, are checked against the
//! new volume's size and object limit before anything is written. A restore for a
//! claim ([`RestoreOptions::owner`]) takes only a set whose owner record is in that
//! claim's namespace, and records the claim as the new volume's owner. Paths in a manifest
//! that leave the volume are refused. Character and block devices are refused unless
//! the store allows device nodes ([`RestoreOptions::device_nodes`]); owners, modes
//! (setuid and setgid bits included) come from the manifest as recorded, so whoever
//! can write the target can choose them.

mod metrics;
mod restore;
mod write;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::volume::{Owner, VolumeName, VolumeSpec};

pub use metrics::BackupCollector;
pub use restore::{RestoreOptions, RestoreReport, owner_check, restore_set, restore_set_with};
pub use write::{BackupOptions, BackupReport};

/// The marker that makes a set directory a set; written last.
pub const COMPLETE: &str = "COMPLETE";
/// Every object of the set.
pub const MANIFEST: &str = "manifest.json";
/// The set's file tree.
pub const DATA: &str = "data";
/// Suffix of a set being written.
pub const PARTIAL: &str = ".partial";

/// What an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Socket,
    Char,
    Block,
}

/// One object of a set; the volume's root is path `.`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub path: String,
    pub kind: Kind,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Another name of the same regular file, listed earlier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rdev: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A set at a glance: what `COMPLETE` holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// The instant, in milliseconds since the epoch.
    pub created_ms: u64,
    /// Regular-file data in the set (each inode once).
    pub bytes: u64,
    pub files: u64,
    /// Bytes written to the target for this set.
    pub bytes_copied: u64,
    /// Bytes hard-linked from the previous set.
    pub bytes_linked: u64,
    /// The set unchanged files were linked from.
    pub base: Option<String>,
}

/// `manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub volume: VolumeName,
    pub set: String,
    /// The volume as it was made: a restore makes the new volume the same way.
    pub spec: VolumeSpec,
    /// The backed-up volume's owner record (the claim it was made for); absent for a
    /// volume without one, and in sets written before sets recorded it. A restore for
    /// a claim requires it, in the claim's namespace ([`restore::owner_check`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    pub summary: Summary,
    pub items: Vec<Item>,
}

/// A set directory found under a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetInfo {
    pub id: String,
    pub path: PathBuf,
    /// `None`: not a set (no `COMPLETE`, or a `.partial`).
    pub summary: Option<Summary>,
}

fn io_fail(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::VolumeIo {
        action,
        path,
        source,
    }
}

/// Every set directory of `volume` under `target`, complete or not, oldest first.
pub fn list_sets(target: &Path, volume: &VolumeName) -> Result<Vec<SetInfo>> {
    let dir = target.join(volume.as_str());
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_fail("list backup sets", &dir)(e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(io_fail("list backup sets", &dir))?;
        let Some(id) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        // Only names this module makes: anything else under the target is someone
        // else's, never listed, so never removed as an unfinished set.
        if !is_set_id(id.strip_suffix(PARTIAL).unwrap_or(&id)) || !e.path().is_dir() {
            continue;
        }
        let summary = if id.ends_with(PARTIAL) {
            None
        } else {
            std::fs::read(e.path().join(COMPLETE))
                .ok()
                .and_then(|b| serde_json::from_slice::<Summary>(&b).ok())
        };
        out.push(SetInfo {
            id,
            path: e.path(),
            summary,
        });
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// The volumes that have a directory under `target`.
pub fn list_volumes(target: &Path) -> Result<Vec<VolumeName>> {
    let entries = std::fs::read_dir(target).map_err(io_fail("list backup target", target))?;
    let mut out: Vec<VolumeName> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().and_then(|n| VolumeName::new(n).ok()))
        .collect();
    out.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Ok(out)
}

/// The manifest of the complete set at `set`; a directory without `COMPLETE` is not
/// a set.
pub fn read_manifest(set: &Path) -> Result<Manifest> {
    let not_a_set = |why: String| Error::RestoreFailed {
        set: set.to_owned(),
        name: String::new(),
        why,
    };
    if set
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(PARTIAL))
        || !set.join(COMPLETE).is_file()
    {
        return Err(not_a_set(
            "not a complete backup set (no COMPLETE marker: unfinished or not a set)".into(),
        ));
    }
    let path = set.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(io_fail("read a backup manifest", &path))?;
    serde_json::from_slice(&bytes).map_err(|e| not_a_set(format!("unreadable manifest: {e}")))
}

/// The set ids (oldest first, complete sets only, with their instants in ms) that
/// retention removes: outside the newest `keep` when `keep` is given, and older than
/// `max_age` at `now_ms` when it is given; a set either rule keeps stays; the newest
/// set always stays, and so does set `written` (the one just written: after the clock
/// stepped back it is not the newest by id); no rule, nothing removed.
pub fn prune_plan(
    sets: &[(String, u64)],
    keep: Option<usize>,
    max_age: Option<Duration>,
    now_ms: u64,
    written: &str,
) -> Vec<String> {
    if keep.is_none() && max_age.is_none() {
        return Vec::new();
    }
    let n = sets.len();
    sets.iter()
        .enumerate()
        .filter(|&(i, (_, created))| {
            let newest = i + 1 == n;
            let kept_by_count = keep.is_some_and(|k| n - i <= k);
            let kept_by_age = max_age.is_some_and(|d| {
                now_ms.saturating_sub(*created) <= u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
            });
            !newest && !kept_by_count && !kept_by_age
        })
        .filter(|(_, (id, _))| id != written)
        .map(|(_, (id, _))| id.clone())
        .collect()
}

/// A set id for the instant `ms` (milliseconds since the epoch, UTC):
/// `YYYYMMDDTHHMMSS.mmmZ`, which sorts in time order.
pub fn set_id(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

/// Whether `name` has the shape of [`set_id`]'s ids (`YYYYMMDDTHHMMSS.mmmZ`).
pub fn is_set_id(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 20
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 => c == b'T',
            15 => c == b'.',
            19 => c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// Reads `sha256sum`-style lines (as the copy engine writes its manifest) into path →
/// hex digest; escaped lines (leading `\`) have `\n` and `\\` undone.
pub(crate) fn parse_sha256sum(text: &[u8]) -> HashMap<Vec<u8>, String> {
    let mut out = HashMap::new();
    for line in text.split(|&b| b == b'\n') {
        let (escaped, line) = match line.strip_prefix(b"\\") {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        if line.len() < 66 || &line[64..66] != b"  " {
            continue;
        }
        let hash = String::from_utf8_lossy(&line[..64]).into_owned();
        let raw = &line[66..];
        let mut path = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            if escaped && raw[i] == b'\\' && i + 1 < raw.len() {
                path.push(if raw[i + 1] == b'n' {
                    b'\n'
                } else {
                    raw[i + 1]
                });
                i += 2;
            } else {
                path.push(raw[i]);
                i += 1;
            }
        }
        out.insert(path, hash);
    }
    out
}

/// Opens file `rel` beneath a set's data directory `from`, one component
/// at a time with `O_NOFOLLOW`, so a symlink anywhere in the set (a file or a
/// directory) is refused, not followed; `O_NONBLOCK` so a FIFO planted there does not
/// hang the open.
pub(crate) fn open_in_set(from: &std::fs::File, rel: &Path) -> std::io::Result<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let names: Vec<_> = rel.components().map(|c| c.as_os_str()).collect();
    let mut dir: Option<std::fs::File> = None;
    for (i, name) in names.iter().enumerate() {
        let last = i + 1 == names.len();
        let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(*name))
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let flags = libc::O_RDONLY
            | libc::O_NOFOLLOW
            | libc::O_CLOEXEC
            | if last {
                libc::O_NONBLOCK
            } else {
                libc::O_DIRECTORY
            };
        let at = dir.as_ref().unwrap_or(from).as_raw_fd();
        // SAFETY: a directory descriptor we hold and a NUL-terminated name, valid for
        // the call.
        let fd = unsafe { libc::openat(at, c.as_ptr(), flags) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor openat just returned, owned by nothing else.
        dir = Some(unsafe { std::fs::File::from_raw_fd(fd) });
    }
    dir.ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// Why a write to or read from the target failed, in the words a user acts on.
pub(crate) fn target_error(what: &str, e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => format!("the backup target is full ({what}: {e})"),
        Some(
            libc::EIO
            | libc::ESTALE
            | libc::ENOTCONN
            | libc::ETIMEDOUT
            | libc::EHOSTDOWN
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::ECONNREFUSED
            | libc::ENODEV,
        ) => format!("the backup target is unreachable ({what}: {e})"),
        _ => format!("{what}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sets(ages_h: &[u64]) -> Vec<(String, u64)> {
        // Oldest first, `now` is hour 100.
        ages_h
            .iter()
            .map(|h| (format!("s{h:03}"), (100 - h) * 3_600_000))
            .collect()
    }
    const NOW: u64 = 100 * 3_600_000;
    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn no_rule_prunes_nothing() {
        assert!(prune_plan(&sets(&[50, 40, 1]), None, None, NOW, "").is_empty());
    }

    #[test]
    fn keep_count_prunes_the_oldest_beyond_it() {
        assert_eq!(
            prune_plan(&sets(&[50, 40, 30, 1]), Some(2), None, NOW, ""),
            vec!["s050", "s040"]
        );
    }

    #[test]
    fn max_age_prunes_older_sets() {
        assert_eq!(
            prune_plan(&sets(&[50, 40, 3, 1]), None, Some(10 * HOUR), NOW, ""),
            vec!["s050", "s040"]
        );
    }

    #[test]
    fn the_newest_set_is_never_pruned_even_when_old() {
        assert_eq!(
            prune_plan(&sets(&[50, 40]), Some(0), Some(HOUR), NOW, ""),
            vec!["s050"]
        );
    }

    #[test]
    fn the_set_just_written_is_never_pruned_even_when_a_newer_id_exists() {
        // The clock stepped back: the set just written (s050) sorts before s001.
        assert_eq!(
            prune_plan(&sets(&[40, 50, 1]), Some(1), None, NOW, "s050"),
            vec!["s040"]
        );
    }

    #[test]
    fn with_both_rules_a_set_either_keeps_stays() {
        // keep 1 keeps s001; 10 h keeps s003; s050 and s040 go.
        assert_eq!(
            prune_plan(&sets(&[50, 40, 3, 1]), Some(1), Some(10 * HOUR), NOW, ""),
            vec!["s050", "s040"]
        );
        // keep 3 keeps s040 too, though it is old.
        assert_eq!(
            prune_plan(&sets(&[50, 40, 3, 1]), Some(3), Some(10 * HOUR), NOW, ""),
            vec!["s050"]
        );
    }

    #[test]
    fn set_ids_are_utc_times_that_sort() {
        assert_eq!(set_id(0), "19700101T000000.000Z");
        assert_eq!(set_id(1_798_594_215_123), "20261230T013015.123Z");
        assert!(set_id(1_000) < set_id(86_400_000));
        assert!(is_set_id(&set_id(1_798_594_215_123)));
        for not in [
            "db",
            "20261230T013015.123",
            "20261230X013015.123Z",
            ".lock",
            "",
        ] {
            assert!(!is_set_id(not), "{not}");
        }
    }

    #[test]
    fn engine_manifest_lines_are_read_back_with_escapes() {
        let h = "a".repeat(64);
        let text = format!("{h}  dir/file\n\\{h}  new\\nline\\\\x\n");
        let m = parse_sha256sum(text.as_bytes());
        assert_eq!(m.get(b"dir/file".as_slice()), Some(&h));
        assert_eq!(m.get(b"new\nline\\x".as_slice()), Some(&h));
    }
}
