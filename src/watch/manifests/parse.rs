//! Manifest text to Kubernetes objects: multi-document YAML (JSON is YAML too), `v1 List`s
//! unpacked, the kinds kproxy reads kept and every other kind (a Deployment, say) skipped.
//! Pure: the fuzz target `manifests` drives it with arbitrary bytes.

use std::fmt;

use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use crate::ingress::gateway::objects::{GatewayDoc, GatewayDocs, GatewayKind};
use crate::ingress::objects::TLS_SECRET_TYPE;

/// `v1 List`s nest; a document nested deeper than this is refused rather than recursed into.
const MAX_LIST_DEPTH: usize = 8;

/// Why a manifest does not parse: which document (1-based) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("document {doc}: {message}")]
pub struct ParseError {
    pub doc: usize,
    pub message: String,
}

/// The kinds the manifest source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    Ingress,
    IngressClass,
    Secret,
    /// Gateway API kinds, and Namespaces (their labels select routes).
    Gateway(GatewayKind),
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Ingress => "Ingress",
            Kind::IngressClass => "IngressClass",
            Kind::Secret => "Secret",
            Kind::Gateway(kind) => kind.as_str(),
        }
    }

    /// Nodes, IngressClasses, GatewayClasses and Namespaces belong to no namespace.
    fn namespaced(self) -> bool {
        match self {
            Kind::Node | Kind::IngressClass => false,
            Kind::Gateway(kind) => kind.namespaced(),
            _ => true,
        }
    }
}

/// Which object: its kind, namespace (empty for cluster-scoped kinds) and name. Two documents
/// with the same identity are the same object, as for `kubectl apply`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectId {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectId {
    /// Metadata naming this object, for a deletion.
    pub fn meta(&self) -> ObjectMeta {
        ObjectMeta {
            name: Some(self.name.clone()),
            namespace: self.kind.namespaced().then(|| self.namespace.clone()),
            ..ObjectMeta::default()
        }
    }
}

impl fmt::Display for ObjectId {
    /// `Service default/web`, `IngressClass nginx`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind.namespaced() {
            write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
        } else {
            write!(f, "{} {}", self.kind.as_str(), self.name)
        }
    }
}

/// One object of a kind kproxy reads.
// Unboxed: objects only live between parsing a file and applying it.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
    Ingress(Ingress),
    IngressClass(IngressClass),
    /// Secrets of type `kubernetes.io/tls` only (the Ingress proxy's certificates).
    Secret(Secret),
    Gateway(GatewayDoc),
}

impl Object {
    fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::Ingress(o) => &o.metadata,
            Object::IngressClass(o) => &o.metadata,
            Object::Secret(o) => &o.metadata,
            Object::Gateway(o) => o.meta(),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Node(_) => Kind::Node,
            Object::Ingress(_) => Kind::Ingress,
            Object::IngressClass(_) => Kind::IngressClass,
            Object::Secret(_) => Kind::Secret,
            Object::Gateway(o) => Kind::Gateway(o.kind()),
        }
    }

    pub fn id(&self) -> ObjectId {
        let kind = self.kind();
        let meta = self.meta();
        ObjectId {
            kind,
            namespace: if kind.namespaced() {
                meta.namespace.clone().unwrap_or_default()
            } else {
                String::new()
            },
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// The objects of one manifest, each with its document number (1-based), in document order.
/// A document that cannot be parsed fails the whole manifest, naming it: half a file is not
/// what its author meant.
pub fn parse_manifest(text: &str) -> Result<Vec<(usize, Object)>, ParseError> {
    let mut objects = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let fail = |message: String| ParseError { doc: i + 1, message };
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| fail(e.to_string()))?;
        let mut found = Vec::new();
        add_document(value, &mut found, 0).map_err(fail)?;
        objects.extend(found.into_iter().map(|o| (i + 1, o)));
    }
    Ok(objects)
}

fn decode<T: serde::de::DeserializeOwned>(kind: &str, value: serde_yaml::Value) -> Result<T, String> {
    serde_yaml::from_value(value).map_err(|e| format!("{kind}: {e}"))
}

