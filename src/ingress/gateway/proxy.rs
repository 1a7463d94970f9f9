//! The per-request hook the L7 proxy calls before its Ingress routing, for HTTP/1 (h1.rs)
//! and HTTP/2 (proxy.rs) alike: picks the Gateway listener and rule for a request
//! ([`decide`]) from its line and a view of its headers, and says what the rule's filters do
//! around the proxy's own forwarding ([`Forward`]): the host and path the backend sees, the
//! request and response header edits, the mirrors, the request timeout. Redirects, 404s and
//! the 500s of rules without a valid backend are local answers. The endpoint choice,
//! connection pools, retries, upgrades and the forwarding headers stay the proxy's, shared
//! with Ingress.
//!
//! Nothing here is computed for a request that no Gateway listener serves: on a port without
//! Gateway listeners [`decide`] is one map lookup, and it allocates nothing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};

use super::table::{Action, Entry, PathSpec, Rule, Target, WeightedBackend};
use crate::ingress::proxy::Answer;
use crate::ingress::routes::{host_key, RequestLine, RequestView, Route, RouteTable, Upstream};
use crate::ingress::upstream::{Clients, ProxyBody, RetryBody, DEFAULT_CONNECT_TIMEOUT};

/// How long a mirrored request may take before it is dropped.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// What the proxy does with a request.
pub enum Decision<'t> {
    /// Not a Gateway API request: route it by the Ingress rules (this is an Ingress port).
    Ingress,
    /// Answer this locally (a redirect, 404 without a matching listener or rule, 500 for a
    /// rule without a valid backend).
    Answer(Answer),
    /// Forward to [`Forward::route`], with the rule's filters applied.
    Forward(Forward<'t>),
}

/// A request on its way to a backend of a rule; borrows the route table.
#[derive(Debug, Clone, Copy)]
pub struct Forward<'t> {
    rule: &'t Rule,
    backend: &'t WeightedBackend,
    route: &'t Route,
    matched: &'t PathSpec,
}

/// The Gateway API's decision for a request that arrived on a listener of `port` (`https`:
/// over TLS).
pub fn decide<'t>(
    table: &'t RouteTable,
    port: u16,
    https: bool,
    req: RequestLine<'_>,
    headers: &dyn RequestView,
) -> Decision<'t> {
    let gw = &table.gateway;
    if gw.ports.is_empty() {
        // Without Gateway listeners every listener is an Ingress one.
        return Decision::Ingress;
    }
    if !gw.ports.contains_key(&port) {
        // No Gateway listener here: an Ingress port's requests are the Ingress routes'.
        return if gw.is_ingress_port(port) {
            Decision::Ingress
        } else {
            not_found()
        };
    }
    let host = host_key(req.host);
    let listener = gw.listener(port, &host);
    if gw.is_ingress_port(port) {
        match &listener {
            None => return Decision::Ingress,
            // On a tie the Ingress routes keep the host: a Gateway added later does not take
            // traffic an Ingress already serves.
            Some((_, spec, _)) if table.host_specificity(&host) >= Some(*spec) => return Decision::Ingress,
            Some(_) => {}
        }
    }
    let Some((listener, _, _)) = listener else {
        return not_found();
    };
    let Some(entry) = listener.find(&host, req.method, req.path, req.query, headers) else {
        return not_found();
    };
    decide_entry(entry, &host, port, https, req)
}

fn not_found() -> Decision<'static> {
    Decision::Answer(Answer::text(StatusCode::NOT_FOUND, "404 page not found"))
}

