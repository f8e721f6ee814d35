//! The two ends of a clone's stream (`objects::peer` says the frames): [`send`] walks
//! the source agent's point-in-time copy (its staging tree, which nothing changes) and
//! [`receive`] builds the new volume in this agent's staging, then commits it. Both
//! run on blocking threads and exchange frames with the connection over a bounded
//! channel: neither holds more than a few chunks, never a whole file.
//!
//! The receiver writes only what it creates itself: every entry is one name within
//! the directory the stream is in, and that directory is one the receiver made (a
//! name that exists already, a symlink included, fails `mkdir`/`O_EXCL`), so no entry
//! reaches outside the copy. Each regular file's sha256 is computed as it is written
//! and compared with the sender's; the receiver's manifest, built as it goes in the
//! walk's order (the engine's: entries by name, a directory's as if it ended in `/`),
//! must equal the source's manifest, sent last. Only then is the copy committed
//! (`VolumeStore::commit_copy`): before that an error or a kill leaves only the
//! `staging/<name>.partial` that dropping it, or the next start, removes.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File, FileTimes};
use std::io::{BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::digest::{Context, SHA256};
use tokio::sync::mpsc;

use crate::nfs::Exports;
use crate::nfs::sha256sum_text;
use crate::objects::peer::{Attrs, CHUNK, Entry, Frame, Kind, valid_name};
use crate::volume::{Owner, VolumeMeta, VolumeSpec};

/// What the receiver made.
#[derive(Clone, Copy, Debug, Default)]
pub struct Received {
    pub bytes: u64,
    pub files: u64,
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn attrs(m: &fs::Metadata) -> Attrs {
    Attrs {
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: (m.mtime(), m.mtime_nsec()),
        atime: (m.atime(), m.atime_nsec()),
    }
}

/// Sends `data` (the copy's tree) and then `manifest`, as frames into `tx`. Stops at
/// the first error, or when the connection's side of `tx` went away.
pub fn send(data: &Path, manifest: &Path, tx: &mpsc::Sender<Frame>) -> Result<(), String> {
    let put = |f: Frame| {
        tx.blocking_send(f)
            .map_err(|_| "the connection closed".to_owned())
    };
    let mut groups = HashMap::new();
    send_dir(data, &put, &mut groups)?;
    let mut m = File::open(manifest).map_err(|e| format!("open the copy's manifest: {e}"))?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = m
            .read(&mut buf)
            .map_err(|e| format!("read the copy's manifest: {e}"))?;
        if n == 0 {
            break;
        }
        put(Frame::Manifest(buf[..n].to_vec()))?;
    }
    put(Frame::Done)
}

/// The directory `dir`'s entries (their sort key: the engine's order), then its
/// attributes.
fn send_dir(
    dir: &Path,
    put: &impl Fn(Frame) -> Result<(), String>,
    groups: &mut HashMap<(u64, u64), u64>,
) -> Result<(), String> {
    let read = |e: std::io::Error| format!("list {}: {e}", dir.display());
    let mut entries = Vec::new();
    for e in fs::read_dir(dir).map_err(read)? {
        let e = e.map_err(read)?;
        let meta = e
            .metadata()
            .map_err(|err| format!("stat {}: {err}", e.path().display()))?;
        let mut key = e.file_name().as_bytes().to_vec();
        if meta.is_dir() {
            key.push(b'/');
        }
        entries.push((key, e.file_name(), meta));
    }
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    for (_, name, meta) in entries {
        let path = dir.join(&name);
        let t = meta.file_type();
        let mut entry = Entry {
            name: name.as_bytes().to_vec(),
            kind: Kind::File,
            attrs: attrs(&meta),
            size: 0,
            target: Vec::new(),
            group: None,
            rdev: 0,
        };
        if t.is_dir() {
            entry.kind = Kind::Dir;
            put(Frame::Entry(entry))?;
            send_dir(&path, put, groups)?;
            continue;
        }
        if t.is_file() {
            if meta.nlink() > 1 {
                let next = groups.len() as u64;
                let id = *groups.entry((meta.dev(), meta.ino())).or_insert(next);
                entry.group = Some(id);
                if id != next {
                    entry.kind = Kind::Link;
                    put(Frame::Entry(entry))?;
                    continue;
                }
            }
            entry.size = meta.len();
            put(Frame::Entry(entry))?;
            send_file(&path, put)?;
            continue;
        }
        entry.kind = if t.is_symlink() {
            entry.target = fs::read_link(&path)
                .map_err(|e| format!("read link {}: {e}", path.display()))?
                .into_os_string()
                .into_vec();
            Kind::Symlink
        } else if t.is_fifo() {
            Kind::Fifo
        } else if t.is_socket() {
            Kind::Socket
        } else if t.is_char_device() {
            Kind::Char
        } else {
            Kind::Block
        };
        entry.rdev = meta.rdev();
        put(Frame::Entry(entry))?;
    }
    let meta = fs::symlink_metadata(dir).map_err(|e| format!("stat {}: {e}", dir.display()))?;
    put(Frame::DirEnd(attrs(&meta)))
}

use std::os::unix::ffi::OsStringExt;

fn send_file(path: &Path, put: &impl Fn(Frame) -> Result<(), String>) -> Result<(), String> {
    let mut f = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut sum = Context::new(&SHA256);
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        sum.update(&buf);
        put(Frame::Data(buf))?;
    }
    put(Frame::FileEnd(hex(sum.finish().as_ref())))
}

