//! iptables mode: kube-proxy's chain layout under kproxy's own `KPROXY-` prefix.
//!
//! [`Planner`] is pure: it plans one iptables-restore input per sync, for both tables, jumps
//! from the built-in chains included, and renders it line by line as the tool reads it.
//! [`apply`] runs the tools.

pub mod apply;
pub mod names;
pub mod native;
pub mod plan;
pub mod render;
#[cfg(test)]
pub mod tracer;

use std::net::IpAddr;

use futures::future::BoxFuture;
use ipnet::IpNet;

pub use self::plan::Planner;
use self::render::{LocalDetector, NodePortMatch, RenderConfig};
use super::conntrack::{delete_flows, plan_cleanup, udp_ports, UdpPorts};
use super::{Dataplane, Result, SyncStats};
use crate::config::DetectLocal;
use crate::model::{ChangeSet, DesiredState, IpFamily, NodeInfo};

/// Where NodePorts are served, as configured (`--nodeport-addresses`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Empty flag: every local address.
    All,
    /// `primary`: the node's addresses from its Node object.
    Primary,
    /// Local addresses inside these CIDRs.
    Cidrs(Vec<IpNet>),
}

/// Settings of the iptables proxier that do not change while it runs.
#[derive(Debug, Clone)]
pub struct ProxierConfig {
    pub family: IpFamily,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    pub detect_local: DetectLocal,
    pub nodeport_addresses: NodePortAddresses,
    /// `iptables.localhostNodePorts`, already narrowed to NodePorts on loopback addresses.
    pub localhost_nodeports: bool,
    /// Count into kube-proxy's nfacct counters (only once they exist: xt_nfacct refuses others).
    pub nfacct: bool,
    /// `--conntrack-tcp-be-liberal`: no ctstate INVALID drop rule.
    pub conntrack_tcp_liberal: bool,
}

/// The longest iptables mode goes without a full sync (kube-proxy's `FullSyncPeriod`): between
/// them, partial syncs trust the planner's record of what is in the kernel.
pub const FULL_SYNC_PERIOD: std::time::Duration = std::time::Duration::from_secs(3600);

/// The iptables (or ip6tables) dataplane for one IP family.
pub struct IptablesProxier {
    cfg: ProxierConfig,
    tools: apply::Tools,
    planner: Planner,
    /// UDP ports as last programmed, to find stale conntrack flows; `None` before the first sync
    /// (flows that predate this process are left alone).
    udp: Option<UdpPorts>,
    native: Native,
}

/// Whether partial syncs go through the native writer ([`native`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Native {
    /// Not decided yet: at the first partial sync, on if the tools are iptables-legacy.
    Detect,
    Off,
    /// Run this executable (kproxy itself) with the writer's subcommand.
    On(std::path::PathBuf),
}

/// Partial syncs that the native writer handed back to iptables-restore (an input it does not
/// encode), since start.
static NATIVE_FALLBACKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl IptablesProxier {
    pub fn new(cfg: ProxierConfig) -> Self {
        IptablesProxier {
            tools: apply::Tools::for_family(cfg.family),
            cfg,
            planner: Planner::new(),
            udp: None,
            native: Native::Detect,
        }
    }

    /// The proxier running `tools` instead of the family's defaults.
    pub fn with_tools(cfg: ProxierConfig, tools: apply::Tools) -> Self {
        IptablesProxier {
            tools,
            native: Native::Off,
            ..IptablesProxier::new(cfg)
        }
    }

    /// Partial syncs through the native writer, run as `exe` (a kproxy binary), whatever the
    /// backend (tests).
    pub fn with_native(mut self, exe: std::path::PathBuf) -> Self {
        self.native = Native::On(exe);
        self
    }

    /// The native writer's executable, deciding once: on for the legacy backend unless
    /// `KPROXY_IPTABLES_NATIVE=0`. iptables-nft's tables are not the legacy ones it writes.
    async fn native_writer(&mut self) -> Option<std::path::PathBuf> {
        if self.native == Native::Detect {
            let off = std::env::var("KPROXY_IPTABLES_NATIVE").is_ok_and(|v| v == "0" || v == "false");
            let legacy = !off && self.tools.is_legacy().await;
            // /proc/self/exe runs this very binary even after an upgrade replaced the file.
            self.native = if legacy {
                Native::On("/proc/self/exe".into())
            } else {
                Native::Off
            };
            tracing::info!(
                family = ?self.cfg.family,
                native = legacy,
                "iptables legacy backend: partial syncs of {} go through kproxy's native writer",
                if legacy { "the tables" } else { "nothing (disabled or not legacy)" }
            );
        }
        match &self.native {
            Native::On(exe) => Some(exe.clone()),
            _ => None,
        }
    }
}

