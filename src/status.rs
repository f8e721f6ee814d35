//! `localnfs status`: the volumes of each node as a table, from what the cluster
//! already holds — our PersistentVolumes (node, directory, size, claim, phase) and the
//! node agents' heartbeat Leases (alive, free bytes) and usage Leases (bytes and
//! objects used per volume, `objects::usage`), both listed a page at a time.
//! Use is drawn as a bar of the size (bytes) and of the object limit (inodes), so a
//! volume about to fill stands out. Read-only; the table is built by a pure function.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::Client;
use kube::api::{Api, ListParams};

use crate::cli::StatusArgs;
use crate::error::{Error, Result};
use crate::kubeclient::list_all;
use crate::objects::agents::{AgentInfo, unix_now};
use crate::objects::class::quantity_bytes;
use crate::objects::keys::{NODE_KEY, PROVISIONED_BY, SIZE, VOLUME_KEY};
use crate::objects::usage::node_usage;

/// Prints the table for the cluster in the kubeconfig.
pub async fn run(args: StatusArgs) -> Result<()> {
    let client = crate::kubeclient::limited_client(
        args.kube.kubeconfig.as_deref(),
        args.kube.rate(crate::kubeclient::STATUS_RATE),
    )
    .await?;
    print!(
        "{}",
        render(
            &client,
            &args.install.heartbeats.heartbeat_namespace,
            &args.install.provisioner_name
        )
        .await?
    );
    Ok(())
}

/// Reads the PVs and the agents' Leases and builds the table.
pub async fn render(client: &Client, namespace: &str, provisioner: &str) -> Result<String> {
    let pvs = list_all(
        &Api::<PersistentVolume>::all(client.clone()),
        &ListParams::default(),
    )
    .await
    .map_err(Error::kube("list PersistentVolumes"))?;
    let leases = list_all(
        &Api::<Lease>::namespaced(client.clone(), namespace),
        &ListParams::default(),
    )
    .await
    .map_err(Error::kube(format!("list Leases in {namespace}")))?;
    Ok(table(&pvs, &leases, provisioner, unix_now()))
}

/// Bytes in binary units, one decimal (`1.5 GiB`).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Width of a usage bar, between its brackets.
const BAR: usize = 10;

/// `used` of `total` as a bar and a percentage: `[###.......]  30%`. Past the total
/// the bar is full and the percentage says by how much; a use too small for 1 % reads
/// `<1%`, so it is not mistaken for an empty volume.
pub fn bar(used: u64, total: u64) -> String {
    let frac = if total == 0 {
        1.0
    } else {
        used as f64 / total as f64
    };
    let filled = ((frac * BAR as f64).round() as usize).min(BAR);
    let pct = match (frac * 100.0).round() as u64 {
        0 if used > 0 => "<1%".to_owned(),
        p => format!("{p}%"),
    };
    format!(
        "[{}{}] {pct:>4}",
        "#".repeat(filled),
        ".".repeat(BAR - filled)
    )
}

struct Row {
    node: String,
    claim: String,
    volume: String,
    size: String,
    /// Bar, percentage and bytes used; `-` when unknown.
    used: String,
    /// Bar, percentage and objects used of the limit; `-` when unknown.
    inodes: String,
    phase: String,
}

