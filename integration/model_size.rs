//! What the model costs in heap per Service, counted by this test binary's own allocator (the
//! library forbids unsafe code, and a global allocator is process-wide, so it lives here).
//! Bytes asked of the allocator, not its rounding to size classes; never a time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kproxy::model::convert;
use kproxy::model::store::Store;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

/// The system's allocator, counting the bytes live per thread, so a test weighs what it
/// builds itself while other tests run on their own threads.
struct Counting;

fn add(bytes: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + bytes;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counter is a
// thread-local integer with a constant initialiser, so counting allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        add(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        add(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes allocated and not yet freed by this thread.
fn live() -> isize {
    LIVE.with(Cell::get)
}

/// The most bytes live on this thread since the last call, above what was live at that call.
fn peak_since_last() -> isize {
    let now = live();
    PEAK.with(|p| p.replace(now)) - now
}

/// A Service and its EndpointSlice as the API benchmark's fake API server shapes them
/// (`integration/fakeapi_cli.rs`): one named port, 10 ready endpoints on 100 nodes in 3 zones.
fn bench_shaped(i: usize) -> (Service, EndpointSlice) {
    let ip = |base: usize, x: usize| format!("10.{}.{}.{}", base + x / 65536, (x / 256) % 256, x % 256);
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": format!("ns-{}", i % 100)},
        "spec": {"type": "ClusterIP", "clusterIP": ip(96, i + 1), "clusterIPs": [ip(96, i + 1)],
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    let endpoints: Vec<_> = (0..10)
        .map(|j| {
            let x = i * 10 + j + 1;
            serde_json::json!({
                "addresses": [ip(128, x)],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("node-{}", x % 100),
                "zone": format!("zone-{}", ["a", "b", "c"][x % 100 % 3]),
            })
        })
        .collect();
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("svc-{i}-ep"), "namespace": format!("ns-{}", i % 100),
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }))
    .unwrap();
    (svc, slice)
}

/// What the store keeps per Service with its slice of 10 endpoints, the derived state that
/// every snapshot shares included: 884 bytes now (1,145 with 40-byte endpoints and a 184-byte
/// Service port; 1.7 KiB before the compact endpoint, by heaptrack), of which 256 the
/// endpoints (24 bytes each), 120 the Service port and its Arc, and about 450 the three maps'
/// entries (Services with slices, slice owners, the snapshot's persistent map) with the
/// records they hold. Issue 11 aims at 0.6 KiB; the bound here guards what is reached
/// against a field that quietly grows.
#[test]
fn a_service_with_ten_endpoints_costs_at_most_900_bytes() {
    const N: usize = 2000;
    let mut s = Store::new("node-1");
    let node: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": "node-1"}})).unwrap();
    s.apply_node(&node);
    // Names interned for good (nodes, zones, namespaces, the port name) are not per Service.
    for i in 0..100 {
        let (svc, slice) = bench_shaped(i);
        s.apply_service(&svc);
        s.apply_slice(&slice);
    }
    drop(s.snapshot());
    let objects: Vec<_> = (100..100 + N).map(bench_shaped).collect();
    let before = live();
    for (svc, _) in &objects {
        s.apply_converted_service(convert::convert_service_object(svc));
    }
    let services = live();
    for (_, slice) in &objects {
        s.apply_converted_slice(convert::convert_slice_object(slice, "node-1"));
    }
    let slices = live();
    let snap = s.snapshot();
    assert_eq!(snap.desired.services.len(), N + 100);
    assert_eq!(snap.endpoints, (N + 100) * 10);
    drop(snap);
    let per_service = (live() - before) / N as isize;
    let per = |from: isize, to: isize| (to - from) / N as isize;
    eprintln!(
        "the store keeps {per_service} bytes per Service with 10 endpoints: {} the Service (ports, \
         its entry), {} the EndpointSlice (endpoints, slice record, owner index), {} the derived \
         state every snapshot shares",
        per(before, services),
        per(services, slices),
        per(slices, live())
    );
    assert!(per_service <= 900, "{per_service} bytes per Service");
}

