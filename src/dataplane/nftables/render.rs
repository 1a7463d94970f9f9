//! Desired state to `nft` commands, with upstream kube-proxy's nftables layout. Pure.
//!
//! Each Service port renders to a [`PortRules`] value: the chains it owns, the affinity sets it
//! owns, and the elements it adds to the shared verdict maps. The planner turns those into one
//! `nft -f` transaction; nothing here knows whether a sync is full or partial.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::names;
use crate::dataplane::iptables::render::{LocalDetector, NodePortMatch, RenderConfig};
use crate::dataplane::port_policy::{FamilyView, PortPolicy};
use crate::model::topology::{categorize_endpoints, uses_cluster_endpoints, uses_local_endpoints};
use crate::model::{Endpoint, IpFamily, NodeInfo, PortState, ServicePort};

/// The nft words that differ between the two families.
#[derive(Debug, Clone, Copy)]
pub struct Words {
    /// Table family: `ip` or `ip6`.
    pub family: &'static str,
    /// Address type in set declarations.
    pub addr_type: &'static str,
    /// Payload selector for addresses (`ip saddr`, `ip6 saddr`).
    pub sel: &'static str,
    pub loopback: &'static str,
}

pub fn words(family: IpFamily) -> Words {
    match family {
        IpFamily::V4 => Words {
            family: "ip",
            addr_type: "ipv4_addr",
            sel: "ip",
            loopback: "127.0.0.0/8",
        },
        IpFamily::V6 => Words {
            family: "ip6",
            addr_type: "ipv6_addr",
            sel: "ip6",
            loopback: "::1",
        },
    }
}

/// One element of a shared verdict map, owned by one Service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Element {
    pub map: &'static str,
    /// The key as nft writes it (`10.96.0.10 . tcp . 80`).
    pub key: String,
    /// The verdict (`goto service-…`, `drop`).
    pub value: String,
}

/// One chain owned by a Service port, with its rules (statements only, without `add rule`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub rules: Vec<String>,
}

/// A per-endpoint session-affinity set: the client addresses recently sent to that endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffinitySet {
    pub name: String,
    pub timeout: u32,
}

/// What one Service port contributes to the table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortRules {
    pub chains: Vec<Chain>,
    pub sets: Vec<AffinitySet>,
    pub elements: Vec<Element>,
    /// Addresses of the endpoints this port can DNAT to, for the shared hairpin set.
    pub hairpin: Vec<IpAddr>,
    pub no_local_internal: bool,
    pub no_local_external: bool,
}

fn if_local(d: &LocalDetector, w: Words, negate: bool) -> Option<String> {
    let op = if negate { "!= " } else { "" };
    match d {
        LocalDetector::None => None,
        LocalDetector::Cidr(net) => Some(format!("{} saddr {op}{net}", w.sel)),
        LocalDetector::Bridge(br) => Some(format!("iifname {op}\"{br}\"")),
        LocalDetector::InterfacePrefix(p) => Some(format!("iifname {op}\"{p}*\"")),
    }
}

/// `ip:port` as `dnat to` wants it.
fn dnat_target(ep: &Endpoint) -> String {
    match ep.ip {
        IpAddr::V4(ip) => format!("{ip}:{}", ep.port),
        IpAddr::V6(ip) => format!("[{ip}]:{}", ep.port),
    }
}

fn svc_key(ip: &IpAddr, sp: &ServicePort, port: u16) -> String {
    format!("{ip} . {} . {port}", sp.name.protocol)
}

