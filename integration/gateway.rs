//! Gateway API scenarios, modelled on the Gateway API conformance suite's core HTTP tests: the
//! real kproxy binary in the node namespace, real backends in pod namespaces, real clients
//! outside, from manifest files and from the fake API server (with the Standard channel's
//! CRDs of v1.6.1 installed, as a cluster would have them). Each asserts the backend reached,
//! the headers it saw, and, from the API, the statuses kproxy wrote.
//!
//! This binary's `__gwecho NAME PORT [LOG]` mode is the backend (the suite's echo server):
//! it answers `NAME METHOD TARGET` and then every request header as `name: value`, waits
//! `/delay/MS` milliseconds first, and appends `METHOD TARGET host` to LOG for each request.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{deadline, eventually};
use crate::scenarios::{Env, SourceKind};

pub type Scenario = fn(SourceKind);

/// Scenarios run for both sources of desired state.
pub const ALL: &[(&str, Scenario)] = &[
    (
        "gateway_core_routing_namespaces_grants_hostnames_matching",
        core_routing,
    ),
    ("gateway_filters_redirects_rewrites_weights_mirrors_timeouts", filters),
    ("gateway_https_listeners_certificates_and_reference_grants", https),
    ("gateway_route_changes_under_load_drop_nothing", changes_under_load),
];

/// Scenarios that need the API source.
pub const API_ONLY: &[(&str, fn())] = &[
    ("gateway_statuses_as_conformance_checks_them", statuses),
    ("gateway_missing_crds_are_waited_for", missing_crds),
];

/// Scenarios that need the manifest source.
pub const MANIFESTS_ONLY: &[(&str, fn())] = &[("gateway_bad_routes_are_reported_and_others_serve", bad_routes)];

const NODE: &str = "192.0.2.1";
const BACKEND_PORT: u16 = 3000;
const INFRA: &str = "gateway-conformance-infra";
const WEB: &str = "gateway-conformance-web-backend";
const V1: &str = "gateway.networking.k8s.io/v1";

fn crd_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/integration/crds/gateway-api-v1.6.1"
    ))
}

// ---------------------------------------------------------------- the backend

/// `__gwecho NAME PORT [LOG]`: see the module doc.
pub fn serve_echo(name: &str, port: u16, log: Option<&str>) -> ! {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let name = name.to_string();
    let log = log.map(str::to_string);
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await.expect("bind");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (name, log) = (name.clone(), log.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let (name, log) = (name.clone(), log.clone());
                    async move {
                        let target = req.uri().path_and_query().map_or("/".to_string(), |p| p.to_string());
                        if req.headers().contains_key("upgrade") {
                            // A WebSocket-style upgrade: 101, then every byte echoed; the 101
                            // says which pod and what X-Header-Set the backend saw.
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(up) = on.await {
                                    let mut io = TokioIo::new(up);
                                    let (mut r, mut w) = tokio::io::split(&mut io);
                                    let _ = tokio::io::copy(&mut r, &mut w).await;
                                }
                            });
                            let seen = req.headers().get("x-header-set").cloned();
                            let mut resp = Response::builder()
                                .status(hyper::StatusCode::SWITCHING_PROTOCOLS)
                                .header("upgrade", "websocket")
                                .header("connection", "Upgrade")
                                .header("x-pod", name.as_str());
                            if let Some(v) = seen {
                                resp = resp.header("x-seen-header-set", v);
                            }
                            return Ok(resp.body(Full::new(bytes::Bytes::new())).expect("101"));
                        }
                        let host = req
                            .headers()
                            .get("host")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        if let Some(log) = &log {
                            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
                                let _ = writeln!(f, "{} {target} {host}", req.method());
                            }
                        }
                        if let Some(ms) = target
                            .split("/delay/")
                            .nth(1)
                            .and_then(|s| s.split(['/', '?']).next()?.parse::<u64>().ok())
                        {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                        }
                        let mut text = format!("{name} {} {target}\n", req.method());
                        let mut headers: Vec<String> = req
                            .headers()
                            .iter()
                            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                            .collect();
                        headers.sort();
                        for h in headers {
                            text.push_str(&h);
                            text.push('\n');
                        }
                        let _ = req.into_body().collect().await;
                        Ok::<_, hyper::Error>(Response::new(Full::new(bytes::Bytes::from(text))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    std::process::exit(1)
}

/// Backend processes, stopped on drop.
struct Backends(Vec<std::process::Child>);

impl Drop for Backends {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One echo backend per pod (named after it); `logs[i]` for pod i, if given.
#[must_use]
fn start_backends(env: &Env, logs: &[Option<PathBuf>]) -> Backends {
    let exe = std::env::current_exe().expect("test binary");
    let mut children = Vec::new();
    for (i, pod) in env.topo.pods.iter().enumerate() {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &pod.ns])
            .arg(&exe)
            .args(["__gwecho", &pod.name, &BACKEND_PORT.to_string()]);
        if let Some(Some(log)) = logs.get(i) {
            cmd.arg(log);
        }
        children.push(
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("start backend"),
        );
        let url = format!("http://{}:{BACKEND_PORT}/", pod.ip);
        eventually(&format!("backend in {} up", pod.name), || {
            let out = env.topo.exec(&pod.ns, &["curl", "-s", "--max-time", "1", &url]);
            out.status.success().then_some(())
        });
    }
    Backends(children)
}

// ---------------------------------------------------------------- objects

fn node_doc() -> String {
    "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\nstatus: {addresses: [{type: InternalIP, address: 192.0.2.1}]}".into()
}

/// A Service `name` in `ns` with port 8080 to target port 3000 of pod `pod` (0-based).
fn service_docs(ns: &str, name: &str, ip: u8, pod: usize) -> [String; 2] {
    [
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{clusterIP: 10.96.1.{ip}, ports: [{{port: 8080, targetPort: 3000}}]}}"),
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-x1, namespace: {ns}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: '', port: 3000, protocol: TCP}}]\nendpoints: [{{addresses: [10.244.{}.2], nodeName: node-1, conditions: {{ready: true}}}}]",
            pod + 1
        ),
    ]
}

/// The Node, the namespaces, the backends of the suite (infra-backend-v1..v3 on pods a..c,
/// web-backend and web-other on pod c), and kproxy's GatewayClass.
fn base_docs() -> Vec<String> {
    let mut docs = vec![
        node_doc(),
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {INFRA}, labels: {{gateway-conformance: infra}}}}"),
        format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {WEB}, labels: {{gateway-conformance: backend}}}}"),
    ];
    for (ns, name, ip, pod) in [
        (INFRA, "infra-backend-v1", 11, 0),
        (INFRA, "infra-backend-v2", 12, 1),
        (INFRA, "infra-backend-v3", 13, 2),
        (WEB, "web-backend", 14, 2),
        (WEB, "web-other", 15, 2),
        ("default", "ingress-svc", 16, 0),
    ] {
        docs.extend(service_docs(ns, name, ip, pod));
    }
    docs
}

fn gateway_class() -> String {
    format!("apiVersion: {V1}\nkind: GatewayClass\nmetadata: {{name: kproxy}}\nspec: {{controllerName: kproxy.io/gateway-controller}}")
}

fn gateway(name: &str, listeners: &str) -> String {
    format!("apiVersion: {V1}\nkind: Gateway\nmetadata: {{name: {name}, namespace: {INFRA}}}\nspec: {{gatewayClassName: kproxy, listeners: [{listeners}]}}")
}

