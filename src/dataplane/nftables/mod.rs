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
//! handles the kernel echoed. The periodic full sync compares state objects (cheap) and starts
//! a check on a thread of its own: it lists the table over netlink and repairs whatever
//! differs from what kproxy committed, without holding back the next sync.

pub mod apply;
pub mod command;
mod hairpin;
pub mod names;
pub mod netlink;
pub mod plan;
pub mod render;
pub mod rule;
pub mod socket;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures::future::BoxFuture;

use self::apply::{apply_plan, read_table, read_table_consistent, Kernel};
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

/// The nftables dataplane for one IP family.
pub struct NftablesProxier {
    cfg: ProxierConfig,
    inner: Arc<Mutex<Inner>>,
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
            inner: Arc::new(Mutex::new(Inner {
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

    /// Starts a check of the table on its own thread, unless one is running.
    fn start_check(&mut self) {
        if self.check.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let inner = self.inner.clone();
        let family = self.cfg.family;
        let spawned = std::thread::Builder::new()
            .name(format!("nft-check-{family:?}"))
            .spawn(move || check_table(&inner, family));
        match spawned {
            Ok(h) => self.check = Some(h),
            Err(e) => tracing::warn!(error = %e, "could not start the nftables check"),
        }
    }

    /// Programs `desired`; whether the table should be checked.
    fn sync_locked(
        &self,
        desired: &DesiredState,
        changes: &ChangeSet,
        cfg: &RenderConfig,
    ) -> Result<(SyncStats, bool)> {
        let family = self.cfg.family;
        let asked = std::time::Instant::now();
        let mut inner = lock(&self.inner);
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
        if let Some(t) = inner.touched.as_mut() {
            t.extend(applied.owners.iter().cloned());
        }
        let check = std::mem::take(&mut kernel.foreign_change) || (changes.full && !recovering);
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

/// The check: lists the table (no lock held), then compares it with what was committed and
/// repairs what differs. Commits made while it listed are not second-guessed.
fn check_table(inner: &Mutex<Inner>, family: IpFamily) {
    let mut sock = match NftSocket::connect() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "nftables check: no netlink socket");
            return;
        }
    };
    lock(inner).touched = Some(HashSet::new());
    let table = apply::table(family);
    let started = std::time::Instant::now();
    let listed = read_table(&mut sock, table);
    let listed_in = started.elapsed();
    let mut guard = lock(inner);
    let locked = std::time::Instant::now();
    let inner = &mut *guard;
    let touched = inner.touched.take().unwrap_or_default();
    let (state, snapshot) = match listed {
        Ok((state, _, snapshot)) => (state, snapshot),
        Err(e) => {
            tracing::warn!(error = %e, "nftables check: listing the table failed");
            return;
        }
    };
    if inner.recover {
        return; // the next sync reads the table back anyway
    }
    let Some(kernel) = inner.kernel.as_mut() else { return };
    let lock_wait = locked - started - listed_in;
    let (plan, differences) = inner.planner.reconcile(state, &touched, snapshot && touched.is_empty());
    if differences == 0 {
        let held = locked.elapsed();
        drop(guard);
        tracing::debug!(
            ?family,
            listed_ms = listed_in.as_secs_f64() * 1000.0,
            lock_wait_ms = lock_wait.as_secs_f64() * 1000.0,
            held_ms = held.as_secs_f64() * 1000.0,
            check_ms = started.elapsed().as_secs_f64() * 1000.0,
            "nftables check: table as committed"
        );
        return;
    }
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
            if check {
                self.start_check();
            }
            self.clean_conntrack(desired, changes).await;
            Ok(stats)
        })
    }

    fn cleanup(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(cleanup())
    }

    /// The periodic sync asks the ruleset generation whether anyone else committed (O(1));
    /// only then, and every hour as kube-proxy's full sync, is the table listed and compared.
    /// Listing is not cheap at scale: the kernel restarts its walk of a hash set for every
    /// message of a dump, about 3 s of kernel CPU at 10,000 Services.
    fn full_sync_period(&self) -> Option<std::time::Duration> {
        Some(FULL_CHECK_PERIOD)
    }

    fn drifted(&mut self) -> BoxFuture<'_, bool> {
        let family = self.cfg.family;
        let mut inner = lock(&self.inner);
        let answer = if inner.recover {
            true
        } else {
            match inner.kernel.as_mut().map(Kernel::changed_by_others) {
                Some(Ok(false)) => false,
                Some(Ok(true)) => {
                    tracing::info!(
                        ?family,
                        "nftables: someone else committed to nf_tables; checking the table"
                    );
                    true
                }
                Some(Err(e)) => {
                    tracing::warn!(?family, error = %e, "nftables: cannot read the ruleset generation; checking the table");
                    true
                }
                None => true,
            }
        };
        Box::pin(async move { answer })
    }
}

/// The longest nftables mode goes without listing its table to compare it with what it
/// committed, when the ruleset generation shows no other writer (kube-proxy's full sync period).
pub const FULL_CHECK_PERIOD: std::time::Duration = std::time::Duration::from_secs(3600);

#[cfg(test)]
mod tests;
