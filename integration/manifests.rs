//! Checks the deployment in `manifests/` without a cluster, as far as that is
//! possible: every YAML document is an object of a known kind that decodes
//! into its k8s-openapi type (Kubernetes 1.33) with no unknown field, the
//! objects' references to each other resolve, `kubectl apply -f manifests/`
//! and `kubectl apply -k manifests/` install the same files, and kproxy itself
//! accepts the DaemonSets' command lines and the ConfigMap's
//! KubeProxyConfiguration (`--validate`).
//!
//! Unknown fields: k8s-openapi's types skip fields they do not know, as the API
//! server does (it only warns). Decoding goes through `serde_ignored`, which
//! reports every field the type skipped with its path
//! (`spec.template.spec.containers.0.imagePullPolicyy`), so a misspelt or
//! misplaced field fails here instead of silently doing nothing in a cluster.

use std::any::TypeId;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, ServiceAccount};
use k8s_openapi::api::networking::v1::IngressClass;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{Metadata, NamespaceResourceScope};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests");
const KPROXY: &str = env!("CARGO_BIN_EXE_kproxy");
const SCRATCH: &str = env!("CARGO_TARGET_TMPDIR");

/// The image every container uses: scripts/kind-up.sh builds and loads only
/// this one, and a kustomize `images:` override then moves all of them.
const IMAGE: &str = "kproxy:dev";
/// kproxy's IngressClass controller name.
const CONTROLLER: &str = "kproxy.io/ingress-controller";
/// ConfigMaps the DaemonSet reads that are deliberately not in manifests/:
/// the API server address, made by scripts/kind-up.sh or by hand
/// (docs/deploy.md), so that re-applying manifests/ never resets it.
const MADE_OUTSIDE: &[&str] = &["kproxy-apiserver"];
/// Stand-in for `spec.nodeName` when expanding `$(NODE_NAME)`.
const NODE_NAME: &str = "kind-worker";

/// One YAML document of a file under manifests/.
struct Document {
    file: PathBuf,
    index: usize,
    value: Value,
}

impl Document {
    /// `manifests/30-daemonset.yaml#0`: where a failure points.
    fn origin(&self) -> String {
        let file = self.file.strip_prefix(env!("CARGO_MANIFEST_DIR")).unwrap_or(&self.file);
        format!("{}#{}", file.display(), self.index)
    }
}

/// A document decoded into its k8s-openapi type.
enum Object {
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Role(Role),
    RoleBinding(RoleBinding),
    ConfigMap(ConfigMap),
    DaemonSet(Box<DaemonSet>),
    IngressClass(IngressClass),
    /// Valid, and not looked at further.
    Other,
}

/// Every `*.yaml` / `*.yml` under `dir`, recursively, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The YAML documents of every manifest file; empty documents are skipped.
fn documents() -> Vec<Document> {
    let mut documents = Vec::new();
    for file in yaml_files(Path::new(MANIFESTS)) {
        let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{}#{index}: not YAML that maps to JSON: {e}", file.display()));
            if !value.is_null() {
                documents.push(Document {
                    file: file.clone(),
                    index,
                    value,
                });
            }
        }
    }
    assert!(!documents.is_empty(), "no YAML documents under {MANIFESTS}");
    documents
}

/// Decodes `doc` as a `T`, failing on any field `T` does not have, and checks
/// that the namespace is set exactly when `T` is namespaced (`kubectl apply -f`
/// would otherwise put the object in whatever namespace is current).
fn decode_strict<T>(doc: &Document) -> Result<T, String>
where
    T: DeserializeOwned + Metadata<Ty = ObjectMeta> + 'static,
{
    let mut unknown = Vec::new();
    let object: T = serde_ignored::deserialize(doc.value.clone(), |path| unknown.push(field_path(&path)))
        .map_err(|e| format!("{}: not a valid {} {}: {e}", doc.origin(), T::API_VERSION, T::KIND))?;
    if !unknown.is_empty() {
        return Err(format!(
            "{}: {} has unknown field(s): {}",
            doc.origin(),
            T::KIND,
            unknown.join(", ")
        ));
    }
    let meta = object.metadata();
    if meta.name.as_deref().unwrap_or("").is_empty() {
        return Err(format!("{}: {} has no metadata.name", doc.origin(), T::KIND));
    }
    let namespaced = TypeId::of::<T::Scope>() == TypeId::of::<NamespaceResourceScope>();
    match (namespaced, &meta.namespace) {
        (true, None) => Err(format!(
            "{}: namespaced {} without metadata.namespace",
            doc.origin(),
            T::KIND
        )),
        (false, Some(ns)) => Err(format!(
            "{}: cluster-scoped {} with namespace {ns}",
            doc.origin(),
            T::KIND
        )),
        _ => Ok(object),
    }
}

