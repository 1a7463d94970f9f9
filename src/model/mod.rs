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

pub use intern::{Name, Names, Placement};

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
/// The port name is interned (`http`, `metrics`: a handful of names across a cluster). Orders
/// by text, so iteration order does not depend on which name was interned first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServicePortName {
    pub service: ServiceKey,
    pub port: Name,
    pub protocol: Protocol,
}

impl Ord for ServicePortName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.service, self.port.as_str(), self.protocol).cmp(&(&other.service, other.port.as_str(), other.protocol))
    }
}

impl PartialOrd for ServicePortName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
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

/// A Service's cluster IPs, inline: one, or two for dual-stack (the API allows no more).
/// Reads as a slice.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClusterIps {
    ips: [IpAddr; 2],
    len: u8,
}

impl ClusterIps {
    /// `None` for more than two addresses.
    pub fn new(ips: &[IpAddr]) -> Option<ClusterIps> {
        let unspecified = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
        match *ips {
            [] => Some(ClusterIps {
                ips: [unspecified; 2],
                len: 0,
            }),
            [a] => Some(ClusterIps {
                ips: [a, unspecified],
                len: 1,
            }),
            [a, b] => Some(ClusterIps { ips: [a, b], len: 2 }),
            _ => None,
        }
    }
}

impl std::ops::Deref for ClusterIps {
    type Target = [IpAddr];
    fn deref(&self) -> &[IpAddr] {
        &self.ips[..usize::from(self.len)]
    }
}

impl fmt::Debug for ClusterIps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// The destinations few Services have (external IPs, load balancer IPs and their source
/// ranges): one pointer in every port, shared by the ports of a Service, none when all are empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ExternalDestinations {
    external_ips: Box<[IpAddr]>,
    load_balancer_ips: Box<[IpAddr]>,
    load_balancer_source_ranges: Box<[IpNet]>,
}

impl ExternalDestinations {
    fn is_empty(&self) -> bool {
        self.external_ips.is_empty() && self.load_balancer_ips.is_empty() && self.load_balancer_source_ranges.is_empty()
    }
}

/// Everything a dataplane needs to know about one Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: ServicePortName,
    /// The Service's cluster IPs (both families for dual-stack).
    pub cluster_ips: ClusterIps,
    pub port: u16,
    pub node_port: Option<u16>,
    /// `spec.externalIPs`, `status.loadBalancer.ingress` and `loadBalancerSourceRanges`, read
    /// through [`Self::external_ips`], [`Self::load_balancer_ips`] and
    /// [`Self::load_balancer_source_ranges`].
    external: Option<Arc<ExternalDestinations>>,
    /// `sessionAffinity: ClientIP` timeout in seconds; `None` without affinity.
    pub affinity_timeout: Option<u32>,
    /// `externalTrafficPolicy: Local` on a Service that has external destinations.
    pub external_policy_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_policy_local: bool,
    pub health_check_node_port: Option<u16>,
}

impl ServicePort {
    /// A port with no node port, no external destinations, no affinity and Cluster traffic
    /// policies; the other fields are public and set as needed.
    pub fn new(name: ServicePortName, cluster_ips: ClusterIps, port: u16) -> ServicePort {
        ServicePort {
            name,
            cluster_ips,
            port,
            node_port: None,
            external: None,
            affinity_timeout: None,
            external_policy_local: false,
            internal_policy_local: false,
            health_check_node_port: None,
        }
    }

    /// Whether traffic can reach this port from outside the cluster network.
    pub fn has_external_destinations(&self) -> bool {
        self.node_port.is_some() || !self.external_ips().is_empty() || !self.load_balancer_ips().is_empty()
    }

    /// `spec.externalIPs`.
    pub fn external_ips(&self) -> &[IpAddr] {
        self.external.as_ref().map_or(&[], |e| &e.external_ips)
    }

    /// `status.loadBalancer.ingress` IPs that traffic is delivered to directly (not `ipMode: Proxy`).
    pub fn load_balancer_ips(&self) -> &[IpAddr] {
        self.external.as_ref().map_or(&[], |e| &e.load_balancer_ips)
    }

    /// `spec.loadBalancerSourceRanges`, truncated to their networks.
    pub fn load_balancer_source_ranges(&self) -> &[IpNet] {
        self.external.as_ref().map_or(&[], |e| &e.load_balancer_source_ranges)
    }

    pub fn set_external_ips(&mut self, ips: Vec<IpAddr>) {
        self.edit_external(|e| e.external_ips = ips.into());
    }

    pub fn set_load_balancer_ips(&mut self, ips: Vec<IpAddr>) {
        self.edit_external(|e| e.load_balancer_ips = ips.into());
    }

    pub fn set_load_balancer_source_ranges(&mut self, ranges: Vec<IpNet>) {
        self.edit_external(|e| e.load_balancer_source_ranges = ranges.into());
    }

    /// Gives this port the external destinations of `other` (a port of the same Service), sharing them.
    pub fn share_external_destinations(&mut self, other: &ServicePort) {
        self.external = other.external.clone();
    }

    fn edit_external(&mut self, edit: impl FnOnce(&mut ExternalDestinations)) {
        let mut external = self.external.as_deref().cloned().unwrap_or_default();
        edit(&mut external);
        self.external = (!external.is_empty()).then(|| Arc::new(external));
    }
}

/// An endpoint's `conditions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// One backend of one Service port, merged from all EndpointSlices of the Service: 24 bytes
/// of plain data that owns no string, no vector and no reference count. Its node name, zone
/// and topology hints are one interned [`Placement`] (a cluster has few distinct ones), its
/// conditions and locality are bits; read them through the methods.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    flags: u8,
    placement: Placement,
}

