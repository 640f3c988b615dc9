//! One netlink request and its replies, by hand: `nf_tables`' counters and tables
//! (`nfnetlink`) and the socket list (`sock_diag`), which no crate here makes, and the
//! interface, address and route dumps (`links`, `addresses`: rtnetlink), whose messages
//! netlink-packet-route builds and parses.

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
        let mut at = 0;
        while at + HEADER <= size {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or([0; 4])) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < HEADER || at + len > size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a truncated netlink message",
                ));
            }
            let message = &buf[at..at + len];
            match kind {
                // A dump's end carries its outcome: the kernel may refuse a dump (a filter
                // strict checking rejects) with nothing before it.
                NLMSG_DONE => {
                    let code = message.get(HEADER..HEADER + 4).map_or(0, |bytes| {
                        i32::from_ne_bytes(bytes.try_into().unwrap_or([0; 4]))
                    });
                    return if code < 0 {
                        Err(io::Error::from_raw_os_error(-code))
                    } else {
                        Ok(())
                    };
                }
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes(
                        message[HEADER..HEADER + 4].try_into().unwrap_or([0; 4]),
                    );
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-code))
                    };
                }
                _ => each(kind, message),
            }
            at += align4(len);
        }
    }
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
    let (mut malformed, mut interrupted) = (None, false);
    exchange_strict(NETLINK_ROUTE, &buf, |_, message| {
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(message) {
            Ok(NetlinkMessage {
                header,
                payload: NetlinkPayload::InnerMessage(inner),
                ..
            }) => {
                interrupted |= header.flags & NLM_F_DUMP_INTR != 0;
                each(inner);
            }
            Ok(_) => {}
            Err(err) => malformed = Some(err.to_string()),
        }
    })?;
    match (malformed, interrupted) {
        (Some(err), _) => Err(io::Error::new(io::ErrorKind::InvalidData, err)),
        (None, true) => Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "the dump was interrupted by a change",
        )),
        (None, false) => Ok(()),
    }
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
