//! DNS events from the kernel ring buffer (sampled queries with their names, answers with
//! their latency, names taking a slot of the kernel's name table), decoded here with
//! hickory-proto and folded into the top domains together with the counts the name table
//! keeps in place. Also the names of the DNS codes used as labels and JSON keys.
//!
//! Counters never depend on events: every DNS counter is counted in the kernel; a full ring
//! loses events (counted as `events_dropped`), not counts.

use std::{
    borrow::Cow,
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{Array, MapData, RingBuf};
use collector_common::{
    DNS_EVENT_ANSWER, DNS_EVENT_NAME, DNS_EVENT_QUERY, DNS_QTYPE_OTHER, DNS_RCODE_SLOTS,
    DnsAnswerEvent, DnsInFlight, DnsNameEvent, DnsQueryEvent, dns_query_given_up, dns_rcode_index,
    map_names,
};
use hickory_proto::{
    rr::Name,
    serialize::binary::{BinDecodable, BinDecoder},
};

use crate::{
    clock::monotonic_ns,
    events::read_record,
    mapped::MappedArray,
    tally::TallyTable,
    topk::{Listed, RecentTopK, TopK},
};

/// A decoded DNS event.
#[derive(Debug, Clone, PartialEq)]
pub enum DnsEvent {
    /// A client's query (sampled).
    Query {
        qtype: u16,
        /// The name in presentation form, without the trailing dot; `None` if it did not
        /// decode. Shared: one decoded name serves every query for it.
        domain: Option<Arc<str>>,
        client: IpAddr,
        client_port: u16,
        id: u16,
        timestamp_ns: u64,
    },
    /// A name taking a slot of the kernel's name table (its `tenure` there), for the query
    /// that asked for it; the previous tenure counted `replaced_count` more queries there.
    /// Not streamed.
    Name {
        slot: u32,
        tenure: u32,
        replaced_count: u64,
        domain: Option<Arc<str>>,
    },
    /// The server's response, matched to its query (sampled).
    Answer {
        qtype: u16,
        /// The RCODE, with the upper bits of an OPT record that follows the question.
        rcode: u16,
        /// Whether it was answered from the cache; `None` where that cannot be told (a
        /// response relayed from another namespace's server).
        cached: Option<bool>,
        truncated: bool,
        latency_ns: u64,
        client: IpAddr,
        client_port: u16,
        id: u16,
        timestamp_ns: u64,
    },
}

/// Decodes ring-buffer items, remembering the names it decoded: a server sees the same
/// names over and over, and hickory then runs once per distinct name instead of once per
/// query (it was most of the agent's CPU under dnsperf).
#[derive(Debug, Default)]
pub struct EventDecoder {
    /// Wire form → presentation form (`None`: undecodable); emptied when full.
    names: HashMap<Box<[u8]>, Option<Arc<str>>>,
}

impl EventDecoder {
    /// Distinct names remembered; a flood of unique names empties the memory now and then.
    const NAMES: usize = 8192;

    /// One ring-buffer item; `None` for an item of unknown kind or shorter than its fixed
    /// part. A name that runs past the item's end is one that did not decode: a name event
    /// still hands its slot over, and its queries count as undecodable, not lost unsaid.
    pub fn decode(&mut self, record: &[u8]) -> Option<DnsEvent> {
        let kind = u32::from_ne_bytes(record.get(..4)?.try_into().ok()?);
        match kind {
            DNS_EVENT_QUERY => {
                let event: DnsQueryEvent = read_record(record)?;
                Some(DnsEvent::Query {
                    qtype: event.qtype,
                    domain: self.name_after::<DnsQueryEvent>(record, event.name_len),
                    client: Ipv6Addr::from(event.client_addr).to_canonical(),
                    client_port: event.client_port,
                    id: event.id,
                    timestamp_ns: event.timestamp_ns,
                })
            }
            DNS_EVENT_NAME => {
                let event: DnsNameEvent = read_record(record)?;
                Some(DnsEvent::Name {
                    slot: event.slot,
                    tenure: event.tenure,
                    replaced_count: event.replaced_count,
                    domain: self.name_after::<DnsNameEvent>(record, event.name_len),
                })
            }
            DNS_EVENT_ANSWER => {
                let event: DnsAnswerEvent = read_record(record)?;
                Some(DnsEvent::Answer {
                    qtype: event.qtype,
                    rcode: u16::from(event.rcode_high) << 4 | u16::from(event.rcode & 0x0f),
                    cached: match event.cache_miss {
                        0 => Some(true),
                        1 => Some(false),
                        _ => None,
                    },
                    truncated: event.truncated != 0,
                    latency_ns: event.latency_ns,
                    client: Ipv6Addr::from(event.client_addr).to_canonical(),
                    client_port: event.client_port,
                    id: event.id,
                    timestamp_ns: event.timestamp_ns,
                })
            }
            _ => None,
        }
    }

    /// The name of `name_len` bytes that follows an event `E`'s fixed part in `record`.
    fn name_after<E>(&mut self, record: &[u8], name_len: u16) -> Option<Arc<str>> {
        let name = record.get(size_of::<E>()..)?.get(..usize::from(name_len))?;
        self.name(name)
    }

    /// The presentation form of a wire-form name, decoded by hickory the first time its
    /// letters are seen in any case: clients that mix the case of their queries' letters
    /// (DNS 0x20) would otherwise make each query a new name. Folding changes no length
    /// byte (at most 63, below `A`), and the decoded text is lower case anyway.
    fn name(&mut self, wire: &[u8]) -> Option<Arc<str>> {
        let mut folded = [0u8; 256];
        let key = match folded.get_mut(..wire.len()) {
            Some(key) => {
                key.copy_from_slice(wire);
                key.make_ascii_lowercase();
                &*key
            }
            None => wire,
        };
        if let Some(known) = self.names.get(key) {
            return known.clone();
        }
        let decoded: Option<Arc<str>> = decode_name(key).map(Arc::from);
        if self.names.len() >= Self::NAMES {
            self.names.clear();
        }
        self.names.insert(key.into(), decoded.clone());
        decoded
    }
}

/// A wire-form name as lower-case presentation text without the trailing dot (the root is
/// "."). Names compare case-insensitively in DNS, so `Example.COM` and `example.com` are one
/// domain in the top list. Written as dig and the servers write names (RFC 1035, 5.1): a
/// byte outside printable ASCII as `\DDD` in decimal, where hickory's text has octal, which
/// dig reads as another byte or refuses.
#[must_use]
pub fn decode_name(wire: &[u8]) -> Option<String> {
    let mut decoder = BinDecoder::new(wire);
    let name = Name::read(&mut decoder).ok()?;
    if name.is_root() {
        return Some(".".to_owned());
    }
    let mut text = String::with_capacity(wire.len());
    for (index, label) in name.iter().enumerate() {
        if index > 0 {
            text.push('.');
        }
        for &byte in label {
            let byte = byte.to_ascii_lowercase();
            match byte {
                b'.' | b';' | b'\\' | b'(' | b')' | b'@' | b'$' | b'"' => {
                    text.push('\\');
                    text.push(char::from(byte));
                }
                0x21..=0x7e => text.push(char::from(byte)),
                _ => {
                    let _ = write!(text, "\\{byte:03}");
                }
            }
        }
    }
    Some(text)
}

/// Top domains folded from the kernel's name table (its counts, and the name events that
/// name its slots); query events are the stream's alone.
#[derive(Debug)]
pub struct DomainStats {
    /// Since the start.
    domains: TopK<Arc<str>>,
    /// Of late.
    recent: RecentTopK<Arc<str>>,
    /// Each sample stands for this many queries.
    weight: u64,
    events_received: u64,
    undecodable_names: u64,
    /// The kernel's name table: the name of each slot (`None`: it did not decode).
    names: TallyTable<u64, Option<Arc<str>>>,
}

/// A copy of the DNS event statistics for a snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DomainSnapshot {
    /// Heaviest domains, highest first: exact counts when every query is sampled and the
    /// distinct names fit the tracked set; otherwise counts since each was tracked, with the
    /// error by which it may have had more (scaled by the sampling).
    pub top: Vec<Listed<String>>,
    /// As `top`, over the last `recent_seconds` only.
    pub recent: Vec<Listed<String>>,
    /// How far back `recent` reaches: from one to two [`crate::topk::RECENT_WINDOW`]s, less since the
    /// start, more after polls that stalled.
    pub recent_seconds: f64,
    pub events_received: u64,
    /// Queries left out of `top` because their sampled name did not decode (scaled by the
    /// sampling, like the counts in `top`).
    pub undecodable_names: u64,
}

