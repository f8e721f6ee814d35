//! StorageClass parameters → a validated [`ClassParams`] (the volume parameters parsed
//! by [`VolumeSpec::set_param`] into the class's volume template); sizes and modes as users
//! write them → numbers. Pure,
//! so every rule has a table test. Unknown keys and bad values are errors that end up
//! verbatim in a `ProvisioningFailed` event.

use std::collections::BTreeMap;

use crate::volume::{Squash, VolumeName, VolumeSpec};

/// Where pods using a volume may run (enforced by the scheduler helper and, for
/// `strict`, by the PV's required node affinity).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Locality {
    /// Prefer the volume's node; run elsewhere (over NFS) if it must.
    #[default]
    Preferred,
    /// Only on the volume's node.
    Strict,
    /// No preference.
    None,
}

impl Locality {
    /// The class parameter value (also the PV's [`super::keys::LOCALITY_KEY`] annotation).
    pub fn as_str(self) -> &'static str {
        match self {
            Locality::Preferred => "preferred",
            Locality::Strict => "strict",
            Locality::None => "none",
        }
    }

    /// Reads a class parameter or PV annotation value.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "preferred" => Some(Locality::Preferred),
            "strict" => Some(Locality::Strict),
            "none" => Some(Locality::None),
            _ => None,
        }
    }
}

/// What happens to the directory when its PV is deleted under reclaim policy Delete.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnDelete {
    /// Remove the directory.
    #[default]
    Delete,
    /// Move it to `<root>/archive/`.
    Archive,
    /// Leave it in place.
    Retain,
}

impl OnDelete {
    /// The class parameter value (also the PV's [`super::keys::ON_DELETE_KEY`] annotation).
    pub fn as_str(self) -> &'static str {
        match self {
            OnDelete::Delete => "delete",
            OnDelete::Archive => "archive",
            OnDelete::Retain => "retain",
        }
    }

    /// Reads a class parameter or PV annotation value; anything else is `None`.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "delete" => Some(OnDelete::Delete),
            "archive" => Some(OnDelete::Archive),
            "retain" => Some(OnDelete::Retain),
            _ => None,
        }
    }
}

/// Validated class parameters: the ones only the cluster side acts on, and the
/// template every volume of the class is made from (its name and size come per claim).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassParams {
    pub locality: Locality,
    pub on_delete: OnDelete,
    pub path_pattern: Option<String>,
    /// The volume parameters (`uid`, `squash`, …; see [`VolumeSpec::PARAMS`]),
    /// parsed by the spec itself so a new one is added in one place.
    pub volume: VolumeSpec,
}

impl Default for ClassParams {
    fn default() -> Self {
        Self {
            locality: Locality::Preferred,
            on_delete: OnDelete::Delete,
            path_pattern: None,
            volume: VolumeSpec::template(),
        }
    }
}

/// The parameter keys only the class reads; the rest are [`VolumeSpec::PARAMS`].
pub const CLASS_KEYS: [&str; 4] = ["locality", "onDelete", "allowRootAnon", "pathPattern"];

fn bad(key: &str, value: &str, expected: &str) -> String {
    format!("StorageClass parameter {key}={value:?} is invalid: expected {expected}")
}

impl ClassParams {
    /// Parses a class's `parameters`.
    pub fn parse(params: &BTreeMap<String, String>) -> Result<Self, String> {
        let mut p = Self::default();
        let mut allow_root_anon = false;
        for (key, value) in params {
            match key.as_str() {
                "allowRootAnon" => {
                    allow_root_anon = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(bad(key, value, "true or false")),
                    }
                }
                "locality" => {
                    p.locality = Locality::parse(value)
                        .ok_or_else(|| bad(key, value, "preferred, strict or none"))?
                }
                "onDelete" => {
                    p.on_delete = OnDelete::parse(value)
                        .ok_or_else(|| bad(key, value, "delete, archive or retain"))?
                }
                "pathPattern" => {
                    check_pattern(value).map_err(|why| bad(key, value, &why))?;
                    p.path_pattern = Some(value.clone());
                }
                _ => match p.volume.set_param(key, value) {
                    Some(set) => set.map_err(|expected| bad(key, value, &expected))?,
                    None => {
                        let known: Vec<&str> = CLASS_KEYS
                            .iter()
                            .chain(&VolumeSpec::PARAMS)
                            .copied()
                            .collect();
                        return Err(format!(
                            "unknown StorageClass parameter {key:?} (known: {})",
                            known.join(", ")
                        ));
                    }
                },
            }
        }
        // Squashing to root would undo the squash; 4294967295 is "no id" to the
        // kernel, and a switch to it fails, which must never leave a call running as the agent.
        for (key, value) in [
            ("anonUid", p.volume.anon_uid),
            ("anonGid", p.volume.anon_gid),
        ] {
            if value == u32::MAX {
                return Err(bad(key, &value.to_string(), "a number below 4294967295"));
            }
            if value == 0 && !allow_root_anon {
                return Err(bad(
                    key,
                    "0",
                    "not 0 (root) unless allowRootAnon is \"true\"",
                ));
            }
        }
        Ok(p)
    }

    /// What a node agent is asked to create for a volume of this class.
    pub fn volume_request(&self, name: VolumeName, size_bytes: u64) -> VolumeSpec {
        self.volume.named(name, size_bytes)
    }

    /// The directory name for a claim: `pathPattern` filled in, or the PV name.
    pub fn volume_name(
        &self,
        pv_name: &str,
        namespace: &str,
        claim: &str,
        uid: &str,
    ) -> Result<VolumeName, String> {
        let name = match &self.path_pattern {
            None => pv_name.to_owned(),
            Some(p) => p
                .replace("{namespace}", namespace)
                .replace("{name}", claim)
                .replace("{uid}", uid)
                .replace("{pv}", pv_name),
        };
        VolumeName::new(&name).map_err(|e| e.to_string())
    }
}

