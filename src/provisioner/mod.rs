//! The provisioner (`localnfs controller`): turns claims of localnfs StorageClasses
//! into volumes on a node and PersistentVolumes, reclaims and expands them.
//!
//! `params`, `pv`, `publish`, `reclaim` and `reserve` are pure decisions and bookkeeping;
//! the reconcilers (`claims`, `expand`, `volumes`, `pods`) do the I/O; `triggers`
//! decides which objects to reconcile and `queue` hands their keys to a bounded set of
//! workers.

pub mod claims;
pub mod expand;
pub mod leader;
pub mod metrics;
pub mod params;
pub mod pods;
pub mod protocol;
pub mod publish;
pub mod pv;
pub mod queue;
pub mod reclaim;
pub mod reserve;
pub mod run;
pub mod triggers;
pub mod volumes;