impl DomainStats {
    /// Keeps `listed` domains for the top list, tracking ten times as many so that the
    /// listed ones' bounds (`maxUndercount`) stay small unless the name distribution is very
    /// flat; `table` is the kernel's name table, mapped.
    #[must_use]
    pub fn new(listed: usize, sample_every: u32, names: TallyTable<u64, Option<Arc<str>>>) -> Self {
        let tracked = listed.saturating_mul(10).clamp(1000, 100_000);
        Self {
            domains: TopK::new(tracked),
            recent: RecentTopK::new(tracked),
            weight: u64::from(sample_every.max(1)),
            events_received: 0,
            undecodable_names: 0,
            names,
        }
    }

    pub fn apply(&mut self, event: &DnsEvent) {
        self.events_received += 1;
        match event {
            // The kernel counted its name in the table too: the event is the stream's.
            DnsEvent::Query { .. } | DnsEvent::Answer { .. } => {}
            DnsEvent::Name {
                slot,
                tenure,
                replaced_count,
                domain,
            } => {
                // The query that brought the name.
                self.fold(domain.as_ref(), 1);
                if let Some((replaced, unfolded)) =
                    self.names
                        .claim(*slot, *tenure, *replaced_count, domain.clone())
                {
                    self.fold(replaced.as_ref(), unfolded);
                }
            }
        }
    }

