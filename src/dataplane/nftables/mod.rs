//! nftables mode: upstream kube-proxy's nftables layout in kproxy's own table, `kproxy`, one per
//! IP family (`ip kproxy`, `ip6 kproxy`), programmed over netlink (no `nft` process).
//!
//! Service addresses are elements of plain sets keyed by `address . protocol . port` (and
//! `protocol . port` for NodePorts), one per traffic policy, which lead to fixed chains; their
//! endpoints are elements of fixed maps that two fixed chains DNAT through (`numgen random` picks
//! a slot). A Service owns no chain unless it has session affinity or more than 16 endpoints:
//! those keep upstream's per-Service chains behind the verdict maps `service-ips` and
//! `service-nodeports`. Hairpin traffic is masqueraded after DNAT through one shared set. See
//! `docs/nftables.md`.
//!
//! [`render`] and [`rule`] turn the model into nft rules as values; [`plan`] diffs them against
//! what was committed; [`command`] and [`netlink`] are the commands and their bytes; [`apply`]
//! and [`socket`] talk to the kernel. A sync writes only what changed, addressing rules by the
//! handles the kernel echoed. A commit by anyone else into kproxy's table (seen in nf_tables'
//! notifications, [`monitor`]) and the hourly full sync start a check on a thread of its own:
//! it lists the table over netlink (at a lower priority) and repairs whatever differs from
//! what kproxy committed, comparing in short steps under the planner's lock, so that a sync
//! waits for one step at most. Other writers' commits to their own tables start nothing.

pub mod apply;
pub mod command;
mod hairpin;
pub mod monitor;
pub mod names;
pub mod netlink;
pub mod plan;
pub mod render;
pub mod rule;
pub mod socket;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::future::BoxFuture;

use self::apply::{apply_plan, read_spots, read_table_consistent, read_table_with, Kernel};
use self::monitor::Scope;
use self::plan::{Owner, Planner};
use self::socket::NftSocket;
use super::conntrack::{delete_flows, plan_cleanup, udp_ports, UdpPorts};
use super::iptables::render::RenderConfig;
use super::iptables::{render_config, ProxierConfig};
use super::{Dataplane, DataplaneError, Result, SyncStats};
use crate::metrics::metrics;
use crate::model::{ChangeSet, DesiredState, IpFamily, ServiceKey, ServicePortName};

/// The render configuration as nftables mode uses it: iptables mode's, less what only
/// iptables rules depend on (comments), so a change of it does not force a full render.
async fn config(cfg: &ProxierConfig, desired: &DesiredState) -> Result<RenderConfig> {
    let mut c = render_config(cfg, desired).await?;
    c.endpoint_comments = false;
    Ok(c)
}

/// What the sync path and the check thread share.
struct Inner {
    planner: Planner,
    kernel: Option<Kernel>,
    /// After a failed transaction (or before the first sync): read the table back first.
    recover: bool,
    /// While a check lists the table: the owners of every commit since it started.
    touched: Option<HashSet<Owner>>,
}

impl Inner {
    /// Notes what a sync committed, for a check in progress (it leaves those owners alone).
    fn committed(&mut self, owners: &HashSet<Owner>) {
        if let Some(t) = self.touched.as_mut() {
            t.extend(owners.iter().cloned());
        }
    }
}

/// [`Inner`] behind its lock, and how many syncs wait for it: the check takes the lock for one
/// step of its comparison at a time and lets a waiting sync go first.
struct Shared {
    inner: Mutex<Inner>,
    waiting: AtomicUsize,
    /// The check's socket, kept open from one check to the next. Closing a NETLINK_NETFILTER
    /// socket is not free for the other writers: the kernel's release notifier takes the
    /// commit mutex and waits there for the deferred release of the last commits (an RCU grace
    /// period, 10 to 20 ms on a busy two-core machine), so a sync due then waited for it
    /// (BENCHMARKS.md, "Where a slow change's time went").
    check_sock: Mutex<Option<NftSocket>>,
}

