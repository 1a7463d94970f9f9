//! iptables mode: kube-proxy's chain layout under kproxy's own `KPROXY-` prefix.
//!
//! [`Planner`] is pure: it renders the Services that changed, keeps every Service's rendered
//! rules, and assembles one iptables-restore input per sync. [`apply`] runs the tools.

pub mod apply;
pub mod names;
pub mod render;
#[cfg(test)]
pub mod tracer;

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use ipnet::IpNet;

use self::render::{
    render_fixed, render_nodeport_jump, render_port, LocalDetector, NodePortMatch, PortRules, RenderConfig, TableText,
};
use super::conntrack::{delete_flows, plan_cleanup, udp_ports, UdpPorts};
use super::{Dataplane, Result, SyncStats};
use crate::config::DetectLocal;
use crate::model::{ChangeSet, DesiredState, IpFamily, NodeInfo, ServiceKey, ServiceState};

/// One restore input and what it contains.
#[derive(Debug, Default)]
pub struct Plan {
    /// The exact text for `iptables-restore --noflush`.
    pub restore: String,
    pub rules_written: usize,
    /// Rules written per table by this sync (kubeproxy_sync_proxy_rules_iptables_last).
    pub written: (usize, usize),
    pub filter_rules: usize,
    pub nat_rules: usize,
    pub no_local_endpoints: (usize, usize),
}

/// Rendered rules of every Service, kept between syncs so a partial sync renders only changes.
#[derive(Debug, Default)]
pub struct Planner {
    cache: BTreeMap<ServiceKey, Arc<Vec<PortRules>>>,
    last_config: Option<RenderConfig>,
    written: Written,
}

impl Planner {
    pub fn new() -> Self {
        Planner::default()
    }

    /// Plans one sync. `kernel_chains` (from iptables-save, full syncs only) lets a full sync
    /// delete chains left by an earlier run; on partial syncs stale chains are known from the cache.
    pub fn plan(
        &mut self,
        desired: &DesiredState,
        changes: &ChangeSet,
        cfg: &RenderConfig,
        kernel_chains: Option<&BTreeSet<String>>,
    ) -> Plan {
        let full = changes.full || self.last_config.as_ref() != Some(cfg);
        let mut deleted: Vec<String> = Vec::new();
        let mut written_services: Vec<ServiceKey> = Vec::new();

        if full {
            self.cache.clear();
            for (key, state) in &desired.services {
                self.cache
                    .insert(key.clone(), render_service(state, &desired.node, cfg));
                written_services.push(key.clone());
            }
        } else {
            for key in &changes.services {
                let old = self.cache.remove(key);
                if let Some(state) = desired.services.get(key) {
                    self.cache
                        .insert(key.clone(), render_service(state, &desired.node, cfg));
                    written_services.push(key.clone());
                }
                // Chains the Service had and no longer has must go.
                if let Some(old) = old {
                    let now: BTreeSet<&String> = self
                        .cache
                        .get(key)
                        .into_iter()
                        .flat_map(|r| r.iter())
                        .flat_map(|p| p.nat_chains.iter().map(|c| &c.name))
                        .collect();
                    for chain in old.iter().flat_map(|p| p.nat_chains.iter()) {
                        if !now.contains(&chain.name) {
                            deleted.push(chain.name.clone());
                        }
                    }
                }
            }
        }
        self.last_config = Some(cfg.clone());

        let (fixed_filter, fixed_nat) = render_fixed(cfg);
        let jump = render_nodeport_jump(cfg);
        let mut nat = TableText {
            delete: deleted,
            ..TableText::default()
        };
        let mut filter = TableText::default();
        filter.declare.extend(names::FILTER_CHAINS.iter().copied());
        nat.declare.extend(names::NAT_CHAINS.iter().copied());
        filter.rules.extend(fixed_filter.iter().map(String::as_str));
        nat.rules.extend(fixed_nat.iter().map(String::as_str));

        let mut plan = Plan::default();
        let mut nat_total = nat.rules.len();
        for rules in self.cache.values() {
            for p in rules.iter() {
                filter.rules.extend(p.filter.iter().map(String::as_str));
                nat.rules.extend(p.nat_services.iter().map(String::as_str));
                nat_total += p.nat_services.len() + p.nat_chains.iter().map(|c| c.len).sum::<usize>();
                plan.no_local_endpoints.0 += usize::from(p.no_local_internal);
                plan.no_local_endpoints.1 += usize::from(p.no_local_external);
            }
        }
        nat_total += jump.len();
        nat.rules.extend(jump.iter().map(String::as_str));
        for rules in self.cache.values() {
            for p in rules.iter() {
                nat.rules.extend(p.nat_nodeports.iter().map(String::as_str));
            }
        }
        for key in &written_services {
            for p in self.cache[key].iter() {
                for chain in &p.nat_chains {
                    nat.declare.push(&chain.name);
                    if chain.len > 0 {
                        nat.rules.push(&chain.rules);
                    }
                }
            }
        }
        if let Some(existing) = kernel_chains.filter(|_| full) {
            let wanted: BTreeSet<&str> = nat
                .declare
                .iter()
                .copied()
                .chain(names::FILTER_CHAINS.iter().copied())
                .collect();
            nat.delete.extend(
                existing
                    .iter()
                    .filter(|c| c.starts_with(names::PREFIX) && !wanted.contains(c.as_str()))
                    .cloned(),
            );
        }
        nat.delete.sort();
        nat.delete.dedup();

        let filter_total = filter.rules.len();
        skip_unchanged(&mut self.written, "filter", &mut filter, names::FILTER_CHAINS, full);
        skip_unchanged(&mut self.written, "nat", &mut nat, names::NAT_CHAINS, full);
        let size: usize = filter.rules.iter().chain(nat.rules.iter()).map(|r| r.len() + 1).sum();
        plan.restore.reserve(size + 64 * (nat.declare.len() + nat.delete.len()));
        filter.write("filter", &mut plan.restore);
        nat.write("nat", &mut plan.restore);
        plan.rules_written = filter.rule_count() + nat.rule_count();
        plan.written = (filter.rule_count(), nat.rule_count());
        plan.filter_rules = filter_total;
        plan.nat_rules = nat_total;
        plan
    }
}

