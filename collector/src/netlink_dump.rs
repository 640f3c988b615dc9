//! One netlink request and its replies, by hand: `nf_tables`' counters and tables
//! (`nfnetlink`) and the socket list (`sock_diag`), which no crate here makes, the interface
//! dumps (`links`: only the attributes used, read with [`attributes`]), and the address and
//! route dumps (`addresses`), whose messages netlink-packet-route builds and parses.

use std::io;

use netlink_packet_core::{NLM_F_DUMP_INTR, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

pub const NLM_F_REQUEST: u16 = 1;
pub const NLM_F_ACK: u16 = 4;
pub const NLM_F_DUMP: u16 = 0x300;
/// nlmsghdr.
pub const HEADER: usize = 16;

pub fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Sends `message` on a socket of `protocol` and hands every other reply to `each` (its type
/// and the whole message, header included), until the dump ends or the ack arrives. A
/// netlink error comes back as an `io::Error`.
pub fn exchange(protocol: isize, message: &[u8], each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    exchange_on(Socket::new(protocol)?, message, each)
}

/// [`exchange`] with strict checking on (`NETLINK_GET_STRICT_CHK`): the kernel then takes a
/// dump request's header fields as filters (a routing table, say) and refuses any it does
/// not know.
pub fn exchange_strict(
    protocol: isize,
    message: &[u8],
    each: impl FnMut(u16, &[u8]),
) -> io::Result<()> {
    let socket = Socket::new(protocol)?;
    socket.set_netlink_get_strict_chk(true)?;
    exchange_on(socket, message, each)
}

fn exchange_on(
    mut socket: Socket,
    message: &[u8],
    mut each: impl FnMut(u16, &[u8]),
) -> io::Result<()> {
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket.send(message, 0)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut buf[..], 0)?;
        if let Some(outcome) = replies(&buf[..size.min(buf.len())], &mut each) {
            return outcome;
        }
    }
}

/// Hands each message of one received batch to `each`; `Some` with the exchange's outcome
/// once its end (or an error) is among them, `None` while more is to come.
fn replies(batch: &[u8], each: &mut impl FnMut(u16, &[u8])) -> Option<io::Result<()>> {
    let mut at = 0;
    while let Some(header) = batch.get(at..at + HEADER) {
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        let Some(message) = batch.get(at..at + len).filter(|_| len >= HEADER) else {
            return Some(Err(malformed("a truncated message")));
        };
        // The outcome is the payload's first word: a dump's end carries it too, since the
        // kernel may refuse a dump (a filter strict checking rejects) with nothing before it.
        let code = || {
            message
                .get(HEADER..HEADER + 4)
                .map(|bytes| i32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
        };
        match kind {
            NLMSG_DONE => {
                let flags = u16::from_ne_bytes([header[6], header[7]]);
                return Some(match code().unwrap_or(0) {
                    code if code < 0 => Err(io::Error::from_raw_os_error(-code)),
                    // A change after the last batch flags the dump's end alone.
                    _ if flags & NLM_F_DUMP_INTR != 0 => Err(interrupted_dump()),
                    _ => Ok(()),
                });
            }
            NLMSG_ERROR => {
                return Some(match code() {
                    Some(0) => Ok(()),
                    Some(code) => Err(io::Error::from_raw_os_error(-code)),
                    None => Err(malformed("an error message without its code")),
                });
            }
            _ => each(kind, message),
        }
        at += align4(len);
    }
    None
}

/// An rtnetlink dump of `request` (strict checking on: its header's fields filter), each
/// reply handed to `each`. A dump that a change interrupted (`NLM_F_DUMP_INTR`) is an
/// `Interrupted` error, after the replies: see [`retry_interrupted`].
pub fn route_dump(
    request: RouteNetlinkMessage,
    mut each: impl FnMut(RouteNetlinkMessage),
) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(header, NetlinkPayload::from(request));
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    route_dump_raw(&buf, |_, message| {
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(message) {
            Ok(NetlinkMessage {
                payload: NetlinkPayload::InnerMessage(inner),
                ..
            }) => each(inner),
            Ok(_) => {}
            Err(err) => return Err(io::Error::new(io::ErrorKind::InvalidData, err.to_string())),
        }
        Ok(())
    })
}