/// IPVS mode's record of what it programmed (kept between syncs so that a partial sync is
/// partial), per Service with 10 endpoints, and what a full sync holds beside it while it
/// writes: the nft input (written in pieces) and the requests (planned a batch of virtual
/// services at a time). Those two must not grow with the number of Services.
#[test]
fn ipvs_keeps_a_compact_record_and_a_full_sync_holds_bounded_transients() {
    use kproxy::dataplane::iptables::render::LocalDetector;
    use kproxy::dataplane::ipvs::plan::{
        full_scope, plan_desired, plan_requests, Draining, KernelState, PlanConfig, Scope,
    };
    use kproxy::dataplane::ipvs::rules::{render_ruleset, RulesConfig};
    use kproxy::dataplane::ipvs::state::Committed;
    use kproxy::dataplane::ipvs::VS_PER_BATCH;
    use kproxy::model::IpFamily;

    const N: usize = 5000;
    let mut s = Store::new("node-1");
    let node: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": "node-1"}})).unwrap();
    s.apply_node(&node);
    for i in 0..N {
        let (svc, slice) = bench_shaped(i);
        s.apply_service(&svc);
        s.apply_slice(&slice);
    }
    let desired = s.snapshot().desired;
    let cfg = PlanConfig {
        family: IpFamily::V4,
        scheduler: "rr".into(),
        nodeport_addresses: vec![],
        exclude_cidrs: vec![],
        graceful_period: std::time::Duration::ZERO,
    };
    let rules = RulesConfig {
        family: IpFamily::V4,
        masquerade_all: false,
        masquerade_mark: 0x4000,
        local_detector: LocalDetector::Cidr("10.128.0.0/9".parse().unwrap()),
    };

    let before = live();
    let committed = Committed::new(plan_desired(&desired, &cfg), cfg.clone(), 1);
    let record = (live() - before) / N as isize;
    assert_eq!(committed.ipvs.services.len(), N);
    assert_eq!(committed.ipvs.real_server_count(), N * 10);

    peak_since_last();
    let (mut text, mut largest) = (0, 0);
    for piece in render_ruleset(&committed.ipvs, committed.hairpin_ips(), &rules) {
        text += piece.len();
        largest = largest.max(piece.len());
    }
    let render_peak = peak_since_last();

    // The first full sync, the kernel empty: every virtual service and real server is new.
    let kernel = KernelState::default();
    let mut draining = Draining::default();
    let now = std::time::Instant::now();
    let all = plan_requests(&committed.ipvs, &kernel, &Scope::Full, &mut draining, now, &cfg);
    let requests_at_once = peak_since_last();
    let count = all.len();
    drop(all);
    peak_since_last();
    let scope = full_scope(&committed.ipvs, &kernel, &cfg);
    let scope_bytes = peak_since_last();
    let mut keys = scope.into_iter().peekable();
    let mut batched = 0;
    let mut batch_peak = 0;
    while keys.peek().is_some() {
        let batch = keys.by_ref().take(VS_PER_BATCH).collect();
        let requests = plan_requests(&committed.ipvs, &kernel, &Scope::Only(batch), &mut draining, now, &cfg);
        batched += requests.len();
        drop(requests);
        batch_peak = batch_peak.max(peak_since_last());
    }
    assert_eq!(batched, count, "the batches plan what one pass does");
    assert_eq!(count, N * 11);
    eprintln!(
        "IPVS mode at {N} Services: the record keeps {record} bytes per Service with 10 endpoints; \
         the nft input is {text} bytes in pieces of at most {largest}, {render_peak} bytes held while \
         rendering; the first sync's {count} requests held {requests_at_once} bytes at once, planned \
         in batches of {VS_PER_BATCH} virtual services at most {batch_peak} (and the scope's keys {scope_bytes})"
    );
    assert!(record <= 750, "{record} bytes per Service");
    assert!(render_peak < 256 * 1024, "{render_peak} bytes held while rendering");
    assert!(
        batch_peak < 1024 * 1024,
        "{batch_peak} bytes held by one batch's requests"
    );
}

