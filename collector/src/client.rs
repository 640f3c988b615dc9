//! The CLI commands that talk to a running agent over its HTTP endpoint: `collector events`
//! (tails `/api/v1/events`, one JSON line per event, until the agent stops or the reader goes
//! away), `collector stats proxy|dns` (the JSON API as a table, or as JSON) and `collector
//! top`. Plain HTTP, or HTTPS with the bearer token when the agent's config has them.
//! Answers are taken in HTTP/1.1 or HTTP/1.0, their bodies chunked, of a length or ended
//! with the connection, as a proxy in between may pass them on.
//!
//! A failure names its fix: a certificate not trusted (`--cacert`), a CA certificate served
//! as the agent's own, plain HTTP to an HTTPS agent (`--config`, `--cacert`), credentials
//! wanted or refused (`--config`, whose token the CLI sends).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::{Context as _, bail};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, StreamOwned,
    pki_types::{CertificateDer, ServerName, TrustAnchor, pem::PemObject as _},
};
use serde_json::Value;

use crate::{config::Config, output};

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
}

/// The file beside the served certificate that holds the CA which issued it, as Kubernetes
/// `kubernetes.io/tls` Secrets from cert-manager carry it.
const CA_BESIDE_CERT: &str = "ca.crt";

/// How long the CLI waits for the agent to accept, and then for each read of an answer (the
/// event stream, which may stay quiet, waits three of its heartbeats): an agent that is
/// stopped, or an address that drops packets, is an error in seconds rather than after the
/// kernel's SYN retries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A PEM file HTTPS trusts, and the certificates in it.
type Trusted = (PathBuf, Vec<TrustAnchor<'static>>);

/// A plain or TLS connection to the agent.
trait Connection: Read + Write {
    /// The TCP socket underneath, whose timeouts apply to the connection.
    fn tcp(&self) -> &TcpStream;
}

impl Connection for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Connection for StreamOwned<ClientConnection, TcpStream> {
    fn tcp(&self) -> &TcpStream {
        &self.sock
    }
}

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
        })
    }

    /// The agent's address: where a connection was made, else where one is tried first.
    fn addr(&self) -> SocketAddr {
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
    fn dial(&self) -> anyhow::Result<TcpStream> {
        const ADVICE: &str = "is it running? see --listen and --config";
        let first = self.first;
        let err = match TcpStream::connect_timeout(&first, CONNECT_TIMEOUT) {
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
        match TcpStream::connect_timeout(&fallback, CONNECT_TIMEOUT) {
            Ok(tcp) => {
                let _ = self.reached.set(fallback);
                Ok(tcp)
            }
            Err(fallback_err) => Err(fallback_err).with_context(|| {
                format!("connecting to the collector at {fallback} ({first}: {err}; {ADVICE})")
            }),
        }
    }

    fn connect(&self, read_timeout: Option<Duration>) -> anyhow::Result<Box<dyn Connection>> {
        let tcp = self.dial()?;
        tcp.set_read_timeout(read_timeout)
            .and_then(|()| tcp.set_write_timeout(Some(ANSWER_TIMEOUT)))
            .context("setting the socket's timeouts")?;
        Ok(match &self.tls {
            None => Box::new(tcp),
            Some(config) => {
                let connection = ClientConnection::new(Arc::clone(config), self.server_name())
                    .context("starting TLS")?;
                Box::new(StreamOwned::new(connection, tcp))
            }
        })
    }

    /// A GET request's head, with the credentials.
    fn request(&self, path: &str, extra: &str) -> String {
        let auth = self.token.as_ref().map_or(String::new(), |(token, file)| {
            format!("Authorization: Bearer {}\r\n", current_token(token, file))
        });
        format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\n{auth}{extra}\r\n",
            self.addr()
        )
    }

    /// Connects and sends `request`; the reply is read from what it returns, each read waiting
    /// at most `read_timeout`. Errors name the fix.
    fn exchange(
        &self,
        request: &str,
        read_timeout: Option<Duration>,
    ) -> anyhow::Result<BufReader<Box<dyn Connection>>> {
        let mut stream = self.connect(read_timeout)?;
        stream
            .write_all(request.as_bytes())
            .and_then(|()| stream.flush())
            .map_err(|err| self.explain(err))?;
        Ok(BufReader::new(stream))
    }

    /// Reads the status line and the header fields, refuses any status but 200 with what to
    /// do about it, and tells how the body is delimited.
    fn expect_ok(&self, reader: &mut impl BufRead) -> anyhow::Result<Framing> {
        let mut status = Vec::new();
        // At most a line's worth: something else on the port may send without end.
        match reader
            .by_ref()
            .take(MAX_LINE)
            .read_until(b'\n', &mut status)
        {
            Ok(_) => {}
            // A TLS peer that closes without close_notify: judged by what it sent, if anything.
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(err) => return Err(self.explain(err)),
        }
        // An HTTP refusal's body says why (503: which cap the agent reached).
        let reason = if is_http(&status) && !is_ok(&status) {
            read_head(reader)
                .ok()
                .and_then(|framing| read_reason(reader, framing))
        } else {
            None
        };
        self.check_status(&status, reason.as_deref())?;
        read_head(reader).map_err(|err| {
            self.explain(err).context(format!(
                "reading the head of the answer of the collector at {}",
                self.addr()
            ))
        })
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

    /// An I/O error of the exchange, with the fix when TLS refused the agent's certificate
    /// or the agent did not answer in TLS.
    fn explain(&self, err: std::io::Error) -> anyhow::Error {
        // What a read or write past its timeout fails with.
        if matches!(
            err.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            return anyhow::Error::new(err).context(format!(
                "the collector at {} did not answer within {} s (is it stopped, or is this not the collector?)",
                self.addr(),
                ANSWER_TIMEOUT.as_secs()
            ));
        }
        let why = err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .and_then(|tls| tls_advice(tls, &self.trusted, &self.server_name()));
        match why {
            Some(why) => anyhow::Error::new(err).context(why),
            None => err.into(),
        }
    }
}

/// Whether `status`, a reply's first line, is `200` in HTTP/1.1 or HTTP/1.0: a proxy in
/// between may answer in HTTP/1.0 (and end the body with the connection, which `events`
/// and `get_json` read to).
fn is_http(status: &[u8]) -> bool {
    status.starts_with(b"HTTP/1.1 ") || status.starts_with(b"HTTP/1.0 ")
}

/// The first KiB of a refusal's body, on one line; `None` if empty or unreadable.
fn read_reason(reader: &mut impl BufRead, framing: Framing) -> Option<String> {
    const MAX: u64 = 1024;
    let mut body = Vec::new();
    let read = match framing {
        Framing::Chunked => Chunked::new(reader).take(MAX).read_to_end(&mut body),
        Framing::Length(length) => reader.take(length.min(MAX)).read_to_end(&mut body),
        Framing::UntilClose => reader.take(MAX).read_to_end(&mut body),
    };
    read.ok()?;
    let text = String::from_utf8_lossy(&body);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    (!text.is_empty()).then_some(text)
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

/// Streams the agent's events to stdout, as they come.
pub fn events(agent: &Endpoint) -> anyhow::Result<()> {
    let mut reader = agent.exchange(
        &agent.request("/api/v1/events", "Accept: application/x-ndjson\r\n"),
        Some(ANSWER_TIMEOUT),
    )?;
    let framing = agent.expect_ok(&mut reader)?;
    // The agent sends a heartbeat line on a quiet stream: three missed mean it is stopped,
    // frozen or cut off, and a tail under a supervisor had better end and say so.
    let silence = 3 * crate::event_stream::HEARTBEAT_INTERVAL;
    reader
        .get_ref()
        .tcp()
        .set_read_timeout(Some(silence))
        .context("setting the socket's timeout")?;
    // A chunked stream ends with its last chunk when the agent stops; one cut off before
    // it is an agent that died (killed, crashed) or a connection lost.
    let marks_its_end = framing == Framing::Chunked;
    let mut body: Box<dyn Read> = match framing {
        Framing::Chunked => Box::new(Chunked::new(reader)),
        Framing::Length(length) => Box::new(reader.take(length)),
        Framing::UntilClose => Box::new(reader),
    };
    let mut out = Lines::new(std::io::stdout().lock());
    let mut buf = [0; 8192];
    loop {
        let read = match body.read(&mut buf) {
            Ok(read) => read,
            // Cut after the agent's end line (its last chunk held up past the stop's grace):
            // everything was sent.
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof && out.ended => {
                return out.finish();
            }
            Err(err)
                if marks_its_end
                    && matches!(
                        err.kind(),
                        std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionAborted
                    ) =>
            {
                return Err(anyhow::anyhow!(
                    "the event stream from the collector at {} was cut off before its end: {} \
                     ({err})",
                    agent.addr(),
                    CUT_OFF_CAUSES
                ));
            }
            // A body that ends with the connection (a TLS close without close_notify reads
            // so too): what was sent has been written.
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(anyhow::Error::new(err).context(format!(
                    "nothing from the collector at {} for {} s, not even its heartbeat (one \
                     every {} s): it is stopped, frozen or cut off",
                    agent.addr(),
                    silence.as_secs(),
                    crate::event_stream::HEARTBEAT_INTERVAL.as_secs()
                )));
            }
            Err(err) => return Err(agent.explain(err).context("reading the event stream")),
        };
        if read == 0 {
            let cut = || {
                format!(
                    "the event stream from the collector at {} was cut off: {CUT_OFF_CAUSES}",
                    agent.addr()
                )
            };
            out.finish().with_context(cut)?;
            // Only the agent's `end` line says it stopped cleanly: one stopping on an error
            // ends its streams without it, and without chunked framing (an HTTP/1.0 proxy in
            // between) a connection closed under the stream ends the body too.
            anyhow::ensure!(
                out.ended,
                "{}",
                if marks_its_end {
                    format!(
                        "the event stream from the collector at {} ended without its end line: \
                         the agent stopped on an error, or no longer admits the credentials \
                         it was opened with (its log says which)",
                        agent.addr()
                    )
                } else {
                    format!("{}: no end line", cut())
                }
            );
            return Ok(());
        }
        if !out.forward(&buf[..read])? {
            return Ok(());
        }
    }
}

/// Why an event stream ends before its `end` line, as far as the reader can tell.
const CUT_OFF_CAUSES: &str = "the agent was killed or crashed, the connection was lost, or \
                              this reader stopped reading (a paused pager, a stuck pipe) for the \
                              60 s after which the agent lets a reader go";

/// Standard output for the stream's lines, written whole: a stream cut inside a line leaves
/// no half line for `| jq` to choke on.
struct Lines<W> {
    out: W,
    /// The start of a line whose end has not come yet.
    pending: Vec<u8>,
    /// The last whole line was the agent's `end` line.
    ended: bool,
}

/// The agent's last line of a stream it ends (`StreamEvent::End`, its tag first).
const END_LINE_START: &[u8] = br#"{"event":"end""#;

impl<W: Write> Lines<W> {
    const fn new(out: W) -> Self {
        Self {
            out,
            pending: Vec::new(),
            ended: false,
        }
    }

    /// Writes the lines `bytes` completes at once; `false` once the reader has gone (a
    /// closed pipe, as under `| head`), which ends a tail without an error.
    fn forward(&mut self, bytes: &[u8]) -> anyhow::Result<bool> {
        let Some(last) = bytes.iter().rposition(|&byte| byte == b'\n') else {
            self.pending.extend_from_slice(bytes);
            return Ok(true);
        };
        self.ended = match bytes[..last].iter().rposition(|&byte| byte == b'\n') {
            Some(before) => bytes[before + 1..last].starts_with(END_LINE_START),
            None => [self.pending.as_slice(), &bytes[..last]]
                .concat()
                .starts_with(END_LINE_START),
        };
        let written = self
            .out
            .write_all(&self.pending)
            .and_then(|()| self.out.write_all(&bytes[..=last]))
            .and_then(|()| self.out.flush());
        self.pending.clear();
        self.pending.extend_from_slice(&bytes[last + 1..]);
        match written {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
            Err(err) => Err(anyhow::Error::new(err).context("writing to standard output")),
        }
    }

    /// The stream's end: an error if it came inside a line (that part is not written).
    fn finish(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.pending.is_empty(),
            "{} bytes of an unfinished line left out",
            self.pending.len()
        );
        Ok(())
    }
}

