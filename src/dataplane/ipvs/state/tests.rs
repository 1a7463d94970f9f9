//! Partial syncs planned against the record of the last sync: what they read, what they write.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::dataplane::ipvs::netlink::{RealServer, Request, FWD_MASQ};
use crate::dataplane::ipvs::plan::{plan_desired, plan_requests, Scope};
use crate::dataplane::ipvs::rules::render_element_changes;
use crate::model::{Endpoint, IpFamily, NodeInfo, PortState, Protocol, ServicePort, ServiceState};

use crate::dataplane::ipvs::plan::tests::{cfg, ep, port};

fn name(n: &str) -> ServiceKey {
    ServiceKey::new("default", n)
}

/// Puts one single-port Service into `d` (replacing it).
fn put(d: &mut DesiredState, p: ServicePort, endpoints: &[&str]) {
    let eps: Vec<Endpoint> = endpoints.iter().map(|e| ep(e, "ready", true)).collect();
    d.services.insert(
        p.name.service.clone(),
        Arc::new(ServiceState {
            ports: vec![PortState {
                port: Arc::new(p),
                endpoints: eps.into(),
            }],
        }),
    );
}

/// 100 Services `svc-N` on 10.96.0.N, two endpoints each.
fn cluster() -> DesiredState {
    let mut d = DesiredState {
        node: NodeInfo {
            name: "node-1".into(),
            ..NodeInfo::default()
        },
        ..DesiredState::default()
    };
    for i in 0..100 {
        put(
            &mut d,
            port(&format!("svc-{i}"), &format!("10.96.0.{}", i + 1), None),
            &[&format!("10.244.{i}.1"), &format!("10.244.{i}.2")],
        );
    }
    d
}

fn vs_key(addr: &str, port: u16) -> VsKey {
    VsKey {
        addr: addr.parse().unwrap(),
        protocol: Protocol::Tcp,
        port,
    }
}

/// The record after a full sync of `d`.
fn committed(d: &DesiredState) -> Committed {
    Committed::new(plan_desired(d, &cfg()), cfg(), 7)
}

/// The real servers the kernel holds for `key` when it is as `c` says (none busy).
fn dests_of(c: &Committed, change: &Change) -> BTreeMap<VsKey, Vec<RealServerState>> {
    c.existing(change)
        .map(|key| {
            let servers = c.ipvs.services[key]
                .servers
                .iter()
                .map(|(addr, port)| RealServerState {
                    server: RealServer {
                        addr,
                        port,
                        weight: crate::dataplane::ipvs::plan::WEIGHT,
                        fwd_method: FWD_MASQ,
                    },
                    active_conns: 0,
                    inactive_conns: 0,
                })
                .collect();
            (*key, servers)
        })
        .collect()
}

/// One partial sync of `changed`: the IPVS requests, the edits, and the record after it.
fn partial(c: &mut Committed, d: &DesiredState, changed: &[&str], draining: &mut Draining) -> (Vec<String>, Edits) {
    let changed: BTreeSet<ServiceKey> = changed.iter().map(|n| name(n)).collect();
    let change = c.plan_change(d, &changed, draining);
    let kernel = c.kernel_view(&change, dests_of(c, &change));
    let requests = plan_requests(
        &change.want,
        &kernel,
        &Scope::Only(change.scope.clone()),
        draining,
        Instant::now(),
        &c.cfg,
    );
    let edits = c.edits(&change);
    c.commit(change);
    (requests.iter().map(Request::to_string).collect(), edits)
}

fn texts(elements: &[(SetName, Element)]) -> Vec<String> {
    elements.iter().map(|(s, e)| format!("{} {e}", s.as_str())).collect()
}

/// After any partial sync, the record is what a full sync would have planned.
fn assert_record_matches(c: &Committed, d: &DesiredState) {
    let full = Committed::new(plan_desired(d, &cfg()), cfg(), 7);
    assert_eq!(c.ipvs, full.ipvs, "the record drifted from a full plan");
    assert_eq!(c.hairpin, full.hairpin, "hairpin counts drifted");
}

#[test]
fn a_new_endpoint_touches_only_its_service() {
    let mut d = cluster();
    let mut c = committed(&d);
    put(
        &mut d,
        port("svc-41", "10.96.0.42", None),
        &["10.244.41.1", "10.244.41.2", "10.244.41.3"],
    );
    let changed: BTreeSet<ServiceKey> = [name("svc-41")].into_iter().collect();
    let change = c.plan_change(&d, &changed, &Draining::default());
    assert_eq!(change.scope, [vs_key("10.96.0.42", 80)].into_iter().collect());
    assert_eq!(
        c.existing(&change).collect::<Vec<_>>(),
        [&vs_key("10.96.0.42", 80)],
        "only this virtual service's real servers are read"
    );

    let (requests, edits) = partial(&mut c, &d, &["svc-41"], &mut Draining::default());
    assert_eq!(requests, ["add real server 10.244.41.3:8080 to tcp:10.96.0.42:80"]);
    assert!(edits.bind.is_empty() && edits.unbind.is_empty());
    assert_eq!(texts(&edits.add_elements), ["hairpin 10.244.41.3 . 10.244.41.3"]);
    assert!(edits.delete_elements.is_empty());
    assert_eq!(
        render_element_changes(IpFamily::V4, &edits.delete_elements, &edits.add_elements),
        "add element ip kproxy-ipvs hairpin { 10.244.41.3 . 10.244.41.3 }\n"
    );
    assert_record_matches(&c, &d);
}

