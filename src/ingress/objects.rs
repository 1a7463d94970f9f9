//! The Ingress-side objects kproxy knows: Ingresses, IngressClasses and TLS Secrets, reduced as
//! they arrive to the fields the route builder, the status writer and the certificate resolver
//! read (no managedFields, no `kubectl` last-applied copy, no labels; a TLS Secret is parsed
//! as it arrives and kept only as the certificate and key rustls serves, see [`TlsSecret`]).
//! The route builder converts them all at once, so a change of one object needs no
//! incremental bookkeeping here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass, IngressClassSpec, IngressStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use rustls::sign::CertifiedKey;

use super::annotations::{KPROXY_PREFIX, NGINX_PREFIX};
use super::routes::{DEFAULT_CLASS_ANNOTATION, LEGACY_CLASS_ANNOTATION};

/// The kinds the Ingress proxy waits for before it serves anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum IngressKind {
    Ingress,
    IngressClass,
    Secret,
}

/// Only Secrets of this type are kept (and watched: the API watcher selects on it).
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";
/// The keys of a TLS Secret kproxy serves; any other data (`ca.crt`, ...) is dropped.
pub const TLS_SECRET_KEYS: [&str; 2] = ["tls.crt", "tls.key"];

/// `namespace/name` of a namespaced object; IngressClasses are keyed by name alone.
pub type ObjectKey = (String, String);

fn key_of<K: ResourceExt>(obj: &K) -> ObjectKey {
    (obj.namespace().unwrap_or_else(|| "default".into()), obj.name_any())
}

#[derive(Debug, Default, Clone)]
pub struct IngressObjects {
    pub ingresses: BTreeMap<ObjectKey, Ingress>,
    pub classes: BTreeMap<String, IngressClass>,
    pub secrets: BTreeMap<ObjectKey, TlsSecret>,
    /// Gateway API objects (they share the Secrets above), listed on their own.
    pub gateway: super::gateway::objects::GatewayObjects,
    synced: BTreeSet<IngressKind>,
}

/// A `kubernetes.io/tls` Secret as kproxy keeps it: parsed once, as it arrives, into the
/// certificate chain (DER) and signing key rustls serves, with the SHA-256 of the data it came
/// from to tell a rotated Secret from the same one again. Its PEM text is not kept (it was,
/// besides the parsed copy: about 3 KiB per RSA 2048 Secret).
#[derive(Debug, Clone)]
pub struct TlsSecret {
    digest: [u8; 32],
    /// The certificate, or why the Secret cannot be served (the message names the Secret).
    pub parsed: Result<Arc<CertifiedKey>, String>,
}

impl PartialEq for TlsSecret {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl TlsSecret {
    /// Parses `secret` (named `key`): never fails, an unusable Secret is kept with its error.
    pub fn parse(key: &ObjectKey, secret: &Secret) -> TlsSecret {
        TlsSecret {
            digest: data_digest(secret),
            parsed: super::tls::convert_secret(key, secret).map_err(|e| e.to_string()),
        }
    }
}

/// The SHA-256 of the fields a TLS Secret is parsed from (each length-prefixed, so moving
/// bytes from one to the other changes it).
fn data_digest(secret: &Secret) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for k in TLS_SECRET_KEYS {
        match secret.data.as_ref().and_then(|d| d.get(k)) {
            Some(v) => {
                h.update([1]);
                h.update((v.0.len() as u64).to_be_bytes());
                h.update(&v.0);
            }
            None => h.update([0]),
        }
    }
    h.finalize().into()
}

/// How one kind is converted and kept in [`IngressObjects`]. The `*_converted` methods take
/// what [`IngressObject::convert`] made of an object as it arrived (the API watchers stage a
/// list so); the others convert first. Each returns whether anything changed.
pub trait IngressObject: Sized {
    const KIND: IngressKind;
    /// How an object of the kind is named.
    type Key: Ord + Clone + Send + 'static;
    /// What is kept of an object: the object reduced, or (a TLS Secret) what it parses to.
    type Kept: PartialEq + Send + 'static;

