//! The log: lines to standard error, as text or JSON, from `info` on unless `RUST_LOG` says
//! otherwise, written from a queue by a thread of their own. A log reader that stops (a
//! stuck journald, a container runtime's full log pipe, a FIFO nobody drains) then costs
//! lines, counted in `collector_log_lines_dropped_total`, instead of stalling the poll loop
//! on a blocking write to stderr.

use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// Lines queued for stderr before new ones are dropped.
const QUEUED_LINES: usize = 65_536;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Log lines dropped because stderr was not read fast enough.
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |counter| {
        u64::try_from(counter.dropped_lines()).unwrap_or(u64::MAX)
    })
}

/// Starts logging to stderr; the lines still queued are written when the guard is dropped.
pub fn init(json: bool) -> WorkerGuard {
    let (filter, refused) = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("collector-log")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if json {
        logs.json().flatten_event(true).init();
    } else {
        logs.with_ansi(ansi).init();
    }
    if let Some(refused) = refused {
        tracing::warn!("{refused}");
    }
    guard
}

/// netlink-packet-route warns about every attribute newer than itself (each interface, each
/// poll): quiet unless `RUST_LOG` names it.
const QUIET_NETLINK: &str = "netlink_packet_route=error";

/// The log filter for `RUST_LOG` (`info` when unset, empty or unreadable, with why in the
/// second value).
fn log_filter(spec: Option<&str>) -> (tracing_subscriber::EnvFilter, Option<String>) {
    use tracing_subscriber::EnvFilter;
    let spec = spec.filter(|spec| !spec.trim().is_empty());
    let (filter, refused) = match spec.map(EnvFilter::try_new) {
        None => (EnvFilter::new("info"), None),
        Some(Ok(filter)) => (filter, None),
        Some(Err(err)) => (
            EnvFilter::new("info"),
            Some(format!(
                "RUST_LOG={:?} is not a valid filter ({err}): logging from info on",
                spec.unwrap_or_default()
            )),
        ),
    };
    let names_netlink = spec.is_some_and(|spec| spec.contains("netlink_packet_route"));
    let filter = match QUIET_NETLINK.parse() {
        Ok(quiet) if !names_netlink => filter.add_directive(quiet),
        _ => filter,
    };
    (filter, refused)
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn rust_log_keeps_netlink_quiet_unless_it_names_it() {
        for spec in [None, Some(""), Some("info,collector::address_table=debug")] {
            let (filter, refused) = log_filter(spec);
            assert!(refused.is_none(), "{spec:?}");
            assert!(
                filter.to_string().contains("netlink_packet_route=error"),
                "{spec:?}: {filter}"
            );
        }
        let (filter, _) = log_filter(Some("debug,netlink_packet_route=warn"));
        assert!(
            !filter.to_string().contains("netlink_packet_route=error"),
            "{filter}"
        );
        assert!(
            filter.to_string().contains("netlink_packet_route=warn"),
            "{filter}"
        );
    }

    #[test]
    fn an_unreadable_rust_log_is_said_and_info_used() {
        let (filter, refused) = log_filter(Some("info,foo=notalevel"));
        let refused = refused.expect("refused");
        assert!(
            refused.contains("RUST_LOG=\"info,foo=notalevel\""),
            "{refused}"
        );
        assert_eq!(filter.to_string(), "netlink_packet_route=error,info");
    }
}
