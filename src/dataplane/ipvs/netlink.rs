//! The kernel's IPVS generic-netlink family as pure values: requests encode to bytes, replies
//! decode from bytes. Layout from the kernel's `include/uapi/linux/ip_vs.h` and
//! `linux/genetlink.h`; nothing here touches a socket (see [`super::client`]).
//!
//! A request mirrors the `ipvsadm` command it replaces: [`Request::NewService`] is `ipvsadm -A`,
//! [`Request::NewDest`] is `ipvsadm -a`, and so on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::dataplane::nlattr::{iter as attrs, messages, u16_at, u32_at, Message};
use crate::model::Protocol;

/// Netlink message types and flags (`linux/netlink.h`).
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLA_F_NESTED: u16 = 0x8000;

/// The generic-netlink controller (`linux/genetlink.h`), which maps family names to ids.
pub const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

/// The family's name and version (`IPVS_GENL_NAME`, `IPVS_GENL_VERSION`).
pub const IPVS_FAMILY: &str = "IPVS";
const IPVS_GENL_VERSION: u8 = 1;

/// `IPVS_CMD_*`.
mod cmd {
    pub const NEW_SERVICE: u8 = 1;
    pub const SET_SERVICE: u8 = 2;
    pub const DEL_SERVICE: u8 = 3;
    pub const GET_SERVICE: u8 = 4;
    pub const NEW_DEST: u8 = 5;
    pub const SET_DEST: u8 = 6;
    pub const DEL_DEST: u8 = 7;
    pub const GET_DEST: u8 = 8;
    pub const SET_CONFIG: u8 = 12;
    pub const GET_INFO: u8 = 15;
}

/// `IPVS_CMD_ATTR_*`: the first level of every command.
mod cmd_attr {
    pub const SERVICE: u16 = 1;
    pub const DEST: u16 = 2;
    pub const TIMEOUT_TCP: u16 = 4;
    pub const TIMEOUT_TCP_FIN: u16 = 5;
    pub const TIMEOUT_UDP: u16 = 6;
}

/// `IPVS_SVC_ATTR_*`, nested in [`cmd_attr::SERVICE`].
mod svc_attr {
    pub const AF: u16 = 1;
    pub const PROTOCOL: u16 = 2;
    pub const ADDR: u16 = 3;
    pub const PORT: u16 = 4;
    pub const SCHED_NAME: u16 = 6;
    pub const FLAGS: u16 = 7;
    pub const TIMEOUT: u16 = 8;
    pub const NETMASK: u16 = 9;
}

/// `IPVS_DEST_ATTR_*`, nested in [`cmd_attr::DEST`].
mod dest_attr {
    pub const ADDR: u16 = 1;
    pub const PORT: u16 = 2;
    pub const FWD_METHOD: u16 = 3;
    pub const WEIGHT: u16 = 4;
    pub const U_THRESH: u16 = 5;
    pub const L_THRESH: u16 = 6;
    pub const ACTIVE_CONNS: u16 = 7;
    pub const INACT_CONNS: u16 = 8;
    pub const ADDR_FAMILY: u16 = 11;
}

/// `IPVS_INFO_ATTR_VERSION` in the reply to `IPVS_CMD_GET_INFO`.
const INFO_ATTR_VERSION: u16 = 1;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// `IP_VS_SVC_F_PERSISTENT`: the virtual service keeps a client on one real server.
pub const SVC_F_PERSISTENT: u32 = 0x1;
/// Flags the kernel sets itself and reports back (`IP_VS_SVC_F_HASHED`); never compared.
const SVC_F_HASHED: u32 = 0x2;
/// `IP_VS_CONN_F_MASQ`: the masquerading (NAT) forwarding method.
pub const FWD_MASQ: u32 = 0;

/// A virtual service's identity: what `ipvsadm -t|-u|--sctp-service ADDR:PORT` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VsKey {
    pub addr: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for VsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{}:{a}:{}", self.protocol, self.port),
            IpAddr::V6(a) => write!(f, "{}:[{a}]:{}", self.protocol, self.port),
        }
    }
}

