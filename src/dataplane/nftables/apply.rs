//! The kernel side of nftables mode: applying plans as netlink transactions, reading the
//! table back, deleting it. No `nft` process anywhere.
//!
//! A plan's units are packed into transactions of bounded size (a cold start of 10,000
//! Services is many transactions; a unit, one owner's change, is never split, so no Service
//! is seen half-programmed). Each transaction carries the generation kproxy last saw: if
//! someone else committed since, the kernel refuses it whole (`ERESTART`), kproxy notes the
//! foreign change (a check of the table follows) and sends it again against the new
//! generation.

use std::collections::{HashMap, HashSet};

use super::command::{fixed_set_kind, fixed_set_names, CommandText};
use super::monitor::{Monitor, Scope};
use super::names;
use super::netlink::{self, decode_chain, decode_elements, decode_rule, decode_set, msg, Dump, Table};
use super::plan::{
    data_hash, hash_of, ChainState, Hash, KeyBytes, Owner, Plan, Planner, RuleState, Sink, Spots, TableState, Unit,
};
use super::socket::{errno_text, BatchError, NftSocket};
use crate::dataplane::{DataplaneError, Result};
use crate::model::IpFamily;

/// Bounds of one transaction: enough for hundreds of Services, small enough that the
/// kernel's echoes fit the socket's receive buffer and one commit stays short.
const MAX_REQUESTS: usize = 2048;
pub const MAX_WRITES: usize = 4096;

/// Set by the integration tests only: while the file it names exists, every transaction has
/// one request pointed at a chain that does not exist, so that the kernel refuses it.
pub const TEST_REFUSE_ENV: &str = "KPROXY_TEST_NFT_REFUSE";

pub fn table(family: IpFamily) -> Table {
    Table {
        family,
        name: names::TABLE,
    }
}

/// Checks that nf_tables answers in this namespace, before anything is programmed.
pub async fn check() -> Result<()> {
    let mut sock = NftSocket::connect()?;
    sock.generation().map_err(|e| {
        DataplaneError::Unsupported(format!("nf_tables does not answer (no nf_tables in this kernel?): {e}"))
    })?;
    Ok(())
}

/// Deletes `family`'s `kproxy` table; whether there was one.
pub async fn delete_table(family: IpFamily) -> Result<bool> {
    delete_named_table(family, names::TABLE)
}

/// Deletes table `name` of `family` (also IPVS mode's companion table); whether there was one.
pub fn delete_named_table(family: IpFamily, name: &'static str) -> Result<bool> {
    let mut sock = NftSocket::connect()?;
    let t = Table { family, name };
    match sock.batch(0, &[netlink::Request::DeleteTable(t)]) {
        Ok(_) => Ok(true),
        Err(BatchError::Refused { errno: 2, .. }) => Ok(false),
        // A kernel without nf_tables cannot hold the table.
        Err(BatchError::Refused { errno, .. }) if errno == 93 || errno == 95 => {
            Err(DataplaneError::Unsupported(format!("nf_tables: {}", errno_text(errno))))
        }
        Err(e) => Err(DataplaneError::Netlink(format!("deleting table {name}: {e:?}"))),
    }
}

/// The kernel's side of one family's table.
pub struct Kernel {
    pub sock: NftSocket,
    pub table: Table,
    /// The generation after kproxy's last commit (or listing).
    pub generation: u32,
    /// Set when a transaction found someone else had committed: the table needs a check.
    pub foreign_change: bool,
    /// The network namespace the socket is in (its inode): generations are per namespace.
    netns: u64,
    /// The socket's port id: what the kernel's notifications name for kproxy's own commits.
    port: u32,
    /// nf_tables' notifications, once followed ([`Kernel::follow_others`]): which tables
    /// someone else's commits touched. Without them every foreign commit calls for a check.
    monitor: Option<Monitor>,
}

impl Kernel {
    pub fn connect(family: IpFamily) -> Result<Kernel> {
        let mut sock = NftSocket::connect()?;
        let generation = sock.generation()?;
        let netns = netns_id();
        forget_commits_after(netns, generation);
        let port = sock.port_id()?;
        Ok(Kernel {
            sock,
            table: table(family),
            generation,
            foreign_change: false,
            netns,
            port,
            monitor: None,
        })
    }
}

