//! A volume's ceilings (`readIOPS`, `writeIOPS`, `readBandwidth`, `writeBandwidth`) as
//! token buckets, pure: time comes in as seconds from any fixed origin.
//!
//! Rules (each has its test below):
//! 1. A call never fails for being over a ceiling; it is told how long to wait.
//! 2. Each bucket is kept as the time it will next be empty (the generic cell rate
//!    algorithm): a call reserves its cost at once, so calls over the ceiling queue
//!    behind each other in arrival order and the long-run rate is the ceiling.
//! 3. An idle bucket refills to a small burst ([`BURST`] of its rate, and at least one
//!    call for a call ceiling) and no further: idling saves no credit for later.
//! 4. A call under both a call and a byte ceiling waits for the later of the two.

use crate::volume::VolumeSpec;

/// How much an idle bucket holds, as time at its rate: small, so a measured rate over
/// a few seconds stays within a few percent of the ceiling.
pub const BURST: f64 = 0.05;

/// One ceiling: `rate` units a second.
#[derive(Clone, Debug)]
pub struct Bucket {
    rate: f64,
    /// Seconds of credit a full bucket holds.
    burst: f64,
    /// When the bucket is next empty, counting every reservation made.
    empty_at: f64,
}

impl Bucket {
    /// A ceiling of `rate` (≥ 1) units a second; `whole` when each unit is a call (the
    /// burst then always admits one call at once).
    pub fn new(rate: u64, whole: bool) -> Self {
        let rate = rate.max(1) as f64;
        let burst = if whole { BURST.max(1.0 / rate) } else { BURST };
        Self {
            rate,
            burst,
            empty_at: f64::NEG_INFINITY,
        }
    }

    /// Reserves `cost` units at `now`; returns the seconds the call must wait.
    pub fn take(&mut self, now: f64, cost: f64) -> f64 {
        // Rule 3: an idle bucket holds `burst` and no more.
        self.empty_at = self.empty_at.max(now) + cost / self.rate;
        let wait = self.empty_at - now - self.burst;
        // Below a microsecond is rounding, not a wait.
        if wait < 1e-6 { 0.0 } else { wait }
    }
}

/// A volume's ceilings in one direction.
#[derive(Clone, Debug, Default)]
pub struct Ceilings {
    calls: Option<Bucket>,
    bytes: Option<Bucket>,
}

impl Ceilings {
    pub fn new(calls: Option<u64>, bytes: Option<u64>) -> Self {
        Self {
            calls: calls.map(|r| Bucket::new(r, true)),
            bytes: bytes.map(|r| Bucket::new(r, false)),
        }
    }

    /// Whether any ceiling is set (else calls skip the buckets altogether).
    pub fn any(&self) -> bool {
        self.calls.is_some() || self.bytes.is_some()
    }

    /// Reserves one call of `bytes` at `now`; returns the seconds it must wait.
    pub fn admit(&mut self, now: f64, bytes: u64) -> f64 {
        let calls = self.calls.as_mut().map_or(0.0, |b| b.take(now, 1.0));
        let data = self
            .bytes
            .as_mut()
            .map_or(0.0, |b| b.take(now, bytes as f64));
        calls.max(data)
    }
}

/// Read and write ceilings of one volume.
#[derive(Clone, Debug, Default)]
pub struct Throttle {
    pub read: Ceilings,
    pub write: Ceilings,
}

impl Throttle {
    pub fn of(spec: &VolumeSpec) -> Self {
        Self {
            read: Ceilings::new(spec.read_iops, spec.read_bandwidth),
            write: Ceilings::new(spec.write_iops, spec.write_bandwidth),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_bucket_admits_a_small_burst_then_waits() {
        let mut b = Bucket::new(100, true);
        // 5 calls (50 ms at 100/s) at once, then the 6th waits 10 ms.
        for _ in 0..5 {
            assert_eq!(b.take(10.0, 1.0), 0.0);
        }
        let wait = b.take(10.0, 1.0);
        assert!((wait - 0.01).abs() < 1e-9, "{wait}");
    }

    #[test]
    fn calls_over_the_ceiling_queue_in_order_and_hold_the_rate() {
        let mut b = Bucket::new(1 << 20, false);
        let waits: Vec<f64> = (0..40).map(|_| b.take(0.0, 262144.0)).collect();
        assert!(waits.windows(2).all(|w| w[1] > w[0] - 1e-12));
        // 10 MiB at 1 MiB/s: the last one leaves at 10 s less the burst.
        assert!((waits[39] - (10.0 - BURST)).abs() < 1e-9, "{}", waits[39]);
    }

    #[test]
    fn idling_saves_no_credit() {
        let mut b = Bucket::new(10, true);
        assert_eq!(b.take(0.0, 1.0), 0.0);
        // A minute idle: still only one call's burst at once.
        assert_eq!(b.take(60.0, 1.0), 0.0);
        assert!(b.take(60.0, 1.0) > 0.09);
    }

    #[test]
    fn a_call_under_two_ceilings_waits_for_the_later() {
        let mut c = Ceilings::new(Some(1000), Some(4096));
        let wait = c.admit(0.0, 8192);
        // The bytes ceiling binds: 2 s of data less the burst.
        assert!((wait - (2.0 - BURST)).abs() < 1e-9, "{wait}");
        let mut c = Ceilings::new(Some(1), Some(1 << 30));
        assert_eq!(c.admit(0.0, 10), 0.0);
        assert!((c.admit(0.0, 10) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_volume_without_ceilings_never_waits() {
        let mut c = Ceilings::default();
        assert!(!c.any());
        assert_eq!(c.admit(0.0, u64::MAX), 0.0);
    }
}
