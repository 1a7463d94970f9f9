//! Conformance-modelled unit tests of the pure Gateway build: listeners, attachment,
//! precedence, filters and statuses, without I/O. Names follow the Gateway API conformance
//! tests they are modelled on.

use std::collections::BTreeMap;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;
use k8s_openapi::api::core::v1::Secret;

use super::build::{build_gateway, GatewayBuilt, GatewayConfig};
use super::objects::{GatewayDocs, GatewayObjects};
use super::proxy::{decide, Decision};
use super::status::{plan_status_writes, Cond, Kind};
use super::CONTROLLER_NAME;
use crate::ingress::objects::ObjectKey;
use crate::ingress::routes::RequestLine;
use crate::ingress::routes::{RouteTable, ServiceLookup};
use crate::model::store::build_service_state;
use crate::model::{Endpoint, PortState, ServiceKey};

const INFRA: &str = "gateway-conformance-infra";
const WEB: &str = "gateway-conformance-web-backend";

/// GatewayClass `kproxy`, and the Gateway `same-namespace` (port 80, routes from its namespace).
const BASE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: kproxy, generation: 1}
spec: {controllerName: kproxy.io/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: other}
spec: {controllerName: example.com/other}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: same-namespace, namespace: gateway-conformance-infra, generation: 1}
spec:
  gatewayClassName: kproxy
  listeners:
  - {name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}}
---
apiVersion: v1
kind: Namespace
metadata: {name: gateway-conformance-web-backend, labels: {gateway-conformance: backend}}
"#;

fn docs(yaml: &str) -> GatewayDocs {
    let mut d = GatewayDocs::default();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
        if v.is_null() {
            continue;
        }
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string();
        assert!(d.add(&s("apiVersion"), &s("kind"), v.clone()).unwrap(), "{v:?}");
    }
    d
}

fn objects(yaml: &str) -> GatewayObjects {
    let mut o = GatewayObjects::default();
    docs(&format!("{BASE}\n---\n{yaml}")).replace_into(&mut o);
    o
}

fn endpoint(ip: &str) -> Endpoint {
    crate::model::testing::endpoint(ip, 3000).build()
}

/// Services `infra-backend-v1..3` in the infra namespace and `web-backend` in the web one,
/// each with port 8080 and one ready endpoint.
fn lookup(key: &ServiceKey) -> ServiceLookup {
    let known = [
        (INFRA, "infra-backend-v1", "10.0.0.1"),
        (INFRA, "infra-backend-v2", "10.0.0.2"),
        (INFRA, "infra-backend-v3", "10.0.0.3"),
        (WEB, "web-backend", "10.0.1.1"),
    ];
    let Some((_, _, ip)) = known
        .iter()
        .find(|(ns, n, _)| &*key.namespace == *ns && &*key.name == *n)
    else {
        return ServiceLookup::Missing;
    };
    let port = crate::model::testing::service_port(&key.to_string(), "http", "10.96.0.1", 8080).arc();
    let mut state = build_service_state(std::slice::from_ref(&port), None);
    state.ports = vec![PortState {
        port,
        endpoints: vec![endpoint(ip)].into(),
    }];
    ServiceLookup::Ports(state)
}

fn cfg() -> GatewayConfig {
    GatewayConfig {
        ingress_http: Some(80),
        ingress_https: Some(443),
        ..GatewayConfig::default()
    }
}

fn build_with(o: &GatewayObjects, secrets: &BTreeMap<ObjectKey, Secret>) -> GatewayBuilt {
    let parsed = secrets
        .iter()
        .map(|(k, s)| (k.clone(), crate::ingress::objects::TlsSecret::parse(k, s)))
        .collect();
    build_gateway(o, &parsed, &lookup, &cfg())
}

fn build(yaml: &str) -> (GatewayObjects, GatewayBuilt) {
    let o = objects(yaml);
    let b = build_with(&o, &BTreeMap::new());
    (o, b)
}

fn table(b: &GatewayBuilt) -> RouteTable {
    let mut t = RouteTable::default();
    t.gateway = b.routes.clone();
    t
}

/// What a request got: the backend Service's name, or the status code.
fn hit(t: &RouteTable, port: u16, host: &str, path: &str, headers: &[(&str, &str)]) -> String {
    hit_method(t, port, host, Method::GET, path, headers)
}

fn hit_method(t: &RouteTable, port: u16, host: &str, method: Method, path: &str, headers: &[(&str, &str)]) -> String {
    let map = header_map(headers);
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let line = RequestLine {
        host,
        method: method.as_str(),
        path,
        query,
    };
    match decide(t, port, false, line, &map) {
        Decision::Ingress => "ingress".into(),
        Decision::Answer(a) => {
            let location = a
                .location
                .clone()
                .or_else(|| a.headers.as_ref()?.get("location")?.to_str().ok().map(str::to_string));
            match location {
                Some(l) => format!("{} {l}", a.status.as_u16()),
                None => a.status.as_u16().to_string(),
            }
        }
        Decision::Forward(f) => f.route().backend.service.name.to_string(),
    }
}

fn header_map(headers: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    map
}

fn line<'a>(host: &'a str, path: &'a str, query: Option<&'a str>) -> RequestLine<'a> {
    RequestLine {
        host,
        method: "GET",
        path,
        query,
    }
}

