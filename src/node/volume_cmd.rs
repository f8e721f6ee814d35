//! `localnfs volume`: create, resize, delete and list volumes in a node root directly
//! on disk (standalone mode and benchmarks). A running node agent picks changes up
//! within a second.

use crate::cli::{VolumeArgs, VolumeCommand};
use crate::error::Result;
use crate::volume::{VolumeSpec, VolumeStore};

pub fn run(args: VolumeArgs) -> Result<()> {
    let store = VolumeStore::open(&args.root)?;
    match args.command {
        VolumeCommand::Create(c) => {
            let mut spec = VolumeSpec {
                uid: c.uid,
                gid: c.gid,
                mode: c.mode,
                squash: c.squash,
                anon_uid: c.anon_uid,
                anon_gid: c.anon_gid,
                max_files: c.max_files,
                // Parameters the command line has no flag for keep their defaults.
                ..VolumeSpec::new(c.name, c.size)
            };
            for (key, value) in &c.params {
                // The command line's parser ran this same call on each pair (its
                // outcome does not depend on the other fields), so it cannot fail here.
                let _checked = spec.set_param(key, value);
            }
            let meta = store.create(&spec)?;
            println!(
                "volume {} (id {}) size {} bytes",
                meta.name, meta.id, meta.size_bytes
            );
        }
        VolumeCommand::Resize { name, size } => {
            let meta = store.resize(&name, size)?;
            println!("volume {} size {} bytes", meta.name, meta.size_bytes);
        }
        VolumeCommand::Delete { name } => {
            store.delete(&name)?;
            println!("volume {name} deleted");
        }
        VolumeCommand::List => {
            println!(
                "{:<40} {:>6} {:>14} {:>14} {:>6}",
                "NAME", "ID", "SIZE", "USED", "SQUASH"
            );
            for m in store.list()? {
                let used = store.usage(&m.name)?.bytes;
                println!(
                    "{:<40} {:>6} {:>14} {:>14} {:>6}",
                    m.name,
                    m.id,
                    m.size_bytes,
                    used,
                    format!("{:?}", m.squash).to_lowercase()
                );
            }
        }
    }
    Ok(())
}
