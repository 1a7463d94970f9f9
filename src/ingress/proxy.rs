//! The L7 proxy: what every request goes through, whichever protocol brought it.
//!
//! ```text
//!  worker thread (one per CPU; SO_REUSEPORT listener of its own, see controller.rs)
//!   accept -> [TLS handshake, ALPN] -> HTTP/1.x: h1::serve (hand-written, buffers on demand)
//!                                   -> HTTP/2 (ALPN h2, or the cleartext preface): hyper, serve_h2
//!   each request:
//!     1. route lookup    Proxy::decide: Gateway API listeners first (gateway::proxy::decide:
//!                        listener, rule, weighted backend), then host and path -> Route
//!                        (RouteTable, pure)
//!     2. local answers   Proxy::decide: redirect to HTTPS, Gateway redirects, 404, 500 for a
//!                        rule without a valid backend, 413 by declared size, 503
//!     3. backend pick    Proxy::decide: canary, affinity cookie, round-robin (Balancer)
//!     4. upstream        HTTP/1: head written by h1::write_upstream_head, the worker's Pool;
//!                        HTTP/2: Proxy::forward_h2 over hyper's pooled client. A Gateway
//!                        rule's filters (Decision::gateway) apply here: host and path
//!                        rewrites, request header edits, mirrors, the request timeout
//!     5. response        hop-by-hop headers removed, affinity cookie added, a Gateway rule's
//!                        response header edits, streamed back
//! ```
//!
//! `Decision` is what steps 1 to 3 hand on. A request no Gateway listener serves costs the
//! Gateway side one map lookup: no header map is built for it, nothing is allocated.
//! Bodies are streamed both ways, never buffered whole; WebSocket upgrades are HTTP/1.1 only
//! (h1.rs splices them after `101`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::sync::watch;

use super::balance::{affinity_value, Balancer};
use super::gateway::proxy as gateway;
use super::routes::{normalize_host, Route, RouteTable, Upstream};
pub use super::routes::{RequestLine, RequestView};
use super::upstream::{
    BoxError, Clients, IdleTimeoutBody, ProxyBody, RetryBody, DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT,
    DEFAULT_SEND_TIMEOUT,
};
use crate::metrics::metrics;

/// Longest TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head; past it the answer is 431.
pub const MAX_HEADER_BYTES: usize = super::framing::MAX_HEAD;
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

/// What every worker shares about proxying: the routes, and how requests are balanced.
/// One per worker thread (its balancer and HTTP/2 clients are the worker's own).
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
pub struct Conn {
    pub peer: SocketAddr,
    pub https: bool,
    /// The listener's port (`X-Forwarded-Port`).
    pub port: u16,
    /// The client's address as `X-Forwarded-For` and `X-Real-IP` carry it, formatted once.
    ip: [u8; 39],
    ip_len: u8,
}

impl Conn {
    pub fn new(peer: SocketAddr, https: bool, port: u16) -> Self {
        let mut ip = [0u8; 39];
        let ip_len = match peer.ip().to_canonical() {
            // By hand: `Display` for an IPv4 address took about 1,000 instructions, 4 % of a
            // new connection's whole cost.
            std::net::IpAddr::V4(v4) => format_ipv4(v4, &mut ip),
            v6 => {
                let mut cursor = std::io::Cursor::new(&mut ip[..]);
                let _ = std::io::Write::write_fmt(&mut cursor, format_args!("{v6}"));
                cursor.position() as u8
            }
        };
        Conn {
            peer,
            https,
            port,
            ip,
            ip_len,
        }
    }

    /// The client's IP address (IPv4-mapped IPv6 addresses as IPv4).
    pub fn ip_text(&self) -> &[u8] {
        &self.ip[..self.ip_len as usize]
    }
}

