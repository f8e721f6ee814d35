//! The node agent's NFS metrics, read from the server's counters (`stats`), the
//! volumes' usage and the connection and byte budgets at scrape time: a Prometheus
//! collector, so nothing is copied or locked per call.
//!
//! Series per volume exist while the volume is exported and go with it. A volume
//! carries about 33 series (usage, bytes, a 21-bucket latency histogram, throttled and
//! queued time), plus one per procedure and per error status that has been seen on
//! it; procedure and status label
//! values are fixed sets (procedure names from the procedure table, `table`; statuses
//! from `stats`). Labels: `volume` (its directory and PV name),
//! and `namespace` / `persistentvolumeclaim` once the agent has seen the claim (empty
//! in standalone mode).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use super::conn::Shared;
use super::state::Volume;
use super::stats::{BUCKETS_NS, Latency, SLOTS, STATUSES};
use super::table::slot_labels;

/// The collector; register it with the agent's registry.
pub struct NfsCollector(pub(super) Arc<Shared>);

impl std::fmt::Debug for NfsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NfsCollector")
    }
}

type Fmt = Result<(), std::fmt::Error>;

/// A family with one sample per volume: name, help, value.
type PerVolume = (&'static str, &'static str, fn(&Volume) -> u64);

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Acquire)
}

fn counter(m: &mut MetricEncoder, labels: &impl EncodeLabelSet, v: u64) -> Fmt {
    m.encode_family(labels)?
        .encode_counter::<NoLabelSet, u64, u64>(&v, None)
}

fn gauge(m: &mut MetricEncoder, labels: &impl EncodeLabelSet, v: u64) -> Fmt {
    let v = i64::try_from(v).unwrap_or(i64::MAX);
    m.encode_family(labels)?.encode_gauge(&v)
}

/// A counter of seconds kept as nanoseconds.
fn seconds(m: &mut MetricEncoder, labels: &impl EncodeLabelSet, ns: u64) -> Fmt {
    m.encode_family(labels)?
        .encode_counter::<NoLabelSet, f64, u64>(&(ns as f64 / 1e9), None)
}

/// A gauge without labels.
fn single(m: &mut MetricEncoder, v: u64) -> Fmt {
    m.encode_gauge(&i64::try_from(v).unwrap_or(i64::MAX))
}

