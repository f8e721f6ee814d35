//! The crate's one error type. Variants are named for the action that failed and keep
//! their cause as `#[source]`, so a log line reads as "failed to X: because Y".

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong in localnfs outside the NFS request path (which answers
/// with `nfsstat3` values instead).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to bind {what} listener on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error("demo step failed: {0}")]
    DemoStep(String),

    #[error("failed to build a Kubernetes object: {0}")]
    BuildObject(String),

    #[error("not supported: {0}")]
    Unsupported(&'static str),

    #[error("failed to install the signal handler")]
    SignalHandler(#[source] std::io::Error),

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

    #[error("failed to {action}: {path}")]
    VolumeIo {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("volume {name} not found")]
    VolumeNotFound { name: String },

    #[error("volume {name} already exists with a different size, owner, mode or squash policy")]
    VolumeConflict { name: String },

    #[error("volume {name}: size must be greater than zero")]
    InvalidVolumeSize { name: String },

    #[error("volume {name}: {why}")]
    InvalidVolumeSpec { name: String, why: &'static str },

    #[error("volume {name}: cannot shrink to {requested} bytes, {used} bytes are in use")]
    ShrinkBelowUsage {
        name: String,
        used: u64,
        requested: u64,
    },

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
