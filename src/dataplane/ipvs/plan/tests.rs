//! The plan from (kernel state, desired state) pairs.

use std::sync::Arc;

use super::*;
use crate::dataplane::ipvs::netlink::RealServerState;
use crate::model::{testing, NodeInfo, PortState, ServicePort, ServiceState};

const NODE_IP: &str = "192.0.2.1";

/// The plan configuration both planning test modules use.
pub(crate) fn cfg() -> PlanConfig {
    PlanConfig {
        family: IpFamily::V4,
        scheduler: "rr".into(),
        nodeport_addresses: vec![NODE_IP.parse().unwrap()],
        exclude_cidrs: vec![],
        graceful_period: Duration::ZERO,
    }
}

/// A TCP Service port `http` on port 80 of `cluster_ip` (both planning test modules use it).
pub(crate) fn port(name: &str, cluster_ip: &str, node_port: Option<u16>) -> ServicePort {
    let p = testing::service_port(&format!("default/{name}"), "http", cluster_ip, 80);
    match node_port {
        Some(np) => p.node_port(np),
        None => p,
    }
    .build()
}

/// `state` is "ready", "terminating" (serving) or "down"; `local` places it on this node.
pub(crate) fn ep(ip: &str, state: &str, local: bool) -> Endpoint {
    let e = testing::endpoint(ip, 8080)
        .node(if local { "node-1" } else { "node-2" })
        .local(local);
    match state {
        "ready" => e,
        "terminating" => e.terminating(),
        _ => e.down(),
    }
    .build()
}

fn state(ports: Vec<(ServicePort, Vec<Endpoint>)>) -> DesiredState {
    let mut d = DesiredState {
        node: NodeInfo {
            name: "node-1".into(),
            ..NodeInfo::default()
        },
        ..DesiredState::default()
    };
    for (p, endpoints) in ports {
        let entry = d.services.entry(p.name.service.clone()).or_default();
        let mut s: ServiceState = (**entry).clone();
        s.ports.push(PortState {
            port: Arc::new(p),
            endpoints: endpoints.into(),
        });
        *entry = Arc::new(s);
    }
    d
}

fn key(addr: &str, port: u16) -> VsKey {
    VsKey {
        addr: addr.parse().unwrap(),
        protocol: Protocol::Tcp,
        port,
    }
}

fn svc(addr: &str, port: u16) -> VirtualService {
    VirtualService {
        key: key(addr, port),
        scheduler: "rr".into(),
        flags: 0,
        timeout: 0,
    }
}

fn rs(addr: &str, weight: u32, conns: u32) -> RealServerState {
    RealServerState {
        server: RealServer {
            addr: addr.parse().unwrap(),
            port: 8080,
            weight,
            fwd_method: FWD_MASQ,
        },
        active_conns: conns,
        inactive_conns: 0,
    }
}

