//! Per-volume usage reports, kept apart from the heartbeat: the heartbeat Lease
//! (`agents`) stays small and the same size however many volumes a node has, and says
//! only how many usage shards the node has ([`USAGE_SHARDS`]); each volume's bytes and
//! objects live in the node's usage Leases (`localnfs-usage-<shard>-<node>` in the
//! heartbeat namespace, labelled with the node and [`USAGE_LABEL`]), one annotation
//! ([`USAGE`]) each.
//!
//! No per-node cap: a node with `n` volumes has [`shard_count`]`(n)` shards (a power of
//! two, about [`SHARD_VOLUMES`] volumes each, so one shard's annotation stays far below
//! the API server's 256 KiB), and a volume's shard is a fixed hash of its name
//! ([`shard_of`]), so adding volumes rewrites only the shard they land in (until the
//! count doubles, which rewrites them all once).
//!
//! Few writes: a shard is written only when it changed meaningfully ([`to_write`]): a
//! volume appeared or went, or one of its volumes moved by at least 1/[`STEP`] of its
//! size or of its object limit, or had its object limit changed; smaller changes are
//! written once [`REFRESH`] has passed since the shard was last written, so `status`
//! shows a few KiB written to a large volume within about that long. A node whose
//! volumes sit still writes nothing but its heartbeat.
//!
//! Readers ([`node_usage`], used by `status`) read the shards the heartbeat counts and
//! ignore any beyond (left over from when the node had more volumes). Agents of a
//! version before shards put usage on the heartbeat Lease itself ([`USED_BYTES`],
//! [`USED_INODES`]); a heartbeat without [`USAGE_SHARDS`] is read that way, so a
//! cluster mid-upgrade still shows every node's use.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::coordination::v1::Lease;

use super::keys::{USED_BYTES, USED_INODES};

/// Prefix of the usage Leases' names.
pub const USAGE_LEASE_PREFIX: &str = "localnfs-usage-";
/// Heartbeat annotation: how many usage shards the node has.
pub const USAGE_SHARDS: &str = "localnfs.io/usage-shards";
/// Usage Lease annotation: its volumes as JSON, name → `[bytes, objects, object limit]`.
pub const USAGE: &str = "localnfs.io/usage";
/// Label on usage Leases (value: the shard), so heartbeat watches can leave them out.
pub const USAGE_LABEL: &str = "localnfs.io/usage-shard";
/// About how many volumes one shard holds. An entry is about 70 bytes of JSON, so
/// even a shard holding twice its share is well under 100 KiB.
pub const SHARD_VOLUMES: usize = 500;
/// A volume's report is rewritten once it moved by 1/`STEP` of its size or limit.
pub const STEP: u64 = 100;

/// How long a shard whose volumes moved by less than a step waits before it is
/// rewritten anyway: a bound on how stale `status` is, and on the write rate of a
/// shard whose volumes change a little all the time (one write per this long).
pub const REFRESH: std::time::Duration = std::time::Duration::from_secs(30);

/// What is reported of one volume: bytes used, objects used, object limit.
pub type Report = [u64; 3];

/// One volume as the agent sees it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    pub report: Report,
    /// Its size limit in bytes (the scale for "moved meaningfully").
    pub size: u64,
}

/// How many shards a node with `volumes` volumes has.
pub fn shard_count(volumes: usize) -> u32 {
    let needed = volumes.div_ceil(SHARD_VOLUMES).max(1);
    u32::try_from(needed.next_power_of_two())
        .unwrap_or(MAX_SHARDS)
        .min(MAX_SHARDS)
}

/// Most usage shards a node has (half a million volumes at [`SHARD_VOLUMES`] each):
/// the write guard refuses any other usage Lease name, so an agent cannot fill etcd
/// with Leases of made-up shards.
pub const MAX_SHARDS: u32 = 1024;

/// The shard of `volume` among `shards`: FNV-1a of the name, the same in every
/// version and on every machine.
pub fn shard_of(volume: &str, shards: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in volume.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    u32::try_from(h % u64::from(shards.max(1))).unwrap_or(0)
}

/// The name of `node`'s usage Lease for `shard`.
pub fn lease_name(node: &str, shard: u32) -> String {
    format!("{USAGE_LEASE_PREFIX}{shard}-{node}")
}

/// `(shard, node)` of a usage Lease name, or `None` for other names.
pub fn parse_lease_name(name: &str) -> Option<(u32, &str)> {
    let (shard, node) = name.strip_prefix(USAGE_LEASE_PREFIX)?.split_once('-')?;
    let digits_only = !shard.is_empty() && shard.bytes().all(|b| b.is_ascii_digit());
    // One name per shard: no leading zeros, nothing past the most shards there are.
    let canonical = shard == "0" || !shard.starts_with('0');
    (digits_only && canonical && !node.is_empty()).then_some(())?;
    let n: u32 = shard.parse().ok()?;
    (n < MAX_SHARDS).then_some((n, node))
}

