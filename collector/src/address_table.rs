//! `LOCAL_ADDRESSES`, the kernel's table of this namespace's addresses, kept by the agent:
//! where each address goes (a slot of either of its two sets, moving others to make room),
//! and bringing the kernel's table to what [`crate::addresses`] lists, when it changes.

use std::{
    collections::{BTreeSet, HashMap, VecDeque, hash_map},
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use collector_common::{
    LOCAL_ADDRESS_WAYS, local_address_set_bits, local_address_sets, local_address_slots, map_names,
};

use crate::addresses::{self, ChangeSignal, ChangeWatch, Changes};

/// The agent's copy of `LOCAL_ADDRESSES`, and where each address goes: a free slot of
/// either of its two sets.
#[derive(Debug)]
pub struct AddressTable {
    slots: Vec<[u64; 2]>,
    /// Slots in use, kept as they change (read at every poll for the metrics).
    placed: usize,
    set_bits: u32,
    /// Every slot is to be written at the next placement.
    rewrite_all: bool,
}

/// Slots one address's search for room looks at, at most: at 90 % fill a free one is
/// about three moves away.
const SEARCH: usize = 512;
/// Slots all the searches of one placement look at, at most. Without it a table already
/// full searched 4,096 slots for each address that did not fit, at every sync (a second for
/// 5,000 of them); with it, 70,000 addresses in 65,536 slots take 25 ms a sync here.
const SEARCH_PER_SYNC: usize = 1 << 18;

/// What [`AddressTable::place`] changed, for the kernel's table, and what did not fit.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// (slot, value) to write, frees first.
    pub writes: Vec<(u32, [u64; 2])>,
    /// Addresses with both sets full: not in the table.
    pub unplaced: Vec<[u64; 2]>,
    /// The searches used up [`SEARCH_PER_SYNC`]: some of `unplaced` may fit at the next
    /// placement.
    pub searched_out: bool,
    /// Addresses that found a slot.
    pub newly_placed: usize,
}

impl AddressTable {
    #[must_use]
    pub fn new(slots: u32, set_bits: u32) -> Self {
        Self {
            slots: vec![[0, 0]; slots as usize],
            placed: 0,
            set_bits,
            rewrite_all: false,
        }
    }

    /// Brings the table to `now`: frees the slots of addresses gone, then places the new
    /// ones, moving placed ones to their other set where that makes room (as a cuckoo hash
    /// does: with two sets of four to choose from, the table fills past 90 % before one is
    /// turned away, where without moving it did at 45 %).
    pub fn place(&mut self, now: &BTreeSet<[u64; 2]>) -> Placement {
        let mut placement = Placement::default();
        for (index, slot) in (0..).zip(self.slots.iter_mut()) {
            if *slot != [0, 0] && !now.contains(slot) {
                *slot = [0, 0];
                self.placed -= 1;
                placement.writes.push((index, [0, 0]));
            }
        }
        let mut budget = SEARCH_PER_SYNC;
        for &address in now {
            if self
                .ways(address)
                .any(|index| self.held(index) == Some(address))
            {
                continue;
            }
            match self.path_to_free_slot(address, &mut budget) {
                Some(path) => {
                    self.move_along(&path, address, &mut placement.writes);
                    placement.newly_placed += 1;
                }
                None => placement.unplaced.push(address),
            }
        }
        placement.searched_out = budget == 0;
        if std::mem::take(&mut self.rewrite_all) {
            placement.writes = (0..).zip(self.slots.iter().copied()).collect();
        }
        placement
    }

