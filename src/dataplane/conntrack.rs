//! Stale UDP conntrack entries. UDP has no connection teardown, so the kernel keeps NAT-ing a
//! client's flow to the endpoint it first picked: when that endpoint goes away, or when a
//! Service without endpoints (whose packets were rejected) gets its first one, clients such as
//! DNS resolvers stay stuck until the entry times out. After each sync, kproxy deletes exactly
//! those entries, as kube-proxy does. Planning is pure; deletion runs the `conntrack` tool.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Stdio;

use tokio::process::Command;

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

/// One `conntrack -D` filter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Flow {
    /// Every UDP flow to a service IP and port (it had no endpoints: replies were rejects).
    ToService { ip: IpAddr, port: u16 },
    /// Every UDP flow to a NodePort.
    ToNodePort { port: u16 },
    /// Flows to a service IP and port that were NATed to an endpoint that is gone.
    ServiceToEndpoint { ip: IpAddr, port: u16, endpoint: IpAddr },
    /// Flows to a NodePort NATed to an endpoint that is gone.
    NodePortToEndpoint { port: u16, endpoint: IpAddr },
}

impl Flow {
    /// The `conntrack` arguments selecting this flow.
    pub fn args(&self) -> Vec<String> {
        // (address giving the family, original destination, original port, NATed endpoint)
        let (family, orig_dst, port, dst_nat) = match *self {
            Flow::ToService { ip, port } => (Some(ip), Some(ip), port, None),
            Flow::ToNodePort { port } => (None, None, port, None),
            Flow::ServiceToEndpoint { ip, port, endpoint } => (Some(ip), Some(ip), port, Some(endpoint)),
            Flow::NodePortToEndpoint { port, endpoint } => (Some(endpoint), None, port, Some(endpoint)),
        };
        let mut a: Vec<String> = vec!["-D".into()];
        if let Some(ip) = family {
            a.extend(["-f".into(), if ip.is_ipv6() { "ipv6" } else { "ipv4" }.into()]);
        }
        a.extend(["-p".into(), "udp".into()]);
        if let Some(ip) = orig_dst {
            a.extend(["--orig-dst".into(), ip.to_string()]);
        }
        a.extend(["--orig-port-dst".into(), port.to_string()]);
        if let Some(ep) = dst_nat {
            a.extend(["--dst-nat".into(), ep.to_string()]);
        }
        a
    }
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

/// Deletes `flows` with the conntrack tool; returns how many entries went. A missing tool is
/// reported once per call and is not an error: stale flows then simply time out.
pub async fn delete_flows(flows: &BTreeSet<Flow>) -> u64 {
    let mut deleted = 0;
    for flow in flows {
        let out = match Command::new("conntrack")
            .args(flow.args())
            .stdin(Stdio::null())
            .output()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!(error = %e, "cannot run conntrack: stale UDP flows will persist until they time out");
                return deleted;
            }
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        match parse_deleted(&stderr) {
            Some(n) => deleted += n,
            None => tracing::warn!(?flow, message = %stderr.trim(), "conntrack -D failed"),
        }
    }
    if deleted > 0 {
        tracing::debug!(entries = deleted, "deleted stale UDP conntrack entries");
        metrics().add_conntrack_deleted(deleted);
    }
    deleted
}

/// "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted." -> 3
fn parse_deleted(stderr: &str) -> Option<u64> {
    let before = stderr.split(" flow entries have been deleted").next()?;
    if before.len() == stderr.len() {
        return None;
    }
    before.rsplit(' ').next()?.trim().parse().ok()
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
        let flows: Vec<Vec<String>> = plan_cleanup(&old, &new).iter().map(Flow::args).collect();
        assert_eq!(
            flows,
            [
                "-D -f ipv4 -p udp --orig-dst 10.96.0.10 --orig-port-dst 53 --dst-nat 10.244.1.2",
                "-D -f ipv4 -p udp --orig-port-dst 30053 --dst-nat 10.244.1.2",
            ]
            .iter()
            .map(|s| s.split(' ').map(String::from).collect::<Vec<_>>())
            .collect::<Vec<_>>()
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

    #[test]
    fn conntrack_output_parsing() {
        assert_eq!(
            parse_deleted("conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n"),
            Some(3)
        );
        assert_eq!(
            parse_deleted("conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted."),
            Some(0)
        );
        assert_eq!(parse_deleted("conntrack: Operation not permitted"), None);
    }
}
