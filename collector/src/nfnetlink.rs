//! The `nf_tables` requests our table needs, by hand (no crate here speaks `nf_tables` over
//! netlink): the named counters of one table, what one table holds (its chains and their
//! rules, its maps and their elements, its objects), the ruleset's generation, and the
//! hooks in use. One request-response on a netlink socket each, where `nft -j list` spawns
//! a process and parses JSON (milliseconds per read).
//!
//! A dump that a change to the ruleset interrupted (the kernel marks its later parts
//! `NLM_F_DUMP_INTR`) is read again, as the rtnetlink dumps are
//! ([`netlink_dump::retry_interrupted`]).

use std::io;

use netlink_packet_core::NLM_F_DUMP_INTR;
use netlink_sys::protocols::NETLINK_NETFILTER;

use crate::netlink_dump::{self, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFT_MSG_NEWOBJ: u16 = 18;
const NFT_MSG_GETOBJ: u16 = 19;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_TABLE_USE: u16 = 3;
const NFTA_TABLE_HANDLE: u16 = 4;
const NFTA_TABLE_USERDATA: u16 = 6;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_OBJ_TYPE: u16 = 15;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
const NFTA_SET_ELEM_OBJREF: u16 = 9;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
/// `immediate`'s register (0: the verdict) and data.
pub const NFTA_IMMEDIATE_DREG: u16 = 1;
pub const NFTA_IMMEDIATE_DATA: u16 = 2;
pub const NFT_JUMP: i32 = -3;
pub const NFT_RETURN: i32 = -5;
const NFTA_GEN_ID: u16 = 1;
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFTA_OBJ_USERDATA: u16 = 8;
pub const NFT_OBJECT_COUNTER: u32 = 1;
/// The attributes of the expressions our rule is made of, and their values.
pub const NFTA_META_KEY: u16 = 2;
pub const NFT_META_L4PROTO: u32 = 16;
pub const NFT_META_NFPROTO: u32 = 15;
/// A set's flag: its elements are ranges.
pub const NFT_SET_INTERVAL: u32 = 4;
pub const NFTA_PAYLOAD_BASE: u16 = 2;
pub const NFTA_PAYLOAD_OFFSET: u16 = 3;
pub const NFTA_PAYLOAD_LEN: u16 = 4;
pub const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
pub const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
pub const NFTA_OBJREF_SET_NAME: u16 = 4;
pub const NFTA_LOOKUP_SET: u16 = 1;
pub const NFTA_LOOKUP_DREG: u16 = 3;
pub const NFTA_LOOKUP_FLAGS: u16 = 5;
pub const NFTA_FIB_DREG: u16 = 1;
pub const NFTA_FIB_RESULT: u16 = 2;
pub const NFTA_FIB_FLAGS: u16 = 3;
pub const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
pub const NFTA_FIB_F_SADDR: u32 = 1;
pub const NFTA_FIB_F_DADDR: u32 = 2;
pub const NFTA_CMP_SREG: u16 = 1;
pub const NFTA_CMP_OP: u16 = 2;
pub const NFTA_CMP_DATA: u16 = 3;
pub const NFT_CMP_EQ: u32 = 0;
/// The address type `fib ... type local` compares with, in host order as a register holds it.
pub const RTN_LOCAL: u32 = 2;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
/// libnftnl's user data: (type u8, length u8, value) records; type 0 is the comment of a
/// table, chain, set, object or rule alike.
const NFTNL_UDATA_COMMENT: u8 = 0;
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

/// What one inet table holds, as the kernel has it: enough to tell whether it is ours and
/// whether it is as a config plans it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableContents {
    pub handle: u64,
    /// `NFT_TABLE_F_DORMANT` (1): its chains hook nothing.
    pub flags: u32,
    /// The kernel's count of its chains, sets, objects and flowtables.
    pub use_count: u32,
    /// Its user data (`nft` keeps a table's comment there), if any.
    pub userdata: Option<Vec<u8>>,
    pub chains: Vec<Chain>,
    pub rules: Vec<Rule>,
    pub sets: Vec<Set>,
    pub objects: Vec<Object>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// A base chain's hook number and priority.
    pub hook: Option<(u32, i32)>,
    /// A base chain's type (`filter`, `nat`, `route`).
    pub kind: Option<String>,
    /// A base chain's policy (`NF_ACCEPT` = 1).
    pub policy: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: String,
    pub expressions: Vec<Expression>,
}

