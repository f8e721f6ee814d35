//! Graceful shutdown: one [`CancellationToken`] for the whole process, cancelled on the
//! first SIGTERM or SIGINT. Servers stop accepting when it fires and drain what is in
//! flight; a second signal is left to the default handler's successor (we exit anyway
//! once draining ends).

use tokio::signal::unix::{SignalKind, signal};
pub use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// Returns a token that is cancelled when the process receives SIGTERM or SIGINT.
///
/// Must be called inside a Tokio runtime.
pub fn on_signals() -> Result<CancellationToken> {
    let mut term = signal(SignalKind::terminate()).map_err(Error::SignalHandler)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::SignalHandler)?;
    let token = CancellationToken::new();
    let fire = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down");
        fire.cancel();
    });
    Ok(token)
}
