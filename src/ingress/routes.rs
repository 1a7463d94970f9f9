//! PURE: Ingresses, Services and EndpointSlices in, a route table out; and the matcher that
//! picks a route for a request's host and path.
//!
//! Ingress v1 semantics as the API documents them:
//! - hosts are exact, or `*.example.com` matching exactly one more label; a rule without host
//!   matches every host. An exact host wins over a wildcard, a wildcard over no host; there is
//!   no fall-through from a more specific host to a less specific one (ingress-nginx behaves so).
//! - `Exact` paths match the whole path, case-sensitively; `Prefix` paths match element-wise on
//!   `/`-separated segments (`/foo` matches `/foo` and `/foo/bar`, not `/foobar`; a trailing `/`
//!   on the rule is ignored); `ImplementationSpecific` is `Prefix` in kproxy, or a regular
//!   expression anchored at the start (case-insensitive, as in ingress-nginx) under `use-regex`.
//! - the longest path wins, `Exact` before `Prefix` at equal length.
//! - rules for the same host merge across Ingresses; the same host, path and pathType in two
//!   Ingresses is a conflict that the oldest Ingress (creationTimestamp, then namespace/name) wins.
//! - an Ingress's `spec.defaultBackend` serves its hosts' unmatched paths, and, from the oldest
//!   Ingress that has one, requests that match no host; everything else is a 404.
//!
//! Gateway API routes join the same table ([`RouteTable::gateway`], built by
//! [`super::gateway::build`]): on a port both serve, a request goes to whichever matches its
//! host more specifically (exact, then wildcard, then any host), the Ingress routes on a tie.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderMap;
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend, IngressClass};
use regex::Regex;

use super::annotations::{self, Canary, Settings};
use super::gateway::build::{build_gateway, GatewayConfig, Listen};
use super::gateway::status::StatusReport;
use super::gateway::table::{GatewayRoutes, Specificity};
use super::objects::{IngressObjects, ObjectKey};
use crate::model::{Protocol, ServiceKey, ServiceState};

/// kproxy's controller name, matched against `IngressClass.spec.controller`.
pub const CONTROLLER_NAME: &str = "kproxy.io/ingress-controller";
/// An IngressClass with this annotation set to "true" claims Ingresses that name no class.
pub const DEFAULT_CLASS_ANNOTATION: &str = "ingressclass.kubernetes.io/is-default-class";
/// The class annotation that predates `spec.ingressClassName`; still honoured.
pub const LEGACY_CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";

/// Which Ingresses are kproxy's.
#[derive(Debug, Clone)]
pub struct ClassConfig {
    /// `--ingress-class`: Ingresses naming this class are claimed even without an IngressClass object.
    pub class: String,
}

/// What a Service name resolves to, as the store knows it.
#[derive(Debug, Clone)]
pub enum ServiceLookup {
    Ports(ServiceState),
    ExternalName(String),
    Missing,
}

/// Where a backend's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// Ready endpoints (pod address and target port); empty means 503.
    Endpoints(Vec<SocketAddr>),
    /// An ExternalName Service: the DNS name, resolved per connection, and the port.
    ExternalName { host: String, port: u16 },
}

/// A Service port an Ingress path sends to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub service: ServiceKey,
    /// The Service port, as the Ingress names it (number or name).
    pub port: String,
    pub upstream: Upstream,
}

/// How a rule's path is compared with a request's.
#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// Normalised: no trailing `/` (except the root `/` itself).
    Prefix(String),
    /// Shared by every rule of the same pattern in a table (see [`Regexes`]).
    Regex(Arc<Regex>),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => {
                p == "/" || (path.starts_with(p.as_str()) && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
            }
            PathMatch::Regex(r) => r.is_match(path),
        }
    }

    /// Precedence key: longer first, then Exact before the others.
    fn rank(&self) -> (usize, u8) {
        match self {
            PathMatch::Exact(p) => (p.len(), 0),
            PathMatch::Prefix(p) => (p.len(), 1),
            PathMatch::Regex(r) => (r.as_str().len().saturating_sub(REGEX_WRAP.len()), 1),
        }
    }

    /// A printable form: `Exact /foo`, `Prefix /foo`, `Regex /foo.*`.
    fn describe(&self) -> String {
        match self {
            PathMatch::Exact(p) => format!("Exact {p}"),
            PathMatch::Prefix(p) => format!("Prefix {p}"),
            PathMatch::Regex(r) => format!("Regex {}", &r.as_str()[REGEX_WRAP.len()..]),
        }
    }
}

