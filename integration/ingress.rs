//! Ingress scenarios: the real kproxy binary serving Ingress on the node namespace's ports 80
//! and 443, real backends in pod namespaces, real clients (curl, raw sockets) outside.
//!
//! This binary's `__http NAME PORT` mode is the backend: it answers `NAME PEER METHOD TARGET`
//! followed by the forwarding headers it saw, counts streamed request bodies, sleeps on
//! `/sleep/N`, echoes bytes after a `101 Switching Protocols` for Upgrade requests (except on
//! paths containing `/no-upgrade`), answers `/bytes/N` with N bytes, and `/__seen` with every
//! request line it served.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::harness::eventually;
use crate::scenarios::{Env, SourceKind};

pub type Scenario = fn(SourceKind);

/// Scenarios run for both sources of desired state.
pub const ALL: &[(&str, Scenario)] = &[
    ("host_and_path_table_for_every_path_type", host_and_path_table),
    ("tls_sni_two_hosts_rotation_and_malformed_secret", tls_sni),
    ("annotations", annotations),
];

/// Scenarios that need the API source.
pub const API_ONLY: &[(&str, fn())] = &[("ingress_class_claiming_and_status_with_lease", class_and_status)];

/// Scenarios that need the manifest source (the walkthrough's files are used verbatim).
pub const MANIFESTS_ONLY: &[(&str, fn())] = &[
    ("walkthrough_http_then_https", walkthrough),
    ("http2_websocket_and_streamed_upload", protocols),
    ("bad_input", bad_input),
    ("retry_external_name_https_backend_and_drain", backends_and_drain),
    ("framing_checked_on_the_whole_connection", framing_whole_connection),
    ("rolling_update_hands_over_without_a_failed_request", handover),
];

const BACKEND_PORT: u16 = 80;
const NODE: &str = "192.0.2.1";

// ---------------------------------------------------------------- the backend

/// `__http NAME PORT` (or `__https`, with a self-signed certificate): the backend described in
/// the module doc.
pub fn serve_backend(name: &str, port: u16, tls: bool) -> ! {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::{Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;
    use rustls_pki_types::pem::PemObject;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let name = name.to_string();
    let seen: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let acceptor = tls.then(|| {
        let (cert, key) = certificate(&[&name]);
        let cert = rustls_pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).expect("cert");
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
        let config =
            rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(vec![cert], key)
                .expect("server config");
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
    });
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await.expect("bind");
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let name = name.clone();
            let acceptor = acceptor.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let name = name.clone();
                    let seen = seen.clone();
                    async move {
                        let target = req.uri().path_and_query().map_or("/".to_string(), |p| p.to_string());
                        if target == "/__seen" {
                            let all = seen.lock().map(|s| s.join("\n")).unwrap_or_default();
                            return Ok(Response::new(Full::new(bytes::Bytes::from(all + "\n"))));
                        }
                        if let Ok(mut s) = seen.lock() {
                            s.push(format!("{} {target}", req.method()));
                        }
                        let mut text = format!("{name} {} {} {target}\n", peer.ip(), req.method());
                        if req.uri().scheme().is_some() {
                            text.push_str("absolute-form target\n");
                        }
                        for h in [
                            "host",
                            "x-forwarded-for",
                            "x-forwarded-proto",
                            "x-forwarded-host",
                            "x-forwarded-port",
                            "x-real-ip",
                            "connection",
                            "x-hop",
                        ] {
                            if let Some(v) = req.headers().get(h).and_then(|v| v.to_str().ok()) {
                                text.push_str(&format!("{h}: {v}\n"));
                            }
                        }
                        if req.headers().contains_key("upgrade") && !target.contains("/no-upgrade") {
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(up) = on.await {
                                    let mut io = TokioIo::new(up);
                                    let (mut r, mut w) = tokio::io::split(&mut io);
                                    let _ = tokio::io::copy(&mut r, &mut w).await;
                                }
                            });
                            let resp = Response::builder()
                                .status(StatusCode::SWITCHING_PROTOCOLS)
                                .header("upgrade", "websocket")
                                .header("connection", "Upgrade")
                                .header("sec-websocket-accept", "test")
                                .header(
                                    "x-target-form",
                                    if req.uri().scheme().is_some() {
                                        "absolute"
                                    } else {
                                        "origin"
                                    },
                                )
                                .body(Full::new(bytes::Bytes::new()))
                                .expect("response");
                            return Ok::<_, hyper::Error>(resp);
                        }
                        if let Some(n) = target.split("/bytes/").nth(1).and_then(|s| s.parse::<usize>().ok()) {
                            return Ok(Response::new(Full::new(bytes::Bytes::from(vec![b'x'; n]))));
                        }
                        if let Some(secs) = target.split("/sleep/").nth(1).and_then(|s| s.parse::<u64>().ok()) {
                            tokio::time::sleep(Duration::from_secs(secs)).await;
                        }
                        // Count the body as it streams: never hold it.
                        let mut body = req.into_body();
                        let mut received = 0u64;
                        while let Some(frame) = body.frame().await {
                            if let Ok(data) = frame?.into_data() {
                                received += data.len() as u64;
                            }
                        }
                        if received > 0 {
                            text.push_str(&format!("received: {received}\n"));
                        }
                        Ok(Response::new(Full::new(bytes::Bytes::from(text))))
                    }
                });
                let http = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    None => {
                        let _ = http
                            .serve_connection(TokioIo::new(stream), service)
                            .with_upgrades()
                            .await;
                    }
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            let _ = http
                                .serve_connection(TokioIo::new(stream), service)
                                .with_upgrades()
                                .await;
                        }
                    }
                }
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

#[must_use]
fn start_backends(env: &Env, pods: &[usize]) -> Backends {
    let mut children = Vec::new();
    for &i in pods {
        let pod = &env.topo.pods[i];
        children.push(spawn_backend(&pod.ns, &pod.name, BACKEND_PORT, "__http"));
        let url = format!("http://{}:{BACKEND_PORT}/", pod.ip);
        eventually(&format!("backend in {} up", pod.name), || {
            let out = env.topo.exec(&pod.ns, &["curl", "-s", "--max-time", "1", &url]);
            out.status.success().then_some(())
        });
    }
    Backends(children)
}

/// Starts this binary's backend mode (`__http` or `__https`) in namespace `ns`.
fn spawn_backend(ns: &str, name: &str, port: u16, mode: &str) -> std::process::Child {
    let exe = std::env::current_exe().expect("test binary");
    std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(&exe)
        .args([mode, name, &port.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start backend")
}

// ---------------------------------------------------------------- objects

fn node_doc() -> String {
    "apiVersion: v1\nkind: Node\nmetadata: {name: node-1}\nstatus: {addresses: [{type: InternalIP, address: 192.0.2.1}]}".into()
}

/// A ClusterIP Service `name` with port 80 named `http` to target port 80.
fn service_doc(name: &str, cluster_ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: {cluster_ip}, ports: [{{name: http, port: 80, targetPort: 80}}]}}"
    )
}

