//! Connections on the route ports (and to the upstream ports) that were open before the
//! agent started: a clean stop forgets every connection, and the sockets accepted or
//! connected before the next start are in no table of ours, so their closes are never seen.
//! Listed over `sock_diag` at every start (after a crash, those of the crashed run's own
//! table left out), kept by socket cookie, and listed again every few polls until the last
//! one has closed; their count per route and upstream is part of `active`, apart from
//! `opened` and `closed`.

use std::collections::{HashMap, HashSet};

use crate::{
    loader::{WatchedRoute, WatchedUpstream},
    sock_diag::{self, OpenSocket},
};

/// Whose a connection from before is: a route's by its local port, or an upstream's by its
/// remote port (index in the configured order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Owner {
    Route(usize),
    Upstream(usize),
}

/// The route and upstream ports, to tell whose a socket is.
struct Ports {
    route_of_port: HashMap<u16, usize>,
    upstream_of_port: HashMap<u16, usize>,
    /// Local ports with a listening socket: a connection on one was accepted, so it is no
    /// upstream's whatever its remote port (a client's source port can be 9000 too).
    listening: HashSet<u16>,
}

impl Ports {
    fn new(
        routes: &[WatchedRoute],
        upstreams: &[WatchedUpstream],
        listening: HashSet<u16>,
    ) -> Self {
        let by_port = |ports: &mut dyn Iterator<Item = (usize, &Vec<u16>)>| -> HashMap<u16, usize> {
            ports
                .flat_map(|(index, ports)| ports.iter().map(move |&port| (port, index)))
                .collect()
        };
        Self {
            // A port shared by server name is its route's without names: what name a
            // connection from before gave is not known.
            route_of_port: by_port(
                &mut routes
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.sni.is_empty())
                    .map(|(index, r)| (index, &r.ports)),
            ),
            upstream_of_port: by_port(&mut upstreams.iter().map(|u| &u.ports).enumerate()),
            listening,
        }
    }

    /// A socket on a route port is the route's (an accepted connection); otherwise one to an
    /// upstream port that was not accepted is the upstream's.
    fn owner(&self, socket: &OpenSocket) -> Option<Owner> {
        if let Some(&index) = self.route_of_port.get(&socket.local_port) {
            return Some(Owner::Route(index));
        }
        if self.listening.contains(&socket.local_port) {
            return None;
        }
        self.upstream_of_port
            .get(&socket.remote_port)
            .map(|&index| Owner::Upstream(index))
    }
}

/// Polls between two listings: each walks every TCP socket of the namespace.
const POLLS_BETWEEN_LISTINGS: u32 = 5;

