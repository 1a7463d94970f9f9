//! The scenarios, written once and run for every proxy mode and both desired-state sources.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::fakeapi::FakeApiServer;
use crate::harness::{backends, curl, eventually, eventually_backends, kproxy_bin, udp, Kproxy};
use crate::netns::Topology;
use crate::semantics;

/// Proxy modes the scenarios know.
pub const MODES: &[&str] = &["iptables", "nftables", "ipvs"];

/// The modes to run: `KPROXY_TEST_MODES` (comma-separated), by default iptables and nftables,
/// because IPVS needs a kernel that has it (`scripts/ipvs-vm.sh` runs the ipvs ones in a guest
/// that does).
pub fn modes() -> Vec<&'static str> {
    let wanted = std::env::var("KPROXY_TEST_MODES").unwrap_or_else(|_| "iptables,nftables".into());
    let modes: Vec<&'static str> = MODES
        .iter()
        .copied()
        .filter(|m| wanted.split(',').any(|w| w.trim() == *m))
        .collect();
    assert!(
        !modes.is_empty(),
        "KPROXY_TEST_MODES={wanted:?} names none of {MODES:?}"
    );
    modes
}

/// Where kproxy reads desired state from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Manifests,
    Api,
}

impl SourceKind {
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Manifests => "manifests",
            SourceKind::Api => "api",
        }
    }
}

pub type Scenario = fn(&'static str, SourceKind);

pub const ALL: &[(&str, Scenario)] = &[
    (
        "cluster_ip_from_node_and_pod_reaches_both_backends",
        cluster_ip_from_node_and_pod,
    ),
    ("node_port_from_outside_is_masqueraded", node_port_from_outside),
    ("pod_to_cluster_ip_keeps_source_and_hairpin_is_masqueraded", pod_sources),
    ("udp_cluster_ip", udp_cluster_ip),
    ("no_endpoints_is_refused_not_timed_out", no_endpoints_refused),
    ("endpoint_changes_are_followed", endpoint_changes),
    ("bad_objects_are_skipped_and_others_keep_working", bad_objects),
    ("cleanup_removes_only_kproxy_rules", cleanup),
    ("healthz_and_metrics", healthz_and_metrics),
    ("localhost_nodeports_as_kube_proxy", localhost_nodeports),
    ("watch_survives_dropped_streams_and_410_gone", watch_resilience),
    (
        "session_affinity_keeps_a_client_on_one_backend",
        semantics::session_affinity,
    ),
    (
        "external_traffic_policy_local_keeps_source_and_health_check",
        semantics::external_local,
    ),
    ("internal_traffic_policy_local", semantics::internal_local),
    ("terminating_endpoints_only_without_ready_ones", semantics::terminating),
    ("topology_hints_keep_traffic_in_zone", semantics::topology_hints),
    ("ipv6_cluster_ip", semantics::ipv6),
    (
        "load_balancer_ip_source_ranges_and_external_ips",
        semantics::load_balancer,
    ),
    (
        "udp_client_recovers_when_its_endpoint_is_replaced",
        semantics::udp_stale_conntrack,
    ),
    ("full_resync_repairs_changes_behind_its_back", resync_repairs),
];

/// Scenarios that only mean something for the API source.
pub const API_ONLY: &[(&str, Scenario)] = &[("master_flag_overrides_the_kubeconfig_server", master_override)];

/// Scenarios about iptables mode itself.
pub const IPTABLES_ONLY: &[(&str, Scenario)] = &[
    (
        "rejected_restore_keeps_the_kernel_rules_and_is_retried",
        restore_failure,
    ),
    (
        "switching_to_nftables_and_back_removes_the_previous_modes_rules",
        mode_switch,
    ),
];

/// Scenarios about nftables mode itself.
pub const NFTABLES_ONLY: &[(&str, Scenario)] = &[
    (
        "rejected_transaction_keeps_the_kernel_rules_and_is_retried",
        nft_failure,
    ),
    (
        "a_change_behind_its_back_is_noticed_by_generation_and_repaired",
        foreign_change,
    ),
    (
        "nft_1_0_6_and_1_1_3_list_what_netlink_wrote_and_render_means_the_same",
        nft_listings,
    ),
    (
        "another_writers_own_tables_start_no_check_a_write_into_kproxys_does",
        others_tables,
    ),
    ("a_flushed_ruleset_is_written_again", flushed_ruleset),
];

const CLUSTER_IP: &str = "10.96.0.10";
const PORT: u16 = 8080;

pub fn node_yaml() -> String {
    "apiVersion: v1\nkind: Node\nmetadata: {name: node-1, labels: {topology.kubernetes.io/zone: zone-a}}\nstatus: {addresses: [{type: InternalIP, address: 192.0.2.1}]}".into()
}

pub fn service(name: &str, spec: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}")
}

/// One endpoint of a test EndpointSlice: pod `i`'s address, on node-1 and ready unless told.
#[derive(Debug, Clone)]
pub struct Ep {
    ip: String,
    node: &'static str,
    ready: bool,
    serving: bool,
    terminating: bool,
    zone_hint: Option<&'static str>,
}

/// Pod `i` (0-based) as a ready endpoint on node-1.
pub fn ep(i: usize) -> Ep {
    Ep {
        ip: format!("10.244.{}.2", i + 1),
        node: "node-1",
        ready: true,
        serving: true,
        terminating: false,
        zone_hint: None,
    }
}

impl Ep {
    /// The pod's IPv6 address instead.
    pub fn v6(mut self) -> Ep {
        let i = self.ip.split('.').nth(2).unwrap_or("1").to_string();
        self.ip = format!("fd00:244:{i}::2");
        self
    }
    pub fn on(mut self, node: &'static str) -> Ep {
        self.node = node;
        self
    }
    /// Terminating but still serving (a pod in its grace period).
    pub fn terminating(mut self) -> Ep {
        (self.ready, self.serving, self.terminating) = (false, true, true);
        self
    }
    /// Not ready and not serving.
    pub fn down(mut self) -> Ep {
        (self.ready, self.serving) = (false, false);
        self
    }
    pub fn hint(mut self, zone: &'static str) -> Ep {
        self.zone_hint = Some(zone);
        self
    }
    fn yaml(&self) -> String {
        let hints = self
            .zone_hint
            .map(|z| format!(", hints: {{forZones: [{{name: {z}}}]}}"))
            .unwrap_or_default();
        format!(
            "{{addresses: ['{}'], nodeName: {}, conditions: {{ready: {}, serving: {}, terminating: {}}}{hints}}}",
            self.ip, self.node, self.ready, self.serving, self.terminating
        )
    }
}

