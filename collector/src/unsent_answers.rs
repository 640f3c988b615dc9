//! Answers held for readers that have not taken them yet, in bytes, within
//! `[http] max_unsent_bytes`. A reader that stops reading leaves its answer with the agent (the
//! kernel keeps little of it: see `serve::tune_accepted`), and every connection may hold one:
//! 512 answers of /metrics with 256 routes are 600 MB. Over the budget, the connections of the
//! oldest answers are closed, so the newest, a scrape just made, is served.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use tokio::sync::Notify;

/// The answers held, oldest first, within a budget.
#[derive(Debug)]
pub struct UnsentAnswers {
    budget: u64,
    ledger: Mutex<Ledger>,
}

#[derive(Debug, Default)]
struct Ledger {
    held: u64,
    /// Names each answer; answers held longest have the lowest.
    next: u64,
    answers: BTreeMap<u64, Answer>,
}

#[derive(Debug)]
struct Answer {
    bytes: u64,
    /// Closes the answer's connection.
    cut: Arc<Notify>,
}

/// An answer's bytes, counted until the lease is dropped.
#[derive(Debug)]
pub struct Lease {
    answers: Arc<UnsentAnswers>,
    id: u64,
}

impl UnsentAnswers {
    /// None held yet, within `budget` bytes.
    pub fn new(budget: u64) -> Arc<Self> {
        Arc::new(Self {
            budget,
            ledger: Mutex::default(),
        })
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts `bytes` of an answer on the connection `cut` closes, until the lease is
    /// dropped. Where that takes the answers held over the budget, the connections of the
    /// oldest are told to close, and their answers no longer count, until the rest fit; the
    /// new answer stays whatever its size. Returns the lease and how many were told.
    pub fn hold(self: &Arc<Self>, bytes: u64, cut: Arc<Notify>) -> (Lease, usize) {
        let mut ledger = self.ledger();
        let mut closed = 0;
        while ledger.held + bytes > self.budget {
            let Some((_, oldest)) = ledger.answers.pop_first() else {
                break;
            };
            ledger.held -= oldest.bytes;
            oldest.cut.notify_one();
            closed += 1;
        }
        let id = ledger.next;
        ledger.next += 1;
        ledger.held += bytes;
        ledger.answers.insert(id, Answer { bytes, cut });
        let lease = Lease {
            answers: Arc::clone(self),
            id,
        };
        (lease, closed)
    }

    /// Bytes of the answers held now.
    pub fn held(&self) -> u64 {
        self.ledger().held
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut ledger = self.answers.ledger();
        // Gone already if its connection was told to close.
        if let Some(answer) = ledger.answers.remove(&self.id) {
            ledger.held -= answer.bytes;
        }
    }
}

/// `data` holding `lease`: hyper queues a body's data until the connection has written it,
/// so the answer is counted until then, not only until hyper took it from the body.
pub fn leased(data: Bytes, lease: &Arc<Lease>) -> Bytes {
    Bytes::from_owner(LeasedData {
        data,
        _lease: Arc::clone(lease),
    })
}

struct LeasedData {
    data: Bytes,
    _lease: Arc<Lease>,
}

impl AsRef<[u8]> for LeasedData {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt as _;

    use super::*;

    fn told(cut: &Notify) -> bool {
        cut.notified().now_or_never().is_some()
    }

    #[test]
    fn over_the_budget_the_oldest_answers_give_way_and_the_newest_stays() {
        let answers = UnsentAnswers::new(100);
        let cuts: Vec<Arc<Notify>> = (0..4).map(|_| Arc::new(Notify::new())).collect();
        let (first, closed) = answers.hold(40, Arc::clone(&cuts[0]));
        assert_eq!(closed, 0);
        let (second, _) = answers.hold(40, Arc::clone(&cuts[1]));
        assert_eq!(answers.held(), 80);
        // 120 would not fit: the oldest gives way, no more.
        let (third, closed) = answers.hold(40, Arc::clone(&cuts[2]));
        assert_eq!((closed, answers.held()), (1, 80));
        assert!(told(&cuts[0]));
        assert!(!told(&cuts[1]) && !told(&cuts[2]));
        // The lease of an answer given way counts nothing more when it goes.
        drop(first);
        assert_eq!(answers.held(), 80);
        // An answer larger than the budget is held alone.
        let (large, closed) = answers.hold(150, Arc::clone(&cuts[3]));
        assert_eq!((closed, answers.held()), (2, 150));
        assert!(told(&cuts[1]) && told(&cuts[2]) && !told(&cuts[3]));
        drop((second, third));
        assert_eq!(answers.held(), 150);
        drop(large);
        assert_eq!(answers.held(), 0);
    }

    #[test]
    fn an_answer_counts_until_its_last_data_is_dropped() {
        let answers = UnsentAnswers::new(100);
        let (lease, _) = answers.hold(5, Arc::new(Notify::new()));
        let lease = Arc::new(lease);
        let data = leased(Bytes::from_static(b"hello"), &lease);
        let part = data.slice(1..3);
        drop((lease, data));
        assert_eq!(answers.held(), 5);
        assert_eq!(&part[..], b"el");
        drop(part);
        assert_eq!(answers.held(), 0);
    }
}
