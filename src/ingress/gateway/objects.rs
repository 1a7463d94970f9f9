//! The Gateway API objects kproxy knows, as the sources listed them, compacted on arrival
//! (managed fields, annotations and owner references dropped; Namespaces reduced to their
//! labels). The route builder converts them all at once, like the Ingress objects.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use super::types::{Gateway, GatewayClass, HttpRoute, ReferenceGrant, GROUP};
use crate::ingress::objects::ObjectKey;

/// The label the API server puts on every Namespace (Kubernetes 1.22 and newer).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The kinds the Gateway side waits for before it serves or reports anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GatewayKind {
    GatewayClass,
    Gateway,
    HttpRoute,
    ReferenceGrant,
    Namespace,
}

impl GatewayKind {
    pub const ALL: [GatewayKind; 5] = [
        GatewayKind::GatewayClass,
        GatewayKind::Gateway,
        GatewayKind::HttpRoute,
        GatewayKind::ReferenceGrant,
        GatewayKind::Namespace,
    ];
}

#[derive(Debug, Default, Clone)]
pub struct GatewayObjects {
    pub classes: BTreeMap<String, GatewayClass>,
    pub gateways: BTreeMap<ObjectKey, Gateway>,
    pub routes: BTreeMap<ObjectKey, HttpRoute>,
    pub grants: BTreeMap<ObjectKey, ReferenceGrant>,
    /// Namespace labels by name.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    synced: BTreeSet<GatewayKind>,
}

impl GatewayObjects {
    /// True once every kind has been listed (a kind whose CRD is not installed counts as
    /// listed, with no objects).
    pub fn is_ready(&self) -> bool {
        GatewayKind::ALL.iter().all(|k| self.synced.contains(k))
    }

    /// The labels of namespace `ns`. A namespace the sources never named (manifests that do not
    /// declare it) has the one label the API server gives every namespace.
    pub fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        self.namespaces
            .get(ns)
            .cloned()
            .unwrap_or_else(|| BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())]))
    }

    /// Marks `kind` listed without objects (its CRD is not installed); true if anything changed.
    pub fn mark_absent(&mut self, kind: GatewayKind) -> bool {
        let first = self.synced.insert(kind);
        let had = match kind {
            GatewayKind::GatewayClass => !std::mem::take(&mut self.classes).is_empty(),
            GatewayKind::Gateway => !std::mem::take(&mut self.gateways).is_empty(),
            GatewayKind::HttpRoute => !std::mem::take(&mut self.routes).is_empty(),
            GatewayKind::ReferenceGrant => !std::mem::take(&mut self.grants).is_empty(),
            GatewayKind::Namespace => !std::mem::take(&mut self.namespaces).is_empty(),
        };
        first | had
    }
}

/// Only what kproxy reads of an object's metadata.
fn compact_meta(meta: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        generation: meta.generation,
        creation_timestamp: meta.creation_timestamp.clone(),
        ..ObjectMeta::default()
    }
}

/// How one kind is kept in [`GatewayObjects`]. Each method returns whether anything changed.
pub trait GatewayObject: Sized {
    const KIND: GatewayKind;
    fn apply(objects: &mut GatewayObjects, obj: &Self) -> bool;
    fn delete(objects: &mut GatewayObjects, obj: &Self) -> bool;
    /// A complete list: replaces every object of the kind and marks it listed.
    fn replace(objects: &mut GatewayObjects, all: &[Self]) -> bool;
}

fn namespaced_key<K: ResourceExt>(obj: &K) -> ObjectKey {
    (obj.namespace().unwrap_or_else(|| "default".into()), obj.name_any())
}

fn upsert<K: Ord, V: PartialEq>(map: &mut BTreeMap<K, V>, key: K, value: V) -> bool {
    if map.get(&key) == Some(&value) {
        return false;
    }
    map.insert(key, value);
    true
}

fn replace_map<K: Ord, V: PartialEq>(map: &mut BTreeMap<K, V>, new: BTreeMap<K, V>) -> bool {
    if *map == new {
        return false;
    }
    *map = new;
    true
}