/// An EndpointSlice for `service` with `eps` on port 8080 (TCP `http` and UDP `dns`).
pub fn slice_of(service: &str, eps: &[Ep]) -> String {
    let (family, suffix) = if eps.iter().any(|e| e.ip.contains(':')) {
        ("IPv6", "v6abc")
    } else {
        ("IPv4", "v4abc")
    };
    let eps: Vec<String> = eps.iter().map(Ep::yaml).collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-{suffix}, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: {family}\nports: [{{name: http, port: {PORT}, protocol: TCP}}, {{name: dns, port: {PORT}, protocol: UDP}}]\nendpoints: [{}]",
        eps.join(", ")
    )
}

/// An EndpointSlice for `service` with ready endpoints at `ips` on node-1.
fn slice(service: &str, ips: &[String]) -> String {
    let eps: Vec<Ep> = ips
        .iter()
        .map(|ip| Ep {
            ip: ip.clone(),
            ..ep(0)
        })
        .collect();
    slice_of(service, &eps)
}

/// The standard set of objects: `web` (ClusterIP and NodePort 30080, TCP and UDP) backed by
/// `backends`, and `empty` with no endpoints.
fn objects(backends: &[String]) -> Vec<String> {
    vec![
        node_yaml(),
        service(
            "web",
            &format!("{{type: NodePort, clusterIP: {CLUSTER_IP}, selector: {{app: web}}, ports: [{{name: http, port: 80, nodePort: 30080, protocol: TCP}}, {{name: dns, port: 53, protocol: UDP}}]}}"),
        ),
        slice("web", backends),
        service("empty", "{clusterIP: 10.96.0.12, ports: [{name: http, port: 80}]}"),
    ]
}

/// Where the test writes desired state.
enum Source {
    Manifests(PathBuf),
    Api {
        server: FakeApiServer,
        current: BTreeMap<String, serde_json::Value>,
        _runtime: tokio::runtime::Runtime,
    },
}

/// One scenario's world: a topology, a source, and kproxy running on it.
pub struct Env {
    pub topo: Topology,
    source: Source,
    pub kproxy: Kproxy,
    args: Vec<String>,
}

fn object_key(v: &serde_json::Value) -> String {
    let s = |p: &str| v.pointer(p).and_then(|x| x.as_str()).unwrap_or_default().to_string();
    format!(
        "{}|{}|{}|{}",
        s("/apiVersion"),
        s("/kind"),
        s("/metadata/namespace"),
        s("/metadata/name")
    )
}

/// A kubeconfig for a plain-HTTP API server, without credentials.
fn kubeconfig_yaml(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: '{server}'}}\nusers:\n- name: kproxy\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: kproxy}}\ncurrent-context: fake\n"
    )
}

/// A listener on 127.0.0.1 inside `ns`, so kproxy (in that namespace) reaches the fake API
/// server that runs in this process.
fn listener_in(ns: &str) -> std::net::TcpListener {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind in netns");
        l.set_nonblocking(true).expect("nonblocking");
        l
    })
    .join()
    .expect("listener thread")
}

/// A PATH with every program of this one except `nft`: kproxy runs without it in every mode
/// but IPVS (whose companion table is still written by nft), which proves that nftables mode,
/// its cleanup and the mode-switch cleanup of the other modes never start nft.
pub fn path_without_nft() -> &'static str {
    static DIR: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kproxy-no-nft-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("no-nft dir");
        let path = std::env::var("PATH").unwrap_or_default();
        for d in path.split(':').filter(|d| !d.is_empty()) {
            for entry in std::fs::read_dir(d).into_iter().flatten().flatten() {
                let name = entry.file_name();
                if name == "nft" || dir.join(&name).exists() {
                    continue;
                }
                let _ = std::os::unix::fs::symlink(entry.path(), dir.join(&name));
            }
        }
        dir.display().to_string()
    })
}

/// kproxy's PATH for `mode`: `tools` first, then everything but nft (see [`path_without_nft`]).
fn kproxy_path(mode: &str, tools: Option<&std::path::Path>) -> String {
    let base = if mode == "ipvs" {
        std::env::var("PATH").unwrap_or_default()
    } else {
        path_without_nft().to_string()
    };
    match tools {
        Some(t) => format!("{}:{base}", t.display()),
        None => base,
    }
}

impl Env {
    pub fn new(mode: &str, kind: SourceKind, docs: &[String], extra: &[&str]) -> Env {
        Env::with_tools(mode, kind, docs, extra, None, &[])
    }

    /// Like [`Env::new`], with `tools` searched first for the programs kproxy runs and `env`
    /// in kproxy's environment.
    pub fn with_tools(
        mode: &str,
        kind: SourceKind,
        docs: &[String],
        extra: &[&str],
        tools: Option<&std::path::Path>,
        env: &[(&str, String)],
    ) -> Env {
        let mut topo = Topology::new(3);
        topo.start_servers(PORT);
        let mut args = base_args(mode);
        args.extend(extra.iter().map(|s| s.to_string()));
        let source = match kind {
            SourceKind::Manifests => {
                let dir = std::env::temp_dir().join(format!("{}-manifests", topo.id));
                std::fs::create_dir_all(&dir).expect("manifest dir");
                args.extend(["--manifests".into(), dir.display().to_string()]);
                Source::Manifests(dir)
            }
            SourceKind::Api => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("runtime");
                let listener = listener_in(&topo.node);
                let server = runtime
                    .block_on(async { FakeApiServer::start_on(listener).await })
                    .expect("fake API server");
                // Through a kubeconfig, as a DaemonSet would; with `--master {api}` in `extra`,
                // the kubeconfig names a dead server and the flag must override it.
                let overridden = args.iter().any(|a| a == "{api}");
                for a in args.iter_mut().filter(|a| *a == "{api}") {
                    *a = server.url();
                }
                let kubeconfig_server = if overridden {
                    "http://127.0.0.1:1".to_string()
                } else {
                    server.url()
                };
                let kubeconfig = std::env::temp_dir().join(format!("{}-kubeconfig", topo.id));
                std::fs::write(&kubeconfig, kubeconfig_yaml(&kubeconfig_server)).expect("kubeconfig");
                args.extend(["--kubeconfig".into(), kubeconfig.display().to_string()]);
                Source::Api {
                    server,
                    current: BTreeMap::new(),
                    _runtime: runtime,
                }
            }
        };
        let mut source = source;
        write_source(&mut source, docs);
        let mut env = env.to_vec();
        env.push(("PATH", kproxy_path(mode, tools)));
        let mut kproxy = Kproxy::start_with_env(&topo, &args, None, &env);
        kproxy.wait_sync_after(0);
        Env {
            topo,
            source,
            kproxy,
            args,
        }
    }

    /// The arguments kproxy was started with.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Stops kproxy and starts it again in `mode` on the same source, as an operator switching
    /// a node's proxy mode would.
    pub fn restart_in(&mut self, mode: &str) {
        self.kproxy.stop();
        if let Some(i) = self.args.iter().position(|a| a == "--proxy-mode") {
            self.args[i + 1] = mode.to_string();
        }
        self.kproxy = Kproxy::start_with_env(&self.topo, &self.args, None, &[("PATH", kproxy_path(mode, None))]);
        self.kproxy.wait_sync_after(0);
    }

    /// The fake API server, when the source is the API.
    pub fn api(&self) -> Option<&FakeApiServer> {
        match &self.source {
            Source::Api { server, .. } => Some(server),
            Source::Manifests(_) => None,
        }
    }

    /// Replaces the whole desired state with `docs` (YAML documents).
    pub fn set(&mut self, docs: &[String]) {
        write_source(&mut self.source, docs);
    }
}

