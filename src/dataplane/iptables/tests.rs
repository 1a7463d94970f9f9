//! Packet-flow tests over rendered rules (where does a packet land, masqueraded or not), the
//! partial-sync plan, and a golden file of the rendered ruleset.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::plan::{KernelState, Plan};
use super::render::{LocalDetector, NodePortMatch, RenderConfig};
use super::tracer::{Origin, Packet, Ruleset, TraceResult};
use super::{names, Planner};
use crate::model::store::Store;
use crate::model::{ChangeSet, DesiredState, IpFamily, ServiceKey};

const NODE_IP: &str = "192.0.2.1";

/// A plan with its restore input rendered whole, as the tests read it.
struct Planned {
    plan: Plan,
    restore: String,
}

trait PlanText {
    /// Plans a sync as the proxier does (with `kernel` as what iptables-save showed before a
    /// full one) and renders its input.
    fn plan_text(
        &mut self,
        d: &DesiredState,
        changes: &ChangeSet,
        cfg: &RenderConfig,
        kernel: Option<&KernelState>,
    ) -> Planned;
}

impl PlanText for Planner {
    fn plan_text(
        &mut self,
        d: &DesiredState,
        changes: &ChangeSet,
        cfg: &RenderConfig,
        kernel: Option<&KernelState>,
    ) -> Planned {
        let plan = self.plan(d, changes, cfg);
        if let Some(kernel) = kernel {
            self.adopt_kernel(kernel);
        }
        let restore = self.restore_input(d).into_string();
        assert_eq!(restore.is_empty(), plan.empty, "{restore}");
        Planned { plan, restore }
    }
}

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

/// A store loaded from YAML documents (Services and EndpointSlices), for node `node-1`.
fn store(yaml: &str) -> Store {
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
    let node: Node = serde_yaml::from_str(&format!(
        "metadata: {{name: node-1, labels: {{topology.kubernetes.io/zone: zone-a}}}}\nstatus: {{addresses: [{{type: InternalIP, address: {NODE_IP}}}]}}"
    ))
    .unwrap();
    store.apply_node(&node);
    store
}

fn desired(yaml: &str) -> DesiredState {
    store(yaml).snapshot().desired
}

/// The kernel's view after a full sync onto a fresh node (the restore input puts in the jumps
/// from the built-in chains too).
fn ruleset(desired: &DesiredState, cfg: &RenderConfig) -> Ruleset {
    let plan = Planner::new().plan_text(desired, &ChangeSet::full(), cfg, None);
    Ruleset::parse(&plan.restore).unwrap_or_else(|e| panic!("{e}\n{}", plan.restore))
}

fn trace(rules: &Ruleset, from: Origin, src: &str, dst: &str, udp: bool) -> TraceResult {
    let packet = if udp {
        Packet::udp(from, src, dst)
    } else {
        Packet::tcp(from, src, dst)
    };
    rules
        .tracer([NODE_IP.parse().unwrap()])
        .trace(&packet)
        .unwrap_or_else(|e| panic!("trace {src} -> {dst}: {e}"))
}

/// Asserts where a packet lands ("ip:port, ..." / "REJECT" / "DROP" / "ACCEPT") and whether it
/// is masqueraded (`None` for mixed outcomes such as hairpin).
#[track_caller]
fn check(rules: &Ruleset, from: Origin, src: &str, dst: &str, want: &str, masq: Option<bool>) {
    let r = trace(rules, from, src, dst, false);
    assert_eq!(r.to_string(), want, "{src} -> {dst}\n{}", r.explain());
    assert_eq!(r.masquerade(), masq, "{src} -> {dst} masquerade\n{}", r.explain());
}

/// The basic fixture's `web` Service from another pod: both endpoints, not masqueraded.
#[track_caller]
fn check_web_from_pod(rules: &Ruleset) {
    let both = "10.244.1.2:8080, 10.244.2.2:8080";
    check(rules, Origin::Remote, "10.244.3.5", "10.96.0.10:80", both, Some(false));
}

/// The chains a restore input declares (creates or flushes) in `table`.
fn declared<'a>(restore: &'a str, table: &str) -> Vec<&'a str> {
    let header = format!("*{table}");
    restore
        .lines()
        .skip_while(|l| *l != header)
        .take_while(|l| *l != "COMMIT")
        .filter_map(|l| l.strip_prefix(':')?.split(' ').next())
        .collect()
}

fn svc(name: &str, spec: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec: {spec}")
}

/// A slice with endpoints given as `ip[@node][:state]`, state = ready (default), terminating, down.
fn slice(service: &str, port_name: &str, port: u16, endpoints: &[&str]) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|e| {
            let (rest, state) = e.split_once(':').unwrap_or((e, "ready"));
            let (ip, node) = rest.split_once('@').unwrap_or((rest, "node-2"));
            let cond = match state {
                "ready" => "{ready: true, serving: true, terminating: false}",
                "terminating" => "{ready: false, serving: true, terminating: true}",
                _ => "{ready: false, serving: false, terminating: false}",
            };
            format!("{{addresses: [{ip}], nodeName: {node}, conditions: {cond}}}")
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-x, namespace: ns, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: {port_name}, port: {port}, protocol: TCP}}]\nendpoints: [{}]",
        eps.join(", ")
    )
}

fn basic() -> String {
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
    ]
    .join("\n---\n")
}

#[test]
fn cluster_ip_balances_and_masquerades_only_off_cluster_sources() {
    let rules = ruleset(&desired(&basic()), &config());
    let both = "10.244.1.2:8080, 10.244.2.2:8080";
    check(&rules, Origin::Remote, "10.244.3.5", "10.96.0.10:80", both, Some(false));
    check(&rules, Origin::Remote, "203.0.113.9", "10.96.0.10:80", both, Some(true));
    check(&rules, Origin::Local, NODE_IP, "10.96.0.10:80", both, Some(true));
    // Hairpin: the pod reaches itself only masqueraded, the other pod directly.
    let r = trace(&rules, Origin::Remote, "10.244.1.2", "10.96.0.10:80", false);
    assert_eq!(r.to_string(), both);
    assert_eq!(r.masquerade(), None, "{}", r.explain());
    // Another port on the same cluster IP is none of kproxy's business.
    check(
        &rules,
        Origin::Remote,
        "10.244.3.5",
        "10.96.0.10:81",
        "ACCEPT",
        Some(false),
    );
}

