//! `collector cleanup [--apply]`: what a crashed collector left under its pin directory
//! (pinned maps and links, whose programs count on) and its nftables table, listed, then
//! removed.
//!
//! Nothing that is not the crashed collector's is touched:
//! - a collector running with the pin directory holds it locked: `--apply` is refused, and
//!   a listing says it runs and lists only what is not its own;
//! - the nftables table is looked for in this network namespace, and removed only when it is
//!   recognisably a collector's (`nft::Leftover`: a table of that name that is not, a host
//!   firewall's `inet filter` say, is named and left), and when the pins' owner (`PIN_OWNER`, the namespace cookie of the collector that made them) is this
//!   namespace. The documented sidecar cleanup runs on the node, where the node's own
//!   collector may use the same table name: a crashed sidecar's table was in its pod's
//!   namespace, and went with it. Nor when a running collector of this namespace holds the
//!   table's name ([`crate::nft_claim`]);
//! - a pin directory that is the bpffs mount itself (/sys/fs/bpf), where other tools pin
//!   too, is refused, naming the command that removes this build's layout there;
//! - under the pin directory, this build's layout directory (`v1`) is removed whole, link
//!   pins first (removing one detaches its program), then the pin directory if nothing else
//!   is left in it. Another layout version's directory (`v2`), whose links keep their
//!   programs attached, is listed with the command that removes it, and the status is 1. A
//!   `collector check` probe directory (`check-probe-PID`) and anything else are listed and
//!   left, and not looked into.
//!
//! A start removes the pins of a collector whose network namespace is gone by the same
//! functions ([`remove_layout`], see `orphans`).

use std::{
    fmt::Write as _,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::Context as _;
use collector_common::map_names;

use crate::{
    config::Config, links, loader, netns, nfnetlink, nft, nft_claim, output, paths, pin_lock,
    privileges,
};

/// The cleanup command for what this process attaches and pins, as its recovery hints name it.
static COMMAND: OnceLock<String> = OnceLock::new();

/// Records how this process was started: the `cleanup` that its hints name then gets the same
/// `--config` and `--pin-dir`, so that it looks for the pins and the nftables table where this
/// run put them (with the default's it would find and remove nothing).
pub fn note_invocation(config_file: Option<&Path>, pin_dir: Option<&Path>) {
    // Set once, at start; a second call changes nothing.
    let _ = COMMAND.set(command_for(config_file, pin_dir));
}

/// `collector cleanup --apply` with these options (the config file's path made absolute).
fn command_for(config_file: Option<&Path>, pin_dir: Option<&Path>) -> String {
    let mut command = String::from("collector cleanup --apply");
    if let Some(file) = config_file {
        let file = std::path::absolute(file).unwrap_or_else(|_| file.to_owned());
        let _ = write!(command, " --config {}", shell_word(&file));
    }
    if let Some(pin_dir) = pin_dir {
        let _ = write!(command, " --pin-dir {}", shell_word(pin_dir));
    }
    command
}

/// `collector cleanup --apply`, with the options this process was started with.
pub fn command() -> &'static str {
    COMMAND
        .get()
        .map_or("collector cleanup --apply", String::as_str)
}

/// `path` as one word of a shell command line: quoted unless it needs none.
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Whose the pins are, as `PIN_OWNER` says.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owner {
    /// The cookie of the network namespace whose collector made them.
    Namespace(u64),
    /// No pins, or none that says: why.
    Unknown(String),
}

/// What is done about the nftables table.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Table {
    /// None of ours in this namespace, and no other to speak of.
    Absent,
    /// The crashed collector's, in this namespace: removed with --apply.
    Remove,
    /// The pins are of a collector of the namespace with this cookie: its table is there.
    Elsewhere { owner: u64, here: u64 },
    /// One with our name is in this namespace, but no pins say it is a crashed collector's.
    Unclaimed(String),
    /// One with our name is in this namespace, but it is not a collector's table (the words
    /// after "it"): never touched.
    NotOurs(String),
    /// The crashed collector's name, but a running collector of this namespace (with
    /// another pin directory) holds it: the table is that one's now.
    InUse(nft_claim::Holder),
}