/// `spec.template.spec.containers.0.name`: the path as written in YAML
/// (serde_ignored's own rendering adds a `?` for every optional level).
fn field_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => field_path(parent),
        P::Seq { parent, index } => join_path(field_path(parent), &index.to_string()),
        P::Map { parent, key } => join_path(field_path(parent), key),
    }
}

fn join_path(parent: String, child: &str) -> String {
    if parent.is_empty() {
        child.to_owned()
    } else {
        format!("{parent}.{child}")
    }
}

/// Gateway API's GatewayClass (k8s-openapi has no type for it): the fields of the v1 schema.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)] // read for unknown-field checking only
struct GatewayClass {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: GatewayClassSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
struct GatewayClassSpec {
    controller_name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters_ref: Option<Value>,
}

impl k8s_openapi::Resource for GatewayClass {
    const API_VERSION: &'static str = "gateway.networking.k8s.io/v1";
    const GROUP: &'static str = "gateway.networking.k8s.io";
    const KIND: &'static str = "GatewayClass";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "gatewayclasses";
    type Scope = k8s_openapi::ClusterResourceScope;
}

impl Metadata for GatewayClass {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Decodes a document by its apiVersion and kind.
fn decode(doc: &Document) -> Result<Object, String> {
    let field = |name: &str| doc.value.get(name).and_then(Value::as_str).unwrap_or("").to_owned();
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    Ok(match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => decode_strict::<Namespace>(doc).map(|_| Object::Other)?,
        ("v1", "ServiceAccount") => Object::ServiceAccount(decode_strict(doc)?),
        ("v1", "ConfigMap") => Object::ConfigMap(decode_strict(doc)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => Object::ClusterRole(decode_strict(doc)?),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => Object::ClusterRoleBinding(decode_strict(doc)?),
        ("rbac.authorization.k8s.io/v1", "Role") => Object::Role(decode_strict(doc)?),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => Object::RoleBinding(decode_strict(doc)?),
        ("apps/v1", "DaemonSet") => Object::DaemonSet(Box::new(decode_strict(doc)?)),
        ("batch/v1", "Job") => decode_strict::<Job>(doc).map(|_| Object::Other)?,
        ("networking.k8s.io/v1", "IngressClass") => Object::IngressClass(decode_strict(doc)?),
        ("gateway.networking.k8s.io/v1", "GatewayClass") => {
            let class: GatewayClass = decode_strict(doc)?;
            if class.spec.controller_name != "kproxy.io/gateway-controller" {
                return Err(format!("{}: a GatewayClass of another controller", doc.origin()));
            }
            Object::Other
        }
        _ => {
            return Err(format!(
                "{}: apiVersion {api_version:?} kind {kind:?} is not a kind this test knows; \
                 add it to `decode` in integration/manifests.rs",
                doc.origin()
            ))
        }
    })
}

/// Every document, decoded; panics listing every document that fails.
fn objects() -> Vec<(Document, Object)> {
    let mut decoded = Vec::new();
    let mut errors = Vec::new();
    for doc in documents() {
        match decode(&doc) {
            Ok(object) => decoded.push((doc, object)),
            Err(e) => errors.push(e),
        }
    }
    assert!(errors.is_empty(), "invalid manifests:\n  {}", errors.join("\n  "));
    decoded
}

fn name_of(meta: &ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// `(namespace, name)` of every object of one kind.
fn names<T>(objects: &[(Document, Object)], pick: impl Fn(&Object) -> Option<&T>) -> BTreeSet<(String, String)>
where
    T: Metadata<Ty = ObjectMeta>,
{
    objects
        .iter()
        .filter_map(|(_, o)| pick(o))
        .map(|o| name_of(o.metadata()))
        .collect()
}

fn daemonsets(objects: &[(Document, Object)]) -> Vec<(&Document, &DaemonSet)> {
    objects
        .iter()
        .filter_map(|(doc, o)| match o {
            Object::DaemonSet(ds) => Some((doc, ds.as_ref())),
            _ => None,
        })
        .collect()
}

fn config_maps(objects: &[(Document, Object)]) -> BTreeMap<(String, String), &ConfigMap> {
    objects
        .iter()
        .filter_map(|(_, o)| match o {
            Object::ConfigMap(cm) => Some((name_of(&cm.metadata), cm)),
            _ => None,
        })
        .collect()
}

/// Containers and init containers of a DaemonSet.
fn containers(ds: &DaemonSet) -> Vec<&Container> {
    let Some(pod) = ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()) else {
        return Vec::new();
    };
    pod.init_containers
        .iter()
        .flatten()
        .chain(pod.containers.iter())
        .collect()
}

/// A container runs kproxy if it uses the image's entrypoint or names it.
fn runs_kproxy(container: &Container) -> bool {
    match container.command.as_deref() {
        None | Some([]) => true,
        Some([program, ..]) => Path::new(program).file_name().is_some_and(|f| f == "kproxy"),
    }
}

/// Runs the kproxy binary under test.
fn run_kproxy(args: &[String]) -> Output {
    Command::new(KPROXY)
        .args(args)
        .env("NODE_NAME", NODE_NAME)
        .output()
        .unwrap_or_else(|e| panic!("running {KPROXY}: {e}"))
}

fn describe(args: &[String], output: &Output) -> String {
    format!(
        "kproxy {}\n  exit: {}\n  stdout: {}\n  stderr: {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout).trim_end(),
        String::from_utf8_lossy(&output.stderr).trim_end()
    )
}

/// A fresh scratch directory under the target dir.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(SCRATCH).join("manifests").join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Expands `$(VAR)` as the kubelet does for args: from the container's env
/// (downward-API fields by stand-ins), `$$` to `$`, unknown references kept.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = rest.strip_prefix("$(").and_then(|r| r.split_once(')')) {
            match env.get(name) {
                Some(value) => out.push_str(value),
                None => out.push_str(&rest[..name.len() + 3]),
            }
            rest = after;
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

fn container_env(container: &Container, namespace: &str) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for var in container.env.iter().flatten() {
        let field = var
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        let value = match (&var.value, field) {
            (Some(value), _) => value.clone(),
            (None, Some("spec.nodeName")) => NODE_NAME.to_owned(),
            (None, Some("metadata.namespace")) => namespace.to_owned(),
            _ => continue,
        };
        env.insert(var.name.clone(), value);
    }
    env
}

/// The container's args as kproxy would receive them on a node: `$(VAR)`
/// expanded, and paths under ConfigMap volume mounts pointing at a scratch copy
/// of those ConfigMaps.
fn node_args(
    ds: &DaemonSet,
    container: &Container,
    config_maps: &BTreeMap<(String, String), &ConfigMap>,
) -> Result<Vec<String>, String> {
    let namespace = ds.metadata.namespace.clone().unwrap_or_default();
    let ds_name = ds.metadata.name.clone().unwrap_or_default();
    let env = container_env(container, &namespace);
    let mut args: Vec<String> = container.args.iter().flatten().map(|a| expand(a, &env)).collect();

    let volumes = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.volumes.as_ref());
    let root = scratch_dir(&format!("{ds_name}-{}", container.name));
    for mount in container.volume_mounts.iter().flatten() {
        let Some(source) = volumes.into_iter().flatten().find(|v| v.name == mount.name) else {
            return Err(format!(
                "container {} mounts undeclared volume {}",
                container.name, mount.name
            ));
        };
        let Some(cm_ref) = &source.config_map else {
            continue;
        };
        let key = (namespace.clone(), cm_ref.name.clone());
        let Some(cm) = config_maps.get(&key) else {
            return Err(format!(
                "volume {} names ConfigMap {} that manifests/ lacks",
                mount.name, cm_ref.name
            ));
        };
        let dir = root.join(mount.mount_path.trim_start_matches('/'));
        fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        for (file, content) in cm.data.iter().flatten() {
            fs::write(dir.join(file), content).map_err(|e| e.to_string())?;
        }
        let mount_path = format!("{}/", mount.mount_path.trim_end_matches('/'));
        let local = format!("{}/", dir.display());
        for arg in &mut args {
            *arg = arg.replace(&mount_path, &local);
        }
    }
    Ok(args)
}