    fn key(obj: &Self) -> Self::Key;
    /// What is kept of `obj`; `None` when nothing is (a Secret that is not TLS).
    fn convert(obj: &Self) -> Option<Self::Kept>;
    fn kept(objects: &mut IngressObjects) -> &mut BTreeMap<Self::Key, Self::Kept>;

    /// Stores what [`IngressObject::convert`] made of an object (`None`: forget it).
    fn apply_converted(objects: &mut IngressObjects, key: Self::Key, kept: Option<Self::Kept>) -> bool {
        let map = Self::kept(objects);
        match kept {
            Some(obj) if map.get(&key) == Some(&obj) => false,
            Some(obj) => {
                map.insert(key, obj);
                true
            }
            None => map.remove(&key).is_some(),
        }
    }

    fn delete_key(objects: &mut IngressObjects, key: &Self::Key) -> bool {
        Self::kept(objects).remove(key).is_some()
    }

    /// A complete list, converted: replaces every object of the kind and marks it synced.
    fn replace_converted(objects: &mut IngressObjects, all: Vec<(Self::Key, Option<Self::Kept>)>) -> bool {
        let first = objects.synced.insert(Self::KIND);
        let new: BTreeMap<Self::Key, Self::Kept> = all.into_iter().filter_map(|(k, v)| Some((k, v?))).collect();
        let map = Self::kept(objects);
        if *map == new {
            return first;
        }
        *map = new;
        true
    }

    fn apply(objects: &mut IngressObjects, obj: &Self) -> bool {
        Self::apply_converted(objects, Self::key(obj), Self::convert(obj))
    }

    fn delete(objects: &mut IngressObjects, obj: &Self) -> bool {
        Self::delete_key(objects, &Self::key(obj))
    }

    /// A complete list: replaces every object of the kind and marks it synced.
    fn replace(objects: &mut IngressObjects, all: &[Self]) -> bool {
        let converted = all.iter().map(|o| (Self::key(o), Self::convert(o))).collect();
        Self::replace_converted(objects, converted)
    }
}

