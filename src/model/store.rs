//! The cluster objects kproxy knows, and what changed since the last sync.
//!
//! Both sources (the API watchers and the manifest files) feed the same [`Store`]; a sync takes
//! a [`Snapshot`]: the desired state plus the set of Services whose rules must be rewritten.
//! Only changed Services are recomputed, so a sync costs what changed, not what exists.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::convert::{
    self, ConvertedNode, ConvertedService, ConvertedSlice, ServiceDecision, SliceInfo, SliceKey, SlicePort,
};
use super::{ChangeSet, DesiredState, NodeInfo, PortState, ServiceKey, ServiceMap, ServicePort, ServiceState};

/// The kinds a source lists; kproxy programs nothing until each has been listed once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

/// What a sync needs: the full desired state, what changed, and change timestamps for the
/// network-programming latency metric. Taking one costs what changed since the previous one:
/// `desired.services` is a persistent map shared with the store, not a copy.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub desired: DesiredState,
    pub changes: ChangeSet,
    /// Service ports in `desired` (kept by the store as Services change, not counted here).
    pub service_ports: usize,
    /// Endpoints of all Service ports in `desired`, kept the same way.
    pub endpoints: usize,
    /// `last-change-trigger-time` of the EndpointSlices changed since the last snapshot.
    pub trigger_times: Vec<SystemTime>,
    pub service_changes: usize,
    pub endpoint_changes: usize,
}

/// One EndpointSlice as the store keeps it: under its Service's entry, so without the
/// Service's key (the entry's), and only what proxying and change detection read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSlice {
    pub name: Arc<str>,
    pub ports: Box<[SlicePort]>,
    /// `last-change-trigger-time` in nanoseconds since the epoch: only compared, to tell a
    /// rewritten slice from the same one again, so 8 bytes, not a `SystemTime`'s 16.
    pub trigger_stamp: Option<NonZeroU64>,
}

/// A trigger time as [`StoredSlice::trigger_stamp`] keeps it.
fn trigger_stamp(time: Option<SystemTime>) -> Option<NonZeroU64> {
    let since_epoch = time?.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    NonZeroU64::new(u64::try_from(since_epoch.as_nanos()).ok()?)
}

/// One Service's record: its converted ports and its EndpointSlices, under one key, since
/// both are looked up together for every change (one map entry per Service, not two).
#[derive(Debug, Default)]
struct Entry {
    /// `None`: not proxied (not seen yet, skipped or invalid), while its slices may be known.
    ports: Option<Box<[Arc<ServicePort>]>>,
    /// By name. Most Services have one or two, so a sorted boxed slice, not a map (a map's
    /// first node alone holds room for eleven) nor a vector (its capacity is one more word in
    /// every entry).
    slices: Box<[StoredSlice]>,
}

/// The name of the Service each EndpointSlice belongs to, by namespace, then slice name: a
/// slice's delete or relist names only the slice. Split by namespace so that an entry holds
/// two names, not three (the namespace is in the outer key once).
#[derive(Debug, Default)]
struct SliceOwners(BTreeMap<Arc<str>, BTreeMap<Arc<str>, Arc<str>>>);

impl SliceOwners {
    fn get(&self, key: &SliceKey) -> Option<&Arc<str>> {
        self.0.get(&key.namespace)?.get(&key.name)
    }

    fn insert(&mut self, key: &SliceKey, owner: Arc<str>) {
        self.0
            .entry(key.namespace.clone())
            .or_default()
            .insert(key.name.clone(), owner);
    }

    fn remove(&mut self, key: &SliceKey) {
        if let Some(names) = self.0.get_mut(&key.namespace) {
            names.remove(&key.name);
            if names.is_empty() {
                self.0.remove(&key.namespace);
            }
        }
    }