/// An EndpointSlice for `service` with ready endpoints at the given pods (0-based) on port 80.
fn slice_doc(service: &str, port_name: &str, pods: &[usize]) -> String {
    let eps: Vec<String> = pods
        .iter()
        .map(|i| {
            format!(
                "{{addresses: [10.244.{}.2], nodeName: node-1, conditions: {{ready: true}}}}",
                i + 1
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-x1, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: '{port_name}', port: 80, protocol: TCP}}]\nendpoints: [{}]",
        eps.join(", ")
    )
}

fn ingress_doc(name: &str, annotations: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: {name}, namespace: default, annotations: {{{annotations}}}}}\nspec: {spec}"
    )
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

fn secret_doc(name: &str, cert: &str, key: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: default}}\ntype: kubernetes.io/tls\ndata: {{tls.crt: {}, tls.key: {}}}",
        b64(cert),
        b64(key)
    )
}

// ---------------------------------------------------------------- clients

/// A response as curl saw it.
#[derive(Debug)]
struct Reply {
    code: u16,
    headers: String,
    body: String,
}

impl Reply {
    /// The first word of the body: the pod that answered.
    fn pod(&self) -> &str {
        self.body.split_whitespace().next().unwrap_or_default()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// curl from the client namespace; `Err(exit code)` when curl fails.
fn curl(env: &Env, args: &[&str]) -> Result<Reply, i32> {
    let dir = std::env::temp_dir().join(format!("{}-curl-headers", env.topo.id));
    let head = dir.display().to_string();
    let mut full = vec!["curl", "-s", "--connect-timeout", "3", "--max-time", "20", "-D", &head];
    full.extend(args);
    let out = env.topo.exec(&env.topo.client, &full);
    let headers = std::fs::read_to_string(&dir).unwrap_or_default();
    let _ = std::fs::remove_file(&dir);
    if !out.status.success() {
        return Err(out.status.code().unwrap_or(-1));
    }
    // With redirects or 100-continue there are several blocks: the last one counts.
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

fn get(env: &Env, host: &str, path: &str) -> Reply {
    let url = format!("http://{host}{path}");
    let resolve = format!("{host}:80:{NODE}");
    curl(env, &["--resolve", &resolve, &url])
        .unwrap_or_else(|c| panic!("GET {url}: curl exit {c}\n{}", env.kproxy.log_text()))
}

/// HTTPS GET trusting only `ca` (a PEM file); `None` uses -k.
fn get_tls(env: &Env, host: &str, path: &str, ca: Option<&std::path::Path>, extra: &[&str]) -> Result<Reply, i32> {
    let url = format!("https://{host}{path}");
    let resolve = format!("{host}:443:{NODE}");
    let ca = ca.map(|p| p.display().to_string());
    let mut args: Vec<&str> = vec!["--resolve", &resolve];
    match &ca {
        Some(p) => args.extend(["--cacert", p.as_str()]),
        None => args.push("-k"),
    }
    args.extend(extra);
    args.push(&url);
    curl(env, &args)
}

/// Runs `f` with a TCP connection from the client namespace to `addr`.
fn raw_in<T: Send + 'static>(env: &Env, addr: &str, f: impl FnOnce(TcpStream) -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{}", env.topo.client);
    let addr = addr.to_string();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let s = TcpStream::connect(&addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
        f(s)
    })
    .join()
    .expect("raw client thread")
}

/// Sends `request` raw and returns everything read until the server closes (or 15 s pass).
fn raw(env: &Env, request: Vec<u8>) -> String {
    raw_in(env, &format!("{NODE}:80"), move |mut s| {
        let _ = s.write_all(&request);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).to_string()
    })
}

/// A WebSocket handshake to `host` on the HTTP listener, then two messages echoed through the
/// upgraded connection: the response head and what came back.
pub(crate) fn websocket_echo(env: &Env, host: &str) -> (String, String) {
    let request = format!("GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
    raw_in(env, &format!("{NODE}:80"), move |mut s| {
        s.write_all(request.as_bytes()).expect("write");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).unwrap_or(0) == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        let mut out = Vec::new();
        if head.starts_with("HTTP/1.1 101") {
            for msg in ["hello", " websocket"] {
                s.write_all(msg.as_bytes()).expect("write frame");
                let mut buf = vec![0u8; msg.len()];
                s.read_exact(&mut buf).expect("echo");
                out.extend(buf);
            }
        }
        (head, String::from_utf8_lossy(&out).to_string())
    })
}

/// Sends `request` raw; what came back, and whether kproxy closed the connection (rather than
/// the client giving up after 15 s).
fn raw_closed(env: &Env, request: Vec<u8>) -> (String, bool) {
    raw_in(env, &format!("{NODE}:80"), move |mut s| {
        let _ = s.write_all(&request);
        let mut out = Vec::new();
        let closed = s.read_to_end(&mut out).is_ok();
        (String::from_utf8_lossy(&out).to_string(), closed)
    })
}

/// The status codes of every answer in a raw exchange, in order.
fn answers_of(raw: &str) -> Vec<u16> {
    raw.split("HTTP/1.1 ")
        .skip(1)
        .filter_map(|a| a.get(..3)?.parse().ok())
        .collect()
}

fn status_of(raw: &str) -> u16 {
    raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn args(class: &str) -> Vec<&str> {
    vec!["--ingress-class", class, "--ingress-access-log"]
}

/// Waits until a request to `host` `path` over HTTP answers `code`.
fn wait_code(env: &Env, host: &str, path: &str, code: u16) {
    eventually(&format!("http://{host}{path} answers {code}"), || {
        let url = format!("http://{host}{path}");
        let resolve = format!("{host}:80:{NODE}");
        (curl(env, &["--resolve", &resolve, &url]).ok()?.code == code).then_some(())
    });
}

fn pods_seen(env: &Env, host: &str, path: &str, n: usize) -> Vec<String> {
    let mut seen: Vec<String> = (0..n).map(|_| get(env, host, path).pod().to_string()).collect();
    seen.sort();
    seen.dedup();
    seen
}

// ---------------------------------------------------------------- scenarios

const WALK_DEPLOYMENT: &str = include_str!("../examples/walkthrough/deployment.yaml");
const WALK_SERVICE: &str = include_str!("../examples/walkthrough/service.yaml");
const WALK_INGRESS: &str = include_str!("../examples/walkthrough/ingress.yaml");
const WALK_INGRESS_TLS: &str = include_str!("../examples/walkthrough/ingress-tls.yaml");

/// The user's walkthrough, files unchanged, with `--ingress-class nginx`: first HTTP, then the
/// TLS Ingress and its Secret, after which HTTPS answers and HTTP redirects (as ingress-nginx).
fn walkthrough() {
    let base = vec![
        node_doc(),
        WALK_DEPLOYMENT.to_string(),
        WALK_SERVICE.to_string(),
        // What the EndpointSlice controller would write for the Deployment's two pods.
        slice_doc("myapp-svc", "", &[0, 1]),
        WALK_INGRESS.to_string(),
    ];
    let mut env = Env::new("iptables", SourceKind::Manifests, &base, &args("nginx"));
    let _backends = start_backends(&env, &[0, 1]);
    wait_code(&env, "myapp.example.com", "/", 200);
    assert_eq!(
        pods_seen(&env, "myapp.example.com", "/", 20),
        ["pod-a", "pod-b"],
        "both replicas answer"
    );
    let r = get(&env, "myapp.example.com", "/some/page?x=1");
    assert!(
        r.body.contains(" GET /?x=1\n"),
        "rewrite-target: / sends every path to /: {}",
        r.body
    );
    assert!(r.body.contains("host: myapp.example.com\n"), "{}", r.body);
    assert!(
        r.body.contains("x-forwarded-proto: http\n") && r.body.contains("x-real-ip: 192.0.2.100\n"),
        "{}",
        r.body
    );
    assert!(
        r.body.contains("x-forwarded-for: 192.0.2.100\n") && r.body.contains("x-forwarded-host: myapp.example.com\n"),
        "{}",
        r.body
    );
    assert!(
        r.body.contains("x-forwarded-port: 80\n") && !r.body.contains("absolute-form"),
        "{}",
        r.body
    );
    assert_eq!(get(&env, "other.example.com", "/").code, 404);

    let (cert, key) = certificate(&["myapp.example.com"]);
    let ca = std::env::temp_dir().join(format!("{}-myapp.pem", env.topo.id));
    std::fs::write(&ca, &cert).expect("write ca");
    let mut docs = base.clone();
    docs.push(WALK_INGRESS_TLS.to_string());
    docs.push(secret_doc("myapp-tls-secret", &cert, &key));
    env.set(&docs);
    let r = eventually("HTTPS with the Secret's certificate", || {
        get_tls(&env, "myapp.example.com", "/x", Some(&ca), &[])
            .ok()
            .filter(|r| r.code == 200)
    });
    assert!(
        r.body.contains("x-forwarded-proto: https\n") && r.body.contains("x-forwarded-port: 443\n"),
        "{}",
        r.body
    );
    let r = get(&env, "myapp.example.com", "/path?q=1");
    assert_eq!(r.code, 308);
    assert_eq!(
        r.header("location").as_deref(),
        Some("https://myapp.example.com/path?q=1")
    );
    let mut seen: Vec<String> = (0..20)
        .map(|_| {
            get_tls(&env, "myapp.example.com", "/", Some(&ca), &[])
                .expect("https")
                .pod()
                .to_string()
        })
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["pod-a", "pod-b"]);
    let _ = std::fs::remove_file(&ca);
}

