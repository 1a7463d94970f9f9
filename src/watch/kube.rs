//! Desired state from the Kubernetes API: kube-rs watchers on Services, EndpointSlices and
//! this node's Node object; and, for the Ingress proxy, Ingresses, IngressClasses and TLS Secrets.
//!
//! Each watcher's initial list (and every relist after a 410 Gone) is buffered and applied as
//! one replacement, so the store never sees a half-listed world; later events apply one by one.

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};

use crate::ingress::objects::{IngressObject, TLS_SECRET_TYPE};
use crate::model::store::{Kind, Store};
use crate::sync::SharedState;

/// Label selector kube-proxy uses: Services (and their slices) owned by another proxy are not
/// even transferred.
const NOT_OTHER_PROXY: &str = "!service.kubernetes.io/service-proxy-name";
/// Headless Services' slices carry this label; they get no rules.
const NOT_HEADLESS: &str = "!service.kubernetes.io/headless";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("--master {master:?} is not a valid URL: {message}")]
    Master { master: String, message: String },
    #[error("no API server configured: not running in a cluster ({incluster}) and no kubeconfig found ({infer}); use --kubeconfig or --master")]
    NoConfig { incluster: String, infer: String },
    #[error("building the API client: {0}")]
    Client(String),
}

/// Builds the API client as kube-proxy does: `--kubeconfig` and/or `--master` (which overrides
/// the kubeconfig's server), else the in-cluster service account. An explicit server address
/// is all kproxy needs: it never depends on the `kubernetes` ClusterIP it programs itself.
///
/// `limits` are `--kube-api-qps`/`--kube-api-burst`: client-go's client-side rate limiter, with
/// client-go's `rest_client_*` metrics ([`crate::api_client`]).
pub async fn client(
    kubeconfig: Option<&Path>,
    master: Option<&str>,
    limits: (f32, i32),
) -> Result<Client, ClientError> {
    let master_uri = master
        .map(|m| {
            m.parse::<http::Uri>().map_err(|e| ClientError::Master {
                master: m.to_string(),
                message: e.to_string(),
            })
        })
        .transpose()?;
    let mut config = match (kubeconfig, &master_uri) {
        (Some(path), _) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| ClientError::Kubeconfig {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| ClientError::Kubeconfig {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?
        }
        (None, Some(uri)) => kube::Config::new(uri.clone()),
        (None, None) => match kube::Config::incluster() {
            Ok(c) => c,
            Err(incluster) => kube::Config::infer().await.map_err(|infer| ClientError::NoConfig {
                incluster: incluster.to_string(),
                infer: infer.to_string(),
            })?,
        },
    };
    if let Some(uri) = master_uri {
        config.cluster_url = uri;
    }
    let host = config
        .cluster_url
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let builder = kube::client::ClientBuilder::try_from(config).map_err(|e| ClientError::Client(e.to_string()))?;
    Ok(builder
        .with_layer(&crate::api_client::ApiClientLayer::new(limits.0, limits.1, host))
        .build())
}

/// How one kind's events land in the store.
trait Apply: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    const KIND: Kind;
    fn apply(store: &mut Store, obj: &Self) -> bool;
    fn delete(store: &mut Store, obj: &Self) -> bool;
    fn replace(store: &mut Store, all: &[Self]) -> bool;
}

impl Apply for Service {
    const KIND: Kind = Kind::Service;
    fn apply(store: &mut Store, obj: &Self) -> bool {
        store.apply_service(obj)
    }
    fn delete(store: &mut Store, obj: &Self) -> bool {
        store.delete_service(obj)
    }
    fn replace(store: &mut Store, all: &[Self]) -> bool {
        store.replace_services(all.iter())
    }
}

impl Apply for EndpointSlice {
    const KIND: Kind = Kind::EndpointSlice;
    fn apply(store: &mut Store, obj: &Self) -> bool {
        store.apply_slice(obj)
    }
    fn delete(store: &mut Store, obj: &Self) -> bool {
        store.delete_slice(obj)
    }
    fn replace(store: &mut Store, all: &[Self]) -> bool {
        store.replace_slices(all.iter())
    }
}

