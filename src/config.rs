//! The effective configuration: kube-proxy's KubeProxyConfiguration file, overridden by flags.
//!
//! Unknown fields in the file are errors (as kube-proxy's strict decoding makes them); fields
//! kube-proxy has but kproxy does not implement are accepted and named in a warning.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::cli::Flags;
use crate::dataplane::iptables::NodePortAddresses;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value {value:?} for {field}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

fn invalid(field: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Parses a Go-style duration as kube-proxy writes them: `200ms`, `1s`, `1m30s`, `1h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        if num_end == 0 {
            return None;
        }
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_end..];
    }
    Some(Duration::from_secs_f64(total))
}

/// The proxy modes kproxy knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Iptables,
    Ipvs,
    Nftables,
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Iptables => "iptables",
            ProxyMode::Ipvs => "ipvs",
            ProxyMode::Nftables => "nftables",
        }
    }
}

/// The schedulers the kernel's IPVS offers (`ip_vs_<name>` modules).
pub const IPVS_SCHEDULERS: &[&str] = &[
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh", "fo", "ovf", "twos",
];

/// Settings of IPVS mode (`--ipvs-*` flags, the file's `ipvs:` section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsConfig {
    /// One of [`IPVS_SCHEDULERS`].
    pub scheduler: String,
    pub strict_arp: bool,
    /// Connection timeouts set in the kernel; zero leaves the kernel's value.
    pub tcp_timeout: Duration,
    pub tcpfin_timeout: Duration,
    pub udp_timeout: Duration,
    /// Virtual services on these addresses are never modified or deleted.
    pub exclude_cidrs: Vec<IpNet>,
    /// Upper bound on waiting for a removed real server to drain; zero waits until it has.
    pub graceful_period: Duration,
}

impl Default for IpvsConfig {
    fn default() -> Self {
        IpvsConfig {
            scheduler: "rr".into(),
            strict_arp: false,
            tcp_timeout: Duration::ZERO,
            tcpfin_timeout: Duration::ZERO,
            udp_timeout: Duration::ZERO,
            exclude_cidrs: vec![],
            graceful_period: Duration::ZERO,
        }
    }
}

/// `--detect-local-mode`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetectLocal {
    /// Nothing configured: no source-based masquerade decisions.
    None,
    ClusterCidr(Vec<IpNet>),
    NodeCidr,
    BridgeInterface(String),
    InterfaceNamePrefix(String),
}

/// Everything kproxy runs with, after defaults, the config file and flags.
#[derive(Debug, Clone)]
pub struct Config {
    pub kubeconfig: Option<PathBuf>,
    pub master: Option<String>,
    pub hostname: String,
    pub mode: ProxyMode,
    pub nodeport_addresses: NodePortAddresses,
    pub masquerade_all: bool,
    pub masquerade_bit: u8,
    pub detect_local: DetectLocal,
    pub healthz_bind: Option<SocketAddr>,
    pub metrics_bind: Option<SocketAddr>,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    pub manifests: Option<PathBuf>,
    pub service_cluster_ip_range: IpNet,
    pub disable_external_ips: bool,
    pub verbosity: u8,
    pub ipvs: IpvsConfig,
    pub ingress: IngressConfig,
}

/// The embedded Ingress proxy's settings (flags only: KubeProxyConfiguration has no such section).
#[derive(Debug, Clone)]
pub struct IngressConfig {
    /// `--ingress-http-bind-address`; `None` when disabled (empty value or `--disable-ingress`).
    pub http_bind: Option<SocketAddr>,
    /// `--ingress-https-bind-address`; `None` when disabled.
    pub https_bind: Option<SocketAddr>,
    /// `--ingress-class`.
    pub class: String,
    /// `--ingress-access-log`: one structured line per request at info.
    pub access_log: bool,
    /// `--ingress-status-address`: written to served Ingresses' status (else the node's address).
    pub status_address: Option<String>,
}

impl IngressConfig {
    pub fn enabled(&self) -> bool {
        self.http_bind.is_some() || self.https_bind.is_some()
    }

    fn from_flags(flags: &Flags) -> Result<IngressConfig> {
        let disabled = flags.disable_ingress;
        let bind = |field, raw: &Option<String>, default: &str| -> Result<Option<SocketAddr>> {
            if disabled {
                return Ok(None);
            }
            parse_bind(field, raw.as_deref().unwrap_or(default))
        };
        let class = flags.ingress_class.clone().unwrap_or_else(|| "kproxy".into());
        if class.trim().is_empty() {
            return Err(invalid("--ingress-class", &class, "must not be empty"));
        }
        Ok(IngressConfig {
            http_bind: bind(
                "--ingress-http-bind-address",
                &flags.ingress_http_bind_address,
                "0.0.0.0:80",
            )?,
            https_bind: bind(
                "--ingress-https-bind-address",
                &flags.ingress_https_bind_address,
                "0.0.0.0:443",
            )?,
            class,
            access_log: flags.ingress_access_log,
            status_address: flags.ingress_status_address.clone().filter(|a| !a.trim().is_empty()),
        })
    }
}

/// The subset of KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) kproxy reads.
/// Field names are checked separately by [`check_fields`], which knows every field kube-proxy
/// defines.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileConfig {
    api_version: Option<String>,
    kind: Option<String>,
    client_connection: Option<ClientConnection>,
    hostname_override: Option<String>,
    mode: Option<String>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    node_port_addresses: Option<Vec<String>>,
    iptables: Option<IptablesSection>,
    /// kube-proxy's `nftables` section has the same fields, read in nftables mode.
    nftables: Option<IptablesSection>,
    ipvs: Option<IpvsSection>,
    healthz_bind_address: Option<String>,
    metrics_bind_address: Option<String>,
    detect_local_mode: Option<String>,
    detect_local: Option<DetectLocalSection>,
    sync_period: Option<String>,
    min_sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientConnection {
    kubeconfig: Option<String>,
}

/// Top-level fields kproxy implements, and those kube-proxy has that kproxy accepts but ignores.
const FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "clientConnection",
    "hostnameOverride",
    "mode",
    "clusterCIDR",
    "nodePortAddresses",
    "iptables",
    "nftables",
    "ipvs",
    "healthzBindAddress",
    "metricsBindAddress",
    "detectLocalMode",
    "detectLocal",
    "syncPeriod",
    "minSyncPeriod",
];
const IGNORED_FIELDS: &[&str] = &[
    "bindAddress",
    "bindAddressHardFail",
    "configSyncPeriod",
    "conntrack",
    "enableProfiling",
    "featureGates",
    "logging",
    "oomScoreAdj",
    "portRange",
    "showHiddenMetricsForVersion",
    "winkernel",
    "udpIdleTimeout",
    "windowsRunAsService",
];
/// Fields of the sections kproxy reads: (section, implemented, ignored).
const SECTION_FIELDS: &[(&str, &[&str], &[&str])] = &[
    (
        "clientConnection",
        &["kubeconfig"],
        &["acceptContentTypes", "contentType", "qps", "burst"],
    ),
    (
        "iptables",
        &["masqueradeAll", "masqueradeBit", "minSyncPeriod", "syncPeriod"],
        &["localhostNodePorts"],
    ),
    (
        "nftables",
        &["masqueradeAll", "masqueradeBit", "minSyncPeriod", "syncPeriod"],
        &[],
    ),
    ("detectLocal", &["bridgeInterface", "interfaceNamePrefix"], &[]),
    (
        "ipvs",
        &[
            "excludeCIDRs",
            "minSyncPeriod",
            "scheduler",
            "strictARP",
            "syncPeriod",
            "tcpFinTimeout",
            "tcpTimeout",
            "udpTimeout",
        ],
        &[],
    ),
];

/// Rejects fields kube-proxy does not define (its strict decoding does the same) and returns
/// the ones kproxy ignores, to be named in a warning.
fn check_fields(doc: &serde_yaml::Mapping) -> std::result::Result<Vec<String>, String> {
    let mut ignored = Vec::new();
    for (key, value) in doc {
        let key = key.as_str().unwrap_or_default();
        if IGNORED_FIELDS.contains(&key) {
            ignored.push(key.to_string());
            continue;
        }
        if !FIELDS.contains(&key) {
            return Err(format!("unknown field {key:?}"));
        }
        let Some((_, known, skip)) = SECTION_FIELDS.iter().find(|(s, _, _)| *s == key) else {
            continue;
        };
        for (sub, _) in value.as_mapping().into_iter().flatten() {
            let sub = sub.as_str().unwrap_or_default();
            if skip.contains(&sub) {
                ignored.push(format!("{key}.{sub}"));
            } else if !known.contains(&sub) {
                return Err(format!("unknown field {key}.{sub:?}"));
            }
        }
    }
    Ok(ignored)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IptablesSection {
    masquerade_all: Option<bool>,
    masquerade_bit: Option<i32>,
    min_sync_period: Option<String>,
    sync_period: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IpvsSection {
    #[serde(rename = "excludeCIDRs")]
    exclude_cidrs: Option<Vec<String>>,
    min_sync_period: Option<String>,
    scheduler: Option<String>,
    #[serde(rename = "strictARP")]
    strict_arp: Option<bool>,
    sync_period: Option<String>,
    tcp_fin_timeout: Option<String>,
    tcp_timeout: Option<String>,
    udp_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DetectLocalSection {
    bridge_interface: Option<String>,
    interface_name_prefix: Option<String>,
}

impl FileConfig {
    fn read(path: &Path) -> Result<FileConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let parse_err = |message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let doc: serde_yaml::Mapping = serde_yaml::from_str(&text).map_err(|e| parse_err(e.to_string()))?;
        let ignored = check_fields(&doc).map_err(parse_err)?;
        if !ignored.is_empty() {
            tracing::warn!(
                fields = %ignored.join(", "),
                "config file {}: kube-proxy fields kproxy does not implement are ignored",
                path.display()
            );
        }
        let parsed: FileConfig =
            serde_yaml::from_value(serde_yaml::Value::Mapping(doc)).map_err(|e| parse_err(e.to_string()))?;
        if let Some(v) = parsed.api_version.as_deref() {
            if !v.starts_with("kubeproxy.config.k8s.io/") {
                return Err(ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: format!("apiVersion {v:?} is not kubeproxy.config.k8s.io"),
                });
            }
        }
        if let Some(k) = parsed.kind.as_deref() {
            if k != "KubeProxyConfiguration" {
                return Err(ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: format!("kind {k:?} is not KubeProxyConfiguration"),
                });
            }
        }
        Ok(parsed)
    }
}

fn pick<T>(flag: Option<T>, file: Option<T>) -> Option<T> {
    flag.or(file)
}

fn parse_cidrs(field: &'static str, raw: &str) -> Result<Vec<IpNet>> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|e| invalid(field, s, e.to_string()))
        })
        .collect()
}

fn parse_bind(field: &'static str, raw: &str) -> Result<Option<SocketAddr>> {
    if raw.trim().is_empty() {
        return Ok(None);
    }
    raw.trim()
        .parse::<SocketAddr>()
        .map(Some)
        .map_err(|_| invalid(field, raw, "expected host:port, e.g. 0.0.0.0:10256"))
}

fn parse_period(field: &'static str, raw: &str) -> Result<Duration> {
    parse_duration(raw).ok_or_else(|| invalid(field, raw, "expected a duration such as 200ms, 1s or 30s"))
}

/// The `--ipvs-*` flags over the file's `ipvs:` section (periods are read with the others).
fn ipvs_config(flags: &Flags, file: IpvsSection) -> Result<IpvsConfig> {
    let scheduler = pick(flags.ipvs_scheduler.clone(), file.scheduler)
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "rr".into());
    if !IPVS_SCHEDULERS.contains(&scheduler.as_str()) {
        return Err(invalid(
            "--ipvs-scheduler",
            &scheduler,
            format!("expected one of {}", IPVS_SCHEDULERS.join(", ")),
        ));
    }
    let timeout = |field: &'static str, flag: &Option<String>, file: Option<String>| -> Result<Duration> {
        match pick(flag.clone(), file) {
            Some(raw) => parse_period(field, &raw),
            None => Ok(Duration::ZERO),
        }
    };
    let exclude_cidrs = match &flags.ipvs_exclude_cidrs {
        Some(raw) => parse_cidrs("--ipvs-exclude-cidrs", raw)?,
        None => parse_cidrs(
            "--ipvs-exclude-cidrs",
            &file.exclude_cidrs.unwrap_or_default().join(","),
        )?,
    };
    Ok(IpvsConfig {
        scheduler,
        strict_arp: pick(flags.ipvs_strict_arp, file.strict_arp).unwrap_or(false),
        tcp_timeout: timeout("--ipvs-tcp-timeout", &flags.ipvs_tcp_timeout, file.tcp_timeout)?,
        tcpfin_timeout: timeout(
            "--ipvs-tcpfin-timeout",
            &flags.ipvs_tcpfin_timeout,
            file.tcp_fin_timeout,
        )?,
        udp_timeout: timeout("--ipvs-udp-timeout", &flags.ipvs_udp_timeout, file.udp_timeout)?,
        exclude_cidrs,
        graceful_period: timeout("--ipvs-graceful-period", &flags.ipvs_graceful_period, None)?,
    })
}

fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_else(|_| "localhost".into())
}

impl Config {
    /// Builds the configuration from flags and, if given, the `--config` file.
    pub fn load(flags: &Flags) -> Result<Config> {
        let file = match &flags.config {
            Some(path) => FileConfig::read(path)?,
            None => FileConfig::default(),
        };
        let ipt = file.iptables.unwrap_or_default();
        let ipvs_file = file.ipvs.unwrap_or_default();

        let mode_raw = pick(flags.proxy_mode.clone(), file.mode).unwrap_or_default();
        let mode = match mode_raw.as_str() {
            "" | "iptables" => ProxyMode::Iptables,
            "ipvs" => ProxyMode::Ipvs,
            "nftables" => ProxyMode::Nftables,
            _ => {
                return Err(invalid(
                    "--proxy-mode",
                    &mode_raw,
                    "expected iptables, ipvs or nftables",
                ))
            }
        };
        // nftables mode reads its own section, with the iptables section's fields.
        let ipt = match mode {
            ProxyMode::Nftables => file.nftables.unwrap_or_default(),
            _ => ipt,
        };

        let cluster_cidrs = match pick(flags.cluster_cidr.clone(), file.cluster_cidr) {
            Some(raw) => parse_cidrs("--cluster-cidr", &raw)?,
            None => vec![],
        };
        let nodeport_raw: Vec<String> = match &flags.nodeport_addresses {
            Some(raw) => raw
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            None => file.node_port_addresses.unwrap_or_default(),
        };
        let nodeport_addresses = if nodeport_raw.is_empty() {
            NodePortAddresses::All
        } else if nodeport_raw == ["primary"] {
            NodePortAddresses::Primary
        } else {
            NodePortAddresses::Cidrs(parse_cidrs("--nodeport-addresses", &nodeport_raw.join(","))?)
        };

        let masquerade_bit = match flags.iptables_masquerade_bit.map(i32::from).or(ipt.masquerade_bit) {
            None => 14,
            Some(b) if (0..=31).contains(&b) => b as u8,
            Some(b) => {
                return Err(invalid(
                    "--iptables-masquerade-bit",
                    &b.to_string(),
                    "must be within 0-31",
                ))
            }
        };

        let dl_section = file.detect_local.unwrap_or_default();
        let detect_mode = pick(flags.detect_local_mode.clone(), file.detect_local_mode).unwrap_or_default();
        let detect_local = match detect_mode.as_str() {
            "" if cluster_cidrs.is_empty() => DetectLocal::None,
            "" | "ClusterCIDR" => {
                if cluster_cidrs.is_empty() {
                    return Err(invalid(
                        "--detect-local-mode",
                        &detect_mode,
                        "ClusterCIDR needs --cluster-cidr",
                    ));
                }
                DetectLocal::ClusterCidr(cluster_cidrs.clone())
            }
            "NodeCIDR" => DetectLocal::NodeCidr,
            "BridgeInterface" => match pick(flags.pod_bridge_interface.clone(), dl_section.bridge_interface) {
                Some(b) if !b.is_empty() => DetectLocal::BridgeInterface(b),
                _ => {
                    return Err(invalid(
                        "--detect-local-mode",
                        &detect_mode,
                        "BridgeInterface needs --pod-bridge-interface",
                    ))
                }
            },
            "InterfaceNamePrefix" => match pick(
                flags.pod_interface_name_prefix.clone(),
                dl_section.interface_name_prefix,
            ) {
                Some(p) if !p.is_empty() => DetectLocal::InterfaceNamePrefix(p),
                _ => {
                    return Err(invalid(
                        "--detect-local-mode",
                        &detect_mode,
                        "InterfaceNamePrefix needs --pod-interface-name-prefix",
                    ))
                }
            },
            other => {
                return Err(invalid(
                    "--detect-local-mode",
                    other,
                    "expected ClusterCIDR, NodeCIDR, BridgeInterface or InterfaceNamePrefix",
                ))
            }
        };

        let healthz_bind = parse_bind(
            "--healthz-bind-address",
            &pick(flags.healthz_bind_address.clone(), file.healthz_bind_address)
                .unwrap_or_else(|| "0.0.0.0:10256".into()),
        )?;
        let metrics_bind = parse_bind(
            "--metrics-bind-address",
            &pick(flags.metrics_bind_address.clone(), file.metrics_bind_address)
                .unwrap_or_else(|| "127.0.0.1:10249".into()),
        )?;
        // Each mode reads its own section's periods, as kube-proxy does; the generic ones fill in.
        let (mode_min, mode_sync) = match mode {
            ProxyMode::Iptables | ProxyMode::Nftables => (ipt.min_sync_period, ipt.sync_period),
            ProxyMode::Ipvs => (
                flags.ipvs_min_sync_period.clone().or(ipvs_file.min_sync_period.clone()),
                flags.ipvs_sync_period.clone().or(ipvs_file.sync_period.clone()),
            ),
        };
        let min_sync_period = parse_period(
            "--min-sync-period",
            &match mode {
                ProxyMode::Iptables | ProxyMode::Nftables => {
                    pick(flags.min_sync_period.clone(), mode_min.or(file.min_sync_period))
                }
                ProxyMode::Ipvs => mode_min.or(flags.min_sync_period.clone()).or(file.min_sync_period),
            }
            .unwrap_or_else(|| "1s".into()),
        )?;
        let sync_period = parse_period(
            "--sync-period",
            &match mode {
                ProxyMode::Iptables | ProxyMode::Nftables => {
                    pick(flags.sync_period.clone(), mode_sync.or(file.sync_period))
                }
                ProxyMode::Ipvs => mode_sync.or(flags.sync_period.clone()).or(file.sync_period),
            }
            .unwrap_or_else(|| "30s".into()),
        )?;
        let ipvs = ipvs_config(flags, ipvs_file)?;
        if sync_period.is_zero() {
            return Err(invalid("--sync-period", "0", "must be greater than 0"));
        }
        if min_sync_period > sync_period {
            return Err(invalid(
                "--min-sync-period",
                &format!("{min_sync_period:?}"),
                format!("must not exceed --sync-period ({sync_period:?})"),
            ));
        }
        let hostname = pick(flags.hostname_override.clone(), file.hostname_override)
            .map(|h| h.trim().to_lowercase())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(default_hostname);
        let range_raw = flags
            .service_cluster_ip_range
            .clone()
            .unwrap_or_else(|| "10.96.0.0/12".into());
        let service_cluster_ip_range = range_raw
            .parse::<IpNet>()
            .map_err(|e| invalid("--service-cluster-ip-range", &range_raw, e.to_string()))?
            .trunc();
        Ok(Config {
            kubeconfig: flags.kubeconfig.clone().or_else(|| {
                file.client_connection
                    .and_then(|c| c.kubeconfig)
                    .filter(|k| !k.is_empty())
                    .map(PathBuf::from)
            }),
            master: flags.master.clone(),
            hostname,
            mode,
            nodeport_addresses,
            masquerade_all: pick(flags.masquerade_all, ipt.masquerade_all).unwrap_or(false),
            masquerade_bit,
            detect_local,
            healthz_bind,
            metrics_bind,
            min_sync_period,
            sync_period,
            manifests: flags.manifests.clone(),
            service_cluster_ip_range,
            disable_external_ips: flags.disable_external_ips,
            verbosity: flags.verbosity.unwrap_or(0),
            ipvs,
            ingress: IngressConfig::from_flags(flags)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_kube_proxy_writes_them() {
        assert_eq!(parse_duration("200ms"), Some(Duration::from_millis(200)));
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        for bad in ["", "10", "1x", "s", "-1s", "1s2"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn defaults() {
        let c = Config::load(&Flags::default()).unwrap();
        assert_eq!(c.mode, ProxyMode::Iptables);
        assert_eq!(c.min_sync_period, Duration::from_secs(1));
        assert_eq!(c.sync_period, Duration::from_secs(30));
        assert_eq!(c.healthz_bind, Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(c.metrics_bind, Some("127.0.0.1:10249".parse().unwrap()));
        assert_eq!(c.masquerade_bit, 14);
        assert_eq!(c.nodeport_addresses, NodePortAddresses::All);
        assert_eq!(c.detect_local, DetectLocal::None);
    }

    fn write_config(text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("kproxy-config-test-{}-{}.yaml", std::process::id(), text.len()));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn file_then_flags_override() {
        let path = write_config(
            r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: 10.244.0.0/16
clientConnection: {kubeconfig: /var/lib/kproxy/kubeconfig.conf, qps: 5}
iptables: {masqueradeAll: true, minSyncPeriod: 200ms, syncPeriod: 10s}
nodePortAddresses: [192.168.0.0/16]
conntrack: {maxPerCore: 32768}
"#,
        );
        let flags = Flags {
            config: Some(path.clone()),
            sync_period: Some("20s".into()),
            ..Flags::default()
        };
        let c = Config::load(&flags).unwrap();
        std::fs::remove_file(path).ok();
        assert!(c.masquerade_all);
        assert_eq!(c.min_sync_period, Duration::from_millis(200));
        assert_eq!(c.sync_period, Duration::from_secs(20), "the flag wins");
        assert_eq!(c.kubeconfig, Some(PathBuf::from("/var/lib/kproxy/kubeconfig.conf")));
        assert_eq!(
            c.detect_local,
            DetectLocal::ClusterCidr(vec!["10.244.0.0/16".parse().unwrap()])
        );
        assert!(matches!(c.nodeport_addresses, NodePortAddresses::Cidrs(ref v) if v.len() == 1));
    }

    #[test]
    fn ingress_listeners_default_and_turn_off() {
        let c = Config::load(&Flags::default()).unwrap();
        assert_eq!(c.ingress.http_bind, Some("0.0.0.0:80".parse().unwrap()));
        assert_eq!(c.ingress.https_bind, Some("0.0.0.0:443".parse().unwrap()));
        assert_eq!(c.ingress.class, "kproxy");
        assert!(c.ingress.enabled() && !c.ingress.access_log);
        let c = Config::load(&Flags {
            ingress_http_bind_address: Some(String::new()),
            ingress_https_bind_address: Some("127.0.0.1:8443".into()),
            ingress_class: Some("nginx".into()),
            ..Flags::default()
        })
        .unwrap();
        assert_eq!(
            (c.ingress.http_bind, c.ingress.https_bind),
            (None, Some("127.0.0.1:8443".parse().unwrap()))
        );
        assert_eq!(c.ingress.class, "nginx");
        let c = Config::load(&Flags {
            disable_ingress: true,
            ..Flags::default()
        })
        .unwrap();
        assert!(!c.ingress.enabled());
        assert!(Config::load(&Flags {
            ingress_http_bind_address: Some("nope".into()),
            ..Flags::default()
        })
        .is_err());
    }

    #[test]
    fn unknown_field_is_an_error_naming_it() {
        let path = write_config("kind: KubeProxyConfiguration\nbogusField: 1\n");
        let err = Config::load(&Flags {
            config: Some(path.clone()),
            ..Flags::default()
        })
        .unwrap_err();
        std::fs::remove_file(path).ok();
        assert!(err.to_string().contains("bogusField"), "{err}");
    }

    #[test]
    fn nftables_mode_reads_its_own_section() {
        let path = write_config(
            r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
iptables: {masqueradeAll: false, syncPeriod: 50s}
nftables: {masqueradeAll: true, masqueradeBit: 12, syncPeriod: 20s, minSyncPeriod: 2s}
"#,
        );
        let c = Config::load(&Flags {
            config: Some(path.clone()),
            ..Flags::default()
        })
        .unwrap();
        std::fs::remove_file(path).ok();
        assert_eq!(c.mode, ProxyMode::Nftables);
        assert!(c.masquerade_all);
        assert_eq!(c.masquerade_bit, 12);
        assert_eq!(c.sync_period, Duration::from_secs(20));
        assert_eq!(c.min_sync_period, Duration::from_secs(2));
        let flag = Config::load(&Flags {
            proxy_mode: Some("nftables".into()),
            ..Flags::default()
        })
        .unwrap();
        assert_eq!(flag.mode, ProxyMode::Nftables);
    }

    #[test]
    fn ipvs_flags_and_section() {
        let path = write_config(
            r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ipvs
syncPeriod: 40s
ipvs: {scheduler: wrr, strictARP: true, syncPeriod: 20s, minSyncPeriod: 2s, tcpTimeout: 15m, excludeCIDRs: [10.0.0.0/8]}
"#,
        );
        let flags = Flags {
            config: Some(path.clone()),
            ipvs_udp_timeout: Some("30s".into()),
            ipvs_graceful_period: Some("1m".into()),
            ..Flags::default()
        };
        let c = Config::load(&flags).unwrap();
        std::fs::remove_file(path).ok();
        assert_eq!(c.mode, ProxyMode::Ipvs);
        assert_eq!(
            c.sync_period,
            Duration::from_secs(20),
            "ipvs.syncPeriod wins in ipvs mode"
        );
        assert_eq!(c.min_sync_period, Duration::from_secs(2));
        assert_eq!(c.ipvs.scheduler, "wrr");
        assert!(c.ipvs.strict_arp);
        assert_eq!(c.ipvs.tcp_timeout, Duration::from_secs(900));
        assert_eq!(c.ipvs.tcpfin_timeout, Duration::ZERO);
        assert_eq!(c.ipvs.udp_timeout, Duration::from_secs(30));
        assert_eq!(c.ipvs.graceful_period, Duration::from_secs(60));
        assert_eq!(c.ipvs.exclude_cidrs, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);

        let c = Config::load(&Flags {
            proxy_mode: Some("ipvs".into()),
            ipvs_sync_period: Some("5s".into()),
            sync_period: Some("9s".into()),
            ..Flags::default()
        })
        .unwrap();
        assert_eq!(
            c.sync_period,
            Duration::from_secs(5),
            "--ipvs-sync-period over --sync-period"
        );
        assert_eq!(c.ipvs.scheduler, "rr");
    }

    #[test]
    fn unknown_ipvs_field_or_scheduler_is_an_error() {
        let path = write_config("kind: KubeProxyConfiguration\nipvs: {schedular: rr}\n");
        let err = Config::load(&Flags {
            config: Some(path.clone()),
            ..Flags::default()
        })
        .unwrap_err();
        std::fs::remove_file(path).ok();
        assert!(err.to_string().contains("schedular"), "{err}");
        let err = Config::load(&Flags {
            proxy_mode: Some("ipvs".into()),
            ipvs_scheduler: Some("fastest".into()),
            ..Flags::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("--ipvs-scheduler"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            Flags {
                min_sync_period: Some("fast".into()),
                ..Flags::default()
            },
            Flags {
                cluster_cidr: Some("10.0.0.0/33".into()),
                ..Flags::default()
            },
            Flags {
                healthz_bind_address: Some("nope".into()),
                ..Flags::default()
            },
            Flags {
                proxy_mode: Some("userspace".into()),
                ..Flags::default()
            },
            Flags {
                iptables_masquerade_bit: Some(40),
                ..Flags::default()
            },
        ];
        let fields = [
            "--min-sync-period",
            "--cluster-cidr",
            "--healthz-bind-address",
            "--proxy-mode",
            "--iptables-masquerade-bit",
        ];
        for (flags, field) in cases.iter().zip(fields) {
            let err = Config::load(flags).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }
}
