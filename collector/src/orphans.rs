//! Pins whose collector's network namespace is gone: a sidecar's pod deleted while its
//! collector was down, or a pod's namespace made anew (same pod UID, so the same pin
//! directory) after a crash. Nothing else would ever remove them, and their `sock_ops` link
//! keeps a program on the host's cgroup2 root running for every TCP socket of the node.
//!
//! The layout's TCX link pins tell: the kernel reports interface index 0 for a TCX link
//! whose device was unregistered (`tcx_link_fill_info`, Linux 6.6), and a namespace's
//! devices are unregistered when it goes (a physical one is moved out instead and keeps an
//! index: those pins are left, for `cleanup`). Loopback, which a collector watches by
//! default, goes only with its namespace, where any other device may be deleted while the
//! namespace lives on. So a layout is orphaned when its loopback link pin reads 0 and every
//! other one does too; one without a loopback link (a config that leaves lo out), or with a
//! link that cannot be read, is never judged orphaned.
//!
//! At start, the agent removes such pins in its own pin directory (else it would refuse them
//! as another namespace's for ever) and in the sibling pin directories of the node
//! (`collector`, `collector-<pod UID>`), each under its lock, as `collector cleanup --apply`
//! does. A sibling whose pins are this namespace's is left, orphaned or not: a crashed run
//! here may be started again and must keep its counters.
//!
//! A sibling's pins that were never claimed (a start killed while its programs loaded, before
//! it marked them as its namespace's) are removed too, under the lock, when they have no tc
//! link or only links whose devices are gone: nothing has counted into them, and the pod they
//! belong to, if it still runs, takes over or makes anew the same empty maps. Where that pod
//! was deleted, nothing else would ever remove them.

use std::{ffi::OsStr, fs, io, os::fd::AsFd as _, path::Path};

use anyhow::Context as _;
use collector_common::map_names;

use crate::{bpf_sys, cleanup, loader, paths, pin_lock};

/// Base name of the documented pin directories: `collector` (the `DaemonSet`, systemd) and
/// `collector-<pod UID>` (sidecars). Only directories named so are looked at as siblings.
pub const PIN_DIR_BASE: &str = "collector";

/// What one tc link pin reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcLink {
    /// A link on loopback (`tc_loopback_*`, `stats_floor_loopback_*`).
    pub loopback: bool,
    /// Its device's index; 0 once the device is gone.
    pub ifindex: u32,
}

/// Whether a layout whose tc link pins read `links` is orphaned: loopback's device is gone,
/// which happens only with its namespace, and every other one's too.
#[must_use]
pub fn orphaned(links: &[TcLink]) -> bool {
    links.iter().any(|link| link.loopback) && links.iter().all(|link| link.ifindex == 0)
}

/// Whether pins owned by the namespace `owner` (`PIN_OWNER`; 0: never claimed), whose tc
/// links read `links`, are to be removed by a collector of the namespace `own_netns`:
/// another namespace's, and [`orphaned`].
#[must_use]
pub fn removable(owner: u64, own_netns: u64, links: &[TcLink]) -> bool {
    owner != 0 && owner != own_netns && orphaned(links)
}

/// Whether a sibling's pins owned by `owner`, whose tc links read `links`, are a killed
/// start's that never claimed them: no owner, and no link that still runs a program on a
/// device (a start is killed before its loopback link, or between it and the claim).
#[must_use]
pub fn unclaimed_leftover(owner: u64, links: &[TcLink]) -> bool {
    owner == 0 && (links.is_empty() || orphaned(links))
}

/// Why a sibling's pins are removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leftover {
    /// A collector of the namespace with this cookie, now gone.
    GoneNamespace(u64),
    /// A start killed before it claimed them.
    Unclaimed,
}

/// Whether a directory entry called `name` is one of the documented pin directories
/// ([`PIN_DIR_BASE`], alone or followed by `-` and a suffix).
#[must_use]
pub fn is_pin_dir_name(name: &OsStr) -> bool {
    name.to_str().is_some_and(|name| {
        name == PIN_DIR_BASE
            || name
                .strip_prefix(PIN_DIR_BASE)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|suffix| !suffix.is_empty())
    })
}