/// The kernel as a full sync would read it: services, all their real servers, local addresses.
fn kernel(services: Vec<(VirtualService, Vec<RealServerState>)>) -> KernelState {
    let mut k = KernelState {
        local_addresses: [NODE_IP, "10.96.0.10", "10.96.0.11"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect(),
        ..KernelState::default()
    };
    for (s, d) in services {
        k.dests.insert(s.key, d);
        k.services.insert(s.key, s);
    }
    k
}

fn text(reqs: &[Request]) -> Vec<String> {
    reqs.iter().map(|r| r.to_string()).collect()
}

fn plan(desired: &DesiredState, k: &KernelState, draining: &mut Draining, now: Instant) -> Vec<String> {
    let d = plan_desired(desired, &cfg());
    text(&plan_requests(&d, k, &Scope::Full, draining, now, &cfg()))
}

#[test]
fn cluster_ip_and_node_port_become_virtual_services() {
    let mut p = port("web", "10.96.0.10", Some(30080));
    p.affinity_timeout = Some(10800);
    let d = plan_desired(
        &state(vec![(
            p,
            vec![ep("10.244.1.2", "ready", true), ep("10.244.2.2", "down", false)],
        )]),
        &cfg(),
    );
    assert_eq!(d.bound, [("10.96.0.10".parse().unwrap(), 1)].into_iter().collect());
    let keys: Vec<String> = d.services.keys().map(|k| k.to_string()).collect();
    assert_eq!(keys, ["tcp:10.96.0.10:80", "tcp:192.0.2.1:30080"]);
    let cip = &d.services[&key("10.96.0.10", 80)];
    assert_eq!(cip.traffic, Traffic::Internal);
    assert!(cip.bound);
    assert_eq!((cip.service.flags, cip.service.timeout), (SVC_F_PERSISTENT, 10800));
    assert_eq!(cip.servers.len(), 1, "only the ready endpoint");
    let np = &d.services[&key(NODE_IP, 30080)];
    assert_eq!(np.traffic, Traffic::External);
    assert!(!np.bound, "NodePort addresses are the node's own");
}

#[test]
fn empty_kernel_gets_services_then_their_real_servers() {
    let desired = state(vec![(
        port("web", "10.96.0.10", None),
        vec![ep("10.244.1.2", "ready", true), ep("10.244.2.2", "ready", false)],
    )]);
    let got = plan(&desired, &kernel(vec![]), &mut Draining::default(), Instant::now());
    assert_eq!(
        got,
        [
            "add service tcp:10.96.0.10:80 (rr)",
            "add real server 10.244.1.2:8080 to tcp:10.96.0.10:80",
            "add real server 10.244.2.2:8080 to tcp:10.96.0.10:80",
        ]
    );
}

#[test]
fn kernel_in_shape_needs_nothing_and_drift_is_repaired() {
    let desired = state(vec![(
        port("web", "10.96.0.10", None),
        vec![ep("10.244.1.2", "ready", true), ep("10.244.2.2", "ready", false)],
    )]);
    let good = kernel(vec![(
        svc("10.96.0.10", 80),
        vec![rs("10.244.1.2", 1, 0), rs("10.244.2.2", 1, 5)],
    )]);
    assert!(plan(&desired, &good, &mut Draining::default(), Instant::now()).is_empty());

    // Changed behind kproxy's back: scheduler, a weight, a server missing.
    let mut wrong = svc("10.96.0.10", 80);
    wrong.scheduler = "wlc".into();
    let drifted = kernel(vec![(wrong, vec![rs("10.244.1.2", 7, 0)])]);
    assert_eq!(
        plan(&desired, &drifted, &mut Draining::default(), Instant::now()),
        [
            "edit service tcp:10.96.0.10:80 (rr)",
            "set weight 1 of real server 10.244.1.2:8080 in tcp:10.96.0.10:80",
            "add real server 10.244.2.2:8080 to tcp:10.96.0.10:80",
        ]
    );
}

#[test]
fn stale_services_are_deleted_only_when_kproxy_may_own_them() {
    let desired = state(vec![]);
    let k = kernel(vec![
        (svc("10.96.0.11", 80), vec![rs("10.244.1.2", 1, 0)]),
        // Not a local address: someone else's virtual service (e.g. a load balancer's).
        (svc("198.51.100.7", 80), vec![]),
    ]);
    assert_eq!(
        plan(&desired, &k, &mut Draining::default(), Instant::now()),
        ["delete service tcp:10.96.0.11:80"]
    );
    let mut c = cfg();
    c.exclude_cidrs = vec!["10.96.0.0/24".parse().unwrap()];
    let d = plan_desired(&desired, &c);
    assert!(plan_requests(&d, &k, &Scope::Full, &mut Draining::default(), Instant::now(), &c).is_empty());
}

#[test]
fn removed_tcp_endpoint_drains_at_weight_zero_then_is_deleted() {
    let one = state(vec![(
        port("web", "10.96.0.10", None),
        vec![ep("10.244.1.2", "ready", true)],
    )]);
    let t0 = Instant::now();
    let mut draining = Draining::default();
    let busy = |w| {
        kernel(vec![(
            svc("10.96.0.10", 80),
            vec![rs("10.244.1.2", 1, 0), rs("10.244.2.2", w, 3)],
        )])
    };
    assert_eq!(
        plan(&one, &busy(1), &mut draining, t0),
        ["set weight 0 of real server 10.244.2.2:8080 in tcp:10.96.0.10:80"]
    );
    assert_eq!(draining.services(), [key("10.96.0.10", 80)].into_iter().collect());
    // Still busy an hour later, and no graceful period: keep waiting.
    assert!(plan(&one, &busy(0), &mut draining, t0 + Duration::from_secs(3600)).is_empty());
    // Connections gone: delete.
    let idle = kernel(vec![(
        svc("10.96.0.10", 80),
        vec![rs("10.244.1.2", 1, 0), rs("10.244.2.2", 0, 0)],
    )]);
    assert_eq!(
        plan(&one, &idle, &mut draining, t0 + Duration::from_secs(3601)),
        ["delete real server 10.244.2.2:8080 from tcp:10.96.0.10:80"]
    );
    assert_eq!(draining.len(), 0);
}

#[test]
fn graceful_period_bounds_the_wait() {
    let one = state(vec![(
        port("web", "10.96.0.10", None),
        vec![ep("10.244.1.2", "ready", true)],
    )]);
    let mut c = cfg();
    c.graceful_period = Duration::from_secs(30);
    let d = plan_desired(&one, &c);
    let k = |w| {
        kernel(vec![(
            svc("10.96.0.10", 80),
            vec![rs("10.244.1.2", 1, 0), rs("10.244.2.2", w, 3)],
        )])
    };
    let t0 = Instant::now();
    let mut draining = Draining::default();
    let step =
        |k: &KernelState, draining: &mut Draining, at| text(&plan_requests(&d, k, &Scope::Full, draining, at, &c));
    assert_eq!(step(&k(1), &mut draining, t0).len(), 1);
    assert!(step(&k(0), &mut draining, t0 + Duration::from_secs(29)).is_empty());
    assert_eq!(
        step(&k(0), &mut draining, t0 + Duration::from_secs(30)),
        ["delete real server 10.244.2.2:8080 from tcp:10.96.0.10:80"]
    );
}

#[test]
fn udp_real_servers_are_deleted_at_once() {
    let mut p = port("dns", "10.96.0.10", None);
    p.name.protocol = Protocol::Udp;
    let desired = state(vec![(p, vec![])]);
    let mut s = svc("10.96.0.10", 80);
    s.key.protocol = Protocol::Udp;
    let k = kernel(vec![(s, vec![rs("10.244.2.2", 1, 9)])]);
    assert_eq!(
        plan(&desired, &k, &mut Draining::default(), Instant::now()),
        ["delete real server 10.244.2.2:8080 from udp:10.96.0.10:80"]
    );
}

#[test]
fn endpoint_back_while_draining_gets_its_weight_back() {
    let both = state(vec![(
        port("web", "10.96.0.10", None),
        vec![ep("10.244.1.2", "ready", true), ep("10.244.2.2", "ready", false)],
    )]);
    let mut draining = Draining::default();
    let k = kernel(vec![(
        svc("10.96.0.10", 80),
        vec![rs("10.244.1.2", 1, 0), rs("10.244.2.2", 0, 3)],
    )]);
    draining.since.insert(
        (key("10.96.0.10", 80), "10.244.2.2".parse().unwrap(), 8080),
        Instant::now(),
    );
    assert_eq!(
        plan(&both, &k, &mut draining, Instant::now()),
        ["set weight 1 of real server 10.244.2.2:8080 in tcp:10.96.0.10:80"]
    );
    assert_eq!(draining.len(), 0);
}

#[test]
fn terminating_endpoint_is_drained_while_ready_ones_serve() {
    let desired = state(vec![(
        port("web", "10.96.0.10", None),
        vec![ep("10.244.1.2", "ready", true), ep("10.244.2.2", "terminating", false)],
    )]);
    let k = kernel(vec![(
        svc("10.96.0.10", 80),
        vec![rs("10.244.1.2", 1, 0), rs("10.244.2.2", 1, 2)],
    )]);
    assert_eq!(
        plan(&desired, &k, &mut Draining::default(), Instant::now()),
        ["set weight 0 of real server 10.244.2.2:8080 in tcp:10.96.0.10:80"]
    );
    // With no ready endpoint left, the terminating one serves (kube-proxy's fallback).
    let only = state(vec![(
        port("web", "10.96.0.10", None),
        vec![ep("10.244.2.2", "terminating", false)],
    )]);
    let d = plan_desired(&only, &cfg());
    assert_eq!(d.services[&key("10.96.0.10", 80)].servers.len(), 1);
}

#[test]
fn external_traffic_policy_local_uses_local_endpoints_on_external_services() {
    let mut p = port("web", "10.96.0.10", Some(30080));
    p.external_policy_local = true;
    p.set_external_ips(vec!["203.0.113.5".parse().unwrap()]);
    let d = plan_desired(
        &state(vec![(
            p,
            vec![ep("10.244.1.2", "ready", true), ep("10.244.2.2", "ready", false)],
        )]),
        &cfg(),
    );
    assert_eq!(d.services[&key("10.96.0.10", 80)].servers.len(), 2, "ClusterIP: all");
    assert_eq!(
        d.services[&key(NODE_IP, 30080)].servers.len(),
        1,
        "NodePort: local only"
    );
    let ext = &d.services[&key("203.0.113.5", 80)];
    assert!(ext.local_policy && ext.bound && ext.servers.len() == 1);

    // No local endpoint: the external services have none, and say so for the drop rule.
    let mut p = port("web", "10.96.0.10", Some(30080));
    p.external_policy_local = true;
    let d = plan_desired(&state(vec![(p, vec![ep("10.244.2.2", "ready", false)])]), &cfg());
    let np = &d.services[&key(NODE_IP, 30080)];
    assert!(np.servers.is_empty() && np.has_any_endpoint);
    assert_eq!(d.no_local_endpoints, (0, 1));
}

#[test]
fn partial_scope_touches_only_the_named_services() {
    let desired = state(vec![(
        port("web", "10.96.0.10", None),
        vec![ep("10.244.1.2", "ready", true)],
    )]);
    // Both services are off in the kernel, but only web's is in scope.
    let k = kernel(vec![(svc("10.96.0.10", 80), vec![]), (svc("10.96.0.11", 80), vec![])]);
    let d = plan_desired(&desired, &cfg());
    let scope = Scope::Only([key("10.96.0.10", 80)].into_iter().collect());
    assert_eq!(
        text(&plan_requests(
            &d,
            &k,
            &scope,
            &mut Draining::default(),
            Instant::now(),
            &cfg()
        )),
        ["add real server 10.244.1.2:8080 to tcp:10.96.0.10:80"]
    );
}

#[test]
fn other_family_is_ignored() {
    let p = testing::service_port("default/web", "http", "10.96.0.10", 80)
        .cluster_ips(["10.96.0.10", "fd00::10"])
        .node_port(30080)
        .build();
    let desired = state(vec![(
        p,
        vec![ep("10.244.1.2", "ready", true), ep("fd00::2", "ready", true)],
    )]);
    let mut c = cfg();
    c.family = IpFamily::V6;
    c.nodeport_addresses = vec![NODE_IP.parse().unwrap(), "2001:db8::1".parse().unwrap()];
    let d = plan_desired(&desired, &c);
    let keys: Vec<String> = d.services.keys().map(|k| k.to_string()).collect();
    assert_eq!(keys, ["tcp:[2001:db8::1]:30080", "tcp:[fd00::10]:80"]);
    assert!(d.services.values().all(|v| v.servers.ips().all(|ip| ip.is_ipv6())));
}

#[test]
fn render_save_reads_like_ipvsadm() {
    let mut p = port("web", "10.96.0.10", None);
    p.affinity_timeout = Some(600);
    let d = plan_desired(&state(vec![(p, vec![ep("10.244.1.2", "ready", true)])]), &cfg());
    assert_eq!(
        render_save(&d),
        "-A -t 10.96.0.10:80 -s rr -p 600\n-a -t 10.96.0.10:80 -r 10.244.1.2:8080 -m -w 1\n"
    );
}

#[test]
fn source_ranges_apply_to_load_balancer_ips_only() {
    let p = testing::service_port("default/web", "http", "10.96.0.10", 80)
        .node_port(30080)
        .load_balancer_ips(["198.51.100.5"])
        .external_ips(["203.0.113.5"])
        .source_ranges(["192.0.2.0/24", "2001:db8::/32"])
        .build();
    let d = plan_desired(&state(vec![(p, vec![ep("10.244.1.2", "ready", true)])]), &cfg());
    let ranges = |addr: &str, port: u16| d.services[&key(addr, port)].source_ranges.clone();
    assert_eq!(
        ranges("198.51.100.5", 80),
        vec!["192.0.2.0/24".parse::<IpNet>().unwrap()]
    );
    assert!(ranges("203.0.113.5", 80).is_empty());
    assert!(ranges("10.96.0.10", 80).is_empty());
    assert!(ranges(NODE_IP, 30080).is_empty());
}

#[test]
fn a_full_sync_in_batches_plans_what_one_pass_does() {
    let desired = state(vec![
        (
            port("web", "10.96.0.10", Some(30080)),
            vec![ep("10.244.1.2", "ready", true), ep("10.244.2.2", "ready", false)],
        ),
        (port("api", "10.96.0.12", None), vec![ep("10.244.1.9", "ready", true)]),
        (port("db", "10.96.0.13", None), vec![]),
    ]);
    let d = plan_desired(&desired, &cfg());
    let mut k = kernel(vec![
        // Drifted: a weight, a server to drain (it has connections).
        (
            svc("10.96.0.10", 80),
            vec![rs("10.244.1.2", 3, 0), rs("10.244.3.3", 1, 2)],
        ),
        // Stale and kproxy's: deleted.
        (svc("10.96.0.11", 80), vec![rs("10.244.1.2", 1, 0)]),
        // Someone else's: not in the scope at all.
        (svc("198.51.100.7", 80), vec![]),
    ]);
    k.local_addresses.insert("10.96.0.12".parse().unwrap());
    let now = Instant::now();
    let mut one_pass = Draining::default();
    let mut whole = text(&plan_requests(&d, &k, &Scope::Full, &mut one_pass, now, &cfg()));

    let scope = full_scope(&d, &k, &cfg());
    assert!(!scope.contains(&key("198.51.100.7", 80)), "{scope:?}");
    assert_eq!(scope.len(), 5, "{scope:?}");
    let mut batched = Vec::new();
    let mut draining = Draining::default();
    let all_dests = std::mem::take(&mut k.dests);
    let mut keys = scope.into_iter().peekable();
    while keys.peek().is_some() {
        let batch: BTreeSet<VsKey> = keys.by_ref().take(2).collect();
        // As the proxier does: only this batch's real servers are read.
        k.dests = all_dests
            .iter()
            .filter(|(key, _)| batch.contains(key))
            .map(|(key, d)| (*key, d.clone()))
            .collect();
        batched.extend(text(&plan_requests(
            &d,
            &k,
            &Scope::Only(batch),
            &mut draining,
            now,
            &cfg(),
        )));
    }
    assert!(
        whole.iter().any(|r| r.starts_with("delete service tcp:10.96.0.11:80")),
        "{whole:?}"
    );
    assert!(whole.iter().any(|r| r.contains("weight 0")), "{whole:?}");
    whole.sort();
    batched.sort();
    assert_eq!(batched, whole);
    assert_eq!(draining, one_pass, "the same real servers are draining");
}
