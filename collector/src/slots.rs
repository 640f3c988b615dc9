//! Binding routes to kernel counter slots. A route keeps its slot across restarts (the
//! slot's owner is recorded in a pinned map), so reordering the config never mixes counters.

use collector_common::MAX_ROUTES;

/// Where each configured route's counters live, and which slots must be zeroed first.
#[derive(Debug, PartialEq, Eq)]
pub struct SlotPlan {
    /// Slot of each configured route, in config order.
    pub slots: Vec<u32>,
    /// Slots taken over from a route no longer configured: their counters belong to the old
    /// route and are zeroed before the new one uses them.
    pub reclaimed: Vec<u32>,
    /// Slots of routes no longer configured that no route took over: a crashed run's
    /// connections there stay in the connection table until they close.
    pub retired: Vec<u32>,
}

/// Assigns slots: a route keeps the slot recorded under its name; a new route takes a
/// never-used slot, or failing that one whose route left the config and has no connection
/// open: a connection keeps its slot in the pinned connection table across a crash, and
/// would close into the new route's counters.
///
/// `owners[slot]` is the recorded owner of each slot (`None` = never used);
/// `open_connections` counts the connections the connection table holds per slot (read only
/// when a new route finds no never-used slot).
pub fn plan(
    owners: &[Option<String>],
    routes: &[&str],
    open_connections: impl FnOnce() -> anyhow::Result<Vec<u64>>,
) -> anyhow::Result<SlotPlan> {
    let capacity = owners.len().min(MAX_ROUTES as usize);
    if routes.len() > capacity {
        anyhow::bail!(
            "{} routes configured, but there are only {capacity} route slots",
            routes.len()
        );
    }
    let mut taken = vec![false; capacity];
    let mut slots: Vec<Option<u32>> = routes
        .iter()
        .map(|name| {
            let slot = owners[..capacity]
                .iter()
                .position(|owner| owner.as_deref() == Some(*name))?;
            taken[slot] = true;
            u32::try_from(slot).ok()
        })
        .collect();
    let mut reclaimed = Vec::new();
    // Read once, when a new route first needs a retired slot.
    let mut open_connections = Some(open_connections);
    let mut open: Vec<u64> = Vec::new();
    for slot in &mut slots {
        if slot.is_some() {
            continue;
        }
        let free = if let Some(unused) = (0..capacity).find(|&s| !taken[s] && owners[s].is_none()) {
            unused
        } else {
            if let Some(read) = open_connections.take() {
                open = read()?;
            }
            (0..capacity)
                .find(|&s| !taken[s] && open.get(s) == Some(&0))
                .ok_or_else(|| no_idle_slot(owners, &taken, &open))?
        };
        taken[free] = true;
        let free = u32::try_from(free)?;
        if owners[free as usize].is_some() {
            reclaimed.push(free);
        }
        *slot = Some(free);
    }
    let retired = (0..)
        .zip(&owners[..capacity])
        .filter(|&(slot, owner)| owner.is_some() && !taken[slot as usize])
        .map(|(slot, _)| slot)
        .collect();
    Ok(SlotPlan {
        slots: slots.into_iter().flatten().collect(),
        reclaimed,
        retired,
    })
}

