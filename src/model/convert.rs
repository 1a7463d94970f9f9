//! Kubernetes objects to model values: validation happens here, once per object change.
//!
//! Every error names the object it came from, so an operator can find the bad manifest; a bad
//! object is skipped on its own and never stops the others from being proxied.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::intern::intern;
use super::{
    ClusterIps, Conditions, Endpoint, Name, Names, NodeInfo, Placement, Protocol, ServiceKey, ServicePort,
    ServicePortName,
};

/// Label that hands a Service to another proxy implementation (kube-proxy skips these too).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label linking an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Annotation the EndpointSlice controller sets to when the change that produced the slice happened.
pub const ANNOTATION_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Node label carrying the node's zone.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// `sessionAffinityConfig.clientIP.timeoutSeconds` default, as the API server sets it.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;
/// Taint the cluster autoscaler puts on a node it is about to remove.
const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("Service {service}: invalid cluster IP {ip:?}")]
    ClusterIp { service: ServiceKey, ip: String },
    #[error("Service {service}: ports {port:?} and {other:?} would program the same rules (same name and protocol)")]
    DuplicatePort {
        service: ServiceKey,
        port: String,
        other: String,
    },
    #[error("Service {service}: {count} cluster IPs (at most two, one per family)")]
    TooManyClusterIps { service: ServiceKey, count: usize },
    #[error("Service {service}: has no ports")]
    NoPorts { service: ServiceKey },
    #[error("{kind} {namespace}/{name}: {reason}")]
    Object {
        kind: &'static str,
        namespace: String,
        name: String,
        reason: String,
    },
}

/// Why a valid Service gets no rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    Headless,
    ExternalName,
    OtherProxy,
}

/// A Service after conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceDecision {
    /// Proxy these ports. `warnings` name the parts (ports, IPs) that were dropped as invalid.
    Proxy {
        ports: Vec<Arc<ServicePort>>,
        warnings: Vec<String>,
    },
    /// A valid Service this proxy leaves alone.
    Skip(SkipReason),
}

