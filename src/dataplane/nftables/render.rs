//! Desired state to nft rules, with upstream kube-proxy's nftables layout. Pure.
//!
//! Each Service port renders to a [`PortRules`] value: the chains it owns (their rules as
//! [`Rule`] values), the affinity sets it owns, and the elements it adds to the shared verdict
//! maps. The planner turns those into commands; nothing here knows whether a sync is full or
//! partial, or whether the commands reach the kernel over netlink or `nft -f` as text.

use std::net::IpAddr;

use ipnet::IpNet;

use super::names;
use super::names::{Bucket, MAX_BUCKET};
use super::netlink::{hook, BaseHook, Verdict};
use super::rule::{Field, Key, Rule, SetDecl, SetKind, Stmt, Value, CT_STATE_INVALID, CT_STATE_NEW};
use crate::dataplane::iptables::render::{LocalDetector, NodePortMatch, RenderConfig};
use crate::dataplane::port_policy::{FamilyView, PortPolicy};
use crate::model::topology::{categorize_endpoints, uses_cluster_endpoints, uses_local_endpoints};
use crate::model::{Endpoint, IpFamily, NodeInfo, PortState, Protocol, ServicePort};

/// The table family word: `ip` or `ip6`.
pub fn family_word(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

/// One element of a shared map or set, owned by one Service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Element {
    pub map: &'static str,
    pub key: Key,
    /// The verdict (`goto service-…`, `drop`) or endpoint (`10.244.1.2 . 8080`); `None` in a
    /// plain set.
    pub value: Option<Value>,
}

/// One chain owned by a Service port, with its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub rules: Vec<Rule>,
}

/// A per-endpoint session-affinity set: the client addresses recently sent to that endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffinitySet {
    pub name: String,
    pub timeout: u32,
}

impl AffinitySet {
    pub fn decl(&self) -> SetDecl {
        SetDecl {
            name: self.name.clone(),
            kind: SetKind::Affinity { timeout: self.timeout },
        }
    }
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

fn if_local(d: &LocalDetector, negate: bool) -> Option<Stmt> {
    match d {
        LocalDetector::None => None,
        LocalDetector::Cidr(net) => Some(Stmt::Addr {
            field: Field::Saddr,
            negate,
            net: *net,
        }),
        LocalDetector::Bridge(br) => Some(Stmt::Iifname {
            negate,
            name: br.clone(),
        }),
        LocalDetector::InterfacePrefix(p) => Some(Stmt::Iifname {
            negate,
            name: format!("{p}*"),
        }),
    }
}

fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

fn goto(chain: &str) -> Stmt {
    Stmt::Verdict(Verdict::Goto(chain.to_string()))
}

fn jump(chain: &str) -> Stmt {
    Stmt::Verdict(Verdict::Jump(chain.to_string()))
}

fn svc_key(ip: &IpAddr, sp: &ServicePort, port: u16) -> Key {
    Key::AddrPort(*ip, sp.name.protocol, port)
}

/// Renders one Service port for `cfg.family`; `None` when it has no cluster IP of that family.
/// The decisions (which chain, reject or drop, masquerade or not) are the iptables mode's, so
/// both modes treat every Service alike.
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
    let proto = name.protocol;
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
    let mut r = PortRules {
        no_local_internal: has_endpoints && !has_internal,
        no_local_external: has_endpoints && externally_accessible && !has_external,
        ..PortRules::default()
    };
    let port = sp.port;
    let element = |map, key: Key, value: Verdict| Element {
        map,
        key,
        value: Some(Value::Verdict(value)),
    };
    // Every address and port the Service is reached by, and its NodePort: the keys its
    // endpoint slots are found by, whichever of its chains DNATs.
    let entries = Entries {
        proto,
        port,
        addrs: std::iter::once(cluster_ip)
            .chain(external_ips.iter().map(|ip| **ip))
            .chain(lb_ips.iter().map(|ip| **ip))
            .collect(),
        node_port: sp.node_port,
    };

