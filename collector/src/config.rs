//! The agent's TOML configuration. An embedded default (`default.toml`) lets the collector
//! run with no file; a file is checked whole, and every error names the file, line, column
//! and what is wrong.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::Range,
    path::{Component, Path, PathBuf},
    time::Duration,
};

use collector_common::{
    CONN_TABLE_SLOTS, CONN_TABLE_SLOTS_MAX, CONN_TABLE_SLOTS_MIN, DNS_INFLIGHT_SLOTS,
    DNS_INFLIGHT_SLOTS_MAX, DNS_INFLIGHT_SLOTS_MIN, DNS_MAX_PORTS, SNI_NAMES_MAX,
    conn_table_slots_allowed, dns_inflight_slots_allowed,
};
use serde::Deserialize;
use toml::Spanned;

use crate::paths;
pub use crate::tls::TlsFiles;

/// Route slots in the kernel maps (`collector_common::MAX_ROUTES`).
pub const MAX_ROUTES: usize = collector_common::MAX_ROUTES as usize;
const DEFAULT_TOML: &str = include_str!("default.toml");
const DEFAULT_LISTEN: &str = "127.0.0.1:9464";
/// [`DEFAULT_LISTEN`]'s port.
const DEFAULT_LISTEN_PORT: u16 = 9464;
const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/collector";
const POLL_INTERVAL_MS: Range<u64> = 100..60_001;

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// HTTP listen address.
    pub listen: SocketAddr,
    /// bpffs directory of our own for pinned maps and links.
    pub pin_dir: PathBuf,
    /// cgroup2 mount to attach to; `None` finds it in /proc/mounts.
    pub cgroup2: Option<PathBuf>,
    /// Interfaces to watch; empty means every up interface, loopback included.
    pub interfaces: Vec<String>,
    /// With `interfaces` empty: the names the default selection leaves out (globs), such as
    /// a node's pod veths.
    pub exclude_interfaces: Vec<glob::Pattern>,
    /// Count sockets of every network namespace, not only the agent's own.
    pub all_namespaces: bool,
    /// Addresses and ranges that are this host's for live traffic and DNS though it does
    /// not hold them (VIPs DNAT'd to it), as (network, prefix length).
    pub extra_local_addresses: Vec<(IpAddr, u8)>,
    /// Keep per-client figures in the kernel (`connectionsByIP`, `topIPs`) and send the
    /// event stream's connections.
    pub client_stats: bool,
    /// Slots of the kernel's connection table: the most connections tracked at once,
    /// clients' and upstreams' together (a power of two).
    pub connection_table_slots: u32,
    /// How often the kernel maps are read.
    pub poll_interval: Duration,
    pub routes: Vec<Route>,
    /// The backends the proxy connects to, by remote port (the design's `ACTIVE_ESTABLISHED`).
    pub upstreams: Vec<Upstream>,
    pub dns: DnsConfig,
    pub nftables: NftConfig,
    pub http: HttpConfig,
}

/// Protection of the HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// File holding the bearer token requests may authenticate with (the probes need none).
    pub bearer_token_file: Option<PathBuf>,
    /// htpasswd file of bcrypt-hashed users requests may authenticate as.
    pub basic_auth_users_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate and key.
    pub tls: Option<TlsFiles>,
    /// Requests served at once; more are answered 503.
    pub max_concurrent_requests: usize,
    /// Event streams open at once, apart from the requests; more are answered 503.
    pub max_event_streams: usize,
    /// Longest time a request may take (event streams excepted), and apart from that,
    /// longest a password may wait for its bcrypt check; then 503.
    pub request_timeout: Duration,
    /// Longest a client may take over its TLS handshake; then its connection is closed.
    pub tls_handshake_timeout: Duration,
    /// Connections open at once. At the cap, a new connection closes the one that has
    /// waited longest for a request's header of the address holding the most, or is closed
    /// itself if every one is busy. Above `max_concurrent_requests + max_event_streams`, so
    /// that not every one can be busy.
    pub max_connections: usize,
    /// Connections open at once from one address. At the cap, a new one from it closes its
    /// connection that has waited longest for a request's header, or is closed itself if
    /// every one of them is busy.
    pub max_connections_per_address: usize,
    /// Bytes of answers held for readers that have not taken them yet (a reader that stops
    /// reading holds its answer). Over it, the connections of the oldest such answers are
    /// closed, so that readers who do not read cannot hold the pod's memory.
    pub max_unsent_bytes: u64,
}

impl HttpConfig {
    /// The files a start reads: the token, the users, the certificate and its key.
    #[must_use]
    pub fn files(&self) -> Vec<PathBuf> {
        let tls = self.tls.iter().flat_map(|tls| [&tls.cert, &tls.key]);
        [&self.bearer_token_file, &self.basic_auth_users_file]
            .into_iter()
            .flatten()
            .chain(tls)
            .cloned()
            .collect()
    }
}

/// nftables settings: the agent's own table of counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftConfig {
    /// Whether to make the table and read its counters.
    pub enabled: NftEnabled,
    /// Name of our table (family inet).
    pub table: String,
    /// How long the `nft` tool may take to make or remove the table before it is killed.
    pub nft_timeout: Duration,
}

/// `[nftables] enabled`: `true`, `false`, or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NftEnabled {
    On,
    Off,
    /// On where netfilter already hooks prerouting and postrouting in this namespace (any
    /// host with NAT or conntrack), so that our chains add no hook of their own; the first
    /// hook of a namespace costs every packet (docs/DESIGN.md).
    Auto,
}

/// A route of the proxy: a name and the local TCP ports it listens on, and the TLS server
/// names (SNI) that tell it apart on ports it shares with other routes (lower case; a
/// leading `*.` stands for one label). A port shared by name has one route without names,
/// which counts that port's other connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    pub ports: Vec<u16>,
    pub kind: RouteKind,
    pub sni: Vec<String>,
}

/// An upstream of the proxy: a name and the remote TCP ports of the backends behind it. The
/// connections this namespace opens to those ports are counted as a route's are, and their
/// connects that fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    pub ports: Vec<u16>,
}

/// What the route carries (a label on its metrics; counting is the same for all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Http,
    Https,
    Websocket,
    Tcp,
}

impl RouteKind {
    const ALL: [Self; 4] = [Self::Http, Self::Https, Self::Websocket, Self::Tcp];

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
            Self::Websocket => "websocket",
            Self::Tcp => "tcp",
        }
    }
}

/// DNS settings (used by the DNS counters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Count DNS at all (when false the classifiers count live TCP traffic only: the
    /// verifier drops their DNS path).
    pub enabled: bool,
    /// UDP ports of the DNS server.
    pub ports: Vec<u16>,
    /// UDP ports of the upstream servers the DNS server forwards to: a query leaving for one
    /// of them is a cache miss.
    pub upstream_ports: Vec<u16>,
    /// Domains kept in the top list.
    pub top_k: usize,
    /// Sample one query in this many, by a hash of its client port and id: its name for the
    /// top domains, and while the stream is read, its event and its answer's.
    pub sample_every: u32,
    /// Match responses to queries: latency, cache hits and misses, unanswered queries. Off,
    /// the same messages are counted at half or less of the kernel's cost per packet.
    pub match_responses: bool,
    /// Match one query in this many (chosen by a hash of client port and id), the rest only
    /// counted: latency, cache and unanswered figures then come from that sample.
    pub match_every: u32,
    /// Slots of the kernel's in-flight table: queries awaiting their answer, in sets of four
    /// by a hash of the flow (a query finding its set full goes untracked).
    pub in_flight_slots: u32,
    /// Keys set beside `enabled = false`, which then have no effect: warned of.
    pub ignored: Vec<&'static str>,
}

/// What a `[dns]` table without keys gives.
impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ports: vec![53],
            upstream_ports: vec![53],
            top_k: 100,
            sample_every: 1,
            match_responses: true,
            match_every: 1,
            in_flight_slots: DNS_INFLIGHT_SLOTS,
            ignored: Vec::new(),
        }
    }
}

/// A configuration that cannot be used, and where.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub source_name: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(line), Some(column)) => {
                write!(f, "{}:{line}:{column}: {}", self.source_name, self.reason)
            }
            _ => write!(f, "{}: {}", self.source_name, self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Spanned<String>>,
    pin_dir: Option<Spanned<String>>,
    cgroup2: Option<Spanned<String>>,
    #[serde(default)]
    interfaces: Vec<Spanned<String>>,
    #[serde(default)]
    exclude_interfaces: Vec<Spanned<String>>,
    #[serde(default)]
    all_namespaces: bool,
    #[serde(default)]
    extra_local_addresses: Vec<Spanned<String>>,
    client_stats: Option<bool>,
    connection_table_slots: Option<Spanned<u64>>,
    poll_interval_ms: Option<Spanned<u64>>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    #[serde(default, deserialize_with = "single_table")]
    dns: Option<RawDns>,
    #[serde(default, deserialize_with = "single_table")]
    nftables: Option<RawNft>,
    #[serde(default, deserialize_with = "single_table")]
    http: Option<RawHttp>,
}

/// The keys the commands that only read the agent or its pins use, the rest of the file left
/// unread ([`Config::from_file_for_reading`]).
#[derive(Deserialize)]
struct RawReading {
    listen: Option<Spanned<String>>,
    pin_dir: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "single_table")]
    http: Option<RawHttp>,
}

/// A file a start refuses, as [`Config::from_file_for_reading`] took it.
#[derive(Debug, PartialEq, Eq)]
pub struct RefusedAtStart {
    pub error: ConfigError,
    /// The keys read that the file, as read, does not set (a key misplaced under another
    /// table, or misspelt, is not read): the defaults stand for them.
    pub defaulted: Vec<&'static str>,
}

const SINGLE_TABLE: &str = "a table, in single brackets";

/// A table given once (`[dns]`), and only as a table: serde's derived structs also take an
/// array, field by field, so `[[dns]]` (the brackets of `[[routes]]`) was refused for the
/// type of the first field, and `dns = [false, ...]` accepted.
fn single_table<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct TableOnly<T>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for TableOnly<T> {
        type Value = Option<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(SINGLE_TABLE)
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }

    deserializer.deserialize_map(TableOnly(std::marker::PhantomData))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    bearer_token_file: Option<Spanned<String>>,
    basic_auth_users_file: Option<Spanned<String>>,
    tls_cert_file: Option<Spanned<String>>,
    tls_key_file: Option<Spanned<String>>,
    max_concurrent_requests: Option<Spanned<u64>>,
    max_event_streams: Option<Spanned<u64>>,
    request_timeout_ms: Option<Spanned<u64>>,
    tls_handshake_timeout_ms: Option<Spanned<u64>>,
    max_connections: Option<Spanned<u64>>,
    max_connections_per_address: Option<Spanned<u64>>,
    max_unsent_bytes: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNft {
    enabled: Option<Spanned<RawSwitch>>,
    table: Option<Spanned<String>>,
    nft_timeout_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Spanned<String>,
    ports: Spanned<Vec<Spanned<u16>>>,
    #[serde(rename = "type")]
    kind: Option<Spanned<String>>,
    sni: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: Spanned<String>,
    ports: Spanned<Vec<Spanned<u16>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    enabled: Option<bool>,
    ports: Option<Spanned<Vec<Spanned<u16>>>>,
    upstream_ports: Option<Spanned<Vec<Spanned<u16>>>>,
    top_k: Option<Spanned<u64>>,
    sample_every: Option<Spanned<u64>>,
    match_responses: Option<bool>,
    match_every: Option<Spanned<u64>>,
    in_flight_slots: Option<Spanned<u64>>,
}

/// A switch that may also be `"auto"`.
enum RawSwitch {
    Bool(bool),
    Word(String),
}

/// By hand rather than `untagged`, whose error names the type instead of the values taken.
impl<'de> Deserialize<'de> for RawSwitch {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Switch;
        impl serde::de::Visitor<'_> for Switch {
            type Value = RawSwitch;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("true, false or \"auto\"")
            }
            fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<RawSwitch, E> {
                Ok(RawSwitch::Bool(value))
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<RawSwitch, E> {
                Ok(RawSwitch::Word(value.to_owned()))
            }
        }
        deserializer.deserialize_any(Switch)
    }
}

