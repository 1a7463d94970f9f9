//! Desired state from the Kubernetes API: kube-rs watchers on Services, EndpointSlices and
//! this node's Node object; and, for the Ingress proxy, Ingresses, IngressClasses and TLS Secrets.
//!
//! Objects are converted into the compact model as they arrive, during the initial list too:
//! a list (and every relist after a 410 Gone) stages the converted objects and applies them as
//! one replacement, so the store never sees a half-listed world and no Kubernetes object is
//! kept; later events apply one by one. Lists are paginated ([`LIST_PAGE_SIZE`]).

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;

use futures::{Stream, StreamExt};
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
use crate::model::convert::{self, ConvertedNode, ConvertedService, ConvertedSlice, SliceKey};
use crate::model::store::Kind;
use crate::model::ServiceKey;
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

/// Objects per list page. kube-rs pages its lists (client-go's 500 by default); kproxy asks
/// explicitly, so a list never holds more than one page of Kubernetes objects: each is
/// converted and dropped before the next page is requested.
pub const LIST_PAGE_SIZE: u32 = 500;

/// A watcher's configuration: kproxy's page size, and `selector`s.
fn list_watch_config() -> watcher::Config {
    watcher::Config::default().page_size(LIST_PAGE_SIZE)
}

/// The event stream of one watcher. Its retry policy lives here, and only here: after an
/// error the watcher waits before it lists or watches again.
fn watch_events<K>(api: Api<K>, config: watcher::Config) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    watcher::watcher(api, config).backoff(super::backoff::WatchBackoff::new())
}

/// What one watcher event asks of the state it feeds, with objects already converted.
#[derive(Debug, PartialEq)]
enum Change<C, D> {
    /// A complete (re)list: replace every object of the kind with these, at once.
    Replace(Vec<C>),
    /// One object was added or changed: store this.
    Apply(C),
    /// The object with this key was deleted: forget it.
    Delete(D),
}

/// How one watched kind is converted as it arrives. `convert` and `key` take the object by
/// value, so it is dropped as soon as its converted form exists.
trait Convert<K>: Send {
    /// What is kept of an object (and staged during a list).
    type Converted: Send;
    /// What names an object for a delete.
    type Key: Send;
    fn convert(&self, obj: K) -> Self::Converted;
    fn key(&self, obj: K) -> Self::Key;
}

/// Runs one watcher's events until shutdown. The objects of an initial list (and of every
/// relist after a 410 Gone) are converted one by one as they arrive and staged: `apply` gets
/// the list whole, so the store never sees a half-listed world, yet no Kubernetes object
/// outlives its conversion. A relist that fails halfway is discarded when the next one starts.
async fn drive<K, V: Convert<K>>(
    mut events: impl Stream<Item = Result<Event<K>, watcher::Error>> + Unpin,
    kind: impl Debug,
    converter: V,
    mut shutdown: watch::Receiver<bool>,
    mut apply: impl FnMut(Change<V::Converted, V::Key>),
) {
    let mut staged: Vec<V::Converted> = Vec::new();
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = shutdown.changed() => return,
        };
        match event {
            None => return,
            // A fresh Vec, not clear(): an earlier, larger list's capacity is given back.
            Some(Ok(Event::Init)) => staged = Vec::new(),
            Some(Ok(Event::InitApply(obj))) => staged.push(converter.convert(obj)),
            Some(Ok(Event::InitDone)) => {
                let all = std::mem::take(&mut staged);
                tracing::debug!(?kind, objects = all.len(), "listed");
                apply(Change::Replace(all));
            }
            Some(Ok(Event::Apply(obj))) => {
                let received = std::time::Instant::now();
                let converted = converter.convert(obj);
                let convert_us = received.elapsed().as_micros() as u64;
                apply(Change::Apply(converted));
                // With its time stamp, where a change's latency goes (scripts/bench-nftables.sh).
                tracing::debug!(
                    ?kind,
                    convert_us,
                    applied_us = received.elapsed().as_micros() as u64,
                    "watch event applied"
                );
            }
            Some(Ok(Event::Delete(obj))) => apply(Change::Delete(converter.key(obj))),
            // The watcher retries on its own (see `backoff`); the store keeps the last state.
            Some(Err(e)) => tracing::warn!(?kind, error = %e, "watch failed; retrying"),
        }
    }
}

/// Services to the store's conversion.
struct ServiceConvert;

impl Convert<Service> for ServiceConvert {
    type Converted = ConvertedService;
    type Key = ServiceKey;
    fn convert(&self, obj: Service) -> ConvertedService {
        convert::convert_service_object(&obj)
    }
    fn key(&self, obj: Service) -> ServiceKey {
        convert::service_key_of(&obj)
    }
}

