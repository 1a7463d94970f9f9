//! PURE: the Gateway API half of the route table, and the matcher that picks a rule for a
//! request, as the Gateway API specifies it:
//!
//! - the listener port first; on a port, the one listener whose `hostname` matches the
//!   request's host most specifically (exact, then the wildcard with the most labels, then a
//!   listener without hostname), and only that listener's routes ("listener isolation");
//! - within the listener, the routes' effective hostnames the same way (exact, longest
//!   wildcard, none): no fall-through to a less specific hostname;
//! - then the first match in precedence order: `Exact` path, `RegularExpression` path (longer
//!   pattern first; the spec leaves their rank to implementations), `PathPrefix` with more
//!   characters; then a method match, more header matches, more query matches; then the
//!   oldest route, its `namespace/name`, its rule and match order.
//!
//! Gateway API wildcards (`*.example.com`) match one or more labels, unlike Ingress's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use regex::Regex;

use crate::ingress::routes::{RequestView, Route};

/// How specifically a hostname pattern matched a host; greater is more specific.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Specificity {
    /// A pattern without hostname: every host.
    Any,
    /// `*.suffix`: the number of labels of the suffix.
    Wildcard(usize),
    /// The host itself.
    Exact,
}

/// Whether the Gateway API hostname `pattern` (exact or `*.suffix`, lowercase) covers `host`.
pub fn hostname_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .and_then(|head| head.strip_suffix('.'))
            .is_some_and(|head| !head.is_empty()),
        None => pattern == host,
    }
}

/// The hostnames two patterns have in common, as the more specific pattern (Gateway API's
/// listener and route hostname intersection); `None` when they have none. `None` for the
/// listener means it has no hostname, which every route hostname intersects.
pub fn intersect(listener: Option<&str>, route: &str) -> Option<String> {
    let Some(listener) = listener else {
        return Some(route.to_string());
    };
    let covered_by = |narrow: &str, wide: &str| match (narrow.strip_prefix("*."), wide.strip_prefix("*.")) {
        (_, None) => narrow == wide,
        (None, Some(_)) => hostname_matches(wide, narrow),
        (Some(n), Some(w)) => n == w || n.ends_with(&format!(".{w}")),
    };
    if covered_by(route, listener) {
        Some(route.to_string())
    } else if covered_by(listener, route) {
        Some(listener.to_string())
    } else {
        None
    }
}

/// Values keyed by hostname pattern, found by the most specific match.
#[derive(Debug, Clone)]
pub struct HostIndex<T> {
    exact: HashMap<String, T>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, T>,
    any: Option<T>,
}

impl<T> Default for HostIndex<T> {
    fn default() -> Self {
        HostIndex {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            any: None,
        }
    }
}

impl<T> HostIndex<T> {
    /// The value for `pattern` (`None`: no hostname), created with `make` when absent.
    pub fn entry(&mut self, pattern: Option<&str>, make: impl FnOnce() -> T) -> &mut T {
        match pattern {
            None => self.any.get_or_insert_with(make),
            Some(p) => match p.strip_prefix("*.") {
                Some(suffix) => self.wildcard.entry(suffix.to_string()).or_insert_with(make),
                None => self.exact.entry(p.to_string()).or_insert_with(make),
            },
        }
    }

    /// The most specific value for `host` (lowercase, without port).
    pub fn get(&self, host: &str) -> Option<(&T, Specificity)> {
        if let Some(v) = self.exact.get(host) {
            return Some((v, Specificity::Exact));
        }
        if !self.wildcard.is_empty() {
            // Left to right: the first suffix found is the longest.
            let mut rest = host;
            while let Some((_, suffix)) = rest.split_once('.') {
                if let Some(v) = self.wildcard.get(suffix) {
                    return Some((v, Specificity::Wildcard(suffix.split('.').count())));
                }
                rest = suffix;
            }
        }
        self.any.as_ref().map(|v| (v, Specificity::Any))
    }
}

/// An HTTPRoute path match.
#[derive(Debug, Clone)]
pub enum PathSpec {
    Exact(String),
    /// Element-wise prefix, without trailing `/` (except `/` itself).
    Prefix(String),
    /// Matches the whole path.
    Regex(Regex),
}