impl Shared {
    fn new(inner: Inner) -> Shared {
        Shared {
            inner: Mutex::new(inner),
            waiting: AtomicUsize::new(0),
            check_sock: Mutex::new(None),
        }
    }

    /// The lock, for a sync (or the periodic sync's question): the check steps aside.
    fn lock_for_sync(&self) -> MutexGuard<'_, Inner> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let g = lock(&self.inner);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        g
    }

    /// The lock, for the check's next step: first waits while a sync waits for it (a mutex
    /// just released would most likely go to the thread that released it).
    fn lock_for_check(&self) -> MutexGuard<'_, Inner> {
        while self.waiting.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        lock(&self.inner)
    }
}

/// The nftables dataplane for one IP family.
pub struct NftablesProxier {
    cfg: ProxierConfig,
    inner: Arc<Shared>,
    check: Option<std::thread::JoinHandle<()>>,
    /// UDP ports as last programmed, to find stale conntrack flows; `None` before the first sync.
    udp: Option<UdpPorts>,
    /// The render configuration of the last sync and the node it was made for: a partial sync
    /// for the same node reuses it (making it walks every Service to count endpoints), unless
    /// NodePorts follow the addresses of local interfaces, which are read again every sync.
    rcfg: Option<(crate::model::NodeInfo, RenderConfig)>,
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panic while holding the lock leaves a planner that the next sync reads back anyway.
    let mut g = inner.lock().unwrap_or_else(PoisonError::into_inner);
    if inner.is_poisoned() {
        g.recover = true;
    }
    g
}

impl NftablesProxier {
    pub fn new(cfg: ProxierConfig) -> Self {
        NftablesProxier {
            inner: Arc::new(Shared::new(Inner {
                planner: Planner::new(cfg.family),
                kernel: None,
                recover: true,
                touched: None,
            })),
            cfg,
            check: None,
            udp: None,
            rcfg: None,
        }
    }

    /// Starts a check of the table on its own thread, unless one is running: of the whole
    /// table if `whole`, else of what nf_tables' notifications say someone else touched.
    fn start_check(&mut self, whole: bool) {
        if self.check.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let shared = self.inner.clone();
        let family = self.cfg.family;
        let spawned = std::thread::Builder::new()
            .name(format!("nft-check-{family:?}"))
            .spawn(move || check_table(&shared, family, whole));
        match spawned {
            Ok(h) => self.check = Some(h),
            Err(e) => tracing::warn!(error = %e, "could not start the nftables check"),
        }
    }

    /// Programs `desired`; whether the table should be checked, and if so whether whole.
    fn sync_locked(
        &self,
        desired: &DesiredState,
        changes: &ChangeSet,
        cfg: &RenderConfig,
    ) -> Result<(SyncStats, Option<bool>)> {
        let family = self.cfg.family;
        let asked = std::time::Instant::now();
        let mut inner = self.inner.lock_for_sync();
        let waited = asked.elapsed();
        if waited >= std::time::Duration::from_millis(1) {
            tracing::debug!(
                ?family,
                waited_ms = waited.as_secs_f64() * 1000.0,
                "nftables sync: waited for the planner's lock"
            );
        }
        let inner = &mut *inner;
        if inner.kernel.is_none() {
            inner.kernel = Some(Kernel::connect(family)?);
        }
        let Some(kernel) = inner.kernel.as_mut() else {
            return Err(DataplaneError::Netlink("no netlink socket".into()));
        };
        let recovering = inner.recover;
        if recovering {
            let (state, generation) = read_table_consistent(&mut kernel.sock, kernel.table)?;
            tracing::debug!(
                ?family,
                chains = state.chains.len(),
                rules = state.rule_count(),
                "read the table back before planning"
            );
            inner.planner.adopt(state);
            kernel.generation = generation;
            inner.recover = false;
        }
        // Planned and applied in batches: a cold start never holds its whole plan, and the
        // kernel commits one batch while the next is planned.
        let trace = tracing::enabled!(tracing::Level::TRACE);
        let applied = apply::apply_streamed(kernel, &mut inner.planner, |planner, sink| {
            let mut traced = |p: &mut plan::Planner, units: Vec<plan::Unit>, handoff| {
                if trace {
                    let plan = plan::Plan { units };
                    tracing::trace!(?family, "transaction:\n{}", apply::plan_text(&plan, family));
                    return sink(p, plan.units, handoff);
                }
                sink(p, units, handoff)
            };
            planner.plan_streamed(desired, changes, cfg, apply::MAX_WRITES - 256, &mut traced)
        });
        let applied = match applied {
            Ok(a) => a,
            Err(e) => {
                inner.recover = true;
                return Err(e);
            }
        };
        tracing::debug!(
            ?family,
            waited_us = waited.as_micros() as u64,
            applied_us = asked.elapsed().as_micros() as u64,
            transactions = applied.transactions,
            "nftables sync: committed"
        );
        let foreign = std::mem::take(&mut kernel.foreign_change);
        kernel.follow_others();
        inner.committed(&applied.owners);
        // A full sync checks the whole table; someone else's commit, what it touched.
        let check = if changes.full && !recovering {
            Some(true)
        } else {
            foreign.then_some(false)
        };
        let (rules, no_local) = inner.planner.totals();
        Ok((
            SyncStats {
                rules_written: applied.writes,
                rules_total: vec![("nftables", rules)],
                no_local_endpoints: no_local,
            },
            check,
        ))
    }