/// A virtual service and its options (`ipvsadm -A -s SCHED [-p TIMEOUT]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualService {
    pub key: VsKey,
    pub scheduler: std::sync::Arc<str>,
    /// `IP_VS_SVC_F_*`, without the kernel-owned hashed bit.
    pub flags: u32,
    /// Persistence timeout in seconds (meaningful with [`SVC_F_PERSISTENT`]).
    pub timeout: u32,
}

/// A real server of a virtual service (`ipvsadm -a -r ADDR:PORT -m -w WEIGHT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RealServer {
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// `IP_VS_CONN_F_*` forwarding method; kproxy always uses [`FWD_MASQ`].
    pub fwd_method: u32,
}

/// A real server as the kernel reports it: with its connection counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RealServerState {
    pub server: RealServer,
    pub active_conns: u32,
    pub inactive_conns: u32,
}

/// One change to the kernel's IPVS table. The value is inert until a client executes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `ipvsadm -A`: fails if the service exists.
    NewService(VirtualService),
    /// `ipvsadm -E`: changes scheduler, flags or timeout of an existing service.
    SetService(VirtualService),
    /// `ipvsadm -D`: removes the service and its real servers.
    DelService(VsKey),
    /// `ipvsadm -a`.
    NewDest(VsKey, RealServer),
    /// `ipvsadm -e`: changes the weight of an existing real server.
    SetDest(VsKey, RealServer),
    /// `ipvsadm -d`.
    DelDest(VsKey, RealServer),
    /// `ipvsadm --set TCP TCPFIN UDP` (seconds); zero leaves a value as it is.
    SetTimeouts { tcp: u32, tcp_fin: u32, udp: u32 },
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::NewService(s) => write!(f, "add service {} ({})", s.key, s.scheduler),
            Request::SetService(s) => write!(f, "edit service {} ({})", s.key, s.scheduler),
            Request::DelService(k) => write!(f, "delete service {k}"),
            Request::NewDest(k, r) => write!(f, "add real server {} to {k}", addr_port(r.addr, r.port)),
            Request::SetDest(k, r) => write!(
                f,
                "set weight {} of real server {} in {k}",
                r.weight,
                addr_port(r.addr, r.port)
            ),
            Request::DelDest(k, r) => write!(f, "delete real server {} from {k}", addr_port(r.addr, r.port)),
            Request::SetTimeouts { tcp, tcp_fin, udp } => {
                write!(f, "set timeouts tcp {tcp}s tcpfin {tcp_fin}s udp {udp}s")
            }
        }
    }
}

/// `ip:port`, bracketed for IPv6, as ipvsadm writes it.
pub fn addr_port(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// Appends one attribute (header, payload, padding to 4 bytes).
fn put_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len() + (4 - len % 4) % 4, 0);
}

fn put_nested(buf: &mut Vec<u8>, kind: u16, inner: &[u8]) {
    put_attr(buf, kind | NLA_F_NESTED, inner);
}

fn put_u16(buf: &mut Vec<u8>, kind: u16, v: u16) {
    put_attr(buf, kind, &v.to_ne_bytes());
}

fn put_u32(buf: &mut Vec<u8>, kind: u16, v: u32) {
    put_attr(buf, kind, &v.to_ne_bytes());
}

/// Ports travel in network byte order (`__be16`).
fn put_port(buf: &mut Vec<u8>, kind: u16, port: u16) {
    put_attr(buf, kind, &port.to_be_bytes());
}

