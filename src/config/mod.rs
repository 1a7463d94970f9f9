//! The effective configuration: kube-proxy v1.33's flags and KubeProxyConfiguration file,
//! resolved exactly as kube-proxy resolves them, then kproxy's own flags.
//!
//! kube-proxy's rule, followed here: without `--config`, flags override kube-proxy's defaults.
//! With `--config`, the file (defaulted: zero or absent fields take kube-proxy's defaults)
//! replaces every configuration flag, except the logging flags (`-v`, `--logging-format`, ...)
//! and `--hostname-override`, which win over the file; `--master`, `--cleanup`, `--init-only`
//! and `--write-config-to` are not configuration fields and always apply. Flags that the file
//! makes ignored are named in a warning. Every given flag is still parsed: a bad value is an
//! error even when the file replaces it, as pflag parses before kube-proxy reads the file.

mod duration;
pub mod features;
pub mod internal;
pub mod v1alpha1;
mod validation;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use duration::parse_go_duration;
pub use duration::{format_go_duration, parse_duration};
use features::FeatureGates;
use internal::{KubeProxyConfig, Nanos};
use validation::validate;

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
    /// kube-proxy's validation of the resolved configuration; each line names the field.
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Validation(Vec<String>),
}

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

fn invalid(field: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Go's `strconv.ParseBool`, which pflag uses for every boolean flag.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `strconv.ParseInt(s, 0, 32)` (pflag's Int32): decimal, `0x`, `0o`/`0`, `0b`.
fn parse_go_i32(s: &str) -> Option<i32> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let body = body.replace('_', "");
    let v = if let Some(h) = body.strip_prefix("0x").or(body.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()?
    } else if let Some(b) = body.strip_prefix("0b").or(body.strip_prefix("0B")) {
        i64::from_str_radix(b, 2).ok()?
    } else if let Some(o) = body.strip_prefix("0o").or(body.strip_prefix("0O")) {
        i64::from_str_radix(o, 8).ok()?
    } else if body.len() > 1 && body.starts_with('0') {
        i64::from_str_radix(&body[1..], 8).ok()?
    } else {
        body.parse::<i64>().ok()?
    };
    i32::try_from(if neg { -v } else { v }).ok()
}

