//! Routes told apart by server name (SNI) on a port they share. A connection accepted on such
//! a port takes its table slot as any other, with its route left open (`BY_NAME`, a
//! [`SniDecision`] in its socket storage, counted as awaiting). Its first segment decides
//! the route, read here by a `cgroup_skb` ingress program: the route whose name the
//! ClientHello gives, or the port's route without a name for anything else. A connection
//! that closes undecided is decided at its close, for that same route. The decision is a
//! compare-and-swap in the socket's own storage, so the reader (which runs without the
//! socket lock) and the close never both count a connection, and `opened` is counted once,
//! where its close will count.
//!
//! A hello that arrives before the accept (a deferred accept, Fast Open) goes through the
//! listening socket: `read_early_hellos` reads it there, and the accept decides.
//!
//! The table slot keeps the port's route without a name; the close counts in the route the
//! storage names. (The agent, which cannot read socket storage, keeps a slot bound while the
//! counters show connections open in it.)

use core::{
    ffi::c_void,
    intrinsics::{AtomicOrdering, atomic_cxchg},
    mem::MaybeUninit,
    ptr,
};

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_dynptr, bpf_sock},
    helpers::generated::{
        bpf_dynptr_from_mem, bpf_dynptr_read, bpf_get_socket_cookie, bpf_sk_storage_delete,
        bpf_sk_storage_get, bpf_skb_load_bytes, bpf_tcp_sock,
    },
    programs::{SkBuffContext, SockOpsContext},
};
use collector_common::{
    ConnState, MAX_ROUTES, SNI_UNDECIDED, SniDecision, SniKey,
    client_hello::{
        self, CutHeader, Hello, HelloBytes, NameExtension, SNI_KEPT_MAX, SNI_NAME_MAX, Walked,
    },
    port_bit,
    proxy_header::{ProxyHeader, proxy_header},
    sni_outcome,
    tcp_seq::{at_or_after, offset_at, seq_at},
};

use crate::{
    CONN_COUNTERS, EARLY_HELLO, EARLY_HELLO_READER, EARLY_KEPT_NAME, SNI_COUNTERS, SNI_DECISIONS,
    SNI_KEPT_NAME, SNI_PORT_BITS, SNI_RESUME, SNI_ROUTES, SNI_SCRATCH, SNI_WATCHED, add,
    connections::{client_events, emit_open, ktime_ns, stream_wanted},
    packet::linear_end,
};

const IPPROTO_TCP: u8 = 6;
/// `sk_state` of a listening socket.
const TCP_LISTEN: u32 = 10;
/// The SYN bit of the TCP flags byte.
const TCP_SYN: u8 = 0x02;

/// Routes share ports by name (a load-time constant to the verifier).
#[inline(always)]
pub fn sni_watched() -> bool {
    SNI_WATCHED.load() != 0
}

/// `port` is shared by routes told apart by name.
#[inline(always)]
pub fn shared_port(port: u32) -> bool {
    let (word, bit) = port_bit(port as u16);
    SNI_PORT_BITS.get(word).is_some_and(|&bits| bits & bit != 0)
}

/// The socket's decision: looked up, or made from `init` (the kernel copies it in before
/// any other program can see the storage).
#[inline(always)]
fn decision(sk: *mut bpf_sock, init: Option<&mut SniDecision>) -> Option<*mut SniDecision> {
    if sk.is_null() {
        return None;
    }
    let (init, flags) = match init {
        Some(init) => (
            ptr::from_mut(init).cast::<c_void>(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        ),
        None => (ptr::null_mut(), 0),
    };
    let map = ptr::from_ref(&SNI_DECISIONS).cast_mut().cast::<c_void>();
    // SAFETY: the helper checks the socket (a full one, or NULL is returned) and copies
    // `init` (a value of the map's size) if it makes the storage.
    let value = unsafe { bpf_sk_storage_get(map, sk.cast(), init, flags) };
    (!value.is_null()).then_some(value.cast::<SniDecision>())
}

/// An accepted connection on a shared port, whose slot the caller took: left undecided, its
/// port's route without a name (`fallback`) counting it as awaiting, unless its hello came
/// with the handshake's end and was read on the listening socket (then decided here).
/// `false` if its storage could not be made (out of memory): counted as missed, and the
/// caller counts it opened there at once.
#[inline(always)]
pub fn await_hello(
    ctx: &SockOpsContext,
    fallback: u32,
    cookie: u64,
    client: ([u8; 16], u16),
) -> bool {
    // Made with its route without a name in it: a reader on another CPU may see the storage
    // as soon as it exists.
    let mut init = SniDecision {
        route: SNI_UNDECIDED,
        fallback,
    };
    // SAFETY: a context field, the full socket in the callbacks this runs from.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    let Some(decision) = decision(sk, Some(&mut init)) else {
        count_outcome(fallback, sni_outcome::MISSED);
        return false;
    };
    add_awaiting(fallback, 1);
    if let Some(early) = take_early_hello(ctx, &client) {
        if early.outcome == AWAITING {
            adopt_early_resume(sk, early.generation);
        } else {
            let slot = slot_of(early.route).unwrap_or(fallback);
            if decide(decision, slot, fallback, early.outcome).is_ok() {
                open_event(cookie, slot, client);
            }
        }
    }
    true
}

/// The verdict on this connection's hello if [`on_early_segment`] read it. Taken once.
#[inline(always)]
fn take_early_hello(ctx: &SockOpsContext, client: &([u8; 16], u16)) -> Option<EarlyVerdict> {
    let slot = EARLY_HELLO.get_ptr_mut(0)?;
    // Copied, and kept only if no write began or ended meanwhile (the generation is odd while
    // one is under way): where the accept runs later, from the socket's backlog in process
    // context, a softirq on this CPU may write the slot between two of the copy's loads.
    // SAFETY: this CPU's value of our per-CPU map.
    let (before, early, after) = unsafe {
        (
            ptr::read_volatile(&raw const (*slot).verdict.generation),
            ptr::read_volatile(&raw const (*slot).verdict),
            ptr::read_volatile(&raw const (*slot).verdict.generation),
        )
    };
    if before != after || before & 1 != 0 {
        return None;
    }
    // SAFETY: a context field of the full socket this callback is for.
    let rcv_nxt = unsafe { (*ctx.ops).rcv_nxt };
    let ours = early.local_port != 0
        && u32::from(early.local_port) == ctx.local_port()
        && early.client_port == client.1
        && early.seq == rcv_nxt
        && early.client == client.0;
    if !ours {
        return None;
    }
    forget_early_hello();
    Some(early)
}