fn time((s, ns): (i64, i64)) -> SystemTime {
    let nanos = Duration::from_nanos(u64::try_from(ns).unwrap_or(0));
    match u64::try_from(s) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s) + nanos,
        Err(_) => UNIX_EPOCH - Duration::from_secs(s.unsigned_abs()) + nanos,
    }
}

fn cpath(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{} holds a NUL", p.display()))
}

/// Owner, mode and times of `path` (not following a symlink: a symlink gets owner
/// and times only).
fn apply(path: &Path, a: &Attrs, symlink: bool) -> Result<(), String> {
    let err = |what: &str| {
        let path = path.display().to_string();
        let what = what.to_owned();
        move |e: std::io::Error| format!("{what} {path}: {e}")
    };
    std::os::unix::fs::lchown(path, Some(a.uid), Some(a.gid)).map_err(err("chown"))?;
    if !symlink {
        // After chown, which clears setuid/setgid.
        fs::set_permissions(path, fs::Permissions::from_mode(a.mode)).map_err(err("chmod"))?;
    }
    let ts = |(s, ns): (i64, i64)| libc::timespec {
        tv_sec: s,
        tv_nsec: ns,
    };
    let times = [ts(a.atime), ts(a.mtime)];
    let c = cpath(path)?;
    // SAFETY: a NUL-terminated path and two timespecs, as utimensat(2) reads them.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(err("set times of")(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Where the receiver is in the tree.
struct At {
    dir: PathBuf,
    /// The same, relative to the copy's root (manifest paths); `.` at the root.
    rel: Vec<u8>,
    depth: usize,
    root_done: bool,
}

impl At {
    fn rel_of(&self, name: &[u8]) -> Vec<u8> {
        if self.depth == 0 {
            return name.to_vec();
        }
        let mut p = self.rel.clone();
        p.push(b'/');
        p.extend_from_slice(name);
        p
    }
}

/// Builds volume `spec.name` for `owner` from the frames in `rx` (the first one after
/// [`Frame::Accepted`]) and commits it. Nothing of it exists if this fails.
pub fn receive(
    exports: &Exports,
    spec: &VolumeSpec,
    owner: &Owner,
    rx: &mut mpsc::Receiver<Frame>,
) -> Result<(VolumeMeta, Received), String> {
    let staging = exports
        .store()
        .begin_copy(&spec.name)
        .map_err(|e| format!("start the copy: {e}"))?;
    let data = staging.data();
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&data)
        .map_err(|e| format!("create {}: {e}", data.display()))?;
    let check = staging
        .scratch("check")
        .map_err(|e| e.to_string())?
        .join("manifest");
    let io = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
    let mut ours = BufWriter::new(File::create(&check).map_err(io("create the check manifest"))?);
    let mut theirs = File::create(staging.manifest()).map_err(io("create the manifest"))?;
    let mut at = At {
        dir: data.clone(),
        rel: b".".to_vec(),
        depth: 0,
        root_done: false,
    };
    let mut groups: HashMap<u64, (PathBuf, String)> = HashMap::new();
    let mut got = Received::default();
    let next = |rx: &mut mpsc::Receiver<Frame>| {
        rx.blocking_recv()
            .ok_or_else(|| "the stream ended before the copy was complete".to_owned())
    };
    loop {
        match next(rx)? {
            Frame::Entry(e) => {
                if at.root_done || !valid_name(&e.name) {
                    return Err(format!("the stream names an invalid entry {:?}", e.name));
                }
                let path = at.dir.join(OsStr::from_bytes(&e.name));
                let rel = at.rel_of(&e.name);
                let line = |hash: &str| sha256sum_text(&[(rel.clone(), hash.to_owned())]);
                match e.kind {
                    Kind::Dir => {
                        fs::DirBuilder::new()
                            .mode(0o700)
                            .create(&path)
                            .map_err(|err| format!("mkdir {}: {err}", path.display()))?;
                        at.dir = path;
                        at.rel = rel;
                        at.depth += 1;
                    }
                    Kind::File => {
                        let hash = receive_file(&path, &e, rx, spec, &mut got)?;
                        apply(&path, &e.attrs, false)?;
                        ours.write_all(&line(&hash))
                            .map_err(io("write the check manifest"))?;
                        if let Some(g) = e.group {
                            groups.insert(g, (path, hash));
                        }
                    }
                    Kind::Link => {
                        let (first, hash) = e
                            .group
                            .and_then(|g| groups.get(&g))
                            .ok_or("the stream links to a file it did not send")?;
                        fs::hard_link(first, &path)
                            .map_err(|err| format!("link {}: {err}", path.display()))?;
                        ours.write_all(&line(hash))
                            .map_err(io("write the check manifest"))?;
                    }
                    Kind::Symlink => {
                        std::os::unix::fs::symlink(OsStr::from_bytes(&e.target), &path)
                            .map_err(|err| format!("symlink {}: {err}", path.display()))?;
                        apply(&path, &e.attrs, true)?;
                    }
                    Kind::Fifo | Kind::Socket | Kind::Char | Kind::Block => {
                        // As for MKNOD and restores: devices only where the agent was
                        // allowed to make them.
                        if matches!(e.kind, Kind::Char | Kind::Block) && !exports.device_nodes {
                            return Err(format!(
                                "the source holds a device node ({}); this node's agent does not make device nodes (--allow-device-nodes)",
                                path.display()
                            ));
                        }
                        let t = match e.kind {
                            Kind::Fifo => libc::S_IFIFO,
                            Kind::Socket => libc::S_IFSOCK,
                            Kind::Char => libc::S_IFCHR,
                            _ => libc::S_IFBLK,
                        };
                        let c = cpath(&path)?;
                        // SAFETY: a NUL-terminated path; mknod(2) creates only that name.
                        if unsafe { libc::mknod(c.as_ptr(), t | 0o600, e.rdev) } != 0 {
                            return Err(format!(
                                "mknod {}: {}",
                                path.display(),
                                std::io::Error::last_os_error()
                            ));
                        }
                        apply(&path, &e.attrs, false)?;
                    }
                }
            }
            Frame::DirEnd(a) => {
                if at.root_done {
                    return Err("the stream closed the copy's root twice".into());
                }
                apply(&at.dir, &a, false)?;
                if at.depth == 0 {
                    at.root_done = true;
                } else {
                    at.dir.pop();
                    at.depth -= 1;
                    let cut = at.rel.iter().rposition(|&b| b == b'/').unwrap_or(0);
                    at.rel.truncate(cut);
                    if at.depth == 0 {
                        at.rel = b".".to_vec();
                    }
                }
            }
            Frame::Manifest(chunk) if at.root_done => {
                theirs.write_all(&chunk).map_err(io("write the manifest"))?;
            }
            Frame::Done if at.root_done => break,
            Frame::Failed(why) => return Err(format!("the source agent failed: {why}")),
            other => {
                return Err(format!(
                    "unexpected frame in the stream: {}",
                    frame_name(&other)
                ));
            }
        }
    }
    ours.flush().map_err(io("write the check manifest"))?;
    drop(ours);
    theirs.sync_all().map_err(io("sync the manifest"))?;
    drop(theirs);
    if digest_of(&check)? != digest_of(&staging.manifest())? {
        return Err(
            "the files received do not match the source's manifest (sha256 per file)".into(),
        );
    }
    let dir = File::open(&data).map_err(io("open the copy"))?;
    // SAFETY: a descriptor we own; syncfs(2) only flushes its file system.
    if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) } != 0 {
        return Err(io("sync the copy")(std::io::Error::last_os_error()));
    }
    let meta = exports
        .store()
        .commit_copy(staging, spec, Some(owner))
        .map_err(|e| format!("commit the copy: {e}"))?;
    if let Err(e) = exports.refresh_volume(&spec.name) {
        tracing::warn!(volume = %spec.name, error = %e, "cannot serve the new copy yet; the next refresh retries");
    }
    Ok((meta, got))
}

