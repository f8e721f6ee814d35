//! Feeds arbitrary bytes to the NFS server's record handler: RPC header, credential and
//! every procedure's argument decoder, against a real volume on disk, and checks after
//! each call the limits no input may break (reply size, volume size and object count,
//! the thread's credentials).
//!
//! Run: `cargo fuzz run rpc_dispatch -- -max_total_time=60` (from the repository root).

#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use localnfs_nfs::nfs::{AllowList, Exports};
use localnfs_nfs::volume::{VolumeName, VolumeSpec, VolumeStore};

fn exports() -> &'static Exports {
    static STATE: OnceLock<(tempfile::TempDir, Exports)> = OnceLock::new();
    &STATE
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = VolumeStore::open(dir.path()).expect("store");
            let name = VolumeName::new("fuzz").expect("name");
            store
                .create(&VolumeSpec::new(name, 1 << 20))
                .expect("volume");
            let allow = AllowList::new(vec!["127.0.0.1".parse().expect("network")]);
            let exports = Exports::load(store, allow).expect("exports");
            (dir, exports)
        })
        .1
}

/// Largest reply any call may get: a 1 MiB READ or READDIR(PLUS) body (the server
/// clamps client counts to it) plus headers and attributes.
const MAX_REPLY: usize = (1 << 20) + 4096;

fuzz_target!(|data: &[u8]| {
    let ex = exports();
    let reply = localnfs_nfs::nfs::dispatch(ex, IpAddr::V4(Ipv4Addr::LOCALHOST), data);
    // The limits of issue 13 hold whatever the input: replies stay within what the
    // server admits and a record mark carries, every volume within its size and
    // object limits, and no call leaves this thread with a caller's credentials.
    if let Some(r) = reply {
        assert!(r.len() <= MAX_REPLY, "reply of {} bytes", r.len());
    }
    for v in ex.all() {
        use std::sync::atomic::Ordering::Acquire;
        assert!(v.used.load(Acquire) <= v.limit.load(Acquire), "volume over its size");
        assert!(
            v.inodes.load(Acquire) <= v.max_inodes.load(Acquire),
            "volume over its object limit"
        );
    }
    // SAFETY: setfsuid/setfsgid(-1) change nothing and return the current ids.
    let (uid, gid) = unsafe { (libc::setfsuid(u32::MAX), libc::setfsgid(u32::MAX)) };
    assert_eq!((uid, gid), (0, 0), "a call left the thread with a caller's ids");
});
