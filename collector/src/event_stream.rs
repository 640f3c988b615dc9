//! The event stream, `/api/v1/events`: connection and DNS events as NDJSON, one JSON object
//! per line, tagged by `event` (`connection-open`, `connection-close`, `query-received`,
//! `query-answered`; and `heartbeat`, `lost` and, at a clean stop, `end`). Events come from the kernel's ring buffers through broadcast channels;
//! a subscriber that falls behind loses the oldest ones. Its stream then says so where the
//! gap is, with a `lost` line carrying how many it lost there, and
//! `collector_event_stream_lagged_total` counts them. Events the kernel's rings had no room
//! for never reach the agent: each stream says how many it lost so at the next poll (a
//! `lost` line of its own cause), from the kernel's drop counters. A stream that ends (its
//! reader gone, or cut off by `TCP_USER_TIMEOUT`) adds there what was sent to it and it never took, so
//! that a reader that stops reading for good is counted too. Only events that would be
//! lines go to subscribers ([`crate::events::Streamed`]), so both count lines. Lines the
//! stream wrote that were still in the socket's buffers when the reader went are beyond
//! its sight and not counted. The kernel's counters never depend on events.
//!
//! A stream with nothing to send for [`HEARTBEAT_INTERVAL`] sends a `heartbeat` line, with
//! only a `timestamp` (NDJSON has no comment lines, so it is an event like the others, for
//! readers to skip): a reader lost without a word (a partition, a node gone) then leaves
//! data unacknowledged, which ends its connection within the server's `TCP_USER_TIMEOUT`
//! (see `serve`) and frees its stream permit, as a quiet host would otherwise never write
//! to it again; and proxies in between with idle timeouts keep the stream open.

use std::{
    borrow::Cow,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::sync::broadcast::{
    self,
    error::{RecvError, TryRecvError},
};

use crate::{
    dns::{DnsEvent, qtype_mnemonic, rcode_mnemonic},
    events::{ConnRecord, Connection, Streamed},
    loader::WatchedRoute,
};

/// Longest a stream goes without a line: then a [`StreamEvent::Heartbeat`].
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);

/// Connection events a subscriber may fall behind by before it loses the oldest: as many as
/// the kernel's ring holds (a power of two, as the channel rounds to), since a drain sends
/// what it took from the ring at once. A drain held up (a sidecar's CPU quota throttled for
/// its 100 ms period, a slow poll) then does not outrun a reader that keeps up; with 4096,
/// 150 ms of 14,000 connections a second did, and the reader was blamed.
pub const CONNECTION_BACKLOG: usize = (collector_common::CONN_EVENTS_BYTES as usize
    / (RING_RECORD_HEADER + size_of::<collector_common::ConnEvent>()))
.next_power_of_two();
/// The kernel ring's header before each record.
const RING_RECORD_HEADER: usize = 8;
/// DNS events a subscriber may fall behind by before it loses the oldest: as many lines as
/// the kernel's ring holds, for the same reason. With 16384 (until 2026-12-07), a drain held
/// up for a second at 8,000 queries a second (their answers too) sent more at once than the
/// backlog, and a reader keeping up was told `reader-behind`. 65536 slots of some 100 bytes,
/// allocated at start.
pub const DNS_BACKLOG: usize =
    (collector_common::DNS_EVENTS_BYTES as usize / SHORTEST_DNS_LINE_RECORD).next_power_of_two();
/// The ring's shortest record that becomes a line: an answer's (a query's, with the root's
/// one-byte name, rounds up to as many, the kernel's ring keeping records 8-byte aligned).
const SHORTEST_DNS_LINE_RECORD: usize =
    RING_RECORD_HEADER + size_of::<collector_common::DnsAnswerEvent>();
const _: () = assert!(
    (RING_RECORD_HEADER + size_of::<collector_common::DnsQueryEvent>() + 1).next_multiple_of(8)
        >= SHORTEST_DNS_LINE_RECORD
);

/// What every stream of this run is made of, said in its first line: a reader scales the
/// sampled lines by it, and one that connects again tells a restart by another
/// `runStartedAt` (any reconnect loses what happened between; a restart also zeroed the
/// agent's figures).
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StreamTerms {
    /// When this run of the agent began serving, in milliseconds since the Unix epoch.
    pub run_started_at: u64,
    /// Connection lines come (`client_stats = true`).
    pub connection_events: bool,
    /// DNS lines come (`[dns] enabled = true`).
    pub dns_events: bool,
    /// `query-received` lines are one query in this many (`[dns] sample_every`).
    pub sample_every: u32,
    /// `query-answered` lines are the streamed queries also in the one in this many that
    /// are matched to their response (`[dns] match_every`); `None` with
    /// `match_responses = false`, when there are none.
    pub match_every: Option<u32>,
}

impl StreamTerms {
    /// The terms `config` makes, for a run that began serving at `run_started_at`.
    #[must_use]
    pub fn of(config: &crate::config::Config, run_started_at: u64) -> Self {
        Self {
            run_started_at,
            connection_events: config.client_stats,
            dns_events: config.dns.enabled,
            sample_every: config.dns.sample_every,
            match_every: config.dns.match_responses.then_some(config.dns.match_every),
        }
    }
}

