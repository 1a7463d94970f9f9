//! Service health check node ports (`spec.healthCheckNodePort` of LoadBalancer Services with
//! `externalTrafficPolicy: Local`): cloud load balancers probe them to learn which nodes have
//! local endpoints. Answers as kube-proxy does: 200 while the node has local endpoints for the
//! Service and the proxy is healthy, 503 otherwise, with a JSON body naming the Service.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use hyper::StatusCode;
use tokio::sync::watch;

use crate::health::{self, ProxyHealth};
use crate::model::topology::categorize_endpoints;
use crate::model::{ChangeSet, DesiredState, NodeInfo, ServiceKey, ServiceState};

/// Health check port -> the Service it reports on and its local endpoint count.
pub type HealthChecks = BTreeMap<u16, (ServiceKey, usize)>;

/// The health check one Service asks for: its port and how many distinct local endpoints it
/// has on `node`. Pure.
pub fn health_check_of(state: &ServiceState, node: &NodeInfo) -> Option<(u16, usize)> {
    let port = state.ports.first()?.port.health_check_node_port?;
    // All ports of a Service share the node's verdict: count distinct local endpoints.
    let mut local: Vec<std::net::IpAddr> = state
        .ports
        .iter()
        .flat_map(|ps| {
            categorize_endpoints(&ps.endpoints, &ps.port, &node.name, node.zone.as_deref())
                .local
                .into_iter()
                .map(|e| e.ip)
                .collect::<Vec<_>>()
        })
        .collect();
    local.sort();
    local.dedup();
    Some((port, local.len()))
}

/// The health check ports `desired` asks for, with local endpoint counts: a walk of every
/// Service. Pure. Where two Services ask for one port, the last by key is served.
pub fn health_checks(desired: &DesiredState) -> HealthChecks {
    let mut table = HealthCheckTable::default();
    table.update(desired, &ChangeSet::full());
    table.served()
}

/// The health checks of every Service, kept up to date one changed Service at a time, so a
/// partial sync costs the Services it changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HealthCheckTable {
    by_service: BTreeMap<ServiceKey, (u16, usize)>,
    /// Who asks for each port: the last by key is served (a conflict only hand-written
    /// manifests can make; the API server allocates health check node ports uniquely).
    by_port: BTreeMap<u16, BTreeSet<ServiceKey>>,
}

impl HealthCheckTable {
    /// Brings the table up to `desired` for the Services `changes` names, or for every Service
    /// on a full sync. Returns the ports whose answer or presence may have changed.
    pub fn update(&mut self, desired: &DesiredState, changes: &ChangeSet) -> BTreeSet<u16> {
        let mut touched = BTreeSet::new();
        if changes.full {
            touched.extend(self.by_port.keys().copied());
            *self = HealthCheckTable::default();
            for (key, state) in &desired.services {
                if let Some(check) = health_check_of(state, &desired.node) {
                    self.insert(key.clone(), check);
                }
            }
            touched.extend(self.by_port.keys().copied());
            return touched;
        }
        for key in &changes.services {
            if let Some((port, _)) = self.by_service.remove(key) {
                touched.insert(port);
                if let Some(claims) = self.by_port.get_mut(&port) {
                    claims.remove(key);
                    if claims.is_empty() {
                        self.by_port.remove(&port);
                    }
                }
            }
            let check = desired
                .services
                .get(key)
                .and_then(|state| health_check_of(state, &desired.node));
            if let Some(check) = check {
                touched.insert(check.0);
                self.insert(key.clone(), check);
            }
        }
        touched
    }

    fn insert(&mut self, key: ServiceKey, check: (u16, usize)) {
        self.by_port.entry(check.0).or_default().insert(key.clone());
        self.by_service.insert(key, check);
    }

    /// The Service served on `port` and its local endpoint count.
    pub fn get(&self, port: u16) -> Option<(&ServiceKey, usize)> {
        let key = self.by_port.get(&port)?.last()?;
        let (_, count) = self.by_service.get(key)?;
        Some((key, *count))
    }

