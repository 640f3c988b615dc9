//! `collector maps list` and `collector maps dump NAME`: the pinned maps, opened from bpffs by
//! a process of their own (the agent running or not) and decoded with the common types,
//! per-CPU values summed.

use std::{
    collections::{HashMap, HashSet},
    io::{self, IsTerminal as _, Write},
    net::Ipv6Addr,
    os::fd::AsFd as _,
    path::Path,
    time::Instant,
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, Map, MapData, PerCpuArray};
use collector_common::{
    ConnCounters, ConnDurations, ConnState, DIR_IN, DIR_OUT, DNS_MALFORMED_NAMES,
    DNS_QUESTION_TAG_MASK, DnsCounters, DnsInFlight, DnsNameKeys, ERROR_KIND_NAMES, MAX_ROUTES,
    PIN_LAYOUT, PINNED_MAPS, RouteName, SNI_OUTCOME_NAMES, SniCounters, SniKey, TrafficCounters,
    UpstreamCounters, conn_flags, conn_table_slots_allowed, dns_inflight_slots_allowed,
    dns_query_given_up, map_names, traffic_index,
};
use serde::Serialize;
use serde_json::{Number, Value, json};

use crate::{
    bpf_sys,
    clock::monotonic_ns,
    counters::{
        sum_conn, sum_dns, sum_durations, sum_server_names, sum_traffic, sum_u64, sum_upstream,
    },
    dns::{OPCODE_NAMES, QCLASS_NAMES, RCODE_NAMES, qtype_name},
    loader,
    mapped::MappedArray,
    output, paths, privileges,
};

/// Maps `dump` decodes that are not pinned: the configuration maps of routes by server name
/// and the table of local addresses, read through the programs this pin directory's links
/// hold.
const LINKED_MAPS: [&str; 3] = [
    map_names::SNI_ROUTES,
    map_names::SNI_PORT_BITS,
    map_names::LOCAL_ADDRESSES,
];

/// The names `maps watch` and `maps dump` take, in any case (given as the map's): another
/// is a usage error (status 2) that lists them.
pub fn name_parser() -> impl clap::builder::TypedValueParser<Value = String> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(PINNED_MAPS.into_iter().chain(LINKED_MAPS))
        .map(|name| name.to_ascii_uppercase())
}

/// What `maps list` and `maps dump` say of `SNI_DECISIONS`.
const SOCKET_STORAGE: &str = "socket storage: a value per socket, reached from its socket \
    only, so it cannot be listed or dumped; CONN_STATE's rows flagged BY_NAME are the \
    connections it decides (their routeSlot the port's route without names until they close)";

/// What `maps list` and `maps dump` say of `SNI_RESUME`.
const RESUME_STORAGE: &str = "socket storage: a value per socket whose hello goes on past a \
    segment or after a PROXY header, reached from its socket only, so it cannot be listed or \
    dumped";

/// The note on a map of socket storage, which cannot be read from outside its sockets.
fn storage_note(name: &str) -> Option<&'static str> {
    match name {
        map_names::SNI_DECISIONS => Some(SOCKET_STORAGE),
        map_names::SNI_RESUME => Some(RESUME_STORAGE),
        _ => None,
    }
}

/// One pinned map, as `maps list` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MapRow {
    pub name: &'static str,
    #[serde(rename = "type")]
    pub kind: String,
    pub key_size: u32,
    pub value_size: u32,
    pub capacity: u32,
    /// Entries holding something, for the tables that fill up (connections, DNS in flight,
    /// upstream names stamped within the answer timeout, route names); `None` for counter
    /// arrays, whose entries always exist.
    pub in_use: Option<u32>,
    /// What the figures cannot say of this map (socket storage has no entries to count).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The pinned map `name`, refused if another build shaped it otherwise: decoded with this
/// build's types, its values would read as other fields (a table of fewer slots fails
/// halfway).
fn open(pin_dir: &Path, name: &str) -> anyhow::Result<MapData> {
    let data = open_pin(pin_dir, name)?;
    if let Some(expected) = this_build()?.maps.get(name)
        && let info = data.info()?
        && let Some(difference) =
            loader::shape_difference(expected, &info, sized_at_load(name, &info))
    {
        bail!(
            "the pinned map {name} has another shape than this build's: another build of the \
             collector pinned it ({difference}; read it with that build's `collector maps`)"
        );
    }
    Ok(data)
}

/// The capacity a pinned map may have where the agent sizes it at load: the connection
/// table's is the config's `connection_table_slots`, the in-flight table's its `[dns]
/// in_flight_slots`, which the CLI does not know, so any size a config may give is this
/// build's.
fn sized_at_load(name: &str, info: &aya::maps::MapInfo) -> Option<u32> {
    let slots = info.max_entries();
    match name {
        map_names::CONN_STATE => conn_table_slots_allowed(slots),
        map_names::DNS_INFLIGHT => dns_inflight_slots_allowed(slots),
        _ => false,
    }
    .then_some(slots)
}

/// This build's kernel object, parsed once (a watch opens its maps at every refresh).
fn this_build() -> anyhow::Result<&'static aya_obj::Object> {
    static PARSED: std::sync::OnceLock<aya_obj::Object> = std::sync::OnceLock::new();
    if let Some(object) = PARSED.get() {
        return Ok(object);
    }
    let object = loader::embedded_object()?;
    Ok(PARSED.get_or_init(|| object))
}

/// Why pins that a build of another [`PIN_LAYOUT`] claimed cannot be read: shaped as this
/// build's, its maps mean other things (a start replaces them for the same reason).
fn other_layout(pin_dir: &Path) -> anyhow::Result<Option<String>> {
    let name = map_names::PIN_OWNER;
    if !paths::pin_exists(&paths::map_pin_dir(pin_dir).join(name))? {
        return Ok(None);
    }
    // As it is: an older build's has one word, no layout.
    let owner = array::<u64>(open_pin(pin_dir, name)?)?;
    let layout = owner.get(&1, 0).ok();
    Ok((owner.get(&0, 0)? != 0 && layout != Some(PIN_LAYOUT)).then(|| {
        let layout = layout.map_or_else(|| "none".to_owned(), |layout| layout.to_string());
        format!(
            "the pins under {} were made by a build whose maps mean other things, though shaped \
             alike (layout {layout}; this build's is {PIN_LAYOUT}): read them with that build's \
             `collector maps`",
            pin_dir.display()
        )
    }))
}

/// The pinned map `name` as it is, whoever shaped it.
fn open_pin(pin_dir: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = paths::map_pin_dir(pin_dir).join(name);
    MapData::from_pin(&path).map_err(|err| {
        let err = anyhow::Error::from(err);
        let why = if privileges::denied_in(&err) {
            ": permission denied: run as root (bpffs is mode 0700, and pinned maps open only with \
             CAP_BPF)"
        } else {
            " (is a collector running, or did one crash, with this pin_dir?)"
        };
        err.context(format!("opening the pinned map {}{why}", path.display()))
    })
}