/// One line of the stream.
#[derive(Debug, Serialize, PartialEq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum StreamEvent {
    /// The first line of every stream.
    Start {
        timestamp: u64,
        #[serde(flatten)]
        terms: StreamTerms,
    },
    #[serde(rename_all = "camelCase")]
    ConnectionOpen {
        /// The socket cookie: the same in the connection's close event.
        connection_id: u64,
        /// The route's type (http, https, websocket, tcp).
        #[serde(rename = "type")]
        kind: &'static str,
        route_name: String,
        client_ip: String,
        client_port: u16,
        /// Milliseconds since the Unix epoch.
        timestamp: u64,
    },
    /// With the open's route type and client port: a stream that began after the open
    /// (the usual case for a long connection) has the close alone.
    #[serde(rename_all = "camelCase")]
    ConnectionClose {
        connection_id: u64,
        #[serde(rename = "type")]
        kind: &'static str,
        route_name: String,
        /// Seconds.
        duration: f64,
        /// Payload bytes in both directions.
        bytes_transferred: u64,
        bytes_in: u64,
        bytes_out: u64,
        client_ip: String,
        client_port: u16,
        timestamp: u64,
    },
    #[serde(rename_all = "camelCase")]
    QueryReceived {
        /// The exact QTYPE: its mnemonic ([`crate::dns::iana_mnemonic`]), or `TYPEn` (RFC
        /// 3597) where it has none (never the counters' `OTHER`).
        #[serde(rename = "type")]
        qtype: String,
        /// `None` when the name could not be decoded.
        domain: Option<String>,
        /// Client address and port.
        source: String,
        client_ip: String,
        id: u16,
        timestamp: u64,
    },
    #[serde(rename_all = "camelCase")]
    QueryAnswered {
        /// True for an inferred cache hit (no upstream query for the name and type); `null`
        /// for a response relayed from another namespace's server, or without a question,
        /// which cannot be told.
        cached: Option<bool>,
        /// Seconds from query to response.
        response_time: f64,
        response_code: Cow<'static, str>,
        /// As in `QueryReceived`; `TYPE0` for a response without a question.
        #[serde(rename = "type")]
        qtype: String,
        /// Client address and port, as its query's: with `id`, what joins the two (one
        /// address alone sends many queries at once from a resolver or a NAT).
        source: String,
        client_ip: String,
        id: u16,
        truncated: bool,
        timestamp: u64,
    },
    /// Nothing else to send for [`HEARTBEAT_INTERVAL`].
    Heartbeat { timestamp: u64 },
    /// `count` events of `stream` were lost here, for the `cause` given.
    Lost {
        count: u64,
        timestamp: u64,
        cause: LostCause,
        stream: LostStream,
    },
    /// The agent stops and the stream ends here, with everything sent before the stop: a
    /// reader can tell that from a stream cut off, also where no chunked framing marks it
    /// (an HTTP/1.0 proxy in between).
    End { timestamp: u64 },
}

/// Why a stream lost events.
#[derive(Debug, Serialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
pub enum LostCause {
    /// The stream fell that far behind, and the oldest of what it had not read were
    /// dropped.
    ReaderBehind,
    /// The kernel's ring buffers were full (the agent fell behind, or was paused): that
    /// many of the stream's lines never reached the agent (the rings' other records, client
    /// records and name events, are counted apart). Said at the first poll after, so within
    /// a poll of where.
    KernelRingFull,
}

/// Which events a `lost` line speaks of: each kind has its own kernel ring and its own
/// backlog, and a reader that follows only one kind needs to know whether its gap is there.
#[derive(Debug, Serialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "kebab-case")]
pub enum LostStream {
    /// `connection-open` and `connection-close` lines.
    Connections,
    /// `query-received` and `query-answered` lines.
    Dns,
}

/// The kernel's counts of records its rings had no room for (pinned counters, summed over
/// the CPUs), ring by ring.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RingDrops {
    /// The DNS ring: streamed queries and answers, and name samples.
    pub dns: u64,
    /// The connection ring's streamed opens and closes.
    pub connections: u64,
    /// The connection ring's client records (the top clients' bound, no stream's lines).
    pub clients: u64,
    /// The DNS ring's name events, in `dns` too (the top domains' bound).
    pub names: u64,
}

impl RingDrops {
    /// The DNS stream's lines lost: the DNS ring's drops that were no name events. (The
    /// kernel counts a dropped name event in `names` first, and the agent reads the DNS
    /// counters first, so a name event dropped between the reads makes this short for a
    /// poll, never long.)
    fn dns_lines(&self) -> u64 {
        self.dns.saturating_sub(self.names)
    }
}

impl StreamEvent {
    /// A stream's first line, stamped now.
    #[must_use]
    pub fn start(terms: StreamTerms) -> Self {
        Self::Start {
            timestamp: crate::clock::unix_ms(),
            terms,
        }
    }

    /// A heartbeat, stamped now.
    #[must_use]
    pub fn heartbeat() -> Self {
        Self::Heartbeat {
            timestamp: crate::clock::unix_ms(),
        }
    }
}

