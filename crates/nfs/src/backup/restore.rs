//! Restoring a set into a new volume: built in the store's staging directory like a
//! copy, every file's sha256 checked as it is written (read beneath the set's `data/`
//! without following symlinks, a regular file of the manifest's size, never read past
//! it), the items' total size and count checked first, attributes from the manifest,
//! committed by `VolumeStore::commit_copy` (nothing exists until then; any failure
//! removes the staging directory). Character and block devices only when the store
//! allows device nodes (`RestoreOptions::device_nodes`), as for the server's MKNOD.
//! A restore for a claim (`RestoreOptions::owner`) first checks the set's owner record
//! ([`owner_check`]): a set of another namespace, or one without an owner record, is
//! refused before anything is made, so naming a volume or set cannot hand a tenant
//! another namespace's data.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use super::{DATA, Item, Kind, read_manifest};
use crate::error::{Error, Result};
use crate::volume::{Owner, VolumeMeta, VolumeName, VolumeSpec, VolumeStore};

/// What a restore did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreReport {
    pub bytes: u64,
    pub files: u64,
    pub took: Duration,
}

/// How a restore runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// The new volume's size limit; `None`: the backed-up volume's.
    pub size: Option<u64>,
    /// Make the set's character and block device nodes (the store's
    /// `--allow-device-nodes`, as the server's MKNOD); off: a set holding one is
    /// refused.
    pub device_nodes: bool,
    /// The claim the new volume is for (recorded as its owner); when given, the set
    /// must record an owner in the same namespace ([`owner_check`]). `None`: a restore
    /// by hand on the node, which may take any set.
    pub owner: Option<Owner>,
}

/// Whether a set whose manifest records `recorded` as its volume's owner may be
/// restored for a claim of namespace `namespace`. `Err` says why not.
pub fn owner_check(recorded: Option<&Owner>, namespace: &str) -> std::result::Result<(), String> {
    match recorded {
        None => Err(
            "the set records no owner (it was made before owner records, or of a volume made outside a cluster); restore it with `localnfs volume restore` on a node".into(),
        ),
        Some(o) if o.namespace != namespace => Err(format!(
            "the set belongs to namespace {}, not {namespace}: a claim may be restored only from sets of its own namespace",
            o.namespace
        )),
        Some(_) => Ok(()),
    }
}

/// Restores the complete set at `set` into new volume `name` of `store` (size:
/// `size`, else the backed-up volume's), refusing device nodes. Refused if `name`
/// exists. Blocking.
pub fn restore_set(
    store: &VolumeStore,
    set: &Path,
    name: &VolumeName,
    size: Option<u64>,
) -> Result<(VolumeMeta, RestoreReport)> {
    restore_set_with(
        store,
        set,
        name,
        &RestoreOptions {
            size,
            ..RestoreOptions::default()
        },
    )
}