impl Kernel {
    /// Starts following nf_tables' notifications (once; after the cold start, so that its
    /// burst of notifications is not queued for nothing). Commits between kproxy's last one
    /// and the subscription are unknown: if anyone else made one, the next question is
    /// answered with a check.
    pub fn follow_others(&mut self) {
        if self.monitor.is_some() {
            return;
        }
        let mut monitor = match Monitor::open(self.table) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "nftables: cannot follow nf_tables' notifications; every commit by anyone else will start a check of the table");
                return;
            }
        };
        match self.sock.generation() {
            Ok(now) if only_own_commits(self.netns, self.generation, now) => {}
            _ => monitor.mark_unknown("commits before the subscription"),
        }
        self.monitor = Some(monitor);
    }

    /// Whether kproxy's table may have been changed by anyone else since kproxy's last commit
    /// or check: one GETGEN, however large the table, and a read of the notifications queued
    /// since when someone else committed. Commits of others that only touched other tables
    /// move the generation kproxy plans against, and call for nothing.
    pub fn changed_by_others(&mut self) -> Result<Option<String>> {
        let now = self.sock.generation()?;
        Ok(self.others_since(now))
    }

    /// [`Kernel::changed_by_others`] at generation `now`: why the table needs a check, if it does.
    fn others_since(&mut self, now: u32) -> Option<String> {
        let own = only_own_commits(self.netns, self.generation, now);
        let Some(monitor) = self.monitor.as_mut() else {
            return (!own).then(|| "someone else committed to nf_tables".to_string());
        };
        if own {
            // Nothing dropped from the notification socket was anyone else's; a foreign
            // change seen before and not checked yet (a check was running, or its listing
            // failed) is still due.
            monitor.drain(self.port);
            monitor.forget_lost();
            return monitor.due().map(|r| r.to_string());
        }
        match monitor.check_due(self.port, now) {
            Some(reason) => Some(reason.to_string()),
            None => {
                tracing::debug!(
                    table = self.table.name,
                    from = self.generation,
                    to = now,
                    "nftables: others committed, none of it to kproxy's table"
                );
                self.generation = now;
                None
            }
        }
    }

    /// Moves the generation kproxy plans against past the commits it has seen by others that
    /// did not touch its table, so that its next transaction is not refused for them.
    fn catch_up(&mut self) {
        if let Some(g) = self.monitor.as_mut().and_then(|m| m.clean_up_to(self.port)) {
            if (g.wrapping_sub(self.generation) as i32) > 0 {
                self.generation = g;
            }
        }
    }

    /// A check is about to list the table (the whole of it if `whole`): what it must list.
    /// Whatever the notifications reported so far is covered by it. Without notifications,
    /// or after lost ones, the whole table, every element dumped; while they have shown every
    /// element someone else added or deleted, a whole check may look elements up by key.
    pub fn check_starts(&mut self, whole: bool) -> Scope {
        match self.monitor.as_mut() {
            None => Scope::dump_all(),
            Some(m) => match m.take_scope(self.port) {
                Scope::Spots(also) if whole => Scope::Whole { lookups: true, also },
                scope => scope,
            },
        }
    }

    /// A check could not list the table: the next question is answered with a check of the
    /// whole table, if anyone else committed since kproxy's last commit.
    pub fn check_failed(&mut self) {
        if let Some(m) = self.monitor.as_mut() {
            m.recheck("a check's listing failed");
        }
    }
}

/// What one applied plan wrote.
#[derive(Debug, Default)]
pub struct Applied {
    pub writes: usize,
    pub transactions: usize,
    /// Owners whose units were committed.
    pub owners: HashSet<Owner>,
}

/// Applies `plan`, unit by unit in bounded transactions, recording echoed handles in
/// `planner`. On error the transactions before the failed one stay committed and the caller
/// must read the table back ([`read_table`]) before planning again.
pub fn apply_plan(kernel: &mut Kernel, planner: &mut Planner, plan: &Plan) -> Result<Applied> {
    let mut applied = Applied::default();
    let sent = send_units(kernel, &plan.units);
    record(planner, &plan.units, &sent, &mut applied)?;
    match sent.error {
        Some(e) => Err(e),
        None => Ok(applied),
    }
}

/// How the planner hands a batch of units over ([`super::plan::Sink`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handoff {
    /// More batches follow: the batch may still be on its way to the kernel when the sink
    /// returns, while the planner plans the next one.
    Async,
    /// The sink returns only when this batch and every earlier one is committed and their
    /// echoed handles are recorded in the planner: the last batch of a sync, and any batch
    /// before a Service is planned a second time in the same sync (its rules' handles may be
    /// in flight).
    Wait,
}

