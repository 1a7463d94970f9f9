//! Keeps the route table and the certificates current, and runs the listeners and worker
//! threads: the I/O side around the pure [`super::routes`].

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::rc::Rc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::gateway::build::GatewayConfig;
use super::gateway::listen::{GatewayListeners, Published};
use super::h1::{self, ClientIo, Worker};
use super::proxy::{self, Conn, Proxy};
use super::routes::{build_table, ClassConfig, RouteTable, ServiceLookup};
use super::tls::{self, CertResolver};
use super::upstream::{client_tls_config, Clients, Pool};
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

/// Backlog of each worker's listening socket (nginx's and ingress-nginx's `backlog=4096`).
const BACKLOG: u32 = 4096;
/// How often idle backend connections are checked for their idle timeout.
const POOL_PURGE_INTERVAL: Duration = Duration::from_secs(5);

mod sockopt {
    // The macro's expansion names `libc` at the call site.
    use nix::libc;

    /// Linux's `TCP_DEFER_ACCEPT` (an `int`, seconds), which neither nix nor socket2 names.
    #[derive(Clone, Copy, Debug)]
    pub struct TcpDeferAccept;
    nix::setsockopt_impl!(
        TcpDeferAccept,
        libc::IPPROTO_TCP,
        libc::TCP_DEFER_ACCEPT,
        i32,
        nix::sys::socket::sockopt::SetStruct<i32>
    );
}
use sockopt::TcpDeferAccept;

/// How long the kernel holds a connection whose client sent nothing yet before it hands it
/// to accept anyway (one SYN-ACK retransmission; HTTP and TLS clients speak first).
const DEFER_ACCEPT_SECONDS: i32 = 1;

/// One worker's socket for a listener: bound at start with SO_REUSEPORT, so that a taken port
/// is an error at once, and listening only once the routes exist (see [`serve_listener`]).
///
/// `TCP_DEFER_ACCEPT`: a connection becomes acceptable when its first bytes arrive, not at the
/// handshake's last ACK. The first read of a new connection then finds the request (without it
/// a third of them found nothing and cost an `EAGAIN` read, the `epoll_ctl`s that register and
/// remove the socket and another wake-up: BENCHMARKS.md), and a client that connects and says
/// nothing costs the proxy nothing for that second. (nginx: `listen ... deferred`.)
fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpSocket, IngressError> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    };
    let bound = socket.and_then(|s| {
        s.set_reuseaddr(true)?;
        s.set_reuseport(true)?;
        s.set_nodelay(true)?;
        nix::sys::socket::setsockopt(&s, TcpDeferAccept, &DEFER_ACCEPT_SECONDS)?;
        s.bind(addr)?;
        Ok(s)
    });
    bound.map_err(|source| IngressError::Bind { what, addr, source })
}

/// Lets the kernel hand connections still queued on a closing SO_REUSEPORT listener to
/// another listener of the same port (Linux 5.14+), so that a kproxy taking over from one
/// that stops loses none. Affects only SO_REUSEPORT groups, per network namespace.
fn enable_listener_migration() {
    const PATH: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    match std::fs::read_to_string(PATH) {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => match std::fs::write(PATH, "1") {
            Ok(()) => tracing::info!("set net.ipv4.tcp_migrate_req=1: queued connections move to the next kproxy on shutdown"),
            Err(e) => tracing::warn!(error = %e, "cannot set net.ipv4.tcp_migrate_req; a restart may reset connections still queued on the old listeners"),
        },
        Err(_) => tracing::info!("this kernel cannot migrate queued connections between listeners (net.ipv4.tcp_migrate_req); the old listeners' queues are drained before they close"),
    }
}

/// How many proxy threads serve the listeners: one per CPU this process may use.
fn worker_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 64)
}

/// A worker's listener sockets: (socket, TLS for HTTPS).
type WorkerSockets = Vec<(TcpSocket, Option<TlsAcceptor>)>;

