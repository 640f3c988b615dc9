//! Connection events from the kernel ring buffer: decoded, folded into client statistics
//! (heaviest clients) and offered to event subscribers. The kernel counts connections per
//! client in place in a tally table ([`crate::tally`]) and sends a client only when it
//! takes a slot there; opens and closes, for the event stream only, go out only while
//! someone reads it.
//! Open connections per client come from the kernel's connection table
//! ([`crate::client_table`]). The connection counters never depend on events: a full ring
//! loses events (counted in the kernel), not counts (only the agent's count of records
//! read, `collector_connection_events_received_total`, moves with the stream's readers).

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex, PoisonError},
};

use aya::maps::{MapData, RingBuf};
use collector_common::{
    CONN_EVENT_CLIENT, CONN_EVENT_CLOSE, CONN_EVENT_OPEN, ConnClientEvent, ConnEvent,
};

use crate::{
    client_table::ClientTable,
    snapshot::ClientSnapshot,
    tally::TallyTable,
    topk::{Listed, RecentTopK, TopK},
};

/// Clients tracked for the heavy-hitter list (Space-Saving: a listed client's count is at
/// most its `maxUndercount` below the true one, which stays small for the real heavy hitters
/// unless the clients are many and alike).
const TRACKED_CLIENTS: usize = 1024;
/// Clients listed in the snapshot.
const LISTED_CLIENTS: usize = 20;

/// A decoded connection event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    pub opened: bool,
    pub route: u32,
    pub cookie: u64,
    pub timestamp_ns: u64,
    pub duration_ns: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub client: IpAddr,
    pub client_port: u16,
}

#[cfg(test)]
impl Connection {
    /// The open of connection `cookie` on route 0 from 192.0.2.9:5000, for tests.
    pub fn opened_for_test(cookie: u64) -> Self {
        Self {
            opened: true,
            route: 0,
            cookie,
            timestamp_ns: 0,
            duration_ns: 0,
            bytes_in: 0,
            bytes_out: 0,
            client: IpAddr::from([192, 0, 2, 9]),
            client_port: 5000,
        }
    }
}

/// A decoded record of the connection ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRecord {
    /// An open or a close, sent while someone reads the event stream.
    Connection(Connection),
    /// A client taking a slot of the kernel's client table (its `tenure` there), for the
    /// connection that brought it; the previous tenure counted `replaced_count` more
    /// connections there. A `slot` beyond the table (`CLIENT_NO_SLOT`) stands for one
    /// connection counted outside it. Not streamed.
    Client {
        slot: u32,
        tenure: u32,
        replaced_count: u64,
        client: IpAddr,
    },
}

/// Reads a plain-data record from a ring-buffer item.
pub fn read_record<T: aya::Pod>(record: &[u8]) -> Option<T> {
    if record.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: the item holds at least one T (checked above); T is plain data, valid for any
    // bit pattern, and read_unaligned copes with the ring's alignment.
    Some(unsafe { record.as_ptr().cast::<T>().read_unaligned() })
}

/// Decodes one ring-buffer record; `None` for a record of the wrong size or kind.
#[must_use]
pub fn decode(record: &[u8]) -> Option<ConnRecord> {
    let kind = u32::from_ne_bytes(record.get(..4)?.try_into().ok()?);
    if kind == CONN_EVENT_CLIENT {
        let event: ConnClientEvent = read_record(record)?;
        return Some(ConnRecord::Client {
            slot: event.slot,
            tenure: event.tenure,
            replaced_count: event.replaced_count,
            client: Ipv6Addr::from(event.client_addr).to_canonical(),
        });
    }
    let event: ConnEvent = read_record(record)?;
    let opened = match event.kind {
        CONN_EVENT_OPEN => true,
        CONN_EVENT_CLOSE => false,
        _ => return None,
    };
    Some(ConnRecord::Connection(Connection {
        opened,
        route: event.route,
        cookie: event.cookie,
        timestamp_ns: event.timestamp_ns,
        duration_ns: event.duration_ns,
        bytes_in: event.bytes_in,
        bytes_out: event.bytes_out,
        client: Ipv6Addr::from(event.client_addr).to_canonical(),
        client_port: event.client_port,
    }))
}

/// Client statistics: connections opened per client, folded from the kernel's client
/// table and its events, and open connections per client, read from the kernel's
/// connection table. Open and close events feed only the event stream.
pub struct ClientStats {
    /// The kernel keeps per-client figures (`client_stats`).
    enabled: bool,
    opened_by_client: TopK<IpAddr>,
    /// Of late.
    recent: RecentTopK<IpAddr>,
    table: Option<ClientTable>,
    /// The kernel's client table: the client of each slot.
    clients: TallyTable<[u64; 2], IpAddr>,
    events_received: u64,
}

