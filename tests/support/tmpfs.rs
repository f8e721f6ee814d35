//! A small tmpfs mounted for one test (root only): a backup target on another device
//! than the agents' roots, as a network volume is. Unmounted when dropped, so also
//! when the test fails.

use std::path::Path;

pub struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`64m`) on a new directory under /var/tmp.
    pub fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir_in("/var/tmp").expect("mountpoint");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(ok.success(), "mount a tmpfs (the test needs root)");
        Tmpfs(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}
