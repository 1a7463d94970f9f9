//! What IPVS mode last programmed, kept between syncs so that a partial sync is partial.
//!
//! A full sync reads the kernel (virtual services, real servers, addresses), repairs it, and
//! keeps what it programmed as a [`Committed`]. A partial sync reads nothing but the real
//! servers of the virtual services it touches (their connection counts decide graceful
//! termination): it plans the changed Services against the record, and writes only their
//! virtual services, real servers, addresses and nftables elements. Pure: the proxier does the
//! I/O in between [`Committed::plan_change`] and [`Committed::commit`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::netlink::{RealServerState, VsKey};
use super::plan::{plan_service, DesiredIpvs, DesiredVs, Draining, KernelState, PlanConfig, ServicePlan};
use super::rules::{vs_elements, Element, SetName};
use crate::model::{DesiredState, ServiceKey};

/// The kernel as kproxy last programmed it for one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The virtual services, real servers and bound addresses of the last successful sync.
    pub ipvs: DesiredIpvs,
    /// Endpoint addresses in the `hairpin` set, each with the number of its real servers.
    hairpin: AddressCounts,
    /// The settings of the last full sync (its NodePort addresses): a partial sync plans with
    /// them, and a change of the node's addresses comes with a full sync.
    pub cfg: PlanConfig,
    /// The index of the dummy interface at the last full sync.
    pub dummy: u32,
}

/// What a partial sync changes, planned against a [`Committed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The virtual services to compare: the changed Services' old and new ones, and those
    /// with real servers still draining.
    pub scope: BTreeSet<VsKey>,
    /// What is wanted for the virtual services in `scope` (absent: delete).
    pub want: DesiredIpvs,
    /// The new plan of each changed Service (empty for a deleted one).
    plans: Vec<(ServiceKey, ServicePlan)>,
}

/// The dummy-interface addresses and nftables elements a [`Change`] adds and removes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edits {
    pub bind: Vec<IpAddr>,
    pub unbind: Vec<IpAddr>,
    pub add_elements: Vec<(SetName, Element)>,
    pub delete_elements: Vec<(SetName, Element)>,
}

impl Edits {
    pub fn touches_rules(&self) -> bool {
        !self.add_elements.is_empty() || !self.delete_elements.is_empty()
    }
}

/// How many real servers each endpoint address has: the `hairpin` set's record, with 100,000
/// addresses at 10,000 Services, so each family's addresses are kept at their own width (a
/// B-tree entry of 8 bytes for IPv4, where an `IpAddr` key made it 21).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct AddressCounts {
    v4: BTreeMap<Ipv4Addr, u32>,
    v6: BTreeMap<Ipv6Addr, u32>,
}

impl AddressCounts {
    fn get(&self, ip: &IpAddr) -> u32 {
        match ip {
            IpAddr::V4(a) => self.v4.get(a).copied(),
            IpAddr::V6(a) => self.v6.get(a).copied(),
        }
        .unwrap_or(0)
    }

    /// Counts one more real server of `ip`.
    fn up(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => *self.v4.entry(a).or_default() += 1,
            IpAddr::V6(a) => *self.v6.entry(a).or_default() += 1,
        }
    }

    /// Counts one real server of `ip` less; an address without any goes.
    fn down(&mut self, ip: IpAddr) {
        fn down<K: Ord>(map: &mut BTreeMap<K, u32>, key: K) {
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
        match ip {
            IpAddr::V4(a) => down(&mut self.v4, a),
            IpAddr::V6(a) => down(&mut self.v6, a),
        }
    }

    /// The addresses counted, in `IpAddr` order.
    fn keys(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let v4 = self.v4.keys().map(|a| IpAddr::V4(*a));
        v4.chain(self.v6.keys().map(|a| IpAddr::V6(*a)))
    }
}

fn hairpin_of(ipvs: &DesiredIpvs) -> AddressCounts {
    let mut out = AddressCounts::default();
    for vs in ipvs.services.values() {
        for ip in vs.servers.ips() {
            out.up(ip);
        }
    }
    out
}

/// Addresses whose count goes from zero to more (`up`) or from more to zero (`down`).
fn crossings(count: impl Fn(&IpAddr) -> u32, delta: &BTreeMap<IpAddr, i64>) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for (ip, d) in delta {
        let before = i64::from(count(ip));
        match (before > 0, before + d > 0) {
            (false, true) => up.push(*ip),
            (true, false) => down.push(*ip),
            _ => {}
        }
    }
    (up, down)
}

impl Committed {
    /// The record of a full sync that programmed `ipvs` with `cfg`.
    pub fn new(ipvs: DesiredIpvs, cfg: PlanConfig, dummy: u32) -> Committed {
        Committed {
            hairpin: hairpin_of(&ipvs),
            ipvs,
            cfg,
            dummy,
        }
    }

