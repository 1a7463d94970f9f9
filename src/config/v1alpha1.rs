//! `kubeproxy.config.k8s.io/v1alpha1` KubeProxyConfiguration as kube-proxy v1.33 decodes,
//! defaults and encodes it.
//!
//! Decoding: every field is optional and `null` is the same as absent; kube-proxy's defaulting
//! (`SetDefaults_KubeProxyConfiguration`) then fills zero values, which is why kubeadm's
//! `syncPeriod: 0s` means "30s". Unknown fields fail kube-proxy's strict decoding, after which
//! it decodes leniently and logs the error: kproxy does the same and names them.
//! Encoding: what `kube-proxy --write-config-to` writes: JSON field names, keys sorted (the
//! JSON-to-YAML conversion sorts them), go-yaml's scalar quoting.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::duration::{format_go_duration, parse_go_duration};
use super::internal::*;

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// A duration field: Go's `metav1.Duration` accepts only a string Go can parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dur(pub Nanos);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let g =
            parse_go_duration(&s).ok_or_else(|| serde::de::Error::custom(format!("time: invalid duration {s:?}")))?;
        let n = i64::try_from(g.value.as_nanos()).map_err(serde::de::Error::custom)?;
        Ok(Dur(if g.negative { -n } else { n }))
    }
}

/// `logging.flushFrequency`: a duration string, or a number of nanoseconds (kubeadm writes 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeOrDur(pub Nanos);

impl<'de> Deserialize<'de> for TimeOrDur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(i64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(TimeOrDur(n)),
            Raw::S(s) => {
                let g = parse_go_duration(&s)
                    .ok_or_else(|| serde::de::Error::custom(format!("time: invalid duration {s:?}")))?;
                let n = i64::try_from(g.value.as_nanos()).map_err(serde::de::Error::custom)?;
                Ok(TimeOrDur(if g.negative { -n } else { n }))
            }
        }
    }
}

/// A resource.Quantity: `"0"`, `1Mi`, or a bare number.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Quantity(pub String);

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        let s = match Raw::deserialize(d)? {
            Raw::N(n) => n.to_string(),
            Raw::S(s) => s,
        };
        parse_quantity(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("quantities must match the regular expression: {s:?}")))?;
        Ok(Quantity(s))
    }
}

