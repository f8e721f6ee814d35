//! Prometheus metrics. Each component registers its own families in one shared
//! [`Registry`] (the controller's in `provisioner::metrics`, the scheduler helper's in
//! `scheduler::routes`; the node agent adds `nfs::NfsCollector`, which reads the NFS
//! server's per-call counters and the volumes' usage at scrape time); the admin
//! listener encodes it at `/metrics` in the OpenMetrics text format. Names and labels
//! are listed in `docs/metrics.md`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    component: String,
}

/// A registry with the metrics every component exports (`localnfs_build_info`).
pub fn registry(component: &str) -> Registry {
    let mut registry = Registry::with_prefix("localnfs");
    let info = Family::<BuildLabels, Gauge>::default();
    info.get_or_create(&BuildLabels {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        component: component.to_owned(),
    })
    .set(1);
    registry.register("build_info", "Build and component of this process", info);
    registry
}

/// Encodes the registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an error here would be a bug in a metric's
    // encoder, and an empty page is better than a crash.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::error!(error = %e, "failed to encode metrics");
    }
    out
}
