//! Wiring: sources, store, sync loop, dataplane, health and metrics servers; and shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use crate::config::{Config, ProxyMode};
use crate::dataplane::iptables::{self, IptablesProxier, Planner, ProxierConfig};
use crate::dataplane::ipvs::{self, IpvsProxier};
use crate::dataplane::nftables::{self, NftablesProxier};
use crate::dataplane::{Dataplane, DataplaneError, PerFamily};
use crate::health::{self, ProxyHealth};
use crate::healthcheck::HealthCheckServer;
use crate::ingress;
use crate::model::store::Store;
use crate::model::{ChangeSet, DesiredState, IpFamily};
use crate::sync::{self, SharedState, SyncTiming};
use crate::watch::{kube as kube_source, manifests};

/// How often `--manifests` files are checked for changes.
const MANIFEST_POLL: Duration = Duration::from_millis(100);

fn proxier_config(config: &Config, family: IpFamily) -> ProxierConfig {
    ProxierConfig {
        family,
        masquerade_all: config.masquerade_all,
        masquerade_bit: config.masquerade_bit,
        detect_local: config.detect_local.clone(),
        nodeport_addresses: config.nodeport_addresses.clone(),
        localhost_nodeports: crate::node_setup::localhost_nodeports(config),
        nfacct: false,
        conntrack_tcp_liberal: config.kube.conntrack.tcp_be_liberal,
    }
}

/// kube-proxy's nfacct counters, created when the iptables proxier starts; without them (no
/// nfacct in the kernel) the rules do not count and the two metrics are absent, as upstream.
fn ensure_nfacct() -> bool {
    use crate::dataplane::nfacct;
    [nfacct::CT_STATE_INVALID_DROPPED, nfacct::LOCALHOST_NODEPORTS_ACCEPTED]
        .iter()
        .all(|name| match nfacct::ensure(name) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "nfacct counter unavailable; its metric will not be updated");
                false
            }
        })
}