/// One expression of a rule: its name (`meta`, `payload`, `objref`) and its attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expression {
    pub name: String,
    pub data: Vec<(u16, Vec<u8>)>,
}

impl Expression {
    /// The big-endian u32 attribute `kind`.
    #[must_use]
    pub fn be32(&self, kind: u16) -> Option<u32> {
        self.data
            .iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, v)| v.get(..4)?.try_into().ok())
            .map(u32::from_be_bytes)
    }

    /// The string attribute `kind`.
    #[must_use]
    pub fn text(&self, kind: u16) -> Option<String> {
        self.data
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| text(v))
    }

    /// The value (`NFTA_DATA_VALUE`) nested in the attribute `kind`, as a `cmp` holds the
    /// data it compares with.
    #[must_use]
    pub fn data_value(&self, kind: u16) -> Option<&[u8]> {
        let (_, nested) = self.data.iter().find(|(k, _)| *k == kind)?;
        data_value(nested)
    }

    /// The verdict (`NFTA_DATA_VERDICT`) nested in the attribute `kind`, as an `immediate`
    /// holds a jump or a return: its code (`NFT_JUMP`, `NFT_RETURN`) and the chain jumped to.
    #[must_use]
    pub fn verdict(&self, kind: u16) -> Option<(i32, Option<String>)> {
        let (_, nested) = self.data.iter().find(|(k, _)| *k == kind)?;
        let verdict = attributes(find(&attributes(nested), NFTA_DATA_VERDICT)?);
        let code = find_be32(&verdict, NFTA_VERDICT_CODE)?.cast_signed();
        Some((code, find_text(&verdict, NFTA_VERDICT_CHAIN)))
    }
}

/// A set or map, with its elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub key_len: u32,
    /// `NFT_SET_*` flags.
    pub flags: u32,
    /// The object type a map of objects maps to (`NFT_OBJECT_COUNTER`).
    pub object_type: Option<u32>,
    pub elements: Vec<Element>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub key: Vec<u8>,
    /// The object an element of a map of objects names.
    pub object: Option<String>,
    /// In an interval set, the element ends a range (its key is the address after it).
    pub interval_end: bool,
}

/// A stateful object (a named counter, quota, limit...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub name: String,
    pub kind: u32,
    pub comment: Option<String>,
}

fn string(value: &str) -> Vec<u8> {
    let mut bytes = value.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

/// A string attribute's text, up to its terminating NUL.
fn text(payload: &[u8]) -> String {
    String::from_utf8_lossy(payload.split(|&b| b == 0).next().unwrap_or(&[])).into_owned()
}

/// The comment in libnftnl user data, if it has one.
#[must_use]
pub fn comment(userdata: &[u8]) -> Option<String> {
    userdata_records(userdata)?
        .into_iter()
        .find(|&(kind, _)| kind == NFTNL_UDATA_COMMENT)
        .map(|(_, value)| text(value))
}

/// libnftnl user data as (type, value) records; `None` if a record runs past the end.
#[must_use]
pub fn userdata_records(mut userdata: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let mut records = Vec::new();
    while let [kind, len, rest @ ..] = userdata {
        let value = rest.get(..usize::from(*len))?;
        records.push((*kind, value));
        userdata = &rest[value.len()..];
    }
    userdata.is_empty().then_some(records)
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

/// The attributes of a message body, as (type without flags, payload), up to a malformed one.
fn attributes(body: &[u8]) -> Vec<(u16, &[u8])> {
    netlink_dump::attributes(body)
        .map_while(Result::ok)
        .collect()
}

/// The attribute `kind` of `attrs`.
fn find<'a>(attrs: &[(u16, &'a [u8])], kind: u16) -> Option<&'a [u8]> {
    attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v)
}

