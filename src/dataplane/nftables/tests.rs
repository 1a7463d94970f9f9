//! The planner's transactions: what a full and a partial sync write, checked by meaning (which
//! map elements point where, which chains are touched) and, as root, applied by the kernel in a
//! throwaway network namespace.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::names;
use super::plan::{KernelObjects, Plan, Planner};
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
        endpoint_comments: true,
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

fn full(d: &DesiredState, cfg: &RenderConfig) -> (Planner, Plan) {
    let mut planner = Planner::new();
    let plan = planner.plan(d, &ChangeSet::full(), cfg, None);
    (planner, plan)
}

fn partial(planner: &mut Planner, d: &DesiredState, services: &[&str]) -> Plan {
    let changes = ChangeSet {
        full: false,
        services: services.iter().map(|s| ServiceKey::new("ns", *s)).collect(),
    };
    planner.plan(d, &changes, &config(), None)
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

/// Rules of `chain` in the transaction.
fn rules<'a>(text: &'a str, chain: &str) -> Vec<&'a str> {
    let prefix = format!("add rule ip kproxy {chain} ");
    text.lines().filter_map(|l| l.strip_prefix(&prefix)).collect()
}

#[test]
fn service_addresses_dispatch_to_their_chains_or_are_refused() {
    let (_, plan) = full(&desired(&representative()), &config());
    let ips = added(&plan.text, names::SERVICE_IPS);
    let web = names::service_chain(&port("web"));
    assert!(ips.contains(&format!("10.96.0.10 . tcp . 80 : goto {web}")), "{ips:?}");
    let np_ext = names::external_chain(&port("np"));
    assert!(added(&plan.text, names::SERVICE_NODEPORTS).contains(&format!("tcp . 30080 : goto {np_ext}")));
    // No endpoints at all: refused, on the cluster IP and the NodePort.
    assert!(added(&plan.text, names::NO_ENDPOINT_SERVICES).contains("10.96.0.12 . tcp . 80 : goto reject-chain"));
    assert!(added(&plan.text, names::NO_ENDPOINT_NODEPORTS).contains("tcp . 30081 : goto reject-chain"));
    assert!(!ips.iter().any(|e| e.starts_with("10.96.0.12 ")));
    // externalTrafficPolicy Local with its only endpoint on another node: external traffic is
    // dropped (not refused), cluster traffic still works.
    let drops = added(&plan.text, names::NO_ENDPOINT_SERVICES);
    assert!(drops.contains("198.51.100.20 . tcp . 80 : drop"), "{drops:?}");
    assert!(added(&plan.text, names::NO_ENDPOINT_NODEPORTS).contains("tcp . 30090 : drop"));
    assert!(ips.contains(&format!(
        "10.96.0.20 . tcp . 80 : goto {}",
        names::service_chain(&port("lb"))
    )));
    // internalTrafficPolicy Local: the local chain with the local endpoint only.
    let itp_local = names::local_chain(&port("itp"));
    assert!(ips.contains(&format!("10.96.0.40 . tcp . 80 : goto {itp_local}")));
    assert_eq!(
        rules(&plan.text, &itp_local).last().copied(),
        Some("meta l4proto tcp dnat to 10.244.1.2:8080")
    );
    assert_eq!(plan.no_local_endpoints, (0, 1));
    // Terminating endpoints serve when nothing is ready.
    assert!(ips
        .iter()
        .any(|e| e.starts_with("10.96.0.41 . tcp . 80 : goto service-")));
}

fn endpoint(port: &crate::model::ServicePortName, ip: &str) -> String {
    let ep = crate::model::Endpoint {
        ip: ip.parse().unwrap(),
        port: 8080,
        ready: true,
        serving: true,
        terminating: false,
        node_name: None,
        zone: None,
        zone_hints: Default::default(),
        node_hints: Default::default(),
        is_local: false,
    };
    names::endpoint_chain(port, &ep)
}