/// Prefix added to user regexes: anchored at the start, case-insensitive (as ingress-nginx's `~*`).
const REGEX_WRAP: &str = "(?i)^";

/// The regexes of one table build, compiled once per pattern: thousands of Ingresses with
/// `rewrite-target` mostly share a handful of paths, and a compiled regex is about 1.1 KiB
/// (a clone, with its own match cache pool, about 0.4 KiB), so rules share one.
#[derive(Default)]
struct Regexes(HashMap<String, Arc<Regex>>);

impl Regexes {
    /// `raw` anchored and case-insensitive ([`REGEX_WRAP`]).
    fn get(&mut self, raw: &str) -> Result<Arc<Regex>, regex::Error> {
        if let Some(r) = self.0.get(raw) {
            return Ok(r.clone());
        }
        let r = Arc::new(Regex::new(&format!("{REGEX_WRAP}{raw}"))?);
        self.0.insert(raw.to_string(), r.clone());
        Ok(r)
    }
}

/// What a matched request is served by.
#[derive(Debug, Clone)]
pub struct Route {
    /// The Ingress the rule came from, `namespace/name`.
    pub ingress: String,
    pub backend: Arc<Backend>,
    pub settings: Arc<Settings>,
    /// `rewrite-target`: the path regex whose match is replaced (shared, see [`Regexes`]).
    pub rewrite: Option<Arc<Regex>>,
    /// The request's host has TLS configured (HTTP requests are redirected unless `ssl-redirect: "false"`).
    pub host_tls: bool,
    pub canary: Option<Arc<CanaryRoute>>,
}

/// The canary half of a route.
#[derive(Debug, Clone)]
pub struct CanaryRoute {
    pub canary: Canary,
    pub route: Route,
}

impl Route {
    /// The path to send upstream (`path` unchanged without `rewrite-target`). As nginx's
    /// `rewrite`, a match replaces the whole path; `$1`.. are the regex's captures.
    pub fn rewrite_path(&self, path: &str) -> String {
        let (Some(re), Some(target)) = (&self.rewrite, &self.settings.rewrite_target) else {
            return path.to_string();
        };
        match re.captures(path) {
            Some(caps) => {
                let mut out = String::new();
                // `$1x` must read as capture 1 then `x`, as nginx reads it: use `${1}` for the regex crate.
                let target = expand_dollars(target);
                caps.expand(&target, &mut out);
                if out.is_empty() {
                    out.push('/');
                }
                out
            }
            None => path.to_string(),
        }
    }
}

fn expand_dollars(target: &str) -> String {
    let mut out = String::new();
    let mut chars = target.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
            let d = chars.next().unwrap_or('0');
            out.push_str(&format!("${{{d}}}"));
        } else if c == '$' {
            out.push_str("$$");
        } else {
            out.push(c);
        }
    }
    out
}

#[derive(Debug, Clone)]
struct PathRule {
    path: PathMatch,
    route: Arc<Route>,
}

/// The rules of one host (or of every host).
#[derive(Debug, Clone, Default)]
struct HostRules {
    rules: Vec<PathRule>,
    default: Option<Arc<Route>>,
}

impl HostRules {
    fn find(&self, path: &str) -> Option<&Arc<Route>> {
        self.rules
            .iter()
            .find(|r| r.path.matches(path))
            .map(|r| &r.route)
            .or(self.default.as_ref())
    }
}

/// A request's line as routing reads it, whatever protocol carried it (borrowed from hyper's
/// `Uri` for HTTP/2, from the parsed head in place for HTTP/1).
#[derive(Debug, Clone, Copy)]
pub struct RequestLine<'a> {
    /// As the client sent it (Host header or absolute-form authority), maybe with a port.
    pub host: &'a str,
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
}

/// A request's headers as routing reads them, whatever protocol carried them (hyper's
/// `HeaderMap` for HTTP/2, the parsed head in place for HTTP/1).
pub trait RequestView {
    /// The first value of a header.
    fn header(&self, name: &str) -> Option<&str>;
    /// A cookie's value, from any `Cookie` header.
    fn cookie(&self, name: &str) -> Option<&str>;
    /// Every value of a header joined with `,` (as one line would carry them); `None` when
    /// the request has none. Borrowed when there is one value.
    fn joined(&self, name: &str) -> Option<Cow<'_, str>>;
}

