//! The Ingress route table builder and matcher: arbitrary Ingresses (hosts exact, wildcard and
//! odd; every pathType with arbitrary paths, regexes under `use-regex`; rewrite targets; TLS;
//! default backends; backends that exist, are ExternalName, lack endpoints or are missing)
//! become a table, and arbitrary requests are matched and rewritten against it.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::{Arbitrary, Unstructured};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule, IngressServiceBackend, IngressSpec,
    IngressTLS, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kproxy::ingress::objects::IngressObject;
use kproxy::ingress::routes::{build_routes, ClassConfig};
use libfuzzer_sys::fuzz_target;

/// The Services the Ingresses may name: endpoints, no endpoints, ExternalName, and one that
/// does not exist.
const SERVICES: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}, {name: https, port: 443}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: https, port: 8443}]
endpoints: [{addresses: [10.244.1.2], conditions: {ready: true}}, {addresses: [10.244.2.2], conditions: {ready: false}}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: default}
spec: {type: ExternalName, externalName: backend.example.com, ports: [{name: http, port: 80}]}
---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: other}
spec: {controller: example.com/other}
";
const SERVICE_NAMES: &[&str] = &["web", "empty", "ext", "missing"];
const PORT_NAMES: &[&str] = &["http", "https", "nope", ""];
const HOSTS: &[&str] = &[
    "a.test",
    "*.test",
    "b.a.test",
    "A.Test.",
    "*.a.test",
    "x.test:8080",
    "",
    "*",
];
const PATHS: &[&str] = &["/", "/a", "/a/", "/a/b", "/something(/|$)(.*)", "/[", "a", "//"];
const PATH_TYPES: &[&str] = &["Exact", "Prefix", "ImplementationSpecific", "Other"];
const ANNOTATIONS: &[&str] = &[
    "nginx.ingress.kubernetes.io/rewrite-target",
    "nginx.ingress.kubernetes.io/use-regex",
    "nginx.ingress.kubernetes.io/ssl-redirect",
    "nginx.ingress.kubernetes.io/canary",
    "nginx.ingress.kubernetes.io/canary-weight",
    "nginx.ingress.kubernetes.io/canary-by-header",
    "nginx.ingress.kubernetes.io/backend-protocol",
    "nginx.ingress.kubernetes.io/affinity",
];
const VALUES: &[&str] = &[
    "true", "false", "/$2", "/$1/$9", "50", "100", "X-Canary", "HTTPS", "cookie",
];

#[derive(Arbitrary, Debug)]
enum Pick {
    Known(u8),
    Raw(String),
}

impl Pick {
    fn get(&self, pool: &[&str]) -> String {
        match self {
            Pick::Known(i) => pool[usize::from(*i) % pool.len()].to_string(),
            Pick::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct BackendRef {
    service: Pick,
    port: Result<u16, Pick>,
}

#[derive(Arbitrary, Debug)]
struct PathSpec {
    path: Option<Pick>,
    path_type: Pick,
    backend: BackendRef,
}

#[derive(Arbitrary, Debug)]
struct Rule {
    host: Option<Pick>,
    paths: Vec<PathSpec>,
}

#[derive(Arbitrary, Debug)]
struct Ing {
    name: u8,
    /// None: no class; Some(true): kproxy's; Some(false): another controller's.
    ours: Option<bool>,
    annotations: Vec<(u8, Pick)>,
    rules: Vec<Rule>,
    default_backend: Option<BackendRef>,
    tls: Vec<(Vec<Pick>, Option<String>)>,
    created: u16,
}

#[derive(Arbitrary, Debug)]
struct Input {
    ingresses: Vec<Ing>,
    requests: Vec<(Pick, Pick)>,
}

fn backend(b: &BackendRef) -> IngressBackend {
    let port = match &b.port {
        Ok(n) => ServiceBackendPort {
            number: Some(i32::from(*n)),
            name: None,
        },
        Err(name) => ServiceBackendPort {
            number: None,
            name: Some(name.get(PORT_NAMES)),
        },
    };
    IngressBackend {
        service: Some(IngressServiceBackend {
            name: b.service.get(SERVICE_NAMES),
            port: Some(port),
        }),
        resource: None,
    }
}

fn ingress(i: &Ing) -> Ingress {
    let rules = i
        .rules
        .iter()
        .map(|r| IngressRule {
            host: r.host.as_ref().map(|h| h.get(HOSTS)),
            http: Some(HTTPIngressRuleValue {
                paths: r
                    .paths
                    .iter()
                    .map(|p| HTTPIngressPath {
                        path: p.path.as_ref().map(|p| p.get(PATHS)),
                        path_type: p.path_type.get(PATH_TYPES),
                        backend: backend(&p.backend),
                    })
                    .collect(),
            }),
        })
        .collect();
    let annotations: BTreeMap<String, String> = i
        .annotations
        .iter()
        .map(|(k, v)| {
            (
                ANNOTATIONS[usize::from(*k) % ANNOTATIONS.len()].to_string(),
                v.get(VALUES),
            )
        })
        .collect();
    let created = k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + i64::from(i.created)).ok();
    Ingress {
        metadata: ObjectMeta {
            name: Some(format!("ing-{}", i.name)),
            namespace: Some("default".into()),
            annotations: Some(annotations),
            creation_timestamp: created.map(Time),
            ..ObjectMeta::default()
        },
        spec: Some(IngressSpec {
            ingress_class_name: i.ours.map(|ours| if ours { "kproxy".into() } else { "other".into() }),
            default_backend: i.default_backend.as_ref().map(backend),
            rules: Some(rules),
            tls: Some(
                i.tls
                    .iter()
                    .map(|(hosts, secret)| IngressTLS {
                        hosts: Some(hosts.iter().map(|h| h.get(HOSTS)).collect()),
                        secret_name: secret.clone(),
                    })
                    .collect(),
            ),
        }),
        status: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let Some((store, mut objects)) = kproxy_fuzz::load(SERVICES) else {
        panic!("the fixed Services load");
    };
    let ingresses: Vec<Ingress> = input.ingresses.iter().map(ingress).collect();
    Ingress::replace(&mut objects, &ingresses);
    let class = ClassConfig { class: "kproxy".into() };
    let built = build_routes(&objects, &class, &|k| kproxy_fuzz::lookup(&store, k));
    for (host, path) in &input.requests {
        let (host, path) = (host.get(HOSTS), path.get(PATHS));
        let _ = built.table.host_has_tls(&host);
        if let Some(route) = built.table.route(&host, &path) {
            let _ = route.rewrite_path(&path);
            if let Some(canary) = &route.canary {
                let _ = canary.route.rewrite_path(&path);
            }
        }
    }
});