/// Applies the batches `plan` hands to its sink, in order, and in bounded transactions as
/// [`apply_plan`] does. While the planner plans batch N+1, a writer thread sends batch N (the
/// kernel does its work in that thread's `sendmsg`), so a cold start costs about the larger of
/// kproxy's and the kernel's share, not their sum. The thread is started by the first
/// [`Handoff::Async`] batch only: a sync of one batch (a partial sync) runs here, as before.
/// Each transaction is still whole or refused whole; after an error no later batch is sent,
/// and the caller must read the table back.
pub fn apply_streamed(
    kernel: &mut Kernel,
    planner: &mut Planner,
    plan: impl FnOnce(&mut Planner, &mut Sink<'_, DataplaneError>) -> Result<()>,
) -> Result<Applied> {
    std::thread::scope(|scope| {
        let mut writer = Writer {
            scope,
            kernel: Some(kernel),
            thread: None,
            applied: Applied::default(),
        };
        let planned = plan(planner, &mut |p: &mut Planner, units: Vec<Unit>, handoff: Handoff| {
            writer.hand(p, units, handoff)
        });
        let finished = writer.finish(planner);
        planned?;
        finished?;
        Ok(writer.applied)
    })
}

/// A batch sent on the writer thread, and what the kernel answered.
type Done = (Vec<Unit>, Sent);

/// The writer thread of [`apply_streamed`]: batches in, answers out, one in flight at most.
struct WriterThread {
    jobs: std::sync::mpsc::Sender<Vec<Unit>>,
    done: std::sync::mpsc::Receiver<Done>,
    in_flight: bool,
}

struct Writer<'scope, 'env: 'scope, 'k> {
    scope: &'scope std::thread::Scope<'scope, 'env>,
    /// Here until the first asynchronous batch moves it to the writer thread.
    kernel: Option<&'k mut Kernel>,
    thread: Option<WriterThread>,
    applied: Applied,
}

impl<'scope, 'env, 'k: 'scope> Writer<'scope, 'env, 'k> {
    fn hand(&mut self, planner: &mut Planner, units: Vec<Unit>, handoff: Handoff) -> Result<()> {
        self.finish(planner)?;
        if handoff == Handoff::Async && self.thread.is_none() {
            self.start();
        }
        match (&mut self.thread, self.kernel.as_deref_mut()) {
            (Some(t), _) => {
                if t.jobs.send(units).is_err() {
                    return Err(DataplaneError::Netlink("the nftables writer thread is gone".into()));
                }
                t.in_flight = true;
                if handoff == Handoff::Wait {
                    self.finish(planner)?;
                }
                Ok(())
            }
            (None, Some(kernel)) => {
                let sent = send_units(kernel, &units);
                self.record(planner, (units, sent))
            }
            (None, None) => Err(DataplaneError::Netlink("no nftables writer".into())),
        }
    }

    /// Waits for the batch in flight, if any, and records what the kernel answered.
    fn finish(&mut self, planner: &mut Planner) -> Result<()> {
        let Some(t) = self.thread.as_mut().filter(|t| t.in_flight) else {
            return Ok(());
        };
        t.in_flight = false;
        match t.done.recv() {
            Ok(done) => self.record(planner, done),
            Err(_) => Err(DataplaneError::Netlink("the nftables writer thread stopped".into())),
        }
    }

    fn record(&mut self, planner: &mut Planner, (units, sent): Done) -> Result<()> {
        record(planner, &units, &sent, &mut self.applied)?;
        match sent.error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn start(&mut self) {
        let Some(kernel) = self.kernel.take() else { return };
        let (jobs, job_rx) = std::sync::mpsc::channel::<Vec<Unit>>();
        let (done_tx, done) = std::sync::mpsc::channel::<Done>();
        let span = tracing::Span::current();
        self.scope.spawn(move || {
            let _span = span.enter();
            for units in job_rx {
                let sent = send_units(kernel, &units);
                let failed = sent.error.is_some();
                if done_tx.send((units, sent)).is_err() || failed {
                    break;
                }
            }
        });
        self.thread = Some(WriterThread {
            jobs,
            done,
            in_flight: false,
        });
    }
}

/// What the kernel answered to a run of units: the handles echoed for each committed unit
/// (the first `handles.len()` units were committed, in transactions of their own), and the
/// error that stopped the rest.
#[derive(Debug, Default)]
pub struct Sent {
    pub handles: Vec<Vec<Option<u64>>>,
    pub transactions: usize,
    pub error: Option<DataplaneError>,
}

/// Sends `units` in bounded transactions, in order, and stops at the first that fails. Needs
/// no planner, so that it can run on a thread of its own while the next units are planned.
pub fn send_units(kernel: &mut Kernel, units: &[Unit]) -> Sent {
    let mut sent = Sent::default();
    let mut start = 0;
    while start < units.len() {
        let mut end = start;
        let (mut requests, mut writes) = (0, 0);
        while end < units.len() {
            let u = &units[end];
            let w: usize = u.commands.iter().map(|(_, c)| c.writes()).sum();
            if end > start && (requests + u.commands.len() > MAX_REQUESTS || writes + w > MAX_WRITES) {
                break;
            }
            requests += u.commands.len();
            writes += w;
            end += 1;
        }
        match send_transaction(kernel, &units[start..end]) {
            Ok(handles) => {
                sent.handles.extend(handles);
                sent.transactions += 1;
            }
            Err(e) => {
                sent.error = Some(e);
                break;
            }
        }
        start = end;
    }
    sent
}

/// Records in `planner` the handles the kernel echoed for the committed units of `sent`.
pub fn record(planner: &mut Planner, units: &[Unit], sent: &Sent, applied: &mut Applied) -> Result<()> {
    for (unit, handles) in units.iter().zip(&sent.handles) {
        if !planner.commit(unit, handles) {
            return Err(DataplaneError::Netlink(format!(
                "the kernel did not echo every new rule of {}",
                unit.owner
            )));
        }
        applied.owners.insert(unit.owner.clone());
        applied.writes += unit.commands.iter().map(|(_, c)| c.writes()).sum::<usize>();
    }
    applied.transactions += sent.transactions;
    Ok(())
}

/// Sends `units` as one transaction; the handles echoed for each unit's commands.
fn send_transaction(kernel: &mut Kernel, units: &[Unit]) -> Result<Vec<Vec<Option<u64>>>> {
    // Every unit's commands, ordered by section across units (stable within one).
    let mut order: Vec<(usize, usize)> = Vec::new();
    for (u, unit) in units.iter().enumerate() {
        order.extend((0..unit.commands.len()).map(|c| (u, c)));
    }
    order.sort_by_key(|&(u, c)| units[u].commands[c].0);
    let command = |&(u, c): &(usize, usize)| &units[u].commands[c].1;
    let mut requests: Vec<netlink::Request> = order.iter().map(|i| command(i).request(kernel.table)).collect();
    test_refusal(&mut requests);

    kernel.catch_up();
    let mut attempts = 0;
    let committed = loop {
        match kernel.sock.batch(kernel.generation, &requests) {
            Ok(c) => break c,
            Err(BatchError::Generation) if attempts < 3 => {
                // Someone else committed: note it (the table gets checked) and go on against
                // the new generation; anything this transaction relies on that the other
                // writer changed makes the kernel refuse it. The other family's table shares
                // the namespace's generation: commits of its own are not someone else's.
                attempts += 1;
                let now = kernel.sock.generation()?;
                let foreign = kernel.others_since(now);
                kernel.generation = now;
                if let Some(why) = foreign {
                    kernel.foreign_change = true;
                    tracing::info!(
                        table = kernel.table.name,
                        generation = kernel.generation,
                        why,
                        "the ruleset changed behind kproxy's back; checking the table"
                    );
                }
            }
            Err(BatchError::Refused { index, errno, message }) => {
                let (u, _) = order[index];
                let mut text = errno_text(errno);
                if let Some(m) = message {
                    text = format!("{m}: {text}");
                }
                return Err(DataplaneError::Refused {
                    command: CommandText(command(&order[index]), kernel.table.family).to_string(),
                    owner: units[u].owner.to_string(),
                    message: text,
                });
            }
            Err(BatchError::Generation) => {
                return Err(DataplaneError::Netlink(
                    "the ruleset keeps changing behind kproxy's back".into(),
                ))
            }
            Err(BatchError::Commit { errno }) => {
                return Err(DataplaneError::Netlink(format!(
                    "commit refused: {}",
                    errno_text(errno)
                )))
            }
            Err(BatchError::Lost(why)) => return Err(DataplaneError::Netlink(why)),
        }
    };
    kernel.generation = committed
        .generation
        .unwrap_or_else(|| kernel.generation.wrapping_add(1));
    record_own_commit(kernel.netns, kernel.generation);
    let mut handles: Vec<Vec<Option<u64>>> = units.iter().map(|u| vec![None; u.commands.len()]).collect();
    for (i, &(u, c)) in order.iter().enumerate() {
        handles[u][c] = committed.handles.get(i).copied().flatten();
    }
    Ok(handles)
}

/// The generations kproxy's own commits made, to both families' tables: the last
/// [`OWN_COMMITS_KEPT`] of each network namespace (by its inode). Tests run many namespaces in
/// one process, so one namespace's commits must not push out another's.
static OWN_COMMITS: std::sync::Mutex<Vec<(u64, std::collections::VecDeque<u32>)>> = std::sync::Mutex::new(Vec::new());
const OWN_COMMITS_KEPT: usize = 256;

/// The inode of the calling thread's network namespace (0 if unknown).
fn netns_id() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net").map_or(0, |m| m.ino())
}

