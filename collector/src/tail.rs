//! `collector events`: tails a running agent's `/api/v1/events` and prints each event as one
//! line of JSON on stdout, until the agent stops or the reader goes away.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
};

use anyhow::{Context as _, bail};

/// Streams the agent's events at `agent` to stdout.
pub fn events(agent: SocketAddr) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(agent).with_context(|| {
        format!("connecting to the collector at {agent} (is it running? see --listen)")
    })?;
    write!(
        stream,
        "GET /api/v1/events HTTP/1.1\r\nHost: {agent}\r\nAccept: application/x-ndjson\r\n\r\n"
    )?;
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        bail!("the collector at {agent} answered {}", status.trim_end());
    }
    let mut chunked = false;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if line.eq_ignore_ascii_case("transfer-encoding: chunked") {
            chunked = true;
        }
    }
    let mut out = std::io::stdout().lock();
    if !chunked {
        std::io::copy(&mut reader, &mut out)?;
        return Ok(());
    }
    // HTTP/1.1 chunked transfer coding: a hex size line, the bytes, CRLF; size 0 ends it.
    loop {
        let mut size = String::new();
        if reader.read_line(&mut size)? == 0 {
            return Ok(());
        }
        let size = usize::from_str_radix(size.trim_end().split(';').next().unwrap_or(""), 16)
            .context("reading the event stream: a malformed chunk size")?;
        if size == 0 {
            return Ok(());
        }
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk)?;
        chunk.truncate(size);
        if out.write_all(&chunk).and_then(|()| out.flush()).is_err() {
            // The reader went away (a closed pipe): not an error for a tail.
            return Ok(());
        }
    }
}
