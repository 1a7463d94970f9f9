//! Every nftables name kproxy writes: the table, fixed chains and maps, generated chains and sets.
//!
//! Generated names follow upstream kube-proxy's nftables scheme: a kind, 8 base32 characters of a
//! SHA-256 over the readable part (so names differing only in case or truncation never clash),
//! and the readable part itself (`ns/name/proto/port`, plus `__ip/port` for an endpoint). They
//! fit nft's 256-character limit because Kubernetes names are at most 63 characters.

use sha2::{Digest, Sha256};

use crate::model::{Endpoint, Protocol, ServicePortName};

/// The table, in both the `ip` and `ip6` families; not `kube-proxy`, so a real kube-proxy
/// on the same node never shares it.
pub const TABLE: &str = "kproxy";

pub const NAT_PREROUTING: &str = "nat-prerouting";
pub const NAT_OUTPUT: &str = "nat-output";
pub const NAT_POSTROUTING: &str = "nat-postrouting";
pub const FILTER_PREROUTING: &str = "filter-prerouting";
pub const FILTER_INPUT: &str = "filter-input";
pub const FILTER_FORWARD: &str = "filter-forward";
pub const FILTER_OUTPUT: &str = "filter-output";

pub const SERVICES: &str = "services";
pub const MASQUERADING: &str = "masquerading";
pub const MARK_MASQ: &str = "mark-for-masquerade";
pub const SERVICE_ENDPOINTS_CHECK: &str = "service-endpoints-check";
pub const NODEPORT_ENDPOINTS_CHECK: &str = "nodeport-endpoints-check";
pub const FIREWALL_CHECK: &str = "firewall-check";
pub const REJECT_CHAIN: &str = "reject-chain";
/// Where a Service chain without per-endpoint rules DNATs: one rule per protocol and endpoint
/// count, `… @cluster-nN dnat to … numgen random mod N map @service-endpoints`.
pub const CLUSTER_DNAT: &str = "cluster-dnat";
/// The same for a Service's node-local endpoints (`local-nN`, slots from [`LOCAL_SLOTS`]).
pub const LOCAL_DNAT: &str = "local-dnat";

/// The fixed chains a Service address is dispatched to (from the sets of the same names plus
/// `-ips` / `-nodeports`), for every Service whose endpoints are map elements (no session
/// affinity, at most [`MAX_BUCKET`] endpoints): what upstream writes in per-Service chains
/// (masquerade, traffic policy) depends only on which of these four a Service address is in.
/// ClusterIP, internalTrafficPolicy Cluster: masquerade off-cluster sources, `goto cluster-dnat`.
pub const SERVICE_CLUSTER: &str = "service-cluster";
/// ClusterIP, internalTrafficPolicy Local: the same, `goto local-dnat`.
pub const SERVICE_LOCAL: &str = "service-local";
/// NodePort, externalIP, LB IP with externalTrafficPolicy Cluster: masquerade, `goto cluster-dnat`.
pub const EXTERNAL_CLUSTER: &str = "external-cluster";
/// The same with externalTrafficPolicy Local: pods and the node itself use every endpoint
/// (the node masqueraded), other sources keep theirs and `goto local-dnat`.
pub const EXTERNAL_LOCAL: &str = "external-local";

/// Non-base chains that exist whatever the Services.
pub const REGULAR_CHAINS: &[&str] = &[
    SERVICES,
    CLUSTER_DNAT,
    LOCAL_DNAT,
    SERVICE_CLUSTER,
    SERVICE_LOCAL,
    EXTERNAL_CLUSTER,
    EXTERNAL_LOCAL,
    MASQUERADING,
    MARK_MASQ,
    SERVICE_ENDPOINTS_CHECK,
    NODEPORT_ENDPOINTS_CHECK,
    FIREWALL_CHECK,
    REJECT_CHAIN,
];

/// `address . protocol . port : verdict`, where the Services that keep chains of their own
/// (session affinity, more than [`MAX_BUCKET`] endpoints) are dispatched.
pub const SERVICE_IPS: &str = "service-ips";
/// `protocol . port : verdict` for their NodePorts on the node's addresses.
pub const SERVICE_NODEPORTS: &str = "service-nodeports";

/// Plain sets (`address . protocol . port`, `protocol . port`) dispatching every other
/// Service address to a fixed chain: adding or removing one is an element without a verdict,
/// which the kernel commits without validating the table.
pub const SERVICE_CLUSTER_IPS: &str = "service-cluster-ips";
pub const SERVICE_LOCAL_IPS: &str = "service-local-ips";
pub const EXTERNAL_CLUSTER_IPS: &str = "external-cluster-ips";
pub const EXTERNAL_LOCAL_IPS: &str = "external-local-ips";
pub const EXTERNAL_CLUSTER_NODEPORTS: &str = "external-cluster-nodeports";
pub const EXTERNAL_LOCAL_NODEPORTS: &str = "external-local-nodeports";