/// The status table: one line per node agent (alive or not, free space, volume
/// count), then one line per volume, grouped by node.
pub fn table(pvs: &[PersistentVolume], leases: &[Lease], provisioner: &str, now: i64) -> String {
    let mut agents = BTreeMap::new();
    let mut usage: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut objects: BTreeMap<String, BTreeMap<String, [u64; 2]>> = BTreeMap::new();
    for lease in leases {
        // One look, no history of changes to go by: "up" compares the agent's renew
        // time with this machine's clock, so it is only as right as both clocks
        // (a display; the controller and helper judge liveness by what they saw
        // change, crate::objects::agents).
        let renewed = crate::objects::agents::renewed_at(lease);
        if let Some((node, info)) = renewed.and_then(|r| AgentInfo::from_lease(lease, r)) {
            let mut used = BTreeMap::new();
            let mut inodes = BTreeMap::new();
            for (volume, r) in node_usage(&node, lease, leases) {
                if let Some(b) = r[0] {
                    used.insert(volume.clone(), b);
                }
                if let (Some(n), Some(max)) = (r[1], r[2]) {
                    inodes.insert(volume, [n, max]);
                }
            }
            usage.insert(node.clone(), used);
            objects.insert(node.clone(), inodes);
            agents.insert(node, info);
        }
    }
    let mut rows: Vec<Row> = pvs
        .iter()
        .filter_map(|pv| {
            let ann = pv.metadata.annotations.as_ref()?;
            if ann.get(PROVISIONED_BY).map(String::as_str) != Some(provisioner) {
                return None;
            }
            let node = ann.get(NODE_KEY).cloned().unwrap_or_default();
            let volume = ann.get(VOLUME_KEY).cloned().unwrap_or_default();
            let spec = pv.spec.as_ref();
            let capacity = spec
                .and_then(|s| s.capacity.as_ref())
                .and_then(|c| c.get("storage"))
                .map(|q| q.0.clone());
            let size_bytes = ann
                .get(SIZE)
                .and_then(|s| s.parse().ok())
                .or_else(|| capacity.as_deref().and_then(|q| quantity_bytes(q).ok()));
            let size = match size_bytes {
                Some(bytes) => human(bytes),
                None => capacity.unwrap_or_default(),
            };
            let claim = spec
                .and_then(|s| s.claim_ref.as_ref())
                .map(|c| {
                    format!(
                        "{}/{}",
                        c.namespace.as_deref().unwrap_or_default(),
                        c.name.as_deref().unwrap_or_default()
                    )
                })
                .unwrap_or_else(|| "-".into());
            let used = match (usage.get(&node).and_then(|u| u.get(&volume)), size_bytes) {
                (Some(b), Some(size)) => format!("{} {:>9}", bar(*b, size), human(*b)),
                (Some(b), None) => human(*b),
                (None, _) => "-".into(),
            };
            let inodes = objects.get(&node).and_then(|o| o.get(&volume)).map_or_else(
                || "-".into(),
                |[n, max]| format!("{} {n}/{max}", bar(*n, *max)),
            );
            let phase = pv
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            let phase = if pv.metadata.deletion_timestamp.is_some() {
                format!("{phase} (deleting)")
            } else {
                phase
            };
            Some(Row {
                node,
                claim,
                volume,
                size,
                used,
                inodes,
                phase,
            })
        })
        .collect();
    rows.sort_by(|a, b| (&a.node, &a.claim).cmp(&(&b.node, &b.claim)));

    let nodes: BTreeSet<&str> = agents
        .keys()
        .map(String::as_str)
        .chain(rows.iter().map(|r| r.node.as_str()))
        .collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<6} {:>10} {:>8}",
        "NODE", "AGENT", "FREE", "VOLUMES"
    );
    for node in &nodes {
        let count = rows.iter().filter(|r| r.node == *node).count();
        let (state, free) = match agents.get(*node) {
            Some(a) if a.expires >= now => ("up", human(a.free_bytes)),
            Some(_) => ("down", "-".into()),
            None => ("none", "-".into()),
        };
        let _ = writeln!(out, "{node:<20} {state:<6} {free:>10} {count:>8}");
    }
    if rows.is_empty() {
        out.push_str("\nno localnfs volumes\n");
        return out;
    }
    let w = |f: fn(&Row) -> &str, title: &str| {
        rows.iter()
            .map(|r| f(r).len())
            .max()
            .unwrap_or(0)
            .max(title.len())
    };
    let (wn, wc, wv, wu, wi) = (
        w(|r| &r.node, "NODE"),
        w(|r| &r.claim, "CLAIM"),
        w(|r| &r.volume, "VOLUME"),
        w(|r| &r.used, "USED"),
        w(|r| &r.inodes, "INODES"),
    );
    let _ = writeln!(
        out,
        "\n{:<wn$} {:<wc$} {:<wv$} {:>10} {:<wu$} {:<wi$} PHASE",
        "NODE", "CLAIM", "VOLUME", "SIZE", "USED", "INODES"
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "{:<wn$} {:<wc$} {:<wv$} {:>10} {:<wu$} {:<wi$} {}",
            r.node, r.claim, r.volume, r.size, r.used, r.inodes, r.phase
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::keys::{FREE_BYTES, USED_BYTES, USED_INODES};
    use serde_json::json;

    fn pv(name: &str, node: &str, claim: &str, phase: &str) -> PersistentVolume {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {
                PROVISIONED_BY: "localnfs.io/nfs", NODE_KEY: node, VOLUME_KEY: name, SIZE: "1073741824"}},
            "spec": {"capacity": {"storage": "1Gi"},
                     "claimRef": {"namespace": "db", "name": claim}},
            "status": {"phase": phase},
        }))
        .expect("pv")
    }

    fn lease(node: &str, renewed: &str, used: serde_json::Value) -> Lease {
        lease_with(node, renewed, used, json!({}))
    }

    fn lease_with(
        node: &str,
        renewed: &str,
        used: serde_json::Value,
        inodes: serde_json::Value,
    ) -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": format!("localnfs-node-{node}"), "annotations": {
                FREE_BYTES: "5368709120", USED_BYTES: used.to_string(),
                USED_INODES: inodes.to_string()}},
            "spec": {"renewTime": renewed, "leaseDurationSeconds": 30},
        }))
        .expect("lease")
    }

    #[test]
    fn volumes_are_listed_per_node_with_size_use_claim_and_phase() {
        let pvs = [
            pv("pvc-b", "n2", "data-db-1", "Bound"),
            pv("pvc-a", "n1", "data-db-0", "Released"),
        ];
        let renewed = "2026-01-01T00:00:00.000000Z";
        let t0 = 1_767_225_600; // renewTime as unix seconds
        let leases = [
            lease("n1", renewed, json!({"pvc-a": 4096})),
            lease("n3", "2025-01-01T00:00:00.000000Z", json!({})),
        ];
        let out = table(&pvs, &leases, "localnfs.io/nfs", t0 + 10);
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[1].starts_with("n1") && lines[1].contains("up") && lines[1].contains("5.0 GiB"),
            "{out}"
        );
        assert!(
            lines[2].starts_with("n2") && lines[2].contains("none"),
            "{out}"
        );
        assert!(
            lines[3].starts_with("n3") && lines[3].contains("down"),
            "{out}"
        );
        let a = lines
            .iter()
            .find(|l| l.contains("pvc-a"))
            .expect("pvc-a row");
        for want in ["db/data-db-0", "1.0 GiB", " 4.0 KiB ", "Released"] {
            assert!(a.contains(want), "{a}");
        }
        let b = lines
            .iter()
            .find(|l| l.contains("pvc-b"))
            .expect("pvc-b row");
        assert!(
            b.contains(" - ") && b.contains("Bound"),
            "unknown use shows -: {b}"
        );
        assert!(
            lines.iter().position(|l| l.contains("pvc-a"))
                < lines.iter().position(|l| l.contains("pvc-b")),
            "grouped by node"
        );
    }

    #[test]
    fn other_provisioners_volumes_are_not_listed() {
        let mut other = pv("pvc-x", "n1", "c", "Bound");
        other
            .metadata
            .annotations
            .as_mut()
            .expect("ann")
            .insert(PROVISIONED_BY.into(), "nfs.csi.k8s.io".into());
        let out = table(&[other], &[], "localnfs.io/nfs", 0);
        assert!(out.contains("no localnfs volumes"), "{out}");
    }

    #[test]
    fn use_is_drawn_as_bars_of_the_size_and_of_the_object_limit() {
        let pvs = [
            pv("pvc-a", "n1", "data-db-0", "Bound"),
            pv("pvc-b", "n1", "data-db-1", "Bound"),
            pv("pvc-c", "n1", "data-db-2", "Bound"),
        ];
        let renewed = "2026-01-01T00:00:00.000000Z";
        let leases = [lease_with(
            "n1",
            renewed,
            json!({"pvc-a": 805_306_368u64, "pvc-b": 4096, "pvc-c": 0}),
            json!({"pvc-a": [262_144, 262_144], "pvc-b": [3, 262_144]}),
        )];
        let out = table(&pvs, &leases, "localnfs.io/nfs", 1_767_225_610);
        let row = |v: &str| {
            out.lines()
                .find(|l| l.contains(v))
                .unwrap_or_else(|| panic!("no {v} row:\n{out}"))
        };
        let (a, b, c) = (row("pvc-a"), row("pvc-b"), row("pvc-c"));
        assert!(
            a.contains("[########..]  75% 768.0 MiB")
                && a.contains("[##########] 100% 262144/262144"),
            "{out}"
        );
        assert!(
            b.contains("[..........]  <1%   4.0 KiB") && b.contains("[..........]  <1% 3/262144"),
            "a little use is not shown as none:\n{out}"
        );
        assert!(
            c.contains("[..........]   0%       0 B") && c.contains(" - "),
            "objects unknown (an older agent) read -:\n{out}"
        );
        // One column per field: every row's bars start where the header says.
        let header = out
            .lines()
            .find(|l| l.starts_with("NODE") && l.contains("INODES"))
            .expect("volume header");
        for r in [a, b, c] {
            assert_eq!(r.find('['), header.find("USED"), "{out}");
        }
        let inodes_col = header.find("INODES").expect("INODES");
        for r in [a, b] {
            assert_eq!(r[inodes_col..].chars().next(), Some('['), "{out}");
        }
        assert_eq!(c[inodes_col..].chars().next(), Some('-'), "{out}");
        assert!(header.trim_end().ends_with("PHASE") && a.ends_with("Bound"));
    }

    #[test]
    fn bars_round_to_the_nearest_tenth_and_stay_inside_their_brackets() {
        assert_eq!(bar(0, 100), "[..........]   0%");
        assert_eq!(bar(1, 1000), "[..........]  <1%");
        assert_eq!(bar(49, 100), "[#####.....]  49%");
        assert_eq!(bar(100, 100), "[##########] 100%");
        assert_eq!(
            bar(130, 100),
            "[##########] 130%",
            "over the limit says by how much"
        );
        assert_eq!(bar(5, 0), "[##########] 100%");
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10 << 30), "10.0 GiB");
    }
}
