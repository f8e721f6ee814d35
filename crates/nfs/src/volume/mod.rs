//! Volume directories on the node's disk, with no Kubernetes in sight.
//!
//! Layout under the node root (default `/var/lib/localnfs`):
//! ```text
//! volumes/<name>/     the data clients see
//! meta/<name>.json    size limit, owner, squash policy, stable numeric id
//! meta/<name>.sha256  per-file checksums of a volume made as a copy (see `staging`)
//! staging/            copies being built (`<name>.partial`; see `staging`)
//! trash/              deletions in progress (renamed here first, then removed)
//! node.key            per-node secret keying file-handle MACs (0600)
//! last-id             highest volume id ever issued (ids are never reused)
//! rmtab               which client addresses mounted which volumes
//! access.json         standalone per-volume grants (optional, written by hand)
//! cluster-access.json the cluster's access rules last in force (cluster mode)
//! ```
//! Invariants: a volume exists (is listed, can be mounted) only once its directory and
//! its metadata are both on disk; metadata is written atomically (temp file, fsync,
//! rename, fsync dir); a deleted volume's id is never issued again, so old handles
//! cannot resolve into a new volume.

mod name;
mod spec;
mod staging;
mod store;

pub use name::{InvalidName, VolumeName};
pub use spec::{
    DEFAULT_WEIGHT, MAX_FILES, MAX_WEIGHT, MIN_BANDWIDTH, Squash, VolumeSpec, parse_mode,
    quantity_bytes,
};
pub use staging::Staging;
pub use store::{Owner, Usage, VolumeMeta, VolumeStore, charge, write_atomic};
