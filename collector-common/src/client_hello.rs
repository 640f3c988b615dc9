//! The server name (SNI) of a TLS ClientHello, from the first segment a client sends: the
//! kernel reads it to count a connection on a port shared by routes told apart by name, and
//! the agent's tests run the same code against rustls. Bounded: a fixed number of
//! extensions, a name of at most [`SNI_NAME_MAX`] bytes, every read checked against the
//! lengths the hello declares and the bytes the segment has.
//!
//! Layout (RFC 8446 section 4.1.2, RFC 6066 section 3): a handshake record (type 22) whose
//! first message is a ClientHello (type 1): version, random, session id, cipher suites,
//! compression methods, extensions; the `server_name` extension (type 0) holds a list whose
//! `host_name` entry (type 0) is the name.
#![expect(
    clippy::inline_always,
    reason = "the kernel's reader inlines all of it: a BPF call per read costs more"
)]
#![expect(
    clippy::cast_possible_truncation,
    reason = "lengths here are at most 2^24 (a hello's) and names at most 255 bytes"
)]

/// Longest server name read: a DNS name has at most 253 characters; 255 leaves room for a
/// trailing dot, which is taken off.
pub const SNI_NAME_MAX: usize = 255;

/// Most bytes of a `server_name` extension's body a segment's cut keeps for the next
/// ([`Hello::NameCut`]): its list's and entry's headers (5 bytes) and the longest name.
pub const SNI_KEPT_MAX: usize = 5 + SNI_NAME_MAX;

/// Extensions looked through in one segment before the server name is given up on (a hello
/// read on over segments walks this many in each). Browsers send about 20; the limit bounds
/// the kernel's loop.
pub const SNI_MAX_EXTENSIONS: u32 = 64;

/// Where the payload of a segment is read from: the kernel's socket buffer or a test's bytes.
pub trait HelloBytes {
    /// The `N` bytes at `offset`, if the data has them.
    fn array<const N: usize>(&self, offset: u32) -> Option<[u8; N]>;
    /// Copies `len` bytes (1 to [`SNI_NAME_MAX`]) at `offset` to the front of `out`.
    fn name(&self, offset: u32, len: usize, out: &mut [u8; SNI_NAME_MAX + 1]) -> bool;
}

/// What the first segment of a connection says about its server name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello naming `len` bytes, found at `offset` of the data and copied to the
    /// front of the name buffer.
    Name { offset: u32, len: usize },
    /// A ClientHello without a `host_name` server name.
    NoName,
    /// Not a TLS handshake starting with a ClientHello.
    NotHello,
    /// A ClientHello cut where it cannot be read on: before its extensions, in an
    /// extension's header, or the body of its name's extension, over three segments, or by
    /// the end of its record; or one whose name lies past [`SNI_MAX_EXTENSIONS`] extensions
    /// in this segment.
    Incomplete,
    /// A ClientHello whose lengths contradict each other, or a name too long.
    Malformed,
    /// The segment ended in the extensions, outside the server name's body, the hello and
    /// its record going on: [`server_name_after`] reads on from the extension at `next` in
    /// the data that follows. Offsets are the data's. A `next` before the segment's end is
    /// an extension's header the segment cut in two: the caller keeps its first bytes (from
    /// `next` to the end) for the next segment, as a [`CutHeader`].
    Continues {
        next: u32,
        hello_end: u32,
        record_end: u32,
    },
    /// The segment ended in the body of the `server_name` extension (`len` bytes at `body`),
    /// the record going on past the name: the caller keeps the body's bytes from `body` to
    /// the segment's end (fewer than [`SNI_KEPT_MAX`]), and [`kept_name`] reads the name
    /// once the next segment's first bytes completed them. Offsets are the data's.
    NameCut { body: u32, len: u32 },
}

/// The `server_name` extension a walk of the extensions came to: `len` bytes of body at
/// `body`, in a hello ending at `hello_end` and a record ending at `record_end`. Read with
/// [`name_in`]; the kernel's reader does that apart from the walk, so that the verifier
/// checks the name's reading once rather than once for each extension walked past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameExtension {
    pub body: u32,
    pub len: u32,
    pub hello_end: u32,
    pub record_end: u32,
}

