//! The planner's transactions: what a full and a partial sync write, checked by meaning (which
//! map elements point where, which chains and rules are touched, by handle), what a check
//! repairs, and, as root, what the kernel holds after netlink wrote it in a throwaway network
//! namespace (read back, it equals what the planner committed; nft lists it).

use std::collections::{BTreeSet, HashSet};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::apply::{apply_plan, apply_streamed, plan_text, read_table, Kernel};
use super::command::Command;
use super::names;
use super::plan::{Owner, Plan, Planner};
use super::socket::tests::{in_netns, nft};
use crate::dataplane::iptables::render::{LocalDetector, NodePortMatch, RenderConfig};
use crate::model::store::Store;
use crate::model::{ChangeSet, DesiredState, IpFamily, ServiceKey};

fn config() -> RenderConfig {
    RenderConfig {
        family: IpFamily::V4,
        masquerade_all: false,
        masquerade_mark: 0x4000,
        local_detector: LocalDetector::Cidr("10.244.0.0/16".parse().unwrap()),
        nodeports: NodePortMatch::AllLocal,
        endpoint_comments: false,
        localhost_nodeports: false,
        nfacct: false,
        conntrack_tcp_liberal: false,
    }
}

fn v6_config() -> RenderConfig {
    RenderConfig {
        family: IpFamily::V6,
        local_detector: LocalDetector::Cidr("fd00:244::/64".parse().unwrap()),
        ..config()
    }
}

fn desired(yaml: &str) -> DesiredState {
    let mut store = Store::new("node-1");
    let mut services: Vec<Service> = vec![];
    let mut slices: Vec<EndpointSlice> = vec![];
    for doc in yaml.split("\n---\n") {
        let v: serde_yaml::Value = serde_yaml::from_str(doc).unwrap();
        match v.get("kind").and_then(|k| k.as_str()) {
            Some("Service") => services.push(serde_yaml::from_value(v).unwrap()),
            Some("EndpointSlice") => slices.push(serde_yaml::from_value(v).unwrap()),
            other => panic!("unexpected kind {other:?}"),
        }
    }
    store.replace_services(services.iter());
    store.replace_slices(slices.iter());
    let node: Node = serde_yaml::from_str(
        "metadata: {name: node-1, labels: {topology.kubernetes.io/zone: zone-a}}\nstatus: {addresses: [{type: InternalIP, address: 192.0.2.1}]}",
    )
    .unwrap();
    store.apply_node(&node);
    store.snapshot().desired
}

fn svc(name: &str, spec: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec: {spec}")
}

/// A slice with endpoints given as `ip[@node][:state]`, state = ready (default) or terminating.
fn slice(service: &str, port_name: &str, port: u16, endpoints: &[&str]) -> String {
    let v6 = endpoints.iter().any(|e| e.contains("::"));
    let eps: Vec<String> = endpoints
        .iter()
        .map(|e| {
            let (rest, state) = match e.rsplit_once('~') {
                Some((rest, state)) => (rest, state),
                None => (*e, "ready"),
            };
            let (ip, node) = rest.split_once('@').unwrap_or((rest, "node-2"));
            let cond = match state {
                "ready" => "{ready: true, serving: true, terminating: false}",
                _ => "{ready: false, serving: true, terminating: true}",
            };
            format!("{{addresses: ['{ip}'], nodeName: {node}, conditions: {cond}}}")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-x, namespace: ns, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: {}\nports: [{{name: {port_name}, port: {port}, protocol: TCP}}]\nendpoints: [{}]",
        if v6 { "IPv6" } else { "IPv4" },
        eps.join(", ")
    )
}

/// One of every kind of Service the mode handles.
fn representative() -> String {
    [
        svc("web", "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}"),
        slice("web", "http", 8080, &["10.244.1.2@node-1", "10.244.2.2"]),
        svc(
            "np",
            "{type: NodePort, clusterIP: 10.96.0.11, ports: [{name: http, port: 80, nodePort: 30080}]}",
        ),
        slice("np", "http", 8080, &["10.244.1.2@node-1", "10.244.2.2"]),
        svc(
            "empty",
            "{type: NodePort, clusterIP: 10.96.0.12, ports: [{name: http, port: 80, nodePort: 30081}]}",
        ),
        svc(
            "lb",
            "{type: LoadBalancer, clusterIP: 10.96.0.20, externalTrafficPolicy: Local, healthCheckNodePort: 32000, externalIPs: [198.51.100.20], ports: [{name: http, port: 80, nodePort: 30090}]}",
        ),
        slice("lb", "http", 8080, &["10.244.2.2"]),
        "apiVersion: v1\nkind: Service\nmetadata: {name: fw, namespace: ns}\nspec: {type: LoadBalancer, clusterIP: 10.96.0.50, loadBalancerSourceRanges: [203.0.113.0/24, 192.0.2.0/24], ports: [{name: http, port: 80, nodePort: 30100}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.50}]}}".to_string(),
        slice("fw", "http", 8080, &["10.244.2.2"]),
        svc(
            "sticky",
            "{clusterIP: 10.96.0.30, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}, ports: [{name: http, port: 80}]}",
        ),
        slice("sticky", "http", 8080, &["10.244.1.2@node-1", "10.244.2.2"]),
        svc("itp", "{clusterIP: 10.96.0.40, internalTrafficPolicy: Local, ports: [{name: http, port: 80}]}"),
        slice("itp", "http", 8080, &["10.244.1.2@node-1", "10.244.2.2"]),
        svc("term", "{clusterIP: 10.96.0.41, ports: [{name: http, port: 80}]}"),
        slice("term", "http", 8080, &["10.244.1.2~terminating"]),
        svc("dns", "{clusterIP: 10.96.0.53, ports: [{name: dns, port: 53, protocol: UDP}]}"),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: dns-x, namespace: ns, labels: {kubernetes.io/service-name: dns}}\naddressType: IPv4\nports: [{name: dns, port: 5353, protocol: UDP}]\nendpoints: [{addresses: [10.244.1.2]}]".to_string(),
        svc("v6", "{clusterIP: 'fd00::10', ipFamilies: [IPv6], type: NodePort, ports: [{name: http, port: 80, nodePort: 30200}]}"),
        slice("v6", "http", 8080, &["fd00:244::2@node-1", "fd00:244::3"]),
    ]
    .join("\n---\n")
}

/// Plans a full sync of `d` on a fresh planner (the table is empty), pretending the kernel
/// committed it.
fn full(d: &DesiredState, cfg: &RenderConfig) -> (Planner, Plan) {
    let mut planner = Planner::new(cfg.family);
    planner.adopt(Default::default());
    let plan = planner.plan(d, &ChangeSet::full(), cfg);
    echo(&mut planner, &plan);
    (planner, plan)
}

/// Programs a full sync of `yaml` into the (empty) table of this network namespace, and
/// returns the kernel connection and the planner that committed it.
fn programmed(yaml: &str, cfg: &RenderConfig) -> (Kernel, Planner) {
    let mut kernel = Kernel::connect(cfg.family).unwrap();
    let mut planner = Planner::new(cfg.family);
    planner.adopt(Default::default());
    let plan = planner.plan(&desired(yaml), &ChangeSet::full(), cfg);
    apply_plan(&mut kernel, &mut planner, &plan).unwrap();
    (kernel, planner)
}

/// Gives every new rule a handle, as the kernel's echo would.
fn echo(planner: &mut Planner, plan: &Plan) {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1000);
    for unit in &plan.units {
        let handles: Vec<Option<u64>> = unit
            .commands
            .iter()
            .map(|(_, c)| match c {
                Command::AddRule { .. } => Some(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
                Command::ReplaceRule { handle, .. } => Some(*handle),
                _ => None,
            })
            .collect();
        assert!(planner.commit(unit, &handles));
    }
}

fn partial(planner: &mut Planner, d: &DesiredState, services: &[&str]) -> Plan {
    let changes = ChangeSet {
        full: false,
        services: services.iter().map(|s| ServiceKey::new("ns", *s)).collect(),
    };
    let plan = planner.plan(d, &changes, &config());
    echo(planner, &plan);
    plan
}

fn text(plan: &Plan) -> String {
    plan_text(plan, IpFamily::V4)
}

/// The elements the transaction adds to `map`, as `key : verdict` strings.
fn added(text: &str, map: &str) -> BTreeSet<String> {
    let prefix = format!("add element ip kproxy {map} {{ ");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix)?.strip_suffix(" }"))
        .flat_map(|l| l.split(", ").map(str::to_string).collect::<Vec<_>>())
        .collect()
}

fn port(svc: &str) -> crate::model::ServicePortName {
    crate::model::ServicePortName {
        service: ServiceKey::new("ns", svc),
        port: "http".into(),
        protocol: crate::model::Protocol::Tcp,
    }
}

/// Rules the transaction appends to `chain`.
fn rules<'a>(text: &'a str, chain: &str) -> Vec<&'a str> {
    let prefix = format!("add rule ip kproxy {chain} ");
    text.lines().filter_map(|l| l.strip_prefix(&prefix)).collect()
}

fn endpoint(port: &crate::model::ServicePortName, ip: &str) -> String {
    let ep = crate::model::testing::endpoint(ip, 8080).build();
    names::endpoint_chain(port, &ep)
}

