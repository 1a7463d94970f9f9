//! Keeps the route table and the certificates current, and runs the listeners: the I/O side
//! around the pure [`super::routes`].

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::gateway::build::GatewayConfig;
use super::gateway::listen::{serve_published, GatewayListeners, Published};
use super::proxy::{self, Proxy};
use super::routes::{build_table, ClassConfig, RouteTable, ServiceLookup};
use super::tls::{self, CertResolver};
use super::upstream::{client_tls_config, Clients};
use crate::config::IngressConfig;
use crate::model::store::Store;
use crate::model::ServiceKey;
use crate::sync::SharedState;

/// Changes arriving within this window are applied together (a relist is many events).
const REBUILD_DELAY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("binding the Ingress {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the Ingress proxy threads: {source}")]
    Worker {
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("backend TLS configuration: {0}")]
    ClientTls(#[from] rustls::Error),
}

fn lookup(store: &Store, key: &ServiceKey) -> ServiceLookup {
    if let Some(name) = store.external_name(key) {
        return ServiceLookup::ExternalName(name.to_string());
    }
    match store.service_state(key) {
        Some(state) => ServiceLookup::Ports(state),
        None => ServiceLookup::Missing,
    }
}

/// What the route keeper serves besides the Ingress routes: the Gateway API listeners.
struct GatewaySide {
    config: GatewayConfig,
    listeners: GatewayListeners,
}

/// Rebuilds the route table and certificates whenever the store or the Ingress objects change,
/// once every source has listed (before that the proxy accepts no connection). Each warning is
/// logged when it first appears, not on every rebuild. Gateway listeners on ports of their own
/// are bound and closed here too; a port that cannot be bound is reported in the Gateway's
/// status by the next build.
async fn keep_routes(
    state: Arc<SharedState>,
    class: ClassConfig,
    resolver: Arc<CertResolver>,
    mut gateway: GatewaySide,
    routes: watch::Sender<Option<Arc<RouteTable>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = state.subscribe();
    let mut previous_warnings: BTreeSet<String> = BTreeSet::new();
    let mut previous_ingresses: Vec<String> = Vec::new();
    let mut previous_routes: Vec<String> = Vec::new();
    loop {
        let built = state.read(|store, objects| {
            if !store.is_ready() || !objects.is_ready() {
                return None;
            }
            // A second round when binding a port failed (or worked again): the status says so.
            let mut built = None;
            for _ in 0..2 {
                gateway.config.unavailable = gateway.listeners.failed().clone();
                let b = build_table(objects, &class, &gateway.config, &|k| lookup(store, k));
                let mut certs = b.table.tls.clone();
                if let Some(port) = gateway.config.ingress_https {
                    certs.extend(b.gateway_tls.get(&port).into_iter().flatten().cloned());
                }
                let mut problems = resolver.update(&certs, &objects.secrets);
                problems.extend(
                    gateway
                        .listeners
                        .sync(&b.gateway_listen, &b.gateway_tls, &objects.secrets),
                );
                let settled = *gateway.listeners.failed() == gateway.config.unavailable;
                built = Some((b, problems));
                if settled {
                    break;
                }
            }
            built
        });
        if let Some((built, tls_problems)) = built {
            let warnings: BTreeSet<String> = built.warnings.into_iter().chain(tls_problems).collect();
            for w in warnings.difference(&previous_warnings) {
                tracing::warn!("{w}");
            }
            previous_warnings = warnings;
            if built.table.ingresses != previous_ingresses {
                tracing::info!(
                    ingresses = built.table.ingresses.len(),
                    certificates = built.table.tls.len(),
                    "Ingress routes updated: {}",
                    built.table.ingresses.join(", ")
                );
                previous_ingresses = built.table.ingresses.clone();
            }
            if built.table.gateway_routes != previous_routes {
                tracing::info!(
                    httproutes = built.table.gateway_routes.len(),
                    listener_ports = built.table.gateway.ports.len(),
                    "Gateway API routes updated"
                );
                previous_routes = built.table.gateway_routes.clone();
            }
            routes.send_replace(Some(Arc::new(built.table)));
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(REBUILD_DELAY) => {}
            _ = shutdown.changed() => return,
        }
        changes.borrow_and_update();
    }
}

fn bind(what: &'static str, addr: SocketAddr) -> Result<std::net::TcpListener, IngressError> {
    let bound = std::net::TcpListener::bind(addr).and_then(|l| {
        l.set_nonblocking(true)?;
        Ok(l)
    });
    bound.map_err(|source| IngressError::Bind { what, addr, source })
}

/// How many proxy threads serve the listeners: one per CPU this process may use.
fn worker_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 64)
}

/// One proxy thread: a single-threaded runtime with its own upstream pools, accepting from
/// the shared listeners. A request's client connection and its upstream connection then live
/// on the same thread, as in nginx's workers, instead of waking each other across threads.
fn spawn_worker(
    index: usize,
    listeners: Vec<(std::net::TcpListener, Option<TlsAcceptor>)>,
    gateway_listeners: Published,
    proxy: Proxy,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("ingress-{index}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(worker = index, error = %e, "Ingress worker runtime failed to start");
                    return;
                }
            };
            runtime.block_on(async move {
                let proxy = Arc::new(proxy);
                let mut servers = tokio::task::JoinSet::new();
                for (listener, tls) in listeners {
                    match TcpListener::from_std(listener) {
                        Ok(l) => {
                            servers.spawn(proxy::serve(l, tls, proxy.clone(), shutdown.clone(), index == 0));
                        }
                        Err(e) => tracing::error!(worker = index, error = %e, "Ingress listener not usable"),
                    }
                }
                servers.spawn(serve_published(
                    gateway_listeners,
                    proxy.clone(),
                    shutdown.clone(),
                    index == 0,
                ));
                while servers.join_next().await.is_some() {}
            });
        })
}