/// One proxy thread: a single-threaded runtime with a listening socket of its own per
/// listener (SO_REUSEPORT: the kernel spreads connections over the workers, and accept never
/// crosses threads), its own buffers and backend connection pools. A request's client
/// connection and its backend connection live on the same thread, as in nginx's workers.
fn spawn_worker(
    index: usize,
    sockets: WorkerSockets,
    gateway_listeners: Published,
    proxy: Proxy,
    backend_tls: rustls::ClientConfig,
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
            let local = tokio::task::LocalSet::new();
            let worker = Rc::new(Worker::new(Arc::new(proxy), Pool::new(backend_tls), shutdown.clone()));
            local.block_on(
                &runtime,
                run_worker(index, worker, sockets, gateway_listeners, shutdown),
            );
        })
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Waits for the routes, listens, serves until shutdown, then drains: the listeners close at
/// once (their queues served first), requests in flight get [`proxy::DRAIN_TIMEOUT`].
async fn run_worker(
    index: usize,
    w: Rc<Worker>,
    sockets: WorkerSockets,
    gateway_listeners: Published,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut routes = w.proxy.routes().clone();
    tokio::select! {
        r = routes.wait_for(Option::is_some) => if r.is_err() { return },
        _ = stopped(&mut shutdown) => return,
    }
    let mut accepting = Vec::new();
    for (socket, tls) in sockets {
        match socket.listen(BACKLOG).and_then(|l| l.into_std()).and_then(listener_of) {
            Ok(listener) => {
                if index == 0 {
                    tracing::info!(address = ?listener.get_ref().local_addr().ok(), https = tls.is_some(), "Ingress listener serving");
                }
                accepting.push(tokio::task::spawn_local(serve_listener(
                    w.clone(),
                    listener,
                    tls,
                    w.proxy_shutdown(),
                )));
            }
            Err(e) => tracing::error!(worker = index, error = %e, "Ingress listener cannot listen"),
        }
    }
    accepting.push(tokio::task::spawn_local(serve_gateway_listeners(
        w.clone(),
        gateway_listeners,
    )));
    let purge = {
        let w = w.clone();
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(POOL_PURGE_INTERVAL).await;
                w.pool.purge();
            }
        })
    };
    stopped(&mut shutdown).await;
    w.start_draining();
    for a in accepting {
        let _ = a.await;
    }
    let drained = tokio::time::timeout(proxy::DRAIN_TIMEOUT, async {
        while w.open.get() > 0 {
            w.closed.notified().await;
        }
    })
    .await;
    if drained.is_err() && index == 0 {
        tracing::warn!("Ingress connections still open after the drain timeout; closing them");
    }
    purge.abort();
    let requests = w.pool.requests.get();
    if requests > 0 {
        tracing::debug!(
            worker = index,
            requests,
            opened = w.pool.opened.get(),
            "backend connection reuse {:.1}%",
            100.0 * (1.0 - w.pool.opened.get() as f64 / requests as f64)
        );
    }
}

/// Serves every published Gateway listener (ports the Ingress listeners do not serve) until
/// it closes or shutdown.
async fn serve_gateway_listeners(w: Rc<Worker>, mut published: Published) {
    let mut running: BTreeSet<u64> = BTreeSet::new();
    let mut servers = Vec::new();
    let mut shutdown = w.proxy_shutdown();
    loop {
        let current = published.borrow_and_update().clone();
        for b in current.iter() {
            if !running.insert(b.id) {
                continue;
            }
            let listener = match b.socket.try_clone().and_then(listener_of) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "Gateway listener not usable");
                    continue;
                }
            };
            // Stops when the listener closes or kproxy shuts down.
            let (tx, rx) = watch::channel(false);
            let (mut stop, mut down) = (b.stop.clone(), w.proxy_shutdown());
            tokio::task::spawn_local(async move {
                tokio::select! {
                    _ = stopped(&mut stop) => {}
                    _ = stopped(&mut down) => {}
                }
                let _ = tx.send(true);
            });
            servers.push(tokio::task::spawn_local(serve_listener(
                w.clone(),
                listener,
                b.tls.clone(),
                rx,
            )));
        }
        running.retain(|id| current.iter().any(|b| b.id == *id));
        tokio::select! {
            r = published.changed() => if r.is_err() { break },
            _ = stopped(&mut shutdown) => break,
        }
    }
    for s in servers {
        let _ = s.await;
    }
}