    /// The addresses the table holds.
    pub fn addresses(&self) -> impl Iterator<Item = [u64; 2]> + '_ {
        self.slots.iter().copied().filter(|&slot| slot != [0, 0])
    }

    /// Slots in use.
    #[must_use]
    pub fn placed(&self) -> usize {
        self.placed
    }

    /// Slots in all.
    #[must_use]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// After a failed write, when what the kernel's table holds is not known: the next
    /// placement writes every slot.
    pub fn rewrite_all(&mut self) {
        self.rewrite_all = true;
    }

    /// The eight slots `address` may take: the four of each of its two sets.
    fn ways(&self, address: [u64; 2]) -> impl Iterator<Item = u32> + Clone + use<> {
        let [first, second] = local_address_sets(address, self.set_bits);
        let sets = if first == second { 1 } else { 2 };
        [first, second]
            .into_iter()
            .take(sets)
            .flat_map(|set| set..set + LOCAL_ADDRESS_WAYS)
    }

    /// The shortest chain of slots, found breadth first, whose last is free: `address`
    /// takes the first, and each slot's holder moves to the next, one of its own ways.
    /// Each slot looked at beyond the address's own takes one from `budget`, and the
    /// search stops at [`SEARCH`] of them: a table that is full costs a bounded time per
    /// sync, not a search of the table per address that does not fit.
    fn path_to_free_slot(&self, address: [u64; 2], budget: &mut usize) -> Option<Vec<u32>> {
        let mut parent: HashMap<u32, Option<u32>> = HashMap::new();
        let mut queue = VecDeque::new();
        for index in self.ways(address) {
            parent.entry(index).or_insert(None);
            queue.push_back(index);
        }
        while let Some(index) = queue.pop_front() {
            let holder = self.slots[index as usize];
            if holder == [0, 0] {
                let mut path = vec![index];
                let mut at = index;
                while let Some(Some(previous)) = parent.get(&at) {
                    path.push(*previous);
                    at = *previous;
                }
                path.reverse();
                return Some(path);
            }
            if parent.len() >= SEARCH || *budget == 0 {
                continue;
            }
            for next in self.ways(holder) {
                if let hash_map::Entry::Vacant(entry) = parent.entry(next) {
                    entry.insert(Some(index));
                    queue.push_back(next);
                    *budget = budget.saturating_sub(1);
                }
            }
        }
        None
    }

    /// Moves each holder along `path` one step on and puts `address` in its first slot. The
    /// writes go from the free end back: each holder is written to its new slot before its
    /// old one is overwritten, so the kernel never misses an address that stays.
    fn move_along(&mut self, path: &[u32], address: [u64; 2], writes: &mut Vec<(u32, [u64; 2])>) {
        for step in (1..path.len()).rev() {
            let holder = self.slots[path[step - 1] as usize];
            self.slots[path[step] as usize] = holder;
            writes.push((path[step], holder));
        }
        self.slots[path[0] as usize] = address;
        self.placed += 1;
        writes.push((path[0], address));
    }

    fn held(&self, index: u32) -> Option<[u64; 2]> {
        self.slots.get(index as usize).copied()
    }
}

/// What keeps `LOCAL_ADDRESSES` from holding every local address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Problem {
    /// An address found no slot.
    Full,
    /// A `local` route covers more than one address.
    WideRoute,
    /// Reading the addresses or writing the table failed.
    Failed,
}

/// What a sync found wrong, if anything, and whether to sync again at the next poll.
struct Synced {
    problem: Option<(Problem, String)>,
    again: bool,
    /// Changes interrupted every read: see [`LocalAddresses::sync`].
    interrupted: bool,
}

/// How full `LOCAL_ADDRESSES` is, and whether it holds every local address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressTableUse {
    pub placed: usize,
    pub slots: usize,
    pub complete: bool,
}

/// Keeps the kernel's `LOCAL_ADDRESSES` and its `LOCAL_ADDRESSES_COMPLETE` flag.
pub struct LocalAddresses {
    /// The agent's copy of the table.
    table: AddressTable,
    /// Announces changes of addresses and routes (`None`: none could be had; every poll
    /// reads them).
    watch: Option<ChangeWatch>,
    /// The addresses are to be read at the next poll: at the start, after a failure, after
    /// an interrupted read, while searches cut short place more.
    due: bool,
    /// What is wrong, if anything, and its kind (logged once per change of kind).
    problem: Option<(Problem, String)>,
    /// What `LOCAL_ADDRESSES_COMPLETE` holds: false (by port alone) until the first sync.
    complete: bool,
    /// The addresses of `extra_local_addresses`, always in the table.
    extra: BTreeSet<[u64; 2]>,
    /// The routes of type `local` of the tables other than `local`, as last read.
    other_tables: addresses::Local,
    /// They are to be read at the next sync: at the start, after one was announced, after
    /// an interrupted or failed read, and every [`OTHER_TABLES_MAX_AGE`].
    other_tables_due: bool,
    other_tables_read_at: Option<Instant>,
    /// Syncs in a row whose reads changes all interrupted.
    interrupted_syncs: u32,
}

