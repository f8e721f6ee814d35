//! Bounded write-back: a volume's unstable WRITEs start their way to the disk early,
//! so a COMMIT (or another volume's fsync, which on ext4 and xfs may have to flush the
//! same journal transaction) never finds an unbounded pile of dirty data in front of
//! it.
//!
//! Each file and each volume counts the bytes written unstable since their write-back
//! was last started. Past [`FILE_KICK`] for the file, or [`VOLUME_KICK`] for the whole
//! volume, the write that crossed it asks the kernel to first wait for the file's
//! write-back started before (so a file has at most about one kick's worth under
//! write-back) and then start write-back of everything dirty in it. The wait happens on
//! the writing volume's own worker: a flooding volume slows down to its disk's speed
//! instead of queueing work in front of everyone (and `pool::PER_VOLUME` bounds how
//! many of its writes wait at once).
//!
//! Nothing here is needed for durability (COMMIT still fsyncs), so a failing
//! `sync_file_range` is logged and otherwise ignored: the COMMIT reports the error.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use super::sys;

/// Unstable bytes a file may gather before its write-back is started.
pub const FILE_KICK: u64 = 4 << 20;
/// Unstable bytes a volume may gather, all files together, before the next write's
/// file is pushed out whatever its own count.
pub const VOLUME_KICK: u64 = 16 << 20;

/// Counts an unstable write of `len` bytes to the file `fd`, whose counter is `file`,
/// in the volume whose counter is `volume`; starts write-back when past a threshold.
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
    if let Err(e) = sys::start_writeback(fd) {
        tracing::debug!(errno = e.0, "sync_file_range failed; COMMIT will report it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn counts_reset_when_write_back_starts() {
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
