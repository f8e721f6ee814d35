//! Who may connect and which node may use which volume, from the cluster (DESIGN
//! invariant 8): the allow-list is every Node's InternalIPs plus `--allow`; each volume
//! of this node is served to the InternalIPs of the nodes its PV's
//! [`PUBLISHED_NODES`] annotation names (see `provisioner::publish`), to every
//! allow-listed client when its PV has no such annotation (a PV made before it
//! existed), and to nobody when no PV names it. Recomputed on every Node and PV event,
//! so a Node whose address changes or a node no longer published loses access on its
//! next call.
//!
//! Restarts: the last result is saved in `<root>/cluster-access.json`. An agent that
//! starts with it serves at once under it and replaces it as soon as the Nodes and PVs
//! are listed; one that starts without it (a first start) serves nothing until they
//! are (clients mounted `hard` wait, they see no error). Neither way opens a volume to
//! everyone or shuts running pods out while the lists load.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, PersistentVolume};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::nfs::{AllowList, ClusterGrants, Exports, Network};
use crate::objects::keys::{NODE_KEY, PUBLISHED_NODES, VOLUME_KEY};
use crate::objects::published;
use crate::volume::VolumeName;

/// File name of the saved result under the node root.
const SNAPSHOT: &str = "cluster-access.json";

/// The cluster's word on access for one node agent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterAccess {
    /// Every node's InternalIPs.
    pub nodes: Vec<Network>,
    pub volumes: ClusterGrants,
}

/// Each node's InternalIPs.
fn node_addresses(nodes: &[Arc<Node>]) -> BTreeMap<String, Vec<Network>> {
    nodes
        .iter()
        .map(|n| {
            let ips = crate::kubeclient::internal_ips(n)
                .filter_map(|a| a.parse::<IpAddr>().ok())
                .map(Network::host)
                .collect();
            (n.name_any(), ips)
        })
        .collect()
}

/// What the Nodes and this node's PVs say (pure). `bad`: PVs whose annotation cannot
/// be read; their volumes are served to nobody until it is fixed.
pub fn compute(
    node: &str,
    pvs: &[Arc<PersistentVolume>],
    nodes: &[Arc<Node>],
    bad: &mut Vec<String>,
) -> ClusterAccess {
    let addresses = node_addresses(nodes);
    let mut volumes: BTreeMap<VolumeName, Option<BTreeSet<Network>>> = BTreeMap::new();
    for pv in pvs {
        let ann = pv.annotations();
        if pv.labels().get(NODE_KEY).map(String::as_str) != Some(node) {
            continue;
        }
        let Some(volume) = ann.get(VOLUME_KEY).and_then(|v| VolumeName::new(v).ok()) else {
            continue;
        };
        let grant = match ann.get(PUBLISHED_NODES).map(|v| published::parse(v)) {
            None => None,
            Some(Ok(names)) => Some(
                names
                    .iter()
                    .flat_map(|n| addresses.get(n).into_iter().flatten().copied())
                    .collect(),
            ),
            Some(Err(_)) => {
                bad.push(pv.name_any());
                Some(BTreeSet::new())
            }
        };
        // Two PVs naming one volume (a mistake): both sets are served.
        let slot = volumes
            .entry(volume)
            .or_insert_with(|| Some(BTreeSet::new()));
        match (slot.as_mut(), grant) {
            (Some(have), Some(more)) => have.extend(more),
            (_, None) => *slot = None,
            (None, Some(_)) => {}
        }
    }
    ClusterAccess {
        nodes: addresses
            .into_values()
            .flatten()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
        volumes: ClusterGrants(
            volumes
                .into_iter()
                .map(|(v, nets)| (v, nets.map(|n| n.into_iter().collect())))
                .collect(),
        ),
    }
}

fn snapshot_path(root: &Path) -> PathBuf {
    root.join(SNAPSHOT)
}

/// The result saved by the last run, if there is a readable one.
pub fn load(root: &Path) -> Option<ClusterAccess> {
    let path = snapshot_path(root);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the saved cluster access");
            return None;
        }
    };
    serde_json::from_slice(&bytes)
        .inspect_err(|e| tracing::warn!(file = %path.display(), error = %e, "saved cluster access unreadable; waiting for the cluster"))
        .ok()
}

/// Puts `access` in force: the allow-list (with the `--allow` networks) and the
/// per-volume grants.
pub fn apply(access: &ClusterAccess, extra: &[Network], allow: &AllowList, exports: &Exports) {
    let mut nets = extra.to_vec();
    nets.extend_from_slice(&access.nodes);
    allow.replace(nets);
    exports.access.set_cluster(access.volumes.clone());
}

