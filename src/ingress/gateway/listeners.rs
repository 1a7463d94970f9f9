//! PURE: a Gateway's listeners checked as the spec asks: protocol, port, hostname, route
//! kinds, TLS certificates (cross-namespace only with a ReferenceGrant), and conflicts, both
//! within the Gateway and with what else kproxy serves on the node's ports (the Ingress
//! listeners, and the listeners of older Gateways: every Gateway of kproxy's classes is
//! served on the same node addresses).

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::ingress::objects::TlsSecret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::refs::{permits, RefEnd};
use super::types::{Gateway, Listener, ReferenceGrant, RouteGroupKind, GROUP};
use crate::ingress::objects::ObjectKey;

/// A condition's reason and message (for one that is not in its good state).
pub type Problem = (&'static str, String);

/// Which namespaces' routes a listener takes.
#[derive(Debug, Clone)]
pub enum NamespacePolicy {
    Same,
    All,
    Selector(LabelSelector),
}

/// One listener as kproxy will serve it, with its status.
#[derive(Debug, Clone)]
pub struct ListenerModel {
    pub name: String,
    pub port: u16,
    pub https: bool,
    /// Lowercase; `None`: every host.
    pub hostname: Option<String>,
    pub namespaces: NamespacePolicy,
    /// HTTPRoute, when the listener takes it.
    pub supported_kinds: Vec<RouteGroupKind>,
    /// `Accepted` false: reason and message.
    pub accepted: Result<(), Problem>,
    pub conflicted: Option<Problem>,
    pub resolved: Result<(), Problem>,
    /// The Secret of the first usable certificate (HTTPS).
    pub certificate: Option<ObjectKey>,
    /// This node could not listen on the port (still wanted: binding is tried again).
    pub bind_failed: Option<String>,
    /// Routes attached (set while routes are attached).
    pub attached: u32,
}

impl ListenerModel {
    /// Routes may attach: accepted, not conflicted, its port open.
    pub fn attachable(&self) -> bool {
        self.accepted.is_ok() && self.conflicted.is_none() && self.bind_failed.is_none()
    }

    pub fn takes_httproutes(&self) -> bool {
        !self.supported_kinds.is_empty()
    }

    /// Served on the node: attachable, taking HTTPRoutes, and with a certificate for HTTPS.
    pub fn programmed(&self) -> bool {
        self.wanted() && self.bind_failed.is_none()
    }

    /// Its port must be listened on: programmed, but for a failed bind.
    pub fn wanted(&self) -> bool {
        self.accepted.is_ok()
            && self.conflicted.is_none()
            && self.takes_httproutes()
            && (!self.https || self.certificate.is_some())
    }
}

#[derive(Debug, Clone)]
pub struct GatewayModel {
    pub key: ObjectKey,
    pub generation: i64,
    pub accepted: Result<(), Problem>,
    /// Accepted, but some listeners are not: the reason is `ListenersNotValid`.
    pub listeners_not_valid: Option<String>,
    pub listeners: Vec<ListenerModel>,
}

impl GatewayModel {
    pub fn programmed(&self) -> bool {
        self.accepted.is_ok() && self.listeners.iter().any(ListenerModel::programmed)
    }
}

/// What the listeners are checked against.
pub struct ListenerContext<'a> {
    pub secrets: &'a BTreeMap<ObjectKey, TlsSecret>,
    pub grants: &'a BTreeMap<ObjectKey, ReferenceGrant>,
    pub ingress_http: Option<u16>,
    pub ingress_https: Option<u16>,
    /// Ports this node could not listen on, with the error.
    pub unavailable: &'a BTreeMap<u16, String>,
}

/// The protocol an older Gateway (or the Ingress proxy) serves on each port.
pub type PortClaims = BTreeMap<u16, (bool, String)>;

fn http_route_kind() -> RouteGroupKind {
    RouteGroupKind {
        group: Some(GROUP.to_string()),
        kind: "HTTPRoute".into(),
    }
}

fn route_kinds(l: &Listener) -> (Vec<RouteGroupKind>, Result<(), Problem>) {
    let Some(kinds) = l
        .allowed_routes
        .as_ref()
        .and_then(|a| a.kinds.as_ref())
        .filter(|k| !k.is_empty())
    else {
        return (vec![http_route_kind()], Ok(()));
    };
    let mut supported = Vec::new();
    let mut invalid = Vec::new();
    for k in kinds {
        let group = k.group.as_deref().unwrap_or(GROUP);
        if group == GROUP && k.kind == "HTTPRoute" {
            if supported.is_empty() {
                supported.push(http_route_kind());
            }
        } else {
            invalid.push(format!("{group}/{}", k.kind));
        }
    }
    let resolved = if invalid.is_empty() {
        Ok(())
    } else {
        Err((
            "InvalidRouteKinds",
            format!(
                "route kinds not supported on an {} listener: {}",
                l.protocol,
                invalid.join(", ")
            ),
        ))
    };
    (supported, resolved)
}

