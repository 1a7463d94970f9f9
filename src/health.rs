//! Proxy health with kube-proxy's `/healthz` and `/livez` semantics, and the two HTTP servers
//! kube-proxy runs: the health server (default port 10256) and the metrics server (10249).
//!
//! Servers come in two forms: `serve_*(addr, ..)` binds and serves, for the program; and
//! `serve_*_on(listener, ..)` serves a listener from [`bind`], so a caller (or a test) can bind
//! port 0 and learn the real port from `listener.local_addr()` before serving. Both stop
//! accepting when the shutdown watch turns `true` (or its sender is dropped), and ask open
//! keep-alive connections to close after their current request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::metrics::metrics;

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

/// Go's zero `time.Time`, which upstream reports as `lastUpdated` before the first sync.
const NEVER: &str = "0001-01-01T00:00:00Z";

/// After a failed `accept` (typically out of file descriptors), wait before retrying instead of
/// spinning on the same error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub(crate) const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";
/// What Prometheus' Go client sends for text format 0.0.4.
const METRICS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether the sync loop keeps up with changes, shared (behind `Arc`) between the sync loop,
/// which reports queued and finished syncs, and the health server, which answers probes.
///
/// Same rule as upstream's `proxierHealthServer`: healthy unless a change has waited for a sync
/// for `timeout` or longer. kube-proxy uses twice its `--iptables-sync-period` (or the nftables /
/// IPVS equivalent) as that timeout.
pub struct ProxyHealth {
    timeout: Duration,
    times: Mutex<SyncTimes>,
    /// False once the Node is being deleted or carries `ToBeDeletedByClusterAutoscaler`, so load
    /// balancers drain it; `/livez` ignores it, so the pod is not restarted for it.
    node_eligible: AtomicBool,
}

#[derive(Default)]
struct SyncTimes {
    last_updated: Option<SystemTime>,
    /// When the oldest change not yet programmed was queued; `None` when fully synced.
    oldest_pending: Option<SystemTime>,
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

impl ProxyHealth {
    /// Healthy from the start: the proxy counts as healthy while starting up, until a queued
    /// change goes unsynced for `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            times: Mutex::new(SyncTimes::default()),
            node_eligible: AtomicBool::new(true),
        }
    }

    /// A Service or EndpointSlice change arrived and waits for a sync.
    pub fn queued_update(&self) {
        self.queued_update_at(SystemTime::now());
    }

    /// [`Self::queued_update`] with an explicit clock. Only the first change since the last
    /// sync counts: the deadline runs from the oldest one, so a steady stream of changes cannot
    /// keep pushing it back.
    pub fn queued_update_at(&self, now: SystemTime) {
        let mut times = self.lock();
        if times.oldest_pending.is_none() {
            times.oldest_pending = Some(now);
        }
    }

    /// A sync succeeded: everything queued so far is programmed.
    pub fn updated(&self) {
        self.updated_at(SystemTime::now());
    }

    /// [`Self::updated`] with an explicit clock.
    pub fn updated_at(&self, now: SystemTime) {
        let mut times = self.lock();
        times.oldest_pending = None;
        times.last_updated = Some(now);
    }

    /// Records whether this Node should receive load-balancer traffic: false when the Node has a
    /// deletion timestamp or the `ToBeDeletedByClusterAutoscaler` taint.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.node_eligible.store(eligible, Ordering::Relaxed);
    }

    /// The `/healthz` answer at `now`: the sync loop is keeping up and the Node is eligible.
    pub fn status(&self, now: SystemTime) -> HealthStatus {
        let node_eligible = self.node_eligible.load(Ordering::Relaxed);
        let (synced, last_updated) = self.sync_health(now);
        let healthy = synced && node_eligible;
        let last_updated = reported_last_update(healthy, last_updated, now);
        // Hand-built: every value is a timestamp we formatted or a bool, none needs escaping,
        // and the key order stays as upstream's regardless of serde_json features.
        let body = format!(
            r#"{{"lastUpdated":"{last_updated}","currentTime":"{}","nodeEligible":{node_eligible}}}"#,
            format_rfc3339(now)
        );
        HealthStatus { healthy, body }
    }

    /// The `/livez` answer at `now`: the sync loop is keeping up; Node eligibility is ignored,
    /// because restarting the proxy would not make a Node that is going away eligible again.
    pub fn live_status(&self, now: SystemTime) -> HealthStatus {
        let (healthy, last_updated) = self.sync_health(now);
        let last_updated = reported_last_update(healthy, last_updated, now);
        let body = format!(
            r#"{{"lastUpdated":"{last_updated}","currentTime":"{}"}}"#,
            format_rfc3339(now)
        );
        HealthStatus { healthy, body }
    }

    fn sync_health(&self, now: SystemTime) -> (bool, Option<SystemTime>) {
        let times = self.lock();
        let healthy = match times.oldest_pending {
            None => true,
            // A wall clock stepped backwards makes `now` earlier than the queue time; count
            // that as no time waited rather than failing the probe.
            Some(queued) => now.duration_since(queued).unwrap_or_default() < self.timeout,
        };
        (healthy, times.last_updated)
    }

    /// The times are plain values replaced in one step, so a panic while the lock was held
    /// cannot leave them inconsistent; keep answering probes instead of propagating the poison.
    fn lock(&self) -> MutexGuard<'_, SyncTimes> {
        self.times.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Upstream reports `lastUpdated = now` whenever healthy, because older releases meant "the sync