fn route(name: &str, ns: &str, spec: &str) -> String {
    format!("apiVersion: {V1}\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}")
}

fn backend(name: &str) -> String {
    format!("{{name: {name}, port: 8080}}")
}

/// A self-signed certificate for `hosts`: (certificate PEM, key PEM).
fn certificate(hosts: &[&str]) -> (String, String) {
    let c = rcgen::generate_simple_self_signed(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>()).expect("cert");
    (c.cert.pem(), c.key_pair.serialize_pem())
}

fn b64(data: &str) -> String {
    serde_json::to_value(k8s_openapi::ByteString(data.as_bytes().to_vec()))
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .expect("base64")
}

fn secret_doc(ns: &str, name: &str, cert: &str, key: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\ntype: kubernetes.io/tls\ndata: {{tls.crt: {}, tls.key: {}}}",
        b64(cert),
        b64(key)
    )
}

/// kproxy with the base objects; then, from the API, the CRDs installed; then `docs`.
fn env_with(kind: SourceKind, docs: &[String], extra: &[&str]) -> Env {
    let mut args = vec!["--ingress-access-log"];
    args.extend(extra);
    let mut env = Env::new("iptables", kind, &base_docs(), &args);
    if let Some(api) = env.api() {
        let n = api.install_crds(&crd_dir()).expect("install CRDs");
        assert_eq!(n, 4, "the four Standard CRDs kproxy reads");
    }
    let mut all = base_docs();
    all.extend(docs.iter().cloned());
    env.set(&all);
    env
}

// ---------------------------------------------------------------- clients

/// A response as curl saw it.
#[derive(Debug, Clone)]
struct Reply {
    code: u16,
    headers: String,
    body: String,
}

