//! One `nft -f` transaction per sync, from the Services that changed. Pure.
//!
//! [`Planner`] remembers, per Service, what it last wrote: chain names with a hash of their
//! rules, affinity sets, and map elements. A partial sync renders only the changed Services and
//! writes the difference: changed chains are flushed and refilled, removed ones flushed and
//! deleted, map elements deleted and added one by one. A full sync declares and flushes every
//! chain and map and refills them, deleting whatever else the table holds, so the kernel never
//! sees a moment without rules.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use super::names;
use super::render::{
    render_fixed_declarations, render_fixed_rules, render_port, set_declaration, words, PortRules, Words,
};
use crate::dataplane::iptables::render::RenderConfig;
use crate::model::{ChangeSet, DesiredState, NodeInfo, ServiceKey, ServiceState};

/// The chains and sets the kernel's table holds, as `nft -t list table` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelObjects {
    pub chains: BTreeSet<String>,
    /// Sets and maps.
    pub sets: BTreeSet<String>,
}

impl KernelObjects {
    /// Adds the chains and sets of table `header` (`table ip kproxy`) found in an
    /// `nft -t list chains|sets …` listing, which may show other tables too.
    pub fn add_listing(&mut self, header: &str, listing: &str) {
        let open = format!("{header} {{");
        let mut inside = false;
        for line in listing.lines() {
            if !line.starts_with(char::is_whitespace) {
                inside = line == open;
                continue;
            }
            let Some(rest) = line.trim().strip_suffix(" {") else {
                continue;
            };
            if !inside {
                continue;
            }
            let Some((kind, name)) = rest.split_once(' ') else {
                continue;
            };
            let name = name.trim_matches('"').to_string();
            match kind {
                "chain" => {
                    self.chains.insert(name);
                }
                "set" | "map" => {
                    self.sets.insert(name);
                }
                _ => {}
            }
        }
    }
}

/// What one Service has in the kernel, as far as the next partial sync needs to know.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Written {
    /// Chain name to a hash of its rules.
    chains: BTreeMap<String, u64>,
    /// Affinity set name to its timeout.
    sets: BTreeMap<String, u32>,
    /// (map, key) to verdict.
    elements: BTreeMap<(&'static str, String), String>,
    /// Endpoint addresses in the hairpin set on this Service's behalf.
    hairpin: BTreeSet<IpAddr>,
    rules: usize,
    no_local: (usize, usize),
}

impl Written {
    fn of(ports: &[PortRules]) -> Written {
        let mut w = Written::default();
        for p in ports {
            for c in &p.chains {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                c.rules.hash(&mut hasher);
                w.chains.insert(c.name.clone(), hasher.finish());
                w.rules += c.rules.len();
            }
            for s in &p.sets {
                w.sets.insert(s.name.clone(), s.timeout);
            }
            for e in &p.elements {
                w.elements.insert((e.map, e.key.clone()), e.value.clone());
            }
            w.hairpin.extend(p.hairpin.iter().copied());
            w.no_local.0 += usize::from(p.no_local_internal);
            w.no_local.1 += usize::from(p.no_local_external);
        }
        w
    }
}

/// One sync's transaction and what it contains.
#[derive(Debug, Default)]
pub struct Plan {
    /// The input for `nft -f -`; empty when nothing changed.
    pub text: String,
    pub full: bool,
    /// Rules and map elements written by this transaction.
    pub rules_written: usize,
    /// Rules in the table after it (map elements not counted).
    pub rules_total: usize,
    pub no_local_endpoints: (usize, usize),
}

/// The transaction, by section: nft applies commands in order, and a chain can only be deleted
/// once nothing refers to it, a set once no rule uses it.
#[derive(Debug, Default)]
struct Tx {
    /// `add chain` / `flush chain` (and, on a full sync, the fixed declarations).
    declare: String,
    delete_elements: BTreeMap<&'static str, Vec<String>>,
    delete_chains: String,
    delete_sets: String,
    add_sets: String,
    rules: String,
    add_elements: BTreeMap<&'static str, Vec<String>>,
    rules_written: usize,
}

/// Elements per `add element`/`delete element` command: long enough to keep the text short,
/// short enough that an error message quoting the line stays readable.
const ELEMENTS_PER_LINE: usize = 256;

impl Tx {
    fn finish(self, t: &str) -> String {
        let mut out = self.declare;
        write_elements(&mut out, "delete", t, &self.delete_elements);
        out.push_str(&self.delete_chains);
        out.push_str(&self.delete_sets);
        out.push_str(&self.add_sets);
        out.push_str(&self.rules);
        write_elements(&mut out, "add", t, &self.add_elements);
        out
    }
}