/// The conditions of the route's entry for Gateway `gw` (in the infra namespace).
fn parent_conditions(b: &GatewayBuilt, route: (&str, &str), gw: &str) -> Vec<Cond> {
    let r = b
        .status
        .routes
        .iter()
        .find(|r| r.key == (route.0.to_string(), route.1.to_string()))
        .unwrap_or_else(|| panic!("no status for {route:?}"));
    r.parents
        .iter()
        .find(|p| p.parent_ref.name == gw)
        .unwrap_or_else(|| panic!("no parent {gw} in {r:?}"))
        .conditions
        .clone()
}

fn condition(conds: &[Cond], type_: &str) -> (bool, String) {
    let c = conds
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} in {conds:?}"));
    (c.status, c.reason.clone())
}

fn listener<'a>(b: &'a GatewayBuilt, gw: &str, name: &str) -> &'a super::status::ListenerReport {
    let g = b
        .status
        .gateways
        .iter()
        .find(|g| g.key.1 == gw)
        .expect("gateway status");
    g.listeners.iter().find(|l| l.name == name).expect("listener status")
}

fn route(name: &str, ns: &str, spec: &str) -> String {
    format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}, generation: 3}}\nspec: {spec}")
}

#[test]
fn httproute_simple_same_namespace() {
    let (_, b) = build(&route(
        "gateway-conformance-infra-test",
        INFRA,
        "{parentRefs: [{name: same-namespace}], rules: [{backendRefs: [{name: infra-backend-v1, port: 8080}]}]}",
    ));
    let t = table(&b);
    assert_eq!(hit(&t, 80, "anything.example", "/", &[]), "infra-backend-v1");
    let c = parent_conditions(&b, (INFRA, "gateway-conformance-infra-test"), "same-namespace");
    assert_eq!(condition(&c, "Accepted"), (true, "Accepted".into()));
    assert_eq!(condition(&c, "ResolvedRefs"), (true, "ResolvedRefs".into()));
    assert_eq!(listener(&b, "same-namespace", "http").attached, 1);
    let class = &b.status.classes[0];
    assert_eq!((class.name.as_str(), class.conditions[0].status), ("kproxy", true));
    assert_eq!(
        b.status.classes.len(),
        1,
        "the other controller's class is not reported"
    );
    assert!(b.listen.is_empty(), "port 80 is the Ingress listener's: shared");
}

#[test]
fn httproute_cross_namespace_by_selector_and_not_by_same() {
    let (_, b) = build(&format!(
        "{}\n---\n{}\n---\n{}",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: backend-namespaces, namespace: gateway-conformance-infra}\nspec: {gatewayClassName: kproxy, listeners: [{name: http, port: 80, protocol: HTTP, hostname: web.example, allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {gateway-conformance: backend}}}}}]}",
        route(
            "cross-namespace",
            WEB,
            "{parentRefs: [{name: backend-namespaces, namespace: gateway-conformance-infra}], rules: [{backendRefs: [{name: web-backend, port: 8080}]}]}"
        ),
        route(
            "invalid-cross-namespace-parent-ref",
            WEB,
            "{parentRefs: [{name: same-namespace, namespace: gateway-conformance-infra}], rules: [{backendRefs: [{name: web-backend, port: 8080}]}]}"
        ),
    ));
    assert_eq!(hit(&table(&b), 80, "web.example", "/", &[]), "web-backend");
    let c = parent_conditions(&b, (WEB, "invalid-cross-namespace-parent-ref"), "same-namespace");
    assert_eq!(condition(&c, "Accepted"), (false, "NotAllowedByListeners".into()));
    assert_eq!(listener(&b, "same-namespace", "http").attached, 0);
}

#[test]
fn httproute_reference_grant_and_invalid_cross_namespace_backend_ref() {
    let r = route(
        "reference-grant",
        INFRA,
        "{parentRefs: [{name: same-namespace}], hostnames: [grant.example], rules: [{backendRefs: [{name: web-backend, namespace: gateway-conformance-web-backend, port: 8080}]}]}",
    );
    let (_, b) = build(&r);
    assert_eq!(
        hit(&table(&b), 80, "grant.example", "/", &[]),
        "500",
        "no ReferenceGrant"
    );
    let c = parent_conditions(&b, (INFRA, "reference-grant"), "same-namespace");
    assert_eq!(condition(&c, "Accepted"), (true, "Accepted".into()));
    assert_eq!(condition(&c, "ResolvedRefs"), (false, "RefNotPermitted".into()));
    let grant = "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: g, namespace: gateway-conformance-web-backend}\nspec: {from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: gateway-conformance-infra}], to: [{group: '', kind: Service, name: web-backend}]}";
    let (_, b) = build(&format!("{r}\n---\n{grant}"));
    assert_eq!(hit(&table(&b), 80, "grant.example", "/", &[]), "web-backend");
    let c = parent_conditions(&b, (INFRA, "reference-grant"), "same-namespace");
    assert_eq!(condition(&c, "ResolvedRefs"), (true, "ResolvedRefs".into()));
}