#[test]
fn node_port_from_outside_is_masqueraded() {
    let rules = ruleset(&desired(&basic()), &config());
    let dst = format!("{NODE_IP}:30080");
    check(
        &rules,
        Origin::Remote,
        "203.0.113.9",
        &dst,
        "10.244.1.2:8080, 10.244.2.2:8080",
        Some(true),
    );
    // Not a node address: not a NodePort.
    check(
        &rules,
        Origin::Remote,
        "203.0.113.9",
        "198.51.100.7:30080",
        "ACCEPT",
        Some(false),
    );
}

#[test]
fn no_endpoints_rejects_cluster_ip_and_node_port() {
    let rules = ruleset(&desired(&basic()), &config());
    check(
        &rules,
        Origin::Remote,
        "10.244.3.5",
        "10.96.0.12:80",
        "REJECT",
        Some(false),
    );
    check(&rules, Origin::Local, NODE_IP, "10.96.0.12:80", "REJECT", Some(false));
    check(
        &rules,
        Origin::Remote,
        "203.0.113.9",
        &format!("{NODE_IP}:30081"),
        "REJECT",
        Some(false),
    );
}

#[test]
fn masquerade_all() {
    let cfg = RenderConfig {
        masquerade_all: true,
        local_detector: LocalDetector::None,
        ..config()
    };
    let rules = ruleset(&desired(&basic()), &cfg);
    check(
        &rules,
        Origin::Remote,
        "10.244.3.5",
        "10.96.0.10:80",
        "10.244.1.2:8080, 10.244.2.2:8080",
        Some(true),
    );
}

#[test]
fn without_cluster_cidr_cluster_ip_traffic_keeps_its_source() {
    let cfg = RenderConfig {
        local_detector: LocalDetector::None,
        ..config()
    };
    let rules = ruleset(&desired(&basic()), &cfg);
    check(
        &rules,
        Origin::Remote,
        "203.0.113.9",
        "10.96.0.10:80",
        "10.244.1.2:8080, 10.244.2.2:8080",
        Some(false),
    );
}

fn etp_local(endpoints: &[&str]) -> String {
    [
        svc(
            "lb",
            "{type: LoadBalancer, clusterIP: 10.96.0.20, externalTrafficPolicy: Local, healthCheckNodePort: 32000, externalIPs: [198.51.100.20], ports: [{name: http, port: 80, nodePort: 30090}]}",
        ),
        slice("lb", "http", 8080, endpoints),
    ]
    .join("\n---\n")
}

#[test]
fn external_traffic_policy_local() {
    let rules = ruleset(&desired(&etp_local(&["10.244.1.2@node-1", "10.244.2.2"])), &config());
    let np = format!("{NODE_IP}:30090");
    // Outside clients reach only the local endpoint and keep their source address.
    check(
        &rules,
        Origin::Remote,
        "203.0.113.9",
        &np,
        "10.244.1.2:8080",
        Some(false),
    );
    check(
        &rules,
        Origin::Remote,
        "203.0.113.9",
        "198.51.100.20:80",
        "10.244.1.2:8080",
        Some(false),
    );
    // Pods use every endpoint (as if via the load balancer), unmasqueraded from the cluster CIDR.
    check(
        &rules,
        Origin::Remote,
        "10.244.3.5",
        &np,
        "10.244.1.2:8080, 10.244.2.2:8080",
        Some(false),
    );
    // The node itself: every endpoint, masqueraded.
    check(
        &rules,
        Origin::Local,
        NODE_IP,
        &np,
        "10.244.1.2:8080, 10.244.2.2:8080",
        Some(true),
    );
    // Cluster IP is unaffected by eTP.
    check(
        &rules,
        Origin::Remote,
        "10.244.3.5",
        "10.96.0.20:80",
        "10.244.1.2:8080, 10.244.2.2:8080",
        Some(false),
    );
    // The health check port is accepted.
    check(
        &rules,
        Origin::Remote,
        "203.0.113.9",
        &format!("{NODE_IP}:32000"),
        "ACCEPT",
        Some(false),
    );

    let remote_only = ruleset(&desired(&etp_local(&["10.244.2.2"])), &config());
    check(&remote_only, Origin::Remote, "203.0.113.9", &np, "DROP", Some(false));
    check(
        &remote_only,
        Origin::Remote,
        "10.244.3.5",
        &np,
        "10.244.2.2:8080",
        Some(false),
    );
    check(
        &remote_only,
        Origin::Remote,
        "10.244.3.5",
        "10.96.0.20:80",
        "10.244.2.2:8080",
        Some(false),
    );
}

#[test]
fn internal_traffic_policy_local() {
    let yaml = |eps: &[&str]| {
        [
            svc(
                "itp",
                "{clusterIP: 10.96.0.30, internalTrafficPolicy: Local, ports: [{name: http, port: 80}]}",
            ),
            slice("itp", "http", 8080, eps),
        ]
        .join("\n---\n")
    };
    let rules = ruleset(&desired(&yaml(&["10.244.1.2@node-1", "10.244.2.2"])), &config());
    check(
        &rules,
        Origin::Remote,
        "10.244.3.5",
        "10.96.0.30:80",
        "10.244.1.2:8080",
        Some(false),
    );
    let none_local = ruleset(&desired(&yaml(&["10.244.2.2"])), &config());
    check(
        &none_local,
        Origin::Remote,
        "10.244.3.5",
        "10.96.0.30:80",
        "DROP",
        Some(false),
    );
}

#[test]
fn terminating_endpoints_only_when_nothing_is_ready() {
    let yaml = |eps: &[&str]| {
        [
            svc("t", "{clusterIP: 10.96.0.40, ports: [{name: http, port: 80}]}"),
            slice("t", "http", 8080, eps),
        ]
        .join("\n---\n")
    };
    let rules = ruleset(&desired(&yaml(&["10.244.1.2", "10.244.2.2:terminating"])), &config());
    check(
        &rules,
        Origin::Remote,
        "10.244.3.5",
        "10.96.0.40:80",
        "10.244.1.2:8080",
        Some(false),
    );
    let rules = ruleset(
        &desired(&yaml(&["10.244.1.2:down", "10.244.2.2:terminating"])),
        &config(),
    );
    check(
        &rules,
        Origin::Remote,
        "10.244.3.5",
        "10.96.0.40:80",
        "10.244.2.2:8080",
        Some(false),
    );
    let rules = ruleset(&desired(&yaml(&["10.244.1.2:down"])), &config());
    check(
        &rules,
        Origin::Remote,
        "10.244.3.5",
        "10.96.0.40:80",
        "REJECT",
        Some(false),
    );
}

