//! Desired state from YAML files: `--manifests PATH` (a file or a directory, multi-document).
//!
//! The files stand in for the API server: whenever one changes, the complete set replaces the
//! previous one, exactly like a relist. Only the files that changed are parsed again; the
//! others' objects are kept from their last read, so one edited file among thousands of
//! Services costs that file, not all of them. Like the API server, this
//! source allocates a cluster IP (from `--service-cluster-ip-range`) and node ports to Services
//! that have none, deterministically, so manifests written for `kubectl apply` work unchanged.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::sync::SharedState;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: document {doc}: {message}")]
    Parse { path: PathBuf, doc: usize, message: String },
}

/// The objects found in the manifest files.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub nodes: Vec<Node>,
    pub ingresses: Vec<Ingress>,
    pub ingress_classes: Vec<IngressClass>,
    /// Secrets of type kubernetes.io/tls only (the Ingress proxy's certificates).
    pub secrets: Vec<Secret>,
}

/// The files under `path`, sorted: the path itself, or the `.yaml`/`.yml`/`.json` files of a
/// directory tree.
fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let meta = std::fs::metadata(path).map_err(|source| ManifestError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| ManifestError::Read {
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let p = entry.path();
            if p.is_dir() {
                dirs.push(p);
            } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A fingerprint of the files (names, sizes, modification times) to notice changes cheaply.
fn fingerprint(path: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    manifest_files(path)
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            let mtime = meta.and_then(|m| m.modified().ok());
            (p, len, mtime)
        })
        .collect()
}

impl Objects {
    fn extend_from(&mut self, other: &Objects) {
        self.services.extend_from_slice(&other.services);
        self.slices.extend_from_slice(&other.slices);
        self.nodes.extend_from_slice(&other.nodes);
        self.ingresses.extend_from_slice(&other.ingresses);
        self.ingress_classes.extend_from_slice(&other.ingress_classes);
        self.secrets.extend_from_slice(&other.secrets);
    }
}

/// Reads every manifest under `path`. Kinds other than Service, EndpointSlice, Node, Ingress,
/// IngressClass and TLS Secrets (a Deployment, say) are skipped; a document that cannot be parsed is an error naming it.
pub fn read_manifests(path: &Path) -> Result<Objects, ManifestError> {
    ParsedFiles::default().read(path)
}

/// The objects of one file.
fn read_file(file: &Path) -> Result<Objects, ManifestError> {
    let mut objects = Objects::default();
    let text = std::fs::read_to_string(file).map_err(|source| ManifestError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| ManifestError::Parse {
            path: file.to_path_buf(),
            doc: i + 1,
            message: e.to_string(),
        })?;
        add_document(value, &mut objects).map_err(|message| ManifestError::Parse {
            path: file.to_path_buf(),
            doc: i + 1,
            message,
        })?;
    }
    Ok(objects)
}

/// Each file's objects as last parsed, with the size and modification time they were read at.
#[derive(Default)]
struct ParsedFiles {
    files: std::collections::BTreeMap<PathBuf, (u64, Option<SystemTime>, Objects)>,
}

impl ParsedFiles {
    /// Every object under `path`, parsing again only the files whose size or modification time
    /// changed (and new ones). On error nothing of the failed file is kept, so it is read again.
    fn read(&mut self, path: &Path) -> Result<Objects, ManifestError> {
        let files = manifest_files(path)?;
        self.files.retain(|f, _| files.binary_search(f).is_ok());
        let mut all = Objects::default();
        for file in files {
            let meta = std::fs::metadata(&file).map_err(|source| ManifestError::Read {
                path: file.clone(),
                source,
            })?;
            let stamp = (meta.len(), meta.modified().ok());
            let fresh = self
                .files
                .get(&file)
                .is_some_and(|(len, mtime, _)| (*len, *mtime) == stamp);
            if !fresh {
                self.files.remove(&file);
                let objects = read_file(&file)?;
                self.files.insert(file.clone(), (stamp.0, stamp.1, objects));
            }
            if let Some((_, _, objects)) = self.files.get(&file) {
                all.extend_from(objects);
            }
        }
        Ok(all)
    }
}

