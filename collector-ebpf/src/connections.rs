//! Connection lifecycle on watched ports, from sock_ops callbacks: accepted connections are
//! counted at PASSIVE_ESTABLISHED and remembered in a slot of the connection table found
//! from the socket cookie; their close is counted at the STATE_CB into TCP_CLOSE, with the
//! duration and the socket's own byte counters. The agent reads the open connections per
//! client from the table itself, and the connections per client from a tally table
//! (`CONN_CLIENTS`), so open and close events, which only the event stream needs, go out
//! only while someone reads the stream.
//!
//! Upstreams (`[[upstreams]]`, by the remote port of the connections this namespace opens)
//! share the route slots and the table: a connect takes a slot at TCP_CONNECT, is counted
//! opened at ACTIVE_ESTABLISHED and closed as a route's connection is; one that closes
//! before its handshake completes is a connect failure.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::{
    bindings::{
        BPF_RB_NO_WAKEUP, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, BPF_TCP_CLOSE_WAIT, BPF_TCP_CLOSING, BPF_TCP_FIN_WAIT2, BPF_TCP_LAST_ACK,
        BPF_TCP_SYN_RECV, BPF_TCP_SYN_SENT,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SockOpsContext,
};
use collector_common::{
    CLIENT_NO_SLOT, CONN_DURATION_BUCKETS, CONN_EVENT_CLOSE, CONN_EVENT_OPEN, CONN_TABLE_PROBES,
    ConnClientEvent, ConnEvent, ConnState, MAX_ROUTES, NO_ROUTE, address_words, client_fingerprint,
    conn_flags, conn_slot, duration_bucket, error_kind,
};

use crate::{
    CLIENT_EVENTS, CONN_CLIENTS, CONN_CLIENTS_BUSY, CONN_COUNTERS, CONN_DURATIONS, CONN_EVENTS,
    CONN_STATE, CONN_STREAM_WANTED, CONN_TABLE_BITS, NETNS_COOKIE, ROUTE_BY_PORT, UPSTREAM_BY_PORT,
    UPSTREAM_COUNTERS, UPSTREAMS_WATCHED, add, count_error, server_names,
    tally::{Tally, tally},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// The owner word of a slot: the cookie of the socket that claimed it, 0 when free. Only
/// ever accessed atomically. (The BPF target's `AtomicU64` has no compare-and-swap, hence
/// the intrinsics; with ALU32 (BPF v3, .cargo/config.toml) LLVM emits BPF_CMPXCHG.)
fn owner(slot: *mut ConnState) -> *mut u64 {
    // SAFETY: `slot` points into our array map, valid for the program's run.
    unsafe { core::ptr::addr_of_mut!((*slot).cookie) }
}

/// Claims a free slot for `cookie` (compare-and-swap: two CPUs never take the same slot).
/// Inlined, as [`find`] and [`release`] are: a BPF-to-BPF call on every callback of a
/// followed socket costs more than the copies.
#[inline(always)]
fn claim(cookie: u64) -> Option<*mut ConnState> {
    let table_bits = CONN_TABLE_BITS.load();
    for probe in 0..CONN_TABLE_PROBES {
        let Some(slot) = CONN_STATE.get_ptr_mut(conn_slot(cookie, probe, table_bits)) else {
            continue;
        };
        // SAFETY: an 8-byte-aligned word of our map value (map values are 8-aligned).
        let (_, claimed) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::AcqRel }, { AtomicOrdering::Relaxed }>(
                owner(slot),
                0,
                cookie,
            )
        };
        if claimed {
            return Some(slot);
        }
    }
    None
}

/// The slot `cookie` claimed, if any.
#[inline(always)]
fn find(cookie: u64) -> Option<*mut ConnState> {
    let table_bits = CONN_TABLE_BITS.load();
    for probe in 0..CONN_TABLE_PROBES {
        let Some(slot) = CONN_STATE.get_ptr_mut(conn_slot(cookie, probe, table_bits)) else {
            continue;
        };
        // A plain (volatile) load is enough: a socket only looks for the cookie it stored
        // itself, from callbacks the socket lock orders, and an aligned 8-byte load does not
        // tear. (LLVM's BPF backend selects no atomic load below v4.) SAFETY: as in `claim`.
        if unsafe { core::ptr::read_volatile(owner(slot)) } == cookie {
            return Some(slot);
        }
    }
    None
}

