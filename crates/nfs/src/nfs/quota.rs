//! A volume's size and object limits (it cannot grow past what its claim asked for),
//! enforced by the server
//! since the node's filesystem may have no project quota.
//!
//! Every change of what a volume is charged (WRITE, SETATTR size, CREATE over an
//! existing file, the namespace procedures) runs inside one [`Charging`], which holds
//! the volume's charge lock: the check against the limit, the change on disk and the
//! new count are one step, so racing clients cannot pass the limit together. A change
//! reserves what it may cost first, and settles to what `fstat` says it cost after.
//! The count is also re-taken from the disk at start and periodically ([`resync`]).
//!
//! Rules that keep the count exact after failures and races:
//! - whatever exists after a create, successful or not, is charged: a create that
//!   fails after making its object removes it again under the lock (`dirops`);
//! - an object's charge is released once, when its last link goes (REMOVE, RENAME
//!   over it), decided from its link count under the lock; after that nothing charges
//!   or releases it ([`linked`]: WRITE and truncate of an unlinked file are STALE);
//! - a size set by CREATE is charged once, as a change of the object just charged.
//!
//! The lock also orders mode changes: SETATTR changes size, mode and owner under it,
//! and WRITE clears set-id bits under it, so one never writes back a mode the other
//! replaced.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use nfs3_types::nfs3::nfsstat3;

use crate::volume::{Usage, VolumeMeta, VolumeSpec};

/// Bytes an object costs its volume: see [`crate::volume::charge`].
pub fn charge_of(st: &libc::stat) -> u64 {
    crate::volume::charge(
        st.st_mode & libc::S_IFMT == libc::S_IFREG,
        st.st_size as u64,
        st.st_blocks as u64,
    )
}

/// Refuses a change of what an object is charged once its last link is gone: the
/// REMOVE or RENAME that took it released its charge then, under the charge lock, so
/// charging it again (a WRITE to it) or releasing it again (a truncate) would count
/// the same bytes twice. To the caller its handle is stale, as it is to the next
/// resolve. Call with the charge lock held, on attributes read under it.
pub fn linked(st: &libc::stat) -> Result<(), nfsstat3> {
    if st.st_nlink == 0 {
        return Err(nfsstat3::NFS3ERR_STALE);
    }
    Ok(())
}

/// Objects a volume may hold: `max_files` when its class set one (`maxFiles`), else one
/// per 4 KiB of `size_bytes` (the block a small file spends), at least 1024, so a flood
/// of empty files cannot exhaust the node's inodes.
pub fn max_inodes(spec: &VolumeSpec) -> u64 {
    spec.max_files
        .unwrap_or_else(|| (spec.size_bytes / 4096).max(1024))
}

/// What one block of a new directory entry or directory may cost: reserved before a
/// namespace change, settled after.
pub const NAMESPACE_RESERVE: u64 = 4096;

/// One volume's counters and charge lock, as this module sees them: borrowed from the
/// volume's state (`state::Volume`, which depends on this module, never the other way
/// round).
#[derive(Clone, Copy)]
pub struct Account<'a> {
    pub limit: &'a AtomicU64,
    /// Bytes charged to the volume (see [`charge_of`]).
    pub used: &'a AtomicU64,
    /// Objects in the volume (its root not counted), and how many it may hold.
    pub inodes: &'a AtomicU64,
    pub max_inodes: &'a AtomicU64,
    /// Bumped by every charge, so a re-count from the disk that raced one is dropped.
    pub charges: &'a AtomicU64,
    /// Held by every operation that changes what the volume is charged, so the check
    /// against the limit and the change are one step, so racing writers cannot pass it.
    pub charge_lock: &'a Mutex<()>,
}

impl<'a> Account<'a> {
    /// Applies the limits of `meta` (a resize): takes effect on the next charge.
    pub fn set_limits(self, meta: &VolumeMeta) {
        self.limit.store(meta.size_bytes, Ordering::Release);
        self.max_inodes.store(max_inodes(meta), Ordering::Release);
    }

    /// Starts a change of the volume's usage: holds the charge lock until dropped.
    pub fn charging(self) -> Charging<'a> {
        let lock = self.charge_lock.lock().unwrap_or_else(|p| p.into_inner());
        Charging {
            v: self,
            _lock: lock,
        }
    }

    pub fn free(self) -> u64 {
        self.limit
            .load(Ordering::Acquire)
            .saturating_sub(self.used.load(Ordering::Acquire))
    }
}

/// A change of a volume's usage in progress; holds its charge lock.
pub struct Charging<'a> {
    v: Account<'a>,
    _lock: MutexGuard<'a, ()>,
}

impl Charging<'_> {
    /// Reserves `bytes`, or fails with DQUOT if the limit would be passed.
    pub fn reserve(&self, bytes: u64) -> Result<(), nfsstat3> {
        let used = self.v.used.load(Ordering::Acquire);
        if used.saturating_add(bytes) > self.v.limit.load(Ordering::Acquire) {
            return Err(nfsstat3::NFS3ERR_DQUOT);
        }
        self.v.used.store(used + bytes, Ordering::Release);
        self.v.charges.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Replaces a reservation of `reserved` bytes by what the change really cost: an
    /// object's charge went from `before` to `after` (either way).
    pub fn settle(&self, reserved: u64, before: u64, after: u64) {
        let used = self.v.used.load(Ordering::Acquire).saturating_sub(reserved);
        let used = (used + after).saturating_sub(before);
        self.v.used.store(used, Ordering::Release);
        self.v.charges.fetch_add(1, Ordering::AcqRel);
    }

    /// Counts one new object, or fails with DQUOT past the volume's object limit.
    pub fn add_inode(&self) -> Result<(), nfsstat3> {
        let n = self.v.inodes.load(Ordering::Acquire);
        if n >= self.v.max_inodes.load(Ordering::Acquire) {
            return Err(nfsstat3::NFS3ERR_DQUOT);
        }
        self.v.inodes.store(n + 1, Ordering::Release);
        self.v.charges.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// An object went away (or was never made after [`Charging::add_inode`]).
    pub fn remove_inode(&self) {
        let n = self.v.inodes.load(Ordering::Acquire);
        self.v.inodes.store(n.saturating_sub(1), Ordering::Release);
        self.v.charges.fetch_add(1, Ordering::AcqRel);
    }
}

/// Re-takes the volume's usage from the disk (`count`, run without the lock: a walk
/// of a large volume takes a while) and adopts it if no charge happened meanwhile;
/// otherwise the next round tries again. Corrects any drift: objects changed behind
/// the server's back, a usage charged for a file deleted while a client wrote to it.
pub fn resync(
    v: Account,
    count: impl FnOnce() -> crate::error::Result<Usage>,
) -> crate::error::Result<bool> {
    let seen = v.charges.load(Ordering::Acquire);
    let usage = count()?;
    let _lock = v.charge_lock.lock().unwrap_or_else(|p| p.into_inner());
    if v.charges.load(Ordering::Acquire) != seen {
        return Ok(false);
    }
    v.used.store(usage.bytes, Ordering::Release);
    v.inodes.store(usage.inodes, Ordering::Release);
    Ok(true)
}
