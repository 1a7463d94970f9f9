//! Command-line flags: every flag of kube-proxy v1.33 (Linux and Windows builds), under its
//! name, plus kproxy's own (`--manifests`, `--ingress-*`, `--validate`, ...).
//!
//! Every value is kept as the operator wrote it (`Option<String>`, `None` = not given) and
//! parsed by [`crate::config`] with Go's rules, so it can tell a flag given from one left at its
//! default (kube-proxy's `fs.Changed`), and report a bad value with exit code 2.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The version kproxy reports and emulates (kube-proxy's `--version` prints `Kubernetes vX`).
pub const KUBE_VERSION: &str = "v1.33.0";

#[derive(Debug, Parser)]
#[command(
    name = "kproxy",
    about = "kube-proxy replacement: programs Services into iptables, nftables or IPVS, and serves Ingress",
    args_conflicts_with_subcommands = true,
    disable_version_flag = true,
    args_override_self = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub flags: Flags,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print what a sync would program, without applying it (no root needed).
    Render {
        #[command(flatten)]
        flags: Flags,
        /// `rules`: the exact iptables-restore input (ipvs mode: the virtual services and the nft table); `services`: a `kubectl get svc`-like table.
        #[arg(long, default_value = "rules", value_parser = ["rules", "services"])]
        output: String,
    },
}

