//! nftables: the agent's own table (default `inet collector`) with a named counter per watched
//! port and direction, next to the eBPF figures so that a gap between the two shows.
//!
//! - `in`: a prerouting chain (priority -300, before conntrack and NAT) counts packets whose
//!   destination port is a route's TCP port or a DNS UDP port; it also sees traffic that
//!   nftables forwards or NATs, which never reaches a local socket.
//! - `out`: a postrouting chain (priority -300) counts packets whose source port is one.
//!
//! The table is made and removed with the `nftables` crate (which drives `nft -j`); the
//! counters are read over nfnetlink ([`crate::nfnetlink`]), which costs tens of microseconds
//! where `nft -j list` costs milliseconds (see docs/DESIGN.md).
//!
//! A start finds a leftover table of a crashed run: if it holds exactly the counters this
//! config wants, it is adopted as it is, so its counts continue; otherwise it is replaced
//! (deleted and made again in one transaction): never two tables, never doubled rules.
//! The table's name is claimed first ([`crate::nft_claim`]): a second collector of this
//! namespace configured with the same name leaves the first one's table alone.

use std::borrow::Cow;

use nftables::{
    batch::Batch,
    helper,
    schema::{NfListObject, Table},
    types::NfFamily,
};
use serde_json::json;

use crate::{
    config::{Config, NftEnabled},
    nfnetlink,
    nft_claim::{self, Holder, TableClaim},
    poller,
    snapshot::SourceHealth,
};

/// Chain and map names inside our table.
const IN_CHAIN: &str = "count_in";
const OUT_CHAIN: &str = "count_out";
const IN_MAP: &str = "ports_in";
const OUT_MAP: &str = "ports_out";
/// Before conntrack (-200) and destination NAT (-100): ports as the packet arrived.
const PRIORITY: i32 = -300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// One named counter of our table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedCounter {
    /// `tcp_443_in`, `udp_53_out`: by port, so that any route name is safe.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// `true` for `in` (destination port), `false` for `out` (source port).
    pub inbound: bool,
    /// The route owning the port, or `dns`.
    pub service: String,
}

/// The counters a config wants: every route port (TCP) and DNS port (UDP), each way.
#[must_use]
pub fn plan(config: &Config) -> Vec<PlannedCounter> {
    let mut wanted: Vec<(Protocol, u16, String)> = config
        .routes
        .iter()
        .flat_map(|route| {
            route
                .ports
                .iter()
                .map(|&port| (Protocol::Tcp, port, route.name.clone()))
        })
        .collect();
    if config.dns.enabled {
        wanted.extend(
            config
                .dns
                .ports
                .iter()
                .map(|&port| (Protocol::Udp, port, "dns".to_owned())),
        );
    }
    wanted
        .into_iter()
        .flat_map(|(protocol, port, service)| {
            [true, false].map(|inbound| PlannedCounter {
                name: format!(
                    "{}_{port}_{}",
                    protocol.as_str(),
                    if inbound { "in" } else { "out" }
                ),
                protocol,
                port,
                inbound,
                service: service.clone(),
            })
        })
        .collect()
}

/// A counter's value as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterValue {
    pub counter: PlannedCounter,
    pub packets: u64,
    pub bytes: u64,
}

/// Why the nftables source is not available; the rest of the agent carries on.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error(
        "the nft tool failed ({0}); is it installed (apt install nftables) and does the kernel have nf_tables?"
    )]
    Tool(#[from] helper::NftablesError),
    #[error("reading nftables counters over nfnetlink: {0}")]
    Netlink(#[from] std::io::Error),
    #[error(
        "our table {0} lost its counters: someone removed it (nft flush ruleset, a firewall reload?); it is made again"
    )]
    Removed(String),
    #[error(
        "the nftables table inet {table} is another running collector's in this network namespace ({holder}): give this one a table of its own ([nftables] table = \"...\") or set [nftables] enabled = false; it is looked at again now and then"
    )]
    InUse { table: String, holder: Holder },
    #[error("claiming the nftables table's name: {0}")]
    Claim(std::io::Error),
}

/// Our table, made at start and removed at stop.
pub struct NftTable {
    name: String,
    counters: Vec<PlannedCounter>,
}

