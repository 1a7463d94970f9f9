//! What the rule-writing modes (iptables and nftables) decide alike about one Service port in
//! one IP family: which addresses and endpoints belong to the family, and where traffic goes.
//! Only the kernel objects differ between the modes; these decisions must not.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::topology::EndpointSets;
use crate::model::{Endpoint, IpFamily, PortState, ServicePort};

/// A Service port's addresses and endpoints in one family.
pub struct FamilyView<'a> {
    pub cluster_ip: IpAddr,
    pub external_ips: Vec<&'a IpAddr>,
    pub lb_ips: Vec<&'a IpAddr>,
    pub source_ranges: Vec<&'a IpNet>,
    pub endpoints: Vec<Endpoint>,
}

impl<'a> FamilyView<'a> {
    /// `None` when the port has no cluster IP of `family` (the other family's proxier handles it).
    pub fn of(ps: &'a PortState, family: IpFamily) -> Option<FamilyView<'a>> {
        let sp = &*ps.port;
        let in_family = |ip: &&IpAddr| IpFamily::of(ip) == family;
        Some(FamilyView {
            cluster_ip: *sp.cluster_ips.iter().find(|ip| IpFamily::of(ip) == family)?,
            external_ips: sp.external_ips().iter().filter(in_family).collect(),
            lb_ips: sp.load_balancer_ips().iter().filter(in_family).collect(),
            source_ranges: sp
                .load_balancer_source_ranges()
                .iter()
                .filter(|n| IpFamily::of(&n.addr()) == family)
                .collect(),
            endpoints: ps
                .endpoints
                .iter()
                .filter(|e| IpFamily::of(&e.ip) == family)
                .cloned()
                .collect(),
        })
    }
}

/// Where a port's traffic goes, given its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortPolicy {
    /// A NodePort, externalIP or LoadBalancer IP in this family.
    pub externally_accessible: bool,
    pub has_endpoints: bool,
    /// Internal traffic has an endpoint to go to (else it is refused or dropped).
    pub has_internal: bool,
    /// External traffic has an endpoint to go to.
    pub has_external: bool,
    /// Internal traffic uses the node-local endpoints (internalTrafficPolicy Local).
    pub internal_local: bool,
    /// External traffic uses the node-local endpoints (externalTrafficPolicy Local).
    pub external_local: bool,
    /// LoadBalancer IPs pass a source-range firewall first.
    pub uses_firewall: bool,
}

impl PortPolicy {
    pub fn decide(sp: &ServicePort, view: &FamilyView<'_>, sets: &EndpointSets<'_>) -> PortPolicy {
        let externally_accessible = sp.node_port.is_some() || !view.external_ips.is_empty() || !view.lb_ips.is_empty();
        let has_endpoints = sets.has_any;
        let local_empty = sets.local.is_empty();
        let internal_local = sp.internal_policy_local;
        let external_local = sp.external_policy_local && externally_accessible;
        PortPolicy {
            externally_accessible,
            has_endpoints,
            has_internal: has_endpoints && !(internal_local && local_empty),
            has_external: has_endpoints && !(external_local && local_empty),
            internal_local,
            external_local,
            uses_firewall: has_endpoints && !view.lb_ips.is_empty() && !view.source_ranges.is_empty(),
        }
    }
}
