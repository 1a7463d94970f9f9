//! A fake Kubernetes API server for integration tests, faithful to what a watcher relies on.
//!
//! It serves list, watch, get and simple writes for any `/api/v1/...` or
//! `/apis/{group}/{version}/...` collection over plain HTTP on 127.0.0.1, with the semantics of
//! the real kube-apiserver that kube-rs' `watcher` depends on:
//!
//! - one global resourceVersion shared by every kind, like etcd's revision;
//! - paginated lists (`limit`/`continue`) read from one snapshot, like etcd's MVCC reads;
//! - list items without `apiVersion`/`kind`, watch objects with them;
//! - watches resumed from a resourceVersion, with events computed against the selectors (an
//!   object leaving a selector is `DELETED`), `BOOKMARK`s, and `timeoutSeconds`;
//! - `410 Expired` as an `ERROR` watch event (HTTP 200) once history is compacted.
//!
//! Tests change the cluster with [`FakeApiServer::apply`] and [`FakeApiServer::delete`], break
//! it with [`FakeApiServer::drop_watches`], [`FakeApiServer::compact`] and
//! [`FakeApiServer::set_fail_lists`], and wait for clients with
//! [`FakeApiServer::wait_for_request`] and [`FakeApiServer::wait_for_watch`].
//!
//! Custom resources are served as the real server serves them, once their
//! CustomResourceDefinition is applied ([`FakeApiServer::install_crds`]): every served version
//! of the CRD reads and writes the same objects (stored in the storage version, each answer in
//! the version asked for), a group/version/resource without an installed CRD answers 404, and
//! with the `status` subresource, writes of the object keep its status (a test's
//! [`FakeApiServer::apply`] of an object without `status` too, as `kubectl apply` would),
//! writes of `status` change nothing else, and `metadata.generation` grows with the spec only.
//! Deleting a CRD deletes its objects.
//!
//! Not modelled: discovery (`/api`, `/apis`), admission and validation (including CRD schemas,
//! their defaults and CEL rules), conversion webhooks (versions differ by apiVersion only),
//! finalizers (deletion is immediate), strategic merge (done as a JSON merge patch),
//! server-side apply's field ownership, authentication.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use self::selector::Filter;
use self::store::{Change, ObjectKey, Resource, Store};

/// How long a watch lasts without `timeoutSeconds` (the real server picks 30 to 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// A fake API server on `127.0.0.1:<random port>`. It serves until dropped; dropping it closes
/// every connection.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    /// The server's own runtime, so that a test blocking its thread (on a child process, a
    /// sleep) or pausing its clock never stalls the API. `None` only while dropping.
    runtime: Option<Runtime>,
}

/// Why a test's direct change to the fake's store was refused.
#[derive(Debug)]
pub enum FakeApiError {
    /// The object lacks `apiVersion`, `kind` or `metadata.name`.
    Invalid(&'static str),
    /// `delete` named an object that does not exist.
    NotFound(String),
}

impl std::fmt::Display for FakeApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(field) => write!(f, "fake API server: object without {field}"),
            Self::NotFound(what) => write!(f, "fake API server: {what} not found"),
        }
    }
}

impl std::error::Error for FakeApiError {}

impl FakeApiServer {
    /// Binds `127.0.0.1:0` in the network namespace of the calling thread and serves from a
    /// thread of its own (see [`Self::start_on`]).
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?).await
    }

    /// Serves on `listener`, which may have been bound inside another network namespace (the
    /// socket stays there). The server runs on a runtime and thread of its own, so this needs
    /// no tokio runtime, and a test that blocks its thread never stalls the API.
    pub async fn start_on(listener: std::net::TcpListener) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            addr: listener.local_addr()?,
            state: Mutex::new(State::default()),
            changed: watch::Sender::new(0),
            down: watch::Sender::new(false),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fakeapi")
            .enable_all()
            .build()?;
        let listener = {
            let _context = runtime.enter();
            TcpListener::from_std(listener)?
        };
        runtime.spawn(serve_connections(listener, Arc::clone(&shared)));
        Ok(Self {
            shared,
            runtime: Some(runtime),
        })
    }

    /// `http://127.0.0.1:PORT`, for `--master` or a kubeconfig's `server`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Creates or replaces the object named by its apiVersion, kind, namespace and name, as
    /// applying a whole object would: `uid`, `creationTimestamp` and `generation` are kept
    /// from the stored object, the resourceVersion is the next global one, and open watches
    /// get `ADDED` or `MODIFIED` (or `DELETED` when the object leaves their selector).
    /// An identical object is a no-op, as on the real server. Returns the stored object.
    pub fn apply(&self, object: Value) -> Result<Value, FakeApiError> {
        let field = |pointer: &'static str| text(&object, pointer).ok_or(FakeApiError::Invalid(pointer));
        let (api_version, kind) = (field("/apiVersion")?.to_string(), field("/kind")?.to_string());
        field("/metadata/name")?;
        self.shared.update(|st| {
            let served = st.served_kind(&api_version, &kind)?;
            let mut object = object;
            object["apiVersion"] = json!(served.canonical.api_version);
            if served.status_subresource && object.get("status").is_none() {
                let live = st.store.live(&served.canonical, &ObjectKey::of(&object));
                if let Some(status) = live.and_then(|l| l.get("status")).cloned() {
                    object["status"] = status;
                }
            }
            let stored = st.write(&served.canonical, object);
            if kind == "CustomResourceDefinition" && api_version == CRD_API_VERSION {
                st.install(&stored);
            }
            Ok(in_version(stored, &api_version))
        })
    }

    /// Applies every CustomResourceDefinition in the YAML files of `dir` (other documents are
    /// ignored), as `kubectl apply -f dir` would.
    pub fn install_crds(&self, dir: &std::path::Path) -> Result<usize, FakeApiError> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| FakeApiError::NotFound(format!("{}: {e}", dir.display())))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        let mut n = 0;
        for file in files {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| FakeApiError::NotFound(format!("{}: {e}", file.display())))?;
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let Ok(v) = <Value as serde::Deserialize>::deserialize(doc) else {
                    continue;
                };
                if text_of(&v, "/kind") == Some("CustomResourceDefinition") {
                    self.apply(v)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Deletes an object at once; open watches get `DELETED` with the deletion's
    /// resourceVersion. Returns the object as it was.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, FakeApiError> {
        let key = ObjectKey::new(namespace, name);
        self.shared.update(|st| {
            let served = st.served_kind(api_version, kind)?;
            let gone = st.remove(&served.canonical, &key);
            let gone = gone.ok_or_else(|| FakeApiError::NotFound(format!("{kind} {}", key.display())))?;
            if kind == "CustomResourceDefinition" && api_version == CRD_API_VERSION {
                st.uninstall(&gone);
            }
            Ok(in_version(gone, api_version))
        })
    }

    /// The stored object, with the metadata the server set, e.g. to check a status a client wrote.
    pub fn get(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let key = ObjectKey::new(namespace, name);
        let st = self.shared.lock();
        let served = st.served_kind(api_version, kind).ok()?;
        let live = st.store.live(&served.canonical, &key).cloned()?;
        Some(in_version(live, api_version))
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().store.resource_version()
    }

    /// Cuts every open watch stream without its final chunk, as a dying connection would.
    /// History is kept, so clients resume by watching from their last resourceVersion.
    pub fn drop_watches(&self) {
        self.shared.update(|st| {
            for (_, open) in std::mem::take(&mut st.watches) {
                // A stream whose client already left has nothing to cut.
                let _ = open.tx.send(WatchFrame::Abort);
            }
        });
    }

    /// Forgets all history, as etcd compaction (or a watch cache outrun by writes) does: the
    /// resourceVersion advances by one, as if another kind had been written, and any watch
    /// from an older resourceVersion, or `continue` token of an older list, gets `410 Expired`.
    /// Open watches are sent that `ERROR` event and closed, so every client must relist.
    pub fn compact(&self) {
        self.shared.update(|st| {
            st.store.compact();
            let now = st.store.resource_version();
            for (_, open) in std::mem::take(&mut st.watches) {
                let _ = open.tx.send(WatchFrame::Line(expired_event(open.rv, now)));
                let _ = open.tx.send(WatchFrame::End);
            }
        });
    }

    /// Sends a `BOOKMARK` at the current resourceVersion to every open watch that allows them
    /// (the real server sends one about every minute; this fake, only before `timeoutSeconds`).
    pub fn send_bookmarks(&self) {
        self.shared.update(|st| {
            let rv = st.store.resource_version();
            st.watches
                .retain(|_, open| !open.bookmarks || open.send_bookmark(rv, false));
        });
    }

    /// `true`: the server goes away as a stopped API server does. Every open connection (watches
    /// included) is closed and new ones are refused (the kernel answers RST), while the address
    /// stays reserved. `false`: it listens again on the same address, with its state and
    /// history, so clients resume their watches. Needs a listener bound to an explicit port
    /// (Linux releases an automatically chosen one when listening stops).
    pub fn set_down(&self, down: bool) {
        self.shared.down.send_replace(down);
    }

    /// Makes the next `n` list requests fail with `500 InternalError`.
    pub fn set_fail_lists(&self, n: u32) {
        self.shared.update(|st| st.fail_lists = n);
    }

    /// Every request so far as `METHOD path?query`, the query percent-decoded as sent, e.g.
    /// `GET /api/v1/nodes?&fieldSelector=metadata.name=node-1&limit=500`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// How many requests were logged so far: a mark for [`Self::wait_for_request`].
    pub fn request_count(&self) -> usize {
        self.shared.lock().requests.len()
    }

    /// Waits for a request logged at index `from` or later that `matches`, and returns it.
    /// Never times out: wrap it in `tokio::time::timeout` as a failure guard.
    pub async fn wait_for_request(&self, from: usize, matches: impl Fn(&str) -> bool) -> String {
        self.wait_until(|st| st.requests.iter().skip(from).find(|line| matches(line)).cloned())
            .await
    }

    /// The request line of every open watch stream.
    pub fn open_watches(&self) -> Vec<String> {
        let st = self.shared.lock();
        st.watches.values().map(|open| open.request.clone()).collect()
    }

    /// Waits until a watch whose request line `matches` is open, that is registered so that
    /// every later write reaches it, and returns its request line. Never times out.
    pub async fn wait_for_watch(&self, matches: impl Fn(&str) -> bool) -> String {
        self.wait_until(|st| {
            let open = st.watches.values().find(|open| matches(&open.request));
            open.map(|open| open.request.clone())
        })
        .await
    }

    async fn wait_until<T>(&self, mut probe: impl FnMut(&State) -> Option<T>) -> T {
        let mut changed = self.shared.changed.subscribe();
        loop {
            let found = probe(&self.shared.lock());
            if let Some(found) = found {
                return found;
            }
            // `self` holds the sender, so this returns when the state changed.
            let _ = changed.changed().await;
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        // Dropping a runtime may block, which panics inside another runtime: shut it down
        // without waiting. Its tasks, the connections among them, are dropped.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn text<'v>(object: &'v Value, pointer: &str) -> Option<&'v str> {
    object.pointer(pointer).and_then(Value::as_str)
}

fn text_of<'v>(object: &'v Value, pointer: &str) -> Option<&'v str> {
    text(object, pointer)
}

