//! What every controller reconcile shares: the client, caches and metrics, the
//! placement reservations and the leader fence; and the reads of that shared state
//! (node rooms, agent liveness, signature checks) that claims, expansion, volumes
//! and pods all use. Its own module so the reconcilers depend on it and not on each
//! other.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use std::sync::PoisonError;

use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Client;
use kube::runtime::reflector::Store;

use super::leader::Fence;
use super::metrics::ControllerMetrics;
use super::pv::{self, NodeRoom};
use super::queue::Next;
use super::reserve::Reservations;
use crate::error::Error;
use crate::objects::agents::{AgentInfo, observer_now};
use crate::objects::signed::{self, Signer};

/// Shared by every reconcile.
pub struct Ctx {
    pub client: Client,
    pub provisioner: String,
    /// Namespace of the node agents' Leases.
    pub namespace: String,
    pub events: crate::events::Events,
    pub metrics: ControllerMetrics,
    /// The node agents as their Leases say (only `agents` is filled).
    pub agents: crate::kubeclient::Shared<HashMap<String, AgentInfo>>,
    /// StorageClasses, watched (a handful of small objects).
    pub classes: Store<StorageClass>,
    /// How long past its lease a silent node agent is waited for (`--agent-grace`).
    pub agent_grace: Duration,
    /// How long a VolumeBackup waits for an agent before its claim is looked at
    /// (`--backup-grace`, `super::backups`).
    pub backup_grace: Duration,
    /// Space held on each node for placements in progress.
    pub reservations: std::sync::Mutex<Reservations>,
    /// Whether we may still write as leader; checked before every write.
    pub fence: Fence,
    /// The controller's signing key: what it asks of agents carries its signature.
    pub signer: Signer,
    /// Node → its InternalIP and when it was read ([`Self::node_ip`]).
    pub node_ips: std::sync::Mutex<HashMap<String, (String, Instant)>>,
}

/// How long a node's address read for one PV serves the next ones: a burst of claims
/// on one node reads the Node once, not once per PV, and a node whose address changed
/// gets new PVs with the new one within this long (PVs already made keep theirs
/// whatever we do).
const NODE_IP_TTL: Duration = Duration::from_secs(30);

impl Ctx {
    /// The space held for placements in progress (never held across an await).
    pub(super) fn reservations(&self) -> std::sync::MutexGuard<'_, Reservations> {
        self.reservations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Picks a node as [`pv::choose_node`] does from free space less what placements in
    /// progress hold, and holds the claim's bytes there, in one step: concurrent
    /// workers never both count the same free bytes.
    pub(super) fn choose_and_hold(
        &self,
        uid: &str,
        selected: Option<&str>,
        rooms: &[NodeRoom],
        size: u64,
        allowed: Option<&BTreeSet<String>>,
    ) -> std::result::Result<String, String> {
        let now = Instant::now();
        let mut held = self.reservations();
        held.expire(now);
        let node = pv::choose_node(selected, &held.discount(rooms), size, allowed)?;
        held.hold(uid, &node, size, now);
        Ok(node)
    }

    /// Why we stop waiting for `node`'s agent, when it has been silent past its lease
    /// and the grace ([`pv::agent_given_up`]); `None` while it may still answer.
    pub(super) fn agent_gone(&self, node: &str) -> Option<String> {
        let now = observer_now();
        let expires =
            crate::kubeclient::read(&self.agents, |agents| agents.get(node).map(|a| a.expires));
        let grace = i64::try_from(self.agent_grace.as_secs()).unwrap_or(i64::MAX);
        if !pv::agent_given_up(expires, now, grace) {
            return None;
        }
        Some(match expires {
            Some(e) => format!(
                "has not renewed its heartbeat lease, which ran out {} s ago",
                now - e
            ),
            None => "has no heartbeat lease".to_owned(),
        })
    }

    /// What the claim's signed keys say (see `objects::signed`): the request checked
    /// against our key, answers against the key the request's node's agent publishes.
    pub(super) fn verify(&self, pvc: &PersistentVolumeClaim) -> signed::Verified {
        let controller = self.signer.public();
        signed::verify(pvc, &controller, |node| {
            crate::kubeclient::read(&self.agents, |agents| {
                agents.get(node).and_then(|a| a.key.clone())
            })
        })
    }

    /// Live node agents, their free space and NFS port, from the heartbeat Leases
    /// (watched, not listed per claim: the Leases also carry per-volume usage).
    pub(super) fn node_rooms(&self) -> Vec<(NodeRoom, u16)> {
        let now = observer_now();
        crate::kubeclient::read(&self.agents, |agents| {
            agents
                .iter()
                // An agent without a key (an earlier version) could not answer in a way
                // we believe: nothing is placed on it.
                .filter(|(_, a)| a.expires >= now && a.key.is_some())
                .map(|(node, a)| {
                    let room = NodeRoom {
                        node: node.clone(),
                        free_bytes: a.free_bytes,
                    };
                    (room, a.nfs_port)
                })
                .collect()
        })
    }

    /// `node`'s InternalIP (`None`: it has none), read from the API server at most
    /// once per [`NODE_IP_TTL`].
    pub(super) async fn node_ip(&self, node: &str) -> crate::error::Result<Option<String>> {
        let now = Instant::now();
        let cached = {
            let ips = self.node_ips.lock().unwrap_or_else(PoisonError::into_inner);
            ips.get(node)
                .filter(|(_, at)| now.duration_since(*at) < NODE_IP_TTL)
                .map(|(ip, _)| ip.clone())
        };
        if cached.is_some() {
            return Ok(cached);
        }
        let node_obj = kube::Api::<Node>::all(self.client.clone())
            .get(node)
            .await
            .map_err(Error::kube(format!("read node {node}")))?;
        let Some(ip) = crate::kubeclient::internal_ips(&node_obj).next() else {
            return Ok(None);
        };
        let mut ips = self.node_ips.lock().unwrap_or_else(PoisonError::into_inner);
        ips.insert(node.to_owned(), (ip.to_owned(), now));
        Ok(Some(ip.to_owned()))
    }

    /// When to retry after a failed reconcile.
    pub fn after_error(&self, err: &Error) -> Next {
        self.metrics.reconcile_errors.inc();
        Next::After(crate::kubeclient::retry_after(err))
    }
}