/// Why no slot was left: every retired route still has connections from before the restart.
fn no_idle_slot(owners: &[Option<String>], taken: &[bool], open: &[u64]) -> anyhow::Error {
    let busy: Vec<String> = (0..taken.len())
        .filter(|&s| !taken[s])
        .map(|s| {
            let name = owners[s].as_deref().unwrap_or("?");
            format!("{name} ({} open)", open.get(s).copied().unwrap_or(0))
        })
        .collect();
    anyhow::anyhow!(
        "no free route slot: all {} are used, and the removed routes whose slots a new route \
         could take still have connections open from before the restart: {}; start with the \
         previous config and stop it cleanly (a clean stop frees every slot), or remove \
         everything with `{}` (the counters restart from zero)",
        taken.len(),
        busy.join(", "),
        crate::cleanup::command()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(names: &[Option<&str>]) -> Vec<Option<String>> {
        let mut all: Vec<Option<String>> = names.iter().map(|n| n.map(String::from)).collect();
        all.resize(MAX_ROUTES as usize, None);
        all
    }

    fn none_open() -> anyhow::Result<Vec<u64>> {
        panic!("the connection table is read only when a retired slot is needed")
    }

    /// The connection table holds 3 connections of slot 7.
    fn three_open_in_slot_7() -> Vec<u64> {
        let mut open = vec![0; MAX_ROUTES as usize];
        open[7] = 3;
        open
    }

    #[test]
    fn first_start_assigns_in_order() {
        let plan = plan(&owners(&[]), &["web", "tls"], none_open).unwrap();
        assert_eq!(plan.slots, [0, 1]);
        assert!(plan.reclaimed.is_empty());
    }

    #[test]
    fn reordered_config_keeps_slots() {
        let plan = plan(
            &owners(&[Some("web"), Some("tls")]),
            &["tls", "web"],
            none_open,
        )
        .unwrap();
        assert_eq!(plan.slots, [1, 0]);
        assert!(plan.reclaimed.is_empty());
    }

    #[test]
    fn new_route_prefers_an_unused_slot_over_a_retired_one() {
        let plan = plan(
            &owners(&[Some("old"), Some("web")]),
            &["web", "api"],
            none_open,
        )
        .unwrap();
        assert_eq!(plan.slots, [1, 2]);
        assert!(plan.reclaimed.is_empty());
        assert_eq!(plan.retired, [0], "old's slot, left to its connections");
    }

    #[test]
    fn retired_slots_are_reclaimed_and_reported_when_full() {
        let mut names: Vec<Option<String>> =
            (0..MAX_ROUTES).map(|i| Some(format!("r{i}"))).collect();
        names[7] = Some("gone".into());
        let mut routes: Vec<String> = (0..MAX_ROUTES).map(|i| format!("r{i}")).collect();
        routes[7] = "new".into();
        let routes: Vec<&str> = routes.iter().map(String::as_str).collect();
        let plan = plan(&names, &routes, || Ok(vec![0; MAX_ROUTES as usize])).unwrap();
        assert_eq!(plan.slots[7], 7);
        assert_eq!(plan.reclaimed, [7]);
    }

    /// Every slot used: `r0`, `r1`, … except the retired routes given.
    fn all_used(retired: &[(usize, &str)]) -> Vec<Option<String>> {
        let mut names: Vec<Option<String>> =
            (0..MAX_ROUTES).map(|i| Some(format!("r{i}"))).collect();
        for &(slot, name) in retired {
            names[slot] = Some(name.to_owned());
        }
        names
    }

    /// The routes `r0`, `r1`, … but those of the given slots, and `new`.
    fn configured_with_new(leaving_out: &[usize]) -> Vec<String> {
        (0..MAX_ROUTES as usize)
            .filter(|i| !leaving_out.contains(i))
            .map(|i| format!("r{i}"))
            .chain(std::iter::once("new".to_owned()))
            .collect()
    }

    #[test]
    fn a_retired_slot_with_open_connections_is_left_to_them() {
        let names = all_used(&[(7, "busy"), (9, "idle")]);
        let routes = configured_with_new(&[7, 9]);
        let routes: Vec<&str> = routes.iter().map(String::as_str).collect();
        let plan = plan(&names, &routes, || Ok(three_open_in_slot_7())).unwrap();
        assert_eq!(plan.slots.last(), Some(&9), "the idle retired slot");
        assert_eq!(plan.reclaimed, [9]);
        assert_eq!(plan.retired, [7]);
    }

    #[test]
    fn with_only_busy_retired_slots_the_start_says_why() {
        let names = all_used(&[(7, "busy")]);
        let routes = configured_with_new(&[7]);
        let routes: Vec<&str> = routes.iter().map(String::as_str).collect();
        let err = plan(&names, &routes, || Ok(three_open_in_slot_7()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no free route slot"), "{err}");
        assert!(err.contains("busy (3 open)"), "{err}");
    }

    #[test]
    fn too_many_routes_is_an_error() {
        let routes: Vec<String> = (0..=MAX_ROUTES).map(|i| format!("r{i}")).collect();
        let routes: Vec<&str> = routes.iter().map(String::as_str).collect();
        assert!(
            plan(&owners(&[]), &routes, none_open)
                .unwrap_err()
                .to_string()
                .contains("route slots")
        );
    }
}