fn table_docs() -> Vec<String> {
    let rule = |host: &str, paths: &[(&str, &str, &str)]| {
        let paths: Vec<String> = paths
            .iter()
            .map(|(p, t, s)| {
                format!("{{path: '{p}', pathType: {t}, backend: {{service: {{name: {s}, port: {{name: http}}}}}}}}")
            })
            .collect();
        let host = if host.is_empty() {
            String::new()
        } else {
            format!("host: '{host}', ")
        };
        format!("{{{host}http: {{paths: [{}]}}}}", paths.join(", "))
    };
    vec![
        node_doc(),
        service_doc("svc-a", "10.96.0.21"),
        service_doc("svc-b", "10.96.0.22"),
        service_doc("svc-c", "10.96.0.23"),
        slice_doc("svc-a", "http", &[0]),
        slice_doc("svc-b", "http", &[1]),
        slice_doc("svc-c", "http", &[2]),
        ingress_doc(
            "table",
            "",
            &format!(
                "{{ingressClassName: kproxy, rules: [{}, {}, {}]}}",
                rule(
                    "exact.test",
                    &[
                        ("/", "Prefix", "svc-a"),
                        ("/foo", "Exact", "svc-b"),
                        ("/foo", "Prefix", "svc-c"),
                        ("/aaa/bbb/", "Prefix", "svc-b"),
                        ("/impl", "ImplementationSpecific", "svc-c"),
                    ]
                ),
                rule("*.wild.test", &[("/", "Prefix", "svc-b")]),
                rule("", &[("/any", "Prefix", "svc-c")]),
            ),
        ),
    ]
}

/// Host and path cases for every pathType, each with the pod it must reach.
fn host_and_path_table(kind: SourceKind) {
    let env = Env::new("iptables", kind, &table_docs(), &args("kproxy"));
    let _backends = start_backends(&env, &[0, 1, 2]);
    wait_code(&env, "exact.test", "/", 200);
    let cases = [
        ("exact.test", "/", "pod-a"),
        ("exact.test", "/bar", "pod-a"),
        ("exact.test", "/foo", "pod-b"),
        ("exact.test", "/foo/", "pod-c"),
        ("exact.test", "/foo/x", "pod-c"),
        ("exact.test", "/foox", "pod-a"),
        ("exact.test", "/aaa/bbb", "pod-b"),
        ("exact.test", "/aaa/bbb/ccc", "pod-b"),
        ("exact.test", "/aaa/bbbxyz", "pod-a"),
        ("exact.test", "/impl/y", "pod-c"),
        ("exact.test", "/any", "pod-a"),
        ("x.wild.test", "/anything", "pod-b"),
        ("wild.test", "/any/1", "pod-c"),
        ("a.b.wild.test", "/any", "pod-c"),
        ("unknown.test", "/any", "pod-c"),
        ("unknown.test", "/", "404"),
        ("a.b.wild.test", "/", "404"),
    ];
    for (host, path, want) in cases {
        let r = get(&env, host, path);
        let got = if r.code == 404 { "404" } else { r.pod() };
        assert_eq!(got, want, "http://{host}{path}: {r:?}");
    }
    let m = |code: &str| {
        env.kproxy
            .metric(&format!(
                "kproxy_ingress_requests_total{{code=\"{code}\",ingress=\"default/table\",service=\"default/svc-a\"}}"
            ))
            .unwrap_or(0.0)
    };
    assert!(m("200") >= 4.0, "requests are counted by ingress, service and code");
}

