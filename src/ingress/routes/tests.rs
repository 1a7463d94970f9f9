use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{Ingress, IngressClass};

use super::*;
use crate::ingress::objects::IngressObject;
use crate::model::store::build_service_state;
use crate::model::testing::service_port;
use crate::model::{testing, Endpoint, PortState};

fn endpoint(ip: &str, port: u16, ready: bool) -> Endpoint {
    testing::endpoint(ip, port).conditions(ready, ready, false).build()
}

/// Service `name` in `ns` with port 80 named `http`, its endpoints on 8080.
fn service(ns: &str, name: &str, eps: &[(&str, bool)]) -> (ServiceKey, ServiceLookup) {
    let key = ServiceKey::new(ns, name);
    let port = service_port(&key.to_string(), "http", "10.96.0.1", 80).arc();
    let mut state = build_service_state(std::slice::from_ref(&port), None);
    state.ports = vec![PortState {
        port,
        endpoints: eps.iter().map(|(ip, r)| endpoint(ip, 8080, *r)).collect(),
    }];
    (key, ServiceLookup::Ports(state))
}

fn services() -> BTreeMap<ServiceKey, ServiceLookup> {
    let mut m: BTreeMap<ServiceKey, ServiceLookup> = ["a", "b", "c", "d"]
        .iter()
        .enumerate()
        .map(|(i, n)| service("default", n, &[(&format!("10.244.0.{}", i + 1), true)]))
        .collect();
    let (k, v) = service("default", "down", &[("10.244.9.9", false)]);
    m.insert(k, v);
    m.insert(
        ServiceKey::new("default", "ext"),
        ServiceLookup::ExternalName("example.org".into()),
    );
    m
}

fn ingress(yaml: &str) -> Ingress {
    serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}: {yaml}"))
}

/// An Ingress named `name` of class kproxy with `rules` (YAML flow sequence) and extra metadata.
fn ing(name: &str, created: &str, annotations: &str, spec: &str) -> Ingress {
    ingress(&format!(
        "metadata: {{name: {name}, namespace: default, creationTimestamp: '{created}', annotations: {{{annotations}}}}}\nspec: {spec}"
    ))
}

fn rule(host: &str, paths: &[(&str, &str, &str)]) -> String {
    let paths: Vec<String> = paths
        .iter()
        .map(|(path, ty, svc)| {
            format!("{{path: '{path}', pathType: {ty}, backend: {{service: {{name: {svc}, port: {{number: 80}}}}}}}}")
        })
        .collect();
    let host = if host.is_empty() {
        String::new()
    } else {
        format!("host: '{host}', ")
    };
    format!("{{{host}http: {{paths: [{}]}}}}", paths.join(", "))
}

fn build_with(ingresses: &[Ingress], classes: &[IngressClass], class: &str) -> Built {
    let mut objects = IngressObjects::default();
    for i in ingresses {
        Ingress::apply(&mut objects, i);
    }
    for c in classes {
        IngressClass::apply(&mut objects, c);
    }
    let svcs = services();
    let lookup = move |k: &ServiceKey| svcs.get(k).cloned().unwrap_or(ServiceLookup::Missing);
    build_routes(&objects, &ClassConfig { class: class.into() }, &lookup)
}

fn build(ingresses: &[Ingress]) -> Built {
    let with_class: Vec<Ingress> = ingresses
        .iter()
        .cloned()
        .map(|mut i| {
            let spec = i.spec.get_or_insert_with(Default::default);
            spec.ingress_class_name.get_or_insert_with(|| "kproxy".into());
            i
        })
        .collect();
    build_with(&with_class, &[], "kproxy")
}

/// The Service a request reaches, or "404".
fn target(t: &RouteTable, host: &str, path: &str) -> String {
    t.route(host, path)
        .map_or("404".into(), |r| r.backend.service.name.to_string())
}

