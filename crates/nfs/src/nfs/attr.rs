//! Pure translations: `stat` → NFS attributes, caller identity after squashing, and
//! ACCESS answers from mode bits. No I/O here, so each has table tests.

use nfs3_types::nfs3::{
    ACCESS3_DELETE, ACCESS3_EXECUTE, ACCESS3_EXTEND, ACCESS3_LOOKUP, ACCESS3_MODIFY, ACCESS3_READ,
    fattr3, ftype3, nfstime3, specdata3, wcc_attr,
};

use super::rpc::Credential;
use super::sys::IdMaps;
use crate::volume::Squash;

/// The identity a request runs as, after the volume's squash policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub gids: Vec<u32>,
}

/// Applies the volume's squash policy to the RPC credential.
///
/// Root squash maps uid 0 to the anonymous identity (no groups) and, for other callers,
/// gid 0 and supplementary group 0 to the anonymous gid, as knfsd does: group 0 owns
/// files that only root should reach. Ids the kernel cannot switch this process to
/// (`ids`) are squashed to the anonymous ones: a switch to them would fail and leave
/// the call running with the agent's own rights.
pub fn effective_caller(
    cred: &Credential,
    squash: Squash,
    anon_uid: u32,
    anon_gid: u32,
    ids: &IdMaps,
) -> Caller {
    let anon = Caller {
        uid: anon_uid,
        gid: anon_gid,
        gids: Vec::new(),
    };
    let (uid, gid, gids) = match (cred, squash) {
        (Credential::None, _) | (_, Squash::All) => return anon,
        (Credential::Sys { uid: 0, .. }, Squash::Root) => return anon,
        (Credential::Sys { uid, gid, gids }, _) => (*uid, *gid, gids),
    };
    let root_squash = squash == Squash::Root;
    let map_gid = |g: u32| {
        if (root_squash && g == 0) || !ids.valid_gid(g) {
            anon_gid
        } else {
            g
        }
    };
    Caller {
        uid: if ids.valid_uid(uid) { uid } else { anon_uid },
        gid: map_gid(gid),
        gids: gids.iter().map(|&g| map_gid(g)).collect(),
    }
}

fn time(sec: i64, nsec: i64) -> nfstime3 {
    nfstime3 {
        seconds: u32::try_from(sec).unwrap_or(0),
        nseconds: u32::try_from(nsec).unwrap_or(0),
    }
}

/// NFS file type of a `st_mode`.
pub fn file_type(mode: u32) -> ftype3 {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => ftype3::NF3DIR,
        libc::S_IFLNK => ftype3::NF3LNK,
        libc::S_IFBLK => ftype3::NF3BLK,
        libc::S_IFCHR => ftype3::NF3CHR,
        libc::S_IFSOCK => ftype3::NF3SOCK,
        libc::S_IFIFO => ftype3::NF3FIFO,
        _ => ftype3::NF3REG,
    }
}

/// `fattr3` for a stat result; `fsid` is the volume id so each volume is its own
/// filesystem to the client.
pub fn fattr(st: &libc::stat, fsid: u32) -> fattr3 {
    fattr3 {
        type_: file_type(st.st_mode),
        mode: st.st_mode & 0o7777,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        used: (st.st_blocks as u64).saturating_mul(512),
        rdev: specdata3 {
            specdata1: libc::major(st.st_rdev),
            specdata2: libc::minor(st.st_rdev),
        },
        fsid: u64::from(fsid),
        fileid: st.st_ino,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
    }
}

/// Weak cache consistency attributes (RFC 1813 §2.6, `wcc_attr`).
pub fn wcc(st: &libc::stat) -> wcc_attr {
    wcc_attr {
        size: st.st_size as u64,
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
    }
}

