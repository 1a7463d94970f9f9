//! IPVS mode: Services as IPVS virtual services in masquerade (NAT) mode, programmed over the
//! kernel's generic-netlink IPVS family, with service addresses bound to the dummy interface
//! `kube-ipvs0` and a small nftables table for what IPVS cannot do (see [`rules`]).
//!
//! [`plan`] is pure: desired virtual services from the model, and the requests that turn the
//! kernel's table (read back every sync) into them. [`client`] and [`link`] talk to the kernel;
//! [`netlink`] encodes and decodes the messages. No `ipvsadm` or `ip` binary is used.
//!
//! A sync reads every virtual service, and the real servers of those it looks at: all of them on
//! a full sync, the changed Services' and the draining ones' on a partial sync. Real servers that
//! are no longer wanted are set to weight 0 and deleted once their TCP connections are gone (or
//! after `--ipvs-graceful-period`); UDP and SCTP ones at once, as kube-proxy does.

pub mod client;
pub mod link;
pub mod netlink;
pub mod plan;
pub mod rules;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Stdio;
use std::time::Instant;

use futures::future::BoxFuture;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use self::client::IpvsClient;
use self::link::Rtnl;
use self::netlink::{Request, VsKey};
use self::plan::{plan_desired, plan_requests, Draining, KernelState, PlanConfig, Scope};
use self::rules::{render_ruleset, RulesConfig};
use super::iptables::{local_detector, NodePortAddresses};
use super::{Dataplane, DataplaneError, Result, SyncStats};
use crate::config::{DetectLocal, IpvsConfig};
use crate::model::{ChangeSet, DesiredState, IpFamily, ServiceKey};

/// Settings of the IPVS proxier that do not change while it runs.
#[derive(Debug, Clone)]
pub struct ProxierConfig {
    pub family: IpFamily,
    pub ipvs: IpvsConfig,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    pub detect_local: DetectLocal,
    pub nodeport_addresses: NodePortAddresses,
}

/// The IPVS dataplane for one IP family.
pub struct IpvsProxier {
    cfg: ProxierConfig,
    client: IpvsClient,
    draining: Draining,
    /// Virtual services of each Service after the last successful sync.
    owners: BTreeMap<ServiceKey, BTreeSet<VsKey>>,
    /// The nft input last applied, to skip an unchanged table on partial syncs.
    last_rules: Option<String>,
}

/// Sysctls IPVS mode needs, as kube-proxy sets them.
const SYSCTLS: &[(&str, &str)] = &[
    // IPVS keeps conntrack entries, so the nftables masquerade sees its connections.
    ("net.ipv4.vs.conntrack", "1"),
    // Flows to a deleted real server are dropped at their next packet instead of hanging.
    ("net.ipv4.vs.expire_nodest_conn", "1"),
    // Persistence templates of weight-0 servers expire, so affinity does not pin draining pods.
    ("net.ipv4.vs.expire_quiescent_template", "1"),
    ("net.ipv4.ip_forward", "1"),
];

/// `--ipvs-strict-arp`: do not answer ARP for the service addresses on `kube-ipvs0`.
const STRICT_ARP: &[(&str, &str)] = &[
    ("net.ipv4.conf.all.arp_ignore", "1"),
    ("net.ipv4.conf.all.arp_announce", "2"),
];

/// Checks that this host can run IPVS mode and prepares it once, before anything is programmed:
/// the IPVS family exists, nft runs, the sysctls hold, the timeouts are set. Every error here
/// means the mode cannot work, so the caller exits.
pub async fn prepare_kernel(cfg: &IpvsConfig) -> Result<String> {
    let mut client = match IpvsClient::connect() {
        // As kube-proxy does: the module may just not be loaded yet.
        Err(DataplaneError::Unsupported(_)) if load_ip_vs().await => IpvsClient::connect()?,
        other => other?,
    };
    let version = client.version()?;
    nft(&["list", "tables"], None).await?;
    for (name, value) in SYSCTLS {
        link::ensure_sysctl(name, value)?;
    }
    if cfg.strict_arp {
        for (name, value) in STRICT_ARP {
            link::ensure_sysctl(name, value)?;
        }
    }
    let secs = |d: std::time::Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    let timeouts = Request::SetTimeouts {
        tcp: secs(cfg.tcp_timeout),
        tcp_fin: secs(cfg.tcpfin_timeout),
        udp: secs(cfg.udp_timeout),
    };
    if timeouts
        != (Request::SetTimeouts {
            tcp: 0,
            tcp_fin: 0,
            udp: 0,
        })
    {
        client.execute(&timeouts)?;
    }
    Ok(version)
}