    /// Deletes stale UDP conntrack flows of the Services this sync changed.
    async fn clean_conntrack(&mut self, desired: &DesiredState, changes: &ChangeSet) {
        let family = self.cfg.family;
        let Some(old) = self.udp.as_mut() else {
            self.udp = Some(udp_ports(desired, family));
            return;
        };
        if changes.full {
            let new = udp_ports(desired, family);
            delete_flows(&plan_cleanup(old, &new)).await;
            *old = new;
            return;
        }
        // Only the changed Services' ports, so a change costs what it touches.
        let subset = DesiredState {
            services: changes
                .services
                .iter()
                .filter_map(|k| desired.services.get(k).map(|s| (k.clone(), s.clone())))
                .collect(),
            node: desired.node.clone(),
        };
        let new = udp_ports(&subset, family);
        let mut before = UdpPorts::new();
        for key in &changes.services {
            let names: Vec<ServicePortName> = old
                .range(first_port_of(key)..)
                .take_while(|(n, _)| &n.service == key)
                .map(|(n, _)| n.clone())
                .collect();
            for n in names {
                if let Some(p) = old.remove(&n) {
                    before.insert(n, p);
                }
            }
        }
        let flows = plan_cleanup(&before, &new);
        old.extend(new);
        if !flows.is_empty() {
            delete_flows(&flows).await;
        }
    }
}

/// The smallest port name of Service `key`, where its ports start in a sorted map.
fn first_port_of(key: &ServiceKey) -> ServicePortName {
    ServicePortName {
        service: key.clone(),
        port: "".into(),
        protocol: crate::model::Protocol::Tcp,
    }
}

/// Sets with more elements than this are looked up by key in a whole check while nf_tables'
/// notifications show every foreign change ([`Scope::Whole`]), not dumped.
const LOOKUP_ABOVE: usize = 1024;

/// Objects the check compares per hold of the planner's lock: about a tenth of a millisecond.
const COMPARE_STEP: usize = 2048;

