//! Leader election on a `coordination.k8s.io/v1` Lease: one controller acts, the
//! others wait; if the leader stops renewing, another takes over once the lease has
//! been seen unchanged for its whole duration (10 s, renewed every 2 s, so a takeover
//! happens within ~12 s).
//!
//! Fencing (client-go's rules): expiry is measured on the candidate's own monotonic
//! clock from when it first saw the current lease record, never by comparing the
//! holder's `renewTime` with our clock; every round's lease calls share a deadline;
//! and the leader acts only until [`ACT_FOR`] after the *start* of its last
//! successful renewal ([`Fence`]), which is before anyone else may take over. A
//! leader that cannot renew in time exits (the Deployment restarts it) rather than
//! keep writing.
//!
//! The deadline comes from the lease, not a fixed timeout ([`round_budget`]): a
//! leader's round may take as long as its fence still holds, since only then must it
//! stop anyway, so an API server slow to answer (seconds, under load) delays renewals
//! without making the leader step down and a new term begin.
//!
//! The decision is a pure function of the Lease and how long it has been seen
//! unchanged ([`decide`]); updates use the Lease's resourceVersion, so two candidates
//! can never both win a round.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

use crate::error::{Error, Result};

/// How long a lease is valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(10);
/// How often the holder renews (and candidates retry).
pub const RENEW_EVERY: Duration = Duration::from_secs(2);
/// How long after starting its last successful renewal the leader may act: the lease
/// less a margin for clock rate differences and a write already on the wire.
pub const ACT_FOR: Duration = Duration::from_secs(7);

/// What to do with the lease this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nobody has created it yet.
    Create,
    /// We hold it: renew.
    Renew,
    /// Someone else held it but let it expire (or released it): take it.
    TakeOver,
    /// Someone else holds a live lease.
    Wait,
}

/// Decides from the current lease (if any), our identity and how long we have seen
/// this very lease record (its resourceVersion) unchanged, on our own clock.
pub fn decide(lease: Option<&LeaseSpec>, me: &str, unchanged_for: Duration) -> Decision {
    let Some(spec) = lease else {
        return Decision::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => Decision::Renew,
        None | Some("") => Decision::TakeOver,
        Some(_) => {
            let secs = u64::try_from(spec.lease_duration_seconds.unwrap_or(10)).unwrap_or(10);
            if unchanged_for >= Duration::from_secs(secs) {
                Decision::TakeOver
            } else {
                Decision::Wait
            }
        }
    }
}

/// Until when this process may act as leader, on its monotonic clock (which keeps
/// counting while the process is stopped, so a leader resumed after SIGSTOP sees at
/// once that its time is up).
#[derive(Debug)]
pub struct Fence {
    base: Instant,
    /// Milliseconds after `base`; 0: not leading.
    until_ms: AtomicU64,
}

impl Default for Fence {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            until_ms: AtomicU64::new(0),
        }
    }
}

