//! Scenarios for Service semantics beyond the basics: affinity, traffic policies, terminating
//! endpoints, topology, IPv6, load balancers, stale UDP flows. Same harness, same real packets.
//!
//! Pods 0 and 1 (pod-a, pod-b) are backends; pod 2 (pod-c) is a client inside the cluster.
//! Endpoints said to be on `node-2` are still wired to this node's namespace, so rules decide
//! alone whether they are used: exactly what the traffic policies are about.

use crate::harness::{curl, eventually, eventually_backends, try_backends, udp_from};
use crate::scenarios::{ep, node_yaml, service, slice_of, Env, Ep, SourceKind};

fn env(mode: &'static str, kind: SourceKind, docs: Vec<String>) -> Env {
    let mut all = vec![node_yaml()];
    all.extend(docs);
    Env::new(mode, kind, &all, &[])
}

pub fn session_affinity(mode: &'static str, kind: SourceKind) {
    let env = env(
        mode,
        kind,
        vec![
            service(
                "sticky",
                "{clusterIP: 10.96.0.20, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}, ports: [{name: http, port: 80}]}",
            ),
            slice_of("sticky", &[ep(0), ep(1)]),
        ],
    );
    let url = "http://10.96.0.20/";
    for client in [env.topo.pods[2].ns.clone(), env.topo.node.clone()] {
        let seen = try_backends(&env.topo, &client, url, 20).expect("requests succeed");
        assert_eq!(seen.len(), 1, "client {client} was spread over {seen:?}");
    }
}

pub fn external_local(mode: &'static str, kind: SourceKind) {
    let lb = |eps: &[Ep]| -> Vec<String> {
        vec![
            service(
                "local",
                "{type: LoadBalancer, clusterIP: 10.96.0.21, externalTrafficPolicy: Local, healthCheckNodePort: 32021, ports: [{name: http, port: 80, nodePort: 30021}]}",
            ),
            slice_of("local", eps),
        ]
    };
    let mut env = env(mode, kind, lb(&[ep(0), ep(1).on("node-2")]));
    let client = env.topo.client.clone();
    let node_port = format!("http://{}:30021/", env.topo.node_ip);
    // Only the local endpoint, and it sees the real client address.
    let body = curl(&env.topo, &client, &node_port).expect("NodePort answers");
    assert_eq!(
        body, "pod-a 192.0.2.100",
        "eTP Local must keep the client's source address"
    );
    eventually_backends(&env.topo, &client, &node_port, 10, &["pod-a"]);
    // Traffic from inside the cluster still reaches every endpoint.
    eventually_backends(
        &env.topo,
        &env.topo.pods[2].ns,
        "http://10.96.0.21/",
        30,
        &["pod-a", "pod-b"],
    );
    let health = format!("http://{}:32021/", env.topo.node_ip);
    let (code, json) = http_status(&env, &client, &health);
    assert_eq!(code, "200", "{json}");
    assert_eq!(json["localEndpoints"], 1);
    assert_eq!(json["service"]["name"], "local");

    // No local endpoint left: external traffic is dropped here, the health check says 503.
    env.set(&[vec![node_yaml()], lb(&[ep(0).on("node-2"), ep(1).on("node-2")])].concat());
    eventually("health check turns 503", || {
        (http_status(&env, &client, &health).0 == "503").then_some(())
    });
    assert_eq!(
        curl(&env.topo, &client, &node_port),
        Err(28),
        "dropped, so the client times out"
    );
}