#[test]
fn load_balancer_source_ranges() {
    let yaml = [
        "apiVersion: v1\nkind: Service\nmetadata: {name: fw, namespace: ns}\nspec: {type: LoadBalancer, clusterIP: 10.96.0.50, loadBalancerSourceRanges: [203.0.113.0/24], ports: [{name: http, port: 80, nodePort: 30100}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.50}]}}".to_string(),
        slice("fw", "http", 8080, &["10.244.2.2"]),
    ]
    .join("\n---\n");
    let rules = ruleset(&desired(&yaml), &config());
    check(
        &rules,
        Origin::Remote,
        "203.0.113.9",
        "198.51.100.50:80",
        "10.244.2.2:8080",
        Some(true),
    );
    check(
        &rules,
        Origin::Remote,
        "192.0.2.77",
        "198.51.100.50:80",
        "DROP",
        Some(false),
    );
}

#[test]
fn session_affinity_still_reaches_every_endpoint() {
    let yaml = [
        svc(
            "aff",
            "{clusterIP: 10.96.0.60, sessionAffinity: ClientIP, ports: [{name: http, port: 80}]}",
        ),
        slice("aff", "http", 8080, &["10.244.1.2", "10.244.2.2"]),
    ]
    .join("\n---\n");
    let d = desired(&yaml);
    let plan = Planner::new().plan_text(&d, &ChangeSet::full(), &config(), None);
    assert!(
        plan.restore.contains("--rcheck --seconds 10800 --reap"),
        "{}",
        plan.restore
    );
    let rules = ruleset(&d, &config());
    check(
        &rules,
        Origin::Remote,
        "10.244.3.5",
        "10.96.0.60:80",
        "10.244.1.2:8080, 10.244.2.2:8080",
        Some(false),
    );
}

