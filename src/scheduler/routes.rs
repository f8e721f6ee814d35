//! HTTP routes of the scheduler helper. The same table serves the webhook listener
//! (TLS) and the extender listener (plain HTTP), so either can carry either call
//! (`/validate` and `/validate-claims` answer only whoever asks: what it allows is decided by the API server
//! calling it over TLS, so a forged review on the plain listener changes nothing).

use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::AdmissionReview;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;

use super::watch::{Shared, with};
use super::wire::{self, ExtenderArgs};
use crate::web::{self, json, text};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    route: &'static str,
}

type Durations = Family<RouteLabel, Histogram, fn() -> Histogram>;

/// Request counts and latencies per route.
#[derive(Clone)]
pub struct HelperMetrics {
    pub requests: Family<RouteLabel, Counter>,
    pub bad_requests: Family<RouteLabel, Counter>,
    pub seconds: Durations,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl HelperMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            bad_requests: Family::default(),
            seconds: Family::new_with_constructor(latency_histogram),
        };
        registry.register(
            "scheduler_requests",
            "Webhook and extender calls answered, by route",
            m.requests.clone(),
        );
        registry.register(
            "scheduler_bad_requests",
            "Calls refused because their body could not be read, by route",
            m.bad_requests.clone(),
        );
        registry.register(
            "scheduler_request_duration_seconds",
            "Time to decide a webhook or extender call, by route",
            m.seconds.clone(),
        );
        m
    }
}

/// The helper's route table.
pub struct Helper {
    pub inventory: Shared,
    pub metrics: HelperMetrics,
    /// The node agents' write guard (`/validate`); `None`: not served.
    pub agents: Option<super::agents::Agents>,
    /// The claim webhook (`/validate-claims`): localnfs's keys on claims.
    pub claims: super::claims_review::ClaimGuard,
}

fn encode<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => json(StatusCode::OK, body),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the answer: {e}\n"),
        ),
    }
}

impl Helper {
    /// A body that could not be read: counted, and answered 400.
    fn bad_request(&self, route: &'static str, e: serde_json::Error) -> Response<Full<Bytes>> {
        self.metrics
            .bad_requests
            .get_or_create(&RouteLabel { route })
            .inc();
        text(
            StatusCode::BAD_REQUEST,
            format!("cannot read the {route} request: {e}\n"),
        )
    }

    /// Decodes, decides and encodes one call of `route` (`filter`, `prioritize`,
    /// `mutate`).
    pub fn answer(&self, route: &'static str, body: &[u8]) -> Response<Full<Bytes>> {
        // Heartbeat expiries are on the helper's own monotonic clock (objects::agents).
        let now = crate::objects::agents::observer_now();
        let inv = &self.inventory;
        let bad = |e| self.bad_request(route, e);
        match route {
            "filter" => match serde_json::from_slice::<ExtenderArgs>(body) {
                Ok(args) => encode(&with(inv, |i| wire::filter(args, i, now))),
                Err(e) => bad(e),
            },
            "prioritize" => match serde_json::from_slice::<ExtenderArgs>(body) {
                Ok(args) => encode(&with(inv, |i| wire::prioritize(args, i, now))),
                Err(e) => bad(e),
            },
            _ => match serde_json::from_slice::<AdmissionReview<Pod>>(body) {
                Ok(review) => encode(&wire::admit(review, |pod| {
                    with(inv, |i| super::decide::pod_claims(pod, i))
                })),
                Err(e) => bad(e),
            },
        }
    }
}

impl web::Routes for Helper {
    async fn handle(&self, req: Request<Bytes>) -> Response<Full<Bytes>> {
        let route = match (req.method(), req.uri().path()) {
            (&Method::POST, "/filter") => "filter",
            (&Method::POST, "/prioritize") => "prioritize",
            (&Method::POST, "/mutate") => "mutate",
            (&Method::POST, "/validate") if self.agents.is_some() => "validate",
            (&Method::POST, "/validate-claims") => "validate-claims",
            (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n".into()),
            _ => return text(StatusCode::NOT_FOUND, "not found\n".into()),
        };
        let started = Instant::now();
        let resp = match (route, &self.agents) {
            ("validate", Some(agents)) => {
                match serde_json::from_slice::<AdmissionReview<DynamicObject>>(req.body()) {
                    Ok(review) => encode(&agents.review(review).await),
                    Err(e) => self.bad_request(route, e),
                }
            }
            ("validate-claims", _) => {
                match serde_json::from_slice::<AdmissionReview<DynamicObject>>(req.body()) {
                    Ok(review) => encode(&self.claims.review(review)),
                    Err(e) => self.bad_request(route, e),
                }
            }
            _ => self.answer(route, req.body()),
        };
        let label = RouteLabel { route };
        self.metrics.requests.get_or_create(&label).inc();
        self.metrics
            .seconds
            .get_or_create(&label)
            .observe(started.elapsed().as_secs_f64());
        resp
    }
}
