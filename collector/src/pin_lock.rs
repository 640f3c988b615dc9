//! The pin directory's lock: one collector per pin directory. flock works on any inode,
//! bpffs included; the lock goes with its process, and the directory with a clean stop, so
//! nothing is left elsewhere. Who holds it is read from /proc/locks, so that a refusal names
//! the process, and a start waits out a `collector cleanup` rather than take it for a
//! running collector.

use std::{
    fs::{self, File},
    io,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// How long a start waits for the lock before it takes it for a running collector's:
/// another collector's start holds it for a moment while it removes pins a namespace that
/// is gone left there (`orphans`).
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Makes the pin directory and locks it for a start; `None` if `stop` says to stop first.
/// A lock held for a moment by another collector's start is waited for ([`LOCK_WAIT`]), one
/// held by `collector cleanup` for up to `cleanup_wait` (it holds it through its `nft`, which
/// may wait on the ruleset), and so is one whose holder this process cannot see (a cleanup
/// run on the node, from a container without the host's PIDs); a directory removed
/// meanwhile (orphaned pins, reaped by another start; or by the cleanup) is made again. The
/// links directory is made once locked, when nothing else removes anything there.
pub fn lock_for_start(
    pin_dir: &Path,
    links_dir: &Path,
    cleanup_wait: Duration,
    stop: impl Fn() -> bool,
) -> anyhow::Result<Option<File>> {
    let create = |dir: &Path| {
        fs::create_dir_all(dir)
            .with_context(|| format!("creating the pin directory {}", dir.display()))
    };
    let began = Instant::now();
    let mut said_waiting = false;
    loop {
        create(pin_dir)?;
        if let Some(lock) = lock_if_current(pin_dir)? {
            create(links_dir)?;
            // Removed between the lock and here (`collector check` removes the empty one it
            // made, which a lock does not stop), the directory was made again by that
            // create, unlocked: lock that one.
            if locks(&lock, pin_dir)? {
                return Ok(Some(lock));
            }
            continue;
        }
        if stop() {
            return Ok(None);
        }
        let waited = began.elapsed();
        if waited >= LOCK_WAIT {
            let holder = holder(pin_dir);
            let described = Holder::describe(holder.as_ref());
            // Seen, and no cleanup: a collector runs there.
            if holder.as_ref().is_some_and(|holder| !holder.is_cleanup()) {
                bail!(
                    "another collector is running with the pin directory {} ({described}); stop it first or give this one its own `pin_dir`",
                    pin_dir.display()
                );
            }
            if waited >= cleanup_wait {
                bail!(
                    "{described} has held the pin directory {} for {} s (a `collector cleanup`, or a collector running there); start again once it is done, or give this one its own `pin_dir`",
                    pin_dir.display(),
                    waited.as_secs()
                );
            }
            if !std::mem::replace(&mut said_waiting, true) {
                tracing::info!(
                    "waiting for {described} to let go of the pin directory {}",
                    pin_dir.display()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Locks the pin directory, which a running collector holds locked; `None` while one does.
/// The lock is on the directory that was at `pin_dir` when it was opened, which is no lock
/// on `pin_dir` once another start has removed it (`orphans`): `None` too, unless it is
/// still the one there.
pub fn lock_if_current(pin_dir: &Path) -> anyhow::Result<Option<File>> {
    let dir = match File::open(pin_dir) {
        Ok(dir) => dir,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(err)
                .with_context(|| format!("opening the pin directory {}", pin_dir.display()));
        }
    };
    let Some(lock) = flock_nonblocking(dir)
        .with_context(|| format!("locking the pin directory {}", pin_dir.display()))?
    else {
        return Ok(None);
    };
    Ok(locks(&lock, pin_dir)?.then_some(lock))
}

/// Whether `lock` is on the directory at `pin_dir` now.
fn locks(lock: &File, pin_dir: &Path) -> anyhow::Result<bool> {
    use std::os::unix::fs::MetadataExt as _;
    let held = lock
        .metadata()
        .with_context(|| format!("looking at the pin directory {}", pin_dir.display()))?;
    // Through a symlink, as the open went: a `pin_dir` given as a link to the directory
    // compared the link's own inode, and could never be locked.
    match fs::metadata(pin_dir) {
        Ok(now) => Ok(now.dev() == held.dev() && now.ino() == held.ino()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => {
            Err(err).with_context(|| format!("looking at the pin directory {}", pin_dir.display()))
        }
    }
}

/// `dir`, locked exclusively, or `None` if another holds the lock.
fn flock_nonblocking(dir: File) -> io::Result<Option<File>> {
    Ok(try_flock(&dir, libc::LOCK_EX)?.then_some(dir))
}

/// Whether another process holds the pin directory's lock (`false` where there is none),
/// tried with a shared lock that goes at once: for a holder that /proc/locks does not show,
/// to a process in a PID namespace of its own. (A start trying meanwhile tries again 50 ms
/// later; a cleanup's listing says who holds it, its removal refuses.)
pub fn held_by_another(pin_dir: &Path) -> io::Result<bool> {
    match File::open(pin_dir) {
        Ok(dir) => Ok(!try_flock(&dir, libc::LOCK_SH)?),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err),
    }
}

/// `flock(dir, operation)` without waiting: `false` if another holds the lock. Any other
/// failure (`ENOLCK`) is an error: taken as held, it was waited on and then blamed on a
/// holder.
fn try_flock(dir: &File, operation: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock on a valid open fd; the lock goes when `dir` closes.
    let rc = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(dir),
            operation | libc::LOCK_NB,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if held_elsewhere(&err) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Whether `flock` failed because another holds the lock.
fn held_elsewhere(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::WouldBlock
}

/// The process holding a pin directory's lock, as this process sees it (/proc/locks leaves
/// out the locks of processes in PID namespaces it cannot see), or another of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pid: u32,
    /// Its arguments, as /proc/PID/cmdline has them (none if it could not be read).
    arguments: Vec<String>,
}

impl Holder {
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A `collector cleanup`, which holds the lock only while it works.
    pub fn is_cleanup(&self) -> bool {
        let mut arguments = self.arguments.iter().map(String::as_str);
        if arguments
            .next()
            .and_then(|program| program.rsplit('/').next())
            != Some("collector")
        {
            return false;
        }
        // The subcommand: the first word that is no flag, nor the global flag's value.
        while let Some(argument) = arguments.next() {
            match argument {
                "--log-format" => {
                    arguments.next();
                }
                flag if flag.starts_with('-') => {}
                subcommand => return subcommand == "cleanup",
            }
        }
        false
    }

    /// "process PID: COMMAND", or what is known of it.
    pub fn describe(holder: Option<&Self>) -> String {
        match holder {
            None => "a process this one cannot see".to_owned(),
            Some(Self { pid, arguments }) if arguments.is_empty() => format!("process {pid}"),
            Some(Self { pid, arguments }) => {
                format!("process {pid}: {}", arguments.join(" "))
            }
        }
    }
}

/// The holder of the exclusive flock on `dir`, from /proc/locks; `None` if none is found (released
/// since, or /proc unreadable).
pub fn holder(dir: &Path) -> Option<Holder> {
    use std::os::unix::fs::MetadataExt as _;
    let held = fs::metadata(dir).ok()?;
    let locks = fs::read_to_string("/proc/locks").ok()?;
    Some(Holder::process(flock_holder(
        &locks,
        held.dev(),
        held.ino(),
    )?))
}

impl Holder {
    /// Process `pid`, with its command line where it can be read.
    #[must_use]
    pub fn process(pid: u32) -> Self {
        let arguments = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|line| {
                line.split(|&byte| byte == 0)
                    .filter(|argument| !argument.is_empty())
                    .map(|argument| String::from_utf8_lossy(argument).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        Self { pid, arguments }
    }

    /// Process `pid`, without a command line: for tests of what is said about it.
    #[cfg(test)]
    #[must_use]
    pub fn bare(pid: u32) -> Self {
        Self {
            pid,
            arguments: Vec::new(),
        }
    }
}

/// The pid holding a flock on the inode `ino` of device `dev`, in the text of /proc/locks
/// (`1: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE 0 EOF`, the device numbers in hex; a
/// waiter's line has `->` after its number).
fn flock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let inode = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            // WRITE: an exclusive lock, a collector's or a cleanup's; a check's shared try
            // (READ) holds nothing.
            [_, "FLOCK", _, "WRITE", pid, at, ..] if *at == inode => pid.parse().ok(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::ScratchDir;

    #[test]
    fn only_ewouldblock_means_another_holds_the_lock() {
        assert!(held_elsewhere(&io::Error::from_raw_os_error(
            libc::EWOULDBLOCK
        )));
        for errno in [libc::ENOLCK, libc::EBADF, libc::EINTR] {
            assert!(
                !held_elsewhere(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
    }

    #[test]
    fn the_holder_is_the_flock_on_the_inode_and_not_a_waiter() {
        let dev = libc::makedev(0, 0x1f);
        let locks = "1: POSIX  ADVISORY  WRITE 10 00:1f:77 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 11 00:1e:77 0 EOF\n\
                     3: -> FLOCK  ADVISORY  WRITE 12 00:1f:77 0 EOF\n\
                     4: FLOCK  ADVISORY  READ  14 00:1f:77 0 EOF\n\
                     5: FLOCK  ADVISORY  WRITE 13 00:1f:77 0 EOF\n";
        assert_eq!(flock_holder(locks, dev, 77), Some(13));
        assert_eq!(
            flock_holder(&locks.replace("WRITE 13", "READ  13"), dev, 77),
            None
        );
        assert_eq!(flock_holder(locks, dev, 78), None);
    }

    #[test]
    fn a_pin_directory_given_through_a_symlink_is_locked() {
        let scratch = ScratchDir::new("pin-lock");
        let (real, link) = (scratch.path("real"), scratch.path("link"));
        fs::create_dir_all(&real).unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let held = lock_if_current(&link).unwrap();
        let again = lock_if_current(&real).unwrap();
        assert!(held.is_some(), "not locked through the link");
        assert!(again.is_none(), "locked twice");
    }

    /// A lock on a directory removed and made again is no lock on the one there now.
    #[test]
    fn a_lock_on_a_directory_made_again_locks_nothing() {
        let scratch = ScratchDir::new("pin-relock");
        let dir = scratch.path("pins");
        fs::create_dir_all(&dir).unwrap();
        let lock = lock_if_current(&dir).unwrap().unwrap();
        assert!(locks(&lock, &dir).unwrap());
        fs::remove_dir(&dir).unwrap();
        fs::create_dir(&dir).unwrap();
        assert!(!locks(&lock, &dir).unwrap());
    }

    #[test]
    fn only_a_collector_cleanup_is_waited_for() {
        let holder = |arguments: &[&str]| Holder {
            pid: 7,
            arguments: arguments.iter().map(|&a| a.to_owned()).collect(),
        };
        assert!(holder(&["/usr/bin/collector", "cleanup", "--apply"]).is_cleanup());
        assert!(holder(&["collector", "cleanup"]).is_cleanup());
        assert!(holder(&["collector", "--log-format", "json", "cleanup"]).is_cleanup());
        assert!(!holder(&["collector", "run", "--config", "cleanup"]).is_cleanup());
        assert!(!holder(&["flock", "/sys/fs/bpf/collector", "cleanup"]).is_cleanup());
        assert!(!holder(&["/usr/bin/collector", "run"]).is_cleanup());
        assert_eq!(
            Holder::describe(Some(&holder(&["collector", "run"]))),
            "process 7: collector run"
        );
        assert_eq!(Holder::describe(None), "a process this one cannot see");
    }
}
