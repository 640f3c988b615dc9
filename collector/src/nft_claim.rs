//! Which running collector of this network namespace uses an nftables table name.
//!
//! The claim is an abstract unix socket named after the table, listening while the agent
//! runs. Abstract sockets belong to the network namespace and close with the process that
//! holds them: a crashed run's claim is gone at once, so the next start adopts its table as
//! before, while a second collector started here with a pin directory of its own but the
//! same `[nftables] table` is told so, instead of adopting the first one's table and removing
//! it when it stops. A connection to the claim names the holder's process (`SO_PEERCRED`):
//! made without blocking, so a backlog that filled up cannot hang the one asking, and the
//! holder drops such connections at each poll ([`TableClaim::drain`]), so it does not fill.

use std::{
    io,
    os::{
        fd::{AsRawFd, FromRawFd},
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixListener, UnixStream},
    },
};

/// The table name, held for as long as this lives.
#[derive(Debug)]
pub struct TableClaim {
    socket: UnixListener,
}

impl TableClaim {
    /// Closes the connections others made to learn who holds the name; returns how many.
    pub fn drain(&self) -> usize {
        std::iter::from_fn(|| self.socket.accept().ok()).count()
    }
}

/// Who holds a table name already: its process as this process sees it, with its command
/// line, so that a process that took the name and is no collector shows as what it is;
/// `None` where it could not be told (a process in a PID namespace this one cannot see,
/// another container of the pod).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder(Option<crate::pin_lock::Holder>);

impl Holder {
    /// Its process id, where it could be told.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(crate::pin_lock::Holder::pid)
    }

    fn of(pid: Option<u32>) -> Self {
        Self(pid.map(crate::pin_lock::Holder::process))
    }

    /// Process `pid`, without a command line: for tests of what is said about it.
    #[cfg(test)]
    #[must_use]
    pub fn bare(pid: Option<u32>) -> Self {
        Self(pid.map(crate::pin_lock::Holder::bare))
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::pin_lock::Holder::describe(self.0.as_ref()))
    }
}

fn name(table: &str) -> String {
    format!("collector nftables table inet {table}")
}

/// Claims `table` for this process; `None` if a running collector of this network namespace
/// holds it ([`holder`] says which).
pub fn claim(table: &str) -> io::Result<Option<TableClaim>> {
    match UnixListener::bind_addr(&SocketAddr::from_abstract_name(name(table))?) {
        Ok(socket) => {
            socket.set_nonblocking(true)?;
            Ok(Some(TableClaim { socket }))
        }
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => Ok(None),
        Err(err) => Err(err),
    }
}

/// Who holds `table`'s claim, if a running collector of this network namespace does: told
/// without taking it (a start meanwhile would find it taken and fail), by a connection to
/// it (a full backlog is a holder too).
pub fn held(table: &str) -> Option<Holder> {
    match connect_without_waiting(&name(table)) {
        Ok(stream) => Some(Holder::of(peer_pid(&stream))),
        Err(err) if err.raw_os_error() == Some(libc::EAGAIN) => Some(Holder::of(None)),
        Err(_) => None,
    }
}

/// The process holding `table`'s claim, asked over a connection to it.
pub fn holder(table: &str) -> Holder {
    held(table).unwrap_or(Holder::of(None))
}

/// A connection to the abstract socket `name` that fails rather than waits when the
/// listener's backlog is full.
fn connect_without_waiting(name: &str) -> io::Result<UnixStream> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor of ours, owned by the stream from here on.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data, valid zeroed.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    address.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).map_err(io::Error::other)?;
    // An abstract name: a NUL, then the name, not NUL-terminated.
    let path = address
        .sun_path
        .get_mut(1..=name.len())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "name too long for a socket"))?;
    for (slot, byte) in path.iter_mut().zip(name.bytes()) {
        *slot = byte.cast_signed();
    }
    let length = libc::socklen_t::try_from(size_of::<libc::sa_family_t>() + 1 + name.len())
        .map_err(io::Error::other)?;
    // SAFETY: a valid socket and an address of the given length.
    let rc = unsafe { libc::connect(stream.as_raw_fd(), (&raw const address).cast(), length) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

fn peer_pid(stream: &UnixStream) -> Option<u32> {
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(size_of::<libc::ucred>()).ok()?;
    // SAFETY: a valid socket, and `credentials`/`len` point to writable memory of the stated
    // size.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut credentials).cast(),
            &raw mut len,
        )
    };
    // The kernel reports 0 for a process outside our PID namespace.
    (rc == 0 && credentials.pid > 0)
        .then(|| u32::try_from(credentials.pid).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_name_names_its_holder_until_released() {
        let table = format!("claim_test_{}", std::process::id());
        let first = claim(&table).unwrap().unwrap();
        assert!(claim(&table).unwrap().is_none());
        let held = holder(&table);
        assert_eq!(held.pid(), Some(std::process::id()));
        // Named with its command line: this test binary's.
        let own = std::env::current_exe().unwrap();
        assert!(
            held.to_string().starts_with(&format!(
                "process {}: {}",
                std::process::id(),
                own.display()
            )),
            "{held}"
        );
        assert!(claim(&format!("{table}_other")).unwrap().is_some());
        drop(first);
        claim(&table).unwrap().unwrap();
    }

    #[test]
    fn asking_never_waits_and_the_holder_drops_the_questions() {
        let table = format!("claim_backlog_{}", std::process::id());
        let claimed = claim(&table).unwrap().unwrap();
        // More questions than any backlog holds: each answered or refused, none waiting.
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut unanswered = 0;
        for _ in 0..=somaxconn + 1 {
            if holder(&table).pid().is_none() {
                unanswered += 1;
            }
        }
        assert!(unanswered > 0, "the backlog never filled");
        assert!(claimed.drain() >= somaxconn);
        assert_eq!(claimed.drain(), 0);
        assert_eq!(holder(&table).pid(), Some(std::process::id()));
    }
}