#[test]
fn service_addresses_dispatch_to_their_chains_or_are_refused() {
    let (planner, plan) = full(&desired(&representative()), &config());
    let t = text(&plan);
    // Services whose endpoints are elements are dispatched by plain sets to fixed chains.
    let cluster = added(&t, names::SERVICE_CLUSTER_IPS);
    assert!(cluster.contains("10.96.0.10 . tcp . 80"), "{cluster:?}");
    assert!(added(&t, names::EXTERNAL_CLUSTER_NODEPORTS).contains("tcp . 30080"));
    // No endpoints at all: refused, on the cluster IP and the NodePort.
    assert!(added(&t, names::NO_ENDPOINT_REJECT_IPS).contains("10.96.0.12 . tcp . 80"));
    assert!(added(&t, names::NO_ENDPOINT_REJECT_NODEPORTS).contains("tcp . 30081"));
    assert!(!cluster.iter().any(|e| e.starts_with("10.96.0.12 ")));
    // externalTrafficPolicy Local with its only endpoint on another node: external traffic is
    // dropped (not refused), cluster traffic still works.
    let drops = added(&t, names::NO_ENDPOINT_DROP_IPS);
    assert!(drops.contains("198.51.100.20 . tcp . 80"), "{drops:?}");
    assert!(!added(&t, names::NO_ENDPOINT_REJECT_IPS).contains("198.51.100.20 . tcp . 80"));
    assert!(added(&t, names::NO_ENDPOINT_DROP_NODEPORTS).contains("tcp . 30090"));
    assert!(cluster.contains("10.96.0.20 . tcp . 80"));
    // Pods and the node still reach it by its external address, through the Local chain.
    assert!(added(&t, names::EXTERNAL_LOCAL_IPS).contains("198.51.100.20 . tcp . 80"));
    assert!(added(&t, names::EXTERNAL_LOCAL_NODEPORTS).contains("tcp . 30090"));
    // internalTrafficPolicy Local: the local dispatch, with the local endpoint only.
    assert!(added(&t, names::SERVICE_LOCAL_IPS).contains("10.96.0.40 . tcp . 80"));
    assert!(
        !t.contains(&names::local_chain(&port("itp"))),
        "no chain of its own:\n{t}"
    );
    assert_eq!(rules(&t, names::SERVICE_LOCAL).last().copied(), Some("goto local-dnat"));
    // Its node-local endpoint is slot 0 of the local slots, in the local bucket of size 1.
    assert!(added(&t, "local-n1").contains("10.96.0.40 . tcp . 80"), "{t}");
    assert!(added(&t, names::service_endpoints(crate::model::Protocol::Tcp))
        .contains("10.96.0.40 . 80 . 65536 : 10.244.1.2 . 8080"));
    assert_eq!(planner.totals().1, (0, 1));
    // Terminating endpoints serve when nothing is ready.
    assert!(cluster.contains("10.96.0.41 . tcp . 80"));
    // Session affinity keeps upstream's chains, dispatched by the verdict map.
    let ips = added(&t, names::SERVICE_IPS);
    let sticky = names::service_chain(&port("sticky"));
    assert_eq!(ips, BTreeSet::from([format!("10.96.0.30 . tcp . 80 : goto {sticky}")]));
    // No chain per Service otherwise: the chains are the fixed ones, the sticky Service's and
    // the firewall's.
    let chains: Vec<&str> = t
        .lines()
        .filter_map(|l| l.strip_prefix("add chain ip kproxy "))
        .map(|l| l.split(' ').next().unwrap_or(l))
        .filter(|c| !names::fixed_chains().any(|f| f == *c))
        .collect();
    assert_eq!(chains.len(), 4, "{chains:?}");
    assert!(
        chains
            .iter()
            .all(|c| c.contains("ns/sticky/") || c.starts_with("firewall-")),
        "{chains:?}"
    );
}

#[test]
fn balancing_masquerade_and_dnat() {
    let (_, plan) = full(&desired(&representative()), &config());
    let t = text(&plan);
    assert!(!t.contains(&names::service_chain(&port("web"))), "{t}");
    assert_eq!(
        rules(&t, names::SERVICE_CLUSTER),
        [
            "ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
            "goto cluster-dnat"
        ]
    );
    assert_eq!(
        rules(&t, names::SERVICES)[..5],
        [
            "ip daddr . meta l4proto . th dport @service-cluster-ips goto service-cluster",
            "ip daddr . meta l4proto . th dport @service-local-ips goto service-local",
            "ip daddr . meta l4proto . th dport @external-cluster-ips goto external-cluster",
            "ip daddr . meta l4proto . th dport @external-local-ips goto external-local",
            "ip daddr . meta l4proto . th dport vmap @service-ips",
        ]
    );
    // The endpoints are elements: the address in the bucket of 2, its slots 0 and 1.
    assert!(added(&t, "cluster-n2").contains("10.96.0.10 . tcp . 80"), "{t}");
    let eps = added(&t, names::service_endpoints(crate::model::Protocol::Tcp));
    assert!(eps.contains("10.96.0.10 . 80 . 0 : 10.244.1.2 . 8080"), "{eps:?}");
    assert!(eps.contains("10.96.0.10 . 80 . 1 : 10.244.2.2 . 8080"), "{eps:?}");
    assert!(!eps.iter().any(|e| e.starts_with("10.96.0.10 . 80 . 2 ")));
    // The NodePort has slots of its own, by port.
    assert!(added(&t, "nodeport-cluster-n2").contains("tcp . 30080"), "{t}");
    assert!(added(&t, names::nodeport_endpoints(crate::model::Protocol::Tcp)).contains("30080 . 1 : 10.244.2.2 . 8080"));
    // One fixed rule per protocol and bucket picks the slot.
    let dnat = rules(&t, names::CLUSTER_DNAT);
    assert!(dnat.contains(&"meta l4proto tcp ip daddr . meta l4proto . th dport @cluster-n2 dnat to ip daddr . th dport . numgen random mod 2 map @service-endpoints-tcp"), "{dnat:?}");
    assert!(dnat.contains(&"meta l4proto udp meta l4proto . th dport @nodeport-cluster-n3 dnat to th dport . numgen random mod 3 map @nodeport-endpoints-udp"), "{dnat:?}");
    assert!(rules(&t, names::LOCAL_DNAT).contains(&"meta l4proto tcp ip daddr . meta l4proto . th dport @local-n1 dnat to ip daddr . th dport . numgen random mod 1 offset 65536 map @service-endpoints-tcp"));
    // Without session affinity there are no endpoint chains at all.
    let a = endpoint(&port("web"), "10.244.1.2");
    assert!(!t.contains(&a), "{t}");
    // Hairpin: one set of endpoint . endpoint, checked after DNAT.
    assert_eq!(
        added(&t, names::HAIRPIN),
        BTreeSet::from([
            "10.244.1.2 . 10.244.1.2".to_string(),
            "10.244.2.2 . 10.244.2.2".to_string()
        ])
    );
    assert_eq!(
        rules(&t, names::NAT_POSTROUTING),
        [
            "ct status dnat ip saddr . ip daddr @hairpin jump mark-for-masquerade",
            "jump masquerading"
        ]
    );
    assert_eq!(
        rules(&t, names::EXTERNAL_CLUSTER),
        ["jump mark-for-masquerade", "goto cluster-dnat"]
    );
    assert_eq!(
        rules(&t, names::EXTERNAL_LOCAL),
        [
            "ip saddr 10.244.0.0/16 goto cluster-dnat",
            "fib saddr type local jump mark-for-masquerade",
            "fib saddr type local goto cluster-dnat",
            "goto local-dnat"
        ]
    );
    assert_eq!(
        rules(&t, names::MASQUERADING),
        [
            "meta mark & 0x4000 == 0 return",
            "meta mark set meta mark ^ 0x4000",
            "masquerade fully-random"
        ]
    );
}

#[test]
fn session_affinity_uses_timed_sets_per_endpoint() {
    let (_, plan) = full(&desired(&representative()), &config());
    let t = text(&plan);
    let sticky = rules(&t, &names::service_chain(&port("sticky")));
    assert!(
        sticky[1].starts_with("ip saddr @affinity-") && sticky[1].contains(" goto endpoint-"),
        "{sticky:?}"
    );
    // The pick among endpoint chains: a cascade too, no anonymous map.
    assert!(
        sticky[3].starts_with("numgen random mod 2 0 goto endpoint-"),
        "{sticky:?}"
    );
    assert!(sticky[4].starts_with("goto endpoint-"), "{sticky:?}");
    let sets: Vec<&str> = t
        .lines()
        .filter(|l| l.starts_with("add set ip kproxy affinity-"))
        .collect();
    assert_eq!(sets.len(), 2, "{sets:?}");
    assert!(sets[0].ends_with("{ type ipv4_addr; flags dynamic,timeout; timeout 600s; }"));
    let ep = rules(&t, &endpoint(&port("sticky"), "10.244.2.2"));
    assert!(
        ep[0].starts_with("update @affinity-") && ep[0].ends_with(" { ip saddr }"),
        "{ep:?}"
    );
}

#[test]
fn load_balancer_source_ranges_filter_before_dnat() {
    let (_, plan) = full(&desired(&representative()), &config());
    let t = text(&plan);
    let fw = names::firewall_chain(&port("fw"));
    assert!(added(&t, names::FIREWALL_IPS).contains(&format!("198.51.100.50 . tcp . 80 : goto {fw}")));
    // 192.0.2.0/24 holds the node's address: the node reaching its own VIP is allowed too.
    assert_eq!(
        rules(&t, &fw),
        [
            "ip saddr 203.0.113.0/24 return",
            "ip saddr 192.0.2.0/24 return",
            "ip saddr 198.51.100.50 return",
            "drop"
        ]
    );
}

