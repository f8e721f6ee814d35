//! The accept loop every TCP server in localnfs runs on: it takes an already-bound
//! listener (so callers and tests choose the port, including port 0), caps concurrent
//! connections with a semaphore, stops accepting when the shutdown token fires, and
//! waits for the connections in flight to finish before returning.
//!
//! Connection handlers get the shutdown token too, so a long-lived connection can finish
//! its current request and close instead of being cut mid-reply.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Accepts connections until `shutdown` fires, running `handle` for each with at most
/// `max_connections` at once, then drains. A connection that arrives while the cap is
/// reached waits in the kernel backlog rather than being refused.
pub async fn serve<H, F>(
    name: &'static str,
    listener: TcpListener,
    max_connections: usize,
    shutdown: CancellationToken,
    handle: H,
) where
    H: Fn(TcpStream, SocketAddr, CancellationToken) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max_connections.max(1)));
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = limit.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break, // semaphore closed: cannot happen, we own it
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(server = name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let conn = handle(stream, peer, shutdown.clone());
        tracker.spawn(async move {
            conn.await;
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    tracing::debug!(
        server = name,
        in_flight = tracker.len(),
        "stopped accepting; draining"
    );
    tracker.wait().await;
}
