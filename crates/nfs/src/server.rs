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

use crate::error::{Error, Result};

/// Binds the `what` listener (NFS, admin, webhook, ...) on `addr`; port 0 picks one.
pub async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { what, addr, source })
}

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use tokio_util::sync::CancellationToken;

    /// A server whose handler writes one byte, then holds the connection until the
    /// client closes it or `hold` passes.
    async fn start(
        max: usize,
        hold: Duration,
    ) -> (
        std::net::SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(super::serve(
            "test",
            listener,
            max,
            shutdown.clone(),
            move |mut stream: TcpStream, _peer, _shutdown| async move {
                let _ = stream.write_all(b"!").await;
                let mut buf = [0u8; 1];
                let _ = tokio::time::timeout(hold, stream.read(&mut buf)).await;
            },
        ));
        (addr, shutdown, task)
    }

    async fn greeted(conn: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 1];
        matches!(
            tokio::time::timeout(within, conn.read(&mut buf)).await,
            Ok(Ok(1))
        )
    }

    #[tokio::test]
    async fn connections_past_the_cap_wait_for_a_free_slot() {
        let (addr, shutdown, task) = start(1, Duration::from_secs(30)).await;
        let mut first = TcpStream::connect(addr).await.expect("first connects");
        assert!(greeted(&mut first, Duration::from_secs(2)).await);
        let mut second = TcpStream::connect(addr).await.expect("second connects");
        assert!(
            !greeted(&mut second, Duration::from_millis(300)).await,
            "second connection served while the cap was reached"
        );
        drop(first);
        assert!(greeted(&mut second, Duration::from_secs(2)).await);
        drop(second);
        shutdown.cancel();
        task.await.expect("server task");
    }

    #[tokio::test]
    async fn shutdown_waits_for_connections_in_flight() {
        let (addr, shutdown, task) = start(4, Duration::from_millis(500)).await;
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        assert!(greeted(&mut conn, Duration::from_secs(2)).await);
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!task.is_finished(), "returned before its connection ended");
        tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .expect("drained once the handler finished")
            .expect("server task");
    }
}
