//! Who may use which volume, decided afresh on every MNT and every NFS call (as knfsd
//! checks its export rules per request), never from the mount table (see `rmtab`). A
//! handle obtained while a client was admitted stops working (ACCES) on its next call
//! once it no longer is.
//!
//! Three layers, each of which must admit the client:
//! 1. the server's allow-list (`--allow`, plus the cluster's node addresses);
//! 2. per-volume grants read from `<root>/access.json`, a map from volume name to the
//!    client networks that may use it:
//!    `{"pvc-1234": ["10.0.0.5", "10.0.0.6"], "scratch": ["10.0.0.0/24"]}`.
//!    A volume with an entry is served only to those networks (an empty list: to
//!    nobody); a volume without one is left to the other layers. Rules that cannot be
//!    read fail closed (DESIGN invariant 12): at start, a file that exists but cannot
//!    be read or parsed stops the agent with an error naming the file and the cause
//!    (there are no earlier rules to keep, and serving nothing would leave a healthy
//!    looking agent and hung mounts: a crash loop with the reason in the log is what an
//!    operator sees first). Afterwards the file is re-read when it changes; one that
//!    cannot be read or parsed, or that disappears, keeps the last good grants (a
//!    half-written file must not open every volume to everyone; `{}` clears them);
//! 3. in cluster mode, [`ClusterGrants`]: the addresses of the nodes the controller
//!    published on each volume's PV (the nodes running pods that use its claim; see
//!    `provisioner::publish`). A volume no PV names is served to nobody; a PV without
//!    the annotation (made before it existed) to every allow-listed client.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use super::allow::{AllowList, Network};
use crate::error::{Error, Result};
use crate::volume::VolumeName;

type Grants = BTreeMap<VolumeName, Vec<Network>>;

/// Which copy of the grants file was last looked at: its modification time and length
/// (a rewrite within one coarse timestamp tick still changes the length, most often),
/// `None` while there is no file.
type Version = Option<(SystemTime, u64)>;

/// What the cluster says about each volume of this node: volume → the networks that
/// may use it, or `None` for a PV that has no published nodes annotation (made before
/// it existed; served to every allow-listed client, as then). Volumes not listed are
/// served to nobody.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterGrants(pub BTreeMap<VolumeName, Option<Vec<Network>>>);

impl ClusterGrants {
    fn admits(&self, client: IpAddr, volume: &VolumeName) -> bool {
        match self.0.get(volume) {
            None => false,
            Some(None) => true,
            Some(Some(nets)) => nets.iter().any(|n| n.contains(client)),
        }
    }
}

/// The allow-list plus per-volume grants.
pub struct Access {
    allow: AllowList,
    grants: RwLock<Grants>,
    /// `access.json`, and the version last looked at (loaded, or refused).
    file: PathBuf,
    seen: RwLock<Version>,
    /// Cluster mode only: what the PVs of this node say.
    cluster: RwLock<Option<ClusterGrants>>,
}

impl Access {
    /// Access by `allow`, with per-volume grants from `file` (see [`Access::reload`]).
    /// Fails when `file` exists but cannot be read or parsed: rules that cannot be
    /// read must not leave every volume open (see the module doc).
    pub fn new(allow: AllowList, file: PathBuf) -> Result<Access> {
        let seen = version(&file);
        let grants = read_grants(&file).map_err(|why| Error::AccessRules {
            path: file.clone(),
            why,
        })?;
        if let Some(g) = &grants {
            tracing::info!(file = %file.display(), volumes = g.len(), "per-volume access loaded");
        }
        Ok(Access {
            allow,
            grants: RwLock::new(grants.unwrap_or_default()),
            file,
            seen: RwLock::new(seen),
            cluster: RwLock::new(None),
        })
    }

    /// Whether `client` may mount and use `volume`.
    pub fn allows(&self, client: IpAddr, volume: &VolumeName) -> bool {
        if !self.allow.allows(client) {
            return false;
        }
        let by_file = self
            .grants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
            .is_none_or(|nets| nets.iter().any(|n| n.contains(client)));
        by_file
            && self
                .cluster
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_none_or(|c| c.admits(client, volume))
    }

    /// Replaces the cluster's grants (cluster mode); takes effect on the next call of
    /// every client.
    pub fn set_cluster(&self, grants: ClusterGrants) {
        *self.cluster.write().unwrap_or_else(|p| p.into_inner()) = Some(grants);
    }