pub fn service_key_of(svc: &Service) -> ServiceKey {
    ServiceKey::new(
        svc.metadata.namespace.as_deref().unwrap_or("default"),
        svc.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// Converts a v1 Service into the ports kproxy programs.
pub fn convert_service(svc: &Service) -> Result<ServiceDecision, ConvertError> {
    let key = service_key_of(svc);
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
        return Ok(ServiceDecision::Skip(SkipReason::OtherProxy));
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(ServiceDecision::Skip(SkipReason::Headless));
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return Ok(ServiceDecision::Skip(SkipReason::ExternalName));
    }
    let raw_ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => vec![],
    };
    if raw_ips.is_empty() || raw_ips.iter().any(|ip| *ip == "None" || ip.is_empty()) {
        return Ok(ServiceDecision::Skip(SkipReason::Headless));
    }
    let mut cluster_ips = Vec::with_capacity(raw_ips.len());
    for raw in raw_ips {
        let ip = raw.parse::<IpAddr>().map_err(|_| ConvertError::ClusterIp {
            service: key.clone(),
            ip: raw.to_string(),
        })?;
        cluster_ips.push(ip);
    }
    let cluster_ips = ClusterIps::new(&cluster_ips).ok_or_else(|| ConvertError::TooManyClusterIps {
        service: key.clone(),
        count: cluster_ips.len(),
    })?;

    let mut warnings = Vec::new();
    let external_ips = parse_ips(spec.external_ips.iter().flatten(), &key, "externalIP", &mut warnings);
    let is_lb = svc_type == "LoadBalancer";
    let has_node_ports = is_lb || svc_type == "NodePort";
    let load_balancer_ips = if is_lb {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        // ipMode Proxy: the load balancer rewrites the destination itself, so the node must
        // not capture traffic to that IP (it would short-circuit the LB's proxying).
        let vips = ingress
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.as_ref());
        parse_ips(vips, &key, "load balancer ingress IP", &mut warnings)
    } else {
        vec![]
    };
    let mut load_balancer_source_ranges = Vec::new();
    if is_lb {
        for raw in spec.load_balancer_source_ranges.iter().flatten() {
            match raw.trim().parse::<IpNet>() {
                Ok(net) => load_balancer_source_ranges.push(net.trunc()),
                Err(_) => warnings.push(format!(
                    "Service {key}: ignoring invalid loadBalancerSourceRange {raw:?}"
                )),
            }
        }
    }
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    let external_policy_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_policy_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port = spec
        .health_check_node_port
        .filter(|_| is_lb && external_policy_local)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0);

    // The Service's external destinations, shared by all its ports.
    let mut template = ServicePort::new(
        ServicePortName {
            service: key.clone(),
            port: Name::new(""),
            protocol: Protocol::Tcp,
        },
        cluster_ips,
        0,
    );
    template.set_external_ips(external_ips);
    template.set_load_balancer_ips(load_balancer_ips);
    template.set_load_balancer_source_ranges(load_balancer_source_ranges);
    let mut ports = Vec::with_capacity(spec.ports.as_ref().map_or(0, Vec::len));
    let mut seen: BTreeMap<(String, Protocol), String> = BTreeMap::new();
    for p in spec.ports.iter().flatten() {
        let port_name = p.name.clone().unwrap_or_default();
        let label = if port_name.is_empty() {
            p.port.to_string()
        } else {
            port_name.clone()
        };
        let Some(protocol) = Protocol::from_k8s(p.protocol.as_deref()) else {
            warnings.push(format!(
                "Service {key}: skipping port {label}: unknown protocol {:?}",
                p.protocol.as_deref().unwrap_or_default()
            ));
            continue;
        };
        let Some(port) = valid_port(p.port) else {
            warnings.push(format!(
                "Service {key}: skipping port {label}: port {} out of range",
                p.port
            ));
            continue;
        };
        let node_port = match p.node_port.filter(|_| has_node_ports) {
            None | Some(0) => None,
            Some(np) => match valid_port(np) {
                Some(np) => Some(np),
                None => {
                    warnings.push(format!(
                        "Service {key}: skipping port {label}: nodePort {np} out of range"
                    ));
                    continue;
                }
            },
        };
        if let Some(other) = seen.insert((port_name.clone(), protocol), label.clone()) {
            return Err(ConvertError::DuplicatePort {
                service: key,
                port: label,
                other,
            });
        }
        let mut sp = ServicePort::new(
            ServicePortName {
                service: key.clone(),
                port: Name::new(&port_name),
                protocol,
            },
            cluster_ips,
            port,
        );
        sp.share_external_destinations(&template);
        sp.node_port = node_port;
        sp.affinity_timeout = affinity_timeout;
        sp.external_policy_local = external_policy_local;
        sp.internal_policy_local = internal_policy_local;
        sp.health_check_node_port = health_check_node_port;
        ports.push(Arc::new(sp));
    }
    if ports.is_empty() && warnings.is_empty() {
        return Err(ConvertError::NoPorts { service: key });
    }
    ports.shrink_to_fit();
    Ok(ServiceDecision::Proxy { ports, warnings })
}

fn valid_port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

fn parse_ips<'a>(
    raw: impl Iterator<Item = &'a String>,
    key: &ServiceKey,
    what: &str,
    warnings: &mut Vec<String>,
) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for s in raw {
        match s.trim().parse::<IpAddr>() {
            Ok(ip) => out.push(ip),
            Err(_) => warnings.push(format!("Service {key}: ignoring invalid {what} {s:?}")),
        }
    }
    out
}

/// One port of an EndpointSlice, with the slice's endpoints on that port: sorted by address,
/// one per address (a ready copy wins), so a Service port served by this slice alone shares
/// this very list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Name,
    pub port: u16,
    pub protocol: Protocol,
    pub endpoints: Arc<[Endpoint]>,
}

/// An EndpointSlice reduced to what proxying needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceInfo {
    pub service: ServiceKey,
    pub ports: Vec<SlicePort>,
    pub trigger_time: Option<SystemTime>,
}

