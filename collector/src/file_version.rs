//! What tells a file's versions apart, for the files read again when they change (the bearer
//! token and users files, the TLS certificate and key).

use std::{os::unix::fs::MetadataExt as _, path::Path, time::SystemTime};

/// The modification time alone may not tell versions apart: the kernel may keep it to the
/// tick, and a rewrite in place (truncate, then write) can land in the tick of a read that
/// saw the file empty or half-written; the length then differs, and the inode where the file
/// is swapped for a new one (a Kubernetes Secret).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileVersion {
    modified: SystemTime,
    len: u64,
    inode: u64,
}

impl FileVersion {
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            modified: meta.modified()?,
            len: meta.len(),
            inode: meta.ino(),
        })
    }
}
