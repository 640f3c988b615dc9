//! Keeps each nftables series growing while the run lasts. Our table can be made again under
//! a running agent (someone removed or changed it: `nft flush ruleset` at every reload of
//! Debian's nftables service), and its counters can be zeroed under it (`nft reset
//! counters`): either way the kernel's counts start again from zero. Exported as read, such a
//! count that climbs past its old value before the next scrape hides its reset from
//! Prometheus, and `increase()` loses the old count. So what a table counted before it went,
//! or before a reset, is carried and added to what is read after; the next table is made
//! with it as its counters' starting counts, so that from then on the kernel holds it and
//! the table a crashed run leaves goes on from it when the next run adopts it (until
//! 2026-12-05 the adopted counts dropped back by it, which Prometheus read as a reset and
//! counted twice). Only what was carried over a reset is lost with a crash. A clean restart
//! starts from zero, a reset Prometheus sees (the value drops).

use std::collections::HashMap;

use crate::nft::CounterValue;

/// Packets and bytes of one counter.
pub type Counts = (u64, u64);

#[derive(Debug, Default)]
pub struct Continuity {
    /// Per counter name: what this run counted before its current table's counts began.
    carried: HashMap<String, Counts>,
    /// Per counter name: the current table's counts as last read.
    last_read: HashMap<String, Counts>,
}

impl Continuity {
    /// `read` (the current table's counts) with what is carried added. A count lower than
    /// the last one read was reset under us: what it had counted is carried from now on.
    pub fn continued(&mut self, read: Vec<CounterValue>) -> Vec<CounterValue> {
        read.into_iter()
            .map(|mut value| {
                let now = (value.packets, value.bytes);
                let name = &value.counter.name;
                if let Some(&last) = self.last_read.get(name)
                    && (now.0 < last.0 || now.1 < last.1)
                {
                    carry(&mut self.carried, name, last);
                }
                self.last_read.insert(name.clone(), now);
                let carried = self.carried.get(name).copied().unwrap_or_default();
                value.packets = value.packets.saturating_add(carried.0);
                value.bytes = value.bytes.saturating_add(carried.1);
                value
            })
            .collect()
    }

    /// The current table is gone (or replaced): what it counted is carried to the next.
    pub fn table_gone(&mut self) {
        for (name, last) in std::mem::take(&mut self.last_read) {
            carry(&mut self.carried, &name, last);
        }
    }

    /// What the next table's counters start from: all that is carried.
    #[must_use]
    pub fn starting_counts(&self) -> HashMap<String, Counts> {
        self.carried.clone()
    }

    /// A table was made with [`Self::starting_counts`]: the kernel holds them now, and they
    /// are its counts until it is read, so that a table gone or reset before its first
    /// read carries them still.
    pub fn table_made(&mut self) {
        self.last_read = std::mem::take(&mut self.carried);
    }
}

fn carry(carried: &mut HashMap<String, Counts>, name: &str, counts: Counts) {
    let total = carried.entry(name.to_owned()).or_default();
    total.0 = total.0.saturating_add(counts.0);
    total.1 = total.1.saturating_add(counts.1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::{PlannedCounter, Protocol};

    fn read(packets: u64, bytes: u64) -> Vec<CounterValue> {
        vec![CounterValue {
            counter: PlannedCounter {
                name: "tcp_443_in".to_owned(),
                protocol: Protocol::Tcp,
                port: 443,
                inbound: true,
                route: "tls".to_owned(),
            },
            packets,
            bytes,
        }]
    }

    fn counts(values: &[CounterValue]) -> Counts {
        (values[0].packets, values[0].bytes)
    }

    #[test]
    fn counts_go_on_as_read_while_the_table_stands() {
        let mut continuity = Continuity::default();
        assert_eq!(counts(&continuity.continued(read(3, 300))), (3, 300));
        assert_eq!(counts(&continuity.continued(read(5, 500))), (5, 500));
        // The same counts again (a failed read shows the last one).
        assert_eq!(counts(&continuity.continued(read(5, 500))), (5, 500));
    }

    #[test]
    fn a_table_made_again_continues_from_the_last_counts_of_the_one_before() {
        let mut continuity = Continuity::default();
        continuity.continued(read(40, 4000));
        continuity.table_gone();
        // Past the old counts already at its first read: still no drop, no double count.
        assert_eq!(counts(&continuity.continued(read(60, 6000))), (100, 10_000));
        continuity.table_gone();
        assert_eq!(counts(&continuity.continued(read(0, 0))), (100, 10_000));
        assert_eq!(counts(&continuity.continued(read(1, 10))), (101, 10_010));
    }

    /// Made with what was carried as its starting counts, the next table's counts are the
    /// exported ones: nothing is added twice, and a crash loses nothing of it.
    #[test]
    fn a_table_made_with_the_carried_counts_is_read_as_it_is() {
        let mut continuity = Continuity::default();
        continuity.continued(read(40, 4000));
        continuity.table_gone();
        let starting = continuity.starting_counts();
        assert_eq!(starting["tcp_443_in"], (40, 4000));
        continuity.table_made();
        assert_eq!(counts(&continuity.continued(read(41, 4100))), (41, 4100));
        assert!(continuity.starting_counts().is_empty());
    }

    /// Its starting counts are its counts until it is read: gone or reset before its
    /// first read, it carries them on.
    #[test]
    fn a_table_gone_or_reset_before_its_first_read_carries_its_starting_counts() {
        let mut continuity = Continuity::default();
        continuity.continued(read(40, 4000));
        continuity.table_gone();
        continuity.table_made();
        continuity.table_gone();
        assert_eq!(continuity.starting_counts()["tcp_443_in"], (40, 4000));
        continuity.table_made();
        // Reset before it was read: its 40 carried.
        assert_eq!(counts(&continuity.continued(read(1, 10))), (41, 4010));
    }

    #[test]
    fn counters_reset_under_the_table_continue_from_their_last_counts() {
        let mut continuity = Continuity::default();
        continuity.continued(read(40, 4000));
        assert_eq!(counts(&continuity.continued(read(2, 200))), (42, 4200));
        assert_eq!(counts(&continuity.continued(read(7, 700))), (47, 4700));
        // Bytes down with packets up is a reset too.
        assert_eq!(counts(&continuity.continued(read(9, 100))), (56, 4800));
    }
}
