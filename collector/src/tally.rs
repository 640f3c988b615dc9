//! The agent's side of a kernel tally table (DNS names, connection clients): which key holds
//! each slot, as the claim events told, and how much of its count is already folded into a
//! top list. The kernel counts a key in place while it holds a slot; the event that claims
//! the slot for the next key carries the final count of the tenure it ends. Keys are matched
//! by tenure, not by value, so a key that loses its slot and wins it back before its events
//! are read is not counted twice (docs/DESIGN.md, DNS, Names).

use aya::maps::{Array, MapData};
use collector_common::{TALLY_COUNT_MAX, TallySlot, tally_next_tenure, tally_tenure};

use crate::mapped::MappedArray;

/// A kernel tally table, mapped, with what the agent knows of each slot.
pub struct TallyTable<K, V>
where
    TallySlot<K>: aya::Pod,
{
    /// `None` in unit tests, which hand the slots' states in themselves.
    table: Option<MappedArray<TallySlot<K>>>,
    held: Vec<Held<V>>,
}

/// The key of a slot's current tenure, and how much of its count is folded.
#[derive(Debug, Clone)]
struct Held<V> {
    tenure: u32,
    key: Option<V>,
    folded: u64,
}

impl<V> Default for Held<V> {
    fn default() -> Self {
        Self {
            tenure: 0,
            key: None,
            folded: 0,
        }
    }
}

impl<K, V: Clone> TallyTable<K, V>
where
    TallySlot<K>: aya::Pod,
{
    /// Maps the kernel's table read-only; `name` names it in the error.
    pub fn map(table: Array<MapData, TallySlot<K>>, name: &str) -> anyhow::Result<Self> {
        let table = MappedArray::map(table, name)?;
        let mut tally = Self::unmapped(table.len());
        tally.table = Some(table);
        Ok(tally)
    }

    /// A table of `slots` slots whose states the caller reads: unit tests, and with no
    /// slots, a table the kernel does not write (`client_stats = false`).
    #[must_use]
    pub fn unmapped(slots: usize) -> Self {
        Self {
            table: None,
            held: vec![Held::default(); slots],
        }
    }

    /// `key` claimed `slot` for `tenure`, ending the tenure before it at `replaced_count`:
    /// the ended tenure's key and what it counted that is not folded yet (nothing for a
    /// tenure the agent never knew, or a slot beyond the table).
    pub fn claim(
        &mut self,
        slot: u32,
        tenure: u32,
        replaced_count: u64,
        key: V,
    ) -> Option<(V, u64)> {
        let held = self.held.get_mut(slot as usize)?;
        let replaced = std::mem::replace(
            held,
            Held {
                tenure,
                key: Some(key),
                folded: 0,
            },
        );
        // Events of a slot come in the order its CPU sent them, so the tenure before this
        // one is the one held.
        if tally_next_tenure(replaced.tenure) != tenure {
            return None;
        }
        let unfolded = replaced_count.saturating_sub(replaced.folded);
        Some((replaced.key?, unfolded)).filter(|&(_, n)| n > 0)
    }

    /// What the mapped table counted since the last read, per key held.
    #[must_use]
    pub fn read(&mut self) -> Vec<(V, u64)> {
        let Some(table) = self.table.take() else {
            return Vec::new();
        };
        let counted = self.fold_states(table.entry_pointers().map(read_state));
        self.table = Some(table);
        counted
    }

    /// What each slot counted since the last read (`states`: each slot's state), for the key
    /// of its current tenure. A slot whose tenure the events have not reached yet is left
    /// for later: the event that ends the held tenure carries its final count.
    pub fn fold_states(&mut self, states: impl Iterator<Item = u64>) -> Vec<(V, u64)> {
        let mut counted = Vec::new();
        for (held, state) in self.held.iter_mut().zip(states) {
            let count = state & TALLY_COUNT_MAX;
            if tally_tenure(state) != held.tenure || count <= held.folded {
                continue;
            }
            let unfolded = count - held.folded;
            held.folded = count;
            if let Some(key) = &held.key {
                counted.push((key.clone(), unfolded));
            }
        }
        counted
    }
}