/// An EndpointSlice's namespace and name, printed `ns/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SliceKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl SliceKey {
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> Self {
        SliceKey {
            namespace: intern(namespace.as_ref()),
            name: Arc::from(name.as_ref()),
        }
    }

    /// The key of `slice` (namespace `default` when unset, as the manifest source allows).
    pub fn of(slice: &EndpointSlice) -> Self {
        SliceKey::new(
            slice.metadata.namespace.as_deref().unwrap_or("default"),
            slice.metadata.name.as_deref().unwrap_or_default(),
        )
    }
}

impl std::fmt::Display for SliceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An EndpointSlice converted as it arrives: everything the store needs, the object itself
/// already dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertedSlice {
    pub key: SliceKey,
    /// `Ok(None)`: a slice proxying ignores (FQDN address type).
    pub info: Result<Option<SliceInfo>, ConvertError>,
    /// Parts (ports, endpoints) dropped as invalid, each naming the slice.
    pub warnings: Vec<String>,
}

/// Converts an EndpointSlice for the store, for the node named `node_name`.
pub fn convert_slice_object(slice: &EndpointSlice, node_name: &str) -> ConvertedSlice {
    let mut warnings = Vec::new();
    let info = convert_endpoint_slice(slice, node_name, &mut warnings);
    ConvertedSlice {
        key: SliceKey::of(slice),
        info,
        warnings,
    }
}

/// Converts a discovery.k8s.io/v1 EndpointSlice. Returns `Ok(None)` for slices proxying ignores
/// (FQDN address type). Invalid endpoints and ports are dropped with a warning.
pub fn convert_endpoint_slice(
    slice: &EndpointSlice,
    node_name: &str,
    warnings: &mut Vec<String>,
) -> Result<Option<SliceInfo>, ConvertError> {
    let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
    let name = slice.metadata.name.as_deref().unwrap_or_default();
    let what = || format!("EndpointSlice {namespace}/{name}");
    let Some(service_name) = slice.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
        return Err(ConvertError::Object {
            kind: "EndpointSlice",
            namespace: namespace.to_string(),
            name: name.to_string(),
            reason: format!("has no {LABEL_SERVICE_NAME} label, so it belongs to no Service"),
        });
    };
    let family = match slice.address_type.as_str() {
        "IPv4" => crate::model::IpFamily::V4,
        "IPv6" => crate::model::IpFamily::V6,
        _ => return Ok(None),
    };
    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for ep in &slice.endpoints {
        // kube-proxy uses the first address only: the API defines the rest as fungible.
        let Some(raw) = ep.addresses.first() else {
            continue;
        };
        let ip = match raw.parse::<IpAddr>() {
            Ok(ip) if crate::model::IpFamily::of(&ip) == family => ip,
            _ => {
                warnings.push(format!(
                    "{}: skipping endpoint with invalid {} address {raw:?}",
                    what(),
                    slice.address_type
                ));
                continue;
            }
        };
        let cond = ep.conditions.as_ref();
        // A nil `ready` means "unknown", which consumers must treat as ready; `serving` mirrors it.
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        let hints = ep.hints.as_ref();
        let zone_hints: Names = hints
            .and_then(|h| h.for_zones.as_ref())
            .into_iter()
            .flatten()
            .map(|z| z.name.as_str())
            .collect();
        let node_hints: Names = hints
            .and_then(|h| h.for_nodes.as_ref())
            .into_iter()
            .flatten()
            .map(|n| n.name.as_str())
            .collect();
        let placement = Placement::new(
            ep.node_name.as_deref().map(Name::new),
            ep.zone.as_deref().map(Name::new),
            zone_hints,
            node_hints,
        );
        endpoints.push(Endpoint::new(
            ip,
            0,
            Conditions {
                ready,
                serving,
                terminating,
            },
            placement,
            ep.node_name.as_deref() == Some(node_name),
        ));
    }
    let endpoints = dedup_by_address(endpoints);
    // Exactly as long as needed: kept for as long as the slice is.
    let mut ports = Vec::with_capacity(slice.ports.as_ref().map_or(0, Vec::len));
    for p in slice.ports.iter().flatten() {
        let pname = p.name.as_deref().unwrap_or_default();
        let Some(protocol) = Protocol::from_k8s(p.protocol.as_deref()) else {
            warnings.push(format!("{}: skipping port {pname:?}: unknown protocol", what()));
            continue;
        };
        let Some(port) = p.port.and_then(valid_port) else {
            warnings.push(format!("{}: skipping port {pname:?}: missing or out of range", what()));
            continue;
        };
        ports.push(SlicePort {
            name: Name::new(pname),
            port,
            protocol,
            endpoints: endpoints.iter().map(|ep| Endpoint { port, ..ep.clone() }).collect(),
        });
    }
    let trigger_time = slice
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_TRIGGER_TIME))
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(SystemTime::from);
    ports.shrink_to_fit();
    Ok(Some(SliceInfo {
        service: ServiceKey::new(namespace, service_name),
        ports,
        trigger_time,
    }))
}