impl ClientStats {
    /// `table`: the kernel's connection table, mapped, `None` with `client_stats = false`;
    /// `clients`: its client table.
    #[must_use]
    pub fn new(table: Option<ClientTable>, clients: TallyTable<[u64; 2], IpAddr>) -> Self {
        Self {
            enabled: table.is_some(),
            opened_by_client: TopK::new(TRACKED_CLIENTS),
            recent: RecentTopK::new(TRACKED_CLIENTS),
            table,
            clients,
            events_received: 0,
        }
    }

    pub fn apply(&mut self, record: &ConnRecord) {
        self.events_received += 1;
        match *record {
            ConnRecord::Connection(_) => {}
            ConnRecord::Client {
                slot,
                tenure,
                replaced_count,
                client,
            } => {
                // The connection that brought the client.
                self.observe(&client, 1);
                if let Some((replaced, unfolded)) =
                    self.clients.claim(slot, tenure, replaced_count, client)
                {
                    self.observe(&replaced, unfolded);
                }
            }
        }
    }

    fn observe(&mut self, client: &IpAddr, opened: u64) {
        self.opened_by_client.observe(client, opened);
        self.recent.observe(client, opened);
    }

    /// The figures as of a poll at `now` (the poller's clock), the client table read first.
    /// `lost` is how many client events the kernel could not deliver since the start (a full
    /// ring): any of them could have been any listed client's, so each client's bound on
    /// what it may have opened more grows by all of them (of late, by those lost since the
    /// recent lists began).
    #[must_use]
    pub fn snapshot(
        &mut self,
        lost: impl FnOnce() -> u64,
        now: std::time::Duration,
    ) -> ClientSnapshot {
        for (client, opened) in self.clients.read() {
            self.observe(&client, opened);
        }
        // Read after the table: a record dropped meanwhile is missing from its counts.
        let lost = lost();
        let widened = |mut top: Vec<Listed<IpAddr>>, lost: u64| {
            for listed in &mut top {
                listed.error = listed.error.saturating_add(lost);
            }
            top
        };
        // After the reads: what the table counted since the last poll is the ending window's.
        let recent = self.recent.top(LISTED_CLIENTS, now, lost);
        ClientSnapshot {
            enabled: self.enabled,
            top: widened(self.opened_by_client.top(LISTED_CLIENTS), lost),
            recent: widened(recent.top, recent.lost),
            recent_seconds: recent.reach.as_secs_f64(),
            active: self
                .table
                .as_ref()
                .map(|table| busiest(table.open_by_client(), LISTED_CLIENTS))
                .unwrap_or_default(),
            events_received: self.events_received,
        }
    }
}

/// The `n` clients with the most open connections, most first (ties by address, so that
/// the order is stable between polls). It runs at each poll under the clients' lock, with a
/// client per open connection at worst: the `n` are picked in linear time and only they are
/// sorted.
fn busiest(counts: HashMap<IpAddr, u64>, n: usize) -> Vec<(IpAddr, u64)> {
    let order = |a: &(IpAddr, u64), b: &(IpAddr, u64)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
    let mut clients: Vec<_> = counts.into_iter().collect();
    if clients.len() > n && n > 0 {
        clients.select_nth_unstable_by(n - 1, order);
    }
    clients.truncate(n);
    clients.sort_unstable_by(order);
    clients
}

/// How often the ring is drained. The kernel side submits without waking us (a wakeup per
/// event is costly at high connection rates), so the ring must hold what arrives in between:
/// 1 MiB holds about 13,000 events, over half a second at 20,000 connections per second.
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Records one drain takes at most: more than a full 2 MiB ring holds of the smallest records
/// (40 bytes with the ring's header), 1.3 million a second at one drain per
/// [`DRAIN_INTERVAL`]. Without a bound, a kernel writing faster than the agent decodes (a
/// random-subdomain flood on a many-core host) would keep one drain going for ever: the
/// poll, which drains too, would stall and the batch grow without end. Past it the ring
/// fills and the kernel counts what it drops.
const MAX_RECORDS_PER_DRAIN: usize = 65_536;

/// What events are folded into.
pub trait Fold<E> {
    fn apply(&mut self, event: &E);
}

/// Whether an event becomes a line of the event stream. Only those go to its subscribers:
/// what a subscriber loses by falling behind is then counted in lines a reader would have
/// read, not in bookkeeping records (a client or a name taking a tally slot) that it skips.
pub trait Streamed {
    fn streamed(&self) -> bool;
}