/// Service addresses (and NodePorts) whose new connections are refused (no endpoints at all):
/// plain sets, `goto reject-chain` in the endpoint checks.
pub const NO_ENDPOINT_REJECT_IPS: &str = "no-endpoint-reject-ips";
pub const NO_ENDPOINT_REJECT_NODEPORTS: &str = "no-endpoint-reject-nodeports";
/// … or dropped (endpoints, but none local for a Local policy), so that a load balancer's
/// health check moves traffic away.
pub const NO_ENDPOINT_DROP_IPS: &str = "no-endpoint-drop-ips";
pub const NO_ENDPOINT_DROP_NODEPORTS: &str = "no-endpoint-drop-nodeports";
/// Load balancer addresses with `loadBalancerSourceRanges`, to their firewall chain.
pub const FIREWALL_IPS: &str = "firewall-ips";

/// Set of `endpoint . endpoint` addresses: a DNATed connection from an endpoint to itself
/// (hairpin) is masqueraded in `nat-postrouting`, so the reply comes back through the node.
pub const HAIRPIN: &str = "hairpin";

/// `address . port . slot : endpoint address . port`, one map per protocol: slot `i` of a
/// Service address is its `i`-th endpoint (from [`LOCAL_SLOTS`] on, its `i`-th node-local one).
pub fn service_endpoints(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "service-endpoints-tcp",
        Protocol::Udp => "service-endpoints-udp",
        Protocol::Sctp => "service-endpoints-sctp",
    }
}

/// `port . slot : endpoint address . port`, per protocol, for NodePorts.
pub fn nodeport_endpoints(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "nodeport-endpoints-tcp",
        Protocol::Udp => "nodeport-endpoints-udp",
        Protocol::Sctp => "nodeport-endpoints-sctp",
    }
}

pub const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

/// Where a Service's node-local endpoints start in its slots.
pub const LOCAL_SLOTS: u32 = 1 << 16;
/// The largest endpoint count with a bucket of its own; a Service with more endpoints (in the
/// subset a chain uses) keeps a cascade of `dnat` rules in its own chain.
pub const MAX_BUCKET: usize = 16;

/// Which bucket: the Service's cluster-wide or node-local endpoints, reached by address or by
/// NodePort.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bucket {
    Cluster,
    Local,
    NodePortCluster,
    NodePortLocal,
}

impl Bucket {
    pub const ALL: [Bucket; 4] = [
        Bucket::Cluster,
        Bucket::Local,
        Bucket::NodePortCluster,
        Bucket::NodePortLocal,
    ];

    fn prefix(self) -> &'static str {
        match self {
            Bucket::Cluster => "cluster",
            Bucket::Local => "local",
            Bucket::NodePortCluster => "nodeport-cluster",
            Bucket::NodePortLocal => "nodeport-local",
        }
    }

    /// The set of Service addresses (or NodePorts) with `n` endpoints in this subset: `cluster-n3`.
    pub fn set(self, n: usize) -> &'static str {
        let i = Bucket::ALL.iter().position(|b| *b == self).unwrap_or(0);
        BUCKETS[i * MAX_BUCKET + n.clamp(1, MAX_BUCKET) - 1]
    }

    /// Which bucket set `name` is, with its endpoint count: the inverse of [`Bucket::set`].
    pub fn of_set(name: &str) -> Option<(Bucket, usize)> {
        let i = BUCKETS.iter().position(|b| *b == name)?;
        Some((Bucket::ALL[i / MAX_BUCKET], i % MAX_BUCKET + 1))
    }

    /// Where this bucket's endpoints start in a Service's slots.
    pub fn first_slot(self) -> u32 {
        match self {
            Bucket::Cluster | Bucket::NodePortCluster => 0,
            Bucket::Local | Bucket::NodePortLocal => LOCAL_SLOTS,
        }
    }
}

static BUCKET_NAMES: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
    Bucket::ALL
        .iter()
        .flat_map(|b| (1..=MAX_BUCKET).map(move |n| format!("{}-n{n}", b.prefix())))
        .collect()
});

/// Every bucket set's name, [`Bucket::ALL`] by endpoint count.
pub static BUCKETS: std::sync::LazyLock<Vec<&'static str>> =
    std::sync::LazyLock::new(|| BUCKET_NAMES.iter().map(String::as_str).collect());

/// The fixed maps and sets.
pub static MAPS: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    let mut v = vec![
        SERVICE_IPS,
        SERVICE_NODEPORTS,
        SERVICE_CLUSTER_IPS,
        SERVICE_LOCAL_IPS,
        EXTERNAL_CLUSTER_IPS,
        EXTERNAL_LOCAL_IPS,
        EXTERNAL_CLUSTER_NODEPORTS,
        EXTERNAL_LOCAL_NODEPORTS,
        NO_ENDPOINT_REJECT_IPS,
        NO_ENDPOINT_REJECT_NODEPORTS,
        NO_ENDPOINT_DROP_IPS,
        NO_ENDPOINT_DROP_NODEPORTS,
        FIREWALL_IPS,
        HAIRPIN,
    ];
    v.extend(PROTOCOLS.iter().map(|p| service_endpoints(*p)));
    v.extend(PROTOCOLS.iter().map(|p| nodeport_endpoints(*p)));
    v.extend(BUCKETS.iter().copied());
    v
});

