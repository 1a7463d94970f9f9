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
pub struct ChainName {
    bytes: [u8; names::MAX_CHAIN_LEN],
    len: u8,
}

impl ChainName {
    pub fn new(name: &str) -> ChainName {
        debug_assert!(name.len() <= names::MAX_CHAIN_LEN, "{name}");
        let len = name.len().min(names::MAX_CHAIN_LEN);
        let mut bytes = [0; names::MAX_CHAIN_LEN];
        bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        ChainName { bytes, len: len as u8 }
    }

    fn unpack(packed: &[u8; 11]) -> ChainName {
        let mut bytes = [0; names::MAX_CHAIN_LEN];
        let len = names::unpack(packed, &mut bytes);
        ChainName { bytes, len: len as u8 }
    }

    pub fn as_str(&self) -> &str {
        // Built from a &str cut at a length every (ASCII) chain name fits in.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl PartialOrd for ChainName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ChainName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl std::fmt::Debug for ChainName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Service's own nat chains as last written, each its name and a hash of its rules (an
/// unchanged chain is not rewritten by a partial sync), in one allocation: a generated name as
/// [`names::pack`] packs it (a kind byte and 10 bytes), any other as [`RAW`], its length and
/// its bytes; then the hash's 8 bytes. 19 bytes a chain, where name and hash side by side
/// took 40, and a large cluster has a hundred thousand chains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ChainDigests(Box<[u8]>);

/// The kind byte of a name [`names::pack`] does not pack (none that kproxy generates).
const RAW: u8 = 0xff;

impl ChainDigests {
    fn of<'c>(chains: impl Iterator<Item = (&'c str, u64)>) -> ChainDigests {
        let mut out = Vec::new();
        for (name, hash) in chains {
            match names::pack(name) {
                Some(packed) => out.extend_from_slice(&packed),
                None => {
                    let name = ChainName::new(name);
                    out.push(RAW);
                    out.push(name.len);
                    out.extend_from_slice(name.as_str().as_bytes());
                }
            }
            out.extend_from_slice(&hash.to_le_bytes());
        }
        ChainDigests(out.into_boxed_slice())
    }

    fn iter(&self) -> impl Iterator<Item = (ChainName, u64)> + '_ {
        let mut rest: &[u8] = &self.0;
        std::iter::from_fn(move || {
            let (&kind, after) = rest.split_first()?;
            let (name, after) = if kind == RAW {
                let (&len, after) = after.split_first()?;
                let (text, after) = after.split_at_checked(usize::from(len))?;
                (ChainName::new(std::str::from_utf8(text).ok()?), after)
            } else {
                let (packed, _) = rest.split_first_chunk::<11>()?;
                (ChainName::unpack(packed), &rest[11..])
            };
            let (hash, after) = after.split_first_chunk::<8>()?;
            rest = after;
            Some((name, u64::from_le_bytes(*hash)))
        })
    }

    fn names(&self) -> impl Iterator<Item = ChainName> + '_ {
        self.iter().map(|(name, _)| name)
    }
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
    chains: ChainDigests,
    /// Rules in its own chains.
    chain_rules: u32,
    no_local: (u32, u32),
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
            chains: ChainDigests::of(
                ports
                    .iter()
                    .flat_map(|p| &p.nat_chains)
                    .map(|c| (c.name.as_str(), hash_of(&c.rules))),
            ),
            chain_rules: ports.iter().flat_map(|p| &p.nat_chains).map(|c| c.len as u32).sum(),
            no_local: ports.iter().fold((0, 0), |(i, e), p| {
                (i + u32::from(p.no_local_internal), e + u32::from(p.no_local_external))
            }),
        }
    }
}

/// Running sums over every Service the planner remembers, so that a partial sync's counts
/// cost what its Services do, not what the table does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    chain_rules: usize,
    nat_services: usize,
    nat_nodeports: usize,
    /// Service lines of each filter chain, by position in [`names::FILTER_CHAINS`].
    filter: [usize; names::FILTER_CHAINS.len()],
    no_local: (usize, usize),
}