fn nanos(d: Duration) -> Nanos {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn to_duration(n: Nanos) -> Duration {
    Duration::from_nanos(n.max(0) as u64)
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
    /// Nothing configured: no source-based masquerade decisions. kube-proxy always has a
    /// mode (ClusterCIDR by default), so configuration never yields it; backends still handle it.
    #[allow(dead_code)]
    None,
    ClusterCidr(Vec<IpNet>),
    NodeCidr,
    BridgeInterface(String),
    InterfaceNamePrefix(String),
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
    /// kube-proxy's whole resolved configuration (what `--write-config-to` writes).
    pub kube: KubeProxyConfig,
    /// `bindAddress` when it names a specific IP: this node's primary IP, and so its family.
    pub bind_address: Option<IpAddr>,
    /// `iptables.localhostNodePorts`, in effect only in iptables mode (IPv4), as upstream.
    pub localhost_nodeports: bool,
    pub feature_gates: FeatureGates,
    /// `--logging-format json`: one JSON object per log line.
    pub log_json: bool,
    /// Warnings to log once logging is set up (ignored flags, inert flags, odd combinations).
    pub warnings: Vec<String>,
    /// `--cleanup`: remove every rule and exit.
    pub cleanup: bool,
    /// `--init-only`: the one-time privileged node setup, then exit.
    pub init_only: bool,
    /// `--bind-address-hard-fail`: a health/metrics port that cannot be bound is fatal.
    pub bind_address_hard_fail: bool,
}

/// Flags kube-proxy's `--config` replaces (every configuration flag but logging and hostname).
fn config_flags_given(f: &Flags) -> Vec<&'static str> {
    let mut given = Vec::new();
    let mut add = |set: bool, name: &'static str| {
        if set {
            given.push(name)
        }
    };
    add(f.bind_address.is_some(), "--bind-address");
    add(f.bind_address_hard_fail.is_some(), "--bind-address-hard-fail");
    add(f.cluster_cidr.is_some(), "--cluster-cidr");
    add(f.config_sync_period.is_some(), "--config-sync-period");
    add(f.conntrack_max_per_core.is_some(), "--conntrack-max-per-core");
    add(f.conntrack_min.is_some(), "--conntrack-min");
    add(f.conntrack_tcp_be_liberal.is_some(), "--conntrack-tcp-be-liberal");
    add(
        f.conntrack_tcp_timeout_close_wait.is_some(),
        "--conntrack-tcp-timeout-close-wait",
    );
    add(
        f.conntrack_tcp_timeout_established.is_some(),
        "--conntrack-tcp-timeout-established",
    );
    add(f.conntrack_udp_timeout.is_some(), "--conntrack-udp-timeout");
    add(
        f.conntrack_udp_timeout_stream.is_some(),
        "--conntrack-udp-timeout-stream",
    );
    add(f.detect_local_mode.is_some(), "--detect-local-mode");
    add(!f.feature_gates.is_empty(), "--feature-gates");
    add(f.healthz_bind_address.is_some(), "--healthz-bind-address");
    add(f.healthz_port.is_some(), "--healthz-port");
    add(
        f.iptables_localhost_nodeports.is_some(),
        "--iptables-localhost-nodeports",
    );
    add(f.iptables_masquerade_bit.is_some(), "--iptables-masquerade-bit");
    add(f.iptables_min_sync_period.is_some(), "--iptables-min-sync-period");
    add(f.iptables_sync_period.is_some(), "--iptables-sync-period");
    add(!f.ipvs_exclude_cidrs.is_empty(), "--ipvs-exclude-cidrs");
    add(f.ipvs_min_sync_period.is_some(), "--ipvs-min-sync-period");
    add(f.ipvs_scheduler.is_some(), "--ipvs-scheduler");
    add(f.ipvs_strict_arp.is_some(), "--ipvs-strict-arp");
    add(f.ipvs_sync_period.is_some(), "--ipvs-sync-period");
    add(f.ipvs_tcp_timeout.is_some(), "--ipvs-tcp-timeout");
    add(f.ipvs_tcpfin_timeout.is_some(), "--ipvs-tcpfin-timeout");
    add(f.ipvs_udp_timeout.is_some(), "--ipvs-udp-timeout");
    add(f.kube_api_burst.is_some(), "--kube-api-burst");
    add(f.kube_api_content_type.is_some(), "--kube-api-content-type");
    add(f.kube_api_qps.is_some(), "--kube-api-qps");
    add(f.kubeconfig.is_some(), "--kubeconfig");
    add(f.masquerade_all.is_some(), "--masquerade-all");
    add(f.metrics_bind_address.is_some(), "--metrics-bind-address");
    add(f.metrics_port.is_some(), "--metrics-port");
    add(!f.nodeport_addresses.is_empty(), "--nodeport-addresses");
    add(f.oom_score_adj.is_some(), "--oom-score-adj");
    add(f.pod_bridge_interface.is_some(), "--pod-bridge-interface");
    add(f.pod_interface_name_prefix.is_some(), "--pod-interface-name-prefix");
    add(f.profiling.is_some(), "--profiling");
    add(f.proxy_mode.is_some(), "--proxy-mode");
    add(
        f.show_hidden_metrics_for_version.is_some(),
        "--show-hidden-metrics-for-version",
    );
    add(f.windows_service.is_some(), "--windows-service");
    add(f.network_name.is_some(), "--network-name");
    add(f.source_vip.is_some(), "--source-vip");
    add(f.enable_dsr.is_some(), "--enable-dsr");
    add(f.root_hnsendpoint_name.is_some(), "--root-hnsendpoint-name");
    add(f.forward_healthcheck_vip.is_some(), "--forward-healthcheck-vip");
    given
}

/// Parses one flag's value with Go's rules; the error is pflag's "invalid argument".
struct FlagParser;

impl FlagParser {
    fn bool(name: &'static str, v: &Option<String>) -> Result<Option<bool>> {
        v.as_deref()
            .map(|s| parse_go_bool(s).ok_or_else(|| invalid(name, s, "strconv.ParseBool: parsing: invalid syntax")))
            .transpose()
    }
    fn i32(name: &'static str, v: &Option<String>) -> Result<Option<i32>> {
        v.as_deref()
            .map(|s| parse_go_i32(s).ok_or_else(|| invalid(name, s, "strconv.ParseInt: parsing: invalid syntax")))
            .transpose()
    }
    fn f32(name: &'static str, v: &Option<String>) -> Result<Option<f32>> {
        v.as_deref()
            .map(|s| {
                s.parse::<f32>()
                    .map_err(|_| invalid(name, s, "strconv.ParseFloat: parsing: invalid syntax"))
            })
            .transpose()
    }
    fn dur(name: &'static str, v: &Option<String>) -> Result<Option<Nanos>> {
        v.as_deref()
            .map(|s| {
                let g = parse_go_duration(s)
                    .ok_or_else(|| invalid(name, s, "time: invalid duration (e.g. 5s, 1m, 2h22m)"))?;
                let n = nanos(g.value);
                Ok(if g.negative { -n } else { n })
            })
            .transpose()
    }
    /// pflag's StringSlice: comma-separated, repeated flags append.
    fn list(v: &[String]) -> Option<Vec<String>> {
        if v.is_empty() {
            return None;
        }
        Some(
            v.iter()
                .flat_map(|s| s.split(','))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        )
    }
    fn ip(name: &'static str, v: &Option<String>) -> Result<Option<String>> {
        match v.as_deref() {
            Some(s) if s.trim().parse::<IpAddr>().is_err() => Err(invalid(name, s, "not a valid IP address")),
            Some(s) => Ok(Some(s.trim().to_string())),
            None => Ok(None),
        }
    }
    /// utilflag.IPPortVar: empty, an IP, or IP:port.
    fn ip_port(name: &'static str, v: &Option<String>) -> Result<Option<String>> {
        let Some(s) = v.as_deref() else { return Ok(None) };
        if s.trim().is_empty() {
            return Ok(Some(String::new()));
        }
        if s.parse::<IpAddr>().is_ok() {
            return Ok(Some(s.to_string()));
        }
        let (host, port) =
            v1alpha1::split_host_port(s).ok_or_else(|| invalid(name, s, "not in a valid format (ip or ip:port)"))?;
        if host.parse::<IpAddr>().is_err() {
            return Err(invalid(name, s, format!("{host:?} is not a valid IP address")));
        }
        if port.parse::<u16>().is_err() {
            return Err(invalid(name, s, format!("{port:?} is not a valid number")));
        }
        Ok(Some(s.to_string()))
    }
}

