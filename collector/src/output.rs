//! The command line's standard output. A reader that stops early (`collector maps dump
//! CONN_STATE | head`) ends the command with status 0, as it ends a `collector events` tail:
//! `println!` panicked there ("failed printing to stdout") with status 101.

use std::io::{self, StdoutLock, Write as _};

/// Standard output's reader went away (a closed pipe): the command stops, and `main` exits 0.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct ReaderGone;

/// Runs `write` on the locked standard output and flushes it.
pub fn write(write: impl FnOnce(&mut StdoutLock<'static>) -> io::Result<()>) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    write(&mut out).and_then(|()| out.flush()).map_err(|err| {
        if err.kind() == io::ErrorKind::BrokenPipe {
            anyhow::Error::new(ReaderGone)
        } else {
            anyhow::Error::new(err).context("writing to standard output")
        }
    })
}

/// Whether standard output is a pipe whose reader went away. A watch that writes nothing
/// while its source is down (the figures' failure goes to standard error) learns it here,
/// where a write would tell it: `| head` ends it then, not when the source comes back.
pub fn reader_gone() -> bool {
    let mut stdout = libc::pollfd {
        fd: libc::STDOUT_FILENO,
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd, and a zero timeout: it only reads the descriptor's state.
    let ready = unsafe { libc::poll(&raw mut stdout, 1, 0) };
    ready == 1 && stdout.revents & libc::POLLERR != 0
}
