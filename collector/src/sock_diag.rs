//! The TCP sockets of this network namespace, listed over `NETLINK_SOCK_DIAG` (`inet_diag`):
//! one dump per address family, no privilege needed.

use std::{collections::HashSet, io};

use netlink_sys::protocols::NETLINK_SOCK_DIAG;

use crate::netlink_dump::{self, HEADER, NLM_F_DUMP, NLM_F_REQUEST};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const IPPROTO_TCP: u8 = 6;
/// `inet_diag_req_v2`: family, protocol, extensions, pad, states, then a 48-byte socket id.
const REQUEST_LEN: usize = 56;
/// Where `inet_diag_msg` keeps its timer kind, the local and remote ports (network order)
/// and the cookie.
const TIMER_AT: usize = 2;
const SPORT_AT: usize = 4;
const DPORT_AT: usize = 6;
const COOKIE_AT: usize = 44;
const MESSAGE_LEN: usize = 72;
/// The timer kind the kernel gives time-wait sockets alone (`inet_twsk_diag_fill`).
const TIME_WAIT_TIMER: u8 = 3;

/// TCP states of a connection past its handshake and not yet closed: established, the two
/// FIN waits, close wait, last ACK, closing.
const OPEN_STATES: u32 = 1 << 1 | 1 << 4 | 1 << 5 | 1 << 8 | 1 << 9 | 1 << 11;
/// `TCP_LISTEN`.
const LISTEN_STATE: u32 = 1 << 10;

/// An open TCP connection: the socket's cookie (the one BPF programs read) and its ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenSocket {
    pub cookie: u64,
    pub local_port: u16,
    pub remote_port: u16,
}

/// Every open TCP connection of this namespace, IPv4 and IPv6.
pub fn open_tcp_connections() -> io::Result<Vec<OpenSocket>> {
    tcp_sockets(OPEN_STATES)
}

/// The local ports of this namespace's listening TCP sockets: a connection on one of them
/// was accepted, not connected.
pub fn listening_ports() -> io::Result<HashSet<u16>> {
    Ok(tcp_sockets(LISTEN_STATE)?
        .into_iter()
        .map(|socket| socket.local_port)
        .collect())
}

/// The TCP sockets of this namespace in `states` (a bit per TCP state), IPv4 and IPv6.
fn tcp_sockets(states: u32) -> io::Result<Vec<OpenSocket>> {
    let mut found = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        let family = u8::try_from(family).map_err(io::Error::other)?;
        netlink_dump::exchange(
            NETLINK_SOCK_DIAG,
            &request(family, states),
            |kind, message| {
                let Some(body) = message.get(HEADER..HEADER + MESSAGE_LEN) else {
                    return;
                };
                // A time-wait socket is matched by the state it was closed in (FIN_WAIT2
                // for a proxy that closed first) and keeps its socket's cookie, but its
                // connection is closed, and was counted so.
                if kind == SOCK_DIAG_BY_FAMILY && body[TIMER_AT] != TIME_WAIT_TIMER {
                    let word = |at: usize| {
                        u32::from_ne_bytes(body[at..at + 4].try_into().unwrap_or([0; 4]))
                    };
                    found.push(OpenSocket {
                        cookie: u64::from(word(COOKIE_AT)) | u64::from(word(COOKIE_AT + 4)) << 32,
                        local_port: u16::from_be_bytes([body[SPORT_AT], body[SPORT_AT + 1]]),
                        remote_port: u16::from_be_bytes([body[DPORT_AT], body[DPORT_AT + 1]]),
                    });
                }
            },
        )?;
    }
    Ok(found)
}

fn request(family: u8, states: u32) -> Vec<u8> {
    let len = u32::try_from(HEADER + REQUEST_LEN).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(HEADER + REQUEST_LEN);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    out.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    out.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    out.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    out.extend_from_slice(&states.to_ne_bytes());
    out.resize(HEADER + REQUEST_LEN, 0); // any socket id
    out
}