/// Every flag, parsed (whether or not `--config` makes it ignored).
#[derive(Default)]
struct Parsed {
    bind_address: Option<String>,
    bind_address_hard_fail: Option<bool>,
    cleanup: Option<bool>,
    config_sync_period: Option<Nanos>,
    ct_max_per_core: Option<i32>,
    ct_min: Option<i32>,
    ct_be_liberal: Option<bool>,
    ct_close_wait: Option<Nanos>,
    ct_established: Option<Nanos>,
    ct_udp: Option<Nanos>,
    ct_udp_stream: Option<Nanos>,
    feature_gates: BTreeMap<String, bool>,
    healthz: Option<String>,
    healthz_port: Option<i32>,
    init_only: Option<bool>,
    localhost_nodeports: Option<bool>,
    masquerade_bit: Option<i32>,
    ipt_min: Option<Nanos>,
    ipt_sync: Option<Nanos>,
    ipvs_min: Option<Nanos>,
    ipvs_sync: Option<Nanos>,
    ipvs_strict_arp: Option<bool>,
    ipvs_tcp: Option<Nanos>,
    ipvs_tcpfin: Option<Nanos>,
    ipvs_udp: Option<Nanos>,
    burst: Option<i32>,
    qps: Option<f32>,
    flush: Option<Nanos>,
    json_split: Option<bool>,
    text_split: Option<bool>,
    masquerade_all: Option<bool>,
    metrics: Option<String>,
    metrics_port: Option<i32>,
    oom: Option<i32>,
    profiling: Option<bool>,
    verbosity: Option<u32>,
    windows_service: Option<bool>,
    enable_dsr: Option<bool>,
    forward_hc_vip: Option<bool>,
    kproxy_min: Option<Nanos>,
    kproxy_sync: Option<Nanos>,
    graceful: Option<Nanos>,
}

