//! Stale UDP conntrack entries. UDP has no connection teardown, so the kernel keeps NAT-ing a
//! client's flow to the endpoint it first picked: when that endpoint goes away, or when a
//! Service without endpoints (whose packets were rejected) gets its first one, clients such as
//! DNS resolvers stay stuck until the entry times out. After each sync, kproxy deletes exactly
//! those entries, as kube-proxy does (`conntrack -D` with the same filters, from kube-proxy's
//! conntrack cleanup). Planning, matching and the ctnetlink messages are pure; deletion lists
//! the conntrack table once over nfnetlink (`IPCTNL_MSG_CT_GET` dump) and deletes the entries
//! that match (`IPCTNL_MSG_CT_DELETE` by original tuple), on the socket kproxy keeps: no
//! `conntrack` process, no scan of the table per filter, and no socket closed after each
//! cleanup (which would hold nf_tables' commit mutex for an RCU grace period; see
//! [`super::nfnetlink`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::nfnetlink::{self, Attrs, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use super::nlattr;
use crate::metrics::metrics;
use crate::model::topology::categorize_endpoints;
use crate::model::{DesiredState, IpFamily, Protocol, ServicePortName};

/// What conntrack needs to know of one UDP Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpPort {
    /// Cluster, external and load-balancer IPs of the family.
    pub service_ips: Vec<IpAddr>,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Endpoints traffic may be sent to now.
    pub endpoints: BTreeSet<IpAddr>,
}

pub type UdpPorts = BTreeMap<ServicePortName, UdpPort>;

/// The UDP Service ports of `desired` in `family`.
pub fn udp_ports(desired: &DesiredState, family: IpFamily) -> UdpPorts {
    let mut out = UdpPorts::new();
    for state in desired.services.values() {
        for ps in state.ports.iter().filter(|p| p.port.name.protocol == Protocol::Udp) {
            let sp = &ps.port;
            let of_family = |ip: &&IpAddr| IpFamily::of(ip) == family;
            let service_ips: Vec<IpAddr> = sp
                .cluster_ips
                .iter()
                .filter(of_family)
                .take(1)
                .chain(sp.external_ips().iter().filter(of_family))
                .chain(sp.load_balancer_ips().iter().filter(of_family))
                .copied()
                .collect();
            if service_ips.is_empty() {
                continue;
            }
            let eps: Vec<_> = ps
                .endpoints
                .iter()
                .filter(|e| IpFamily::of(&e.ip) == family)
                .cloned()
                .collect();
            let sets = categorize_endpoints(&eps, sp, &desired.node.name, desired.node.zone.as_deref());
            out.insert(
                sp.name.clone(),
                UdpPort {
                    service_ips,
                    port: sp.port,
                    node_port: sp.node_port,
                    endpoints: sets.all_reachable.iter().map(|e| e.ip).collect(),
                },
            );
        }
    }
    out
}

/// Which stale UDP entries to delete: kube-proxy's conntrack filters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Flow {
    /// Every UDP flow to a service IP and port (it had no endpoints: replies were rejects).
    ToService { ip: IpAddr, port: u16 },
    /// Every UDP flow to a NodePort, of either family.
    ToNodePort { port: u16 },
    /// Flows to a service IP and port that were NATed to an endpoint that is gone.
    ServiceToEndpoint { ip: IpAddr, port: u16, endpoint: IpAddr },
    /// Flows to a NodePort NATed to an endpoint that is gone.
    NodePortToEndpoint { port: u16, endpoint: IpAddr },
}

impl Flow {
    /// Whether `entry` is one of this filter's: what `conntrack -D -p udp [--orig-dst IP]
    /// --orig-port-dst PORT [--dst-nat ENDPOINT]` deletes (`--dst-nat`: destination-NATed,
    /// and the reply comes from the endpoint).
    pub fn matches(&self, entry: &Entry) -> bool {
        let orig = &entry.orig;
        let dnat_to = |endpoint: IpAddr| entry.status & IPS_DST_NAT != 0 && entry.reply.src == endpoint;
        orig.proto == IPPROTO_UDP
            && match *self {
                Flow::ToService { ip, port } => orig.dst == ip && orig.dport == port,
                Flow::ToNodePort { port } => orig.dport == port,
                Flow::ServiceToEndpoint { ip, port, endpoint } => {
                    orig.dst == ip && orig.dport == port && dnat_to(endpoint)
                }
                Flow::NodePortToEndpoint { port, endpoint } => orig.dport == port && dnat_to(endpoint),
            }
    }
}

