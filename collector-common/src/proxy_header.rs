//! The PROXY protocol header (`HAProxy`'s, versions 1 and 2) that a load balancer may send
//! before the client's own bytes: its length, so that the kernel's reader skips it and reads
//! the ClientHello after it. Layout: <https://www.haproxy.org/download/3.0/doc/proxy-protocol.txt>
//! (version 1: `PROXY ` and a text line of at most 107 bytes ending in CRLF; version 2: a
//! 12-byte signature, version and command, family, and the length of what follows).
#![expect(
    clippy::inline_always,
    reason = "the kernel's reader inlines all of it, as the ClientHello parser"
)]
#![expect(
    clippy::cast_possible_truncation,
    reason = "lengths and indices here are at most 256"
)]

use crate::client_hello::{HelloBytes, SNI_NAME_MAX, first_of};

/// Longest version 1 header, its CRLF included.
pub const PROXY_V1_MAX: u32 = 107;
/// Length of a version 2 header's fixed part (the addresses and TLVs follow).
const V2_FIXED: u32 = 16;
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: [u8; 6] = *b"PROXY ";

/// What the first bytes of a connection say of a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// None: the client's own bytes start here.
    Absent,
    /// A whole header of this many bytes.
    Whole(u32),
    /// A header (its whole signature or prefix arrived) cut off by the end of the data.
    Incomplete,
    /// A header that breaks the format.
    Malformed,
}

/// The PROXY header that starts the payload `start..end` of `data`, if any. `line` is
/// working memory for the first bytes (the kernel has no room for them on its stack); what
/// it holds past them decides nothing, so it is not zeroed first (in the kernel that is a
/// call to a byte-wise `memset`, about 1,300 instructions a connection).
#[inline(always)]
pub fn proxy_header<B: HelloBytes>(
    data: &B,
    start: u32,
    end: u32,
    line: &mut [u8; SNI_NAME_MAX + 1],
) -> ProxyHeader {
    let have = end.saturating_sub(start);
    let read = have.min(PROXY_V1_MAX);
    if read == 0 || !data.name(start, read as usize, line) {
        return ProxyHeader::Absent;
    }
    let word = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&line[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    let (head, tail) = (word(0), word(8));
    // A header only once its whole signature (or prefix) arrived: balancers write it in one
    // piece, and shorter bytes that merely begin like one (a scanner's bare CRLFs) are no
    // header, and not TLS either.
    let mut signature = [0u8; 16];
    signature[..12].copy_from_slice(&V2_SIGNATURE);
    let signature_head = u64::from_le_bytes(signature[..8].try_into().unwrap_or([0; 8]));
    let signature_tail = u64::from_le_bytes(signature[8..].try_into().unwrap_or([0; 8]));
    let v2 = have >= V2_SIGNATURE.len() as u32
        && head == signature_head
        && (tail ^ signature_tail) & first_bytes(4) == 0;
    if v2 {
        if have < V2_FIXED {
            return ProxyHeader::Incomplete;
        }
        let version_command = line[12];
        // Version 2; command LOCAL (a balancer's own check) or PROXY.
        if version_command >> 4 != 2 || version_command & 0x0f > 1 {
            return ProxyHeader::Malformed;
        }
        let total = V2_FIXED + u32::from(u16::from_be_bytes([line[14], line[15]]));
        return if total > have {
            ProxyHeader::Incomplete
        } else {
            ProxyHeader::Whole(total)
        };
    }
    let mut prefix = [0u8; 8];
    prefix[..6].copy_from_slice(&V1_PREFIX);
    if have < V1_PREFIX.len() as u32
        || (head ^ u64::from_le_bytes(prefix)) & first_bytes(V1_PREFIX.len() as u32) != 0
    {
        return ProxyHeader::Absent;
    }
    let newline = first_of(line, b'\n') as u32;
    if newline >= read {
        return if have < PROXY_V1_MAX {
            ProxyHeader::Incomplete
        } else {
            ProxyHeader::Malformed
        };
    }
    // The mask bounds the index for the kernel's verifier.
    if line[(newline as usize).wrapping_sub(1) & SNI_NAME_MAX] != b'\r' {
        return ProxyHeader::Malformed;
    }
    ProxyHeader::Whole(newline + 1)
}

/// A mask of the first `n` bytes (at most 8) of a little-endian word.
#[inline(always)]
fn first_bytes(n: u32) -> u64 {
    match n.min(8) {
        0 => 0,
        n => u64::MAX >> (64 - 8 * n),
    }
}
