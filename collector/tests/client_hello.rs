//! The `ClientHello` parser the kernel reads server names with, against rustls: the hellos
//! rustls clients send, the same cut short or after other bytes, other protocols, and
//! mutated hellos, on which the parser must agree with rustls's server side whenever that
//! side accepts the hello.

use std::{
    ops::Range,
    sync::{Arc, Mutex},
};

use collector_common::client_hello::{self, Hello, HelloBytes, SNI_NAME_MAX};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, SupportedProtocolVersion,
    crypto::{CryptoProvider, GetRandomFailed, SecureRandom},
    pki_types::ServerName,
    server::Acceptor,
    version::{TLS12, TLS13},
};

/// A test's bytes: reads past their end fail, as the kernel's reads past the packet do.
struct Bytes<'a>(&'a [u8]);

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

/// The parser's verdict, with the name's length but not where it was found (checked in
/// [`parse`]), so that expectations can be written without the offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Name(usize),
    NoName,
    NotHello,
    Incomplete,
    Malformed,
}

/// The parser's verdict on the payload `start..end` of `data`, and the name it copied.
fn parse(data: &[u8], start: usize, end: usize) -> (Verdict, Vec<u8>) {
    let mut name = [0; SNI_NAME_MAX + 1];
    let hello = client_hello::server_name(
        &Bytes(data),
        u32::try_from(start).unwrap(),
        u32::try_from(end).unwrap(),
        &mut name,
    );
    match hello {
        Hello::Name { offset, len } => {
            let offset = offset as usize;
            assert_eq!(
                &data[offset..offset + len],
                &name[..len],
                "the name's offset"
            );
            assert!(name[len..].iter().all(|&b| b == 0), "zero after the name");
            (Verdict::Name(len), name[..len].to_vec())
        }
        Hello::NoName => (Verdict::NoName, Vec::new()),
        Hello::NotHello => (Verdict::NotHello, Vec::new()),
        Hello::Incomplete => (Verdict::Incomplete, Vec::new()),
        Hello::Malformed => (Verdict::Malformed, Vec::new()),
    }
}

fn parse_payload(payload: &[u8]) -> (Verdict, Vec<u8>) {
    parse(payload, 0, payload.len())
}

/// What rustls's server side makes of a client's first bytes.
#[derive(Debug, PartialEq, Eq)]
enum Reference {
    /// Not a `ClientHello` it accepts (or not a whole one).
    Rejected,
    /// A `ClientHello`, with the server name rustls read (in lower case), if any.
    Accepted(Option<String>),
}