fn decide_entry<'t>(entry: &'t Entry, host: &str, port: u16, https: bool, req: RequestLine<'_>) -> Decision<'t> {
    let rule: &Rule = &entry.rule;
    match &rule.action {
        Action::Redirect(r) => {
            let location = r.location(host, req.path, req.query, port, https, &entry.path);
            let mut a = Answer::text(r.code, r.code.canonical_reason().unwrap_or("redirect"));
            if rule.response_headers.is_empty() {
                a.location = Some(location);
            } else {
                // The filter edits the answer's own headers too.
                let mut headers = HeaderMap::new();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                if let Ok(v) = HeaderValue::from_str(&location) {
                    headers.insert(header::LOCATION, v);
                }
                rule.response_headers.apply(&mut headers);
                a.headers = Some(Box::new(headers));
            }
            Decision::Answer(a)
        }
        Action::Fail(why) => {
            tracing::debug!(route = %rule.route, "{why}: 500");
            Decision::Answer(Answer::text(StatusCode::INTERNAL_SERVER_ERROR, "500 no valid backend"))
        }
        Action::Backends(backends) => match backends.pick() {
            Some(b) => match &b.target {
                Target::Route(route) => Decision::Forward(Forward {
                    rule,
                    backend: b,
                    route,
                    matched: &entry.path,
                }),
                Target::Invalid(why) => {
                    tracing::debug!(route = %rule.route, "{why}: 500");
                    Decision::Answer(Answer::text(StatusCode::INTERNAL_SERVER_ERROR, "500 invalid backend"))
                }
            },
            None => Decision::Answer(Answer::text(StatusCode::INTERNAL_SERVER_ERROR, "500 no valid backend")),
        },
    }
}

impl<'t> Forward<'t> {
    /// Where the request goes: the chosen backend as an Ingress-style route (its timeouts
    /// are the rule's `backendRequest`).
    pub fn route(&self) -> &'t Route {
        self.route
    }

    /// The host the backend sees: the URLRewrite's hostname, else the client's `host`.
    pub fn host<'a>(&self, host: &'a str) -> &'a str
    where
        't: 'a,
    {
        self.rule.rewrite_host.as_deref().unwrap_or(host)
    }

    /// The path the backend sees, when a URLRewrite changes it.
    pub fn path(&self, path: &str) -> Option<String> {
        self.rule.rewrite_path.as_ref().map(|r| r.apply(path, self.matched))
    }

    /// Whether the request's headers are edited (RequestHeaderModifier, of the rule or of
    /// the backendRef) or copied (RequestMirror): then the proxy builds a header map.
    pub fn needs_request_headers(&self) -> bool {
        !self.rule.request_headers.is_empty()
            || !self.backend.request_headers.is_empty()
            || !self.rule.mirrors.is_empty()
    }

    /// Applies the request header filters, the rule's then the backendRef's.
    pub fn edit_request_headers(&self, headers: &mut HeaderMap) {
        self.rule.request_headers.apply(headers);
        self.backend.request_headers.apply(headers);
    }

    /// Whether the response's headers are edited (ResponseHeaderModifier).
    pub fn edits_response(&self) -> bool {
        !self.rule.response_headers.is_empty() || !self.backend.response_headers.is_empty()
    }

    /// Applies the response header filters, the rule's then the backendRef's.
    pub fn edit_response_headers(&self, headers: &mut HeaderMap) {
        self.rule.response_headers.apply(headers);
        self.backend.response_headers.apply(headers);
    }

    /// `timeouts.request`: from the request to the backend's response head, else 504.
    pub fn request_timeout(&self) -> Option<Duration> {
        self.rule.request_timeout
    }

    /// Starts the rule's mirrors (each sampled at its fraction) with the request as the
    /// backend sees it: `headers` edited, `target` the path and query, `host` the upstream host.
    pub fn mirror(&self, method: &str, target: &str, headers: &HeaderMap, host: &str, clients: &Clients) {
        for m in &self.rule.mirrors {
            if sampled(m.numerator, m.denominator) {
                mirror(method, target, headers, host, &m.route, clients);
            }
        }
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

/// Sends a copy of a request's head (not its body, which streams to the real backend) to one
/// ready endpoint of the mirror, and forgets about it.
fn mirror(method: &str, target: &str, headers: &HeaderMap, host: &str, route: &Route, clients: &Clients) {
    let Upstream::Endpoints(endpoints) = &route.backend.upstream else {
        return;
    };
    if endpoints.is_empty() {
        return;
    }
    let i = SAMPLE.fetch_add(1, Ordering::Relaxed) as usize % endpoints.len();
    let endpoint: SocketAddr = endpoints[i];
    let target = if target.is_empty() { "/" } else { target };
    let (Ok(uri), Ok(method)) = (
        format!("http://{endpoint}{target}").parse::<http::Uri>(),
        Method::from_bytes(method.as_bytes()),
    ) else {
        return;
    };
    let mut headers = headers.clone();
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
    *copy.method_mut() = method;
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