/// What a directory entry of the pin directory is, by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    /// This build's layout directory (`v1`): removed whole.
    Ours,
    /// Another layout version's directory (`v2`): another build's pins, whose links keep
    /// their programs attached; left, and named with the command that removes it.
    OtherLayout,
    /// The directory `collector check` pins a throwaway map in, with the check's process id:
    /// no collector's pins; left.
    CheckProbe(u32),
    /// Anything else: not a collector's; left, and not looked into.
    Foreign,
}

/// What the entry named `name` of the pin directory is.
fn classify(name: &std::ffi::OsStr, is_dir: bool) -> Entry {
    let name = name.to_str().unwrap_or("");
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !is_dir {
        Entry::Foreign
    } else if name == paths::PIN_LAYOUT_VERSION {
        Entry::Ours
    } else if name.strip_prefix('v').is_some_and(digits) {
        Entry::OtherLayout
    } else if let Some(pid) = name
        .strip_prefix(paths::CHECK_PROBE_PREFIX)
        .filter(|pid| digits(pid))
        .and_then(|pid| pid.parse().ok())
    {
        Entry::CheckProbe(pid)
    } else {
        Entry::Foreign
    }
}

/// What is under the pin directory, by [`Entry`]; only layout directories are looked into.
#[derive(Debug, Default)]
struct Found {
    /// Whether this build's layout directory was there: the pin directory is a collector's,
    /// and removed once empty.
    has_layout: bool,
    /// The files (pins) under this build's layout directory.
    ours: Vec<PathBuf>,
    /// Other layout versions' directories, each with the files under it.
    other_layouts: Vec<(PathBuf, Vec<PathBuf>)>,
    /// `collector check` probe directories, with the check's process id.
    probes: Vec<(PathBuf, u32)>,
    /// Entries that are not a collector's.
    foreign: Vec<PathBuf>,
    /// The pin directory does not exist: the pin directories of other collectors on this
    /// bpffs, for the one asked about may be named otherwise here (a `DaemonSet`'s pod sees
    /// the node's /sys/fs/bpf/collectors as its /sys/fs/bpf).
    absent: Option<(Vec<PathBuf>, bool)>,
}

impl Found {
    fn of(pin_dir: &Path) -> anyhow::Result<Self> {
        let mut found = Self::default();
        if !paths::pin_exists(pin_dir)? {
            let bpffs = Path::new(paths::BPFFS_ROOT);
            found.absent = Some(pin_dirs_under(&[bpffs, &bpffs.join(MANIFESTS_PIN_ROOT)]));
            return Ok(found);
        }
        let mut entries = std::fs::read_dir(pin_dir)
            .with_context(|| format!("reading {}", pin_dir.display()))?
            .map(|entry| {
                let entry = entry?;
                Ok((entry.path(), entry.file_type()?.is_dir()))
            })
            .collect::<io::Result<Vec<_>>>()
            .with_context(|| format!("reading {}", pin_dir.display()))?;
        entries.sort();
        for (path, is_dir) in entries {
            match classify(path.file_name().unwrap_or_default(), is_dir) {
                Entry::Ours => {
                    let pins = walk(&path)?;
                    if layouts_pins(&path, &pins) {
                        found.has_layout = true;
                        found.ours = pins;
                    } else {
                        found.foreign.push(path);
                    }
                }
                Entry::OtherLayout => {
                    let pins = walk(&path)?;
                    found.other_layouts.push((path, pins));
                }
                Entry::CheckProbe(pid) => found.probes.push((path, pid)),
                Entry::Foreign => found.foreign.push(path),
            }
        }
        Ok(found)
    }

    /// The pins of other layout versions.
    fn other_pins(&self) -> impl Iterator<Item = &PathBuf> {
        self.other_layouts.iter().flat_map(|(_, pins)| pins)
    }
}

/// The directory of the node's bpffs that the Kubernetes manifests mount as a pod's
/// /sys/fs/bpf.
const MANIFESTS_PIN_ROOT: &str = "collectors";

/// Pin directories shown where the one asked about does not exist.
const PIN_DIRS_SHOWN: usize = 10;