/// The value (`NFTA_DATA_VALUE`) of a nested data attribute's payload.
fn data_value(nested: &[u8]) -> Option<&[u8]> {
    find(&attributes(nested), NFTA_DATA_VALUE)
}

fn find_text(attrs: &[(u16, &[u8])], kind: u16) -> Option<String> {
    find(attrs, kind).map(text)
}

fn find_be32(attrs: &[(u16, &[u8])], kind: u16) -> Option<u32> {
    find(attrs, kind)
        .and_then(|v| v.get(..4)?.try_into().ok())
        .map(u32::from_be_bytes)
}

fn be64(payload: &[u8]) -> Option<u64> {
    payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
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
    netlink_dump::retry_interrupted(|| {
        let mut counters = Vec::new();
        let mut unreadable = None;
        objects_dump(table, Some(NFT_OBJECT_COUNTER), |name, _, attrs| {
            let data = find(attrs, NFTA_OBJ_DATA).map(attributes);
            let value = |kind| data.as_ref().and_then(|data| be64(find(data, kind)?));
            match (value(NFTA_COUNTER_PACKETS), value(NFTA_COUNTER_BYTES)) {
                (Some(packets), Some(bytes)) => counters.push(Counter {
                    name,
                    packets,
                    bytes,
                }),
                _ => unreadable = Some(name),
            }
        })?;
        // An error, not a zero: a count read as 0 and then read again would look reset, and
        // a counter left out as removed.
        match unreadable {
            Some(name) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the nf_tables counter {name} came without its counts"),
            )),
            None => Ok(counters),
        }
    })
}

/// One dump of the objects of the inet table `table` (of type `kind` only, if given), each
/// handed to `each` with its name, type and attributes.
fn objects_dump(
    table: &str,
    kind: Option<u32>,
    mut each: impl FnMut(String, u32, &[(u16, &[u8])]),
) -> io::Result<()> {
    let mut attrs = Vec::new();
    netlink_dump::put_attribute(&mut attrs, NFTA_OBJ_TABLE, &string(table));
    if let Some(kind) = kind {
        netlink_dump::put_attribute(&mut attrs, NFTA_OBJ_TYPE, &kind.to_be_bytes());
    }
    exchange(
        &request(NFT_MSG_GETOBJ, NLM_F_DUMP, &attrs),
        NFT_MSG_NEWOBJ,
        |_, body| {
            let attrs = attributes(body);
            if find_text(&attrs, NFTA_OBJ_TABLE).as_deref() != Some(table) {
                return;
            }
            let (Some(name), Some(kind)) = (
                find_text(&attrs, NFTA_OBJ_NAME),
                find_be32(&attrs, NFTA_OBJ_TYPE),
            ) else {
                return;
            };
            each(name, kind, &attrs);
        },
    )
}

/// The inet table `table`'s own attributes (nothing of what it holds yet), if it exists.
fn table_header(table: &str) -> io::Result<Option<TableContents>> {
    let mut attrs = Vec::new();
    netlink_dump::put_attribute(&mut attrs, NFTA_TABLE_NAME, &string(table));
    let mut found = None;
    match exchange(
        &request(NFT_MSG_GETTABLE, NLM_F_ACK, &attrs),
        NFT_MSG_NEWTABLE,
        |_, body| {
            let attrs = attributes(body);
            found = Some(TableContents {
                handle: find(&attrs, NFTA_TABLE_HANDLE).and_then(be64).unwrap_or(0),
                flags: find_be32(&attrs, NFTA_TABLE_FLAGS).unwrap_or(0),
                use_count: find_be32(&attrs, NFTA_TABLE_USE).unwrap_or(0),
                userdata: find(&attrs, NFTA_TABLE_USERDATA).map(<[u8]>::to_vec),
                ..TableContents::default()
            });
        },
    ) {
        Ok(()) => Ok(found),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(err) => Err(err),
    }
}