macro_rules! gateway_object {
    ($ty:ty, $kind:expr, $field:ident, $key:expr, $compact:expr) => {
        impl GatewayObject for $ty {
            const KIND: GatewayKind = $kind;
            fn apply(objects: &mut GatewayObjects, obj: &Self) -> bool {
                upsert(&mut objects.$field, $key(obj), $compact(obj))
            }
            fn delete(objects: &mut GatewayObjects, obj: &Self) -> bool {
                objects.$field.remove(&$key(obj)).is_some()
            }
            fn replace(objects: &mut GatewayObjects, all: &[Self]) -> bool {
                let first = objects.synced.insert(Self::KIND);
                let new = all.iter().map(|o| ($key(o), $compact(o))).collect();
                replace_map(&mut objects.$field, new) | first
            }
        }
    };
}

gateway_object!(
    GatewayClass,
    GatewayKind::GatewayClass,
    classes,
    |o: &GatewayClass| o.name_any(),
    |o: &GatewayClass| GatewayClass {
        metadata: compact_meta(&o.metadata),
        ..o.clone()
    }
);
gateway_object!(
    Gateway,
    GatewayKind::Gateway,
    gateways,
    namespaced_key,
    |o: &Gateway| Gateway {
        metadata: compact_meta(&o.metadata),
        ..o.clone()
    }
);
gateway_object!(
    HttpRoute,
    GatewayKind::HttpRoute,
    routes,
    namespaced_key,
    |o: &HttpRoute| HttpRoute {
        metadata: compact_meta(&o.metadata),
        ..o.clone()
    }
);
gateway_object!(
    ReferenceGrant,
    GatewayKind::ReferenceGrant,
    grants,
    namespaced_key,
    |o: &ReferenceGrant| ReferenceGrant {
        metadata: compact_meta(&o.metadata),
        ..o.clone()
    }
);
gateway_object!(
    Namespace,
    GatewayKind::Namespace,
    namespaces,
    |o: &Namespace| o.name_any(),
    |o: &Namespace| {
        let mut labels = o.metadata.labels.clone().unwrap_or_default();
        labels
            .entry(NAMESPACE_NAME_LABEL.to_string())
            .or_insert_with(|| o.name_any());
        labels
    }
);

/// The Gateway API objects (and Namespaces) found in manifest files.
#[derive(Debug, Default, Clone)]
pub struct GatewayDocs {
    pub classes: Vec<GatewayClass>,
    pub gateways: Vec<Gateway>,
    pub routes: Vec<HttpRoute>,
    pub grants: Vec<ReferenceGrant>,
    pub namespaces: Vec<Namespace>,
}

/// The versions the Standard channel's CRDs serve, for each kind kproxy reads.
fn served(api_version: &str, kind: &str) -> bool {
    let Some(version) = api_version.strip_prefix(GROUP).and_then(|v| v.strip_prefix('/')) else {
        return false;
    };
    match kind {
        "GatewayClass" | "Gateway" | "HTTPRoute" | "ReferenceGrant" => matches!(version, "v1" | "v1beta1"),
        _ => false,
    }
}

impl GatewayDocs {
    /// Whether [`GatewayDocs::add`] takes documents of this apiVersion and kind.
    pub fn reads(api_version: &str, kind: &str) -> bool {
        (api_version == "v1" && kind == "Namespace") || served(api_version, kind)
    }

