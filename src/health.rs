//! Proxy health with kube-proxy's `/healthz` and `/livez` semantics, and the two HTTP servers
//! kube-proxy runs: the health server (default port 10256) and the metrics server (10249).
//!
//! Servers come in two forms: `serve_*(addr, ..)` binds and serves, for the program; and
//! `serve_*_on(listener, ..)` serves a listener from [`bind`], so a caller (or a test) can bind
//! port 0 and learn the real port from `listener.local_addr()` before serving. Both stop
//! accepting when the shutdown watch turns `true` (or its sender is dropped), and ask open
//! keep-alive connections to close after their current request.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::metrics::metrics;
use crate::model::IpFamily;

pub type Result<T, E = HealthError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The listen address could not be bound: in use, not a local address, or no permission.
    /// Not retryable without changing the configured address or freeing the port.
    #[error("failed to bind HTTP server on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// After a failed `accept` (typically out of file descriptors), wait before retrying instead of
/// spinning on the same error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub(crate) const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";
/// What Prometheus' Go client sends for text format 0.0.4.
const METRICS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One point in time, on both clocks: the monotonic one decides how long a change has waited
/// (a wall clock stepping backwards or forwards changes nothing), the wall one is what the
/// probe's JSON shows. The monotonic one is tokio's, so tests can pause and advance it.
#[derive(Debug, Clone, Copy)]
struct Moment {
    at: Instant,
    wall: SystemTime,
}

impl Moment {
    fn now() -> Moment {
        Moment {
            at: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

/// Whether the sync loop keeps up with changes, shared (behind `Arc`) between the sync loop,
/// which reports queued and finished syncs, and the health server, which answers probes.
///
/// Upstream's `ProxyHealthServer` (kube-proxy 1.33): healthy unless a change has waited for a
/// sync for `timeout` or longer; kube-proxy uses twice its sync period as that timeout.
/// Upstream records a successful update for every family when its sync loop starts, and its
/// first queued change normally arrives a moment later (this node's Node object). kproxy
/// counts its own start as that first queued change: nothing is programmed yet. So a proxy
/// that never completes its first sync, whether its source never answers (an API server
/// unreachable from the start, an unreadable `--manifests` path) or its first sync keeps
/// failing, goes unhealthy `timeout` after it started, instead of answering 200 forever.
pub struct ProxyHealth {
    timeout: Duration,
    times: Mutex<SyncTimes>,
    /// False once the Node is being deleted or carries `ToBeDeletedByClusterAutoscaler`, so load
    /// balancers drain it; `/livez` ignores it, so the pod is not restarted for it.
    node_eligible: AtomicBool,
}

struct SyncTimes {
    /// The families this node programs: each has the same state, since one sync programs all.
    families: Vec<IpFamily>,
    /// The last successful sync, or the start.
    last_updated: Moment,
    /// When the oldest change not yet programmed was queued; `None` when fully synced.
    oldest_pending: Option<Moment>,
}

/// One probe answer: `healthy` maps to HTTP 200 or 503, `body` is the JSON to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthStatus {
    pub healthy: bool,
    pub body: String,
}

impl HealthStatus {
    fn http_status(&self) -> StatusCode {
        if self.healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
}

/// The JSON body of `/healthz` and `/livez`, field for field as kube-proxy 1.33 writes it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    /// The last successful sync of any family; `currentTime` whenever the answer is 200,
    /// because older releases meant "the sync loop ran recently" by it and clients still read
    /// it that way.
    last_updated: String,
    current_time: String,
    /// `/healthz` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    /// Whether every family keeps up, regardless of the Node's eligibility.
    healthy: bool,
    /// Per family (`IPv4`, `IPv6`): its last successful sync (never replaced by `now`) and
    /// whether it keeps up.
    status: BTreeMap<&'static str, FamilyBody>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FamilyBody {
    last_updated: String,
    healthy: bool,
}

/// `IPv4` or `IPv6`, as Kubernetes' `v1.IPFamily` spells them.
fn family_name(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "IPv4",
        IpFamily::V6 => "IPv6",
    }
}

impl ProxyHealth {
    /// Starting up: healthy for `timeout`, unhealthy after that unless a sync succeeded. The
    /// node programs IPv4 until [`Self::set_families`] says otherwise.
    pub fn new(timeout: Duration) -> Self {
        let start = Moment::now();
        Self {
            timeout,
            times: Mutex::new(SyncTimes {
                families: vec![IpFamily::V4],
                last_updated: start,
                oldest_pending: Some(start),
            }),
            node_eligible: AtomicBool::new(true),
        }
    }