/// Saves where the hello in this CPU's [`EarlyHello`] goes on as the new socket's (with the
/// name bytes kept in `EARLY_KEPT_NAME`, if a segment cut it there), unless the slot was
/// written again since its `generation` was read: then nothing is kept, and the connection,
/// left undecided, counts missed.
#[inline(always)]
fn adopt_early_resume(sk: *mut bpf_sock, generation: u32) {
    let Some(slot) = EARLY_HELLO.get_ptr(0) else {
        return;
    };
    // SAFETY: this CPU's value of our per-CPU map.
    let written_since =
        || unsafe { ptr::read_volatile(&raw const (*slot).verdict.generation) } != generation;
    if written_since() {
        return;
    }
    // SAFETY: as above.
    let cut_in_name = unsafe { ptr::read_volatile(&raw const (*slot).resume.walking) } == KEPT_NAME;
    if cut_in_name && !adopt_early_kept_name(sk) {
        return;
    }
    let map = ptr::from_ref(&SNI_RESUME).cast_mut().cast::<c_void>();
    // SAFETY: as in `decision`: the kernel copies the slot's resume in before the storage is
    // visible (the socket is new: it has none yet). A copy the slot's next write tore is
    // found below and removed; until then, for a few instructions, a reader of the
    // connection's next segment on another CPU could use it (it takes a write to the slot
    // from a softirq on this CPU while an accept from the socket's backlog runs here, and
    // that segment read meanwhile elsewhere: the connection then counts once, perhaps in
    // the wrong route).
    let saved = unsafe {
        !bpf_sk_storage_get(
            map,
            sk.cast(),
            (&raw const (*slot).resume).cast_mut().cast(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
        .is_null()
    };
    let torn = written_since();
    if saved && torn {
        // SAFETY: the helper checks the socket.
        unsafe { bpf_sk_storage_delete(map, sk.cast()) };
    }
    if cut_in_name && (torn || !saved) {
        forget_kept_name(sk);
    }
}

/// Moves the name bytes [`on_early_segment`] kept in this CPU's `EARLY_KEPT_NAME` to the new
/// socket's storage; `false` if they could not be.
#[inline(always)]
fn adopt_early_kept_name(sk: *mut bpf_sock) -> bool {
    let Some(early) = EARLY_KEPT_NAME.get_ptr(0) else {
        return false;
    };
    let Some(kept) = kept_name_storage(sk, true) else {
        return false;
    };
    // A segment cut the name within its first SNI_KEPT_MAX bytes: only those are copied, a
    // word at a time (a copy of the whole value would go through the stack).
    // SAFETY: this CPU's values of our per-CPU maps, and the socket's storage, valid for the
    // program's run; both 8-aligned, with room for SNI_KEPT_MAX bytes.
    unsafe {
        ptr::copy_nonoverlapping(
            (&raw const (*early).bytes).cast::<u64>(),
            (&raw mut (*kept).bytes).cast::<u64>(),
            SNI_KEPT_MAX.div_ceil(8),
        );
    }
    true
}

/// Empties this CPU's [`EarlyHello`].
#[inline(always)]
fn forget_early_hello() {
    if let Some(slot) = EARLY_HELLO.get_ptr_mut(0) {
        // SAFETY: this CPU's value of our per-CPU map.
        unsafe { ptr::write_volatile(&raw mut (*slot).verdict.local_port, 0) };
    }
}

/// A connection on a shared port that found the connection table full: counted opened in the
/// port's route without a name by the caller, its hello never read.
#[inline(always)]
pub fn count_unfollowed(fallback: u32) {
    count_outcome(fallback, sni_outcome::MISSED);
}

/// Decides at the close a connection its first segment did not: for the port's route without
/// a name. Returns the route slot the connection counts in.
#[inline(always)]
pub fn decide_at_close(ctx: &SockOpsContext, cookie: u64, state: &ConnState, bytes_in: u64) -> u32 {
    let fallback = state.route;
    // SAFETY: as in `await_hello`.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    let Some(decision) = decision(sk, None) else {
        // Its storage is gone: not through the agent, which keeps the pinned map or refuses
        // it whole, but by hand. Whether it was counted opened is lost with it; counted as
        // a missed hello.
        count_opened(fallback, sni_outcome::MISSED);
        return fallback;
    };
    // Only the FIN arrived (1 byte of sequence space), or nothing, after a PROXY header if
    // one came (a balancer's check): no data. A segment with data would have been read,
    // unless it came before the storage or out of sight.
    let header = if bytes_in > 1 {
        resume_of(sk).map_or(0, |resume| u64::from(resume.skipped))
    } else {
        0
    };
    let outcome = if bytes_in <= 1 + header {
        sni_outcome::NO_DATA
    } else {
        sni_outcome::MISSED
    };
    match decide(decision, fallback, fallback, outcome) {
        Ok(()) => {
            open_event(cookie, fallback, (state.client_addr, state.client_port));
            fallback
        }
        Err(decided) => slot_of(decided).unwrap_or(fallback),
    }
}

/// Compare-and-swap of the decision word: `Err` holds what it was.
#[inline(always)]
fn swap(decision: *mut SniDecision, from: u32, to: u32) -> Result<(), u32> {
    // SAFETY: an aligned word of the socket's storage, valid for the program's run.
    let (was, done) = unsafe {
        atomic_cxchg::<u32, { AtomicOrdering::AcqRel }, { AtomicOrdering::Acquire }>(
            &raw mut (*decision).route,
            from,
            to,
        )
    };
    if done { Ok(()) } else { Err(was) }
}

/// Decides for `slot` unless decided already; counts the connection opened there and ends
/// its wait in `fallback`. `Err` holds the decision made before.
#[inline(always)]
fn decide(decision: *mut SniDecision, slot: u32, fallback: u32, outcome: u32) -> Result<(), u32> {
    swap(decision, SNI_UNDECIDED, slot + 1)?;
    add_awaiting(fallback, u64::MAX);
    count_opened(slot, outcome);
    Ok(())
}

#[inline(always)]
fn count_opened(slot: u32, outcome: u32) {
    count_outcome(slot, outcome);
    if let Some(counters) = CONN_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: as above.
        add(unsafe { &raw mut (*counters).opened }, 1);
    }
}

#[inline(always)]
fn count_outcome(slot: u32, outcome: u32) {
    if let Some(sni) = SNI_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: this CPU's value of our per-CPU map.
        let outcomes = unsafe { &mut (*sni).outcomes };
        if let Some(count) = outcomes.get_mut(outcome as usize) {
            add(count, 1);
        }
    }
}

/// Adds `n` (`u64::MAX` takes one off) to the connections awaiting their hello on `slot`.
#[inline(always)]
fn add_awaiting(slot: u32, n: u64) {
    if let Some(counters) = SNI_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: this CPU's value of our per-CPU map.
        add(unsafe { &raw mut (*counters).awaiting }, n);
    }
}

/// The open event of a connection decided now: the stream learns its route only here.
#[inline(always)]
fn open_event(cookie: u64, slot: u32, client: ([u8; 16], u16)) {
    if client_events() && stream_wanted() {
        emit_open(cookie, slot, ktime_ns(), client);
    }
}

