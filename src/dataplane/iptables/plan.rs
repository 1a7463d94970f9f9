//! Desired state to one iptables-restore input per sync, and what the planner remembers between
//! syncs. Pure: what the kernel holds comes in as a [`KernelState`] value.
//!
//! A sync is planned in two steps. [`Planner::plan`] decides what the sync writes and updates
//! what the planner remembers; [`Planner::restore_input`] then produces the input as a stream of
//! whole lines, rendered as the consumer (iptables-restore's stdin) takes them. A full sync
//! renders every Service twice, once to learn its chains (every chain is declared before any
//! rule, see [`RestoreInput`]) and once while writing, so the hundreds of thousands of rules of
//! a large cluster are never held at once.
//!
//! The planner keeps, per Service, only its lines of the shared dispatch chains (a partial sync
//! may have to rewrite those for another Service's sake) and the name and a hash of each of its
//! own chains: enough to write only the chains that changed and to delete the ones that went.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::{Hash, Hasher};

use super::names::{self, quote};
use super::render::{render_fixed, render_nodeport_jump, render_port, PortRules, RenderConfig};
use crate::model::{ChangeSet, DesiredState, NodeInfo, ServiceKey, ServiceState};

/// What the kernel holds of kproxy's, read before a full sync is written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Chains with kproxy's prefix in the nat table (the caller may leave out the ones
    /// [`Planner::wanted_nat_chains`] holds: only strays matter).
    pub nat_chains: BTreeSet<String>,
    /// Which of [`names::JUMPS`] (by index) are already in their built-in chains.
    pub jumps: BTreeSet<usize>,
}

/// What one planned sync writes, in numbers (the text comes from [`Planner::restore_input`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// A full sync: every chain is written and the kernel is read first ([`Planner::adopt_kernel`]).
    pub full: bool,
    /// Nothing to write: iptables-restore need not run.
    pub empty: bool,
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

/// A chain name stored in place: every name kproxy generates fits iptables' limit, and a
/// large cluster has a hundred thousand of them (one allocation each would be most of the
/// planner's memory).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct ChainName {
    bytes: [u8; names::MAX_CHAIN_LEN],
    len: u8,
}

impl ChainName {
    fn new(name: &str) -> ChainName {
        debug_assert!(name.len() <= names::MAX_CHAIN_LEN, "{name}");
        let len = name.len().min(names::MAX_CHAIN_LEN);
        let mut bytes = [0; names::MAX_CHAIN_LEN];
        bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        ChainName { bytes, len: len as u8 }
    }