#[test]
fn httproute_hostname_intersection() {
    let gw = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: httproute-hostname-intersection, namespace: gateway-conformance-infra}\nspec: {gatewayClassName: kproxy, listeners: [{name: listener-1, port: 8080, protocol: HTTP, hostname: very.specific.com}, {name: listener-2, port: 8080, protocol: HTTP, hostname: '*.wildcard.io'}, {name: listener-3, port: 8080, protocol: HTTP, hostname: '*.anotherwildcard.io'}]}";
    let r = |name: &str, hosts: &str, prefix: &str, backend: &str| {
        route(name, INFRA, &format!("{{parentRefs: [{{name: httproute-hostname-intersection}}], hostnames: [{hosts}], rules: [{{matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}], backendRefs: [{{name: {backend}, port: 8080}}]}}]}}"))
    };
    let (_, b) = build(
        &[
            gw.to_string(),
            r(
                "specific-host-matches-listener-specific-host",
                "non.matching.com, '*.nonmatchingwildcard.io', very.specific.com",
                "/s1",
                "infra-backend-v1",
            ),
            r(
                "specific-host-matches-listener-wildcard-host",
                "non.matching.com, wildcard.io, foo.wildcard.io, bar.wildcard.io, foo.bar.wildcard.io",
                "/s2",
                "infra-backend-v2",
            ),
            r(
                "wildcard-host-matches-listener-specific-host",
                "non.matching.com, '*.specific.com'",
                "/s3",
                "infra-backend-v3",
            ),
            r(
                "wildcard-host-matches-listener-wildcard-host",
                "'*.anotherwildcard.io'",
                "/s4",
                "infra-backend-v1",
            ),
            r(
                "no-intersecting-hosts",
                "specific.but.wrong.com, wildcard.io",
                "/s5",
                "infra-backend-v2",
            ),
        ]
        .join("\n---\n"),
    );
    let t = table(&b);
    let cases = [
        ("very.specific.com", "/s1", "infra-backend-v1"),
        ("very.specific.com:1234", "/s1", "infra-backend-v1"),
        ("non.matching.com", "/s1", "404"),
        ("foo.nonmatchingwildcard.io", "/s1", "404"),
        ("foo.wildcard.io", "/s1", "404"),
        ("very.specific.com", "/non-matching-prefix", "404"),
        ("foo.wildcard.io", "/s2", "infra-backend-v2"),
        ("bar.wildcard.io", "/s2", "infra-backend-v2"),
        ("foo.bar.wildcard.io", "/s2", "infra-backend-v2"),
        ("wildcard.io", "/s2", "404"),
        ("very.specific.com", "/s2", "404"),
        ("very.specific.com", "/s3", "infra-backend-v3"),
        ("foo.specific.com", "/s3", "404"),
        ("foo.anotherwildcard.io", "/s4", "infra-backend-v1"),
        ("foo.bar.anotherwildcard.io", "/s4", "infra-backend-v1"),
        ("anotherwildcard.io", "/s4", "404"),
        ("specific.but.wrong.com", "/s5", "404"),
        ("wildcard.io", "/s5", "404"),
    ];
    for (host, path, want) in cases {
        assert_eq!(hit(&t, 8080, host, path, &[]), want, "{host}{path}");
    }
    let c = parent_conditions(&b, (INFRA, "no-intersecting-hosts"), "httproute-hostname-intersection");
    assert_eq!(condition(&c, "Accepted"), (false, "NoMatchingListenerHostname".into()));
    let attached = |l: &str| listener(&b, "httproute-hostname-intersection", l).attached;
    assert_eq!(
        (attached("listener-1"), attached("listener-2"), attached("listener-3")),
        (2, 1, 1)
    );
    assert_eq!(b.listen.get(&8080), Some(&false), "a new port gets its own listener");
}

#[test]
fn httproute_listener_hostname_matching_is_isolated_per_listener() {
    let gw = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: httproute-listener-hostname-matching, namespace: gateway-conformance-infra}\nspec: {gatewayClassName: kproxy, listeners: [{name: listener-1, port: 80, protocol: HTTP, hostname: bar.com}, {name: listener-2, port: 80, protocol: HTTP, hostname: foo.bar.com}, {name: listener-3, port: 80, protocol: HTTP, hostname: '*.bar.com'}, {name: listener-4, port: 80, protocol: HTTP, hostname: '*.foo.com'}]}";
    let r = |name: &str, section: &str, backend: &str| {
        route(name, INFRA, &format!("{{parentRefs: [{{name: httproute-listener-hostname-matching, sectionName: {section}}}], rules: [{{backendRefs: [{{name: {backend}, port: 8080}}]}}]}}"))
    };
    let (_, b) = build(
        &[
            gw.to_string(),
            r("backend-v1", "listener-1", "infra-backend-v1"),
            r("backend-v2", "listener-2", "infra-backend-v2"),
            r("backend-v3", "listener-3", "infra-backend-v3"),
        ]
        .join("\n---\n"),
    );
    let t = table(&b);
    for (host, want) in [
        ("bar.com", "infra-backend-v1"),
        ("foo.bar.com", "infra-backend-v2"),
        ("baz.bar.com", "infra-backend-v3"),
        ("boo.bar.com", "infra-backend-v3"),
        ("multiple.prefixes.bar.com", "infra-backend-v3"),
        ("multiple.prefixes.foo.bar.com", "infra-backend-v3"),
        // listener-4 has no routes: its hosts answer 404, never another listener's routes.
        ("x.foo.com", "404"),
        // The base Gateway's listener without hostname takes it, and has no route for it.
        ("foo.com", "404"),
    ] {
        assert_eq!(hit(&t, 80, host, "/", &[]), want, "{host}");
    }
}

