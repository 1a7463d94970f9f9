//! Command-line flags, named as kube-proxy names them.
//!
//! Every flag is optional here so that [`crate::config`] can tell a flag the operator gave
//! (which overrides the `--config` file) from one left at its default.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kproxy",
    version,
    about = "kube-proxy replacement: programs Services into iptables, and serves Ingress",
    args_conflicts_with_subcommands = true
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
    /// KubeProxyConfiguration file; flags given on the command line override its fields.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// kubeconfig file with authorization and API server location.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// API server address (overrides the kubeconfig's server).
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,
    /// Node name to use instead of the hostname (the DaemonSet passes $(NODE_NAME)).
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,
    /// Which proxy mode to use: iptables (default), ipvs or nftables.
    #[arg(long, value_name = "MODE")]
    pub proxy_mode: Option<String>,
    /// Pod CIDR range(s) of the cluster, comma-separated; traffic from outside is masqueraded.
    #[arg(long, value_name = "CIDRS")]
    pub cluster_cidr: Option<String>,
    /// CIDRs (comma-separated) of the node addresses that accept NodePorts, or `primary`. Default: all.
    #[arg(long, value_name = "CIDRS")]
    pub nodeport_addresses: Option<String>,
    /// Masquerade all traffic sent to Service cluster IPs.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub masquerade_all: Option<bool>,
    /// The fwmark bit (0-31) that marks packets for masquerade.
    #[arg(long, value_name = "BIT")]
    pub iptables_masquerade_bit: Option<u8>,
    /// How local (pod) traffic is recognised: ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix.
    #[arg(long, value_name = "MODE")]
    pub detect_local_mode: Option<String>,
    /// Bridge the pods sit behind (with --detect-local-mode=BridgeInterface).
    #[arg(long, value_name = "NAME")]
    pub pod_bridge_interface: Option<String>,
    /// Prefix of pod interface names (with --detect-local-mode=InterfaceNamePrefix).
    #[arg(long, value_name = "PREFIX")]
    pub pod_interface_name_prefix: Option<String>,
    /// host:port of the health server (/healthz, /livez); empty disables it.
    #[arg(long, value_name = "ADDR")]
    pub healthz_bind_address: Option<String>,
    /// host:port of the metrics server (/metrics); empty disables it.
    #[arg(long, value_name = "ADDR")]
    pub metrics_bind_address: Option<String>,
    /// Minimum interval between syncs, e.g. 200ms, 1s.
    #[arg(long, alias = "iptables-min-sync-period", value_name = "DURATION")]
    pub min_sync_period: Option<String>,
    /// Interval of full resyncs, e.g. 30s, 1m.
    #[arg(long, alias = "iptables-sync-period", value_name = "DURATION")]
    pub sync_period: Option<String>,
    /// IPVS scheduler: rr (default), wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, mh, fo, ovf, twos.
    #[arg(long, value_name = "NAME")]
    pub ipvs_scheduler: Option<String>,
    /// IPVS mode: minimum interval between syncs (overrides --min-sync-period).
    #[arg(long, value_name = "DURATION")]
    pub ipvs_min_sync_period: Option<String>,
    /// IPVS mode: interval of full resyncs (overrides --sync-period).
    #[arg(long, value_name = "DURATION")]
    pub ipvs_sync_period: Option<String>,
    /// IPVS mode: set arp_ignore=1 and arp_announce=2, so service addresses are not answered by ARP.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub ipvs_strict_arp: Option<bool>,
    /// IPVS timeout of idle TCP sessions; 0 leaves the kernel's value.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_tcp_timeout: Option<String>,
    /// IPVS timeout of TCP sessions after a FIN; 0 leaves the kernel's value.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_tcpfin_timeout: Option<String>,
    /// IPVS timeout of UDP flows; 0 leaves the kernel's value.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_udp_timeout: Option<String>,
    /// CIDRs (comma-separated) whose IPVS virtual services kproxy never touches.
    #[arg(long, value_name = "CIDRS")]
    pub ipvs_exclude_cidrs: Option<String>,
    /// IPVS mode: longest wait for a removed real server's connections to drain; 0 waits until they do.
    #[arg(long, value_name = "DURATION")]
    pub ipvs_graceful_period: Option<String>,
    /// Remove every rule kproxy created, then exit.
    #[arg(long)]
    pub cleanup: bool,
    /// Log verbosity as in kube-proxy: 0-3 info, 4 debug, 5+ trace.
    #[arg(short = 'v', long = "v", value_name = "N")]
    pub verbosity: Option<u8>,
    /// Read Services, EndpointSlices and Nodes from this YAML file or directory instead of a cluster.
    #[arg(long, value_name = "PATH")]
    pub manifests: Option<PathBuf>,
    /// With --manifests: the range cluster IPs are allocated from for Services that have none.
    #[arg(long, value_name = "CIDR")]
    pub service_cluster_ip_range: Option<String>,
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