/// GET `path` from the agent and parse its JSON body.
pub fn get_json(agent: &Endpoint, path: &str) -> anyhow::Result<Value> {
    let mut reader = agent.exchange(
        &agent.request(path, "Connection: close\r\n"),
        Some(ANSWER_TIMEOUT),
    )?;
    let framing = agent.expect_ok(&mut reader)?;
    let mut body = Vec::new();
    let read = match framing {
        Framing::Chunked => Chunked::new(&mut reader).read_to_end(&mut body),
        Framing::Length(length) => (&mut reader).take(length).read_to_end(&mut body),
        Framing::UntilClose => reader.read_to_end(&mut body),
    };
    match read {
        // A TLS peer that closes without close_notify still sent the whole body; a short one
        // is told below. A chunked body has its own end, and is not whole without it.
        Err(err)
            if err.kind() == std::io::ErrorKind::UnexpectedEof && framing != Framing::Chunked => {}
        Err(err) => {
            return Err(agent.explain(err).context(format!(
                "reading the answer of the collector at {}",
                agent.addr()
            )));
        }
        Ok(_) => {}
    }
    if let Framing::Length(length) = framing
        && (body.len() as u64) < length
    {
        bail!(
            "the collector at {} ended its answer after {} of its {length} bytes",
            agent.addr(),
            body.len()
        );
    }
    serde_json::from_slice(&body).context("the collector's answer is not JSON")
}

/// How an answer's body ends, by its header fields (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// Transfer-Encoding with chunked last: the agent's event stream, or any answer an
    /// HTTP/1.1 proxy in between re-chunks.
    Chunked,
    /// Content-Length, without Transfer-Encoding.
    Length(u64),
    /// Neither (an HTTP/1.0 proxy), or a last coding other than chunked: the body ends with
    /// the connection.
    UntilClose,
}

/// Longest header, chunk-size or trailer line taken: an endless one is refused.
const MAX_LINE: u64 = 64 * 1024;

/// How much of an unexpected status line an error shows.
const SHOWN_STATUS_CHARS: usize = 120;

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// One line, without its CRLF (or bare LF); `UnexpectedEof` if the stream ends first.
fn read_crlf_line(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let read = reader.take(MAX_LINE).read_until(b'\n', &mut line)?;
    if line.pop() != Some(b'\n') {
        return Err(if read as u64 == MAX_LINE {
            invalid(format!("a line longer than {MAX_LINE} bytes"))
        } else {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the answer ended inside a line",
            )
        });
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(line)
}

