//! PURE: every Gateway API object kproxy claims, turned into the Gateway half of the route
//! table, the ports to listen on, the certificates per port, and the statuses to report.
//! Deterministic for the same input; nothing here does I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::ingress::objects::TlsSecret;

use super::listeners::{model_gateway, GatewayModel, ListenerContext, NamespacePolicy, PortClaims};
use super::objects::GatewayObjects;
use super::refs::selector_matches;
use super::rules::{compile_route, CompiledRoute};
use super::status::{ClassReport, Cond, GatewayReport, ListenerReport, ParentReport, RouteReport, StatusReport};
use super::table::{intersect, Entry, GatewayRoutes, ListenerRoutes, PortRoutes};
use super::types::{HttpRoute, ParentRef, GROUP};
use super::CONTROLLER_NAME;
use crate::ingress::objects::ObjectKey;
use crate::ingress::routes::{ServiceLookup, TlsBinding};
use crate::model::ServiceKey;

/// What the Gateway side is built against, beside the objects.
#[derive(Debug, Clone, Default)]
pub struct GatewayConfig {
    /// The Ingress listeners' ports: Gateway listeners with the same port and protocol share them.
    pub ingress_http: Option<u16>,
    pub ingress_https: Option<u16>,
    /// Ports this node failed to listen on, with the error (reported as `PortUnavailable`).
    pub unavailable: BTreeMap<u16, String>,
}

/// A listener port kproxy must listen on (beyond the Ingress listeners').
pub type Listen = BTreeMap<u16, bool>;

#[derive(Debug, Default)]
pub struct GatewayBuilt {
    pub routes: GatewayRoutes,
    pub status: Arc<StatusReport>,
    /// Ports to listen on for Gateway listeners (not the Ingress ports), `true` for HTTPS.
    pub listen: Listen,
    /// Certificates per listener port, in the order listeners claim hostnames.
    pub tls: BTreeMap<u16, Vec<TlsBinding>>,
    /// One message per problem, naming the object.
    pub warnings: Vec<String>,
    /// The HTTPRoutes served (attached to at least one listener), `namespace/name`.
    pub served: Vec<String>,
}

