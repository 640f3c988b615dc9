//! The CLI's HTTP exchange with a running agent: where to dial it, what HTTPS trusts, the
//! bearer token, and errors that name their fix. hyper's HTTP/1 client on a connection of our
//! own (plain, or rustls with the agent's certificate), so that answers come in HTTP/1.1 or
//! HTTP/1.0, their bodies chunked, of a length or ended with the connection, as a proxy in
//! between may pass them on; the first bytes the agent sent are kept to say what answered
//! when it was not HTTP.
//!
//! A failure names its fix: a certificate not trusted (`--cacert`), a CA certificate served
//! as the agent's own, plain HTTP to an HTTPS agent (`--config`, `--cacert`), credentials
//! wanted or refused (`--config`, whose token the CLI sends), a refusal's reason as the
//! agent words it.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Body as _;
use hyper::{StatusCode, body::Incoming, header};
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, TrustAnchor, pem::PemObject as _},
};
use serde_json::Value;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::config::Config;

/// Where a running agent listens and how to talk to it: HTTPS and the bearer token when its
/// config has them (basic-auth users are hashes: nothing the CLI could send).
pub struct Endpoint {
    /// The address dialled first.
    first: SocketAddr,
    /// Dialled where `first` cannot be (see [`ipv4_fallback`]).
    fallback: Option<SocketAddr>,
    /// The address a connection was made to, once one was: named in requests and errors.
    reached: OnceLock<SocketAddr>,
    tls: Option<Arc<ClientConfig>>,
    /// The PEM files `tls` trusts, for the errors.
    trusted: Vec<PathBuf>,
    /// What the agent's certificate must name (`--server-name`); its address if not given.
    server_name: Option<ServerName<'static>>,
    /// The bearer token, and the file it was read from.
    token: Option<(String, PathBuf)>,
    /// Runs the exchanges, one at a time: the CLI waits for each.
    runtime: tokio::runtime::Runtime,
}

/// The file beside the served certificate that holds the CA which issued it, as Kubernetes
/// `kubernetes.io/tls` Secrets from cert-manager carry it.
const CA_BESIDE_CERT: &str = "ca.crt";