/// Frees a slot for the next connection. A compare-and-swap rather than a store: it orders
/// the freeing after this socket's last reads of the slot on every architecture (LLVM emits
/// store-release only for BPF v4).
/// Its flags are cleared first: the agent tells upstream entries by them while it reads the
/// table, and the next claimer's first writes come after its claim.
#[inline(always)]
fn release(slot: *mut ConnState, cookie: u64) {
    // SAFETY: as in `claim`; the slot is still ours.
    unsafe { (*slot).flags = 0 };
    // SAFETY: as in `claim`.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::AcqRel }, { AtomicOrdering::Relaxed }>(
            owner(slot),
            cookie,
            0,
        )
    };
}

pub fn on_sock_op(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_accepted(ctx),
        BPF_SOCK_OPS_STATE_CB => on_state_change(ctx),
        BPF_SOCK_OPS_TCP_CONNECT_CB if upstreams_watched() => on_connect(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB if upstreams_watched() => on_connected(ctx),
        _ => {}
    }
}

/// The socket belongs to the namespace whose sockets are counted.
#[inline(always)]
fn in_counted_netns(ctx: &SockOpsContext) -> bool {
    let wanted_netns = NETNS_COOKIE.load();
    // SAFETY: the helper only reads the socket behind the context.
    wanted_netns == 0 || unsafe { bpf_get_netns_cookie(ctx.ops.cast()) } == wanted_netns
}

fn on_accepted(ctx: &SockOpsContext) {
    // The port first: every connection accepted under the cgroup2 root comes here, and the
    // look-up is cheaper than the namespace helper.
    let Some(&route) = ROUTE_BY_PORT.get(ctx.local_port()) else {
        return;
    };
    if route == NO_ROUTE || route > MAX_ROUTES || !in_counted_netns(ctx) {
        return;
    }
    let slot = route - 1;
    let Some(counters) = CONN_COUNTERS.get_ptr_mut(slot) else {
        return;
    };
    let cookie = socket_cookie(ctx);
    // A connect of ours that completed here (a simultaneous open, or a socket connected to
    // its own port) on a port both a route's and an upstream's: already in the table, as
    // the upstream's. Such a socket has state callbacks before it is accepted; so does the
    // child of a listener another program gave them (the clone copies the flags), which
    // costs only the look-up: its new cookie is in no table. Whether upstreams are watched
    // now does not matter: one from before a crash may still be.
    if ctx.cb_flags() & BPF_SOCK_OPS_STATE_CB_FLAG != 0 && find(cookie).is_some() {
        return;
    }
    let client = client_addr(ctx);
    if client_events() {
        count_client(&client);
    }
    // SAFETY: this CPU's value of our per-CPU map.
    let opened = unsafe { &raw mut (*counters).opened };
    let Some(entry) = claim(cookie) else {
        count_error(error_kind::CONN_TABLE_FULL);
        if server_names::sni_watched() && server_names::shared_port(ctx.local_port()) {
            server_names::count_unfollowed(slot);
        }
        add(opened, 1);
        // After `opened`: the agent reads it with the closes, from a copy taken before the
        // one it reads `opened` from, so it never takes off one it has not counted in.
        // SAFETY: as `opened`.
        add(unsafe { &raw mut (*counters).untracked }, 1);
        return;
    };
    // SAFETY: the slot is ours since the claim; only this socket's callbacks touch it.
    let state = unsafe { &mut *entry };
    state.start_ns = ktime_ns();
    state.client_addr = client;
    state.route = slot;
    state.client_port = client_port(ctx);
    // A child of a listener starts with nothing acknowledged; a socket whose own SYN was
    // met by a SYN (connected to its own port, or crossed SYNs) with its SYN.
    // SAFETY: a context field read, as in `tcp`.
    state.flags = if unsafe { (*ctx.ops).bytes_acked } == 0 {
        0
    } else {
        conn_flags::SYN_ACKED
    };
    // Ask for state callbacks, keeping whatever callbacks other programs asked for.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    // On a port shared by name the route waits for the ClientHello (server_names), which
    // counts it opened; `slot` is the route without a name there.
    if server_names::sni_watched()
        && server_names::shared_port(ctx.local_port())
        && server_names::await_hello(ctx, slot, cookie, (state.client_addr, state.client_port))
    {
        state.flags |= conn_flags::BY_NAME;
        return;
    }

    if client_events() && stream_wanted() {
        emit_open(
            cookie,
            slot,
            state.start_ns,
            (state.client_addr, state.client_port),
        );
    }
    // Counted after the client: the agent reads the clients after the counters, so its
    // per-client figures cover every connection counted.
    add(opened, 1);
}