impl Streamed for ConnRecord {
    fn streamed(&self) -> bool {
        matches!(self, Self::Connection(_))
    }
}

impl Streamed for DnsEvent {
    fn streamed(&self) -> bool {
        !matches!(self, Self::Name { .. })
    }
}

/// Converts the kernel's `CLOCK_MONOTONIC` nanoseconds into wall-clock milliseconds.
fn wall_ms(monotonic_ns: u64) -> u64 {
    let now_ns = crate::clock::monotonic_ns();
    crate::clock::unix_ms().saturating_sub(now_ns.saturating_sub(monotonic_ns) / 1_000_000)
}

#[expect(clippy::cast_precision_loss, reason = "nanoseconds as float seconds")]
fn seconds(nanos: u64) -> f64 {
    nanos as f64 / 1e9
}

/// Sources of the stream, shared with every subscriber.
pub struct EventHub {
    pub connections: broadcast::Sender<ConnRecord>,
    pub dns: broadcast::Sender<DnsEvent>,
    /// Route slot → route, for names and types.
    routes: Vec<WatchedRoute>,
    /// Events subscribers lost: dropped while they were behind, or never taken when their
    /// stream ended.
    pub lagged: AtomicU64,
    /// Set when the agent stops: open streams end, so that HTTP can shut down.
    stopping: tokio::sync::watch::Sender<bool>,
    /// The kernel's switches for streamed DNS events (every sampled query whole, answers)
    /// and connection events (opens and closes), on while anyone reads the stream.
    dns_wanted: Switch,
    connections_wanted: Switch,
    /// Open subscriptions: what the switches are judged by. Counted apart from the channels'
    /// receivers, which a leaving subscription still holds while it judges.
    readers: AtomicUsize,
    /// Set by [`Self::switch_off`]: the switches stay off whoever reads or leaves after.
    switched_off: AtomicBool,
    /// The agent stops cleanly: streams end with their `end` line (see [`Self::stop`]).
    clean_stop: AtomicBool,
    /// Events the kernel could not put in its rings, as the last poll (or the stop) read
    /// them; `None` until a poll has.
    ring_dropped: tokio::sync::watch::Sender<Option<RingDrops>>,
    /// What every stream is made of, for its `start` line.
    pub terms: StreamTerms,
}

/// A one-entry kernel map that turns a kind of event on (1) or off (0).
type Switch = std::sync::Mutex<Option<aya::maps::Array<aya::maps::MapData, u32>>>;

/// Sets `switch` to `wanted` unless it is set already; `what` names it in a warning.
fn set_switch(switch: &Switch, wanted: impl FnOnce() -> bool, what: &str) {
    let mut guard = switch
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Judged under the lock: judged before it, a poll that saw no reader could take the
    // lock after a new reader's switch-on and turn the events off under it.
    let wanted = u32::from(wanted());
    if let Some(switch) = guard.as_mut()
        && switch.get(&0, 0).ok() != Some(wanted)
        && let Err(err) = switch.set(0, wanted, 0)
    {
        tracing::warn!("switching {what}: {err}");
    }
}

impl EventHub {
    /// `dropped`: the kernel's drop counters before the programs were attached, where
    /// streams that begin before the first poll count the drops from.
    #[must_use]
    pub fn new(
        routes: Vec<WatchedRoute>,
        dropped: Option<RingDrops>,
        terms: StreamTerms,
    ) -> Arc<Self> {
        Arc::new(Self {
            connections: broadcast::channel(CONNECTION_BACKLOG).0,
            dns: broadcast::channel(DNS_BACKLOG).0,
            routes,
            lagged: AtomicU64::new(0),
            stopping: tokio::sync::watch::channel(false).0,
            dns_wanted: std::sync::Mutex::new(None),
            connections_wanted: std::sync::Mutex::new(None),
            readers: AtomicUsize::new(0),
            switched_off: AtomicBool::new(false),
            clean_stop: AtomicBool::new(false),
            ring_dropped: tokio::sync::watch::channel(dropped).0,
            terms,
        })
    }

    /// The kernel's counts of events its rings had no room for, as a poll (or the stop)
    /// read them: each stream says how many it lost since it began, or since it last said
    /// so.
    pub fn ring_dropped(&self, dropped: RingDrops) {
        self.ring_dropped.send_if_modified(|seen| {
            // Only what the streams say: client records and name events are no lines.
            let said = |drops: &RingDrops| (drops.dns_lines(), drops.connections);
            let changed = seen.as_ref().map(said) != Some(said(&dropped));
            *seen = Some(dropped);
            changed
        });
    }

    /// Hands over the kernel's switch for streamed DNS events.
    pub fn control_dns(&self, switch: aya::maps::Array<aya::maps::MapData, u32>) {
        *self
            .dns_wanted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(switch);
        self.update_switches();
    }

    /// Hands over the kernel's switch for streamed connection events.
    pub fn control_connections(&self, switch: aya::maps::Array<aya::maps::MapData, u32>) {
        *self
            .connections_wanted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(switch);
        self.update_switches();
    }

