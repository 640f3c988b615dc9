//! The two nfnetlink requests the counters need, by hand (no crate here speaks `nf_tables`
//! over netlink): the named counters of one table, and whether a table exists. One
//! request-response on a netlink socket, where `nft -j list` spawns a process and parses
//! JSON (milliseconds per read).
//!
//! A dump that a change to the ruleset interrupted (the kernel marks its later parts
//! `NLM_F_DUMP_INTR`) is read again, as the rtnetlink dumps are
//! ([`netlink_dump::retry_interrupted`]).

use std::io;

use netlink_packet_core::NLM_F_DUMP_INTR;
use netlink_sys::protocols::NETLINK_NETFILTER;

use crate::netlink_dump::{self, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, align4};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWOBJ: u16 = 18;
const NFT_MSG_GETOBJ: u16 = 19;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NFPROTO_UNSPEC: u8 = 0;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// nlmsghdr (16 bytes) and nfgenmsg (4 bytes).
const HEADERS: usize = 20;

/// A named counter's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

fn attribute(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(align4(out.len()), 0);
}

fn string(value: &str) -> Vec<u8> {
    let mut bytes = value.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// An `nf_tables` request for the inet family with `attributes`.
fn request(message: u16, flags: u16, attributes: &[u8]) -> Vec<u8> {
    request_for(NFPROTO_INET, message, flags, attributes)
}

/// An `nf_tables` request for `family` (`NFPROTO_UNSPEC`: every family) with `attributes`.
fn request_for(family: u8, message: u16, flags: u16, attributes: &[u8]) -> Vec<u8> {
    let len = u32::try_from(HEADERS + attributes.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(HEADERS + attributes.len());
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | message).to_ne_bytes());
    out.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    out.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    out.extend_from_slice(&[family, 0, 0, 0]); // nfgenmsg: family, version 0, res_id
    out.extend_from_slice(attributes);
    out
}

/// The attributes of a message body, as (type without flags, payload).
fn attributes(mut body: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while body.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([body[0], body[1]]));
        let kind = u16::from_ne_bytes([body[2], body[3]]) & 0x3fff;
        if len < 4 || len > body.len() {
            break;
        }
        out.push((kind, &body[4..len]));
        body = &body[align4(len).min(body.len())..];
    }
    out
}

fn be64(payload: &[u8]) -> u64 {
    payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// Whether the kernel marked `message` (a reply, its header included) as part of a dump
/// that a change interrupted: the dump mixes the ruleset before and after it.
fn dump_interrupted(message: &[u8]) -> bool {
    message
        .get(6..8)
        .is_some_and(|flags| u16::from_ne_bytes([flags[0], flags[1]]) & NLM_F_DUMP_INTR != 0)
}

/// Sends `message` and hands every reply of type `wanted` to `each` (its family and its
/// body), until the dump ends or the ack arrives. A netlink error comes back as an
/// `io::Error`; a dump that a change interrupted as an `Interrupted` one, after its replies
/// (callers read again with [`netlink_dump::retry_interrupted`]).
fn exchange(message: &[u8], wanted: u16, mut each: impl FnMut(u8, &[u8])) -> io::Result<()> {
    let mut interrupted = false;
    netlink_dump::exchange(NETLINK_NETFILTER, message, |kind, message| {
        interrupted |= dump_interrupted(message);
        if kind == (NFNL_SUBSYS_NFTABLES << 8) | wanted && message.len() >= HEADERS {
            each(message[16], &message[HEADERS..]);
        }
    })?;
    if interrupted {
        return Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "an nf_tables dump was interrupted by a change to the ruleset",
        ));
    }
    Ok(())
}

/// The named counters of the inet table `table` (none if it does not exist).
pub fn read_counters(table: &str) -> io::Result<Vec<Counter>> {
    let mut attrs = Vec::new();
    attribute(&mut attrs, NFTA_OBJ_TABLE, &string(table));
    attribute(&mut attrs, NFTA_OBJ_TYPE, &NFT_OBJECT_COUNTER.to_be_bytes());
    netlink_dump::retry_interrupted(|| {
        let mut counters = Vec::new();
        exchange(
            &request(NFT_MSG_GETOBJ, NLM_F_DUMP, &attrs),
            NFT_MSG_NEWOBJ,
            |_, body| {
                let attrs = attributes(body);
                let text = |kind| {
                    attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| {
                        String::from_utf8_lossy(v.split(|&b| b == 0).next().unwrap_or(&[]))
                            .into_owned()
                    })
                };
                if text(NFTA_OBJ_TABLE).as_deref() != Some(table) {
                    return;
                }
                let Some(name) = text(NFTA_OBJ_NAME) else {
                    return;
                };
                let Some((_, data)) = attrs.iter().find(|(k, _)| *k == NFTA_OBJ_DATA) else {
                    return;
                };
                let data = attributes(data);
                let value = |kind| {
                    data.iter()
                        .find(|(k, _)| *k == kind)
                        .map_or(0, |(_, v)| be64(v))
                };
                counters.push(Counter {
                    name,
                    packets: value(NFTA_COUNTER_PACKETS),
                    bytes: value(NFTA_COUNTER_BYTES),
                });
            },
        )?;
        Ok(counters)
    })
}