/// Upstream connections are followed (a load-time constant to the verifier).
#[inline(always)]
fn upstreams_watched() -> bool {
    UPSTREAMS_WATCHED.load() != 0
}

/// The slot of the upstream whose port the socket connects to, if any.
fn upstream_slot(ctx: &SockOpsContext) -> Option<u32> {
    let &value = UPSTREAM_BY_PORT.get(u32::from(client_port(ctx)))?;
    (value != NO_ROUTE && value <= MAX_ROUTES).then(|| value - 1)
}

/// Takes a table slot for an upstream connection, with state callbacks asked for.
fn follow_upstream(
    ctx: &SockOpsContext,
    cookie: u64,
    slot: u32,
    flags: u32,
) -> Option<*mut ConnState> {
    let entry = claim(cookie)?;
    // SAFETY: the slot is ours since the claim; only this socket's callbacks touch it.
    let state = unsafe { &mut *entry };
    // Flags first: the agent reads the table meanwhile, and tells upstreams by them.
    state.flags = conn_flags::UPSTREAM | flags;
    state.start_ns = ktime_ns();
    state.client_addr = client_addr(ctx);
    state.route = slot;
    state.client_port = client_port(ctx);
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    Some(entry)
}

/// A connect to an upstream's port: followed from here, so that a close before the
/// handshake completes counts as a failure, and counted as connecting until then (it holds
/// a slot of the table). A full table leaves it to [`on_connected`].
fn on_connect(ctx: &SockOpsContext) {
    let Some(slot) = upstream_slot(ctx) else {
        return;
    };
    if !in_counted_netns(ctx) {
        return;
    }
    if follow_upstream(ctx, socket_cookie(ctx), slot, conn_flags::CONNECTING).is_some() {
        add_connecting(slot, 1);
    }
}

/// An upstream connection established: counted opened, its lifetime measured from now. One
/// not followed since its connect (made before the agent started, or the table was full
/// then) is taken on here.
fn on_connected(ctx: &SockOpsContext) {
    let Some(slot) = upstream_slot(ctx) else {
        return;
    };
    if !in_counted_netns(ctx) {
        return;
    }
    let cookie = socket_cookie(ctx);
    // Counted in the slot the connect took, where its close will count: the port map names
    // another after a restart that gave the port to another upstream.
    let mut followed = true;
    let slot = if let Some(entry) = find(cookie) {
        // SAFETY: the slot this socket claimed at its connect.
        let state = unsafe { &mut *entry };
        state.start_ns = ktime_ns();
        if state.flags & conn_flags::CONNECTING != 0 {
            state.flags &= !conn_flags::CONNECTING;
            add_connecting(state.route, u64::MAX);
        }
        state.route
    } else {
        if follow_upstream(ctx, cookie, slot, 0).is_none() {
            count_error(error_kind::CONN_TABLE_FULL);
            followed = false;
        }
        slot
    };
    if let Some(counters) = CONN_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: this CPU's value of our per-CPU map.
        add(unsafe { &raw mut (*counters).opened }, 1);
        if !followed {
            // After `opened`, as in `on_accepted`. SAFETY: as above.
            add(unsafe { &raw mut (*counters).untracked }, 1);
        }
    }
}

/// Adds `n` (`u64::MAX` takes one off) to the upstream's connects in progress on this CPU.
#[inline(always)]
fn add_connecting(slot: u32, n: u64) {
    if let Some(counters) = UPSTREAM_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: this CPU's value of our per-CPU map.
        add(unsafe { &raw mut (*counters).connecting }, n);
    }
}

