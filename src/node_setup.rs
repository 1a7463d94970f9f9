//! The node setup kube-proxy does once at start, and alone with `--init-only`: conntrack
//! sysctls (`pkg/proxy/conntrack/sysctls.go` of v1.33), the process's `oom_score_adj`, and
//! `route_localnet` for localhost NodePorts.
//!
//! As kube-proxy: `nf_conntrack_max` = max(maxPerCore x CPUs, min) when maxPerCore > 0, the
//! conntrack `hashsize` raised to a quarter of it when smaller, the TCP timeouts and the UDP
//! ones when above zero, be-liberal when asked; each sysctl written only when it differs.
//! Unlike kube-proxy, a sysctl this network namespace cannot write (`nf_conntrack_max` and
//! `hashsize` belong to the initial namespace; a read-only /proc or /sys) is skipped with a
//! warning naming it instead of stopping the proxy: the node's own value then stays in force.

use std::path::{Path, PathBuf};

use crate::config::internal::{Conntrack, Nanos, SECOND};

/// One setting to make: a file under /proc/sys or /sys, and the value kube-proxy would write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// Path relative to the root (`proc/sys/net/netfilter/nf_conntrack_max`).
    pub path: &'static str,
    pub value: i64,
    /// Write only when the current value is lower (hashsize); otherwise whenever it differs.
    pub raise_only: bool,
}

pub const NF_CONNTRACK_MAX: &str = "proc/sys/net/netfilter/nf_conntrack_max";
pub const HASHSIZE: &str = "sys/module/nf_conntrack/parameters/hashsize";
pub const ROUTE_LOCALNET: &str = "proc/sys/net/ipv4/conf/all/route_localnet";

/// kube-proxy's `getConntrackMax`: 0 (leave the limit as it is) unless maxPerCore > 0.
pub fn conntrack_max(c: &Conntrack, cpus: usize) -> i64 {
    if c.max_per_core <= 0 {
        return 0;
    }
    let scaled = i64::from(c.max_per_core) * cpus as i64;
    scaled.max(i64::from(c.min))
}

/// Every conntrack setting kube-proxy makes for this configuration, in its order.
pub fn plan_conntrack(c: &Conntrack, cpus: usize) -> Vec<Setting> {
    let mut plan = Vec::new();
    let sysctl = |name: &'static str, value: i64| Setting {
        path: name,
        value,
        raise_only: false,
    };
    let max = conntrack_max(c, cpus);
    if max > 0 {
        plan.push(sysctl(NF_CONNTRACK_MAX, max));
        plan.push(Setting {
            path: HASHSIZE,
            value: max / 4,
            raise_only: true,
        });
    }
    let secs = |n: Nanos| n / SECOND;
    if c.tcp_established_timeout > 0 {
        plan.push(sysctl(
            "proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established",
            secs(c.tcp_established_timeout),
        ));
    }
    if c.tcp_close_wait_timeout > 0 {
        plan.push(sysctl(
            "proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait",
            secs(c.tcp_close_wait_timeout),
        ));
    }
    if c.tcp_be_liberal {
        plan.push(sysctl("proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal", 1));
    }
    if c.udp_timeout > 0 {
        plan.push(sysctl(
            "proc/sys/net/netfilter/nf_conntrack_udp_timeout",
            secs(c.udp_timeout),
        ));
    }
    if c.udp_stream_timeout > 0 {
        plan.push(sysctl(
            "proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream",
            secs(c.udp_stream_timeout),
        ));
    }
    plan
}

/// What happened to one setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Written: (previous value, new value).
    Set(i64, i64),
    /// Already as wanted (or higher, for raise-only settings).
    Unchanged(i64),
    /// Not writable here (another network namespace, read-only mount): the reason.
    Skipped(String),
}

/// Applies settings under `root` (`/` on a node; a scratch directory in tests).
pub fn apply(root: &Path, plan: &[Setting]) -> Vec<(Setting, Outcome)> {
    plan.iter()
        .map(|s| {
            let outcome = apply_one(&root.join(s.path), s);
            match &outcome {
                Outcome::Set(old, new) => tracing::info!(sysctl = s.path, old, new, "set"),
                Outcome::Unchanged(v) => tracing::debug!(sysctl = s.path, value = v, "already set"),
                Outcome::Skipped(why) => tracing::warn!(
                    sysctl = s.path,
                    wanted = s.value,
                    "not writable here, left as it is: {why}"
                ),
            }
            (s.clone(), outcome)
        })
        .collect()
}

fn apply_one(path: &PathBuf, s: &Setting) -> Outcome {
    let current = match std::fs::read_to_string(path) {
        Ok(t) => t.trim().parse::<i64>().ok(),
        Err(e) => return Outcome::Skipped(format!("reading {}: {e}", path.display())),
    };
    match current {
        Some(v) if v == s.value || (s.raise_only && v >= s.value) => return Outcome::Unchanged(v),
        _ => {}
    }
    match std::fs::write(path, s.value.to_string()) {
        Ok(()) => Outcome::Set(current.unwrap_or(-1), s.value),
        Err(e) => Outcome::Skipped(format!("writing {}: {e}", path.display())),
    }
}

