//! Faults and bad input around the sources of desired state, with real packets: manifest files
//! that do not parse or define an object twice, an API server that goes away and comes back,
//! and `/healthz` of a kproxy that has never synced.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::fakeapi::FakeApiServer;
use crate::harness::{eventually, eventually_backends, Kproxy};
use crate::netns::Topology;
use crate::scenarios::{base_args, ep, node_yaml, service, slice_of};

pub type Scenario = fn(&'static str);

/// Scenarios of the manifest source, run in every mode.
pub const MANIFESTS: &[(&str, Scenario)] = &[
    (
        "broken_file_keeps_its_objects_and_other_files_still_apply",
        broken_file_later_good_change,
    ),
    ("fresh_start_with_a_broken_file_programs_the_rest", fresh_start_broken),
    (
        "duplicate_in_two_files_first_wins_and_either_removal_is_followed",
        duplicate_across_files,
    ),
];

/// Scenarios of the API source. They are about the watchers, not the dataplane, and wait
/// out an outage: run in one mode only.
pub const API: &[(&str, Scenario)] = &[
    ("api_outage_is_followed_within_seconds_of_its_return", api_outage),
    ("healthz_is_unhealthy_until_the_first_sync", healthz_before_first_sync),
];

/// How long the API server is away: long enough that a client-go-like backoff (0.8 s doubling
/// to 30 s) would be waiting about as long again when it returns.
const OUTAGE: Duration = Duration::from_secs(25);

/// How soon after the API's return a change must reach the kernel: the watchers' 4 s retry
/// cap, plus generous room for a slow, shared machine.
const RETURN_LIMIT: Duration = Duration::from_secs(12);

const WEB_IP: &str = "10.96.0.10";
const PORT: u16 = 8080;

/// The `web` Service at [`WEB_IP`] (port 80 to the pods' 8080), or another name and address.
fn svc(name: &str, ip: &str) -> String {
    service(
        name,
        &format!("{{clusterIP: {ip}, ports: [{{name: http, port: 80, targetPort: {PORT}, protocol: TCP}}]}}"),
    )
}

/// An EndpointSlice for `name` with pods `pods` (0-based: pod-a, pod-b, ...).
fn slice(name: &str, pods: &[usize]) -> String {
    let eps: Vec<_> = pods.iter().map(|i| ep(*i)).collect();
    slice_of(name, &eps)
}

/// A topology with three pods serving on [`PORT`] and a manifest directory.
struct Files {
    topo: Topology,
    dir: PathBuf,
}

impl Files {
    fn new() -> Files {
        let mut topo = Topology::new(3);
        topo.start_servers(PORT);
        let dir = std::env::temp_dir().join(format!("{}-faults", topo.id));
        std::fs::create_dir_all(&dir).expect("manifest dir");
        Files { topo, dir }
    }

    /// Writes a file atomically (write, then rename), as an editor or a config tool would.
    fn write(&self, name: &str, docs: &[String]) {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, docs.join("\n---\n")).expect("write manifest");
        std::fs::rename(&tmp, self.dir.join(name)).expect("rename manifest");
    }

    /// Writes raw text atomically (a file that does not parse, say).
    fn write_text(&self, name: &str, text: &str) {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write manifest");
        std::fs::rename(&tmp, self.dir.join(name)).expect("rename manifest");
    }

    fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.join(name)).expect("remove manifest");
    }

    fn start(&self, mode: &str) -> Kproxy {
        let mut args = base_args(mode);
        args.extend(["--manifests".into(), self.dir.display().to_string()]);
        let mut kproxy = Kproxy::start_with_env(&self.topo, &args, None, &[]);
        kproxy.wait_sync_after(0);
        kproxy
    }

    /// The client pod's namespace (pod-c).
    fn client(&self) -> String {
        self.topo.pods[2].ns.clone()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The pod answering one request to `ip`:80 from `ns`, or `None` if nothing answers within a
/// second (no rule for the address: the packet goes nowhere).
fn answer(topo: &Topology, ns: &str, ip: &str) -> Option<String> {
    let url = format!("http://{ip}/");
    let out = topo.exec(ns, &["curl", "-s", "--connect-timeout", "1", "--max-time", "2", &url]);
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    })
}