/// What a `sock_diag` dump may leave out: it walks the kernel's socket hash by position
/// within each bucket, so a socket whose bucket lost an earlier one between two of the dump's
/// batches is skipped. So a connection is taken as open when either of two listings holds
/// it, and as closed when two listings in a row miss it.
#[derive(Debug, Default)]
pub struct Preexisting {
    /// Socket cookie → its route or upstream.
    open: HashMap<u64, Owner>,
    /// Those the last listing missed: the next one missing them too forgets them.
    missed_once: HashSet<u64>,
    polls_until_listing: u32,
    /// The start's listing was made and the last one since went through: `active` holds
    /// them all. False from a start that could not list them (none kept: `active` low by
    /// them) until restart, and after a failed relisting until one goes through (the last
    /// count kept: high by those closed meanwhile).
    known: bool,
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
        upstreams: &[WatchedUpstream],
        tracked: impl FnOnce() -> anyhow::Result<HashSet<u64>>,
    ) -> anyhow::Result<Self> {
        // Only upstreams need telling accepted connections from connected ones.
        let listening = if upstreams.is_empty() {
            HashSet::new()
        } else {
            // Without them the routes' listing still holds; an accepted socket from an
            // upstream's port may then count as the upstream's until it closes.
            sock_diag::listening_ports().unwrap_or_else(|err| {
                tracing::warn!("listing the listening sockets over sock_diag failed: {err}");
                HashSet::new()
            })
        };
        let ports = Ports::new(routes, upstreams, listening);
        let before = listed_twice()?;
        let tracked = tracked()?;
        let after = listed_twice()?;
        Ok(Self {
            open: untracked_in_both(&ports, before, &tracked, &after),
            missed_once: HashSet::new(),
            polls_until_listing: POLLS_BETWEEN_LISTINGS,
            known: true,
        })
    }

    /// None known: the start could not list them (said in the log).
    pub fn unknown() -> Self {
        Self::default()
    }

    /// Whether `active` holds every connection open from before (see `known`).
    #[must_use]
    pub const fn known(&self) -> bool {
        self.known
    }

    /// Forgets those that closed, listing the sockets again every few polls while any are
    /// left. A failed listing keeps the last count, known no more until one goes through.
    pub fn refresh_now_and_then(&mut self) {
        if self.open.is_empty() {
            return;
        }
        if self.polls_until_listing > 0 {
            self.polls_until_listing -= 1;
            return;
        }
        self.polls_until_listing = POLLS_BETWEEN_LISTINGS;
        self.relisted(sock_diag::open_tcp_connections().map_err(anyhow::Error::from));
    }

    fn relisted(&mut self, listing: anyhow::Result<Vec<OpenSocket>>) {
        match listing {
            Ok(sockets) => {
                self.forget_closed(&sockets.iter().map(|s| s.cookie).collect());
                // Only what the start listed is relisted: one that could not list them has
                // none, and stays unknown.
                self.known = true;
            }
            Err(err) => {
                tracing::warn!("listing the sockets over sock_diag failed: {err:#}");
                self.known = false;
            }
        }
    }

    /// Forgets the connections that `listed` and the listing before both miss.
    fn forget_closed(&mut self, listed: &HashSet<u64>) {
        let missed_before = std::mem::take(&mut self.missed_once);
        self.open
            .retain(|cookie, _| listed.contains(cookie) || !missed_before.contains(cookie));
        self.missed_once = self
            .open
            .keys()
            .filter(|cookie| !listed.contains(cookie))
            .copied()
            .collect();
    }

    /// Per route, for `routes` routes in their order.
    #[must_use]
    pub fn per_route(&self, routes: usize) -> Vec<u64> {
        self.count(routes, |owner| match owner {
            Owner::Route(index) => Some(index),
            Owner::Upstream(_) => None,
        })
    }

    /// Per upstream, for `upstreams` upstreams in their order.
    #[must_use]
    pub fn per_upstream(&self, upstreams: usize) -> Vec<u64> {
        self.count(upstreams, |owner| match owner {
            Owner::Upstream(index) => Some(index),
            Owner::Route(_) => None,
        })
    }

    fn count(&self, len: usize, index_of: impl Fn(Owner) -> Option<usize>) -> Vec<u64> {
        let mut counts = vec![0u64; len];
        for &owner in self.open.values() {
            if let Some(count) = index_of(owner).and_then(|index| counts.get_mut(index)) {
                *count += 1;
            }
        }
        counts
    }
}

/// The open connections that either of two listings holds (see [`Preexisting`]).
fn listed_twice() -> anyhow::Result<Vec<OpenSocket>> {
    let mut sockets = sock_diag::open_tcp_connections()?;
    let first: HashSet<u64> = sockets.iter().map(|socket| socket.cookie).collect();
    sockets.extend(
        sock_diag::open_tcp_connections()?
            .into_iter()
            .filter(|socket| !first.contains(&socket.cookie)),
    );
    Ok(sockets)
}

