//! The node agents' heartbeat Leases: one per node (`localnfs-node-<node>` in the
//! heartbeat namespace, `--heartbeat-namespace`, which holds nothing else but the
//! usage Leases of `usage` and the key Leases below), renewed every 30 s
//! (`heartbeat::RENEW_EVERY`) with the node's free space, NFS and peer ports and usage
//! shard count, and nothing else: with 100 nodes the heartbeats are most of what etcd
//! writes at rest, so each carries only what changes or what liveness and placement
//! read. The agent's public key, which does not change while it runs, is in a Lease of
//! its own (`localnfs-key-<node>`, [`key_lease_name`]), written when the agent starts
//! and again if it is deleted while the agent runs (`heartbeat::write_key`,
//! `heartbeat::watch_key`); a heartbeat of an earlier agent may still carry it. The
//! agent writes its own Leases (`heartbeat::renew`); the controller, the scheduler
//! helper and `status` read them ([`AgentInfo::from_lease`], `heartbeat::watch`, which
//! joins each node's two Leases with [`Agents::see`]). This module is the vocabulary and
//! the rules (what a Lease says, when its agent counts as gone); the API calls live in
//! `crate::heartbeat`.
//!
//! Liveness is judged on the observer's own clock, never on the agent's: the renew
//! time in a Lease is written by the agent's clock, which may be minutes off. A
//! watcher (`heartbeat::watch`) records, on its own monotonic clock ([`observer_now`]), when it
//! last saw each Lease change (its resourceVersion or renew time, [`observe`]); the
//! agent counts as gone once no change was seen for the Lease's duration (and the
//! controller then waits `--agent-grace` more before acting on it). So a node whose
//! clock is off is neither dropped (renew time in the past) nor kept after it died
//! (renew time in the future). A Lease seen for the first time counts as just
//! renewed: a freshly started observer waits one duration before it calls an agent
//! gone, rather than trusting the agent's clock. A key Lease says nothing about
//! liveness: seeing it change never extends a heartbeat.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Instant;

use k8s_openapi::api::coordination::v1::Lease;

use super::keys::{
    AGENT_KEY, FREE_BYTES, KEY_LEASE_PREFIX, NFS_PORT, NODE_LEASE_PREFIX, PEER_PORT,
};
use super::signed::PublicKey;

/// The heartbeat namespace of a default install (`--heartbeat-namespace`).
pub const HEARTBEAT_NAMESPACE: &str = "localnfs-heartbeats";

/// Seconds a heartbeat stays valid after its renewal.
pub const LEASE_SECONDS: i32 = 30;

/// A node agent's last heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentInfo {
    pub free_bytes: u64,
    /// The agent's NFS port (kubelet mounts with `port=`/`mountport=` this).
    pub nfs_port: u16,
    /// The agent's peer port (cross-node clones, `node::peer`); `None` from an agent
    /// of a version before them.
    pub peer_port: Option<u16>,
    /// When the agent counts as gone, on the clock `from_lease` was given (for a
    /// `heartbeat::watch`, [`observer_now`]).
    pub expires: i64,
    /// The public half of the agent's signing key (see `signed`), from its key Lease
    /// (or, from an agent before key Leases, its heartbeat); `None` until one was seen,
    /// and from an agent of a version before signatures, whose answers then cannot be
    /// believed.
    pub key: Option<PublicKey>,
}

/// Wall-clock unix seconds now (certificates, and `status`, which sees each Lease
/// once and has no observation of its own to go by).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Seconds on this process's monotonic clock: what watched heartbeat expiries
/// ([`AgentInfo::expires`] from `heartbeat::watch`) are compared with. It never jumps when
/// anyone's wall clock is set.
pub fn observer_now() -> i64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    i64::try_from(start.elapsed().as_secs()).unwrap_or(i64::MAX)
}

/// What an observer last saw of one heartbeat Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The Lease's resourceVersion and renew time, as one string.
    version: String,
    /// When (observer's clock) the observer first saw this version.
    pub changed_at: i64,
}

/// The rule: a Lease whose `version` differs from what was `seen` before (or that
/// was never seen) changed at `now`; one that did not keeps its earlier time, however
/// often it is listed again.
pub fn observe(seen: Option<&Seen>, version: &str, now: i64) -> Seen {
    match seen {
        Some(s) if s.version == version => s.clone(),
        _ => Seen {
            version: version.to_owned(),
            changed_at: now,
        },
    }
}

/// A Lease's version for [`observe`]: any renewal changes it.
pub fn version(lease: &Lease) -> String {
    format!(
        "{}/{:?}",
        lease
            .metadata
            .resource_version
            .as_deref()
            .unwrap_or_default(),
        lease.spec.as_ref().and_then(|s| s.renew_time.as_ref())
    )
}

/// A Lease's renew time, unix seconds on the clock of the agent that wrote it.
pub fn renewed_at(lease: &Lease) -> Option<i64> {
    Some(lease.spec.as_ref()?.renew_time.as_ref()?.0.as_second())
}

