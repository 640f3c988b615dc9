//! Connections on the route ports that were open before the agent started: a clean stop
//! forgets every connection, and the sockets accepted before the next start are in no table
//! of ours, so their closes are never seen. Listed over `sock_diag` at a start that inherits
//! nothing, kept by socket cookie, and listed again every few polls until the last one has
//! closed; their count per route is part of `active`, apart from `opened` and `closed`.

use std::collections::{HashMap, HashSet};

use crate::{loader::WatchedRoute, sock_diag};

/// Polls between two listings: each walks every TCP socket of the namespace.
const POLLS_BETWEEN_LISTINGS: u32 = 5;

#[derive(Debug, Default)]
pub struct Preexisting {
    /// Socket cookie → index of its route.
    open: HashMap<u64, usize>,
    polls_until_listing: u32,
}

impl Preexisting {
    /// The connections on `routes`' ports open now that the connection table does not hold.
    /// The sockets are listed first and `tracked` (the table's cookies) read after: one
    /// accepted in between is in the table, and in `opened`, so it is left out here. (Read
    /// the other way round, such a connection counted twice in `active` until it closed.)
    pub fn list(
        routes: &[WatchedRoute],
        tracked: impl FnOnce() -> anyhow::Result<HashSet<u64>>,
    ) -> anyhow::Result<Self> {
        let route_of_port: HashMap<u16, usize> = routes
            .iter()
            .enumerate()
            .flat_map(|(index, route)| route.ports.iter().map(move |&port| (port, index)))
            .collect();
        let sockets = sock_diag::open_tcp_connections()?;
        let tracked = tracked()?;
        let open = sockets
            .into_iter()
            .filter(|socket| !tracked.contains(&socket.cookie))
            .filter_map(|socket| Some((socket.cookie, *route_of_port.get(&socket.local_port)?)))
            .collect();
        Ok(Self {
            open,
            polls_until_listing: POLLS_BETWEEN_LISTINGS,
        })
    }

    /// Forgets those that closed, listing the sockets again every few polls while any are
    /// left. A failed listing keeps the last count.
    pub fn refresh_now_and_then(&mut self) {
        if self.open.is_empty() {
            return;
        }
        if self.polls_until_listing > 0 {
            self.polls_until_listing -= 1;
            return;
        }
        self.polls_until_listing = POLLS_BETWEEN_LISTINGS;
        match sock_diag::open_tcp_connections() {
            Ok(sockets) => {
                let still: HashSet<u64> = sockets.iter().map(|socket| socket.cookie).collect();
                self.open.retain(|cookie, _| still.contains(cookie));
            }
            Err(err) => tracing::warn!("listing the sockets over sock_diag failed: {err}"),
        }
    }

    /// Per route, for `routes` routes in their order.
    #[must_use]
    pub fn per_route(&self, routes: usize) -> Vec<u64> {
        let mut counts = vec![0u64; routes];
        for &route in self.open.values() {
            if let Some(count) = counts.get_mut(route) {
                *count += 1;
            }
        }
        counts
    }
}
