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
}

/// Assigns slots: a route keeps the slot recorded under its name; a new route takes a
/// never-used slot, or failing that one whose route left the config.
///
/// `owners[slot]` is the recorded owner of each slot (`None` = never used).
pub fn plan(owners: &[Option<String>], routes: &[&str]) -> Result<SlotPlan, String> {
    let capacity = owners.len().min(MAX_ROUTES as usize);
    if routes.len() > capacity {
        return Err(format!(
            "{} routes configured, but there are only {capacity} route slots",
            routes.len()
        ));
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
    for slot in &mut slots {
        if slot.is_some() {
            continue;
        }
        let free = (0..capacity)
            .find(|&s| !taken[s] && owners[s].is_none())
            .or_else(|| (0..capacity).find(|&s| !taken[s]))
            .ok_or("no free route slot")?;
        taken[free] = true;
        let free = u32::try_from(free).map_err(|err| err.to_string())?;
        if owners[free as usize].is_some() {
            reclaimed.push(free);
        }
        *slot = Some(free);
    }
    Ok(SlotPlan {
        slots: slots.into_iter().flatten().collect(),
        reclaimed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owners(names: &[Option<&str>]) -> Vec<Option<String>> {
        let mut all: Vec<Option<String>> = names.iter().map(|n| n.map(String::from)).collect();
        all.resize(MAX_ROUTES as usize, None);
        all
    }

    #[test]
    fn first_start_assigns_in_order() {
        let plan = plan(&owners(&[]), &["web", "tls"]).unwrap();
        assert_eq!(plan.slots, [0, 1]);
        assert!(plan.reclaimed.is_empty());
    }

    #[test]
    fn reordered_config_keeps_slots() {
        let plan = plan(&owners(&[Some("web"), Some("tls")]), &["tls", "web"]).unwrap();
        assert_eq!(plan.slots, [1, 0]);
        assert!(plan.reclaimed.is_empty());
    }

    #[test]
    fn new_route_prefers_an_unused_slot_over_a_retired_one() {
        let plan = plan(&owners(&[Some("old"), Some("web")]), &["web", "api"]).unwrap();
        assert_eq!(plan.slots, [1, 2]);
        assert!(plan.reclaimed.is_empty());
    }

    #[test]
    fn retired_slots_are_reclaimed_and_reported_when_full() {
        let mut names: Vec<Option<String>> =
            (0..MAX_ROUTES).map(|i| Some(format!("r{i}"))).collect();
        names[7] = Some("gone".into());
        let mut routes: Vec<String> = (0..MAX_ROUTES).map(|i| format!("r{i}")).collect();
        routes[7] = "new".into();
        let routes: Vec<&str> = routes.iter().map(String::as_str).collect();
        let plan = plan(&names, &routes).unwrap();
        assert_eq!(plan.slots[7], 7);
        assert_eq!(plan.reclaimed, [7]);
    }

    #[test]
    fn too_many_routes_is_an_error() {
        let routes: Vec<String> = (0..=MAX_ROUTES).map(|i| format!("r{i}")).collect();
        let routes: Vec<&str> = routes.iter().map(String::as_str).collect();
        assert!(
            plan(&owners(&[]), &routes)
                .unwrap_err()
                .contains("route slots")
        );
    }
}
