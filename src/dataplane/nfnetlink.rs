//! nfnetlink (NETLINK_NETFILTER) requests and replies for the subsystems kproxy talks to
//! outside nftables: nfacct's counters and conntrack's entries. Messages are values encoded to
//! bytes and replies decoded from bytes; [`exchange`] is the one function that touches a
//! socket, and it keeps that socket from one exchange to the next.
//!
//! Closing a NETLINK_NETFILTER socket is not free: nf_tables' release notifier takes the
//! ruleset's commit mutex and waits there for the deferred release of recent commits (an RCU
//! grace period), so a socket closed at every scrape or every conntrack cleanup could hold up
//! a sync's commit (BENCHMARKS.md, "Where a slow change's time went"; docs/nftables.md).

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use super::nlattr;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `struct nlmsghdr` and `struct nfgenmsg`.
const HEADER: usize = 16;
const NFGENMSG: usize = 4;

/// Attributes being encoded (`struct nlattr`, each padded to 4 bytes).
#[derive(Debug, Default)]
pub struct Attrs(Vec<u8>);

impl Attrs {
    pub fn put(&mut self, kind: u16, value: &[u8]) -> &mut Attrs {
        self.0.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        self.0.resize(self.0.len().div_ceil(4) * 4, 0);
        self
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// A nested attribute holding what `inner` puts.
    pub fn nest(&mut self, kind: u16, inner: impl FnOnce(&mut Attrs)) -> &mut Attrs {
        let mut nested = Attrs::default();
        inner(&mut nested);
        self.put(kind | NLA_F_NESTED, &nested.0)
    }
}

/// One request: `subsys << 8 | msg`, the nfgenmsg's `family`, then `attrs`.
pub fn message(subsys: u16, msg: u16, family: u8, flags: u16, seq: u32, attrs: &Attrs) -> Vec<u8> {
    let len = HEADER + NFGENMSG + attrs.0.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&((subsys << 8) | msg).to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, NFNETLINK_V0, res_id 0.
    out.extend_from_slice(&[family, 0, 0, 0]);
    out.extend_from_slice(&attrs.0);
    out
}

/// One decoded message of an answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// A message of the subsystem: its type (without the subsystem), the nfgenmsg's family,
    /// and its attributes.
    Message {
        msg: u16,
        family: u8,
        attrs: &'a [u8],
    },
    /// An acknowledgement (`0`) or an error (a positive errno).
    Ack(i32),
    Done,
}

/// Every message in one datagram.
pub fn decode(buf: &[u8]) -> Result<Vec<Reply<'_>>, String> {
    let mut out = Vec::new();
    for m in nlattr::messages(buf) {
        let m = m.map_err(|_| format!("a truncated netlink message in {} bytes", buf.len()))?;
        out.push(match m.kind {
            NLMSG_DONE => Reply::Done,
            NLMSG_ERROR => Reply::Ack(-(nlattr::u32_at(m.body, 0).ok_or("short error message")? as i32)),
            kind => Reply::Message {
                msg: kind & 0xff,
                family: m.body.first().copied().unwrap_or(0),
                attrs: m.body.get(NFGENMSG..).unwrap_or_default(),
            },
        });
    }
    Ok(out)
}

/// The socket of the process's own network namespace, kept from one exchange to the next.
/// Threads in other namespaces (tests) open one per exchange: a kept socket would keep their
/// namespace alive, and answer for the wrong one.
static KEPT: std::sync::Mutex<Option<Socket>> = std::sync::Mutex::new(None);

fn in_process_netns() -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &str| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    matches!((ino("/proc/thread-self/ns/net"), ino("/proc/self/ns/net")), (Some(a), Some(b)) if a == b)
}

