//! The backup targets an operator gives a node agent (`--backup-target NAME=DIR`,
//! repeatable; env `LOCALNFS_BACKUP_TARGETS=name=/dir,other=/dir2`): a VolumeBackup
//! names a target by NAME only, so a tenant chooses among the directories the operator
//! mounted into the agent, never a path. Names are DNS labels (what a tenant types);
//! DIR must be absolute. A name given twice is an error at start, not a silent choice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One `NAME=DIR` flag value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupTarget {
    pub name: String,
    pub dir: PathBuf,
}

/// Parses `NAME=DIR` (clap value parser).
pub fn parse_target(s: &str) -> Result<BackupTarget, String> {
    let (name, dir) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not NAME=DIR"))?;
    let label = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !label {
        return Err(format!(
            "backup target name `{name}`: lowercase letters, digits and `-` only (at most 63)"
        ));
    }
    let dir = PathBuf::from(dir);
    if !dir.is_absolute() {
        return Err(format!(
            "backup target `{name}`: `{}` is not an absolute path",
            dir.display()
        ));
    }
    Ok(BackupTarget {
        name: name.to_owned(),
        dir,
    })
}

/// The targets of this agent, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackupTargets(BTreeMap<String, PathBuf>);

impl BackupTargets {
    /// From the flag values; a name given twice is refused.
    pub fn new(list: &[BackupTarget]) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for t in list {
            if map.insert(t.name.clone(), t.dir.clone()).is_some() {
                return Err(format!("backup target `{}` is given twice", t.name));
            }
        }
        Ok(Self(map))
    }

    /// The directory of target `name`.
    pub fn get(&self, name: &str) -> Option<&Path> {
        self.0.get(name).map(PathBuf::as_path)
    }

    /// The configured names, comma-separated (`none` without any): for messages.
    pub fn names(&self) -> String {
        if self.0.is_empty() {
            "none".into()
        } else {
            self.0.keys().cloned().collect::<Vec<_>>().join(", ")
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_from_name_equals_absolute_dir() {
        let t = parse_target("nightly=/mnt/backups").expect("valid");
        assert_eq!(t.name, "nightly");
        assert_eq!(t.dir, PathBuf::from("/mnt/backups"));
        // A `=` in the directory belongs to the directory.
        assert_eq!(
            parse_target("a=/x=y").expect("valid").dir,
            PathBuf::from("/x=y")
        );
    }

    #[test]
    fn bad_targets_say_why() {
        assert!(parse_target("nightly").unwrap_err().contains("NAME=DIR"));
        assert!(parse_target("Night=/x").unwrap_err().contains("lowercase"));
        assert!(parse_target("=/x").unwrap_err().contains("lowercase"));
        assert!(parse_target("a=rel/dir").unwrap_err().contains("absolute"));
    }

    #[test]
    fn a_name_given_twice_is_refused_and_names_are_listed() {
        let a = parse_target("a=/x").expect("valid");
        let b = parse_target("b=/y").expect("valid");
        assert!(BackupTargets::new(&[a.clone(), a.clone()]).is_err());
        let t = BackupTargets::new(&[b, a]).expect("distinct");
        assert_eq!(t.names(), "a, b");
        assert_eq!(t.get("b"), Some(Path::new("/y")));
        assert_eq!(t.get("c"), None);
        assert_eq!(BackupTargets::default().names(), "none");
    }
}