#[test]
fn header_query_method_matching_and_precedence_across_routes() {
    let (_, b) = build(&[
        route("headers", INFRA, "{parentRefs: [{name: same-namespace}], rules: [{matches: [{headers: [{name: version, value: one}]}], backendRefs: [{name: infra-backend-v1, port: 8080}]}, {matches: [{headers: [{name: version, value: two}, {name: color, value: orange}]}], backendRefs: [{name: infra-backend-v2, port: 8080}]}, {matches: [{headers: [{name: Version, type: RegularExpression, value: 'v[0-9]+'}]}], backendRefs: [{name: infra-backend-v3, port: 8080}]}]}"),
        route("query", INFRA, "{parentRefs: [{name: same-namespace}], hostnames: [q.example], rules: [{matches: [{queryParams: [{name: animal, value: whale}]}], backendRefs: [{name: infra-backend-v1, port: 8080}]}, {matches: [{queryParams: [{name: animal, value: dolphin}, {name: color, value: blue}]}], backendRefs: [{name: infra-backend-v2, port: 8080}]}, {matches: [{path: {value: /}}], backendRefs: [{name: infra-backend-v3, port: 8080}]}]}"),
        route("methods", INFRA, "{parentRefs: [{name: same-namespace}], hostnames: [m.example], rules: [{matches: [{method: POST}], backendRefs: [{name: infra-backend-v1, port: 8080}]}, {matches: [{method: GET}], backendRefs: [{name: infra-backend-v2, port: 8080}]}]}"),
        route("paths-a", INFRA, "{parentRefs: [{name: same-namespace}], hostnames: [p.example], rules: [{matches: [{path: {type: Exact, value: /one}}], backendRefs: [{name: infra-backend-v1, port: 8080}]}, {matches: [{path: {type: PathPrefix, value: /two/}}], backendRefs: [{name: infra-backend-v2, port: 8080}]}, {matches: [{path: {type: RegularExpression, value: '/re/[a-z]+'}}], backendRefs: [{name: infra-backend-v3, port: 8080}]}]}"),
        route("paths-b", INFRA, "{parentRefs: [{name: same-namespace}], hostnames: [p.example], rules: [{matches: [{path: {type: PathPrefix, value: /}}], backendRefs: [{name: infra-backend-v3, port: 8080}]}, {matches: [{path: {value: /one}, headers: [{name: x, value: y}]}], backendRefs: [{name: infra-backend-v2, port: 8080}]}]}"),
    ]
    .join("\n---\n"));
    let t = table(&b);
    assert_eq!(hit(&t, 80, "h.example", "/", &[("version", "one")]), "infra-backend-v1");
    assert_eq!(
        hit(&t, 80, "h.example", "/", &[("version", "two")]),
        "404",
        "needs both headers"
    );
    assert_eq!(
        hit(&t, 80, "h.example", "/", &[("version", "two"), ("color", "orange")]),
        "infra-backend-v2"
    );
    assert_eq!(
        hit(&t, 80, "h.example", "/", &[("VERSION", "v42")]),
        "infra-backend-v3",
        "names ignore case, regex"
    );
    assert_eq!(
        hit(&t, 80, "h.example", "/", &[("version", "xv42")]),
        "404",
        "a regex matches the whole value"
    );
    assert_eq!(hit(&t, 80, "q.example", "/?animal=whale", &[]), "infra-backend-v1");
    assert_eq!(
        hit(&t, 80, "q.example", "/?animal=dolphin&color=blue", &[]),
        "infra-backend-v2"
    );
    assert_eq!(hit(&t, 80, "q.example", "/?animal=dolphin", &[]), "infra-backend-v3");
    assert_eq!(
        hit_method(&t, 80, "m.example", Method::POST, "/", &[]),
        "infra-backend-v1"
    );
    assert_eq!(
        hit_method(&t, 80, "m.example", Method::GET, "/", &[]),
        "infra-backend-v2"
    );
    assert_eq!(hit_method(&t, 80, "m.example", Method::HEAD, "/", &[]), "404");
    for (path, headers, want) in [
        ("/one", &[][..], "infra-backend-v1"),
        ("/one", &[("x", "y")][..], "infra-backend-v1"),
        ("/one/x", &[("x", "y")][..], "infra-backend-v2"),
        ("/two", &[][..], "infra-backend-v2"),
        ("/two/deep", &[][..], "infra-backend-v2"),
        ("/twos", &[][..], "infra-backend-v3"),
        ("/re/abc", &[][..], "infra-backend-v3"),
        ("/other", &[][..], "infra-backend-v3"),
    ] {
        assert_eq!(hit(&t, 80, "p.example", path, headers), want, "{path} {headers:?}");
    }
}

