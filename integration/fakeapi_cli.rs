//! `__fakeapi`: the fake API server of [`crate::fakeapi`] as a process of its own, for
//! benchmarks and by-hand runs. It serves list and watch exactly as the tests' server does
//! (one global resourceVersion, paginated lists from one snapshot, `continue` tokens, watches
//! resumed from a resourceVersion, bookmarks, 410 after compaction), filled from files, from a
//! generator, or both.
//!
//! ```text
//! usage: integration __fakeapi [--listen ADDR] [--services N] [--endpoints M]
//!            [--namespaces K] [--nodes H] [--node NAME] [--shape real|minimal] [PATH ...]
//!
//!   --listen ADDR     where to serve (default 127.0.0.1:6443; port 0 picks one)
//!   --services N      generate N Services (default 0), every tenth a NodePort, and one
//!                     EndpointSlice of M endpoints (default 10) for each
//!   --namespaces K    spread the Services over namespaces ns-0 .. ns-(K-1) (default 10)
//!   --nodes H         endpoints run on nodes node-0 .. node-(H-1) in zones zone-a/b/c (default 100)
//!   --node NAME       also create this Node (the one kproxy runs as; default: none)
//!   --shape real      objects as a real kube-apiserver v1.33 returns them: managedFields,
//!                     kubectl's last-applied annotation, selectors, targetRefs (default)
//!   --shape minimal   only the fields kproxy reads
//!   PATH              YAML or JSON files (several documents, or `kind: List`), or directories
//!                     of them, loaded before the generated objects
//! ```
//!
//! Once everything is loaded it prints one line, `fakeapi: serving OBJECTS objects at
//! http://ADDR`, and serves until killed. The generated objects are named predictably:
//! Service `svc-I` in namespace `ns-(I % K)`, its EndpointSlice `svc-I-ep`, endpoint J of
//! Service I at `10.(128 + X / 65536).(X / 256 % 256).(X % 256)` with X = I * M + J + 1, port
//! 8080 (named `http`), on node `node-(X % H)`. Service I's cluster IP is
//! `10.(96 + Y / 65536).(Y / 256 % 256).(Y % 256)` with Y = I + 1, port 80; the NodePorts are
//! 30000 + I / 10 (mod 2768).
//!
//! Change the cluster as a client of the real API would, for example one EndpointSlice
//! (the fake keeps uid and creationTimestamp, bumps the resourceVersion, tells the watches):
//!
//! ```text
//! curl -sf -X PUT -H 'Content-Type: application/json' --data @slice.json \
//!   http://127.0.0.1:6443/apis/discovery.k8s.io/v1/namespaces/ns-3/endpointslices/svc-3-ep
//! curl -sf -X PATCH -H 'Content-Type: application/merge-patch+json' \
//!   --data '{"endpoints":[{"addresses":["10.255.0.1"]}]}' \
//!   http://127.0.0.1:6443/apis/discovery.k8s.io/v1/namespaces/ns-3/endpointslices/svc-3-ep
//! curl -sf -X DELETE http://127.0.0.1:6443/api/v1/namespaces/ns-3/services/svc-3
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::{json, Value};

use crate::fakeapi::FakeApiServer;

/// What `__fakeapi` was asked to serve.
struct Options {
    listen: SocketAddr,
    services: usize,
    endpoints: usize,
    namespaces: usize,
    nodes: usize,
    node: Option<String>,
    real: bool,
    paths: Vec<PathBuf>,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        listen: SocketAddr::from(([127, 0, 0, 1], 6443)),
        services: 0,
        endpoints: 10,
        namespaces: 10,
        nodes: 100,
        node: None,
        real: true,
        paths: vec![],
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        let number = |name: &str, v: String| v.parse::<usize>().map_err(|_| format!("{name}: not a number: {v:?}"));
        match arg.as_str() {
            "--listen" => {
                let v = value(arg)?;
                o.listen = v.parse().map_err(|_| format!("--listen: not an address: {v:?}"))?;
            }
            "--services" => o.services = number(arg, value(arg)?)?,
            "--endpoints" => o.endpoints = number(arg, value(arg)?)?,
            "--namespaces" => o.namespaces = number(arg, value(arg)?)?.max(1),
            "--nodes" => o.nodes = number(arg, value(arg)?)?.max(1),
            "--node" => o.node = Some(value(arg)?),
            "--shape" => match value(arg)?.as_str() {
                "real" => o.real = true,
                "minimal" => o.real = false,
                other => return Err(format!("--shape: real or minimal, not {other:?}")),
            },
            flag if flag.starts_with("--") => return Err(format!("unknown flag {flag}")),
            path => o.paths.push(PathBuf::from(path)),
        }
    }
    Ok(o)
}

/// Runs the standalone server; returns only on a usage or load error.
pub fn main(args: &[String]) -> ExitCode {
    let options = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("__fakeapi: {e}\n(see the usage at the top of integration/fakeapi_cli.rs)");
            return ExitCode::from(2);
        }
    };
    let mut objects = Vec::new();
    for path in &options.paths {
        if let Err(e) = load(path, &mut objects) {
            eprintln!("__fakeapi: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if let Some(node) = &options.node {
        objects.push(node_object(node));
    }
    let listener = match std::net::TcpListener::bind(options.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("__fakeapi: binding {}: {e}", options.listen);
            return ExitCode::FAILURE;
        }
    };
    let server = match futures::executor::block_on(FakeApiServer::start_on(listener)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("__fakeapi: starting: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut count = 0;
    for object in objects.into_iter().chain(generate(&options)) {
        if let Err(e) = server.apply(object) {
            eprintln!("__fakeapi: {e}");
            return ExitCode::FAILURE;
        }
        count += 1;
    }
    println!("fakeapi: serving {count} objects at {}", server.url());
    loop {
        std::thread::park();
    }
}

/// Reads every object of a YAML or JSON file, or of every such file in a directory.
fn load(path: &Path, out: &mut Vec<Value>) -> Result<(), String> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "json"))
            .collect();
        entries.sort();
        for entry in entries {
            load(&entry, out).map_err(|e| format!("{}: {e}", entry.display()))?;
        }
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(document).map_err(|e| e.to_string())?;
        match value {
            Value::Null => {}
            Value::Object(ref fields) if fields.get("kind").and_then(Value::as_str) == Some("List") => {
                out.extend(
                    fields
                        .get("items")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .cloned(),
                );
            }
            other => out.push(other),
        }
    }
    Ok(())
}