#[test]
fn equal_probability_ladder() {
    let eps = ["10.244.1.2", "10.244.1.3", "10.244.1.4", "10.244.1.5"];
    let yaml = [
        svc("four", "{clusterIP: 10.96.0.70, ports: [{name: http, port: 80}]}"),
        slice("four", "http", 8080, &eps),
    ]
    .join("\n---\n");
    let plan = Planner::new().plan_text(&desired(&yaml), &ChangeSet::full(), &config(), None);
    let probs: Vec<&str> = plan
        .restore
        .lines()
        .filter_map(|l| l.split("--probability ").nth(1))
        .map(|p| p.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(probs, ["0.2500000000", "0.3333333333", "0.5000000000"]);
}

#[test]
fn partial_sync_writes_only_the_changed_service() {
    let mut store = store(&basic());
    let mut planner = Planner::new();
    let first = store.snapshot();
    planner.plan_text(&first.desired, &first.changes, &config(), None);

    // One endpoint of `web` goes away.
    let slice_yaml = slice("web", "http", 8080, &["10.244.2.2"]);
    let s: EndpointSlice = serde_yaml::from_str(&slice_yaml).unwrap();
    assert!(store.apply_slice(&s));
    let snap = store.snapshot();
    assert_eq!(snap.changes.services, BTreeSet::from([ServiceKey::new("ns", "web")]));
    let plan = planner.plan_text(&snap.desired, &snap.changes, &config(), None);
    let declared: Vec<&str> = plan.restore.lines().filter(|l| l.starts_with(":KPROXY-S")).collect();
    let web = crate::model::ServicePortName {
        service: ServiceKey::new("ns", "web"),
        port: "http".into(),
        protocol: crate::model::Protocol::Tcp,
    };
    let np_chain = format!(
        ":{} - [0:0]",
        names::svc_chain(&crate::model::ServicePortName {
            service: ServiceKey::new("ns", "np"),
            ..web.clone()
        })
    );
    assert!(
        !declared.contains(&np_chain.as_str()),
        "untouched Service rewritten:\n{}",
        plan.restore
    );
    assert!(declared.contains(&format!(":{} - [0:0]", names::svc_chain(&web)).as_str()));
    // The dropped endpoint's chain is deleted, the dispatch chain still lists every Service.
    let deleted: Vec<&str> = plan.restore.lines().filter(|l| l.starts_with("-X ")).collect();
    assert_eq!(deleted.len(), 1, "{}", plan.restore);
    // The dispatch chains did not change, so they are not rewritten (nor flushed).
    assert!(!plan.restore.contains(":KPROXY-SERVICES"), "{}", plan.restore);
    assert!(
        !plan.restore.contains("*filter"),
        "nothing changed in filter:\n{}",
        plan.restore
    );

    // The resulting kernel state routes as a full render would.
    let mut kernel = Ruleset::parse(
        &Planner::new()
            .plan_text(&first.desired, &ChangeSet::full(), &config(), None)
            .restore,
    )
    .unwrap();
    kernel.restore(&plan.restore).unwrap();
    check(
        &kernel,
        Origin::Remote,
        "10.244.3.5",
        "10.96.0.10:80",
        "10.244.2.2:8080",
        Some(false),
    );
    check(
        &kernel,
        Origin::Remote,
        "10.244.3.5",
        "10.96.0.11:80",
        "10.244.1.2:8080, 10.244.2.2:8080",
        Some(false),
    );

    // Deleting a Service deletes all its chains.
    let web_svc: Service =
        serde_yaml::from_str(&svc("web", "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}")).unwrap();
    store.delete_service(&web_svc);
    let snap = store.snapshot();
    let plan = planner.plan_text(&snap.desired, &snap.changes, &config(), None);
    kernel.restore(&plan.restore).unwrap();
    assert!(
        plan.restore.contains(&format!("-X {}", names::svc_chain(&web))),
        "{}",
        plan.restore
    );
    check(
        &kernel,
        Origin::Remote,
        "10.244.3.5",
        "10.96.0.10:80",
        "ACCEPT",
        Some(false),
    );
}

#[test]
fn partial_sync_skips_the_chains_of_a_changed_service_that_did_not_change() {
    let mut store = store(&basic());
    let mut planner = Planner::new();
    let first = store.snapshot();
    let full = planner.plan_text(&first.desired, &first.changes, &config(), None);
    // `web` gets a third endpoint: its Service chain and the new endpoint's chain change, the
    // chains of the two endpoints it had do not.
    let s: EndpointSlice =
        serde_yaml::from_str(&slice("web", "http", 8080, &["10.244.1.2", "10.244.2.2", "10.244.3.2"])).unwrap();
    assert!(store.apply_slice(&s));
    let snap = store.snapshot();
    let plan = planner.plan_text(&snap.desired, &snap.changes, &config(), None);
    let nat = declared(&plan.restore, "nat");
    assert_eq!(nat.len(), 2, "{}", plan.restore);
    assert!(nat.iter().any(|c| c.starts_with("KPROXY-SVC-")), "{}", plan.restore);
    assert!(nat.iter().any(|c| c.starts_with("KPROXY-SEP-")), "{}", plan.restore);
    assert!(!plan.restore.contains("-X "), "{}", plan.restore);

    let mut kernel = Ruleset::parse(&full.restore).unwrap();
    kernel.restore(&plan.restore).unwrap();
    let all = "10.244.1.2:8080, 10.244.2.2:8080, 10.244.3.2:8080";
    check(&kernel, Origin::Remote, "10.244.3.5", "10.96.0.10:80", all, Some(false));
}

#[test]
fn a_plan_that_was_not_applied_is_forgotten() {
    let mut store = store(&basic());
    let mut planner = Planner::new();
    let first = store.snapshot();
    let full = planner.plan_text(&first.desired, &first.changes, &config(), None);
    planner.commit();
    let s: EndpointSlice = serde_yaml::from_str(&slice("web", "http", 8080, &["10.244.2.2"])).unwrap();
    assert!(store.apply_slice(&s));
    let snap = store.snapshot();
    let refused = planner.plan_text(&snap.desired, &snap.changes, &config(), None);
    planner.rollback();
    // The same change planned again is the same input, and now the fixed chains are
    // rewritten too: the filter table may hold what the kernel refused in nat.
    let again = planner.plan_text(&snap.desired, &snap.changes, &config(), None);
    for line in refused.restore.lines() {
        assert!(
            again.restore.lines().any(|l| l == line),
            "{line} missing:\n{}",
            again.restore
        );
    }
    assert!(
        declared(&again.restore, "filter").contains(&"KPROXY-FORWARD"),
        "{}",
        again.restore
    );
    assert!(
        declared(&again.restore, "nat").contains(&"KPROXY-SERVICES"),
        "{}",
        again.restore
    );
    let mut kernel = Ruleset::parse(&full.restore).unwrap();
    kernel.restore(&again.restore).unwrap();
    check(
        &kernel,
        Origin::Remote,
        "10.244.3.5",
        "10.96.0.10:80",
        "10.244.2.2:8080",
        Some(false),
    );

    // A full plan rolled back restores the previous map whole.
    let mut planner = Planner::new();
    planner.plan_text(&first.desired, &first.changes, &config(), None);
    planner.commit();
    planner.plan_text(&snap.desired, &ChangeSet::full(), &config(), None);
    planner.rollback();
    let again = planner.plan_text(&snap.desired, &snap.changes, &config(), None);
    assert_eq!(
        declared(&again.restore, "nat")
            .iter()
            .filter(|c| c.starts_with("KPROXY-S"))
            .count(),
        declared(&refused.restore, "nat")
            .iter()
            .filter(|c| c.starts_with("KPROXY-S"))
            .count()
            + 1,
        "the Service's chain as before, plus KPROXY-SERVICES:\n{}",
        again.restore
    );
}

#[test]
fn chains_are_declared_sorted_with_the_masquerade_chain_last() {
    let plan = Planner::new().plan_text(&desired(&basic()), &ChangeSet::full(), &config(), None);
    let nat = declared(&plan.restore, "nat");
    assert_eq!(nat.last(), Some(&names::MARK_MASQ));
    let rest = &nat[..nat.len() - 1];
    assert!(rest.windows(2).all(|w| w[0] < w[1]), "{nat:?}");
    // Every declaration comes before every rule.
    let nat_text: Vec<&str> = plan.restore.lines().skip_while(|l| *l != "*nat").collect();
    let first_rule = nat_text.iter().position(|l| l.starts_with('-')).unwrap();
    assert!(nat_text[first_rule..].iter().all(|l| !l.starts_with(':')));
}

#[test]
fn full_sync_deletes_stray_chains_found_in_the_kernel() {
    let d = desired(&basic());
    let kernel = KernelState {
        nat_chains: ["KPROXY-SVC-OLDOLDOLDOLDOLD1", "KPROXY-SERVICES", "KUBE-SERVICES"]
            .into_iter()
            .map(String::from)
            .collect(),
        jumps: BTreeSet::new(),
    };
    let plan = Planner::new().plan_text(&d, &ChangeSet::full(), &config(), Some(&kernel));
    assert!(plan.restore.contains("-X KPROXY-SVC-OLDOLDOLDOLDOLD1"));
    assert!(!plan.restore.contains("-X KPROXY-SERVICES"));
    assert!(
        !plan.restore.contains("KUBE-SERVICES"),
        "never touches other software's chains"
    );
}

#[test]
fn full_sync_puts_in_only_the_missing_jumps() {
    let d = desired(&basic());
    let fresh = Planner::new().plan_text(&d, &ChangeSet::full(), &config(), None);
    let jumps = |restore: &str| restore.lines().filter(|l| l.starts_with("-I ")).count();
    assert_eq!(jumps(&fresh.restore), names::JUMPS.len(), "{}", fresh.restore);
    let kernel = KernelState {
        nat_chains: BTreeSet::new(),
        jumps: (1..names::JUMPS.len()).collect(),
    };
    let plan = Planner::new().plan_text(&d, &ChangeSet::full(), &config(), Some(&kernel));
    let first = &names::JUMPS[0];
    let inserted: Vec<&str> = plan.restore.lines().filter(|l| l.starts_with("-I ")).collect();
    assert_eq!(inserted.len(), 1, "{}", plan.restore);
    assert!(
        inserted[0].starts_with(&format!("-I {} 1 ", first.from)),
        "{}",
        inserted[0]
    );
    assert!(inserted[0].ends_with(&format!("-j {}", first.to)), "{}", inserted[0]);

    // A partial sync never touches the built-in chains.
    let mut planner = Planner::new();
    planner.plan_text(&d, &ChangeSet::full(), &config(), None);
    let changes = ChangeSet {
        full: false,
        services: BTreeSet::from([ServiceKey::new("ns", "web")]),
    };
    let plan = planner.plan_text(&d, &changes, &config(), None);
    assert_eq!(jumps(&plan.restore), 0, "{}", plan.restore);
}

#[test]
fn invalid_service_is_skipped_and_the_rest_still_route() {
    let yaml = [
        basic(),
        svc("bad", "{clusterIP: 10.96.0.999, ports: [{name: http, port: 80}]}"),
        svc("badport", "{clusterIP: 10.96.0.13, ports: [{name: x, port: 0}]}"),
    ]
    .join("\n---\n");
    let rules = ruleset(&desired(&yaml), &config());
    check_web_from_pod(&rules);
}

#[test]
fn udp_and_ipv6_render() {
    let yaml = [
        svc("dns", "{clusterIP: 10.96.0.53, ports: [{name: dns, port: 53, protocol: UDP}]}"),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: dns-x, namespace: ns, labels: {kubernetes.io/service-name: dns}}\naddressType: IPv4\nports: [{name: dns, port: 5353, protocol: UDP}]\nendpoints: [{addresses: [10.244.1.2]}]".to_string(),
        svc("v6", "{clusterIP: 'fd00::10', ports: [{name: http, port: 80}]}"),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: v6-x, namespace: ns, labels: {kubernetes.io/service-name: v6}}\naddressType: IPv6\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints: [{addresses: ['fd00:244::2']}]".to_string(),
    ]
    .join("\n---\n");
    let d = desired(&yaml);
    let rules = ruleset(&d, &config());
    let r = trace(&rules, Origin::Remote, "10.244.3.5", "10.96.0.53:53", true);
    assert_eq!(r.to_string(), "10.244.1.2:5353", "{}", r.explain());

    let v6 = RenderConfig {
        family: IpFamily::V6,
        local_detector: LocalDetector::Cidr("fd00:244::/64".parse().unwrap()),
        ..config()
    };
    let plan = Planner::new().plan_text(&d, &ChangeSet::full(), &v6, None);
    assert!(
        plan.restore.contains("--to-destination [fd00:244::2]:8080"),
        "{}",
        plan.restore
    );
    assert!(
        !plan.restore.contains("10.96.0.53"),
        "IPv4 Services stay out of ip6tables"
    );
    let rules = Ruleset::parse(&plan.restore).unwrap();
    let r = rules
        .tracer(["fd00::1".parse().unwrap()])
        .trace(&Packet::tcp(Origin::Remote, "fd00:244::9", "[fd00::10]:80"))
        .unwrap();
    assert_eq!(r.to_string(), "[fd00:244::2]:8080", "{}", r.explain());
}