fn tls_sni(kind: SourceKind) {
    let dir = std::env::temp_dir();
    let (cert_a, key_a) = certificate(&["a.test"]);
    let (cert_w, key_w) = certificate(&["*.w.test"]);
    let (cert_a2, key_a2) = certificate(&["a.test"]);
    let (cert_c, _) = certificate(&["c.test"]);
    let docs = |a: (&str, &str)| {
        vec![
            node_doc(),
            service_doc("svc-a", "10.96.0.21"),
            slice_doc("svc-a", "http", &[0]),
            secret_doc("a", a.0, a.1),
            secret_doc("w", &cert_w, &key_w),
            secret_doc("c", &cert_c, "not a key"),
            ingress_doc(
                "tls",
                "",
                "{ingressClassName: kproxy, tls: [{hosts: [a.test], secretName: a}, {hosts: ['*.w.test'], secretName: w}, {hosts: [c.test], secretName: c}], rules: [{http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: svc-a, port: {number: 80}}}}]}}]}",
            ),
        ]
    };
    let mut env = Env::new("iptables", kind, &docs((&cert_a, &key_a)), &args("kproxy"));
    let _backends = start_backends(&env, &[0]);
    let pem = |name: &str, text: &str| {
        let p = dir.join(format!("{}-{name}.pem", env.topo.id));
        std::fs::write(&p, text).expect("write pem");
        p
    };
    let (ca_a, ca_w, ca_a2, ca_c) = (
        pem("a", &cert_a),
        pem("w", &cert_w),
        pem("a2", &cert_a2),
        pem("c", &cert_c),
    );
    eventually("a.test over HTTPS", || {
        get_tls(&env, "a.test", "/", Some(&ca_a), &[])
            .ok()
            .filter(|r| r.code == 200)
    });
    assert_eq!(
        get_tls(&env, "x.w.test", "/", Some(&ca_w), &[]).map(|r| r.code),
        Ok(200),
        "wildcard certificate"
    );
    assert!(
        get_tls(&env, "x.w.test", "/", Some(&ca_a), &[]).is_err(),
        "each host gets its own certificate"
    );
    assert!(get_tls(&env, "a.test", "/", Some(&ca_w), &[]).is_err());
    // The malformed Secret: named in the log, its host falls back to the default certificate.
    assert!(get_tls(&env, "c.test", "/", Some(&ca_c), &[]).is_err());
    assert_eq!(get_tls(&env, "c.test", "/", None, &[]).map(|r| r.code), Ok(200));
    assert!(
        env.kproxy.log_text().contains("Secret default/c"),
        "{}",
        env.kproxy.log_text()
    );
    // TLS 1.2 and 1.3 both work; 1.1 does not.
    assert_eq!(
        get_tls(&env, "a.test", "/", Some(&ca_a), &["--tls-max", "1.2"]).map(|r| r.code),
        Ok(200)
    );
    assert!(get_tls(&env, "a.test", "/", Some(&ca_a), &["--tlsv1.1", "--tls-max", "1.1"]).is_err());
    // Rotation without restart.
    env.set(&docs((&cert_a2, &key_a2)));
    eventually("the rotated certificate is served", || {
        get_tls(&env, "a.test", "/", Some(&ca_a2), &[])
            .ok()
            .filter(|r| r.code == 200)
    });
    assert!(get_tls(&env, "a.test", "/", Some(&ca_a), &[]).is_err());
    for p in [ca_a, ca_w, ca_a2, ca_c] {
        let _ = std::fs::remove_file(p);
    }
}

fn annotations(kind: SourceKind) {
    let path = |p: &str, t: &str, svc: &str| {
        format!("{{path: '{p}', pathType: {t}, backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}")
    };
    let ing = |name: &str, host: &str, ann: &str, paths: &[String]| {
        ingress_doc(
            name,
            ann,
            &format!(
                "{{ingressClassName: kproxy, rules: [{{host: {host}, http: {{paths: [{}]}}}}]}}",
                paths.join(", ")
            ),
        )
    };
    let (cert, key) = certificate(&["tls.test"]);
    let docs = vec![
        node_doc(),
        service_doc("ab", "10.96.0.21"),
        slice_doc("ab", "http", &[0, 1]),
        service_doc("c", "10.96.0.22"),
        slice_doc("c", "http", &[2]),
        secret_doc("tls", &cert, &key),
        ing(
            "rewrite",
            "rewrite.test",
            "nginx.ingress.kubernetes.io/rewrite-target: /$2, nginx.ingress.kubernetes.io/use-regex: 'true'",
            &[path("/something(/|$)(.*)", "ImplementationSpecific", "ab")],
        ),
        ingress_doc(
            "noredirect",
            "nginx.ingress.kubernetes.io/ssl-redirect: 'false'",
            "{ingressClassName: kproxy, tls: [{hosts: [tls.test], secretName: tls}], rules: [{host: tls.test, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: ab, port: {number: 80}}}}]}}]}",
        ),
        ing("force", "force.test", "kproxy.io/force-ssl-redirect: 'true'", &[path("/", "Prefix", "ab")]),
        ing(
            "limits",
            "limits.test",
            "nginx.ingress.kubernetes.io/proxy-body-size: 1k, nginx.ingress.kubernetes.io/proxy-read-timeout: '1', nginx.ingress.kubernetes.io/x-unknown: 'y'",
            &[path("/", "Prefix", "ab")],
        ),
        ing(
            "sticky",
            "sticky.test",
            "nginx.ingress.kubernetes.io/affinity: cookie, nginx.ingress.kubernetes.io/session-cookie-name: route",
            &[path("/", "Prefix", "ab")],
        ),
        ing("main", "canary.test", "", &[path("/", "Prefix", "ab")]),
        ing(
            "canary",
            "canary.test",
            "nginx.ingress.kubernetes.io/canary: 'true', nginx.ingress.kubernetes.io/canary-weight: '0', nginx.ingress.kubernetes.io/canary-by-header: X-Canary",
            &[path("/", "Prefix", "c")],
        ),
        ing("main2", "weight.test", "", &[path("/", "Prefix", "ab")]),
        ing(
            "canary2",
            "weight.test",
            "nginx.ingress.kubernetes.io/canary: 'true', nginx.ingress.kubernetes.io/canary-weight: '100'",
            &[path("/", "Prefix", "c")],
        ),
    ];
    let env = Env::new("iptables", kind, &docs, &args("kproxy"));
    let _backends = start_backends(&env, &[0, 1, 2]);
    wait_code(&env, "rewrite.test", "/something", 200);
    // rewrite-target with captures.
    for (req, want) in [
        ("/something", "/"),
        ("/something/", "/"),
        ("/something/new?x=1", "/new?x=1"),
    ] {
        let r = get(&env, "rewrite.test", req);
        assert!(
            r.body.contains(&format!(" GET {want}\n")),
            "{req} -> {want}: {}",
            r.body
        );
    }
    // ssl-redirect: "false" keeps HTTP on a TLS host; force-ssl-redirect redirects without TLS.
    assert_eq!(get(&env, "tls.test", "/").code, 200);
    let r = get(&env, "force.test", "/a?b");
    assert_eq!(
        (r.code, r.header("location")),
        (308, Some("https://force.test/a?b".to_string()))
    );
    // proxy-body-size: declared and streamed bodies past it are refused.
    let big = "x".repeat(2048);
    let resolve = format!("limits.test:80:{NODE}");
    let post = |extra: &[&str]| {
        let mut a = vec!["--resolve", resolve.as_str(), "--data-binary", big.as_str()];
        a.extend(extra);
        a.push("http://limits.test/");
        curl(&env, &a).map(|r| r.code)
    };
    assert_eq!(post(&[]), Ok(413));
    assert_eq!(post(&["-H", "Transfer-Encoding: chunked"]), Ok(413));
    let small = curl(
        &env,
        &["--resolve", &resolve, "--data-binary", "hello", "http://limits.test/"],
    )
    .expect("small post");
    assert!(small.body.contains("received: 5"), "{small:?}");
    // proxy-read-timeout: 1 s, the backend takes 3.
    assert_eq!(get(&env, "limits.test", "/sleep/3").code, 504);
    assert!(
        env.kproxy.log_text().contains("nginx.ingress.kubernetes.io/x-unknown"),
        "unknown annotation warned"
    );
    // Cookie affinity: the first answer sets the cookie, which then pins every request.
    let first = get(&env, "sticky.test", "/");
    let set = first.header("set-cookie").expect("affinity cookie");
    let cookie = set.split(';').next().unwrap_or_default().to_string();
    assert!(cookie.starts_with("route="), "{set}");
    let resolve = format!("sticky.test:80:{NODE}");
    for _ in 0..10 {
        let r = curl(&env, &["--resolve", &resolve, "-b", &cookie, "http://sticky.test/"]).expect("sticky");
        assert_eq!(r.pod(), first.pod());
        assert!(r.header("set-cookie").is_none(), "a valid cookie is not reset");
    }
    assert_eq!(
        pods_seen(&env, "sticky.test", "/", 10),
        ["pod-a", "pod-b"],
        "without the cookie: round-robin"
    );
    // Canary by header, and by weight.
    let resolve = format!("canary.test:80:{NODE}");
    let with = |v: &str| {
        let h = format!("X-Canary: {v}");
        curl(&env, &["--resolve", &resolve, "-H", &h, "http://canary.test/"])
            .expect("canary")
            .pod()
            .to_string()
    };
    assert_eq!(with("always"), "pod-c");
    assert_ne!(with("never"), "pod-c");
    assert!(
        pods_seen(&env, "canary.test", "/", 10).iter().all(|p| p != "pod-c"),
        "weight 0"
    );
    assert_eq!(pods_seen(&env, "weight.test", "/", 10), ["pod-c"], "weight 100");
}

