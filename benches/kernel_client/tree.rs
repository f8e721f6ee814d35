//! The file tree the file-system rows work on: generated once per run on the host from
//! a fixed seed (same names, sizes and bytes every run), packed into a tarball the guest
//! extracts, and described by what a correct server must give back: the number of
//! files and directories, their bytes, and the MD5 of all files read in name order.
//!
//! Shape: files spread 20 to a leaf directory, leaves three levels deep
//! (`tree/aN/bN/cN/fN`), like a source tree or a package's files. One file in 100 is
//! large (256 KiB–1 MiB); the rest are 0–8 KiB.

use std::path::{Path, PathBuf};
use std::process::Command;

use ring::digest::{Context, SHA256};

/// Files per leaf directory.
const FILES_PER_DIR: u64 = 20;
/// Leaf directories per middle directory, and middle directories per top one.
const FANOUT: u64 = 5;
const KIB: u64 = 1 << 10;

/// The generated tree and what reading it back must give.
pub struct Tree {
    /// The tarball (`tree/…`), on the host disk where the guest's root can see it.
    pub tarball: PathBuf,
    pub files: u64,
    /// Directories, `tree` itself included (what `find tree -type d` counts).
    pub dirs: u64,
    pub bytes: u64,
    /// MD5 of every file's bytes, in C-locale order of their paths.
    pub md5: String,
}

/// The command that reads every file under `tree` (in the current directory) and
/// prints the MD5 of their bytes, in path order: the "read all" row, also run on the
/// host to learn the expected answer. `find` lists, `sort` fixes the order, `cat` opens
/// and reads each file.
pub fn read_all_command() -> &'static str {
    "find tree -type f | LC_ALL=C sort | xargs -d '\\n' cat | md5sum | cut -d' ' -f1"
}

/// Number of the seed-derived value `what` for file `i`.
fn seeded(i: u64, what: &str) -> u64 {
    let mut ctx = Context::new(&SHA256);
    ctx.update(format!("kernel_client tree {what} {i}").as_bytes());
    let d = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d.as_ref()[..8]);
    u64::from_le_bytes(first)
}

/// Size of file `i`.
fn file_size(i: u64) -> u64 {
    let r = seeded(i, "size");
    if r.is_multiple_of(100) {
        256 * KIB + (r >> 8) % (768 * KIB)
    } else {
        (r >> 8) % (8 * KIB)
    }
}

/// Path of file `i` below `tree/`.
fn file_path(i: u64) -> String {
    let leaf = i / FILES_PER_DIR;
    format!(
        "a{}/b{}/c{}/f{i}",
        leaf / (FANOUT * FANOUT),
        (leaf / FANOUT) % FANOUT,
        leaf % FANOUT
    )
}

/// `len` bytes for file `i`: SHA-256 in counter mode, so no two files share content
/// and nothing compresses.
fn file_bytes(i: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize + 32);
    let mut block = 0u64;
    while (out.len() as u64) < len {
        let mut ctx = Context::new(&SHA256);
        ctx.update(&i.to_le_bytes());
        ctx.update(&block.to_le_bytes());
        out.extend_from_slice(ctx.finish().as_ref());
        block += 1;
    }
    out.truncate(len as usize);
    out
}

/// Runs `sh -c script` in `dir`, returning its trimmed stdout.
fn host_sh(dir: &Path, script: &str) -> Result<String, String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("run `{script}`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{script}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Writes `files` files under `dir/src/tree`, packs them into `dir/tree.tar` (fixed
/// owner, mode and mtime, name order) and learns the expected answers from the host's
/// own reading of the tree, which is then deleted.
pub fn generate(dir: &Path, files: u64) -> Result<Tree, String> {
    let src = dir.join("src");
    let root = src.join("tree");
    let mut bytes = 0;
    for i in 0..files {
        let path = root.join(file_path(i));
        let parent = path.parent().unwrap_or(&root);
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        let len = file_size(i);
        std::fs::write(&path, file_bytes(i, len))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        bytes += len;
    }
    let tarball = dir.join("tree.tar");
    host_sh(
        &src,
        &format!(
            "tar --sort=name --owner=0 --group=0 --numeric-owner \
             --mtime=@1700000000 -cf {} tree",
            localnfs_testbed::kernel::quote(&tarball.to_string_lossy())
        ),
    )?;
    let count = |kind: &str| -> Result<u64, String> {
        let out = host_sh(&src, &format!("find tree -type {kind} | wc -l"))?;
        out.parse().map_err(|_| format!("find printed {out:?}"))
    };
    let tree = Tree {
        tarball,
        files: count("f")?,
        dirs: count("d")?,
        bytes,
        md5: host_sh(&src, read_all_command())?,
    };
    std::fs::remove_dir_all(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    if tree.files != files {
        return Err(format!("generated {} files, meant {files}", tree.files));
    }
    Ok(tree)
}