/// The subset of `requested` ACCESS bits the caller has on an object with this mode
/// and owner (RFC 1813 §3.3.4). Root may do everything except execute a file with no
/// execute bit at all, as on a local filesystem.
pub fn access(mode: u32, owner: u32, group: u32, caller: &Caller, requested: u32) -> u32 {
    let is_dir = mode & libc::S_IFMT == libc::S_IFDIR;
    let perms = if caller.uid == 0 {
        let any_x = if mode & 0o111 != 0 || is_dir { 1 } else { 0 };
        0o6 | any_x
    } else if caller.uid == owner {
        (mode >> 6) & 7
    } else if caller.gid == group || caller.gids.contains(&group) {
        (mode >> 3) & 7
    } else {
        mode & 7
    };
    let (r, w, x) = (perms & 4 != 0, perms & 2 != 0, perms & 1 != 0);
    let mut granted = 0;
    if r {
        granted |= ACCESS3_READ;
    }
    if w {
        granted |= ACCESS3_MODIFY | ACCESS3_EXTEND;
        if is_dir {
            granted |= ACCESS3_DELETE;
        }
    }
    if x {
        granted |= if is_dir {
            ACCESS3_LOOKUP
        } else {
            ACCESS3_EXECUTE
        };
    }
    granted & requested
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfs::rpc::Credential;

    const ALL: u32 = 0x3f;

    fn caller(uid: u32, gid: u32, gids: &[u32]) -> Caller {
        Caller {
            uid,
            gid,
            gids: gids.to_vec(),
        }
    }

    #[test]
    fn access_follows_owner_group_other_bits() {
        let file = libc::S_IFREG | 0o640;
        let owner = caller(999, 1, &[]);
        let grp = caller(5, 50, &[]);
        let supp = caller(5, 1, &[50]);
        let other = caller(5, 1, &[]);
        let rw = ACCESS3_READ | ACCESS3_MODIFY | ACCESS3_EXTEND;
        let cases = [
            (&owner, rw),
            (&grp, ACCESS3_READ),
            (&supp, ACCESS3_READ),
            (&other, 0),
        ];
        for (who, want) in cases {
            assert_eq!(access(file, 999, 50, who, ALL), want, "{who:?}");
        }
    }

    #[test]
    fn directories_grant_lookup_and_delete_not_execute() {
        let dir = libc::S_IFDIR | 0o755;
        let owner = caller(7, 7, &[]);
        let got = access(dir, 7, 7, &owner, ALL);
        assert_eq!(
            got,
            ACCESS3_READ | ACCESS3_MODIFY | ACCESS3_EXTEND | ACCESS3_DELETE | ACCESS3_LOOKUP
        );
        assert_eq!(
            access(dir, 7, 7, &caller(8, 8, &[]), ALL),
            ACCESS3_READ | ACCESS3_LOOKUP
        );
    }

    #[test]
    fn root_cannot_execute_a_file_without_any_execute_bit() {
        let root = caller(0, 0, &[]);
        assert_eq!(
            access(libc::S_IFREG | 0o644, 1, 1, &root, ACCESS3_EXECUTE),
            0
        );
        assert_eq!(
            access(libc::S_IFREG | 0o744, 1, 1, &root, ACCESS3_EXECUTE),
            ACCESS3_EXECUTE
        );
    }

    #[test]
    fn only_requested_bits_are_answered() {
        let owner = caller(1, 1, &[]);
        assert_eq!(
            access(libc::S_IFREG | 0o600, 1, 1, &owner, ACCESS3_READ),
            ACCESS3_READ
        );
    }

    /// The map outside a user namespace: everything but `u32::MAX`.
    fn host_ids() -> IdMaps {
        IdMaps::parse("0 0 4294967295\n", "0 0 4294967295\n")
    }

    fn sys(uid: u32, gid: u32, gids: &[u32]) -> Credential {
        Credential::Sys {
            uid,
            gid,
            gids: gids.to_vec(),
        }
    }

    #[test]
    fn squash_policies_map_callers() {
        let root = sys(0, 0, &[1]);
        let user = sys(999, 999, &[]);
        let anon = caller(100, 101, &[]);
        let cases = [
            (&root, Squash::None, caller(0, 0, &[1])),
            (&root, Squash::Root, anon.clone()),
            (&user, Squash::Root, caller(999, 999, &[])),
            (&user, Squash::All, anon.clone()),
            (&Credential::None, Squash::None, anon.clone()),
        ];
        for (cred, squash, want) in cases {
            assert_eq!(
                effective_caller(cred, squash, 100, 101, &host_ids()),
                want,
                "{cred:?} {squash:?}"
            );
        }
    }

    #[test]
    fn root_squash_also_squashes_group_zero() {
        let got = effective_caller(&sys(5, 0, &[0, 7]), Squash::Root, 100, 101, &host_ids());
        assert_eq!(got, caller(5, 101, &[101, 7]));
        // Without squashing, group 0 is the caller's to claim.
        let got = effective_caller(&sys(5, 0, &[0]), Squash::None, 100, 101, &host_ids());
        assert_eq!(got, caller(5, 0, &[0]));
    }

    #[test]
    fn ids_the_kernel_cannot_switch_to_become_anonymous() {
        let max = u32::MAX;
        for squash in [Squash::None, Squash::Root] {
            let got = effective_caller(&sys(max, max, &[max, 3]), squash, 100, 101, &host_ids());
            assert_eq!(got, caller(100, 101, &[101, 3]), "{squash:?}");
        }
        // In a user namespace that maps only 0..65536, 70000 cannot be switched to.
        let ns = IdMaps::parse("0 100000 65536\n", "0 100000 65536\n");
        let got = effective_caller(&sys(70000, 70000, &[]), Squash::None, 100, 101, &ns);
        assert_eq!(got, caller(100, 101, &[]));
        assert!(ns.valid_uid(65535) && !ns.valid_uid(65536));
    }
}