/// CPUs of the node (not of this process's cpuset): kube-proxy counts them from sysfs.
pub fn node_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| count_cpu_list(s.trim()))
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Counts a kernel CPU list such as `0-3,8,10-11`.
pub fn count_cpu_list(s: &str) -> Option<usize> {
    let mut n = 0;
    for part in s.split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().ok()?.checked_sub(a.parse::<usize>().ok()?)? + 1,
            None => {
                part.parse::<usize>().ok()?;
                1
            }
        };
    }
    Some(n)
}

/// Sets this process's `oom_score_adj`; like kube-proxy, a failure is only logged.
pub fn apply_oom_score_adj(value: i32) {
    match std::fs::write("/proc/self/oom_score_adj", value.to_string()) {
        Ok(()) => tracing::info!(oom_score_adj = value, "set the process's oom_score_adj"),
        Err(e) => tracing::warn!(oom_score_adj = value, error = %e, "could not set oom_score_adj"),
    }
}

/// The whole setup: conntrack, oom_score_adj, and route_localnet when localhost NodePorts are
/// served (iptables mode, IPv4, NodePorts on every local address), as kube-proxy's iptables
/// proxier sets it.
pub fn run(config: &crate::config::Config) {
    let plan = plan_conntrack(&config.kube.conntrack, node_cpus());
    apply(Path::new("/"), &plan);
    apply_oom_score_adj(config.kube.oom_score_adj);
    if localhost_nodeports(config) {
        tracing::info!(
            "setting route_localnet=1 to allow NodePorts on localhost; to change this, set \
             --iptables-localhost-nodeports=false or --nodeport-addresses without loopback"
        );
        apply(
            Path::new("/"),
            &[Setting {
                path: ROUTE_LOCALNET,
                value: 1,
                raise_only: false,
            }],
        );
    }
}

/// Whether NodePorts answer on 127.0.0.1: iptables mode, IPv4, and `--nodeport-addresses`
/// covering loopback (unset, or a CIDR containing 127.0.0.1).
pub fn localhost_nodeports(config: &crate::config::Config) -> bool {
    use crate::dataplane::iptables::NodePortAddresses;
    config.localhost_nodeports
        && match &config.nodeport_addresses {
            NodePortAddresses::All => true,
            NodePortAddresses::Primary => false,
            NodePortAddresses::Cidrs(c) => c.iter().any(|n| n.contains(&std::net::IpAddr::from([127, 0, 0, 1]))),
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ct(max_per_core: i32, min: i32) -> Conntrack {
        Conntrack {
            max_per_core,
            min,
            tcp_established_timeout: 24 * 3600 * SECOND,
            tcp_close_wait_timeout: 3600 * SECOND,
            tcp_be_liberal: false,
            udp_timeout: 0,
            udp_stream_timeout: 0,
        }
    }

    #[test]
    fn conntrack_max_as_kube_proxy_computes_it() {
        assert_eq!(conntrack_max(&ct(32768, 131072), 2), 131072, "min wins on 2 CPUs");
        assert_eq!(conntrack_max(&ct(32768, 131072), 8), 262144, "per-core wins on 8");
        assert_eq!(conntrack_max(&ct(0, 131072), 8), 0, "0 leaves the limit as it is");
        assert_eq!(count_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpu_list("0"), Some(1));
    }

    #[test]
    fn plan_has_kube_proxy_order_and_skips_zero_timeouts() {
        let mut c = ct(32768, 0);
        c.tcp_be_liberal = true;
        c.udp_timeout = 30 * SECOND;
        let plan = plan_conntrack(&c, 4);
        let got: Vec<(&str, i64)> = plan
            .iter()
            .map(|s| (s.path.rsplit('/').next().unwrap(), s.value))
            .collect();
        assert_eq!(
            got,
            [
                ("nf_conntrack_max", 131072),
                ("hashsize", 32768),
                ("nf_conntrack_tcp_timeout_established", 86400),
                ("nf_conntrack_tcp_timeout_close_wait", 3600),
                ("nf_conntrack_tcp_be_liberal", 1),
                ("nf_conntrack_udp_timeout", 30),
            ]
        );
    }

    #[test]
    fn writes_what_differs_raises_hashsize_only_and_skips_the_unwritable() {
        let root = std::env::temp_dir().join(format!("kproxy-node-setup-{}", std::process::id()));
        let file = |p: &str, v: &str| {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, v).unwrap();
        };
        file(NF_CONNTRACK_MAX, "65536\n");
        file(HASHSIZE, "262144\n");
        file(
            "proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established",
            "432000\n",
        );
        let plan = plan_conntrack(&ct(32768, 131072), 2);
        let out = apply(&root, &plan);
        std::fs::remove_dir_all(&root).ok();
        assert_eq!(out[0].1, Outcome::Set(65536, 131072));
        assert_eq!(out[1].1, Outcome::Unchanged(262144), "a larger hashsize stays");
        assert_eq!(
            out[2].1,
            Outcome::Set(432000, 86400),
            "timeouts are set even when lower, as kube-proxy does"
        );
        assert!(
            matches!(out[3].1, Outcome::Skipped(_)),
            "a missing sysctl is skipped: {:?}",
            out[3]
        );
    }
}