/// HTTP/2 (TLS with ALPN, and cleartext prior knowledge), a WebSocket-style Upgrade echo, and
/// a 100 MiB streamed upload that kproxy never holds in memory.
fn protocols() {
    let (cert, key) = certificate(&["p.test"]);
    let docs = vec![
        node_doc(),
        service_doc("svc-a", "10.96.0.21"),
        slice_doc("svc-a", "http", &[0]),
        secret_doc("p", &cert, &key),
        ingress_doc(
            "p",
            "nginx.ingress.kubernetes.io/ssl-redirect: 'false'",
            "{ingressClassName: kproxy, tls: [{hosts: [p.test], secretName: p}], rules: [{host: p.test, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: svc-a, port: {number: 80}}}}]}}]}",
        ),
    ];
    let env = Env::new("iptables", SourceKind::Manifests, &docs, &args("kproxy"));
    let _backends = start_backends(&env, &[0]);
    wait_code(&env, "p.test", "/", 200);
    // Answers larger than the socket takes at once, over TLS with HTTP/1.1 and HTTP/2.
    for proto in ["--http1.1", "--http2"] {
        let r = get_tls(&env, "p.test", "/bytes/4194304", None, &[proto]).expect("4 MiB over TLS");
        assert_eq!((r.code, r.body.len()), (200, 4_194_304), "{proto}");
    }
    // Over cleartext a long body is spliced from the backend's socket to the client's: each
    // answer arrives whole, byte for byte, and the keep-alive connection carries the next
    // request after it (the relay stopped exactly at the body's end on both sides).
    let answers = raw_in(&env, &format!("{NODE}:80"), |mut s| {
        let mut answers = Vec::new();
        for (path, size) in [("/bytes/4194304", 4_194_304usize), ("/bytes/70000", 70_000), ("/", 0)] {
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: p.test\r\n\r\n").as_bytes())
                .expect("send");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                assert_eq!(
                    s.read(&mut byte).expect("read head"),
                    1,
                    "closed after {} bytes",
                    head.len()
                );
                head.push(byte[0]);
            }
            let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
            let length: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("content-length");
            let mut body = vec![0u8; length];
            s.read_exact(&mut body).expect("body");
            if size > 0 {
                assert_eq!(length, size, "{path}");
                assert!(body.iter().all(|&b| b == b'x'), "{path}: the body's bytes as sent");
            }
            answers.push((
                status_of(&text),
                String::from_utf8_lossy(&body[..body.len().min(5)]).to_string(),
            ));
        }
        answers
    });
    assert_eq!(
        answers,
        vec![
            (200, "xxxxx".to_string()),
            (200, "xxxxx".to_string()),
            (200, "pod-a".to_string())
        ],
        "two long answers, then a short one, on one connection"
    );
    let r = get_tls(&env, "p.test", "/h2", None, &["--http2"]).expect("h2 over TLS");
    assert!(r.headers.starts_with("HTTP/2 200"), "{}", r.headers);
    assert!(
        r.body.contains("host: p.test\n"),
        "the :authority becomes Host upstream: {}",
        r.body
    );
    let resolve = format!("p.test:80:{NODE}");
    let r = curl(
        &env,
        &["--resolve", &resolve, "--http2-prior-knowledge", "http://p.test/h2c"],
    )
    .expect("h2c");
    assert!(r.headers.starts_with("HTTP/2 200"), "{}", r.headers);

    // Upgrade: after 101 the bytes flow both ways untouched.
    let echoed = websocket_echo(&env, "p.test");
    assert!(echoed.0.starts_with("HTTP/1.1 101"), "{}", echoed.0);
    assert!(echoed.0.contains("x-target-form: origin"), "{}", echoed.0);
    assert_eq!(echoed.1, "hello websocket");

    // 100 MiB, chunked from stdin, streamed through: kproxy's peak memory grows by far less
    // than the body (measured from its resident size before, which the merged-in features
    // and the debug build have moved close to the old fixed 64 MiB bound).
    let pid = env.kproxy.pid().expect("kproxy pid");
    let kib = |field: &str| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let rss_before = kib("VmRSS:");
    let out = env.topo.exec(
        &env.topo.client,
        &[
            "sh",
            "-c",
            &format!("head -c 104857600 /dev/zero | curl -s --max-time 120 --resolve p.test:80:{NODE} -T - http://p.test/upload"),
        ],
    );
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains("received: 104857600"), "upload: {body}");
    let hwm_kib = kib("VmHWM:");
    assert!(
        rss_before > 0 && hwm_kib < rss_before + 32 * 1024,
        "kproxy peak RSS {hwm_kib} KiB from {rss_before} KiB before the upload: the body was buffered"
    );
}

