//! The controller's Prometheus metrics.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Counters and histograms updated by the reconcilers.
#[derive(Clone)]
pub struct ControllerMetrics {
    pub provisioned: Counter,
    pub provision_failures: Family<Vec<(String, String)>, Counter>,
    pub provision_seconds: Histogram,
    pub deleted: Counter,
    pub reconcile_errors: Counter,
    pub leader: Gauge,
    pub queue_depth: Family<Vec<(String, String)>, Gauge>,
}

impl ControllerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            provisioned: Counter::default(),
            provision_failures: Family::default(),
            provision_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            deleted: Counter::default(),
            reconcile_errors: Counter::default(),
            leader: Gauge::default(),
            queue_depth: Family::default(),
        };
        registry.register(
            "provisioned",
            "Volumes provisioned (PV created)",
            m.provisioned.clone(),
        );
        registry.register(
            "provision_failures",
            "Claims that could not be provisioned, by reason",
            m.provision_failures.clone(),
        );
        registry.register(
            "provision_duration_seconds",
            "Time from claim creation to its PV being created",
            m.provision_seconds.clone(),
        );
        registry.register(
            "pv_deleted",
            "Released PVs deleted for reclaim",
            m.deleted.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and were retried",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "leader",
            "1 while this controller is the leader",
            m.leader.clone(),
        );
        registry.register(
            "queue_depth",
            "Keys waiting in the leader's work queues (claims, pvs), not yet being reconciled",
            m.queue_depth.clone(),
        );
        m
    }

    /// The depth gauge of work queue `queue`.
    pub fn queue(&self, queue: &str) -> Gauge {
        self.queue_depth
            .get_or_create(&vec![("queue".to_owned(), queue.to_owned())])
            .clone()
    }

    pub fn failed(&self, reason: &str) {
        self.provision_failures
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }
}