/// Writes one regular file from the `Data` frames up to its `FileEnd`, checking its
/// size, its sha256 and that the copy stays within `spec`'s size.
fn receive_file(
    path: &Path,
    e: &Entry,
    rx: &mut mpsc::Receiver<Frame>,
    spec: &VolumeSpec,
    got: &mut Received,
) -> Result<String, String> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|err| format!("create {}: {err}", path.display()))?;
    let mut sum = Context::new(&SHA256);
    let mut written = 0u64;
    loop {
        match rx.blocking_recv() {
            Some(Frame::Data(d)) => {
                written += d.len() as u64;
                if got.bytes + written > spec.size_bytes {
                    return Err(format!(
                        "the source holds more than the clone's {} bytes",
                        spec.size_bytes
                    ));
                }
                sum.update(&d);
                f.write_all(&d)
                    .map_err(|err| format!("write {}: {err}", path.display()))?;
            }
            Some(Frame::FileEnd(want)) => {
                let have = hex(sum.finish().as_ref());
                if written != e.size || have != want {
                    return Err(format!(
                        "{} arrived damaged: {written} bytes, sha256 {have}; the source sent {} bytes, sha256 {want}",
                        path.display(),
                        e.size
                    ));
                }
                got.bytes += written;
                got.files += 1;
                let t = FileTimes::new()
                    .set_accessed(time(e.attrs.atime))
                    .set_modified(time(e.attrs.mtime));
                f.set_times(t)
                    .map_err(|err| format!("set times of {}: {err}", path.display()))?;
                return Ok(have);
            }
            Some(Frame::Failed(why)) => return Err(format!("the source agent failed: {why}")),
            Some(other) => {
                return Err(format!(
                    "unexpected frame in a file: {}",
                    frame_name(&other)
                ));
            }
            None => return Err("the stream ended in the middle of a file".into()),
        }
    }
}

fn digest_of(path: &Path) -> Result<Vec<u8>, String> {
    let mut f = File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut sum = Context::new(&SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("read {}: {e}", path.display()))?;
        if n == 0 {
            return Ok(sum.finish().as_ref().to_vec());
        }
        sum.update(&buf[..n]);
    }
}

/// A frame's kind, for errors (never its contents).
pub fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello(_) => "hello",
        Frame::Ask(_) => "ask",
        Frame::Refused(_) => "refused",
        Frame::Accepted(_) => "accepted",
        Frame::Entry(_) => "entry",
        Frame::Data(_) => "data",
        Frame::FileEnd(_) => "file end",
        Frame::DirEnd(_) => "directory end",
        Frame::Manifest(_) => "manifest",
        Frame::Done => "done",
        Frame::Failed(_) => "failed",
    }
}