/// One endpoint per address, sorted by address: the first ready copy wins, else the first.
fn dedup_by_address(endpoints: Vec<Endpoint>) -> Vec<Endpoint> {
    let mut by_ip: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
    for ep in endpoints {
        match by_ip.get(&ep.ip) {
            Some(existing) if existing.ready() || !ep.ready() => {}
            _ => {
                by_ip.insert(ep.ip, ep);
            }
        }
    }
    by_ip.into_values().collect()
}

/// The endpoints of one Service port, merged over all slices of its Service: matched by port
/// name and protocol, deduplicated by address (a ready copy wins; among equals, the first
/// slice's), sorted. When one slice alone serves the port, its list is shared, not copied.
/// `slices` are the ports of each slice.
pub fn merge_endpoints<'a>(port: &ServicePortName, slices: impl Iterator<Item = &'a [SlicePort]>) -> Arc<[Endpoint]> {
    let name = port.port;
    let mut matching = slices.flat_map(|ports| {
        ports
            .iter()
            .filter(|sp| sp.name == name && sp.protocol == port.protocol)
    });
    let Some(first) = matching.next() else {
        return Arc::from([]);
    };
    let Some(second) = matching.next() else {
        return first.endpoints.clone();
    };
    let mut merged: BTreeMap<(IpAddr, u16), &Endpoint> = BTreeMap::new();
    for sp in [first, second].into_iter().chain(matching) {
        for ep in sp.endpoints.iter() {
            match merged.get(&(ep.ip, ep.port)) {
                Some(existing) if existing.ready() || !ep.ready() => {}
                _ => {
                    merged.insert((ep.ip, ep.port), ep);
                }
            }
        }
    }
    merged.into_values().cloned().collect()
}

/// A Service converted as it arrives: the store's whole record of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertedService {
    pub key: ServiceKey,
    /// `spec.externalName` of an ExternalName Service: no rules, but Ingress may route to it.
    pub external_name: Option<String>,
    pub decision: Result<ServiceDecision, ConvertError>,
}

/// Converts a Service for the store.
pub fn convert_service_object(svc: &Service) -> ConvertedService {
    let external_name = svc
        .spec
        .as_ref()
        .filter(|s| s.type_.as_deref() == Some("ExternalName"))
        .and_then(|s| s.external_name.clone());
    ConvertedService {
        key: service_key_of(svc),
        external_name,
        decision: convert_service(svc),
    }
}

/// This node as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertedNode {
    pub info: NodeInfo,
    /// False while the node is being deleted or drained by the cluster autoscaler: kube-proxy
    /// then reports it unhealthy so load balancers stop sending it traffic.
    pub eligible: bool,
}

/// Converts this node's Node object for the store.
pub fn convert_node_object(node: &Node) -> ConvertedNode {
    let deleting = node.metadata.deletion_timestamp.is_some();
    let draining = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TAINT_TO_BE_DELETED));
    ConvertedNode {
        info: convert_node(node),
        eligible: !(deleting || draining),
    }
}

