//! TLS `ClientHello` messages for the tests of routes by server name: made by rustls clients
//! (from a seed: the same bytes for the same seed, but for ring's key shares), read by
//! rustls's server side (the reference the kernel's parser is held to), read as the kernel's
//! parser reads them, and mutated at random with their length fields kept in step.

use std::{
    ops::Range,
    sync::{Arc, Mutex},
};

use collector_common::client_hello::{HelloBytes, SNI_NAME_MAX};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, SupportedProtocolVersion,
    crypto::{CryptoProvider, GetRandomFailed, SecureRandom},
    pki_types::ServerName,
    server::Acceptor,
};

/// A test's bytes: reads past their end fail, as the kernel's reads past the packet do.
pub struct Bytes<'a>(pub &'a [u8]);

impl HelloBytes for Bytes<'_> {
    fn array<const N: usize>(&self, offset: u32) -> Option<[u8; N]> {
        self.0.get(span(offset, N)?)?.try_into().ok()
    }

    fn name(&self, offset: u32, len: usize, out: &mut [u8; SNI_NAME_MAX + 1]) -> bool {
        let Some(name) = span(offset, len).and_then(|span| self.0.get(span)) else {
            return false;
        };
        out[..len].copy_from_slice(name);
        true
    }
}

fn span(offset: u32, len: usize) -> Option<Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    Some(start..start.checked_add(len)?)
}

/// What rustls's server side makes of a client's first bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Reference {
    /// Not a `ClientHello` it accepts (or not a whole one).
    Rejected,
    /// A `ClientHello`, with the server name rustls read (in lower case), if any.
    Accepted(Option<String>),
}

pub fn rustls_reads(flight: &[u8]) -> Reference {
    let mut acceptor = Acceptor::default();
    let mut unread = flight;
    // It takes a bounded amount per call, and needs every record of the hello.
    while !unread.is_empty() {
        if !matches!(acceptor.read_tls(&mut unread), Ok(read) if read > 0) {
            break;
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            Reference::Accepted(accepted.client_hello().server_name().map(str::to_owned))
        }
        Ok(None) | Err(_) => Reference::Rejected,
    }
}

/// The first bytes a rustls client offering `versions` (and ALPN if `alpn`) sends to `server`,
/// its randomness (random, session id, order of extensions) drawn from `seed`.
pub fn client_hello(
    versions: &[&'static SupportedProtocolVersion],
    alpn: bool,
    server: ServerName<'static>,
    seed: u64,
) -> Vec<u8> {
    let seeded = SeededRandom(Mutex::new(Xorshift(seed)));
    let provider = CryptoProvider {
        secure_random: Box::leak(Box::new(seeded)),
        ..rustls::crypto::ring::default_provider()
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    if alpn {
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    let mut connection = ClientConnection::new(Arc::new(config), server).unwrap();
    let mut flight = Vec::new();
    connection.write_tls(&mut flight).unwrap();
    flight
}

/// A seeded xorshift64: the same bytes on every run.
#[derive(Debug)]
pub struct Xorshift(pub u64);

impl Xorshift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform enough in `0..n` for tests.
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
    }

    pub fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }

    /// One to eight bytes.
    pub fn few_bytes(&mut self) -> Vec<u8> {
        let len = 1 + self.below(8);
        self.bytes(len)
    }
}

/// rustls's randomness (its random, session id and order of extensions) from a seed.
#[derive(Debug)]
struct SeededRandom(Mutex<Xorshift>);

impl SecureRandom for SeededRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        let mut rng = self.0.lock().unwrap();
        buf.fill_with(|| rng.byte());
        Ok(())
    }
}

/// A length field of a hello: `width` big-endian bytes at `at`, counting the bytes after it.
#[derive(Debug, Clone, Copy)]
pub struct LengthField {
    at: usize,
    width: usize,
}

impl LengthField {
    fn value(self, bytes: &[u8]) -> usize {
        bytes[self.at..self.at + self.width]
            .iter()
            .fold(0, |value, &byte| value << 8 | usize::from(byte))
    }

    fn set(self, bytes: &mut [u8], value: usize) {
        let value = value.to_be_bytes();
        bytes[self.at..self.at + self.width].copy_from_slice(&value[value.len() - self.width..]);
    }