fn array<T: aya::Pod>(data: MapData) -> anyhow::Result<Array<MapData, T>> {
    Ok(Array::try_from(Map::from_map_data(data)?)?)
}

fn per_cpu<T: aya::Pod>(data: MapData) -> anyhow::Result<PerCpuArray<MapData, T>> {
    Ok(PerCpuArray::try_from(Map::from_map_data(data)?)?)
}

/// `err`, from reading the map `name`, with what it means: a key or value of another size
/// than this build's is a map another build made. Pinned maps are refused for that at
/// [`open`]; the linked ones (`SNI_ROUTES`, read through the running programs) reach here.
fn explain(err: anyhow::Error, name: &str) -> anyhow::Error {
    use aya::maps::MapError;
    let other_build = err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<MapError>(),
            Some(MapError::InvalidKeySize { .. } | MapError::InvalidValueSize { .. })
        )
    });
    if other_build {
        err.context(format!(
            "the pinned map {name} has another shape than this build's: another build of the \
             collector pinned it (read it with that build's `collector maps`)"
        ))
    } else {
        err.context(format!("reading the pinned map {name}"))
    }
}

/// Counts the entries of an array map for which `used` holds.
fn count_used<T: aya::Pod>(data: MapData, used: impl Fn(&T) -> bool) -> anyhow::Result<u32> {
    let map = array::<T>(data)?;
    let mut count = 0;
    for value in map.iter() {
        if used(&value?) {
            count += 1;
        }
    }
    Ok(count)
}

/// A memory-mappable array map of this build's shape (`open` and `list` leave others
/// unread), read through its mapping as the agent reads it. Read slot by slot instead, a
/// system call each, the connection table's largest size took half a second to list or
/// dump, at every refresh of a watch.
fn mapped<T: aya::Pod>(data: MapData, name: &str) -> anyhow::Result<MappedArray<T>> {
    MappedArray::map(array::<T>(data)?, name)
}

/// [`count_used`] for a map read through [`mapped`].
fn count_used_mapped<T: aya::Pod>(
    data: MapData,
    name: &str,
    used: impl Fn(&T) -> bool,
) -> anyhow::Result<u32> {
    let count = mapped::<T>(data, name)?
        .entries()
        .filter(|entry| used(entry))
        .count();
    Ok(u32::try_from(count)?)
}

/// Every pinned map of this build under `pin_dir`, with its shape and fill. A map this build
/// pins but an older one did not is left out (a crashed older build's pins lack it); none at
/// all is an error. Another build's pins are listed with what differs in their notes, and
/// no fill (counted with this build's meanings, it would be wrong): the list is where one
/// sees what a crash of another build left.
pub fn list(pin_dir: &Path) -> anyhow::Result<Vec<MapRow>> {
    let other_layout = other_layout(pin_dir)?;
    let map_dir = paths::map_pin_dir(pin_dir);
    let mut rows = Vec::new();
    // A query waiting past the answer timeout is given up, its slot free for the next
    // query of its set, as the kernel and the agent's gauge count it.
    let now = monotonic_ns();
    for name in PINNED_MAPS {
        if !paths::pin_exists(&map_dir.join(name))? {
            continue;
        }
        let data = open_pin(pin_dir, name)?;
        let info = data.info()?;
        let other_shape = this_build()?.maps.get(name).and_then(|expected| {
            loader::shape_difference(expected, &info, sized_at_load(name, &info)).map(
                |difference| {
                    format!(
                        "another build's map: {difference} (read it with that build's `collector \
                     maps`)"
                    )
                },
            )
        });
        let note = other_shape
            .or_else(|| {
                other_layout
                    .clone()
                    .filter(|_| name == map_names::PIN_OWNER)
            })
            .or_else(|| storage_note(name).map(str::to_owned));
        let in_use = if note.is_some() || other_layout.is_some() {
            None
        } else {
            match name {
                map_names::CONN_STATE => Some(count_used_mapped::<ConnState>(data, name, |s| {
                    s.cookie != 0
                })),
                map_names::DNS_INFLIGHT => {
                    Some(count_used_mapped::<DnsInFlight>(data, name, |s| {
                        s.start_ns != 0 && !dns_query_given_up(now, s.start_ns)
                    }))
                }
                // The stamps a waiting query can still be judged by: a slot stamped once stays
                // stamped, so all of them would read full within hours, whatever the load.
                map_names::DNS_UPSTREAM => Some(count_used::<u64>(data, |&stamp| {
                    stamp != 0 && !dns_query_given_up(now, stamp)
                })),
                map_names::ROUTE_NAMES => Some(count_used::<RouteName>(data, |n| n.bytes[0] != 0)),
                _ => None,
            }
            .transpose()
            .map_err(|err| explain(err, name))?
        };
        rows.push(MapRow {
            name,
            kind: info
                .map_type()
                .map_or_else(|_| "unknown".to_owned(), |t| format!("{t:?}")),
            key_size: info.key_size(),
            value_size: info.value_size(),
            capacity: info.max_entries(),
            in_use,
            note,
        });
    }
    if rows.is_empty() {
        bail!(
            "no pinned maps under {} (is a collector running, or did one crash, with this \
             pin_dir?){}",
            map_dir.display(),
            other_layouts(pin_dir)
        );
    }
    Ok(rows)
}

/// The owners recorded in `ROUTE_NAMES` by slot (a route's name, or an upstream's under
/// [`crate::loader::upstream_slot_owner`]), for decoding the per-slot maps.
fn route_names(pin_dir: &Path) -> anyhow::Result<Vec<(u32, String)>> {
    let names = array::<RouteName>(open(pin_dir, map_names::ROUTE_NAMES)?)?;
    let mut out = Vec::new();
    for slot in 0..MAX_ROUTES {
        let name = names.get(&slot, 0)?;
        let end = name.bytes.iter().position(|&b| b == 0).unwrap_or(64);
        if end > 0 {
            out.push((
                slot,
                String::from_utf8_lossy(&name.bytes[..end]).into_owned(),
            ));
        }
    }
    Ok(out)
}

fn client(addr: [u8; 16], port: u16) -> String {
    std::net::SocketAddr::new(Ipv6Addr::from(addr).to_canonical(), port).to_string()
}

/// What a slot's recorded owner is, as the key a dump row names it under: `("upstream",
/// "app")` for an upstream's slot (`upstream/app`), `("route", "web")` for a route's. Route
/// names hold no '/', so a route is never taken for an upstream.
fn slot_owner(owner: &str) -> (&'static str, &str) {
    owner
        .strip_prefix("upstream/")
        .map_or(("route", owner), |name| ("upstream", name))
}

/// `fields` (an object) with the slot `slot` and its recorded owner (see [`slot_owner`]).
fn slot_row(slot: u32, owner: &str, mut fields: Value) -> Value {
    let (kind, name) = slot_owner(owner);
    fields["slot"] = json!(slot);
    fields[kind] = json!(name);
    fields
}

