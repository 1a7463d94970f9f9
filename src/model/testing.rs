//! The one way tests build model values: a Service port and an endpoint with the defaults the
//! API server gives, changed by name (`service_port("ns/web", "http", "10.96.0.1", 80)
//! .node_port(30080).build()`), so a field added to the model is added here, not in every test.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use super::{
    ClusterIps, Conditions, Endpoint, Name, Names, Placement, Protocol, ServiceKey, ServicePort, ServicePortName,
};

/// A TCP port named `port_name` (empty: unnamed) of the Service `ns/name` on `cluster_ip`
/// (`""`: none), with no node port, no external destinations and Cluster policies.
pub fn service_port(service: &str, port_name: &str, cluster_ip: &str, port: u16) -> ServicePortBuilder {
    let (namespace, name) = service.split_once('/').unwrap_or(("default", service));
    let ips: Vec<IpAddr> = [cluster_ip].into_iter().filter(|ip| !ip.is_empty()).map(ip).collect();
    ServicePortBuilder(ServicePort::new(
        ServicePortName {
            service: ServiceKey::new(namespace, name),
            port: Name::new(port_name),
            protocol: Protocol::Tcp,
        },
        ClusterIps::new(&ips).expect("one address"),
        port,
    ))
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap_or_else(|_| panic!("test IP {text:?}"))
}

fn ips<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<IpAddr> {
    texts.into_iter().map(ip).collect()
}

/// A [`ServicePort`] being built; [`Self::build`] or [`Self::arc`] finishes it.
#[derive(Debug, Clone)]
pub struct ServicePortBuilder(ServicePort);

impl ServicePortBuilder {
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.0.name.protocol = protocol;
        self
    }

    /// Replaces the cluster IPs (one, or two for dual-stack).
    pub fn cluster_ips<'a>(mut self, addresses: impl IntoIterator<Item = &'a str>) -> Self {
        self.0.cluster_ips = ClusterIps::new(&ips(addresses)).expect("at most two cluster IPs");
        self
    }

    pub fn node_port(mut self, node_port: u16) -> Self {
        self.0.node_port = Some(node_port);
        self
    }

    pub fn external_ips<'a>(mut self, addresses: impl IntoIterator<Item = &'a str>) -> Self {
        self.0.set_external_ips(ips(addresses));
        self
    }

    pub fn load_balancer_ips<'a>(mut self, addresses: impl IntoIterator<Item = &'a str>) -> Self {
        self.0.set_load_balancer_ips(ips(addresses));
        self
    }

    pub fn source_ranges<'a>(mut self, ranges: impl IntoIterator<Item = &'a str>) -> Self {
        let ranges: Vec<IpNet> = ranges.into_iter().map(|r| r.parse().expect("test CIDR")).collect();
        self.0.set_load_balancer_source_ranges(ranges);
        self
    }

    pub fn affinity(mut self, timeout_seconds: u32) -> Self {
        self.0.affinity_timeout = Some(timeout_seconds);
        self
    }

    pub fn external_policy_local(mut self) -> Self {
        self.0.external_policy_local = true;
        self
    }

    pub fn internal_policy_local(mut self) -> Self {
        self.0.internal_policy_local = true;
        self
    }

    pub fn health_check_node_port(mut self, port: u16) -> Self {
        self.0.health_check_node_port = Some(port);
        self
    }

    pub fn build(self) -> ServicePort {
        self.0
    }

    pub fn arc(self) -> Arc<ServicePort> {
        Arc::new(self.0)
    }
}

/// A ready, serving endpoint `ip:port` on no node, in no zone, with no hints.
pub fn endpoint(ip_text: &str, port: u16) -> EndpointBuilder {
    EndpointBuilder {
        ip: ip(ip_text),
        port,
        conditions: Conditions {
            ready: true,
            serving: true,
            terminating: false,
        },
        node_name: None,
        zone: None,
        zone_hints: Names::default(),
        node_hints: Names::default(),
        is_local: false,
    }
}

/// An [`Endpoint`] being built; [`Self::build`] finishes it.
#[derive(Debug, Clone)]
pub struct EndpointBuilder {
    ip: IpAddr,
    port: u16,
    conditions: Conditions,
    node_name: Option<Name>,
    zone: Option<Name>,
    zone_hints: Names,
    node_hints: Names,
    is_local: bool,
}

impl EndpointBuilder {
    pub fn conditions(mut self, ready: bool, serving: bool, terminating: bool) -> Self {
        self.conditions = Conditions {
            ready,
            serving,
            terminating,
        };
        self
    }

    /// Not ready, and not serving either.
    pub fn down(self) -> Self {
        self.conditions(false, false, false)
    }

    /// Terminating and still serving (not ready), as during a rolling update.
    pub fn terminating(self) -> Self {
        self.conditions(false, true, true)
    }

    pub fn node(mut self, name: &str) -> Self {
        self.node_name = Some(Name::new(name));
        self
    }

    /// On this node (its `nodeName` is the proxy's).
    pub fn local(mut self, is_local: bool) -> Self {
        self.is_local = is_local;
        self
    }

    pub fn zone(mut self, zone: &str) -> Self {
        self.zone = Some(Name::new(zone));
        self
    }

    pub fn zone_hints<'a>(mut self, zones: impl IntoIterator<Item = &'a str>) -> Self {
        self.zone_hints = zones.into_iter().collect();
        self
    }

    pub fn node_hints<'a>(mut self, nodes: impl IntoIterator<Item = &'a str>) -> Self {
        self.node_hints = nodes.into_iter().collect();
        self
    }

    pub fn build(self) -> Endpoint {
        Endpoint::new(
            self.ip,
            self.port,
            self.conditions,
            Placement::new(self.node_name, self.zone, self.zone_hints, self.node_hints),
            self.is_local,
        )
    }
}