    /// Every port served, with its Service and count.
    pub fn served(&self) -> HealthChecks {
        self.by_port
            .keys()
            .filter_map(|port| self.get(*port).map(|(k, n)| (*port, (k.clone(), n))))
            .collect()
    }
}

/// kube-proxy's response body for one health check.
pub fn body(service: &ServiceKey, local_endpoints: usize, proxy_healthy: bool) -> String {
    serde_json::json!({
        "service": {"namespace": service.namespace, "name": service.name},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    })
    .to_string()
}

/// The listeners, opened and closed as Services come and go.
pub struct HealthCheckServer {
    table: Arc<Mutex<HealthCheckTable>>,
    listeners: BTreeMap<u16, watch::Sender<bool>>,
    /// Ports that are wanted but could not be bound: retried on every sync, as kube-proxy does.
    unbound: BTreeSet<u16>,
    health: Arc<ProxyHealth>,
}

impl HealthCheckServer {
    pub fn new(health: Arc<ProxyHealth>) -> Self {
        HealthCheckServer {
            table: Arc::new(Mutex::new(HealthCheckTable::default())),
            listeners: BTreeMap::new(),
            unbound: BTreeSet::new(),
            health,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthCheckTable> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Serves the health checks of `desired` after a successful sync, updating only what
    /// `changes` names (everything on a full sync).
    pub async fn sync(&mut self, desired: &DesiredState, changes: &ChangeSet) {
        let mut ports = if changes.full {
            // Built beside the served table, so a probe meanwhile gets the old answer, not none.
            let mut table = HealthCheckTable::default();
            let touched = table.update(desired, changes);
            *self.lock() = table;
            touched
        } else {
            self.lock().update(desired, changes)
        };
        ports.extend(std::mem::take(&mut self.unbound));
        if changes.full {
            ports.extend(self.listeners.keys().copied());
        }
        for port in ports {
            let wanted = self.lock().get(port).map(|(key, _)| key.clone());
            match (wanted, self.listeners.contains_key(&port)) {
                (None, true) => {
                    if let Some(stop) = self.listeners.remove(&port) {
                        let _ = stop.send(true);
                    }
                }
                (Some(service), false) => self.listen(port, &service).await,
                _ => {}
            }
        }
    }

    async fn listen(&mut self, port: u16, service: &ServiceKey) {
        let addr = SocketAddr::from(([0, 0, 0, 0], port));
        let listener = match health::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                // kube-proxy logs and goes on: the port may be taken by something else.
                tracing::error!(error = %e, service = %service, "cannot serve health check node port");
                self.unbound.insert(port);
                return;
            }
        };
        let (stop, shutdown) = watch::channel(false);
        let table = self.table.clone();
        let health = self.health.clone();
        tokio::spawn(health::serve(
            "service-health-check",
            listener,
            shutdown,
            move |_path| {
                let table = table.lock().unwrap_or_else(PoisonError::into_inner);
                let Some((service, count)) = table.get(port) else {
                    return health::response(StatusCode::NOT_FOUND, health::JSON, "{}");
                };
                let healthy = health.status(SystemTime::now()).healthy;
                let code = if count > 0 && healthy {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                health::response(code, health::JSON, body(service, count, healthy))
            },
        ));
        self.listeners.insert(port, stop);
    }

    /// The ports being served, for tests.
    #[cfg(test)]
    fn listening(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }
}

impl Drop for HealthCheckServer {
    fn drop(&mut self) {
        for stop in self.listeners.values() {
            let _ = stop.send(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::store::Store;

    fn desired(local: bool) -> DesiredState {
        let mut store = Store::new("n1");
        let svc: k8s_openapi::api::core::v1::Service = serde_yaml::from_str(
            "metadata: {name: lb, namespace: ns}\nspec: {type: LoadBalancer, clusterIP: 10.96.0.9, externalTrafficPolicy: Local, healthCheckNodePort: 32000, ports: [{port: 80, nodePort: 30080}]}",
        )
        .unwrap();
        let node = if local { "n1" } else { "n2" };
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_yaml::from_str(&format!(
            "metadata: {{name: lb-1, namespace: ns, labels: {{kubernetes.io/service-name: lb}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [10.244.1.2], nodeName: {node}}}, {{addresses: [10.244.1.3], nodeName: n2}}]"
        ))
        .unwrap();
        store.replace_services([&svc]);
        store.replace_slices([&slice]);
        store.snapshot().desired
    }

    #[test]
    fn counts_local_endpoints() {
        let key = ServiceKey::new("ns", "lb");
        assert_eq!(
            health_checks(&desired(true)),
            HealthChecks::from([(32000, (key.clone(), 1))])
        );
        assert_eq!(health_checks(&desired(false)), HealthChecks::from([(32000, (key, 0))]));
    }

    fn lb(name: &str, health_port: u16, policy: &str) -> k8s_openapi::api::core::v1::Service {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: ns}}\nspec: {{type: LoadBalancer, clusterIP: 10.96.0.9, externalTrafficPolicy: {policy}, healthCheckNodePort: {health_port}, ports: [{{port: 80, nodePort: 30080}}]}}"
        ))
        .unwrap()
    }