/// Whether a link pin called `name` is one of the tc links the loader pins: a TCX link
/// ([`loader::TC_LINK_PINS`], `_`, the interface index).
#[must_use]
pub fn is_tc_link_pin(name: &OsStr) -> bool {
    name.to_str().is_some_and(|name| {
        loader::TC_LINK_PINS.iter().any(|prefix| {
            name.strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('_'))
                .is_some_and(|index| !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()))
        })
    })
}

/// Whether the tc link pin called `name` is on loopback.
pub fn is_loopback_link_pin(name: &OsStr) -> bool {
    name.to_str().is_some_and(|name| {
        loader::TC_LOOPBACK_LINK_PINS
            .iter()
            .any(|prefix| name.starts_with(&format!("{prefix}_")))
    })
}

/// The owner of the layout at `map_dir` if its pins are [`removable`] by a collector of
/// `own_netns`; `None` if not, or if there are no pins (or none left: a collector removing
/// them at its stop) to judge.
pub fn gone_owner(map_dir: &Path, own_netns: u64) -> anyhow::Result<Option<u64>> {
    // This namespace's, or never claimed: not removable whatever the links read.
    let Some(owner) = pinned_owner(map_dir)?.filter(|&owner| owner != 0 && owner != own_netns)
    else {
        return Ok(None);
    };
    let links = tc_links(&map_dir.join(loader::LINKS_DIR))?;
    Ok(removable(owner, own_netns, &links).then_some(owner))
}

/// The owner word of the layout at `map_dir` (0: never claimed); `None` without its pin.
pub fn pinned_owner(map_dir: &Path) -> anyhow::Result<Option<u64>> {
    let owner_pin = map_dir.join(map_names::PIN_OWNER);
    if !is_file(&owner_pin)? {
        return Ok(None);
    }
    loader::read_pin_owner(&owner_pin)
        .with_context(|| format!("reading {}", owner_pin.display()))
        .map(Some)
}

/// What each tc link pin under `links_dir` reads. A pin of that name that is not a TCX link
/// is an error: the layout cannot be judged.
fn tc_links(links_dir: &Path) -> anyhow::Result<Vec<TcLink>> {
    if !is_dir(links_dir)? {
        return Ok(Vec::new());
    }
    let mut links = Vec::new();
    for (name, path, link) in loader::open_link_pins(links_dir, is_tc_link_pin)? {
        let ifindex = bpf_sys::tcx_link_ifindex(link.as_fd())
            .with_context(|| format!("reading the link {}", path.display()))?
            .with_context(|| format!("{} is not a TCX link", path.display()))?;
        links.push(TcLink {
            loopback: is_loopback_link_pin(&name),
            ifindex,
        });
    }
    Ok(links)
}

/// Removes the pins a collector of a namespace that is gone left in the sibling pin
/// directories of `pin_dir` (see the module doc), each under its lock; a running
/// collector's are locked, and skipped. Says what it removed, and what it could not judge
/// or remove, as warnings: this never fails a start.
pub fn reap_siblings(pin_dir: &Path, own_netns: u64) {
    let dirs = match siblings(pin_dir) {
        Ok(dirs) => dirs,
        Err(err) => {
            tracing::warn!(
                "looking beside {} for pins that collectors of namespaces now gone left: {err}",
                pin_dir.display()
            );
            return;
        }
    };
    for dir in dirs {
        match reap(&dir, own_netns) {
            Ok(Some(Leftover::GoneNamespace(owner))) => tracing::warn!(
                "the pins under {} were left by a collector whose network namespace is gone \
                 (cookie {owner}): removed them, with their programs",
                dir.display()
            ),
            Ok(Some(Leftover::Unclaimed)) => tracing::warn!(
                "the pins under {} were left by a start killed before it claimed them (no \
                 collector ran with them): removed them",
                dir.display()
            ),
            Ok(None) => {}
            // Its pins went meanwhile (a stop, a cleanup, another start): nothing to say.
            Err(_) if !paths::map_pin_dir(&dir).join(map_names::PIN_OWNER).exists() => {}
            Err(err) => tracing::warn!(
                "looking at the pins under {} for a collector whose network namespace is gone \
                 (left in place; `collector cleanup --apply --pin-dir {}` removes them once no \
                 collector runs with them): {err:#}",
                dir.display(),
                dir.display()
            ),
        }
    }
}

