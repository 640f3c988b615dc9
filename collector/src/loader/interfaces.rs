//! The tc classifiers on the namespace's interfaces: attached at the start and as
//! interfaces come (and come up), followed through renames, forgotten when they go, and
//! checked at every poll (programs put ahead of ours, ours detached).

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    maps::{Array, MapData},
    programs::{SchedClassifier, TcAttachType},
};
use collector_common::{MAX_REDIRECT_DEVICES, map_names, program_names};

use super::{Attachment, LINKS_DIR, adopt_or_pin_link, attach_tcx, pin_link, remove_if_present};
use crate::{
    bpf_sys,
    links::{self, Framing, Link},
    paths,
};

/// One attached interface's hook, as the last poll found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcHook {
    pub interface: String,
    pub hook: &'static str,
    /// How many TCX programs run before ours.
    pub programs_ahead: usize,
    /// How many times a poll found ours detached from the hook (`bpftool link detach`, or
    /// anything else holding the link) and attached it again.
    pub reattached: u64,
}

/// What the polls find of the attachment: each attached hook, and the configured interfaces
/// that are not there to attach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookCheck {
    pub hooks: Vec<TcHook>,
    /// Configured interfaces this namespace has no interface of with a framing the
    /// classifiers parse: not counted.
    pub missing_interfaces: Vec<String>,
    /// Interfaces there to count whose last attach failed: not counted, tried again at each
    /// sync.
    pub unattached_interfaces: Vec<String>,
    /// Interfaces the default selection would take that `exclude_interfaces` leaves out.
    pub excluded_interfaces: usize,
}

/// Why an interface there to count is not attached.
#[derive(PartialEq, Eq)]
pub(super) struct AttachFailure {
    interface: String,
    error: String,
}

/// An interface the classifiers are attached to: its name and framing as of the last sync,
/// and its link pins.
pub(super) struct AttachedInterface {
    name: String,
    framing: Framing,
    pub(super) pins: Vec<PathBuf>,
}

impl Attachment {
    /// Attaches the loaded classifiers to `links` at the start. Only loopback's failure
    /// refuses the start (the orphan reaper judges a layout by its loopback link); any other
    /// interface's is the polls' to retry, exported as after the start: one veth of hundreds
    /// whose hook refuses ours would otherwise keep a node's collector from starting at all.
    pub(super) fn attach_classifiers(&mut self, links: &[&Link]) -> anyhow::Result<()> {
        for &link in links {
            if let Err(err) = self.attach_interface(link) {
                // Pod veths come and go while a node starts or drains: one that went during
                // the start is the polls' to follow, and no failure.
                if !links::still_there(link) {
                    tracing::warn!(
                        interface = %link.name,
                        "the interface went away or changed during the start; the polls \
                         attach it if it is back: {err:#}"
                    );
                } else if link.loopback {
                    return Err(err);
                } else {
                    self.note_attach_failure(link, &err);
                }
            }
        }
        Ok(())
    }

    /// The start's refusal where interfaces were there to count and none could be attached
    /// (a kernel without TCX where loopback is not watched, one cause refusing every hook):
    /// such a start would count nothing live, with a warning and an alert ten minutes on.
    pub(super) fn refuse_if_none_attached(&self) -> anyhow::Result<()> {
        match self.attach_failures.values().next() {
            Some(failure) if self.attached.is_empty() => Err(anyhow::anyhow!(
                "no interface could be attached; {}: {}",
                failure.interface,
                failure.error
            )),
            _ => Ok(()),
        }
    }

    /// Remembers why `link`, there to count, could not be attached: exported until an attach
    /// succeeds, and logged once per error.
    fn note_attach_failure(&mut self, link: &Link, err: &anyhow::Error) {
        let failure = AttachFailure {
            interface: link.name.clone(),
            error: format!("{err:#}"),
        };
        if self.attach_failures.get(&link.index) != Some(&failure) {
            tracing::warn!(
                interface = %link.name,
                "attaching the classifiers failed, not counted until an attach succeeds (tried \
                 again at each poll; collector_interface_attach_failed is 1 meanwhile): {}",
                failure.error
            );
        }
        self.attach_failures.insert(link.index, failure);
    }