/// The ruleset's generation in this network namespace: every committed change to any
/// table moves it.
pub fn generation() -> io::Result<u32> {
    let mut generation = None;
    exchange(
        &request_for(NFPROTO_UNSPEC, NFT_MSG_GETGEN, NLM_F_ACK, &[]),
        NFT_MSG_NEWGEN,
        |_, body| generation = find_be32(&attributes(body), NFTA_GEN_ID),
    )?;
    generation.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the kernel's nf_tables generation reply had no id",
        )
    })
}

/// What the inet table `table` holds, and the ruleset's generation it was read at (`None`
/// if the table does not exist). Its chains, rules, sets and objects are read by a dump
/// each, all between two reads of the generation: a change meanwhile reads it all again.
pub fn read_table(table: &str) -> io::Result<Option<(TableContents, u32)>> {
    let changed = || {
        io::Error::new(
            io::ErrorKind::Interrupted,
            "the nftables ruleset changed while our table was read",
        )
    };
    netlink_dump::retry_interrupted(|| {
        let before = generation()?;
        let Some(mut contents) = table_header(table)? else {
            return Ok(None);
        };
        // The table, or a set of it, gone between two dumps: a change meanwhile.
        let gone = |err: io::Error| {
            if err.raw_os_error() == Some(libc::ENOENT) {
                changed()
            } else {
                err
            }
        };
        contents.chains = chains(table)?;
        contents.rules = rules(table).map_err(gone)?;
        contents.sets = sets(table).map_err(gone)?;
        for set in &mut contents.sets {
            set.elements = elements(table, &set.name).map_err(gone)?;
        }
        objects_dump(table, None, |name, kind, attrs| {
            contents.objects.push(Object {
                name,
                kind,
                comment: find(attrs, NFTA_OBJ_USERDATA).and_then(comment),
            });
        })
        .map_err(gone)?;
        if generation()? != before {
            return Err(changed());
        }
        Ok(Some((contents, before)))
    })
}

/// The chains of the inet table `table`.
fn chains(table: &str) -> io::Result<Vec<Chain>> {
    let mut chains = Vec::new();
    // The kernel dumps every inet chain (a chain dump has no table filter); ours are picked.
    exchange(
        &request(NFT_MSG_GETCHAIN, NLM_F_DUMP, &[]),
        NFT_MSG_NEWCHAIN,
        |_, body| {
            let attrs = attributes(body);
            if find_text(&attrs, NFTA_CHAIN_TABLE).as_deref() != Some(table) {
                return;
            }
            let Some(name) = find_text(&attrs, NFTA_CHAIN_NAME) else {
                return;
            };
            let hook = find(&attrs, NFTA_CHAIN_HOOK).map(attributes);
            let hook = hook.as_deref().and_then(|hook| {
                let number = find_be32(hook, NFTA_HOOK_HOOKNUM)?;
                let priority = find_be32(hook, NFTA_HOOK_PRIORITY)?;
                Some((number, i32::from_be_bytes(priority.to_be_bytes())))
            });
            chains.push(Chain {
                name,
                hook,
                kind: find_text(&attrs, NFTA_CHAIN_TYPE),
                policy: find_be32(&attrs, NFTA_CHAIN_POLICY),
            });
        },
    )?;
    Ok(chains)
}

/// The rules of the inet table `table`, with their expressions.
fn rules(table: &str) -> io::Result<Vec<Rule>> {
    let mut attrs = Vec::new();
    netlink_dump::put_attribute(&mut attrs, NFTA_RULE_TABLE, &string(table));
    let mut rules = Vec::new();
    exchange(
        &request(NFT_MSG_GETRULE, NLM_F_DUMP, &attrs),
        NFT_MSG_NEWRULE,
        |_, body| {
            let attrs = attributes(body);
            if find_text(&attrs, NFTA_RULE_TABLE).as_deref() != Some(table) {
                return;
            }
            let Some(chain) = find_text(&attrs, NFTA_RULE_CHAIN) else {
                return;
            };
            let expressions = find(&attrs, NFTA_RULE_EXPRESSIONS)
                .map(attributes)
                .unwrap_or_default()
                .into_iter()
                .filter(|(kind, _)| *kind == NFTA_LIST_ELEM)
                .map(|(_, expression)| {
                    let attrs = attributes(expression);
                    Expression {
                        name: find_text(&attrs, NFTA_EXPR_NAME).unwrap_or_default(),
                        data: find(&attrs, NFTA_EXPR_DATA)
                            .map(attributes)
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(kind, value)| (kind, value.to_vec()))
                            .collect(),
                    }
                })
                .collect();
            rules.push(Rule { chain, expressions });
        },
    )?;
    Ok(rules)
}