    /// Folds what the name table counted since the last time (`states`: each slot's state).
    #[cfg(test)]
    fn fold_table(&mut self, states: impl Iterator<Item = u64>) {
        for (domain, queries) in self.names.fold_states(states) {
            self.fold(domain.as_ref(), queries);
        }
    }

    /// Adds `queries` sampled queries for `domain` (`None`: its name did not decode), each
    /// standing for `weight` queries.
    fn fold(&mut self, domain: Option<&Arc<str>>, queries: u64) {
        let queries = queries.saturating_mul(self.weight);
        match domain {
            _ if queries == 0 => {}
            Some(domain) => {
                self.domains.observe(domain, queries);
                self.recent.observe(domain, queries);
            }
            None => self.undecodable_names += queries,
        }
    }

    /// The `listed` heaviest domains since the start and of late, at `now` on the poller's
    /// clock, the name table read first. `lost_samples` is how many samples the kernel could
    /// not deliver since the start (a full ring): any of them could have been any listed
    /// name's, so each name's bound on what it may have had more grows by all of them (of
    /// late, by those lost since the recent lists began).
    #[must_use]
    pub fn snapshot(
        &mut self,
        listed: usize,
        lost_samples: impl FnOnce() -> u64,
        now: Duration,
    ) -> DomainSnapshot {
        for (domain, queries) in self.names.read() {
            self.fold(domain.as_ref(), queries);
        }
        // Read after the table: a sample dropped meanwhile is missing from its counts.
        let lost_samples = lost_samples();
        // After the fold: what the table counted since the last poll is the ending window's.
        let recent = self.recent.top(listed, now, lost_samples);
        DomainSnapshot {
            top: self.as_text(self.domains.top(listed), lost_samples),
            recent: self.as_text(recent.top, recent.lost),
            recent_seconds: recent.reach.as_secs_f64(),
            events_received: self.events_received,
            undecodable_names: self.undecodable_names,
        }
    }

    /// `listed` domains as text, their bounds widened by `lost` samples.
    fn as_text(&self, listed: Vec<Listed<Arc<str>>>, lost: u64) -> Vec<Listed<String>> {
        listed
            .into_iter()
            .map(|entry| Listed {
                key: entry.key.to_string(),
                count: entry.count,
                error: entry.error.saturating_add(lost.saturating_mul(self.weight)),
            })
            .collect()
    }
}

impl crate::events::Fold<DnsEvent> for DomainStats {
    fn apply(&mut self, event: &DnsEvent) {
        DomainStats::apply(self, event);
    }
}

/// The kernel's in-flight table (`DNS_INFLIGHT`), mapped read-only: the queries waiting for
/// their answer are counted from it at every poll. The counters' difference cannot tell:
/// a query given up stays in it until a query of its set or its flow comes, which at a few
/// queries a second takes minutes, so after an outage the gauge (and the table's fill)
/// stayed high that long.
pub struct InFlightTable(MappedArray<DnsInFlight>);

impl InFlightTable {
    pub fn map(map: Array<MapData, DnsInFlight>) -> anyhow::Result<Self> {
        MappedArray::map(map, map_names::DNS_INFLIGHT).map(Self)
    }

    /// Its size, as the agent gave it at load (`[dns] in_flight_slots`).
    #[must_use]
    pub fn slots(&self) -> u32 {
        u32::try_from(self.0.len()).unwrap_or(u32::MAX)
    }

    /// Queries waiting now: slots held by a query younger than the answer timeout (a slot
    /// read while a CPU writes it may count once wrongly, for one poll).
    #[must_use]
    pub fn waiting(&self) -> u64 {
        let now = monotonic_ns();
        let waiting = self
            .0
            .entries()
            .filter(|entry| entry.start_ns != 0 && !dns_query_given_up(now, entry.start_ns))
            .count();
        u64::try_from(waiting).unwrap_or(u64::MAX)
    }
}

