//! HTTPS for the endpoint (rustls). The certificate and key are read at start, so that a bad
//! pair stops the agent with the reason, and read again whenever either file changes:
//! cert-manager and similar tools rotate them in place, and a restart would reset counters.
//! Each handshake runs on its connection's task (see `serve`), with a time limit.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use rustls::{
    ServerConfig,
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::{
    file_version::FileVersion,
    secret_reloads::{Secret, SecretReloads},
};

/// The certificate chain and private key files (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A server config whose certificate follows its files; `reloads` hears how each reload
/// went and when the certificate served expires.
pub fn server_config(
    files: &TlsFiles,
    reloads: Arc<SecretReloads>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let stamp = stamp(files)?;
    let (key, not_after) = load(files)?;
    reloads.read_at_start(Secret::Tls);
    reloads.certificate_served(not_after);
    let resolver = Arc::new(ReloadingCert {
        current: Mutex::new(Loaded {
            stamp: Some(stamp),
            key,
        }),
        files: files.clone(),
        reloads,
    });
    // Weak: the resolver holds `reloads`.
    let looked_at = Arc::downgrade(&resolver);
    resolver.reloads.look_at_certificate_with(move || {
        if let Some(resolver) = looked_at.upgrade() {
            resolver.current();
        }
    });
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("choosing the TLS versions")?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

struct Loaded {
    /// `None` while a file is gone.
    stamp: Option<(FileVersion, FileVersion)>,
    key: Arc<CertifiedKey>,
}

struct ReloadingCert {
    files: TlsFiles,
    current: Mutex<Loaded>,
    reloads: Arc<SecretReloads>,
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ReloadingCert {
    /// The certificate to serve: read again if a file changed since the last look.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        // Two stats per handshake; the files are read only when one changed. A file gone
        // fails as one that does not load, and is read again when it is back.
        let found = stamp(&self.files);
        let now = found.as_ref().ok().copied();
        if now != current.stamp {
            // Remembered even on failure: a half-done rotation is retried when the other file
            // changes, not logged on every handshake.
            current.stamp = now;
            match found.and_then(|_| load(&self.files)) {
                Ok((key, not_after)) => {
                    tracing::info!(cert = %self.files.cert.display(), "reloaded the TLS certificate");
                    current.key = key;
                    self.reloads.certificate_served(not_after);
                    self.reloads.reloaded(Secret::Tls, true);
                }
                Err(err) => {
                    tracing::warn!(
                        "keeping the previous TLS certificate: reloading it failed: {err:#}"
                    );
                    self.reloads.reloaded(Secret::Tls, false);
                }
            }
        }
        Arc::clone(&current.key)
    }
}

fn stamp(files: &TlsFiles) -> anyhow::Result<(FileVersion, FileVersion)> {
    let version =
        |path: &Path| FileVersion::of(path).with_context(|| format!("reading {}", path.display()));
    Ok((version(&files.cert)?, version(&files.key)?))
}

/// The certificate and key, and when the certificate expires (seconds since the epoch; `None`
/// if that cannot be read from a certificate rustls takes).
fn load(files: &TlsFiles) -> anyhow::Result<(Arc<CertifiedKey>, Option<i64>)> {
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("reading the TLS certificate {}", files.cert.display()))?;
    ensure!(
        !chain.is_empty(),
        "the TLS certificate file {} holds no certificate",
        files.cert.display()
    );
    let not_after = x509_parser::parse_x509_certificate(&chain[0])
        .ok()
        .map(|(_, certificate)| certificate.validity().not_after.timestamp());
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("reading the TLS key {}", files.key.display()))?;
    let certified =
        CertifiedKey::from_der(chain, key, &ring::default_provider()).with_context(|| {
            format!(
                "the TLS key {} does not fit the certificate {}",
                files.key.display(),
                files.cert.display()
            )
        })?;
    Ok((Arc::new(certified), not_after))
}

/// The TLS handshake of an accepted connection, within `within` (`[http]
/// tls_handshake_timeout_ms`); `None` (said at debug level) when it fails or takes too long.
pub async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    within: Duration,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(within, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(err)) => {
            tracing::debug!(%peer, "TLS handshake failed: {err}");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}