/// How long the CLI waits for the agent to accept: an agent that is stopped, or an address
/// that drops packets, is an error in seconds rather than after the kernel's SYN retries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long it waits for the TLS handshake, for the answer's head once the request is sent,
/// and for each of the body's reads (the event stream, which may stay quiet, waits three of
/// its heartbeats instead).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A PEM file HTTPS trusts, and the certificates in it.
type Trusted = (PathBuf, Vec<TrustAnchor<'static>>);

/// Most bytes of an answer's head taken (hyper's buffer): a head that looks like HTTP and
/// never ends is refused there (what does not look like HTTP is, at its first byte).
const MAX_HEAD: usize = 64 * 1024;

/// How much of an unexpected status line an error shows.
const SHOWN_STATUS_CHARS: usize = 120;

/// The first bytes of the agent's answer kept for an error: more than [`SHOWN_STATUS_CHARS`]
/// of UTF-8.
const KEPT_FIRST_BYTES: usize = 1024;

/// How much of a refusal's body is its reason.
const MAX_REASON: usize = 1024;

impl Endpoint {
    /// `listen` overrides the config's address; `cacert` (PEM) is what HTTPS trusts, by
    /// default the agent's own certificate file and the `ca.crt` beside it if there is one;
    /// `server_name` is the name its certificate is checked against instead of the address
    /// (a certificate shared by a daemon set names a service, not every node).
    pub fn new(
        listen: Option<SocketAddr>,
        config: Option<&Config>,
        cacert: Option<&Path>,
        server_name: Option<&str>,
    ) -> anyhow::Result<Self> {
        let listen = listen_address(listen, config);
        let server_name = match server_name {
            Some(name) => Some(
                ServerName::try_from(name.to_owned())
                    .with_context(|| format!("--server-name {name}: not a DNS name or address"))?,
            ),
            None => None,
        };
        let served_cert = config
            .and_then(|config| config.http.tls.as_ref())
            .map(|tls| tls.cert.as_path());
        let pems: Vec<Trusted> = match (cacert, served_cert) {
            (Some(cacert), _) => vec![read_cacert(cacert)?],
            (None, Some(cert)) => {
                let mut pems = vec![read_pem(cert).map_err(|err| {
                    unreadable_here(
                        err,
                        "this user cannot read the agent's certificate, which the CLI trusts: \
                         pass --cacert with a CA certificate it can read, or run as root",
                    )
                })?];
                match ca_beside(cert) {
                    Ok(ca) => pems.extend(ca),
                    Err(warning) => tracing::warn!("{warning}"),
                }
                pems
            }
            (None, None) => Vec::new(),
        };
        let tls = if pems.is_empty() {
            None
        } else {
            Some(client_config(&pems)?)
        };
        let trusted = pems.into_iter().map(|(path, _)| path).collect();
        let token = match config.and_then(|config| config.http.bearer_token_file.as_ref()) {
            // Read as the agent reads it: what the agent refuses, the CLI does not send.
            Some(path) => Some((
                crate::auth::read_token(path).map_err(|err| {
                    unreadable_here(
                        err,
                        "this user cannot read the agent's bearer token file, which the CLI \
                         sends: run as root, or as a user the file is readable by",
                    )
                })?,
                path.clone(),
            )),
            None => None,
        };
        Ok(Self {
            first: dialled(listen),
            fallback: ipv4_fallback(listen),
            reached: OnceLock::new(),
            tls,
            trusted,
            server_name,
            token,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?,
        })
    }

    /// The agent's address: where a connection was made, else where one is tried first.
    pub fn addr(&self) -> SocketAddr {
        self.reached.get().copied().unwrap_or(self.first)
    }

    /// What the agent's certificate must name: `--server-name`, else the address reached.
    fn server_name(&self) -> ServerName<'static> {
        self.server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(self.addr().ip().into()))
    }

    /// Connects to the agent, at the fallback where the first address cannot be dialled for
    /// want of IPv6 here (not where the agent refuses or does not answer: that is said).
    async fn dial(&self) -> anyhow::Result<TcpStream> {
        const ADVICE: &str = "is it running? see --listen and --config";
        let first = self.first;
        let err = match connect_within(first).await {
            Ok(tcp) => {
                let _ = self.reached.set(first);
                return Ok(tcp);
            }
            Err(err) => err,
        };
        let no_ipv6 = matches!(
            err.kind(),
            std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::NetworkUnreachable
        );
        let Some(fallback) = self.fallback.filter(|_| no_ipv6) else {
            return Err(err)
                .with_context(|| format!("connecting to the collector at {first} ({ADVICE})"));
        };
        match connect_within(fallback).await {
            Ok(tcp) => {
                let _ = self.reached.set(fallback);
                Ok(tcp)
            }
            Err(fallback_err) => Err(fallback_err).with_context(|| {
                format!("connecting to the collector at {fallback} ({first}: {err}; {ADVICE})")
            }),
        }
    }

    /// A connection to the agent, in TLS where it serves HTTPS.
    async fn connect(&self) -> anyhow::Result<Box<dyn Connection>> {
        let tcp = self.dial().await?;
        let Some(config) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let handshake =
            tokio_rustls::TlsConnector::from(Arc::clone(config)).connect(self.server_name(), tcp);
        match tokio::time::timeout(ANSWER_TIMEOUT, handshake).await {
            Ok(Ok(tls)) => Ok(Box::new(tls)),
            Ok(Err(err)) => Err(self.explain(err).context(format!(
                "TLS handshake with the collector at {}",
                self.addr()
            ))),
            Err(_) => Err(self.silent()),
        }
    }

    /// A GET request for `path`, with the credentials and `accept` if given.
    fn request(
        &self,
        path: &str,
        accept: Option<&str>,
    ) -> anyhow::Result<hyper::Request<Empty<Bytes>>> {
        let mut request = hyper::Request::get(path)
            .header(header::HOST, self.addr().to_string())
            // One request a connection: nothing to keep it open for.
            .header(header::CONNECTION, "close");
        if let Some(accept) = accept {
            request = request.header(header::ACCEPT, accept);
        }
        if let Some((token, file)) = &self.token {
            request = request.header(
                header::AUTHORIZATION,
                format!("Bearer {}", current_token(token, file)),
            );
        }
        request
            .body(Empty::new())
            .with_context(|| format!("building the request for {path}"))
    }

    /// GET `path` (`accept`: what to ask for, if anything) on a connection of its own: the
    /// answer once its head has come and says 200; otherwise what answered and the fix.
    pub fn get(&self, path: &str, accept: Option<&str>) -> anyhow::Result<Answer<'_>> {
        self.runtime.block_on(async {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let connection = FirstBytesKept {
                inner: self.connect().await?,
                seen: Arc::clone(&seen),
                full: false,
            };
            // After the connection: its Host is the address reached (the fallback's, maybe).
            let request = self.request(path, accept)?;
            let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
                .max_buf_size(MAX_HEAD)
                .handshake(TokioIo::new(connection))
                .await
                .context("starting HTTP")?;
            // Reads and writes the connection while the answer is awaited and read; its
            // errors reach them.
            tokio::spawn(connection);
            let response =
                match tokio::time::timeout(ANSWER_TIMEOUT, sender.send_request(request)).await {
                    Err(_) => return Err(self.silent()),
                    Ok(Err(err)) => {
                        let seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                        return Err(self.no_answer(err, &seen));
                    }
                    Ok(Ok(response)) => response,
                };
            let (head, body) = response.into_parts();
            // hyper's own judgement: a length it reads to, else chunked as its rule has it.
            let length = body.size_hint().exact();
            let mut answer = Answer {
                agent: self,
                chunked: length.is_none() && is_chunked(&head.headers),
                length,
                body,
            };
            if head.status != StatusCode::OK {
                // An HTTP refusal's body says why (503: which cap the agent reached).
                let (reason, _) = answer.read_up_to(MAX_REASON).await;
                self.check_status(
                    status_line(&head).as_bytes(),
                    reason_text(&reason).as_deref(),
                )?;
            }
            Ok(answer)
        })
    }

    /// GET `path` and parse its JSON body.
    pub fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let mut answer = self.get(path, None)?;
        let (body, failure) = self.runtime.block_on(answer.read_up_to(usize::MAX));
        let cut = |err: anyhow::Error| {
            err.context(format!(
                "reading the answer of the collector at {}",
                self.addr()
            ))
        };
        match failure {
            None => {}
            Some(ReadFailure::Silent) => return Err(self.silent()),
            Some(ReadFailure::Closed(err) | ReadFailure::Reset(err)) if answer.length.is_some() => {
                return Err(cut(err).context(format!(
                    "the collector at {} ended its answer after {} of its {} bytes",
                    self.addr(),
                    body.len(),
                    answer.length.unwrap_or_default()
                )));
            }
            // A body that ends with the connection, closed: the whole body (a TLS peer that
            // closes without close_notify reads so). A chunked body has its own end, and is
            // not whole without it.
            Some(ReadFailure::Closed(_)) if !answer.chunked => {}
            Some(ReadFailure::Closed(err) | ReadFailure::Reset(err) | ReadFailure::Failed(err)) => {
                return Err(cut(err));
            }
        }
        serde_json::from_slice(&body).context("the collector's answer is not JSON")
    }

    /// The error of an answer that did not come within [`ANSWER_TIMEOUT`].
    fn silent(&self) -> anyhow::Error {
        anyhow::anyhow!(
            "the collector at {} did not answer within {} s (is it stopped, or is this not the \
             collector?)",
            self.addr(),
            ANSWER_TIMEOUT.as_secs()
        )
    }

    /// Why no answer came, `seen` being the first bytes the agent sent: what answered where
    /// it was not HTTP, or an answer cut short, with the fix.
    fn no_answer(&self, err: hyper::Error, seen: &[u8]) -> anyhow::Error {
        use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, UnexpectedEof};
        // Closed (a TLS peer without close_notify reads so), reset (closed with the request
        // unread) or cut short: judged by what it sent, if anything. Closed before hyper wrote
        // the request: canceled. (A reset inside a body is told from a close, see `failure`:
        // there the close may be a body's end.)
        let closed = err.is_incomplete_message()
            || err.is_canceled()
            || cause::<std::io::Error>(&err).is_some_and(|io| {
                matches!(
                    io.kind(),
                    UnexpectedEof | ConnectionReset | ConnectionAborted
                )
            });
        if err.is_parse() || closed {
            let first_line = seen
                .iter()
                .position(|&byte| byte == b'\n')
                .map_or(seen, |end| &seen[..=end]);
            if let Err(refusal) = self.check_status(first_line, None) {
                return refusal;
            }
        }
        self.explain(err).context(format!(
            "reading the head of the answer of the collector at {}",
            self.addr()
        ))
    }

    /// Whether `status` (the reply's first line) is a 200; otherwise why not (with `reason`,
    /// what the body of the answer said), and the fix.
    fn check_status(&self, status: &[u8], reason: Option<&str>) -> anyhow::Result<()> {
        let addr = self.addr();
        if is_ok(status) {
            return Ok(());
        }
        if self.tls.is_none() && looks_like_tls(status) {
            bail!(
                "the collector at {addr} answered in TLS: the agent serves HTTPS; pass --config \
                 FILE (the agent's config: its certificate, and its bearer token), or --cacert \
                 CA.pem"
            );
        }
        if status.is_empty() {
            bail!(
                "the collector at {addr} closed the connection without an answer{}",
                if self.tls.is_none() {
                    " (does it serve HTTPS? then pass --config FILE, the agent's config, or \
                     --cacert CA.pem)"
                } else {
                    ""
                }
            );
        }
        let line = String::from_utf8_lossy(status);
        let mut line = line.trim_end().to_owned();
        // Not HTTP, or a status line no agent sends: enough of it to tell what answered.
        if let Some((cut, _)) = line.char_indices().nth(SHOWN_STATUS_CHARS) {
            line.truncate(cut);
            line.push('…');
        }
        if line.starts_with("HTTP/1.1 401") || line.starts_with("HTTP/1.0 401") {
            match &self.token {
                None => bail!(
                    "the collector at {addr} answered {line}: it wants credentials; pass --config \
                     FILE, the agent's config, whose bearer_token_file the CLI sends (basic-auth \
                     users are hashes, nothing the CLI could send)"
                ),
                Some((_, file)) => bail!(
                    "the collector at {addr} answered {line}: it refused the bearer token from {} \
                     (is --config the agent's own config, and the token file current?)",
                    file.display()
                ),
            }
        }
        let Some(reason) = reason else {
            bail!("the collector at {addr} answered {line}")
        };
        let setting = [
            ("event streams", "max_event_streams"),
            ("requests at once", "max_concurrent_requests"),
        ]
        .into_iter()
        .find(|(said, _)| reason.contains(said))
        .map_or(String::new(), |(_, key)| {
            format!(" (the agent's [http] {key}; try again later)")
        });
        bail!("the collector at {addr} answered {line}: {reason}{setting}")
    }

    /// An error of the exchange, with the fix when TLS refused the agent's certificate or
    /// the agent did not answer in TLS.
    fn explain(&self, err: impl Into<anyhow::Error>) -> anyhow::Error {
        let err = err.into();
        let why = cause::<rustls::Error>(err.as_ref())
            .and_then(|tls| tls_advice(tls, &self.trusted, &self.server_name()));
        match why {
            Some(why) => err.context(why),
            None => err,
        }
    }
}