fn own_commits() -> std::sync::MutexGuard<'static, Vec<(u64, std::collections::VecDeque<u32>)>> {
    OWN_COMMITS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn record_own_commit(netns: u64, generation: u32) {
    let mut all = own_commits();
    let i = match all.iter().position(|(n, _)| *n == netns) {
        Some(i) => i,
        None => {
            all.push((netns, Default::default()));
            all.len() - 1
        }
    };
    let own = &mut all[i].1;
    if own.len() == OWN_COMMITS_KEPT {
        own.pop_front();
    }
    own.push_back(generation);
}

/// Forgets the commits recorded for `netns` after generation `now`: they were made in an
/// earlier namespace whose inode the kernel has since given to this one, and would pass
/// someone else's future commits off as kproxy's own.
fn forget_commits_after(netns: u64, now: u32) {
    if let Some((_, own)) = own_commits().iter_mut().find(|(n, _)| *n == netns) {
        own.retain(|g| (g.wrapping_sub(now) as i32) <= 0);
    }
}

/// Whether every commit after generation `from` up to `to` in namespace `netns` was kproxy's
/// own (to the other family's table): then nobody else changed the ruleset.
fn only_own_commits(netns: u64, from: u32, to: u32) -> bool {
    let all = own_commits();
    let Some((_, own)) = all.iter().find(|(n, _)| *n == netns) else {
        return from == to;
    };
    let span = to.wrapping_sub(from);
    span as usize <= OWN_COMMITS_KEPT && (1..=span).all(|i| own.contains(&from.wrapping_add(i)))
}

