//! Desired state to iptables-restore input, with kube-proxy's chain semantics. Pure.
//!
//! Each Service port renders to a [`PortRules`] value that the proxier caches, so a partial sync
//! re-renders only the Services that changed and splices the cached rules of the others into the
//! dispatch chains.

use std::net::IpAddr;

use ipnet::IpNet;

use super::names::{self, quote};
use crate::dataplane::port_policy::{FamilyView, PortPolicy};
use crate::model::topology::{categorize_endpoints, uses_cluster_endpoints, uses_local_endpoints};
use crate::model::{Endpoint, IpFamily, NodeInfo, PortState};

/// How kproxy tells traffic from local pods apart from everything else (`--detect-local-mode`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalDetector {
    /// No way to tell: masquerade decisions cannot depend on the source.
    None,
    /// Pods are the sources inside this CIDR (ClusterCIDR or NodeCIDR mode).
    Cidr(IpNet),
    /// Pods sit behind this bridge (BridgeInterface mode).
    Bridge(String),
    /// Pods' interfaces share this name prefix (InterfaceNamePrefix mode).
    InterfacePrefix(String),
}

impl LocalDetector {
    fn if_local(&self) -> Option<String> {
        match self {
            LocalDetector::None => None,
            LocalDetector::Cidr(net) => Some(format!("-s {net}")),
            LocalDetector::Bridge(br) => Some(format!("-i {br}")),
            LocalDetector::InterfacePrefix(p) => Some(format!("-i {p}+")),
        }
    }

    fn if_not_local(&self) -> Option<String> {
        self.if_local().map(|m| format!("! {m}"))
    }
}

/// Where NodePorts are accepted (`--nodeport-addresses`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortMatch {
    /// Every local address except loopback.
    AllLocal,
    /// Only these node addresses (resolved from the configured CIDRs by the caller).
    Addresses(Vec<IpAddr>),
}

/// Everything besides the desired state that shapes the rules of one IP family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderConfig {
    pub family: IpFamily,
    pub masquerade_all: bool,
    /// The fwmark bit that flags packets for masquerade (`1 << --iptables-masquerade-bit`).
    pub masquerade_mark: u32,
    pub local_detector: LocalDetector,
    pub nodeports: NodePortMatch,
    /// Comments on per-endpoint rules. Like kube-proxy, kproxy drops them in large clusters
    /// (over [`LARGE_CLUSTER_ENDPOINTS`] endpoints): they are a third of the ruleset's bytes and
    /// iptables-restore's time.
    pub endpoint_comments: bool,
    /// `iptables.localhostNodePorts` in effect (IPv4, NodePorts on loopback addresses):
    /// NodePorts answer on 127.0.0.1 (with route_localnet), and other sources cannot reach
    /// 127.0.0.0/8, as kube-proxy's rules do.
    pub localhost_nodeports: bool,
    /// The nfacct counters exist: the rules count into them (kube-proxy's two nfacct metrics).
    pub nfacct: bool,
    /// `--conntrack-tcp-be-liberal`: conntrack accepts out-of-window packets, so kube-proxy
    /// drops no ctstate INVALID packets.
    pub conntrack_tcp_liberal: bool,
}

/// Above this many endpoints, per-endpoint rules carry no comments (kube-proxy's threshold).
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

impl RenderConfig {
    fn mark(&self) -> String {
        format!("{:#x}/{:#x}", self.masquerade_mark, self.masquerade_mark)
    }
}

/// The rules one Service port contributes, grouped by where they go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortRules {
    /// `-A KPROXY-SERVICES` lines of the nat table.
    pub nat_services: Vec<String>,
    /// `-A KPROXY-NODEPORTS` lines of the nat table.
    pub nat_nodeports: Vec<String>,
    /// The port's own nat chains and their rules, in order.
    pub nat_chains: Vec<Chain>,
    /// Filter-table lines (reject, drop, firewall, health check accept), complete with `-A CHAIN`.
    pub filter: Vec<String>,
    pub no_local_internal: bool,
    pub no_local_external: bool,
}