const CRD_API_VERSION: &str = "apiextensions.k8s.io/v1";

/// API groups the server has built in; every other group needs a CustomResourceDefinition.
const BUILT_IN_GROUPS: &[&str] = &[
    "",
    "admissionregistration.k8s.io",
    "apiextensions.k8s.io",
    "apiregistration.k8s.io",
    "apps",
    "authentication.k8s.io",
    "authorization.k8s.io",
    "autoscaling",
    "batch",
    "certificates.k8s.io",
    "coordination.k8s.io",
    "discovery.k8s.io",
    "events.k8s.io",
    "flowcontrol.apiserver.k8s.io",
    "networking.k8s.io",
    "node.k8s.io",
    "policy",
    "rbac.authorization.k8s.io",
    "resource.k8s.io",
    "scheduling.k8s.io",
    "storage.k8s.io",
];

/// An object as seen through `api_version` (custom resources are stored in one version and
/// served in every version of their CRD).
fn in_version(mut object: Value, api_version: &str) -> Value {
    if object.get("apiVersion").is_some() {
        object["apiVersion"] = json!(api_version);
    }
    object
}

/// What a CustomResourceDefinition makes the server serve.
#[derive(Debug, Clone)]
struct Crd {
    kind: String,
    /// Served versions.
    versions: Vec<String>,
    storage: String,
    /// Versions with the `status` subresource.
    status: Vec<String>,
}

/// A collection as a request (or a test) names it, resolved.
#[derive(Debug, Clone)]
struct Served {
    /// Where its objects are stored (a custom resource's storage version).
    canonical: Resource,
    /// Whether `status` is a subresource: writes of the object keep it.
    status_subresource: bool,
}

struct Shared {
    addr: SocketAddr,
    state: Mutex<State>,
    /// Bumped after every change to `state`, so tests wait for requests and watches without
    /// polling.
    changed: watch::Sender<u64>,
    /// Whether the server is down (see [`FakeApiServer::set_down`]).
    down: watch::Sender<bool>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // One failed assertion must not hide the state from the rest of the test.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update<R>(&self, change: impl FnOnce(&mut State) -> R) -> R {
        let result = change(&mut self.lock());
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
        result
    }
}

#[derive(Default)]
struct State {
    store: Store,
    watches: BTreeMap<u64, OpenWatch>,
    next_watch: u64,
    requests: Vec<String>,
    fail_lists: u32,
    /// Installed CRDs by group and plural.
    crds: BTreeMap<(String, String), Crd>,
}