    /// The bytes it counts.
    fn body(self, bytes: &[u8]) -> Range<usize> {
        let start = self.at + self.width;
        start..start + self.value(bytes)
    }
}

/// The length fields of a well-formed hello record down to its server name (outermost
/// first): record, handshake, session id, cipher suites, compression methods, extensions,
/// each extension, and last the server name list and name.
pub fn length_fields(hello: &[u8]) -> Vec<LengthField> {
    // Record header, handshake header, version, random.
    let session_id = LengthField {
        at: 5 + 4 + 2 + 32,
        width: 1,
    };
    let suites = LengthField {
        at: session_id.body(hello).end,
        width: 2,
    };
    let compression = LengthField {
        at: suites.body(hello).end,
        width: 1,
    };
    let extensions = LengthField {
        at: compression.body(hello).end,
        width: 2,
    };
    let mut fields = vec![
        LengthField { at: 3, width: 2 },
        LengthField { at: 6, width: 3 },
        session_id,
        suites,
        compression,
        extensions,
    ];
    let mut server_name = None;
    let mut at = extensions.body(hello).start;
    while at < extensions.body(hello).end {
        let extension = LengthField {
            at: at + 2,
            width: 2,
        };
        fields.push(extension);
        if hello[at..at + 2] == [0, 0] {
            server_name = Some(extension);
        }
        at = extension.body(hello).end;
    }
    let list = LengthField {
        at: server_name.unwrap().body(hello).start,
        width: 2,
    };
    fields.extend([
        list,
        LengthField {
            at: list.at + 3,
            width: 2,
        },
    ]);
    fields
}

/// `hello` with its server name replaced by `name` (written as is: rustls would not send a
/// trailing dot, some clients do), every length around it kept right.
pub fn with_name(hello: &[u8], name: &[u8]) -> Vec<u8> {
    let fields = length_fields(hello);
    let mut bytes = hello.to_vec();
    let range = fields.last().unwrap().body(hello);
    splice(&mut bytes, &fields, range, name);
    bytes
}

/// Replaces `range` of `bytes` by `with`, and keeps every field that counts the whole range
/// counting right.
fn splice(bytes: &mut Vec<u8>, fields: &[LengthField], range: Range<usize>, with: &[u8]) {
    for field in fields {
        let body = field.body(bytes);
        if body.start <= range.start && range.end <= body.end {
            let value = field.value(bytes) + with.len() - range.len();
            field.set(bytes, value);
        }
    }
    bytes.splice(range, with.iter().copied());
}

/// A server name to put in a hello: mostly short, from the characters of DNS names and the
/// few around them, some of them IPv4 addresses, some about as long as names can be.
fn random_name(rng: &mut Xorshift) -> Vec<u8> {
    const CHARACTERS: &[u8] = b"abcxyzABCXYZ0129-_..";
    if rng.below(4) == 0 {
        let [a, b, c, d] = [rng.byte(), rng.byte(), rng.byte(), rng.byte()];
        return format!("{a}.{b}.{c}.{d}").into_bytes();
    }
    let len = if rng.below(8) == 0 {
        240 + rng.below(20)
    } else {
        1 + rng.below(24)
    };
    (0..len)
        .map(|_| match rng.below(32) {
            0 => rng.byte(),
            _ => CHARACTERS[rng.below(CHARACTERS.len())],
        })
        .collect()
}

