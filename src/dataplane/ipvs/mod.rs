//! IPVS mode: Services as IPVS virtual services in masquerade (NAT) mode, programmed over the
//! kernel's generic-netlink IPVS family, with service addresses bound to the dummy interface
//! `kube-ipvs0` and a small nftables table for what IPVS cannot do (see [`rules`]).
//!
//! [`plan`] is pure: desired virtual services from the model, and the requests that turn the
//! kernel's table into them; [`state`] keeps what was programmed. [`client`] and [`link`] talk
//! to the kernel; [`netlink`] encodes and decodes the messages. No `ipvsadm` or `ip` binary is used.
//!
//! A full sync (the first, the periodic `--ipvs-sync-period` one, and any after a failure)
//! reads the kernel's addresses, every virtual service and every real server, repairs what
//! differs, rewrites the nftables table, and keeps what it programmed. A partial sync plans
//! only the changed Services against that record and reads only the real servers of their
//! virtual services and of the draining ones: its cost follows the change, not the cluster.
//! Real servers that are no longer wanted are set to weight 0 and deleted once their TCP
//! connections are gone (or after `--ipvs-graceful-period`); UDP and SCTP ones at once, as
//! kube-proxy does.

pub mod client;
pub mod link;
pub mod netlink;
pub mod plan;
pub mod rules;
pub mod state;

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
use self::plan::{plan_desired, plan_requests, DesiredIpvs, Draining, KernelState, PlanConfig, Scope};
use self::rules::{render_element_changes, render_ruleset, RulesConfig};
use self::state::Committed;
use super::iptables::{local_detector, NodePortAddresses};
use super::{Dataplane, DataplaneError, Result, SyncStats};
use crate::config::{DetectLocal, IpvsConfig};
use crate::model::{ChangeSet, DesiredState, IpFamily, ServiceKey};