/// Builds errors positioned in one source text.
struct Source<'a> {
    name: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn error(&self, span: Option<Range<usize>>, reason: impl Into<String>) -> ConfigError {
        let (line, column) = match span {
            Some(span) => {
                let (line, column) = self.position(span.start);
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        ConfigError {
            source_name: self.name.to_owned(),
            line,
            column,
            reason: reason.into(),
        }
    }

    fn at<T>(&self, value: &Spanned<T>, reason: impl Into<String>) -> ConfigError {
        self.error(Some(value.span()), reason)
    }

    /// 1-based line and column (in characters) of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }
}

impl Config {
    /// The configuration compiled into the binary.
    #[must_use]
    pub fn embedded_default() -> Self {
        // The embedded file is checked by a unit test; it cannot fail at run time.
        Self::from_toml("embedded default.toml", DEFAULT_TOML)
            .expect("the embedded default config is valid (see config::tests)")
    }

    /// Reads and checks a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let (name, text) = read_config_file(path)?;
        Self::from_toml(&name, &text)
    }

    /// A configuration file as the commands that only read the agent or its pins take it
    /// (`stats`, `events`, `top`, `maps`): one a start would refuse (a bad edit of the
    /// `ConfigMap`, while the running agent goes on serving) still gives its listen address,
    /// `pin_dir` and `[http]`, with the refusal beside them. Refused as a whole only where
    /// those keys, or the TOML itself, are at fault.
    pub fn from_file_for_reading(
        path: &Path,
    ) -> Result<(Self, Option<RefusedAtStart>), ConfigError> {
        let (name, text) = read_config_file(path)?;
        match Self::from_toml(&name, &text) {
            Ok(config) => Ok((config, None)),
            Err(error) => match Self::reading_keys(&name, &text) {
                Ok((config, defaulted)) => Ok((config, Some(RefusedAtStart { error, defaulted }))),
                Err(_) => Err(error),
            },
        }
    }

    /// [`Config::from_file_for_reading`]'s keys of `text`, checked as a start checks them,
    /// the defaults for the rest; and those of its keys the text does not set.
    fn reading_keys(
        source_name: &str,
        text: &str,
    ) -> Result<(Self, Vec<&'static str>), ConfigError> {
        let source = Source {
            name: source_name,
            text,
        };
        let reading: RawReading = parse_raw(&source)?;
        let defaulted = [
            ("listen", reading.listen.is_none()),
            ("pin_dir", reading.pin_dir.is_none()),
            ("[http]", reading.http.is_none()),
        ]
        .into_iter()
        .filter_map(|(key, unset)| unset.then_some(key))
        .collect();
        let raw = RawConfig {
            listen: reading.listen,
            pin_dir: reading.pin_dir,
            http: reading.http,
            ..RawConfig::default()
        };
        Ok((validate(&source, &raw)?, defaulted))
    }

    /// What to warn about a config without `[[routes]]`: it is valid, but a file of one's own
    /// does not inherit the embedded default's routes, so no client connection is counted.
    /// One with upstreams alone is warned of too, saying what it counts: written by one who
    /// thought the default's routes inherited, it would count no client connection, silently.
    #[must_use]
    pub fn no_routes_warning(&self) -> Option<&'static str> {
        if !self.routes.is_empty() {
            return None;
        }
        Some(match (self.upstreams.is_empty(), self.dns.enabled) {
            (true, true) => {
                "no [[routes]] configured: only DNS is counted, no proxy connections (a config \
                 file does not inherit the embedded default's routes: add [[routes]] tables with \
                 the proxy's ports)"
            }
            (true, false) => {
                "no [[routes]] configured and [dns] enabled = false: neither proxy connections \
                 nor DNS are counted, only the interfaces (add [[routes]] tables with the \
                 proxy's ports)"
            }
            (false, true) => {
                "no [[routes]] configured: only the upstreams' connections and DNS are counted, \
                 no client connections to the proxy (a config file does not inherit the \
                 embedded default's routes: add [[routes]] tables with the proxy's ports)"
            }
            (false, false) => {
                "no [[routes]] configured: only the upstreams' connections are counted, no \
                 client connections to the proxy (a config file does not inherit the embedded \
                 default's routes: add [[routes]] tables with the proxy's ports)"
            }
        })
    }

    /// What to warn about a cap per address that one address's requests and streams can fill:
    /// valid (a client may be held below the requests), but then the kubelet's probes, which
    /// share the node's address under hostNetwork, can be refused.
    #[must_use]
    pub fn probe_place_warning(&self) -> Option<String> {
        let http = &self.http;
        let busy = http.max_concurrent_requests + http.max_event_streams;
        (http.max_connections_per_address <= busy).then(|| {
            format!(
                "[http] max_connections_per_address = {} is not above max_concurrent_requests + \
                 max_event_streams ({} + {} = {busy}): requests from one address can hold all its \
                 places, and a kubelet probe from that address (hostNetwork) is then refused",
                http.max_connections_per_address,
                http.max_concurrent_requests,
                http.max_event_streams
            )
        })
    }

    /// What to warn about an endpoint served beyond loopback: open to anyone who reaches it,
    /// or with credentials that cross the network in clear text.
    #[must_use]
    pub fn exposure_warning(&self) -> Option<String> {
        let http = &self.http;
        let listen = self.listen;
        // An IPv4-mapped loopback address ([::ffff:127.0.0.1]) is loopback too.
        if listen.ip().to_canonical().is_loopback() {
            None
        } else if http.bearer_token_file.is_none() && http.basic_auth_users_file.is_none() {
            Some(format!(
                "serving beyond loopback ({listen}) without credentials (see [http] in the config)"
            ))
        } else if http.tls.is_none() {
            Some(format!(
                "credentials cross the network in clear text ({listen}): configure tls_cert_file and tls_key_file"
            ))
        } else {
            None
        }
    }

    /// What to warn about DNS keys set while DNS is off: a switch flipped for a while, or a
    /// mistake that would otherwise go unseen.
    #[must_use]
    pub fn dns_ignored_warning(&self) -> Option<String> {
        (!self.dns.ignored.is_empty()).then(|| {
            format!(
                "[dns] enabled = false: {} set but not used (DNS is not counted)",
                self.dns.ignored.join(", ")
            )
        })
    }

    /// What to warn about an upstream on the collector's own listen port: upstreams are
    /// followed by the remote port of this namespace's connects, so every request to the
    /// collector made from here would count as one. A backend may listen there, so it is
    /// not refused.
    #[must_use]
    pub fn upstream_on_listen_warning(&self) -> Option<String> {
        let port = self.listen.port();
        let upstream = self.upstreams.iter().find(|u| u.ports.contains(&port))?;
        Some(format!(
            "upstream {:?} has port {port}, the collector's own listen port: every request to \
             the collector made from this namespace (kubelet probes under hostNetwork, a local \
             Prometheus, `collector stats`) counts as a connect to it; give the collector \
             another port unless a backend of the proxy listens on {port}",
            upstream.name
        ))
    }

    /// What to warn about an `exclude_interfaces` pattern that matches every name (`*`): no
    /// interface is watched, so no live traffic and no DNS are counted, only connections.
    /// Valid (a way to run without any classifier), but more likely a slip.
    #[must_use]
    pub fn everything_excluded_warning(&self) -> Option<String> {
        let pattern = self
            .exclude_interfaces
            .iter()
            .find(|pattern| matches_every_name(pattern.as_str()))?;
        Some(format!(
            "exclude_interfaces: {:?} matches every interface: no live traffic and no DNS are \
             counted, only the connections (from the sockets); list names or narrower patterns \
             if that is not what you want",
            pattern.as_str()
        ))
    }

    /// Whether routes share ports by server name: the server name reader is attached then.
    #[must_use]
    pub fn shares_ports_by_name(&self) -> bool {
        self.routes.iter().any(|route| !route.sni.is_empty())
    }

    /// What to warn about an `nft_timeout_ms` that a stop with a stuck `nft` can outlast the
    /// shipped stop timeouts by: after the HTTP side's grace, the runtime's wait and the
    /// eBPF side's detach, the stop waits for the killed `nft`, then for the table's removal,
    /// each up to the timeout.
    #[must_use]
    pub fn stop_time_warning(&self) -> Option<String> {
        const SHIPPED_STOP_TIMEOUT: Duration = Duration::from_mins(1);
        const DETACH: Duration = Duration::from_secs(2);
        let nftables = &self.nftables;
        let longest = nftables.nft_timeout * 2
            + crate::HTTP_SHUTDOWN_GRACE
            + crate::RUNTIME_SHUTDOWN_WAIT
            + DETACH;
        // No `nft` runs at a stop where there is nothing to count.
        (crate::nft::mode(self) != NftEnabled::Off && longest >= SHIPPED_STOP_TIMEOUT).then(|| {
            format!(
                "[nftables] nft_timeout_ms = {}: with a stuck nft a stop can take {} s, past the \
                 {} s the shipped systemd unit and DaemonSet allow before they kill it (its \
                 programs and table then stay until the next start); lower it, or raise \
                 TimeoutStopSec / terminationGracePeriodSeconds",
                nftables.nft_timeout.as_millis(),
                longest.as_secs(),
                SHIPPED_STOP_TIMEOUT.as_secs()
            )
        })
    }

    /// More `extra_local_addresses` entries than nftables holds in its sets: it then counts
    /// by port alone ([`crate::nft::EXTRA_RANGES_IN_SETS_MAX`]).
    #[must_use]
    pub fn nft_by_port_warning(&self) -> Option<String> {
        let entries = self.extra_local_addresses.len();
        let most = crate::nft::EXTRA_RANGES_IN_SETS_MAX;
        (crate::nft::mode(self) != NftEnabled::Off && entries > most).then(|| {
            format!(
                "extra_local_addresses has {entries} entries, more than the {most} nftables \
                 holds in its sets: collector_nft_* count by port alone, what the host forwards \
                 included (list ranges rather than single addresses)"
            )
        })
    }

    /// What a start warns of in a valid config.
    #[must_use]
    pub fn start_warnings(&self) -> Vec<String> {
        self.exposure_warning()
            .into_iter()
            .chain(self.no_routes_warning().map(str::to_owned))
            .chain(self.probe_place_warning())
            .chain(self.dns_ignored_warning())
            .chain(self.upstream_on_listen_warning())
            .chain(self.everything_excluded_warning())
            .chain(self.stop_time_warning())
            .chain(self.nft_by_port_warning())
            .collect()
    }

    /// Parses and checks configuration text; `source_name` names it in errors.
    pub fn from_toml(source_name: &str, text: &str) -> Result<Self, ConfigError> {
        let source = Source {
            name: source_name,
            text,
        };
        let raw: RawConfig = parse_raw(&source)?;
        validate(&source, &raw)
    }
}

/// A configuration file's name and text.
fn read_config_file(path: &Path) -> Result<(String, String), ConfigError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|err| ConfigError {
        source_name: name.clone(),
        line: None,
        column: None,
        reason: format!("cannot read the file: {err}"),
    })?;
    let text = String::from_utf8(bytes).map_err(|err| not_utf8(&name, &err))?;
    Ok((name, text))
}

/// The TOML of `source` into `T`, a refusal at its line.
fn parse_raw<T: serde::de::DeserializeOwned>(source: &Source<'_>) -> Result<T, ConfigError> {
    let text = source.text;
    toml::from_str(text).map_err(|err| {
        let message = in_words(err.message().trim());
        let message = message.as_str();
        // `[routes]` where `[[routes]]` was meant: say how a list of tables is written.
        // The whole line the error points into (at `routes.web` of `[routes.web]`, say).
        let table = err
            .span()
            .and_then(|span| {
                let start = text.get(..span.start)?.rfind('\n').map_or(0, |at| at + 1);
                text.get(start..)?.lines().next()
            })
            .and_then(|line| line.split('#').next())
            .map(str::trim)
            .filter(|line| line.starts_with('[') && line.ends_with(']'));
        // Only the lists of tables: `[interfaces]` is no slip of brackets.
        let list_of_tables = table.filter(|table| {
            let name = table.trim_matches(['[', ']']);
            let list = name.split_once('.').map_or(name, |(list, _)| list);
            LISTS_OF_TABLES.contains(&list.trim())
        });
        let hint = match table {
            Some(table)
                if message == "invalid type: map, expected an array, as [...]"
                    && list_of_tables.is_some() =>
            {
                match table.trim_matches(['[', ']']).split_once('.') {
                    // `[routes.web]`: a name in the header, as some tools take it.
                    Some((list, name)) => format!(
                        " (a list of tables takes double brackets and names each in it: \
                         [[{list}]] and then name = {:?})",
                        name.trim_matches('"')
                    ),
                    None => format!(" (a list of tables takes double brackets: [{table}])"),
                }
            }
            Some(table) if message.ends_with(SINGLE_TABLE) && table.starts_with("[[") => {
                format!(": {}", &table[1..table.len() - 1])
            }
            _ => misplaced_key(message).unwrap_or_default(),
        };
        source.error(err.span(), format!("{message}{hint}"))
    })
}

/// The file's lists of tables, `[[routes]]` and `[[upstreams]]`.
const LISTS_OF_TABLES: [&str; 2] = ["routes", "upstreams"];

/// The keys of the file's top level that are not tables (a unit test holds them to what it
/// takes).
const TOP_LEVEL_KEYS: [&str; 10] = [
    "listen",
    "pin_dir",
    "cgroup2",
    "interfaces",
    "exclude_interfaces",
    "all_namespaces",
    "extra_local_addresses",
    "client_stats",
    "connection_table_slots",
    "poll_interval_ms",
];

/// For an unknown key that is a top-level one: why it was not taken. Every key below a
/// table's header belongs to that table, so one appended to a file that ends in `[http]`
/// (as the `DaemonSet`'s `ConfigMap` does) lands there.
fn misplaced_key(message: &str) -> Option<String> {
    let key = message.strip_prefix("unknown field `")?.split('`').next()?;
    TOP_LEVEL_KEYS.contains(&key).then(|| {
        format!(
            " (`{key}` is a top-level key, and every key below a table's [header] belongs to \
             that table: move it above the first table)"
        )
    })
}

/// A file that is not UTF-8 (TOML's encoding), refused at its first byte that is not: a
/// stray Latin-1 byte from an editor is found by its line.
fn not_utf8(name: &str, err: &std::string::FromUtf8Error) -> ConfigError {
    let valid = &err.as_bytes()[..err.utf8_error().valid_up_to()];
    // UTF-8 up to `valid_up_to`, by its definition.
    let before = std::str::from_utf8(valid).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |last| last.chars().count())
        + 1;
    ConfigError {
        source_name: name.to_owned(),
        line: Some(line),
        column: Some(column),
        reason: "not UTF-8 text: TOML files are UTF-8 (an editor may have saved this one as \
                 Latin-1)"
            .to_owned(),
    }
}

/// serde's type names said as what the key takes: every `u16` here is a port, every `u64`
/// is range-checked after parsing (each range starts at 1 or more), and a sequence is a TOML
/// array.
fn in_words(message: &str) -> String {
    message
        .replace("expected u16", "expected a port number (1 to 65535)")
        .replace("expected u64", "expected a positive whole number")
        .replace("expected a sequence", "expected an array, as [...]")
}

/// Why the agent cannot serve on `listen`, if it cannot: a route's port would count every
/// scrape and probe of the agent as that route's traffic (the programs count a port on
/// every local address).
#[must_use]
pub fn listen_refused(listen: SocketAddr, routes: &[Route]) -> Option<String> {
    let route = routes.iter().find(|r| r.ports.contains(&listen.port()))?;
    // The default port or the next one no route has: the advice must not be refused too.
    let free = (DEFAULT_LISTEN_PORT..=u16::MAX)
        .find(|port| !routes.iter().any(|r| r.ports.contains(port)))
        .unwrap_or(DEFAULT_LISTEN_PORT);
    Some(format!(
        "{listen} has port {}, a port of route {:?}: the route would count every scrape and \
         probe of the collector as its traffic; give the collector a port of its own, e.g. \
         {free}",
        listen.port(),
        route.name
    ))
}