/// Status code and JSON body of a GET.
fn http_status(env: &Env, ns: &str, url: &str) -> (String, serde_json::Value) {
    let out = env
        .topo
        .exec(ns, &["curl", "-s", "--max-time", "3", "-w", "\n%{http_code}", url]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    (
        code.to_string(),
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

pub fn internal_local(mode: &'static str, kind: SourceKind) {
    let svc = || {
        service(
            "itp",
            "{clusterIP: 10.96.0.22, internalTrafficPolicy: Local, ports: [{name: http, port: 80}]}",
        )
    };
    let mut env = env(mode, kind, vec![svc(), slice_of("itp", &[ep(0), ep(1).on("node-2")])]);
    let pod_c = env.topo.pods[2].ns.clone();
    eventually_backends(&env.topo, &pod_c, "http://10.96.0.22/", 20, &["pod-a"]);
    env.set(&[
        node_yaml(),
        svc(),
        slice_of("itp", &[ep(0).on("node-2"), ep(1).on("node-2")]),
    ]);
    eventually("dropped without local endpoints", || {
        (curl(&env.topo, &pod_c, "http://10.96.0.22/") == Err(28)).then_some(())
    });
}

pub fn terminating(mode: &'static str, kind: SourceKind) {
    let svc = || service("term", "{clusterIP: 10.96.0.23, ports: [{name: http, port: 80}]}");
    let mut env = env(mode, kind, vec![svc(), slice_of("term", &[ep(0), ep(1).terminating()])]);
    let pod_c = env.topo.pods[2].ns.clone();
    let url = "http://10.96.0.23/";
    eventually_backends(&env.topo, &pod_c, url, 20, &["pod-a"]);
    // Rolling update: the last ready pod goes away; the terminating one still serves.
    env.set(&[
        node_yaml(),
        svc(),
        slice_of("term", &[ep(0).down(), ep(1).terminating()]),
    ]);
    eventually_backends(&env.topo, &pod_c, url, 20, &["pod-b"]);
}

pub fn topology_hints(mode: &'static str, kind: SourceKind) {
    let env = env(
        mode,
        kind,
        vec![
            service(
                "zoned",
                "{clusterIP: 10.96.0.24, trafficDistribution: PreferClose, ports: [{name: http, port: 80}]}",
            ),
            slice_of("zoned", &[ep(0).hint("zone-a"), ep(1).on("node-2").hint("zone-b")]),
        ],
    );
    // node-1 is in zone-a: only the endpoint hinted for zone-a.
    eventually_backends(&env.topo, &env.topo.pods[2].ns, "http://10.96.0.24/", 20, &["pod-a"]);
}

pub fn ipv6(mode: &'static str, kind: SourceKind) {
    let env = env(
        mode,
        kind,
        vec![
            service(
                "web6",
                "{clusterIP: 'fd00:96::10', clusterIPs: ['fd00:96::10'], ipFamilies: [IPv6], ports: [{name: http, port: 80}]}",
            ),
            slice_of("web6", &[ep(0).v6(), ep(1).v6()]),
        ],
    );
    let url = "http://[fd00:96::10]/";
    eventually_backends(&env.topo, &env.topo.pods[2].ns, url, 30, &["pod-a", "pod-b"]);
    let body = curl(&env.topo, &env.topo.pods[2].ns, url).expect("IPv6 ClusterIP answers");
    assert!(
        body.ends_with("fd00:244:3::2"),
        "pod-c's own IPv6 address, unmasqueraded: {body}"
    );
    // A dual-stack Service: one slice per family, each cluster IP served by its family's pods.
    let mut env = env;
    env.set(&[
        node_yaml(),
        service(
            "dual",
            "{clusterIP: 10.96.0.26, clusterIPs: [10.96.0.26, 'fd00:96::26'], ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack, ports: [{name: http, port: 80}]}",
        ),
        slice_of("dual", &[ep(0)]),
        slice_of("dual", &[ep(1).v6()]),
    ]);
    let pod_c = env.topo.pods[2].ns.clone();
    eventually_backends(&env.topo, &pod_c, "http://10.96.0.26/", 10, &["pod-a"]);
    eventually_backends(&env.topo, &pod_c, "http://[fd00:96::26]/", 10, &["pod-b"]);
}

pub fn load_balancer(mode: &'static str, kind: SourceKind) {
    let lb = |ranges: &str| {
        vec![
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: default}}\nspec: {{type: LoadBalancer, clusterIP: 10.96.0.25, externalIPs: [198.51.100.60], loadBalancerSourceRanges: [{ranges}], ports: [{{name: http, port: 80, nodePort: 30025}}]}}\nstatus: {{loadBalancer: {{ingress: [{{ip: 198.51.100.50}}]}}}}"
            ),
            slice_of("lb", &[ep(0), ep(1)]),
        ]
    };
    let mut env = env(mode, kind, lb("192.0.2.100/32"));
    let client = env.topo.client.clone();
    eventually_backends(&env.topo, &client, "http://198.51.100.50/", 20, &["pod-a", "pod-b"]);
    eventually_backends(&env.topo, &client, "http://198.51.100.60/", 20, &["pod-a", "pod-b"]);
    // The client is no longer within loadBalancerSourceRanges: the LB IP drops it, the
    // externalIP (not subject to source ranges, as in kube-proxy) still answers.
    env.set(&[vec![node_yaml()], lb("203.0.113.0/24")].concat());
    eventually("LB IP drops clients outside loadBalancerSourceRanges", || {
        (curl(&env.topo, &client, "http://198.51.100.50/") == Err(28)).then_some(())
    });
    assert!(curl(&env.topo, &client, "http://198.51.100.60/").is_ok());
}

pub fn udp_stale_conntrack(mode: &'static str, kind: SourceKind) {
    let svc = || {
        service(
            "dns",
            "{clusterIP: 10.96.0.53, ports: [{name: dns, port: 53, protocol: UDP}]}",
        )
    };
    let mut env = env(mode, kind, vec![svc(), slice_of("dns", &[ep(0)])]);
    let pod_c = env.topo.pods[2].ns.clone();
    // A resolver keeps one source port: its conntrack entry pins it to the first endpoint.
    let reply = eventually("UDP through the ClusterIP", || {
        udp_from(&env.topo, &pod_c, "10.96.0.53:53", 40053)
    });
    assert!(reply.starts_with("pod-a "), "{reply}");
    env.set(&[node_yaml(), svc(), slice_of("dns", &[ep(1)])]);
    // pod-a still runs: only deleting the stale entry moves the flow to pod-b.
    eventually("the same client flow moves to the new endpoint", || {
        udp_from(&env.topo, &pod_c, "10.96.0.53:53", 40053).filter(|r| r.starts_with("pod-b "))
    });
}