/// (path, pathType, service) of one rule.
type Paths<'a> = &'a [(&'a str, &'a str, &'a str)];

/// The Ingress v1 documentation's table of examples, plus the cases around it.
#[test]
fn path_types_per_the_api_documentation() {
    // (rule paths, request path, expected service; "404" when nothing matches)
    let cases: &[(Paths, &str, &str)] = &[
        (&[("/", "Prefix", "a")], "/anything/at/all", "a"),
        (&[("/", "Prefix", "a")], "/", "a"),
        (&[("/foo", "Exact", "a")], "/foo", "a"),
        (&[("/foo", "Exact", "a")], "/bar", "404"),
        (&[("/foo", "Exact", "a")], "/foo/", "404"),
        (&[("/foo/", "Exact", "a")], "/foo", "404"),
        (&[("/foo", "Exact", "a")], "/FOO", "404"),
        (&[("/foo", "Prefix", "a")], "/foo", "a"),
        (&[("/foo", "Prefix", "a")], "/foo/", "a"),
        (&[("/foo/", "Prefix", "a")], "/foo", "a"),
        (&[("/foo/", "Prefix", "a")], "/foo/", "a"),
        (&[("/aaa/bb", "Prefix", "a")], "/aaa/bbb", "404"),
        (&[("/aaa/bbb", "Prefix", "a")], "/aaa/bbb", "a"),
        (&[("/aaa/bbb/", "Prefix", "a")], "/aaa/bbb", "a"),
        (&[("/aaa/bbb", "Prefix", "a")], "/aaa/bbb/", "a"),
        (&[("/aaa/bbb", "Prefix", "a")], "/aaa/bbb/ccc", "a"),
        (&[("/aaa/bbb", "Prefix", "a")], "/aaa/bbbxyz", "404"),
        (&[("/", "Prefix", "a"), ("/aaa", "Prefix", "b")], "/aaa/ccc", "b"),
        (
            &[
                ("/", "Prefix", "a"),
                ("/aaa", "Prefix", "b"),
                ("/aaa/bbb", "Prefix", "c"),
            ],
            "/aaa/bbb",
            "c",
        ),
        (
            &[
                ("/", "Prefix", "a"),
                ("/aaa", "Prefix", "b"),
                ("/aaa/bbb", "Prefix", "c"),
            ],
            "/ccc",
            "a",
        ),
        (&[("/aaa", "Prefix", "a")], "/ccc", "404"),
        (&[("/foo", "Prefix", "a"), ("/foo", "Exact", "b")], "/foo", "b"),
        (&[("/foo", "Exact", "b"), ("/foo", "Prefix", "a")], "/foo/x", "a"),
        // ImplementationSpecific is Prefix without use-regex.
        (&[("/foo", "ImplementationSpecific", "a")], "/foo/bar", "a"),
        (&[("/foo", "ImplementationSpecific", "a")], "/foobar", "404"),
        (
            &[("/foo", "ImplementationSpecific", "a"), ("/foo/bar", "Exact", "b")],
            "/foo/bar",
            "b",
        ),
    ];
    for (paths, request, want) in cases {
        let b = build(&[ing(
            "i",
            "2024-01-01T00:00:00Z",
            "",
            &format!("{{rules: [{}]}}", rule("h.example.com", paths)),
        )]);
        assert!(b.warnings.is_empty(), "{:?}", b.warnings);
        assert_eq!(
            &target(&b.table, "h.example.com", request),
            want,
            "paths {paths:?}, request {request}"
        );
    }
}

#[test]
fn hosts_exact_wildcard_and_any() {
    let b = build(&[ing(
        "i",
        "2024-01-01T00:00:00Z",
        "",
        &format!(
            "{{rules: [{}, {}, {}]}}",
            rule("foo.example.com", &[("/", "Prefix", "a")]),
            rule("*.example.com", &[("/", "Prefix", "b")]),
            rule("", &[("/only", "Prefix", "c")])
        ),
    )]);
    let t = &b.table;
    let cases = [
        ("foo.example.com", "/", "a"),
        ("FOO.example.com:8443", "/", "a"),
        ("foo.example.com.", "/", "a"),
        ("bar.example.com", "/", "b"),
        // Exactly one label.
        ("a.bar.example.com", "/only", "c"),
        ("example.com", "/only", "c"),
        ("example.com", "/", "404"),
        ("other.test", "/only/x", "c"),
        // No fall-through from a matching host to the host-less rules.
        ("bar.example.com", "/only", "b"),
        ("10.0.0.1:80", "/only", "c"),
        ("[::1]:80", "/only", "c"),
    ];
    for (host, path, want) in cases {
        assert_eq!(target(t, host, path), want, "{host} {path}");
    }
}

#[test]
fn merge_across_ingresses_oldest_wins_conflicts() {
    let older = ing(
        "older",
        "2024-01-01T00:00:00Z",
        "",
        &format!("{{rules: [{}]}}", rule("h", &[("/", "Prefix", "a")])),
    );
    let newer = ing(
        "newer",
        "2024-06-01T00:00:00Z",
        "",
        &format!(
            "{{rules: [{}]}}",
            rule("h", &[("/", "Prefix", "b"), ("/api", "Prefix", "c")])
        ),
    );
    for order in [[older.clone(), newer.clone()], [newer.clone(), older.clone()]] {
        let b = build(&order);
        assert_eq!(target(&b.table, "h", "/x"), "a");
        assert_eq!(target(&b.table, "h", "/api/v1"), "c", "non-conflicting rules merge");
        assert_eq!(b.warnings.len(), 1, "{:?}", b.warnings);
        assert!(b.warnings[0].contains("default/newer") && b.warnings[0].contains("default/older"));
    }
}

#[test]
fn default_backends_and_404() {
    let with_default = ing(
        "d",
        "2024-01-01T00:00:00Z",
        "",
        &format!(
            "{{defaultBackend: {{service: {{name: d, port: {{number: 80}}}}}}, rules: [{}]}}",
            rule("h", &[("/app", "Prefix", "a")])
        ),
    );
    let only_default = ing(
        "e",
        "2024-02-01T00:00:00Z",
        "",
        "{defaultBackend: {service: {name: c, port: {name: http}}}}",
    );
    let b = build(&[with_default, only_default]);
    let t = &b.table;
    assert_eq!(target(t, "h", "/app"), "a");
    assert_eq!(target(t, "h", "/other"), "d", "the Ingress's default serves its host");
    assert_eq!(
        target(t, "unknown", "/"),
        "d",
        "the oldest default serves unmatched hosts"
    );
    let b = build(&[ing(
        "x",
        "2024-01-01T00:00:00Z",
        "",
        &format!("{{rules: [{}]}}", rule("h", &[("/app", "Prefix", "a")])),
    )]);
    assert_eq!(target(&b.table, "h", "/other"), "404");
    assert_eq!(target(&b.table, "nope", "/app"), "404");
}

#[test]
fn backends_resolve_to_ready_endpoints_by_number_or_name() {
    let b = build(&[ing(
        "i",
        "2024-01-01T00:00:00Z",
        "",
        "{rules: [{host: h, http: {paths: [
            {path: /n, pathType: Prefix, backend: {service: {name: a, port: {number: 80}}}},
            {path: /name, pathType: Prefix, backend: {service: {name: b, port: {name: http}}}},
            {path: /down, pathType: Prefix, backend: {service: {name: down, port: {number: 80}}}},
            {path: /ext, pathType: Prefix, backend: {service: {name: ext, port: {number: 443}}}}]}}]}",
    )]);
    assert!(b.warnings.is_empty(), "{:?}", b.warnings);
    let up = |p: &str| b.table.route("h", p).unwrap().backend.upstream.clone();
    assert_eq!(up("/n"), Upstream::Endpoints(vec!["10.244.0.1:8080".parse().unwrap()]));
    assert_eq!(
        up("/name"),
        Upstream::Endpoints(vec!["10.244.0.2:8080".parse().unwrap()])
    );
    assert_eq!(up("/down"), Upstream::Endpoints(vec![]), "no ready endpoint: 503");
    assert_eq!(
        up("/ext"),
        Upstream::ExternalName {
            host: "example.org".into(),
            port: 443
        }
    );
}