/// Malformed and hostile requests get 400/431 and the connection closes; nothing breaks.
fn bad_input() {
    let docs = vec![
        node_doc(),
        service_doc("svc-a", "10.96.0.21"),
        slice_doc("svc-a", "http", &[0]),
        service_doc("empty", "10.96.0.22"),
        ingress_doc(
            "b",
            "",
            "{ingressClassName: kproxy, rules: [{host: b.test, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: svc-a, port: {number: 80}}}}, {path: /empty, pathType: Prefix, backend: {service: {name: empty, port: {number: 80}}}}]}}]}",
        ),
        ingress_doc(
            "broken",
            "",
            "{ingressClassName: kproxy, rules: [{host: broken.test, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: missing, port: {number: 80}}}}]}}]}",
        ),
    ];
    let env = Env::new("iptables", SourceKind::Manifests, &docs, &args("kproxy"));
    let _backends = start_backends(&env, &[0]);
    wait_code(&env, "b.test", "/", 200);
    assert_eq!(get(&env, "b.test", "/empty").code, 503, "no ready endpoints");
    assert_eq!(
        get(&env, "broken.test", "/").code,
        404,
        "the unusable Ingress is skipped"
    );
    assert!(env
        .kproxy
        .log_text()
        .contains("Ingress default/broken: Service default/missing not found"));
    // Content-Length and Transfer-Encoding together: 400 and the connection closes, so a request
    // hidden in the body is never served; requests pipelined before it are served.
    let r = raw(
        &env,
        b"POST / HTTP/1.1\r\nHost: b.test\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: b.test\r\n\r\n".to_vec(),
    );
    assert_eq!(status_of(&r), 400, "conflicting framing: {r}");
    assert!(r.contains("both Content-Length and Transfer-Encoding"), "{r}");
    assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "one answer only: {r}");
    assert!(!r.contains("/smuggled"), "{r}");
    let r = raw(
        &env,
        b"POST /first HTTP/1.1\r\nHost: b.test\r\nContent-Length: 5\r\n\r\nhelloPOST / HTTP/1.1\r\nHost: b.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: b.test\r\n\r\n".to_vec(),
    );
    let answers: Vec<u16> = r
        .split("HTTP/1.1 ")
        .skip(1)
        .filter_map(|a| a.get(..3)?.parse().ok())
        .collect();
    assert_eq!(answers, [200, 400], "pipelined: {r}");
    assert!(r.contains("POST /first"), "{r}");
    assert!(!r.contains("/smuggled"), "{r}");
    let r = raw(&env, b"GARBAGE\r\n\r\n".to_vec());
    assert_eq!(status_of(&r), 400, "malformed: {r}");
    let mut huge = b"GET / HTTP/1.1\r\nHost: b.test\r\n".to_vec();
    for i in 0..100 {
        huge.extend(format!("X-Big-{i}: {}\r\n", "y".repeat(1000)).as_bytes());
    }
    huge.extend(b"\r\n");
    let r = raw(&env, huge);
    assert_eq!(status_of(&r), 431, "oversized head: {r}");
    let r = raw(&env, b"GET / HTTP/1.1\r\n\r\n".to_vec());
    assert_eq!(status_of(&r), 400, "no Host: {r}");
    // Hop-by-hop headers (and the ones Connection names) are not forwarded.
    let resolve = format!("b.test:80:{NODE}");
    let r = curl(
        &env,
        &[
            "--resolve",
            &resolve,
            "-H",
            "Connection: x-hop",
            "-H",
            "X-Hop: 1",
            "http://b.test/",
        ],
    )
    .expect("hop");
    assert!(!r.body.contains("x-hop"), "{}", r.body);
    // A slow client is cut off after the header read timeout (10 s), with no request served:
    // kproxy closes the connection before the client's own 15 s read timeout would end the wait.
    let (closed, r) = raw_in(&env, &format!("{NODE}:80"), |mut s| {
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: b.te");
        let mut out = Vec::new();
        let closed = s.read_to_end(&mut out).is_ok();
        (closed, String::from_utf8_lossy(&out).to_string())
    });
    assert!(closed, "the slow client was disconnected by kproxy: {r}");
    assert!(!r.contains("200 OK"), "{r}");
    assert_eq!(get(&env, "b.test", "/").code, 200, "still serving");
}

/// One retry on another endpoint when a connect fails; an ExternalName Service resolved by DNS;
/// `backend-protocol: HTTPS`; and on SIGTERM, a request in flight finishes while new
/// connections are refused.
fn backends_and_drain() {
    let docs = vec![
        node_doc(),
        service_doc("flaky", "10.96.0.21"),
        // pod-c runs no backend: connecting to it is refused.
        slice_doc("flaky", "http", &[0, 2]),
        "apiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: default}\nspec: {type: ExternalName, externalName: localhost}".to_string(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: secure, namespace: default}\nspec: {clusterIP: 10.96.0.23, ports: [{name: https, port: 443, targetPort: 443}]}".to_string(),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: secure-x1, namespace: default, labels: {kubernetes.io/service-name: secure}}\naddressType: IPv4\nports: [{name: https, port: 443, protocol: TCP}]\nendpoints: [{addresses: [10.244.2.2], conditions: {ready: true}}]".to_string(),
        ingress_doc(
            "misc",
            "",
            "{ingressClassName: kproxy, rules: [{host: misc.test, http: {paths: [{path: /flaky, pathType: Prefix, backend: {service: {name: flaky, port: {number: 80}}}}, {path: /ext, pathType: Prefix, backend: {service: {name: ext, port: {number: 8088}}}}]}}]}",
        ),
        ingress_doc(
            "secure",
            "nginx.ingress.kubernetes.io/backend-protocol: HTTPS",
            "{ingressClassName: kproxy, rules: [{host: secure.test, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: secure, port: {name: https}}}}]}}]}",
        ),
    ];
    let mut env = Env::new("iptables", SourceKind::Manifests, &docs, &args("kproxy"));
    let mut backends = start_backends(&env, &[0]);
    backends
        .0
        .push(spawn_backend(&env.topo.node, "node-local", 8088, "__http"));
    backends
        .0
        .push(spawn_backend(&env.topo.pods[1].ns, "pod-b-tls", 443, "__https"));
    wait_code(&env, "misc.test", "/flaky", 200);
    for _ in 0..10 {
        let r = get(&env, "misc.test", "/flaky");
        assert_eq!((r.code, r.pod()), (200, "pod-a"), "{r:?}");
    }
    let errors = env
        .kproxy
        .metric("kproxy_ingress_upstream_connect_errors_total{service=\"default/flaky\"}");
    assert!(errors.unwrap_or(0.0) >= 1.0, "connect errors counted: {errors:?}");

    let r = eventually("ExternalName backend", || {
        Some(get(&env, "misc.test", "/ext")).filter(|r| r.code == 200)
    });
    assert_eq!(r.pod(), "node-local", "{r:?}");
    let r = eventually("HTTPS backend", || {
        Some(get(&env, "secure.test", "/")).filter(|r| r.code == 200)
    });
    assert_eq!(r.pod(), "pod-b-tls", "{r:?}");
    let big = get(&env, "secure.test", "/bytes/3000000");
    assert_eq!(
        (big.code, big.body.len()),
        (200, 3_000_000),
        "a large answer from an HTTPS backend"
    );
    let (head, echoed) = websocket_echo(&env, "secure.test");
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "WebSocket to an HTTPS backend: {head}"
    );
    assert_eq!(echoed, "hello websocket", "spliced over TLS");

    // Graceful drain: a slow request survives SIGTERM; the listener closes at once.
    let pid = env.kproxy.pid().expect("pid");
    let client = env.topo.client.clone();
    let slow = std::thread::spawn(move || {
        crate::netns::run(
            "ip",
            &[
                "netns",
                "exec",
                &client,
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "20",
                "--resolve",
                "misc.test:80:192.0.2.1",
                "http://misc.test/flaky/sleep/3",
            ],
        )
    });
    std::thread::sleep(Duration::from_millis(1000));
    crate::netns::must("kill", &["-TERM", &pid.to_string()]);
    std::thread::sleep(Duration::from_millis(500));
    let refused = curl(
        &env,
        &["--resolve", &format!("misc.test:80:{NODE}"), "http://misc.test/flaky"],
    );
    assert_eq!(refused.map(|r| r.code), Err(7), "no new connections while draining");
    let out = slow.join().expect("slow client");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200",
        "the in-flight request completed"
    );
    eventually("kproxy exits after draining", || {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .contains("zombie"))
        .then_some(())
    });
    env.kproxy.stop();
}