    /// The families this node programs, reported one by one in the probes' `status`.
    pub fn set_families(&self, families: &[IpFamily]) {
        let mut families = families.to_vec();
        families.sort();
        families.dedup();
        self.lock().families = families;
    }

    /// A Service, EndpointSlice or Node change arrived and waits for a sync. Only the first
    /// change since the last sync counts: the deadline runs from the oldest one, so a steady
    /// stream of changes cannot keep pushing it back.
    pub fn queued_update(&self) {
        let now = Moment::now();
        self.lock().oldest_pending.get_or_insert(now);
    }

    /// A sync succeeded: everything queued so far is programmed.
    pub fn updated(&self) {
        let now = Moment::now();
        let mut times = self.lock();
        times.oldest_pending = None;
        times.last_updated = now;
    }

    /// Records whether this Node should receive load-balancer traffic: false when the Node has a
    /// deletion timestamp or the `ToBeDeletedByClusterAutoscaler` taint.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.node_eligible.store(eligible, Ordering::Relaxed);
    }

    /// Whether the sync loop keeps up, ignoring the Node's eligibility (upstream's
    /// `Health().Healthy`).
    pub fn proxy_healthy(&self) -> bool {
        self.sync_health(Instant::now()).0
    }

    /// The `/healthz` answer, with `now` as the time reported: the sync loop is keeping up and
    /// the Node is eligible.
    pub fn status(&self, now: SystemTime) -> HealthStatus {
        let node_eligible = self.node_eligible.load(Ordering::Relaxed);
        self.answer(
            Moment {
                at: Instant::now(),
                wall: now,
            },
            Some(node_eligible),
        )
    }

    /// The `/livez` answer, with `now` as the time reported: the sync loop is keeping up; Node
    /// eligibility is ignored, because restarting the proxy would not make a Node that is
    /// going away eligible again.
    pub fn live_status(&self, now: SystemTime) -> HealthStatus {
        self.answer(
            Moment {
                at: Instant::now(),
                wall: now,
            },
            None,
        )
    }

    fn answer(&self, now: Moment, node_eligible: Option<bool>) -> HealthStatus {
        let (healthy, last_updated, families) = self.sync_health(now.at);
        let code_ok = healthy && node_eligible.unwrap_or(true);
        let family_body = || FamilyBody {
            last_updated: format_rfc3339(last_updated),
            healthy,
        };
        let body = Body {
            last_updated: format_rfc3339(if code_ok { now.wall } else { last_updated }),
            current_time: format_rfc3339(now.wall),
            node_eligible,
            healthy,
            status: families.into_iter().map(|f| (family_name(f), family_body())).collect(),
        };
        // Serializing a struct of strings and bools cannot fail.
        let body = serde_json::to_string(&body).unwrap_or_default();
        HealthStatus { healthy: code_ok, body }
    }

    /// Whether the sync loop keeps up at `now`, the last successful sync's wall time, and the
    /// families.
    fn sync_health(&self, now: Instant) -> (bool, SystemTime, Vec<IpFamily>) {
        let times = self.lock();
        let healthy = match times.oldest_pending {
            None => true,
            Some(queued) => now.saturating_duration_since(queued.at) < self.timeout,
        };
        (healthy, times.last_updated.wall, times.families.clone())
    }

