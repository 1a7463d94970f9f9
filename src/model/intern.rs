//! Shared strings: the names that repeat across thousands of objects, kept once.
//!
//! Two kinds, by how they churn:
//! - namespaces (and the other names [`intern`] is given) are reference-counted [`Arc<str>`]s
//!   that the table forgets once nothing else holds them (checked when the table has doubled
//!   since the last sweep), because a cluster's namespaces come and go all the time;
//! - an endpoint's node name, zone and topology hints are [`Name`]s and [`Names`]: 4-byte ids,
//!   and the four together one [`Placement`], so an endpoint owns no pointer and clones without
//!   touching a reference count. Their text is kept for the life of the process (a few dozen
//!   bytes per distinct node name, zone, port name, hint set or placement ever seen), which a
//!   cluster's set of nodes and zones bounds in practice.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

struct Table {
    names: HashSet<Arc<str>>,
    /// Sweep when the table reaches this size.
    sweep_at: usize,
}

static TABLE: Mutex<Option<Table>> = Mutex::new(None);

/// The shared copy of `name`.
pub fn intern(name: &str) -> Arc<str> {
    let mut guard = TABLE.lock().unwrap_or_else(PoisonError::into_inner);
    let table = guard.get_or_insert_with(|| Table {
        names: HashSet::new(),
        sweep_at: 1024,
    });
    if let Some(shared) = table.names.get(name) {
        return shared.clone();
    }
    if table.names.len() >= table.sweep_at {
        // Names only the table holds are no longer used anywhere.
        table.names.retain(|n| Arc::strong_count(n) > 1);
        table.sweep_at = (table.names.len() * 2).max(1024);
    }
    let shared: Arc<str> = Arc::from(name);
    table.names.insert(shared.clone());
    shared
}

/// The ids of [`Name`]s and [`Names`]: text (or sets) by id for reading, id by text for
/// interning. Entries are leaked on purpose (see the module's doc), so a read hands out
/// `&'static` data and holds the lock only for an index.
struct Ids<T: ?Sized + 'static> {
    by_id: Vec<&'static T>,
    by_value: HashMap<&'static T, NonZeroU32>,
}

impl<T: ?Sized + Eq + std::hash::Hash> Ids<T> {
    fn get(table: &RwLock<Option<Self>>, id: NonZeroU32) -> &'static T {
        let guard = table.read().unwrap_or_else(PoisonError::into_inner);
        // An id only ever comes from `insert` on this very table.
        guard.as_ref().expect("an id was handed out, so the table exists").by_id[id.get() as usize - 1]
    }

    fn find(table: &RwLock<Option<Self>>, value: &T) -> Option<NonZeroU32> {
        let guard = table.read().unwrap_or_else(PoisonError::into_inner);
        guard.as_ref()?.by_value.get(value).copied()
    }

    fn insert(table: &RwLock<Option<Self>>, value: &T, leak: impl FnOnce(&T) -> &'static T) -> NonZeroU32 {
        if let Some(id) = Self::find(table, value) {
            return id;
        }
        let mut guard = table.write().unwrap_or_else(PoisonError::into_inner);
        let ids = guard.get_or_insert_with(|| Ids {
            by_id: Vec::new(),
            by_value: HashMap::new(),
        });
        if let Some(id) = ids.by_value.get(value) {
            return *id;
        }
        let leaked = leak(value);
        ids.by_id.push(leaked);
        let id = u32::try_from(ids.by_id.len())
            .ok()
            .and_then(NonZeroU32::new)
            .expect("fewer than 4 billion distinct names");
        ids.by_value.insert(leaked, id);
        id
    }
}

static NAMES: RwLock<Option<Ids<str>>> = RwLock::new(None);
static NAME_SETS: RwLock<Option<Ids<[Name]>>> = RwLock::new(None);
static PLACEMENTS: RwLock<Option<Ids<PlacementParts>>> = RwLock::new(None);

/// An interned name (an endpoint's node name or zone, a port name): 4 bytes, `Copy`, equal
/// exactly when the text is. Orders by id, not by text.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(NonZeroU32);

impl Name {
    /// The id of `text`, interning it if it is new.
    pub fn new(text: &str) -> Name {
        Name(Ids::insert(&NAMES, text, |t| Box::leak(Box::from(t))))
    }

    /// The id of `text` if it has been interned: a name never interned is held by nothing.
    pub fn find(text: &str) -> Option<Name> {
        Ids::find(&NAMES, text).map(Name)
    }