fn write_elements(out: &mut String, verb: &str, t: &str, elements: &BTreeMap<&'static str, Vec<String>>) {
    for (map, elems) in elements {
        for chunk in elems.chunks(ELEMENTS_PER_LINE) {
            let _ = writeln!(out, "{verb} element {t} {map} {{ {} }}", chunk.join(", "));
        }
    }
}

/// Rendered state of every Service, kept between syncs so a partial sync renders only changes.
#[derive(Debug, Default)]
pub struct Planner {
    cache: BTreeMap<ServiceKey, Written>,
    /// Which Service wrote each map element. Two Services can claim the same address and port
    /// (an externalIP both list); a map holds one verdict per key, and adding a second would
    /// make nft refuse the whole transaction, so the first claim wins, as the first matching
    /// rule does in iptables mode.
    owners: BTreeMap<(&'static str, String), ServiceKey>,
    /// How many Services have each endpoint address in the hairpin set (several Services can
    /// select the same Pod); the element goes when the last one lets go.
    hairpin: BTreeMap<IpAddr, usize>,
    last_config: Option<RenderConfig>,
}

impl Planner {
    /// Drops from `written` the elements another Service already owns, and records the rest as `key`'s.
    fn claim(&mut self, key: &ServiceKey, written: &mut Written) {
        written.elements.retain(|element, _| match self.owners.get(element) {
            Some(owner) if owner != key => {
                tracing::warn!(
                    service = %key,
                    owner = %owner,
                    map = element.0,
                    element = %element.1,
                    "two Services claim the same address and port; the first one keeps it"
                );
                false
            }
            _ => {
                self.owners.insert(element.clone(), key.clone());
                true
            }
        });
    }

    /// Forgets `key`'s claims.
    fn release(&mut self, key: &ServiceKey, written: &Written) {
        for element in written.elements.keys() {
            if self.owners.get(element) == Some(key) {
                self.owners.remove(element);
            }
        }
    }
}

impl Planner {
    pub fn new() -> Self {
        Planner::default()
    }