/// Oldest first, then `namespace/name`: the order the spec gives ties.
fn age_key(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<i64> {
    meta.creation_timestamp.as_ref().map(|t| t.0.as_second())
}

/// A parentRef with the defaults the API gives it: group, kind and namespace filled in.
fn normalized(p: &ParentRef, route_ns: &str) -> ParentRef {
    ParentRef {
        group: Some(p.group.clone().unwrap_or_else(|| GROUP.into())),
        kind: Some(p.kind.clone().unwrap_or_else(|| "Gateway".into())),
        namespace: Some(p.namespace.clone().unwrap_or_else(|| route_ns.into())),
        ..p.clone()
    }
}

fn cond(type_: &'static str, r: Result<&'static str, (&'static str, String)>, good_message: &str) -> Cond {
    match r {
        Ok(reason) => Cond::new(type_, true, reason, good_message),
        Err((reason, message)) => Cond::new(type_, false, reason, &message),
    }
}

/// One attachment of a route to a listener: which listener, under which hostnames.
struct Attachment {
    gateway: usize,
    listener: usize,
    hostnames: Vec<Option<String>>,
}

/// The parent status of one parentRef, and where it attached.
fn attach(
    route_key: &ObjectKey,
    route: &HttpRoute,
    parent: &ParentRef,
    gw_index: usize,
    gw: &GatewayModel,
    objects: &GatewayObjects,
) -> (Result<&'static str, (&'static str, String)>, Vec<Attachment>) {
    if let Err((_, why)) = &gw.accepted {
        return (
            Err(("NoMatchingParent", format!("the Gateway is not accepted: {why}"))),
            vec![],
        );
    }
    let candidates: Vec<usize> = (0..gw.listeners.len())
        .filter(|&i| {
            let l = &gw.listeners[i];
            parent.section_name.as_ref().is_none_or(|s| *s == l.name)
                && parent.port.is_none_or(|p| i32::from(l.port) == p)
        })
        .collect();
    if candidates.is_empty() {
        return (
            Err((
                "NoMatchingParent",
                "no listener matches the parentRef's sectionName and port".into(),
            )),
            vec![],
        );
    }
    let route_ns = &route_key.0;
    let labels = objects.namespace_labels(route_ns);
    let allowed: Vec<usize> = candidates
        .into_iter()
        .filter(|&i| {
            let l = &gw.listeners[i];
            l.attachable()
                && l.takes_httproutes()
                && match &l.namespaces {
                    NamespacePolicy::Same => *route_ns == gw.key.0,
                    NamespacePolicy::All => true,
                    NamespacePolicy::Selector(s) => selector_matches(s, &labels),
                }
        })
        .collect();
    if allowed.is_empty() {
        return (
            Err((
                "NotAllowedByListeners",
                format!("no listener of the Gateway allows HTTPRoutes from namespace {route_ns}"),
            )),
            vec![],
        );
    }
    let route_hosts: Vec<String> = route
        .spec
        .hostnames
        .iter()
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
        .collect();
    let mut attachments = Vec::new();
    for i in allowed {
        let listener_host = gw.listeners[i].hostname.as_deref();
        let hostnames: Vec<Option<String>> = if route_hosts.is_empty() {
            vec![listener_host.map(str::to_string)]
        } else {
            let mut hs: Vec<Option<String>> = route_hosts
                .iter()
                .filter_map(|h| intersect(listener_host, h))
                .map(Some)
                .collect();
            hs.dedup();
            hs
        };
        if !hostnames.is_empty() {
            attachments.push(Attachment {
                gateway: gw_index,
                listener: i,
                hostnames,
            });
        }
    }
    if attachments.is_empty() {
        return (
            Err((
                "NoMatchingListenerHostname",
                "no hostname of the route intersects a listener's hostname".into(),
            )),
            vec![],
        );
    }
    (Ok("Accepted"), attachments)
}

/// Builds the Gateway side from every object kproxy claims. `lookup` answers what a Service is
/// (the store's view). Before every Gateway API kind is listed, nothing is built.
pub fn build_gateway(
    objects: &GatewayObjects,
    secrets: &BTreeMap<ObjectKey, TlsSecret>,
    lookup: &dyn Fn(&ServiceKey) -> ServiceLookup,
    cfg: &GatewayConfig,
) -> GatewayBuilt {
    let mut out = GatewayBuilt {
        routes: GatewayRoutes {
            ingress_ports: cfg.ingress_http.into_iter().chain(cfg.ingress_https).collect(),
            ..GatewayRoutes::default()
        },
        ..GatewayBuilt::default()
    };
    if !objects.is_ready() {
        return out;
    }
    let mut report = StatusReport {
        ready: true,
        ..StatusReport::default()
    };

    // GatewayClasses: kproxy's by controllerName.
    let mut classes: BTreeMap<&str, bool> = BTreeMap::new();
    for (name, class) in &objects.classes {
        if class.spec.controller_name != CONTROLLER_NAME {
            continue;
        }
        let accepted = class.spec.parameters_ref.is_none();
        classes.insert(name, accepted);
        let c = if accepted {
            cond("Accepted", Ok("Accepted"), "kproxy serves this class on every node")
        } else {
            out.warnings.push(format!(
                "GatewayClass {name}: parametersRef is not supported; not accepted"
            ));
            cond(
                "Accepted",
                Err(("InvalidParameters", "kproxy's classes take no parametersRef".into())),
                "",
            )
        };
        report.classes.push(ClassReport {
            name: name.clone(),
            generation: class.metadata.generation.unwrap_or(0),
            conditions: vec![c],
        });
    }

    // Gateways of those classes, oldest first (an older Gateway keeps a port's protocol).
    let mut gateways: Vec<(&ObjectKey, &super::types::Gateway)> = objects
        .gateways
        .iter()
        .filter(|(_, g)| classes.contains_key(g.spec.gateway_class_name.as_str()))
        .collect();
    gateways.sort_by_key(|(k, g)| (age_key(&g.metadata), (*k).clone()));
    let ctx = ListenerContext {
        secrets,
        grants: &objects.grants,
        ingress_http: cfg.ingress_http,
        ingress_https: cfg.ingress_https,
        unavailable: &cfg.unavailable,
    };
    let mut claims = PortClaims::new();
    let mut models: Vec<GatewayModel> = gateways
        .iter()
        .map(|(k, g)| model_gateway(k, g, classes[g.spec.gateway_class_name.as_str()], &ctx, &mut claims))
        .collect();
    let by_key: BTreeMap<&ObjectKey, usize> = gateways.iter().enumerate().map(|(i, (k, _))| (*k, i)).collect();

    // HTTPRoutes that name one of those Gateways, oldest first.
    let mut routes: Vec<(&ObjectKey, &HttpRoute)> = objects.routes.iter().collect();
    routes.sort_by_key(|(k, r)| (age_key(&r.metadata), (*k).clone()));
    // (route order, compiled route, attachments)
    let mut attached_routes: Vec<(usize, CompiledRoute, Vec<Attachment>)> = Vec::new();
    for (order, (key, route)) in routes.iter().enumerate() {
        let parents: Vec<(ParentRef, usize)> = route
            .spec
            .parent_refs
            .iter()
            .map(|p| normalized(p, &key.0))
            .filter(|p| p.group.as_deref() == Some(GROUP) && p.kind.as_deref() == Some("Gateway"))
            .filter_map(|p| {
                let gw_key = (p.namespace.clone().unwrap_or_default(), p.name.clone());
                by_key.get(&gw_key).map(|i| (p, *i))
            })
            .collect();
        if parents.is_empty() {
            continue;
        }
        let compiled = compile_route(key, route, &objects.grants, lookup);
        let resolved = match compiled.ref_problems.first() {
            None => cond("ResolvedRefs", Ok("ResolvedRefs"), "every reference resolved"),
            Some(p) => {
                let all: Vec<&str> = compiled.ref_problems.iter().map(|p| p.message.as_str()).collect();
                cond("ResolvedRefs", Err((p.reason, all.join("; "))), "")
            }
        };
        let all_invalid = compiled.invalid_rules.len() == route.spec.rules.len().max(1);
        let name = format!("{}/{}", key.0, key.1);
        for p in &compiled.ref_problems {
            out.warnings.push(format!("HTTPRoute {name}: {}", p.message));
        }
        for r in &compiled.invalid_rules {
            out.warnings.push(format!("HTTPRoute {name}: {r}; it answers 500"));
        }
        let mut seen = BTreeSet::new();
        let mut parent_reports = Vec::new();
        let mut attachments = Vec::new();
        for (parent, gw_index) in parents {
            if !seen.insert(parent.clone()) {
                continue;
            }
            let (accepted, mut att) = attach(key, route, &parent, gw_index, &models[gw_index], objects);
            let accepted = match (accepted, all_invalid) {
                (Ok(_), true) => Err((
                    "UnsupportedValue",
                    format!("no rule is usable: {}", compiled.invalid_rules.join("; ")),
                )),
                (a, _) => a,
            };
            if let Err((reason, why)) = &accepted {
                att.clear();
                out.warnings.push(format!(
                    "HTTPRoute {name}: not accepted by Gateway {}/{} ({reason}): {why}",
                    parent.namespace.as_deref().unwrap_or_default(),
                    parent.name
                ));
            }
            let mut conditions = vec![cond("Accepted", accepted, "accepted"), resolved.clone()];
            if !compiled.invalid_rules.is_empty() && !all_invalid {
                conditions.push(Cond::new(
                    "PartiallyInvalid",
                    true,
                    "UnsupportedValue",
                    &compiled.invalid_rules.join("; "),
                ));
            }
            parent_reports.push(ParentReport {
                parent_ref: parent,
                conditions,
            });
            attachments.extend(att);
        }
        for a in &attachments {
            models[a.gateway].listeners[a.listener].attached += 1;
        }
        report.routes.push(RouteReport {
            key: (*key).clone(),
            generation: route.metadata.generation.unwrap_or(0),
            parents: parent_reports,
        });
        if !attachments.is_empty() {
            out.served.push(name);
            attached_routes.push((order, compiled, attachments));
        }
    }

    // The table: programmed listeners by (port, hostname), shared across Gateways.
    let mut groups: BTreeMap<(u16, Option<String>), bool> = BTreeMap::new();
    // Every programmed listener has its group, even without routes (it answers 404 then).
    for m in models.iter().filter(|m| m.accepted.is_ok()) {
        for l in m.listeners.iter().filter(|l| l.programmed()) {
            groups.entry((l.port, l.hostname.clone())).or_insert(l.https);
        }
    }
    // Effective hostname -> entries, per group.
    let mut vhosts: BTreeMap<GroupKey, VHosts> = BTreeMap::new();
    for (order, compiled, attachments) in &attached_routes {
        for a in attachments {
            let l = &models[a.gateway].listeners[a.listener];
            if !(models[a.gateway].accepted.is_ok() && l.programmed()) {
                continue;
            }
            let group = vhosts.entry((l.port, l.hostname.clone())).or_default();
            for host in &a.hostnames {
                let entries = group.entry(host.clone()).or_default();
                for (rule_index, rule) in compiled.rules.iter().enumerate() {
                    for (match_index, m) in rule.matches.iter().enumerate() {
                        let (kind, len) = m.path.rank();
                        let rank = (
                            kind,
                            len,
                            std::cmp::Reverse(u8::from(m.method.is_some())),
                            std::cmp::Reverse(m.headers.len()),
                            std::cmp::Reverse(m.query.len()),
                            *order,
                            rule_index,
                            match_index,
                        );
                        entries.push((
                            rank,
                            Entry {
                                path: m.path.clone(),
                                method: m.method.clone(),
                                headers: m.headers.clone(),
                                query: m.query.clone(),
                                rule: rule.rule.clone(),
                            },
                        ));
                    }
                }
            }
        }
    }
    for ((port, hostname), https) in groups {
        let mut listener = ListenerRoutes::default();
        if let Some(hosts) = vhosts.remove(&(port, hostname.clone())) {
            for (host, mut entries) in hosts {
                // The same route attached twice to one group (two parentRefs) is listed once.
                entries.sort_by_key(|e| e.0);
                entries.dedup_by(|a, b| a.0 == b.0);
                *listener.vhosts.entry(host.as_deref(), Vec::new) = entries.into_iter().map(|(_, e)| e).collect();
            }
        }
        let port_routes = out.routes.ports.entry(port).or_insert_with(|| PortRoutes {
            https,
            ..PortRoutes::default()
        });
        *port_routes.listeners.entry(hostname.as_deref(), Default::default) = Arc::new(listener);
    }
    for m in models.iter().filter(|m| m.accepted.is_ok()) {
        for l in m
            .listeners
            .iter()
            .filter(|l| l.wanted() && !out.routes.ingress_ports.contains(&l.port))
        {
            out.listen.insert(l.port, l.https);
        }
    }

    // Certificates, and the statuses of Gateways and their listeners.
    for m in &models {
        for l in m
            .listeners
            .iter()
            .filter(|l| m.accepted.is_ok() && l.programmed() && l.https)
        {
            if let Some(secret) = &l.certificate {
                out.tls.entry(l.port).or_default().push(TlsBinding {
                    host: l.hostname.clone().unwrap_or_default(),
                    secret: secret.clone(),
                    suffix_match: true,
                });
            }
        }
        report.gateways.push(gateway_report(m, &mut out.warnings));
    }
    out.status = Arc::new(report);
    out
}

/// A listener group: the port and the listener hostname.
type GroupKey = (u16, Option<String>);
/// A group's entries by effective hostname, with their sort keys.
type VHosts = BTreeMap<Option<String>, Vec<(RankKey, Entry)>>;

/// Sort key of a table entry: path kind and length, method, header and query counts, then
/// route age order, rule and match index.
type RankKey = (
    u8,
    std::cmp::Reverse<usize>,
    std::cmp::Reverse<u8>,
    std::cmp::Reverse<usize>,
    std::cmp::Reverse<usize>,
    usize,
    usize,
    usize,
);

fn gateway_report(m: &GatewayModel, warnings: &mut Vec<String>) -> GatewayReport {
    let name = format!("{}/{}", m.key.0, m.key.1);
    let accepted = match (&m.accepted, &m.listeners_not_valid) {
        (Err(p), _) => {
            warnings.push(format!("Gateway {name}: not accepted ({}): {}", p.0, p.1));
            cond("Accepted", Err(p.clone()), "")
        }
        (Ok(()), Some(why)) => Cond::new("Accepted", true, "ListenersNotValid", why),
        (Ok(()), None) => cond("Accepted", Ok("Accepted"), "accepted"),
    };
    let programmed = if m.programmed() {
        cond("Programmed", Ok("Programmed"), "served on every node")
    } else {
        cond("Programmed", Err(("Invalid", "no listener can be served".into())), "")
    };
    let listeners = m
        .listeners
        .iter()
        .map(|l| {
            let accepted = match (&l.accepted, &l.conflicted, &l.bind_failed) {
                (Err(p), _, _) => cond("Accepted", Err(p.clone()), ""),
                (Ok(()), Some((_, why)), _) => Cond::new("Accepted", false, "Invalid", why),
                (Ok(()), None, Some(err)) => Cond::new(
                    "Accepted",
                    false,
                    "PortUnavailable",
                    &format!("cannot listen on port {}: {err}", l.port),
                ),
                (Ok(()), None, None) => cond("Accepted", Ok("Accepted"), "accepted"),
            };
            let conflicted = match &l.conflicted {
                Some((reason, why)) => Cond::new("Conflicted", true, reason, why),
                None => Cond::new("Conflicted", false, "NoConflicts", "no conflicts"),
            };
            let resolved = cond(
                "ResolvedRefs",
                l.resolved.clone().map(|()| "ResolvedRefs"),
                "every reference resolved",
            );
            let programmed = if m.accepted.is_ok() && l.programmed() {
                cond("Programmed", Ok("Programmed"), "served on every node")
            } else {
                cond("Programmed", Err(("Invalid", "not served".into())), "")
            };
            for c in [&accepted, &conflicted, &resolved] {
                if c.status == (c.type_ == "Conflicted") {
                    warnings.push(format!(
                        "Gateway {name} listener {}: {} {}: {}",
                        l.name, c.type_, c.reason, c.message
                    ));
                }
            }
            ListenerReport {
                name: l.name.clone(),
                supported_kinds: l.supported_kinds.clone(),
                attached: i32::try_from(l.attached).unwrap_or(i32::MAX),
                conditions: vec![accepted, programmed, resolved, conflicted],
            }
        })
        .collect();
    GatewayReport {
        key: m.key.clone(),
        generation: m.generation,
        conditions: vec![accepted, programmed],
        listeners,
    }
}