#[test]
fn filters_redirects_rewrites_and_header_modifiers() {
    let (_, b) = build(&[
        route("redirect", INFRA, "{parentRefs: [{name: same-namespace}], hostnames: [r.example], rules: [{matches: [{path: {value: /hostname-redirect}}], filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org}}]}, {matches: [{path: {value: /status-code-301}}], filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301}}]}, {matches: [{path: {value: /scheme}}], filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]}, {matches: [{path: {value: /port}}], filters: [{type: RequestRedirect, requestRedirect: {port: 8083}}]}, {matches: [{path: {value: /prefix-and-replace}}], filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement-prefix}}}]}, {matches: [{path: {value: /full}}], filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /full-path-replacement}}}]}]}"),
        route("rewrite", INFRA, "{parentRefs: [{name: same-namespace}], hostnames: [w.example], rules: [{matches: [{path: {value: /prefix/one}}], filters: [{type: URLRewrite, urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}}], backendRefs: [{name: infra-backend-v1, port: 8080}]}, {filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Header-Set, value: set-overwrites-values}], add: [{name: X-Header-Add, value: add-appends-values}], remove: [X-Header-Remove]}}, {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: X-Response, value: r}]}}], backendRefs: [{name: infra-backend-v2, port: 8080}]}]}"),
    ]
    .join("\n---\n"));
    let t = table(&b);
    assert_eq!(
        hit(&t, 80, "r.example", "/hostname-redirect", &[]),
        "302 http://example.org/hostname-redirect"
    );
    assert_eq!(
        hit(&t, 80, "r.example", "/status-code-301", &[]),
        "301 http://r.example/status-code-301"
    );
    assert_eq!(
        hit(&t, 80, "r.example", "/scheme?x=1", &[]),
        "302 https://r.example/scheme?x=1"
    );
    assert_eq!(hit(&t, 80, "r.example", "/port", &[]), "302 http://r.example:8083/port");
    assert_eq!(
        hit(&t, 80, "r.example", "/prefix-and-replace/one", &[]),
        "302 http://r.example/replacement-prefix/one"
    );
    assert_eq!(
        hit(&t, 80, "r.example", "/full/x", &[]),
        "302 http://r.example/full-path-replacement"
    );

    let none = HeaderMap::new();
    let Decision::Forward(f) = decide(&t, 80, false, line("w.example", "/prefix/one/two", Some("q=1")), &none) else {
        panic!("forward")
    };
    assert_eq!(
        (f.host("w.example"), f.path("/prefix/one/two").as_deref()),
        ("rewritten.example", Some("/one/two"))
    );
    assert!(!f.needs_request_headers() && !f.edits_response());

    let mut h = header_map(&[
        ("x-header-set", "old"),
        ("x-header-add", "first"),
        ("x-header-remove", "gone"),
    ]);
    let Decision::Forward(f) = decide(&t, 80, false, line("w.example", "/x", None), &h) else {
        panic!("forward")
    };
    assert_eq!(&*f.route().backend.service.name, "infra-backend-v2");
    assert_eq!((f.host("w.example"), f.path("/x")), ("w.example", None));
    assert!(f.needs_request_headers());
    f.edit_request_headers(&mut h);
    assert_eq!(h["x-header-set"], "set-overwrites-values");
    assert_eq!(h["x-header-add"], "first,add-appends-values");
    assert!(!h.contains_key("x-header-remove"));
    let mut resp = HeaderMap::new();
    assert!(f.edits_response());
    f.edit_response_headers(&mut resp);
    assert_eq!(resp["x-response"], "r");
}

#[test]
fn httproute_weight_and_invalid_backends_keep_their_share_as_500() {
    let (_, b) = build(&route(
        "weighted",
        INFRA,
        "{parentRefs: [{name: same-namespace}], rules: [{backendRefs: [{name: infra-backend-v1, port: 8080, weight: 70}, {name: infra-backend-v2, port: 8080, weight: 30}, {name: infra-backend-v3, port: 8080, weight: 0}, {name: missing, port: 8080, weight: 10}]}]}",
    ));
    let t = table(&b);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..1100 {
        *seen.entry(hit(&t, 80, "w.example", "/", &[])).or_default() += 1;
    }
    assert!(!seen.contains_key("infra-backend-v3"), "weight 0: never");
    assert!((600..800).contains(&seen["infra-backend-v1"]), "{seen:?}");
    assert!((220..380).contains(&seen["infra-backend-v2"]), "{seen:?}");
    assert!(
        (50..150).contains(&seen["500"]),
        "the invalid backend's share: {seen:?}"
    );
    let c = parent_conditions(&b, (INFRA, "weighted"), "same-namespace");
    assert_eq!(condition(&c, "ResolvedRefs"), (false, "BackendNotFound".into()));
}

