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