impl Fold<ConnRecord> for ClientStats {
    fn apply(&mut self, event: &ConnRecord) {
        ClientStats::apply(self, event);
    }
}

/// Turns one ring record into an event (`None`: unknown kind or size). Stateful: the DNS
/// decoder remembers the names it decoded.
pub type Decoder<E> = Box<dyn FnMut(&[u8]) -> Option<E> + Send>;

/// Moves what a ring buffer holds into statistics and, what the stream shows of it
/// ([`Streamed`]), on to subscribers. Two callers share
/// it: a timer task, so that the ring never fills between polls, and the poller, right after
/// it reads the counters, so that a snapshot's per-client figures cover every connection its
/// counters do (the kernel submits an event before it counts).
pub struct RingDrain<E, S> {
    ring: RingBuf<MapData>,
    decode: Decoder<E>,
    stats: Arc<Mutex<S>>,
    subscribers: tokio::sync::broadcast::Sender<E>,
    batch: Vec<E>,
}

impl<E, S> RingDrain<E, S> {
    #[must_use]
    pub fn new(
        ring: RingBuf<MapData>,
        decode: Decoder<E>,
        stats: Arc<Mutex<S>>,
        subscribers: tokio::sync::broadcast::Sender<E>,
    ) -> Self {
        Self {
            ring,
            decode,
            stats,
            subscribers,
            batch: Vec::new(),
        }
    }
}

/// A ring drain whatever its event type, as the poller and the timer task hold it.
pub trait Drain: Send {
    /// Takes the records the ring holds now, up to [`MAX_RECORDS_PER_DRAIN`].
    fn drain(&mut self);
}

impl<E: Clone + Send + Streamed, S: Fold<E> + Send> Drain for RingDrain<E, S> {
    fn drain(&mut self) {
        for _ in 0..MAX_RECORDS_PER_DRAIN {
            let Some(record) = self.ring.next() else {
                break;
            };
            if let Some(event) = (self.decode)(&record) {
                self.batch.push(event);
            }
        }
        if self.batch.is_empty() {
            return;
        }
        {
            let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
            for event in &self.batch {
                stats.apply(event);
            }
        }
        for event in self.batch.drain(..) {
            if event.streamed() {
                // No subscriber is not an error.
                let _ = self.subscribers.send(event);
            }
        }
    }
}

pub type SharedDrain = Arc<Mutex<dyn Drain>>;

/// Drains every [`DRAIN_INTERVAL`] until the task is dropped. Each drain runs on the
/// runtime's blocking threads: one decodes up to [`MAX_RECORDS_PER_DRAIN`] records (tens of
/// milliseconds under a flood of new names), and in a container of one CPU the runtime has
/// one worker, whose HTTP handlers would wait behind it.
pub async fn drain_periodically(drain: SharedDrain) -> anyhow::Result<()> {
    let mut ticks = tokio::time::interval(DRAIN_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let drain = Arc::clone(&drain);
        tokio::task::spawn_blocking(move || {
            drain.lock().unwrap_or_else(PoisonError::into_inner).drain();
        })
        .await?;
    }
}

/// The drain of connection events into the client statistics.
#[must_use]
pub fn connection_drain(
    ring: RingBuf<MapData>,
    clients: Arc<Mutex<ClientStats>>,
    subscribers: tokio::sync::broadcast::Sender<ConnRecord>,
) -> SharedDrain {
    Arc::new(Mutex::new(RingDrain::new(
        ring,
        Box::new(decode),
        clients,
        subscribers,
    )))
}

#[cfg(test)]
mod tests {
    use collector_common::CLIENT_NO_SLOT;

    use super::*;