/// What a walk to the server name found: a verdict, or the name's extension to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walked {
    Verdict(Hello),
    Extension(NameExtension),
}

impl Walked {
    /// The verdict, reading the name from `data` (its segment ending at `end`) where the walk
    /// came to it.
    #[inline(always)]
    fn read<B: HelloBytes>(self, data: &B, end: u32, name: &mut [u8; SNI_NAME_MAX + 1]) -> Hello {
        match self {
            Self::Verdict(hello) => hello,
            Self::Extension(extension) => name_in(data, extension, end, name),
        }
    }
}

impl From<Result<Self, Hello>> for Walked {
    #[inline(always)]
    fn from(walked: Result<Self, Hello>) -> Self {
        walked.unwrap_or_else(Self::Verdict)
    }
}

/// Reads bounded by what the hello declares (`hello_end`: beyond it is malformed) and by
/// what the segment and the first record hold (`have_end`: beyond it is incomplete, or
/// continues in the next segment where the segment ended before the record).
#[expect(
    clippy::struct_field_names,
    reason = "the ends of three spans, each named by its span"
)]
struct Bounds {
    hello_end: u32,
    have_end: u32,
    record_end: u32,
}

impl Bounds {
    /// Bounds for the data `..end`.
    #[inline(always)]
    fn new(hello_end: u32, record_end: u32, end: u32) -> Self {
        Self {
            hello_end,
            have_end: end.min(record_end),
            record_end,
        }
    }

    /// The segment, not the record, ends the data: what is missing comes next.
    #[inline(always)]
    fn continues(&self) -> bool {
        self.have_end < self.record_end
    }

    /// The `server_name` extension with `len` bytes of body at `body`.
    #[inline(always)]
    fn extension(&self, body: u32, len: u32) -> Walked {
        Walked::Extension(NameExtension {
            body,
            len,
            hello_end: self.hello_end,
            record_end: self.record_end,
        })
    }
}

impl Bounds {
    #[inline(always)]
    fn check(&self, offset: u32, len: u32) -> Result<(), Hello> {
        let end = offset.checked_add(len).ok_or(Hello::Malformed)?;
        if end > self.hello_end {
            Err(Hello::Malformed)
        } else if end > self.have_end {
            Err(Hello::Incomplete)
        } else {
            Ok(())
        }
    }
}

/// The server name of the ClientHello that should start the payload `start..end` of `data`.
#[inline(always)]
pub fn server_name<B: HelloBytes>(
    data: &B,
    start: u32,
    end: u32,
    name: &mut [u8; SNI_NAME_MAX + 1],
) -> Hello {
    walk_to_name(data, start, end).read(data, end, name)
}

/// [`server_name`]'s walk, up to the name's extension.
#[inline(always)]
pub fn walk_to_name<B: HelloBytes>(data: &B, start: u32, end: u32) -> Walked {
    parse(data, start, end).into()
}

/// The name in the `server_name` extension a walk came to, of the segment ending at `end`;
/// [`Hello::NameCut`] where the segment ends in the extension's body and the record goes on.
#[inline(always)]
pub fn name_in<B: HelloBytes>(
    data: &B,
    extension: NameExtension,
    end: u32,
    name: &mut [u8; SNI_NAME_MAX + 1],
) -> Hello {
    let NameExtension {
        body,
        len,
        hello_end,
        record_end,
    } = extension;
    let bounds = Bounds::new(hello_end, record_end, end);
    match host_name(data, &bounds, body, len, name) {
        Err(Hello::Incomplete)
            if bounds.continues() && body + len.min(SNI_KEPT_MAX as u32) <= record_end =>
        {
            Hello::NameCut { body, len }
        }
        Ok(found) | Err(found) => found,
    }
}