/// [`restore_set`] with `opts`.
pub fn restore_set_with(
    store: &VolumeStore,
    set: &Path,
    name: &VolumeName,
    opts: &RestoreOptions,
) -> Result<(VolumeMeta, RestoreReport)> {
    let size = opts.size;
    let started = Instant::now();
    let fail = |why: String| Error::RestoreFailed {
        set: set.to_owned(),
        name: name.to_string(),
        why,
    };
    let manifest = read_manifest(set).map_err(|e| match e {
        Error::RestoreFailed { why, .. } => fail(why),
        e => e,
    })?;
    if let Some(owner) = &opts.owner {
        owner_check(manifest.owner.as_ref(), &owner.namespace).map_err(fail)?;
    }
    let spec = VolumeSpec {
        name: name.clone(),
        size_bytes: size.unwrap_or(manifest.spec.size_bytes),
        ..manifest.spec.clone()
    };
    // The same policy as the server's MKNOD: a device node in a volume reaches the
    // node's hardware from any pod that mounts it without `nodev`.
    if !opts.device_nodes
        && let Some(dev) = manifest
            .items
            .iter()
            .find(|i| matches!(i.kind, Kind::Char | Kind::Block))
    {
        return Err(fail(format!(
            "the set holds device node {}, and this store does not allow device nodes (pass --allow-device-nodes to restore them)",
            dev.path
        )));
    }
    // From the items, not the summary: a forged summary must not let a set past the
    // volume's limits. Each inode once (a hard link adds no data).
    let bytes: u64 = manifest
        .items
        .iter()
        .filter(|i| i.kind == Kind::File && i.link.is_none())
        .map(|i| i.size)
        .fold(0u64, u64::saturating_add);
    if bytes > spec.size_bytes {
        return Err(fail(format!(
            "the set holds {bytes} bytes, more than the new volume's size of {} bytes",
            spec.size_bytes
        )));
    }
    let objects = manifest.items.iter().filter(|i| i.path != ".").count() as u64;
    let max_objects = crate::nfs::max_inodes(&spec);
    if objects > max_objects {
        return Err(fail(format!(
            "the set holds {objects} objects, more objects than the new volume may hold ({max_objects})"
        )));
    }
    let staging = store.begin_copy(name)?;
    let dest = staging.data();
    let from = set.join(DATA);
    let mut written = Written::default();
    let r = (|| -> Result<(), String> {
        // Every file of the set is opened beneath this descriptor, one name at a
        // time, never through a symlink (see `backup::open_in_set`).
        let from = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&from)
            .map_err(|e| format!("open the set's data: {e}"))?;
        match fs::DirBuilder::new().mode(0o700).create(&dest) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("create the new volume's directory: {e}")),
        }
        // Directories this restore made: every object goes into one of them, never
        // through a symlink the manifest made earlier.
        let mut dirs: HashSet<&str> = HashSet::from(["."]);
        let mut files: HashSet<&str> = HashSet::new();
        for it in &manifest.items {
            let parent = Path::new(&it.path)
                .parent()
                .and_then(Path::to_str)
                .map(|p| if p.is_empty() { "." } else { p });
            if it.path != "." && !parent.is_some_and(|p| dirs.contains(p)) {
                return Err(format!(
                    "the manifest puts {} outside a directory it made",
                    it.path
                ));
            }
            // A hard link names a file this restore made, nothing else.
            if let Some(first) = &it.link
                && !files.contains(first.as_str())
            {
                return Err(format!(
                    "the manifest links {} to {first}, which it did not make",
                    it.path
                ));
            }
            lay(&from, &dest, it, &mut written)?;
            match it.kind {
                Kind::Dir => {
                    dirs.insert(&it.path);
                }
                Kind::File => {
                    files.insert(&it.path);
                }
                _ => {}
            }
        }
        // Directories last, deepest first, so their times survive their children.
        for it in manifest.items.iter().rev().filter(|i| i.kind == Kind::Dir) {
            attrs(&dest.join(&it.path), it)?;
        }
        let d = fs::File::open(&dest).map_err(|e| format!("open the new volume: {e}"))?;
        // SAFETY: a valid descriptor we own for the duration of the call.
        if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
            return Err(format!(
                "make the new volume durable: {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut lines: Vec<(Vec<u8>, String)> = written.hashes.drain().collect();
        lines.sort();
        let text = crate::nfs::sha256sum_text(&lines);
        fs::File::create(staging.manifest())
            .and_then(|mut f| f.write_all(&text).and_then(|()| f.sync_all()))
            .map_err(|e| format!("write the new volume's checksums: {e}"))
    })();
    r.map_err(fail)?;
    let meta = store.commit_copy(staging, &spec, opts.owner.as_ref())?;
    let report = RestoreReport {
        bytes: written.bytes,
        files: written.files,
        took: started.elapsed(),
    };
    tracing::info!(
        set = %set.display(),
        volume = %name,
        bytes = report.bytes,
        files = report.files,
        "restored a backup set into a new volume"
    );
    Ok((meta, report))
}

#[derive(Default)]
struct Written {
    bytes: u64,
    files: u64,
    hashes: HashMap<Vec<u8>, String>,
}

/// Makes object `it` under `dest` from the set's data directory `from`.
fn lay(from: &fs::File, dest: &Path, it: &Item, w: &mut Written) -> Result<(), String> {
    let rel = Path::new(&it.path);
    if rel.is_absolute() || rel.components().any(|c| c.as_os_str() == "..") {
        return Err(format!("the manifest names {} outside the volume", it.path));
    }
    let to = dest.join(rel);
    match it.kind {
        Kind::Dir if it.path == "." => return Ok(()),
        Kind::Dir => fs::DirBuilder::new()
            .mode(0o700)
            .create(&to)
            .map_err(|e| format!("create directory {}: {e}", it.path))?,
        Kind::File => {
            if let Some(first) = &it.link {
                fs::hard_link(dest.join(first), &to)
                    .map_err(|e| format!("link {} to {first}: {e}", it.path))?;
            } else {
                copy_checked(from, rel, &to, it)?;
                w.bytes += it.size;
                w.files += 1;
            }
            if let Some(h) = &it.sha256 {
                w.hashes
                    .insert(rel.as_os_str().as_bytes().to_vec(), h.clone());
            }
        }
        Kind::Symlink => {
            let target = it.target.as_deref().unwrap_or_default();
            std::os::unix::fs::symlink(target, &to)
                .map_err(|e| format!("create symlink {}: {e}", it.path))?;
        }
        Kind::Fifo | Kind::Socket | Kind::Char | Kind::Block => {
            let kind = match it.kind {
                Kind::Fifo => libc::S_IFIFO,
                Kind::Socket => libc::S_IFSOCK,
                Kind::Char => libc::S_IFCHR,
                _ => libc::S_IFBLK,
            };
            let c = cpath(&to)?;
            // SAFETY: a NUL-terminated path valid for the call.
            if unsafe { libc::mknod(c.as_ptr(), kind | 0o600, it.rdev) } != 0 {
                return Err(format!(
                    "create special file {}: {}",
                    it.path,
                    std::io::Error::last_os_error()
                ));
            }
        }
    }
    if it.kind != Kind::Dir && it.link.is_none() {
        attrs(&to, it)?;
    }
    Ok(())
}

