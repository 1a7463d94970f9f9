//! nftables mode: upstream kube-proxy's nftables layout in kproxy's own table, `kproxy`, one per
//! IP family (`ip kproxy`, `ip6 kproxy`).
//!
//! Service traffic is dispatched by verdict maps keyed by `address . protocol . port`
//! (`service-ips`, `service-nodeports`) to per-Service-port chains, which DNAT straight to an
//! endpoint picked by a cascade of `numgen random` rules (Services with session affinity
//! go through per-endpoint chains that record the client first). Hairpin traffic is masqueraded
//! after DNAT through one shared set. See `docs/nftables.md`. [`plan`] is pure; [`apply`] runs nft.

pub mod apply;
pub mod names;
pub mod netlink;
pub mod plan;
pub mod render;
pub mod rule;
pub mod socket;

use futures::future::BoxFuture;

use self::plan::{KernelObjects, Planner};
use super::conntrack::{delete_flows, plan_cleanup, udp_ports, UdpPorts};
use super::iptables::{render_config, ProxierConfig};
use super::{Dataplane, Result, SyncStats};
use crate::model::{ChangeSet, DesiredState, IpFamily};

/// The nftables dataplane for one IP family.
pub struct NftablesProxier {
    cfg: ProxierConfig,
    planner: Planner,
    /// After a refused transaction the table may hold something the planner cannot account for
    /// (an affinity set with another timeout, say): the next sync recreates it from nothing.
    recreate: bool,
    /// UDP ports as last programmed, to find stale conntrack flows; `None` before the first sync.
    udp: Option<UdpPorts>,
}

impl NftablesProxier {
    pub fn new(cfg: ProxierConfig) -> Self {
        NftablesProxier {
            cfg,
            planner: Planner::new(),
            recreate: false,
            udp: None,
        }
    }
}

/// What a full sync would apply for `cfg.family`, for `kproxy render`. Changes nothing.
pub async fn render(desired: &DesiredState, cfg: &ProxierConfig) -> Result<String> {
    let rcfg = render_config(cfg, desired).await?;
    Ok(Planner::new().plan(desired, &ChangeSet::full(), &rcfg, None).text)
}

/// Removes both families' `kproxy` tables. Succeeds without nft, where there can be none.
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
            let family = self.cfg.family;
            let cfg = render_config(&self.cfg, desired).await?;
            let recreate = self.recreate;
            let changes = if recreate { &ChangeSet::full() } else { changes };
            let kernel = match (changes.full, recreate) {
                (true, true) => Some(KernelObjects::default()),
                (true, false) => Some(apply::list(family).await?),
                (false, _) => None,
            };
            let plan = self.planner.plan(desired, changes, &cfg, kernel.as_ref());
            if !plan.text.is_empty() {
                let text = if recreate {
                    let t = format!("{} {}", render::words(family).family, names::TABLE);
                    format!("add table {t}\ndelete table {t}\n{}", plan.text)
                } else {
                    plan.text
                };
                tracing::debug!(?family, full = plan.full, "nft -f input:\n{text}");
                if let Err(e) = apply::apply(&text).await {
                    // The kernel kept its old table; the cache now describes one that is not there.
                    self.planner = Planner::new();
                    self.recreate = true;
                    return Err(e);
                }
            }
            self.recreate = false;
            let udp = udp_ports(desired, family);
            if let Some(old) = &self.udp {
                delete_flows(&plan_cleanup(old, &udp)).await;
            }
            self.udp = Some(udp);
            Ok(SyncStats {
                rules_written: plan.rules_written,
                rules_total: vec![("nftables", plan.rules_total)],
                no_local_endpoints: plan.no_local_endpoints,
            })
        })
    }

    fn cleanup(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(cleanup())
    }
}

#[cfg(test)]
mod tests;
