//! The PROXY protocol header reader the kernel skips a load balancer's header with, before
//! the `ClientHello`: the headers balancers send, every cut of them, broken ones, and random
//! and mutated bytes, against a plain reading of the specification written here.

mod support;

use collector_common::{
    client_hello::SNI_NAME_MAX,
    proxy_header::{PROXY_V1_MAX, ProxyHeader, proxy_header},
};
use support::hello::{Bytes, Xorshift};

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// What the shared reader makes of `bytes`, the whole payload. Its working memory is not
/// zeroed first (the kernel's holds the last connection's bytes), so each payload is read
/// twice: over stale bytes, and over line feeds (the byte that ends a version 1 header).
/// Both must give the same verdict.
fn read(bytes: &[u8]) -> ProxyHeader {
    let [over_stale, over_line_feeds] = [0xaa, b'\n'].map(|fill| {
        let mut line = [fill; SNI_NAME_MAX + 1];
        proxy_header(
            &Bytes(bytes),
            0,
            u32::try_from(bytes.len()).unwrap(),
            &mut line,
        )
    });
    assert_eq!(
        over_stale, over_line_feeds,
        "the working memory's old bytes decided: {bytes:?}"
    );
    over_stale
}

/// The specification, read plainly: a version 2 signature, then version 2, command LOCAL or
/// PROXY, and the length of the rest; or `PROXY ` and a line ending in CRLF within 107 bytes.
/// (Bytes that only begin like a signature or prefix are no header.)
fn reference(bytes: &[u8]) -> ProxyHeader {
    if bytes.starts_with(V2_SIGNATURE) {
        if bytes.len() < 16 {
            return ProxyHeader::Incomplete;
        }
        if bytes[12] >> 4 != 2 || bytes[12] & 0x0f > 1 {
            return ProxyHeader::Malformed;
        }
        let total = 16 + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        return if total > bytes.len() {
            ProxyHeader::Incomplete
        } else {
            ProxyHeader::Whole(u32::try_from(total).unwrap())
        };
    }
    if !bytes.starts_with(b"PROXY ") {
        return ProxyHeader::Absent;
    }
    let longest = usize::try_from(PROXY_V1_MAX).unwrap();
    match bytes[..bytes.len().min(longest)]
        .iter()
        .position(|&byte| byte == b'\n')
    {
        None if bytes.len() < longest => ProxyHeader::Incomplete,
        Some(newline) if bytes[newline - 1] == b'\r' => {
            ProxyHeader::Whole(u32::try_from(newline + 1).unwrap())
        }
        // No line end within the longest line, or one without its CR.
        None | Some(_) => ProxyHeader::Malformed,
    }
}

/// A version 2 header: `command` (0 LOCAL, 1 PROXY), family and protocol, and the rest.
fn v2(command: u8, family: u8, rest: &[u8]) -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    header.push(0x20 | command);
    header.push(family);
    header.extend_from_slice(&u16::try_from(rest.len()).unwrap().to_be_bytes());
    header.extend_from_slice(rest);
    header
}

/// The headers balancers send: version 1 for TCP over IPv4 and IPv6 and for an unknown
/// connection, the longest line, and version 2 for TCP over IPv4 and IPv6 (with TLVs) and
/// the LOCAL command.
fn headers() -> Vec<Vec<u8>> {
    let mut longest = b"PROXY UNKNOWN ".to_vec();
    longest.resize(usize::try_from(PROXY_V1_MAX).unwrap() - 2, b'f');
    longest.extend_from_slice(b"\r\n");
    let ipv4 = [192, 0, 2, 1, 198, 51, 100, 1, 0xc8, 0x22, 0x01, 0xbb];
    let mut ipv6 = [0u8; 36];
    ipv6[0] = 0x20;
    ipv6[1] = 0x01;
    ipv6[16] = 0x20;
    ipv6[17] = 0x01;
    let mut tlvs = ipv6.to_vec();
    // An authority (the name the client asked for) and a 4-byte CRC.
    tlvs.extend_from_slice(&[0x02, 0, 7]);
    tlvs.extend_from_slice(b"api.com");
    tlvs.extend_from_slice(&[0x03, 0, 4, 1, 2, 3, 4]);
    vec![
        b"PROXY TCP4 192.0.2.1 198.51.100.1 51234 443\r\n".to_vec(),
        b"PROXY TCP6 2001:db8::1 2001:db8::2 51234 443\r\n".to_vec(),
        b"PROXY UNKNOWN\r\n".to_vec(),
        longest,
        v2(1, 0x11, &ipv4),
        v2(1, 0x21, &tlvs),
        v2(0, 0x00, &[]),
    ]
}

