//! Heartbeat Lease I/O: the agent writes its key Lease when it starts ([`write_key`])
//! and again whenever it is found deleted ([`watch_key`]), renews its own heartbeat Lease ([`renew`]) and writes its usage shards when they
//! changed ([`write_usage`]); the controller and the scheduler helper keep a live map
//! of every agent's heartbeat joined with its key ([`watch`], which leaves the usage
//! Leases out). What a Lease
//! says and when its agent counts as gone are decided in `objects::agents`, which
//! does no I/O; this module only reads and writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::watch as signal;
use tokio_util::sync::CancellationToken;

use crate::kubeclient::{Mirror, Shared, mirror_with};
use crate::objects::agents::{
    AgentInfo, Agents, key_lease_name, key_lease_node, lease_name, lease_node, observer_now,
};
use crate::objects::keys::{
    AGENT_KEY, FREE_BYTES, NFS_PORT, NODE_KEY, PEER_PORT, USED_BYTES, USED_INODES,
};
use crate::objects::usage::{self, Report, USAGE, USAGE_LABEL, USAGE_SHARDS};
use futures::StreamExt;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;

/// How often an agent renews its heartbeat Lease when nothing changed. With 100 nodes
/// this is most of what etcd writes at rest (each renewal rewrites the whole Lease,
/// and etcd's log holds about three times its stored bytes): at 100 nodes every 10 s
/// made 22 KB/s, every 20 s 14.7 KB/s, every 30 s without the key (in its own Lease
/// now) see bench/README.md, the scale section.
pub const RENEW_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// How long a heartbeat is valid, written into each Lease (readers take it from
/// there): three renewals, so one late or failed write never makes an agent look
/// gone, as with the earlier 10 s renewals and 30 s leases.
pub const HEARTBEAT_LEASE_SECONDS: i32 = 90;

/// What an agent reports in a heartbeat.
pub struct Heartbeat<'a> {
    pub node: &'a str,
    pub free_bytes: u64,
    pub nfs_port: u16,
    /// The agent's peer port (`node::peer`).
    pub peer_port: u16,
    /// How many usage shards the node has (see `objects::usage`).
    pub usage_shards: u32,
    /// The agent's key (hex) while its key Lease is not written yet (a write guard
    /// from before key Leases refuses that write during an upgrade): readers then
    /// still find the key here. `None` once the key Lease holds it (and removes it).
    pub key_until_written: Option<&'a str>,
}

/// Writes `node`'s key Lease with `key` (the public half of the agent's signing key,
/// hex), creating it the first time. Written when the agent starts and when
/// [`watch_key`] finds it gone: rewriting an unchanged key changes nothing the API
/// server stores.
pub async fn write_key(leases: &Api<Lease>, node: &str, key: &str) -> Result<(), kube::Error> {
    let name = key_lease_name(node);
    let body = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        // The node label is what the write guard holds the agent to, as on heartbeats.
        "metadata": {"name": name, "labels": {NODE_KEY: node}, "annotations": {AGENT_KEY: key}},
        "spec": {"holderIdentity": node},
    });
    patch_or_create(leases, &name, body).await
}

/// Calls `gone` whenever `node`'s key Lease is found missing (deleted while watched,
/// or absent from a list), until `shutdown`; the agent then writes it again
/// ([`write_key`]). Readers check the agent's signatures with that key, so without this
/// a deleted key Lease would leave its answers unbelieved until the agent restarted.
/// One watch of one object (by name; the agents' Role grants `list`/`watch` on Leases
/// in the heartbeat namespace for it): no request while the Lease stays.
pub async fn watch_key(
    leases: Api<Lease>,
    node: &str,
    gone: &tokio::sync::Notify,
    shutdown: &CancellationToken,
) {
    let only =
        watcher::Config::default().fields(&format!("metadata.name={}", key_lease_name(node)));
    let mut events = watcher::watcher(leases, only).default_backoff().boxed();
    // Whether the Lease is there, as far as this watch knows.
    let mut present = false;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.next() => e,
        };
        match event {
            None => return,
            // The watcher backs off and lists again by itself.
            Some(Err(e)) => tracing::debug!(error = %e, "key Lease watch"),
            Some(Ok(watcher::Event::Apply(_) | watcher::Event::InitApply(_))) => present = true,
            Some(Ok(watcher::Event::Init)) => present = false,
            Some(Ok(watcher::Event::Delete(_))) => {
                present = false;
                gone.notify_one();
            }
            Some(Ok(watcher::Event::InitDone)) if !present => gone.notify_one(),
            Some(Ok(watcher::Event::InitDone)) => {}
        }
    }
}