    /// Takes one manifest document if it is a Gateway API kind kproxy reads or a Namespace:
    /// `Ok(false)` for other kinds, an error naming the kind when it does not parse.
    pub fn add(&mut self, api_version: &str, kind: &str, value: serde_yaml::Value) -> Result<bool, String> {
        match GatewayDoc::parse(api_version, kind, value)? {
            Some(doc) => {
                self.push(doc);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Adds one parsed object.
    pub fn push(&mut self, doc: GatewayDoc) {
        match doc {
            GatewayDoc::Class(o) => self.classes.push(o),
            GatewayDoc::Gateway(o) => self.gateways.push(o),
            GatewayDoc::Route(o) => self.routes.push(o),
            GatewayDoc::Grant(o) => self.grants.push(o),
            GatewayDoc::Namespace(o) => self.namespaces.push(o),
        }
    }

    pub fn extend(&mut self, other: GatewayDocs) {
        self.classes.extend(other.classes);
        self.gateways.extend(other.gateways);
        self.routes.extend(other.routes);
        self.grants.extend(other.grants);
        self.namespaces.extend(other.namespaces);
    }

    /// `(kind, namespace, name)` of every object (cluster-scoped ones in namespace `default`,
    /// as the manifest source keys them).
    pub fn ids(&self) -> Vec<(GatewayKind, String, String)> {
        fn id<K: ResourceExt>(kind: GatewayKind, o: &K) -> (GatewayKind, String, String) {
            (kind, o.namespace().unwrap_or_else(|| "default".into()), o.name_any())
        }
        let mut ids = Vec::new();
        ids.extend(self.classes.iter().map(|o| id(GatewayKind::GatewayClass, o)));
        ids.extend(self.gateways.iter().map(|o| id(GatewayKind::Gateway, o)));
        ids.extend(self.routes.iter().map(|o| id(GatewayKind::HttpRoute, o)));
        ids.extend(self.grants.iter().map(|o| id(GatewayKind::ReferenceGrant, o)));
        ids.extend(self.namespaces.iter().map(|o| id(GatewayKind::Namespace, o)));
        ids
    }

    /// The first read of the files: every kind listed completely.
    pub fn replace_into(&self, objects: &mut GatewayObjects) -> bool {
        GatewayClass::replace(objects, &self.classes)
            | Gateway::replace(objects, &self.gateways)
            | HttpRoute::replace(objects, &self.routes)
            | ReferenceGrant::replace(objects, &self.grants)
            | Namespace::replace(objects, &self.namespaces)
    }

    /// Later reads: these objects applied.
    pub fn apply_into(&self, objects: &mut GatewayObjects) -> bool {
        let mut changed = false;
        for o in &self.classes {
            changed |= GatewayClass::apply(objects, o);
        }
        for o in &self.gateways {
            changed |= Gateway::apply(objects, o);
        }
        for o in &self.routes {
            changed |= HttpRoute::apply(objects, o);
        }
        for o in &self.grants {
            changed |= ReferenceGrant::apply(objects, o);
        }
        for o in &self.namespaces {
            changed |= Namespace::apply(objects, o);
        }
        changed
    }
}

/// One Gateway API object (or Namespace) read from a manifest document.
#[derive(Debug, Clone, PartialEq)]
pub enum GatewayDoc {
    Class(GatewayClass),
    Gateway(Gateway),
    Route(HttpRoute),
    Grant(ReferenceGrant),
    Namespace(Namespace),
}

impl GatewayDoc {
    /// The document as the object it is, if [`GatewayDocs::reads`] its apiVersion and kind
    /// (`None` otherwise); an error naming the kind when it does not parse.
    pub fn parse(api_version: &str, kind: &str, value: serde_yaml::Value) -> Result<Option<GatewayDoc>, String> {
        fn parse<T: serde::de::DeserializeOwned>(kind: &str, value: serde_yaml::Value) -> Result<T, String> {
            serde_yaml::from_value(value).map_err(|e| format!("{kind}: {e}"))
        }
        if !GatewayDocs::reads(api_version, kind) {
            return Ok(None);
        }
        Ok(Some(match kind {
            "Namespace" => GatewayDoc::Namespace(parse(kind, value)?),
            "GatewayClass" => GatewayDoc::Class(parse(kind, value)?),
            "Gateway" => GatewayDoc::Gateway(parse(kind, value)?),
            "HTTPRoute" => GatewayDoc::Route(parse(kind, value)?),
            "ReferenceGrant" => GatewayDoc::Grant(parse(kind, value)?),
            _ => return Ok(None),
        }))
    }

    pub fn kind(&self) -> GatewayKind {
        match self {
            GatewayDoc::Class(_) => GatewayKind::GatewayClass,
            GatewayDoc::Gateway(_) => GatewayKind::Gateway,
            GatewayDoc::Route(_) => GatewayKind::HttpRoute,
            GatewayDoc::Grant(_) => GatewayKind::ReferenceGrant,
            GatewayDoc::Namespace(_) => GatewayKind::Namespace,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            GatewayDoc::Class(o) => &o.metadata,
            GatewayDoc::Gateway(o) => &o.metadata,
            GatewayDoc::Route(o) => &o.metadata,
            GatewayDoc::Grant(o) => &o.metadata,
            GatewayDoc::Namespace(o) => &o.metadata,
        }
    }

    pub fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            GatewayDoc::Class(o) => &mut o.metadata,
            GatewayDoc::Gateway(o) => &mut o.metadata,
            GatewayDoc::Route(o) => &mut o.metadata,
            GatewayDoc::Grant(o) => &mut o.metadata,
            GatewayDoc::Namespace(o) => &mut o.metadata,
        }
    }
}

impl GatewayKind {
    /// The kind as manifests spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            GatewayKind::GatewayClass => "GatewayClass",
            GatewayKind::Gateway => "Gateway",
            GatewayKind::HttpRoute => "HTTPRoute",
            GatewayKind::ReferenceGrant => "ReferenceGrant",
            GatewayKind::Namespace => "Namespace",
        }
    }

    /// GatewayClasses and Namespaces belong to no namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, GatewayKind::GatewayClass | GatewayKind::Namespace)
    }
}

