//! Pure planning for IPVS mode: the virtual services a [`DesiredState`] asks for, and the
//! requests that turn the kernel's current IPVS table into that.
//!
//! Nothing here does I/O; the kernel's state comes in as a value read back over netlink, and
//! time as an `Instant` argument, so every decision (including graceful termination) is testable.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::netlink::{
    addr_port, RealServer, RealServerState, Request, VirtualService, VsKey, FWD_MASQ, SVC_F_PERSISTENT,
};
use crate::model::topology::categorize_endpoints;
use crate::model::{DesiredState, Endpoint, IpFamily, NodeInfo, Protocol, ServiceKey, ServiceState};

/// Settings of one planning pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanConfig {
    pub family: IpFamily,
    /// Shared by every virtual service planned with it.
    pub scheduler: Arc<str>,
    /// The local addresses NodePorts are served on, resolved for this sync.
    pub nodeport_addresses: Vec<IpAddr>,
    /// Virtual services on these addresses are never touched.
    pub exclude_cidrs: Vec<IpNet>,
    /// Longest wait for a removed real server to drain; zero waits for the connections to end.
    pub graceful_period: Duration,
}

/// Which traffic a virtual service receives; decides its endpoints and its masquerading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// A ClusterIP: internal traffic, `internalTrafficPolicy`.
    Internal,
    /// A NodePort, externalIP or LoadBalancer IP: `externalTrafficPolicy`.
    External,
}

/// One virtual service kproxy wants, with its real servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredVs {
    pub service: VirtualService,
    /// Real servers by (address, port).
    pub servers: Servers,
    /// The Service it implements.
    pub owner: ServiceKey,
    pub traffic: Traffic,
    /// The policy for this traffic is Local (only this node's endpoints).
    pub local_policy: bool,
    /// The Service has usable endpoints somewhere (no endpoints: reject; none local: drop).
    pub has_any_endpoint: bool,
    /// The address is bound to the dummy interface (ClusterIPs, externalIPs, LB IPs).
    pub bound: bool,
    /// `loadBalancerSourceRanges` on a LoadBalancer IP: only these sources may connect.
    /// Empty: anyone may.
    pub source_ranges: Vec<IpNet>,
}

/// The IPVS weight of every real server kproxy programs: each endpoint gets the same share,
/// as with kube-proxy.
pub const WEIGHT: u32 = 1;

/// The real servers of one virtual service by (address, port), sorted, each of [`WEIGHT`].
/// The record of a full sync keeps one per virtual service (10,000 at 10,000 Services, with
/// 100,000 real servers), so each family's addresses are kept at their own width: 6 bytes an
/// IPv4 real server, where an `(IpAddr, u16)` with its weight took 24 (and a B-tree map before
/// that, a node sized for 11 entries apart from the map). IPv4 sorts before IPv6 as in
/// `IpAddr`'s order, so the two slices read as one sorted list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Servers {
    v4: Box<[(Ipv4Addr, u16)]>,
    v6: Box<[(Ipv6Addr, u16)]>,
}

impl Servers {
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, (ip, port): (IpAddr, u16)) -> bool {
        match ip {
            IpAddr::V4(a) => self.v4.binary_search(&(a, port)).is_ok(),
            IpAddr::V6(a) => self.v6.binary_search(&(a, port)).is_ok(),
        }
    }

    /// The real servers as (address, port), in order.
    pub fn iter(&self) -> impl Iterator<Item = (IpAddr, u16)> + '_ {
        let v4 = self.v4.iter().map(|(a, p)| (IpAddr::V4(*a), *p));
        v4.chain(self.v6.iter().map(|(a, p)| (IpAddr::V6(*a), *p)))
    }

    /// The real servers' addresses, in order (one per real server: an address may repeat).
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.iter().map(|(ip, _)| ip)
    }
}