    fn keys(&self) -> impl Iterator<Item = SliceKey> + '_ {
        self.0.iter().flat_map(|(namespace, names)| {
            names.keys().map(|name| SliceKey {
                namespace: namespace.clone(),
                name: name.clone(),
            })
        })
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, Default)]
pub struct Store {
    node_name: String,
    /// Proxied Services and the EndpointSlices of any Service; an entry with neither is removed.
    entries: BTreeMap<ServiceKey, Entry>,
    /// The last conversion error or skip note per Service, so a relist does not repeat warnings.
    notes: BTreeMap<ServiceKey, String>,
    /// The name of the Service each slice belongs to (in the slice's namespace), for deletes.
    slice_owner: SliceOwners,
    slice_notes: BTreeMap<SliceKey, String>,
    /// `spec.externalName` of ExternalName Services: they get no rules, but Ingress may route to them.
    external_names: BTreeMap<ServiceKey, String>,
    node: NodeInfo,
    /// `--disable-external-ips`.
    ignore_external_ips: bool,
    /// `--bind-address`: this node's primary IP, in place of its family's first Node address.
    bind_address: Option<std::net::IpAddr>,
    /// False while this node is being deleted or drained by the cluster autoscaler.
    node_eligible: bool,
    /// Derived per-Service state, recomputed for `dirty` keys only; every snapshot shares it.
    state: ServiceMap,
    /// Service ports and endpoints in `state`, updated with it.
    state_ports: usize,
    state_endpoints: usize,
    dirty: BTreeSet<ServiceKey>,
    full: bool,
    synced: BTreeSet<Kind>,
    trigger_times: Vec<SystemTime>,
    service_changes: usize,
    endpoint_changes: usize,
}

impl Store {
    /// A store for the node named `node_name` (endpoints on it are local).
    pub fn new(node_name: impl Into<String>) -> Self {
        let node_name = node_name.into();
        Store {
            node: NodeInfo {
                name: node_name.clone(),
                ..NodeInfo::default()
            },
            node_name,
            node_eligible: true,
            full: true,
            ..Store::default()
        }
    }

    /// Drops `spec.externalIPs` from every Service (`--disable-external-ips`).
    pub fn set_ignore_external_ips(&mut self, ignore: bool) {
        self.ignore_external_ips = ignore;
    }

    /// `--bind-address`, as kube-proxy uses it: the primary node IP (see [`super::node_ips`]).
    pub fn set_bind_address(&mut self, bind: Option<std::net::IpAddr>) {
        self.bind_address = bind;
    }

    /// True once every kind has been listed completely: before that, a sync would program a
    /// half-empty ruleset and cut live traffic.
    pub fn is_ready(&self) -> bool {
        [Kind::Service, Kind::EndpointSlice, Kind::Node]
            .iter()
            .all(|k| self.synced.contains(k))
    }

    pub fn has_changes(&self) -> bool {
        self.full || !self.dirty.is_empty()
    }

    /// Records that `kind` has been listed completely.
    pub fn mark_synced(&mut self, kind: Kind) {
        self.synced.insert(kind);
    }

    /// Adds or updates a Service. Returns true if the proxied state changed.
    pub fn apply_service(&mut self, svc: &Service) -> bool {
        self.apply_converted_service(convert::convert_service_object(svc))
    }

    /// Adds or updates a Service converted on arrival. Returns true if the proxied state changed.
    pub fn apply_converted_service(&mut self, svc: ConvertedService) -> bool {
        let ConvertedService {
            key,
            external_name,
            decision,
        } = svc;
        match external_name {
            Some(name) => self.external_names.insert(key.clone(), name),
            None => self.external_names.remove(&key),
        };
        match decision {
            Ok(ServiceDecision::Proxy {
                mut ports,
                mut warnings,
            }) => {
                if self.ignore_external_ips && ports.iter().any(|p| !p.external_ips().is_empty()) {
                    warnings.push(format!("Service {key}: ignoring externalIPs (--disable-external-ips)"));
                    for p in &mut ports {
                        Arc::make_mut(p).set_external_ips(Vec::new());
                    }
                }
                let note = warnings.join("; ");
                if self.notes.get(&key) != Some(&note) {
                    for w in &warnings {
                        tracing::warn!("{w}");
                    }
                    self.set_note(&key, note);
                }
                self.set_service(key, Some(ports))
            }
            Ok(ServiceDecision::Skip(reason)) => {
                let note = format!("not proxied: {reason:?}");
                if self.notes.get(&key) != Some(&note) {
                    tracing::debug!(service = %key, ?reason, "Service gets no rules");
                    self.set_note(&key, note);
                }
                self.set_service(key, None)
            }
            Err(err) => {
                let note = err.to_string();
                if self.notes.get(&key) != Some(&note) {
                    tracing::warn!("skipping {note}");
                    self.set_note(&key, note);
                }
                self.set_service(key, None)
            }
        }
    }

