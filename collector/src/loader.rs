//! Loading and attaching the kernel programs: pinned maps (reused only when compatible),
//! route slots, the port maps, the `sock_ops` program on the cgroup2 root and the tc
//! classifiers (live traffic, DNS) on the watched interfaces.
//!
//! Links are pinned next to the maps. If the agent crashes, its programs keep counting into
//! the pinned maps; the next start swaps its own programs into those links atomically
//! (`BPF_LINK_UPDATE`), so nothing is missed and nothing is counted twice. A clean stop
//! ([`Attachment::detach`]) removes links and pins alike and leaves nothing behind.

use std::{
    fs::{self, File},
    io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, MapType, PerCpuArray, PerCpuValues, ProgramArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, LinkOrder, Program, ProgramError,
        SchedClassifier, SockOps, TcAttachType, links::FdLink, tc::TcAttachOptions,
    },
};
use collector_common::{
    ClientSlot, ConnCounters, ConnDurations, ConnState, DNS_NAME_KEY_BYTES, DnsCounters,
    DnsInFlight, DnsNameKeys, DnsNameSlot, DnsPorts, GLOBAL_CLIENT_EVENTS, GLOBAL_CONN_TABLE_BITS,
    GLOBAL_DNS_ENABLED, GLOBAL_DNS_INFLIGHT_BITS, GLOBAL_DNS_MATCH_BELOW,
    GLOBAL_DNS_MATCH_RESPONSES, GLOBAL_DNS_PORTS, GLOBAL_DNS_SAMPLE_BELOW,
    GLOBAL_LOCAL_ADDRESS_SET_BITS, GLOBAL_LOCAL_ONLY, GLOBAL_NETNS_COOKIE, GLOBAL_SNI_WATCHED,
    GLOBAL_UPSTREAMS_WATCHED, LOCAL_ADDRESS_SLOTS, MAX_REDIRECT_DEVICES, MAX_ROUTES, PIN_LAYOUT,
    PINNED_MAPS, PORT_BITMAP_WORDS, RouteName, SniCounters, SniKey, TrafficCounters,
    UpstreamCounters, conn_flags, conn_table_bits, dns_inflight_bits, dns_match_below,
    local_address_set_bits, map_names, port_bit, program_names, tally_table_len, traffic_index,
};

use crate::{
    address_table::{AddressTableUse, LocalAddresses},
    addresses::ChangeSignal,
    bpf_sys, cleanup,
    config::{Config, RouteKind},
    event_stream::RingDrops,
    links::{self, Framing, Link},
    mapped::MappedArray,
    netns, orphans, paths, pin_lock, privileges, program_loading, signals, slots,
};

mod interfaces;

use interfaces::AttachedInterface;
pub use interfaces::{HookCheck, TcHook};

/// The kernel object built by build.rs from `collector-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/collector"));

/// Subdirectory of the pin directory holding link pins.
pub const LINKS_DIR: &str = "links";

/// Pin names of the tc links (TCX), each followed by `_` and the interface index: the
/// counting programs on ingress, egress and loopback, and the statistics' empty ones. An
/// interface without a link-layer header has programs of its own, with pins of their own.
const TC_INGRESS_PIN: &str = "tc_ingress";
const TC_EGRESS_PIN: &str = "tc_egress";
const TC_INGRESS_IP_PIN: &str = "tc_ingress_ip";
const TC_EGRESS_IP_PIN: &str = "tc_egress_ip";
const TC_LOOPBACK_PIN: &str = "tc_loopback";
const STATS_FLOOR_INGRESS_PIN: &str = "stats_floor_ingress";
const STATS_FLOOR_EGRESS_PIN: &str = "stats_floor_egress";
const STATS_FLOOR_LOOPBACK_PIN: &str = "stats_floor_loopback";
/// The tc link pin names on loopback.
pub const TC_LOOPBACK_LINK_PINS: [&str; 2] = [TC_LOOPBACK_PIN, STATS_FLOOR_LOOPBACK_PIN];
/// Every tc link pin name (before the `_` and the interface index).
pub const TC_LINK_PINS: [&str; 8] = [
    TC_INGRESS_PIN,
    TC_EGRESS_PIN,
    TC_INGRESS_IP_PIN,
    TC_EGRESS_IP_PIN,
    TC_LOOPBACK_PIN,
    STATS_FLOOR_INGRESS_PIN,
    STATS_FLOOR_EGRESS_PIN,
    STATS_FLOOR_LOOPBACK_PIN,
];

/// Which interfaces a tc program goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GoesOn {
    Loopback,
    /// Ethernet framing, loopback aside.
    Ethernet,
    /// No link-layer header (WireGuard, tun).
    Ip,
    AllButLoopback,
}

impl GoesOn {
    fn fits(self, link: &Link) -> bool {
        match self {
            Self::Loopback => link.loopback,
            Self::Ethernet => !link.loopback && link.framing == Framing::Ethernet,
            Self::Ip => link.framing == Framing::Ip,
            Self::AllButLoopback => !link.loopback,
        }
    }
}

/// Pin name of the link of the server name reader (`cgroup_skb`).
const SERVER_NAMES_PIN: &str = "cgroup_skb_server_names";
/// Pin name of the link of the connection program (`sock_ops`).
const SOCK_OPS_PIN: &str = "sock_ops";
const SOCK_OPS_STATS_FLOOR_PIN: &str = "sock_ops_stats_floor";

/// Whether `name` is one a start pins a link under: a tc link's, a cgroup hook's, or either
/// pinned beside one of another type before it is renamed over it.
pub fn is_link_pin_name(name: &std::ffi::OsStr) -> bool {
    let name = name.to_str().unwrap_or("");
    let name = name.strip_suffix("-new").unwrap_or(name);
    crate::orphans::is_tc_link_pin(std::ffi::OsStr::new(name))
        || [SOCK_OPS_PIN, SOCK_OPS_STATS_FLOOR_PIN, SERVER_NAMES_PIN].contains(&name)
}

/// The cgroup2 root's hooks `run` attaches its programs to with `config` (attach types), in
/// the order it attaches them, each with where its link is pinned in `links_dir`: a start
/// adopts a link pinned there, needing no new place on the hook. The server name reader
/// first, where routes share ports by name: it does nothing before `sock_ops` gives sockets
/// their storage, and the other way round the connections accepted in between would go
/// unread.
pub fn cgroup_hooks(config: &Config, links_dir: &Path) -> Vec<(u32, PathBuf)> {
    let reader = config.shares_ports_by_name().then(|| {
        (
            bpf_sys::BPF_CGROUP_INET_INGRESS,
            links_dir.join(SERVER_NAMES_PIN),
        )
    });
    reader
        .into_iter()
        .chain([(bpf_sys::BPF_CGROUP_SOCK_OPS, links_dir.join(SOCK_OPS_PIN))])
        .collect()
}

/// Where `run` pins its links, for the pin directory `pin_dir`.
pub fn links_dir(pin_dir: &Path) -> PathBuf {
    paths::map_pin_dir(pin_dir).join(LINKS_DIR)
}

/// A configured route and the kernel slot its counters live in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchedRoute {
    pub name: String,
    pub kind: RouteKind,
    pub ports: Vec<u16>,
    /// Server names that tell it apart on ports it shares (none: it has its ports).
    pub sni: Vec<String>,
    pub slot: u32,
}

/// A configured upstream and the kernel slot its counters live in: one of the route slots,
/// recorded under [`upstream_slot_owner`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchedUpstream {
    pub name: String,
    pub ports: Vec<u16>,
    pub slot: u32,
}

/// The owner recorded for an upstream's slot in the route name map: route names cannot hold
/// a '/', so no route's name is ever taken for an upstream's.
#[must_use]
pub fn upstream_slot_owner(name: &str) -> String {
    format!("upstream/{name}")
}

/// The maps the agent reads while running.
pub struct KernelMaps {
    pub conn_counters: PerCpuArray<MapData, ConnCounters>,
    pub conn_durations: PerCpuArray<MapData, ConnDurations>,
    pub upstream_counters: PerCpuArray<MapData, UpstreamCounters>,
    pub sni_counters: PerCpuArray<MapData, SniCounters>,
    pub route_traffic: PerCpuArray<MapData, TrafficCounters>,
    pub errors: PerCpuArray<MapData, u64>,
    pub dns_counters: PerCpuArray<MapData, DnsCounters>,
}

/// Everything the agent attached, held until [`Attachment::detach`].
pub struct Attachment {
    ebpf: Ebpf,
    /// DNS samples and connection events the kernel had dropped (a full ring; the pinned
    /// counters) before this start's programs were attached.
    dropped_before_attach: Option<RingDrops>,
    pub routes: Vec<WatchedRoute>,
    pub upstreams: Vec<WatchedUpstream>,
    /// Slots of routes and upstreams no longer configured, left by a crashed run: its
    /// connections there hold places in the connection table until they close.
    pub retired_slots: Vec<u32>,
    /// The tc programs: (name, hook, pin prefix, the interfaces it goes on).
    classifiers: Vec<(&'static str, TcAttachType, &'static str, GoesOn)>,
    /// Attached interfaces by index.
    attached: std::collections::BTreeMap<u32, AttachedInterface>,
    /// The programs last seen ahead of ours, by interface index and hook (for the log).
    ahead_seen: std::collections::BTreeMap<(u32, &'static str), usize>,
    /// Times ours were found detached and attached again, by interface index and hook.
    reattached: std::collections::BTreeMap<(u32, &'static str), u64>,
    /// Configured interfaces not there to attach (see [`links::missing`]).
    missing_interfaces: Vec<String>,
    /// Interfaces there to count whose last attach failed, by index.
    attach_failures: std::collections::BTreeMap<u32, interfaces::AttachFailure>,
    /// Up interfaces of a framing not parsed, by index, once said in the log (see
    /// [`links::unparsed_up`]).
    unparsed_noted: std::collections::BTreeSet<u32>,
    /// Interfaces the default selection would take that `exclude_interfaces` leaves out, as
    /// of the last sync.
    excluded_interfaces: usize,
    /// Where the `sock_ops` program is attached, for the logs.
    pub cgroup2: String,
    pin_dir: PathBuf,
    /// The `sock_ops` link pin.
    link_pins: Vec<PathBuf>,
    /// Link pins this start created (the others it took over from a crashed run), for a
    /// failed start to undo; `None` once started, when nothing reads them.
    created_pins: Option<Vec<PathBuf>>,
    /// A crashed run's pinned maps or links were found: its counts live on in them.
    inherited: bool,
    /// Keeps `LOCAL_ADDRESSES` (`None` with `all_namespaces`, which does not use it).
    local_addresses: Option<LocalAddresses>,
    /// What `REDIRECT_DEVICES` holds: the namespace's ifb devices by index.
    redirect_devices: [u32; MAX_REDIRECT_DEVICES],
    /// Locked while running: a second agent on the same pin directory would count twice.
    _lock: File,
    /// Keeps the kernel's BPF run-time statistics on while held (`--bpf-stats`).
    _stats: Option<std::os::fd::OwnedFd>,
}

/// What to attach, resolved from the config and the host.
pub struct Options<'a> {
    pub config: &'a Config,
    /// Turn on the kernel's per-program run-time statistics while the agent runs.
    pub bpf_stats: bool,
}

impl Attachment {
    /// Brings `LOCAL_ADDRESSES` up to date, if it is used and a change is due (on a poll).
    /// Returns whether the kernel announced a change of the links as well: the run loop,
    /// woken by the announcement, then attaches new interfaces at once.
    pub fn refresh_local_addresses(&mut self) -> bool {
        self.local_addresses
            .as_mut()
            .is_some_and(|local| local.refresh(&mut self.ebpf))
    }