#[test]
fn headers_balancers_send_are_read_whole_with_what_follows_them() {
    for header in headers() {
        let len = u32::try_from(header.len()).unwrap();
        assert_eq!(read(&header), ProxyHeader::Whole(len), "{header:?}");
        let mut followed = header.clone();
        followed.extend_from_slice(&[0x16, 0x03, 0x01, b'\n', b'\r', b'\n']);
        assert_eq!(read(&followed), ProxyHeader::Whole(len), "{followed:?}");
    }
}

/// Cut after its signature (or prefix), a header is incomplete; cut before, what arrived is
/// no header (a scanner's bare CRLFs, say), as the specification's readers need the whole
/// signature to tell.
#[test]
fn a_header_cut_short_is_incomplete_once_its_signature_is_whole() {
    for header in headers() {
        let signature = if header[0] == b'P' {
            6
        } else {
            V2_SIGNATURE.len()
        };
        for cut in 1..header.len() {
            let expected = if cut < signature {
                ProxyHeader::Absent
            } else {
                ProxyHeader::Incomplete
            };
            assert_eq!(read(&header[..cut]), expected, "{:?}", &header[..cut]);
        }
    }
}

#[test]
fn broken_headers_are_malformed() {
    let ipv4 = [192, 0, 2, 1, 198, 51, 100, 1, 0xc8, 0x22, 0x01, 0xbb];
    let mut version_one = v2(1, 0x11, &ipv4);
    version_one[12] = 0x11;
    let mut command_two = v2(1, 0x11, &ipv4);
    command_two[12] = 0x22;
    let mut too_long = b"PROXY UNKNOWN ".to_vec();
    too_long.resize(usize::try_from(PROXY_V1_MAX).unwrap() - 1, b'f');
    too_long.extend_from_slice(b"\r\n");
    for broken in [
        version_one,
        command_two,
        too_long,
        b"PROXY TCP4 192.0.2.1 198.51.100.1 51234 443\n".to_vec(),
        b"PROXY \n".to_vec(),
    ] {
        assert_eq!(read(&broken), ProxyHeader::Malformed, "{broken:?}");
    }
}

#[test]
fn other_first_bytes_have_no_header() {
    for other in [
        &[0x16, 0x03, 0x01, 0x00, 0xc8][..],
        b"GET / HTTP/1.1\r\n",
        b"PROXZ TCP4",
        b"proxy tcp4",
        b"\r\n\r\n\0\r\nQUIZ\n!!!!",
        b"\r\n\n",
        b"\r\n\r\n",
        b"PROXY",
        b"",
    ] {
        assert_eq!(read(other), ProxyHeader::Absent, "{other:?}");
    }
}

/// Headers mutated (a byte changed, a length field rewritten, cut anywhere, bytes added) and
/// random bytes behind a header's start: the shared reader says what the plain reading says.
#[test]
fn mutated_and_random_bytes_agree_with_the_specification() {
    let mut rng = Xorshift(0x9e37_79b9);
    let headers = headers();
    let mut seen = [0usize; 4];
    for _ in 0..20_000 {
        let mut bytes = headers[rng.below(headers.len())].clone();
        match rng.below(4) {
            0 => {
                let at = rng.below(bytes.len());
                bytes[at] = rng.byte();
            }
            1 if bytes.len() >= 16 && bytes[0] == b'\r' => {
                let len = u16::try_from(rng.below(80)).unwrap();
                bytes[14..16].copy_from_slice(&len.to_be_bytes());
            }
            2 => bytes.truncate(rng.below(bytes.len() + 1)),
            _ => {
                let keep = rng.below(bytes.len() + 1);
                bytes.truncate(keep);
                for _ in 0..rng.below(140) {
                    // Mostly text, with line ends now and then.
                    bytes.push(match rng.below(12) {
                        0 => b'\r',
                        1 => b'\n',
                        _ => rng.byte(),
                    });
                }
            }
        }
        let read = read(&bytes);
        assert_eq!(read, reference(&bytes), "{bytes:?}");
        seen[match read {
            ProxyHeader::Absent => 0,
            ProxyHeader::Whole(_) => 1,
            ProxyHeader::Incomplete => 2,
            ProxyHeader::Malformed => 3,
        }] += 1;
    }
    eprintln!("absent, whole, incomplete, malformed: {seen:?}");
    assert!(seen.iter().all(|&count| count > 100), "{seen:?}");
}