/// One generated chain. Its rules are kept as one newline-separated string: a large cluster has
/// hundreds of thousands of rules, and one allocation per rule would double the cache's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// `-A NAME ...` lines joined by `\n`, without a trailing newline.
    pub rules: String,
    pub len: usize,
}

impl Chain {
    fn new(name: String, rules: Vec<String>) -> Chain {
        Chain {
            name,
            len: rules.len(),
            rules: rules.join("\n"),
        }
    }
}

/// kube-proxy's probability for the i-th of n remaining endpoints, with the same precision.
fn probability(remaining: usize) -> String {
    format!("{:.10}", 1.0 / remaining as f64)
}

fn host(ip: &IpAddr) -> String {
    ip.to_string()
}

/// Renders one Service port for `cfg.family`. Returns `None` when the port has no cluster IP of
/// that family (the other family's proxier handles it).
pub fn render_port(ps: &PortState, node: &NodeInfo, cfg: &RenderConfig) -> Option<PortRules> {
    let sp = &*ps.port;
    let family = cfg.family;
    let view = FamilyView::of(ps, family)?;
    let sets = categorize_endpoints(&view.endpoints, sp, &node.name, node.zone.as_deref());
    let PortPolicy {
        externally_accessible,
        has_endpoints,
        has_internal,
        has_external,
        internal_local,
        external_local: external_policy_local,
        uses_firewall: uses_fw,
    } = PortPolicy::decide(sp, &view, &sets);
    let cluster_ip = view.cluster_ip;
    let (external_ips, lb_ips, source_ranges) = (&view.external_ips, &view.lb_ips, &view.source_ranges);

    let name = &sp.name;
    let spn = name.to_string();
    let proto = name.protocol.as_str();
    let proto_match = format!("-m {proto} -p {proto}");
    let svc_chain = names::svc_chain(name);
    let svl_chain = names::svl_chain(name);
    let ext_chain = names::ext_chain(name);
    let fw_chain = names::fw_chain(name);
    let internal_chain = if internal_local { &svl_chain } else { &svc_chain };
    let external_policy_chain = if external_policy_local { &svl_chain } else { &svc_chain };
    let lb_chain = if uses_fw { &fw_chain } else { &ext_chain };

    let (internal_filter, external_filter) = if !has_endpoints {
        let c = quote(&format!("{spn} has no endpoints"));
        ((c.clone(), "REJECT"), (c, "REJECT"))
    } else {
        let c = quote(&format!("{spn} has no local endpoints"));
        ((c.clone(), "DROP"), (c, "DROP"))
    };

    let mut r = PortRules {
        no_local_internal: has_endpoints && !has_internal,
        no_local_external: has_endpoints && externally_accessible && !has_external,
        ..PortRules::default()
    };
    let port = sp.port;
    let cluster = host(&cluster_ip);

    // Cluster IP: capture, or reject/drop in the filter table.
    let cluster_comment = quote(&format!("{spn} cluster IP"));
    if has_internal {
        r.nat_services.push(format!(
            "-A {} -m comment --comment {cluster_comment} {proto_match} -d {cluster} --dport {port} -j {internal_chain}",
            names::SERVICES
        ));
    } else {
        let (comment, target) = &internal_filter;
        r.filter.push(format!(
            "-A {} -m comment --comment {comment} {proto_match} -d {cluster} --dport {port} -j {target}",
            names::SERVICES
        ));
    }

    for ip in external_ips {
        let ip = host(ip);
        if has_endpoints {
            r.nat_services.push(format!(
                "-A {} -m comment --comment {} {proto_match} -d {ip} --dport {port} -j {ext_chain}",
                names::SERVICES,
                quote(&format!("{spn} external IP"))
            ));
        }
        if !has_external {
            let (comment, target) = &external_filter;
            r.filter.push(format!(
                "-A {} -m comment --comment {comment} {proto_match} -d {ip} --dport {port} -j {target}",
                names::EXTERNAL_SERVICES
            ));
        }
    }

    for ip in lb_ips {
        let ip = host(ip);
        if has_endpoints {
            r.nat_services.push(format!(
                "-A {} -m comment --comment {} {proto_match} -d {ip} --dport {port} -j {lb_chain}",
                names::SERVICES,
                quote(&format!("{spn} loadbalancer IP"))
            ));
        }
        if uses_fw {
            r.filter.push(format!(
                "-A {} -m comment --comment {} {proto_match} -d {ip} --dport {port} -j DROP",
                names::FIREWALL,
                quote(&format!("{spn} traffic not accepted by {fw_chain}"))
            ));
        }
        if !has_external {
            let (comment, target) = &external_filter;
            r.filter.push(format!(
                "-A {} -m comment --comment {comment} {proto_match} -d {ip} --dport {port} -j {target}",
                names::EXTERNAL_SERVICES
            ));
        }
    }

    if let Some(node_port) = sp.node_port {
        if has_endpoints && cfg.localhost_nodeports && cfg.nfacct && cfg.family == IpFamily::V4 {
            // Counted apart, so operators see whether anything relies on localhost NodePorts.
            r.nat_nodeports.push(format!(
                "-A {} -m comment --comment {} {proto_match} -d 127.0.0.0/8 --dport {node_port} -m nfacct --nfacct-name {} -j {ext_chain}",
                names::NODEPORTS,
                quote(&spn),
                crate::dataplane::nfacct::LOCALHOST_NODEPORTS_ACCEPTED
            ));
        }
        if has_endpoints {
            r.nat_nodeports.push(format!(
                "-A {} -m comment --comment {} {proto_match} --dport {node_port} -j {ext_chain}",
                names::NODEPORTS,
                quote(&spn)
            ));
        }
        if !has_external {
            let (comment, target) = &external_filter;
            r.filter.push(format!(
                "-A {} -m comment --comment {comment} -m addrtype --dst-type LOCAL {proto_match} --dport {node_port} -j {target}",
                names::EXTERNAL_SERVICES
            ));
        }
    }

    if let Some(hc) = sp.health_check_node_port {
        r.filter.push(format!(
            "-A {} -m comment --comment {} -m tcp -p tcp --dport {hc} -j ACCEPT",
            names::NODEPORTS,
            quote(&format!("{spn} health check node port"))
        ));
    }

    // Per-port chains.
    let mut svc_rules = Vec::new();
    if has_internal {
        let args = format!("-m comment --comment {cluster_comment} {proto_match} -d {cluster} --dport {port}");
        if cfg.masquerade_all {
            svc_rules.push(format!("-A {internal_chain} {args} -j {}", names::MARK_MASQ));
        } else if let Some(not_local) = cfg.local_detector.if_not_local() {
            // Off-cluster sources reaching a ClusterIP (a static route to the service range)
            // may bounce to another node: masquerade so replies come back through us.
            svc_rules.push(format!(
                "-A {internal_chain} {args} {not_local} -j {}",
                names::MARK_MASQ
            ));
        }
    }

    let uses_ext_chain = has_endpoints && externally_accessible;
    if uses_ext_chain {
        let mut rules = Vec::new();
        if !external_policy_local {
            rules.push(format!(
                "-A {ext_chain} -m comment --comment {} -j {}",
                quote(&format!("masquerade traffic for {spn} external destinations")),
                names::MARK_MASQ
            ));
        } else {
            // Pods reaching an external destination of their own cluster behave as if the
            // traffic went out to a load balancer and came back: no source preservation needed.
            if let Some(local) = cfg.local_detector.if_local() {
                rules.push(format!(
                    "-A {ext_chain} -m comment --comment {} {local} -j {svc_chain}",
                    quote(&format!("pod traffic for {spn} external destinations"))
                ));
            }
            // The node's own traffic has a local address as source: masquerade it and let it
            // use every endpoint.
            rules.push(format!(
                "-A {ext_chain} -m comment --comment {} -m addrtype --src-type LOCAL -j {}",
                quote(&format!("masquerade LOCAL traffic for {spn} external destinations")),
                names::MARK_MASQ
            ));
            rules.push(format!(
                "-A {ext_chain} -m comment --comment {} -m addrtype --src-type LOCAL -j {svc_chain}",
                quote(&format!("route LOCAL traffic for {spn} external destinations"))
            ));
        }
        if has_external {
            rules.push(format!("-A {ext_chain} -j {external_policy_chain}"));
        }
        r.nat_chains.push(Chain::new(ext_chain.clone(), rules));
    }

    if uses_fw {
        let comment = quote(&format!("{spn} loadbalancer IP"));
        let mut rules = Vec::new();
        let mut allow_from_node = false;
        for net in source_ranges {
            rules.push(format!(
                "-A {fw_chain} -m comment --comment {comment} -s {net} -j {ext_chain}"
            ));
            allow_from_node |= node.addresses.iter().any(|a| net.contains(a));
        }
        if allow_from_node {
            // A node reaching its own LB VIP loops back with the VIP as source.
            for ip in lb_ips {
                rules.push(format!(
                    "-A {fw_chain} -m comment --comment {comment} -s {} -j {ext_chain}",
                    host(ip)
                ));
            }
        }
        rules.push(format!(
            "-A {fw_chain} -m comment --comment {}",
            quote(&format!(
                "other traffic to {spn} will be dropped by {}",
                names::FIREWALL
            ))
        ));
        r.nat_chains.push(Chain::new(fw_chain.clone(), rules));
    }

    let uses_cluster_chain = !sets.cluster.is_empty() && uses_cluster_endpoints(sp);
    let uses_local_chain = !sets.local.is_empty() && uses_local_endpoints(sp);
    // The masquerade rule belongs at the top of whichever chain internal traffic enters.
    let (mut cluster_rules, mut local_rules) = if sp.internal_policy_local {
        (Vec::new(), svc_rules)
    } else {
        (svc_rules, Vec::new())
    };
    if uses_cluster_chain {
        let mut rules = std::mem::take(&mut cluster_rules);
        write_balancing(&mut rules, &svc_chain, &spn, sp, &sets.cluster, cfg.endpoint_comments);
        r.nat_chains.push(Chain::new(svc_chain.clone(), rules));
    }
    if uses_local_chain {
        let mut rules = std::mem::take(&mut local_rules);
        write_balancing(&mut rules, &svl_chain, &spn, sp, &sets.local, cfg.endpoint_comments);
        r.nat_chains.push(Chain::new(svl_chain.clone(), rules));
    }

    for ep in &sets.all_reachable {
        let chain = names::sep_chain(name, ep);
        let comment = if cfg.endpoint_comments {
            format!(" -m comment --comment {}", quote(&spn))
        } else {
            String::new()
        };
        let mut rules = vec![format!(
            "-A {chain}{comment} -s {} -j {}",
            host(&ep.ip),
            names::MARK_MASQ
        )];
        let affinity = if sp.affinity_timeout.is_some() {
            format!(" -m recent --name {chain} --mask {} --rsource --set", full_mask(family))
        } else {
            String::new()
        };
        rules.push(format!(
            "-A {chain}{comment}{affinity} {proto_match} -j DNAT --to-destination {}",
            ep.addr_string()
        ));
        r.nat_chains.push(Chain::new(chain, rules));
    }
    Some(r)
}

