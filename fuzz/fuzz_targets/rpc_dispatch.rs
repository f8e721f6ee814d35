//! Feeds arbitrary bytes to the NFS server's record handler: RPC header, credential and
//! every procedure's argument decoder, against a real volume on disk.
//!
//! Run: `cargo fuzz run rpc_dispatch -- -max_total_time=60` (from the repository root).

#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use localnfs::nfs::{AllowList, Exports};
use localnfs::volume::{VolumeName, VolumeSpec, VolumeStore};

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

fuzz_target!(|data: &[u8]| {
    let ex = exports();
    let _ = localnfs::nfs::dispatch(ex, IpAddr::V4(Ipv4Addr::LOCALHOST), data);
});