/// Virtual services whose real servers a full sync reads, compares and writes at a time.
pub const VS_PER_BATCH: usize = 500;

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
    /// What the last successful sync programmed; `None` until a full sync succeeds, and
    /// after any failure (the next sync is full and reads the kernel again).
    committed: Option<Committed>,
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
        scheduler: cfg.ipvs.scheduler.as_str().into(),
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
    let plan_cfg = plan_config(cfg, &link::node_addresses(&addresses, dummy), desired);
    let committed = Committed::new(plan_desired(desired, &plan_cfg), plan_cfg, 0);
    let rules: String = render_ruleset(&committed.ipvs, committed.hairpin_ips(), &rules_config(cfg, desired)).collect();
    Ok(format!(
        "# ipvsadm-restore\n{}# nft -f -\n{rules}",
        plan::render_save(&committed.ipvs),
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
            committed: None,
        })
    }

    /// Reads the kernel (addresses, every virtual service and its real servers), programs all
    /// of `desired`, repairs what drifted, and records what it programmed.
    ///
    /// What it holds besides the record it makes is bounded: the nft input is written in
    /// pieces, and the real servers are read, compared and written [`VS_PER_BATCH`] virtual
    /// services at a time (the kernel's real servers and the requests of 10,000 virtual
    /// services with 10 each were over 10 MiB held at once).
    async fn sync_full(&mut self, desired: &DesiredState) -> Result<SyncStats> {
        let family = self.cfg.family;
        let in_family = |ip: &IpAddr| IpFamily::of(ip) == family;
        let mut took = Phases::start();
        // The kernel is read anew: the old record would only double the peak.
        self.committed = None;
        let rtnl = Rtnl::connect()?;
        let dummy = rtnl.ensure_dummy().await?;
        let addresses = rtnl.addresses().await?;
        took.mark("list_addresses");
        let plan_cfg = plan_config(&self.cfg, &link::node_addresses(&addresses, Some(dummy)), desired);
        let want = plan_desired(desired, &plan_cfg);
        // The record is made before anything is written (its hairpin counts are the hairpin
        // set), and kept only once all of it is.
        let committed = Committed::new(want, plan_cfg, dummy);
        took.mark("plan_desired");

        let mut kernel = KernelState {
            local_addresses: addresses.iter().map(|(_, ip, _)| *ip).filter(in_family).collect(),
            ..KernelState::default()
        };
        for svc in self.client.services()? {
            if in_family(&svc.key.addr) {
                kernel.services.insert(svc.key, svc);
            }
        }
        took.mark("list_services");

        // Addresses first (a virtual service is only reached once its address is local), then
        // the rules that guard them, then IPVS, and stale addresses last.
        let bound: BTreeMap<IpAddr, u8> = addresses
            .iter()
            .filter(|(index, ip, _)| *index == dummy && in_family(ip))
            .map(|(_, ip, prefix)| (*ip, *prefix))
            .collect();
        drop(addresses);
        let want = &committed.ipvs;
        for ip in want.bound.keys().filter(|ip| !bound.contains_key(ip)) {
            rtnl.add_address(dummy, *ip).await?;
        }
        took.mark("bind");
        let rules = rules_config(&self.cfg, desired);
        nft_streamed(render_ruleset(want, committed.hairpin_ips(), &rules)).await?;
        took.mark("nft");

        let mut keys = plan::full_scope(want, &kernel, &committed.cfg).into_iter().peekable();
        let mut written = 0;
        let mut reading = std::time::Duration::ZERO;
        while keys.peek().is_some() {
            let batch: BTreeSet<VsKey> = keys.by_ref().take(VS_PER_BATCH).collect();
            let started = Instant::now();
            kernel.dests.clear();
            for key in batch.iter().filter(|key| kernel.services.contains_key(key)) {
                kernel.dests.insert(*key, self.client.dests(key)?);
            }
            reading += started.elapsed();
            let requests = plan_requests(
                want,
                &kernel,
                &Scope::Only(batch),
                &mut self.draining,
                Instant::now(),
                &committed.cfg,
            );
            self.execute(&requests)?;
            written += requests.len();
        }
        drop(kernel);
        took.mark("ipvs");
        took.part("of_it_list_real_servers", reading);
        for (ip, prefix) in bound.iter().filter(|(ip, _)| !want.bound.contains_key(ip)) {
            rtnl.del_address(dummy, *ip, *prefix).await?;
        }
        took.mark("unbind");
        self.log_draining();
        let stats = sync_stats(want, written);
        self.committed = Some(committed);
        took.log(family, true, written);
        Ok(stats)
    }

    /// Programs the changed Services only, against the record of the last sync: reads the real
    /// servers of their virtual services (and of those draining), nothing else.
    async fn sync_partial(&mut self, desired: &DesiredState, changed: &BTreeSet<ServiceKey>) -> Result<SyncStats> {
        let family = self.cfg.family;
        let Some(committed) = self.committed.as_ref() else {
            return self.sync_full(desired).await;
        };
        let mut took = Phases::start();
        let change = committed.plan_change(desired, changed, &self.draining);
        let mut dests = BTreeMap::new();
        for key in committed.existing(&change) {
            dests.insert(*key, self.client.dests(key)?);
        }
        took.mark("list_real_servers");
        let kernel = committed.kernel_view(&change, dests);
        let requests = plan_requests(
            &change.want,
            &kernel,
            &Scope::Only(change.scope.clone()),
            &mut self.draining,
            Instant::now(),
            &committed.cfg,
        );
        drop(kernel);
        let edits = committed.edits(&change);
        took.mark("plan");

        let dummy = committed.dummy;
        let rtnl = if edits.bind.is_empty() && edits.unbind.is_empty() {
            None
        } else {
            Some(Rtnl::connect()?)
        };
        if let Some(rtnl) = &rtnl {
            for ip in &edits.bind {
                rtnl.add_address(dummy, *ip).await?;
            }
        }
        if edits.touches_rules() {
            let text = render_element_changes(family, &edits.delete_elements, &edits.add_elements);
            nft(&["-f", "-"], Some(&text)).await?;
        }
        took.mark("nft");
        self.execute(&requests)?;
        self.log_draining();
        took.mark("ipvs");
        if let Some(rtnl) = &rtnl {
            for ip in &edits.unbind {
                let prefix = if ip.is_ipv4() { 32 } else { 128 };
                rtnl.del_address(dummy, *ip, prefix).await?;
            }
        }
        let Some(committed) = self.committed.as_mut() else {
            unreachable!("checked above")
        };
        committed.commit(change);
        let stats = sync_stats(&committed.ipvs, requests.len());
        took.log(family, false, requests.len());
        Ok(stats)
    }

    fn execute(&mut self, requests: &[Request]) -> Result<()> {
        for req in requests {
            tracing::trace!(family = ?self.cfg.family, "IPVS: {req}");
            self.client.execute(req)?;
        }
        Ok(())
    }

    fn log_draining(&self) {
        if self.draining.len() > 0 {
            tracing::debug!(real_servers = self.draining.len(), "waiting for real servers to drain");
        }
    }
}