    fn as_str(&self) -> &str {
        // Built from a &str cut at a length every (ASCII) chain name fits in.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::fmt::Debug for ChainName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One of a Service's own nat chains as last written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChainDigest {
    name: ChainName,
    /// Hash of the chain's rules: an unchanged chain is not rewritten by a partial sync.
    hash: u64,
}

/// What the planner remembers of one Service.
#[derive(Debug, Clone, Default)]
struct Committed {
    /// Its lines of nat KPROXY-SERVICES, nat KPROXY-NODEPORTS and the filter table's chains,
    /// each joined by newlines (one allocation per kind, not per line). Kept as text because
    /// a partial sync that changes a dispatch chain rewrites it whole, with every Service's
    /// lines, and rendering every Service again for that would cost what a full sync's
    /// rendering does.
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
                    name: ChainName::new(&c.name),
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

/// The chains a partial plan writes for one Service.
#[derive(Debug)]
struct ChangedChains {
    service: ServiceKey,
    /// Declared (created or flushed), written or not.
    names: Vec<ChainName>,
    /// Their `-A` lines, each newline-terminated.
    rules: String,
}

/// What the last plan writes, beyond what [`Committed`] holds.
#[derive(Debug, Default)]
struct Pending {
    full: bool,
    /// A partial plan's changed chains; a full plan renders every Service again instead.
    changed: Vec<ChangedChains>,
    /// nat chains to flush and delete.
    delete: Vec<String>,
    /// Which of [`names::JUMPS`] to insert.
    jumps: Vec<usize>,
    /// The fixed chains to write, by (table, chain).
    fixed: Vec<(&'static str, &'static str)>,
    fixed_filter: Vec<String>,
    fixed_nat: Vec<String>,
    nodeport_jump: Vec<String>,
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
    pending: Pending,
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
    /// every chain and puts in the jumps from the built-in chains; [`Planner::adopt_kernel`]
    /// then narrows the jumps to the missing ones and adds kproxy's stray chains to delete.
    /// A partial sync writes the changed Services' chains that differ from what was written,
    /// deletes the chains they no longer have, and rewrites a dispatch chain only if its rules
    /// changed.
    pub fn plan(&mut self, desired: &DesiredState, changes: &ChangeSet, cfg: &RenderConfig) -> Plan {
        let full = self.plans_full(changes, cfg);
        let previous_config = self.config.replace(cfg.clone());
        let mut pending = Pending {
            full,
            ..Pending::default()
        };
        let mut nat_written = 0;
        if full {
            let mut services = BTreeMap::new();
            for (key, state) in &desired.services {
                let committed = Committed::of(&render_service(state, &desired.node, cfg));
                nat_written += committed.chain_rules;
                services.insert(key.clone(), committed);
            }
            let previous = std::mem::replace(&mut self.services, services);
            self.undo = Some(Undo {
                services: Replaced::All(previous),
                config: previous_config,
            });
            pending.jumps = (0..names::JUMPS.len()).collect();
        } else {
            let mut undo = Vec::new();
            for key in &changes.services {
                let old = self.services.remove(key);
                let now = desired.services.get(key).map(|state| {
                    let ports = render_service(state, &desired.node, cfg);
                    let old_hashes: BTreeMap<&str, u64> = old
                        .iter()
                        .flat_map(|o| o.chains.iter())
                        .map(|c| (c.name.as_str(), c.hash))
                        .collect();
                    let mut changed = ChangedChains {
                        service: key.clone(),
                        names: Vec::new(),
                        rules: String::new(),
                    };
                    for chain in ports.iter().flat_map(|p| &p.nat_chains) {
                        if old_hashes.get(chain.name.as_str()) != Some(&hash_of(&chain.rules)) {
                            changed.names.push(ChainName::new(&chain.name));
                            if chain.len > 0 {
                                changed.rules.push_str(&chain.rules);
                                changed.rules.push('\n');
                                nat_written += chain.len;
                            }
                        }
                    }
                    if !changed.names.is_empty() {
                        pending.changed.push(changed);
                    }
                    Committed::of(&ports)
                });
                if let Some(old) = &old {
                    let kept: HashSet<&str> = now
                        .iter()
                        .flat_map(|n| n.chains.iter())
                        .map(|c| c.name.as_str())
                        .collect();
                    pending.delete.extend(
                        old.chains
                            .iter()
                            .filter(|c| !kept.contains(c.name.as_str()))
                            .map(|c| c.name.as_str().to_string()),
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

        let mut plan = Plan {
            full,
            ..Plan::default()
        };
        let (fixed_filter, fixed_nat) = render_fixed(cfg);
        let nodeport_jump = render_nodeport_jump(cfg);
        let mut filter_written = 0;
        for (table, chain, lines) in fixed_chain_lines(&self.services, &fixed_filter, &fixed_nat, &nodeport_jump) {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            lines.hash(&mut hasher);
            let hash = hasher.finish();
            let unchanged = self.fixed.insert((table, chain), hash) == Some(hash);
            let (total, written) = match table {
                "filter" => (&mut plan.filter_rules, &mut filter_written),
                _ => (&mut plan.nat_rules, &mut nat_written),
            };
            *total += lines.len();
            if full || !unchanged {
                *written += lines.len();
                pending.fixed.push((table, chain));
            }
        }
        for s in self.services.values() {
            plan.nat_rules += s.chain_rules;
            plan.no_local_endpoints.0 += s.no_local.0;
            plan.no_local_endpoints.1 += s.no_local.1;
        }
        plan.rules_written = filter_written + nat_written;
        plan.written = (filter_written, nat_written);
        plan.empty = !full && pending.changed.is_empty() && pending.delete.is_empty() && pending.fixed.is_empty();
        pending.fixed_filter = fixed_filter;
        pending.fixed_nat = fixed_nat;
        pending.nodeport_jump = nodeport_jump;
        self.pending = pending;
        plan
    }

    /// Every nat chain the last plan leaves in place: what a full sync must not delete.
    pub fn wanted_nat_chains(&self) -> HashSet<&str> {
        self.services
            .values()
            .flat_map(|s| s.chains.iter().map(|c| c.name.as_str()))
            .chain(names::NAT_CHAINS.iter().copied())
            .chain(names::FILTER_CHAINS.iter().copied())
            .collect()
    }

    /// What the kernel holds, for the full sync just planned: only the jumps it lacks are put
    /// in, and kproxy's chains that nothing wants any more are deleted. Without this call a full
    /// plan assumes an empty kernel. No effect on a partial plan.
    pub fn adopt_kernel(&mut self, kernel: &KernelState) {
        if !self.pending.full {
            return;
        }
        self.pending.jumps.retain(|i| !kernel.jumps.contains(i));
        if kernel.nat_chains.is_empty() {
            self.pending.delete.clear();
            return;
        }
        let wanted = self.wanted_nat_chains();
        let delete = kernel
            .nat_chains
            .iter()
            .filter(|c| c.starts_with(names::PREFIX) && !wanted.contains(c.as_str()))
            .cloned()
            .collect();
        self.pending.delete = delete;
    }

    /// The input of the last plan, rendered line by line as it is read. `desired` must be the
    /// state that plan was made from.
    pub fn restore_input<'a>(&'a self, desired: &'a DesiredState) -> RestoreInput<'a> {
        let Some(cfg) = self.config.as_ref() else {
            return RestoreInput::new(Vec::new());
        };
        let p = &self.pending;
        let mut filter_chains = Vec::new();
        let mut nat_chains = Vec::new();
        for (table, chain, lines) in fixed_chain_lines(&self.services, &p.fixed_filter, &p.fixed_nat, &p.nodeport_jump)
        {
            if p.fixed.contains(&(table, chain)) {
                match table {
                    "filter" => filter_chains.push((chain, lines)),
                    _ => nat_chains.push((chain, lines)),
                }
            }
        }
        let jumps = |table: &'static str| -> Vec<Piece<'a>> {
            p.jumps
                .iter()
                .map(|&i| &names::JUMPS[i])
                .filter(|j| j.table == table)
                .map(|j| Piece::owned(None, render_jump(j)))
                .collect()
        };
        let mut parts: Vec<Pieces<'a>> = Vec::new();

        let filter_jumps = jumps("filter");
        if !filter_chains.is_empty() || !filter_jumps.is_empty() {
            let declared = filter_chains.iter().map(|(c, _)| *c);
            parts.push(table_head("filter", declared.collect()));
            parts.push(Box::new(
                filter_chains
                    .into_iter()
                    .flat_map(|(_, lines)| lines.into_iter().map(Piece::line)),
            ));
            parts.push(Box::new(filter_jumps.into_iter()));
            parts.push(Box::new(std::iter::once(Piece::borrowed(None, "COMMIT\n"))));
        }

        let nat_jumps = jumps("nat");
        if p.full || !p.changed.is_empty() || !nat_chains.is_empty() || !p.delete.is_empty() || !nat_jumps.is_empty() {
            let mut declared: Vec<&'a str> = if p.full {
                self.services
                    .values()
                    .flat_map(|s| s.chains.iter().map(|c| c.name.as_str()))
                    .collect()
            } else {
                p.changed
                    .iter()
                    .flat_map(|c| c.names.iter().map(ChainName::as_str))
                    .collect()
            };
            declared.extend(nat_chains.iter().map(|(c, _)| *c));
            declared.extend(p.delete.iter().map(String::as_str));
            parts.push(table_head("nat", declared));
            if p.full {
                let node = &desired.node;
                parts.push(Box::new(desired.services.iter().flat_map(move |(key, state)| {
                    render_service(state, node, cfg)
                        .into_iter()
                        .flat_map(|port| port.nat_chains)
                        .filter(|chain| chain.len > 0)
                        .map(move |chain| {
                            let mut rules = chain.rules;
                            rules.push('\n');
                            Piece::owned(Some(key), rules)
                        })
                })));
            } else {
                parts.push(Box::new(
                    p.changed
                        .iter()
                        .filter(|c| !c.rules.is_empty())
                        .map(|c| Piece::borrowed(Some(&c.service), &c.rules)),
                ));
            }
            parts.push(Box::new(
                nat_chains
                    .into_iter()
                    .flat_map(|(_, lines)| lines.into_iter().map(Piece::line)),
            ));
            parts.push(Box::new(nat_jumps.into_iter()));
            parts.push(Box::new(
                p.delete.iter().map(|c| Piece::owned(None, format!("-X {c}\n"))),
            ));
            parts.push(Box::new(std::iter::once(Piece::borrowed(None, "COMMIT\n"))));
        }
        RestoreInput::new(parts)
    }

    /// Forgets the last plan: it was not applied (iptables-restore refused it or never ran).
    /// The kernel commits each table on its own, so the filter table may hold the new rules
    /// while nat kept the old: every fixed chain is rewritten by the next plan.
    pub fn rollback(&mut self) {
        self.pending = Pending::default();
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

    /// Whether nat KPROXY-SERVICES holds rules as last committed (any Service's, or the jump to
    /// KPROXY-NODEPORTS that ends it): an empty one in the kernel then means someone flushed it.
    pub fn expects_nat_services_rules(&self) -> bool {
        self.config.as_ref().is_some_and(|cfg| {
            !render_nodeport_jump(cfg).is_empty() || self.services.values().any(|s| !s.nat_services.is_empty())
        })
    }

    /// The last plan was applied: drop what [`Planner::rollback`] would need.
    pub fn commit(&mut self) {
        self.undo = None;
        self.pending = Pending::default();
    }
}

/// Each fixed chain's lines, in the order they are written: kproxy's own rules and every
/// Service's lines of that chain.
fn fixed_chain_lines<'a>(
    services: &'a BTreeMap<ServiceKey, Committed>,
    fixed_filter: &'a [String],
    fixed_nat: &'a [String],
    nodeport_jump: &'a [String],
) -> Vec<(&'static str, &'static str, Vec<&'a str>)> {
    let chain_of = |rule: &str| rule.split(' ').nth(1).unwrap_or_default().to_string();
    let filter_lines: Vec<&str> = services.values().flat_map(|s| s.filter.lines()).collect();
    let mut chains: Vec<(&'static str, &'static str, Vec<&str>)> = names::FILTER_CHAINS
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
            names::SERVICES => services
                .values()
                .flat_map(|s| s.nat_services.lines())
                .chain(nodeport_jump.iter().map(String::as_str))
                .collect(),
            names::NODEPORTS => services.values().flat_map(|s| s.nat_nodeports.lines()).collect(),
            _ => fixed_nat
                .iter()
                .map(String::as_str)
                .filter(|r| chain_of(r) == chain)
                .collect(),
        };
        chains.push(("nat", chain, lines));
    }
    chains
}

/// `*table` and its chain declarations.
///
/// Every chain is declared before any rule, sorted by name, with kproxy's most referenced
/// chain (KPROXY-MARK-MASQ, the target of two rules per endpoint) last. This is for
/// iptables-restore's sake, and it matters at 100,000 chains: libiptc keeps a table's chains
/// in a sorted list and rebuilds an index over it every few hundred new chains, which is
/// cheap when each new chain lands at the end of the list and the list is in the order it
/// was allocated; and iptables remembers every declared chain name in a hash of 512 lists,
/// newest first, that it searches for each rule's jump target, so the chain declared last
/// is found first. Same rules, same tables: a third less CPU for iptables-restore at
/// 10,000 Services (BENCHMARKS.md). Declaring a chain under `--noflush` creates or flushes it.
fn table_head<'a>(table: &'static str, mut chains: Vec<&'a str>) -> Pieces<'a> {
    chains.sort_unstable_by_key(|c| (*c == names::MARK_MASQ, *c));
    chains.dedup();
    let head = std::iter::once(Piece::owned(None, format!("*{table}\n")));
    Box::new(
        head.chain(
            chains
                .into_iter()
                .map(|c| Piece::owned(None, format!(":{c} - [0:0]\n"))),
        ),
    )
}

/// `-I FROM 1 ...`: a jump first in its built-in chain, as `iptables -I` would put it.
fn render_jump(jump: &names::Jump) -> String {
    let args: Vec<String> = jump.args().iter().map(|a| quote(a)).collect();
    format!("-I {} 1 {}\n", jump.from, args.join(" "))
}

/// Every port of one Service.
fn render_service(state: &ServiceState, node: &NodeInfo, cfg: &RenderConfig) -> Vec<PortRules> {
    state.ports.iter().filter_map(|p| render_port(p, node, cfg)).collect()
}

/// Whole lines of a restore input, and the Service they were written for.
struct Piece<'a> {
    owner: Option<&'a ServiceKey>,
    /// One or more lines, each newline-terminated.
    text: Cow<'a, str>,
}

impl<'a> Piece<'a> {
    fn owned(owner: Option<&'a ServiceKey>, text: String) -> Self {
        Piece {
            owner,
            text: Cow::Owned(text),
        }
    }