#[test]
fn masquerade_all_and_detectors() {
    let d = desired(&representative());
    let first = |cfg: &RenderConfig| {
        let t = text(&full(&d, cfg).1);
        rules(&t, names::SERVICE_CLUSTER)[0].to_string()
    };
    let all = RenderConfig {
        masquerade_all: true,
        ..config()
    };
    assert_eq!(first(&all), "jump mark-for-masquerade");
    let none = RenderConfig {
        local_detector: LocalDetector::None,
        ..config()
    };
    assert_eq!(first(&none), "goto cluster-dnat", "no detector: sources are kept");
    let prefix = RenderConfig {
        local_detector: LocalDetector::InterfacePrefix("veth".into()),
        ..config()
    };
    assert!(first(&prefix).contains("iifname != \"veth*\" jump mark-for-masquerade"));
}

#[test]
fn nodeport_addresses_limit_where_node_ports_answer() {
    let d = desired(&representative());
    let t = text(&full(&d, &config()).1);
    assert!(rules(&t, names::SERVICES)
        .contains(&"fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"));
    let cfg = RenderConfig {
        nodeports: NodePortMatch::Addresses(vec!["192.0.2.1".parse().unwrap(), "fd00::1".parse().unwrap()]),
        ..config()
    };
    let t = text(&full(&d, &cfg).1);
    assert_eq!(
        rules(&t, names::SERVICES)[4..],
        [
            "ip daddr . meta l4proto . th dport vmap @service-ips",
            "ip daddr 192.0.2.1 meta l4proto . th dport @external-cluster-nodeports goto external-cluster",
            "ip daddr 192.0.2.1 meta l4proto . th dport @external-local-nodeports goto external-local",
            "ip daddr 192.0.2.1 meta l4proto . th dport vmap @service-nodeports"
        ]
    );
}

#[test]
fn partial_sync_rewrites_only_the_changed_rules_by_handle() {
    let yaml = representative();
    let (mut planner, _) = full(&desired(&yaml), &config());
    assert!(partial(&mut planner, &desired(&yaml), &[]).units.is_empty());
    assert!(
        partial(&mut planner, &desired(&yaml), &["web"]).units.is_empty(),
        "an unchanged Service writes nothing"
    );

    // web's second endpoint is replaced: its slot's element, and no rule, is rewritten.
    let web = names::service_chain(&port("web"));
    let fixed_before = planner.state.chains.clone();
    let changed = yaml.replace(
        &slice("web", "http", 8080, &["10.244.1.2@node-1", "10.244.2.2"]),
        &slice("web", "http", 8080, &["10.244.1.2@node-1", "10.244.3.2"]),
    );
    let plan = partial(&mut planner, &desired(&changed), &["web"]);
    let t = text(&plan);
    assert_eq!(
        t.lines().filter(|l| !l.contains("hairpin")).collect::<Vec<_>>(),
        [
            "delete element ip kproxy service-endpoints-tcp { 10.96.0.10 . 80 . 1 }",
            "add element ip kproxy service-endpoints-tcp { 10.96.0.10 . 80 . 1 : 10.244.3.2 . 8080 }"
        ],
        "{t}"
    );
    // 10.244.2.2 is still another Service's endpoint; 10.244.3.2 is new to the node.
    assert!(added(&t, names::HAIRPIN).contains("10.244.3.2 . 10.244.3.2"), "{t}");
    assert!(!t.contains("delete element ip kproxy hairpin"), "{t}");
    assert_eq!(fixed_before, planner.state.chains, "no chain or rule changed");

    // web loses an endpoint: its address moves to the bucket of 1, its slot 1 goes; no rule.
    let fewer = yaml.replace(
        &slice("web", "http", 8080, &["10.244.1.2@node-1", "10.244.2.2"]),
        &slice("web", "http", 8080, &["10.244.1.2@node-1"]),
    );
    let plan = partial(&mut planner, &desired(&fewer), &["web"]);
    let t = text(&plan);
    let lines: Vec<&str> = t.lines().filter(|l| !l.contains("hairpin")).collect();
    assert_eq!(
        lines,
        [
            "delete element ip kproxy cluster-n2 { 10.96.0.10 . tcp . 80 }",
            "delete element ip kproxy service-endpoints-tcp { 10.96.0.10 . 80 . 1 }",
            "add element ip kproxy cluster-n1 { 10.96.0.10 . tcp . 80 }",
        ],
        "{t}"
    );
    assert!(
        !t.contains("ns/np/") && !t.contains("ns/sticky/"),
        "other Services untouched:\n{t}"
    );
    assert_eq!(plan.units.len(), 1, "one unit: one transaction for the Service");
    assert!(!planner.state.chains.contains_key(&web));
}

#[test]
fn removed_service_loses_its_chains_sets_and_elements() {
    let yaml = representative();
    let (mut planner, _) = full(&desired(&yaml), &config());
    let without: Vec<&str> = yaml
        .split("\n---\n")
        .filter(|doc| !doc.contains("name: sticky"))
        .collect();
    let plan = partial(&mut planner, &desired(&without.join("\n---\n")), &["sticky"]);
    let t = text(&plan);
    let svc = names::service_chain(&port("sticky"));
    assert!(
        t.contains("delete element ip kproxy service-ips { 10.96.0.30 . tcp . 80 }"),
        "{t}"
    );
    for chain in [
        svc.clone(),
        endpoint(&port("sticky"), "10.244.1.2"),
        endpoint(&port("sticky"), "10.244.2.2"),
    ] {
        assert!(
            t.contains(&format!("delete chain ip kproxy {chain}\n")),
            "{chain} not deleted:\n{t}"
        );
        assert!(!planner.state.chains.contains_key(&chain));
    }
    assert_eq!(t.matches("delete set ip kproxy affinity-").count(), 2, "{t}");
    assert!(!t.contains("add "), "nothing is added:\n{t}");
    // Elements go before the chains they point to, chains before the sets their rules use.
    assert!(t.find("delete element") < t.find("delete chain"));
    assert!(t.find("delete chain") < t.find("delete set"));
    // 10.244.2.2 is still another Service's endpoint: its hairpin element stays.
    assert!(!t.contains("hairpin"), "{t}");

    // Emptying a Service moves its address from dispatch to refusal.
    let emptied = yaml.replace(&slice("web", "http", 8080, &["10.244.1.2@node-1", "10.244.2.2"]), "");
    let emptied: Vec<&str> = emptied.split("\n---\n").filter(|d| !d.is_empty()).collect();
    let t = text(&partial(&mut planner, &desired(&emptied.join("\n---\n")), &["web"]));
    assert!(t.contains("delete element ip kproxy service-cluster-ips { 10.96.0.10 . tcp . 80 }"));
    assert!(t.contains("add element ip kproxy no-endpoint-reject-ips { 10.96.0.10 . tcp . 80 }"));
}

#[test]
fn a_full_sync_of_unchanged_services_writes_nothing() {
    let yaml = representative();
    let d = desired(&yaml);
    let (mut planner, _) = full(&d, &config());
    // Same state objects: not even rendered; equal ones (a relist): rendered, nothing differs.
    assert!(planner.plan(&d, &ChangeSet::full(), &config()).units.is_empty());
    assert!(planner
        .plan(&desired(&yaml), &ChangeSet::full(), &config())
        .units
        .is_empty());
    // A changed configuration renders everything, and writes only what it changes.
    let cfg = RenderConfig {
        masquerade_mark: 0x8000,
        ..config()
    };
    let plan = planner.plan(&d, &ChangeSet::full(), &cfg);
    let t = text(&plan);
    assert_eq!(t.lines().count(), 3, "the three mark rules:\n{t}");
    assert!(t.lines().all(|l| l.starts_with("replace rule")), "{t}");
}

/// The committed table with `f` applied: what the kernel would list after a foreign change.
fn kernel_after(planner: &Planner, f: impl FnOnce(&mut super::plan::TableState)) -> super::plan::TableState {
    let mut k = planner.committed();
    f(&mut k);
    k
}