/// The bytes of the segment, for the ClientHello parser.
struct Segment<'a>(&'a SkBuffContext);

impl HelloBytes for Segment<'_> {
    #[inline(always)]
    fn array<const N: usize>(&self, offset: u32) -> Option<[u8; N]> {
        // Not zeroed first: the helper writes all N bytes or fails (zeroed, these headers
        // were calls to a byte-wise `memset`, see `zero_name`).
        let mut out = MaybeUninit::<[u8; N]>::uninit();
        // SAFETY: the helper checks the offset and length against the packet.
        let read = unsafe {
            bpf_skb_load_bytes(
                self.0.skb.skb.cast(),
                offset,
                out.as_mut_ptr().cast(),
                N as u32,
            )
        };
        // SAFETY: the helper wrote all N bytes where it returned 0.
        (read == 0).then(|| unsafe { out.assume_init() })
    }

    #[inline(always)]
    fn name(&self, offset: u32, len: usize, out: &mut [u8; SNI_NAME_MAX + 1]) -> bool {
        let Some(len) = name_len_checked(len) else {
            return false;
        };
        // SAFETY: as above; `out` has room for `len` bytes.
        unsafe {
            bpf_skb_load_bytes(self.0.skb.skb.cast(), offset, out.as_mut_ptr().cast(), len) == 0
        }
    }
}

/// `len` if it is a name's (1 to [`SNI_NAME_MAX`]), masked to that range for the verifier:
/// the mask applies to a read through memory, which LLVM cannot drop as it would a check
/// it knows the parser made (the verifier, which does not, needs one).
#[inline(always)]
fn name_len_checked(len: usize) -> Option<u32> {
    if len == 0 || len > SNI_NAME_MAX {
        return None;
    }
    // SAFETY: a read of a local.
    let masked = unsafe { ptr::read_volatile(&len) } & SNI_NAME_MAX;
    (masked != 0).then_some(masked as u32)
}

/// Copies `len` bytes at `offset` of `from` (a map value of `N` bytes) to the front of `out`;
/// `false` if they lie past its end. Through a dynamic pointer, whose helper checks the
/// offset and length at run time where the verifier could not.
#[inline(always)]
fn copy_name<const N: usize>(
    from: *const [u8; N],
    offset: u32,
    len: usize,
    out: &mut [u8; SNI_NAME_MAX + 1],
) -> bool {
    let Some(len) = name_len_checked(len) else {
        return false;
    };
    // Made by the first helper, which takes it uninitialised.
    let mut bytes = MaybeUninit::<bpf_dynptr>::uninit();
    // SAFETY: `from` is a map value of `N` bytes, valid for the program's run; the helpers
    // check `offset` and `len` against it, and `out` has room for `len` bytes.
    unsafe {
        bpf_dynptr_from_mem(from.cast_mut().cast(), N as u32, 0, bytes.as_mut_ptr()) == 0
            && bpf_dynptr_read(out.as_mut_ptr().cast(), len, bytes.as_ptr(), offset, 0) == 0
    }
}

/// The bytes of a server name's extension kept from a segment that cut it
/// ([`Hello::NameCut`]), then completed from the next: for [`client_hello::kept_name`].
struct Kept(*const SniKeptName);

impl HelloBytes for Kept {
    #[inline(always)]
    fn array<const N: usize>(&self, offset: u32) -> Option<[u8; N]> {
        // SAFETY: a map value, valid for the program's run.
        let bytes = unsafe { &(*self.0).bytes };
        let offset = offset as usize;
        bytes.get(offset..offset + N)?.try_into().ok()
    }

    #[inline(always)]
    fn name(&self, offset: u32, len: usize, out: &mut [u8; SNI_NAME_MAX + 1]) -> bool {
        // SAFETY: as above.
        copy_name(unsafe { &raw const (*self.0).bytes }, offset, len, out)
    }
}

/// The socket the segment is for and its local port, if that port is shared by name.
#[inline(always)]
fn shared_port_socket(ctx: &SkBuffContext) -> Option<(*mut bpf_sock, u32)> {
    // SAFETY: a context field: the socket the segment is for, or NULL.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: a field of the socket's common part (the local port, host byte order).
    let port = unsafe { (*sk).src_port };
    shared_port(port).then_some((sk, port))
}

/// A segment arriving for a socket: decides its connection's route if it is the first with
/// data of one accepted on a shared port and still undecided.
#[inline(always)]
pub fn on_segment(ctx: &SkBuffContext) {
    let Some((sk, port)) = shared_port_socket(ctx) else {
        return;
    };
    // SAFETY: a field of the socket's common part.
    if unsafe { (*sk).state } == TCP_LISTEN {
        // Data before the accept (a deferred accept, data on the handshake's last ACK, Fast
        // Open): read by a program of its own, so that this one's verification stays what it
        // was (docs/DESIGN.md, Routes by server name).
        if may_carry_data(ctx) {
            // SAFETY: the map holds only `read_early_hellos`, a program of this type; a
            // failed call (none set) returns here.
            unsafe { EARLY_HELLO_READER.tail_call(ctx, 0) };
        } else {
            // A verdict whose accept never came (its data dropped: a full accept queue, a
            // Fast Open cookie refused) must not meet the accept a bare ACK completes.
            forget_early_hello();
        }
        return;
    }
    let Some(decision) = decision(sk, None) else {
        return;
    };
    // SAFETY: the socket's storage, valid for the program's run.
    let (route, fallback) = unsafe {
        (
            ptr::read_volatile(&raw const (*decision).route),
            (*decision).fallback,
        )
    };
    if route != SNI_UNDECIDED || fallback >= MAX_ROUTES {
        return;
    }
    let Some(segment) = parse_headers(ctx) else {
        return;
    };
    if segment.payload_start >= ctx.len() {
        return;
    }
    // SAFETY: the helper checks the socket (NULL unless a TCP socket).
    let tcp = unsafe { bpf_tcp_sock(sk) };
    if tcp.is_null() {
        return;
    }
    // SAFETY: fields of the TCP socket the helper returned.
    let (rcv_nxt, bytes_received) = unsafe { ((*tcp).rcv_nxt, (*tcp).bytes_received) };
    // The segment to read: the first with data, or the one an earlier segment left the
    // hello to (after a PROXY header, or a hello longer than a segment), found by its
    // sequence number. (Rather than by the bytes received: the earlier one may still sit in
    // the socket owner's backlog.)
    let resume = resume_of(sk);
    let read = match resume {
        Some(resume) if segment.seq == resume.expect_seq => true,
        // Not there yet: this segment is ahead of it.
        Some(resume) if at_or_after(resume.expect_seq, rcv_nxt) => return,
        // Data came before this without being read here.
        Some(_) => false,
        None if bytes_received != 0 => false,
        // A later segment ahead of the first, or a stale copy: the first decides.
        None if segment.seq != rcv_nxt => return,
        None => true,
    };
    let (slot, outcome) = if read {
        let verdict = match reading_of(resume.as_ref(), &segment) {
            Resumed::KeptName { at, kept, len } => {
                read_kept_name(ctx, sk, port as u16, at, kept, len)
            }
            Resumed::Hello(reading) => read_hello(ctx, segment.payload_start, port as u16, reading),
        };
        match verdict {
            Verdict::Decided(named, outcome) => (named.unwrap_or(fallback), outcome),
            more => {
                // The name's first bytes go first: the next segment may be read on another
                // CPU as soon as the resume is there. Without them, it counts missed.
                let cut_in_name = matches!(more, Verdict::NameCut { .. });
                if let Verdict::NameCut { body, .. } = more
                    && !keep_name(ctx, sk, body)
                {
                    return;
                }
                let skipped = resume.map_or(0, |resume| resume.skipped);
                let data_end = ctx.len();
                let saved = save_resume(
                    sk,
                    &resume_at(&more, &segment, segment.seq, data_end, skipped),
                );
                if !saved && cut_in_name {
                    forget_kept_name(sk);
                }
                return;
            }
        }
    } else {
        // A name's first bytes kept for the segment that went by are of no more use.
        if resume.is_some_and(|resume| resume.walking == KEPT_NAME) {
            forget_kept_name(sk);
        }
        (fallback, sni_outcome::MISSED)
    };
    finish(
        ctx,
        decision,
        slot,
        fallback,
        outcome,
        (segment.client, segment.client_port),
    );
}