/// Renders one Service port for `cfg.family`; `None` when it has no cluster IP of that family.
/// The decisions (which chain, reject or drop, masquerade or not) are the iptables mode's, so
/// both modes treat every Service alike.
pub fn render_port(ps: &PortState, node: &NodeInfo, cfg: &RenderConfig) -> Option<PortRules> {
    let sp = &*ps.port;
    let family = cfg.family;
    let w = words(family);
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
    let proto = name.protocol.as_str();
    let svc_chain = names::service_chain(name);
    let local_chain = names::local_chain(name);
    let ext_chain = names::external_chain(name);
    let fw_chain = names::firewall_chain(name);
    let internal_chain = if internal_local { &local_chain } else { &svc_chain };
    let external_policy_chain = if external_policy_local {
        &local_chain
    } else {
        &svc_chain
    };
    // Without any endpoint new connections are refused; with endpoints elsewhere only (Local
    // policy) they are dropped, so a load balancer's health check moves traffic away.
    let refuse = if has_endpoints {
        "drop".to_string()
    } else {
        format!("goto {}", names::REJECT_CHAIN)
    };

    let mut r = PortRules {
        no_local_internal: has_endpoints && !has_internal,
        no_local_external: has_endpoints && externally_accessible && !has_external,
        ..PortRules::default()
    };
    let port = sp.port;
    let element = |map, key: String, value: String| Element { map, key, value };

    let cluster_key = svc_key(&cluster_ip, sp, port);
    if has_internal {
        r.elements.push(element(
            names::SERVICE_IPS,
            cluster_key.clone(),
            format!("goto {internal_chain}"),
        ));
    } else {
        r.elements
            .push(element(names::NO_ENDPOINT_SERVICES, cluster_key, refuse.clone()));
    }
    for ip in external_ips.iter().chain(lb_ips.iter()) {
        let key = svc_key(ip, sp, port);
        if has_endpoints {
            r.elements
                .push(element(names::SERVICE_IPS, key.clone(), format!("goto {ext_chain}")));
        }
        if !has_external {
            r.elements
                .push(element(names::NO_ENDPOINT_SERVICES, key, refuse.clone()));
        }
    }
    if uses_fw {
        for ip in lb_ips {
            r.elements.push(element(
                names::FIREWALL_IPS,
                svc_key(ip, sp, port),
                format!("goto {fw_chain}"),
            ));
        }
    }
    if let Some(node_port) = sp.node_port {
        let key = format!("{proto} . {node_port}");
        if has_endpoints {
            r.elements.push(element(
                names::SERVICE_NODEPORTS,
                key.clone(),
                format!("goto {ext_chain}"),
            ));
        }
        if !has_external {
            r.elements.push(element(names::NO_ENDPOINT_NODEPORTS, key, refuse));
        }
    }

    // The masquerade rule for internal traffic, at the top of whichever chain it enters.
    let mut masq_rules = Vec::new();
    if has_internal {
        let dest = format!("{} daddr {cluster_ip} {proto} dport {port}", w.sel);
        if cfg.masquerade_all {
            masq_rules.push(format!("{dest} jump {}", names::MARK_MASQ));
        } else if let Some(not_local) = if_local(&cfg.local_detector, w, true) {
            // Off-cluster sources reaching a ClusterIP (a static route to the service range)
            // may bounce to another node: masquerade so replies come back through us.
            masq_rules.push(format!("{dest} {not_local} jump {}", names::MARK_MASQ));
        }
    }

    if has_endpoints && externally_accessible {
        let mut rules = Vec::new();
        if !external_policy_local {
            rules.push(format!("jump {}", names::MARK_MASQ));
        } else {
            // Pods reaching an external destination of their own cluster behave as if the
            // traffic went out to a load balancer and came back: no source preservation needed.
            if let Some(local) = if_local(&cfg.local_detector, w, false) {
                rules.push(format!("{local} goto {svc_chain}"));
            }
            // The node's own traffic has a local address as source: masquerade it and let it
            // use every endpoint.
            rules.push(format!("fib saddr type local jump {}", names::MARK_MASQ));
            rules.push(format!("fib saddr type local goto {svc_chain}"));
        }
        if has_external {
            rules.push(format!("goto {external_policy_chain}"));
        }
        r.chains.push(Chain {
            name: ext_chain.clone(),
            rules,
        });
    }

    if uses_fw {
        let mut rules: Vec<String> = source_ranges
            .iter()
            .map(|net| format!("{} saddr {net} return", w.sel))
            .collect();
        if source_ranges
            .iter()
            .any(|net| node.addresses.iter().any(|a| net.contains(a)))
        {
            // A node reaching its own LB VIP loops back with the VIP as source.
            rules.extend(lb_ips.iter().map(|ip| format!("{} saddr {ip} return", w.sel)));
        }
        rules.push("drop".into());
        r.chains.push(Chain {
            name: fw_chain.clone(),
            rules,
        });
    }

    let (mut cluster_first, mut local_first) = if sp.internal_policy_local {
        (Vec::new(), masq_rules)
    } else {
        (masq_rules, Vec::new())
    };
    if !sets.cluster.is_empty() && uses_cluster_endpoints(sp) {
        let mut rules = std::mem::take(&mut cluster_first);
        write_balancing(&mut rules, sp, &sets.cluster, w);
        r.chains.push(Chain {
            name: svc_chain.clone(),
            rules,
        });
    }
    if !sets.local.is_empty() && uses_local_endpoints(sp) {
        let mut rules = std::mem::take(&mut local_first);
        write_balancing(&mut rules, sp, &sets.local, w);
        r.chains.push(Chain {
            name: local_chain.clone(),
            rules,
        });
    }

    r.hairpin = sets.all_reachable.iter().map(|ep| ep.ip).collect();
    // Endpoint chains only where session affinity needs them: they record the client in the
    // endpoint's affinity set before DNAT. Without affinity the Service chain DNATs directly.
    if let Some(timeout) = sp.affinity_timeout {
        for ep in &sets.all_reachable {
            let set = names::affinity_set(name, ep);
            let rules = vec![
                format!("update @{set} {{ {} saddr }}", w.sel),
                format!("meta l4proto {proto} dnat to {}", dnat_target(ep)),
            ];
            r.sets.push(AffinitySet { name: set, timeout });
            r.chains.push(Chain {
                name: names::endpoint_chain(name, ep),
                rules,
            });
        }
    }
    Some(r)
}

