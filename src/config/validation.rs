//! kube-proxy v1.33's validation of the resolved configuration
//! (`pkg/proxy/apis/config/validation`): every error names the field, as upstream's do.

use std::net::IpAddr;

use ipnet::IpNet;

use super::features::FeatureGates;
use super::internal::{KubeProxyConfig, Nanos};
use super::v1alpha1::{parse_quantity, split_host_port};
use super::{format_go_duration, IPVS_SCHEDULERS};

/// kube-proxy's `Validate`: the list of errors, empty when the configuration is usable.
pub fn validate(c: &KubeProxyConfig) -> Vec<String> {
    let mut errs = Vec::new();
    let mut err = |field: &str, value: &dyn std::fmt::Display, why: &str| {
        errs.push(format!("KubeProxyConfiguration.{field}: Invalid value: {value}: {why}"))
    };
    let dur = |n: Nanos| {
        if n < 0 {
            format!(
                "-{}",
                format_go_duration(std::time::Duration::from_nanos(n.unsigned_abs()))
            )
        } else {
            format_go_duration(std::time::Duration::from_nanos(n as u64))
        }
    };
    let gates = FeatureGates::new(c.feature_gates.clone());
    if let Err(e) = &gates {
        err("featureGates", &format!("{:?}", c.feature_gates), e);
    }
    if c.sync_period <= 0 {
        err("SyncPeriod", &dur(c.sync_period), "must be greater than 0");
    }
    if c.min_sync_period < 0 {
        err(
            "MinSyncPeriod",
            &dur(c.min_sync_period),
            "must be greater than or equal to 0",
        );
    }
    if c.min_sync_period > c.sync_period {
        err(
            "SyncPeriod",
            &dur(c.min_sync_period),
            "must be greater than or equal to KubeProxyConfiguration.MinSyncPeriod",
        );
    }
    if !c.detect_local.cluster_cidrs.is_empty() {
        validate_dual_stack_cidrs(&c.detect_local.cluster_cidrs, &mut err);
    }
    if !(-1000..=1000).contains(&c.oom_score_adj) {
        err(
            "linux.OOMScoreAdj",
            &c.oom_score_adj,
            "must be within the range [-1000, 1000]",
        );
    }
    if !(0..=31).contains(&c.iptables_masquerade_bit) {
        err(
            "KubeProxyIPTablesConfiguration.MasqueradeBit",
            &c.iptables_masquerade_bit,
            "must be within the range [0, 31]",
        );
    }
    match c.mode.as_str() {
        "ipvs" => {
            for (f, v) in [
                ("TCPTimeout", c.ipvs.tcp_timeout),
                ("TCPFinTimeout", c.ipvs.tcp_fin_timeout),
                ("UDPTimeout", c.ipvs.udp_timeout),
            ] {
                if v < 0 {
                    err(
                        &format!("KubeProxyIPVSConfiguration.{f}"),
                        &dur(v),
                        "must be greater than or equal to 0",
                    );
                }
            }
            if !c.ipvs.scheduler.is_empty() && !IPVS_SCHEDULERS.contains(&c.ipvs.scheduler.as_str()) {
                err(
                    "KubeProxyIPVSConfiguration.Scheduler",
                    &c.ipvs.scheduler,
                    &format!(
                        "must be one of {}, blank means the default (rr)",
                        IPVS_SCHEDULERS.join(", ")
                    ),
                );
            }
            for cidr in c.ipvs.exclude_cidrs.iter().flatten() {
                if cidr.parse::<IpNet>().is_err() {
                    err("KubeProxyIPVSConfiguration.ExcludeCidrs", cidr, "must be a valid CIDR");
                }
            }
        }
        "nftables" if !(0..=31).contains(&c.nftables_masquerade_bit) => err(
            "KubeProxyNFTablesConfiguration.MasqueradeBit",
            &c.nftables_masquerade_bit,
            "must be within the range [0, 31]",
        ),
        _ => {}
    }
    let ct = &c.conntrack;
    if ct.max_per_core < 0 {
        err(
            "KubeProxyConntrackConfiguration.MaxPerCore",
            &ct.max_per_core,
            "must be greater than or equal to 0",
        );
    }
    if ct.min < 0 {
        err(
            "KubeProxyConntrackConfiguration.Min",
            &ct.min,
            "must be greater than or equal to 0",
        );
    }
    for (f, v) in [
        ("TCPEstablishedTimeout", ct.tcp_established_timeout),
        ("TCPCloseWaitTimeout", ct.tcp_close_wait_timeout),
        ("UDPTimeout", ct.udp_timeout),
        ("UDPStreamTimeout", ct.udp_stream_timeout),
    ] {
        if v < 0 {
            err(
                &format!("KubeProxyConntrackConfiguration.{f}"),
                &dur(v),
                "must be greater than or equal to 0",
            );
        }
    }
    if !matches!(c.mode.as_str(), "" | "iptables" | "ipvs" | "nftables") {
        err(
            "Mode.ProxyMode",
            &c.mode,
            "must be iptables,ipvs,nftables or blank (blank means the best-available proxy [currently iptables])",
        );
    }
    if c.client_connection.burst < 0 {
        err(
            "ClientConnection.Burst",
            &c.client_connection.burst,
            "must be greater than or equal to 0",
        );
    }
    if c.config_sync_period <= 0 {
        err("ConfigSyncPeriod", &dur(c.config_sync_period), "must be greater than 0");
    }
    if c.bind_address.parse::<IpAddr>().is_err() {
        err(
            "BindAddress",
            &c.bind_address,
            "not a valid textual representation of an IP address",
        );
    }
    for (f, v) in [
        ("HealthzBindAddress", &c.healthz_bind_address),
        ("MetricsBindAddress", &c.metrics_bind_address),
    ] {
        if !v.is_empty() {
            if let Some(why) = host_port_error(v) {
                err(f, v, &why);
            }
        }
    }
    if let Some(list) = &c.node_port_addresses {
        for (i, a) in list.iter().enumerate() {
            if a == "primary" {
                if i != 0 || list.len() != 1 {
                    err(
                        &format!("NodePortAddresses[{i}]"),
                        a,
                        "can't use both 'primary' and CIDRs",
                    );
                }
                break;
            }
            if a.parse::<IpNet>().is_err() {
                err(&format!("NodePortAddresses[{i}]"), a, "must be a valid CIDR");
            }
        }
    }
    if !c.show_hidden_metrics_for_version.is_empty() && c.show_hidden_metrics_for_version != "1.32" {
        err(
            "ShowHiddenMetricsForVersion",
            &c.show_hidden_metrics_for_version,
            "--show-hidden-metrics-for-version must be omitted or have the value '1.32'. Only the previous minor version is allowed",
        );
    }
    match c.detect_local_mode.as_str() {
        "ClusterCIDR" | "NodeCIDR" | "" => {}
        "BridgeInterface" => {
            if let Some(why) = interface_error(&c.detect_local.bridge_interface) {
                err("InterfaceName", &format!("{:?}", c.detect_local.bridge_interface), &why);
            }
        }
        "InterfaceNamePrefix" => {
            if let Some(why) = interface_error(&c.detect_local.interface_name_prefix) {
                err(
                    "InterfacePrefix",
                    &format!("{:?}", c.detect_local.interface_name_prefix),
                    &why,
                );
            }
        }
        other => err(
            "DetectLocalMode",
            &other,
            "must be one of ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix",
        ),
    }
    if !matches!(c.logging.format.as_str(), "text" | "json") {
        err("logging.format", &c.logging.format, "Unsupported log format");
    }
    if let Ok(gates) = &gates {
        let alpha = gates.enabled("LoggingAlphaOptions");
        let beta = gates.enabled("LoggingBetaOptions");
        let text = &c.logging.text;
        if text.split_stream && !alpha {
            err(
                "logging.options.text.splitStream",
                &true,
                "Feature LoggingAlphaOptions is disabled",
            );
        }
        if parse_quantity(&text.info_buffer_size).unwrap_or(0) != 0 && !alpha {
            err(
                "logging.options.text.infoBufferSize",
                &text.info_buffer_size,
                "Feature LoggingAlphaOptions is disabled",
            );
        }
        let json = &c.logging.json;
        if json.split_stream && !beta {
            err(
                "logging.options.json.splitStream",
                &true,
                "Feature LoggingBetaOptions is disabled",
            );
        }
        if parse_quantity(&json.info_buffer_size).unwrap_or(0) != 0 && !beta {
            err(
                "logging.options.json.infoBufferSize",
                &json.info_buffer_size,
                "Feature LoggingBetaOptions is disabled",
            );
        }
    }
    if c.logging.flush_frequency < 0 {
        err(
            "logging.flushFrequency",
            &c.logging.flush_frequency,
            "Must be greater than or equal to 0",
        );
    }
    if !c.port_range.is_empty() && port_range_error(&c.port_range) {
        err("PortRange", &c.port_range, "must be a valid port range (e.g. 300-2000)");
    }
    errs
}

