//! MOUNT v3 (RFC 1813 appendix I) on the NFS port: MNT hands out a volume's root
//! handle for the exact path `/<volume>` to a client the volume's access rule admits
//! (`access`), and records the mount; UMNT/UMNTALL remove the caller's own entries from
//! that record and nothing else (access never depended on it). DUMP and EXPORT show a
//! client only its own mounts and the volumes it may mount: the list of every volume
//! and every client address on a node is nobody else's business. Each returns a typed
//! answer (`reply::Mnt`, `reply::List`) that `reply` turns into bytes.

use nfs3_types::mount::mountstat3;

use super::ops::Ctx;
use super::reply::{ExportEntry, List, Mnt, MountEntry};
use super::rpc::AUTH_SYS;
use super::xdr::{Garbage, XdrIn};
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

pub fn mnt(ctx: &Ctx, args: &mut XdrIn) -> Result<Mnt, Garbage> {
    let path = args.opaque(MNTPATHLEN)?;
    let volume = volume_for_path(path).and_then(|n| {
        ctx.ex.by_name(&n).or_else(|| {
            // Created since the last refresh? Look again before saying no.
            let _ = ctx.ex.refresh();
            ctx.ex.by_name(&n)
        })
    });
    if let Some(v) = &volume {
        ctx.counts_for(v);
    }
    Ok(match volume {
        // Not admitted: the same answer as knfsd's for a host outside the export's
        // client list (RFC 1813 appendix I, MNT3ERR_ACCES).
        Some(v) if !ctx.ex.access.allows(ctx.client, &v.meta.name) => {
            tracing::warn!(client = %ctx.client, volume = %v.meta.name, "mount refused: client not granted this volume");
            Mnt::Refused(mountstat3::MNT3ERR_ACCES)
        }
        Some(v) => {
            ctx.ex.mounts.add(ctx.client, &v.meta.name);
            tracing::info!(client = %ctx.client, volume = %v.meta.name, "mounted");
            Mnt::Ok {
                fh: v.root_fh.clone(),
                flavor: AUTH_SYS,
            }
        }
        None => Mnt::Refused(mountstat3::MNT3ERR_NOENT),
    })
}

pub fn umnt(ctx: &Ctx, args: &mut XdrIn) -> Result<(), Garbage> {
    let path = args.opaque(MNTPATHLEN)?;
    if let Some(name) = volume_for_path(path) {
        ctx.ex.mounts.remove(ctx.client, Some(&name));
    }
    Ok(())
}

pub fn umntall(ctx: &Ctx, _args: &mut XdrIn) -> Result<(), Garbage> {
    ctx.ex.mounts.remove(ctx.client, None);
    Ok(())
}

/// The caller's own mount entries (RFC 1813 appendix I, MOUNTPROC3_DUMP lists "the
/// remotely mounted file systems"; which other hosts mount what is not the caller's
/// to see).
pub fn dump(ctx: &Ctx, _args: &mut XdrIn) -> Result<List<MountEntry>, Garbage> {
    let host = ctx.client.to_string();
    let entries = ctx
        .ex
        .mounts
        .of(ctx.client)
        .into_iter()
        .map(|name| MountEntry {
            host: host.clone(),
            dir: format!("/{name}"),
        });
    Ok(List(entries.collect()))
}

/// The volumes the caller may mount (`showmount -e` from that address).
pub fn export(ctx: &Ctx, _args: &mut XdrIn) -> Result<List<ExportEntry>, Garbage> {
    let allowed = ctx
        .ex
        .all()
        .into_iter()
        .filter(|v| ctx.ex.access.allows(ctx.client, &v.meta.name));
    Ok(List(
        allowed
            .map(|v| ExportEntry(format!("/{}", v.meta.name)))
            .collect(),
    ))
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