/// The directories right under `roots` that hold a collector's pin layout, sorted, and
/// whether some could not be looked into (bpffs mounted without `mode=0700` lets anyone
/// list it, but the pin directories are root's alone).
fn pin_dirs_under(roots: &[&Path]) -> (Vec<PathBuf>, bool) {
    let mut unreadable = false;
    let mut dirs: Vec<PathBuf> = roots
        .iter()
        .filter_map(|root| std::fs::read_dir(root).ok())
        .flatten()
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|dir| {
            let there = paths::map_pin_dir(dir).try_exists();
            unreadable |= there.as_ref().is_err_and(privileges::denied);
            there.unwrap_or(false)
        })
        .collect();
    dirs.sort();
    (dirs, unreadable)
}

/// Refuses a pin directory that is the bpffs mount itself: other tools pin there too
/// (iproute2's and Cilium's `tc/globals`, bpftool's pins), and a removal of "every empty
/// directory" or "the rest" there would be theirs.
fn refuse_bpffs_root(config: &Config) -> anyhow::Result<()> {
    let pin_dir = &config.pin_dir;
    if paths::is_bpffs_root(pin_dir)? {
        anyhow::bail!(
            "pin_dir {} is the bpffs mount itself, where other tools pin too: cleanup works only \
             on a collector's own pin directory; pass the one the collector ran with (--pin-dir \
             or --config), or, if a collector ran with this one, remove its pins with `rm -r \
             {}` once it no longer runs (and its nftables table, unless another collector of this \
             network namespace uses it, with `nft delete table inet {}`)",
            pin_dir.display(),
            paths::map_pin_dir(pin_dir).display(),
            config.nftables.table
        );
    }
    Ok(())
}

/// `collector cleanup`: lists, and with `apply` removes, what a crashed collector left.
pub fn run(config: &Config, apply: bool) -> anyhow::Result<()> {
    refuse_bpffs_root(config)?;
    let pin_dir = &config.pin_dir;
    // Held to the end of a removal, so that no collector starts meanwhile. Without it (no
    // pin directory yet) nothing in bpffs is removed: a collector starting meanwhile makes
    // its directories under its own lock, and they are not ours to take away.
    let lock = if apply && paths::pin_exists(pin_dir)? {
        Some(lock_unless_running(pin_dir)?)
    } else {
        None
    };
    let found = Found::of(pin_dir);
    // A listing only looks (held, the lock would keep a start waiting), and then, beside a
    // running collector (also one that started while it looked), lists only what is not its
    // own: the pins it made or removed meanwhile are its own, not a crash's leftovers.
    if !apply {
        match pin_lock::held_by_another(pin_dir) {
            Ok(true) => return list_beside_holder(pin_dir, &found?),
            Ok(false) => {}
            // The listing's own read says it first (without root: bpffs is root's alone).
            Err(err) => {
                let _ = found?;
                return Err(err).context("looking for a running collector's lock");
            }
        }
    }
    let found = found?;
    let map_dir = paths::map_pin_dir(pin_dir);
    let owner = pin_owner(&map_dir)?;
    let here = netns::current_cookie()
        .context("reading this network namespace's cookie (SO_NETNS_COOKIE needs Linux 5.14)")?;
    let table_name = &config.nftables.table;
    // The table's claim, held until the table is gone: a collector of this namespace that
    // started meanwhile would adopt the table, and lose it to the removal. A listing only
    // looks: a start meanwhile would find the name taken.
    let mut claim = None;
    let table = match table_plan(&owner, here, || find_table(table_name))? {
        Table::Remove if !apply => match nft_claim::held(table_name) {
            Some(holder) => Table::InUse(holder),
            None => Table::Remove,
        },
        Table::Remove => match nft_claim::claim(table_name)
            .context("looking for a running collector with our nftables table")?
        {
            Some(held) => {
                claim = Some(held);
                Table::Remove
            }
            None => Table::InUse(nft_claim::holder(table_name)),
        },
        // A running collector's, or a crashed one's whose restart would adopt it (its pins
        // are elsewhere): only the second is left to the operator.
        Table::Unclaimed(why) => match nft_claim::held(table_name) {
            Some(holder) => Table::InUse(holder),
            None => Table::Unclaimed(why),
        },
        table => table,
    };

    // Listed before anything is removed; a reader gone meanwhile does not stop the removal.
    let listed = output::write(|out| list(out, pin_dir, &found, &table, table_name, apply));
    if apply {
        // Another tool's `v1` is left whole, its empty directories too.
        if lock.is_some() && found.has_layout {
            remove(&map_dir, &found.ours)?;
            remove_empty_dirs(&map_dir)?;
            // Only a collector's: a --pin-dir mistyped as another tool's empty directory
            // (iproute2's tc/globals) is left, and so is an empty one without `v1` (a crash
            // after the layout went): `rmdir` removes it.
            if found.has_layout && !paths::given_as_link(pin_dir) {
                remove_dir_if_empty(pin_dir)?;
            }
        }
        if table == Table::Remove {
            let found = nft::remove_leftover(table_name, config.nftables.nft_timeout)
                .context("removing our nftables table")?;
            if let nft::Leftover::NotOurs(why) = found {
                anyhow::bail!(
                    "the nftables table inet {table_name} changed while cleanup looked at it and \
                     is no longer a collector's (it {why}): left in place"
                );
            }
        }
        drop(claim);
        // Said above; the status says something of ours is left to the operator.
        if let Table::Unclaimed(_) = table {
            anyhow::bail!(
                "the nftables table inet {table_name} was left in place: no pins under {} say \
                 whose it is",
                pin_dir.display()
            );
        }
        let left = found.other_pins().count();
        if left > 0 {
            let dirs = other_layout_dirs(&found);
            anyhow::bail!(
                "{left} pin(s) under {} are not this build's pin layout ({}) and were left in \
                 place (another build's: its link pins, if any, keep their programs attached); \
                 once no collector of that build runs with this pin directory, remove them with \
                 `rm -r {dirs}`",
                pin_dir.display(),
                paths::PIN_LAYOUT_VERSION,
            );
        }
    }
    listed
}