/// A row for every slot with an owner, its `fields` read by `read`.
fn owned_rows(
    pin_dir: &Path,
    mut read: impl FnMut(u32) -> anyhow::Result<Value>,
) -> anyhow::Result<Value> {
    let mut rows = Vec::new();
    for (slot, owner) in route_names(pin_dir)? {
        rows.push(slot_row(slot, &owner, read(slot)?));
    }
    Ok(json!(rows))
}

/// The names of the [`conn_flags`] set in `flags`, as the kernel's constants are named; a
/// bit this build does not know is shown as a number.
fn flag_names(flags: u32) -> Vec<String> {
    const NAMES: [(u32, &str); 7] = [
        (conn_flags::FIN_IN, "FIN_IN"),
        (conn_flags::FIN_OUT, "FIN_OUT"),
        (conn_flags::FIN_WAIT2_SEEN, "FIN_WAIT2_SEEN"),
        (conn_flags::UPSTREAM, "UPSTREAM"),
        (conn_flags::CONNECTING, "CONNECTING"),
        (conn_flags::BY_NAME, "BY_NAME"),
        (conn_flags::SYN_ACKED, "SYN_ACKED"),
    ];
    let known = NAMES.iter().fold(0, |all, (bit, _)| all | bit);
    let mut names: Vec<String> = NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| (*name).to_owned())
        .collect();
    if flags & !known != 0 {
        names.push(format!("{:#x}", flags & !known));
    }
    names
}

/// One open connection of the connection table. A client's carries its client's address; an
/// upstream connection's (flag `UPSTREAM`) the backend's it connects to, in the same field of
/// the table; `owner` is its slot's.
fn conn_state_row(slot: u32, state: &ConnState, owner: Option<&str>) -> Value {
    let peer = if state.flags & conn_flags::UPSTREAM == 0 {
        "client"
    } else {
        "backend"
    };
    let mut row = json!({
        "slot": slot, "cookie": state.cookie, "routeSlot": state.route,
        peer: client(state.client_addr, state.client_port),
        "flags": flag_names(state.flags),
        // From the accept; an upstream connection's from its connect, then its handshake.
        "startNs": state.start_ns,
    });
    if let Some((kind, name)) = owner.map(slot_owner) {
        row[kind] = json!(name);
    }
    row
}