#[test]
fn a_check_repairs_only_what_differs() {
    let d = desired(&representative());
    let (mut planner, _) = full(&d, &config());
    let none = HashSet::new();
    let same = planner.committed();
    assert_eq!(planner.reconcile(same, &none, true).1, 0, "nothing differs");

    let sticky = names::service_chain(&port("sticky"));
    let np_key = super::rule::Key::ProtoPort(crate::model::Protocol::Tcp, 30080).bytes();
    let kernel = kernel_after(&planner, |k| {
        // Someone flushes `services`, deletes sticky's last rule, removes a NodePort element,
        // adds a chain of their own and an element nobody owns.
        k.chains.get_mut(names::SERVICES).unwrap().rules.clear();
        k.chains.get_mut(&sticky).unwrap().rules.pop();
        let np = k.elements.get_mut(names::EXTERNAL_CLUSTER_NODEPORTS).unwrap();
        assert!(np.remove(np_key.as_slice()).is_some());
        k.chains.insert("intruder".into(), Default::default());
        let stray = super::rule::Key::ProtoPort(crate::model::Protocol::Udp, 31999).bytes();
        let np = k.elements.get_mut(names::EXTERNAL_CLUSTER_NODEPORTS).unwrap();
        np.insert(stray.into(), super::plan::data_hash(None));
    });
    let (plan, differences) = planner.reconcile(kernel, &none, true);
    assert_eq!(differences, 5);
    let t = text(&plan);
    let services = rules(&t, names::SERVICES);
    assert_eq!(services.len(), 8, "services refilled:\n{t}");
    let refilled = rules(&t, &sticky);
    assert!(refilled.len() == 1 && refilled[0].starts_with("goto endpoint-"), "{t}");
    assert!(
        added(&t, names::EXTERNAL_CLUSTER_NODEPORTS).contains("tcp . 30080"),
        "{t}"
    );
    assert!(
        t.contains("delete element ip kproxy external-cluster-nodeports { udp . 31999 }"),
        "{t}"
    );
    assert!(t.contains("delete chain ip kproxy intruder"), "{t}");
    assert!(!t.contains("10.96.0.10"), "untouched Services are not rewritten:\n{t}");
    echo(&mut planner, &plan);

    // A listing older than a commit of sticky's: it is not second-guessed, strays are kept.
    let kernel = kernel_after(&planner, |k| {
        k.chains.get_mut(&sticky).unwrap().rules.pop();
        k.chains.insert("maybe-just-deleted".into(), Default::default());
    });
    let skip = HashSet::from([Owner::Service(ServiceKey::new("ns", "sticky"))]);
    let (plan, differences) = planner.reconcile(kernel, &skip, false);
    assert_eq!((plan.units.len(), differences), (0, 0));

    // A set the listing could not read consistently is not compared.
    let mut kernel = planner.committed();
    kernel.elements.remove(names::EXTERNAL_CLUSTER_NODEPORTS);
    kernel.unlisted.insert(names::EXTERNAL_CLUSTER_NODEPORTS.into());
    let (plan, differences) = planner.reconcile(kernel, &none, true);
    assert_eq!((plan.units.len(), differences), (0, 0));
}

/// Element keys are kept inline: every key kproxy keeps fits (no allocation per element), a
/// longer one read back is kept whole, and either is found by its bytes.
#[test]
fn element_keys_are_kept_inline_and_found_by_their_bytes() {
    use super::plan::KeyBytes;
    use super::rule::Key;
    use crate::model::Protocol;
    assert_eq!(std::mem::size_of::<KeyBytes>(), 32);
    let v6_slot = Key::AddrPortSlot("fd00::10".parse().unwrap(), Protocol::Tcp, 80, 65536).bytes();
    let v6_pair = Key::Pair("fd00:244::2".parse().unwrap()).bytes();
    assert_eq!((v6_slot.len(), v6_pair.len()), (24, 32));
    let slot = KeyBytes::from(v6_slot.clone());
    assert!(matches!(slot, KeyBytes::Inline { .. }));
    let pair = KeyBytes::from(v6_pair.clone());
    assert!(matches!(pair, KeyBytes::Heap(_)));
    let set: std::collections::HashMap<KeyBytes, u64> = [(slot, 1), (pair, 2)].into();
    assert_eq!(set.get(v6_slot.as_slice()), Some(&1));
    assert_eq!(set.get(v6_pair.as_slice()), Some(&2));
    assert_eq!(set.get(&v6_slot[..23]), None, "a prefix is another key");
    assert_eq!(&*KeyBytes::new(&v6_slot), v6_slot.as_slice());
}

/// The hairpin set is kept as counts and endpoint slots as their bucket's claim, not as
/// elements: a check still finds and repairs a foreign change to either.
#[test]
fn derived_elements_are_compared_and_repaired() {
    use super::rule::Key;
    let d = desired(&representative());
    let (mut planner, _) = full(&d, &config());
    assert!(!planner.state.elements.contains_key(names::HAIRPIN), "not kept");
    let none = HashSet::new();
    assert_eq!(planner.reconcile(planner.committed(), &none, true).1, 0);

    let pair = |ip: &str| Key::Pair(ip.parse().unwrap()).bytes();
    let tcp = names::service_endpoints(crate::model::Protocol::Tcp);
    let web_slot = Key::AddrPortSlot("10.96.0.10".parse().unwrap(), crate::model::Protocol::Tcp, 80, 1).bytes();
    let kernel = kernel_after(&planner, |k| {
        let hairpin = k.elements.get_mut(names::HAIRPIN).unwrap();
        assert!(hairpin.remove(pair("10.244.2.2").as_slice()).is_some());
        hairpin.insert(pair("10.9.9.9").into(), super::plan::data_hash(None));
        assert!(k.elements.get_mut(tcp).unwrap().remove(web_slot.as_slice()).is_some());
    });
    let (plan, differences) = planner.reconcile(kernel, &none, true);
    assert_eq!(differences, 2, "{:?}", planner.differed);
    let t = text(&plan);
    assert!(added(&t, names::HAIRPIN).contains("10.244.2.2 . 10.244.2.2"), "{t}");
    assert_eq!(added(&t, names::HAIRPIN).len(), 1, "only the missing one:\n{t}");
    assert!(
        t.contains("delete element ip kproxy hairpin { 10.9.9.9 . 10.9.9.9 }"),
        "{t}"
    );
    assert!(
        added(&t, tcp).contains("10.96.0.10 . 80 . 1 : 10.244.2.2 . 8080"),
        "{t}"
    );
    assert!(!t.contains("10.96.0.11"), "other Services are not rewritten:\n{t}");
    echo(&mut planner, &plan);
    assert_eq!(planner.reconcile(planner.committed(), &none, true).1, 0);
    assert!(!planner.state.elements.contains_key(names::HAIRPIN), "still not kept");

    // A slot nobody's bucket implies is a stray; one of a Service's is its own.
    let kernel = kernel_after(&planner, |k| {
        let stray = Key::AddrPortSlot("10.96.0.10".parse().unwrap(), crate::model::Protocol::Tcp, 80, 7).bytes();
        let value = super::rule::Value::Endpoint("10.9.9.9".parse().unwrap(), 80).data();
        k.elements
            .get_mut(tcp)
            .unwrap()
            .insert(stray.into(), super::plan::data_hash(Some(&value)));
    });
    let (plan, differences) = planner.reconcile(kernel, &none, true);
    assert_eq!(differences, 1);
    assert_eq!(
        text(&plan),
        "delete element ip kproxy service-endpoints-tcp { 10.96.0.10 . 80 . 7 }\n"
    );
}

/// A foreign writer deletes hairpin and endpoint elements (which kproxy keeps only derived)
/// in the kernel: the check lists the table, repairs just those, and the kernel then holds
/// what was committed. Skipped without root.
#[test]
fn a_foreign_delete_of_derived_elements_is_repaired_in_the_kernel() {
    use super::rule::Key;
    let yaml = representative();
    let Some(()) = in_netns(move || {
        let cfg = config();
        let (mut kernel, mut planner) = programmed(&yaml, &cfg);
        let tcp = names::service_endpoints(crate::model::Protocol::Tcp);
        nft(&[
            "delete",
            "element",
            "ip",
            "kproxy",
            names::HAIRPIN,
            "{ 10.244.1.2 . 10.244.1.2 }",
        ]);
        nft(&["delete", "element", "ip", "kproxy", tcp, "{ 10.96.0.10 . 80 . 0 }"]);
        let (listed, _, snapshot) = read_table(&mut kernel.sock, kernel.table).unwrap();
        assert!(snapshot);
        assert!(
            !listed.elements[names::HAIRPIN].contains_key(Key::Pair("10.244.1.2".parse().unwrap()).bytes().as_slice())
        );
        let (plan, differences) = planner.reconcile(listed, &HashSet::new(), true);
        assert_eq!(differences, 2, "{:?}", planner.differed);
        let applied = apply_plan(&mut kernel, &mut planner, &plan).unwrap();
        assert_eq!(applied.writes, 2, "{}", plan_text(&plan, IpFamily::V4));
        let (listed, _, _) = read_table(&mut kernel.sock, kernel.table).unwrap();
        assert!(
            listed == planner.committed(),
            "the kernel holds what was committed again"
        );
    }) else {
        eprintln!("skipping: needs root (network namespaces)");
        return;
    };
}

#[test]
fn after_a_read_back_everything_is_compared_and_strays_deleted() {
    let d = desired(&representative());
    let (planner, _) = full(&d, &config());
    let mut kernel = planner.committed();
    kernel
        .chains
        .insert("service-XXXX-ns/old/tcp/http".into(), Default::default());
    kernel
        .sets
        .insert("affinity-XXXX-ns/old/tcp/http__10.244.9.9/80".into(), 1);
    let mut fresh = Planner::new(IpFamily::V4);
    fresh.adopt(kernel);
    let plan = fresh.plan(&d, &ChangeSet::full(), &config());
    assert_eq!(
        text(&plan),
        "delete chain ip kproxy service-XXXX-ns/old/tcp/http\ndelete set ip kproxy affinity-XXXX-ns/old/tcp/http__10.244.9.9/80\n",
        "a restart against a table it wrote rewrites nothing"
    );
}

#[test]
fn ipv6_renders_its_own_table() {
    let d = desired(&representative());
    let (_, plan) = full(&d, &v6_config());
    let t = plan_text(&plan, IpFamily::V6);
    assert!(t.starts_with("add table ip6 kproxy\n"));
    assert!(t.contains("add map ip6 kproxy service-ips { type ipv6_addr . inet_proto . inet_service : verdict; }"));
    assert!(
        t.contains("add element ip6 kproxy service-cluster-ips { fd00::10 . tcp . 80 }"),
        "{t}"
    );
    assert!(t.contains("fd00::10 . 80 . 0 : fd00:244::2 . 8080"), "{t}");
    assert!(t.contains("add map ip6 kproxy service-endpoints-tcp { typeof ip6 daddr . tcp dport . numgen random mod 1 : ip6 daddr . tcp dport; }"));
    assert!(t.contains("add element ip6 kproxy hairpin { fd00:244::2 . fd00:244::2, fd00:244::3 . fd00:244::3 }"));
    assert!(t.contains("ip6 saddr != fd00:244::/64 jump mark-for-masquerade"));
    assert!(!t.contains("10.96.0.10"), "IPv4 Services belong to the other table");
}