/// Drains DNS events into the top domains.
#[must_use]
pub fn domain_drain(
    ring: RingBuf<MapData>,
    stats: Arc<Mutex<DomainStats>>,
    subscribers: tokio::sync::broadcast::Sender<DnsEvent>,
) -> crate::events::SharedDrain {
    let mut decoder = EventDecoder::default();
    Arc::new(Mutex::new(crate::events::RingDrain::new(
        ring,
        Box::new(move |record| decoder.decode(record)),
        stats,
        subscribers,
    )))
}

/// Query types exported even while zero, so that `rate()` works from the first scrape.
pub const COMMON_QTYPES: [u16; 15] = [1, 2, 5, 6, 12, 15, 16, 28, 33, 43, 48, 64, 65, 255, 257];

/// Name of a QTYPE slot (see `collector_common::DNS_QTYPE_SLOTS`): [`qtype_mnemonic`] of its
/// type, `OTHER` for the slot of everything above 257.
#[must_use]
pub fn qtype_name(slot: u32) -> String {
    match u16::try_from(slot) {
        Ok(qtype) if slot < DNS_QTYPE_OTHER => qtype_mnemonic(qtype),
        _ => "OTHER".to_owned(),
    }
}

/// A QTYPE as a DNS tool writes it: its IANA mnemonic ([`iana_mnemonic`]), `TYPEn` (RFC 3597)
/// otherwise. For the `qtype` label and the events, which carry the exact type.
#[must_use]
pub fn qtype_mnemonic(qtype: u16) -> String {
    iana_mnemonic(qtype).map_or_else(|| format!("TYPE{qtype}"), str::to_owned)
}

/// The mnemonic IANA's registry gives a TYPE (ANY for `*`), from a table of our own: the
/// `qtype` label values are then the same whatever hickory-proto's version knows (0.25 has
/// no DNAME, URI or SPF, and names the private-use 65305 ANAME). Types assigned after HTTPS
/// (from 2023: DSYNC, NXNAME, RESINFO among them) are left to `TYPEn` until they are
/// common.
#[must_use]
pub fn iana_mnemonic(qtype: u16) -> Option<&'static str> {
    Some(match qtype {
        1 => "A",
        2 => "NS",
        3 => "MD",
        4 => "MF",
        5 => "CNAME",
        6 => "SOA",
        7 => "MB",
        8 => "MG",
        9 => "MR",
        10 => "NULL",
        11 => "WKS",
        12 => "PTR",
        13 => "HINFO",
        14 => "MINFO",
        15 => "MX",
        16 => "TXT",
        17 => "RP",
        18 => "AFSDB",
        19 => "X25",
        20 => "ISDN",
        21 => "RT",
        22 => "NSAP",
        23 => "NSAP-PTR",
        24 => "SIG",
        25 => "KEY",
        26 => "PX",
        27 => "GPOS",
        28 => "AAAA",
        29 => "LOC",
        30 => "NXT",
        31 => "EID",
        32 => "NIMLOC",
        33 => "SRV",
        34 => "ATMA",
        35 => "NAPTR",
        36 => "KX",
        37 => "CERT",
        38 => "A6",
        39 => "DNAME",
        40 => "SINK",
        41 => "OPT",
        42 => "APL",
        43 => "DS",
        44 => "SSHFP",
        45 => "IPSECKEY",
        46 => "RRSIG",
        47 => "NSEC",
        48 => "DNSKEY",
        49 => "DHCID",
        50 => "NSEC3",
        51 => "NSEC3PARAM",
        52 => "TLSA",
        53 => "SMIMEA",
        55 => "HIP",
        56 => "NINFO",
        57 => "RKEY",
        58 => "TALINK",
        59 => "CDS",
        60 => "CDNSKEY",
        61 => "OPENPGPKEY",
        62 => "CSYNC",
        63 => "ZONEMD",
        64 => "SVCB",
        65 => "HTTPS",
        99 => "SPF",
        100 => "UINFO",
        101 => "UID",
        102 => "GID",
        103 => "UNSPEC",
        104 => "NID",
        105 => "L32",
        106 => "L64",
        107 => "LP",
        108 => "EUI48",
        109 => "EUI64",
        249 => "TKEY",
        250 => "TSIG",
        251 => "IXFR",
        252 => "AXFR",
        253 => "MAILB",
        254 => "MAILA",
        255 => "ANY",
        256 => "URI",
        257 => "CAA",
        258 => "AVC",
        259 => "DOA",
        260 => "AMTRELAY",
        32768 => "TA",
        32769 => "DLV",
        _ => return None,
    })
}