/// Other builds' layout directories beside this build's (`v2` next to `v1`), as a sentence
/// to add to "no pinned maps"; empty when there are none.
fn other_layouts(pin_dir: &Path) -> String {
    let mut others: Vec<String> = std::fs::read_dir(pin_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| {
            name != paths::PIN_LAYOUT_VERSION
                && name
                    .strip_prefix('v')
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    others.sort();
    if others.is_empty() {
        return String::new();
    }
    format!(
        "; {} holds pins of another build's layout ({}), which that build's `collector maps` \
         reads",
        pin_dir.display(),
        others.join(", ")
    )
}

/// The decoded contents of one pinned map, as JSON (summed over CPUs where per-CPU).
pub fn dump(pin_dir: &Path, name: &str) -> anyhow::Result<Value> {
    // `PIN_OWNER` says which layout made the pins, whichever it is.
    if name != map_names::PIN_OWNER
        && let Some(refusal) = other_layout(pin_dir)?
    {
        bail!(refusal);
    }
    decode(pin_dir, name).map_err(|err| explain(err, name))
}

fn decode(pin_dir: &Path, name: &str) -> anyhow::Result<Value> {
    Ok(match name {
        map_names::PIN_OWNER => {
            let owner = array::<u64>(open_pin(pin_dir, name)?)?;
            // An older build's has one word: no layout (null).
            json!({"netnsCookie": owner.get(&0, 0)?, "layout": owner.get(&1, 0).ok()})
        }
        map_names::ROUTE_NAMES => owned_rows(pin_dir, |_| Ok(json!({})))?,
        map_names::CONN_COUNTERS => {
            let map = per_cpu::<ConnCounters>(open(pin_dir, name)?)?;
            owned_rows(pin_dir, |slot| {
                let c = sum_conn(&map, slot)?;
                Ok(json!({
                    "opened": c.opened, "closed": c.closed, "bytesIn": c.bytes_in,
                    "bytesOut": c.bytes_out, "durationUs": c.duration_us, "untracked": c.untracked,
                }))
            })?
        }
        map_names::UPSTREAM_COUNTERS => {
            let map = per_cpu::<UpstreamCounters>(open(pin_dir, name)?)?;
            owned_rows(pin_dir, |slot| {
                let c = sum_upstream(&map, slot)?;
                Ok(json!({"connectFailures": c.connect_failures, "connecting": c.connecting}))
            })?
        }
        map_names::CONN_DURATIONS => {
            let map = per_cpu::<ConnDurations>(open(pin_dir, name)?)?;
            owned_rows(pin_dir, |slot| {
                Ok(json!({"buckets": log2_us_buckets(&sum_durations(&map, slot)?)}))
            })?
        }
        map_names::ROUTE_TRAFFIC => dump_traffic(pin_dir)?,
        map_names::ERRORS => {
            let map = per_cpu::<u64>(open(pin_dir, name)?)?;
            let mut out = serde_json::Map::new();
            for (kind, label) in (0u32..).zip(ERROR_KIND_NAMES) {
                out.insert(label.to_owned(), json!(sum_u64(&map, kind)?));
            }
            Value::Object(out)
        }
        map_names::CONN_STATE => {
            let map = mapped::<ConnState>(open(pin_dir, name)?, name)?;
            let owners: HashMap<u32, String> = route_names(pin_dir)?.into_iter().collect();
            let mut rows = Vec::new();
            for (slot, state) in (0u32..).zip(map.entries()) {
                if state.cookie != 0 {
                    let owner = owners.get(&state.route).map(String::as_str);
                    rows.push(conn_state_row(slot, &state, owner));
                }
            }
            json!(rows)
        }
        map_names::DNS_COUNTERS => dump_dns_counters(pin_dir)?,
        map_names::DNS_INFLIGHT => {
            let map = mapped::<DnsInFlight>(open(pin_dir, name)?, name)?;
            let now = monotonic_ns();
            let mut rows = Vec::new();
            for (slot, entry) in (0u32..).zip(map.entries()) {
                if entry.start_ns != 0 {
                    rows.push(json!({
                        "slot": slot, "clientFingerprint": format!("{:08x}", entry.client),
                        "clientPort": entry.client_port, "id": entry.id,
                        "startNs": entry.start_ns & !DNS_QUESTION_TAG_MASK,
                        "questionTag": entry.start_ns & DNS_QUESTION_TAG_MASK,
                        // Past the answer timeout: free for the next query of its set, which
                        // counts it unanswered.
                        "givenUp": dns_query_given_up(now, entry.start_ns),
                    }));
                }
            }
            json!(rows)
        }
        map_names::DNS_UPSTREAM => dump_upstream(pin_dir)?,
        // Whether they are set, not the keys: what a name hashes to is not for the screen.
        map_names::DNS_NAME_KEYS => json!({
            "set": array::<DnsNameKeys>(open(pin_dir, name)?)?.get(&0, 0)?.is_set()
        }),
        map_names::DNS_UPSTREAM_LATEST => json!({
            "latestUpstreamNs": array::<u64>(open(pin_dir, name)?)?.get(&0, 0)?
        }),
        map_names::SNI_COUNTERS
        | map_names::SNI_DECISIONS
        | map_names::SNI_RESUME
        | map_names::SNI_ROUTES
        | map_names::SNI_PORT_BITS => dump_server_names(pin_dir, name)?,
        map_names::LOCAL_ADDRESSES => dump_local_addresses(pin_dir)?,
        // Not from the command line, which takes only these names (`name_parser`).
        _ => bail!(
            "no map {name}: the pinned maps are {}, and {} are read through the programs",
            PINNED_MAPS.join(", "),
            LINKED_MAPS.join(", ")
        ),
    })
}

/// Log2 buckets of microseconds ([`collector_common::duration_bucket`]), those not empty by
/// their upper bound (`lt_4us`: from 2 to 4 µs, the first also under 1 µs; the last,
/// open-ended, `longer`): the bounds of the histograms `/metrics` shows, in one shape for
/// connection durations and DNS latency.
fn log2_us_buckets(counts: &[u64]) -> serde_json::Map<String, Value> {
    let last = counts.len().saturating_sub(1);
    counts
        .iter()
        .enumerate()
        .filter(|&(_, &count)| count != 0)
        .map(|(bucket, &count)| {
            let key = if bucket == last {
                "longer".to_owned()
            } else {
                format!("lt_{}us", 1u64 << (bucket + 1))
            };
            (key, json!(count))
        })
        .collect()
}

/// The maps of routes told apart by server name: the counters per slot, the decisions
/// (socket storage, which cannot be dumped), the names by port and the shared ports.
fn dump_server_names(pin_dir: &Path, name: &str) -> anyhow::Result<Value> {
    Ok(match name {
        map_names::SNI_COUNTERS => {
            let map = per_cpu::<SniCounters>(open(pin_dir, name)?)?;
            owned_rows(pin_dir, |slot| {
                Ok(sni_counters_fields(&sum_server_names(&map, slot)?))
            })?
        }
        // Opened all the same: a pin missing is an error, as with the other maps.
        map_names::SNI_DECISIONS | map_names::SNI_RESUME => {
            open(pin_dir, name)?;
            json!({ "note": storage_note(name) })
        }
        map_names::SNI_ROUTES => match linked_map(pin_dir, name, size_of::<u32>())? {
            None => json!([]),
            Some(data) => {
                let map: aya::maps::HashMap<MapData, SniKey, u32> =
                    aya::maps::HashMap::try_from(Map::from_map_data(data)?)?;
                let entries = map.iter().collect::<Result<Vec<_>, _>>()?;
                let owners: HashMap<u32, String> = route_names(pin_dir)?.into_iter().collect();
                sni_route_rows(entries, &owners)
            }
        },
        map_names::SNI_PORT_BITS => {
            let words = match linked_map(pin_dir, name, size_of::<u64>())? {
                None => Vec::new(),
                Some(data) => array::<u64>(data)?.iter().collect::<Result<Vec<_>, _>>()?,
            };
            json!({ "ports": bitmap_ports(&words) })
        }
        _ => bail!("{name} is no map of the routes by server name"),
    })
}

/// A slot's server-name counters: connections counted opened there by how their route was
/// decided, by outcome label, and those waiting for their ClientHello there.
fn sni_counters_fields(counters: &SniCounters) -> Value {
    let outcomes: serde_json::Map<String, Value> = SNI_OUTCOME_NAMES
        .iter()
        .zip(counters.outcomes)
        .map(|(name, count)| ((*name).to_owned(), json!(count)))
        .collect();
    json!({"outcomes": outcomes, "awaiting": counters.awaiting})
}

/// A server name as configured: a wildcard's key holds the name after its `*.`.
fn server_name(key: &SniKey) -> String {
    let len = usize::from(key.len).min(key.name.len());
    let host = String::from_utf8_lossy(&key.name[..len]);
    if key.wildcard == 0 {
        host.into_owned()
    } else {
        format!("*.{host}")
    }
}

/// The entries of `SNI_ROUTES` (port and name → slot + 1), by port and name, each with the
/// route its slot's owner is.
fn sni_route_rows(entries: Vec<(SniKey, u32)>, owners: &HashMap<u32, String>) -> Value {
    let mut rows: Vec<(u16, String, u32)> = entries
        .into_iter()
        .map(|(key, slot)| (key.port, server_name(&key), slot))
        .collect();
    rows.sort();
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|(port, name, stored)| {
            // Not `slot`: rows of one route's names would share a path in `maps watch`.
            let mut row = json!({"port": port, "serverName": name});
            if let Some(slot) = stored.checked_sub(1) {
                row["routeSlot"] = json!(slot);
                if let Some(owner) = owners.get(&slot) {
                    row["route"] = json!(owner);
                }
            }
            row
        })
        .collect();
    json!(rows)
}

/// The ports whose bits are set in a port bitmap (see `collector_common::port_bit`).
fn bitmap_ports(words: &[u64]) -> Vec<u16> {
    (0u32..)
        .zip(words)
        .flat_map(|(word, &bits)| {
            (0..64)
                .filter(move |bit| bits & (1u64 << bit) != 0)
                .map(move |bit| word * 64 + bit)
        })
        .filter_map(|port| u16::try_from(port).ok())
        .collect()
}

/// The addresses the classifiers count live traffic and DNS to and from, each in its slot,
/// and whether they are all of the namespace's (`complete`; while false, they count by port
/// alone). `complete` `null` and no addresses where no linked program keeps the table
/// (`all_namespaces`).
fn dump_local_addresses(pin_dir: &Path) -> anyhow::Result<Value> {
    let name = map_names::LOCAL_ADDRESSES;
    let Some(table) = linked_map(pin_dir, name, size_of::<[u64; 2]>())? else {
        return Ok(json!({"complete": null, "addresses": []}));
    };
    let mut addresses = Vec::new();
    for (slot, words) in (0u32..).zip(array::<[u64; 2]>(table)?.iter()) {
        let words = words?;
        if words != [0, 0] {
            addresses
                .push(json!({"slot": slot, "address": crate::addresses::ip(words).to_string()}));
        }
    }
    // Its flag's name is cut to the same 15 characters in the kernel: told apart by its size.
    let complete = match linked_map(
        pin_dir,
        map_names::LOCAL_ADDRESSES_COMPLETE,
        size_of::<u32>(),
    )? {
        Some(flag) => Some(array::<u32>(flag)?.get(&0, 0)? == 1),
        None => None,
    };
    Ok(json!({"complete": complete, "addresses": addresses}))
}

/// The map named `name` (as far as the kernel keeps of a name: 15 characters) with values of
/// `value_size` bytes, of the programs this pin directory's links hold: the configuration
/// maps are not pinned, and live as long as a program uses them. `None` where no linked
/// program uses one (the server name reader is attached only with routes by name); an error
/// where there are no links (no collector running, nor one crashed, with this `pin_dir`).
fn linked_map(pin_dir: &Path, name: &str, value_size: usize) -> anyhow::Result<Option<MapData>> {
    let kernel_name = &name[..name.len().min(KERNEL_NAME_LEN)];
    let links_dir = paths::map_pin_dir(pin_dir).join(loader::LINKS_DIR);
    let no_links = || {
        anyhow::anyhow!(
            "no links pinned under {}, whose programs hold {name} (is a collector running, or \
             did one crash, with this pin_dir?)",
            links_dir.display()
        )
    };
    // Not `is_dir`, which takes a refusal (bpffs is root's alone) for absence.
    if !paths::pin_exists(&links_dir)? {
        return Err(no_links());
    }
    let mut programs = HashSet::new();
    for (_, path, link) in loader::open_link_pins(&links_dir, |_| true)? {
        programs.insert(
            bpf_sys::link_program_id(link.as_fd())
                .with_context(|| format!("reading the link {}", path.display()))?,
        );
    }
    if programs.is_empty() {
        return Err(no_links());
    }
    for program in aya::programs::loaded_programs() {
        let program = program.map_err(anyhow::Error::from).map_err(|err| {
            // By id: the kernel lets only CAP_SYS_ADMIN walk its programs.
            let why = if privileges::denied_in(&err) {
                format!(
                    ": permission denied: {name} is read through the running programs, which \
                     needs CAP_SYS_ADMIN (the container's BPF, PERFMON and NET_ADMIN are not \
                     enough): run it as root on the host"
                )
            } else {
                String::new()
            };
            err.context(format!("listing the loaded programs{why}"))
        })?;
        if !programs.contains(&program.id()) {
            continue;
        }
        for id in program.map_ids()?.unwrap_or_default() {
            let map = MapData::from_id(id)?;
            let info = map.info()?;
            if info.name_as_str() == Some(kernel_name)
                && usize::try_from(info.value_size()) == Ok(value_size)
            {
                return Ok(Some(map));
            }
        }
    }
    Ok(None)
}

/// What the kernel keeps of an object's name (`BPF_OBJ_NAME_LEN` less its NUL).
const KERNEL_NAME_LEN: usize = 15;

/// Slots hold when the host last asked an upstream for a name and type hashed there
/// (monotonic ns); the names themselves are not kept.
fn dump_upstream(pin_dir: &Path) -> anyhow::Result<Value> {
    let map = array::<u64>(open(pin_dir, map_names::DNS_UPSTREAM)?)?;
    let mut rows = Vec::new();
    for (slot, stamp) in (0u32..).zip(map.iter()) {
        let stamp = stamp?;
        if stamp != 0 {
            rows.push(json!({"slot": slot, "askedNs": stamp}));
        }
    }
    Ok(json!(rows))
}

fn dump_traffic(pin_dir: &Path) -> anyhow::Result<Value> {
    let name = map_names::ROUTE_TRAFFIC;
    let map = per_cpu::<TrafficCounters>(open(pin_dir, name)?)?;
    let mut rows = Vec::new();
    for (slot, owner) in route_names(pin_dir)? {
        for (dir, direction) in [(DIR_IN, "in"), (DIR_OUT, "out")] {
            let t = sum_traffic(&map, traffic_index(slot, dir))?;
            rows.push(slot_row(
                slot,
                &owner,
                json!({
                    "direction": direction, "packets": t.packets, "bytes": t.bytes,
                    "payloadBytes": t.payload_bytes,
                }),
            ));
        }
    }
    Ok(json!(rows))
}

fn dump_dns_counters(pin_dir: &Path) -> anyhow::Result<Value> {
    let name = map_names::DNS_COUNTERS;
    let map = per_cpu::<DnsCounters>(open(pin_dir, name)?)?;
    let c = sum_dns(map.get(&0, 0)?.iter());
    let named = |names: &[&str], counts: &[u64]| -> serde_json::Map<String, Value> {
        names
            .iter()
            .zip(counts)
            .filter(|&(_, &n)| n > 0)
            .map(|(name, &n)| ((*name).to_owned(), json!(n)))
            .collect()
    };
    let qtypes: serde_json::Map<String, Value> = (0u32..)
        .zip(c.queries_by_qtype)
        .filter(|&(_, n)| n > 0)
        .map(|(slot, n)| (qtype_name(slot), json!(n)))
        .collect();
    Ok(json!({
        "queriesByQtype": qtypes,
        "queriesByOpcode": named(&OPCODE_NAMES, &c.queries_by_opcode),
        "queriesByQclass": named(&QCLASS_NAMES, &c.queries_by_qclass),
        "responsesByRcode": named(&RCODE_NAMES, &c.responses_by_rcode),
        "malformed": named(&DNS_MALFORMED_NAMES, &c.malformed),
        "latencyBuckets": log2_us_buckets(&c.latency),
        "latencyNs": c.latency_ns,
        "responsesTruncated": c.responses_truncated,
        "answered": c.answered,
        "unmatchedResponses": c.unmatched_responses,
        "duplicateQueries": c.duplicate_queries,
        "untrackedQueries": c.untracked_queries,
        "unansweredQueries": c.unanswered_queries,
        "cacheHits": c.cache_hits,
        "cacheMisses": c.cache_misses,
        "cacheUndecided": c.cache_undecided,
        "upstreamQueries": c.upstream_queries,
        "eventsDropped": c.events_dropped,
        "queriesUnmatched": c.queries_unmatched,
    }))
}

/// Every number in a dump, by its path (`slot0.opened`, `queriesByQtype.A`), in order. Rows
/// that carry a slot (routes, `CONN_STATE`, `DNS_INFLIGHT`) go by it (`slot17.startNs`), not
/// by their place in the list, which shifts whenever an earlier row goes: a rate would then
/// compare two different entries; the slot itself is left out of the numbers. `ROUTE_TRAFFIC`
/// has a row per slot and direction, which go by both (`slot0.in.packets`,
/// `slot0.out.packets`). Numbers stay as read: through an f64 a counter over 2^53 (a route's
/// bytes after months at 10 Gbit/s) would show rounded.
#[must_use]
pub fn flatten(value: &Value) -> Vec<(String, Number)> {
    fn walk(value: &Value, path: String, out: &mut Vec<(String, Number)>) {
        match value {
            Value::Number(n) => out.push((path, n.clone())),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let slot = item.get("slot").and_then(Value::as_u64);
                    let direction = item.get("direction").and_then(Value::as_str);
                    let key = match (slot, direction) {
                        (Some(slot), Some(direction)) => format!("slot{slot}.{direction}"),
                        (Some(slot), None) => format!("slot{slot}"),
                        (None, _) => i.to_string(),
                    };
                    let row = join(&path, &key);
                    match (slot, item) {
                        // The slot is in the path: not a number to watch.
                        (Some(_), Value::Object(fields)) => {
                            for (name, field) in fields.iter().filter(|(name, _)| *name != "slot") {
                                walk(field, join(&row, name), out);
                            }
                        }
                        _ => walk(item, row, out),
                    }
                }
            }
            Value::Object(map) => {
                for (key, item) in map {
                    walk(item, join(&path, key), out);
                }
            }
            _ => {}
        }
    }
    fn join(path: &str, key: &str) -> String {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    }
    let mut out = Vec::new();
    walk(value, String::new(), &mut out);
    out
}