/// The sets and maps of the inet table `table`, their elements not read yet.
fn sets(table: &str) -> io::Result<Vec<Set>> {
    let mut attrs = Vec::new();
    netlink_dump::put_attribute(&mut attrs, NFTA_SET_TABLE, &string(table));
    let mut sets = Vec::new();
    exchange(
        &request(NFT_MSG_GETSET, NLM_F_DUMP, &attrs),
        NFT_MSG_NEWSET,
        |_, body| {
            let attrs = attributes(body);
            if find_text(&attrs, NFTA_SET_TABLE).as_deref() != Some(table) {
                return;
            }
            let Some(name) = find_text(&attrs, NFTA_SET_NAME) else {
                return;
            };
            sets.push(Set {
                name,
                key_len: find_be32(&attrs, NFTA_SET_KEY_LEN).unwrap_or(0),
                flags: find_be32(&attrs, NFTA_SET_FLAGS).unwrap_or(0),
                object_type: find_be32(&attrs, NFTA_SET_OBJ_TYPE),
                elements: Vec::new(),
            });
        },
    )?;
    Ok(sets)
}

/// The elements of the set `set` of the inet table `table`.
fn elements(table: &str, set: &str) -> io::Result<Vec<Element>> {
    let mut attrs = Vec::new();
    netlink_dump::put_attribute(&mut attrs, NFTA_SET_ELEM_LIST_TABLE, &string(table));
    netlink_dump::put_attribute(&mut attrs, NFTA_SET_ELEM_LIST_SET, &string(set));
    let mut elements = Vec::new();
    exchange(
        &request(NFT_MSG_GETSETELEM, NLM_F_DUMP, &attrs),
        NFT_MSG_NEWSETELEM,
        |_, body| {
            let attrs = attributes(body);
            let Some(list) = find(&attrs, NFTA_SET_ELEM_LIST_ELEMENTS) else {
                return;
            };
            for (kind, element) in attributes(list) {
                if kind != NFTA_LIST_ELEM {
                    continue;
                }
                let element = attributes(element);
                let key = find(&element, NFTA_SET_ELEM_KEY)
                    .and_then(data_value)
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default();
                elements.push(Element {
                    key,
                    object: find_text(&element, NFTA_SET_ELEM_OBJREF),
                    interval_end: find_be32(&element, NFTA_SET_ELEM_FLAGS)
                        .is_some_and(|flags| flags & NFT_SET_ELEM_INTERVAL_END != 0),
                });
            }
        },
    )?;
    Ok(elements)
}

/// A base chain of the ip, ip6 or inet family: where it hooks, its table and its name.
pub struct IpHook {
    /// `NF_INET_PRE_ROUTING` = 0 … `NF_INET_POST_ROUTING` = 4.
    pub hook: u32,
    pub inet: bool,
    pub table: String,
    pub chain: String,
}

/// Every base chain of the ip, ip6 and inet families.
pub fn ip_hooks() -> io::Result<Vec<IpHook>> {
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
                let Some(hook) = find(&attrs, NFTA_CHAIN_HOOK) else {
                    return;
                };
                let Some(hook) = find_be32(&attributes(hook), NFTA_HOOK_HOOKNUM) else {
                    return;
                };
                hooks.push(IpHook {
                    hook,
                    inet: family == NFPROTO_INET,
                    table: find_text(&attrs, NFTA_CHAIN_TABLE).unwrap_or_default(),
                    chain: find_text(&attrs, NFTA_CHAIN_NAME).unwrap_or_default(),
                });
            },
        )?;
        Ok(hooks)
    })
}