fn plan_config(cfg: &ProxierConfig, node_addresses: &BTreeSet<IpAddr>, desired: &DesiredState) -> PlanConfig {
    PlanConfig {
        family: cfg.family,
        scheduler: cfg.ipvs.scheduler.clone(),
        nodeport_addresses: plan::nodeport_addresses(&cfg.nodeport_addresses, node_addresses, &desired.node)
            .into_iter()
            .filter(|ip| IpFamily::of(ip) == cfg.family)
            .collect(),
        exclude_cidrs: cfg.ipvs.exclude_cidrs.clone(),
        graceful_period: cfg.ipvs.graceful_period,
    }
}

/// What a full sync would program, for `kproxy render`: the virtual services in
/// `ipvsadm-save -n` form and the nft input. Reads this host's addresses, changes nothing.
pub async fn render(desired: &DesiredState, cfg: &ProxierConfig) -> Result<String> {
    let rtnl = Rtnl::connect()?;
    let dummy = rtnl.dummy_index().await?;
    let addresses = rtnl.addresses().await?;
    let want = plan_desired(
        desired,
        &plan_config(cfg, &link::node_addresses(&addresses, dummy), desired),
    );
    Ok(format!(
        "# ipvsadm-restore\n{}# nft -f -\n{}",
        plan::render_save(&want),
        render_ruleset(&want, &rules_config(cfg, desired))
    ))
}

fn rules_config(cfg: &ProxierConfig, desired: &DesiredState) -> RulesConfig {
    RulesConfig {
        family: cfg.family,
        masquerade_all: cfg.masquerade_all,
        masquerade_mark: 1u32 << cfg.masquerade_bit,
        local_detector: local_detector(&cfg.detect_local, cfg.family, &desired.node),
    }
}

impl IpvsProxier {
    /// Connects to the kernel's IPVS family; fails with [`DataplaneError::Unsupported`] without it.
    pub fn new(cfg: ProxierConfig) -> Result<Self> {
        Ok(IpvsProxier {
            client: IpvsClient::connect()?,
            cfg,
            draining: Draining::default(),
            owners: BTreeMap::new(),
            last_rules: None,
        })
    }

    async fn sync_inner(&mut self, desired: &DesiredState, changes: &ChangeSet) -> Result<SyncStats> {
        let family = self.cfg.family;
        let in_family = |ip: &IpAddr| IpFamily::of(ip) == family;
        let rtnl = Rtnl::connect()?;
        let dummy = rtnl.ensure_dummy().await?;
        let addresses = rtnl.addresses().await?;
        let plan_cfg = plan_config(&self.cfg, &link::node_addresses(&addresses, Some(dummy)), desired);
        let want = plan_desired(desired, &plan_cfg);

        let scope = if changes.full {
            Scope::Full
        } else {
            let new_owners = want.owners();
            let mut keys = self.draining.services();
            for svc in &changes.services {
                keys.extend(self.owners.get(svc).into_iter().flatten());
                keys.extend(new_owners.get(svc).into_iter().flatten());
            }
            Scope::Only(keys)
        };
        let mut kernel = KernelState {
            local_addresses: addresses.iter().map(|(_, ip, _)| *ip).filter(in_family).collect(),
            ..KernelState::default()
        };
        for svc in self.client.services()? {
            if in_family(&svc.key.addr) {
                kernel.services.insert(svc.key, svc);
            }
        }
        let inspect: Vec<VsKey> = match &scope {
            Scope::Full => kernel.services.keys().copied().collect(),
            Scope::Only(keys) => keys
                .iter()
                .filter(|k| kernel.services.contains_key(k))
                .copied()
                .collect(),
        };
        for key in inspect {
            let dests = self.client.dests(&key)?;
            kernel.dests.insert(key, dests);
        }
        let requests = plan_requests(&want, &kernel, &scope, &mut self.draining, Instant::now(), &plan_cfg);

        // Addresses first (a virtual service is only reached once its address is local), then
        // the rules that guard them, then IPVS, and stale addresses last.
        let bound: BTreeMap<IpAddr, u8> = addresses
            .iter()
            .filter(|(index, ip, _)| *index == dummy && in_family(ip))
            .map(|(_, ip, prefix)| (*ip, *prefix))
            .collect();
        for ip in want.bound.iter().filter(|ip| !bound.contains_key(ip)) {
            rtnl.add_address(dummy, *ip).await?;
        }
        let rules = render_ruleset(&want, &rules_config(&self.cfg, desired));
        if changes.full || self.last_rules.as_ref() != Some(&rules) {
            self.last_rules = None;
            nft(&["-f", "-"], Some(&rules)).await?;
            self.last_rules = Some(rules);
        }
        for req in &requests {
            tracing::debug!(family = ?family, "IPVS: {req}");
            self.client.execute(req)?;
        }
        for (ip, prefix) in bound.iter().filter(|(ip, _)| !want.bound.contains(ip)) {
            rtnl.del_address(dummy, *ip, *prefix).await?;
        }
        self.owners = want.owners();
        if self.draining.len() > 0 {
            tracing::debug!(real_servers = self.draining.len(), "waiting for real servers to drain");
        }
        Ok(SyncStats {
            rules_written: requests.len(),
            rules_total: vec![
                ("ipvs-services", want.services.len()),
                ("ipvs-real-servers", want.real_server_count()),
            ],
            no_local_endpoints: want.no_local_endpoints,
        })
    }
}