impl Totals {
    fn add(&mut self, c: &Committed, sign: isize) {
        let apply = |total: &mut usize, n: usize| *total = total.wrapping_add_signed(sign * n as isize);
        apply(&mut self.chain_rules, c.chain_rules as usize);
        apply(&mut self.nat_services, c.nat_services.lines().count());
        apply(&mut self.nat_nodeports, c.nat_nodeports.lines().count());
        for line in c.filter.lines() {
            if let Some(i) = names::FILTER_CHAINS.iter().position(|f| *f == chain_of(line)) {
                apply(&mut self.filter[i], 1);
            }
        }
        apply(&mut self.no_local.0, c.no_local.0 as usize);
        apply(&mut self.no_local.1, c.no_local.1 as usize);
    }
}

/// The chain an `-A CHAIN ...` line appends to.
fn chain_of(rule: &str) -> &str {
    rule.split(' ').nth(1).unwrap_or_default()
}

/// Adds to `out` the fixed chains whose lines differ between a Service's old and new record.
fn changed_fixed_chains(
    old: Option<&Committed>,
    new: Option<&Committed>,
    out: &mut BTreeSet<(&'static str, &'static str)>,
) {
    if old.map_or("", |c| &*c.nat_services) != new.map_or("", |c| &*c.nat_services) {
        out.insert(("nat", names::SERVICES));
    }
    if old.map_or("", |c| &*c.nat_nodeports) != new.map_or("", |c| &*c.nat_nodeports) {
        out.insert(("nat", names::NODEPORTS));
    }
    let (before, after) = (old.map_or("", |c| &*c.filter), new.map_or("", |c| &*c.filter));
    if before != after {
        for &chain in names::FILTER_CHAINS {
            let lines_before = before.lines().filter(|l| chain_of(l) == chain);
            if !lines_before.eq(after.lines().filter(|l| chain_of(l) == chain)) {
                out.insert(("filter", chain));
            }
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
    totals: Totals,
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
    fixed: BTreeSet<(&'static str, &'static str)>,
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
    totals: Totals,
    /// The fixed chains may not hold what was last planned (a refused input may have been
    /// committed in one table and not the other): the next plan writes every one of them.
    fixed_stale: bool,
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
    /// deletes the chains they no longer have, and rewrites a dispatch chain only if the
    /// changed Services' lines of it changed: its cost follows the changed Services, and the
    /// size of the table only when a dispatch chain must be written whole.
    pub fn plan(&mut self, desired: &DesiredState, changes: &ChangeSet, cfg: &RenderConfig) -> Plan {
        let full = self.plans_full(changes, cfg);
        let previous_config = self.config.replace(cfg.clone());
        let mut pending = Pending {
            full,
            ..Pending::default()
        };
        let previous_totals = self.totals;
        let previous_stale = std::mem::take(&mut self.fixed_stale);
        let mut nat_written = 0;
        if full {
            let services = commit_all(desired, cfg);
            let mut totals = Totals::default();
            for committed in services.values() {
                totals.add(committed, 1);
            }
            nat_written += totals.chain_rules;
            self.totals = totals;
            let previous = std::mem::replace(&mut self.services, services);
            self.undo = Some(Undo {
                services: Replaced::All(previous),
                config: previous_config,
                totals: previous_totals,
            });
            pending.jumps = (0..names::JUMPS.len()).collect();
        } else {
            let mut undo = Vec::new();
            for key in &changes.services {
                let old = self.services.remove(key);
                let now = desired.services.get(key).map(|state| {
                    let ports = render_service(state, &desired.node, cfg);
                    let old_hashes: BTreeMap<ChainName, u64> = old.iter().flat_map(|o| o.chains.iter()).collect();
                    let mut changed = ChangedChains {
                        service: key.clone(),
                        names: Vec::new(),
                        rules: String::new(),
                    };
                    for chain in ports.iter().flat_map(|p| &p.nat_chains) {
                        let name = ChainName::new(&chain.name);
                        if old_hashes.get(&name) != Some(&hash_of(&chain.rules)) {
                            changed.names.push(name);
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
                changed_fixed_chains(old.as_ref(), now.as_ref(), &mut pending.fixed);
                if let Some(old) = &old {
                    self.totals.add(old, -1);
                    let kept: HashSet<ChainName> = now.iter().flat_map(|n| n.chains.names()).collect();
                    pending.delete.extend(
                        old.chains
                            .names()
                            .filter(|c| !kept.contains(c))
                            .map(|c| c.as_str().to_string()),
                    );
                }
                if let Some(now) = now {
                    self.totals.add(&now, 1);
                    self.services.insert(key.clone(), now);
                }
                undo.push((key.clone(), old));
            }
            self.undo = Some(Undo {
                services: Replaced::Some(undo),
                config: previous_config,
                totals: previous_totals,
            });
        }

        let (fixed_filter, fixed_nat) = render_fixed(cfg);
        let nodeport_jump = render_nodeport_jump(cfg);
        if full || previous_stale {
            pending.fixed.extend(all_fixed_chains());
        }
        let t = &self.totals;
        let fixed_lines = |chain: &str, lines: &[String]| lines.iter().filter(|r| chain_of(r) == chain).count();
        let mut plan = Plan {
            full,
            ..Plan::default()
        };
        let mut filter_written = 0;
        for (table, chain) in all_fixed_chains() {
            let lines = match (table, chain) {
                ("filter", _) => {
                    let i = names::FILTER_CHAINS
                        .iter()
                        .position(|c| *c == chain)
                        .unwrap_or_default();
                    fixed_lines(chain, &fixed_filter) + t.filter[i]
                }
                (_, names::SERVICES) => t.nat_services + nodeport_jump.len(),
                (_, names::NODEPORTS) => t.nat_nodeports,
                _ => fixed_lines(chain, &fixed_nat),
            };
            let (total, written) = match table {
                "filter" => (&mut plan.filter_rules, &mut filter_written),
                _ => (&mut plan.nat_rules, &mut nat_written),
            };
            *total += lines;
            if pending.fixed.contains(&(table, chain)) {
                *written += lines;
            }
        }
        plan.nat_rules += t.chain_rules;
        plan.no_local_endpoints = t.no_local;
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
    pub fn wanted_nat_chains(&self) -> HashSet<ChainName> {
        self.services
            .values()
            .flat_map(|s| s.chains.names())
            .chain(names::NAT_CHAINS.iter().map(|c| ChainName::new(c)))
            .chain(names::FILTER_CHAINS.iter().map(|c| ChainName::new(c)))
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
            .filter(|c| c.starts_with(names::PREFIX) && !wanted.contains(&ChainName::new(c)))
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
        for (table, chain, lines) in fixed_chain_lines(&self.services, p) {
            match table {
                "filter" => filter_chains.push((chain, lines)),
                _ => nat_chains.push((chain, lines)),
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
            let declared = filter_chains.iter().map(|(c, _)| ChainName::new(c));
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
            let mut declared: Vec<ChainName> = if p.full {
                self.services.values().flat_map(|s| s.chains.names()).collect()
            } else {
                p.changed.iter().flat_map(|c| c.names.iter().copied()).collect()
            };
            declared.extend(nat_chains.iter().map(|(c, _)| ChainName::new(c)));
            declared.extend(p.delete.iter().map(|c| ChainName::new(c)));
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
        self.totals = undo.totals;
        self.fixed_stale = true;
    }

    /// Whether nat KPROXY-SERVICES holds rules as last committed (any Service's, or the jump to
    /// KPROXY-NODEPORTS that ends it): an empty one in the kernel then means someone flushed it.
    pub fn expects_nat_services_rules(&self) -> bool {
        self.config
            .as_ref()
            .is_some_and(|cfg| !render_nodeport_jump(cfg).is_empty() || self.totals.nat_services > 0)
    }

    /// The last plan was applied: drop what [`Planner::rollback`] would need.
    pub fn commit(&mut self) {
        self.undo = None;
        self.pending = Pending::default();
    }
}

/// Every Service rendered and recorded, for a full plan. iptables-restore cannot start before
/// every chain is known (each is declared before any rule), so this pass is the part of a full
/// sync that nothing overlaps: it is split over the machine's cores (at most four).
fn commit_all(desired: &DesiredState, cfg: &RenderConfig) -> BTreeMap<ServiceKey, Committed> {
    let node = &desired.node;
    let commit = |part: &[(&ServiceKey, &ServiceState)]| -> Vec<(ServiceKey, Committed)> {
        part.iter()
            .map(|(key, state)| ((*key).clone(), Committed::of(&render_service(state, node, cfg))))
            .collect()
    };
    let all: Vec<(&ServiceKey, &ServiceState)> = desired.services.iter().map(|(k, s)| (k, &**s)).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
    if threads < 2 || all.len() < 1000 {
        return commit(&all).into_iter().collect();
    }
    let parts: Vec<Vec<(ServiceKey, Committed)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = all
            .chunks(all.len().div_ceil(threads))
            .map(|part| scope.spawn(move || commit(part)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    });
    // In key order already: the map is built in bulk.
    parts.into_iter().flatten().collect()
}

/// Every fixed chain, by (table, chain), in the order they are written.
fn all_fixed_chains() -> impl Iterator<Item = (&'static str, &'static str)> {
    let filter = names::FILTER_CHAINS.iter().map(|&c| ("filter", c));
    filter.chain(names::NAT_CHAINS.iter().map(|&c| ("nat", c)))
}

/// The lines of each fixed chain `pending` writes, in the order they are written: kproxy's own
/// rules and every Service's lines of that chain. Only the chains written are walked.
fn fixed_chain_lines<'a>(
    services: &'a BTreeMap<ServiceKey, Committed>,
    pending: &'a Pending,
) -> Vec<(&'static str, &'static str, Vec<&'a str>)> {
    let fixed = |lines: &'a [String], chain: &'static str| {
        lines.iter().map(String::as_str).filter(move |r| chain_of(r) == chain)
    };
    all_fixed_chains()
        .filter(|key| pending.fixed.contains(key))
        .map(|(table, chain)| {
            let lines: Vec<&str> = match (table, chain) {
                ("filter", _) => fixed(&pending.fixed_filter, chain)
                    .chain(
                        services
                            .values()
                            .flat_map(|s| s.filter.lines())
                            .filter(|r| chain_of(r) == chain),
                    )
                    .collect(),
                (_, names::SERVICES) => services
                    .values()
                    .flat_map(|s| s.nat_services.lines())
                    .chain(pending.nodeport_jump.iter().map(String::as_str))
                    .collect(),
                (_, names::NODEPORTS) => services.values().flat_map(|s| s.nat_nodeports.lines()).collect(),
                _ => fixed(&pending.fixed_nat, chain).collect(),
            };
            (table, chain, lines)
        })
        .collect()
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
fn table_head<'a>(table: &'static str, mut chains: Vec<ChainName>) -> Pieces<'a> {
    chains.sort_unstable_by(|a, b| {
        (a.as_str() == names::MARK_MASQ, a.as_str()).cmp(&(b.as_str() == names::MARK_MASQ, b.as_str()))
    });
    chains.dedup();
    let head = std::iter::once(Piece::owned(None, format!("*{table}\n")));
    Box::new(
        head.chain(
            chains
                .into_iter()
                .map(|c| Piece::owned(None, format!(":{} - [0:0]\n", c.as_str()))),
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