    /// Attaches every classifier that belongs on `link` (adopting links a crashed run
    /// pinned) and remembers the pins.
    fn attach_interface(&mut self, link: &Link) -> anyhow::Result<()> {
        let mut created = Vec::new();
        let attached = self.attach_interface_hooks(link, &mut created);
        if attached.is_err() {
            // One hook attached and the other not: the link pinned for the first would count
            // on while the interface reads as not attached, and no sync would remove it.
            for pin in &created {
                if let Err(err) = remove_if_present(pin) {
                    tracing::warn!("removing {} after a failed attach: {err:#}", pin.display());
                }
            }
        } else if let Some(created_pins) = &mut self.created_pins {
            created_pins.extend(created);
        }
        attached
    }

    /// Attaches the classifiers to `link`'s hooks, with the pins it makes in `created`.
    fn attach_interface_hooks(
        &mut self,
        link: &Link,
        created: &mut Vec<PathBuf>,
    ) -> anyhow::Result<()> {
        let links_dir = paths::map_pin_dir(&self.pin_dir).join(LINKS_DIR);
        let mut pins = Vec::new();
        for &(program_name, attach_type, prefix, goes_on) in &self.classifiers {
            if !goes_on.fits(link) {
                continue;
            }
            let program: &mut SchedClassifier = self
                .ebpf
                .program_mut(program_name)
                .with_context(|| format!("the kernel object has no program {program_name}"))?
                .try_into()?;
            let pin = links_dir.join(format!("{prefix}_{}", link.index));
            let fd = program
                .fd()
                .with_context(|| {
                    format!(
                        "{program_name} was not loaded at the start, where every configured \
                         interface was there with Ethernet framing; restart the collector to \
                         count {}",
                        link.name
                    )
                })?
                .try_clone()
                .with_context(|| format!("duplicating the descriptor of {program_name}"))?;
            if adopt_or_pin_link(&pin, fd.as_fd(), || {
                attach_tcx(program, program_name, attach_type, &link.name)
            })? {
                self.inherited = true;
            } else {
                created.push(pin.clone());
            }
            pins.push(pin);
        }
        // The attach found the device by name: a device recreated under the name since the
        // list was read got links pinned under the old one's index, which the next poll
        // would take for a gone interface's (and so detach the new device).
        if !links::still_there(link) {
            anyhow::bail!(
                "{} was deleted, renamed or recreated during the attach",
                link.name
            );
        }
        self.attached.insert(
            link.index,
            AttachedInterface {
                name: link.name.clone(),
                framing: link.framing,
                pins,
            },
        );
        Ok(())
    }

    /// Keeps the attached set current: attaches interfaces that appeared (or came up),
    /// forgets those that went away, and follows those renamed.
    /// What could not be attached is remembered (exported, and logged when its error is
    /// new: the sync runs at every poll and every link announcement).
    pub fn sync_interfaces(&mut self, links: &[Link], watched: links::Watched<'_>) {
        self.keep_redirect_devices(links);
        let configured = watched.listed;
        let wanted: Vec<&Link> = links
            .iter()
            .filter(|l| {
                if watched.by_default() {
                    // One renamed into an excluded name is forgotten, as one gone.
                    if watched.excludes(l) {
                        return false;
                    }
                    // One attached (or failing to be) stays while down (a flapping uplink,
                    // `netplan apply`): its series go on through the outage, when an SRE
                    // wants its error and drop counts, and it is not detached and attached
                    // again (which met the old links still on the hooks: "File exists").
                    links::watched_by_default_if_up(l, links, |link| {
                        link.up
                            || self.attached.contains_key(&link.index)
                            || self.attach_failures.contains_key(&link.index)
                    })
                } else {
                    // Down or up, as at the start: a configured interface taken down (a
                    // bond in maintenance) keeps its hooks and its series, where forgotten
                    // it vanished from every signal, `collector_interface_missing` too.
                    l.framing.parsed() && configured.iter().any(|name| l.named(name))
                }
            })
            .collect();
        // By index alone: a renamed interface keeps its links (named by index, and still on
        // the device). Forgotten and attached anew, its new link met the old one, whose
        // detach the kernel defers (`bpf_link_put`), still on the hook: "File exists".
        let gone: Vec<u32> = self
            .attached
            .keys()
            .filter(|index| !wanted.iter().any(|l| l.index == **index))
            .copied()
            .collect();
        for index in gone {
            if let Some(interface) = self.attached.get(&index) {
                tracing::info!(
                    interface = %interface.name,
                    "interface gone, down, or renamed into exclude_interfaces: forgetting it"
                );
            }
            self.forget(index);
        }
        self.reattached
            .retain(|(index, _), _| links.iter().any(|l| l.index == *index));
        self.note_missing(links::missing(links, configured));
        self.note_unparsed(links, watched);
        self.note_excluded(links, watched, false);
        self.attach_failures
            .retain(|index, _| wanted.iter().any(|l| l.index == *index));
        for link in wanted {
            if self.attached.contains_key(&link.index) && !self.replaced(link) {
                continue;
            }
            match self.attach_interface(link) {
                Ok(()) => {
                    self.attach_failures.remove(&link.index);
                    tracing::info!(interface = %link.name, "new interface: attached");
                }
                // A pod's veth deleted while it was attached: not a failure (the next list
                // has it gone).
                Err(err) if !links::still_there(link) => {
                    self.attach_failures.remove(&link.index);
                    tracing::debug!(interface = %link.name, "went away during the attach: {err:#}");
                }
                Err(err) => self.note_attach_failure(link, &err),
            }
        }
    }

