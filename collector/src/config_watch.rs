//! Whether the config file still reads as the config the agent runs with. It is read once,
//! at the start: an edit (a `ConfigMap` changed, a file replaced by configuration management)
//! applies at the next start, and an edit that start would refuse showed only then, as a
//! crash loop days later on whichever node restarted first. The file is looked at every
//! poll (its size, time and inode, and those of the credential and certificate files it
//! names; it is read again a poll after one of them changes, and every poll while a start
//! would refuse it), and `/metrics` says whether a start would accept it (its lines, the
//! files it names, and what a start checks on the host of what it names: the pin directory
//! on bpffs, the cgroup2 mount, the listen address) and whether it still reads as what runs.
//! The host is judged when the file is read again: an address removed after a read that
//! passed shows at the next change.

use std::path::{Path, PathBuf};

use crate::{
    config::{Config, DnsConfig},
    file_version::FileVersion,
};

/// Whether the file at `path` reads again as it read at the start: a regular file (through
/// symlinks, as a `ConfigMap`'s), or one that cannot be looked at now (the watch says so). A
/// pipe (`--config <(envsubst < collector.tmpl)`, `/dev/stdin`) reads empty once its writer
/// is gone, a valid config unlike the one running, and a FIFO's open waits for a writer,
/// holding the polls.
#[must_use]
pub fn can_be_read_again(path: &Path) -> bool {
    std::fs::metadata(path).map_or(true, |metadata| metadata.is_file())
}

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
    /// The running config, as [`what_runs`] has it.
    running: Config,
    /// The credential and certificate files the file named when last read.
    named: Vec<PathBuf>,
    /// The versions of the file and of `named` as last read (`None`: read it again; a file
    /// that could not be looked at is `None` within).
    seen: Option<Vec<Option<FileVersion>>>,
    /// The versions the last look found, read or not.
    last_look: Option<Vec<Option<FileVersion>>>,
    /// The last look put off a read (see [`ConfigWatch::look`]).
    put_off: bool,
    state: ConfigFileState,
    /// The refusal last logged, so that a file read again each poll is said once.
    refusal: Option<String>,
}

impl ConfigWatch {
    /// For the file at `path`, read at the start into `running`. The first look reads it
    /// again: an edit between the start's read and this one is then not taken for what runs.
    #[must_use]
    pub fn new(path: PathBuf, running: &Config, reread: Reread) -> Self {
        Self {
            named: running.http.files(),
            running: what_runs(running),
            seen: None,
            last_look: None,
            put_off: false,
            path,
            reread,
            state: ConfigFileState {
                valid: true,
                applied: true,
            },
            refusal: None,
        }
    }

    /// Looks at the file and the files it names, reads it again if one changed or while a
    /// start would refuse it (a file it names may have appeared since), and says in the log
    /// when what it says changes.
    pub fn look(&mut self) -> ConfigFileState {
        let versions: Vec<_> = std::iter::once(&self.path)
            .chain(&self.named)
            .map(|path| FileVersion::of(path).ok())
            .collect();
        // A change may be a rewrite caught between its truncate and its last write (an
        // editor's save, `cat new.toml > collector.toml`, `rm` and a new file), which read as
        // refused, with a warning naming a line, for a file that never was: its read waits a
        // look, once (a file written at every look is still read, every other look).
        let put_off = !self.put_off
            && self
                .last_look
                .as_ref()
                .is_some_and(|last| *last != versions);
        self.put_off = put_off;
        self.last_look = Some(versions.clone());
        if put_off || (self.state.valid && self.seen.as_ref() == Some(&versions)) {
            return self.state;
        }
        let reread = (self.reread)();
        let state = ConfigFileState {
            valid: reread.is_ok(),
            applied: reread
                .as_ref()
                .is_ok_and(|config| what_runs(config) == self.running),
        };
        self.seen = Some(versions);
        if let Ok(config) = &reread {
            let named = config.http.files();
            if named != self.named {
                // The versions taken were of the files the last read named: read it again
                // at the next look, which takes them of these.
                self.named = named;
                self.seen = None;
            }
        }
        let path = self.path.display();
        match &reread {
            Err(err) => {
                let refusal = format!("{err:#}");
                if self.refusal.as_ref() != Some(&refusal) {
                    tracing::warn!(
                        "the config file {path} would be refused at the next start: {refusal}"
                    );
                    self.refusal = Some(refusal);
                }
            }
            Ok(_) if state != self.state && state.applied => {
                tracing::info!("the config file {path} reads as the running config again");
            }
            Ok(_) if state != self.state => tracing::warn!(
                "the config file {path} changed since the start: the change applies at the next \
                 start"
            ),
            Ok(_) => {}
        }
        if reread.is_ok() {
            self.refusal = None;
        }
        self.state = state;
        state
    }
}