    /// Turns streamed DNS and connection events on while someone reads the stream, off
    /// otherwise (called when a reader comes or goes, and at every poll, which puts back a
    /// switch set from outside).
    pub fn update_switches(&self) {
        // Each change of the count is followed by a judgement, read under the switch's lock:
        // the last one judged reads the count after every change before it.
        let wanted =
            || !self.switched_off.load(Ordering::SeqCst) && self.readers.load(Ordering::SeqCst) > 0;
        set_switch(&self.dns_wanted, wanted, "streamed DNS events");
        set_switch(
            &self.connections_wanted,
            wanted,
            "streamed connection events",
        );
    }

    /// A new reader, with streamed events switched on.
    #[must_use]
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        let ring_dropped = self.ring_dropped.subscribe();
        let ring_dropped_seen = *ring_dropped.borrow();
        let subscription = Subscription {
            hub: Arc::clone(self),
            connections: self.connections.subscribe(),
            dns: self.dns.subscribe(),
            ring_dropped,
            ring_dropped_seen,
            ring_loss_pending: false,
            ended: false,
        };
        self.readers.fetch_add(1, Ordering::SeqCst);
        self.update_switches();
        subscription
    }

    /// Ends every open stream, each after the lines it was sent before, and after a `clean`
    /// stop with its `end` line (after an error the agent leaves its programs attached, as
    /// after a crash, and a reader must not take the stream's end for a stop).
    pub fn stop(&self, clean: bool) {
        self.clean_stop.store(clean, Ordering::SeqCst);
        self.stopping.send_replace(true);
    }

    /// A reader fell `lost` events of `stream` behind: counted, and its `lost` line.
    fn reader_behind(&self, lost: u64, stream: LostStream) -> StreamEvent {
        self.lagged.fetch_add(lost, Ordering::Relaxed);
        StreamEvent::Lost {
            count: lost,
            timestamp: crate::clock::unix_ms(),
            cause: LostCause::ReaderBehind,
            stream,
        }
    }

    /// Tells the kernel nobody reads either stream, whoever is subscribed.
    pub fn switch_off(&self) {
        self.switched_off.store(true, Ordering::SeqCst);
        set_switch(&self.dns_wanted, || false, "streamed DNS events");
        set_switch(
            &self.connections_wanted,
            || false,
            "streamed connection events",
        );
    }

    fn route(&self, slot: u32) -> Option<&WatchedRoute> {
        self.routes.iter().find(|r| r.slot == slot)
    }

    /// The stream line of a connection event.
    #[must_use]
    pub fn connection_event(&self, event: &Connection) -> StreamEvent {
        let route = self.route(event.route);
        let route_name = route.map_or_else(String::new, |r| r.name.clone());
        let kind = route.map_or("tcp", |r| r.kind.as_str());
        if event.opened {
            StreamEvent::ConnectionOpen {
                connection_id: event.cookie,
                kind,
                route_name,
                client_ip: event.client.to_string(),
                client_port: event.client_port,
                timestamp: wall_ms(event.timestamp_ns),
            }
        } else {
            StreamEvent::ConnectionClose {
                connection_id: event.cookie,
                kind,
                route_name,
                duration: seconds(event.duration_ns),
                bytes_transferred: event.bytes_in + event.bytes_out,
                bytes_in: event.bytes_in,
                bytes_out: event.bytes_out,
                client_ip: event.client.to_string(),
                client_port: event.client_port,
                timestamp: wall_ms(event.timestamp_ns),
            }
        }
    }
}

/// One reader's place in the stream. Dropped (its stream ended), it counts as lost what was
/// sent to it and it had not taken.
pub struct Subscription {
    hub: Arc<EventHub>,
    connections: broadcast::Receiver<ConnRecord>,
    dns: broadcast::Receiver<DnsEvent>,
    /// The kernel's counts of events its rings dropped, and their values when this stream
    /// last said so (or began; `None`: no poll had read them then, and the first reading is
    /// where this stream begins, not the counts since the first start).
    ring_dropped: tokio::sync::watch::Receiver<Option<RingDrops>>,
    ring_dropped_seen: Option<RingDrops>,
    /// The counts changed, and a ring's loss may not have been said yet.
    ring_loss_pending: bool,
    /// The stream's `end` line has gone out.
    ended: bool,
}