/// Counts a connection for its client in this CPU's slot for it. A client new to the slot
/// goes to the agent once, with the final count of the client it replaces; while it keeps
/// the slot its connections cost an increment, not a ring record each.
///
/// Unlike the classifiers, accept callbacks can share a CPU's slots: one processed from a
/// socket's backlog (a packet that arrived while a system call held the new socket's lock)
/// runs in process context, where one in softirq can interrupt it, and where another task
/// can preempt it on a kernel with full preemption (programs run with migration disabled,
/// not preemption). The one that finds the CPU's word taken leaves the table alone and
/// sends a client event for no slot, which the agent counts once.
#[inline(always)]
fn count_client(client: &[u8; 16]) {
    let Some(busy) = CONN_CLIENTS_BUSY.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a 4-byte-aligned word of this CPU's value of our per-CPU map. Taken by a
    // compare-and-swap: a task preempted between a read of 0 and a store of 1 would let
    // another tally in beside it.
    let (_, taken) = unsafe {
        atomic_cxchg::<u32, { AtomicOrdering::AcqRel }, { AtomicOrdering::Relaxed }>(busy, 0, 1)
    };
    if !taken {
        send_client(client, CLIENT_NO_SLOT, 0, unfolded_zero());
        return;
    }
    let key = address_words(client);
    match tally(&CONN_CLIENTS, &key, client_fingerprint(client)) {
        Tally::Counted => {}
        Tally::NoSlot => {
            send_client(client, CLIENT_NO_SLOT, 0, unfolded_zero());
        }
        Tally::Claim(claim) => {
            // A full ring leaves the slot to its client, whose count the agent can still
            // read.
            if send_client(client, claim.index, claim.tenure, claim.replaced_count) {
                claim.take(&key);
            }
        }
    }
    // SAFETY: as above; the word is ours until this store.
    unsafe { busy.write_volatile(0) };
}

/// Sends a client taking `slot` for `tenure` (ending the one before at `replaced_count`),
/// or for no slot ([`CLIENT_NO_SLOT`]); `false` if the ring was full (counted).
#[inline(always)]
fn send_client(client: &[u8; 16], slot: u32, tenure: u32, replaced_count: u64) -> bool {
    let event = ConnClientEvent::new(slot, tenure, replaced_count, *client);
    let sent = CONN_EVENTS
        .output_untyped::<ConnClientEvent>(&event, u64::from(BPF_RB_NO_WAKEUP))
        .is_ok();
    if !sent {
        count_error(error_kind::CONN_CLIENT_DROPPED);
    }
    sent
}

fn on_state_change(ctx: &SockOpsContext) {
    let (old, new) = (ctx.arg(0), ctx.arg(1));
    // Only these transitions need the table; the rest of the FIN accounting is read from
    // the state the socket closes from.
    if new != BPF_TCP_FIN_WAIT2 && new != BPF_TCP_CLOSE {
        return;
    }
    let cookie = socket_cookie(ctx);
    // Not in our table: a socket some other program asked state callbacks for.
    let Some(entry) = find(cookie) else {
        return;
    };
    // SAFETY: the slot this socket claimed; only its callbacks, which the kernel runs under
    // the socket lock, touch it until it is released.
    let state = unsafe { &mut *entry };
    match new {
        BPF_TCP_FIN_WAIT2 => {
            state.flags |= conn_flags::FIN_OUT | conn_flags::FIN_WAIT2_SEEN;
            state.rcv_nxt_fin_wait2 = tcp(ctx).rcv_nxt;
        }
        // Read from the slot, not from `upstreams_watched()`: a restart after a crash may
        // drop the upstreams while their connections are still in the table.
        BPF_TCP_CLOSE if state.flags & conn_flags::CONNECTING != 0 => {
            add_connecting(state.route, u64::MAX);
            // Never established: refused or abandoned in SYN_SENT, or a simultaneous open
            // that failed in SYN_RECV (its SYN-ACK unanswered or reset).
            if old == BPF_TCP_SYN_SENT || old == BPF_TCP_SYN_RECV {
                if let Some(counters) = UPSTREAM_COUNTERS.get_ptr_mut(state.route) {
                    // SAFETY: this CPU's value of our per-CPU map.
                    add(unsafe { &raw mut (*counters).connect_failures }, 1);
                }
            } else {
                // Established without an ACTIVE_ESTABLISHED of ours: a restart dropped its
                // port or every upstream meanwhile, or a simultaneous open (whose accepting
                // side's callback goes to `on_accepted`). Counted opened now, then closed.
                state.flags &= !conn_flags::CONNECTING;
                if let Some(counters) = CONN_COUNTERS.get_ptr_mut(state.route) {
                    // SAFETY: this CPU's value of our per-CPU map.
                    add(unsafe { &raw mut (*counters).opened }, 1);
                }
                on_closed(ctx, cookie, state, old);
            }
            release(entry, cookie);
        }
        BPF_TCP_CLOSE => {
            if state.flags & conn_flags::BY_NAME != 0 {
                state.route =
                    server_names::decide_at_close(ctx, cookie, state, tcp(ctx).bytes_received);
            }
            on_closed(ctx, cookie, state, old);
            release(entry, cookie);
        }
        _ => {}
    }
}

