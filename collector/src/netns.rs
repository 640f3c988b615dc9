//! The network namespace the agent runs in, as the kernel's namespace cookie: the `sock_ops`
//! program counts only sockets whose namespace has this cookie.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// `SO_NETNS_COOKIE` (Linux 5.14), not yet in every libc binding.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Cookie of the calling thread's network namespace.
pub fn current_cookie() -> io::Result<u64> {
    // Any socket will do: its namespace is the one it was created in, ours. Unbound: a bind
    // took an ephemeral port at every poll, and a cgroup's bind hook could refuse it.
    // SAFETY: plain arguments; the descriptor is checked, then owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just opened, owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
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

/// Runs `f` on a thread of its own in a new network namespace, gone with the thread: for the
/// unit tests that need one (they run as root).
#[cfg(test)]
pub fn in_new_namespace<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(|| {
        // SAFETY: unshare on this thread only; no other state depends on its namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET) needs root: {}",
            io::Error::last_os_error()
        );
        f()
    })
    .join()
    .unwrap()
}

/// Runs `ip` with `args` in the calling thread's network namespace, for the unit tests.
#[cfg(test)]
pub fn ip(args: &str) {
    let status = std::process::Command::new("ip")
        .args(args.split(' '))
        .status()
        .unwrap();
    assert!(status.success(), "ip {args}");
}
