//! `collector check`: one line per requirement of the kernel programs, pass or fail, with the
//! fix. The facts are gathered from the host; judging them is pure and unit-tested.

use std::path::{Path, PathBuf};

use crate::{
    bpf_sys,
    config::{Config, HttpConfig, NftEnabled},
    links,
    loader::TableSizes,
    orphans, paths, pin_lock, privileges, serve,
};

/// Oldest kernel with everything used: TCX links (6.6); also `BPF_CMPXCHG` (5.12) and
/// `SO_NETNS_COOKIE` (5.14).
const MIN_KERNEL: (u32, u32) = (6, 6);

/// Numbers from linux/capability.h.
const CAP_BPF: u32 = 39;
const CAP_PERFMON: u32 = 38;

/// Capabilities the agent always needs, with why (numbers from linux/capability.h).
pub const CAPABILITIES: [(u32, &str, &str); 3] = [
    (CAP_BPF, "CAP_BPF", "load programs, create and pin maps"),
    (
        CAP_PERFMON,
        "CAP_PERFMON",
        "pointer arithmetic on packets in the classifiers",
    ),
    (
        12,
        "CAP_NET_ADMIN",
        "attach tc programs (TCX links) and the sock_ops program, nftables",
    ),
];

/// `CAP_SYS_ADMIN`: needed only to mount bpffs or cgroup2 where none is visible, and for
/// `run --bpf-stats` (`BPF_ENABLE_STATS`). Attaching to the cgroup2 root takes
/// `CAP_NET_ADMIN` with `CAP_BPF` (Linux 5.8 and later).
pub const CAP_SYS_ADMIN: (u32, &str) = (21, "CAP_SYS_ADMIN");

/// What the host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// `uname -r`.
    pub kernel_release: String,
    /// Whether the kernel has TCX, asked of it (`None`: it could not be asked, e.g. without
    /// `CAP_NET_ADMIN`).
    pub tcx: Option<bool>,
    pub btf: bool,
    /// The cgroup2 root `run` attaches to: `None` when none is visible (it mounts one), `Err`
    /// why the configured `cgroup2` is not one.
    pub cgroup2: Result<Option<PathBuf>, String>,
    pub pin_dir: PathBuf,
    /// The bpffs mount holding the pin directory.
    pub bpffs: Option<PathBuf>,
    /// Effective capability bits (`CapEff` of /proc/self/status).
    pub capabilities: u64,
    /// The uid map of the user namespace this process runs in, where it is not the host's
    /// (see `privileges::user_namespace`): its capabilities count only inside it.
    pub user_namespace: Option<String>,
    /// `nft --version`, when the tool runs.
    pub nft: Option<String>,
    /// Whether that `nft` reads and writes JSON, which the agent drives it with (`None`: it
    /// does not say).
    pub nft_json: Option<bool>,
    /// The configured table's name, and what it is in this network namespace (`None`:
    /// nftables is off, not looked at).
    pub table_name: String,
    pub nft_table: Option<TableHere>,
}

/// The configured nftables table's name in this network namespace, as a start would find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableHere {
    /// Free to make, or a crashed run's to adopt.
    Free,
    /// A table of that name that is not a collector's (the words after "it"): a start
    /// leaves it, with the nft source down.
    NotOurs(String),
    /// Claimed by a running collector (`nft_claim`): `this_one` when it is the one running
    /// with the configured pin directory (`None`: its process cannot be seen from here).
    Claimed {
        holder: crate::nft_claim::Holder,
        this_one: Option<bool>,
    },
    /// The ruleset could not be read (why): a start reading it no better would leave its
    /// nft source down.
    Unreadable(String),
}

impl TableHere {
    /// Only looks: no module is loaded (a kernel without `nf_tables` loaded has no table),
    /// and the name is not claimed (a start meanwhile would find it taken).
    fn find(table: &str, pin_dir: &Path) -> Self {
        match crate::nft::find_leftover(table) {
            Err(err) => return Self::Unreadable(err.to_string()),
            Ok(crate::nft::Leftover::NotOurs(why)) => return Self::NotOurs(why),
            Ok(_) => {}
        }
        let Some(holder) = crate::nft_claim::held(table) else {
            return Self::Free;
        };
        let this_one = holder.pid().map(|pid| {
            crate::pin_lock::holder(pin_dir).is_some_and(|running| running.pid() == pid)
        });
        Self::Claimed { holder, this_one }
    }
}

impl Facts {
    /// Reads the facts of this host, as this process sees them, for the configured pin
    /// directory and cgroup2 mount.
    /// `table`: the nftables table's name, `None` where nftables is off (not looked at).
    pub fn gather(
        pin_dir: &Path,
        cgroup2: Option<&Path>,
        table: Option<&str>,
    ) -> anyhow::Result<Self> {
        let capabilities = crate::privileges::effective();
        let (nft, nft_json) = crate::nft_tool::describe();
        Ok(Self {
            kernel_release: kernel_release()?,
            tcx: tcx_in_kernel(),
            btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
            // As `run` picks it.
            cgroup2: match paths::cgroup2_root(cgroup2) {
                Ok(paths::Cgroup2::Mounted(path)) => Ok(Some(path)),
                Ok(paths::Cgroup2::Unmounted) => Ok(None),
                // Each says what to mount or set.
                Err(
                    err @ (paths::PathError::NotCgroup2(_) | paths::PathError::NotCgroup2Root(_)),
                ) => Err(err.to_string()),
                Err(err) => return Err(err.into()),
            },
            pin_dir: pin_dir.to_path_buf(),
            bpffs: paths::bpffs_for(pin_dir)?,
            capabilities,
            user_namespace: crate::privileges::user_namespace_here(),
            nft,
            nft_json,
            table_name: table.unwrap_or_default().to_owned(),
            nft_table: table.map(|table| TableHere::find(table, pin_dir)),
        })
    }
}

/// How a requirement stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    /// Met or not depending on what the agent finds at start: said, but not a failure.
    Warn,
    /// Not needed with this config.
    Skip,
    /// The agent cannot do what the config asks: `check` exits 1.
    Fail,
}

impl Status {
    /// The line's first word.
    #[must_use]
    pub fn mark(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Warn => "warn",
            Self::Skip => "skip",
            Self::Fail => "FAIL",
        }
    }
}

impl From<bool> for Status {
    fn from(pass: bool) -> Self {
        if pass { Self::Pass } else { Self::Fail }
    }
}

/// One requirement's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub name: &'static str,
    pub status: Status,
    /// What was found, or what is wrong and how to fix it.
    pub detail: String,
}

fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> std::io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned())
}

/// Whether the kernel has TCX, by a query of loopback's TCX ingress hook (which only reads):
/// a kernel without it does not know the attach type (EINVAL). A vendor kernel older than
/// 6.6 may have it backported, which the version alone cannot tell (`run` refuses nothing
/// by the version either). `None` where the query is not allowed.
fn tcx_in_kernel() -> Option<bool> {
    const LOOPBACK: u32 = 1;
    match crate::bpf_sys::tcx_programs(LOOPBACK, crate::bpf_sys::BPF_TCX_INGRESS) {
        Ok(_) => Some(true),
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => Some(false),
        Err(_) => None,
    }
}

/// Why the kernel `release` cannot run the collector, if it reads as too old: `run` adds it
/// to the "Invalid argument" of its first TCX attach there. One it cannot read, no.
#[must_use]
pub fn kernel_too_old(release: &str) -> Option<String> {
    kernel_version(release)
        .is_some_and(|version| version < MIN_KERNEL)
        .then(|| too_old(release))
}

fn too_old(release: &str) -> String {
    format!(
        "Linux {release} is older than {}.{} (TCX links); upgrade the kernel",
        MIN_KERNEL.0, MIN_KERNEL.1
    )
}