    /// Before an exit that leaves the programs attached (a task the agent needs ended): the
    /// address table will not follow changes until the next start, so the programs count
    /// by port alone until then, as they do before a start fills it, rather than miss a VIP
    /// taken over meanwhile.
    pub fn leave_addresses_to_the_ports(&mut self) {
        if let Some(local) = &mut self.local_addresses {
            local.leave_to_the_ports(&mut self.ebpf);
        }
    }

    /// Wakes the run loop when the namespace's addresses or links change, to bring the
    /// address table and the attached interfaces up to date at once (`None` with
    /// `all_namespaces`, or if it cannot be had: logged, and the polls still do).
    #[must_use]
    pub fn address_change_signal(&self) -> Option<ChangeSignal> {
        match self.local_addresses.as_ref()?.change_signal()? {
            Ok(signal) => Some(signal),
            Err(err) => {
                tracing::warn!("address changes are read at the polls only: {err}");
                None
            }
        }
    }

    /// The address table's use, for the metrics (`None` with `all_namespaces`).
    #[must_use]
    pub fn address_table_use(&self) -> Option<AddressTableUse> {
        self.local_addresses.as_ref().map(LocalAddresses::usage)
    }

    /// Loads the programs, binds the routes to their slots and attaches everything. Stop
    /// signals wait till then (`signals::hold`): one handled while the kernel verifies a
    /// program, aya's feature probes at the object's load included, makes the verifier give
    /// up, and a probe given up reads as a feature missing.
    /// The pin directory is locked first, the stop signals still handled: the wait for a
    /// cleanup's `nft` may last `nft_timeout`, and a stop asked for meanwhile ends it (`None`).
    pub fn attach(options: &Options<'_>) -> anyhow::Result<Option<Self>> {
        let config = options.config;
        let cgroup2 = paths::cgroup2_root(config.cgroup2.as_deref())
            .and_then(|root| paths::open_cgroup2(&root))
            .map_err(|err| privilege_hint(err.into()))?;
        paths::ensure_bpffs(&config.pin_dir).map_err(|err| privilege_hint(err.into()))?;
        let links_dir = links_dir(&config.pin_dir);
        // A cleanup holds the lock through its `nft`, which it gives `nft_timeout`.
        let cleanup_wait = config.nftables.nft_timeout + std::time::Duration::from_secs(5);
        let Some(lock) = pin_lock::lock_for_start(
            &config.pin_dir,
            &links_dir,
            cleanup_wait,
            signals::stop_requested,
        )
        .map_err(privilege_hint)?
        else {
            return Ok(None);
        };
        let _held = signals::hold().context("holding back the stop signals while attaching")?;
        // A start that fails leaves no empty directory of its own behind; removed under the
        // lock, which this duplicate holds past the failed start's.
        let lock_held = lock
            .try_clone()
            .context("duplicating the pin directory's lock")?;
        let attached = Self::try_attach(options, lock, cgroup2);
        if attached.is_err()
            && let Err(err) = remove_empty_layout(&config.pin_dir)
        {
            tracing::warn!("{err:#}");
        }
        drop(lock_held);
        attached.map(Some).map_err(privilege_hint)
    }

    fn try_attach(
        options: &Options<'_>,
        lock: File,
        (cgroup, cgroup2): (File, String),
    ) -> anyhow::Result<Self> {
        let config = options.config;
        let pin_dir = config.pin_dir.clone();
        let map_dir = paths::map_pin_dir(&pin_dir);
        let links_dir = map_dir.join(LINKS_DIR);
        let own_netns = netns::current_cookie().context(
            "reading this network namespace's cookie (SO_NETNS_COOKIE needs Linux 5.14)",
        )?;
        remove_if_namespace_gone(&pin_dir, own_netns)?;
        orphans::reap_siblings(&pin_dir, own_netns);
        remove_unowned_pins(&map_dir)?;
        let inherited = check_pinned_maps(&pin_dir, own_netns, TableSizes::of(config))?;

        let netns_cookie = if config.all_namespaces { 0 } else { own_netns };
        let stats = if options.bpf_stats {
            Some(enable_run_time_stats()?)
        } else {
            None
        };

        let local_addresses = if config.all_namespaces {
            None
        } else {
            Some(LocalAddresses::new(&config.extra_local_addresses)?)
        };
        let address_slots = local_addresses
            .as_ref()
            .map_or(LOCAL_ADDRESS_SLOTS, LocalAddresses::slots);
        let prepared = load(config, &map_dir, netns_cookie, address_slots).and_then(|mut ebpf| {
            claim_pins(&mut ebpf, &pin_dir, own_netns)?;
            set_dns_name_keys(&mut ebpf)?;
            hold_off_upstream_shortcut(&mut ebpf)?;
            Ok(ebpf)
        });
        let ebpf = match prepared {
            Ok(prepared) => prepared,
            Err(err) => {
                // A start from zero has pinned its maps by now: left, the next start would
                // take them for a crashed run's, and a pod deleted meanwhile would leave them
                // pinned until another start on the node reaped them.
                if !inherited && let Err(cleanup) = remove_pins(&pin_dir) {
                    tracing::warn!("removing the maps a failed start pinned: {cleanup:#}");
                }
                return Err(err);
            }
        };

        // Before any program of this start runs: samples its programs drop from here on are
        // this start's, and widen the bounds of its lists (`maxUndercount`).
        let dropped_before_attach = events_dropped(&ebpf);
        let mut attachment = Self {
            ebpf,
            dropped_before_attach,
            routes: Vec::new(),
            upstreams: Vec::new(),
            retired_slots: Vec::new(),
            classifiers: Vec::new(),
            attached: std::collections::BTreeMap::new(),
            ahead_seen: std::collections::BTreeMap::new(),
            reattached: std::collections::BTreeMap::new(),
            missing_interfaces: Vec::new(),
            attach_failures: std::collections::BTreeMap::new(),
            unparsed_noted: std::collections::BTreeSet::new(),
            excluded_interfaces: 0,
            cgroup2,
            pin_dir,
            link_pins: Vec::new(),
            created_pins: Some(Vec::new()),
            inherited,
            local_addresses,
            redirect_devices: [0; MAX_REDIRECT_DEVICES],
            _lock: lock,
            _stats: stats,
        };
        let attached = attachment
            .load_and_attach(config, options.bpf_stats, &links_dir, &cgroup, own_netns)
            .and_then(|()| remove_stale_links(&links_dir, &attachment.pins_in_use()));
        match attached {
            Ok(()) => {
                // Only a failed start undoes what it made: from here on an interface that
                // fails to attach cleans up after itself (`attach_interface`).
                attachment.created_pins = None;
                if attachment.inherited {
                    tracing::info!(
                        pin_dir = %attachment.pin_dir.display(),
                        "took over the pins a previous run left (it crashed, or its start \
                         failed): its programs counted on into its pinned maps meanwhile, so the \
                         counters continue from there instead of from zero, and `active` includes \
                         the connections it saw open"
                    );
                }
                Ok(attachment)
            }
            Err(err) => {
                if let Err(cleanup) = attachment.undo_failed_start() {
                    tracing::warn!("cleaning up after a failed start: {cleanup:#}");
                }
                Err(err)
            }
        }
    }

    /// Loads every program this start needs, then attaches them: loopback's classifiers, the
    /// cgroup ones, then the classifiers on the other interfaces selected before the load. A
    /// configured interface that does not exist yet is left to the polls, which attach it
    /// when it appears (a VLAN or a second NIC made after the agent starts, or a name that
    /// differs on this node: a refused start would crash-loop the pod).
    fn load_and_attach(
        &mut self,
        config: &Config,
        bpf_stats: bool,
        links_dir: &Path,
        cgroup: &File,
        own_netns: u64,
    ) -> anyhow::Result<()> {
        let all = links::list().context("listing network interfaces over rtnetlink")?;
        let watched = links::Watched::of(config);
        let selected = links::selection(&all, watched);
        self.load_programs(config, bpf_stats, &selected)?;
        self.bind_routes(config)?;
        self.keep_redirect_devices(&all);
        self.note_unparsed(&all, watched);
        self.note_excluded(&all, watched, true);
        // Before any classifier runs (till then the table counts as incomplete: by port).
        self.refresh_local_addresses();
        // Loopback's classifiers before the cgroup programs: the orphan reaper knows a
        // layout's namespace by its loopback link, so a start killed in between leaves pins
        // it can judge, where a `sock_ops` link alone would run on the host's cgroup2 root
        // with nothing to remove it.
        let (loopback, others): (Vec<&Link>, Vec<&Link>) =
            selected.links.iter().partition(|link| link.loopback);
        self.attach_classifiers(&loopback)?;
        self.own_pins(own_netns)?;
        self.attach_cgroup_programs(config, bpf_stats, links_dir, cgroup)?;
        self.attach_classifiers(&others)?;
        self.refuse_if_none_attached()?;
        for interface in &selected.unparsed {
            tracing::warn!(
                %interface,
                "the configured interface has a link-layer framing the tc classifiers do not \
                 parse (they parse Ethernet, loopback and none: WireGuard, tun): its live \
                 traffic and DNS go uncounted, its connections count at their close \
                 (collector_interface_missing is 1 for it)"
            );
        }
        for interface in selected
            .missing
            .iter()
            .filter(|name| !all.iter().any(|link| link.named(name)))
        {
            tracing::warn!(
                %interface,
                "the configured interface does not exist in this network namespace: attached \
                 when it appears (collector_interface_missing is 1 meanwhile)"
            );
        }
        self.missing_interfaces = selected.missing;
        Ok(())
    }

    /// Gives the routes and upstreams their slots and fills the port maps, once every program
    /// is verified and the interfaces chosen, just before the first link runs one of them.
    /// After a crash the crashed run's programs count on until the links' swap: a slot
    /// reclaimed from a route that left the config (renamed and zeroed here) takes that
    /// route's port for those milliseconds, where it took it for the verifier's seconds,
    /// and a start refused by then (a program the kernel refused) leaves every slot to its
    /// owner; until 2026-12-06 such a start left the slot renamed, and the next start kept
    /// it for the new route, with the old route's counts of the whole time.
    fn bind_routes(&mut self, config: &Config) -> anyhow::Result<()> {
        let (routes, upstreams, retired_slots) = bind_slots(&mut self.ebpf, config)?;
        fill_port_map(&mut self.ebpf, &routes)?;
        fill_server_name_maps(&mut self.ebpf, &routes)?;
        fill_upstream_port_map(&mut self.ebpf, &upstreams)?;
        self.routes = routes;
        self.upstreams = upstreams;
        self.retired_slots = retired_slots;
        Ok(())
    }

    /// Marks the pins as this namespace's, once loopback's links are attached: a set with an
    /// owner and no link was judged by no reaper (it looks for a loopback link whose device
    /// is gone), so a start killed while its programs loaded (seconds of verifier time, an
    /// OOM kill) left pins that refused every start of the pod's next namespace. Without an
    /// owner, what such a start leaves (maps nothing ever counted into) is taken over by the
    /// next start, whichever namespace it runs in (where the pod is deleted, the next start
    /// on the node removes them: `orphans`).
    fn own_pins(&mut self, own_netns: u64) -> anyhow::Result<()> {
        pin_owner(&mut self.ebpf)?.set(0, own_netns, 0)?;
        Ok(())
    }

