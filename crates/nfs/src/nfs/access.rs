//! Who may use which volume, decided afresh on every MNT and every NFS call (as knfsd
//! checks its export rules per request), never from the mount table (see `rmtab`).
//!
//! Two layers: the server's allow-list (`--allow`, or the cluster's node addresses),
//! and per-volume grants read from `<root>/access.json`, a map from volume name to the
//! client networks that may use it:
//! `{"pvc-1234": ["10.0.0.5", "10.0.0.6"], "scratch": ["10.0.0.0/24"]}`.
//! A volume with an entry is served only to those networks (an empty list: to nobody);
//! a volume without one to every allow-listed client. The file is re-read when it
//! changes; one that cannot be parsed keeps the previous grants (a half-written file
//! must not open every volume to everyone).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use super::allow::{AllowList, Network};
use crate::volume::VolumeName;

type Grants = BTreeMap<VolumeName, Vec<Network>>;

/// The allow-list plus per-volume grants.
pub struct Access {
    allow: AllowList,
    grants: RwLock<Grants>,
    /// `access.json`, and the modification time of the copy loaded.
    file: PathBuf,
    loaded: RwLock<Option<SystemTime>>,
}

impl Access {
    /// Access by `allow`, with per-volume grants from `file` (see [`Access::reload`]).
    pub fn new(allow: AllowList, file: PathBuf) -> Access {
        let access = Access {
            allow,
            grants: RwLock::new(Grants::new()),
            file,
            loaded: RwLock::new(None),
        };
        access.reload();
        access
    }

    /// Whether `client` may mount and use `volume`.
    pub fn allows(&self, client: IpAddr, volume: &VolumeName) -> bool {
        if !self.allow.allows(client) {
            return false;
        }
        let grants = self.grants.read().unwrap_or_else(|p| p.into_inner());
        grants
            .get(volume)
            .is_none_or(|nets| nets.iter().any(|n| n.contains(client)))
    }

    /// Re-reads the grants file if it changed since the last load.
    pub fn reload(&self) {
        let mtime = std::fs::metadata(&self.file)
            .and_then(|m| m.modified())
            .ok();
        if *self.loaded.read().unwrap_or_else(|p| p.into_inner()) == mtime {
            return;
        }
        match read_grants(&self.file) {
            Ok(g) => {
                tracing::info!(file = %self.file.display(), volumes = g.len(), "per-volume access loaded");
                *self.grants.write().unwrap_or_else(|p| p.into_inner()) = g;
                *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = mtime;
            }
            Err(e) => {
                tracing::error!(file = %self.file.display(), error = %e, "per-volume access unreadable; keeping the previous grants");
            }
        }
    }
}

/// The grants in `path`; a missing file grants by the allow-list alone.
fn read_grants(path: &Path) -> Result<Grants, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Grants::new()),
        Err(e) => return Err(e.to_string()),
    };
    let raw: BTreeMap<VolumeName, Vec<String>> =
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    raw.into_iter()
        .map(|(v, nets)| {
            let nets = nets
                .iter()
                .map(|n| n.parse::<Network>())
                .collect::<Result<Vec<_>, _>>()?;
            Ok((v, nets))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn vol(s: &str) -> VolumeName {
        VolumeName::new(s).expect("name")
    }

    #[test]
    fn grants_narrow_the_allow_list_per_volume() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("access.json");
        std::fs::write(&file, br#"{"a": ["127.0.0.2"], "none": []}"#).expect("write");
        let access = Access::new(
            AllowList::new(vec!["127.0.0.0/8".parse().expect("net")]),
            file,
        );
        let cases = [
            ("127.0.0.2", "a", true),
            ("127.0.0.3", "a", false),
            ("127.0.0.3", "b", true), // no entry: the allow-list decides
            ("10.0.0.1", "b", false), // not allow-listed
            ("127.0.0.2", "none", false),
        ];
        for (client, volume, want) in cases {
            assert_eq!(
                access.allows(ip(client), &vol(volume)),
                want,
                "{client} {volume}"
            );
        }
    }

    #[test]
    fn a_broken_grants_file_keeps_the_previous_grants() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("access.json");
        std::fs::write(&file, br#"{"a": ["127.0.0.2"]}"#).expect("write");
        let access = Access::new(
            AllowList::new(vec!["127.0.0.0/8".parse().expect("net")]),
            file.clone(),
        );
        std::fs::write(&file, b"{\"a\": [").expect("write");
        // A different mtime even on coarse-grained filesystems.
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .and_then(|f| f.set_modified(later))
            .expect("touch");
        access.reload();
        assert!(!access.allows(ip("127.0.0.3"), &vol("a")));
    }
}
