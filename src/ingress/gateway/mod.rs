//! Gateway API v1 in the embedded proxy: GatewayClasses whose `controllerName` is
//! [`CONTROLLER_NAME`], their Gateways, the HTTPRoutes attached to them, and ReferenceGrants.
//!
//! The same shape as the Ingress side: the sources keep the objects ([`objects`]), a pure
//! build turns them into the Gateway half of the shared route table, the ports to listen on,
//! the certificates per port and the statuses to report ([`build`], over [`listeners`],
//! [`rules`] and [`table`]); the I/O edges are the watchers ([`watch`]), the listeners on new
//! ports ([`listen`]), the per-request hook the proxy calls ([`proxy`]) and the status writer
//! of the elected kproxy ([`writer`], planned by the pure [`status`]).

pub mod build;
pub mod listen;
pub mod listeners;
pub mod objects;
pub mod proxy;
pub mod refs;
pub mod rules;
pub mod status;
pub mod table;
pub mod types;
pub mod watch;
pub mod writer;

#[cfg(test)]
mod tests;

/// kproxy's controller name, matched against `GatewayClass.spec.controllerName`.
pub const CONTROLLER_NAME: &str = "kproxy.io/gateway-controller";

/// The conformance features kproxy implements, by the suite's names; written (sorted) to the
/// `status.supportedFeatures` of kproxy's GatewayClasses.
pub const SUPPORTED_FEATURES: &[&str] = &[
    "Gateway",
    "GatewayHTTPListenerIsolation",
    "GatewayPort8080",
    "HTTPRoute",
    "HTTPRoute303RedirectStatusCode",
    "HTTPRoute307RedirectStatusCode",
    "HTTPRoute308RedirectStatusCode",
    "HTTPRouteBackendProtocolWebSocket",
    "HTTPRouteBackendRequestHeaderModification",
    "HTTPRouteBackendTimeout",
    "HTTPRouteHostRewrite",
    "HTTPRouteMethodMatching",
    "HTTPRouteNamedRouteRule",
    "HTTPRouteParentRefPort",
    "HTTPRoutePathRedirect",
    "HTTPRoutePathRewrite",
    "HTTPRoutePortRedirect",
    "HTTPRouteQueryParamMatching",
    "HTTPRouteRequestMirror",
    "HTTPRouteRequestMultipleMirrors",
    "HTTPRouteRequestPercentageMirror",
    "HTTPRouteRequestTimeout",
    "HTTPRouteResponseHeaderModification",
    "HTTPRouteSchemeRedirect",
    "ReferenceGrant",
];
