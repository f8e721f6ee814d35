//! Bounded write-back: a volume's unstable WRITEs go to the disk as they come, so a
//! COMMIT (or another volume's fsync, which on ext4 and xfs may have to wait for the
//! same journal transaction and shares the disk's queue) never finds an unbounded pile
//! of one volume's dirty data in front of it.
//!
//! Each file and each volume counts the bytes written unstable since their last
//! write-back. Past [`FILE_KICK`] for the file, or [`VOLUME_KICK`] for the whole
//! volume, the write that crossed it writes the file's dirty pages out and waits for
//! them, one file of the volume at a time. The wait happens on the writing volume's
//! own workers (at most `pool::PER_VOLUME` of them), so a flooding volume gates its
//! own writes on its write-back instead of leaving the kernel to flush a pile of it in
//! front of someone else's journal commit.
//!
//! Measured on the test machine (see `docs/nfs-server.md`): a neighbour's durable
//! calls beside a 16-client 1 MiB write flood went from 0.07–0.08× of their rate
//! alone to 0.12–0.27×. Tried and dropped: only starting write-back (4 MiB / 16 MiB,
//! no wait) let the flood dirty 160–740 MiB/s with no gain; waiting without the
//! one-at-a-time lock gave 0.08–0.35× depending on the disk's mood.
//!
//! Nothing here is needed for durability (COMMIT still fsyncs), so a failing
//! `sync_file_range` is logged and otherwise ignored: the COMMIT reports the error.

use std::os::fd::RawFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::sys;

/// Unstable bytes a file may gather before they are written out.
pub const FILE_KICK: u64 = 1 << 20;
/// Unstable bytes a volume may gather, all files together, before the next write's
/// file is written out whatever its own count.
pub const VOLUME_KICK: u64 = 8 << 20;

/// A volume's write-back state.
#[derive(Debug, Default)]
pub struct Backlog {
    /// Bytes written unstable since write-back, all files together.
    pub unkicked: AtomicU64,
    /// Held while one of the volume's files is written out: one at a time, so the
    /// volume has at most [`FILE_KICK`]-ish of its own write-back in the disk's queue
    /// and another volume's journal commit does not wait behind a dozen of them.
    writing: Mutex<()>,
}

/// Counts an unstable write of `len` bytes to the file `fd`, whose counter is `file`,
/// in the volume `backlog`; writes the file out when past a threshold.
pub fn wrote(backlog: &Backlog, file: &AtomicU64, fd: RawFd, len: u64) {
    let volume = &backlog.unkicked;
    let in_file = file.fetch_add(len, Ordering::AcqRel) + len;
    let in_volume = volume.fetch_add(len, Ordering::AcqRel) + len;
    if in_file < FILE_KICK && in_volume < VOLUME_KICK {
        return;
    }
    let taken = file.swap(0, Ordering::AcqRel);
    if in_volume >= VOLUME_KICK {
        // The volume's count starts over here rather than going down by this file's
        // share alone: files' own counts are lost when their cached object is dropped
        // (the object cache is cleared, the file removed), and what they had counted
        // would otherwise stay in the volume's total for good, sending every later
        // unstable write of the volume through a write-back and its wait.
        volume.store(0, Ordering::Release);
    } else {
        let _ = volume.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            Some(v.saturating_sub(taken))
        });
    }
    let _one = backlog.writing.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = sys::write_back(fd) {
        tracing::debug!(errno = e.0, "sync_file_range failed; COMMIT will report it");
    }
}

/// The file whose counter is `file` was just fsynced (COMMIT): nothing of it is left
/// to write out, so its bytes stop counting towards the next write-back.
pub fn synced(backlog: &Backlog, file: &AtomicU64) {
    let taken = file.swap(0, Ordering::AcqRel);
    let _ = backlog
        .unkicked
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            Some(v.saturating_sub(taken))
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn counts_reset_when_the_file_is_written_out() {
        let f = tempfile::tempfile().expect("file");
        let (backlog, file) = (Backlog::default(), AtomicU64::new(0));
        let volume = &backlog.unkicked;
        wrote(&backlog, &file, f.as_raw_fd(), FILE_KICK - 1);
        assert_eq!(file.load(Ordering::Acquire), FILE_KICK - 1);
        wrote(&backlog, &file, f.as_raw_fd(), 1);
        assert_eq!(file.load(Ordering::Acquire), 0);
        assert_eq!(volume.load(Ordering::Acquire), 0);
        // The volume's total alone starts the next file's write-back.
        volume.store(VOLUME_KICK, Ordering::Release);
        wrote(&backlog, &file, f.as_raw_fd(), 10);
        assert_eq!(file.load(Ordering::Acquire), 0);
        assert_eq!(volume.load(Ordering::Acquire), 0);
        // A COMMIT leaves nothing of the file to count.
        volume.store(0, Ordering::Release);
        wrote(&backlog, &file, f.as_raw_fd(), 100);
        assert_eq!(file.load(Ordering::Acquire), 100);
        synced(&backlog, &file);
        assert_eq!(file.load(Ordering::Acquire), 0);
        assert_eq!(volume.load(Ordering::Acquire), 0);
    }

    #[test]
    fn bytes_of_forgotten_files_do_not_keep_a_volume_writing_back() {
        let f = tempfile::tempfile().expect("file");
        let backlog = Backlog::default();
        // Files that counted 8 MiB between them and were then dropped from the object
        // cache: their own counters are gone, the volume's total is not.
        for _ in 0..8 {
            let gone = AtomicU64::new(0);
            wrote(&backlog, &gone, f.as_raw_fd(), FILE_KICK - 1);
        }
        let file = AtomicU64::new(0);
        wrote(&backlog, &file, f.as_raw_fd(), 4096);
        // That write started the volume's count over: the next small writes gather
        // again instead of each being written out and waited for.
        wrote(&backlog, &file, f.as_raw_fd(), 4096);
        assert_eq!(file.load(Ordering::Acquire), 4096);
        assert_eq!(backlog.unkicked.load(Ordering::Acquire), 4096);
    }
}