/// A started Ingress proxy.
pub struct Started {
    /// Finish once shutdown has drained the connections.
    pub handles: Vec<tokio::task::JoinHandle<()>>,
    /// The current route table (for the status writer).
    pub routes: watch::Receiver<Option<Arc<RouteTable>>>,
}

/// Binds the listeners (so a taken port fails at start) and starts the route keeper and the
/// servers.
pub async fn start(
    config: &IngressConfig,
    state: Arc<SharedState>,
    shutdown: watch::Receiver<bool>,
) -> Result<Started, IngressError> {
    let http = match config.http_bind {
        Some(a) => Some(bind("HTTP", a)?),
        None => None,
    };
    let https = match config.https_bind {
        Some(a) => Some(bind("HTTPS", a)?),
        None => None,
    };
    let resolver = Arc::new(CertResolver::new(tls::default_certificate()?));
    let server_config = tls::server_config(resolver.clone())?;
    let (routes_tx, routes_rx) = watch::channel(None);
    let https_port = config.https_bind.map_or(443, |a| a.port());
    // Gateway listeners on ports of their own listen on the Ingress listeners' address.
    let gateway_ip = config
        .http_bind
        .or(config.https_bind)
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |a| a.ip());
    let gateway = GatewaySide {
        config: GatewayConfig {
            ingress_http: config.http_bind.map(|a| a.port()),
            ingress_https: config.https_bind.map(|a| a.port()),
            ..GatewayConfig::default()
        },
        listeners: GatewayListeners::new(gateway_ip, tls::default_certificate()?),
    };
    let published = gateway.listeners.subscribe();
    let mut handles = vec![tokio::spawn(keep_routes(
        state,
        ClassConfig {
            class: config.class.clone(),
        },
        resolver,
        gateway,
        routes_tx,
        shutdown.clone(),
    ))];
    let acceptor = TlsAcceptor::from(server_config);
    let workers = worker_count();
    for index in 0..workers {
        let mut listeners = Vec::new();
        for (listener, tls) in [(&http, None), (&https, Some(acceptor.clone()))] {
            if let Some(l) = listener {
                listeners.push((l.try_clone().map_err(|source| IngressError::Worker { source })?, tls));
            }
        }
        let proxy = Proxy::new(
            routes_rx.clone(),
            Clients::new(client_tls_config()?),
            config.access_log,
            https_port,
        );
        let thread = spawn_worker(index, listeners, published.clone(), proxy, shutdown.clone())
            .map_err(|source| IngressError::Worker { source })?;
        handles.push(tokio::task::spawn_blocking(move || {
            let _ = thread.join();
        }));
    }
    tracing::info!(
        http = ?config.http_bind,
        https = ?config.https_bind,
        class = %config.class,
        workers,
        "Ingress proxy started; serving nothing until Ingresses, IngressClasses, Secrets, Services and EndpointSlices are listed"
    );
    Ok(Started {
        handles,
        routes: routes_rx,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::ProxyHealth;
    use crate::ingress::objects::IngressObject;
    use k8s_openapi::api::core::v1::{Node, Secret, Service};
    use k8s_openapi::api::networking::v1::{Ingress, IngressClass};

    #[tokio::test(start_paused = true)]
    async fn no_routes_before_every_source_listed_then_rebuilt_on_changes() {
        let state = SharedState::new(Store::new("n1"), Arc::new(ProxyHealth::new(Duration::from_secs(60))));
        let (tx, mut rx) = watch::channel(None);
        let (_stop, shutdown) = watch::channel(false);
        let resolver = Arc::new(CertResolver::new(tls::default_certificate().unwrap()));
        let class = ClassConfig { class: "kproxy".into() };
        let gateway = GatewaySide {
            config: GatewayConfig::default(),
            listeners: GatewayListeners::new([127, 0, 0, 1].into(), tls::default_certificate().unwrap()),
        };
        tokio::spawn(keep_routes(state.clone(), class, resolver, gateway, tx, shutdown));
        let ing: Ingress = serde_yaml::from_str(
            "metadata: {name: web, namespace: ns}\nspec: {ingressClassName: kproxy, rules: [{host: h, http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}]}}]}",
        )
        .unwrap();
        let svc: Service = serde_yaml::from_str(
            "metadata: {name: web, namespace: ns}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}",
        )
        .unwrap();
        state.update_ingress(|o| {
            Ingress::replace(o, std::slice::from_ref(&ing)) | IngressClass::replace(o, &[]) | Secret::replace(o, &[])
        });
        state.update(|s| s.replace_services([&svc]) | s.replace_slices([]));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(rx.borrow().is_none(), "the Node is not listed yet: nothing is served");
        state.update(|s| s.apply_node(&serde_yaml::from_str::<Node>("metadata: {name: n1}").unwrap()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let table = rx
            .borrow_and_update()
            .clone()
            .expect("routes once everything is listed");
        assert_eq!(table.ingresses, ["ns/web"]);
        state.update_ingress(|o| Ingress::delete(o, &ing));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            rx.borrow().as_ref().unwrap().ingresses.is_empty(),
            "a deleted Ingress is no longer served"
        );
    }
}