impl<K, V> std::fmt::Debug for TallyTable<K, V>
where
    TallySlot<K>: aya::Pod,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TallyTable")
            .field("slots", &self.held.len())
            .finish_non_exhaustive()
    }
}

/// Reads a slot's state while its CPU may be rewriting it: one aligned word, loaded whole
/// (an aligned 8-byte load does not tear on the 64-bit targets the agent runs on, and the
/// kernel writes the word with one store).
fn read_state<K>(slot: *const TallySlot<K>) -> u64 {
    // SAFETY: `slot` points into a live read-only mapping; `state` is 8-aligned.
    unsafe { (&raw const (*slot).state).read_volatile() }
}

#[cfg(test)]
mod tests {
    use collector_common::{TALLY_TENURES, tally_state};

    use super::*;

    /// Slot states, by (tenure, count).
    fn states(slots: &[(u32, u64)]) -> impl Iterator<Item = u64> + '_ {
        slots
            .iter()
            .map(|&(tenure, count)| tally_state(tenure, count))
    }

    #[test]
    fn counts_are_folded_once_and_handed_over_by_tenure() {
        let mut tally = TallyTable::<u64, &str>::unmapped(2);
        // `a` takes slot 1 (its first tenure), then three more count there.
        assert_eq!(tally.claim(1, 1, 0, "a"), None);
        assert_eq!(tally.fold_states(states(&[(0, 0), (1, 3)])), [("a", 3)]);
        // Read again unchanged: nothing more.
        assert_eq!(tally.fold_states(states(&[(0, 0), (1, 3)])), []);
        // `b` took the slot, but its event is still in the ring: the slot is left alone...
        assert_eq!(tally.fold_states(states(&[(0, 0), (2, 2)])), []);
        // ...until the event hands over `a`'s final count (5: two more since the last read).
        assert_eq!(tally.claim(1, 2, 5, "b"), Some(("a", 2)));
        assert_eq!(tally.fold_states(states(&[(0, 0), (2, 2)])), [("b", 2)]);
        // `a` came back to the slot and counted 4 there before its event was read: a new
        // tenure, not more of the old one.
        assert_eq!(tally.fold_states(states(&[(0, 0), (3, 4)])), []);
        assert_eq!(tally.claim(1, 3, 2, "a"), None);
        assert_eq!(tally.fold_states(states(&[(0, 0), (3, 4)])), [("a", 4)]);
        // A claim of a slot beyond the table is ignored.
        assert_eq!(tally.claim(2, 1, 0, "c"), None);
    }

    #[test]
    fn a_claim_after_a_tenure_the_agent_never_knew_hands_nothing_over() {
        let mut tally = TallyTable::<u64, &str>::unmapped(1);
        tally.claim(0, 1, 0, "a");
        // Tenure 2's event never reached the agent. (A full ring cannot do this, since the
        // slot then stays with its key, but the agent must not guess whose count it was.)
        assert_eq!(tally.claim(0, 3, 7, "c"), None);
        assert_eq!(tally.fold_states(states(&[(3, 1)])), [("c", 1)]);
    }

    #[test]
    fn tenures_wrap_past_the_last_to_the_first() {
        let last = TALLY_TENURES - 1;
        let mut tally = TallyTable::<u64, &str>::unmapped(1);
        tally.held[0].tenure = last;
        tally.held[0].key = Some("a");
        assert_eq!(tally.fold_states(states(&[(last, 2)])), [("a", 2)]);
        assert_eq!(tally.claim(0, 1, 3, "b"), Some(("a", 1)));
    }

    #[test]
    fn a_slot_reads_as_its_state() {
        let slot = TallySlot {
            state: tally_state(2, 5),
            key: 7u64,
        };
        assert_eq!(read_state(&raw const slot), slot.state);
    }
}