/// KubeProxyConfiguration documents held in ConfigMaps: (origin, text).
fn kube_proxy_configurations(objects: &[(Document, Object)]) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for (_, cm) in config_maps(objects) {
        for (key, text) in cm.data.iter().flatten() {
            let Ok(value) = serde_yaml::from_str::<Value>(text) else {
                continue;
            };
            if value.get("kind").and_then(Value::as_str) == Some("KubeProxyConfiguration") {
                let (ns, name) = name_of(&cm.metadata);
                found.push((format!("ConfigMap {ns}/{name} key {key}"), text.clone()));
            }
        }
    }
    found
}

#[test]
fn every_document_is_a_known_kind_without_unknown_fields() {
    let objects = objects();
    // The deployment itself must be there, whatever else is added.
    let has = |f: &dyn Fn(&Object) -> bool| objects.iter().any(|(_, o)| f(o));
    assert!(
        has(&|o| matches!(o, Object::DaemonSet(_))),
        "no DaemonSet in manifests/"
    );
    assert!(
        has(&|o| matches!(o, Object::ServiceAccount(_))),
        "no ServiceAccount in manifests/"
    );
    assert!(
        has(&|o| matches!(o, Object::ClusterRole(_))),
        "no ClusterRole in manifests/"
    );
    assert!(
        has(&|o| matches!(o, Object::ConfigMap(_))),
        "no ConfigMap in manifests/"
    );
    assert!(
        has(&|o| matches!(o, Object::IngressClass(c) if c.metadata.name.as_deref() == Some("kproxy"))),
        "no IngressClass kproxy in manifests/"
    );
}