    /// Forgets the interfaces (index, name, error) whose hooks could not get ours again:
    /// failing, not gone, they are exported as such until an attach succeeds.
    fn forget_failing(&mut self, failed: &[(u32, String, String)]) {
        for (index, interface, error) in failed {
            self.forget(*index);
            let failure = AttachFailure {
                interface: interface.clone(),
                error: error.clone(),
            };
            self.attach_failures.insert(*index, failure);
        }
    }

    /// Whether attached interface `link.index` must be attached anew; if so it has been
    /// forgotten. A new name or framing under a known index is a rename, or another device
    /// that took the index of one deleted since the last sync (an index given at its
    /// creation, or moved in from another namespace with it), which was taken for a rename:
    /// its dead links then counted as ours detached, and the old framing's programs went on
    /// a device of another. The deleted device's links are defunct (their device reads 0).
    /// What this cannot tell: a link detached by hand (`bpftool link detach`, defunct too) on
    /// a device renamed in the same interval is taken for a replacement, and a device moved
    /// out to another namespace (its links go with it, alive) and replaced here under the
    /// same framing is taken for a rename (the hook check then attaches ours again, counted
    /// as reattached).
    fn replaced(&mut self, link: &Link) -> bool {
        let Some(interface) = self.attached.get_mut(&link.index) else {
            return true;
        };
        if interface.name == link.name && interface.framing == link.framing {
            return false;
        }
        let defunct = interface.pins.first().is_some_and(|pin| {
            bpf_sys::open_pinned(pin)
                .and_then(|link| bpf_sys::tcx_link_ifindex(link.as_fd()))
                .is_ok_and(|ifindex| ifindex == Some(0))
        });
        if !defunct && interface.framing == link.framing {
            tracing::info!(interface = %link.name, was = %interface.name, "interface renamed: its links stay");
            link.name.clone_into(&mut interface.name);
            return false;
        }
        let was = interface.name.clone();
        self.forget(link.index);
        // A new device: its hooks' figures start afresh.
        self.reattached.retain(|&(index, _), _| index != link.index);
        if defunct {
            tracing::info!(interface = %link.name, %was, "interface deleted, and another made with its index: attached anew");
        } else {
            // The same device (a configured tun's link type changed while down): the old
            // framing's programs leave the hook after a delay (`bpf_link_put`), behind the
            // new ones, which go first.
            tracing::info!(interface = %link.name, "interface changed its framing: attached anew");
        }
        true
    }

    /// Tells the classifiers the namespace's ifb devices (`REDIRECT_DEVICES`), when they
    /// changed: the packets one hands back to the device that redirected them cross that
    /// device's egress hook a second time.
    pub(super) fn keep_redirect_devices(&mut self, links: &[Link]) {
        let ifbs: Vec<u32> = links::redirect_devices(links).collect();
        let mut devices = [0; MAX_REDIRECT_DEVICES];
        for (slot, &index) in devices.iter_mut().zip(&ifbs) {
            *slot = index;
        }
        if devices == self.redirect_devices {
            return;
        }
        if ifbs.len() > MAX_REDIRECT_DEVICES {
            tracing::warn!(
                ifbs = ifbs.len(),
                "more ifb devices than the {MAX_REDIRECT_DEVICES} the classifiers know: packets \
                 the others hand back count twice out"
            );
        }
        let written = self
            .ebpf
            .map_mut(map_names::REDIRECT_DEVICES)
            .context("the kernel object has no ifb table")
            .and_then(|map| {
                let mut map: Array<&mut MapData, [u32; MAX_REDIRECT_DEVICES]> =
                    Array::try_from(map)?;
                Ok(map.set(0, devices, 0)?)
            });
        match written {
            Ok(()) => self.redirect_devices = devices,
            Err(err) => tracing::warn!("telling the classifiers the ifb devices: {err:#}"),
        }
    }