/// What the Ingress side keeps per Ingress with its own TLS Secret, shaped as the API
/// benchmark's (`KPROXY_BENCH_INGRESS`: one TLS host, one `/` Prefix path with
/// `rewrite-target`, the kubectl last-applied copy; the Secret with `tls.crt`, `tls.key` and a
/// `ca.crt` kproxy must drop): the kept objects, the route table and the resolver's parsed
/// certificates. An ECDSA P-256 certificate here (rcgen's), where the benchmark's RSA 2048 one
/// is about 1.5 KiB bigger in PEM and 0.5 KiB in DER.
#[test]
fn an_ingress_with_its_tls_secret_costs_at_most_4_5_kib() {
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
    use kproxy::ingress::objects::{IngressObject, IngressObjects};
    use kproxy::ingress::routes::{build_routes, ClassConfig, ServiceLookup};
    use kproxy::ingress::tls::{default_certificate, CertResolver};

    const N: usize = 1000;
    let cert = rcgen::generate_simple_self_signed(vec!["bench.example".to_string()]).unwrap();
    let b64 = |s: &str| base64_encode(s.as_bytes());
    let (crt, key) = (b64(&cert.cert.pem()), b64(&cert.key_pair.serialize_pem()));
    let resolver = CertResolver::new(default_certificate().unwrap());
    let class: IngressClass = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "kproxy"}, "spec": {"controller": "kproxy.io/ingress-controller"}}))
    .unwrap();
    let objects_for = |i: usize| {
        let ns = format!("ns-{}", i % 10);
        let mut ing = serde_json::json!({
            "metadata": {"name": format!("ing-{i}"), "namespace": ns,
                         "annotations": {"nginx.ingress.kubernetes.io/rewrite-target": "/"}},
            "spec": {"ingressClassName": "kproxy",
                     "tls": [{"hosts": [format!("svc-{i}.bench.example")], "secretName": format!("tls-{i}")}],
                     "rules": [{"host": format!("svc-{i}.bench.example"), "http": {"paths": [
                         {"path": "/", "pathType": "Prefix",
                          "backend": {"service": {"name": format!("svc-{i}"), "port": {"number": 80}}}}]}}]},
        });
        let applied = ing.to_string();
        ing["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] = applied.into();
        let secret = serde_json::json!({
            "metadata": {"name": format!("tls-{i}"), "namespace": ns, "labels": {"app": "bench"}},
            "type": "kubernetes.io/tls", "data": {"tls.crt": crt, "tls.key": key, "ca.crt": crt},
        });
        (
            serde_json::from_value::<Ingress>(ing).unwrap(),
            serde_json::from_value::<Secret>(secret).unwrap(),
        )
    };
    let listed: Vec<_> = (0..N).map(objects_for).collect();
    // ExternalName backends: what a Service costs is the other test's.
    let lookup = |_: &kproxy::model::ServiceKey| ServiceLookup::ExternalName("backend.example".into());
    let cfg = ClassConfig { class: "kproxy".into() };

    let before = live();
    let mut objects = IngressObjects::default();
    IngressClass::apply(&mut objects, &class);
    for (ing, _) in &listed {
        Ingress::apply(&mut objects, ing);
    }
    let ingresses = live();
    for (_, secret) in &listed {
        Secret::apply(&mut objects, secret);
    }
    let kept = live();
    let built = build_routes(&objects, &cfg, &lookup);
    let routes = live();
    let problems = resolver.update(&built.table.tls, &objects.secrets);
    assert!(problems.is_empty(), "{problems:?}");
    let resolved = live();
    assert_eq!(built.table.tls.len(), N);
    let per = |from: isize, to: isize| (to - from) / N as isize;
    let per_ingress = per(before, resolved);
    eprintln!(
        "the Ingress side keeps {per_ingress} bytes per Ingress with its TLS Secret: {} the kept \
         Ingress, {} the kept Secret, {} the route table, {} the parsed certificates",
        per(before, ingresses),
        per(ingresses, kept),
        per(kept, routes),
        per(routes, resolved)
    );
    assert!(per_ingress <= 4608, "{per_ingress} bytes per Ingress");
    drop((built, objects));
}

fn base64_encode(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ABC[(n >> (18 - 6 * i)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    out
}