/// Fields that name or time something rather than count it: a change per second of a
/// cookie, a query id or a start time is noise (a slot taken by another connection read as
/// billions a second). Gauges too (`connecting`, `awaiting`): they go down without a reset.
const NOT_COUNTED: &[&str] = &[
    "askedNs",
    "awaiting",
    "clientFingerprint",
    "clientPort",
    "connecting",
    "cookie",
    "id",
    "latestUpstreamNs",
    "layout",
    "netnsCookie",
    "port",
    "ports",
    "questionTag",
    "routeSlot",
    "startNs",
];

/// Whether the number at `path` (as [`flatten`] names it) counts something.
fn counts(path: &str) -> bool {
    !path
        .split('.')
        .any(|segment| NOT_COUNTED.contains(&segment))
}

/// One refresh of `maps watch`: its numbers by path, for the next one's rates. A hash map: a
/// dump of the connection table holds a row of five numbers per slot in use (65,536 slots by
/// default), and a search of
/// the previous list for each number took quadratic time.
struct Refresh {
    at: Instant,
    values: HashMap<String, Number>,
    /// The map's dump leaves counts of 0 out (`DNS_COUNTERS`' codes and buckets,
    /// `CONN_DURATIONS`): a path missing from it was 0.
    absent_is_zero: bool,
}