/// Hash of each fixed chain's rules as last written, by (table, chain).
type Written = BTreeMap<(&'static str, &'static str), u64>;

/// Leaves out the fixed chains of `table` whose rules are the same as last written: declaring a
/// chain flushes it, and rewriting thousands of unchanged dispatch rules for one endpoint change
/// is what makes syncs of large clusters slow. A full sync writes them all.
fn skip_unchanged(
    written: &mut Written,
    table: &'static str,
    text: &mut TableText<'_>,
    fixed: &[&'static str],
    full: bool,
) {
    {
        let chain_of = |rule: &str| rule.split(' ').nth(1).unwrap_or_default().to_string();
        let mut skip = BTreeSet::new();
        for chain in fixed {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            text.rules
                .iter()
                .filter(|r| chain_of(r) == *chain)
                .for_each(|r| r.hash(&mut hasher));
            let hash = hasher.finish();
            let key = (table, *chain);
            if !full && written.get(&key) == Some(&hash) {
                skip.insert(chain.to_string());
            }
            written.insert(key, hash);
        }
        if skip.is_empty() {
            return;
        }
        text.declare.retain(|c| !skip.contains(*c));
        text.rules.retain(|r| !skip.contains(&chain_of(r)));
    }
}

/// Every port of one Service, for the planner's cache.
fn render_service(state: &ServiceState, node: &NodeInfo, cfg: &RenderConfig) -> Arc<Vec<PortRules>> {
    Arc::new(state.ports.iter().filter_map(|p| render_port(p, node, cfg)).collect())
}

/// Where NodePorts are served, as configured (`--nodeport-addresses`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Empty flag: every local address.
    All,
    /// `primary`: the node's addresses from its Node object.
    Primary,
    /// Local addresses inside these CIDRs.
    Cidrs(Vec<IpNet>),
}

/// Settings of the iptables proxier that do not change while it runs.
#[derive(Debug, Clone)]
pub struct ProxierConfig {
    pub family: IpFamily,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    pub detect_local: DetectLocal,
    pub nodeport_addresses: NodePortAddresses,
    /// `iptables.localhostNodePorts`, already narrowed to NodePorts on loopback addresses.
    pub localhost_nodeports: bool,
    /// Count into kube-proxy's nfacct counters (only once they exist: xt_nfacct refuses others).
    pub nfacct: bool,
    /// `--conntrack-tcp-be-liberal`: no ctstate INVALID drop rule.
    pub conntrack_tcp_liberal: bool,
}