impl RequestView for HeaderMap {
    fn header(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(|v| v.to_str().ok())
    }
    fn cookie(&self, name: &str) -> Option<&str> {
        self.get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
    fn joined(&self, name: &str) -> Option<Cow<'_, str>> {
        join_values(self.get_all(name).iter().filter_map(|v| v.to_str().ok()))
    }
}

/// Values joined with `,`, without a copy for a single one.
pub fn join_values<'a>(mut values: impl Iterator<Item = &'a str>) -> Option<Cow<'a, str>> {
    let first = values.next()?;
    match values.next() {
        None => Some(Cow::Borrowed(first)),
        Some(second) => {
            let mut all = format!("{first},{second}");
            for v in values {
                all.push(',');
                all.push_str(v);
            }
            Some(Cow::Owned(all))
        }
    }
}

/// A certificate an Ingress or a Gateway listener asks for: the host (exact, `*.` wildcard, or
/// empty for every name and clients without SNI) and the Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsBinding {
    pub host: String,
    pub secret: ObjectKey,
    /// `*.` matches one or more labels (Gateway API), not exactly one (Ingress).
    pub suffix_match: bool,
}

/// Every route kproxy serves, ready to match requests.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// foldhash: looked up on every request; its keys come from Ingresses, never from requests.
    exact: HashMap<String, HostRules, foldhash::fast::RandomState>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, HostRules, foldhash::fast::RandomState>,
    any: HostRules,
    default: Option<Arc<Route>>,
    /// `spec.tls` of claimed Ingresses, oldest Ingress first.
    pub tls: Vec<TlsBinding>,
    /// The Ingresses served, `namespace/name`.
    pub ingresses: Vec<String>,
    /// Gateway API listeners and their routes.
    pub gateway: GatewayRoutes,
    /// What the elected kproxy writes to Gateway API objects' status.
    pub gateway_status: Arc<StatusReport>,
    /// The HTTPRoutes served, `namespace/name`.
    pub gateway_routes: Vec<String>,
}

/// Lowercase host without port or trailing dot.
pub fn normalize_host(host: &str) -> String {
    host_key(host).into_owned()
}

/// [`normalize_host`] without a copy when the host already is lowercase (the route lookup of
/// every request: no allocation).
pub fn host_key(host: &str) -> Cow<'_, str> {
    let host = host.trim();
    let without_port = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
            _ => host,
        }
    };
    let name = without_port.trim_end_matches('.');
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

/// Whether `pattern` (exact, or `*.suffix` for exactly one label) covers `host`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .and_then(|label| label.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        None => pattern == host,
    }
}

impl RouteTable {
    /// The route for a request, or `None` (404). `host` may carry a port; `path` has no query.
    pub fn route(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
        let host = host_key(host);
        if let Some(rules) = self.exact.get(host.as_ref()) {
            return rules.find(path);
        }
        if let Some((_, suffix)) = host.split_once('.') {
            if let Some(rules) = self.wildcard.get(suffix) {
                return rules.find(path);
            }
        }
        self.any.find(path).or(self.default.as_ref())
    }

    /// How specifically the Ingress routes match `host` (lowercase, no port): `None` when they
    /// would answer nothing for it.
    pub fn host_specificity(&self, host: &str) -> Option<Specificity> {
        if self.exact.contains_key(host) {
            return Some(Specificity::Exact);
        }
        if let Some((_, suffix)) = host.split_once('.') {
            if self.wildcard.contains_key(suffix) {
                return Some(Specificity::Wildcard(suffix.split('.').count()));
            }
        }
        (!self.any.rules.is_empty() || self.any.default.is_some() || self.default.is_some()).then_some(Specificity::Any)
    }

    /// Whether HTTPS is configured for `host` (for the HTTP to HTTPS redirect of default backends).
    pub fn host_has_tls(&self, host: &str) -> bool {
        let host = normalize_host(host);
        self.tls.iter().any(|t| host_matches(&t.host, &host))
    }
}

/// The result of [`build_routes`]: the table and one message per Ingress that was skipped or
/// partly ignored, each naming the Ingress.
#[derive(Debug, Default)]
pub struct Built {
    pub table: RouteTable,
    pub warnings: Vec<String>,
    /// Ports Gateway listeners need beyond the Ingress listeners', `true` for HTTPS.
    pub gateway_listen: Listen,
    /// Gateway listeners' certificates, by port.
    pub gateway_tls: BTreeMap<u16, Vec<TlsBinding>>,
}

