//! The `ClientHello` parser the kernel reads server names with, against rustls: the hellos
//! rustls clients send, the same cut short or after other bytes, other protocols, and
//! mutated hellos, on which the parser must agree with rustls's server side whenever that
//! side accepts the hello.

mod support;

use std::ops::Range;

use collector_common::client_hello::{self, CutHeader, Hello, SNI_KEPT_MAX, SNI_NAME_MAX};
use rustls::{
    SupportedProtocolVersion,
    pki_types::ServerName,
    version::{TLS12, TLS13},
};
use support::hello::{
    Bytes, Reference, Walk, Xorshift, client_hello, length_fields, mutate, rustls_reads,
    with_extension,
};

/// The seed of the hellos: the same on every run, but for the key shares ring draws.
const SEED: u64 = 0x7e57;

/// The parser's verdict, with the name's length but not where it was found (checked in
/// [`parse`]), so that expectations can be written without the offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Name(usize),
    NoName,
    NotHello,
    Incomplete,
    Malformed,
    /// Goes on in the next segment, at this offset.
    Continues(usize),
    /// Cut in the body of the name's extension, which starts at this offset.
    NameCut(usize),
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
        Hello::Continues { next, .. } => (Verdict::Continues(next as usize), Vec::new()),
        Hello::NameCut { body, .. } => (Verdict::NameCut(body as usize), Vec::new()),
    }
}

fn parse_payload(payload: &[u8]) -> (Verdict, Vec<u8>) {
    parse(payload, 0, payload.len())
}

const VERSION_CHOICES: [&[&SupportedProtocolVersion]; 3] =
    [&[&TLS13], &[&TLS12], &[&TLS13, &TLS12]];