/// Reads the header fields after the status line, to the empty line, and tells how the body
/// is delimited. Names are case-insensitive and values trimmed of whitespace; the codings of
/// every Transfer-Encoding line make one list, chunked only when it comes last.
fn read_head(reader: &mut impl BufRead) -> std::io::Result<Framing> {
    let mut transfer_encoding = false;
    let mut chunked = false;
    let mut length = None;
    loop {
        let line = read_crlf_line(reader)?;
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(invalid(format!(
                "a header line without a colon: {}",
                String::from_utf8_lossy(&line)
            )));
        };
        let (name, value) = (line[..colon].trim_ascii(), line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding = true;
            // "gzip, chunked": the codings in the order applied, each with its parameters.
            if let Some(last) = value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .rfind(|coding| !coding.is_empty())
            {
                let coding = last.split(|&b| b == b';').next().unwrap_or_default();
                chunked = coding.trim_ascii().eq_ignore_ascii_case(b"chunked");
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let parsed = std::str::from_utf8(value)
                .ok()
                .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|text| text.parse().ok());
            length = Some(parsed.ok_or_else(|| {
                invalid(format!(
                    "a malformed Content-Length: {}",
                    String::from_utf8_lossy(value)
                ))
            })?);
        }
    }
    Ok(match (transfer_encoding, length) {
        (true, _) if chunked => Framing::Chunked,
        (true, _) | (false, None) => Framing::UntilClose,
        (false, Some(length)) => Framing::Length(length),
    })
}

/// A body in the chunked transfer coding (RFC 9112 section 7.1), decoded: each chunk is a
/// hex size line, which may carry extensions after a `;`, its bytes and a CRLF; size 0 ends
/// the body, followed by trailer fields to an empty line, which are passed over. The bytes of
/// a chunk are handed on as they come: a stream of events is written as the agent sends it.
struct Chunked<R> {
    inner: R,
    state: ChunkState,
}

#[derive(Debug, Clone, Copy)]
enum ChunkState {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of the chunk are left.
    Data(u64),
    /// The CRLF after a chunk's bytes is next.
    DataEnd,
    /// The last chunk and the trailer fields are read.
    Done,
}

impl<R: BufRead> Chunked<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            state: ChunkState::Size,
        }
    }
}

/// The size of a chunk-size line, its extensions passed over.
fn chunk_size(line: &[u8]) -> std::io::Result<u64> {
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    std::str::from_utf8(digits.trim_ascii())
        .ok()
        .filter(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .ok_or_else(|| {
            invalid(format!(
                "a malformed chunk size line: {}",
                String::from_utf8_lossy(line)
            ))
        })
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.state {
                ChunkState::Done => return Ok(0),
                ChunkState::Size => {
                    let size = chunk_size(&read_crlf_line(&mut self.inner)?)?;
                    if size > 0 {
                        self.state = ChunkState::Data(size);
                        continue;
                    }
                    loop {
                        match read_crlf_line(&mut self.inner) {
                            Ok(trailer) if !trailer.is_empty() => {}
                            Ok(_) => break,
                            // Closed without the empty line: the body was whole.
                            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => break,
                            Err(err) => return Err(err),
                        }
                    }
                    self.state = ChunkState::Done;
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(0);
                    }
                    let want = usize::try_from(left).map_or(buf.len(), |left| left.min(buf.len()));
                    let read = self.inner.read(&mut buf[..want])?;
                    if read == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the answer ended inside a chunk",
                        ));
                    }
                    let left = left - read as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(read);
                }
                ChunkState::DataEnd => {
                    if !read_crlf_line(&mut self.inner)?.is_empty() {
                        return Err(invalid("a chunk longer than its size".to_owned()));
                    }
                    self.state = ChunkState::Size;
                }
            }
        }
    }
}

fn number(value: &Value) -> f64 {
    value.as_f64().unwrap_or(0.0)
}

/// A figure that may be `null` (nothing to take it from, e.g. no close in the last minute):
/// `-` then, not a zero that reads as a measurement.
fn figure(value: &Value, precision: usize) -> String {
    value
        .as_f64()
        .map_or_else(|| "-".to_owned(), |v| format!("{v:.precision$}"))
}

/// A share (0 to 1) as a percentage, `-` when `null`.
fn percent(value: &Value) -> String {
    value
        .as_f64()
        .map_or_else(|| "-".to_owned(), |v| format!("{:.1} %", v * 100.0))
}

/// Seconds in the unit that reads best (DNS answers take microseconds), `-` when `null`.
fn duration(value: &Value) -> String {
    match value.as_f64() {
        None => "-".to_owned(),
        Some(s) if s < 1e-3 => format!("{:.1} µs", s * 1e6),
        Some(s) if s < 1.0 => format!("{:.2} ms", s * 1e3),
        Some(s) => format!("{s:.3} s"),
    }
}