/// Waits until `ip` answers from exactly `pods`, or (for an empty `pods`) not at all.
fn eventually_answers(topo: &Topology, ns: &str, ip: &str, pods: &[&str]) {
    if pods.is_empty() {
        eventually(&format!("{ip} no longer answers"), || {
            answer(topo, ns, ip).is_none().then_some(())
        });
    } else {
        eventually_backends(topo, ns, &format!("http://{ip}/"), 10, pods);
    }
}

/// The log lines (at warn or error) that mention `what`.
fn reports(kproxy: &Kproxy, what: &str) -> Vec<String> {
    kproxy
        .log_text()
        .lines()
        .filter(|l| (l.contains("ERROR") || l.contains("WARN")) && l.contains(what))
        .map(str::to_string)
        .collect()
}

/// One file stops parsing: it is reported once, its objects keep serving, and changes to the
/// other files (an edit, a new file) still reach the kernel; once fixed, its new content applies.
fn broken_file_later_good_change(mode: &'static str) {
    let f = Files::new();
    f.write("00-node.yaml", &[node_yaml()]);
    f.write("10-web.yaml", &[svc("web", WEB_IP), slice("web", &[0])]);
    f.write("20-other.yaml", &[svc("other", "10.96.0.11"), slice("other", &[1])]);
    let mut kproxy = f.start(mode);
    let client = f.client();
    eventually_answers(&f.topo, &client, WEB_IP, &["pod-a"]);
    eventually_answers(&f.topo, &client, "10.96.0.11", &["pod-b"]);

    f.write_text(
        "20-other.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: other\n",
    );
    f.write("10-web.yaml", &[svc("web", WEB_IP), slice("web", &[1])]);
    f.write("30-new.yaml", &[svc("new", "10.96.0.12"), slice("new", &[0])]);
    eventually_answers(&f.topo, &client, WEB_IP, &["pod-b"]);
    eventually_answers(&f.topo, &client, "10.96.0.12", &["pod-a"]);
    eventually_answers(&f.topo, &client, "10.96.0.11", &["pod-b"]);
    kproxy.assert_running();
    let reported = reports(&kproxy, "20-other.yaml");
    assert_eq!(reported.len(), 1, "the broken file is reported once: {reported:#?}");

    f.write("20-other.yaml", &[svc("other", "10.96.0.11"), slice("other", &[0])]);
    eventually_answers(&f.topo, &client, "10.96.0.11", &["pod-a"]);
}

/// Started while one file does not parse: everything else is programmed and `/healthz` says
/// healthy because a sync happened; the file is reported once.
fn fresh_start_broken(mode: &'static str) {
    let f = Files::new();
    f.write("00-node.yaml", &[node_yaml()]);
    f.write("10-web.yaml", &[svc("web", WEB_IP), slice("web", &[0, 1])]);
    f.write_text("20-bad.yaml", "kind: [\n");
    let mut kproxy = f.start(mode);
    eventually_answers(&f.topo, &f.client(), WEB_IP, &["pod-a", "pod-b"]);
    assert_eq!(healthz(&f.topo).0, 200, "synced, so healthy");
    kproxy.assert_running();
    let reported = reports(&kproxy, "20-bad.yaml");
    assert_eq!(reported.len(), 1, "the broken file is reported once: {reported:#?}");
}

/// The same Service in two files, with different cluster IPs: the first file's copy is the
/// one programmed, reported once naming both; removing it programs the other; removing the
/// losing copy changes nothing.
fn duplicate_across_files(mode: &'static str) {
    let (a_ip, b_ip) = ("10.96.0.20", "10.96.0.21");
    let f = Files::new();
    f.write("00-node.yaml", &[node_yaml(), slice("dup", &[0])]);
    f.write("10-a.yaml", &[svc("dup", a_ip)]);
    f.write("20-b.yaml", &[svc("dup", b_ip)]);
    let mut kproxy = f.start(mode);
    let client = f.client();
    eventually_answers(&f.topo, &client, a_ip, &["pod-a"]);
    assert_eq!(
        answer(&f.topo, &client, b_ip),
        None,
        "the second copy is not programmed"
    );
    let reported = reports(&kproxy, "Service default/dup is defined in");
    assert_eq!(reported.len(), 1, "reported once: {reported:#?}");
    assert!(
        reported[0].contains("10-a.yaml") && reported[0].contains("20-b.yaml"),
        "names both files: {}",
        reported[0]
    );

    // The winning copy goes away: the other one takes over.
    f.remove("10-a.yaml");
    eventually_answers(&f.topo, &client, b_ip, &["pod-a"]);
    eventually_answers(&f.topo, &client, a_ip, &[]);

    // Back in the first file, it wins again; then the losing copy goes away: nothing moves.
    f.write("10-a.yaml", &[svc("dup", a_ip)]);
    eventually_answers(&f.topo, &client, a_ip, &["pod-a"]);
    eventually_answers(&f.topo, &client, b_ip, &[]);
    f.remove("20-b.yaml");
    // Nothing changes, so there is no sync to wait for: give the source a few polls.
    std::thread::sleep(Duration::from_secs(1));
    eventually_answers(&f.topo, &client, a_ip, &["pod-a"]);
    assert_eq!(answer(&f.topo, &client, b_ip), None);
    kproxy.assert_running();
}