/// Writes `ip` in dotted decimal into `out`; returns the length (at most 15).
fn format_ipv4(ip: std::net::Ipv4Addr, out: &mut [u8; 39]) -> u8 {
    let mut n = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            out[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            out[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        out[n] = b'0' + octet % 10;
        n += 1;
    }
    n as u8
}

/// The `Host` a backend sees and the client's (its `X-Forwarded-Host`): they differ after a
/// Gateway API URLRewrite of the hostname.
#[derive(Debug, Clone, Copy)]
struct Hosts<'a> {
    upstream: &'a str,
    client: &'a str,
}

impl<'a> Hosts<'a> {
    fn same(host: &'a str) -> Self {
        Hosts {
            upstream: host,
            client: host,
        }
    }
}

/// An answer kproxy gives itself, without a backend.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub text: &'static str,
    pub location: Option<String>,
    /// The answer's headers besides its framing, when a Gateway API filter edited them
    /// (ResponseHeaderModifier on a redirect); replaces the content type and `location`.
    pub headers: Option<Box<HeaderMap>>,
    /// Close the connection after it (framing errors: nothing after can be trusted).
    pub close: bool,
}

impl Answer {
    pub fn status(status: StatusCode) -> Self {
        Answer {
            status,
            text: status.canonical_reason().unwrap_or(""),
            location: None,
            headers: None,
            close: false,
        }
    }
    pub fn text(status: StatusCode, text: &'static str) -> Self {
        Answer {
            text,
            ..Answer::status(status)
        }
    }
    pub fn closing(self) -> Self {
        Answer { close: true, ..self }
    }
}

/// What to do with a request.
#[derive(Debug)]
pub enum Action {
    Answer(Answer),
    /// To this endpoint (`None` for an ExternalName backend, resolved at connect); the
    /// affinity cookie's value the request carried, if any.
    Forward {
        endpoint: Option<SocketAddr>,
        affinity_in: Option<String>,
    },
}

/// Steps 1 to 3 for one request: the route that matched (for metrics and logs), the action,
/// and for a request a Gateway API rule forwards, the rule's filters (what the path and host
/// become, header edits, mirrors, the request timeout) for steps 4 and 5.
#[derive(Debug)]
pub struct Decision<'t> {
    pub route: Option<&'t Route>,
    pub action: Action,
    pub gateway: Option<gateway::Forward<'t>>,
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