/// The check: lists the table (no lock held, at a lower priority), then compares it with what
/// was committed in steps, each under the lock for a moment, and repairs what differs (see
/// [`compare_and_repair`]). Commits made meanwhile are not second-guessed.
fn check_table(shared: &Shared, family: IpFamily, whole: bool) {
    let kept = shared.check_sock.lock().unwrap_or_else(PoisonError::into_inner).take();
    let mut sock = match kept.map_or_else(NftSocket::connect, Ok) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "nftables check: no netlink socket");
            return;
        }
    };
    let (scope, lookups) = {
        let mut g = lock(&shared.inner);
        g.touched = Some(HashSet::new());
        let scope = g
            .kernel
            .as_mut()
            .map_or_else(Scope::dump_all, |k| k.check_starts(whole));
        // The keys of the large sets, copied under the lock (a few MiB at 10,000 Services,
        // for the length of the check), and those someone else's commits touched.
        let lookups = match &scope {
            Scope::Whole { lookups: true, also } => Some(g.planner.lookup_keys(LOOKUP_ABOVE, also)),
            _ => None,
        };
        (scope, lookups)
    };
    let table = apply::table(family);
    let started = std::time::Instant::now();
    // The kernel encodes the dump in this thread's recvmsg, and the thread decodes it: at a
    // lower priority, so that a sync due meanwhile gets the CPU first. The comparison runs at
    // the thread's own priority again: it takes the lock, and must not be preempted holding it.
    let niced = lower_priority();
    let listed = match &scope {
        Scope::Whole { .. } => read_table_with(&mut sock, table, lookups.as_ref()),
        Scope::Spots(spots) => read_spots(&mut sock, table, spots),
    };
    if let Some(nice) = niced {
        set_thread_nice(nice);
    }
    let listed_in = started.elapsed();
    let (state, snapshot) = match listed {
        Ok((state, _, snapshot)) => {
            // Kept for the next check only after a complete dump: after a failed one, parts
            // of it may still be queued on the socket (it is dropped and a new one opened).
            *shared.check_sock.lock().unwrap_or_else(PoisonError::into_inner) = Some(sock);
            (state, snapshot)
        }
        Err(e) => {
            let mut g = lock(&shared.inner);
            g.touched = None;
            // What the check was for is still due: the next periodic sync checks again.
            if let Some(k) = g.kernel.as_mut() {
                k.check_failed();
            }
            drop(g);
            tracing::warn!(error = %e, "nftables check: listing the table failed");
            return;
        }
    };
    let held = match &scope {
        Scope::Whole { .. } => compare_and_repair(shared, family, &state, snapshot, COMPARE_STEP, &mut || {}),
        Scope::Spots(spots) => spot_repair(shared, family, &state, spots, snapshot),
    };
    let Some(held) = held else {
        return;
    };
    tracing::debug!(
        ?family,
        listed_ms = listed_in.as_secs_f64() * 1000.0,
        steps = held.steps,
        held_ms = held.total.as_secs_f64() * 1000.0,
        longest_hold_ms = held.longest.as_secs_f64() * 1000.0,
        check_ms = started.elapsed().as_secs_f64() * 1000.0,
        differences = held.differences,
        spots = match &scope {
            Scope::Whole { .. } => None,
            Scope::Spots(s) => Some(s.len()),
        },
        looked_up = lookups.as_ref().map(|l| l.values().map(Vec::len).sum::<usize>()),
        "nftables check: compared"
    );
    // `state`, the listing, is freed here, with no lock held.
}

/// How long a check held the planner's lock.
#[derive(Debug, Default)]
struct Held {
    steps: usize,
    total: std::time::Duration,
    longest: std::time::Duration,
    differences: usize,
}

/// Compares `listed` (a listing that started when `touched` was set) with the committed table
/// in steps of `step` objects, each under the lock and each after any sync waiting for it; `between` runs after every step, with no lock held (a test's hook). The last step
/// keeps the lock, looks again at what differed, leaves out every owner a sync committed since
/// the listing started, and applies the repairs. `None` when the check gave up (a sync failed
/// meanwhile and the table is read back anyway).
fn compare_and_repair(
    shared: &Shared,
    family: IpFamily,
    listed: &plan::TableState,
    snapshot: bool,
    step: usize,
    between: &mut dyn FnMut(),
) -> Option<Held> {
    let mut comparison = plan::Comparison::new(listed);
    let mut held = Held::default();
    let mut guard = loop {
        let mut guard = shared.lock_for_check();
        let locked = std::time::Instant::now();
        if guard.recover || guard.kernel.is_none() {
            guard.touched = None;
            return None;
        }
        let done = comparison.step(&guard.planner, step);
        let hold = locked.elapsed();
        held.steps += 1;
        held.total += hold;
        held.longest = held.longest.max(hold);
        if done {
            break guard;
        }
        drop(guard);
        between();
    };
    let locked = std::time::Instant::now();
    repair_and_apply(&mut guard, family, listed, comparison.finish(), snapshot, &mut held)?;
    let hold = locked.elapsed();
    drop(guard);
    held.total += hold;
    held.longest = held.longest.max(hold);
    Some(held)
}