/// EndpointSlices to the store's conversion, for this node (which endpoints are local).
struct SliceConvert {
    node_name: String,
}

impl Convert<EndpointSlice> for SliceConvert {
    type Converted = ConvertedSlice;
    type Key = SliceKey;
    fn convert(&self, obj: EndpointSlice) -> ConvertedSlice {
        convert::convert_slice_object(&obj, &self.node_name)
    }
    fn key(&self, obj: EndpointSlice) -> SliceKey {
        SliceKey::of(&obj)
    }
}

/// This node's Node object.
struct NodeConvert;

impl Convert<Node> for NodeConvert {
    type Converted = ConvertedNode;
    type Key = Option<String>;
    fn convert(&self, obj: Node) -> ConvertedNode {
        convert::convert_node_object(&obj)
    }
    fn key(&self, obj: Node) -> Option<String> {
        obj.metadata.name
    }
}

/// Feeds the Service watcher into the store.
fn apply_service(state: &SharedState, change: Change<ConvertedService, ServiceKey>) {
    match change {
        Change::Replace(all) => state.update(|s| s.replace_converted_services(all)),
        Change::Apply(svc) => state.update(|s| s.apply_converted_service(svc)),
        Change::Delete(key) => state.update(|s| s.delete_service_key(&key)),
    }
}

/// Feeds the EndpointSlice watcher into the store.
fn apply_slice(state: &SharedState, change: Change<ConvertedSlice, SliceKey>) {
    match change {
        Change::Replace(all) => state.update(|s| s.replace_converted_slices(all)),
        Change::Apply(slice) => state.update(|s| s.apply_converted_slice(slice)),
        Change::Delete(key) => state.update(|s| s.delete_slice_key(&key)),
    }
}

/// Feeds the Node watcher (one object, selected by name) into the store.
fn apply_node(state: &SharedState, change: Change<ConvertedNode, Option<String>>) {
    match change {
        Change::Replace(all) => match all.into_iter().next() {
            Some(node) => state.update(|s| s.apply_converted_node(node)),
            None => {
                // kube-proxy proceeds without node information too: NodePorts still work on
                // every local address; only zone hints and `primary` addresses are missing.
                tracing::warn!("this node's Node object was not found; proceeding without its addresses and zone");
                state.update(|s| {
                    s.mark_synced(Kind::Node);
                    true
                });
            }
        },
        Change::Apply(node) => state.update(|s| s.apply_converted_node(node)),
        // Keep the last known addresses: a deleted Node object does not remove the host.
        Change::Delete(name) => tracing::warn!(node = ?name, "this node's Node object was deleted"),
    }
}

/// Starts the three watchers; they run until `shutdown`.
pub fn spawn_watchers(
    client: Client,
    node_name: &str,
    state: Arc<SharedState>,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let services = list_watch_config().labels(NOT_OTHER_PROXY);
    let slices = list_watch_config().labels(&format!("{NOT_HEADLESS},{NOT_OTHER_PROXY}"));
    let node = list_watch_config().fields(&format!("metadata.name={node_name}"));
    let services = drive(
        watch_events(Api::<Service>::all(client.clone()), services).boxed(),
        Kind::Service,
        ServiceConvert,
        shutdown.clone(),
        {
            let state = state.clone();
            move |change| apply_service(&state, change)
        },
    );
    let slices = drive(
        watch_events(Api::<EndpointSlice>::all(client.clone()), slices).boxed(),
        Kind::EndpointSlice,
        SliceConvert {
            node_name: node_name.to_string(),
        },
        shutdown.clone(),
        {
            let state = state.clone();
            move |change| apply_slice(&state, change)
        },
    );
    let node = drive(
        watch_events(Api::<Node>::all(client), node).boxed(),
        Kind::Node,
        NodeConvert,
        shutdown,
        move |change| apply_node(&state, change),
    );
    vec![tokio::spawn(services), tokio::spawn(slices), tokio::spawn(node)]
}

/// An Ingress-side kind, converted by [`IngressObject::convert`].
struct IngressConvert;

impl<K: IngressObject + Send> Convert<K> for IngressConvert {
    type Converted = (K::Key, Option<K::Kept>);
    type Key = K::Key;
    fn convert(&self, obj: K) -> Self::Converted {
        (K::key(&obj), K::convert(&obj))
    }
    fn key(&self, obj: K) -> K::Key {
        K::key(&obj)
    }
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
    drive(
        watch_events(api, config).boxed(),
        K::KIND,
        IngressConvert,
        shutdown,
        |change: Change<<IngressConvert as Convert<K>>::Converted, K::Key>| match change {
            Change::Replace(all) => state.update_ingress(|s| K::replace_converted(s, all)),
            Change::Apply((key, kept)) => state.update_ingress(|s| K::apply_converted(s, key, kept)),
            Change::Delete(key) => state.update_ingress(|s| K::delete_key(s, &key)),
        },
    )
    .await
}

