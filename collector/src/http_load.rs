//! What the HTTP side turned away at its `[http]` limits, how many event streams are open and
//! the bytes of answers held unsent, for `/metrics`: a scrape or a stream answered 503, or a
//! connection closed unanswered, shows in a series an alert can read, not only in the debug
//! log.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::unsent_answers::{Lease, UnsentAnswers};

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
    /// `max_unsent_bytes`: the connection of an answer its reader had not taken when newer
    /// answers needed the room, closed mid-answer.
    UnsentBytes,
}

impl Limit {
    pub const ALL: [Self; 6] = [
        Self::Requests,
        Self::EventStreams,
        Self::PasswordChecks,
        Self::Connections,
        Self::RequestTimeout,
        Self::UnsentBytes,
    ];

    /// The `limit` label.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::EventStreams => "event_streams",
            Self::PasswordChecks => "password_checks",
            Self::Connections => "connections",
            Self::RequestTimeout => "request_timeout",
            Self::UnsentBytes => "unsent_bytes",
        }
    }
}

/// Shared by the HTTP side, which counts, and the metrics, which read.
#[derive(Debug)]
pub struct HttpLoad {
    refused: [AtomicU64; Limit::ALL.len()],
    /// One permit per open event stream (`max_event_streams` in all): the cap, and what the
    /// gauge of open streams reads.
    streams: Arc<Semaphore>,
    max_streams: usize,
    unsent: Arc<UnsentAnswers>,
}

impl HttpLoad {
    pub fn new(max_streams: usize, max_unsent_bytes: u64) -> Self {
        Self {
            refused: Default::default(),
            streams: Arc::new(Semaphore::new(max_streams)),
            max_streams,
            unsent: UnsentAnswers::new(max_unsent_bytes),
        }
    }

    pub fn refuse(&self, limit: Limit) {
        self.refused[limit as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Turned away so far, by limit.
    pub fn refusals(&self) -> impl Iterator<Item = (Limit, u64)> + '_ {
        Limit::ALL
            .into_iter()
            .map(|limit| (limit, self.refused[limit as usize].load(Ordering::Relaxed)))
    }

    /// A place for one more event stream, held for as long as its body lives; `None` at the
    /// cap, counted as refused.
    pub fn stream_place(&self) -> Option<OwnedSemaphorePermit> {
        let place = Arc::clone(&self.streams).try_acquire_owned().ok();
        if place.is_none() {
            self.refuse(Limit::EventStreams);
        }
        place
    }

    pub fn open_streams(&self) -> u64 {
        (self.max_streams - self.streams.available_permits()) as u64
    }

    /// Counts an answer of `bytes` on the connection `cut` closes until the lease is dropped;
    /// older answers whose connections are closed to make room count as refused (see
    /// [`UnsentAnswers::hold`]).
    pub fn hold_answer(&self, bytes: u64, cut: Arc<Notify>) -> Lease {
        let (lease, closed) = self.unsent.hold(bytes, cut);
        self.refused[Limit::UnsentBytes as usize].fetch_add(closed as u64, Ordering::Relaxed);
        lease
    }

    /// Bytes of the answers held for their readers now.
    pub fn unsent_bytes(&self) -> u64 {
        self.unsent.held()
    }
}

/// No stream place: for renderings of the metrics that serve none.
#[cfg(test)]
impl Default for HttpLoad {
    fn default() -> Self {
        Self::new(0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_count_by_limit_and_streams_while_held() {
        let load = HttpLoad::new(1, 10);
        let first = load.stream_place().unwrap();
        assert!(load.stream_place().is_none());
        assert!(load.stream_place().is_none());
        load.refuse(Limit::Connections);
        let _older = load.hold_answer(6, Arc::new(Notify::new()));
        let _newer = load.hold_answer(6, Arc::new(Notify::new()));
        assert_eq!(load.unsent_bytes(), 6);
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
                ("request_timeout", 0),
                ("unsent_bytes", 1)
            ]
        );
        assert_eq!(load.open_streams(), 1);
        drop(first);
        assert_eq!(load.open_streams(), 0);
        let _second = load.stream_place().unwrap();
        assert_eq!(load.open_streams(), 1);
    }
}