fn parse_flags(f: &Flags) -> Result<Parsed> {
    type P = FlagParser;
    let mut feature_gates = BTreeMap::new();
    for raw in &f.feature_gates {
        features::parse_feature_gates_flag(raw, &mut feature_gates).map_err(|e| invalid("--feature-gates", raw, e))?;
    }
    let verbosity = f
        .verbosity
        .as_deref()
        .map(|s| {
            s.parse::<u32>()
                .map_err(|_| invalid("-v", s, "strconv.ParseUint: parsing: invalid syntax"))
        })
        .transpose()?;
    for (name, v) in [
        ("--log-json-info-buffer-size", &f.log_json_info_buffer_size),
        ("--log-text-info-buffer-size", &f.log_text_info_buffer_size),
    ] {
        if let Some(s) = v {
            v1alpha1::parse_quantity(s)
                .ok_or_else(|| invalid(name, s, "quantities must match the regular expression"))?;
        }
    }
    if let Some(v) = &f.vmodule {
        parse_vmodule(v).map_err(|e| invalid("--vmodule", v, e))?;
    }
    if let Some(v) = &f.version {
        if v != "raw" && parse_go_bool(v).is_none() {
            return Err(invalid("--version", v, "expected true, false or raw"));
        }
    }
    Ok(Parsed {
        bind_address: P::ip("--bind-address", &f.bind_address)?,
        bind_address_hard_fail: P::bool("--bind-address-hard-fail", &f.bind_address_hard_fail)?,
        cleanup: P::bool("--cleanup", &f.cleanup)?,
        config_sync_period: P::dur("--config-sync-period", &f.config_sync_period)?,
        ct_max_per_core: P::i32("--conntrack-max-per-core", &f.conntrack_max_per_core)?,
        ct_min: P::i32("--conntrack-min", &f.conntrack_min)?,
        ct_be_liberal: P::bool("--conntrack-tcp-be-liberal", &f.conntrack_tcp_be_liberal)?,
        ct_close_wait: P::dur(
            "--conntrack-tcp-timeout-close-wait",
            &f.conntrack_tcp_timeout_close_wait,
        )?,
        ct_established: P::dur(
            "--conntrack-tcp-timeout-established",
            &f.conntrack_tcp_timeout_established,
        )?,
        ct_udp: P::dur("--conntrack-udp-timeout", &f.conntrack_udp_timeout)?,
        ct_udp_stream: P::dur("--conntrack-udp-timeout-stream", &f.conntrack_udp_timeout_stream)?,
        feature_gates,
        healthz: P::ip_port("--healthz-bind-address", &f.healthz_bind_address)?,
        healthz_port: P::i32("--healthz-port", &f.healthz_port)?,
        init_only: P::bool("--init-only", &f.init_only)?,
        localhost_nodeports: P::bool("--iptables-localhost-nodeports", &f.iptables_localhost_nodeports)?,
        masquerade_bit: P::i32("--iptables-masquerade-bit", &f.iptables_masquerade_bit)?,
        ipt_min: P::dur("--iptables-min-sync-period", &f.iptables_min_sync_period)?,
        ipt_sync: P::dur("--iptables-sync-period", &f.iptables_sync_period)?,
        ipvs_min: P::dur("--ipvs-min-sync-period", &f.ipvs_min_sync_period)?,
        ipvs_sync: P::dur("--ipvs-sync-period", &f.ipvs_sync_period)?,
        ipvs_strict_arp: P::bool("--ipvs-strict-arp", &f.ipvs_strict_arp)?,
        ipvs_tcp: P::dur("--ipvs-tcp-timeout", &f.ipvs_tcp_timeout)?,
        ipvs_tcpfin: P::dur("--ipvs-tcpfin-timeout", &f.ipvs_tcpfin_timeout)?,
        ipvs_udp: P::dur("--ipvs-udp-timeout", &f.ipvs_udp_timeout)?,
        burst: P::i32("--kube-api-burst", &f.kube_api_burst)?,
        qps: P::f32("--kube-api-qps", &f.kube_api_qps)?,
        flush: P::dur("--log-flush-frequency", &f.log_flush_frequency)?,
        json_split: P::bool("--log-json-split-stream", &f.log_json_split_stream)?,
        text_split: P::bool("--log-text-split-stream", &f.log_text_split_stream)?,
        masquerade_all: P::bool("--masquerade-all", &f.masquerade_all)?,
        metrics: P::ip_port("--metrics-bind-address", &f.metrics_bind_address)?,
        metrics_port: P::i32("--metrics-port", &f.metrics_port)?,
        oom: P::i32("--oom-score-adj", &f.oom_score_adj)?,
        profiling: P::bool("--profiling", &f.profiling)?,
        verbosity,
        windows_service: P::bool("--windows-service", &f.windows_service)?,
        enable_dsr: P::bool("--enable-dsr", &f.enable_dsr)?,
        forward_hc_vip: P::bool("--forward-healthcheck-vip", &f.forward_healthcheck_vip)?,
        kproxy_min: P::dur("--min-sync-period", &f.min_sync_period)?,
        kproxy_sync: P::dur("--sync-period", &f.sync_period)?,
        graceful: P::dur("--ipvs-graceful-period", &f.ipvs_graceful_period)?,
    })
}

/// klog's `--vmodule pattern=N,...`.
fn parse_vmodule(raw: &str) -> std::result::Result<Vec<(String, u32)>, String> {
    raw.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (pat, n) = p.split_once('=').ok_or_else(|| format!("{p:?} is not pattern=N"))?;
            let n = n
                .parse::<u32>()
                .map_err(|_| format!("{n:?} is not a verbosity level"))?;
            Ok((pat.to_string(), n))
        })
        .collect()
}

/// The logging flags, which win over the file (kube-proxy's `copyLogsFromFlags`).
fn apply_logging_flags(c: &mut KubeProxyConfig, f: &Flags, p: &Parsed) -> Result<()> {
    if let Some(v) = p.verbosity {
        c.logging.verbosity = v;
    }
    if let Some(v) = &f.vmodule {
        // Flags first, then the file's, as kube-proxy joins them.
        let mut merged = parse_vmodule(v).map_err(|e| invalid("--vmodule", v, e))?;
        merged.append(&mut c.logging.vmodule);
        c.logging.vmodule = merged;
    }
    if let Some(v) = &f.logging_format {
        c.logging.format = v.clone();
    }
    if let Some(v) = p.flush {
        c.logging.flush_frequency = v;
    }
    if let Some(v) = p.json_split {
        c.logging.json.split_stream = v;
    }
    if let Some(v) = p.text_split {
        c.logging.text.split_stream = v;
    }
    if let Some(v) = &f.log_json_info_buffer_size {
        c.logging.json.info_buffer_size = v.clone();
    }
    if let Some(v) = &f.log_text_info_buffer_size {
        c.logging.text.info_buffer_size = v.clone();
    }
    Ok(())
}