fn full(a: &Answer) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{}\n", a.text)))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = a.status;
    if let Some(h) = &a.headers {
        *r.headers_mut() = (**h).clone();
        return r;
    }
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(v) = a.location.as_deref().and_then(|l| HeaderValue::from_str(l).ok()) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn status(code: StatusCode) -> Response<ProxyBody> {
    full(&Answer::status(code))
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

    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    pub fn access_log(&self) -> bool {
        self.access_log
    }

    /// The worker's hyper clients (HTTP/2 requests' backends, Gateway API mirrors).
    pub fn clients(&self) -> &Clients {
        &self.clients
    }

    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// Steps 1 to 3 of a request (see the module doc): which route serves it, and whether it
    /// is answered here or forwarded to which endpoint. Gateway API listeners first (their own
    /// ports, and the hosts they match best on an Ingress port; see [`gateway::decide`]), then
    /// the Ingress routes. `declared` is the body's Content-Length.
    pub fn decide<'t>(
        &self,
        table: &'t RouteTable,
        conn: &Conn,
        req: RequestLine<'_>,
        declared: Option<u64>,
        headers: &dyn RequestView,
    ) -> Decision<'t> {
        let answer = |route, a| Decision {
            route,
            action: Action::Answer(a),
            gateway: None,
        };
        match gateway::decide(table, conn.port, conn.https, req, headers) {
            gateway::Decision::Ingress => {}
            gateway::Decision::Answer(a) => return answer(None, a),
            gateway::Decision::Forward(f) => {
                let route = f.route();
                let endpoint = match &route.backend.upstream {
                    Upstream::Endpoints(e) if e.is_empty() => {
                        return answer(Some(route), Answer::status(StatusCode::SERVICE_UNAVAILABLE))
                    }
                    Upstream::Endpoints(e) => self.balancer.pick(&route.backend, e, None, None),
                    Upstream::ExternalName { .. } => None,
                };
                return Decision {
                    route: Some(route),
                    action: Action::Forward {
                        endpoint,
                        affinity_in: None,
                    },
                    gateway: Some(f),
                };
            }
        }
        let (host, path, https) = (req.host, req.path, conn.https);
        let Some(main) = table.route(host, path) else {
            if !https && table.host_has_tls(host) {
                return answer(None, self.redirect(host, path, req.query));
            }
            return answer(None, Answer::text(StatusCode::NOT_FOUND, "404 page not found"));
        };
        let route: &Route = match &main.canary {
            Some(c) => {
                let value = c.canary.header.as_deref().and_then(|h| headers.header(h));
                if self.balancer.use_canary(&c.canary, value) {
                    &c.route
                } else {
                    main
                }
            }
            None => main,
        };
        let settings = &route.settings;
        if !https && ((route.host_tls && settings.ssl_redirect) || settings.force_ssl_redirect) {
            return answer(Some(route), self.redirect(host, path, req.query));
        }
        if let (Some(limit), Some(n)) = (settings.body_limit, declared) {
            if n > limit {
                return answer(Some(route), Answer::status(StatusCode::PAYLOAD_TOO_LARGE).closing());
            }
        }
        let affinity_in = settings
            .affinity_cookie
            .as_deref()
            .and_then(|name| headers.cookie(name))
            .map(str::to_string);
        let endpoint = match &route.backend.upstream {
            Upstream::Endpoints(e) if e.is_empty() => {
                return answer(Some(route), Answer::status(StatusCode::SERVICE_UNAVAILABLE))
            }
            Upstream::Endpoints(e) => self.balancer.pick(&route.backend, e, affinity_in.as_deref(), None),
            Upstream::ExternalName { .. } => None,
        };
        Decision {
            route: Some(route),
            action: Action::Forward { endpoint, affinity_in },
            gateway: None,
        }
    }

    /// 308 to the same URL over HTTPS (the port is omitted when the HTTPS listener is on 443).
    fn redirect(&self, host: &str, path: &str, query: Option<&str>) -> Answer {
        let port = if self.https_port == 443 {
            String::new()
        } else {
            format!(":{}", self.https_port)
        };
        let path = if path.is_empty() { "/" } else { path };
        let query = query.map_or(String::new(), |q| format!("?{q}"));
        Answer {
            location: Some(format!("https://{}{port}{path}{query}", normalize_host(host))),
            ..Answer::status(StatusCode::PERMANENT_REDIRECT)
        }
    }

    /// Serves one request that arrived over HTTP/2.
    pub async fn handle_h2(self: Arc<Self>, req: Request<Incoming>, conn: Conn) -> Response<ProxyBody> {
        let started = Instant::now();
        let table = self.routes.borrow().clone();
        let (resp, route, upstream) = match &table {
            None => (status(StatusCode::SERVICE_UNAVAILABLE), None, None),
            Some(table) => self.serve_h2(req, conn, table).await,
        };
        let code = resp.status().as_u16();
        let service = route.as_ref().map(|(_, s)| s.as_str()).unwrap_or("");
        let ingress = route.as_ref().map(|(i, _)| i.as_str()).unwrap_or("");
        let m = metrics();
        m.inc_ingress_request(ingress, service, code);
        m.observe_ingress_duration(started.elapsed());
        if self.access_log {
            tracing::info!(
                target: "kproxy::access",
                client = %conn.peer.ip(),
                version = "HTTP/2.0",
                status = code,
                ingress,
                service,
                upstream = upstream.as_deref().unwrap_or("-"),
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                "request"
            );
        }
        resp
    }

    /// Route, then forward over hyper's client: the answer, the route's (ingress, service)
    /// and the upstream address.
    async fn serve_h2(
        &self,
        req: Request<Incoming>,
        conn: Conn,
        table: &RouteTable,
    ) -> (Response<ProxyBody>, Option<(String, String)>, Option<String>) {
        let host = match req.uri().authority() {
            Some(a) => a.as_str().to_string(),
            None => match req.headers().get(header::HOST).and_then(|h| h.to_str().ok()) {
                Some(h) if !h.is_empty() => h.to_string(),
                _ => return (full(&Answer::text(StatusCode::BAD_REQUEST, "no Host")), None, None),
            },
        };
        let uri = req.uri().clone();
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let line = RequestLine {
            host: &host,
            method: req.method().as_str(),
            path: uri.path(),
            query: uri.query(),
        };
        let decision = self.decide(table, &conn, line, declared, req.headers());
        let labels = decision
            .route
            .map(|r| (r.ingress.clone(), r.backend.service.to_string()));
        match (decision.route, decision.action, decision.gateway) {
            (_, Action::Answer(a), _) => (full(&a), labels, None),
            (Some(_), Action::Forward { endpoint, .. }, Some(g)) => {
                let (resp, upstream) = self.forward_gateway(req, conn, &host, g, endpoint).await;
                (resp, labels, upstream)
            }
            (Some(route), Action::Forward { endpoint, affinity_in }, None) => {
                let (resp, upstream) = self
                    .forward_h2(req, conn, Hosts::same(&host), route, endpoint, affinity_in, None)
                    .await;
                (resp, labels, upstream)
            }
            (None, Action::Forward { .. }, _) => (status(StatusCode::BAD_GATEWAY), labels, None),
        }
    }

    /// A request a Gateway API rule forwards, over HTTP/2: its filters around [`Self::forward_h2`].
    async fn forward_gateway(
        &self,
        mut req: Request<Incoming>,
        conn: Conn,
        host: &str,
        g: gateway::Forward<'_>,
        endpoint: Option<SocketAddr>,
    ) -> (Response<ProxyBody>, Option<String>) {
        if let Some(path) = g.path(req.uri().path()) {
            let target = match req.uri().query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = target.parse().ok();
            match http::Uri::from_parts(parts) {
                Ok(uri) => *req.uri_mut() = uri,
                Err(_) => return (full(&Answer::text(StatusCode::BAD_REQUEST, "bad request target")), None),
            }
        }
        let hosts = Hosts {
            upstream: g.host(host),
            client: host,
        };
        if g.needs_request_headers() {
            g.edit_request_headers(req.headers_mut());
            let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
            g.mirror(
                req.method().as_str(),
                target,
                req.headers(),
                hosts.upstream,
                &self.clients,
            );
        }
        let forward = self.forward_h2(req, conn, hosts, g.route(), endpoint, None, Some(&g));
        match g.request_timeout() {
            Some(limit) => tokio::time::timeout(limit, forward).await.unwrap_or_else(|_| {
                (
                    full(&Answer::text(StatusCode::GATEWAY_TIMEOUT, "504 request timeout")),
                    None,
                )
            }),
            None => forward.await,
        }
    }

    /// The upstream request head for `req`, sent to `authority`; `None` if the rewritten target is invalid.
    fn upstream_head(
        req: &http::request::Parts,
        conn: Conn,
        hosts: Hosts<'_>,
        route: &Route,
        authority: &str,
    ) -> Option<http::request::Parts> {
        let scheme = if route.settings.backend_https { "https" } else { "http" };
        let new_path = route.rewrite_path(req.uri.path());
        let query = req.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        let uri: http::Uri = format!("{scheme}://{authority}{new_path}{query}").parse().ok()?;
        let mut headers = req.headers.clone();
        strip_hop_by_hop(&mut headers);
        let ip = conn.peer.ip().to_canonical().to_string();
        let prev: Vec<&str> = req
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter(|v| !v.trim().is_empty())
            .collect();
        let xff = if prev.is_empty() {
            ip.clone()
        } else {
            format!("{}, {ip}", prev.join(", "))
        };
        let set = |headers: &mut HeaderMap, name: &'static str, value: &str| {
            if let Ok(v) = HeaderValue::from_str(value) {
                headers.insert(name, v);
            }
        };
        set(&mut headers, "host", hosts.upstream);
        set(&mut headers, "x-forwarded-for", &xff);
        set(&mut headers, "x-real-ip", &ip);
        set(
            &mut headers,
            "x-forwarded-proto",
            if conn.https { "https" } else { "http" },
        );
        set(&mut headers, "x-forwarded-host", hosts.client);
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

    /// Step 4 and 5 for HTTP/2 requests: hyper's pooled HTTP/1.1 client, one retry on another
    /// endpoint after a failed connect.
    #[allow(clippy::too_many_arguments)]
    async fn forward_h2(
        &self,
        req: Request<Incoming>,
        conn: Conn,
        hosts: Hosts<'_>,
        route: &Route,
        first: Option<SocketAddr>,
        affinity_in: Option<String>,
        gateway: Option<&gateway::Forward<'_>>,
    ) -> (Response<ProxyBody>, Option<String>) {
        let settings = &route.settings;
        let connect_timeout = settings.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let read_timeout = settings.read_timeout.unwrap_or(DEFAULT_READ_TIMEOUT);
        let send_timeout = settings.send_timeout.unwrap_or(DEFAULT_SEND_TIMEOUT);
        let backend = &route.backend;
        let service = backend.service.to_string();
        let endpoints: &[SocketAddr] = match &backend.upstream {
            Upstream::Endpoints(e) => e,
            Upstream::ExternalName { .. } => &[],
        };
        let authority_of = |ep: Option<SocketAddr>| match (&backend.upstream, ep) {
            (Upstream::ExternalName { host, port }, _) => format!("{host}:{port}"),
            (_, Some(ep)) => ep.to_string(),
            (_, None) => String::new(),
        };
        let (parts, body) = req.into_parts();
        let mut authority = authority_of(first);
        let Some(head) = Self::upstream_head(&parts, conn, hosts, route, &authority) else {
            return (full(&Answer::text(StatusCode::BAD_REQUEST, "bad request target")), None);
        };
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
                    let next = self.balancer.pick(backend, endpoints, None, ep);
                    let (Some(body), Some(next)) = (again, next) else {
                        break Err(status(StatusCode::BAD_GATEWAY));
                    };
                    authority = next.to_string();
                    let Some(head) = Self::upstream_head(&parts, conn, hosts, route, &authority) else {
                        break Err(status(StatusCode::BAD_GATEWAY));
                    };
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
            Err(r) => return (r, Some(authority)),
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(g) = gateway.filter(|g| g.edits_response()) {
            g.edit_response_headers(&mut parts.headers);
        }
        if let (Some(name), Some(ep)) = (&settings.affinity_cookie, ep) {
            let value = affinity_value(&ep);
            if affinity_in.as_deref() != Some(value.as_str()) {
                if let Ok(v) = HeaderValue::from_str(&format!("{name}={value}; Path=/; HttpOnly")) {
                    parts.headers.append(header::SET_COOKIE, v);
                }
            }
        }
        let resp = Response::from_parts(parts, IdleTimeoutBody::new(body, read_timeout, "upstream body").boxed());
        (resp, Some(authority))
    }
}

/// hyper's HTTP/2 server settings for client connections.
pub fn h2_builder() -> hyper::server::conn::http2::Builder<hyper_util::rt::TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    b.timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_address_text_is_what_display_writes() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.244.1.9",
            "100.64.10.255",
            "255.255.255.255",
            "::ffff:192.168.0.42",
            "fd00::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let conn = Conn::new(SocketAddr::new(ip, 40000), false, 80);
            assert_eq!(
                std::str::from_utf8(conn.ip_text()).unwrap(),
                ip.to_canonical().to_string(),
                "{ip}"
            );
        }
    }
}