/// RCODE mnemonics (RFC 6895 section 2.3, IANA's registry), by
/// [`collector_common::dns_rcode_index`] slot: the header's sixteen values, then those an EDNS
/// OPT record extends them to (BADVERS, 16, and BADCOOKIE, 23, are the ones it carries; 17 to
/// 22 are TSIG's and TKEY's), the unassigned ones by number, and every RCODE from 31 on as
/// OTHER.
pub const RCODE_NAMES: [&str; DNS_RCODE_SLOTS as usize] = [
    "NOERROR",
    "FORMERR",
    "SERVFAIL",
    "NXDOMAIN",
    "NOTIMP",
    "REFUSED",
    "YXDOMAIN",
    "YXRRSET",
    "NXRRSET",
    "NOTAUTH",
    "NOTZONE",
    "DSOTYPENI",
    "RCODE12",
    "RCODE13",
    "RCODE14",
    "RCODE15",
    "BADVERS",
    "BADKEY",
    "BADTIME",
    "BADMODE",
    "BADNAME",
    "BADALG",
    "BADTRUNC",
    "BADCOOKIE",
    "RCODE24",
    "RCODE25",
    "RCODE26",
    "RCODE27",
    "RCODE28",
    "RCODE29",
    "RCODE30",
    "OTHER",
];

/// An RCODE as a DNS tool writes it: its mnemonic, `RCODEn` for one IANA has not assigned.
/// For the events, which carry the exact code.
#[must_use]
pub fn rcode_mnemonic(rcode: u16) -> Cow<'static, str> {
    match dns_rcode_index(rcode) {
        index if index < DNS_RCODE_SLOTS - 1 => Cow::Borrowed(RCODE_NAMES[index as usize]),
        _ => Cow::Owned(format!("RCODE{rcode}")),
    }
}

/// OPCODE mnemonics (RFC 6895 section 2.2), indexed by the header's four bits.
pub const OPCODE_NAMES: [&str; 16] = [
    "QUERY", "IQUERY", "STATUS", "OPCODE3", "NOTIFY", "UPDATE", "DSO", "OPCODE7", "OPCODE8",
    "OPCODE9", "OPCODE10", "OPCODE11", "OPCODE12", "OPCODE13", "OPCODE14", "OPCODE15",
];

/// QCLASS names, by [`collector_common::dns_qclass_index`] slot (RFC 6895 section 3.2).
pub const QCLASS_NAMES: [&str; collector_common::DNS_QCLASS_SLOTS as usize] =
    ["IN", "CH", "HS", "NONE", "ANY", "OTHER"];