    /// The programs on the cgroup2 root: the server name reader where routes share ports by
    /// name, and `sock_ops` (and its empty twin for `--bpf-stats`).
    fn attach_cgroup_programs(
        &mut self,
        config: &Config,
        bpf_stats: bool,
        links_dir: &Path,
        cgroup: &File,
    ) -> anyhow::Result<()> {
        for (attach_type, pin) in cgroup_hooks(config, links_dir) {
            if attach_type == bpf_sys::BPF_CGROUP_INET_INGRESS {
                self.attach_server_name_reader(&pin, cgroup)?;
            } else {
                self.attach_sock_ops(program_names::TRACK_CONNECTIONS, &pin, cgroup)?;
            }
        }
        if bpf_stats {
            self.attach_sock_ops(
                program_names::STATS_FLOOR_SOCK_OPS,
                &links_dir.join(SOCK_OPS_STATS_FLOOR_PIN),
                cgroup,
            )?;
        }
        Ok(())
    }

    fn attach_sock_ops(&mut self, name: &str, pin: &Path, cgroup: &File) -> anyhow::Result<()> {
        let cgroup2 = self.cgroup2.clone();
        let program: &mut SockOps = loaded(&mut self.ebpf, name)?;
        let fd = program.fd()?.try_clone()?;
        let adopted = adopt_or_pin_link(pin, fd.as_fd(), || {
            // Link-based attachment always coexists with other programs on the cgroup; the
            // kernel rejects the ALLOW_MULTI flag on links (EINVAL), so pass none.
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to the {cgroup2}"))
                .map_err(|err| {
                    cgroup_hook_hint(err, cgroup, bpf_sys::BPF_CGROUP_SOCK_OPS, &cgroup2)
                })?;
            Ok(program.take_link(id)?.try_into()?)
        })?;
        self.note_link(pin, adopted);
        Ok(())
    }

    /// The `cgroup_skb` ingress program that reads the ClientHello of connections on ports
    /// shared by server name, on the cgroup2 root beside the `sock_ops` program.
    fn attach_server_name_reader(&mut self, pin: &Path, cgroup: &File) -> anyhow::Result<()> {
        self.set_early_hello_reader()?;
        let name = program_names::READ_SERVER_NAMES;
        let cgroup2 = self.cgroup2.clone();
        let program: &mut CgroupSkb = loaded(&mut self.ebpf, name)?;
        let fd = program.fd()?.try_clone()?;
        let adopted = adopt_or_pin_link(pin, fd.as_fd(), || {
            let id = program
                .attach(
                    cgroup,
                    CgroupSkbAttachType::Ingress,
                    CgroupAttachMode::Single,
                )
                .with_context(|| format!("attaching {name} to the {cgroup2}"))
                .map_err(|err| {
                    cgroup_hook_hint(err, cgroup, bpf_sys::BPF_CGROUP_INET_INGRESS, &cgroup2)
                })?;
            Ok(program.take_link(id)?.try_into()?)
        })?;
        self.note_link(pin, adopted);
        Ok(())
    }

    /// Loads `read_early_hellos` into the program array the reader tail-calls, before the
    /// reader runs: a hello that completes the handshake goes through the listening socket.
    fn set_early_hello_reader(&mut self) -> anyhow::Result<()> {
        let name = program_names::READ_EARLY_HELLOS;
        let fd = loaded::<CgroupSkb>(&mut self.ebpf, name)?
            .fd()?
            .try_clone()?;
        let mut readers = ProgramArray::try_from(
            self.ebpf
                .map_mut(map_names::EARLY_HELLO_READER)
                .context("the kernel object has no early hello reader map")?,
        )?;
        readers
            .set(0, &fd, 0)
            .with_context(|| format!("setting {name} in {}", map_names::EARLY_HELLO_READER))?;
        Ok(())
    }

    /// Records a cgroup link pin: in use from now on, and made by this start unless adopted
    /// from a previous run (which this start then carries on from).
    fn note_link(&mut self, pin: &Path, adopted: bool) {
        if adopted {
            self.inherited = true;
        } else if let Some(created) = &mut self.created_pins {
            created.push(pin.to_owned());
        }
        self.link_pins.push(pin.to_owned());
    }

    /// Loads every program this start needs, at once (`program_loading`): the classifiers
    /// for each framing now, not when an interface needs them, since one that appears later
    /// is attached after the capability drop, and without `CAP_PERFMON` the verifier would hold
    /// them to the rules for unprivileged programs. The ones for interfaces without a
    /// link-layer header only where such an interface is here or may come: each costs half a
    /// second of a CPU's verification at every start.
    fn load_programs(
        &mut self,
        config: &Config,
        bpf_stats: bool,
        selected: &links::Selection<'_>,
    ) -> anyhow::Result<()> {
        self.classifiers = classifier_table(bpf_stats);
        let ip_possible = config.interfaces.is_empty()
            || !selected.missing.is_empty()
            || selected
                .links
                .iter()
                .any(|link| link.framing == Framing::Ip);
        let mut names = Vec::new();
        if config.shares_ports_by_name() {
            names.extend([
                program_names::READ_EARLY_HELLOS,
                program_names::READ_SERVER_NAMES,
            ]);
        }
        names.push(program_names::TRACK_CONNECTIONS);
        if bpf_stats {
            names.push(program_names::STATS_FLOOR_SOCK_OPS);
        }
        names.extend(
            self.classifiers
                .iter()
                .filter(|&&(.., goes_on)| ip_possible || goes_on != GoesOn::Ip)
                .map(|&(name, ..)| name),
        );
        program_loading::load_all(&mut self.ebpf, &names)
    }

    /// Takes the maps the poller reads.
    pub fn take_maps(&mut self) -> anyhow::Result<KernelMaps> {
        Ok(KernelMaps {
            conn_counters: take_map(&mut self.ebpf, map_names::CONN_COUNTERS)?,
            conn_durations: take_map(&mut self.ebpf, map_names::CONN_DURATIONS)?,
            route_traffic: take_map(&mut self.ebpf, map_names::ROUTE_TRAFFIC)?,
            upstream_counters: take_map(&mut self.ebpf, map_names::UPSTREAM_COUNTERS)?,
            sni_counters: take_map(&mut self.ebpf, map_names::SNI_COUNTERS)?,
            errors: take_map(&mut self.ebpf, map_names::ERRORS)?,
            dns_counters: take_map(&mut self.ebpf, map_names::DNS_COUNTERS)?,
        })
    }

    /// Takes the connection event ring buffer.
    pub fn take_conn_events(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        take_map(&mut self.ebpf, map_names::CONN_EVENTS)
    }

    /// DNS samples and connection events the kernel had dropped before this start's programs
    /// were attached (`None` if they could not be read).
    #[must_use]
    pub fn dropped_before_attach(&self) -> Option<RingDrops> {
        self.dropped_before_attach
    }

    /// Whether this start took over what a crashed run left (its connection table among it).
    #[must_use]
    pub fn inherited(&self) -> bool {
        self.inherited
    }

    /// The cookies of the connections the connection table holds in the slots of this
    /// start's routes and upstreams (read once, at start, from its mapping). Those in a slot
    /// no longer watched (a crashed run's route renamed or removed since) count in no
    /// exported series, so they are left to the listing of connections from before; but
    /// for those a server name decided on a shared port, which count in the named route too
    /// (a known limit: DESIGN, Restarts).
    pub fn tracked_cookies(&self) -> anyhow::Result<std::collections::HashSet<u64>> {
        let table = mapped_conn_state(&self.ebpf)?;
        let watched: std::collections::HashSet<u32> = self
            .routes
            .iter()
            .map(|route| route.slot)
            .chain(self.upstreams.iter().map(|upstream| upstream.slot))
            .collect();
        let mut cookies = std::collections::HashSet::new();
        for entry in table.entries() {
            if entry.cookie != 0 && watched.contains(&entry.route) {
                cookies.insert(entry.cookie);
            }
        }
        Ok(cookies)
    }

    /// Takes the connection table, for the open connections per client (see `client_table`).
    pub fn take_conn_state(&mut self) -> anyhow::Result<Array<MapData, ConnState>> {
        take_map(&mut self.ebpf, map_names::CONN_STATE)
    }

    /// Takes the switch for streamed connection events (see `map_names::CONN_STREAM_WANTED`).
    pub fn take_conn_stream_wanted(&mut self) -> anyhow::Result<Array<MapData, u32>> {
        take_map(&mut self.ebpf, map_names::CONN_STREAM_WANTED)
    }

    /// Takes the table of clients counted in place (see `map_names::CONN_CLIENTS`).
    pub fn take_conn_clients(&mut self) -> anyhow::Result<Array<MapData, ClientSlot>> {
        take_map(&mut self.ebpf, map_names::CONN_CLIENTS)
    }

    /// Takes the DNS in-flight table, for the queries waiting (see `dns::InFlightTable`).
    pub fn take_dns_inflight(&mut self) -> anyhow::Result<Array<MapData, DnsInFlight>> {
        take_map(&mut self.ebpf, map_names::DNS_INFLIGHT)
    }

    /// Takes the switch for streamed DNS events (see `map_names::DNS_STREAM_WANTED`).
    pub fn take_dns_stream_wanted(&mut self) -> anyhow::Result<Array<MapData, u32>> {
        take_map(&mut self.ebpf, map_names::DNS_STREAM_WANTED)
    }

    /// Takes the table of names counted in place (see `map_names::DNS_NAMES`).
    pub fn take_dns_names(&mut self) -> anyhow::Result<Array<MapData, DnsNameSlot>> {
        take_map(&mut self.ebpf, map_names::DNS_NAMES)
    }

    /// Takes the DNS event ring buffer (names taking a slot of the name table, and while
    /// someone reads the event stream, sampled queries and answers).
    pub fn take_dns_events(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        take_map(&mut self.ebpf, map_names::DNS_EVENTS)
    }

    /// Kernel run-time statistics of each program: (name, run time ns, run count).
    pub fn program_stats(&self) -> Vec<(String, u64, u64)> {
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                let nanos = u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
                Some((name.to_owned(), nanos, info.run_count()))
            })
            .collect()
    }

    fn pins_in_use(&self) -> Vec<PathBuf> {
        self.link_pins
            .iter()
            .chain(self.attached.values().flat_map(|interface| &interface.pins))
            .cloned()
            .collect()
    }

    /// Undoes a start that failed part way. A fresh start leaves nothing half-attached
    /// behind. A start that took over what a crashed run left removes only the links it
    /// added: the crashed run's maps and links stay (its links now run this start's
    /// programs), so counting goes on, with nothing lost, until a start succeeds.
    fn undo_failed_start(mut self) -> anyhow::Result<()> {
        if !self.inherited {
            return self.detach();
        }
        // The links now run this start's programs against its address table, which nothing
        // keeps after it: count by port alone until a start succeeds.
        self.leave_addresses_to_the_ports();
        let removed = remove_each(self.created_pins.iter().flatten());
        tracing::warn!(
            pin_dir = %self.pin_dir.display(),
            "the start failed after taking over what a crashed collector left: its links keep \
             counting into its pinned maps until a start succeeds (`{}` removes them)",
            crate::cleanup::command()
        );
        removed
    }

    /// Detaches everything and removes every pin: a clean stop leaves nothing of ours (the
    /// link pins, all under the links directory, go first in [`remove_pins`]).
    pub fn detach(self) -> anyhow::Result<()> {
        let Self { ebpf, pin_dir, .. } = self;
        drop(ebpf);
        remove_pins(&pin_dir)
    }
}

