//! Desired state from YAML files: `--manifests PATH` (a file or a directory, multi-document).
//!
//! The files stand in for the API server, and are as forgiving: each file stands alone.
//! - Only files that are new or changed (by size or modification time) are read again, and
//!   their objects become per-object updates and deletions, as a watch would deliver them; the
//!   first read lists every kind, as a relist would. Between reads only identities and
//!   allocations are kept, not the objects.
//! - A file that cannot be read or parsed is reported once (per edit) by name, and the objects
//!   it defined when it last parsed keep serving until it parses again; every other file's
//!   changes still apply, and a fresh start programs everything the readable files define.
//! - An object (kind, namespace, name) defined in two files is reported once, naming both; the
//!   copy in the first file in path order (then the first document) is programmed, and when
//!   that copy goes away the next one is programmed.
//!
//! Like the API server, this source allocates a cluster IP (from `--service-cluster-ip-range`)
//! and node ports to Services that have none, deterministically, so manifests written for
//! `kubectl apply` work unchanged.

mod parse;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::watch;

pub use self::parse::{parse_manifest, Kind, Object, ObjectId, ParseError};
use super::allocate::{allocate, id_of, Assigned, ServiceId, Taken};
use crate::ingress::gateway::objects::{delete_id, GatewayDocs};
use crate::ingress::objects::IngressObject;
use crate::sync::SharedState;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The path, a directory under it, or one file cannot be read. For a file, retried when its
    /// size or modification time changes; for the path, at every poll.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file does not parse; retried when it changes.
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: ParseError,
    },
}