/// One direction of a conntrack entry (`CTA_TUPLE_ORIG` or `CTA_TUPLE_REPLY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

/// What the cleanup reads of a conntrack entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub orig: Tuple,
    pub reply: Tuple,
    /// `CTA_STATUS` (`IPS_*` bits).
    pub status: u32,
    /// `CTA_ZONE`, 0 when absent.
    pub zone: u16,
}

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
// enum ctattr_type, ctattr_tuple, ctattr_ip, ctattr_l4proto (linux/netfilter/nfnetlink_conntrack.h).
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
/// `IPS_DST_NAT` (linux/netfilter/nf_conntrack_common.h).
const IPS_DST_NAT: u32 = 1 << 5;
const IPPROTO_UDP: u8 = 17;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const ENOENT: i32 = 2;

/// A dump of every conntrack entry, of both families (`nfgen_family` AF_UNSPEC).
pub fn encode_dump(seq: u32) -> Vec<u8> {
    nfnetlink::message(
        NFNL_SUBSYS_CTNETLINK,
        IPCTNL_MSG_CT_GET,
        0,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        &Attrs::default(),
    )
}

/// The deletion of `entry`, by its original tuple (and zone), as `conntrack -D` sends it.
pub fn encode_delete(entry: &Entry, seq: u32) -> Vec<u8> {
    let mut attrs = Attrs::default();
    put_tuple(&mut attrs, CTA_TUPLE_ORIG, &entry.orig);
    if entry.zone != 0 {
        attrs.put(CTA_ZONE, &entry.zone.to_be_bytes());
    }
    let family = if entry.orig.src.is_ipv4() { AF_INET } else { AF_INET6 };
    nfnetlink::message(
        NFNL_SUBSYS_CTNETLINK,
        IPCTNL_MSG_CT_DELETE,
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        &attrs,
    )
}

/// `t` as the nested attribute `kind` (`CTA_TUPLE_ORIG` or `CTA_TUPLE_REPLY`), addresses and
/// ports in network byte order, as [`decode_tuple`] reads it.
fn put_tuple(attrs: &mut Attrs, kind: u16, t: &Tuple) {
    attrs.nest(kind, |tuple| {
        tuple.nest(CTA_TUPLE_IP, |ip| match (t.src, t.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                ip.put(CTA_IP_V4_SRC, &s.octets()).put(CTA_IP_V4_DST, &d.octets());
            }
            (s, d) => {
                ip.put(CTA_IP_V6_SRC, &v6(s).octets())
                    .put(CTA_IP_V6_DST, &v6(d).octets());
            }
        });
        tuple.nest(CTA_TUPLE_PROTO, |proto| {
            proto
                .put(CTA_PROTO_NUM, &[t.proto])
                .put(CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes())
                .put(CTA_PROTO_DST_PORT, &t.dport.to_be_bytes());
        });
    });
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V6(ip) => ip,
        IpAddr::V4(ip) => ip.to_ipv6_mapped(),
    }
}

/// A conntrack entry of a dump, from its attributes; `None` without both tuples (or with one
/// the cleanup cannot read).
pub fn decode_entry(attrs: &[u8]) -> Option<Entry> {
    let (mut orig, mut reply, mut status, mut zone) = (None, None, 0, 0);
    for (kind, value) in nlattr::iter(attrs) {
        match kind {
            CTA_TUPLE_ORIG => orig = decode_tuple(value),
            CTA_TUPLE_REPLY => reply = decode_tuple(value),
            CTA_STATUS => status = u32::from_be_bytes(value.try_into().ok()?),
            CTA_ZONE => zone = u16::from_be_bytes(value.try_into().ok()?),
            _ => {}
        }
    }
    Some(Entry {
        orig: orig?,
        reply: reply?,
        status,
        zone,
    })
}