/// The directories of other layouts that hold pins, for an `rm -r`.
fn other_layout_dirs(found: &Found) -> String {
    found
        .other_layouts
        .iter()
        .filter(|(_, pins)| !pins.is_empty())
        .map(|(dir, _)| dir.display().to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes what `run` found and does about it.
fn list(
    out: &mut impl Write,
    pin_dir: &Path,
    found: &Found,
    table: &Table,
    table_name: &str,
    apply: bool,
) -> io::Result<()> {
    let verb = if apply { "removing " } else { "" };
    for path in &found.ours {
        writeln!(out, "{verb}{}", path.display())?;
    }
    list_not_ours(out, found, apply, false)?;
    match table {
        Table::Absent => {}
        Table::Remove => writeln!(out, "{verb}nftables table inet {table_name}")?,
        Table::Elsewhere { owner, here } => writeln!(
            out,
            "nftables: these pins are a collector's of another network namespace (cookie \
             {owner}; this one's is {here}): its table inet {table_name} is in that namespace \
             and is not touched from here (it went with the namespace if that is gone; \
             otherwise run this cleanup inside it)"
        )?,
        Table::Unclaimed(why) => writeln!(
            out,
            "nftables table inet {table_name} in this network namespace: a collector's, which \
             no running collector here uses, but not touched, since {why} (a crashed \
             collector's restart would go on counting in it); if none of this namespace will \
             start again with that table, remove it with `nft delete table inet {table_name}`"
        )?,
        Table::NotOurs(why) => writeln!(
            out,
            "nftables table inet {table_name} in this network namespace: not the collector's \
             (it {why}): cleanup leaves it"
        )?,
        Table::InUse(holder) => writeln!(
            out,
            "nftables table inet {table_name} in this network namespace: not touched, since a \
             running collector here ({holder}) uses it"
        )?,
    }
    summary(out, pin_dir, found, table, apply)
}

/// What is under the pin directory that is not this build's pins: other layouts' pins,
/// check probes, other tools' entries, each with what to do about it.
fn list_not_ours(
    out: &mut impl Write,
    found: &Found,
    apply: bool,
    running: bool,
) -> io::Result<()> {
    let leaves = if apply {
        "left in place"
    } else if running {
        "--apply is refused while the collector runs"
    } else {
        "--apply leaves it"
    };
    for path in found.other_pins() {
        writeln!(
            out,
            "{} (not this build's pin layout: {leaves})",
            path.display()
        )?;
    }
    if !apply && found.other_pins().count() > 0 {
        let status = if running {
            ""
        } else {
            " (--apply leaves them, and its status is then 1)"
        };
        writeln!(
            out,
            "once no collector of that build runs with this pin directory, remove them with \
             `rm -r {}`{status}",
            other_layout_dirs(found)
        )?;
    }
    for (dir, pid) in &found.probes {
        writeln!(
            out,
            "{} (a `collector check` probe of process {pid}, not a collector's pins: {leaves}; \
             once no check of this pin directory runs, remove it with `rm -r {}`)",
            dir.display(),
            dir.display()
        )?;
    }
    for path in &found.foreign {
        writeln!(
            out,
            "{} (not a collector's pin layout: cleanup leaves it)",
            path.display()
        )?;
    }
    Ok(())
}

/// A listing beside the process that holds the pin directory's lock: a running collector,
/// whose pins are its own (listed as nothing left over, with status 0, not a call to stop a
/// healthy agent), or a cleanup at work (listed again once it has ended). What is not this
/// build's pins is listed as ever: another build's crashed layout, whose programs count on,
/// or a killed check's probe.
fn list_beside_holder(pin_dir: &Path, found: &Found) -> anyhow::Result<()> {
    let holder = pin_lock::holder(pin_dir);
    let described = pin_lock::Holder::describe(holder.as_ref());
    if holder.as_ref().is_some_and(pin_lock::Holder::is_cleanup) {
        anyhow::bail!(
            "a `collector cleanup` holds the pin directory {} ({described}): list again once it \
             has ended",
            pin_dir.display()
        );
    }
    output::write(|out| {
        writeln!(
            out,
            "a collector is running with the pin directory {} ({described}): its pins are its own",
            pin_dir.display()
        )?;
        list_not_ours(out, found, false, true)?;
        if found.other_pins().next().is_none() && found.probes.is_empty() {
            writeln!(out, "nothing is left over to clean")?;
        }
        Ok(())
    })
}

/// The last line of a listing: what to do, or that nothing is there.
fn summary(
    out: &mut impl Write,
    pin_dir: &Path,
    found: &Found,
    table: &Table,
    apply: bool,
) -> io::Result<()> {
    // Said with --apply too: a silent success reads as "did something".
    let removable = !found.ours.is_empty() || *table == Table::Remove;
    let nothing_else =
        found.other_layouts.is_empty() && found.probes.is_empty() && found.foreign.is_empty();
    if removable {
        if !apply {
            writeln!(out, "run again with --apply to remove these")?;
        }
    } else if let Some((others, unreadable)) = &found.absent {
        let nftables = if *table == Table::Absent {
            ", nothing of ours in nftables"
        } else {
            ""
        };
        writeln!(out, "no pin directory {}{nftables}", pin_dir.display())?;
        if !others.is_empty() {
            let names: Vec<String> = others.iter().map(|d| d.display().to_string()).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            writeln!(
                out,
                "pin directories of collectors on this bpffs (pass one with --pin-dir; the \
                 Kubernetes manifests' pods pin under {}/{MANIFESTS_PIN_ROOT} on the node): {}",
                paths::BPFFS_ROOT,
                links::name_list(&names, PIN_DIRS_SHOWN)
            )?;
        }
        if *unreadable {
            writeln!(
                out,
                "some directories of bpffs could not be looked into: run as root to see every \
                 collector's pin directory"
            )?;
        }
    } else if nothing_else && *table == Table::Absent {
        writeln!(
            out,
            "nothing of ours under {} or in nftables",
            pin_dir.display()
        )?;
    } else if nothing_else {
        writeln!(out, "nothing of ours under {}", pin_dir.display())?;
    }
    Ok(())
}

/// Locks the pin directory, or refuses: a running collector's pins hold its links, and
/// removing them would stop its counting while it went on serving counters that no longer
/// move.
fn lock_unless_running(pin_dir: &Path) -> anyhow::Result<std::fs::File> {
    // The lock on the directory that is at the path once locked: a start may have removed
    // the one opened (orphaned pins, `orphans`) and made a new one there, its own.
    if let Some(lock) = pin_lock::lock_if_current(pin_dir)? {
        return Ok(lock);
    }
    if !paths::pin_exists(pin_dir)? {
        anyhow::bail!(
            "the pin directory {} went while cleanup looked at it (a collector's start removed \
             pins whose namespace is gone): nothing is left to clean",
            pin_dir.display()
        );
    }
    Err(running(pin_dir))
}

/// Why cleanup refuses beside a collector running with `pin_dir`.
fn running(pin_dir: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "a collector is running with the pin directory {} ({}): stop it instead (at SIGTERM it \
         detaches its programs and removes its pins and nftables table); `cleanup` is for \
         what a crashed one left",
        pin_dir.display(),
        pin_lock::Holder::describe(pin_lock::holder(pin_dir).as_ref())
    )
}

/// What to do about the table, given whose the pins are; `find` looks in this namespace.
fn table_plan(
    owner: &Owner,
    here: u64,
    find: impl FnOnce() -> anyhow::Result<nft::Leftover>,
) -> anyhow::Result<Table> {
    Ok(match owner {
        Owner::Namespace(owner) if *owner != here => Table::Elsewhere {
            owner: *owner,
            here,
        },
        Owner::Namespace(_) => match find()? {
            nft::Leftover::Ours => Table::Remove,
            nft::Leftover::NotOurs(why) => Table::NotOurs(why),
            nft::Leftover::Absent => Table::Absent,
        },
        Owner::Unknown(why) => match find()? {
            nft::Leftover::Ours => Table::Unclaimed(why.clone()),
            nft::Leftover::NotOurs(why) => Table::NotOurs(why),
            nft::Leftover::Absent => Table::Absent,
        },
    })
}

fn find_table(table: &str) -> anyhow::Result<nft::Leftover> {
    match nft::find_leftover(table) {
        Ok(found) => Ok(found),
        Err(nft::NftError::Netlink(err)) if privileges::denied(&err) => anyhow::bail!(
            "looking for the nftables table inet {table}: permission denied: run as root (or with \
             CAP_NET_ADMIN)"
        ),
        Err(nft::NftError::Netlink(err)) if nfnetlink::without_nf_tables(&err) => {
            Ok(nft::Leftover::Absent)
        }
        // Anything else (the ruleset changing all through the read, say) leaves the question
        // open: saying "nothing in nftables" would leave a crashed run's chains hooked.
        Err(err) => {
            Err(anyhow::Error::new(err)
                .context(format!("looking for the nftables table inet {table}")))
        }
    }
}

/// Reads the pins' owner from `PIN_OWNER` under `map_dir`.
fn pin_owner(map_dir: &Path) -> anyhow::Result<Owner> {
    let path = map_dir.join(map_names::PIN_OWNER);
    if !paths::pin_exists(&path)? {
        return Ok(Owner::Unknown(format!(
            "no pins under {} say whose it is",
            map_dir.display()
        )));
    }
    let read = loader::read_pin_owner(&path);
    match read {
        Ok(0) => Ok(Owner::Unknown(format!(
            "the pins' owner in {} was never set (a start that stopped before it attached loopback's classifiers)",
            path.display()
        ))),
        Ok(cookie) => Ok(Owner::Namespace(cookie)),
        Err(err) if privileges::denied_in(&err) => Err(err.context(format!(
            "reading {}: permission denied: run as root (pinned maps open only with CAP_BPF)",
            path.display()
        ))),
        Err(err) => Ok(Owner::Unknown(format!(
            "the pins' owner could not be read from {}: {err:#}",
            path.display()
        ))),
    }
}

/// Removes this build's layout directory `map_dir` whole, as `--apply` does: its link pins
/// first, then its maps, then its directories (see [`remove`]). For the start that finds
/// the pins of a collector whose network namespace is gone (`orphans`).
pub(crate) fn remove_layout(map_dir: &Path) -> anyhow::Result<()> {
    let pins = walk(map_dir)?;
    remove(map_dir, &pins)?;
    remove_empty_dirs(map_dir)
}

/// Removes the (pin) directory `dir` once nothing else is in it.
pub(crate) fn remove_dir_if_empty(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(err) if matches!(err.raw_os_error(), Some(libc::ENOTEMPTY | libc::ENOENT)) => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Removes the files `ours` under `map_dir` in [`removal_order`].
fn remove(map_dir: &Path, ours: &[PathBuf]) -> anyhow::Result<()> {
    for path in removal_order(map_dir, ours) {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err).with_context(|| format!("removing the pin {}", path.display()));
            }
        }
    }
    Ok(())
}

