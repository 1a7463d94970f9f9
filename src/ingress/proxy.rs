//! The L7 proxy: HTTP and HTTPS listeners (HTTP/1.1 and HTTP/2), each request routed by the
//! current [`RouteTable`] and streamed to a pod (never through the ClusterIP), with the headers
//! real backends expect, WebSocket passthrough, timeouts, one retry after a failed connect, and
//! a graceful drain on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::balance::{affinity_value, Balancer};
use super::framing::{self, FramingWatch};
use super::gateway::proxy::{decide, Decision};
use super::routes::{normalize_host, Route, RouteTable, Upstream};
use super::upstream::{
    BoxError, Clients, IdleTimeoutBody, ProxyBody, RetryBody, DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT,
    DEFAULT_SEND_TIMEOUT,
};
use crate::metrics::metrics;

/// Longest wait for a client's request head (slow clients are disconnected).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head; past it HTTP/1 answers 431.
const MAX_HEADER_BYTES: usize = 32 * 1024;
/// How long in-flight requests may finish after shutdown began.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Headers that describe one connection, not the message (RFC 9110 section 7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The current route table; `None` until every source has listed once.
pub type Routes = watch::Receiver<Option<Arc<RouteTable>>>;

pub struct Proxy {
    routes: Routes,
    balancer: Balancer,
    clients: Clients,
    access_log: bool,
    /// The HTTPS listener's port, for redirects (omitted from the URL when 443).
    https_port: u16,
}

/// The client side of one connection.
#[derive(Debug, Clone, Copy)]
struct Conn {
    peer: SocketAddr,
    https: bool,
    /// The listener's port (`X-Forwarded-Port`).
    port: u16,
}

/// Which route served a request, for metrics and the access log.
#[derive(Debug, Default)]
struct Served {
    ingress: String,
    service: String,
    upstream: Option<String>,
}

fn full(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{text}\n")))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn status(code: StatusCode) -> Response<ProxyBody> {
    full(code, code.canonical_reason().unwrap_or(""))
}