/// The kernel has no `nf_tables` (nor nfnetlink): no table of ours can be there. nfnetlink
/// answers EINVAL for a subsystem it does not have; a kernel without it refuses the socket.
pub fn without_nf_tables(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EINVAL | libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT | libc::EOPNOTSUPP)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_attributes_round_trip() {
        let mut attrs = Vec::new();
        netlink_dump::put_attribute(&mut attrs, NFTA_OBJ_TABLE, &string("collector"));
        netlink_dump::put_attribute(&mut attrs, NFTA_OBJ_TYPE, &NFT_OBJECT_COUNTER.to_be_bytes());
        let message = request(NFT_MSG_GETOBJ, NLM_F_DUMP, &attrs);
        assert_eq!(message.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(message[..4].try_into().unwrap()) as usize,
            message.len()
        );
        let parsed = attributes(&message[HEADERS..]);
        assert_eq!(parsed[0], (NFTA_OBJ_TABLE, &b"collector\0"[..]));
        assert_eq!(parsed[1], (NFTA_OBJ_TYPE, &[0, 0, 0, 1][..]));
        assert_eq!(be64(&7u64.to_be_bytes()), Some(7));
        assert_eq!(be64(&[0; 4]), None);
        // A length running past the end stops the walk instead of panicking.
        assert!(attributes(&[200, 0, 1, 0, 0, 0]).is_empty());
        // Only a reply the kernel marked is an interrupted dump's.
        assert!(!dump_interrupted(&message));
        let mut marked = message.clone();
        marked[6..8].copy_from_slice(&(NLM_F_MULTI | NLM_F_DUMP_INTR).to_ne_bytes());
        assert!(dump_interrupted(&marked));
    }

    const NLM_F_MULTI: u16 = 2;

    #[test]
    fn the_comment_is_read_from_user_data_records() {
        // As libnftnl writes it: type, length, value (with its NUL).
        let mut userdata = vec![1, 2, 9, 9, NFTNL_UDATA_COMMENT, 4];
        userdata.extend_from_slice(b"abc\0");
        assert_eq!(comment(&userdata).as_deref(), Some("abc"));
        assert_eq!(comment(&[1, 2, 9, 9]), None);
        // A record running past the end is no comment, and no panic.
        assert_eq!(comment(&[NFTNL_UDATA_COMMENT, 9, b'a']), None);
    }

    /// A dump that a commit interrupts is marked so, and read again: a commit made while the
    /// first part of a long dump is handed over (in a network namespace of this thread's own).
    #[test]
    fn a_dump_a_change_interrupted_is_noticed_and_read_again() {
        crate::netns::in_new_namespace(|| {
            // 2,000 counters: a dump of several parts, each made as the one before is read.
            let counters = (0..2000)
                .map(|n| format!("counter c{n} {{ }}"))
                .collect::<Vec<_>>()
                .join("\n");
            let ruleset = format!("table inet t {{\n{counters}\n}}\n");
            nft(&["-f", "-"], &ruleset);

            let mut attrs = Vec::new();
            netlink_dump::put_attribute(&mut attrs, NFTA_OBJ_TABLE, &string("t"));
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
        });
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

    #[test]
    fn only_a_kernel_without_nf_tables_means_no_table() {
        for errno in [libc::EINVAL, libc::EPROTONOSUPPORT, libc::EAFNOSUPPORT] {
            assert!(without_nf_tables(&io::Error::from_raw_os_error(errno)));
        }
        // The ruleset changing all through the read, or a lost reply: not known.
        for errno in [libc::EINTR, libc::ENOBUFS, libc::EBUSY] {
            assert!(!without_nf_tables(&io::Error::from_raw_os_error(errno)));
        }
        assert!(!without_nf_tables(&io::Error::new(
            io::ErrorKind::Interrupted,
            "the nftables ruleset changed while our table was read"
        )));
    }
}
