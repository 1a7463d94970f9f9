//! What to send to the kernel, from what changed and what the table holds. Pure.
//!
//! The [`Planner`] keeps the table as kproxy committed it ([`TableState`]: per chain the handle
//! and a hash of every rule, per set a hash of its declaration, per map element a hash of its
//! verdict; no rule text) and, per Service, what it owns. A sync renders only the Services that
//! changed and diffs each against the committed table into a [`Unit`]: rules are replaced in
//! place by handle, appended, or deleted by handle; chains, sets and elements are added and
//! deleted one by one. A unit is one owner's whole change, applied in one transaction, so no
//! Service is ever half-programmed.
//!
//! A full sync does the same for every Service whose state object changed (the store hands out
//! the same `Arc` for an unchanged Service, so this costs a pointer comparison each); after the
//! table was read back from the kernel ([`Planner::adopt`]), every Service is rendered and
//! compared with what the kernel really holds, and whatever nobody owns is deleted.
//! [`Planner::reconcile`] compares a listing of the kernel with the committed table and plans
//! only the repairs; the check does the same in steps ([`Comparison`], a moment under the
//! planner's lock each), then [`Planner::repair`] looks again at what differed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::Hasher;
use std::net::IpAddr;
use std::sync::Arc;

use super::apply::Handoff;
use super::command::{fixed_set_kind, Command, ElemKey};
use super::hairpin;
use super::names;
use super::names::Bucket;
use super::netlink::{BaseHook, Data, Expr};
use super::render::{base_chains, fixed_sets, render_fixed_rules, render_port, AffinitySet, PortRules};
use super::rule::{Key, Rule, SetDecl, SetKind, Value};
use crate::dataplane::iptables::render::RenderConfig;
use crate::model::{ChangeSet, DesiredState, IpFamily, NodeInfo, ServiceKey, ServiceState};

pub type Hash = u64;

pub fn hash_of<T: std::hash::Hash + ?Sized>(v: &T) -> Hash {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// A map element's data as compared: the verdict or value (none in a plain set).
pub fn data_hash(v: Option<&Data>) -> Hash {
    hash_of(&v)
}

fn value_hash(v: &Option<Value>) -> Hash {
    data_hash(v.as_ref().map(Value::data).as_ref())
}

/// An element key as the kernel stores it, inline: every key kproxy writes to a set whose
/// elements it keeps fits (the longest, an IPv6 endpoint slot, is 24 bytes), so the committed
/// table holds no allocation per element. A longer key (an IPv6 hairpin pair, read back) is
/// kept on the heap.
#[derive(Clone)]
pub enum KeyBytes {
    Inline { len: u8, bytes: [u8; KeyBytes::INLINE] },
    Heap(Box<[u8]>),
}

impl KeyBytes {
    /// As long as fits beside the length and the variant in the size of the heap form.
    pub const INLINE: usize = 30;

    pub fn new(b: &[u8]) -> KeyBytes {
        if b.len() <= Self::INLINE {
            let mut bytes = [0; Self::INLINE];
            bytes[..b.len()].copy_from_slice(b);
            KeyBytes::Inline {
                len: b.len() as u8,
                bytes,
            }
        } else {
            KeyBytes::Heap(b.into())
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            KeyBytes::Inline { len, bytes } => &bytes[..usize::from(*len)],
            KeyBytes::Heap(b) => b,
        }
    }
}

impl AsRef<[u8]> for KeyBytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::Deref for KeyBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// Looked up by the slice, so it hashes and compares as one.
impl std::borrow::Borrow<[u8]> for KeyBytes {
    fn borrow(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::hash::Hash for KeyBytes {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state);
    }
}

impl PartialEq for KeyBytes {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for KeyBytes {}

impl PartialOrd for KeyBytes {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for KeyBytes {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_slice().cmp(other.as_slice())
    }
}

impl std::fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x?}", self.as_slice())
    }
}

impl From<Vec<u8>> for KeyBytes {
    fn from(b: Vec<u8>) -> KeyBytes {
        KeyBytes::new(&b)
    }
}

/// One rule as committed: the handle the kernel gave it and a hash of its expressions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleState {
    pub handle: u64,
    pub hash: Hash,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainState {
    pub hook: Option<BaseHook>,
    pub rules: Vec<RuleState>,
}

/// One family's `kproxy` table, compactly: as kproxy committed it, or as the kernel lists it.
/// Elements of the dynamic (affinity) sets are the packet path's and are not kept.
#[derive(Debug, Clone, Default)]
pub struct TableState {
    pub exists: bool,
    pub chains: HashMap<String, ChainState>,
    /// Set name to a hash of its declaration ([`super::netlink::SetSpec`]).
    pub sets: HashMap<String, Hash>,
    /// Fixed set name to element key to a hash of its data.
    pub elements: HashMap<String, HashMap<KeyBytes, Hash>>,
    /// In a listing: sets whose elements could not be read while nothing was committed (see
    /// `read_table`); their elements are not in `elements` and are not compared.
    pub unlisted: HashSet<String>,
}

/// Equal when they hold the same objects: a set without elements is a set without elements,
/// whether or not an empty entry for it is kept.
impl PartialEq for TableState {
    fn eq(&self, other: &Self) -> bool {
        type Sorted = Vec<(String, Vec<(KeyBytes, Hash)>)>;
        let non_empty = |t: &TableState| -> Sorted {
            let mut v: Vec<_> = t
                .elements
                .iter()
                .filter(|(_, e)| !e.is_empty())
                .map(|(s, e)| {
                    let mut e: Vec<_> = e.iter().map(|(k, h)| (k.clone(), *h)).collect();
                    e.sort();
                    (s.clone(), e)
                })
                .collect();
            v.sort();
            v
        };
        self.exists == other.exists
            && self.chains == other.chains
            && self.sets == other.sets
            && non_empty(self) == non_empty(other)
    }
}

impl Eq for TableState {}

impl TableState {
    pub fn rule_count(&self) -> usize {
        self.chains.values().map(|c| c.rules.len()).sum()
    }
}

/// Who a unit's changes belong to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// The table, its base and fixed chains, the fixed maps.
    Fixed,
    Service(ServiceKey),
    /// The dispatch elements of a cold start, added after every Service's chains.
    Dispatch,
    /// Objects nobody owns (left by an earlier run or added by hand): deleted.
    Stray,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Fixed => f.write_str("kproxy's fixed chains and maps"),
            Owner::Service(k) => write!(f, "Service {k}"),
            Owner::Dispatch => f.write_str("the Services' dispatch elements"),
            Owner::Stray => f.write_str("objects nobody owns"),
        }
    }
}

/// Where a command goes in a transaction. The kernel applies a batch in order and checks
/// references as it goes: a chain exists before rules jump to it, a rule or element stops
/// referring to a chain or set before it is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Section {
    Table,
    Flush,
    /// Deleting what is about to be created again with another declaration.
    Recreate,
    NewSet,
    NewChain,
    Rules,
    DeleteElements,
    AddElements,
    DeleteRules,
    DeleteChains,
    DeleteSets,
}

/// One owner's change: its commands, and which committed rules take their handle from the
/// echo of which command.
#[derive(Debug, Clone)]
pub struct Unit {
    pub owner: Owner,
    pub commands: Vec<(Section, Command)>,
    /// (chain, rule index, command index)
    fills: Vec<(String, usize, usize)>,
}