/// A 400 that also closes the connection: after a framing error nothing more can be trusted.
fn bad_request(why: &str) -> Response<ProxyBody> {
    let mut r = full(StatusCode::BAD_REQUEST, why);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn error_chain_has<E: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<E>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Removes hop-by-hop headers, including those the Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl Proxy {
    pub fn new(routes: Routes, clients: Clients, access_log: bool, https_port: u16) -> Self {
        Proxy {
            routes,
            balancer: Balancer::default(),
            clients,
            access_log,
            https_port,
        }
    }

    /// Serves one request; `conflicting_framing` when its head carried both Content-Length and
    /// Transfer-Encoding (see [`super::framing`]).
    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Conn,
        conflicting_framing: bool,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let method = req.method().clone();
        let uri = req.uri().clone();
        let version = req.version();
        let mut served = Served::default();
        let resp = if conflicting_framing {
            // Both framings at once is how requests are smuggled past proxies: refuse, and close.
            bad_request("both Content-Length and Transfer-Encoding")
        } else {
            self.serve(req, conn, &mut served).await
        };
        let code = resp.status().as_u16();
        let m = metrics();
        m.inc_ingress_request(&served.ingress, &served.service, code);
        m.observe_ingress_duration(started.elapsed());
        if self.access_log {
            tracing::info!(
                target: "kproxy::access",
                client = %conn.peer.ip(),
                method = %method,
                uri = %uri,
                version = ?version,
                status = code,
                ingress = %served.ingress,
                service = %served.service,
                upstream = served.upstream.as_deref().unwrap_or("-"),
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                "request"
            );
        }
        resp
    }

    async fn serve(&self, req: Request<Incoming>, conn: Conn, served: &mut Served) -> Response<ProxyBody> {
        let headers = req.headers();
        let host = match req.uri().authority() {
            Some(a) => a.as_str().to_string(),
            None => match headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
                Some(h) if !h.is_empty() => h.to_string(),
                _ => return bad_request("no Host"),
            },
        };
        let Some(table) = self.routes.borrow().clone() else {
            return status(StatusCode::SERVICE_UNAVAILABLE);
        };
        // Gateway API listeners first (their own ports, and the hosts they match best on an
        // Ingress port): see super::gateway::proxy.
        match decide(&table, conn.port, conn.https, &host, &req) {
            Decision::Ingress => {}
            Decision::Respond(r) => return r,
            Decision::Forward(f) => {
                let mut req = req;
                let upstream_host = f.prepare(&mut req, &host, &self.clients);
                served.ingress = f.route().ingress.clone();
                served.service = f.route().backend.service.to_string();
                let resp = f
                    .within(self.forward(req, conn, &upstream_host, f.route(), served))
                    .await;
                return f.finish(resp);
            }
        }
        let path = req.uri().path().to_string();
        let Some(main) = table.route(&host, &path) else {
            if !conn.https && table.host_has_tls(&host) {
                return self.redirect(&req, &host);
            }
            return full(StatusCode::NOT_FOUND, "404 page not found");
        };
        let route: &Route = match &main.canary {
            Some(c) => {
                let header = c
                    .canary
                    .header
                    .as_ref()
                    .and_then(|h| headers.get(h.as_str()))
                    .and_then(|v| v.to_str().ok());
                if self.balancer.use_canary(&c.canary, header) {
                    &c.route
                } else {
                    main
                }
            }
            None => main,
        };
        served.ingress = route.ingress.clone();
        served.service = route.backend.service.to_string();
        let settings = &route.settings;
        if !conn.https && ((route.host_tls && settings.ssl_redirect) || settings.force_ssl_redirect) {
            return self.redirect(&req, &host);
        }
        if let Some(limit) = settings.body_limit {
            let declared = headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > limit) {
                return status(StatusCode::PAYLOAD_TOO_LARGE);
            }
        }
        self.forward(req, conn, &host, route, served).await
    }

    /// 308 to the same URL over HTTPS (the port is omitted when the HTTPS listener is on 443).
    fn redirect(&self, req: &Request<Incoming>, host: &str) -> Response<ProxyBody> {
        let port = if self.https_port == 443 {
            String::new()
        } else {
            format!(":{}", self.https_port)
        };
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let location = format!("https://{}{port}{pq}", normalize_host(host));
        let mut r = status(StatusCode::PERMANENT_REDIRECT);
        if let Ok(v) = HeaderValue::from_str(&location) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        r
    }

    /// The upstream request head for `req`, sent to `authority`; `None` if the rewritten target is invalid.
    fn upstream_head(
        req: &http::request::Parts,
        conn: Conn,
        host: &str,
        route: &Route,
        authority: &str,
        upgrade: bool,
    ) -> Option<http::request::Parts> {
        let scheme = if route.settings.backend_https { "https" } else { "http" };
        let new_path = route.rewrite_path(req.uri.path());
        let query = req.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        let uri: http::Uri = format!("{scheme}://{authority}{new_path}{query}").parse().ok()?;
        let mut headers = req.headers.clone();
        let upgrade_value = headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut headers);
        if let (true, Some(u)) = (upgrade, upgrade_value) {
            headers.insert(header::UPGRADE, u);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let ip = conn.peer.ip().to_string();
        let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
            _ => ip.clone(),
        };
        let set = |headers: &mut HeaderMap, name: &'static str, value: &str| {
            if let Ok(v) = HeaderValue::from_str(value) {
                headers.insert(name, v);
            }
        };
        set(&mut headers, "host", host);
        set(&mut headers, "x-forwarded-for", &xff);
        set(&mut headers, "x-real-ip", &ip);
        set(
            &mut headers,
            "x-forwarded-proto",
            if conn.https { "https" } else { "http" },
        );
        set(&mut headers, "x-forwarded-host", host);
        set(&mut headers, "x-forwarded-port", &conn.port.to_string());
        let mut builder = Request::builder()
            .method(req.method.clone())
            .uri(uri)
            .version(Version::HTTP_11);
        if let Some(h) = builder.headers_mut() {
            *h = headers;
        }
        let (parts, ()) = builder.body(()).ok()?.into_parts();
        Some(parts)
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        conn: Conn,
        host: &str,
        route: &Route,
        served: &mut Served,
    ) -> Response<ProxyBody> {
        let settings = &route.settings;
        let connect_timeout = settings.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let read_timeout = settings.read_timeout.unwrap_or(DEFAULT_READ_TIMEOUT);
        let send_timeout = settings.send_timeout.unwrap_or(DEFAULT_SEND_TIMEOUT);
        let backend = &route.backend;
        let service = backend.service.to_string();
        let affinity_in = settings
            .affinity_cookie
            .as_ref()
            .and_then(|name| cookie(req.headers(), name).map(str::to_string));
        let balance_key = format!("{service}:{}", backend.port);
        let endpoints: &[SocketAddr] = match &backend.upstream {
            Upstream::Endpoints(e) if e.is_empty() => return status(StatusCode::SERVICE_UNAVAILABLE),
            Upstream::Endpoints(e) => e,
            Upstream::ExternalName { .. } => &[],
        };
        let authority_of = |ep: Option<SocketAddr>| match (&backend.upstream, ep) {
            (Upstream::ExternalName { host, port }, _) => format!("{host}:{port}"),
            (_, Some(ep)) => ep.to_string(),
            (_, None) => String::new(),
        };
        let first = match &backend.upstream {
            Upstream::Endpoints(_) => self
                .balancer
                .pick(&balance_key, endpoints, affinity_in.as_deref(), None),
            Upstream::ExternalName { .. } => None,
        };
        let upgrade = is_upgrade(&req);
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let authority = authority_of(first);
        served.upstream = Some(authority.clone());
        let Some(head) = Self::upstream_head(&parts, conn, host, route, &authority, upgrade) else {
            return bad_request("bad request target");
        };
        if let Some(client_side) = client_side {
            let tunnel = Tunnel {
                authority: &authority,
                https: settings.backend_https,
                connect_timeout,
                read_timeout,
                service: &service,
            };
            return self.tunnel(head, client_side, tunnel).await;
        }
        // Stream the body: bounded by proxy-body-size, failing when the client stalls.
        let body: ProxyBody = match settings.body_limit {
            Some(limit) => {
                IdleTimeoutBody::new(Limited::new(body, limit as usize), send_timeout, "client body").boxed()
            }
            None => IdleTimeoutBody::new(body, send_timeout, "client body").boxed(),
        };
        let body = RetryBody::new(body);
        let client = self.clients.get(connect_timeout);
        let mut attempt = Some((head, body, first));
        let mut retried = false;
        let result = loop {
            let Some((head, body, ep)) = attempt.take() else {
                break Err(status(StatusCode::BAD_GATEWAY));
            };
            let again = if retried { None } else { body.again() };
            let upstream_req = Request::from_parts(head, body);
            match tokio::time::timeout(read_timeout, client.request(upstream_req)).await {
                Ok(Ok(resp)) => break Ok((resp, ep)),
                Ok(Err(e)) if e.is_connect() => {
                    metrics().inc_ingress_connect_error(&service);
                    tracing::debug!(%service, upstream = authority_of(ep), error = %e, "connect failed");
                    // One retry on another endpoint, with the untouched body.
                    let next = self.balancer.pick(&balance_key, endpoints, None, ep);
                    let (Some(body), Some(next)) = (again, next) else {
                        break Err(status(StatusCode::BAD_GATEWAY));
                    };
                    let authority = next.to_string();
                    let Some(head) = Self::upstream_head(&parts, conn, host, route, &authority, false) else {
                        break Err(status(StatusCode::BAD_GATEWAY));
                    };
                    served.upstream = Some(authority);
                    retried = true;
                    attempt = Some((head, body, Some(next)));
                }
                Ok(Err(e)) => {
                    let e: BoxError = Box::new(e);
                    if error_chain_has::<http_body_util::LengthLimitError>(e.as_ref()) {
                        break Err(status(StatusCode::PAYLOAD_TOO_LARGE));
                    }
                    tracing::debug!(%service, error = %e, "upstream request failed");
                    break Err(status(StatusCode::BAD_GATEWAY));
                }
                Err(_) => break Err(status(StatusCode::GATEWAY_TIMEOUT)),
            }
        };
        let (resp, ep) = match result {
            Ok(r) => r,
            Err(r) => return r,
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let (Some(name), Some(ep)) = (&settings.affinity_cookie, ep) {
            let value = affinity_value(&ep);
            if affinity_in.as_deref() != Some(value.as_str()) {
                if let Ok(v) = HeaderValue::from_str(&format!("{name}={value}; Path=/; HttpOnly")) {
                    parts.headers.append(header::SET_COOKIE, v);
                }
            }
        }
        Response::from_parts(parts, IdleTimeoutBody::new(body, read_timeout, "upstream body").boxed())
    }

    /// An Upgrade request (WebSocket): a dedicated upstream connection (TLS for HTTPS backends),
    /// and after `101` the two connections are spliced byte for byte.
    async fn tunnel(
        &self,
        head: http::request::Parts,
        client_side: hyper::upgrade::OnUpgrade,
        to: Tunnel<'_>,
    ) -> Response<ProxyBody> {
        let connected = tokio::time::timeout(to.connect_timeout, async {
            let tcp = TcpStream::connect(to.authority).await?;
            let _ = tcp.set_nodelay(true);
            if !to.https {
                return Ok::<_, std::io::Error>(UpstreamIo::Plain(tcp));
            }
            let host = to.authority.rsplit_once(':').map_or(to.authority, |(h, _)| h);
            let name = rustls_pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = self.clients.tunnel_tls().connect(name, tcp).await?;
            Ok(UpstreamIo::Tls(Box::new(tls)))
        })
        .await;
        let io = match connected {
            Ok(Ok(io)) => io,
            Ok(Err(e)) => {
                metrics().inc_ingress_connect_error(to.service);
                tracing::debug!(service = to.service, upstream = to.authority, error = %e, "upgrade connect failed");
                return status(StatusCode::BAD_GATEWAY);
            }
            Err(_) => {
                metrics().inc_ingress_connect_error(to.service);
                return status(StatusCode::BAD_GATEWAY);
            }
        };
        match io {
            UpstreamIo::Plain(tcp) => upgrade_over(tcp, head, client_side, to.read_timeout).await,
            UpstreamIo::Tls(tls) => upgrade_over(*tls, head, client_side, to.read_timeout).await,
        }
    }
}

