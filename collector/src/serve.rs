//! HTTP: `/metrics` (`OpenMetrics` or the classic text, by the `Accept` header's
//! q-values), the JSON API, and the probes. Handlers only read the published snapshot;
//! nothing here touches the kernel. `/healthz` fails when no poll has finished for
//! [`stall_limit`] (see [`Liveness`]); `/readyz` once a first poll succeeded.
//!
//! Guarded by one middleware: credentials when configured (see `auth`), a cap on requests
//! served at once, and a time limit per request; event streams have a cap of their own
//! instead of the time limit, so that tails of the stream never crowd out scrapes. Over a
//! limit, 503, as for a password whose bcrypt check gets no turn within the time limit
//! (passwords wait for their check before the cap, holding no place in it; two of an
//! address's at a time, its others behind them). The probes `/healthz` and `/readyz` are
//! exempt from all three: kubelet probes carry no credentials and must be answered under
//! load. Below that, connections are capped
//! in all and per address, and must send their headers in time (see [`serve`]); at a cap, a
//! new connection closes the one that has waited longest for a request (at the cap in all, of
//! the address holding the most; per address, of its own), so that idle connections cannot
//! keep the probes out. Answers not yet taken by their readers are held within a budget
//! (`unsent_answers`). TLS, when configured, is in `tls`.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::{GracefulShutdown, Watcher},
    service::TowerToHyperService,
};
use prometheus_client::registry::Registry;

use crate::{
    api, auth,
    event_stream::{EventHub, HEARTBEAT_INTERVAL, StreamEvent},
    gzip,
    http_load::{HttpLoad, Limit},
    metrics,
    poller::SharedSnapshot,
    secret_reloads::SecretReloads,
    tls,
    unsent_answers::{Lease, leased},
};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone)]
struct AppState {
    latest: Arc<SharedSnapshot>,
    registry: Arc<Registry>,
    hub: Arc<EventHub>,
    liveness: Arc<Liveness>,
}

/// Shortest time without a finished poll after which `/healthz` fails, whatever the poll
/// interval: a poll slowed down (a CPU-throttled pod, a large ruleset or many interfaces to
/// read) must not get the agent restarted, which costs its rates, its top lists and its
/// stream readers, and attaches everything anew.
const STALL_FLOOR: Duration = Duration::from_mins(1);
/// Poll intervals without a finished poll after which `/healthz` fails, where that is longer
/// than [`STALL_FLOOR`]: a few late ticks at a long interval are not a stall.
const STALL_INTERVALS: u32 = 10;

/// How long the poll loop may go without finishing a poll before `/healthz` fails:
/// `max(STALL_FLOOR, STALL_INTERVALS × poll_interval)`, 60 s at the default 1 s. With the
/// shipped probes (every 10 s, 6 failures) a stuck loop is restarted within about two
/// minutes, before `CollectorPollStalled` (5 minutes) would page anyone.
#[must_use]
pub fn stall_limit(poll_interval: Duration) -> Duration {
    poll_interval
        .saturating_mul(STALL_INTERVALS)
        .max(STALL_FLOOR)
}

/// The poll loop's pulse, for `/healthz`: when a poll last finished. A poll that could not
/// read the kernel maps finished too: the loop runs, a restart would meet the same refusal,
/// and `CollectorSourceDown` says so. What `/healthz` catches is a loop that no longer runs
/// (a read that never returns, a log write that blocks), which only a restart ends.
pub struct Liveness {
    started: Instant,
    /// Milliseconds from `started` to the end of the last poll (0 before the first: the
    /// limit then counts from the start).
    last_poll_ms: AtomicU64,
    limit: Duration,
    poll_interval: Duration,
}

impl Liveness {
    /// Alive from now, polling every `poll_interval`.
    #[must_use]
    pub fn new(poll_interval: Duration) -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            last_poll_ms: AtomicU64::new(0),
            limit: stall_limit(poll_interval),
            poll_interval,
        })
    }

    /// The poll interval it was made for.
    #[must_use]
    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// A poll has finished since the start.
    #[must_use]
    pub fn has_polled(&self) -> bool {
        self.last_poll_ms.load(Ordering::Relaxed) > 0
    }

    /// A poll finished, its read of the kernel maps successful or not.
    pub fn polled(&self) {
        self.polled_at(Instant::now());
    }

    fn polled_at(&self, at: Instant) {
        // At least 1: 0 means no poll yet.
        let ms = u64::try_from(at.saturating_duration_since(self.started).as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.last_poll_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// A poll has finished within the limit (or the limit has not passed since the start).
    #[must_use]
    pub fn alive(&self) -> bool {
        self.stalled_for().is_none()
    }

    /// How long no poll has finished, when that is longer than the limit.
    #[must_use]
    pub fn stalled_for(&self) -> Option<Duration> {
        self.stalled(Instant::now())
    }

    /// How long no poll has finished, as of `now`, when that is longer than the limit.
    fn stalled(&self, now: Instant) -> Option<Duration> {
        let last = Duration::from_millis(self.last_poll_ms.load(Ordering::Relaxed));
        let since = now
            .saturating_duration_since(self.started)
            .saturating_sub(last);
        (since > self.limit).then_some(since)
    }
}

/// What guards every request.
#[derive(Clone)]
pub struct Guard {
    pub credentials: auth::Credentials,
    pub permits: Arc<tokio::sync::Semaphore>,
    pub timeout: std::time::Duration,
    pub tls_handshake_timeout: std::time::Duration,
    pub connections: ConnectionLimits,
    /// How the secret files' reloads went (the TLS certificate's too), for `/metrics`.
    pub reloads: Arc<SecretReloads>,
    /// What the limits turned away, and the open streams, for `/metrics`.
    pub load: Arc<HttpLoad>,
}

/// Connections open at once, in all and from one address.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub total: usize,
    pub per_address: usize,
}

/// Reads the credential and certificate files `http` names, with the functions a start
/// loads them by (`collector check`, and the config watch, judge them so).
pub fn read_http_files(http: &crate::config::HttpConfig) -> anyhow::Result<()> {
    auth::Credentials::from_config(http, &Arc::default())?;
    if let Some(files) = &http.tls {
        tls::server_config(files, Arc::default())?;
    }
    Ok(())
}

impl Guard {
    /// From the config; reads the token and user files (a missing or malformed one is an
    /// error).
    pub fn from_config(http: &crate::config::HttpConfig) -> anyhow::Result<Self> {
        let reloads = Arc::default();
        Ok(Self {
            credentials: auth::Credentials::from_config(http, &reloads)?,
            permits: Arc::new(tokio::sync::Semaphore::new(http.max_concurrent_requests)),
            timeout: http.request_timeout,
            tls_handshake_timeout: http.tls_handshake_timeout,
            connections: ConnectionLimits {
                total: http.max_connections,
                per_address: http.max_connections_per_address,
            },
            reloads,
            load: Arc::new(HttpLoad::new(http.max_event_streams, http.max_unsent_bytes)),
        })
    }
}

/// 503 for a password whose check got no turn within the request's time.
fn no_password_turn(guard: &Guard) -> Response {
    guard.load.refuse(Limit::PasswordChecks);
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "too many password checks waiting\n",
    )
        .into_response()
}

async fn guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if matches!(path, "/healthz" | "/readyz") {
        // Cheap, and kubelet must get an answer under load too, without credentials.
        return next.run(request).await;
    }
    // Credentials before the permit: a token or a remembered password is judged at once, and
    // wrong passwords waiting for their bcrypt check (`auth` runs one at a time) hold no
    // permit that scrapes need.
    match guard.credentials.judge(request.headers()) {
        auth::Judgement::Admitted => {}
        auth::Judgement::Refused(challenge) => return unauthorized(challenge),
        auth::Judgement::Check(check) => {
            // No permit bounds how many wait here, so their connections count as idle
            // meanwhile: they must not keep a new connection (the probes') out.
            let deadline = tokio::time::Instant::now() + guard.timeout;
            let place = request.extensions().get::<Place>().cloned();
            let _waiting = place.as_ref().map(Place::waiting);
            let check = match &place {
                Some(place) => match place.check_queue_place(guard.timeout).await {
                    Some(queued) => check.holding(queued),
                    None => return no_password_turn(&guard),
                },
                None => check,
            };
            match check
                .run(deadline.saturating_duration_since(tokio::time::Instant::now()))
                .await
            {
                Ok(()) => {}
                Err(auth::CheckRefused::Wrong(challenge)) => return unauthorized(challenge),
                Err(auth::CheckRefused::NoTurn) => return no_password_turn(&guard),
            }
        }
    }
    let Ok(permit) = guard.permits.clone().try_acquire_owned() else {
        guard.load.refuse(Limit::Requests);
        // The places free up as requests end, within a request's time: a client (or a
        // load balancer) that reads `Retry-After` tries again a second later. (A stream's
        // place frees only when a stream ends, a password check's turn after a wait as long
        // as a request's: neither says when.)
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "too many requests at once\n",
        )
            .into_response();
    };
    if path == "/api/v1/events" {
        // A stream lives as long as its body: it holds a stream permit for that long, and
        // gives the request permit back once admitted.
        let Some(stream_place) = guard.load.stream_place() else {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "too many event streams at once\n",
            )
                .into_response();
        };
        drop(permit);
        let mut authorization = HeaderMap::new();
        if let Some(value) = request.headers().get(header::AUTHORIZATION) {
            authorization.insert(header::AUTHORIZATION, value.clone());
        }
        let credentials = guard.credentials.clone();
        let timeout = guard.timeout;
        let mut response = next.run(request).await;
        response.extensions_mut().insert(Streaming);
        return response.map(|body| {
            use futures_util::StreamExt as _;
            let mut judged_at = Instant::now();
            axum::body::Body::from_stream(body.into_data_stream().take_while(move |_| {
                let _held = &stream_place;
                // Judged once, a stream would outlive its credentials: a token rotated or a
                // user removed to revoke a leak still streamed client addresses and names.
                // Copies only for a line that is judged: a busy stream's other lines cost nothing.
                let judged = (judged_at.elapsed() >= REJUDGE_INTERVAL).then(|| {
                    judged_at = Instant::now();
                    (credentials.clone(), authorization.clone())
                });
                async move {
                    match judged {
                        Some((credentials, authorization)) => {
                            still_admitted(&credentials, &authorization, timeout).await
                        }
                        None => true,
                    }
                }
            }))
        });
    }
    let _permit = permit;
    tokio::time::timeout(guard.timeout, next.run(request))
        .await
        .unwrap_or_else(|_| {
            guard.load.refuse(Limit::RequestTimeout);
            (StatusCode::SERVICE_UNAVAILABLE, "request timed out\n").into_response()
        })
}