    pub fn as_str(self) -> &'static str {
        Ids::get(&NAMES, self.0)
    }

    pub fn is_empty(self) -> bool {
        self.as_str().is_empty()
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl From<&str> for Name {
    fn from(text: &str) -> Name {
        Name::new(text)
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A small sorted set of names (an endpoint's topology hints), interned as a whole: 4 bytes,
/// and the empty set is no id at all.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Names(Option<NonZeroU32>);

impl Names {
    /// The names, sorted by id.
    pub fn as_slice(self) -> &'static [Name] {
        match self.0 {
            Some(id) => Ids::get(&NAME_SETS, id),
            None => &[],
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        Name::find(name).is_some_and(|n| self.contains_name(n))
    }

    pub fn contains_name(&self, name: Name) -> bool {
        self.as_slice().binary_search(&name).is_ok()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn iter(&self) -> impl Iterator<Item = &'static str> {
        self.as_slice().iter().map(|n| n.as_str())
    }
}

impl fmt::Debug for Names {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl<S: AsRef<str>> FromIterator<S> for Names {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut names: Vec<Name> = iter.into_iter().map(|n| Name::new(n.as_ref())).collect();
        if names.is_empty() {
            return Names(None);
        }
        names.sort();
        names.dedup();
        Names(Some(Ids::insert(&NAME_SETS, &names[..], |set| {
            Box::leak(Box::from(set))
        })))
    }
}

#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
struct PlacementParts {
    node_name: Option<Name>,
    zone: Option<Name>,
    zone_hints: Names,
    node_hints: Names,
}

/// Where an endpoint runs and whom it should serve: its `nodeName`, `zone` and
/// `hints.forZones`/`hints.forNodes`, interned as one 4-byte id (endpoints on one node mostly
/// share it). The default is no node, no zone and no hints.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Placement(Option<NonZeroU32>);

impl Placement {
    pub fn new(node_name: Option<Name>, zone: Option<Name>, zone_hints: Names, node_hints: Names) -> Placement {
        let parts = PlacementParts {
            node_name,
            zone,
            zone_hints,
            node_hints,
        };
        if parts == PlacementParts::default() {
            return Placement(None);
        }
        Placement(Some(Ids::insert(&PLACEMENTS, &parts, |p| Box::leak(Box::new(*p)))))
    }

    fn parts(self) -> PlacementParts {
        match self.0 {
            Some(id) => *Ids::get(&PLACEMENTS, id),
            None => PlacementParts::default(),
        }
    }

    pub fn node_name(self) -> Option<Name> {
        self.parts().node_name
    }

    pub fn zone(self) -> Option<Name> {
        self.parts().zone
    }

    pub fn zone_hints(self) -> Names {
        self.parts().zone_hints
    }

    pub fn node_hints(self) -> Names {
        self.parts().node_hints
    }
}

impl fmt::Debug for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.parts();
        f.debug_struct("Placement")
            .field("node_name", &p.node_name)
            .field("zone", &p.zone)
            .field("zone_hints", &p.zone_hints)
            .field("node_hints", &p.node_hints)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_per_name() {
        let a = intern("kube-system");
        let b = intern(&String::from("kube-system"));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a, "kube-system");
    }

    #[test]
    fn unused_names_are_forgotten() {
        let kept = intern("kept-name");
        for i in 0..5000 {
            drop(intern(&format!("churn-{i}")));
        }
        let size = TABLE.lock().unwrap().as_ref().unwrap().names.len();
        assert!(size < 3000, "{size} names kept");
        assert!(Arc::ptr_eq(&kept, &intern("kept-name")));
    }

    #[test]
    fn names_are_ids_of_their_text() {
        let a = Name::new("node-a.example");
        assert_eq!(a, Name::from(&*String::from("node-a.example")));
        assert_ne!(a, Name::new("node-b.example"));
        assert_eq!(a.as_str(), "node-a.example");
        assert_eq!(format!("{a:?} {a}"), "\"node-a.example\" node-a.example");
        assert_eq!(Name::find("node-a.example"), Some(a));
        assert_eq!(Name::find("never-interned-anywhere"), None);
        assert_eq!(std::mem::size_of::<Option<Name>>(), 4);
    }

    #[test]
    fn names_are_a_sorted_set() {
        let n: Names = ["b", "a", "b"].into_iter().collect();
        let mut texts: Vec<_> = n.iter().collect();
        texts.sort();
        assert_eq!(texts, ["a", "b"]);
        assert!(n.contains("a") && n.contains("b") && !n.contains("c"));
        assert!(!n.contains("never-interned-anywhere"));
        // The same set, however written, is the same id.
        assert_eq!(n, ["a", "b"].into_iter().collect::<Names>());
        assert_ne!(n, ["a"].into_iter().collect::<Names>());
        assert!(Names::default().is_empty());
        assert_eq!(Names::default(), Vec::<String>::new().into_iter().collect::<Names>());
        assert_eq!(format!("{:?}", ["z"].into_iter().collect::<Names>()), "{\"z\"}");
        assert_eq!(std::mem::size_of::<Names>(), 4);
    }

    #[test]
    fn placements_are_ids_of_their_parts() {
        let node = Some(Name::new("node-p"));
        let zones: Names = ["zone-p"].into_iter().collect();
        let a = Placement::new(node, Some(Name::new("zone-p")), zones, Names::default());
        assert_eq!(
            a,
            Placement::new(node, Some(Name::new("zone-p")), zones, Names::default())
        );
        assert_ne!(a, Placement::new(node, None, zones, Names::default()));
        assert_eq!((a.node_name(), a.zone().map(Name::as_str)), (node, Some("zone-p")));
        assert_eq!((a.zone_hints(), a.node_hints()), (zones, Names::default()));
        let none = Placement::new(None, None, Names::default(), Names::default());
        assert_eq!(none, Placement::default());
        assert_eq!(
            (none.node_name(), none.zone(), none.zone_hints().is_empty()),
            (None, None, true)
        );
        assert_eq!(std::mem::size_of::<Placement>(), 4);
    }

    #[test]
    fn names_are_shared_across_threads() {
        let ids: Vec<Name> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4).map(|_| s.spawn(|| Name::new("zone-threaded"))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ids.windows(2).all(|w| w[0] == w[1]));
    }
}
