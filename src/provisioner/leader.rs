//! Leader election on a `coordination.k8s.io/v1` Lease: one controller acts, the
//! others wait; if the leader stops renewing, another takes over once the lease has
//! expired (duration 10 s, renewed every 2 s, so a takeover happens within ~12 s).
//!
//! The decision is a pure function of the Lease and the clock ([`decide`]); updates
//! use the Lease's resourceVersion, so two candidates can never both win a round.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};

use crate::error::{Error, Result};

/// How long a lease is valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(10);
/// How often the holder renews (and candidates retry).
pub const RENEW_EVERY: Duration = Duration::from_secs(2);

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

/// Decides from the current lease (if any), our identity and the time.
pub fn decide(lease: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease else {
        return Decision::Create;
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => Decision::Renew,
        None | Some("") => Decision::TakeOver,
        Some(_) => {
            let duration = i64::from(spec.lease_duration_seconds.unwrap_or(10));
            let renewed = spec.renew_time.as_ref().map(|t| t.0);
            match renewed {
                Some(t) if t + SignedDuration::from_secs(duration) > now => Decision::Wait,
                _ => Decision::TakeOver,
            }
        }
    }
}

/// Campaigns for one named lease.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str) -> Self {
        Self {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
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

    /// One round: returns whether we hold the lease afterwards. Losing a race (409)
    /// is "not leader", not an error.
    pub async fn try_lead(&self) -> Result<bool> {
        let now = Timestamp::now();
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(Error::kube(format!("read lease {}", self.name)))?;
        let decision = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            now,
        );
        let result = match (decision, current) {
            (Decision::Wait, _) => return Ok(false),
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(now, None, 0)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (_, None) => return Ok(false),
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
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(Error::kube(format!("write lease {}", self.name))(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed_secs_ago: Option<i64>, now: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(String::from),
            lease_duration_seconds: Some(10),
            renew_time: renewed_secs_ago.map(|s| MicroTime(now - SignedDuration::from_secs(s))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions_follow_holder_and_expiry() {
        let now = Timestamp::now();
        let cases = [
            (None, Decision::Create),
            (Some(lease(Some("me"), Some(1), now)), Decision::Renew),
            (Some(lease(Some("me"), Some(60), now)), Decision::Renew),
            (Some(lease(Some("other"), Some(3), now)), Decision::Wait),
            (
                Some(lease(Some("other"), Some(11), now)),
                Decision::TakeOver,
            ),
            (Some(lease(Some("other"), None, now)), Decision::TakeOver),
            (Some(lease(None, Some(1), now)), Decision::TakeOver),
        ];
        for (spec, want) in cases {
            assert_eq!(decide(spec.as_ref(), "me", now), want, "{spec:?}");
        }
    }
}