/// Whether `now` moved meaningfully from what was reported (`before`).
fn moved(before: &Report, now: &Now) -> bool {
    let far = |a: u64, b: u64, scale: u64| a.abs_diff(b).saturating_mul(STEP) >= scale.max(1);
    far(before[0], now.report[0], now.size)
        || far(before[1], now.report[1], now.report[2])
        || before[2] != now.report[2]
}

/// The shards worth writing, with what to write in each: those whose volumes differ
/// from what was last written (`written`, shard → its volumes) or that hold a volume
/// that [`moved`], and those with any change at all that are `due` (last written
/// [`REFRESH`] ago or more). `volumes` is every volume on the node now, in `shards`
/// shards.
pub fn to_write(
    volumes: &BTreeMap<String, Now>,
    written: &HashMap<u32, BTreeMap<String, Report>>,
    shards: u32,
    due: impl Fn(u32) -> bool,
) -> Vec<(u32, BTreeMap<String, Report>)> {
    let mut now: BTreeMap<u32, BTreeMap<&str, &Now>> =
        (0..shards).map(|s| (s, BTreeMap::new())).collect();
    for (name, v) in volumes {
        now.entry(shard_of(name, shards))
            .or_default()
            .insert(name, v);
    }
    now.into_iter()
        .filter(|(shard, vols)| match written.get(shard) {
            None => true,
            Some(old) => {
                old.len() != vols.len()
                    || vols
                        .iter()
                        .any(|(name, v)| old.get(*name).is_none_or(|r| moved(r, v)))
                    || (due(*shard)
                        && vols
                            .iter()
                            .any(|(name, v)| old.get(*name).is_some_and(|r| *r != v.report)))
            }
        })
        .map(|(shard, vols)| {
            let report = vols
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v.report))
                .collect();
            (shard, report)
        })
        .collect()
}