/// `/healthz` in the node namespace: status code and JSON body.
fn healthz(topo: &Topology) -> (u16, serde_json::Value) {
    let out = topo.exec(
        &topo.node,
        &[
            "curl",
            "-s",
            "--max-time",
            "2",
            "-w",
            "\n%{http_code}",
            "http://127.0.0.1:10256/healthz",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or_default(),
    )
}

// ------------------------------------------------------------------ the API source

/// The fake API port inside the node namespace. Explicit, not picked by the kernel: a socket
/// that stops listening keeps an explicitly bound port, so the API can come back on it.
const API_PORT: u16 = 6443;

/// A listener on 127.0.0.1:[`API_PORT`] inside `ns`.
fn api_listener(ns: &str) -> std::net::TcpListener {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        std::net::TcpListener::bind(("127.0.0.1", API_PORT)).expect("bind in netns")
    })
    .join()
    .expect("listener thread")
}

/// A topology, a fake API server in its node namespace holding `docs`, and kproxy's arguments.
struct Api {
    topo: Topology,
    server: FakeApiServer,
    args: Vec<String>,
    kubeconfig: PathBuf,
    _runtime: tokio::runtime::Runtime,
}

impl Api {
    fn new(mode: &str, docs: &[String], extra: &[&str]) -> Api {
        let mut topo = Topology::new(3);
        topo.start_servers(PORT);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = api_listener(&topo.node);
        let server = runtime
            .block_on(FakeApiServer::start_on(listener))
            .expect("fake API server");
        for doc in docs {
            server
                .apply(serde_yaml::from_str(doc).expect("test YAML"))
                .expect("apply");
        }
        let kubeconfig = std::env::temp_dir().join(format!("{}-kubeconfig", topo.id));
        write_kubeconfig(&kubeconfig, &server.url());
        let mut args = base_args(mode);
        args.extend(["--kubeconfig".into(), kubeconfig.display().to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Api {
            topo,
            server,
            args,
            kubeconfig,
            _runtime: runtime,
        }
    }

    fn apply(&self, doc: &str) {
        self.server
            .apply(serde_yaml::from_str(doc).expect("test YAML"))
            .expect("apply");
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn write_kubeconfig(path: &Path, server: &str) {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: '{server}'}}\nusers:\n- name: kproxy\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: kproxy}}\ncurrent-context: fake\n"
    );
    std::fs::write(path, text).expect("kubeconfig");
}

fn ingress(host: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: web, namespace: default}}\nspec: {{ingressClassName: kproxy, rules: [{{host: {host}, http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: web, port: {{number: 80}}}}}}}}]}}}}]}}"
    )
}

/// The pod that answers `host` through the Ingress listener on the node's port 80, from the
/// outside client.
fn through_ingress(topo: &Topology, host: &str) -> Option<String> {
    let url = format!("http://{host}/");
    let resolve = format!("{host}:80:{}", topo.node_ip);
    let out = topo.exec(
        &topo.client,
        &[
            "curl",
            "-s",
            "-f",
            "--connect-timeout",
            "1",
            "--max-time",
            "2",
            "--resolve",
            &resolve,
            &url,
        ],
    );
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    })
}

