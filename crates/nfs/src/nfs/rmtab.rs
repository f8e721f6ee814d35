//! The mount table (the classic `rmtab`): which client addresses said MNT for which
//! volumes. It is bookkeeping for MOUNT DUMP and for operators, never access control:
//! RFC 1813 (appendix I, MOUNTPROC3_UMNT) says the server "removes the mount list entry",
//! nothing more, and knfsd likewise decides every call by its export rules, not by
//! rmtab. Two pods on one node share one client address, so an UMNT from one of them
//! must not cut the other off (it did when access was read from here).
//!
//! The table is persisted in `<root>/rmtab` so DUMP still lists mounts made before a
//! restart; a save that fails is retried by [`MountTable::flush`] (called every second
//! by the node agent) until it succeeds, not just logged and forgotten.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::Error;
use crate::volume::VolumeName;

type Table = BTreeMap<IpAddr, BTreeSet<VolumeName>>;

/// The mount table and where it is kept.
pub struct MountTable {
    path: PathBuf,
    table: RwLock<Table>,
    /// The last save failed: the file is behind the table.
    dirty: AtomicBool,
}

impl MountTable {
    /// Loads `path` (a missing file is an empty table; an unreadable one is logged and
    /// replaced on the next change).
    pub fn load(path: PathBuf) -> MountTable {
        let table = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %path.display(), error = %e, "mount table unreadable; starting empty");
                Table::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Table::new(),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read mount table; starting empty");
                Table::new()
            }
        };
        MountTable {
            path,
            table: RwLock::new(table),
            dirty: AtomicBool::new(false),
        }
    }

    /// Records that `client` mounted `name`.
    pub fn add(&self, client: IpAddr, name: &VolumeName) {
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        if t.entry(client).or_default().insert(name.clone()) {
            self.save(&t);
        }
    }

    /// Forgets `client`'s entry for `name`, or all of its entries. Only the list
    /// changes: nobody loses access by it.
    pub fn remove(&self, client: IpAddr, name: Option<&VolumeName>) {
        let mut t = self.table.write().unwrap_or_else(|p| p.into_inner());
        let changed = match name {
            Some(n) => t.get_mut(&client).is_some_and(|s| s.remove(n)),
            None => t.remove(&client).is_some(),
        };
        t.retain(|_, s| !s.is_empty());
        if changed {
            self.save(&t);
        }
    }

    /// The volumes `client` has mounted (DUMP shows a client its own entries only).
    pub fn of(&self, client: IpAddr) -> Vec<VolumeName> {
        let t = self.table.read().unwrap_or_else(|p| p.into_inner());
        t.get(&client)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Writes the table again if the last save failed.
    pub fn flush(&self) {
        if self.dirty.load(Ordering::Acquire) {
            let t = self.table.read().unwrap_or_else(|p| p.into_inner());
            self.save(&t);
        }
    }

    /// Whether the file is behind the table.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    fn save(&self, t: &Table) {
        let result = serde_json::to_vec(t)
            .map_err(|e| Error::VolumeIo {
                action: "encode mount table",
                path: self.path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })
            .and_then(|b| crate::volume::write_atomic(&self.path, &b, 0o600));
        match result {
            Ok(()) => {
                if self.dirty.swap(false, Ordering::AcqRel) {
                    tracing::info!(path = %self.path.display(), "mount table saved after earlier failures");
                }
            }
            Err(e) => {
                if !self.dirty.swap(true, Ordering::AcqRel) {
                    tracing::error!(error = %e, "cannot persist mount table; retrying every second");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> VolumeName {
        VolumeName::new(s).expect("name")
    }

    #[test]
    fn entries_survive_a_reload_and_unmount_touches_only_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rmtab");
        let t = MountTable::load(path.clone());
        let (a, b) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        t.add(a, &name("v"));
        t.add(a, &name("w"));
        t.add(b, &name("v"));
        t.remove(a, Some(&name("v")));
        let again = MountTable::load(path);
        assert_eq!(again.of(a), vec![name("w")]);
        assert_eq!(again.of(b), vec![name("v")]);
        again.remove(b, None);
        assert!(again.of(b).is_empty());
    }

    #[test]
    fn a_failed_save_is_retried_until_it_lands() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rmtab");
        std::fs::create_dir(&path).expect("a directory where the file goes");
        let t = MountTable::load(path.clone());
        t.add("10.0.0.1".parse().expect("ip"), &name("v"));
        assert!(t.is_dirty());
        t.flush();
        assert!(t.is_dirty(), "still failing");
        std::fs::remove_dir(&path).expect("rmdir");
        t.flush();
        assert!(!t.is_dirty());
        assert_eq!(
            MountTable::load(path).of("10.0.0.1".parse().expect("ip")),
            vec![name("v")]
        );
    }
}
