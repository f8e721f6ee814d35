//! What can go wrong starting and driving the test cluster and kernel test nodes.
//! Variants are named for the action that failed and keep their cause as `#[source]`.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "Kubernetes test binaries not found in {dir}: run scripts/k8s-binaries (it unpacks \
         ../shared/testbed or builds them from Debian's source package)"
    )]
    MissingTestBinaries { dir: PathBuf },

    #[error("`{program}` not found on PATH: {hint}")]
    MissingProgram {
        program: &'static str,
        hint: &'static str,
    },

    #[error("failed to prepare the test cluster directory {path}")]
    PrepareTestDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to start {name}")]
    SpawnProcess {
        name: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{name} exited during start-up ({status}); last lines of {log}:\n{tail}")]
    ProcessExited {
        name: String,
        status: String,
        log: PathBuf,
        tail: String,
    },

    #[error("failed to set up the test network: `{command}`: {stderr}")]
    TestNetwork { command: String, stderr: String },

    #[error("test node {node}: {detail}")]
    GuestCommand { node: String, detail: String },

    #[error("test node {node}: cannot attach {path} as a disk: {why}")]
    AttachDisk {
        node: String,
        path: PathBuf,
        why: &'static str,
    },

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

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