#[test]
fn httproute_invalid_references_parents_and_rules() {
    let (_, b) = build(&[
        route("unknown-kind", INFRA, "{parentRefs: [{name: same-namespace}], hostnames: [k.example], rules: [{backendRefs: [{group: unknown.example, kind: Widget, name: w, port: 8080}]}]}"),
        route("nonexistent", INFRA, "{parentRefs: [{name: same-namespace}], hostnames: [n.example], rules: [{backendRefs: [{name: nonexistent, port: 8080}]}]}"),
        route("bad-section", INFRA, "{parentRefs: [{name: same-namespace, sectionName: nope}], rules: [{backendRefs: [{name: infra-backend-v1, port: 8080}]}]}"),
        route("bad-port", INFRA, "{parentRefs: [{name: same-namespace, port: 81}], rules: [{backendRefs: [{name: infra-backend-v1, port: 8080}]}]}"),
        route("partly", INFRA, "{parentRefs: [{name: same-namespace}], hostnames: [part.example], rules: [{matches: [{path: {value: /ok}}], backendRefs: [{name: infra-backend-v1, port: 8080}]}, {matches: [{path: {value: /ext}}], filters: [{type: ExtensionRef}], backendRefs: [{name: infra-backend-v1, port: 8080}]}]}"),
        route("all-bad", INFRA, "{parentRefs: [{name: same-namespace}], hostnames: [bad.example], rules: [{matches: [{path: {type: RegularExpression, value: '('}}]}]}"),
        route("theirs", INFRA, "{parentRefs: [{name: not-ours}], rules: [{backendRefs: [{name: infra-backend-v1, port: 8080}]}]}"),
    ]
    .join("\n---\n"));
    let t = table(&b);
    assert_eq!(hit(&t, 80, "k.example", "/", &[]), "500");
    assert_eq!(hit(&t, 80, "n.example", "/", &[]), "500");
    assert_eq!(
        hit(&t, 80, "part.example", "/ok", &[]),
        "infra-backend-v1",
        "the usable rule serves"
    );
    assert_eq!(
        hit(&t, 80, "part.example", "/ext", &[]),
        "500",
        "the unusable rule answers 500"
    );
    let reason = |r: &str, t: &str| condition(&parent_conditions(&b, (INFRA, r), "same-namespace"), t);
    assert_eq!(reason("unknown-kind", "ResolvedRefs"), (false, "InvalidKind".into()));
    assert_eq!(reason("nonexistent", "ResolvedRefs"), (false, "BackendNotFound".into()));
    assert_eq!(reason("nonexistent", "Accepted"), (true, "Accepted".into()));
    assert_eq!(reason("bad-section", "Accepted"), (false, "NoMatchingParent".into()));
    assert_eq!(reason("bad-port", "Accepted"), (false, "NoMatchingParent".into()));
    assert_eq!(reason("partly", "PartiallyInvalid"), (true, "UnsupportedValue".into()));
    assert_eq!(reason("all-bad", "Accepted"), (false, "UnsupportedValue".into()));
    assert!(
        b.status.routes.iter().all(|r| r.key.1 != "theirs"),
        "a route of another Gateway is not ours"
    );
    assert!(b
        .warnings
        .iter()
        .any(|w| w.contains("HTTPRoute gateway-conformance-infra/nonexistent")));
}

fn tls_secret(ns: &str, name: &str, key_ok: bool) -> (ObjectKey, Secret) {
    let cert = rcgen::generate_simple_self_signed(vec!["secure.example".to_string()]).unwrap();
    let key = if key_ok {
        cert.key_pair.serialize_pem()
    } else {
        "garbage".into()
    };
    let mut s: Secret = serde_yaml::from_str(&format!(
        "metadata: {{name: {name}, namespace: {ns}}}\ntype: kubernetes.io/tls"
    ))
    .unwrap();
    s.data = Some(BTreeMap::from([
        (
            "tls.crt".to_string(),
            k8s_openapi::ByteString(cert.cert.pem().into_bytes()),
        ),
        ("tls.key".to_string(), k8s_openapi::ByteString(key.into_bytes())),
    ]));
    ((ns.into(), name.into()), s)
}

#[test]
fn gateway_secrets_invalid_tls_configuration_and_reference_grants() {
    let gw = |name: &str, refs: &str| {
        format!("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: gateway-conformance-infra}}\nspec: {{gatewayClassName: kproxy, listeners: [{{name: https, port: 8443, protocol: HTTPS, hostname: {name}.example, tls: {{certificateRefs: [{refs}]}}}}]}}")
    };
    let grant = "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: reference-grant-specific, namespace: gateway-conformance-web-backend}\nspec: {from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: gateway-conformance-infra}], to: [{group: '', kind: Secret, name: certificate}]}";
    let o = objects(
        &[
            gw("ok", "{name: tls-validity-checks-certificate}"),
            gw("nonexistent", "{name: nonexistent-certificate}"),
            gw(
                "unsupported-group",
                "{group: wrong.group.company.io, kind: Secret, name: tls-validity-checks-certificate}",
            ),
            gw(
                "unsupported-kind",
                "{group: '', kind: WrongKind, name: tls-validity-checks-certificate}",
            ),
            gw("malformed", "{name: malformed-certificate}"),
            gw(
                "granted",
                "{name: certificate, namespace: gateway-conformance-web-backend}",
            ),
            gw(
                "not-granted",
                "{name: other-certificate, namespace: gateway-conformance-web-backend}",
            ),
            grant.to_string(),
        ]
        .join("\n---\n"),
    );
    let secrets = BTreeMap::from([
        tls_secret(INFRA, "tls-validity-checks-certificate", true),
        tls_secret(INFRA, "malformed-certificate", false),
        tls_secret(WEB, "certificate", true),
        tls_secret(WEB, "other-certificate", true),
    ]);
    let b = build_with(&o, &secrets);
    let resolved = |g: &str| condition(&listener(&b, g, "https").conditions, "ResolvedRefs");
    let programmed = |g: &str| condition(&listener(&b, g, "https").conditions, "Programmed").0;
    assert_eq!(resolved("ok"), (true, "ResolvedRefs".into()));
    assert!(programmed("ok"));
    for g in ["nonexistent", "unsupported-group", "unsupported-kind", "malformed"] {
        assert_eq!(resolved(g), (false, "InvalidCertificateRef".into()), "{g}");
        assert!(!programmed(g), "{g}");
    }
    assert_eq!(resolved("granted"), (true, "ResolvedRefs".into()));
    assert_eq!(resolved("not-granted"), (false, "RefNotPermitted".into()));
    let certs = &b.tls[&8443];
    let hosts: Vec<&str> = certs.iter().map(|c| c.host.as_str()).collect();
    assert_eq!(
        hosts,
        ["granted.example", "ok.example"],
        "Gateway age, then name, order"
    );
    assert!(certs.iter().all(|c| c.suffix_match));
    assert_eq!(b.listen.get(&8443), Some(&true));
}

