//! The Ingress-side objects kproxy knows: Ingresses, IngressClasses and TLS Secrets, as the
//! sources listed them. Kept raw: the route builder converts them all at once, so a change of
//! one object never needs incremental bookkeeping here.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::ResourceExt;

/// The kinds the Ingress proxy waits for before it serves anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum IngressKind {
    Ingress,
    IngressClass,
    Secret,
}

/// Only Secrets of this type are kept (and watched: the API watcher selects on it).
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// `namespace/name` of a namespaced object; IngressClasses are keyed by name alone.
pub type ObjectKey = (String, String);

fn key_of<K: ResourceExt>(obj: &K) -> ObjectKey {
    (obj.namespace().unwrap_or_else(|| "default".into()), obj.name_any())
}

#[derive(Debug, Default, Clone)]
pub struct IngressObjects {
    pub ingresses: BTreeMap<ObjectKey, Ingress>,
    pub classes: BTreeMap<String, IngressClass>,
    pub secrets: BTreeMap<ObjectKey, Secret>,
    /// Gateway API objects (they share the Secrets above), listed on their own.
    pub gateway: super::gateway::objects::GatewayObjects,
    synced: BTreeSet<IngressKind>,
}

/// How one kind is kept in [`IngressObjects`]. Each method returns whether anything changed.
pub trait IngressObject: Sized {
    const KIND: IngressKind;
    fn apply(objects: &mut IngressObjects, obj: &Self) -> bool;
    fn delete(objects: &mut IngressObjects, obj: &Self) -> bool;
    /// A complete list: replaces every object of the kind and marks it synced.
    fn replace(objects: &mut IngressObjects, all: &[Self]) -> bool;
}

fn upsert<K: PartialEq + Clone, V: Ord>(map: &mut BTreeMap<V, K>, key: V, obj: &K) -> bool {
    if map.get(&key) == Some(obj) {
        return false;
    }
    map.insert(key, obj.clone());
    true
}

fn replace_map<K: PartialEq + Clone, V: Ord + Clone>(map: &mut BTreeMap<V, K>, all: Vec<(V, &K)>) -> bool {
    let new: BTreeMap<V, K> = all.into_iter().map(|(k, v)| (k, v.clone())).collect();
    if *map == new {
        return false;
    }
    *map = new;
    true
}

impl IngressObject for Ingress {
    const KIND: IngressKind = IngressKind::Ingress;
    fn apply(objects: &mut IngressObjects, obj: &Self) -> bool {
        upsert(&mut objects.ingresses, key_of(obj), obj)
    }
    fn delete(objects: &mut IngressObjects, obj: &Self) -> bool {
        objects.ingresses.remove(&key_of(obj)).is_some()
    }
    fn replace(objects: &mut IngressObjects, all: &[Self]) -> bool {
        let first = objects.synced.insert(Self::KIND);
        replace_map(&mut objects.ingresses, all.iter().map(|o| (key_of(o), o)).collect()) | first
    }
}

impl IngressObject for IngressClass {
    const KIND: IngressKind = IngressKind::IngressClass;
    fn apply(objects: &mut IngressObjects, obj: &Self) -> bool {
        upsert(&mut objects.classes, obj.name_any(), obj)
    }
    fn delete(objects: &mut IngressObjects, obj: &Self) -> bool {
        objects.classes.remove(&obj.name_any()).is_some()
    }
    fn replace(objects: &mut IngressObjects, all: &[Self]) -> bool {
        let first = objects.synced.insert(Self::KIND);
        replace_map(&mut objects.classes, all.iter().map(|o| (o.name_any(), o)).collect()) | first
    }
}

fn is_tls(secret: &Secret) -> bool {
    secret.type_.as_deref() == Some(TLS_SECRET_TYPE)
}

impl IngressObject for Secret {
    const KIND: IngressKind = IngressKind::Secret;
    fn apply(objects: &mut IngressObjects, obj: &Self) -> bool {
        if !is_tls(obj) {
            return Self::delete(objects, obj);
        }
        upsert(&mut objects.secrets, key_of(obj), obj)
    }
    fn delete(objects: &mut IngressObjects, obj: &Self) -> bool {
        objects.secrets.remove(&key_of(obj)).is_some()
    }
    fn replace(objects: &mut IngressObjects, all: &[Self]) -> bool {
        let first = objects.synced.insert(Self::KIND);
        let tls = all.iter().filter(|s| is_tls(s)).map(|o| (key_of(o), o)).collect();
        replace_map(&mut objects.secrets, tls) | first
    }
}

impl IngressObjects {
    /// True once every kind has been listed completely.
    pub fn is_ready(&self) -> bool {
        [IngressKind::Ingress, IngressKind::IngressClass, IngressKind::Secret]
            .iter()
            .all(|k| self.synced.contains(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(name: &str, ty: &str) -> Secret {
        serde_yaml::from_str(&format!("metadata: {{name: {name}, namespace: ns}}\ntype: {ty}")).unwrap()
    }

    #[test]
    fn only_tls_secrets_are_kept_and_ready_needs_every_kind() {
        let mut o = IngressObjects::default();
        assert!(Secret::replace(
            &mut o,
            &[secret("a", TLS_SECRET_TYPE), secret("b", "Opaque")]
        ));
        assert_eq!(o.secrets.len(), 1);
        assert!(!Secret::apply(&mut o, &secret("a", TLS_SECRET_TYPE)), "unchanged");
        assert!(Secret::apply(&mut o, &secret("a", "Opaque")), "no longer TLS: dropped");
        assert!(o.secrets.is_empty());
        assert!(!o.is_ready());
        Ingress::replace(&mut o, &[]);
        IngressClass::replace(&mut o, &[]);
        assert!(o.is_ready());
    }
}