    /// The times are plain values replaced in one step, so a panic while the lock was held
    /// cannot leave them inconsistent; keep answering probes instead of propagating the poison.
    fn lock(&self) -> MutexGuard<'_, SyncTimes> {
        self.times.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `t` as RFC 3339 in UTC with as many fractional digits as it has (up to nanoseconds), as Go
/// marshals a `time.Time`, e.g. `2024-02-29T12:34:56.5Z`.
pub fn format_rfc3339(t: SystemTime) -> String {
    match jiff::Timestamp::try_from(t) {
        Ok(ts) => ts.to_string(),
        // Outside jiff's range (years -9999 to 9999): only with a badly set clock.
        Err(_) => "0001-01-01T00:00:00Z".to_owned(),
    }
}

/// Binds `addr` for one of the servers below. Port 0 picks a free port; read it back with
/// `local_addr()`.
///
/// With `SO_REUSEPORT`: a DaemonSet update (`maxSurge: 1`) starts the new kproxy beside the
/// old one on the same host network, and both must hold the health, metrics and health check
/// node ports until the old one exits. A port held by another program (which did not set
/// the option) still fails.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    };
    listen().map_err(|source| HealthError::Bind { addr, source })
}

/// Serves `/healthz` (sync loop keeping up and Node eligible) and `/livez` (sync loop keeping
/// up) as JSON with status 200 or 503, and 404 for any other path, until shutdown.
pub async fn serve_healthz_on(
    listener: TcpListener,
    health: Arc<ProxyHealth>,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    serve("healthz", listener, shutdown, move |path| {
        route_health(&health, path, SystemTime::now())
    })
    .await
}

/// Serves `/metrics` (the global registry, Prometheus text 0.0.4), `/proxyMode` (the mode name
/// as plain text, as kube-proxy does) and `/healthz` (plain `ok`: the process is up, nothing
/// more), and 404 for any other path, until shutdown.
pub async fn serve_metrics_on(
    listener: TcpListener,
    proxy_mode: &'static str,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    serve("metrics", listener, shutdown, move |path| match path {
        "/metrics" => response(StatusCode::OK, METRICS_TEXT, metrics().render()),
        "/proxyMode" => response(StatusCode::OK, TEXT, proxy_mode),
        "/healthz" => response(StatusCode::OK, TEXT, "ok"),
        _ => not_found(),
    })
    .await
}

fn route_health(health: &ProxyHealth, path: &str, now: SystemTime) -> Response<Full<Bytes>> {
    match path {
        "/healthz" => {
            let status = health.status(now);
            let code = status.http_status();
            metrics().inc_healthz(code.as_u16());
            response(code, JSON, status.body)
        }
        "/livez" => {
            let status = health.live_status(now);
            let code = status.http_status();
            metrics().inc_livez(code.as_u16());
            response(code, JSON, status.body)
        }
        _ => not_found(),
    }
}

/// The accept loop shared by both servers; `route` answers from the request path alone, since
/// every endpoint here ignores method, query and body, as upstream's do.
pub(crate) async fn serve<R>(
    server: &'static str,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    route: R,
) -> Result<()>
where
    R: Fn(&str) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let route = Arc::new(route);
    match listener.local_addr() {
        Ok(addr) => info!(server, %addr, "serving HTTP"),
        Err(error) => info!(server, %error, "serving HTTP on an address the OS would not report"),
    }
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown_requested(&mut shutdown) => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(server, %error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let route = Arc::clone(&route);
        let mut conn_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = route(request.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                () = shutdown_requested(&mut conn_shutdown) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(error) = result {
                debug!(server, %peer, %error, "HTTP connection ended with an error");
            }
        });
    }
}

/// Resolves once shutdown is requested. A dropped sender counts as a request too: nobody is
/// left to ask, so serving on would outlive the rest of the program.
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

pub(crate) fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