/// Where an Upgrade request goes.
struct Tunnel<'a> {
    authority: &'a str,
    https: bool,
    connect_timeout: Duration,
    read_timeout: Duration,
    service: &'a str,
}

enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Sends the Upgrade request over `io` and, on `101`, splices it with the client's connection.
async fn upgrade_over<IO>(
    io: IO,
    mut head: http::request::Parts,
    client_side: hyper::upgrade::OnUpgrade,
    read_timeout: Duration,
) -> Response<ProxyBody>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
        Ok(x) => x,
        Err(_) => return status(StatusCode::BAD_GATEWAY),
    };
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    // A connection of its own talks to the origin directly: origin-form request target.
    if let Some(pq) = head.uri.path_and_query().cloned() {
        head.uri = http::Uri::from(pq);
    }
    let req = Request::from_parts(head, Empty::<Bytes>::new());
    let mut resp = match tokio::time::timeout(read_timeout, sender.send_request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => return status(StatusCode::BAD_GATEWAY),
        Err(_) => return status(StatusCode::GATEWAY_TIMEOUT),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(c), Ok(u)) = tokio::join!(client_side, upstream_side) {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u)).await;
            }
        });
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, Empty::new().map_err(|e| match e {}).boxed());
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.map_err(BoxError::from).boxed())
}