    fn slice(service: &str, nodes: &[&str]) -> k8s_openapi::api::discovery::v1::EndpointSlice {
        let endpoints: Vec<String> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{{addresses: [10.244.1.{}], nodeName: {n}}}", i + 2))
            .collect();
        serde_yaml::from_str(&format!(
            "metadata: {{name: {service}-1, namespace: ns, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]",
            endpoints.join(", ")
        ))
        .unwrap()
    }

    fn ready_store() -> Store {
        let mut store = Store::new("n1");
        store.replace_services([
            &lb("a", 32001, "Local"),
            &lb("b", 32002, "Local"),
            &lb("c", 0, "Cluster"),
        ]);
        store.replace_slices([&slice("a", &["n1", "n2"]), &slice("b", &["n2"])]);
        store.apply_node(&serde_yaml::from_str("metadata: {name: n1}").unwrap());
        store
    }

    /// Every partial update leaves the table as a walk of all Services would build it.
    #[test]
    fn partial_updates_match_a_full_walk() {
        let key = |n: &str| ServiceKey::new("ns", n);
        let mut store = ready_store();
        let mut table = HealthCheckTable::default();
        let first = store.snapshot();
        assert!(first.changes.full);
        let touched = table.update(&first.desired, &first.changes);
        assert_eq!(touched, BTreeSet::from([32001, 32002]));
        assert_eq!(
            table.served(),
            HealthChecks::from([(32001, (key("a"), 1)), (32002, (key("b"), 0))])
        );

        type Step = (&'static str, fn(&mut Store) -> bool, BTreeSet<u16>, HealthChecks);
        let steps: Vec<Step> = vec![
            (
                "b gets a local endpoint",
                |s| s.apply_slice(&slice("b", &["n2", "n1"])),
                BTreeSet::from([32002]),
                HealthChecks::from([
                    (32001, (ServiceKey::new("ns", "a"), 1)),
                    (32002, (ServiceKey::new("ns", "b"), 1)),
                ]),
            ),
            (
                "a moves to another health port",
                |s| s.apply_service(&lb("a", 32005, "Local")),
                BTreeSet::from([32001, 32005]),
                HealthChecks::from([
                    (32002, (ServiceKey::new("ns", "b"), 1)),
                    (32005, (ServiceKey::new("ns", "a"), 1)),
                ]),
            ),
            (
                "c takes b's port: the last by key is served, as a full walk does",
                |s| s.apply_service(&lb("c", 32002, "Local")),
                BTreeSet::from([32002]),
                HealthChecks::from([
                    (32002, (ServiceKey::new("ns", "c"), 0)),
                    (32005, (ServiceKey::new("ns", "a"), 1)),
                ]),
            ),
            (
                "c is deleted: b is served again",
                |s| s.delete_service_key(&ServiceKey::new("ns", "c")),
                BTreeSet::from([32002]),
                HealthChecks::from([
                    (32002, (ServiceKey::new("ns", "b"), 1)),
                    (32005, (ServiceKey::new("ns", "a"), 1)),
                ]),
            ),
            (
                "a turns to Cluster: no health check",
                |s| s.apply_service(&lb("a", 32005, "Cluster")),
                BTreeSet::from([32005]),
                HealthChecks::from([(32002, (ServiceKey::new("ns", "b"), 1))]),
            ),
            (
                "b's slice is deleted: 0 local endpoints, port still served",
                |s| s.replace_slices([&slice("a", &["n1"])]),
                BTreeSet::from([32002]),
                HealthChecks::from([(32002, (ServiceKey::new("ns", "b"), 0))]),
            ),
        ];
        for (what, change, want_touched, want) in steps {
            assert!(change(&mut store), "{what}: a change");
            let snap = store.snapshot();
            assert!(!snap.changes.full, "{what}");
            assert_eq!(table.update(&snap.desired, &snap.changes), want_touched, "{what}");
            assert_eq!(table.served(), want, "{what}");
            assert_eq!(
                table.served(),
                health_checks(&snap.desired),
                "{what}: same as a full walk"
            );
        }
        // A full resync rebuilds the same table.
        store.force_full();
        let snap = store.snapshot();
        let before = table.clone();
        table.update(&snap.desired, &snap.changes);
        assert_eq!(table, before);
    }

    /// One GET on loopback: the status code and the JSON body, or None when refused.
    async fn get(port: u16) -> Option<(u16, serde_json::Value)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        conn.write_all(b"GET / HTTP/1.1\r\nHost: n1\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        conn.read_to_string(&mut text).await.ok()?;
        let code = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n")?.1;
        Some((code, serde_json::from_str(body).ok()?))
    }

    /// A port nothing listens on now (the kernel picks it; released at once).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn listeners_follow_partial_syncs() {
        let port = free_port();
        let mut store = Store::new("n1");
        store.replace_services([&lb("a", port, "Local"), &lb("b", 0, "Cluster")]);
        store.replace_slices([&slice("a", &["n1", "n2"])]);
        store.apply_node(&serde_yaml::from_str("metadata: {name: n1}").unwrap());
        let health = Arc::new(ProxyHealth::new(std::time::Duration::from_secs(60)));
        let mut server = HealthCheckServer::new(health);
        let snap = store.snapshot();
        server.sync(&snap.desired, &snap.changes).await;
        assert_eq!(server.listening(), [port]);
        let (code, json) = get(port).await.expect("the health check port answers");
        assert_eq!(json["service"]["name"], "a");
        assert_eq!(json["localEndpoints"], 1);
        let healthy = json["serviceProxyHealthy"] == true;
        assert_eq!(code, if healthy { 200 } else { 503 }, "{json}");

        // The local endpoint goes: same listener, new answer.
        store.apply_slice(&slice("a", &["n2"]));
        let snap = store.snapshot();
        server.sync(&snap.desired, &snap.changes).await;
        let (code, json) = get(port).await.expect("still served");
        assert_eq!((code, json["localEndpoints"].as_u64()), (503, Some(0)), "{json}");

        // A change to another Service leaves the listener alone; deleting the Service closes it.
        store.apply_service(&lb("b", 0, "Local"));
        let snap = store.snapshot();
        server.sync(&snap.desired, &snap.changes).await;
        assert_eq!(server.listening(), [port]);
        store.delete_service_key(&ServiceKey::new("ns", "a"));
        let snap = store.snapshot();
        server.sync(&snap.desired, &snap.changes).await;
        assert!(server.listening().is_empty());
        for _ in 0..100 {
            if get(port).await.is_none() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("port {port} still answers after its Service was deleted");
    }

    #[test]
    fn body_matches_kube_proxy() {
        let v: serde_json::Value = serde_json::from_str(&body(&ServiceKey::new("ns", "lb"), 2, true)).unwrap();
        assert_eq!(v["service"]["namespace"], "ns");
        assert_eq!(v["service"]["name"], "lb");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["serviceProxyHealthy"], true);
    }
}