#[test]
fn unusable_ingresses_are_skipped_with_a_warning_others_serve() {
    let good = ing(
        "good",
        "2024-01-01T00:00:00Z",
        "",
        &format!("{{rules: [{}]}}", rule("g", &[("/", "Prefix", "a")])),
    );
    let bad = [
        ing("nosvc", "2024-01-01T00:00:00Z", "", &format!("{{rules: [{}]}}", rule("h", &[("/", "Prefix", "missing")]))),
        ing("noport", "2024-01-01T00:00:00Z", "", "{rules: [{host: h, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: a, port: {number: 81}}}}]}}]}"),
        ing("badpath", "2024-01-01T00:00:00Z", "", &format!("{{rules: [{}]}}", rule("h", &[("foo", "Prefix", "a")]))),
        ing(
            "badregex",
            "2024-01-01T00:00:00Z",
            "nginx.ingress.kubernetes.io/use-regex: 'true'",
            &format!("{{rules: [{}]}}", rule("h", &[("/(", "ImplementationSpecific", "a")])),
        ),
        ing("badhost", "2024-01-01T00:00:00Z", "", &format!("{{rules: [{}]}}", rule("a.*.com", &[("/", "Prefix", "a")]))),
    ];
    for b in bad {
        let name = b.metadata.name.clone().unwrap();
        let built = build(&[good.clone(), b]);
        assert_eq!(target(&built.table, "g", "/"), "a");
        assert_eq!(target(&built.table, "h", "/"), "404");
        assert_eq!(built.warnings.len(), 1, "{name}: {:?}", built.warnings);
        assert!(
            built.warnings[0].contains(&format!("default/{name}")),
            "{:?}",
            built.warnings
        );
    }
}