/// An rtnetlink dump of the request `message` (a whole netlink message; strict checking on),
/// each reply handed to `each` as its type and the whole message, header included. The first
/// error `each` returns ends the dump with it once the replies are read; a dump that a change
/// interrupted (`NLM_F_DUMP_INTR`) is an `Interrupted` error: see [`retry_interrupted`].
pub fn route_dump_raw(
    message: &[u8],
    mut each: impl FnMut(u16, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let (mut failed, mut interrupted) = (None, false);
    exchange_strict(NETLINK_ROUTE, message, |kind, message| {
        let flags = u16::from_ne_bytes([message[6], message[7]]);
        interrupted |= flags & NLM_F_DUMP_INTR != 0;
        if failed.is_none() {
            failed = each(kind, message).err();
        }
    })?;
    match (failed, interrupted) {
        (Some(err), _) => Err(err),
        (None, true) => Err(interrupted_dump()),
        (None, false) => Ok(()),
    }
}

/// A dump that a change interrupted (`NLM_F_DUMP_INTR`).
fn interrupted_dump() -> io::Error {
    io::Error::new(
        io::ErrorKind::Interrupted,
        "the dump was interrupted by a change",
    )
}

/// A netlink request: the header (sequence 1, the kernel as destination) and `body`.
pub fn request(kind: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(HEADER + body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    out.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    out.extend_from_slice(body);
    out
}

/// Appends the attribute `kind` with `payload`, padded to 4 bytes.
pub fn put_attribute(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(align4(out.len()), 0);
}

/// The attributes (`struct nlattr`) packed in `body`, each as its type (without the
/// `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER` flags) and payload. One whose length is shorter
/// than its header or runs past `body` is an `InvalidData` error, and the walk ends there;
/// padding missing after the last one is not.
pub fn attributes(body: &[u8]) -> Attributes<'_> {
    Attributes { rest: body }
}

/// See [`attributes`].
pub struct Attributes<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attributes<'a> {
    type Item = io::Result<(u16, &'a [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.rest);
        let (Some(len), Some(kind)) = (rest.get(..2), rest.get(2..4)) else {
            return Some(Err(malformed("an attribute header cut short")));
        };
        let len = usize::from(u16::from_ne_bytes([len[0], len[1]]));
        let kind = u16::from_ne_bytes([kind[0], kind[1]]) & NLA_TYPE_MASK;
        let Some(payload) = rest.get(4..len).filter(|_| len >= 4) else {
            return Some(Err(malformed("an attribute longer than its message")));
        };
        self.rest = rest.get(align4(len)..).unwrap_or_default();
        Some(Ok((kind, payload)))
    }
}

/// `nlattr.nla_type` without `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER`.
const NLA_TYPE_MASK: u16 = 0x3fff;

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("a malformed netlink message: {what}"),
    )
}