/// As a set collects: sorted, each (address, port) once.
impl FromIterator<(IpAddr, u16)> for Servers {
    fn from_iter<I: IntoIterator<Item = (IpAddr, u16)>>(iter: I) -> Self {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (ip, port) in iter {
            match ip {
                IpAddr::V4(a) => v4.push((a, port)),
                IpAddr::V6(a) => v6.push((a, port)),
            }
        }
        v4.sort_unstable();
        v4.dedup();
        v6.sort_unstable();
        v6.dedup();
        Servers {
            v4: v4.into_boxed_slice(),
            v6: v6.into_boxed_slice(),
        }
    }
}

/// Everything IPVS mode wants in the kernel for one family. After a successful sync the
/// proxier keeps the one it programmed as its record of the kernel (see [`super::state`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredIpvs {
    pub services: BTreeMap<VsKey, DesiredVs>,
    /// Addresses to bind to the dummy interface, each with the number of its virtual services
    /// (an address goes when its last one does).
    pub bound: BTreeMap<IpAddr, u32>,
    /// Service ports with a Local policy and no local endpoint (internal, external).
    pub no_local_endpoints: (usize, usize),
    /// What each Service got: its virtual services and its share of `no_local_endpoints`.
    pub owners: BTreeMap<ServiceKey, Owned>,
    /// The real servers of all `services` added by [`DesiredIpvs::insert_service`], kept as
    /// they come and go so that a partial sync need not count them.
    real_servers: usize,
}

/// The part of a [`DesiredIpvs`] that one Service owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owned {
    /// Its virtual services, sorted (most Services have one or two: a slice, not a set).
    pub keys: Box<[VsKey]>,
    /// Its ports with a Local policy and no local endpoint (internal, external).
    pub no_local_endpoints: (u32, u32),
}

impl DesiredIpvs {
    pub fn real_server_count(&self) -> usize {
        self.real_servers
    }

    /// Adds one Service's plan. A virtual service another Service already has stays that
    /// one's (the first in key order wins, as on a full sync).
    pub fn insert_service(&mut self, owner: &ServiceKey, plan: ServicePlan) {
        let mut keys = Vec::with_capacity(plan.services.len());
        for (key, vs) in plan.services {
            if self.services.contains_key(&key) {
                tracing::debug!(%key, service = %owner, "virtual service already taken by another Service port");
                continue;
            }
            if vs.bound {
                *self.bound.entry(key.addr).or_default() += 1;
            }
            self.real_servers += vs.servers.len();
            self.services.insert(key, vs);
            keys.push(key);
        }
        let (internal, external) = plan.no_local_endpoints;
        self.no_local_endpoints.0 += internal as usize;
        self.no_local_endpoints.1 += external as usize;
        if !keys.is_empty() || plan.no_local_endpoints != (0, 0) {
            keys.sort_unstable();
            self.owners.insert(
                owner.clone(),
                Owned {
                    keys: keys.into_boxed_slice(),
                    no_local_endpoints: plan.no_local_endpoints,
                },
            );
        }
    }

    /// Takes one Service's part out again, returning its virtual services.
    pub fn remove_service(&mut self, owner: &ServiceKey) -> Vec<(VsKey, DesiredVs)> {
        let Some(owned) = self.owners.remove(owner) else {
            return Vec::new();
        };
        self.no_local_endpoints.0 -= owned.no_local_endpoints.0 as usize;
        self.no_local_endpoints.1 -= owned.no_local_endpoints.1 as usize;
        let mut out = Vec::with_capacity(owned.keys.len());
        for key in owned.keys.iter() {
            let Some(vs) = self.services.remove(key) else { continue };
            self.real_servers -= vs.servers.len();
            if vs.bound {
                if let Some(n) = self.bound.get_mut(&key.addr) {
                    *n -= 1;
                    if *n == 0 {
                        self.bound.remove(&key.addr);
                    }
                }
            }
            out.push((*key, vs));
        }
        out
    }
}

fn of_family(family: IpFamily) -> impl Fn(&&IpAddr) -> bool {
    move |ip| IpFamily::of(ip) == family
}

/// The virtual services of one Service, before other Services are considered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServicePlan {
    pub services: Vec<(VsKey, DesiredVs)>,
    /// Its ports with a Local policy and no local endpoint (internal, external).
    pub no_local_endpoints: (u32, u32),
}

