//! Backup counters of this process and their Prometheus collector (the node agent
//! registers [`BackupCollector`]). Process-wide atomics: an agent has one set of
//! exports, and a backup updates them once when it ends, so nothing is locked per
//! call. Restores run in the `localnfs volume restore` process and are not counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

struct Stats {
    succeeded: AtomicU64,
    failed: AtomicU64,
    running: AtomicU64,
    bytes_copied: AtomicU64,
    bytes_linked: AtomicU64,
    nanos: AtomicU64,
}

static STATS: Stats = Stats {
    succeeded: AtomicU64::new(0),
    failed: AtomicU64::new(0),
    running: AtomicU64::new(0),
    bytes_copied: AtomicU64::new(0),
    bytes_linked: AtomicU64::new(0),
    nanos: AtomicU64::new(0),
};

/// A backup under way: counted as running until dropped.
pub(super) struct Running;

impl Running {
    pub(super) fn start() -> Self {
        STATS.running.fetch_add(1, Ordering::Relaxed);
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        STATS.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one finished backup: `written` is `(copied, linked)` bytes, `None` if it
/// failed.
pub(super) fn finished(written: Option<(u64, u64)>, took: Duration) {
    match written {
        Some((copied, linked)) => {
            STATS.succeeded.fetch_add(1, Ordering::Relaxed);
            STATS.bytes_copied.fetch_add(copied, Ordering::Relaxed);
            STATS.bytes_linked.fetch_add(linked, Ordering::Relaxed);
        }
        None => {
            STATS.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
    let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
    STATS.nanos.fetch_add(ns, Ordering::Relaxed);
}

/// The collector; register it with the agent's registry.
#[derive(Debug, Default)]
pub struct BackupCollector;

impl Collector for BackupCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut m = enc.encode_descriptor(
            "backups",
            "Backups this agent finished, by result",
            None,
            MetricType::Counter,
        )?;
        for (result, n) in [("succeeded", &STATS.succeeded), ("failed", &STATS.failed)] {
            m.encode_family(&[("result", result)])?
                .encode_counter::<NoLabelSet, u64, u64>(&load(n), None)?;
        }
        for (name, help, v) in [
            (
                "backup_bytes_copied",
                "Bytes backups wrote to their targets",
                &STATS.bytes_copied,
            ),
            (
                "backup_bytes_linked",
                "Bytes backups hard-linked from the previous set instead of copying",
                &STATS.bytes_linked,
            ),
        ] {
            enc.encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, u64, u64>(&load(v), None)?;
        }
        enc.encode_descriptor(
            "backup_seconds",
            "Time backups took, start to end (succeeded or failed)",
            None,
            MetricType::Counter,
        )?
        .encode_counter::<NoLabelSet, f64, u64>(&(load(&STATS.nanos) as f64 / 1e9), None)?;
        let running = i64::try_from(load(&STATS.running)).unwrap_or(i64::MAX);
        enc.encode_descriptor(
            "backups_running",
            "Backups under way",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&running)
    }
}