/// The errors of steps that go on past a failure.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn note(&mut self, result: anyhow::Result<()>) {
        if let Err(err) = result {
            self.0.push(format!("{err:#}"));
        }
    }

    fn into_result(self) -> anyhow::Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(anyhow::anyhow!(self.0.join("; ")))
        }
    }
}

/// Removes every pin under `pin_dir` that this build creates, and the directories if empty.
/// Only files are pins: anything else among them (a directory) is not ours, and stays.
///
/// A link pin that cannot be removed is reported, and what a crash would leave stays while
/// it does: the links go in an order that keeps `sock_ops` (which keeps the connection
/// table true) attached until every other link is gone, the loopback tc links (by which a
/// sibling collector's start judges the set orphaned) until the other tc links are; at the
/// first group with a link that stays, the rest stay, and the owner and the maps with
/// them, for the next start to take over. (With `sock_ops` itself stuck the set keeps no
/// loopback link, and only `collector cleanup --apply` removes it once its namespace is
/// gone.)
pub fn remove_pins(pin_dir: &Path) -> anyhow::Result<()> {
    let map_dir = paths::map_pin_dir(pin_dir);
    let links_dir = map_dir.join(LINKS_DIR);
    let mut failures = Failures::default();
    if links_dir.exists() {
        let pins = link_pin_files(&links_dir)?;
        let named =
            |pin: &Path, is: &dyn Fn(&std::ffi::OsStr) -> bool| pin.file_name().is_some_and(is);
        let (loopback, rest): (Vec<_>, Vec<_>) = pins
            .into_iter()
            .partition(|pin| named(pin, &crate::orphans::is_loopback_link_pin));
        let (sock_ops, others): (Vec<_>, Vec<_>) = rest
            .into_iter()
            .partition(|pin| named(pin, &|name| name == SOCK_OPS_PIN));
        for group in [others, loopback, sock_ops] {
            for pin in &group {
                failures.note(remove_if_present(pin));
            }
            if !failures.0.is_empty() {
                return failures.into_result();
            }
        }
    }
    // The owner first (PINNED_MAPS starts with it): what a stop cut short leaves after it
    // is no collector's, and the next start removes it rather than adopt a part of a set
    // ([`remove_unowned_pins`]). An owner that cannot be removed keeps its maps with it: the
    // next start takes them over as a crashed run's, the connections that closed meanwhile
    // still open in its table (left as it is: an unlink of our own file refused).
    let [owner, maps @ ..] = PINNED_MAPS;
    if let Err(err) = remove_if_present(&map_dir.join(owner)) {
        failures.note(Err(err));
        return failures.into_result();
    }
    for name in maps {
        failures.note(remove_if_present(&map_dir.join(name)));
    }
    failures.note(remove_empty_layout(pin_dir));
    failures.into_result()
}

/// Removes our directories under `pin_dir`, and it, where they are empty.
fn remove_empty_layout(pin_dir: &Path) -> anyhow::Result<()> {
    let map_dir = paths::map_pin_dir(pin_dir);
    let links_dir = map_dir.join(LINKS_DIR);
    let mut failures = Failures::default();
    let ours = [links_dir.as_path(), map_dir.as_path(), pin_dir];
    // Not empty: something else lives there, which is not ours to remove.
    for dir in &ours[..if paths::given_as_link(pin_dir) { 2 } else { 3 }] {
        failures.note(crate::cleanup::remove_dir_if_empty(dir));
    }
    failures.into_result()
}

/// The files under `links_dir`: our link pins (a symbolic link is not followed, and
/// nothing else there is ours).
fn link_pin_files(links_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let reading = || format!("reading {}", links_dir.display());
    let mut pins = Vec::new();
    for entry in fs::read_dir(links_dir).with_context(reading)? {
        let entry = entry.with_context(reading)?;
        if entry.file_type().with_context(reading)?.is_file() {
            pins.push(entry.path());
        }
    }
    Ok(pins)
}

/// Removes every pin of `pins`, going on past one that cannot be removed (a link left
/// pinned counts on): the error names each that stays.
fn remove_each<'a>(pins: impl IntoIterator<Item = &'a PathBuf>) -> anyhow::Result<()> {
    let mut failures = Failures::default();
    for pin in pins {
        failures.note(remove_if_present(pin));
    }
    failures.into_result()
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing the pin {}", path.display())),
    }
}

/// Attaches `program` to `interface`'s hook with a new TCX link, for the caller to pin.
fn attach_tcx(
    program: &mut SchedClassifier,
    program_name: &str,
    attach_type: TcAttachType,
    interface: &str,
) -> anyhow::Result<FdLink> {
    // First in the hook's chain: the kernel stops at the first program that does not pass
    // on, which is what most do (a CNI's returns TC_ACT_OK), and ours always pass on, so
    // running first changes nothing for the others. The statistics' empty program goes
    // last, behind them.
    let order = if program_name == program_names::STATS_FLOOR_TC {
        LinkOrder::last()
    } else {
        LinkOrder::first()
    };
    let id = program
        .attach_with_options(interface, attach_type, TcAttachOptions::TcxOrder(order))
        .with_context(|| format!("attaching {program_name} to {interface} ({attach_type:?})"))
        .map_err(old_kernel_hint)
        .map_err(|err| full_hook_hint(err, interface))?;
    Ok(program.take_link(id)?.try_into()?)
}

/// Names the cause of a TCX attach's ERANGE: the hook already holds as many programs as
/// the kernel lets one hold.
fn full_hook_hint(err: anyhow::Error, interface: &str) -> anyhow::Error {
    if caused_by(&err, libc::ERANGE) {
        err.context(format!(
            "the hook already holds the 63 programs the kernel lets one hold: another \
             program must leave it first (`bpftool net show dev {interface}` lists them)"
        ))
    } else {
        err
    }
}

/// Adopts the link a previous run pinned at `pin` (swapping `program` in), or makes one
/// with `attach` and pins it there (over one that cannot take `program`). Returns whether
/// the pin is taken for a previous run's: adopted, or one of its pins replaced in place,
/// which a start that fails later keeps there as it keeps every pin it took over (`false`:
/// a pin this start made, removed if it fails).
fn adopt_or_pin_link(
    pin: &Path,
    program: std::os::fd::BorrowedFd<'_>,
    attach: impl FnOnce() -> anyhow::Result<FdLink>,
) -> anyhow::Result<bool> {
    match adopt_link(pin, program)? {
        LinkAtPin::Adopted => Ok(true),
        LinkAtPin::Absent => {
            pin_link(attach()?, pin)?;
            Ok(false)
        }
        LinkAtPin::OfAnotherType => {
            let link = attach()?;
            replace_pinned_link(pin, |at| pin_link(link, at))?;
            Ok(true)
        }
    }
}

fn pin_link(link: FdLink, at: &Path) -> anyhow::Result<()> {
    link.pin(at)
        .map(drop)
        .with_context(|| format!("pinning the link at {}", at.display()))
}

/// What a start finds at a link pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkAtPin {
    /// A previous run's link, now running this build's program.
    Adopted,
    /// Nothing, or a link whose hook is gone (its interface vanished; the pin is removed).
    Absent,
    /// A link that cannot take this build's program (`BPF_LINK_UPDATE`'s EINVAL: a program
    /// of another type, another build's that changed it without a new `PIN_LAYOUT`); left
    /// in place for [`replace_pinned_link`].
    OfAnotherType,
}

/// Swaps `program` into the link pinned at `pin`, if a previous run left one there. A
/// replacement a start left pinned beside it ([`replace_pinned_link`], stopped between its
/// two steps) is removed first, which detaches it: otherwise it would count beside this
/// start's link until a start succeeded.
fn adopt_link(pin: &Path, program: std::os::fd::BorrowedFd<'_>) -> anyhow::Result<LinkAtPin> {
    remove_if_present(&pinned_beside(pin))?;
    let link = match bpf_sys::open_pinned(pin) {
        Ok(link) => link,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(LinkAtPin::Absent),
        Err(err) => {
            return Err(err).with_context(|| format!("opening the pinned link {}", pin.display()));
        }
    };
    match bpf_sys::update_link(link.as_fd(), program) {
        Ok(()) => Ok(LinkAtPin::Adopted),
        Err(err) if err.raw_os_error() == Some(libc::ENOLINK) => {
            remove_if_present(pin)?;
            Ok(LinkAtPin::Absent)
        }
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => Ok(LinkAtPin::OfAnotherType),
        Err(err) => Err(err)
            .with_context(|| format!("replacing the program in the pinned link {}", pin.display())),
    }
}

/// Where [`replace_pinned_link`] pins a new link before renaming it over `pin`. Not
/// `.new`: bpffs keeps names with a dot for itself (EPERM).
fn pinned_beside(pin: &Path) -> PathBuf {
    let mut beside = pin.as_os_str().to_owned();
    beside.push("-new");
    PathBuf::from(beside)
}

/// Puts this start's link at `pin` in place of one of another type: pinned beside it by
/// `pin_at`, then renamed over it (bpffs replaces the target, and the old link goes with
/// its pin), so the hook is never without a link of ours, and a start that fails after
/// keeps the new one there, as it keeps every link it took over. The maps are still taken
/// over: the counts go on.
fn replace_pinned_link(
    pin: &Path,
    pin_at: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let beside = pinned_beside(pin);
    pin_at(&beside)?;
    if let Err(err) = fs::rename(&beside, pin) {
        if let Err(err) = remove_if_present(&beside) {
            tracing::warn!("{err:#}");
        }
        return Err(err).with_context(|| {
            format!(
                "moving the new link pin {} over {}",
                beside.display(),
                pin.display()
            )
        });
    }
    tracing::warn!(
        "the link pinned at {} held a program of another type (another build's): replaced it \
         with this build's",
        pin.display()
    );
    Ok(())
}

/// Gives the name hash random keys before any program of this start runs (with the
/// table's zeros every name would hash alike), or keeps those of the pins a crashed run
/// left, whose upstream stamps sit where its keys put them.
fn set_dns_name_keys(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let map = ebpf
        .map_mut(map_names::DNS_NAME_KEYS)
        .context("the kernel object has no DNS name keys")?;
    let mut map: Array<&mut MapData, DnsNameKeys> = Array::try_from(map)?;
    if map.get(&0, 0)?.is_set() {
        return Ok(());
    }
    let mut random = [0u8; DNS_NAME_KEY_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut source| io::Read::read_exact(&mut source, &mut random))
        .context("reading random keys for the DNS name hash from /dev/urandom")?;
    map.set(0, DnsNameKeys::from_random(&random), 0)
        .context("writing the DNS name hash's keys")
}

