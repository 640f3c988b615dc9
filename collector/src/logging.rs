//! The log: lines to standard error, as text or JSON, from `info` on unless `RUST_LOG` says
//! otherwise. The agent, once it has dropped its capabilities, writes them from a queue by a
//! thread of their own ([`write_from_queue`]): a log reader that stops (a stuck journald, a
//! container runtime's full log pipe, a FIFO nobody drains) then costs lines, counted in
//! `collector_log_lines_dropped_total`, instead of stalling the poll loop on a blocking
//! write to stderr. Until then, and in the CLI's commands, lines go straight to stderr: the
//! writer thread must start after the drop, since capabilities are per thread and it would
//! keep the set it was started with.

use std::sync::{Mutex, OnceLock};

use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::{MakeWriter, writer::EitherWriter};

/// Lines queued for stderr before new ones are dropped.
const QUEUED_LINES: usize = 65_536;

/// The queue's writer, once started.
static QUEUE: OnceLock<NonBlocking> = OnceLock::new();

/// Writes what is still queued when dropped ([`flush`]).
static QUEUE_GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);

/// Where each line goes: the queue once started, stderr until then.
struct LogWriter;

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = EitherWriter<NonBlocking, std::io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        match QUEUE.get() {
            Some(queue) => EitherWriter::A(queue.clone()),
            None => EitherWriter::B(std::io::stderr()),
        }
    }
}

/// Log lines dropped because stderr was not read fast enough.
pub fn dropped_lines() -> u64 {
    QUEUE.get().map_or(0, |queue| {
        u64::try_from(queue.error_counter().dropped_lines()).unwrap_or(u64::MAX)
    })
}

/// Starts logging to stderr.
pub fn init(json: bool) {
    let (filter, refused) = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogWriter);
    if json {
        logs.json().flatten_event(true).init();
    } else {
        logs.with_ansi(ansi).init();
    }
    if let Some(refused) = refused {
        tracing::warn!("{refused}");
    }
    // A panic of the main thread, which runs the poll loop, ends the process: the lines that
    // led to it are written out first. (Another thread's is a task's, and the agent goes on.)
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some("main") {
            flush();
        }
        previous(info);
    }));
}

/// From now on, lines go through the queue and its writer thread, started here (call it
/// after the capability drop, which that thread then shares).
pub fn write_from_queue() {
    let (queue, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("collector-log")
        .finish(std::io::stderr());
    if QUEUE.set(queue).is_ok()
        && let Ok(mut slot) = QUEUE_GUARD.lock()
    {
        *slot = Some(guard);
    }
}

/// Writes the lines still queued (before the process exits).
pub fn flush() {
    if let Ok(mut slot) = QUEUE_GUARD.lock() {
        slot.take();
    }
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