/// Starts the Ingress, IngressClass and TLS Secret watchers (Secrets selected by type, so
/// kproxy never receives other Secrets).
pub fn spawn_ingress_watchers(
    client: Client,
    state: Arc<SharedState>,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let secrets = list_watch_config().fields(&format!("type={TLS_SECRET_TYPE}"));
    vec![
        tokio::spawn(watch_ingress_kind::<Ingress>(
            Api::all(client.clone()),
            list_watch_config(),
            state.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(watch_ingress_kind::<IngressClass>(
            Api::all(client.clone()),
            list_watch_config(),
            state.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(watch_ingress_kind::<Secret>(Api::all(client), secrets, state, shutdown)),
    ]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::health::ProxyHealth;
    use crate::model::store::Store;

    fn svc(name: &str, ip: &str) -> Service {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: ns}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}"
        ))
        .unwrap()
    }

    fn slice(name: &str, svc: &str, ip: &str) -> EndpointSlice {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: ns, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [{ip}], nodeName: n1}}]"
        ))
        .unwrap()
    }

    /// Feeds `events` through [`drive`] into `store`, and returns the Services the store held
    /// after each change it was given.
    async fn feed_services(store: &mut Store, events: Vec<Result<Event<Service>, watcher::Error>>) -> Vec<Vec<String>> {
        let (_stop, shutdown) = watch::channel(false);
        let mut seen = Vec::new();
        drive(
            futures::stream::iter(events),
            Kind::Service,
            ServiceConvert,
            shutdown,
            |change| {
                match change {
                    Change::Replace(all) => store.replace_converted_services(all),
                    Change::Apply(svc) => store.apply_converted_service(svc),
                    Change::Delete(key) => store.delete_service_key(&key),
                };
                let names = store
                    .snapshot()
                    .desired
                    .services
                    .keys()
                    .map(|k| k.name.to_string())
                    .collect();
                seen.push(names);
            },
        )
        .await;
        seen
    }

    fn list(objects: Vec<Service>) -> Vec<Result<Event<Service>, watcher::Error>> {
        let items = objects.into_iter().map(|o| Ok(Event::InitApply(o)));
        std::iter::once(Ok(Event::Init))
            .chain(items)
            .chain([Ok(Event::InitDone)])
            .collect()
    }

    #[tokio::test]
    async fn a_list_reaches_the_store_whole_then_events_one_by_one() {
        let mut store = Store::new("n1");
        let mut events = list(vec![svc("a", "10.96.0.1"), svc("b", "10.96.0.2")]);
        events.push(Ok(Event::Apply(svc("c", "10.96.0.3"))));
        events.push(Ok(Event::Delete(svc("a", "10.96.0.1"))));
        let seen = feed_services(&mut store, events).await;
        assert_eq!(seen, [vec!["a", "b"], vec!["a", "b", "c"], vec!["b", "c"]]);
    }

    #[tokio::test]
    async fn a_relist_replaces_atomically_deleting_what_is_gone() {
        let mut store = Store::new("n1");
        feed_services(
            &mut store,
            list(vec![
                svc("a", "10.96.0.1"),
                svc("b", "10.96.0.2"),
                svc("c", "10.96.0.3"),
            ]),
        )
        .await;
        // A 410 Gone: the watcher reports the error and lists again. `b` was deleted and `c`
        // changed meanwhile; until the relist is complete the store keeps the old world.
        let mut relist = vec![Err(watcher::Error::NoResourceVersion)];
        relist.extend(list(vec![svc("a", "10.96.0.1"), svc("c", "10.96.0.33")]));
        let seen = feed_services(&mut store, relist).await;
        assert_eq!(seen, [vec!["a", "c"]], "one replacement, nothing in between");
        let snap = store.snapshot();
        let c = &snap.desired.services[&ServiceKey::new("ns", "c")];
        assert_eq!(c.ports[0].port.cluster_ips[0].to_string(), "10.96.0.33");
    }

    #[tokio::test]
    async fn a_relist_cut_short_is_discarded_and_bad_objects_skipped() {
        let mut store = Store::new("n1");
        let mut events = vec![
            Ok(Event::Init),
            Ok(Event::InitApply(svc("a", "10.96.0.1"))),
            Ok(Event::InitApply(svc("stale", "10.96.0.9"))),
            Err(watcher::Error::NoResourceVersion),
        ];
        events.extend(list(vec![
            svc("a", "10.96.0.1"),
            svc("bad", "10.96.0.999"),
            svc("d", "10.96.0.4"),
        ]));
        let seen = feed_services(&mut store, events).await;
        assert_eq!(
            seen,
            [vec!["a", "d"]],
            "the half list is never applied; the bad Service is skipped"
        );
    }

    #[tokio::test]
    async fn slices_deleted_during_a_relist_are_gone_after_it() {
        let mut store = Store::new("n1");
        store.replace_services([&svc("a", "10.96.0.1"), &svc("b", "10.96.0.2")]);
        let (_stop, shutdown) = watch::channel(false);
        let events = vec![
            Ok(Event::Init),
            Ok(Event::InitApply(slice("a-1", "a", "10.244.0.1"))),
            Ok(Event::InitApply(slice("b-1", "b", "10.244.0.2"))),
            Ok(Event::InitDone),
            Err(watcher::Error::NoResourceVersion),
            Ok(Event::Init),
            Ok(Event::InitApply(slice("a-1", "a", "10.244.0.1"))),
            Ok(Event::InitDone),
            Ok(Event::Apply(slice("b-2", "b", "10.244.0.3"))),
        ];
        let converter = SliceConvert { node_name: "n1".into() };
        let mut endpoints = Vec::new();
        drive(
            futures::stream::iter(events),
            Kind::EndpointSlice,
            converter,
            shutdown,
            |change| {
                match change {
                    Change::Replace(all) => store.replace_converted_slices(all),
                    Change::Apply(s) => store.apply_converted_slice(s),
                    Change::Delete(key) => store.delete_slice_key(&key),
                };
                let snap = store.snapshot();
                let mut eps: Vec<String> = snap
                    .desired
                    .services
                    .values()
                    .flat_map(|s| s.ports.iter().flat_map(|p| p.endpoints.iter().map(|e| e.addr_string())))
                    .collect();
                eps.sort();
                endpoints.push(eps);
            },
        )
        .await;
        assert_eq!(
            endpoints,
            [
                vec!["10.244.0.1:8080", "10.244.0.2:8080"],
                vec!["10.244.0.1:8080"],
                vec!["10.244.0.1:8080", "10.244.0.3:8080"],
            ]
        );
        let snap = store.snapshot();
        let a = &snap.desired.services[&ServiceKey::new("ns", "a")].ports[0].endpoints[0];
        assert!(a.is_local(), "converted for this node");
    }

    /// Objects of a fake kind that count how many of them are alive.
    static LIVE: AtomicUsize = AtomicUsize::new(0);

    struct Counted(u32);

    impl Counted {
        fn new(n: u32) -> Self {
            LIVE.fetch_add(1, Ordering::SeqCst);
            Counted(n)
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            LIVE.fetch_sub(1, Ordering::SeqCst);
        }
    }

    struct CountedConvert;

    impl Convert<Counted> for CountedConvert {
        type Converted = u32;
        type Key = u32;
        fn convert(&self, obj: Counted) -> u32 {
            obj.0
        }
        fn key(&self, obj: Counted) -> u32 {
            obj.0
        }
    }

    #[tokio::test]
    async fn no_listed_object_outlives_its_conversion() {
        let (_stop, shutdown) = watch::channel(false);
        // Objects are made as the stream is read, one page at a time as kube-rs does.
        let events = futures::stream::iter(0..1000u32).map(|i| match i {
            0 => Ok(Event::Init),
            999 => Ok(Event::InitDone),
            i => Ok(Event::InitApply(Counted::new(i))),
        });
        let mut replaced = Vec::new();
        drive(events.boxed(), "Counted", CountedConvert, shutdown, |change| {
            if let Change::Replace(all) = change {
                replaced.push((all.len(), LIVE.load(Ordering::SeqCst)));
            }
        })
        .await;
        assert_eq!(replaced, [(998, 0)], "998 staged values, no object alive");
    }

    #[tokio::test]
    async fn no_node_object_still_counts_as_listed() {
        let state = SharedState::new(Store::new("n1"), Arc::new(ProxyHealth::new(Duration::from_secs(60))));
        apply_service(&state, Change::Replace(vec![]));
        apply_slice(&state, Change::Replace(vec![]));
        assert!(!state.is_ready());
        apply_node(&state, Change::Replace(vec![]));
        assert!(state.is_ready());
        let services: BTreeSet<ServiceKey> = state.snapshot().unwrap().services.keys().cloned().collect();
        assert!(services.is_empty());
    }
}