/// Resolves once shutdown has begun (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

fn builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

/// Serves one listener until `shutdown`, then lets in-flight requests finish (up to
/// [`DRAIN_TIMEOUT`]). Accepts nothing before the first route table exists. Several workers may
/// serve the same listener; the one that `announce`s logs when serving begins.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    proxy: Arc<Proxy>,
    mut shutdown: watch::Receiver<bool>,
    announce: bool,
) {
    let https = tls.is_some();
    let mut routes = proxy.routes.clone();
    let ready = async { routes.wait_for(Option::is_some).await.is_ok() };
    tokio::select! {
        ok = ready => if !ok { return },
        _ = stopped(&mut shutdown) => return,
    }
    let port = listener.local_addr().map_or(0, |a| a.port());
    if announce {
        tracing::info!(address = ?listener.local_addr().ok(), https, "Ingress listener serving");
    }
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(builder());
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = Conn { peer, https, port };
        let proxy = proxy.clone();
        let verdict = Arc::new(framing::Verdict::default());
        let service_verdict = verdict.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            let conflict = req.version() <= Version::HTTP_11 && service_verdict.next_request_conflicts();
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, conn, conflict).await) }
        });
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => {
                    let c = builder
                        .serve_connection_with_upgrades(TokioIo::new(FramingWatch::new(stream, verdict)), service)
                        .into_owned();
                    let _ = watcher.watch(c).await;
                }
                Some(acceptor) => {
                    let Ok(Ok(tls_stream)) = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    else {
                        return;
                    };
                    let c = builder
                        .serve_connection_with_upgrades(TokioIo::new(FramingWatch::new(tls_stream, verdict)), service)
                        .into_owned();
                    let _ = watcher.watch(c).await;
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            https,
            "Ingress connections still open after the drain timeout; closing them"
        );
    }
}