/// The check of what someone else's commits touched (`spots`, listed as `listed`): compared
/// and repaired in one hold of the planner's lock (it is a handful of objects).
fn spot_repair(
    shared: &Shared,
    family: IpFamily,
    listed: &plan::TableState,
    spots: &plan::Spots,
    snapshot: bool,
) -> Option<Held> {
    let mut guard = shared.lock_for_check();
    let locked = std::time::Instant::now();
    if guard.recover || guard.kernel.is_none() {
        guard.touched = None;
        return None;
    }
    let found = plan::Candidates::of_spots(listed, spots, &guard.planner);
    let mut held = Held {
        steps: 1,
        ..Held::default()
    };
    repair_and_apply(&mut guard, family, listed, found, snapshot, &mut held)?;
    held.total = locked.elapsed();
    held.longest = held.total;
    Some(held)
}

/// The end of a check, under the planner's lock: looks again at what the comparison found,
/// leaves out every owner a sync committed since the listing started, and applies the
/// repairs. `None` when there is no kernel connection.
fn repair_and_apply(
    inner: &mut Inner,
    family: IpFamily,
    listed: &plan::TableState,
    found: plan::Candidates,
    snapshot: bool,
    held: &mut Held,
) -> Option<()> {
    let touched = inner.touched.take().unwrap_or_default();
    let (plan, differences) = inner
        .planner
        .repair(listed, found, &touched, snapshot && touched.is_empty());
    held.differences = differences;
    let kernel = inner.kernel.as_mut()?;
    if differences > 0 {
        tracing::warn!(
            ?family,
            differences,
            objects = ?inner.planner.differed,
            "nftables check: the table differs from what kproxy wrote; repairing"
        );
        match apply_plan(kernel, &mut inner.planner, &plan) {
            Ok(a) => tracing::info!(?family, rules = a.writes, "nftables check: repaired"),
            Err(e) => {
                metrics().inc_sync_failures("nftables");
                tracing::error!(?family, error = %e, "nftables check: repair failed; the next sync reads the table back");
                inner.recover = true;
            }
        }
    }
    Some(())
}

/// How much nicer the check thread is while it lists the table.
const CHECK_NICER: i32 = 10;

/// Makes the calling thread [`CHECK_NICER`] nicer (Linux: a nice value per thread); its nice
/// value before, if it changed.
fn lower_priority() -> Option<i32> {
    let before = rustix::process::getpriority_process(Some(rustix::thread::gettid())).ok()?;
    let nicer = (before + CHECK_NICER).min(19);
    (nicer != before && set_thread_nice(nicer)).then_some(before)
}

/// Sets the calling thread's nice value; whether it was set. Going back to a lower value
/// needs CAP_SYS_NICE, which kproxy has as root.
fn set_thread_nice(nice: i32) -> bool {
    let tid = rustix::thread::gettid();
    match rustix::process::setpriority_process(Some(tid), nice) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(nice, error = %e, "nftables check: could not change the thread's priority");
            false
        }
    }
}

/// What a cold start would write for `cfg.family`, as `nft -f` input, for `kproxy render`.
/// Changes nothing.
pub async fn render(desired: &DesiredState, cfg: &ProxierConfig) -> Result<String> {
    let rcfg = config(cfg, desired).await?;
    let mut planner = Planner::new(cfg.family);
    let plan = planner.plan(desired, &ChangeSet::full(), &rcfg);
    Ok(apply::plan_text(&plan, cfg.family))
}

/// Removes both families' `kproxy` tables, over netlink.
pub async fn cleanup() -> Result<()> {
    for family in [IpFamily::V4, IpFamily::V6] {
        if apply::delete_table(family).await? {
            tracing::info!(table = names::TABLE, ?family, "deleted the nftables table");
        }
    }
    Ok(())
}

