//! The admin listener every component runs: probes and metrics over real HTTP, and a
//! clean stop on shutdown.

mod support;

use std::sync::Arc;
use std::time::Duration;

use localnfs::admin::{self, AdminState, Readiness};
use localnfs::shutdown::CancellationToken;
use support::http_get;
use tokio::net::TcpListener;

async fn start() -> (
    std::net::SocketAddr,
    Readiness,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let readiness = Readiness::default();
    let shutdown = CancellationToken::new();
    let state = AdminState {
        readiness: readiness.clone(),
        registry: Arc::new(localnfs::metrics::registry("test")),
    };
    let task = tokio::spawn(admin::serve(listener, state, shutdown.clone()));
    (addr, readiness, shutdown, task)
}

#[tokio::test]
async fn readyz_fails_until_the_component_says_it_is_ready() {
    let (addr, readiness, shutdown, task) = start().await;
    assert_eq!(http_get(addr, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(http_get(addr, "/readyz").await.0, 503);
    readiness.set(true);
    assert_eq!(http_get(addr, "/readyz").await, (200, "ok\n".into()));
    readiness.set(false);
    assert_eq!(http_get(addr, "/readyz").await.0, 503);
    shutdown.cancel();
    task.await.expect("admin server task");
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_build_info() {
    let (addr, _readiness, shutdown, task) = start().await;
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("localnfs_build_info{")
            && body.contains("component=\"test\"")
            && body.trim_end().ends_with("# EOF"),
        "unexpected metrics page:\n{body}"
    );
    assert_eq!(http_get(addr, "/nope").await.0, 404);
    shutdown.cancel();
    task.await.expect("admin server task");
}

#[tokio::test]
async fn shutdown_closes_idle_keepalive_connections_and_returns() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (addr, _readiness, shutdown, task) = start().await;
    // An HTTP/1.1 client that keeps its connection open after a request.
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let mut buf = [0u8; 256];
    let n = conn.read(&mut buf).await.expect("response");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("admin server drained within 5 s")
        .expect("admin server task");
    // The server closed our idle connection rather than leaving it hanging.
    let n = tokio::time::timeout(Duration::from_secs(1), conn.read(&mut buf))
        .await
        .expect("connection closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