/// How many sibling pin directories of `pin_dir` hold pins that [`reap_siblings`] would
/// remove now, with their links (judged without their locks, as `collector check` asks).
#[must_use]
pub fn sibling_leftovers(pin_dir: &Path, own_netns: u64) -> usize {
    siblings(pin_dir)
        .unwrap_or_default()
        .iter()
        .filter(|dir| {
            leftover(&paths::map_pin_dir(dir), own_netns).is_ok_and(|left| left.is_some())
        })
        .count()
}

/// The sibling pin directories of `pin_dir`: the other documented pin directories beside
/// it, directories themselves (not symbolic links to one). None where `pin_dir` is not a
/// documented one.
fn siblings(pin_dir: &Path) -> io::Result<Vec<std::path::PathBuf>> {
    let (Some(parent), Some(own_name)) = (pin_dir.parent(), pin_dir.file_name()) else {
        return Ok(Vec::new());
    };
    if !is_pin_dir_name(own_name) {
        return Ok(Vec::new());
    }
    Ok(fs::read_dir(parent)?
        .flatten()
        .filter(|entry| {
            is_sibling(own_name, &entry.file_name())
                && entry.file_type().is_ok_and(|kind| kind.is_dir())
        })
        .map(|entry| entry.path())
        .collect())
}

/// Removes the layout under the sibling pin directory `dir`, and `dir` if nothing else is
/// left in it, if its pins are [`removable`] or an [`unclaimed_leftover`]: what left them.
/// Judged first without the lock, so that a live collector's directory is never locked, even
/// for a moment, by another's start; then again under it (a start under way holds it).
fn reap(dir: &Path, own_netns: u64) -> anyhow::Result<Option<Leftover>> {
    let map_dir = paths::map_pin_dir(dir);
    if !is_dir(&map_dir)? || leftover(&map_dir, own_netns)?.is_none() {
        return Ok(None);
    }
    let Some(_lock) = pin_lock::lock_if_current(dir)? else {
        return Ok(None);
    };
    let Some(left) = leftover(&map_dir, own_netns)? else {
        return Ok(None);
    };
    cleanup::remove_layout(&map_dir)?;
    cleanup::remove_dir_if_empty(dir)?;
    Ok(Some(left))
}

/// Why the sibling layout at `map_dir` is to be removed, if it is.
fn leftover(map_dir: &Path, own_netns: u64) -> anyhow::Result<Option<Leftover>> {
    // Read once: the owner pin, then the links only where they can decide.
    let Some(owner) = pinned_owner(map_dir)?.filter(|&owner| owner != own_netns) else {
        return Ok(None);
    };
    let links = tc_links(&map_dir.join(loader::LINKS_DIR))?;
    Ok(if removable(owner, own_netns, &links) {
        Some(Leftover::GoneNamespace(owner))
    } else if unclaimed_leftover(owner, &links) {
        Some(Leftover::Unclaimed)
    } else {
        None
    })
}

/// Whether `path` is a directory (not a symbolic link to one).
fn is_dir(path: &Path) -> anyhow::Result<bool> {
    file_kind(path, fs::FileType::is_dir)
}

/// Whether `path` is a file (a pin; not a symbolic link to one).
fn is_file(path: &Path) -> anyhow::Result<bool> {
    file_kind(path, fs::FileType::is_file)
}

fn file_kind(path: &Path, kind: fn(&fs::FileType) -> bool) -> anyhow::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(meta) => Ok(kind(&meta.file_type())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err).with_context(|| format!("looking at {}", path.display())),
    }
}