fn add_document(value: serde_yaml::Value, objects: &mut Objects) -> Result<(), String> {
    if value.is_null() {
        return Ok(());
    }
    let api_version = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let kind = value
        .get("kind")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                for item in items.clone() {
                    add_document(item, objects)?;
                }
            }
        }
        ("v1", "Service") => objects
            .services
            .push(serde_yaml::from_value(value).map_err(|e| format!("Service: {e}"))?),
        ("discovery.k8s.io/v1", "EndpointSlice") => objects
            .slices
            .push(serde_yaml::from_value(value).map_err(|e| format!("EndpointSlice: {e}"))?),
        ("v1", "Node") => objects
            .nodes
            .push(serde_yaml::from_value(value).map_err(|e| format!("Node: {e}"))?),
        ("networking.k8s.io/v1", "Ingress") => objects
            .ingresses
            .push(serde_yaml::from_value(value).map_err(|e| format!("Ingress: {e}"))?),
        ("networking.k8s.io/v1", "IngressClass") => objects
            .ingress_classes
            .push(serde_yaml::from_value(value).map_err(|e| format!("IngressClass: {e}"))?),
        ("v1", "Secret") => {
            let mut secret: Secret = serde_yaml::from_value(value).map_err(|e| format!("Secret: {e}"))?;
            if secret.type_.as_deref() == Some(crate::ingress::objects::TLS_SECRET_TYPE) {
                // The API server merges stringData into data; do the same.
                if let Some(string_data) = secret.string_data.take() {
                    let data = secret.data.get_or_insert_with(Default::default);
                    for (k, v) in string_data {
                        data.insert(k, k8s_openapi::ByteString(v.into_bytes()));
                    }
                }
                objects.secrets.push(secret);
            }
        }
        ("", _) | (_, "") => return Err("not a Kubernetes object (no apiVersion or kind)".into()),
        _ => {
            tracing::debug!(%api_version, %kind, "ignoring manifest of a kind kproxy does not proxy")
        }
    }
    Ok(())
}

/// Gives Services without a cluster IP one from `range`, and NodePort/LoadBalancer ports without
/// a node port one from 30000-32767, as the API server would. Deterministic: a hash of the
/// Service's name picks the start, collisions move to the next free value.
pub fn allocate(services: &mut [Service], range: &IpNet) {
    let mut used_ips: BTreeSet<IpAddr> = BTreeSet::new();
    let mut used_ports: BTreeSet<i32> = BTreeSet::new();
    for svc in services.iter() {
        if let Some(spec) = &svc.spec {
            if let Some(ip) = spec.cluster_ip.as_ref().and_then(|ip| ip.parse().ok()) {
                used_ips.insert(ip);
            }
            used_ports.extend(spec.ports.iter().flatten().filter_map(|p| p.node_port));
        }
    }
    // Sorted by name so the allocation does not depend on file order.
    let mut order: Vec<usize> = (0..services.len()).collect();
    order.sort_by_key(|i| {
        let m = &services[*i].metadata;
        (
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
        )
    });
    for i in order {
        let svc = &mut services[i];
        let key = format!(
            "{}/{}",
            svc.metadata.namespace.as_deref().unwrap_or("default"),
            svc.metadata.name.as_deref().unwrap_or_default()
        );
        let Some(spec) = svc.spec.as_mut() else {
            continue;
        };
        let svc_type = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
        if svc_type == "ExternalName" {
            continue;
        }
        if spec.cluster_ip.as_deref().unwrap_or_default().is_empty() && spec.cluster_ips.is_none() {
            if let Some(ip) = pick_ip(range, &key, &used_ips) {
                tracing::info!(service = %key, %ip, "allocated cluster IP");
                used_ips.insert(ip);
                spec.cluster_ip = Some(ip.to_string());
            }
        }
        if matches!(svc_type.as_str(), "NodePort" | "LoadBalancer") {
            for (n, port) in spec.ports.iter_mut().flatten().enumerate() {
                if port.node_port.unwrap_or(0) == 0 {
                    let np = pick_node_port(&format!("{key}#{n}"), &used_ports);
                    tracing::info!(service = %key, node_port = np, "allocated node port");
                    used_ports.insert(np);
                    port.node_port = Some(np);
                }
            }
        }
    }
}