/// `bytes_received` and `bytes_acked` count sequence space, so a FIN counts as one byte. Tell
/// from the state the socket closed from whether each FIN was exchanged, and take it off.
fn on_closed(ctx: &SockOpsContext, cookie: u64, state: &ConnState, old: u32) {
    let sock = tcp(ctx);
    let mut flags = state.flags;
    // The peer's FIN led into each of these states.
    if matches!(old, BPF_TCP_CLOSE_WAIT | BPF_TCP_LAST_ACK | BPF_TCP_CLOSING) {
        flags |= conn_flags::FIN_IN;
    }
    match old {
        // Our FIN went out; it counts only once acknowledged (not on a reset or timeout).
        BPF_TCP_LAST_ACK | BPF_TCP_CLOSING if sock.snd_una == sock.snd_nxt => {
            flags |= conn_flags::FIN_OUT;
        }
        // From FIN_WAIT2 the socket closes either on the peer's FIN (rcv_nxt moved on since
        // the last FIN_WAIT2 callback, which a close() repeats: data the peer sent after our
        // shutdown is in it) or, orphaned, at once into a timewait socket without one. An
        // abortive close after more data looks like the FIN (docs/DESIGN.md, Connections).
        BPF_TCP_FIN_WAIT2
            if flags & conn_flags::FIN_WAIT2_SEEN != 0
                && sock.rcv_nxt != state.rcv_nxt_fin_wait2 =>
        {
            flags |= conn_flags::FIN_IN;
        }
        _ => {}
    }
    let bytes_in = sock
        .bytes_received
        .saturating_sub(u64::from(flags & conn_flags::FIN_IN != 0));
    // The connecting side's SYN was acknowledged too, and counted in `bytes_acked` (the
    // accepting side's SYN-ACK is not: its ACK sets `snd_una` directly).
    let upstream = flags & conn_flags::UPSTREAM != 0;
    let syn_out = u64::from(flags & (conn_flags::UPSTREAM | conn_flags::SYN_ACKED) != 0);
    let bytes_out = sock
        .bytes_acked
        .saturating_sub(u64::from(flags & conn_flags::FIN_OUT != 0) + syn_out);
    let now = ktime_ns();
    let duration_ns = now.saturating_sub(state.start_ns);
    let slot = state.route;
    if slot >= MAX_ROUTES {
        return;
    }
    // Submitted before it is counted, as on open. Upstream connections have no client.
    if client_events() && !upstream && stream_wanted() {
        emit(&ConnEvent {
            kind: CONN_EVENT_CLOSE,
            route: slot,
            cookie,
            timestamp_ns: now,
            duration_ns,
            bytes_in,
            bytes_out,
            client_addr: state.client_addr,
            client_port: state.client_port,
            _pad: 0,
            _pad2: 0,
        });
    }
    if let Some(counters) = CONN_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: this CPU's value of our per-CPU map, valid for the program's run.
        unsafe {
            add(&raw mut (*counters).closed, 1);
            add(&raw mut (*counters).bytes_in, bytes_in);
            add(&raw mut (*counters).bytes_out, bytes_out);
            add(&raw mut (*counters).duration_us, duration_ns / 1000);
        }
    }
    if let Some(durations) = CONN_DURATIONS.get_ptr_mut(slot) {
        let bucket = duration_bucket::<CONN_DURATION_BUCKETS>(duration_ns);
        // SAFETY: as above.
        let buckets = unsafe { &mut (*durations).buckets };
        if let Some(count) = buckets.get_mut(bucket as usize) {
            add(count, 1);
        }
    }
}

/// The TCP fields of the context that the close accounting reads.
struct TcpView {
    rcv_nxt: u32,
    snd_una: u32,
    snd_nxt: u32,
    bytes_received: u64,
    bytes_acked: u64,
}

