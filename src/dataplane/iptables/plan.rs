//! Desired state to one iptables-restore input per sync, and what the planner remembers between
//! syncs. Pure: what the kernel holds comes in as a [`KernelState`] value.
//!
//! The planner keeps, per Service, only its lines of the shared dispatch chains (a partial sync
//! may have to rewrite those for another Service's sake) and the name and a hash of each of its
//! own chains: enough to write only the chains that changed and to delete the ones that went,
//! without keeping the hundreds of thousands of rendered rules of a large cluster.
//!
//! The order of the input is chosen for iptables-restore's sake (see [`TableText::write`]): it
//! does not change the tables that result, only how long the tool takes to build them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};

use super::names::{self, quote};
use super::render::{render_fixed, render_nodeport_jump, render_port, PortRules, RenderConfig};
use crate::model::{ChangeSet, DesiredState, NodeInfo, ServiceKey, ServiceState};

/// What the kernel holds of kproxy's, read before a full sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Chains with kproxy's prefix in the nat table.
    pub nat_chains: BTreeSet<String>,
    /// Which of [`names::JUMPS`] (by index) are already in their built-in chains.
    pub jumps: BTreeSet<usize>,
}

/// One restore input and what it contains.
#[derive(Debug, Default)]
pub struct Plan {
    /// The exact text for `iptables-restore --noflush`.
    pub restore: String,
    /// Rules written by this input.
    pub rules_written: usize,
    /// Rules written per table, filter and nat (kubeproxy_sync_proxy_rules_iptables_last).
    pub written: (usize, usize),
    /// Rules kproxy owns in each table once the input is applied.
    pub filter_rules: usize,
    pub nat_rules: usize,
    /// Service ports without local endpoints for a Local policy (internal, external).
    pub no_local_endpoints: (usize, usize),
}

/// One of a Service's own nat chains as last written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChainDigest {
    name: Box<str>,
    /// Hash of the chain's rules: an unchanged chain is not rewritten by a partial sync.
    hash: u64,
}

/// What the planner remembers of one Service.
#[derive(Debug, Clone, Default)]
struct Committed {
    /// Its lines of nat KPROXY-SERVICES, nat KPROXY-NODEPORTS and the filter table's chains,
    /// each joined by newlines (one allocation per kind, not per line).
    nat_services: Box<str>,
    nat_nodeports: Box<str>,
    filter: Box<str>,
    chains: Box<[ChainDigest]>,
    /// Rules in its own chains.
    chain_rules: usize,
    no_local: (usize, usize),
}