/// The test hook of [`TEST_REFUSE_ENV`]: points the first rule (or element) request at an
/// object that does not exist.
fn test_refusal(requests: &mut [netlink::Request]) {
    let Some(marker) = std::env::var_os(TEST_REFUSE_ENV) else {
        return;
    };
    if !std::path::Path::new(&marker).exists() {
        return;
    }
    for r in requests.iter_mut() {
        match r {
            netlink::Request::AddRule { chain, .. } | netlink::Request::ReplaceRule { chain, .. } => {
                chain.push_str("-refused-by-test");
            }
            netlink::Request::AddElements { set, .. } | netlink::Request::DeleteElements { set, .. } => {
                set.push_str("-refused-by-test");
            }
            _ => continue,
        }
        tracing::warn!("{TEST_REFUSE_ENV}: this transaction is made to fail");
        return;
    }
}

/// Lists `table` over netlink into its compact form. Returns the listing, the generation it
/// started at, and whether it is a snapshot (nothing was committed while it ran).
pub fn read_table(sock: &mut NftSocket, table: Table) -> Result<(TableState, u32, bool)> {
    read_table_with(sock, table, None)
}

/// [`read_table`], except that the elements of the sets in `lookups` are looked up by those
/// keys (what kproxy committed) instead of dumped: no element outside them is seen. For a
/// check while nf_tables' notifications show every foreign change to the table (they name
/// any element someone else added); a dump of a 100,000-slot map walks it again for every
/// message, in stretches the kernel does not preempt.
pub fn read_table_with(
    sock: &mut NftSocket,
    table: Table,
    lookups: Option<&HashMap<String, Vec<KeyBytes>>>,
) -> Result<(TableState, u32, bool)> {
    let before = sock.generation()?;
    let mut state = TableState::default();
    let mut interrupted = false;

    state.exists = table_exists(sock, table)?;
    if state.exists {
        state.chains = read_chains(sock, table, |_| true, &mut interrupted)?;
        let mut sets = Vec::new();
        interrupted |= sock
            .dump(Dump::Sets(table), |kind, _, a| {
                if kind == msg::NEWSET {
                    let spec = decode_set(a)?;
                    state.sets.insert(spec.name.clone(), hash_of(&spec));
                    sets.push(spec.name);
                }
                Ok(())
            })?
            .unwrap_or(false);
        for set in sets.iter().filter(|s| fixed_set_kind(s).is_some()) {
            if let Some(keys) = lookups.and_then(|l| l.get(set)) {
                let mut elements: HashMap<KeyBytes, Hash> = HashMap::with_capacity(keys.len());
                sock.get_elements(table, set, keys, |i, data| {
                    elements.insert(keys[i].clone(), data_hash(data.as_ref()));
                })?;
                state.elements.insert(set.clone(), elements);
                continue;
            }
            match read_elements(sock, table, set)? {
                Some(elements) => {
                    state.elements.insert(set.clone(), elements);
                }
                None => {
                    interrupted = true;
                    state.unlisted.insert(set.clone());
                }
            }
        }
    }
    let after = sock.generation()?;
    Ok((state, before, !interrupted && before == after))
}