impl Fence {
    /// A renewal that started at `round_started` succeeded.
    pub fn renewed(&self, round_started: Instant) {
        let until = round_started.saturating_duration_since(self.base) + ACT_FOR;
        let ms = u64::try_from(until.as_millis()).unwrap_or(u64::MAX);
        self.until_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// Whether we may still act at `now`.
    pub fn holds_at(&self, now: Instant) -> bool {
        let ms =
            u64::try_from(now.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX);
        ms < self.until_ms.load(Ordering::Acquire)
    }

    /// How long from `now` we may still act (zero when not leading).
    pub fn remaining_at(&self, now: Instant) -> Duration {
        let now_ms = now.saturating_duration_since(self.base).as_millis();
        let until = u128::from(self.until_ms.load(Ordering::Acquire));
        Duration::from_millis(u64::try_from(until.saturating_sub(now_ms)).unwrap_or(u64::MAX))
    }

    /// Checked before every write the controller makes: an error once our time is up.
    pub fn check(&self) -> Result<()> {
        if self.holds_at(Instant::now()) {
            Ok(())
        } else {
            Err(Error::Timeout {
                what: "leader lease renewal (not writing as leader)".into(),
                after: ACT_FOR,
            })
        }
    }
}

/// How long one election round (read and write of the lease) may take, starting at
/// `now`: for a leader, until its fence closes (a renewal that lands later is of no
/// use: it has stopped acting by then); for a candidate, [`ACT_FOR`], well under the
/// lease so it looks again before a leader's lease could have run out twice.
pub fn round_budget(leading: bool, fence: &Fence, now: Instant) -> Duration {
    if leading {
        fence.remaining_at(now)
    } else {
        ACT_FOR
    }
}

/// Campaigns for one named lease.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    /// The lease record (resourceVersion) last seen and when we first saw it.
    observed: Mutex<Option<(String, Instant)>>,
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str) -> Self {
        Self {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            observed: Mutex::new(None),
        }
    }

    /// How long the record with `version` has been seen unchanged (zero when new).
    fn unchanged_for(&self, version: &str, now: Instant) -> Duration {
        let mut seen = self
            .observed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match seen.as_ref() {
            Some((v, since)) if v == version => now.saturating_duration_since(*since),
            _ => {
                *seen = Some((version.to_owned(), now));
                Duration::ZERO
            }
        }
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One round, given `budget` for all of it ([`round_budget`]): returns whether we
    /// hold the lease afterwards. Losing a race (409) is "not leader", not an error.
    pub async fn try_lead(&self, budget: Duration) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + budget;
        let timed_out = |what: &str| Error::Timeout {
            what: format!("{what} lease {}", self.name),
            after: budget,
        };
        let current = tokio::time::timeout_at(deadline, self.api.get_opt(&self.name))
            .await
            .map_err(|_| timed_out("read"))?
            .map_err(Error::kube(format!("read lease {}", self.name)))?;
        let version = current
            .as_ref()
            .and_then(|l| l.metadata.resource_version.clone())
            .unwrap_or_default();
        let decision = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            self.unchanged_for(&version, Instant::now()),
        );
        let now = Timestamp::now();
        let write = async {
            match (decision, current) {
                (Decision::Wait, _) => Ok(None),
                (Decision::Create, _) => {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(self.name.clone()),
                            ..ObjectMeta::default()
                        },
                        spec: Some(self.spec(now, None, 0)),
                    };
                    self.api
                        .create(&PostParams::default(), &lease)
                        .await
                        .map(Some)
                }
                (_, None) => Ok(None),
                (d, Some(mut lease)) => {
                    let old = lease.spec.take().unwrap_or_default();
                    let transitions = old.lease_transitions.unwrap_or(0);
                    lease.spec = Some(if d == Decision::Renew {
                        self.spec(now, old.acquire_time, transitions)
                    } else {
                        self.spec(now, None, transitions + 1)
                    });
                    // resourceVersion is kept: a concurrent writer makes this fail with 409.
                    self.api
                        .replace(&self.name, &PostParams::default(), &lease)
                        .await
                        .map(Some)
                }
            }
        };
        let result = tokio::time::timeout_at(deadline, write)
            .await
            .map_err(|_| timed_out("write"))?;
        match result {
            Ok(written) => Ok(written.is_some()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(Error::kube(format!("write lease {}", self.name))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(String::from),
            lease_duration_seconds: Some(10),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions_follow_holder_and_how_long_the_lease_was_seen_unchanged() {
        let s = Duration::from_secs;
        let cases = [
            (None, s(0), Decision::Create),
            (Some(lease(Some("me"))), s(0), Decision::Renew),
            (Some(lease(Some("me"))), s(60), Decision::Renew),
            (Some(lease(Some("other"))), s(3), Decision::Wait),
            // Whatever its renewTime says (another machine's clock), a lease is taken
            // over only once we have seen it unchanged for its duration.
            (Some(lease(Some("other"))), s(9), Decision::Wait),
            (Some(lease(Some("other"))), s(10), Decision::TakeOver),
            (Some(lease(None)), s(0), Decision::TakeOver),
        ];
        for (spec, seen, want) in cases {
            assert_eq!(decide(spec.as_ref(), "me", seen), want, "{spec:?} {seen:?}");
        }
    }

    #[test]
    fn the_fence_closes_before_another_replica_may_take_over() {
        let fence = Fence::default();
        let t0 = Instant::now();
        assert!(!fence.holds_at(t0), "not leading yet");
        fence.renewed(t0);
        assert!(fence.holds_at(t0 + ACT_FOR - Duration::from_millis(10)));
        assert!(!fence.holds_at(t0 + ACT_FOR));
        assert!(ACT_FOR + RENEW_EVERY < LEASE_DURATION);
        fence.renewed(t0 + Duration::from_secs(2));
        assert!(fence.holds_at(t0 + ACT_FOR));
        fence.renewed(t0);
        assert!(
            fence.holds_at(t0 + ACT_FOR),
            "an older renewal never shortens it"
        );
    }

    #[test]
    fn a_leader_waits_for_a_slow_api_server_as_long_as_its_fence_holds() {
        let fence = Fence::default();
        let t0 = Instant::now();
        assert_eq!(round_budget(false, &fence, t0), ACT_FOR, "candidate");
        fence.renewed(t0);
        // The next round starts RENEW_EVERY later: it may take the rest of the fence,
        // 5 s, not a fixed 2 s after which a live leader would step down.
        let next = t0 + RENEW_EVERY;
        assert_eq!(round_budget(true, &fence, next), ACT_FOR - RENEW_EVERY);
        assert!(round_budget(true, &fence, next) > Duration::from_secs(2));
        assert_eq!(round_budget(true, &fence, t0 + ACT_FOR), Duration::ZERO);
    }
}