impl PathSpec {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathSpec::Exact(p) => path == p,
            PathSpec::Prefix(p) => {
                p == "/" || (path.starts_with(p.as_str()) && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
            }
            PathSpec::Regex(r) => r.is_match(path),
        }
    }

    /// Precedence: Exact first, then regular expressions, then prefixes; longer first.
    pub fn rank(&self) -> (u8, std::cmp::Reverse<usize>) {
        match self {
            PathSpec::Exact(p) => (0, std::cmp::Reverse(p.len())),
            PathSpec::Regex(r) => (1, std::cmp::Reverse(r.as_str().len())),
            PathSpec::Prefix(p) => (2, std::cmp::Reverse(p.len())),
        }
    }
}

/// A header or query parameter value test.
#[derive(Debug, Clone)]
pub enum ValueTest {
    Exact(String),
    /// Matches the whole value.
    Regex(Regex),
}

impl ValueTest {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            ValueTest::Exact(v) => v == value,
            ValueTest::Regex(r) => r.is_match(value),
        }
    }
}

/// Header edits of a RequestHeaderModifier or ResponseHeaderModifier filter.
#[derive(Debug, Clone, Default)]
pub struct HeaderEdits {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// `set` replaces every value; `add` appends to the existing value, comma-separated, as
    /// one header (what the conformance suite expects backends to see); `remove` drops.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            let joined = {
                let existing: Vec<&[u8]> = headers.get_all(name).iter().map(HeaderValue::as_bytes).collect();
                if existing.is_empty() {
                    None
                } else {
                    let mut v = existing.join(&b","[..]);
                    v.push(b',');
                    v.extend_from_slice(value.as_bytes());
                    HeaderValue::from_bytes(&v).ok()
                }
            };
            headers.insert(name.clone(), joined.unwrap_or_else(|| value.clone()));
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// A path change of a URLRewrite or RequestRedirect filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRewrite {
    Full(String),
    /// Replaces the matched `PathPrefix`.
    Prefix(String),
}