fn validate_dual_stack_cidrs(cidrs: &[String], err: &mut impl FnMut(&str, &dyn std::fmt::Display, &str)) {
    let parsed: Vec<Option<IpNet>> = cidrs.iter().map(|c| c.parse::<IpNet>().ok()).collect();
    for (i, (raw, p)) in cidrs.iter().zip(&parsed).enumerate() {
        if p.is_none() {
            err(&format!("DetectLocal.ClusterCIDRs[{i}]"), raw, "must be a valid CIDR");
        }
    }
    if cidrs.len() > 2 {
        err(
            "DetectLocal.ClusterCIDRs",
            &cidrs.join(","),
            "may specify no more than one CIDR for each IP family",
        );
    } else if let [Some(a), Some(b)] = parsed.as_slice() {
        if a.addr().is_ipv4() == b.addr().is_ipv4() {
            err(
                "DetectLocal.ClusterCIDRs",
                &cidrs.join(","),
                "may specify no more than one CIDR for each IP family",
            );
        }
    }
}

fn host_port_error(s: &str) -> Option<String> {
    let Some((host, port)) = split_host_port(s) else {
        return Some("must be IP:port".into());
    };
    if host.parse::<IpAddr>().is_err() {
        return Some(format!("{host:?} must be a valid IP"));
    }
    match port.parse::<u32>() {
        Ok(1..=65535) => None,
        _ => Some(format!("{port:?} must be a valid port")),
    }
}

/// A Linux interface name: 1-15 bytes, no '/', no whitespace.
fn interface_error(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".into());
    }
    if name.len() > 15 || name.contains('/') || name.chars().any(char::is_whitespace) || name == "." || name == ".." {
        return Some("must be a valid interface name".into());
    }
    None
}

fn port_range_error(s: &str) -> bool {
    let parts: Vec<&str> = if s.contains('-') {
        s.splitn(2, '-').collect()
    } else if s.contains('+') {
        s.splitn(2, '+').collect()
    } else {
        vec![s]
    };
    !parts.iter().all(|p| p.trim().parse::<u16>().is_ok())
}