/// Cookie → owner of the sockets of a route or upstream in both listings and not in the
/// table.
fn untracked_in_both(
    ports: &Ports,
    before: Vec<OpenSocket>,
    tracked: &HashSet<u64>,
    after: &[OpenSocket],
) -> HashMap<u64, Owner> {
    let after: HashSet<u64> = after.iter().map(|socket| socket.cookie).collect();
    before
        .into_iter()
        .filter(|socket| after.contains(&socket.cookie) && !tracked.contains(&socket.cookie))
        .filter_map(|socket| Some((socket.cookie, ports.owner(&socket)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_shared_by_name_is_its_route_without_names() {
        let route = |name: &str, sni: &[&str], slot| WatchedRoute {
            name: name.to_owned(),
            kind: crate::config::RouteKind::Https,
            ports: vec![443],
            sni: sni.iter().map(|&n| n.to_owned()).collect(),
            slot,
        };
        // In either order: the route without names has the port.
        for routes in [
            vec![route("tls", &[], 0), route("api", &["api.example.com"], 1)],
            vec![route("api", &["api.example.com"], 1), route("tls", &[], 0)],
        ] {
            let ports = Ports::new(&routes, &[], HashSet::new());
            let owner = ports.route_of_port[&443];
            assert_eq!(routes[owner].name, "tls");
        }
    }

    #[test]
    fn only_untracked_sockets_open_through_the_table_read_are_from_before() {
        let socket = |cookie, local_port| OpenSocket {
            cookie,
            local_port,
            remote_port: 40000,
        };
        let ports = Ports {
            route_of_port: HashMap::from([(80, 0), (443, 1)]),
            upstream_of_port: HashMap::new(),
            listening: HashSet::new(),
        };
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
        let open = untracked_in_both(&ports, before, &HashSet::from([3]), &after);
        assert_eq!(
            open,
            HashMap::from([(1, Owner::Route(0)), (2, Owner::Route(1))])
        );
    }

    #[test]
    fn a_failed_relisting_makes_them_unknown_until_one_goes_through() {
        let socket = |cookie| OpenSocket {
            cookie,
            local_port: 80,
            remote_port: 40000,
        };
        let mut preexisting = Preexisting {
            open: HashMap::from([(1, Owner::Route(0)), (2, Owner::Route(0))]),
            missed_once: HashSet::new(),
            polls_until_listing: 0,
            known: true,
        };
        preexisting.relisted(Err(anyhow::anyhow!("ENOBUFS")));
        assert!(!preexisting.known());
        // The last count is kept meanwhile.
        assert_eq!(preexisting.per_route(1), [2]);
        preexisting.relisted(Ok(vec![socket(1), socket(2)]));
        assert!(preexisting.known());
        assert!(!Preexisting::unknown().known());
    }

    #[test]
    fn a_socket_is_its_routes_by_local_port_before_an_upstreams_by_remote_port() {
        let ports = Ports {
            route_of_port: HashMap::from([(8080, 0)]),
            upstream_of_port: HashMap::from([(9000, 0), (8080, 1)]),
            listening: HashSet::from([8080, 22]),
        };
        let socket = |local_port, remote_port| OpenSocket {
            cookie: 1,
            local_port,
            remote_port,
        };
        // The proxy's connection to a backend on 9000.
        assert_eq!(ports.owner(&socket(41000, 9000)), Some(Owner::Upstream(0)));
        // A client's connection accepted on 8080, from a client port that happens to be 9000.
        assert_eq!(ports.owner(&socket(8080, 9000)), Some(Owner::Route(0)));
        // The proxy's connection to a backend on 8080 (an upstream port too).
        assert_eq!(ports.owner(&socket(41000, 8080)), Some(Owner::Upstream(1)));
        assert_eq!(ports.owner(&socket(41000, 22)), None);
        // Accepted on a listening port that is no route's (ssh), from a client port 9000.
        assert_eq!(ports.owner(&socket(22, 9000)), None);
        let preexisting = Preexisting {
            open: HashMap::from([
                (1, Owner::Upstream(1)),
                (2, Owner::Route(0)),
                (3, Owner::Upstream(1)),
            ]),
            missed_once: HashSet::new(),
            polls_until_listing: 0,
            known: true,
        };
        assert_eq!(preexisting.per_route(1), [1]);
        assert_eq!(preexisting.per_upstream(2), [0, 2]);
    }

    /// A listing that skips a socket still open (a dump walks the hash by position) does not
    /// take it out of `active`: only a second listing in a row without it does.
    #[test]
    fn a_connection_is_forgotten_when_two_listings_in_a_row_miss_it() {
        let mut preexisting = Preexisting {
            open: HashMap::from([(1, Owner::Route(0)), (2, Owner::Route(0))]),
            ..Preexisting::default()
        };
        let listed = |cookies: &[u64]| cookies.iter().copied().collect::<HashSet<u64>>();
        // 2 skipped once, then listed again: kept.
        preexisting.forget_closed(&listed(&[1]));
        preexisting.forget_closed(&listed(&[1, 2]));
        assert_eq!(preexisting.per_route(1), [2]);
        // 1 closed: missed twice, forgotten at the second.
        preexisting.forget_closed(&listed(&[2]));
        assert_eq!(preexisting.per_route(1), [2]);
        preexisting.forget_closed(&listed(&[2]));
        assert_eq!(preexisting.per_route(1), [1]);
        // A miss, a listing, a miss: never two in a row.
        preexisting.forget_closed(&listed(&[]));
        preexisting.forget_closed(&listed(&[2]));
        preexisting.forget_closed(&listed(&[]));
        assert_eq!(preexisting.per_route(1), [1]);
        preexisting.forget_closed(&listed(&[]));
        assert_eq!(preexisting.per_route(1), [0]);
    }
}