/// The families this host can program: IPv4 always, IPv6 when ip6tables' nat table works.
async fn families() -> Vec<IpFamily> {
    let v6 = tokio::process::Command::new("ip6tables")
        .args(["-w", "5", "-t", "nat", "-S", "POSTROUTING"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    if v6 {
        vec![IpFamily::V4, IpFamily::V6]
    } else {
        tracing::info!("ip6tables nat table unavailable: IPv6 Services will not be proxied");
        vec![IpFamily::V4]
    }
}

async fn iptables_dataplane(config: &Config, nfacct: bool) -> Box<dyn Dataplane> {
    let dps: Vec<Box<dyn Dataplane>> = families()
        .await
        .into_iter()
        .map(|f| {
            let cfg = ProxierConfig {
                nfacct,
                ..proxier_config(config, f)
            };
            Box::new(IptablesProxier::new(cfg)) as Box<dyn Dataplane>
        })
        .collect();
    Box::new(PerFamily::new(ProxyMode::Iptables.as_str(), dps))
}

fn ipvs_proxier_config(config: &Config, family: IpFamily) -> ipvs::ProxierConfig {
    ipvs::ProxierConfig {
        family,
        ipvs: config.ipvs.clone(),
        masquerade_all: config.masquerade_all,
        masquerade_bit: config.masquerade_bit,
        detect_local: config.detect_local.clone(),
        nodeport_addresses: config.nodeport_addresses.clone(),
    }
}

/// IPVS mode for IPv4, and IPv6 when the host has it. Fails before programming anything when
/// the kernel lacks IPVS or nft is missing.
async fn ipvs_dataplane(config: &Config) -> anyhow::Result<Box<dyn Dataplane>> {
    let version = ipvs::prepare_kernel(&config.ipvs)
        .await
        .context("--proxy-mode ipvs cannot start")?;
    tracing::info!(version, scheduler = %config.ipvs.scheduler, "IPVS available");
    let mut families = vec![IpFamily::V4];
    if std::path::Path::new("/proc/net/if_inet6").exists() {
        families.push(IpFamily::V6);
    }
    let mut dps: Vec<Box<dyn Dataplane>> = Vec::new();
    for f in families {
        let dp = IpvsProxier::new(ipvs_proxier_config(config, f)).context("--proxy-mode ipvs cannot start")?;
        dps.push(Box::new(dp));
    }
    Ok(Box::new(PerFamily::new(ProxyMode::Ipvs.as_str(), dps)))
}

/// The families nftables mode programs: IPv4, and IPv6 when the host has it.
fn nftables_families() -> Vec<IpFamily> {
    let mut families = vec![IpFamily::V4];
    if std::path::Path::new("/proc/net/if_inet6").exists() {
        families.push(IpFamily::V6);
    }
    families
}

/// nftables mode, one `kproxy` table per family. Fails before programming anything when nft
/// is missing or the kernel does not answer it.
async fn nftables_dataplane(config: &Config) -> anyhow::Result<Box<dyn Dataplane>> {
    nftables::apply::check()
        .await
        .context("--proxy-mode nftables cannot start")?;
    let dps: Vec<Box<dyn Dataplane>> = nftables_families()
        .into_iter()
        .map(|f| Box::new(NftablesProxier::new(proxier_config(config, f))) as Box<dyn Dataplane>)
        .collect();
    Ok(Box::new(PerFamily::new(ProxyMode::Nftables.as_str(), dps)))
}

/// The families the dataplane programs, for the per-family status of `/healthz` and `/livez`.
async fn programmed_families(config: &Config) -> Vec<IpFamily> {
    match config.mode {
        ProxyMode::Iptables => families().await,
        ProxyMode::Ipvs | ProxyMode::Nftables => nftables_families(),
    }
}

async fn dataplane(config: &Config) -> anyhow::Result<Box<dyn Dataplane>> {
    match config.mode {
        ProxyMode::Iptables => Ok(iptables_dataplane(config, ensure_nfacct()).await),
        ProxyMode::Ipvs => ipvs_dataplane(config).await,
        ProxyMode::Nftables => nftables_dataplane(config).await,
    }
}

/// `--kube-api-qps`, `--kube-api-burst` (clientConnection.qps/burst).
fn api_limits(config: &Config) -> (f32, i32) {
    let c = &config.kube.client_connection;
    (c.qps, c.burst)
}

/// How often a health or metrics port that could not be bound is tried again (kube-proxy's).
const BIND_RETRY: Duration = Duration::from_secs(5);

/// A listener now, or one still to be bound.
enum Pending {
    Bound(tokio::net::TcpListener),
    Retry(std::net::SocketAddr, &'static str),
}

impl Pending {
    /// The listener, retrying the bind every [`BIND_RETRY`] until it works or shutdown.
    async fn resolve(self, shutdown: &watch::Receiver<bool>) -> Option<tokio::net::TcpListener> {
        let (addr, server) = match self {
            Pending::Bound(l) => return Some(l),
            Pending::Retry(addr, server) => (addr, server),
        };
        loop {
            if *shutdown.borrow() {
                return None;
            }
            tokio::time::sleep(BIND_RETRY).await;
            match health::bind(addr).await {
                Ok(l) => return Some(l),
                Err(e) => tracing::error!(server, error = %e, "cannot bind the {server} server; retrying"),
            }
        }
    }
}

/// kube-proxy's `--bind-address-hard-fail`: a port that cannot be bound is fatal with it, and
/// without it logged and retried while the proxy runs.
async fn bind_server(addr: std::net::SocketAddr, hard_fail: bool, server: &'static str) -> anyhow::Result<Pending> {
    match health::bind(addr).await {
        Ok(l) => Ok(Pending::Bound(l)),
        Err(e) if hard_fail => Err(e.into()),
        Err(e) => {
            tracing::error!(server, error = %e, "cannot bind the {server} server; retrying every 5s (--bind-address-hard-fail makes this fatal)");
            Ok(Pending::Retry(addr, server))
        }
    }
}

/// Turns SIGINT/SIGTERM into the shutdown signal.
fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("shutting down");
        let _ = tx.send(true);
        // Keep the sender alive so receivers see `true`, not a closed channel mid-shutdown.
        std::future::pending::<()>().await;
    });
    rx
}