/// Builds the whole table: the Ingress routes ([`build_routes`]) and the Gateway API ones.
pub fn build_table(
    objects: &IngressObjects,
    cfg: &ClassConfig,
    gateway: &GatewayConfig,
    lookup: &dyn Fn(&ServiceKey) -> ServiceLookup,
) -> Built {
    let mut built = build_routes(objects, cfg, lookup);
    let gw = build_gateway(&objects.gateway, &objects.secrets, lookup, gateway);
    built.table.gateway = gw.routes;
    built.table.gateway_status = gw.status;
    built.table.gateway_routes = gw.served;
    built.warnings.extend(gw.warnings);
    built.gateway_listen = gw.listen;
    built.gateway_tls = gw.tls;
    built
}

fn class_is_ours(ic: &IngressClass, cfg: &ClassConfig) -> bool {
    ic.metadata.name.as_deref() == Some(cfg.class.as_str())
        || ic.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(CONTROLLER_NAME)
}

/// Whether kproxy serves this Ingress: its class is `--ingress-class` or an IngressClass whose
/// controller is kproxy's; without a class, when one of kproxy's IngressClasses is the default.
pub fn claims(ing: &Ingress, classes: &BTreeMap<String, IngressClass>, cfg: &ClassConfig) -> bool {
    let class = ing
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.clone())
        .or_else(|| ing.metadata.annotations.as_ref()?.get(LEGACY_CLASS_ANNOTATION).cloned());
    match class {
        Some(c) => c == cfg.class || classes.get(&c).is_some_and(|ic| class_is_ours(ic, cfg)),
        None => classes.values().any(|ic| {
            class_is_ours(ic, cfg)
                && ic
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
                    .is_some_and(|v| v == "true")
        }),
    }
}

/// One rule's host (or "" for every host), path, `rewrite-target` regex and backend.
type ConvertedPath = (String, PathMatch, Option<Arc<Regex>>, Arc<Backend>);

/// One Ingress, converted: everything it routes, before merging.
struct Converted {
    name: String,
    settings: Arc<Settings>,
    /// (host or "" for every host, path, backend)
    paths: Vec<ConvertedPath>,
    default: Option<Arc<Backend>>,
    hosts: Vec<String>,
    tls: Vec<TlsBinding>,
}

fn resolve_backend(
    ns: &str,
    b: &IngressBackend,
    lookup: &dyn Fn(&ServiceKey) -> ServiceLookup,
) -> Result<Arc<Backend>, String> {
    let Some(svc) = &b.service else {
        return Err("resource backends are not supported".into());
    };
    let key = ServiceKey::new(ns, svc.name.clone());
    let port_ref = svc.port.as_ref();
    let number = port_ref.and_then(|p| p.number);
    let name = port_ref.and_then(|p| p.name.clone()).filter(|n| !n.is_empty());
    let port_desc = number.map(|n| n.to_string()).or(name.clone()).unwrap_or_default();
    let upstream = match lookup(&key) {
        ServiceLookup::Missing => return Err(format!("Service {key} not found")),
        ServiceLookup::ExternalName(host) => {
            let port = number
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| format!("ExternalName Service {key}: backend needs a port number"))?;
            Upstream::ExternalName { host, port }
        }
        ServiceLookup::Ports(state) => {
            let port = state.ports.iter().find(|p| {
                p.port.name.protocol == Protocol::Tcp
                    && match (&number, &name) {
                        (Some(n), _) => i32::from(p.port.port) == *n,
                        (None, Some(name)) => p.port.name.port == **name,
                        (None, None) => false,
                    }
            });
            let Some(port) = port else {
                return Err(format!("Service {key} has no TCP port {port_desc:?}"));
            };
            Upstream::Endpoints(
                port.endpoints
                    .iter()
                    .filter(|e| e.ready())
                    .map(|e| SocketAddr::new(e.ip, e.port))
                    .collect(),
            )
        }
    };
    Ok(Arc::new(Backend {
        service: key,
        port: port_desc,
        upstream,
    }))
}