    pub fn delete_service(&mut self, svc: &Service) -> bool {
        self.delete_service_key(&convert::service_key_of(svc))
    }

    /// Deletes the Service named `key`. Returns true if the proxied state changed.
    pub fn delete_service_key(&mut self, key: &ServiceKey) -> bool {
        self.notes.remove(key);
        self.external_names.remove(key);
        self.set_service(key.clone(), None)
    }

    /// Replaces every Service with `all` (a relist, or the manifest files re-read).
    pub fn replace_services<'a>(&mut self, all: impl IntoIterator<Item = &'a Service>) -> bool {
        self.replace_converted_services(all.into_iter().map(convert::convert_service_object))
    }

    /// Replaces every Service with `all`, converted on arrival (a relist staged whole).
    pub fn replace_converted_services(&mut self, all: impl IntoIterator<Item = ConvertedService>) -> bool {
        let mut listed = BTreeSet::new();
        let mut changed = false;
        for svc in all {
            listed.insert(svc.key.clone());
            changed |= self.apply_converted_service(svc);
        }
        let gone: Vec<ServiceKey> = self
            .entries
            .iter()
            .filter(|(k, e)| e.ports.is_some() && !listed.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        self.notes.retain(|k, _| listed.contains(k));
        self.external_names.retain(|k, _| listed.contains(k));
        for key in gone {
            changed |= self.set_service(key, None);
        }
        self.mark_synced(Kind::Service);
        changed
    }

    /// The ports and endpoints of one proxied Service, computed now (the Ingress route builder
    /// reads this; it does not touch change tracking).
    pub fn service_state(&self, key: &ServiceKey) -> Option<ServiceState> {
        let entry = self.entries.get(key)?;
        Some(build_service_state(entry.ports.as_deref()?, Some(&entry.slices)))
    }

    /// `spec.externalName` of an ExternalName Service.
    pub fn external_name(&self, key: &ServiceKey) -> Option<&str> {
        self.external_names.get(key).map(String::as_str)
    }

    fn set_note(&mut self, key: &ServiceKey, note: String) {
        if note.is_empty() {
            self.notes.remove(key);
        } else {
            self.notes.insert(key.clone(), note);
        }
    }

    fn set_service(&mut self, key: ServiceKey, ports: Option<Vec<Arc<ServicePort>>>) -> bool {
        let ports = ports.map(Vec::into_boxed_slice);
        let changed = match self.entries.get_mut(&key) {
            Some(entry) if entry.ports == ports => false,
            Some(entry) => {
                entry.ports = ports;
                if entry.ports.is_none() && entry.slices.is_empty() {
                    self.entries.remove(&key);
                }
                true
            }
            None if ports.is_none() => false,
            None => {
                self.entries.insert(
                    key.clone(),
                    Entry {
                        ports,
                        slices: Box::default(),
                    },
                );
                true
            }
        };
        if changed {
            self.service_changes += 1;
            self.dirty.insert(key);
        }
        changed
    }

    /// Adds or updates an EndpointSlice. Returns true if the proxied state changed.
    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> bool {
        let converted = convert::convert_slice_object(slice, &self.node_name);
        self.apply_converted_slice(converted)
    }

    /// Adds or updates an EndpointSlice converted on arrival (for this store's node, see
    /// [`Self::node_name`]). Returns true if the proxied state changed.
    pub fn apply_converted_slice(&mut self, slice: ConvertedSlice) -> bool {
        let ConvertedSlice { key, info, warnings } = slice;
        let note = match &info {
            Err(e) => e.to_string(),
            Ok(_) => warnings.join("; "),
        };
        if self.slice_notes.get(&key) != Some(&note) {
            match &info {
                Err(e) => tracing::warn!("skipping {e}"),
                Ok(_) => warnings.iter().for_each(|w| tracing::warn!("{w}")),
            }
            if note.is_empty() {
                self.slice_notes.remove(&key);
            } else {
                self.slice_notes.insert(key.clone(), note);
            }
        }
        match info {
            Ok(Some(info)) => self.set_slice(key, Some(info)),
            Ok(None) | Err(_) => self.set_slice(key, None),
        }
    }

    pub fn delete_slice(&mut self, slice: &EndpointSlice) -> bool {
        self.delete_slice_key(&SliceKey::of(slice))
    }

    /// Deletes the EndpointSlice named `key`. Returns true if the proxied state changed.
    pub fn delete_slice_key(&mut self, key: &SliceKey) -> bool {
        self.slice_notes.remove(key);
        self.set_slice(key.clone(), None)
    }

    /// Replaces every EndpointSlice with `all`.
    pub fn replace_slices<'a>(&mut self, all: impl IntoIterator<Item = &'a EndpointSlice>) -> bool {
        let node = self.node_name.clone();
        self.replace_converted_slices(all.into_iter().map(|s| convert::convert_slice_object(s, &node)))
    }

    /// Replaces every EndpointSlice with `all`, converted on arrival (a relist staged whole).
    pub fn replace_converted_slices(&mut self, all: impl IntoIterator<Item = ConvertedSlice>) -> bool {
        let mut listed = BTreeSet::new();
        let mut changed = false;
        for slice in all {
            listed.insert(slice.key.clone());
            changed |= self.apply_converted_slice(slice);
        }
        let gone: Vec<SliceKey> = self.slice_owner.keys().filter(|key| !listed.contains(key)).collect();
        self.slice_notes.retain(|key, _| listed.contains(key));
        for key in gone {
            changed |= self.set_slice(key, None);
        }
        self.mark_synced(Kind::EndpointSlice);
        changed
    }

    fn set_slice(&mut self, key: SliceKey, info: Option<SliceInfo>) -> bool {
        let old_owner = self.slice_owner.get(&key).map(|name| ServiceKey {
            namespace: key.namespace.clone(),
            name: name.clone(),
        });
        let old = old_owner
            .as_ref()
            .and_then(|owner| self.entries.get(owner))
            .and_then(|entry| find_slice(&entry.slices, &key.name).map(|i| &entry.slices[i]));
        let unchanged = match (old, &info) {
            (None, None) => true,
            (Some(old), Some(new)) => {
                Some(&new.service) == old_owner.as_ref()
                    && *old.ports == *new.ports
                    && old.trigger_stamp == trigger_stamp(new.trigger_time)
            }
            _ => false,
        };
        if unchanged {
            return false;
        }
        if let Some(owner) = old_owner {
            if let Some(entry) = self.entries.get_mut(&owner) {
                if let Some(i) = find_slice(&entry.slices, &key.name) {
                    let mut slices = std::mem::take(&mut entry.slices).into_vec();
                    slices.remove(i);
                    entry.slices = slices.into_boxed_slice();
                }
                if entry.ports.is_none() && entry.slices.is_empty() {
                    self.entries.remove(&owner);
                }
            }
            self.slice_owner.remove(&key);
            self.dirty.insert(owner);
        }
        if let Some(info) = info {
            if let Some(t) = info.trigger_time {
                self.trigger_times.push(t);
            }
            // The entry's own key, so the slice shares its Service's strings.
            let owner = match self.entries.get_key_value(&info.service) {
                Some((owner, _)) => owner.clone(),
                None => {
                    self.entries.insert(info.service.clone(), Entry::default());
                    info.service
                }
            };
            self.slice_owner.insert(&key, owner.name.clone());
            let entry = self.entries.get_mut(&owner).expect("the entry was just found or made");
            let at = entry.slices.partition_point(|s| *s.name < *key.name);
            // One more, not double: most Services keep their one or two slices for good.
            let mut slices = std::mem::take(&mut entry.slices).into_vec();
            slices.reserve_exact(1);
            slices.insert(
                at,
                StoredSlice {
                    name: key.name,
                    ports: info.ports.into_boxed_slice(),
                    trigger_stamp: trigger_stamp(info.trigger_time),
                },
            );
            entry.slices = slices.into_boxed_slice();
            self.dirty.insert(owner);
        }
        self.endpoint_changes += 1;
        true
    }

    /// Sets this node's information; a change forces a full sync (local addresses, zone).
    pub fn apply_node(&mut self, node: &Node) -> bool {
        self.apply_converted_node(convert::convert_node_object(node))
    }

    /// Sets this node's information, converted on arrival.
    pub fn apply_converted_node(&mut self, node: ConvertedNode) -> bool {
        let ConvertedNode { mut info, eligible } = node;
        info.addresses = super::node_ips::with_bind_address(&info.addresses, self.bind_address);
        if info.name.is_empty() {
            info.name = self.node_name.clone();
        }
        self.mark_synced(Kind::Node);
        self.node_eligible = eligible;
        if info == self.node {
            return false;
        }
        if info.zone != self.node.zone {
            // Topology hints depend on the zone: every Service may change.
            self.dirty.extend(
                self.entries
                    .iter()
                    .filter(|(_, e)| e.ports.is_some())
                    .map(|(k, _)| k.clone()),
            );
        }
        self.node = info;
        self.full = true;
        true
    }

    /// This node, as last read.
    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Whether load balancers should send this node traffic (`nodeEligible` in `/healthz`).
    pub fn node_eligible(&self) -> bool {
        self.node_eligible
    }

    /// Forces the next snapshot to be a full sync (periodic resync, after a failure).
    pub fn force_full(&mut self) {
        self.full = true;
    }

    /// Pending change counts: (services, endpoint slices).
    pub fn pending_counts(&self) -> (usize, usize) {
        (self.service_changes, self.endpoint_changes)
    }

    /// The desired state and what changed since the previous snapshot; resets change tracking.
    /// Costs what changed: only dirty Services are rebuilt, and the map is shared, not copied.
    pub fn snapshot(&mut self) -> Snapshot {
        let dirty = std::mem::take(&mut self.dirty);
        for key in &dirty {
            let old = match self
                .entries
                .get(key)
                .and_then(|e| Some((e.ports.as_deref()?, &e.slices)))
            {
                Some((ports, slices)) => {
                    let state = build_service_state(ports, Some(slices));
                    self.state_ports += state.ports.len();
                    self.state_endpoints += endpoints_of(&state);
                    self.state.insert(key.clone(), Arc::new(state))
                }
                None => self.state.remove(key),
            };
            if let Some(old) = old {
                self.state_ports -= old.ports.len();
                self.state_endpoints -= endpoints_of(&old);
            }
        }
        let changes = ChangeSet {
            full: std::mem::take(&mut self.full),
            services: dirty,
        };
        Snapshot {
            desired: DesiredState {
                services: self.state.clone(),
                node: self.node.clone(),
            },
            changes,
            service_ports: self.state_ports,
            endpoints: self.state_endpoints,
            trigger_times: std::mem::take(&mut self.trigger_times),
            service_changes: std::mem::take(&mut self.service_changes),
            endpoint_changes: std::mem::take(&mut self.endpoint_changes),
        }
    }
}