/// Converts the v1 Node kproxy runs on.
pub fn convert_node(node: &Node) -> NodeInfo {
    let mut addresses = Vec::new();
    let status_addrs = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for a in status_addrs.into_iter().flatten() {
        if matches!(a.type_.as_str(), "InternalIP" | "ExternalIP") {
            if let Ok(ip) = a.address.parse::<IpAddr>() {
                if !addresses.contains(&ip) {
                    addresses.push(ip);
                }
            }
        }
    }
    let spec = node.spec.as_ref();
    let mut pod_cidrs: BTreeSet<IpNet> = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.parse().ok())
        .collect();
    if let Some(c) = spec.and_then(|s| s.pod_cidr.as_ref()).and_then(|c| c.parse().ok()) {
        pod_cidrs.insert(c);
    }
    NodeInfo {
        name: node.metadata.name.clone().unwrap_or_default(),
        zone: node.metadata.labels.as_ref().and_then(|l| l.get(LABEL_ZONE)).cloned(),
        addresses,
        pod_cidrs: pod_cidrs.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).expect("test Service parses")
    }

    fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml::from_str(yaml).expect("test EndpointSlice parses")
    }

    const WALKTHROUGH_SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: myapp-svc, namespace: default}
spec:
  selector: {app: myapp}
  clusterIP: 10.96.0.50
  ports: [{protocol: TCP, port: 80, targetPort: 80}]
  type: ClusterIP