fn hash64(s: &str) -> u64 {
    let d = Sha256::digest(s.as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

fn pick_ip(range: &IpNet, key: &str, used: &BTreeSet<IpAddr>) -> Option<IpAddr> {
    let hosts: Vec<IpAddr> = match range {
        // The first address is the network and the second is kept for `kubernetes.default`.
        IpNet::V4(n) => {
            let size = 1u64 << (32 - n.prefix_len());
            if size < 4 {
                return None;
            }
            let base = u32::from(n.network()) as u64;
            let start = hash64(key) % (size - 3);
            return (0..size - 3)
                .map(|i| IpAddr::from(std::net::Ipv4Addr::from((base + 2 + (start + i) % (size - 3)) as u32)))
                .find(|ip| !used.contains(ip));
        }
        IpNet::V6(n) => {
            let base = u128::from(n.network());
            let span = 1u128 << (128 - n.prefix_len()).min(64);
            let start = u128::from(hash64(key)) % (span - 3);
            (0..1024u128)
                .map(|i| IpAddr::from(std::net::Ipv6Addr::from(base + 2 + (start + i) % (span - 3))))
                .collect()
        }
    };
    hosts.into_iter().find(|ip| !used.contains(ip))
}

fn pick_node_port(key: &str, used: &BTreeSet<i32>) -> i32 {
    const LOW: i32 = 30000;
    const SIZE: i32 = 2768;
    let start = (hash64(key) % SIZE as u64) as i32;
    (0..SIZE)
        .map(|i| LOW + (start + i) % SIZE)
        .find(|p| !used.contains(p))
        .unwrap_or(LOW)
}

/// Pushes the manifests' objects into the store, as one complete list of every kind.
pub fn load_into(state: &SharedState, mut objects: Objects, node_name: &str, range: &IpNet) {
    allocate(&mut objects.services, range);
    let node = objects
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name))
        .cloned()
        .unwrap_or_else(|| Node {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(node_name.to_string()),
                ..Default::default()
            },
            ..Default::default()
        });
    state.update(|s| {
        let a = s.replace_services(objects.services.iter());
        let b = s.replace_slices(objects.slices.iter());
        let c = s.apply_node(&node);
        a | b | c
    });
    state.update_ingress(|s| {
        use crate::ingress::objects::IngressObject;
        let a = Ingress::replace(s, &objects.ingresses);
        let b = IngressClass::replace(s, &objects.ingress_classes);
        let c = Secret::replace(s, &objects.secrets);
        a | b | c
    });
}

