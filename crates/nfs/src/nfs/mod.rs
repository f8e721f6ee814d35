//! The userspace NFSv3 + MOUNT v3 server, on one TCP port, written on `nfs3_types`
//! (the `nfs3_server` crate's VFS cannot see the caller's identity, fixes FSSTAT and
//! derives handles from its start time, which would give mounted pods ESTALE after
//! every restart).
//!
//! Layers, outermost first: [`server`] accepts (allow-list, connection cap, drain),
//! `conn` frames records within the time and memory bounds of `limits` and hands each
//! call (after `qos` has held it to its volume's ceilings, `throttle`, and, for the
//! blocking pool, queued it fairly between volumes, `pool` and `fair`) to `call`,
//! which runs its row of the procedure table (`table`: name, number,
//! handler, where it runs, reply bound; numbers in `program`),
//! `send` writes the replies (and counts what the sockets still hold),
//! `rpc`/`xdr` decode untrusted bytes, `ops`/`dirops`/`mount` implement procedures
//! (each returns a typed answer that `reply` alone turns into bytes),
//! `access` decides who may use each volume (per call), `rmtab` remembers who mounted
//! what (for DUMP only), `state` maps handles to descriptors, `sys` and `splice`
//! (zero-copy READ replies) are the only places that make system calls, `quota`
//! keeps each volume's account, and `writeback` starts unstable data's way to the
//! disk early. `snapshot` copies a live volume as of one instant (the mutating
//! procedures call its hooks under the charge lock). `stats` counts
//! every call (atomics only), `metrics` turns the counts into Prometheus text at
//! scrape time.

mod access;
mod allow;
mod attr;
mod buffers;
mod call;
mod conn;
mod dirops;
mod fair;
pub mod handle;
mod limits;
mod metrics;
mod mount;
mod ops;
mod pool;
mod program;
mod qos;
mod quota;
mod reply;
mod rmtab;
pub mod rpc;
mod send;
mod snapshot;
mod splice;
mod state;
mod stats;
mod sys;
mod table;
mod throttle;
mod writeback;
pub mod xdr;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use access::ClusterGrants;
pub use allow::{AllowList, Network};
pub use call::dispatch;
pub use limits::{Descriptors, Limits, share_descriptors};
pub use metrics::NfsCollector;
/// A restore checks a set against the same object limit the server enforces.
pub(crate) use quota::max_inodes;
pub use snapshot::{CopyReport, Snapshot, sha256sum_text};
pub use state::{Exports, MAX_CACHED};

/// How often each volume's usage is re-counted from the disk (see `quota::resync`).
pub const USAGE_RECOUNT: std::time::Duration = std::time::Duration::from_secs(600);

/// Large record buffers kept for reuse: enough for the READ/WRITE-sized records of a
/// few busy clients. They sit outside the byte budget, so this is part of the memory
/// bound (about 34 MiB).
const POOLED_BUFFERS: usize = 32;

/// The NFS server of one agent: its volumes, limits and what every connection shares.
pub struct Server(Arc<conn::Shared>);

impl Server {
    pub fn new(exports: Arc<Exports>, limits: Limits) -> Server {
        Server(Arc::new(conn::Shared {
            exports,
            buffers: buffers::BufferPool::new(POOLED_BUFFERS),
            budget: limits::Budget::new(limits.bytes_in_flight),
            limits,
            idle: limits::Waits::default(),
            connections: std::sync::atomic::AtomicUsize::new(0),
            pool: Arc::new(pool::Pool::default()),
            abort: CancellationToken::new(),
        }))
    }

    /// The server's metrics, for the agent's registry.
    pub fn collector(&self) -> NfsCollector {
        NfsCollector(self.0.clone())
    }

    /// Serves NFS and MOUNT on `listener` until `shutdown` fires, then drains: calls
    /// already received are answered, for at most the drain timeout; then the
    /// connections still sending are cut. Every reply sent meant durable (FILE_SYNC
    /// writes and COMMIT sync before replying), so a cut loses no acknowledged data.
    pub async fn serve(self, listener: TcpListener, allow: AllowList, shutdown: CancellationToken) {
        let shared = self.0;
        let limits = shared.limits;
        let deadline = {
            let (shutdown, abort) = (shutdown.clone(), shared.abort.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                tokio::time::sleep(limits.drain_timeout).await;
                tracing::warn!(timeout = ?limits.drain_timeout, "drain deadline passed: cutting the connections still sending");
                abort.cancel();
            })
        };
        crate::server::serve(
            "nfs",
            listener,
            limits.max_connections,
            shutdown,
            move |stream, peer, shutdown| {
                let shared = shared.clone();
                let allowed = allow.allows(peer.ip());
                async move {
                    if !allowed {
                        // Dropped before any byte is read.
                        tracing::warn!(%peer, "refused connection from a client not on the allow-list");
                        return;
                    }
                    conn::serve(stream, peer, shared, shutdown).await;
                }
            },
        )
        .await;
        deadline.abort();
    }
}