impl State {
    /// Resolves a collection: built-in ones as they are, custom ones through their CRD (404
    /// when it is not installed or does not serve the version).
    fn served(&self, resource: &Resource) -> Result<Served, Failure> {
        let group = resource.group();
        if BUILT_IN_GROUPS.contains(&group) {
            return Ok(Served {
                canonical: resource.clone(),
                status_subresource: true,
            });
        }
        let version = resource.api_version.rsplit('/').next().unwrap_or_default();
        let crd = self
            .crds
            .get(&(group.to_string(), resource.plural.clone()))
            .filter(|c| c.versions.iter().any(|v| v == version));
        let Some(crd) = crd else {
            return Err(Failure::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        };
        Ok(Served {
            canonical: Resource {
                api_version: format!("{group}/{}", crd.storage),
                plural: resource.plural.clone(),
            },
            status_subresource: crd.status.iter().any(|v| v == version),
        })
    }

    /// The kind of a collection's objects.
    fn kind(&self, resource: &Resource) -> String {
        let crd = self.crds.get(&(resource.group().to_string(), resource.plural.clone()));
        crd.map_or_else(|| self.store.kind(resource), |c| c.kind.clone())
    }

    /// Resolves an apiVersion and kind, as a test names an object.
    fn served_kind(&self, api_version: &str, kind: &str) -> Result<Served, FakeApiError> {
        let group = api_version.split_once('/').map_or("", |(g, _)| g);
        let by_kind = self.crds.iter().find(|((g, _), c)| g == group && c.kind == kind);
        let resource = match by_kind {
            Some(((_, plural), _)) => Resource {
                api_version: api_version.to_string(),
                plural: plural.clone(),
            },
            None => Resource::of(api_version, kind),
        };
        self.served(&resource)
            .map_err(|_| FakeApiError::NotFound(format!("{api_version} {kind}: no CustomResourceDefinition installed")))
    }

    /// Serves what a CRD object defines.
    fn install(&mut self, crd: &Value) {
        let (Some(group), Some(plural), Some(kind)) = (
            text(crd, "/spec/group"),
            text(crd, "/spec/names/plural"),
            text(crd, "/spec/names/kind"),
        ) else {
            return;
        };
        let versions = crd
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let served = |v: &&Value| v.get("served").and_then(Value::as_bool).unwrap_or(false);
        let name = |v: &Value| text(v, "/name").unwrap_or_default().to_string();
        let entry = Crd {
            kind: kind.to_string(),
            versions: versions.iter().filter(served).map(name).collect(),
            storage: versions
                .iter()
                .find(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .map(name)
                .unwrap_or_default(),
            status: versions
                .iter()
                .filter(|v| v.pointer("/subresources/status").is_some())
                .map(name)
                .collect(),
        };
        self.crds.insert((group.to_string(), plural.to_string()), entry);
    }

    /// Stops serving a deleted CRD's resources: its objects are deleted (watches see them
    /// go) and its watches end.
    fn uninstall(&mut self, crd: &Value) {
        let (Some(group), Some(plural)) = (text(crd, "/spec/group"), text(crd, "/spec/names/plural")) else {
            return;
        };
        let Some(entry) = self.crds.remove(&(group.to_string(), plural.to_string())) else {
            return;
        };
        let resource = Resource {
            api_version: format!("{group}/{}", entry.storage),
            plural: plural.to_string(),
        };
        let now = self.store.resource_version();
        let keys: Vec<ObjectKey> = self.store.snapshot(&resource, now).map(|(k, _)| k.clone()).collect();
        for key in keys {
            self.remove(&resource, &key);
        }
        self.watches.retain(|_, open| {
            let ours = open.resource == resource;
            if ours {
                let _ = open.tx.send(WatchFrame::End);
            }
            !ours
        });
    }

    /// Stores `object` (create or replace), tells the watches, and returns the stored object.
    fn write(&mut self, resource: &Resource, object: Value) -> Value {
        let (stored, change) = self.store.put(resource, object);
        if let Some(change) = change {
            self.publish(resource, &change);
        }
        stored
    }

    fn remove(&mut self, resource: &Resource, key: &ObjectKey) -> Option<Value> {
        let change = self.store.remove(resource, key)?;
        self.publish(resource, &change);
        change.prev
    }

    /// Offers a write to every watch of its collection. This runs under the state lock, as
    /// does a watch's replay and registration, so each watch gets every write once, in order.
    fn publish(&mut self, resource: &Resource, change: &Change) {
        self.watches.retain(|_, open| {
            let event = (open.resource == *resource).then(|| watch_event(&open.filter, change, &open.api_version));
            let Some(Some(line)) = event else { return true };
            open.rv = change.rv;
            open.tx.send(WatchFrame::Line(line)).is_ok()
        });
    }
}

/// A registered watch stream.
struct OpenWatch {
    request: String,
    resource: Resource,
    /// The apiVersion the client watches in (its objects are rewritten to it).
    api_version: String,
    kind: String,
    filter: Filter,
    bookmarks: bool,
    /// The resourceVersion of the last event sent, or the one the watch started at.
    rv: u64,
    tx: mpsc::UnboundedSender<WatchFrame>,
}

impl OpenWatch {
    /// False when the client has gone.
    fn send_bookmark(&mut self, rv: u64, initial_events_end: bool) -> bool {
        self.rv = rv;
        let line = bookmark_event(&self.kind, &self.api_version, rv, initial_events_end);
        self.tx.send(WatchFrame::Line(line)).is_ok()
    }
}

enum WatchFrame {
    /// One newline-terminated watch event.
    Line(Bytes),
    /// End the response normally, with its final chunk.
    End,
    /// Break the response off, without its final chunk.
    Abort,
}

/// The event a watch with `filter` sees for `change`, as the real watch cache computes it:
/// entering the selector is `ADDED`, leaving it is `DELETED` with the old object at the new
/// resourceVersion.
fn watch_event(filter: &Filter, change: &Change, api_version: &str) -> Option<Bytes> {
    let now = !change.deleted && filter.matches(&change.object);
    let before = change.prev.as_ref().is_some_and(|prev| filter.matches(prev));
    let object = || in_version(change.object.clone(), api_version);
    match (before, now) {
        (true, true) => Some(event_line("MODIFIED", &object())),
        (false, true) => Some(event_line("ADDED", &object())),
        (true, false) if change.deleted => Some(event_line("DELETED", &object())),
        (true, false) => {
            let mut gone = in_version(change.prev.clone().unwrap_or_default(), api_version);
            store::set_resource_version(&mut gone, change.rv);
            Some(event_line("DELETED", &gone))
        }
        (false, false) => None,
    }
}

/// `{"type":...,"object":...}` and a newline, in the real server's field order.
fn event_line(kind: &str, object: &Value) -> Bytes {
    Bytes::from(format!("{{\"type\":{},\"object\":{object}}}\n", json!(kind)))
}

fn bookmark_event(kind: &str, api_version: &str, rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if initial_events_end {
        metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    let object = json!({ "kind": kind, "apiVersion": api_version, "metadata": metadata });
    event_line("BOOKMARK", &object)
}

fn expired_event(requested: u64, compacted: u64) -> Bytes {
    let message = format!("too old resource version: {requested} ({compacted})");
    event_line("ERROR", &Failure::new(410, "Expired", message).status())
}

// ---------------------------------------------------------------------------------------------
// HTTP

type Body = UnsyncBoxBody<Bytes, std::io::Error>;
type Query = BTreeMap<String, String>;
type Reply = Result<Response<Body>, Failure>;

async fn serve_connections(mut listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    let mut down = shared.down.subscribe();
    loop {
        let going_down = async { down.wait_for(|d| *d).await.is_ok() };
        let accepted = tokio::select! {
            true = going_down => None,
            accepted = listener.accept() => Some(accepted),
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Some(accepted) = accepted else {
            listener = go_down_until_up(listener, &shared, &mut connections, &mut down).await;
            continue;
        };
        let Ok((stream, _)) = accepted else { continue };
        let shared = Arc::clone(&shared);
        let service = service_fn(move |req| answer(Arc::clone(&shared), req));
        let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
        // A client hanging up mid-watch is routine: nobody to tell.
        connections.spawn(async move {
            let _ = connection.await;
        });
    }
}

/// Stops listening (new connections are refused, the address stays bound), closes every open
/// connection, and once the server is up again listens anew on the same socket.
async fn go_down_until_up(
    listener: TcpListener,
    shared: &Shared,
    connections: &mut JoinSet<()>,
    down: &mut watch::Receiver<bool>,
) -> TcpListener {
    use std::os::fd::AsRawFd;
    // Out of the runtime first: the hang-up that stopping a listener signals would stay in
    // tokio's readiness for the socket, and accept would never wait properly again.
    let socket = listener.into_std().expect("fake API server: deregister");
    nix::sys::socket::shutdown(socket.as_raw_fd(), nix::sys::socket::Shutdown::Both)
        .expect("fake API server: stop listening");
    // Dropping a connection's task closes its socket; watch bodies unregister as they drop.
    connections.abort_all();
    shared.update(|st| st.watches.clear());
    let _ = down.wait_for(|d| !*d).await;
    nix::sys::socket::listen(&socket, nix::sys::socket::Backlog::MAXCONN).expect("fake API server: listen again");
    let addr = socket.local_addr().expect("fake API server: local address");
    assert_eq!(
        addr, shared.addr,
        "fake API server: set_down needs a listener bound to an explicit port"
    );
    TcpListener::from_std(socket).expect("fake API server: register again")
}

/// An API error, answered as a `Status` object.
#[derive(Debug)]
struct Failure {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl Failure {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// `404 NotFound` or `409 AlreadyExists` about one object.
    fn about(code: u16, reason: &'static str, resource: &Resource, name: &str, what: &str) -> Self {
        let message = format!("{} {name:?} {what}", resource.plural);
        let details = json!({ "name": name, "group": resource.group(), "kind": resource.plural });
        Self {
            details: Some(details),
            ..Self::new(code, reason, message)
        }
    }

    fn not_found(resource: &Resource, name: &str) -> Self {
        Self::about(404, "NotFound", resource, name, "not found")
    }

    fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }

    fn into_response(self) -> Response<Body> {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &self.status())
    }
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let body = Full::new(Bytes::from(value.to_string())).map_err(|never| match never {});
    with_json_type(Response::new(body.boxed_unsync()), code)
}

fn with_json_type(mut response: Response<Body>, code: StatusCode) -> Response<Body> {
    *response.status_mut() = code;
    let json = HeaderValue::from_static("application/json");
    response.headers_mut().insert(CONTENT_TYPE, json);
    response
}

/// What a request path names.
enum Route {
    Version,
    /// A collection, in one namespace or across all (or cluster-scoped).
    Collection(Resource, Option<String>),
    /// An object, or one of its subresources such as `status`.
    Object(Resource, ObjectKey, Option<String>),
}

/// How a request's collection is served: in which apiVersion, with a status subresource or not.
struct ServedAs {
    api_version: String,
    status_subresource: bool,
}

impl ServedAs {
    fn answer(&self, object: &Value) -> Value {
        in_version(object.clone(), &self.api_version)
    }
}

impl Route {
    /// The route with its collection resolved to where its objects are stored.
    fn served(self, st: &State) -> Result<(Route, ServedAs), Failure> {
        let resolve = |resource: Resource| -> Result<(Resource, ServedAs), Failure> {
            let served = st.served(&resource)?;
            Ok((
                served.canonical,
                ServedAs {
                    api_version: resource.api_version,
                    status_subresource: served.status_subresource,
                },
            ))
        };
        match self {
            Route::Version => Ok((
                Route::Version,
                ServedAs {
                    api_version: String::new(),
                    status_subresource: false,
                },
            )),
            Route::Collection(resource, namespace) => {
                let (canonical, served) = resolve(resource)?;
                Ok((Route::Collection(canonical, namespace), served))
            }
            Route::Object(resource, key, sub) => {
                let (canonical, served) = resolve(resource)?;
                Ok((Route::Object(canonical, key, sub), served))
            }
        }
    }

    fn parse(path: &str) -> Option<Self> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if segments.iter().any(|segment| segment.is_empty()) {
            return None;
        }
        let (api_version, rest) = match segments.as_slice() {
            ["version"] => return Some(Self::Version),
            ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
            ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
            _ => return None,
        };
        // `namespaces/NAME/status` is a Namespace's own subresource, not a collection.
        let (namespace, rest) = match rest {
            ["namespaces", namespace, plural, ..] if !matches!(*plural, "status" | "finalize") => {
                (Some(*namespace), &rest[2..])
            }
            _ => (None, rest),
        };
        let resource = Resource {
            api_version,
            plural: (*rest.first()?).to_string(),
        };
        let key = |name: &str| ObjectKey::new(namespace, name);
        match rest {
            [_] => Some(Self::Collection(resource, namespace.map(str::to_string))),
            [_, name] => Some(Self::Object(resource, key(name), None)),
            [_, name, sub] => Some(Self::Object(resource, key(name), Some((*sub).to_string()))),
            _ => None,
        }
    }
}

async fn answer(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let raw_query = req.uri().query().unwrap_or_default().to_string();
    let line = match raw_query.as_str() {
        "" => format!("{} {}", req.method(), req.uri().path()),
        raw => format!("{} {}?{}", req.method(), req.uri().path(), percent_decode(raw)),
    };
    shared.update(|st| st.requests.push(line.clone()));
    let query = parse_query(&raw_query);
    let watch = matches!(param(&query, "watch"), Some("true" | "1"));
    // Custom resources: stored in their CRD's storage version, answered in the one asked for.
    let route = Route::parse(req.uri().path()).map(|route| route.served(&shared.lock()));
    let route = match route {
        Some(Err(failure)) => return Ok(failure.into_response()),
        Some(Ok(route)) => Some(route),
        None => None,
    };
    let reply = match (req.method().clone(), route) {
        (_, None) => Err(Failure::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )),
        (Method::GET, Some((Route::Version, _))) => Ok(json_response(StatusCode::OK, &version())),
        (Method::GET, Some((Route::Collection(resource, namespace), served))) if watch => {
            start_watch(&shared, line, resource, served, namespace.as_deref(), &query)
        }
        (Method::GET, Some((Route::Collection(resource, namespace), served))) => {
            shared.update(|st| list(st, &resource, &served.api_version, namespace.as_deref(), &query))
        }
        (Method::GET, Some((Route::Object(resource, key, subresource), served))) => {
            let st = shared.lock();
            let status_ok = subresource.as_deref() == Some("status") && served.status_subresource;
            match (st.store.live(&resource, &key), subresource.as_deref()) {
                (Some(object), None) => Ok(json_response(StatusCode::OK, &served.answer(object))),
                (Some(object), Some(_)) if status_ok => Ok(json_response(StatusCode::OK, &served.answer(object))),
                _ => Err(Failure::not_found(&resource, &key.name)),
            }
        }
        (Method::DELETE, Some((Route::Object(resource, key, None), served))) => {
            let gone = shared.update(|st| st.remove(&resource, &key));
            let gone = gone.ok_or_else(|| Failure::not_found(&resource, &key.name));
            gone.map(|gone| json_response(StatusCode::OK, &served.answer(&gone)))
        }
        (Method::POST | Method::PUT | Method::PATCH, Some((route, served))) => write(&shared, route, served, req).await,
        (method, Some(_)) => Err(Failure::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not allowed here"),
        )),
    };
    Ok(reply.unwrap_or_else(Failure::into_response))
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-fakeapi",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn parse_query(raw: &str) -> Query {
    let pairs = raw.split('&').filter(|pair| !pair.is_empty());
    pairs
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .map(|(key, value)| (percent_decode(key), percent_decode(value)))
        .collect()
}

