//! What the provisioning benchmarks share (`provision`, `scale`): creating a burst of
//! claims, checking the end state, and reading a process's CPU time and memory.

#![allow(dead_code, reason = "each bench uses a different subset")]

use std::collections::HashMap;
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::support::cluster::{Localnfs, nfs_target, volume_dirs};

/// utime + stime of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Peak resident set size (VmHWM) in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// Resident set size now (VmRSS) in MiB.
pub fn rss_mib_now(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

pub fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// PVs, volume directories on all nodes, and whether each claim has exactly one PV
/// (by claimRef uid), each PV a directory on its node, and no directory is left over.
pub async fn end_state(client: &Client, lnfs: &Localnfs, nodes: u8) -> (usize, usize, bool) {
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .list(&Default::default())
        .await
        .expect("claims")
        .items;
    let pvs = Api::<PersistentVolume>::all(client.clone())
        .list(&Default::default())
        .await
        .expect("PVs")
        .items;
    let mut per_claim: HashMap<String, usize> = HashMap::new();
    for pv in &pvs {
        let uid = pv
            .spec
            .as_ref()
            .and_then(|s| s.claim_ref.as_ref())
            .and_then(|r| r.uid.clone())
            .unwrap_or_default();
        *per_claim.entry(uid).or_default() += 1;
    }
    let dirs: Vec<(String, String)> = (1..=nodes)
        .flat_map(|i| {
            let node = format!("node-{i}");
            volume_dirs(lnfs, &node)
                .into_iter()
                .map(move |d| (node.clone(), d))
        })
        .collect();
    let each_pv_has_its_dir = pvs.iter().all(|pv| {
        let node = pv
            .labels()
            .get("localnfs.io/node")
            .cloned()
            .unwrap_or_default();
        let dir = nfs_target(pv).2;
        dirs.iter().any(|(n, d)| *n == node && *d == dir)
    });
    let one_each = claims
        .iter()
        .all(|c| per_claim.get(&c.uid().unwrap_or_default()) == Some(&1))
        && pvs.len() == claims.len()
        && dirs.len() == pvs.len()
        && each_pv_has_its_dir;
    (pvs.len(), dirs.len(), one_each)
}

/// Creates the claims (and, under WaitForFirstConsumer, one pod per claim) with
/// `in_flight` requests in flight; returns when each claim was created.
pub async fn create_all(
    client: Client,
    count: usize,
    wffc: bool,
    in_flight: usize,
) -> HashMap<String, Instant> {
    let names: Vec<String> = (0..count).map(|i| format!("claim-{i:05}")).collect();
    let results = futures::stream::iter(names.into_iter().map(|name| {
        let client = client.clone();
        async move {
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
            let claim: PersistentVolumeClaim = serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "bench",
                         "resources": {"requests": {"storage": "4Mi"}}},
            }))
            .expect("claim");
            let t = Instant::now();
            claims.create(&PostParams::default(), &claim).await.expect("create claim");
            if wffc {
                let pods: Api<Pod> = Api::namespaced(client, "default");
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("pod-{name}")},
                    "spec": {"containers": [{"name": "c", "image": "db"}],
                             "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": name}}]},
                }))
                .expect("pod");
                pods.create(&PostParams::default(), &pod).await.expect("create pod");
            }
            (name, t)
        }
    }))
    .buffer_unordered(in_flight)
    .collect::<Vec<_>>()
    .await;
    results.into_iter().collect()
}