/// The metadata kproxy reads of an Ingress-side object: its name, namespace and creation time
/// (the oldest Ingress wins a conflict), and the annotations `keep` selects.
fn slim_meta(meta: &ObjectMeta, keep: impl Fn(&str) -> bool) -> ObjectMeta {
    let annotations: BTreeMap<String, String> = meta
        .annotations
        .iter()
        .flatten()
        .filter(|(k, _)| keep(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        creation_timestamp: meta.creation_timestamp.clone(),
        annotations: (!annotations.is_empty()).then_some(annotations),
        ..ObjectMeta::default()
    }
}

impl IngressObject for Ingress {
    const KIND: IngressKind = IngressKind::Ingress;
    type Key = ObjectKey;
    type Kept = Ingress;

    fn key(obj: &Self) -> ObjectKey {
        key_of(obj)
    }

    /// The spec, the class and proxy annotations, and the load balancer status (which the
    /// status writer compares against).
    fn convert(obj: &Self) -> Option<Self> {
        let routing =
            |k: &str| k.starts_with(NGINX_PREFIX) || k.starts_with(KPROXY_PREFIX) || k == LEGACY_CLASS_ANNOTATION;
        let load_balancer = obj.status.as_ref().and_then(|s| s.load_balancer.clone());
        Some(Ingress {
            metadata: slim_meta(&obj.metadata, routing),
            spec: obj.spec.clone(),
            status: load_balancer.map(|lb| IngressStatus {
                load_balancer: Some(lb),
            }),
        })
    }

    fn kept(objects: &mut IngressObjects) -> &mut BTreeMap<ObjectKey, Self> {
        &mut objects.ingresses
    }
}

impl IngressObject for IngressClass {
    const KIND: IngressKind = IngressKind::IngressClass;
    type Key = String;
    type Kept = IngressClass;

    fn key(obj: &Self) -> String {
        obj.name_any()
    }

    /// The controller and the default-class annotation.
    fn convert(obj: &Self) -> Option<Self> {
        Some(IngressClass {
            metadata: slim_meta(&obj.metadata, |k| k == DEFAULT_CLASS_ANNOTATION),
            spec: obj.spec.as_ref().map(|s| IngressClassSpec {
                controller: s.controller.clone(),
                parameters: None,
            }),
        })
    }

    fn kept(objects: &mut IngressObjects) -> &mut BTreeMap<String, Self> {
        &mut objects.classes
    }
}

impl IngressObject for Secret {
    const KIND: IngressKind = IngressKind::Secret;
    type Key = ObjectKey;
    type Kept = TlsSecret;

    fn key(obj: &Self) -> ObjectKey {
        key_of(obj)
    }

    /// A TLS Secret's certificate and key, parsed; nothing of any other Secret.
    fn convert(obj: &Self) -> Option<TlsSecret> {
        if obj.type_.as_deref() != Some(TLS_SECRET_TYPE) {
            return None;
        }
        Some(TlsSecret::parse(&key_of(obj), obj))
    }

    fn kept(objects: &mut IngressObjects) -> &mut BTreeMap<ObjectKey, TlsSecret> {
        &mut objects.secrets
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
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: ns}}\ntype: {ty}\ndata: {{tls.crt: Y2VydA==, tls.key: a2V5, ca.crt: Y2E=}}"
        ))
        .unwrap()
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

    /// A Secret is parsed as it arrives: a bad one is kept with an error naming it (its hosts
    /// get the default certificate), a good one as its certificate; only `tls.crt` and
    /// `tls.key` count (a changed `ca.crt` is no change).
    #[test]
    fn a_tls_secret_is_kept_parsed() {
        let kept = Secret::convert(&secret("a", TLS_SECRET_TYPE)).unwrap();
        let err = kept.parsed.as_ref().unwrap_err();
        assert!(err.starts_with("Secret ns/a: tls.crt"), "{err}");

        let cert = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
        let mut good = secret("a", TLS_SECRET_TYPE);
        let data = good.data.as_mut().unwrap();
        data.insert("tls.crt".into(), k8s_openapi::ByteString(cert.cert.pem().into_bytes()));
        data.insert(
            "tls.key".into(),
            k8s_openapi::ByteString(cert.key_pair.serialize_pem().into_bytes()),
        );
        let kept = Secret::convert(&good).unwrap();
        assert_eq!(kept.parsed.as_ref().unwrap().cert[0].as_ref(), cert.cert.der().as_ref());
        let mut o = IngressObjects::default();
        assert!(Secret::apply(&mut o, &good));
        good.data
            .as_mut()
            .unwrap()
            .insert("ca.crt".into(), k8s_openapi::ByteString(b"other".to_vec()));
        assert!(!Secret::apply(&mut o, &good), "ca.crt is not read");
        assert!(
            Secret::apply(&mut o, &secret("a", TLS_SECRET_TYPE)),
            "a rotated Secret is a change"
        );
    }

    #[test]
    fn an_ingress_keeps_what_routing_and_status_read() {
        let ing: Ingress = serde_yaml::from_str(
            r#"
metadata:
  name: web
  namespace: ns
  creationTimestamp: "2025-01-01T00:00:00Z"
  labels: {app: web}
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: "{...}"
    nginx.ingress.kubernetes.io/rewrite-target: /
    kubernetes.io/ingress.class: nginx
  managedFields: [{manager: kubectl, operation: Update, fieldsType: FieldsV1, fieldsV1: {f:spec: {}}}]
spec: {ingressClassName: nginx, rules: [{host: a.test}]}
status: {loadBalancer: {ingress: [{ip: 192.0.2.1}]}}
"#,
        )
        .unwrap();
        let kept = Ingress::convert(&ing).unwrap();
        let annotations = kept.metadata.annotations.as_ref().unwrap();
        assert_eq!(
            annotations.keys().collect::<Vec<_>>(),
            [
                "kubernetes.io/ingress.class",
                "nginx.ingress.kubernetes.io/rewrite-target"
            ]
        );
        assert!(kept.metadata.managed_fields.is_none() && kept.metadata.labels.is_none());
        assert_eq!(kept.metadata.creation_timestamp, ing.metadata.creation_timestamp);
        assert_eq!(kept.spec, ing.spec);
        assert_eq!(kept.status, ing.status);
        let mut o = IngressObjects::default();
        assert!(Ingress::apply(&mut o, &ing));
        assert!(!Ingress::apply(&mut o, &ing), "the same object again changes nothing");
    }
}