/// Makes `source` hold exactly `docs`.
fn write_source(source: &mut Source, docs: &[String]) {
    match source {
        Source::Manifests(dir) => {
            // Write then rename, so kproxy never reads a half-written file.
            let tmp = dir.join(".all.yaml.tmp");
            std::fs::write(&tmp, docs.join("\n---\n")).expect("write manifests");
            std::fs::rename(&tmp, dir.join("all.yaml")).expect("rename manifests");
        }
        Source::Api { server, current, .. } => {
            let mut next = BTreeMap::new();
            for doc in docs {
                let v: serde_json::Value = serde_yaml::from_str(doc).expect("test YAML");
                next.insert(object_key(&v), v);
            }
            for (key, old) in current.iter() {
                if !next.contains_key(key) {
                    let s = |p: &str| old.pointer(p).and_then(|x| x.as_str()).map(str::to_string);
                    let ns = s("/metadata/namespace");
                    server
                        .delete(
                            &s("/apiVersion").unwrap(),
                            &s("/kind").unwrap(),
                            ns.as_deref(),
                            &s("/metadata/name").unwrap(),
                        )
                        .expect("delete");
                }
            }
            for v in next.values() {
                server.apply(v.clone()).expect("apply");
            }
            *current = next;
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Source::Manifests(dir) = &self.source {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Addresses of pods by index, as [`Topology::add_pod`] assigns them.
fn pod_ips(which: &[usize]) -> Vec<String> {
    which.iter().map(|i| format!("10.244.{}.2", i + 1)).collect()
}

fn both() -> Vec<String> {
    vec!["pod-a".to_string(), "pod-b".to_string()]
}

fn cluster_ip_from_node_and_pod(mode: &'static str, kind: SourceKind) {
    let env = Env::new(mode, kind, &objects(&pod_ips(&[0, 1])), &[]);
    let url = format!("http://{CLUSTER_IP}/");
    let node = env.topo.node.clone();
    let client_pod = env.topo.pods[2].ns.clone();
    assert_eq!(backends(&env.topo, &node, &url, 50), both(), "from the node");
    assert_eq!(backends(&env.topo, &client_pod, &url, 50), both(), "from a pod");
}

fn node_port_from_outside(mode: &'static str, kind: SourceKind) {
    let env = Env::new(mode, kind, &objects(&pod_ips(&[0, 1])), &[]);
    let url = format!("http://{}:30080/", env.topo.node_ip);
    let client = env.topo.client.clone();
    assert_eq!(backends(&env.topo, &client, &url, 30), both());
    // Masqueraded: the backend sees the node (its address on the pod link), not the client.
    let body = curl(&env.topo, &client, &url).expect("nodeport answers");
    let peer = body.split_whitespace().nth(1).unwrap_or_default().to_string();
    assert!(
        peer.starts_with("10.244.") && peer.ends_with(".1"),
        "backend saw {peer}, expected the node's address"
    );
}

fn pod_sources(mode: &'static str, kind: SourceKind) {
    let env = Env::new(mode, kind, &objects(&pod_ips(&[0])), &[]);
    let url = format!("http://{CLUSTER_IP}/");
    // From pod-c (inside --cluster-cidr): no masquerade, pod-a sees pod-c's own address.
    let from_c = curl(&env.topo, &env.topo.pods[2].ns, &url).expect("pod-c reaches the service");
    assert_eq!(from_c, format!("pod-a {}", env.topo.pods[2].ip));
    // Hairpin: pod-a reaching its own Service is masqueraded, or the reply would bypass NAT.
    let from_a = curl(&env.topo, &env.topo.pods[0].ns, &url).expect("hairpin works");
    assert_eq!(from_a, "pod-a 10.244.1.1");
}

fn udp_cluster_ip(mode: &'static str, kind: SourceKind) {
    let env = Env::new(mode, kind, &objects(&pod_ips(&[0, 1])), &[]);
    let client_pod = env.topo.pods[2].ns.clone();
    let reply = udp(&env.topo, &client_pod, &format!("{CLUSTER_IP}:53")).expect("UDP reply through the ClusterIP");
    assert!(reply.starts_with("pod-a ") || reply.starts_with("pod-b "), "{reply}");
}

fn no_endpoints_refused(mode: &'static str, kind: SourceKind) {
    let env = Env::new(mode, kind, &objects(&[]), &[]);
    // curl exit 7 is "connection refused" (the REJECT); 28 would be a silent drop timing out.
    let from_node = curl(&env.topo, &env.topo.node, "http://10.96.0.12/");
    assert_eq!(from_node, Err(7), "from the node");
    let from_pod = curl(&env.topo, &env.topo.pods[2].ns, "http://10.96.0.12/");
    assert_eq!(from_pod, Err(7), "from a pod");
    let nodeport = curl(
        &env.topo,
        &env.topo.client,
        &format!("http://{}:30080/", env.topo.node_ip),
    );
    assert_eq!(nodeport, Err(7), "NodePort of a Service without endpoints");
}

fn endpoint_changes(mode: &'static str, kind: SourceKind) {
    let mut env = Env::new(mode, kind, &[], &[]);
    let ips = pod_ips(&[0, 1]);
    env.set(&objects(&ips));
    let url = format!("http://{CLUSTER_IP}/");
    let client = env.topo.pods[2].ns.clone();
    eventually_backends(&env.topo, &client, &url, 20, &["pod-a", "pod-b"]);
    env.set(&objects(&pod_ips(&[1])));
    eventually_backends(&env.topo, &client, &url, 20, &["pod-b"]);
    env.set(&objects(&ips));
    eventually_backends(&env.topo, &client, &url, 20, &["pod-a", "pod-b"]);
    env.kproxy.assert_running();
}

fn bad_objects(mode: &'static str, kind: SourceKind) {
    let mut docs = objects(&pod_ips(&[0, 1]));
    docs.push(service(
        "bad-ip",
        "{clusterIP: 10.96.0.300, ports: [{name: http, port: 80}]}",
    ));
    docs.push(service(
        "bad-port",
        "{clusterIP: 10.96.0.13, ports: [{name: http, port: 0}, {name: proto, port: 81, protocol: ICMP}]}",
    ));
    docs.push(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: orphan, namespace: default}\naddressType: IPv4\nendpoints: [{addresses: [not-an-ip]}]".into(),
    );
    let env = Env::new(mode, kind, &docs, &[]);
    let client = env.topo.pods[2].ns.clone();
    assert_eq!(
        backends(&env.topo, &client, &format!("http://{CLUSTER_IP}/"), 20),
        both()
    );
    let log = env.kproxy.log_text();
    for name in ["default/bad-ip", "default/bad-port", "default/orphan"] {
        assert!(log.contains(name), "log does not name {name}:\n{log}");
    }
}

/// iptables mode, then nftables, then iptables again on the same node: each start removes the
/// previous mode's rules (which would otherwise keep catching Service traffic), and the Service
/// answers throughout.
fn mode_switch(mode: &'static str, kind: SourceKind) {
    let mut env = Env::new(mode, kind, &objects(&pod_ips(&[0, 1])), &[]);
    let url = format!("http://{CLUSTER_IP}/");
    let pod = env.topo.pods[2].ns.clone();
    let node = env.topo.node.clone();
    assert!(iptables_save(&env.topo).contains("KPROXY-SVC-"));
    assert_eq!(backends(&env.topo, &pod, &url, 30), both(), "iptables mode");

    env.restart_in("nftables");
    let save = iptables_save(&env.topo);
    assert!(!save.contains("KPROXY"), "iptables mode's rules left behind:\n{save}");
    assert!(env
        .topo
        .exec_ok(&node, &["nft", "list", "tables"])
        .contains("table ip kproxy"));
    assert_eq!(backends(&env.topo, &pod, &url, 30), both(), "nftables mode");

    env.restart_in("iptables");
    let tables = env.topo.exec_ok(&node, &["nft", "list", "tables"]);
    assert!(
        !tables.contains("kproxy"),
        "nftables mode's tables left behind:\n{tables}"
    );
    assert!(iptables_save(&env.topo).contains("KPROXY-SVC-"));
    assert_eq!(backends(&env.topo, &pod, &url, 30), both(), "iptables mode again");
}

fn iptables_save(topo: &Topology) -> String {
    topo.exec_ok(&topo.node, &["iptables-save"])
}

fn cleanup(mode: &'static str, kind: SourceKind) {
    if mode == "ipvs" {
        return cleanup_ipvs(kind);
    }
    if mode == "nftables" {
        return cleanup_nftables(kind);
    }
    let mut env = Env::new(mode, kind, &[], &[]);
    // Rules of other software, present before kproxy ran.
    let node = env.topo.node.clone();
    env.topo.exec_ok(&node, &["iptables", "-t", "nat", "-N", "OTHER-CHAIN"]);
    env.topo.exec_ok(
        &node,
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "198.51.100.0/24",
            "-m",
            "comment",
            "--comment",
            "other software",
            "-j",
            "RETURN",
        ],
    );
    env.topo.exec_ok(
        &node,
        &["iptables", "-A", "FORWARD", "-s", "198.51.100.0/24", "-j", "ACCEPT"],
    );
    let ips = pod_ips(&[0, 1]);
    env.set(&objects(&ips));
    eventually("kproxy programmed the Service", || {
        iptables_save(&env.topo).contains("KPROXY-SVC-").then_some(())
    });
    env.kproxy.stop();
    for round in 1..=2 {
        let out = env.topo.exec(&node, &[kproxy_bin(), "--cleanup"]);
        assert!(
            out.status.success(),
            "cleanup round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let save = iptables_save(&env.topo);
    assert!(!save.contains("KPROXY"), "kproxy rules left behind:\n{save}");
    assert!(save.contains("OTHER-CHAIN"), "foreign chain removed:\n{save}");
    assert!(save.contains("other software"), "foreign rule removed:\n{save}");
    assert!(
        save.contains("-A FORWARD -s 198.51.100.0/24 -j ACCEPT"),
        "foreign filter rule removed:\n{save}"
    );
    // Traffic no longer goes through the service.
    let client = env.topo.pods[2].ns.clone();
    assert!(curl(&env.topo, &client, &format!("http://{CLUSTER_IP}/")).is_err());
}

fn healthz_and_metrics(mode: &'static str, kind: SourceKind) {
    let env = Env::new(mode, kind, &objects(&[]), &[]);
    let out = env.topo.exec(
        &env.topo.node,
        &["curl", "-s", "-w", "\n%{http_code}", "http://127.0.0.1:10256/healthz"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').expect("status line");
    assert_eq!(code, "200", "{body}");
    let json: serde_json::Value = serde_json::from_str(body).expect("JSON body");
    assert!(
        json.get("lastUpdated").is_some() && json.get("currentTime").is_some(),
        "{json}"
    );
    for name in [
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
        "kproxy_programmed_services",
    ] {
        assert!(env.kproxy.metric(name).is_some(), "metric {name} missing");
    }
    assert!(
        env.kproxy
            .metric("kubeproxy_sync_proxy_rules_last_timestamp_seconds")
            .unwrap_or(0.0)
            > 0.0
    );
    assert_eq!(
        env.kproxy.metric("kproxy_programmed_services"),
        Some(3.0),
        "web:http, web:dns, empty"
    );
    // The families node dashboards read, as every Kubernetes component exports them.
    let text = env.kproxy.metrics_text();
    let declared = |name: &str| text.lines().any(|l| l.starts_with(&format!("# TYPE {name} ")));
    let mut names = vec![
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
        "process_open_fds",
        "process_max_fds",
        "kubernetes_build_info",
        "kubeproxy_sync_proxy_rules_iptables_last",
    ];
    if kind == SourceKind::Api {
        names.extend(["rest_client_requests_total", "rest_client_request_duration_seconds"]);
    }
    if mode == "iptables" {
        // nfacct-backed, read from the kernel: iptables mode creates the counters.
        names.extend([
            "kubeproxy_iptables_ct_state_invalid_dropped_packets_total",
            "kubeproxy_iptables_localhost_nodeports_accepted_packets_total",
        ]);
    }
    for name in names {
        assert!(declared(name), "metric {name} missing from /metrics:\n{text}");
    }
    if kind == SourceKind::Api {
        assert!(
            text.lines()
                .any(|l| l.starts_with("rest_client_requests_total{code=\"200\"") && l.contains("method=\"GET\"")),
            "the API requests are counted:\n{text}"
        );
    }
}

/// `iptables.localhostNodePorts` (on by default): in iptables mode a NodePort answers on
/// 127.0.0.1 of the node (route_localnet), and the packets are counted in the nfacct-backed
/// metric; nftables and IPVS modes never serve NodePorts on loopback, as upstream.
fn localhost_nodeports(mode: &'static str, kind: SourceKind) {
    let env = Env::new(mode, kind, &objects(&pod_ips(&[0, 1])), &[]);
    let client = env.topo.pods[2].ns.clone();
    eventually_backends(
        &env.topo,
        &client,
        &format!("http://{CLUSTER_IP}/"),
        5,
        &["pod-a", "pod-b"],
    );
    let node = env.topo.node.clone();
    let got = curl(&env.topo, &node, "http://127.0.0.1:30080/");
    let metric = "kubeproxy_iptables_localhost_nodeports_accepted_packets_total";
    if mode == "iptables" {
        let body = got.unwrap_or_else(|e| panic!("127.0.0.1:30080 from the node: curl exit {e}"));
        assert!(body.starts_with("pod-"), "{body}");
        assert!(
            env.kproxy.metric(metric).unwrap_or(0.0) >= 1.0,
            "the accepted packet is counted"
        );
    } else {
        assert!(got.is_err(), "{mode} mode serves no NodePort on loopback: {got:?}");
    }
}

fn watch_resilience(mode: &'static str, kind: SourceKind) {
    let mut env = Env::new(mode, kind, &objects(&[]), &[]);
    let url = format!("http://{CLUSTER_IP}/");
    let client = env.topo.pods[2].ns.clone();
    if let Source::Api { server, .. } = &env.source {
        server.drop_watches();
    }
    env.set(&objects(&pod_ips(&[0])));
    eventually_backends(&env.topo, &client, &url, 5, &["pod-a"]);
    if let Source::Api { server, .. } = &env.source {
        server.compact();
    }
    env.set(&objects(&pod_ips(&[1])));
    eventually_backends(&env.topo, &client, &url, 5, &["pod-b"]);
    if let Source::Api { server, .. } = &env.source {
        let lists = server
            .requests()
            .iter()
            .filter(|r| r.contains("endpointslices") && !r.contains("watch="))
            .count();
        assert!(lists >= 2, "no relist after 410: {:?}", server.requests());
    }
    env.kproxy.assert_running();
}

/// How a scenario makes kproxy's next transactions fail while a marker file exists.
enum Refusal {
    /// A wrapper of the rule-writing tool, first in kproxy's PATH, failing as the real tool
    /// would: the program, a shell condition on its arguments (which runs fail), and what it
    /// prints.
    Tool {
        tool: &'static str,
        fails_when: &'static str,
        message: &'static str,
    },
    /// nftables mode's test hook (`KPROXY_TEST_NFT_REFUSE`): each transaction carries one
    /// request for a chain that does not exist, and the kernel itself refuses it.
    Kernel,
}

struct Refusing {
    how: Refusal,
    /// The metric that counts the refused syncs.
    metric: &'static str,
    /// What the log of a refused sync must say.
    logged: &'static [&'static str],
}

/// The kernel refuses a sync: it keeps the previous rules (traffic still flows as before),
/// the failure is logged naming what was refused and counted, and once transactions work
/// again the retry programs the change.
fn refused_sync_keeps_the_kernel_rules(mode: &'static str, kind: SourceKind, refusing: Refusing) {
    let dir = std::env::temp_dir().join(format!("kpt-{mode}-{}-{}", std::process::id(), kind.name()));
    std::fs::create_dir_all(&dir).expect("tools dir");
    let marker = dir.join("fail");
    let mut env = Vec::new();
    let mut tools = None;
    match refusing.how {
        Refusal::Tool {
            tool,
            fails_when,
            message,
        } => {
            let which = std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .expect("sh");
            let real = String::from_utf8_lossy(&which.stdout).trim().to_string();
            let wrapper = format!(
                "#!/bin/sh\nif [ -e {marker} ] && {fails_when}; then cat >/dev/null; echo '{message}' >&2; exit 1; fi\nexec {real} \"$@\"\n",
                marker = marker.display(),
            );
            let script = dir.join(tool);
            std::fs::write(&script, wrapper).expect("wrapper");
            std::process::Command::new("chmod")
                .arg("+x")
                .arg(&script)
                .status()
                .expect("chmod");
            tools = Some(dir.as_path());
            // The refusing tool must be the one that writes: with the legacy backend partial
            // syncs would go through kproxy's native writer instead (whose refusals
            // src/dataplane/iptables/native's kernel tests cover).
            env.push(("KPROXY_IPTABLES_NATIVE", "0".to_string()));
        }
        Refusal::Kernel => env.push(("KPROXY_TEST_NFT_REFUSE", marker.display().to_string())),
    }

    let mut env = Env::with_tools(mode, kind, &objects(&pod_ips(&[0, 1])), &[], tools, &env);
    let client = env.topo.pods[2].ns.clone();
    let url = format!("http://{CLUSTER_IP}/");
    eventually_backends(&env.topo, &client, &url, 20, &["pod-a", "pod-b"]);

    std::fs::write(&marker, "").expect("marker");
    env.set(&objects(&pod_ips(&[1])));
    eventually("the failure is counted", || {
        (env.kproxy.metric(refusing.metric)? >= 1.0).then_some(())
    });
    // The kernel still has the old rules: both backends answer.
    assert_eq!(backends(&env.topo, &client, &url, 20), both());
    let log = env.kproxy.log_text();
    for what in refusing.logged {
        assert!(log.contains(what), "log does not say {what:?}:\n{log}");
    }

    std::fs::remove_file(&marker).expect("unmark");
    eventually_backends(&env.topo, &client, &url, 20, &["pod-b"]);
    let _ = std::fs::remove_dir_all(&dir);
}

fn restore_failure(mode: &'static str, kind: SourceKind) {
    let refusing = Refusing {
        how: Refusal::Tool {
            tool: "iptables-restore",
            fails_when: "true",
            message: "iptables-restore v1.8.9 (nf_tables): line 3: RULE_APPEND failed (Invalid argument): rule in chain KPROXY-SERVICES",
        },
        metric: "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
        logged: &["offending line", "sync failed"],
    };
    refused_sync_keeps_the_kernel_rules(mode, kind, refusing);
}

/// The kernel refuses nftables mode's transaction: the log names the refused command and
/// the Service it was for. The retry reads the table back and programs the change.
fn nft_failure(mode: &'static str, kind: SourceKind) {
    let refusing = Refusing {
        how: Refusal::Kernel,
        metric: "kproxy_sync_failures_total{mode=\"nftables\"}",
        logged: &[
            // An endpoint change is map elements only: the first of them is refused.
            "nf_tables refused the transaction at `delete element ip kproxy ",
            "(Service default/web)",
            "No such file or directory",
            "sync failed",
        ],
    };
    refused_sync_keeps_the_kernel_rules(mode, kind, refusing);
}

/// Someone rewrites one of kproxy's endpoint slots (to an address nobody serves), adds a rule of
/// their own to a kproxy chain (the fixed chain web's cluster IP is dispatched to) and deletes
/// the NodePort's dispatch element. There is no periodic
/// resync to find it (`--sync-period 1h`): kproxy's next transaction, for an unrelated
/// Service, is refused for the changed ruleset generation, and kproxy checks its table and
/// repairs exactly that.
fn foreign_change(mode: &'static str, kind: SourceKind) {
    let docs = objects(&pod_ips(&[0, 1]));
    let mut env = Env::new(mode, kind, &docs, &["--sync-period", "1h"]);
    let p = Probes::ready(&env);
    let pod_b = pod_ips(&[1]).remove(0);
    let listing = env.topo.exec_ok(&p.node, &["nft", "list", "table", "ip", "kproxy"]);
    // The slot of the cluster IP that sends to pod-b: `10.96.0.10 . 80 . N : POD_B . 8080`.
    let slot = listing
        .split([',', '{', '}', '\n'])
        .map(str::trim)
        .find_map(|e| {
            let (key, to) = e.split_once(" : ")?;
            (key.starts_with(&format!("{CLUSTER_IP} . 80 . ")) && to == format!("{pod_b} . 8080"))
                .then(|| key.to_string())
        })
        .unwrap_or_else(|| panic!("no endpoint slot for {pod_b}:\n{listing}"));
    let chain = "service-cluster";
    assert!(listing.contains(&format!("chain {chain} {{")), "{listing}");
    let dead = "10.244.250.250";
    env.topo.exec_ok(
        &p.node,
        &[
            "nft",
            &format!(
                "delete element ip kproxy service-endpoints-tcp {{ {slot} }}; add element ip kproxy service-endpoints-tcp {{ {slot} : {dead} . 8080 }}"
            ),
        ],
    );
    env.topo.exec_ok(
        &p.node,
        &[
            "nft",
            &format!("insert rule ip kproxy {chain} ip saddr 203.0.113.9 drop"),
        ],
    );
    env.topo.exec_ok(
        &p.node,
        &[
            "nft",
            "delete element ip kproxy external-cluster-nodeports { tcp . 30080 }",
        ],
    );
    let syncs = env.kproxy.syncs();
    let mut changed = docs.clone();
    changed.push(service(
        "other",
        "{clusterIP: 10.96.0.13, ports: [{name: http, port: 80}]}",
    ));
    env.set(&changed);
    env.kproxy.wait_sync_after(syncs);
    eventually("the table is repaired", || {
        let now = env.topo.exec_ok(&p.node, &["nft", "list", "table", "ip", "kproxy"]);
        let np = env.topo.exec_ok(
            &p.node,
            &["nft", "list", "set", "ip", "kproxy", "external-cluster-nodeports"],
        );
        (!now.contains(dead) && !now.contains("203.0.113.9") && np.contains("tcp . 30080")).then_some(())
    });
    p.both_answer(&env.topo);
    let log = env.kproxy.log_text();
    assert!(log.contains("the ruleset changed behind kproxy's back"), "{log}");
    assert!(log.contains("repairing"), "{log}");
}

/// Another nftables writer (a CNI, a firewall) commits tables of its own while kproxy's
/// periodic syncs run every second: the ruleset generation moves every time, but the
/// notifications show that nothing of kproxy's was touched, so kproxy neither lists nor
/// compares its table. Then the writer adds a chain to kproxy's table: the next periodic sync
/// names the commit, checks the table and deletes the stray chain, and Services still answer.
fn others_tables(mode: &'static str, kind: SourceKind) {
    let env = Env::new(mode, kind, &objects(&pod_ips(&[0, 1])), &["--sync-period", "1s"]);
    let url = format!("http://{CLUSTER_IP}/");
    let (node, client) = (env.topo.node.clone(), env.topo.pods[2].ns.clone());
    eventually_backends(&env.topo, &client, &url, 10, &["pod-a", "pod-b"]);
    let checks = |log: &str| log.matches("nftables check: compared").count();
    let before = checks(&env.kproxy.log_text());
    for i in 0..8 {
        env.topo.exec_ok(
            &node,
            &[
                "nft",
                &format!(
                    "add table ip busy-{i}; add chain ip busy-{i} c; delete table ip busy-{}",
                    i
                ),
            ],
        );
        std::thread::sleep(std::time::Duration::from_millis(400));
    }
    env.topo
        .exec_ok(&node, &["nft", "add table inet kproxy; delete table inet kproxy"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let log = env.kproxy.log_text();
    assert!(
        log.matches("none of it to kproxy's table").count() >= 2,
        "periodic syncs looked at the others' commits:\n{log}"
    );
    assert_eq!(checks(&log), before, "a check ran for others' tables:\n{log}");
    assert!(!log.contains("behind its back"), "{log}");

    env.topo.exec_ok(&node, &["nft", "add chain ip kproxy stray"]);
    eventually("the stray chain is deleted", || {
        let tables = env.topo.exec_ok(&node, &["nft", "list", "table", "ip", "kproxy"]);
        (!tables.contains("chain stray")).then_some(())
    });
    let log = env.kproxy.log_text();
    assert!(log.contains("a new chain stray in table kproxy"), "{log}");
    assert!(checks(&log) > before, "{log}");
    eventually_backends(&env.topo, &client, &url, 10, &["pod-a", "pod-b"]);
}

/// `nft flush ruleset` on the node (what nftables.service does when it starts or reloads)
/// deletes kproxy's tables with everything else: the next periodic sync sees it in the
/// notifications, checks the whole table and writes it again, and the cluster IP and the
/// NodePort answer again, with the table as kproxy would write it.
fn flushed_ruleset(mode: &'static str, kind: SourceKind) {
    let env = Env::new(mode, kind, &objects(&pod_ips(&[0, 1])), &["--sync-period", "1s"]);
    let p = Probes::ready(&env);
    let before = env.topo.exec_ok(&p.node, &["nft", "list", "table", "ip", "kproxy"]);
    env.topo.exec_ok(&p.node, &["nft", "flush ruleset"]);
    assert!(!env.topo.exec_ok(&p.node, &["nft", "list", "tables"]).contains("kproxy"));
    eventually("the table is written again", || {
        let out = env.topo.exec(&p.node, &["nft", "list", "table", "ip", "kproxy"]);
        (out.status.success() && String::from_utf8_lossy(&out.stdout) == before).then_some(())
    });
    p.both_answer(&env.topo);
    let log = env.kproxy.log_text();
    assert!(log.contains("checking it"), "{log}");
}

/// nft 1.1.3 (Debian trixie's), fetched and unpacked under target/ by scripts/nft-trixie.sh.
fn nft_trixie() -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/nft-trixie.sh");
    let out = std::process::Command::new(script)
        .output()
        .expect("scripts/nft-trixie.sh");
    assert!(
        out.status.success(),
        "scripts/nft-trixie.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `nft -j list ruleset` without what differs between two equal rulesets: handles, and the
/// order of set elements (a hash set lists in its own random order).
fn ruleset_json(topo: &Topology, ns: &str) -> serde_json::Value {
    fn normalize(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("handle");
                for (k, x) in m.iter_mut() {
                    normalize(x);
                    if k == "elem" {
                        if let serde_json::Value::Array(a) = x {
                            a.sort_by_key(|e| e.to_string());
                        }
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(normalize),
            _ => {}
        }
    }
    let mut v: serde_json::Value =
        serde_json::from_str(&topo.exec_ok(ns, &["nft", "-j", "list", "ruleset"])).expect("nft -j");
    normalize(&mut v);
    v
}

/// What kproxy writes over netlink, as nft 1.0.6 and nft 1.1.3 list it: both print kproxy's
/// tables, and what each prints parses again (`nft -c -f`). And `kproxy render` prints nft
/// input that, loaded with `nft -f` into an empty namespace, lists exactly as the table
/// kproxy wrote.
fn nft_listings(mode: &'static str, kind: SourceKind) {
    let mut docs = objects(&pod_ips(&[0, 1]));
    docs.push(service(
        "sticky",
        "{clusterIP: 10.96.0.30, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}, ports: [{name: http, port: 80}]}",
    ));
    docs.push(slice("sticky", &pod_ips(&[0, 1])));
    docs.push("apiVersion: v1\nkind: Service\nmetadata: {name: fw, namespace: default}\nspec: {type: LoadBalancer, clusterIP: 10.96.0.50, externalIPs: [198.51.100.51], externalTrafficPolicy: Local, loadBalancerSourceRanges: [203.0.113.0/24], ports: [{name: http, port: 80, nodePort: 30100}]}\nstatus: {loadBalancer: {ingress: [{ip: 198.51.100.50}]}}".to_string());
    docs.push(slice("fw", &pod_ips(&[0])));
    docs.push(service(
        "web6",
        "{clusterIP: 'fd00:96::10', ipFamilies: [IPv6], ports: [{name: http, port: 80}]}",
    ));
    docs.push(slice_of("web6", &[ep(0).v6(), ep(1).v6()]));
    let env = Env::new(mode, kind, &docs, &[]);
    let node = env.topo.node.clone();
    let trixie = nft_trixie();
    let listing_dir = std::env::temp_dir().join(format!("{}-listings", env.topo.id));
    std::fs::create_dir_all(&listing_dir).expect("listing dir");
    for (name, nft) in [("1.0.6", "nft".to_string()), ("1.1.3", trixie.clone())] {
        let out = env.topo.exec_ok(&node, &[&nft, "list", "ruleset"]);
        for want in [
            "table ip kproxy {",
            "table ip6 kproxy {",
            "map service-ips {",
            "dnat to 10.244.1.2:8080",
        ] {
            assert!(out.contains(want), "nft {name} does not print {want:?}:\n{out}");
        }
        assert!(out.contains("update @affinity-"), "nft {name}:\n{out}");
        let file = listing_dir.join(format!("{name}.nft"));
        std::fs::write(&file, &out).expect("listing");
        // Each release reads what it printed, and the newer one what the older printed. (nft
        // 1.0.6 cannot read 1.1.3's names for output-hook priorities, `priority dstnat`, in
        // any ruleset: that is nft's, not the writer's.)
        let readers: &[(&str, &str)] = if name == "1.0.6" {
            &[("1.0.6", "nft"), ("1.1.3", trixie.as_str())]
        } else {
            &[("1.1.3", trixie.as_str())]
        };
        for &(reader, nft) in readers {
            let check = env.topo.exec(&node, &[nft, "-c", "-f", &file.display().to_string()]);
            assert!(
                check.status.success(),
                "nft {reader} cannot parse what nft {name} listed: {}\n{out}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
    }

    // kproxy render, with the agent's own flags and source, loaded by nft into an empty
    // namespace, means what netlink wrote.
    let mut render_args = vec![kproxy_bin(), "render"];
    render_args.extend(env.args.iter().map(String::as_str));
    let render = env.topo.exec_ok(&node, &render_args);
    let render_file = listing_dir.join("render.nft");
    std::fs::write(&render_file, &render).expect("render");
    let other = format!("{}r", env.topo.id);
    crate::netns::run("ip", &["netns", "add", &other]);
    let loaded = env
        .topo
        .exec(&other, &["nft", "-f", &render_file.display().to_string()]);
    let written = ruleset_json(&env.topo, &node);
    let rendered = if loaded.status.success() {
        Some(ruleset_json(&env.topo, &other))
    } else {
        None
    };
    crate::netns::run("ip", &["netns", "del", &other]);
    let _ = std::fs::remove_dir_all(&listing_dir);
    let rendered = rendered.unwrap_or_else(|| {
        panic!(
            "nft -f refused kproxy render's output: {}\n{render}",
            String::from_utf8_lossy(&loaded.stderr)
        )
    });
    assert_eq!(written, rendered, "netlink wrote what render prints");
}

/// `--master` wins over the kubeconfig's server (which here points nowhere), as in kube-proxy:
/// an explicit address is all kproxy needs, never a ClusterIP.
fn master_override(mode: &'static str, kind: SourceKind) {
    let env = Env::new(mode, kind, &objects(&pod_ips(&[0, 1])), &["--master", "{api}"]);
    eventually_backends(
        &env.topo,
        &env.topo.pods[2].ns,
        &format!("http://{CLUSTER_IP}/"),
        20,
        &["pod-a", "pod-b"],
    );
}

/// The IPVS table of `topo`'s node namespace as the kernel prints it (`/proc/net/ip_vs`:
/// addresses and ports in hex, e.g. `0A60000A:0050` for 10.96.0.10:80).
fn proc_ip_vs(topo: &Topology) -> String {
    topo.exec_ok(&topo.node, &["cat", "/proc/net/ip_vs"])
}

/// IPVS mode's cleanup: its virtual services, nftables table and dummy interface go, other
/// software's virtual services and tables stay; `--cleanup` of the default (iptables) mode
/// removes IPVS leftovers too, and a second run finds nothing to do.
fn cleanup_ipvs(kind: SourceKind) {
    let mut env = Env::new("ipvs", kind, &[], &[]);
    let node = env.topo.node.clone();
    // Other software's state: a virtual service on an address that is not the node's, and a table.
    env.topo
        .exec_ok(&node, &["ipvsadm", "-A", "-t", "198.51.100.10:80", "-s", "rr"]);
    env.topo.exec_ok(&node, &["nft", "add table ip other"]);
    env.topo.exec_ok(
        &node,
        &[
            "nft",
            "add chain ip other input { type filter hook input priority 10; }",
        ],
    );
    env.set(&objects(&pod_ips(&[0, 1])));
    eventually("kproxy programmed the Service", || {
        proc_ip_vs(&env.topo).contains("0A60000A:0050").then_some(())
    });
    let client = env.topo.pods[2].ns.clone();
    assert_eq!(
        backends(&env.topo, &client, &format!("http://{CLUSTER_IP}/"), 10),
        both()
    );
    env.kproxy.stop();
    for args in [&["--cleanup"][..], &["--proxy-mode", "ipvs", "--cleanup"][..]] {
        let mut cmd = vec![kproxy_bin()];
        cmd.extend(args);
        let out = env.topo.exec(&node, &cmd);
        assert!(
            out.status.success(),
            "kproxy {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let table = proc_ip_vs(&env.topo);
    assert!(!table.contains("0A60000A"), "ClusterIP service left behind:\n{table}");
    assert!(!table.contains(":7580"), "NodePort service left behind:\n{table}");
    assert!(
        table.contains("C633640A:0050"),
        "foreign virtual service removed:\n{table}"
    );
    let tables = env.topo.exec_ok(&node, &["nft", "list", "tables"]);
    assert!(!tables.contains("kproxy"), "kproxy table left behind:\n{tables}");
    assert!(tables.contains("table ip other"), "foreign table removed:\n{tables}");
    let link = env.topo.exec(&node, &["ip", "link", "show", "kube-ipvs0"]);
    assert!(!link.status.success(), "kube-ipvs0 left behind");
    assert!(curl(&env.topo, &client, &format!("http://{CLUSTER_IP}/")).is_err());
}

/// nftables mode's cleanup: both `kproxy` tables go, other software's tables stay; `--cleanup`
/// of the default (iptables) mode removes them too, and a second run finds nothing to do.
fn cleanup_nftables(kind: SourceKind) {
    let mut env = Env::new("nftables", kind, &[], &[]);
    let node = env.topo.node.clone();
    env.topo.exec_ok(&node, &["nft", "add table ip other"]);
    env.topo.exec_ok(
        &node,
        &[
            "nft",
            "add chain ip other input { type filter hook input priority 10; }",
        ],
    );
    env.set(&objects(&pod_ips(&[0, 1])));
    let client = env.topo.pods[2].ns.clone();
    eventually_backends(
        &env.topo,
        &client,
        &format!("http://{CLUSTER_IP}/"),
        10,
        &["pod-a", "pod-b"],
    );
    let tables = env.topo.exec_ok(&node, &["nft", "list", "tables"]);
    assert!(
        tables.contains("table ip kproxy") && tables.contains("table ip6 kproxy"),
        "{tables}"
    );
    env.kproxy.stop();
    // Without nft on the PATH: the cleanup deletes the tables over netlink.
    let path = format!("PATH={}", path_without_nft());
    for args in [&["--cleanup"][..], &["--proxy-mode", "nftables", "--cleanup"][..]] {
        let mut cmd = vec!["env", &path, kproxy_bin()];
        cmd.extend(args);
        let out = env.topo.exec(&node, &cmd);
        assert!(
            out.status.success(),
            "kproxy {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tables = env.topo.exec_ok(&node, &["nft", "list", "tables"]);
    assert!(!tables.contains("kproxy"), "kproxy table left behind:\n{tables}");
    assert!(tables.contains("table ip other"), "foreign table removed:\n{tables}");
    assert!(curl(&env.topo, &client, &format!("http://{CLUSTER_IP}/")).is_err());
}

/// Where the repair scenarios look from: the node's namespace, a pod's (to the cluster IP) and
/// the outside client's (to the NodePort), with both URLs.
struct Probes {
    node: String,
    client: String,
    outside: String,
    url: String,
    node_port: String,
}

impl Probes {
    /// The probes of `env`, once both backends answer on the cluster IP from the pod.
    fn ready(env: &Env) -> Probes {
        let p = Probes {
            node: env.topo.node.clone(),
            client: env.topo.pods[2].ns.clone(),
            outside: env.topo.client.clone(),
            url: format!("http://{CLUSTER_IP}/"),
            node_port: format!("http://{}:30080/", env.topo.node_ip),
        };
        eventually_backends(&env.topo, &p.client, &p.url, 10, &["pod-a", "pod-b"]);
        p
    }

    /// Both backends answer again, on the cluster IP from the pod and on the NodePort from
    /// outside.
    fn both_answer(&self, topo: &Topology) {
        eventually_backends(topo, &self.client, &self.url, 10, &["pod-a", "pod-b"]);
        eventually_backends(topo, &self.outside, &self.node_port, 10, &["pod-a", "pod-b"]);
    }
}

/// Someone deletes kproxy's objects behind its back; the next full resync puts them back.
fn resync_repairs(mode: &'static str, kind: SourceKind) {
    let env = Env::new(mode, kind, &objects(&pod_ips(&[0, 1])), &["--sync-period", "2s"]);
    let p = Probes::ready(&env);
    if mode == "ipvs" {
        env.topo
            .exec_ok(&p.node, &["ipvsadm", "-D", "-t", &format!("{CLUSTER_IP}:80")]);
        env.topo.exec_ok(
            &p.node,
            &[
                "ipvsadm",
                "-e",
                "-t",
                "192.0.2.1:30080",
                "-r",
                "10.244.1.2:8080",
                "-m",
                "-w",
                "0",
            ],
        );
    } else if mode == "nftables" {
        env.topo.exec_ok(&p.node, &["nft", "flush chain ip kproxy services"]);
        env.topo
            .exec_ok(&p.node, &["nft", "flush map ip kproxy service-nodeports"]);
    } else {
        env.topo
            .exec_ok(&p.node, &["iptables", "-t", "nat", "-F", "KPROXY-SERVICES"]);
    }
    p.both_answer(&env.topo);
}

/// The flags every scenario's kproxy starts with: `mode`, node-1, the pod CIDR, a short
/// minimum sync period, and health and metrics on loopback.
pub fn base_args(mode: &str) -> Vec<String> {
    [
        "--proxy-mode",
        mode,
        "--hostname-override",
        "node-1",
        "--cluster-cidr",
        "10.244.0.0/16",
        "--min-sync-period",
        "100ms",
        "--healthz-bind-address",
        "127.0.0.1:10256",
        "--metrics-bind-address",
        "127.0.0.1:10249",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