#[test]
fn class_claiming() {
    let class = |name: &str, controller: &str, default: bool| -> IngressClass {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, annotations: {{ingressclass.kubernetes.io/is-default-class: '{default}'}}}}\nspec: {{controller: {controller}}}"
        ))
        .unwrap()
    };
    let with_class = |name: &str, c: Option<&str>| {
        let spec = format!("{{rules: [{}]}}", rule(name, &[("/", "Prefix", "a")]));
        let mut i = ing(name, "2024-01-01T00:00:00Z", "", &spec);
        i.spec.as_mut().unwrap().ingress_class_name = c.map(String::from);
        i
    };
    let legacy = ing(
        "legacy",
        "2024-01-01T00:00:00Z",
        "kubernetes.io/ingress.class: nginx",
        &format!("{{rules: [{}]}}", rule("legacy", &[("/", "Prefix", "a")])),
    );
    let all = [
        with_class("flag", Some("nginx")),
        with_class("ours", Some("kp")),
        with_class("other", Some("traefik")),
        with_class("none", None),
        legacy,
    ];
    let classes = [
        class("kp", CONTROLLER_NAME, false),
        class("traefik", "traefik.io/ingress-controller", true),
    ];
    let b = build_with(&all, &classes, "nginx");
    let served = |b: &Built| ["flag", "ours", "other", "none", "legacy"].map(|h| target(&b.table, h, "/") == "a");
    assert_eq!(served(&b), [true, true, false, false, true]);
    // Class-less Ingresses are ours when our IngressClass is the default.
    let classes = [class("kp", CONTROLLER_NAME, true)];
    assert_eq!(
        served(&build_with(&all, &classes, "nginx")),
        [true, true, false, true, true]
    );
}

#[test]
fn rewrite_target_with_and_without_captures() {
    let walkthrough = ing(
        "w",
        "2024-01-01T00:00:00Z",
        "nginx.ingress.kubernetes.io/rewrite-target: /",
        &format!("{{rules: [{}]}}", rule("h", &[("/", "Prefix", "a")])),
    );
    let captures = ing(
        "c",
        "2024-01-01T00:00:00Z",
        "nginx.ingress.kubernetes.io/rewrite-target: /$2, nginx.ingress.kubernetes.io/use-regex: 'true'",
        &format!(
            "{{rules: [{}]}}",
            rule("r", &[("/something(/|$)(.*)", "ImplementationSpecific", "b")])
        ),
    );
    let b = build(&[walkthrough, captures]);
    let rw = |host: &str, p: &str| b.table.route(host, p).map(|r| r.rewrite_path(p));
    // rewrite-target: / with path / sends every request to / (as ingress-nginx does).
    assert_eq!(rw("h", "/index.html").as_deref(), Some("/"));
    assert_eq!(rw("h", "/").as_deref(), Some("/"));
    assert_eq!(rw("r", "/something").as_deref(), Some("/"));
    assert_eq!(rw("r", "/something/").as_deref(), Some("/"));
    assert_eq!(rw("r", "/something/new").as_deref(), Some("/new"));
    assert_eq!(
        rw("r", "/SOMETHING/x").as_deref(),
        Some("/x"),
        "case-insensitive like nginx's ~*"
    );
    assert_eq!(rw("r", "/other"), None);
    assert_eq!(expand_dollars("/$1x$"), "/${1}x$$");
}

#[test]
fn tls_hosts_and_canary() {
    let main = ing(
        "main",
        "2024-01-01T00:00:00Z",
        "",
        &format!(
            "{{tls: [{{hosts: ['*.example.com'], secretName: wild}}, {{secretName: plain}}], rules: [{}, {}]}}",
            rule("a.example.com", &[("/", "Prefix", "a")]),
            rule("other.test", &[("/", "Prefix", "a")])
        ),
    );
    let canary = ing(
        "canary",
        "2024-02-01T00:00:00Z",
        "nginx.ingress.kubernetes.io/canary: 'true', nginx.ingress.kubernetes.io/canary-weight: '20'",
        &format!(
            "{{rules: [{}, {}]}}",
            rule("a.example.com", &[("/", "Prefix", "b")]),
            rule("nomain", &[("/", "Prefix", "b")])
        ),
    );
    let b = build(&[main, canary]);
    assert_eq!(b.warnings.len(), 1, "canary without main: {:?}", b.warnings);
    let r = b.table.route("a.example.com", "/").unwrap();
    assert!(r.host_tls);
    assert_eq!(&*r.backend.service.name, "a");
    let c = r.canary.as_ref().unwrap();
    assert_eq!((c.canary.weight, &*c.route.backend.service.name), (20, "b"));
    assert!(b.table.host_has_tls("x.example.com"));
    assert!(
        b.table.host_has_tls("other.test"),
        "tls without hosts covers the Ingress's hosts"
    );
    assert!(!b.table.host_has_tls("x.y.example.com"));
    assert_eq!(b.table.tls.len(), 3);
}