fn connect() -> Result<Socket, String> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| format!("nfnetlink socket: {e}"))?;
    socket
        .bind_auto()
        .map_err(|e| format!("binding nfnetlink socket: {e}"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(|e| format!("connecting nfnetlink socket: {e}"))?;
    Ok(socket)
}

/// Sends one request and hands every message of its answer to `each` (family, attributes),
/// until the dump's end or the acknowledgement; on the kept socket where there is one. An
/// error is the kernel's (`Err(errno)` from the answer) or the socket's; the socket goes back
/// only after a complete answer (after an error, parts of one may still be queued).
pub fn exchange(msg: &[u8], mut each: impl FnMut(u8, &[u8])) -> Result<(), Error> {
    let keep = in_process_netns();
    let kept = if keep {
        KEPT.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    } else {
        None
    };
    let mut socket = match kept {
        Some(s) => s,
        None => connect().map_err(Error::Socket)?,
    };
    let answer = request(&mut socket, msg, &mut each);
    if keep && !matches!(answer, Err(Error::Socket(_))) {
        *KEPT.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(socket);
    }
    answer
}

/// Why an exchange failed.
#[derive(Debug, PartialEq, Eq)]
pub enum Error {
    /// The kernel's answer: this errno.
    Kernel(i32),
    /// The socket failed or the answer did not decode; the socket is not reused.
    Socket(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Kernel(errno) => write!(f, "{}", std::io::Error::from_raw_os_error(*errno)),
            Error::Socket(why) => f.write_str(why),
        }
    }
}

fn request(socket: &mut Socket, msg: &[u8], each: &mut dyn FnMut(u8, &[u8])) -> Result<(), Error> {
    socket
        .send(msg, 0)
        .map_err(|e| Error::Socket(format!("sending to nfnetlink: {e}")))?;
    loop {
        let (buf, _) = socket
            .recv_from_full()
            .map_err(|e| Error::Socket(format!("reading from nfnetlink: {e}")))?;
        for reply in decode(&buf).map_err(Error::Socket)? {
            match reply {
                Reply::Done | Reply::Ack(0) => return Ok(()),
                // Also how a dump that failed ends.
                Reply::Ack(errno) => return Err(Error::Kernel(errno)),
                Reply::Message { family, attrs, .. } => each(family, attrs),
            }
        }
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// The port of the kept socket, if one is kept.
    pub fn kept_port() -> Option<u32> {
        let kept = KEPT.lock().unwrap();
        kept.as_ref().map(|s| {
            let mut addr = SocketAddr::new(0, 0);
            s.get_address(&mut addr).unwrap();
            addr.port_number()
        })
    }

    #[test]
    fn messages_and_nested_attributes_are_framed_and_padded() {
        let mut attrs = Attrs::default();
        attrs.put(1, b"abc").nest(2, |n| {
            n.put(3, &[7]);
        });
        let msg = message(1, 2, 10, NLM_F_REQUEST | NLM_F_ACK, 9, &attrs);
        assert_eq!(nlattr::u32_at(&msg, 0), Some(msg.len() as u32));
        assert_eq!(nlattr::u16_at(&msg, 4), Some(0x0102), "subsys << 8 | msg");
        assert_eq!(nlattr::u16_at(&msg, 6), Some(0x5));
        assert_eq!(nlattr::u32_at(&msg, 8), Some(9), "sequence");
        assert_eq!(&msg[16..20], &[10, 0, 0, 0], "nfgenmsg: family, v0, res_id");
        let parsed: Vec<(u16, Vec<u8>)> = nlattr::iter(&msg[20..]).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(parsed[0], (1, b"abc".to_vec()));
        assert_eq!(parsed[1].0, 2, "the nested flag is masked");
        assert_eq!(nlattr::u16_at(&msg, 20 + 8 + 2), Some(2 | NLA_F_NESTED));
        assert_eq!(nlattr::iter(&parsed[1].1).collect::<Vec<_>>(), [(3, &[7u8][..])]);
        assert_eq!(msg.len() % 4, 0);
    }

    #[test]
    fn decodes_messages_errors_and_the_end_of_a_dump() {
        let mut buf = message(1, 0, 2, 0, 1, Attrs::default().put(5, &[1, 2, 3, 4]));
        let mut err = vec![0u8; 36];
        err[0..4].copy_from_slice(&36u32.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-2i32).to_ne_bytes());
        buf.extend_from_slice(&err);
        let mut done = vec![0u8; 20];
        done[0..4].copy_from_slice(&20u32.to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        buf.extend_from_slice(&done);
        let replies = decode(&buf).unwrap();
        assert_eq!(
            replies,
            [
                Reply::Message {
                    msg: 0,
                    family: 2,
                    attrs: &buf[20..28]
                },
                Reply::Ack(2),
                Reply::Done
            ]
        );
        assert!(decode(&buf[..10]).unwrap().is_empty(), "a partial header is no message");
        let mut short = buf.clone();
        short[0..4].copy_from_slice(&200u32.to_ne_bytes());
        assert!(decode(&short).is_err(), "a length beyond the datagram");
    }
}
