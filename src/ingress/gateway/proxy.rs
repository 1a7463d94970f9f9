//! The per-request hook the L7 proxy calls before its Ingress routing: picks the Gateway
//! listener and rule for a request ([`decide`]), and applies the rule's filters around the
//! proxy's own forwarding ([`Forward`]): header edits, URL rewrites, mirrors, the request
//! timeout, response header edits. Redirects, 404s and the 500s of rules without a valid
//! backend are answered here. The endpoint choice, connection pools, retries, upgrades and
//! the forwarding headers stay the proxy's, shared with Ingress.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};

use super::table::{Action, Entry, HeaderEdits, PathSpec, Rule, Target};
use crate::ingress::routes::{normalize_host, Route, RouteTable, Upstream};
use crate::ingress::upstream::{Clients, ProxyBody, RetryBody, DEFAULT_CONNECT_TIMEOUT};

/// How long a mirrored request may take before it is dropped.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// What the proxy does with a request.
pub enum Decision {
    /// Not a Gateway API request: route it by the Ingress rules (this is an Ingress port).
    Ingress,
    /// Answer with this response (a redirect, 404 without a matching listener or rule, 500
    /// for a rule without a valid backend).
    Respond(Response<ProxyBody>),
    /// Forward to [`Forward::route`] after [`Forward::prepare`], within [`Forward::within`],
    /// and pass the response through [`Forward::finish`].
    Forward(Forward),
}

/// A request on its way to a backend of a rule.
pub struct Forward {
    rule: Arc<Rule>,
    route: Arc<Route>,
    matched: PathSpec,
    backend_request_headers: HeaderEdits,
    backend_response_headers: HeaderEdits,
}

fn text(status: StatusCode, body: &str) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{body}\n")))
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

/// The Gateway API's decision for a request that arrived on a listener of `port` (`https`:
/// over TLS) for `host` (as the client sent it, maybe with a port).
pub fn decide<B>(table: &RouteTable, port: u16, https: bool, host: &str, req: &Request<B>) -> Decision {
    let gw = &table.gateway;
    // Without Gateway listeners every listener is an Ingress one.
    if gw.ports.is_empty() {
        return Decision::Ingress;
    }
    let ingress_port = gw.is_ingress_port(port);
    let host = normalize_host(host);
    let listener = gw.listener(port, &host);
    if ingress_port {
        match &listener {
            None => return Decision::Ingress,
            // On a tie the Ingress routes keep the host: a Gateway added later does not take
            // traffic an Ingress already serves.
            Some((_, spec, _)) if table.host_specificity(&host) >= Some(*spec) => return Decision::Ingress,
            Some(_) => {}
        }
    }
    let Some((listener, _, _)) = listener else {
        return Decision::Respond(text(StatusCode::NOT_FOUND, "404 page not found"));
    };
    let uri = req.uri();
    let Some(entry) = listener.find(&host, req.method(), uri.path(), uri.query(), req.headers()) else {
        return Decision::Respond(text(StatusCode::NOT_FOUND, "404 page not found"));
    };
    decide_entry(entry, &host, port, https, req)
}