impl Apply for Node {
    const KIND: Kind = Kind::Node;
    fn apply(store: &mut Store, obj: &Self) -> bool {
        store.apply_node(obj)
    }
    fn delete(_store: &mut Store, obj: &Self) -> bool {
        // Keep the last known addresses: a deleted Node object does not remove the host.
        tracing::warn!(node = ?obj.metadata.name, "this node's Node object was deleted");
        false
    }
    fn replace(store: &mut Store, all: &[Self]) -> bool {
        match all.first() {
            Some(node) => store.apply_node(node),
            None => {
                // kube-proxy proceeds without node information too: NodePorts still work on
                // every local address; only zone hints and `primary` addresses are missing.
                tracing::warn!("this node's Node object was not found; proceeding without its addresses and zone");
                store.mark_synced(Kind::Node);
                true
            }
        }
    }
}

/// What one watcher event asks of the objects it feeds.
enum Change<'a, K> {
    /// A complete (re)list: replace every object of the kind.
    Replace(&'a [K]),
    Apply(&'a K),
    Delete(&'a K),
}

/// Runs one watcher until shutdown, buffering each initial list and relist (after a 410 Gone)
/// so that `apply` sees it whole, never half-listed.
async fn drive<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: impl Debug,
    mut shutdown: watch::Receiver<bool>,
    apply: impl Fn(Change<'_, K>),
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut stream = watcher::watcher(api, config)
        .backoff(super::backoff::WatchBackoff::new())
        .boxed();
    let mut buffer: Vec<K> = Vec::new();
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            _ = shutdown.changed() => return,
        };
        match event {
            None => return,
            Some(Ok(Event::Init)) => buffer.clear(),
            Some(Ok(Event::InitApply(obj))) => buffer.push(obj),
            Some(Ok(Event::InitDone)) => {
                let all = std::mem::take(&mut buffer);
                tracing::debug!(?kind, objects = all.len(), "listed");
                apply(Change::Replace(&all));
            }
            Some(Ok(Event::Apply(obj))) => apply(Change::Apply(&obj)),
            Some(Ok(Event::Delete(obj))) => apply(Change::Delete(&obj)),
            // The watcher retries on its own (see `backoff`); the store keeps the last state.
            Some(Err(e)) => tracing::warn!(?kind, error = %e, "watch failed; retrying"),
        }
    }
}

/// Feeds one watcher into the store until shutdown.
async fn watch_kind<K: Apply>(
    api: Api<K>,
    config: watcher::Config,
    state: Arc<SharedState>,
    shutdown: watch::Receiver<bool>,
) {
    drive(api, config, K::KIND, shutdown, |change| match change {
        Change::Replace(all) => state.update(|s| K::replace(s, all)),
        Change::Apply(obj) => state.update(|s| K::apply(s, obj)),
        Change::Delete(obj) => state.update(|s| K::delete(s, obj)),
    })
    .await
}

/// Starts the three watchers; they run until `shutdown`.
pub fn spawn_watchers(
    client: Client,
    node_name: &str,
    state: Arc<SharedState>,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let services = watcher::Config::default().labels(NOT_OTHER_PROXY);
    let slices = watcher::Config::default().labels(&format!("{NOT_HEADLESS},{NOT_OTHER_PROXY}"));
    let node = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    vec![
        tokio::spawn(watch_kind::<Service>(
            Api::all(client.clone()),
            services,
            state.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(watch_kind::<EndpointSlice>(
            Api::all(client.clone()),
            slices,
            state.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(watch_kind::<Node>(Api::all(client), node, state, shutdown)),
    ]
}

/// Feeds one Ingress-side watcher into the Ingress objects until shutdown (these changes never
/// wake the sync loop).
async fn watch_ingress_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    state: Arc<SharedState>,
    shutdown: watch::Receiver<bool>,
) where
    K: IngressObject + Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    drive(api, config, K::KIND, shutdown, |change| match change {
        Change::Replace(all) => state.update_ingress(|s| K::replace(s, all)),
        Change::Apply(obj) => state.update_ingress(|s| K::apply(s, obj)),
        Change::Delete(obj) => state.update_ingress(|s| K::delete(s, obj)),
    })
    .await
}

/// Starts the Ingress, IngressClass and TLS Secret watchers (Secrets selected by type, so
/// kproxy never receives other Secrets).
pub fn spawn_ingress_watchers(
    client: Client,
    state: Arc<SharedState>,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let secrets = watcher::Config::default().fields(&format!("type={TLS_SECRET_TYPE}"));
    vec![
        tokio::spawn(watch_ingress_kind::<Ingress>(
            Api::all(client.clone()),
            watcher::Config::default(),
            state.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(watch_ingress_kind::<IngressClass>(
            Api::all(client.clone()),
            watcher::Config::default(),
            state.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(watch_ingress_kind::<Secret>(Api::all(client), secrets, state, shutdown)),
    ]
}