fn add_document(value: serde_yaml::Value, out: &mut Vec<Object>, depth: usize) -> Result<(), String> {
    if value.is_null() {
        return Ok(());
    }
    let text = |key: &str| value.get(key).and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let (api_version, kind) = (text("apiVersion"), text("kind"));
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            if depth >= MAX_LIST_DEPTH {
                return Err(format!("a List nested more than {MAX_LIST_DEPTH} deep"));
            }
            let items = match value.get("items") {
                None | Some(serde_yaml::Value::Null) => return Ok(()),
                Some(serde_yaml::Value::Sequence(items)) => items.clone(),
                Some(_) => return Err("List: items is not a list".into()),
            };
            for item in items {
                add_document(item, out, depth + 1)?;
            }
            return Ok(());
        }
        ("v1", "Service") => Object::Service(decode("Service", value)?),
        ("discovery.k8s.io/v1", "EndpointSlice") => Object::EndpointSlice(decode("EndpointSlice", value)?),
        ("v1", "Node") => Object::Node(decode("Node", value)?),
        ("networking.k8s.io/v1", "Ingress") => Object::Ingress(decode("Ingress", value)?),
        ("networking.k8s.io/v1", "IngressClass") => Object::IngressClass(decode("IngressClass", value)?),
        ("v1", "Secret") => {
            let mut secret: Secret = decode("Secret", value)?;
            if secret.type_.as_deref() != Some(TLS_SECRET_TYPE) {
                return Ok(());
            }
            // The API server merges stringData into data; do the same.
            if let Some(string_data) = secret.string_data.take() {
                let data = secret.data.get_or_insert_with(Default::default);
                for (k, v) in string_data {
                    data.insert(k, k8s_openapi::ByteString(v.into_bytes()));
                }
            }
            Object::Secret(secret)
        }
        ("", _) | (_, "") => return Err("not a Kubernetes object (no apiVersion or kind)".into()),
        (v, k) if GatewayDocs::reads(v, k) => match GatewayDoc::parse(v, k, value)? {
            Some(doc) => Object::Gateway(doc),
            None => return Ok(()),
        },
        _ => {
            tracing::debug!(%api_version, %kind, "ignoring manifest of a kind kproxy does not proxy");
            return Ok(());
        }
    };
    out.push(with_defaults(object)?);
    Ok(())
}

/// What `kubectl apply` would fill in or refuse: a name is required, and a namespaced object
/// without a namespace lands in `default`.
fn with_defaults(mut object: Object) -> Result<Object, String> {
    let kind = object.kind();
    let meta = match &mut object {
        Object::Service(o) => &mut o.metadata,
        Object::EndpointSlice(o) => &mut o.metadata,
        Object::Node(o) => &mut o.metadata,
        Object::Ingress(o) => &mut o.metadata,
        Object::IngressClass(o) => &mut o.metadata,
        Object::Secret(o) => &mut o.metadata,
        Object::Gateway(o) => o.meta_mut(),
    };
    if meta.name.as_deref().unwrap_or_default().is_empty() {
        return Err(format!("{}: metadata.name is required", kind.as_str()));
    }
    if kind.namespaced() && meta.namespace.as_deref().unwrap_or_default().is_empty() {
        meta.namespace = Some("default".into());
    }
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(text: &str) -> Vec<Kind> {
        parse_manifest(text)
            .unwrap()
            .into_iter()
            .map(|(_, o)| o.kind())
            .collect()
    }

    #[test]
    fn kinds_kproxy_reads_are_kept_and_others_skipped() {
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\napiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: i}\n---\napiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: c}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\ntype: kubernetes.io/tls\nstringData: {tls.crt: CERT}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: o}\ntype: Opaque\n";
        let objects = parse_manifest(text).unwrap();
        assert_eq!(
            objects.iter().map(|(_, o)| o.kind()).collect::<Vec<_>>(),
            [Kind::Ingress, Kind::IngressClass, Kind::Secret]
        );
        assert_eq!(
            objects.iter().map(|(doc, _)| *doc).collect::<Vec<_>>(),
            [2, 3, 4],
            "document numbers"
        );
        let Object::Secret(secret) = &objects[2].1 else {
            panic!("a Secret")
        };
        assert_eq!(secret.data.as_ref().unwrap()["tls.crt"].0, b"CERT");
    }

    #[test]
    fn list_is_unpacked() {
        assert_eq!(
            kinds("apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata: {name: n1}\n"),
            [Kind::Node]
        );
        assert_eq!(kinds("apiVersion: v1\nkind: List\n"), []);
        assert!(parse_manifest("apiVersion: v1\nkind: List\nitems: 3\n").is_err());
    }

    #[test]
    fn namespaced_objects_default_to_the_default_namespace() {
        let objects = parse_manifest(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: n, namespace: x}\n",
        )
        .unwrap();
        assert_eq!(objects[0].1.id().to_string(), "Service default/a");
        assert_eq!(objects[1].1.id().to_string(), "Node n");
        assert_eq!(objects[0].1.id().meta().namespace.as_deref(), Some("default"));
    }

    #[test]
    fn bad_documents_are_named() {
        let err = parse_manifest("apiVersion: v1\nkind: Service\nmetadata: {name: ok}\n---\nkind: [\n").unwrap_err();
        assert_eq!(err.doc, 2, "{err}");
        let err = parse_manifest("apiVersion: v1\nkind: Service\nmetadata: {}\n").unwrap_err();
        assert!(err.message.contains("metadata.name"), "{err}");
        let err = parse_manifest("just text\n").unwrap_err();
        assert!(err.message.contains("not a Kubernetes object"), "{err}");
    }

    #[test]
    fn lists_nested_without_end_are_refused() {
        let mut text = String::from("apiVersion: v1\nkind: Node\nmetadata: {name: n}\n");
        for _ in 0..(MAX_LIST_DEPTH + 1) {
            let indented: String = text.lines().map(|l| format!("    {l}\n")).collect();
            text = format!("apiVersion: v1\nkind: List\nitems:\n  -\n{indented}");
        }
        let err = parse_manifest(&text).unwrap_err();
        assert!(err.message.contains("nested"), "{err}");
    }
}
