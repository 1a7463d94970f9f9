//! Shared strings: the names that repeat across thousands of objects (namespaces, node names,
//! zones, port names) are kept once and handed out as reference-counted [`Arc<str>`]s.
//!
//! One process-wide table, so both sources and every conversion share the same copies. It
//! forgets a name once nothing else holds it (checked when the table has doubled since the last
//! sweep), so a cluster's churn of namespaces never makes it grow without bound.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

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

/// A small sorted set of shared names (an endpoint's topology hints). Empty costs no allocation.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Names(Option<Arc<[Arc<str>]>>);

impl Names {
    pub fn contains(&self, name: &str) -> bool {
        self.iter().any(|n| n == name)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.as_deref().unwrap_or_default().iter().map(|n| &**n)
    }
}

impl<S: AsRef<str>> FromIterator<S> for Names {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut names: Vec<Arc<str>> = iter.into_iter().map(|n| intern(n.as_ref())).collect();
        if names.is_empty() {
            return Names(None);
        }
        names.sort();
        names.dedup();
        Names(Some(names.into()))
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
    fn names_are_a_sorted_set() {
        let n: Names = ["b", "a", "b"].into_iter().collect();
        assert_eq!(n.iter().collect::<Vec<_>>(), ["a", "b"]);
        assert!(n.contains("a") && !n.contains("c"));
        assert!(Names::default().is_empty());
        assert_eq!(std::mem::size_of::<Names>(), 16);
    }
}