const READY: u8 = 1;
const SERVING: u8 = 2;
const TERMINATING: u8 = 4;
const LOCAL: u8 = 8;

impl Endpoint {
    /// `is_local`: `nodeName` equals this node's name (set at conversion time).
    pub fn new(ip: IpAddr, port: u16, conditions: Conditions, placement: Placement, is_local: bool) -> Endpoint {
        let bit = |on: bool, bit: u8| if on { bit } else { 0 };
        Endpoint {
            ip,
            port,
            flags: bit(conditions.ready, READY)
                | bit(conditions.serving, SERVING)
                | bit(conditions.terminating, TERMINATING)
                | bit(is_local, LOCAL),
            placement,
        }
    }

    pub fn ready(&self) -> bool {
        self.flags & READY != 0
    }

    pub fn serving(&self) -> bool {
        self.flags & SERVING != 0
    }

    pub fn terminating(&self) -> bool {
        self.flags & TERMINATING != 0
    }

    pub fn conditions(&self) -> Conditions {
        Conditions {
            ready: self.ready(),
            serving: self.serving(),
            terminating: self.terminating(),
        }
    }

    /// `nodeName` equals this node's name.
    pub fn is_local(&self) -> bool {
        self.flags & LOCAL != 0
    }

    pub fn placement(&self) -> Placement {
        self.placement
    }

    pub fn node_name(&self) -> Option<Name> {
        self.placement.node_name()
    }

    pub fn zone(&self) -> Option<Name> {
        self.placement.zone()
    }

    /// `hints.forZones`, empty when the slice carries no hints. The EndpointSlice controller
    /// writes them for `trafficDistribution: PreferClose`/`PreferSameZone` (and Topology Aware Routing).
    pub fn zone_hints(&self) -> Names {
        self.placement.zone_hints()
    }

    /// `hints.forNodes`, written for `trafficDistribution: PreferSameNode`.
    pub fn node_hints(&self) -> Names {
        self.placement.node_hints()
    }

    /// `ip:port`, bracketed for IPv6, as iptables' DNAT and ipvsadm write it.
    pub fn addr_string(&self) -> String {
        match self.ip {
            IpAddr::V4(ip) => format!("{ip}:{}", self.port),
            IpAddr::V6(ip) => format!("[{ip}]:{}", self.port),
        }
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("ip", &self.ip)
            .field("port", &self.port)
            .field("ready", &self.ready())
            .field("serving", &self.serving())
            .field("terminating", &self.terminating())
            .field("is_local", &self.is_local())
            .field("placement", &self.placement)
            .finish()
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
pub mod testing;

#[cfg(test)]
mod tests {
    use super::*;

    /// The model is paid once per endpoint on every node: keep its values small (a guard
    /// against a field that quietly owns a String again).
    #[test]
    fn values_stay_compact() {
        // The address (17 bytes), the port, a byte of flags and the placement's 4-byte id.
        assert_eq!(std::mem::size_of::<Endpoint>(), 24);
        assert_eq!(std::mem::size_of::<ServiceKey>(), 32);
        // The name (key, port name id, protocol), the cluster IPs inline, one pointer for the
        // rare external destinations, the numbers and flags.
        assert_eq!(std::mem::size_of::<ServicePort>(), 104);
    }

    #[test]
    fn cluster_ips_read_as_a_slice_of_at_most_two() {
        let (a, b): (IpAddr, IpAddr) = ("10.96.0.1".parse().unwrap(), "fd00::1".parse().unwrap());
        assert_eq!(*ClusterIps::new(&[a]).unwrap(), [a]);
        assert_eq!(*ClusterIps::new(&[a, b]).unwrap(), [a, b]);
        assert!(ClusterIps::new(&[]).unwrap().is_empty());
        assert_eq!(ClusterIps::new(&[a, b, a]), None);
    }

    /// The rare destinations live behind one pointer: set and cleared, they read back, and a
    /// port without any holds none.
    #[test]
    fn external_destinations_read_back() {
        let mut p = testing::service_port("ns/web", "http", "10.96.0.1", 80).build();
        assert!(p.external.is_none() && !p.has_external_destinations());
        p.set_external_ips(vec!["192.0.2.1".parse().unwrap()]);
        p.set_load_balancer_source_ranges(vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(p.external_ips(), ["192.0.2.1".parse::<IpAddr>().unwrap()]);
        assert!(p.load_balancer_ips().is_empty() && p.has_external_destinations());
        assert_eq!(p.load_balancer_source_ranges().len(), 1);
        let mut q = testing::service_port("ns/web", "dns", "10.96.0.1", 53).build();
        q.share_external_destinations(&p);
        assert!(Arc::ptr_eq(p.external.as_ref().unwrap(), q.external.as_ref().unwrap()));
        p.set_external_ips(vec![]);
        p.set_load_balancer_source_ranges(vec![]);
        assert!(p.external.is_none());
        assert_eq!(q.external_ips().len(), 1, "the other port's copy is untouched");
    }

    #[test]
    fn service_port_names_order_by_text() {
        let name = |port: &str| ServicePortName {
            service: ServiceKey::new("ns", "web"),
            port: Name::new(port),
            protocol: Protocol::Tcp,
        };
        // Interned in the opposite order of their text.
        let (z, a) = (name("zz-order-test"), name("aa-order-test"));
        assert!(a < z);
        assert_eq!(format!("{z} {}", name("")), "ns/web:zz-order-test ns/web");
    }
}