fn rustls_reads(flight: &[u8]) -> Reference {
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

const VERSION_CHOICES: [&[&SupportedProtocolVersion]; 3] =
    [&[&TLS13], &[&TLS12], &[&TLS13, &TLS12]];

/// The first bytes a rustls client offering `versions` (and ALPN if `alpn`) sends to `server`.
fn client_hello(
    versions: &[&'static SupportedProtocolVersion],
    alpn: bool,
    server: &str,
) -> Vec<u8> {
    // The same hellos on every run, but for the key shares ring draws.
    let seeded = SeededRandom(Mutex::new(Xorshift(0x7e57)));
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
    let server = ServerName::try_from(server).unwrap().to_owned();
    let mut connection = ClientConnection::new(Arc::new(config), server).unwrap();
    let mut flight = Vec::new();
    connection.write_tls(&mut flight).unwrap();
    flight
}

/// The hellos of every client configuration: each version choice, with and without ALPN.
fn every_client_hello(server: &str) -> Vec<Vec<u8>> {
    VERSION_CHOICES
        .iter()
        .flat_map(|versions| [false, true].map(|alpn| client_hello(versions, alpn, server)))
        .collect()
}

/// The longest DNS name: 253 characters, in labels of up to 63.
fn longest_name() -> String {
    let label = |letter: &str, len| letter.repeat(len);
    [
        label("a", 63),
        label("b", 63),
        label("c", 63),
        label("d", 61),
    ]
    .join(".")
}

/// Where `name` lies in `flight`, in any case: found by searching, apart from any parser.
fn name_on_wire(flight: &[u8], name: &str) -> Range<usize> {
    let found: Vec<usize> = flight
        .windows(name.len())
        .enumerate()
        .filter(|(_, window)| window.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(at, _)| at)
        .collect();
    assert_eq!(found.len(), 1, "{name} is once in the hello");
    found[0]..found[0] + name.len()
}

/// A seeded xorshift64: the same bytes on every run.
#[derive(Debug)]
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform enough in `0..n` for tests.
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
    }

    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }

    /// One to eight bytes.
    fn few_bytes(&mut self) -> Vec<u8> {
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
struct LengthField {
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
fn length_fields(hello: &[u8]) -> Vec<LengthField> {
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
fn mutate(hello: &[u8], fields: &[LengthField], rng: &mut Xorshift) -> Vec<u8> {
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

#[test]
fn names_rustls_clients_send_read_as_rustls_reads_them() {
    // The client sends a name as given, but for a trailing dot it drops (RFC 6066 section 3).
    let sent = [
        ("api.example.com", "api.example.com"),
        (&longest_name(), &longest_name()),
        ("UPPER.Example.COM", "UPPER.Example.COM"),
        ("dot.example.", "dot.example"),
    ];
    for (server, on_wire) in sent {
        for flight in every_client_hello(server) {
            assert_eq!(
                rustls_reads(&flight),
                Reference::Accepted(Some(on_wire.to_ascii_lowercase())),
                "{server}"
            );
            let name = name_on_wire(&flight, on_wire);
            assert_eq!(&flight[name.clone()], on_wire.as_bytes(), "{server}");
            assert_eq!(
                parse_payload(&flight),
                (Verdict::Name(name.len()), on_wire.as_bytes().to_vec()),
                "{server}"
            );
        }
    }
}

#[test]
fn a_trailing_dot_reads_as_rustls_reads_it() {
    // A minimal hello rustls accepts, naming "a.": RFC 6066 section 3 sends names without
    // a trailing dot, but rustls takes one, and drops it.
    let mut hello = vec![
        22, 3, 1, 0, 66, // handshake record
        1, 0, 0, 62, 3, 3, // ClientHello, TLS 1.2
    ];
    hello.extend([0; 32]); // random
    hello.extend([
        0, // no session id
        0, 2, 0x13, 0x01, // one cipher suite
        1, 0, // null compression
        0, 19, // extensions
        0, 13, 0, 4, 0, 2, 0x08, 0x04, // signature_algorithms, which rustls requires
        0, 0, 0, 7, 0, 5, 0, 0, 2, b'a', b'.', // server_name "a."
    ]);
    assert_eq!(
        rustls_reads(&hello),
        Reference::Accepted(Some("a".to_owned()))
    );
    assert_eq!(
        parse_payload(&hello),
        (Verdict::Name(1), b"a".to_vec()),
        "parser bug: it keeps the trailing dot rustls drops, so the name matches no route \
         where rustls serves the hello as \"a\""
    );
}

#[test]
fn a_client_connecting_to_an_address_sends_no_name() {
    for server in ["192.0.2.1", "2001:db8::1"] {
        for flight in every_client_hello(server) {
            assert_eq!(rustls_reads(&flight), Reference::Accepted(None), "{server}");
            assert_eq!(
                parse_payload(&flight),
                (Verdict::NoName, Vec::new()),
                "{server}"
            );
        }
    }
}

#[test]
fn a_hello_after_other_bytes_reads_the_same() {
    let mut rng = Xorshift(0x5eed_0ff5e7);
    for flight in every_client_hello("api.example.com") {
        let alone = parse_payload(&flight);
        // IP and TCP headers before the payload; bytes after it that `end` leaves out.
        for headers in [40, 60] {
            let mut packet = rng.bytes(headers);
            packet.extend(&flight);
            packet.extend(rng.bytes(16));
            assert_eq!(parse(&packet, headers, headers + flight.len()), alone);
        }
    }
}

#[test]
fn a_hello_cut_short_is_incomplete_until_its_name_is_whole() {
    const HEADERS: usize = 40;
    let mut rng = Xorshift(0x00c0_ffee);
    for server in ["api.example.com", &longest_name()] {
        for flight in every_client_hello(server) {
            let name = name_on_wire(&flight, server);
            let mut packet = rng.bytes(HEADERS);
            packet.extend(&flight);
            assert_eq!(
                parse(&packet[..HEADERS], HEADERS, HEADERS),
                (Verdict::NotHello, Vec::new()),
                "an empty payload"
            );
            for cut in 1..flight.len() {
                let end = HEADERS + cut;
                let expected = if name.end <= cut {
                    (Verdict::Name(name.len()), flight[name.clone()].to_vec())
                } else {
                    (Verdict::Incomplete, Vec::new())
                };
                assert_eq!(
                    parse(&packet[..end], HEADERS, end),
                    expected,
                    "cut at {cut}"
                );
                // The packet's later bytes there to read: `end` alone must stop the parser.
                assert_eq!(parse(&packet, HEADERS, end), expected, "end at {cut}");
            }
        }
    }
}

#[test]
fn other_protocols_are_not_hellos() {
    let hello = client_hello(&[&TLS13], false, "api.example.com");
    let mut application_data = hello.clone();
    application_data[0] = 23;
    let mut server_hello = hello.clone();
    server_hello[5] = 2;
    let payloads: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        &application_data,
        &server_hello,
    ];
    for payload in payloads {
        assert_eq!(rustls_reads(payload), Reference::Rejected, "{payload:?}");
        assert_eq!(
            parse_payload(payload),
            (Verdict::NotHello, Vec::new()),
            "{payload:?}"
        );
    }
}

#[test]
fn lowercase_changes_only_ascii_capitals() {
    // Bytes on either side of A-Z and a-z, and non-ASCII (UTF-8 and Latin-1 capitals).
    let given = b"UPPER.Example-COM_09@[`{\xc3\x84\xc4";
    let expected = b"upper.example-com_09@[`{\xc3\x84\xc4";
    let mut name = [0; SNI_NAME_MAX + 1];
    name[..given.len()].copy_from_slice(given);
    client_hello::lowercase(&mut name);
    assert_eq!(&name[..given.len()], expected);
    assert!(name[given.len()..].iter().all(|&byte| byte == 0));

    let mut whole = [b'Q'; SNI_NAME_MAX + 1];
    client_hello::lowercase(&mut whole);
    assert_eq!(whole, [b'q'; SNI_NAME_MAX + 1]);
}

#[test]
fn the_first_dot_is_found_in_every_word() {
    let mut name = [b'a'; SNI_NAME_MAX + 1];
    assert_eq!(client_hello::first_dot(&name), SNI_NAME_MAX + 1, "no dot");
    for first in (0..=SNI_NAME_MAX).rev() {
        name[first] = b'.';
        assert_eq!(client_hello::first_dot(&name), first);
    }
    // Bytes just off a dot, and a zero before one.
    let mut near = [0u8; SNI_NAME_MAX + 1];
    near[..6].copy_from_slice(b"-/\xae\x2e\x00.");
    assert_eq!(client_hello::first_dot(&near), 3);
}

/// The design's rule: the parser agrees with rustls on every hello rustls accepts.
#[test]
fn mutated_hellos_agree_with_rustls() {
    const MUTATIONS_PER_HELLO: usize = 5000;
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
    let hellos: Vec<Vec<u8>> = ["api.example.com", &longest_name()]
        .iter()
        .flat_map(|server| every_client_hello(server))
        .collect();
    let (mut mutated, mut accepted, mut named, mut disagreements) = (0, 0, 0, Vec::new());
    for hello in &hellos {
        let fields = length_fields(hello);
        for _ in 0..MUTATIONS_PER_HELLO {
            let bytes = mutate(hello, &fields, &mut rng);
            mutated += 1;
            // Whatever rustls says, the parser returns (bounded by its construction).
            let ours = parse_payload(&bytes);
            let Reference::Accepted(reference) = rustls_reads(&bytes) else {
                continue;
            };
            accepted += 1;
            named += usize::from(reference.is_some());
            if !agrees(reference.as_deref(), &ours) {
                disagreements.push((bytes, reference, ours));
            }
        }
    }
    println!(
        "{mutated} mutated hellos, {accepted} accepted by rustls ({named} naming a server), \
         {} agreed",
        accepted - disagreements.len()
    );
    assert!(
        accepted > mutated / 10,
        "too few mutations rustls accepts to compare on"
    );
    let shortest = disagreements.iter().min_by_key(|(bytes, ..)| bytes.len());
    assert!(
        shortest.is_none(),
        "the parser disagrees with rustls on {} of {accepted} hellos it accepts; the \
         shortest (bytes, rustls's name, the parser's): {shortest:x?}",
        disagreements.len()
    );
}

/// The parser's verdict agrees with the name rustls read (lower case, or none).
fn agrees(reference: Option<&str>, (hello, name): &(Verdict, Vec<u8>)) -> bool {
    match (reference, hello) {
        (Some(reference), Verdict::Name(_)) => name.to_ascii_lowercase() == reference.as_bytes(),
        (None, Verdict::NoName) => true,
        // rustls takes an IP address given as a host_name for no name, and rejects a hello
        // with any other name that is not a DNS name: a name read there is no DNS name.
        (None, Verdict::Name(_)) => !matches!(
            ServerName::try_from(name.as_slice()),
            Ok(ServerName::DnsName(_))
        ),
        _ => false,
    }
}
