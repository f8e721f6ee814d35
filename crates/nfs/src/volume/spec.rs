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
//!
//! Service parameters (`readIOPS`, `writeIOPS`, `readBandwidth`, `writeBandwidth`,
//! `weight`) are optional fields, absent when unset, so a volume without them reads and
//! writes exactly as before; the NFS server enforces them (`nfs::fair`, `nfs::throttle`).

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
    /// Ceiling on read calls (READ, READDIR, READDIRPLUS, READLINK) per second; `None`:
    /// unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_iops: Option<u64>,
    /// Ceiling on write calls (WRITE, COMMIT and the namespace changes) per second;
    /// `None`: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_iops: Option<u64>,
    /// Ceiling on bytes READ per second; `None`: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bandwidth: Option<u64>,
    /// Ceiling on bytes written (WRITE) per second; `None`: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_bandwidth: Option<u64>,
    /// The volume's share of the server when volumes compete, relative to the others'
    /// (1 to 1000); `None`: [`DEFAULT_WEIGHT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// The fair-share weight of a volume whose class names none.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Largest `weight`: a thousand times the smallest share is as unequal as it gets.
pub const MAX_WEIGHT: u32 = 1000;
/// Smallest bandwidth ceiling: below one 4 KiB page a second a ceiling is a typo (a
/// number meant as MiB), and a single write would wait minutes.
pub const MIN_BANDWIDTH: u64 = 4096;

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
            read_iops: None,
            write_iops: None,
            read_bandwidth: None,
            write_bandwidth: None,
            weight: None,
        }
    }

    /// The volume's fair-share weight, the default filled in.
    pub fn weight(&self) -> u32 {
        self.weight.unwrap_or(DEFAULT_WEIGHT)
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
    pub const PARAMS: [&'static str; 12] = [
        "uid",
        "gid",
        "mode",
        "squash",
        "anonUid",
        "anonGid",
        "maxFiles",
        "readIOPS",
        "writeIOPS",
        "readBandwidth",
        "writeBandwidth",
        "weight",
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
            "readIOPS" => parse_iops(value).map(|v| self.read_iops = Some(v)),
            "writeIOPS" => parse_iops(value).map(|v| self.write_iops = Some(v)),
            "readBandwidth" => parse_bandwidth(value).map(|v| self.read_bandwidth = Some(v)),
            "writeBandwidth" => parse_bandwidth(value).map(|v| self.write_bandwidth = Some(v)),
            "weight" => value
                .parse::<u32>()
                .ok()
                .filter(|w| (1..=MAX_WEIGHT).contains(w))
                .map(|v| self.weight = Some(v))
                .ok_or_else(|| format!("a whole number from 1 to {MAX_WEIGHT}")),
            _ => return None,
        };
        Some(set)
    }
}

/// Calls per second: a whole number, at least 1.
fn parse_iops(value: &str) -> Result<u64, String> {
    value
        .parse::<u64>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| "a whole number of calls per second, at least 1".to_owned())
}

/// Bytes per second as a quantity (`50Mi`, `100M`, `1048576`), at least [`MIN_BANDWIDTH`].
fn parse_bandwidth(value: &str) -> Result<u64, String> {
    quantity_bytes(value)
        .ok()
        .filter(|b| *b >= MIN_BANDWIDTH)
        .ok_or_else(|| {
            format!("bytes per second as a quantity such as 50Mi or 100M, at least {MIN_BANDWIDTH}")
        })
}

/// A size as Kubernetes writes quantities (`1Gi`, `500M`, `1.5Gi`, `1e9`, `100`) in
/// bytes, rounded up; zero is refused. Claims' requests and the command line's sizes
/// both use it.
pub fn quantity_bytes(q: &str) -> Result<u64, String> {
    let err = || {
        format!(
            "size {q:?} is not valid: use a number of bytes or a quantity such as 1Gi, 500Mi, 10G"
        )
    };
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    if num.is_empty() || num.matches('.').count() > 1 {
        return Err(err());
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    // value = digits × 10^-frac_len × multiplier, computed in u128 to avoid floats.
    let digits: u128 = format!("{int}{frac}").parse().map_err(|_| err())?;
    let scale = 10u128.pow(frac.len() as u32);
    let (mul, div): (u128, u128) = match suffix {
        "" => (1, 1),
        "m" => (1, 1000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        s if s.starts_with(['e', 'E']) => {
            let exp: u32 = s[1..].parse().map_err(|_| err())?;
            (10u128.checked_pow(exp).ok_or_else(err)?, 1)
        }
        _ => return Err(err()),
    };
    let numer = digits.checked_mul(mul).ok_or_else(err)?;
    let denom = scale * div;
    let bytes = numer.div_ceil(denom);
    match u64::try_from(bytes) {
        Ok(0) => Err(format!("size {q:?} must be greater than zero")),
        Ok(b) => Ok(b),
        Err(_) => Err(err()),
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
    fn service_parameters_parse_with_units_and_bounds() {
        let mut spec = VolumeSpec::template();
        for (key, value) in [
            ("readIOPS", "200"),
            ("writeIOPS", "1"),
            ("readBandwidth", "50Mi"),
            ("writeBandwidth", "100M"),
            ("weight", "300"),
        ] {
            assert_eq!(spec.set_param(key, value), Some(Ok(())), "{key}={value}");
        }
        assert_eq!(spec.read_iops, Some(200));
        assert_eq!(spec.write_iops, Some(1));
        assert_eq!(spec.read_bandwidth, Some(50 << 20));
        assert_eq!(spec.write_bandwidth, Some(100_000_000));
        assert_eq!(spec.weight(), 300);
        for (key, value) in [
            ("readIOPS", "0"),
            ("writeIOPS", "1.5"),
            ("readBandwidth", "4095"),
            ("writeBandwidth", "fast"),
            ("weight", "0"),
            ("weight", "1001"),
        ] {
            assert!(
                matches!(spec.set_param(key, value), Some(Err(_))),
                "{key}={value}"
            );
        }
    }

    #[test]
    fn a_spec_without_service_parameters_serializes_as_before() {
        let spec = VolumeSpec::template();
        let json = serde_json::to_string(&spec).expect("json");
        for field in [
            "read_iops",
            "write_iops",
            "read_bandwidth",
            "write_bandwidth",
            "weight",
        ] {
            assert!(!json.contains(field), "{json}");
        }
        assert_eq!(spec.weight(), DEFAULT_WEIGHT);
        let mut limited = spec.clone();
        limited.write_bandwidth = Some(1 << 20);
        let back: VolumeSpec =
            serde_json::from_str(&serde_json::to_string(&limited).expect("json")).expect("read");
        assert_eq!(back, limited);
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("0755"), Ok(0o755));
        assert_eq!(parse_mode("750"), Ok(0o750));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("77777").is_err());
    }
}