    fn borrowed(owner: Option<&'a ServiceKey>, text: &'a str) -> Self {
        Piece {
            owner,
            text: Cow::Borrowed(text),
        }
    }

    /// A line without its newline.
    fn line(line: &'a str) -> Self {
        Piece::owned(None, format!("{line}\n"))
    }
}

type Pieces<'a> = Box<dyn Iterator<Item = Piece<'a>> + Send + 'a>;

/// One iptables-restore input, produced as it is read: a full sync's rules are rendered a
/// Service at a time while the tool consumes them, never held whole. Each table is one
/// `*table ... COMMIT` block, which the kernel takes whole or not at all.
pub struct RestoreInput<'a> {
    pieces: std::iter::Flatten<std::vec::IntoIter<Pieces<'a>>>,
}

impl<'a> RestoreInput<'a> {
    fn new(parts: Vec<Pieces<'a>>) -> Self {
        RestoreInput {
            pieces: parts.into_iter().flatten(),
        }
    }

    /// Appends whole lines to `buf` until it holds at least `limit` bytes or the input ends.
    /// False once the input has ended and nothing was appended.
    pub fn fill(&mut self, buf: &mut Vec<u8>, limit: usize) -> bool {
        let mut appended = false;
        while buf.len() < limit {
            let Some(piece) = self.pieces.next() else {
                break;
            };
            buf.extend_from_slice(piece.text.as_bytes());
            appended = true;
        }
        appended
    }