#[test]
fn two_services_claiming_one_external_ip_do_not_break_the_transaction() {
    let a = svc(
        "a",
        "{clusterIP: 10.96.0.60, externalIPs: [198.51.100.60], ports: [{name: http, port: 80}]}",
    );
    let b = svc(
        "b",
        "{clusterIP: 10.96.0.61, externalIPs: [198.51.100.60], ports: [{name: http, port: 80}]}",
    );
    let yaml = [
        a.clone(),
        slice("a", "http", 8080, &["10.244.1.2"]),
        b,
        slice("b", "http", 8080, &["10.244.2.2"]),
    ]
    .join("\n---\n");
    let (mut planner, plan) = full(&desired(&yaml), &config());
    let t = text(&plan);
    let claims = t.matches("198.51.100.60 . tcp . 80").count();
    assert_eq!(claims, 2, "a's address, its bucket:\n{t}");
    assert!(added(&t, names::EXTERNAL_CLUSTER_IPS).contains("198.51.100.60 . tcp . 80"));
    assert!(t.contains("198.51.100.60 . 80 . 0 : 10.244.1.2 . 8080"), "{t}");
    // b changes: it still does not get the address.
    let t = text(&partial(
        &mut planner,
        &desired(&yaml.replace("10.244.2.2", "10.244.3.2")),
        &["b"],
    ));
    assert!(!t.contains("198.51.100.60"), "{t}");
    // a goes away: b gets the address in the same sync, even if b itself did not change.
    let without_a = yaml.replace(&format!("{a}\n---\n"), "");
    let t = text(&partial(&mut planner, &desired(&without_a), &["a"]));
    assert!(t
        .lines()
        .any(|l| l.starts_with("delete element ip kproxy external-cluster-ips {")
            && l.contains("198.51.100.60 . tcp . 80")));
    assert!(added(&t, names::EXTERNAL_CLUSTER_IPS).contains("198.51.100.60 . tcp . 80"));
    assert!(t.contains("198.51.100.60 . 80 . 0 : 10.244.2.2 . 8080"), "{t}");
}

/// Applies one plan per step through netlink in a fresh network namespace; after each, the
/// table read back equals what the planner committed. Skipped without root.
#[test]
fn the_kernel_holds_what_the_planner_committed() {
    let yaml = representative();
    let changed = yaml
        .replace(
            &slice("web", "http", 8080, &["10.244.1.2@node-1", "10.244.2.2"]),
            &slice("web", "http", 8080, &["10.244.1.2@node-1", "10.244.3.2"]),
        )
        .replace("timeoutSeconds: 600", "timeoutSeconds: 60");
    let without: String = changed
        .split("\n---\n")
        .filter(|doc| !doc.contains("name: sticky") && !doc.contains("name: fw"))
        .collect::<Vec<_>>()
        .join("\n---\n");
    let steps: Vec<(String, Vec<&'static str>)> = vec![
        (yaml.clone(), vec![]),
        (changed, vec!["web", "sticky"]),
        (without, vec!["sticky", "fw", "empty"]),
        (yaml.clone(), vec!["web", "sticky", "fw", "empty"]),
    ];
    let Some(()) = in_netns(move || {
        for cfg in [config(), v6_config()] {
            let family = cfg.family;
            let mut kernel = Kernel::connect(family).unwrap();
            let mut planner = Planner::new(family);
            planner.adopt(Default::default());
            for (i, (doc, services)) in steps.iter().enumerate() {
                let changes = if i == 0 {
                    ChangeSet::full()
                } else {
                    ChangeSet {
                        full: false,
                        services: services.iter().map(|s| ServiceKey::new("ns", *s)).collect(),
                    }
                };
                let plan = planner.plan(&desired(doc), &changes, &cfg);
                apply_plan(&mut kernel, &mut planner, &plan)
                    .unwrap_or_else(|e| panic!("step {i}: {e}\n{}", plan_text(&plan, family)));
                let (listed, _, snapshot) = read_table(&mut kernel.sock, kernel.table).unwrap();
                assert!(snapshot);
                let committed = planner.committed();
                if listed != committed {
                    let (k, c) = (&listed, &committed);
                    let mut diff = Vec::new();
                    for (n, ch) in &k.chains {
                        if c.chains.get(n) != Some(ch) {
                            diff.push(format!("chain {n}: kernel {ch:?} committed {:?}", c.chains.get(n)));
                        }
                    }
                    for (n, h) in &k.sets {
                        if c.sets.get(n) != Some(h) {
                            diff.push(format!("set {n}"));
                        }
                    }
                    for n in c.sets.keys().filter(|n| !k.sets.contains_key(*n)) {
                        diff.push(format!("set {n} not in the kernel"));
                    }
                    for (n, e) in &k.elements {
                        let empty = Default::default();
                        let ce = c.elements.get(n).unwrap_or(&empty);
                        if ce != e {
                            diff.push(format!("elements of {n}: kernel {e:?} committed {ce:?}"));
                        }
                    }
                    panic!("step {i}: the kernel does not hold what was committed: {diff:#?}");
                }
            }
        }
        let listing = nft(&["list", "ruleset"]);
        assert!(listing.contains("table ip kproxy") && listing.contains("table ip6 kproxy"));
        assert!(listing.contains("10.96.0.10 . 80 . 0 : 10.244.1.2 . 8080"), "{listing}");
        assert!(
            listing.contains("ip daddr . meta l4proto . tcp dport @cluster-n2 dnat ip to ip daddr . tcp dport . numgen random mod 2 map @service-endpoints-tcp"),
            "{listing}"
        );
    }) else {
        eprintln!("skipping: needs root (network namespaces)");
        return;
    };
}

#[test]
fn more_endpoints_than_buckets_keep_the_cascade() {
    let ips: Vec<String> = (1..=names::MAX_BUCKET + 1).map(|i| format!("10.244.9.{i}")).collect();
    let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
    let yaml = [
        svc("big", "{clusterIP: 10.96.0.90, ports: [{name: http, port: 80}]}"),
        slice("big", "http", 8080, &refs),
    ]
    .join("\n---\n");
    let (_, plan) = full(&desired(&yaml), &config());
    let t = text(&plan);
    let chain = rules(&t, &names::service_chain(&port("big")));
    assert_eq!(chain.len(), 1 + names::MAX_BUCKET + 1, "{chain:?}");
    assert!(
        chain[1].starts_with("meta l4proto tcp numgen random mod 17 0 dnat to "),
        "{chain:?}"
    );
    assert!(!t.contains("10.96.0.90 . 80 . "), "no endpoint slots:\n{t}");
}

#[test]
fn a_cold_start_makes_services_reachable_last() {
    let (_, plan) = full(&desired(&representative()), &config());
    let last = plan.units.last().expect("units");
    assert_eq!(last.owner, Owner::Dispatch);
    let sets: BTreeSet<&str> = last
        .commands
        .iter()
        .map(|(_, c)| match c {
            Command::AddElements { set, .. } => set.as_str(),
            other => panic!("only dispatch elements come last: {other:?}"),
        })
        .collect();
    assert!(
        sets.contains(names::SERVICE_IPS) && sets.contains(names::FIREWALL_IPS),
        "{sets:?}"
    );
    for unit in &plan.units[..plan.units.len() - 1] {
        for (_, c) in &unit.commands {
            if let Command::AddElements { set, .. } = c {
                assert!(set != names::SERVICE_IPS, "{} adds to service-ips early", unit.owner);
            }
        }
    }
    // Once the table holds the Services, a change of one is one unit again, dispatch included.
    let d = desired(&representative());
    let (mut planner, _) = full(&d, &config());
    let yaml = representative();
    let without: Vec<&str> = yaml
        .split("\n---\n")
        .filter(|doc| !doc.contains("name: web,") && !doc.contains("name: web-x,"))
        .collect();
    let plan = partial(&mut planner, &desired(&without.join("\n---\n")), &["web"]);
    assert_eq!(plan.units.len(), 1);
    assert!(text(&plan).contains("delete element ip kproxy service-cluster-ips { 10.96.0.10 . tcp . 80 }"));
}