/// How long a read of the other tables' `local` routes serves: the routes of a link that
/// goes away leave IPv4's tables unannounced, and without a watch nothing is announced.
const OTHER_TABLES_MAX_AGE: Duration = Duration::from_mins(5);
/// Syncs in a row with every read interrupted before the log says so: the flag may stay
/// off, and nothing is freed, until a read completes.
const INTERRUPTED_SYNCS_WARNED: u32 = 30;

impl LocalAddresses {
    /// A table sized for the addresses there are now, with room for seven times as many,
    /// and the watch on their changes, made before they are first read so that no change
    /// after it goes unseen.
    pub fn new(extra: &[(IpAddr, u8)]) -> anyhow::Result<Self> {
        let extra: BTreeSet<[u64; 2]> = extra
            .iter()
            .flat_map(|&(network, prefix)| addresses::range_keys(network, prefix))
            .collect();
        let watch = ChangeWatch::new()
            .inspect_err(|err| {
                tracing::warn!(
                    "no announcements of address changes ({err}): reading the addresses at every poll"
                );
            })
            .ok();
        let now = addresses::list().context("listing this namespace's addresses")?;
        let slots = local_address_slots(now.addresses.union(&extra).count());
        Ok(Self {
            table: AddressTable::new(slots, local_address_set_bits(slots)),
            watch,
            due: true,
            problem: None,
            complete: false,
            extra,
            other_tables: addresses::Local::default(),
            other_tables_due: true,
            other_tables_read_at: None,
            interrupted_syncs: 0,
        })
    }

    /// A signal of announced changes, to sync on them between polls (`None` without a watch,
    /// where every poll reads the addresses).
    pub fn change_signal(&self) -> Option<std::io::Result<ChangeSignal>> {
        self.watch.as_ref().map(ChangeWatch::signal)
    }

    /// Entries of the kernel's table, set at load.
    #[must_use]
    pub fn slots(&self) -> u32 {
        u32::try_from(self.table.len()).unwrap_or(u32::MAX)
    }

    #[must_use]
    pub fn usage(&self) -> AddressTableUse {
        AddressTableUse {
            placed: self.table.placed(),
            slots: self.table.len(),
            complete: self.complete,
        }
    }

    /// Brings the kernel's table up to this namespace's addresses and single-address local
    /// routes, at the start and after an announced change (at once, or at the next poll): on
    /// the interfaces, live traffic and DNS count packets to and from them only. While one
    /// does not fit, or a local route is wider than one address, or a sync failed, the table
    /// is marked incomplete and the port alone decides, as without it. A problem is logged when it starts or
    /// changes kind, not every second, and when it ends. Returns whether the watch announced
    /// a change of the links too (which `links::list` reads).
    pub fn refresh(&mut self, ebpf: &mut Ebpf) -> bool {
        // Without a watch every poll reads the addresses, and the other tables as they age.
        let changes = self.watch.as_mut().map_or(
            Changes {
                local: true,
                ..Changes::default()
            },
            ChangeWatch::changed,
        );
        self.sync_on(changes, ebpf);
        changes.links
    }