/// The segment may carry data: SYNs and bare ACKs, most of what a listening socket gets, do
/// not, and spare the early reader a run. Read in place; headers beyond the socket buffer's
/// linear part leave it to the reader. (With IPv6 extension headers the answer is a guess,
/// and harmless: the reader does not parse past them.)
#[inline(always)]
fn may_carry_data(ctx: &SkBuffContext) -> bool {
    // SAFETY: a context field, which the verifier turns into a packet pointer. The end is
    // loaded beside the check (`linear_end`): LLVM, knowing both for 32-bit values, would
    // compare them as such, and the verifier takes no 32-bit comparison of pointers.
    let (data, end) = (
        unsafe { (*ctx.skb.skb).data as usize },
        linear_end(&ctx.skb),
    );
    // The shortest IP and TCP headers (also a check the verifier takes, where LLVM would
    // turn one of a single byte into a comparison it does not).
    if data + 40 > end {
        return true;
    }
    // SAFETY: inside the packet, checked above.
    let first = unsafe { *(data as *const u8) };
    let ip_len = match first >> 4 {
        4 => usize::from(first & 0x0f) * 4,
        6 => 40,
        _ => return true,
    };
    let tcp = data + ip_len;
    if tcp + 13 > end {
        return true;
    }
    // SAFETY: inside the packet, checked above.
    let data_offset = unsafe { *((tcp + 12) as *const u8) };
    ctx.len() as usize > ip_len + usize::from(data_offset >> 4) * 4
}

/// A hello that a listening socket of a shared port received, read before the socket it
/// belongs to exists: its verdict waits in this CPU's [`EarlyHello`] for that socket's
/// accept, which comes next on this CPU (the kernel makes the socket and runs its
/// `PASSIVE_ESTABLISHED` in the same call that ran this filter, before it takes another
/// packet).
#[inline(always)]
pub fn on_early_segment(ctx: &SkBuffContext) {
    let Some((_, port)) = shared_port_socket(ctx) else {
        return;
    };
    let Some(segment) = parse_headers(ctx) else {
        return;
    };
    if segment.payload_start >= ctx.len() {
        return;
    }
    // The connection first and the verdict after the parse, each written to the map as it
    // is known: with the connection kept in registers across the parser, the verifier
    // exceeded its limit.
    let Some(early) = EARLY_HELLO.get_ptr_mut(0) else {
        return;
    };
    // The generation is odd while the slot is written (see `take_early_hello`).
    // SAFETY: this CPU's value of our per-CPU map.
    unsafe {
        let generation = ptr::read_volatile(&raw const (*early).verdict.generation);
        ptr::write_volatile(&raw mut (*early).verdict.generation, generation | 1);
        ptr::write_volatile(&raw mut (*early).verdict.local_port, 0);
        ptr::write_volatile(&raw mut (*early).verdict.client, segment.client);
        ptr::write_volatile(&raw mut (*early).verdict.client_port, segment.client_port);
        // Fast Open's data follows the SYN's own sequence number.
        let data_seq = segment.seq.wrapping_add(u32::from(segment.syn));
        ptr::write_volatile(&raw mut (*early).verdict.seq, data_seq);
    }
    let verdict = read_hello(ctx, segment.payload_start, port as u16, Reading::First);
    let (route, outcome) = match verdict {
        Verdict::Decided(named, outcome) => (named.map_or(0, |slot| slot + 1), outcome),
        // Kept in this CPU's slot for the accept, which moves them to the socket; without
        // them, the accept decides missed.
        Verdict::NameCut { body, .. } => {
            if keep_early_name(ctx, body) {
                (0, AWAITING)
            } else {
                (0, sni_outcome::MISSED)
            }
        }
        Verdict::After(_) | Verdict::Continues { .. } => (0, AWAITING),
    };
    let data_seq = segment.seq.wrapping_add(u32::from(segment.syn));
    let resume = resume_at(&verdict, &segment, data_seq, ctx.len(), 0);
    let Some(early) = EARLY_HELLO.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as above.
    unsafe {
        ptr::write_volatile(&raw mut (*early).verdict.route, route);
        ptr::write_volatile(&raw mut (*early).verdict.outcome, outcome);
        ptr::write_volatile(&raw mut (*early).resume, resume);
        ptr::write_volatile(&raw mut (*early).verdict.local_port, port as u16);
        let generation = ptr::read_volatile(&raw const (*early).verdict.generation);
        ptr::write_volatile(
            &raw mut (*early).verdict.generation,
            generation.wrapping_add(1),
        );
    }
}

