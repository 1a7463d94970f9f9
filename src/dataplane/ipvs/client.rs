//! The one place IPVS requests meet the kernel: a generic-netlink socket, the family lookup,
//! acknowledged requests and dumps. Calls are short and synchronous (the kernel answers at once).

use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

use super::netlink::{
    self, decode_replies, encode_dump_dests, encode_dump_services, encode_get_family, encode_get_info, Reply, Request,
    VirtualService, VsKey, IPVS_FAMILY,
};
use crate::dataplane::{DataplaneError, Result};

/// Errors that name what was asked.
fn nl_error(what: impl std::fmt::Display, e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Netlink(format!("{what}: {e}"))
}

/// `ENOENT`: the controller's answer for a family that does not exist.
const ENOENT: i32 = 2;

/// How one request failed: refused by the kernel with an errno, or lost on the socket.
#[derive(Debug)]
enum Failure {
    Kernel(i32),
    Socket(String),
}

impl Failure {
    fn context(self, what: impl std::fmt::Display) -> DataplaneError {
        match self {
            Failure::Kernel(errno) => {
                let err = std::io::Error::from_raw_os_error(errno);
                DataplaneError::Netlink(format!("{what}: {err} (errno {errno})"))
            }
            Failure::Socket(msg) => DataplaneError::Netlink(format!("{what}: {msg}")),
        }
    }
}

/// A connection to the kernel's IPVS family in the current network namespace.
pub struct IpvsClient {
    socket: Socket,
    family: u16,
    seq: u32,
    /// One receive buffer for every reply. Its size also tells the kernel how much to put in
    /// each datagram of a dump: the kernel sizes dump datagrams by the largest read it has
    /// seen (up to 32 KiB), and a dump restarts its walk of the service table for every
    /// datagram, so small reads made a service dump quadratic.
    buf: Vec<u8>,
}

/// `recv(2)`'s flag to report a datagram's real length even when it was cut.
const MSG_TRUNC: i32 = 0x20;

/// Larger than any datagram the kernel sends (dumps are at most 32 KiB each).
const RECV_BUFFER: usize = 64 * 1024;

impl IpvsClient {
    /// Opens a socket and resolves the IPVS family. A kernel without IPVS (no `ip_vs` module
    /// loaded or built) is [`DataplaneError::Unsupported`]: retrying will not help.
    pub fn connect() -> Result<IpvsClient> {
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(|e| nl_error("opening a generic netlink socket", e))?;
        socket
            .bind_auto()
            .map_err(|e| nl_error("binding the netlink socket", e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| nl_error("connecting the netlink socket", e))?;
        let mut client = IpvsClient {
            socket,
            family: netlink::GENL_ID_CTRL,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUFFER),
        };
        let seq = client.next_seq();
        let what = "looking up the IPVS generic netlink family";
        let attrs = match client.exchange(&encode_get_family(IPVS_FAMILY, seq), seq) {
            Ok(mut r) if !r.is_empty() => r.remove(0),
            Ok(_) => return Err(nl_error(what, "no reply")),
            Err(Failure::Kernel(ENOENT)) => {
                return Err(DataplaneError::Unsupported(
                    "this kernel has no IPVS: the generic netlink family \"IPVS\" does not exist \
                     (load the ip_vs module, or use --proxy-mode iptables)"
                        .into(),
                ))
            }
            Err(e) => return Err(e.context(what)),
        };
        client.family = netlink::decode_family_id(&attrs).map_err(|e| nl_error("IPVS family lookup", e))?;
        Ok(client)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// The kernel's IPVS version, e.g. `1.2.1`.
    pub fn version(&mut self) -> Result<String> {
        let seq = self.next_seq();
        let replies = self
            .exchange(&encode_get_info(self.family, seq), seq)
            .map_err(|e| e.context("IPVS_CMD_GET_INFO"))?;
        let attrs = replies
            .first()
            .ok_or_else(|| nl_error("IPVS_CMD_GET_INFO", "no reply"))?;
        let v = netlink::decode_info_version(attrs).map_err(|e| nl_error("IPVS_CMD_GET_INFO", e))?;
        Ok(netlink::version_string(v))
    }

    /// Every virtual service in the kernel (`ipvsadm -Ln`, services only). Each is decoded
    /// as its datagram arrives: at 10,000 services the raw replies are not kept beside them.
    pub fn services(&mut self) -> Result<Vec<VirtualService>> {
        let seq = self.next_seq();
        let mut out = Vec::new();
        let mut bad = None;
        self.exchange_each(
            &encode_dump_services(self.family, seq),
            seq,
            |attrs| match netlink::decode_service(attrs) {
                Ok(Some(svc)) => out.push(svc),
                Ok(None) => {}
                Err(e) => {
                    bad.get_or_insert(e);
                }
            },
        )
        .map_err(|e| e.context("listing IPVS services"))?;
        match bad {
            Some(e) => Err(nl_error("IPVS service dump", e)),
            None => Ok(out),
        }
    }

    /// The real servers of one virtual service.
    pub fn dests(&mut self, key: &VsKey) -> Result<Vec<netlink::RealServerState>> {
        let seq = self.next_seq();
        let what = format!("listing real servers of {key}");
        let replies = self
            .exchange(&encode_dump_dests(self.family, seq, key), seq)
            .map_err(|e| e.context(&what))?;
        replies
            .iter()
            .map(|attrs| netlink::decode_dest(attrs, &key.addr).map_err(|e| nl_error(&what, e)))
            .collect()
    }

    /// Sends one request and waits for the kernel's acknowledgement.
    pub fn execute(&mut self, request: &Request) -> Result<()> {
        let seq = self.next_seq();
        self.exchange(&request.encode(self.family, seq), seq)
            .map(|_| ())
            .map_err(|e| e.context(request))
    }

    /// Sends `msg` (which asks for an acknowledgement or a dump) and collects the attributes of
    /// every data message answering `seq`, until the acknowledgement or the end of the dump.
    fn exchange(&mut self, msg: &[u8], seq: u32) -> std::result::Result<Vec<Vec<u8>>, Failure> {
        let mut out = Vec::new();
        self.exchange_each(msg, seq, |attrs| out.push(attrs.to_vec()))?;
        Ok(out)
    }

    /// As [`Self::exchange`], handing each data message's attributes to `each` as it arrives.
    fn exchange_each(&mut self, msg: &[u8], seq: u32, mut each: impl FnMut(&[u8])) -> std::result::Result<(), Failure> {
        let socket = |e: std::io::Error| Failure::Socket(e.to_string());
        self.socket.send(msg, 0).map_err(socket)?;
        loop {
            self.buf.clear();
            let len = self.socket.recv(&mut self.buf, MSG_TRUNC).map_err(socket)?;
            if len > self.buf.len() {
                return Err(Failure::Socket(format!(
                    "a {len}-byte reply did not fit in {RECV_BUFFER} bytes"
                )));
            }
            for reply in decode_replies(&self.buf).map_err(|e| Failure::Socket(e.to_string()))? {
                match reply {
                    Reply::Data { seq: s, attrs, .. } if s == seq => each(attrs),
                    Reply::Error { seq: s, errno: 0 } | Reply::Done { seq: s } if s == seq => return Ok(()),
                    Reply::Error { seq: s, errno } if s == seq => return Err(Failure::Kernel(-errno)),
                    // A late answer to an earlier request: not ours any more.
                    _ => {}
                }
            }
        }
    }
}
