//! Desired state from YAML files: `--manifests PATH` (a file or a directory, multi-document).
//!
//! The files stand in for the API server: whenever one changes, the complete set replaces the
//! previous one, exactly like a relist. Only the files that changed are parsed again; the
//! others' objects are kept from their last read, so one edited file among thousands of
//! Services costs that file, not all of them. Like the API server, this
//! source allocates a cluster IP (from `--service-cluster-ip-range`) and node ports to Services
//! that have none, deterministically, so manifests written for `kubectl apply` work unchanged.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use tokio::sync::watch;

use super::allocate::{allocate, id_of, Assigned, ServiceId, Taken};
use crate::ingress::gateway::objects::{delete_id, GatewayDocs, GatewayKind};
use crate::ingress::objects::IngressObject;
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
    /// Gateway API objects and Namespaces.
    pub gateway: GatewayDocs,
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

/// A file's size and modification time: a change in either means it must be read again.
type Stamp = (u64, Option<SystemTime>);

fn stamp_of(file: &Path) -> Result<Stamp, ManifestError> {
    let meta = std::fs::metadata(file).map_err(|source| ManifestError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    Ok((meta.len(), meta.modified().ok()))
}

impl Objects {
    fn extend(&mut self, other: Objects) {
        self.services.extend(other.services);
        self.slices.extend(other.slices);
        self.nodes.extend(other.nodes);
        self.ingresses.extend(other.ingresses);
        self.ingress_classes.extend(other.ingress_classes);
        self.secrets.extend(other.secrets);
        self.gateway.extend(other.gateway);
    }

    /// The identity of every object.
    fn ids(&self) -> Vec<ObjectId> {
        let id = |kind: Kind, m: &ObjectMeta| ObjectId {
            kind,
            namespace: m.namespace.clone().unwrap_or_else(|| "default".into()),
            name: m.name.clone().unwrap_or_default(),
        };
        let mut ids = Vec::new();
        ids.extend(self.services.iter().map(|o| id(Kind::Service, &o.metadata)));
        ids.extend(self.slices.iter().map(|o| id(Kind::EndpointSlice, &o.metadata)));
        ids.extend(self.nodes.iter().map(|o| id(Kind::Node, &o.metadata)));
        ids.extend(self.ingresses.iter().map(|o| id(Kind::Ingress, &o.metadata)));
        ids.extend(self.ingress_classes.iter().map(|o| id(Kind::IngressClass, &o.metadata)));
        ids.extend(self.secrets.iter().map(|o| id(Kind::Secret, &o.metadata)));
        ids.extend(self.gateway.ids().into_iter().map(|(kind, namespace, name)| ObjectId {
            kind: Kind::Gateway(kind),
            namespace,
            name,
        }));
        ids
    }
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

/// The kinds the manifest source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Service,
    EndpointSlice,
    Node,
    Ingress,
    IngressClass,
    Secret,
    Gateway(GatewayKind),
}

/// Which object: its kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectId {
    kind: Kind,
    namespace: String,
    name: String,
}

impl ObjectId {
    fn meta(&self) -> ObjectMeta {
        ObjectMeta {
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            ..ObjectMeta::default()
        }
    }
}

/// One file as last read: its stamp, which objects it defines, and what its Services were given.
struct FileRecord {
    stamp: Stamp,
    ids: Vec<ObjectId>,
    assigned: BTreeMap<ServiceId, Assigned>,
}

/// What one refresh did, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    pub files_read: usize,
    pub applied: usize,
    pub deleted: usize,
}

/// The manifest files as a source of changes. Each refresh parses only the files that are new
/// or changed (by size or modification time) and turns them into the store's per-object
/// updates and deletions, as a watch would; the first one lists every kind, as a relist would.
/// Between refreshes only identities and allocations are kept, not the objects.
pub struct ManifestSource {
    path: PathBuf,
    node_name: String,
    range: IpNet,
    files: BTreeMap<PathBuf, FileRecord>,
    listed: bool,
    /// The changed files of a refresh that failed, not read again until one of them changes.
    failed: Option<Vec<(PathBuf, Stamp)>>,
}