/// `head`'s status line as the agent would have sent it, for the errors.
fn status_line(head: &hyper::http::response::Parts) -> String {
    let reason = head
        .extensions
        .get::<hyper::ext::ReasonPhrase>()
        .map_or_else(
            || {
                head.status
                    .canonical_reason()
                    .unwrap_or_default()
                    .to_owned()
            },
            |reason| String::from_utf8_lossy(reason.as_bytes()).into_owned(),
        );
    format!("{:?} {} {reason}", head.version, head.status.as_u16())
}

/// Whether hyper decodes a body without a length as chunked, by its own rule: the last
/// coding of the last `Transfer-Encoding` line. Then the body has an end of its own, which one
/// cut off lacks; otherwise it ends with the connection.
fn is_chunked(headers: &header::HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|line| line.to_str().ok())
        .and_then(|line| line.rsplit(',').next())
        .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"))
}

/// The first error of type `T` in `err`'s chain, looking inside I/O errors too (whose
/// `source` is their inner error's source, not the inner error).
fn cause<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        next = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

/// A 200 answer being read.
pub struct Answer<'a> {
    agent: &'a Endpoint,
    body: Incoming,
    /// The body comes chunked: it has an end of its own.
    chunked: bool,
    /// Its Content-Length, if it has one.
    length: Option<u64>,
}