impl NftTable {
    /// Makes the table, or adopts a leftover one that holds exactly these counters.
    pub fn setup(config: &Config) -> Result<Self, NftError> {
        let table = Self {
            name: config.nftables.table.clone(),
            counters: plan(config),
        };
        let existing = nfnetlink::read_counters(&table.name)?;
        let mut existing_names: Vec<&str> = existing.iter().map(|c| c.name.as_str()).collect();
        existing_names.sort_unstable();
        let mut wanted_names: Vec<&str> = table.counters.iter().map(|c| c.name.as_str()).collect();
        wanted_names.sort_unstable();
        if !existing.is_empty() && existing_names == wanted_names {
            tracing::info!(table = %table.name, "adopting the nftables table a previous run left: its counters continue");
            return Ok(table);
        }
        let replace = nfnetlink::table_exists(&table.name)?;
        if replace {
            tracing::info!(table = %table.name, "replacing a leftover nftables table made for another config");
        }
        helper::apply_ruleset_raw(
            &table.ruleset(replace).to_string(),
            None::<&str>,
            std::iter::empty::<&str>(),
        )?;
        Ok(table)
    }

    fn table(&self) -> Table<'static> {
        Table {
            family: NfFamily::INet,
            name: Cow::Owned(self.name.clone()),
            handle: None,
        }
    }

    /// The table in nft's JSON, in one transaction (deleting a leftover first when
    /// `replace`). Each chain holds one rule that looks the packet's protocol and port up in
    /// a map to the counter: one hash lookup per packet however many ports are watched,
    /// where a rule per port cost a comparison per port. (The `nftables` crate's types cannot
    /// express a counter map, hence plain JSON.)
    fn ruleset(&self, replace: bool) -> serde_json::Value {
        let table = self.name.as_str();
        let mut commands = Vec::new();
        if replace {
            commands.push(json!({"delete": {"table": {"family": "inet", "name": table}}}));
        }
        commands.push(json!({"add": {"table": {"family": "inet", "name": table}}}));
        for counter in &self.counters {
            commands.push(json!({"add": {"counter": {
                "family": "inet", "table": table, "name": counter.name,
            }}}));
        }
        for (inbound, chain, hook, map, field) in [
            (true, IN_CHAIN, "prerouting", IN_MAP, "dport"),
            (false, OUT_CHAIN, "postrouting", OUT_MAP, "sport"),
        ] {
            let elements: Vec<serde_json::Value> = self
                .counters
                .iter()
                .filter(|counter| counter.inbound == inbound)
                .map(|counter| {
                    json!([{"concat": [counter.protocol.as_str(), counter.port]}, counter.name])
                })
                .collect();
            let mut map_object = json!({
                "family": "inet", "table": table, "name": map,
                "type": ["inet_proto", "inet_service"], "map": "counter",
            });
            if !elements.is_empty() {
                map_object["elem"] = serde_json::Value::Array(elements);
            }
            commands.push(json!({"add": {"map": map_object}}));
            commands.push(json!({"add": {"chain": {
                "family": "inet", "table": table, "name": chain, "type": "filter",
                "hook": hook, "prio": PRIORITY, "policy": "accept",
            }}}));
            commands.push(json!({"add": {"rule": {
                "family": "inet", "table": table, "chain": chain,
                "expr": [{"counter": {"map": {
                    "key": {"concat": [
                        {"meta": {"key": "l4proto"}},
                        {"payload": {"protocol": "th", "field": field}},
                    ]},
                    "data": format!("@{map}"),
                }}}],
            }}}));
        }
        json!({"nftables": commands})
    }

    /// Reads every counter of our table (nfnetlink: no process spawned). A counter missing
    /// means someone removed the table, or part of it, while we ran.
    pub fn read(&self) -> Result<Vec<CounterValue>, NftError> {
        let read = nfnetlink::read_counters(&self.name)?;
        self.counters
            .iter()
            .map(|counter| {
                let value = read
                    .iter()
                    .find(|r| r.name == counter.name)
                    .ok_or_else(|| NftError::Removed(self.name.clone()))?;
                Ok(CounterValue {
                    counter: counter.clone(),
                    packets: value.packets,
                    bytes: value.bytes,
                })
            })
            .collect()
    }

    /// Removes the table: a clean stop leaves nothing of ours in nftables. One that someone
    /// else removed already is no error.
    pub fn remove(self) -> Result<(), NftError> {
        if !nfnetlink::table_exists(&self.name)? {
            return Ok(());
        }
        let mut batch = Batch::new();
        batch.delete(NfListObject::Table(self.table()));
        helper::apply_ruleset(&batch.to_nftables())?;
        Ok(())
    }
}

/// Polls between two looks at what is missing: whether `auto` should count now, or whether
/// a table that could not be made can be now (each look may spawn `nft`).
const POLLS_BETWEEN_RETRIES: u32 = 30;