/// A listening socket the worker waits on. Not tokio's `TcpListener`: that registers every
/// accepted socket with the runtime at once, and a connection served without waiting never
/// needs to be (see [`ClientIo::Fresh`]).
type Listener = AsyncFd<mio::net::TcpListener>;

fn listener_of(socket: std::net::TcpListener) -> std::io::Result<Listener> {
    socket.set_nonblocking(true)?;
    // Deprecated because a type that does not own its descriptor could register one that is
    // closed while registered; a mio listener owns it, and closes it only when dropped, after
    // the AsyncFd deregistered it. (The replacement is `unsafe`, which this crate forbids.)
    #[allow(deprecated)]
    AsyncFd::with_interest(mio::net::TcpListener::from_std(socket), Interest::READABLE)
}

/// The next connection: accept4 with SOCK_NONBLOCK (mio), not registered with the runtime.
async fn accept(listener: &Listener) -> std::io::Result<(std::net::TcpStream, SocketAddr)> {
    loop {
        let mut ready = listener.readable().await?;
        if let Ok(accepted) = ready.try_io(|l| l.get_ref().accept()) {
            return accepted.map(|(stream, peer)| (stream.into(), peer));
        }
    }
}

/// Accepts until `stop`; then serves what the kernel had already accepted, and closes.
async fn serve_listener(
    w: Rc<Worker>,
    listener: Listener,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let port = listener.get_ref().local_addr().map_or(0, |a| a.port());
    // One wait for the stop for the listener's whole life: a new one per accepted connection
    // registered on (and removed from) the shutdown channel, whose lock all workers share.
    let stop = stopped(&mut shutdown);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            r = accept(&listener) => match r {
                Ok((stream, peer)) => start_connection(&w, stream, peer, port, tls.clone()),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut stop => break,
        }
    }
    // Connections in the accept queue completed their handshake with this process: serve them.
    let listener = listener.into_inner();
    while let Ok((stream, peer)) = listener.accept() {
        start_connection(&w, stream.into(), peer, port, tls.clone());
    }
}

/// Connection tasks a worker keeps waiting for a new connection; more finish and end.
const WAITING_TASKS: usize = 64;

/// An accepted connection and the listener it came from; counted as open from its accept.
struct Accepted {
    open: OpenConnection,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    port: u16,
    tls: Option<TlsAcceptor>,
}

/// A connection task waiting, in [`Worker::waiting_tasks`], for its next connection.
#[derive(Default)]
pub struct TaskSlot {
    next: std::cell::Cell<Option<Accepted>>,
    ready: tokio::sync::Notify,
}

impl TaskSlot {
    /// Wakes the task without a connection: it ends.
    pub fn wake_empty(&self) {
        self.ready.notify_one();
    }
}