/// Why a body's next bytes did not come.
pub enum ReadFailure {
    /// Nothing came within the wait.
    Silent,
    /// The connection closed before the body's end (a body that ends with the connection
    /// reads so where a TLS peer closes without `close_notify`).
    Closed(anyhow::Error),
    /// The connection was reset or aborted.
    Reset(anyhow::Error),
    /// Anything else: a TLS error, a malformed chunk.
    Failed(anyhow::Error),
}

impl Answer<'_> {
    /// Whether the body comes chunked, with an end of its own.
    pub const fn chunked(&self) -> bool {
        self.chunked
    }

    /// The body's next bytes, waiting at most `wait` for them; `None` at its end.
    pub fn next(&mut self, wait: Duration) -> Result<Option<Bytes>, ReadFailure> {
        let agent = self.agent;
        agent.runtime.block_on(self.next_within(wait))
    }

    async fn next_within(&mut self, wait: Duration) -> Result<Option<Bytes>, ReadFailure> {
        loop {
            let frame = match tokio::time::timeout(wait, self.body.frame()).await {
                Err(_) => return Err(ReadFailure::Silent),
                Ok(None) => return Ok(None),
                Ok(Some(Err(err))) => return Err(self.failure(err)),
                Ok(Some(Ok(frame))) => frame,
            };
            // Trailer fields (a proxy's) are passed over.
            if let Ok(data) = frame.into_data()
                && !data.is_empty()
            {
                return Ok(Some(data));
            }
        }
    }

    fn failure(&self, err: hyper::Error) -> ReadFailure {
        use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, UnexpectedEof};
        let kind = cause::<std::io::Error>(&err).map(std::io::Error::kind);
        let closed = err.is_incomplete_message() || kind == Some(UnexpectedEof);
        let reset = matches!(kind, Some(ConnectionReset | ConnectionAborted));
        let err = self.agent.explain(err);
        if closed {
            ReadFailure::Closed(err)
        } else if reset {
            ReadFailure::Reset(err)
        } else {
            ReadFailure::Failed(err)
        }
    }

    /// The body's bytes up to `limit` (or a little past it), each read waiting at most
    /// [`ANSWER_TIMEOUT`], and the failure that ended them before the body's end, if one did.
    async fn read_up_to(&mut self, limit: usize) -> (Vec<u8>, Option<ReadFailure>) {
        let mut body = Vec::new();
        while body.len() < limit {
            match self.next_within(ANSWER_TIMEOUT).await {
                Ok(Some(bytes)) => body.extend_from_slice(&bytes),
                Ok(None) => break,
                Err(failure) => return (body, Some(failure)),
            }
        }
        (body, None)
    }
}

/// A refusal's body as its reason: its first KiB on one line; `None` if empty.
fn reason_text(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_REASON)]);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    (!text.is_empty()).then_some(text)
}

/// A plain or TLS connection to the agent.
trait Connection: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Connection for T {}

/// Connects to `addr`, giving up after [`CONNECT_TIMEOUT`].
async fn connect_within(addr: SocketAddr) -> std::io::Result<TcpStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            ))
        })
}

/// The connection to the agent, keeping a copy of the first bytes read from it: what
/// answered, for the error, where it was not HTTP (a TLS alert, another service).
struct FirstBytesKept {
    inner: Box<dyn Connection>,
    seen: Arc<Mutex<Vec<u8>>>,
    /// [`KEPT_FIRST_BYTES`] are kept: a stream's later reads take no lock.
    full: bool,
}

impl AsyncRead for FirstBytesKept {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if !this.full {
            let mut seen = this.seen.lock().unwrap_or_else(PoisonError::into_inner);
            let room = KEPT_FIRST_BYTES.saturating_sub(seen.len());
            let read = &buf.filled()[before..];
            seen.extend_from_slice(&read[..read.len().min(room)]);
            this.full = seen.len() == KEPT_FIRST_BYTES;
        }
        polled
    }
}