/// How often an open event stream's credentials are judged again (at its next line: a
/// heartbeat comes every [`HEARTBEAT_INTERVAL`] at the latest).
const REJUDGE_INTERVAL: Duration = Duration::from_secs(5);

/// Whether the credentials a stream was opened with still admit it. A password no longer
/// remembered (the users file was read again) is checked again, in its turn; a check that
/// gets no turn in `timeout` ends the stream too. The password may be the one the new file
/// revoked, and wrong passwords, which anyone can send, keep the checks from their turns for
/// as long as they come: such a stream streamed on. A reader whose password holds opens the
/// stream again.
async fn still_admitted(
    credentials: &auth::Credentials,
    authorization: &HeaderMap,
    timeout: Duration,
) -> bool {
    let admitted = match credentials.judge(authorization) {
        auth::Judgement::Admitted => true,
        auth::Judgement::Refused(_) => false,
        auth::Judgement::Check(check) => match check.run(timeout).await {
            Ok(()) => true,
            Err(auth::CheckRefused::Wrong(_)) => false,
            Err(auth::CheckRefused::NoTurn) => {
                tracing::info!(
                    "ending an event stream: its password, to be checked again, got no turn \
                     within the request timeout"
                );
                return false;
            }
        },
    };
    if !admitted {
        tracing::info!(
            "ending an event stream: the credentials it was opened with no longer admit it"
        );
    }
    admitted
}

fn unauthorized(auth::Challenge(challenge): auth::Challenge) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, challenge)],
        "credentials are required\n",
    )
        .into_response()
}

/// What the endpoints serve from.
pub struct Sources {
    pub latest: Arc<SharedSnapshot>,
    pub hub: Arc<EventHub>,
    pub liveness: Arc<Liveness>,
}

/// The router for the agent's endpoints.
pub fn router(sources: Sources, guard_with: Guard) -> Router {
    let Sources {
        latest,
        hub,
        liveness,
    } = sources;
    let registry = Arc::new(metrics::registry(
        Arc::clone(&latest),
        Arc::clone(&guard_with.reloads),
        Arc::clone(&guard_with.load),
    ));
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/api/v1/proxy", get(serve_proxy))
        .route("/api/v1/dns", get(serve_dns))
        .route("/api/v1/events", get(serve_events))
        .route("/healthz", get(serve_health))
        .route("/readyz", get(serve_ready))
        .with_state(AppState {
            latest,
            registry,
            hub,
            liveness,
        })
        .layer(middleware::from_fn_with_state(guard_with, guard))
}

/// The format follows `Accept` as well as the coding `Accept-Encoding`: a cache between that
/// kept one answer for both would hand OpenMetrics to a scraper that asked for the classic
/// text, or the reverse.
fn varies_with_accept(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::VARY,
        HeaderValue::from_static("accept, accept-encoding"),
    );
    response
}

/// OpenMetrics for scrapers that prefer it (Prometheus does), the classic text format for
/// everyone else. 503 until the first read of the kernel maps: the counters before it are
/// zeros, and after a crash the pinned ones go on from where they were, so a scrape then
/// would show Prometheus a reset and count their whole past again in `increase()`.
async fn serve_metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if !state.latest.is_ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, NOT_READY).into_response();
    }
    let wants_openmetrics = prefers_openmetrics(
        headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|value| value.to_str().ok()),
    );
    match metrics::render(&state.registry) {
        Ok(body) if wants_openmetrics => {
            varies_with_accept(gzip::respond(&headers, OPENMETRICS, body.into_bytes()))
        }
        Ok(body) => varies_with_accept(gzip::respond(
            &headers,
            CLASSIC_TEXT,
            metrics::to_classic_text(&body).into_bytes(),
        )),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering metrics: {err}\n"),
        )
            .into_response(),
    }
}

/// Whether the `Accept` header's values prefer OpenMetrics to the classic text format:
/// OpenMetrics when they name it, with a quality above 0 and at least the classic text's
/// (RFC 9110, 12.5.1: the quality of the most specific range that matches, 0 where none
/// does), so that on a tie it wins, as Prometheus lists it first. Named: a client that only
/// accepts anything (`*/*`, as curl sends) gets the classic text, as before. Parameters
/// other than `q` (`version`, `escaping`) do not choose: each format is served in the one
/// version the agent renders.
fn prefers_openmetrics<'a>(values: impl Iterator<Item = &'a str>) -> bool {
    let ranges: Vec<MediaRange<'_>> = values
        .flat_map(|value| value.split(','))
        .filter_map(MediaRange::parse)
        .collect();
    match quality(&ranges, "application", "openmetrics-text") {
        Some((EXACT, openmetrics)) => {
            let text = quality(&ranges, "text", "plain").map_or(0, |(_, quality)| quality);
            openmetrics > 0 && openmetrics >= text
        }
        _ => false,
    }
}

/// [`MediaRange::specificity`] of a range naming the media type itself.
const EXACT: u8 = 2;

/// One range of an `Accept` header, its quality in thousandths.
#[derive(Debug, PartialEq)]
struct MediaRange<'a> {
    kind: &'a str,
    subtype: &'a str,
    quality: u16,
}

impl<'a> MediaRange<'a> {
    /// `None` for a range that is not `type/subtype` or has a malformed `q`: ignored.
    fn parse(range: &'a str) -> Option<Self> {
        let mut parts = range.split(';');
        let (kind, subtype) = parts.next()?.trim().split_once('/')?;
        let (kind, subtype) = (kind.trim(), subtype.trim());
        if kind.is_empty() || subtype.is_empty() {
            return None;
        }
        Some(Self {
            kind,
            subtype,
            quality: weight(parts)?,
        })
    }

    /// How specifically the range names `kind/subtype`: 2 exactly, 1 as `kind/*`, 0 as
    /// `*/*`; `None` when it does not match.
    fn specificity(&self, kind: &str, subtype: &str) -> Option<u8> {
        let same_kind = self.kind.eq_ignore_ascii_case(kind);
        if same_kind && self.subtype.eq_ignore_ascii_case(subtype) {
            Some(EXACT)
        } else if same_kind && self.subtype == "*" {
            Some(1)
        } else if self.kind == "*" && self.subtype == "*" {
            Some(0)
        } else {
            None
        }
    }
}

/// The weight the `;`-separated `parameters` of an `Accept` range or an `Accept-Encoding`
/// coding give it (RFC 9110, 12.4.2), in thousandths: 1000 without `q`, `None` for a `q`
/// that does not parse (the range or coding is then passed over). Space is allowed around
/// `=`, as in the other parameters.
pub(crate) fn weight<'a>(parameters: impl Iterator<Item = &'a str>) -> Option<u16> {
    let mut quality = 1000;
    for parameter in parameters {
        if let Some((name, value)) = parameter.split_once('=')
            && name.trim().eq_ignore_ascii_case("q")
        {
            quality = qvalue(value.trim())?;
        }
    }
    Some(quality)
}

/// A `qvalue` (`0`, `0.5`, `1.000`, at most three decimals) in thousandths.
fn qvalue(text: &str) -> Option<u16> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths: u16 = format!("{fraction:0<3}").parse().ok()?;
    match whole {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// The quality `ranges` give `kind/subtype`: that of the most specific range matching it
/// (the highest of several as specific), with how specific; `None` where none matches.
fn quality(ranges: &[MediaRange<'_>], kind: &str, subtype: &str) -> Option<(u8, u16)> {
    ranges
        .iter()
        .filter_map(|range| Some((range.specificity(kind, subtype)?, range.quality)))
        .max()
}

async fn serve_proxy(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let snapshot = state.latest.load();
    let mut proxy = api::proxy_stats(&snapshot);
    proxy.age = api::Age::new(snapshot.age(), state.liveness.poll_interval());
    json(&headers, &proxy)
}

async fn serve_dns(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let snapshot = state.latest.load();
    let mut dns = api::dns_stats(&snapshot);
    dns.age = api::Age::new(snapshot.age(), state.liveness.poll_interval());
    json(&headers, &dns)
}

/// `value` as JSON, gzipped if the request takes it.
fn json(request: &HeaderMap, value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => gzip::respond(request, "application/json", body),
        Err(err) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering JSON: {err}\n"),
        )
            .into_response(),
    }
}

