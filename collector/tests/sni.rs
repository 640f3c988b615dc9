//! Privileged integration tests of routes told apart by TLS server name (SNI) on a port they
//! share: the real agent and kernel programs in a network namespace of each test's own,
//! clients sending real TLS `ClientHello` messages (made by rustls, whose handshake is never
//! completed) to a plain TCP server that reads exactly what they send, and exact counts per
//! route and per outcome.
#![expect(
    clippy::cast_precision_loss,
    reason = "OpenMetrics values are floats; the counts compared are small integers, exact in f64"
)]

mod support;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use collector_common::{
    SNI_OUTCOME_NAMES,
    client_hello::{self, Hello, SNI_NAME_MAX},
    proxy_header::{ProxyHeader, proxy_header},
};
use rustls::{
    pki_types::ServerName,
    version::{TLS12, TLS13},
};

use support::{
    Agent, AgentConfig, Closer, Netns, assert_no_pins,
    hello::{self, Bytes, Walk, with_extension},
    hold_open, proxy_json, scrape,
};

/// The port the three TLS routes share.
const SHARED_PORT: u16 = 18443;
/// A plain route's port, beside them.
const WEB_PORT: u16 = 18080;

const ROUTES: &str = r#"
[[routes]]
name = "api"
ports = [18443]
type = "https"
sni = ["api.example.com"]

[[routes]]
name = "sites"
ports = [18443]
type = "https"
sni = ["*.example.com"]

[[routes]]
name = "tls-other"
ports = [18443]
type = "https"

[[routes]]
name = "web"
ports = [18080]
type = "http"
"#;

/// The routes of [`ROUTES`], in the order the figures are compared.
const ROUTE_NAMES: [&str; 4] = ["api", "sites", "tls-other", "web"];
/// The route without a name on the shared port: it takes whatever no name claims.
const FALLBACK: &str = "tls-other";

/// The outcome counter and the awaiting gauge (both per route).
const OUTCOMES: &str = "collector_proxy_sni_connections_total";
const AWAITING: &str = "collector_proxy_sni_awaiting_connections";

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::from((ip.into(), port))
}

/// The first flight of a TLS client for `name`: its `ClientHello`, as rustls (ring) writes it,
/// each with randomness of its own (rustls orders its extensions at random).
fn client_hello(name: ServerName<'static>) -> Vec<u8> {
    static SEED: AtomicU64 = AtomicU64::new(1);
    let seed = SEED.fetch_add(1, Ordering::Relaxed);
    hello::client_hello(&[&TLS13, &TLS12], false, name, seed)
}

/// The `ClientHello` rustls sends for the DNS name `name`, checked to name exactly `name` (as
/// written, case kept) by the parser the kernel runs.
fn hello_for(name: &str) -> Vec<u8> {
    let hello = client_hello(ServerName::try_from(name.to_owned()).unwrap());
    assert_eq!(parsed(&hello).1.as_deref(), Some(name), "{hello:?}");
    hello
}

/// A `ClientHello` naming `name` with the root's trailing dot, which rustls never sends; read
/// by the kernel's parser as `name`.
fn hello_ending_in_a_dot(name: &str) -> Vec<u8> {
    let hello = hello::with_name(&hello_for(name), format!("{name}.").as_bytes());
    assert_eq!(parsed(&hello).1.as_deref(), Some(name), "{hello:?}");
    hello
}

/// The `ClientHello` rustls sends for an IP address: one without a server name.
fn hello_without_name() -> Vec<u8> {
    let hello = client_hello(ServerName::IpAddress(
        IpAddr::from(Ipv4Addr::new(192, 0, 2, 1)).into(),
    ));
    assert_eq!(parsed(&hello).0, Hello::NoName);
    hello
}

/// A `ClientHello` for `name` whose server name is not its last extension (rustls puts its
/// extensions in a random order for each connection), and where the name ends in it.
fn hello_with_more_after_the_name(name: &str) -> (Vec<u8>, usize) {
    for _ in 0..1_000 {
        let hello = hello_for(name);
        let Hello::Name { offset, len } = parsed(&hello).0 else {
            unreachable!()
        };
        let end = usize::try_from(offset).unwrap() + len;
        if end < hello.len() {
            return (hello, end);
        }
    }
    panic!("rustls put the server name last in 1,000 hellos");
}

/// What the kernel's parser makes of `bytes` as a first segment, and the name it read.
fn parsed_bytes(bytes: &[u8]) -> (Hello, Option<Vec<u8>>) {
    let mut name = [0u8; SNI_NAME_MAX + 1];
    let end = u32::try_from(bytes.len()).unwrap();
    // As the kernel's reader: a PROXY header first, if a balancer sent one.
    let start = match proxy_header(&Bytes(bytes), 0, end, &mut name) {
        ProxyHeader::Absent => 0,
        ProxyHeader::Whole(len) => {
            assert!(len < end, "a PROXY header alone: {bytes:?}");
            len
        }
        ProxyHeader::Incomplete => return (Hello::Incomplete, None),
        ProxyHeader::Malformed => return (Hello::Malformed, None),
    };
    let hello = client_hello::server_name(&Bytes(bytes), start, end, &mut name);
    let read = match hello {
        Hello::Name { len, .. } => Some(name[..len].to_vec()),
        _ => None,
    };
    (hello, read)
}

/// [`parsed_bytes`], of a hello whose name is text.
fn parsed(bytes: &[u8]) -> (Hello, Option<String>) {
    let (hello, name) = parsed_bytes(bytes);
    (hello, name.map(|name| String::from_utf8(name).unwrap()))
}

/// `hello` followed by `extra` bytes of application data, sent as one write (one segment
/// on loopback): the server reads exactly this many bytes.
fn with_extra(hello: &[u8], extra: usize) -> Vec<u8> {
    let mut payload = hello.to_vec();
    payload.resize(hello.len() + extra, b'x');
    payload
}

/// A PROXY protocol version 1 header, as a load balancer sends before its client's bytes.
fn proxy_v1() -> Vec<u8> {
    b"PROXY TCP4 192.0.2.1 198.51.100.1 51234 443\r\n".to_vec()
}

/// The version 2 signature, version and command (`command`: 0 LOCAL, 1 PROXY).
fn proxy_v2_start(command: u8) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.push(0x20 | command);
    header
}

/// A PROXY protocol version 2 header for a TCP client over IPv4, with an authority TLV.
fn proxy_v2() -> Vec<u8> {
    let authority = b"api.example.com";
    let mut rest = vec![192, 0, 2, 1, 198, 51, 100, 1];
    rest.extend_from_slice(&51234u16.to_be_bytes());
    rest.extend_from_slice(&443u16.to_be_bytes());
    rest.push(0x02);
    rest.extend_from_slice(&u16::try_from(authority.len()).unwrap().to_be_bytes());
    rest.extend_from_slice(authority);
    let mut header = proxy_v2_start(1);
    header.push(0x11);
    header.extend_from_slice(&u16::try_from(rest.len()).unwrap().to_be_bytes());
    header.extend_from_slice(&rest);
    header
}