/// The name of `node`'s heartbeat Lease.
pub fn lease_name(node: &str) -> String {
    format!("{NODE_LEASE_PREFIX}{node}")
}

/// The node a Lease is the heartbeat of, or `None` for other Leases.
pub fn lease_node(lease: &Lease) -> Option<&str> {
    lease
        .metadata
        .name
        .as_deref()?
        .strip_prefix(NODE_LEASE_PREFIX)
}

/// The name of `node`'s key Lease (its agent's public key).
pub fn key_lease_name(node: &str) -> String {
    format!("{KEY_LEASE_PREFIX}{node}")
}

/// The node a Lease is the key Lease of, or `None` for other Leases.
pub fn key_lease_node(lease: &Lease) -> Option<&str> {
    lease
        .metadata
        .name
        .as_deref()?
        .strip_prefix(KEY_LEASE_PREFIX)
}

/// The public key a Lease carries ([`AGENT_KEY`]), if any and well-formed.
fn lease_key(lease: &Lease) -> Option<PublicKey> {
    let ann = lease.metadata.annotations.as_ref()?;
    PublicKey::from_hex(ann.get(AGENT_KEY)?)
}

/// What a watcher knows of one node: its last heartbeat and its key Lease's key.
#[derive(Default)]
struct Known {
    seen: Option<Seen>,
    beat: Option<AgentInfo>,
    key: Option<PublicKey>,
}

/// A watcher's view of the agents, joining each node's heartbeat and key Lease.
#[derive(Default)]
pub struct Agents {
    nodes: HashMap<String, Known>,
}

impl Agents {
    /// Takes in `lease` (a heartbeat or key Lease; `None` for any other), seen at
    /// `now` on the observer's clock, and returns its node with what the node's entry
    /// is now (`None`: no usable heartbeat yet). The rules: a heartbeat counts from
    /// when it was seen to change ([`observe`]); the key is the key Lease's when there
    /// is one, else the heartbeat's own (agents before key Leases); a key Lease changes
    /// only the key, never when the agent expires.
    pub fn see(&mut self, lease: &Lease, now: i64) -> Option<(String, Option<AgentInfo>)> {
        if let Some(node) = key_lease_node(lease) {
            let known = self.nodes.entry(node.to_owned()).or_default();
            known.key = lease_key(lease);
            return Some((node.to_owned(), known.entry()));
        }
        let node = lease_node(lease)?;
        let known = self.nodes.entry(node.to_owned()).or_default();
        let seen = observe(known.seen.as_ref(), &version(lease), now);
        known.beat = AgentInfo::from_lease(lease, seen.changed_at).map(|(_, a)| a);
        known.seen = Some(seen);
        Some((node.to_owned(), known.entry()))
    }
}

impl Known {
    fn entry(&self) -> Option<AgentInfo> {
        let mut info = self.beat.clone()?;
        if self.key.is_some() {
            info.key.clone_from(&self.key);
        }
        Some(info)
    }
}