/// The nftables counters as a source of the poll: our table, or why there is none. A
/// missing `nft` tool or kernel support leaves this source down and everything else running;
/// a table someone removed is made again; `auto` looks again now and then, as a firewall or
/// kube-proxy may hook netfilter after the agent started.
pub struct Source {
    config: Config,
    /// Counting is wanted (on, or `auto` with netfilter hooked).
    enabled: bool,
    table: Option<NftTable>,
    /// The table's name, ours while this runs (taken before the table is made).
    claim: Option<TableClaim>,
    health: SourceHealth,
    polls_until_retry: u32,
}

impl Source {
    /// Starts counting if wanted. `after_crash`: this start took over a crashed run's pins,
    /// whose table, if counting is not wanted now, would otherwise stay and charge every
    /// packet for its chains.
    pub fn start(config: &Config, after_crash: bool) -> Self {
        let mut source = Self {
            config: config.clone(),
            enabled: false,
            table: None,
            claim: None,
            health: SourceHealth::default(),
            polls_until_retry: POLLS_BETWEEN_RETRIES,
        };
        source.enabled = match config.nftables.enabled {
            NftEnabled::On => true,
            NftEnabled::Off => false,
            NftEnabled::Auto => source.auto_wants_counting(true),
        };
        if source.enabled {
            source.make_table();
        } else if after_crash && source.claim_name().is_ok() {
            match remove_leftover(&config.nftables.table) {
                Ok(true) => tracing::info!(
                    "removed the nftables table inet {} a crashed run left: counting is off now",
                    config.nftables.table
                ),
                Ok(false) => {}
                Err(err) => tracing::warn!(
                    "removing the nftables table inet {} a crashed run left: {err}",
                    config.nftables.table
                ),
            }
        }
        source
    }

    /// `auto`: counting only rides on hooks that netfilter already has here.
    fn auto_wants_counting(&self, at_start: bool) -> bool {
        match netfilter_already_hooks(&self.config.nftables.table) {
            Ok(true) => {
                if !at_start {
                    tracing::info!(
                        "nftables counters on: netfilter now hooks prerouting and postrouting here ([nftables] enabled = \"auto\")"
                    );
                }
                true
            }
            Ok(false) => {
                if at_start {
                    tracing::info!(
                        "nftables counters off ([nftables] enabled = \"auto\"): nothing else hooks netfilter's prerouting and postrouting here, and a first hook slows every packet; set enabled = true to count anyway"
                    );
                }
                false
            }
            Err(err) => {
                if at_start {
                    tracing::info!("nftables counters off ([nftables] enabled = \"auto\"): {err}");
                }
                false
            }
        }
    }

    /// Claims the table's name unless this run holds it already.
    fn claim_name(&mut self) -> Result<(), NftError> {
        if self.claim.is_none() {
            let table = &self.config.nftables.table;
            self.claim = Some(nft_claim::claim(table).map_err(NftError::Claim)?.map_err(
                |holder| NftError::InUse {
                    table: table.clone(),
                    holder,
                },
            )?);
        }
        Ok(())
    }

    fn make_table(&mut self) {
        let began = std::time::Instant::now();
        let setup = self
            .claim_name()
            .and_then(|()| NftTable::setup(&self.config));
        self.health.record(&setup, began.elapsed());
        match setup {
            Ok(table) => self.table = Some(table),
            Err(err) => tracing::warn!("nftables counters are off for now: {err}"),
        }
    }

    /// This poll's counters and the source's health (none while counting is not wanted).
    pub fn read(&mut self) -> poller::NftView {
        if self.table.is_none() {
            self.retry_now_and_then();
        }
        let Some(table) = &self.table else {
            return poller::NftView {
                counters: Vec::new(),
                health: self.enabled.then(|| self.health.clone()),
            };
        };
        let began = std::time::Instant::now();
        let read = table.read();
        self.health.record(&read, began.elapsed());
        if let Err(err @ NftError::Removed(_)) = &read {
            tracing::warn!("{err}");
            self.table = None;
            self.polls_until_retry = 0;
        }
        poller::NftView {
            counters: read.unwrap_or_default(),
            health: Some(self.health.clone()),
        }
    }

    fn retry_now_and_then(&mut self) {
        if self.polls_until_retry > 0 {
            self.polls_until_retry -= 1;
            return;
        }
        self.polls_until_retry = POLLS_BETWEEN_RETRIES;
        if !self.enabled
            && self.config.nftables.enabled == NftEnabled::Auto
            && self.auto_wants_counting(false)
        {
            self.enabled = true;
        }
        if self.enabled {
            self.make_table();
        }
    }

