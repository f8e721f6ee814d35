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
        m
    }

    pub fn failed(&self, reason: &str) {
        self.provision_failures
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }
}