impl Unit {
    fn new(owner: Owner) -> Unit {
        Unit {
            owner,
            commands: Vec::new(),
            fills: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }
}

/// One sync's units, in the order they must be applied.
#[derive(Debug, Default)]
pub struct Plan {
    pub units: Vec<Unit>,
}

impl Plan {
    /// Every command, in section order as one transaction would carry them.
    pub fn commands(&self) -> Vec<&Command> {
        let mut all: Vec<(Section, usize, &Command)> = Vec::new();
        for u in &self.units {
            for (s, c) in &u.commands {
                all.push((*s, all.len(), c));
            }
        }
        all.sort_by_key(|(s, i, _)| (*s, *i));
        all.into_iter().map(|(_, _, c)| c).collect()
    }
}

/// What one Service owns in the table. Kept small (about 10,000 of them at scale): slices of
/// their own size, and no endpoint slot, which its bucket element implies ([`slots_of`]).
#[derive(Debug, Clone)]
struct Owned {
    /// The state it was rendered from, to skip it when the next full sync hands out the same.
    state: Arc<ServiceState>,
    chains: Box<[String]>,
    sets: Box<[AffinitySet]>,
    /// Map elements it claimed, endpoint slots left out: [`Owned::elements`] has them all.
    claimed: Box<[(SetId, Key)]>,
    /// Endpoint addresses it DNATs to (each counted once in [`Planner::hairpin`]).
    hairpin: hairpin::Addresses,
    rules: usize,
    no_local: (usize, usize),
}

impl Owned {
    /// Every map element it wrote: its claims, and the endpoint slots of its bucket claims.
    fn elements(&self) -> impl Iterator<Item = (&'static str, Key)> + '_ {
        self.claimed.iter().flat_map(|(map, key)| {
            let map = map.name();
            std::iter::once((map, key.clone())).chain(slots_of(map, key))
        })
    }
}

/// A fixed map or set by its place in [`names::MAPS`]: what the claim maps are keyed by, in
/// one byte where the name takes 16 (about 30,000 claims at scale, each in three places).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SetId(u8);

impl SetId {
    fn of(name: &str) -> Option<SetId> {
        let i = names::MAPS.iter().position(|m| *m == name)?;
        u8::try_from(i).ok().map(SetId)
    }

    /// The claim class ([`names::claim_class`]) of fixed map `map`.
    fn class_of(map: &'static str) -> Option<SetId> {
        SetId::of(names::claim_class(map))
    }

    fn name(self) -> &'static str {
        names::MAPS[usize::from(self.0)]
    }
}

/// The endpoint slots an element of a bucket set implies: a Service address (or NodePort) in
/// `cluster-nN` has slots `0..N` in its protocol's endpoint map (`local-nN`: from
/// [`names::LOCAL_SLOTS`]), as [`super::render`] writes them. None for any other element.
fn slots_of(map: &str, key: &Key) -> impl Iterator<Item = (&'static str, Key)> {
    let (first, n) = match names::Bucket::of_set(map) {
        Some((bucket, n)) => (bucket.first_slot(), n as u32),
        None => (0, 0),
    };
    let key = key.clone();
    (first..first + n).filter_map(move |slot| match key {
        Key::AddrPort(ip, proto, port) => Some((
            names::service_endpoints(proto),
            Key::AddrPortSlot(ip, proto, port, slot),
        )),
        Key::ProtoPort(proto, port) => Some((names::nodeport_endpoints(proto), Key::ProtoPortSlot(proto, port, slot))),
        _ => None,
    })
}

/// Objects found in the table that nobody owns.
#[derive(Debug, Default)]
struct Strays {
    chains: Vec<String>,
    sets: Vec<String>,
    elements: Vec<(String, KeyBytes)>,
}

fn owner_of_chain(chain_owner: &HashMap<String, ServiceKey>, name: &str) -> Option<Owner> {
    if names::fixed_chains().any(|c| c == name) {
        return Some(Owner::Fixed);
    }
    chain_owner.get(name).map(|k| Owner::Service(k.clone()))
}

fn owner_of_set(set_owner: &HashMap<String, ServiceKey>, name: &str) -> Option<Owner> {
    if names::MAPS.contains(&name) {
        return Some(Owner::Fixed);
    }
    set_owner.get(name).map(|k| Owner::Service(k.clone()))
}

/// What `reconcile` shares between its kinds of named objects (chains, sets).
struct Named<'a, S, N> {
    skipped: &'a S,
    strays: bool,
    dirty: &'a mut BTreeSet<Owner>,
    note: &'a mut N,
}

impl<S: Fn(&Option<Owner>) -> bool, N: FnMut(String)> Named<'_, S, N> {
    /// Takes the kernel's word for every object of one kind named in `names` (what a
    /// [`Comparison`] found) that still differs from `committed`:
    /// its owner is marked dirty, or, nobody's and listed by the kernel, it is a stray (only
    /// with `strays`). Returns how many differed.
    fn reconcile<V: Clone + PartialEq>(
        &mut self,
        kind: &str,
        names: BTreeSet<String>,
        kernel: &HashMap<String, V>,
        committed: &mut HashMap<String, V>,
        owner_of: impl Fn(&str) -> Option<Owner>,
        found: &mut Vec<String>,
    ) -> usize {
        let mut differences = 0;
        for name in names {
            let k = kernel.get(&name);
            if k == committed.get(&name) {
                continue;
            }
            let owner = owner_of(&name);
            if (self.skipped)(&owner) {
                continue;
            }
            match (owner, k) {
                (Some(o), _) => {
                    self.dirty.insert(o);
                }
                (None, Some(_)) if self.strays => found.push(name.clone()),
                (None, _) => continue,
            }
            differences += 1;
            (self.note)(format!("{kind} {name}"));
            match k {
                Some(k) => committed.insert(name, k.clone()),
                None => committed.remove(&name),
            };
        }
        differences
    }
}

/// Commands per stray unit: strays can be a whole earlier ruleset.
const STRAYS_PER_UNIT: usize = 512;

/// Elements per `add element` of the dispatch unit (a message's element list must stay under
/// 64 KiB).
const DISPATCH_PER_COMMAND: usize = 512;

/// The verdict maps whose elements make a Service with chains of its own reachable. On a
/// cold start their elements are added last, in one transaction: the kernel validates the
/// table on every commit that adds a jump, from the base chains down, so transactions before
/// it find nothing but the fixed chains reachable and the walk happens once, not once per
/// transaction. (The other Services are dispatched by plain sets, in their own unit.)
const DISPATCH: [&str; 3] = [names::SERVICE_IPS, names::SERVICE_NODEPORTS, names::FIREWALL_IPS];

/// Where [`Planner::plan_streamed`] hands its batches of units.
pub type Sink<'a, E> = dyn FnMut(&mut Planner, Vec<Unit>, Handoff) -> Result<(), E> + 'a;

/// What a [`Comparison`] found different between a listing and the committed table, by name
/// (nothing else is kept: at scale a table holds 230,000 elements). [`Planner::repair`] looks
/// at each again.
#[derive(Debug)]
pub struct Candidates {
    chains: BTreeSet<String>,
    sets: BTreeSet<String>,
    elements: BTreeMap<String, BTreeSet<KeyBytes>>,
    /// Every listed hairpin element is an address some Service DNATs to (with the counts as
    /// they were when compared: [`Planner::repair`] trusts it only when nothing was committed
    /// since the listing started).
    hairpin_listed_ok: bool,
}