/// The local-traffic detector for one family; NodeCIDR mode follows the Node's podCIDRs.
pub fn local_detector(detect: &DetectLocal, family: IpFamily, node: &NodeInfo) -> LocalDetector {
    let of_family = |nets: &[IpNet]| nets.iter().find(|n| IpFamily::of(&n.addr()) == family).copied();
    match detect {
        DetectLocal::None => LocalDetector::None,
        DetectLocal::ClusterCidr(cidrs) => of_family(cidrs).map_or(LocalDetector::None, LocalDetector::Cidr),
        DetectLocal::NodeCidr => of_family(&node.pod_cidrs).map_or(LocalDetector::None, LocalDetector::Cidr),
        DetectLocal::BridgeInterface(b) => LocalDetector::Bridge(b.clone()),
        DetectLocal::InterfaceNamePrefix(p) => LocalDetector::InterfacePrefix(p.clone()),
    }
}

/// Builds the render configuration for this sync; resolves NodePort addresses from the kernel
/// when `--nodeport-addresses` names CIDRs.
pub async fn render_config(cfg: &ProxierConfig, desired: &DesiredState) -> Result<RenderConfig> {
    let node = &desired.node;
    let nodeports = match &cfg.nodeport_addresses {
        NodePortAddresses::All => NodePortMatch::AllLocal,
        NodePortAddresses::Primary => NodePortMatch::Addresses(node.addresses.clone()),
        NodePortAddresses::Cidrs(cidrs) => {
            let mut ips: Vec<IpAddr> = apply::local_addresses()
                .await?
                .into_iter()
                .filter(|ip| cidrs.iter().any(|c| c.contains(ip)))
                .collect();
            ips.sort();
            ips.dedup();
            NodePortMatch::Addresses(ips)
        }
    };
    Ok(RenderConfig {
        family: cfg.family,
        masquerade_all: cfg.masquerade_all,
        masquerade_mark: 1u32 << cfg.masquerade_bit,
        local_detector: local_detector(&cfg.detect_local, cfg.family, node),
        nodeports,
        endpoint_comments: desired.endpoint_count() <= render::LARGE_CLUSTER_ENDPOINTS,
        localhost_nodeports: cfg.localhost_nodeports && cfg.family == IpFamily::V4,
        nfacct: cfg.nfacct,
        conntrack_tcp_liberal: cfg.conntrack_tcp_liberal,
    })
}