/// Link pins first: removing one detaches its program, so that nothing counts into the maps
/// once they go. Loopback's tc links last among them: they are what tells a later start
/// that the namespace is gone ([`crate::orphans::orphaned`]), so a removal killed halfway
/// (the reaping start OOM-killed) leaves pins that start can judge, never a `sock_ops` link
/// alone on the host's cgroup2 root. A clean stop keeps `sock_ops` last instead
/// (`loader::remove_pins`): its namespace is alive, its maps must outlive the program that
/// counts closes into them should a link be stuck, and its own next start takes over what a
/// stop cut short leaves.
fn removal_order<'a>(map_dir: &Path, ours: &'a [PathBuf]) -> Vec<&'a PathBuf> {
    let links_dir = map_dir.join(loader::LINKS_DIR);
    let (links, maps): (Vec<&PathBuf>, Vec<&PathBuf>) =
        ours.iter().partition(|path| path.starts_with(&links_dir));
    let (loopback, others): (Vec<&PathBuf>, Vec<&PathBuf>) = links.into_iter().partition(|path| {
        path.file_name()
            .is_some_and(crate::orphans::is_loopback_link_pin)
    });
    // The owner first among the maps: a removal killed after the links, with the owner still
    // there, would leave a set no reaper judges (no loopback link) and that the pod's next
    // namespace takes for another's; without it, the next start removes what is left.
    let (owner, maps): (Vec<&PathBuf>, Vec<&PathBuf>) = maps
        .into_iter()
        .partition(|path| path.ends_with(map_names::PIN_OWNER));
    others
        .into_iter()
        .chain(loopback)
        .chain(owner)
        .chain(maps)
        .collect()
}