fn tcp(ctx: &SockOpsContext) -> TcpView {
    // SAFETY: context field reads, rewritten by the verifier into reads of the full socket
    // (these callbacks only run for full TCP sockets).
    unsafe {
        let ops = &*ctx.ops;
        TcpView {
            rcv_nxt: ops.rcv_nxt,
            snd_una: ops.snd_una,
            snd_nxt: ops.snd_nxt,
            bytes_received: ops.bytes_received,
            bytes_acked: ops.bytes_acked,
        }
    }
}

/// Connection events are on (`client_stats`); a load-time constant to the verifier.
#[inline(always)]
pub(crate) fn client_events() -> bool {
    CLIENT_EVENTS.load() != 0
}

/// Someone reads the event stream, the only user of open and close events.
#[inline(always)]
pub(crate) fn stream_wanted() -> bool {
    CONN_STREAM_WANTED.get(0).is_some_and(|&wanted| wanted != 0)
}

/// No wakeup per event: waking the reader costs an irq_work and a context switch per record,
/// which halved the new-connection rate in `cargo xtask bench`. The agent drains the ring on
/// a short timer instead.
fn emit(event: &ConnEvent) {
    if CONN_EVENTS
        .output(event, u64::from(BPF_RB_NO_WAKEUP))
        .is_err()
    {
        count_error(error_kind::CONN_EVENT_DROPPED);
    }
}

/// 0, which LLVM cannot see to be a constant, so cannot merge with the zeros beside it into a
/// `memset`: this target calls that as a function writing one byte a loop (five
/// instructions a byte).
#[inline(always)]
fn unfolded_zero() -> u64 {
    let zero = 0u64;
    // SAFETY: a read of a local.
    unsafe { core::ptr::read_volatile(&raw const zero) }
}

/// Sends the open event of the connection `cookie` on route `slot`, made at `timestamp_ns`.
/// Its figures of a close are zeros LLVM cannot see ([`unfolded_zero`]): side by side, they
/// were a `memset` of 24 bytes, some 120 instructions.
#[inline(always)]
pub(crate) fn emit_open(
    cookie: u64,
    slot: u32,
    timestamp_ns: u64,
    (client_addr, client_port): ([u8; 16], u16),
) {
    let zero = unfolded_zero();
    emit(&ConnEvent {
        kind: CONN_EVENT_OPEN,
        route: slot,
        cookie,
        timestamp_ns,
        duration_ns: zero,
        bytes_in: zero,
        bytes_out: zero,
        client_addr,
        client_port,
        _pad: 0,
        _pad2: 0,
    });
}

pub(crate) fn ktime_ns() -> u64 {
    // SAFETY: no arguments, no side effects.
    unsafe { bpf_ktime_get_ns() }
}

fn socket_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the helper only reads the socket behind the context.
    unsafe { bpf_get_socket_cookie(ctx.ops.cast()) }
}

/// The peer's address as 16 bytes, IPv4 mapped into IPv6 (`::ffff:a.b.c.d`).
fn client_addr(ctx: &SockOpsContext) -> [u8; 16] {
    let mut addr = [0u8; 16];
    match ctx.family() {
        AF_INET => {
            addr[10] = 0xff;
            addr[11] = 0xff;
            // The context keeps addresses in network byte order: memory order is wire order.
            addr[12..16].copy_from_slice(&ctx.remote_ip4().to_ne_bytes());
        }
        AF_INET6 => {
            // Four loads of four bytes, each kept whole and at a constant offset: the verifier
            // takes only that of this context field, and LLVM would merge a plain copy into
            // 8-byte loads.
            // SAFETY: fields of the context, read-only.
            let words = unsafe {
                let ip6 = &raw const (*ctx.ops).remote_ip6;
                [
                    core::ptr::read_volatile(&raw const (*ip6)[0]),
                    core::ptr::read_volatile(&raw const (*ip6)[1]),
                    core::ptr::read_volatile(&raw const (*ip6)[2]),
                    core::ptr::read_volatile(&raw const (*ip6)[3]),
                ]
            };
            for (i, word) in words.iter().enumerate() {
                addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
            }
        }
        _ => {}
    }
    addr
}

/// `remote_port` holds the port in network byte order in its upper 16 bits.
fn client_port(ctx: &SockOpsContext) -> u16 {
    u32::from_be(ctx.remote_port()) as u16
}