impl Subscription {
    /// The next line, waiting for it; once the agent stops, what was sent before the stop,
    /// then [`StreamEvent::End`], then `None`. A [`StreamEvent::Lost`] where the reader fell
    /// behind. Cut short, it loses nothing: what it waits on are broadcast receivers.
    pub async fn next(&mut self) -> Option<StreamEvent> {
        if self.ended {
            return None;
        }
        let hub = &*self.hub;
        let mut stopping = hub.stopping.subscribe();
        loop {
            if *stopping.borrow_and_update() {
                let clean = hub.clean_stop.load(Ordering::SeqCst);
                // The rings' drops the stop read come after the lines drained with them.
                return self
                    .sent_before_the_stop()
                    .or_else(|| ring_loss(&mut self.ring_dropped, &mut self.ring_dropped_seen))
                    .or_else(|| {
                        self.ended = true;
                        clean.then(|| StreamEvent::End {
                            timestamp: crate::clock::unix_ms(),
                        })
                    });
            }
            if self.ring_loss_pending {
                match ring_loss(&mut self.ring_dropped, &mut self.ring_dropped_seen) {
                    Some(lost) => return Some(lost),
                    None => self.ring_loss_pending = false,
                }
            }
            let received = tokio::select! {
                event = self.connections.recv() => event
                    .map(|record| connection_line(hub, &record))
                    .map_err(|err| (err, LostStream::Connections)),
                event = self.dns.recv() => event
                    .map(|e| dns_event(&e))
                    .map_err(|err| (err, LostStream::Dns)),
                _ = stopping.changed() => continue,
                changed = self.ring_dropped.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    self.ring_loss_pending = true;
                    continue;
                }
            };
            match received {
                Ok(Some(event)) => return Some(event),
                // Not streamed, and not sent to subscribers either (see `Streamed`).
                Ok(None) => {}
                Err((RecvError::Lagged(lost), stream)) => {
                    return Some(hub.reader_behind(lost, stream));
                }
                Err((RecvError::Closed, _)) => return None,
            }
        }
    }

    /// After the stop: the lines sent before it (the agent's last drain of the rings
    /// among them), without waiting, then `None`. A clean stop thus ends a reader's stream
    /// after everything it was sent, rather than with its backlog thrown away unsaid.
    fn sent_before_the_stop(&mut self) -> Option<StreamEvent> {
        let hub = &*self.hub;
        loop {
            let received = match self.connections.try_recv() {
                Ok(record) => Ok(connection_line(hub, &record)),
                Err(TryRecvError::Empty | TryRecvError::Closed) => match self.dns.try_recv() {
                    Ok(event) => Ok(dns_event(&event)),
                    Err(TryRecvError::Empty | TryRecvError::Closed) => return None,
                    Err(lagged) => Err((lagged, LostStream::Dns)),
                },
                Err(lagged) => Err((lagged, LostStream::Connections)),
            };
            match received {
                Ok(Some(line)) => return Some(line),
                Ok(None) => {}
                Err((TryRecvError::Lagged(lost), stream)) => {
                    return Some(hub.reader_behind(lost, stream));
                }
                Err((TryRecvError::Empty | TryRecvError::Closed, _)) => return None,
            }
        }
    }
}

/// A `lost` line for the first ring that dropped events since this stream last said so
/// (a line for each ring), or `None` once every drop read is said; `said`: the counts
/// this stream said last.
fn ring_loss(
    dropped: &mut tokio::sync::watch::Receiver<Option<RingDrops>>,
    said: &mut Option<RingDrops>,
) -> Option<StreamEvent> {
    let now = (*dropped.borrow_and_update())?;
    let Some(seen) = said else {
        // No poll had read the counts when this stream began: it begins here.
        *said = Some(now);
        return None;
    };
    // The largest count said stands: the DNS ring's may read short for a poll
    // (`RingDrops::dns_lines`).
    let (stream, count) = if now.connections > seen.connections {
        let count = now.connections - seen.connections;
        seen.connections = now.connections;
        (LostStream::Connections, count)
    } else if now.dns_lines() > seen.dns_lines() {
        let count = now.dns_lines() - seen.dns_lines();
        (seen.dns, seen.names) = (now.dns, now.names);
        (LostStream::Dns, count)
    } else {
        return None;
    };
    Some(StreamEvent::Lost {
        count,
        timestamp: crate::clock::unix_ms(),
        cause: LostCause::KernelRingFull,
        stream,
    })
}

/// The stream line of a connection record; `None` for a client record, which is not
/// streamed.
fn connection_line(hub: &EventHub, record: &ConnRecord) -> Option<StreamEvent> {
    match record {
        ConnRecord::Connection(event) => Some(hub.connection_event(event)),
        ConnRecord::Client { .. } => None,
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // Sent to this reader and not taken, whether still held or already dropped for it.
        let unread = self.connections.len() + self.dns.len();
        self.hub
            .lagged
            .fetch_add(u64::try_from(unread).unwrap_or(u64::MAX), Ordering::Relaxed);
        // The last reader gone, the kernel stops sending what nobody reads now, not at the
        // next poll (up to a minute later with `poll_interval_ms`).
        self.hub.readers.fetch_sub(1, Ordering::SeqCst);
        self.hub.update_switches();
    }
}

fn source(client: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(client, port).to_string()
}