    // Without session affinity and with few enough endpoints, the endpoints are map elements
    // and the Service needs no chain of its own: its addresses join the sets that dispatch to
    // the fixed chains of its traffic policies. Otherwise it keeps upstream's per-Service chains.
    let fixed = sp.affinity_timeout.is_none() && sets.cluster.len() <= MAX_BUCKET && sets.local.len() <= MAX_BUCKET;
    let no_endpoint = |by_port: bool| match (has_endpoints, by_port) {
        (true, false) => names::NO_ENDPOINT_DROP_IPS,
        (true, true) => names::NO_ENDPOINT_DROP_NODEPORTS,
        (false, false) => names::NO_ENDPOINT_REJECT_IPS,
        (false, true) => names::NO_ENDPOINT_REJECT_NODEPORTS,
    };
    let member = |map, key: Key| Element { map, key, value: None };
    let cluster_key = svc_key(&cluster_ip, sp, port);
    if !has_internal {
        r.elements.push(member(no_endpoint(false), cluster_key));
    } else if fixed {
        let set = if internal_local {
            names::SERVICE_LOCAL_IPS
        } else {
            names::SERVICE_CLUSTER_IPS
        };
        r.elements.push(member(set, cluster_key));
    } else {
        r.elements.push(element(
            names::SERVICE_IPS,
            cluster_key,
            Verdict::Goto(internal_chain.clone()),
        ));
    }
    let (ext_ips, ext_nodeports) = if external_policy_local {
        (names::EXTERNAL_LOCAL_IPS, names::EXTERNAL_LOCAL_NODEPORTS)
    } else {
        (names::EXTERNAL_CLUSTER_IPS, names::EXTERNAL_CLUSTER_NODEPORTS)
    };
    for ip in external_ips.iter().chain(lb_ips.iter()) {
        let key = svc_key(ip, sp, port);
        if has_endpoints && fixed {
            r.elements.push(member(ext_ips, key.clone()));
        } else if has_endpoints {
            r.elements.push(element(
                names::SERVICE_IPS,
                key.clone(),
                Verdict::Goto(ext_chain.clone()),
            ));
        }
        if !has_external {
            r.elements.push(member(no_endpoint(false), key));
        }
    }
    if uses_fw {
        for ip in lb_ips {
            r.elements.push(element(
                names::FIREWALL_IPS,
                svc_key(ip, sp, port),
                Verdict::Goto(fw_chain.clone()),
            ));
        }
    }
    if let Some(node_port) = sp.node_port {
        let key = Key::ProtoPort(proto, node_port);
        if has_endpoints && fixed {
            r.elements.push(member(ext_nodeports, key.clone()));
        } else if has_endpoints {
            r.elements.push(element(
                names::SERVICE_NODEPORTS,
                key.clone(),
                Verdict::Goto(ext_chain.clone()),
            ));
        }
        if !has_external {
            r.elements.push(member(no_endpoint(true), key));
        }
    }

    // The masquerade rule for internal traffic, at the top of whichever chain it enters.
    let mut masq_rules = Vec::new();
    if has_internal && !fixed {
        let dest = vec![
            Stmt::Addr {
                field: Field::Daddr,
                negate: false,
                net: host(cluster_ip),
            },
            Stmt::Dport { proto, port },
        ];
        if cfg.masquerade_all {
            let mut rule = dest;
            rule.push(jump(names::MARK_MASQ));
            masq_rules.push(Rule::new(rule));
        } else if let Some(not_local) = if_local(&cfg.local_detector, true) {
            // Off-cluster sources reaching a ClusterIP (a static route to the service range)
            // may bounce to another node: masquerade so replies come back through us.
            let mut rule = dest;
            rule.push(not_local);
            rule.push(jump(names::MARK_MASQ));
            masq_rules.push(Rule::new(rule));
        }
    }

    if has_endpoints && externally_accessible && !fixed {
        let mut rules = Vec::new();
        if !external_policy_local {
            rules.push(Rule::new(vec![jump(names::MARK_MASQ)]));
        } else {
            // Pods reaching an external destination of their own cluster behave as if the
            // traffic went out to a load balancer and came back: no source preservation needed.
            if let Some(local) = if_local(&cfg.local_detector, false) {
                rules.push(Rule::new(vec![local, goto(&svc_chain)]));
            }
            // The node's own traffic has a local address as source: masquerade it and let it
            // use every endpoint.
            rules.push(Rule::new(vec![Stmt::FibLocal(Field::Saddr), jump(names::MARK_MASQ)]));
            rules.push(Rule::new(vec![Stmt::FibLocal(Field::Saddr), goto(&svc_chain)]));
        }
        if has_external {
            rules.push(Rule::new(vec![goto(external_policy_chain)]));
        }
        r.chains.push(Chain {
            name: ext_chain.clone(),
            rules,
        });
    }

