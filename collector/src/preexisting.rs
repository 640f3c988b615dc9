//! Connections on the route ports that were open before the agent started: a clean stop
//! forgets every connection, and the sockets accepted before the next start are in no table
//! of ours, so their closes are never seen. Listed over `sock_diag` at every start (after a
//! crash, those of the crashed run's own table left out), kept by socket cookie, and listed
//! again every few polls until the last one has closed; their count per route is part of
//! `active`, apart from `opened` and `closed`.

use std::collections::{HashMap, HashSet};

use crate::{
    loader::WatchedRoute,
    sock_diag::{self, OpenSocket},
};

/// Polls between two listings: each walks every TCP socket of the namespace.
const POLLS_BETWEEN_LISTINGS: u32 = 5;

#[derive(Debug, Default)]
pub struct Preexisting {
    /// Socket cookie → index of its route.
    open: HashMap<u64, usize>,
    polls_until_listing: u32,
}

impl Preexisting {
    /// The connections on `routes`' ports open now that the connection table does not hold:
    /// those open both before and after `tracked` (the table's cookies) is read, and not in
    /// it. One accepted before the first listing is in the table, and in `opened`, so it is
    /// left out; one accepted and closed again while the table is read (its slot already
    /// free) is in the first listing only, and left out too, where it would have stayed in
    /// `active` until the next listing.
    pub fn list(
        routes: &[WatchedRoute],
        tracked: impl FnOnce() -> anyhow::Result<HashSet<u64>>,
    ) -> anyhow::Result<Self> {
        let route_of_port: HashMap<u16, usize> = routes
            .iter()
            .enumerate()
            .flat_map(|(index, route)| route.ports.iter().map(move |&port| (port, index)))
            .collect();
        let before = sock_diag::open_tcp_connections()?;
        let tracked = tracked()?;
        let after = sock_diag::open_tcp_connections()?;
        Ok(Self {
            open: untracked_in_both(&route_of_port, before, &tracked, &after),
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

/// Cookie → route of the sockets on a route port in both listings and not in the table.
fn untracked_in_both(
    route_of_port: &HashMap<u16, usize>,
    before: Vec<OpenSocket>,
    tracked: &HashSet<u64>,
    after: &[OpenSocket],
) -> HashMap<u64, usize> {
    let after: HashSet<u64> = after.iter().map(|socket| socket.cookie).collect();
    before
        .into_iter()
        .filter(|socket| after.contains(&socket.cookie) && !tracked.contains(&socket.cookie))
        .filter_map(|socket| Some((socket.cookie, *route_of_port.get(&socket.local_port)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_untracked_sockets_open_through_the_table_read_are_from_before() {
        let socket = |cookie, local_port| OpenSocket { cookie, local_port };
        let routes = HashMap::from([(80, 0), (443, 1)]);
        let before = vec![
            socket(1, 80),  // open from before, still open: kept
            socket(2, 443), // open from before, still open: kept
            socket(3, 80),  // accepted once attached, in the table: left out
            socket(4, 80),  // accepted once attached, closed while the table was read: left out
            socket(5, 22),  // no route's
        ];
        let after = [
            socket(1, 80),
            socket(2, 443),
            socket(3, 80),
            socket(5, 22),
            socket(6, 80),
        ];
        let open = untracked_in_both(&routes, before, &HashSet::from([3]), &after);
        assert_eq!(open, HashMap::from([(1, 0), (2, 1)]));
    }
}
