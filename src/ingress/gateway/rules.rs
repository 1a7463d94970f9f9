//! PURE: one HTTPRoute's rules compiled into matches, filters and weighted backends, with what
//! its status must say about its references and its unusable rules.
//!
//! A rule that cannot be implemented (an unsupported filter, a bad regular expression, a
//! ReplacePrefixMatch without a PathPrefix match, a bad timeout) stays in the table and
//! answers 500, so that its requests never fall through to another rule; the route reports
//! it (`PartiallyInvalid`, or not `Accepted` when every rule is unusable). A backendRef that
//! cannot be resolved keeps its weight and its share of requests answers 500.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{Method, StatusCode};
use regex::Regex;

use super::refs::{permits, RefEnd};
use super::table::{
    Action, Backends, HeaderEdits, Mirror, PathRewrite, PathSpec, Redirect, Rule, Target, ValueTest, WeightedBackend,
};
use super::types::{
    HeaderFilter, HttpRoute, HttpRouteFilter, HttpRouteMatch, ObjectRef, PathModifier, ReferenceGrant, GROUP,
};
use crate::ingress::annotations::Settings;
use crate::ingress::objects::ObjectKey;
use crate::ingress::routes::{Backend, Route, ServiceLookup, Upstream};
use crate::ingress::upstream::DEFAULT_CONNECT_TIMEOUT;
use crate::model::{Protocol, ServiceKey};

/// Why a reference of a route does not resolve: the `ResolvedRefs` reason and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefProblem {
    pub reason: &'static str,
    pub message: String,
}

/// One match of a rule, before it joins a listener's table.
#[derive(Debug, Clone)]
pub struct CompiledMatch {
    pub path: PathSpec,
    pub method: Option<Method>,
    pub headers: Vec<(HeaderName, ValueTest)>,
    pub query: Vec<(String, ValueTest)>,
}

#[derive(Debug)]
pub struct CompiledRule {
    pub rule: Arc<Rule>,
    pub matches: Vec<CompiledMatch>,
}

/// A route's rules and what its status says about them.
#[derive(Debug, Default)]
pub struct CompiledRoute {
    pub rules: Vec<CompiledRule>,
    /// One message per unusable rule.
    pub invalid_rules: Vec<String>,
    /// References that do not resolve, in rule order.
    pub ref_problems: Vec<RefProblem>,
}

/// The name a route has in metrics and logs.
pub fn route_label(key: &ObjectKey) -> String {
    format!("httproute/{}/{}", key.0, key.1)
}

/// A Gateway API Duration (`1h`, `30s`, `500ms`, `1m30s`; at most 4 parts of 5 digits).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return None;
        };
        total += unit * u32::try_from(n).ok()?;
        rest = &rest[len..];
        parts += 1;
    }
    (parts > 0 && parts <= 4).then_some(total)
}

fn full_regex(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| format!("bad regular expression {pattern:?}: {e}"))
}

fn value_test(type_: Option<&str>, value: &str) -> Result<ValueTest, String> {
    match type_.unwrap_or("Exact") {
        "Exact" => Ok(ValueTest::Exact(value.to_string())),
        "RegularExpression" => full_regex(value).map(ValueTest::Regex),
        other => Err(format!("match type {other:?} is not supported")),
    }
}

fn compile_match(m: &HttpRouteMatch) -> Result<CompiledMatch, String> {
    let path = match &m.path {
        None => PathSpec::Prefix("/".into()),
        Some(p) => {
            let value = p.value.clone().unwrap_or_else(|| "/".into());
            match p.type_.as_deref().unwrap_or("PathPrefix") {
                "Exact" | "PathPrefix" if !value.starts_with('/') => {
                    return Err(format!("path {value:?} must start with /"));
                }
                "Exact" => PathSpec::Exact(value),
                "PathPrefix" => {
                    let t = value.trim_end_matches('/');
                    PathSpec::Prefix(if t.is_empty() { "/".into() } else { t.into() })
                }
                "RegularExpression" => PathSpec::Regex(full_regex(&value)?),
                other => return Err(format!("path match type {other:?} is not supported")),
            }
        }
    };
    let method = match &m.method {
        None => None,
        Some(name) => Some(Method::from_bytes(name.as_bytes()).map_err(|_| format!("bad method {name:?}"))?),
    };
    // Only the first entry of each header (case-insensitive) or query name counts.
    let mut headers: Vec<(HeaderName, ValueTest)> = Vec::new();
    for h in &m.headers {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| format!("bad header name {:?}", h.name))?;
        if headers.iter().all(|(n, _)| *n != name) {
            headers.push((name, value_test(h.type_.as_deref(), &h.value)?));
        }
    }
    let mut query: Vec<(String, ValueTest)> = Vec::new();
    for q in &m.query_params {
        if query.iter().all(|(n, _)| *n != q.name) {
            query.push((q.name.clone(), value_test(q.type_.as_deref(), &q.value)?));
        }
    }
    Ok(CompiledMatch {
        path,
        method,
        headers,
        query,
    })
}