/// The iptables (or ip6tables) dataplane for one IP family.
pub struct IptablesProxier {
    cfg: ProxierConfig,
    tools: apply::Tools,
    planner: Planner,
    /// UDP ports as last programmed, to find stale conntrack flows; `None` before the first sync
    /// (flows that predate this process are left alone).
    udp: Option<UdpPorts>,
}

impl IptablesProxier {
    pub fn new(cfg: ProxierConfig) -> Self {
        IptablesProxier {
            tools: apply::Tools::for_family(cfg.family),
            cfg,
            planner: Planner::new(),
            udp: None,
        }
    }
}

/// The local-traffic detector for one family; NodeCIDR mode follows the Node's podCIDRs.
pub fn local_detector(detect: &DetectLocal, family: IpFamily, node: &NodeInfo) -> LocalDetector {
    let of_family = |nets: &[IpNet]| nets.iter().find(|n| IpFamily::of(&n.addr()) == family).copied();
    match detect {
        DetectLocal::None => LocalDetector::None,
        DetectLocal::ClusterCidr(cidrs) => of_family(cidrs).map_or(LocalDetector::None, LocalDetector::Cidr),
        DetectLocal::NodeCidr => of_family(&node.pod_cidrs).map_or(LocalDetector::None, LocalDetector::Cidr),
        DetectLocal::BridgeInterface(b) => LocalDetector::Bridge(b.clone()),
        DetectLocal::InterfaceNamePrefix(p) => LocalDetector::InterfacePrefix(p.clone()),
    }
}

/// Builds the render configuration for this sync; resolves NodePort addresses from the kernel
/// when `--nodeport-addresses` names CIDRs.
pub async fn render_config(cfg: &ProxierConfig, desired: &DesiredState) -> Result<RenderConfig> {
    let node = &desired.node;
    let nodeports = match &cfg.nodeport_addresses {
        NodePortAddresses::All => NodePortMatch::AllLocal,
        NodePortAddresses::Primary => NodePortMatch::Addresses(node.addresses.clone()),
        NodePortAddresses::Cidrs(cidrs) => {
            let mut ips: Vec<IpAddr> = apply::local_addresses()
                .await?
                .into_iter()
                .filter(|ip| cidrs.iter().any(|c| c.contains(ip)))
                .collect();
            ips.sort();
            ips.dedup();
            NodePortMatch::Addresses(ips)
        }
    };
    Ok(RenderConfig {
        family: cfg.family,
        masquerade_all: cfg.masquerade_all,
        masquerade_mark: 1u32 << cfg.masquerade_bit,
        local_detector: local_detector(&cfg.detect_local, cfg.family, node),
        nodeports,
        endpoint_comments: desired.endpoint_count() <= render::LARGE_CLUSTER_ENDPOINTS,
        localhost_nodeports: cfg.localhost_nodeports && cfg.family == IpFamily::V4,
        nfacct: cfg.nfacct,
        conntrack_tcp_liberal: cfg.conntrack_tcp_liberal,
    })
}

impl Dataplane for IptablesProxier {
    fn mode(&self) -> &'static str {
        "iptables"
    }

    fn sync<'a>(&'a mut self, desired: &'a DesiredState, changes: &'a ChangeSet) -> BoxFuture<'a, Result<SyncStats>> {
        Box::pin(async move {
            let cfg = render_config(&self.cfg, desired).await?;
            let kernel_chains = if changes.full {
                Some(self.tools.chains("nat").await?)
            } else {
                None
            };
            let plan = self.planner.plan(desired, changes, &cfg, kernel_chains.as_ref());
            if let Err(e) = self.tools.restore(&plan.restore).await {
                // The kernel kept its old rules; the cache now describes rules that are not there.
                self.planner = Planner::new();
                return Err(e);
            }
            if changes.full {
                self.tools.ensure_jumps().await?;
            }
            crate::metrics::metrics().set_iptables_rules_last(plan.written.0, plan.written.1);
            let udp = udp_ports(desired, self.cfg.family);
            if let Some(old) = &self.udp {
                delete_flows(&plan_cleanup(old, &udp)).await;
            }
            self.udp = Some(udp);
            tracing::debug!(family = ?self.cfg.family, "iptables-restore input:\n{}", plan.restore);
            Ok(SyncStats {
                rules_written: plan.rules_written,
                rules_total: vec![("filter", plan.filter_rules), ("nat", plan.nat_rules)],
                no_local_endpoints: plan.no_local_endpoints,
            })
        })
    }

    fn cleanup(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.tools.cleanup().await })
    }
}

#[cfg(test)]
mod tests;