/// The name of a [`Hello::NameCut`]: `kept` holds the extension's body from its start, its
/// first `have` bytes (the cut segment's, then the next one's) valid; `len` is the body's
/// length. [`Hello::Incomplete`] if the name is not whole in those bytes. The name's offset
/// in the answer is `kept`'s.
#[inline(always)]
pub fn kept_name<B: HelloBytes>(
    kept: &B,
    have: u32,
    len: u32,
    name: &mut [u8; SNI_NAME_MAX + 1],
) -> Hello {
    let have = have.min(len);
    match host_name(kept, &Bounds::new(len, have, have), 0, len, name) {
        Ok(found) | Err(found) => found,
    }
}

/// The first bytes (`len`, 1 to 3; 0 for none) of an extension header a segment cut in two,
/// as a big-endian number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutHeader {
    pub bytes: u32,
    pub len: u32,
}

/// Bytes of an extension's header: type (2) and length (2).
const EXTENSION_HEADER: u32 = 4;

/// The server name, read on where a [`Hello::Continues`] left off: the extension at `next` of
/// the data `..end` that follows, `hello_end` and `record_end` given in its offsets; after a
/// header cut in two, its rest at `next` completes `cut`.
#[inline(always)]
pub fn server_name_after<B: HelloBytes>(
    data: &B,
    next: u32,
    cut: CutHeader,
    hello_end: u32,
    record_end: u32,
    end: u32,
    name: &mut [u8; SNI_NAME_MAX + 1],
) -> Hello {
    walk_on_to_name(data, next, cut, hello_end, record_end, end).read(data, end, name)
}

/// [`server_name_after`]'s walk, up to the name's extension.
#[inline(always)]
pub fn walk_on_to_name<B: HelloBytes>(
    data: &B,
    next: u32,
    cut: CutHeader,
    hello_end: u32,
    record_end: u32,
    end: u32,
) -> Walked {
    let bounds = Bounds::new(hello_end, record_end, end);
    match completed_header(data, &bounds, next, cut) {
        Ok(next) => extensions(data, &bounds, next).into(),
        Err(walked) => walked,
    }
}

/// Completes the extension header a segment cut, if it did, with its rest at `at`: then
/// where the next extension is, or, for the server name's, that extension (as `Err`, which
/// ends the walk as a failure does). Otherwise `at`.
#[inline(always)]
fn completed_header<B: HelloBytes>(
    data: &B,
    bounds: &Bounds,
    at: u32,
    cut: CutHeader,
) -> Result<u32, Walked> {
    // Masked: whatever the storage held, the shift below stays in range.
    let kept = cut.len & 3;
    if kept == 0 {
        return Ok(at);
    }
    let missing = EXTENSION_HEADER - kept;
    let Some(rest) = big_endian(data, bounds.have_end, at, missing) else {
        return Err(Walked::Verdict(Hello::Incomplete));
    };
    let header = cut.bytes << (8 * missing) | rest;
    let len = header & 0xffff;
    let body = at + missing;
    if body + len > bounds.hello_end {
        return Err(Walked::Verdict(Hello::Malformed));
    }
    if header >> 16 == 0 {
        return Err(bounds.extension(body, len));
    }
    Ok(body + len)
}

/// The first bytes of the extension header a [`Hello::Continues`] cut, from the segment
/// `..end` it ended: none where it ended at an extension's start.
#[inline(always)]
pub fn cut_header<B: HelloBytes>(data: &B, next: u32, end: u32) -> CutHeader {
    let len = end.saturating_sub(next);
    if len == 0 || len >= EXTENSION_HEADER {
        return CutHeader::default();
    }
    big_endian(data, end, next, len).map_or(CutHeader::default(), |bytes| CutHeader { bytes, len })
}

