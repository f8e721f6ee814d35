//! The node agents' heartbeat Leases: one per node (`localnfs-node-<node>` in the
//! heartbeat namespace, `--heartbeat-namespace`, which holds nothing else but the
//! usage Leases of `usage`), renewed every 20 s (`heartbeat::RENEW_EVERY`) with the
//! node's free space, NFS and peer ports and usage shard count. The
//! agent writes its own (`heartbeat::renew`); the controller, the scheduler helper and
//! `status` read them ([`AgentInfo::from_lease`], `heartbeat::watch`). This module is
//! the vocabulary and the rules (what a Lease says, when its agent counts as gone);
//! the API calls live in `crate::heartbeat`.
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
//! gone, rather than trusting the agent's clock.

use std::sync::OnceLock;
use std::time::Instant;

use k8s_openapi::api::coordination::v1::Lease;

use super::keys::{AGENT_KEY, FREE_BYTES, NFS_PORT, NODE_LEASE_PREFIX, PEER_PORT};
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
    /// The public half of the agent's signing key (see `signed`); `None` from an agent
    /// of a version before signatures, whose answers then cannot be believed.
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
                key: ann.get(AGENT_KEY).and_then(|k| PublicKey::from_hex(k)),
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