impl AsyncWrite for FirstBytesKept {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The token in `file` now, read again for each request: a watch (`--watch`, `top`) outlives
/// a rotation of the Secret, which the agent takes without a restart. What was read at the
/// start if the file cannot be read now or is refused (empty in a rotation half done, or a
/// second token appended), as the agent keeps its previous token then.
fn current_token(first: &str, file: &Path) -> String {
    crate::auth::read_token(file).unwrap_or_else(|_| first.to_owned())
}

fn is_ok(status: &[u8]) -> bool {
    let mut fields = status
        .split(u8::is_ascii_whitespace)
        .filter(|f| !f.is_empty());
    matches!(fields.next(), Some(b"HTTP/1.1" | b"HTTP/1.0")) && fields.next() == Some(b"200")
}

/// Whether `bytes` begin a TLS record (handshake or alert, TLS 1.0 to 1.3): what an HTTPS
/// server sends to a plain HTTP request.
fn looks_like_tls(bytes: &[u8]) -> bool {
    matches!(bytes, [0x15 | 0x16, 0x03, 0x00..=0x04, ..])
}

/// What to do about a TLS error, for those with a fix to name.
fn tls_advice(err: &rustls::Error, trusted: &[PathBuf], name: &ServerName<'_>) -> Option<String> {
    use rustls::{CertificateError, InvalidMessage};
    let trusted = trusted
        .iter()
        .map(|path| path.display().to_string())
        .collect::<Vec<_>>()
        .join(" and ");
    match err {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => Some(format!(
            "the agent's certificate was not issued by a certificate trusted here ({trusted}): \
             pass --cacert CA.pem, the CA that signed it (cert-manager's Secrets carry it as \
             ca.crt, which is trusted without --cacert when it lies beside the config's \
             tls_cert_file)"
        )),
        rustls::Error::InvalidCertificate(CertificateError::Other(other))
            if other.to_string().contains("CaUsedAsEndEntity") =>
        {
            Some(
                "the agent serves a CA certificate (basicConstraints CA:TRUE, which `openssl req \
                 -x509` gives by default) as its own, and TLS clients such as this one refuse \
                 it: serve a certificate a CA issued and pass --cacert CA.pem, the CA that \
                 signed it, or make the self-signed one with `-addext \
                 basicConstraints=critical,CA:FALSE`"
                    .to_owned(),
            )
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => Some(format!(
            "the agent's certificate does not name {}: pass --server-name NAME, a name it \
             carries",
            server_name_text(name)
        )),
        rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType) => Some(
            "the agent did not answer in TLS: does it serve plain HTTP? (then its config has no \
             tls_cert_file, and no --cacert is needed)"
                .to_owned(),
        ),
        _ => None,
    }
}

fn server_name_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(dns) => dns.as_ref().to_owned(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        _ => format!("{name:?}"),
    }
}

/// The certificates of the PEM text `text`, as trust anchors; sections of other kinds (a
/// key) are passed over.
fn anchors(text: &[u8]) -> anyhow::Result<Vec<TrustAnchor<'static>>> {
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(text) {
        store
            .add(cert.context("malformed PEM")?)
            .context("a certificate that cannot be trusted")?;
    }
    Ok(store.roots)
}

/// `err` with `advice` where a file was refused to this process: an SRE's own account
/// reading files the agent (root) reads.
fn unreadable_here(err: anyhow::Error, advice: &str) -> anyhow::Error {
    if crate::privileges::denied_in(&err) {
        err.context(advice.to_owned())
    } else {
        err
    }
}

/// A PEM file the CLI was told to trust (`--cacert`, the config's `tls_cert_file`), read and
/// parsed.
fn read_pem(path: &Path) -> anyhow::Result<Trusted> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let anchors = anchors(&text).with_context(|| format!("reading {}", path.display()))?;
    Ok((path.to_owned(), anchors))
}

/// The `--cacert` file, which must hold a certificate: a key or a DER file trusts nothing,
/// and the refusal that followed blamed the agent's certificate.
fn read_cacert(path: &Path) -> anyhow::Result<Trusted> {
    let trusted = read_pem(path)?;
    anyhow::ensure!(
        !trusted.1.is_empty(),
        "--cacert {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        path.display()
    );
    Ok(trusted)
}