fn convert_path(
    path: Option<&str>,
    path_type: &str,
    settings: &Settings,
    regexes: &mut Regexes,
) -> Result<PathMatch, String> {
    let raw = path.unwrap_or("/");
    let mut regex = |p: &str| {
        regexes
            .get(p)
            .map(PathMatch::Regex)
            .map_err(|e| format!("path {p:?}: bad regex: {e}"))
    };
    match path_type {
        "Exact" | "Prefix" if !raw.starts_with('/') => Err(format!("path {raw:?} must start with /")),
        "Exact" => Ok(PathMatch::Exact(raw.to_string())),
        "Prefix" if settings.use_regex => regex(raw),
        "Prefix" => Ok(PathMatch::Prefix(normalize_prefix(raw))),
        "ImplementationSpecific" if settings.use_regex => regex(raw),
        "ImplementationSpecific" if raw.starts_with('/') => Ok(PathMatch::Prefix(normalize_prefix(raw))),
        "ImplementationSpecific" => Err(format!("path {raw:?} must start with / (or set use-regex)")),
        other => Err(format!("unknown pathType {other:?}")),
    }
}

fn normalize_prefix(p: &str) -> String {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else {
        t.to_string()
    }
}

fn valid_host(h: &str) -> bool {
    let rest = h.strip_prefix("*.").unwrap_or(h);
    !rest.is_empty() && !rest.contains('*') && !rest.contains(':')
}

fn convert_ingress(
    ing: &Ingress,
    lookup: &dyn Fn(&ServiceKey) -> ServiceLookup,
    regexes: &mut Regexes,
    warnings: &mut Vec<String>,
) -> Option<Converted> {
    let ns = ing.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = format!("{ns}/{}", ing.metadata.name.clone().unwrap_or_default());
    let parsed = annotations::parse(&ing.metadata.annotations.clone().unwrap_or_default());
    if !parsed.unknown.is_empty() {
        warnings.push(format!(
            "Ingress {name}: annotations not implemented by kproxy, ignored: {}",
            parsed.unknown.join(", ")
        ));
    }
    for e in &parsed.errors {
        warnings.push(format!("Ingress {name}: {e}; using the default"));
    }
    let settings = Arc::new(parsed.settings);
    let fail = |warnings: &mut Vec<String>, why: String| {
        warnings.push(format!("Ingress {name}: {why}; skipped"));
        None
    };
    let spec = ing.spec.clone().unwrap_or_default();
    let mut out = Converted {
        name: name.clone(),
        settings: settings.clone(),
        paths: Vec::new(),
        default: None,
        hosts: Vec::new(),
        tls: Vec::new(),
    };
    if let Some(b) = &spec.default_backend {
        match resolve_backend(&ns, b, lookup) {
            Ok(b) => out.default = Some(b),
            Err(e) => return fail(warnings, format!("defaultBackend: {e}")),
        }
    }
    for rule in spec.rules.iter().flatten() {
        let host = rule.host.clone().unwrap_or_default().to_ascii_lowercase();
        if !host.is_empty() && !valid_host(&host) {
            return fail(warnings, format!("invalid host {host:?}"));
        }
        if !host.is_empty() && !out.hosts.contains(&host) {
            out.hosts.push(host.clone());
        }
        for p in rule.http.iter().flat_map(|h| h.paths.iter()) {
            let path = match convert_path(p.path.as_deref(), &p.path_type, &settings, regexes) {
                Ok(path) => path,
                Err(e) => return fail(warnings, e),
            };
            let rewrite = match &settings.rewrite_target {
                None => None,
                Some(_) => {
                    let raw = p.path.as_deref().unwrap_or("/");
                    match regexes.get(raw) {
                        Ok(r) => Some(r),
                        Err(e) => return fail(warnings, format!("path {raw:?}: bad regex for rewrite-target: {e}")),
                    }
                }
            };
            let backend = match resolve_backend(&ns, &p.backend, lookup) {
                Ok(b) => b,
                Err(e) => return fail(warnings, e),
            };
            out.paths.push((host.clone(), path, rewrite, backend));
        }
    }
    for t in spec.tls.iter().flatten() {
        let Some(secret) = t.secret_name.clone().filter(|s| !s.is_empty()) else {
            continue;
        };
        let hosts = match &t.hosts {
            Some(h) if !h.is_empty() => h.clone(),
            _ => out.hosts.clone(),
        };
        for host in hosts {
            out.tls.push(TlsBinding {
                host: host.to_ascii_lowercase(),
                secret: (ns.clone(), secret.clone()),
                suffix_match: false,
            });
        }
    }
    Some(out)
}