fn full_mask(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "255.255.255.255",
        IpFamily::V6 => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    }
}

/// Affinity checks first, then the probability ladder: endpoint i of n matches with 1/(n-i),
/// which gives every endpoint the same overall chance.
fn write_balancing(
    rules: &mut Vec<String>,
    chain: &str,
    spn: &str,
    sp: &crate::model::ServicePort,
    endpoints: &[&Endpoint],
    comments: bool,
) {
    let family = IpFamily::of(&endpoints[0].ip);
    if let Some(timeout) = sp.affinity_timeout {
        for ep in endpoints {
            let sep = names::sep_chain(&sp.name, ep);
            rules.push(format!(
                "-A {chain} -m comment --comment {} -m recent --name {sep} --mask {} --rsource --rcheck --seconds {timeout} --reap -j {sep}",
                quote(spn),
                full_mask(family)
            ));
        }
    }
    let n = endpoints.len();
    for (i, ep) in endpoints.iter().enumerate() {
        let sep = names::sep_chain(&sp.name, ep);
        let comment = if comments {
            format!(
                " -m comment --comment {}",
                quote(&format!("{spn} -> {}", ep.addr_string()))
            )
        } else {
            String::new()
        };
        if i + 1 < n {
            rules.push(format!(
                "-A {chain}{comment} -m statistic --mode random --probability {} -j {sep}",
                probability(n - i)
            ));
        } else {
            rules.push(format!("-A {chain}{comment} -j {sep}"));
        }
    }
}