impl Dataplane for NftablesProxier {
    fn mode(&self) -> &'static str {
        "nftables"
    }

    fn sync<'a>(&'a mut self, desired: &'a DesiredState, changes: &'a ChangeSet) -> BoxFuture<'a, Result<SyncStats>> {
        Box::pin(async move {
            let reuse = !changes.full
                && !matches!(
                    self.cfg.nodeport_addresses,
                    super::iptables::NodePortAddresses::Cidrs(_)
                )
                && self.rcfg.as_ref().is_some_and(|(node, _)| *node == desired.node);
            let cfg = match self.rcfg.take() {
                Some((node, cfg)) if reuse => (node, cfg),
                _ => (desired.node.clone(), config(&self.cfg, desired).await?),
            };
            let result = self.sync_locked(desired, changes, &cfg.1);
            self.rcfg = Some(cfg);
            let (stats, check) = result?;
            if let Some(whole) = check {
                self.start_check(whole);
            }
            self.clean_conntrack(desired, changes).await;
            Ok(stats)
        })
    }

    fn cleanup(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(cleanup())
    }

    /// The periodic sync asks the ruleset generation whether anyone else committed (O(1)),
    /// and if so, nf_tables' notifications whether any of it touched kproxy's table
    /// ([`monitor`]); only then (or when notifications were lost), and every hour as
    /// kube-proxy's full sync, is the table listed and compared. Listing is not cheap at
    /// scale: the kernel restarts its walk of a hash set for every message of a dump, about
    /// 1 to 3 s of kernel CPU at 10,000 Services.
    fn full_sync_period(&self) -> Option<std::time::Duration> {
        Some(full_check_period())
    }

    /// Someone else's commit into the table starts a check of what it touched (of the whole
    /// table when the notifications cannot say), with no full sync: the answer is then no.
    fn drifted(&mut self) -> BoxFuture<'_, bool> {
        let family = self.cfg.family;
        let mut inner = self.inner.lock_for_sync();
        let mut check = false;
        let answer = if inner.recover {
            true
        } else {
            match inner.kernel.as_mut().map(Kernel::changed_by_others) {
                Some(Ok(None)) => false,
                Some(Ok(Some(why))) => {
                    tracing::info!(
                        ?family,
                        why,
                        "nftables: kproxy's table may have changed behind its back; checking it"
                    );
                    check = true;
                    false
                }
                Some(Err(e)) => {
                    tracing::warn!(?family, error = %e, "nftables: cannot read the ruleset generation; checking the table");
                    true
                }
                None => true,
            }
        };
        drop(inner);
        if check {
            self.start_check(false);
        }
        Box::pin(async move { answer })
    }
}

/// The longest nftables mode goes without listing its table to compare it with what it
/// committed, when the ruleset generation shows no other writer (kube-proxy's full sync period).
pub const FULL_CHECK_PERIOD: std::time::Duration = std::time::Duration::from_secs(3600);

/// [`FULL_CHECK_PERIOD`], or the seconds in `KPROXY_NFTABLES_FULL_CHECK_PERIOD` (for
/// benchmarks and diagnosis: kube-proxy has no flag for it).
fn full_check_period() -> std::time::Duration {
    static PERIOD: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *PERIOD.get_or_init(
        || match std::env::var("KPROXY_NFTABLES_FULL_CHECK_PERIOD").map(|v| v.trim().parse::<u64>()) {
            Ok(Ok(secs)) if secs > 0 => {
                tracing::info!(
                    secs,
                    "nftables: the whole table is checked every KPROXY_NFTABLES_FULL_CHECK_PERIOD seconds"
                );
                std::time::Duration::from_secs(secs)
            }
            Ok(_) => {
                tracing::warn!(
                    "KPROXY_NFTABLES_FULL_CHECK_PERIOD is not a positive number of seconds; checking hourly"
                );
                FULL_CHECK_PERIOD
            }
            Err(_) => FULL_CHECK_PERIOD,
        },
    )
}

#[cfg(test)]
mod tests;