    /// The whole input (for `kproxy render`, debug logs and tests).
    pub fn into_string(self) -> String {
        self.pieces.map(|p| p.text).collect()
    }

    /// Line `n` (counted from 1, as iptables-restore names them) and the Service it was
    /// written for, if any: what an error about that line should quote.
    pub fn line(self, n: usize) -> Option<(String, Option<ServiceKey>)> {
        let mut seen = 0;
        for piece in self.pieces {
            let lines = piece.text.matches('\n').count();
            if seen + lines >= n {
                let line = piece.text.lines().nth(n.checked_sub(seen + 1)?)?;
                return Some((line.to_string(), piece.owner.cloned()));
            }
            seen += lines;
        }
        None
    }
}

/// One table's part of an iptables-restore input built whole: for `--cleanup`, which writes
/// only chain deletions.
#[derive(Debug, Default)]
pub struct TableText {
    /// Chains to flush and delete.
    pub delete: Vec<String>,
}

impl TableText {
    pub fn into_text(self, table: &str) -> String {
        if self.delete.is_empty() {
            return String::new();
        }
        let mut out = format!("*{table}\n");
        for chain in &self.delete {
            out.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for chain in &self.delete {
            out.push_str(&format!("-X {chain}\n"));
        }
        out.push_str("COMMIT\n");
        out
    }
}