impl Committed {
    fn of(ports: &[PortRules]) -> Committed {
        let join = |pick: fn(&PortRules) -> &Vec<String>| -> Box<str> {
            ports
                .iter()
                .flat_map(|p| pick(p).iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join("\n")
                .into()
        };
        Committed {
            nat_services: join(|p| &p.nat_services),
            nat_nodeports: join(|p| &p.nat_nodeports),
            filter: join(|p| &p.filter),
            chains: ports
                .iter()
                .flat_map(|p| &p.nat_chains)
                .map(|c| ChainDigest {
                    name: c.name.as_str().into(),
                    hash: hash_of(&c.rules),
                })
                .collect(),
            chain_rules: ports.iter().flat_map(|p| &p.nat_chains).map(|c| c.len).sum(),
            no_local: ports.iter().fold((0, 0), |(i, e), p| {
                (
                    i + usize::from(p.no_local_internal),
                    e + usize::from(p.no_local_external),
                )
            }),
        }
    }
}

fn hash_of(text: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// The planner's state before the last plan, to go back to if that plan was not applied.
#[derive(Debug)]
struct Undo {
    services: Replaced,
    config: Option<RenderConfig>,
}

/// What a plan replaced in the planner's map of Services.
#[derive(Debug)]
enum Replaced {
    /// A full plan: the whole previous map.
    All(BTreeMap<ServiceKey, Committed>),
    /// A partial plan: the previous entry of each Service it replanned (`None`: it had none).
    Some(Vec<(ServiceKey, Option<Committed>)>),
}

/// Plans each sync against what the previous ones wrote. After [`Planner::plan`] the planner
/// assumes the plan was applied; [`Planner::rollback`] says it was not.
#[derive(Debug, Default)]
pub struct Planner {
    services: BTreeMap<ServiceKey, Committed>,
    config: Option<RenderConfig>,
    /// Hash of each fixed chain's rules as last written, by (table, chain).
    fixed: BTreeMap<(&'static str, &'static str), u64>,
    undo: Option<Undo>,
}

impl Planner {
    pub fn new() -> Self {
        Planner::default()
    }

    /// Whether [`Planner::plan`] will plan a full sync: asked for, or the configuration changed.
    pub fn plans_full(&self, changes: &ChangeSet, cfg: &RenderConfig) -> bool {
        changes.full || self.config.as_ref() != Some(cfg)
    }

    /// Plans one sync. A full sync (asked for, or forced by a configuration change) writes
    /// every chain, puts in the jumps from the built-in chains that `kernel` lacks, and
    /// deletes kproxy's chains `kernel` has that nothing wants; `None` is an empty kernel.
    /// A partial sync writes the changed Services' chains that differ from what was written,
    /// deletes the chains they no longer have, and rewrites a dispatch chain only if its rules
    /// changed.
    pub fn plan(
        &mut self,
        desired: &DesiredState,
        changes: &ChangeSet,
        cfg: &RenderConfig,
        kernel: Option<&KernelState>,
    ) -> Plan {
        let full = self.plans_full(changes, cfg);
        let mut nat = TableText::default();
        let mut filter = TableText::default();

        let previous_config = self.config.replace(cfg.clone());
        if full {
            let mut services = BTreeMap::new();
            for (key, state) in &desired.services {
                let ports = render_service(state, &desired.node, cfg);
                for chain in ports.iter().flat_map(|p| &p.nat_chains) {
                    nat.declare.push(chain.name.as_str().into());
                    nat.push_rules(&chain.rules, chain.len);
                }
                services.insert(key.clone(), Committed::of(&ports));
            }
            let previous = std::mem::replace(&mut self.services, services);
            self.undo = Some(Undo {
                services: Replaced::All(previous),
                config: previous_config,
            });
            let empty = KernelState::default();
            let kernel = kernel.unwrap_or(&empty);
            let wanted: BTreeSet<&str> = nat
                .declare
                .iter()
                .map(|c| &**c)
                .chain(names::NAT_CHAINS.iter().copied())
                .chain(names::FILTER_CHAINS.iter().copied())
                .collect();
            nat.delete = kernel
                .nat_chains
                .iter()
                .filter(|c| c.starts_with(names::PREFIX) && !wanted.contains(c.as_str()))
                .cloned()
                .collect();
            for (i, jump) in names::JUMPS.iter().enumerate() {
                if !kernel.jumps.contains(&i) {
                    let text = if jump.table == "nat" { &mut nat } else { &mut filter };
                    text.jumps.push(render_jump(jump));
                }
            }
        } else {
            let mut undo = Vec::new();
            for key in &changes.services {
                let old = self.services.remove(key);
                let now = desired.services.get(key).map(|state| {
                    let ports = render_service(state, &desired.node, cfg);
                    let old_hashes: BTreeMap<&str, u64> = old
                        .iter()
                        .flat_map(|o| o.chains.iter())
                        .map(|c| (&*c.name, c.hash))
                        .collect();
                    for chain in ports.iter().flat_map(|p| &p.nat_chains) {
                        if old_hashes.get(chain.name.as_str()) != Some(&hash_of(&chain.rules)) {
                            nat.declare.push(chain.name.as_str().into());
                            nat.push_rules(&chain.rules, chain.len);
                        }
                    }
                    Committed::of(&ports)
                });
                if let Some(old) = &old {
                    let kept: BTreeSet<&str> = now.iter().flat_map(|n| n.chains.iter()).map(|c| &*c.name).collect();
                    nat.delete.extend(
                        old.chains
                            .iter()
                            .filter(|c| !kept.contains(&*c.name))
                            .map(|c| c.name.to_string()),
                    );
                }
                if let Some(now) = now {
                    self.services.insert(key.clone(), now);
                }
                undo.push((key.clone(), old));
            }
            self.undo = Some(Undo {
                services: Replaced::Some(undo),
                config: previous_config,
            });
        }

        let mut plan = Plan::default();
        let (fixed_filter, fixed_nat) = render_fixed(cfg);
        let jump = render_nodeport_jump(cfg);
        let filter_lines: Vec<&str> = self.services.values().flat_map(|s| s.filter.lines()).collect();
        let chain_of = |rule: &str| rule.split(' ').nth(1).unwrap_or_default().to_string();
        let mut fixed_chains: Vec<(&'static str, &'static str, Vec<&str>)> = names::FILTER_CHAINS
            .iter()
            .map(|&chain| {
                let lines = fixed_filter
                    .iter()
                    .map(String::as_str)
                    .chain(filter_lines.iter().copied())
                    .filter(|r| chain_of(r) == chain)
                    .collect();
                ("filter", chain, lines)
            })
            .collect();
        for &chain in names::NAT_CHAINS {
            let lines: Vec<&str> = match chain {
                names::SERVICES => self
                    .services
                    .values()
                    .flat_map(|s| s.nat_services.lines())
                    .chain(jump.iter().map(String::as_str))
                    .collect(),
                names::NODEPORTS => self.services.values().flat_map(|s| s.nat_nodeports.lines()).collect(),
                _ => fixed_nat
                    .iter()
                    .map(String::as_str)
                    .filter(|r| chain_of(r) == chain)
                    .collect(),
            };
            fixed_chains.push(("nat", chain, lines));
        }
        for (table, chain, lines) in &fixed_chains {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            lines.hash(&mut hasher);
            let hash = hasher.finish();
            let unchanged = self.fixed.insert((table, chain), hash) == Some(hash);
            match *table {
                "filter" => plan.filter_rules += lines.len(),
                _ => plan.nat_rules += lines.len(),
            }
            if full || !unchanged {
                let text = if *table == "nat" { &mut nat } else { &mut filter };
                text.declare.push((*chain).into());
                for line in lines {
                    text.push_rules(line, 1);
                }
            }
        }
        for s in self.services.values() {
            plan.nat_rules += s.chain_rules;
            plan.no_local_endpoints.0 += s.no_local.0;
            plan.no_local_endpoints.1 += s.no_local.1;
        }
        plan.rules_written = filter.rules + nat.rules;
        plan.written = (filter.rules, nat.rules);
        // The nat text is most of a large input: build it in place of its rules, then put the
        // (small) filter text in front, rather than hold two copies.
        let filter = filter.into_text("filter");
        plan.restore = nat.into_text("nat");
        plan.restore.insert_str(0, &filter);
        plan
    }

    /// Forgets the last plan: it was not applied (iptables-restore refused it or never ran).
    /// The kernel commits each table on its own, so the filter table may hold the new rules
    /// while nat kept the old: every fixed chain is rewritten by the next plan.
    pub fn rollback(&mut self) {
        let Some(undo) = self.undo.take() else {
            return;
        };
        match undo.services {
            Replaced::All(previous) => self.services = previous,
            Replaced::Some(entries) => {
                for (key, old) in entries.into_iter().rev() {
                    match old {
                        Some(old) => self.services.insert(key, old),
                        None => self.services.remove(&key),
                    };
                }
            }
        }
        self.config = undo.config;
        self.fixed.clear();
    }

    /// The last plan was applied: drop what [`Planner::rollback`] would need.
    pub fn commit(&mut self) {
        self.undo = None;
    }
}

/// `-I FROM 1 ...`: a jump first in its built-in chain, as `iptables -I` would put it.
fn render_jump(jump: &names::Jump) -> String {
    let args: Vec<String> = jump.args().iter().map(|a| quote(a)).collect();
    format!("-I {} 1 {}", jump.from, args.join(" "))
}

/// Every port of one Service.
fn render_service(state: &ServiceState, node: &NodeInfo, cfg: &RenderConfig) -> Vec<PortRules> {
    state.ports.iter().filter_map(|p| render_port(p, node, cfg)).collect()
}

/// One table's part of an iptables-restore input.
#[derive(Debug, Default)]
pub struct TableText {
    /// Chains to create or flush (declaring a chain under `--noflush` flushes it).
    pub declare: Vec<Box<str>>,
    /// `-A` lines, newline-terminated, for the declared chains.
    pub body: String,
    pub rules: usize,
    /// `-I` lines for the built-in chains' jumps.
    pub jumps: Vec<String>,
    /// Chains to flush and delete.
    pub delete: Vec<String>,
}

impl TableText {
    fn push_rules(&mut self, lines: &str, count: usize) {
        if count > 0 {
            self.body.push_str(lines);
            self.body.push('\n');
            self.rules += count;
        }
    }

    /// `*table ... COMMIT`, written over the rules' own buffer; empty if there is nothing to do.
    ///
    /// Every chain is declared before any rule, sorted by name, with kproxy's most referenced
    /// chain (KPROXY-MARK-MASQ, the target of two rules per endpoint) last. This is for
    /// iptables-restore's sake, and it matters at 100,000 chains: libiptc keeps a table's chains
    /// in a sorted list and rebuilds an index over it every few hundred new chains, which is
    /// cheap when each new chain lands at the end of the list and the list is in the order it
    /// was allocated; and iptables remembers every declared chain name in a hash of 512 lists,
    /// newest first, that it searches for each rule's jump target, so the chain declared last
    /// is found first. Same rules, same tables: a third less CPU for iptables-restore at
    /// 10,000 Services (BENCHMARKS.md).
    pub fn into_text(self, table: &str) -> String {
        if self.declare.is_empty() && self.body.is_empty() && self.delete.is_empty() && self.jumps.is_empty() {
            return String::new();
        }
        let mut chains: Vec<&str> = self
            .declare
            .iter()
            .map(|c| &**c)
            .chain(self.delete.iter().map(String::as_str))
            .collect();
        chains.sort_unstable_by_key(|c| (*c == names::MARK_MASQ, *c));
        chains.dedup();
        let mut head = String::with_capacity(chains.len() * 40 + 16);
        let _ = writeln!(head, "*{table}");
        for chain in chains {
            let _ = writeln!(head, ":{chain} - [0:0]");
        }
        let mut out = self.body;
        out.reserve(head.len() + 64 * (self.jumps.len() + self.delete.len()) + 8);
        out.insert_str(0, &head);
        for jump in &self.jumps {
            out.push_str(jump);
            out.push('\n');
        }
        for chain in &self.delete {
            let _ = writeln!(out, "-X {chain}");
        }
        out.push_str("COMMIT\n");
        out
    }
}