/// With session affinity: affinity lookups first (a client seen recently goes where it went
/// before), then an even random pick among the endpoint chains. Without: an even random pick
/// straight to `dnat`.
fn write_balancing(rules: &mut Vec<String>, sp: &ServicePort, endpoints: &[&Endpoint], w: Words) {
    let proto = sp.name.protocol.as_str();
    if sp.affinity_timeout.is_none() {
        // Rule i takes the connection with probability 1/(N-i), the last one always: an even
        // pick, as iptables mode's statistic rules make it. No set, because each anonymous set
        // costs the kernel a scan of every set in the table when it is created (5000 Services'
        // numgen maps took 6 s to load, these rules 3 s).
        let n = endpoints.len();
        for (i, ep) in endpoints.iter().enumerate() {
            let pick = if i + 1 < n {
                format!("numgen random mod {} 0 ", n - i)
            } else {
                String::new()
            };
            rules.push(format!("meta l4proto {proto} {pick}dnat to {}", dnat_target(ep)));
        }
        return;
    }
    for ep in endpoints {
        rules.push(format!(
            "{} saddr @{} goto {}",
            w.sel,
            names::affinity_set(&sp.name, ep),
            names::endpoint_chain(&sp.name, ep)
        ));
    }
    if let [only] = endpoints {
        rules.push(format!("goto {}", names::endpoint_chain(&sp.name, only)));
        return;
    }
    let mut rule = format!("numgen random mod {} vmap {{ ", endpoints.len());
    for (i, ep) in endpoints.iter().enumerate() {
        if i > 0 {
            rule.push_str(", ");
        }
        let _ = write!(rule, "{i} : goto {}", names::endpoint_chain(&sp.name, ep));
    }
    rule.push_str(" }");
    rules.push(rule);
}

/// A base chain: its name and the `{ type … hook … }` specification.
const BASE_CHAINS: &[(&str, &str)] = &[
    (names::NAT_PREROUTING, "type nat hook prerouting priority dstnat"),
    (names::NAT_OUTPUT, "type nat hook output priority -100"),
    (names::NAT_POSTROUTING, "type nat hook postrouting priority srcnat"),
    // Before DNAT, so the firewall sees the load balancer IP.
    (names::FILTER_PREROUTING, "type filter hook prerouting priority -110"),
    (names::FILTER_INPUT, "type filter hook input priority -110"),
    (names::FILTER_FORWARD, "type filter hook forward priority -110"),
    (names::FILTER_OUTPUT, "type filter hook output priority -110"),
];

/// Every chain and map the table has regardless of Services, declared (created if missing)
/// and then flushed: the first commands of a full sync.
pub fn render_fixed_declarations(cfg: &RenderConfig, out: &mut String) {
    let w = words(cfg.family);
    let t = format!("{} {}", w.family, names::TABLE);
    let _ = writeln!(out, "add table {t}");
    for (chain, spec) in BASE_CHAINS {
        let _ = writeln!(out, "add chain {t} {chain} {{ {spec}; policy accept; }}");
    }
    for chain in names::REGULAR_CHAINS {
        let _ = writeln!(out, "add chain {t} {chain}");
    }
    let svc = format!("{} . inet_proto . inet_service", w.addr_type);
    for (map, key) in [
        (names::SERVICE_IPS, svc.as_str()),
        (names::SERVICE_NODEPORTS, "inet_proto . inet_service"),
        (names::NO_ENDPOINT_SERVICES, svc.as_str()),
        (names::NO_ENDPOINT_NODEPORTS, "inet_proto . inet_service"),
        (names::FIREWALL_IPS, svc.as_str()),
    ] {
        let _ = writeln!(out, "add map {t} {map} {{ type {key} : verdict; }}");
        let _ = writeln!(out, "flush map {t} {map}");
    }
    let _ = writeln!(
        out,
        "add set {t} {} {{ type {} . {}; }}",
        names::HAIRPIN,
        w.addr_type,
        w.addr_type
    );
    let _ = writeln!(out, "flush set {t} {}", names::HAIRPIN);
    for chain in names::fixed_chains() {
        let _ = writeln!(out, "flush chain {t} {chain}");
    }
}

