//! Whether each secret file the endpoint serves with was read again successfully after its
//! last change, and when the certificate served expires: for `/metrics`, and so for alerts.
//! A reload that fails keeps the previous secret, so that the endpoint goes on serving; that
//! showed only in the log. A renewed certificate that could not be loaded was served until
//! it expired and every scrape failed; a users file edited to revoke a leaked password, with
//! a typo on another line, left the old passwords valid.

use std::{
    fmt,
    sync::{
        OnceLock,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
};

/// A secret the endpoint reads again when its file changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secret {
    /// The certificate chain and its key, loaded as a pair.
    Tls,
    BearerToken,
    BasicAuthUsers,
}

impl Secret {
    pub const ALL: [Self; 3] = [Self::Tls, Self::BearerToken, Self::BasicAuthUsers];

    /// Its `secret` label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::BearerToken => "bearer_token",
            Self::BasicAuthUsers => "basic_auth_users",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Shared by the TLS resolver, the credentials and `/metrics`.
#[derive(Debug, Default)]
pub struct SecretReloads {
    /// Per secret, in [`Secret::ALL`]'s order: configured (read at the start).
    in_use: [AtomicBool; 3],
    /// Per secret: its last reload failed, and the previous secret is still used.
    failing: [AtomicBool; 3],
    /// The served certificate's `notAfter`, in seconds since the epoch; `i64::MIN` when it
    /// could not be read.
    certificate_not_after: AtomicI64,
    /// Looks at the certificate's files again (set by `tls::server_config`).
    certificate_look: OnceLock<CertificateLook>,
}

/// What reads the certificate's files again when they changed, for [`SecretReloads`].
struct CertificateLook(Box<dyn Fn() + Send + Sync>);

impl fmt::Debug for CertificateLook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertificateLook")
    }
}

impl SecretReloads {
    /// `secret` was read at the start, and is read again when its file changes.
    pub fn read_at_start(&self, secret: Secret) {
        self.in_use[secret.index()].store(true, Ordering::Relaxed);
    }

    /// `secret` was read again: `ok`, or the previous one is kept.
    pub fn reloaded(&self, secret: Secret, ok: bool) {
        self.failing[secret.index()].store(!ok, Ordering::Relaxed);
    }

    /// The certificate now served expires at `not_after` (seconds since the epoch).
    pub fn certificate_served(&self, not_after: Option<i64>) {
        self.certificate_not_after
            .store(not_after.unwrap_or(i64::MIN), Ordering::Relaxed);
    }

    /// `look` reads the certificate's files again when they changed (the first one given
    /// stays).
    pub fn look_at_certificate_with(&self, look: impl Fn() + Send + Sync + 'static) {
        let _ = self.certificate_look.set(CertificateLook(Box::new(look)));
    }

    /// Reads the certificate's files again if they changed, as a handshake does: a scraper
    /// that keeps its connection open (Prometheus does) makes no handshake for weeks, and
    /// the figures would tell of a certificate long replaced on disk, or hide a renewal
    /// that cannot be loaded.
    pub fn look_at_certificate(&self) {
        if let Some(look) = self.certificate_look.get() {
            (look.0)();
        }
    }

    /// Each secret in use, and whether its last reload succeeded.
    pub fn last_reloads(&self) -> impl Iterator<Item = (Secret, bool)> + '_ {
        Secret::ALL
            .into_iter()
            .filter(|secret| self.in_use[secret.index()].load(Ordering::Relaxed))
            .map(|secret| {
                (
                    secret,
                    !self.failing[secret.index()].load(Ordering::Relaxed),
                )
            })
    }

    /// When the certificate served expires, if TLS is on and that could be read.
    #[must_use]
    pub fn certificate_not_after(&self) -> Option<i64> {
        let not_after = self.certificate_not_after.load(Ordering::Relaxed);
        (self.in_use[Secret::Tls.index()].load(Ordering::Relaxed) && not_after != i64::MIN)
            .then_some(not_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_secrets_in_use_are_shown_each_with_its_last_reload() {
        let reloads = SecretReloads::default();
        assert_eq!(reloads.last_reloads().count(), 0);
        assert_eq!(reloads.certificate_not_after(), None);
        reloads.read_at_start(Secret::Tls);
        reloads.read_at_start(Secret::BasicAuthUsers);
        reloads.certificate_served(Some(1_800_000_000));
        reloads.reloaded(Secret::BasicAuthUsers, false);
        assert_eq!(
            reloads.last_reloads().collect::<Vec<_>>(),
            [(Secret::Tls, true), (Secret::BasicAuthUsers, false)]
        );
        assert_eq!(reloads.certificate_not_after(), Some(1_800_000_000));
        reloads.reloaded(Secret::BasicAuthUsers, true);
        reloads.certificate_served(None);
        assert_eq!(
            reloads.last_reloads().collect::<Vec<_>>(),
            [(Secret::Tls, true), (Secret::BasicAuthUsers, true)]
        );
        assert_eq!(reloads.certificate_not_after(), None);
    }
}