    /// [`Self::refresh`] once the changes are known.
    fn sync_on(&mut self, changes: Changes, ebpf: &mut Ebpf) {
        let aged = self
            .other_tables_read_at
            .is_none_or(|read_at| read_at.elapsed() >= OTHER_TABLES_MAX_AGE);
        self.other_tables_due |= changes.other_tables || aged;
        if !(changes.local || self.other_tables_due || self.due) {
            return;
        }
        let (problem, again, interrupted) = match self.sync(ebpf) {
            Ok(Synced {
                problem,
                again,
                interrupted,
            }) => (
                problem.map(|(kind, incomplete)| {
                    (
                        kind,
                        format!(
                            "counting live traffic and DNS on the interfaces by port alone, the \
                             host's forwarded packets included: {incomplete}"
                        ),
                    )
                }),
                again,
                interrupted,
            ),
            Err(err) => {
                let _ = self.set_complete(ebpf, false);
                let problem = (
                    Problem::Failed,
                    format!("the address table is not current, counting by port alone: {err:#}"),
                );
                (Some(problem), true, false)
            }
        };
        self.due = again;
        self.note_interruptions(interrupted);
        // An interrupted read that leaves the flag off ends no problem: it stands (and its
        // log line with it) until a read completes.
        if interrupted && problem.is_none() && !self.complete {
            return;
        }
        let kind = |problem: &Option<(Problem, String)>| problem.as_ref().map(|p| p.0);
        if kind(&problem) != kind(&self.problem) {
            if let Some((_, text)) = &problem {
                tracing::warn!("{text}");
            } else {
                tracing::info!("the address table holds every local address again");
            }
        }
        self.problem = problem;
    }

    /// Clears the flag for good: see [`crate::loader::Attachment::leave_addresses_to_the_ports`].
    pub fn leave_to_the_ports(&mut self, ebpf: &mut Ebpf) {
        match self.set_complete(ebpf, false) {
            Ok(()) => tracing::info!(
                "live traffic and DNS on the interfaces count by port alone until the next \
                 start: no agent keeps the address table meanwhile"
            ),
            Err(err) => tracing::warn!("clearing the address table's flag: {err:#}"),
        }
    }

    /// Counts syncs in a row whose reads were all interrupted, and says when they reach
    /// [`INTERRUPTED_SYNCS_WARNED`] and when a read completes after that.
    fn note_interruptions(&mut self, interrupted: bool) {
        if interrupted {
            self.interrupted_syncs += 1;
            if self.interrupted_syncs == INTERRUPTED_SYNCS_WARNED {
                tracing::warn!(
                    complete = self.complete,
                    "changes of addresses interrupted every read of them for {} syncs in a \
                     row: the address table takes what the reads find and frees nothing, and \
                     its completeness stays as it was, until a read completes",
                    self.interrupted_syncs
                );
            }
        } else {
            if self.interrupted_syncs >= INTERRUPTED_SYNCS_WARNED {
                tracing::info!("a read of the addresses completed again");
            }
            self.interrupted_syncs = 0;
        }
    }