fn header_edits(f: &HeaderFilter) -> Result<HeaderEdits, String> {
    let pair = |name: &str, value: &str| -> Result<(HeaderName, HeaderValue), String> {
        let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("bad header name {name:?}"))?;
        let v = HeaderValue::from_str(value).map_err(|_| format!("bad value for header {name:?}"))?;
        Ok((n, v))
    };
    Ok(HeaderEdits {
        set: f
            .set
            .iter()
            .map(|h| pair(&h.name, &h.value))
            .collect::<Result<_, _>>()?,
        add: f
            .add
            .iter()
            .map(|h| pair(&h.name, &h.value))
            .collect::<Result<_, _>>()?,
        remove: f
            .remove
            .iter()
            .map(|n| HeaderName::from_bytes(n.as_bytes()).map_err(|_| format!("bad header name {n:?}")))
            .collect::<Result<_, _>>()?,
    })
}

fn path_rewrite(p: &PathModifier, matches: &[CompiledMatch]) -> Result<PathRewrite, String> {
    match p.type_.as_str() {
        "ReplaceFullPath" => Ok(PathRewrite::Full(
            p.replace_full_path.clone().unwrap_or_else(|| "/".into()),
        )),
        "ReplacePrefixMatch" => {
            if matches.iter().any(|m| !matches!(m.path, PathSpec::Prefix(_))) {
                return Err("ReplacePrefixMatch needs PathPrefix matches".into());
            }
            Ok(PathRewrite::Prefix(p.replace_prefix_match.clone().unwrap_or_default()))
        }
        other => Err(format!("path modifier {other:?} is not supported")),
    }
}

/// Everything the rule-level and backend-level filters ask for.
#[derive(Default)]
struct Filters {
    request_headers: HeaderEdits,
    response_headers: HeaderEdits,
    redirect: Option<Redirect>,
    rewrite_host: Option<String>,
    rewrite_path: Option<PathRewrite>,
    mirrors: Vec<(ObjectRef, u64, u64)>,
}

fn compile_filters(
    filters: &[HttpRouteFilter],
    matches: &[CompiledMatch],
    backend_level: bool,
) -> Result<Filters, String> {
    let mut out = Filters::default();
    let mut seen: Vec<&str> = Vec::new();
    for f in filters {
        let t = f.type_.as_str();
        if t != "RequestMirror" && seen.contains(&t) {
            return Err(format!("filter {t} appears twice"));
        }
        seen.push(t);
        let missing = || format!("filter {t} without its {t} settings");
        match t {
            "RequestHeaderModifier" => {
                out.request_headers = header_edits(f.request_header_modifier.as_ref().ok_or_else(missing)?)?
            }
            "ResponseHeaderModifier" => {
                out.response_headers = header_edits(f.response_header_modifier.as_ref().ok_or_else(missing)?)?
            }
            "RequestRedirect" if !backend_level => {
                let r = f.request_redirect.as_ref().ok_or_else(missing)?;
                let code = match r.status_code.unwrap_or(302) {
                    c @ (301 | 302 | 303 | 307 | 308) => StatusCode::from_u16(c as u16).map_err(|e| e.to_string())?,
                    other => return Err(format!("redirect status code {other} is not supported")),
                };
                let port = match r.port {
                    None => None,
                    Some(p) => Some(
                        u16::try_from(p)
                            .ok()
                            .filter(|p| *p > 0)
                            .ok_or(format!("bad redirect port {p}"))?,
                    ),
                };
                out.redirect = Some(Redirect {
                    scheme: r.scheme.clone(),
                    hostname: r.hostname.clone(),
                    path: r.path.as_ref().map(|p| path_rewrite(p, matches)).transpose()?,
                    port,
                    code,
                });
            }
            "URLRewrite" if !backend_level => {
                let r = f.url_rewrite.as_ref().ok_or_else(missing)?;
                out.rewrite_host = r.hostname.clone();
                out.rewrite_path = r.path.as_ref().map(|p| path_rewrite(p, matches)).transpose()?;
            }
            "RequestMirror" => {
                let m = f.request_mirror.as_ref().ok_or_else(missing)?;
                let (num, den) = match (&m.fraction, m.percent) {
                    (Some(fr), _) => (fr.numerator, fr.denominator.unwrap_or(100)),
                    (None, Some(p)) => (p, 100),
                    (None, None) => (100, 100),
                };
                if num < 0 || den <= 0 || num > den {
                    return Err(format!("bad mirror fraction {num}/{den}"));
                }
                out.mirrors.push((m.backend_ref.clone(), num as u64, den as u64));
            }
            other => return Err(format!("filter {other} is not supported by kproxy")),
        }
    }
    if out.redirect.is_some() && (out.rewrite_host.is_some() || out.rewrite_path.is_some()) {
        return Err("RequestRedirect and URLRewrite cannot be combined".into());
    }
    Ok(out)
}