/// Same body as Go's `http.NotFound`, so probes see what they saw from kube-proxy.
fn not_found() -> Response<Full<Bytes>> {
    response(StatusCode::NOT_FOUND, TEXT, "404 page not found\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const TIMEOUT: Duration = Duration::from_secs(60);

    fn json(body: &str) -> serde_json::Value {
        serde_json::from_str(body).expect("body is JSON")
    }

    fn healthz(health: &ProxyHealth) -> (bool, serde_json::Value) {
        let status = health.status(SystemTime::now());
        (status.healthy, json(&status.body))
    }

    fn livez(health: &ProxyHealth) -> (bool, serde_json::Value) {
        let status = health.live_status(SystemTime::now());
        (status.healthy, json(&status.body))
    }

    /// A body's timestamp, parsed back.
    fn when(v: &serde_json::Value) -> SystemTime {
        let ts: jiff::Timestamp = v.as_str().expect("a timestamp").parse().expect("RFC 3339");
        SystemTime::from(ts)
    }

    /// Runs `f`, returning the wall-clock interval it ran in.
    fn during(f: impl FnOnce()) -> std::ops::RangeInclusive<SystemTime> {
        let before = SystemTime::now();
        f();
        before..=SystemTime::now()
    }

    async fn advance(d: Duration) {
        tokio::time::advance(d).await;
    }

    #[tokio::test(start_paused = true)]
    async fn never_synced_is_healthy_while_starting_then_unhealthy() {
        let mut health = None;
        let started = during(|| health = Some(ProxyHealth::new(TIMEOUT)));
        let health = health.expect("built");
        let (ok, body) = healthz(&health);
        assert!(ok, "healthy while starting up: {body}");
        assert_eq!(body["healthy"], true);
        assert_eq!(body["nodeEligible"], true);
        advance(TIMEOUT - Duration::from_millis(1)).await;
        assert!(healthz(&health).0 && livez(&health).0, "not late yet");

        // First sync still not done a whole timeout after the start: 503 on both, and the
        // body shows the start as the last update (upstream's sync loop records one there).
        advance(Duration::from_millis(1)).await;
        let (ok, body) = healthz(&health);
        assert!(!ok, "{body}");
        assert_eq!(body["healthy"], false);
        assert!(started.contains(&when(&body["lastUpdated"])), "{body}");
        assert_eq!(body["status"]["IPv4"]["healthy"], false);
        assert!(!livez(&health).0);

        // Stays unhealthy however long it takes, until a sync succeeds.
        advance(Duration::from_secs(3600)).await;
        assert!(!healthz(&health).0);
        health.updated();
        assert!(healthz(&health).0 && livez(&health).0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_sync_in_time_means_healthy_for_good() {
        let health = ProxyHealth::new(TIMEOUT);
        advance(Duration::from_secs(5)).await;
        health.updated();
        advance(Duration::from_secs(3600)).await;
        assert!(healthz(&health).0, "nothing queued since the sync");
    }

    #[tokio::test(start_paused = true)]
    async fn pending_change_is_unhealthy_once_it_has_waited_the_timeout() {
        let health = ProxyHealth::new(TIMEOUT);
        let synced = during(|| health.updated());
        advance(Duration::from_secs(100)).await;
        health.queued_update();
        advance(Duration::from_secs(59)).await;
        assert!(healthz(&health).0 && livez(&health).0);
        advance(Duration::from_secs(1)).await;
        let (ok, body) = healthz(&health);
        assert!(!ok);
        assert!(!livez(&health).0);
        // Unhealthy answers show the real last sync, not `now`.
        assert!(synced.contains(&when(&body["lastUpdated"])), "{body}");
        assert!(synced.contains(&when(&body["status"]["IPv4"]["lastUpdated"])), "{body}");
    }

    #[tokio::test(start_paused = true)]
    async fn later_changes_do_not_extend_the_deadline() {
        let health = ProxyHealth::new(TIMEOUT);
        health.updated();
        health.queued_update();
        advance(Duration::from_secs(50)).await;
        health.queued_update();
        advance(Duration::from_secs(10)).await;
        assert!(!healthz(&health).0);
    }

    #[tokio::test(start_paused = true)]
    async fn successful_sync_clears_the_pending_change() {
        let health = ProxyHealth::new(TIMEOUT);
        health.queued_update();
        advance(Duration::from_secs(10)).await;
        health.updated();
        advance(Duration::from_secs(4000)).await;
        assert!(healthz(&health).0);

        // The next change starts a fresh deadline.
        health.queued_update();
        advance(Duration::from_secs(59)).await;
        assert!(healthz(&health).0);
        advance(Duration::from_secs(1)).await;
        assert!(!healthz(&health).0);
    }

    #[tokio::test(start_paused = true)]
    async fn ineligible_node_fails_healthz_but_not_livez() {
        let health = ProxyHealth::new(TIMEOUT);
        let synced = during(|| health.updated());
        health.set_node_eligible(false);
        let (ok, body) = healthz(&health);
        assert!(!ok);
        assert_eq!(body["nodeEligible"], false);
        // `healthy` is the proxy's own health: the Node's state only changes the status code.
        assert_eq!(body["healthy"], true);
        assert!(synced.contains(&when(&body["lastUpdated"])), "{body}");
        assert!(health.proxy_healthy());
        let (live, body) = livez(&health);
        assert!(live);
        assert!(body.get("nodeEligible").is_none(), "{body}");

        health.set_node_eligible(true);
        assert!(healthz(&health).0);
    }

    #[test]
    fn body_fields_match_kube_proxy() {
        let health = ProxyHealth::new(TIMEOUT);
        health.set_families(&[IpFamily::V6, IpFamily::V4]);
        health.updated();
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_709_210_096_500);
        let body = health.status(now).body;
        let synced = json(&body)["status"]["IPv4"]["lastUpdated"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            body,
            format!(
                r#"{{"lastUpdated":"2024-02-29T12:34:56.5Z","currentTime":"2024-02-29T12:34:56.5Z","nodeEligible":true,"healthy":true,"status":{{"IPv4":{{"lastUpdated":"{synced}","healthy":true}},"IPv6":{{"lastUpdated":"{synced}","healthy":true}}}}}}"#
            )
        );
        let live = health.live_status(now).body;
        assert!(live.starts_with(r#"{"lastUpdated":"2024-02-29T12:34:56.5Z","currentTime":"2024-02-29T12:34:56.5Z","healthy":true,"status":{"#), "{live}");
    }

    #[test]
    fn rfc3339_formatting_as_go_marshals_time() {
        let at = |ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        assert_eq!(format_rfc3339(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(at(951_782_400_000)), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(at(1_709_210_096_000)), "2024-02-29T12:34:56Z");
        // Fractional seconds without trailing zeros, up to nanoseconds.
        assert_eq!(format_rfc3339(at(59_120)), "1970-01-01T00:00:59.12Z");
        assert_eq!(
            format_rfc3339(SystemTime::UNIX_EPOCH + Duration::from_nanos(1)),
            "1970-01-01T00:00:00.000000001Z"
        );
    }

    async fn local_listener() -> TcpListener {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        bind(any_port).await.expect("bind 127.0.0.1:0")
    }

    struct Reply {
        status: u16,
        headers: String,
        body: String,
    }

    /// One raw HTTP/1.1 GET, so the test depends on no HTTP client.
    async fn get(addr: SocketAddr, path: &str) -> Reply {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.expect("read");
        let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
        let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        let mut parts = status_line.split(' ');
        assert_eq!(parts.next(), Some("HTTP/1.1"), "status line {status_line}");
        let status = parts.next().and_then(|code| code.parse().ok()).expect("status code");
        Reply {
            status,
            headers: headers.to_ascii_lowercase(),
            body: body.to_owned(),
        }
    }

    #[tokio::test]
    async fn healthz_server_answers_over_tcp_and_stops_on_shutdown() {
        let health = Arc::new(ProxyHealth::new(TIMEOUT));
        let listener = local_listener().await;
        let addr = listener.local_addr().expect("local addr");
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve_healthz_on(listener, Arc::clone(&health), shutdown));

        let reply = get(addr, "/healthz").await;
        assert_eq!(reply.status, 200);
        assert!(reply.headers.contains("content-type: application/json"));
        assert_eq!(json(&reply.body)["nodeEligible"], true);

        let reply = get(addr, "/livez?verbose").await;
        assert_eq!(reply.status, 200);
        assert!(json(&reply.body).get("nodeEligible").is_none());

        assert_eq!(get(addr, "/metrics").await.status, 404);

        health.set_node_eligible(false);
        assert_eq!(get(addr, "/healthz").await.status, 503);
        assert_eq!(get(addr, "/livez").await.status, 200);

        stop.send(true).expect("server still listening");
        server.await.expect("server task").expect("clean shutdown");
    }

    #[tokio::test]
    async fn healthz_server_reports_late_sync_as_503() {
        // A zero timeout makes the start (nothing programmed yet) late at once, without sleeping.
        let health = Arc::new(ProxyHealth::new(Duration::ZERO));
        let listener = local_listener().await;
        let addr = listener.local_addr().expect("local addr");
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve_healthz_on(listener, Arc::clone(&health), shutdown));

        let reply = get(addr, "/healthz").await;
        assert_eq!(reply.status, 503);
        assert_eq!(json(&reply.body)["healthy"], false);
        assert_eq!(get(addr, "/livez").await.status, 503);

        health.updated();
        assert_eq!(get(addr, "/healthz").await.status, 200);

        drop(stop);
        server.await.expect("server task").expect("clean shutdown");
    }

    #[tokio::test]
    async fn metrics_server_answers_metrics_proxy_mode_and_healthz() {
        let listener = local_listener().await;
        let addr = listener.local_addr().expect("local addr");
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve_metrics_on(listener, "iptables", shutdown));

        let reply = get(addr, "/metrics").await;
        assert_eq!(reply.status, 200);
        assert!(reply
            .headers
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"));
        assert!(reply
            .body
            .contains("# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram\n"));

        let reply = get(addr, "/proxyMode").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "iptables"));
        let reply = get(addr, "/healthz").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "ok"));
        assert_eq!(get(addr, "/livez").await.status, 404);

        stop.send(true).expect("server still listening");
        server.await.expect("server task").expect("clean shutdown");
    }

    #[tokio::test]
    async fn shutdown_closes_idle_keep_alive_connections() {
        let listener = local_listener().await;
        let addr = listener.local_addr().expect("local addr");
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve_metrics_on(listener, "nftables", shutdown));

        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /proxyMode HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("write");
        let mut first = Vec::new();
        while !first.ends_with(b"nftables") {
            let mut chunk = [0u8; 512];
            let n = stream.read(&mut chunk).await.expect("read response");
            assert_ne!(n, 0, "closed before the first response");
            first.extend_from_slice(&chunk[..n]);
        }

        stop.send(true).expect("server still listening");
        server.await.expect("server task").expect("clean shutdown");
        // The kept-alive connection is closed by the server instead of lingering.
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.expect("read to close");
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn bind_failure_names_the_address() {
        // Held by a socket without SO_REUSEPORT, as another program's would be.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("local addr");

        let err = bind(addr).await.expect_err("port is taken");
        assert!(matches!(err, HealthError::Bind { addr: a, .. } if a == addr));
        assert!(err.to_string().contains(&addr.to_string()));
    }

    #[tokio::test]
    async fn two_kproxies_share_a_port_during_an_update() {
        let old = local_listener().await;
        let addr = old.local_addr().expect("local addr");
        let new = bind(addr).await.expect("the new kproxy binds beside the old one");
        assert_eq!(new.local_addr().expect("local addr"), addr);
    }
}
