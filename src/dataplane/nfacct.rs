//! nfacct, the kernel's named packet/byte counters (`nfnetlink_acct`), as kube-proxy uses
//! them: iptables rules count into them with `-m nfacct --nfacct-name NAME` and the metrics
//! read them at scrape time. Unlike a rule's own counters they survive the rule being
//! rewritten by iptables-restore, so the metrics are cumulative.
//!
//! Requests are values encoded to bytes (`nfacct add NAME`, `nfacct list`), replies decoded
//! from bytes; [`ensure`] and [`list`] are the only functions that touch a socket.

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

/// The counter kproxy's `ctstate INVALID` drop rule counts into (upstream's name).
pub const CT_STATE_INVALID_DROPPED: &str = "ct_state_invalid_dropped_pkts";
/// The counter of NodePort packets accepted on 127.0.0.0/8 (upstream's name).
pub const LOCALHOST_NODEPORTS_ACCEPTED: &str = "localhost_nodeps_accepted_pkts";

const NFNL_SUBSYS_ACCT: u16 = 7;
const NFNL_MSG_ACCT_NEW: u16 = 0;
const NFNL_MSG_ACCT_GET: u16 = 1;
const NFACCT_NAME: u16 = 1;
const NFACCT_PKTS: u16 = 2;
const NFACCT_BYTES: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `EBUSY`: the kernel's answer to creating a counter that exists.
const EBUSY: i32 = 16;

/// One counter as `nfacct list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

/// `nfacct add NAME`: a new counter at zero.
pub fn encode_add(name: &str, seq: u32) -> Vec<u8> {
    let mut attr = name.as_bytes().to_vec();
    attr.push(0);
    message(
        NFNL_MSG_ACCT_NEW,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
        seq,
        &[(NFACCT_NAME, &attr)],
    )
}

/// `nfacct list`: a dump of every counter in this network namespace.
pub fn encode_list(seq: u32) -> Vec<u8> {
    message(NFNL_MSG_ACCT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, &[])
}

fn message(msg: u16, flags: u16, seq: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut body = vec![
        0u8, /* AF_UNSPEC */
        0,   /* NFNETLINK_V0 */
        0, 0, /* res_id */
    ];
    for (kind, value) in attrs {
        let len = 4 + value.len();
        body.extend_from_slice(&(len as u16).to_ne_bytes());
        body.extend_from_slice(&kind.to_ne_bytes());
        body.extend_from_slice(value);
        body.resize(body.len().div_ceil(4) * 4, 0);
    }
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&((NFNL_SUBSYS_ACCT << 8) | msg).to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&body);
    out
}

/// One decoded netlink message of an nfacct exchange.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Counter(Counter),
    /// An acknowledgement (`0`) or an error (a positive errno).
    Ack(i32),
    Done,
}

/// Decodes every message in one datagram.
pub fn decode(mut buf: &[u8]) -> Result<Vec<Reply>, String> {
    let mut out = Vec::new();
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes(buf[0..4].try_into().map_err(|_| "short header")?) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < 16 || len > buf.len() {
            return Err(format!("netlink message of length {len} in {} bytes", buf.len()));
        }
        let payload = &buf[16..len];
        match kind {
            NLMSG_DONE => out.push(Reply::Done),
            NLMSG_ERROR => {
                let errno = i32::from_ne_bytes(
                    payload
                        .get(0..4)
                        .ok_or("short error")?
                        .try_into()
                        .map_err(|_| "short error")?,
                );
                out.push(Reply::Ack(-errno));
            }
            _ => out.push(Reply::Counter(decode_counter(payload.get(4..).unwrap_or_default())?)),
        }
        buf = &buf[(len.div_ceil(4) * 4).min(buf.len())..];
        if buf.len() < 16 {
            break;
        }
    }
    Ok(out)
}

fn decode_counter(mut attrs: &[u8]) -> Result<Counter, String> {
    let mut c = Counter {
        name: String::new(),
        packets: 0,
        bytes: 0,
    };
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return Err(format!("attribute of length {len} in {} bytes", attrs.len()));
        }
        let value = &attrs[4..len];
        let be64 = |v: &[u8]| {
            v.try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| "bad counter".to_string())
        };
        match kind {
            NFACCT_NAME => c.name = String::from_utf8_lossy(value).trim_end_matches('\0').to_string(),
            NFACCT_PKTS => c.packets = be64(value)?,
            NFACCT_BYTES => c.bytes = be64(value)?,
            _ => {}
        }
        attrs = &attrs[(len.div_ceil(4) * 4).min(attrs.len())..];
        if attrs.len() < 4 {
            break;
        }
    }
    Ok(c)
}

/// The socket of the process's own network namespace, kept from one exchange to the next.
/// Closing a NETLINK_NETFILTER socket is not free: nf_tables' release notifier takes the
/// ruleset's commit mutex and waits there for the deferred release of recent commits, so a
/// socket closed at every scrape could hold up a sync's commit (BENCHMARKS.md, "Where a slow
/// change's time went"). Threads in other namespaces (tests) open one per exchange: a kept
/// socket would keep their namespace alive.
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