/// The virtual services and bound addresses that implement `desired` for `cfg.family`.
pub fn plan_desired(desired: &DesiredState, cfg: &PlanConfig) -> DesiredIpvs {
    let mut out = DesiredIpvs::default();
    for (owner, state) in &desired.services {
        out.insert_service(owner, plan_service(owner, state, &desired.node, cfg));
    }
    out
}

/// The virtual services of one Service for `cfg.family`: what a partial sync recomputes.
pub fn plan_service(owner: &ServiceKey, state: &ServiceState, node: &NodeInfo, cfg: &PlanConfig) -> ServicePlan {
    let mut out = ServicePlan::default();
    for p in &state.ports {
        let sp = &p.port;
        let sets = categorize_endpoints(&p.endpoints, sp, &node.name, node.zone.as_deref());
        let servers = |eps: &[&Endpoint]| -> Servers {
            eps.iter()
                .filter(|e| IpFamily::of(&e.ip) == cfg.family)
                .map(|e| (e.ip, e.port))
                .collect()
        };
        let internal = servers(if sp.internal_policy_local {
            &sets.local
        } else {
            &sets.cluster
        });
        let external = servers(if sp.external_policy_local {
            &sets.local
        } else {
            &sets.cluster
        });
        if sp.internal_policy_local && sets.local.is_empty() {
            out.no_local_endpoints.0 += 1;
        }
        if sp.external_policy_local && sp.has_external_destinations() && sets.local.is_empty() {
            out.no_local_endpoints.1 += 1;
        }
        let (flags, timeout) = match sp.affinity_timeout {
            Some(t) => (SVC_F_PERSISTENT, t),
            None => (0, 0),
        };
        let mut add = |addr: IpAddr, port: u16, traffic: Traffic, bound: bool, ranges: &[IpNet]| {
            let key = VsKey {
                addr,
                protocol: sp.name.protocol,
                port,
            };
            let (servers, local_policy) = match traffic {
                Traffic::Internal => (&internal, sp.internal_policy_local),
                Traffic::External => (&external, sp.external_policy_local),
            };
            if out.services.iter().any(|(k, _)| *k == key) {
                tracing::debug!(%key, service = %sp.name, "virtual service already taken by another port of the Service");
                return;
            }
            out.services.push((
                key,
                DesiredVs {
                    service: VirtualService {
                        key,
                        scheduler: cfg.scheduler.clone(),
                        flags,
                        timeout,
                    },
                    servers: servers.clone(),
                    owner: owner.clone(),
                    traffic,
                    local_policy,
                    has_any_endpoint: sets.has_any,
                    bound,
                    source_ranges: ranges
                        .iter()
                        .filter(|n| IpFamily::of(&n.addr()) == cfg.family)
                        .copied()
                        .collect(),
                },
            ));
        };
        for ip in sp.cluster_ips.iter().filter(of_family(cfg.family)) {
            add(*ip, sp.port, Traffic::Internal, true, &[]);
        }
        for ip in sp.external_ips().iter().filter(of_family(cfg.family)) {
            add(*ip, sp.port, Traffic::External, true, &[]);
        }
        for ip in sp.load_balancer_ips().iter().filter(of_family(cfg.family)) {
            add(*ip, sp.port, Traffic::External, true, sp.load_balancer_source_ranges());
        }
        if let Some(np) = sp.node_port {
            for ip in cfg.nodeport_addresses.iter().filter(of_family(cfg.family)) {
                add(*ip, np, Traffic::External, false, &[]);
            }
        }
    }
    out
}

/// The virtual services in `ipvsadm-save -n` form, for `kproxy render`.
pub fn render_save(desired: &DesiredIpvs) -> String {
    let mut out = String::new();
    for (key, vs) in &desired.services {
        let kind = match key.protocol {
            Protocol::Tcp => "-t",
            Protocol::Udp => "-u",
            Protocol::Sctp => "--sctp-service",
        };
        let vip = addr_port(key.addr, key.port);
        out.push_str(&format!("-A {kind} {vip} -s {}", vs.service.scheduler));
        if vs.service.flags & SVC_F_PERSISTENT != 0 {
            out.push_str(&format!(" -p {}", vs.service.timeout));
        }
        out.push('\n');
        for (ip, port) in vs.servers.iter() {
            out.push_str(&format!("-a {kind} {vip} -r {} -m -w {WEIGHT}\n", addr_port(ip, port)));
        }
    }
    out
}

