//! Who may read the HTTP endpoint: a bearer token, basic-auth users, or both (either one
//! admits). Secrets live in files of their own, apart from the config, so that they can come
//! from a Kubernetes Secret or a root-only file.
//!
//! Users come from an htpasswd file (`htpasswd -B -c FILE USER`) and only bcrypt hashes are
//! accepted: a leaked file must not give the passwords away. A bcrypt check costs tens of
//! milliseconds by design, so it runs off the async workers, at most
//! [`PASSWORD_CHECKS_AT_ONCE`] at a time (more wait their turn, for as long as they are
//! given): wrong passwords, which are never remembered, cannot take more than that many CPUs
//! from the proxy on the same host. The last password that passed for each user is
//! remembered: a scrape every 15 s pays for it once, and is then judged at once, like a
//! token, without waiting behind the checks of wrong ones ([`Credentials::judge`]).
//!
//! Both files are read again when their modification time changes, as the TLS files are: a
//! rotated Secret must not leave every scrape refused until a restart, which would reset the
//! counters.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::Context as _;
use axum::http::{HeaderMap, header};
use base64::{Engine as _, engine::general_purpose::STANDARD};

use crate::{
    config::HttpConfig,
    file_version::FileVersion,
    secret_reloads::{Secret, SecretReloads},
};

/// bcrypt checks run at once, over all users and requests: one, so that wrong passwords
/// sent by anyone who can reach the port take at most one CPU from the proxy beside us.
const PASSWORD_CHECKS_AT_ONCE: usize = 1;

/// The credentials the endpoint accepts.
#[derive(Clone, Default)]
pub struct Credentials {
    token: Option<Arc<SecretFile<String>>>,
    users: Option<Arc<SecretFile<Users>>>,
    /// Kept across reloads of the users file.
    checks: Arc<PasswordChecks>,
}

/// The turns to run a bcrypt check.
struct PasswordChecks {
    turns: Arc<tokio::sync::Semaphore>,
    /// Checks running now and the most ever at once, and checks waiting for a turn, for the
    /// tests.
    #[cfg(test)]
    running: std::sync::atomic::AtomicUsize,
    #[cfg(test)]
    most: std::sync::atomic::AtomicUsize,
    #[cfg(test)]
    waiting: std::sync::atomic::AtomicUsize,
}

impl Default for PasswordChecks {
    fn default() -> Self {
        Self {
            turns: Arc::new(tokio::sync::Semaphore::new(PASSWORD_CHECKS_AT_ONCE)),
            #[cfg(test)]
            running: std::sync::atomic::AtomicUsize::new(0),
            #[cfg(test)]
            most: std::sync::atomic::AtomicUsize::new(0),
            #[cfg(test)]
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl PasswordChecks {
    /// A turn to run a check, once one is free; `None` if none is free `within` (or the
    /// turns are closed, which they never are).
    async fn turn(&self, within: Duration) -> Option<tokio::sync::OwnedSemaphorePermit> {
        #[cfg(test)]
        let _counted = Counted::new(&self.waiting);
        let turn = Arc::clone(&self.turns).acquire_owned();
        tokio::time::timeout(within, turn).await.ok()?.ok()
    }

    /// Whether `password` matches the bcrypt `hash`, checked in `turn` (with the request's
    /// place in its address's queue, if it holds one); `None` if the check panicked.
    async fn verify(
        self: &Arc<Self>,
        turn: (
            tokio::sync::OwnedSemaphorePermit,
            Option<tokio::sync::OwnedSemaphorePermit>,
        ),
        password: String,
        hash: String,
    ) -> Option<bool> {
        #[cfg(test)]
        let checks = Arc::clone(self);
        // The turn and the place go with the check, not with the request: a request dropped
        // while it waits for the check (its client gone) must not free a turn the check still
        // uses, nor its address's place (a client that hangs up after each wrong password
        // would queue as many checks as it opens connections).
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            #[cfg(test)]
            let _counted = checks.count();
            bcrypt::verify(password, &hash).unwrap_or(false)
        })
        .await
        .ok()
    }

    #[cfg(test)]
    fn count(&self) -> impl Drop + '_ {
        use std::sync::atomic::Ordering::SeqCst;
        struct Running<'a>(&'a PasswordChecks);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.running.fetch_sub(1, SeqCst);
            }
        }
        let now = self.running.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        Running(self)
    }
}

