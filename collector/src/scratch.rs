//! Directories of the unit tests' own under the system's temporary directory, removed when
//! the test ends, a failed one too.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime},
};

pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// A new directory named for this process, a count and `name` (the tests run in
    /// parallel, and may share a name), as the integration tests' are: their sweep removes
    /// those of a run that was killed.
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "collector-scratch-{}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Where `file` goes in the directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    /// Writes `text` to `file`, and returns its path.
    pub fn write(&self, file: &str, text: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(file);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// As [`Self::write`], stamped `age_s` seconds after the epoch: the changes a test makes
    /// must show in the modification time however fast they come.
    pub fn write_aged(&self, file: &str, text: &str, age_s: u64) -> PathBuf {
        let path = self.write(file, text);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(age_s))
            .unwrap();
        path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