/// Starts the sources that feed `state`.
async fn start_sources(
    config: &Config,
    state: &Arc<SharedState>,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<()> {
    match &config.manifests {
        Some(path) => {
            let source =
                manifests::ManifestSource::new(path.clone(), config.hostname.clone(), config.service_cluster_ip_range);
            tokio::spawn(manifests::run(state.clone(), source, MANIFEST_POLL, shutdown.clone()));
        }
        None => {
            let client = kube_source::client(
                config.kubeconfig.as_deref(),
                config.master.as_deref(),
                api_limits(config),
            )
            .await?;
            if config.ingress.enabled() {
                kube_source::spawn_ingress_watchers(client.clone(), state.clone(), shutdown.clone());
                ingress::gateway::watch::spawn_watchers(client.clone(), state.clone(), shutdown.clone());
            }
            kube_source::spawn_watchers(client, &config.hostname, state.clone(), shutdown.clone());
        }
    }
    Ok(())
}

/// Runs the proxy until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // The dataplane first: a mode the kernel cannot do fails before anything listens or syncs.
    let dataplane = dataplane(&config).await?;
    cleanup_other_modes(&config).await;
    let shutdown = shutdown_signal();
    let health = Arc::new(ProxyHealth::new(2 * config.sync_period));
    health.set_families(&programmed_families(&config).await);
    if let Some(addr) = config.healthz_bind {
        let listener = bind_server(addr, config.bind_address_hard_fail, "healthz").await?;
        let (health, shutdown) = (health.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Some(listener) = listener.resolve(&shutdown).await {
                let _ = health::serve_healthz_on(listener, health, shutdown).await;
            }
        });
    }
    if let Some(addr) = config.metrics_bind {
        let listener = bind_server(addr, config.bind_address_hard_fail, "metrics").await?;
        let (mode, shutdown) = (config.mode.as_str(), shutdown.clone());
        tokio::spawn(async move {
            if let Some(listener) = listener.resolve(&shutdown).await {
                let _ = health::serve_metrics_on(listener, mode, shutdown).await;
            }
        });
    }
    let health_checks = HealthCheckServer::new(health.clone());
    let mut store = Store::new(config.hostname.clone());
    store.set_ignore_external_ips(config.disable_external_ips);
    store.set_bind_address(config.bind_address);
    let state = SharedState::new(store, health);
    let ingress = if config.ingress.enabled() {
        Some(ingress::controller::start(&config.ingress, state.clone(), shutdown.clone()).await?)
    } else {
        None
    };
    start_sources(&config, &state, &shutdown).await?;
    let mut status_task = None;
    if let (Some(started), None) = (&ingress, &config.manifests) {
        let client = kube_source::client(
            config.kubeconfig.as_deref(),
            config.master.as_deref(),
            api_limits(&config),
        )
        .await?;
        let status = ingress::status::StatusConfig {
            address: config.ingress.status_address.clone(),
            namespace: std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "kube-system".into()),
            identity: config.hostname.clone(),
        };
        status_task = Some(tokio::spawn(ingress::status::run(
            client,
            status,
            state.clone(),
            started.routes.clone(),
            shutdown.clone(),
        )));
    }
    if !config.feature_gates.set.is_empty() {
        tracing::info!(gates = ?config.feature_gates.set, "feature gates set");
    }
    tracing::info!(
        node = %config.hostname,
        mode = config.mode.as_str(),
        source = if config.manifests.is_some() { "manifests" } else { "kubernetes API" },
        "kproxy started; programming nothing until Services, EndpointSlices and the Node are listed"
    );
    let timing = SyncTiming {
        min_interval: config.min_sync_period,
        sync_period: config.sync_period,
        retry_initial: Duration::from_secs(1),
    };
    sync::run(state, dataplane, timing, Some(health_checks), shutdown).await;
    // The Ingress listeners drain their in-flight requests (bounded by their drain timeout).
    for handle in ingress.map(|i| i.handles).unwrap_or_default() {
        let _ = handle.await;
    }
    // The status leader hands its Lease back (bounded: the API may be unreachable).
    if let Some(task) = status_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    Ok(())
}

/// Removes what the other modes left, as kube-proxy does when it starts: after a switch (from
/// iptables to nftables, say) the old mode's rules would still catch Service traffic and send it
/// to endpoints nobody updates. Each mode owns disjoint objects (`KPROXY-*` chains; IPVS virtual
/// services on `kube-ipvs0` and the `kproxy-ipvs` tables; the `kproxy` tables), so this never
/// touches the configured mode's. A failure is a warning: the configured mode does not need it.
async fn cleanup_other_modes(config: &Config) {
    let report = |mode: &str, result: Result<(), DataplaneError>| match result {
        Ok(()) => tracing::debug!(mode, "no leftovers of another mode, or removed"),
        Err(DataplaneError::Unsupported(why)) => tracing::debug!(mode, "nothing to clean up: {why}"),
        Err(e) => tracing::warn!(mode, error = %e, "removing another mode's leftovers failed"),
    };
    if config.mode != ProxyMode::Iptables {
        report("iptables", iptables_dataplane(config, false).await.cleanup().await);
    }
    if config.mode != ProxyMode::Ipvs {
        report("ipvs", ipvs::cleanup(&config.ipvs.exclude_cidrs).await);
    }
    if config.mode != ProxyMode::Nftables {
        report("nftables", nftables::cleanup().await);
    }
}