#[test]
fn an_unchanged_service_is_not_planned_even_if_it_differs() {
    let d = cluster();
    let mut c = committed(&d);
    // svc-7 changed in the model, but the change set names svc-8 only: svc-7 waits for its
    // own change or the next full sync.
    let mut d2 = d.clone();
    put(&mut d2, port("svc-7", "10.96.0.8", None), &[]);
    let (requests, edits) = partial(&mut c, &d2, &["svc-8"], &mut Draining::default());
    assert!(requests.is_empty(), "{requests:?}");
    assert_eq!(edits, Edits::default());
}

#[test]
fn a_deleted_service_goes_with_its_address_and_elements() {
    let mut d = cluster();
    let mut c = committed(&d);
    d.services.remove(&name("svc-3"));
    let (requests, edits) = partial(&mut c, &d, &["svc-3"], &mut Draining::default());
    assert_eq!(requests, ["delete service tcp:10.96.0.4:80"]);
    assert_eq!(edits.unbind, ["10.96.0.4".parse::<IpAddr>().unwrap()]);
    assert!(edits.bind.is_empty() && edits.add_elements.is_empty());
    assert_eq!(
        texts(&edits.delete_elements),
        [
            "cluster-ips 10.96.0.4 . tcp . 80",
            "service-ports 10.96.0.4 . tcp . 80",
            "service-ips 10.96.0.4",
            "hairpin 10.244.3.1 . 10.244.3.1",
            "hairpin 10.244.3.2 . 10.244.3.2",
        ]
    );
    assert_record_matches(&c, &d);
}