/// NDJSON, one event per line, until the client goes away or the agent stops; a heartbeat
/// after [`HEARTBEAT_INTERVAL`] without a line. The body owns the subscription: dropped with
/// it, it counts what it had not taken (see [`crate::event_stream::Subscription`]).
async fn serve_events(State(state): State<AppState>) -> Response {
    use futures_util::StreamExt as _;
    // Subscribed first: whatever comes meanwhile follows the start line.
    let subscription = state.hub.subscribe();
    let start = futures_util::stream::iter(ndjson_line(&StreamEvent::start(state.hub.terms)));
    let lines = futures_util::stream::unfold(subscription, |mut subscription| async move {
        let event = match tokio::time::timeout(HEARTBEAT_INTERVAL, subscription.next()).await {
            Ok(event) => event?,
            Err(_) => StreamEvent::heartbeat(),
        };
        Some((ndjson_line(&event)?, subscription))
    });
    let lines = start.chain(lines);
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            // A reverse proxy in front (nginx buffers by default) must pass each line on as
            // it comes: held back, the heartbeats would not reach the reader, which gives up
            // after three missed.
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}

/// One line of the event stream, for the body.
fn ndjson_line(event: &StreamEvent) -> Option<Result<Vec<u8>, std::convert::Infallible>> {
    let mut line = serde_json::to_vec(event).ok()?;
    line.push(b'\n');
    Some(Ok(line))
}

/// 503 once no poll has finished for [`stall_limit`]: the poll loop is stuck, and only a
/// restart ends that.
async fn serve_health(State(state): State<AppState>) -> (StatusCode, String) {
    match state.liveness.stalled(Instant::now()) {
        None => (StatusCode::OK, "ok\n".to_owned()),
        Some(since) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no poll finished for {} s (the limit is {} s): the poll loop is stuck\n",
                since.as_secs(),
                state.liveness.limit.as_secs()
            ),
        ),
    }
}

const NOT_READY: &str = "waiting for the first read of the kernel maps\n";

async fn serve_ready(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.latest.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, NOT_READY)
    }
}

/// Longest a client may take to send a request's headers, from when the connection is ready
/// for one: so also how long an idle kept-alive connection stays open (Prometheus, scraping
/// every 15 s, keeps its own).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes a connection buffers while it reads a request's head (hyper's floor is 8 KiB).
const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// Longest data sent on a connection may go unacknowledged before the kernel gives the
/// connection up (`TCP_USER_TIMEOUT`): what ends an event stream whose reader was lost
/// without a word (a partition, a node gone), and frees its stream permit. Not keepalive:
/// the kernel sends its probes only while nothing sent is unacknowledged, and a stream's
/// heartbeat leaves something unacknowledged by a lost reader within seconds, after which
/// only retransmissions (about 15 minutes of them by default) would end it. A live reader
/// acknowledges within a round trip; one whose window stays shut this long (a tail left
/// suspended) is cut off too, since Linux 5.11 (9d9b1ee0b2d1, "tcp: fix `TCP_USER_TIMEOUT`
/// with zero window"), and was losing events anyway.
const UNACKNOWLEDGED_TIMEOUT: Duration = Duration::from_mins(1);

/// Serves, over TLS when `tls` is given, until `shutdown` resolves. Each connection runs on
/// its own task, its TLS handshake included, so that a slow or silent client holds up no
/// one else. Connections are capped in all and per address (`guard.connections`); at a cap,
/// a new connection closes the one that has waited longest for a request (at the cap in
/// all, of the address holding the most; per address, of its own), and is refused only when
/// every one of those is in a request.
pub async fn serve(
    mut listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    sources: Sources,
    guard: Guard,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let admission = Arc::new(Mutex::new(Admission::new(guard.connections)));
    let load = Arc::clone(&guard.load);
    let handshake_timeout = guard.tls_handshake_timeout;
    let app = router(sources, guard);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            // axum's accept for a TcpListener retries (and logs) the errors worth retrying.
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
            () = &mut shutdown => break,
        };
        let Some(ticket) = Admission::admit(&admission, peer.ip()) else {
            load.refuse(Limit::Connections);
            tracing::debug!(%peer, "too many connections: closing a new one");
            continue;
        };
        tune_accepted(&tcp, peer);
        let (app, acceptor, watcher) = (app.clone(), acceptor.clone(), graceful.watcher());
        let load = Arc::clone(&load);
        tokio::spawn(async move {
            let served = async {
                match acceptor {
                    Some(acceptor) => {
                        if let Some(stream) =
                            tls::handshake(&acceptor, tcp, peer, handshake_timeout).await
                        {
                            serve_connection(stream, app, watcher, &ticket, load).await;
                        }
                    }
                    None => serve_connection(tcp, app, watcher, &ticket, load).await,
                }
            };
            tokio::select! {
                () = served => {}
                () = ticket.closed() => {
                    tracing::debug!(
                        %peer,
                        "closing a connection: a new one takes its place, or newer answers \
                         the room of the answer it left untaken (max_unsent_bytes)"
                    );
                }
            }
        });
    }
    // Closed before the drain: a probe or scrape meanwhile is refused at once rather than
    // left in the backlog until its timeout.
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Bytes of an answer past which the kernel takes no more unsent data for a connection
/// (`TCP_NOTSENT_LOWAT`; it checks as it starts a segment, so up to one segment more): the
/// rest waits in the agent, counted within `max_unsent_bytes`. Without it the kernel took up
/// to its send buffer's 4 MiB from each connection whose reader stopped reading, charged to
/// the pod's memory and out of the budget's reach.
const KERNEL_UNSENT_MAX: u32 = 16 * 1024;

/// Sets an accepted connection's socket options: `TCP_USER_TIMEOUT`, `TCP_NOTSENT_LOWAT`
/// and `TCP_NODELAY` (an event stream's line goes out when written, not after the reader's
/// delayed acknowledgement of the last, up to 40 ms on). Served all the same where one fails.
fn tune_accepted(tcp: &tokio::net::TcpStream, peer: SocketAddr) {
    let socket = socket2::SockRef::from(tcp);
    if let Err(err) = socket.set_tcp_user_timeout(Some(UNACKNOWLEDGED_TIMEOUT)) {
        // Only a lost reader's stream would outlive its reader.
        tracing::debug!(%peer, "setting TCP_USER_TIMEOUT: {err}");
    }
    if let Err(err) = socket.set_tcp_notsent_lowat(KERNEL_UNSENT_MAX) {
        tracing::debug!(%peer, "setting TCP_NOTSENT_LOWAT: {err}");
    }
    if let Err(err) = socket.set_tcp_nodelay(true) {
        tracing::debug!(%peer, "setting TCP_NODELAY: {err}");
    }
}

/// Marks an event stream's response: its connection counts as in a request for as long as
/// the body lives (a stream permit bounds how many do).
#[derive(Clone, Copy)]
struct Streaming;

/// HTTP/1.1 on one connection, with the header read timeout. The connection counts as in a
/// request from a request's complete header until its response is ready, an event stream's
/// until its body is gone. Not while any other body is written: a client that does not read
/// its answer would hold its place for good, with no permit to bound how many do. Every
/// answer but an event stream is counted in `load` until the connection has written it;
/// newer answers that need its room close the connection through its ticket.
async fn serve_connection<Io>(
    io: Io,
    app: Router,
    watcher: Watcher,
    ticket: &Ticket,
    load: Arc<HttpLoad>,
) where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let app = TowerToHyperService::new(app);
    let place = ticket.place();
    let cut = Arc::clone(&ticket.close);
    let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
        let busy = place.busy();
        // For the guard, to count the connection idle while the request waits for what no
        // permit bounds.
        request.extensions_mut().insert(place.clone());
        let response = hyper::service::Service::call(&app, request);
        let answers = (Arc::clone(&load), Arc::clone(&cut));
        async move {
            let response = response.await?;
            let (busy, lease) = if response.extensions().get::<Streaming>().is_some() {
                (Some(busy), None)
            } else {
                let (load, cut) = answers;
                let bytes = http_body::Body::size_hint(response.body()).lower();
                let lease = (bytes > 0).then(|| Arc::new(load.hold_answer(bytes, cut)));
                (None, lease)
            };
            Ok::<_, Infallible>(response.map(|body| Held {
                body,
                _busy: busy,
                lease,
            }))
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // Before any credentials are checked, a request's head is held whole: hyper's
        // default of about 400 KiB a connection let unauthenticated clients at the
        // connection cap hold more than the pod's memory limit. A scrape's head is a few
        // hundred bytes; a longer one gets 431.
        .max_buf_size(MAX_REQUEST_HEAD)
        .serve_connection(TokioIo::new(io), service);
    if let Err(err) = watcher.watch(connection).await {
        tracing::debug!("HTTP connection ended: {err}");
    }
}