impl Reply {
    /// The pod that answered (the first word of the echo), or the status code otherwise.
    fn pod(&self) -> String {
        if self.code == 200 {
            self.body.split_whitespace().next().unwrap_or_default().to_string()
        } else {
            self.code.to_string()
        }
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
    /// A header the backend saw (lowercase name), from the echo.
    fn seen(&self, name: &str) -> Option<String> {
        self.body
            .lines()
            .skip(1)
            .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
    }
}

fn curl(env: &Env, args: &[&str]) -> Result<Reply, i32> {
    let dir = std::env::temp_dir().join(format!("{}-gw-curl-headers-{}", env.topo.id, std::process::id()));
    let head = dir.display().to_string();
    let mut full = vec!["curl", "-s", "--connect-timeout", "3", "--max-time", "20", "-D", &head];
    full.extend(args);
    let out = env.topo.exec(&env.topo.client, &full);
    let headers = std::fs::read_to_string(&dir).unwrap_or_default();
    let _ = std::fs::remove_file(&dir);
    if !out.status.success() {
        return Err(out.status.code().unwrap_or(-1));
    }
    let last = headers
        .rsplit("\r\n\r\n")
        .find(|b| !b.trim().is_empty())
        .unwrap_or_default()
        .to_string();
    let code = last
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok(Reply {
        code,
        headers: last,
        body: String::from_utf8_lossy(&out.stdout).to_string(),
    })
}

/// `GET http://HOST:PORT/PATH` to the node with extra curl arguments (`-H`, `-X`).
fn request(env: &Env, host: &str, port: u16, path: &str, extra: &[&str]) -> Reply {
    let url = format!("http://{host}:{port}{path}");
    let resolve = format!("{}:{port}:{NODE}", host.split(':').next().unwrap_or(host));
    let mut args = vec!["--resolve", resolve.as_str()];
    args.extend(extra);
    args.push(&url);
    curl(env, &args).unwrap_or_else(|c| panic!("GET {url}: curl exit {c}\n{}", env.kproxy.log_text()))
}

fn get(env: &Env, host: &str, port: u16, path: &str) -> Reply {
    request(env, host, port, path, &[])
}

/// Waits until `host:port/path` is answered by `want` (a pod name or a status code).
fn wait_for(env: &Env, host: &str, port: u16, path: &str, want: &str) -> Reply {
    let mut last = None;
    let start = Instant::now();
    loop {
        let url = format!("http://{host}:{port}{path}");
        let resolve = format!("{host}:{port}:{NODE}");
        if let Ok(r) = curl(env, &["--resolve", &resolve, &url]) {
            if r.pod() == want {
                return r;
            }
            last = Some(r);
        }
        assert!(
            start.elapsed() < deadline(),
            "{url}: never answered by {want}; last {last:?}\n{}",
            env.kproxy.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts what each `(host, path, want)` gets on `port`.
fn expect_all(env: &Env, port: u16, cases: &[(&str, &str, &str)]) {
    for (host, path, want) in cases {
        let r = get(env, host, port, path);
        assert_eq!(r.pod(), *want, "http://{host}:{port}{path}: {r:?}");
    }
}

/// Which pods answered `n` requests (one curl, one connection).
fn spread(env: &Env, host: &str, n: usize) -> BTreeMap<String, usize> {
    let url = format!("http://{host}/");
    let resolve = format!("{host}:80:{NODE}");
    let mut args = vec!["-s", "--resolve", resolve.as_str()];
    for _ in 0..n {
        args.push(&url);
    }
    let mut full = vec!["curl"];
    full.extend(args);
    let out = env.topo.exec(&env.topo.client, &full);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut seen = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("pod-")) {
        *seen
            .entry(line.split_whitespace().next().unwrap_or_default().to_string())
            .or_insert(0) += 1;
    }
    seen
}

// ---------------------------------------------------------------- scenarios

/// HTTPRouteSimpleSameNamespace, HTTPRouteCrossNamespace, HTTPRouteReferenceGrant,
/// HTTPRouteInvalidCrossNamespaceBackendRef, HTTPRouteHostnameIntersection,
/// HTTPRouteListenerHostnameMatching, HTTPRouteHeaderMatching, HTTPRouteExactPathMatching,
/// HTTPRouteMatchingAcrossRoutes, HTTPRouteQueryParamMatching, HTTPRouteMethodMatching; an
/// Ingress on the shared port 80 keeps its host.
fn core_routing(kind: SourceKind) {
    let intersection = |name: &str, hosts: &str, prefix: &str, backend_name: &str| {
        route(
            name,
            INFRA,
            &format!("{{parentRefs: [{{name: httproute-hostname-intersection}}], hostnames: [{hosts}], rules: [{{matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}], backendRefs: [{}]}}]}}", backend(backend_name)),
        )
    };
    let by_section = |name: &str, section: &str, backend_name: &str| {
        route(
            name,
            INFRA,
            &format!("{{parentRefs: [{{name: httproute-listener-hostname-matching, sectionName: {section}}}], rules: [{{backendRefs: [{}]}}]}}", backend(backend_name)),
        )
    };
    let docs = vec![
        gateway_class(),
        gateway("same-namespace", "{name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}}"),
        gateway("backend-namespaces", "{name: http, port: 80, protocol: HTTP, hostname: web.test, allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {gateway-conformance: backend}}}}}"),
        gateway("httproute-hostname-intersection", "{name: listener-1, port: 8080, protocol: HTTP, hostname: very.specific.com}, {name: listener-2, port: 8080, protocol: HTTP, hostname: '*.wildcard.io'}, {name: listener-3, port: 8080, protocol: HTTP, hostname: '*.anotherwildcard.io'}"),
        gateway("httproute-listener-hostname-matching", "{name: listener-1, port: 8081, protocol: HTTP, hostname: bar.com}, {name: listener-2, port: 8081, protocol: HTTP, hostname: foo.bar.com}, {name: listener-3, port: 8081, protocol: HTTP, hostname: '*.bar.com'}"),
        route("gateway-conformance-infra-test", INFRA, &format!("{{parentRefs: [{{name: same-namespace}}], rules: [{{backendRefs: [{}]}}]}}", backend("infra-backend-v1"))),
        route("cross-namespace", WEB, &format!("{{parentRefs: [{{name: backend-namespaces, namespace: {INFRA}}}], rules: [{{backendRefs: [{}]}}]}}", backend("web-backend"))),
        route("reference-grant", INFRA, &format!("{{parentRefs: [{{name: same-namespace}}], hostnames: [grant.test], rules: [{{backendRefs: [{{name: web-backend, namespace: {WEB}, port: 8080}}]}}]}}")),
        route("invalid-cross-namespace-backend-ref", INFRA, &format!("{{parentRefs: [{{name: same-namespace}}], hostnames: [nogrant.test], rules: [{{backendRefs: [{{name: web-other, namespace: {WEB}, port: 8080}}]}}]}}")),
        format!("apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: reference-grant, namespace: {WEB}}}\nspec: {{from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: {INFRA}}}], to: [{{group: '', kind: Service, name: web-backend}}]}}"),
        intersection("specific-host-matches-listener-specific-host", "non.matching.com, '*.nonmatchingwildcard.io', very.specific.com", "/s1", "infra-backend-v1"),
        intersection("specific-host-matches-listener-wildcard-host", "non.matching.com, wildcard.io, foo.wildcard.io, bar.wildcard.io, foo.bar.wildcard.io", "/s2", "infra-backend-v2"),
        intersection("wildcard-host-matches-listener-specific-host", "non.matching.com, '*.specific.com'", "/s3", "infra-backend-v3"),
        intersection("wildcard-host-matches-listener-wildcard-host", "'*.anotherwildcard.io'", "/s4", "infra-backend-v1"),
        by_section("backend-v1", "listener-1", "infra-backend-v1"),
        by_section("backend-v2", "listener-2", "infra-backend-v2"),
        by_section("backend-v3", "listener-3", "infra-backend-v3"),
        route("matching", INFRA, &format!(
            "{{parentRefs: [{{name: same-namespace}}], hostnames: [match.test], rules: [{{matches: [{{headers: [{{name: version, value: one}}]}}], backendRefs: [{v1}]}}, {{matches: [{{headers: [{{name: version, value: two}}, {{name: color, value: orange}}]}}], backendRefs: [{v2}]}}, {{matches: [{{path: {{type: Exact, value: /exact}}}}], backendRefs: [{v2}]}}, {{matches: [{{path: {{type: PathPrefix, value: /prefix}}}}], backendRefs: [{v3}]}}, {{matches: [{{queryParams: [{{name: animal, value: whale}}]}}], backendRefs: [{v2}]}}, {{matches: [{{path: {{value: /method}}, method: POST}}], backendRefs: [{v3}]}}]}}",
            v1 = backend("infra-backend-v1"), v2 = backend("infra-backend-v2"), v3 = backend("infra-backend-v3"))),
        route("matching-across-routes", INFRA, &format!("{{parentRefs: [{{name: same-namespace}}], hostnames: [match.test], rules: [{{matches: [{{path: {{type: PathPrefix, value: /prefix/deeper}}}}], backendRefs: [{}]}}]}}", backend("infra-backend-v1"))),
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: legacy, namespace: default}\nspec: {ingressClassName: kproxy, rules: [{host: ingress.test, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: ingress-svc, port: {number: 8080}}}}]}}]}".to_string(),
    ];
    let env = env_with(kind, &docs, &[]);
    let _backends = start_backends(&env, &[]);
    wait_for(&env, "simple.test", 80, "/", "pod-a");
    wait_for(&env, "very.specific.com", 8080, "/s1", "pod-a");
    wait_for(&env, "bar.com", 8081, "/", "pod-a");
    // The CRDs were installed after kproxy started: each kind's watcher finds its CRD on its
    // own retry, so a ReferenceGrant may be listed a few seconds after the routes it allows.
    wait_for(&env, "grant.test", 80, "/", "pod-c");

    // HTTPRouteSimpleSameNamespace: the backend sees the request as the client sent it.
    let r = get(&env, "simple.test", 80, "/some/path?q=1");
    assert!(r.body.starts_with("pod-a GET /some/path?q=1\n"), "{r:?}");
    assert!(r.seen("host").is_some_and(|h| h.starts_with("simple.test")), "{r:?}");
    assert_eq!(r.seen("x-forwarded-for").as_deref(), Some("192.0.2.100"));
    assert_eq!(r.seen("x-forwarded-proto").as_deref(), Some("http"));
    expect_all(
        &env,
        80,
        &[
            // HTTPRouteCrossNamespace (allowedRoutes Selector) and HTTPRouteReferenceGrant.
            ("web.test", "/", "pod-c"),
            ("grant.test", "/", "pod-c"),
            // HTTPRouteInvalidCrossNamespaceBackendRef: no ReferenceGrant for web-other.
            ("nogrant.test", "/", "500"),
            // The Ingress keeps its exact host on the shared port; the catch-all listener
            // takes the rest.
            ("ingress.test", "/", "pod-a"),
            // HTTPRouteHeaderMatching, HTTPRouteExactPathMatching, HTTPRouteMatchingAcrossRoutes.
            ("match.test", "/exact", "pod-b"),
            ("match.test", "/exact/no", "404"),
            ("match.test", "/prefix/x", "pod-c"),
            ("match.test", "/prefix/deeper/x", "pod-a"),
            ("match.test", "/prefixes", "404"),
            // HTTPRouteQueryParamMatching.
            ("match.test", "/?animal=whale", "pod-b"),
            ("match.test", "/?animal=dolphin", "404"),
        ],
    );
    let with = |path: &str, extra: &[&str]| request(&env, "match.test", 80, path, extra).pod();
    assert_eq!(with("/", &["-H", "version: one"]), "pod-a");
    assert_eq!(with("/", &["-H", "version: two"]), "404", "both headers are needed");
    assert_eq!(with("/", &["-H", "version: two", "-H", "color: orange"]), "pod-b");
    // HTTPRouteMethodMatching.
    assert_eq!(with("/method", &["-X", "POST"]), "pod-c");
    assert_eq!(with("/method", &["-X", "GET"]), "404");

    // HTTPRouteHostnameIntersection, on a port of its own (bound for the Gateway).
    expect_all(
        &env,
        8080,
        &[
            ("very.specific.com", "/s1", "pod-a"),
            ("non.matching.com", "/s1", "404"),
            ("foo.nonmatchingwildcard.io", "/s1", "404"),
            ("foo.wildcard.io", "/s1", "404"),
            ("very.specific.com", "/non-matching-prefix", "404"),
            ("foo.wildcard.io", "/s2", "pod-b"),
            ("foo.bar.wildcard.io", "/s2", "pod-b"),
            ("wildcard.io", "/s2", "404"),
            ("very.specific.com", "/s3", "pod-c"),
            ("foo.specific.com", "/s3", "404"),
            ("foo.anotherwildcard.io", "/s4", "pod-a"),
            ("foo.bar.anotherwildcard.io", "/s4", "pod-a"),
            ("anotherwildcard.io", "/s4", "404"),
            // Only the Gateway's routes are on this port, never the Ingress ones.
            ("ingress.test", "/", "404"),
        ],
    );
    // HTTPRouteListenerHostnameMatching: the most specific listener, and only its routes.
    expect_all(
        &env,
        8081,
        &[
            ("bar.com", "/", "pod-a"),
            ("foo.bar.com", "/", "pod-b"),
            ("baz.bar.com", "/", "pod-c"),
            ("boo.bar.com", "/", "pod-c"),
            ("multiple.prefixes.bar.com", "/", "pod-c"),
            ("multiple.prefixes.foo.bar.com", "/", "pod-c"),
            ("foo.com", "/", "404"),
        ],
    );
    let m = env
        .kproxy
        .metric("kproxy_ingress_requests_total{code=\"200\",ingress=\"httproute/gateway-conformance-infra/gateway-conformance-infra-test\",service=\"gateway-conformance-infra/infra-backend-v1\"}");
    assert!(m.unwrap_or(0.0) >= 1.0, "Gateway requests are counted by route: {m:?}");
}