/// The [`CA_BESIDE_CERT`] beside the served certificate `cert`, read and parsed: `None` if
/// there is none, or it is empty. One that is there but cannot be read, or holds no
/// certificate that parses, is an `Err`, the warning to give: the CLI goes on without it (the
/// agent's certificate may be self-signed, and trusted without it), and an "unknown issuer"
/// refusal that follows then has its cause said.
fn ca_beside(cert: &Path) -> Result<Option<Trusted>, String> {
    let ca = cert.with_file_name(CA_BESIDE_CERT);
    let not_trusting = |why: String, fix: &str| {
        format!(
            "not trusting {}, beside the config's tls_cert_file: {why}; an agent certificate it \
             issued is refused ({fix}, or pass --cacert CA.pem)",
            ca.display()
        )
    };
    let text = match std::fs::read(&ca) {
        Ok(text) => text,
        // A dangling symbolic link too: a Secret without the key.
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(not_trusting(
                format!("it cannot be read ({err})"),
                "make it readable to this user",
            ));
        }
    };
    // Nothing to trust, as a Secret of an issuer without a CA of its own may carry it.
    if text.trim_ascii().is_empty() {
        return Ok(None);
    }
    match anchors(&text) {
        Ok(anchors) if anchors.is_empty() => Err(not_trusting(
            "it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned(),
            "fix the file",
        )),
        Ok(anchors) => Ok(Some((ca, anchors))),
        Err(err) => Err(not_trusting(
            format!("it does not parse as PEM certificates ({err:#})"),
            "fix the file",
        )),
    }
}