/// A balancer's own check: a version 2 LOCAL header, and nothing after it.
fn proxy_v2_local() -> Vec<u8> {
    let mut header = proxy_v2_start(0);
    header.extend_from_slice(&[0, 0, 0]);
    header
}

/// How a client sends its payload: at once, or its first `n` bytes in a segment of their
/// own, the rest 50 ms later (or cut twice), or in its SYN (TCP Fast Open).
#[derive(Clone, Copy)]
enum Send {
    AtOnce,
    SplitAfter(usize),
    /// In three segments, cut at both.
    SplitTwice(usize, usize),
    FastOpen,
}

/// `TCPI_OPT_SYN_DATA` of `tcp_info.tcpi_options`: the SYN carried data and the server took it.
const TCPI_OPT_SYN_DATA: u8 = 0x20;

/// A connection to `address` whose SYN carries the start of `payload` (the rest follows once
/// it is connected), asserted taken by the server with the SYN.
fn connect_fast_open(address: SocketAddr, payload: &[u8]) -> TcpStream {
    let SocketAddr::V4(v4) = address else {
        panic!("Fast Open clients here are IPv4: {address}");
    };
    // SAFETY: a new socket, owned by the stream below once it is made.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: the descriptor was just made and is owned only here.
    let mut stream = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let to = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap(),
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: the payload and the address are valid for their lengths.
    let sent = unsafe {
        libc::sendto(
            fd,
            payload.as_ptr().cast(),
            payload.len(),
            libc::MSG_FASTOPEN,
            (&raw const to).cast(),
            libc::socklen_t::try_from(size_of::<libc::sockaddr_in>()).unwrap(),
        )
    };
    let sent = usize::try_from(sent)
        .unwrap_or_else(|_| panic!("sendto: {}", std::io::Error::last_os_error()));
    stream.write_all(&payload[sent..]).unwrap();
    let info = support::tcp_info(&stream);
    assert_ne!(
        info.tcpi_options & TCPI_OPT_SYN_DATA,
        0,
        "the SYN to {address} carried no data the server took"
    );
    stream
}

/// The connecting side of one exchange with `address`: sends `payload`, reads `response`
/// bytes, closes (after the accepting side's FIN if it closes first).
fn exchange_sending(
    address: SocketAddr,
    payload: &[u8],
    send: Send,
    response: usize,
    closer: Closer,
) {
    let mut stream = match send {
        Send::FastOpen => connect_fast_open(address, payload),
        Send::AtOnce | Send::SplitAfter(_) | Send::SplitTwice(..) => {
            TcpStream::connect(address).unwrap()
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    match send {
        Send::FastOpen => {}
        Send::AtOnce => stream.write_all(payload).unwrap(),
        Send::SplitAfter(n) => {
            stream.set_nodelay(true).unwrap();
            send_alone(&mut stream, &payload[..n]);
            stream.write_all(&payload[n..]).unwrap();
        }
        Send::SplitTwice(first, second) => {
            stream.set_nodelay(true).unwrap();
            send_alone(&mut stream, &payload[..first]);
            send_alone(&mut stream, &payload[first..second]);
            stream.write_all(&payload[second..]).unwrap();
        }
    }
    support::read_response_and_close(stream, response, closer);
}

/// Sends `part` in a segment of its own, received before anything sent after it: waits until
/// it has left and been acknowledged (with `TCP_NODELAY` set, nothing holds it back for an
/// earlier one's ACK).
fn send_alone(stream: &mut TcpStream, part: &[u8]) {
    stream.write_all(part).unwrap();
    support::wait_for(
        "the part to be acknowledged",
        Duration::from_secs(10),
        || {
            let info = support::tcp_info(stream);
            (info.tcpi_notsent_bytes == 0 && info.tcpi_unacked == 0).then_some(())
        },
    );
}

/// `count` exchanges with the server on `listener` from inside `netns`, each sending
/// `payload` (as `send` says) and reading `response` bytes; the server reads exactly the
/// payload's length, answers and closes (`support::serve_exchanges`).
fn exchanges_sending(
    netns: &Netns,
    listener: &Arc<TcpListener>,
    count: usize,
    payload: &[u8],
    send: Send,
    response: usize,
    closer: Closer,
) {
    let address = listener.local_addr().unwrap();
    exchanges_to(
        netns, listener, address, count, payload, send, response, closer,
    );
}

/// As [`exchanges_sending`], the clients connecting to `address` (for a listener on an
/// unspecified address).
#[expect(
    clippy::too_many_arguments,
    reason = "the exchange's parts, each set by its caller"
)]
fn exchanges_to(
    netns: &Netns,
    listener: &Arc<TcpListener>,
    address: SocketAddr,
    count: usize,
    payload: &[u8],
    send: Send,
    response: usize,
    closer: Closer,
) {
    let request = payload.len();
    let server = {
        let listener = Arc::clone(listener);
        thread::spawn(move || {
            support::serve_exchanges(&listener, request, response, closer, count);
        })
    };
    let payload = payload.to_vec();
    netns.run(move || {
        for _ in 0..count {
            exchange_sending(address, &payload, send, response, closer);
        }
    });
    server.join().unwrap();
}

/// A listener on `address` in `netns`, shared with the server threads.
fn listen(netns: &Netns, address: SocketAddr) -> Arc<TcpListener> {
    Arc::new(netns.run(move || TcpListener::bind(address).unwrap()))
}

/// Each held client sends `payload`.
fn send_from_each(clients: &mut [TcpStream], payload: &[u8]) {
    for client in clients {
        client.write_all(payload).unwrap();
    }
}

/// Each accepted end reads the `request` bytes its client sent, answers `response` bytes and
/// closes first; each client reads the answer and the close.
fn answer_and_close(
    (clients, accepted): (Vec<TcpStream>, Vec<TcpStream>),
    request: usize,
    response: usize,
) {
    for mut server in accepted {
        let mut buf = vec![0; request];
        server.read_exact(&mut buf).unwrap();
        server.write_all(&vec![b'r'; response]).unwrap();
    }
    for mut client in clients {
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = Vec::new();
        client.read_to_end(&mut buf).unwrap();
        assert_eq!(buf.len(), response);
    }
}

/// Each held client sends `payload`, then as [`answer_and_close`].
fn finish_held(
    (mut clients, accepted): (Vec<TcpStream>, Vec<TcpStream>),
    payload: &[u8],
    response: usize,
) {
    send_from_each(&mut clients, payload);
    answer_and_close((clients, accepted), payload.len(), response);
}

/// Held clients that close without having sent anything; their accepted ends see the close
/// and close too.
fn close_held_silently((clients, accepted): (Vec<TcpStream>, Vec<TcpStream>)) {
    drop(clients);
    for mut server in accepted {
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}

/// Every sample of `name` in `metrics`: its labels (in any order) and value.
fn samples(metrics: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let prefix = format!("{name}{{");
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .map(|rest| {
            let (labels, value) = rest.split_once("} ").unwrap();
            let labels = labels
                .split(',')
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap();
                    (key.to_owned(), value.trim_matches('"').to_owned())
                })
                .collect();
            let value = value.split_whitespace().next().unwrap().parse().unwrap();
            (labels, value)
        })
        .collect()
}