/// Serves one accepted (non-blocking) connection on this worker: on a connection task that
/// finished its last connection if one waits, else on a new task.
/// TCP_NODELAY comes from the listening socket (Linux copies it to accepted ones).
fn start_connection(
    w: &Rc<Worker>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
    port: u16,
    tls: Option<TlsAcceptor>,
) {
    let accepted = Accepted {
        open: OpenConnection::new(w.clone()),
        stream,
        peer,
        port,
        tls,
    };
    let waiting = w.waiting_tasks.borrow_mut().pop();
    if let Some(slot) = waiting {
        slot.next.set(Some(accepted));
        slot.ready.notify_one();
        return;
    }
    let w = w.clone();
    // Boxed: the task moves its future several times (spawning it, and each change of its
    // stage copies the whole stage); a pointer instead of the connection's whole state saves
    // about 1,500 instructions per connection. The task then serves connection after
    // connection: a task and its box per connection were three allocations (the task, the
    // boxed future, 3.6 KiB with the request's state) and frees, and with mimalloc's purge
    // delay 0 (src/main.rs) the pages they emptied went back to the kernel and faulted in
    // again (0.45 page faults per new connection; BENCHMARKS.md).
    tokio::task::spawn_local(Box::pin(async move {
        let slot = Rc::new(TaskSlot::default());
        let mut next = Some(accepted);
        while let Some(a) = next.take() {
            serve_connection(&w, a).await;
            if w.draining() || w.waiting_tasks.borrow().len() >= WAITING_TASKS {
                break;
            }
            w.waiting_tasks.borrow_mut().push(slot.clone());
            slot.ready.notified().await;
            next = slot.next.take();
        }
    }));
}

/// Serves one connection to its end.
async fn serve_connection(w: &Rc<Worker>, a: Accepted) {
    let Accepted {
        open: _open,
        stream,
        peer,
        port,
        tls,
    } = a;
    let conn = Conn::new(peer, tls.is_some(), port);
    let io = match tls {
        None => ClientIo::Fresh(Some(stream)),
        Some(acceptor) => {
            // The handshake waits on the socket: registered now.
            let Ok(stream) = TcpStream::from_std(stream) else {
                return;
            };
            // Boxed: the handshake's state is large and short-lived.
            let handshake = Box::pin(tokio::time::timeout(
                proxy::TLS_HANDSHAKE_TIMEOUT,
                acceptor.accept(stream),
            ));
            let Ok(Ok(tls_stream)) = handshake.await else {
                return;
            };
            if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                Box::pin(h1::serve_h2(
                    w.clone(),
                    h1::Prefixed::new(ClientIo::Tls(Box::new(tls_stream)), Vec::new()),
                    conn,
                ))
                .await;
                return;
            }
            ClientIo::Tls(Box::new(tls_stream))
        }
    };
    if let h1::Served::H2(io, read) = h1::serve(w.clone(), io, conn).await {
        Box::pin(h1::serve_h2(w.clone(), h1::Prefixed::new(io, read), conn)).await;
    }
}

/// Counts a connection as open on its worker until dropped.
struct OpenConnection(Rc<Worker>);

impl OpenConnection {
    fn new(w: Rc<Worker>) -> Self {
        w.open.set(w.open.get() + 1);
        OpenConnection(w)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let w = &self.0;
        w.open.set(w.open.get().saturating_sub(1));
        if w.open.get() == 0 {
            w.closed.notify_waiters();
        }
    }
}

/// A started Ingress proxy.
pub struct Started {
    /// Finish once shutdown has drained the connections.
    pub handles: Vec<tokio::task::JoinHandle<()>>,
    /// The current route table (for the status writer).
    pub routes: watch::Receiver<Option<Arc<RouteTable>>>,
}