/// Link pins left by an earlier run that this run does not use (an interface that went away
/// or was dropped from the config): removing the pin detaches the program.
fn remove_stale_links(links_dir: &Path, in_use: &[PathBuf]) -> anyhow::Result<()> {
    for pin in link_pin_files(links_dir)? {
        if !in_use.contains(&pin) {
            remove_if_present(&pin)?;
        }
    }
    Ok(())
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("the kernel object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// Removes the pins under `pin_dir` (locked) if a collector of a network namespace that is
/// gone made them (see `orphans`): its links are on devices that went with it, its counters
/// count nothing any more, and its `sock_ops` program would run on for every TCP socket of
/// the node. Without this, a pod whose namespace was made anew after a crash (same pod UID,
/// same pin directory) was refused as another namespace's at every start. Pins that cannot
/// be judged are left to the refusal further on.
fn remove_if_namespace_gone(pin_dir: &Path, own_netns: u64) -> anyhow::Result<()> {
    let map_dir = paths::map_pin_dir(pin_dir);
    let owner = match orphans::gone_owner(&map_dir, own_netns) {
        Ok(Some(owner)) => owner,
        Ok(None) => return Ok(()),
        Err(err) => {
            tracing::debug!(
                "judging whether the pins under {} are orphaned: {err:#}",
                pin_dir.display()
            );
            return Ok(());
        }
    };
    remove_left_pins(
        pin_dir,
        &format!("a collector whose network namespace is gone (cookie {owner})"),
    )
}

/// Removes this layout's pins under `pin_dir`, links first (their programs detached), for a
/// start from zero; `left_by` says whose they were, in the error or the warning.
fn remove_left_pins(pin_dir: &Path, left_by: &str) -> anyhow::Result<()> {
    let map_dir = paths::map_pin_dir(pin_dir);
    cleanup::remove_layout(&map_dir).with_context(|| {
        format!(
            "removing the pins under {} that {left_by} left",
            pin_dir.display()
        )
    })?;
    let links_dir = map_dir.join(LINKS_DIR);
    fs::create_dir_all(&links_dir)
        .with_context(|| format!("creating the pin directory {}", links_dir.display()))?;
    tracing::warn!(
        "the pins under {} were left by {left_by}: removed them with their programs, counters \
         start from zero",
        pin_dir.display()
    );
    Ok(())
}

/// Maps whose contents matter for seconds only (queries waiting for their answer, recent
/// upstream queries, hellos read on over segments): one of another build's shape is
/// replaced alone, where any other map of another shape has the whole set removed.
const SHORT_LIVED_MAPS: [&str; 4] = [
    map_names::DNS_INFLIGHT,
    map_names::DNS_UPSTREAM,
    map_names::DNS_UPSTREAM_LATEST,
    map_names::SNI_RESUME,
];

/// What a replaced short-lived map held, and what replacing it loses (said by `run` and by
/// `collector check`).
pub const SHORT_LIVED_STATE: &str = "only the last seconds' state (DNS answers to queries \
     asked before the start count as unmatched; TLS hellos in the middle of being read, as missed)";

/// Removes pinned maps that no collector owns: without `PIN_OWNER` (pinned with the others
/// at every load, removed first at a clean stop) they are what an older build's clean stop
/// left of the maps it did not know, or what a stop cut short left. Adopting one would
/// carry stale counts (a rollback after a crash, then a roll forward, brought back the old
/// connect failures).
fn remove_unowned_pins(map_dir: &Path) -> anyhow::Result<()> {
    if map_dir.join(map_names::PIN_OWNER).exists() {
        return Ok(());
    }
    for name in PINNED_MAPS {
        let path = map_dir.join(name);
        if path.exists() {
            remove_if_present(&path)?;
            tracing::warn!(
                "removed {}, which no collector owned (left by a stop or a removal cut short, or \
                 an older build's stop)",
                path.display()
            );
        }
    }
    Ok(())
}

/// The kernel object embedded in this build, parsed: the maps as this build makes them.
pub fn embedded_object() -> anyhow::Result<aya_obj::Object> {
    aya_obj::Object::parse(OBJECT).context("parsing the embedded kernel object")
}

/// How a pinned map differs from this build's `expected`, if it does: "WHAT PINNED, this
/// build's EXPECTED" (`value size 8, this build's 40`). `capacity`: the entries it must
/// have where the agent sizes it at load, rather than the object's.
pub fn shape_difference(
    expected: &aya_obj::Map,
    info: &aya::maps::MapInfo,
    capacity: Option<u32>,
) -> Option<String> {
    let expected_type = aya_obj::generated::bpf_map_type::try_from(expected.map_type())
        .ok()
        .and_then(|t| MapType::try_from(t).ok());
    let pinned_type = info.map_type().ok();
    [
        (
            "type",
            format!("{pinned_type:?}"),
            format!("{expected_type:?}"),
        ),
        (
            "key size",
            info.key_size().to_string(),
            expected.key_size().to_string(),
        ),
        (
            "value size",
            info.value_size().to_string(),
            expected.value_size().to_string(),
        ),
        (
            "capacity",
            info.max_entries().to_string(),
            capacity
                .unwrap_or_else(|| expected.max_entries())
                .to_string(),
        ),
        // A connection table from before it was memory-mappable cannot be read.
        (
            "flags",
            format!("{:#x}", info.map_flags()),
            format!("{:#x}", expected.map_flags()),
        ),
    ]
    .into_iter()
    .find(|(_, pinned, expected)| pinned != expected)
    .map(|(what, pinned, expected)| format!("{what} {pinned}, this build's {expected}"))
}

/// Takes over pinned maps only if they are this build's: read with the wrong shape or
/// layout, they would give wrong numbers. Pins of another namespace are refused untouched
/// (see [`foreign_pins`]). Of this namespace's (or no one's yet), what [`judge_left_pins`]
/// finds is done: short-lived maps of another shape replaced alone, or the whole set removed,
/// links first, and counting started from zero, as after a clean upgrade: refused, an
/// upgrade after a crash crash-looped on every such node until someone ran `cleanup` there.
/// Returns whether a crashed run's pins are taken over ([`LeftPins::taken_over`]).
fn check_pinned_maps(pin_dir: &Path, own_netns: u64, sizes: TableSizes) -> anyhow::Result<bool> {
    let map_dir = paths::map_pin_dir(pin_dir);
    let owner = orphans::pinned_owner(&map_dir)?;
    if let Some(owner) = owner.filter(|&owner| owner != 0 && owner != own_netns) {
        return Err(foreign_pins(pin_dir, owner, own_netns));
    }
    let left = judge_left_pins(&map_dir, owner, sizes)?;
    if let Some(left_by) = left.removed_for {
        // As a clean upgrade would have.
        return remove_left_pins(pin_dir, &left_by).map(|()| false);
    }
    for (path, reason) in left.replaced {
        std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        tracing::warn!(
            "replaced the pinned map {} {reason}: it held {SHORT_LIVED_STATE}",
            path.display()
        );
    }
    Ok(left.taken_over)
}

/// What a start does with the pinned maps in `map_dir`, which no running collector holds and
/// whose `PIN_OWNER` reads `owner` (`None`: not pinned, and the others removed before as no
/// one's), judged without touching them.
#[derive(Debug, Default)]
pub struct LeftPins {
    /// Why the whole set is removed, counters with it: "a crashed run of another build
    /// (...)", or "a crashed run with `connection_table_slots` = X, the config's Y".
    pub removed_for: Option<String>,
    /// Short-lived maps of another shape, replaced alone, with how each differs ("of another
    /// build (...)", or "sized X slots, where this start gives it Y (`key`)").
    pub replaced: Vec<(PathBuf, String)>,
    /// Whether the start takes over a crashed run's pins and counts on from them: they have
    /// an owner (0: a start's that loaded no further, which nothing counted into), and are
    /// not removed.
    pub taken_over: bool,
}

/// The kernel tables a start sizes from its config: a crashed run's pin sized otherwise, and
/// alike in all else, was left under another config, not by another build.
#[derive(Clone, Copy, Debug)]
pub struct TableSizes {
    /// `CONN_STATE`'s slots (`connection_table_slots`).
    pub connection_table_slots: u32,
    /// `DNS_INFLIGHT`'s slots (`[dns] in_flight_slots`).
    pub dns_in_flight_slots: u32,
}

impl TableSizes {
    /// The sizes a start with `config` gives the tables.
    #[must_use]
    pub fn of(config: &Config) -> Self {
        Self {
            connection_table_slots: config.connection_table_slots,
            dns_in_flight_slots: config.dns.in_flight_slots,
        }
    }

    /// The slots the config gives the map `name`, and the key that gives them, if it sizes it.
    fn configured(self, name: &str) -> Option<(u32, &'static str)> {
        match name {
            map_names::CONN_STATE => Some((self.connection_table_slots, "connection_table_slots")),
            map_names::DNS_INFLIGHT => Some((self.dns_in_flight_slots, "[dns] in_flight_slots")),
            _ => None,
        }
    }
}

/// Judges the pins in `map_dir` as a start with the config's `sizes` would (see
/// [`check_pinned_maps`]): a short-lived map of another shape is replaced alone, so that an
/// upgrade over a crashed older build's pins keeps its counters (its programs write on into
/// the old map until the start replaces their links); a counter map of another shape, or
/// pins of another [`PIN_LAYOUT`] (shaped alike, maps that mean other things), have the whole
/// set removed.
pub fn judge_left_pins(
    map_dir: &Path,
    owner: Option<u64>,
    sizes: TableSizes,
) -> anyhow::Result<LeftPins> {
    let object = embedded_object()?;
    let mut left = LeftPins::default();
    let mut other_build = None;
    // Told apart from another build's pins, which say so whatever the table's size.
    let mut resized = None;
    for name in PINNED_MAPS {
        let path = map_dir.join(name);
        if !path.exists() {
            continue;
        }
        let expected = object
            .maps
            .get(name)
            .with_context(|| format!("the kernel object has no map {name}"))?;
        let pinned = MapData::from_pin(&path)
            .with_context(|| format!("opening the pinned map {}", path.display()))?;
        let configured = sizes.configured(name);
        let info = pinned.info()?;
        if let Some(difference) = shape_difference(expected, &info, configured.map(|(s, _)| s)) {
            // The table sized otherwise, nothing else: the config changed, not the build.
            let resized_by = configured
                .filter(|_| shape_difference(expected, &info, Some(info.max_entries())).is_none());
            if SHORT_LIVED_MAPS.contains(&name) {
                let reason = match resized_by {
                    Some((slots, key)) => format!(
                        "sized {} slots, where this start gives it {slots} ({key})",
                        info.max_entries()
                    ),
                    None => format!("of another build ({difference})"),
                };
                left.replaced.push((path, reason));
            } else if let Some((slots, key)) = resized_by {
                resized = Some(format!(
                    "a crashed run with {key} = {}, the config's {slots}",
                    info.max_entries(),
                ));
            } else {
                other_build.get_or_insert(format!(
                    "a crashed run of another build ({name} has {difference})"
                ));
            }
        }
    }
    if other_build.is_none()
        && let Some(owner) = owner
    {
        let owner_pin = map_dir.join(map_names::PIN_OWNER);
        let layout = read_pin_word(&owner_pin, 1)
            .with_context(|| format!("reading {}", owner_pin.display()))?;
        // No layout: pins of a start that loaded no further, unless they have an owner.
        if (owner != 0 || layout != 0) && layout != PIN_LAYOUT {
            other_build = Some(format!(
                "a crashed run of another build (layout {layout}, this build's {PIN_LAYOUT})"
            ));
        }
    }
    left.removed_for = other_build.or(resized);
    // An owner of 0: a start's that attached nothing (see `own_pins`), nothing counted into
    // them, and a failed start removes them as it removes its own.
    left.taken_over = left.removed_for.is_none() && owner.is_some_and(|owner| owner != 0);
    Ok(left)
}

/// Gives every configured route and upstream its slot (see [`slots::plan`]), records the
/// owners and zeroes the counters of slots taken over from retired ones. Returns the
/// routes, the upstreams and the retired slots still left (see [`Attachment::retired_slots`]).
fn bind_slots(
    ebpf: &mut Ebpf,
    config: &Config,
) -> anyhow::Result<(Vec<WatchedRoute>, Vec<WatchedUpstream>, Vec<u32>)> {
    let owners = route_owners(ebpf)?;
    let names: Vec<String> = config
        .routes
        .iter()
        .map(|r| r.name.clone())
        .chain(
            config
                .upstreams
                .iter()
                .map(|u| upstream_slot_owner(&u.name)),
        )
        .collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let plan = slots::plan(&owners, &name_refs, || {
        open_connections_by_slot(ebpf)
            .context("reading the connection table for the open connections per route")
    })?;
    // Zeroed before renamed: a start that fails or dies between the two leaves the slot
    // under its old name, reclaimed (and zeroed) again by the next, where renamed first the
    // next start took the slot for the new route's own, the removed route's totals in it.
    for &slot in &plan.reclaimed {
        zero_slot(ebpf, slot)?;
    }
    let mut name_map: Array<&mut MapData, RouteName> = Array::try_from(
        ebpf.map_mut(map_names::ROUTE_NAMES)
            .context("the kernel object has no route name map")?,
    )?;
    for (name, &slot) in names.iter().zip(&plan.slots) {
        let mut record = RouteName { bytes: [0; 64] };
        let bytes = name.as_bytes();
        let len = bytes.len().min(record.bytes.len() - 1);
        record.bytes[..len].copy_from_slice(&bytes[..len]);
        name_map.set(slot, record, 0)?;
    }
    let (route_slots, upstream_slots) = plan.slots.split_at(config.routes.len());
    let routes = config
        .routes
        .iter()
        .zip(route_slots)
        .map(|(route, &slot)| WatchedRoute {
            name: route.name.clone(),
            kind: route.kind,
            ports: route.ports.clone(),
            sni: route.sni.clone(),
            slot,
        })
        .collect();
    let upstreams = config
        .upstreams
        .iter()
        .zip(upstream_slots)
        .map(|(upstream, &slot)| WatchedUpstream {
            name: upstream.name.clone(),
            ports: upstream.ports.clone(),
            slot,
        })
        .collect();
    Ok((routes, upstreams, plan.retired))
}

/// The route recorded as each slot's owner (`None`: never used).
fn route_owners(ebpf: &Ebpf) -> anyhow::Result<Vec<Option<String>>> {
    let names: Array<&MapData, RouteName> = Array::try_from(
        ebpf.map(map_names::ROUTE_NAMES)
            .context("the kernel object has no route name map")?,
    )?;
    (0..MAX_ROUTES)
        .map(|slot| {
            let name = names.get(&slot, 0)?;
            let end = name
                .bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name.bytes.len());
            Ok((end > 0).then(|| String::from_utf8_lossy(&name.bytes[..end]).into_owned()))
        })
        .collect()
}

/// The connections open per route slot: those the (pinned) connection table holds, or, while
/// it holds any accepted on a port shared by server name, those the counters show open (as
/// the poll does: opened, and neither closed nor turned away by the full table) where more.
/// Such a connection (`BY_NAME`) keeps the port's route in its table slot (its route is in
/// socket storage, which only the kernel reads), so only the counters show the route it
/// counts in.
fn open_connections_by_slot(ebpf: &Ebpf) -> anyhow::Result<Vec<u64>> {
    let table = mapped_conn_state(ebpf)?;
    let mut open = vec![0u64; MAX_ROUTES as usize];
    let mut by_name = false;
    for entry in table.entries() {
        if entry.cookie != 0
            && let Some(count) = open.get_mut(entry.route as usize)
        {
            *count += 1;
            by_name |= entry.flags & conn_flags::BY_NAME != 0;
        }
    }
    if !by_name {
        return Ok(open);
    }
    let counters: PerCpuArray<&MapData, ConnCounters> = PerCpuArray::try_from(
        ebpf.map(map_names::CONN_COUNTERS)
            .context("the kernel object has no connection counters")?,
    )?;
    for (slot, count) in (0..).zip(open.iter_mut()) {
        // Read as the poll reads it, so that no close is seen without its open.
        let totals = crate::counters::sum_conn(&counters, slot)?;
        *count = (*count).max(crate::snapshot::still_open(&totals));
    }
    Ok(open)
}

/// The connection table, mapped for a read at start: slot by slot through the map's system
/// call, a start at its largest size took a second longer (3.0 s against 2.0 here).
fn mapped_conn_state(ebpf: &Ebpf) -> anyhow::Result<MappedArray<ConnState>> {
    MappedArray::map_shared(
        ebpf.map(map_names::CONN_STATE)
            .context("the kernel object has no connection table")?,
        map_names::CONN_STATE,
    )
}

/// Size of the tally tables (DNS names, connection clients): their slots for every possible
/// CPU id, which the programs index by.
fn tally_slots() -> anyhow::Result<u32> {
    const POSSIBLE: &str = "/sys/devices/system/cpu/possible";
    let possible =
        std::fs::read_to_string(POSSIBLE).with_context(|| format!("reading {POSSIBLE}"))?;
    let ids = cpu_ids(&possible)
        .with_context(|| format!("{POSSIBLE} holds {possible:?}, not a list of CPU ids"))?;
    tally_table_len(ids)
        .with_context(|| format!("CPU ids up to {ids}: too many for the tally tables"))
}

/// How many CPU ids a possible-CPU list (`0-3,8-11`) spans: up to its highest, which a list
/// with gaps puts past the count of its CPUs (what `nr_cpus` gives).
fn cpu_ids(possible: &str) -> Option<usize> {
    let highest: usize = possible.trim().rsplit([',', '-']).next()?.parse().ok()?;
    highest.checked_add(1)
}

fn zero_per_cpu<T: aya::Pod + Default>(
    ebpf: &mut Ebpf,
    map: &str,
    indices: impl Iterator<Item = u32>,
) -> anyhow::Result<()> {
    let mut array: PerCpuArray<&mut MapData, T> =
        PerCpuArray::try_from(ebpf.map_mut(map).with_context(|| format!("no map {map}"))?)?;
    let cpus = aya::util::nr_cpus().map_err(|(_, err)| err)?;
    for index in indices {
        let zeros = PerCpuValues::try_from(vec![T::default(); cpus])?;
        array.set(index, zeros, 0)?;
    }
    Ok(())
}

fn zero_slot(ebpf: &mut Ebpf, slot: u32) -> anyhow::Result<()> {
    zero_per_cpu::<ConnCounters>(ebpf, map_names::CONN_COUNTERS, std::iter::once(slot))?;
    zero_per_cpu::<ConnDurations>(ebpf, map_names::CONN_DURATIONS, std::iter::once(slot))?;
    zero_per_cpu::<UpstreamCounters>(ebpf, map_names::UPSTREAM_COUNTERS, std::iter::once(slot))?;
    zero_per_cpu::<SniCounters>(ebpf, map_names::SNI_COUNTERS, std::iter::once(slot))?;
    zero_per_cpu::<TrafficCounters>(
        ebpf,
        map_names::ROUTE_TRAFFIC,
        (0..2).map(|dir| traffic_index(slot, dir)),
    )
}

/// Loads the kernel object with `config`'s settings as its read-only globals and the
/// pinned maps under `map_dir` (made there if absent).
fn load(
    config: &Config,
    map_dir: &Path,
    netns_cookie: u64,
    address_slots: u32,
) -> anyhow::Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    let pin_paths: Vec<(&str, PathBuf)> = PINNED_MAPS
        .iter()
        .map(|name| (*name, map_dir.join(name)))
        .collect();
    for (name, path) in &pin_paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader.override_global(GLOBAL_NETNS_COOKIE, &netns_cookie, true);
    let local_only = u32::from(!config.all_namespaces);
    loader.override_global(GLOBAL_LOCAL_ONLY, &local_only, true);
    let address_set_bits = local_address_set_bits(address_slots);
    loader.override_global(GLOBAL_LOCAL_ADDRESS_SET_BITS, &address_set_bits, true);
    loader.map_max_entries(map_names::LOCAL_ADDRESSES, address_slots);
    loader.map_max_entries(map_names::CONN_STATE, config.connection_table_slots);
    let table_bits = conn_table_bits(config.connection_table_slots);
    loader.override_global(GLOBAL_CONN_TABLE_BITS, &table_bits, true);
    let client_events = u32::from(config.client_stats);
    loader.override_global(GLOBAL_CLIENT_EVENTS, &client_events, true);
    let upstreams_watched = u32::from(!config.upstreams.is_empty());
    loader.override_global(GLOBAL_UPSTREAMS_WATCHED, &upstreams_watched, true);
    let sni_watched = u32::from(config.shares_ports_by_name());
    loader.override_global(GLOBAL_SNI_WATCHED, &sni_watched, true);
    let dns_enabled = u32::from(config.dns.enabled);
    loader.override_global(GLOBAL_DNS_ENABLED, &dns_enabled, true);
    let sample_below = dns_match_below(config.dns.sample_every);
    loader.override_global(GLOBAL_DNS_SAMPLE_BELOW, &sample_below, true);
    let match_responses = u32::from(config.dns.match_responses);
    loader.override_global(GLOBAL_DNS_MATCH_RESPONSES, &match_responses, true);
    let match_below = dns_match_below(config.dns.match_every);
    loader.override_global(GLOBAL_DNS_MATCH_BELOW, &match_below, true);
    loader.map_max_entries(map_names::DNS_INFLIGHT, config.dns.in_flight_slots);
    let in_flight_bits = dns_inflight_bits(config.dns.in_flight_slots);
    loader.override_global(GLOBAL_DNS_INFLIGHT_BITS, &in_flight_bits, true);
    let ports = dns_ports(config);
    loader.override_global(GLOBAL_DNS_PORTS, &ports, true);
    let tally_slots = tally_slots()?;
    loader.map_max_entries(map_names::DNS_NAMES, tally_slots);
    loader.map_max_entries(map_names::CONN_CLIENTS, tally_slots);
    loader
        .load(OBJECT)
        .context("loading the kernel programs and maps")
}