    /// Plans one sync. `kernel` (listed before full syncs) names objects an earlier run or
    /// someone else left in the table, which a full sync deletes.
    pub fn plan(
        &mut self,
        desired: &DesiredState,
        changes: &ChangeSet,
        cfg: &RenderConfig,
        kernel: Option<&KernelObjects>,
    ) -> Plan {
        let w = words(cfg.family);
        let t = format!("{} {}", w.family, names::TABLE);
        let full = changes.full || self.last_config.as_ref() != Some(cfg);
        self.last_config = Some(cfg.clone());
        let mut tx = Tx::default();

        if full {
            let old = std::mem::take(&mut self.cache);
            self.owners.clear();
            self.hairpin.clear();
            render_fixed_declarations(cfg, &mut tx.declare);
            for (chain, rule) in render_fixed_rules(cfg) {
                let _ = writeln!(tx.rules, "add rule {t} {chain} {rule}");
                tx.rules_written += 1;
            }
            for (key, state) in &desired.services {
                let ports = render_service(state, &desired.node, cfg);
                let mut written = Written::of(&ports);
                self.claim(key, &mut written);
                write_service(&mut tx, &t, w, None, &written, &ports);
                for ip in &written.hairpin {
                    *self.hairpin.entry(*ip).or_default() += 1;
                }
                self.cache.insert(key.clone(), written);
            }
            let hairpin = tx.add_elements.entry(names::HAIRPIN).or_default();
            hairpin.extend(self.hairpin.keys().map(|ip| format!("{ip} . {ip}")));
            // Whatever the table holds that this sync did not write goes: chains and sets of
            // Services deleted while kproxy was not running, or added by hand.
            let mut wanted_chains: BTreeSet<&str> = names::fixed_chains().collect();
            wanted_chains.extend(self.cache.values().flat_map(|s| s.chains.keys().map(String::as_str)));
            let mut wanted_sets: BTreeSet<&str> = names::MAPS.iter().copied().collect();
            wanted_sets.extend(self.cache.values().flat_map(|s| s.sets.keys().map(String::as_str)));
            let known_chains = old.values().flat_map(|s| s.chains.keys());
            let known_sets = old.values().flat_map(|s| s.sets.keys());
            let stale_chains: BTreeSet<&String> = known_chains
                .chain(kernel.into_iter().flat_map(|k| k.chains.iter()))
                .filter(|c| !wanted_chains.contains(c.as_str()))
                .collect();
            for chain in stale_chains {
                let _ = writeln!(tx.declare, "flush chain {t} {chain}");
                let _ = writeln!(tx.delete_chains, "delete chain {t} {chain}");
            }
            let stale_sets: BTreeSet<&String> = known_sets
                .chain(kernel.into_iter().flat_map(|k| k.sets.iter()))
                .filter(|s| !wanted_sets.contains(s.as_str()))
                .collect();
            for set in stale_sets {
                let _ = writeln!(tx.delete_sets, "delete set {t} {set}");
            }
        } else {
            // Hairpin addresses whose count went from zero or to zero.
            let mut touched: BTreeMap<IpAddr, bool> = BTreeMap::new();
            for key in &changes.services {
                let old = self.cache.remove(key);
                if let Some(old) = &old {
                    self.release(key, old);
                }
                let (ports, written) = match desired.services.get(key) {
                    Some(state) => {
                        let ports = render_service(state, &desired.node, cfg);
                        let mut written = Written::of(&ports);
                        self.claim(key, &mut written);
                        (ports, written)
                    }
                    None => (Vec::new(), Written::default()),
                };
                write_service(&mut tx, &t, w, old.as_ref(), &written, &ports);
                for ip in old.iter().flat_map(|o| o.hairpin.iter()) {
                    touched.entry(*ip).or_insert_with(|| self.hairpin.contains_key(ip));
                    if let Some(n) = self.hairpin.get_mut(ip) {
                        *n -= 1;
                        if *n == 0 {
                            self.hairpin.remove(ip);
                        }
                    }
                }
                for ip in &written.hairpin {
                    touched.entry(*ip).or_insert_with(|| self.hairpin.contains_key(ip));
                    *self.hairpin.entry(*ip).or_default() += 1;
                }
                if desired.services.contains_key(key) {
                    self.cache.insert(key.clone(), written);
                }
            }
            for (ip, was) in touched {
                let element = format!("{ip} . {ip}");
                match (was, self.hairpin.contains_key(&ip)) {
                    (true, false) => tx.delete_elements.entry(names::HAIRPIN).or_default().push(element),
                    (false, true) => tx.add_elements.entry(names::HAIRPIN).or_default().push(element),
                    _ => {}
                }
            }
        }

        let mut plan = Plan {
            full,
            rules_total: render_fixed_rules(cfg).len(),
            ..Plan::default()
        };
        for s in self.cache.values() {
            plan.rules_total += s.rules;
            plan.no_local_endpoints.0 += s.no_local.0;
            plan.no_local_endpoints.1 += s.no_local.1;
        }
        let rules_written = tx.rules_written;
        plan.text = tx.finish(&t);
        // Elements, not element lines.
        plan.rules_written = rules_written
            + plan
                .text
                .lines()
                .filter(|l| l.starts_with("add element"))
                .map(|l| l.matches(" : ").count())
                .sum::<usize>();
        plan
    }
}

/// Adds to `tx` what turns `old` (what the kernel has for one Service; `None` on a full sync,
/// where everything is rewritten) into `new`.
fn write_service(tx: &mut Tx, t: &str, w: Words, old: Option<&Written>, new: &Written, ports: &[PortRules]) {
    let empty = Written::default();
    let full = old.is_none();
    let old = old.unwrap_or(&empty);

    // Sets whose timeout changed are recreated, so every chain using them must be flushed first.
    let sets_changed = new.sets.iter().any(|(s, t)| old.sets.get(s).is_some_and(|o| o != t));
    for (set, timeout) in &old.sets {
        if new.sets.get(set) != Some(timeout) {
            let _ = writeln!(tx.delete_sets, "delete set {t} {set}");
        }
    }
    for p in ports {
        for set in &p.sets {
            if full || old.sets.get(&set.name) != Some(&set.timeout) {
                let _ = writeln!(tx.add_sets, "{}", set_declaration(t, set, w));
            }
        }
        for chain in &p.chains {
            let existed = old.chains.get(&chain.name);
            if !full && !sets_changed && existed == new.chains.get(&chain.name) {
                continue;
            }
            let _ = writeln!(tx.declare, "add chain {t} {}", chain.name);
            if full || existed.is_some() {
                let _ = writeln!(tx.declare, "flush chain {t} {}", chain.name);
            }
            for rule in &chain.rules {
                let _ = writeln!(tx.rules, "add rule {t} {} {rule}", chain.name);
            }
            tx.rules_written += chain.rules.len();
        }
    }
    for chain in old.chains.keys().filter(|c| !new.chains.contains_key(*c)) {
        let _ = writeln!(tx.declare, "flush chain {t} {chain}");
        let _ = writeln!(tx.delete_chains, "delete chain {t} {chain}");
    }
    for ((map, key), value) in &old.elements {
        if new.elements.get(&(map, key.clone())) != Some(value) {
            tx.delete_elements.entry(map).or_default().push(key.clone());
        }
    }
    for ((map, key), value) in &new.elements {
        if full || old.elements.get(&(map, key.clone())) != Some(value) {
            tx.add_elements.entry(map).or_default().push(format!("{key} : {value}"));
        }
    }
}

/// Every port of one Service.
fn render_service(state: &ServiceState, node: &NodeInfo, cfg: &RenderConfig) -> Vec<PortRules> {
    state.ports.iter().filter_map(|p| render_port(p, node, cfg)).collect()
}