impl ManifestSource {
    pub fn new(path: PathBuf, node_name: String, range: IpNet) -> Self {
        ManifestSource {
            path,
            node_name,
            range,
            files: BTreeMap::new(),
            listed: false,
            failed: None,
        }
    }

    /// Brings `state` in line with the files. `Ok(None)` when nothing changed. On error (a file
    /// that cannot be read or parsed, naming it) nothing is applied: the previous objects keep
    /// serving, since a half-written file must not drop Services.
    pub fn refresh(&mut self, state: &SharedState) -> Result<Option<Refreshed>, ManifestError> {
        let files = manifest_files(&self.path)?;
        let mut changed = Vec::new();
        for file in &files {
            let stamp = stamp_of(file)?;
            if self.files.get(file).map(|r| r.stamp) != Some(stamp) {
                changed.push((file.clone(), stamp));
            }
        }
        let removed: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|f| files.binary_search(f).is_err())
            .cloned()
            .collect();
        if self.listed && changed.is_empty() && removed.is_empty() {
            return Ok(None);
        }
        if self.failed.as_ref() == Some(&changed) && removed.is_empty() {
            return Ok(None);
        }
        let mut parsed = Vec::new();
        for (file, stamp) in &changed {
            match read_file(file) {
                Ok(objects) => parsed.push((file.clone(), *stamp, objects)),
                Err(e) => {
                    self.failed = Some(changed);
                    return Err(e);
                }
            }
        }
        self.failed = None;