#[inline(always)]
fn parse<B: HelloBytes>(data: &B, start: u32, end: u32) -> Result<Walked, Hello> {
    let Some([content_type]) = data.array::<1>(start).filter(|_| start < end) else {
        return Err(Hello::NotHello);
    };
    if content_type != 22 {
        return Err(Hello::NotHello);
    }
    // Record header (5 bytes) and handshake header (4 bytes).
    let Some(header) = data.array::<9>(start).filter(|_| start + 9 <= end) else {
        return Err(Hello::Incomplete);
    };
    if header[1] != 3 || header[5] != 1 {
        return Err(Hello::NotHello);
    }
    let record_len = u32::from(u16::from_be_bytes([header[3], header[4]]));
    let hello_len = u32::from_be_bytes([0, header[6], header[7], header[8]]);
    let body = start + 9;
    let bounds = Bounds::new(
        body.checked_add(hello_len).ok_or(Hello::Malformed)?,
        start + 5 + record_len,
        end,
    );
    // Version (2), random (32), session id length (1).
    bounds.check(body, 35)?;
    let [session_id_len] = data.array::<1>(body + 34).ok_or(Hello::Incomplete)?;
    if session_id_len > 32 {
        return Err(Hello::Malformed);
    }
    let mut at = body + 35 + u32::from(session_id_len);
    let suites_len = u32::from(u16::from_be_bytes(read(data, &bounds, at)?));
    if suites_len < 2 || suites_len % 2 != 0 {
        return Err(Hello::Malformed);
    }
    at += 2 + suites_len;
    let [compression_len] = read::<1, B>(data, &bounds, at)?;
    if compression_len == 0 {
        return Err(Hello::Malformed);
    }
    at += 1 + u32::from(compression_len);
    if at == bounds.hello_end {
        return Err(Hello::NoName);
    }
    let extensions_len = u32::from(u16::from_be_bytes(read(data, &bounds, at)?));
    at += 2;
    if at + extensions_len != bounds.hello_end {
        return Err(Hello::Malformed);
    }
    extensions(data, &bounds, at)
}

/// Walks the extensions from the one at `at` to the server name.
#[inline(always)]
fn extensions<B: HelloBytes>(data: &B, bounds: &Bounds, mut at: u32) -> Result<Walked, Hello> {
    for _ in 0..SNI_MAX_EXTENSIONS {
        if at == bounds.hello_end {
            return Err(Hello::NoName);
        }
        // Past the segment, or in an extension's header the segment cut in two: the walk
        // goes on in the next (with the header's first bytes, which the caller keeps).
        // Browsers' hellos are longer than a segment, their extensions in random order, so
        // such cuts are common.
        if bounds.continues()
            && at + EXTENSION_HEADER > bounds.have_end
            && at + EXTENSION_HEADER <= bounds.hello_end
        {
            return Err(Hello::Continues {
                next: at,
                hello_end: bounds.hello_end,
                record_end: bounds.record_end,
            });
        }
        let [t0, t1, l0, l1] = read(data, bounds, at)?;
        let len = u32::from(u16::from_be_bytes([l0, l1]));
        let body = at + 4;
        if body + len > bounds.hello_end {
            return Err(Hello::Malformed);
        }
        if [t0, t1] == [0, 0] {
            return Ok(bounds.extension(body, len));
        }
        at = body + len;
    }
    Err(Hello::Incomplete)
}

/// The `host_name` entry of a `server_name` extension of `len` bytes at `at`.
#[inline(always)]
fn host_name<B: HelloBytes>(
    data: &B,
    bounds: &Bounds,
    at: u32,
    len: u32,
    name: &mut [u8; SNI_NAME_MAX + 1],
) -> Result<Hello, Hello> {
    // List length (2), entry type (1), name length (2).
    if len < 5 {
        return Err(Hello::Malformed);
    }
    let [list0, list1, kind, n0, n1] = read(data, bounds, at)?;
    if u32::from(u16::from_be_bytes([list0, list1])) + 2 != len {
        return Err(Hello::Malformed);
    }
    if kind != 0 {
        return Ok(Hello::NoName);
    }
    let name_len = usize::from(u16::from_be_bytes([n0, n1]));
    if name_len == 0 || 5 + name_len as u32 > len || name_len > SNI_NAME_MAX {
        return Err(Hello::Malformed);
    }
    bounds.check(at + 5, name_len as u32)?;
    if !data.name(at + 5, name_len, name) {
        return Err(Hello::Incomplete);
    }
    // A trailing dot is not sent (RFC 6066), but servers take `example.com.` for
    // `example.com`, as rustls does: so does this.
    // The mask bounds the index for the kernel's verifier; read through memory, as LLVM
    // knows the bound checked above and would drop it.
    // SAFETY: a read of a local.
    let last = unsafe { core::ptr::read_volatile(&(name_len - 1)) } & SNI_NAME_MAX;
    if name[last] == b'.' {
        name[last] = 0;
        if last == 0 {
            return Err(Hello::Malformed);
        }
        return Ok(Hello::Name {
            offset: at + 5,
            len: last,
        });
    }
    Ok(Hello::Name {
        offset: at + 5,
        len: name_len,
    })
}