/// Builds the route table from every Ingress kproxy claims. `lookup` answers what a Service
/// is (the store's view); nothing here does I/O. Deterministic for the same input.
pub fn build_routes(
    objects: &IngressObjects,
    cfg: &ClassConfig,
    lookup: &dyn Fn(&ServiceKey) -> ServiceLookup,
) -> Built {
    let mut warnings = Vec::new();
    // Oldest first: the first to claim a host and path keeps it.
    let mut ingresses: Vec<&Ingress> = objects
        .ingresses
        .values()
        .filter(|i| claims(i, &objects.classes, cfg))
        .collect();
    ingresses.sort_by(|a, b| {
        let ka = (&a.metadata.creation_timestamp, &a.metadata.namespace, &a.metadata.name);
        let kb = (&b.metadata.creation_timestamp, &b.metadata.namespace, &b.metadata.name);
        ka.partial_cmp(&kb).unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut regexes = Regexes::default();
    let converted: Vec<Converted> = ingresses
        .iter()
        .filter_map(|i| convert_ingress(i, lookup, &mut regexes, &mut warnings))
        .collect();
    let mut table = RouteTable::default();
    for c in &converted {
        table.tls.extend(c.tls.iter().cloned());
    }
    let host_tls = |host: &str, tls: &[TlsBinding]| {
        !host.is_empty() && tls.iter().any(|t| t.host == host || host_matches(&t.host, host))
    };
    let route =
        |c: &Converted, host: &str, rewrite: Option<Arc<Regex>>, backend: &Arc<Backend>, tls: &[TlsBinding]| Route {
            ingress: c.name.clone(),
            backend: backend.clone(),
            settings: c.settings.clone(),
            rewrite,
            host_tls: host_tls(host, tls),
            canary: None,
        };
    // Merge: host -> rules in insertion (age) order, with who owns each (pathType, path).
    let mut hosts: BTreeMap<String, HostRules> = BTreeMap::new();
    let mut owners: HashMap<(String, String), String> = HashMap::new();
    let (canaries, mains): (Vec<&Converted>, Vec<&Converted>) =
        converted.iter().partition(|c| c.settings.canary.is_some());
    for c in &mains {
        for (host, path, rewrite, backend) in &c.paths {
            let id = (host.clone(), path.describe());
            if let Some(owner) = owners.get(&id) {
                warnings.push(format!(
                    "Ingress {}: host {:?} path {} is already served by the older Ingress {owner}; this rule is ignored",
                    c.name, host, id.1
                ));
                continue;
            }
            owners.insert(id, c.name.clone());
            hosts.entry(host.clone()).or_default().rules.push(PathRule {
                path: path.clone(),
                route: Arc::new(route(c, host, rewrite.clone(), backend, &table.tls)),
            });
        }
        if let Some(d) = &c.default {
            for host in &c.hosts {
                let rules = hosts.entry(host.clone()).or_default();
                if rules.default.is_none() {
                    rules.default = Some(Arc::new(route(c, host, None, d, &table.tls)));
                }
            }
            if table.default.is_none() {
                table.default = Some(Arc::new(route(c, "", None, d, &table.tls)));
            }
        }
        table.ingresses.push(c.name.clone());
    }
    for c in &canaries {
        let Some(canary) = c.settings.canary.clone() else {
            continue;
        };
        let mut attached = false;
        for (host, path, rewrite, backend) in &c.paths {
            let desc = path.describe();
            let Some(rule) = hosts
                .get_mut(host)
                .and_then(|h| h.rules.iter_mut().find(|r| r.path.describe() == desc))
            else {
                warnings.push(format!(
                    "Ingress {}: canary for host {host:?} path {desc} has no main Ingress with the same host and path; ignored",
                    c.name
                ));
                continue;
            };
            let mut main = (*rule.route).clone();
            main.canary = Some(Arc::new(CanaryRoute {
                canary: canary.clone(),
                route: route(c, host, rewrite.clone(), backend, &table.tls),
            }));
            rule.route = Arc::new(main);
            attached = true;
        }
        if attached {
            table.ingresses.push(c.name.clone());
        }
    }
    for (host, mut rules) in hosts {
        // Stable: at equal rank the older Ingress's rule stays first.
        rules.rules.sort_by_key(|r| {
            let (len, kind) = r.path.rank();
            (std::cmp::Reverse(len), kind)
        });
        if host.is_empty() {
            table.any = rules;
        } else if let Some(suffix) = host.strip_prefix("*.") {
            table.wildcard.insert(suffix.to_string(), rules);
        } else {
            table.exact.insert(host, rules);
        }
    }
    Built {
        table,
        warnings,
        ..Built::default()
    }
}

#[cfg(test)]
mod tests;