#[derive(Debug, Args, Default, Clone)]
pub struct Flags {
    // ---- kube-proxy's flags, in the order of its --help ----
    /// Overrides kube-proxy's idea of what its node's primary IP is (no socket is bound to it). Ignored with --config.
    #[arg(long, value_name = "IP")]
    pub bind_address: Option<String>,
    /// If true, failure to bind a health or metrics port is fatal (default: log and retry).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub bind_address_hard_fail: Option<String>,
    /// Accepted for compatibility (cadvisor's flag in kube-proxy's binary); no effect.
    #[arg(long, value_name = "PATH")]
    pub boot_id_file: Option<String>,
    /// Remove every rule kproxy created (every mode's), then exit.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub cleanup: Option<String>,
    /// Pod CIDR range(s) of the cluster (a dual-stack pair comma-separated). Ignored with --config.
    #[arg(long, value_name = "CIDRS")]
    pub cluster_cidr: Option<String>,
    /// KubeProxyConfiguration file. As in kube-proxy, its values replace the flags' except logging flags and --hostname-override.
    #[arg(long, value_name = "PATH")]
    pub config: Option<String>,
    /// How often configuration from the apiserver is refreshed (default 15m0s); no effect in kproxy (watches never resync).
    #[arg(long, value_name = "DURATION")]
    pub config_sync_period: Option<String>,
    /// Maximum number of NAT connections to track per CPU core (default 32768; 0 leaves the limit as-is and ignores --conntrack-min).
    #[arg(long, value_name = "N")]
    pub conntrack_max_per_core: Option<String>,
    /// Minimum number of conntrack entries to allocate, regardless of --conntrack-max-per-core (default 131072).
    #[arg(long, value_name = "N")]
    pub conntrack_min: Option<String>,
    /// Enable liberal mode for tracking TCP packets (nf_conntrack_tcp_be_liberal=1).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub conntrack_tcp_be_liberal: Option<String>,
    /// NAT timeout for TCP connections in the CLOSE_WAIT state (default 1h0m0s).
    #[arg(long, value_name = "DURATION")]
    pub conntrack_tcp_timeout_close_wait: Option<String>,
    /// Idle timeout for established TCP connections (default 24h0m0s; 0 leaves it as-is).
    #[arg(long, value_name = "DURATION")]
    pub conntrack_tcp_timeout_established: Option<String>,
    /// Idle timeout for UNREPLIED UDP connections (0 leaves it as-is).
    #[arg(long, value_name = "DURATION")]
    pub conntrack_udp_timeout: Option<String>,
    /// Idle timeout for ASSURED UDP connections (0 leaves it as-is).
    #[arg(long, value_name = "DURATION")]
    pub conntrack_udp_timeout_stream: Option<String>,
    /// How local traffic is recognised: ClusterCIDR (default), NodeCIDR, BridgeInterface, InterfaceNamePrefix. Ignored with --config.
    #[arg(long, value_name = "MODE")]
    pub detect_local_mode: Option<String>,
    /// key=value pairs of feature gates (kube-proxy v1.33's). Ignored with --config.
    #[arg(long, value_name = "GATES", action = clap::ArgAction::Append)]
    pub feature_gates: Vec<String>,
    /// IP:port of the health server (/healthz, /livez), default 0.0.0.0:10256; empty disables it. Ignored with --config.
    #[arg(long, value_name = "ADDR")]
    pub healthz_bind_address: Option<String>,
    /// Deprecated: port of the health server; 0 disables it.
    #[arg(long, value_name = "PORT", hide = true)]
    pub healthz_port: Option<String>,
    /// Node name to use instead of the hostname (the DaemonSet passes $(NODE_NAME)); wins over the config file.
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,
    /// Do the one-time node setup that needs full root (conntrack and other sysctls), then exit.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub init_only: Option<String>,
    /// If false, NodePorts are not reachable on 127.0.0.1 (iptables mode, IPv4; default true).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub iptables_localhost_nodeports: Option<String>,
    /// The fwmark bit (0-31) that marks packets for SNAT (default 14).
    #[arg(long, value_name = "BIT")]
    pub iptables_masquerade_bit: Option<String>,
    /// Minimum interval between syncs (default 1s; 0: every change syncs at once); not in ipvs mode.
    #[arg(long, value_name = "DURATION")]
    pub iptables_min_sync_period: Option<String>,
    /// Interval of full resyncs (default 30s); not in ipvs mode.
    #[arg(long, value_name = "DURATION")]
    pub iptables_sync_period: Option<String>,
    /// CIDRs (comma-separated) whose IPVS virtual services kproxy never touches.
    #[arg(long, value_name = "CIDRS", action = clap::ArgAction::Append)]
    pub ipvs_exclude_cidrs: Vec<String>,
    /// IPVS mode: minimum interval between syncs.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_min_sync_period: Option<String>,
    /// IPVS scheduler: rr (default), wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, mh, fo, ovf, twos.
    #[arg(long, value_name = "NAME")]
    pub ipvs_scheduler: Option<String>,
    /// IPVS mode: set arp_ignore=1 and arp_announce=2.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub ipvs_strict_arp: Option<String>,
    /// IPVS mode: interval of full resyncs.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_sync_period: Option<String>,
    /// IPVS timeout of idle TCP sessions; 0 leaves the kernel's value.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_tcp_timeout: Option<String>,
    /// IPVS timeout of TCP sessions after a FIN; 0 leaves the kernel's value.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_tcpfin_timeout: Option<String>,
    /// IPVS timeout of UDP flows; 0 leaves the kernel's value.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_udp_timeout: Option<String>,
    /// Burst of requests to the API server (default 10).
    #[arg(long, value_name = "N")]
    pub kube_api_burst: Option<String>,
    /// Content type of requests to the API server (default application/vnd.kubernetes.protobuf; kproxy speaks JSON).
    #[arg(long, value_name = "TYPE")]
    pub kube_api_content_type: Option<String>,
    /// Requests per second to the API server (default 5).
    #[arg(long, value_name = "QPS")]
    pub kube_api_qps: Option<String>,
    /// kubeconfig file with authorization and API server location.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<String>,
    /// Maximum seconds between log flushes (default 5s); kproxy writes every line at once.
    #[arg(long, value_name = "DURATION")]
    pub log_flush_frequency: Option<String>,
    /// [Alpha] buffer size of info messages in split-stream JSON logging.
    #[arg(long, value_name = "QUANTITY")]
    pub log_json_info_buffer_size: Option<String>,
    /// [Alpha] JSON logging: errors to stderr, info to stdout.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub log_json_split_stream: Option<String>,
    /// [Alpha] buffer size of info messages in split-stream text logging.
    #[arg(long, value_name = "QUANTITY")]
    pub log_text_info_buffer_size: Option<String>,
    /// [Alpha] text logging: errors to stderr, info to stdout.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub log_text_split_stream: Option<String>,
    /// Log format: text (default) or json (one JSON object per line).
    #[arg(long, value_name = "FORMAT")]
    pub logging_format: Option<String>,
    /// Accepted for compatibility (cadvisor's flag in kube-proxy's binary); no effect.
    #[arg(long, value_name = "PATHS")]
    pub machine_id_file: Option<String>,
    /// Masquerade all traffic sent to Service cluster IPs.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub masquerade_all: Option<String>,
    /// API server address (overrides the kubeconfig's server).
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,
    /// IP:port of the metrics server (/metrics), default 127.0.0.1:10249; empty disables it. Ignored with --config.
    #[arg(long, value_name = "ADDR")]
    pub metrics_bind_address: Option<String>,
    /// Deprecated: port of the metrics server; 0 disables it.
    #[arg(long, value_name = "PORT", hide = true)]
    pub metrics_port: Option<String>,
    /// CIDRs (comma-separated) of the node addresses that accept NodePorts, or `primary`. Default: all (nftables: primary).
    #[arg(long, value_name = "CIDRS", action = clap::ArgAction::Append)]
    pub nodeport_addresses: Vec<String>,
    /// oom_score_adj of the process, -1000..1000 (default -999).
    #[arg(long, value_name = "N")]
    pub oom_score_adj: Option<String>,
    /// Bridge the pods sit behind (with --detect-local-mode=BridgeInterface).
    #[arg(long, value_name = "NAME")]
    pub pod_bridge_interface: Option<String>,
    /// Prefix of pod interface names (with --detect-local-mode=InterfaceNamePrefix).
    #[arg(long, value_name = "PREFIX")]
    pub pod_interface_name_prefix: Option<String>,
    /// pprof on the metrics server in kube-proxy; no effect in kproxy.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub profiling: Option<String>,
    /// Proxy mode: iptables (default), ipvs or nftables. Ignored with --config.
    #[arg(long, value_name = "MODE")]
    pub proxy_mode: Option<String>,
    /// The previous minor version (1.32) whose hidden metrics to show; kproxy hides none.
    #[arg(long, value_name = "VERSION")]
    pub show_hidden_metrics_for_version: Option<String>,
    /// Log verbosity as in kube-proxy: 0-3 info, 4 debug, 5+ trace.
    #[arg(short = 'v', long = "v", value_name = "N")]
    pub verbosity: Option<String>,
    /// Print the version (`--version=raw` for details) and exit.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL|raw")]
    pub version: Option<String>,
    /// pattern=N,... per-file verbosity (klog); kproxy has no per-file levels: no effect.
    #[arg(long, value_name = "PATTERNS")]
    pub vmodule: Option<String>,
    /// Write the effective configuration to this file in kube-proxy's format, and exit.
    #[arg(long, value_name = "PATH")]
    pub write_config_to: Option<String>,
    // ---- kube-proxy's Windows-only flags: accepted, no meaning on Linux ----
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", hide = true)]
    pub windows_service: Option<String>,
    #[arg(long, hide = true)]
    pub network_name: Option<String>,
    #[arg(long, hide = true)]
    pub source_vip: Option<String>,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", hide = true)]
    pub enable_dsr: Option<String>,
    #[arg(long, hide = true)]
    pub root_hnsendpoint_name: Option<String>,
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", hide = true)]
    pub forward_healthcheck_vip: Option<String>,