/// `value` as a listen address, or why not and what to write: an IP and a port, since no
/// host name is resolved, that a TCP connection can reach. The config's `listen` and the
/// `--listen` options alike (those of `stats`, `top` and `events` dial it).
pub fn listen_address(value: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = value.parse().map_err(|_| {
        let zone = value
            .split_once('%')
            .map(|(_, rest)| rest.split([']', ':']).next().unwrap_or(rest));
        if zone.is_some_and(|zone| !zone.bytes().all(|b| b.is_ascii_digit())) {
            // Rust takes a zone as a number only.
            format!(
                "{value:?} is not a socket address; after % write the interface's index, not \
                 its name, e.g. \"[fe80::1%2]:{DEFAULT_LISTEN_PORT}\" (`ip link` numbers them)"
            )
        } else {
            format!(
                "{value:?} is not a socket address; write IP:PORT, e.g. \"127.0.0.1:9464\" or \
                 \"[::1]:9464\" (host names are not resolved)"
            )
        }
    })?;
    // An IPv4-mapped address (::ffff:224.0.0.1) is judged as the IPv4 address it maps.
    let ip = addr.ip().to_canonical();
    let unreachable = match addr {
        _ if addr.port() == 0 => Some(format!(
            "has port 0, which binds a port the kernel picks and that probes, Prometheus and \
             the CLI cannot know: give a port, e.g. {DEFAULT_LISTEN_PORT}"
        )),
        _ if ip.is_multicast() => Some(
            "is a multicast address, which no TCP connection reaches: give a unicast one"
                .to_owned(),
        ),
        _ if matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast()) => Some(
            "is the broadcast address, which no TCP connection reaches: give a unicast one"
                .to_owned(),
        ),
        // The kernel refuses the bind (EINVAL): which link's fe80::1 is it?
        SocketAddr::V6(v6) if v6.ip().is_unicast_link_local() && v6.scope_id() == 0 => {
            Some(format!(
                "is link-local without its interface; after % write the interface's index, \
                 e.g. \"[{}%2]:{}\" (`ip link` numbers them)",
                v6.ip(),
                v6.port()
            ))
        }
        _ => None,
    };
    unreachable.map_or(Ok(addr), |why| Err(format!("{value:?} {why}")))
}

fn validate(source: &Source<'_>, raw: &RawConfig) -> Result<Config, ConfigError> {
    let listen = match &raw.listen {
        None => DEFAULT_LISTEN
            .parse()
            .map_err(|_| source.error(None, "bad built-in listen address"))?,
        Some(value) => listen_address(value.get_ref())
            .map_err(|why| source.at(value, format!("listen = {why}")))?,
    };
    let pin_dir = match &raw.pin_dir {
        Some(value) => bpffs_pin_dir(source, value)?,
        None => PathBuf::from(DEFAULT_PIN_DIR),
    };
    let cgroup2 = absolute_path(source, raw.cgroup2.as_ref(), "cgroup2")?;
    let interfaces = raw
        .interfaces
        .iter()
        .enumerate()
        .map(|(index, name)| {
            let text = name.get_ref();
            let valid = !text.is_empty()
                && text.len() <= INTERFACE_NAME_MAX
                && text != "."
                && text != ".."
                && !text.contains(NEVER_IN_INTERFACE_NAMES)
                && !text.chars().any(char::is_whitespace);
            let listed_before = raw.interfaces[..index]
                .iter()
                .any(|other| other.get_ref() == text);
            if listed_before {
                Err(source.at(name, format!("interface {text:?} is listed twice")))
            } else if text.contains(PATTERN_CHARACTERS) {
                // The kernel allows these in a name, but such a name is a glob meant for
                // the list beside, which would otherwise wait for an interface of that name.
                Err(source.at(
                    name,
                    format!(
                        "interface {text:?} is a pattern: interfaces takes exact names \
                         (exclude_interfaces takes patterns, narrowing interfaces = [], every \
                         up interface)"
                    ),
                ))
            } else if valid {
                Ok(text.clone())
            } else {
                Err(source.at(
                    name,
                    format!(
                        "interface {text:?} is not a valid interface name (1 to 15 bytes, or to \
                         {INTERFACE_NAME_MAX} for an alternative name; no '/', ':', spaces or \
                         NUL)"
                    ),
                ))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let poll_interval = match &raw.poll_interval_ms {
        None => Duration::from_secs(1),
        Some(value) if POLL_INTERVAL_MS.contains(value.get_ref()) => {
            Duration::from_millis(*value.get_ref())
        }
        Some(value) => {
            return Err(source.at(
                value,
                format!(
                    "poll_interval_ms = {} is out of range: allowed {} to {}",
                    value.get_ref(),
                    POLL_INTERVAL_MS.start,
                    POLL_INTERVAL_MS.end - 1
                ),
            ));
        }
    };
    let routes = validate_routes(source, &raw.routes)?;
    // A listen line of the file's own, at its line. The default one is checked where it is
    // used (`run`, `check`): `--listen` may replace it.
    if let Some(value) = &raw.listen
        && let Some(reason) = listen_refused(listen, &routes)
    {
        return Err(source.at(value, reason));
    }
    let upstreams = validate_upstreams(source, &raw.upstreams, routes.len())?;
    let dns = validate_dns(source, raw.dns.as_ref())?;
    let nftables = validate_nftables(source, raw.nftables.as_ref())?;
    let http = validate_http(source, raw.http.as_ref())?;
    Ok(Config {
        listen,
        pin_dir,
        cgroup2,
        interfaces,
        exclude_interfaces: exclude_interfaces(source, raw)?,
        all_namespaces: raw.all_namespaces,
        extra_local_addresses: extra_local_addresses(source, raw)?,
        client_stats: raw.client_stats.unwrap_or(true),
        connection_table_slots: connection_table_slots(source, raw)?,
        poll_interval,
        routes,
        upstreams,
        dns,
        nftables,
        http,
    })
}

/// `connection_table_slots`: a power of two (the kernel finds a cookie's slots by its low
/// bits) between the bounds, 48 bytes of kernel memory each.
fn connection_table_slots(source: &Source<'_>, raw: &RawConfig) -> Result<u32, ConfigError> {
    let Some(value) = &raw.connection_table_slots else {
        return Ok(CONN_TABLE_SLOTS);
    };
    table_slots(
        source,
        value,
        "connection_table_slots",
        conn_table_slots_allowed,
        [CONN_TABLE_SLOTS_MIN, CONN_TABLE_SLOTS, CONN_TABLE_SLOTS_MAX],
    )
}

/// The slots of a kernel table sized at load (`key`): a power of two that `allowed` takes,
/// with its `[min, default, max]` in the error.
fn table_slots(
    source: &Source<'_>,
    value: &Spanned<u64>,
    key: &str,
    allowed: impl Fn(u32) -> bool,
    [min, default, max]: [u32; 3],
) -> Result<u32, ConfigError> {
    let slots = *value.get_ref();
    u32::try_from(slots)
        .ok()
        .filter(|&slots| allowed(slots))
        .ok_or_else(|| {
            source.at(
                value,
                format!(
                    "{key} = {slots} is not a power of two from {min} to {max} ({default} is \
                     2^{})",
                    default.trailing_zeros()
                ),
            )
        })
}

/// Longest interface name the kernel takes: an alternative name's (`ALTIFNAMSIZ`, NUL
/// included); a device's own name takes at most 15 bytes (`IFNAMSIZ`).
const INTERFACE_NAME_MAX: usize = 127;

/// Characters of a glob: refused in `interfaces`, whose names are matched exactly.
const PATTERN_CHARACTERS: [char; 3] = ['*', '?', '['];

/// Characters the kernel allows in no interface name (`dev_valid_name`), beside whitespace.
const NEVER_IN_INTERFACE_NAMES: [char; 3] = ['/', ':', '\0'];

/// Most addresses one `extra_local_addresses` entry may stand for: each goes into the
/// kernel's address table.
const EXTRA_LOCAL_RANGE_MAX: u32 = 1 << 16;

/// Most addresses all `extra_local_addresses` entries may stand for together.
const EXTRA_LOCAL_ADDRESSES_MAX: u64 = 1 << 18;

/// `exclude_interfaces`: glob patterns (`*`, `?`, `[...]`) of names the default selection
/// leaves out. With `interfaces` listed there is no default selection to narrow, and a
/// name both listed and excluded would be a contradiction: refused.
fn exclude_interfaces(
    source: &Source<'_>,
    raw: &RawConfig,
) -> Result<Vec<glob::Pattern>, ConfigError> {
    let mut patterns = Vec::new();
    for (index, entry) in raw.exclude_interfaces.iter().enumerate() {
        let text = entry.get_ref();
        if !raw.interfaces.is_empty() {
            return Err(source.at(
                entry,
                "exclude_interfaces narrows the default selection (interfaces = []); with \
                 interfaces listed, only those are watched: list them or exclude, not both",
            ));
        }
        if raw.exclude_interfaces[..index]
            .iter()
            .any(|other| other.get_ref() == text)
        {
            return Err(source.at(entry, format!("pattern {text:?} is listed twice")));
        }
        let pattern = glob::Pattern::new(text)
            .ok()
            .filter(|_| !text.is_empty())
            .ok_or_else(|| {
                source.at(
                    entry,
                    format!(
                        "{text:?} is not a pattern of interface names (a name, or a glob with \
                         *, ? and [...], such as \"cali*\")"
                    ),
                )
            })?;
        // A pattern that can match no interface name would exclude nothing, silently.
        let never = if text.contains(NEVER_IN_INTERFACE_NAMES)
            || text.chars().any(char::is_whitespace)
        {
            Some("holds a character no interface name has ('/', ':', a space or NUL)")
        } else if shortest_match(text) > INTERFACE_NAME_MAX {
            Some(
                "matches only names longer than an interface's (127 bytes, an alternative name's most)",
            )
        } else {
            None
        };
        if let Some(why) = never {
            return Err(source.at(
                entry,
                format!("exclude_interfaces: {text:?} {why}: it would exclude nothing"),
            ));
        }
        patterns.push(pattern);
    }
    Ok(patterns)
}

/// Whether the glob `pattern` matches every interface name: stars, and at most one `?` (every
/// name has a character).
fn matches_every_name(pattern: &str) -> bool {
    pattern.contains('*')
        && pattern.chars().all(|c| c == '*' || c == '?')
        && pattern.matches('?').count() <= 1
}

/// The length in bytes of the shortest name `pattern` (a valid glob) matches: each `?`
/// and `[...]` one character, `*` none.
fn shortest_match(pattern: &str) -> usize {
    let mut chars = pattern.chars();
    let mut bytes = 0;
    while let Some(c) = chars.next() {
        match c {
            '*' => {}
            '[' => {
                // A `!` first negates the class; a `]` first after it is one of its
                // characters.
                let (mut negated, mut members) = (false, 0);
                for inside in chars.by_ref() {
                    if inside == '!' && members == 0 && !negated {
                        negated = true;
                    } else if inside == ']' && members > 0 {
                        break;
                    } else {
                        members += 1;
                    }
                }
                bytes += 1;
            }
            c => bytes += c.len_utf8(),
        }
    }
    bytes
}

/// `extra_local_addresses`, each checked, and their total.
fn extra_local_addresses(
    source: &Source<'_>,
    raw: &RawConfig,
) -> Result<Vec<(IpAddr, u8)>, ConfigError> {
    let mut total = 0u64;
    let mut ranges = Vec::new();
    // The entries so far as IPv6 spans (first, last) by first address, with their index:
    // disjoint, as each new one is checked against its neighbours here.
    let mut spans: BTreeMap<u128, (u128, usize)> = BTreeMap::new();
    for entry in &raw.extra_local_addresses {
        if raw.all_namespaces {
            return Err(source.at(
                entry,
                "extra_local_addresses has no effect with all_namespaces = true, which counts \
                 live traffic by port alone",
            ));
        }
        let (network, prefix) = extra_local_address(source, entry)?;
        let (first, last) = ipv6_span(network, prefix);
        let before = spans
            .range(..=first)
            .next_back()
            .filter(|&(_, &(end, _))| end >= first);
        let after = spans
            .range(first..)
            .next()
            .filter(|&(&start, _)| start <= last);
        if let Some((_, &(_, earlier))) = before.or(after) {
            return Err(source.at(
                entry,
                format!(
                    "extra_local_addresses: {:?} covers addresses {:?} covers already; list \
                     each address once",
                    entry.get_ref(),
                    raw.extra_local_addresses[earlier].get_ref()
                ),
            ));
        }
        spans.insert(first, (last, ranges.len()));
        let bits = if network.is_ipv4() { 32 } else { 128 };
        total += 1 << (bits - prefix);
        if total > EXTRA_LOCAL_ADDRESSES_MAX {
            return Err(source.at(
                entry,
                format!(
                    "extra_local_addresses stand for more than {EXTRA_LOCAL_ADDRESSES_MAX} \
                     addresses with this entry"
                ),
            ));
        }
        ranges.push((network, prefix));
    }
    Ok(ranges)
}

/// The first and last address of a range as IPv6 (an IPv4 one mapped, as the kernel's
/// table keeps it).
fn ipv6_span(network: IpAddr, prefix: u8) -> (u128, u128) {
    let (first, prefix) = match network {
        IpAddr::V4(v4) => (u128::from(v4.to_ipv6_mapped()), prefix + 96),
        IpAddr::V6(v6) => (u128::from(v6), prefix),
    };
    // `u128::MAX >> prefix` is the host part's mask; a prefix of 128 leaves none.
    let hosts = u128::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
    (first, first | hosts)
}

/// An address (`203.0.113.10`) or range (`203.0.113.0/28`) of `extra_local_addresses`,
/// as its network and prefix length; a range with host bits set is refused.
fn extra_local_address(
    source: &Source<'_>,
    entry: &Spanned<String>,
) -> Result<(IpAddr, u8), ConfigError> {
    let text = entry.get_ref();
    let malformed = || {
        source.at(
            entry,
            format!(
                "extra_local_addresses: {text:?} is not an address or range; write e.g. \
                 \"203.0.113.10\" or \"203.0.113.0/28\""
            ),
        )
    };
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text.as_str(), None),
    };
    let address: IpAddr = address.parse().map_err(|_| malformed())?;
    let bits: u8 = if address.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => bits,
        Some(prefix) => match prefix.parse::<u8>() {
            Ok(prefix) if prefix <= bits => prefix,
            Ok(prefix) => {
                return Err(source.at(
                    entry,
                    format!(
                        "extra_local_addresses: {text:?}: a prefix of /{prefix} is longer than \
                         the address's {bits} bits"
                    ),
                ));
            }
            Err(_) => return Err(malformed()),
        },
    };
    if u32::from(bits - prefix) > EXTRA_LOCAL_RANGE_MAX.trailing_zeros() {
        return Err(source.at(
            entry,
            format!(
                "extra_local_addresses: {text:?} covers 2^{} addresses; each entry may cover \
                 at most {EXTRA_LOCAL_RANGE_MAX} (/{} for IPv4, /{} for IPv6)",
                bits - prefix,
                32 - EXTRA_LOCAL_RANGE_MAX.trailing_zeros(),
                128 - EXTRA_LOCAL_RANGE_MAX.trailing_zeros()
            ),
        ));
    }
    let network = match address {
        IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(
            u32::from(v4) & u32::MAX.checked_shl(u32::from(32 - prefix)).unwrap_or(0),
        )),
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(
            u128::from(v6) & u128::MAX.checked_shl(u32::from(128 - prefix)).unwrap_or(0),
        )),
    };
    // `ip addr` writes an interface's address with its subnet's prefix (203.0.113.10/24):
    // taken as a range, it would count the neighbours' traffic as this host's.
    if network != address {
        return Err(source.at(
            entry,
            format!(
                "extra_local_addresses: {text:?} has bits set past its /{prefix}, so it stands \
                 for all of {network}/{prefix}; write \"{address}\" for the one address or \
                 \"{network}/{prefix}\" for the range"
            ),
        ));
    }
    // `::` is what a free slot of the kernel's address table holds, and neither it nor
    // 0.0.0.0 (also spelt `::ffff:0.0.0.0`, its key in the table) is an address a packet to
    // or from this host carries.
    if network.to_canonical().is_unspecified() {
        return Err(source.at(
            entry,
            format!(
                "extra_local_addresses: {text:?} starts at the unspecified address {network}, \
                 which no packet is to or from; list the addresses the host answers on"
            ),
        ));
    }
    Ok((network, prefix))
}