/// A check that lists the table while other commits change a big shared set (as kproxy's own
/// commits of other Services do) finds nothing different: the kernel resumes an element dump
/// by position, so a listing that overlaps a commit must not be taken for the set's content.
/// Skipped without root.
#[test]
fn a_check_during_commits_to_a_shared_set_finds_no_difference() {
    let mut docs = Vec::new();
    for i in 0..1500 {
        let name = format!("s{i}");
        docs.push(svc(
            &name,
            &format!(
                "{{clusterIP: 10.96.{}.{}, ports: [{{name: http, port: 80}}]}}",
                i / 250,
                1 + i % 250
            ),
        ));
        let eps: Vec<String> = (0..10)
            .map(|j| format!("10.{}.{}.{}", 128 + i / 250, i % 250, 1 + j))
            .collect();
        let refs: Vec<&str> = eps.iter().map(String::as_str).collect();
        docs.push(slice(&name, "http", 8080, &refs));
    }
    let yaml = docs.join("\n---\n");
    let Some(()) = in_netns(move || {
        let cfg = config();
        let (mut kernel, mut planner) = programmed(&yaml, &cfg);
        // Another writer of the same set: elements nobody owns come and go, one per commit.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut sock = super::socket::NftSocket::connect().unwrap();
                let table = super::apply::table(IpFamily::V4);
                let set = names::service_endpoints(crate::model::Protocol::Tcp).to_string();
                let mut i: u32 = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = super::rule::Key::AddrPortSlot(
                        "10.97.0.1".parse().unwrap(),
                        crate::model::Protocol::Tcp,
                        80,
                        i % 64,
                    );
                    let e = super::netlink::Element {
                        key: key.bytes(),
                        data: Some(super::rule::Value::Endpoint("10.99.0.1".parse().unwrap(), 80).data()),
                    };
                    let r = if i % 128 < 64 {
                        super::netlink::Request::AddElements {
                            table,
                            set: set.clone(),
                            elements: vec![e],
                        }
                    } else {
                        super::netlink::Request::DeleteElements {
                            table,
                            set: set.clone(),
                            elements: vec![e],
                        }
                    };
                    let generation = sock.generation().unwrap();
                    let _ = sock.batch(generation, &[r]);
                    i += 1;
                    std::thread::sleep(std::time::Duration::from_micros(500));
                }
                i
            })
        };
        let none = HashSet::new();
        for round in 0..10 {
            let (listed, _, _) = read_table(&mut kernel.sock, kernel.table).unwrap();
            // No strays: the other writer's elements are nobody's and may be half-listed.
            let (plan, differences) = planner.reconcile(listed, &none, false);
            assert_eq!(
                differences,
                0,
                "round {round}: {:?}\n{}",
                planner.differed,
                plan_text(&plan, IpFamily::V4)
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(writer.join().unwrap() > 0);
    }) else {
        eprintln!("skipping: needs root (network namespaces)");
        return;
    };
}

/// Both families' tables share the namespace's ruleset generation: the IPv6 table's commits are
/// not "a change behind kproxy's back" for the IPv4 one (which would start a check of the whole
/// table after every cold start), someone else's commit is. Skipped without root.
#[test]
fn the_other_familys_commits_are_not_foreign() {
    let yaml = representative();
    let changed = yaml.replace("10.244.2.2", "10.244.3.2");
    let Some(()) = in_netns(move || {
        let mut kernels = [
            Kernel::connect(IpFamily::V4).unwrap(),
            Kernel::connect(IpFamily::V6).unwrap(),
        ];
        let mut planners = [Planner::new(IpFamily::V4), Planner::new(IpFamily::V6)];
        for (i, cfg) in [config(), v6_config()].iter().enumerate() {
            planners[i].adopt(Default::default());
            let plan = planners[i].plan(&desired(&yaml), &ChangeSet::full(), cfg);
            apply_plan(&mut kernels[i], &mut planners[i], &plan).unwrap();
        }
        let changes = ChangeSet {
            full: false,
            services: ["web", "v6"].iter().map(|s| ServiceKey::new("ns", *s)).collect(),
        };
        let plan = planners[0].plan(&desired(&changed), &changes, &config());
        assert!(!plan.units.is_empty());
        apply_plan(&mut kernels[0], &mut planners[0], &plan).unwrap();
        assert!(!kernels[0].foreign_change, "the IPv6 table's commits are kproxy's own");
        // Someone else commits: noticed.
        nft(&["add", "table", "ip", "someone-else"]);
        let plan = planners[0].plan(&desired(&yaml), &changes, &config());
        apply_plan(&mut kernels[0], &mut planners[0], &plan).unwrap();
        assert!(kernels[0].foreign_change);
    }) else {
        eprintln!("skipping: needs root (network namespaces)");
        return;
    };
}

/// With nf_tables' notifications followed, another writer busy with a table of its own calls
/// for no check (and no refused transaction), while one commit by anyone else into kproxy's
/// table does, naming who and what; once a check has started, what came before is covered.
/// Skipped without root.
#[test]
fn only_commits_into_kproxys_table_call_for_a_check() {
    let yaml = representative();
    let changed = yaml.replace("10.244.2.2", "10.244.3.2");
    let Some(()) = in_netns(move || {
        let cfg = config();
        let (mut kernel, mut planner) = programmed(&yaml, &cfg);
        kernel.follow_others();
        assert_eq!(kernel.changed_by_others().unwrap(), None, "only kproxy committed");
        for i in 0..3 {
            nft(&["add", "table", "ip", &format!("someone-else-{i}")]);
        }
        nft(&["add", "table", "ip6", "kproxy"]);
        nft(&["add", "chain", "ip6", "kproxy", "same-name-other-family"]);
        assert_eq!(kernel.changed_by_others().unwrap(), None, "others' tables only");
        let web = ChangeSet {
            full: false,
            services: [ServiceKey::new("ns", "web")].into(),
        };
        nft(&["add", "table", "ip", "someone-else-3"]);
        let plan = planner.plan(&desired(&changed), &web, &cfg);
        assert!(!plan.units.is_empty());
        apply_plan(&mut kernel, &mut planner, &plan).unwrap();
        assert!(
            !kernel.foreign_change,
            "the other writer's commit did not refuse the transaction"
        );

        nft(&["add", "chain", "ip", "kproxy", "stray"]);
        let why = kernel
            .changed_by_others()
            .unwrap()
            .expect("a commit into kproxy's table");
        assert!(why.contains("a new chain stray in table kproxy"), "{why}");
        assert!(why.contains("nft (pid"), "names who committed: {why}");
        // Still due until a check starts: another writer's commit elsewhere does not hide it.
        nft(&["add", "table", "ip", "someone-else-4"]);
        assert!(kernel.changed_by_others().unwrap().is_some());
        // A foreign commit into the table refuses kproxy's next transaction, and is noticed.
        let plan = planner.plan(&desired(&yaml), &web, &cfg);
        nft(&["delete", "chain", "ip", "kproxy", "stray"]);
        apply_plan(&mut kernel, &mut planner, &plan).unwrap();
        assert!(std::mem::take(&mut kernel.foreign_change));

        kernel.check_starts(true);
        assert_eq!(kernel.changed_by_others().unwrap(), None, "covered by the check");
        nft(&["add", "table", "ip", "someone-else-5"]);
        assert_eq!(kernel.changed_by_others().unwrap(), None);
    }) else {
        eprintln!("skipping: needs root (network namespaces)");
        return;
    };
}

/// Someone else's commits into kproxy's table, seen in nf_tables' notifications, are checked
/// by what they touched: a deleted NodePort element, a rule inserted into a fixed chain, a
/// stray chain and a stray endpoint slot are listed by name and key only (every other set is
/// left unlisted), and repaired; the kernel then holds what was committed. A second round
/// goes through the check's thread entry. Skipped without root.
#[test]
fn a_spot_check_lists_and_repairs_only_what_someone_else_touched() {
    let yaml = representative();
    let Some(()) = in_netns(move || {
        let cfg = config();
        let (mut kernel, planner) = programmed(&yaml, &cfg);
        kernel.follow_others();
        let endpoints = names::service_endpoints(crate::model::Protocol::Tcp);
        delete_node_port_behind_our_back();
        nft(&[
            "insert",
            "rule",
            "ip",
            "kproxy",
            names::SERVICES,
            "ip",
            "saddr",
            "203.0.113.9",
            "drop",
        ]);
        nft(&["add", "chain", "ip", "kproxy", "stray"]);
        let slot = "10.96.99.99 . 80 . 0 : 10.244.250.250 . 8080";
        nft(&["add", "element", "ip", "kproxy", endpoints, &format!("{{ {slot} }}")]);
        nft(&["add", "table", "ip", "someone-else"]);
        assert!(kernel.changed_by_others().unwrap().is_some());
        let super::Scope::Spots(spots) = kernel.check_starts(false) else {
            panic!("a spot check")
        };
        assert_eq!(
            spots.chains.iter().map(String::as_str).collect::<Vec<_>>(),
            [names::SERVICES, "stray"]
        );
        let sets: Vec<&str> = spots.elements.keys().map(String::as_str).collect();
        assert_eq!(sets.len(), 2, "{sets:?}");
        assert!(sets.contains(&names::EXTERNAL_CLUSTER_NODEPORTS) && sets.contains(&endpoints));
        let (listed, _, snapshot) = super::apply::read_spots(&mut kernel.sock, kernel.table, &spots).unwrap();
        assert!(snapshot);
        assert_eq!(listed.chains.len(), 2, "only the touched chains are listed");
        assert!(listed.unlisted.contains(names::HAIRPIN));
        let shared = super::Shared::new(super::Inner {
            planner,
            kernel: Some(kernel),
            recover: false,
            touched: Some(HashSet::new()),
        });
        let held = super::spot_repair(&shared, IpFamily::V4, &listed, &spots, snapshot).expect("the check ran");
        assert_eq!(held.differences, 4, "the NodePort, the rule, the chain, the slot");
        let committed_now = |shared: &super::Shared| {
            let mut g = super::lock(&shared.inner);
            let inner = &mut *g;
            let kernel = inner.kernel.as_mut().unwrap();
            let (now, _, _) = read_table(&mut kernel.sock, kernel.table).unwrap();
            now == inner.planner.committed()
        };
        assert!(committed_now(&shared), "the kernel holds what was committed");
        let table = nft(&["list", "table", "ip", "kproxy"]);
        assert!(!table.contains("203.0.113.9") && !table.contains("chain stray") && !table.contains("10.96.99.99"));
        assert!(table.contains("tcp . 30080"), "{table}");

        // Through the check's thread entry: the touched scope is taken from the notifications.
        delete_node_port_behind_our_back();
        assert!(super::lock(&shared.inner)
            .kernel
            .as_mut()
            .unwrap()
            .changed_by_others()
            .unwrap()
            .is_some());
        super::check_table(&shared, IpFamily::V4, false);
        assert!(committed_now(&shared), "repaired again");
        assert_eq!(
            super::lock(&shared.inner)
                .kernel
                .as_mut()
                .unwrap()
                .changed_by_others()
                .unwrap(),
            None,
            "nothing due after the check"
        );
    }) else {
        eprintln!("skipping: needs root (network namespaces)");
        return;
    };
}