    pub fn stop(self) -> anyhow::Result<()> {
        use anyhow::Context as _;
        match self.table {
            Some(table) => table.remove().context("removing our nftables table"),
            None => Ok(()),
        }
    }
}

/// Netfilter's hook numbers for the two points our chains use.
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_POST_ROUTING: u32 = 4;

/// Whether something other than our table already hooks netfilter at prerouting and at
/// postrouting in this namespace (nftables base chains of ip, ip6 or inet, or legacy
/// iptables tables). Then our chains ride on hooks every packet already passes; otherwise
/// they would be the first, and the first hook of a namespace costs every packet
/// (docs/DESIGN.md has the measurement).
pub fn netfilter_already_hooks(ours: &str) -> Result<bool, NftError> {
    let mut hooks = nfnetlink::ip_hooks_in_use(ours)?;
    hooks.extend(legacy_ip_hooks());
    Ok(hooks.contains(&NF_INET_PRE_ROUTING) && hooks.contains(&NF_INET_POST_ROUTING))
}

/// The prerouting and postrouting hooks of legacy iptables tables in this namespace.
fn legacy_ip_hooks() -> Vec<u32> {
    let mut hooks = Vec::new();
    for file in ["/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"] {
        // Absent without the ip_tables module: no legacy tables.
        let names = std::fs::read_to_string(file).unwrap_or_default();
        for table in names.lines() {
            hooks.extend_from_slice(match table.trim() {
                "nat" | "mangle" => &[NF_INET_PRE_ROUTING, NF_INET_POST_ROUTING][..],
                "raw" => &[NF_INET_PRE_ROUTING][..],
                _ => &[][..],
            });
        }
    }
    hooks
}

/// Removes a table of ours left by a crashed run (`collector cleanup --apply`).
pub fn remove_leftover(table: &str) -> Result<bool, NftError> {
    if !nfnetlink::table_exists(table)? {
        return Ok(false);
    }
    let mut batch = Batch::new();
    batch.delete(NfListObject::Table(Table {
        family: NfFamily::INet,
        name: Cow::Owned(table.to_owned()),
        handle: None,
    }));
    helper::apply_ruleset(&batch.to_nftables())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_and_dns_port_gets_a_counter_each_way() {
        let config = Config::from_toml(
            "test.toml",
            "[[routes]]\nname = \"web\"\nports = [80, 8080]\n\n[dns]\nports = [53]\n",
        )
        .unwrap();
        let names: Vec<String> = plan(&config).into_iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "tcp_80_in",
                "tcp_80_out",
                "tcp_8080_in",
                "tcp_8080_out",
                "udp_53_in",
                "udp_53_out"
            ]
        );
        let dns = &plan(&config)[4];
        assert_eq!(
            (dns.service.as_str(), dns.protocol, dns.inbound),
            ("dns", Protocol::Udp, true)
        );
    }

    #[test]
    fn the_ruleset_is_one_lookup_per_chain_into_a_map_of_counters() {
        let config =
            Config::from_toml("t.toml", "[[routes]]\nname = \"web\"\nports = [80]\n").unwrap();
        let table = NftTable {
            name: "collector".into(),
            counters: plan(&config),
        };
        let json = table.ruleset(false);
        let objects = json["nftables"].as_array().unwrap();
        // Table, four counters, then (map, chain, rule) per direction.
        assert_eq!(objects.len(), 1 + 4 + 2 * 3);
        let map = &objects[5]["add"]["map"];
        assert_eq!(map["name"], "ports_in");
        assert_eq!(
            map["elem"],
            json!([
                [{"concat": ["tcp", 80]}, "tcp_80_in"],
                [{"concat": ["udp", 53]}, "udp_53_in"]
            ])
        );
        let rule = &objects[7]["add"]["rule"];
        assert_eq!(rule["chain"], "count_in");
        assert_eq!(rule["expr"][0]["counter"]["map"]["data"], "@ports_in");
        assert_eq!(
            rule["expr"][0]["counter"]["map"]["key"]["concat"][1]["payload"]["field"],
            "dport"
        );
        assert_eq!(objects[10]["add"]["rule"]["chain"], "count_out");
        assert_eq!(
            table.ruleset(true)["nftables"][0]["delete"]["table"]["name"],
            "collector"
        );
    }
}
