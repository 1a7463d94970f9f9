//! This node's IPs as kube-proxy decides them (`detectNodeIPs`): the Node's addresses, with
//! `--bind-address` (when it names an IP) taking the place of its family's first address and
//! making that family the primary one.

use std::net::IpAddr;

/// The Node's addresses with `bind` first, replacing the first address of its family; the
/// addresses are unchanged without a bind address (or with 0.0.0.0 / ::).
pub fn with_bind_address(addresses: &[IpAddr], bind: Option<IpAddr>) -> Vec<IpAddr> {
    let Some(bind) = bind.filter(|b| !b.is_unspecified()) else {
        return addresses.to_vec();
    };
    let mut out = vec![bind];
    let mut replaced = false;
    for a in addresses {
        if !replaced && a.is_ipv4() == bind.is_ipv4() {
            replaced = true;
            continue;
        }
        if *a != bind {
            out.push(*a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(v: &[&str]) -> Vec<IpAddr> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn bind_address_becomes_the_primary_ip_of_its_family() {
        let node = ips(&["10.0.0.5", "fd00::5"]);
        assert_eq!(with_bind_address(&node, None), node);
        assert_eq!(with_bind_address(&node, Some("0.0.0.0".parse().unwrap())), node);
        assert_eq!(
            with_bind_address(&node, Some("10.0.0.9".parse().unwrap())),
            ips(&["10.0.0.9", "fd00::5"])
        );
        assert_eq!(
            with_bind_address(&node, Some("fd00::9".parse().unwrap())),
            ips(&["fd00::9", "10.0.0.5"]),
            "an IPv6 bind address makes IPv6 primary"
        );
        assert_eq!(
            with_bind_address(&[], Some("10.0.0.9".parse().unwrap())),
            ips(&["10.0.0.9"]),
            "no Node IP: the bind address"
        );
    }
}