/// A pattern may use `{namespace}`, `{name}`, `{uid}`, `{pv}` and `[a-z0-9._-]`, and
/// must contain `{uid}` or `{pv}` so two claims can never share a directory.
fn check_pattern(p: &str) -> Result<(), String> {
    let rest = ["{namespace}", "{name}", "{uid}", "{pv}"]
        .iter()
        .fold(p.to_owned(), |s, t| s.replace(t, ""));
    if !rest
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err("only {namespace}, {name}, {uid}, {pv} and a-z 0-9 . _ -".into());
    }
    if !p.contains("{uid}") && !p.contains("{pv}") {
        return Err("a pattern containing {uid} or {pv}, so claims never share a directory".into());
    }
    Ok(())
}

/// Parses a squash policy: `none`, `root` or `all`.
pub fn parse_squash(s: &str) -> Result<Squash, String> {
    Squash::parse(s).ok_or_else(|| format!("`{s}` is not a squash policy: none, root or all"))
}

/// A size as Kubernetes writes quantities; the parser lives beside the volume spec,
/// whose bandwidth parameters read quantities too.
pub use crate::volume::quantity_bytes;

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_parameters_give_the_defaults() {
        assert_eq!(ClassParams::parse(&map(&[])), Ok(ClassParams::default()));
    }

    #[test]
    fn every_parameter_is_parsed() {
        let p = ClassParams::parse(&map(&[
            ("locality", "strict"),
            ("onDelete", "archive"),
            ("uid", "999"),
            ("gid", "998"),
            ("mode", "0750"),
            ("squash", "all"),
            ("anonUid", "1000"),
            ("anonGid", "1001"),
            ("pathPattern", "{namespace}.{name}.{uid}"),
            ("maxFiles", "5000"),
        ]))
        .expect("valid");
        assert_eq!(p.locality, Locality::Strict);
        assert_eq!(p.on_delete, OnDelete::Archive);
        let v = &p.volume;
        assert_eq!((v.uid, v.gid, v.mode), (999, 998, 0o750));
        assert_eq!(
            (v.squash, v.anon_uid, v.anon_gid),
            (Squash::All, 1000, 1001)
        );
        let name = p
            .volume_name("pvc-1", "db", "data-mysql-0", "1234")
            .expect("name");
        assert_eq!(name.as_str(), "db.data-mysql-0.1234");
        assert_eq!(p.volume.max_files, Some(5000));
    }

    #[test]
    fn bad_parameters_say_what_is_wrong() {
        let cases = [
            (
                ("color", "blue"),
                "unknown StorageClass parameter \"color\"",
            ),
            (("locality", "nearby"), "preferred, strict or none"),
            (("onDelete", "shred"), "delete, archive or retain"),
            (("uid", "-1"), "a number"),
            (("mode", "rwx"), "octal mode"),
            (("squash", "yes"), "none, root or all"),
            (("pathPattern", "../{uid}"), "only {namespace}"),
            (("pathPattern", "{namespace}/{uid}"), "only {namespace}"),
            (("pathPattern", "{namespace}-{name}"), "never share"),
            (("anonUid", "0"), "allowRootAnon"),
            (("anonGid", "0"), "allowRootAnon"),
            (("anonUid", "4294967295"), "below 4294967295"),
            (("allowRootAnon", "yes"), "true or false"),
            (("maxFiles", "0"), "from 1 to"),
            (("maxFiles", "-5"), "from 1 to"),
            (("maxFiles", "1e6"), "from 1 to"),
            (("maxFiles", "2199023255553"), "from 1 to"),
        ];
        for ((k, v), want) in cases {
            let err = ClassParams::parse(&map(&[(k, v)])).expect_err(k);
            assert!(err.contains(want), "{k}={v}: {err}");
        }
    }

    #[test]
    fn root_as_the_anonymous_id_needs_saying_so() {
        let p = ClassParams::parse(&map(&[
            ("anonUid", "0"),
            ("anonGid", "0"),
            ("allowRootAnon", "true"),
        ]))
        .expect("allowed explicitly");
        assert_eq!((p.volume.anon_uid, p.volume.anon_gid), (0, 0));
    }

    #[test]
    fn quantities_convert_to_bytes() {
        let cases = [
            ("1Gi", 1 << 30),
            ("500Mi", 500 << 20),
            ("1G", 1_000_000_000),
            ("1.5Gi", 3 << 29),
            ("100", 100),
            ("1e3", 1000),
            ("1500m", 2),
            ("1k", 1000),
        ];
        for (q, want) in cases {
            assert_eq!(quantity_bytes(q), Ok(want), "{q}");
        }
    }

    #[test]
    fn bad_quantities_are_refused() {
        for q in [
            "", "0", "0Gi", "-1Gi", "1Zi", "Gi", "1..2", "1e99", "99999Ei",
        ] {
            assert!(quantity_bytes(q).is_err(), "{q}");
        }
    }
}