#[test]
fn golden_render() {
    let plan = Planner::new().plan_text(&desired(&basic()), &ChangeSet::full(), &config(), None);
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/dataplane/iptables/testdata/basic.golden"
    );
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &plan.restore).unwrap();
    }
    let golden = std::fs::read_to_string(path).expect("golden file (UPDATE_GOLDEN=1 writes it)");
    for (i, (got, want)) in plan.restore.lines().zip(golden.lines()).enumerate() {
        assert_eq!(got, want, "golden line {} differs", i + 1);
    }
    assert_eq!(
        plan.restore.lines().count(),
        golden.lines().count(),
        "golden length differs"
    );
}

#[test]
fn detect_local_by_interface() {
    for (detector, iface) in [
        (LocalDetector::Bridge("cbr0".into()), "cbr0"),
        (LocalDetector::InterfacePrefix("veth".into()), "veth1234"),
    ] {
        let cfg = RenderConfig {
            local_detector: detector,
            ..config()
        };
        let rules = ruleset(&desired(&basic()), &cfg);
        let from_pod = Packet::tcp(Origin::Remote, "10.244.3.5", "10.96.0.10:80").with_in_iface(iface);
        let r = rules.tracer([NODE_IP.parse().unwrap()]).trace(&from_pod).unwrap();
        assert_eq!(r.masquerade(), Some(false), "{}", r.explain());
        let from_outside = Packet::tcp(Origin::Remote, "203.0.113.9", "10.96.0.10:80").with_in_iface("eth0");
        let r = rules.tracer([NODE_IP.parse().unwrap()]).trace(&from_outside).unwrap();
        assert_eq!(r.masquerade(), Some(true), "{}", r.explain());
    }
}

#[test]
fn a_full_plan_of_many_services_rendered_on_several_threads_routes_each_and_records_each() {
    // Above 1000 Services the full plan renders on several threads; the record it builds
    // must still be the one a partial plan compares against.
    let n = 1200;
    let docs: Vec<String> = (0..n)
        .flat_map(|i| {
            let name = format!("svc-{i}");
            let spec = format!(
                "{{clusterIP: 10.96.{}.{}, ports: [{{name: http, port: 80}}]}}",
                i / 250,
                i % 250 + 1
            );
            let eps = [
                format!("10.244.{}.{}", i / 250, i % 250 + 1),
                format!("10.245.{}.{}", i / 250, i % 250 + 1),
            ];
            [svc(&name, &spec), slice(&name, "http", 8080, &[&eps[0], &eps[1]])]
        })
        .collect();
    let mut store = store(&docs.join("\n---\n"));
    let first = store.snapshot();
    let mut planner = Planner::new();
    let full = planner.plan_text(&first.desired, &first.changes, &config(), None);
    planner.commit();
    // Four fixed rules, the jump to KPROXY-NODEPORTS; per Service its dispatch rule, its
    // chain (masquerade and two endpoints) and two endpoint chains of two rules.
    assert_eq!(full.plan.nat_rules, 5 + n * (1 + 3 + 2 * 2), "{:?}", full.plan);
    let rules = Ruleset::parse(&full.restore).unwrap();
    for i in [0, n / 2, n - 1] {
        let want = format!("10.244.{0}.{1}:8080, 10.245.{0}.{1}:8080", i / 250, i % 250 + 1);
        let dst = format!("10.96.{}.{}:80", i / 250, i % 250 + 1);
        check(&rules, Origin::Remote, "10.244.200.5", &dst, &want, Some(false));
    }
    // One endpoint of the last Service changes: only its Service chain and the new endpoint's
    // chain are written, and the old endpoint's is declared (flushed) and deleted.
    let last = format!("svc-{}", n - 1);
    let s: EndpointSlice = serde_yaml::from_str(&slice(&last, "http", 8080, &["10.244.4.200", "10.246.0.1"])).unwrap();
    assert!(store.apply_slice(&s));
    let snap = store.snapshot();
    let plan = planner.plan_text(&snap.desired, &snap.changes, &config(), None);
    assert_eq!(declared(&plan.restore, "nat").len(), 3, "{}", plan.restore);
    assert_eq!(
        plan.restore.lines().filter(|l| l.starts_with("-X ")).count(),
        1,
        "{}",
        plan.restore
    );
    assert!(!plan.restore.contains("*filter"), "{}", plan.restore);
}