/// Deletes the object a manifest no longer defines (its id from [`GatewayDocs::ids`]).
pub fn delete_id(objects: &mut GatewayObjects, kind: GatewayKind, namespace: &str, name: &str) -> bool {
    let key = (namespace.to_string(), name.to_string());
    match kind {
        GatewayKind::GatewayClass => objects.classes.remove(name).is_some(),
        GatewayKind::Gateway => objects.gateways.remove(&key).is_some(),
        GatewayKind::HttpRoute => objects.routes.remove(&key).is_some(),
        GatewayKind::ReferenceGrant => objects.grants.remove(&key).is_some(),
        GatewayKind::Namespace => objects.namespaces.remove(name).is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> (String, String, serde_yaml::Value) {
        let v: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default().to_string();
        (s("apiVersion"), s("kind"), v)
    }

    #[test]
    fn manifests_take_served_versions_and_namespaces_and_compact_them() {
        let mut docs = GatewayDocs::default();
        for text in [
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw, namespace: infra, annotations: {big: x}}\nspec: {gatewayClassName: kproxy}",
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: HTTPRoute\nmetadata: {name: r, namespace: infra}",
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: g, namespace: web}\nspec: {from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: infra}], to: [{group: '', kind: Service}]}",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: web, labels: {team: a}}",
        ] {
            let (v, k, value) = doc(text);
            assert!(docs.add(&v, &k, value).unwrap(), "{k} is taken");
        }
        let (v, k, value) = doc("apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata: {name: t}");
        assert!(!docs.add(&v, &k, value).unwrap(), "not a kind kproxy reads");
        let (v, k, value) =
            doc("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {rules: 7}");
        assert!(docs.add(&v, &k, value).unwrap_err().starts_with("HTTPRoute:"));

        let mut objects = GatewayObjects::default();
        assert!(!objects.is_ready());
        assert!(docs.replace_into(&mut objects));
        assert!(objects.is_ready());
        let gw = &objects.gateways[&("infra".to_string(), "gw".to_string())];
        assert!(gw.metadata.annotations.is_none(), "compacted");
        assert_eq!(objects.namespace_labels("web")["team"], "a");
        assert_eq!(objects.namespace_labels("web")[NAMESPACE_NAME_LABEL], "web");
        assert_eq!(
            objects.namespace_labels("undeclared")[NAMESPACE_NAME_LABEL],
            "undeclared"
        );
        assert!(!docs.apply_into(&mut objects), "unchanged");
        assert!(delete_id(&mut objects, GatewayKind::HttpRoute, "infra", "r"));
        assert!(objects.routes.is_empty());
    }

    #[test]
    fn a_missing_crd_is_a_listed_kind_without_objects() {
        let mut objects = GatewayObjects::default();
        for kind in GatewayKind::ALL {
            assert!(objects.mark_absent(kind));
        }
        assert!(objects.is_ready());
        assert!(!objects.mark_absent(GatewayKind::Gateway), "nothing changed");
    }
}