/// Resolves a backendRef (or a mirror's) of the route in `route_ns` to a Service port and its
/// ready endpoints.
pub fn resolve_backend(
    route_ns: &str,
    r: &ObjectRef,
    grants: &BTreeMap<ObjectKey, ReferenceGrant>,
    lookup: &dyn Fn(&ServiceKey) -> ServiceLookup,
) -> Result<Arc<Backend>, RefProblem> {
    let group = r.group.as_deref().unwrap_or("");
    let kind = r.kind.as_deref().unwrap_or("Service");
    if !group.is_empty() || kind != "Service" {
        return Err(RefProblem {
            reason: "InvalidKind",
            message: format!(
                "backendRef {:?}: kind {kind:?} of group {group:?} is not supported (only Services)",
                r.name
            ),
        });
    }
    let ns = r.namespace.as_deref().unwrap_or(route_ns);
    let from = RefEnd {
        group: GROUP,
        kind: "HTTPRoute",
        namespace: route_ns,
    };
    let to = RefEnd {
        group: "",
        kind: "Service",
        namespace: ns,
    };
    if !permits(grants, from, to, &r.name) {
        return Err(RefProblem {
            reason: "RefNotPermitted",
            message: format!(
                "backendRef Service {ns}/{}: no ReferenceGrant in {ns} allows it",
                r.name
            ),
        });
    }
    let key = ServiceKey::new(ns, r.name.clone());
    let not_found = |message: String| RefProblem {
        reason: "BackendNotFound",
        message,
    };
    let Some(port) = r.port.and_then(|p| u16::try_from(p).ok()) else {
        return Err(not_found(format!("backendRef Service {key}: a port is required")));
    };
    let upstream = match lookup(&key) {
        ServiceLookup::Missing => return Err(not_found(format!("Service {key} not found"))),
        ServiceLookup::ExternalName(_) => {
            // Gateway API: implementations SHOULD NOT follow ExternalName Services (CVE-2021-25740).
            return Err(not_found(format!(
                "Service {key} is an ExternalName Service, not supported as a backend"
            )));
        }
        ServiceLookup::Ports(state) => {
            let found = state
                .ports
                .iter()
                .find(|p| p.port.name.protocol == Protocol::Tcp && p.port.port == port);
            let Some(p) = found else {
                return Err(not_found(format!("Service {key} has no TCP port {port}")));
            };
            Upstream::Endpoints(
                p.endpoints
                    .iter()
                    .filter(|e| e.ready())
                    .map(|e| std::net::SocketAddr::new(e.ip, e.port))
                    .collect(),
            )
        }
    };
    Ok(Arc::new(Backend {
        service: key,
        port: port.to_string(),
        upstream,
    }))
}

fn route_to(label: &str, backend: Arc<Backend>, settings: &Arc<Settings>) -> Arc<Route> {
    Arc::new(Route {
        ingress: label.to_string(),
        backend,
        settings: settings.clone(),
        rewrite: None,
        host_tls: false,
        canary: None,
    })
}