/// The sample of `name` for `route`, if any.
fn route_sample(metrics: &str, name: &str, route: &str) -> Option<f64> {
    samples(metrics, name)
        .into_iter()
        .find(|(labels, _)| {
            labels.len() == 1 && labels.get("route").map(String::as_str) == Some(route)
        })
        .map(|(_, value)| value)
}

/// A count, checked whole and not negative.
fn count(value: f64, what: &str) -> usize {
    assert!(value >= 0.0 && value.fract() == 0.0, "{what} = {value}");
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "checked whole and not negative"
    )]
    let value = value as usize;
    value
}

/// What `/metrics` shows of one route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Figures {
    opened: usize,
    closed: usize,
    active: usize,
    open_from_before_start: usize,
    received_bytes: usize,
    sent_bytes: usize,
    /// Closes in the duration histogram.
    durations: usize,
}

impl Figures {
    fn of(metrics: &str, route: &str) -> Self {
        let value = |name: &str| {
            let name = format!("collector_proxy_{name}");
            let value = route_sample(metrics, &name, route)
                .unwrap_or_else(|| panic!("no {name}{{route=\"{route}\"}}:\n{metrics}"));
            count(value, &name)
        };
        Self {
            opened: value("connections_opened_total"),
            closed: value("connections_closed_total"),
            active: value("connections_active"),
            open_from_before_start: value("connections_open_from_before_start"),
            received_bytes: value("connection_received_bytes_total"),
            sent_bytes: value("connection_sent_bytes_total"),
            durations: value("connection_duration_seconds_count"),
        }
    }

    /// The same route in `/api/v1/proxy`.
    fn of_json(json: &serde_json::Value, route: &str) -> Self {
        let route = json["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == route)
            .unwrap_or_else(|| panic!("no route {route}: {json}"));
        let value = |name: &str| {
            usize::try_from(
                route[name]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{name} is no count: {route}")),
            )
            .unwrap()
        };
        Self {
            opened: value("opened"),
            closed: value("closed"),
            active: value("active"),
            open_from_before_start: value("openFromBeforeStart"),
            received_bytes: value("bytesIn"),
            sent_bytes: value("bytesOut"),
            durations: usize::try_from(route["duration"]["count"].as_u64().unwrap()).unwrap(),
        }
    }
}

/// Everything a test expects of the routes: each route's figures, the connections counted
/// per route and outcome (those not listed: none), and those awaiting their hello.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Expected {
    routes: BTreeMap<String, Figures>,
    outcomes: BTreeMap<(String, String), usize>,
    awaiting: usize,
}

impl Expected {
    fn new() -> Self {
        Self {
            routes: ROUTE_NAMES
                .iter()
                .map(|&route| (route.to_owned(), Figures::default()))
                .collect(),
            ..Self::default()
        }
    }

    fn route(&mut self, route: &str) -> &mut Figures {
        self.routes.get_mut(route).unwrap()
    }

    /// `count` connections decided for `route` with `outcome` (`None` on a plain route),
    /// still open.
    fn opened(&mut self, route: &str, outcome: Option<&str>, count: usize) {
        let figures = self.route(route);
        figures.opened += count;
        figures.active += count;
        if let Some(outcome) = outcome {
            *self
                .outcomes
                .entry((route.to_owned(), outcome.to_owned()))
                .or_default() += count;
        }
    }

    /// `count` connections of `route` closed, each having received `bytes_in` and sent
    /// `bytes_out`.
    fn closed(&mut self, route: &str, count: usize, bytes_in: usize, bytes_out: usize) {
        let figures = self.route(route);
        figures.closed += count;
        figures.active -= count;
        figures.durations += count;
        figures.received_bytes += count * bytes_in;
        figures.sent_bytes += count * bytes_out;
    }

    /// `count` connections decided for `route`, each having received `bytes_in` and sent
    /// `bytes_out`, and closed.
    fn exchanged(
        &mut self,
        route: &str,
        outcome: Option<&str>,
        count: usize,
        bytes_in: usize,
        bytes_out: usize,
    ) {
        self.opened(route, outcome, count);
        self.closed(route, count, bytes_in, bytes_out);
    }

    /// What one scrape shows, in the same terms.
    fn seen(metrics: &str) -> Self {
        let outcomes = samples(metrics, OUTCOMES)
            .into_iter()
            .filter(|(_, value)| *value != 0.0)
            .map(|(labels, value)| {
                let route = labels["route"].clone();
                let outcome = labels["outcome"].clone();
                let value = count(value, &format!("{OUTCOMES} {route} {outcome}"));
                ((route, outcome), value)
            })
            .collect();
        let awaiting = ROUTE_NAMES
            .iter()
            .filter_map(|&route| route_sample(metrics, AWAITING, route).map(|v| (route, v)))
            .map(|(route, value)| {
                // Only the route without a name waits for hellos: the others have no series.
                assert_eq!(route, FALLBACK, "{AWAITING} has a series for {route}");
                count(value, AWAITING)
            })
            .sum();
        Self {
            routes: ROUTE_NAMES
                .iter()
                .map(|&route| (route.to_owned(), Figures::of(metrics, route)))
                .collect(),
            outcomes,
            awaiting,
        }
    }
}

/// Waits until `/metrics` shows exactly `expected`, checks that it still does three polls
/// later (nothing counted twice late) and that `/api/v1/proxy` agrees: returns that scrape.
fn wait_for_exactly(netns: &Netns, expected: &Expected) -> String {
    assert!(
        route_sample(&scrape(netns), AWAITING, FALLBACK).is_some(),
        "no {AWAITING}{{route=\"{FALLBACK}\"}}:\n{}",
        scrape(netns)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = scrape(netns);
        let seen = Expected::seen(&metrics);
        if seen == *expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "waited for\n{expected:#?}\nstill\n{seen:#?}\n{metrics}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let metrics = support::after_polls(netns, 3);
    assert_eq!(Expected::seen(&metrics), *expected, "{metrics}");
    let json = proxy_json(netns);
    for route in ROUTE_NAMES {
        assert_eq!(
            Figures::of_json(&json, route),
            expected.routes[route],
            "{route} in {json}"
        );
    }
    metrics
}

/// Handshakes' last ACKs deferring listeners dropped in `netns` (`TCPDeferAcceptDrop`), and
/// SYN-ACKs sent again (`TCPSynRetrans`), counted from when it was made.
struct DeferredAccepts<'a> {
    netns: &'a Netns,
    before: (u64, u64),
}

impl<'a> DeferredAccepts<'a> {
    fn from_now(netns: &'a Netns) -> Self {
        Self {
            netns,
            before: Self::read(netns),
        }
    }

    fn read(netns: &Netns) -> (u64, u64) {
        let counter = |name| support::proc_net_counter(netns, "netstat", "TcpExt", name);
        (counter("TCPDeferAcceptDrop"), counter("TCPSynRetrans"))
    }