/// IngressClass objects decide what is kproxy's (its controller name, the default-class
/// annotation), and the elected kproxy writes the served Ingresses' status.
fn class_and_status() {
    let rule = |host: &str| {
        format!("rules: [{{host: {host}, http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: svc-a, port: {{number: 80}}}}}}}}]}}}}]")
    };
    let docs = vec![
        node_doc(),
        service_doc("svc-a", "10.96.0.21"),
        slice_doc("svc-a", "http", &[0]),
        "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: mine, annotations: {ingressclass.kubernetes.io/is-default-class: 'true'}}\nspec: {controller: kproxy.io/ingress-controller}".to_string(),
        "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: theirs}\nspec: {controller: example.com/other}".to_string(),
        ingress_doc("by-class", "", &format!("{{ingressClassName: mine, {}}}", rule("class.test"))),
        ingress_doc("by-default", "", &format!("{{{}}}", rule("default.test"))),
        ingress_doc("not-ours", "", &format!("{{ingressClassName: theirs, {}}}", rule("theirs.test"))),
    ];
    let mut a = args("kproxy");
    a.extend(["--ingress-status-address", "203.0.113.7"]);
    let env = Env::new("iptables", SourceKind::Api, &docs, &a);
    let _backends = start_backends(&env, &[0]);
    wait_code(&env, "class.test", "/", 200);
    assert_eq!(
        get(&env, "default.test", "/").code,
        200,
        "class-less Ingress, our class is the default"
    );
    assert_eq!(get(&env, "theirs.test", "/").code, 404, "another controller's class");
    let api = env.api().expect("API source");
    let status = |name: &str| {
        api.get("networking.k8s.io/v1", "Ingress", Some("default"), name)
            .and_then(|i| {
                i.pointer("/status/loadBalancer/ingress/0/ip")
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
            })
    };
    eventually("status written", || {
        (status("by-class").as_deref() == Some("203.0.113.7")).then_some(())
    });
    eventually("status written", || {
        (status("by-default").as_deref() == Some("203.0.113.7")).then_some(())
    });
    assert_eq!(
        status("not-ours"),
        None,
        "Ingresses of other controllers are left alone"
    );
    let lease = api
        .get(
            "coordination.k8s.io/v1",
            "Lease",
            Some("kube-system"),
            "kproxy-ingress-status",
        )
        .expect("the Lease exists");
    assert_eq!(
        lease.pointer("/spec/holderIdentity").and_then(|v| v.as_str()),
        Some("node-1")
    );

    // Moved to another controller: no longer served, and the address kproxy wrote is removed.
    let mut moved = api
        .get("networking.k8s.io/v1", "Ingress", Some("default"), "by-class")
        .expect("by-class");
    moved["spec"]["ingressClassName"] = "theirs".into();
    api.apply(moved).expect("apply");
    wait_code(&env, "class.test", "/", 404);
    eventually("status cleared", || status("by-class").is_none().then_some(()));
    assert_eq!(status("by-default").as_deref(), Some("203.0.113.7"), "still served");

    // On SIGTERM the leader hands the Lease back, so another node takes over at once.
    let pid = env.kproxy.pid().expect("pid");
    crate::netns::must("kill", &["-TERM", &pid.to_string()]);
    eventually("Lease released", || {
        let lease = api.get(
            "coordination.k8s.io/v1",
            "Lease",
            Some("kube-system"),
            "kproxy-ingress-status",
        )?;
        lease.pointer("/spec/holderIdentity").is_none().then_some(())
    });
    assert_eq!(
        status("by-default").as_deref(),
        Some("203.0.113.7"),
        "statuses stay: the other nodes still serve them"
    );
}

/// The Content-Length + Transfer-Encoding refusal (and the other framing rules) hold for every
/// request of a connection: after an Upgrade that the backend declined, after long chunk
/// extensions, trailers, local answers and bodies. Each refusal is a 4xx/5xx with
/// `Connection: close`, the connection closes, and the backend never sees what followed.
/// Only a connection that really switched protocols stops being parsed, and on it bytes are
/// tunnelled, never taken for requests.
fn framing_whole_connection() {
    let docs = vec![
        node_doc(),
        service_doc("svc-a", "10.96.0.21"),
        slice_doc("svc-a", "http", &[0]),
        ingress_doc(
            "f",
            "",
            "{ingressClassName: kproxy, rules: [{host: f.test, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: svc-a, port: {number: 80}}}}]}}]}",
        ),
    ];
    let env = Env::new("iptables", SourceKind::Manifests, &docs, &args("kproxy"));
    let _backends = start_backends(&env, &[0]);
    wait_code(&env, "f.test", "/", 200);
    let conflict = |n: u32| {
        format!(
            "POST /conflict-{n} HTTP/1.1\r\nHost: f.test\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled-{n} HTTP/1.1\r\nHost: f.test\r\n\r\n"
        )
        .into_bytes()
    };
    // A chunk whose extension (from the `;` to the line's end) is `len` bytes long.
    let long_ext = |len: usize| format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(len - 1));
    // (what precedes the conflicting request, the answers expected before its 400)
    let cases: Vec<(&str, Vec<u8>, Vec<u16>)> = vec![
        (
            "an Upgrade the backend declined",
            b"GET /no-upgrade HTTP/1.1\r\nHost: f.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_vec(),
            vec![200],
        ),
        (
            "a chunk extension of 4 KiB, the longest allowed",
            format!(
                "POST /ext HTTP/1.1\r\nHost: f.test\r\nTransfer-Encoding: chunked\r\n\r\n{}",
                long_ext(4096)
            )
            .into_bytes(),
            vec![200],
        ),
        (
            "chunked trailers",
            b"POST /trailers HTTP/1.1\r\nHost: f.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n".to_vec(),
            vec![200],
        ),
        (
            "a local 404",
            b"GET / HTTP/1.1\r\nHost: nobody.test\r\n\r\n".to_vec(),
            vec![404],
        ),
        (
            "Expect: 100-continue with its body",
            b"POST /expect HTTP/1.1\r\nHost: f.test\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc".to_vec(),
            vec![200],
        ),
        (
            "a Content-Length body holding a request",
            b"POST /body HTTP/1.1\r\nHost: f.test\r\nContent-Length: 34\r\n\r\nGET /in-body HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            vec![200],
        ),
    ];
    for (n, (what, before, expect)) in cases.into_iter().enumerate() {
        let n = n as u32;
        let mut bytes = before;
        bytes.extend(conflict(n));
        let (r, closed) = raw_closed(&env, bytes);
        let mut want = expect.clone();
        want.push(400);
        assert_eq!(answers_of(&r), want, "after {what}: {r}");
        assert!(closed, "after {what}: the connection closes after the 400: {r}");
        assert!(
            r.contains("both Content-Length and Transfer-Encoding"),
            "after {what}: {r}"
        );
        assert!(
            r.to_ascii_lowercase().contains("connection: close"),
            "after {what}: {r}"
        );
    }
    // Framings the old scanner stopped following are refused themselves, and closed.
    let refused: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "a chunk extension past 4 KiB",
            format!(
                "POST /long-ext HTTP/1.1\r\nHost: f.test\r\nTransfer-Encoding: chunked\r\n\r\n{}",
                long_ext(9000)
            )
            .into_bytes(),
            400,
        ),
        (
            "a transfer coding other than chunked",
            b"POST /gzip HTTP/1.1\r\nHost: f.test\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
            501,
        ),
        (
            "chunked applied twice",
            b"POST /twice HTTP/1.1\r\nHost: f.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec(),
            501,
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            b"POST /te10 HTTP/1.0\r\nHost: f.test\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            501,
        ),
        (
            "two different Content-Lengths",
            b"POST /two-lengths HTTP/1.1\r\nHost: f.test\r\nContent-Length: 1\r\nContent-Length: 40\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a malformed chunk size",
            b"POST /bad-chunk HTTP/1.1\r\nHost: f.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
            400,
        ),
        (
            "two Host headers",
            b"GET /two-hosts HTTP/1.1\r\nHost: f.test\r\nHost: other.test\r\n\r\n".to_vec(),
            400,
        ),
        (
            "CONNECT",
            b"CONNECT f.test:443 HTTP/1.1\r\nHost: f.test:443\r\n\r\n".to_vec(),
            405,
        ),
    ];
    for (n, (what, mut bytes, code)) in refused.into_iter().enumerate() {
        bytes.extend(format!("GET /smuggled-r{n} HTTP/1.1\r\nHost: f.test\r\n\r\n").as_bytes());
        let (r, closed) = raw_closed(&env, bytes);
        assert_eq!(answers_of(&r), [code], "{what}: {r}");
        assert!(closed, "{what}: the connection closes: {r}");
    }
    // A real upgrade: after 101 the bytes are the backend's (its echo), not requests.
    let request = b"GET /ws HTTP/1.1\r\nHost: f.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_vec();
    let tunnelled = conflict(99);
    let echoed = raw_in(&env, &format!("{NODE}:80"), move |mut s| {
        s.write_all(&request).expect("write");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        s.write_all(&tunnelled).expect("write");
        let mut back = vec![0u8; tunnelled.len()];
        s.read_exact(&mut back).expect("echo");
        back == tunnelled
    });
    assert!(echoed, "after a 101, bytes are tunnelled untouched");
    // The backend saw the requests before each refusal, and none of what followed one.
    let seen = get(&env, "f.test", "/__seen").body;
    for expected in [
        "GET /no-upgrade",
        "POST /ext",
        "POST /trailers",
        "POST /expect",
        "POST /body",
    ] {
        assert!(seen.contains(expected), "backend saw {expected}: {seen}");
    }
    for never in [
        "/conflict-",
        "/smuggled",
        "/in-body",
        "/gzip",
        "/twice",
        "/te10",
        "/two-lengths",
        "/two-hosts",
    ] {
        assert!(!seen.contains(never), "backend never saw {never}: {seen}");
    }
    assert_eq!(get(&env, "f.test", "/").code, 200, "still serving");
}