/// Compiles every rule of `route`. Nothing here does I/O.
pub fn compile_route(
    key: &ObjectKey,
    route: &HttpRoute,
    grants: &BTreeMap<ObjectKey, ReferenceGrant>,
    lookup: &dyn Fn(&ServiceKey) -> ServiceLookup,
) -> CompiledRoute {
    let label = route_label(key);
    let mut out = CompiledRoute::default();
    let default_rule = [Default::default()];
    let rules = if route.spec.rules.is_empty() {
        &default_rule[..]
    } else {
        &route.spec.rules[..]
    };
    for (index, rule) in rules.iter().enumerate() {
        let name = rule
            .name
            .as_ref()
            .map_or_else(|| format!("rule {index}"), |n| format!("rule {index} ({n})"));
        let matches: Result<Vec<CompiledMatch>, String> = match rule.matches.as_deref() {
            None | Some([]) => compile_match(&HttpRouteMatch::default()).map(|m| vec![m]),
            Some(ms) => ms.iter().map(compile_match).collect(),
        };
        let compiled = matches.and_then(|matches| {
            let filters = compile_filters(&rule.filters, &matches, false)?;
            let timeout = |t: &Option<String>, what: &str| -> Result<Option<Duration>, String> {
                match t {
                    None => Ok(None),
                    Some(text) => match parse_duration(text) {
                        Some(d) if d.is_zero() => Ok(None),
                        Some(d) => Ok(Some(d)),
                        None => Err(format!("bad {what} timeout {text:?}")),
                    },
                }
            };
            let timeouts = rule.timeouts.clone().unwrap_or_default();
            let request = timeout(&timeouts.request, "request")?;
            let backend_request = timeout(&timeouts.backend_request, "backendRequest")?;
            if let (Some(r), Some(b)) = (request, backend_request) {
                if b > r {
                    return Err("the backendRequest timeout is longer than the request timeout".into());
                }
            }
            let settings = Arc::new(Settings {
                ssl_redirect: false,
                read_timeout: backend_request,
                connect_timeout: backend_request.map(|b| b.min(DEFAULT_CONNECT_TIMEOUT)),
                ..Settings::default()
            });
            let mut backends = Vec::new();
            for b in &rule.backend_refs {
                let bf = compile_filters(&b.filters, &matches, true)?;
                let weight = u64::try_from(b.weight.unwrap_or(1)).unwrap_or(0);
                let target = match resolve_backend(&key.0, &b.target, grants, lookup) {
                    Ok(backend) => Target::Route(route_to(&label, backend, &settings)),
                    Err(p) => {
                        let why = p.message.clone();
                        out.ref_problems.push(p);
                        Target::Invalid(why)
                    }
                };
                backends.push(WeightedBackend {
                    weight,
                    target,
                    request_headers: bf.request_headers,
                    response_headers: bf.response_headers,
                });
            }
            let mut mirrors = Vec::new();
            for (r, numerator, denominator) in &filters.mirrors {
                match resolve_backend(&key.0, r, grants, lookup) {
                    Ok(backend) => mirrors.push(Mirror {
                        route: route_to(&label, backend, &settings),
                        numerator: *numerator,
                        denominator: *denominator,
                    }),
                    Err(p) => out.ref_problems.push(RefProblem {
                        reason: p.reason,
                        message: format!("RequestMirror: {}", p.message),
                    }),
                }
            }
            let action = match filters.redirect {
                Some(r) => Action::Redirect(r),
                None if backends.is_empty() => Action::Fail(format!("{label} {name} has no backendRefs")),
                None => {
                    let b = Backends::new(backends);
                    if b.list.is_empty() {
                        Action::Fail(format!("{label} {name}: every backendRef has weight 0"))
                    } else {
                        Action::Backends(b)
                    }
                }
            };
            Ok((
                matches,
                Rule {
                    route: label.clone(),
                    request_headers: filters.request_headers,
                    response_headers: filters.response_headers,
                    rewrite_host: filters.rewrite_host,
                    rewrite_path: filters.rewrite_path,
                    mirrors,
                    request_timeout: request,
                    action,
                },
            ))
        });
        match compiled {
            Ok((matches, rule)) => out.rules.push(CompiledRule {
                rule: Arc::new(rule),
                matches,
            }),
            Err(why) => {
                out.invalid_rules.push(format!("{name}: {why}"));
                // Still in the table: its requests answer 500 rather than reach another rule
                // (a match that does not compile cannot match anything).
                let matches: Vec<CompiledMatch> = match rule.matches.as_deref() {
                    None | Some([]) => compile_match(&HttpRouteMatch::default()).into_iter().collect(),
                    Some(ms) => ms.iter().filter_map(|m| compile_match(m).ok()).collect(),
                };
                if matches.is_empty() {
                    continue;
                }
                out.rules.push(CompiledRule {
                    rule: Arc::new(Rule {
                        route: label.clone(),
                        request_headers: HeaderEdits::default(),
                        response_headers: HeaderEdits::default(),
                        rewrite_host: None,
                        rewrite_path: None,
                        mirrors: vec![],
                        request_timeout: None,
                        action: Action::Fail(format!("{label} {name}: {why}")),
                    }),
                    matches,
                });
            }
        }
    }
    out
}