/// loop ran recently" by it and clients still read it that way; only an unhealthy answer shows
/// the real time of the last successful sync.
fn reported_last_update(healthy: bool, last_updated: Option<SystemTime>, now: SystemTime) -> String {
    match (healthy, last_updated) {
        (true, _) => format_rfc3339(now),
        (false, Some(at)) => format_rfc3339(at),
        (false, None) => NEVER.to_owned(),
    }
}

/// `t` as RFC 3339 in UTC with whole seconds, e.g. `2024-02-29T12:34:56Z`. Times before 1970
/// print as the epoch: they only occur with a badly set clock and carry no meaning here.
pub fn format_rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (year, month, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`,
/// restricted to non-negative days). Works in 400-year eras of 146097 days, with years starting
/// on March 1st so the leap day is the last day of the year.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

/// Binds `addr` for one of the servers below. Port 0 picks a free port; read it back with
/// `local_addr()`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| HealthError::Bind { addr, source })
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

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn json(body: &str) -> serde_json::Value {
        serde_json::from_str(body).expect("body is JSON")
    }

    #[test]
    fn healthy_while_starting_up() {
        let health = ProxyHealth::new(TIMEOUT);
        let status = health.status(at(1_000));
        assert!(status.healthy);
        assert_eq!(
            json(&status.body),
            serde_json::json!({
                "lastUpdated": "1970-01-01T00:16:40Z",
                "currentTime": "1970-01-01T00:16:40Z",
                "nodeEligible": true,
            })
        );
    }

    #[test]
    fn pending_change_is_unhealthy_once_it_has_waited_the_timeout() {
        let health = ProxyHealth::new(TIMEOUT);
        health.updated_at(at(900));
        health.queued_update_at(at(1_000));
        assert!(health.status(at(1_059)).healthy);
        assert!(health.live_status(at(1_059)).healthy);

        let status = health.status(at(1_060));
        assert!(!status.healthy);
        assert!(!health.live_status(at(1_060)).healthy);
        // Unhealthy answers show the real last sync, not `now`.
        assert_eq!(json(&status.body)["lastUpdated"], "1970-01-01T00:15:00Z");
        assert_eq!(json(&status.body)["currentTime"], "1970-01-01T00:17:40Z");
    }

    #[test]
    fn later_changes_do_not_extend_the_deadline() {
        let health = ProxyHealth::new(TIMEOUT);
        health.queued_update_at(at(1_000));
        health.queued_update_at(at(1_050));
        assert!(!health.status(at(1_060)).healthy);
    }

    #[test]
    fn successful_sync_clears_the_pending_change() {
        let health = ProxyHealth::new(TIMEOUT);
        health.queued_update_at(at(1_000));
        health.updated_at(at(1_010));
        assert!(health.status(at(5_000)).healthy);

        // The next change starts a fresh deadline.
        health.queued_update_at(at(5_000));
        assert!(health.status(at(5_059)).healthy);
        assert!(!health.status(at(5_060)).healthy);
    }

    #[test]
    fn never_synced_and_late_reports_go_zero_time() {
        let health = ProxyHealth::new(TIMEOUT);
        health.queued_update_at(at(1_000));
        let status = health.live_status(at(2_000));
        assert!(!status.healthy);
        assert_eq!(
            json(&status.body),
            serde_json::json!({
                "lastUpdated": "0001-01-01T00:00:00Z",
                "currentTime": "1970-01-01T00:33:20Z",
            })
        );
    }

    #[test]
    fn clock_stepping_backwards_does_not_fail_the_probe() {
        let health = ProxyHealth::new(TIMEOUT);
        health.queued_update_at(at(1_000));
        assert!(health.status(at(10)).healthy);
    }

    #[test]
    fn ineligible_node_fails_healthz_but_not_livez() {
        let health = ProxyHealth::new(TIMEOUT);
        health.updated_at(at(500));
        health.set_node_eligible(false);
        let status = health.status(at(1_000));
        assert!(!status.healthy);
        assert_eq!(json(&status.body)["nodeEligible"], false);
        assert_eq!(json(&status.body)["lastUpdated"], "1970-01-01T00:08:20Z");
        assert!(health.live_status(at(1_000)).healthy);

        health.set_node_eligible(true);
        assert!(health.status(at(1_000)).healthy);
    }

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(format_rfc3339(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(at(1_700_000_000)), "2023-11-14T22:13:20Z");
        assert_eq!(format_rfc3339(at(1_709_210_096)), "2024-02-29T12:34:56Z");
        assert_eq!(format_rfc3339(at(4_102_444_799)), "2099-12-31T23:59:59Z");
        // Sub-second parts are dropped, not rounded.
        assert_eq!(
            format_rfc3339(at(59) + Duration::from_millis(999)),
            "1970-01-01T00:00:59Z"
        );
        assert_eq!(
            format_rfc3339(UNIX_EPOCH - Duration::from_secs(1)),
            "1970-01-01T00:00:00Z"
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
        // A zero timeout makes any pending change late at once, without sleeping.
        let health = Arc::new(ProxyHealth::new(Duration::ZERO));
        health.queued_update();
        let listener = local_listener().await;
        let addr = listener.local_addr().expect("local addr");
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve_healthz_on(listener, Arc::clone(&health), shutdown));

        let reply = get(addr, "/healthz").await;
        assert_eq!(reply.status, 503);
        assert_eq!(json(&reply.body)["lastUpdated"], NEVER);
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
        let taken = local_listener().await;
        let addr = taken.local_addr().expect("local addr");

        let err = bind(addr).await.expect_err("port is taken");
        assert!(matches!(err, HealthError::Bind { addr: a, .. } if a == addr));
        assert!(err.to_string().contains(&addr.to_string()));
    }
}