/// Rules that do not depend on any Service: masquerade plumbing and forwarding acceptance.
pub fn render_fixed(cfg: &RenderConfig) -> (Vec<String>, Vec<String>) {
    let mark = cfg.mark();
    let mut filter = Vec::new();
    if !cfg.conntrack_tcp_liberal {
        let count = if cfg.nfacct {
            format!(
                " -m nfacct --nfacct-name {}",
                crate::dataplane::nfacct::CT_STATE_INVALID_DROPPED
            )
        } else {
            String::new()
        };
        filter.push(format!(
            "-A {} -m conntrack --ctstate INVALID{count} -j DROP",
            names::FORWARD
        ));
    }
    if cfg.localhost_nodeports {
        // route_localnet lets 127.0.0.0/8 be routed; only DNATed NodePort traffic may use it.
        filter.push(format!(
            "-A {} -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
            names::FIREWALL
        ));
    }
    filter.extend([
        format!(
            "-A {} -m comment --comment \"kproxy forwarding rules\" -m mark --mark {mark} -j ACCEPT",
            names::FORWARD
        ),
        format!(
            "-A {} -m comment --comment \"kproxy forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            names::FORWARD
        ),
    ]);
    let nat = vec![
        format!("-A {} -m mark ! --mark {mark} -j RETURN", names::POSTROUTING),
        format!(
            "-A {} -j MARK --xor-mark {:#x}",
            names::POSTROUTING,
            cfg.masquerade_mark
        ),
        format!(
            "-A {} -m comment --comment \"kproxy service traffic requiring SNAT\" -j MASQUERADE --random-fully",
            names::POSTROUTING
        ),
        format!("-A {} -j MARK --or-mark {:#x}", names::MARK_MASQ, cfg.masquerade_mark),
    ];
    (filter, nat)
}