/// A whole check while nf_tables' notifications have shown every foreign change looks the
/// large sets' committed elements up by key instead of dumping them: 150 Services' 1,500
/// endpoint slots (and as many hairpin elements) are looked up, a slot someone rewrote and one
/// they deleted are found and repaired, and the kernel then holds what was committed. With a
/// foreign change due, the whole check dumps. Skipped without root.
#[test]
fn a_whole_check_looks_large_sets_up_by_key() {
    let mut docs = Vec::new();
    for i in 0..150 {
        let name = format!("s{i}");
        docs.push(svc(
            &name,
            &format!("{{clusterIP: 10.96.0.{}, ports: [{{name: http, port: 80}}]}}", 1 + i),
        ));
        let eps: Vec<String> = (0..10).map(|j| format!("10.128.{i}.{}", 1 + j)).collect();
        let refs: Vec<&str> = eps.iter().map(String::as_str).collect();
        docs.push(slice(&name, "http", 8080, &refs));
    }
    let yaml = docs.join("\n---\n");
    let Some(()) = in_netns(move || {
        let cfg = config();
        let (mut kernel, planner) = programmed(&yaml, &cfg);
        kernel.follow_others();
        let endpoints = names::service_endpoints(crate::model::Protocol::Tcp);
        let keys = planner.lookup_keys(super::LOOKUP_ABOVE, &Default::default());
        assert_eq!(keys.get(endpoints).map(Vec::len), Some(1500), "{:?}", keys.keys());
        assert_eq!(keys.get(names::HAIRPIN).map(Vec::len), Some(1500));
        // Nothing due: the whole check may look up.
        assert_eq!(
            kernel.check_starts(true),
            super::Scope::Whole {
                lookups: true,
                also: Default::default()
            }
        );
        let (listed, _, snapshot) = super::apply::read_table_with(&mut kernel.sock, kernel.table, Some(&keys)).unwrap();
        assert!(snapshot);
        assert!(
            listed == planner.committed(),
            "looked up, the table is what was committed"
        );
        let shared = super::Shared::new(super::Inner {
            planner,
            kernel: Some(kernel),
            recover: false,
            touched: None,
        });
        nft(&["delete", "element", "ip", "kproxy", endpoints, "{ 10.96.0.7 . 80 . 3 }"]);
        nft(&[
            "delete element ip kproxy",
            endpoints,
            "{ 10.96.0.9 . 80 . 1 }; add element ip kproxy",
            endpoints,
            "{ 10.96.0.9 . 80 . 1 : 10.244.250.250 . 8080 }",
        ]);
        {
            let mut g = super::lock(&shared.inner);
            let k = g.kernel.as_mut().unwrap();
            assert!(k.changed_by_others().unwrap().is_some());
        }
        // Someone else's elements, in a set kproxy declared: looked up by the keys the
        // notifications named, and deleted as strays.
        nft(&[
            "add",
            "element",
            "ip",
            "kproxy",
            endpoints,
            "{ 10.96.9.9 . 80 . 0 : 10.244.250.251 . 8080 }",
        ]);
        nft(&["add", "set", "ip", "kproxy", "theirs", "{ type ipv4_addr; }"]);
        super::check_table(&shared, IpFamily::V4, true);
        let mut g = super::lock(&shared.inner);
        let inner = &mut *g;
        let kernel = inner.kernel.as_mut().unwrap();
        let (now, _, _) = read_table(&mut kernel.sock, kernel.table).unwrap();
        assert!(now == inner.planner.committed(), "repaired");
        let map = nft(&["list", "map", "ip", "kproxy", endpoints]);
        assert!(!map.contains("10.244.250.250") && !map.contains("10.96.9.9"), "{map}");
        assert!(!nft(&["list", "table", "ip", "kproxy"]).contains("set theirs"));
        // After lost notifications, a whole check dumps.
        kernel.check_failed();
        assert!(matches!(
            kernel.check_starts(true),
            super::Scope::Whole { lookups: false, .. }
        ));
    }) else {
        eprintln!("skipping: needs root (network namespaces)");
        return;
    };
}

/// Someone deletes kproxy's whole table (`nft delete table`, or a flush of the ruleset): the
/// notifications call for a check of the whole table, which finds it gone and writes it
/// again, and the kernel then holds what was committed. Skipped without root.
#[test]
fn a_deleted_table_is_checked_whole_and_written_again() {
    let yaml = representative();
    let Some(()) = in_netns(move || {
        let cfg = config();
        let (mut kernel, planner) = programmed(&yaml, &cfg);
        kernel.follow_others();
        nft(&["delete", "table", "ip", "kproxy"]);
        // The kernel announces every rule, chain and set of the table deleted, then the table.
        assert!(kernel.changed_by_others().unwrap().is_some());
        let shared = super::Shared::new(super::Inner {
            planner,
            kernel: Some(kernel),
            recover: false,
            touched: None,
        });
        super::check_table(&shared, IpFamily::V4, false);
        let mut g = super::lock(&shared.inner);
        let inner = &mut *g;
        assert!(!inner.recover, "repaired by the check, not left to a read-back");
        let kernel = inner.kernel.as_mut().unwrap();
        let (now, _, _) = read_table(&mut kernel.sock, kernel.table).unwrap();
        assert!(now == inner.planner.committed(), "the table is back as committed");
        let np = nft(&["list", "set", "ip", "kproxy", names::EXTERNAL_CLUSTER_NODEPORTS]);
        assert!(np.contains("30080"), "{np}");
    }) else {
        eprintln!("skipping: needs root (network namespaces)");
        return;
    };
}

/// A cold start in many small batches through the writer thread (the kernel commits batch N
/// while N+1 is planned), then a partial sync by handle: after each, the table read back
/// equals what the planner committed, handles of the Services' own rules included. Skipped
/// without root.
#[test]
fn a_streamed_cold_start_commits_what_was_planned() {
    let mut docs = Vec::new();
    for i in 0..60 {
        let sticky = if i % 3 == 0 {
            ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}"
        } else {
            ""
        };
        let name = format!("s{i}");
        docs.push(svc(
            &name,
            &format!("{{clusterIP: 10.96.1.{i}, ports: [{{name: http, port: 80}}]{sticky}}}"),
        ));
        let a = format!("10.244.5.{i}");
        let b = format!("10.244.6.{i}");
        docs.push(slice(&name, "http", 8080, &[&a, &b]));
    }
    let yaml = docs.join("\n---\n");
    let changed = yaml.replace("'10.244.6.3'", "'10.244.7.3'");
    assert!(yaml != changed, "the change must change something");
    let Some(()) = in_netns(move || {
        let cfg = config();
        let family = cfg.family;
        let mut kernel = Kernel::connect(family).unwrap();
        let mut planner = Planner::new(family);
        planner.adopt(Default::default());
        let steps = [
            (yaml.clone(), ChangeSet::full(), 20),
            (
                changed,
                ChangeSet {
                    full: false,
                    services: [ServiceKey::new("ns", "s3")].into_iter().collect(),
                },
                20,
            ),
            (yaml, ChangeSet::full(), usize::MAX),
        ];
        for (i, (doc, changes, batch)) in steps.iter().enumerate() {
            let d = desired(doc);
            let applied = apply_streamed(&mut kernel, &mut planner, |p, sink| {
                p.plan_streamed(&d, changes, &cfg, *batch, sink)
            })
            .unwrap_or_else(|e| panic!("step {i}: {e}"));
            if i == 0 {
                assert!(applied.transactions > 10, "step 0 is many batches: {applied:?}");
            }
            if i == 1 {
                assert!(
                    applied.writes > 0 && applied.writes < 10,
                    "step 1 is one Service's change: {applied:?}"
                );
            }
            let (listed, _, snapshot) = read_table(&mut kernel.sock, kernel.table).unwrap();
            assert!(snapshot);
            assert!(
                planner
                    .state
                    .chains
                    .values()
                    .flat_map(|c| &c.rules)
                    .all(|r| r.handle != 0),
                "step {i}: every rule's handle is recorded"
            );
            assert!(
                listed == planner.committed(),
                "step {i}: the kernel does not hold what was committed"
            );
        }
        let listing = nft(&["list", "ruleset"]);
        assert!(listing.contains("10.244.6.3 . 10.244.6.3"), "{listing}");
        assert!(!listing.contains("10.244.7.3"), "{listing}");
    }) else {
        eprintln!("skipping: needs root (network namespaces)");
        return;
    };
}