/// A count as a plain integer: a JSON value's Display ignores the width, and would shift
/// every column after it.
fn count(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

/// The name column's width: 16, or the longest name's, so that a long name moves the whole
/// column and no figure leaves its heading.
fn name_width(rows: &[Value]) -> usize {
    rows.iter()
        .filter_map(|row| row["name"].as_str())
        .map(|name| name.chars().count())
        .max()
        .unwrap_or(0)
        .max(16)
}

/// `/api/v1/proxy` as a table: one line per route, then the routes' server names, then the
/// totals. Where routes share ports by server name, an AWAITING column after ACTIVE: the
/// connections waiting for their ClientHello in each fallback route (`-` in the others),
/// which no other column counts yet.
#[must_use]
pub fn proxy_table(json: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let routes = json["routes"].as_array().map_or(&[][..], Vec::as_slice);
    let by_name = routes
        .iter()
        .any(|route| route.get("awaitingServerName").is_some());
    let awaiting = |cell: &dyn std::fmt::Display| {
        if by_name {
            format!(" {cell:>8}")
        } else {
            String::new()
        }
    };
    let width = name_width(routes);
    let _ = writeln!(
        out,
        "{:<width$} {:<9} {:>8}{} {:>10} {:>10} {:>9} {:>12} {:>12} {:>10}",
        "ROUTE",
        "TYPE",
        "ACTIVE",
        awaiting(&"AWAITING"),
        "OPENED",
        "CLOSED",
        "CONN/S",
        "IN B/S",
        "OUT B/S",
        "P50 S 1M"
    );
    for route in routes {
        let waiting = route["awaitingServerName"]
            .as_u64()
            .map_or_else(|| "-".to_owned(), |n| n.to_string());
        let _ = writeln!(
            out,
            "{:<width$} {:<9} {:>8}{} {:>10} {:>10} {:>9.1} {:>12} {:>12} {:>10}",
            route["name"].as_str().unwrap_or(""),
            route["type"].as_str().unwrap_or(""),
            count(&route["active"]),
            awaiting(&waiting),
            count(&route["opened"]),
            count(&route["closed"]),
            number(&route["connectionsPerSecond"]["instant"]),
            // `-` on a route with server names: its live bytes are not told apart.
            figure(&route["throughput"]["bytesIn"]["instant"], 0),
            figure(&route["throughput"]["bytesOut"]["instant"], 0),
            figure(&route["duration"]["p50"], 4),
        );
    }
    for route in routes {
        let names: Vec<&str> = route["serverNames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !names.is_empty() {
            let _ = writeln!(
                out,
                "  {} by server name: {}",
                route["name"].as_str().unwrap_or(""),
                names.join(", ")
            );
        }
    }
    let _ = writeln!(
        out,
        "total: {} active, {} connections, {:.1} new/s",
        count(&json["activeConnections"]),
        count(&json["totalConnections"]),
        number(&json["requestsPerSecond"])
    );
    upstream_table(&mut out, json);
    out
}

/// The `upstreams` of `/api/v1/proxy` as a table after the routes' totals, which leave
/// them out; nothing when there are none (or the agent is older than upstreams).
fn upstream_table(out: &mut String, json: &Value) {
    use std::fmt::Write as _;
    let Some(upstreams) = json["upstreams"].as_array().filter(|u| !u.is_empty()) else {
        return;
    };
    let width = name_width(upstreams);
    let ports_of = |upstream: &Value| {
        upstream["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    // As wide as the widest cell: a few ports, or the bytes of a long run (totals since the
    // start), pushed every figure after them out from under its heading.
    let widest = |cell: &dyn Fn(&Value) -> usize, heading: usize| {
        upstreams.iter().map(cell).max().unwrap_or(0).max(heading)
    };
    let ports_width = widest(&|upstream| ports_of(upstream).len(), 11);
    let bytes_width = widest(
        &|upstream| {
            count(&upstream["bytesIn"])
                .to_string()
                .len()
                .max(count(&upstream["bytesOut"]).to_string().len())
        },
        12,
    );
    let _ = writeln!(
        out,
        "\n{:<width$} {:<ports_width$} {:>8} {:>10} {:>10} {:>10} {:>8} {:>7} {:>bytes_width$} {:>bytes_width$} {:>10} {:>10}",
        "UPSTREAM",
        "PORTS",
        "ACTIVE",
        "CONNECTING",
        "OPENED",
        "CLOSED",
        "FAILED",
        "FAIL %",
        "IN BYTES",
        "OUT BYTES",
        "P50 S 1M",
        "P99 S 1M"
    );
    for upstream in upstreams {
        let _ = writeln!(
            out,
            "{:<width$} {:<ports_width$} {:>8} {:>10} {:>10} {:>10} {:>8} {:>7} {:>bytes_width$} {:>bytes_width$} {:>10} {:>10}",
            upstream["name"].as_str().unwrap_or(""),
            ports_of(upstream),
            count(&upstream["active"]),
            count(&upstream["connectsInProgress"]),
            count(&upstream["opened"]),
            count(&upstream["closed"]),
            count(&upstream["connectFailures"]),
            percent(&failed_share(upstream)),
            count(&upstream["bytesIn"]),
            count(&upstream["bytesOut"]),
            figure(&upstream["duration"]["p50"], 4),
            figure(&upstream["duration"]["p99"], 4),
        );
    }
}

/// The share of an upstream's connects since the start that failed (of those that either
/// completed their handshake or failed); `null` before the first.
fn failed_share(upstream: &Value) -> Value {
    let failed = count(&upstream["connectFailures"]);
    let connects = count(&upstream["opened"]) + failed;
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let share = (connects > 0).then(|| failed as f64 / connects as f64);
    Value::from(share)
}

/// Figures are said to be stale at this many poll intervals old (and 3 s at the least):
/// between polls they age by up to one.
const STALE_AFTER_POLLS: f64 = 2.5;
const STALE_AFTER_AT_LEAST_MS: f64 = 3_000.0;

/// What a table's figures are worth, said above them (nothing when all is well): none yet
/// (an agent that has not finished its first poll answers with empty figures), how old
/// they are when the polls have stopped moving them (a poll that cannot read the kernel
/// keeps the last figures, rates included), and each source that is down, with its error.
/// The age is the agent's own (`ageMs`), so that neither a remote agent's clock nor this
/// one's skews it; from an agent too old to send it, the read's `timestamp` against `now_ms`.
#[must_use]
pub fn freshness(json: &Value, now_ms: u64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let interval_ms = json["pollIntervalMs"].as_f64().unwrap_or(1_000.0);
    let stale_ms = (interval_ms * STALE_AFTER_POLLS).max(STALE_AFTER_AT_LEAST_MS);
    let read_at = json["timestamp"].as_u64().unwrap_or(0);
    #[expect(clippy::cast_precision_loss, reason = "milliseconds far below 2^52")]
    let age_ms = json["ageMs"].as_f64().or_else(|| {
        json.get("ageMs")
            .is_none()
            .then(|| now_ms.saturating_sub(read_at) as f64)
    });
    if read_at == 0 {
        let _ = writeln!(
            out,
            "no poll has finished yet (the agent is starting): every figure below is empty"
        );
    } else if let Some(age_ms) = age_ms.filter(|age| *age >= stale_ms) {
        let _ = writeln!(
            out,
            "figures as read {:.0} s ago (polls every {} s): the agent's polls have not moved \
             them since",
            age_ms / 1000.0,
            interval_ms / 1000.0
        );
    }
    for (name, source) in json["sources"].as_object().into_iter().flatten() {
        if source["up"] == false {
            let why = source["lastError"].as_str().unwrap_or("no error recorded");
            let _ = writeln!(out, "source {name} is down: {why}");
        }
    }
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

/// `/api/v1/dns` as a few readable lines.
#[must_use]
pub fn dns_table(json: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if json["enabled"] == false {
        let _ = writeln!(out, "DNS counting is off ([dns] enabled = false)");
        return out;
    }
    // `-` for none seen yet, as for a rate of nothing.
    let pairs = |value: &Value| -> String {
        value.as_object().filter(|map| !map.is_empty()).map_or_else(
            || "-".to_owned(),
            |map| {
                map.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        )
    };
    let _ = writeln!(
        out,
        "queries {} ({:.1}/s), responses {} since the start; error rate {}, unanswered {} \
         (last minute)",
        count(&json["totalQueries"]),
        number(&json["queriesPerSecond"]),
        count(&json["totalResponses"]),
        percent(&json["errorRate"]),
        percent(&json["unansweredRate"])
    );
    let matching = json["matchResponses"] != false;
    // With `[dns] match_every` above 1, the matched figures count a sample: say of what.
    let sample = match json["matchEvery"].as_u64() {
        Some(every) if every > 1 => format!(" (one query in {every} matched)"),
        _ => String::new(),
    };
    if matching {
        let _ = writeln!(
            out,
            "cache since the start: {} hits, {} misses; hit rate {} (last minute){sample}",
            count(&json["cacheStats"]["hits"]),
            count(&json["cacheStats"]["misses"]),
            percent(&json["cacheStats"]["hitRate"])
        );
        if json["cacheStats"]["undecided"]
            .as_u64()
            .is_some_and(|n| n > 0)
        {
            let _ = writeln!(
                out,
                "cache: {} undecided (answers relayed from a server behind a DNAT, whose \
                 upstream queries are not seen here, or without a question)",
                count(&json["cacheStats"]["undecided"])
            );
        }
    }
    // Since the start, as the counts above: a spike of the last minute is in the rates.
    let _ = writeln!(
        out,
        "types since the start: {}",
        pairs(&json["queryTypeBreakdown"])
    );
    // Classes only where a query was not IN: a CH `version.bind` probe, say.
    if json["queryClassBreakdown"]
        .as_object()
        .is_some_and(|classes| classes.keys().any(|class| class != "IN"))
    {
        let _ = writeln!(
            out,
            "classes since the start: {}",
            pairs(&json["queryClassBreakdown"])
        );
    }
    let _ = writeln!(
        out,
        "codes since the start: {}",
        pairs(&json["responseCodes"])
    );
    if matching {
        let _ = writeln!(
            out,
            "latency: p50 {}, p99 {} ({} answered in the last minute){sample}",
            duration(&json["latency"]["p50"]),
            duration(&json["latency"]["p99"]),
            count(&json["latency"]["count"])
        );
    } else {
        let _ = writeln!(
            out,
            "cache and latency: not measured ([dns] match_responses = false)"
        );
    }
    if let Some(seconds) = json["topDomainsRecentSeconds"].as_f64() {
        let span = if seconds < 120.0 {
            format!("{seconds:.0} s")
        } else {
            format!("{:.0} min", seconds / 60.0)
        };
        let _ = writeln!(out, "top domains, last {span}:");
        list_domains(&mut out, &json["topDomainsRecent"]);
    }
    let _ = writeln!(out, "top domains since the start:");
    list_domains(&mut out, &json["topDomains"]);
    out
}

/// The first ten of a JSON list of domains, one a line.
fn list_domains(out: &mut String, domains: &Value) {
    use std::fmt::Write as _;
    for domain in domains.as_array().into_iter().flatten().take(10) {
        // Past the tracked set a count may be short by its inherited count: say by how much.
        let undercount = match count(&domain["maxUndercount"]) {
            0 => String::new(),
            more => format!("  (up to {more} more)"),
        };
        let _ = writeln!(
            out,
            "  {:>10}  {}{undercount}",
            count(&domain["count"]),
            domain["domain"].as_str().unwrap_or("")
        );
    }
}

/// Clears the screen and homes the cursor, like watch(1).
const CLEAR: &str = "\x1b[2J\x1b[H";

/// How `refresh` shows each refresh.
#[derive(Clone, Copy)]
enum Refreshes {
    /// Tables: on a cleared screen on a terminal, one after another (a blank line between)
    /// into a file or a pipe.
    Tables,
    /// One JSON document a line, nothing else on standard output.
    JsonLines,
}

/// The token in `file` now, read again for each request: a watch (`--watch`, `top`) outlives
/// a rotation of the Secret, which the agent takes without a restart. What was read at the
/// start if the file cannot be read now or is refused (empty in a rotation half done, or a
/// second token appended), as the agent keeps its previous token then.
fn current_token(first: &str, file: &Path) -> String {
    crate::auth::read_token(file).unwrap_or_else(|_| first.to_owned())
}

/// Shows `fetch`'s text every second. The first failure ends it (a wrong address or
/// credentials); a later one, such as the agent restarting, is shown in place of the figures
/// on a terminal, and on standard error otherwise (a reader of JSON lines, `jq` say, would
/// stop at a line of text), and tried again a second later.
fn refresh(
    agent: &Endpoint,
    refreshes: Refreshes,
    mut fetch: impl FnMut() -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let screen = matches!(refreshes, Refreshes::Tables) && std::io::stdout().is_terminal();
    let mut shown = false;
    let mut due = std::time::Instant::now();
    loop {
        let text = match fetch() {
            Ok(text) => Some(text),
            Err(err) if !shown => return Err(err),
            Err(err) => {
                let failure = format!(
                    "the collector at {} did not answer: {err:#}\ntrying again every second \
                     (Ctrl-C to stop)\n",
                    agent.addr()
                );
                if screen {
                    Some(failure)
                } else if output::reader_gone() {
                    return Err(output::ReaderGone.into());
                } else {
                    let _ = write!(std::io::stderr(), "{failure}");
                    None
                }
            }
        };
        if let Some(text) = text {
            let separate = shown && matches!(refreshes, Refreshes::Tables);
            output::write(|out| {
                if screen {
                    write!(out, "{CLEAR}")?;
                } else if separate {
                    writeln!(out)?;
                }
                write!(out, "{text}")
            })?;
            shown = true;
        }
        crate::clock::sleep_until_due(&mut due, std::time::Duration::from_secs(1));
    }
}

/// `collector stats proxy|dns`: once, or every second with `watch`.
pub fn stats(agent: &Endpoint, dns: bool, json: bool, watch: bool) -> anyhow::Result<()> {
    let path = if dns { "/api/v1/dns" } else { "/api/v1/proxy" };
    let fetch = || -> anyhow::Result<String> {
        let value = get_json(agent, path)?;
        Ok(if json {
            format!("{value}\n")
        } else {
            let table = if dns {
                dns_table(&value)
            } else {
                proxy_table(&value)
            };
            freshness(&value, crate::clock::unix_ms()) + &table
        })
    };
    if watch {
        let refreshes = if json {
            Refreshes::JsonLines
        } else {
            Refreshes::Tables
        };
        return refresh(agent, refreshes, fetch);
    }
    let text = fetch()?;
    output::write(|out| write!(out, "{text}"))
}

/// `HH:MM:SS UTC` of a time in milliseconds since the Unix epoch.
fn time_of_day_utc(unix_ms: u64) -> String {
    let seconds = unix_ms / 1000 % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// `collector top`: routes and DNS together, refreshed every second (or once).
pub fn top(agent: &Endpoint, once: bool) -> anyhow::Result<()> {
    let fetch = || -> anyhow::Result<String> {
        let proxy = get_json(agent, "/api/v1/proxy")?;
        let dns = get_json(agent, "/api/v1/dns")?;
        let now_ms = crate::clock::unix_ms();
        // The time of this fetch: a screen that stops changing it is not being refreshed
        // (an agent frozen with its socket open holds each fetch for the read timeout).
        let mut text = format!(
            "collector at {}, {}\n\n{}{}",
            agent.addr(),
            time_of_day_utc(now_ms),
            freshness(&proxy, now_ms),
            proxy_table(&proxy)
        );
        if dns["enabled"] == true {
            text.push('\n');
            text.push_str(&dns_table(&dns));
        }
        Ok(text)
    };
    if !once {
        return refresh(agent, Refreshes::Tables, fetch);
    }
    let text = fetch()?;
    output::write(|out| write!(out, "{text}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_time_of_day_is_utcs() {
        // 2026-12-04 23:59:58.999 UTC.
        assert_eq!(super::time_of_day_utc(1_796_428_798_999), "23:59:58 UTC");
        assert_eq!(super::time_of_day_utc(0), "00:00:00 UTC");
    }

    #[test]
    fn stream_lines_are_written_whole() {
        let mut lines = super::Lines::new(Vec::new());
        assert!(lines.forward(b"{\"a\":1}\n{\"b\"").unwrap());
        assert_eq!(lines.out, b"{\"a\":1}\n");
        assert!(lines.forward(b":2}\n").unwrap());
        assert_eq!(lines.out, b"{\"a\":1}\n{\"b\":2}\n");
        lines.finish().unwrap();
        // Cut inside a line: that part is not written, and the end says so.
        assert!(lines.forward(b"{\"c\"").unwrap());
        assert_eq!(lines.out, b"{\"a\":1}\n{\"b\":2}\n");
        let err = lines.finish().unwrap_err().to_string();
        assert_eq!(err, "4 bytes of an unfinished line left out");
        // The agent's end line, split across reads, is seen as the last.
        let mut lines = super::Lines::new(Vec::new());
        assert!(
            lines
                .forward(b"{\"event\":\"heartbeat\"}\n{\"event\":\"e")
                .unwrap()
        );
        assert!(!lines.ended);
        assert!(lines.forward(b"nd\",\"timestamp\":1}\n").unwrap());
        assert!(lines.ended);
        assert!(lines.forward(b"{\"event\":\"heartbeat\"}\n").unwrap());
        assert!(!lines.ended);
    }

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
        let request = agent.as_ref().map(|agent| agent.request("/x", ""));
        assert_eq!(
            request.unwrap(),
            "GET /x HTTP/1.1\r\nHost: 127.0.0.1:9464\r\nAuthorization: Bearer s3cret\r\n\r\n"
        );
    }

    #[test]
    fn an_answer_without_an_end_of_line_is_read_no_further_than_a_line() {
        let plain =
            Endpoint::new(Some("127.0.0.1:9464".parse().unwrap()), None, None, None).unwrap();
        let mut endless = std::io::Cursor::new(vec![b'x'; 1 << 20]);
        let refused = plain.expect_ok(&mut endless).unwrap_err().to_string();
        assert_eq!(endless.position(), MAX_LINE);
        assert_eq!(
            refused,
            format!(
                "the collector at 127.0.0.1:9464 answered {}…",
                "x".repeat(SHOWN_STATUS_CHARS)
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
        let mut answer: &[u8] = b"content-length: 31\r\n\r\ntoo many event streams at once\n";
        let framing = read_head(&mut answer).unwrap();
        let reason = read_reason(&mut answer, framing);
        assert_eq!(
            plain
                .check_status(b"HTTP/1.1 503 Service Unavailable\r\n", reason.as_deref())
                .unwrap_err()
                .to_string(),
            "the collector at 127.0.0.1:9464 answered HTTP/1.1 503 Service Unavailable: too \
             many event streams at once (the agent's [http] max_event_streams; try again later)"
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

    /// `head` and `body` through [`read_head`] and the body reader it calls for, as
    /// `get_json` reads them, handed over one byte at a time when `bytewise`.
    fn answer(head: &str, body: &[u8], bytewise: bool) -> std::io::Result<(Framing, Vec<u8>)> {
        let text = [head.as_bytes(), body].concat();
        let mut reader = BufReader::with_capacity(if bytewise { 1 } else { 8192 }, &text[..]);
        let framing = read_head(&mut reader)?;
        let mut decoded = Vec::new();
        match framing {
            Framing::Chunked => {
                let mut chunked = Chunked::new(&mut reader);
                if bytewise {
                    let mut byte = [0];
                    while chunked.read(&mut byte)? == 1 {
                        decoded.push(byte[0]);
                    }
                } else {
                    chunked.read_to_end(&mut decoded)?;
                }
            }
            Framing::Length(length) => {
                (&mut reader).take(length).read_to_end(&mut decoded)?;
            }
            Framing::UntilClose => {
                reader.read_to_end(&mut decoded)?;
            }
        }
        Ok((framing, decoded))
    }

    #[test]
    fn the_body_is_delimited_as_the_header_fields_say() {
        let framing = |head: &str| read_head(&mut format!("{head}\r\n").as_bytes()).unwrap();
        for chunked in [
            "Transfer-Encoding: chunked\r\n",
            "TRANSFER-ENCODING: CHUNKED\r\n",
            "transfer-encoding:chunked\r\n",
            "Transfer-Encoding: \t chunked  \r\n",
            "Transfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: gzip,chunked;x=1\r\n",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
            // Bare LF line ends.
            "Content-Type: application/json\nTransfer-Encoding: chunked\n",
            // Transfer-Encoding outranks Content-Length.
            "Content-Length: 12\r\nTransfer-Encoding: chunked\r\n",
        ] {
            assert_eq!(framing(chunked), Framing::Chunked, "{chunked:?}");
        }
        for until_close in [
            "",
            "Transfer-Encoding: chunked, gzip\r\n",
            "Transfer-Encoding: chunkedx\r\n",
            "X-Transfer-Encoding: chunked\r\n",
            "Content-Type: text/plain; transfer-encoding: chunked\r\n",
        ] {
            assert_eq!(framing(until_close), Framing::UntilClose, "{until_close:?}");
        }
        assert_eq!(framing("content-length:  7 \r\n"), Framing::Length(7));
        let malformed = read_head(&mut &b"Content-Length: 7x\r\n\r\n"[..]).unwrap_err();
        assert_eq!(malformed.kind(), std::io::ErrorKind::InvalidData);
        let unended = read_head(&mut &b"Content-Length: 7\r\n"[..]).unwrap_err();
        assert_eq!(unended.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_chunked_body_is_decoded_with_its_extensions_and_trailers() {
        use std::io::ErrorKind::{InvalidData, UnexpectedEof};
        let json = br#"{"activeConnections":3}"#;
        for (head, body) in [
            // Split inside a key, lowercase and uppercase hex, a zero-padded size.
            (
                "Transfer-Encoding: chunked\r\n\r\n",
                &b"5\r\n{\"act\r\na\r\niveConnect\r\n0008\r\nions\":3}\r\n0\r\n\r\n"[..],
            ),
            // Extensions (with whitespace before the `;`), trailers, an uppercase header.
            (
                "TRANSFER-ENCODING:  Chunked\r\n\r\n",
                b"5 ;name=value\r\n{\"act\r\n12;a;b=\"c;d\"\r\niveConnections\":3}\r\n\
                  0;last\r\nX-Checksum: 1234\r\nServer-Timing: db;dur=53\r\n\r\n",
            ),
            // One chunk, a last chunk without trailers or final empty line (closed there).
            (
                "Transfer-Encoding: chunked\r\n\r\n",
                b"17\r\n{\"activeConnections\":3}\r\n0\r\n",
            ),
        ] {
            for bytewise in [false, true] {
                let (framing, decoded) = answer(head, body, bytewise).unwrap();
                assert_eq!(framing, Framing::Chunked);
                assert_eq!(
                    String::from_utf8_lossy(&decoded),
                    String::from_utf8_lossy(json),
                    "{body:?} bytewise {bytewise}"
                );
            }
        }
        // What follows the last chunk's trailers is not the body's.
        let text = b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\nHTTP/1.1 200 OK\r\n";
        let mut reader = &text[..];
        let mut decoded = Vec::new();
        Chunked::new(&mut reader).read_to_end(&mut decoded).unwrap();
        assert_eq!(
            (&decoded[..], reader),
            (&b"abc"[..], &b"HTTP/1.1 200 OK\r\n"[..])
        );

        let head = "Transfer-Encoding: chunked\r\n\r\n";
        let error = |body: &[u8]| answer(head, body, false).unwrap_err().kind();
        // Cut off before the last chunk, inside a chunk, inside a size line.
        assert_eq!(error(b"3\r\nabc\r\n"), UnexpectedEof);
        assert_eq!(error(b"5\r\nabc"), UnexpectedEof);
        assert_eq!(error(b"3\r\nabc\r\n1"), UnexpectedEof);
        // Longer than its size, a size that is not hex, none at all, one past 64 bits.
        assert_eq!(error(b"3\r\nabcd\r\n0\r\n\r\n"), InvalidData);
        assert_eq!(error(b"+3\r\nabc\r\n0\r\n\r\n"), InvalidData);
        assert_eq!(error(b";x\r\nabc\r\n0\r\n\r\n"), InvalidData);
        assert_eq!(error(b"10000000000000000\r\n"), InvalidData);
    }

    #[test]
    fn upstreams_follow_the_routes_in_a_table_of_their_own() {
        let snapshot = crate::snapshot::Snapshot::example();
        let mut proxy = serde_json::to_value(crate::api::proxy_stats(&snapshot)).unwrap();
        let table = proxy_table(&proxy);
        let lines: Vec<&str> = table.lines().collect();
        let heading = lines
            .iter()
            .position(|line| line.starts_with("UPSTREAM"))
            .unwrap_or_else(|| panic!("{table}"));
        // After the routes and their totals, which leave the upstreams out.
        assert!(lines[heading - 2].starts_with("total: 2 active, 12 connections"));
        assert_eq!(lines[heading - 1], "", "{table}");
        let app = lines[heading + 1];
        assert_eq!(
            app.split_whitespace().collect::<Vec<_>>(),
            [
                "app", "9000", "2", "1", "4", "3", "2", "33.3", "%", "7000", "600", "0.0008",
                "0.0010"
            ],
            "{table}"
        );
        // Every figure ends where its heading does.
        let header = lines[heading];
        for (heading, value) in [
            ("ACTIVE", " 2"),
            ("CONNECTING", " 1"),
            ("FAILED", " 2"),
            ("FAIL %", "33.3 %"),
            ("OUT BYTES", " 600"),
            ("P99 S 1M", "0.0010"),
        ] {
            let end = header.find(heading).unwrap() + heading.len();
            assert_eq!(&app[end - value.len()..end], value, "{heading}:\n{table}");
        }

        // Several ports; no connect yet, no close in the last minute: `-`, not zeros.
        proxy["upstreams"] = serde_json::json!([{
            "name": "db", "ports": [5432, 5433], "active": 0, "opened": 0, "closed": 0,
            "connectFailures": 0, "bytesIn": 0, "bytesOut": 0,
            "duration": {"count": 0, "p50": null, "p99": null}
        }]);
        let table = proxy_table(&proxy);
        let db = table.lines().find(|line| line.starts_with("db")).unwrap();
        assert_eq!(
            db.split_whitespace().collect::<Vec<_>>(),
            [
                "db",
                "5432,5433",
                "0",
                "0",
                "0",
                "0",
                "0",
                "-",
                "0",
                "0",
                "-",
                "-"
            ],
            "{table}"
        );

        // Three ports and a long run's bytes, wider than their headings: the columns widen,
        // and every figure still ends where its heading does.
        proxy["upstreams"] = serde_json::json!([{
            "name": "db", "ports": [8080, 8081, 8443], "active": 3, "opened": 9, "closed": 6,
            "connectFailures": 0, "bytesIn": 5, "bytesOut": 1_234_567_890_123_u64,
            "duration": {"count": 0, "p50": null, "p99": null}
        }]);
        let table = proxy_table(&proxy);
        let lines: Vec<&str> = table.lines().collect();
        let heading = lines
            .iter()
            .position(|l| l.starts_with("UPSTREAM"))
            .unwrap();
        let (header, db) = (lines[heading], lines[heading + 1]);
        for (heading, value) in [
            ("ACTIVE", " 3"),
            ("IN BYTES", " 5"),
            ("OUT BYTES", " 1234567890123"),
            ("P99 S 1M", " -"),
        ] {
            let end = header.find(heading).unwrap() + heading.len();
            assert_eq!(&db[end - value.len()..end], value, "{heading}:\n{table}");
        }

        // None configured, or an agent older than upstreams: no table at all.
        let routes_only = |proxy: &Value| {
            let table = proxy_table(proxy);
            assert!(!table.contains("UPSTREAM"), "{table}");
            assert!(table.ends_with("new/s\n"), "{table}");
        };
        proxy["upstreams"] = serde_json::json!([]);
        routes_only(&proxy);
        proxy.as_object_mut().unwrap().remove("upstreams");
        routes_only(&proxy);
    }

    #[test]
    fn routes_on_ports_shared_by_server_name_show_their_wait_and_their_names() {
        let snapshot = crate::snapshot::Snapshot::example();
        let mut proxy = serde_json::to_value(crate::api::proxy_stats(&snapshot)).unwrap();
        let table = proxy_table(&proxy);
        let lines: Vec<&str> = table.lines().collect();
        let header = lines[0];
        let row = |name: &str| {
            *lines
                .iter()
                .find(|line| line.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no {name} in\n{table}"))
        };
        // After ACTIVE, as CONNECTING is in the upstream table; `-` where a route has none.
        assert!(
            header.starts_with("ROUTE") && header.contains("ACTIVE AWAITING     OPENED"),
            "{table}"
        );
        for (route, value) in [("tls", " 2"), ("api", " -"), ("web", " -")] {
            let end = header.find("AWAITING").unwrap() + "AWAITING".len();
            assert_eq!(
                &row(route)[end - value.len()..end],
                value,
                "{route}:\n{table}"
            );
        }
        // Every figure after it stays under its heading.
        let opened = header.find("OPENED").unwrap() + "OPENED".len();
        assert_eq!(&row("tls")[opened - 2..opened], " 4", "{table}");
        assert!(
            lines.contains(&"  api by server name: api.example.com, *.api.example.com"),
            "{table}"
        );
        assert_eq!(
            lines
                .iter()
                .filter(|line| line.contains("by server name"))
                .count(),
            1,
            "{table}"
        );

        // No route on a shared port (or an agent older than server names): the table as
        // before, without the column or the names.
        proxy["routes"].as_array_mut().unwrap().truncate(1);
        let table = proxy_table(&proxy);
        assert!(
            !table.contains("AWAITING") && !table.contains("server name"),
            "{table}"
        );
        assert!(
            table
                .lines()
                .next()
                .unwrap()
                .starts_with("ROUTE            TYPE        ACTIVE     OPENED"),
            "{table}"
        );
    }

    #[test]
    fn the_proxy_table_shows_the_figures_people_look_for() {
        let proxy = serde_json::json!({
            "activeConnections": 2, "totalConnections": 5, "requestsPerSecond": 1.5,
            "routes": [{"name": "web", "type": "http", "active": 2, "opened": 5, "closed": 3,
                "connectionsPerSecond": {"instant": 1.5},
                "throughput": {"bytesIn": {"instant": 100.0}, "bytesOut": {"instant": 900.0}},
                "duration": {"p50": 0.25}}]
        });
        let table = proxy_table(&proxy);
        let web = table.lines().nth(1).unwrap();
        assert!(web.starts_with("web") && web.contains("http"), "{table}");
        assert!(
            web.split_whitespace().collect::<Vec<_>>()[2..5] == ["2", "5", "3"],
            "{web}"
        );
        assert!(table.contains("total: 2 active, 5 connections"));
        // Every number ends where its heading does.
        let header = table.lines().next().unwrap();
        for (heading, value) in [
            ("ACTIVE", " 2"),
            ("CLOSED", " 3"),
            ("IN B/S", " 100"),
            ("OUT B/S", " 900"),
            ("P50 S 1M", "0.2500"),
        ] {
            let end = header.find(heading).unwrap() + heading.len();
            assert_eq!(&web[end - value.len()..end], value, "{heading}:\n{table}");
        }
        // Also under a name longer than the column.
        let mut long = proxy.clone();
        long["routes"][0]["name"] = "payments-gateway-internal".into();
        let table = proxy_table(&long);
        let (header, row) = (table.lines().next().unwrap(), table.lines().nth(1).unwrap());
        let end = header.find("CLOSED").unwrap() + "CLOSED".len();
        assert_eq!(&row[end - 2..end], " 3", "{table}");
        // Nothing to take a figure from is `-`, not a zero: no close in the last minute, a
        // route with server names' live bytes.
        let idle = serde_json::json!({"routes": [{"name": "web", "duration": {"p50": null},
            "throughput": null}]});
        let web = proxy_table(&idle).lines().nth(1).unwrap().to_owned();
        assert!(
            web.split_whitespace().rev().take(3).all(|f| f == "-"),
            "{web}"
        );
    }

    #[test]
    fn the_dns_table_shows_the_figures_people_look_for() {
        let dns = serde_json::json!({
            "totalQueries": 9, "queriesPerSecond": 3.0, "totalResponses": 9, "errorRate": 0.0,
            "unansweredRate": 0.25,
            "cacheStats": {"hits": 8, "misses": 1, "hitRate": 0.888},
            "queryTypeBreakdown": {"A": 9}, "responseCodes": {"NOERROR": 9},
            "latency": {"p50": 0.001, "p99": 0.002, "count": 9},
            "topDomains": [{"domain": "example.com", "count": 9}],
            "topDomainsRecent": [{"domain": "example.com", "count": 2}],
            "topDomainsRecentSeconds": 420.0
        });
        let text = dns_table(&dns);
        assert!(
            text.contains("top domains, last 7 min:\n           2  example.com\n"),
            "{text}"
        );
        assert!(
            text.contains("cache since the start: 8 hits, 1 misses; hit rate 88.8 % (last minute)"),
            "{text}"
        );
        assert!(
            text.contains("error rate 0.0 %, unanswered 25.0 %"),
            "{text}"
        );
        assert!(!text.contains("undecided"), "{text}");
        let mut relayed = dns.clone();
        relayed["cacheStats"]["undecided"] = 4.into();
        assert!(
            dns_table(&relayed).contains("cache: 4 undecided (answers relayed"),
            "{text}"
        );
        assert!(
            text.contains("latency: p50 1.00 ms, p99 2.00 ms (9 answered"),
            "{text}"
        );
        assert!(!text.contains("matched"), "{text}");
        assert!(text.contains("types since the start: A 9"));
        // Classes only where one is not IN.
        assert!(!text.contains("classes"), "{text}");
        let mut probed = dns.clone();
        probed["queryClassBreakdown"] = serde_json::json!({"IN": 8, "CH": 1});
        let probed = dns_table(&probed);
        assert!(
            probed.contains("classes since the start: CH 1, IN 8\n"),
            "{probed}"
        );
        let mut quiet = dns.clone();
        quiet["queryTypeBreakdown"] = serde_json::json!({});
        quiet["responseCodes"] = serde_json::json!({});
        let quiet = dns_table(&quiet);
        assert!(
            quiet.contains("types since the start: -\ncodes since the start: -\n"),
            "{quiet}"
        );
        assert!(
            text.contains("top domains since the start:\n           9  example.com"),
            "{text}"
        );

        let unmatched = serde_json::json!({
            "totalQueries": 9, "matchResponses": false, "cacheStats": null, "latency": null,
            "queryTypeBreakdown": {"A": 9}, "responseCodes": {"NOERROR": 9}, "topDomains": []
        });
        let text = dns_table(&unmatched);
        assert!(
            !text.contains("hit rate") && !text.contains("p50"),
            "{text}"
        );
        assert!(text.contains("not measured ([dns] match_responses = false)"));

        // Nothing to take a figure from is `-`, not a zero; microseconds read as such; a
        // count that may be short says by how much.
        let idle = serde_json::json!({
            "errorRate": null, "cacheStats": {"hitRate": null},
            "latency": {"p50": 7.8e-6, "p99": null},
            "topDomains": [{"domain": "a.example", "count": 5, "maxUndercount": 410}]
        });
        let text = dns_table(&idle);
        assert!(
            text.contains("rate -, unanswered - (last minute)"),
            "{text}"
        );
        assert!(text.contains("hit rate - (last minute)"), "{text}");
        assert!(text.contains("latency: p50 7.8 µs, p99 -"), "{text}");
        assert!(text.contains("5  a.example  (up to 410 more)"), "{text}");

        let mut sampled = dns;
        sampled["matchEvery"] = 16.into();
        let text = dns_table(&sampled);
        assert!(
            text.contains("hit rate 88.8 % (last minute) (one query in 16 matched)")
                && text.contains("(9 answered in the last minute) (one query in 16 matched)"),
            "{text}"
        );

        // DNS off: said so, not a table of zeros "not measured" for another reason.
        let off = serde_json::json!({
            "enabled": false, "totalQueries": 0, "matchResponses": false,
            "queryTypeBreakdown": {}, "responseCodes": {}, "topDomains": []
        });
        assert_eq!(
            dns_table(&off),
            "DNS counting is off ([dns] enabled = false)\n"
        );
    }

    #[test]
    fn stale_empty_or_partial_figures_are_said_to_be() {
        let now = 1_700_000_010_000;
        let fresh = serde_json::json!({
            "timestamp": 1_700_000_000_000_u64, "ageMs": 900, "pollIntervalMs": 1000,
            "sources": {"ebpf": {"up": true}, "nftables": {"up": true}}
        });
        assert_eq!(freshness(&fresh, now), "");
        // Before a first poll the agent answers with empty figures, read at no time (0 from
        // an agent before 2026-12-05).
        let starting = serde_json::json!({"timestamp": null, "ageMs": null, "sources": {}});
        assert!(
            freshness(&starting, now).starts_with("no poll has finished yet"),
            "{}",
            freshness(&starting, now)
        );
        // 4 s old is fresh at 5 s polls, stale at 1 s polls.
        let slow_polls = serde_json::json!({
            "timestamp": 1_700_000_000_000_u64, "ageMs": 4_000, "pollIntervalMs": 5000
        });
        assert_eq!(freshness(&slow_polls, now), "");
        // A poll that cannot read the kernel keeps the last figures: their age, and why.
        let stuck = serde_json::json!({
            "timestamp": 1_700_000_000_000_u64, "ageMs": 12_400, "pollIntervalMs": 1000,
            "sources": {
                "ebpf": {"up": false, "lastError": "reading CONN_COUNTERS: EBADF"},
                "netlink": {"up": true}
            }
        });
        assert_eq!(
            freshness(&stuck, now),
            "figures as read 12 s ago (polls every 1 s): the agent's polls have not moved them \
             since\nsource ebpf is down: reading CONN_COUNTERS: EBADF\n\n"
        );
        // An agent from before `ageMs`: the read's time against this clock, the interval
        // taken as the default.
        let older = serde_json::json!({"timestamp": now - 5_000});
        assert!(
            freshness(&older, now).starts_with("figures as read 5 s ago"),
            "{}",
            freshness(&older, now)
        );
        assert_eq!(
            freshness(&serde_json::json!({"timestamp": now - 1_000}), now),
            ""
        );
    }
}