/// Counts one up while it lives, for the tests.
#[cfg(test)]
struct Counted<'a>(&'a std::sync::atomic::AtomicUsize);

#[cfg(test)]
impl<'a> Counted<'a> {
    fn new(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(count)
    }
}

#[cfg(test)]
impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

struct Users {
    hashes: HashMap<String, String>,
    /// Per user, the last password that matched its hash.
    verified: Mutex<HashMap<String, String>>,
}

/// A secret read from a file, and read again when the file changes (one stat per request).
/// A file that fails to read or parse keeps the previous secret, and says so once per change,
/// in the log and to `reloads`.
struct SecretFile<T> {
    path: PathBuf,
    read: fn(&Path) -> anyhow::Result<T>,
    current: Mutex<(Option<FileVersion>, Arc<T>)>,
    secret: Secret,
    reloads: Arc<SecretReloads>,
}

impl<T> SecretFile<T> {
    fn open(
        path: &Path,
        read: fn(&Path) -> anyhow::Result<T>,
        secret: Secret,
        reloads: &Arc<SecretReloads>,
    ) -> anyhow::Result<Arc<Self>> {
        let stamp = FileVersion::of(path).ok();
        let value = read(path)?;
        reloads.read_at_start(secret);
        Ok(Arc::new(Self {
            path: path.to_owned(),
            read,
            current: Mutex::new((stamp, Arc::new(value))),
            secret,
            reloads: Arc::clone(reloads),
        }))
    }

    fn current(&self) -> Arc<T> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        // A file gone (deleted to revoke it, say) fails as one that does not parse: the
        // previous secret stays, the failure is said, and the file is read when it is back.
        let found =
            FileVersion::of(&self.path).with_context(|| format!("reading {}", self.path.display()));
        let stamp = found.as_ref().ok().copied();
        if stamp != current.0 {
            current.0 = stamp;
            match found.and_then(|_| (self.read)(&self.path)) {
                Ok(value) => {
                    tracing::info!(file = %self.path.display(), "reloaded the credentials");
                    current.1 = Arc::new(value);
                    self.reloads.reloaded(self.secret, true);
                }
                Err(err) => {
                    tracing::warn!(
                        "keeping the previous credentials: reloading them failed: {err:#}"
                    );
                    self.reloads.reloaded(self.secret, false);
                }
            }
        }
        Arc::clone(&current.1)
    }
}