fn endpoints_of(state: &ServiceState) -> usize {
    state.ports.iter().map(|p| p.endpoints.len()).sum()
}

fn find_slice(slices: &[StoredSlice], name: &str) -> Option<usize> {
    slices.binary_search_by(|s| (*s.name).cmp(name)).ok()
}

/// The per-port endpoints of one Service, from all its slices (by slice name).
pub fn build_service_state(ports: &[Arc<ServicePort>], slices: Option<&[StoredSlice]>) -> ServiceState {
    ServiceState {
        ports: ports
            .iter()
            .map(|p| PortState {
                port: p.clone(),
                endpoints: match slices {
                    Some(s) => convert::merge_endpoints(&p.name, s.iter().map(|s| &s.ports[..])),
                    None => Arc::from([]),
                },
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, ip: &str) -> Service {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: ns}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}"
        ))
        .unwrap()
    }

    fn slice(name: &str, svc: &str, ip: &str) -> EndpointSlice {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: ns, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [{ip}]}}]"
        ))
        .unwrap()
    }

    fn node() -> Node {
        serde_yaml::from_str("metadata: {name: n1}").unwrap()
    }

    #[test]
    fn not_ready_until_every_kind_listed() {
        let mut s = Store::new("n1");
        assert!(!s.is_ready());
        s.replace_services([&svc("a", "10.96.0.1")]);
        s.replace_slices([]);
        assert!(!s.is_ready());
        s.apply_node(&node());
        assert!(s.is_ready());
    }

    #[test]
    fn snapshot_tracks_only_changed_services() {
        let mut s = Store::new("n1");
        s.replace_services([&svc("a", "10.96.0.1"), &svc("b", "10.96.0.2")]);
        s.replace_slices([&slice("a-1", "a", "10.244.1.2")]);
        s.apply_node(&node());
        let first = s.snapshot();
        assert!(first.changes.full);
        assert_eq!(first.desired.services.len(), 2);
        assert_eq!(first.desired.endpoint_count(), 1);

        // Re-applying identical objects changes nothing.
        assert!(!s.apply_service(&svc("a", "10.96.0.1")));
        assert!(!s.apply_slice(&slice("a-1", "a", "10.244.1.2")));
        assert!(!s.has_changes());

        assert!(s.apply_slice(&slice("a-1", "a", "10.244.1.3")));
        let snap = s.snapshot();
        assert!(!snap.changes.full);
        assert_eq!(snap.changes.services, BTreeSet::from([ServiceKey::new("ns", "a")]));
        let a = &snap.desired.services[&ServiceKey::new("ns", "a")];
        assert_eq!(a.ports[0].endpoints[0].addr_string(), "10.244.1.3:8080");
        // Untouched Services keep the very same Arc: nothing was recomputed.
        assert!(Arc::ptr_eq(
            &first.desired.services[&ServiceKey::new("ns", "b")],
            &snap.desired.services[&ServiceKey::new("ns", "b")]
        ));
    }

    /// A snapshot is a version of the desired state: later changes never show through it, and
    /// the running counts always equal a walk of it.
    #[test]
    fn snapshots_are_versions_with_counts() {
        let key = |n: &str| ServiceKey::new("ns", n);
        let check_counts = |snap: &Snapshot| {
            assert_eq!(snap.service_ports, snap.desired.service_port_count());
            assert_eq!(snap.endpoints, snap.desired.endpoint_count());
        };
        let mut s = Store::new("n1");
        s.replace_services([&svc("a", "10.96.0.1"), &svc("b", "10.96.0.2"), &svc("c", "10.96.0.3")]);
        s.replace_slices([&slice("a-1", "a", "10.244.1.2"), &slice("b-1", "b", "10.244.1.3")]);
        s.apply_node(&node());
        let first = s.snapshot();
        check_counts(&first);
        assert_eq!((first.service_ports, first.endpoints), (3, 2));

        // A change, a deletion and a new Service, in one batch.
        s.apply_slice(&slice("a-1", "a", "10.244.1.9"));
        s.delete_service_key(&key("b"));
        s.apply_service(&svc("d", "10.96.0.4"));
        s.apply_slice(&slice("d-1", "d", "10.244.1.4"));
        let second = s.snapshot();
        assert!(!second.changes.full);
        assert_eq!(second.changes.services, BTreeSet::from([key("a"), key("b"), key("d")]));
        assert!(!second.desired.services.contains_key(&key("b")));
        assert_eq!(
            second.desired.services.keys().cloned().collect::<Vec<_>>(),
            [key("a"), key("c"), key("d")]
        );
        assert_eq!(
            second.desired.services[&key("a")].ports[0].endpoints[0].addr_string(),
            "10.244.1.9:8080"
        );
        check_counts(&second);
        assert_eq!((second.service_ports, second.endpoints), (3, 2));
        // The first snapshot is untouched, and shares what did not change.
        assert_eq!(
            first.desired.services.keys().cloned().collect::<Vec<_>>(),
            [key("a"), key("b"), key("c")]
        );
        assert_eq!(
            first.desired.services[&key("a")].ports[0].endpoints[0].addr_string(),
            "10.244.1.2:8080"
        );
        check_counts(&first);
        assert!(Arc::ptr_eq(
            &first.desired.services[&key("c")],
            &second.desired.services[&key("c")]
        ));

        // Nothing changed: nothing to sync; a deleted slice empties its Service's port.
        assert!(!s.has_changes());
        s.delete_slice_key(&SliceKey::of(&slice("d-1", "d", "10.244.1.4")));
        let third = s.snapshot();
        assert_eq!(third.changes.services, BTreeSet::from([key("d")]));
        check_counts(&third);
        assert_eq!(third.endpoints, 1);

        // A full resync: flagged full, the whole state, the same counts.
        s.force_full();
        assert!(s.has_changes());
        let full = s.snapshot();
        assert!(full.changes.full);
        assert!(full.changes.services.is_empty());
        assert_eq!(full.desired.services.len(), 3);
        check_counts(&full);
        assert!(!s.has_changes());
    }

    #[test]
    fn relist_deletes_what_is_gone() {
        let mut s = Store::new("n1");
        s.replace_services([&svc("a", "10.96.0.1"), &svc("b", "10.96.0.2")]);
        s.replace_slices([&slice("b-1", "b", "10.244.1.2")]);
        s.snapshot();
        assert!(s.replace_services([&svc("a", "10.96.0.1")]));
        assert!(s.replace_slices([]));
        let snap = s.snapshot();
        assert_eq!(snap.changes.services, BTreeSet::from([ServiceKey::new("ns", "b")]));
        assert_eq!(snap.desired.services.len(), 1);
    }

    #[test]
    fn invalid_service_is_dropped_others_kept() {
        let mut s = Store::new("n1");
        s.replace_services([&svc("good", "10.96.0.1"), &svc("bad", "10.96.0.999")]);
        let snap = s.snapshot();
        assert_eq!(snap.desired.services.len(), 1);
        // An update that breaks a previously good Service removes its rules.
        assert!(s.apply_service(&svc("good", "not-an-ip")));
        assert!(s.snapshot().desired.services.is_empty());
    }

    #[test]
    fn slice_moving_between_services_dirties_both() {
        let mut s = Store::new("n1");
        s.replace_services([&svc("a", "10.96.0.1"), &svc("b", "10.96.0.2")]);
        s.apply_slice(&slice("x", "a", "10.244.1.2"));
        s.snapshot();
        s.apply_slice(&slice("x", "b", "10.244.1.2"));
        let snap = s.snapshot();
        assert_eq!(snap.changes.services.len(), 2);
        assert_eq!(snap.desired.endpoint_count(), 1);
    }

    /// The compact model is the Kubernetes objects' content: every field a dataplane reads
    /// comes back out of the store as it went in, names included.
    #[test]
    fn endpoints_round_trip_through_the_store() {
        let mut s = Store::new("n1");
        s.apply_node(
            &serde_yaml::from_str("metadata: {name: n1, labels: {topology.kubernetes.io/zone: zone-b}}").unwrap(),
        );
        s.apply_service(&serde_yaml::from_str(
            "metadata: {name: web, namespace: prod}\nspec: {clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10, 'fd00::10'], ports: [{name: http, port: 80}]}",
        ).unwrap());
        for (name, family, addresses) in [
            ("web-v4", "IPv4", ["10.244.1.2", "10.244.2.3"]),
            ("web-v6", "IPv6", ["fd00:1::2", "fd00:1::3"]),
        ] {
            s.apply_slice(
                &serde_yaml::from_str(&format!(
                    r#"
metadata: {{name: {name}, namespace: prod, labels: {{kubernetes.io/service-name: web}}}}
addressType: {family}
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: ['{}']
  conditions: {{ready: true}}
  nodeName: n1
  zone: zone-b
  hints: {{forZones: [{{name: zone-b}}, {{name: zone-a}}], forNodes: [{{name: n1}}]}}
- addresses: ['{}']
  conditions: {{ready: false, serving: true, terminating: true}}
  nodeName: n2
"#,
                    addresses[0], addresses[1]
                ))
                .unwrap(),
            );
        }
        let snap = s.snapshot();
        let web = &snap.desired.services[&ServiceKey::new("prod", "web")];
        let eps = &web.ports[0].endpoints;
        let seen: Vec<_> = eps
            .iter()
            .map(|e| {
                (
                    e.addr_string(),
                    (e.ready(), e.serving(), e.terminating(), e.is_local()),
                    e.node_name().map(|n| n.as_str()),
                    e.zone().map(|z| z.as_str()),
                    {
                        let mut z: Vec<_> = e.zone_hints().iter().collect();
                        z.sort();
                        z
                    },
                    e.node_hints().iter().collect::<Vec<_>>(),
                )
            })
            .collect();
        let hinted = |addr: &str| {
            (
                addr.to_string(),
                (true, true, false, true),
                Some("n1"),
                Some("zone-b"),
                vec!["zone-a", "zone-b"],
                vec!["n1"],
            )
        };
        let terminating = |addr: &str| {
            (
                addr.to_string(),
                (false, true, true, false),
                Some("n2"),
                None,
                vec![],
                vec![],
            )
        };
        assert_eq!(
            seen,
            [
                hinted("10.244.1.2:8080"),
                terminating("10.244.2.3:8080"),
                hinted("[fd00:1::2]:8080"),
                terminating("[fd00:1::3]:8080"),
            ]
        );
        // Slices' changes keep their meaning: the same slice again is no change, a slice of
        // another Service moves, and deleting both slices empties the port.
        assert!(!s.apply_slice(&serde_yaml::from_str(
            "metadata: {name: web-v4, namespace: prod, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.1.2], conditions: {ready: true}, nodeName: n1, zone: zone-b, hints: {forZones: [{name: zone-a}, {name: zone-b}], forNodes: [{name: n1}]}}, {addresses: [10.244.2.3], conditions: {ready: false, serving: true, terminating: true}, nodeName: n2}]",
        ).unwrap()));
        s.delete_slice_key(&SliceKey::new("prod", "web-v4"));
        s.delete_slice_key(&SliceKey::new("prod", "web-v6"));
        let snap = s.snapshot();
        assert!(snap.desired.services[&ServiceKey::new("prod", "web")].ports[0]
            .endpoints
            .is_empty());
        assert_eq!(snap.endpoints, 0);
    }

    /// Slices may arrive before their Service and outlive it: the store keeps them and
    /// programs them once the Service is there, and forgets a Service only with both gone.
    #[test]
    fn slices_before_and_after_their_service() {
        let key = ServiceKey::new("ns", "a");
        let mut s = Store::new("n1");
        assert!(s.apply_slice(&slice("a-1", "a", "10.244.1.2")));
        let snap = s.snapshot();
        assert!(snap.desired.services.is_empty());
        assert!(s.service_state(&key).is_none());
        assert!(s.apply_service(&svc("a", "10.96.0.1")));
        let snap = s.snapshot();
        assert_eq!(snap.desired.services[&key].ports[0].endpoints.len(), 1);
        assert!(s.delete_service_key(&key));
        assert!(s.snapshot().desired.services.is_empty());
        // The slice is still known: the Service coming back gets its endpoint at once.
        assert!(s.apply_service(&svc("a", "10.96.0.1")));
        assert_eq!(s.snapshot().endpoints, 1);
        assert!(s.delete_service_key(&key));
        assert!(s.delete_slice_key(&SliceKey::new("ns", "a-1")));
        assert!(s.entries.is_empty() && s.slice_owner.is_empty());
        // Deleting what is gone changes nothing.
        assert!(!s.delete_slice_key(&SliceKey::new("ns", "a-1")));
        assert!(!s.delete_service_key(&key));
    }
}