/// The hello of a client offering `versions` (and ALPN if `alpn`) to `server`.
fn hello(versions: &[&'static SupportedProtocolVersion], alpn: bool, server: &str) -> Vec<u8> {
    let server = ServerName::try_from(server).unwrap().to_owned();
    client_hello(versions, alpn, server, SEED)
}

/// The hellos of every client configuration: each version choice, with and without ALPN.
fn every_client_hello(server: &str) -> Vec<Vec<u8>> {
    VERSION_CHOICES
        .iter()
        .flat_map(|versions| [false, true].map(|alpn| hello(versions, alpn, server)))
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
fn a_hello_cut_short_goes_on_at_an_extension_or_in_its_name_or_is_incomplete() {
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
            let walk = Walk::of(&flight);
            for cut in 1..flight.len() {
                let end = HEADERS + cut;
                let expected = if name.end <= cut {
                    (Verdict::Name(name.len()), flight[name.clone()].to_vec())
                } else if let Some(next) = walk.goes_on(cut) {
                    (Verdict::Continues(HEADERS + next), Vec::new())
                } else if walk.name_body() <= cut {
                    (Verdict::NameCut(HEADERS + walk.name_body()), Vec::new())
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
    let hello = hello(&[&TLS13], false, "api.example.com");
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

/// What the kernel's reader makes of `flight` sent in segments cut at `cuts`: the first
/// segment parsed, then each next one read on from where the last left off, each with IP and
/// TCP headers of its own before it.
fn read_in_segments(flight: &[u8], cuts: &[usize], rng: &mut Xorshift) -> (Verdict, Vec<u8>) {
    let mut bounds: Vec<usize> = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(flight.len());
    let mut name = [0; SNI_NAME_MAX + 1];
    // The hello's offsets where it goes on, in the flight's terms, and the first bytes of a
    // header the last segment cut.
    let mut resume: Option<(usize, usize, usize)> = None;
    let mut cut = CutHeader::default();
    // The name's extension's first bytes a segment cut, and the extension's length.
    let mut kept: Option<(Vec<u8>, u32)> = None;
    for segment in bounds.windows(2) {
        let (from, to) = (segment[0], segment[1]);
        let headers = 40 + rng.below(3) * 12;
        let mut packet = rng.bytes(headers);
        packet.extend_from_slice(&flight[from..to]);
        let offset = |at: usize| u32::try_from(at - from + headers).unwrap();
        let end = offset(to);
        let hello = match (resume, kept.take()) {
            // As the kernel's reader: the rest of the extension (as much as this segment has)
            // after the bytes kept, past which the storage holds whatever it held.
            (_, Some((mut bytes, len))) => {
                let wanted = (len as usize).min(SNI_KEPT_MAX);
                let rest = (wanted - bytes.len()).min(to - from);
                if rest == 0 {
                    return (Verdict::Incomplete, Vec::new());
                }
                bytes.extend_from_slice(&packet[headers..headers + rest]);
                let have = u32::try_from(bytes.len()).unwrap();
                bytes.extend(rng.bytes(2 * SNI_KEPT_MAX - bytes.len()));
                client_hello::kept_name(&Bytes(&bytes), have, len, &mut name)
            }
            (None, None) => {
                client_hello::server_name(&Bytes(&packet), offset(from), end, &mut name)
            }
            (Some((next, hello_end, record_end)), None) => client_hello::server_name_after(
                &Bytes(&packet),
                offset(next),
                cut,
                offset(hello_end),
                offset(record_end),
                end,
                &mut name,
            ),
        };
        let in_flight = |at: u32| at as usize + from - headers;
        match hello {
            Hello::Continues {
                next,
                hello_end,
                record_end,
            } => {
                cut = client_hello::cut_header(&Bytes(&packet), next, end);
                // In a header: its rest starts the next segment (as the kernel's reader).
                if cut.len == 0 && next < end {
                    return (Verdict::Incomplete, Vec::new());
                }
                let next = if cut.len > 0 { to } else { in_flight(next) };
                resume = Some((next, in_flight(hello_end), in_flight(record_end)));
            }
            Hello::NameCut { body, len } => {
                let body = body as usize;
                assert!(
                    end as usize - body < SNI_KEPT_MAX,
                    "kept {}",
                    end as usize - body
                );
                kept = Some((packet[body..end as usize].to_vec(), len));
            }
            Hello::Name { len, .. } => return (Verdict::Name(len), name[..len].to_vec()),
            Hello::NoName => return (Verdict::NoName, Vec::new()),
            Hello::NotHello => return (Verdict::NotHello, Vec::new()),
            Hello::Incomplete => return (Verdict::Incomplete, Vec::new()),
            Hello::Malformed => return (Verdict::Malformed, Vec::new()),
        }
    }
    panic!("the walk went on past the hello's end: {flight:?} cut at {cuts:?}");
}

/// Hellos longer than a segment (a 1,200-byte extension before, after or around the name):
/// cut once anywhere, or twice, the name is read in the segment it ends in whenever every
/// cut before it falls where the walk can go on (in its name too, if the next segment ends
/// the name); otherwise incomplete.
#[test]
fn a_hello_over_segments_is_read_on_to_its_name() {
    let mut rng = Xorshift(0x5e6_3e47);
    let (mut read, mut incomplete) = (0, 0);
    for server in ["api.example.com", &longest_name()] {
        for flight in every_client_hello(server) {
            let walk = Walk::of(&flight);
            // First, right before the name's, right after it, and last.
            for index in [0, walk.name, walk.name + 1, walk.headers.len()] {
                let long = with_extension(&flight, index, 0x0015, 1_200);
                let name = name_on_wire(&long, server);
                let walk = Walk::of(&long);
                let in_name = |cut: usize| walk.name_body() <= cut && cut < name.end;
                let fits =
                    |cut: usize| name.end <= cut || walk.goes_on(cut).is_some() || in_name(cut);
                let whole = (Verdict::Name(name.len()), long[name.clone()].to_vec());
                assert_eq!(parse_payload(&long), whole);
                let mut cut_sets: Vec<Vec<usize>> = (1..long.len()).map(|cut| vec![cut]).collect();
                for _ in 0..500 {
                    let first = 1 + rng.below(long.len() - 2);
                    let second = first + 1 + rng.below(long.len() - first - 1);
                    cut_sets.push(vec![first, second]);
                }
                // Each header up to the name's cut twice within its four bytes, and cut in
                // two with its rest whole in the next segment.
                for &header in &walk.headers[..=walk.name] {
                    for pair in [[1, 2], [1, 3], [2, 3], [1, 4], [3, 9]] {
                        cut_sets.push(pair.iter().map(|&at| header + at).collect());
                    }
                }
                // A header cut in two needs its rest whole in the next segment: a cut in a
                // header with the next cut before the header's end is incomplete.
                let header_whole_after = |cuts: &[usize]| {
                    cuts.windows(2).all(|pair| {
                        walk.goes_on(pair[0])
                            .is_none_or(|header| header >= pair[0] || pair[1] >= header + 4)
                    })
                };
                // Cut in the name's extension, its rest must come whole in the next segment.
                let name_whole_after = |cuts: &[usize]| {
                    cuts.windows(2)
                        .all(|pair| !in_name(pair[0]) || pair[1] >= name.end)
                };
                // Cut in the name, and again in it, and twice around its start and end.
                for pair in [[1, 3], [5, 7], [6, 20]] {
                    cut_sets.push(pair.iter().map(|&at| walk.name_body() + at).collect());
                }
                cut_sets.push(vec![walk.name_body() - 2, name.end - 1]);
                cut_sets.push(vec![name.start + 1, name.end + 1]);
                for cuts in cut_sets {
                    let expected = if cuts.iter().all(|&cut| fits(cut))
                        && header_whole_after(&cuts)
                        && name_whole_after(&cuts)
                    {
                        read += 1;
                        whole.clone()
                    } else {
                        incomplete += 1;
                        (Verdict::Incomplete, Vec::new())
                    };
                    let got = read_in_segments(&long, &cuts, &mut rng);
                    assert_eq!(got, expected, "cut at {cuts:?}");
                }
            }
        }
    }
    println!("{read} cut hellos read, {incomplete} incomplete");
    assert!(read > incomplete, "{read} read, {incomplete} incomplete");
}

/// A hello whose first TLS record ends inside its name (the name spread over two records):
/// a segment cut in the name before that record's end is incomplete, not a cut name to
/// read on, since the rest of the name lies past the next record's header; so is one cut
/// at or past the record's end.
#[test]
fn a_name_spread_over_two_records_is_incomplete_wherever_a_segment_ends_in_it() {
    for flight in every_client_hello("api.example.com") {
        let name = name_on_wire(&flight, "api.example.com");
        let body = Walk::of(&flight).name_body();
        // The first record ends three bytes into the name; the second holds the rest.
        let split = name.start + 3;
        let mut records = flight[..3].to_vec();
        records.extend_from_slice(&u16::try_from(split - 5).unwrap().to_be_bytes());
        records.extend_from_slice(&flight[5..split]);
        records.extend_from_slice(&flight[..3]);
        records.extend_from_slice(&u16::try_from(flight.len() - split).unwrap().to_be_bytes());
        records.extend_from_slice(&flight[split..]);
        for cut in body..split + 5 + 3 {
            assert_eq!(
                parse(&records[..cut], 0, cut),
                (Verdict::Incomplete, Vec::new()),
                "cut at {cut}, the record ending at {split}"
            );
        }
        // Within one record, the same cuts are read on.
        for cut in body..split {
            assert_eq!(
                parse(&flight[..cut], 0, cut),
                (Verdict::NameCut(body), Vec::new())
            );
        }
    }
}
