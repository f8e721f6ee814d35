//! What can go wrong outside the NFS request path (which answers with `nfsstat3`
//! values instead): listening, and changing the volume store. Variants are named for
//! the action that failed and keep their cause as `#[source]`.

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to bind {what} listener on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error("failed to {action}: {path}")]
    VolumeIo {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "cannot use the per-volume access rules in {path}: {why} (fix or remove the file; no volume is served while its rules cannot be read)"
    )]
    AccessRules { path: PathBuf, why: String },

    #[error("volume {name} not found")]
    VolumeNotFound { name: String },

    #[error(
        "volume {name} already exists with a different size, owner, mode, squash policy, anonymous ids or object limit"
    )]
    VolumeConflict { name: String },

    #[error("volume {name} belongs to {owner}")]
    VolumeOwned { name: String, owner: String },

    #[error("volume {name}: size must be greater than zero")]
    InvalidVolumeSize { name: String },

    #[error("volume {name}: {why}")]
    InvalidVolumeSpec { name: String, why: &'static str },

    #[error("volume {name} already exists (or a copy to that name is under way)")]
    VolumeExists { name: String },

    #[error(
        "cannot copy volume {source_volume} into {name}: it holds {used} bytes and {inodes} objects, more than the new volume's {size} bytes or {max_inodes} objects"
    )]
    CloneTooLarge {
        source_volume: String,
        name: String,
        used: u64,
        inodes: u64,
        size: u64,
        max_inodes: u64,
    },

    #[error("cannot copy volume {source_volume} into {name}: {why}; nothing was made")]
    CopyFailed {
        source_volume: String,
        name: String,
        why: String,
    },

    #[error("cannot back up volume {volume} to {target}: {why}; the source is untouched")]
    BackupFailed {
        volume: String,
        target: PathBuf,
        why: String,
    },

    #[error("cannot restore {set} into volume {name}: {why}; nothing was made")]
    RestoreFailed {
        set: PathBuf,
        name: String,
        why: String,
    },

    #[error("volume {name}: cannot shrink to {requested} bytes, {used} bytes are in use")]
    ShrinkBelowUsage {
        name: String,
        used: u64,
        requested: u64,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
