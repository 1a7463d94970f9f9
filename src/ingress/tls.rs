//! TLS termination: rustls with the ring provider, certificates from the `kubernetes.io/tls`
//! Secrets that Ingresses name, chosen by SNI (exact host, then `*.` wildcard), and a
//! self-signed default certificate for every other name. Secrets are parsed as they arrive
//! ([`TlsSecret`]), so a rotated certificate is served from the next handshake on.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Secret;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::objects::{ObjectKey, TlsSecret};
use super::routes::{normalize_host, TlsBinding};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("Secret {namespace}/{name}: {reason}")]
    Secret {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("generating the default certificate: {0}")]
    DefaultCert(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

pub type Result<T, E = TlsError> = std::result::Result<T, E>;

/// Parses a `kubernetes.io/tls` Secret's `tls.crt` (PEM chain) and `tls.key` (PEM key).
pub fn convert_secret(key: &ObjectKey, secret: &Secret) -> Result<Arc<CertifiedKey>> {
    let err = |reason: String| TlsError::Secret {
        namespace: key.0.clone(),
        name: key.1.clone(),
        reason,
    };
    let data = secret.data.as_ref();
    let get = |k: &str| data.and_then(|d| d.get(k)).map(|b| b.0.as_slice());
    let crt = get("tls.crt").ok_or_else(|| err("no tls.crt".into()))?;
    let key_pem = get("tls.key").ok_or_else(|| err("no tls.key".into()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(crt)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| err(format!("tls.crt: {e}")))?;
    if certs.is_empty() {
        return Err(err("tls.crt holds no certificate".into()));
    }
    let private = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| err(format!("tls.key: {e}")))?;
    let signer = any_supported_type(&private).map_err(|e| err(format!("tls.key: {e}")))?;
    let certified = CertifiedKey::new(certs, signer);
    certified
        .keys_match()
        .map_err(|e| err(format!("tls.key does not match tls.crt: {e}")))?;
    Ok(Arc::new(certified))
}

/// A self-signed certificate for names no Secret covers (as ingress-nginx's "Fake Certificate").
pub fn default_certificate() -> Result<Arc<CertifiedKey>> {
    let cert = rcgen::generate_simple_self_signed(vec!["kproxy-default.invalid".to_string()])
        .map_err(|e| TlsError::DefaultCert(e.to_string()))?;
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key =
        PrivateKeyDer::try_from(cert.key_pair.serialize_der()).map_err(|e| TlsError::DefaultCert(e.to_string()))?;
    let signer = any_supported_type(&key).map_err(|e| TlsError::DefaultCert(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(vec![der], signer)))
}

/// Certificates by SNI name.
#[derive(Debug, Default)]
struct CertMap {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// Gateway API wildcards (one or more labels), keyed by the suffix after `*.`.
    suffix: HashMap<String, Arc<CertifiedKey>>,
    /// A Gateway listener without hostname: every other name, and clients without SNI.
    fallback: Option<Arc<CertifiedKey>>,
}

/// The SNI resolver the HTTPS listener uses; [`CertResolver::update`] swaps its certificates.
#[derive(Debug)]
pub struct CertResolver {
    default: Arc<CertifiedKey>,
    map: RwLock<Arc<CertMap>>,
}

impl CertResolver {
    pub fn new(default: Arc<CertifiedKey>) -> Self {
        CertResolver {
            default,
            map: RwLock::new(Arc::default()),
        }
    }

    /// Installs the certificates `bindings` name. Returns one message per Secret that is
    /// missing or malformed (its hosts get the default certificate), naming it.
    pub fn update(&self, bindings: &[TlsBinding], secrets: &BTreeMap<ObjectKey, TlsSecret>) -> Vec<String> {
        let mut problems = Vec::new();
        let mut parsed: BTreeMap<ObjectKey, Option<Arc<CertifiedKey>>> = BTreeMap::new();
        let mut map = CertMap::default();
        for b in bindings {
            let cert = parsed.entry(b.secret.clone()).or_insert_with(|| {
                let Some(secret) = secrets.get(&b.secret) else {
                    problems.push(format!(
                        "Secret {}/{} not found (or not of type kubernetes.io/tls); its hosts use the default certificate",
                        b.secret.0, b.secret.1
                    ));
                    return None;
                };
                match &secret.parsed {
                    Ok(cert) => Some(cert.clone()),
                    Err(e) => {
                        problems.push(format!("{e}; its hosts use the default certificate"));
                        None
                    }
                }
            });
            if let Some(cert) = cert {
                if b.host.is_empty() {
                    map.fallback.get_or_insert_with(|| cert.clone());
                    continue;
                }
                let (table, name) = match b.host.strip_prefix("*.") {
                    Some(suffix) if b.suffix_match => (&mut map.suffix, suffix.to_string()),
                    Some(suffix) => (&mut map.wildcard, suffix.to_string()),
                    None => (&mut map.exact, b.host.clone()),
                };
                // The oldest Ingress's Secret keeps a host (bindings come oldest first).
                table.entry(name).or_insert_with(|| cert.clone());
            }
        }
        *self.map.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
        problems
    }

    /// The certificate for an SNI name (the default one when none matches or there is no SNI).
    pub fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner()).clone();
        let fallback = || map.fallback.clone().unwrap_or_else(|| self.default.clone());
        let Some(name) = sni.map(normalize_host) else {
            return fallback();
        };
        if let Some(c) = map.exact.get(&name) {
            return c.clone();
        }
        if let Some(c) = name.split_once('.').and_then(|(_, suffix)| map.wildcard.get(suffix)) {
            return c.clone();
        }
        // The longest Gateway API wildcard suffix first.
        let mut rest = name.as_str();
        while let Some((_, suffix)) = rest.split_once('.') {
            if let Some(c) = map.suffix.get(suffix) {
                return c.clone();
            }
            rest = suffix;
        }
        fallback()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// The HTTPS listener's configuration: TLS 1.2 and 1.3, ALPN h2 and http/1.1, SNI from `resolver`.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Secrets as the Ingress objects keep them: parsed.
    fn parsed(secrets: &BTreeMap<ObjectKey, Secret>) -> BTreeMap<ObjectKey, TlsSecret> {
        secrets
            .iter()
            .map(|(k, s)| (k.clone(), TlsSecret::parse(k, s)))
            .collect()
    }

    fn tls_secret(name: &str, host: &str) -> Secret {
        let cert = rcgen::generate_simple_self_signed(vec![host.to_string()]).unwrap();
        let yaml = format!("metadata: {{name: {name}, namespace: ns}}\ntype: kubernetes.io/tls\nstringData: {{}}");
        let mut s: Secret = serde_yaml::from_str(&yaml).unwrap();
        s.data = Some(BTreeMap::from([
            (
                "tls.crt".to_string(),
                k8s_openapi::ByteString(cert.cert.pem().into_bytes()),
            ),
            (
                "tls.key".to_string(),
                k8s_openapi::ByteString(cert.key_pair.serialize_pem().into_bytes()),
            ),
        ]));
        s
    }

    fn key(name: &str) -> ObjectKey {
        ("ns".into(), name.into())
    }

    fn binding(host: &str, secret: &str) -> TlsBinding {
        TlsBinding {
            host: host.into(),
            secret: key(secret),
            suffix_match: false,
        }
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_default_and_bad_secrets_fall_back() {
        let default = default_certificate().unwrap();
        let r = CertResolver::new(default.clone());
        let mut bad = tls_secret("bad", "bad.test");
        bad.data
            .as_mut()
            .unwrap()
            .insert("tls.key".into(), k8s_openapi::ByteString(b"garbage".to_vec()));
        let secrets = BTreeMap::from([
            (key("a"), tls_secret("a", "a.test")),
            (key("w"), tls_secret("w", "*.example.com")),
            (key("bad"), bad),
        ]);
        let problems = r.update(
            &[
                binding("a.test", "a"),
                binding("*.example.com", "w"),
                binding("bad.test", "bad"),
                binding("gone.test", "missing"),
            ],
            &parsed(&secrets),
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("Secret ns/bad")));
        assert!(problems.iter().any(|p| p.contains("Secret ns/missing")));
        let same = |a: &Arc<CertifiedKey>, b: &Arc<CertifiedKey>| a.cert == b.cert;
        let a = r.pick(Some("a.test"));
        let w = r.pick(Some("x.example.com"));
        assert!(!same(&a, &default) && !same(&w, &default) && !same(&a, &w));
        assert!(same(&r.pick(Some("A.TEST")), &a));
        assert!(same(&r.pick(Some("x.y.example.com")), &default), "one label only");
        assert!(same(&r.pick(Some("bad.test")), &default));
        assert!(same(&r.pick(None), &default));

        // Rotation: new data, new certificate.
        let secrets = BTreeMap::from([(key("a"), tls_secret("a", "a.test"))]);
        assert!(r.update(&[binding("a.test", "a")], &parsed(&secrets)).is_empty());
        assert!(!same(&r.pick(Some("a.test")), &a));
    }

    #[test]
    fn gateway_bindings_match_deeper_names_and_a_listener_without_hostname_takes_the_rest() {
        let default = default_certificate().unwrap();
        let r = CertResolver::new(default.clone());
        let secrets = BTreeMap::from([
            (key("w"), tls_secret("w", "*.example.com")),
            (key("all"), tls_secret("all", "all.test")),
        ]);
        let gateway = |host: &str, secret: &str| TlsBinding {
            suffix_match: true,
            ..binding(host, secret)
        };
        assert!(r
            .update(&[gateway("*.example.com", "w"), gateway("", "all")], &parsed(&secrets))
            .is_empty());
        let same = |a: &Arc<CertifiedKey>, b: &Arc<CertifiedKey>| a.cert == b.cert;
        let w = r.pick(Some("a.example.com"));
        assert!(same(&r.pick(Some("a.b.example.com")), &w), "any number of labels");
        let all = r.pick(None);
        assert!(
            !same(&all, &default) && !same(&all, &w),
            "no SNI: the listener without hostname"
        );
        assert!(same(&r.pick(Some("other.test")), &all));
    }
}
