//! localnfs: a Kubernetes dynamic provisioner that serves directories on a node's local
//! disk as NFSv3 PersistentVolumes, plus a scheduler helper that keeps pods near their
//! data. One binary; see `cli` for the commands.

pub mod admin;
pub mod cache;
pub mod cli;
#[cfg(feature = "demo")]
pub mod demo;
pub mod error;
pub mod events;
pub mod heartbeat;
pub mod kubeclient;
pub mod metrics;
pub mod node;
pub mod objects;
pub mod provisioner;
pub mod scheduler;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod web;

pub use error::{Error, Result};
/// The data path lives in its own crate (no Kubernetes in it); these are its modules.
pub use localnfs_nfs::{nfs, server, volume};