        // What the untouched files hold stays; what the touched ones held is replaced.
        let touched: BTreeSet<&PathBuf> = changed.iter().map(|(f, _)| f).chain(&removed).collect();
        let mut taken = Taken::default();
        let mut kept_ids = BTreeSet::new();
        let mut old_ids = BTreeSet::new();
        let mut previous = BTreeMap::new();
        for (file, record) in &self.files {
            if touched.contains(file) {
                old_ids.extend(record.ids.iter().cloned());
                previous.extend(record.assigned.iter().map(|(k, v)| (k.clone(), v.clone())));
            } else {
                kept_ids.extend(record.ids.iter().cloned());
                record.assigned.values().for_each(|a| taken.add(a));
            }
        }
        let mut new = Objects::default();
        let mut records = Vec::new();
        for (file, stamp, mut objects) in parsed {
            allocate(&mut objects.services, &self.range, &mut taken, &previous);
            let assigned = objects.services.iter().map(|s| (id_of(s), Assigned::of(s))).collect();
            records.push((
                file,
                FileRecord {
                    stamp,
                    ids: objects.ids(),
                    assigned,
                },
            ));
            new.extend(objects);
        }
        let new_ids: BTreeSet<ObjectId> = new.ids().into_iter().collect();
        let gone: Vec<ObjectId> = old_ids
            .into_iter()
            .filter(|id| !new_ids.contains(id) && !kept_ids.contains(id))
            .collect();
        let done = Refreshed {
            files_read: records.len(),
            applied: new_ids.len(),
            deleted: gone.len(),
        };
        if self.listed {
            self.apply_changes(state, &new, &gone);
        } else {
            self.list(state, &new);
        }
        for file in touched {
            self.files.remove(file);
        }
        self.files.extend(records);
        self.listed = true;
        Ok(Some(done))
    }

    /// This node's Node object from `objects`, else a bare one with its name (no addresses).
    fn node_from(&self, objects: &Objects) -> Node {
        objects
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()))
            .cloned()
            .unwrap_or_else(|| Node {
                metadata: ObjectMeta {
                    name: Some(self.node_name.clone()),
                    ..ObjectMeta::default()
                },
                ..Node::default()
            })
    }

    /// The first refresh: every kind listed completely.
    fn list(&self, state: &SharedState, all: &Objects) {
        let node = self.node_from(all);
        state.update(|s| {
            let a = s.replace_services(all.services.iter());
            let b = s.replace_slices(all.slices.iter());
            let c = s.apply_node(&node);
            a | b | c
        });
        state.update_ingress(|s| {
            let a = Ingress::replace(s, &all.ingresses);
            let b = IngressClass::replace(s, &all.ingress_classes);
            let c = Secret::replace(s, &all.secrets);
            let d = all.gateway.replace_into(&mut s.gateway);
            a | b | c | d
        });
    }

    /// Later refreshes: the changed files' objects applied, and those no file defines any more deleted.
    fn apply_changes(&self, state: &SharedState, new: &Objects, gone: &[ObjectId]) {
        let node_gone = gone.iter().any(|id| id.kind == Kind::Node && id.name == self.node_name);
        let node_here = new
            .nodes
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()));
        state.update(|s| {
            let mut changed = false;
            for id in gone {
                changed |= match id.kind {
                    Kind::Service => s.delete_service(&Service {
                        metadata: id.meta(),
                        ..Service::default()
                    }),
                    Kind::EndpointSlice => s.delete_slice(&EndpointSlice {
                        metadata: id.meta(),
                        ..EndpointSlice::default()
                    }),
                    _ => false,
                };
            }
            for svc in &new.services {
                changed |= s.apply_service(svc);
            }
            for slice in &new.slices {
                changed |= s.apply_slice(slice);
            }
            if node_here || node_gone {
                changed |= s.apply_node(&self.node_from(new));
            }
            changed
        });
        state.update_ingress(|s| {
            let mut changed = false;
            for id in gone {
                changed |= match id.kind {
                    Kind::Ingress => Ingress::delete(
                        s,
                        &Ingress {
                            metadata: id.meta(),
                            ..Ingress::default()
                        },
                    ),
                    Kind::IngressClass => IngressClass::delete(
                        s,
                        &IngressClass {
                            metadata: ObjectMeta {
                                name: Some(id.name.clone()),
                                ..ObjectMeta::default()
                            },
                            ..IngressClass::default()
                        },
                    ),
                    Kind::Secret => Secret::delete(
                        s,
                        &Secret {
                            metadata: id.meta(),
                            ..Secret::default()
                        },
                    ),
                    Kind::Gateway(kind) => delete_id(&mut s.gateway, kind, &id.namespace, &id.name),
                    _ => false,
                };
            }
            for o in &new.ingresses {
                changed |= Ingress::apply(s, o);
            }
            for o in &new.ingress_classes {
                changed |= IngressClass::apply(s, o);
            }
            for o in &new.secrets {
                changed |= Secret::apply(s, o);
            }
            changed |= new.gateway.apply_into(&mut s.gateway);
            changed
        });
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
        (v, k) if GatewayDocs::reads(v, k) => {
            objects.gateway.add(v, k, value)?;
        }
        _ => {
            tracing::debug!(%api_version, %kind, "ignoring manifest of a kind kproxy does not proxy")
        }
    }
    Ok(())
}