/// Bytes of a non-negative resource.Quantity (binary and decimal suffixes).
pub fn parse_quantity(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        _ => return None,
    };
    let n: f64 = num.parse().ok()?;
    Some((n * mult) as u64)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientConnectionV1 {
    pub kubeconfig: Option<String>,
    pub accept_content_types: Option<String>,
    pub content_type: Option<String>,
    pub qps: Option<f32>,
    pub burst: Option<i32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutingV1 {
    pub split_stream: Option<bool>,
    pub info_buffer_size: Option<Quantity>,
}

#[derive(Debug, Default, Deserialize)]
pub struct FormatOptionsV1 {
    pub text: Option<RoutingV1>,
    pub json: Option<RoutingV1>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VModuleItem {
    pub file_pattern: String,
    pub verbosity: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoggingV1 {
    pub format: Option<String>,
    pub flush_frequency: Option<TimeOrDur>,
    pub verbosity: Option<u32>,
    pub vmodule: Option<Vec<VModuleItem>>,
    pub options: Option<FormatOptionsV1>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IptablesV1 {
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: Option<bool>,
    #[serde(rename = "localhostNodePorts")]
    pub localhost_nodeports: Option<bool>,
    pub sync_period: Option<Dur>,
    pub min_sync_period: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpvsV1 {
    pub sync_period: Option<Dur>,
    pub min_sync_period: Option<Dur>,
    pub scheduler: Option<String>,
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    pub strict_arp: Option<bool>,
    pub tcp_timeout: Option<Dur>,
    pub tcp_fin_timeout: Option<Dur>,
    pub udp_timeout: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NftablesV1 {
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: Option<bool>,
    pub sync_period: Option<Dur>,
    pub min_sync_period: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WinkernelV1 {
    pub network_name: Option<String>,
    pub source_vip: Option<String>,
    #[serde(rename = "enableDSR")]
    pub enable_dsr: Option<bool>,
    pub root_hns_endpoint_name: Option<String>,
    pub forward_health_check_vip: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DetectLocalV1 {
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConntrackV1 {
    pub max_per_core: Option<i32>,
    pub min: Option<i32>,
    pub tcp_established_timeout: Option<Dur>,
    pub tcp_close_wait_timeout: Option<Dur>,
    pub tcp_be_liberal: Option<bool>,
    pub udp_timeout: Option<Dur>,
    pub udp_stream_timeout: Option<Dur>,
}

/// The file as written: `None` wherever a field is absent or `null`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeProxyConfigurationV1 {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    pub client_connection: Option<ClientConnectionV1>,
    pub logging: Option<LoggingV1>,
    pub hostname_override: Option<String>,
    pub bind_address: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub enable_profiling: Option<bool>,
    pub show_hidden_metrics_for_version: Option<String>,
    pub mode: Option<String>,
    pub iptables: Option<IptablesV1>,
    pub ipvs: Option<IpvsV1>,
    pub nftables: Option<NftablesV1>,
    pub winkernel: Option<WinkernelV1>,
    pub detect_local_mode: Option<String>,
    pub detect_local: Option<DetectLocalV1>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: Option<i32>,
    pub conntrack: Option<ConntrackV1>,
    pub config_sync_period: Option<Dur>,
    pub port_range: Option<String>,
    pub windows_run_as_service: Option<bool>,
}

/// A decoded file: the configuration and the unknown fields kube-proxy's lenient decoding skipped.
pub struct Decoded {
    pub file: KubeProxyConfigurationV1,
    pub unknown_fields: Vec<String>,
}

/// Decodes a KubeProxyConfiguration document; apiVersion and kind are required, as kube-proxy's
/// scheme requires them.
pub fn decode(text: &str) -> Result<Decoded, String> {
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let mut unknown = Vec::new();
    let mut track = |path: serde_ignored::Path<'_>| unknown.push(path.to_string().replace(".?", ""));
    let file: KubeProxyConfigurationV1 = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
        value, &mut track,
    ))
    .map_err(|e: serde_path_to_error::Error<serde_yaml::Error>| {
        format!("{}: {}", e.path().to_string().replace(".?", ""), e.inner())
    })?;
    match (file.api_version.as_deref(), file.kind.as_deref()) {
        (None, _) | (_, None) | (Some(""), _) | (_, Some("")) => {
            return Err("Object 'apiVersion' and 'kind' are required (kubeproxy.config.k8s.io/v1alpha1, KubeProxyConfiguration)".into())
        }
        (Some(API_VERSION), Some(KIND)) => {}
        (Some(v), Some(k)) => {
            return Err(format!(
                "no kind {k:?} is registered for version {v:?}: kproxy reads {KIND} of {API_VERSION}, as kube-proxy v1.33 does"
            ))
        }
    }
    Ok(Decoded {
        file,
        unknown_fields: unknown,
    })
}

/// Where an address has no port, kube-proxy's defaulting appends the default one.
pub fn append_port_if_needed(addr: &str, port: u16) -> String {
    if split_host_port(addr).is_some() {
        return addr.to_string();
    }
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => format!("{addr}:{port}"),
        Ok(std::net::IpAddr::V6(_)) => format!("[{addr}]:{port}"),
        Err(_) => addr.to_string(),
    }
}

/// Go's `net.SplitHostPort`, enough for `ip:port` and `[ip6]:port`.
pub fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        return Some((host, port));
    }
    let (host, port) = s.rsplit_once(':')?;
    if host.contains(':') {
        return None;
    }
    Some((host, port))
}

/// kube-proxy's defaulting of a decoded file, then its conversion to the internal form.
pub fn to_internal(f: KubeProxyConfigurationV1) -> KubeProxyConfig {
    let bind_address = f
        .bind_address
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "0.0.0.0".into());
    let v4 = !bind_address.contains(':');
    let (default_healthz, default_metrics) = if v4 {
        ("0.0.0.0", "127.0.0.1")
    } else {
        ("[::]", "[::1]")
    };
    let address = |raw: Option<String>, host: &str, port: u16| match raw.filter(|a| !a.is_empty()) {
        None => format!("{host}:{port}"),
        Some(a) => append_port_if_needed(&a, port),
    };
    let cc = f.client_connection.unwrap_or_default();
    let lg = f.logging.unwrap_or_default();
    let opts = lg.options.unwrap_or_default();
    let routing = |r: Option<RoutingV1>| {
        let r = r.unwrap_or_default();
        OutputRouting {
            split_stream: r.split_stream.unwrap_or(false),
            info_buffer_size: r.info_buffer_size.map(|q| q.0).unwrap_or_else(|| "0".into()),
        }
    };
    let ipt = f.iptables.unwrap_or_default();
    let ipvs = f.ipvs.unwrap_or_default();
    let nft = f.nftables.unwrap_or_default();
    let win = f.winkernel.unwrap_or_default();
    let dl = f.detect_local.unwrap_or_default();
    let ct = f.conntrack.unwrap_or_default();
    let nonzero = |d: Option<Dur>, default: Nanos| match d {
        Some(Dur(n)) if n != 0 => n,
        _ => default,
    };
    let mode = f.mode.unwrap_or_default();
    // Each mode reads its own section (defaulted): iptables' for "" and iptables.
    let (masquerade_all, sync_period, min_sync_period) = match mode.as_str() {
        "ipvs" => (
            ipt.masquerade_all.unwrap_or(false),
            nonzero(ipvs.sync_period, 30 * SECOND),
            ipvs.min_sync_period.map_or(0, |d| d.0),
        ),
        "nftables" => (
            nft.masquerade_all.unwrap_or(false),
            nonzero(nft.sync_period, 30 * SECOND),
            nonzero(nft.min_sync_period, SECOND),
        ),
        _ => (
            ipt.masquerade_all.unwrap_or(false),
            nonzero(ipt.sync_period, 30 * SECOND),
            nonzero(ipt.min_sync_period, SECOND),
        ),
    };
    let cluster_cidrs = match f.cluster_cidr.as_deref() {
        None | Some("") => vec![],
        Some(c) => c.split(',').map(str::to_string).collect(),
    };
    KubeProxyConfig {
        feature_gates: f.feature_gates.unwrap_or_default(),
        client_connection: ClientConnection {
            kubeconfig: cc.kubeconfig.unwrap_or_default(),
            accept_content_types: cc.accept_content_types.unwrap_or_default(),
            content_type: cc
                .content_type
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| "application/vnd.kubernetes.protobuf".into()),
            qps: cc.qps.filter(|q| *q != 0.0).unwrap_or(5.0),
            burst: cc.burst.filter(|b| *b != 0).unwrap_or(10),
        },
        logging: Logging {
            format: lg.format.filter(|f| !f.is_empty()).unwrap_or_else(|| "text".into()),
            flush_frequency: match lg.flush_frequency {
                Some(TimeOrDur(n)) if n != 0 => n,
                _ => 5 * SECOND,
            },
            verbosity: lg.verbosity.unwrap_or(0),
            vmodule: lg
                .vmodule
                .unwrap_or_default()
                .into_iter()
                .map(|v| (v.file_pattern, v.verbosity))
                .collect(),
            text: routing(opts.text),
            json: routing(opts.json),
        },
        hostname_override: f.hostname_override.unwrap_or_default(),
        healthz_bind_address: address(f.healthz_bind_address, default_healthz, 10256),
        metrics_bind_address: address(f.metrics_bind_address, default_metrics, 10249),
        bind_address,
        bind_address_hard_fail: f.bind_address_hard_fail.unwrap_or(false),
        enable_profiling: f.enable_profiling.unwrap_or(false),
        show_hidden_metrics_for_version: f.show_hidden_metrics_for_version.unwrap_or_default(),
        mode,
        iptables_masquerade_bit: ipt.masquerade_bit.unwrap_or(14),
        iptables_localhost_nodeports: ipt.localhost_nodeports.unwrap_or(true),
        ipvs: Ipvs {
            scheduler: ipvs.scheduler.unwrap_or_default(),
            exclude_cidrs: ipvs.exclude_cidrs,
            strict_arp: ipvs.strict_arp.unwrap_or(false),
            tcp_timeout: ipvs.tcp_timeout.map_or(0, |d| d.0),
            tcp_fin_timeout: ipvs.tcp_fin_timeout.map_or(0, |d| d.0),
            udp_timeout: ipvs.udp_timeout.map_or(0, |d| d.0),
        },
        nftables_masquerade_bit: nft.masquerade_bit.unwrap_or(14),
        winkernel: Winkernel {
            network_name: win.network_name.unwrap_or_default(),
            source_vip: win.source_vip.unwrap_or_default(),
            enable_dsr: win.enable_dsr.unwrap_or(false),
            root_hns_endpoint_name: win.root_hns_endpoint_name.unwrap_or_default(),
            forward_health_check_vip: win.forward_health_check_vip.unwrap_or(false),
        },
        detect_local_mode: f.detect_local_mode.unwrap_or_default(),
        detect_local: DetectLocal {
            bridge_interface: dl.bridge_interface.unwrap_or_default(),
            interface_name_prefix: dl.interface_name_prefix.unwrap_or_default(),
            cluster_cidrs,
        },
        node_port_addresses: f.node_port_addresses,
        oom_score_adj: f.oom_score_adj.unwrap_or(-999),
        conntrack: Conntrack {
            max_per_core: ct.max_per_core.unwrap_or(32 * 1024),
            min: ct.min.unwrap_or(128 * 1024),
            tcp_established_timeout: ct.tcp_established_timeout.map_or(24 * 3600 * SECOND, |d| d.0),
            tcp_close_wait_timeout: ct.tcp_close_wait_timeout.map_or(3600 * SECOND, |d| d.0),
            tcp_be_liberal: ct.tcp_be_liberal.unwrap_or(false),
            udp_timeout: ct.udp_timeout.map_or(0, |d| d.0),
            udp_stream_timeout: ct.udp_stream_timeout.map_or(0, |d| d.0),
        },
        config_sync_period: nonzero(f.config_sync_period, 15 * 60 * SECOND),
        port_range: f.port_range.unwrap_or_default(),
        masquerade_all,
        sync_period,
        min_sync_period,
        windows_run_as_service: f.windows_run_as_service.unwrap_or(false),
    }
}

/// kube-proxy's defaults: an empty document, defaulted and converted.
pub fn defaults() -> KubeProxyConfig {
    to_internal(KubeProxyConfigurationV1::default())
}

fn dur(n: Nanos) -> Value {
    let d = std::time::Duration::from_nanos(n.unsigned_abs());
    let s = format_go_duration(d);
    Value::String(if n < 0 { format!("-{s}") } else { s })
}

/// A float32 as Go's JSON encoder writes it: shortest form, no `.0` on whole numbers.
fn float32(q: f32) -> Value {
    serde_json::from_str(&format!("{q}")).unwrap_or(Value::Null)
}

fn strings(v: &Option<Vec<String>>) -> Value {
    match v {
        None => Value::Null,
        Some(v) => Value::Array(v.iter().cloned().map(Value::String).collect()),
    }
}

fn routing(r: &OutputRouting) -> Value {
    let mut m = Map::new();
    // omitempty: splitStream only when true.
    if r.split_stream {
        m.insert("splitStream".into(), Value::Bool(true));
    }
    m.insert("infoBufferSize".into(), Value::String(r.info_buffer_size.clone()));
    Value::Object(m)
}

/// The internal configuration back in v1alpha1 form (kube-proxy's conversion): the sync
/// periods and masqueradeAll land in the section of the mode in use, the others stay zero.
pub fn to_value(c: &KubeProxyConfig) -> Value {
    let (mut ipt_sync, mut ipt_min, mut ipvs_sync, mut ipvs_min, mut nft_sync, mut nft_min) = (0, 0, 0, 0, 0, 0);
    let (mut ipt_masq, mut nft_masq) = (false, false);
    match c.mode.as_str() {
        "ipvs" => (ipvs_sync, ipvs_min) = (c.sync_period, c.min_sync_period),
        "nftables" => (nft_sync, nft_min) = (c.sync_period, c.min_sync_period),
        _ => (ipt_sync, ipt_min) = (c.sync_period, c.min_sync_period),
    }
    match c.mode.as_str() {
        "nftables" => nft_masq = c.masquerade_all,
        _ => ipt_masq = c.masquerade_all,
    }
    let mut logging = json!({
        "flushFrequency": dur(c.logging.flush_frequency),
        "format": c.logging.format,
        "options": {"json": routing(&c.logging.json), "text": routing(&c.logging.text)},
        "verbosity": c.logging.verbosity,
    });
    if !c.logging.vmodule.is_empty() {
        logging["vmodule"] = Value::Array(
            c.logging
                .vmodule
                .iter()
                .map(|(p, v)| json!({"filePattern": p, "verbosity": v}))
                .collect(),
        );
    }
    let mut v = json!({
        "apiVersion": API_VERSION,
        "bindAddress": c.bind_address,
        "bindAddressHardFail": c.bind_address_hard_fail,
        "clientConnection": {
            "acceptContentTypes": c.client_connection.accept_content_types,
            "burst": c.client_connection.burst,
            "contentType": c.client_connection.content_type,
            "kubeconfig": c.client_connection.kubeconfig,
            "qps": float32(c.client_connection.qps),
        },
        "clusterCIDR": c.detect_local.cluster_cidrs.join(","),
        "configSyncPeriod": dur(c.config_sync_period),
        "conntrack": {
            "maxPerCore": c.conntrack.max_per_core,
            "min": c.conntrack.min,
            "tcpBeLiberal": c.conntrack.tcp_be_liberal,
            "tcpCloseWaitTimeout": dur(c.conntrack.tcp_close_wait_timeout),
            "tcpEstablishedTimeout": dur(c.conntrack.tcp_established_timeout),
            "udpStreamTimeout": dur(c.conntrack.udp_stream_timeout),
            "udpTimeout": dur(c.conntrack.udp_timeout),
        },
        "detectLocal": {
            "bridgeInterface": c.detect_local.bridge_interface,
            "interfaceNamePrefix": c.detect_local.interface_name_prefix,
        },
        "detectLocalMode": c.detect_local_mode,
        "enableProfiling": c.enable_profiling,
        "healthzBindAddress": c.healthz_bind_address,
        "hostnameOverride": c.hostname_override,
        "iptables": {
            "localhostNodePorts": c.iptables_localhost_nodeports,
            "masqueradeAll": ipt_masq,
            "masqueradeBit": c.iptables_masquerade_bit,
            "minSyncPeriod": dur(ipt_min),
            "syncPeriod": dur(ipt_sync),
        },
        "ipvs": {
            "excludeCIDRs": strings(&c.ipvs.exclude_cidrs),
            "minSyncPeriod": dur(ipvs_min),
            "scheduler": c.ipvs.scheduler,
            "strictARP": c.ipvs.strict_arp,
            "syncPeriod": dur(ipvs_sync),
            "tcpFinTimeout": dur(c.ipvs.tcp_fin_timeout),
            "tcpTimeout": dur(c.ipvs.tcp_timeout),
            "udpTimeout": dur(c.ipvs.udp_timeout),
        },
        "kind": KIND,
        "logging": logging,
        "metricsBindAddress": c.metrics_bind_address,
        "mode": c.mode,
        "nftables": {
            "masqueradeAll": nft_masq,
            "masqueradeBit": c.nftables_masquerade_bit,
            "minSyncPeriod": dur(nft_min),
            "syncPeriod": dur(nft_sync),
        },
        "nodePortAddresses": strings(&c.node_port_addresses),
        "oomScoreAdj": c.oom_score_adj,
        "portRange": c.port_range,
        "showHiddenMetricsForVersion": c.show_hidden_metrics_for_version,
        "winkernel": {
            "enableDSR": c.winkernel.enable_dsr,
            "forwardHealthCheckVip": c.winkernel.forward_health_check_vip,
            "networkName": c.winkernel.network_name,
            "rootHnsEndpointName": c.winkernel.root_hns_endpoint_name,
            "sourceVip": c.winkernel.source_vip,
        },
    });
    // omitempty fields.
    if !c.feature_gates.is_empty() {
        v["featureGates"] = json!(c.feature_gates);
    }
    if c.windows_run_as_service {
        v["windowsRunAsService"] = Value::Bool(true);
    }
    v
}

/// `--write-config-to`'s text for this configuration.
pub fn encode(c: &KubeProxyConfig) -> String {
    let mut out = String::new();
    emit_map(&mut out, &to_value(c), 0);
    out
}

/// go-yaml's block style: maps indented by two, sequences at their key's level.
fn emit_map(out: &mut String, v: &Value, indent: usize) {
    let Value::Object(map) = v else { return };
    // serde_json's map is sorted by key, as Go's JSON-to-YAML conversion sorts.
    for (k, v) in map {
        out.push_str(&" ".repeat(indent));
        out.push_str(k);
        out.push(':');
        match v {
            Value::Object(m) if m.is_empty() => out.push_str(" {}\n"),
            Value::Object(_) => {
                out.push('\n');
                emit_map(out, v, indent + 2);
            }
            Value::Array(a) if a.is_empty() => out.push_str(" []\n"),
            Value::Array(a) => {
                out.push('\n');
                for item in a {
                    out.push_str(&" ".repeat(indent));
                    out.push_str("- ");
                    match item {
                        Value::Object(_) => {
                            // A map item: its first key after "- ", the rest aligned under it.
                            let mut nested = String::new();
                            emit_map(&mut nested, item, indent + 2);
                            out.push_str(nested.trim_start());
                        }
                        other => {
                            out.push_str(&scalar(other));
                            out.push('\n');
                        }
                    }
                }
            }
            other => {
                out.push(' ');
                out.push_str(&scalar(other));
                out.push('\n');
            }
        }
    }
}

/// A scalar as go-yaml writes it: plain where that reads back as the same string, `""` where
/// the plain text would read as another type, single quotes where plain is not allowed.
fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let resolves_other = s.is_empty()
                || matches!(
                    s.as_str(),
                    "true"
                        | "false"
                        | "yes"
                        | "no"
                        | "on"
                        | "off"
                        | "y"
                        | "n"
                        | "null"
                        | "~"
                        | "True"
                        | "False"
                        | "Yes"
                        | "No"
                        | "On"
                        | "Off"
                        | "Null"
                        | "NULL"
                        | "TRUE"
                        | "FALSE"
                )
                || s.parse::<f64>().is_ok();
            if resolves_other {
                return format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
            }
            let first = s.chars().next().unwrap_or(' ');
            let plain = !"-?:,[]{}#&*!|>'\"%@` ".contains(first)
                && !s.contains(": ")
                && !s.contains(" #")
                && !s.ends_with(' ')
                && !s.ends_with(':')
                && !s.contains('\n');
            if plain {
                s.clone()
            } else {
                format!("'{}'", s.replace('\'', "''"))
            }
        }
        other => other.to_string(),
    }
}