/// Renews `hb.node`'s heartbeat Lease in `leases`' namespace, creating it the first
/// time. Its size does not depend on the node's volumes, and it carries nothing that
/// does not change or that liveness and placement do not read (the key is in the key
/// Lease, [`write_key`]).
pub async fn renew(leases: &Api<Lease>, hb: &Heartbeat<'_>) -> Result<(), kube::Error> {
    let name = lease_name(hb.node);
    // `null` removes the per-volume annotations an agent before usage shards wrote
    // here, and the key an agent before key Leases did (kept only while this agent's
    // key Lease is not written yet).
    let annotations: BTreeMap<&str, Option<String>> = [
        (FREE_BYTES, Some(hb.free_bytes.to_string())),
        (NFS_PORT, Some(hb.nfs_port.to_string())),
        (PEER_PORT, Some(hb.peer_port.to_string())),
        (USAGE_SHARDS, Some(hb.usage_shards.to_string())),
        (USED_BYTES, None),
        (USED_INODES, None),
        (AGENT_KEY, hb.key_until_written.map(str::to_owned)),
    ]
    .into();
    let body = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        // The node label names the node the write guard holds this Lease to (only
        // this node's agent may write it).
        "metadata": {"name": name, "labels": {NODE_KEY: hb.node}, "annotations": annotations},
        "spec": {
            "holderIdentity": hb.node,
            "leaseDurationSeconds": HEARTBEAT_LEASE_SECONDS,
            "renewTime": MicroTime(Timestamp::now()),
        },
    });
    patch_or_create(leases, &name, body).await
}

/// Writes `node`'s usage Lease for `shard` with `volumes` (all of that shard's).
pub async fn write_usage(
    leases: &Api<Lease>,
    node: &str,
    shard: u32,
    volumes: &BTreeMap<String, Report>,
) -> Result<(), kube::Error> {
    let name = usage::lease_name(node, shard);
    let report = serde_json::to_string(volumes).map_err(kube::Error::SerdeError)?;
    let body = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        // The node label is what the write guard holds the agent to, as on heartbeats.
        "metadata": {"name": name,
            "labels": {NODE_KEY: node, USAGE_LABEL: shard.to_string()},
            "annotations": {USAGE: report}},
        "spec": {"holderIdentity": node},
    });
    patch_or_create(leases, &name, body).await
}

/// A merge patch of Lease `name` with `body`, or its creation (without the `null`s
/// that remove annotations) when it does not exist yet.
async fn patch_or_create(
    leases: &Api<Lease>,
    name: &str,
    body: serde_json::Value,
) -> Result<(), kube::Error> {
    match leases
        .patch(name, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let mut body = body;
            if let Some(a) = body["metadata"]["annotations"].as_object_mut() {
                a.retain(|_, v| !v.is_null()); // a new object has nothing to remove
            }
            let lease: Lease = serde_json::from_value(body).map_err(kube::Error::SerdeError)?;
            leases
                .create(&PostParams::default(), &lease)
                .await
                .map(drop)
        }
        other => other.map(drop),
    }
}

/// Keeps the map that `map` picks out of `into` equal to the heartbeats in
/// `namespace` (node → last heartbeat with the key from the node's key Lease,
/// expiring on [`observer_now`]'s clock a duration after the heartbeat was last seen
/// to change); the receiver turns true once listed. One watch sees both kinds of
/// Lease, in order, so a key is never lost to a heartbeat read at the same time.
pub fn watch<T: Send + Sync + 'static>(
    client: &Client,
    namespace: &str,
    into: &Shared<T>,
    map: fn(&mut T) -> &mut HashMap<String, AgentInfo>,
    shutdown: &CancellationToken,
) -> signal::Receiver<bool> {
    // One entry per node that ever heartbeated: a few hundred bytes each.
    let agents: Mutex<Agents> = Mutex::default();
    // Usage Leases change on their own schedule and say nothing about liveness.
    let heartbeats_only = watcher::Config::default().labels(&format!("!{USAGE_LABEL}"));
    mirror_with(
        Api::<Lease>::namespaced(client.clone(), namespace),
        heartbeats_only,
        Mirror {
            what: "Lease",
            map,
            key: |l| {
                lease_node(l)
                    .or_else(|| key_lease_node(l))
                    .map(str::to_owned)
            },
            value: Box::new(move |l| {
                // A poisoned lock's map is still each node's last observation.
                let mut agents = agents.lock().unwrap_or_else(|p| p.into_inner());
                agents.see(l, observer_now())?.1
            }),
        },
        into,
        shutdown,
    )
}