/// A comparison of a listing (`kernel`) with the committed table, made in steps of bounded
/// work, each against the planner as it is at that step: the check takes the planner's lock
/// for one step at a time, so a sync never waits for the whole comparison. Both ways: every
/// listed object against the committed one, then every committed object of kproxy's (fixed
/// chains and maps, each Service's chains, sets and elements, endpoint slots included) for
/// its presence in the listing. Objects a sync changes between steps may be compared on
/// either side of that change: they are candidates at worst, and their owners are in the
/// check's `skip` set when [`Planner::repair`] looks again.
pub struct Comparison<'a> {
    kernel: &'a TableState,
    phase: Phase<'a>,
    found: Candidates,
}

enum Phase<'a> {
    Chains(std::collections::hash_map::Iter<'a, String, ChainState>),
    Sets(std::collections::hash_map::Iter<'a, String, Hash>),
    Elements {
        sets: std::collections::hash_map::Iter<'a, String, HashMap<KeyBytes, Hash>>,
        set: Option<(&'a str, std::collections::hash_map::Iter<'a, KeyBytes, Hash>)>,
    },
    /// The fixed chains and maps committed, for their presence in the listing.
    Fixed,
    /// The Services that owned something when this phase started, and how many were compared.
    Owners(Vec<ServiceKey>, usize),
    Done,
}

impl<'a> Comparison<'a> {
    pub fn new(kernel: &'a TableState) -> Comparison<'a> {
        Comparison {
            kernel,
            phase: Phase::Chains(kernel.chains.iter()),
            found: Candidates {
                chains: BTreeSet::new(),
                sets: BTreeSet::new(),
                elements: BTreeMap::new(),
                hairpin_listed_ok: true,
            },
        }
    }

    /// Compares about `budget` objects against `planner`; whether the comparison is done.
    pub fn step(&mut self, planner: &Planner, budget: usize) -> bool {
        let kernel = self.kernel;
        let found = &mut self.found;
        let mut left = budget.max(1);
        while left > 0 {
            match &mut self.phase {
                Phase::Chains(it) => match it.next() {
                    Some((name, chain)) => {
                        if planner.state.chains.get(name) != Some(chain) {
                            found.chains.insert(name.clone());
                        }
                        left -= 1;
                    }
                    None => self.phase = Phase::Sets(kernel.sets.iter()),
                },
                Phase::Sets(it) => match it.next() {
                    Some((name, hash)) => {
                        if planner.state.sets.get(name) != Some(hash) {
                            found.sets.insert(name.clone());
                        }
                        left -= 1;
                    }
                    None => {
                        self.phase = Phase::Elements {
                            sets: kernel.elements.iter(),
                            set: None,
                        }
                    }
                },
                Phase::Elements { sets, set } => {
                    let Some((name, elements)) = set else {
                        match sets.next() {
                            Some((name, e)) => *set = Some((name.as_str(), e.iter())),
                            None => self.phase = Phase::Fixed,
                        }
                        continue;
                    };
                    let Some((key, data)) = elements.next() else {
                        *set = None;
                        continue;
                    };
                    left -= 1;
                    if *name == names::HAIRPIN {
                        let ok = *data == data_hash(None)
                            && matches!(ElemKey::parse(SetKind::AddrPair, planner.family, key),
                                ElemKey::Key(Key::Pair(ip)) if planner.hairpin.contains(&ip));
                        found.hairpin_listed_ok &= ok;
                        continue;
                    }
                    let committed = planner.state.elements.get(*name).and_then(|e| e.get(key));
                    if committed != Some(data) {
                        found.elements.entry(name.to_string()).or_default().insert(key.clone());
                    }
                }
                Phase::Fixed => {
                    for name in names::fixed_chains() {
                        if planner.state.chains.contains_key(name) && !kernel.chains.contains_key(name) {
                            found.chains.insert(name.into());
                        }
                    }
                    for name in names::MAPS.iter() {
                        if planner.state.sets.contains_key(*name) && !kernel.sets.contains_key(*name) {
                            found.sets.insert((*name).into());
                        }
                    }
                    left = left.saturating_sub(names::MAPS.len());
                    // The Services' keys (reference counts): a Service added after this is
                    // a sync's, and its owner is skipped.
                    self.phase = Phase::Owners(planner.owned.keys().cloned().collect(), 0);
                }
                Phase::Owners(keys, next) => {
                    let Some(key) = keys.get(*next) else {
                        self.phase = Phase::Done;
                        continue;
                    };
                    *next += 1;
                    left = left.saturating_sub(1);
                    let Some(o) = planner.owned.get(key) else { continue };
                    for c in o.chains.iter().filter(|c| !kernel.chains.contains_key(*c)) {
                        found.chains.insert(c.clone());
                    }
                    for s in o.sets.iter().filter(|s| !kernel.sets.contains_key(&s.name)) {
                        found.sets.insert(s.name.clone());
                    }
                    for (map, k) in o.elements() {
                        left = left.saturating_sub(1);
                        if kernel.unlisted.contains(map) {
                            continue;
                        }
                        let bytes = k.bytes();
                        if !kernel
                            .elements
                            .get(map)
                            .is_some_and(|e| e.contains_key(bytes.as_slice()))
                        {
                            found.elements.entry(map.to_string()).or_default().insert(bytes.into());
                        }
                    }
                }
                Phase::Done => return true,
            }
        }
        matches!(self.phase, Phase::Done)
    }

    /// What was found different.
    pub fn finish(self) -> Candidates {
        self.found
    }
}

impl Planner {
    /// The committed keys of every fixed set with more than `above` elements (the hairpin
    /// set's derived from the counts), and the keys of those sets that someone else touched
    /// (`also`), for a check that looks them up instead of dumping the sets: a dump of a set
    /// walks it again for every message.
    pub fn lookup_keys(&self, above: usize, also: &Spots) -> HashMap<String, Vec<KeyBytes>> {
        let mut out: HashMap<String, Vec<KeyBytes>> = self
            .state
            .elements
            .iter()
            .filter(|(set, e)| set.as_str() != names::HAIRPIN && e.len() > above)
            .map(|(set, e)| (set.clone(), e.keys().cloned().collect()))
            .collect();
        if self.state.sets.contains_key(names::HAIRPIN) && self.hairpin.len() > above {
            let keys = self
                .hairpin
                .addresses()
                .map(|ip| KeyBytes::from(Key::Pair(ip).bytes()))
                .collect();
            out.insert(names::HAIRPIN.into(), keys);
        }
        for (set, touched) in &also.elements {
            if let Some(keys) = out.get_mut(set) {
                keys.extend(touched.iter().map(|key| KeyBytes::new(key)));
            }
        }
        out
    }
}

/// The objects of kproxy's table that someone else's commits touched, by name (from nf_tables'
/// notifications): what a spot check lists and compares instead of the whole table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spots {
    /// Chains created, deleted, or whose rules were added or deleted.
    pub chains: BTreeSet<String>,
    /// Fixed sets' elements added or deleted, by key.
    pub elements: BTreeMap<String, BTreeSet<Vec<u8>>>,
}

impl Spots {
    pub fn len(&self) -> usize {
        self.chains.len() + self.elements.values().map(BTreeSet::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Candidates {
    /// What differs between `kernel`, a listing of the `spots` only (every other fixed set
    /// marked unlisted), and the committed table, for those objects: both ways, so that a
    /// committed chain or element the listing lacks is a candidate too.
    pub fn of_spots(kernel: &TableState, spots: &Spots, planner: &Planner) -> Candidates {
        let mut found = Candidates {
            chains: BTreeSet::new(),
            sets: BTreeSet::new(),
            elements: BTreeMap::new(),
            hairpin_listed_ok: true,
        };
        for name in &spots.chains {
            if kernel.chains.get(name) != planner.state.chains.get(name) {
                found.chains.insert(name.clone());
            }
        }
        for (set, keys) in &spots.elements {
            let listed = kernel.elements.get(set);
            let committed = planner.state.elements.get(set);
            for key in keys {
                let key = KeyBytes::new(key);
                if listed.and_then(|e| e.get(&key)) != committed.and_then(|e| e.get(&key)) {
                    found.elements.entry(set.clone()).or_default().insert(key);
                }
            }
        }
        found
    }
}

type Adds = BTreeMap<String, Vec<(ElemKey, Option<Value>)>>;

#[derive(Debug)]
pub struct Planner {
    family: IpFamily,
    /// The table as committed (updated as units are planned: a failed transaction makes the
    /// caller read the table back and [`Planner::adopt`] it).
    pub state: TableState,
    owned: HashMap<ServiceKey, Owned>,
    chain_owner: HashMap<String, ServiceKey>,
    set_owner: HashMap<String, ServiceKey>,
    /// Which Service wrote each map element, by claim class ([`names::claim_class`]) and key,
    /// with the set it is in. Two Services can claim the same address and port (an externalIP
    /// both list); only one can dispatch it, so the first claim wins, as the first matching
    /// rule does in iptables mode.
    element_owner: HashMap<(SetId, Key), (ServiceKey, SetId)>,
    /// Services that lost a claim, by element: they try again when the winner lets go.
    losers: HashMap<(SetId, Key), BTreeSet<ServiceKey>>,
    /// How many Services DNAT to each endpoint address: the hairpin element goes with the last.
    /// The hairpin set's elements are these addresses, and are kept nowhere else (in
    /// [`TableState`] only after [`Planner::adopt`], until the next plan compared them).
    hairpin: hairpin::Counts,
    cfg: Option<RenderConfig>,
    node: Option<NodeInfo>,
    /// After [`Planner::adopt`]: the next plan renders everything and deletes strays.
    fresh: bool,
    rules: usize,
    /// Rules of the fixed chains, as last planned.
    fixed_rules: usize,
    no_local: (usize, usize),
    /// During a cold start into an empty table: dispatch elements held back for the last unit.
    deferred: Option<Adds>,
    /// What the last [`Planner::reconcile`] found different (the first few), for its log line.
    pub differed: Vec<String>,
}

/// Builds one unit against the committed table.
struct Builder<'a> {
    family: IpFamily,
    state: &'a mut TableState,
    unit: Unit,
    adds: Adds,
    dels: BTreeMap<String, Vec<ElemKey>>,
    deferred: Option<&'a mut Adds>,
}

impl Builder<'_> {
    fn push(&mut self, section: Section, command: Command) -> usize {
        self.unit.commands.push((section, command));
        self.unit.commands.len() - 1
    }

    /// Makes chain `name` hold exactly `rules`.
    fn chain(&mut self, name: &str, hook: Option<&BaseHook>, rules: &[Rule], flush: bool) {
        let family = self.family;
        let lowered: Vec<Vec<Expr>> = rules.iter().map(|r| r.lower(family)).collect();
        let hashes: Vec<Hash> = lowered.iter().map(hash_of).collect();
        let old = self.state.chains.get(name).cloned();
        let mut next = ChainState {
            hook: hook.cloned(),
            rules: Vec::with_capacity(rules.len()),
        };
        let rebuild = match &old {
            None => {
                self.push(
                    Section::NewChain,
                    Command::AddChain {
                        name: name.into(),
                        hook: hook.cloned(),
                    },
                );
                true
            }
            Some(c) if c.hook.as_ref() != hook => {
                // Someone changed the chain's hook: only recreating it changes that.
                self.push(Section::Recreate, Command::DeleteChain(name.into()));
                self.push(
                    Section::NewChain,
                    Command::AddChain {
                        name: name.into(),
                        hook: hook.cloned(),
                    },
                );
                true
            }
            Some(c) if flush && !c.rules.is_empty() => {
                self.push(Section::Flush, Command::FlushChain(name.into()));
                true
            }
            Some(_) => false,
        };
        let old_rules = if rebuild {
            Vec::new()
        } else {
            old.map(|c| c.rules).unwrap_or_default()
        };
        for (i, ((rule, exprs), hash)) in rules.iter().zip(lowered).zip(hashes).enumerate() {
            match old_rules.get(i) {
                Some(o) if o.hash == hash => next.rules.push(*o),
                Some(o) => {
                    self.push(
                        Section::Rules,
                        Command::ReplaceRule {
                            chain: name.into(),
                            handle: o.handle,
                            rule: rule.clone(),
                            exprs,
                        },
                    );
                    next.rules.push(RuleState { handle: o.handle, hash });
                }
                None => {
                    let at = self.push(
                        Section::Rules,
                        Command::AddRule {
                            chain: name.into(),
                            rule: rule.clone(),
                            exprs,
                        },
                    );
                    self.unit.fills.push((name.into(), i, at));
                    next.rules.push(RuleState { handle: 0, hash });
                }
            }
        }
        for o in old_rules.iter().skip(rules.len()) {
            self.push(
                Section::DeleteRules,
                Command::DeleteRule {
                    chain: name.into(),
                    handle: o.handle,
                },
            );
        }
        self.state.chains.insert(name.into(), next);
    }

    fn delete_chain(&mut self, name: &str, flush_first: bool) {
        if self.state.chains.remove(name).is_some() {
            if flush_first {
                self.push(Section::Flush, Command::FlushChain(name.into()));
            }
            self.push(Section::DeleteChains, Command::DeleteChain(name.into()));
        }
    }

    /// Declares `decl`; whether an existing set had to be recreated (its users must be refilled).
    fn set(&mut self, decl: &SetDecl) -> bool {
        let hash = hash_of(&decl.spec(self.family));
        let recreated = match self.state.sets.get(&decl.name) {
            Some(h) if *h == hash => return false,
            Some(_) => {
                self.push(Section::Recreate, Command::DeleteSet(decl.name.clone()));
                true
            }
            None => false,
        };
        self.push(Section::NewSet, Command::AddSet(decl.clone()));
        self.state.sets.insert(decl.name.clone(), hash);
        if recreated {
            if let Some(e) = self.state.elements.get_mut(&decl.name) {
                e.clear();
            }
        }
        recreated
    }

    fn delete_set(&mut self, name: &str) {
        if self.state.sets.remove(name).is_some() {
            self.state.elements.remove(name);
            self.push(Section::DeleteSets, Command::DeleteSet(name.into()));
        }
    }

    fn add_element(&mut self, set: &str, key: ElemKey, value: Option<Value>) {
        if set == names::HAIRPIN && !self.state.elements.contains_key(set) {
            // Derived (see [`Planner::hairpin`]); only a listing adopted from the kernel holds
            // its elements, until the first plan after it has compared them.
            self.adds.entry(set.into()).or_default().push((key, value));
            return;
        }
        let hash = value_hash(&value);
        let bytes = key.bytes();
        let elements = self.state.elements.entry(set.into()).or_default();
        match elements.get(bytes.as_slice()) {
            Some(h) if *h == hash => return,
            Some(_) => self.dels.entry(set.into()).or_default().push(key.clone()),
            None => {}
        }
        elements.insert(KeyBytes::new(&bytes), hash);
        self.adds.entry(set.into()).or_default().push((key, value));
    }

    fn delete_element(&mut self, set: &str, key: ElemKey) {
        if set == names::HAIRPIN && !self.state.elements.contains_key(set) {
            self.dels.entry(set.into()).or_default().push(key);
            return;
        }
        let removed = self
            .state
            .elements
            .get_mut(set)
            .is_some_and(|e| e.remove(key.bytes().as_slice()).is_some());
        if removed {
            self.dels.entry(set.into()).or_default().push(key);
        }
    }

    fn finish(mut self) -> Unit {
        let dels = std::mem::take(&mut self.dels);
        for (set, elements) in std::mem::take(&mut self.adds) {
            match self.deferred.as_deref_mut() {
                Some(d) if DISPATCH.contains(&set.as_str()) && !dels.contains_key(&set) => {
                    d.entry(set).or_default().extend(elements);
                }
                _ => {
                    self.push(Section::AddElements, Command::AddElements { set, elements });
                }
            }
        }
        for (set, keys) in dels {
            self.push(Section::DeleteElements, Command::DeleteElements { set, keys });
        }
        self.unit
    }
}

/// Every port of one Service.
fn render_service(state: &ServiceState, node: &NodeInfo, cfg: &RenderConfig) -> Vec<PortRules> {
    state.ports.iter().filter_map(|p| render_port(p, node, cfg)).collect()
}

/// The bucket claim an endpoint slot's key goes with: slots below [`names::LOCAL_SLOTS`] with
/// the address's (or NodePort's) cluster bucket, the others with its local one. `None` for
/// every other key.
fn slot_claim(key: &Key) -> Option<(SetId, Key)> {
    let local = |slot: u32| slot >= names::LOCAL_SLOTS;
    match *key {
        Key::AddrPortSlot(ip, proto, port, slot) => {
            let b = if local(slot) { Bucket::Local } else { Bucket::Cluster };
            Some((SetId::of(b.set(1))?, Key::AddrPort(ip, proto, port)))
        }
        Key::ProtoPortSlot(proto, port, slot) => {
            let b = if local(slot) {
                Bucket::NodePortLocal
            } else {
                Bucket::NodePortCluster
            };
            Some((SetId::of(b.set(1))?, Key::ProtoPort(proto, port)))
        }
        _ => None,
    }
}

/// The static name of a fixed map (element owners are keyed by it).
fn static_set_name(name: &str) -> Option<&'static str> {
    names::MAPS.iter().copied().find(|m| *m == name)
}

impl Planner {
    pub fn new(family: IpFamily) -> Planner {
        Planner {
            family,
            state: TableState::default(),
            owned: HashMap::new(),
            chain_owner: HashMap::new(),
            set_owner: HashMap::new(),
            element_owner: HashMap::new(),
            losers: HashMap::new(),
            hairpin: hairpin::Counts::default(),
            cfg: None,
            node: None,
            fresh: true,
            rules: 0,
            fixed_rules: 0,
            no_local: (0, 0),
            deferred: None,
            differed: Vec::new(),
        }
    }

    /// Takes `kernel` (read back from the kernel) as the committed table and forgets what was
    /// owned: the next plan renders everything against it.
    pub fn adopt(&mut self, kernel: TableState) {
        *self = Planner::new(self.family);
        self.state = kernel;
    }

    fn builder(&mut self, owner: Owner) -> Builder<'_> {
        Builder {
            family: self.family,
            state: &mut self.state,
            unit: Unit::new(owner),
            adds: BTreeMap::new(),
            dels: BTreeMap::new(),
            deferred: self.deferred.as_mut(),
        }
    }

    /// Rules in the table (map elements not counted) and Service ports without local
    /// endpoints (internal, external), after the units planned so far.
    pub fn totals(&self) -> (usize, (usize, usize)) {
        (self.fixed_rules + self.rules, self.no_local)
    }

    /// Plans one sync of `desired`, whole.
    pub fn plan(&mut self, desired: &DesiredState, changes: &ChangeSet, cfg: &RenderConfig) -> Plan {
        let mut units = Vec::new();
        let mut collect = |_: &mut Planner, mut batch: Vec<Unit>, _: Handoff| -> Result<(), std::convert::Infallible> {
            units.append(&mut batch);
            Ok(())
        };
        let Ok(()) = self.plan_streamed(desired, changes, cfg, usize::MAX, &mut collect);
        Plan { units }
    }

    /// Plans one sync of `desired`, handing the units to `sink` in order, in batches of about
    /// `batch_writes` writes (a cold start of 10,000 Services is never held whole in memory).
    /// `sink` gets the planner back, to record what the kernel echoed; an error stops the
    /// planning, and the planner must then [`Planner::adopt`] a listing of the kernel.
    pub fn plan_streamed<E>(
        &mut self,
        desired: &DesiredState,
        changes: &ChangeSet,
        cfg: &RenderConfig,
        batch_writes: usize,
        sink: &mut Sink<'_, E>,
    ) -> Result<(), E> {
        let all = self.fresh || self.cfg.as_ref() != Some(cfg) || self.node.as_ref() != Some(&desired.node);
        let mut plan = Plan { units: Vec::new() };
        let mut pending_writes = 0;
        // A cold start: nothing of the Services' is in the table yet.
        let adopted_elements = !self.state.elements.values().all(HashMap::is_empty);
        if self.fresh && !adopted_elements {
            self.deferred = Some(Adds::new());
        }
        self.cfg = Some(cfg.clone());
        self.node = Some(desired.node.clone());
        if all {
            let (unit, recreated) = self.plan_fixed(cfg);
            plan.units.push(unit);
            if recreated {
                // A fixed map was recreated empty: every Service adds its elements again.
                // The hairpin set is derived from the counts: counted again from zero, every
                // address is added again.
                for o in self.owned.values_mut() {
                    o.claimed = Box::default();
                    o.hairpin = hairpin::Addresses::default();
                }
                self.element_owner.clear();
                self.hairpin.clear();
            }
        }
        // Deleted Services first, so that what they let go can be claimed in the same sync.
        let mut keys: Vec<ServiceKey> = Vec::new();
        if all || changes.full {
            keys.extend(
                self.owned
                    .keys()
                    .filter(|k| !desired.services.contains_key(*k))
                    .cloned(),
            );
            keys.sort();
            for (k, s) in &desired.services {
                let same = !all
                    && self
                        .owned
                        .get(k)
                        .is_some_and(|o| Arc::ptr_eq(&o.state, s) || o.state == *s);
                if !same {
                    keys.push(k.clone());
                }
            }
        } else {
            let (gone, here): (Vec<_>, Vec<_>) = changes
                .services
                .iter()
                .cloned()
                .partition(|k| !desired.services.contains_key(k));
            keys = gone;
            keys.extend(here);
        }
        let mut queue: std::collections::VecDeque<ServiceKey> = keys.into();
        let mut seen: HashSet<ServiceKey> = HashSet::new();
        let mut handed = false;
        while let Some(k) = queue.pop_front() {
            let retry = seen.contains(&k);
            if retry && handed {
                // Its rules' handles may still be on their way back from the kernel.
                let batch = std::mem::take(&mut plan.units);
                sink(self, batch, Handoff::Wait)?;
                pending_writes = 0;
                handed = false;
            }
            seen.insert(k.clone());
            let unit = self.plan_service(&k, desired.services.get(&k), &desired.node, cfg, &mut queue);
            if !unit.is_empty() || !retry {
                pending_writes += unit.commands.iter().map(|(_, c)| c.writes()).sum::<usize>();
                plan.units.push(unit);
            }
            if pending_writes >= batch_writes {
                let mut batch = std::mem::take(&mut plan.units);
                batch.retain(|u| !u.is_empty());
                sink(self, batch, Handoff::Async)?;
                pending_writes = 0;
                handed = true;
            }
        }
        if std::mem::take(&mut self.fresh) {
            let strays = self.find_strays(adopted_elements);
            plan.units.extend(self.plan_strays(strays));
            // Every Service compared its hairpin addresses with the listing, and the strays
            // among them are deleted: from now on the set is derived from the counts.
            self.state.elements.remove(names::HAIRPIN);
        }
        if let Some(deferred) = self.deferred.take() {
            let mut unit = Unit::new(Owner::Dispatch);
            for (set, elements) in deferred {
                for chunk in elements.chunks(DISPATCH_PER_COMMAND) {
                    let elements = chunk.to_vec();
                    unit.commands.push((
                        Section::AddElements,
                        Command::AddElements {
                            set: set.clone(),
                            elements,
                        },
                    ));
                }
            }
            plan.units.push(unit);
        }
        plan.units.retain(|u| !u.is_empty());
        if plan.units.is_empty() && !handed {
            return Ok(());
        }
        sink(self, plan.units, Handoff::Wait)
    }

    /// The table, its fixed chains and rules, its fixed maps; whether a map was recreated.
    fn plan_fixed(&mut self, cfg: &RenderConfig) -> (Unit, bool) {
        let fixed_rules = render_fixed_rules(cfg);
        self.fixed_rules = fixed_rules.len();
        let mut b = self.builder(Owner::Fixed);
        if !b.state.exists {
            b.push(Section::Table, Command::AddTable);
            b.state.exists = true;
        }
        let mut recreated = false;
        for decl in fixed_sets() {
            recreated |= b.set(&decl);
        }
        let rules_of = |chain: &str| -> Vec<Rule> {
            fixed_rules
                .iter()
                .filter(|(c, _)| *c == chain)
                .map(|(_, r)| r.clone())
                .collect()
        };
        for (name, hook) in base_chains() {
            b.chain(name, Some(&hook), &rules_of(name), recreated);
        }
        for name in names::REGULAR_CHAINS {
            b.chain(name, None, &rules_of(name), recreated);
        }
        (b.finish(), recreated)
    }

    /// Brings one Service's objects from what it owned to what `state` renders to (nothing,
    /// when it is gone). Services waiting for an element it lets go are queued.
    fn plan_service(
        &mut self,
        key: &ServiceKey,
        state: Option<&Arc<ServiceState>>,
        node: &NodeInfo,
        cfg: &RenderConfig,
        requeue: &mut std::collections::VecDeque<ServiceKey>,
    ) -> Unit {
        let old = self.owned.remove(key);
        // Let go of the old claims and hairpin addresses.
        let mut hairpin_was: BTreeMap<IpAddr, bool> = BTreeMap::new();
        if let Some(o) = &old {
            self.rules -= o.rules;
            self.no_local.0 -= o.no_local.0;
            self.no_local.1 -= o.no_local.1;
            for (map, k) in o.claimed.iter() {
                let Some(class) = SetId::class_of(map.name()) else {
                    continue;
                };
                let e = (class, k.clone());
                if self.element_owner.get(&e).is_some_and(|(s, _)| s == key) {
                    self.element_owner.remove(&e);
                    if let Some(waiting) = self.losers.remove(&e) {
                        requeue.extend(waiting.into_iter().filter(|w| w != key));
                    }
                }
            }
            for ip in o.hairpin.iter() {
                hairpin_was.entry(ip).or_insert(true);
                self.hairpin.release(&ip);
            }
            for c in &o.chains {
                self.chain_owner.remove(c);
            }
            for s in &o.sets {
                self.set_owner.remove(&s.name);
            }
        }
        let ports = state.map(|s| render_service(s, node, cfg)).unwrap_or_default();

        let mut chains: Vec<(String, Vec<Rule>)> = Vec::new();
        let mut sets: Vec<AffinitySet> = Vec::new();
        let mut elements: Vec<(&'static str, Key, Option<Value>)> = Vec::new();
        let mut hairpin: BTreeSet<IpAddr> = BTreeSet::new();
        let mut rules = 0;
        let mut no_local = (0, 0);
        for p in ports {
            for c in p.chains {
                rules += c.rules.len();
                chains.push((c.name, c.rules));
            }
            sets.extend(p.sets);
            for e in p.elements {
                // An endpoint slot goes with its address's bucket (rendered before it): it is
                // the Service's if the bucket claim is, and needs no claim of its own.
                if let Some(bucket) = slot_claim(&e.key) {
                    if self.element_owner.get(&bucket).is_some_and(|(s, _)| s == key) {
                        elements.push((e.map, e.key, e.value));
                    }
                    continue;
                }
                let (Some(map), Some(class)) = (SetId::of(e.map), SetId::class_of(e.map)) else {
                    tracing::error!(service = %key, map = e.map, "an element rendered for a map that is not a fixed one; left out");
                    continue;
                };
                let id = (class, e.key.clone());
                match self.element_owner.get(&id) {
                    Some((owner, _)) if owner != key => {
                        tracing::warn!(
                            service = %key,
                            owner = %owner,
                            map = e.map,
                            element = %e.key,
                            "two Services claim the same address and port; the first one keeps it"
                        );
                        self.losers.entry(id).or_default().insert(key.clone());
                    }
                    _ => {
                        self.element_owner.insert(id, (key.clone(), map));
                        elements.push((e.map, e.key, e.value));
                    }
                }
            }
            hairpin.extend(p.hairpin);
            no_local.0 += usize::from(p.no_local_internal);
            no_local.1 += usize::from(p.no_local_external);
        }
        for ip in &hairpin {
            let counted = self.hairpin.contains(ip);
            hairpin_was.entry(*ip).or_insert(counted);
            self.hairpin.add(*ip);
        }

        // The hairpin set is not kept in the committed table: it is the addresses counted in
        // `self.hairpin`, and an element is written when its count leaves or reaches zero.
        let hairpin_now: Vec<(IpAddr, bool)> = hairpin_was
            .into_iter()
            .filter_map(|(ip, was)| {
                let present = self.hairpin.contains(&ip);
                (present != was).then_some((ip, present))
            })
            .collect();
        let mut b = self.builder(Owner::Service(key.clone()));
        let mut recreated = false;
        for s in &sets {
            recreated |= b.set(&s.decl());
        }
        for (name, rules) in &chains {
            b.chain(name, None, rules, recreated);
        }
        if let Some(o) = &old {
            for c in &o.chains {
                if !chains.iter().any(|(n, _)| n == c) {
                    b.delete_chain(c, false);
                }
            }
            for s in &o.sets {
                if !sets.iter().any(|n| n.name == s.name) {
                    b.delete_set(&s.name);
                }
            }
            for (map, k) in o.elements() {
                if !elements.iter().any(|(m, nk, _)| *m == map && *nk == k) {
                    b.delete_element(map, ElemKey::Key(k));
                }
            }
        }
        for (map, k, v) in &elements {
            b.add_element(map, ElemKey::Key(k.clone()), v.clone());
        }
        for (ip, present) in hairpin_now {
            let key = ElemKey::Key(Key::Pair(ip));
            if present {
                b.add_element(names::HAIRPIN, key, None);
            } else {
                b.delete_element(names::HAIRPIN, key);
            }
        }
        let unit = b.finish();

        if let Some(state) = state {
            for (name, _) in &chains {
                self.chain_owner.insert(name.clone(), key.clone());
            }
            for s in &sets {
                self.set_owner.insert(s.name.clone(), key.clone());
            }
            self.rules += rules;
            self.no_local.0 += no_local.0;
            self.no_local.1 += no_local.1;
            // Collected into vectors of their own size: collecting in place would keep the
            // rendered vectors' allocations (elements with their values, grown by doubling),
            // about 1 KiB per Service for as long as it exists.
            let owned = Owned {
                state: state.clone(),
                chains: chains.into_iter().map(|(n, _)| n).collect(),
                sets: sets.into_boxed_slice(),
                claimed: elements
                    .into_iter()
                    .filter(|(_, k, _)| slot_claim(k).is_none())
                    .filter_map(|(m, k, _)| Some((SetId::of(m)?, k)))
                    .collect(),
                hairpin: hairpin.into_iter().collect(),
                rules,
                no_local,
            };
            self.owned.insert(key.clone(), owned);
        }
        unit
    }

    /// Who owns element `key` of fixed set `set`: the hairpin set's elements belong to the
    /// Services that DNAT to the address, the maps' to the Service that claimed them.
    fn owner_of_element(&self, set: &str, key: &[u8]) -> Option<Owner> {
        let kind = fixed_set_kind(set)?;
        let ElemKey::Key(k) = ElemKey::parse(kind, self.family, key) else {
            return None;
        };
        if set == names::HAIRPIN {
            let Key::Pair(ip) = k else { return None };
            return self.hairpin.contains(&ip).then_some(Owner::Fixed);
        }
        let name = static_set_name(set)?;
        if let Some(bucket) = slot_claim(&k) {
            let (s, _) = self.element_owner.get(&bucket)?;
            let rendered = self
                .owned
                .get(s)
                .is_some_and(|o| o.elements().any(|(m, e)| m == name && e == k));
            return rendered.then(|| Owner::Service(s.clone()));
        }
        match self.element_owner.get(&(SetId::class_of(name)?, k)) {
            Some((s, map)) if map.name() == name => Some(Owner::Service(s.clone())),
            _ => None,
        }
    }

    /// Everything in the committed table that nobody owns. Only what was read back from the
    /// kernel can be a stray (the elements planned since all have an owner): with `elements`
    /// false (the table held no elements when it was adopted), elements are not looked at.
    fn find_strays(&self, elements: bool) -> Strays {
        let mut strays = Strays::default();
        for name in self.state.chains.keys() {
            if owner_of_chain(&self.chain_owner, name).is_none() {
                strays.chains.push(name.clone());
            }
        }
        for name in self.state.sets.keys() {
            if owner_of_set(&self.set_owner, name).is_none() {
                strays.sets.push(name.clone());
            }
        }
        for (set, elements) in self.state.elements.iter().filter(|_| elements) {
            for key in elements.keys() {
                if self.owner_of_element(set, key).is_none() {
                    strays.elements.push((set.clone(), key.clone()));
                }
            }
        }
        strays.chains.sort();
        strays.sets.sort();
        strays.elements.sort();
        strays
    }

    /// Units deleting `strays`, bounded in size: elements first (they may jump to stray
    /// chains), then every stray chain flushed (they may jump to each other), then deleted,
    /// then the sets.
    fn plan_strays(&mut self, strays: Strays) -> Vec<Unit> {
        let mut units = Vec::new();
        let family = self.family;
        for chunk in strays.elements.chunks(STRAYS_PER_UNIT) {
            let mut b = self.builder(Owner::Stray);
            for (set, key) in chunk {
                let parsed = match fixed_set_kind(set) {
                    Some(kind) => ElemKey::parse(kind, family, key),
                    None => ElemKey::Raw(key.to_vec()),
                };
                b.delete_element(set, parsed);
            }
            units.push(b.finish());
        }
        let mut flush = self.builder(Owner::Stray);
        for name in &strays.chains {
            if flush.state.chains.get(name).is_some_and(|c| !c.rules.is_empty()) {
                flush.push(Section::Flush, Command::FlushChain(name.clone()));
            }
        }
        units.push(flush.finish());
        for chunk in strays.chains.chunks(STRAYS_PER_UNIT) {
            let mut b = self.builder(Owner::Stray);
            for name in chunk {
                b.delete_chain(name, false);
            }
            units.push(b.finish());
        }
        let mut b = self.builder(Owner::Stray);
        for name in &strays.sets {
            b.delete_set(name);
        }
        units.push(b.finish());
        units.retain(|u| !u.is_empty());
        units
    }

    /// Records the handles the kernel echoed for `unit`'s new rules (`handles[i]` for command
    /// `i`); false if one is missing, and the table must be read back.
    pub fn commit(&mut self, unit: &Unit, handles: &[Option<u64>]) -> bool {
        let mut complete = true;
        for (chain, index, command) in &unit.fills {
            let handle = handles.get(*command).copied().flatten();
            match (handle, self.state.chains.get_mut(chain)) {
                (Some(h), Some(c)) if *index < c.rules.len() => c.rules[*index].handle = h,
                _ => complete = false,
            }
        }
        complete
    }

    /// Compares `kernel` (listed while nothing of kproxy's changed, except what `skip`
    /// names) with the committed table, takes the kernel's word for every object that
    /// differs, and plans the repairs: the owners of differing objects are rendered again from
    /// the state they were last synced from; objects nobody owns are deleted (only with
    /// `strays`: a listing older than kproxy's last commit may show what it just deleted).
    /// In one go, for tests: the check itself compares in steps ([`Comparison`]) under short
    /// holds of the planner's lock and then calls [`Planner::repair`].
    #[cfg(test)]
    pub fn reconcile(&mut self, kernel: TableState, skip: &HashSet<Owner>, strays: bool) -> (Plan, usize) {
        let mut comparison = Comparison::new(&kernel);
        while !comparison.step(self, usize::MAX) {}
        let found = comparison.finish();
        self.repair(&kernel, found, skip, strays)
    }

    /// [`Planner::reconcile`]'s second half: looks again at what a [`Comparison`] of `kernel`
    /// found different (against the table as committed now: a sync may have committed since),
    /// leaves out what `skip`'s owners committed since the listing started, takes the kernel's
    /// word for the rest and plans the repairs.
    pub fn repair(
        &mut self,
        kernel: &TableState,
        found: Candidates,
        skip: &HashSet<Owner>,
        strays: bool,
    ) -> (Plan, usize) {
        let mut dirty: BTreeSet<Owner> = BTreeSet::new();
        let mut strayed = Strays::default();
        let mut differences = 0;
        let mut hairpin_listed: Option<Vec<KeyBytes>> = None;
        let skipped = |o: &Option<Owner>| o.as_ref().is_some_and(|o| skip.contains(o));
        let mut differed: Vec<String> = Vec::new();
        let mut note = |what: String| {
            if differed.len() < 5 {
                differed.push(what);
            }
        };

        if kernel.exists != self.state.exists {
            differences += 1;
            dirty.insert(Owner::Fixed);
            self.state.exists = kernel.exists;
        }
        // Decided before the sets are reconciled: a hairpin set that someone deleted (with the
        // whole table, say) is declared again, and its derived elements must come with it.
        let hairpin = !kernel.unlisted.contains(names::HAIRPIN)
            && (kernel.elements.contains_key(names::HAIRPIN)
                || self.state.elements.contains_key(names::HAIRPIN)
                || self.state.sets.contains_key(names::HAIRPIN));
        let mut named = Named {
            skipped: &skipped,
            strays,
            dirty: &mut dirty,
            note: &mut note,
        };
        let chain_owner = &self.chain_owner;
        differences += named.reconcile(
            "chain",
            found.chains,
            &kernel.chains,
            &mut self.state.chains,
            |name| owner_of_chain(chain_owner, name),
            &mut strayed.chains,
        );
        let set_owner = &self.set_owner;
        differences += named.reconcile(
            "set",
            found.sets,
            &kernel.sets,
            &mut self.state.sets,
            |name| owner_of_set(set_owner, name),
            &mut strayed.sets,
        );
        // The hairpin set is compared even when neither side lists an element of it: its
        // committed elements are derived (see `Planner::hairpin`). Repaired as a whole,
        // unless a Service changed since the listing started (it may show either side of
        // that, and the comparison may have seen the counts on either side).
        if hairpin && skip.is_empty() {
            let listed = kernel.elements.get(names::HAIRPIN);
            if !found.hairpin_listed_ok || listed.map_or(0, HashMap::len) != self.hairpin.len() {
                differences += 1;
                note(format!("elements of {}", names::HAIRPIN));
                hairpin_listed = Some(listed.map(|k| k.keys().cloned().collect()).unwrap_or_default());
            }
        }
        for (set, keys) in found.elements {
            if kernel.unlisted.contains(&set) || set == names::HAIRPIN {
                continue;
            }
            for key in keys {
                let kv = kernel.elements.get(&set).and_then(|e| e.get(&key)).copied();
                let cv = self.state.elements.get(&set).and_then(|e| e.get(&key)).copied();
                if kv == cv {
                    continue;
                }
                let owner = self.owner_of_element(&set, &key);
                if skipped(&owner) {
                    continue;
                }
                match (owner, kv) {
                    (Some(o), _) => {
                        dirty.insert(o);
                    }
                    (None, Some(_)) if strays => strayed.elements.push((set.clone(), key.clone())),
                    (None, _) => continue,
                }
                differences += 1;
                let shown = match fixed_set_kind(&set) {
                    Some(kind) => ElemKey::parse(kind, self.family, &key),
                    None => ElemKey::Raw(key.to_vec()),
                };
                note(format!(
                    "element {shown} of {set} ({})",
                    match (kv, cv) {
                        (Some(_), Some(_)) => "other data",
                        (Some(_), None) => "not kproxy's",
                        _ => "missing",
                    }
                ));
                let entry = self.state.elements.entry(set.clone()).or_default();
                match kv {
                    Some(v) => entry.insert(key, v),
                    None => entry.remove(&key),
                };
            }
        }

        self.differed = differed;
        let mut plan = Plan::default();
        let (Some(cfg), Some(node)) = (self.cfg.clone(), self.node.clone()) else {
            return (plan, differences);
        };
        if dirty.remove(&Owner::Fixed) {
            let (unit, _) = self.plan_fixed(&cfg);
            plan.units.push(unit);
        }
        if let Some(listed) = hairpin_listed {
            self.repair_hairpin(&listed, &mut plan);
        }
        let mut queue = std::collections::VecDeque::new();
        for owner in dirty {
            if let Owner::Service(key) = owner {
                let state = self.owned.get(&key).map(|o| o.state.clone());
                let unit = self.plan_service(&key, state.as_ref(), &node, &cfg, &mut queue);
                plan.units.push(unit);
            }
        }
        while let Some(key) = queue.pop_front() {
            let state = self.owned.get(&key).map(|o| o.state.clone());
            let unit = self.plan_service(&key, state.as_ref(), &node, &cfg, &mut queue);
            plan.units.push(unit);
        }
        plan.units.extend(self.plan_strays(strayed));
        plan.units.retain(|u| !u.is_empty());
        (plan, differences)
    }

    /// Makes the hairpin set, listed as `have`, hold exactly the addresses some Service DNATs to.
    fn repair_hairpin(&mut self, have: &[KeyBytes], plan: &mut Plan) {
        let mut missing: BTreeSet<IpAddr> = self.hairpin.addresses().collect();
        let family = self.family;
        let mut b = self.builder(Owner::Fixed);
        for key in have {
            match ElemKey::parse(SetKind::AddrPair, family, key) {
                ElemKey::Key(Key::Pair(ip)) if missing.remove(&ip) => {}
                parsed => b.delete_element(names::HAIRPIN, parsed),
            }
        }
        for ip in missing {
            b.add_element(names::HAIRPIN, ElemKey::Key(Key::Pair(ip)), None);
        }
        plan.units.push(b.finish());
    }

    /// The table as committed, with the elements kept only as counts (the hairpin set's)
    /// written out: what a listing of the kernel shows when nobody else wrote to it.
    pub fn committed(&self) -> TableState {
        let mut t = self.state.clone();
        if t.sets.contains_key(names::HAIRPIN) && !t.elements.contains_key(names::HAIRPIN) {
            let none = data_hash(None);
            let elements = self
                .hairpin
                .addresses()
                .map(|ip| (KeyBytes::from(Key::Pair(ip).bytes()), none))
                .collect();
            t.elements.insert(names::HAIRPIN.into(), elements);
        }
        t
    }
}

#[cfg(test)]
mod set_id_tests {
    use super::*;

    #[test]
    fn every_fixed_map_has_a_set_id_and_back() {
        for name in names::MAPS.iter() {
            let id = SetId::of(name).expect("a fixed map fits a one-byte index");
            assert_eq!(id.name(), *name);
            assert!(SetId::class_of(name).is_some(), "{name}'s claim class is a fixed map");
        }
        assert_eq!(SetId::of("kube-svc-not-a-map"), None);
    }

    #[test]
    fn claim_keys_are_smaller_than_with_the_name() {
        assert!(std::mem::size_of::<(SetId, Key)>() < std::mem::size_of::<(&'static str, Key)>());
        assert_eq!(
            std::mem::size_of::<hairpin::Addresses>(),
            std::mem::size_of::<Box<[IpAddr]>>()
        );
    }
}
