//! The binary's one error type (the data path's own, `localnfs_nfs::Error`, is one of
//! its variants). Variants are named for the action that failed and keep
//! their cause as `#[source]`, so a log line reads as "failed to X: because Y".

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong in localnfs outside the NFS request path (which answers
/// with `nfsstat3` values instead).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data path's own errors: listening, the volume store.
    #[error(transparent)]
    Nfs(#[from] localnfs_nfs::Error),

    /// The test cluster's (the demo runs on it).
    #[cfg(feature = "demo")]
    #[error(transparent)]
    Testbed(#[from] localnfs_testbed::Error),

    #[error("demo step failed: {0}")]
    DemoStep(String),

    #[error("failed to build a Kubernetes object: {0}")]
    BuildObject(String),

    #[error("not supported: {0}")]
    Unsupported(&'static str),

    #[error("bad configuration: {0}")]
    BadConfig(String),

    #[error("failed to install the signal handler")]
    SignalHandler(#[source] std::io::Error),

    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },

    #[error("failed to read kubeconfig {path}")]
    ReadKubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },

    #[error("failed to build a Kubernetes client")]
    BuildClient(#[source] kube::Error),

    #[error("failed to set up the webhook certificate: {0}")]
    Tls(String),

    #[error("failed to read {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("Kubernetes API call failed: {action}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// Wraps a kube error with the action that was being attempted.
    pub fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let action = action.into();
        move |source| Error::Kube { action, source }
    }
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