impl Dataplane for IpvsProxier {
    fn mode(&self) -> &'static str {
        "ipvs"
    }

    fn sync<'a>(&'a mut self, desired: &'a DesiredState, changes: &'a ChangeSet) -> BoxFuture<'a, Result<SyncStats>> {
        Box::pin(async move {
            let result = self.sync_inner(desired, changes).await;
            if result.is_err() {
                // What the kernel holds is unknown now: the next (full) sync reads it all again.
                self.last_rules = None;
            }
            result
        })
    }

    fn cleanup(&mut self) -> BoxFuture<'_, Result<()>> {
        let exclude = self.cfg.ipvs.exclude_cidrs.clone();
        Box::pin(async move { cleanup(&exclude).await })
    }
}

/// Removes what IPVS mode creates: virtual services on `kube-ipvs0`'s addresses (and, when
/// `kube-ipvs0` exists, those on the node's other addresses: the NodePorts), both families'
/// `kproxy-ipvs` tables, and `kube-ipvs0` itself. Succeeds on a kernel without IPVS or nft, where
/// there can be nothing of it; `exclude` (`--ipvs-exclude-cidrs`) is never touched.
pub async fn cleanup(exclude: &[ipnet::IpNet]) -> Result<()> {
    let rtnl = Rtnl::connect()?;
    let dummy = rtnl.dummy_index().await?;
    let addresses = rtnl.addresses().await?;
    let owned: BTreeSet<IpAddr> = match dummy {
        Some(_) => addresses.iter().map(|(_, ip, _)| *ip).collect(),
        None => BTreeSet::new(),
    };
    match IpvsClient::connect() {
        Ok(mut client) => {
            let mut deleted = 0;
            for svc in client.services()? {
                if plan::is_owned(&svc.key, &owned, exclude) {
                    client.execute(&Request::DelService(svc.key))?;
                    deleted += 1;
                }
            }
            if deleted > 0 {
                tracing::info!(services = deleted, "deleted IPVS virtual services");
            }
        }
        Err(DataplaneError::Unsupported(why)) => tracing::debug!("no IPVS to clean up: {why}"),
        Err(e) => return Err(e),
    }
    // Over netlink, so that the table goes even where nft is not installed.
    for family in [IpFamily::V4, IpFamily::V6] {
        match crate::dataplane::nftables::apply::delete_named_table(family, rules::TABLE) {
            Ok(true) => tracing::info!(table = rules::TABLE, ?family, "deleted the nftables table"),
            Ok(false) => {}
            Err(DataplaneError::Unsupported(why)) => {
                tracing::debug!("no nf_tables to clean up: {why}");
                break;
            }
            Err(e) => return Err(e),
        }
    }
    if rtnl.delete_dummy().await? {
        tracing::info!(interface = link::DUMMY, "deleted the dummy interface");
    }
    Ok(())
}

/// `modprobe ip_vs`; whether it succeeded. Without modprobe or the module this is simply false.
async fn load_ip_vs() -> bool {
    let loaded = Command::new("modprobe")
        .arg("ip_vs")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if loaded {
        tracing::info!("loaded the ip_vs kernel module");
    }
    loaded
}

/// Runs `nft` with `args`, feeding `input` on stdin.
async fn nft(args: &[&str], input: Option<&str>) -> Result<String> {
    let command = format!("nft {}", args.join(" "));
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                DataplaneError::Unsupported("nft not found: IPVS mode needs nftables (the nft command)".into())
            } else {
                DataplaneError::Spawn {
                    command: command.clone(),
                    source,
                }
            }
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A write error means nft exited early; its stderr says why.
        let _ = stdin.write_all(text.as_bytes()).await;
    }
    let out = child.wait_with_output().await.map_err(|source| DataplaneError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(DataplaneError::Command {
            command,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