fn af(ip: &IpAddr) -> u16 {
    match ip {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

/// Addresses travel as `union nf_inet_addr` (16 bytes), IPv4 in the first four, as ipvsadm sends them.
fn inet_addr(ip: &IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => out.copy_from_slice(&a.octets()),
    }
    out
}

fn proto_number(p: Protocol) -> u16 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

fn proto_from_number(n: u16) -> Option<Protocol> {
    match n {
        6 => Some(Protocol::Tcp),
        17 => Some(Protocol::Udp),
        132 => Some(Protocol::Sctp),
        _ => None,
    }
}

/// The attributes that name a service: family, protocol, address, port.
fn service_key_attrs(key: &VsKey) -> Vec<u8> {
    let mut b = Vec::new();
    put_u16(&mut b, svc_attr::AF, af(&key.addr));
    put_u16(&mut b, svc_attr::PROTOCOL, proto_number(key.protocol));
    put_attr(&mut b, svc_attr::ADDR, &inet_addr(&key.addr));
    put_port(&mut b, svc_attr::PORT, key.port);
    b
}

/// A full service entry, as NEW_SERVICE and SET_SERVICE require it.
fn service_attrs(svc: &VirtualService) -> Vec<u8> {
    let mut b = service_key_attrs(&svc.key);
    let mut name = svc.scheduler.as_bytes().to_vec();
    name.push(0);
    put_attr(&mut b, svc_attr::SCHED_NAME, &name);
    // struct ip_vs_flags { flags, mask }: the mask says which bits to set.
    let mut flags = svc.flags.to_ne_bytes().to_vec();
    flags.extend_from_slice(&u32::MAX.to_ne_bytes());
    put_attr(&mut b, svc_attr::FLAGS, &flags);
    put_u32(&mut b, svc_attr::TIMEOUT, svc.timeout);
    // Persistence granularity: one client address (a /32 mask, or for IPv6 a prefix length).
    let netmask = match svc.key.addr {
        IpAddr::V4(_) => u32::MAX,
        IpAddr::V6(_) => 128,
    };
    put_u32(&mut b, svc_attr::NETMASK, netmask);
    b
}

fn dest_attrs(rs: &RealServer, full: bool) -> Vec<u8> {
    let mut b = Vec::new();
    put_attr(&mut b, dest_attr::ADDR, &inet_addr(&rs.addr));
    put_port(&mut b, dest_attr::PORT, rs.port);
    if full {
        put_u32(&mut b, dest_attr::FWD_METHOD, rs.fwd_method);
        put_u32(&mut b, dest_attr::WEIGHT, rs.weight);
        put_u32(&mut b, dest_attr::U_THRESH, 0);
        put_u32(&mut b, dest_attr::L_THRESH, 0);
    }
    put_u16(&mut b, dest_attr::ADDR_FAMILY, af(&rs.addr));
    b
}

/// A whole netlink message: nlmsghdr, genlmsghdr, attributes.
fn message(family: u16, flags: u16, seq: u32, command: u8, version: u8, attrs: &[u8]) -> Vec<u8> {
    let len = 16 + 4 + attrs.len();
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&family.to_ne_bytes());
    b.extend_from_slice(&flags.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills in ours
    b.push(command);
    b.push(version);
    b.extend_from_slice(&0u16.to_ne_bytes());
    b.extend_from_slice(attrs);
    b
}

/// `CTRL_CMD_GETFAMILY` for `name`: the first message on any generic-netlink socket.
pub fn encode_get_family(name: &str, seq: u32) -> Vec<u8> {
    let mut attrs = Vec::new();
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    put_attr(&mut attrs, CTRL_ATTR_FAMILY_NAME, &n);
    message(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        1,
        &attrs,
    )
}

/// `IPVS_CMD_GET_INFO`: the kernel's IPVS version.
pub fn encode_get_info(family: u16, seq: u32) -> Vec<u8> {
    message(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        cmd::GET_INFO,
        IPVS_GENL_VERSION,
        &[],
    )
}

/// Dump of every virtual service (`ipvsadm -Ln`, first half).
pub fn encode_dump_services(family: u16, seq: u32) -> Vec<u8> {
    message(
        family,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        cmd::GET_SERVICE,
        IPVS_GENL_VERSION,
        &[],
    )
}

/// Dump of the real servers of one virtual service.
pub fn encode_dump_dests(family: u16, seq: u32, key: &VsKey) -> Vec<u8> {
    let mut attrs = Vec::new();
    put_nested(&mut attrs, cmd_attr::SERVICE, &service_key_attrs(key));
    message(
        family,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        cmd::GET_DEST,
        IPVS_GENL_VERSION,
        &attrs,
    )
}

impl Request {
    /// The bytes of this request for the IPVS family id `family`, asking for an acknowledgement.
    pub fn encode(&self, family: u16, seq: u32) -> Vec<u8> {
        let mut attrs = Vec::new();
        let command = match self {
            Request::NewService(svc) | Request::SetService(svc) => {
                put_nested(&mut attrs, cmd_attr::SERVICE, &service_attrs(svc));
                if matches!(self, Request::NewService(_)) {
                    cmd::NEW_SERVICE
                } else {
                    cmd::SET_SERVICE
                }
            }
            Request::DelService(key) => {
                put_nested(&mut attrs, cmd_attr::SERVICE, &service_key_attrs(key));
                cmd::DEL_SERVICE
            }
            Request::NewDest(key, rs) | Request::SetDest(key, rs) | Request::DelDest(key, rs) => {
                put_nested(&mut attrs, cmd_attr::SERVICE, &service_key_attrs(key));
                let full = !matches!(self, Request::DelDest(..));
                put_nested(&mut attrs, cmd_attr::DEST, &dest_attrs(rs, full));
                match self {
                    Request::NewDest(..) => cmd::NEW_DEST,
                    Request::SetDest(..) => cmd::SET_DEST,
                    _ => cmd::DEL_DEST,
                }
            }
            Request::SetTimeouts { tcp, tcp_fin, udp } => {
                for (kind, v) in [
                    (cmd_attr::TIMEOUT_TCP, tcp),
                    (cmd_attr::TIMEOUT_TCP_FIN, tcp_fin),
                    (cmd_attr::TIMEOUT_UDP, udp),
                ] {
                    if *v > 0 {
                        put_u32(&mut attrs, kind, *v);
                    }
                }
                cmd::SET_CONFIG
            }
        };
        message(
            family,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            command,
            IPVS_GENL_VERSION,
            &attrs,
        )
    }
}

/// Why a reply could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated netlink message")]
    Truncated,
    #[error("missing attribute {0}")]
    Missing(&'static str),
    #[error("unexpected value for {0}")]
    Bad(&'static str),
}

/// One message of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    /// A generic-netlink message: its sequence number, command and attributes.
    Data { seq: u32, command: u8, attrs: &'a [u8] },
    /// `NLMSG_ERROR`: zero is an acknowledgement, otherwise a negative errno.
    Error { seq: u32, errno: i32 },
    /// `NLMSG_DONE`: the end of a dump.
    Done { seq: u32 },
}

/// Splits one datagram from the kernel into its messages.
pub fn decode_replies(buf: &[u8]) -> Result<Vec<Reply<'_>>, DecodeError> {
    let mut out = Vec::new();
    for m in messages(buf) {
        let Message { kind, seq, body, .. } = m.map_err(|_| DecodeError::Truncated)?;
        out.push(match kind {
            NLMSG_ERROR => Reply::Error {
                seq,
                errno: u32_at(body, 0).ok_or(DecodeError::Truncated)? as i32,
            },
            NLMSG_DONE => Reply::Done { seq },
            _ => {
                let command = *body.first().ok_or(DecodeError::Truncated)?;
                Reply::Data {
                    seq,
                    command,
                    attrs: body.get(4..).ok_or(DecodeError::Truncated)?,
                }
            }
        });
    }
    Ok(out)
}

fn find(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|(k, _)| *k == kind).map(|(_, p)| p)
}

