//! PURE: the cross-namespace and namespace-selection rules: ReferenceGrants, and the
//! label selectors of `allowedRoutes.namespaces`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::types::ReferenceGrant;
use crate::ingress::objects::ObjectKey;

/// One side of a reference: group (`""` for the core group), kind, namespace.
#[derive(Debug, Clone, Copy)]
pub struct RefEnd<'a> {
    pub group: &'a str,
    pub kind: &'a str,
    pub namespace: &'a str,
}

/// Whether a reference from `from` to the object `name` of `to` is allowed: always within a
/// namespace, across namespaces only when a ReferenceGrant in the target's namespace names
/// the source (group, kind, namespace) and the target (group, kind, and name if it sets one).
pub fn permits(grants: &BTreeMap<ObjectKey, ReferenceGrant>, from: RefEnd<'_>, to: RefEnd<'_>, name: &str) -> bool {
    if from.namespace == to.namespace {
        return true;
    }
    grants.iter().filter(|((ns, _), _)| ns == to.namespace).any(|(_, g)| {
        g.spec
            .from
            .iter()
            .any(|f| f.group == from.group && f.kind == from.kind && f.namespace == from.namespace)
            && g.spec.to.iter().any(|t| {
                t.group == to.group && t.kind == to.kind && t.name.as_deref().is_none_or(|n| n.is_empty() || n == name)
            })
    })
}

/// Whether `labels` satisfy `selector` (matchLabels and matchExpressions, ANDed). An unknown
/// operator matches nothing, as the API server would have refused it.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_label = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expression = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    by_label && by_expression
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(ns: &str, yaml: &str) -> (ObjectKey, ReferenceGrant) {
        let g: ReferenceGrant = serde_yaml::from_str(yaml).unwrap();
        ((ns.into(), "g".into()), g)
    }

    #[test]
    fn grants_name_source_namespace_and_target() {
        let grants = BTreeMap::from([grant(
            "web",
            "spec: {from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: infra}], to: [{group: '', kind: Service, name: only}]}",
        )]);
        let route = |ns| RefEnd {
            group: "gateway.networking.k8s.io",
            kind: "HTTPRoute",
            namespace: ns,
        };
        let svc = |ns| RefEnd {
            group: "",
            kind: "Service",
            namespace: ns,
        };
        assert!(permits(&grants, route("infra"), svc("web"), "only"));
        assert!(
            !permits(&grants, route("infra"), svc("web"), "other"),
            "the grant names one Service"
        );
        assert!(!permits(&grants, route("elsewhere"), svc("web"), "only"));
        assert!(
            permits(&grants, route("web"), svc("web"), "any"),
            "same namespace needs no grant"
        );
        let gateway = RefEnd {
            group: "gateway.networking.k8s.io",
            kind: "Gateway",
            namespace: "infra",
        };
        assert!(
            !permits(&grants, gateway, svc("web"), "only"),
            "granted to HTTPRoutes only"
        );
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let sel: LabelSelector = serde_yaml::from_str(
            "matchLabels: {team: a}\nmatchExpressions: [{key: env, operator: NotIn, values: [prod]}, {key: x, operator: DoesNotExist}]",
        )
        .unwrap();
        let labels = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(selector_matches(&sel, &labels(&[("team", "a")])));
        assert!(selector_matches(&sel, &labels(&[("team", "a"), ("env", "dev")])));
        assert!(!selector_matches(&sel, &labels(&[("team", "a"), ("env", "prod")])));
        assert!(!selector_matches(&sel, &labels(&[("team", "a"), ("x", "1")])));
        assert!(!selector_matches(&sel, &labels(&[("team", "b")])));
    }
}
