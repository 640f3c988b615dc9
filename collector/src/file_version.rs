//! What tells a file's versions apart, for the files read again when they change (the bearer
//! token and users files, the TLS certificate and key).

use std::{os::unix::fs::MetadataExt as _, path::Path, time::SystemTime};

/// The modification time alone may not tell versions apart: the kernel may keep it to the
/// tick, and a rewrite in place (truncate, then write) can land in the tick of a read that
/// saw the file empty or half-written; the length then differs, and the inode where the file
/// is swapped for a new one (a Kubernetes Secret). The change time also moves with a
/// `chmod` or `chown`, which can leave the file unreadable to the agent (it runs without
/// `CAP_DAC_OVERRIDE`): read again then, that shows at once, not at the next start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileVersion {
    modified: SystemTime,
    changed: (i64, i64),
    len: u64,
    inode: u64,
}

impl FileVersion {
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            modified: meta.modified()?,
            changed: (meta.ctime(), meta.ctime_nsec()),
            len: meta.len(),
            inode: meta.ino(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_change_of_mode_alone_is_another_version() {
        let scratch = crate::scratch::ScratchDir::new("file-version");
        let path = scratch.write("collector.toml", "listen = \"127.0.0.1:9464\"\n");
        let before = FileVersion::of(&path).unwrap();
        assert_eq!(FileVersion::of(&path).unwrap(), before);
        // The change time is kept to the tick: past it, the mode alone must tell.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
        assert_ne!(FileVersion::of(&path).unwrap(), before);
    }
}