fn node_object(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": "zone-a"}},
        "spec": {"podCIDR": "10.128.0.0/24", "podCIDRs": ["10.128.0.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}, {"type": "Hostname", "address": name}]},
    })
}

fn ip(base: usize, x: usize) -> String {
    format!("10.{}.{}.{}", base + x / 65536, (x / 256) % 256, x % 256)
}

/// A fixed time, so two runs serve the same bytes.
const CREATED: &str = "2025-06-01T12:00:00Z";

/// The generated Services and EndpointSlices, one pair at a time.
fn generate(o: &Options) -> impl Iterator<Item = Value> + '_ {
    (0..o.services).flat_map(move |i| [service(o, i), slice(o, i)])
}

fn service(o: &Options, i: usize) -> Value {
    let name = format!("svc-{i}");
    let namespace = format!("ns-{}", i % o.namespaces);
    let node_port = i % 10 == 0;
    let mut port = json!({"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080});
    if node_port {
        port["nodePort"] = json!(30000 + (i / 10) % 2768);
    }
    let cluster_ip = ip(96, i + 1);
    let kind = if node_port { "NodePort" } else { "ClusterIP" };
    if !o.real {
        return json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"type": kind, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": [port]},
        });
    }
    // What `kubectl apply` of a plain manifest leaves on a real API server.
    let applied = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"annotations": {}, "labels": {"app": name}, "name": name, "namespace": namespace},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}], "selector": {"app": name}, "type": kind},
    });
    let mut spec = json!({
        "ports": [port], "selector": {"app": name}, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
        "type": kind, "sessionAffinity": "None", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
        "internalTrafficPolicy": "Cluster",
    });
    let mut spec_fields = json!({
        "f:internalTrafficPolicy": {}, "f:ports": {".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {
            ".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}},
        "f:selector": {}, "f:sessionAffinity": {}, "f:type": {},
    });
    if node_port {
        spec["externalTrafficPolicy"] = json!("Cluster");
        spec_fields["f:externalTrafficPolicy"] = json!({});
    }
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": name, "namespace": namespace, "creationTimestamp": CREATED,
            "labels": {"app": name},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": format!("{applied}\n")},
            "managedFields": [{
                "manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1",
                "time": CREATED, "fieldsType": "FieldsV1",
                "fieldsV1": {
                    "f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}},
                                   "f:labels": {".": {}, "f:app": {}}},
                    "f:spec": spec_fields,
                },
            }],
        },
        "spec": spec,
        "status": {"loadBalancer": {}},
    })
}

fn slice(o: &Options, i: usize) -> Value {
    let service = format!("svc-{i}");
    let namespace = format!("ns-{}", i % o.namespaces);
    let endpoints: Vec<Value> = (0..o.endpoints)
        .map(|j| {
            let x = i * o.endpoints + j + 1;
            let node = x % o.nodes;
            let address = ip(128, x);
            if !o.real {
                return json!({"addresses": [address], "conditions": {"ready": true}, "nodeName": format!("node-{node}")});
            }
            json!({
                "addresses": [address],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("node-{node}"),
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": format!("{service}-6d4cf56db6-{j:05x}"),
                              "uid": format!("00000000-0000-4000-9000-{x:012x}")},
                "zone": format!("zone-{}", ["a", "b", "c"][node % 3]),
            })
        })
        .collect();
    let ports = json!([{"name": "http", "port": 8080, "protocol": "TCP"}]);
    let labels = json!({"kubernetes.io/service-name": service});
    if !o.real {
        return json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{service}-ep"), "namespace": namespace, "labels": labels},
            "addressType": "IPv4", "endpoints": endpoints, "ports": ports,
        });
    }
    let owner_uid = format!("00000000-0000-4000-a000-{i:012x}");
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-ep"), "generateName": format!("{service}-"), "namespace": namespace,
            "creationTimestamp": CREATED, "generation": 1,
            "labels": {"app": service, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                       "kubernetes.io/service-name": service},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": CREATED},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service, "uid": owner_uid,
                                 "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{
                "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "discovery.k8s.io/v1",
                "time": CREATED, "fieldsType": "FieldsV1",
                "fieldsV1": {
                    "f:addressType": {}, "f:endpoints": {},
                    "f:metadata": {
                        "f:annotations": {".": {}, "f:endpoints.kubernetes.io/last-change-trigger-time": {}},
                        "f:generateName": {},
                        "f:labels": {".": {}, "f:app": {}, "f:endpointslice.kubernetes.io/managed-by": {},
                                     "f:kubernetes.io/service-name": {}},
                        "f:ownerReferences": {".": {}, format!("k:{{\"uid\":\"{owner_uid}\"}}"): {}},
                    },
                    "f:ports": {},
                },
            }],
        },
        "addressType": "IPv4", "endpoints": endpoints, "ports": ports,
    })
}