/// `hello` changed at random: first through its structure (a length field set at random,
/// bytes added to or taken from a field with the lengths around it kept right, or the name
/// replaced), then up to two blind changes (a byte flipped, bytes added or taken, the end
/// cut off).
pub fn mutate(hello: &[u8], fields: &[LengthField], rng: &mut Xorshift) -> Vec<u8> {
    let mut bytes = hello.to_vec();
    let field = fields[rng.below(fields.len())];
    let body = field.body(hello);
    match rng.below(4) {
        0 => {
            let value = match rng.below(2) {
                0 => rng.below(1 << (8 * field.width)),
                _ => (field.value(hello) + rng.below(9)).saturating_sub(4),
            };
            field.set(&mut bytes, value);
        }
        1 => {
            let at = body.start + rng.below(body.len() + 1);
            splice(&mut bytes, fields, at..at, &rng.few_bytes());
        }
        2 => {
            let start = body.start + rng.below(body.len() + 1);
            let end = start + rng.below(body.end - start + 1);
            splice(&mut bytes, fields, start..end, &[]);
        }
        _ => {
            let name = fields.last().unwrap().body(hello);
            splice(&mut bytes, fields, name, &random_name(rng));
        }
    }
    for _ in 0..rng.below(3) {
        let at = rng.below(bytes.len());
        match rng.below(4) {
            0 => bytes[at] ^= 1 + rng.below(255).to_le_bytes()[0],
            1 => bytes.splice(at..at, rng.few_bytes()).for_each(drop),
            2 => bytes
                .drain(at..bytes.len().min(at + 1 + rng.below(8)))
                .for_each(drop),
            _ => bytes.truncate(at),
        }
        if bytes.is_empty() {
            break;
        }
    }
    bytes
}

/// Where the extensions of a whole hello lie (a plain walk, apart from the parser): the
/// offset of the list, of each extension's header, and of the list's end.
pub struct Walk {
    pub list: usize,
    pub headers: Vec<usize>,
    /// Which of `headers` is the server name's.
    pub name: usize,
    pub end: usize,
}

impl Walk {
    pub fn of(flight: &[u8]) -> Self {
        let session = 9 + 34;
        let suites = session + 1 + usize::from(flight[session]);
        let compression =
            suites + 2 + usize::from(u16::from_be_bytes([flight[suites], flight[suites + 1]]));
        let list = compression + 1 + usize::from(flight[compression]) + 2;
        let end = list + usize::from(u16::from_be_bytes([flight[list - 2], flight[list - 1]]));
        let mut headers = Vec::new();
        let mut at = list;
        while at < end {
            headers.push(at);
            at += 4 + usize::from(u16::from_be_bytes([flight[at + 2], flight[at + 3]]));
        }
        assert_eq!(at, end, "the extensions fill their list");
        let name = headers
            .iter()
            .position(|&header| flight[header..header + 2] == [0, 0])
            .expect("a server name extension");
        Self {
            list,
            headers,
            name,
            end,
        }
    }

    /// Where the body of the server name's extension starts.
    pub fn name_body(&self) -> usize {
        self.headers[self.name] + 4
    }

    /// Where the walk goes on if a segment ends at `cut` before the name is whole: the first
    /// extension header past the cut, or the one the cut falls in (whose first bytes are
    /// kept); not where it falls before the list or in the body of the server name's
    /// extension (whose first bytes are kept instead).
    pub fn goes_on(&self, cut: usize) -> Option<usize> {
        if cut < self.list {
            return None;
        }
        for (i, &header) in self.headers[..=self.name].iter().enumerate() {
            if header >= cut {
                return Some(header);
            }
            if header + 4 > cut {
                return Some(header);
            }
            if i == self.name {
                return None;
            }
        }
        None
    }
}

/// `flight` with an extension of type `kind` and `len` bytes inserted before its `index`-th
/// (after the last for an index past them; as browsers' post-quantum key shares, about
/// 1,200 bytes, make a hello longer than a segment), its record, hello and extension list
/// lengths grown to match.
pub fn with_extension(flight: &[u8], index: usize, kind: u16, len: usize) -> Vec<u8> {
    let walk = Walk::of(flight);
    let at = walk.headers.get(index).copied().unwrap_or(walk.end);
    let grow = 4 + len;
    let mut out = flight[..at].to_vec();
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
    out.resize(out.len() + len, 0);
    out.extend_from_slice(&flight[at..]);
    let add16 = |bytes: &mut [u8], at: usize| {
        let value = usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]])) + grow;
        bytes[at..at + 2].copy_from_slice(&u16::try_from(value).unwrap().to_be_bytes());
    };
    add16(&mut out, 3);
    add16(&mut out, walk.list - 2);
    let hello_len = u32::from_be_bytes([0, out[6], out[7], out[8]]) + u32::try_from(grow).unwrap();
    out[6..9].copy_from_slice(&hello_len.to_be_bytes()[1..]);
    out
}