/// HTTPRouteRequestHeaderModifier, HTTPRouteResponseHeaderModifier, HTTPRouteRedirect*,
/// HTTPRouteRewriteHost, HTTPRouteRewritePath, HTTPRouteWeight, HTTPRouteRequestMirror,
/// HTTPRouteTimeoutRequest, HTTPRouteTimeoutBackendRequest.
fn filters(kind: SourceKind) {
    let mirror_log = std::env::temp_dir().join(format!("kproxy-gw-mirror-{}-{}.log", std::process::id(), kind.name()));
    let _ = std::fs::remove_file(&mirror_log);
    let (v1, v2, v3) = (
        backend("infra-backend-v1"),
        backend("infra-backend-v2"),
        backend("infra-backend-v3"),
    );
    let redirect = |path: &str, filter: &str| {
        format!("{{matches: [{{path: {{type: PathPrefix, value: {path}}}}}], filters: [{{type: RequestRedirect, requestRedirect: {filter}}}]}}")
    };
    let docs = vec![
        gateway_class(),
        gateway("same-namespace", "{name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}}"),
        route("request-header-modifier", INFRA, &format!(
            "{{parentRefs: [{{name: same-namespace}}], hostnames: [headers.test], rules: [{{filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: X-Header-Set, value: set-overwrites-values}}], add: [{{name: X-Header-Add, value: add-appends-values}}], remove: [X-Header-Remove]}}}}, {{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: X-Header-Set, value: set-overwrites-values}}], add: [{{name: X-Header-Add, value: add-appends-values}}]}}}}], backendRefs: [{v1}]}}]}}")),
        route("redirect", INFRA, &format!(
            "{{parentRefs: [{{name: same-namespace}}], hostnames: [redirect.test], rules: [{}, {}, {}, {}, {}, {}]}}",
            redirect("/hostname-redirect", "{hostname: example.org}"),
            redirect("/status-code-301", "{statusCode: 301}"),
            redirect("/scheme-redirect", "{scheme: https}"),
            redirect("/port-redirect", "{port: 8083}"),
            redirect("/prefix-redirect", "{path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}"),
            redirect("/full-redirect", "{path: {type: ReplaceFullPath, replaceFullPath: /full-path-replacement}}"),
        )),
        route("rewrite", INFRA, &format!(
            "{{parentRefs: [{{name: same-namespace}}], hostnames: [rewrite.test], rules: [{{matches: [{{path: {{value: /prefix/one}}}}], filters: [{{type: URLRewrite, urlRewrite: {{hostname: rewritten.test, path: {{type: ReplacePrefixMatch, replacePrefixMatch: /one}}}}}}], backendRefs: [{v1}]}}, {{matches: [{{path: {{value: /full/one}}}}], filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplaceFullPath, replaceFullPath: /one}}}}}}], backendRefs: [{v2}]}}]}}")),
        route("weighted-backends", INFRA, "{parentRefs: [{name: same-namespace}], hostnames: [weight.test], rules: [{backendRefs: [{name: infra-backend-v1, port: 8080, weight: 70}, {name: infra-backend-v2, port: 8080, weight: 30}, {name: infra-backend-v3, port: 8080, weight: 0}]}]}"),
        route("zero-weights", INFRA, "{parentRefs: [{name: same-namespace}], hostnames: [zero.test], rules: [{backendRefs: [{name: infra-backend-v1, port: 8080, weight: 0}]}]}"),
        route("request-mirror", INFRA, &format!(
            "{{parentRefs: [{{name: same-namespace}}], hostnames: [mirror.test], rules: [{{filters: [{{type: RequestMirror, requestMirror: {{backendRef: {v2}}}}}], backendRefs: [{v1}]}}]}}")),
        route("timeouts", INFRA, &format!(
            "{{parentRefs: [{{name: same-namespace}}], hostnames: [timeout.test], rules: [{{matches: [{{path: {{value: /request}}}}], timeouts: {{request: 500ms}}, backendRefs: [{v3}]}}, {{matches: [{{path: {{value: /backend}}}}], timeouts: {{backendRequest: 500ms}}, backendRefs: [{v3}]}}]}}")),
    ];
    let env = env_with(kind, &docs, &[]);
    let _backends = start_backends(&env, &[None, Some(mirror_log.clone()), None]);
    for (host, path, want) in [
        ("headers.test", "/", "pod-a"),
        ("redirect.test", "/hostname-redirect", "302"),
        ("rewrite.test", "/prefix/one/two?q=1", "pod-a"),
        ("mirror.test", "/", "pod-a"),
        ("timeout.test", "/request", "pod-c"),
    ] {
        wait_for(&env, host, 80, path, want);
    }
    wait_for(&env, "weight.test", 80, "/", "pod-a");
    let seen = spread(&env, "weight.test", 200);
    assert_eq!(seen.values().sum::<usize>(), 200, "{seen:?}");
    assert!(!seen.contains_key("pod-c"), "weight 0 gets nothing: {seen:?}");
    assert!((110..170).contains(&seen["pod-a"]), "about 70 %: {seen:?}");
    assert_eq!(get(&env, "zero.test", 80, "/").code, 500, "every weight 0: 500");

    // The same filters over HTTP/1.1 (the hand-written path) and HTTP/2 (hyper's).
    let get = |env: &Env, host: &str, port: u16, path: &str, proto: &str| request(env, host, port, path, &[proto]);
    for proto in ["--http1.1", "--http2-prior-knowledge"] {
        let r = request(
            &env,
            "headers.test",
            80,
            "/",
            &[
                proto,
                "-H",
                "X-Header-Set: some-other-value",
                "-H",
                "X-Header-Add: some-value",
                "-H",
                "X-Header-Remove: gone",
            ],
        );
        assert_eq!(
            r.seen("x-header-set").as_deref(),
            Some("set-overwrites-values"),
            "{r:?}"
        );
        assert_eq!(
            r.seen("x-header-add").as_deref(),
            Some("some-value,add-appends-values"),
            "{r:?}"
        );
        assert_eq!(r.seen("x-header-remove"), None, "{r:?}");
        assert_eq!(
            r.header("x-header-set").as_deref(),
            Some("set-overwrites-values"),
            "response: {r:?}"
        );
        assert_eq!(
            r.header("x-header-add").as_deref(),
            Some("add-appends-values"),
            "response: {r:?}"
        );

        for (path, code, location) in [
            ("/hostname-redirect", 302, "http://example.org/hostname-redirect"),
            ("/status-code-301", 301, "http://redirect.test/status-code-301"),
            ("/scheme-redirect?a=b", 302, "https://redirect.test/scheme-redirect?a=b"),
            ("/port-redirect", 302, "http://redirect.test:8083/port-redirect"),
            (
                "/prefix-redirect/one",
                302,
                "http://redirect.test/replacement-prefix/one",
            ),
            ("/full-redirect/x", 302, "http://redirect.test/full-path-replacement"),
        ] {
            let r = get(&env, "redirect.test", 80, path, proto);
            assert_eq!(
                (r.code, r.header("location").as_deref()),
                (code, Some(location)),
                "{proto} {path}: {r:?}"
            );
        }

        let r = get(&env, "rewrite.test", 80, "/prefix/one/two?q=1", proto);
        assert!(r.body.starts_with("pod-a GET /one/two?q=1\n"), "{r:?}");
        assert_eq!(r.seen("host").as_deref(), Some("rewritten.test"), "{r:?}");
        assert_eq!(r.seen("x-forwarded-host").as_deref(), Some("rewrite.test"), "{r:?}");
        let r = get(&env, "rewrite.test", 80, "/full/one/deep", proto);
        assert!(r.body.starts_with("pod-b GET /one\n"), "{r:?}");

        let mirrored = format!("/mirrored{proto}?x=1");
        let r = get(&env, "mirror.test", 80, &mirrored, proto);
        assert_eq!(r.pod(), "pod-a");
        eventually("the mirror backend received the copy", || {
            let log = std::fs::read_to_string(&mirror_log).unwrap_or_default();
            log.lines()
                .any(|l| l.starts_with(&format!("GET {mirrored} mirror.test")))
                .then_some(())
        });

        assert_eq!(
            get(&env, "timeout.test", 80, "/request/delay/2000", proto).code,
            504,
            "request timeout"
        );
        assert_eq!(
            get(&env, "timeout.test", 80, "/backend/delay/2000", proto).code,
            504,
            "backendRequest timeout"
        );
        assert_eq!(get(&env, "timeout.test", 80, "/backend/delay/10", proto).pod(), "pod-c");
    }

    // A WebSocket upgrade through a Gateway rule (HTTP/1.1: kproxy does not offer HTTP/2's
    // extended CONNECT, so clients open WebSockets over HTTP/1.1): the rule's request header
    // edits reach the backend, and after the 101 the bytes are spliced both ways.
    let (head, echoed) = crate::ingress::websocket_echo(&env, "headers.test");
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("x-pod: pod-a\r\n"), "{head}");
    assert!(head.contains("x-seen-header-set: set-overwrites-values\r\n"), "{head}");
    assert_eq!(echoed, "hello websocket");
    let _ = std::fs::remove_file(&mirror_log);
}