/// Judges the facts against a config's `[nftables] enabled`: every requirement, in a fixed
/// order.
#[must_use]
pub fn judge(facts: &Facts, nftables: NftEnabled) -> Vec<Verdict> {
    let mut verdicts = vec![kernel(facts)];
    verdicts.push(Verdict {
        name: "btf",
        status: Status::from(facts.btf),
        detail: if facts.btf {
            "/sys/kernel/btf/vmlinux".to_owned()
        } else {
            "no /sys/kernel/btf/vmlinux: use a kernel built with CONFIG_DEBUG_INFO_BTF=y".to_owned()
        },
    });
    let (status, detail) = match &facts.cgroup2 {
        Ok(Some(path)) => (Status::Pass, format!("mounted at {}", path.display())),
        Ok(None) => (
            Status::Pass,
            "none visible: the agent mounts one for a moment to attach (needs CAP_SYS_ADMIN)"
                .to_owned(),
        ),
        Err(reason) => (Status::Fail, reason.clone()),
    };
    verdicts.push(Verdict {
        name: "cgroup2",
        status,
        detail,
    });
    verdicts.push(bpffs(&facts.pin_dir, facts.bpffs.as_deref()));
    for (bit, name, why) in CAPABILITIES {
        let has = facts.capabilities & (1 << bit) != 0;
        // bpf(2) asks for all three in the host's user namespace (`capable()`; CAP_NET_ADMIN
        // to load a classifier): one held only inside another passed here, and `run` was
        // refused at its first program.
        let outside = has.then_some(facts.user_namespace.as_deref()).flatten();
        let (status, detail) = match outside {
            Some(map) => (
                Status::Fail,
                format!(
                    "held only inside a user namespace (uid_map {map}), and the kernel asks for it \
                     in the host's ({why}): run the collector in the host's user namespace"
                ),
            ),
            None if has => (Status::Pass, why.to_owned()),
            None => (
                Status::Fail,
                format!("missing ({why}): run as root or grant {name}"),
            ),
        };
        verdicts.push(Verdict {
            name,
            status,
            detail,
        });
    }
    verdicts.push(sys_admin(facts));
    verdicts.push(nft(facts, nftables));
    verdicts
}

/// The kernel's TCX links, by asking it where it can be asked, else by its version: a
/// vendor kernel older than 6.6 with TCX backported runs the collector, and failed here.
fn kernel(facts: &Facts) -> Verdict {
    let release = &facts.kernel_release;
    let new_enough = kernel_version(release).is_some_and(|v| v >= MIN_KERNEL);
    let (status, detail) = match facts.tcx {
        Some(true) => (Status::Pass, format!("Linux {release}, with TCX links")),
        Some(false) if new_enough => (
            Status::Fail,
            format!(
                "Linux {release} has no TCX links (built without CONFIG_NET_XGRESS): use a \
                 kernel built with it"
            ),
        ),
        Some(false) => (Status::Fail, too_old(release)),
        None if new_enough => (Status::Pass, format!("Linux {release}")),
        None => (
            Status::Warn,
            format!(
                "{}, unless TCX is backported to it (whether it is could not be asked here: \
                 `check` with CAP_NET_ADMIN asks)",
                too_old(release)
            ),
        ),
    };
    Verdict {
        name: "kernel",
        status,
        detail,
    }
}