/// `representative()` with only Service `web`'s endpoints changed (10.244.2.2 -> 10.244.7.7).
fn web_changed() -> String {
    representative().replacen(
        &slice("web", "http", 8080, &["10.244.1.2@node-1", "10.244.2.2"]),
        &slice("web", "http", 8080, &["10.244.1.2@node-1", "10.244.7.7"]),
        1,
    )
}

/// The listed elements of non-empty sets, sorted: what two committed tables hold whatever
/// their rules' handles.
fn elements_of(t: &super::plan::TableState) -> BTreeSet<(String, Vec<u8>, u64)> {
    t.elements
        .iter()
        .flat_map(|(s, e)| e.iter().map(move |(k, h)| (s.clone(), k.to_vec(), *h)))
        .collect()
}

/// A sync that commits between two steps of a check's comparison (wherever it falls) is not
/// "repaired" back to what the older listing shows, and the foreign change the listing shows
/// is still repaired. Without the sync's owner left out, the stale listing would have
/// reverted it: the test can tell.
#[test]
fn a_sync_between_comparison_steps_is_not_repaired_away() {
    use super::plan::Comparison;
    let before = desired(&representative());
    let after = desired(&web_changed());
    let np_key = super::rule::Key::ProtoPort(crate::model::Protocol::Tcp, 30080).bytes();
    let listing = |planner: &Planner| {
        kernel_after(planner, |k| {
            let np = k.elements.get_mut(names::EXTERNAL_CLUSTER_NODEPORTS).unwrap();
            assert!(np.remove(np_key.as_slice()).is_some());
        })
    };
    let (planner, _) = full(&before, &config());
    let listed = listing(&planner);
    let mut steps = 1;
    let mut c = Comparison::new(&listed);
    while !c.step(&planner, 1) {
        steps += 1;
    }
    assert!(steps > 50, "one object per step: {steps} steps");
    let (want, _) = full(&after, &config());

    for at in 0..steps {
        let (mut planner, _) = full(&before, &config());
        let listed = listing(&planner);
        let mut c = Comparison::new(&listed);
        let mut done = false;
        for _ in 0..at {
            done = c.step(&planner, 1);
        }
        let sync = partial(&mut planner, &after, &["web"]);
        assert!(text(&sync).contains("10.244.7.7"), "{}", text(&sync));
        let touched: HashSet<Owner> = sync.units.iter().map(|u| u.owner.clone()).collect();
        while !done {
            done = c.step(&planner, 1);
        }
        let (plan, differences) = planner.repair(&listed, c.finish(), &touched, false);
        let t = text(&plan);
        assert_eq!(differences, 1, "sync after step {at}: {:?}\n{t}", planner.differed);
        assert!(
            added(&t, names::EXTERNAL_CLUSTER_NODEPORTS).contains("tcp . 30080"),
            "sync after step {at}: the foreign delete is repaired:\n{t}"
        );
        assert!(
            !t.contains("10.96.0.10"),
            "sync after step {at}: web is left as synced:\n{t}"
        );
        echo(&mut planner, &plan);
        assert_eq!(
            elements_of(&planner.committed()),
            elements_of(&want.committed()),
            "sync after step {at}: the committed table is web's new one"
        );
    }

    // The hazard the skip set prevents: the same listing, its owner not left out.
    let (mut planner, _) = full(&before, &config());
    let listed = listing(&planner);
    let mut c = Comparison::new(&listed);
    c.step(&planner, 1);
    partial(&mut planner, &after, &["web"]);
    while !c.step(&planner, 1) {}
    let (plan, _) = planner.repair(&listed, c.finish(), &HashSet::new(), false);
    assert!(text(&plan).contains("10.96.0.10"), "{}", text(&plan));
}

/// A sync waiting for the planner's lock gets it before the check's next step: the check
/// waits while a sync waits. Ordered by the lock and the waiting count, not by time.
#[test]
fn a_waiting_sync_goes_before_the_checks_next_step() {
    let shared = std::sync::Arc::new(super::Shared::new(super::Inner {
        planner: Planner::new(IpFamily::V4),
        kernel: None,
        recover: false,
        touched: None,
    }));
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let held = shared.lock_for_sync();
    let sync = {
        let (shared, order) = (shared.clone(), order.clone());
        std::thread::spawn(move || {
            let _g = shared.lock_for_sync();
            order.lock().unwrap().push("sync");
        })
    };
    while shared.waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    drop(held);
    let _g = shared.lock_for_check();
    order.lock().unwrap().push("check");
    sync.join().unwrap();
    assert_eq!(*order.lock().unwrap(), ["sync", "check"]);
}

/// Another writer's change to kproxy's table: the representative NodePort's element deleted.
fn delete_node_port_behind_our_back() {
    nft(&[
        "delete",
        "element",
        "ip",
        "kproxy",
        names::EXTERNAL_CLUSTER_NODEPORTS,
        "{ tcp . 30080 }",
    ]);
}

/// The check in the kernel: the table listed with a foreign delete in it, then compared one
/// object per step; between two steps the lock is free and a sync commits a change of
/// Service web through it. The check repairs the foreign delete only, and the kernel then
/// holds what was committed, web's new endpoint included. Skipped without root.
#[test]
fn a_check_lets_a_sync_commit_mid_comparison_and_keeps_it() {
    let yaml = representative();
    let changed = web_changed();
    let Some(()) = in_netns(move || {
        let cfg = config();
        let (mut kernel, planner) = programmed(&yaml, &cfg);
        delete_node_port_behind_our_back();
        let (listed, _, snapshot) = read_table(&mut kernel.sock, kernel.table).unwrap();
        assert!(snapshot);
        let shared = super::Shared::new(super::Inner {
            planner,
            kernel: Some(kernel),
            recover: false,
            touched: Some(HashSet::new()),
        });
        let after = desired(&changed);
        let mut between = 0;
        let held = super::compare_and_repair(&shared, IpFamily::V4, &listed, snapshot, 1, &mut || {
            between += 1;
            if between != 20 {
                return;
            }
            let mut g = shared.inner.try_lock().expect("no lock held between steps");
            let inner = &mut *g;
            let changes = ChangeSet {
                full: false,
                services: [ServiceKey::new("ns", "web")].into(),
            };
            let plan = inner.planner.plan(&after, &changes, &config());
            let applied = apply_plan(inner.kernel.as_mut().unwrap(), &mut inner.planner, &plan).unwrap();
            assert!(applied.writes > 0);
            inner.committed(&applied.owners);
        })
        .expect("the check ran to the end");
        assert!(between > 20, "{between} steps");
        assert_eq!(held.differences, 1, "only the foreign delete");
        let mut g = super::lock(&shared.inner);
        let inner = &mut *g;
        assert!(!inner.recover && inner.touched.is_none());
        let kernel = inner.kernel.as_mut().unwrap();
        let (now, _, _) = read_table(&mut kernel.sock, kernel.table).unwrap();
        assert!(now == inner.planner.committed(), "the kernel holds what was committed");
        let map = nft(&[
            "list",
            "map",
            "ip",
            "kproxy",
            names::service_endpoints(crate::model::Protocol::Tcp),
        ]);
        assert!(map.contains("10.244.7.7"), "web's new endpoint:\n{map}");
        let np = nft(&["list", "set", "ip", "kproxy", names::EXTERNAL_CLUSTER_NODEPORTS]);
        assert!(np.contains("30080"), "the NodePort is back:\n{np}");
    }) else {
        eprintln!("skipping: needs root (network namespaces)");
        return;
    };
}

/// Checks reuse one netlink socket: closing one makes the kernel take its commit mutex for an
/// RCU grace period, and a sync then waits. Two checks in the kernel, a foreign delete
/// before each: both are repaired, and the second lists through the first's socket (the same
/// port id). Skipped without root.
#[test]
fn checks_keep_their_socket_and_still_repair() {
    let yaml = representative();
    let Some(()) = in_netns(move || {
        let cfg = config();
        let (kernel, planner) = programmed(&yaml, &cfg);
        let shared = super::Shared::new(super::Inner {
            planner,
            kernel: Some(kernel),
            recover: false,
            touched: None,
        });
        let kept = || {
            let g = shared.check_sock.lock().unwrap();
            g.as_ref().map(|s| s.port_id().unwrap())
        };
        assert_eq!(kept(), None);
        let mut ports = Vec::new();
        for _ in 0..2 {
            delete_node_port_behind_our_back();
            super::check_table(&shared, IpFamily::V4, true);
            let np = nft(&["list", "set", "ip", "kproxy", names::EXTERNAL_CLUSTER_NODEPORTS]);
            assert!(np.contains("30080"), "the check repaired the NodePort:\n{np}");
            ports.push(kept().expect("the check kept its socket"));
        }
        assert_eq!(ports[0], ports[1], "the second check listed through the first's socket");
    }) else {
        eprintln!("skipping: needs root (network namespaces)");
        return;
    };
}

/// The check's thread lists at a lower priority and gets its own back: the nice value is the
/// thread's, not the process's.
#[test]
fn the_check_lists_at_a_lower_priority_of_its_own_thread() {
    let nice = || rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
    let main = nice();
    let (before, during, after) = std::thread::spawn(move || {
        let before = nice();
        let restore = super::lower_priority();
        let during = nice();
        if let Some(n) = restore {
            super::set_thread_nice(n);
        }
        (before, during, nice())
    })
    .join()
    .unwrap();
    assert_eq!(during, (before + super::CHECK_NICER).min(19));
    assert_eq!(nice(), main, "the other threads keep theirs");
    if rustix::process::geteuid().is_root() {
        assert_eq!(after, before, "back to its own priority");
    }
}