    /// One ACK dropped per connection whose accept its data completed, which shows the
    /// deferral took effect; one more for each SYN-ACK sent again while a client's data was
    /// late (its ACK comes again), on a loaded machine.
    fn assert_accepted(&self, connections: usize) {
        let now = Self::read(self.netns);
        let (drops, resent) = (now.0 - self.before.0, now.1 - self.before.1);
        let connections = connections as u64;
        assert!(
            (connections..=connections + resent).contains(&drops),
            "{drops} ACKs dropped for {connections} deferred accepts, {resent} SYN-ACKs resent"
        );
    }
}

/// The id of the `cgroup_skb` link the agent pinned for the server name reader.
fn server_name_link(config: &AgentConfig) -> u64 {
    let pin = config.pin_dir.join("v1/links/cgroup_skb_server_names");
    let out = support::stdout_of(
        std::process::Command::new("bpftool")
            .args(["-j", "link", "show", "pinned"])
            .arg(&pin),
    );
    let link: serde_json::Value = serde_json::from_str(&out).unwrap();
    link["id"].as_u64().unwrap()
}

/// A clean stop leaves nothing: no pins, and the server name reader's link is gone.
fn stop_leaving_nothing(agent: Agent, config: &AgentConfig) {
    let link = server_name_link(config);
    assert!(agent.stop().success());
    assert_no_pins(&config.pin_dir);
    let shown = std::process::Command::new("bpftool")
        .args(["link", "show", "id", &link.to_string()])
        .output()
        .unwrap();
    assert!(
        !shown.status.success(),
        "the server name reader's link {link} is still there: {}",
        String::from_utf8_lossy(&shown.stdout)
    );
}

/// One kind of client of the shared port: what it sends first and the application data
/// after it, the response it reads, who closes first, and where its connections count.
struct Client {
    what: &'static str,
    first: Vec<u8>,
    extra: usize,
    response: usize,
    closer: Closer,
    route: &'static str,
    outcome: &'static str,
}

impl Client {
    /// `count` exchanges of this kind with the server on `listener`, added to `expected`.
    fn exchange(
        &self,
        netns: &Netns,
        listener: &Arc<TcpListener>,
        count: usize,
        expected: &mut Expected,
    ) {
        self.exchange_sending(netns, listener, count, Send::AtOnce, expected);
    }

    /// As [`Client::exchange`], the payload sent as `send` says.
    fn exchange_sending(
        &self,
        netns: &Netns,
        listener: &Arc<TcpListener>,
        count: usize,
        send: Send,
        expected: &mut Expected,
    ) {
        let payload = with_extra(&self.first, self.extra);
        let (bytes_in, bytes_out) = (payload.len(), self.response);
        eprintln!(
            "{}: {count} x {bytes_in} bytes in, {bytes_out} out",
            self.what
        );
        exchanges_sending(
            netns,
            listener,
            count,
            &payload,
            send,
            self.response,
            self.closer,
        );
        expected.exchanged(self.route, Some(self.outcome), count, bytes_in, bytes_out);
    }
}

/// A client of each outcome: names matched exactly, in another case and by the wildcard,
/// names no route has, a hello without a name, not TLS, and no data at all.
fn clients_of_every_kind() -> Vec<Client> {
    let client = |what, first, (extra, response), closer, route, outcome| Client {
        what,
        first,
        extra,
        response,
        closer,
        route,
        outcome,
    };
    let (connecting, accepting) = (Closer::Connecting, Closer::Accepting);
    let http = b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n".to_vec();
    vec![
        client(
            "exact",
            hello_for("api.example.com"),
            (100, 1_000),
            connecting,
            "api",
            "matched",
        ),
        client(
            "upper case",
            hello_for("API.Example.COM"),
            (200, 2_000),
            accepting,
            "api",
            "matched",
        ),
        client(
            "one label",
            hello_for("www.example.com"),
            (300, 3_000),
            connecting,
            "sites",
            "matched",
        ),
        // The root's dot some clients send, as the config's names may end in it too.
        client(
            "trailing dot",
            hello_ending_in_a_dot("api.example.com"),
            (110, 1_100),
            accepting,
            "api",
            "matched",
        ),
        client(
            "one label, trailing dot",
            hello_ending_in_a_dot("www.example.com"),
            (310, 3_100),
            connecting,
            "sites",
            "matched",
        ),
        client(
            "two labels",
            hello_for("a.b.example.com"),
            (0, 400),
            accepting,
            FALLBACK,
            "unknown_name",
        ),
        client(
            "no label",
            hello_for("example.com"),
            (10, 450),
            connecting,
            FALLBACK,
            "unknown_name",
        ),
        client(
            "unknown",
            hello_for("other.org"),
            (50, 500),
            connecting,
            FALLBACK,
            "unknown_name",
        ),
        client(
            "no name",
            hello_without_name(),
            (60, 600),
            accepting,
            FALLBACK,
            "no_name",
        ),
        client("not TLS", http, (0, 700), connecting, FALLBACK, "not_tls"),
        client(
            "no data",
            Vec::new(),
            (0, 0),
            connecting,
            FALLBACK,
            "no_data",
        ),
    ]
}

#[test]
fn server_names_decide_the_route_and_the_rest_goes_to_the_route_without_names() {
    const N: usize = 10;
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let listener = listen(&netns, at(Ipv4Addr::LOCALHOST, SHARED_PORT));

    let mut expected = Expected::new();
    for client in clients_of_every_kind() {
        client.exchange(&netns, &listener, N, &mut expected);
    }

    wait_for_exactly(&netns, &expected);
    assert_eq!(proxy_json(&netns)["activeConnections"], 0);
    stop_leaving_nothing(agent, &config);
}

#[test]
fn connections_await_their_hello_counted_nowhere_then_count_where_it_names() {
    const HELD: usize = 10;
    const RESPONSE: usize = 5_000;
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let listener = listen(&netns, at(Ipv4Addr::LOCALHOST, SHARED_PORT));

    let held = hold_open(&netns, &listener, HELD);
    // Accepted, holding table slots, opened in no route yet.
    let mut expected = Expected::new();
    expected.awaiting = HELD;
    let metrics = wait_for_exactly(&netns, &expected);
    // They hold slots of the connection table: its fill, which the alert on a filling
    // table watches, should show them (checked at the end, after the rest).
    let table_fill = support::sample(
        &metrics,
        "collector_bpf_map_entries",
        &[("map", "CONN_STATE")],
    );
    assert_eq!(proxy_json(&netns)["activeConnections"], 0);

    // The hellos arrive, the servers do not read them yet: decided, open in api.
    let hello = hello_for("api.example.com");
    let (mut clients, accepted) = held;
    send_from_each(&mut clients, &hello);
    expected.awaiting = 0;
    expected.opened("api", Some("matched"), HELD);
    wait_for_exactly(&netns, &expected);
    assert_eq!(proxy_json(&netns)["connectionsByRoute"]["api"], HELD);

    // The servers read them, answer and close.
    answer_and_close((clients, accepted), hello.len(), RESPONSE);
    expected.closed("api", HELD, hello.len(), RESPONSE);
    wait_for_exactly(&netns, &expected);
    stop_leaving_nothing(agent, &config);
    assert_eq!(
        table_fill,
        Some(HELD as f64),
        "collector_bpf_map_entries{{map=\"CONN_STATE\"}} while {HELD} connections awaited their hello"
    );
}