/// `CAP_SYS_ADMIN`, needed only where `run` mounts bpffs or cgroup2 (or for `--bpf-stats`):
/// granting it where both are mounted gives a container far more than the agent uses.
fn sys_admin(facts: &Facts) -> Verdict {
    let (bit, name) = CAP_SYS_ADMIN;
    let has = facts.capabilities & (1 << bit) != 0;
    let mounts: Vec<&str> = [
        (facts.cgroup2 == Ok(None)).then_some("cgroup2"),
        (facts.bpffs.is_none() && facts.pin_dir.starts_with(paths::BPFFS_ROOT)).then_some("bpffs"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let (status, detail) = match (mounts.is_empty(), has) {
        (true, _) => (
            Status::Skip,
            "not needed here: it only mounts bpffs or cgroup2 where none is visible, and \
             serves `run --bpf-stats`"
                .to_owned(),
        ),
        (false, true) => (Status::Pass, format!("mount {}", mounts.join(" and "))),
        (false, false) => (
            Status::Fail,
            format!(
                "missing (mount {}, which are not visible here): mount them (in a pod, the \
                 host's /sys/fs/bpf and cgroup2 as hostPath volumes), or grant {name}",
                mounts.join(" and ")
            ),
        ),
    };
    Verdict {
        name,
        status,
        detail,
    }
}

/// As `run` copes: with no bpffs holding a pin directory under /sys/fs/bpf it mounts one there,
/// elsewhere it stops.
fn bpffs(pin_dir: &Path, mount: Option<&Path>) -> Verdict {
    let (status, detail) = match mount {
        Some(mount) => (
            Status::Pass,
            format!(
                "{} is on the bpffs mounted at {}",
                pin_dir.display(),
                mount.display()
            ),
        ),
        None if pin_dir.starts_with(paths::BPFFS_ROOT) => (
            Status::Warn,
            format!(
                "none mounted at {root}: `run` mounts one there (needs CAP_SYS_ADMIN); in a pod, \
                 mount the host's {root} in, or the pins vanish with the pod",
                root = paths::BPFFS_ROOT
            ),
        ),
        None => (
            Status::Fail,
            paths::PathError::NoBpffs(pin_dir.to_path_buf()).to_string(),
        ),
    };
    Verdict {
        name: "bpffs",
        status,
        detail,
    }
}

/// The interfaces `run` attaches to, as it selects them.
fn interfaces(watched: links::Watched<'_>) -> Verdict {
    let (status, detail) = match links::list() {
        Err(err) => (Status::Fail, format!("listing the interfaces: {err}")),
        Ok(all) => judge_interfaces(&all, watched),
    };
    Verdict {
        name: "interfaces",
        status,
        detail,
    }
}

fn judge_interfaces(all: &[links::Link], watched: links::Watched<'_>) -> (Status, String) {
    let selected = links::selection(all, watched);
    let names = selected
        .links
        .iter()
        .map(|link| link.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if !selected.missing.is_empty() {
        let absent: Vec<&str> = selected
            .missing
            .iter()
            .filter(|name| !all.iter().any(|link| link.named(name)))
            .map(String::as_str)
            .collect();
        let mut reasons = Vec::new();
        if !selected.unparsed.is_empty() {
            reasons.push(format!(
                "{} of a framing the tc classifiers do not parse (they parse Ethernet, \
                 loopback and none: WireGuard, tun): its live traffic and DNS go uncounted",
                selected.unparsed.join(", ")
            ));
        }
        if !absent.is_empty() {
            reasons.push(format!(
                "{} not here (yet): `run` attaches each when it appears",
                absent.join(", ")
            ));
        }
        return (
            Status::Warn,
            format!(
                "{}; collector_interface_missing is 1 for each; attached now: {}",
                reasons.join("; "),
                if names.is_empty() { "none" } else { &names }
            ),
        );
    }
    let unparsed: Vec<String> = links::unparsed_up(all, watched)
        .map(|(_, name)| name)
        .collect();
    let status = if names.is_empty() || !unparsed.is_empty() {
        Status::Warn
    } else {
        Status::Pass
    };
    let excluded: Vec<&str> = links::excluded(all, watched)
        .map(|link| link.name.as_str())
        .collect();
    let mut detail = if !names.is_empty() {
        names
    } else if excluded.is_empty() {
        "none is up: no live traffic is counted until one comes up".to_owned()
    } else {
        // Not for want of an interface: the patterns cover every one.
        "every up interface is left out: no live traffic or DNS is counted on any".to_owned()
    };
    if !unparsed.is_empty() {
        detail = format!(
            "{detail}; up but of a framing the tc classifiers do not parse, so their live \
             traffic and DNS go uncounted: {}",
            unparsed.join(", ")
        );
    }
    if !excluded.is_empty() {
        detail = format!(
            "{detail}; left out by exclude_interfaces: {}",
            links::name_list(&excluded, links::EXCLUDED_SHOWN)
        );
    }
    (status, detail)
}

/// Every verdict `collector check` prints for `config`: the host's requirements, then what
/// the config asks of it.
pub fn verdicts(config: &Config) -> anyhow::Result<Vec<Verdict>> {
    let nftables = crate::nft::mode(config);
    let facts = Facts::gather(
        &config.pin_dir,
        config.cgroup2.as_deref(),
        (nftables != NftEnabled::Off).then_some(config.nftables.table.as_str()),
    )?;
    let mut verdicts: Vec<Verdict> = judge(&facts, nftables)
        .into_iter()
        .map(|verdict| match verdict.name {
            "nft" if nftables != config.nftables.enabled => Verdict {
                detail: format!("not used: {}", crate::nft::NOTHING_TO_COUNT),
                ..verdict
            },
            "nft" => with_warning(verdict, config.stop_time_warning()),
            "cgroup2" => match &facts.cgroup2 {
                Ok(Some(root)) => with_hooks(verdict, root, config),
                _ => verdict,
            },
            _ => verdict,
        })
        .collect();
    verdicts.push(pin_dir(
        &config.pin_dir,
        facts.bpffs.as_deref(),
        TableSizes::of(config),
    ));
    verdicts.push(interfaces(links::Watched::of(config)));
    // The hard open-file limit, which `run` raises the soft one to, started as this was.
    let open_files = crate::open_files::hard_limit()
        .ok()
        .and_then(|limit| crate::open_files::warning(limit, config));
    verdicts.push(with_warning(
        with_warning(http(&config.http), config.probe_place_warning()),
        open_files,
    ));
    let listen_verdict = with_warning(listen(config), config.exposure_warning());
    verdicts.push(with_warning(
        listen_verdict,
        config.upstream_on_listen_warning(),
    ));
    // What is counted: the routes, and DNS keys that count nothing.
    verdicts.push(with_warning(routes(config), config.dns_ignored_warning()));
    Ok(verdicts)
}

/// The cgroup2 line `verdict` for the root at `root`, with what the hooks `run` attaches to
/// there say ([`cgroup_hooks`]).
fn with_hooks(verdict: Verdict, root: &Path, config: &Config) -> Verdict {
    let links_dir = crate::loader::links_dir(&config.pin_dir);
    let hooks = crate::loader::cgroup_hooks(config, &links_dir);
    match cgroup_hooks(root, &hooks, &config.pin_dir) {
        Some((status, detail)) => Verdict {
            status,
            detail: format!("{}; {detail}", verdict.detail),
            ..verdict
        },
        None => verdict,
    }
}

/// Whether the cgroup2 root at `root` takes the links `run` makes on its `hooks` (attach
/// types, with where `run` pins each link): a program attached there without `multi` closes
/// a hook to every link, and a hook at the kernel's limit of programs takes none but a link
/// pinned before, which a start adopts, unless the start frees places first by removing the
/// pins that collectors of namespaces now gone left beside `pin_dir` (then a warning).
/// Unasked where the kernel refuses the query (it needs `CAP_NET_ADMIN`, whose own line
/// fails then) or the pin cannot be looked at.
fn cgroup_hooks(root: &Path, hooks: &[(u32, PathBuf)], pin_dir: &Path) -> Option<(Status, String)> {
    use std::os::fd::AsFd;
    let cgroup = std::fs::File::open(root).ok()?;
    let cgroup2 = root.display().to_string();
    hooks.iter().find_map(|(attach_type, pin)| {
        let hook = bpf_sys::CgroupHook::query(cgroup.as_fd(), *attach_type).ok()?;
        if hook.closed() {
            let advice = crate::loader::closed_hook_advice(&hook, *attach_type, &cgroup2);
            return Some((Status::Fail, advice));
        }
        if !hook.full() || pin.try_exists().ok()? {
            return None;
        }
        let full = format!(
            "{}; `run` would add one, having no link of its own pinned at {}",
            crate::loader::full_hook_advice(*attach_type, &cgroup2),
            pin.display(),
        );
        let own_netns = crate::netns::current_cookie().ok()?;
        Some(match orphans::sibling_leftovers(pin_dir, own_netns) {
            0 => (Status::Fail, full),
            left => (
                Status::Warn,
                format!(
                    "{full}, though it first removes the pins that collectors of network \
                     namespaces now gone left in {left} directories beside it, with their \
                     links"
                ),
            ),
        })
    })
}

/// `verdict` with a warning of the config's about the same thing: at least a warning then.
fn with_warning(mut verdict: Verdict, warning: Option<String>) -> Verdict {
    if let Some(warning) = warning {
        if matches!(verdict.status, Status::Pass | Status::Skip) {
            verdict.status = Status::Warn;
        }
        verdict.detail = format!("{}; {warning}", verdict.detail);
    }
    verdict
}

/// Whether `run` can make its pin directory and pin maps in it (a non-root user, a security
/// module or a read-only mount can forbid it whatever the capabilities): tried by making what
/// is missing of it and a probe directory below it, pinning a map there, and removing them.
/// The bpffs mount itself fails untried, as `run` refuses it.
fn pin_dir(pin_dir: &Path, bpffs: Option<&Path>, sizes: TableSizes) -> Verdict {
    let verdict = |status, detail| Verdict {
        name: "pin_dir",
        status,
        detail,
    };
    // As `run` refuses it, whether bpffs is mounted there yet or not.
    if let Err(err) = paths::refuse_bpffs_root(pin_dir) {
        return verdict(Status::Fail, err.to_string());
    }
    let Some(mount) = bpffs else {
        return verdict(
            Status::Skip,
            "not tried: no bpffs holds it (see the bpffs line)".to_owned(),
        );
    };
    if paths::dot_below(mount, pin_dir) {
        return verdict(
            Status::Fail,
            paths::PathError::DotInBpffsName(pin_dir.to_path_buf()).to_string(),
        );
    }
    match probe_pin_dir(pin_dir) {
        Ok(()) => match in_use(pin_dir).or_else(|| left_pins(pin_dir, sizes)) {
            Some((status, detail)) => verdict(status, detail),
            None => verdict(
                Status::Pass,
                format!("{} can be made, and maps pinned in it", pin_dir.display()),
            ),
        },
        Err((step, err)) => {
            let advice = if privileges::denied(&err) {
                format!("{}: ", privileges::denial_advice_here())
            } else {
                String::new()
            };
            verdict(Status::Fail, format!("{advice}{step}: {err}"))
        }
    }
}

/// What `run` finds in `pin_dir` that stops it or resets its counters: pins of a collector
/// of another network namespace (refused while that namespace lives, removed with their
/// counters once it is gone), or a collector running with it (its lock: `run` refuses to
/// start beside it; a check before its restart finds it, hence a warning).
fn in_use(pin_dir: &Path) -> Option<(Status, String)> {
    foreign_pins(pin_dir).or_else(|| locked(pin_dir))
}

/// Pins of a collector of another network namespace in `pin_dir`, as `run` judges them.
fn foreign_pins(pin_dir: &Path) -> Option<(Status, String)> {
    let map_dir = paths::map_pin_dir(pin_dir);
    let own_netns = crate::netns::current_cookie().ok()?;
    let owner = orphans::pinned_owner(&map_dir)
        .ok()
        .flatten()
        .filter(|&owner| owner != 0 && owner != own_netns)?;
    Some(match orphans::gone_owner(&map_dir, own_netns) {
        Ok(Some(_)) => (
            Status::Warn,
            format!(
                "the pins under {} were left by a collector whose network namespace is gone \
                 (cookie {owner}): `run` removes them with their programs, and its counters \
                 start from zero",
                pin_dir.display()
            ),
        ),
        _ => (
            Status::Fail,
            crate::loader::foreign_pins(pin_dir, owner, own_netns).to_string(),
        ),
    })
}

/// What `run` does with the pins a crashed run of this namespace left in `pin_dir` (no
/// collector holds it: see [`in_use`]), judged as it judges them: removed, counters from
/// zero, where another build or another `connection_table_slots` left them (a warning: a
/// config change or an upgrade after a crash resets the counters), else taken over, with the
/// short-lived maps of another shape or size replaced (a warning, as `run` gives). Pins
/// without an owner, or whose owner is 0, held no counts: nothing to say of them. Nor where
/// this namespace cannot be told (`foreign_pins` said nothing of them then).
fn left_pins(pin_dir: &Path, sizes: TableSizes) -> Option<(Status, String)> {
    let map_dir = paths::map_pin_dir(pin_dir);
    let own_netns = crate::netns::current_cookie().ok()?;
    let left = match orphans::pinned_owner(&map_dir) {
        Ok(Some(owner)) if owner == own_netns => {
            crate::loader::judge_left_pins(&map_dir, Some(owner), sizes)
        }
        Ok(_) => return None,
        Err(err) => Err(err),
    };
    Some(match left {
        Ok(left) => match left.removed_for {
            Some(left_by) => (
                Status::Warn,
                format!(
                    "the pins under {} were left by {left_by}: `run` removes them with their \
                     programs, and its counters start from zero",
                    pin_dir.display()
                ),
            ),
            // Taken over: the owner is this namespace's cookie, which is never 0 (the kernel
            // counts them from 1, net/core/net_namespace.c).
            None if left.replaced.is_empty() => (
                Status::Pass,
                format!(
                    "{} can be made, and maps pinned in it; it holds a crashed run's pins, \
                     whose counters `run` takes over",
                    pin_dir.display()
                ),
            ),
            None => (Status::Warn, replacing(pin_dir, &left.replaced)),
        },
        Err(err) => (
            Status::Fail,
            format!(
                "the pins under {} cannot be judged as `run` judges them: {err:#}",
                pin_dir.display()
            ),
        ),
    })
}

/// What a start does with the crashed run's pins in `pin_dir` that it takes over, replacing
/// the short-lived maps of `replaced`: each named with why, in the words of `run`'s warning
/// (`DNS_INFLIGHT sized 256 slots, where this start gives it 4096 ([dns] in_flight_slots)`).
fn replacing(pin_dir: &Path, replaced: &[(PathBuf, String)]) -> String {
    let maps: Vec<String> = replaced
        .iter()
        .map(|(path, reason)| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            format!("{name} {reason}")
        })
        .collect();
    format!(
        "{} holds a crashed run's pins, whose counters `run` takes over; it replaces these \
         maps, which held {}: {}",
        pin_dir.display(),
        crate::loader::SHORT_LIVED_STATE,
        maps.join("; ")
    )
}

/// Who holds `pin_dir`'s lock, if anyone: a collector running with it, which `run` refuses
/// to start beside, or a cleanup, which it waits for.
fn locked(pin_dir: &Path) -> Option<(Status, String)> {
    let holder = pin_lock::holder(pin_dir);
    let by = match &holder {
        Some(holder) => pin_lock::Holder::describe(Some(holder)),
        // /proc/locks leaves out the processes of PID namespaces this one cannot see: tried,
        // only where there may be such (in a PID namespace of its own, all are seen).
        None if in_child_pid_namespace() => match pin_lock::held_by_another(pin_dir) {
            Ok(false) => return None,
            Ok(true) => pin_lock::Holder::describe(None),
            // Said, rather than taken for free: `left_pins` judges pins only where no
            // collector holds them.
            Err(err) => {
                return Some((
                    Status::Warn,
                    format!(
                        "whether a collector runs with {} cannot be told: {err}",
                        pin_dir.display()
                    ),
                ));
            }
        },
        None => return None,
    };
    let what = if holder.as_ref().is_some_and(pin_lock::Holder::is_cleanup) {
        "`run` waits for it to end"
    } else {
        "`run` refuses to start beside the collector running with it"
    };
    Some((
        Status::Warn,
        format!("{} is in use by {by}: {what}", pin_dir.display()),
    ))
}

/// Whether this process runs in a PID namespace other than the initial one, whose inode
/// number the kernel fixes (`PROC_PID_INIT_INO`): processes outside it are hidden from it.
fn in_child_pid_namespace() -> bool {
    std::fs::read_link("/proc/self/ns/pid")
        .is_ok_and(|namespace| namespace.as_os_str() != "pid:[4026531836]")
}

/// Makes what is missing of `pin_dir` and a probe directory in it, pins a map there, and
/// removes all of it again. The error names the step that failed.
fn probe_pin_dir(pin_dir: &Path) -> Result<(), (String, std::io::Error)> {
    // A directory of the path that another check made may go before this one's probe is in
    // it: then again.
    for _ in 0..10 {
        match probe_once(pin_dir) {
            Err((_, err)) if err.kind() == std::io::ErrorKind::NotFound => {}
            done => return done,
        }
    }
    probe_once(pin_dir)
}

fn probe_once(pin_dir: &Path) -> Result<(), (String, std::io::Error)> {
    // What is missing, outermost first.
    let mut missing = Vec::new();
    for dir in pin_dir.ancestors() {
        match dir.try_exists() {
            Ok(true) => break,
            Ok(false) => missing.push(dir.to_path_buf()),
            Err(err) => return Err((format!("looking for {}", dir.display()), err)),
        }
    }
    missing.reverse();
    // No dot: bpffs refuses them.
    let probe = pin_dir.join(format!(
        "{}{}",
        paths::CHECK_PROBE_PREFIX,
        std::process::id()
    ));
    missing.push(probe.clone());
    let mut made = Vec::new();
    let mut result = Ok(());
    for dir in &missing {
        match std::fs::create_dir(dir) {
            Ok(()) => made.push(dir),
            // Another check made it meanwhile, and removes it.
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists && *dir != probe => {}
            Err(err) => {
                result = Err((format!("creating the directory {}", dir.display()), err));
                break;
            }
        }
    }
    if result.is_ok() {
        let pin = probe.join("map");
        result = bpf_sys::pin_probe_map(&pin)
            .map_err(|(step, err)| (format!("{step} at {}", pin.display()), err));
        let _ = std::fs::remove_file(&pin);
    }
    for dir in made.iter().rev() {
        remove_made_dir(dir);
    }
    result
}

/// Removes a directory the probe made, once empty. Another check may be probing below it
/// (it found the directory there and leaves it to this one): its probe goes within
/// milliseconds, so a directory that is not empty is tried again for a while. What a
/// collector starting meanwhile put there stays, and its directory with it.
fn remove_made_dir(dir: &Path) {
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Err(err) if err.raw_os_error() == Some(libc::ENOTEMPTY) => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            _ => return,
        }
    }
}