    if uses_fw {
        let saddr_return = |net: IpNet| {
            Rule::new(vec![
                Stmt::Addr {
                    field: Field::Saddr,
                    negate: false,
                    net,
                },
                Stmt::Verdict(Verdict::Return),
            ])
        };
        let mut rules: Vec<Rule> = source_ranges.iter().map(|net| saddr_return(**net)).collect();
        if source_ranges
            .iter()
            .any(|net| node.addresses.iter().any(|a| net.contains(a)))
        {
            // A node reaching its own LB VIP loops back with the VIP as source.
            rules.extend(lb_ips.iter().map(|ip| saddr_return(host(**ip))));
        }
        rules.push(Rule::new(vec![Stmt::Verdict(Verdict::Drop)]));
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
        balance(&mut r, &mut rules, sp, &sets.cluster, false, &entries);
        if !fixed {
            r.chains.push(Chain {
                name: svc_chain.clone(),
                rules,
            });
        }
    }
    if !sets.local.is_empty() && uses_local_endpoints(sp) {
        let mut rules = std::mem::take(&mut local_first);
        balance(&mut r, &mut rules, sp, &sets.local, true, &entries);
        if !fixed {
            r.chains.push(Chain {
                name: local_chain.clone(),
                rules,
            });
        }
    }

