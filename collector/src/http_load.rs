//! What the HTTP side turned away at its `[http]` limits, and how many event streams are
//! open, for `/metrics`: a scrape or a stream answered 503, or a connection closed unanswered,
//! shows in a series an alert can read, not only in the debug log.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

/// The limit a request or a connection met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `max_concurrent_requests`: answered 503.
    Requests,
    /// `max_event_streams`: answered 503.
    EventStreams,
    /// Wrong or unchecked passwords waiting for their turn at the bcrypt check: answered 503.
    PasswordChecks,
    /// `max_connections` or `max_connections_per_address`, with every connection that could
    /// give way in a request: closed unanswered.
    Connections,
    /// `request_timeout_ms` passed before the answer was ready: answered 503.
    RequestTimeout,
}

impl Limit {
    pub const ALL: [Self; 5] = [
        Self::Requests,
        Self::EventStreams,
        Self::PasswordChecks,
        Self::Connections,
        Self::RequestTimeout,
    ];

    /// The `limit` label.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::EventStreams => "event_streams",
            Self::PasswordChecks => "password_checks",
            Self::Connections => "connections",
            Self::RequestTimeout => "request_timeout",
        }
    }
}

/// Shared by the HTTP side, which counts, and the metrics, which read.
#[derive(Debug, Default)]
pub struct HttpLoad {
    refused: [AtomicU64; Limit::ALL.len()],
    open_streams: AtomicU64,
}

impl HttpLoad {
    pub fn refuse(&self, limit: Limit) {
        self.refused[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Turned away so far, by limit.
    pub fn refusals(&self) -> impl Iterator<Item = (Limit, u64)> + '_ {
        Limit::ALL
            .into_iter()
            .map(|limit| (limit, self.refused[limit as usize].load(Ordering::Relaxed)))
    }

    /// A stream was admitted: open until the returned value drops (with the stream's body).
    pub fn stream_opened(self: &Arc<Self>) -> OpenStream {
        self.open_streams.fetch_add(1, Ordering::Relaxed);
        OpenStream(Arc::clone(self))
    }

    pub fn open_streams(&self) -> u64 {
        self.open_streams.load(Ordering::Relaxed)
    }
}

/// One open event stream, counted while held.
#[derive(Debug)]
pub struct OpenStream(Arc<HttpLoad>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_count_by_limit_and_streams_while_held() {
        let load = Arc::new(HttpLoad::default());
        load.refuse(Limit::EventStreams);
        load.refuse(Limit::EventStreams);
        load.refuse(Limit::Connections);
        let counted: Vec<(&str, u64)> = load
            .refusals()
            .map(|(limit, count)| (limit.label(), count))
            .collect();
        assert_eq!(
            counted,
            [
                ("requests", 0),
                ("event_streams", 2),
                ("password_checks", 0),
                ("connections", 1),
                ("request_timeout", 0)
            ]
        );
        let first = load.stream_opened();
        let second = load.stream_opened();
        assert_eq!(load.open_streams(), 2);
        drop(first);
        assert_eq!(load.open_streams(), 1);
        drop(second);
        assert_eq!(load.open_streams(), 0);
    }
}