/// Without `--config`: the configuration flags over kube-proxy's defaults (`AddFlags` binds
/// most to fields; `processV1Alpha1Flags` handles the mode-dependent periods and cluster CIDR).
fn apply_config_flags(c: &mut KubeProxyConfig, f: &Flags, p: &Parsed) {
    fn set<T: Clone>(dst: &mut T, v: &Option<T>) {
        if let Some(v) = v {
            *dst = v.clone();
        }
    }
    set(&mut c.bind_address, &p.bind_address);
    set(&mut c.bind_address_hard_fail, &p.bind_address_hard_fail);
    set(&mut c.config_sync_period, &p.config_sync_period);
    set(&mut c.conntrack.max_per_core, &p.ct_max_per_core);
    set(&mut c.conntrack.min, &p.ct_min);
    set(&mut c.conntrack.tcp_be_liberal, &p.ct_be_liberal);
    set(&mut c.conntrack.tcp_close_wait_timeout, &p.ct_close_wait);
    set(&mut c.conntrack.tcp_established_timeout, &p.ct_established);
    set(&mut c.conntrack.udp_timeout, &p.ct_udp);
    set(&mut c.conntrack.udp_stream_timeout, &p.ct_udp_stream);
    set(&mut c.detect_local_mode, &f.detect_local_mode);
    for (k, v) in &p.feature_gates {
        c.feature_gates.insert(k.clone(), *v);
    }
    set(&mut c.healthz_bind_address, &p.healthz);
    set(&mut c.iptables_localhost_nodeports, &p.localhost_nodeports);
    set(&mut c.iptables_masquerade_bit, &p.masquerade_bit);
    if let Some(v) = FlagParser::list(&f.ipvs_exclude_cidrs) {
        c.ipvs.exclude_cidrs = Some(v);
    }
    set(&mut c.ipvs.scheduler, &f.ipvs_scheduler);
    set(&mut c.ipvs.strict_arp, &p.ipvs_strict_arp);
    set(&mut c.ipvs.tcp_timeout, &p.ipvs_tcp);
    set(&mut c.ipvs.tcp_fin_timeout, &p.ipvs_tcpfin);
    set(&mut c.ipvs.udp_timeout, &p.ipvs_udp);
    set(&mut c.client_connection.burst, &p.burst);
    set(&mut c.client_connection.content_type, &f.kube_api_content_type);
    set(&mut c.client_connection.qps, &p.qps);
    set(&mut c.client_connection.kubeconfig, &f.kubeconfig);
    set(&mut c.masquerade_all, &p.masquerade_all);
    set(&mut c.metrics_bind_address, &p.metrics);
    if let Some(v) = FlagParser::list(&f.nodeport_addresses) {
        c.node_port_addresses = Some(v);
    }
    set(&mut c.oom_score_adj, &p.oom);
    set(&mut c.detect_local.bridge_interface, &f.pod_bridge_interface);
    set(&mut c.detect_local.interface_name_prefix, &f.pod_interface_name_prefix);
    set(&mut c.enable_profiling, &p.profiling);
    set(&mut c.mode, &f.proxy_mode);
    set(
        &mut c.show_hidden_metrics_for_version,
        &f.show_hidden_metrics_for_version,
    );
    set(&mut c.windows_run_as_service, &p.windows_service);
    set(&mut c.winkernel.network_name, &f.network_name);
    set(&mut c.winkernel.source_vip, &f.source_vip);
    set(&mut c.winkernel.enable_dsr, &p.enable_dsr);
    set(&mut c.winkernel.root_hns_endpoint_name, &f.root_hnsendpoint_name);
    set(&mut c.winkernel.forward_health_check_vip, &p.forward_hc_vip);
    // processV1Alpha1Flags: the iptables flags are for every mode but ipvs, and the other way.
    let ipvs = c.mode == "ipvs";
    if let (Some(v), false) = (p.ipt_sync, ipvs) {
        c.sync_period = v;
    }
    if let (Some(v), false) = (p.ipt_min, ipvs) {
        c.min_sync_period = v;
    }
    if let (Some(v), true) = (p.ipvs_sync, ipvs) {
        c.sync_period = v;
    }
    if let (Some(v), true) = (p.ipvs_min, ipvs) {
        c.min_sync_period = v;
    }
    if let Some(v) = &f.cluster_cidr {
        c.detect_local.cluster_cidrs = v.split(',').map(str::to_string).collect();
    }
}

/// Deprecated `--healthz-port`/`--metrics-port` (only without `--config` and `--write-config-to`):
/// 0 disables the server, else the port is added where the address has none.
fn address_from_deprecated_port(addr: &str, port: Option<i32>, default_port: u16) -> String {
    match port {
        Some(0) => String::new(),
        Some(p) => v1alpha1::append_port_if_needed(addr, u16::try_from(p).unwrap_or(default_port)),
        None => v1alpha1::append_port_if_needed(addr, default_port),
    }
}

fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_else(|_| "localhost".into())
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

/// The result of reading flags and file, before kproxy's own settings are derived.
pub struct Resolved {
    pub kube: KubeProxyConfig,
    pub warnings: Vec<String>,
}