impl Dataplane for IptablesProxier {
    fn mode(&self) -> &'static str {
        "iptables"
    }

    fn sync<'a>(&'a mut self, desired: &'a DesiredState, changes: &'a ChangeSet) -> BoxFuture<'a, Result<SyncStats>> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            let cfg = render_config(&self.cfg, desired).await?;
            // Only a full sync looks at the kernel (one iptables-save per table, read as it
            // prints): partial syncs know from the planner what they wrote. The tools start
            // before planning, so that they load the tables while kproxy renders.
            let read = match self.planner.plans_full(changes, &cfg) {
                true => Some(self.tools.start_kernel_read()?),
                false => None,
            };
            let plan = self.planner.plan(desired, changes, &cfg);
            let planned = started.elapsed();
            if let Some(read) = read {
                let kernel = {
                    // The set of wanted chains is built only if the kernel shows one of
                    // kproxy's nat chains: on a node's first start it has none.
                    let planner = &self.planner;
                    let mut wanted = None;
                    let stray = |chain: &str| {
                        let wanted = wanted.get_or_insert_with(|| planner.wanted_nat_chains());
                        !wanted.contains(&plan::ChainName::new(chain))
                    };
                    self.tools.kernel_state(read, stray).await
                };
                match kernel {
                    Ok(kernel) => self.planner.adopt_kernel(&kernel),
                    Err(e) => {
                        self.planner.rollback();
                        return Err(e);
                    }
                }
            }
            let kernel_read = started.elapsed();
            if tracing::enabled!(tracing::Level::TRACE) {
                let input = self.planner.restore_input(desired).into_string();
                tracing::trace!(family = ?self.cfg.family, "iptables-restore input:\n{input}");
            }
            let mut times = apply::RestoreTimes::default();
            if !plan.empty {
                // Partial syncs through the native writer (legacy backend): it skips libiptc's
                // parse and re-layout of the whole table. Full syncs stay with iptables-restore.
                let native = match plan.full {
                    true => None,
                    false => self.native_writer().await,
                };
                let mut result = Err(apply::Refusal::Unsupported(String::new()));
                if let Some(exe) = native {
                    let mut input = self.planner.restore_input(desired);
                    result = self
                        .tools
                        .restore_native(&exe, self.cfg.family, |buf, limit| input.fill(buf, limit))
                        .await
                        .map(|(t, summary)| {
                            tracing::debug!(family = ?self.cfg.family, %summary, "iptables native writer");
                            t
                        });
                    if let Err(apply::Refusal::Unsupported(why)) = &result {
                        let n = NATIVE_FALLBACKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        tracing::debug!(family = ?self.cfg.family, fallbacks = n, "iptables native writer: {why}; iptables-restore writes this sync");
                    }
                }
                if matches!(result, Err(apply::Refusal::Unsupported(_))) {
                    let mut input = self.planner.restore_input(desired);
                    result = self.tools.restore(|buf, limit| input.fill(buf, limit)).await;
                }
                match result {
                    Ok(t) => times = t,
                    Err(refusal) => {
                        // The kernel kept its rules (each table is committed whole or not at all).
                        // The input is rendered again to quote the line the tool named.
                        let planner = &self.planner;
                        let err = refusal.into_error(|n| {
                            let (text, owner) = planner.restore_input(desired).line(n)?;
                            Some((text, owner.map(|k| k.to_string())))
                        });
                        self.planner.rollback();
                        return Err(err);
                    }
                }
            }
            self.planner.commit();
            let restored = started.elapsed();
            tracing::debug!(
                family = ?self.cfg.family,
                full = plan.full,
                rules_written = plan.rules_written,
                plan_ms = planned.as_millis() as u64,
                kernel_read_ms = (kernel_read - planned).as_millis() as u64,
                restore_ms = (restored - kernel_read).as_millis() as u64,
                render_ms = times.rendering.as_millis() as u64,
                write_wait_ms = times.writing.as_millis() as u64,
                commit_ms = times.committing.as_millis() as u64,
                "iptables sync steps"
            );
            if plan.full {
                // Put the canary back (or there for the first time) now that every rule is.
                if let Err(e) = self.tools.ensure_canary().await {
                    tracing::warn!(family = ?self.cfg.family, error = %e, "cannot create the canary chain {}; every periodic sync will be a full one", names::CANARY);
                }
            }
            crate::metrics::metrics().set_iptables_rules_last(plan.written.0, plan.written.1);
            let udp = udp_ports(desired, self.cfg.family);
            if let Some(old) = &self.udp {
                delete_flows(&plan_cleanup(old, &udp)).await;
            }
            self.udp = Some(udp);
            Ok(SyncStats {
                rules_written: plan.rules_written,
                rules_total: vec![("filter", plan.filter_rules), ("nat", plan.nat_rules)],
                no_local_endpoints: plan.no_local_endpoints,
            })
        })
    }

    fn cleanup(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.tools.cleanup().await })
    }

    /// A refused restore changes no table (each is committed whole), and the planner rolls
    /// back to what was committed before.
    fn partial_after_failure(&self) -> bool {
        true
    }

    /// kube-proxy v1.33's iptables mode: partial syncs on changes and on `--sync-period`, a
    /// full one every hour, and sooner when the canary chain is gone. kproxy also looks at nat
    /// KPROXY-SERVICES, where every Service starts: a flushed or deleted one is drift too
    /// (kube-proxy notices that only at its hourly sync).
    fn full_sync_period(&self) -> Option<std::time::Duration> {
        Some(FULL_SYNC_PERIOD)
    }

    fn drifted(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let family = self.cfg.family;
            let why = match self.tools.canary_present().await {
                Ok(true) if !self.planner.expects_nat_services_rules() => None,
                Ok(true) => match self.tools.chain_rules("nat", names::SERVICES).await {
                    Ok(Some(n)) if n > 0 => None,
                    Ok(_) => Some(format!("nat {} is empty or gone", names::SERVICES)),
                    Err(e) => Some(format!("cannot list nat {}: {e}", names::SERVICES)),
                },
                Ok(false) => Some(format!(
                    "the canary chain {} is gone (a firewall reload?)",
                    names::CANARY
                )),
                Err(e) => Some(format!("cannot look for the canary chain: {e}")),
            };
            match why {
                None => false,
                Some(why) => {
                    tracing::info!(?family, "{why}: the next sync is a full one");
                    true
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;
