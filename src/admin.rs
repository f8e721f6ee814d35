//! The admin HTTP listener every component runs: `/healthz` (the process is alive),
//! `/readyz` (it can do its job: caches synced, listener bound, leader or standby) and
//! `/metrics` (Prometheus text). Plain HTTP/1.1; it carries no secrets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::web::{self, text};

/// Most scrapers and probes hold one connection each; this is plenty.
const MAX_CONNECTIONS: usize = 64;

/// Whether the component is ready; cloned into whatever decides it.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the component ready (or not).
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    /// Whether the component said it is ready.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What the admin endpoints report.
#[derive(Clone)]
pub struct AdminState {
    pub readiness: Readiness,
    pub registry: Arc<Registry>,
}

/// A running admin listener.
pub struct Admin {
    /// Where it listens (the chosen port when asked for port 0).
    pub addr: SocketAddr,
    pub readiness: Readiness,
    pub task: JoinHandle<()>,
}

/// Binds `addr` and serves the admin endpoints for `registry` until `shutdown` fires;
/// the component reports readiness through [`Admin::readiness`].
pub async fn start(
    addr: SocketAddr,
    registry: Registry,
    shutdown: &CancellationToken,
) -> crate::error::Result<Admin> {
    let listener = crate::server::bind("admin", addr).await?;
    let addr = listener.local_addr().unwrap_or(addr);
    let readiness = Readiness::default();
    let state = AdminState {
        readiness: readiness.clone(),
        registry: Arc::new(registry),
    };
    let task = tokio::spawn(serve(listener, state, shutdown.clone()));
    Ok(Admin {
        addr,
        readiness,
        task,
    })
}

/// Serves the admin endpoints on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    web::serve(
        "admin",
        listener,
        MAX_CONNECTIONS,
        None,
        Arc::new(state),
        shutdown,
    )
    .await;
}

impl web::Routes for AdminState {
    async fn handle(&self, req: Request<Bytes>) -> Response<Full<Bytes>> {
        route(self, &req)
    }
}

fn route(state: &AdminState, req: &Request<Bytes>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" if state.readiness.get() => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
        "/metrics" => web::with_type(
            StatusCode::OK,
            crate::metrics::encode(&state.registry).into(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}
