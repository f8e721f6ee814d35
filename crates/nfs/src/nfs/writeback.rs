//! Bounded write-back: a volume's unstable WRITEs go to the disk as they come, so a
//! COMMIT (or another volume's fsync, which on ext4 and xfs may have to wait for the
//! same journal transaction and shares the disk's queue) never finds an unbounded pile
//! of one volume's dirty data in front of it.
//!
//! Each file and each volume counts the bytes written unstable since their last
//! write-back. Past [`FILE_KICK`] for the file, or [`VOLUME_KICK`] for the whole
//! volume, the write that crossed it writes the file's dirty pages out and waits for
//! them. The wait happens on the writing volume's own worker (at most
//! `pool::PER_VOLUME` of them), so a volume holds at most about `PER_VOLUME` ×
//! [`FILE_KICK`] under write-back plus [`VOLUME_KICK`] dirty and not yet started, and a
//! flooding volume slows to its disk's speed instead of queueing work in front of
//! everyone. (Starting write-back without waiting, tried first with 4 MiB / 16 MiB,
//! let a 16-client flood dirty 160–740 MiB/s, far past what the disk takes, with the
//! same or worse latency for a neighbour's durable calls.)
//!
//! Nothing here is needed for durability (COMMIT still fsyncs), so a failing
//! `sync_file_range` is logged and otherwise ignored: the COMMIT reports the error.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use super::sys;

/// Unstable bytes a file may gather before they are written out.
pub const FILE_KICK: u64 = 1 << 20;
/// Unstable bytes a volume may gather, all files together, before the next write's
/// file is written out whatever its own count.
pub const VOLUME_KICK: u64 = 8 << 20;

/// Counts an unstable write of `len` bytes to the file `fd`, whose counter is `file`,
/// in the volume whose counter is `volume`; writes the file out when past a threshold.
pub fn wrote(volume: &AtomicU64, file: &AtomicU64, fd: RawFd, len: u64) {
    let in_file = file.fetch_add(len, Ordering::AcqRel) + len;
    let in_volume = volume.fetch_add(len, Ordering::AcqRel) + len;
    if in_file < FILE_KICK && in_volume < VOLUME_KICK {
        return;
    }
    let taken = file.swap(0, Ordering::AcqRel);
    let _ = volume.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        Some(v.saturating_sub(taken))
    });
    if let Err(e) = sys::write_back(fd) {
        tracing::debug!(errno = e.0, "sync_file_range failed; COMMIT will report it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn counts_reset_when_the_file_is_written_out() {
        let f = tempfile::tempfile().expect("file");
        let (volume, file) = (AtomicU64::new(0), AtomicU64::new(0));
        wrote(&volume, &file, f.as_raw_fd(), FILE_KICK - 1);
        assert_eq!(file.load(Ordering::Acquire), FILE_KICK - 1);
        wrote(&volume, &file, f.as_raw_fd(), 1);
        assert_eq!(file.load(Ordering::Acquire), 0);
        assert_eq!(volume.load(Ordering::Acquire), 0);
        // The volume's total alone starts the next file's write-back.
        volume.store(VOLUME_KICK, Ordering::Release);
        wrote(&volume, &file, f.as_raw_fd(), 10);
        assert_eq!(file.load(Ordering::Acquire), 0);
        assert_eq!(volume.load(Ordering::Acquire), VOLUME_KICK);
    }
}