/// HTTPRouteHTTPSListener and GatewaySecret*: HTTPS listeners on a port of their own and on
/// the Ingress HTTPS port, certificates by SNI, a cross-namespace certificate only with a
/// ReferenceGrant.
fn https(kind: SourceKind) {
    let (cert_s, key_s) = certificate(&["secure.test"]);
    let (cert_x, key_x) = certificate(&["cross.test"]);
    let (cert_n, key_n) = certificate(&["nogrant.test"]);
    let (cert_4, key_4) = certificate(&["gw443.test"]);
    let docs = vec![
        gateway_class(),
        secret_doc(INFRA, "secure-cert", &cert_s, &key_s),
        secret_doc(WEB, "cross-cert", &cert_x, &key_x),
        secret_doc(WEB, "nogrant-cert", &cert_n, &key_n),
        secret_doc(INFRA, "gw443-cert", &cert_4, &key_4),
        gateway(
            "https-gateway",
            &format!("{{name: secure, port: 8443, protocol: HTTPS, hostname: secure.test, tls: {{certificateRefs: [{{name: secure-cert}}]}}}}, {{name: cross, port: 8443, protocol: HTTPS, hostname: cross.test, tls: {{certificateRefs: [{{name: cross-cert, namespace: {WEB}}}]}}}}, {{name: nogrant, port: 8443, protocol: HTTPS, hostname: nogrant.test, tls: {{certificateRefs: [{{name: nogrant-cert, namespace: {WEB}}}]}}}}"),
        ),
        gateway("shared-443", "{name: https, port: 443, protocol: HTTPS, hostname: gw443.test, tls: {certificateRefs: [{name: gw443-cert}]}}"),
        format!("apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {{name: reference-grant-specific, namespace: {WEB}}}\nspec: {{from: [{{group: gateway.networking.k8s.io, kind: Gateway, namespace: {INFRA}}}], to: [{{group: '', kind: Secret, name: cross-cert}}]}}"),
        route("https-route", INFRA, &format!("{{parentRefs: [{{name: https-gateway}}, {{name: shared-443}}], rules: [{{backendRefs: [{}]}}]}}", backend("infra-backend-v1"))),
    ];
    let env = env_with(kind, &docs, &[]);
    let _backends = start_backends(&env, &[]);
    let pem = |name: &str, text: &str| {
        let p = std::env::temp_dir().join(format!("{}-gw-{name}.pem", env.topo.id));
        std::fs::write(&p, text).expect("write pem");
        p
    };
    let (ca_s, ca_x, ca_n, ca_4) = (
        pem("s", &cert_s),
        pem("x", &cert_x),
        pem("n", &cert_n),
        pem("4", &cert_4),
    );
    let tls_with = |host: &str, port: u16, ca: &PathBuf, proto: &str| {
        let resolve = format!("{host}:{port}:{NODE}");
        let url = format!("https://{host}:{port}/");
        curl(
            &env,
            &[
                "--resolve",
                &resolve,
                "--cacert",
                &ca.display().to_string(),
                proto,
                &url,
            ],
        )
    };
    let tls = |host: &str, port: u16, ca: &PathBuf| tls_with(host, port, ca, "--http1.1");
    let r = eventually("secure.test over HTTPS on 8443", || {
        tls("secure.test", 8443, &ca_s).ok().filter(|r| r.code == 200)
    });
    assert_eq!(r.pod(), "pod-a");
    assert_eq!(r.seen("x-forwarded-proto").as_deref(), Some("https"));
    let r = tls_with("secure.test", 8443, &ca_s, "--http2").expect("HTTP/2 over TLS on 8443");
    assert!(r.headers.starts_with("HTTP/2 200"), "ALPN h2: {r:?}");
    assert_eq!(r.pod(), "pod-a");
    assert!(
        tls("secure.test", 8443, &ca_x).is_err(),
        "each listener has its own certificate"
    );
    let r = eventually("cross.test, certificate granted by a ReferenceGrant", || {
        tls("cross.test", 8443, &ca_x).ok().filter(|r| r.code == 200)
    });
    assert_eq!(r.pod(), "pod-a");
    assert!(
        tls("nogrant.test", 8443, &ca_n).is_err(),
        "no ReferenceGrant: the Secret is not used"
    );
    let r = eventually("gw443.test on the Ingress HTTPS port", || {
        tls("gw443.test", 443, &ca_4).ok().filter(|r| r.code == 200)
    });
    assert_eq!(r.pod(), "pod-a");
    for p in [ca_s, ca_x, ca_n, ca_4] {
        let _ = std::fs::remove_file(p);
    }
}