/// Runs `read` until its dumps were not interrupted by a change, three more times at most.
pub fn retry_interrupted<T>(mut read: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut tries = 0;
    loop {
        match read() {
            Err(err) if err.kind() == io::ErrorKind::Interrupted && tries < 3 => tries += 1,
            read => return read,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(body: &[u8]) -> Vec<Result<(u16, Vec<u8>), ()>> {
        attributes(body)
            .map(|a| {
                a.map(|(kind, payload)| (kind, payload.to_vec()))
                    .map_err(|_| ())
            })
            .collect()
    }

    #[test]
    fn attributes_are_walked_with_their_flags_off_and_padding_skipped() {
        let mut body = Vec::new();
        put_attribute(&mut body, 3, b"eth0\0");
        put_attribute(&mut body, 0x12 | 0x8000, &[]); // IFLA_LINKINFO, NLA_F_NESTED, empty
        put_attribute(&mut body, 10, &7u32.to_ne_bytes());
        assert_eq!(body.len(), 12 + 4 + 8);
        assert_eq!(
            walk(&body),
            [
                Ok((3, b"eth0\0".to_vec())),
                Ok((18, Vec::new())),
                Ok((10, 7u32.to_ne_bytes().to_vec()))
            ]
        );
        // The last attribute's padding may be left off.
        let mut unpadded = Vec::new();
        put_attribute(&mut unpadded, 3, b"lo\0");
        unpadded.truncate(7);
        assert_eq!(walk(&unpadded), [Ok((3, b"lo\0".to_vec()))]);
        assert!(walk(&[]).is_empty());
    }

    #[test]
    fn malformed_attributes_are_an_error_that_ends_the_walk() {
        let mut body = Vec::new();
        put_attribute(&mut body, 3, b"eth0\0");
        put_attribute(&mut body, 10, &7u32.to_ne_bytes());
        // Cut anywhere inside the second attribute: the first still reads, then one error.
        for cut in 13..body.len() {
            let walked = walk(&body[..cut]);
            assert_eq!(walked.len(), 2, "cut at {cut}");
            assert_eq!(walked[0], Ok((3, b"eth0\0".to_vec())));
            assert_eq!(walked[1], Err(()), "cut at {cut}");
        }
        // A length below the header's own (0 would never move on), or past the body.
        for len in [0u16, 3, 9] {
            let mut bad = len.to_ne_bytes().to_vec();
            bad.extend_from_slice(&[3, 0, 1, 2, 3, 4]);
            assert_eq!(walk(&bad), [Err(())], "length {len}");
        }
        // Stray bytes shorter than a header.
        assert_eq!(walk(&[8, 0, 3]), [Err(())]);
    }

    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&u32::try_from(HEADER + payload.len()).unwrap().to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn a_batch_ends_at_its_outcome_and_refuses_what_is_cut_short() {
        let mut seen = Vec::new();
        let mut batch = message(16, &[1, 2, 3, 4]);
        batch.extend(message(NLMSG_ERROR, &(-13i32).to_ne_bytes()));
        let outcome = replies(&batch, &mut |kind, _: &[u8]| seen.push(kind));
        assert_eq!(seen, [16]);
        assert_eq!(outcome.unwrap().unwrap_err().raw_os_error(), Some(13));

        assert!(replies(&message(16, &[]), &mut |_, _: &[u8]| {}).is_none());
        assert!(
            replies(&message(NLMSG_DONE, &[]), &mut |_, _: &[u8]| {})
                .unwrap()
                .is_ok()
        );
        // The end of a dump that a change interrupted.
        let mut done = message(NLMSG_DONE, &0i32.to_ne_bytes());
        done[6..8].copy_from_slice(&NLM_F_DUMP_INTR.to_ne_bytes());
        let outcome = replies(&done, &mut |_, _: &[u8]| {}).unwrap();
        assert_eq!(outcome.unwrap_err().kind(), io::ErrorKind::Interrupted);
        assert!(
            replies(
                &message(NLMSG_ERROR, &0i32.to_ne_bytes()),
                &mut |_, _: &[u8]| {}
            )
            .unwrap()
            .is_ok()
        );
        // An error message of the header alone (it once panicked), and one whose length runs
        // past the batch.
        for batch in [
            message(NLMSG_ERROR, &[]),
            message(16, &[0; 8])[..20].to_vec(),
        ] {
            let outcome = replies(&batch, &mut |_, _: &[u8]| {}).unwrap();
            assert_eq!(outcome.unwrap_err().kind(), io::ErrorKind::InvalidData);
        }
    }

    #[test]
    fn no_bytes_make_the_walk_panic() {
        // Every 1-, 2- and 3-byte body, and every length in an attribute header.
        for a in 0..=255u8 {
            for b in [0u8, 1, 4, 5, 255] {
                let _ = walk(&[a]);
                let _ = walk(&[a, b]);
                let _ = walk(&[a, b, 3]);
                let _ = walk(&[a, b, 3, 0, 1, 2, 3, 4, 5, 6]);
            }
        }
    }
}
