//! Which endpoints a Service port uses on this node: readiness, terminating fallback,
//! traffic policies and topology hints, with kube-proxy's rules (its `CategorizeEndpoints`).

use std::collections::BTreeSet;

use super::{Endpoint, Name, ServicePort};

/// The endpoints a dataplane programs for one Service port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointSets<'a> {
    /// For traffic with `Cluster` policy (internal traffic without iTP Local, external without eTP Local).
    pub cluster: Vec<&'a Endpoint>,
    /// For traffic with `Local` policy: endpoints on this node.
    pub local: Vec<&'a Endpoint>,
    /// The union of the two: every endpoint some packet may be sent to.
    pub all_reachable: Vec<&'a Endpoint>,
    /// Whether the Service has any usable endpoint anywhere (decides reject vs drop).
    pub has_any: bool,
}

/// Topology mode chosen from the hints on the ready endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopologyMode {
    None,
    SameZone,
    SameNode,
}

/// Port uses cluster-wide endpoints: iTP Cluster, or any external access (eTP Local still
/// needs cluster endpoints for traffic that starts inside the cluster).
pub fn uses_cluster_endpoints(port: &ServicePort) -> bool {
    !port.internal_policy_local || port.has_external_destinations()
}

/// Port uses node-local endpoints for some of its traffic.
pub fn uses_local_endpoints(port: &ServicePort) -> bool {
    port.internal_policy_local || (port.external_policy_local && port.has_external_destinations())
}

/// Splits `endpoints` into the sets a dataplane needs, for the node named `node_name` in `zone`.
pub fn categorize_endpoints<'a>(
    endpoints: &'a [Endpoint],
    port: &ServicePort,
    node_name: &str,
    zone: Option<&str>,
) -> EndpointSets<'a> {
    let mut sets = EndpointSets::default();

    if uses_cluster_endpoints(port) {
        // Hints hold interned names: a name never interned is in no hint.
        let node = Name::find(node_name);
        let zone_name = zone.and_then(Name::find);
        let mode = topology_mode(endpoints, node, zone_name, node_name, zone);
        let fits = |ep: &Endpoint| match mode {
            TopologyMode::None => true,
            TopologyMode::SameZone => zone_name.is_some_and(|z| ep.zone_hints().contains_name(z)),
            TopologyMode::SameNode => node.is_some_and(|n| ep.node_hints().contains_name(n)),
        };
        sets.cluster = endpoints.iter().filter(|ep| ep.ready() && fits(ep)).collect();
        // No ready endpoint anywhere (topology was already ignored when the zone had none):
        // fall back to endpoints that are terminating but still serving, so a rolling
        // update never blackholes traffic.
        if sets.cluster.is_empty() {
            sets.cluster = endpoints
                .iter()
                .filter(|ep| ep.serving() && ep.terminating() && fits(ep))
                .collect();
        }
        sets.has_any = !sets.cluster.is_empty();
    }

    if !uses_local_endpoints(port) {
        sets.all_reachable = sets.cluster.clone();
        return sets;
    }

    let mut local_ready = false;
    let mut local_terminating = false;
    for ep in endpoints {
        if ep.ready() {
            sets.has_any = true;
            local_ready |= ep.is_local();
        } else if ep.serving() && ep.terminating() {
            sets.has_any = true;
            local_terminating |= ep.is_local();
        }
    }
    if local_ready {
        sets.local = endpoints.iter().filter(|ep| ep.is_local() && ep.ready()).collect();
    } else if local_terminating {
        sets.local = endpoints
            .iter()
            .filter(|ep| ep.is_local() && ep.serving() && ep.terminating())
            .collect();
    }

    if !uses_cluster_endpoints(port) {
        sets.all_reachable = sets.local.clone();
        return sets;
    }
    let mut seen = BTreeSet::new();
    sets.all_reachable = sets
        .cluster
        .iter()
        .chain(sets.local.iter())
        .copied()
        .filter(|ep| seen.insert((ep.ip, ep.port)))
        .collect();
    sets
}

