//! MOUNT v3 (RFC 1813 appendix I) on the NFS port: MNT hands out a volume's root
//! handle for the exact path `/<volume>` and records the mount; UMNT/UMNTALL forget it;
//! DUMP and EXPORT list mounts and volumes.

use nfs3_types::mount::mountstat3;

use super::ops::{Ctx, ProcResult};
use super::rpc::AUTH_SYS;
use super::xdr::{XdrIn, put_bool, put_opaque, put_u32};
use crate::volume::VolumeName;

/// MOUNT's dirpath limit (MNTPATHLEN).
const MNTPATHLEN: usize = 1024;

/// The volume a mount path names: exactly `/<name>` (one trailing slash tolerated).
/// Sub-directories, `/`, and anything else are not mountable.
pub fn volume_for_path(path: &[u8]) -> Option<VolumeName> {
    let s = std::str::from_utf8(path).ok()?;
    let s = s.strip_prefix('/')?;
    let s = s.strip_suffix('/').unwrap_or(s);
    VolumeName::new(s).ok()
}

pub fn mnt(ctx: &Ctx, args: &mut XdrIn, out: &mut Vec<u8>) -> ProcResult {
    let path = args.opaque(MNTPATHLEN)?;
    let volume = volume_for_path(path).and_then(|n| {
        ctx.ex.by_name(&n).or_else(|| {
            // Created since the last refresh? Look again before saying no.
            let _ = ctx.ex.refresh();
            ctx.ex.by_name(&n)
        })
    });
    match volume {
        Some(v) => {
            ctx.ex.add_mount(ctx.client, &v.meta.name);
            tracing::info!(client = %ctx.client, volume = %v.meta.name, "mounted");
            put_u32(out, mountstat3::MNT3_OK as u32);
            put_opaque(out, &v.root_fh);
            put_u32(out, 1);
            put_u32(out, AUTH_SYS);
        }
        None => put_u32(out, mountstat3::MNT3ERR_NOENT as u32),
    }
    Ok(())
}

pub fn umnt(ctx: &Ctx, args: &mut XdrIn, _out: &mut Vec<u8>) -> ProcResult {
    let path = args.opaque(MNTPATHLEN)?;
    if let Some(name) = volume_for_path(path) {
        ctx.ex.remove_mount(ctx.client, Some(&name));
    }
    Ok(())
}

pub fn umntall(ctx: &Ctx, _args: &mut XdrIn, _out: &mut Vec<u8>) -> ProcResult {
    ctx.ex.remove_mount(ctx.client, None);
    Ok(())
}

pub fn dump(ctx: &Ctx, _args: &mut XdrIn, out: &mut Vec<u8>) -> ProcResult {
    for (ip, name) in ctx.ex.mounts() {
        put_bool(out, true);
        put_opaque(out, ip.to_string().as_bytes());
        put_opaque(out, format!("/{name}").as_bytes());
    }
    put_bool(out, false);
    Ok(())
}

pub fn export(ctx: &Ctx, _args: &mut XdrIn, out: &mut Vec<u8>) -> ProcResult {
    for v in ctx.ex.all() {
        put_bool(out, true);
        put_opaque(out, format!("/{}", v.meta.name).as_bytes());
        put_bool(out, false); // no group list: access is by the server's allow-list
    }
    put_bool(out, false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::volume_for_path;

    #[test]
    fn only_a_volume_root_path_is_mountable() {
        assert_eq!(
            volume_for_path(b"/db-0").map(|n| n.to_string()),
            Some("db-0".into())
        );
        assert!(volume_for_path(b"/db-0/").is_some());
        for bad in [
            &b"/"[..],
            b"",
            b"db-0",
            b"/db-0/sub",
            b"/../etc",
            b"/db-0/..",
            b"//db-0",
        ] {
            assert!(
                volume_for_path(bad).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
