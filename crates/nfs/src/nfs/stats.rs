//! What the NFS server counts on every call: per procedure (calls, latency, errors by
//! status) and per volume (calls by procedure, bytes read and written, latency, errors
//! by status). The hot path only adds to atomics that exist before the first call
//! (relaxed, no lock, no allocation): the server's per-request latency is what it is
//! judged by. `metrics` reads these at scrape time.
//!
//! Label sets are fixed: procedures of NFSv3 and MOUNT v3 plus `other`, and the status
//! names below (every `nfsstat3` of RFC 1813 §2.6, the RPC-level refusals of RFC 5531
//! §9, and `other` for a code outside those).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::program::{MOUNT_PROGRAM, NFS_PROGRAM, VERSION, mount3, nfs3};

/// Calls are counted in one of these slots: NFS procedures, MOUNT procedures, then one
/// for everything else (other programs, versions, procedure numbers, undecodable calls).
/// Their label values are the procedure table's names (`table::slot_labels`).
pub const SLOTS: usize = nfs3::COUNT + mount3::COUNT + 1;
pub const OTHER_SLOT: usize = SLOTS - 1;
/// Where MOUNT's slots start.
pub const MOUNT_SLOTS: usize = nfs3::COUNT;
pub const READ_SLOT: usize = nfs3::READ as usize;
pub const WRITE_SLOT: usize = nfs3::WRITE as usize;

/// The slot of a call to `procedure` of `prog` version `vers`.
pub fn slot(prog: u32, vers: u32, procedure: u32) -> usize {
    let p = procedure as usize;
    match (prog, vers) {
        (NFS_PROGRAM, VERSION) if p < nfs3::COUNT => p,
        (MOUNT_PROGRAM, VERSION) if p < mount3::COUNT => MOUNT_SLOTS + p,
        _ => OTHER_SLOT,
    }
}