#[test]
fn partial_plans_count_the_rules_a_full_plan_counts() {
    // A partial plan keeps running sums instead of walking every Service: after any series
    // of changes (and a refused one rolled back) they must agree with a fresh full plan.
    let mut store = store(&basic());
    let mut planner = Planner::new();
    let first = store.snapshot();
    planner.plan_text(&first.desired, &first.changes, &config(), None);
    planner.commit();
    let counts = |p: &Plan| (p.filter_rules, p.nat_rules, p.no_local_endpoints);
    let steps = [
        slice("empty", "http", 8080, &["10.244.2.2"]),
        slice("web", "http", 8080, &["10.244.2.2"]),
        slice("web", "http", 8080, &[]),
        slice("web", "http", 8080, &["10.244.1.2", "10.244.2.2", "10.244.3.2"]),
    ];
    for (i, yaml) in steps.iter().enumerate() {
        let s: EndpointSlice = serde_yaml::from_str(yaml).unwrap();
        assert!(store.apply_slice(&s));
        let snap = store.snapshot();
        if i == 1 {
            planner.plan_text(&snap.desired, &snap.changes, &config(), None);
            planner.rollback();
        }
        let partial = planner.plan_text(&snap.desired, &snap.changes, &config(), None);
        planner.commit();
        let full = Planner::new().plan_text(&snap.desired, &ChangeSet::full(), &config(), None);
        assert_eq!(counts(&partial.plan), counts(&full.plan), "after step {i}");
    }
    let web_svc: Service =
        serde_yaml::from_str(&svc("web", "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}")).unwrap();
    store.delete_service(&web_svc);
    let snap = store.snapshot();
    let partial = planner.plan_text(&snap.desired, &snap.changes, &config(), None);
    let full = Planner::new().plan_text(&snap.desired, &ChangeSet::full(), &config(), None);
    assert_eq!(counts(&partial.plan), counts(&full.plan), "after the delete");
}

#[test]
fn partial_sync_rewrites_dispatch_chains_when_they_change() {
    let mut store = store(&basic());
    let mut planner = Planner::new();
    let first = store.snapshot();
    let full = planner.plan_text(&first.desired, &first.changes, &config(), None);
    // `empty` gets its first endpoint: its reject rule goes, its cluster IP is now dispatched.
    let s: EndpointSlice = serde_yaml::from_str(&slice("empty", "http", 8080, &["10.244.2.2"])).unwrap();
    assert!(store.apply_slice(&s));
    let snap = store.snapshot();
    let plan = planner.plan_text(&snap.desired, &snap.changes, &config(), None);
    assert!(
        declared(&plan.restore, "filter").contains(&"KPROXY-SERVICES"),
        "{}",
        plan.restore
    );
    assert!(
        declared(&plan.restore, "nat").contains(&"KPROXY-SERVICES"),
        "{}",
        plan.restore
    );
    assert!(
        !plan.restore.contains(":KPROXY-FORWARD"),
        "unchanged chains stay out:\n{}",
        plan.restore
    );

    let mut kernel = Ruleset::parse(&full.restore).unwrap();
    kernel.restore(&plan.restore).unwrap();
    check(
        &kernel,
        Origin::Remote,
        "10.244.3.5",
        "10.96.0.12:80",
        "10.244.2.2:8080",
        Some(false),
    );
    check_web_from_pod(&kernel);
}

#[test]
fn large_clusters_drop_per_endpoint_comments() {
    let cfg = RenderConfig {
        endpoint_comments: false,
        localhost_nodeports: false,
        nfacct: false,
        conntrack_tcp_liberal: false,
        ..config()
    };
    let plan = Planner::new().plan_text(&desired(&basic()), &ChangeSet::full(), &cfg, None);
    assert!(!plan.restore.contains("-> 10.244."), "{}", plan.restore);
    assert!(
        plan.restore.contains("\"ns/web:http cluster IP\""),
        "service comments stay"
    );
    let rules = ruleset(&desired(&basic()), &cfg);
    check_web_from_pod(&rules);
}

#[test]
fn nodeport_addresses_limit_where_node_ports_answer() {
    let cfg = RenderConfig {
        nodeports: NodePortMatch::Addresses(vec![NODE_IP.parse().unwrap()]),
        ..config()
    };
    let rules = ruleset(&desired(&basic()), &cfg);
    let tracer = rules.tracer([NODE_IP.parse().unwrap(), "10.244.1.1".parse().unwrap()]);
    let on_node_ip = tracer
        .trace(&Packet::tcp(Origin::Remote, "203.0.113.9", &format!("{NODE_IP}:30080")))
        .unwrap();
    assert_eq!(
        on_node_ip.to_string(),
        "10.244.1.2:8080, 10.244.2.2:8080",
        "{}",
        on_node_ip.explain()
    );
    // Another local address outside --nodeport-addresses: not a NodePort.
    let other = tracer
        .trace(&Packet::tcp(Origin::Remote, "10.244.3.5", "10.244.1.1:30080"))
        .unwrap();
    assert_eq!(other.to_string(), "ACCEPT", "{}", other.explain());
}

/// The dataplane against the real tools and kernel, in a network namespace of its own, with
/// each iptables backend this host has: the streamed input, a refusal in the middle of it, and
/// partial syncs that leave the kernel as a full sync would. Skipped without the privileges
/// for a namespace.
mod kernel {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::DetectLocal;
    use crate::dataplane::iptables::apply::{parse_chains, parse_jumps, Tools, CHUNK};
    use crate::dataplane::iptables::{render_config, IptablesProxier, NodePortAddresses, ProxierConfig};
    use crate::dataplane::{Dataplane, DataplaneError};