impl PathRewrite {
    /// The new path for `path`, which matched `matched` (the rule's PathPrefix, normalised).
    pub fn apply(&self, path: &str, matched: &PathSpec) -> String {
        match self {
            PathRewrite::Full(p) => p.clone(),
            PathRewrite::Prefix(replacement) => {
                let prefix = match matched {
                    PathSpec::Prefix(p) if p != "/" => p.as_str(),
                    _ => "",
                };
                let rest = path.get(prefix.len()..).unwrap_or_default();
                let mut out = replacement.trim_end_matches('/').to_string();
                if !rest.is_empty() && !rest.starts_with('/') {
                    out.push('/');
                }
                out.push_str(rest);
                if out.is_empty() {
                    out.push('/');
                }
                out
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathRewrite>,
    pub port: Option<u16>,
    pub code: StatusCode,
}

impl Redirect {
    /// The `Location` for a request to `host` (without port) and `path`/`query` that arrived on
    /// a listener of `port` (`https`: an HTTPS listener) and matched `matched`. The port is
    /// the filter's, else the scheme's well-known port when the filter sets a scheme, else the
    /// listener's; it is left out when it is the scheme's well-known one.
    pub fn location(
        &self,
        host: &str,
        path: &str,
        query: Option<&str>,
        port: u16,
        https: bool,
        matched: &PathSpec,
    ) -> String {
        let scheme = self
            .scheme
            .clone()
            .unwrap_or_else(|| if https { "https".into() } else { "http".into() });
        let well_known = match scheme.as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        };
        let port = match (self.port, &self.scheme) {
            (Some(p), _) => p,
            (None, Some(_)) => well_known.unwrap_or(port),
            (None, None) => port,
        };
        let host = self.hostname.as_deref().unwrap_or(host);
        let path = match &self.path {
            Some(p) => p.apply(path, matched),
            None => path.to_string(),
        };
        let authority = if Some(port) == well_known {
            host.to_string()
        } else if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        match query {
            Some(q) => format!("{scheme}://{authority}{path}?{q}"),
            None => format!("{scheme}://{authority}{path}"),
        }
    }
}

/// Where a backendRef sends, or why it cannot (its share of requests answers 500).
#[derive(Debug, Clone)]
pub enum Target {
    Route(Arc<Route>),
    Invalid(String),
}

#[derive(Debug, Clone)]
pub struct WeightedBackend {
    pub weight: u64,
    pub target: Target,
    /// The backendRef's own filters (HTTPRouteBackendRequestHeaderModification).
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
}

/// Weighted backends of a rule (weight 0 excluded at build time).
#[derive(Debug)]
pub struct Backends {
    pub list: Vec<WeightedBackend>,
    total: u64,
    next: AtomicU64,
}

impl Backends {
    pub fn new(list: Vec<WeightedBackend>) -> Backends {
        let list: Vec<WeightedBackend> = list.into_iter().filter(|b| b.weight > 0).collect();
        Backends {
            total: list.iter().map(|b| b.weight).sum(),
            list,
            next: AtomicU64::new(0),
        }
    }

    /// The backend for the next request: a weighted choice, `None` when every weight is 0.
    /// A counter mixed with splitmix64 spreads the choices evenly without a shared RNG.
    pub fn pick(&self) -> Option<&WeightedBackend> {
        if self.total == 0 {
            return None;
        }
        if self.list.len() == 1 {
            return self.list.first();
        }
        let mut z = self
            .next
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let mut point = (z ^ (z >> 31)) % self.total;
        for b in &self.list {
            if point < b.weight {
                return Some(b);
            }
            point -= b.weight;
        }
        self.list.last()
    }
}

/// What a matched rule does.
#[derive(Debug)]
pub enum Action {
    Redirect(Redirect),
    Backends(Backends),
    /// The rule forwards nowhere: no backendRefs, every weight 0, or the rule is unusable
    /// (the reason is in the route's status). Answers 500.
    Fail(String),
}

/// A copy of matching requests, sent to another backend; its answer is ignored.
#[derive(Debug, Clone)]
pub struct Mirror {
    pub route: Arc<Route>,
    /// Share of requests mirrored: `numerator / denominator`.
    pub numerator: u64,
    pub denominator: u64,
}

/// One HTTPRoute rule, compiled.
#[derive(Debug)]
pub struct Rule {
    /// `httproute/namespace/name`, the route's name in metrics and logs.
    pub route: String,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    pub rewrite_host: Option<String>,
    pub rewrite_path: Option<PathRewrite>,
    pub mirrors: Vec<Mirror>,
    /// `timeouts.request`: until the response head, else 504.
    pub request_timeout: Option<Duration>,
    pub action: Action,
}

/// One HTTPRoute match, with the rule it selects.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: PathSpec,
    pub method: Option<Method>,
    pub headers: Vec<(HeaderName, ValueTest)>,
    pub query: Vec<(String, ValueTest)>,
    pub rule: Arc<Rule>,
}

/// The first value of query parameter `name` in `query`, percent-decoded.
fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .find(|(k, _)| percent_decode(k) == name)
        .map(|(_, v)| percent_decode(v))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|b| hex(*b)),
            bytes.get(i + 2).and_then(|b| hex(*b)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.extend(u8::try_from(h * 16 + l));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Entry {
    /// Whether a request matches; `headers` is the request's, whatever protocol carried it.
    pub fn matches(&self, method: &str, path: &str, query: Option<&str>, headers: &dyn RequestView) -> bool {
        if self.method.as_ref().is_some_and(|m| m.as_str() != method) || !self.path.matches(path) {
            return false;
        }
        let header_ok =
            |(name, test): &(HeaderName, ValueTest)| headers.joined(name.as_str()).is_some_and(|v| test.matches(&v));
        let query_ok = |(name, test): &(String, ValueTest)| {
            query
                .and_then(|q| query_param(q, name))
                .is_some_and(|v| test.matches(&v))
        };
        self.headers.iter().all(header_ok) && self.query.iter().all(query_ok)
    }
}

/// The routes of one listener hostname on one port (several Gateways' listeners with the same
/// port and hostname share it: kproxy serves every Gateway on the same node addresses).
#[derive(Debug, Clone, Default)]
pub struct ListenerRoutes {
    /// Effective hostname -> entries in precedence order.
    pub vhosts: HostIndex<Vec<Entry>>,
}

impl ListenerRoutes {
    /// The first entry matching the request, `None` for 404.
    pub fn find(
        &self,
        host: &str,
        method: &str,
        path: &str,
        query: Option<&str>,
        headers: &dyn RequestView,
    ) -> Option<&Entry> {
        let (entries, _) = self.vhosts.get(host)?;
        entries.iter().find(|e| e.matches(method, path, query, headers))
    }
}

#[derive(Debug, Clone, Default)]
pub struct PortRoutes {
    pub https: bool,
    pub listeners: HostIndex<Arc<ListenerRoutes>>,
}

/// Every Gateway API route kproxy serves, by listener port.
#[derive(Debug, Clone, Default)]
pub struct GatewayRoutes {
    pub ports: HashMap<u16, PortRoutes>,
    /// The Ingress listeners' ports: requests on other ports are never routed by Ingresses.
    pub ingress_ports: Vec<u16>,
}

impl GatewayRoutes {
    /// The listener for a request on `port` to `host` (lowercase, no port), and how
    /// specifically its hostname matched.
    pub fn listener(&self, port: u16, host: &str) -> Option<(&ListenerRoutes, Specificity, bool)> {
        let p = self.ports.get(&port)?;
        p.listeners.get(host).map(|(l, s)| (l.as_ref(), s, p.https))
    }

    pub fn is_ingress_port(&self, port: u16) -> bool {
        self.ingress_ports.contains(&port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_any_number_of_labels_and_intersect_as_the_spec_says() {
        assert!(hostname_matches("*.wildcard.io", "foo.wildcard.io"));
        assert!(hostname_matches("*.wildcard.io", "foo.bar.wildcard.io"));
        assert!(!hostname_matches("*.wildcard.io", "wildcard.io"));
        assert!(!hostname_matches("*.wildcard.io", "xwildcard.io"));
        let i = |l: Option<&str>, r: &str| intersect(l, r);
        assert_eq!(i(None, "a.com").as_deref(), Some("a.com"));
        assert_eq!(
            i(Some("very.specific.com"), "*.specific.com").as_deref(),
            Some("very.specific.com")
        );
        assert_eq!(
            i(Some("*.wildcard.io"), "foo.bar.wildcard.io").as_deref(),
            Some("foo.bar.wildcard.io")
        );
        assert_eq!(i(Some("*.wildcard.io"), "wildcard.io"), None);
        assert_eq!(
            i(Some("*.example.com"), "*.foo.example.com").as_deref(),
            Some("*.foo.example.com")
        );
        assert_eq!(
            i(Some("*.foo.example.com"), "*.example.com").as_deref(),
            Some("*.foo.example.com")
        );
        assert_eq!(i(Some("*.a.com"), "*.b.com"), None);
        assert_eq!(i(Some("x.com"), "y.com"), None);
    }

    #[test]
    fn host_index_prefers_exact_then_longest_wildcard_then_any() {
        let mut idx: HostIndex<&str> = HostIndex::default();
        *idx.entry(Some("bar.com"), || "") = "listener-1";
        *idx.entry(Some("foo.bar.com"), || "") = "listener-2";
        *idx.entry(Some("*.bar.com"), || "") = "listener-3";
        *idx.entry(Some("*.foo.bar.com"), || "") = "listener-4";
        *idx.entry(None, || "") = "any";
        let get = |h: &str| idx.get(h).map(|(v, _)| *v);
        assert_eq!(get("bar.com"), Some("listener-1"));
        assert_eq!(get("foo.bar.com"), Some("listener-2"));
        assert_eq!(get("baz.bar.com"), Some("listener-3"));
        assert_eq!(get("multiple.prefixes.bar.com"), Some("listener-3"));
        assert_eq!(get("a.foo.bar.com"), Some("listener-4"));
        assert_eq!(get("foo.com"), Some("any"));
        assert_eq!(idx.get("a.foo.bar.com").map(|(_, s)| s), Some(Specificity::Wildcard(3)));
    }

    #[test]
    fn prefix_rewrites_follow_the_spec_table() {
        let cases = [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            ("/anything", "/", "/prefix", "/prefix/anything"),
        ];
        for (path, prefix, replacement, want) in cases {
            let p = prefix.trim_end_matches('/');
            let matched = PathSpec::Prefix(if p.is_empty() { "/".into() } else { p.into() });
            let got = PathRewrite::Prefix(replacement.into()).apply(path, &matched);
            assert_eq!(got, want, "{path} prefix {prefix} -> {replacement}");
        }
    }

    #[test]
    fn redirect_ports_are_derived_and_well_known_ones_omitted() {
        let r = |scheme: Option<&str>, port: Option<u16>| Redirect {
            scheme: scheme.map(str::to_string),
            hostname: None,
            path: None,
            port,
            code: StatusCode::FOUND,
        };
        let any = PathSpec::Prefix("/".into());
        assert_eq!(
            r(None, None).location("h", "/p", Some("q=1"), 80, false, &any),
            "http://h/p?q=1"
        );
        assert_eq!(
            r(None, None).location("h", "/p", None, 8080, false, &any),
            "http://h:8080/p"
        );
        assert_eq!(
            r(Some("https"), None).location("h", "/p", None, 8080, false, &any),
            "https://h/p"
        );
        assert_eq!(
            r(None, Some(8443)).location("h", "/", None, 80, false, &any),
            "http://h:8443/"
        );
        assert_eq!(
            r(Some("https"), Some(443)).location("h", "/", None, 80, false, &any),
            "https://h/"
        );
        assert_eq!(r(None, None).location("h", "/", None, 443, true, &any), "https://h/");
    }

    #[test]
    fn add_appends_to_the_existing_value_set_replaces_remove_drops() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-s", HeaderValue::from_static("old"));
        h.insert("x-r", HeaderValue::from_static("gone"));
        let edits = HeaderEdits {
            set: vec![(HeaderName::from_static("x-s"), HeaderValue::from_static("new"))],
            add: vec![
                (HeaderName::from_static("x-a"), HeaderValue::from_static("2")),
                (HeaderName::from_static("x-n"), HeaderValue::from_static("3")),
            ],
            remove: vec![HeaderName::from_static("x-r")],
        };
        edits.apply(&mut h);
        assert_eq!(h["x-a"], "1,2");
        assert_eq!(h["x-n"], "3");
        assert_eq!(h["x-s"], "new");
        assert!(!h.contains_key("x-r"));
    }

    #[test]
    fn weighted_picks_follow_weights() {
        let backend = |w: u64, name: &str| WeightedBackend {
            weight: w,
            target: Target::Invalid(name.into()),
            request_headers: HeaderEdits::default(),
            response_headers: HeaderEdits::default(),
        };
        let b = Backends::new(vec![backend(70, "a"), backend(30, "b"), backend(0, "c")]);
        let mut counts = HashMap::new();
        for _ in 0..10_000 {
            let Target::Invalid(name) = &b.pick().unwrap().target else {
                unreachable!()
            };
            *counts.entry(name.clone()).or_insert(0) += 1;
        }
        assert!((6_700..7_300).contains(&counts["a"]), "{counts:?}");
        assert!(!counts.contains_key("c"), "weight 0 never picked");
        assert!(Backends::new(vec![backend(0, "z")]).pick().is_none());
    }

    #[test]
    fn query_params_are_decoded_and_the_first_value_counts() {
        assert_eq!(
            query_param("a=1&animal=whale&animal=dolphin", "animal").as_deref(),
            Some("whale")
        );
        assert_eq!(query_param("q=a%20b", "q").as_deref(), Some("a b"));
        assert_eq!(query_param("x", "x").as_deref(), Some(""));
        assert_eq!(query_param("x=1", "y"), None);
    }
}