/// Writes remote port → slot + 1 for every upstream port (a map new at every start).
fn fill_upstream_port_map(ebpf: &mut Ebpf, upstreams: &[WatchedUpstream]) -> anyhow::Result<()> {
    let mut ports: Array<&mut MapData, u32> = Array::try_from(
        ebpf.map_mut(map_names::UPSTREAM_BY_PORT)
            .context("the kernel object has no upstream port map")?,
    )?;
    for upstream in upstreams {
        for &port in &upstream.ports {
            ports.set(u32::from(port), upstream.slot + 1, 0)?;
        }
    }
    Ok(())
}

/// Writes port → slot + 1 for every watched port, and the port's bit. Both maps are new at
/// every start, so only the watched ports need writing.
fn fill_port_map(ebpf: &mut Ebpf, routes: &[WatchedRoute]) -> anyhow::Result<()> {
    let mut bits = vec![0u64; PORT_BITMAP_WORDS as usize];
    let mut ports: Array<&mut MapData, u32> = Array::try_from(
        ebpf.map_mut(map_names::ROUTE_BY_PORT)
            .context("the kernel object has no port map")?,
    )?;
    // A port shared by name maps to its route without a name: the accept starts there, and
    // live traffic, counted per packet by port, is that route's.
    for route in routes.iter().filter(|route| route.sni.is_empty()) {
        for &port in &route.ports {
            ports.set(u32::from(port), route.slot + 1, 0)?;
            let (word, bit) = port_bit(port);
            bits[word as usize] |= bit;
        }
    }
    let mut bitmap: Array<&mut MapData, u64> = Array::try_from(
        ebpf.map_mut(map_names::ROUTE_PORT_BITS)
            .context("the kernel object has no port bitmap")?,
    )?;
    for (word, &value) in (0..).zip(&bits) {
        if value != 0 {
            bitmap.set(word, value, 0)?;
        }
    }
    Ok(())
}