/// Lists only `spots` of `table`: the chains (with their rules) and the elements named, each
/// looked up by key; every other fixed set is marked unlisted, so that a comparison leaves it
/// alone. Returns the listing, the generation it started at, and whether it is a snapshot.
pub fn read_spots(sock: &mut NftSocket, table: Table, spots: &Spots) -> Result<(TableState, u32, bool)> {
    let before = sock.generation()?;
    let mut state = TableState::default();
    let mut interrupted = false;
    state.exists = table_exists(sock, table)?;
    if state.exists && !spots.chains.is_empty() {
        state.chains = read_chains(sock, table, |name| spots.chains.contains(name), &mut interrupted)?;
    }
    state.unlisted.extend(fixed_set_names().map(String::from));
    if state.exists {
        for (set, keys) in &spots.elements {
            let keys: Vec<&Vec<u8>> = keys.iter().collect();
            let elements = state.elements.entry(set.clone()).or_default();
            sock.get_elements(table, set, &keys, |i, data| {
                elements.insert(KeyBytes::new(keys[i]), data_hash(data.as_ref()));
            })?;
            state.unlisted.remove(set);
        }
    }
    let after = sock.generation()?;
    Ok((state, before, !interrupted && before == after))
}

/// Whether `table` exists.
fn table_exists(sock: &mut NftSocket, table: Table) -> Result<bool> {
    let family = netlink::nfproto(table.family);
    let mut exists = false;
    sock.dump(Dump::Tables, |_, f, a| {
        exists |= f == family && netlink::decode_table(f, a)?.1 == table.name;
        Ok(())
    })?;
    Ok(exists)
}

/// The chains of `table` whose names `keep` accepts, with their hooks and rules.
fn read_chains(
    sock: &mut NftSocket,
    table: Table,
    keep: impl Fn(&str) -> bool,
    interrupted: &mut bool,
) -> Result<HashMap<String, ChainState>> {
    let family = netlink::nfproto(table.family);
    let mut chains = HashMap::new();
    *interrupted |= sock
        .dump(Dump::Chains, |kind, f, a| {
            if kind != msg::NEWCHAIN || f != family {
                return Ok(());
            }
            let c = decode_chain(f, a)?;
            if c.table == table.name && keep(&c.name) {
                let state = ChainState {
                    hook: c.hook,
                    rules: Vec::new(),
                };
                chains.insert(c.name, state);
            }
            Ok(())
        })?
        .unwrap_or(false);
    // Chain by chain: a whole-table rule dump walks the table again for every part.
    let mut names: Vec<String> = chains.keys().cloned().collect();
    names.sort();
    for name in names {
        let rules = read_rules(sock, table, &name, interrupted)?;
        if let Some(c) = chains.get_mut(&name) {
            c.rules = rules;
        }
    }
    Ok(chains)
}

