//! The kernel's connection table (`CONN_STATE`), mapped read-only into the agent's memory:
//! the open connections per client are counted from it at every poll, a read of 3 MiB (at
//! the default 65,536 slots; 48 bytes a slot) without a system call. Counting from the
//! table rather than from open and close events keeps the figure exact even when the event
//! ring overflows, and spares the kernel a close event per connection while nobody reads
//! the event stream.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
};

use aya::maps::{Array, MapData};
use collector_common::{ConnState, MAX_ROUTES, conn_flags, map_names};

use crate::mapped::MappedArray;

pub struct ClientTable(MappedArray<ConnState>);

impl ClientTable {
    /// Maps `CONN_STATE` read-only.
    pub fn map(map: Array<MapData, ConnState>) -> anyhow::Result<Self> {
        MappedArray::map(map, map_names::CONN_STATE).map(Self)
    }

    /// Open connections per client address, as the table holds them now (a slot read
    /// between its claim and the writing of its client names one client wrongly for one
    /// poll).
    #[must_use]
    pub fn open_by_client(&self) -> HashMap<IpAddr, u64> {
        let mut clients = HashMap::new();
        for entry in self.0.entries() {
            // Upstream connections have a backend, not a client, at their other end.
            if entry.cookie != 0
                && entry.route < MAX_ROUTES
                && entry.flags & conn_flags::UPSTREAM == 0
            {
                let client = Ipv6Addr::from(entry.client_addr).to_canonical();
                *clients.entry(client).or_insert(0) += 1;
            }
        }
        clients
    }
}