"#;

    #[test]
    fn walkthrough_service_converts() {
        let ServiceDecision::Proxy { ports, warnings } = convert_service(&service(WALKTHROUGH_SVC)).unwrap() else {
            panic!("expected Proxy");
        };
        assert!(warnings.is_empty());
        assert_eq!(ports.len(), 1);
        let p = &ports[0];
        assert_eq!(p.name.to_string(), "default/myapp-svc");
        assert_eq!(*p.cluster_ips, ["10.96.0.50".parse::<IpAddr>().unwrap()]);
        assert_eq!((p.port, p.node_port, p.name.protocol), (80, None, Protocol::Tcp));
    }

    #[test]
    fn skipped_services() {
        let headless = service("metadata: {name: h, namespace: ns}\nspec: {clusterIP: None, ports: [{port: 80}]}");
        assert_eq!(
            convert_service(&headless),
            Ok(ServiceDecision::Skip(SkipReason::Headless))
        );
        let ext = service("metadata: {name: e}\nspec: {type: ExternalName, externalName: example.com}");
        assert_eq!(
            convert_service(&ext),
            Ok(ServiceDecision::Skip(SkipReason::ExternalName))
        );
        let other = service(
            "metadata: {name: o, labels: {service.kubernetes.io/service-proxy-name: foo}}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}",
        );
        assert_eq!(
            convert_service(&other),
            Ok(ServiceDecision::Skip(SkipReason::OtherProxy))
        );
    }

    #[test]
    fn bad_cluster_ip_names_the_service() {
        let bad =
            service("metadata: {name: bad, namespace: prod}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}");
        let err = convert_service(&bad).unwrap_err();
        assert_eq!(err.to_string(), "Service prod/bad: invalid cluster IP \"10.96.0.300\"");
    }

    #[test]
    fn more_than_two_cluster_ips_name_the_service() {
        let bad = service(
            "metadata: {name: three, namespace: prod}\nspec: {clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, 'fd00::1', 10.96.0.2], ports: [{port: 80}]}",
        );
        let err = convert_service(&bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Service prod/three: 3 cluster IPs (at most two, one per family)"
        );
    }

    #[test]
    fn bad_ports_are_skipped_with_warnings_and_good_ones_kept() {
        let svc = service(
            r#"
metadata: {name: mixed, namespace: ns}
spec:
  type: NodePort
  clusterIP: 10.96.0.7
  ports:
  - {name: ok, port: 80, nodePort: 30080}
  - {name: big, port: 70000}
  - {name: proto, port: 81, protocol: ICMP}
  - {name: np, port: 82, nodePort: 99999}
"#,
        );
        let ServiceDecision::Proxy { ports, warnings } = convert_service(&svc).unwrap() else {
            panic!("expected Proxy");
        };
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].node_port, Some(30080));
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings[0].contains("ns/mixed") && warnings[0].contains("big"));
    }

    #[test]
    fn duplicate_port_names_collide() {
        let svc = service(
            "metadata: {name: d}\nspec: {clusterIP: 10.96.0.8, ports: [{name: a, port: 80}, {name: a, port: 81}]}",
        );
        assert!(matches!(convert_service(&svc), Err(ConvertError::DuplicatePort { .. })));
    }

    #[test]
    fn load_balancer_fields() {
        let svc = service(
            r#"
metadata: {name: lb, namespace: ns}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.9
  externalIPs: [192.0.2.10, bogus]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  loadBalancerSourceRanges: [" 203.0.113.0/24 "]
  sessionAffinity: ClientIP
  ports: [{port: 443, nodePort: 31443}]
status:
  loadBalancer:
    ingress: [{ip: 198.51.100.1}, {ip: 198.51.100.2, ipMode: Proxy}]
"#,
        );
        let ServiceDecision::Proxy { ports, warnings } = convert_service(&svc).unwrap() else {
            panic!("expected Proxy");
        };
        let p = &ports[0];
        assert_eq!(p.external_ips(), ["192.0.2.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(p.load_balancer_ips(), ["198.51.100.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            p.load_balancer_source_ranges(),
            ["203.0.113.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(p.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
        assert!(p.external_policy_local);
        assert_eq!(p.health_check_node_port, Some(32000));
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn slices_merge_by_port_name_and_readiness() {
        let a = slice(
            r#"
metadata: {name: svc-a, namespace: ns, labels: {kubernetes.io/service-name: svc}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]
endpoints:
- {addresses: [10.244.1.2], conditions: {ready: true}, nodeName: n1}
- {addresses: [10.244.1.3], conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [not-an-ip]}
"#,
        );
        let b = slice(
            r#"
metadata: {name: svc-b, namespace: ns, labels: {kubernetes.io/service-name: svc}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.3], conditions: {ready: true}}
- {addresses: [10.244.2.9]}
"#,
        );
        let mut warnings = vec![];
        let a = convert_endpoint_slice(&a, "n1", &mut warnings).unwrap().unwrap();
        let b = convert_endpoint_slice(&b, "n1", &mut warnings).unwrap().unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("EndpointSlice ns/svc-a"));
        let http = ServicePortName {
            service: ServiceKey::new("ns", "svc"),
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        let eps = merge_endpoints(&http, [&a.ports[..], &b.ports[..]].into_iter());
        let summary: Vec<_> = eps.iter().map(|e| (e.addr_string(), e.ready(), e.is_local())).collect();
        assert_eq!(
            summary,
            vec![
                ("10.244.1.2:8080".to_string(), true, true),
                ("10.244.1.3:8080".to_string(), true, false),
                ("10.244.2.9:8080".to_string(), true, false),
            ]
        );
        let dns = ServicePortName {
            port: "dns".into(),
            protocol: Protocol::Udp,
            ..http.clone()
        };
        assert_eq!(merge_endpoints(&dns, [&a.ports[..], &b.ports[..]].into_iter()).len(), 2);
    }

    #[test]
    fn slice_without_service_label_is_an_error_naming_it() {
        let s = slice("metadata: {name: orphan, namespace: ns}\naddressType: IPv4\nendpoints: []");
        let err = convert_endpoint_slice(&s, "n1", &mut vec![]).unwrap_err();
        assert!(err.to_string().starts_with("EndpointSlice ns/orphan:"));
    }

    #[test]
    fn trigger_time_is_parsed() {
        let s = slice(
            "metadata: {name: s, namespace: ns, labels: {kubernetes.io/service-name: x}, annotations: {endpoints.kubernetes.io/last-change-trigger-time: '2024-01-02T03:04:05Z'}}\naddressType: IPv4\nendpoints: []",
        );
        let info = convert_endpoint_slice(&s, "n1", &mut vec![]).unwrap().unwrap();
        let secs = info
            .trigger_time
            .unwrap()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(secs, 1704164645);
    }

    #[test]
    fn node_conversion() {
        let node: Node = serde_yaml::from_str(
            r#"
metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}
spec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24]}
status: {addresses: [{type: InternalIP, address: 172.18.0.2}, {type: Hostname, address: n1}]}
"#,
        )
        .unwrap();
        let info = convert_node(&node);
        assert_eq!(info.name, "n1");
        assert_eq!(info.zone.as_deref(), Some("z1"));
        assert_eq!(info.addresses, vec!["172.18.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(info.pod_cidrs.len(), 1);
    }
}