/// Counts of a load run: answers by status code, and failed connections or requests.
#[derive(Debug, Default)]
struct Load {
    codes: BTreeMap<u16, u64>,
    errors: u64,
}

/// Keep-alive HTTP/1.1 load on `host` from the client namespace until `stop`: `conns`
/// connections, each sending one request after another; every answer and failure is counted.
fn load(env: &Env, host: &str, conns: usize, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Load> {
    let path = format!("/var/run/netns/{}", env.topo.client);
    let host = host.to_string();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let errors = Arc::new(AtomicU64::new(0));
        let codes = Arc::new(std::sync::Mutex::new(BTreeMap::<u16, u64>::new()));
        let workers: Vec<_> = (0..conns)
            .map(|_| {
                let (stop, errors, codes, host) = (stop.clone(), errors.clone(), codes.clone(), host.clone());
                // Threads created after setns are in the client namespace too.
                std::thread::spawn(move || {
                    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(stream) = TcpStream::connect((NODE, 80)) else {
                            errors.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        };
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut writer = stream.try_clone().expect("clone");
                        let mut reader = BufReader::new(stream);
                        while !stop.load(Ordering::Relaxed) {
                            match one_request(&mut writer, &mut reader, &request) {
                                Some(code) => *codes.lock().expect("codes").entry(code).or_insert(0) += 1,
                                None => {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
        let codes = codes.lock().expect("codes").clone();
        Load {
            codes,
            errors: errors.load(Ordering::Relaxed),
        }
    })
}

/// One request on a keep-alive connection; its status, or `None` if the connection failed.
fn one_request(writer: &mut TcpStream, reader: &mut BufReader<TcpStream>, request: &str) -> Option<u16> {
    writer.write_all(request.as_bytes()).ok()?;
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let code: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        if h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).ok()?;
    Some(code)
}

/// Zero-downtime route changes: under load on one route, other routes are added, changed and
/// removed, and a Gateway listener on a new port is added; no request of the loaded route
/// fails, and each change serves within a few seconds (the times are printed).
fn changes_under_load(kind: SourceKind) {
    let stable = route(
        "stable",
        INFRA,
        &format!(
            "{{parentRefs: [{{name: same-namespace}}], hostnames: [stable.test], rules: [{{backendRefs: [{}]}}]}}",
            backend("infra-backend-v1")
        ),
    );
    let fresh = |backend_name: &str| {
        route(
            "fresh",
            INFRA,
            &format!(
                "{{parentRefs: [{{name: same-namespace}}], hostnames: [fresh.test], rules: [{{backendRefs: [{}]}}]}}",
                backend(backend_name)
            ),
        )
    };
    let same_namespace = gateway(
        "same-namespace",
        "{name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}}",
    );
    let base = vec![gateway_class(), same_namespace.clone(), stable.clone()];
    let mut env = env_with(kind, &base, &[]);
    let _backends = start_backends(&env, &[]);
    wait_for(&env, "stable.test", 80, "/", "pod-a");

    let stop = Arc::new(AtomicBool::new(false));
    let running = load(&env, "stable.test", 4, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let all = base_docs();
    let timed = |env: &mut Env, what: &str, docs: Vec<String>, host: &str, port: u16, want: &str| {
        let mut set = all.clone();
        set.extend(docs);
        let start = Instant::now();
        env.set(&set);
        wait_for(env, host, port, "/", want);
        let took = start.elapsed();
        eprintln!(
            "gateway change under load ({}): {what}: served after {took:?}",
            kind.name()
        );
        assert!(took < Duration::from_secs(5), "{what} took {took:?}");
        took
    };
    timed(
        &mut env,
        "route added",
        vec![
            gateway_class(),
            same_namespace.clone(),
            stable.clone(),
            fresh("infra-backend-v2"),
        ],
        "fresh.test",
        80,
        "pod-b",
    );
    timed(
        &mut env,
        "route changed",
        vec![
            gateway_class(),
            same_namespace.clone(),
            stable.clone(),
            fresh("infra-backend-v3"),
        ],
        "fresh.test",
        80,
        "pod-c",
    );
    timed(
        &mut env,
        "route removed",
        vec![gateway_class(), same_namespace.clone(), stable.clone()],
        "fresh.test",
        80,
        "404",
    );
    let with_port = vec![
        gateway_class(),
        gateway("same-namespace", "{name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}}, {name: extra, port: 8090, protocol: HTTP}"),
        stable.clone(),
    ];
    timed(
        &mut env,
        "listener on a new port added",
        with_port,
        "stable.test",
        8090,
        "pod-a",
    );
    timed(&mut env, "listener removed", base.clone(), "stable.test", 80, "pod-a");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let result = running.join().expect("load");
    let served = result.codes.get(&200).copied().unwrap_or(0);
    eprintln!("gateway change under load ({}): {result:?}", kind.name());
    assert!(served > 100, "the load ran: {result:?}");
    assert_eq!(result.errors, 0, "no connection failed: {result:?}");
    assert_eq!(
        result.codes.len(),
        1,
        "every request of the loaded route answered 200: {result:?}"
    );
}

fn api_object(env: &Env, kind: &str, ns: Option<&str>, name: &str) -> Option<Value> {
    env.api()?.get(V1, kind, ns, name)
}

/// The conditions of kproxy's `status.parents` entry for `gateway`.
fn parent_conditions(env: &Env, route_name: &str, gateway_name: &str) -> Option<Vec<Value>> {
    let r = api_object(env, "HTTPRoute", Some(INFRA), route_name)?;
    let parents = r.pointer("/status/parents")?.as_array()?.clone();
    let ours = parents
        .into_iter()
        .find(|p| p["controllerName"] == "kproxy.io/gateway-controller" && p["parentRef"]["name"] == gateway_name)?;
    ours["conditions"].as_array().cloned()
}

fn has(conditions: &[Value], type_: &str, status: &str, reason: &str) -> bool {
    conditions
        .iter()
        .any(|c| c["type"] == type_ && c["status"] == status && c["reason"] == reason)
}

fn wait_condition(
    env: &Env,
    what: &str,
    f: impl Fn() -> Option<Vec<Value>>,
    type_: &str,
    status: &str,
    reason: &str,
) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let got = f();
        if let Some(c) = got.as_ref().filter(|c| has(c, type_, status, reason)) {
            return c.clone();
        }
        assert!(
            start.elapsed() < deadline(),
            "{what}: no {type_}={status} ({reason}); have {got:?}\n{}",
            env.kproxy.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn listener_status(env: &Env, gateway_name: &str, listener: &str) -> Option<Value> {
    let g = api_object(env, "Gateway", Some(INFRA), gateway_name)?;
    g.pointer("/status/listeners")?
        .as_array()?
        .iter()
        .find(|l| l["name"] == listener)
        .cloned()
}

/// The statuses the suite checks: GatewayClass Accepted; Gateway Accepted, Programmed and
/// addresses; listeners' conditions, supportedKinds and attachedRoutes (GatewayWithAttachedRoutes,
/// GatewayInvalidRouteKind, GatewayInvalidTLSConfiguration); HTTPRoute parents with the spec's
/// reasons (HTTPRouteInvalidNonExistentBackendRef, HTTPRouteInvalidBackendRefUnknownKind,
/// HTTPRouteInvalidCrossNamespaceParentRef, HTTPRouteInvalidParentRefNotMatchingSectionName,
/// HTTPRouteDisallowedKind, HTTPRouteHostnameIntersection); observedGeneration bumps
/// (HTTPRouteObservedGenerationBump, GatewayObservedGenerationBump); other controllers'
/// entries untouched; only the Lease holder writes.
fn statuses() {
    let docs = vec![
        gateway_class(),
        format!("apiVersion: {V1}\nkind: GatewayClass\nmetadata: {{name: other}}\nspec: {{controllerName: example.com/other}}"),
        gateway("same-namespace", "{name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}}"),
        gateway("gateway-only-invalid-route-kind", "{name: http, port: 8082, protocol: HTTP, allowedRoutes: {kinds: [{kind: InvalidRoute}]}}"),
        gateway("gateway-certificate-nonexistent-secret", "{name: https, port: 8443, protocol: HTTPS, hostname: missing.test, tls: {certificateRefs: [{name: nonexistent-certificate}]}}"),
        format!("apiVersion: {V1}\nkind: Gateway\nmetadata: {{name: theirs, namespace: {INFRA}}}\nspec: {{gatewayClassName: other, listeners: [{{name: http, port: 80, protocol: HTTP}}]}}"),
        route("valid", INFRA, &format!("{{parentRefs: [{{name: same-namespace}}], hostnames: [valid.test], rules: [{{backendRefs: [{}]}}]}}", backend("infra-backend-v1"))),
        route("nonexistent-backend", INFRA, "{parentRefs: [{name: same-namespace}], hostnames: [n.test], rules: [{backendRefs: [{name: nonexistent, port: 8080}]}]}"),
        route("unknown-kind", INFRA, "{parentRefs: [{name: same-namespace}], hostnames: [k.test], rules: [{backendRefs: [{group: unknown.example.com, kind: Widget, name: w, port: 8080}]}]}"),
        route("bad-section", INFRA, &format!("{{parentRefs: [{{name: same-namespace, sectionName: nope}}], rules: [{{backendRefs: [{}]}}]}}", backend("infra-backend-v1"))),
        route("disallowed-kind", INFRA, &format!("{{parentRefs: [{{name: gateway-only-invalid-route-kind}}], rules: [{{backendRefs: [{}]}}]}}", backend("infra-backend-v1"))),
        route("cross-namespace-parent", WEB, &format!("{{parentRefs: [{{name: same-namespace, namespace: {INFRA}}}], rules: [{{backendRefs: [{}]}}]}}", backend("web-backend"))),
        route("theirs-only", INFRA, &format!("{{parentRefs: [{{name: theirs}}], rules: [{{backendRefs: [{}]}}]}}", backend("infra-backend-v1"))),
    ];
    let mut env = env_with(SourceKind::Api, &docs, &["--ingress-status-address", "203.0.113.7"]);
    let _backends = start_backends(&env, &[]);
    wait_for(&env, "valid.test", 80, "/", "pod-a");

    let class = eventually("GatewayClass accepted", || {
        let c = api_object(&env, "GatewayClass", None, "kproxy")?;
        has(
            c.pointer("/status/conditions")?.as_array()?,
            "Accepted",
            "True",
            "Accepted",
        )
        .then_some(c)
    });
    assert_eq!(class["status"]["conditions"][0]["observedGeneration"], 1);
    let features: Vec<&str> = class["status"]["supportedFeatures"]
        .as_array()
        .expect("supportedFeatures")
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert!(
        features.contains(&"HTTPRoute") && features.contains(&"HTTPRouteQueryParamMatching"),
        "{features:?}"
    );
    let other = api_object(&env, "GatewayClass", None, "other").expect("other class");
    assert!(
        other.get("status").is_none(),
        "another controller's class is left alone: {other}"
    );

    let gw = eventually("Gateway Programmed", || {
        let g = api_object(&env, "Gateway", Some(INFRA), "same-namespace")?;
        let c = g.pointer("/status/conditions")?.as_array()?;
        (has(c, "Accepted", "True", "Accepted") && has(c, "Programmed", "True", "Programmed")).then_some(g)
    });
    assert_eq!(
        gw["status"]["addresses"],
        serde_json::json!([{"type": "IPAddress", "value": "203.0.113.7"}])
    );
    let l = eventually("attachedRoutes counted", || {
        let l = listener_status(&env, "same-namespace", "http")?;
        (l["attachedRoutes"] == 3).then_some(l)
    });
    let lc = l["conditions"].as_array().expect("listener conditions");
    for (t, s, r) in [
        ("Accepted", "True", "Accepted"),
        ("Programmed", "True", "Programmed"),
        ("ResolvedRefs", "True", "ResolvedRefs"),
        ("Conflicted", "False", "NoConflicts"),
    ] {
        assert!(has(lc, t, s, r), "{t}={s} {r}: {l}");
    }
    assert_eq!(
        l["supportedKinds"],
        serde_json::json!([{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"}])
    );
    let invalid_kind = eventually("GatewayInvalidRouteKind", || {
        listener_status(&env, "gateway-only-invalid-route-kind", "http")
    });
    assert_eq!(invalid_kind["supportedKinds"], serde_json::json!([]));
    assert!(
        has(
            invalid_kind["conditions"].as_array().expect("conditions"),
            "ResolvedRefs",
            "False",
            "InvalidRouteKinds"
        ),
        "{invalid_kind}"
    );
    let missing = eventually("GatewayInvalidTLSConfiguration", || {
        listener_status(&env, "gateway-certificate-nonexistent-secret", "https")
    });
    assert!(
        has(
            missing["conditions"].as_array().expect("conditions"),
            "ResolvedRefs",
            "False",
            "InvalidCertificateRef"
        ),
        "{missing}"
    );
    assert!(
        api_object(&env, "Gateway", Some(INFRA), "theirs")
            .expect("theirs")
            .get("status")
            .is_none(),
        "another controller's Gateway is left alone"
    );

    let routes = [
        ("valid", "Accepted", "True", "Accepted"),
        ("valid", "ResolvedRefs", "True", "ResolvedRefs"),
        ("nonexistent-backend", "ResolvedRefs", "False", "BackendNotFound"),
        ("nonexistent-backend", "Accepted", "True", "Accepted"),
        ("unknown-kind", "ResolvedRefs", "False", "InvalidKind"),
        ("bad-section", "Accepted", "False", "NoMatchingParent"),
    ];
    for (name, t, s, r) in routes {
        let c = wait_condition(&env, name, || parent_conditions(&env, name, "same-namespace"), t, s, r);
        assert!(c.iter().all(|c| c["observedGeneration"] == 1), "{name}: {c:?}");
    }
    wait_condition(
        &env,
        "disallowed-kind",
        || parent_conditions(&env, "disallowed-kind", "gateway-only-invalid-route-kind"),
        "Accepted",
        "False",
        "NotAllowedByListeners",
    );
    let cross = || {
        let r = api_object(&env, "HTTPRoute", Some(WEB), "cross-namespace-parent")?;
        let p = r.pointer("/status/parents/0")?;
        p["conditions"].as_array().cloned()
    };
    wait_condition(
        &env,
        "cross-namespace parent",
        cross,
        "Accepted",
        "False",
        "NotAllowedByListeners",
    );
    assert_eq!(
        get(&env, "n.test", 80, "/").code,
        500,
        "the invalid backend answers 500"
    );
    assert!(
        api_object(&env, "HTTPRoute", Some(INFRA), "theirs-only")
            .expect("route")
            .get("status")
            .is_none(),
        "a route of another controller's Gateway gets no status from kproxy"
    );

    // Another controller's entry on a route kproxy also serves is left as it was.
    let mut valid = api_object(&env, "HTTPRoute", Some(INFRA), "valid").expect("valid");
    let foreign = serde_json::json!({
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": INFRA, "name": "theirs"},
        "controllerName": "example.com/other",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "lastTransitionTime": "2020-01-01T00:00:00Z", "observedGeneration": 1}],
    });
    valid["status"]["parents"]
        .as_array_mut()
        .expect("parents")
        .push(foreign.clone());
    env.api()
        .expect("API")
        .apply(valid)
        .expect("apply the other controller's status");

    // HTTPRouteObservedGenerationBump: a spec change bumps the generation, not status writes.
    let mut changed = docs.clone();
    changed[6] = route("valid", INFRA, &format!("{{parentRefs: [{{name: same-namespace}}], hostnames: [valid.test, valid2.test], rules: [{{backendRefs: [{}]}}]}}", backend("infra-backend-v1")));
    // GatewayObservedGenerationBump: a listener added.
    changed[2] = gateway("same-namespace", "{name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}}, {name: http-8083, port: 8083, protocol: HTTP}");
    let mut all = base_docs();
    all.extend(changed);
    env.set(&all);
    wait_for(&env, "valid2.test", 80, "/", "pod-a");
    let c = eventually("observedGeneration 2", || {
        let c = parent_conditions(&env, "valid", "same-namespace")?;
        c.iter().all(|c| c["observedGeneration"] == 2).then_some(c)
    });
    assert!(has(&c, "Accepted", "True", "Accepted"));
    let valid = api_object(&env, "HTTPRoute", Some(INFRA), "valid").expect("valid");
    assert_eq!(
        valid["metadata"]["generation"], 2,
        "status writes do not bump the generation"
    );
    let parents = valid["status"]["parents"].as_array().expect("parents");
    assert!(
        parents.contains(&foreign),
        "the other controller's entry is still there: {parents:?}"
    );
    eventually("Gateway observedGeneration 2 and its new listener", || {
        let g = api_object(&env, "Gateway", Some(INFRA), "same-namespace")?;
        let c = g.pointer("/status/conditions")?.as_array()?;
        let fresh = c.iter().all(|c| c["observedGeneration"] == 2);
        (fresh && listener_status(&env, "same-namespace", "http-8083").is_some()).then_some(())
    });
    wait_for(&env, "valid.test", 8083, "/", "pod-a");
    let lease = env
        .api()
        .expect("API")
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            Some("kube-system"),
            "kproxy-ingress-status",
        )
        .expect("the Lease");
    assert_eq!(
        lease.pointer("/spec/holderIdentity").and_then(Value::as_str),
        Some("node-1")
    );
}

/// Without the Gateway API CRDs kproxy runs as before (Ingress served, nothing failing), and
/// picks the CRDs up once they are installed, without a restart.
fn missing_crds() {
    let ingress = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: legacy, namespace: default}\nspec: {ingressClassName: kproxy, rules: [{host: ingress.test, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: ingress-svc, port: {number: 8080}}}}]}}]}".to_string();
    let mut docs = base_docs();
    docs.push(ingress.clone());
    let mut env = Env::new("iptables", SourceKind::Api, &docs, &["--ingress-access-log"]);
    let _backends = start_backends(&env, &[]);
    wait_for(&env, "ingress.test", 80, "/", "pod-a");
    eventually("the missing CRDs are noticed", || {
        env.kproxy
            .log_text()
            .contains("Gateway API CRD not installed")
            .then_some(())
    });
    let api = env.api().expect("API");
    // Each kind has its own watcher: the first one's log line may come before the HTTPRoute
    // watcher's first request.
    eventually("kproxy asked for HTTPRoutes", || {
        api.requests()
            .iter()
            .any(|r| r.starts_with("GET /apis/gateway.networking.k8s.io/v1/httproutes"))
            .then_some(())
    });
    api.install_crds(&crd_dir()).expect("install CRDs");
    docs.extend([
        gateway_class(),
        gateway("late", "{name: http, port: 8084, protocol: HTTP}"),
        route(
            "late",
            INFRA,
            &format!(
                "{{parentRefs: [{{name: late}}], rules: [{{backendRefs: [{}]}}]}}",
                backend("infra-backend-v2")
            ),
        ),
    ]);
    env.set(&docs);
    wait_for(&env, "any.test", 8084, "/", "pod-b");
    assert_eq!(
        get(&env, "ingress.test", 80, "/").pod(),
        "pod-a",
        "Ingress still served"
    );
    wait_condition(
        &env,
        "late route",
        || parent_conditions(&env, "late", "late"),
        "Accepted",
        "True",
        "Accepted",
    );
}

/// An HTTPRoute that cannot be used is logged by name (and, from the API, reported in its
/// status); its usable rules and every other route keep serving.
fn bad_routes() {
    let docs = vec![
        gateway_class(),
        gateway("same-namespace", "{name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}}"),
        route("good", INFRA, &format!("{{parentRefs: [{{name: same-namespace}}], hostnames: [good.test], rules: [{{backendRefs: [{}]}}]}}", backend("infra-backend-v1"))),
        route("bad-regex", INFRA, &format!("{{parentRefs: [{{name: same-namespace}}], hostnames: [bad.test], rules: [{{matches: [{{path: {{type: RegularExpression, value: '/(['}}}}], backendRefs: [{}]}}]}}", backend("infra-backend-v1"))),
        route("partly", INFRA, &format!("{{parentRefs: [{{name: same-namespace}}], hostnames: [partly.test], rules: [{{matches: [{{path: {{value: /ok}}}}], backendRefs: [{v1}]}}, {{matches: [{{path: {{value: /ext}}}}], filters: [{{type: ExtensionRef, extensionRef: {{group: example.com, kind: Auth, name: a}}}}], backendRefs: [{v1}]}}]}}", v1 = backend("infra-backend-v1"))),
        route("missing-backend", INFRA, "{parentRefs: [{name: same-namespace}], hostnames: [missing.test], rules: [{backendRefs: [{name: nope, port: 8080}]}]}"),
    ];
    let env = env_with(SourceKind::Manifests, &docs, &[]);
    let _backends = start_backends(&env, &[]);
    wait_for(&env, "good.test", 80, "/", "pod-a");
    expect_all(
        &env,
        80,
        &[
            ("bad.test", "/", "404"),
            ("partly.test", "/ok", "pod-a"),
            ("partly.test", "/ext", "500"),
            ("missing.test", "/", "500"),
        ],
    );
    let log = env.kproxy.log_text();
    for needle in [
        "HTTPRoute gateway-conformance-infra/bad-regex",
        "HTTPRoute gateway-conformance-infra/partly: rule 1",
        "HTTPRoute gateway-conformance-infra/missing-backend: Service gateway-conformance-infra/nope not found",
    ] {
        assert!(log.contains(needle), "{needle:?} not in the log:\n{log}");
    }
}