/// Where the hello goes on after this segment, from its [`Verdict`] (`After`, `Continues`
/// or `NameCut`), the sequence number of the payload's first byte, the data's end and the
/// PROXY header bytes skipped before.
#[inline(always)]
fn resume_at(
    verdict: &Verdict,
    segment: &Headers,
    data_seq: u32,
    end: u32,
    skipped: u32,
) -> SniResume {
    let seq_of = |offset: u32| seq_at(data_seq, segment.payload_start, offset);
    match *verdict {
        Verdict::Continues {
            next,
            hello_end,
            record_end,
        } => {
            let cut = parked_cut();
            SniResume {
                expect_seq: seq_of(end),
                skipped,
                walking: 1,
                next_seq: seq_of(next),
                hello_end_seq: seq_of(hello_end),
                record_end_seq: seq_of(record_end),
                cut_bytes: cut.bytes,
                cut_len: cut.len,
                ..SniResume::default()
            }
        }
        Verdict::After(header) => SniResume {
            expect_seq: seq_of(segment.payload_start + header),
            skipped: header,
            ..SniResume::default()
        },
        Verdict::NameCut { body, len } => SniResume {
            expect_seq: seq_of(end),
            skipped,
            walking: KEPT_NAME,
            next_seq: seq_of(end),
            name_len: len,
            name_kept: end - body,
            ..SniResume::default()
        },
        Verdict::Decided(..) => SniResume::default(),
    }
}

/// Keeps the bytes of the server name's extension from `body` to the segment's end in the
/// socket's `SNI_KEPT_NAME` (made now); `false` if they could not be kept.
#[inline(always)]
fn keep_name(ctx: &SkBuffContext, sk: *mut bpf_sock, body: u32) -> bool {
    let Some(kept) = kept_name_storage(sk, true) else {
        return false;
    };
    if copy_kept(ctx, body, kept) {
        return true;
    }
    forget_kept_name(sk);
    false
}

/// [`keep_name`] for a hello read on a listening socket: into this CPU's `EARLY_KEPT_NAME`.
#[inline(always)]
fn keep_early_name(ctx: &SkBuffContext, body: u32) -> bool {
    EARLY_KEPT_NAME
        .get_ptr_mut(0)
        .is_some_and(|kept| copy_kept(ctx, body, kept))
}

/// Copies the segment's bytes from `body` to its end (fewer than [`SNI_KEPT_MAX`]: the
/// parser's word for a [`Hello::NameCut`]) to the front of `kept`.
#[inline(always)]
fn copy_kept(ctx: &SkBuffContext, body: u32, kept: *mut SniKeptName) -> bool {
    let len = ctx.len().saturating_sub(body);
    // Through memory: the verifier needs the checks below on the length it is given, which
    // LLVM would fold into one it could not follow.
    // SAFETY: a read of a local.
    let len = unsafe { ptr::read_volatile(&len) };
    if len == 0 {
        return true;
    }
    if len >= SNI_KEPT_MAX as u32 {
        return false;
    }
    // SAFETY: the helper checks the packet side; `kept` has room for SNI_KEPT_MAX bytes.
    unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            body,
            (&raw mut (*kept).bytes).cast(),
            len,
        ) == 0
    }
}

/// The socket's kept name bytes; made if `create`.
#[inline(always)]
fn kept_name_storage(sk: *mut bpf_sock, create: bool) -> Option<*mut SniKeptName> {
    let map = ptr::from_ref(&SNI_KEPT_NAME).cast_mut().cast::<c_void>();
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    // SAFETY: as in `decision`; made zeroed, without an initial value.
    let value = unsafe { bpf_sk_storage_get(map, sk.cast(), ptr::null_mut(), flags) };
    (!value.is_null()).then_some(value.cast::<SniKeptName>())
}

/// Frees the socket's kept name bytes, once read or given up (the socket's close frees them
/// too).
#[inline(always)]
fn forget_kept_name(sk: *mut bpf_sock) {
    let map = ptr::from_ref(&SNI_KEPT_NAME).cast_mut().cast::<c_void>();
    // SAFETY: the helper checks the socket; a missing storage is an error it returns.
    unsafe { bpf_sk_storage_delete(map, sk.cast()) };
}

/// Finishes the name a segment cut ([`Resumed::KeptName`]): its first `kept` bytes from the
/// socket's storage, the rest from this segment's payload at `at`, up to the extension's
/// `len` (at most [`SNI_KEPT_MAX`]) or what the segment has. The storage is freed.
#[inline(always)]
fn read_kept_name(
    ctx: &SkBuffContext,
    sk: *mut bpf_sock,
    port: u16,
    at: u32,
    kept: u32,
    len: u32,
) -> Verdict {
    let (Some(scratch), Some(bytes)) = (SNI_SCRATCH.get_ptr_mut(0), kept_name_storage(sk, false))
    else {
        return Verdict::Decided(None, sni_outcome::MISSED);
    };
    let wanted = len.min(SNI_KEPT_MAX as u32);
    let rest = wanted
        .saturating_sub(kept)
        .min(ctx.len().saturating_sub(at));
    // Through memory, for the verifier's sake, as in `copy_kept`.
    // SAFETY: reads of locals.
    let (kept, rest) = unsafe { (ptr::read_volatile(&kept), ptr::read_volatile(&rest)) };
    // Never so ([`resume_at`] keeps fewer): a bound for the verifier.
    if kept >= SNI_KEPT_MAX as u32 {
        forget_kept_name(sk);
        return Verdict::Decided(None, sni_outcome::MISSED);
    }
    // Nothing of the name in this segment: it would go on over a third.
    if rest == 0 {
        forget_kept_name(sk);
        return Verdict::Decided(None, sni_outcome::INCOMPLETE);
    }
    let rest = rest.min(SNI_KEPT_MAX as u32);
    // SAFETY: this CPU's scratch value (see `read_hello`); `bytes` is the socket's storage,
    // with room for SNI_KEPT_MAX bytes past `kept`.
    let (scratch, loaded) = unsafe {
        (
            &mut *scratch,
            bpf_skb_load_bytes(
                ctx.skb.skb.cast(),
                at,
                (&raw mut (*bytes).bytes)
                    .cast::<u8>()
                    .add(kept as usize)
                    .cast(),
                rest,
            ),
        )
    };
    zero_name(&mut scratch.exact);
    let hello = if loaded == 0 {
        client_hello::kept_name(&Kept(bytes), kept + rest, len, &mut scratch.exact.name)
    } else {
        Hello::Incomplete
    };
    forget_kept_name(sk);
    named(scratch, port, hello)
}

/// The cut header [`read_hello`] parked with its last `Continues` on this CPU.
#[inline(always)]
fn parked_cut() -> CutHeader {
    let Some(scratch) = SNI_SCRATCH.get_ptr_mut(0) else {
        return CutHeader::default();
    };
    // SAFETY: this CPU's scratch value, written by `read_hello` in this same run.
    unsafe {
        CutHeader {
            bytes: ptr::read_volatile(&raw const (*scratch).cut_bytes),
            len: ptr::read_volatile(&raw const (*scratch).cut_len),
        }
    }
}