/// `--cleanup`: removes everything any mode of kproxy created. A mode whose tools or kernel
/// support are missing here cannot have left anything, unless it is the configured mode.
pub async fn cleanup(config: Config) -> anyhow::Result<()> {
    match iptables_dataplane(&config, false).await.cleanup().await {
        Ok(()) => tracing::info!("removed kproxy's iptables rules"),
        Err(DataplaneError::Unsupported(why)) if config.mode != ProxyMode::Iptables => {
            tracing::info!("skipping iptables cleanup: {why}")
        }
        Err(e) => return Err(e).context("iptables cleanup failed"),
    }
    ipvs::cleanup(&config.ipvs.exclude_cidrs)
        .await
        .context("IPVS cleanup failed")?;
    match nftables::cleanup().await {
        Ok(()) => {}
        Err(DataplaneError::Unsupported(why)) if config.mode != ProxyMode::Nftables => {
            tracing::info!("skipping nftables cleanup: {why}")
        }
        Err(e) => return Err(e).context("nftables cleanup failed"),
    }
    tracing::info!("removed kproxy's rules");
    Ok(())
}

/// Collects one complete desired state from the configured source.
async fn desired_once(config: &Config) -> anyhow::Result<DesiredState> {
    let health = Arc::new(ProxyHealth::new(2 * config.sync_period));
    let mut store = Store::new(config.hostname.clone());
    store.set_ignore_external_ips(config.disable_external_ips);
    store.set_bind_address(config.bind_address);
    let state = SharedState::new(store, health);
    match &config.manifests {
        Some(path) => {
            let mut source =
                manifests::ManifestSource::new(path.clone(), config.hostname.clone(), config.service_cluster_ip_range);
            source.refresh(&state)?;
        }
        None => {
            let (_tx, rx) = watch::channel(false);
            start_sources(config, &state, &rx).await?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while !state.is_ready() {
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "timed out listing from the API server"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    state.snapshot().context("no complete state")
}

/// `kproxy render`: prints what a full sync would apply.
pub async fn render(config: Config, output: &str) -> anyhow::Result<String> {
    let desired = desired_once(&config).await?;
    if output == "services" {
        return Ok(services_table(&desired));
    }
    let mut out = String::new();
    if config.mode == ProxyMode::Ipvs {
        for family in [IpFamily::V4, IpFamily::V6] {
            out.push_str(&ipvs::render(&desired, &ipvs_proxier_config(&config, family)).await?);
        }
        return Ok(out);
    }
    if config.mode == ProxyMode::Nftables {
        for family in [IpFamily::V4, IpFamily::V6] {
            out.push_str("# nft -f -\n");
            out.push_str(&nftables::render(&desired, &proxier_config(&config, family)).await?);
        }
        return Ok(out);
    }
    for family in [IpFamily::V4, IpFamily::V6] {
        let cfg = iptables::render_config(&proxier_config(&config, family), &desired).await?;
        let mut planner = Planner::new();
        planner.plan(&desired, &ChangeSet::full(), &cfg);
        let tool = if family == IpFamily::V4 {
            "iptables-restore"
        } else {
            "ip6tables-restore"
        };
        out.push_str(&format!("# {tool} --noflush\n"));
        out.push_str(&planner.restore_input(&desired).into_string());
    }
    Ok(out)
}

/// A `kubectl get svc`-like table of what is proxied (`kproxy render --output services`).
pub fn services_table(desired: &DesiredState) -> String {
    let mut rows = vec![[
        "NAMESPACE".to_string(),
        "NAME".into(),
        "CLUSTER-IP".into(),
        "EXTERNAL-IP".into(),
        "PORT(S)".into(),
        "ENDPOINTS".into(),
    ]];
    for (key, state) in &desired.services {
        let Some(first) = state.ports.first() else {
            continue;
        };
        let sp = &first.port;
        let ips = |v: &[std::net::IpAddr]| v.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        let mut external: Vec<std::net::IpAddr> = sp.external_ips().to_vec();
        external.extend(sp.load_balancer_ips());
        let ports = state
            .ports
            .iter()
            .map(|p| match p.port.node_port {
                Some(np) => format!(
                    "{}:{}/{}",
                    p.port.port,
                    np,
                    p.port.name.protocol.as_str().to_uppercase()
                ),
                None => format!("{}/{}", p.port.port, p.port.name.protocol.as_str().to_uppercase()),
            })
            .collect::<Vec<_>>()
            .join(",");
        let mut eps: Vec<String> = state
            .ports
            .iter()
            .flat_map(|p| p.endpoints.iter().filter(|e| e.ready()).map(|e| e.addr_string()))
            .collect();
        eps.dedup();
        rows.push([
            key.namespace.to_string(),
            key.name.to_string(),
            ips(&sp.cluster_ips),
            if external.is_empty() {
                "<none>".into()
            } else {
                ips(&external)
            },
            ports,
            if eps.is_empty() { "<none>".into() } else { eps.join(",") },
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}