/// Copies the set's file `rel` to a new file `dst`, checking it against `it`: a
/// regular file of the manifest's size (checked before reading, and never read past
/// it) with the manifest's sha256. Errors never show the set file's own size or hash:
/// the set may point anywhere, and its contents are not the error's business.
fn copy_checked(from: &fs::File, rel: &Path, dst: &Path, it: &Item) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let damaged = |why: &str| format!("file {} in the set is damaged: {why}", it.path);
    let input = super::open_in_set(from, rel).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP | libc::ENOTDIR) => damaged("a symlink in its path"),
        _ => damaged(&e.to_string()),
    })?;
    let md = input.metadata().map_err(|e| damaged(&e.to_string()))?;
    let ft = md.file_type();
    if !ft.is_file() {
        return Err(damaged(
            if ft.is_fifo() || ft.is_socket() || ft.is_char_device() || ft.is_block_device() {
                "not a regular file (a special file)"
            } else {
                "not a regular file"
            },
        ));
    }
    if md.len() != it.size {
        return Err(damaged("its size differs from the manifest's"));
    }
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(|e| format!("create file {}: {e}", it.path))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    // One byte past the size at most: a file still growing is damaged, not copied.
    let mut input = input.take(it.size.saturating_add(1));
    loop {
        let n = input.read(&mut buf).map_err(|e| damaged(&e.to_string()))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > it.size {
            return Err(damaged("its size differs from the manifest's"));
        }
        ctx.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| format!("write file {}: {e}", it.path))?;
    }
    let hash: String = ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if size != it.size {
        return Err(damaged("its size differs from the manifest's"));
    }
    if it.sha256.as_deref() != Some(hash.as_str()) {
        return Err(damaged("its contents differ from the manifest's sha256"));
    }
    Ok(())
}

fn cpath(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{} has a NUL", p.display()))
}

/// Owner, mode and modification time from the manifest (not following symlinks).
fn attrs(p: &Path, it: &Item) -> Result<(), String> {
    std::os::unix::fs::lchown(p, Some(it.uid), Some(it.gid))
        .map_err(|e| format!("set the owner of {}: {e}", it.path))?;
    if it.kind != Kind::Symlink {
        fs::set_permissions(p, fs::Permissions::from_mode(it.mode))
            .map_err(|e| format!("set the mode of {}: {e}", it.path))?;
    }
    let c = cpath(p)?;
    let t = libc::timespec {
        tv_sec: it.mtime,
        tv_nsec: it.mtime_nsec,
    };
    let times = [t, t];
    // SAFETY: a NUL-terminated path and two timespecs, valid for the call.
    if unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(format!(
            "set the times of {}: {}",
            it.path,
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(ns: &str) -> Owner {
        Owner {
            claim_uid: "u0".into(),
            namespace: ns.into(),
            claim: "data-0".into(),
        }
    }

    #[test]
    fn a_set_of_the_claims_namespace_may_be_restored() {
        assert_eq!(owner_check(Some(&owner("shop")), "shop"), Ok(()));
    }

    #[test]
    fn a_set_of_another_namespace_is_refused() {
        let why = owner_check(Some(&owner("bank")), "shop").expect_err("refused");
        assert!(why.contains("the set belongs to namespace bank"), "{why}");
    }

    #[test]
    fn a_set_without_an_owner_record_is_refused_for_a_claim() {
        let why = owner_check(None, "shop").expect_err("refused");
        assert!(why.contains("made before owner records"), "{why}");
        assert!(why.contains("localnfs volume restore"), "{why}");
    }
}
