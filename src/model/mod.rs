//! The proxy's view of the cluster: Services and their endpoints, as pure values.
//!
//! Nothing here does I/O. Kubernetes objects enter through [`convert`], are kept and
//! change-tracked by [`store`], and leave as a [`DesiredState`] that every dataplane renders.
//!
//! Compact by design, because it is paid on every node: names that repeat are shared
//! ([`intern`]), a key clones without allocating, and a Service port's endpoints are one shared
//! list ([`PortState::endpoints`]) that the EndpointSlice it came from holds too.

pub mod convert;
pub mod intern;
pub mod node_ips;
pub mod store;

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

/// The transport protocols a Service port can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The lowercase name iptables, nft and ipvsadm use.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// Parses the Kubernetes spelling (`TCP`, `UDP`, `SCTP`); absent means TCP, as the API defaults it.
    pub fn from_k8s(s: Option<&str>) -> Option<Protocol> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// IPv4 or IPv6: each family is programmed separately (iptables vs ip6tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

pub use intern::{Name, Names};

/// A Service's namespace and name (Kubernetes' NamespacedName), printed `ns/name`. Cloning
/// shares both strings; the namespace is interned.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceKey {
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> Self {
        ServiceKey {
            namespace: intern::intern(namespace.as_ref()),
            name: Arc::from(name.as_ref()),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of one Service, printed as kube-proxy prints it: `ns/name:port` (`ns/name` when the
/// port is unnamed). The protocol is part of the identity, as in kube-proxy's chain hashes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub service: ServiceKey,
    pub port: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}", self.service)
        } else {
            write!(f, "{}:{}", self.service, self.port)
        }
    }
}

/// Everything a dataplane needs to know about one Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: ServicePortName,
    /// The Service's cluster IPs (both families for dual-stack).
    pub cluster_ips: Vec<IpAddr>,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress` IPs that traffic is delivered to directly (not `ipMode: Proxy`).
    pub load_balancer_ips: Vec<IpAddr>,
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// `sessionAffinity: ClientIP` timeout in seconds; `None` without affinity.
    pub affinity_timeout: Option<u32>,
    /// `externalTrafficPolicy: Local` on a Service that has external destinations.
    pub external_policy_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_policy_local: bool,
    pub health_check_node_port: Option<u16>,
}

impl ServicePort {
    /// Whether traffic can reach this port from outside the cluster network.
    pub fn has_external_destinations(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty() || !self.load_balancer_ips.is_empty()
    }
}

/// One backend of one Service port, merged from all EndpointSlices of the Service. Node and
/// zone names and the hint sets are interned ids ([`intern`]), so an endpoint is 40 bytes of
/// plain data: it owns no string, no vector and no reference count, and copies as it is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<Name>,
    pub zone: Option<Name>,
    /// `hints.forZones`, empty when the slice carries no hints. The EndpointSlice controller
    /// writes them for `trafficDistribution: PreferClose`/`PreferSameZone` (and Topology Aware Routing).
    pub zone_hints: Names,
    /// `hints.forNodes`, written for `trafficDistribution: PreferSameNode`.
    pub node_hints: Names,
    /// `nodeName` equals this node's name (set at conversion time).
    pub is_local: bool,
}

impl Endpoint {
    /// `ip:port`, bracketed for IPv6, as iptables' DNAT and ipvsadm write it.
    pub fn addr_string(&self) -> String {
        match self.ip {
            IpAddr::V4(ip) => format!("{ip}:{}", self.port),
            IpAddr::V6(ip) => format!("[{ip}]:{}", self.port),
        }
    }
}

/// The node kproxy runs on, as far as proxying cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub zone: Option<String>,
    pub addresses: Vec<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
}

/// The proxied state of one Service: its ports and, for each, the endpoints from its slices.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceState {
    pub ports: Vec<PortState>,
}

/// One Service port and all its endpoints (ready or not; dataplanes pick with [`crate::model::topology`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortState {
    pub port: Arc<ServicePort>,
    /// Sorted by address. Shared with the EndpointSlice when the port's endpoints all come
    /// from one slice (the common case), so they are kept once.
    pub endpoints: Arc<[Endpoint]>,
}

/// Every proxied Service by key, in key order. A persistent map (imbl's B-tree): cloning it is
/// O(1) and a changed version shares every untouched node with the one before, so the store
/// hands each sync the whole desired state at the cost of what changed, not of what exists.
/// Reads as a `BTreeMap` does (`get`, `iter`, `range`, `len`, `contains_key`).
pub type ServiceMap = imbl::OrdMap<ServiceKey, Arc<ServiceState>>;

/// What the node should implement: every proxied Service, keyed for stable iteration order.
#[derive(Debug, Clone, Default)]
pub struct DesiredState {
    pub services: ServiceMap,
    pub node: NodeInfo,
}

impl DesiredState {
    /// Walks every Service: for tests and tools (a sync reads the store's running counts,
    /// [`store::Snapshot::service_ports`]).
    pub fn service_port_count(&self) -> usize {
        self.services.values().map(|s| s.ports.len()).sum()
    }

    /// Walks every Service, as [`Self::service_port_count`] does.
    pub fn endpoint_count(&self) -> usize {
        self.services
            .values()
            .flat_map(|s| s.ports.iter())
            .map(|p| p.endpoints.len())
            .sum()
    }
}

/// What changed since the last successful sync.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSet {
    /// Rebuild everything (first sync, periodic resync, after a failure, node or config change).
    pub full: bool,
    /// Services whose spec or endpoints changed (including deleted ones).
    pub services: BTreeSet<ServiceKey>,
}

impl ChangeSet {
    pub fn full() -> Self {
        ChangeSet {
            full: true,
            services: BTreeSet::new(),
        }
    }
}

pub mod topology;

#[cfg(test)]
mod tests {
    use super::*;

    /// The model is paid once per endpoint on every node: keep its values small (a guard
    /// against a field that quietly owns a String again).
    #[test]
    fn values_stay_compact() {
        // The address (17 bytes), the port, four flags and four 4-byte ids.
        assert_eq!(std::mem::size_of::<Endpoint>(), 40);
        assert_eq!(std::mem::size_of::<ServiceKey>(), 32);
    }
}