/// What a sync reports: the requests it wrote, and what is programmed after it.
fn sync_stats(programmed: &DesiredIpvs, written: usize) -> SyncStats {
    SyncStats {
        rules_written: written,
        rules_total: vec![
            ("ipvs-services", programmed.services.len()),
            ("ipvs-real-servers", programmed.real_server_count()),
        ],
        no_local_endpoints: programmed.no_local_endpoints,
    }
}

/// How long each step of one sync took, for the debug log: where a slow sync spends its time.
struct Phases {
    last: Instant,
    steps: Vec<(&'static str, std::time::Duration)>,
}

impl Phases {
    fn start() -> Phases {
        Phases {
            last: Instant::now(),
            steps: Vec::new(),
        }
    }

    /// A part of the step just marked, measured apart.
    fn part(&mut self, step: &'static str, took: std::time::Duration) {
        self.steps.push((step, took));
    }

    fn mark(&mut self, step: &'static str) {
        let now = Instant::now();
        self.steps.push((step, now - self.last));
        self.last = now;
    }

    fn log(&self, family: IpFamily, full: bool, requests: usize) {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let steps: Vec<String> = self
                .steps
                .iter()
                .map(|(step, d)| format!("{step}={:.3}s", d.as_secs_f64()))
                .collect();
            tracing::debug!(?family, full, requests, "IPVS sync steps: {}", steps.join(" "));
        }
    }
}

impl Dataplane for IpvsProxier {
    fn mode(&self) -> &'static str {
        "ipvs"
    }

    fn sync<'a>(&'a mut self, desired: &'a DesiredState, changes: &'a ChangeSet) -> BoxFuture<'a, Result<SyncStats>> {
        Box::pin(async move {
            let result = if changes.full {
                self.sync_full(desired).await
            } else {
                self.sync_partial(desired, &changes.services).await
            };
            if result.is_err() {
                // What the kernel holds is unknown now: the next (full) sync reads it all again.
                self.committed = None;
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

/// `nft -f -` fed `pieces` one after the other, each dropped once written: nft reads its
/// whole input before it commits it as one transaction.
async fn nft_streamed(pieces: impl Iterator<Item = String> + Send) -> Result<()> {
    let command = "nft -f -".to_string();
    let mut child = nft_command(&["-f", "-"], true)?;
    if let Some(mut stdin) = child.stdin.take() {
        for piece in pieces {
            // A write error means nft exited early; its stderr says why.
            if stdin.write_all(piece.as_bytes()).await.is_err() {
                break;
            }
        }
    }
    nft_result(command, child).await.map(drop)
}

/// Runs `nft` with `args`, feeding `input` on stdin.
async fn nft(args: &[&str], input: Option<&str>) -> Result<String> {
    let command = format!("nft {}", args.join(" "));
    let mut child = nft_command(args, input.is_some())?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A write error means nft exited early; its stderr says why.
        let _ = stdin.write_all(text.as_bytes()).await;
    }
    nft_result(command, child).await
}

fn nft_command(args: &[&str], input: bool) -> Result<tokio::process::Child> {
    let command = format!("nft {}", args.join(" "));
    Command::new("nft")
        .args(args)
        .stdin(if input { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                DataplaneError::Unsupported("nft not found: IPVS mode needs nftables (the nft command)".into())
            } else {
                DataplaneError::Spawn { command, source }
            }
        })
}

/// Waits for an nft started by [`nft_command`] (its stdin taken and dropped): its output, or
/// its stderr as the error.
async fn nft_result(command: String, child: tokio::process::Child) -> Result<String> {
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