/// What a config runs: with DNS off, the `[dns]` keys a start warns have no effect are not
/// part of it, so that removing or changing one is no change; nor, without TLS, the TLS
/// handshake's time limit.
fn what_runs(config: &Config) -> Config {
    let mut config = config.clone();
    if config.http.tls.is_none() {
        config.http.tls_handshake_timeout = std::time::Duration::ZERO;
    }
    if !config.dns.enabled {
        config.dns = DnsConfig {
            enabled: false,
            ..DnsConfig::default()
        };
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::ScratchDir;

    /// The watch on a file of a test's own, read as `collector run --config` reads it, and
    /// the file's directory.
    fn watch(text: &str) -> (ConfigWatch, PathBuf, ScratchDir) {
        let dir = ScratchDir::new("config-watch");
        let path = dir.write("collector.toml", text);
        let running = Config::from_file(&path).unwrap();
        let reread_path = path.clone();
        // As a start: the lines, then the files they name.
        let reread: Reread = Box::new(move || {
            let config = Config::from_file(&reread_path)?;
            for file in config.http.files() {
                std::fs::read(&file)?;
            }
            Ok(config)
        });
        (ConfigWatch::new(path.clone(), &running, reread), path, dir)
    }

    #[test]
    fn only_a_regular_file_is_read_again() {
        let dir = ScratchDir::new("config-watch-kinds");
        let file = dir.write("collector.toml", "");
        let link = dir.path("link.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let fifo = dir.path("fifo.toml");
        let fifo_name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo_name.as_ptr(), 0o600) }, 0);
        let (reader, writer) = std::io::pipe().unwrap();
        drop(writer);
        let pipe = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&reader)
        ));
        assert!(can_be_read_again(&file));
        assert!(can_be_read_again(&link));
        // Gone since the start: watched, and refused at the next look.
        assert!(can_be_read_again(&dir.path("gone.toml")));
        assert!(!can_be_read_again(&fifo));
        assert!(!can_be_read_again(&pipe));
        assert!(!can_be_read_again(std::path::Path::new("/dev/null")));
    }

    /// What the watch says once the files hold still: a change is read at the second look.
    fn settled(watch: &mut ConfigWatch) -> ConfigFileState {
        let _ = watch.look();
        watch.look()
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
        let (mut watch, path, _dir) = watch(ROUTES);
        let state = |valid, applied| ConfigFileState { valid, applied };
        assert_eq!(settled(&mut watch), state(true, true));
        // A comment changes nothing that runs.
        replace(&path, &format!("# the proxy's routes\n{ROUTES}"));
        assert_eq!(settled(&mut watch), state(true, true));
        replace(&path, &ROUTES.replace("8080", "8081"));
        assert_eq!(settled(&mut watch), state(true, false));
        // Edited in place, as an editor may: the same inode.
        std::fs::write(&path, ROUTES.replace("http", "htp")).unwrap();
        assert_eq!(settled(&mut watch), state(false, false));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(settled(&mut watch), state(false, false));
        replace(&path, ROUTES);
        assert_eq!(settled(&mut watch), state(true, true));
    }

    /// A file the config names is looked at as the config is: its removal alone would
    /// refuse the next start, and its return alone would not.
    #[test]
    fn the_files_it_names_count_without_an_edit() {
        let named = ScratchDir::new("named");
        let token = named.write("token", "secret\n");
        let text = format!("[http]\nbearer_token_file = \"{}\"\n", token.display());
        let (mut watch, path, _dir) = watch(&text);
        let state = |valid, applied| ConfigFileState { valid, applied };
        assert_eq!(settled(&mut watch), state(true, true));
        std::fs::remove_file(&token).unwrap();
        assert_eq!(settled(&mut watch), state(false, false));
        assert_eq!(watch.look(), state(false, false));
        std::fs::write(&token, "renewed\n").unwrap();
        assert_eq!(settled(&mut watch), state(true, true));
        // Edited to name a file not there yet (the last read that succeeded named the
        // other): refused until it is put there.
        let next = named.path("next-token");
        replace(
            &path,
            &format!("[http]\nbearer_token_file = \"{}\"\n", next.display()),
        );
        assert_eq!(settled(&mut watch), state(false, false));
        assert_eq!(watch.look(), state(false, false));
        std::fs::write(&next, "secret\n").unwrap();
        assert_eq!(settled(&mut watch), state(true, false));
    }

    /// Keys the start warned have no effect are not what runs: removing one changes nothing.
    #[test]
    fn removing_a_key_without_effect_is_no_change() {
        let (mut watch, path, _dir) = watch("[dns]\nenabled = false\nports = [5353]\n");
        let state = |valid, applied| ConfigFileState { valid, applied };
        assert_eq!(settled(&mut watch), state(true, true));
        replace(&path, "[dns]\nenabled = false\nports = [5354]\ntop_k = 7\n");
        assert_eq!(settled(&mut watch), state(true, true));
        replace(&path, "[dns]\nenabled = false\n");
        assert_eq!(settled(&mut watch), state(true, true));
        replace(&path, "[dns]\nenabled = true\n");
        assert_eq!(settled(&mut watch), state(true, false));
        // Without TLS, no handshake is timed.
        let (mut without_tls, path, _dir) =
            self::watch("[http]\ntls_handshake_timeout_ms = 10000\n");
        replace(&path, "[http]\ntls_handshake_timeout_ms = 20000\n");
        assert_eq!(settled(&mut without_tls), state(true, true));
    }

    /// A rewrite in place caught between its truncate and its last write is not judged: its
    /// read waits a look.
    #[test]
    fn a_file_caught_in_a_rewrite_in_place_is_read_a_look_later() {
        const ROUTES: &str = "[[routes]]\nname = \"web\"\nports = [8080]\ntype = \"http\"\n";
        let (mut watch, path, _dir) = watch(ROUTES);
        let state = |valid, applied| ConfigFileState { valid, applied };
        assert_eq!(watch.look(), state(true, true));
        // Truncated and written in part, as `cat new.toml > collector.toml` leaves it for a
        // moment: refused if read.
        std::fs::write(&path, &ROUTES[..20]).unwrap();
        assert_eq!(watch.look(), state(true, true));
        // Written again before the next look (another size: on kernels before 6.13 the
        // times may not have moved): read then, not put off again.
        std::fs::write(&path, ROUTES.replace("8080", "18081")).unwrap();
        assert_eq!(watch.look(), state(true, false));
        // A half-written file that stays so is refused, a look later.
        std::fs::write(&path, &ROUTES[..20]).unwrap();
        assert_eq!(watch.look(), state(true, false));
        assert_eq!(watch.look(), state(false, false));
        // So is a file renamed over it, whole or not.
        replace(&path, ROUTES);
        assert_eq!(watch.look(), state(false, false));
        assert_eq!(watch.look(), state(true, true));
    }
}