/// A response body; an event stream's keeps its connection marked as in a request while it
/// lives, so that it is never taken for an idle one. Any other answer's data holds its lease
/// until the connection has written it.
struct Held {
    body: axum::body::Body,
    _busy: Option<Busy>,
    lease: Option<Arc<Lease>>,
}

impl http_body::Body for Held {
    type Data = <axum::body::Body as http_body::Body>::Data;
    type Error = <axum::body::Body as http_body::Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let held = self.get_mut();
        let frame = Pin::new(&mut held.body).poll_frame(cx);
        match &held.lease {
            Some(lease) => frame.map_ok(|frame| frame.map_data(|data| leased(data, lease))),
            None => frame,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Requests from one address in the queue for the password checks' turns at once; the
/// address's others wait behind them, in the order they came, within the request's time.
/// The turns go in the order asked, so wrong passwords sent on all of an address's
/// connections (80 by default) queued every other client's check behind theirs: at a bcrypt
/// cost of 12, about 250 ms a check, 20 s, past the request's time limit, and a scraper
/// whose password was not yet remembered (after a start or a reload of the users file) got
/// 503 for as long as the flood lasted.
const CHECKS_QUEUED_PER_ADDRESS: usize = 2;

/// The connections open, in all and per address, and which of them are in a request.
struct Admission {
    limits: ConnectionLimits,
    open: HashMap<u64, Open>,
    by_address: HashMap<IpAddr, usize>,
    /// Each address's places in the queue for the password checks' turns
    /// ([`CHECKS_QUEUED_PER_ADDRESS`]).
    check_queues: HashMap<IpAddr, Arc<tokio::sync::Semaphore>>,
    /// Counts up as connections open and fall idle: it names each connection, and the lowest
    /// `idle_since` is the connection that has waited longest for a request.
    clock: u64,
}

/// An open connection.
struct Open {
    address: IpAddr,
    /// Requests in progress (see [`serve_connection`]); 0 while it waits for a request's
    /// header (the first, or the next one kept alive) or its TLS handshake.
    requests: usize,
    /// `clock` when it last fell idle (or opened).
    idle_since: u64,
    /// Told when a new connection takes its place.
    close: Arc<tokio::sync::Notify>,
}

/// An admitted connection's place, given back when it is dropped.
struct Ticket {
    place: Place,
    /// Told when a new connection takes its place, or newer answers the room of the one it
    /// left untaken (`unsent_answers`).
    close: Arc<tokio::sync::Notify>,
}

/// Which connection, in which `Admission`.
#[derive(Clone)]
struct Place {
    admission: Arc<Mutex<Admission>>,
    id: u64,
    address: IpAddr,
}

/// A request in progress on a connection; it falls idle when the last is dropped.
struct Busy(Place);

/// A request that waits for a password check: its connection counts as idle until this is
/// dropped.
struct Waiting(Place);

impl Admission {
    fn new(limits: ConnectionLimits) -> Self {
        Self {
            limits,
            open: HashMap::new(),
            by_address: HashMap::new(),
            check_queues: HashMap::new(),
            clock: 0,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// A place for a new connection from `address`. At the address's cap, taken from that
    /// address's connection idle longest; at the cap in all, from the connection idle
    /// longest of the address holding the most. The one taken from is told to close; with
    /// none idle, the new connection is refused.
    fn admit(admission: &Arc<Mutex<Self>>, address: IpAddr) -> Option<Ticket> {
        let mut open = admission.lock().unwrap_or_else(PoisonError::into_inner);
        let from_address = open.by_address.get(&address).copied().unwrap_or(0);
        // A scan, not an ordered index: at most `max_connections`, and only at a cap.
        let taken = if from_address >= open.limits.per_address {
            // Not refused outright: the kubelet's probes come from the node's address, as does
            // everything else a hostNetwork pod or process on the node opens.
            Some(open.idlest(|connection| connection.address == address)?)
        } else if open.open.len() >= open.limits.total {
            Some(open.idlest_of_the_most_held()?)
        } else {
            None
        };
        if let Some(closed) = taken.and_then(|id| open.forget(id)) {
            closed.close.notify_one();
        }
        let id = open.tick();
        let close = Arc::new(tokio::sync::Notify::new());
        open.open.insert(
            id,
            Open {
                address,
                requests: 0,
                idle_since: id,
                close: Arc::clone(&close),
            },
        );
        *open.by_address.entry(address).or_default() += 1;
        Some(Ticket {
            place: Place {
                admission: Arc::clone(admission),
                id,
                address,
            },
            close,
        })
    }

    /// Of the connections `among` picks, the one that has waited longest for a request; none
    /// if every one of them is in a request.
    fn idlest(&self, among: impl Fn(&Open) -> bool) -> Option<u64> {
        self.open
            .iter()
            .filter(|(_, connection)| connection.requests == 0 && among(connection))
            .min_by_key(|(_, connection)| connection.idle_since)
            .map(|(id, _)| *id)
    }

    /// The connection that has waited longest for a request of the address holding the most
    /// connections (of those with one not in a request), the longest idle overall of
    /// addresses holding as many: a flood from a few addresses closes its own first, not a
    /// probe's or a scrape's older connection.
    fn idlest_of_the_most_held(&self) -> Option<u64> {
        self.open
            .iter()
            .filter(|(_, connection)| connection.requests == 0)
            .max_by_key(|(_, connection)| {
                let held = self.by_address.get(&connection.address).copied();
                (held, std::cmp::Reverse(connection.idle_since))
            })
            .map(|(id, _)| *id)
    }

    /// Counts a request in progress on connection `id`.
    fn enter_request(&mut self, id: u64) {
        if let Some(connection) = self.open.get_mut(&id) {
            connection.requests += 1;
        }
    }

    /// Counts a request on connection `id` as done; with none left, it falls idle now.
    fn leave_request(&mut self, id: u64) {
        let now = self.tick();
        if let Some(connection) = self.open.get_mut(&id) {
            connection.requests = connection.requests.saturating_sub(1);
            if connection.requests == 0 {
                connection.idle_since = now;
            }
        }
    }

    /// Gives a connection's place back.
    fn forget(&mut self, id: u64) -> Option<Open> {
        let closed = self.open.remove(&id)?;
        if let Some(count) = self.by_address.get_mut(&closed.address) {
            *count -= 1;
            if *count == 0 {
                self.by_address.remove(&closed.address);
            }
        }
        Some(closed)
    }
}

impl Ticket {
    fn place(&self) -> Place {
        self.place.clone()
    }

    /// Resolves when a new connection has taken this one's place, or newer answers the room
    /// of one it holds unsent.
    async fn closed(&self) {
        self.close.notified().await;
    }
}

impl Place {
    fn lock(&self) -> std::sync::MutexGuard<'_, Admission> {
        self.admission
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the connection as in a request until the result is dropped.
    fn busy(&self) -> Busy {
        self.lock().enter_request(self.id);
        Busy(self.clone())
    }

    /// Marks the connection's request, for as long as the result lives, as waiting for a
    /// password check: the connection counts as idle meanwhile, as no permit bounds how many
    /// wait.
    fn waiting(&self) -> Waiting {
        self.lock().leave_request(self.id);
        Waiting(self.clone())
    }

    /// One of its address's places in the queue for the password checks' turns, held until
    /// the result is dropped, once one is free; `None` if none is within `within`.
    async fn check_queue_place(
        &self,
        within: Duration,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let queue = {
            let mut admission = self.lock();
            // A queue nobody holds a place in or waits for is swept by the next request
            // that needs one: they are at most as many as the requests with checks.
            admission
                .check_queues
                .retain(|_, queue| Arc::strong_count(queue) > 1);
            Arc::clone(
                admission
                    .check_queues
                    .entry(self.address)
                    .or_insert_with(|| {
                        Arc::new(tokio::sync::Semaphore::new(CHECKS_QUEUED_PER_ADDRESS))
                    }),
            )
        };
        tokio::time::timeout(within, queue.acquire_owned())
            .await
            .ok()?
            .ok()
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.lock().leave_request(self.0.id);
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.lock().enter_request(self.0.id);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Already gone if a new connection took its place.
        self.place.lock().forget(self.place.id);
    }
}

/// Binds the listen address, saying what to do when it cannot be bound.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).map_err(|err| {
        anyhow::anyhow!("listening on {addr}: {err}: {}", bind_advice(addr, &err))
    })?;
    // tokio takes it over once the runtime runs.
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Refuses `addr` where a start could not bind it for want of its address here. Tried with a
/// UDP socket on port 0 (the kernel judges the address as for TCP, and a link-local one's
/// scope is kept): nothing listens, and the agent's own port is not in the way.
pub fn address_here(addr: SocketAddr) -> anyhow::Result<()> {
    let mut probe = addr;
    probe.set_port(0);
    match std::net::UdpSocket::bind(probe) {
        Err(err) if err.raw_os_error() == Some(libc::EADDRNOTAVAIL) => Err(anyhow::anyhow!(
            "listening on {addr}: {err}: {}",
            bind_advice(addr, &err)
        )),
        _ => Ok(()),
    }
}

/// What to do when the listen address cannot be bound (also `collector check`'s advice).
pub fn bind_advice(addr: SocketAddr, err: &std::io::Error) -> String {
    if err.kind() == std::io::ErrorKind::AddrInUse {
        "is another collector running? choose another port with `listen` or --listen".to_owned()
    } else if err.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
        format!(
            "no interface of this network namespace has {}; set `listen` (or --listen) to one of \
             its addresses",
            addr.ip()
        )
    } else if crate::privileges::denied(err) && addr.port() < 1024 {
        "ports below 1024 need CAP_NET_BIND_SERVICE; choose another".to_owned()
    } else {
        "choose another address with `listen` or --listen".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt as _;

    use super::*;
    use crate::{
        event_stream::{EventHub, StreamTerms},
        poller::SharedSnapshot,
    };

    fn admission(total: usize, per_address: usize) -> Arc<Mutex<Admission>> {
        Arc::new(Mutex::new(Admission::new(ConnectionLimits {
            total,
            per_address,
        })))
    }

    fn address(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn admit(admission: &Arc<Mutex<Admission>>, from: IpAddr) -> Ticket {
        Admission::admit(admission, from).expect("admitted")
    }

    /// Whether `ticket`'s connection lost its place and was told to close (asked once: the
    /// answer takes the notification).
    fn told_to_close(ticket: &Ticket) -> bool {
        let gone = !ticket.place.lock().open.contains_key(&ticket.place.id);
        let told = ticket.closed().now_or_never().is_some();
        assert_eq!(
            gone, told,
            "a place given away without telling its connection"
        );
        gone
    }

    /// With the default caps, one address (a node's, under hostNetwork) holding every
    /// request and event stream it may still has a place for its kubelet's probe. At 64 per
    /// address, the default until 2026-12-02, the probe was refused.
    #[test]
    fn the_default_caps_leave_a_probe_a_place_beside_every_request_from_its_address() {
        let http = crate::config::Config::from_toml("t.toml", "").unwrap().http;
        let busy_at_most = http.max_concurrent_requests + http.max_event_streams;
        let admission = admission(http.max_connections, http.max_connections_per_address);
        let node = address(1);
        let held: Vec<Ticket> = (0..busy_at_most).map(|_| admit(&admission, node)).collect();
        let _busy: Vec<Busy> = held.iter().map(|ticket| ticket.place().busy()).collect();
        let probe = Admission::admit(&admission, node);
        assert!(probe.is_some(), "the probe was refused");
        assert!(!held.iter().any(told_to_close));
    }

    #[test]
    fn at_an_addresss_cap_its_own_idlest_connection_gives_way() {
        let admission = admission(16, 3);
        let node = address(1);
        // Idle longer than any of the node's, but from elsewhere: not the node's to close.
        let elsewhere = admit(&admission, address(2));
        let [scrape, silent, probe] = [(); 3].map(|()| admit(&admission, node));
        let _scraping = scrape.place().busy();
        // The probe from the node's address: its idlest connection not in a request gives way.
        let next = admit(&admission, node);
        assert!(told_to_close(&silent));
        assert!(
            ![&elsewhere, &scrape, &probe, &next]
                .into_iter()
                .any(told_to_close)
        );
        // Every one of the node's in a request: the new one is refused, and no one is closed.
        let busy = [probe.place().busy(), next.place().busy()];
        assert!(Admission::admit(&admission, node).is_none());
        assert!(
            ![&elsewhere, &scrape, &probe, &next]
                .into_iter()
                .any(told_to_close)
        );
        // Others are not held to the node's cap.
        let _other = admit(&admission, address(3));
        // The first of them to fall idle is the next to give way.
        drop(busy);
        let _last = admit(&admission, node);
        assert!(told_to_close(&probe));
        assert!(![&elsewhere, &scrape, &next].into_iter().any(told_to_close));
    }

    #[test]
    fn a_connection_whose_request_waits_for_a_password_check_counts_as_idle() {
        let admission = admission(16, 2);
        let node = address(1);
        let [checking, scrape] = [(); 2].map(|()| admit(&admission, node));
        let _scraping = scrape.place().busy();
        let in_request = checking.place().busy();
        let waiting = checking.place().waiting();
        // No permit bounds the requests waiting for a check: their places are not held.
        let probe = admit(&admission, node);
        assert!(told_to_close(&checking));
        assert!(!told_to_close(&scrape));
        drop((waiting, in_request));
        // Back in its request after the check, a connection holds its place again.
        let in_request = probe.place().busy();
        drop(probe.place().waiting());
        assert!(Admission::admit(&admission, node).is_none());
        drop(in_request);
    }

    /// A file of the test's own, in a directory removed on drop.
    struct Scratch {
        path: std::path::PathBuf,
        _dir: crate::scratch::ScratchDir,
    }

    impl Scratch {
        fn new(name: &str, text: &str) -> Self {
            let dir = crate::scratch::ScratchDir::new(&format!("serve-{name}"));
            Self {
                path: dir.write("file", text),
                _dir: dir,
            }
        }
    }

    /// The agent's server on a port of loopback's, for a test.
    struct Serving {
        address: SocketAddr,
        /// The server's own, to see and hold its password checks.
        credentials: auth::Credentials,
        /// What it turned away, by limit.
        load: Arc<HttpLoad>,
        /// What it serves from.
        latest: Arc<SharedSnapshot>,
        server: tokio::task::JoinHandle<std::io::Result<()>>,
    }

    impl Drop for Serving {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    /// Serves with `users` (user `u`, password `pw`) and `token` (`tok`), and the limits of
    /// the embedded default as `limits` sets them.
    async fn serving(
        users: &Scratch,
        token: &Scratch,
        limits: impl FnOnce(&mut crate::config::HttpConfig),
    ) -> Serving {
        let mut http = crate::config::Config::embedded_default().http;
        http.basic_auth_users_file = Some(users.path.clone());
        http.bearer_token_file = Some(token.path.clone());
        limits(&mut http);
        let guard = Guard::from_config(&http).unwrap();
        let credentials = guard.credentials.clone();
        let load = Arc::clone(&guard.load);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let latest = Arc::new(SharedSnapshot::default());
        latest.store(crate::snapshot::Snapshot::default());
        let server = tokio::spawn(serve(
            listener,
            None,
            Sources {
                latest: Arc::clone(&latest),
                hub: EventHub::new(Vec::new(), None, StreamTerms::default()),
                liveness: Liveness::new(Duration::from_secs(1)),
            },
            guard,
            std::future::pending(),
        ));
        Serving {
            address,
            credentials,
            load,
            latest,
            server,
        }
    }

    /// The status of `GET path` with `authorization`, on a connection of its own.
    async fn status(address: SocketAddr, path: &str, authorization: Option<&str>) -> u16 {
        status_from([127, 0, 0, 1], address, path, authorization).await
    }

    /// [`status`] from the loopback address `from`.
    async fn status_from(
        from: [u8; 4],
        address: SocketAddr,
        path: &str,
        authorization: Option<&str>,
    ) -> u16 {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((from, 0))).unwrap();
        let mut stream = socket.connect(address).await.unwrap();
        let authorization =
            authorization.map_or(String::new(), |value| format!("Authorization: {value}\r\n"));
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: t\r\n{authorization}Connection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        let read = tokio::time::timeout(
            Duration::from_secs(30),
            stream.read_to_string(&mut response),
        )
        .await
        .expect("an answer within 30 s");
        // Closed unanswered (a reset, should anything be left unread): status 0.
        if read.is_err() {
            return 0;
        }
        response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0)
    }

    fn basic(user_password: &str) -> String {
        use base64::Engine as _;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_password)
        )
    }