fn get_u16(buf: &[u8], kind: u16, name: &'static str) -> Result<u16, DecodeError> {
    find(buf, kind)
        .and_then(|p| u16_at(p, 0))
        .ok_or(DecodeError::Missing(name))
}

fn get_u32(buf: &[u8], kind: u16, name: &'static str) -> Result<u32, DecodeError> {
    find(buf, kind)
        .and_then(|p| u32_at(p, 0))
        .ok_or(DecodeError::Missing(name))
}

fn get_port(buf: &[u8], kind: u16) -> Result<u16, DecodeError> {
    let p = find(buf, kind).ok_or(DecodeError::Missing("port"))?;
    Ok(u16::from_be_bytes(
        p.get(..2)
            .and_then(|s| s.try_into().ok())
            .ok_or(DecodeError::Truncated)?,
    ))
}

fn get_addr(buf: &[u8], kind: u16, family: u16) -> Result<IpAddr, DecodeError> {
    let p = find(buf, kind).ok_or(DecodeError::Missing("address"))?;
    match family {
        AF_INET => {
            let o: [u8; 4] = p
                .get(..4)
                .and_then(|s| s.try_into().ok())
                .ok_or(DecodeError::Truncated)?;
            Ok(IpAddr::V4(Ipv4Addr::from(o)))
        }
        AF_INET6 => {
            let o: [u8; 16] = p
                .get(..16)
                .and_then(|s| s.try_into().ok())
                .ok_or(DecodeError::Truncated)?;
            Ok(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => Err(DecodeError::Bad("address family")),
    }
}

/// The family id from the controller's reply to [`encode_get_family`].
pub fn decode_family_id(attrs_buf: &[u8]) -> Result<u16, DecodeError> {
    get_u16(attrs_buf, CTRL_ATTR_FAMILY_ID, "CTRL_ATTR_FAMILY_ID")
}

/// The IPVS version (`0x010201` is 1.2.1) from the reply to [`encode_get_info`].
pub fn decode_info_version(attrs_buf: &[u8]) -> Result<u32, DecodeError> {
    get_u32(attrs_buf, INFO_ATTR_VERSION, "IPVS_INFO_ATTR_VERSION")
}

/// Formats an IPVS version number as the kernel prints it.
pub fn version_string(v: u32) -> String {
    format!("{}.{}.{}", (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff)
}

/// One service of a service dump. `None` for services kproxy never creates (firewall-mark
/// services, protocols it does not know): they are left alone.
pub fn decode_service(attrs_buf: &[u8]) -> Result<Option<VirtualService>, DecodeError> {
    let svc = find(attrs_buf, cmd_attr::SERVICE).ok_or(DecodeError::Missing("IPVS_CMD_ATTR_SERVICE"))?;
    let family = get_u16(svc, svc_attr::AF, "IPVS_SVC_ATTR_AF")?;
    if find(svc, svc_attr::ADDR).is_none() {
        return Ok(None); // a firewall-mark service
    }
    let Some(protocol) = proto_from_number(get_u16(svc, svc_attr::PROTOCOL, "IPVS_SVC_ATTR_PROTOCOL")?) else {
        return Ok(None);
    };
    let key = VsKey {
        addr: get_addr(svc, svc_attr::ADDR, family)?,
        protocol,
        port: get_port(svc, svc_attr::PORT)?,
    };
    let scheduler = find(svc, svc_attr::SCHED_NAME)
        .map(|p| String::from_utf8_lossy(p.split(|b| *b == 0).next().unwrap_or_default()).into())
        .unwrap_or_else(|| "".into());
    let flags = get_u32(svc, svc_attr::FLAGS, "IPVS_SVC_ATTR_FLAGS")? & !SVC_F_HASHED;
    let timeout = get_u32(svc, svc_attr::TIMEOUT, "IPVS_SVC_ATTR_TIMEOUT")?;
    Ok(Some(VirtualService {
        key,
        scheduler,
        flags,
        timeout,
    }))
}

/// One real server of a destination dump for a service of address family `of`.
pub fn decode_dest(attrs_buf: &[u8], of: &IpAddr) -> Result<RealServerState, DecodeError> {
    let d = find(attrs_buf, cmd_attr::DEST).ok_or(DecodeError::Missing("IPVS_CMD_ATTR_DEST"))?;
    // Kernels since 4.x report the real server's own family; older ones imply the service's.
    let family = get_u16(d, dest_attr::ADDR_FAMILY, "IPVS_DEST_ATTR_ADDR_FAMILY").unwrap_or(af(of));
    Ok(RealServerState {
        server: RealServer {
            addr: get_addr(d, dest_attr::ADDR, family)?,
            port: get_port(d, dest_attr::PORT)?,
            weight: get_u32(d, dest_attr::WEIGHT, "IPVS_DEST_ATTR_WEIGHT")?,
            fwd_method: get_u32(d, dest_attr::FWD_METHOD, "IPVS_DEST_ATTR_FWD_METHOD")? & 0x7,
        },
        active_conns: get_u32(d, dest_attr::ACTIVE_CONNS, "IPVS_DEST_ATTR_ACTIVE_CONNS").unwrap_or(0),
        inactive_conns: get_u32(d, dest_attr::INACT_CONNS, "IPVS_DEST_ATTR_INACT_CONNS").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests;
