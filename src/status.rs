//! `localnfs status`: the volumes of each node as a table, from what the cluster
//! already holds — our PersistentVolumes (node, directory, size, claim, phase) and the
//! node agents' heartbeat Leases (alive, free bytes, bytes used per volume). Read-only;
//! the table is built by a pure function.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::Client;
use kube::api::{Api, ListParams};

use crate::cli::StatusArgs;
use crate::error::{Error, Result};
use crate::objects::agents::{AgentInfo, unix_now};
use crate::objects::keys::{NODE_KEY, PROVISIONED_BY, SIZE, USED_BYTES, VOLUME_KEY};

/// Prints the table for the cluster in the kubeconfig.
pub async fn run(args: StatusArgs) -> Result<()> {
    let client = crate::kubeclient::client(args.kube.kubeconfig.as_deref()).await?;
    print!(
        "{}",
        render(
            &client,
            &args.install.namespace,
            &args.install.provisioner_name
        )
        .await?
    );
    Ok(())
}

/// Reads the PVs and the agents' Leases and builds the table.
pub async fn render(client: &Client, namespace: &str, provisioner: &str) -> Result<String> {
    let pvs = Api::<PersistentVolume>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list PersistentVolumes"))?;
    let leases = Api::<Lease>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .map_err(Error::kube(format!("list Leases in {namespace}")))?;
    Ok(table(&pvs.items, &leases.items, provisioner, unix_now()))
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

struct Row {
    node: String,
    claim: String,
    volume: String,
    size: String,
    used: String,
    phase: String,
}

/// The status table: one line per node agent (alive or not, free space, volume
/// count), then one line per volume, grouped by node.
pub fn table(pvs: &[PersistentVolume], leases: &[Lease], provisioner: &str, now: i64) -> String {
    let mut agents = BTreeMap::new();
    let mut usage: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for lease in leases {
        if let Some((node, info)) = AgentInfo::from_lease(lease) {
            let used = crate::kubeclient::annotation(lease, USED_BYTES)
                .and_then(|j| serde_json::from_str(j).ok())
                .unwrap_or_default();
            usage.insert(node.clone(), used);
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
            let size = match ann.get(SIZE).and_then(|s| s.parse().ok()) {
                Some(bytes) => human(bytes),
                None => spec
                    .and_then(|s| s.capacity.as_ref())
                    .and_then(|c| c.get("storage"))
                    .map(|q| q.0.clone())
                    .unwrap_or_default(),
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
            let used = usage
                .get(&node)
                .and_then(|u| u.get(&volume))
                .map_or_else(|| "-".into(), |b| human(*b));
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
    let (wn, wc, wv) = (
        w(|r| &r.node, "NODE"),
        w(|r| &r.claim, "CLAIM"),
        w(|r| &r.volume, "VOLUME"),
    );
    let _ = writeln!(
        out,
        "\n{:<wn$} {:<wc$} {:<wv$} {:>10} {:>10} PHASE",
        "NODE", "CLAIM", "VOLUME", "SIZE", "USED"
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "{:<wn$} {:<wc$} {:<wv$} {:>10} {:>10} {}",
            r.node, r.claim, r.volume, r.size, r.used, r.phase
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::keys::FREE_BYTES;
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
        serde_json::from_value(json!({
            "metadata": {"name": format!("localnfs-node-{node}"), "annotations": {
                FREE_BYTES: "5368709120", USED_BYTES: used.to_string()}},
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
        for want in ["db/data-db-0", "1.0 GiB", "4.0 KiB", "Released"] {
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
    fn sizes_read_like_people_write_them() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10 << 30), "10.0 GiB");
    }
}
