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

use std::borrow::Cow;

use nftables::{
    batch::Batch,
    expr::{Expression, NamedExpression, Payload, PayloadField},
    helper,
    schema::{Chain, Counter, NfListObject, Rule, Table},
    stmt::{Counter as CounterRef, Match, Operator, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};

use crate::{config::Config, nfnetlink};

/// Chain names inside our table.
const IN_CHAIN: &str = "count_in";
const OUT_CHAIN: &str = "count_out";
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
        let mut batch = Batch::new();
        if nfnetlink::table_exists(&table.name)? {
            tracing::info!(table = %table.name, "replacing a leftover nftables table made for another config");
            batch.delete(NfListObject::Table(table.table()));
        }
        table.add_all(&mut batch);
        helper::apply_ruleset(&batch.to_nftables())?;
        Ok(table)
    }

    fn table(&self) -> Table<'static> {
        Table {
            family: NfFamily::INet,
            name: Cow::Owned(self.name.clone()),
            handle: None,
        }
    }

    fn add_all(&self, batch: &mut Batch<'static>) {
        batch.add(NfListObject::Table(self.table()));
        for (name, hook) in [
            (IN_CHAIN, NfHook::Prerouting),
            (OUT_CHAIN, NfHook::Postrouting),
        ] {
            batch.add(NfListObject::Chain(Chain {
                family: NfFamily::INet,
                table: Cow::Owned(self.name.clone()),
                name: Cow::Borrowed(name),
                _type: Some(NfChainType::Filter),
                hook: Some(hook),
                prio: Some(PRIORITY),
                policy: Some(NfChainPolicy::Accept),
                ..Chain::default()
            }));
        }
        for counter in &self.counters {
            batch.add(NfListObject::Counter(Counter {
                family: NfFamily::INet,
                table: Cow::Owned(self.name.clone()),
                name: Cow::Owned(counter.name.clone()),
                handle: None,
                packets: None,
                bytes: None,
            }));
            let field = if counter.inbound { "dport" } else { "sport" };
            batch.add(NfListObject::Rule(Rule {
                family: NfFamily::INet,
                table: Cow::Owned(self.name.clone()),
                chain: Cow::Borrowed(if counter.inbound { IN_CHAIN } else { OUT_CHAIN }),
                expr: Cow::Owned(vec![
                    Statement::Match(Match {
                        left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(
                            PayloadField {
                                protocol: Cow::Borrowed(counter.protocol.as_str()),
                                field: Cow::Borrowed(field),
                            },
                        ))),
                        right: Expression::Number(u32::from(counter.port)),
                        op: Operator::EQ,
                    }),
                    Statement::Counter(CounterRef::Named(Cow::Owned(counter.name.clone()))),
                ]),
                ..Rule::default()
            }));
        }
    }

    /// Reads every counter of our table (nfnetlink: no process spawned).
    pub fn read(&self) -> Result<Vec<CounterValue>, NftError> {
        let read = nfnetlink::read_counters(&self.name)?;
        Ok(self
            .counters
            .iter()
            .map(|counter| {
                let value = read.iter().find(|r| r.name == counter.name);
                CounterValue {
                    counter: counter.clone(),
                    packets: value.map_or(0, |v| v.packets),
                    bytes: value.map_or(0, |v| v.bytes),
                }
            })
            .collect())
    }

    /// Removes the table: a clean stop leaves nothing of ours in nftables.
    pub fn remove(self) -> Result<(), NftError> {
        let mut batch = Batch::new();
        batch.delete(NfListObject::Table(self.table()));
        helper::apply_ruleset(&batch.to_nftables())?;
        Ok(())
    }
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
    fn the_ruleset_is_one_table_two_chains_and_a_rule_per_counter() {
        let config =
            Config::from_toml("t.toml", "[[routes]]\nname = \"web\"\nports = [80]\n").unwrap();
        let table = NftTable {
            name: "collector".into(),
            counters: plan(&config),
        };
        let mut batch = Batch::new();
        table.add_all(&mut batch);
        let json = serde_json::to_value(batch.to_nftables()).unwrap();
        let objects = json["nftables"].as_array().unwrap();
        // Table, two chains, then (counter, rule) for tcp 80 in/out and udp 53 in/out.
        assert_eq!(objects.len(), 3 + 2 * 4);
        let rule = &objects[4]["add"]["rule"];
        assert_eq!(rule["chain"], "count_in");
        assert_eq!(
            rule["expr"][0]["match"]["left"]["payload"]["field"],
            "dport"
        );
        assert_eq!(rule["expr"][0]["match"]["right"], 80);
        assert_eq!(rule["expr"][1]["counter"], "tcp_80_in");
    }
}