    // ---- kproxy's own ----
    /// kproxy: minimum interval between syncs in every mode; wins over the file and the mode's flags.
    #[arg(long, value_name = "DURATION")]
    pub min_sync_period: Option<String>,
    /// kproxy: interval of full resyncs in every mode; wins over the file and the mode's flags.
    #[arg(long, value_name = "DURATION")]
    pub sync_period: Option<String>,
    /// Read Services, EndpointSlices and Nodes from this YAML file or directory instead of a cluster.
    #[arg(long, value_name = "PATH")]
    pub manifests: Option<PathBuf>,
    /// With --manifests: the range cluster IPs are allocated from for Services that have none.
    #[arg(long, value_name = "CIDR")]
    pub service_cluster_ip_range: Option<String>,
    /// IPVS mode: longest wait for a removed real server's connections to drain; 0 waits until they do.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_graceful_period: Option<String>,
    /// Ignore `spec.externalIPs` of every Service (CVE-2020-8554: any user who can create a
    /// Service can otherwise capture traffic to any IP).
    #[arg(long)]
    pub disable_external_ips: bool,
    /// Do not serve Ingress (no HTTP/HTTPS listeners, no Ingress watchers).
    #[arg(long)]
    pub disable_ingress: bool,
    /// host:port of the Ingress HTTP listener (default 0.0.0.0:80); empty disables it.
    #[arg(long, value_name = "ADDR")]
    pub ingress_http_bind_address: Option<String>,
    /// host:port of the Ingress HTTPS listener (default 0.0.0.0:443); empty disables it.
    #[arg(long, value_name = "ADDR")]
    pub ingress_https_bind_address: Option<String>,
    /// The IngressClass name kproxy serves (default kproxy); IngressClasses with controller
    /// kproxy.io/ingress-controller are served too.
    #[arg(long, value_name = "NAME")]
    pub ingress_class: Option<String>,
    /// Address (IP or hostname) the elected kproxy writes to served Ingresses'
    /// status.loadBalancer.ingress; default: this node's first address.
    #[arg(long, value_name = "ADDR")]
    pub ingress_status_address: Option<String>,
    /// Log one line per proxied request (at info).
    #[arg(long)]
    pub ingress_access_log: bool,
    /// Parse flags and --config, print the effective configuration and exit.
    #[arg(long)]
    pub validate: bool,
}