/// Reads the manifests now and again whenever a file changes, until `shutdown`.
pub async fn run(
    state: Arc<SharedState>,
    mut source: ManifestSource,
    poll: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        match source.refresh(&state) {
            Ok(Some(r)) => tracing::info!(
                path = %source.path.display(),
                files_read = r.files_read,
                objects_applied = r.applied,
                objects_deleted = r.deleted,
                "loaded manifests"
            ),
            Ok(None) => {}
            Err(e) => tracing::error!("{e}; keeping the previously loaded manifests"),
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
    use crate::health::ProxyHealth;
    use crate::model::store::Store;
    use crate::model::ServiceKey;
    use std::net::IpAddr;

    /// Reads every manifest under `path`. Kinds other than Service, EndpointSlice, Node, Ingress,
    /// IngressClass and TLS Secrets (a Deployment, say) are skipped; a document that cannot be parsed is an error naming it.
    fn read_manifests(path: &Path) -> Result<Objects, ManifestError> {
        let mut all = Objects::default();
        for file in manifest_files(path)? {
            all.extend(read_file(&file)?);
        }
        Ok(all)
    }

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
        allocate(&mut objects.services, &range, &mut Taken::default(), &BTreeMap::new());
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
        allocate(&mut again.services, &range, &mut Taken::default(), &BTreeMap::new());
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
        allocate(
            &mut o.services,
            &"10.96.0.0/30".parse().unwrap(),
            &mut Taken::default(),
            &BTreeMap::new(),
        );
        let a = o.services[0].spec.as_ref().unwrap();
        let b = o.services[1].spec.as_ref().unwrap();
        assert_eq!(a.cluster_ip.as_deref(), Some("10.96.0.2"));
        assert_eq!(b.cluster_ip, None, "a /30 has room for one Service only");
        let pa = a.ports.as_ref().unwrap()[0].node_port.unwrap();
        let pb = b.ports.as_ref().unwrap()[0].node_port.unwrap();
        assert!((30000..=32767).contains(&pa) && pa != pb);
    }

    #[test]
    fn only_changed_files_are_read_and_turned_into_changes() {
        let dir = tmp("source", "");
        std::fs::remove_file(dir.join("all.yaml")).unwrap();
        let svc = |name: &str, port: u16| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {{type: NodePort, ports: [{{port: {port}}}]}}\n")
        };
        let (a, b) = (dir.join("a.yaml"), dir.join("b.yaml"));
        std::fs::write(&a, svc("a", 80)).unwrap();
        std::fs::write(&b, svc("b", 80)).unwrap();
        let state = SharedState::new(Store::new("n1"), Arc::new(ProxyHealth::new(Duration::from_secs(60))));
        let mut source = ManifestSource::new(dir.clone(), "n1".into(), "10.96.0.0/12".parse().unwrap());
        let first = source.refresh(&state).unwrap().unwrap();
        assert_eq!((first.files_read, first.applied, first.deleted), (2, 2, 0));
        assert_eq!(source.refresh(&state).unwrap(), None, "nothing changed");
        let port_of = |name: &str| {
            state.read(|store, _| {
                let st = store.service_state(&ServiceKey::new("default", name))?;
                let p = st.ports.first()?.port.clone();
                Some((p.cluster_ips.clone(), p.node_port, p.port))
            })
        };
        let (a_ips, a_node_port, _) = port_of("a").unwrap();

        // b's bytes go bad behind the source's back (same size, same modification time): it is
        // not read again while a changes, and b keeps being served.
        let stamp = std::fs::metadata(&b).unwrap().modified().unwrap();
        std::fs::write(&b, "!".repeat(svc("b", 80).len())).unwrap();
        let file = std::fs::File::options().write(true).open(&b).unwrap();
        file.set_modified(stamp).unwrap();
        std::fs::write(&a, svc("a", 8080)).unwrap();
        let second = source.refresh(&state).unwrap().unwrap();
        assert_eq!((second.files_read, second.applied, second.deleted), (1, 1, 0));
        assert_eq!(
            port_of("a"),
            Some((a_ips, a_node_port, 8080)),
            "an edited Service keeps its cluster IP and node port"
        );
        assert!(port_of("b").is_some());

        // Once b's stamp changes it is read; its error names it, once, and nothing is lost.
        std::fs::write(&b, "kind: [").unwrap();
        let err = source.refresh(&state).unwrap_err().to_string();
        assert!(err.contains("b.yaml"), "{err}");
        assert_eq!(source.refresh(&state).unwrap(), None, "not read again until it changes");
        assert!(port_of("b").is_some(), "the last good b keeps serving");

        // A removed file's objects are deleted.
        std::fs::remove_file(&b).unwrap();
        let third = source.refresh(&state).unwrap().unwrap();
        assert_eq!(third.deleted, 1);
        assert_eq!(port_of("b"), None);
        assert!(port_of("a").is_some());
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