/// The files under `path`, sorted: the path itself, or the `.yaml`/`.yml`/`.json` files of a
/// directory tree.
fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ManifestError::Read { path, source }
    };
    let meta = std::fs::metadata(path).map_err(read_error(path))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(read_error(&dir))?.flatten() {
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

fn stamp_of(file: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(file).ok()?;
    Some((meta.len(), meta.modified().ok()))
}

/// The objects of one file, in document order; a second copy of an object in the same file is
/// dropped and reported (the first is what `kubectl apply` users see first).
fn read_file(file: &Path) -> Result<(Vec<Object>, Vec<String>), ManifestError> {
    let text = std::fs::read_to_string(file).map_err(|source| ManifestError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    let parsed = parse_manifest(&text).map_err(|source| ManifestError::Parse {
        path: file.to_path_buf(),
        source,
    })?;
    let mut first_doc: BTreeMap<ObjectId, usize> = BTreeMap::new();
    let mut objects = Vec::new();
    let mut problems = Vec::new();
    for (doc, object) in parsed {
        let id = object.id();
        match first_doc.get(&id) {
            Some(first) => problems.push(format!(
                "{id} is defined twice in {} (documents {first} and {doc}); document {first} is programmed",
                file.display()
            )),
            None => {
                first_doc.insert(id, doc);
                objects.push(object);
            }
        }
    }
    Ok((objects, problems))
}

/// One file as last read.
struct FileRecord {
    stamp: Option<Stamp>,
    /// The objects it defined when it last parsed (none if it never did).
    ids: Vec<ObjectId>,
    /// Set while its current content does not parse: its `ids` are then its last good ones.
    broken: bool,
}

/// What one refresh did, for the log and the tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// Files read and parsed.
    pub files_read: usize,
    /// Objects added or updated in the store.
    pub applied: usize,
    /// Objects no readable file defines any more, deleted from the store.
    pub deleted: usize,
    /// What went wrong, each reported (logged) once: a file that does not parse, an object
    /// defined twice.
    pub problems: Vec<String>,
}

impl Refreshed {
    /// Two copies of one object: both still load, so a warning, not an error.
    fn report_duplicate(&mut self, problem: String) {
        tracing::warn!("{problem}");
        self.problems.push(problem);
    }
}

/// The manifest files as a source of changes (see the module documentation).
pub struct ManifestSource {
    path: PathBuf,
    node_name: String,
    range: IpNet,
    files: BTreeMap<Arc<Path>, FileRecord>,
    /// Every object's files, in path order: the first one's copy is the one programmed.
    owners: BTreeMap<ObjectId, Vec<Arc<Path>>>,
    /// What each programmed Service was given, kept while it exists in any file.
    assigned: BTreeMap<ServiceId, Assigned>,
    listed: bool,
}

/// The objects whose programmed copy changed in a refresh.
type Winners = BTreeMap<ObjectId, Object>;

impl ManifestSource {
    pub fn new(path: PathBuf, node_name: String, range: IpNet) -> Self {
        ManifestSource {
            path,
            node_name,
            range,
            files: BTreeMap::new(),
            owners: BTreeMap::new(),
            assigned: BTreeMap::new(),
            listed: false,
        }
    }

    /// Brings `state` in line with the files. `Ok(None)` when nothing changed. Problems with
    /// single files are logged here, once, and returned in [`Refreshed::problems`]; they never
    /// stop the other files. `Err` only when `path` itself cannot be listed: then nothing
    /// changes, as when the API server is unreachable.
    pub fn refresh(&mut self, state: &SharedState) -> Result<Option<Refreshed>, ManifestError> {
        let listing = manifest_files(&self.path)?;
        let present: BTreeSet<&Path> = listing.iter().map(PathBuf::as_path).collect();
        let removed: Vec<Arc<Path>> = self
            .files
            .keys()
            .filter(|f| !present.contains(f.as_ref()))
            .cloned()
            .collect();
        let mut changed: Vec<(Arc<Path>, Option<Stamp>)> = Vec::new();
        for file in &listing {
            let stamp = stamp_of(file);
            match self.files.get_key_value(file.as_path()) {
                Some((_, record)) if record.stamp == stamp => {}
                Some((name, _)) => changed.push((name.clone(), stamp)),
                None => changed.push((Arc::from(file.as_path()), stamp)),
            }
        }
        if self.listed && changed.is_empty() && removed.is_empty() {
            return Ok(None);
        }

        let mut done = Refreshed::default();
        // The files whose new content replaces what they defined: parsed ones and removed ones.
        let mut fresh: BTreeMap<Arc<Path>, Vec<Object>> = BTreeMap::new();
        for (file, stamp) in changed {
            let record = self.files.entry(file.clone()).or_insert(FileRecord {
                stamp: None,
                ids: Vec::new(),
                broken: false,
            });
            record.stamp = stamp;
            match read_file(&file) {
                Ok((objects, problems)) => {
                    if record.broken {
                        tracing::info!(file = %file.display(), "manifest parses again");
                    }
                    record.broken = false;
                    done.files_read += 1;
                    for problem in problems {
                        done.report_duplicate(problem);
                    }
                    fresh.insert(file, objects);
                }
                Err(e) => {
                    record.broken = true;
                    let kept = record.ids.len();
                    let problem = format!(
                        "{e}; keeping the {kept} object(s) it defined when it last parsed until it parses again"
                    );
                    tracing::error!("{problem}");
                    done.problems.push(problem);
                }
            }
        }
        for file in &removed {
            fresh.insert(file.clone(), Vec::new());
        }

        // Ownership before and after, for every object the fresh files define or defined.
        let mut affected: BTreeMap<ObjectId, Vec<Arc<Path>>> = BTreeMap::new();
        for file in fresh.keys() {
            for id in self.files.get(file).map(|r| r.ids.as_slice()).unwrap_or_default() {
                affected.insert(id.clone(), self.owners.get(id).cloned().unwrap_or_default());
            }
        }
        for objects in fresh.values() {
            for object in objects {
                let id = object.id();
                let before = self.owners.get(&id).cloned().unwrap_or_default();
                affected.entry(id).or_insert(before);
            }
        }
        for (file, objects) in &fresh {
            let old = match self.files.get_mut(file) {
                Some(record) => std::mem::take(&mut record.ids),
                None => Vec::new(),
            };
            for id in old {
                if let Some(owners) = self.owners.get_mut(&id) {
                    owners.retain(|f| f != file);
                    if owners.is_empty() {
                        self.owners.remove(&id);
                    }
                }
            }
            let ids: Vec<ObjectId> = objects.iter().map(Object::id).collect();
            for id in &ids {
                let owners = self.owners.entry(id.clone()).or_default();
                if let Err(at) = owners.binary_search(file) {
                    owners.insert(at, file.clone());
                }
            }
            if let Some(record) = self.files.get_mut(file) {
                record.ids = ids;
            }
        }
        for file in &removed {
            self.files.remove(file);
        }

        // What changes in the store: each affected object's first copy, if it moved or changed.
        let mut winners = Winners::new();
        let mut gone = Vec::new();
        let mut rereads: BTreeMap<Arc<Path>, Option<Vec<Object>>> = BTreeMap::new();
        for (id, before) in &affected {
            let after = self.owners.get(id).map(Vec::as_slice).unwrap_or_default();
            if after.len() > 1 && after != before.as_slice() {
                let names: Vec<String> = after.iter().map(|f| f.display().to_string()).collect();
                done.report_duplicate(format!(
                    "{id} is defined in {}; the copy in {} is programmed",
                    names.join(" and "),
                    names[0]
                ));
            }
            let Some(first) = after.first() else {
                if !before.is_empty() {
                    gone.push(id.clone());
                }
                continue;
            };
            let object = if let Some(objects) = fresh.get(first) {
                objects.iter().find(|o| o.id() == *id).cloned()
            } else if before.first() == Some(first) {
                // The same untouched copy as before: nothing to do.
                continue;
            } else {
                // An earlier copy went away: the next file's copy takes over, read again (only
                // identities are kept between reads).
                let objects = rereads
                    .entry(first.clone())
                    .or_insert_with(|| read_file(first).ok().map(|(o, _)| o));
                let found = objects.as_ref().and_then(|o| o.iter().find(|o| o.id() == *id).cloned());
                if found.is_none() {
                    let problem = format!(
                        "{id}: its remaining copy in {} cannot be read now; it is deleted until that file parses again",
                        first.display()
                    );
                    tracing::error!("{problem}");
                    done.problems.push(problem);
                    gone.push(id.clone());
                }
                found
            };
            if let Some(object) = object {
                winners.insert(id.clone(), object);
            }
        }

        done.applied = winners.len();
        let services = self.allocate_services(&mut winners, &gone);
        done.deleted = gone.len();
        if self.listed {
            self.apply_changes(state, winners, services, &gone);
        } else {
            self.list(state, winners, services);
        }
        self.listed = true;
        Ok(Some(done))
    }

    /// Gives the Services among `winners` their cluster IP and node ports, keeping what each
    /// had before (so editing a file, or another file's copy taking over, never moves a
    /// Service), and avoiding what the other Services hold. Returns them, taken out of `winners`.
    fn allocate_services(&mut self, winners: &mut Winners, gone: &[ObjectId]) -> Vec<Service> {
        for id in gone.iter().filter(|id| id.kind == Kind::Service) {
            self.assigned.remove(&(id.namespace.clone(), id.name.clone()));
        }
        let ids: Vec<ObjectId> = winners.keys().filter(|id| id.kind == Kind::Service).cloned().collect();
        let mut services: Vec<Service> = ids
            .iter()
            .filter_map(|id| match winners.remove(id) {
                Some(Object::Service(s)) => Some(s),
                _ => None,
            })
            .collect();
        if services.is_empty() {
            return services;
        }
        let batch: BTreeSet<ServiceId> = services.iter().map(id_of).collect();
        let mut taken = Taken::default();
        for (id, a) in &self.assigned {
            if !batch.contains(id) {
                taken.add(a);
            }
        }
        allocate(&mut services, &self.range, &mut taken, &self.assigned);
        for svc in &services {
            self.assigned.insert(id_of(svc), Assigned::of(svc));
        }
        services
    }

    /// A bare Node object with this node's name (no addresses): what the store gets when no
    /// file defines this node.
    fn bare_node(&self) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(self.node_name.clone()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        }
    }

    fn is_this_node(&self, id: &ObjectId) -> bool {
        id.kind == Kind::Node && id.name == self.node_name
    }

    /// The first refresh: every kind listed completely, even if some files do not parse.
    fn list(&self, state: &SharedState, winners: Winners, services: Vec<Service>) {
        let mut all = ByKind::default();
        for object in winners.into_values() {
            all.add(object);
        }
        let node = all
            .nodes
            .into_iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()))
            .unwrap_or_else(|| self.bare_node());
        state.update(|s| {
            let a = s.replace_services(services.iter());
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

    /// Later refreshes: the objects whose programmed copy changed applied, and those no
    /// readable file defines any more deleted.
    fn apply_changes(&self, state: &SharedState, winners: Winners, services: Vec<Service>, gone: &[ObjectId]) {
        let mut new = ByKind::default();
        for object in winners.into_values() {
            new.add(object);
        }
        let node = if let Some(n) = new
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.node_name.as_str()))
        {
            Some(n.clone())
        } else {
            gone.iter().any(|id| self.is_this_node(id)).then(|| self.bare_node())
        };
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
            for svc in &services {
                changed |= s.apply_service(svc);
            }
            for slice in &new.slices {
                changed |= s.apply_slice(slice);
            }
            if let Some(node) = &node {
                changed |= s.apply_node(node);
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
                            metadata: id.meta(),
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

/// Objects sorted by kind, for the store's per-kind calls.
#[derive(Default)]
struct ByKind {
    slices: Vec<EndpointSlice>,
    nodes: Vec<Node>,
    ingresses: Vec<Ingress>,
    ingress_classes: Vec<IngressClass>,
    secrets: Vec<Secret>,
    gateway: GatewayDocs,
}

impl ByKind {
    /// Services are allocated and applied apart (see `allocate_services`).
    fn add(&mut self, object: Object) {
        match object {
            Object::Service(_) => {}
            Object::EndpointSlice(o) => self.slices.push(o),
            Object::Node(o) => self.nodes.push(o),
            Object::Ingress(o) => self.ingresses.push(o),
            Object::IngressClass(o) => self.ingress_classes.push(o),
            Object::Secret(o) => self.secrets.push(o),
            Object::Gateway(o) => self.gateway.push(o),
        }
    }
}

/// Reads the manifests now and again whenever a file changes, until `shutdown`.
pub async fn run(
    state: Arc<SharedState>,
    mut source: ManifestSource,
    poll: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    // The path itself failing (a directory not mounted yet) is retried at every poll: say so
    // once, and again only when the reason changes.
    let mut last_error: Option<String> = None;
    loop {
        match source.refresh(&state) {
            Ok(refreshed) => {
                if last_error.take().is_some() {
                    tracing::info!(path = %source.path.display(), "manifests readable again");
                }
                if let Some(r) = refreshed {
                    tracing::info!(
                        path = %source.path.display(),
                        files_read = r.files_read,
                        objects_applied = r.applied,
                        objects_deleted = r.deleted,
                        problems = r.problems.len(),
                        "loaded manifests"
                    );
                }
            }
            Err(e) => {
                let message = e.to_string();
                if last_error.as_ref() != Some(&message) {
                    tracing::error!("{message}; keeping the previously loaded manifests, retrying");
                    last_error = Some(message);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests;
