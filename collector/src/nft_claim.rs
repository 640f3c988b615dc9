//! Which running collector of this network namespace uses an nftables table name.
//!
//! The claim is an abstract unix socket named after the table, listening while the agent
//! runs. Abstract sockets belong to the network namespace and close with the process that
//! holds them: a crashed run's claim is gone at once, so the next start adopts its table as
//! before, while a second collector started here with a pin directory of its own but the
//! same `[nftables] table` is told so, instead of adopting the first one's table and removing
//! it when it stops. A connection to the claim names the holder's process (`SO_PEERCRED`).

use std::{
    io,
    os::{
        fd::AsRawFd,
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixListener, UnixStream},
    },
};

/// The table name, held for as long as this lives.
#[derive(Debug)]
pub struct TableClaim {
    _socket: UnixListener,
}

/// Who holds a table name already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    /// Its process id as this process sees it; `None` where its process is in a PID
    /// namespace this one cannot see (another container of the pod).
    pub pid: Option<u32>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "process {pid}"),
            None => write!(f, "a process of another PID namespace"),
        }
    }
}

fn address(table: &str) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(format!("collector nftables table inet {table}"))
}

/// Claims `table` for this process: `Err(holder)` if a running collector of this network
/// namespace holds it.
pub fn claim(table: &str) -> io::Result<Result<TableClaim, Holder>> {
    match UnixListener::bind_addr(&address(table)?) {
        Ok(socket) => Ok(Ok(TableClaim { _socket: socket })),
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => Ok(Err(holder(table))),
        Err(err) => Err(err),
    }
}

/// Whether a running collector of this network namespace holds `table`.
pub fn held(table: &str) -> io::Result<Option<Holder>> {
    Ok(claim(table)?.err())
}

/// The process holding `table`'s claim, asked over a connection to it.
fn holder(table: &str) -> Holder {
    let pid = address(table)
        .and_then(|address| UnixStream::connect_addr(&address))
        .ok()
        .and_then(|stream| peer_pid(&stream));
    Holder { pid }
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
        assert_eq!(
            claim(&table).unwrap().unwrap_err(),
            Holder {
                pid: Some(std::process::id())
            }
        );
        assert!(held(&format!("{table}_other")).unwrap().is_none());
        drop(first);
        assert!(held(&table).unwrap().is_none());
        claim(&table).unwrap().unwrap();
    }
}