fn certificates(gw_ns: &str, l: &Listener, ctx: &ListenerContext<'_>) -> (Option<ObjectKey>, Result<(), Problem>) {
    let refs = l
        .tls
        .as_ref()
        .map(|t| t.certificate_refs.as_slice())
        .unwrap_or_default();
    if refs.is_empty() {
        return (
            None,
            Err((
                "InvalidCertificateRef",
                "an HTTPS listener needs tls.certificateRefs".into(),
            )),
        );
    }
    let mut first_ok = None;
    let mut problem = None;
    for r in refs {
        let group = r.group.as_deref().unwrap_or("");
        let kind = r.kind.as_deref().unwrap_or("Secret");
        let ns = r.namespace.as_deref().unwrap_or(gw_ns);
        let checked = if !group.is_empty() || kind != "Secret" {
            Err((
                "InvalidCertificateRef",
                format!(
                    "certificateRef {:?}: {kind} of group {group:?} is not supported (only Secrets)",
                    r.name
                ),
            ))
        } else if !permits(
            ctx.grants,
            RefEnd {
                group: GROUP,
                kind: "Gateway",
                namespace: gw_ns,
            },
            RefEnd {
                group: "",
                kind: "Secret",
                namespace: ns,
            },
            &r.name,
        ) {
            Err((
                "RefNotPermitted",
                format!(
                    "certificateRef Secret {ns}/{}: no ReferenceGrant in {ns} allows it",
                    r.name
                ),
            ))
        } else {
            let key = (ns.to_string(), r.name.clone());
            match ctx.secrets.get(&key) {
                None => Err((
                    "InvalidCertificateRef",
                    format!("Secret {ns}/{} not found (or not of type kubernetes.io/tls)", r.name),
                )),
                Some(secret) => match &secret.parsed {
                    Ok(_) => Ok(key),
                    Err(e) => Err(("InvalidCertificateRef", e.clone())),
                },
            }
        };
        match checked {
            Ok(key) => {
                first_ok.get_or_insert(key);
            }
            Err(p) => {
                problem.get_or_insert(p);
            }
        }
    }
    (first_ok, problem.map_or(Ok(()), Err))
}

fn model_listener(gw_ns: &str, l: &Listener, ctx: &ListenerContext<'_>) -> ListenerModel {
    let https = l.protocol == "HTTPS";
    let hostname = l
        .hostname
        .as_ref()
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
        .filter(|h| !h.is_empty());
    let namespaces = match l.allowed_routes.as_ref().and_then(|a| a.namespaces.as_ref()) {
        None => NamespacePolicy::Same,
        Some(n) => match (n.from.as_deref().unwrap_or("Same"), &n.selector) {
            ("All", _) => NamespacePolicy::All,
            ("Selector", Some(s)) => NamespacePolicy::Selector(s.clone()),
            // A Selector without selector selects nothing.
            ("Selector", None) => NamespacePolicy::Selector(LabelSelector {
                match_expressions: Some(vec![Default::default()]),
                ..LabelSelector::default()
            }),
            _ => NamespacePolicy::Same,
        },
    };
    let mut m = ListenerModel {
        name: l.name.clone(),
        port: u16::try_from(l.port).unwrap_or(0),
        https,
        hostname,
        namespaces,
        supported_kinds: vec![],
        accepted: Ok(()),
        conflicted: None,
        resolved: Ok(()),
        certificate: None,
        bind_failed: None,
        attached: 0,
    };
    if !matches!(l.protocol.as_str(), "HTTP" | "HTTPS") {
        m.accepted = Err((
            "UnsupportedProtocol",
            format!(
                "protocol {} is not supported by kproxy (HTTP and HTTPS are)",
                l.protocol
            ),
        ));
        return m;
    }
    if m.port == 0 {
        m.accepted = Err(("PortUnavailable", format!("port {} is not a TCP port", l.port)));
        return m;
    }
    if m.hostname.as_deref().is_some_and(|h| h.parse::<IpAddr>().is_ok()) {
        m.accepted = Err(("Invalid", "hostname must be a DNS name, not an IP address".into()));
        return m;
    }
    let (kinds, kinds_ok) = route_kinds(l);
    m.supported_kinds = kinds;
    m.resolved = kinds_ok;
    if https {
        if l.tls
            .as_ref()
            .and_then(|t| t.mode.as_deref())
            .is_some_and(|mode| mode != "Terminate")
        {
            m.accepted = Err(("Invalid", "HTTPS listeners terminate TLS (tls.mode: Terminate)".into()));
            return m;
        }
        let (cert, certs_ok) = certificates(gw_ns, l, ctx);
        m.certificate = cert;
        if m.resolved.is_ok() {
            m.resolved = certs_ok;
        }
    }
    m
}