/// Binds the listeners (so a taken port fails at start) and starts the route keeper and the
/// workers.
pub async fn start(
    config: &IngressConfig,
    state: Arc<SharedState>,
    shutdown: watch::Receiver<bool>,
) -> Result<Started, IngressError> {
    let workers = worker_count();
    let mut sockets: Vec<WorkerSockets> = (0..workers).map(|_| Vec::new()).collect();
    let resolver = Arc::new(CertResolver::new(tls::default_certificate()?));
    let acceptor = TlsAcceptor::from(tls::server_config(resolver.clone())?);
    for (what, addr, tls) in [
        ("HTTP", config.http_bind, None),
        ("HTTPS", config.https_bind, Some(acceptor)),
    ] {
        let Some(addr) = addr else { continue };
        for s in sockets.iter_mut() {
            s.push((bind(what, addr)?, tls.clone()));
        }
    }
    if config.http_bind.is_some() || config.https_bind.is_some() {
        enable_listener_migration();
    }
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
    for (index, sockets) in sockets.into_iter().enumerate() {
        let proxy = Proxy::new(
            routes_rx.clone(),
            Clients::new(client_tls_config()?),
            config.access_log,
            https_port,
        );
        let thread = spawn_worker(
            index,
            sockets,
            published.clone(),
            proxy,
            client_tls_config()?,
            shutdown.clone(),
        )
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

    #[tokio::test]
    async fn a_connection_is_accepted_with_its_first_bytes_and_a_silent_one_after_the_deferral() {
        let socket = bind("HTTP", "127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(16).unwrap().into_std().unwrap();
        listener.set_nonblocking(false).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = std::sync::Arc::new(listener);

        // Accepted only once its request came: the first read finds it without waiting.
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        std::io::Write::write_all(&mut client, b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let l = listener.clone();
        let (accepted, _) = tokio::task::spawn_blocking(move || l.accept()).await.unwrap().unwrap();
        accepted.set_nonblocking(true).unwrap();
        let mut got = [0u8; 64];
        let n = std::io::Read::read(&mut &accepted, &mut got).expect("the request is there at accept");
        assert_eq!(&got[..n], b"GET / HTTP/1.1\r\n\r\n");

        // A client that connects and says nothing is not lost: it is accepted after the deferral.
        let _silent = std::net::TcpStream::connect(addr).unwrap();
        let l = listener.clone();
        let accepted = tokio::task::spawn_blocking(move || l.accept()).await.unwrap();
        assert!(accepted.is_ok(), "{accepted:?}");
    }

    /// One request with `Connection: close` on a new connection through `start_connection`;
    /// the answer the client read.
    async fn one_request(w: &Rc<Worker>, listener: &std::net::TcpListener) -> String {
        let addr = listener.local_addr().unwrap();
        let client = tokio::task::spawn_blocking(move || {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            std::io::Write::write_all(&mut c, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").unwrap();
            let mut answer = String::new();
            std::io::Read::read_to_string(&mut c, &mut answer).unwrap();
            answer
        });
        let (stream, peer) = loop {
            match listener.accept() {
                Ok(a) => break a,
                Err(_) => tokio::task::yield_now().await,
            }
        };
        stream.set_nonblocking(true).unwrap();
        start_connection(w, stream, peer, addr.port(), None);
        client.await.unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_finished_connection_task_serves_the_next_connection_and_ends_on_drain() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                // No route table yet: every request is answered 503 by the worker itself.
                let (_routes_tx, routes) = watch::channel(None);
                let (_stop, shutdown) = watch::channel(false);
                let tls = client_tls_config().unwrap();
                let proxy = Proxy::new(routes, Clients::new(tls.clone()), false, 443);
                let w = Rc::new(Worker::new(Arc::new(proxy), Pool::new(tls), shutdown));
                let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                listener.set_nonblocking(true).unwrap();

                let first = one_request(&w, &listener).await;
                assert!(first.starts_with("HTTP/1.1 503"), "{first}");
                while w.waiting_tasks.borrow().is_empty() {
                    tokio::task::yield_now().await;
                }
                assert_eq!(w.open.get(), 0);

                // The waiting task takes the next connection; afterwards it waits again, and no
                // second task was started.
                let second = one_request(&w, &listener).await;
                assert!(second.starts_with("HTTP/1.1 503"), "{second}");
                while w.open.get() > 0 || w.waiting_tasks.borrow().is_empty() {
                    tokio::task::yield_now().await;
                }
                assert_eq!(w.waiting_tasks.borrow().len(), 1);

                w.start_draining();
                assert!(w.waiting_tasks.borrow().is_empty(), "draining ends the waiting tasks");
            })
            .await;
    }
}