/// Why a request was refused, and how it may authenticate.
#[derive(Debug, PartialEq, Eq)]
pub struct Challenge(pub &'static str);

/// What the credentials a request carries come to, judged at once.
#[must_use]
pub enum Judgement {
    /// No credentials required, a valid token, or the password that last passed.
    Admitted,
    /// Nothing that could pass.
    Refused(Challenge),
    /// A real user's password that only a bcrypt check can tell.
    Check(PasswordCheck),
}

/// A real user's password to check against its bcrypt hash ([`PasswordCheck::run`]).
pub struct PasswordCheck {
    /// The users file, read again once the check has its turn.
    source: Arc<SecretFile<Users>>,
    checks: Arc<PasswordChecks>,
    user: String,
    password: String,
    challenge: Challenge,
    /// The request's place in its address's queue for the turns, held until the check ends.
    queue_place: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Why a password check did not admit its request.
#[derive(Debug, PartialEq, Eq)]
pub enum CheckRefused {
    /// The password is wrong.
    Wrong(Challenge),
    /// No turn to check it came in the time given.
    NoTurn,
}

impl Credentials {
    /// Reads the token and user files the config names; `reloads` hears how each later
    /// read went.
    pub fn from_config(http: &HttpConfig, reloads: &Arc<SecretReloads>) -> anyhow::Result<Self> {
        let token = match &http.bearer_token_file {
            Some(path) => Some(SecretFile::open(
                path,
                read_token,
                Secret::BearerToken,
                reloads,
            )?),
            None => None,
        };
        let users = match &http.basic_auth_users_file {
            Some(path) => Some(SecretFile::open(
                path,
                read_users,
                Secret::BasicAuthUsers,
                reloads,
            )?),
            None => None,
        };
        Ok(Self {
            token,
            users,
            checks: Arc::default(),
        })
    }

    /// Whether any credentials are required.
    #[must_use]
    pub fn required(&self) -> bool {
        self.token.is_some() || self.users.is_some()
    }

    /// Judges a request's credentials without a bcrypt check: a bearer token, a user unknown
    /// or malformed, and a user's password that passed last time are told at once; any other
    /// password of a real user needs its check.
    pub fn judge(&self, headers: &HeaderMap) -> Judgement {
        if !self.required() {
            return Judgement::Admitted;
        }
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok());
        if let (Some(token), Some(given)) =
            (&self.token, given.and_then(|v| credentials_of(v, "Bearer")))
            && same_secret(given.as_bytes(), token.current().as_bytes())
        {
            return Judgement::Admitted;
        }
        let challenge = Challenge(match (&self.token, &self.users) {
            (Some(_), Some(_)) => "Basic realm=\"collector\", Bearer",
            (None, Some(_)) => "Basic realm=\"collector\"",
            _ => "Bearer",
        });
        if let (Some(source), Some(given)) =
            (&self.users, given.and_then(|v| credentials_of(v, "Basic")))
            && let Some((user, password)) = decode_basic(given)
        {
            let users = source.current();
            if users.hashes.contains_key(&user) {
                if users.remembered(&user, &password) {
                    return Judgement::Admitted;
                }
                return Judgement::Check(PasswordCheck {
                    source: Arc::clone(source),
                    checks: Arc::clone(&self.checks),
                    user,
                    password,
                    challenge,
                    queue_place: None,
                });
            }
        }
        Judgement::Refused(challenge)
    }

    /// Holds every turn to run a bcrypt check until the result is dropped, for the tests.
    #[cfg(test)]
    pub fn hold_password_turns(&self) -> tokio::sync::OwnedSemaphorePermit {
        let turns = u32::try_from(PASSWORD_CHECKS_AT_ONCE).unwrap();
        Arc::clone(&self.checks.turns)
            .try_acquire_many_owned(turns)
            .unwrap()
    }

    /// Password checks waiting for a turn now, for the tests.
    #[cfg(test)]
    pub fn password_checks_waiting(&self) -> usize {
        self.checks
            .waiting
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl PasswordCheck {
    /// Holds `place` (the request's in its address's queue) until the check has run, even
    /// when the request is dropped before.
    #[must_use]
    pub fn holding(mut self, place: tokio::sync::OwnedSemaphorePermit) -> Self {
        self.queue_place = Some(place);
        self
    }

    /// Runs the check once a turn is free, waiting at most `within` for one. The password
    /// is remembered for its user if it matches.
    pub async fn run(self, within: Duration) -> Result<(), CheckRefused> {
        let Self {
            source,
            checks,
            user,
            password,
            challenge,
            queue_place,
        } = self;
        let turn = checks.turn(within).await.ok_or(CheckRefused::NoTurn)?;
        // The file as it is now decides: a user removed, or given another password, while
        // the request waited for its turn is judged by what replaced the old hash.
        let users = source.current();
        let Some(hash) = users.hashes.get(&user).cloned() else {
            return Err(CheckRefused::Wrong(challenge));
        };
        // The same password may have passed while this request waited for its turn.
        if users.remembered(&user, &password) {
            return Ok(());
        }
        let matches = checks
            .verify((turn, queue_place), password.clone(), hash.clone())
            .await
            .unwrap_or(false);
        // And as it is after the check, which takes a while: a user removed, or given
        // another password, meanwhile is refused (a client with the new one asks again).
        let users = source.current();
        if !matches || users.hashes.get(&user) != Some(&hash) {
            return Err(CheckRefused::Wrong(challenge));
        }
        users
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(user, password);
        Ok(())
    }
}

impl Users {
    /// Whether `password` is the last that matched `user`'s hash.
    fn remembered(&self, user: &str, password: &str) -> bool {
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(user)
            .is_some_and(|known| same_secret(password.as_bytes(), known.as_bytes()))
    }
}

/// `user:password` from the base64 of a Basic authorization.
fn decode_basic(given: &str) -> Option<(String, String)> {
    let decoded = String::from_utf8(STANDARD.decode(given.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// The credentials of an `Authorization` value in `scheme`, which HTTP matches without
/// regard to case, after one or more spaces (RFC 9110, 11.4): `bearer  tok` is a token too.
fn credentials_of<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let (given, credentials) = value.split_once(' ')?;
    given
        .eq_ignore_ascii_case(scheme)
        .then(|| credentials.trim_start_matches(' '))
}

/// Compares in a time that depends on the expected secret's length alone: not on where the
/// first difference is, nor on whether the lengths match (an early return on a length told a
/// client, by timing, when it had guessed the token's length).
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let lengths_differ = u8::from(given.len() != expected.len());
    expected
        .iter()
        .enumerate()
        .fold(lengths_differ, |acc, (at, byte)| {
            acc | (byte ^ given.get(at).copied().unwrap_or(!byte))
        })
        == 0
}

/// The bearer token in the file at `path` (see [`parse_token`]): the agent's, and the one
/// the CLI sends.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    read_secret(path, "bearer token file", parse_token)
}

/// The secret file at `path` (`what` it is, for the messages) as `parse` reads it; its
/// refusal names the file and the line (0: the whole file).
fn read_secret<T>(
    path: &Path,
    what: &str,
    parse: impl FnOnce(&str) -> Result<T, (usize, String)>,
) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the {what} {}", path.display()))?;
    parse(&text).map_err(|(line, reason)| match line {
        0 => anyhow::anyhow!("the {what} {} {reason}", path.display()),
        line => anyhow::anyhow!("the {what} {}, line {line}: {reason}", path.display()),
    })
}

/// The one token a token file holds, on a line of its own, blank lines and white space
/// around it aside. Refused, with the line (0: the whole file), where no request could match
/// it: a second line (a rotation that appended the new token) would have made one token of
/// both, and a character a request's `Authorization` header cannot carry (anything but
/// visible ASCII) refused every request, each loaded without a word.
fn parse_token(text: &str) -> Result<String, (usize, String)> {
    let mut lines = (1..)
        .zip(without_byte_order_mark(text).lines())
        .map(|(number, line)| (number, line.trim()))
        .filter(|(_, line)| !line.is_empty());
    let Some((number, token)) = lines.next() else {
        return Err((0, "is empty".to_owned()));
    };
    if let Some((second, _)) = lines.next() {
        return Err((
            second,
            "a second token: the file holds one (replace it to rotate)".to_owned(),
        ));
    }
    if let Some(bad) = token.chars().find(|c| !c.is_ascii_graphic()) {
        return Err((
            number,
            format!(
                "{bad:?} in the token, which a request's Authorization header cannot carry \
                 (visible ASCII only)"
            ),
        ));
    }
    Ok(token.to_owned())
}

/// `text` without the byte order mark some editors write first: no part of a secret.
fn without_byte_order_mark(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

fn read_users(path: &Path) -> anyhow::Result<Users> {
    let hashes = read_secret(path, "basic-auth users file", parse_htpasswd)?;
    Ok(Users {
        hashes,
        verified: Mutex::default(),
    })
}

/// The least cost bcrypt takes (a hash below it never verifies).
const BCRYPT_MIN_COST: u32 = 4;
/// The most this endpoint takes: a check at cost 16 takes seconds (each step doubles it), and
/// it holds the one turn all password checks share (htpasswd -B makes 5; 10 to 12 is usual).
const BCRYPT_MAX_COST: u32 = 16;

/// `user:bcrypt-hash` per line; blank lines and `#` comments are skipped.
fn parse_htpasswd(text: &str) -> Result<HashMap<String, String>, (usize, String)> {
    let mut users = HashMap::new();
    for (index, line) in without_byte_order_mark(text).lines().enumerate() {
        let number = index + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            return Err((number, "expected user:hash".to_owned()));
        };
        if user.is_empty() {
            return Err((number, "the user name is empty".to_owned()));
        }
        // The form alone: checking each hash (verifying a password against it) would run
        // bcrypt at its full cost once per user, at every change of the file.
        let parts = ["$2a$", "$2b$", "$2y$"]
            .iter()
            .any(|p| hash.starts_with(p))
            .then(|| hash.parse::<bcrypt::HashParts>().ok())
            .flatten();
        let Some(parts) = parts.filter(|parts| parts.get_cost() >= BCRYPT_MIN_COST) else {
            return Err((
                number,
                format!(
                    "the hash of {user:?} is not bcrypt (only bcrypt is accepted: htpasswd -B)"
                ),
            ));
        };
        if parts.get_cost() > BCRYPT_MAX_COST {
            return Err((
                number,
                format!(
                    "the hash of {user:?} has cost {}: at most {BCRYPT_MAX_COST} is taken, as each \
                     check would take seconds and hold up every other (htpasswd -B -C 12)",
                    parts.get_cost()
                ),
            ));
        }
        if users.insert(user.to_owned(), hash.to_owned()).is_some() {
            return Err((number, format!("{user:?} is listed twice")));
        }
    }
    if users.is_empty() {
        return Err((1, "no users listed".to_owned()));
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::ScratchDir;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cre", b"s3cret"));
        assert!(!same_secret(b"s3creT", b"s3cret"));
        assert!(!same_secret(b"", b"s3cret"));
        // Longer, with the secret as its start; and a secret of zero bytes, given nothing.
        assert!(!same_secret(b"s3cret!", b"s3cret"));
        assert!(!same_secret(b"s3cret\0", b"s3cret"));
        assert!(same_secret(b"", b""));
        assert!(!same_secret(b"x", b""));
    }

    /// Until 2026-12-06 each of the refused files below loaded without a word, and every
    /// request but the probes was then refused (401), a reload counted as successful.
    #[test]
    fn a_token_file_holds_one_token_a_request_can_carry() {
        assert_eq!(parse_token("s3cret\n"), Ok("s3cret".to_owned()));
        assert_eq!(parse_token("\n  s3cret \r\n\n"), Ok("s3cret".to_owned()));
        // A byte order mark first (an editor's) is no part of it.
        assert_eq!(parse_token("\u{feff}s3cret\n"), Ok("s3cret".to_owned()));
        assert_eq!(parse_token(" \n\n"), Err((0, "is empty".to_owned())));
        // A rotation that appended the new token: one token of both matched no request.
        let (line, reason) = parse_token("old\nnew\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(reason.starts_with("a second token"), "{reason}");
        let (line, reason) = parse_token("\nt\u{e9}st\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(reason.starts_with("'é' in the token"), "{reason}");
        assert_eq!(parse_token("a b\n").unwrap_err().0, 1);
        let scratch = ScratchDir::new("token");
        let path = scratch.write("token", "old\nnew\n");
        let err = read_token(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "the bearer token file {}, line 2: a second token: the file holds one (replace \
                 it to rotate)",
                path.display()
            )
        );
    }

    #[test]
    fn a_users_file_may_begin_with_a_byte_order_mark() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let scratch = ScratchDir::new("users");
        let users = read_users(&scratch.write("users", format!("\u{feff}prometheus:{hash}\n")));
        assert_eq!(
            users.unwrap().hashes.keys().collect::<Vec<_>>(),
            ["prometheus"]
        );
    }

    #[test]
    fn htpasswd_takes_bcrypt_only_and_says_where_it_is_wrong() {
        let hash = bcrypt::hash("pw", 4).unwrap();
        let users = parse_htpasswd(&format!("# scrapers\n\nprometheus:{hash}\n")).unwrap();
        assert_eq!(users["prometheus"], hash);
        assert_eq!(
            parse_htpasswd("a:$apr1$xyz$abc\n").unwrap_err().0,
            1,
            "MD5 (apr1) hashes are refused"
        );
        let err = parse_htpasswd(&format!("a:{hash}\nb:{{SHA}}abc=\n")).unwrap_err();
        assert_eq!(err.0, 2);
        assert!(err.1.contains("not bcrypt"), "{}", err.1);
        assert_eq!(parse_htpasswd("nocolon\n").unwrap_err().0, 1);
        assert!(
            parse_htpasswd(&format!("a:{hash}\na:{hash}\n"))
                .unwrap_err()
                .1
                .contains("twice")
        );
        assert!(parse_htpasswd("# nobody\n").is_err());
        // The form is checked without running bcrypt: a cut hash, one with a cost bcrypt
        // refuses, and one whose salt is not bcrypt's base64 are refused by their line.
        let cut = &hash[..50];
        let too_cheap = hash.replacen("$04$", "$03$", 1);
        let bad_salt = format!("{}!{}", &hash[..7], &hash[8..]);
        for (wrong, what) in [(cut, "cut"), (&too_cheap, "cost 3"), (&bad_salt, "salt")] {
            let err = parse_htpasswd(&format!("a:{hash}\nb:{wrong}\n")).unwrap_err();
            assert_eq!(err.0, 2, "{what}");
        }
        // A cost of 16 takes seconds to verify: accepted as its form is right, and not run;
        // above it, refused by its line.
        let costly = hash.replacen("$04$", "$16$", 1);
        assert!(parse_htpasswd(&format!("a:{costly}\n")).is_ok());
        let too_costly = hash.replacen("$04$", "$17$", 1);
        let err = parse_htpasswd(&format!("a:{hash}\nb:{too_costly}\n")).unwrap_err();
        assert_eq!(err.0, 2);
        assert!(err.1.contains("cost 17"), "{}", err.1);
    }

    #[tokio::test]
    async fn without_credentials_configured_everyone_is_admitted() {
        assert_eq!(
            admit(&Credentials::default(), &HeaderMap::new()).await,
            Ok(())
        );
    }

    fn config(token: Option<PathBuf>, users: Option<PathBuf>) -> HttpConfig {
        let mut http = crate::config::Config::embedded_default().http;
        http.bearer_token_file = token;
        http.basic_auth_users_file = users;
        http
    }

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    fn basic(user_password: &str) -> HeaderMap {
        with(&format!("Basic {}", STANDARD.encode(user_password)))
    }

    /// What a request with `headers` comes to, given all the time it takes for a turn.
    async fn admit(credentials: &Credentials, headers: &HeaderMap) -> Result<(), Challenge> {
        match credentials.judge(headers) {
            Judgement::Admitted => Ok(()),
            Judgement::Refused(challenge) => Err(challenge),
            Judgement::Check(check) => match check.run(Duration::from_mins(10)).await {
                Ok(()) => Ok(()),
                Err(CheckRefused::Wrong(challenge)) => Err(challenge),
                Err(CheckRefused::NoTurn) => panic!("no turn to check a password in 10 minutes"),
            },
        }
    }

    /// Credentials with the token `tok` and the user `u`, password `pw`, in files of `scratch`.
    fn token_and_user(scratch: &ScratchDir) -> Credentials {
        let hash = bcrypt::hash("pw", 4).unwrap();
        Credentials::from_config(
            &config(
                Some(scratch.write_aged("token", "tok\n", 1)),
                Some(scratch.write_aged("users", &format!("u:{hash}\n"), 1)),
            ),
            &Arc::default(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn tokens_and_remembered_passwords_need_no_turn_and_others_wait_for_one_in_time() {
        let scratch = ScratchDir::new("auth-no-turn");
        let credentials = token_and_user(&scratch);
        assert_eq!(admit(&credentials, &basic("u:pw")).await, Ok(()));
        let held = credentials.hold_password_turns();
        // Judged at once, with every turn taken.
        assert!(matches!(
            credentials.judge(&basic("u:pw")),
            Judgement::Admitted
        ));
        assert!(matches!(
            credentials.judge(&with("Bearer tok")),
            Judgement::Admitted
        ));
        for refused in [basic("x:pw"), with("Bearer nope"), HeaderMap::new()] {
            assert!(matches!(
                credentials.judge(&refused),
                Judgement::Refused(Challenge("Basic realm=\"collector\", Bearer"))
            ));
        }
        // Another password waits for a turn, and is refused as busy when none comes in time.
        let Judgement::Check(check) = credentials.judge(&basic("u:other")) else {
            panic!("a password that never passed judged without a check");
        };
        assert_eq!(
            check.run(Duration::from_millis(100)).await,
            Err(CheckRefused::NoTurn)
        );
        drop(held);
        let Judgement::Check(check) = credentials.judge(&basic("u:other")) else {
            panic!("a password that never passed judged without a check");
        };
        assert!(matches!(
            check.run(Duration::from_mins(10)).await,
            Err(CheckRefused::Wrong(_))
        ));
    }

    #[tokio::test]
    async fn basic_and_bearer_each_admit() {
        let scratch = ScratchDir::new("auth-both");
        let credentials = token_and_user(&scratch);
        assert_eq!(admit(&credentials, &with("Bearer tok")).await, Ok(()));
        assert!(admit(&credentials, &with("Bearer nope")).await.is_err());
        // The scheme in any case, after any number of spaces.
        assert_eq!(admit(&credentials, &with("bearer  tok")).await, Ok(()));
        assert_eq!(admit(&credentials, &with("BASIC dTpwdw==")).await, Ok(()));
        assert!(admit(&credentials, &with("Bearertok")).await.is_err());
        // Twice: the second is answered from the remembered password.
        assert_eq!(admit(&credentials, &basic("u:pw")).await, Ok(()));
        assert_eq!(admit(&credentials, &basic("u:pw")).await, Ok(()));
        assert!(admit(&credentials, &basic("u:wrong")).await.is_err());
        assert!(admit(&credentials, &basic("x:pw")).await.is_err());
        assert!(admit(&credentials, &with("Basic !!!")).await.is_err());
        assert_eq!(
            admit(&credentials, &HeaderMap::new()).await,
            Err(Challenge("Basic realm=\"collector\", Bearer"))
        );
    }

    /// Credentials with the user `u`, password `pw` hashed at bcrypt `cost`, in a file of
    /// `scratch`.
    fn user_of_cost(scratch: &ScratchDir, cost: u32) -> Credentials {
        let hash = bcrypt::hash("pw", cost).unwrap();
        Credentials::from_config(
            &config(
                None,
                Some(scratch.write_aged("users", &format!("u:{hash}\n"), 1)),
            ),
            &Arc::default(),
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn password_checks_run_one_at_a_time_and_the_others_wait_their_turn() {
        const WRONG: usize = 12;
        const RIGHT: usize = 4;
        let scratch = ScratchDir::new("auth-turns");
        // A cost that keeps each check busy long enough for the others to pile up.
        let credentials = user_of_cost(&scratch, 8);
        let attempts: Vec<_> = (0..WRONG + RIGHT)
            .map(|attempt| {
                let credentials = credentials.clone();
                let given = if attempt % 4 == 3 { "u:pw" } else { "u:wrong" };
                tokio::spawn(async move { (given, admit(&credentials, &basic(given)).await) })
            })
            .collect();
        for attempt in attempts {
            let (given, admitted) = attempt.await.unwrap();
            // Waited for, not refused: each is answered by its own password.
            assert_eq!(admitted.is_ok(), given == "u:pw", "{given}");
        }
        let most = credentials
            .checks
            .most
            .load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            (1..=PASSWORD_CHECKS_AT_ONCE).contains(&most),
            "{most} bcrypt checks ran at once"
        );
    }

    /// A check holding a place (`holding`, as serve's guard gives it its address's place in
    /// the queue) whose request is dropped while it runs (its client hung up) gives back
    /// neither the turn nor the place until the check ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_request_holds_its_turn_and_place_until_its_check_ends() {
        use std::sync::atomic::Ordering::SeqCst;
        let scratch = ScratchDir::new("auth-dropped");
        // A cost that keeps the check busy well past the abort below.
        let credentials = user_of_cost(&scratch, 12);
        let queue = Arc::new(tokio::sync::Semaphore::new(1));
        let place = Arc::clone(&queue).try_acquire_owned().unwrap();
        let Judgement::Check(check) = credentials.judge(&basic("u:wrong")) else {
            panic!("a password that never passed judged without a check");
        };
        let check = check.holding(place);
        let request = tokio::spawn(check.run(Duration::from_mins(1)));
        let checks = Arc::clone(&credentials.checks);
        while checks.running.load(SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        request.abort();
        assert!(request.await.unwrap_err().is_cancelled());
        // The check runs on: its turn and its place are still taken.
        assert_eq!(checks.running.load(SeqCst), 1);
        assert_eq!(queue.available_permits(), 0);
        assert_eq!(
            checks.turns.available_permits(),
            PASSWORD_CHECKS_AT_ONCE - 1
        );
        let freed = tokio::time::timeout(Duration::from_secs(30), queue.acquire()).await;
        assert!(
            freed.is_ok(),
            "the place was not given back after the check"
        );
        assert_eq!(checks.running.load(SeqCst), 0);
    }

    /// A check that waited for its turn while the users file changed is judged by the new
    /// file: a password given since passes, a user removed since does not.
    #[tokio::test]
    async fn a_check_that_waited_is_judged_by_the_file_as_it_is_then() {
        let scratch = ScratchDir::new("auth-waited");
        let hash = |password: &str| bcrypt::hash(password, 4).unwrap();
        let credentials = Credentials::from_config(
            &config(
                None,
                Some(scratch.write_aged(
                    "users",
                    &format!("u:{}\nw:{}\n", hash("old"), hash("wpw")),
                    1,
                )),
            ),
            &Arc::default(),
        )
        .unwrap();
        let waiting = |given: &str| {
            let Judgement::Check(check) = credentials.judge(&basic(given)) else {
                panic!("{given} judged without a check");
            };
            check
        };

        let held = credentials.hold_password_turns();
        let (changed, removed) = (waiting("u:new"), waiting("w:wpw"));
        scratch.write_aged("users", &format!("u:{}\n", hash("new")), 2);
        drop(held);
        assert_eq!(changed.run(Duration::from_mins(1)).await, Ok(()));
        assert!(matches!(
            removed.run(Duration::from_mins(1)).await,
            Err(CheckRefused::Wrong(_))
        ));
    }

    #[tokio::test]
    async fn rotated_secrets_are_taken_without_a_restart() {
        let scratch = ScratchDir::new("auth-rotation");
        let old_hash = bcrypt::hash("old", 4).unwrap();
        let reloads = Arc::new(SecretReloads::default());
        let credentials = Credentials::from_config(
            &config(
                Some(scratch.write_aged("token", "first\n", 1)),
                Some(scratch.write_aged("users", &format!("u:{old_hash}\n"), 1)),
            ),
            &reloads,
        )
        .unwrap();
        let last_reloads = || reloads.last_reloads().collect::<Vec<_>>();
        assert_eq!(
            last_reloads(),
            [(Secret::BearerToken, true), (Secret::BasicAuthUsers, true)]
        );
        assert_eq!(admit(&credentials, &with("Bearer first")).await, Ok(()));
        assert_eq!(admit(&credentials, &basic("u:old")).await, Ok(()));

        let new_hash = bcrypt::hash("new", 4).unwrap();
        scratch.write_aged("token", "second\n", 2);
        scratch.write_aged("users", &format!("u:{new_hash}\n"), 2);
        assert_eq!(admit(&credentials, &with("Bearer second")).await, Ok(()));
        assert!(admit(&credentials, &with("Bearer first")).await.is_err());
        assert_eq!(admit(&credentials, &basic("u:new")).await, Ok(()));
        assert!(admit(&credentials, &basic("u:old")).await.is_err());

        // A broken rotation keeps what worked.
        scratch.write_aged("token", "  \n", 3);
        scratch.write_aged("users", "u:not-bcrypt\n", 3);
        assert_eq!(admit(&credentials, &with("Bearer second")).await, Ok(()));
        assert_eq!(admit(&credentials, &basic("u:new")).await, Ok(()));
        assert_eq!(
            last_reloads(),
            [
                (Secret::BearerToken, false),
                (Secret::BasicAuthUsers, false)
            ]
        );
        // Its completion within the same tick of the clock is still seen: the length moved.
        scratch.write_aged("token", "third-token\n", 3);
        assert_eq!(
            admit(&credentials, &with("Bearer third-token")).await,
            Ok(())
        );
        assert_eq!(
            last_reloads(),
            [(Secret::BearerToken, true), (Secret::BasicAuthUsers, false)]
        );
        // A file gone keeps what worked, and says it failed until the file is back.
        std::fs::remove_file(scratch.path("token")).unwrap();
        assert_eq!(
            admit(&credentials, &with("Bearer third-token")).await,
            Ok(())
        );
        assert_eq!(last_reloads()[0], (Secret::BearerToken, false));
        scratch.write_aged("token", "fourth-token\n", 4);
        assert_eq!(
            admit(&credentials, &with("Bearer fourth-token")).await,
            Ok(())
        );
        assert_eq!(last_reloads()[0], (Secret::BearerToken, true));
    }
}