/// Marks listeners that are not distinct within their Gateway: the same port with different
/// protocols (ProtocolConflict), or the same port, protocol and hostname (HostnameConflict).
/// None of a conflicting set is served: the spec forbids picking a winner.
fn mark_conflicts(listeners: &mut [ListenerModel], protocols: &[String]) {
    let n = listeners.len();
    for i in 0..n {
        let others = (0..n).filter(|&j| j != i && listeners[j].port == listeners[i].port && listeners[i].port != 0);
        let mut conflict = None;
        for j in others {
            let other = &listeners[j];
            if protocols[i] != protocols[j] {
                conflict = Some((
                    "ProtocolConflict",
                    format!(
                        "listener {} uses port {} with protocol {}",
                        other.name, other.port, protocols[j]
                    ),
                ));
                break;
            }
            if conflict.is_none() && listeners[i].hostname == other.hostname {
                let host = other.hostname.as_deref().unwrap_or("(none)");
                conflict = Some((
                    "HostnameConflict",
                    format!(
                        "listener {} has the same port {} and hostname {host}",
                        other.name, other.port
                    ),
                ));
            }
        }
        listeners[i].conflicted = conflict;
    }
}

/// Checks every listener of `gw`, taking ports in `claims` for the listeners that are served.
/// `class_accepted`: whether its GatewayClass is accepted.
pub fn model_gateway(
    key: &ObjectKey,
    gw: &Gateway,
    class_accepted: bool,
    ctx: &ListenerContext<'_>,
    claims: &mut PortClaims,
) -> GatewayModel {
    let owner = format!("Gateway {}/{}", key.0, key.1);
    let mut listeners: Vec<ListenerModel> = gw
        .spec
        .listeners
        .iter()
        .map(|l| model_listener(&key.0, l, ctx))
        .collect();
    let protocols: Vec<String> = gw.spec.listeners.iter().map(|l| l.protocol.clone()).collect();
    mark_conflicts(&mut listeners, &protocols);
    for l in listeners.iter_mut().filter(|l| l.attachable()) {
        let ingress = if Some(l.port) == ctx.ingress_http {
            Some((false, "kproxy's Ingress HTTP listener".to_string()))
        } else if Some(l.port) == ctx.ingress_https {
            Some((true, "kproxy's Ingress HTTPS listener".to_string()))
        } else {
            None
        };
        let claim = ingress.or_else(|| claims.get(&l.port).cloned());
        match claim {
            Some((https, by)) if https != l.https => {
                let proto = if https { "HTTPS" } else { "HTTP" };
                l.accepted = Err((
                    "PortUnavailable",
                    format!("port {} is served as {proto} by {by}", l.port),
                ));
            }
            _ => l.bind_failed = ctx.unavailable.get(&l.port).cloned(),
        }
    }
    let accepted = if !gw.spec.addresses.is_empty() {
        Err((
            "UnsupportedAddress",
            "spec.addresses is not supported: kproxy serves every Gateway on its node's addresses".to_string(),
        ))
    } else if !class_accepted {
        Err((
            "Invalid",
            format!("GatewayClass {} is not accepted", gw.spec.gateway_class_name),
        ))
    } else if !listeners.is_empty() && !listeners.iter().any(|l| l.accepted.is_ok() && l.conflicted.is_none()) {
        Err(("ListenersNotValid", "no listener is valid".to_string()))
    } else {
        Ok(())
    };
    if accepted.is_ok() {
        for l in listeners.iter().filter(|l| l.wanted()) {
            claims.entry(l.port).or_insert((l.https, owner.clone()));
        }
    }
    let bad: Vec<&str> = listeners
        .iter()
        .filter(|l| !l.attachable())
        .map(|l| l.name.as_str())
        .collect();
    GatewayModel {
        key: key.clone(),
        generation: gw.metadata.generation.unwrap_or(0),
        listeners_not_valid: (accepted.is_ok() && !bad.is_empty())
            .then(|| format!("listeners not accepted: {}", bad.join(", "))),
        accepted,
        listeners,
    }
}
