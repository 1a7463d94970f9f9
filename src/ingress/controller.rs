//! Keeps the route table and the certificates current, and runs the listeners: the I/O side
//! around the pure [`super::routes`].

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::proxy::{self, Proxy};
use super::routes::{build_routes, ClassConfig, RouteTable, ServiceLookup};
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

/// Rebuilds the route table and certificates whenever the store or the Ingress objects change,
/// once every source has listed (before that the proxy accepts no connection). Each warning is
/// logged when it first appears, not on every rebuild.
async fn keep_routes(
    state: Arc<SharedState>,
    class: ClassConfig,
    resolver: Arc<CertResolver>,
    routes: watch::Sender<Option<Arc<RouteTable>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = state.subscribe();
    let mut previous_warnings: BTreeSet<String> = BTreeSet::new();
    let mut previous_ingresses: Vec<String> = Vec::new();
    loop {
        let built = state.read(|store, objects| {
            if !store.is_ready() || !objects.is_ready() {
                return None;
            }
            let built = build_routes(objects, &class, &|k| lookup(store, k));
            let tls_problems = resolver.update(&built.table.tls, &objects.secrets);
            Some((built, tls_problems))
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

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, IngressError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| IngressError::Bind { what, addr, source })
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
        Some(a) => Some(bind("HTTP", a).await?),
        None => None,
    };
    let https = match config.https_bind {
        Some(a) => Some(bind("HTTPS", a).await?),
        None => None,
    };
    let resolver = Arc::new(CertResolver::new(tls::default_certificate()?));
    let server_config = tls::server_config(resolver.clone())?;
    let (routes_tx, routes_rx) = watch::channel(None);
    let https_port = config.https_bind.map_or(443, |a| a.port());
    let proxy = Arc::new(Proxy::new(
        routes_rx.clone(),
        Clients::new(client_tls_config()?),
        config.access_log,
        https_port,
    ));
    let mut handles = vec![tokio::spawn(keep_routes(
        state,
        ClassConfig {
            class: config.class.clone(),
        },
        resolver,
        routes_tx,
        shutdown.clone(),
    ))];
    if let Some(l) = http {
        handles.push(tokio::spawn(proxy::serve(l, None, proxy.clone(), shutdown.clone())));
    }
    if let Some(l) = https {
        let acceptor = TlsAcceptor::from(server_config);
        handles.push(tokio::spawn(proxy::serve(l, Some(acceptor), proxy, shutdown)));
    }
    tracing::info!(
        http = ?config.http_bind,
        https = ?config.https_bind,
        class = %config.class,
        "Ingress proxy started; serving nothing until Ingresses, IngressClasses, Secrets, Services and EndpointSlices are listed"
    );
    Ok(Started {
        handles,
        routes: routes_rx,
    })
}