    /// Logs the configured interfaces that went missing or came, and keeps the list.
    pub(super) fn note_missing(&mut self, missing: Vec<String>) {
        for interface in missing
            .iter()
            .filter(|m| !self.missing_interfaces.contains(m))
        {
            tracing::warn!(
                %interface,
                "the configured interface is gone, or has a framing the classifiers do not parse: \
                 not counted until it is back (collector_interface_missing is 1 meanwhile)"
            );
        }
        for interface in self
            .missing_interfaces
            .iter()
            .filter(|m| !missing.contains(m))
        {
            tracing::info!(%interface, "the configured interface is there");
        }
        self.missing_interfaces = missing;
    }

    /// Says in the log, once each time it is up, which interfaces the default selection
    /// leaves out for their framing (configured ones are missing instead).
    pub(super) fn note_unparsed(&mut self, links: &[Link], watched: links::Watched<'_>) {
        let unparsed: Vec<(u32, String)> = links::unparsed_up(links, watched).collect();
        for (index, interface) in &unparsed {
            if self.unparsed_noted.insert(*index) {
                tracing::warn!(
                    %interface,
                    "the interface is up, but its framing is not one the classifiers parse \
                     (Ethernet, loopback, none): its live traffic and DNS go uncounted; its \
                     connections count, at their close"
                );
            }
        }
        // One taken down is said again when it comes back up.
        self.unparsed_noted
            .retain(|index| unparsed.iter().any(|(up, _)| up == index));
    }

    /// Keeps the count of interfaces `exclude_interfaces` leaves out, and names them in the
    /// log at the start (after it only in the debug log: pods come and go all day).
    pub(super) fn note_excluded(
        &mut self,
        links: &[Link],
        watched: links::Watched<'_>,
        start: bool,
    ) {
        let excluded: Vec<&str> = links::excluded(links, watched)
            .map(|link| link.name.as_str())
            .collect();
        let none_left = links::selection(links, watched).links.is_empty();
        if start && !excluded.is_empty() && none_left {
            tracing::warn!(
                count = excluded.len(),
                "every up interface is left out by exclude_interfaces: no live traffic or DNS is counted on any until one that no pattern covers comes up: {}",
                links::name_list(&excluded, links::EXCLUDED_SHOWN)
            );
        } else if start && !excluded.is_empty() {
            tracing::info!(
                count = excluded.len(),
                "left out by exclude_interfaces (collector_interfaces_excluded): {}",
                links::name_list(&excluded, links::EXCLUDED_SHOWN)
            );
        } else if excluded.len() != self.excluded_interfaces {
            tracing::debug!(count = excluded.len(), "left out by exclude_interfaces");
        }
        self.excluded_interfaces = excluded.len();
    }

    /// Names of the interfaces the classifiers are attached to.
    #[must_use]
    pub fn interfaces(&self) -> Vec<String> {
        self.attached
            .values()
            .map(|interface| interface.name.clone())
            .collect()
    }