fn decide_entry<B>(entry: &Entry, host: &str, port: u16, https: bool, req: &Request<B>) -> Decision {
    let rule = &entry.rule;
    match &rule.action {
        Action::Redirect(r) => {
            let location = r.location(host, req.uri().path(), req.uri().query(), port, https, &entry.path);
            let mut resp = text(r.code, r.code.canonical_reason().unwrap_or("redirect"));
            if let Ok(v) = HeaderValue::from_str(&location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            rule.response_headers.apply(resp.headers_mut());
            Decision::Respond(resp)
        }
        Action::Fail(why) => {
            tracing::debug!(route = %rule.route, "{why}: 500");
            Decision::Respond(text(StatusCode::INTERNAL_SERVER_ERROR, "500 no valid backend"))
        }
        Action::Backends(backends) => match backends.pick() {
            Some(b) => match &b.target {
                Target::Route(route) => Decision::Forward(Forward {
                    rule: rule.clone(),
                    route: route.clone(),
                    matched: entry.path.clone(),
                    backend_request_headers: b.request_headers.clone(),
                    backend_response_headers: b.response_headers.clone(),
                }),
                Target::Invalid(why) => {
                    tracing::debug!(route = %rule.route, "{why}: 500");
                    Decision::Respond(text(StatusCode::INTERNAL_SERVER_ERROR, "500 invalid backend"))
                }
            },
            None => Decision::Respond(text(StatusCode::INTERNAL_SERVER_ERROR, "500 no valid backend")),
        },
    }
}

impl Forward {
    /// Where the request goes: the chosen backend as an Ingress-style route (its timeouts
    /// are the rule's `backendRequest`).
    pub fn route(&self) -> &Route {
        &self.route
    }

    /// Applies the request filters to `req` (headers, URL rewrite), starts the mirrors, and
    /// returns the host the backend must see.
    pub fn prepare<B>(&self, req: &mut Request<B>, host: &str, clients: &Clients) -> String {
        self.rule.request_headers.apply(req.headers_mut());
        self.backend_request_headers.apply(req.headers_mut());
        if let Some(rewrite) = &self.rule.rewrite_path {
            let path = rewrite.apply(req.uri().path(), &self.matched);
            let target = match req.uri().query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            let mut parts = req.uri().clone().into_parts();
            if let Ok(pq) = target.parse() {
                parts.path_and_query = Some(pq);
                if let Ok(uri) = http::Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
            }
        }
        let host = self.rule.rewrite_host.clone().unwrap_or_else(|| host.to_string());
        for m in &self.rule.mirrors {
            if sampled(m.numerator, m.denominator) {
                mirror(req, &host, &m.route, clients);
            }
        }
        host
    }

    /// Runs the forwarding within the rule's request timeout (504 past it).
    pub async fn within(&self, forward: impl Future<Output = Response<ProxyBody>>) -> Response<ProxyBody> {
        match self.rule.request_timeout {
            Some(limit) => tokio::time::timeout(limit, forward)
                .await
                .unwrap_or_else(|_| text(StatusCode::GATEWAY_TIMEOUT, "504 request timeout")),
            None => forward.await,
        }
    }

    /// Applies the response filters.
    pub fn finish(&self, mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
        self.rule.response_headers.apply(resp.headers_mut());
        self.backend_response_headers.apply(resp.headers_mut());
        resp
    }
}

static SAMPLE: AtomicU64 = AtomicU64::new(0);

/// Whether this request is one of the `numerator / denominator` that are mirrored.
fn sampled(numerator: u64, denominator: u64) -> bool {
    if numerator >= denominator {
        return true;
    }
    let mut z = SAMPLE
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) % denominator < numerator
}

/// Sends a copy of `req`'s head (not its body, which streams to the real backend) to one ready
/// endpoint of the mirror, and forgets about it.
fn mirror<B>(req: &Request<B>, host: &str, route: &Route, clients: &Clients) {
    let Upstream::Endpoints(endpoints) = &route.backend.upstream else {
        return;
    };
    if endpoints.is_empty() {
        return;
    }
    let i = SAMPLE.fetch_add(1, Ordering::Relaxed) as usize % endpoints.len();
    let endpoint: SocketAddr = endpoints[i];
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("http://{endpoint}{target}").parse::<http::Uri>() else {
        return;
    };
    let mut headers = req.headers().clone();
    for h in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
    ] {
        headers.remove(h);
    }
    if let Ok(v) = HeaderValue::from_str(host) {
        headers.insert(header::HOST, v);
    }
    let body: ProxyBody = Empty::<Bytes>::new().map_err(|e| match e {}).boxed();
    let mut copy = Request::new(RetryBody::new(body));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = uri;
    *copy.headers_mut() = headers;
    let client = clients.get(DEFAULT_CONNECT_TIMEOUT);
    let service = route.backend.service.to_string();
    tokio::spawn(async move {
        let sent = tokio::time::timeout(MIRROR_TIMEOUT, async {
            let resp = client.request(copy).await?;
            let _ = resp.into_body().collect().await;
            Ok::<_, hyper_util::client::legacy::Error>(())
        })
        .await;
        if let Ok(Err(e)) = sent {
            tracing::debug!(%service, %endpoint, error = %e, "mirrored request failed");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::sampled;

    #[test]
    fn mirrors_sample_their_fraction_of_requests() {
        assert!((0..100).all(|_| sampled(100, 100)));
        let hits = (0..20_000).filter(|_| sampled(1, 4)).count();
        assert!((4_500..5_500).contains(&hits), "{hits}");
        assert_eq!((0..1000).filter(|_| sampled(0, 100)).count(), 0);
    }
}