/// Flags and `--config` resolved as kube-proxy resolves them (its `Complete`), then validated
/// (its `Validate`).
pub fn resolve(flags: &Flags) -> Result<Resolved> {
    let p = parse_flags(flags)?;
    let mut warnings = Vec::new();
    let mut kube = match flags.config.as_ref().filter(|p| !p.is_empty()).map(PathBuf::from) {
        Some(path) => {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let decoded = v1alpha1::decode(&text).map_err(|message| ConfigError::Parse {
                path: path.clone(),
                message,
            })?;
            if !decoded.unknown_fields.is_empty() {
                warnings.push(format!(
                    "config file {}: unknown fields ignored, as kube-proxy's lenient decoding ignores them: {}",
                    path.display(),
                    decoded.unknown_fields.join(", ")
                ));
            }
            let ignored = config_flags_given(flags);
            if !ignored.is_empty() {
                warnings.push(format!(
                    "--config is given, so these flags are ignored, as kube-proxy ignores them (set the fields in the file instead): {}",
                    ignored.join(", ")
                ));
            }
            let mut c = v1alpha1::to_internal(decoded.file);
            apply_logging_flags(&mut c, flags, &p)?;
            c
        }
        None => {
            let mut c = v1alpha1::defaults();
            apply_logging_flags(&mut c, flags, &p)?;
            apply_config_flags(&mut c, flags, &p);
            if flags.write_config_to.as_ref().is_none_or(|p| p.is_empty()) {
                c.healthz_bind_address = address_from_deprecated_port(&c.healthz_bind_address, p.healthz_port, 10256);
                c.metrics_bind_address = address_from_deprecated_port(&c.metrics_bind_address, p.metrics_port, 10249);
            }
            c
        }
    };
    // platformApplyDefaults (Linux).
    if kube.mode.is_empty() {
        kube.mode = "iptables".into();
    }
    if kube.mode == "nftables" && kube.node_port_addresses.as_ref().is_none_or(|v| v.is_empty()) {
        kube.node_port_addresses = Some(vec!["primary".into()]);
    }
    if kube.detect_local_mode.is_empty() {
        kube.detect_local_mode = "ClusterCIDR".into();
    }
    // processHostnameOverrideFlag: the flag wins over the file.
    if let Some(h) = flags.hostname_override.as_deref().filter(|h| !h.is_empty()) {
        let h = h.trim();
        if h.is_empty() {
            return Err(invalid("--hostname-override", h, "empty hostname-override is invalid"));
        }
        kube.hostname_override = h.to_lowercase();
    }
    let errors = validate(&kube);
    if !errors.is_empty() {
        return Err(ConfigError::Validation(errors));
    }
    Ok(Resolved { kube, warnings })
}

/// Flags and file fields kube-proxy accepts that change nothing in kproxy, as given: named in
/// one warning at start.
fn inert_settings(flags: &Flags, kube: &KubeProxyConfig) -> Vec<String> {
    let mut inert = Vec::new();
    let mut add = |set: bool, name: &str| {
        if set {
            inert.push(name.to_string())
        }
    };
    add(
        flags.profiling.is_some() || kube.enable_profiling,
        "--profiling/enableProfiling",
    );
    add(
        !kube.logging.vmodule.is_empty(),
        "--vmodule/logging.vmodule (no per-file levels)",
    );
    add(flags.boot_id_file.is_some(), "--boot-id-file");
    add(flags.machine_id_file.is_some(), "--machine-id-file");
    add(
        flags.config_sync_period.is_some() || kube.config_sync_period != 15 * 60 * internal::SECOND,
        "--config-sync-period/configSyncPeriod (watches never resync)",
    );
    add(
        flags.log_flush_frequency.is_some() || kube.logging.flush_frequency != 5 * internal::SECOND,
        "--log-flush-frequency/logging.flushFrequency (every line is written at once)",
    );
    add(
        kube.logging.json.split_stream || kube.logging.text.split_stream,
        "--log-*-split-stream/logging.options.*.splitStream",
    );
    add(
        flags.log_json_info_buffer_size.is_some() || flags.log_text_info_buffer_size.is_some(),
        "--log-*-info-buffer-size",
    );
    add(
        !kube.show_hidden_metrics_for_version.is_empty(),
        "--show-hidden-metrics-for-version (no metric is hidden)",
    );
    let ct = &kube.client_connection.content_type;
    add(
        flags.kube_api_content_type.is_some() && ct != "application/json",
        "--kube-api-content-type/clientConnection.contentType other than application/json (kproxy sends JSON)",
    );
    add(
        !kube.client_connection.accept_content_types.is_empty(),
        "clientConnection.acceptContentTypes",
    );
    add(!kube.port_range.is_empty(), "portRange");
    let w = &kube.winkernel;
    add(
        kube.windows_run_as_service
            || w.enable_dsr
            || w.forward_health_check_vip
            || !w.network_name.is_empty()
            || !w.source_vip.is_empty()
            || !w.root_hns_endpoint_name.is_empty(),
        "Windows settings (--windows-service, --network-name, --source-vip, --enable-dsr, --root-hnsendpoint-name, --forward-healthcheck-vip, winkernel)",
    );
    inert
}

