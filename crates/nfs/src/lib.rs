//! localnfs's data path, with no Kubernetes in it: the userspace NFSv3 + MOUNT v3
//! server ([`nfs`]), the volume directories it serves ([`volume`]) and the accept loop
//! every TCP server of localnfs runs on ([`server`]). The `localnfs` binary wraps it
//! with the node agent's cluster side; the fuzz target and the NFS tests use it alone.

pub mod backup;
pub mod error;
pub mod nfs;
pub mod server;
pub mod volume;

pub use error::{Error, Result};