/// Keeps the allow-list and the grants equal to what the Nodes and this node's PVs
/// say, from the first complete list of both until `shutdown`; `synced` turns true
/// once they are in force.
pub async fn keep(
    client: Client,
    node: String,
    exports: Arc<Exports>,
    allow: AllowList,
    extra: Vec<Network>,
    synced: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let (nodes, node_writer) = reflector::store::<Node>();
    let (pvs, pv_writer) = reflector::store::<PersistentVolume>();
    let mine = watcher::Config::default().labels(&format!("{NODE_KEY}={node}"));
    // Either list's events count; which one it was does not matter.
    let node_events = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(crate::cache::trim)
        .reflect(node_writer)
        .map(|e| (true, e.map(|e| matches!(e, watcher::Event::InitDone))));
    let pv_events = watcher(Api::<PersistentVolume>::all(client), mine)
        .default_backoff()
        .modify(crate::cache::trim)
        .reflect(pv_writer)
        .map(|e| (false, e.map(|e| matches!(e, watcher::Event::InitDone))));
    let events =
        futures::stream::select(node_events, pv_events).take_until(shutdown.cancelled_owned());
    tokio::pin!(events);
    let (mut nodes_listed, mut pvs_listed) = (false, false);
    let (latest, to_save) = watch::channel(load(exports.store().root()));
    let saver = tokio::spawn(save(exports.store().root().to_owned(), to_save));
    while let Some((is_node, event)) = events.next().await {
        match event {
            Ok(true) if is_node => nodes_listed = true,
            Ok(true) => pvs_listed = true,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "watch of Nodes or PVs failed; retrying");
                continue;
            }
        }
        if !(nodes_listed && pvs_listed) {
            continue;
        }
        let mut bad = Vec::new();
        let access = compute(&node, &pvs.state(), &nodes.state(), &mut bad);
        for pv in bad {
            tracing::warn!(%pv, "PV's published nodes annotation is unreadable: serving its volume to nobody");
        }
        apply(&access, &extra, &allow, &exports);
        synced.send_if_modified(|s| !std::mem::replace(s, true));
        latest.send_if_modified(|last| {
            let changed = last.as_ref() != Some(&access);
            if changed {
                tracing::info!(
                    nodes = access.nodes.len(),
                    volumes = access.volumes.0.len(),
                    "cluster access changed"
                );
                *last = Some(access);
            }
            changed
        });
    }
    drop(latest);
    let _ = saver.await;
}

/// Pause before trying a failed save again.
const SAVE_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

/// Saves the latest rules to `<root>/cluster-access.json` whenever they change, until
/// the sender is dropped. One save at a time, each of the latest rules: a burst of PV
/// events (hundreds of claims at once) becomes a few writes, not one fsync per event,
/// and the copy trails the rules in force by one write at most. A failed save is tried
/// again every [`SAVE_RETRY`] (it only matters at the next restart, which then waits
/// for the cluster).
async fn save(root: PathBuf, mut latest: watch::Receiver<Option<ClusterAccess>>) {
    let mut failed = false;
    loop {
        if !failed && latest.changed().await.is_err() {
            return;
        }
        let Some(bytes) = latest
            .borrow_and_update()
            .as_ref()
            .map(|a| serde_json::to_vec(a).unwrap_or_default())
        else {
            continue;
        };
        let path = snapshot_path(&root);
        let written =
            tokio::task::spawn_blocking(move || crate::volume::write_atomic(&path, &bytes, 0o600))
                .await;
        failed = !matches!(written, Ok(Ok(())));
        match written {
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot save the cluster access; retrying"),
            Err(e) => tracing::warn!(error = %e, "saving the cluster access failed; retrying"),
            Ok(Ok(())) => {}
        }
        if failed {
            tokio::time::sleep(SAVE_RETRY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, ips: &[&str]) -> Arc<Node> {
        let mut addresses: Vec<_> = ips
            .iter()
            .map(|ip| json!({"type": "InternalIP", "address": ip}))
            .collect();
        addresses.push(json!({"type": "ExternalIP", "address": "203.0.113.9"}));
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name},
                "status": {"addresses": addresses},
            }))
            .expect("node"),
        )
    }

    fn pv(name: &str, on: &str, volume: &str, published: Option<&str>) -> Arc<PersistentVolume> {
        let mut ann = json!({VOLUME_KEY: volume});
        if let Some(p) = published {
            ann[PUBLISHED_NODES] = json!(p);
        }
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {NODE_KEY: on}, "annotations": ann},
            }))
            .expect("pv"),
        )
    }

    fn nets(v: &[&str]) -> Vec<Network> {
        v.iter().map(|s| s.parse().expect("net")).collect()
    }

    fn vol(s: &str) -> VolumeName {
        VolumeName::new(s).expect("name")
    }

    #[test]
    fn published_node_names_become_their_internal_addresses() {
        let nodes = [
            node("n1", &["10.0.0.1", "10.1.0.1"]),
            node("n2", &["10.0.0.2"]),
        ];
        let pvs = [
            pv("p1", "me", "v1", Some(r#"["n1"]"#)),
            pv("p2", "me", "v2", Some("[]")),
            pv("p3", "me", "legacy", None),
            pv("p4", "me", "gone-node", Some(r#"["n9"]"#)),
            pv("p5", "me", "broken", Some("n1")),
            pv("p6", "elsewhere", "theirs", Some(r#"["n1"]"#)),
        ];
        let mut bad = Vec::new();
        let got = compute("me", &pvs, &nodes, &mut bad);
        assert_eq!(got.nodes, nets(&["10.0.0.1", "10.0.0.2", "10.1.0.1"]));
        let want: BTreeMap<VolumeName, Option<Vec<Network>>> = [
            (vol("v1"), Some(nets(&["10.0.0.1", "10.1.0.1"]))),
            (vol("v2"), Some(vec![])),
            (vol("legacy"), None),
            (vol("gone-node"), Some(vec![])),
            (vol("broken"), Some(vec![])),
        ]
        .into();
        assert_eq!(got.volumes.0, want);
        assert_eq!(bad, ["p5"]);
    }

    #[test]
    fn the_saved_access_reads_back_and_a_damaged_one_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load(dir.path()), None);
        let access = ClusterAccess {
            nodes: nets(&["10.0.0.1"]),
            volumes: ClusterGrants(
                [(vol("a"), Some(nets(&["10.0.0.1"]))), (vol("legacy"), None)].into(),
            ),
        };
        let bytes = serde_json::to_vec(&access).expect("json");
        crate::volume::write_atomic(&snapshot_path(dir.path()), &bytes, 0o600).expect("save");
        assert_eq!(load(dir.path()), Some(access));
        std::fs::write(snapshot_path(dir.path()), b"{\"nodes\": [").expect("damage");
        assert_eq!(load(dir.path()), None);
    }
}