impl AgentInfo {
    /// A node agent's heartbeat Lease as `(node, info)`, or `None` for other Leases;
    /// the Lease was last renewed at `renewed` (so it expires a duration later, on
    /// the clock `renewed` is on).
    pub fn from_lease(lease: &Lease, renewed: i64) -> Option<(String, Self)> {
        let node = lease_node(lease)?.to_owned();
        let spec = lease.spec.as_ref()?;
        spec.renew_time.as_ref()?;
        let ttl = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS));
        let ann = lease.metadata.annotations.as_ref()?;
        let free_bytes = ann.get(FREE_BYTES)?.parse().ok()?;
        let nfs_port = ann
            .get(NFS_PORT)
            .and_then(|p| p.parse().ok())
            .unwrap_or(2049);
        Some((
            node,
            Self {
                free_bytes,
                nfs_port,
                peer_port: ann.get(PEER_PORT).and_then(|p| p.parse().ok()),
                expires: renewed + ttl,
                key: lease_key(lease),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lease(rv: &str, renew: &str) -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": "localnfs-node-n1", "resourceVersion": rv,
                "annotations": {FREE_BYTES: "1000"}},
            "spec": {"renewTime": renew, "leaseDurationSeconds": 30}}))
        .expect("lease")
    }

    #[test]
    fn heartbeats_name_their_node_and_expire_a_duration_after_their_renewal() {
        let l = lease("1", "2026-01-01T00:00:00.000000Z");
        let (node, info) = AgentInfo::from_lease(&l, 100).expect("agent lease");
        assert_eq!(
            (node.as_str(), info.free_bytes, info.nfs_port),
            ("n1", 1000, 2049)
        );
        assert_eq!(lease_name(&node), "localnfs-node-n1");
        assert_eq!(info.expires, 130);
        assert_eq!(renewed_at(&l), Some(1_767_225_600));
        let other: Lease =
            serde_json::from_value(json!({"metadata": {"name": "localnfs-controller"}}))
                .expect("lease");
        assert_eq!(AgentInfo::from_lease(&other, 100), None);
    }

    fn key_lease(node: &str, key: &str) -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": key_lease_name(node), "resourceVersion": "7",
                "annotations": {AGENT_KEY: key}}}))
        .expect("lease")
    }

    #[test]
    fn an_agent_is_trusted_with_the_key_from_its_key_lease_in_either_order() {
        let (k1, k2) = ("11".repeat(32), "22".repeat(32));
        let want = |k: &str| PublicKey::from_hex(k);
        // Key Lease first (a watcher's list has it before the heartbeat): no entry
        // until the heartbeat, which then carries the key.
        let mut agents = Agents::default();
        let (node, entry) = agents.see(&key_lease("n1", &k1), 10).expect("ours");
        assert_eq!((node.as_str(), entry), ("n1", None));
        let (_, entry) = agents
            .see(&lease("1", "2026-01-01T00:00:00Z"), 10)
            .expect("ours");
        let entry = entry.expect("heartbeat");
        assert_eq!((entry.key, entry.expires), (want(&k1), 40));
        // Heartbeat first: no key yet, then the key Lease fills it in without
        // extending the heartbeat (seen later, still expires at 30 + 30).
        let mut agents = Agents::default();
        let (_, entry) = agents
            .see(&lease("1", "2026-01-01T00:00:00Z"), 30)
            .expect("ours");
        assert_eq!(entry.expect("heartbeat").key, None);
        let (_, entry) = agents.see(&key_lease("n1", &k1), 50).expect("ours");
        let entry = entry.expect("heartbeat");
        assert_eq!((entry.key, entry.expires), (want(&k1), 60));
        // A renewal keeps the key; a new key replaces it.
        let (_, entry) = agents
            .see(&lease("2", "2026-01-01T00:00:30Z"), 55)
            .expect("ours");
        assert_eq!(entry.expect("heartbeat").key, want(&k1));
        let (_, entry) = agents.see(&key_lease("n1", &k2), 56).expect("ours");
        assert_eq!(entry.expect("heartbeat").key, want(&k2));
        // Other Leases are not ours.
        let other: Lease =
            serde_json::from_value(json!({"metadata": {"name": "localnfs-controller"}}))
                .expect("lease");
        assert!(agents.see(&other, 60).is_none());
    }

    #[test]
    fn an_agent_before_key_leases_is_trusted_with_its_heartbeats_key() {
        let k = "33".repeat(32);
        let mut l = lease("1", "2026-01-01T00:00:00Z");
        l.metadata
            .annotations
            .get_or_insert_default()
            .insert(AGENT_KEY.to_owned(), k.clone());
        let mut agents = Agents::default();
        let (_, entry) = agents.see(&l, 0).expect("ours");
        assert_eq!(entry.expect("heartbeat").key, PublicKey::from_hex(&k));
    }

    #[test]
    fn a_heartbeat_counts_from_when_the_observer_saw_it_change() {
        // (what was seen, the Lease now, observer's now) → when it changed.
        let first = observe(None, "1/a", 50);
        assert_eq!(first.changed_at, 50, "never seen: renewed now");
        let cases = [
            ("listed again unchanged", "1/a", 80, 50),
            ("renewed: new version", "2/b", 80, 80),
            ("rewritten, same renew time", "2/a", 80, 80),
        ];
        for (what, version, now, want) in cases {
            assert_eq!(
                observe(Some(&first), version, now).changed_at,
                want,
                "{what}"
            );
        }
    }

    #[test]
    fn a_node_clock_five_minutes_off_neither_drops_nor_keeps_its_agent() {
        // An agent whose clock is 5 minutes behind renews every 5 s: each renewal is
        // a change the observer sees, so it stays live however old its renew time.
        let mut seen: Option<Seen> = None;
        for (i, now) in [1000_i64, 1005, 1010, 1015].into_iter().enumerate() {
            let renew = format!("2026-01-01T00:{:02}:00.000000Z", i);
            let l = lease(&i.to_string(), &renew);
            let s = observe(seen.as_ref(), &version(&l), now);
            let (_, info) = AgentInfo::from_lease(&l, s.changed_at).expect("lease");
            assert!(info.expires >= now, "dropped at {now}");
            seen = Some(s);
        }
        // An agent whose clock is 5 minutes ahead, and which then dies: gone a
        // duration after its last change, not 5 minutes later.
        let l = lease("9", "2026-01-01T00:05:00.000000Z");
        let s = observe(None, &version(&l), 2000);
        for now in [2000_i64, 2010, 2031] {
            let s = observe(Some(&s), &version(&l), now);
            let (_, info) = AgentInfo::from_lease(&l, s.changed_at).expect("lease");
            assert_eq!(info.expires >= now, now <= 2030, "at {now}");
        }
    }
}