    /// One sync: the problem says why the table is incomplete (`None`: complete).
    ///
    /// A read that changes kept interrupting may lack addresses that stay: what it found is
    /// added and nothing freed, the flag is never set by it (it is cleared if the read finds
    /// a problem: an address that does not fit, a wide route), and the next poll reads
    /// again; the announcements of the changes bring the syncs sooner. During a burst the
    /// table then only grows, and counts no less than it did; failing instead would have
    /// counted by port alone for as long as the burst lasted (and refused the start). A
    /// failed read of the other tables keeps what they last held, syncs the rest, and counts
    /// by port alone until a read of them succeeds.
    fn sync(&mut self, ebpf: &mut Ebpf) -> anyhow::Result<Synced> {
        let mut other_tables_failed = None;
        if self.other_tables_due {
            match addresses::list_other_tables() {
                Ok(other_tables) => {
                    self.other_tables_due = other_tables.interrupted;
                    self.other_tables = other_tables;
                    self.other_tables_read_at = Some(Instant::now());
                }
                Err(err) => other_tables_failed = Some(err),
            }
        }
        let mut local = addresses::list().context("listing this namespace's addresses")?;
        local.merge(&self.other_tables);
        local.addresses.extend(&self.extra);
        if local.interrupted {
            local.addresses.extend(self.table.addresses());
        }
        let placement = self.table.place(&local.addresses);
        // Searches cut short by the sync's budget go on at the next poll while they place
        // more; a table that is full stops there until a change.
        let again = local.interrupted
            || (placement.searched_out
                && !placement.unplaced.is_empty()
                && placement.newly_placed > 0);
        let incomplete = match (placement.unplaced.first(), &local.wide_route) {
            (Some(&first), _) => Some((
                Problem::Full,
                format!(
                    "{} of {} addresses did not fit the address table of {} slots (first {})",
                    placement.unplaced.len(),
                    local.addresses.len(),
                    self.table.len(),
                    addresses::ip(first)
                ),
            )),
            (None, Some(route)) => Some((
                Problem::WideRoute,
                format!("the local route {route} covers more than one address"),
            )),
            (None, None) => other_tables_failed.map(|err| {
                (
                    Problem::Failed,
                    format!(
                        "listing the local routes of the routing tables other than local: {err}"
                    ),
                )
            }),
        };
        // A write fills a free slot, moves an address to its other set before its old slot
        // is overwritten, or frees a gone address's slot: no address that stays is ever
        // missing, so the table stays usable while written.
        let mut table: Array<&mut MapData, [u64; 2]> = Array::try_from(
            ebpf.map_mut(map_names::LOCAL_ADDRESSES)
                .context("the kernel object has no address table")?,
        )?;
        for &(slot, value) in &placement.writes {
            if let Err(err) = table.set(slot, value, 0) {
                // What the kernel holds is not known now: the next sync writes every slot.
                self.table.rewrite_all();
                return Err(err.into());
            }
        }
        let complete = incomplete.is_none() && (self.complete || !local.interrupted);
        self.set_complete(ebpf, complete)?;
        if local.interrupted {
            tracing::debug!(
                complete,
                "changes interrupted every read of the addresses: added what was read, freed \
                 nothing; reading again at the next poll"
            );
        }
        Ok(Synced {
            problem: incomplete,
            again,
            interrupted: local.interrupted,
        })
    }