    fn users(name: &str) -> Scratch {
        Scratch::new(
            &format!("users-{name}"),
            &format!("u:{}\n", bcrypt::hash("pw", 4).unwrap()),
        )
    }

    /// Only the probes' own paths go without credentials: no spelling of another path
    /// passes for one of theirs (the path is matched as sent, undecoded and unnormalised, as
    /// the router matches it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_spelling_of_a_path_passes_for_a_probes() {
        let (users, token) = (users("spelling"), Scratch::new("token-spelling", "tok\n"));
        let agent = serving(&users, &token, |_| {}).await;
        let address = agent.address;
        for path in ["/healthz", "/readyz", "/healthz?x=/metrics"] {
            assert_eq!(status(address, path, None).await, 200, "{path}");
        }
        for path in [
            "/metrics",
            "/healthz/../metrics",
            "/healthz/%2e%2e/metrics",
            "/healthz%2F..%2Fmetrics",
            "//metrics",
            "/./metrics",
            "/%6detrics",
            "/metrics?/healthz",
            "/metrics#/healthz",
            "/healthz/",
            "/HEALTHZ",
            "http://t/metrics",
            "/api/v1/events",
        ] {
            assert_eq!(status(address, path, None).await, 401, "{path}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn wrong_passwords_waiting_for_their_check_leave_scrapes_the_permits() {
        const PERMITS: usize = 2;
        const PATH: &str = "/api/v1/proxy";
        let (users, token) = (users("flood"), Scratch::new("token-flood", "tok\n"));
        let agent = serving(&users, &token, |http| {
            http.max_concurrent_requests = PERMITS;
            http.request_timeout = Duration::from_mins(1);
        })
        .await;
        let address = agent.address;
        let scraper = basic("u:pw");
        // Checked once, and remembered from then on.
        assert_eq!(status(address, PATH, Some(&scraper)).await, 200);
        // As many wrong passwords as there are permits, waiting for their check: the turns
        // are taken (by checks of yet other wrong passwords, say).
        let turns = agent.credentials.hold_password_turns();
        let wrong: Vec<_> = (0..PERMITS)
            .map(|_| {
                tokio::spawn(async move { status(address, PATH, Some(&basic("u:wrong"))).await })
            })
            .collect();
        wait_until_waiting(&agent.credentials, PERMITS).await;
        // The scraper's remembered password and the token are served meanwhile, as are the
        // probes.
        assert_eq!(status(address, PATH, Some(&scraper)).await, 200);
        assert_eq!(status(address, PATH, Some("Bearer tok")).await, 200);
        assert_eq!(status(address, "/healthz", None).await, 200);
        // The wrong ones are refused once checked.
        drop(turns);
        for wrong in wrong {
            assert_eq!(wrong.await.unwrap(), 401);
        }
    }

    /// Wrong passwords sent from one address on more connections than it has places in the
    /// queue for the checks' turns, and another address's password: every one is answered
    /// once the turns are free, none refused (the order is the unit test's below).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_address_queues_two_password_checks_at_once() {
        const PATH: &str = "/metrics";
        let (users, token) = (
            users("per-address"),
            Scratch::new("token-per-address", "tok\n"),
        );
        let agent = serving(&users, &token, |http| {
            http.request_timeout = Duration::from_mins(1);
        })
        .await;
        let address = agent.address;
        let turns = agent.credentials.hold_password_turns();
        let wrong: Vec<_> = (0..=CHECKS_QUEUED_PER_ADDRESS)
            .map(|_| {
                tokio::spawn(async move { status(address, PATH, Some(&basic("u:wrong"))).await })
            })
            .collect();
        wait_until_waiting(&agent.credentials, CHECKS_QUEUED_PER_ADDRESS).await;
        let scraper = tokio::spawn(async move {
            status_from([127, 0, 0, 2], address, PATH, Some(&basic("u:pw"))).await
        });
        wait_until_waiting(&agent.credentials, CHECKS_QUEUED_PER_ADDRESS + 1).await;
        drop(turns);
        assert_eq!(scraper.await.unwrap(), 200);
        for wrong in wrong {
            assert_eq!(wrong.await.unwrap(), 401);
        }
        assert_eq!(agent.load.refusals().filter(|&(_, n)| n > 0).count(), 0);
    }