/// The `len` bytes (1 to 3) at `at` as a big-endian number, if they end by `have_end`. An
/// `Option`, not a `Result` carrying a [`Hello`]: LLVM filled the unset rest of such a
/// `Result` from a register a helper call had clobbered, which the verifier refuses.
#[inline(always)]
fn big_endian<B: HelloBytes>(data: &B, have_end: u32, at: u32, len: u32) -> Option<u32> {
    if at.checked_add(len)? > have_end {
        return None;
    }
    match len {
        1 => data.array::<1>(at).map(|[a]| u32::from(a)),
        2 => data
            .array::<2>(at)
            .map(|[a, b]| u32::from_be_bytes([0, 0, a, b])),
        _ => data
            .array::<3>(at)
            .map(|[a, b, c]| u32::from_be_bytes([0, a, b, c])),
    }
}

#[inline(always)]
fn read<const N: usize, B: HelloBytes>(
    data: &B,
    bounds: &Bounds,
    at: u32,
) -> Result<[u8; N], Hello> {
    bounds.check(at, N as u32)?;
    data.array::<N>(at).ok_or(Hello::Incomplete)
}

/// ASCII lower case (server names compare without case), a word at a time and with no
/// branch: the kernel's verifier then walks it once, not once per possible length.
#[inline(always)]
pub fn lowercase(name: &mut [u8; SNI_NAME_MAX + 1]) {
    for chunk in name.chunks_exact_mut(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let lower = crate::dns_lowercase_word(u64::from_le_bytes(word));
        chunk.copy_from_slice(&lower.to_le_bytes());
    }
}

/// The index of the first `.` in `name`, or [`SNI_NAME_MAX`] + 1 if there is none.
#[inline(always)]
#[must_use]
pub fn first_dot(name: &[u8; SNI_NAME_MAX + 1]) -> usize {
    first_of(name, b'.')
}

/// The index of the first `byte` in `bytes`, or [`SNI_NAME_MAX`] + 1 if there is none. A
/// word at a time and with no branch, as [`lowercase`].
#[inline(always)]
#[must_use]
pub fn first_of(bytes: &[u8; SNI_NAME_MAX + 1], byte: u8) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Byte j of this, read from the top after a shift by 8j, is j.
    const BYTE_INDEX: u64 = 0x0001_0203_0405_0607;
    let mut first = (SNI_NAME_MAX + 1) as u64;
    // From the last word back, so that the first word with one has the last say.
    for (k, chunk) in bytes.chunks_exact(8).enumerate().rev() {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word) ^ (ONES * u64::from(byte));
        // The high bit of each zero byte of `x` (a `byte`), exact for the lowest one, which is
        // all that is used.
        let dots = x.wrapping_sub(ONES) & !x & HIGH;
        let lowest = dots & dots.wrapping_neg();
        let byte = (lowest >> 7).wrapping_mul(BYTE_INDEX) >> 56;
        let found = (dots | dots.wrapping_neg()) >> 63;
        // Read through memory: LLVM turns the masked choice below back into a branch where it
        // can see that the mask is all ones or none, and the kernel's verifier then walks
        // each of the 2^32 ways through the words (as it did in `read_early_hellos`).
        // SAFETY: a read of a local.
        let mask = unsafe { core::ptr::read_volatile(&0u64.wrapping_sub(found)) };
        first = ((k as u64 * 8 + byte) & mask) | (first & !mask);
    }
    first as usize
}