    /// Runs `f` on a thread in a new network namespace (the tools it starts share it), with a
    /// runtime of its own. `None` without the privileges for that.
    fn in_netns<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            Some(rt.block_on(f))
        })
        .join()
        .expect("netns thread")
    }

    /// The backends whose tools are installed: `legacy`, `nft`.
    fn backends() -> Vec<&'static str> {
        ["legacy", "nft"]
            .into_iter()
            .filter(|b| {
                std::process::Command::new(format!("iptables-{b}-restore"))
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .collect()
    }

    /// A directory removed when dropped.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(what: &str) -> TempDir {
            let path = std::env::temp_dir().join(format!("kproxy-ipt-{what}-{}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    /// The backend's tools, with iptables-restore replaced by `restore` if given.
    fn tools(backend: &str, restore: Option<&'static str>) -> Tools {
        Tools::new(
            leak(format!("iptables-{backend}")),
            restore.unwrap_or_else(|| leak(format!("iptables-{backend}-restore"))),
            leak(format!("iptables-{backend}-save")),
        )
    }

    /// A shell script in `dir` standing in for iptables-restore.
    fn wrapper(dir: &std::path::Path, body: &str) -> &'static str {
        let path = dir.join("iptables-restore");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::process::Command::new("chmod")
            .arg("+x")
            .arg(&path)
            .status()
            .unwrap();
        leak(path.display().to_string())
    }

    fn proxier_config() -> ProxierConfig {
        ProxierConfig {
            family: IpFamily::V4,
            masquerade_all: false,
            masquerade_bit: 14,
            detect_local: DetectLocal::ClusterCidr(vec!["10.244.0.0/16".parse().unwrap()]),
            nodeport_addresses: NodePortAddresses::All,
            localhost_nodeports: false,
            nfacct: false,
            conntrack_tcp_liberal: false,
        }
    }

    /// Both tables as iptables-save shows them, by (table, chain): the chain's policy line and
    /// its rules in order. (iptables-nft lists chains in the order they were made, which a
    /// partial sync changes.)
    fn tables(backend: &str) -> BTreeMap<(String, String), Vec<String>> {
        let mut tables = BTreeMap::new();
        let mut table = String::new();
        for line in save(backend).lines() {
            if let Some(t) = line.strip_prefix('*') {
                table = t.to_string();
            } else if let Some(decl) = line.strip_prefix(':') {
                let chain = decl.split(' ').next().unwrap().to_string();
                tables
                    .entry((table.clone(), chain))
                    .or_insert_with(Vec::new)
                    .insert(0, line.to_string());
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split(' ').next().unwrap().to_string();
                tables
                    .entry((table.clone(), chain))
                    .or_insert_with(Vec::new)
                    .push(line.to_string());
            }
        }
        tables
    }

    /// `iptables-save` of both tables, without its timestamped comments.
    fn save(backend: &str) -> String {
        ["filter", "nat"]
            .iter()
            .map(|table| {
                let out = std::process::Command::new(format!("iptables-{backend}-save"))
                    .args(["-t", table])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                String::from_utf8(out.stdout)
                    .unwrap()
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(|l| format!("{l}\n"))
                    .collect::<String>()
            })
            .collect()
    }

    /// `n` Services of 10 endpoints each; `shift` moves every endpoint to another address.
    fn many(n: usize, shift: usize) -> Store {
        let docs: Vec<String> = (0..n)
            .flat_map(|i| {
                let eps: Vec<String> = (0..10)
                    .map(|e| format!("10.244.{}.{}", (i * 10 + e) / 250, (i * 10 + e) % 250 + 1 + shift))
                    .collect();
                let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
                let name = format!("svc-{i}");
                [
                    svc(
                        &name,
                        &format!(
                            "{{clusterIP: 10.96.{}.{}, ports: [{{name: http, port: 80}}]}}",
                            i / 250,
                            i % 250 + 1
                        ),
                    ),
                    slice(&name, "http", 8080, &eps),
                ]
            })
            .collect();
        store(&docs.join("\n---\n"))
    }

    fn nat_chains(save: &str) -> BTreeSet<String> {
        let nat = save.split("*nat").nth(1).unwrap_or_default();
        parse_chains(nat)
    }

    #[test]
    fn a_restore_refused_in_the_middle_keeps_the_kernel_rules_and_the_retry_writes_them() {
        for backend in backends() {
            let done = in_netns(async move {
                let dir = TempDir::new("refused");
                let marker = dir.path().join("fail");
                let real = format!("iptables-{backend}-restore");
                // On the marker, line 2000 becomes a rule neither backend can parse (an unknown
                // match): the tool stops reading there, long before the end of the input.
                const LINE: usize = 2000;
                let restore = wrapper(
                    dir.path(),
                    &format!(
                        "if [ -e {m} ]; then sed '{LINE}s/.*/-A KPROXY-SERVICES -m kproxy-no-such-match -j ACCEPT/' | {real} \"$@\"; else exec {real} \"$@\"; fi",
                        m = marker.display()
                    ),
                );
                let mut proxier = IptablesProxier::with_tools(proxier_config(), tools(backend, Some(restore)));
                let d1 = many(100, 0).snapshot().desired;
                proxier.sync(&d1, &ChangeSet::full()).await.unwrap();
                let before = save(backend);
                let before_tables = tables(backend);

                let d2 = many(100, 1).snapshot().desired;
                // What the refused sync writes: a full plan over the kernel as it is.
                let cfg = render_config(&proxier_config(), &d2).await.unwrap();
                let mut expected = Planner::new();
                expected.plan(&d2, &ChangeSet::full(), &cfg);
                let nat = before.split("*nat").nth(1).unwrap();
                expected.adopt_kernel(&KernelState {
                    nat_chains: parse_chains(nat),
                    jumps: parse_jumps("filter", &before)
                        .into_iter()
                        .chain(parse_jumps("nat", nat))
                        .collect(),
                });
                let input = expected.restore_input(&d2).into_string();
                assert!(input.len() > 4 * CHUNK, "the input spans many chunks: {}", input.len());
                let line = input.lines().nth(LINE - 1).unwrap().to_string();

                std::fs::write(&marker, "").unwrap();
                let err = proxier.sync(&d2, &ChangeSet::full()).await.unwrap_err();
                match &err {
                    DataplaneError::Rejected {
                        line: n, text, message, ..
                    } => {
                        assert_eq!(*n, LINE, "{err}");
                        assert_eq!(text, &line, "{err}");
                        let owner = expected.restore_input(&d2).line(LINE).unwrap().1.unwrap();
                        assert!(message.contains(&format!("Service {owner}")), "{err}");
                    }
                    other => panic!("{backend}: not a rejection: {other}"),
                }
                assert!(
                    tables(backend) == before_tables,
                    "{backend}: the refused sync changed the kernel"
                );

                // The runner retries with a full sync: it writes the new state and deletes the
                // chains of the endpoints that went.
                std::fs::remove_file(&marker).unwrap();
                let stats = proxier.sync(&d2, &ChangeSet::full()).await.unwrap();
                let after = save(backend);
                let wanted: BTreeSet<String> = declared(&input, "nat")
                    .into_iter()
                    .filter(|c| !input.contains(&format!("-X {c}\n")))
                    .map(str::to_string)
                    .collect();
                assert_eq!(nat_chains(&after), wanted, "{backend}");
                let nat_rules = after
                    .split("*nat")
                    .nth(1)
                    .unwrap()
                    .lines()
                    .filter(|l| l.starts_with("-A KPROXY-"))
                    .count();
                assert_eq!(stats.rules_total[1], ("nat", nat_rules), "{backend}");
            });
            if done.is_none() {
                eprintln!("skipped: no network namespace");
                return;
            }
        }
    }

    #[test]
    fn a_partial_sync_writes_only_the_changed_chains_and_leaves_the_kernel_as_a_full_sync_would() {
        for backend in backends() {
            let done = in_netns(async move {
                let dir = TempDir::new("partial");
                let written = dir.path().join("input");
                let restore = wrapper(
                    dir.path(),
                    &format!("tee {} | iptables-{backend}-restore \"$@\"", written.display()),
                );
                let mut proxier = IptablesProxier::with_tools(proxier_config(), tools(backend, Some(restore)));
                let mut store = many(100, 0);
                let first = store.snapshot();
                proxier.sync(&first.desired, &first.changes).await.unwrap();

                // One endpoint of svc-7 moves: 10.244.0.71 goes, 10.244.9.99 comes.
                let moved = [
                    "10.244.0.72",
                    "10.244.0.73",
                    "10.244.0.74",
                    "10.244.0.75",
                    "10.244.0.76",
                    "10.244.0.77",
                    "10.244.0.78",
                    "10.244.0.79",
                    "10.244.0.80",
                    "10.244.9.99",
                ];
                let changed = slice("svc-7", "http", 8080, &moved);
                assert!(store.apply_slice(&serde_yaml::from_str(&changed).unwrap()));
                let snap = store.snapshot();
                assert!(!snap.changes.full);
                assert_eq!(snap.changes.services, BTreeSet::from([ServiceKey::new("ns", "svc-7")]));
                proxier.sync(&snap.desired, &snap.changes).await.unwrap();
                let input = std::fs::read_to_string(&written).unwrap();

                // Which chains changed, from full plans of the states before and after (1,000
                // endpoints both: the same configuration).
                let cfg = render_config(&proxier_config(), &snap.desired).await.unwrap();
                let full_chains = |d: &DesiredState| -> BTreeSet<String> {
                    let text = Planner::new().plan_text(d, &ChangeSet::full(), &cfg, None).restore;
                    declared(&text, "nat").into_iter().map(str::to_string).collect()
                };
                let (old, new) = (full_chains(&first.desired), full_chains(&snap.desired));
                let gone: Vec<&String> = old.difference(&new).collect();
                let came: Vec<&String> = new.difference(&old).collect();
                assert_eq!((gone.len(), came.len()), (1, 1), "one endpoint chain each");
                let port = crate::model::ServicePortName {
                    service: ServiceKey::new("ns", "svc-7"),
                    port: "http".into(),
                    protocol: crate::model::Protocol::Tcp,
                };
                let mut want = vec![names::svc_chain(&port), gone[0].clone(), came[0].clone()];
                want.sort();
                assert_eq!(declared(&input, "nat"), want, "{backend}: partial input:\n{input}");
                assert!(!input.contains("*filter"), "{backend}: partial input:\n{input}");
                assert_eq!(
                    input.lines().filter(|l| l.starts_with("-X ")).collect::<Vec<_>>(),
                    [format!("-X {}", gone[0])],
                    "{backend}"
                );
                let partial = tables(backend);

                // A full sync of the same state onto an empty kernel gives the same tables.
                let desired = snap.desired.clone();
                let full = in_netns(async move {
                    let mut fresh = IptablesProxier::with_tools(proxier_config(), tools(backend, None));
                    fresh.sync(&desired, &ChangeSet::full()).await.unwrap();
                    tables(backend)
                })
                .unwrap();
                assert!(
                    partial == full,
                    "{backend}: the partial sync left other tables than a full one:\n{partial:#?}\n{full:#?}"
                );
            });
            if done.is_none() {
                eprintln!("skipped: no network namespace");
                return;
            }
        }
    }

    /// Runs the backend's iptables with `args`; whether it succeeded.
    fn iptables(backend: &str, args: &[&str]) -> bool {
        std::process::Command::new(format!("iptables-{backend}"))
            .args(args)
            .output()
            .unwrap()
            .status
            .success()
    }

    /// Whether the canary chain is in the backend's mangle table.
    fn canary(backend: &str) -> bool {
        iptables(backend, &["-t", "mangle", "-n", "-L", "KPROXY-CANARY"])
    }

    #[test]
    fn a_full_sync_plants_the_canary_its_loss_is_drift_and_cleanup_removes_it() {
        for backend in backends() {
            let done = in_netns(async move {
                let mut proxier = IptablesProxier::with_tools(proxier_config(), tools(backend, None));
                assert_eq!(
                    proxier.full_sync_period(),
                    Some(crate::dataplane::iptables::FULL_SYNC_PERIOD)
                );
                assert!(!canary(backend), "{backend}: a fresh namespace has no canary");
                let d = many(3, 0).snapshot().desired;
                proxier.sync(&d, &ChangeSet::full()).await.unwrap();
                assert!(canary(backend), "{backend}: no canary after a full sync");
                assert!(!proxier.drifted().await, "{backend}: drift with the canary there");

                // A partial sync does not put it back: only a full one, which the drift asks for.
                assert!(iptables(backend, &["-t", "mangle", "-X", "KPROXY-CANARY"]));
                assert!(proxier.drifted().await, "{backend}: the canary's loss is not drift");
                proxier.sync(&d, &ChangeSet::default()).await.unwrap();
                assert!(!canary(backend), "{backend}: a partial sync planted the canary");
                proxier.sync(&d, &ChangeSet::full()).await.unwrap();
                assert!(canary(backend), "{backend}: the full sync after drift left no canary");
                assert!(!proxier.drifted().await, "{backend}: drift after the repair");

                // A flushed KPROXY-SERVICES, canary or not, is drift too.
                assert!(iptables(backend, &["-t", "nat", "-F", "KPROXY-SERVICES"]));
                assert!(
                    proxier.drifted().await,
                    "{backend}: a flushed KPROXY-SERVICES is not drift"
                );
                proxier.sync(&d, &ChangeSet::full()).await.unwrap();
                assert!(!proxier.drifted().await, "{backend}: drift after the repair");

                proxier.cleanup().await.unwrap();
                assert!(!canary(backend), "{backend}: cleanup left the canary");
                let left = save(backend);
                assert!(!left.contains("KPROXY-"), "{backend}: cleanup left rules:\n{left}");
                // Idempotent: nothing left, nothing to fail on.
                proxier.cleanup().await.unwrap();
            });
            if done.is_none() {
                eprintln!("skipped: no network namespace");
                return;
            }
        }
    }
}