/// How this segment is read, from where an earlier one left the hello.
#[inline(always)]
fn reading_of(resume: Option<&SniResume>, segment: &Headers) -> Resumed {
    let Some(resume) = resume else {
        return Resumed::Hello(Reading::First);
    };
    if resume.walking == 0 {
        return Resumed::Hello(Reading::AfterHeader);
    }
    let offset_of = |seq: u32| offset_at(segment.seq, segment.payload_start, seq);
    if resume.walking == KEPT_NAME {
        return Resumed::KeptName {
            at: offset_of(resume.next_seq),
            kept: resume.name_kept,
            len: resume.name_len,
        };
    }
    Resumed::Hello(Reading::Walk {
        next: offset_of(resume.next_seq),
        cut: CutHeader {
            bytes: resume.cut_bytes,
            len: resume.cut_len,
        },
        hello_end: offset_of(resume.hello_end_seq),
        record_end: offset_of(resume.record_end_seq),
    })
}

/// [`EarlyHello::outcome`] of a hello still to come (after a PROXY header, or in part).
const AWAITING: u32 = u32::MAX;

/// A hello read on a listening socket ([`on_early_segment`]), waiting for its accept.
#[repr(C)]
pub struct EarlyHello {
    verdict: EarlyVerdict,
    /// Where the hello goes on, if [`AWAITING`]: saved as the new socket's from here, not
    /// copied to the stack first (`track_connections` has no room for it).
    resume: SniResume,
}

/// The connection an [`EarlyHello`] is for and its verdict: what the accept copies.
#[repr(C)]
#[derive(Clone, Copy)]
struct EarlyVerdict {
    /// Odd while the slot is being written; one more at each write's start and end.
    generation: u32,
    client: [u8; 16],
    client_port: u16,
    /// The listening port; 0 once taken.
    local_port: u16,
    /// Sequence number of the data's first byte (the hello's, or a PROXY header's before
    /// it): the new socket's `rcv_nxt` at its accept.
    seq: u32,
    /// The slot + 1 of the route the name gave, or 0.
    route: u32,
    /// How it was decided, or [`AWAITING`].
    outcome: u32,
}

/// Where a connection's hello goes on in a later segment: after a PROXY header that ended
/// the first, or past a segment the hello is longer than (kept in `SNI_RESUME`, the
/// socket's storage, made only then).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct SniResume {
    /// Sequence number of the segment to read next.
    expect_seq: u32,
    /// Bytes of a PROXY header before the hello (0: none).
    skipped: u32,
    /// 0: the hello starts at `expect_seq`; 1: its extensions go on at `next_seq`, up to
    /// `hello_end_seq` and `record_end_seq`; [`KEPT_NAME`]: its server name's extension goes
    /// on at `next_seq`.
    walking: u32,
    next_seq: u32,
    hello_end_seq: u32,
    record_end_seq: u32,
    /// The first bytes of an extension header the last segment cut ([`CutHeader`]): its
    /// rest starts the segment at `next_seq`.
    cut_bytes: u32,
    cut_len: u32,
    /// With `walking` [`KEPT_NAME`]: the length of the server name extension's body, and how
    /// many of its first bytes `SNI_KEPT_NAME` holds; the rest starts the segment at
    /// `next_seq`.
    name_len: u32,
    name_kept: u32,
}

/// [`SniResume::walking`] of a hello cut in its server name's extension body.
const KEPT_NAME: u32 = 2;

/// The first bytes of a server name's extension body that a segment cut, and room for the
/// rest the next segment brings (socket storage, made only then and freed once read).
#[repr(C, align(8))]
pub struct SniKeptName {
    bytes: [u8; 2 * SNI_KEPT_MAX],
}

/// Where the socket's hello goes on, if an earlier segment said.
#[inline(always)]
fn resume_of(sk: *mut bpf_sock) -> Option<SniResume> {
    let map = ptr::from_ref(&SNI_RESUME).cast_mut().cast::<c_void>();
    // SAFETY: as in `decision`, without making the storage.
    let value = unsafe { bpf_sk_storage_get(map, sk.cast(), ptr::null_mut(), 0) };
    let value = value.cast::<SniResume>();
    // SAFETY: the socket's storage, valid for the program's run.
    (!value.is_null()).then(|| unsafe { ptr::read_volatile(value) })
}

