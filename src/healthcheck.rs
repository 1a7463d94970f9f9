//! Service health check node ports (`spec.healthCheckNodePort` of LoadBalancer Services with
//! `externalTrafficPolicy: Local`): cloud load balancers probe them to learn which nodes have
//! local endpoints. Answers as kube-proxy does: 200 while the node has local endpoints for the
//! Service and the proxy is healthy, 503 otherwise, with a JSON body naming the Service.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use hyper::StatusCode;
use tokio::sync::watch;

use crate::health::{self, ProxyHealth};
use crate::model::topology::categorize_endpoints;
use crate::model::{DesiredState, ServiceKey};

/// Health check port -> the Service it reports on and its local endpoint count.
pub type HealthChecks = BTreeMap<u16, (ServiceKey, usize)>;

/// The health check ports `desired` asks for, with local endpoint counts. Pure.
pub fn health_checks(desired: &DesiredState) -> HealthChecks {
    let mut out = HealthChecks::new();
    for (key, state) in &desired.services {
        let Some(first) = state.ports.first() else { continue };
        let Some(port) = first.port.health_check_node_port else {
            continue;
        };
        // All ports of a Service share the node's verdict: count distinct local endpoints.
        let mut local: Vec<std::net::IpAddr> = state
            .ports
            .iter()
            .flat_map(|ps| {
                categorize_endpoints(
                    &ps.endpoints,
                    &ps.port,
                    &desired.node.name,
                    desired.node.zone.as_deref(),
                )
                .local
                .into_iter()
                .map(|e| e.ip)
                .collect::<Vec<_>>()
            })
            .collect();
        local.sort();
        local.dedup();
        out.insert(port, (key.clone(), local.len()));
    }
    out
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
    checks: Arc<Mutex<HealthChecks>>,
    listeners: BTreeMap<u16, watch::Sender<bool>>,
    health: Arc<ProxyHealth>,
}

impl HealthCheckServer {
    pub fn new(health: Arc<ProxyHealth>) -> Self {
        HealthCheckServer {
            checks: Arc::new(Mutex::new(HealthChecks::new())),
            listeners: BTreeMap::new(),
            health,
        }
    }

    /// Serves exactly the health checks of `desired` (after a successful sync).
    pub async fn sync(&mut self, desired: &DesiredState) {
        let wanted = health_checks(desired);
        *self.checks.lock().unwrap_or_else(PoisonError::into_inner) = wanted.clone();
        self.listeners.retain(|port, stop| {
            let keep = wanted.contains_key(port);
            if !keep {
                let _ = stop.send(true);
            }
            keep
        });
        for port in wanted.keys() {
            if self.listeners.contains_key(port) {
                continue;
            }
            let addr = SocketAddr::from(([0, 0, 0, 0], *port));
            let listener = match health::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    // kube-proxy logs and goes on: the port may be taken by something else.
                    tracing::error!(error = %e, service = %wanted[port].0, "cannot serve health check node port");
                    continue;
                }
            };
            let (stop, shutdown) = watch::channel(false);
            let checks = self.checks.clone();
            let health = self.health.clone();
            tokio::spawn(health::serve(
                "service-health-check",
                listener,
                shutdown,
                move |_path| {
                    let checks = checks.lock().unwrap_or_else(PoisonError::into_inner);
                    let Some((service, count)) = checks.get(&addr.port()) else {
                        return health::response(StatusCode::NOT_FOUND, health::JSON, "{}");
                    };
                    let healthy = health.status(SystemTime::now()).healthy;
                    let code = if *count > 0 && healthy {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    health::response(code, health::JSON, body(service, *count, healthy))
                },
            ));
            self.listeners.insert(*port, stop);
        }
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

    #[test]
    fn body_matches_kube_proxy() {
        let v: serde_json::Value = serde_json::from_str(&body(&ServiceKey::new("ns", "lb"), 2, true)).unwrap();
        assert_eq!(v["service"]["namespace"], "ns");
        assert_eq!(v["service"]["name"], "lb");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["serviceProxyHealthy"], true);
    }
}