/// Removes `dir` and the directories below it that are (then) empty.
fn remove_empty_dirs(dir: &Path) -> anyhow::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_empty_dirs(&entry.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(err) if matches!(err.raw_os_error(), Some(libc::ENOTEMPTY | libc::ENOENT)) => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Maps earlier builds of this layout pinned and no later one removes: the upstreams'
/// connect failures, before `UPSTREAM_COUNTERS` (c30d79e).
const RETIRED_PINNED_MAPS: [&str; 1] = ["CONN_CONNECT_FAILURES"];

/// Whether `pins`, the files under a directory named as our layout (`dir`), are a
/// collector's: `PIN_OWNER` is among them (a start claimed the layout), or each has a name
/// a start pins under, now or in an earlier build (one killed before it claimed, or a map
/// no later build removes). Another tool's `v1`, under a pin directory given by mistake,
/// is left whole: removing its links would detach its programs.
fn layouts_pins(dir: &Path, pins: &[PathBuf]) -> bool {
    let links = dir.join(loader::LINKS_DIR);
    pins.contains(&dir.join(map_names::PIN_OWNER))
        || pins.iter().all(|pin| {
            let name = pin.file_name().unwrap_or_default();
            match pin.parent() {
                Some(parent) if parent == dir => collector_common::PINNED_MAPS
                    .iter()
                    .chain(&RETIRED_PINNED_MAPS)
                    .any(|map| name == *map),
                Some(parent) if parent == links => loader::is_link_pin_name(name),
                _ => false,
            }
        })
}

/// Every file (pin) below `dir`; symbolic links are not followed.
fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.extend(walk(&entry.path())?);
        } else {
            out.push(entry.path());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_directories_under_the_roots_are_those_with_a_layout() {
        let scratch = crate::scratch::ScratchDir::new("cleanup-pin-dirs");
        let root = scratch.path("bpffs");
        let collectors = root.join(MANIFESTS_PIN_ROOT);
        for dir in [
            collectors.join("collector"),
            collectors.join("collector-uid"),
            root.join("collector"),
        ] {
            std::fs::create_dir_all(paths::map_pin_dir(&dir)).unwrap();
        }
        // Another tool's directory, and a file.
        std::fs::create_dir_all(root.join("tc/globals")).unwrap();
        std::fs::write(root.join("v1"), "").unwrap();
        assert_eq!(
            pin_dirs_under(&[&root, &collectors, &root.join("absent")]),
            (
                vec![
                    root.join("collector"),
                    collectors.join("collector"),
                    collectors.join("collector-uid")
                ],
                false
            )
        );
    }

    #[test]
    fn loopbacks_links_go_after_the_other_links_then_the_owner_then_the_maps() {
        let map_dir = Path::new("/sys/fs/bpf/collector/v1");
        let links = map_dir.join(loader::LINKS_DIR);
        let ours = [
            map_dir.join("CONN_COUNTERS"),
            links.join("tc_loopback_1"),
            links.join("sock_ops"),
            links.join("tc_ingress_7"),
            map_dir.join("PIN_OWNER"),
        ];
        let order: Vec<&Path> = removal_order(map_dir, &ours)
            .into_iter()
            .map(PathBuf::as_path)
            .collect();
        assert_eq!(
            order,
            [
                links.join("sock_ops").as_path(),
                links.join("tc_ingress_7").as_path(),
                links.join("tc_loopback_1").as_path(),
                map_dir.join("PIN_OWNER").as_path(),
                map_dir.join("CONN_COUNTERS").as_path(),
            ]
        );
    }

    #[test]
    fn the_cleanup_hint_names_the_config_and_pin_dir_of_the_run() {
        assert_eq!(command_for(None, None), "collector cleanup --apply");
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            command_for(
                Some(Path::new("c.toml")),
                Some(Path::new("/sys/fs/bpf/pod-1"))
            ),
            format!(
                "collector cleanup --apply --config {} --pin-dir /sys/fs/bpf/pod-1",
                cwd.join("c.toml").display()
            )
        );
        assert_eq!(
            command_for(Some(Path::new("/etc/my collector/it's.toml")), None),
            r"collector cleanup --apply --config '/etc/my collector/it'\''s.toml'"
        );
    }

    #[test]
    fn only_layout_directories_are_taken_for_a_collectors_pins() {
        let dir = |name: &str| classify(std::ffi::OsStr::new(name), true);
        assert_eq!(dir("v1"), Entry::Ours);
        assert_eq!(dir("v2"), Entry::OtherLayout);
        assert_eq!(dir("v10"), Entry::OtherLayout);
        assert_eq!(dir("check-probe-4242"), Entry::CheckProbe(4242));
        for name in [
            "tc",
            "ip",
            "v",
            "vx",
            "v1x",
            "check-probe-",
            "check-probe-12a",
        ] {
            assert_eq!(dir(name), Entry::Foreign, "{name}");
        }
        // A file, even one named like a layout, is no layout directory.
        assert_eq!(classify(std::ffi::OsStr::new("v1"), false), Entry::Foreign);
    }

    #[test]
    fn the_table_is_touched_only_where_the_pins_owner_lives() {
        let here = 7;
        let present = || Ok(nft::Leftover::Ours);
        let absent = || Ok(nft::Leftover::Absent);
        assert_eq!(
            table_plan(&Owner::Namespace(7), here, present).unwrap(),
            Table::Remove
        );
        assert_eq!(
            table_plan(&Owner::Namespace(7), here, absent).unwrap(),
            Table::Absent
        );
        // A table of that name that is not a collector's is never removed, whoever's the pins.
        let firewall = || Ok(nft::Leftover::NotOurs("holds the chain input".into()));
        for owner in [Owner::Namespace(7), Owner::Unknown("no pins".into())] {
            assert_eq!(
                table_plan(&owner, here, firewall).unwrap(),
                Table::NotOurs("holds the chain input".into())
            );
        }
        // Another namespace's pins: this namespace's table is not even looked at.
        assert_eq!(
            table_plan(&Owner::Namespace(9), here, || panic!("looked")).unwrap(),
            Table::Elsewhere { owner: 9, here }
        );
        assert_eq!(
            table_plan(&Owner::Unknown("no pins".into()), here, present).unwrap(),
            Table::Unclaimed("no pins".into())
        );
        assert_eq!(
            table_plan(&Owner::Unknown("no pins".into()), here, absent).unwrap(),
            Table::Absent
        );
    }
}
