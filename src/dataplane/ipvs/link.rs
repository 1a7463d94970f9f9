//! The dummy interface that holds service addresses (`kube-ipvs0`, as kube-proxy names it, so
//! tooling recognizes it), its addresses, the node's own addresses, and IPVS's sysctls.
//! All over rtnetlink and /proc/sys; no `ip` binary.

use std::collections::BTreeSet;
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use rtnetlink::{Handle, LinkDummy};

use crate::dataplane::{DataplaneError, Result};

/// The dummy interface's name.
pub const DUMMY: &str = "kube-ipvs0";

const ENODEV: i32 = 19;
const EEXIST: i32 = 17;
const EADDRNOTAVAIL: i32 = 99;

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn nl(what: impl std::fmt::Display, e: rtnetlink::Error) -> DataplaneError {
    DataplaneError::Netlink(format!("{what}: {e}"))
}

/// An rtnetlink connection whose background task ends when the value is dropped.
pub struct Rtnl {
    pub handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Rtnl {
    pub fn connect() -> Result<Rtnl> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| DataplaneError::Netlink(e.to_string()))?;
        Ok(Rtnl {
            handle,
            task: tokio::spawn(conn),
        })
    }

    /// The index of the dummy interface, if it exists.
    pub async fn dummy_index(&self) -> Result<Option<u32>> {
        let mut links = self.handle.link().get().match_name(DUMMY.to_string()).execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(Some(link.header.index)),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
            Err(e) => Err(nl(format!("looking up {DUMMY}"), e)),
        }
    }

    /// Creates the dummy interface unless it exists (`ip link add kube-ipvs0 type dummy`).
    /// Like kube-proxy's, it stays down: addresses on it are local all the same.
    pub async fn ensure_dummy(&self) -> Result<u32> {
        if let Some(index) = self.dummy_index().await? {
            return Ok(index);
        }
        match self.handle.link().add(LinkDummy::new(DUMMY).build()).execute().await {
            Ok(()) => {}
            Err(e) if errno(&e) == Some(EEXIST) => {}
            Err(e) => return Err(nl(format!("creating {DUMMY} (is the dummy module available?)"), e)),
        }
        tracing::info!(interface = DUMMY, "created the dummy interface for service addresses");
        self.dummy_index()
            .await?
            .ok_or_else(|| DataplaneError::Netlink(format!("{DUMMY} vanished right after it was created")))
    }

    /// `ip link del kube-ipvs0`, if it exists.
    pub async fn delete_dummy(&self) -> Result<bool> {
        let Some(index) = self.dummy_index().await? else {
            return Ok(false);
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(ENODEV) => Ok(false),
            Err(e) => Err(nl(format!("deleting {DUMMY}"), e)),
        }
    }

    /// Every address in this network namespace, with the index of its interface.
    pub async fn addresses(&self) -> Result<Vec<(u32, IpAddr, u8)>> {
        let mut stream = self.handle.address().get().execute();
        let mut out = Vec::new();
        while let Some(msg) = stream.try_next().await.map_err(|e| nl("listing addresses", e))? {
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = addr.or_else(|| {
                msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = addr {
                out.push((msg.header.index, ip, msg.header.prefix_len));
            }
        }
        Ok(out)
    }

    /// `ip addr add IP/32 dev kube-ipvs0` (or /128).
    pub async fn add_address(&self, index: u32, ip: IpAddr) -> Result<()> {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        match self.handle.address().add(index, ip, prefix).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            Err(e) => Err(nl(format!("binding {ip} to {DUMMY}"), e)),
        }
    }

    /// `ip addr del IP dev kube-ipvs0`.
    pub async fn del_address(&self, index: u32, ip: IpAddr, prefix: u8) -> Result<()> {
        let mut req = self.handle.address().add(index, ip, prefix);
        let msg = req.message_mut().clone();
        match self.handle.address().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(EADDRNOTAVAIL) => Ok(()),
            Err(e) => Err(nl(format!("unbinding {ip} from {DUMMY}"), e)),
        }
    }
}

impl Drop for Rtnl {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Addresses of the node that NodePorts may be served on with "all addresses": every address
/// except the dummy interface's, loopback and IPv6 link-local ones.
pub fn node_addresses(all: &[(u32, IpAddr, u8)], dummy: Option<u32>) -> BTreeSet<IpAddr> {
    all.iter()
        .filter(|(index, ip, _)| {
            Some(*index) != dummy
                && !ip.is_loopback()
                && !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
        })
        .map(|(_, ip, _)| *ip)
        .collect()
}

/// A sysctl under /proc/sys, written only when it differs: a DaemonSet may mount /proc/sys
/// read-only, and then a value that is already right must not be an error.
pub fn ensure_sysctl(name: &str, want: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    let current = std::fs::read_to_string(&path)
        .map_err(|e| DataplaneError::Unsupported(format!("cannot read sysctl {name} ({path}): {e}")))?;
    if current.trim() == want {
        return Ok(());
    }
    std::fs::write(&path, want).map_err(|e| {
        DataplaneError::Unsupported(format!(
            "sysctl {name} is {} and must be {want}, but it cannot be written: {e}",
            current.trim()
        ))
    })?;
    tracing::info!(sysctl = name, from = current.trim(), to = want, "set sysctl");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_addresses_skip_dummy_loopback_and_link_local() {
        let all = vec![
            (1, "127.0.0.1".parse().unwrap(), 8),
            (2, "192.0.2.1".parse().unwrap(), 24),
            (2, "fe80::1".parse().unwrap(), 64),
            (2, "2001:db8::1".parse().unwrap(), 64),
            (9, "10.96.0.10".parse().unwrap(), 32),
        ];
        let got: Vec<String> = node_addresses(&all, Some(9)).iter().map(|i| i.to_string()).collect();
        assert_eq!(got, ["192.0.2.1", "2001:db8::1"]);
    }
}