/// The token, users and TLS files, loaded by the same functions as at `run`'s start, which a
/// missing or malformed one stops.
fn http(http: &HttpConfig) -> Verdict {
    let mut files = Vec::new();
    if let Some(path) = &http.bearer_token_file {
        files.push(format!("bearer token {}", path.display()));
    }
    if let Some(path) = &http.basic_auth_users_file {
        files.push(format!("users {}", path.display()));
    }
    if let Some(tls) = &http.tls {
        files.push(format!(
            "TLS certificate {} and key {}",
            tls.cert.display(),
            tls.key.display()
        ));
    }
    let verdict = |status, detail| Verdict {
        name: "http",
        status,
        detail,
    };
    if files.is_empty() {
        return verdict(
            Status::Skip,
            "no credentials or TLS configured ([http])".to_owned(),
        );
    }
    match serve::read_http_files(http) {
        Ok(()) => verdict(Status::Pass, format!("loaded: {}", files.join(", "))),
        Err(err) => verdict(
            Status::Fail,
            format!("{err:#} (`run` would refuse to start)"),
        ),
    }
}

/// Whether the listen address can be bound here. Taken is a warning where the collector
/// running with the configured pin directory holds it (the one a check before its restart
/// finds), or a process this one cannot see does; a failure where another process holds it
/// (`run` would crash-loop on it), named.
fn listen(config: &Config) -> Verdict {
    let addr = config.listen;
    // As `run --listen` refuses: a route's port.
    let (status, detail) = match crate::config::listen_refused(addr, &config.routes) {
        Some(reason) => (Status::Fail, reason),
        None => match std::net::TcpListener::bind(addr) {
            Ok(_) => (Status::Pass, format!("{addr} can be bound")),
            Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
                let collector = crate::pin_lock::holder(&config.pin_dir).map(|h| h.pid());
                let (status, by) = match listener_pid(addr.port()) {
                    Some(pid) if collector == Some(pid) => (
                        Status::Warn,
                        format!("the collector running with this pin directory (process {pid})"),
                    ),
                    Some(pid) => (
                        Status::Fail,
                        crate::pin_lock::Holder::describe(Some(&crate::pin_lock::Holder::process(
                            pid,
                        ))),
                    ),
                    None => (Status::Warn, "a process this one cannot see".to_owned()),
                };
                (
                    status,
                    format!(
                        "{addr} is in use by {by}: `run` fails while it is taken ({})",
                        serve::bind_advice(addr, &err)
                    ),
                )
            }
            Err(err) => (
                Status::Fail,
                format!("{addr}: {err}: {}", serve::bind_advice(addr, &err)),
            ),
        },
    };
    Verdict {
        name: "listen",
        status,
        detail,
    }
}

