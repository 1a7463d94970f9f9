//! kube-proxy's internal configuration (`pkg/proxy/apis/config`): what the file and the flags
//! resolve to, before kproxy turns it into its own [`super::Config`]. One sync period for the
//! mode in use, masqueradeAll in one place, cluster CIDRs as a list, as upstream has them.

use std::collections::BTreeMap;

/// A Go `time.Duration`, in nanoseconds: Go lets a duration be negative, validation decides.
pub type Nanos = i64;

pub const SECOND: Nanos = 1_000_000_000;

#[derive(Debug, Clone, PartialEq)]
pub struct ClientConnection {
    pub kubeconfig: String,
    pub accept_content_types: String,
    pub content_type: String,
    pub qps: f32,
    pub burst: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutputRouting {
    pub split_stream: bool,
    /// A resource.Quantity as written (`"0"`, `1Mi`).
    pub info_buffer_size: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logging {
    /// `text` or `json`.
    pub format: String,
    pub flush_frequency: Nanos,
    pub verbosity: u32,
    /// `--vmodule` / `vmodule`: (file pattern, verbosity).
    pub vmodule: Vec<(String, u32)>,
    pub text: OutputRouting,
    pub json: OutputRouting,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipvs {
    pub scheduler: String,
    pub exclude_cidrs: Option<Vec<String>>,
    pub strict_arp: bool,
    pub tcp_timeout: Nanos,
    pub tcp_fin_timeout: Nanos,
    pub udp_timeout: Nanos,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Winkernel {
    pub network_name: String,
    pub source_vip: String,
    pub enable_dsr: bool,
    pub root_hns_endpoint_name: String,
    pub forward_health_check_vip: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DetectLocal {
    pub bridge_interface: String,
    pub interface_name_prefix: String,
    pub cluster_cidrs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conntrack {
    pub max_per_core: i32,
    pub min: i32,
    pub tcp_established_timeout: Nanos,
    pub tcp_close_wait_timeout: Nanos,
    pub tcp_be_liberal: bool,
    pub udp_timeout: Nanos,
    pub udp_stream_timeout: Nanos,
}

/// The internal KubeProxyConfiguration, every field resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeProxyConfig {
    pub feature_gates: BTreeMap<String, bool>,
    pub client_connection: ClientConnection,
    pub logging: Logging,
    pub hostname_override: String,
    pub bind_address: String,
    pub healthz_bind_address: String,
    pub metrics_bind_address: String,
    pub bind_address_hard_fail: bool,
    pub enable_profiling: bool,
    pub show_hidden_metrics_for_version: String,
    pub mode: String,
    pub iptables_masquerade_bit: i32,
    pub iptables_localhost_nodeports: bool,
    pub ipvs: Ipvs,
    pub nftables_masquerade_bit: i32,
    pub winkernel: Winkernel,
    pub detect_local_mode: String,
    pub detect_local: DetectLocal,
    /// `None` is Go's nil slice (`nodePortAddresses: null`).
    pub node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: i32,
    pub conntrack: Conntrack,
    pub config_sync_period: Nanos,
    pub port_range: String,
    /// `linux.masqueradeAll`: from `iptables.masqueradeAll`, or `nftables.…` in nftables mode.
    pub masquerade_all: bool,
    /// The mode's own section's periods (`ipvs.syncPeriod` in ipvs mode, and so on).
    pub sync_period: Nanos,
    pub min_sync_period: Nanos,
    pub windows_run_as_service: bool,
}