/// Whether the inet table `table` exists.
pub fn table_exists(table: &str) -> io::Result<bool> {
    let mut attrs = Vec::new();
    attribute(&mut attrs, NFTA_TABLE_NAME, &string(table));
    let mut found = false;
    match exchange(
        &request(NFT_MSG_GETTABLE, NLM_F_ACK, &attrs),
        NFT_MSG_NEWTABLE,
        |_, _| {
            found = true;
        },
    ) {
        Ok(()) => Ok(found),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(err) => Err(err),
    }
}

/// The IP hook numbers (`NF_INET_PRE_ROUTING` = 0 … `NF_INET_POST_ROUTING` = 4) that base
/// chains of the ip, ip6 and inet families hook, tables named `except` in inet left out.
pub fn ip_hooks_in_use(except: &str) -> io::Result<Vec<u32>> {
    netlink_dump::retry_interrupted(|| {
        let mut hooks = Vec::new();
        exchange(
            &request_for(NFPROTO_UNSPEC, NFT_MSG_GETCHAIN, NLM_F_DUMP, &[]),
            NFT_MSG_NEWCHAIN,
            |family, body| {
                if !matches!(family, NFPROTO_INET | NFPROTO_IPV4 | NFPROTO_IPV6) {
                    return;
                }
                let attrs = attributes(body);
                let table = attrs.iter().find(|(k, _)| *k == NFTA_CHAIN_TABLE);
                if family == NFPROTO_INET && table.is_some_and(|(_, v)| *v == string(except)) {
                    return;
                }
                let Some((_, hook)) = attrs.iter().find(|(k, _)| *k == NFTA_CHAIN_HOOK) else {
                    return;
                };
                let number = attributes(hook)
                    .into_iter()
                    .find(|(k, _)| *k == NFTA_HOOK_HOOKNUM)
                    .and_then(|(_, v)| v.get(..4)?.try_into().ok())
                    .map(u32::from_be_bytes);
                hooks.extend(number);
            },
        )?;
        hooks.sort_unstable();
        hooks.dedup();
        Ok(hooks)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_attributes_round_trip() {
        let mut attrs = Vec::new();
        attribute(&mut attrs, NFTA_OBJ_TABLE, &string("collector"));
        attribute(&mut attrs, NFTA_OBJ_TYPE, &NFT_OBJECT_COUNTER.to_be_bytes());
        let message = request(NFT_MSG_GETOBJ, NLM_F_DUMP, &attrs);
        assert_eq!(message.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(message[..4].try_into().unwrap()) as usize,
            message.len()
        );
        let parsed = attributes(&message[HEADERS..]);
        assert_eq!(parsed[0], (NFTA_OBJ_TABLE, &b"collector\0"[..]));
        assert_eq!(parsed[1], (NFTA_OBJ_TYPE, &[0, 0, 0, 1][..]));
        assert_eq!(be64(&7u64.to_be_bytes()), 7);
        // A length running past the end stops the walk instead of panicking.
        assert!(attributes(&[200, 0, 1, 0, 0, 0]).is_empty());
        // Only a reply the kernel marked is an interrupted dump's.
        assert!(!dump_interrupted(&message));
        let mut marked = message.clone();
        marked[6..8].copy_from_slice(&(NLM_F_MULTI | NLM_F_DUMP_INTR).to_ne_bytes());
        assert!(dump_interrupted(&marked));
    }

    const NLM_F_MULTI: u16 = 2;

    /// A dump that a commit interrupts is marked so, and read again: a commit made while the
    /// first part of a long dump is handed over (in a network namespace of this thread's own).
    #[test]
    fn a_dump_a_change_interrupted_is_noticed_and_read_again() {
        std::thread::spawn(|| {
            // SAFETY: unshare on this thread only; its network namespace goes with it.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare (run as root): {}",
                io::Error::last_os_error()
            );
            // 2,000 counters: a dump of several parts, each made as the one before is read.
            let counters = (0..2000)
                .map(|n| format!("counter c{n} {{ }}"))
                .collect::<Vec<_>>()
                .join("\n");
            let ruleset = format!("table inet t {{\n{counters}\n}}\n");
            nft(&["-f", "-"], &ruleset);

            let mut attrs = Vec::new();
            attribute(&mut attrs, NFTA_OBJ_TABLE, &string("t"));
            let dump = request(NFT_MSG_GETOBJ, NLM_F_DUMP, &attrs);
            let mut seen = 0;
            let read = exchange(&dump, NFT_MSG_NEWOBJ, |_, _| {
                seen += 1;
                if seen == 1 {
                    nft(&["add", "counter", "inet", "t", "extra"], "");
                }
            });
            assert_eq!(
                read.map_err(|err| err.kind()),
                Err(io::ErrorKind::Interrupted)
            );
            // Read again, unchanged meanwhile: every counter, the new one included.
            assert_eq!(read_counters("t").unwrap().len(), 2001);
        })
        .join()
        .unwrap();
    }

    /// `nft args`, `input` on its standard input, in this thread's network namespace.
    fn nft(args: &[&str], input: &str) {
        use std::io::Write as _;
        let mut child = std::process::Command::new("nft")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "nft {args:?}");
    }
}