/// Each volume's report on `node`, from its heartbeat and the usage Leases among
/// `leases` (any Leases of the heartbeat namespace): the shards the heartbeat counts,
/// or, from an agent older than shards, the annotations on the heartbeat itself.
pub fn node_usage<'a>(
    node: &str,
    heartbeat: &'a Lease,
    leases: impl IntoIterator<Item = &'a Lease>,
) -> BTreeMap<String, [Option<u64>; 3]> {
    let ann = |l: &'a Lease, key: &str| -> Option<&'a str> {
        l.metadata
            .annotations
            .as_ref()?
            .get(key)
            .map(String::as_str)
    };
    let mut out: BTreeMap<String, [Option<u64>; 3]> = BTreeMap::new();
    let Some(shards) = ann(heartbeat, USAGE_SHARDS).and_then(|s| s.parse::<u32>().ok()) else {
        // An agent before shards: bytes and [objects, limit] on the heartbeat.
        let bytes: BTreeMap<String, u64> = ann(heartbeat, USED_BYTES)
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        let objects: BTreeMap<String, [u64; 2]> = ann(heartbeat, USED_INODES)
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        for (v, b) in bytes {
            out.entry(v).or_default()[0] = Some(b);
        }
        for (v, [n, max]) in objects {
            let e = out.entry(v).or_default();
            (e[1], e[2]) = (Some(n), Some(max));
        }
        return out;
    };
    for lease in leases {
        let Some((shard, of)) = lease.metadata.name.as_deref().and_then(parse_lease_name) else {
            continue;
        };
        if of != node || shard >= shards {
            continue;
        }
        let vols: BTreeMap<String, Report> = ann(lease, USAGE)
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or_default();
        out.extend(vols.into_iter().map(|(v, r)| (v, r.map(Some))));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now(bytes: u64, objects: u64) -> Now {
        Now {
            report: [bytes, objects, 1000],
            size: 1_000_000,
        }
    }

    #[test]
    fn shards_grow_in_powers_of_two_with_the_volumes() {
        let cases = [
            (0, 1),
            (1, 1),
            (500, 1),
            (501, 2),
            (1000, 2),
            (1001, 4),
            (10_000, 32),
        ];
        for (volumes, want) in cases {
            assert_eq!(shard_count(volumes), want, "{volumes} volumes");
        }
    }

    #[test]
    fn volumes_spread_over_shards_evenly_enough_to_fit_one_annotation() {
        let shards = shard_count(3000);
        let mut per: HashMap<u32, usize> = HashMap::new();
        for i in 0..3000 {
            *per.entry(shard_of(
                &format!("pvc-{i:08x}-0000-4000-8000-000000000000"),
                shards,
            ))
            .or_default() += 1;
        }
        assert_eq!(per.len(), shards as usize, "every shard used");
        assert!(per.values().all(|n| *n < 2 * SHARD_VOLUMES), "{per:?}");
    }

    #[test]
    fn usage_lease_names_round_trip_and_nothing_else_parses() {
        assert_eq!(
            parse_lease_name(&lease_name("node-1", 3)),
            Some((3, "node-1"))
        );
        assert_eq!(parse_lease_name("localnfs-usage-12-a-b"), Some((12, "a-b")));
        for other in [
            "localnfs-node-n1",
            "localnfs-usage-x-n1",
            "localnfs-usage-1-",
            "localnfs-usage--n1",
            "localnfs-usage-03-n1",
            "localnfs-usage-1024-n1",
            "localnfs-usage-99999999999-n1",
        ] {
            assert_eq!(parse_lease_name(other), None, "{other}");
        }
    }

    #[test]
    fn only_shards_that_changed_meaningfully_are_written() {
        let shards = 4;
        let names: Vec<String> = (0..40).map(|i| format!("v{i}")).collect();
        let vols: BTreeMap<String, Now> = names.iter().map(|n| (n.clone(), now(0, 1))).collect();
        let first = to_write(&vols, &HashMap::new(), shards, |_| false);
        assert_eq!(first.len(), 4, "everything once");
        let written: HashMap<u32, BTreeMap<String, Report>> = first.into_iter().collect();
        assert!(
            to_write(&vols, &written, shards, |_| true).is_empty(),
            "at rest: nothing"
        );
        let v0 = shard_of("v0", shards);
        let cases = [
            ("bytes moved less than 1% of the size", now(9_999, 1), false),
            ("bytes moved 1% of the size", now(10_000, 1), true),
            ("objects moved less than 1% of the limit", now(0, 10), false),
            ("objects moved 1% of the limit", now(0, 11), true),
            (
                "object limit changed (resize)",
                Now {
                    report: [0, 1, 2000],
                    size: 2_000_000,
                },
                true,
            ),
        ];
        for (what, v, want) in cases {
            let mut changed = vols.clone();
            changed.insert("v0".into(), v);
            let w = to_write(&changed, &written, shards, |_| false);
            assert_eq!(!w.is_empty(), want, "{what}");
            assert!(w.iter().all(|(s, _)| *s == v0), "{what}: only v0's shard");
            // Once the shard is due, any change at all is written (and only its shard).
            let w = to_write(&changed, &written, shards, |_| true);
            assert_eq!(w.len(), 1, "{what}: due");
            assert_eq!(w[0].0, v0, "{what}: due, only v0's shard");
        }
        let mut gone = vols.clone();
        gone.remove("v1");
        let w = to_write(&gone, &written, shards, |_| false);
        assert_eq!(w.len(), 1, "a removed volume rewrites its shard");
        assert!(!w[0].1.contains_key("v1"));
    }

    fn lease(name: &str, ann: serde_json::Value) -> Lease {
        serde_json::from_value(json!({"metadata": {"name": name, "annotations": ann}}))
            .expect("lease")
    }

    #[test]
    fn readers_take_the_counted_shards_and_old_agents_annotations() {
        let hb = lease("localnfs-node-n1", json!({USAGE_SHARDS: "2"}));
        let leases = [
            lease(&lease_name("n1", 0), json!({USAGE: r#"{"a":[1,2,3]}"#})),
            lease(&lease_name("n1", 1), json!({USAGE: r#"{"b":[4,5,6]}"#})),
            lease(&lease_name("n1", 2), json!({USAGE: r#"{"stale":[7,8,9]}"#})),
            lease(&lease_name("n2", 0), json!({USAGE: r#"{"other":[1,1,1]}"#})),
        ];
        let got = node_usage("n1", &hb, &leases);
        let want: BTreeMap<String, [Option<u64>; 3]> = [
            ("a".to_owned(), [Some(1), Some(2), Some(3)]),
            ("b".to_owned(), [Some(4), Some(5), Some(6)]),
        ]
        .into();
        assert_eq!(got, want, "shard 2 is beyond the count; n2's are not n1's");
        let old = lease(
            "localnfs-node-n1",
            json!({USED_BYTES: r#"{"a":10,"b":20}"#, USED_INODES: r#"{"a":[1,9]}"#}),
        );
        let got = node_usage("n1", &old, &leases);
        assert_eq!(got["a"], [Some(10), Some(1), Some(9)]);
        assert_eq!(
            got["b"],
            [Some(20), None, None],
            "an agent before object counts"
        );
    }
}