#[test]
fn gateway_invalid_route_kind_conflicts_and_unavailable_ports() {
    let o = objects(&[
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gateway-only-invalid-route-kind, namespace: gateway-conformance-infra}\nspec: {gatewayClassName: kproxy, listeners: [{name: http, port: 80, protocol: HTTP, allowedRoutes: {kinds: [{kind: InvalidRoute}]}}]}",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gateway-supported-and-invalid-route-kind, namespace: gateway-conformance-infra}\nspec: {gatewayClassName: kproxy, listeners: [{name: http, port: 80, protocol: HTTP, hostname: s.example, allowedRoutes: {kinds: [{kind: InvalidRoute}, {kind: HTTPRoute}]}}]}",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: conflicts, namespace: gateway-conformance-infra}\nspec: {gatewayClassName: kproxy, listeners: [{name: a, port: 9000, protocol: HTTP, hostname: a.example}, {name: b, port: 9000, protocol: HTTP, hostname: a.example}, {name: c, port: 9001, protocol: HTTP}, {name: d, port: 9001, protocol: HTTPS, tls: {certificateRefs: [{name: x}]}}, {name: tcp, port: 9002, protocol: TCP}, {name: plain-on-443, port: 443, protocol: HTTP}, {name: fine, port: 9003, protocol: HTTP}]}",
        &route("to-invalid-kind", INFRA, "{parentRefs: [{name: gateway-only-invalid-route-kind}], rules: [{backendRefs: [{name: infra-backend-v1, port: 8080}]}]}"),
    ]
    .join("\n---\n"));
    let mut c = cfg();
    c.unavailable.insert(9003, "Address in use".into());
    let b = build_gateway(&o, &BTreeMap::new(), &lookup, &c);
    let only = listener(&b, "gateway-only-invalid-route-kind", "http");
    assert!(only.supported_kinds.is_empty());
    assert_eq!(
        condition(&only.conditions, "ResolvedRefs"),
        (false, "InvalidRouteKinds".into())
    );
    let both = listener(&b, "gateway-supported-and-invalid-route-kind", "http");
    assert_eq!(both.supported_kinds.len(), 1);
    assert_eq!(both.supported_kinds[0].kind, "HTTPRoute");
    assert_eq!(
        condition(&both.conditions, "ResolvedRefs"),
        (false, "InvalidRouteKinds".into())
    );
    let c = parent_conditions(&b, (INFRA, "to-invalid-kind"), "gateway-only-invalid-route-kind");
    assert_eq!(condition(&c, "Accepted"), (false, "NotAllowedByListeners".into()));
    let l = |n: &str| listener(&b, "conflicts", n).conditions.clone();
    assert_eq!(condition(&l("a"), "Conflicted"), (true, "HostnameConflict".into()));
    assert_eq!(condition(&l("b"), "Conflicted"), (true, "HostnameConflict".into()));
    assert_eq!(condition(&l("a"), "Accepted"), (false, "Invalid".into()));
    assert_eq!(condition(&l("c"), "Conflicted"), (true, "ProtocolConflict".into()));
    assert_eq!(condition(&l("d"), "Conflicted"), (true, "ProtocolConflict".into()));
    assert!(!condition(&l("d"), "Programmed").0);
    assert_eq!(condition(&l("tcp"), "Accepted"), (false, "UnsupportedProtocol".into()));
    assert_eq!(
        condition(&l("plain-on-443"), "Accepted"),
        (false, "PortUnavailable".into())
    );
    assert_eq!(condition(&l("fine"), "Accepted"), (false, "PortUnavailable".into()));
    let gw = b.status.gateways.iter().find(|g| g.key.1 == "conflicts").unwrap();
    assert_eq!(
        condition(&gw.conditions, "Accepted"),
        (true, "ListenersNotValid".into()),
        "one listener is valid"
    );
    assert!(
        !b.listen.contains_key(&9000) && !b.listen.contains_key(&9001),
        "conflicted ports are not served"
    );
    assert!(b.listen.contains_key(&9003), "still wanted: binding is tried again");
}

#[test]
fn ingress_keeps_its_hosts_on_a_shared_port_and_other_ports_never_see_ingress_routes() {
    let (_, b) = build(&[
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: catch-all, namespace: gateway-conformance-infra}\nspec: {gatewayClassName: kproxy, listeners: [{name: http, port: 8080, protocol: HTTP}]}".to_string(),
        route("any", INFRA, "{parentRefs: [{name: same-namespace}, {name: catch-all}], rules: [{backendRefs: [{name: infra-backend-v1, port: 8080}]}]}"),
    ]
    .join("\n---\n"));
    let ingress: k8s_openapi::api::networking::v1::Ingress = serde_yaml::from_str(
        "metadata: {name: i, namespace: default}\nspec: {ingressClassName: kproxy, rules: [{host: ingress.example, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: s, port: {number: 8080}}}}]}}]}",
    )
    .unwrap();
    let mut objects = crate::ingress::objects::IngressObjects::default();
    use crate::ingress::objects::IngressObject;
    k8s_openapi::api::networking::v1::Ingress::replace(&mut objects, &[ingress]);
    let svc = |k: &ServiceKey| {
        if &*k.name == "s" {
            lookup(&ServiceKey::new(INFRA, "infra-backend-v2"))
        } else {
            ServiceLookup::Missing
        }
    };
    let mut t = crate::ingress::routes::build_routes(
        &objects,
        &crate::ingress::routes::ClassConfig { class: "kproxy".into() },
        &svc,
    )
    .table;
    t.gateway = b.routes.clone();
    assert_eq!(
        hit(&t, 80, "ingress.example", "/", &[]),
        "ingress",
        "an exact Ingress host beats a catch-all listener"
    );
    assert_eq!(hit(&t, 80, "other.example", "/", &[]), "infra-backend-v1");
    assert_eq!(
        hit(&t, 8080, "ingress.example", "/", &[]),
        "infra-backend-v1",
        "port 8080 is the Gateway's alone"
    );
    assert_eq!(
        hit(&t, 9999, "ingress.example", "/", &[]),
        "404",
        "no listener on that port"
    );
}

fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).unwrap(),
    )
}

#[test]
fn status_writes_keep_other_controllers_entries_and_settle() {
    let mut o = objects(&route(
        "r",
        INFRA,
        "{parentRefs: [{name: same-namespace}, {name: elsewhere}], rules: [{backendRefs: [{name: infra-backend-v1, port: 8080}]}]}",
    ));
    let foreign = serde_json::json!({
        "parentRef": {"name": "elsewhere"},
        "controllerName": "example.com/other",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "lastTransitionTime": "2020-01-01T00:00:00Z"}],
    });
    let key = (INFRA.to_string(), "r".to_string());
    o.routes.get_mut(&key).unwrap().status = Some(super::types::HttpRouteStatus {
        parents: vec![foreign.clone()],
    });
    o.routes.get_mut(&key).unwrap().metadata.resource_version = Some("41".into());
    let b = build_with(&o, &BTreeMap::new());
    let writes = plan_status_writes(&b.status, &o, Some("192.0.2.1"), &now());
    let route_write = writes.iter().find(|w| w.kind == Kind::HttpRoute).expect("route status");
    assert_eq!(
        route_write.patch["metadata"]["resourceVersion"], "41",
        "conditional on what was read"
    );
    let parents = route_write.patch["status"]["parents"].as_array().unwrap();
    assert_eq!(parents[0], foreign, "another controller's entry is left as it was");
    assert_eq!(parents[1]["controllerName"], CONTROLLER_NAME);
    assert_eq!(parents[1]["parentRef"]["namespace"], INFRA);
    assert_eq!(parents[1]["conditions"][0]["observedGeneration"], 3);
    let gw_write = writes.iter().find(|w| w.kind == Kind::Gateway).expect("gateway status");
    assert_eq!(
        gw_write.patch["status"]["addresses"][0],
        serde_json::json!({"type": "IPAddress", "value": "192.0.2.1"})
    );
    assert_eq!(gw_write.patch["status"]["listeners"][0]["attachedRoutes"], 1);
    let class_write = writes
        .iter()
        .find(|w| w.kind == Kind::GatewayClass)
        .expect("class status");
    assert_eq!(class_write.patch["status"]["conditions"][0]["type"], "Accepted");
    assert!(
        class_write.patch["status"]["supportedFeatures"]
            .as_array()
            .unwrap()
            .len()
            > 10
    );

    // Applied as written, the same report plans nothing more: no write loop.
    let mut after = o.clone();
    for w in &writes {
        let status = w.patch["status"].clone();
        match w.kind {
            Kind::HttpRoute => after.routes.get_mut(&w.key).unwrap().status = serde_json::from_value(status).unwrap(),
            Kind::Gateway => after.gateways.get_mut(&w.key).unwrap().status = serde_json::from_value(status).unwrap(),
            Kind::GatewayClass => {
                after.classes.get_mut(&w.key.1).unwrap().status = serde_json::from_value(status).unwrap()
            }
        }
    }
    let later = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1_900_000_000).unwrap(),
    );
    assert_eq!(plan_status_writes(&b.status, &after, Some("192.0.2.1"), &later), vec![]);

    // A generation bump (HTTPRouteObservedGenerationBump): written again, with the new
    // generation and the old transition time (the status did not change).
    after.routes.get_mut(&key).unwrap().metadata.generation = Some(4);
    let b2 = build_with(&after, &BTreeMap::new());
    let writes = plan_status_writes(&b2.status, &after, Some("192.0.2.1"), &later);
    let w = writes.iter().find(|w| w.kind == Kind::HttpRoute).expect("rewritten");
    let ours = &w.patch["status"]["parents"][1]["conditions"][0];
    assert_eq!(ours["observedGeneration"], 4);
    assert_eq!(ours["lastTransitionTime"], "2027-01-15T08:00:00Z");

    // Detached from kproxy's Gateway: kproxy's entry goes, the other one stays.
    after.routes.get_mut(&key).unwrap().spec.parent_refs.remove(0);
    let b3 = build_with(&after, &BTreeMap::new());
    let writes = plan_status_writes(&b3.status, &after, Some("192.0.2.1"), &later);
    let w = writes
        .iter()
        .find(|w| w.kind == Kind::HttpRoute)
        .expect("entry removed");
    assert_eq!(w.patch["status"]["parents"], serde_json::json!([foreign]));
}

#[test]
fn nothing_is_built_or_reported_before_every_kind_is_listed() {
    let o = GatewayObjects::default();
    let b = build_with(&o, &BTreeMap::new());
    assert!(!b.status.ready && b.routes.ports.is_empty());
    assert_eq!(
        b.routes.ingress_ports,
        [80, 443],
        "the Ingress ports are known regardless"
    );
    assert!(plan_status_writes(&b.status, &o, Some("192.0.2.1"), &now()).is_empty());
}