/// Writes the ports shared by name and each (port, server name) → slot + 1. Both maps are new
/// at every start.
fn fill_server_name_maps(ebpf: &mut Ebpf, routes: &[WatchedRoute]) -> anyhow::Result<()> {
    let mut bits = vec![0u64; PORT_BITMAP_WORDS as usize];
    let mut names: aya::maps::HashMap<&mut MapData, SniKey, u32> = aya::maps::HashMap::try_from(
        ebpf.map_mut(map_names::SNI_ROUTES)
            .context("the kernel object has no server name map")?,
    )?;
    for route in routes.iter().filter(|route| !route.sni.is_empty()) {
        for &port in &route.ports {
            let (word, bit) = port_bit(port);
            bits[word as usize] |= bit;
            for name in &route.sni {
                let (wildcard, host) = match name.strip_prefix("*.") {
                    Some(host) => (true, host),
                    None => (false, name.as_str()),
                };
                names.insert(
                    SniKey::new(port, wildcard, host.as_bytes()),
                    route.slot + 1,
                    0,
                )?;
            }
        }
    }
    let mut bitmap: Array<&mut MapData, u64> = Array::try_from(
        ebpf.map_mut(map_names::SNI_PORT_BITS)
            .context("the kernel object has no shared port bitmap")?,
    )?;
    for (word, &value) in (0..).zip(&bits) {
        if value != 0 {
            bitmap.set(word, value, 0)?;
        }
    }
    Ok(())
}

/// Refuses pins a collector of another network namespace left (its links are on that
/// namespace's interfaces, named by an index that means another interface here), before
/// anything in them is touched; otherwise marks them as this layout's ([`PIN_LAYOUT`], which
/// [`check_pinned_maps`] compares). They become this namespace's in [`Attachment::own_pins`].
fn claim_pins(ebpf: &mut Ebpf, pin_dir: &Path, own_netns: u64) -> anyhow::Result<()> {
    let mut owner = pin_owner(ebpf)?;
    let found = owner.get(&0, 0)?;
    if found != 0 && found != own_netns {
        return Err(foreign_pins(pin_dir, found, own_netns));
    }
    // The layout first: pins with an owner and no layout would be taken for another build's.
    // The owner only once loopback's links are attached ([`Attachment::own_pins`]).
    owner.set(1, PIN_LAYOUT, 0)?;
    Ok(())
}

fn pin_owner(ebpf: &mut Ebpf) -> anyhow::Result<Array<&mut MapData, u64>> {
    Ok(Array::try_from(
        ebpf.map_mut(map_names::PIN_OWNER)
            .context("the kernel object has no pin owner map")?,
    )?)
}

/// The network namespace cookie in the pinned `PIN_OWNER` at `path` (0: never claimed).
pub fn read_pin_owner(path: &Path) -> anyhow::Result<u64> {
    read_pin_word(path, 0)
}

/// Word `index` of the pinned `PIN_OWNER` at `path`: 0 the owner, 1 the layout.
fn read_pin_word(path: &Path, index: u32) -> anyhow::Result<u64> {
    let data = MapData::from_pin(path)?;
    let owner = Array::<MapData, u64>::try_from(aya::maps::Map::from_map_data(data)?)?;
    Ok(owner.get(&index, 0)?)
}

/// DNS samples and connection events dropped to a full ring (the pinned counters), summed
/// over the CPUs; `None`, said in the log, if they cannot be read.
fn events_dropped(ebpf: &Ebpf) -> Option<RingDrops> {
    read_events_dropped(ebpf)
        .inspect_err(|err| tracing::warn!("reading the dropped-event counters: {err:#}"))
        .ok()
}

fn read_events_dropped(ebpf: &Ebpf) -> anyhow::Result<RingDrops> {
    let dns: PerCpuArray<&MapData, DnsCounters> = PerCpuArray::try_from(
        ebpf.map(map_names::DNS_COUNTERS)
            .context("no DNS_COUNTERS")?,
    )?;
    let errors: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map(map_names::ERRORS).context("no ERRORS")?)?;
    Ok(crate::counters::ring_drops(&dns, &errors)?)
}

/// The refusal of pins that a collector of another network namespace made.
pub fn foreign_pins(pin_dir: &Path, owner: u64, own_netns: u64) -> anyhow::Error {
    anyhow::anyhow!(
        "the pins under {} belong to a collector of another network namespace (cookie {owner}; \
         this one's is {own_netns}): give this one its own pin directory (`pin_dir`, or \
         --pin-dir), or remove them where they were made with `collector cleanup --apply`",
        pin_dir.display()
    )
}

/// Sets the time of the latest upstream query a second ahead. Its pin may be older than the
/// stamps in `DNS_UPSTREAM` (kept from a build without it, or from before a downgrade to
/// one: an older build removes only the pins it knows). Ahead of every stamp, it sends the
/// responses of the next second through the table, as before the shortcut; the upstream
/// queries after that raise it, and a program still running from before this start cannot
/// lower it (it only ever raises).
fn hold_off_upstream_shortcut(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let mut latest: Array<&mut MapData, u64> = Array::try_from(
        ebpf.map_mut(map_names::DNS_UPSTREAM_LATEST)
            .context("the kernel object has no latest upstream time")?,
    )?;
    latest.set(0, crate::clock::monotonic_ns() + 1_000_000_000, 0)?;
    Ok(())
}

/// The DNS ports as the classifiers see them (the config allows at most
/// `DNS_MAX_PORTS` of each). A port may be both: then a query to it arriving is a client's,
/// one leaving from a non-server port an upstream query.
fn dns_ports(config: &Config) -> DnsPorts {
    let mut ports = DnsPorts::default();
    for (slot, &port) in ports.server.iter_mut().zip(&config.dns.ports) {
        *slot = port;
    }
    for (slot, &port) in ports.upstream.iter_mut().zip(&config.dns.upstream_ports) {
        *slot = port;
    }
    ports
}

/// The link pins under `links_dir` whose file names `keep` takes, opened: name, path and
/// link. Pins are files (a symbolic link is not followed); one removed meanwhile (a stop or
/// a cleanup under way) is left out.
pub fn open_link_pins(
    links_dir: &Path,
    keep: impl Fn(&std::ffi::OsStr) -> bool,
) -> anyhow::Result<Vec<(std::ffi::OsString, PathBuf, OwnedFd)>> {
    let mut links = Vec::new();
    for entry in
        fs::read_dir(links_dir).with_context(|| format!("reading {}", links_dir.display()))?
    {
        let entry = entry.with_context(|| format!("reading {}", links_dir.display()))?;
        let name = entry.file_name();
        if !entry.file_type()?.is_file() || !keep(&name) {
            continue;
        }
        let path = entry.path();
        match bpf_sys::open_pinned(&path) {
            Ok(link) => links.push((name, path, link)),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err).with_context(|| format!("opening the link {}", path.display()));
            }
        }
    }
    Ok(links)
}

/// The kernel object's program `name`, of type `P`, as `program_loading` loaded it.
fn loaded<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    Ok(ebpf
        .program_mut(name)
        .with_context(|| format!("the kernel object has no program {name}"))?
        .try_into()?)
}

/// The tc programs, the hooks they go on, their pin names and the interfaces they fit.
/// Loopback: one ingress classifier sees every packet once; elsewhere, both hooks, with the
/// programs for the interface's framing. With `stats_floor`, an empty program goes last on
/// each hook, so that the statistics' own cost is measured on the same packets.
fn classifier_table(stats_floor: bool) -> Vec<(&'static str, TcAttachType, &'static str, GoesOn)> {
    let mut table = vec![
        (
            program_names::COUNT_INGRESS,
            TcAttachType::Ingress,
            TC_INGRESS_PIN,
            GoesOn::Ethernet,
        ),
        (
            program_names::COUNT_EGRESS,
            TcAttachType::Egress,
            TC_EGRESS_PIN,
            GoesOn::Ethernet,
        ),
        (
            program_names::COUNT_INGRESS_IP,
            TcAttachType::Ingress,
            TC_INGRESS_IP_PIN,
            GoesOn::Ip,
        ),
        (
            program_names::COUNT_EGRESS_IP,
            TcAttachType::Egress,
            TC_EGRESS_IP_PIN,
            GoesOn::Ip,
        ),
        (
            program_names::COUNT_LOOPBACK,
            TcAttachType::Ingress,
            TC_LOOPBACK_PIN,
            GoesOn::Loopback,
        ),
    ];
    if stats_floor {
        table.extend([
            (
                program_names::STATS_FLOOR_TC,
                TcAttachType::Ingress,
                STATS_FLOOR_INGRESS_PIN,
                GoesOn::AllButLoopback,
            ),
            (
                program_names::STATS_FLOOR_TC,
                TcAttachType::Egress,
                STATS_FLOOR_EGRESS_PIN,
                GoesOn::AllButLoopback,
            ),
            (
                program_names::STATS_FLOOR_TC,
                TcAttachType::Ingress,
                STATS_FLOOR_LOOPBACK_PIN,
                GoesOn::Loopback,
            ),
        ]);
    }
    table
}

/// `err`, from attaching a TCX link, with what EINVAL means on a kernel that reads as older
/// than TCX (Linux 6.6); one whose vendor backported TCX attaches, so the version alone
/// refuses nothing.
fn old_kernel_hint(err: anyhow::Error) -> anyhow::Error {
    let release = crate::check::kernel_release().unwrap_or_default();
    old_kernel_hint_for(err, &release)
}

fn old_kernel_hint_for(err: anyhow::Error, release: &str) -> anyhow::Error {
    match crate::check::kernel_too_old(release) {
        Some(why) if caused_by(&err, libc::EINVAL) => err.context(why),
        _ => err,
    }
}

/// Whether the kernel's `errno` is among `err`'s causes.
fn caused_by(err: &anyhow::Error, errno: i32) -> bool {
    err.chain()
        .filter_map(|cause| cause.downcast_ref::<io::Error>())
        .any(|cause| cause.raw_os_error() == Some(errno))
}

/// Switches the kernel's run-time statistics on, for as long as the returned descriptor is
/// open (`--bpf-stats`).
fn enable_run_time_stats() -> anyhow::Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|err| {
        let denied = privileges::denied(&err.io_error);
        let err = anyhow::Error::from(err).context("enabling BPF run-time statistics");
        if denied {
            err.context(privileges::NeedsSysAdmin(
                "--bpf-stats: the kernel switches its run-time statistics on only for \
                 CAP_SYS_ADMIN; run with it, or without --bpf-stats"
                    .to_owned(),
            ))
        } else {
            err
        }
    })
}

/// `err`, from attaching a program to the hook `attach_type` of the cgroup2 root `cgroup` (at
/// `cgroup2`), with what the kernel means by E2BIG there (the hook holds its 64 programs
/// already, `BPF_CGROUP_MAX_PROGS`) or by EPERM where a program on the hook was attached
/// without `BPF_F_ALLOW_MULTI` (it lets no other join it, whatever the privileges).
fn cgroup_hook_hint(
    err: anyhow::Error,
    cgroup: &File,
    attach_type: u32,
    cgroup2: &str,
) -> anyhow::Error {
    if caused_by(&err, libc::E2BIG) {
        return err.context(full_hook_advice(attach_type, cgroup2));
    }
    if !caused_by(&err, libc::EPERM) {
        return err;
    }
    match bpf_sys::CgroupHook::query(cgroup.as_fd(), attach_type) {
        Ok(hook) if hook.closed() => err.context(CgroupHookClosed(closed_hook_advice(
            &hook,
            attach_type,
            cgroup2,
        ))),
        _ => err,
    }
}

