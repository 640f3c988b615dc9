//! The network namespace the agent runs in, as the kernel's namespace cookie: the `sock_ops`
//! program counts only sockets whose namespace has this cookie.

use std::{io, net::UdpSocket, os::fd::AsRawFd};

/// `SO_NETNS_COOKIE` (Linux 5.14), not yet in every libc binding.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Cookie of the calling thread's network namespace.
pub fn current_cookie() -> io::Result<u64> {
    // Any socket will do: its namespace is the one it was created in, ours.
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).map_err(io::Error::other)?;
    // SAFETY: valid fd, and `cookie`/`len` point to writable memory of the stated size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