/// The rule(s) that must end nat KPROXY-SERVICES: hand everything addressed to the node to
/// KPROXY-NODEPORTS.
pub fn render_nodeport_jump(cfg: &RenderConfig) -> Vec<String> {
    let comment = "\"kproxy service nodeports; NOTE: this must be the last rule in this chain\"";
    match &cfg.nodeports {
        NodePortMatch::AllLocal => {
            // NodePorts on loopback need route_localnet (iptables.localhostNodePorts, on by
            // default as in kube-proxy); without it they never work, so they are not matched.
            let not_loopback = match cfg.family {
                IpFamily::V4 if cfg.localhost_nodeports => "",
                IpFamily::V4 => " ! -d 127.0.0.0/8",
                IpFamily::V6 => " ! -d ::1/128",
            };
            vec![format!(
                "-A {} -m comment --comment {comment} -m addrtype --dst-type LOCAL{not_loopback} -j {}",
                names::SERVICES,
                names::NODEPORTS
            )]
        }
        NodePortMatch::Addresses(ips) => ips
            .iter()
            .filter(|ip| IpFamily::of(ip) == cfg.family)
            .map(|ip| {
                format!(
                    "-A {} -m comment --comment {comment} -d {ip} -j {}",
                    names::SERVICES,
                    names::NODEPORTS
                )
            })
            .collect(),
    }
}