    fn set_complete(&mut self, ebpf: &mut Ebpf, complete: bool) -> anyhow::Result<()> {
        if complete != self.complete {
            let mut flag: Array<&mut MapData, u32> = Array::try_from(
                ebpf.map_mut(map_names::LOCAL_ADDRESSES_COMPLETE)
                    .context("the kernel object has no address table flag")?,
            )?;
            flag.set(0, u32::from(complete), 0)?;
            self.complete = complete;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::addresses::key;

    /// Distinct random addresses in 10.96.0.0/12, the service range of kube-proxy in IPVS
    /// mode, which makes every `ClusterIP` an address of the node.
    fn service_addresses(count: usize, mut state: u64) -> Vec<[u64; 2]> {
        let mut seen = BTreeSet::new();
        let mut addresses = Vec::new();
        while addresses.len() < count {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let host = u32::try_from(state % (1 << 20)).unwrap();
            let address = key(IpAddr::V4(Ipv4Addr::from(0x0a60_0000 | host)));
            if seen.insert(address) {
                addresses.push(address);
            }
        }
        addresses
    }

    /// Whether the table as the kernel reads it, `kernel`, holds `address` in one of its
    /// ways.
    fn finds(table: &AddressTable, kernel: &[[u64; 2]], address: [u64; 2]) -> bool {
        table
            .ways(address)
            .any(|index| kernel[index as usize] == address)
    }

    #[test]
    fn every_service_address_of_a_large_node_finds_a_slot() {
        let addresses: BTreeSet<[u64; 2]> = service_addresses(20_000, 0x2545_f491_4f6c_dd1d)
            .into_iter()
            .collect();
        let slots = local_address_slots(addresses.len());
        let mut table = AddressTable::new(slots, local_address_set_bits(slots));
        let placement = table.place(&addresses);
        assert!(
            placement.unplaced.is_empty(),
            "{}",
            placement.unplaced.len()
        );
        assert_eq!(placement.writes.len(), addresses.len());
        assert_eq!(table.placed(), addresses.len());
        // Half go: their slots are freed, and nothing else is written.
        let half: BTreeSet<[u64; 2]> = addresses.iter().copied().step_by(2).collect();
        let placement = table.place(&half);
        assert_eq!(placement.writes.len(), addresses.len() - half.len());
        assert!(placement.writes.iter().all(|&(_, value)| value == [0, 0]));
    }

    /// Added one by one into the smallest table, addresses find room until it is over 90 %
    /// full (without moving placed ones, the first was turned away at 45 %), and no write
    /// ever hides an address already placed from the kernel's reader.
    #[test]
    fn the_table_fills_past_ninety_percent_and_never_hides_a_placed_address() {
        let slots = LOCAL_ADDRESS_WAYS * 256;
        let mut table = AddressTable::new(slots, local_address_set_bits(slots));
        let mut kernel = vec![[0u64, 0]; slots as usize];
        let mut now = BTreeSet::new();
        for address in service_addresses(slots as usize, 7) {
            now.insert(address);
            let placement = table.place(&now);
            if !placement.unplaced.is_empty() {
                assert_eq!(placement.unplaced, vec![address]);
                break;
            }
            for &(slot, value) in &placement.writes {
                kernel[slot as usize] = value;
                for &placed in now.iter().filter(|&&placed| placed != address) {
                    assert!(finds(&table, &kernel, placed), "lost while moving");
                }
            }
            assert!(finds(&table, &kernel, address));
        }
        let placed = table.placed();
        assert!(placed * 10 > slots as usize * 9, "{placed} of {slots}");
        // After a failed write, every slot is written again.
        table.rewrite_all();
        let placement = table.place(&now);
        assert_eq!(placement.writes.len(), slots as usize);
    }

    /// A node whose agent started before kube-proxy: the smallest table, then service
    /// addresses to fill it near 90 % at once. What one sync's searches leave unplaced, the
    /// next ones place, each placing more.
    #[test]
    fn a_burst_that_outruns_one_syncs_searches_is_placed_by_the_next() {
        let slots = local_address_slots(0);
        let count = usize::try_from(slots).unwrap() * 88 / 100;
        let addresses: BTreeSet<[u64; 2]> = service_addresses(count, 11).into_iter().collect();
        let mut table = AddressTable::new(slots, local_address_set_bits(slots));
        let mut placement = table.place(&addresses);
        let mut syncs = 1;
        while !placement.unplaced.is_empty() {
            assert!(
                placement.searched_out,
                "{} unplaced with searches left, after {syncs} syncs",
                placement.unplaced.len()
            );
            let before = table.placed();
            placement = table.place(&addresses);
            assert!(placement.newly_placed > 0, "no progress at sync {syncs}");
            assert_eq!(table.placed(), before + placement.newly_placed);
            syncs += 1;
        }
        assert_eq!(table.placed(), count);
        // 3 syncs for these 57,671: one alone would not show the searches going on.
        assert!(syncs > 1, "all placed by the first sync");
    }

    #[test]
    fn an_address_that_finds_no_slot_is_reported() {
        // Two sets of four, and nine addresses that may each go in either.
        let mut table = AddressTable::new(2 * LOCAL_ADDRESS_WAYS, 1);
        let addresses: BTreeSet<[u64; 2]> = service_addresses(1_000, 3)
            .into_iter()
            .filter(|&address| table.ways(address).count() == 8)
            .take(9)
            .collect();
        let placement = table.place(&addresses);
        assert_eq!(
            (table.placed(), placement.unplaced.len()),
            (8, 1),
            "{placement:?}"
        );
    }

    #[test]
    fn the_table_is_sized_eight_slots_an_address_within_bounds() {
        assert_eq!(local_address_slots(0), 65_536);
        assert_eq!(local_address_slots(8_192), 65_536);
        assert_eq!(local_address_slots(8_193), 131_072);
        assert_eq!(local_address_slots(20_000), 262_144);
        assert_eq!(local_address_slots(usize::MAX), 1 << 20);
    }
}