    fn record<E: Copy>(event: &E) -> Vec<u8> {
        // SAFETY: the event types are plain data; viewing one as bytes is sound.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(event).cast::<u8>(), size_of::<E>())
        }
        .to_vec()
    }

    fn client_claim(slot: u32, tenure: u32, replaced_count: u64, client: &str) -> ConnRecord {
        let client: IpAddr = client.parse().unwrap();
        let client_addr = match client {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let bytes = record(&ConnClientEvent::new(
            slot,
            tenure,
            replaced_count,
            client_addr,
        ));
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None);
        decode(&bytes).unwrap()
    }

    #[test]
    fn clients_counted_in_the_kernel_table_are_folded_once() {
        let (a, b) = ("192.0.2.1".parse().unwrap(), "2001:db8::2".parse().unwrap());
        let mut stats = ClientStats::new(None, TallyTable::unmapped(1));
        assert_eq!(
            client_claim(0, 1, 0, "192.0.2.1"),
            ConnRecord::Client {
                slot: 0,
                tenure: 1,
                replaced_count: 0,
                client: a
            }
        );
        // `a` takes the slot and counts 4 more there; `b` takes it from `a` at 6.
        stats.apply(&client_claim(0, 1, 0, "192.0.2.1"));
        stats.apply(&client_claim(0, 2, 6, "2001:db8::2"));
        // One connection of `b` counted outside the table.
        stats.apply(&client_claim(CLIENT_NO_SLOT, 0, 0, "2001:db8::2"));
        let snapshot = stats.snapshot(|| 0, std::time::Duration::ZERO);
        let top: Vec<_> = snapshot
            .top
            .iter()
            .map(|listed| (listed.key, listed.count, listed.error))
            .collect();
        assert_eq!(top, [(a, 7, 0), (b, 2, 0)]);
        assert_eq!(snapshot.events_received, 3);
        // Five client events the kernel dropped could each have been either's.
        // The recent list, within its first window, is the same.
        assert_eq!(snapshot.recent, snapshot.top);
        let widened = stats.snapshot(|| 5, std::time::Duration::from_secs(1));
        let bounds = |top: &[Listed<IpAddr>]| -> Vec<(u64, u64)> {
            top.iter()
                .map(|listed| (listed.count, listed.error))
                .collect()
        };
        assert_eq!(bounds(&widened.top), [(7, 5), (2, 5)]);
        assert_eq!(bounds(&widened.recent), [(7, 5), (2, 5)]);
    }

    #[test]
    fn decodes_mapped_ipv4_and_rejects_junk() {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12..].copy_from_slice(&[10, 1, 2, 3]);
        let event = ConnEvent {
            kind: CONN_EVENT_OPEN,
            route: 2,
            cookie: 77,
            client_addr: addr,
            client_port: 40000,
            ..ConnEvent::default()
        };
        let Some(ConnRecord::Connection(decoded)) = decode(&record(&event)) else {
            panic!("not a connection");
        };
        assert!(decoded.opened);
        assert_eq!(decoded.client, "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(
            (decoded.route, decoded.cookie, decoded.client_port),
            (2, 77, 40000)
        );
        assert_eq!(decode(&record(&event)[..10]), None);
        assert_eq!(decode(&record(&ConnEvent { kind: 9, ..event })), None);
    }

    #[test]
    fn open_and_close_events_only_feed_the_stream() {
        // No tables: open connections are then not known, and none are listed.
        let mut stats = ClientStats::new(None, TallyTable::unmapped(0));
        let open = Connection {
            opened: true,
            route: 0,
            cookie: 1,
            timestamp_ns: 0,
            duration_ns: 0,
            bytes_in: 0,
            bytes_out: 0,
            client: "192.0.2.1".parse().unwrap(),
            client_port: 1,
        };
        stats.apply(&ConnRecord::Connection(open));
        stats.apply(&ConnRecord::Connection(open));
        stats.apply(&ConnRecord::Connection(Connection {
            opened: false,
            ..open
        }));
        let snapshot = stats.snapshot(|| 0, std::time::Duration::ZERO);
        // The kernel counted those connections in its client table, not through the events.
        assert!(snapshot.top.is_empty());
        assert!(snapshot.active.is_empty());
        assert_eq!(snapshot.events_received, 3);
    }

    #[test]
    fn busiest_clients_come_first_and_ties_by_address() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let counts = HashMap::from([
            (ip("192.0.2.9"), 1),
            (ip("192.0.2.3"), 4),
            (ip("2001:db8::1"), 2),
            (ip("192.0.2.7"), 2),
        ]);
        assert_eq!(
            busiest(counts, 3),
            [
                (ip("192.0.2.3"), 4),
                (ip("192.0.2.7"), 2),
                (ip("2001:db8::1"), 2)
            ]
        );
        // Many more clients than listed, the busiest scattered among them and tied across
        // the cut (97 counts among 10,000 clients).
        let many: HashMap<IpAddr, u64> = (0..10_000u32)
            .map(|i| {
                (
                    IpAddr::from(i.to_be_bytes()),
                    u64::from(i.wrapping_mul(7919) % 97),
                )
            })
            .collect();
        let mut all: Vec<(IpAddr, u64)> = many.clone().into_iter().collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(20);
        assert_eq!(busiest(many, 20), all);
        assert!(busiest(HashMap::from([(ip("192.0.2.1"), 1)]), 0).is_empty());
    }
}