/// The stream line of a DNS event; `None` for a name event, which is not streamed.
#[must_use]
pub fn dns_event(event: &DnsEvent) -> Option<StreamEvent> {
    Some(match event {
        DnsEvent::Query {
            qtype,
            domain,
            client,
            client_port,
            id,
            timestamp_ns,
        } => StreamEvent::QueryReceived {
            qtype: qtype_mnemonic(*qtype),
            domain: domain.as_deref().map(str::to_owned),
            source: source(*client, *client_port),
            client_ip: client.to_string(),
            id: *id,
            timestamp: wall_ms(*timestamp_ns),
        },
        DnsEvent::Answer {
            qtype,
            rcode,
            cached,
            truncated,
            latency_ns,
            client,
            client_port,
            id,
            timestamp_ns,
        } => StreamEvent::QueryAnswered {
            cached: *cached,
            response_time: seconds(*latency_ns),
            response_code: rcode_mnemonic(*rcode),
            qtype: qtype_mnemonic(*qtype),
            source: source(*client, *client_port),
            client_ip: client.to_string(),
            id: *id,
            truncated: *truncated,
            timestamp: wall_ms(*timestamp_ns),
        },
        DnsEvent::Name { .. } => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteKind;

    #[test]
    fn lines_are_tagged_and_camel_cased() {
        let hub = EventHub::new(
            vec![WatchedRoute {
                name: "web".into(),
                kind: RouteKind::Https,
                ports: vec![443],
                sni: Vec::new(),
                slot: 3,
            }],
            None,
            StreamTerms::default(),
        );
        let start = StreamEvent::start(StreamTerms {
            run_started_at: 1_800_000_000_000,
            connection_events: true,
            dns_events: true,
            sample_every: 4,
            match_every: None,
        });
        let json = serde_json::to_value(&start).unwrap();
        assert_eq!(json["event"], "start");
        assert_eq!(json["runStartedAt"], 1_800_000_000_000_u64);
        assert_eq!(json["connectionEvents"], true);
        assert_eq!(json["sampleEvery"], 4);
        assert_eq!(json["matchEvery"], serde_json::Value::Null);
        assert!(json["timestamp"].as_u64().unwrap() > 0);
        let open = Connection {
            route: 3,
            ..Connection::opened_for_test(42)
        };
        let json = serde_json::to_value(hub.connection_event(&open)).unwrap();
        assert_eq!(json["event"], "connection-open");
        assert_eq!(json["type"], "https");
        assert_eq!(json["routeName"], "web");
        assert_eq!(json["clientIp"], "192.0.2.9");
        assert_eq!(json["connectionId"], 42);
        let close = Connection {
            opened: false,
            duration_ns: 1_500_000_000,
            bytes_in: 10,
            bytes_out: 32,
            ..open
        };
        let json = serde_json::to_value(hub.connection_event(&close)).unwrap();
        assert_eq!(json["event"], "connection-close");
        assert_eq!(json["type"], "https");
        assert_eq!(json["clientPort"], open.client_port);
        assert_eq!(json["duration"], 1.5);
        assert_eq!(json["bytesTransferred"], 42);

        let answer = |cached, rcode| DnsEvent::Answer {
            qtype: 28,
            rcode,
            cached,
            truncated: false,
            latency_ns: 250_000,
            client: "192.0.2.9".parse().unwrap(),
            client_port: 5353,
            id: 7,
            timestamp_ns: 0,
        };
        let json = serde_json::to_value(dns_event(&answer(Some(false), 3)).unwrap()).unwrap();
        assert_eq!(json["event"], "query-answered");
        assert_eq!(json["cached"], false);
        assert_eq!(json["responseCode"], "NXDOMAIN");
        assert_eq!(json["type"], "AAAA");
        assert_eq!(json["responseTime"], 0.000_25);
        assert_eq!(json["source"], "192.0.2.9:5353");
        // Relayed from another namespace's server: whether it was cached cannot be told.
        let json = serde_json::to_value(dns_event(&answer(None, 3)).unwrap()).unwrap();
        assert!(json["cached"].is_null(), "{json}");
        // An RCODE an OPT record extends reads whole, by name or by number.
        for (rcode, name) in [(16, "BADVERS"), (23, "BADCOOKIE"), (40, "RCODE40")] {
            let json =
                serde_json::to_value(dns_event(&answer(Some(true), rcode)).unwrap()).unwrap();
            assert_eq!(json["responseCode"], name);
        }

        let json = serde_json::to_value(StreamEvent::Heartbeat { timestamp: 5 }).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"event": "heartbeat", "timestamp": 5})
        );
    }

    fn open(cookie: u64) -> ConnRecord {
        ConnRecord::Connection(Connection::opened_for_test(cookie))
    }

    fn query(id: u16) -> DnsEvent {
        DnsEvent::Query {
            qtype: 1,
            domain: Some("a.example".into()),
            client: "192.0.2.9".parse().unwrap(),
            client_port: 5353,
            id,
            timestamp_ns: 0,
        }
    }

    fn lagged(hub: &EventHub) -> u64 {
        hub.lagged.load(Ordering::Relaxed)
    }

    /// A drain sends what it took from the ring at once: a full ring of the shortest lines
    /// reaches a reader that then reads them, none lost.
    #[tokio::test]
    async fn a_full_dns_ring_drained_at_once_reaches_a_reader_whole() {
        let hub = EventHub::new(Vec::new(), None, StreamTerms::default());
        let mut reader = hub.subscribe();
        let ring_lines = collector_common::DNS_EVENTS_BYTES as usize / SHORTEST_DNS_LINE_RECORD;
        for id in (0..=u16::MAX).cycle().take(ring_lines) {
            hub.dns.send(query(id)).unwrap();
        }
        for _ in 0..ring_lines {
            let line = reader.next().await;
            assert!(
                matches!(line, Some(StreamEvent::QueryReceived { .. })),
                "{line:?}"
            );
        }
        drop(reader);
        assert_eq!(lagged(&hub), 0);
    }

    #[tokio::test]
    async fn events_the_kernel_had_no_room_for_are_a_lost_line_of_each_stream_since_it_began() {
        // As the start seeds it, before the first poll: a stream begins there, not at 0
        // (the pinned count holds every drop since the first start).
        let hub = EventHub::new(
            Vec::new(),
            Some(RingDrops {
                dns: 2,
                connections: 1,
                clients: 0,
                names: 0,
            }),
            StreamTerms::default(),
        );
        let mut reader = hub.subscribe();
        // A poll that reads no more dropped says nothing.
        hub.ring_dropped(RingDrops {
            dns: 2,
            connections: 1,
            clients: 0,
            names: 0,
        });
        hub.ring_dropped(RingDrops {
            dns: 6,
            connections: 4,
            clients: 0,
            names: 0,
        });
        // A line for each ring, saying which.
        for (count, stream) in [(3, LostStream::Connections), (4, LostStream::Dns)] {
            let lost = reader.next().await.unwrap();
            assert_eq!(
                lost,
                StreamEvent::Lost {
                    count,
                    timestamp: timestamp_of(&lost),
                    cause: LostCause::KernelRingFull,
                    stream,
                }
            );
        }
        // Not the reader's doing: not counted as lagged.
        assert_eq!(lagged(&hub), 0);
        hub.connections.send(open(1)).unwrap();
        assert!(matches!(
            reader.next().await,
            Some(StreamEvent::ConnectionOpen { .. })
        ));
        // Only the ring that dropped more since.
        hub.ring_dropped(RingDrops {
            dns: 7,
            connections: 4,
            clients: 0,
            names: 0,
        });
        let lost = reader.next().await.unwrap();
        let json = serde_json::to_value(&lost).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"event": "lost", "count": 1, "timestamp": timestamp_of(&lost),
                "cause": "kernel-ring-full", "stream": "dns"})
        );
        // Client records and name events lost are no stream's lines: no line for them (a
        // name event is in the DNS ring's count too).
        hub.ring_dropped(RingDrops {
            dns: 10,
            connections: 4,
            clients: 5,
            names: 3,
        });
        hub.connections.send(open(2)).unwrap();
        assert!(matches!(
            reader.next().await,
            Some(StreamEvent::ConnectionOpen { .. })
        ));
        // A read that took a name event dropped after the DNS count was read says nothing,
        // and the next read says only the lines lost since the last said.
        hub.ring_dropped(RingDrops {
            dns: 10,
            connections: 4,
            clients: 5,
            names: 4,
        });
        hub.ring_dropped(RingDrops {
            dns: 13,
            connections: 4,
            clients: 5,
            names: 4,
        });
        let lost = reader.next().await.unwrap();
        assert_eq!(
            lost,
            StreamEvent::Lost {
                count: 2,
                timestamp: timestamp_of(&lost),
                cause: LostCause::KernelRingFull,
                stream: LostStream::Dns,
            }
        );
    }

    fn timestamp_of(line: &StreamEvent) -> u64 {
        serde_json::to_value(line).unwrap()["timestamp"]
            .as_u64()
            .unwrap()
    }

    #[tokio::test]
    async fn what_the_rings_dropped_since_the_last_poll_is_said_before_the_end() {
        let hub = EventHub::new(
            Vec::new(),
            Some(RingDrops::default()),
            StreamTerms::default(),
        );
        let mut reader = hub.subscribe();
        hub.dns.send(query(1)).unwrap();
        // The stop's own read of the counters, after its last drain.
        hub.ring_dropped(RingDrops {
            dns: 5,
            connections: 0,
            clients: 0,
            names: 0,
        });
        hub.stop(true);
        assert!(matches!(
            reader.next().await,
            Some(StreamEvent::QueryReceived { .. })
        ));
        let lost = reader.next().await.unwrap();
        assert!(
            matches!(
                lost,
                StreamEvent::Lost {
                    count: 5,
                    cause: LostCause::KernelRingFull,
                    stream: LostStream::Dns,
                    ..
                }
            ),
            "{lost:?}"
        );
        assert!(matches!(reader.next().await, Some(StreamEvent::End { .. })));
        assert!(reader.next().await.is_none());
    }

    #[tokio::test]
    async fn what_was_sent_before_the_stop_still_goes_out_then_the_stream_ends() {
        let hub = EventHub::new(Vec::new(), None, StreamTerms::default());
        let mut reader = hub.subscribe();
        hub.connections.send(open(1)).unwrap();
        hub.dns.send(query(2)).unwrap();
        hub.stop(true);
        assert!(matches!(
            reader.next().await,
            Some(StreamEvent::ConnectionOpen {
                connection_id: 1,
                ..
            })
        ));
        assert!(matches!(
            reader.next().await,
            Some(StreamEvent::QueryReceived { .. })
        ));
        let end = reader.next().await.unwrap();
        assert!(matches!(end, StreamEvent::End { .. }), "{end:?}");
        assert_eq!(serde_json::to_value(&end).unwrap()["event"], "end");
        assert!(reader.next().await.is_none());
        // Nothing after the end line, whatever comes late.
        hub.connections.send(open(3)).unwrap();
        assert!(reader.next().await.is_none());
        drop(reader);
        // After an error, no end line: the stream just ends.
        let failed = EventHub::new(Vec::new(), None, StreamTerms::default());
        let mut reader = failed.subscribe();
        failed.stop(false);
        assert!(reader.next().await.is_none());
    }

    #[tokio::test]
    async fn a_reader_that_falls_behind_gets_a_lost_line_where_the_gap_is() {
        let hub = EventHub::new(Vec::new(), None, StreamTerms::default());
        let mut reader = hub.subscribe();
        // 5 more connection events than the backlog holds: the 5 oldest go.
        for cookie in 0..CONNECTION_BACKLOG + 5 {
            hub.connections.send(open(cookie as u64)).unwrap();
        }
        let lost = reader.next().await.unwrap();
        assert_eq!(lagged(&hub), 5);
        assert_eq!(
            serde_json::to_value(&lost).unwrap(),
            serde_json::json!({"event": "lost", "count": 5, "timestamp": timestamp_of(&lost),
                "cause": "reader-behind", "stream": "connections"})
        );
        // Then the events after the gap, the oldest kept first.
        let Some(StreamEvent::ConnectionOpen { connection_id, .. }) = reader.next().await else {
            panic!("no event after the gap");
        };
        assert_eq!(connection_id, 5);
        // Within the backlog nothing is lost.
        for id in 0..10 {
            hub.dns.send(query(id)).unwrap();
        }
        drop(reader);
        // Dropped, it counts what it had not taken: the rest of the connections and the
        // queries.
        assert_eq!(lagged(&hub), 5 + (CONNECTION_BACKLOG as u64 - 1) + 10);
    }

    #[tokio::test]
    async fn a_reader_dropped_while_behind_counts_everything_it_never_took() {
        let hub = EventHub::new(Vec::new(), None, StreamTerms::default());
        let reader = hub.subscribe();
        let mut keeping_up = hub.subscribe();
        let sent = DNS_BACKLOG + 1000;
        for id in (0..=u16::MAX).cycle().take(sent) {
            hub.dns.send(query(id)).unwrap();
        }
        // Never read again: what it lost behind is known only when it goes.
        assert_eq!(lagged(&hub), 0);
        drop(reader);
        assert_eq!(lagged(&hub), sent as u64);
        // Another reader's losses are its own.
        let Some(StreamEvent::Lost {
            count: 1000,
            stream: LostStream::Dns,
            ..
        }) = keeping_up.next().await
        else {
            panic!("no lost line");
        };
        for _ in 0..DNS_BACKLOG {
            assert!(matches!(
                keeping_up.next().await,
                Some(StreamEvent::QueryReceived { .. })
            ));
        }
        drop(keeping_up);
        assert_eq!(lagged(&hub), sent as u64 + 1000);
    }

    #[test]
    fn only_what_becomes_a_line_is_sent_to_readers() {
        assert!(open(1).streamed());
        assert!(query(1).streamed());
        let client = ConnRecord::Client {
            slot: 0,
            tenure: 1,
            replaced_count: 0,
            client: "192.0.2.9".parse().unwrap(),
        };
        assert!(!client.streamed());
        let name = DnsEvent::Name {
            slot: 0,
            tenure: 1,
            replaced_count: 0,
            domain: Some("a.example".into()),
        };
        assert!(!name.streamed());
    }

    /// The events carry the exact QTYPE: named by its mnemonic, or `TYPEn` (RFC 3597), never
    /// `OTHER`, the counters' slot for every type above 257.
    #[test]
    fn dns_events_name_their_exact_type() {
        let query = |qtype| DnsEvent::Query {
            qtype,
            domain: Some("a.example".into()),
            client: "192.0.2.9".parse().unwrap(),
            client_port: 5353,
            id: 7,
            timestamp_ns: 0,
        };
        let answer = |qtype| DnsEvent::Answer {
            qtype,
            rcode: 0,
            cached: Some(true),
            truncated: false,
            latency_ns: 1000,
            client: "192.0.2.9".parse().unwrap(),
            client_port: 5353,
            id: 7,
            timestamp_ns: 0,
        };
        // DLV and AMTRELAY, which hickory-proto has no name for; private-use types (65305,
        // which hickory calls ANAME, among them); a type assigned since 2020; types the
        // counters have slots for.
        for (qtype, name) in [
            (32769, "DLV"),
            (260, "AMTRELAY"),
            (65280, "TYPE65280"),
            (u16::MAX, "TYPE65535"),
            (65305, "TYPE65305"),
            (262, "TYPE262"),
            (258, "AVC"),
            (257, "CAA"),
            (28, "AAAA"),
            (0, "TYPE0"),
        ] {
            for event in [query(qtype), answer(qtype)] {
                let json = serde_json::to_value(dns_event(&event).unwrap()).unwrap();
                assert_eq!(json["type"], name, "{qtype} in {}", json["event"]);
            }
        }
    }
}