fn validate_http(source: &Source<'_>, raw: Option<&RawHttp>) -> Result<HttpConfig, ConfigError> {
    let mut http = HttpConfig {
        bearer_token_file: None,
        basic_auth_users_file: None,
        tls: None,
        max_concurrent_requests: 64,
        max_event_streams: 8,
        request_timeout: Duration::from_secs(10),
        tls_handshake_timeout: Duration::from_secs(10),
        max_connections: 512,
        // Above max_concurrent_requests + max_event_streams (72): one address (a node's,
        // under hostNetwork) holding every request and stream still leaves its probes a
        // place to take.
        max_connections_per_address: 80,
        // Some 25 answers of /metrics with 256 routes (1.2 MB each), 800 of the embedded
        // default's (40 kB): well inside the shipped 256 MiB limit beside the agent's 30 MiB.
        max_unsent_bytes: 32 * 1024 * 1024,
    };
    let Some(raw) = raw else {
        return Ok(http);
    };
    http.bearer_token_file =
        absolute_path(source, raw.bearer_token_file.as_ref(), "bearer_token_file")?;
    http.basic_auth_users_file = absolute_path(
        source,
        raw.basic_auth_users_file.as_ref(),
        "basic_auth_users_file",
    )?;
    http.tls = match (&raw.tls_cert_file, &raw.tls_key_file) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: absolute(source, cert, "tls_cert_file")?,
            key: absolute(source, key, "tls_key_file")?,
        }),
        (Some(cert), None) => {
            return Err(source.at(cert, "tls_cert_file needs tls_key_file beside it"));
        }
        (None, Some(key)) => {
            return Err(source.at(key, "tls_key_file needs tls_cert_file beside it"));
        }
        (None, None) => None,
    };
    if let Some(limit) = &raw.max_concurrent_requests {
        http.max_concurrent_requests =
            in_range(source, limit, "max_concurrent_requests", 1, 10_000)?;
    }
    if let Some(limit) = &raw.max_event_streams {
        http.max_event_streams = in_range(source, limit, "max_event_streams", 1, 1_000)?;
    }
    if let Some(timeout) = &raw.request_timeout_ms {
        let ms: u64 = in_range(source, timeout, "request_timeout_ms", 100, 600_000)?;
        http.request_timeout = Duration::from_millis(ms);
    }
    if let Some(timeout) = &raw.tls_handshake_timeout_ms {
        let ms: u64 = in_range(source, timeout, "tls_handshake_timeout_ms", 1000, 600_000)?;
        http.tls_handshake_timeout = Duration::from_millis(ms);
    }
    if let Some(limit) = &raw.max_connections {
        http.max_connections = in_range(source, limit, "max_connections", 1, 100_000)?;
    }
    if let Some(limit) = &raw.max_connections_per_address {
        http.max_connections_per_address =
            in_range(source, limit, "max_connections_per_address", 1, 100_000)?;
    }
    if let Some(limit) = &raw.max_unsent_bytes {
        http.max_unsent_bytes = in_range(source, limit, "max_unsent_bytes", 1 << 20, 1 << 32)?;
    }
    // A new connection is refused only when every one is in a request, and the permits let
    // this many be: a cap in all no higher would leave the kubelet's probes no place.
    let in_requests = http.max_concurrent_requests + http.max_event_streams;
    if http.max_connections <= in_requests {
        // At the one of them written last: most likely the edit that broke the balance.
        let at = [
            &raw.max_connections,
            &raw.max_concurrent_requests,
            &raw.max_event_streams,
        ]
        .into_iter()
        .filter_map(|key| key.as_ref().map(Spanned::span))
        .max_by_key(|span| span.start);
        return Err(source.error(
            at,
            format!(
                "max_connections = {} must be more than max_concurrent_requests + \
                 max_event_streams ({} + {} = {in_requests}), or connections in a request can \
                 take every place and leave the kubelet's probes none: raise max_connections or \
                 lower the others",
                http.max_connections, http.max_concurrent_requests, http.max_event_streams
            ),
        ));
    }
    Ok(http)
}

fn validate_nftables(source: &Source<'_>, raw: Option<&RawNft>) -> Result<NftConfig, ConfigError> {
    let mut nftables = NftConfig {
        enabled: NftEnabled::Auto,
        table: "collector".to_owned(),
        nft_timeout: Duration::from_secs(10),
    };
    let Some(raw) = raw else {
        return Ok(nftables);
    };
    if let Some(enabled) = &raw.enabled {
        nftables.enabled = match enabled.get_ref() {
            RawSwitch::Bool(true) => NftEnabled::On,
            RawSwitch::Bool(false) => NftEnabled::Off,
            RawSwitch::Word(word) if word == "auto" => NftEnabled::Auto,
            // Quoted, as a template may render a boolean.
            RawSwitch::Word(word) if word == "true" || word == "false" => {
                return Err(source.at(
                    enabled,
                    format!(
                        "nftables enabled = {word:?}: a string; write {word} without quotes, or \
                         \"auto\""
                    ),
                ));
            }
            RawSwitch::Word(word) => {
                return Err(source.at(
                    enabled,
                    format!("nftables enabled = {word:?}: use true, false or \"auto\""),
                ));
            }
        };
    }
    if let Some(table) = &raw.table {
        let name = table.get_ref();
        // As nft's syntax takes a name: `nft list ruleset` writes it unquoted, and a saved
        // ruleset holding one it cannot read back (`1st`, `-x`) fails to load whole.
        let valid = name.len() <= 64
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err(source.at(
                table,
                format!(
                    "nftables table {name:?}: use 1 to 64 letters, digits, '_' or '-', \
                     beginning with a letter or '_'"
                ),
            ));
        }
        nftables.table.clone_from(name);
    }
    if let Some(timeout) = &raw.nft_timeout_ms {
        let ms: u64 = in_range(source, timeout, "nft_timeout_ms", 1000, 60_000)?;
        nftables.nft_timeout = Duration::from_millis(ms);
    }
    Ok(nftables)
}

/// An absolute `pin_dir`, refused where [`pin_dir_refused`] refuses it.
fn bpffs_pin_dir(source: &Source<'_>, value: &Spanned<String>) -> Result<PathBuf, ConfigError> {
    let pin_dir = normal_pin_dir(&absolute(source, value, "pin_dir")?);
    match pin_dir_refused(&pin_dir) {
        Some(reason) => Err(source.at(value, format!("pin_dir = {:?}: {reason}", value.get_ref()))),
        None => Ok(pin_dir),
    }
}

/// `pin_dir` without a trailing slash (or a doubled one): through a symbolic link,
/// `/sys/fs/bpf/link/` is the directory it names, and judged so, where the stop must see the
/// link ([`paths::given_as_link`]). For the file's `pin_dir` and `--pin-dir` alike.
#[must_use]
pub fn normal_pin_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.components().collect()
}

/// Why `run` would refuse the pin directory below the usual bpffs mount, whatever the host:
/// the mount itself, or a name with a dot (bpffs refuses those; `..` too, which `run` takes
/// for one). Other mounts are judged at start, where /proc/mounts is at hand. For the
/// file's `pin_dir` and `--pin-dir` alike.
pub fn pin_dir_refused(pin_dir: &Path) -> Option<String> {
    let mount = Path::new(paths::BPFFS_ROOT);
    if pin_dir
        .components()
        .any(|part| part == Component::ParentDir)
    {
        Some("has a `..`: write the directory without it".into())
    } else if pin_dir == mount {
        Some(format!(
            "is the bpffs mount itself, where other tools pin too: set it to a directory of its own on it, such as {DEFAULT_PIN_DIR:?}"
        ))
    } else if paths::dot_below(mount, pin_dir) {
        Some("bpffs refuses names with a dot in them; use one without".into())
    } else {
        None
    }
}

fn absolute_path(
    source: &Source<'_>,
    value: Option<&Spanned<String>>,
    key: &str,
) -> Result<Option<PathBuf>, ConfigError> {
    value.map(|value| absolute(source, value, key)).transpose()
}

fn absolute(
    source: &Source<'_>,
    value: &Spanned<String>,
    key: &str,
) -> Result<PathBuf, ConfigError> {
    let path = PathBuf::from(value.get_ref());
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(source.at(
            value,
            format!("{key} = {:?} must be an absolute path", value.get_ref()),
        ))
    }
}

fn validate_routes(source: &Source<'_>, raw: &[RawRoute]) -> Result<Vec<Route>, ConfigError> {
    if raw.len() > MAX_ROUTES {
        return Err(source.at(
            &raw[MAX_ROUTES].name,
            format!(
                "{} routes configured; at most {MAX_ROUTES} fit the kernel's route slots",
                raw.len()
            ),
        ));
    }
    let mut routes: Vec<Route> = Vec::with_capacity(raw.len());
    for route in raw {
        // Routes by name share their ports; the others keep theirs to themselves.
        let earlier: Vec<(&str, &[u16])> = routes
            .iter()
            .map(|r| {
                let ports = if route.sni.is_some() || !r.sni.is_empty() {
                    &[][..]
                } else {
                    r.ports.as_slice()
                };
                (r.name.as_str(), ports)
            })
            .collect();
        let (name, ports) = named_ports(
            source,
            "route",
            ROUTE_NAME_MAX,
            &route.name,
            &route.ports,
            &earlier,
        )?;
        let kind = match &route.kind {
            None => RouteKind::Tcp,
            Some(kind) => RouteKind::ALL
                .into_iter()
                .find(|k| k.as_str() == kind.get_ref())
                .ok_or_else(|| {
                    source.at(
                        kind,
                        format!(
                            "route {name:?}: type {:?} is not one of http, https, websocket, tcp",
                            kind.get_ref()
                        ),
                    )
                })?,
        };
        let sni = match &route.sni {
            None => Vec::new(),
            Some(names) => server_names(source, &name, kind, &ports, names, &routes)?,
        };
        routes.push(Route {
            name,
            ports,
            kind,
            sni,
        });
    }
    for (route, raw_route) in routes.iter().zip(raw) {
        let Some(names) = &raw_route.sni else {
            continue;
        };
        for &port in &route.ports {
            let plain = routes
                .iter()
                .any(|r| r.sni.is_empty() && r.ports.contains(&port));
            if !plain {
                return Err(source.at(
                    names,
                    format!(
                        "route {:?} is told apart by server name on port {port}, but no route without `sni` has port {port} to count its other connections (no name, a name no route has, not TLS): add one, e.g. [[routes]] name = \"tls-other\" ports = [{port}]",
                        route.name
                    ),
                ));
            }
        }
    }
    let entries: usize = routes.iter().map(|r| r.sni.len() * r.ports.len()).sum();
    if entries > SNI_NAMES_MAX as usize {
        let last = raw.iter().rev().find_map(|r| r.sni.as_ref());
        return Err(source.error(
            last.map(Spanned::span),
            format!(
                "{entries} server names over all ports of the routes; at most {SNI_NAMES_MAX} fit the kernel's name map"
            ),
        ));
    }
    Ok(routes)
}