    /// Three passwords from one address while the turns are held: each is answered 503 at the
    /// request's time limit, the third for want of a place in the queue, the others of a turn.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_password_that_gets_no_place_in_the_queue_in_time_is_answered_503() {
        let (users, token) = (users("no-place"), Scratch::new("token-no-place", "tok\n"));
        let agent = serving(&users, &token, |http| {
            http.request_timeout = Duration::from_millis(300);
        })
        .await;
        let address = agent.address;
        let turns = agent.credentials.hold_password_turns();
        let requests: Vec<_> = (0..=CHECKS_QUEUED_PER_ADDRESS)
            .map(|_| {
                tokio::spawn(async move { status(address, "/metrics", Some(&basic("u:pw"))).await })
            })
            .collect();
        for request in requests {
            assert_eq!(request.await.unwrap(), 503);
        }
        drop(turns);
        let refused: Vec<(Limit, u64)> = agent.load.refusals().filter(|&(_, n)| n > 0).collect();
        assert_eq!(refused, [(Limit::PasswordChecks, 3)]);
    }

    #[tokio::test]
    async fn an_address_holds_two_places_in_the_check_queue_and_its_others_wait_in_turn() {
        const NOW: Duration = Duration::from_millis(50);
        let admission = admission(16, 8);
        let (crowd, scraper) = (address(1), address(2));
        let from_crowd: Vec<Ticket> = (0..3).map(|_| admit(&admission, crowd)).collect();
        let scrape = admit(&admission, scraper);
        let first = from_crowd[0].place().check_queue_place(NOW).await.unwrap();
        let second = from_crowd[1].place().check_queue_place(NOW).await.unwrap();
        // The crowd's third waits for one of its two, not the scraper.
        assert!(from_crowd[2].place().check_queue_place(NOW).await.is_none());
        let scraping = scrape.place().check_queue_place(NOW).await.unwrap();
        let third = from_crowd[2].place();
        let third = tokio::spawn(async move {
            third
                .check_queue_place(Duration::from_secs(30))
                .await
                .is_some()
        });
        // Waiting, until one of the crowd's places is given back.
        tokio::task::yield_now().await;
        assert!(!third.is_finished());
        drop(first);
        assert!(third.await.unwrap());
        drop((second, scraping));
        // Queues nobody is in are swept by the next request that needs one.
        let _next = scrape.place().check_queue_place(NOW).await.unwrap();
        let queues: Vec<IpAddr> = admission
            .lock()
            .unwrap()
            .check_queues
            .keys()
            .copied()
            .collect();
        assert_eq!(queues, [scraper]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn connections_waiting_for_a_password_check_give_way_to_the_probes() {
        // The probe's address's whole share taken by requests waiting for their check, each
        // in the queue for the turns.
        const PER_ADDRESS: usize = 2;
        const _: () = assert!(PER_ADDRESS <= CHECKS_QUEUED_PER_ADDRESS);
        let (users, token) = (users("give-way"), Scratch::new("token-give-way", "tok\n"));
        let agent = serving(&users, &token, |http| {
            http.max_connections_per_address = PER_ADDRESS;
            http.request_timeout = Duration::from_mins(1);
        })
        .await;
        let address = agent.address;
        let turns = agent.credentials.hold_password_turns();
        let waiting: Vec<_> = (0..PER_ADDRESS)
            .map(|_| {
                tokio::spawn(
                    async move { status(address, "/metrics", Some(&basic("u:wrong"))).await },
                )
            })
            .collect();
        wait_until_waiting(&agent.credentials, PER_ADDRESS).await;
        assert_eq!(status(address, "/healthz", None).await, 200);
        // The one that waited longest was closed unanswered; the other is refused once
        // checked.
        drop(turns);
        let mut statuses = Vec::new();
        for request in waiting {
            statuses.push(request.await.unwrap());
        }
        statuses.sort_unstable();
        assert_eq!(statuses, [0, 401]);
    }

    /// Waits until `count` password checks wait for a turn.
    async fn wait_until_waiting(credentials: &auth::Credentials, count: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while credentials.password_checks_waiting() < count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the passwords never waited for their check"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_password_whose_check_gets_no_turn_within_the_request_timeout_is_answered_503() {
        let (users, token) = (users("busy"), Scratch::new("token-busy", "tok\n"));
        let agent = serving(&users, &token, |http| {
            http.request_timeout = Duration::from_millis(200);
        })
        .await;
        let _turns = agent.credentials.hold_password_turns();
        assert_eq!(
            status(agent.address, "/api/v1/proxy", Some(&basic("u:pw"))).await,
            503
        );
        assert_eq!(agent.credentials.password_checks_waiting(), 0);
        // Counted as a password that waited too long for its check, not as a slow answer.
        let refused: Vec<(Limit, u64)> = agent.load.refusals().filter(|&(_, n)| n > 0).collect();
        assert_eq!(refused, [(Limit::PasswordChecks, 1)]);
    }

    /// An open stream's password, judged again after the users file was read, gets no turn
    /// to be checked (wrong passwords keep the checks busy): the stream ends, where it
    /// streamed on for as long as they came, a revoked password included.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_whose_password_gets_no_turn_to_be_checked_again_ends() {
        let (users, token) = (users("stream"), Scratch::new("token-stream", "tok\n"));
        let agent = serving(&users, &token, |_| {}).await;
        let mut authorization = HeaderMap::new();
        authorization.insert(header::AUTHORIZATION, basic("u:pw").parse().unwrap());
        let turns = agent.credentials.hold_password_turns();
        let short = Duration::from_millis(200);
        assert!(!still_admitted(&agent.credentials, &authorization, short).await);
        drop(turns);
        let long = Duration::from_secs(10);
        assert!(still_admitted(&agent.credentials, &authorization, long).await);
    }

    /// Whether `accept` (one header value) gets OpenMetrics.
    fn openmetrics_for(accept: &str) -> bool {
        prefers_openmetrics(std::iter::once(accept))
    }

    #[test]
    fn the_metrics_format_is_the_one_with_the_highest_quality() {
        // Prometheus 2 and 3 as they send it: OpenMetrics first.
        assert!(openmetrics_for(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
             version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(openmetrics_for(
            "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,\
             application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;\
             escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
        ));
        // A scraper that prefers the classic text, listing OpenMetrics too.
        assert!(!openmetrics_for(
            "text/plain;version=0.0.4;q=1,application/openmetrics-text;version=1.0.0;q=0.5"
        ));
        assert!(!openmetrics_for(
            "application/openmetrics-text; q=0.2, text/plain; q=0.3"
        ));
        // A tie goes to OpenMetrics, as does the only one named.
        assert!(openmetrics_for(
            "text/plain;q=0.5, application/openmetrics-text;q=0.5"
        ));
        assert!(openmetrics_for("application/openmetrics-text"));
        assert!(openmetrics_for("Application/OpenMetrics-Text; Q=0.9"));
        // Refused outright, or not named: the classic text.
        assert!(!openmetrics_for("application/openmetrics-text;q=0"));
        assert!(!openmetrics_for("*/*"));
        assert!(!openmetrics_for("application/*"));
        assert!(!openmetrics_for("application/json"));
        assert!(!openmetrics_for(""));
        assert!(!prefers_openmetrics(std::iter::empty()));
        // The most specific range decides: OpenMetrics refused by name, not by `*/*`.
        assert!(!openmetrics_for("application/openmetrics-text;q=0, */*"));
        assert!(!openmetrics_for(
            "application/openmetrics-text;q=0.8, */*;q=0.9"
        ));
        assert!(openmetrics_for(
            "application/openmetrics-text;q=0.8, */*;q=0.9, text/plain;q=0.1"
        ));
        assert!(!openmetrics_for(
            "application/openmetrics-text;q=0.8, */*;q=0.1, text/*;q=0.9"
        ));
        // Values in several headers are one list.
        assert!(!prefers_openmetrics(
            ["application/openmetrics-text;q=0.4", "text/plain"].into_iter()
        ));
        // A malformed quality leaves its range out.
        assert!(!openmetrics_for(
            "application/openmetrics-text;q=high, text/plain;q=0.1"
        ));
    }

    #[test]
    fn qvalues_are_read_as_rfc_9110_writes_them() {
        for (text, thousandths) in [
            ("1", Some(1000)),
            ("1.", Some(1000)),
            ("1.000", Some(1000)),
            ("0", Some(0)),
            ("0.5", Some(500)),
            ("0.05", Some(50)),
            ("0.001", Some(1)),
            ("1.001", None),
            ("0.0001", None),
            ("2", None),
            ("-0.5", None),
            (".5", None),
            ("0.5x", None),
            ("", None),
        ] {
            assert_eq!(qvalue(text), thousandths, "{text:?}");
        }
    }

    #[test]
    fn health_fails_only_after_the_stall_limit_without_a_finished_poll() {
        assert_eq!(stall_limit(Duration::from_secs(1)), Duration::from_mins(1));
        assert_eq!(
            stall_limit(Duration::from_millis(100)),
            Duration::from_mins(1)
        );
        assert_eq!(stall_limit(Duration::from_secs(30)), Duration::from_mins(5));
        let liveness = Liveness::new(Duration::from_secs(1));
        let start = liveness.started;
        // Before the first poll the limit counts from the start.
        assert_eq!(liveness.stalled(start + Duration::from_mins(1)), None);
        assert_eq!(
            liveness.stalled(start + Duration::from_secs(61)),
            Some(Duration::from_secs(61))
        );
        liveness.polled_at(start + Duration::from_secs(50));
        assert_eq!(liveness.stalled(start + Duration::from_secs(110)), None);
        assert_eq!(
            liveness.stalled(start + Duration::from_secs(125)),
            Some(Duration::from_secs(75))
        );
        // A poll finishing comes back at once.
        liveness.polled_at(start + Duration::from_secs(125));
        assert_eq!(liveness.stalled(start + Duration::from_secs(125)), None);
    }

    /// The agent's router with no credentials, and its event hub.
    fn events_router() -> (Router, Arc<EventHub>) {
        let (app, hub, _) = router_before_the_first_poll();
        (app, hub)
    }

    /// The agent's router with no credentials, its event hub and its snapshot, unread.
    fn router_before_the_first_poll() -> (Router, Arc<EventHub>, Arc<SharedSnapshot>) {
        let http = crate::config::Config::embedded_default().http;
        let hub = EventHub::new(Vec::new(), None, StreamTerms::default());
        let latest = Arc::new(SharedSnapshot::default());
        let sources = Sources {
            latest: Arc::clone(&latest),
            hub: Arc::clone(&hub),
            liveness: Liveness::new(Duration::from_secs(1)),
        };
        (
            router(sources, Guard::from_config(&http).unwrap()),
            hub,
            latest,
        )
    }

    /// A request refused for want of a request's place says when to try again (places free
    /// up as requests end); one refused for want of a stream's place does not (a stream may
    /// last for hours).
    #[tokio::test]
    async fn a_refusal_for_want_of_room_says_when_to_try_again_where_it_can() {
        let mut http = crate::config::Config::embedded_default().http;
        http.max_concurrent_requests = 1;
        http.max_event_streams = 1;
        let guard = Guard::from_config(&http).unwrap();
        let sources = Sources {
            latest: Arc::new(SharedSnapshot::default()),
            hub: EventHub::new(Vec::new(), None, StreamTerms::default()),
            liveness: Liveness::new(Duration::from_secs(1)),
        };
        let app = TowerToHyperService::new(router(sources, guard.clone()));
        let get = |path: &'static str| {
            let request = axum::http::Request::get(path)
                .body(axum::body::Body::empty())
                .unwrap();
            hyper::service::Service::call(&app, request)
        };
        let stream = get("/api/v1/events").await.unwrap();
        assert_eq!(stream.status(), StatusCode::OK);
        let second = get("/api/v1/events").await.unwrap();
        assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(second.headers().get(header::RETRY_AFTER), None);
        // The stream gave its request's place back; held now, as a slow request would.
        let held = Arc::clone(&guard.permits).try_acquire_owned().unwrap();
        let refused = get("/api/v1/proxy").await.unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.headers()[header::RETRY_AFTER], "1");
        drop(held);
        assert_eq!(get("/api/v1/proxy").await.unwrap().status(), StatusCode::OK);
        // The stream's place comes back with the stream.
        drop(stream);
        assert_eq!(
            get("/api/v1/events").await.unwrap().status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn metrics_wait_for_the_first_read_of_the_kernel_maps() {
        let (app, _hub, latest) = router_before_the_first_poll();
        let app = TowerToHyperService::new(app);
        let scrape = || {
            let request = axum::http::Request::get("/metrics")
                .body(axum::body::Body::empty())
                .unwrap();
            hyper::service::Service::call(&app, request)
        };
        // Zeros now would read as a reset of the pinned counters a crashed run left.
        let response = scrape().await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        latest.store(crate::snapshot::Snapshot::default());
        let response = scrape().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }

    /// `ageMs` is the age of the figures served: counted from when the poll read the kernel
    /// maps (a poll's lists can take long after that on a large host), `null` before.
    #[tokio::test]
    async fn the_json_age_counts_from_the_read_of_the_kernel_maps() {
        let (app, _hub, latest) = router_before_the_first_poll();
        let app = TowerToHyperService::new(app);
        let age_ms = |path: &'static str| {
            let request = axum::http::Request::get(path)
                .body(axum::body::Body::empty())
                .unwrap();
            let response = hyper::service::Service::call(&app, request);
            async move {
                let body = axum::body::to_bytes(response.await.unwrap().into_body(), usize::MAX)
                    .await
                    .unwrap();
                serde_json::from_slice::<serde_json::Value>(&body).unwrap()["ageMs"].as_u64()
            }
        };
        assert_eq!(age_ms("/api/v1/dns").await, None);
        latest.store(crate::snapshot::Snapshot {
            read_at: Instant::now().checked_sub(Duration::from_secs(3)),
            ..crate::snapshot::Snapshot::example()
        });
        for path in ["/api/v1/proxy", "/api/v1/dns"] {
            let age = age_ms(path).await.unwrap();
            assert!((3000..60_000).contains(&age), "{path}: {age} ms");
        }
    }

    /// gzip where the client asks for it, on the exposition and the JSON, never on the event
    /// stream, whose lines would wait in the compressor; decompressed, the same text.
    #[tokio::test]
    async fn metrics_and_json_are_gzipped_when_asked_and_the_event_stream_never() {
        use std::io::Read as _;
        let (app, _hub, latest) = router_before_the_first_poll();
        latest.store(crate::snapshot::Snapshot::example());
        let app = TowerToHyperService::new(app);
        let get = |path: &str, gzip: bool| {
            let mut request = axum::http::Request::get(path);
            if gzip {
                request = request.header(header::ACCEPT_ENCODING, "gzip");
            }
            hyper::service::Service::call(&app, request.body(axum::body::Body::empty()).unwrap())
        };
        let body = |response: Response| async {
            axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap()
        };
        // Without what changes from one answer to the next: the process figures, the age of
        // the snapshot.
        let steady = |text: &str| -> Vec<String> {
            if let Ok(mut json) = serde_json::from_str::<serde_json::Value>(text) {
                json.as_object_mut().unwrap().remove("ageMs");
                return vec![json.to_string()];
            }
            text.lines()
                .filter(|line| !line.contains("process_"))
                .map(str::to_owned)
                .collect()
        };
        for path in ["/metrics", "/api/v1/proxy", "/api/v1/dns"] {
            let plain = get(path, false).await.unwrap();
            assert_eq!(
                plain.headers().get(header::CONTENT_ENCODING),
                None,
                "{path}"
            );
            let plain = String::from_utf8(body(plain).await.to_vec()).unwrap();
            let gzipped = get(path, true).await.unwrap();
            assert_eq!(gzipped.status(), StatusCode::OK, "{path}");
            assert_eq!(
                gzipped.headers()[header::CONTENT_ENCODING],
                "gzip",
                "{path}"
            );
            let vary = if path == "/metrics" {
                "accept, accept-encoding"
            } else {
                "accept-encoding"
            };
            assert_eq!(gzipped.headers()[header::VARY], vary, "{path}");
            let compressed = body(gzipped).await;
            let mut text = String::new();
            flate2::read::GzDecoder::new(&compressed[..])
                .read_to_string(&mut text)
                .unwrap();
            assert_eq!(steady(&text), steady(&plain), "{path}");
            if path == "/metrics" {
                assert!(
                    compressed.len() * 4 < plain.len(),
                    "{} bytes gzipped of {}",
                    compressed.len(),
                    plain.len()
                );
            }
        }
        for path in ["/api/v1/events", "/healthz"] {
            let response = get(path, true).await.unwrap();
            assert_eq!(
                response.headers().get(header::CONTENT_ENCODING),
                None,
                "{path}"
            );
        }
    }

    fn open(cookie: u64) -> crate::events::ConnRecord {
        crate::events::ConnRecord::Connection(crate::events::Connection {
            client: address(9),
            ..crate::events::Connection::opened_for_test(cookie)
        })
    }

    #[tokio::test]
    async fn an_event_stream_body_counts_what_its_reader_lost_and_never_took() {
        use crate::event_stream::CONNECTION_BACKLOG;
        use futures_util::StreamExt as _;
        let (app, hub) = events_router();
        let app = TowerToHyperService::new(app);
        let request = axum::http::Request::get("/api/v1/events")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = hyper::service::Service::call(&app, request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-cache");
        assert_eq!(response.headers()["x-accel-buffering"], "no");
        let mut body = response.into_body().into_data_stream();
        let mut line = async || -> serde_json::Value {
            let chunk = body.next().await.unwrap().unwrap();
            serde_json::from_slice(&chunk).unwrap()
        };
        let lagged = || hub.lagged.load(Ordering::Relaxed);
        let backlog = CONNECTION_BACKLOG as u64;
        // First, what the stream is made of.
        assert_eq!(line().await["event"], "start");

        // 5 beyond the backlog: a line says so, the counter agrees.
        for cookie in 0..backlog + 5 {
            hub.connections.send(open(cookie)).unwrap();
        }
        let lost = line().await;
        assert_eq!(
            (
                lost["event"].as_str(),
                lost["count"].as_u64(),
                lost["stream"].as_str()
            ),
            (Some("lost"), Some(5), Some("connections"))
        );
        assert_eq!(lagged(), 5);
        for cookie in 5..15 {
            assert_eq!(line().await["connectionId"], cookie);
        }
        // Behind again, and then gone (its reader killed, or cut off): what it never took
        // counts, though it never read far enough to learn it was behind.
        for cookie in 0..backlog + 7 {
            hub.connections.send(open(cookie)).unwrap();
        }
        drop(body);
        assert_eq!(lagged(), 5 + (backlog - 10) + (backlog + 7));
    }

    #[test]
    fn at_the_cap_in_all_the_address_holding_most_gives_way() {
        let admission = admission(6, 6);
        let (node, flood, other, new) = (address(1), address(2), address(3), address(4));
        // The probe's connection, between two probes (or in its TLS handshake): idle longest.
        let probe = admit(&admission, node);
        let flooding = [(); 3].map(|()| admit(&admission, flood));
        let others = [(); 2].map(|()| admit(&admission, other));
        // The flood's own connection goes, not the probe's older one.
        let first = admit(&admission, new);
        assert!(told_to_close(&flooding[0]));
        // Two addresses holding two each: the longer idle of theirs goes.
        let second = admit(&admission, new);
        assert!(told_to_close(&flooding[1]));
        assert!(
            ![&flooding[2], &others[0], &others[1]]
                .into_iter()
                .any(told_to_close)
        );
        // Of the addresses holding two, the one with a connection not in a request gives way.
        let _busy = others.each_ref().map(|ticket| ticket.place().busy());
        let _third = admit(&admission, address(5));
        assert!(told_to_close(&first));
        assert!(
            ![&probe, &flooding[2], &others[0], &others[1], &second]
                .into_iter()
                .any(told_to_close)
        );
    }

    #[test]
    fn accepted_connections_send_at_once_and_leave_little_unsent_in_the_kernel() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, peer) = listener.accept().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let _entered = runtime.enter();
        accepted.set_nonblocking(true).unwrap();
        let accepted = tokio::net::TcpStream::from_std(accepted).unwrap();
        tune_accepted(&accepted, peer);
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.tcp_nodelay().unwrap());
        assert_eq!(socket.tcp_notsent_lowat().unwrap(), KERNEL_UNSENT_MAX);
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(UNACKNOWLEDGED_TIMEOUT)
        );
    }

    /// A client that asked for `path` and then stopped reading: it has read the head, no
    /// more, through a receive buffer of 4 KiB.
    struct Stalled {
        stream: tokio::net::TcpStream,
        /// The answer's `Content-Length`.
        length: usize,
        /// Body bytes read with the head.
        read: usize,
    }

    impl Stalled {
        async fn ask(address: SocketAddr, path: &str) -> Self {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            let mut stream = socket.connect(address).await.unwrap();
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer tok\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut head = Vec::new();
            let end = loop {
                let mut buffer = [0; 1024];
                let read = stream.read(&mut buffer).await.unwrap();
                assert!(read > 0, "closed before the answer's head");
                head.extend_from_slice(&buffer[..read]);
                if let Some(end) = head.windows(4).position(|window| window == b"\r\n\r\n") {
                    break end + 4;
                }
            };
            let text = String::from_utf8_lossy(&head[..end]).to_lowercase();
            assert!(text.starts_with("http/1.1 200"), "{text}");
            let length = text
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .expect("a content-length")
                .trim()
                .parse()
                .unwrap();
            Self {
                stream,
                length,
                read: head.len() - end,
            }
        }

        /// Reads on until the answer is whole or the connection closes; the body bytes read
        /// in all.
        async fn read_on(mut self) -> usize {
            use tokio::io::AsyncReadExt as _;
            let mut buffer = vec![0; 64 * 1024];
            while self.read < self.length {
                let read =
                    tokio::time::timeout(Duration::from_secs(30), self.stream.read(&mut buffer))
                        .await
                        .expect("the rest of the answer, or the close, within 30 s")
                        .unwrap_or(0);
                if read == 0 {
                    break;
                }
                self.read += read;
            }
            self.read
        }
    }

    /// Bytes the kernel holds unsent or unacknowledged on the established connections whose
    /// local port is `port` (`/proc/net/tcp`'s `tx_queue`).
    fn kernel_send_queues(port: u16) -> Vec<u64> {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let local_port = fields[1].rsplit(':').next()?;
                let established = fields[3] == "01";
                (established && u16::from_str_radix(local_port, 16).ok()? == port).then(|| {
                    let (sending, _) = fields[4].split_once(':').unwrap();
                    u64::from_str_radix(sending, 16).unwrap()
                })
            })
            .collect()
    }

    /// Waits until the answers the agent holds unsent come to `bytes`.
    async fn wait_until_unsent(load: &HttpLoad, bytes: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while load.unsent_bytes() != bytes {
            assert!(
                tokio::time::Instant::now() < deadline,
                "answers held unsent: {} bytes, not {bytes}",
                load.unsent_bytes()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Clients that stop reading hold their answers in the agent, not in the kernel, and
    /// the answers held stay within `max_unsent_bytes`: the oldest gives way, its connection
    /// closed mid-answer and counted, and the newer ones are served whole. Before, each such
    /// client held its whole answer, in the kernel's send buffer up to 4 MiB: 512 of them
    /// 600 MB with 256 routes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_their_readers_leave_untaken_are_held_within_the_budget() {
        // About 1.1 MB of /metrics, as 256 routes make.
        let large = crate::snapshot::Snapshot {
            missing_interfaces: (0..20_000).map(|i| format!("missing-{i:05}")).collect(),
            ..Default::default()
        };
        let (users, token) = (users("unsent"), Scratch::new("token-unsent", "tok\n"));
        let measure = serving(&users, &token, |_| {}).await;
        measure.latest.store(large.clone());
        let answer = Stalled::ask(measure.address, "/metrics").await;
        let answer = answer.length as u64;
        drop(measure);
        // Room for two answers, not three.
        let agent = serving(&users, &token, |http| {
            http.max_unsent_bytes = answer * 5 / 2;
        })
        .await;
        agent.latest.store(large);
        let port = agent.address.port();
        let first = Stalled::ask(agent.address, "/metrics").await;
        let second = Stalled::ask(agent.address, "/metrics").await;
        let [first_length, second_length] = [&first, &second].map(|client| client.length as u64);
        wait_until_unsent(&agent.load, first_length + second_length).await;
        // The kernel holds a little of each, the agent the rest.
        for queued in kernel_send_queues(port) {
            assert!(queued < 128 * 1024, "{queued} bytes queued in the kernel");
        }
        let third = Stalled::ask(agent.address, "/metrics").await;
        let third_length = third.length as u64;
        wait_until_unsent(&agent.load, second_length + third_length).await;
        let refused: Vec<_> = agent.load.refusals().filter(|(_, n)| *n > 0).collect();
        assert_eq!(refused, [(Limit::UnsentBytes, 1)]);
        // The oldest was cut off mid-answer; the others are whole once read.
        let first_read = first.read_on().await as u64;
        assert!(first_read < first_length, "the oldest answer came whole");
        assert_eq!(second.read_on().await as u64, second_length);
        assert_eq!(third.read_on().await as u64, third_length);
        wait_until_unsent(&agent.load, 0).await;
    }
}