#[test]
fn balancing_masquerade_and_dnat() {
    let (_, plan) = full(&desired(&representative()), &config());
    let web = rules(&plan.text, &names::service_chain(&port("web")));
    assert_eq!(
        web,
        [
            "ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade",
            "meta l4proto tcp numgen random mod 2 0 dnat to 10.244.1.2:8080",
            "meta l4proto tcp dnat to 10.244.2.2:8080",
        ]
    );
    // Without session affinity there are no endpoint chains at all.
    let a = endpoint(&port("web"), "10.244.1.2");
    assert!(!plan.text.contains(&a), "{}", plan.text);
    // Hairpin: one set of endpoint . endpoint, checked after DNAT.
    assert_eq!(
        added(&plan.text, names::HAIRPIN),
        BTreeSet::from([
            "10.244.1.2 . 10.244.1.2".to_string(),
            "10.244.2.2 . 10.244.2.2".to_string()
        ])
    );
    assert_eq!(
        rules(&plan.text, names::NAT_POSTROUTING),
        [
            "ct status dnat ip saddr . ip daddr @hairpin jump mark-for-masquerade",
            "jump masquerading"
        ]
    );
    let ext = rules(&plan.text, &names::external_chain(&port("np")));
    assert_eq!(
        ext,
        [
            "jump mark-for-masquerade".to_string(),
            format!("goto {}", names::service_chain(&port("np")))
        ]
    );
    assert_eq!(
        rules(&plan.text, names::MASQUERADING),
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
    let sticky = rules(&plan.text, &names::service_chain(&port("sticky")));
    assert!(
        sticky[1].starts_with("ip saddr @affinity-") && sticky[1].contains(" goto endpoint-"),
        "{sticky:?}"
    );
    assert!(sticky[3].starts_with("numgen random mod 2"), "{sticky:?}");
    let sets: Vec<&str> = plan
        .text
        .lines()
        .filter(|l| l.starts_with("add set ip kproxy affinity-"))
        .collect();
    assert_eq!(sets.len(), 2, "{sets:?}");
    assert!(sets[0].ends_with("{ type ipv4_addr; flags dynamic,timeout; timeout 600s; }"));
    let ep = rules(&plan.text, &endpoint(&port("sticky"), "10.244.2.2"));
    assert!(
        ep[0].starts_with("update @affinity-") && ep[0].ends_with(" { ip saddr }"),
        "{ep:?}"
    );
}

#[test]
fn load_balancer_source_ranges_filter_before_dnat() {
    let (_, plan) = full(&desired(&representative()), &config());
    let fw = names::firewall_chain(&port("fw"));
    assert!(added(&plan.text, names::FIREWALL_IPS).contains(&format!("198.51.100.50 . tcp . 80 : goto {fw}")));
    // 192.0.2.0/24 holds the node's address: the node reaching its own VIP is allowed too.
    assert_eq!(
        rules(&plan.text, &fw),
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
    let web = names::service_chain(&port("web"));
    let cfg = RenderConfig {
        masquerade_all: true,
        ..config()
    };
    let (_, plan) = full(&d, &cfg);
    assert_eq!(
        rules(&plan.text, &web)[0],
        "ip daddr 10.96.0.10 tcp dport 80 jump mark-for-masquerade"
    );
    let cfg = RenderConfig {
        local_detector: LocalDetector::None,
        ..config()
    };
    let (_, plan) = full(&d, &cfg);
    assert!(
        rules(&plan.text, &web)[0].starts_with("meta l4proto tcp numgen random mod 2 0 dnat"),
        "no detector: sources are kept"
    );
    let cfg = RenderConfig {
        local_detector: LocalDetector::InterfacePrefix("veth".into()),
        ..config()
    };
    let (_, plan) = full(&d, &cfg);
    assert!(rules(&plan.text, &web)[0].contains("iifname != \"veth*\" jump mark-for-masquerade"));
}

#[test]
fn nodeport_addresses_limit_where_node_ports_answer() {
    let d = desired(&representative());
    let (_, plan) = full(&d, &config());
    assert!(rules(&plan.text, names::SERVICES)
        .contains(&"fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"));
    let cfg = RenderConfig {
        nodeports: NodePortMatch::Addresses(vec!["192.0.2.1".parse().unwrap(), "fd00::1".parse().unwrap()]),
        ..config()
    };
    let (_, plan) = full(&d, &cfg);
    assert!(rules(&plan.text, names::SERVICES)
        .contains(&"ip daddr { 192.0.2.1 } meta l4proto . th dport vmap @service-nodeports"));
}

#[test]
fn partial_sync_writes_only_the_changed_service() {
    let yaml = representative();
    let (mut planner, _) = full(&desired(&yaml), &config());
    assert!(partial(&mut planner, &desired(&yaml), &[]).text.is_empty());

    // web loses one endpoint.
    let changed = yaml.replace(
        &slice("web", "http", 8080, &["10.244.1.2@node-1", "10.244.2.2"]),
        &slice("web", "http", 8080, &["10.244.1.2@node-1"]),
    );
    let plan = partial(&mut planner, &desired(&changed), &["web"]);
    assert!(!plan.full);
    let web = names::service_chain(&port("web"));
    let t = &plan.text;
    assert!(t.contains(&format!("flush chain ip kproxy {web}\n")), "{t}");
    assert_eq!(
        rules(t, &web).last().copied(),
        Some("meta l4proto tcp dnat to 10.244.1.2:8080")
    );
    assert!(!t.contains("delete chain"), "{t}");
    assert!(
        !t.contains("element"),
        "dispatch and hairpin elements did not change:\n{t}"
    );
    assert!(
        !t.contains("ns/np/") && !t.contains("ns/sticky/"),
        "other Services untouched:\n{t}"
    );
    assert!(!t.contains("add chain ip kproxy services"), "fixed chains untouched");
    assert_eq!(plan.rules_written, 2, "the service chain's two rules");
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
    let t = &plan.text;
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
    let plan = partial(&mut planner, &desired(&emptied.join("\n---\n")), &["web"]);
    assert!(plan
        .text
        .contains("delete element ip kproxy service-ips { 10.96.0.10 . tcp . 80 }"));
    assert!(plan
        .text
        .contains("add element ip kproxy no-endpoint-services { 10.96.0.10 . tcp . 80 : goto reject-chain }"));
}

#[test]
fn full_sync_deletes_what_the_kernel_has_and_nobody_wants() {
    let d = desired(&representative());
    let mut kernel = KernelObjects::default();
    kernel.add_listing(
        "table ip kproxy",
        "table ip kproxy {\n\tchain service-XXXX-ns/old/tcp/http {\n\t}\n\tchain services {\n\t}\n}\ntable ip other {\n\tchain foo {\n\t}\n}\n",
    );
    kernel.add_listing(
        "table ip kproxy",
        "table ip kproxy {\n\tset affinity-XXXX-ns/old/tcp/http__10.244.9.9/80 {\n\t\ttype ipv4_addr\n\t\tflags dynamic,timeout\n\t}\n\tmap service-ips {\n\t}\n}\n",
    );
    assert!(!kernel.chains.contains("foo"), "other tables are not kproxy's");
    assert!(kernel.chains.contains("services"));
    let plan = Planner::new().plan(&d, &ChangeSet::full(), &config(), Some(&kernel));
    assert!(plan.full);
    assert!(plan
        .text
        .contains("delete chain ip kproxy service-XXXX-ns/old/tcp/http\n"));
    assert!(plan
        .text
        .contains("delete set ip kproxy affinity-XXXX-ns/old/tcp/http__10.244.9.9/80\n"));
    assert!(!plan.text.contains("delete chain ip kproxy services\n"));
    assert!(!plan.text.contains("delete set ip kproxy service-ips"));
    // A full sync flushes and refills, never deletes the table: affinity survives it.
    assert!(!plan.text.contains("delete table"));
    assert!(plan.text.contains("flush map ip kproxy service-ips\n"));
}

#[test]
fn ipv6_renders_its_own_table() {
    let d = desired(&representative());
    let (_, plan) = full(&d, &v6_config());
    let t = &plan.text;
    assert!(t.starts_with("add table ip6 kproxy\n"));
    assert!(t.contains("add map ip6 kproxy service-ips { type ipv6_addr . inet_proto . inet_service : verdict; }"));
    assert!(t.contains("add element ip6 kproxy service-ips { fd00::10 . tcp . 80 : goto service-"));
    assert!(
        t.contains("meta l4proto tcp numgen random mod 2 0 dnat to [fd00:244::2]:8080\nadd rule ip6 kproxy service-")
    );
    assert!(t.contains("add element ip6 kproxy hairpin { fd00:244::2 . fd00:244::2, fd00:244::3 . fd00:244::3 }"));
    assert!(t.contains("ip6 saddr != fd00:244::/64 jump mark-for-masquerade"));
    assert!(!t.contains("10.96.0.10"), "IPv4 Services belong to the other table");
}

/// Applies `steps` one by one in a new network namespace, as the kernel would in a sync each.
/// Skipped (with a note) without root or nft.
fn kernel_accepts(steps: &[&str]) {
    let ok = std::process::Command::new("unshare")
        .args(["-n", "nft", "list", "tables"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping the kernel check: needs root and nft");
        return;
    }
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kproxy-nft-test-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut script = String::from("set -e\n");
    for (i, step) in steps.iter().enumerate() {
        let path = dir.join(format!("{i}.nft"));
        std::fs::write(&path, step).unwrap();
        script.push_str(&format!("nft -f {}\n", path.display()));
    }
    let out = std::process::Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "nft refused:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        steps.join("\n----\n")
    );
}

#[test]
fn kernel_accepts_full_and_partial_transactions() {
    let yaml = representative();
    let d = desired(&yaml);
    let (mut planner, first) = full(&d, &config());
    let (_, v6) = full(&d, &v6_config());
    let again = planner.plan(&d, &ChangeSet::full(), &config(), None);
    let changed = yaml.replace(
        &slice("web", "http", 8080, &["10.244.1.2@node-1", "10.244.2.2"]),
        &slice("web", "http", 8080, &["10.244.1.2@node-1", "10.244.3.2"]),
    );
    let changed = changed.replace("timeoutSeconds: 600", "timeoutSeconds: 60");
    let p1 = partial(&mut planner, &desired(&changed), &["web", "sticky"]);
    let without: Vec<&str> = changed
        .split("\n---\n")
        .filter(|doc| !doc.contains("name: sticky") && !doc.contains("name: fw"))
        .collect();
    let p2 = partial(
        &mut planner,
        &desired(&without.join("\n---\n")),
        &["sticky", "fw", "empty"],
    );
    // 10.244.3.2 is new to the node: it joins the hairpin set, and leaves it with its last user.
    assert!(
        added(&p1.text, names::HAIRPIN).contains("10.244.3.2 . 10.244.3.2"),
        "{}",
        p1.text
    );
    let p3 = partial(&mut planner, &desired(&yaml), &["web", "sticky", "fw", "empty"]);
    assert!(
        p3.text
            .contains("delete element ip kproxy hairpin { 10.244.3.2 . 10.244.3.2 }"),
        "{}",
        p3.text
    );
    kernel_accepts(&[&first.text, &v6.text, &again.text, &p1.text, &p2.text, &p3.text]);
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
    let claims: Vec<String> = added(&plan.text, names::SERVICE_IPS)
        .into_iter()
        .filter(|e| e.starts_with("198.51.100.60 "))
        .collect();
    assert_eq!(
        claims,
        [format!(
            "198.51.100.60 . tcp . 80 : goto {}",
            names::external_chain(&port("a"))
        )]
    );
    // b changes: it still does not get the address.
    let plan = partial(
        &mut planner,
        &desired(&yaml.replace("10.244.2.2", "10.244.3.2")),
        &["b"],
    );
    assert!(!plan.text.contains("198.51.100.60"), "{}", plan.text);
    // a goes away: its claim is released (b gets it at its next render).
    let without_a = yaml.replace(&format!("{a}\n---\n"), "");
    let plan = partial(&mut planner, &desired(&without_a), &["a", "b"]);
    assert!(plan
        .text
        .lines()
        .any(|l| l.starts_with("delete element ip kproxy service-ips {") && l.contains("198.51.100.60 . tcp . 80")));
    assert!(plan.text.contains(&format!(
        "198.51.100.60 . tcp . 80 : goto {}",
        names::external_chain(&port("b"))
    )));
    kernel_accepts(&[&full(&desired(&yaml), &config()).1.text]);
}
