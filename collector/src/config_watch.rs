//! Whether the config file still reads as the config the agent runs with. It is read once,
//! at the start: an edit (a `ConfigMap` changed, a file replaced by configuration management)
//! applies at the next start, and an edit that start would refuse showed only then, as a
//! crash loop days later on whichever node restarted first. The file is looked at every
//! poll (its size, time and inode; it is read again only when they change), and `/metrics`
//! says whether a start would accept it (its lines, and the credential and certificate files
//! it names) and whether it still reads as what runs.

use std::path::PathBuf;

use crate::{config::Config, file_version::FileVersion};

/// What the config file says now, against the config running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigFileState {
    /// A start would accept it.
    pub valid: bool,
    /// It reads as the running config (comments and order aside).
    pub applied: bool,
}

/// Reads the file again as the start did: the same file, the same overrides.
pub type Reread = Box<dyn Fn() -> anyhow::Result<Config> + Send>;

pub struct ConfigWatch {
    path: PathBuf,
    reread: Reread,
    running: Config,
    /// The file as last looked at (`None`: it could not be read).
    seen: Option<FileVersion>,
    state: ConfigFileState,
}

impl ConfigWatch {
    /// For the file at `path`, read at the start into `running`. The first look reads it
    /// again: an edit between the start's read and this one is then not taken for what runs.
    #[must_use]
    pub fn new(path: PathBuf, running: Config, reread: Reread) -> Self {
        Self {
            seen: None,
            path,
            reread,
            running,
            state: ConfigFileState {
                valid: true,
                applied: true,
            },
        }
    }

    /// Looks at the file, reads it again if it changed, and says in the log when what it
    /// says changes.
    pub fn look(&mut self) -> ConfigFileState {
        let version = FileVersion::of(&self.path).ok();
        if version.is_some() && version == self.seen {
            return self.state;
        }
        self.seen = version;
        let reread = (self.reread)();
        let state = ConfigFileState {
            valid: reread.is_ok(),
            applied: reread.as_ref().is_ok_and(|config| *config == self.running),
        };
        let path = self.path.display();
        match &reread {
            // Also a new version refused anew, for what may be another line; a file still
            // missing is said once.
            Err(err) if state != self.state || version.is_some() => {
                tracing::warn!(
                    "the config file {path} would be refused at the next start: {err:#}"
                );
            }
            Ok(_) if state != self.state && state.applied => {
                tracing::info!("the config file {path} reads as the running config again");
            }
            Ok(_) if state != self.state => tracing::warn!(
                "the config file {path} changed since the start: the change applies at the next \
                 start"
            ),
            _ => {}
        }
        self.state = state;
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watch on a file of a test's own, read as `collector run --config` reads it.
    fn watch(text: &str) -> (ConfigWatch, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "collector-config-watch-{}-{}",
            std::process::id(),
            text.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("collector.toml");
        std::fs::write(&path, text).unwrap();
        let running = Config::from_file(&path).unwrap();
        let reread_path = path.clone();
        let reread: Reread = Box::new(move || Ok(Config::from_file(&reread_path)?));
        (ConfigWatch::new(path.clone(), running, reread), path)
    }

    /// Rewritten as a `ConfigMap`'s file is: a new file renamed over the old one.
    fn replace(path: &std::path::Path, text: &str) {
        let next = path.with_extension("next");
        std::fs::write(&next, text).unwrap();
        std::fs::rename(&next, path).unwrap();
    }

    #[test]
    fn edits_are_told_apart_by_what_a_start_would_make_of_them() {
        const ROUTES: &str = "[[routes]]\nname = \"web\"\nports = [8080]\ntype = \"http\"\n";
        let (mut watch, path) = watch(ROUTES);
        let state = |valid, applied| ConfigFileState { valid, applied };
        assert_eq!(watch.look(), state(true, true));
        // A comment changes nothing that runs.
        replace(&path, &format!("# the proxy's routes\n{ROUTES}"));
        assert_eq!(watch.look(), state(true, true));
        replace(&path, &ROUTES.replace("8080", "8081"));
        assert_eq!(watch.look(), state(true, false));
        // Edited in place, as an editor may: the same inode.
        std::fs::write(&path, ROUTES.replace("http", "htp")).unwrap();
        assert_eq!(watch.look(), state(false, false));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(watch.look(), state(false, false));
        replace(&path, ROUTES);
        assert_eq!(watch.look(), state(true, true));
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
