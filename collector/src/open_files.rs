//! The open-file limit. Linux hands a process a soft limit of 1024 descriptors (for
//! select(2)'s sake; systemd's default too) under a far higher hard one, while the agent
//! holds one for each map, program and link (two or more per watched interface: hundreds
//! on a node with many pods) and one per HTTP connection, up to `[http] max_connections`.
//! Past the limit `accept` fails with EMFILE before that cap, which keeps a place for the
//! kubelet's probes, is reached. The agent uses no select(2), so it raises the soft limit
//! to the hard one at start, as the Go runtime does for Go exporters.

use std::io;

use crate::config::Config;

/// Descriptors left beside `max_connections` for the agent's own: its maps, programs and
/// netlink sockets (about 60), and two links per watched interface for a node of a
/// couple of hundred pods.
const BESIDE_HTTP: u64 = 512;

/// Raises the soft limit on open files to the hard one: the soft limit now.
pub fn raise_to_hard() -> io::Result<u64> {
    let limit = read()?;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: a valid rlimit, read above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_max)
}

/// The hard limit on open files: what [`raise_to_hard`] makes the soft one.
pub fn hard_limit() -> io::Result<u64> {
    read().map(|limit| limit.rlim_max)
}

fn read() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// What to warn of when `limit` leaves too few descriptors for `max_connections`.
#[must_use]
pub fn warning(limit: u64, config: &Config) -> Option<String> {
    let connections = u64::try_from(config.http.max_connections).unwrap_or(u64::MAX);
    (limit < connections.saturating_add(BESIDE_HTTP)).then(|| {
        format!(
            "the open-file limit is {limit}, fewer than [http] max_connections = {connections} \
             and {BESIDE_HTTP} more for the agent's maps, programs and links: connections are \
             then refused for want of descriptors (EMFILE) before that cap; raise the hard \
             limit (LimitNOFILE= in a systemd unit, --ulimit nofile= for a container) or lower \
             max_connections"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_short_of_the_connections_and_the_agents_own_is_warned_of() {
        let mut config = Config::embedded_default();
        config.http.max_connections = 512;
        assert_eq!(warning(1024, &config), None);
        let warned = warning(1023, &config).unwrap();
        assert!(
            warned.starts_with(
                "the open-file limit is 1023, fewer than [http] max_connections = 512 and 512"
            ),
            "{warned}"
        );
    }
}