fn decode_tuple(attrs: &[u8]) -> Option<Tuple> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, 0, 0);
    let v4 = |v: &[u8]| Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(v).ok()?)));
    let v6 = |v: &[u8]| Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(v).ok()?)));
    let port = |v: &[u8]| Some(u16::from_be_bytes(v.try_into().ok()?));
    for (kind, value) in nlattr::iter(attrs) {
        match kind {
            CTA_TUPLE_IP => {
                for (kind, value) in nlattr::iter(value) {
                    match kind {
                        CTA_IP_V4_SRC => src = v4(value),
                        CTA_IP_V4_DST => dst = v4(value),
                        CTA_IP_V6_SRC => src = v6(value),
                        CTA_IP_V6_DST => dst = v6(value),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (kind, value) in nlattr::iter(value) {
                    match kind {
                        CTA_PROTO_NUM => proto = value.first().copied(),
                        CTA_PROTO_SRC_PORT => sport = port(value)?,
                        CTA_PROTO_DST_PORT => dport = port(value)?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Tuple {
        src: src?,
        dst: dst?,
        proto: proto?,
        sport,
        dport,
    })
}

/// The flows to delete going from `old` to `new`. Pure.
pub fn plan_cleanup(old: &UdpPorts, new: &UdpPorts) -> BTreeSet<Flow> {
    let mut flows = BTreeSet::new();
    for (name, now) in new {
        let before = old.get(name);
        let had = before.map(|b| &b.endpoints);
        if now.endpoints.is_empty() {
            continue;
        }
        if had.is_none_or(|h| h.is_empty()) {
            // First endpoint: flows created while packets were rejected must start over.
            for ip in &now.service_ips {
                flows.insert(Flow::ToService {
                    ip: *ip,
                    port: now.port,
                });
            }
            if let Some(np) = now.node_port {
                flows.insert(Flow::ToNodePort { port: np });
            }
            continue;
        }
        for gone in had.into_iter().flatten().filter(|ep| !now.endpoints.contains(ep)) {
            flows_to_endpoint(now, *gone, &mut flows);
        }
    }
    // Endpoints of a Service that lost all of them (or was deleted) are gone too.
    for (name, before) in old {
        if new.get(name).is_some_and(|n| !n.endpoints.is_empty()) {
            continue;
        }
        for gone in &before.endpoints {
            flows_to_endpoint(before, *gone, &mut flows);
        }
    }
    flows
}

/// The flows of `port` that were NATed to `endpoint`.
fn flows_to_endpoint(port: &UdpPort, endpoint: IpAddr, flows: &mut BTreeSet<Flow>) {
    for ip in &port.service_ips {
        flows.insert(Flow::ServiceToEndpoint {
            ip: *ip,
            port: port.port,
            endpoint,
        });
    }
    if let Some(np) = port.node_port {
        flows.insert(Flow::NodePortToEndpoint { port: np, endpoint });
    }
}

/// Deletes the entries of `flows`; returns how many went. A failure is logged, not returned:
/// stale flows then simply time out.
pub async fn delete_flows(flows: &BTreeSet<Flow>) -> u64 {
    if flows.is_empty() {
        return 0;
    }
    let owned = flows.clone();
    let deleted = match tokio::task::spawn_blocking(move || delete_matching(&owned)).await {
        Ok(Ok(deleted)) => deleted,
        Ok(Err((deleted, why))) => {
            tracing::warn!(error = %why, flows = ?flows, "stale UDP conntrack entries will persist until they time out");
            deleted
        }
        Err(e) => {
            tracing::warn!(error = %e, "the conntrack cleanup did not run");
            0
        }
    };
    if deleted > 0 {
        tracing::debug!(entries = deleted, "deleted stale UDP conntrack entries");
        metrics().add_conntrack_deleted(deleted);
    }
    deleted
}

/// One dump of the table, then a deletion per matching entry. An entry gone meanwhile (the
/// kernel's ENOENT: it timed out, or a reply raced) is not an error. On an error, how many
/// were deleted before it.
pub fn delete_matching(flows: &BTreeSet<Flow>) -> Result<u64, (u64, String)> {
    let mut stale = Vec::new();
    nfnetlink::exchange(&encode_dump(1), |_, attrs| {
        if let Some(entry) = decode_entry(attrs) {
            if flows.iter().any(|f| f.matches(&entry)) {
                stale.push(entry);
            }
        }
    })
    .map_err(|e| (0, format!("listing conntrack entries: {e}")))?;
    let mut deleted = 0;
    for entry in &stale {
        match nfnetlink::exchange(&encode_delete(entry, 1), |_, _| {}) {
            Ok(()) => deleted += 1,
            Err(nfnetlink::Error::Kernel(ENOENT)) => {}
            Err(e) => {
                let t = &entry.orig;
                return Err((
                    deleted,
                    format!(
                        "deleting the conntrack entry udp {}:{} -> {}:{}: {e}",
                        t.src, t.sport, t.dst, t.dport
                    ),
                ));
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceKey;

    fn name(n: &str) -> ServicePortName {
        ServicePortName {
            service: ServiceKey::new("ns", n),
            port: "dns".into(),
            protocol: Protocol::Udp,
        }
    }

    fn port(eps: &[&str], node_port: Option<u16>) -> UdpPort {
        UdpPort {
            service_ips: vec!["10.96.0.10".parse().unwrap()],
            port: 53,
            node_port,
            endpoints: eps.iter().map(|e| e.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn removed_endpoint_flows_are_deleted() {
        let old = UdpPorts::from([(name("dns"), port(&["10.244.1.2", "10.244.2.2"], Some(30053)))]);
        let new = UdpPorts::from([(name("dns"), port(&["10.244.2.2"], Some(30053)))]);
        let gone: IpAddr = "10.244.1.2".parse().unwrap();
        assert_eq!(
            plan_cleanup(&old, &new).into_iter().collect::<Vec<_>>(),
            [
                Flow::ServiceToEndpoint {
                    ip: "10.96.0.10".parse().unwrap(),
                    port: 53,
                    endpoint: gone
                },
                Flow::NodePortToEndpoint {
                    port: 30053,
                    endpoint: gone
                },
            ]
        );
    }

    #[test]
    fn first_endpoint_clears_flows_to_the_service() {
        let old = UdpPorts::from([(name("dns"), port(&[], None))]);
        let new = UdpPorts::from([(name("dns"), port(&["10.244.1.2"], None))]);
        assert_eq!(
            plan_cleanup(&old, &new).into_iter().collect::<Vec<_>>(),
            vec![Flow::ToService {
                ip: "10.96.0.10".parse().unwrap(),
                port: 53
            }]
        );
        // A brand-new Service with endpoints is treated the same.
        assert_eq!(plan_cleanup(&UdpPorts::new(), &new).len(), 1);
    }

    #[test]
    fn unchanged_or_deleted_services() {
        let old = UdpPorts::from([(name("dns"), port(&["10.244.1.2"], None))]);
        assert!(plan_cleanup(&old, &old).is_empty());
        let deleted = plan_cleanup(&old, &UdpPorts::new());
        assert_eq!(deleted.len(), 1);
        assert!(matches!(deleted.iter().next(), Some(Flow::ServiceToEndpoint { .. })));
    }

    fn tuple(src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
        Tuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: IPPROTO_UDP,
            sport,
            dport,
        }
    }

    /// A client's DNS flow to the cluster IP, NATed to 10.244.1.2.
    fn dns_flow() -> Entry {
        Entry {
            orig: tuple("10.244.3.3", 40053, "10.96.0.10", 53),
            reply: tuple("10.244.1.2", 53, "10.244.3.3", 40053),
            status: IPS_DST_NAT | 0xa,
            zone: 0,
        }
    }

    #[test]
    fn filters_match_as_conntrack_tools_do() {
        let e = dns_flow();
        let ip: IpAddr = "10.96.0.10".parse().unwrap();
        let ep: IpAddr = "10.244.1.2".parse().unwrap();
        let other: IpAddr = "10.244.2.2".parse().unwrap();
        assert!(Flow::ToService { ip, port: 53 }.matches(&e));
        assert!(!Flow::ToService { ip, port: 54 }.matches(&e));
        assert!(Flow::ServiceToEndpoint {
            ip,
            port: 53,
            endpoint: ep
        }
        .matches(&e));
        assert!(!Flow::ServiceToEndpoint {
            ip,
            port: 53,
            endpoint: other
        }
        .matches(&e));
        // Not destination-NATed: the reply's source is not an endpoint that answered for it.
        let plain = Entry {
            status: 0xa,
            ..e.clone()
        };
        assert!(!Flow::ServiceToEndpoint {
            ip,
            port: 53,
            endpoint: ep
        }
        .matches(&plain));
        // A NodePort flow, to the node's address.
        let np = Entry {
            orig: tuple("192.0.2.9", 5000, "192.0.2.1", 30053),
            reply: tuple("10.244.1.2", 53, "192.0.2.1", 5000),
            ..e.clone()
        };
        assert!(Flow::ToNodePort { port: 30053 }.matches(&np));
        assert!(Flow::NodePortToEndpoint {
            port: 30053,
            endpoint: ep
        }
        .matches(&np));
        assert!(!Flow::NodePortToEndpoint {
            port: 30053,
            endpoint: other
        }
        .matches(&np));
        // TCP is never touched.
        let tcp = Entry {
            orig: Tuple {
                proto: 6,
                ..e.orig.clone()
            },
            ..e.clone()
        };
        assert!(!Flow::ToService { ip, port: 53 }.matches(&tcp));
    }

    /// The deletion carries what the dump said (the original tuple, in network byte order,
    /// and the zone), so the entry decodes back from it.
    #[test]
    fn a_deletion_names_the_dumped_entry() {
        for e in [
            Entry { zone: 7, ..dns_flow() },
            Entry {
                orig: tuple("fd00::3", 40053, "fd00:96::a", 53),
                reply: tuple("fd00:244::2", 53, "fd00::3", 40053),
                ..dns_flow()
            },
        ] {
            let msg = encode_delete(&e, 3);
            let [nfnetlink::Reply::Message {
                msg: kind,
                family,
                attrs,
            }] = nfnetlink::decode(&msg).unwrap()[..]
            else {
                panic!("one message");
            };
            assert_eq!(kind, IPCTNL_MSG_CT_DELETE);
            assert_eq!(family, if e.orig.src.is_ipv4() { AF_INET } else { AF_INET6 });
            assert_eq!(nlattr::u16_at(&msg, 4), Some(0x0102), "ctnetlink, delete");
            // The reply tuple is the dump's; the deletion needs only the original one.
            let mut with_reply = attrs.to_vec();
            let mut more = Attrs::default();
            put_tuple(&mut more, CTA_TUPLE_REPLY, &e.reply);
            more.put(CTA_STATUS, &e.status.to_be_bytes());
            with_reply.extend_from_slice(more.bytes());
            assert_eq!(decode_entry(&with_reply), Some(e.clone()));
        }
        assert_eq!(decode_entry(&[]), None, "no tuples, no entry");
    }

    /// Every entry of the namespace's table, over the same dump the cleanup lists.
    fn table() -> Vec<Entry> {
        let mut out = Vec::new();
        nfnetlink::exchange(&encode_dump(1), |_, attrs| out.extend(decode_entry(attrs))).unwrap();
        out
    }

    /// On the real kernel, in a network namespace of its own: entries inserted with the
    /// conntrack tool (IPv4 and IPv6, UDP and TCP) are listed, and exactly the matching UDP
    /// ones are deleted. Skipped without privileges, conntrack support or the tool.
    #[test]
    fn deletes_exactly_the_matching_entries_of_both_families() {
        let insert = |args: &str| {
            std::process::Command::new("conntrack")
                .args(["-I", "-t", "100"])
                .args(args.split(' '))
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let Some(result) = crate::dataplane::nftables::socket::tests::in_netns(move || {
            let flows = [
                ("udp", "10.244.3.3", "10.96.0.10", 40053),
                ("udp", "10.244.3.3", "10.96.0.11", 40054),
                ("tcp", "10.244.3.3", "10.96.0.10", 40055),
                ("udp", "fd00::3", "fd00:96::a", 40053),
            ];
            for (proto, src, dst, sport) in flows {
                let state = if proto == "tcp" { " --state ESTABLISHED" } else { "" };
                let args = format!(
                    "-p {proto} -s {src} -d {dst} --sport {sport} --dport 53 --reply-src {dst} --reply-dst {src} --reply-port-src 53 --reply-port-dst {sport}{state}"
                );
                if !insert(&args) {
                    return None;
                }
            }
            let before = table().len();
            let stale = BTreeSet::from([
                Flow::ToService {
                    ip: "10.96.0.10".parse().unwrap(),
                    port: 53,
                },
                Flow::ToService {
                    ip: "fd00:96::a".parse().unwrap(),
                    port: 53,
                },
            ]);
            let deleted = delete_matching(&stale);
            Some((before, deleted, table()))
        })
        .flatten() else {
            eprintln!("skipped: no network namespace, conntrack or conntrack tool");
            return;
        };
        let (before, deleted, after) = result;
        assert_eq!(before, 4);
        assert_eq!(deleted, Ok(2));
        let mut left: Vec<(u8, String)> = after.iter().map(|e| (e.orig.proto, e.orig.dst.to_string())).collect();
        left.sort();
        assert_eq!(left, [(6, "10.96.0.10".into()), (IPPROTO_UDP, "10.96.0.11".into())]);
    }
}