    /// Re-reads the grants file if it changed since it was last looked at. A file
    /// that cannot be read or parsed, or that is gone, keeps the grants in force
    /// (logged once per change of the file).
    pub fn reload(&self) {
        let now = version(&self.file);
        {
            let mut seen = self.seen.write().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return;
            }
            *seen = now;
        }
        match read_grants(&self.file) {
            Ok(Some(g)) => {
                tracing::info!(file = %self.file.display(), volumes = g.len(), "per-volume access loaded");
                *self.grants.write().unwrap_or_else(|p| p.into_inner()) = g;
            }
            Ok(None) => {
                tracing::error!(file = %self.file.display(), "per-volume access file removed; keeping the last rules (write `{{}}` to clear them)");
            }
            Err(e) => {
                tracing::error!(file = %self.file.display(), error = %e, "per-volume access unreadable; keeping the last good rules");
            }
        }
    }
}

fn version(path: &Path) -> Version {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The grants in `path`, `None` when there is no such file (grants by the allow-list
/// alone).
fn read_grants(path: &Path) -> Result<Option<Grants>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
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
        .collect::<Result<Grants, String>>()
        .map(Some)
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

    fn loopback() -> AllowList {
        AllowList::new(vec!["127.0.0.0/8".parse().expect("net")])
    }

    #[test]
    fn grants_narrow_the_allow_list_per_volume() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("access.json");
        std::fs::write(&file, br#"{"a": ["127.0.0.2"], "none": []}"#).expect("write");
        let access = Access::new(loopback(), file).expect("grants");
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
    fn cluster_grants_are_exact_once_published_and_legacy_pvs_keep_the_allow_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        let access =
            Access::new(loopback(), dir.path().join("access.json")).expect("no file: no grants");
        assert!(
            access.allows(ip("127.0.0.3"), &vol("a")),
            "standalone: the allow-list decides"
        );
        access.set_cluster(ClusterGrants(
            [
                (vol("a"), Some(vec!["127.0.0.2".parse().expect("net")])),
                (vol("nobody"), Some(vec![])),
                (vol("legacy"), None),
            ]
            .into(),
        ));
        let cases = [
            ("127.0.0.2", "a", true),
            ("127.0.0.3", "a", false), // allow-listed, but not published
            ("127.0.0.2", "nobody", false),
            ("127.0.0.3", "legacy", true),
            ("10.0.0.1", "legacy", false), // not allow-listed
            ("127.0.0.2", "no-pv", false), // no PV names it
        ];
        for (client, volume, want) in cases {
            assert_eq!(
                access.allows(ip(client), &vol(volume)),
                want,
                "{client} {volume}"
            );
        }
        // Both layers must admit: a file entry narrows a published volume further.
        std::fs::write(
            dir.path().join("access.json"),
            br#"{"legacy": ["127.0.0.9"]}"#,
        )
        .expect("write");
        access.reload();
        assert!(!access.allows(ip("127.0.0.3"), &vol("legacy")));
        assert!(access.allows(ip("127.0.0.9"), &vol("legacy")));
    }

    #[test]
    fn a_broken_grants_file_keeps_the_previous_grants() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("access.json");
        std::fs::write(&file, br#"{"a": ["127.0.0.2"]}"#).expect("write");
        let access = Access::new(loopback(), file.clone()).expect("grants");
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

    #[test]
    fn a_broken_grants_file_at_start_is_refused_with_its_name_and_cause() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("access.json");
        std::fs::write(&file, br#"{"a": ["127.0.0.2"],}"#).expect("write");
        let err = Access::new(loopback(), file).err().expect("refused");
        let text = err.to_string();
        assert!(
            text.contains("access.json") && text.contains("trailing comma"),
            "{text}"
        );
    }

    #[test]
    fn a_removed_grants_file_keeps_the_last_rules() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("access.json");
        std::fs::write(&file, br#"{"a": ["127.0.0.2"]}"#).expect("write");
        let access = Access::new(loopback(), file.clone()).expect("grants");
        std::fs::remove_file(&file).expect("remove");
        access.reload();
        assert!(!access.allows(ip("127.0.0.3"), &vol("a")));
        std::fs::write(&file, b"{}").expect("write");
        access.reload();
        assert!(
            access.allows(ip("127.0.0.3"), &vol("a")),
            "`{{}}` clears them"
        );
    }
}