/// The slot of the call in `record`, from its header words alone (for replies built
/// without decoding the call).
pub fn slot_of_record(record: &[u8]) -> usize {
    let word = |i: usize| {
        record
            .get(4 * i..4 * i + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    match (word(3), word(4), word(5)) {
        (Some(prog), Some(vers), Some(procedure)) => slot(prog, vers, procedure),
        _ => OTHER_SLOT,
    }
}

/// Whether the results of a call in `slot` start with a status word: every NFS
/// procedure but NULL, and MNT (whose `mountstat3` codes are `nfsstat3` codes).
fn has_status(slot: usize) -> bool {
    (nfs3::NULL as usize + 1..nfs3::COUNT).contains(&slot)
        || slot == MOUNT_SLOTS + mount3::MNT as usize
}

/// Status label values; index 0 is success (not an error).
pub const STATUSES: [&str; 36] = [
    "OK",
    "NFS3ERR_PERM",
    "NFS3ERR_NOENT",
    "NFS3ERR_IO",
    "NFS3ERR_NXIO",
    "NFS3ERR_ACCES",
    "NFS3ERR_EXIST",
    "NFS3ERR_XDEV",
    "NFS3ERR_NODEV",
    "NFS3ERR_NOTDIR",
    "NFS3ERR_ISDIR",
    "NFS3ERR_INVAL",
    "NFS3ERR_FBIG",
    "NFS3ERR_NOSPC",
    "NFS3ERR_ROFS",
    "NFS3ERR_MLINK",
    "NFS3ERR_NAMETOOLONG",
    "NFS3ERR_NOTEMPTY",
    "NFS3ERR_DQUOT",
    "NFS3ERR_STALE",
    "NFS3ERR_REMOTE",
    "NFS3ERR_BADHANDLE",
    "NFS3ERR_NOT_SYNC",
    "NFS3ERR_BAD_COOKIE",
    "NFS3ERR_NOTSUPP",
    "NFS3ERR_TOOSMALL",
    "NFS3ERR_SERVERFAULT",
    "NFS3ERR_BADTYPE",
    "NFS3ERR_JUKEBOX",
    "RPC_PROG_UNAVAIL",
    "RPC_PROG_MISMATCH",
    "RPC_PROC_UNAVAIL",
    "RPC_GARBAGE_ARGS",
    "RPC_SYSTEM_ERR",
    "RPC_DENIED",
    "other",
];
const STATUS_OTHER: usize = STATUSES.len() - 1;

/// The [`STATUSES`] index of an `nfsstat3` (or `mountstat3`) code.
fn nfs_status(code: u32) -> usize {
    match code {
        0 => 0,
        1 => 1,
        2 => 2,
        5 => 3,
        6 => 4,
        13 => 5,
        17 => 6,
        18 => 7,
        19 => 8,
        20 => 9,
        21 => 10,
        22 => 11,
        27 => 12,
        28 => 13,
        30 => 14,
        31 => 15,
        63 => 16,
        66 => 17,
        69 => 18,
        70 => 19,
        71 => 20,
        10001..=10008 => 21 + (code - 10001) as usize,
        _ => STATUS_OTHER,
    }
}

/// Where a reply's words sit after the record mark (RFC 5531 §9): xid, REPLY,
/// reply_stat, then (accepted) an empty verifier's flavor and length, accept_stat, and
/// the procedure's results.
const REPLY_STAT: usize = 12;
const ACCEPT_STAT: usize = 24;
pub const RESULTS: usize = 28;

/// The [`STATUSES`] index of what `reply` (a framed reply as `rpc` builds it) says
/// about a call in `slot`.
pub fn outcome(slot: usize, reply: &[u8]) -> usize {
    let word = |at: usize| {
        reply
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    match word(REPLY_STAT) {
        Some(0) => {}
        Some(_) => return STATUSES.len() - 2, // MSG_DENIED: RPC version or auth
        None => return STATUS_OTHER,
    }
    match word(ACCEPT_STAT) {
        Some(0) if has_status(slot) => word(RESULTS).map_or(STATUS_OTHER, nfs_status),
        Some(0) => 0,
        Some(s @ 1..=5) => 28 + s as usize,
        _ => STATUS_OTHER,
    }
}

/// Upper bounds of the latency buckets, in nanoseconds: 5 µs to 10 s.
pub const BUCKETS_NS: [u64; 20] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A latency histogram of atomics: one count per bucket (the last past every bound),
/// and the sum.
#[derive(Debug, Default)]
pub struct Latency {
    buckets: [AtomicU64; BUCKETS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl Latency {
    pub fn observe(&self, ns: u64) {
        let i = BUCKETS_NS.partition_point(|b| *b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts in the order of [`BUCKETS_NS`] then
    /// +Inf). Buckets are read one by one while calls go on: the count is their sum,
    /// so it always matches them.
    pub fn snapshot(&self) -> (f64, u64, [u64; BUCKETS_NS.len() + 1]) {
        let buckets = std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, buckets.iter().sum(), buckets)
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// Server-wide counts per procedure slot.
#[derive(Debug)]
pub struct ServerStats {
    pub latency: [Latency; SLOTS],
    pub errors: [[AtomicU64; STATUSES.len()]; SLOTS],
}

impl Default for ServerStats {
    fn default() -> Self {
        Self {
            latency: std::array::from_fn(|_| Latency::default()),
            errors: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }
}

/// Counts of one volume.
#[derive(Debug)]
pub struct VolumeStats {
    pub calls: [AtomicU64; SLOTS],
    pub errors: [AtomicU64; STATUSES.len()],
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub latency: Latency,
}

impl Default for VolumeStats {
    fn default() -> Self {
        Self {
            calls: std::array::from_fn(|_| AtomicU64::new(0)),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            read_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            latency: Latency::default(),
        }
    }
}

/// One finished call.
pub struct Call<'a> {
    pub slot: usize,
    /// A [`STATUSES`] index.
    pub status: usize,
    pub took: Duration,
    /// The volume whose handle it used, if any.
    pub volume: Option<&'a VolumeStats>,
    /// Data bytes a READ returned or a WRITE wrote.
    pub bytes: u64,
}

impl ServerStats {
    pub fn record(&self, call: &Call) {
        let ns = u64::try_from(call.took.as_nanos()).unwrap_or(u64::MAX);
        self.latency[call.slot].observe(ns);
        if call.status != 0 {
            self.errors[call.slot][call.status].fetch_add(1, Ordering::Relaxed);
        }
        let Some(v) = call.volume else {
            return;
        };
        v.calls[call.slot].fetch_add(1, Ordering::Relaxed);
        v.latency.observe(ns);
        if call.status != 0 {
            v.errors[call.status].fetch_add(1, Ordering::Relaxed);
        } else if call.slot == READ_SLOT {
            v.read_bytes.fetch_add(call.bytes, Ordering::Relaxed);
        } else if call.slot == WRITE_SLOT {
            v.written_bytes.fetch_add(call.bytes, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfs::rpc::{self, AcceptStat, AuthStat};
    use crate::nfs::xdr::put_u32;

    fn reply(stat: AcceptStat, results: &[u32]) -> Vec<u8> {
        let mut r = rpc::accepted(7, stat);
        for w in results {
            put_u32(&mut r, *w);
        }
        r
    }

    #[test]
    fn replies_are_read_as_the_status_the_client_sees() {
        let getattr = slot(NFS_PROGRAM, 3, 1);
        let null = slot(NFS_PROGRAM, 3, 0);
        let mnt = slot(MOUNT_PROGRAM, 3, 1);
        let dump = slot(MOUNT_PROGRAM, 3, 2);
        let name = |slot, r: &[u8]| STATUSES[outcome(slot, r)];
        let cases = [
            (
                "GETATTR ok",
                getattr,
                reply(AcceptStat::Success, &[0, 1]),
                "OK",
            ),
            (
                "GETATTR stale",
                getattr,
                reply(AcceptStat::Success, &[70]),
                "NFS3ERR_STALE",
            ),
            (
                "LOOKUP noent",
                slot(NFS_PROGRAM, 3, 3),
                reply(AcceptStat::Success, &[2]),
                "NFS3ERR_NOENT",
            ),
            (
                "WRITE dquot",
                slot(NFS_PROGRAM, 3, 7),
                reply(AcceptStat::Success, &[69]),
                "NFS3ERR_DQUOT",
            ),
            (
                "jukebox",
                getattr,
                reply(AcceptStat::Success, &[10008]),
                "NFS3ERR_JUKEBOX",
            ),
            (
                "badhandle",
                getattr,
                reply(AcceptStat::Success, &[10001]),
                "NFS3ERR_BADHANDLE",
            ),
            (
                "unknown code",
                getattr,
                reply(AcceptStat::Success, &[12345]),
                "other",
            ),
            (
                "NULL has no status",
                null,
                reply(AcceptStat::Success, &[]),
                "OK",
            ),
            (
                "MNT refused",
                mnt,
                reply(AcceptStat::Success, &[13]),
                "NFS3ERR_ACCES",
            ),
            ("DUMP list", dump, reply(AcceptStat::Success, &[1]), "OK"),
            (
                "garbage",
                getattr,
                reply(AcceptStat::GarbageArgs, &[]),
                "RPC_GARBAGE_ARGS",
            ),
            (
                "no such procedure",
                OTHER_SLOT,
                reply(AcceptStat::ProcUnavail, &[]),
                "RPC_PROC_UNAVAIL",
            ),
            (
                "no such program",
                OTHER_SLOT,
                reply(AcceptStat::ProgUnavail, &[]),
                "RPC_PROG_UNAVAIL",
            ),
            (
                "wrong version",
                OTHER_SLOT,
                rpc::prog_mismatch(7, 3, 3),
                "RPC_PROG_MISMATCH",
            ),
            (
                "auth refused",
                getattr,
                rpc::denied_auth(7, AuthStat::TooWeak),
                "RPC_DENIED",
            ),
            ("cut short", getattr, vec![0; 10], "other"),
        ];
        for (what, slot, r, want) in cases {
            assert_eq!(name(slot, &r), want, "{what}");
        }
        assert_eq!(rpc::accepted(1, AcceptStat::Success).len(), RESULTS);
    }

    #[test]
    fn every_procedure_has_its_own_slot() {
        assert_eq!(slot(NFS_PROGRAM, 3, nfs3::GETATTR), nfs3::GETATTR as usize);
        assert_eq!(slot(MOUNT_PROGRAM, 3, mount3::MNT), MOUNT_SLOTS + 1);
        assert_eq!(slot(MOUNT_PROGRAM, 3, mount3::EXPORT), SLOTS - 2);
        for other in [(NFS_PROGRAM, 3, 22), (NFS_PROGRAM, 4, 1), (100_000, 2, 3)] {
            assert_eq!(slot(other.0, other.1, other.2), OTHER_SLOT);
        }
        assert_eq!(slot(NFS_PROGRAM, 3, nfs3::READ), READ_SLOT);
        assert_eq!(slot(NFS_PROGRAM, 3, nfs3::WRITE), WRITE_SLOT);
        let mut record = Vec::new();
        for w in [1, 0, 2, MOUNT_PROGRAM, 3, mount3::MNT] {
            put_u32(&mut record, w);
        }
        assert_eq!(slot_of_record(&record), MOUNT_SLOTS + 1);
        assert_eq!(slot_of_record(&record[..8]), OTHER_SLOT);
        let names: std::collections::HashSet<_> = STATUSES.iter().collect();
        assert_eq!(names.len(), STATUSES.len(), "status labels are distinct");
        for code in 10001..=10008 {
            assert!(STATUSES[nfs_status(code)].starts_with("NFS3ERR_"));
        }
    }

    #[test]
    fn latency_lands_in_the_first_bucket_at_or_above_it() {
        let h = Latency::default();
        for ns in [1, 5_000, 5_001, 2_000_000_000, 60_000_000_000] {
            h.observe(ns);
        }
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 5);
        assert_eq!(buckets[0], 2, "1 ns and exactly 5 µs are <= 5 µs");
        assert_eq!(buckets[1], 1, "5.001 µs is in the 10 µs bucket");
        assert_eq!(buckets[17], 1, "2 s is in the 2.5 s bucket");
        assert_eq!(buckets[20], 1, "a minute is past every bound");
        assert!((sum - 62.000_010_002).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn a_call_counts_for_its_procedure_and_its_volume() {
        let s = ServerStats::default();
        let v = VolumeStats::default();
        let call = |slot, status, bytes| Call {
            slot,
            status,
            took: Duration::from_micros(30),
            volume: Some(&v),
            bytes,
        };
        s.record(&call(READ_SLOT, 0, 4096));
        s.record(&call(WRITE_SLOT, 0, 100));
        s.record(&call(WRITE_SLOT, 18, 100)); // DQUOT: nothing written
        s.record(&Call {
            volume: None,
            ..call(1, 19, 0)
        });
        assert_eq!(v.read_bytes.load(Ordering::Relaxed), 4096);
        assert_eq!(v.written_bytes.load(Ordering::Relaxed), 100);
        assert_eq!(v.calls[WRITE_SLOT].load(Ordering::Relaxed), 2);
        assert_eq!(v.errors[18].load(Ordering::Relaxed), 1);
        assert_eq!(v.latency.count(), 3);
        assert_eq!(s.latency[WRITE_SLOT].count(), 2);
        assert_eq!(s.latency[1].count(), 1);
        assert_eq!(s.errors[1][19].load(Ordering::Relaxed), 1);
        assert_eq!(s.errors[WRITE_SLOT][18].load(Ordering::Relaxed), 1);
    }
}