/// A second kproxy in the node namespace, killed on drop.
struct Second {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Second {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Second {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- second kproxy log ----\n{}", self.log_text());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Client load on the HTTP listener until `stop`: `fresh` opens a connection per request,
/// otherwise requests follow each other on a keep-alive connection, reconnecting when an
/// answer says `Connection: close`. Returns (answered with 200, failures with what failed).
fn load(
    env: &Env,
    fresh: bool,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, Vec<String>)> {
    let path = format!("/var/run/netns/{}", env.topo.client);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let mut ok = 0u64;
        let mut failed = Vec::new();
        let mut conn: Option<TcpStream> = None;
        let request: &[u8] = if fresh {
            b"GET /load HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\n\r\n"
        } else {
            b"GET /load HTTP/1.1\r\nHost: h.test\r\n\r\n"
        };
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let mut s = match conn.take() {
                Some(s) => s,
                None => match TcpStream::connect(format!("{NODE}:80")) {
                    Ok(s) => {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(15)));
                        s
                    }
                    Err(e) => {
                        failed.push(format!("connect: {e}"));
                        continue;
                    }
                },
            };
            if let Err(e) = s.write_all(request) {
                failed.push(format!("write: {e}"));
                continue;
            }
            match read_answer(&mut s) {
                Ok((200, close)) => {
                    ok += 1;
                    if !close && !fresh {
                        conn = Some(s);
                    }
                }
                Ok((code, _)) => failed.push(format!("answer {code}")),
                Err(e) => failed.push(format!("read: {e}")),
            }
        }
        (ok, failed)
    })
}

/// Reads one answer with a Content-Length body: its code and whether it says `Connection: close`.
fn read_answer(s: &mut TcpStream) -> std::io::Result<(u16, bool)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed after {} bytes", head.len()),
            ));
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body)?;
    Ok((status_of(&text), text.contains("connection: close")))
}

/// A rolling update on one node (`maxSurge: 1, maxUnavailable: 0`): a second kproxy starts
/// beside the first, both listening on the same ports (SO_REUSEPORT), then the first gets
/// SIGTERM and drains. Under continuous load, on fresh and keep-alive connections, no request
/// fails, and both processes served some.
fn handover() {
    let docs = vec![
        node_doc(),
        service_doc("svc-a", "10.96.0.21"),
        slice_doc("svc-a", "http", &[0, 1]),
        ingress_doc(
            "h",
            "",
            "{ingressClassName: kproxy, rules: [{host: h.test, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: svc-a, port: {number: 80}}}}]}}]}",
        ),
    ];
    let env = Env::new("iptables", SourceKind::Manifests, &docs, &args("kproxy"));
    let _backends = start_backends(&env, &[0, 1]);
    wait_code(&env, "h.test", "/", 200);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = [true, true, false, false]
        .into_iter()
        .map(|fresh| load(&env, fresh, stop.clone()))
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    // The new pod: same arguments, its own health and metrics ports.
    let mut second_args: Vec<String> = env.args().to_vec();
    for (flag, value) in [
        ("--healthz-bind-address", "127.0.0.1:20256"),
        ("--metrics-bind-address", "127.0.0.1:20249"),
    ] {
        if let Some(i) = second_args.iter().position(|a| a == flag) {
            second_args[i + 1] = value.to_string();
        }
    }
    let log = std::env::temp_dir().join(format!("{}-kproxy-second.log", env.topo.id));
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &env.topo.node, crate::harness::kproxy_bin()])
        .args(&second_args)
        .env("RUST_LOG", "info,kproxy=debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start the second kproxy");
    let second = Second { child, log };
    eventually("the second kproxy serves", || {
        second.log_text().contains("Ingress listener serving").then_some(())
    });
    eventually("the second kproxy answers requests", || {
        second.log_text().contains("kproxy::access").then_some(())
    });

    // The old pod is told to stop.
    let pid = env.kproxy.pid().expect("pid");
    crate::netns::must("kill", &["-TERM", &pid.to_string()]);
    eventually("the first kproxy exits after draining", || {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .contains("zombie"))
        .then_some(())
    });
    let served_by_second = second.log_text().matches("kproxy::access").count();
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut ok = 0;
    let mut failed = Vec::new();
    for c in clients {
        let (o, f) = c.join().expect("client");
        ok += o;
        failed.extend(f);
    }
    let first_served = env.kproxy.log_text().matches("kproxy::access").count();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(20)]
    );
    assert!(ok > 100, "only {ok} requests in the whole handover");
    assert!(first_served > 0, "the first kproxy served requests");
    assert!(
        second.log_text().matches("kproxy::access").count() > served_by_second,
        "the second kproxy serves after the first is gone"
    );
}