/// The server names of route `name` (on `ports`), each a DNS name or `*.` and one, lower
/// case, and on each port no other route's.
fn server_names(
    source: &Source<'_>,
    name: &str,
    kind: RouteKind,
    ports: &[u16],
    names: &Spanned<Vec<Spanned<String>>>,
    earlier: &[Route],
) -> Result<Vec<String>, ConfigError> {
    if kind == RouteKind::Http {
        return Err(source.at(
            names,
            format!(
                "route {name:?} is of type http, which carries no TLS server name; `sni` needs https, websocket or tcp"
            ),
        ));
    }
    if names.get_ref().is_empty() {
        return Err(source.at(
            names,
            format!(
                "route {name:?}: sni = [] names nothing; leave `sni` out of the route that counts the port's other connections"
            ),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(names.get_ref().len());
    for server in names.get_ref() {
        let lower = server.get_ref().to_ascii_lowercase();
        // A name copied from a zone file ends in its root's dot; the kernel drops a client's.
        let text = lower.strip_suffix('.').unwrap_or(&lower).to_owned();
        if !valid_server_name(&text) {
            return Err(source.at(
                server,
                format!(
                    "route {name:?}: {:?} is not a server name: a DNS name (labels of 1 to 63 of a-z, 0-9, '-', '_', at most 253 characters), optionally after \"*.\" for any one label",
                    server.get_ref()
                ),
            ));
        }
        // No top-level domain is all digits: this is an IPv4 address, or one in part.
        if text
            .rsplit('.')
            .next()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(source.at(
                server,
                format!(
                    "route {name:?}: {text:?} ends in an all-digit label, as an IPv4 address does, and TLS never sends an address as a server name (RFC 6066): clients that connect by address send no name, and count as no_name in the route without `sni` (one that sends the address anyway, as unknown_name)"
                ),
            ));
        }
        if out.contains(&text) {
            return Err(source.at(
                server,
                format!("route {name:?} lists server name {text:?} twice"),
            ));
        }
        if let Some(other) = earlier
            .iter()
            .find(|r| r.sni.contains(&text) && r.ports.iter().any(|p| ports.contains(p)))
        {
            return Err(source.at(
                server,
                format!(
                    "server name {text:?} is in routes {:?} and {name:?} on a port they share; a name on a port belongs to one route",
                    other.name
                ),
            ));
        }
        out.push(text);
    }
    Ok(out)
}

/// A DNS name (lower case) of at most 253 characters, or `*.` and one.
fn valid_server_name(name: &str) -> bool {
    let host = name.strip_prefix("*.").unwrap_or(name);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
}

/// The upstreams, after the routes: both take slots of the kernel's route arrays.
fn validate_upstreams(
    source: &Source<'_>,
    raw: &[RawUpstream],
    routes: usize,
) -> Result<Vec<Upstream>, ConfigError> {
    if let Some(first_over) = raw.get(MAX_ROUTES.saturating_sub(routes)) {
        return Err(source.at(
            &first_over.name,
            format!(
                "{routes} routes and {} upstreams configured; at most {MAX_ROUTES} in all fit the kernel's route slots",
                raw.len()
            ),
        ));
    }
    let mut upstreams: Vec<Upstream> = Vec::with_capacity(raw.len());
    for upstream in raw {
        let earlier: Vec<(&str, &[u16])> = upstreams
            .iter()
            .map(|u| (u.name.as_str(), u.ports.as_slice()))
            .collect();
        let (name, ports) = named_ports(
            source,
            "upstream",
            UPSTREAM_NAME_MAX,
            &upstream.name,
            &upstream.ports,
            &earlier,
        )?;
        upstreams.push(Upstream { name, ports });
    }
    Ok(upstreams)
}

/// Longest route name: the kernel records a slot's owner in 63 bytes.
const ROUTE_NAME_MAX: usize = 63;
/// Longest upstream name: recorded as `upstream/NAME` in the same 63 bytes (a longer one
/// would read back cut, and lose its slot at the next start).
const UPSTREAM_NAME_MAX: usize = ROUTE_NAME_MAX - "upstream/".len();

/// The name and ports of a route or upstream (`what`), checked against the `earlier` ones of
/// its kind: a valid name of up to `max_len` characters used once, one or more ports, each
/// in one of them only.
fn named_ports(
    source: &Source<'_>,
    what: &str,
    max_len: usize,
    name: &Spanned<String>,
    ports: &Spanned<Vec<Spanned<u16>>>,
    earlier: &[(&str, &[u16])],
) -> Result<(String, Vec<u16>), ConfigError> {
    let text = name.get_ref();
    let name_ok = !text.is_empty()
        && text.len() <= max_len
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !name_ok {
        return Err(source.at(
            name,
            format!(
                "{what} name {text:?} is not valid: 1 to {max_len} characters of A-Z, a-z, 0-9, '_', '.', '-'"
            ),
        ));
    }
    if earlier.iter().any(|(other, _)| other == text) {
        return Err(source.at(name, format!("{what} name {text:?} is used twice")));
    }
    if ports.get_ref().is_empty() {
        return Err(source.at(ports, format!("{what} {text:?} has no ports")));
    }
    let mut numbers: Vec<u16> = Vec::with_capacity(ports.get_ref().len());
    for port in ports.get_ref() {
        let number = *port.get_ref();
        if number == 0 {
            return Err(source.at(port, format!("{what} {text:?}: port 0 is not a port")));
        }
        if numbers.contains(&number) {
            return Err(source.at(port, format!("{what} {text:?} lists port {number} twice")));
        }
        if let Some((owner, _)) = earlier.iter().find(|(_, ports)| ports.contains(&number)) {
            return Err(source.at(
                port,
                format!(
                    "port {number} is in {what}s {owner:?} and {text:?}; a port belongs to one {what}"
                ),
            ));
        }
        numbers.push(number);
    }
    Ok((text.clone(), numbers))
}

fn validate_dns(source: &Source<'_>, raw: Option<&RawDns>) -> Result<DnsConfig, ConfigError> {
    let mut dns = DnsConfig::default();
    let Some(raw) = raw else {
        return Ok(dns);
    };
    dns.enabled = raw.enabled.unwrap_or(true);
    if !dns.enabled {
        let set = [
            ("ports", raw.ports.is_some()),
            ("upstream_ports", raw.upstream_ports.is_some()),
            ("top_k", raw.top_k.is_some()),
            ("sample_every", raw.sample_every.is_some()),
            ("match_responses", raw.match_responses.is_some()),
            ("match_every", raw.match_every.is_some()),
            ("in_flight_slots", raw.in_flight_slots.is_some()),
        ];
        dns.ignored = set
            .iter()
            .filter(|(_, given)| *given)
            .map(|(key, _)| *key)
            .collect();
    }
    dns.match_responses = raw.match_responses.unwrap_or(true);
    if let Some(ports) = &raw.ports {
        dns.ports = port_list(source, ports, "ports")?;
    }
    if let Some(ports) = &raw.upstream_ports {
        dns.upstream_ports = port_list(source, ports, "upstream_ports")?;
    }
    if let Some(top_k) = &raw.top_k {
        dns.top_k = in_range(source, top_k, "top_k", 1, 10_000)?;
    }
    if let Some(sample_every) = &raw.sample_every {
        dns.sample_every = in_range(source, sample_every, "sample_every", 1, 65_536)?;
    }
    if let Some(match_every) = &raw.match_every {
        dns.match_every = in_range(source, match_every, "match_every", 1, 65_536)?;
        // A sample of nothing: refused rather than left to look as if it did something (with
        // DNS off, both are ignored, and warned of, as every key there is).
        if dns.enabled && !dns.match_responses && dns.match_every != 1 {
            return Err(source.at(
                match_every,
                "match_every samples the matched queries, and match_responses = false matches none: remove one of them",
            ));
        }
    }
    if let Some(slots) = &raw.in_flight_slots {
        dns.in_flight_slots = table_slots(
            source,
            slots,
            "in_flight_slots",
            dns_inflight_slots_allowed,
            [
                DNS_INFLIGHT_SLOTS_MIN,
                DNS_INFLIGHT_SLOTS,
                DNS_INFLIGHT_SLOTS_MAX,
            ],
        )?;
        // The default's own value, as the shipped file writes it, stays allowed.
        if dns.enabled && !dns.match_responses && dns.in_flight_slots != DNS_INFLIGHT_SLOTS {
            return Err(source.at(
                slots,
                "in_flight_slots sizes the table of matched queries, and match_responses = false matches none: remove one of them",
            ));
        }
    }
    // Unused without DNS (warned of above): the table keeps its default size, which is what a
    // crashed run's pins are then judged by.
    if !dns.enabled {
        dns.in_flight_slots = DNS_INFLIGHT_SLOTS;
    }
    Ok(dns)
}

/// A non-empty list of distinct UDP ports.
fn port_list(
    source: &Source<'_>,
    ports: &Spanned<Vec<Spanned<u16>>>,
    key: &str,
) -> Result<Vec<u16>, ConfigError> {
    if ports.get_ref().is_empty() {
        return Err(source.at(
            ports,
            format!("dns {key} is empty; leave it out for the default [53]"),
        ));
    }
    if ports.get_ref().len() > DNS_MAX_PORTS {
        return Err(source.at(
            ports,
            format!("dns {key} lists more than {DNS_MAX_PORTS} ports"),
        ));
    }
    let mut list = Vec::new();
    for port in ports.get_ref() {
        let number = *port.get_ref();
        if number == 0 {
            return Err(source.at(port, format!("dns {key}: port 0 is not a port")));
        }
        if list.contains(&number) {
            return Err(source.at(port, format!("dns {key} lists port {number} twice")));
        }
        list.push(number);
    }
    Ok(list)
}

fn in_range<T: TryFrom<u64>>(
    source: &Source<'_>,
    value: &Spanned<u64>,
    key: &str,
    min: u64,
    max: u64,
) -> Result<T, ConfigError> {
    let number = *value.get_ref();
    if (min..=max).contains(&number) {
        T::try_from(number).map_err(|_| source.at(value, format!("{key} = {number} is too large")))
    } else {
        Err(source.at(
            value,
            format!("{key} = {number} is out of range: allowed {min} to {max}"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    fn error(text: &str) -> ConfigError {
        Config::from_toml("test.toml", text).unwrap_err()
    }

    /// Asserts an error at `line` whose reason mentions `needle`.
    fn assert_error(text: &str, line: usize, needle: &str) {
        let err = error(text);
        assert_eq!(err.line, Some(line), "{err}");
        assert!(err.reason.contains(needle), "{err}");
    }

    /// Slips in a file's shape that toml and serde report in their own terms get the fix.
    #[test]
    fn slips_in_the_shape_of_a_file_are_refused_with_their_fix() {
        // With a comment after the header; with a name in it, as some tools take it.
        assert_error(
            "[routes]  # the proxy\nname = \"web\"\nports = [80]\n",
            1,
            "double brackets: [[routes]]",
        );
        // An array that is no list of tables: no talk of double brackets.
        let err = error("[interfaces]\nname = \"eth0\"\n");
        assert!(!err.reason.contains("double brackets"), "{err}");
        assert_error(
            "[routes.web]\nports = [80]\n",
            1,
            "double brackets and names each in it: [[routes]] and then name = \"web\"",
        );
        // A top-level key appended below a table's header.
        assert_error(
            "[http]\nmax_event_streams = 4\nexclude_interfaces = [\"cali*\"]\n",
            3,
            "`exclude_interfaces` is a top-level key, and every key below a table's [header] \
             belongs to that table: move it above the first table",
        );
        assert_error(
            "[nftables]\nenabled = \"true\"\n",
            2,
            "a string; write true without quotes",
        );
    }

    #[test]
    fn the_top_level_keys_a_hint_names_are_the_files_top_level_keys() {
        // What the file takes at its top level, as serde lists it for a key it does not.
        let err = error("no_such_key = 1\n");
        let expected = err.reason.split("expected one of ").nth(1).unwrap();
        let mut taken: Vec<&str> = expected
            .split(", ")
            .map(|key| key.trim_matches('`'))
            .collect();
        taken.sort_unstable();
        let tables = ["dns", "nftables", "http"];
        let mut listed: Vec<&str> = [&TOP_LEVEL_KEYS[..], &LISTS_OF_TABLES, &tables].concat();
        listed.sort_unstable();
        assert_eq!(taken, listed, "{err}");
    }

    #[test]
    fn the_in_flight_table_is_sized_by_a_power_of_two_within_its_bounds() {
        for refused in ["3000", "128", "2097152", "4294967296"] {
            assert_error(
                &format!("[dns]\nin_flight_slots = {refused}\n"),
                2,
                &format!("in_flight_slots = {refused} is not a power of two from 256 to 1048576"),
            );
        }
        assert_error(
            "[dns]\nmatch_responses = false\nin_flight_slots = 1024\n",
            3,
            "match_responses = false matches none",
        );
        // The shipped file with matching turned off: its default size is no setting to refuse.
        assert!(
            include_str!("default.toml")
                .contains(&format!("\nin_flight_slots = {DNS_INFLIGHT_SLOTS}\n"))
        );
        let shipped = include_str!("default.toml")
            .replace("match_responses = true", "match_responses = false");
        let off = Config::from_toml("t.toml", &shipped).unwrap();
        assert!(!off.dns.match_responses);
        assert_eq!(off.dns.in_flight_slots, DNS_INFLIGHT_SLOTS);
        // Without DNS the key sizes nothing.
        let unused = Config::from_toml(
            "t.toml",
            "[dns]\nenabled = false\nin_flight_slots = 65536\n",
        )
        .unwrap();
        assert_eq!(unused.dns.in_flight_slots, DNS_INFLIGHT_SLOTS);
        assert!(
            unused
                .dns_ignored_warning()
                .is_some_and(|warning| warning.contains("in_flight_slots")),
            "{:?}",
            unused.dns_ignored_warning()
        );
        // Nor do the keys that would conflict with matching off: all ignored alike, none
        // refused.
        let unused = Config::from_toml(
            "t.toml",
            "[dns]\nenabled = false\nmatch_responses = false\nmatch_every = 16\nin_flight_slots = 1024\n",
        )
        .unwrap();
        assert_eq!(unused.dns.in_flight_slots, DNS_INFLIGHT_SLOTS);
        assert_eq!(
            unused.dns_ignored_warning().as_deref(),
            Some(
                "[dns] enabled = false: match_responses, match_every, in_flight_slots set but not \
                 used (DNS is not counted)"
            )
        );
        for slots in [256, 65_536, 1_048_576] {
            let sized = Config::from_toml("t.toml", &format!("[dns]\nin_flight_slots = {slots}\n"))
                .unwrap();
            assert_eq!(sized.dns.in_flight_slots, slots);
        }
    }

    #[test]
    fn the_connection_table_is_sized_by_a_power_of_two_within_its_bounds() {
        let slots = |text: &str| {
            Config::from_toml("t.toml", text)
                .unwrap()
                .connection_table_slots
        };
        assert_eq!(slots(""), 65536);
        assert_eq!(slots("connection_table_slots = 1024\n"), 1024);
        assert_eq!(slots("connection_table_slots = 1048576\n"), 1_048_576);
        for slots in [0, 512, 1000, 65535, 2_097_152, 1u64 << 40] {
            assert_error(
                &format!("\nconnection_table_slots = {slots}\n"),
                2,
                "not a power of two from 1024 to 1048576",
            );
        }
    }

    /// A file a start refuses still gives the commands that only read the agent or its pins
    /// its address, TLS and token and pin directory, the refusal beside, and says which of
    /// those it does not set.
    #[test]
    fn a_file_a_start_refuses_still_gives_the_readers_their_keys() {
        let dir = crate::scratch::ScratchDir::new("reading");
        let text = "listen = \"127.0.0.1:9500\"\npin_dir = \"/sys/fs/bpf/edge\"\n\
                    [http]\nbearer_token_file = \"/run/token\"\n\
                    [nftables]\ntable = \"edge\"\n\
                    [dns]\ntop_k = 0\n";
        let (config, refused) = Config::from_file_for_reading(&dir.write("c.toml", text)).unwrap();
        let refused = refused.expect("a start refuses top_k = 0");
        assert_eq!(refused.error.line, Some(8), "{}", refused.error);
        assert!(refused.defaulted.is_empty(), "{:?}", refused.defaulted);
        assert_eq!(config.listen, "127.0.0.1:9500".parse().unwrap());
        assert_eq!(config.pin_dir, Path::new("/sys/fs/bpf/edge"));
        assert_eq!(
            config.http.bearer_token_file.as_deref(),
            Some(Path::new("/run/token"))
        );
        // A pin_dir written under another table is that table's (refused there), not read:
        // the default stands, and is said to.
        let misplaced = dir.write("m.toml", "[dns]\npin_dir = \"/sys/fs/bpf/edge\"\n");
        let (config, refused) = Config::from_file_for_reading(&misplaced).unwrap();
        let refused = refused.expect("a start refuses pin_dir in [dns]");
        assert_eq!(refused.error.line, Some(2), "{}", refused.error);
        assert_eq!(refused.defaulted, ["listen", "pin_dir", "[http]"]);
        assert_eq!(config.pin_dir, Config::embedded_default().pin_dir);
        // A file a start takes is read as the start reads it.
        let valid = dir.write("v.toml", "listen = \"127.0.0.1:9500\"\n[dns]\ntop_k = 7\n");
        let (config, refused) = Config::from_file_for_reading(&valid).unwrap();
        assert_eq!(refused, None);
        assert_eq!(config, Config::from_file(&valid).unwrap());
        // Those keys at fault, or the TOML itself: refused, as a start refuses them.
        for (text, line) in [
            ("[http]\nbearer_token_fil = \"/x\"\n", 2),
            ("listen = \"nowhere\"\n", 1),
            ("[dns\n", 1),
        ] {
            let err = Config::from_file_for_reading(&dir.write("b.toml", text)).unwrap_err();
            assert_eq!(err.line, Some(line), "{err}");
        }
    }

    /// The values a file leaves out are the embedded default's, which the README shows: a
    /// default changed in one place only would make an empty file run otherwise.
    #[test]
    fn a_file_without_keys_runs_as_the_embedded_default_less_its_routes() {
        let mut default = Config::embedded_default();
        default.routes.clear();
        assert_eq!(Config::from_toml("t.toml", "").unwrap(), default);
    }

    #[test]
    fn loopback_in_any_spelling_is_no_exposure() {
        let warned = |listen: &str| {
            Config::from_toml("t.toml", &format!("listen = \"{listen}\"\n"))
                .unwrap()
                .exposure_warning()
        };
        for local in ["127.0.0.1:9464", "[::1]:9464", "[::ffff:127.0.0.1]:9464"] {
            assert_eq!(warned(local), None, "{local}");
        }
        for exposed in ["0.0.0.0:9464", "[::]:9464", "[::ffff:192.0.2.7]:9464"] {
            assert!(warned(exposed).is_some(), "{exposed}");
        }
    }

    #[test]
    fn a_table_given_once_takes_single_brackets_and_no_array() {
        assert_error(
            "[[routes]]\nname = \"web\"\nports = [80]\n\n[[dns]]\nports = [53]\n",
            5,
            "invalid type: sequence, expected a table, in single brackets: [dns]",
        );
        assert_error(
            "[[nftables]]\nenabled = true\n",
            1,
            "expected a table, in single brackets: [nftables]",
        );
        assert_error(
            "http = [\"x\"]\n",
            1,
            "expected a table, in single brackets",
        );
        assert_error(
            "dns = [false, [53]]\n",
            1,
            "expected a table, in single brackets",
        );
        // Errors inside still name their line, serde's and the checks' alike.
        assert_error("[dns]\nports = \"x\"\n", 2, "expected an array");
        assert_error("[dns]\nport = [53]\n", 2, "unknown field `port`");
        assert_error("[dns]\nports = [0]\n", 2, "port");
    }

    #[test]
    fn nftables_counting_is_on_off_or_auto() {
        let enabled = |text: &str| Config::from_toml("t.toml", text).unwrap().nftables.enabled;
        assert_eq!(enabled(""), NftEnabled::Auto);
        assert_eq!(enabled("[nftables]\nenabled = true\n"), NftEnabled::On);
        assert_eq!(enabled("[nftables]\nenabled = false\n"), NftEnabled::Off);
        assert_eq!(
            enabled("[nftables]\nenabled = \"auto\"\n"),
            NftEnabled::Auto
        );
    }

    #[test]
    fn a_tls_handshake_gets_ten_seconds_unless_told_otherwise() {
        let timeout = |text: &str| {
            Config::from_toml("t.toml", text)
                .unwrap()
                .http
                .tls_handshake_timeout
        };
        assert_eq!(timeout(""), Duration::from_secs(10));
        assert_eq!(
            timeout("[http]\ntls_handshake_timeout_ms = 600000\n"),
            Duration::from_mins(10)
        );
        assert_error(
            "[http]\ntls_handshake_timeout_ms = 999\n",
            2,
            "tls_handshake_timeout_ms",
        );
        assert_error(
            "[http]\ntls_handshake_timeout_ms = 600001\n",
            2,
            "tls_handshake_timeout_ms",
        );
    }

    #[test]
    fn the_nft_tool_gets_ten_seconds_unless_told_otherwise() {
        let timeout = |text: &str| {
            Config::from_toml("t.toml", text)
                .unwrap()
                .nftables
                .nft_timeout
        };
        assert_eq!(timeout(""), Duration::from_secs(10));
        assert_eq!(
            timeout("[nftables]\nnft_timeout_ms = 60000\n"),
            Duration::from_mins(1)
        );
        assert_error("[nftables]\nnft_timeout_ms = 999\n", 2, "nft_timeout_ms");
        assert_error("[nftables]\nnft_timeout_ms = 60001\n", 2, "nft_timeout_ms");
        // Twice the timeout and the rest of the stop at the shipped 60 s stop timeout or past
        // it: said, unless nftables is off.
        let warning = |text: &str| {
            Config::from_toml("t.toml", &format!("[nftables]\n{text}"))
                .unwrap()
                .stop_time_warning()
        };
        assert_eq!(warning("nft_timeout_ms = 25000\n"), None);
        let said = warning("nft_timeout_ms = 26000\n").unwrap();
        assert!(said.contains("a stop can take 60 s"), "{said}");
        assert!(
            Config::from_toml("t.toml", "[nftables]\nnft_timeout_ms = 26000\n")
                .unwrap()
                .start_warnings()
                .contains(&said)
        );
        assert_eq!(warning("enabled = false\nnft_timeout_ms = 60000\n"), None);
        // Nor where nothing is counted: no `nft` runs at the stop.
        assert_eq!(
            Config::from_toml(
                "t.toml",
                "[dns]\nenabled = false\n[nftables]\nenabled = true\nnft_timeout_ms = 60000\n"
            )
            .unwrap()
            .stop_time_warning(),
            None
        );
    }

    #[test]
    fn extra_local_addresses_are_addresses_or_small_ranges() {
        let config = Config::from_toml(
            "t.toml",
            "extra_local_addresses = [\"203.0.113.10\", \"198.51.100.0/28\", \"2001:db8::/112\"]\n",
        )
        .unwrap();
        assert_eq!(
            config.extra_local_addresses,
            vec![
                ("203.0.113.10".parse().unwrap(), 32),
                ("198.51.100.0".parse().unwrap(), 28),
                ("2001:db8::".parse().unwrap(), 112),
            ]
        );
        assert_error(
            "\nextra_local_addresses = [\"203.0.113.0/15\"]\n",
            2,
            "covers 2^17 addresses; each entry may cover at most 65536 (/16 for IPv4, /112 for IPv6)",
        );
        assert_error(
            "extra_local_addresses = [\"198.51.100.7/24\"]\n",
            1,
            "extra_local_addresses: \"198.51.100.7/24\" has bits set past its /24, so it stands \
             for all of 198.51.100.0/24; write \"198.51.100.7\" for the one address or \
             \"198.51.100.0/24\" for the range",
        );
        assert_error(
            "extra_local_addresses = [\"2001:db8::1/112\"]\n",
            1,
            "stands for all of 2001:db8::/112",
        );
        assert_error(
            "extra_local_addresses = [\"203.0.113.0/33\"]\n",
            1,
            "a prefix of /33 is longer than the address's 32 bits",
        );
        for unspecified in [
            "::",
            "::/112",
            "0.0.0.0",
            "0.0.0.0/24",
            "::ffff:0.0.0.0",
            "::ffff:0.0.0.0/112",
        ] {
            assert_error(
                &format!("extra_local_addresses = [\"{unspecified}\"]\n"),
                1,
                "starts at the unspecified address",
            );
        }
        assert_error(
            "all_namespaces = true\nextra_local_addresses = [\"203.0.113.10\"]\n",
            2,
            "no effect with all_namespaces = true",
        );
        let five_ranges = (0..5)
            .map(|n| format!("\"10.{n}.0.0/16\""))
            .collect::<Vec<_>>()
            .join(", ");
        assert_error(
            &format!("extra_local_addresses = [{five_ranges}]\n"),
            1,
            "stand for more than 262144 addresses with this entry",
        );
        // An address listed again, in another spelling, or inside a range listed before or
        // after: refused at the later entry, naming the earlier one.
        for (first, second) in [
            ("203.0.113.10", "203.0.113.10"),
            ("203.0.113.10", "::ffff:203.0.113.10"),
            ("203.0.113.0/28", "203.0.113.15"),
            ("203.0.113.4", "203.0.113.0/29"),
            ("2001:db8::/120", "2001:db8::80/121"),
        ] {
            assert_error(
                &format!("extra_local_addresses = [\n  {first:?},\n  {second:?},\n]\n"),
                3,
                &format!("covers addresses {first:?} covers already"),
            );
        }
        for bad in ["203.0.113", "eth0", "2001:db8::/x"] {
            assert_error(
                &format!("extra_local_addresses = [{bad:?}]\n"),
                1,
                "is not an address or range",
            );
        }
    }

    #[test]
    fn the_embedded_default_is_valid_and_sensible() {
        let config = Config::embedded_default();
        assert_eq!(config.listen, "127.0.0.1:9464".parse().unwrap());
        assert_eq!(config.pin_dir, PathBuf::from("/sys/fs/bpf/collector"));
        assert!(config.interfaces.is_empty());
        assert!(!config.all_namespaces);
        assert!(config.client_stats);
        assert_eq!(config.poll_interval, Duration::from_secs(1));
        let routes: Vec<(&str, &[u16], RouteKind)> = config
            .routes
            .iter()
            .map(|r| (r.name.as_str(), r.ports.as_slice(), r.kind))
            .collect();
        assert_eq!(
            routes,
            [
                ("web", &[80, 8080][..], RouteKind::Http),
                ("tls", &[443, 8443][..], RouteKind::Https)
            ]
        );
        assert_eq!(config.dns.ports, [53]);
        assert_eq!(config.http.max_concurrent_requests, 64);
        assert_eq!(config.http.max_event_streams, 8);
        assert_eq!(config.http.max_connections, 512);
        assert_eq!(config.http.max_connections_per_address, 80);
        assert_eq!(config.http.max_unsent_bytes, 32 * 1024 * 1024);
    }

    #[test]
    fn a_pin_dir_loses_its_trailing_and_doubled_slashes() {
        let pin_dir = |text: &str| {
            Config::from_toml("t.toml", &format!("pin_dir = {text:?}\n"))
                .unwrap()
                .pin_dir
        };
        // As strings: paths compare by their components, slashes aside.
        for written in ["/sys/fs/bpf/edge/", "/sys/fs//bpf/edge", "/sys/fs/bpf/edge"] {
            assert_eq!(
                pin_dir(written).as_os_str(),
                "/sys/fs/bpf/edge",
                "{written}"
            );
        }
    }

    #[test]
    fn a_full_file_parses() {
        let config = Config::from_toml(
            "full.toml",
            r#"
listen = "[::1]:9100"
pin_dir = "/sys/fs/bpf/edge"
cgroup2 = "/sys/fs/cgroup"
interfaces = ["lo", "eth0"]
all_namespaces = true
client_stats = false
poll_interval_ms = 250

[[routes]]
name = "ws"
ports = [9000]
type = "websocket"

[[routes]]
name = "raw"
ports = [7000, 7001]

[[upstreams]]
name = "app"
ports = [8080, 9000]

[dns]
ports = [53, 5353]
upstream_ports = [5300]
top_k = 20
sample_every = 4
match_responses = false
match_every = 1
"#,
        )
        .unwrap();
        assert_eq!(config.listen, "[::1]:9100".parse().unwrap());
        assert_eq!(config.cgroup2, Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(config.interfaces, ["lo", "eth0"]);
        assert!(config.all_namespaces);
        assert!(!config.client_stats);
        assert_eq!(config.poll_interval, Duration::from_millis(250));
        assert_eq!(config.routes[0].kind, RouteKind::Websocket);
        assert_eq!(config.routes[1].kind, RouteKind::Tcp);
        assert_eq!(config.routes[1].ports, [7000, 7001]);
        // An upstream port may be a route's too: one is local, the other remote.
        assert_eq!(
            config.upstreams,
            [Upstream {
                name: "app".into(),
                ports: vec![8080, 9000],
            }]
        );
        assert_eq!(
            config.dns,
            DnsConfig {
                enabled: true,
                ports: vec![53, 5353],
                upstream_ports: vec![5300],
                top_k: 20,
                sample_every: 4,
                match_responses: false,
                match_every: 1,
                in_flight_slots: DNS_INFLIGHT_SLOTS,
                ignored: Vec::new(),
            }
        );
    }

    #[test]
    fn no_routes_is_a_dns_only_host() {
        let upstreams_only =
            Config::from_toml("t", "[[upstreams]]\nname = \"app\"\nports = [8080]\n").unwrap();
        assert!(
            upstreams_only
                .no_routes_warning()
                .unwrap()
                .starts_with("no [[routes]] configured: only the upstreams' connections and DNS")
        );
        let without_dns = Config::from_toml(
            "t",
            "[dns]\nenabled = false\n[[upstreams]]\nname = \"app\"\nports = [8080]\n",
        )
        .unwrap();
        assert!(
            without_dns
                .no_routes_warning()
                .unwrap()
                .starts_with("no [[routes]] configured: only the upstreams' connections are")
        );
        let routed = Config::from_toml("t", "[[routes]]\nname = \"web\"\nports = [8080]\n");
        assert_eq!(routed.unwrap().no_routes_warning(), None);
        assert_eq!(upstreams_only.probe_place_warning(), None);
        let crowded = Config::from_toml("t.toml", "[http]\nmax_concurrent_requests = 100\n")
            .unwrap()
            .probe_place_warning()
            .unwrap();
        assert!(crowded.contains("(100 + 8 = 108)"), "{crowded}");
        assert!(Config::from_toml("t", "").unwrap().routes.is_empty());
    }

    #[test]
    fn errors_name_file_line_column_and_reason() {
        let err = error("listen = \"127.0.0.1:9464\"\n\n[[routes]]\nname = \"web\"\nports = [0]\n");
        assert_eq!(
            err.to_string(),
            "test.toml:5:10: route \"web\": port 0 is not a port"
        );
    }

    #[test]
    fn syntax_and_type_errors_have_positions() {
        assert_error(
            "listen = \"127.0.0.1:9464\"\nports = [1,\n",
            2,
            "unclosed array",
        );
        assert_error(
            "[[routes]]\nname = \"web\"\nports = [70000]\n",
            3,
            "invalid value: integer `70000`, expected a port number (1 to 65535)",
        );
        assert_error(
            "[dns]\ntop_k = -1\n",
            2,
            "integer `-1`, expected a positive whole number",
        );
        assert_error(
            "[[routes]]\nname = \"web\"\nports = 80\n",
            3,
            "integer `80`, expected an array, as [...]",
        );
        assert_error("poll_interval_ms = \"fast\"\n", 1, "");
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert_error(
            "[[routes]]\nname = \"web\"\nports = [80]\ntyp = \"http\"\n",
            4,
            "typ",
        );
        assert_error("listne = \"127.0.0.1:1\"\n", 1, "listne");
        assert_error("[dns]\nport = [53]\n", 2, "port");
    }

    #[test]
    fn route_rules() {
        let route = |body: &str| format!("[[routes]]\n{body}\n");
        assert_error(&route("name = \"\"\nports = [80]"), 2, "not valid");
        assert_error(&route("name = \"a b\"\nports = [80]"), 2, "not valid");
        assert_error(
            &route(&format!("name = \"{}\"\nports = [80]", "x".repeat(64))),
            2,
            "not valid",
        );
        assert_error(&route("name = \"web\"\nports = []"), 3, "no ports");
        assert_error(&route("name = \"web\"\nports = [80, 80]"), 3, "twice");
        assert_error(
            &route("name = \"web\"\nports = [80]\ntype = \"udp\""),
            4,
            "not one of",
        );
        let two =
            "[[routes]]\nname = \"a\"\nports = [80]\n[[routes]]\nname = \"b\"\nports = [81, 80]\n";
        assert_error(two, 6, "a port belongs to one route");
        let dup =
            "[[routes]]\nname = \"a\"\nports = [80]\n[[routes]]\nname = \"a\"\nports = [81]\n";
        assert_error(dup, 5, "used twice");
    }

    #[test]
    fn too_many_routes_is_an_error() {
        let text = (0..=MAX_ROUTES).fold(String::new(), |mut text, i| {
            let port = 1000 + i;
            let _ = write!(text, "[[routes]]\nname = \"r{i}\"\nports = [{port}]\n");
            text
        });
        assert_error(&text, 3 * MAX_ROUTES + 2, "at most 256");
    }

    #[test]
    fn routes_and_upstreams_share_the_slots() {
        let table =
            |kind: &str, i: usize| format!("[[{kind}]]\nname = \"x{i}\"\nports = [{}]\n", 1000 + i);
        let routes: String = (0..250).map(|i| table("routes", i)).collect();
        let fits: String = (250..MAX_ROUTES).map(|i| table("upstreams", i)).collect();
        let config = Config::from_toml("t", &format!("{routes}{fits}")).unwrap();
        assert_eq!(config.routes.len() + config.upstreams.len(), MAX_ROUTES);
        // The first upstream past the slots is named, on its own line.
        let over: String = (250..=MAX_ROUTES).map(|i| table("upstreams", i)).collect();
        assert_error(
            &format!("{routes}{over}"),
            3 * MAX_ROUTES + 2,
            "250 routes and 7 upstreams configured; at most 256 in all",
        );
        // A route and an upstream may share a name: the kernel records them apart.
        let both = "[[routes]]\nname = \"app\"\nports = [80]\n[[upstreams]]\nname = \"app\"\nports = [80]\n";
        assert!(Config::from_toml("t", both).is_ok());
    }

    /// Three routes on 443: two by name and the one that counts the rest.
    const SHARED: &str = "[[routes]]\nname = \"api\"\nports = [443]\ntype = \"https\"\nsni = [\"API.example.com\", \"*.api.example.com\"]\n\
        [[routes]]\nname = \"sites\"\nports = [443, 8443]\nsni = [\"www.example.com\"]\n\
        [[routes]]\nname = \"tls\"\nports = [443, 8443]\ntype = \"https\"\n";

    #[test]
    fn routes_share_a_port_by_server_name() {
        let config = Config::from_toml("t", SHARED).unwrap();
        let names: Vec<(&str, Vec<&str>)> = config
            .routes
            .iter()
            .map(|r| (r.name.as_str(), r.sni.iter().map(String::as_str).collect()))
            .collect();
        assert_eq!(
            names,
            [
                ("api", vec!["api.example.com", "*.api.example.com"]),
                ("sites", vec!["www.example.com"]),
                ("tls", vec![]),
            ]
        );
        // The same name on two ports of one route, or on ports no route shares.
        let apart = "[[routes]]\nname = \"a\"\nports = [443]\nsni = [\"x.org\"]\n\
            [[routes]]\nname = \"b\"\nports = [8443]\nsni = [\"x.org\"]\n\
            [[routes]]\nname = \"rest\"\nports = [443, 8443]\n";
        assert!(Config::from_toml("t", apart).is_ok());
    }

    #[test]
    fn server_name_rules() {
        let route = |sni: &str| {
            format!(
                "[[routes]]\nname = \"a\"\nports = [443]\nsni = {sni}\n[[routes]]\nname = \"rest\"\nports = [443]\n"
            )
        };
        assert_error(&route("[]"), 4, "names nothing");
        assert_error(&route("[\"a..b\"]"), 4, "is not a server name");
        assert_error(&route("[\"*.\"]"), 4, "is not a server name");
        assert_error(&route("[\"a.*.b\"]"), 4, "is not a server name");
        assert_error(&route("[\"caf\u{e9}.fr\"]"), 4, "is not a server name");
        assert_error(
            &route(&format!("[\"{}.org\"]", "a".repeat(64))),
            4,
            "is not a server name",
        );
        assert_error(&route("[\"x.org\", \"X.org\"]"), 4, "twice");
        assert_error(&route("[\"10.0.0.5\"]"), 4, "as an IPv4 address does");
        assert_error(&route("[\"*.0.0.5\"]"), 4, "all-digit label");
        assert!(Config::from_toml("t.toml", &route("[\"10.0.0.5.nip.io\", \"3com.com\"]")).is_ok());
        // A zone file's trailing dot is dropped, as the kernel drops a client's; its name
        // then counts once.
        let dotted = Config::from_toml("t.toml", &route("[\"WWW.Example.com.\"]")).unwrap();
        assert_eq!(dotted.routes[0].sni, ["www.example.com"]);
        assert_error(&route("[\"x.org.\", \"x.org\"]"), 4, "twice");
        assert_error(&route("[\"x.org..\"]"), 4, "is not a server name");
        // A port shared by name needs a route without names.
        let alone = "[[routes]]\nname = \"a\"\nports = [443, 8443]\nsni = [\"x.org\"]\n[[routes]]\nname = \"rest\"\nports = [443]\n";
        assert_error(alone, 4, "no route without `sni` has port 8443");
        // Plain HTTP has no ClientHello.
        let http = "[[routes]]\nname = \"a\"\nports = [80]\ntype = \"http\"\nsni = [\"x.org\"]\n";
        assert_error(http, 5, "carries no TLS server name");
        // A name on a shared port belongs to one route.
        let twice = "[[routes]]\nname = \"a\"\nports = [443]\nsni = [\"x.org\"]\n[[routes]]\nname = \"b\"\nports = [443]\nsni = [\"x.org\"]\n[[routes]]\nname = \"rest\"\nports = [443]\n";
        assert_error(twice, 8, "in routes \"a\" and \"b\"");
        // Two routes without names still cannot share a port.
        let plain =
            "[[routes]]\nname = \"a\"\nports = [443]\n[[routes]]\nname = \"b\"\nports = [443]\n";
        assert_error(plain, 6, "a port belongs to one route");
    }

    #[test]
    fn an_upstream_on_the_listen_port_is_warned_of() {
        let config = |text: &str| Config::from_toml("t.toml", text).unwrap();
        let on_listen = config("[[upstreams]]\nname = \"api\"\nports = [8080, 9464]\n");
        let warning = on_listen.upstream_on_listen_warning().unwrap();
        assert!(
            warning.starts_with("upstream \"api\" has port 9464, the collector's own listen port"),
            "{warning}"
        );
        assert!(on_listen.start_warnings().contains(&warning));
        let elsewhere =
            config("listen = \"127.0.0.1:9100\"\n[[upstreams]]\nname = \"api\"\nports = [9464]\n");
        assert_eq!(elsewhere.upstream_on_listen_warning(), None);
    }

    #[test]
    fn an_exclusion_of_every_interface_is_warned_of() {
        let config = |text: &str| Config::from_toml("t.toml", text).unwrap();
        for every in ["*", "**", "?*", "*?*"] {
            let all = config(&format!("exclude_interfaces = [\"cali*\", \"{every}\"]\n"));
            let warning = all.everything_excluded_warning().unwrap();
            assert!(
                warning.starts_with(&format!(
                    "exclude_interfaces: \"{every}\" matches every interface: no live traffic"
                )),
                "{warning}"
            );
            assert!(all.start_warnings().contains(&warning));
        }
        for some in ["??*", "?", "e*", "[a-z]*"] {
            let narrower = config(&format!("exclude_interfaces = [\"{some}\"]\n"));
            assert_eq!(narrower.everything_excluded_warning(), None, "{some}");
        }
    }

    #[test]
    fn more_extra_addresses_than_the_nft_sets_hold_are_warned_of() {
        let with = |count: usize, nft: &str| {
            let entries: Vec<String> = (0..count)
                .map(|n| format!("\"10.80.{}.{}\"", n / 256, n % 256))
                .collect();
            let text = format!(
                "extra_local_addresses = [{}]\n[nftables]\nenabled = {nft}\n",
                entries.join(", ")
            );
            Config::from_toml("t.toml", &text).unwrap()
        };
        let most = crate::nft::EXTRA_RANGES_IN_SETS_MAX;
        assert_eq!(with(most, "true").nft_by_port_warning(), None);
        let warning = with(most + 1, "\"auto\"").nft_by_port_warning().unwrap();
        assert!(
            warning.starts_with("extra_local_addresses has 1025 entries"),
            "{warning}"
        );
        assert!(with(most + 1, "true").start_warnings().contains(&warning));
        assert_eq!(with(most + 1, "false").nft_by_port_warning(), None);
    }

    #[test]
    fn dns_keys_beside_enabled_false_are_warned_of() {
        let config = |text: &str| Config::from_toml("t.toml", text).unwrap();
        let off = config("[dns]\nenabled = false\nports = [5353]\nmatch_every = 4\n");
        assert_eq!(
            off.dns_ignored_warning().as_deref(),
            Some("[dns] enabled = false: ports, match_every set but not used (DNS is not counted)")
        );
        assert!(
            off.start_warnings()
                .iter()
                .any(|w| w.starts_with("[dns] enabled = false"))
        );
        assert_eq!(
            config("[dns]\nenabled = false\n").dns_ignored_warning(),
            None
        );
        assert_eq!(
            config("[dns]\nports = [5353]\n").dns_ignored_warning(),
            None
        );
    }

    #[test]
    fn pin_dir_rules() {
        for root in ["/sys/fs/bpf", "/sys/fs/bpf/", "/sys/fs/./bpf"] {
            assert_error(
                &format!("pin_dir = {root:?}\n"),
                1,
                "is the bpffs mount itself",
            );
        }
        assert_error(
            "pin_dir = \"/sys/fs/bpf/collector.prod\"\n",
            1,
            "refuses names with a dot",
        );
        assert_error("pin_dir = \"/sys/fs/bpf/x/..\"\n", 1, "has a `..`");
        let elsewhere = Config::from_toml("t.toml", "pin_dir = \"/run/x.y/c\"\n").unwrap();
        assert_eq!(elsewhere.pin_dir, PathBuf::from("/run/x.y/c"));
    }

    #[test]
    fn exclude_interfaces_rules() {
        // A glob in the list of exact names would wait for an interface of that name.
        for pattern in ["eth*", "veth?", "lxc[0-9]"] {
            assert_error(
                &format!("\ninterfaces = [\"lo\", \"{pattern}\"]\n"),
                2,
                &format!("interface \"{pattern}\" is a pattern: interfaces takes exact names"),
            );
        }
        assert_error(
            "interfaces = [\"eth0\"]\nexclude_interfaces = [\"veth*\"]\n",
            2,
            "list them or exclude, not both",
        );
        assert_error(
            "exclude_interfaces = [\"cali*\",\n  \"lxc[\"]\n",
            2,
            "\"lxc[\" is not a pattern of interface names",
        );
        assert_error("exclude_interfaces = [\"\"]\n", 1, "not a pattern");
        // Past 127 bytes not even an alternative name: with a `*` too (which may match
        // nothing), or `?` and `[...]` (one character each) making up the length.
        let long = "x".repeat(INTERFACE_NAME_MAX);
        for never in [
            "cali*:".to_owned(),
            "veth /*".to_owned(),
            "a/b*".to_owned(),
            format!("{long}0"),
            format!("{long}*0"),
            format!("{long}?"),
            format!("[]!]{long}"),
            format!("{long}[!a]"),
            format!("[!!]{long}"),
            format!("[!]]{long}"),
        ] {
            assert_error(
                &format!("exclude_interfaces = [\n  {never:?},\n]\n"),
                2,
                "it would exclude nothing",
            );
        }
        // Longer than a device's own name: it may match an alternative name.
        for alternative in [
            "calico-tunnel-dev0".to_owned(),
            format!("{long}*"),
            format!("[]]{}", &long[1..]),
        ] {
            Config::from_toml(
                "t.toml",
                &format!("exclude_interfaces = [{alternative:?}]\n"),
            )
            .unwrap();
        }
        assert_error(
            "exclude_interfaces = [\"cali*\", \"cali*\"]\n",
            1,
            "\"cali*\" is listed twice",
        );
        let config =
            Config::from_toml("t.toml", "exclude_interfaces = [\"cali*\", \"veth?\"]\n").unwrap();
        let names = ["cali12ab", "veth1", "veth12", "eth0"];
        let excluded: Vec<&str> = names
            .into_iter()
            .filter(|name| config.exclude_interfaces.iter().any(|p| p.matches(name)))
            .collect();
        assert_eq!(excluded, ["cali12ab", "veth1"]);
    }

    /// Names past a device's 15 bytes are alternative names (`ip link`'s `altname`), which
    /// go to 127.
    #[test]
    fn interface_names_may_be_alternative_names() {
        let alternative = "a".repeat(INTERFACE_NAME_MAX);
        let config =
            Config::from_toml("t.toml", &format!("interfaces = [{alternative:?}]\n")).unwrap();
        assert_eq!(config.interfaces, std::slice::from_ref(&alternative));
        assert_error(
            &format!("interfaces = [\"{alternative}b\"]\n"),
            1,
            "not a valid interface name (1 to 15 bytes, or to 127 for an alternative name",
        );
    }

    #[test]
    fn agent_settings_rules() {
        assert_error("listen = \"localhost\"\n", 1, "not a socket address");
        assert_error("pin_dir = \"bpf/x\"\n", 1, "absolute");
        assert_error("cgroup2 = \"cg\"\n", 1, "absolute");
        assert_error(
            "interfaces = [\"lo\", \"a/b\"]\n",
            1,
            "not a valid interface name",
        );
        assert_error(
            "interfaces = [\"eth0\\u0000\"]\n",
            1,
            "not a valid interface name",
        );
        assert_error("\npoll_interval_ms = 5\n", 2, "out of range");
        assert_error("[dns]\nports = []\n", 2, "empty");
        assert_error("[dns]\nports = [53, 53]\n", 2, "twice");
        assert_error("[dns]\nupstream_ports = [0]\n", 2, "port 0");
        assert_error("[nftables]\ntable = \"a b\"\n", 2, "letters, digits");
        // Names nft's own syntax cannot read back from a saved ruleset.
        assert_error(
            "[nftables]\ntable = \"1st\"\n",
            2,
            "beginning with a letter",
        );
        assert_error("[nftables]\ntable = \"-x\"\n", 2, "beginning with a letter");
        assert_error("[nftables]\ntable = \"\"\n", 2, "letters, digits");
        assert_error("[nftables]\nenabled = \"yes\"\n", 2, "true, false or");
        assert_error(
            "[nftables]\nenabled = 1\n",
            2,
            "invalid type: integer `1`, expected true, false or \"auto\"",
        );
        assert_error(
            "interfaces = [\"lo\", \"eth0\",\n  \"lo\"]\n",
            2,
            "\"lo\" is listed twice",
        );
        assert_error(
            "[routes]\nname = \"web\"\nports = [80]\n",
            1,
            "double brackets: [[routes]]",
        );
        assert_error(
            "[upstreams]\nname = \"app\"\nports = [9000]\n",
            1,
            "double brackets: [[upstreams]]",
        );
        assert_error(
            "[[upstreams]]\nname = \"app\"\nports = [9000]\n[[upstreams]]\nname = \"db\"\nports = [5432, 9000]\n",
            6,
            "port 9000 is in upstreams \"app\" and \"db\"; a port belongs to one upstream",
        );
        assert_error(
            "[[upstreams]]\nname = \"a/b\"\nports = [9000]\n",
            2,
            "upstream name \"a/b\" is not valid",
        );
        // Recorded as upstream/NAME in the kernel's 63 bytes: 54 fit, 55 would read back cut.
        let named = |len: usize| {
            format!(
                "[[upstreams]]\nname = \"{}\"\nports = [9000]\n",
                "u".repeat(len)
            )
        };
        assert!(Config::from_toml("t", &named(54)).is_ok());
        assert_error(&named(55), 2, "1 to 54 characters");
        assert_eq!(
            crate::loader::upstream_slot_owner(&"u".repeat(54)).len(),
            63
        );
        assert_error(
            "[[upstreams]]\nname = \"app\"\nports = []\n",
            3,
            "upstream \"app\" has no ports",
        );
        assert_error(
            "[dns]\nports = [1, 2, 3, 4, 5, 6, 7, 8, 9]\n",
            2,
            "more than 8",
        );
        assert_error("[dns]\ntop_k = 0\n", 2, "out of range");
        assert_error("[dns]\nsample_every = 70000\n", 2, "out of range");
        assert_error("[dns]\nmatch_every = 0\n", 2, "out of range");
        assert_error(
            "[dns]\nmatch_responses = false\nmatch_every = 16\n",
            3,
            "match_responses = false matches none",
        );
        let sampled = Config::from_toml("t.toml", "[dns]\nmatch_every = 16\n").unwrap();
        assert_eq!(sampled.dns.match_every, 16);
        assert_error("[http]\nmax_event_streams = 0\n", 2, "out of range");
        // Port 0 binds where the kernel likes, where no probe or scrape looks.
        assert_error(
            "pin_dir = \"/sys/fs/bpf/t\"\nlisten = \"127.0.0.1:0\"\n",
            2,
            "has port 0",
        );
    }

    #[test]
    fn a_listen_address_is_an_ip_and_a_port() {
        // A host name is not resolved: refused at its line, saying what to write.
        assert_error(
            "# the agent's address\n\nlisten = \"localhost:9464\"\n",
            3,
            "listen = \"localhost:9464\" is not a socket address; write IP:PORT",
        );
        assert_error("listen = \"9464\"\n", 1, "(host names are not resolved)");
        assert_eq!(
            listen_address("[::1]:9464"),
            Ok(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 9464)))
        );
        // Addresses no TCP connection reaches: refused with what to write instead.
        for (value, why) in [
            ("224.0.0.1:9464", "is a multicast address"),
            ("[ff02::1]:9464", "is a multicast address"),
            ("255.255.255.255:9464", "is the broadcast address"),
            ("[::ffff:224.0.0.1]:9464", "is a multicast address"),
            ("[::ffff:255.255.255.255]:9464", "is the broadcast address"),
            (
                "[fe80::1]:9464",
                "is link-local without its interface; after % write the interface's index, \
                 e.g. \"[fe80::1%2]:9464\"",
            ),
            (
                "[fe80::1%eth0]:9464",
                "after % write the interface's index, not its name",
            ),
        ] {
            let refusal = listen_address(value).unwrap_err();
            assert!(
                refusal.starts_with(&format!("{value:?} ")) && refusal.contains(why),
                "{refusal}"
            );
        }
        assert_error(
            "listen = \"[fe80::1]:9464\"\n",
            1,
            "listen = \"[fe80::1]:9464\" is link-local without its interface",
        );
        // An index given, the port left out: no word about names.
        for value in ["[fe80::1%2]", "fe80::1%2:9464"] {
            let refusal = listen_address(value).unwrap_err();
            assert!(refusal.contains("write IP:PORT"), "{refusal}");
        }
        let scoped = listen_address("[fe80::1%2]:9464").unwrap();
        assert!(matches!(scoped, SocketAddr::V6(v6) if v6.scope_id() == 2));
    }

    #[test]
    fn a_listen_port_of_a_route_is_refused() {
        // The route would count the collector's own scrapes: refused at the listen line.
        assert_error(
            "listen = \"127.0.0.1:8080\"\n[[routes]]\nname = \"web\"\nports = [80, 8080]\n",
            1,
            "a port of route \"web\"",
        );
        // The default listen address is checked where it is used, since `--listen` may
        // replace it: the file is valid.
        let config = Config::from_toml(
            "t.toml",
            "[[routes]]\nname = \"metrics\"\nports = [9464, 9465]\n",
        )
        .unwrap();
        assert!(DEFAULT_LISTEN.ends_with(&format!(":{DEFAULT_LISTEN_PORT}")));
        let reason = listen_refused(config.listen, &config.routes).unwrap();
        // The port it advises is one no route has.
        assert!(
            reason.starts_with("127.0.0.1:9464 has port 9464, a port of route \"metrics\"")
                && reason.ends_with("e.g. 9466"),
            "{reason}"
        );
        // IPv6 alike: the programs count the port on every address.
        assert_error(
            "listen = \"[::1]:443\"\n[[routes]]\nname = \"tls\"\nports = [443]\n",
            1,
            "a port of route \"tls\"",
        );
    }

    #[test]
    fn http_limits_are_bounded() {
        assert_error("[http]\nmax_connections = 0\n", 2, "out of range");
        assert_error(
            "[http]\nmax_unsent_bytes = 65536\n",
            2,
            "max_unsent_bytes = 65536 is out of range: allowed 1048576 to 4294967296",
        );
        let unsent = |bytes: u64| {
            Config::from_toml("t.toml", &format!("[http]\nmax_unsent_bytes = {bytes}\n"))
                .unwrap()
                .http
                .max_unsent_bytes
        };
        assert_eq!(unsent(1 << 20), 1 << 20);
        assert_eq!(unsent(1 << 32), 1 << 32);
        let capped = Config::from_toml(
            "t.toml",
            "[http]\nmax_connections = 8\nmax_connections_per_address = 2\nmax_concurrent_requests = 4\nmax_event_streams = 3\n",
        )
        .unwrap();
        assert_eq!(
            (
                capped.http.max_connections,
                capped.http.max_connections_per_address
            ),
            (8, 2)
        );
    }

    #[test]
    fn the_connection_cap_leaves_the_probes_a_place_beyond_the_requests() {
        assert_eq!(
            error("[http]\nmax_connections = 72\n").to_string(),
            "test.toml:2:19: max_connections = 72 must be more than max_concurrent_requests + \
             max_event_streams (64 + 8 = 72), or connections in a request can take every place \
             and leave the kubelet's probes none: raise max_connections or lower the others"
        );
        // Where the cap in all is not set, at the limit that reaches it.
        assert_error(
            "[http]\nmax_event_streams = 8\nmax_concurrent_requests = 504\n",
            3,
            "(504 + 8 = 512)",
        );
        assert_error("[http]\n\nmax_event_streams = 448\n", 3, "(64 + 448 = 512)");
        // At the one written last, most likely the edit that broke the balance.
        assert_error(
            "[http]\nmax_connections = 8\nmax_concurrent_requests = 4\nmax_event_streams = 4\n",
            4,
            "(4 + 4 = 8)",
        );
        assert_error(
            "[http]\nmax_concurrent_requests = 10\nmax_event_streams = 600\n",
            3,
            "(10 + 600 = 610)",
        );
        let http = |text: &str| Config::from_toml("t.toml", text).unwrap().http;
        assert_eq!(http("[http]\nmax_connections = 73\n").max_connections, 73);
        assert_eq!(
            http("[http]\nmax_concurrent_requests = 503\n").max_concurrent_requests,
            503
        );
    }

    #[test]
    fn a_file_not_in_utf8_is_refused_at_its_first_stray_byte() {
        let scratch = crate::scratch::ScratchDir::new("utf8");
        let path = scratch.write(
            "latin1.toml",
            b"[[routes]]\nname = \"caf\xe9\"\nports = [80]\n",
        );
        let err = Config::from_file(&path).unwrap_err();
        assert_eq!((err.line, err.column), (Some(2), Some(12)), "{err}");
        assert!(err.reason.starts_with("not UTF-8 text"), "{err}");
    }

    #[test]
    fn unreadable_files_say_so() {
        let err = Config::from_file(Path::new("/nonexistent/collector.toml")).unwrap_err();
        assert_eq!(err.line, None);
        assert!(
            err.to_string()
                .starts_with("/nonexistent/collector.toml: cannot read the file")
        );
    }
}