/// What closed the cgroup2 root's hook `attach_type` (`hook.closed()`), and how to open it:
/// said by `run` when refused there and by `check` before.
pub fn closed_hook_advice(hook: &bpf_sys::CgroupHook, attach_type: u32, cgroup2: &str) -> String {
    let how = if hook.flags & bpf_sys::BPF_F_ALLOW_OVERRIDE == 0 {
        "exclusively"
    } else {
        "with `override`"
    };
    format!(
        "the cgroup2 root {cgroup2} has programs {ids:?} (ids) attached {how} on its {name} \
         hook, which lets no other program join them (as `bpftool cgroup attach` does without \
         `multi`): `bpftool cgroup show {cgroup2}` lists them; detach them, or attach them \
         again with `multi`",
        ids = hook.ids,
        name = cgroup_hook_name(attach_type),
    )
}

/// What filled the cgroup2 root's hook `attach_type` to the kernel's limit, and how to find
/// them: said by `run` when refused there and by `check` before.
pub fn full_hook_advice(attach_type: u32, cgroup2: &str) -> String {
    format!(
        "the cgroup2 root {cgroup2} holds the kernel's limit of {} programs on its {} hook \
         already: every collector on the node attaches its own (one per sidecar pod, and a \
         DaemonSet's), and so do the pin directories crashed ones left until removed \
         (`collector cleanup --apply --pin-dir DIR`); `bpftool cgroup show {cgroup2}` lists \
         them",
        bpf_sys::CGROUP_MAX_PROGRAMS,
        cgroup_hook_name(attach_type),
    )
}

/// A cgroup hook's name, as `bpftool cgroup show` writes it (the two the agent uses).
fn cgroup_hook_name(attach_type: u32) -> &'static str {
    if attach_type == bpf_sys::BPF_CGROUP_INET_INGRESS {
        "ingress"
    } else {
        "sock_ops"
    }
}

/// A cgroup hook closed to our link by a program on it ([`cgroup_hook_hint`]): no privilege
/// helps, so [`privilege_hint`] adds no advice.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CgroupHookClosed(String);

/// Says what to do when something was refused: missing privileges, or, for root with every
/// capability, a security module ([`privileges::denial_advice`]). Not where the verifier
/// refused a program (it answers EACCES too, and says why in its log): no privilege helps.
fn privilege_hint(err: anyhow::Error) -> anyhow::Error {
    // Says itself that it needs CAP_SYS_ADMIN: right when this process lacks it; with it, a
    // security module's refusal (a runtime's default AppArmor profile denies mounts) is the
    // likelier cause, and the advice below stays.
    let needs_sys_admin = err.downcast_ref::<privileges::NeedsSysAdmin>().is_some()
        || err
            .downcast_ref::<paths::PathError>()
            .is_some_and(paths::PathError::explains_denial);
    if needs_sys_admin && privileges::effective() & (1 << crate::check::CAP_SYS_ADMIN.0) == 0
        || err.downcast_ref::<CgroupHookClosed>().is_some()
    {
        return err;
    }
    let denied = privileges::denied_in(&err)
        || err
            .chain()
            .any(|cause| cause.to_string().contains("Operation not permitted"));
    if denied && !privileges::verifier_refused(&err, privileges::effective()) {
        err.context(privileges::denial_advice_here())
    } else {
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::ScratchDir;

    /// No kernel program calls `memset`, `memcpy` or their kin: bpf-linker links them as
    /// functions that go one byte a loop (a 256-byte name zeroed so took about 1,300
    /// instructions a connection), and LLVM calls them for zeroings it does not turn into
    /// stores, so the programs write such bytes with stores of their own. Every BPF-to-BPF
    /// call is resolved: through its relocation, which names the function (a global one) or
    /// its section (a local one, at the offset the call's immediate gives), or without one
    /// (a call within a section) from its own offset.
    #[test]
    fn no_kernel_program_calls_the_byte_wise_memory_functions() {
        use object::{
            Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget, SectionIndex,
            SectionKind, SymbolKind,
        };
        /// The call instruction's opcode (`BPF_JMP | BPF_CALL`), and its source register
        /// for a call of a BPF function (`BPF_PSEUDO_CALL`; helpers have 0, kfuncs 2).
        const CALL: u8 = 0x85;
        const PSEUDO_CALL: u8 = 1;
        let file = object::File::parse(OBJECT).unwrap();
        let function_at = |section: SectionIndex, address: u64| {
            file.symbols()
                .find(|symbol| {
                    symbol.kind() == SymbolKind::Text
                        && symbol.section_index() == Some(section)
                        && (symbol.address()..symbol.address() + symbol.size()).contains(&address)
                })
                .map_or_else(
                    || panic!("no function at {address:#x} of section {section:?}"),
                    |symbol| symbol.name().unwrap().to_owned(),
                )
        };
        let mut forbidden = Vec::new();
        for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
            let code = section.data().unwrap();
            let relocations: std::collections::HashMap<u64, RelocationTarget> = section
                .relocations()
                .map(|(offset, relocation)| (offset, relocation.target()))
                .collect();
            for (at, instruction) in code.chunks_exact(8).enumerate() {
                if instruction[0] != CALL || instruction[1] >> 4 != PSEUDO_CALL {
                    continue;
                }
                let at = at as u64 * 8;
                let jump =
                    (i64::from(i32::from_le_bytes(instruction[4..].try_into().unwrap())) + 1) * 8;
                let name = match relocations.get(&at) {
                    Some(&RelocationTarget::Symbol(index)) => {
                        let symbol = file.symbol_by_index(index).unwrap();
                        if symbol.kind() == SymbolKind::Section {
                            function_at(
                                symbol.section_index().unwrap(),
                                symbol.address().wrapping_add_signed(jump),
                            )
                        } else {
                            symbol.name().unwrap().to_owned()
                        }
                    }
                    Some(other) => panic!("a call at {at:#x} relocated to {other:?}"),
                    None => function_at(section.index(), at.wrapping_add_signed(jump)),
                };
                if ["memset", "memcpy", "memmove", "memcmp", "bcmp"].contains(&name.as_str()) {
                    forbidden.push(format!("{} +{at:#x}: {name}", section.name().unwrap()));
                }
            }
        }
        assert!(
            forbidden.is_empty(),
            "calls to byte-wise memory functions: {forbidden:?}"
        );
    }

    #[test]
    fn a_pin_that_cannot_be_removed_leaves_the_others_removed_and_is_named() {
        let dir = ScratchDir::new("undo");
        let stuck = dir.path("tc_ingress_4");
        std::fs::create_dir_all(stuck.join("inside")).unwrap();
        let missing = dir.path("tc_ingress_5");
        let after = dir.write("tc_egress_4", "");
        let err = remove_each([&stuck, &missing, &after]).unwrap_err();
        assert!(!after.exists());
        assert!(stuck.exists());
        assert!(format!("{err:#}").contains("tc_ingress_4"), "{err:#}");
    }

    /// A program attached to a cgroup's `sock_ops` hook without `multi` (the way before
    /// links) closes the hook: the kernel refuses our link with EPERM, and the error names
    /// the programs and how to open the hook, where it blamed a security module. On a child
    /// cgroup of the root, whose hook no other test uses.
    #[test]
    fn a_cgroup_hook_closed_by_a_program_on_it_is_named() {
        use bpf_sys::{BPF_CGROUP_SOCK_OPS, BPF_F_ALLOW_OVERRIDE, test_programs};
        let child = test_programs::TestCgroup::make("closed");
        let cgroup = &child.file;
        let theirs = test_programs::load_sock_ops_returning().unwrap();
        let ours = test_programs::load_sock_ops_returning().unwrap();
        for (flags, how) in [
            (0, "exclusively"),
            (BPF_F_ALLOW_OVERRIDE, "with `override`"),
        ] {
            test_programs::attach(cgroup.as_fd(), theirs.as_fd(), BPF_CGROUP_SOCK_OPS, flags)
                .unwrap();
            let refused = test_programs::link(cgroup.as_fd(), ours.as_fd(), BPF_CGROUP_SOCK_OPS);
            let err = anyhow::Error::from(refused.expect_err("linked to a closed hook"))
                .context("attaching ours");
            let message = format!(
                "{:#}",
                privilege_hint(cgroup_hook_hint(
                    err,
                    cgroup,
                    BPF_CGROUP_SOCK_OPS,
                    &child.path.display().to_string()
                ))
            );
            test_programs::detach(cgroup.as_fd(), theirs.as_fd(), BPF_CGROUP_SOCK_OPS).unwrap();
            assert!(
                message.contains("has programs [")
                    && message.contains(&format!("] (ids) attached {how} on its sock_ops hook"))
                    && message.contains("attach them again with `multi`")
                    && message.ends_with("attaching ours: Operation not permitted (os error 1)")
                    && !message.contains("security module"),
                "{message}"
            );
        }
        // Open again, the hook takes the link.
        drop(test_programs::link(cgroup.as_fd(), ours.as_fd(), BPF_CGROUP_SOCK_OPS).unwrap());
    }

    #[test]
    fn the_tally_tables_span_every_possible_cpu_id() {
        assert_eq!(cpu_ids("0-1\n"), Some(2));
        assert_eq!(cpu_ids("0"), Some(1));
        // A list with gaps: eight CPUs, ids up to 11.
        assert_eq!(cpu_ids("0-3,8-11\n"), Some(12));
        assert_eq!(cpu_ids("0-3,6"), Some(7));
        assert_eq!(cpu_ids(""), None);
        assert_eq!(cpu_ids("0-x"), None);
    }

    #[test]
    fn a_full_cgroup_hook_is_named_with_its_limit_and_the_fix() {
        let attaching = |errno| {
            anyhow::Error::from(io::Error::from_raw_os_error(errno))
                .context("attaching sock_ops to the /sys/fs/cgroup")
        };
        // Not a cgroup: the EPERM below is not looked into further.
        let not_a_cgroup = File::open("/").unwrap();
        let hint = |errno| {
            cgroup_hook_hint(
                attaching(errno),
                &not_a_cgroup,
                bpf_sys::BPF_CGROUP_SOCK_OPS,
                "/sys/fs/cgroup",
            )
        };
        let full = format!("{:#}", hint(libc::E2BIG));
        assert!(
            full.starts_with("the cgroup2 root /sys/fs/cgroup holds the kernel's limit of 64")
                && full.contains("collector cleanup --apply --pin-dir DIR")
                && full.contains("bpftool cgroup show /sys/fs/cgroup")
                && full.ends_with(
                    "attaching sock_ops to the /sys/fs/cgroup: Argument list too long (os error 7)"
                ),
            "{full}"
        );
        let other = format!("{:#}", hint(libc::EPERM));
        assert_eq!(
            other,
            "attaching sock_ops to the /sys/fs/cgroup: Operation not permitted (os error 1)"
        );
    }

    #[test]
    fn a_tcx_link_refused_by_a_kernel_older_than_tcx_says_so() {
        let attaching = || {
            anyhow::Error::from(io::Error::from_raw_os_error(libc::EINVAL))
                .context("attaching classify to lo (Ingress)")
        };
        let old = format!("{:#}", old_kernel_hint_for(attaching(), "6.1.0-18-amd64"));
        assert!(
            old.starts_with("Linux 6.1.0-18-amd64 is older than 6.6 (TCX links)"),
            "{old}"
        );
        let new = format!("{:#}", old_kernel_hint_for(attaching(), "6.18.0"));
        assert!(new.starts_with("attaching classify"), "{new}");
    }
}