/// Reads the manifests now and again whenever a file changes, until `shutdown`.
pub async fn run(
    state: Arc<SharedState>,
    path: PathBuf,
    node_name: String,
    range: IpNet,
    poll: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last: Option<Vec<_>> = None;
    let mut parsed = ParsedFiles::default();
    loop {
        let print = fingerprint(&path);
        if last.as_ref() != Some(&print) {
            match parsed.read(&path) {
                Ok(objects) => {
                    tracing::info!(
                        path = %path.display(),
                        services = objects.services.len(),
                        endpoint_slices = objects.slices.len(),
                        ingresses = objects.ingresses.len(),
                        "loaded manifests"
                    );
                    load_into(&state, objects, &node_name, &range);
                }
                // Keep serving the last good set: a half-written file must not drop Services.
                Err(e) => tracing::error!("{e}; keeping the previously loaded manifests"),
            }
            last = Some(print);
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kproxy-manifests-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("all.yaml"), text).unwrap();
        dir
    }

    const WALKTHROUGH: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: myapp
spec:
  replicas: 2
  selector:
    matchLabels:
      app: myapp
  template:
    metadata:
      labels:
        app: myapp
    spec:
      containers:
        - name: myapp
          image: nginx
          ports:
            - containerPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: myapp-svc
spec:
  selector:
    app: myapp
  ports:
    - protocol: TCP
      port: 80
      targetPort: 80
  type: ClusterIP
"#;

    #[test]
    fn walkthrough_manifests_load_and_get_a_cluster_ip() {
        let dir = tmp("walk", WALKTHROUGH);
        let mut objects = read_manifests(&dir).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(objects.services.len(), 1);
        let range: IpNet = "10.96.0.0/12".parse().unwrap();
        allocate(&mut objects.services, &range);
        let ip: IpAddr = objects.services[0]
            .spec
            .as_ref()
            .unwrap()
            .cluster_ip
            .as_ref()
            .unwrap()
            .parse()
            .unwrap();
        assert!(range.contains(&ip));
        // Deterministic.
        let mut again = read_manifests_str(WALKTHROUGH);
        allocate(&mut again.services, &range);
        assert_eq!(
            again.services[0].spec.as_ref().unwrap().cluster_ip,
            Some(ip.to_string())
        );
    }

    fn read_manifests_str(text: &str) -> Objects {
        let mut o = Objects::default();
        for doc in serde_yaml::Deserializer::from_str(text) {
            add_document(serde_yaml::Value::deserialize(doc).unwrap(), &mut o).unwrap();
        }
        o
    }

    #[test]
    fn allocation_avoids_taken_addresses_and_ports() {
        let mut o = read_manifests_str(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {type: NodePort, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {type: NodePort, ports: [{port: 80}]}\n",
        );
        allocate(&mut o.services, &"10.96.0.0/30".parse().unwrap());
        let a = o.services[0].spec.as_ref().unwrap();
        let b = o.services[1].spec.as_ref().unwrap();
        assert_eq!(a.cluster_ip.as_deref(), Some("10.96.0.2"));
        assert_eq!(b.cluster_ip, None, "a /30 has room for one Service only");
        let pa = a.ports.as_ref().unwrap()[0].node_port.unwrap();
        let pb = b.ports.as_ref().unwrap()[0].node_port.unwrap();
        assert!((30000..=32767).contains(&pa) && pa != pb);
    }

    #[test]
    fn only_changed_files_are_parsed_again() {
        let dir = tmp("cache", "");
        std::fs::remove_file(dir.join("all.yaml")).unwrap();
        let svc = |name: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{clusterIP: 10.96.0.9, ports: [{{port: 80}}]}}\n")
        };
        let (a, b) = (dir.join("a.yaml"), dir.join("b.yaml"));
        std::fs::write(&a, svc("a")).unwrap();
        std::fs::write(&b, svc("b")).unwrap();
        let mut parsed = ParsedFiles::default();
        assert_eq!(parsed.read(&dir).unwrap().services.len(), 2);

        // b's bytes go bad behind the cache's back (same size, same modification time): it is
        // not parsed again while a changes.
        let stamp = std::fs::metadata(&b).unwrap().modified().unwrap();
        std::fs::write(&b, "!".repeat(svc("b").len())).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&b)
            .unwrap()
            .set_modified(stamp)
            .unwrap();
        std::fs::write(&a, svc("a2")).unwrap();
        let names: Vec<String> = parsed
            .read(&dir)
            .unwrap()
            .services
            .iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect();
        assert_eq!(names, ["a2", "b"]);

        // Once b's stamp changes it is read, and its error names it.
        std::fs::write(&b, "!: [").unwrap();
        let err = parsed.read(&dir).unwrap_err().to_string();
        assert!(err.contains("b.yaml"), "{err}");
        // A removed file's objects are gone.
        std::fs::remove_file(&b).unwrap();
        assert_eq!(parsed.read(&dir).unwrap().services.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_document_is_named() {
        let dir = tmp(
            "bad",
            "apiVersion: v1\nkind: Service\nmetadata: {name: ok}\n---\nkind: [\n",
        );
        let err = read_manifests(&dir).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).ok();
        assert!(err.contains("all.yaml") && err.contains("document 2"), "{err}");
    }

    #[test]
    fn ingress_kinds_and_tls_secrets_are_read() {
        let o = read_manifests_str(
            "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: i}\n---\napiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: c}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\ntype: kubernetes.io/tls\nstringData: {tls.crt: CERT}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: o}\ntype: Opaque\n",
        );
        assert_eq!((o.ingresses.len(), o.ingress_classes.len(), o.secrets.len()), (1, 1, 1));
        let data = o.secrets[0].data.as_ref().unwrap();
        assert_eq!(data["tls.crt"].0, b"CERT");
    }

    #[test]
    fn list_kind_is_unpacked() {
        let o = read_manifests_str(
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata: {name: n1}\n",
        );
        assert_eq!(o.nodes.len(), 1);
    }
}