/// The process holding a listening TCP socket on `port`, as far as this one can see: the
/// socket's inode from /proc/net/tcp and tcp6, then the /proc/PID/fd that holds it.
fn listener_pid(port: u16) -> Option<u32> {
    let wanted: std::collections::HashSet<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .into_iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| listening_inodes(&table, port))
        .map(|inode| format!("socket:[{inode}]"))
        .collect();
    if wanted.is_empty() {
        return None;
    }
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let fds = std::fs::read_dir(entry.path().join("fd")).ok()?;
            fds.flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|target| wanted.contains(target.to_string_lossy().as_ref()))
                })
                .then_some(pid)
        })
}

/// The inodes of the listening sockets on `port` in `table` (/proc/net/tcp's layout:
/// `sl local_address rem_address st ... inode`, the port in hex after the address, state
/// 0A for LISTEN).
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (_, local_port) = fields.get(1)?.rsplit_once(':')?;
            let listening = *fields.get(3)? == "0A";
            (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| fields.get(9)?.parse().ok())
                .flatten()
        })
        .collect()
}

/// A config without routes is valid, and counts no client connection: a warning, as at
/// start, after the upstreams it counts, if any.
fn routes(config: &Config) -> Verdict {
    // A route's server names after its ports, under the config's own key.
    let listed = |items: &mut dyn Iterator<Item = (&String, &Vec<u16>, &[String])>| {
        items
            .map(|(name, ports, sni)| {
                let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
                if sni.is_empty() {
                    format!("{name} ({})", ports.join(", "))
                } else {
                    format!("{name} ({}; sni {})", ports.join(", "), sni.join(", "))
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let routes = listed(
        &mut config
            .routes
            .iter()
            .map(|r| (&r.name, &r.ports, r.sni.as_slice())),
    );
    let upstreams = listed(
        &mut config
            .upstreams
            .iter()
            .map(|u| (&u.name, &u.ports, &[][..])),
    );
    let detail = match (routes.is_empty(), upstreams.is_empty()) {
        (_, true) => routes,
        (true, false) => format!("upstreams {upstreams}"),
        (false, false) => format!("{routes}; upstreams {upstreams}"),
    };
    if let Some(warning) = config.no_routes_warning() {
        let detail = if detail.is_empty() {
            warning.to_owned()
        } else {
            format!("{detail}; {warning}")
        };
        return Verdict {
            name: "routes",
            status: Status::Warn,
            detail,
        };
    }
    match crate::ephemeral_ports::warning(config) {
        Some(warning) => Verdict {
            name: "routes",
            status: Status::Warn,
            detail: format!("{detail}; {warning}"),
        },
        None => Verdict {
            name: "routes",
            status: Status::Pass,
            detail,
        },
    }
}

/// The nft tool is needed only where the agent makes its table. Without it the agent still
/// runs, with the nft source down (`collector_source_up{source="nft"} 0`, which the shipped
/// `CollectorSourceDown` alert fires on), and so it does where it cannot make its table: an
/// `nft` without JSON, or a table of that name here that is not a collector's or that another
/// running collector uses. A failure with `enabled = true`, a warning with "auto", which
/// makes the table only where netfilter already hooks (in the agent's namespace while it
/// runs, which need not be this one's).
fn nft(facts: &Facts, nftables: NftEnabled) -> Verdict {
    let verdict = |status, detail: String| Verdict {
        name: "nft",
        status,
        detail,
    };
    if nftables == NftEnabled::Off {
        return verdict(
            Status::Skip,
            "not used: [nftables] enabled = false".to_owned(),
        );
    }
    let unmet = if nftables == NftEnabled::On {
        Status::Fail
    } else {
        Status::Warn
    };
    let when = if nftables == NftEnabled::On {
        "[nftables] enabled = true"
    } else {
        "where netfilter already hooks prerouting and postrouting (NAT, conntrack), [nftables] \
         enabled = \"auto\" turns the nftables counters on, and"
    };
    let Some(version) = facts.nft.as_deref() else {
        return verdict(
            unmet,
            format!(
                "the nft tool is missing: {when} they will be down; apt install nftables, or \
                 set enabled = false"
            ),
        );
    };
    if facts.nft_json == Some(false) {
        return verdict(
            unmet,
            format!(
                "{version} was built without JSON, which the agent drives it with: {when} the \
                 nftables counters will be down; install a build with JSON (Debian's nftables \
                 package), or set enabled = false"
            ),
        );
    }
    if crate::nft_tool::older_than_comments(version) {
        return verdict(
            unmet,
            format!(
                "{version} {}: {when} the nftables counters will be down; install nftables \
                 1.0.6 or later (Debian 12's), or set enabled = false",
                crate::nft_tool::TOO_OLD
            ),
        );
    }
    let (status, detail) = table_verdict(facts, version, unmet, when);
    verdict(status, detail)
}

/// The nft line's verdict on the configured table, as a start would find it: `unmet` where it
/// would leave the nft source down, as `when` says.
fn table_verdict(facts: &Facts, version: &str, unmet: Status, when: &str) -> (Status, String) {
    match &facts.nft_table {
        Some(TableHere::NotOurs(why)) => (
            unmet,
            format!(
                "the table inet {table} in this network namespace is not a collector's (it \
                 {why}): the agent leaves it, and {when} the nftables counters will be down; \
                 set [nftables] table to a name of the collector's own",
                table = facts.table_name,
            ),
        ),
        Some(TableHere::Claimed {
            holder,
            this_one: Some(false),
        }) => (
            unmet,
            format!(
                "a running collector here ({holder}) uses the table inet {table}: {when} this \
                 one's nftables counters will be down; give each collector of a network \
                 namespace a [nftables] table of its own",
                table = facts.table_name,
            ),
        ),
        Some(TableHere::Claimed {
            holder,
            this_one: Some(true),
        }) => (
            Status::Pass,
            format!(
                "{version}; the table inet {} is the running collector's ({holder})",
                facts.table_name
            ),
        ),
        Some(TableHere::Claimed { this_one: None, .. }) => (
            Status::Warn,
            format!(
                "{version}; a running collector whose process this one cannot see uses the \
                 table inet {}: if it is not the one running with this pin directory, this \
                 one's nftables counters will be down",
                facts.table_name
            ),
        ),
        // Not known to be unmet: a warning, whatever `enabled` says.
        Some(TableHere::Unreadable(why)) => (
            Status::Warn,
            format!(
                "{version}; could not look for the table inet {} ({why}): where a start reads \
                 the ruleset no better, its nftables counters will be down",
                facts.table_name
            ),
        ),
        Some(TableHere::Free) | None => (Status::Pass, version.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_maps_a_start_replaces_are_each_named_with_why() {
        let pins = Path::new("/sys/fs/bpf/collector/v1");
        let replaced = [
            (
                pins.join("DNS_INFLIGHT"),
                "sized 256 slots, where this start gives it 4096 ([dns] in_flight_slots)".into(),
            ),
            (
                pins.join("SNI_RESUME"),
                "of another build (value size 8, this build's 16)".into(),
            ),
        ];
        assert_eq!(
            replacing(Path::new("/sys/fs/bpf/collector"), &replaced),
            format!(
                "/sys/fs/bpf/collector holds a crashed run's pins, whose counters `run` takes \
                 over; it replaces these maps, which held {}: DNS_INFLIGHT sized 256 slots, \
                 where this start gives it 4096 ([dns] in_flight_slots); SNI_RESUME of another \
                 build (value size 8, this build's 16)",
                crate::loader::SHORT_LIVED_STATE
            )
        );
    }

    #[test]
    fn a_kernel_older_than_tcx_is_named_and_one_unread_is_not() {
        assert_eq!(
            kernel_too_old("6.1.0-18-amd64").as_deref(),
            Some("Linux 6.1.0-18-amd64 is older than 6.6 (TCX links); upgrade the kernel")
        );
        for release in ["6.6.0", "6.18.0-1-amd64", "7.0.0", "custom"] {
            assert_eq!(kernel_too_old(release), None, "{release}");
        }
    }

    fn healthy() -> Facts {
        Facts {
            kernel_release: "6.18.0-1-amd64".into(),
            tcx: Some(true),
            btf: true,
            cgroup2: Ok(Some("/sys/fs/cgroup/unified".into())),
            pin_dir: "/sys/fs/bpf/collector".into(),
            bpffs: Some("/sys/fs/bpf".into()),
            capabilities: u64::MAX,
            user_namespace: None,
            nft: Some("nftables v1.0.6".into()),
            nft_json: Some(true),
            table_name: "collector".into(),
            nft_table: Some(TableHere::Free),
        }
    }

    /// The kernel asked, its version aside: a vendor kernel older than 6.6 with TCX
    /// backported passes; one that does not know TCX fails whatever its version says; one
    /// that could not be asked is judged by its version, an old one only warned of.
    #[test]
    fn the_kernel_is_judged_by_its_tcx_where_it_can_be_asked() {
        let kernel_of = |release: &str, tcx| {
            let facts = Facts {
                kernel_release: release.into(),
                tcx,
                ..healthy()
            };
            let verdict = kernel(&facts);
            (verdict.status, verdict.detail)
        };
        assert_eq!(
            kernel_of("5.14.0-427.el9.x86_64", Some(true)),
            (
                Status::Pass,
                "Linux 5.14.0-427.el9.x86_64, with TCX links".to_owned()
            )
        );
        assert_eq!(kernel_of("6.18.44-fc-v1252", Some(true)).0, Status::Pass);
        assert_eq!(
            kernel_of("6.1.0-18-amd64", Some(false)),
            (
                Status::Fail,
                "Linux 6.1.0-18-amd64 is older than 6.6 (TCX links); upgrade the kernel".to_owned()
            )
        );
        let (status, detail) = kernel_of("6.8.0-31-generic", Some(false));
        assert_eq!(status, Status::Fail);
        assert!(detail.contains("CONFIG_NET_XGRESS"), "{detail}");
        assert_eq!(kernel_of("6.18.44-fc-v1252", None).0, Status::Pass);
        for release in ["6.1.0-18-amd64", "custom"] {
            let (status, detail) = kernel_of(release, None);
            assert_eq!(status, Status::Warn, "{release}");
            assert!(detail.contains("unless TCX is backported"), "{detail}");
        }
    }

    #[test]
    fn a_config_without_routes_is_a_warning_naming_what_is_still_counted() {
        let without = |extra: &str| {
            routes(
                &Config::from_toml("t.toml", &format!("listen = \"127.0.0.1:9464\"\n{extra}"))
                    .unwrap(),
            )
        };
        let verdict = without("");
        assert_eq!(verdict.status, Status::Warn);
        assert!(
            verdict.detail.contains("only DNS is counted"),
            "{}",
            verdict.detail
        );
        let verdict = without("[dns]\nenabled = false\n");
        assert_eq!(verdict.status, Status::Warn);
        assert!(
            verdict.detail.contains("only the interfaces"),
            "{}",
            verdict.detail
        );
        let verdict = routes(&Config::embedded_default());
        assert_eq!(verdict.status, Status::Pass);
        assert_eq!(verdict.detail, "web (80, 8080), tls (443, 8443)");
        let verdict = without(
            "[[routes]]\nname = \"web\"\nports = [80]\n[[upstreams]]\nname = \"app\"\nports = [8080, 9000]\n",
        );
        assert_eq!(verdict.detail, "web (80); upstreams app (8080, 9000)");
        let verdict = without(
            "[[routes]]\nname = \"tls\"\nports = [443]\ntype = \"https\"\n[[routes]]\nname = \"api\"\nports = [443]\ntype = \"https\"\nsni = [\"api.example.com\", \"*.api.example.com\"]\n",
        );
        assert_eq!(
            verdict.detail,
            "tls (443), api (443; sni api.example.com, *.api.example.com)"
        );
        // Upstreams alone: what is counted, and that no client connection is.
        let verdict = without("[[upstreams]]\nname = \"app\"\nports = [8080]\n");
        assert_eq!(verdict.status, Status::Warn);
        assert!(
            verdict.detail.starts_with(
                "upstreams app (8080); no [[routes]] configured: only the upstreams' connections"
            ),
            "{}",
            verdict.detail
        );
    }

    /// A hook closed by a program attached without `multi`, or holding the kernel's limit of
    /// programs, fails the cgroup2 line as `run` would be refused there; a full hook where
    /// `run` has its link pinned (a restart adopts it) passes. On a cgroup of the test's own,
    /// whose hooks no other test uses.
    #[test]
    fn a_cgroup_hook_that_refuses_the_link_fails_the_check() {
        use bpf_sys::{BPF_CGROUP_INET_INGRESS, BPF_CGROUP_SOCK_OPS, test_programs};
        use std::os::fd::AsFd;
        let child = test_programs::TestCgroup::make("check");
        let cgroup = child.file.as_fd();
        let scratch = crate::scratch::ScratchDir::new("check-pin");
        let pinned = scratch.path("pin");
        let unpinned = scratch.path("absent");
        // A pin directory with no pins of other collectors beside it to remove.
        let no_siblings = unpinned.join("collector");
        let hooks = [
            (BPF_CGROUP_INET_INGRESS, unpinned.clone()),
            (BPF_CGROUP_SOCK_OPS, unpinned.clone()),
        ];
        assert_eq!(
            cgroup_hooks(&child.path, &hooks, &no_siblings),
            None,
            "an empty cgroup"
        );
        let theirs = test_programs::load_sock_ops_returning().unwrap();
        test_programs::attach(cgroup, theirs.as_fd(), BPF_CGROUP_SOCK_OPS, 0).unwrap();
        let closed = cgroup_hooks(&child.path, &hooks, &no_siblings);
        test_programs::detach(cgroup, theirs.as_fd(), BPF_CGROUP_SOCK_OPS).unwrap();
        let (status, detail) = closed.expect("a closed hook passed");
        assert_eq!(status, Status::Fail);
        assert!(
            detail.starts_with(&format!(
                "the cgroup2 root {} has programs [",
                child.path.display()
            )) && detail.contains("] (ids) attached exclusively on its sock_ops hook")
                && detail.ends_with("detach them, or attach them again with `multi`"),
            "{detail}"
        );
        // Links, as collectors attach, up to the kernel's limit: full, one short of it: not.
        let mut links: Vec<_> = (0..bpf_sys::CGROUP_MAX_PROGRAMS)
            .map(|_| test_programs::link(cgroup, theirs.as_fd(), BPF_CGROUP_SOCK_OPS).unwrap())
            .collect();
        test_programs::link(cgroup, theirs.as_fd(), BPF_CGROUP_SOCK_OPS)
            .expect_err("a link past the kernel's limit");
        let (status, detail) =
            cgroup_hooks(&child.path, &hooks, &no_siblings).expect("a full hook passed");
        assert_eq!(status, Status::Fail);
        assert!(
            detail.contains("holds the kernel's limit of 64 programs on its sock_ops hook")
                && detail.ends_with(&format!(
                    "`run` would add one, having no link of its own pinned at {}",
                    unpinned.display()
                )),
            "{detail}"
        );
        std::fs::write(&pinned, "").unwrap();
        assert_eq!(
            cgroup_hooks(
                &child.path,
                &[(BPF_CGROUP_SOCK_OPS, pinned.clone())],
                &no_siblings,
            ),
            None,
            "a full hook where the link is pinned"
        );
        drop(links.pop());
        assert_eq!(
            cgroup_hooks(&child.path, &hooks, &no_siblings),
            None,
            "a hook one short of full"
        );
    }

    #[test]
    fn a_healthy_host_passes_everything() {
        for nftables in [NftEnabled::On, NftEnabled::Auto] {
            assert!(
                judge(&healthy(), nftables)
                    .iter()
                    .all(|v| v.status == Status::Pass || v.name == "CAP_SYS_ADMIN")
            );
        }
    }

    #[test]
    fn cap_sys_admin_is_needed_only_to_mount() {
        let sys_admin = |facts: Facts| {
            judge(&facts, NftEnabled::On)
                .into_iter()
                .find(|v| v.name == "CAP_SYS_ADMIN")
                .unwrap()
        };
        let without = !(1u64 << 21);
        for capabilities in [u64::MAX, without] {
            let mounted = sys_admin(Facts {
                capabilities,
                ..healthy()
            });
            assert_eq!(mounted.status, Status::Skip, "{}", mounted.detail);
        }
        let no_cgroup2 = Facts {
            cgroup2: Ok(None),
            ..healthy()
        };
        assert_eq!(sys_admin(no_cgroup2.clone()).status, Status::Pass);
        let missing = sys_admin(Facts {
            capabilities: without,
            bpffs: None,
            ..no_cgroup2
        });
        assert_eq!(missing.status, Status::Fail);
        assert!(
            missing.detail.contains("mount cgroup2 and bpffs"),
            "{}",
            missing.detail
        );
    }

    #[test]
    fn the_nft_tool_fails_the_check_only_where_the_config_turns_nftables_on() {
        let without_nft = Facts {
            nft: None,
            ..healthy()
        };
        let nft_line = |nftables| {
            let verdicts = judge(&without_nft, nftables);
            let others_pass = verdicts
                .iter()
                .filter(|v| v.name != "nft" && v.name != "CAP_SYS_ADMIN")
                .all(|v| v.status == Status::Pass);
            assert!(others_pass, "{verdicts:?}");
            verdicts.into_iter().find(|v| v.name == "nft").unwrap()
        };
        let on = nft_line(NftEnabled::On);
        assert_eq!(on.status, Status::Fail);
        assert!(on.detail.contains("apt install nftables"), "{}", on.detail);
        let auto = nft_line(NftEnabled::Auto);
        assert_eq!(auto.status, Status::Warn);
        assert!(auto.detail.contains("enabled = false"), "{}", auto.detail);
        assert_eq!(nft_line(NftEnabled::Off).status, Status::Skip);
        // Off, the tool is not looked at even where it is installed.
        assert_eq!(
            judge(&healthy(), NftEnabled::Off).last().unwrap().status,
            Status::Skip
        );
    }

    /// Where the agent could not make its table, `check` says so before the rollout, as
    /// the nft tool's absence is: until 2026-12-05 it passed on `nft --version` alone.
    #[test]
    fn a_table_the_agent_could_not_make_or_an_nft_without_json_fails_where_nftables_is_on() {
        let nft_line = |facts: Facts, nftables| {
            judge(&facts, nftables)
                .into_iter()
                .find(|v| v.name == "nft")
                .unwrap()
        };
        let holder = crate::nft_claim::Holder::bare(Some(42));
        for (facts, says) in [
            (
                Facts {
                    nft_json: Some(false),
                    ..healthy()
                },
                "built without JSON",
            ),
            (
                Facts {
                    nft: Some("nftables v1.0.5 (Lester Gooch #5)".into()),
                    ..healthy()
                },
                "nftables v1.0.5 (Lester Gooch #5) is older than 1.0.6",
            ),
            (
                Facts {
                    nft_table: Some(TableHere::NotOurs("holds the chain input".into())),
                    ..healthy()
                },
                "inet collector in this network namespace is not a collector's (it holds the \
                 chain input)",
            ),
            (
                Facts {
                    nft_table: Some(TableHere::Claimed {
                        holder: holder.clone(),
                        this_one: Some(false),
                    }),
                    ..healthy()
                },
                "a running collector here (process 42) uses the table inet collector",
            ),
        ] {
            let on = nft_line(facts.clone(), NftEnabled::On);
            assert_eq!(on.status, Status::Fail, "{}", on.detail);
            assert!(on.detail.contains(says), "{}", on.detail);
            assert_eq!(
                nft_line(facts.clone(), NftEnabled::Auto).status,
                Status::Warn
            );
            assert_eq!(nft_line(facts, NftEnabled::Off).status, Status::Skip);
        }
        // The collector running with this pin directory holds its own table: as it should.
        let running = Facts {
            nft_table: Some(TableHere::Claimed {
                holder,
                this_one: Some(true),
            }),
            ..healthy()
        };
        assert_eq!(nft_line(running, NftEnabled::On).status, Status::Pass);
        // A holder this check cannot see (another container of the pod) may be its own.
        let unseen = Facts {
            nft_table: Some(TableHere::Claimed {
                holder: crate::nft_claim::Holder::bare(None),
                this_one: None,
            }),
            ..healthy()
        };
        assert_eq!(nft_line(unseen, NftEnabled::On).status, Status::Warn);
        // A ruleset that could not be read (a ruleset changed at every try, no
        // CAP_NET_ADMIN) says so: until 2026-12-07 it passed.
        let unreadable = Facts {
            nft_table: Some(TableHere::Unreadable("the ruleset kept changing".into())),
            ..healthy()
        };
        let line = nft_line(unreadable, NftEnabled::On);
        assert_eq!(line.status, Status::Warn);
        assert!(
            line.detail.contains(
                "could not look for the table inet collector (the ruleset kept changing)"
            ),
            "{}",
            line.detail
        );
        // An `nft` that does not say whether it has JSON: as before.
        let untold = Facts {
            nft_json: None,
            ..healthy()
        };
        assert_eq!(nft_line(untold, NftEnabled::On).status, Status::Pass);
    }

    #[test]
    fn each_missing_piece_fails_with_its_fix() {
        let failing = |facts: Facts| -> Vec<Verdict> {
            judge(&facts, NftEnabled::On)
                .into_iter()
                .filter(|v| v.status == Status::Fail)
                .collect()
        };
        let old = failing(Facts {
            kernel_release: "5.15.0-91-generic".into(),
            tcx: Some(false),
            ..healthy()
        });
        assert_eq!(old.len(), 1);
        assert!(old[0].detail.contains("older than 6.6"));
        let no_bpffs = failing(Facts {
            bpffs: None,
            pin_dir: "/run/collector".into(),
            ..healthy()
        });
        assert_eq!(no_bpffs[0].name, "bpffs");
        assert!(no_bpffs[0].detail.contains("mount -t bpf bpf /sys/fs/bpf"));
        assert!(no_bpffs[0].detail.contains("or set `pin_dir`"));
        let not_cgroup2 = failing(Facts {
            cgroup2: Err(paths::PathError::NotCgroup2("/sys/fs/cgroup".into()).to_string()),
            ..healthy()
        });
        assert_eq!(not_cgroup2[0].name, "cgroup2");
        assert!(
            not_cgroup2[0]
                .detail
                .contains("set `cgroup2` to a cgroup2 mount, or leave it out"),
            "{}",
            not_cgroup2[0].detail
        );
        // Below the root, maybe found with `cgroup2` left out: not told to leave it out.
        let below_root = paths::PathError::NotCgroup2Root("/sys/fs/cgroup".into()).to_string();
        assert!(
            below_root.contains("set `cgroup2` to it") && !below_root.contains("leave it out"),
            "{below_root}"
        );
        let no_bpf_cap = failing(Facts {
            capabilities: !(1 << 39),
            ..healthy()
        });
        assert_eq!(no_bpf_cap[0].name, "CAP_BPF");
        assert!(
            failing(Facts {
                nft: None,
                ..healthy()
            })[0]
                .detail
                .contains("apt install nftables")
        );
        // Without a visible cgroup2 the agent copes, and without bpffs under /sys/fs/bpf it
        // mounts one: said, not failed.
        assert!(
            failing(Facts {
                cgroup2: Ok(None),
                ..healthy()
            })
            .is_empty()
        );
        let verdicts = judge(
            &Facts {
                bpffs: None,
                ..healthy()
            },
            NftEnabled::On,
        );
        let bpffs = verdicts.iter().find(|v| v.name == "bpffs").unwrap();
        assert_eq!(bpffs.status, Status::Warn, "{}", bpffs.detail);
        assert!(
            bpffs.detail.contains("`run` mounts one"),
            "{}",
            bpffs.detail
        );
    }

    /// An Ethernet interface (loopback's framing is the same) as `links::list` gives it.
    fn link(index: u32, name: &str, up: bool) -> links::Link {
        links::Link {
            index,
            name: name.into(),
            alt_names: Vec::new(),
            up,
            framing: links::Framing::Ethernet,
            loopback: name == "lo",
            controller: None,
            lower: None,
            kind: String::new(),
            stats: None,
        }
    }

    #[test]
    fn interfaces_are_judged_as_run_selects_them() {
        let all = [
            link(1, "lo", true),
            link(2, "eth0", true),
            link(3, "eth1", false),
        ];
        assert_eq!(
            judge_interfaces(&all, links::Watched::listed(&[])),
            (Status::Pass, "lo, eth0".to_owned())
        );
        let (status, detail) = judge_interfaces(
            &all,
            links::Watched::listed(&["lo".to_owned(), "eth9".to_owned()]),
        );
        assert_eq!(status, Status::Warn);
        assert!(
            detail.starts_with("eth9 not here (yet)") && detail.ends_with("attached now: lo"),
            "{detail}"
        );
        let infiniband = links::Link {
            framing: links::Framing::Other(32),
            ..link(4, "ib0", true)
        };
        // Configured, it is missing as one not here is (`run` starts without it).
        let (status, detail) = judge_interfaces(
            &[all[0].clone(), infiniband.clone()],
            links::Watched::listed(&["ib0".to_owned(), "lo".to_owned(), "eth9".to_owned()]),
        );
        assert_eq!(status, Status::Warn);
        assert_eq!(
            detail,
            "ib0 (link type 32) of a framing the tc classifiers do not parse (they parse \
             Ethernet, loopback and none: WireGuard, tun): its live traffic and DNS go \
             uncounted; eth9 not here (yet): `run` attaches each when it appears; \
             collector_interface_missing is 1 for each; attached now: lo"
        );
        // Left out of the default selection, and said: its live traffic goes uncounted.
        let tunnel = links::Link {
            framing: links::Framing::Other(768),
            ..link(5, "tunl0", true)
        };
        let (status, detail) = judge_interfaces(
            &[all[0].clone(), tunnel.clone()],
            links::Watched::listed(&[]),
        );
        assert_eq!(status, Status::Warn);
        assert_eq!(
            detail,
            "lo; up but of a framing the tc classifiers do not parse, so their live traffic and \
             DNS go uncounted: tunl0 (link type 768)"
        );
        // Alone: neither hides the other.
        assert_eq!(
            judge_interfaces(std::slice::from_ref(&tunnel), links::Watched::listed(&[])),
            (
                Status::Warn,
                "none is up: no live traffic is counted until one comes up; up but of a \
                 framing the tc classifiers do not parse, so their live traffic and DNS go \
                 uncounted: tunl0 (link type 768)"
                    .to_owned()
            )
        );
        // Down, it carries nothing to miss; configured away, it is not asked for.
        let down = links::Link {
            up: false,
            ..tunnel
        };
        assert_eq!(
            judge_interfaces(&[all[0].clone(), down], links::Watched::listed(&[])),
            (Status::Pass, "lo".to_owned())
        );
        assert_eq!(
            judge_interfaces(
                &[all[0].clone(), infiniband],
                links::Watched::listed(&["lo".to_owned()])
            ),
            (Status::Pass, "lo".to_owned())
        );
        let (status, _) = judge_interfaces(&[link(2, "eth0", false)], links::Watched::listed(&[]));
        assert_eq!(status, Status::Warn);
    }

    #[test]
    fn interfaces_left_out_by_a_pattern_are_named_in_check() {
        let tunnel_up = links::Link {
            framing: links::Framing::Other(768),
            ..link(5, "tunl0", true)
        };
        let all = [link(1, "lo", true)];
        // Excluded by a pattern: not attached, and named as left out; an excluded tunnel,
        // which the default would not watch anyway, is named neither so nor as uncounted.
        let excluded = [
            glob::Pattern::new("cali*").unwrap(),
            glob::Pattern::new("tunl*").unwrap(),
        ];
        let watched = links::Watched {
            listed: &[],
            excluded: &excluded,
        };
        let pods = [all[0].clone(), link(6, "cali7f", true), tunnel_up];
        assert_eq!(
            judge_interfaces(&pods, watched),
            (
                Status::Pass,
                "lo; left out by exclude_interfaces: cali7f".to_owned()
            )
        );
        // A node's hundreds of pod veths: the first few, and a count.
        let mut node = vec![all[0].clone()];
        node.extend((0..12).map(|i| link(10 + i, &format!("cali{i}"), true)));
        let (_, detail) = judge_interfaces(&node, watched);
        assert!(
            detail.ends_with(
                "cali0, cali1, cali2, cali3, cali4, cali5, cali6, cali7, cali8, cali9 and 2 more"
            ),
            "{detail}"
        );
    }

    /// Patterns that cover every up interface are named as the cause, not a want of
    /// interfaces.
    #[test]
    fn patterns_that_leave_out_every_interface_are_said_to() {
        let all = [link(1, "lo", true), link(2, "eth0", true)];
        let excluded = [glob::Pattern::new("*").unwrap()];
        let watched = links::Watched {
            listed: &[],
            excluded: &excluded,
        };
        assert_eq!(
            judge_interfaces(&all, watched),
            (
                Status::Warn,
                "every up interface is left out: no live traffic or DNS is counted on any; \
                 left out by exclude_interfaces: lo, eth0"
                    .to_owned()
            )
        );
    }
}