/// Records where the socket's hello goes on; `false` if its storage could not be made.
#[inline(always)]
fn save_resume(sk: *mut bpf_sock, resume: &SniResume) -> bool {
    let mut init = *resume;
    let map = ptr::from_ref(&SNI_RESUME).cast_mut().cast::<c_void>();
    // SAFETY: as in `decision`: the kernel copies `init` in before the storage is visible.
    // Out of memory, the hello is not read: the close counts it missed.
    let value = unsafe {
        bpf_sk_storage_get(
            map,
            sk.cast(),
            ptr::from_mut(&mut init).cast(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    };
    if value.is_null() {
        return false;
    }
    // Made before: written over (a hello past two segments).
    // SAFETY: the socket's storage, valid for the program's run.
    unsafe { ptr::write_volatile(value.cast::<SniResume>(), *resume) };
    true
}

/// Decides for `slot` and sends the open event.
#[inline(always)]
fn finish(
    ctx: &SkBuffContext,
    decision: *mut SniDecision,
    slot: u32,
    fallback: u32,
    outcome: u32,
    client: ([u8; 16], u16),
) {
    if decide(decision, slot, fallback, outcome).is_err() {
        return;
    }
    // SAFETY: the helper reads the socket behind the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    open_event(cookie, slot, client);
}

/// Where the segment's payload starts, its sequence number and its sender.
struct Headers {
    payload_start: u32,
    seq: u32,
    syn: bool,
    client: [u8; 16],
    client_port: u16,
}

/// IPv4 or IPv6 (without extension headers) and TCP, from the network header on (where
/// `cgroup_skb` programs see the packet start).
#[inline(always)]
fn parse_headers(ctx: &SkBuffContext) -> Option<Headers> {
    let bytes = Segment(ctx);
    let [version] = bytes.array::<1>(0)?;
    let (client, l4) = match version >> 4 {
        4 => {
            let ip = bytes.array::<20>(0)?;
            if ip[9] != IPPROTO_TCP {
                return None;
            }
            (
                ipv4_mapped([ip[12], ip[13], ip[14], ip[15]]),
                u32::from(ip[0] & 0x0f) * 4,
            )
        }
        6 => {
            let ip = bytes.array::<40>(0)?;
            if ip[6] != IPPROTO_TCP {
                return None;
            }
            (ip[8..24].try_into().ok()?, 40)
        }
        _ => return None,
    };
    let tcp = bytes.array::<14>(l4)?;
    Some(Headers {
        payload_start: l4 + u32::from(tcp[12] >> 4) * 4,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        syn: tcp[13] & TCP_SYN != 0,
        client,
        client_port: u16::from_be_bytes([tcp[0], tcp[1]]),
    })
}

/// `::ffff:a.b.c.d`, built from two words: zeroed first, then filled, this array was a call
/// to a byte-wise `memset` of its first ten bytes (see `zero_name`).
#[inline(always)]
fn ipv4_mapped([a, b, c, d]: [u8; 4]) -> [u8; 16] {
    let words = [0u64, u64::from_ne_bytes([0, 0, 0xff, 0xff, a, b, c, d])];
    // SAFETY: two u64 are sixteen bytes, every bit pattern valid for either.
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(words) }
}

/// Zeroes `key`'s name, whose bytes past the name are part of the `SNI_ROUTES` key. Four
/// bytes at a time, each store volatile: LLVM makes an array's zeroing, or plain stores of
/// zeros side by side, a `memset`, and bpf-linker's `--bpf-expand-memcpy-in-order` leaves
/// every `memset` a call to a function writing one byte a loop (five instructions a byte:
/// about 1,300 for a name).
#[inline(always)]
fn zero_name(key: &mut SniKey) {
    let words = (&raw mut key.name).cast::<u32>();
    for word in 0..(SNI_NAME_MAX + 1) / 4 {
        // SAFETY: inside the name; 4-aligned, as `SniKey` is and its name's offset (4) are.
        unsafe { words.add(word).write_volatile(0) };
    }
}

/// This CPU's working memory for a hello: too big for the stack.
#[repr(C)]
pub struct SniScratch {
    /// The name as read.
    exact: SniKey,
    /// Its wildcard form.
    wildcard: SniKey,
    /// Where the walk left the hello ([`WALKED_TO_NAME`], [`WALK_GOES_ON`], or a
    /// [`sni_outcome`]) and the name's extension it came to (or the `next` it goes on at, in
    /// `body`), parked for [`read_hello`]; `body` parks a PROXY header's length before the
    /// walk, too ([`first_hello`]).
    walked: u32,
    body: u32,
    body_len: u32,
    hello_end: u32,
    record_end: u32,
    /// The verdict on the name ([`sni_outcome`], or [`NAMED`]) and its length.
    verdict: u32,
    len: u32,
    /// The first bytes of an extension header the segment cut ([`CutHeader`]), parked here
    /// for [`resume_at`].
    cut_len: u32,
    cut_bytes: u32,
    /// Where the payload starts, laundered for the verifier in [`read_hello`].
    start: u32,
}

/// [`SniScratch::walked`] of a walk that came to the server name's extension, and of one
/// that goes on in the next segment.
const WALKED_TO_NAME: u32 = u32::MAX;
const WALK_GOES_ON: u32 = u32::MAX - 1;
/// [`SniScratch::verdict`] of a hello with a name.
const NAMED: u32 = u32::MAX;

/// What a connection's first bytes decide.
enum Verdict {
    /// The route the ClientHello names (`None`: the port's route without a name takes it),
    /// and how it was found.
    Decided(Option<u32>, u32),
    /// A PROXY header of this many bytes ended the segment: the hello comes in the next.
    After(u32),
    /// The hello goes on past the segment ([`Hello::Continues`]).
    Continues {
        next: u32,
        hello_end: u32,
        record_end: u32,
    },
    /// The segment ended in the server name's extension ([`Hello::NameCut`]).
    NameCut { body: u32, len: u32 },
}

/// Where a segment's reading of a hello starts.
#[derive(Clone, Copy)]
enum Reading {
    /// The connection's first data: a PROXY header if a load balancer sent one, then the
    /// hello.
    First,
    /// The hello, after a PROXY header that ended an earlier segment (a second header is no
    /// hello: `not_tls`, as one in the same segment as the first).
    AfterHeader,
    /// The extensions of a hello an earlier segment began: the offsets in this segment of
    /// the next extension (or the rest of the header `cut` begins), the hello's end and its
    /// record's end.
    Walk {
        next: u32,
        cut: CutHeader,
        hello_end: u32,
        record_end: u32,
    },
}

/// How a segment is read on from an earlier one.
#[derive(Clone, Copy)]
enum Resumed {
    Hello(Reading),
    /// The rest of the server name's extension (`len` bytes of body, of which the socket's
    /// storage keeps the first `kept`) starts at offset `at`: [`read_kept_name`].
    KeptName {
        at: u32,
        kept: u32,
        len: u32,
    },
}

/// Reads the ClientHello in the segment's payload from `start`, as `reading` says.
#[inline(always)]
fn read_hello(ctx: &SkBuffContext, start: u32, port: u16, reading: Reading) -> Verdict {
    let Some(scratch) = SNI_SCRATCH.get_ptr_mut(0) else {
        return Verdict::Decided(None, sni_outcome::MALFORMED);
    };
    // SAFETY: this CPU's scratch value; a program runs on one CPU at a time and this one does
    // not nest (it runs from the protocol handler, never inside another of itself).
    let scratch = unsafe { &mut *scratch };
    // Through memory: the walk's checks narrow what the verifier knows of the value it walks
    // from, and of every copy of it the callers keep (the payload's start), so that the code
    // after the walk would be checked once for each of its exits.
    // SAFETY: a field of the scratch value.
    let start = unsafe {
        ptr::write_volatile(&raw mut scratch.start, start);
        ptr::read_volatile(&raw const scratch.start)
    };
    let end = ctx.len();
    let walked = match reading {
        Reading::Walk {
            next,
            cut,
            hello_end,
            record_end,
        } => client_hello::walk_on_to_name(&Segment(ctx), next, cut, hello_end, record_end, end),
        Reading::First | Reading::AfterHeader => {
            let header_allowed = matches!(reading, Reading::First);
            match first_hello(ctx, scratch, start, end, header_allowed) {
                Ok(walked) => walked,
                Err(verdict) => return verdict,
            }
        }
    };
    // What the walk found, parked: the name's extension, where the walk goes on
    // (`Continues`: its `next` as the body), or an outcome.
    let (walked, found) = match walked {
        Walked::Extension(extension) => (WALKED_TO_NAME, extension),
        Walked::Verdict(Hello::Continues {
            next,
            hello_end,
            record_end,
        }) => (
            WALK_GOES_ON,
            NameExtension {
                body: next,
                len: 0,
                hello_end,
                record_end,
            },
        ),
        Walked::Verdict(hello) => (
            outcome_of(hello),
            NameExtension {
                body: 0,
                len: 0,
                hello_end: 0,
                record_end: 0,
            },
        ),
    };
    // Through memory, so that the verifier, which cannot follow values there, goes on from
    // here in one state rather than once for each of the walk's hundreds of exits: the
    // name's extension, or the cut header, is read once.
    // SAFETY: fields of the scratch value above.
    let (walked, found) = unsafe {
        ptr::write_volatile(&raw mut scratch.walked, walked);
        ptr::write_volatile(&raw mut scratch.body, found.body);
        ptr::write_volatile(&raw mut scratch.body_len, found.len);
        ptr::write_volatile(&raw mut scratch.hello_end, found.hello_end);
        ptr::write_volatile(&raw mut scratch.record_end, found.record_end);
        (
            ptr::read_volatile(&raw const scratch.walked),
            NameExtension {
                body: ptr::read_volatile(&raw const scratch.body),
                len: ptr::read_volatile(&raw const scratch.body_len),
                hello_end: ptr::read_volatile(&raw const scratch.hello_end),
                record_end: ptr::read_volatile(&raw const scratch.record_end),
            },
        )
    };
    // Read again, for the same reason as the payload's start.
    let end = ctx.len();
    if walked == WALK_GOES_ON {
        return walk_goes_on(ctx, scratch, found, end);
    }
    if walked != WALKED_TO_NAME {
        return Verdict::Decided(None, walked);
    }
    zero_name(&mut scratch.exact);
    match client_hello::name_in(&Segment(ctx), found, end, &mut scratch.exact.name) {
        Hello::NameCut { body, len } => Verdict::NameCut { body, len },
        hello => named(scratch, port, hello),
    }
}

/// The walk goes on in the next segment, from the extension header at `found.body` (in
/// [`Hello::Continues`]' terms: its `next`).
#[inline(always)]
fn walk_goes_on(
    ctx: &SkBuffContext,
    scratch: &mut SniScratch,
    found: NameExtension,
    end: u32,
) -> Verdict {
    let next = found.body;
    // A header cut in two: its first bytes go on, parked for `resume_at`, and its rest starts
    // the next segment.
    let cut = client_hello::cut_header(&Segment(ctx), next, end);
    if cut.len == 0 && next < end {
        // The header's bytes could not be read (not seen to happen): the walk cannot go on.
        return Verdict::Decided(None, sni_outcome::INCOMPLETE);
    }
    // SAFETY: fields of the scratch value.
    unsafe {
        ptr::write_volatile(&raw mut scratch.cut_len, cut.len);
        ptr::write_volatile(&raw mut scratch.cut_bytes, cut.bytes);
    }
    Verdict::Continues {
        next: if cut.len == 0 { next } else { end },
        hello_end: found.hello_end,
        record_end: found.record_end,
    }
}

/// The outcome of a hello read no further than `hello` (never a name, nor a hello going on:
/// the callers take those first).
#[inline(always)]
fn outcome_of(hello: Hello) -> u32 {
    match hello {
        Hello::NoName => sni_outcome::NO_NAME,
        Hello::NotHello => sni_outcome::NOT_TLS,
        Hello::Malformed => sni_outcome::MALFORMED,
        Hello::Incomplete
        | Hello::Name { .. }
        | Hello::Continues { .. }
        | Hello::NameCut { .. } => sni_outcome::INCOMPLETE,
    }
}

/// The verdict on the name `hello` read into the scratch's name on `port`, or on its lack.
#[inline(always)]
fn named(scratch: &mut SniScratch, port: u16, hello: Hello) -> Verdict {
    let (verdict, len) = match hello {
        Hello::Name { len, .. } => (NAMED, len as u32),
        other => (outcome_of(other), 0),
    };
    // Through memory, as the walk's result in `read_hello`: the name is matched from one
    // state, not once for each of the name reader's exits.
    // SAFETY: fields of the scratch value.
    let (verdict, len) = unsafe {
        ptr::write_volatile(&raw mut scratch.verdict, verdict);
        ptr::write_volatile(&raw mut scratch.len, len);
        (
            ptr::read_volatile(&raw const scratch.verdict),
            ptr::read_volatile(&raw const scratch.len),
        )
    };
    if verdict != NAMED {
        return Verdict::Decided(None, verdict);
    }
    match match_name(scratch, port, len as usize) {
        Some(slot) => Verdict::Decided(Some(slot), sni_outcome::MATCHED),
        None => Verdict::Decided(None, sni_outcome::UNKNOWN_NAME),
    }
}

/// The walk of the hello that starts the payload at `start`, after a PROXY header if one
/// came and `header_allowed` (`Err`: a header alone, or a broken one, decides).
#[inline(always)]
fn first_hello(
    ctx: &SkBuffContext,
    scratch: &mut SniScratch,
    start: u32,
    end: u32,
    header_allowed: bool,
) -> Result<Walked, Verdict> {
    let skip = if header_allowed {
        match proxy_header(&Segment(ctx), start, end, &mut scratch.exact.name) {
            ProxyHeader::Absent => 0,
            ProxyHeader::Whole(len) => len,
            ProxyHeader::Incomplete => {
                return Err(Verdict::Decided(None, sni_outcome::INCOMPLETE));
            }
            ProxyHeader::Malformed => {
                return Err(Verdict::Decided(None, sni_outcome::MALFORMED));
            }
        }
    } else {
        0
    };
    // Through memory, as the walk's result: the hello is then walked from one state.
    // SAFETY: a field of the scratch value.
    let skip = unsafe {
        ptr::write_volatile(&raw mut scratch.body, skip);
        ptr::read_volatile(&raw const scratch.body)
    };
    let start = start + skip;
    if skip != 0 && start >= end {
        return Err(Verdict::After(skip));
    }
    Ok(client_hello::walk_to_name(&Segment(ctx), start, end))
}

/// The slot of the route whose name on `port` is the `len` bytes in the scratch's name,
/// exactly or by wildcard.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the key by value would be a 260-byte copy on the stack"
)]
fn match_name(scratch: &mut SniScratch, port: u16, len: usize) -> Option<u32> {
    let len = len & SNI_NAME_MAX;
    let exact = &mut scratch.exact;
    client_hello::lowercase(&mut exact.name);
    exact.port = port;
    exact.wildcard = 0;
    exact.len = len as u8;
    if let Some(route) = SNI_ROUTES.get_ptr(&*exact) {
        // SAFETY: a value of the name map, read-only here.
        return slot_of(unsafe { *route });
    }
    // `*.example.com` stands for one label before `example.com`: the name after the first
    // dot, if that label is not empty (copied at a variable offset through a dynamic
    // pointer: no loop over a length the verifier would walk once per value).
    let dot = client_hello::first_dot(&exact.name);
    if dot == 0 || dot + 1 >= len {
        return None;
    }
    let rest = len - dot - 1;
    let wildcard = &mut scratch.wildcard;
    zero_name(wildcard);
    if !copy_name(
        &raw const scratch.exact.name,
        dot as u32 + 1,
        rest,
        &mut wildcard.name,
    ) {
        return None;
    }
    wildcard.port = port;
    wildcard.wildcard = 1;
    wildcard.len = rest as u8;
    let route = SNI_ROUTES.get_ptr(&*wildcard)?;
    // SAFETY: as above.
    slot_of(unsafe { *route })
}

#[inline(always)]
fn slot_of(route: u32) -> Option<u32> {
    (route != 0 && route <= MAX_ROUTES).then(|| route - 1)
}
