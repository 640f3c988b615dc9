//! Signals that arrive before the async runtime listens for them. Loading and attaching the
//! programs takes a while, and a SIGTERM then (`systemctl stop` or a pod deleted right after
//! a start) used to kill the agent with everything it had attached; a SIGHUP, which
//! operators and tools send to mean "reload", killed it at any time. A SIGTERM or SIGINT now
//! leaves a mark here, and the stop is carried out once the start is done, with everything
//! detached; a SIGHUP does nothing.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn note_stop(_signal: libc::c_int) {
    // Async-signal-safe: one atomic store.
    STOP_REQUESTED.store(true, Ordering::Relaxed);
}

extern "C" fn ignore(_signal: libc::c_int) {}

/// Catches SIGTERM and SIGINT as a stop request and SIGHUP as nothing, until the runtime's
/// own handlers take over (they chain to these, so a request seen by either is kept).
/// A handler rather than `SIG_IGN` for SIGHUP: children (`nft`) get back the default.
pub fn catch_while_starting() -> std::io::Result<()> {
    for (signal, handler) in [
        (libc::SIGTERM, note_stop as extern "C" fn(libc::c_int)),
        (libc::SIGINT, note_stop),
        (libc::SIGHUP, ignore),
    ] {
        // SAFETY: a zeroed sigaction with an empty mask and a handler that only stores an
        // atomic (or does nothing) is a valid disposition.
        let installed = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&raw mut action.sa_mask);
            libc::sigaction(signal, &raw const action, std::ptr::null_mut())
        };
        if installed != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Holds SIGTERM, SIGINT and SIGHUP back from this thread, and from the threads it starts
/// meanwhile, until dropped; then a signal that came is handled as any other. For loading
/// programs: a signal handled during a load interrupts the verifier, which gives up with
/// EAGAIN, and aya then loads the program again with a verifier log, over and over with a
/// larger log each time, which took a stop asked for during a start from 2 to 14 s here
/// (at aeec46e), and signals sent again and again failed the start.
pub fn hold() -> std::io::Result<Held> {
    // SAFETY: sigset_t is plain data, for which all zeroes is a valid value; sigemptyset
    // initialises `held`, and pthread_sigmask writes `before`.
    let (mut held, mut before): (libc::sigset_t, libc::sigset_t) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: valid pointers to sets owned here.
    let blocked = unsafe {
        libc::sigemptyset(&raw mut held);
        for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&raw mut held, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &raw const held, &raw mut before)
    };
    if blocked != 0 {
        return Err(std::io::Error::from_raw_os_error(blocked));
    }
    Ok(Held {
        before,
        _this_thread: std::marker::PhantomData,
    })
}

/// The signal mask from before [`hold`], put back when dropped, on the thread that held it
/// (not `Send`: a signal mask is per thread).
pub struct Held {
    before: libc::sigset_t,
    _this_thread: std::marker::PhantomData<*const ()>,
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: the mask read by `hold` on this thread.
        unsafe {
            libc::pthread_sigmask(
                libc::SIG_SETMASK,
                &raw const self.before,
                std::ptr::null_mut(),
            )
        };
    }
}

/// A SIGTERM or SIGINT has arrived since [`catch_while_starting`].
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::Relaxed)
}