#[test]
fn a_new_service_is_added_with_its_address_and_elements() {
    let mut d = cluster();
    let mut c = committed(&d);
    put(&mut d, port("new", "10.96.1.1", None), &[]);
    let (requests, edits) = partial(&mut c, &d, &["new"], &mut Draining::default());
    assert_eq!(requests, ["add service tcp:10.96.1.1:80 (rr)"]);
    assert_eq!(edits.bind, ["10.96.1.1".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        texts(&edits.add_elements),
        [
            "cluster-ips 10.96.1.1 . tcp . 80",
            "no-endpoints 10.96.1.1 . tcp . 80",
            "service-ports 10.96.1.1 . tcp . 80",
            "service-ips 10.96.1.1",
        ]
    );
    assert_record_matches(&c, &d);

    // Its first endpoint: no longer rejected.
    put(&mut d, port("new", "10.96.1.1", None), &["10.244.200.1"]);
    let (requests, edits) = partial(&mut c, &d, &["new"], &mut Draining::default());
    assert_eq!(requests, ["add real server 10.244.200.1:8080 to tcp:10.96.1.1:80"]);
    assert_eq!(texts(&edits.delete_elements), ["no-endpoints 10.96.1.1 . tcp . 80"]);
    assert_eq!(texts(&edits.add_elements), ["hairpin 10.244.200.1 . 10.244.200.1"]);
    assert_record_matches(&c, &d);
}

#[test]
fn shared_addresses_and_endpoints_stay_while_another_service_uses_them() {
    let mut d = cluster();
    // Two Services on one externalIP (different ports), and the same pod behind both.
    let mut a = port("a", "10.96.2.1", None);
    a.set_external_ips(vec!["203.0.113.9".parse().unwrap()]);
    let mut b = port("b", "10.96.2.2", None);
    b.set_external_ips(vec!["203.0.113.9".parse().unwrap()]);
    b.port = 443;
    put(&mut d, a, &["10.244.9.9"]);
    put(&mut d, b, &["10.244.9.9"]);
    let mut c = committed(&d);
    d.services.remove(&name("a"));
    let (requests, edits) = partial(&mut c, &d, &["a"], &mut Draining::default());
    assert_eq!(
        requests,
        ["delete service tcp:10.96.2.1:80", "delete service tcp:203.0.113.9:80"]
    );
    assert_eq!(
        edits.unbind,
        ["10.96.2.1".parse::<IpAddr>().unwrap()],
        "203.0.113.9 still carries b's port 443"
    );
    assert!(!texts(&edits.delete_elements).iter().any(|e| e.starts_with("hairpin")));
    assert_record_matches(&c, &d);
}

#[test]
fn a_virtual_service_held_by_an_unchanged_service_stays_its_own() {
    let mut d = cluster();
    let mut c = committed(&d);
    // "zz" claims svc-0's ClusterIP and port: svc-0 keeps it.
    put(&mut d, port("zz", "10.96.0.1", None), &["10.244.250.1"]);
    let (requests, edits) = partial(&mut c, &d, &["zz"], &mut Draining::default());
    assert!(requests.is_empty(), "{requests:?}");
    assert_eq!(edits, Edits::default());
    assert_eq!(c.ipvs.services[&vs_key("10.96.0.1", 80)].owner, name("svc-0"));
}

#[test]
fn removed_tcp_endpoint_drains_and_its_service_is_read_until_deleted() {
    let mut d = cluster();
    let mut c = committed(&d);
    put(&mut d, port("svc-5", "10.96.0.6", None), &["10.244.5.1"]);
    let changed: BTreeSet<ServiceKey> = [name("svc-5")].into_iter().collect();
    let mut draining = Draining::default();
    let change = c.plan_change(&d, &changed, &draining);
    // The removed server still has a connection.
    let mut dests = dests_of(&c, &change);
    for rs in dests.get_mut(&vs_key("10.96.0.6", 80)).unwrap() {
        rs.active_conns = 1;
    }
    let kernel = c.kernel_view(&change, dests);
    let now = Instant::now();
    let requests = plan_requests(
        &change.want,
        &kernel,
        &Scope::Only(change.scope.clone()),
        &mut draining,
        now,
        &c.cfg,
    );
    assert_eq!(
        requests.iter().map(Request::to_string).collect::<Vec<_>>(),
        ["set weight 0 of real server 10.244.5.2:8080 in tcp:10.96.0.6:80"]
    );
    let edits = c.edits(&change);
    assert_eq!(texts(&edits.delete_elements), ["hairpin 10.244.5.2 . 10.244.5.2"]);
    c.commit(change);

    // A later partial sync for another Service reads the draining one too, and deletes the
    // server once its connections are gone.
    put(&mut d, port("svc-9", "10.96.0.10", None), &["10.244.9.1"]);
    let changed: BTreeSet<ServiceKey> = [name("svc-9")].into_iter().collect();
    let change = c.plan_change(&d, &changed, &draining);
    assert_eq!(
        change.scope,
        [vs_key("10.96.0.6", 80), vs_key("10.96.0.10", 80)]
            .into_iter()
            .collect()
    );
    let mut dests = dests_of(&c, &change);
    dests.get_mut(&vs_key("10.96.0.6", 80)).unwrap().push(RealServerState {
        server: RealServer {
            addr: "10.244.5.2".parse().unwrap(),
            port: 8080,
            weight: 0,
            fwd_method: FWD_MASQ,
        },
        active_conns: 0,
        inactive_conns: 0,
    });
    let kernel = c.kernel_view(&change, dests);
    let requests = plan_requests(
        &change.want,
        &kernel,
        &Scope::Only(change.scope.clone()),
        &mut draining,
        now + Duration::from_secs(1),
        &c.cfg,
    );
    assert_eq!(
        requests.iter().map(Request::to_string).collect::<Vec<_>>(),
        [
            "delete real server 10.244.5.2:8080 from tcp:10.96.0.6:80",
            "delete real server 10.244.9.2:8080 from tcp:10.96.0.10:80",
        ]
    );
    assert_eq!(draining.len(), 0);
    c.commit(change);
    assert_record_matches(&c, &d);
}

#[test]
fn many_changes_in_a_row_keep_the_record_equal_to_a_full_plan() {
    let mut d = cluster();
    let mut c = committed(&d);
    let mut draining = Draining::default();
    for round in 0..20u32 {
        let i = (round * 37) % 100;
        let n = format!("svc-{i}");
        match round % 4 {
            0 => {
                d.services.remove(&name(&n));
            }
            1 => put(&mut d, port(&n, &format!("10.96.0.{}", i + 1), None), &[]),
            // Another Service's endpoint: shared hairpin entries.
            2 => put(
                &mut d,
                port(&n, &format!("10.96.0.{}", i + 1), None),
                &["10.244.0.1", &format!("10.244.{i}.7")],
            ),
            _ => {
                let mut p = port(&n, &format!("10.96.0.{}", i + 1), None);
                p.set_external_ips(vec!["203.0.113.1".parse().unwrap()]);
                p.port = 1000 + i as u16;
                put(&mut d, p, &[&format!("10.244.{i}.1")]);
            }
        }
        partial(&mut c, &d, &[&n], &mut draining);
        assert_record_matches(&c, &d);
    }
}