impl Refresh {
    /// `value`'s change per second since this refresh, if `path` had a number then that
    /// was not more: a count that went down was reset (the pins made anew by a restart, a
    /// slot given to another route), and its change says nothing.
    fn per_second(&self, path: &str, value: &Number, now: Instant) -> Option<f64> {
        let zero = Number::from(0u64);
        let old = match self.values.get(path) {
            Some(old) => old,
            None if self.absent_is_zero => &zero,
            None => return None,
        };
        // Counters subtract as integers: as f64s, two reads over 2^53 lose their difference.
        #[expect(
            clippy::cast_precision_loss,
            reason = "a change per second, shown to 0.1"
        )]
        let change = if let (Some(value), Some(old)) = (value.as_u64(), old.as_u64()) {
            value.checked_sub(old)? as f64
        } else {
            let (value, old) = (value.as_f64()?, old.as_f64()?);
            (value >= old).then_some(value - old)?
        };
        Some(change / now.duration_since(self.at).as_secs_f64())
    }
}

/// One row of `maps watch`, in columns. The value goes through a string: a JSON number
/// writes itself whole, ignoring the width.
fn watch_line(path: &str, value: &Number, rate: &str) -> String {
    let value = value.to_string();
    format!("{path:<40} {value:>16} {rate:>14}")
}

/// `maps watch NAME`: the map's numbers every `interval`, each with its change per second
/// since the previous refresh; `count` refreshes, or until interrupted. The first read that
/// fails ends it (a pin directory without the map); a later one (the pins gone while the agent
/// restarts) is said on standard error, once until it reads again or fails otherwise, and
/// counts as a refresh: a watch bounded by `count` ends, with an error if its last failed.
pub fn watch(
    pin_dir: &Path,
    name: &str,
    interval: std::time::Duration,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let absent_is_zero = matches!(name, map_names::DNS_COUNTERS | map_names::CONN_DURATIONS);
    let mut previous: Option<Refresh> = None;
    let mut refreshes = 0u64;
    let mut failing: Option<String> = None;
    // Refreshes keep their pace whatever a dump takes (a full connection table's is long).
    let mut due = Instant::now();
    loop {
        let now = Instant::now();
        let read_at_ms = crate::clock::unix_ms();
        let read = dump(pin_dir, name);
        refreshes += 1;
        let last = count.is_some_and(|count| refreshes >= count);
        let values = match read {
            Ok(value) => flatten(&value),
            Err(err) if previous.is_none() => return Err(err),
            Err(err) => {
                if output::reader_gone() {
                    return Err(output::ReaderGone.into());
                }
                if last {
                    return Err(err.context(format!("the last refresh of {name} failed")));
                }
                let said = format!("{err:#}");
                if failing.as_ref() != Some(&said) {
                    let _ = writeln!(
                        io::stderr(),
                        "reading {name} failed: {said}\ntrying again every {:.1} s (Ctrl-C to stop)",
                        interval.as_secs_f64()
                    );
                    failing = Some(said);
                }
                crate::clock::sleep_until_due(&mut due, interval);
                continue;
            }
        };
        if failing.take().is_some() {
            let _ = writeln!(io::stderr(), "reading {name} again");
        }
        output::write(|out| {
            if std::io::stdout().is_terminal() {
                // Clear the screen and home the cursor, like watch(1).
                write!(out, "\x1b[2J\x1b[H")?;
            } else if refreshes > 1 {
                // Into a file or a pipe: refreshes one after another.
                writeln!(out)?;
            }
            // The time of the read: a view written into a file says when it was taken.
            writeln!(
                out,
                "{name} every {:.1} s, {}",
                interval.as_secs_f64(),
                crate::clock::time_of_day_utc(read_at_ms)
            )?;
            writeln!(out, "{:<40} {:>16} {:>14}", "FIELD", "VALUE", "PER SECOND")?;
            for (path, value) in &values {
                let rate = previous
                    .as_ref()
                    .filter(|_| counts(path))
                    .and_then(|previous| previous.per_second(path, value, now));
                let rate = rate.map_or_else(|| "-".to_owned(), |r| format!("{r:.1}"));
                writeln!(out, "{}", watch_line(path, value, &rate))?;
            }
            Ok(())
        })?;
        previous = Some(Refresh {
            at: now,
            values: values.into_iter().collect(),
            absent_is_zero,
        });
        if last {
            return Ok(());
        }
        crate::clock::sleep_until_due(&mut due, interval);
    }
}