impl Config {
    /// Builds the configuration from flags and, if given, the `--config` file.
    pub fn load(flags: &Flags) -> Result<Config> {
        let Resolved { kube, mut warnings } = resolve(flags)?;
        let p = parse_flags(flags)?;
        let mode = match kube.mode.as_str() {
            "ipvs" => ProxyMode::Ipvs,
            "nftables" => ProxyMode::Nftables,
            _ => ProxyMode::Iptables,
        };
        let nodeport_addresses = match kube.node_port_addresses.as_deref() {
            None | Some([]) => NodePortAddresses::All,
            Some([p]) if p == "primary" => NodePortAddresses::Primary,
            Some(list) => NodePortAddresses::Cidrs(parse_cidrs("nodePortAddresses", &list.join(","))?),
        };
        let masquerade_bit = match mode {
            ProxyMode::Nftables => kube.nftables_masquerade_bit,
            _ => kube.iptables_masquerade_bit,
        } as u8;
        let cluster_cidrs = parse_cidrs("clusterCIDR", &kube.detect_local.cluster_cidrs.join(","))?;
        let detect_local = match kube.detect_local_mode.as_str() {
            "NodeCIDR" => DetectLocal::NodeCidr,
            "BridgeInterface" => DetectLocal::BridgeInterface(kube.detect_local.bridge_interface.clone()),
            "InterfaceNamePrefix" => DetectLocal::InterfaceNamePrefix(kube.detect_local.interface_name_prefix.clone()),
            _ => {
                if cluster_cidrs.is_empty() {
                    // kube-proxy's checkBadConfig warns and proceeds with no local detection.
                    warnings.push(
                        "detectLocalMode is ClusterCIDR but clusterCIDR is empty: no traffic is detected as local \
                         (as kube-proxy: set --cluster-cidr / clusterCIDR to masquerade off-cluster traffic correctly)"
                            .into(),
                    );
                }
                DetectLocal::ClusterCidr(cluster_cidrs.clone())
            }
        };
        if matches!(mode, ProxyMode::Iptables | ProxyMode::Ipvs) && nodeport_addresses == NodePortAddresses::All {
            warnings.push(
                "nodePortAddresses is unset; NodePort connections will be accepted on all local IPs \
                 (consider --nodeport-addresses primary), as kube-proxy warns"
                    .into(),
            );
        }
        let inert = inert_settings(flags, &kube);
        if !inert.is_empty() {
            warnings.push(format!(
                "accepted for compatibility with kube-proxy, no effect in kproxy: {}",
                inert.join(", ")
            ));
        }
        // kproxy's own period flags win over everything (they predate kube-proxy's names here).
        let min_sync_period = to_duration(p.kproxy_min.unwrap_or(kube.min_sync_period));
        let sync_period = to_duration(p.kproxy_sync.unwrap_or(kube.sync_period));
        if p.kproxy_sync.is_some_and(|s| s <= 0) {
            return Err(invalid(
                "--sync-period",
                flags.sync_period.as_deref().unwrap_or(""),
                "must be greater than 0",
            ));
        }
        if min_sync_period > sync_period {
            return Err(invalid(
                "--min-sync-period",
                &format_go_duration(min_sync_period),
                format!("must not exceed the sync period ({})", format_go_duration(sync_period)),
            ));
        }
        let ipvs = IpvsConfig {
            scheduler: if kube.ipvs.scheduler.is_empty() {
                "rr".into()
            } else {
                kube.ipvs.scheduler.clone()
            },
            strict_arp: kube.ipvs.strict_arp,
            tcp_timeout: to_duration(kube.ipvs.tcp_timeout),
            tcpfin_timeout: to_duration(kube.ipvs.tcp_fin_timeout),
            udp_timeout: to_duration(kube.ipvs.udp_timeout),
            exclude_cidrs: parse_cidrs(
                "ipvs.excludeCIDRs",
                &kube.ipvs.exclude_cidrs.clone().unwrap_or_default().join(","),
            )?,
            graceful_period: to_duration(p.graceful.unwrap_or(0)),
        };
        let hostname = Some(kube.hostname_override.trim().to_lowercase())
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
        let bind_address = kube
            .bind_address
            .parse::<IpAddr>()
            .ok()
            .filter(|ip| !ip.is_unspecified());
        let feature_gates =
            FeatureGates::new(kube.feature_gates.clone()).map_err(|e| ConfigError::Validation(vec![e]))?;
        Ok(Config {
            kubeconfig: Some(kube.client_connection.kubeconfig.clone())
                .filter(|k| !k.is_empty())
                .map(PathBuf::from),
            master: flags.master.clone().filter(|m| !m.is_empty()),
            hostname,
            mode,
            nodeport_addresses,
            masquerade_all: kube.masquerade_all,
            masquerade_bit,
            detect_local,
            healthz_bind: parse_bind("healthzBindAddress", &kube.healthz_bind_address)?,
            metrics_bind: parse_bind("metricsBindAddress", &kube.metrics_bind_address)?,
            min_sync_period,
            sync_period,
            manifests: flags.manifests.clone(),
            service_cluster_ip_range,
            disable_external_ips: flags.disable_external_ips,
            verbosity: u8::try_from(kube.logging.verbosity).unwrap_or(u8::MAX),
            ipvs,
            ingress: IngressConfig::from_flags(flags)?,
            bind_address,
            localhost_nodeports: kube.iptables_localhost_nodeports && mode == ProxyMode::Iptables,
            log_json: kube.logging.format == "json",
            feature_gates,
            cleanup: p.cleanup.unwrap_or(false),
            init_only: p.init_only.unwrap_or(false),
            bind_address_hard_fail: kube.bind_address_hard_fail,
            kube,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(f: impl FnOnce(&mut Flags)) -> Flags {
        let mut flags = Flags::default();
        f(&mut flags);
        flags
    }

    fn write_config(name: &str, body: &str) -> String {
        let path = std::env::temp_dir().join(format!("kproxy-config-{}-{name}.yaml", std::process::id()));
        std::fs::write(
            &path,
            format!("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{body}"),
        )
        .unwrap();
        path.display().to_string()
    }

    #[test]
    fn defaults_are_kube_proxys() {
        let c = Config::load(&Flags::default()).unwrap();
        assert_eq!(c.mode, ProxyMode::Iptables);
        assert_eq!(c.min_sync_period, Duration::from_secs(1));
        assert_eq!(c.sync_period, Duration::from_secs(30));
        assert_eq!(c.healthz_bind, Some("0.0.0.0:10256".parse().unwrap()));
        assert_eq!(c.metrics_bind, Some("127.0.0.1:10249".parse().unwrap()));
        assert_eq!(c.masquerade_bit, 14);
        assert_eq!(c.nodeport_addresses, NodePortAddresses::All);
        assert_eq!(c.detect_local, DetectLocal::ClusterCidr(vec![]));
        assert!(c.localhost_nodeports);
        assert_eq!(c.kube.oom_score_adj, -999);
        assert_eq!(
            (c.kube.client_connection.qps, c.kube.client_connection.burst),
            (5.0, 10)
        );
    }

    #[test]
    fn ipvs_mode_from_flags_keeps_the_one_second_minimum_and_from_a_file_zero() {
        let c = Config::load(&flags(|f| f.proxy_mode = Some("ipvs".into()))).unwrap();
        assert_eq!(c.min_sync_period, Duration::from_secs(1));
        let path = write_config("ipvs", "mode: ipvs\n");
        let c = Config::load(&flags(|f| f.config = Some(path.clone()))).unwrap();
        std::fs::remove_file(path).ok();
        assert_eq!(
            c.min_sync_period,
            Duration::ZERO,
            "kube-proxy leaves ipvs.minSyncPeriod at 0"
        );
        assert_eq!(c.sync_period, Duration::from_secs(30));
    }

    #[test]
    fn nftables_reads_its_section_and_defaults_to_primary_nodeports() {
        let path = write_config(
            "nft",
            "mode: nftables\niptables: {masqueradeAll: false, syncPeriod: 50s}\nnftables: {masqueradeAll: true, masqueradeBit: 12, syncPeriod: 20s, minSyncPeriod: 2s}\n",
        );
        let c = Config::load(&flags(|f| f.config = Some(path.clone()))).unwrap();
        std::fs::remove_file(path).ok();
        assert!(c.masquerade_all);
        assert_eq!(c.masquerade_bit, 12);
        assert_eq!(
            (c.sync_period, c.min_sync_period),
            (Duration::from_secs(20), Duration::from_secs(2))
        );
        assert_eq!(c.nodeport_addresses, NodePortAddresses::Primary);
        assert!(
            !c.localhost_nodeports,
            "localhost NodePorts are an iptables-mode feature"
        );
    }

    #[test]
    fn deprecated_ports_and_kproxy_period_flags() {
        let c = Config::load(&flags(|f| {
            f.healthz_bind_address = Some("127.0.0.1".into());
            f.metrics_port = Some("0".into());
            f.sync_period = Some("2s".into());
            f.min_sync_period = Some("100ms".into());
        }))
        .unwrap();
        assert_eq!(c.healthz_bind, Some("127.0.0.1:10256".parse().unwrap()));
        assert_eq!(c.metrics_bind, None, "--metrics-port=0 disables the server");
        assert_eq!(
            (c.sync_period, c.min_sync_period),
            (Duration::from_secs(2), Duration::from_millis(100))
        );
    }

    #[test]
    fn ingress_listeners_default_and_turn_off() {
        let c = Config::load(&Flags::default()).unwrap();
        assert_eq!(c.ingress.http_bind, Some("0.0.0.0:80".parse().unwrap()));
        assert!(c.ingress.enabled());
        let c = Config::load(&flags(|f| f.disable_ingress = true)).unwrap();
        assert!(!c.ingress.enabled());
    }

    #[test]
    fn go_integers_and_bools() {
        assert_eq!(parse_go_i32("0x10"), Some(16));
        assert_eq!(parse_go_i32("-999"), Some(-999));
        assert_eq!(parse_go_i32("010"), Some(8));
        assert_eq!(parse_go_i32("x"), None);
        assert_eq!(parse_go_bool("T"), Some(true));
        assert_eq!(parse_go_bool("yes"), None);
    }
}