/// Trusts the certificates of the PEM files `pems` (the agent's own, for a self-signed one,
/// and its CA).
fn client_config(pems: &[Trusted]) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for (_, anchors) in pems {
        roots.extend(anchors.iter().cloned());
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("choosing the TLS versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The address the agent is dialled at: `listen` (a flag's or a variable's), else the
/// config's, else the default's.
pub fn agent_address(listen: Option<SocketAddr>, config: Option<&Config>) -> SocketAddr {
    dialled(listen_address(listen, config))
}

/// The address the agent listens on: `listen`, else the config's, else the default's.
fn listen_address(listen: Option<SocketAddr>, config: Option<&Config>) -> SocketAddr {
    listen
        .or(config.map(|config| config.listen))
        .unwrap_or_else(|| Config::embedded_default().listen)
}

/// Where an agent listening on every IPv6 address (`[::]`, which Linux makes dual-stack) is
/// dialled when `::1` cannot be: loopback without IPv6, as in a pod with
/// `net.ipv6.conf.all.disable_ipv6 = 1`, where the agent still takes IPv4 clients.
fn ipv4_fallback(listen: SocketAddr) -> Option<SocketAddr> {
    match listen.ip() {
        IpAddr::V6(ip) if ip.is_unspecified() => Some((Ipv4Addr::LOCALHOST, listen.port()).into()),
        _ => None,
    }
}

/// The address to dial for a listen address: an agent listening on every address
/// (`0.0.0.0`, `::`) is reached on loopback.
fn dialled(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, listen.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, listen.port()).into(),
        _ => listen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::ScratchDir;

    #[test]
    fn a_file_to_trust_without_a_certificate_is_refused() {
        let scratch = ScratchDir::new("no-cert");
        let path = scratch.write(
            "ca.crt",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        let err = read_cacert(&path).map(|_| ()).unwrap_err();
        assert!(
            format!("{err:#}").contains("holds no PEM certificate"),
            "{err:#}"
        );
    }

    #[test]
    fn an_agent_on_every_address_is_dialled_on_loopback() {
        let dialled = |listen: &str| dialled(listen.parse().unwrap()).to_string();
        assert_eq!(dialled("0.0.0.0:9464"), "127.0.0.1:9464");
        assert_eq!(dialled("[::]:9464"), "[::1]:9464");
        assert_eq!(dialled("10.0.0.7:9464"), "10.0.0.7:9464");
        let fallback = |listen: &str| ipv4_fallback(listen.parse().unwrap()).map(|a| a.to_string());
        assert_eq!(fallback("[::]:9464").as_deref(), Some("127.0.0.1:9464"));
        assert_eq!(fallback("0.0.0.0:9464"), None);
        assert_eq!(fallback("[::1]:9464"), None);
    }

    /// The token is read as the agent reads it: a byte order mark first dropped (the CLI sent
    /// it, and was refused where scrapes were admitted), and a second token appended in a
    /// rotation (the agent keeps its previous one) not sent as a header line of its own.
    #[test]
    fn the_token_is_read_as_the_agent_reads_it() {
        let scratch = ScratchDir::new("cli-token");
        let path = scratch.write("token", "\u{feff}s3cret\n");
        let config = Config::from_toml(
            "t.toml",
            &format!(
                "[http]\nbearer_token_file = {:?}\n",
                path.display().to_string()
            ),
        )
        .unwrap();
        let agent = Endpoint::new(None, Some(&config), None, None);
        std::fs::write(&path, "s3cret\nnew\n").unwrap();
        let request = agent.unwrap().request("/x", None).unwrap();
        let headers = request.headers();
        assert_eq!(request.uri(), "/x");
        assert_eq!(headers[header::HOST], "127.0.0.1:9464");
        assert_eq!(
            headers
                .get_all(header::AUTHORIZATION)
                .iter()
                .collect::<Vec<_>>(),
            ["Bearer s3cret"]
        );
        assert_eq!(headers.get(header::ACCEPT), None);
    }

    /// What `ask` of an endpoint gets from a server on loopback that answers its connection
    /// with `answer`, and the address it was at.
    fn asked<T>(
        answer: impl FnOnce(std::net::TcpStream) + Send + 'static,
        ask: impl FnOnce(&Endpoint) -> T,
    ) -> (T, SocketAddr) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || answer(listener.accept().unwrap().0));
        let plain = Endpoint::new(Some(addr), None, None, None).unwrap();
        let asked = ask(&plain);
        server.join().unwrap();
        (asked, addr)
    }

    /// An answer that reads the request, sends `sent` and closes.
    fn sending(sent: &'static [u8]) -> impl FnOnce(std::net::TcpStream) + Send + 'static {
        use std::io::{Read as _, Write as _};
        move |mut stream| {
            let _ = stream.read(&mut [0; 1024]).unwrap();
            // The client stops reading an endless answer: its write may fail.
            let _ = stream.write_all(sent);
        }
    }

    /// The error of a GET from a server on loopback that answers `sent` and closes, and the
    /// address it was at.
    fn refused_with(sent: &'static [u8]) -> (String, SocketAddr) {
        let (refused, addr) = asked(sending(sent), |agent| {
            agent.get("/x", None).map(|_| ()).unwrap_err()
        });
        (format!("{refused:#}"), addr)
    }

    #[test]
    fn a_connection_closed_without_an_answer_is_said_so() {
        // Closed at once, the request unread: whichever of the close and the request comes
        // first, an EOF, a reset or a request never written.
        for _ in 0..20 {
            let (closed, addr) = asked(drop, |agent| {
                format!("{:#}", agent.get("/x", None).map(|_| ()).unwrap_err())
            });
            assert!(
                closed.starts_with(&format!(
                    "the collector at {addr} closed the connection without an answer"
                )),
                "{closed}"
            );
        }
        // Closed inside the status line: what came is said.
        let (cut, addr) = refused_with(b"HTTP/1.1 503 Serv");
        assert_eq!(
            cut,
            format!("the collector at {addr} answered HTTP/1.1 503 Serv")
        );
    }

    #[test]
    fn a_json_answer_cut_short_says_where() {
        let json = |sent: &'static [u8]| {
            asked(sending(sent), |agent| {
                agent.get_json("/x").map_err(|err| format!("{err:#}"))
            })
        };
        let (whole, _) = json(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\n{\"a\": 1}");
        assert_eq!(whole, Ok(serde_json::json!({"a": 1})));
        let (short, addr) = json(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{\"a\":");
        let short = short.unwrap_err();
        assert!(
            short.starts_with(&format!(
                "the collector at {addr} ended its answer after 5 of its 10 bytes: reading the \
                 answer of the collector at {addr}: "
            )),
            "{short}"
        );
        // Chunked with a length beside (hyper reads it chunked): a cut is not a short length.
        let (chunked, _) = json(
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\ntransfer-encoding: chunked\r\n\r\n\
              5\r\n{\"a\":\r\n",
        );
        let chunked = chunked.unwrap_err();
        assert!(
            chunked.starts_with("reading the answer") && !chunked.contains("of its"),
            "{chunked}"
        );
        // Ended with the connection (HTTP/1.0): the whole body.
        let (until_close, _) = json(b"HTTP/1.0 200 OK\r\n\r\n{\"a\": 2}");
        assert_eq!(until_close, Ok(serde_json::json!({"a": 2})));
    }

    #[test]
    fn what_answered_other_than_http_is_said() {
        // Something else on the port, sending without end and without a line's end: a
        // line's worth of it.
        static ENDLESS: [u8; 1 << 20] = [b'x'; 1 << 20];
        let (refused, addr) = refused_with(&ENDLESS);
        assert_eq!(
            refused,
            format!(
                "the collector at {addr} answered {}…",
                "x".repeat(SHOWN_STATUS_CHARS)
            )
        );
        // A TLS alert, as rustls answers a plain HTTP request.
        let (tls, _) = refused_with(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32]);
        assert!(
            tls.contains("the agent serves HTTPS") && tls.contains("--config"),
            "{tls}"
        );
        let (closed, _) = refused_with(b"");
        assert!(closed.contains("does it serve HTTPS?"), "{closed}");
        let (status, addr) = refused_with(b"HTTP/1.0 2000 OK\r\n\r\n");
        assert_eq!(
            status,
            format!("the collector at {addr} answered HTTP/1.0 2000 OK")
        );
        // An HTTP refusal: its status line and the body's reason.
        let (unavailable, addr) = refused_with(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 31\r\n\r\ntoo many \
              event streams at once\n",
        );
        assert_eq!(
            unavailable,
            format!(
                "the collector at {addr} answered HTTP/1.1 503 Service Unavailable: too many \
                 event streams at once (the agent's [http] max_event_streams; try again later)"
            )
        );
    }

    #[test]
    fn each_refusal_names_its_fix() {
        let plain =
            Endpoint::new(Some("127.0.0.1:9464".parse().unwrap()), None, None, None).unwrap();
        let refused = |status: &[u8]| plain.check_status(status, None).unwrap_err().to_string();
        assert!(plain.check_status(b"HTTP/1.1 200 OK\r\n", None).is_ok());
        // An HTTP/1.0 proxy in between answers in its version.
        assert!(plain.check_status(b"HTTP/1.0 200 OK\r\n", None).is_ok());
        assert!(plain.check_status(b"HTTP/1.0 200\r\n", None).is_ok());
        assert_eq!(
            refused(b"HTTP/1.0 2000 OK\r\n"),
            "the collector at 127.0.0.1:9464 answered HTTP/1.0 2000 OK"
        );
        assert_eq!(
            refused(b"HTTP/1.0 404 Not Found\r\n"),
            "the collector at 127.0.0.1:9464 answered HTTP/1.0 404 Not Found"
        );
        // A TLS alert, as rustls answers a plain HTTP request.
        let tls = refused(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32]);
        assert!(
            tls.contains("the agent serves HTTPS") && tls.contains("--config"),
            "{tls}"
        );
        let unauthorized = refused(b"HTTP/1.1 401 Unauthorized\r\n");
        assert!(
            unauthorized.contains("pass --config FILE"),
            "{unauthorized}"
        );
        let closed = refused(b"");
        assert!(closed.contains("does it serve HTTPS?"), "{closed}");
        assert_eq!(
            refused(b"HTTP/1.1 503 Service Unavailable\r\n"),
            "the collector at 127.0.0.1:9464 answered HTTP/1.1 503 Service Unavailable"
        );
        // The agent's own reason, as its body says it, with the setting behind it.
        assert_eq!(
            plain
                .check_status(
                    b"HTTP/1.1 503 Service Unavailable\r\n",
                    Some("too many requests at once")
                )
                .unwrap_err()
                .to_string(),
            "the collector at 127.0.0.1:9464 answered HTTP/1.1 503 Service Unavailable: too \
             many requests at once (the agent's [http] max_concurrent_requests; try again later)"
        );

        let name = ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
        let unknown = tls_advice(
            &rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            &[PathBuf::from("/etc/collector/tls.crt")],
            &name,
        )
        .unwrap();
        assert!(
            unknown.contains("pass --cacert CA.pem") && unknown.contains("/etc/collector/tls.crt"),
            "{unknown}"
        );
        let wrong_name = tls_advice(
            &rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName),
            &[],
            &name,
        )
        .unwrap();
        assert!(
            wrong_name.contains("does not name 127.0.0.1") && wrong_name.contains("--server-name"),
            "{wrong_name}"
        );
    }

    /// A CA certificate (EC P-256, CA:TRUE), as a cert-manager Secret's ca.crt holds one.
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBjzCCATWgAwIBAgIUOTOF2NfyUwkoiR779jxcmRdhPhcwCgYIKoZIzj0EAwIw
HDEaMBgGA1UEAwwRY29sbGVjdG9yLXRlc3QtY2EwIBcNMjYxMjAxMTk0NjEyWhgP
MjEyNjExMDcxOTQ2MTJaMBwxGjAYBgNVBAMMEWNvbGxlY3Rvci10ZXN0LWNhMFkw
EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE+N1suVX4L+DQkdb4kUAfxvwba5HWvzcn
oOXfGTx+8IGz+g8pdllP45oG47pITdYtT+5a6fvyPZqbVzoAWg5o76NTMFEwHQYD
VR0OBBYEFBIJOqo1m/QgdGAT1+qLLNi9AjXlMB8GA1UdIwQYMBaAFBIJOqo1m/Qg
dGAT1+qLLNi9AjXlMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSAAwRQIh
APCwd4Eu09Qqv6TcnUg+e1l5kXtMsei56axgvuBfFFYVAiAqSKgmhODuWH5yVryh
OA88hICOTwNepzhcGqC1TF91Wg==
-----END CERTIFICATE-----
";

    #[test]
    fn a_ca_beside_the_certificate_that_cannot_be_read_or_parsed_is_warned_of() {
        let scratch = ScratchDir::new("ca-beside");
        let (cert, ca) = (scratch.path("tls.crt"), scratch.path("ca.crt"));
        let beside = |text: &str| {
            std::fs::write(&ca, text).unwrap();
            ca_beside(&cert)
        };
        // None, or an empty one: nothing to say.
        assert_eq!(ca_beside(&cert), Ok(None));
        assert_eq!(beside(""), Ok(None));
        assert_eq!(beside("\n"), Ok(None));
        let (path, anchors) = beside(CA_PEM).unwrap().unwrap();
        assert_eq!((path, anchors.len()), (ca.clone(), 1));
        // Readable, but no certificate in it, or not one that parses.
        let no_certificate = beside("not a certificate\n").unwrap_err();
        let malformed =
            beside("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
                .unwrap_err();
        let unterminated = beside(&CA_PEM[..CA_PEM.len() / 2]).unwrap_err();
        // There, but not readable (a directory, which root cannot read either).
        std::fs::remove_file(&ca).unwrap();
        std::fs::create_dir(&ca).unwrap();
        let unreadable = ca_beside(&cert).unwrap_err();
        for (warning, why) in [
            (&no_certificate, "it holds no PEM certificate"),
            (
                &malformed,
                "it does not parse as PEM certificates (malformed PEM: base64",
            ),
            (
                &unterminated,
                "it does not parse as PEM certificates (malformed PEM: missing",
            ),
            (&unreadable, "it cannot be read (Is a directory"),
        ] {
            assert!(
                warning.starts_with(&format!(
                    "not trusting {}, beside the config's tls_cert_file: {why}",
                    ca.display()
                )) && warning.contains("--cacert"),
                "{warning}"
            );
        }
    }
}