/// The local addresses NodePorts are served on: `all` are the node's addresses (without the
/// dummy interface's, loopback and link-local), filtered by `--nodeport-addresses`.
pub fn nodeport_addresses(
    setting: &crate::dataplane::iptables::NodePortAddresses,
    node_addresses: &BTreeSet<IpAddr>,
    node: &crate::model::NodeInfo,
) -> Vec<IpAddr> {
    use crate::dataplane::iptables::NodePortAddresses;
    match setting {
        NodePortAddresses::All => node_addresses.iter().copied().collect(),
        NodePortAddresses::Primary => node.addresses.clone(),
        NodePortAddresses::Cidrs(cidrs) => node_addresses
            .iter()
            .filter(|ip| cidrs.iter().any(|c| c.contains(*ip)))
            .copied()
            .collect(),
    }
}

/// The kernel's IPVS table as read back over netlink.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Every virtual service of this family.
    pub services: BTreeMap<VsKey, VirtualService>,
    /// Real servers of the services this sync looks at (see [`Scope`]).
    pub dests: BTreeMap<VsKey, Vec<RealServerState>>,
    /// Addresses of this network namespace (including the dummy interface's): a virtual
    /// service on any other address cannot be kproxy's.
    pub local_addresses: BTreeSet<IpAddr>,
}

/// Which virtual services a sync compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every wanted service and every kernel service kproxy may own: repairs anything.
    Full,
    /// Only these (the changed Services' old and new ones, and those still draining).
    Only(BTreeSet<VsKey>),
}

/// Real servers waiting at weight 0 for their connections to drain, and since when.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Draining {
    since: BTreeMap<(VsKey, IpAddr, u16), Instant>,
}

impl Draining {
    /// Virtual services that still have a draining real server: every sync looks at them.
    pub fn services(&self) -> BTreeSet<VsKey> {
        self.since.keys().map(|(k, _, _)| *k).collect()
    }

    pub fn len(&self) -> usize {
        self.since.len()
    }

    fn forget_service(&mut self, key: &VsKey) {
        self.since.retain(|(k, _, _), _| k != key);
    }
}

/// Whether a kernel virtual service may be changed or deleted by kproxy: its address is local
/// (bound to the dummy interface or a NodePort address) and not excluded by `--ipvs-exclude-cidrs`.
pub fn is_owned(key: &VsKey, local_addresses: &BTreeSet<IpAddr>, exclude: &[IpNet]) -> bool {
    local_addresses.contains(&key.addr) && !exclude.iter().any(|c| c.contains(&key.addr))
}

/// Whether kproxy may change or delete the kernel's virtual service `key` in this sync.
fn owned_by_kproxy(key: &VsKey, desired: &DesiredIpvs, kernel: &KernelState, cfg: &PlanConfig) -> bool {
    IpFamily::of(&key.addr) == cfg.family
        && (is_owned(key, &kernel.local_addresses, &cfg.exclude_cidrs) || desired.services.contains_key(key))
}

/// The virtual services [`Scope::Full`] compares: every wanted one and every one in the kernel
/// that kproxy may own. A full sync may plan them in batches (`Scope::Only` of consecutive
/// parts of this set) to the same requests, so as to read and hold the real servers of one
/// batch at a time.
pub fn full_scope(desired: &DesiredIpvs, kernel: &KernelState, cfg: &PlanConfig) -> BTreeSet<VsKey> {
    desired
        .services
        .keys()
        .chain(
            kernel
                .services
                .keys()
                .filter(|k| owned_by_kproxy(k, desired, kernel, cfg)),
        )
        .copied()
        .collect()
}