/// The rules of one chain, in order, as the listing keeps them.
fn read_rules(sock: &mut NftSocket, table: Table, chain: &str, interrupted: &mut bool) -> Result<Vec<RuleState>> {
    let mut rules = Vec::new();
    *interrupted |= sock
        .dump(Dump::Rules(table, Some(chain)), |kind, _, a| {
            if kind != msg::NEWRULE {
                return Ok(());
            }
            let r = decode_rule(a)?;
            if r.table == table.name && r.chain == chain {
                // A rule with someone's comment is someone's rule, even if it matches.
                let hash = match &r.userdata {
                    None => hash_of(&r.exprs),
                    Some(u) => hash_of(&(&r.exprs, u)),
                };
                rules.push(RuleState { handle: r.handle, hash });
            }
            Ok(())
        })?
        .unwrap_or(false);
    Ok(rules)
}

/// Tries to dump a set's elements while nothing is committed: `None` if a commit came during
/// every try. The kernel resumes an element dump by position (`cb->args[0]` counts the
/// elements already sent) and never flags it interrupted, so an element added or deleted
/// during the dump, by any owner, shifts the rest: an element of another Service is skipped or
/// sent twice. Only a dump with the same generation before and after is the set's content.
fn read_elements(sock: &mut NftSocket, table: Table, set: &str) -> Result<Option<HashMap<KeyBytes, Hash>>> {
    for _ in 0..3 {
        let before = sock.generation()?;
        let mut elements = HashMap::new();
        sock.dump(Dump::Elements(table, set), |kind, _, a| {
            if kind == msg::NEWSETELEM {
                for e in decode_elements(a)?.1 {
                    elements.insert(KeyBytes::new(&e.key), data_hash(e.data.as_ref()));
                }
            }
            Ok(())
        })?;
        if sock.generation()? == before {
            return Ok(Some(elements));
        }
    }
    Ok(None)
}

/// Reads the table until a listing is a snapshot (a few tries), for recovery.
pub fn read_table_consistent(sock: &mut NftSocket, table: Table) -> Result<(TableState, u32)> {
    let mut last = None;
    for _ in 0..5 {
        let (state, generation, snapshot) = read_table(sock, table)?;
        if snapshot {
            return Ok((state, generation));
        }
        last = Some((state, generation));
    }
    // Someone commits all the time: a transaction planned on this listing is still checked
    // by the kernel against the generation.
    Ok(last.expect("at least one listing"))
}

/// Every command of `plan` as nft text, one per line, in transaction order: `nft -f` input.
pub fn plan_text(plan: &Plan, family: IpFamily) -> String {
    let mut out = String::new();
    for c in plan.commands() {
        out.push_str(&CommandText(c, family).to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Namespace ids no real namespace has (inodes are 32-bit).
    const NS_A: u64 = u64::MAX - 1;
    const NS_B: u64 = u64::MAX - 2;

    #[test]
    fn one_namespaces_commits_do_not_push_out_anothers() {
        record_own_commit(NS_A, 7);
        for g in 0..(3 * OWN_COMMITS_KEPT as u32) {
            record_own_commit(NS_B, g);
        }
        assert!(only_own_commits(NS_A, 6, 7), "NS_A's commit is still known");
        assert!(!only_own_commits(NS_A, 6, 8), "generation 8 in NS_A was someone else's");
        let last = 3 * OWN_COMMITS_KEPT as u32 - 1;
        assert!(only_own_commits(NS_B, last - 10, last));
        assert!(!only_own_commits(NS_B, 0, 5), "NS_B keeps only its last commits");
    }

    #[test]
    fn a_reused_namespace_inode_forgets_the_old_namespaces_later_commits() {
        const NS: u64 = u64::MAX - 3;
        for g in 1..=5 {
            record_own_commit(NS, g);
        }
        // A new namespace with the same inode, its ruleset at generation 2.
        forget_commits_after(NS, 2);
        assert!(!only_own_commits(NS, 2, 3), "generation 3 here is not kproxy's");
        assert!(only_own_commits(NS, 1, 2), "earlier ones are harmless and kept");
        record_own_commit(NS, 3);
        assert!(only_own_commits(NS, 2, 3));
        assert!(only_own_commits(u64::MAX - 4, 9, 9), "no commits since: nobody else's");
        assert!(!only_own_commits(u64::MAX - 4, 9, 10));
    }
}