/// RCODEs that mean the server failed the client. NXDOMAIN is an answer, and BADCOOKIE a
/// step of the EDNS cookie exchange (RFC 7873: the client asks again with the server's
/// cookie), not errors.
#[must_use]
pub fn is_error_rcode(rcode: usize) -> bool {
    !matches!(rcode, 0 | 3 | 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.split('.').filter(|l| !l.is_empty()) {
            out.push(u8::try_from(label.len()).unwrap());
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    /// A ring record: the event's fixed part, then the name.
    fn record<E: Copy>(event: &E, name: &[u8]) -> Vec<u8> {
        // SAFETY: plain data viewed as bytes.
        let mut bytes = unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(event).cast::<u8>(), size_of::<E>())
        }
        .to_vec();
        bytes.extend_from_slice(name);
        bytes
    }

    #[test]
    fn a_name_in_mixed_case_is_decoded_once() {
        let mut decoder = EventDecoder::default();
        let first = decoder.name(&wire("WwW.Example.COM")).unwrap();
        let second = decoder.name(&wire("www.eXAMPLE.com")).unwrap();
        assert_eq!(&*first, "www.example.com");
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(decoder.names.len(), 1);
        // A wire form no name decodes from stays undecodable, folded or not.
        assert_eq!(decoder.name(&[0x4a, b'A', 0]), None);
    }

    #[test]
    fn names_decode_lowercase_without_the_root_dot() {
        assert_eq!(
            decode_name(&wire("WWW.Example.com")).as_deref(),
            Some("www.example.com")
        );
        assert_eq!(decode_name(&[0]).as_deref(), Some("."));
        // Bytes outside printable ASCII in decimal (dig's `\195`, not hickory's octal
        // `\303`), and the characters that mean something in a name's text escaped.
        assert_eq!(
            decode_name(&[
                7, b'A', 0xc3, 0x08, b' ', b'.', b'\\', b'-', 3, b'c', b'o', b'm', 0
            ])
            .as_deref(),
            Some("a\\195\\008\\032\\.\\\\-.com")
        );
        // A label running past the end, and a reserved label type.
        assert_eq!(decode_name(&[5, b'a', b'b']), None);
        assert_eq!(decode_name(&[0x40, 0]), None);
    }

    #[test]
    fn query_events_decode_and_are_the_streams_alone() {
        let name = wire("a.example");
        let event = DnsQueryEvent {
            kind: DNS_EVENT_QUERY,
            qtype: 28,
            client_port: 5300,
            timestamp_ns: 9,
            client_addr: Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0x0a00, 0x0001]).octets(),
            id: 7,
            name_len: u16::try_from(name.len()).unwrap(),
            _pad: 0,
        };
        let bytes = record(&event, &name);
        let mut decoder = EventDecoder::default();
        let event = decoder.decode(&bytes).unwrap();
        assert_eq!(
            event,
            DnsEvent::Query {
                qtype: 28,
                domain: Some("a.example".into()),
                client: "10.0.0.1".parse().unwrap(),
                client_port: 5300,
                id: 7,
                timestamp_ns: 9,
            }
        );
        // A name cut short by the record (a query without its name), and a record shorter
        // than the fixed part.
        let DnsEvent::Query { domain, .. } = decoder.decode(&bytes[..bytes.len() - 1]).unwrap()
        else {
            panic!("not a query");
        };
        assert_eq!(domain, None);
        assert_eq!(decoder.decode(&bytes[..20]), None);
        // Decoded again from memory, as the same name.
        assert_eq!(decoder.decode(&bytes), Some(event.clone()));

        // The stream's alone: the kernel counted the name in its table as well.
        let mut stats = DomainStats::new(10, 2, TallyTable::unmapped(0));
        stats.apply(&event);
        stats.apply(&event);
        let snapshot = stats.snapshot(10, || 0, Duration::ZERO);
        assert!(snapshot.top.is_empty(), "{:?}", snapshot.top);
        assert_eq!(snapshot.events_received, 2);
    }

    #[test]
    fn samples_stand_for_their_weight_and_lost_ones_widen_every_bound() {
        let mut stats = with_slots(2, 2);
        stats.apply(&name_event(1, 1, 0, Some("a.example")));
        stats.fold_table(table(&[(0, 0), (1, 1)]));
        let snapshot = stats.snapshot(10, || 0, Duration::ZERO);
        // Each sample stands for two queries.
        assert_eq!(counts(&snapshot.top), [("a.example".to_owned(), 4)]);
        assert_eq!(snapshot.top[0].error, 0);
        // Three samples the kernel dropped (a full ring) could each have been this name's:
        // six queries it may have had more.
        let widened = stats.snapshot(10, || 3, Duration::ZERO);
        assert_eq!((widened.top[0].count, widened.top[0].error), (4, 6));
    }

    #[test]
    fn recent_domains_are_those_of_the_last_one_to_two_windows() {
        let mut stats = DomainStats::new(10, 1, TallyTable::unmapped(0));
        let fold = |stats: &mut DomainStats, name: &str, queries| {
            stats.fold(Some(&Arc::from(name)), queries);
        };
        let span = |snapshot: &DomainSnapshot| Duration::from_secs_f64(snapshot.recent_seconds);
        fold(&mut stats, "old.example", 50);
        // The first window holds everything since the start, the sample lost before the
        // first poll included.
        let first = stats.snapshot(10, || 1, Duration::from_secs(1));
        assert_eq!(first.recent, first.top);
        assert_eq!(first.top[0].error, 1);
        assert_eq!(span(&first), Duration::from_secs(1));
        // A window on: the next begins, and the first still counts.
        fold(&mut stats, "new.example", 7);
        let later = stats.snapshot(10, || 1, Duration::from_mins(5));
        assert_eq!(
            counts(&later.recent),
            [
                ("old.example".to_owned(), 50),
                ("new.example".to_owned(), 7)
            ]
        );
        assert_eq!(span(&later), Duration::from_mins(5));
        // Two windows on: the first one's queries (those folded before the poll that ended
        // it) are gone from the recent list, not from the list since the start; of the 3
        // samples lost since the start, 2 were lost since the recent list began.
        fold(&mut stats, "new.example", 3);
        let last = stats.snapshot(10, || 3, Duration::from_mins(10));
        let bounds = |listed: &[Listed<String>]| -> Vec<(String, u64, u64)> {
            listed
                .iter()
                .map(|entry| (entry.key.clone(), entry.count, entry.error))
                .collect()
        };
        assert_eq!(bounds(&last.recent), [("new.example".to_owned(), 3, 2)]);
        assert_eq!(span(&last), Duration::from_mins(5));
        assert_eq!(
            bounds(&last.top),
            [
                ("old.example".to_owned(), 50, 3),
                ("new.example".to_owned(), 10, 3)
            ]
        );
        // After polls that stalled, the ended window reaches back as far as it began.
        fold(&mut stats, "late.example", 1);
        let stalled = stats.snapshot(10, || 3, Duration::from_mins(30));
        assert_eq!(counts(&stalled.recent), [("late.example".to_owned(), 1)]);
        assert_eq!(span(&stalled), Duration::from_mins(20));
    }

    #[test]
    fn name_events_decode_with_their_name() {
        let name = wire("B.example");
        let event = DnsNameEvent {
            kind: DNS_EVENT_NAME,
            slot: 1030,
            replaced_count: 9,
            tenure: 4,
            name_len: u16::try_from(name.len()).unwrap(),
            _pad: 0,
        };
        let bytes = record(&event, &name);
        let mut decoder = EventDecoder::default();
        assert_eq!(
            decoder.decode(&bytes),
            Some(name_event(1030, 4, 9, Some("b.example")))
        );
        // Its name cut short: undecodable, its slot still handed over; its fixed part cut
        // short: nothing.
        assert_eq!(
            decoder.decode(&bytes[..bytes.len() - 1]),
            Some(name_event(1030, 4, 9, None))
        );
        assert_eq!(
            decoder.decode(&bytes[..size_of::<DnsNameEvent>() - 1]),
            None
        );
    }

    /// An answer's RCODE is the kernel's two fields joined: an OPT record's upper bits above
    /// the header's four.
    #[test]
    fn answer_events_decode_their_whole_rcode() {
        let answer = |rcode, rcode_high| DnsAnswerEvent {
            kind: DNS_EVENT_ANSWER,
            rcode,
            cache_miss: 1,
            truncated: 0,
            rcode_high,
            latency_ns: 250_000,
            timestamp_ns: 9,
            client_addr: Ipv6Addr::from([0, 0, 0, 0, 0, 0xffff, 0x0a00, 0x0001]).octets(),
            client_port: 5300,
            id: 7,
            qtype: 1,
            _pad2: 0,
        };
        let mut decoder = EventDecoder::default();
        for (low, high, whole) in [(3, 0, 3), (0, 1, 16), (7, 1, 23), (15, 255, 4095)] {
            assert_eq!(
                decoder.decode(&record(&answer(low, high), &[])),
                Some(DnsEvent::Answer {
                    qtype: 1,
                    rcode: whole,
                    cached: Some(false),
                    truncated: false,
                    latency_ns: 250_000,
                    client: "10.0.0.1".parse().unwrap(),
                    client_port: 5300,
                    id: 7,
                    timestamp_ns: 9,
                })
            );
        }
    }

    fn name_event(slot: u32, tenure: u32, replaced_count: u64, domain: Option<&str>) -> DnsEvent {
        DnsEvent::Name {
            slot,
            tenure,
            replaced_count,
            domain: domain.map(Arc::from),
        }
    }

    /// Slot states, by (tenure, count).
    fn table(slots: &[(u32, u64)]) -> impl Iterator<Item = u64> + '_ {
        slots
            .iter()
            .map(|&(tenure, count)| collector_common::tally_state(tenure, count))
    }

    /// Statistics over a name table of `slots` slots that the test reads out itself.
    fn with_slots(sample_every: u32, slots: usize) -> DomainStats {
        DomainStats::new(10, sample_every, TallyTable::unmapped(slots))
    }

    fn counts(top: &[Listed<String>]) -> Vec<(String, u64)> {
        top.iter()
            .map(|listed| (listed.key.clone(), listed.count))
            .collect()
    }

    fn top(stats: &mut DomainStats) -> Vec<(String, u64)> {
        counts(&stats.snapshot(10, || 0, Duration::ZERO).top)
    }

    #[test]
    fn names_counted_in_the_kernel_table_are_folded_once() {
        let a = |n| ("a.example".to_owned(), n);
        let b = |n| ("b.example".to_owned(), n);
        let mut stats = with_slots(1, 2);
        // `a` takes slot 1 (its first tenure), then three more queries count there.
        stats.apply(&name_event(1, 1, 0, Some("a.example")));
        stats.fold_table(table(&[(0, 0), (1, 3)]));
        // Read again unchanged: nothing more.
        stats.fold_table(table(&[(0, 0), (1, 3)]));
        assert_eq!(top(&mut stats), [a(4)]);
        // `b` took the slot, but its event is still in the ring: the slot is left alone...
        stats.fold_table(table(&[(0, 0), (2, 2)]));
        assert_eq!(top(&mut stats), [a(4)]);
        // ...until the event hands over `a`'s final count (5: two more since the last read).
        stats.apply(&name_event(1, 2, 5, Some("b.example")));
        stats.fold_table(table(&[(0, 0), (2, 2)]));
        assert_eq!(top(&mut stats), [a(6), b(3)]);
        // `a` came back to the slot and counted 4 there before its event was read: a new
        // tenure, not more of the old one.
        stats.fold_table(table(&[(0, 0), (3, 4)]));
        assert_eq!(top(&mut stats), [a(6), b(3)]);
        stats.apply(&name_event(1, 3, 2, Some("a.example")));
        stats.fold_table(table(&[(0, 0), (3, 4)]));
        assert_eq!(top(&mut stats), [a(11), b(3)]);
        // A name that did not decode counts its queries as undecodable.
        stats.apply(&name_event(0, 1, 0, None));
        stats.fold_table(table(&[(1, 4), (3, 4)]));
        let snapshot = stats.snapshot(10, || 0, Duration::ZERO);
        assert_eq!(snapshot.undecodable_names, 5);
        assert_eq!(snapshot.events_received, 4);
    }

    #[test]
    fn sampled_names_in_the_table_stand_for_the_sampling() {
        let mut stats = with_slots(4, 2);
        stats.apply(&name_event(0, 1, 0, Some("a.example")));
        stats.fold_table(table(&[(1, 2)]));
        assert_eq!(top(&mut stats), [("a.example".to_owned(), 12)]);
        // So do those whose name did not decode.
        stats.apply(&name_event(1, 1, 0, None));
        stats.fold_table(table(&[(1, 2), (1, 3)]));
        assert_eq!(
            stats.snapshot(10, || 0, Duration::ZERO).undecodable_names,
            16
        );
    }

    #[test]
    fn code_names_are_bounded_and_conventional() {
        assert_eq!(qtype_name(1), "A");
        assert_eq!(qtype_name(28), "AAAA");
        assert_eq!(qtype_name(65), "HTTPS");
        assert_eq!(qtype_name(257), "CAA");
        assert_eq!(qtype_name(0), "TYPE0");
        assert_eq!(qtype_name(DNS_QTYPE_OTHER), "OTHER");
        assert!(qtype_name(200).starts_with("TYPE"));
        assert_eq!(qtype_name(u32::MAX), "OTHER");
        assert_eq!(qtype_mnemonic(65280), "TYPE65280");
        assert_eq!(qtype_name(39), "DNAME");
        assert_eq!(qtype_name(256), "URI");
        assert_eq!(qtype_name(54), "TYPE54");
        assert_eq!(qtype_mnemonic(65305), "TYPE65305");
        assert_eq!(qtype_mnemonic(32769), "DLV");
        assert_eq!(RCODE_NAMES[3], "NXDOMAIN");
        assert_eq!(rcode_mnemonic(16), "BADVERS");
        assert_eq!(rcode_mnemonic(23), "BADCOOKIE");
        assert_eq!(rcode_mnemonic(30), "RCODE30");
        assert_eq!(rcode_mnemonic(31), "RCODE31");
        assert_eq!(rcode_mnemonic(4095), "RCODE4095");
        assert!(is_error_rcode(16) && is_error_rcode(31));
        assert_eq!(OPCODE_NAMES[5], "UPDATE");
        assert!(is_error_rcode(2) && is_error_rcode(5) && !is_error_rcode(3));
        assert!(!is_error_rcode(0) && !is_error_rcode(23) && is_error_rcode(22));
    }

    /// Every type hickory-proto names, ours names the same (the label values of the series
    /// exported before the table was ours do not change), but the ones its names are wrong
    /// for.
    #[test]
    fn our_type_names_keep_the_ones_hickory_gave() {
        use hickory_proto::rr::RecordType;
        for qtype in 0..=u16::MAX {
            let known = RecordType::from(qtype);
            if matches!(
                known,
                RecordType::Unknown(_) | RecordType::ZERO | RecordType::ANAME
            ) {
                continue;
            }
            assert_eq!(
                iana_mnemonic(qtype),
                Some(known.to_string().as_str()),
                "{qtype}"
            );
        }
    }

    #[test]
    fn query_classes_are_named_by_their_slot() {
        let named = |qclass| QCLASS_NAMES[collector_common::dns_qclass_index(qclass) as usize];
        assert_eq!(
            [1, 3, 4, 254, 255].map(named),
            ["IN", "CH", "HS", "NONE", "ANY"]
        );
        // CS (2, obsolete), class 0 and the private range share the last slot.
        for other in [0, 2, 5, 253, 256, 0xff00, u16::MAX] {
            assert_eq!(named(other), "OTHER", "{other}");
        }
    }
}