/// The requests that make `kernel` match `desired` within `scope`, in a safe order: deletions
/// of services first, then additions and edits, then removal of real servers.
/// `draining` is updated for real servers put to weight 0 or finally deleted.
pub fn plan_requests(
    desired: &DesiredIpvs,
    kernel: &KernelState,
    scope: &Scope,
    draining: &mut Draining,
    now: Instant,
    cfg: &PlanConfig,
) -> Vec<Request> {
    let owned = |key: &VsKey| owned_by_kproxy(key, desired, kernel, cfg);
    let full;
    let keys: &BTreeSet<VsKey> = match scope {
        Scope::Full => {
            full = full_scope(desired, kernel, cfg);
            &full
        }
        Scope::Only(keys) => keys,
    };
    let mut deletes = Vec::new();
    let mut upserts = Vec::new();
    let mut removals = Vec::new();
    for key in keys {
        match (desired.services.get(key), kernel.services.get(key)) {
            (Some(want), None) => {
                upserts.push(Request::NewService(want.service.clone()));
                for (addr, port) in want.servers.iter() {
                    upserts.push(Request::NewDest(*key, real_server(addr, port, WEIGHT)));
                }
                draining.forget_service(key);
            }
            (Some(want), Some(have)) => {
                if want.service != *have {
                    upserts.push(Request::SetService(want.service.clone()));
                }
                let current = kernel.dests.get(key).map(Vec::as_slice).unwrap_or_default();
                plan_servers(key, want, current, draining, now, cfg, &mut upserts, &mut removals);
            }
            (None, Some(_)) if owned(key) => {
                deletes.push(Request::DelService(*key));
                draining.forget_service(key);
            }
            _ => draining.forget_service(key),
        }
    }
    deletes.extend(upserts);
    deletes.extend(removals);
    deletes
}

fn real_server(addr: IpAddr, port: u16, weight: u32) -> RealServer {
    RealServer {
        addr,
        port,
        weight,
        fwd_method: FWD_MASQ,
    }
}

/// Real servers of one existing service: add the new, fix weights, and drain the removed.
#[allow(clippy::too_many_arguments)]
fn plan_servers(
    key: &VsKey,
    want: &DesiredVs,
    current: &[RealServerState],
    draining: &mut Draining,
    now: Instant,
    cfg: &PlanConfig,
    upserts: &mut Vec<Request>,
    removals: &mut Vec<Request>,
) {
    let have: BTreeMap<(IpAddr, u16), &RealServerState> = current
        .iter()
        .map(|rs| ((rs.server.addr, rs.server.port), rs))
        .collect();
    for (addr, port) in want.servers.iter() {
        let rs = real_server(addr, port, WEIGHT);
        match have.get(&(addr, port)) {
            None => upserts.push(Request::NewDest(*key, rs)),
            Some(cur) if cur.server.weight != WEIGHT || cur.server.fwd_method != FWD_MASQ => {
                upserts.push(Request::SetDest(*key, rs))
            }
            Some(_) => {}
        }
        draining.since.remove(&(*key, addr, port));
    }
    for (&(addr, port), cur) in &have {
        if want.servers.contains((addr, port)) {
            continue;
        }
        let id = (*key, addr, port);
        let connections = cur.active_conns + cur.inactive_conns;
        // UDP and SCTP have no connection end to wait for; kube-proxy deletes them at once too
        // (expire_nodest_conn then drops their flows on the next packet).
        let drained = key.protocol != Protocol::Tcp || connections == 0;
        if drained {
            removals.push(Request::DelDest(*key, cur.server));
            draining.since.remove(&id);
            continue;
        }
        let since = *draining.since.entry(id).or_insert(now);
        if cur.server.weight != 0 {
            upserts.push(Request::SetDest(*key, real_server(addr, port, 0)));
        } else if !cfg.graceful_period.is_zero() && now.duration_since(since) >= cfg.graceful_period {
            removals.push(Request::DelDest(*key, cur.server));
            draining.since.remove(&id);
        }
    }
}

#[cfg(test)]
pub(super) mod tests;