/// Hints are honoured only when every ready endpoint carries them and at least one fits this
/// node; otherwise kube-proxy ignores them all (a partial rollout of hints must not skew traffic).
fn topology_mode(
    endpoints: &[Endpoint],
    node: Option<Name>,
    zone_name: Option<Name>,
    node_name: &str,
    zone: Option<&str>,
) -> TopologyMode {
    let mut all_node_hints = true;
    let mut any_for_node = false;
    let mut all_zone_hints = true;
    let mut any_for_zone = false;
    let mut any_ready = false;
    for ep in endpoints.iter().filter(|ep| ep.ready()) {
        any_ready = true;
        if ep.node_hints().is_empty() {
            all_node_hints = false;
        } else if node.is_some_and(|n| ep.node_hints().contains_name(n)) {
            any_for_node = true;
        }
        if ep.zone_hints().is_empty() {
            all_zone_hints = false;
        } else if zone_name.is_some_and(|z| ep.zone_hints().contains_name(z)) {
            any_for_zone = true;
        }
    }
    if !any_ready {
        return TopologyMode::None;
    }
    if all_node_hints && any_for_node {
        return TopologyMode::SameNode;
    }
    if all_zone_hints {
        if any_for_zone {
            return TopologyMode::SameZone;
        }
        tracing::debug!(
            node = node_name,
            ?zone,
            "ignoring topology hints: none fits this node's zone"
        );
    }
    TopologyMode::None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{endpoint, service_port};

    fn port(itp_local: bool, etp_local: bool, node_port: bool) -> ServicePort {
        let mut p = service_port("ns/svc", "http", "10.96.0.10", 80);
        if itp_local {
            p = p.internal_policy_local();
        }
        if etp_local {
            p = p.external_policy_local();
        }
        if node_port {
            p = p.node_port(30080);
        }
        p.build()
    }

    fn ep(ip: &str, state: &str, local: bool, zones: &[&str]) -> Endpoint {
        let e = endpoint(ip, 8080)
            .node(if local { "me" } else { "other" })
            .local(local)
            .zone_hints(zones.iter().copied());
        match state {
            "ready" => e,
            "terminating" => e.terminating(),
            _ => e.down(),
        }
        .build()
    }

    fn ips(eps: &[&Endpoint]) -> Vec<String> {
        eps.iter().map(|e| e.ip.to_string()).collect()
    }

    #[test]
    fn only_ready_endpoints_when_some_are_ready() {
        let eps = [
            ep("10.0.0.1", "ready", false, &[]),
            ep("10.0.0.2", "terminating", false, &[]),
            ep("10.0.0.3", "down", false, &[]),
        ];
        let sets = categorize_endpoints(&eps, &port(false, false, false), "me", None);
        assert_eq!(ips(&sets.cluster), ["10.0.0.1"]);
        assert!(sets.local.is_empty());
        assert!(sets.has_any);
    }

    #[test]
    fn serving_terminating_used_when_nothing_is_ready() {
        let eps = [
            ep("10.0.0.2", "terminating", false, &[]),
            ep("10.0.0.3", "down", false, &[]),
        ];
        let sets = categorize_endpoints(&eps, &port(false, false, false), "me", None);
        assert_eq!(ips(&sets.cluster), ["10.0.0.2"]);
        assert!(sets.has_any);
    }

    #[test]
    fn no_endpoints_means_has_any_false() {
        let eps = [ep("10.0.0.3", "down", false, &[])];
        let sets = categorize_endpoints(&eps, &port(false, false, false), "me", None);
        assert!(sets.cluster.is_empty());
        assert!(!sets.has_any);
    }

    #[test]
    fn internal_local_uses_only_local_and_reports_remote_ones() {
        let eps = [ep("10.0.0.1", "ready", false, &[]), ep("10.0.0.2", "ready", true, &[])];
        let sets = categorize_endpoints(&eps, &port(true, false, false), "me", None);
        assert!(sets.cluster.is_empty());
        assert_eq!(ips(&sets.local), ["10.0.0.2"]);
        assert_eq!(ips(&sets.all_reachable), ["10.0.0.2"]);

        let remote_only = [ep("10.0.0.1", "ready", false, &[])];
        let sets = categorize_endpoints(&remote_only, &port(true, false, false), "me", None);
        assert!(sets.local.is_empty());
        assert!(
            sets.has_any,
            "remote endpoints exist, so iTP Local drops rather than rejects"
        );
    }

    #[test]
    fn external_local_keeps_cluster_endpoints_for_internal_traffic() {
        let eps = [ep("10.0.0.1", "ready", false, &[]), ep("10.0.0.2", "ready", true, &[])];
        let sets = categorize_endpoints(&eps, &port(false, true, true), "me", None);
        assert_eq!(ips(&sets.cluster), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(ips(&sets.local), ["10.0.0.2"]);
        assert_eq!(ips(&sets.all_reachable), ["10.0.0.1", "10.0.0.2"]);
    }

    #[test]
    fn local_terminating_fallback() {
        let eps = [
            ep("10.0.0.1", "ready", false, &[]),
            ep("10.0.0.2", "terminating", true, &[]),
        ];
        let sets = categorize_endpoints(&eps, &port(false, true, true), "me", None);
        assert_eq!(ips(&sets.local), ["10.0.0.2"]);
        assert_eq!(ips(&sets.cluster), ["10.0.0.1"]);
    }

    #[test]
    fn zone_hints_honoured_only_when_complete_and_matching() {
        let eps = [
            ep("10.0.0.1", "ready", false, &["a"]),
            ep("10.0.0.2", "ready", false, &["b"]),
        ];
        let sets = categorize_endpoints(&eps, &port(false, false, false), "me", Some("a"));
        assert_eq!(ips(&sets.cluster), ["10.0.0.1"]);
        // No endpoint hinted for our zone: hints ignored.
        let sets = categorize_endpoints(&eps, &port(false, false, false), "me", Some("c"));
        assert_eq!(ips(&sets.cluster), ["10.0.0.1", "10.0.0.2"]);
        // One ready endpoint without hints: all hints ignored.
        let partial = [
            ep("10.0.0.1", "ready", false, &["a"]),
            ep("10.0.0.2", "ready", false, &[]),
        ];
        let sets = categorize_endpoints(&partial, &port(false, false, false), "me", Some("a"));
        assert_eq!(ips(&sets.cluster), ["10.0.0.1", "10.0.0.2"]);
    }

    #[test]
    fn node_hints_prefer_same_node() {
        let a = endpoint("10.0.0.1", 8080).node("me").local(true).node_hints(["me"]);
        let b = endpoint("10.0.0.2", 8080).node("other").node_hints(["other"]);
        let eps = [a.build(), b.build()];
        let sets = categorize_endpoints(&eps, &port(false, false, false), "me", None);
        assert_eq!(ips(&sets.cluster), ["10.0.0.1"]);
    }
}