    /// The endpoint addresses of every virtual service, each once, in order: the `hairpin` set.
    pub fn hairpin_ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.hairpin.keys()
    }

    /// Plans the Services in `changed` from `desired`: their new virtual services, and which
    /// ones to compare. Costs what the changed Services and the draining real servers cost,
    /// whatever the number of Services.
    pub fn plan_change(&self, desired: &DesiredState, changed: &BTreeSet<ServiceKey>, draining: &Draining) -> Change {
        let mut scope = draining.services();
        let mut want = DesiredIpvs::default();
        let mut plans = Vec::with_capacity(changed.len());
        for svc in changed {
            if let Some(owned) = self.ipvs.owners.get(svc) {
                scope.extend(owned.keys.iter().copied());
            }
            let mut plan = match desired.services.get(svc) {
                Some(state) => plan_service(svc, state, &desired.node, &self.cfg),
                None => ServicePlan::default(),
            };
            // A virtual service an unchanged Service holds stays that one's, as does one an
            // earlier changed Service took just now.
            plan.services.retain(|(key, _)| {
                let holder = self.ipvs.services.get(key).map(|vs| &vs.owner);
                let free = holder.is_none_or(|h| h == svc || changed.contains(h)) && !want.services.contains_key(key);
                if !free {
                    tracing::debug!(%key, service = %svc, "virtual service already taken by another Service port");
                }
                free
            });
            for (key, vs) in &plan.services {
                scope.insert(*key);
                want.services.insert(*key, vs.clone());
            }
            plans.push((svc.clone(), plan));
        }
        // Draining virtual services of unchanged Services are wanted as they are.
        for key in &scope {
            if want.services.contains_key(key) {
                continue;
            }
            if let Some(vs) = self.ipvs.services.get(key).filter(|vs| !changed.contains(&vs.owner)) {
                want.services.insert(*key, vs.clone());
            }
        }
        Change { scope, want, plans }
    }

    /// The kernel as this record says it is for `change`'s scope, with the real servers read
    /// back for those of its virtual services that exist (`dests`).
    pub fn kernel_view(&self, change: &Change, dests: BTreeMap<VsKey, Vec<RealServerState>>) -> KernelState {
        let mut kernel = KernelState {
            dests,
            ..KernelState::default()
        };
        for key in &change.scope {
            if let Some(vs) = self.ipvs.services.get(key) {
                kernel.services.insert(*key, vs.service.clone());
                // kproxy created it: it may change it.
                kernel.local_addresses.insert(key.addr);
            }
        }
        kernel
    }

    /// The virtual services of `change`'s scope that exist now: their real servers are read.
    pub fn existing<'a>(&'a self, change: &'a Change) -> impl Iterator<Item = &'a VsKey> + 'a {
        change.scope.iter().filter(|k| self.ipvs.services.contains_key(k))
    }

    /// The addresses and nftables elements that `change` adds and removes.
    pub fn edits(&self, change: &Change) -> Edits {
        let mut old: BTreeSet<(SetName, Element)> = BTreeSet::new();
        let mut new: BTreeSet<(SetName, Element)> = BTreeSet::new();
        let mut bound: BTreeMap<IpAddr, i64> = BTreeMap::new();
        let mut hairpin: BTreeMap<IpAddr, i64> = BTreeMap::new();
        let mut count = |vs: &DesiredVs, key: &VsKey, by: i64| {
            if vs.bound {
                *bound.entry(key.addr).or_default() += by;
            }
            for ip in vs.servers.ips() {
                *hairpin.entry(ip).or_default() += by;
            }
        };
        for (svc, plan) in &change.plans {
            for key in self.ipvs.owners.get(svc).map(|o| &*o.keys).unwrap_or_default() {
                if let Some(vs) = self.ipvs.services.get(key) {
                    vs_elements(key, vs, |s, e| {
                        old.insert((s, e));
                    });
                    count(vs, key, -1);
                }
            }
            for (key, vs) in &plan.services {
                vs_elements(key, vs, |s, e| {
                    new.insert((s, e));
                });
                count(vs, key, 1);
            }
        }
        let (bind, unbind) = crossings(|ip| self.ipvs.bound.get(ip).copied().unwrap_or(0), &bound);
        let (hairpin_up, hairpin_down) = crossings(|ip| self.hairpin.get(ip), &hairpin);
        let mut edits = Edits {
            add_elements: new.difference(&old).copied().collect(),
            delete_elements: old.difference(&new).copied().collect(),
            bind,
            unbind,
        };
        edits
            .add_elements
            .extend(edits.bind.iter().map(|ip| (SetName::ServiceIps, Element::Ip(*ip))));
        edits
            .delete_elements
            .extend(edits.unbind.iter().map(|ip| (SetName::ServiceIps, Element::Ip(*ip))));
        edits.add_elements.extend(
            hairpin_up
                .into_iter()
                .map(|ip| (SetName::Hairpin, Element::Hairpin(ip))),
        );
        edits.delete_elements.extend(
            hairpin_down
                .into_iter()
                .map(|ip| (SetName::Hairpin, Element::Hairpin(ip))),
        );
        edits
    }

    /// Records that `change` was programmed.
    pub fn commit(&mut self, change: Change) {
        // Every changed Service out first, then in: a virtual service that moves from one
        // changed Service to another is free by the time its new owner comes.
        for (svc, _) in &change.plans {
            for (_, vs) in self.ipvs.remove_service(svc) {
                for ip in vs.servers.ips() {
                    self.hairpin.down(ip);
                }
            }
        }
        for (svc, plan) in change.plans {
            for (_, vs) in &plan.services {
                for ip in vs.servers.ips() {
                    self.hairpin.up(ip);
                }
            }
            self.ipvs.insert_service(&svc, plan);
        }
    }
}

#[cfg(test)]
mod tests;
