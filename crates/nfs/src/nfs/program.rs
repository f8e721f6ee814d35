//! The RPC programs this server answers and their procedure numbers (RFC 1813 §3 for
//! NFSv3, appendix I for MOUNT v3), named once: the procedure table (`table`), the
//! call counters (`stats`) and the tests all say `nfs3::READ`, never `6`. A leaf: it
//! imports nothing, so anything may use it.

pub const NFS_PROGRAM: u32 = 100_003;
pub const MOUNT_PROGRAM: u32 = 100_005;
/// Procedure 0 of every RPC program: NULL, which does nothing (RFC 5531 §12.1).
pub const NULL: u32 = 0;
/// The one version of each program served.
pub const VERSION: u32 = 3;

/// NFSv3 procedure numbers (RFC 1813 §3).
pub mod nfs3 {
    pub const NULL: u32 = 0;
    pub const GETATTR: u32 = 1;
    pub const SETATTR: u32 = 2;
    pub const LOOKUP: u32 = 3;
    pub const ACCESS: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const READ: u32 = 6;
    pub const WRITE: u32 = 7;
    pub const CREATE: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const SYMLINK: u32 = 10;
    pub const MKNOD: u32 = 11;
    pub const REMOVE: u32 = 12;
    pub const RMDIR: u32 = 13;
    pub const RENAME: u32 = 14;
    pub const LINK: u32 = 15;
    pub const READDIR: u32 = 16;
    pub const READDIRPLUS: u32 = 17;
    pub const FSSTAT: u32 = 18;
    pub const FSINFO: u32 = 19;
    pub const PATHCONF: u32 = 20;
    pub const COMMIT: u32 = 21;
    /// How many there are: numbers run from 0 to `COUNT - 1`.
    pub const COUNT: usize = 22;
}

/// MOUNT v3 procedure numbers (RFC 1813 appendix I).
pub mod mount3 {
    pub const NULL: u32 = 0;
    pub const MNT: u32 = 1;
    pub const DUMP: u32 = 2;
    pub const UMNT: u32 = 3;
    pub const UMNTALL: u32 = 4;
    pub const EXPORT: u32 = 5;
    /// How many there are: numbers run from 0 to `COUNT - 1`.
    pub const COUNT: usize = 6;
}
