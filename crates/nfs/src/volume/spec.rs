//! What a volume is: [`VolumeSpec`], described once. A StorageClass's parameters fill
//! it in ([`VolumeSpec::set_param`]), the controller's request to a node agent carries
//! it, and the store keeps it in each volume's metadata ([`super::VolumeMeta`] embeds
//! it). Adding a volume parameter is a field here, its arm in `set_param`, and the
//! code that enforces it.
//!
//! Its serde form is the on-disk one: snake_case field names, as `meta/<name>.json`
//! has always held them (so metadata written by any version reads in any other). The
//! controller→agent request writes the same fields with camelCase names; it converts
//! the keys itself (`objects::signed` in the root crate), field by field name, so a
//! new field needs nothing there.

use serde::{Deserialize, Serialize};

use super::VolumeName;

/// Identity squashing for a volume: which callers are served as the anonymous ids.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Squash {
    /// Callers keep their uid/gid, root included.
    #[default]
    None,
    /// uid 0 becomes the anonymous uid/gid.
    Root,
    /// Every caller becomes the anonymous uid/gid.
    All,
}

impl Squash {
    /// Reads `none`, `root` or `all` (as StorageClasses and the command line write it).
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "none" => Some(Squash::None),
            "root" => Some(Squash::Root),
            "all" => Some(Squash::All),
            _ => None,
        }
    }
}

/// What a volume should be; the input to [`super::VolumeStore::create`], what the
/// controller asks a node agent for, and the bulk of a volume's metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub name: VolumeName,
    pub size_bytes: u64,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub squash: Squash,
    pub anon_uid: u32,
    pub anon_gid: u32,
    /// Most objects (files, directories, links) the volume may hold; `None`: one per
    /// 4 KiB of its size, at least 1,024 (see `nfs::quota::max_inodes`). Absent in
    /// metadata and requests written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_files: Option<u64>,
}

/// Largest `maxFiles`: far past what any filesystem holds, small enough that a typo
/// (a size in bytes, say) is caught.
pub const MAX_FILES: u64 = 1 << 40;

impl VolumeSpec {
    /// A spec with root ownership, mode 0777 (pods run as any uid) and no squashing:
    /// the defaults, here and nowhere else.
    pub fn new(name: VolumeName, size_bytes: u64) -> Self {
        Self {
            name,
            size_bytes,
            uid: 0,
            gid: 0,
            mode: 0o777,
            squash: Squash::None,
            anon_uid: 65534,
            anon_gid: 65534,
            max_files: None,
        }
    }

    /// The defaults before a volume has a name and size (a StorageClass's template):
    /// [`Self::named`] makes the real spec from it.
    pub fn template() -> Self {
        Self::new(VolumeName::placeholder(), 0)
    }

    /// This spec for the volume `name` of `size_bytes`.
    pub fn named(&self, name: VolumeName, size_bytes: u64) -> Self {
        Self {
            name,
            size_bytes,
            ..self.clone()
        }
    }

    /// The StorageClass parameters that set a field, as classes spell them.
    pub const PARAMS: [&'static str; 7] = [
        "uid", "gid", "mode", "squash", "anonUid", "anonGid", "maxFiles",
    ];

    /// Sets the field class parameter `key` names from its text `value`. `None`: `key`
    /// names no field here; `Some(Err(expected))`: the value is not one, and `expected`
    /// says what would be.
    pub fn set_param(&mut self, key: &str, value: &str) -> Option<Result<(), String>> {
        let id = || {
            value
                .parse::<u32>()
                .map_err(|_| "a number from 0 to 4294967295".to_owned())
        };
        let set = match key {
            "uid" => id().map(|v| self.uid = v),
            "gid" => id().map(|v| self.gid = v),
            "anonUid" => id().map(|v| self.anon_uid = v),
            "anonGid" => id().map(|v| self.anon_gid = v),
            "mode" => parse_mode(value)
                .map(|v| self.mode = v)
                .map_err(|_| "an octal mode such as 0770".to_owned()),
            "squash" => Squash::parse(value)
                .map(|v| self.squash = v)
                .ok_or_else(|| "none, root or all".to_owned()),
            "maxFiles" => value
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=MAX_FILES).contains(n))
                .map(|v| self.max_files = Some(v))
                .ok_or_else(|| format!("a whole number from 1 to {MAX_FILES}")),
            _ => return None,
        };
        Some(set)
    }
}

/// Parses an octal file mode such as `0755` or `750`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("`{s}` is not an octal mode such as 0755"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_parameter_sets_a_field() {
        for key in VolumeSpec::PARAMS {
            let mut spec = VolumeSpec::template();
            assert!(spec.set_param(key, "1").is_some(), "{key}");
        }
        assert!(VolumeSpec::template().set_param("color", "1").is_none());
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("0755"), Ok(0o755));
        assert_eq!(parse_mode("750"), Ok(0o750));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("77777").is_err());
    }
}