/// Which claims an element of `map` competes with: a Service address (or NodePort) is
/// dispatched by one set or map of a class, refused by one, filtered by one. Two Services
/// claiming the same key within a class: the first keeps it.
pub fn claim_class(map: &'static str) -> &'static str {
    match map {
        SERVICE_CLUSTER_IPS | SERVICE_LOCAL_IPS | EXTERNAL_CLUSTER_IPS | EXTERNAL_LOCAL_IPS => SERVICE_IPS,
        EXTERNAL_CLUSTER_NODEPORTS | EXTERNAL_LOCAL_NODEPORTS => SERVICE_NODEPORTS,
        NO_ENDPOINT_DROP_IPS => NO_ENDPOINT_REJECT_IPS,
        NO_ENDPOINT_DROP_NODEPORTS => NO_ENDPOINT_REJECT_NODEPORTS,
        // A key is in one bucket of its kind.
        other => match BUCKETS.iter().position(|b| *b == other) {
            Some(i) => BUCKETS[i - i % MAX_BUCKET],
            None => other,
        },
    }
}

/// Every chain that is not generated per Service: the base chains and [`REGULAR_CHAINS`].
pub fn fixed_chains() -> impl Iterator<Item = &'static str> {
    [
        NAT_PREROUTING,
        NAT_OUTPUT,
        NAT_POSTROUTING,
        FILTER_PREROUTING,
        FILTER_INPUT,
        FILTER_FORWARD,
        FILTER_OUTPUT,
    ]
    .into_iter()
    .chain(REGULAR_CHAINS.iter().copied())
}

/// RFC 4648 base32 of the first 5 bytes of SHA-256(`input`): 8 characters.
fn hash8(input: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(input.as_bytes());
    let bits = digest[..5].iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    (0..8)
        .rev()
        .map(|i| char::from(ALPHABET[((bits >> (i * 5)) & 31) as usize]))
        .collect()
}

/// `ns/name/proto/port`: the readable part of a Service port's names.
fn port_base(name: &ServicePortName) -> String {
    format!(
        "{}/{}/{}/{}",
        name.service.namespace, name.service.name, name.protocol, name.port
    )
}

/// nft identifiers allow letters, digits, `/ - _ .`; IPv6 colons become dots.
fn endpoint_base(name: &ServicePortName, ep: &Endpoint) -> String {
    format!(
        "{}__{}/{}",
        port_base(name),
        ep.ip.to_string().replace(':', "."),
        ep.port
    )
}

fn generated(kind: &str, base: &str) -> String {
    format!("{kind}-{}-{base}", hash8(base))
}

/// `service-…`: Cluster-policy load balancing for one Service port.
pub fn service_chain(name: &ServicePortName) -> String {
    generated("service", &port_base(name))
}

/// `local-…`: Local-policy load balancing.
pub fn local_chain(name: &ServicePortName) -> String {
    generated("local", &port_base(name))
}

/// `external-…`: entry for NodePort, externalIP and load-balancer traffic.
pub fn external_chain(name: &ServicePortName) -> String {
    generated("external", &port_base(name))
}

/// `firewall-…`: loadBalancerSourceRanges filter.
pub fn firewall_chain(name: &ServicePortName) -> String {
    generated("firewall", &port_base(name))
}

/// `endpoint-…`: DNAT to one endpoint.
pub fn endpoint_chain(name: &ServicePortName, ep: &Endpoint) -> String {
    generated("endpoint", &endpoint_base(name, ep))
}

/// `affinity-…`: clients recently sent to one endpoint (sessionAffinity ClientIP).
pub fn affinity_set(name: &ServicePortName, ep: &Endpoint) -> String {
    generated("affinity", &endpoint_base(name, ep))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServiceKey};

    #[test]
    fn names_are_stable_readable_and_short_enough() {
        let name = ServicePortName {
            service: ServiceKey::new("default", "web"),
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        let chain = service_chain(&name);
        assert!(
            chain.starts_with("service-") && chain.ends_with("-default/web/tcp/http"),
            "{chain}"
        );
        assert_eq!(chain, service_chain(&name));
        assert_ne!(chain, local_chain(&name));
        let long = ServicePortName {
            service: ServiceKey::new("n".repeat(63), "s".repeat(63)),
            port: (&*"p".repeat(15)).into(),
            protocol: Protocol::Sctp,
        };
        let ep = crate::model::testing::endpoint("fd00:1234:5678:9abc:def0:1234:5678:9abc", 65535).build();
        let set = affinity_set(&long, &ep);
        assert!(set.len() < 256, "{}", set.len());
        assert!(!set.contains(':'), "{set}");
    }
}