/// Browsers' post-quantum hellos are longer than a segment (about 1.8 KB: a 1,200-byte key
/// share among extensions in random order). Cut in the long extension before the name, or
/// at an extension's start, once or twice, the hello is read on in the next segments to its
/// name, also where the first segment completes a deferred accept; cut in an extension's
/// header too (the header's first bytes are kept), and in the name's extension (its first
/// bytes are kept, also over a deferred accept, and after a cut before it). Cut twice in
/// the name's extension, the name spread over three segments, it is incomplete.
#[test]
fn hellos_longer_than_a_segment_are_read_on_to_their_name() {
    const N: usize = 3;
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let listener = listen(&netns, at(Ipv4Addr::LOCALHOST, SHARED_PORT));
    let deferred = listen(&netns, at(Ipv6Addr::LOCALHOST, SHARED_PORT));
    support::set_tcp_option(&deferred, libc::TCP_DEFER_ACCEPT, 5);
    let deferred_accepts = DeferredAccepts::from_now(&netns);

    let mut expected = Expected::new();
    let mut response = 100;
    let mut exchange = |payload: &[u8], send, listener, route, outcome| {
        exchanges_sending(
            &netns,
            listener,
            N,
            payload,
            send,
            response,
            Closer::Connecting,
        );
        expected.exchanged(route, Some(outcome), N, payload.len(), response);
        response += 10;
    };
    for (name, route, outcome) in [
        ("api.example.com", "api", "matched"),
        ("www.example.com", "sites", "matched"),
        ("other.org", FALLBACK, "unknown_name"),
    ] {
        let hello = hello_for(name);
        let name_index = Walk::of(&hello).name;
        // The long extension right before the name's.
        let long = with_extension(&hello, name_index, 0x0015, 1_300);
        let walk = Walk::of(&long);
        let (padding, after) = (walk.headers[name_index], walk.headers[name_index + 1]);
        // The name's extension: header (4 bytes), list and entry headers (5), the name.
        let name_end = after + 4 + 5 + name.len();
        assert!(long.len() > 1_448, "{} bytes", long.len());
        for send in [
            Send::SplitAfter(padding + 600),
            Send::SplitAfter(after),
            Send::SplitTwice(padding + 300, padding + 900),
        ] {
            exchange(&long, send, &listener, route, outcome);
        }
        exchange(
            &long,
            Send::SplitAfter(padding + 600),
            &deferred,
            route,
            outcome,
        );
        // In an extension's header (before this was read on, incomplete): the long one's,
        // the name's, both, and the name's where the hello completes a deferred accept;
        // then in the name's extension's body.
        for send in [
            Send::SplitAfter(padding + 2),
            Send::SplitAfter(after + 2),
            Send::SplitTwice(padding + 1, after + 3),
        ] {
            exchange(&long, send, &listener, route, outcome);
        }
        exchange(
            &long,
            Send::SplitAfter(after + 1),
            &deferred,
            route,
            outcome,
        );
        // In the name's extension's body (before this was read on, incomplete): right at its
        // start, in the list's header, in the name, after a cut in the long extension, and
        // where the hello completes a deferred accept.
        for send in [
            Send::SplitAfter(after + 4),
            Send::SplitAfter(after + 6),
            Send::SplitAfter(name_end - 1),
            Send::SplitTwice(padding + 600, after + 11),
        ] {
            exchange(&long, send, &listener, route, outcome);
        }
        exchange(
            &long,
            Send::SplitAfter(after + 10),
            &deferred,
            route,
            outcome,
        );
        // Cut twice in it: the name over three segments.
        exchange(
            &long,
            Send::SplitTwice(after + 6, after + 10),
            &listener,
            FALLBACK,
            "incomplete",
        );
    }
    wait_for_exactly(&netns, &expected);
    // Three exchanges of N per name went to the deferring listener, each accepted by its
    // data.
    deferred_accepts.assert_accepted(3 * 3 * N);
    stop_leaving_nothing(agent, &config);
}

/// A hello cut where the walk cannot go on (in its record's headers) is incomplete; cut
/// after its name, it is read from the first segment, and cut one byte before its name's
/// end, from the next; a plain route's connections on the same host count as before.
#[test]
fn hellos_cut_before_their_extensions_are_incomplete_and_a_plain_route_counts_as_before() {
    const N: usize = 5;
    const WEB: usize = 7;
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let listener = listen(&netns, at(Ipv4Addr::LOCALHOST, SHARED_PORT));
    let (hello, name_end) = hello_with_more_after_the_name("api.example.com");
    let mut expected = Expected::new();

    // The first 20 bytes (record and handshake headers, part of the random) alone.
    exchanges_sending(
        &netns,
        &listener,
        N,
        &hello,
        Send::SplitAfter(20),
        100,
        Closer::Connecting,
    );
    expected.exchanged(FALLBACK, Some("incomplete"), N, hello.len(), 100);
    // Cut just after the name: the first segment has it, though not the whole hello.
    exchanges_sending(
        &netns,
        &listener,
        N,
        &hello,
        Send::SplitAfter(name_end),
        200,
        Closer::Accepting,
    );
    expected.exchanged("api", Some("matched"), N, hello.len(), 200);
    // Cut one byte before the name's end (before this was read on, incomplete).
    exchanges_sending(
        &netns,
        &listener,
        N,
        &hello,
        Send::SplitAfter(name_end - 1),
        300,
        Closer::Connecting,
    );
    expected.exchanged("api", Some("matched"), N, hello.len(), 300);
    // The whole hello first, application data in a later segment.
    let payload = with_extra(&hello, 1_000);
    exchanges_sending(
        &netns,
        &listener,
        N,
        &payload,
        Send::SplitAfter(hello.len()),
        400,
        Closer::Accepting,
    );
    expected.exchanged("api", Some("matched"), N, payload.len(), 400);
    // The plain route on its own port, unaffected.
    support::exchanges(
        &netns,
        at(Ipv4Addr::LOCALHOST, WEB_PORT),
        WEB,
        1_234,
        5_678,
        Closer::Connecting,
    );
    expected.exchanged("web", None, WEB, 1_234, 5_678);

    let metrics = wait_for_exactly(&netns, &expected);
    // The plain route's live traffic counts as ever.
    let retransmitted = support::retransmitted_segments(&[&netns]);
    for (direction, bytes) in [("in", 1_234), ("out", 5_678)] {
        let live = support::sample(
            &metrics,
            "collector_proxy_traffic_payload_bytes_total",
            &[("route", "web"), ("direction", direction)],
        );
        support::assert_live_bytes(live, (WEB, bytes), retransmitted, direction);
    }
    stop_leaving_nothing(agent, &config);
}