/// Sends one request and reads its answer, on the kept socket where there is one. The socket
/// goes back only after a complete answer (after an error, parts of one may still be queued).
fn exchange(msg: &[u8]) -> Result<Vec<Reply>, String> {
    let keep = in_process_netns();
    let kept = if keep {
        KEPT.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    } else {
        None
    };
    let mut socket = match kept {
        Some(s) => s,
        None => connect()?,
    };
    let answer = request(&mut socket, msg);
    if keep && answer.is_ok() {
        *KEPT.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(socket);
    }
    answer?
}

/// The outer error is the socket's (it is not reused), the inner one the kernel's answer.
fn request(socket: &mut Socket, msg: &[u8]) -> Result<Result<Vec<Reply>, String>, String> {
    socket.send(msg, 0).map_err(|e| format!("sending to nfnetlink: {e}"))?;
    let mut out = Vec::new();
    loop {
        let (buf, _) = socket
            .recv_from_full()
            .map_err(|e| format!("reading from nfnetlink: {e}"))?;
        for reply in decode(&buf)? {
            match reply {
                Reply::Done => return Ok(Ok(out)),
                Reply::Ack(0) => return Ok(Ok(out)),
                Reply::Ack(errno) => return Ok(Err(std::io::Error::from_raw_os_error(errno).to_string())),
                c => out.push(c),
            }
        }
    }
}

/// Every counter in this network namespace.
pub fn list() -> Result<Vec<Counter>, String> {
    Ok(exchange(&encode_list(1))?
        .into_iter()
        .filter_map(|r| match r {
            Reply::Counter(c) => Some(c),
            _ => None,
        })
        .collect())
}

/// Creates the counter unless it exists (kube-proxy's `nfacct.Ensure`).
pub fn ensure(name: &str) -> Result<(), String> {
    match exchange(&encode_add(name, 1)) {
        Ok(_) => Ok(()),
        Err(e) if e == std::io::Error::from_raw_os_error(EBUSY).to_string() => Ok(()),
        Err(e) => Err(format!("nfacct add {name}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept_port() -> Option<u32> {
        let kept = KEPT.lock().unwrap();
        kept.as_ref().map(|s| {
            let mut addr = SocketAddr::new(0, 0);
            s.get_address(&mut addr).unwrap();
            addr.port_number()
        })
    }

    /// Scrapes reuse one socket in the process's namespace (closing one costs the kernel's
    /// commit mutex), and threads in other namespaces keep none. Skipped where the kernel has
    /// no nfacct or without root.
    #[test]
    fn the_process_namespace_keeps_its_socket() {
        if list().is_err() {
            eprintln!("skipping: nfacct unavailable here");
            return;
        }
        let first = kept_port().expect("a socket kept after a complete answer");
        list().unwrap();
        list().unwrap();
        // Another test of this process may have taken it meanwhile; none do but this one.
        assert_eq!(kept_port(), Some(first), "the same socket answered again");
        let other = crate::dataplane::nftables::socket::tests::in_netns(|| {
            let before = kept_port();
            let listed = list().is_ok();
            (before, listed, kept_port())
        });
        if let Some((before, listed, after)) = other {
            assert!(listed, "a new namespace's counters are listed too");
            assert_eq!(
                before, after,
                "a thread in another namespace neither took nor replaced the kept socket"
            );
        }
    }

    #[test]
    fn add_request_is_an_acct_new_with_the_name() {
        let msg = encode_add("ct_state_invalid_dropped_pkts", 7);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize, msg.len());
        assert_eq!(
            u16::from_ne_bytes([msg[4], msg[5]]),
            0x0700,
            "NFNL_SUBSYS_ACCT << 8 | NEW"
        );
        assert_eq!(u16::from_ne_bytes([msg[6], msg[7]]), 0x405, "REQUEST|ACK|CREATE");
        assert_eq!(&msg[16..20], &[0, 0, 0, 0], "nfgenmsg AF_UNSPEC v0");
        assert_eq!(
            u16::from_ne_bytes([msg[20], msg[21]]),
            4 + 30,
            "attribute length includes the NUL"
        );
        assert_eq!(&msg[24..53], b"ct_state_invalid_dropped_pkts");
        assert_eq!(msg.len() % 4, 0);
    }

    #[test]
    fn decodes_a_dump_with_big_endian_counters() {
        let mut attrs = Vec::new();
        let mut attr = |kind: u16, v: &[u8]| {
            attrs.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
            attrs.extend_from_slice(&kind.to_ne_bytes());
            attrs.extend_from_slice(v);
            attrs.resize(attrs.len().div_ceil(4) * 4, 0);
        };
        attr(NFACCT_NAME, b"localhost_nodeps_accepted_pkts\0");
        attr(NFACCT_PKTS, &42u64.to_be_bytes());
        attr(NFACCT_BYTES, &4200u64.to_be_bytes());
        let mut msg = Vec::new();
        msg.extend_from_slice(&((20 + attrs.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&0x0700u16.to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&[0; 4]);
        msg.extend_from_slice(&attrs);
        let mut done = vec![0u8; 20];
        done[0..4].copy_from_slice(&20u32.to_ne_bytes());
        done[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        msg.extend_from_slice(&done);
        assert_eq!(
            decode(&msg).unwrap(),
            [
                Reply::Counter(Counter {
                    name: "localhost_nodeps_accepted_pkts".into(),
                    packets: 42,
                    bytes: 4200
                }),
                Reply::Done
            ]
        );
    }
}
