//! The provisioner (`localnfs controller`): turns claims of localnfs StorageClasses
//! into volumes on a node and PersistentVolumes, reclaims and expands them.
//!
//! `pv`, `publish`, `reserve` and `clone` (which volume a clone copies) are pure
//! decisions and bookkeeping, `step` the next step for a claim; the reconcilers (`claims`, `expand`, `volumes`, `pods`) do the I/O;
//! `triggers` decides which objects to reconcile (and fills the watch caches the
//! reconcilers read, PVs as `cached_pv`'s slim copies) and `queue` hands their keys to
//! a bounded set of workers. `schedules` turns VolumeBackupSchedules into VolumeBackups
//! at the times of their `cron` expressions (pure parser); `backups` fails the
//! VolumeBackups no node agent will run (their claim missing, unbound, or not
//! localnfs's).

pub mod backups;
pub mod cached_pv;
pub mod claims;
pub mod clone;
pub mod cron;
pub mod ctx;
pub mod expand;
pub mod keys;
pub mod leader;
pub mod metrics;
pub mod pods;
pub mod publish;
pub mod pv;
pub mod queue;
pub mod reserve;
pub mod restores;
pub mod run;
pub mod schedules;
pub mod step;
pub mod triggers;
pub mod volumes;