#[test]
fn ipv6_connections_are_told_apart_as_ipv4_ones_are() {
    const N: usize = 3;
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let v6 = listen(&netns, at(Ipv6Addr::LOCALHOST, SHARED_PORT));
    let v4 = listen(&netns, at(Ipv4Addr::LOCALHOST, SHARED_PORT));

    // Every kind of client over both families, in turn.
    let mut expected = Expected::new();
    let clients = clients_of_every_kind();
    for client in &clients {
        for listener in [&v6, &v4] {
            client.exchange(&netns, listener, N, &mut expected);
        }
    }
    wait_for_exactly(&netns, &expected);
    let json = proxy_json(&netns);
    let mut top: Vec<_> = json["topIPs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|client| {
            (
                client["ip"].as_str().unwrap().to_owned(),
                client["connections"].as_u64().unwrap(),
                client["maxUndercount"].as_u64().unwrap(),
            )
        })
        .collect();
    top.sort();
    let each = u64::try_from(N * clients.len()).unwrap();
    assert_eq!(
        top,
        [
            ("127.0.0.1".to_owned(), each, 0),
            ("::1".to_owned(), each, 0)
        ],
        "{json}"
    );
    stop_leaving_nothing(agent, &config);
}

#[test]
fn connections_awaiting_their_hello_across_a_crash_count_once_where_they_are_decided() {
    const BEFORE: usize = 2;
    const API: usize = 4;
    const SITES: usize = 3;
    const UNKNOWN: usize = 2;
    const SILENT: usize = 1;
    const LONG: usize = 2;
    const CHECKS: usize = 2;
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let listener = listen(&netns, at(Ipv4Addr::LOCALHOST, SHARED_PORT));
    let api = hello_for("api.example.com");
    let sites = hello_for("www.example.com");
    let unknown = hello_for("other.org");

    // Decided before the crash, closed after it.
    let (mut decided_clients, decided_accepted) = hold_open(&netns, &listener, BEFORE);
    send_from_each(&mut decided_clients, &api);
    let mut expected = Expected::new();
    expected.opened("api", Some("matched"), BEFORE);
    wait_for_exactly(&netns, &expected);
    // Awaiting their hello through the crash.
    let api_held = hold_open(&netns, &listener, API);
    let sites_held = hold_open(&netns, &listener, SITES);
    let unknown_held = hold_open(&netns, &listener, UNKNOWN);
    let silent_held = hold_open(&netns, &listener, SILENT);
    // Halfway through a hello longer than a segment (`SNI_RESUME` keeps where it goes on),
    // and a balancer's check that sent its PROXY header alone: read by the server, so the
    // reader has seen them before the crash.
    let name_index = Walk::of(&api).name;
    let long = with_extension(&api, name_index, 0x0015, 1_300);
    let cut = Walk::of(&long).headers[name_index] + 600;
    let (mut long_clients, mut long_accepted) = hold_open(&netns, &listener, LONG);
    let check = proxy_v2_local();
    let (mut check_clients, mut check_accepted) = hold_open(&netns, &listener, CHECKS);
    for (clients, accepted, first) in [
        (&mut long_clients, &mut long_accepted, &long[..cut]),
        (&mut check_clients, &mut check_accepted, &check[..]),
    ] {
        send_from_each(clients, first);
        for server in accepted {
            let mut buf = vec![0; first.len()];
            server.read_exact(&mut buf).unwrap();
        }
    }
    expected.awaiting = API + SITES + UNKNOWN + SILENT + LONG + CHECKS;
    wait_for_exactly(&netns, &expected);

    agent.kill();
    let agent = Agent::start(&netns, &config);
    // The crashed run's table, counters and socket storage carry over: still awaiting, none
    // of them open from before the start.
    wait_for_exactly(&netns, &expected);

    answer_and_close((decided_clients, decided_accepted), api.len(), 10);
    expected.closed("api", BEFORE, api.len(), 10);
    finish_held(api_held, &api, 20);
    expected.exchanged("api", Some("matched"), API, api.len(), 20);
    finish_held(sites_held, &sites, 30);
    expected.exchanged("sites", Some("matched"), SITES, sites.len(), 30);
    finish_held(unknown_held, &unknown, 40);
    expected.exchanged(FALLBACK, Some("unknown_name"), UNKNOWN, unknown.len(), 40);
    close_held_silently(silent_held);
    expected.exchanged(FALLBACK, Some("no_data"), SILENT, 0, 0);
    // The rest of the long hello, read on where the crashed run left off.
    send_from_each(&mut long_clients, &long[cut..]);
    answer_and_close((long_clients, long_accepted), long.len() - cut, 50);
    expected.exchanged("api", Some("matched"), LONG, long.len(), 50);
    // The checks close with nothing after their header.
    close_held_silently((check_clients, check_accepted));
    expected.exchanged(FALLBACK, Some("no_data"), CHECKS, check.len(), 0);
    expected.awaiting = 0;
    wait_for_exactly(&netns, &expected);
    stop_leaving_nothing(agent, &config);
}

/// The table keeps a connection accepted on a port shared by name under the port's route
/// without names, whatever its hello chose. Those the hello left to that route count in its
/// slot: a crash and the route renamed, they are listed by port in the renamed route, and
/// count there once. (Taking every such entry as the start's own, to spare those a name
/// decided a second count there, left these counted nowhere: DESIGN, Restarts.)
#[test]
fn connections_left_to_the_route_without_names_stay_active_after_a_crash_renamed_it() {
    const LEFT: usize = 3;
    const RENAMED: &str = "tls-default";
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let listener = listen(&netns, at(Ipv4Addr::LOCALHOST, SHARED_PORT));
    let unknown = hello_for("other.org");
    let (mut clients, accepted) = hold_open(&netns, &listener, LEFT);
    send_from_each(&mut clients, &unknown);
    let active = |metrics: &str, route: &str| {
        route_sample(metrics, "collector_proxy_connections_active", route)
    };
    support::wait_for("the hellos decided", Duration::from_secs(10), || {
        (active(&scrape(&netns), FALLBACK) == Some(LEFT as f64)).then_some(())
    });

    agent.kill();
    let renamed = std::fs::read_to_string(&config.path).unwrap().replace(
        &format!("name = \"{FALLBACK}\""),
        &format!("name = \"{RENAMED}\""),
    );
    std::fs::write(&config.path, renamed).unwrap();
    let agent = Agent::start(&netns, &config);
    // Relisted every few polls: the same for a while.
    for _ in 0..3 {
        let metrics = scrape(&netns);
        for (route, expected) in [(RENAMED, LEFT), ("api", 0), ("sites", 0)] {
            assert_eq!(
                active(&metrics, route),
                Some(expected as f64),
                "{route}: {metrics}"
            );
        }
        assert_eq!(
            route_sample(
                &metrics,
                "collector_proxy_connections_open_from_before_start",
                RENAMED
            ),
            Some(LEFT as f64)
        );
        assert_eq!(proxy_json(&netns)["activeConnections"], LEFT);
        thread::sleep(Duration::from_secs(1));
    }
    answer_and_close((clients, accepted), unknown.len(), 10);
    support::wait_for("every connection closed", Duration::from_secs(10), || {
        (active(&scrape(&netns), RENAMED) == Some(0.0)).then_some(())
    });
    assert_eq!(proxy_json(&netns)["activeConnections"], 0);
    stop_leaving_nothing(agent, &config);
}