/// Whether the entry `name` beside the pin directory `own` (itself one of the documented
/// names) is a sibling pin directory to look at.
fn is_sibling(own: &OsStr, name: &OsStr) -> bool {
    name != own && is_pin_dir_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LO_GONE: TcLink = TcLink {
        loopback: true,
        ifindex: 0,
    };
    const GONE: TcLink = TcLink {
        loopback: false,
        ifindex: 0,
    };
    const LIVE: TcLink = TcLink {
        loopback: false,
        ifindex: 2,
    };

    #[test]
    fn orphaned_only_when_loopbacks_link_and_every_other_read_a_device_gone() {
        assert!(orphaned(&[LO_GONE]));
        assert!(orphaned(&[LO_GONE, GONE, GONE]));
        // No tc link pins: nothing says the namespace is gone.
        assert!(!orphaned(&[]));
        // No loopback link: devices deleted in a namespace that may live on.
        assert!(!orphaned(&[GONE, GONE]));
        // One device left (a physical one moved out of the namespace).
        assert!(!orphaned(&[LO_GONE, LIVE]));
        assert!(!orphaned(&[
            TcLink {
                loopback: true,
                ifindex: 1
            },
            GONE
        ]));
    }

    #[test]
    fn only_another_namespaces_orphaned_pins_are_removable() {
        let (own, other) = (7, 9);
        assert!(removable(other, own, &[LO_GONE, GONE]));
        // This namespace's: a crashed run here keeps its counters for the next start.
        assert!(!removable(own, own, &[LO_GONE, GONE]));
        // Never claimed, so no links were made by that start.
        assert!(!removable(0, own, &[LO_GONE]));
        assert!(!removable(other, own, &[]));
        assert!(!removable(other, own, &[LO_GONE, LIVE]));
    }

    #[test]
    fn a_sibling_never_claimed_is_left_over_while_no_device_runs_its_programs() {
        assert!(unclaimed_leftover(0, &[]));
        assert!(unclaimed_leftover(0, &[LO_GONE, GONE]));
        // Killed after its loopback link, in a namespace that lives on: its pod's next start
        // takes them over.
        assert!(!unclaimed_leftover(
            0,
            &[TcLink {
                loopback: true,
                ifindex: 1
            }]
        ));
        assert!(!unclaimed_leftover(0, &[LO_GONE, LIVE]));
        // Claimed: judged by `removable`.
        assert!(!unclaimed_leftover(9, &[]));
        assert!(!unclaimed_leftover(9, &[LO_GONE]));
    }

    #[test]
    fn siblings_are_the_documented_pin_directories_but_ours() {
        let names = [
            "collector",
            "collector-0b6d8c1e-uid",
            "collector-test-12-3",
            "collector-",
            "collectors",
            "collector_x",
            "tc",
            "ip",
            "cilium",
            "check-probe-12",
        ];
        let siblings = |own: &str| -> Vec<&str> {
            names
                .iter()
                .copied()
                .filter(|name| is_sibling(OsStr::new(own), OsStr::new(name)))
                .collect()
        };
        assert_eq!(
            siblings("collector-0b6d8c1e-uid"),
            ["collector", "collector-test-12-3"]
        );
        assert_eq!(
            siblings("collector"),
            ["collector-0b6d8c1e-uid", "collector-test-12-3"]
        );
        // A pin directory of another name looks at no siblings at all (`reap_siblings`).
        assert!(!is_pin_dir_name(OsStr::new("metrics")));
        assert!(!is_pin_dir_name(OsStr::new("collectors")));
    }

    #[test]
    fn only_the_tc_link_pins_are_read() {
        for name in [
            "tc_ingress_1",
            "tc_egress_12",
            "tc_ingress_ip_3",
            "tc_loopback_1",
            "stats_floor_ingress_3",
            "stats_floor_egress_3",
            "stats_floor_loopback_1",
        ] {
            assert!(is_tc_link_pin(OsStr::new(name)), "{name}");
            assert_eq!(
                is_loopback_link_pin(OsStr::new(name)),
                name.contains("loopback"),
                "{name}"
            );
        }
        for name in [
            "sock_ops",
            "sock_ops_stats_floor",
            "tc_ingress",
            "tc_ingress_",
            "tc_ingress_1a",
            "tc_ingress1",
            "xtc_ingress_1",
            "CONN_COUNTERS",
        ] {
            assert!(!is_tc_link_pin(OsStr::new(name)), "{name}");
        }
    }
}