    r.hairpin = sets.all_reachable.iter().map(|ep| ep.ip).collect();
    // Endpoint chains only where session affinity needs them: they record the client in the
    // endpoint's affinity set before DNAT. Without affinity the Service chain DNATs directly.
    if let Some(timeout) = sp.affinity_timeout {
        for ep in &sets.all_reachable {
            let set = names::affinity_set(name, ep);
            let rules = vec![
                Rule::new(vec![Stmt::Update {
                    set: set.clone(),
                    key: Field::Saddr,
                }]),
                Rule::new(vec![Stmt::L4proto(proto), dnat(ep)]),
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

/// The keys a Service port is reached by.
struct Entries {
    proto: Protocol,
    port: u16,
    addrs: Vec<IpAddr>,
    node_port: Option<u16>,
}

/// The end of a Service (or local) chain: without session affinity and with at most
/// [`MAX_BUCKET`] endpoints, `goto cluster-dnat` (`local-dnat`), and the endpoints become
/// elements: each key of the Service joins the bucket set of its endpoint count, and its slots
/// map to the endpoints. An endpoint change is then a change of map elements without
/// verdicts, which the kernel commits without validating the table; a change of the endpoint
/// count moves the key to another bucket, also without a rule. Otherwise the chain keeps the
/// cascade of `dnat` rules ([`write_balancing`]).
fn balance(
    r: &mut PortRules,
    rules: &mut Vec<Rule>,
    sp: &ServicePort,
    endpoints: &[&Endpoint],
    local: bool,
    e: &Entries,
) {
    let n = endpoints.len();
    if sp.affinity_timeout.is_some() || n > MAX_BUCKET {
        write_balancing(rules, sp, endpoints);
        return;
    }
    let (bucket, np_bucket, chain, base) = if local {
        (
            Bucket::Local,
            Bucket::NodePortLocal,
            names::LOCAL_DNAT,
            names::LOCAL_SLOTS,
        )
    } else {
        (Bucket::Cluster, Bucket::NodePortCluster, names::CLUSTER_DNAT, 0)
    };
    rules.push(Rule::new(vec![goto(chain)]));
    let endpoint = |ep: &Endpoint| Some(Value::Endpoint(ep.ip, ep.port));
    for ip in &e.addrs {
        r.elements.push(Element {
            map: bucket.set(n),
            key: Key::AddrPort(*ip, e.proto, e.port),
            value: None,
        });
        for (i, ep) in endpoints.iter().enumerate() {
            r.elements.push(Element {
                map: names::service_endpoints(e.proto),
                key: Key::AddrPortSlot(*ip, e.proto, e.port, base + i as u32),
                value: endpoint(ep),
            });
        }
    }
    if let Some(np) = e.node_port {
        r.elements.push(Element {
            map: np_bucket.set(n),
            key: Key::ProtoPort(e.proto, np),
            value: None,
        });
        for (i, ep) in endpoints.iter().enumerate() {
            r.elements.push(Element {
                map: names::nodeport_endpoints(e.proto),
                key: Key::ProtoPortSlot(e.proto, np, base + i as u32),
                value: endpoint(ep),
            });
        }
    }
}

fn dnat(ep: &Endpoint) -> Stmt {
    Stmt::Dnat {
        addr: ep.ip,
        port: ep.port,
    }
}

/// An even random pick: rule i of N takes the connection with probability 1/(N-i), the last
/// one always, as iptables mode's statistic rules do. A cascade of rules rather than a numgen
/// map, because every anonymous map is a set the kernel creates (and scans the table's sets
/// for) when the rule is added.
fn pick(i: usize, n: usize) -> Option<Stmt> {
    (i + 1 < n).then(|| Stmt::Numgen {
        modulus: (n - i) as u32,
        value: 0,
    })
}

/// With session affinity: affinity lookups first (a client seen recently goes where it went
/// before), then an even random pick among the endpoint chains. Without: an even random pick
/// straight to `dnat`.
fn write_balancing(rules: &mut Vec<Rule>, sp: &ServicePort, endpoints: &[&Endpoint]) {
    let proto = sp.name.protocol;
    let n = endpoints.len();
    if sp.affinity_timeout.is_none() {
        for (i, ep) in endpoints.iter().enumerate() {
            let mut rule = vec![Stmt::L4proto(proto)];
            rule.extend(pick(i, n));
            rule.push(dnat(ep));
            rules.push(Rule::new(rule));
        }
        return;
    }
    for ep in endpoints {
        rules.push(Rule::new(vec![
            Stmt::InSet {
                key: vec![Field::Saddr],
                set: names::affinity_set(&sp.name, ep),
                negate: false,
            },
            goto(&names::endpoint_chain(&sp.name, ep)),
        ]));
    }
    for (i, ep) in endpoints.iter().enumerate() {
        let mut rule: Vec<Stmt> = pick(i, n).into_iter().collect();
        rule.push(goto(&names::endpoint_chain(&sp.name, ep)));
        rules.push(Rule::new(rule));
    }
}

/// The base chains: name and hook (`type nat hook prerouting priority dstnat; policy accept;`).
pub fn base_chains() -> [(&'static str, BaseHook); 7] {
    let h = |kind, hook, priority| BaseHook { kind, hook, priority };
    [
        (names::NAT_PREROUTING, h("nat", hook::PREROUTING, -100)),
        (names::NAT_OUTPUT, h("nat", hook::OUTPUT, -100)),
        (names::NAT_POSTROUTING, h("nat", hook::POSTROUTING, 100)),
        // Before DNAT, so the firewall sees the load balancer IP.
        (names::FILTER_PREROUTING, h("filter", hook::PREROUTING, -110)),
        (names::FILTER_INPUT, h("filter", hook::INPUT, -110)),
        (names::FILTER_FORWARD, h("filter", hook::FORWARD, -110)),
        (names::FILTER_OUTPUT, h("filter", hook::OUTPUT, -110)),
    ]
}

/// How nft writes a base chain's specification.
pub fn hook_text(h: &BaseHook) -> String {
    let hook = match h.hook {
        hook::PREROUTING => "prerouting",
        hook::INPUT => "input",
        hook::FORWARD => "forward",
        hook::OUTPUT => "output",
        _ => "postrouting",
    };
    format!("type {} hook {hook} priority {}; policy accept;", h.kind, h.priority)
}

/// The fixed maps and sets.
pub fn fixed_sets() -> Vec<SetDecl> {
    let d = |name: &str, kind| SetDecl {
        name: name.into(),
        kind,
    };
    vec![
        d(names::SERVICE_IPS, SetKind::AddrPortMap),
        d(names::SERVICE_NODEPORTS, SetKind::ProtoPortMap),
        d(names::SERVICE_CLUSTER_IPS, SetKind::AddrPortSet),
        d(names::SERVICE_LOCAL_IPS, SetKind::AddrPortSet),
        d(names::EXTERNAL_CLUSTER_IPS, SetKind::AddrPortSet),
        d(names::EXTERNAL_LOCAL_IPS, SetKind::AddrPortSet),
        d(names::EXTERNAL_CLUSTER_NODEPORTS, SetKind::ProtoPortSet),
        d(names::EXTERNAL_LOCAL_NODEPORTS, SetKind::ProtoPortSet),
        d(names::NO_ENDPOINT_REJECT_IPS, SetKind::AddrPortSet),
        d(names::NO_ENDPOINT_DROP_IPS, SetKind::AddrPortSet),
        d(names::NO_ENDPOINT_REJECT_NODEPORTS, SetKind::ProtoPortSet),
        d(names::NO_ENDPOINT_DROP_NODEPORTS, SetKind::ProtoPortSet),
        d(names::FIREWALL_IPS, SetKind::AddrPortMap),
        d(names::HAIRPIN, SetKind::AddrPair),
    ]
    .into_iter()
    .chain(names::PROTOCOLS.into_iter().flat_map(|p| {
        [
            d(names::service_endpoints(p), SetKind::EndpointMap(p)),
            d(names::nodeport_endpoints(p), SetKind::NodePortEndpointMap(p)),
        ]
    }))
    .chain(Bucket::ALL.into_iter().flat_map(|b| {
        let kind = match b {
            Bucket::Cluster | Bucket::Local => SetKind::AddrPortSet,
            Bucket::NodePortCluster | Bucket::NodePortLocal => SetKind::ProtoPortSet,
        };
        (1..=MAX_BUCKET).map(move |n| d(b.set(n), kind))
    }))
    .collect()
}

/// The bucket rules of `cluster-dnat` and `local-dnat`: per protocol and endpoint count,
/// `meta l4proto tcp ip daddr . meta l4proto . th dport @cluster-n3 dnat to ip daddr . meta
/// l4proto . th dport . numgen random mod 3 map @service-endpoints`, then the same by NodePort.
/// By address first: a NodePort packet's destination is a node address, never a Service's.
fn bucket_rules() -> Vec<(&'static str, Rule)> {
    let mut rules = Vec::new();
    let chains = [
        (names::CLUSTER_DNAT, Bucket::Cluster, Bucket::NodePortCluster, 0),
        (
            names::LOCAL_DNAT,
            Bucket::Local,
            Bucket::NodePortLocal,
            names::LOCAL_SLOTS,
        ),
    ];
    for (chain, by_addr, by_port, offset) in chains {
        for by_node_port in [false, true] {
            let (bucket, key, slot_key): (Bucket, &[Field], &[Field]) = if by_node_port {
                (by_port, &DST[1..], &[Field::ThDport])
            } else {
                (by_addr, &DST, &[Field::Daddr, Field::ThDport])
            };
            for proto in names::PROTOCOLS {
                let map = if by_node_port {
                    names::nodeport_endpoints(proto)
                } else {
                    names::service_endpoints(proto)
                };
                for n in 1..=MAX_BUCKET {
                    let mut slot = slot_key.to_vec();
                    slot.push(Field::Slot {
                        modulus: n as u32,
                        offset,
                    });
                    rules.push((
                        chain,
                        Rule::new(vec![
                            Stmt::L4proto(proto),
                            Stmt::InSet {
                                key: key.to_vec(),
                                set: bucket.set(n).into(),
                                negate: false,
                            },
                            Stmt::DnatMap {
                                key: slot,
                                map: map.into(),
                            },
                        ]),
                    ));
                }
            }
        }
    }
    rules
}

const DST: [Field; 3] = [Field::Daddr, Field::L4proto, Field::ThDport];

/// The fixed chains of the traffic policies ([`names::SERVICE_CLUSTER`] and the three others):
/// what upstream writes into each Service's own chains, written once. Entered only from the
/// dispatch sets, so they need not match the Service address again.
fn policy_rules(cfg: &RenderConfig) -> Vec<(&'static str, Rule)> {
    let r = Rule::new;
    let mut rules = Vec::new();
    // Internal traffic: off-cluster sources reaching a ClusterIP (a static route to the
    // Service range) may bounce to another node: masquerade so replies come back through us.
    let masq_internal = if cfg.masquerade_all {
        Some(r(vec![jump(names::MARK_MASQ)]))
    } else {
        if_local(&cfg.local_detector, true).map(|not_local| r(vec![not_local, jump(names::MARK_MASQ)]))
    };
    for (chain, dnat) in [
        (names::SERVICE_CLUSTER, names::CLUSTER_DNAT),
        (names::SERVICE_LOCAL, names::LOCAL_DNAT),
    ] {
        rules.extend(masq_internal.clone().map(|m| (chain, m)));
        rules.push((chain, r(vec![goto(dnat)])));
    }
    // External traffic, policy Cluster: always masqueraded.
    rules.push((names::EXTERNAL_CLUSTER, r(vec![jump(names::MARK_MASQ)])));
    rules.push((names::EXTERNAL_CLUSTER, r(vec![goto(names::CLUSTER_DNAT)])));
    // Policy Local: pods reaching an external destination of their own cluster behave as if
    // the traffic went out to a load balancer and came back (every endpoint, no masquerade);
    // the node's own traffic has a local source: masqueraded, every endpoint; the rest keeps
    // its source and goes to a node-local endpoint (none: no DNAT, the endpoint check drops it).
    if let Some(local) = if_local(&cfg.local_detector, false) {
        rules.push((names::EXTERNAL_LOCAL, r(vec![local, goto(names::CLUSTER_DNAT)])));
    }
    rules.push((
        names::EXTERNAL_LOCAL,
        r(vec![Stmt::FibLocal(Field::Saddr), jump(names::MARK_MASQ)]),
    ));
    rules.push((
        names::EXTERNAL_LOCAL,
        r(vec![Stmt::FibLocal(Field::Saddr), goto(names::CLUSTER_DNAT)]),
    ));
    rules.push((names::EXTERNAL_LOCAL, r(vec![goto(names::LOCAL_DNAT)])));
    rules
}

/// The rules of the fixed chains, as (chain, rule) pairs in chain order.
pub fn render_fixed_rules(cfg: &RenderConfig) -> Vec<(&'static str, Rule)> {
    let family = cfg.family;
    let m = cfg.masquerade_mark;
    let loopback: IpNet = match family {
        IpFamily::V4 => "127.0.0.0/8".parse().expect("loopback"),
        IpFamily::V6 => "::1/128".parse().expect("loopback"),
    };
    // NodePorts on loopback would need route_localnet, which exposes 127.0.0.1 to the network
    // (CVE-2020-8558): kproxy does not accept them.
    let nodeport_dests: Vec<Vec<Stmt>> = match &cfg.nodeports {
        NodePortMatch::AllLocal => vec![vec![
            Stmt::FibLocal(Field::Daddr),
            Stmt::Addr {
                field: Field::Daddr,
                negate: true,
                net: loopback,
            },
        ]],
        // One rule per address rather than an anonymous set: few addresses, no extra set.
        NodePortMatch::Addresses(ips) => ips
            .iter()
            .filter(|ip| IpFamily::of(ip) == family)
            .map(|ip| {
                vec![Stmt::Addr {
                    field: Field::Daddr,
                    negate: false,
                    net: host(*ip),
                }]
            })
            .collect(),
    };
    let vmap = |map: &str| Stmt::Vmap {
        key: DST.to_vec(),
        map: map.into(),
    };
    let r = Rule::new;
    let mut rules = vec![
        (names::NAT_PREROUTING, r(vec![jump(names::SERVICES)])),
        (names::NAT_OUTPUT, r(vec![jump(names::SERVICES)])),
        // After DNAT: an endpoint reaching itself through its Service (hairpin).
        (
            names::NAT_POSTROUTING,
            r(vec![
                Stmt::CtStatusDnat,
                Stmt::InSet {
                    key: vec![Field::Saddr, Field::Daddr],
                    set: names::HAIRPIN.into(),
                    negate: false,
                },
                jump(names::MARK_MASQ),
            ]),
        ),
        (names::NAT_POSTROUTING, r(vec![jump(names::MASQUERADING)])),
        (
            names::FILTER_PREROUTING,
            r(vec![Stmt::CtState(CT_STATE_NEW), jump(names::FIREWALL_CHECK)]),
        ),
        (
            names::FILTER_INPUT,
            r(vec![Stmt::CtState(CT_STATE_NEW), jump(names::NODEPORT_ENDPOINTS_CHECK)]),
        ),
        (
            names::FILTER_INPUT,
            r(vec![Stmt::CtState(CT_STATE_NEW), jump(names::SERVICE_ENDPOINTS_CHECK)]),
        ),
        (
            names::FILTER_FORWARD,
            r(vec![Stmt::CtState(CT_STATE_INVALID), Stmt::Verdict(Verdict::Drop)]),
        ),
        (
            names::FILTER_FORWARD,
            r(vec![Stmt::CtState(CT_STATE_NEW), jump(names::SERVICE_ENDPOINTS_CHECK)]),
        ),
        (
            names::FILTER_FORWARD,
            r(vec![Stmt::CtState(CT_STATE_NEW), jump(names::NODEPORT_ENDPOINTS_CHECK)]),
        ),
        (
            names::FILTER_OUTPUT,
            r(vec![Stmt::CtState(CT_STATE_NEW), jump(names::SERVICE_ENDPOINTS_CHECK)]),
        ),
        (
            names::FILTER_OUTPUT,
            r(vec![Stmt::CtState(CT_STATE_NEW), jump(names::FIREWALL_CHECK)]),
        ),
        (
            names::MASQUERADING,
            r(vec![
                Stmt::MarkTest { mask: m, zero: true },
                Stmt::Verdict(Verdict::Return),
            ]),
        ),
        (names::MASQUERADING, r(vec![Stmt::MarkXor(m)])),
        (names::MASQUERADING, r(vec![Stmt::Masquerade { fully_random: true }])),
        (names::MARK_MASQ, r(vec![Stmt::MarkOr(m)])),
        (names::FIREWALL_CHECK, r(vec![vmap(names::FIREWALL_IPS)])),
        (names::REJECT_CHAIN, r(vec![Stmt::Reject])),
    ];
    let in_set = |key: &[Field], set: &str| Stmt::InSet {
        key: key.to_vec(),
        set: set.into(),
        negate: false,
    };
    let to = |key: &[Field], set: &str, verdict: Stmt| r(vec![in_set(key, set), verdict]);
    let dispatch = [
        (names::SERVICE_CLUSTER_IPS, names::SERVICE_CLUSTER),
        (names::SERVICE_LOCAL_IPS, names::SERVICE_LOCAL),
        (names::EXTERNAL_CLUSTER_IPS, names::EXTERNAL_CLUSTER),
        (names::EXTERNAL_LOCAL_IPS, names::EXTERNAL_LOCAL),
    ];
    for (set, chain) in dispatch {
        rules.push((names::SERVICES, to(&DST, set, goto(chain))));
    }
    rules.push((names::SERVICES, r(vec![vmap(names::SERVICE_IPS)])));
    let reject = || goto(names::REJECT_CHAIN);
    let drop = || Stmt::Verdict(Verdict::Drop);
    rules.push((
        names::SERVICE_ENDPOINTS_CHECK,
        to(&DST, names::NO_ENDPOINT_REJECT_IPS, reject()),
    ));
    rules.push((
        names::SERVICE_ENDPOINTS_CHECK,
        to(&DST, names::NO_ENDPOINT_DROP_IPS, drop()),
    ));
    let port_vmap = |map: &str| Stmt::Vmap {
        key: vec![Field::L4proto, Field::ThDport],
        map: map.into(),
    };
    let port = [Field::L4proto, Field::ThDport];
    for dest in nodeport_dests {
        let with = |last: Vec<Stmt>| {
            let mut rule = dest.clone();
            rule.extend(last);
            r(rule)
        };
        for (set, chain) in [
            (names::EXTERNAL_CLUSTER_NODEPORTS, names::EXTERNAL_CLUSTER),
            (names::EXTERNAL_LOCAL_NODEPORTS, names::EXTERNAL_LOCAL),
        ] {
            rules.push((names::SERVICES, with(vec![in_set(&port, set), goto(chain)])));
        }
        rules.push((names::SERVICES, with(vec![port_vmap(names::SERVICE_NODEPORTS)])));
        rules.push((
            names::NODEPORT_ENDPOINTS_CHECK,
            with(vec![in_set(&port, names::NO_ENDPOINT_REJECT_NODEPORTS), reject()]),
        ));
        rules.push((
            names::NODEPORT_ENDPOINTS_CHECK,
            with(vec![in_set(&port, names::NO_ENDPOINT_DROP_NODEPORTS), drop()]),
        ));
    }
    rules.extend(policy_rules(cfg));
    rules.extend(bucket_rules());
    rules
}