#[test]
fn a_route_by_name_on_a_port_no_route_without_names_has_is_refused() {
    let netns = Netns::new();
    // No route at all counts the port's other connections.
    let alone = AgentConfig::new(
        r#"
[[routes]]
name = "api"
ports = [18443]
type = "https"
sni = ["api.example.com"]
"#,
    );
    let stderr = support::refused_start(&netns, &alone.path);
    assert!(
        stderr.contains("route \"api\" is told apart by server name on port 18443")
            && stderr.contains("no route without `sni` has port 18443"),
        "{stderr}"
    );
    assert_no_pins(&alone.pin_dir);

    // One of its two ports has such a route, the other not: the message names the other.
    let half = AgentConfig::new(
        r#"
[[routes]]
name = "api"
ports = [18443, 18444]
type = "https"
sni = ["api.example.com"]

[[routes]]
name = "tls-other"
ports = [18443]
type = "https"
"#,
    );
    let stderr = support::refused_start(&netns, &half.path);
    assert!(
        stderr.contains("no route without `sni` has port 18444") && !stderr.contains("port 18443"),
        "{stderr}"
    );
    assert_no_pins(&half.pin_dir);
}

/// Connections a clean stop forgot, open across the next start on the shared port: their
/// route is unknown (undecided, or decided in the pins the stop removed), so they are the
/// port's route without a name's, whichever order the routes are listed in.
#[test]
fn connections_from_before_a_clean_start_on_a_shared_port_are_the_unnamed_routes() {
    const HELD: usize = 4;
    // The route without a name listed first, the named ones after it.
    let unnamed = "[[routes]]\nname = \"tls-other\"\nports = [18443]\ntype = \"https\"\n";
    assert!(ROUTES.contains(unnamed));
    let netns = Netns::new();
    let config = AgentConfig::new(&format!("{unnamed}{}", ROUTES.replace(unnamed, "")));
    let agent = Agent::start(&netns, &config);
    let listener = listen(&netns, at(Ipv4Addr::LOCALHOST, SHARED_PORT));
    let held = hold_open(&netns, &listener, HELD);
    let mut expected = Expected::new();
    expected.awaiting = HELD;
    wait_for_exactly(&netns, &expected);

    // A rollout: the clean stop forgets them, the next start finds them open.
    assert!(agent.stop().success());
    let agent = Agent::start(&netns, &config);
    let mut expected = Expected::new();
    let fallback = expected.route(FALLBACK);
    fallback.open_from_before_start = HELD;
    fallback.active = HELD;
    wait_for_exactly(&netns, &expected);

    // Their hellos and closes are no new run's: counted nowhere, and gone from `active`.
    finish_held(held, &hello_for("www.example.com"), 10);
    wait_for_exactly(&netns, &Expected::new());
    stop_leaving_nothing(agent, &config);
}

/// Where the kernel's rules put a name read from a hello (`None`: no name), and how.
fn route_of(read: Hello, name: Option<&[u8]>) -> (&'static str, &'static str) {
    let outcome = match read {
        Hello::Name { .. } => {
            let name = name.unwrap().to_ascii_lowercase();
            let one_label_before = |rest: &[u8]| {
                let dot = name.iter().position(|&b| b == b'.');
                dot.is_some_and(|dot| dot > 0 && &name[dot + 1..] == rest)
            };
            return if name == b"api.example.com" {
                ("api", "matched")
            } else if one_label_before(b"example.com") {
                ("sites", "matched")
            } else {
                (FALLBACK, "unknown_name")
            };
        }
        Hello::NoName => "no_name",
        Hello::NotHello => "not_tls",
        Hello::Incomplete => "incomplete",
        Hello::Malformed => "malformed",
        // The record says the hello goes on past the payload; nothing more comes, and the
        // close counts what was not read.
        Hello::Continues { .. } | Hello::NameCut { .. } => "missed",
    };
    (FALLBACK, outcome)
}

/// Behind a load balancer that speaks the PROXY protocol, every connection starts with its
/// header: skipped, in the hello's segment or in one of its own before it, and each kind of
/// client counted as it is without it (its bytes with the header's). The balancer's own
/// checks (a LOCAL header, then nothing) count as no data; a header cut short or a version
/// 1 line with no end, as such. A hello cut in its name after a header is read on.
#[test]
fn hellos_after_a_proxy_protocol_header_are_read() {
    const N: usize = 3;
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let listener = listen(&netns, at(Ipv4Addr::LOCALHOST, SHARED_PORT));

    let mut expected = Expected::new();
    for header in [proxy_v1(), proxy_v2()] {
        for client in clients_of_every_kind()
            .into_iter()
            .filter(|client| !client.first.is_empty())
        {
            let behind = Client {
                first: [header.as_slice(), &client.first].concat(),
                ..client
            };
            for send in [Send::AtOnce, Send::SplitAfter(header.len())] {
                behind.exchange_sending(&netns, &listener, N, send, &mut expected);
            }
        }
    }
    let v2 = proxy_v2();
    let mut endless = b"PROXY ".to_vec();
    endless.resize(200, b'x');
    let api = hello_for("api.example.com");
    for (what, first, outcome) in [
        ("balancer check", proxy_v2_local(), "no_data"),
        (
            "header cut short",
            v2[..v2.len() - 1].to_vec(),
            "incomplete",
        ),
        ("line with no end", endless, "malformed"),
        // A second header is no hello.
        (
            "two headers",
            [proxy_v1(), v2.clone(), api.clone()].concat(),
            "not_tls",
        ),
        // Bytes that only begin like a header are none: a scanner's bare CRLFs.
        ("bare CRLFs", b"\r\n\r\n".to_vec(), "not_tls"),
        ("a prefix alone", b"PROXY".to_vec(), "not_tls"),
    ] {
        let client = Client {
            what,
            first,
            extra: 0,
            response: 100,
            closer: Closer::Accepting,
            route: FALLBACK,
            outcome,
        };
        client.exchange(&netns, &listener, N, &mut expected);
    }
    // The hello cut in its name: after a header in the same segment, and after one in a
    // segment of its own (its name's first bytes kept, then read on).
    let name_cut = Walk::of(&api).name_body() + 7;
    for header in [proxy_v1(), proxy_v2()] {
        let behind = Client {
            what: "a hello cut in its name after a PROXY header",
            first: [header.as_slice(), &api].concat(),
            extra: 0,
            response: 100,
            closer: Closer::Connecting,
            route: "api",
            outcome: "matched",
        };
        for send in [
            Send::SplitAfter(header.len() + name_cut),
            Send::SplitTwice(header.len(), header.len() + name_cut),
        ] {
            behind.exchange_sending(&netns, &listener, N, send, &mut expected);
        }
    }
    // A second header in the segment after the first's own.
    let header = proxy_v1();
    let second = Client {
        what: "a second header after the first's segment",
        first: [header.clone(), v2, api].concat(),
        extra: 0,
        response: 100,
        closer: Closer::Connecting,
        route: FALLBACK,
        outcome: "not_tls",
    };
    let split = Send::SplitAfter(header.len());
    second.exchange_sending(&netns, &listener, N, split, &mut expected);
    wait_for_exactly(&netns, &expected);
    stop_leaving_nothing(agent, &config);
}