/// `maps list` as a table for people.
pub fn print_list(out: &mut impl Write, rows: &[MapRow]) -> io::Result<()> {
    // As wide as the longest name (DNS_UPSTREAM_LATEST), so the columns stay in line.
    let width = rows
        .iter()
        .map(|row| row.name.len())
        .max()
        .unwrap_or(0)
        .max(16);
    writeln!(
        out,
        "{:<width$} {:<14} {:>5} {:>6} {:>9} {:>8}",
        "NAME", "TYPE", "KEY", "VALUE", "CAPACITY", "IN USE"
    )?;
    for row in rows {
        let in_use = row.in_use.map_or_else(|| "-".to_owned(), |n| n.to_string());
        writeln!(
            out,
            "{:<width$} {:<14} {:>5} {:>6} {:>9} {:>8}",
            row.name, row.kind, row.key_size, row.value_size, row.capacity, in_use
        )?;
    }
    // Under the table, where they leave its columns alone.
    for row in rows {
        if let Some(note) = &row.note {
            writeln!(out, "{}: {note}", row.name)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command line upper-cases the name it is given (`name_parser`): a map named
    /// otherwise could not be reached.
    #[test]
    fn every_map_the_command_line_takes_is_named_in_upper_case() {
        for name in PINNED_MAPS.into_iter().chain(LINKED_MAPS) {
            assert_eq!(name, name.to_ascii_uppercase());
        }
    }

    #[test]
    fn log2_buckets_are_named_by_their_upper_bound_and_empty_ones_left_out() {
        let mut dns = [0u64; collector_common::DURATION_BUCKETS as usize];
        dns[0] = 3;
        dns[9] = 1;
        dns[31] = 2;
        assert_eq!(
            Value::Object(log2_us_buckets(&dns)),
            json!({"lt_2us": 3, "lt_1024us": 1, "longer": 2})
        );
        // Connection durations: the same names, more of them.
        let mut durations = [0u64; collector_common::CONN_DURATION_BUCKETS as usize];
        durations[31] = 5;
        durations[39] = 1;
        assert_eq!(
            Value::Object(log2_us_buckets(&durations)),
            json!({"lt_4294967296us": 5, "longer": 1})
        );
        assert!(log2_us_buckets(&[0; 4]).is_empty());
    }

    #[test]
    fn slots_are_shown_by_their_owner_a_route_or_an_upstream() {
        let upstream = crate::loader::upstream_slot_owner("app");
        assert_eq!(slot_owner(&upstream), ("upstream", "app"));
        assert_eq!(slot_owner("web"), ("route", "web"));
        assert_eq!(
            slot_row(1, &upstream, json!({"connectFailures": 2})),
            json!({"slot": 1, "upstream": "app", "connectFailures": 2})
        );
        assert_eq!(
            slot_row(0, "web", json!({})),
            json!({"slot": 0, "route": "web"})
        );
        // The owner is text, not a number to watch.
        assert_eq!(
            flatten(&json!([slot_row(
                1,
                &upstream,
                json!({"connectFailures": 2})
            )])),
            [("slot1.connectFailures".to_owned(), 2.into())]
        );
    }

    #[test]
    fn connections_in_the_table_show_whose_they_are_and_their_flags() {
        let mut state = ConnState {
            cookie: 77,
            start_ns: 5,
            route: 1,
            flags: conn_flags::UPSTREAM | conn_flags::CONNECTING,
            client_port: 9000,
            ..ConnState::default()
        };
        state.client_addr[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 5]);
        assert_eq!(
            conn_state_row(40, &state, Some("upstream/app")),
            json!({
                "slot": 40, "cookie": 77, "routeSlot": 1, "upstream": "app",
                "backend": "10.0.0.5:9000", "flags": ["UPSTREAM", "CONNECTING"], "startNs": 5,
            })
        );
        state.flags = conn_flags::FIN_IN | conn_flags::FIN_OUT | conn_flags::FIN_WAIT2_SEEN;
        state.client_port = 40_000;
        state.route = 0;
        assert_eq!(
            conn_state_row(41, &state, Some("web")),
            json!({
                "slot": 41, "cookie": 77, "routeSlot": 0, "route": "web",
                "client": "10.0.0.5:40000", "flags": ["FIN_IN", "FIN_OUT", "FIN_WAIT2_SEEN"],
                "startNs": 5,
            })
        );
        // A slot without a recorded owner; a flag of a newer build.
        state.flags = 0x80 | conn_flags::UPSTREAM;
        let row = conn_state_row(42, &state, None);
        assert_eq!(row["flags"], json!(["UPSTREAM", "0x80"]));
        assert!(
            row.get("route").is_none() && row.get("upstream").is_none(),
            "{row}"
        );
        assert_eq!(flag_names(0), Vec::<String>::new());
    }

    #[test]
    fn the_map_list_keeps_its_columns_in_line_with_long_names() {
        let row = |name, in_use| MapRow {
            name,
            kind: "PerCpuArray".to_owned(),
            key_size: 4,
            value_size: 8,
            capacity: 256,
            in_use,
            note: None,
        };
        let mut text = Vec::new();
        print_list(
            &mut text,
            &[
                row(map_names::ROUTE_NAMES, Some(2)),
                row(map_names::UPSTREAM_COUNTERS, None),
            ],
        )
        .unwrap();
        let text = String::from_utf8(text).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let column = |line: &str| line.find("PerCpuArray").or_else(|| line.find("TYPE"));
        assert_eq!(column(lines[0]), column(lines[1]), "{text}");
        assert_eq!(column(lines[1]), column(lines[2]), "{text}");
        assert!(
            lines.iter().all(|line| line.len() == lines[0].len()),
            "{text}"
        );
    }

    #[test]
    fn socket_storage_is_listed_with_a_note_under_the_table() {
        let row = |name, kind: &str, note| MapRow {
            name,
            kind: kind.to_owned(),
            key_size: 4,
            value_size: 8,
            capacity: 0,
            in_use: None,
            note,
        };
        let rows = [
            row(
                map_names::SNI_DECISIONS,
                "SkStorage",
                Some(SOCKET_STORAGE.to_owned()),
            ),
            row(map_names::SNI_COUNTERS, "PerCpuArray", None),
        ];
        let mut text = Vec::new();
        print_list(&mut text, &rows).unwrap();
        let text = String::from_utf8(text).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[..3].iter().all(|line| line.len() == lines[0].len()),
            "{text}"
        );
        assert!(
            lines[3].starts_with("SNI_DECISIONS: socket storage: a value per socket")
                && lines[3].contains("cannot be listed or dumped"),
            "{text}"
        );
        let json = serde_json::to_value(&rows).unwrap();
        assert_eq!(json[0]["note"], SOCKET_STORAGE);
        assert!(json[1].get("note").is_none(), "{json}");
    }

    #[test]
    fn server_name_counters_dump_every_outcome_by_its_label() {
        let mut counters = SniCounters {
            awaiting: 2,
            ..SniCounters::default()
        };
        counters.outcomes[collector_common::sni_outcome::NO_NAME as usize] = 5;
        counters.outcomes[collector_common::sni_outcome::MISSED as usize] = 1;
        let row = slot_row(2, "tls", sni_counters_fields(&counters));
        assert_eq!(
            row,
            json!({
                "slot": 2, "route": "tls", "awaiting": 2,
                "outcomes": {
                    "matched": 0, "unknown_name": 0, "no_name": 5, "not_tls": 0,
                    "incomplete": 0, "malformed": 0, "no_data": 0, "missed": 1,
                },
            })
        );
        let paths = flatten(&json!([row]));
        assert!(
            paths.contains(&("slot2.outcomes.no_name".to_owned(), 5.into()))
                && paths.contains(&("slot2.awaiting".to_owned(), 2.into())),
            "{paths:?}"
        );
    }

    #[test]
    fn server_names_dump_by_port_and_name_with_their_route() {
        let owners: HashMap<u32, String> = [(2, "tls".to_owned()), (3, "api".to_owned())]
            .into_iter()
            .collect();
        let entries = vec![
            (SniKey::new(8443, false, b"api.example.com"), 4),
            (SniKey::new(443, true, b"api.example.com"), 4),
            (SniKey::new(443, false, b"api.example.com"), 4),
            // A slot no route owns (a config changed since), and a value that is no slot.
            (SniKey::new(443, false, b"old.example.com"), 8),
            (SniKey::new(443, false, b"zero.example.com"), 0),
        ];
        assert_eq!(
            sni_route_rows(entries, &owners),
            json!([
                {"port": 443, "serverName": "*.api.example.com", "routeSlot": 3, "route": "api"},
                {"port": 443, "serverName": "api.example.com", "routeSlot": 3, "route": "api"},
                {"port": 443, "serverName": "old.example.com", "routeSlot": 7},
                {"port": 443, "serverName": "zero.example.com"},
                {"port": 8443, "serverName": "api.example.com", "routeSlot": 3, "route": "api"},
            ])
        );
        // A name of the longest length the key holds.
        let long = [b'a'; 253];
        assert_eq!(server_name(&SniKey::new(443, false, &long)).len(), 253);
    }

    #[test]
    fn shared_ports_are_read_from_their_bits() {
        let mut words = vec![0u64; collector_common::PORT_BITMAP_WORDS as usize];
        for port in [0u16, 443, 8443, u16::MAX] {
            let (word, bit) = collector_common::port_bit(port);
            words[word as usize] |= bit;
        }
        assert_eq!(bitmap_ports(&words), [0, 443, 8443, u16::MAX]);
        assert!(bitmap_ports(&[0; 4]).is_empty());
    }

    #[test]
    fn connections_waiting_for_their_hello_are_flagged_by_name() {
        assert_eq!(
            flag_names(conn_flags::BY_NAME | conn_flags::FIN_IN),
            ["FIN_IN", "BY_NAME"]
        );
    }

    #[test]
    fn a_refresh_gives_each_number_its_change_per_second() {
        let then = Instant::now();
        let refresh = Refresh {
            at: then,
            values: flatten(&json!([{"opened": 10, "closed": 4}]))
                .into_iter()
                .collect(),
            absent_is_zero: false,
        };
        let now = then + std::time::Duration::from_secs(2);
        assert_eq!(refresh.per_second("0.opened", &30.into(), now), Some(10.0));
        assert_eq!(refresh.per_second("0.closed", &4.into(), now), Some(0.0));
        // A row new since then has no rate yet.
        assert_eq!(refresh.per_second("1.opened", &3.into(), now), None);
        // A count that went down was reset (the agent restarted): no rate, not a negative one.
        assert_eq!(refresh.per_second("0.opened", &2.into(), now), None);
    }

    #[test]
    fn a_count_first_seen_in_a_dump_that_leaves_zeros_out_has_its_rate_from_zero() {
        let then = Instant::now();
        let refresh = Refresh {
            at: then,
            values: flatten(&json!({"responsesByRcode": {"NOERROR": 10}}))
                .into_iter()
                .collect(),
            absent_is_zero: true,
        };
        let now = then + std::time::Duration::from_secs(2);
        // The first SERVFAIL burst: 8 in 2 s, where it was 0 (left out).
        assert_eq!(
            refresh.per_second("responsesByRcode.SERVFAIL", &8.into(), now),
            Some(4.0)
        );
        assert_eq!(
            refresh.per_second("responsesByRcode.NOERROR", &10.into(), now),
            Some(0.0)
        );
    }

    #[test]
    fn dumps_flatten_to_paths() {
        let value = json!([{"route": "web", "opened": 3, "closed": 2}, {"x": {"y": 1.5}}]);
        assert_eq!(
            flatten(&value),
            [
                ("0.closed".to_owned(), 2.into()),
                ("0.opened".to_owned(), 3.into()),
                ("1.x.y".to_owned(), Number::from_f64(1.5).unwrap())
            ]
        );
    }

    #[test]
    fn watch_rows_keep_their_columns() {
        let row = watch_line("slot0.opened", &12.into(), "3.0");
        assert_eq!(row.len(), 40 + 1 + 16 + 1 + 14, "{row:?}");
        assert!(row.ends_with("              12            3.0"), "{row:?}");
    }

    #[test]
    fn counters_past_2_to_the_53_show_whole_with_their_exact_change() {
        let big = (1u64 << 60) + 1;
        let values = flatten(&json!({"bytes": big}));
        assert_eq!(values[0].1.to_string(), "1152921504606846977");
        let then = Instant::now();
        let refresh = Refresh {
            at: then,
            values: values.into_iter().collect(),
            absent_is_zero: false,
        };
        // 3 more bytes: as f64s both reads are 2^60, and the change 0.
        let now = then + std::time::Duration::from_secs(1);
        assert_eq!(
            refresh.per_second("bytes", &(big + 3).into(), now),
            Some(3.0)
        );
    }

    #[test]
    fn only_counters_get_a_change_per_second() {
        for counted in [
            "slot41.bytesIn",
            "slot0.in.packets",
            "queriesByQtype.A",
            "0.opened",
        ] {
            assert!(counts(counted), "{counted}");
        }
        for named in [
            "slot41.cookie",
            "slot41.startNs",
            "slot41.routeSlot",
            "slot7.id",
            "slot7.clientPort",
            "0.netnsCookie",
            "ports.3",
            "slot1.connecting",
            "slot2.awaiting",
        ] {
            assert!(!counts(named), "{named}");
        }
    }

    #[test]
    fn table_rows_keep_their_slot_when_an_earlier_row_goes() {
        let before = flatten(&json!([{"slot": 3, "startNs": 10}, {"slot": 9, "startNs": 20}]));
        let after = flatten(&json!([{"slot": 9, "startNs": 20}]));
        let slot9 = ("slot9.startNs".to_owned(), Number::from(20));
        assert!(
            before.contains(&slot9) && after.contains(&slot9),
            "{before:?} {after:?}"
        );
    }

    #[test]
    fn traffic_rows_go_by_slot_and_direction() {
        let traffic = json!([
            {"slot": 0, "route": "web", "direction": "in", "packets": 10, "bytes": 1000},
            {"slot": 0, "route": "web", "direction": "out", "packets": 7, "bytes": 9000},
        ]);
        let then = Instant::now();
        let refresh = Refresh {
            at: then,
            values: flatten(&traffic).into_iter().collect(),
            absent_is_zero: false,
        };
        let now = then + std::time::Duration::from_secs(1);
        let values = flatten(&json!([
            {"slot": 0, "route": "web", "direction": "in", "packets": 15, "bytes": 1500},
            {"slot": 0, "route": "web", "direction": "out", "packets": 8, "bytes": 9100},
        ]));
        let rates: Vec<_> = values
            .iter()
            .map(|(path, value)| (path.as_str(), refresh.per_second(path, value, now)))
            .collect();
        assert_eq!(
            rates,
            [
                ("slot0.in.bytes", Some(500.0)),
                ("slot0.in.packets", Some(5.0)),
                ("slot0.out.bytes", Some(100.0)),
                ("slot0.out.packets", Some(1.0)),
            ]
        );
    }
}