/// The API server goes away long enough for a client-go-like backoff to reach half a minute;
/// the rules keep serving meanwhile; changes made while it was away (an EndpointSlice and an
/// Ingress) reach the kernel and the Ingress proxy within seconds of its return.
fn api_outage(mode: &'static str) {
    let docs = [node_yaml(), svc("web", WEB_IP), slice("web", &[0]), ingress("a.test")];
    let api = Api::new(mode, &docs, &[]);
    let mut kproxy = Kproxy::start_with_env(&api.topo, &api.args, None, &[]);
    kproxy.wait_sync_after(0);
    let client = api.topo.pods[2].ns.clone();
    eventually_answers(&api.topo, &client, WEB_IP, &["pod-a"]);
    eventually("the Ingress answers a.test", || {
        (through_ingress(&api.topo, "a.test")? == "pod-a").then_some(())
    });

    api.server.set_down(true);
    let down_at = Instant::now();
    api.apply(&slice("web", &[1]));
    api.apply(&ingress("b.test"));
    // The kernel keeps serving the last rules while the API is away.
    while down_at.elapsed() < OUTAGE {
        assert_eq!(
            answer(&api.topo, &client, WEB_IP).as_deref(),
            Some("pod-a"),
            "served during the outage"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    kproxy.assert_running();

    api.server.set_down(false);
    let back_at = Instant::now();
    let mut kernel = None;
    let mut proxy = None;
    while (kernel.is_none() || proxy.is_none()) && back_at.elapsed() < 2 * RETURN_LIMIT {
        if kernel.is_none() && answer(&api.topo, &client, WEB_IP).as_deref() == Some("pod-b") {
            kernel = Some(back_at.elapsed());
        }
        // b.test's backend is web, whose endpoint moved to pod-b in the same outage: which pod
        // answers depends on which of the two relists the proxy saw first.
        if proxy.is_none() && matches!(through_ingress(&api.topo, "b.test").as_deref(), Some("pod-a" | "pod-b")) {
            proxy = Some(back_at.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("api outage {OUTAGE:?}: EndpointSlice change in the kernel {kernel:?}, Ingress change in the proxy {proxy:?} after the API's return");
    for (what, took) in [
        ("EndpointSlice change in the kernel", kernel),
        ("Ingress change in the proxy", proxy),
    ] {
        let took = took.unwrap_or_else(|| panic!("{what}: not followed after the API's return\n{}", kproxy.log_text()));
        assert!(
            took < RETURN_LIMIT,
            "{what} {took:?} after the API's return (limit {RETURN_LIMIT:?})\n{}",
            kproxy.log_text()
        );
    }
    eventually_answers(&api.topo, &client, WEB_IP, &["pod-b"]);
    kproxy.assert_running();
}

/// kproxy started while the API server is down never syncs: `/healthz` (and `/livez`) answer
/// 200 while it starts up, 503 once twice the sync period has passed, and 200 again after the
/// first sync once the API is back.
fn healthz_before_first_sync(mode: &'static str) {
    let docs = [node_yaml(), svc("web", WEB_IP), slice("web", &[0])];
    let api = Api::new(mode, &docs, &["--sync-period", "2s"]);
    api.server.set_down(true);
    let mut kproxy = Kproxy::start_with_env(&api.topo, &api.args, None, &[]);
    let (code, body) = eventually("/healthz answers 503", || {
        kproxy.assert_running();
        let (code, body) = healthz(&api.topo);
        (code == 503).then_some((code, body))
    });
    assert_eq!(code, 503);
    assert_eq!(body["healthy"], false, "{body}");
    assert_eq!(body["status"]["IPv4"]["healthy"], false, "{body}");
    assert_eq!(kproxy.syncs(), 0, "never synced");

    api.server.set_down(false);
    kproxy.wait_sync_after(0);
    eventually("/healthz answers 200 after the first sync", || {
        let (code, body) = healthz(&api.topo);
        (code == 200 && body["healthy"] == true).then_some(())
    });
    eventually_answers(&api.topo, &api.topo.pods[2].ns, WEB_IP, &["pod-a"]);
}

/// The fake API server's down switch itself: refused while down, served again when up, on
/// the same address.
pub fn fake_api_goes_down_and_comes_back() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind an explicit port");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let server = runtime
        .block_on(FakeApiServer::start_on(listener))
        .expect("fake API server");
    let get = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    assert!(get().expect("up").starts_with("HTTP/1.1 200"));
    server.set_down(true);
    eventually("connections refused", || {
        get()
            .err()
            .filter(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    });
    server.set_down(false);
    let reply = eventually("served again", || get().ok());
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}
