//! Per-CPU tally tables (DNS names, connection clients): a CPU counts a key in place while
//! it holds the key's slot, and tells the agent about the key only when it claims the slot,
//! in one event that also carries the final count of the tenure it ends
//! (docs/DESIGN.md, DNS, Names).

use aya_ebpf::{btf_maps::Array, helpers::generated::bpf_get_smp_processor_id};
use collector_common::{
    MAP_FLAGS_MMAPABLE, TALLY_COUNT_MAX, TALLY_SLOTS_PER_CPU, TallySlot, tally_next_tenure,
    tally_state, tally_tenure,
};

/// What a key's slot said.
pub enum Tally<K: 'static> {
    /// The key held the slot: counted.
    Counted,
    /// Another key (or none) held it: the caller sends the claim event and then calls
    /// [`Claim::take`]; a claim not taken leaves the slot to its holder.
    Claim(Claim<K>),
    /// No slot for this CPU (beyond the table the agent sized).
    NoSlot,
}

pub struct Claim<K: 'static> {
    slot: &'static mut TallySlot<K>,
    /// Index of the slot in the table, for the event.
    pub index: u32,
    /// The ending tenure's final count, for the event.
    pub replaced_count: u64,
    /// The new tenure, for the event.
    pub tenure: u32,
}

/// Counts `key` in this CPU's slot for `hash`.
#[inline(always)]
pub fn tally<K: Copy + PartialEq + 'static, const SLOTS: usize>(
    table: &'static Array<TallySlot<K>, SLOTS, MAP_FLAGS_MMAPABLE>,
    key: &K,
    hash: u32,
) -> Tally<K> {
    // SAFETY: no arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let index = cpu
        .wrapping_mul(TALLY_SLOTS_PER_CPU)
        .wrapping_add(hash & (TALLY_SLOTS_PER_CPU - 1));
    let Some(slot) = table.get_ptr_mut(index) else {
        return Tally::NoSlot;
    };
    // SAFETY: a value of our array, written only from this CPU (its index range) and never
    // by two runs at once: the tc classifiers run in softirq, which does not nest on a CPU,
    // and sock_ops accept callbacks, which can, come in only through the per-CPU busy word
    // of `connections::count_client`. The agent reads the slot through its mapping
    // meanwhile.
    let slot = unsafe { &mut *slot };
    let state = slot.state;
    let count = state & TALLY_COUNT_MAX;
    if state != 0 && slot.key == *key && count < TALLY_COUNT_MAX {
        // SAFETY: the slot's own field; an aligned store the agent reads whole.
        unsafe { core::ptr::write_volatile(&raw mut slot.state, state + 1) };
        return Tally::Counted;
    }
    Tally::Claim(Claim {
        slot,
        index,
        replaced_count: count,
        tenure: tally_next_tenure(tally_tenure(state)),
    })
}

impl<K: Copy> Claim<K> {
    /// Starts the new tenure, once its event is in the ring.
    #[inline(always)]
    pub fn take(self, key: &K) {
        // Tenure and count move on in one store: the agent never sees one without the other.
        // SAFETY: as in `tally`.
        unsafe {
            core::ptr::write_volatile(&raw mut self.slot.state, tally_state(self.tenure, 0));
        }
        self.slot.key = *key;
    }
}