fn histogram(m: &mut MetricEncoder, labels: &impl EncodeLabelSet, h: &Latency) -> Fmt {
    let (sum, count, counts) = h.snapshot();
    let mut buckets = [(f64::INFINITY, 0u64); BUCKETS_NS.len() + 1];
    for (i, n) in counts.iter().enumerate() {
        let bound = BUCKETS_NS
            .get(i)
            .map_or(f64::INFINITY, |ns| *ns as f64 / 1e9);
        buckets[i] = (bound, *n);
    }
    m.encode_family(labels)?
        .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

/// `volume`, `namespace`, `persistentvolumeclaim`.
fn volume_labels(v: &Volume) -> [(&'static str, &str); 3] {
    let (ns, claim) = v
        .claim
        .get()
        .map_or(("", ""), |(ns, c)| (ns.as_str(), c.as_str()));
    [
        ("volume", v.meta.name.as_str()),
        ("namespace", ns),
        ("persistentvolumeclaim", claim),
    ]
}

impl Collector for NfsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Fmt {
        let shared = &self.0;
        let stats = &shared.exports.stats;
        let volumes = shared.exports.all();
        // Procedures: series appear once a procedure has been called.
        let called: Vec<usize> = (0..SLOTS)
            .filter(|s| stats.latency[*s].count() > 0)
            .collect();
        let proc_labels = |s: usize| {
            let (program, procedure) = slot_labels(s);
            [("program", program), ("procedure", procedure)]
        };
        let mut m = enc.encode_descriptor(
            "nfs_requests",
            "NFS and MOUNT calls answered, by procedure",
            None,
            MetricType::Counter,
        )?;
        for &s in &called {
            counter(&mut m, &proc_labels(s), stats.latency[s].count())?;
        }
        let mut m = enc.encode_descriptor(
            "nfs_request_duration_seconds",
            "Time from a call's last byte received to its reply ready to send, by procedure",
            None,
            MetricType::Histogram,
        )?;
        for &s in &called {
            histogram(&mut m, &proc_labels(s), &stats.latency[s])?;
        }
        let mut m = enc.encode_descriptor(
            "nfs_errors",
            "Calls answered with an error, by procedure and NFS (or RPC) status",
            None,
            MetricType::Counter,
        )?;
        for &s in &called {
            for (i, n) in stats.errors[s].iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    counter(&mut m, &(proc_labels(s), [("status", STATUSES[i])]), n)?;
                }
            }
        }

        let mut m = enc.encode_descriptor(
            "nfs_connections",
            "NFS client connections being served",
            None,
            MetricType::Gauge,
        )?;
        single(&mut m, shared.connections.load(Ordering::Relaxed) as u64)?;
        let mut m = enc.encode_descriptor(
            "nfs_connections_limit",
            "Most NFS connections served at once (--max-connections)",
            None,
            MetricType::Gauge,
        )?;
        single(&mut m, shared.limits.max_connections as u64)?;
        let mut m = enc.encode_descriptor(
            "nfs_in_flight_bytes",
            "Bytes of calls and replies held for clients now (the memory budget in use)",
            None,
            MetricType::Gauge,
        )?;
        single(&mut m, shared.budget.held() as u64)?;
        let mut m = enc.encode_descriptor(
            "nfs_in_flight_bytes_limit",
            "The memory budget for calls and replies (--max-bytes-in-flight)",
            None,
            MetricType::Gauge,
        )?;
        single(&mut m, shared.budget.limit() as u64)?;

        let mut m = enc.encode_descriptor(
            "nfs_queued_calls",
            "Calls waiting in the fair queue for a blocking-pool worker, all volumes",
            None,
            MetricType::Gauge,
        )?;
        single(&mut m, shared.pool.queued() as u64)?;

        // Volumes.
        let mut m = enc.encode_descriptor(
            "volumes",
            "Volumes this agent exports",
            None,
            MetricType::Gauge,
        )?;
        single(&mut m, volumes.len() as u64)?;
        let usage: [PerVolume; 4] = [
            (
                "volume_capacity_bytes",
                "The volume's size limit (its claim's request)",
                |v| load(&v.limit),
            ),
            ("volume_used_bytes", "Bytes charged to the volume", |v| {
                load(&v.used)
            }),
            (
                "volume_inodes",
                "Files, directories and other objects the volume may hold",
                |v| load(&v.max_inodes),
            ),
            (
                "volume_inodes_used",
                "Objects in the volume (its root not counted)",
                |v| load(&v.inodes),
            ),
        ];
        for (name, help, value) in usage {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for v in &volumes {
                gauge(&mut m, &volume_labels(v), value(v))?;
            }
        }
        let bytes: [PerVolume; 2] = [
            (
                "volume_read_bytes",
                "Data bytes returned by READ calls on the volume",
                |v| v.stats.read_bytes.load(Ordering::Relaxed),
            ),
            (
                "volume_written_bytes",
                "Data bytes written by WRITE calls on the volume",
                |v| v.stats.written_bytes.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in bytes {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for v in &volumes {
                counter(&mut m, &volume_labels(v), value(v))?;
            }
        }
        let mut m = enc.encode_descriptor(
            "nfs_volume_throttled_seconds",
            "Time the volume's calls were held by its ceilings (readIOPS, readBandwidth; writeIOPS, writeBandwidth), by direction",
            None,
            MetricType::Counter,
        )?;
        for v in &volumes {
            for (i, direction) in ["read", "write"].into_iter().enumerate() {
                let ns = v.qos.throttled_ns[i].load(Ordering::Relaxed);
                seconds(&mut m, &(volume_labels(v), [("direction", direction)]), ns)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "nfs_volume_queued_seconds",
            "Time the volume's calls waited in the fair queue for a blocking-pool worker",
            None,
            MetricType::Counter,
        )?;
        for v in &volumes {
            seconds(
                &mut m,
                &volume_labels(v),
                v.qos.queued_ns.load(Ordering::Relaxed),
            )?;
        }
        let mut m = enc.encode_descriptor(
            "volume_requests",
            "Calls on the volume's handles (and MNT of it), by procedure",
            None,
            MetricType::Counter,
        )?;
        for v in &volumes {
            for (s, n) in v.stats.calls.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    counter(&mut m, &(volume_labels(v), proc_labels(s)), n)?;
                }
            }
        }
        let mut m = enc.encode_descriptor(
            "volume_request_duration_seconds",
            "Time from a call's last byte received to its reply ready to send, all procedures",
            None,
            MetricType::Histogram,
        )?;
        for v in &volumes {
            histogram(&mut m, &volume_labels(v), &v.stats.latency)?;
        }
        let mut m = enc.encode_descriptor(
            "volume_errors",
            "Calls on the volume answered with an error, by NFS status",
            None,
            MetricType::Counter,
        )?;
        for v in &volumes {
            for (i, n) in v.stats.errors.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    counter(&mut m, &(volume_labels(v), [("status", STATUSES[i])]), n)?;
                }
            }
        }
        Ok(())
    }
}
