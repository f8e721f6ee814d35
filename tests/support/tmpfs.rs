//! A small tmpfs mounted for one test (root only): a backup target on another device
//! than the agents' roots, as a network volume is, or a node's own small disk.
//! Unmounted when dropped, so also when the test fails.

use std::path::{Path, PathBuf};

pub struct Tmpfs {
    path: PathBuf,
    /// The mountpoint made for it ([`Tmpfs::mount`]), removed after the unmount.
    _dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`64m`) on a new directory under /var/tmp.
    pub fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir_in("/var/tmp").expect("mountpoint");
        let mut t = Self::mount_on(dir.path(), size);
        t._dir = Some(dir);
        t
    }

    /// Mounts a tmpfs of `size` on `path` (made if missing).
    pub fn mount_on(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).expect("mountpoint");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(ok.success(), "mount a tmpfs (the test needs root)");
        Tmpfs {
            path: path.to_owned(),
            _dir: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: an agent may still have it open.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}