#[test]
fn unknown_and_mistyped_fields_are_rejected() {
    // The checker itself: a misspelt field deep in a pod template, and a field
    // of the wrong type, must both fail.
    let doc = |value: Value| Document {
        file: PathBuf::from("inline.yaml"),
        index: 0,
        value,
    };
    let misspelt = doc(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": { "name": "x", "namespace": "kube-system" },
        "spec": {
            "selector": { "matchLabels": { "a": "b" } },
            "template": {
                "metadata": { "labels": { "a": "b" } },
                "spec": { "containers": [ { "name": "c", "image": "i", "imagePullPolicyy": "Always" } ] }
            }
        }
    }));
    let error = decode(&misspelt).err().expect("a misspelt field must be rejected");
    assert!(
        error.contains("spec.template.spec.containers.0.imagePullPolicyy"),
        "the error should name the field's path: {error}"
    );
    let mistyped = doc(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "x", "namespace": "kube-system" },
        "data": { "k": 1 }
    }));
    assert!(
        decode(&mistyped).is_err(),
        "a number where a string belongs must be rejected"
    );
    let unknown_kind = doc(serde_json::json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "x" } }));
    assert!(
        decode(&unknown_kind).is_err(),
        "kinds outside the known list must be rejected"
    );
}

#[test]
fn apply_f_and_apply_k_install_the_same_files() {
    // `kubectl apply -f manifests/` reads the *.yaml, *.yml and *.json files
    // of the directory itself (not subdirectories); `-k` reads Kustomization.
    let dir = Path::new(MANIFESTS);
    let mut applied_by_f = BTreeSet::new();
    for entry in fs::read_dir(dir).expect("manifests/") {
        let path = entry.expect("directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        if path.is_file() && [".yaml", ".yml", ".json"].iter().any(|ext| name.ends_with(ext)) {
            assert!(
                !name.starts_with("kustomization."),
                "{name}: `kubectl apply -f manifests/` would try to apply it; the file is named Kustomization"
            );
            applied_by_f.insert(name);
        }
    }
    let text = fs::read_to_string(dir.join("Kustomization")).expect("manifests/Kustomization");
    let kustomization: Value = serde_yaml::from_str(&text).expect("Kustomization is YAML");
    assert_eq!(kustomization["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(kustomization["kind"], "Kustomization");
    let applied_by_k: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .expect("Kustomization has resources")
        .iter()
        .map(|r| r.as_str().expect("resources are file names").to_owned())
        .collect();
    assert_eq!(
        applied_by_f, applied_by_k,
        "Kustomization resources differ from the files `apply -f` reads"
    );
}

#[test]
fn references_between_objects_resolve() {
    let objects = objects();
    let service_accounts = names(&objects, |o| match o {
        Object::ServiceAccount(x) => Some(x),
        _ => None,
    });
    let cluster_roles = names(&objects, |o| match o {
        Object::ClusterRole(x) => Some(x),
        _ => None,
    });
    let roles = names(&objects, |o| match o {
        Object::Role(x) => Some(x),
        _ => None,
    });
    let config_maps = config_maps(&objects);
    let mut errors = Vec::new();

    for (doc, object) in &objects {
        let (role_ref, subjects, namespace) = match object {
            Object::ClusterRoleBinding(b) => (&b.role_ref, &b.subjects, None),
            Object::RoleBinding(b) => (&b.role_ref, &b.subjects, b.metadata.namespace.clone()),
            _ => continue,
        };
        let found = match role_ref.kind.as_str() {
            "ClusterRole" => cluster_roles.contains(&(String::new(), role_ref.name.clone())),
            "Role" => roles.contains(&(namespace.unwrap_or_default(), role_ref.name.clone())),
            other => {
                errors.push(format!("{}: roleRef kind {other}", doc.origin()));
                continue;
            }
        };
        if !found {
            errors.push(format!(
                "{}: roleRef {} {} is not in manifests/",
                doc.origin(),
                role_ref.kind,
                role_ref.name
            ));
        }
        for subject in subjects.iter().flatten().filter(|s| s.kind == "ServiceAccount") {
            let key = (subject.namespace.clone().unwrap_or_default(), subject.name.clone());
            if !service_accounts.contains(&key) {
                errors.push(format!(
                    "{}: subject ServiceAccount {}/{} is not in manifests/",
                    doc.origin(),
                    key.0,
                    key.1
                ));
            }
        }
    }

    for (doc, ds) in daemonsets(&objects) {
        let namespace = ds.metadata.namespace.clone().unwrap_or_default();
        let spec = ds.spec.as_ref().expect("DaemonSet spec");
        let labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        for (key, value) in spec.selector.match_labels.iter().flatten() {
            if labels.get(key) != Some(value) {
                errors.push(format!(
                    "{}: selector {key}={value} does not match the pod template",
                    doc.origin()
                ));
            }
        }
        let pod = spec.template.spec.as_ref().expect("pod spec");
        if let Some(sa) = &pod.service_account_name {
            if !service_accounts.contains(&(namespace.clone(), sa.clone())) {
                errors.push(format!(
                    "{}: serviceAccountName {sa} is not in manifests/",
                    doc.origin()
                ));
            }
        }
        for volume in pod.volumes.iter().flatten() {
            if let Some(cm) = &volume.config_map {
                if !config_maps.contains_key(&(namespace.clone(), cm.name.clone())) {
                    errors.push(format!(
                        "{}: volume {} names ConfigMap {} that manifests/ lacks",
                        doc.origin(),
                        volume.name,
                        cm.name
                    ));
                }
            }
        }
        for container in containers(ds) {
            if container.image.as_deref() != Some(IMAGE) {
                errors.push(format!(
                    "{}: container {} uses image {:?}, not {IMAGE}",
                    doc.origin(),
                    container.name,
                    container.image
                ));
            }
            for source in container.env_from.iter().flatten() {
                let Some(cm) = &source.config_map_ref else {
                    continue;
                };
                let known = config_maps.contains_key(&(namespace.clone(), cm.name.clone()))
                    || MADE_OUTSIDE.contains(&cm.name.as_str());
                if !known {
                    errors.push(format!(
                        "{}: envFrom ConfigMap {} is neither in manifests/ nor made by kind-up.sh",
                        doc.origin(),
                        cm.name
                    ));
                }
            }
            let declared: BTreeSet<&str> = pod.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
            for mount in container.volume_mounts.iter().flatten() {
                if !declared.contains(mount.name.as_str()) {
                    errors.push(format!(
                        "{}: container {} mounts undeclared volume {}",
                        doc.origin(),
                        container.name,
                        mount.name
                    ));
                }
            }
        }
    }

    for (doc, object) in &objects {
        if let Object::IngressClass(class) = object {
            let controller = class.spec.as_ref().and_then(|s| s.controller.as_deref());
            if controller != Some(CONTROLLER) {
                errors.push(format!(
                    "{}: IngressClass controller {controller:?}, kproxy's is {CONTROLLER}",
                    doc.origin()
                ));
            }
        }
    }
    assert!(errors.is_empty(), "unresolved references:\n  {}", errors.join("\n  "));
}

#[test]
fn rbac_grants_no_wildcards_and_writes_only_what_kproxy_writes() {
    let objects = objects();
    let rules: Vec<(String, &PolicyRule)> = objects
        .iter()
        .flat_map(|(doc, o)| {
            let rules = match o {
                Object::ClusterRole(r) => r.rules.as_deref(),
                Object::Role(r) => r.rules.as_deref(),
                _ => None,
            };
            rules.unwrap_or_default().iter().map(move |rule| (doc.origin(), rule))
        })
        .collect();
    assert!(!rules.is_empty(), "no RBAC rules in manifests/");
    let writes = ["create", "update", "patch", "delete", "deletecollection"];
    // What kproxy may write, by resource: Ingress and Gateway API status, and its Lease. It
    // writes no Events.
    let writable = [
        "ingresses/status",
        "gatewayclasses/status",
        "gateways/status",
        "httproutes/status",
        "leases",
    ];
    let mut errors = Vec::new();
    for (origin, rule) in rules {
        let mut all = rule
            .api_groups
            .iter()
            .flatten()
            .chain(rule.resources.iter().flatten())
            .chain(rule.verbs.iter());
        if all.any(|s| s == "*") {
            errors.push(format!("{origin}: wildcard in {rule:?}"));
        }
        if rule.verbs.iter().any(|v| writes.contains(&v.as_str())) {
            for resource in rule
                .resources
                .iter()
                .flatten()
                .filter(|r| !writable.contains(&r.as_str()))
            {
                errors.push(format!("{origin}: write access to {resource}"));
            }
        }
    }
    assert!(
        errors.is_empty(),
        "RBAC grants more than kproxy needs:\n  {}",
        errors.join("\n  ")
    );
}

/// A DaemonSet updated with `maxSurge` runs its old and new pod on one node at once: any port
/// it declares on the host network is a host port the scheduler gives to one pod per node, so
/// the new pod would stay Pending and the update would never finish.
#[test]
fn a_surging_daemonset_declares_no_host_ports() {
    let objects = objects();
    let mut errors = Vec::new();
    let mut surging = 0;
    for (doc, ds) in daemonsets(&objects) {
        let spec = ds.spec.as_ref().expect("DaemonSet spec");
        let rolling = spec.update_strategy.as_ref().and_then(|s| s.rolling_update.as_ref());
        let surge = rolling.and_then(|r| r.max_surge.as_ref());
        let zero = |v: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString| {
            matches!(v, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0))
                || matches!(v, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) if s == "0%")
        };
        if surge.is_none_or(zero) {
            continue;
        }
        surging += 1;
        let pod = spec.template.spec.as_ref().expect("pod spec");
        let host_network = pod.host_network.unwrap_or(false);
        for c in containers(ds) {
            for port in c.ports.iter().flatten() {
                if host_network || port.host_port.is_some() {
                    errors.push(format!(
                        "{}: container {} declares port {} on the host, with maxSurge {surge:?}",
                        doc.origin(),
                        c.name,
                        port.container_port
                    ));
                }
            }
        }
        if rolling
            .and_then(|r| r.max_unavailable.as_ref())
            .is_some_and(|v| !zero(v))
        {
            errors.push(format!(
                "{}: maxUnavailable is not 0: the old pod could stop before the new one is ready",
                doc.origin()
            ));
        }
    }
    assert!(
        surging > 0,
        "the kproxy DaemonSet updates with maxSurge (new pod first)"
    );
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

#[test]
fn kproxy_accepts_the_daemonset_command_lines() {
    let objects = objects();
    let config_maps = config_maps(&objects);
    let mut checked = 0;
    let mut failures = Vec::new();
    for (doc, ds) in daemonsets(&objects) {
        for container in containers(ds).into_iter().filter(|c| runs_kproxy(c)) {
            let mut args = match node_args(ds, container, &config_maps) {
                Ok(args) => args,
                Err(e) => {
                    failures.push(format!("{}: {e}", doc.origin()));
                    continue;
                }
            };
            args.push("--validate".to_owned());
            let output = run_kproxy(&args);
            checked += 1;
            if !output.status.success() {
                failures.push(format!(
                    "{} container {}:\n{}",
                    doc.origin(),
                    container.name,
                    describe(&args, &output)
                ));
            }
        }
    }
    assert!(checked > 0, "no container in manifests/ runs kproxy");
    assert!(
        failures.is_empty(),
        "kproxy rejects the manifests' command lines:\n{}",
        failures.join("\n")
    );
}

#[test]
fn kproxy_accepts_the_configmap_configuration() {
    let objects = objects();
    let configurations = kube_proxy_configurations(&objects);
    assert!(
        !configurations.is_empty(),
        "no ConfigMap in manifests/ holds a KubeProxyConfiguration"
    );
    let dir = scratch_dir("configurations");
    for (index, (origin, text)) in configurations.iter().enumerate() {
        let path = dir.join(format!("config-{index}.yaml"));
        fs::write(&path, text).expect("writing the configuration");
        let args = vec![
            "--config".to_owned(),
            path.display().to_string(),
            "--validate".to_owned(),
        ];
        let output = run_kproxy(&args);
        assert!(
            output.status.success(),
            "kproxy rejects {origin}:\n{}",
            describe(&args, &output)
        );
    }
}

#[test]
fn kproxy_validate_rejects_bad_input_with_exit_code_2() {
    // Without this, the two tests above would pass against a --validate that
    // accepts anything.
    let args: Vec<String> = ["--proxy-mode", "no-such-mode", "--validate"].map(String::from).into();
    let output = run_kproxy(&args);
    assert_eq!(
        output.status.code(),
        Some(2),
        "a bad flag value must exit 2:\n{}",
        describe(&args, &output)
    );

    let path = scratch_dir("bad-configuration").join("config.yaml");
    let bad = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: no-such-mode\n";
    fs::write(&path, bad).expect("writing the configuration");
    let args = vec![
        "--config".to_owned(),
        path.display().to_string(),
        "--validate".to_owned(),
    ];
    let output = run_kproxy(&args);
    assert_eq!(
        output.status.code(),
        Some(2),
        "a bad config value must exit 2:\n{}",
        describe(&args, &output)
    );
}

#[test]
fn args_expand_like_the_kubelet() {
    let env = BTreeMap::from([("NODE_NAME".to_owned(), "n1".to_owned())]);
    assert_eq!(
        expand("--hostname-override=$(NODE_NAME)", &env),
        "--hostname-override=n1"
    );
    assert_eq!(expand("$$(NODE_NAME) $(UNSET) $x", &env), "$(NODE_NAME) $(UNSET) $x");
}