/// A query parameter; an empty value counts as absent, as on the real server.
fn param<'q>(query: &'q Query, name: &str) -> Option<&'q str> {
    query.get(name).map(String::as_str).filter(|value| !value.is_empty())
}

fn parse_param<T: std::str::FromStr>(query: &Query, name: &str) -> Result<Option<T>, Failure> {
    let Some(value) = param(query, name) else {
        return Ok(None);
    };
    let parsed = value
        .parse()
        .map_err(|_| Failure::bad_request(format!("invalid {name} {value:?}")));
    parsed.map(Some)
}

/// Decodes `application/x-www-form-urlencoded` text: `+` is a space, `%XY` a byte.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |at: usize| bytes.get(at).and_then(|b| char::from(*b).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        match (byte, hex(i + 1), hex(i + 2)) {
            (b'+', ..) => out.push(b' '),
            (b'%', Some(high), Some(low)) => {
                out.extend(u8::try_from(high * 16 + low));
                i += 2;
            }
            _ => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Lists

/// One list page, read from one snapshot: the first page's resourceVersion travels in the
/// `continue` token, so later pages ignore writes made since, and expire with compaction.
fn list(st: &mut State, resource: &Resource, api_version: &str, namespace: Option<&str>, query: &Query) -> Reply {
    if st.fail_lists > 0 {
        st.fail_lists -= 1;
        return Err(Failure::new(
            500,
            "InternalError",
            "fake API server: injected list failure",
        ));
    }
    let filter = Filter::parse(namespace, param(query, "fieldSelector"), param(query, "labelSelector"))
        .map_err(Failure::bad_request)?;
    let limit = parse_param::<usize>(query, "limit")?.filter(|limit| *limit > 0);
    let (snapshot, after) = match param(query, "continue") {
        None => (list_resource_version(&st.store, query, limit.is_some())?, None),
        Some(_) if param(query, "resourceVersion").is_some() => {
            let message = "specifying resource version is not allowed when using continue";
            return Err(Failure::bad_request(message));
        }
        Some(token) => {
            let (rv, after) = decode_continue(token)
                .ok_or_else(|| Failure::bad_request(format!("continue key is not valid: {token:?}")))?;
            if rv < st.store.compacted() {
                return Err(Failure::new(410, "Expired", "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter."));
            }
            (rv, Some(after))
        }
    };
    let mut matching = st
        .store
        .snapshot(resource, snapshot)
        .filter(|(key, _)| after.as_ref().is_none_or(|after| *key > after))
        .filter(|(_, object)| filter.matches(object));
    let page: Vec<_> = matching.by_ref().take(limit.unwrap_or(usize::MAX)).collect();
    let remaining = matching.count();
    let mut metadata = json!({ "resourceVersion": snapshot.to_string() });
    if let (true, Some((last, _))) = (remaining > 0, page.last()) {
        metadata["continue"] = json!(encode_continue(snapshot, last));
        // The real server can count what is left only when no selector filters it.
        if !filter.has_selectors() {
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    // List items carry no apiVersion or kind on the wire.
    let items: Vec<Value> = page
        .into_iter()
        .map(|(_, object)| {
            let mut item = object.clone();
            if let Some(fields) = item.as_object_mut() {
                fields.retain(|key, _| key != "apiVersion" && key != "kind");
            }
            item
        })
        .collect();
    let list = json!({
        "kind": format!("{}List", st.kind(resource)),
        "apiVersion": api_version,
        "metadata": metadata,
        "items": items,
    });
    Ok(json_response(StatusCode::OK, &list))
}

/// The snapshot a first list page reads: the newest, or an exact older one when asked for.
fn list_resource_version(store: &Store, query: &Query, paged: bool) -> Result<u64, Failure> {
    let current = store.resource_version();
    let Some(rv) = parse_param::<u64>(query, "resourceVersion")?.filter(|rv| *rv != 0) else {
        return Ok(current);
    };
    if rv > current {
        let message = format!("Too large resource version: {rv}, current: {current}");
        return Err(Failure::new(504, "Timeout", message));
    }
    // A paged list with a resourceVersion and no match rule reads exactly at it (legacy rule).
    let exact = match param(query, "resourceVersionMatch") {
        Some(rule) => rule == "Exact",
        None => paged,
    };
    if exact && rv < store.compacted() {
        let message = format!("too old resource version: {rv} ({})", store.compacted());
        return Err(Failure::new(410, "Expired", message));
    }
    Ok(if exact { rv } else { current })
}

fn encode_continue(rv: u64, last: &ObjectKey) -> String {
    format!("{rv}/{}/{}", last.namespace, last.name)
}

fn decode_continue(token: &str) -> Option<(u64, ObjectKey)> {
    let mut parts = token.splitn(3, '/');
    let rv = parts.next()?.parse().ok()?;
    let (namespace, name) = (parts.next()?, parts.next()?);
    Some((rv, ObjectKey::new(Some(namespace), name)))
}

// ---------------------------------------------------------------------------------------------
// Watches

/// Registers a watch and answers with its event stream. Replay and registration happen under
/// the state lock, so the stream neither misses nor repeats a write.
fn start_watch(
    shared: &Arc<Shared>,
    request: String,
    resource: Resource,
    served: ServedAs,
    namespace: Option<&str>,
    query: &Query,
) -> Reply {
    let filter = Filter::parse(namespace, param(query, "fieldSelector"), param(query, "labelSelector"))
        .map_err(Failure::bad_request)?;
    let bookmarks = param(query, "allowWatchBookmarks") == Some("true");
    let initial_events = param(query, "sendInitialEvents") == Some("true");
    if initial_events && (!bookmarks || param(query, "resourceVersionMatch") != Some("NotOlderThan")) {
        let message = "sendInitialEvents needs allowWatchBookmarks=true and resourceVersionMatch=NotOlderThan";
        return Err(Failure::new(422, "Invalid", message));
    }
    let timeout = parse_param(query, "timeoutSeconds")?.map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let start = parse_param::<u64>(query, "resourceVersion")?.filter(|rv| *rv != 0);
    let (tx, rx) = mpsc::unbounded_channel();
    let id = shared.update(|st| {
        let id = st.next_watch;
        st.next_watch += 1;
        let current = st.store.resource_version();
        let send = |line: Bytes| {
            let _ = tx.send(WatchFrame::Line(line));
        };
        let mut open = OpenWatch {
            request,
            kind: st.kind(&resource),
            resource,
            api_version: served.api_version,
            filter,
            bookmarks,
            rv: current,
            tx: tx.clone(),
        };
        match start.filter(|_| !initial_events) {
            // Without a resourceVersion, or with sendInitialEvents, the watch starts with
            // synthetic ADDED events for the current state.
            None => {
                let objects = st.store.snapshot(&open.resource, current).map(|(_, object)| object);
                objects
                    .filter(|object| open.filter.matches(object))
                    .for_each(|object| send(event_line("ADDED", &in_version(object.clone(), &open.api_version))));
                if initial_events {
                    open.send_bookmark(current, true);
                }
            }
            Some(rv) if rv < st.store.compacted() => {
                send(expired_event(rv, st.store.compacted()));
                let _ = tx.send(WatchFrame::End);
                return id;
            }
            Some(rv) if rv > current => {
                let message = format!("Too large resource version: {rv}, current: {current}");
                send(event_line("ERROR", &Failure::new(504, "Timeout", message).status()));
                let _ = tx.send(WatchFrame::End);
                return id;
            }
            Some(rv) => {
                let changes = st.store.changes_since(&open.resource, rv);
                changes
                    .iter()
                    .filter_map(|change| watch_event(&open.filter, change, &open.api_version))
                    .for_each(send);
            }
        }
        st.watches.insert(id, open);
        id
    });
    let stream = WatchStream {
        shared: Arc::clone(shared),
        id,
        rx,
        deadline: tokio::time::Instant::now() + timeout,
        timed_out: false,
        aborted: false,
    };
    let body = StreamBody::new(stream.into_frames()).boxed_unsync();
    Ok(with_json_type(Response::new(body), StatusCode::OK))
}

/// The response body of one watch; dropping it (the client left) unregisters the watch.
struct WatchStream {
    shared: Arc<Shared>,
    id: u64,
    rx: mpsc::UnboundedReceiver<WatchFrame>,
    deadline: tokio::time::Instant,
    timed_out: bool,
    aborted: bool,
}

impl WatchStream {
    fn into_frames(self) -> impl futures::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send {
        futures::stream::unfold(self, |mut watch| async move {
            if watch.aborted {
                return None;
            }
            loop {
                tokio::select! {
                    biased;
                    frame = watch.rx.recv() => return match frame {
                        Some(WatchFrame::Line(line)) => Some((Ok(Frame::data(line)), watch)),
                        Some(WatchFrame::Abort) => {
                            watch.aborted = true;
                            // A body error makes hyper close the connection mid-chunk.
                            let kind = std::io::ErrorKind::ConnectionAborted;
                            Some((Err(std::io::Error::new(kind, "watch dropped by the test")), watch))
                        }
                        Some(WatchFrame::End) | None => None,
                    },
                    () = tokio::time::sleep_until(watch.deadline), if !watch.timed_out => {
                        watch.timed_out = true;
                        watch.time_out();
                    }
                }
            }
        })
    }

    /// `timeoutSeconds` ran out: queue a last bookmark (when allowed) and the end behind any
    /// event already queued, so the client's resourceVersion never runs ahead of its events.
    fn time_out(&self) {
        self.shared.update(|st| {
            let rv = st.store.resource_version();
            if let Some(mut open) = st.watches.remove(&self.id) {
                if open.bookmarks {
                    open.send_bookmark(rv, false);
                }
                let _ = open.tx.send(WatchFrame::End);
            }
        });
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.shared.update(|st| st.watches.remove(&self.id));
    }
}

// ---------------------------------------------------------------------------------------------
// Writes from clients

const MERGE_PATCH: &str = "application/merge-patch+json";
const STRATEGIC_MERGE_PATCH: &str = "application/strategic-merge-patch+json";
const APPLY_PATCH: &str = "application/apply-patch+yaml";

async fn write(shared: &Shared, route: Route, served: ServedAs, req: Request<Incoming>) -> Reply {
    let method = req.method().clone();
    let content_type = req.headers().get(CONTENT_TYPE).and_then(|value| value.to_str().ok());
    let content_type = content_type.unwrap_or_default().split(';').next().unwrap_or_default();
    let patch = (method == Method::PATCH).then(|| content_type.trim().to_string());
    let bytes = req.into_body().collect().await;
    let bytes = bytes
        .map_err(|e| Failure::bad_request(format!("reading the body: {e}")))?
        .to_bytes();
    let body: Value =
        serde_json::from_slice(&bytes).map_err(|e| Failure::bad_request(format!("the body is not JSON: {e}")))?;
    if !body.is_object() || !(body["metadata"].is_object() || body["metadata"].is_null()) {
        return Err(Failure::bad_request("the body is not an object with metadata"));
    }
    match (method, route) {
        (Method::POST, Route::Collection(resource, namespace)) => {
            let created = shared.update(|st| create(st, &resource, namespace.as_deref(), body))?;
            Ok(json_response(StatusCode::CREATED, &served.answer(&created)))
        }
        (Method::PUT | Method::PATCH, Route::Object(resource, key, subresource)) => {
            let subresource = subresource.as_deref();
            let write = |st: &mut State| update(st, &resource, &key, subresource, &served, patch.as_deref(), &body);
            let (code, stored) = shared.update(write)?;
            Ok(json_response(code, &served.answer(&stored)))
        }
        (method, _) => Err(Failure::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not allowed here"),
        )),
    }
}

fn create(st: &mut State, resource: &Resource, namespace: Option<&str>, mut object: Value) -> Result<Value, Failure> {
    if !object.is_object() || !object["metadata"].is_object() {
        return Err(Failure::bad_request("the body is not an object with metadata"));
    }
    object["apiVersion"] = json!(resource.api_version);
    if text(&object, "/kind").is_none() {
        object["kind"] = json!(st.kind(resource));
    }
    if let Some(namespace) = namespace {
        if text(&object, "/metadata/namespace").is_some_and(|given| given != namespace) {
            let message = "the namespace of the provided object does not match the namespace sent on the request";
            return Err(Failure::bad_request(message));
        }
        object["metadata"]["namespace"] = json!(namespace);
    }
    if text(&object, "/metadata/name").is_none() {
        let Some(prefix) = text(&object, "/metadata/generateName") else {
            return Err(Failure::new(422, "Invalid", "name or generateName is required"));
        };
        object["metadata"]["name"] = json!(format!("{prefix}{:05x}", st.store.resource_version() + 1));
    }
    let key = ObjectKey::of(&object);
    if st.store.live(resource, &key).is_some() {
        return Err(Failure::about(
            409,
            "AlreadyExists",
            resource,
            &key.name,
            "already exists",
        ));
    }
    let stored = st.write(resource, object);
    if resource.api_version == CRD_API_VERSION && resource.plural == "customresourcedefinitions" {
        st.install(&stored);
    }
    Ok(stored)
}

/// `PUT` or `PATCH` of an object or of its `status`. For kinds with a status subresource,
/// writing the object keeps its status, and writing `status` changes nothing else; kinds
/// without one (custom resources whose CRD declares none) have no `status` to write.
fn update(
    st: &mut State,
    resource: &Resource,
    key: &ObjectKey,
    subresource: Option<&str>,
    served: &ServedAs,
    patch: Option<&str>,
    body: &Value,
) -> Result<(StatusCode, Value), Failure> {
    let status_write = match subresource {
        None => false,
        Some("status") if served.status_subresource => true,
        Some(_) => return Err(Failure::not_found(resource, &key.name)),
    };
    let live = st.store.live(resource, key).cloned();
    let mut object = match (patch, &live) {
        (None, Some(_)) => body.clone(),
        (Some(MERGE_PATCH | STRATEGIC_MERGE_PATCH), Some(live)) => merged(live.clone(), body),
        // Server-side apply without field ownership: a merge patch that may create.
        (Some(APPLY_PATCH), live) => {
            let empty = json!({ "kind": st.kind(resource), "metadata": {} });
            merged(live.clone().unwrap_or(empty), body)
        }
        (None | Some(MERGE_PATCH | STRATEGIC_MERGE_PATCH), None) => {
            return Err(Failure::not_found(resource, &key.name));
        }
        (Some(other), _) => {
            let message = format!("unsupported patch type {other}; this fake takes {MERGE_PATCH}, {STRATEGIC_MERGE_PATCH} or {APPLY_PATCH}");
            return Err(Failure::new(415, "UnsupportedMediaType", message));
        }
    };
    let named = text(body, "/metadata/name");
    if named.is_some_and(|name| name != key.name) || (patch.is_none() && named.is_none()) {
        let message = format!(
            "the name of the object ({}) does not match the name on the URL ({})",
            named.unwrap_or_default(),
            key.name
        );
        return Err(Failure::bad_request(message));
    }
    let precondition = text(body, "/metadata/resourceVersion").filter(|rv| !rv.is_empty());
    let live_rv = live.as_ref().and_then(|live| text(live, "/metadata/resourceVersion"));
    if precondition.is_some_and(|rv| Some(rv) != live_rv) {
        let message = format!("Operation cannot be fulfilled on {} {:?}: the object has been modified; please apply your changes to the latest version and try again", resource.plural, key.name);
        return Err(Failure::new(409, "Conflict", message));
    }
    object["apiVersion"] = json!(resource.api_version);
    object["metadata"]["name"] = json!(key.name);
    if !key.namespace.is_empty() {
        object["metadata"]["namespace"] = json!(key.namespace);
    }
    let code = match &live {
        Some(live) => {
            if status_write {
                object = with_status_of(live.clone(), &object);
            } else if served.status_subresource {
                object = with_status_of(object, live);
            }
            StatusCode::OK
        }
        None => StatusCode::CREATED,
    };
    Ok((code, st.write(resource, object)))
}

/// `object` with the `status` of `from` (or none if `from` has none).
fn with_status_of(mut object: Value, from: &Value) -> Value {
    if let Some(fields) = object.as_object_mut() {
        match from.get("status") {
            Some(status) => fields.insert("status".into(), status.clone()),
            None => fields.remove("status"),
        };
    }
    object
}

/// RFC 7386 JSON merge patch.
fn merged(target: Value, patch: &Value) -> Value {
    let Value::Object(patch) = patch else {
        return patch.clone();
    };
    let mut fields = match target {
        Value::Object(fields) => fields,
        _ => Map::new(),
    };
    for (key, value) in patch {
        let old = fields.remove(key);
        if !value.is_null() {
            fields.insert(key.clone(), merged(old.unwrap_or_default(), value));
        }
    }
    Value::Object(fields)
}

// ---------------------------------------------------------------------------------------------

/// Objects by collection, with their history since the last compaction, like etcd's MVCC.
mod store {
    use std::collections::BTreeMap;
    use std::time::{SystemTime, UNIX_EPOCH};

    use serde_json::{json, Value};

    use super::text;

    /// Plural and kind of the collections kproxy's tests use; other kinds' plurals follow the
    /// English rules the built-in resources follow.
    const KNOWN_KINDS: &[(&str, &str)] = &[
        ("configmaps", "ConfigMap"),
        ("customresourcedefinitions", "CustomResourceDefinition"),
        ("endpoints", "Endpoints"),
        ("endpointslices", "EndpointSlice"),
        ("events", "Event"),
        ("gatewayclasses", "GatewayClass"),
        ("gateways", "Gateway"),
        ("httproutes", "HTTPRoute"),
        ("ingressclasses", "IngressClass"),
        ("ingresses", "Ingress"),
        ("leases", "Lease"),
        ("namespaces", "Namespace"),
        ("networkpolicies", "NetworkPolicy"),
        ("nodes", "Node"),
        ("pods", "Pod"),
        ("referencegrants", "ReferenceGrant"),
        ("secrets", "Secret"),
        ("serviceaccounts", "ServiceAccount"),
        ("services", "Service"),
    ];

    /// A REST collection: `v1` `services`, or `discovery.k8s.io/v1` `endpointslices`.
    #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
    pub struct Resource {
        pub api_version: String,
        pub plural: String,
    }

    impl Resource {
        pub fn of(api_version: &str, kind: &str) -> Self {
            let known = KNOWN_KINDS.iter().find(|(_, known)| *known == kind);
            let plural = known.map_or_else(|| guess_plural(kind), |(plural, _)| (*plural).to_string());
            Self {
                api_version: api_version.to_string(),
                plural,
            }
        }

        /// The API group, `""` for the core group.
        pub fn group(&self) -> &str {
            self.api_version.split_once('/').map_or("", |(group, _)| group)
        }
    }

    fn guess_plural(kind: &str) -> String {
        let lower = kind.to_ascii_lowercase();
        if ["s", "x", "ch", "sh"].iter().any(|end| lower.ends_with(end)) {
            return format!("{lower}es");
        }
        match lower.strip_suffix('y') {
            Some(stem) if !stem.ends_with(['a', 'e', 'i', 'o', 'u']) => format!("{stem}ies"),
            _ => format!("{lower}s"),
        }
    }

    /// Where an object lives in its collection; ordered as etcd orders its keys.
    #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
    pub struct ObjectKey {
        /// Empty for cluster-scoped objects.
        pub namespace: String,
        pub name: String,
    }

    impl ObjectKey {
        pub fn new(namespace: Option<&str>, name: &str) -> Self {
            let namespace = namespace.unwrap_or_default().to_string();
            Self {
                namespace,
                name: name.to_string(),
            }
        }

        pub fn of(object: &Value) -> Self {
            let name = text(object, "/metadata/name").unwrap_or_default();
            Self::new(text(object, "/metadata/namespace"), name)
        }

        pub fn display(&self) -> String {
            match self.namespace.as_str() {
                "" => self.name.clone(),
                namespace => format!("{namespace}/{}", self.name),
            }
        }
    }

    /// One write, as a watch needs it.
    pub struct Change {
        pub rv: u64,
        /// The object before the write, if it existed.
        pub prev: Option<Value>,
        /// The object after the write; after a deletion, its last state at the deletion's
        /// resourceVersion.
        pub object: Value,
        pub deleted: bool,
    }

    struct Revision {
        rv: u64,
        object: Value,
        deleted: bool,
    }

    #[derive(Default)]
    struct Collection {
        kind: String,
        objects: BTreeMap<ObjectKey, Vec<Revision>>,
    }

    #[derive(Default)]
    pub struct Store {
        /// The last resourceVersion handed out, across all collections.
        rv: u64,
        /// History up to here is forgotten: reads and watches from older versions expire.
        compacted: u64,
        collections: BTreeMap<Resource, Collection>,
        uids: u64,
    }

    impl Store {
        pub fn resource_version(&self) -> u64 {
            self.rv
        }

        pub fn compacted(&self) -> u64 {
            self.compacted
        }

        pub fn kind(&self, resource: &Resource) -> String {
            let stored = self
                .collections
                .get(resource)
                .map(|c| c.kind.clone())
                .filter(|k| !k.is_empty());
            let known = || KNOWN_KINDS.iter().find(|(plural, _)| *plural == resource.plural);
            stored
                .or_else(|| known().map(|(_, kind)| (*kind).to_string()))
                .unwrap_or_else(|| {
                    // A kind never stored nor known: "widgets" -> "Widget".
                    let singular = resource.plural.strip_suffix('s').unwrap_or(&resource.plural);
                    let mut chars = singular.chars();
                    let first = chars.next().map(|c| c.to_ascii_uppercase().to_string());
                    first.unwrap_or_default() + chars.as_str()
                })
        }

        pub fn live(&self, resource: &Resource, key: &ObjectKey) -> Option<&Value> {
            let revisions = self.collections.get(resource)?.objects.get(key)?;
            revisions
                .last()
                .filter(|revision| !revision.deleted)
                .map(|revision| &revision.object)
        }

        /// The objects that existed at resourceVersion `at`, in key order.
        pub fn snapshot(&self, resource: &Resource, at: u64) -> impl Iterator<Item = (&ObjectKey, &Value)> {
            let collection = self.collections.get(resource).into_iter();
            collection
                .flat_map(|collection| &collection.objects)
                .filter_map(move |(key, revisions)| {
                    let revision = revisions.iter().rev().find(|revision| revision.rv <= at)?;
                    (!revision.deleted).then_some((key, &revision.object))
                })
        }

        /// Every write to `resource` after resourceVersion `after`, oldest first.
        pub fn changes_since(&self, resource: &Resource, after: u64) -> Vec<Change> {
            let collection = self.collections.get(resource).into_iter();
            let mut changes: Vec<Change> = collection
                .flat_map(|collection| collection.objects.values())
                .flat_map(|revisions| {
                    let newer = revisions.iter().enumerate().filter(move |(_, r)| r.rv > after);
                    newer.map(move |(i, revision)| {
                        let prev = i.checked_sub(1).map(|before| &revisions[before]);
                        Change {
                            rv: revision.rv,
                            prev: prev
                                .filter(|before| !before.deleted)
                                .map(|before| before.object.clone()),
                            object: revision.object.clone(),
                            deleted: revision.deleted,
                        }
                    })
                })
                .collect();
            changes.sort_by_key(|change| change.rv);
            changes
        }

        /// Creates or replaces `object`, keeping the metadata the server owns. Returns the
        /// stored object, and the change unless the write was a no-op.
        pub fn put(&mut self, resource: &Resource, mut object: Value) -> (Value, Option<Change>) {
            let key = ObjectKey::of(&object);
            let prev = self.live(resource, &key).cloned();
            if let Some(prev) = &prev {
                for field in ["uid", "creationTimestamp", "resourceVersion"] {
                    object["metadata"][field] = prev["metadata"][field].clone();
                }
                let generation = prev["metadata"]["generation"].as_u64().unwrap_or(1);
                let spec_changed = without_metadata_and_status(prev) != without_metadata_and_status(&object);
                object["metadata"]["generation"] = json!(generation + u64::from(spec_changed));
                if object == *prev {
                    return (object, None);
                }
            } else {
                if text(&object, "/metadata/uid").is_none() {
                    self.uids += 1;
                    object["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.uids));
                }
                if text(&object, "/metadata/creationTimestamp").is_none() {
                    object["metadata"]["creationTimestamp"] = json!(now_rfc3339());
                }
                object["metadata"]["generation"] = json!(1);
            }
            self.rv += 1;
            set_resource_version(&mut object, self.rv);
            let collection = self.collections.entry(resource.clone()).or_default();
            collection.kind = text(&object, "/kind").unwrap_or_default().to_string();
            let revision = Revision {
                rv: self.rv,
                object: object.clone(),
                deleted: false,
            };
            collection.objects.entry(key).or_default().push(revision);
            (
                object.clone(),
                Some(Change {
                    rv: self.rv,
                    prev,
                    object,
                    deleted: false,
                }),
            )
        }

        pub fn remove(&mut self, resource: &Resource, key: &ObjectKey) -> Option<Change> {
            let prev = self.live(resource, key)?.clone();
            self.rv += 1;
            let mut tombstone = prev.clone();
            set_resource_version(&mut tombstone, self.rv);
            let revisions = self.collections.get_mut(resource)?.objects.get_mut(key)?;
            revisions.push(Revision {
                rv: self.rv,
                object: tombstone.clone(),
                deleted: true,
            });
            Some(Change {
                rv: self.rv,
                prev: Some(prev),
                object: tombstone,
                deleted: true,
            })
        }

        /// Advances the resourceVersion by one (a write to some other kind) and forgets every
        /// revision but the newest of each object.
        pub fn compact(&mut self) {
            self.rv += 1;
            self.compacted = self.rv;
            for collection in self.collections.values_mut() {
                collection.objects.retain(|_, revisions| {
                    let newest = revisions.pop().filter(|revision| !revision.deleted);
                    revisions.clear();
                    revisions.extend(newest);
                    !revisions.is_empty()
                });
            }
        }
    }

    pub fn set_resource_version(object: &mut Value, rv: u64) {
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
    }

    fn without_metadata_and_status(object: &Value) -> Value {
        let mut rest = object.clone();
        if let Some(fields) = rest.as_object_mut() {
            fields.retain(|key, _| key != "metadata" && key != "status");
        }
        rest
    }

    fn now_rfc3339() -> String {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let (year, month, day) = civil_from_days(secs / 86_400);
        let (hour, minute, second) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
        format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
    }

    /// The Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
    fn civil_from_days(days: u64) -> (u64, u64, u64) {
        let z = days + 719_468;
        let (era, day_of_era) = (z / 146_097, z % 146_097);
        let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let mp = (5 * day_of_year + 2) / 153;
        let day = day_of_year - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        (year_of_era + era * 400 + u64::from(month <= 2), month, day)
    }
}

/// Field and label selectors, matched as the real server matches them.
mod selector {
    use serde_json::Value;

    use super::text;

    /// Which objects a list or watch sees: its namespace and its selectors.
    #[derive(Debug, Default)]
    pub struct Filter {
        namespace: Option<String>,
        fields: Vec<FieldRequirement>,
        labels: Vec<LabelRequirement>,
    }

    /// `metadata.name` or `metadata.namespace` (the fields every kind supports) `=`/`!=` value.
    #[derive(Debug)]
    struct FieldRequirement {
        pointer: &'static str,
        equal: bool,
        value: String,
    }

    #[derive(Debug)]
    enum LabelRequirement {
        Exists(String),
        Absent(String),
        /// `key=v`, `key==v` and `key in (v1,v2)`.
        In(String, Vec<String>),
        /// `key!=v` and `key notin (v1,v2)`; objects without the label match too.
        NotIn(String, Vec<String>),
    }

    impl Filter {
        /// Errors are the message of the real server's `400 BadRequest`.
        pub fn parse(namespace: Option<&str>, fields: Option<&str>, labels: Option<&str>) -> Result<Self, String> {
            let fields = split_terms(fields.unwrap_or_default()).map(parse_field);
            let labels = split_terms(labels.unwrap_or_default()).map(parse_label);
            Ok(Self {
                namespace: namespace.map(str::to_string),
                fields: fields.collect::<Result<_, _>>()?,
                labels: labels.collect::<Result<_, _>>()?,
            })
        }

        pub fn has_selectors(&self) -> bool {
            !self.fields.is_empty() || !self.labels.is_empty()
        }

        pub fn matches(&self, object: &Value) -> bool {
            let namespace = text(object, "/metadata/namespace").unwrap_or_default();
            if self.namespace.as_deref().is_some_and(|wanted| wanted != namespace) {
                return false;
            }
            let field =
                |req: &FieldRequirement| (text(object, req.pointer).unwrap_or_default() == req.value) == req.equal;
            let labels = object.pointer("/metadata/labels");
            let label = |key: &str| labels.and_then(|labels| labels.get(key)).and_then(Value::as_str);
            let in_set = |key: &str, values: &[String]| label(key).is_some_and(|v| values.iter().any(|want| want == v));
            self.fields.iter().all(field)
                && self.labels.iter().all(|req| match req {
                    LabelRequirement::Exists(key) => label(key).is_some(),
                    LabelRequirement::Absent(key) => label(key).is_none(),
                    LabelRequirement::In(key, values) => in_set(key, values),
                    LabelRequirement::NotIn(key, values) => !in_set(key, values),
                })
        }
    }

    /// Splits on the commas outside `in (...)` sets.
    fn split_terms(selector: &str) -> impl Iterator<Item = &str> {
        let mut depth = 0_i32;
        let ends_term = move |c: char| {
            depth += i32::from(c == '(') - i32::from(c == ')');
            c == ',' && depth == 0
        };
        selector.split(ends_term).map(str::trim).filter(|term| !term.is_empty())
    }

    fn parse_field(term: &str) -> Result<FieldRequirement, String> {
        let (field, equal, value) = if let Some((field, value)) = term.split_once("!=") {
            (field, false, value)
        } else if let Some((field, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (field, true, value)
        } else {
            return Err(format!("invalid selector: '{term}'; can't understand '{term}'"));
        };
        let pointer = match field.trim() {
            "metadata.name" => "/metadata/name",
            "metadata.namespace" => "/metadata/namespace",
            // Secrets' field selector (the real server accepts it for Secrets only).
            "type" => "/type",
            other => return Err(format!("field label not supported: {other}")),
        };
        Ok(FieldRequirement {
            pointer,
            equal,
            value: value.trim().to_string(),
        })
    }

    fn parse_label(term: &str) -> Result<LabelRequirement, String> {
        let invalid = || format!("unable to parse requirement: {term:?}");
        let key = |text: &str| {
            let text = text.trim();
            let valid = !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
            valid.then(|| text.to_string()).ok_or_else(invalid)
        };
        let one = |value: &str| vec![value.trim().to_string()];
        if let Some(absent) = term.strip_prefix('!') {
            return Ok(LabelRequirement::Absent(key(absent)?));
        }
        if let Some((head, set)) = term.split_once('(') {
            let set = set.strip_suffix(')').ok_or_else(invalid)?;
            let values = set.split(',').map(|value| value.trim().to_string()).collect();
            return match head.trim_end().rsplit_once(char::is_whitespace) {
                Some((name, "in")) => Ok(LabelRequirement::In(key(name)?, values)),
                Some((name, "notin")) => Ok(LabelRequirement::NotIn(key(name)?, values)),
                _ => Err(invalid()),
            };
        }
        if let Some((name, value)) = term.split_once("!=") {
            return Ok(LabelRequirement::NotIn(key(name)?, one(value)));
        }
        if let Some((name, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            return Ok(LabelRequirement::In(key(name)?, one(value)));
        }
        Ok(LabelRequirement::Exists(key(term)?))
    }
}