    /// Checks every attached hook (`BPF_PROG_QUERY`, one call per hook), at each poll: how
    /// many TCX programs run before ours (a program ahead of ours that ends the chain, as
    /// most do, hides that hook's packets from us; ours go first when attached, and one
    /// attached at the head later goes ahead of them), said in the log when that count
    /// changes from or to 0; and whether ours is there at all. One detached (`bpftool link
    /// detach`: its pin stays, counting nothing) is attached again with a fresh link, pinned
    /// in place of the dead one, with a warning and [`TcHook::reattached`]; an interface
    /// where that fails is forgotten, so the next poll attaches it anew (or says why not).
    /// Also returns the configured interfaces missing, as the last sync found them.
    pub fn check_hooks(&mut self) -> HookCheck {
        // Our counting programs' ids, looked up once for every interface.
        let ours: Vec<(&'static str, TcAttachType, &str, u32)> = self
            .classifiers
            .iter()
            .filter(|(name, ..)| *name != program_names::STATS_FLOOR_TC)
            .filter_map(|&(name, attach_type, prefix, _)| {
                let info = self.ebpf.program(name)?.info().ok()?;
                Some((name, attach_type, prefix, info.id()))
            })
            .collect();
        let mut hooks = Vec::new();
        let mut failed = Vec::new();
        let attached: Vec<(u32, String, Vec<PathBuf>)> = self
            .attached
            .iter()
            .map(|(&index, attached)| (index, attached.name.clone(), attached.pins.clone()))
            .collect();
        for (ifindex, interface, pins) in attached {
            for &(program_name, attach_type, prefix, ours) in &ours {
                let pin_name = format!("{prefix}_{ifindex}");
                let Some(pin) = pins
                    .iter()
                    .find(|pin| pin.file_name() == Some(pin_name.as_ref()))
                else {
                    continue;
                };
                let (hook, tcx) = match attach_type {
                    TcAttachType::Egress => ("egress", bpf_sys::BPF_TCX_EGRESS),
                    _ => ("ingress", bpf_sys::BPF_TCX_INGRESS),
                };
                let ids = match bpf_sys::tcx_programs(ifindex, tcx) {
                    Ok(ids) => ids,
                    Err(err) => {
                        tracing::debug!(%interface, hook, "listing the hook's programs: {err}");
                        continue;
                    }
                };
                let count = match ids.iter().position(|&id| id == ours) {
                    Some(count) => count,
                    None => match self.reattach(program_name, attach_type, &interface, pin) {
                        Ok(()) => {
                            *self.reattached.entry((ifindex, hook)).or_default() += 1;
                            tracing::warn!(
                                %interface,
                                hook,
                                "our program was detached from the hook (its live traffic and \
                                 DNS went uncounted since the last poll): attached it again"
                            );
                            // First again.
                            0
                        }
                        Err(err) => {
                            tracing::warn!(
                                %interface,
                                hook,
                                "our program was detached from the hook, and attaching it \
                                 again failed (the interface is attached anew at the next \
                                 poll): {err:#}"
                            );
                            let error = format!("{err:#}");
                            failed.push((ifindex, interface.clone(), error));
                            continue;
                        }
                    },
                };
                let before = self.ahead_seen.insert((ifindex, hook), count).unwrap_or(0);
                if count > 0 && before == 0 {
                    tracing::warn!(%interface, hook, count, "programs now run before ours: one that ends the chain hides the hook's packets from us (a clean restart attaches ours first again)");
                } else if count == 0 && before > 0 {
                    tracing::info!(%interface, hook, "ours run first again");
                }
                hooks.push((
                    ifindex,
                    TcHook {
                        interface: interface.clone(),
                        hook,
                        programs_ahead: count,
                        reattached: self.reattached.get(&(ifindex, hook)).copied().unwrap_or(0),
                    },
                ));
            }
        }
        self.forget_failing(&failed);
        HookCheck {
            hooks: hooks
                .into_iter()
                .filter(|(index, _)| !failed.iter().any(|(failed, ..)| failed == index))
                .map(|(_, hook)| hook)
                .collect(),
            missing_interfaces: self.missing_interfaces.clone(),
            unattached_interfaces: self
                .attach_failures
                .values()
                .map(|failure| failure.interface.clone())
                .collect(),
            excluded_interfaces: self.excluded_interfaces,
        }
    }

    /// Attaches `program_name` to `interface`'s hook with a fresh link pinned at `pin`, in
    /// place of the detached link pinned there.
    fn reattach(
        &mut self,
        program_name: &str,
        attach_type: TcAttachType,
        interface: &str,
        pin: &Path,
    ) -> anyhow::Result<()> {
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(program_name)
            .with_context(|| format!("the kernel object has no program {program_name}"))?
            .try_into()?;
        // The dead link's pin goes first (it holds nothing on the hook), so the new one can
        // take its name.
        remove_if_present(pin)?;
        pin_link(
            attach_tcx(program, program_name, attach_type, interface)?,
            pin,
        )
    }

    /// Forgets the attached interface `index`: its link pins are removed, which detaches
    /// its links.
    pub(super) fn forget(&mut self, index: u32) {
        self.ahead_seen.retain(|&(seen, _), _| seen != index);
        if let Some(interface) = self.attached.remove(&index) {
            for pin in interface.pins {
                if let Err(err) = remove_if_present(&pin) {
                    tracing::warn!("{err:#}");
                }
            }
        }
    }
}