/// The kernel reads every first segment as the parser it shares with the agent does in
/// userspace (which `tests/client_hello.rs` holds to rustls): hellos mutated at random, sent
/// over real connections, are counted in the route and with the outcome that parser's
/// reading gives, each exactly.
#[test]
fn mutated_hellos_count_where_the_parser_reads_them() {
    const PER_NAME: usize = 100;
    const RESPONSE: usize = 10;
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let listener = listen(&netns, at(Ipv4Addr::LOCALHOST, SHARED_PORT));

    let mut rng = hello::Xorshift(0x5eed);
    let mut expected = Expected::new();
    let mut outcomes = BTreeMap::<&str, usize>::new();
    for name in [
        "api.example.com",
        "www.example.com",
        "API.Example.COM",
        "other.org",
    ] {
        let base = hello_for(name);
        let fields = hello::length_fields(&base);
        for _ in 0..PER_NAME {
            let payload = hello::mutate(&base, &fields, &mut rng);
            let (read, text) = parsed_bytes(&payload);
            let (route, outcome) = route_of(read, text.as_deref());
            *outcomes.entry(outcome).or_default() += 1;
            exchanges_sending(
                &netns,
                &listener,
                1,
                &payload,
                Send::AtOnce,
                RESPONSE,
                Closer::Connecting,
            );
            expected.exchanged(route, Some(outcome), 1, payload.len(), RESPONSE);
        }
    }
    eprintln!("outcomes of the mutated hellos: {outcomes:?}");
    // The mutations reach every way the parser reads a hello (`no_data` and `missed` are the
    // close's and the reader's, not the parser's).
    for outcome in SNI_OUTCOME_NAMES
        .into_iter()
        .filter(|&outcome| !matches!(outcome, "no_data" | "missed"))
    {
        assert!(
            outcomes.contains_key(outcome),
            "no {outcome} among {outcomes:?}"
        );
    }
    wait_for_exactly(&netns, &expected);
    stop_leaving_nothing(agent, &config);
}

/// With `TCP_DEFER_ACCEPT` (nginx's `deferred`, `HAProxy`'s `defer-accept`) the handshake's last
/// ACK is dropped and the connection accepted with its first data, its hello, which goes
/// through the listening socket's filter before the connection's own socket exists: read
/// there (`read_early_hellos`) and decided at the accept, each kind of client counted as it
/// is without deferral; behind a balancer, its PROXY header completes the accept, and the
/// hello after it is read.
#[test]
fn hellos_that_complete_a_deferred_accept_are_read() {
    const N: usize = 5;
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let listeners = [
        listen(&netns, at(Ipv4Addr::LOCALHOST, SHARED_PORT)),
        listen(&netns, at(Ipv6Addr::LOCALHOST, SHARED_PORT)),
    ];
    for listener in &listeners {
        support::set_tcp_option(listener, libc::TCP_DEFER_ACCEPT, 5);
    }
    let deferred_accepts = DeferredAccepts::from_now(&netns);
    let mut deferred = 0;

    let mut expected = Expected::new();
    // A connection that sends nothing is never accepted here.
    for client in clients_of_every_kind()
        .into_iter()
        .filter(|client| !client.first.is_empty())
    {
        for listener in &listeners {
            client.exchange(&netns, listener, N, &mut expected);
        }
        // Behind a balancer, whose PROXY header alone completes the accept.
        let header = proxy_v2();
        let behind = Client {
            first: [header.as_slice(), &client.first].concat(),
            ..client
        };
        let split = Send::SplitAfter(header.len());
        behind.exchange_sending(&netns, &listeners[0], N, split, &mut expected);
        deferred += 3 * N;
    }
    wait_for_exactly(&netns, &expected);
    deferred_accepts.assert_accepted(deferred);
    stop_leaving_nothing(agent, &config);
}

/// A dual-stack listener (`[::]`, not IPv6-only) takes IPv4 clients on IPv4-mapped IPv6
/// sockets: the early reader's client address, from the IPv4 packet, and the accepted
/// socket's must compare equal for a deferred accept's verdict to be taken, as IPv6 ones do.
#[test]
fn a_dual_stack_listener_reads_ipv4_and_ipv6_hellos_before_the_accept() {
    const N: usize = 3;
    let netns = Netns::new();
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let listener = listen(&netns, at(Ipv6Addr::UNSPECIFIED, SHARED_PORT));
    support::set_tcp_option(&listener, libc::TCP_DEFER_ACCEPT, 5);
    let deferred_accepts = DeferredAccepts::from_now(&netns);
    let mut deferred = 0;

    let mut expected = Expected::new();
    for client in clients_of_every_kind()
        .into_iter()
        .filter(|client| !client.first.is_empty())
    {
        let payload = with_extra(&client.first, client.extra);
        for address in [
            at(Ipv4Addr::LOCALHOST, SHARED_PORT),
            at(Ipv6Addr::LOCALHOST, SHARED_PORT),
        ] {
            let (response, closer) = (client.response, client.closer);
            exchanges_to(
                &netns,
                &listener,
                address,
                N,
                &payload,
                Send::AtOnce,
                response,
                closer,
            );
            expected.exchanged(
                client.route,
                Some(client.outcome),
                N,
                payload.len(),
                response,
            );
            deferred += N;
        }
    }
    wait_for_exactly(&netns, &expected);
    deferred_accepts.assert_accepted(deferred);
    stop_leaving_nothing(agent, &config);
}

/// TCP Fast Open: the hello rides in the SYN, which the listening socket takes and answers
/// with the new socket already made. Read there too, each kind of client counted as it is
/// without Fast Open (the agent and the check of each SYN's data are this test's own; the
/// namespace lets SYNs carry data without a cookie).
#[test]
fn hellos_in_a_fast_open_syn_are_read() {
    const N: usize = 5;
    // Client and server on, data in a SYN without a cookie to ask for first (the
    // kernel's TFO_CLIENT_NO_COOKIE and TFO_SERVER_COOKIE_NOT_REQD).
    const FAST_OPEN: &str = "0x207";
    let netns = Netns::new();
    netns.run(|| {
        std::fs::write(
            "/proc/sys/net/ipv4/tcp_fastopen",
            i32::from_str_radix(&FAST_OPEN[2..], 16)
                .unwrap()
                .to_string(),
        )
        .unwrap();
    });
    let config = AgentConfig::new(ROUTES);
    let agent = Agent::start(&netns, &config);
    let listener = listen(&netns, at(Ipv4Addr::LOCALHOST, SHARED_PORT));
    support::set_tcp_option(&listener, libc::TCP_FASTOPEN, 64);

    let mut expected = Expected::new();
    for client in clients_of_every_kind()
        .into_iter()
        .filter(|client| !client.first.is_empty())
    {
        client.exchange_sending(&netns, &listener, N, Send::FastOpen, &mut expected);
    }
    wait_for_exactly(&netns, &expected);
    stop_leaving_nothing(agent, &config);
}