/// The rules of the fixed chains, as (chain, statement) pairs.
pub fn render_fixed_rules(cfg: &RenderConfig) -> Vec<(&'static str, String)> {
    let w = words(cfg.family);
    let sel = w.sel;
    let m = cfg.masquerade_mark;
    let dst = format!("{sel} daddr . meta l4proto . th dport");
    let nodeport_dest = match &cfg.nodeports {
        // NodePorts on loopback would need route_localnet, which exposes 127.0.0.1 to the
        // network (CVE-2020-8558): kproxy does not accept them.
        NodePortMatch::AllLocal => Some(format!("fib daddr type local {sel} daddr != {}", w.loopback)),
        NodePortMatch::Addresses(ips) => {
            let ips: Vec<String> = ips
                .iter()
                .filter(|ip| IpFamily::of(ip) == cfg.family)
                .map(IpAddr::to_string)
                .collect();
            (!ips.is_empty()).then(|| format!("{sel} daddr {{ {} }}", ips.join(", ")))
        }
    };
    let mut rules = vec![
        (names::NAT_PREROUTING, format!("jump {}", names::SERVICES)),
        (names::NAT_OUTPUT, format!("jump {}", names::SERVICES)),
        // After DNAT: an endpoint reaching itself through its Service (hairpin).
        (
            names::NAT_POSTROUTING,
            format!(
                "ct status dnat {sel} saddr . {sel} daddr @{} jump {}",
                names::HAIRPIN,
                names::MARK_MASQ
            ),
        ),
        (names::NAT_POSTROUTING, format!("jump {}", names::MASQUERADING)),
        (
            names::FILTER_PREROUTING,
            format!("ct state new jump {}", names::FIREWALL_CHECK),
        ),
        (
            names::FILTER_INPUT,
            format!("ct state new jump {}", names::NODEPORT_ENDPOINTS_CHECK),
        ),
        (
            names::FILTER_INPUT,
            format!("ct state new jump {}", names::SERVICE_ENDPOINTS_CHECK),
        ),
        (names::FILTER_FORWARD, "ct state invalid drop".into()),
        (
            names::FILTER_FORWARD,
            format!("ct state new jump {}", names::SERVICE_ENDPOINTS_CHECK),
        ),
        (
            names::FILTER_FORWARD,
            format!("ct state new jump {}", names::NODEPORT_ENDPOINTS_CHECK),
        ),
        (
            names::FILTER_OUTPUT,
            format!("ct state new jump {}", names::SERVICE_ENDPOINTS_CHECK),
        ),
        (
            names::FILTER_OUTPUT,
            format!("ct state new jump {}", names::FIREWALL_CHECK),
        ),
        (names::MASQUERADING, format!("meta mark & {m:#x} == 0 return")),
        (names::MASQUERADING, format!("meta mark set meta mark ^ {m:#x}")),
        (names::MASQUERADING, "masquerade fully-random".into()),
        (names::MARK_MASQ, format!("meta mark set meta mark | {m:#x}")),
        (names::SERVICES, format!("{dst} vmap @{}", names::SERVICE_IPS)),
        (
            names::SERVICE_ENDPOINTS_CHECK,
            format!("{dst} vmap @{}", names::NO_ENDPOINT_SERVICES),
        ),
        (names::FIREWALL_CHECK, format!("{dst} vmap @{}", names::FIREWALL_IPS)),
        (names::REJECT_CHAIN, "reject".into()),
    ];
    if let Some(dest) = nodeport_dest {
        rules.push((
            names::SERVICES,
            format!("{dest} meta l4proto . th dport vmap @{}", names::SERVICE_NODEPORTS),
        ));
        rules.push((
            names::NODEPORT_ENDPOINTS_CHECK,
            format!("{dest} meta l4proto . th dport vmap @{}", names::NO_ENDPOINT_NODEPORTS),
        ));
    }
    rules
}

/// The `add set` command of an affinity set.
pub fn set_declaration(t: &str, set: &AffinitySet, w: Words) -> String {
    format!(
        "add set {t} {} {{ type {}; flags dynamic,timeout; timeout {}s; }}",
        set.name, w.addr_type, set.timeout
    )
}
