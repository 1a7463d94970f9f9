//! The one place nftables mode meets the kernel: a NETLINK_NETFILTER socket that sends one
//! batch at a time and reads its answer, asks for the ruleset generation, and dumps tables.
//! Calls are short and synchronous: the kernel processes a batch inside the `send`, so its
//! acknowledgements, errors and echoes are all queued by the time `send` returns.

use std::os::fd::AsFd;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use super::netlink::wire::{decode_replies, Attrs, Reply, NLM_F_DUMP_INTR};
use super::netlink::{
    self, decode_elements, encode_batch_into, encode_dump, encode_get_elements, encode_get_gen, msg, Data, Dump,
    Request, Table,
};
use crate::dataplane::{DataplaneError, Result};

/// Receive buffer: a batch's echoes (one message per new rule) must fit until they are read.
/// Transactions are bounded (see [`super::apply`]) so that they do.
const RCVBUF: usize = 16 << 20;

/// `ERESTART`: the kernel's answer to a batch planned against an older generation.
const ERESTART: i32 = 85;

/// How a batch failed. In every case the kernel kept the ruleset it had: nf_tables applies a
/// batch whole or not at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchError {
    /// Someone committed since the generation the batch was planned against.
    Generation,
    /// The kernel refused request `index` (the first refusal; later ones may only follow from it).
    Refused {
        index: usize,
        errno: i32,
        message: Option<String>,
    },
    /// The kernel refused the batch as a whole (its commit failed).
    Commit { errno: i32 },
    /// The socket failed, or the answer was incomplete: whether the batch was committed is
    /// unknown, and the caller must read the ruleset back.
    Lost(String),
}

/// What a committed batch reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// The generation after the commit, from the kernel's `NEWGEN` notification.
    pub generation: Option<u32>,
    /// For every request, the handle of the rule it created or replaced (from its echo).
    pub handles: Vec<Option<u64>>,
}

pub fn errno_text(errno: i32) -> String {
    format!("{} (errno {errno})", std::io::Error::from_raw_os_error(errno))
}

fn nl_error(what: &str, e: impl std::fmt::Display) -> DataplaneError {
    DataplaneError::Netlink(format!("{what}: {e}"))
}

/// A connection to nf_tables in the current network namespace.
pub struct NftSocket {
    socket: Socket,
    seq: u32,
    sndbuf: usize,
    /// One datagram at a time. At least 32 KiB, because the kernel sizes the parts of a dump
    /// by the reader's buffer (up to 32 KiB), and a dump restarts its walk of the table for
    /// every part: small parts make listing a large table quadratic. Grown when a datagram
    /// did not fit (see [`NftSocket::recv`]).
    buf: Vec<u8>,
    /// The last batch as sent: its capacity is reused by the next one, up to [`OUT_KEPT`].
    out: Vec<u8>,
}

/// Receive buffer per `recv`: a dump part (the kernel makes them at most 32 KiB) or one
/// answer to a batch (an acknowledgement, an error, a rule's echo: each its own datagram,
/// none near this size).
const RECV_BUF: usize = 64 << 10;

/// How much of a batch's buffer is kept between batches: a partial sync's batch fits; a cold
/// start's large transactions allocate theirs and give it back, so the steady state does not
/// keep the largest batch ever sent.
const OUT_KEPT: usize = 64 << 10;

/// Sets a netlink socket's receive buffer to `size`: beyond the system's maximum with
/// CAP_NET_ADMIN (which nftables mode needs anyway), else up to that maximum.
pub(super) fn set_rcvbuf(socket: &Socket, size: usize) {
    if nix::sys::socket::setsockopt(&socket.as_fd(), nix::sys::socket::sockopt::RcvBufForce, &size).is_err() {
        let _ = socket.set_rx_buf_sz(size);
    }
}

impl NftSocket {
    /// Opens the socket. Fails with [`DataplaneError::Unsupported`] where nf_tables cannot be
    /// reached at all (no netfilter netlink, no permission).
    pub fn connect() -> Result<NftSocket> {
        let mut socket = Socket::new(NETLINK_NETFILTER)
            .map_err(|e| DataplaneError::Unsupported(format!("cannot open a NETLINK_NETFILTER socket: {e}")))?;
        socket
            .bind_auto()
            .map_err(|e| nl_error("binding the netlink socket", e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| nl_error("connecting the netlink socket", e))?;
        // Errors carry the refused message's header only, and the kernel's explanation.
        let _ = socket.set_cap_ack(true);
        let _ = socket.set_ext_ack(true);
        // FORCE needs CAP_NET_ADMIN, which nftables mode needs anyway; without it the
        // system's maximum applies and very large batches fail with a clear error.
        set_rcvbuf(&socket, RCVBUF);
        let timeout = nix::sys::time::TimeVal::new(30, 0);
        let _ = nix::sys::socket::setsockopt(&socket.as_fd(), nix::sys::socket::sockopt::ReceiveTimeout, &timeout);
        Ok(NftSocket {
            socket,
            seq: std::process::id().wrapping_mul(1 << 16),
            sndbuf: 0,
            buf: vec![0; RECV_BUF],
            out: Vec::new(),
        })
    }

    /// The socket's netlink port id (what the kernel's notifications name as the sender).
    pub fn port_id(&self) -> Result<u32> {
        let mut addr = SocketAddr::new(0, 0);
        self.socket
            .get_address(&mut addr)
            .map_err(|e| nl_error("reading the netlink socket's address", e))?;
        Ok(addr.port_number())
    }

    /// Reads one datagram. One that did not fit the buffer is gone: the answer is reported
    /// incomplete (an `InvalidData` error), and the buffer grown so that the next one fits.
    fn recv(&mut self) -> std::io::Result<Vec<u8>> {
        let mut b = &mut self.buf[..];
        // With MSG_TRUNC a netlink socket returns the datagram's whole length.
        let n = self.socket.recv(&mut b, nix::libc::MSG_TRUNC)?;
        if n > self.buf.len() {
            self.buf = vec![0; n.next_power_of_two()];
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a datagram of {n} bytes did not fit the receive buffer"),
            ));
        }
        Ok(self.buf[..n].to_vec())
    }

    fn next_seq(&mut self, n: u32) -> u32 {
        let first = self.seq.wrapping_add(1);
        self.seq = self.seq.wrapping_add(n);
        first
    }

    fn send(&mut self, buf: &[u8]) -> std::io::Result<()> {
        // The kernel refuses a message larger than the send buffer; a batch is one message.
        if buf.len() + 4096 > self.sndbuf {
            let want = (buf.len() + 4096).next_power_of_two().max(1 << 20);
            let fd = self.socket.as_fd();
            nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SndBufForce, &want)
                .or_else(|_| nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SndBuf, &want))
                .map_err(std::io::Error::from)?;
            self.sndbuf = want;
        }
        self.socket.send(buf, 0).map(|_| ())
    }

    /// `NFT_MSG_GETGEN`: the ruleset generation, bumped by every commit in this namespace.
    pub fn generation(&mut self) -> Result<u32> {
        let seq = self.next_seq(1);
        self.send(&encode_get_gen(seq))
            .map_err(|e| nl_error("NFT_MSG_GETGEN", e))?;
        loop {
            let buf = self.recv().map_err(|e| nl_error("NFT_MSG_GETGEN", e))?;
            for reply in decode_replies(&buf).map_err(|e| nl_error("NFT_MSG_GETGEN", e))? {
                match reply {
                    Reply::Message {
                        seq: s,
                        kind: msg::NEWGEN,
                        attrs,
                        ..
                    } if s == seq => return netlink::decode_gen(attrs).map_err(|e| nl_error("NFT_MSG_NEWGEN", e)),
                    Reply::Error { seq: s, errno, .. } if s == seq && errno != 0 => {
                        return Err(nl_error("NFT_MSG_GETGEN", errno_text(errno)))
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sends `requests` as one transaction, checked against `genid` (0: unchecked).
    pub fn batch(&mut self, genid: u32, requests: &[Request]) -> std::result::Result<Committed, BatchError> {
        let n = requests.len() as u32;
        let begin = self.next_seq(n + 2);
        let first = begin.wrapping_add(1);
        let mut buf = std::mem::take(&mut self.out);
        encode_batch_into(&mut buf, genid, first, requests);
        let sent = self.send(&buf);
        if buf.capacity() > OUT_KEPT {
            buf = Vec::new();
        }
        self.out = buf;
        sent.map_err(|e| BatchError::Lost(format!("sending the batch: {e}")))?;

        let mut acked = vec![false; requests.len()];
        let mut pending = requests.len();
        let mut committed = Committed {
            generation: None,
            handles: vec![None; requests.len()],
        };
        let mut refused: Option<BatchError> = None;
        let mut lost = None;
        let index = |seq: u32| -> Option<usize> {
            let i = seq.wrapping_sub(first) as usize;
            (i < requests.len()).then_some(i)
        };
        // Everything was queued before `send` returned: read until the queue is empty.
        let _ = self.socket.set_non_blocking(true);
        loop {
            let data = match self.recv() {
                Ok(data) => data,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // A datagram that did not fit: the rest of the answer is still queued.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    lost = Some(format!("reading the answer: {e}"));
                    continue;
                }
                // ENOBUFS: the queue overflowed and some of the answer is gone; read the rest.
                Err(e) => {
                    lost = Some(format!("reading the answer: {e}"));
                    if e.raw_os_error() == Some(105) {
                        continue;
                    }
                    break;
                }
            };
            let Ok(replies) = decode_replies(&data) else {
                lost = Some("undecodable answer".into());
                continue;
            };
            for reply in replies {
                match reply {
                    Reply::Error { seq, errno, .. } if seq == begin && errno != 0 => {
                        refused = Some(if errno == ERESTART {
                            BatchError::Generation
                        } else {
                            BatchError::Commit { errno }
                        });
                        pending = 0;
                    }
                    Reply::Error { seq, errno, message } => {
                        let Some(i) = index(seq) else { continue };
                        if !acked[i] {
                            acked[i] = true;
                            pending = pending.saturating_sub(1);
                        }
                        let first_refusal = match &refused {
                            Some(BatchError::Refused { index, .. }) => i < *index,
                            Some(_) => false,
                            None => true,
                        };
                        if errno != 0 && first_refusal {
                            refused = Some(BatchError::Refused {
                                index: i,
                                errno,
                                message,
                            });
                        }
                    }
                    Reply::Message {
                        seq,
                        kind: msg::NEWRULE,
                        attrs,
                        ..
                    } => {
                        if let Some(i) = index(seq) {
                            committed.handles[i] = attrs.be64(3, "NFTA_RULE_HANDLE").ok();
                        }
                    }
                    Reply::Message {
                        kind: msg::NEWGEN,
                        attrs,
                        ..
                    } => committed.generation = netlink::decode_gen(attrs).ok(),
                    _ => {}
                }
            }
        }
        let _ = self.socket.set_non_blocking(false);
        match (refused, lost) {
            (Some(e), _) => Err(e),
            (None, Some(why)) => Err(BatchError::Lost(why)),
            (None, None) if pending > 0 => Err(BatchError::Lost(format!(
                "{pending} of {} requests were never acknowledged",
                requests.len()
            ))),
            (None, None) => Ok(committed),
        }
    }

    /// Dumps `what`, calling `each(kind, family, attributes)` for every message. Returns
    /// whether the ruleset changed during the dump (`NLM_F_DUMP_INTR`): the listing is then
    /// no snapshot. A missing table or set is `Ok(None)`.
    pub fn dump(
        &mut self,
        what: Dump,
        mut each: impl FnMut(u8, u8, Attrs) -> netlink::wire::DecodeResult<()>,
    ) -> Result<Option<bool>> {
        let seq = self.next_seq(1);
        let label = format!("listing {what:?}");
        self.send(&encode_dump(seq, what)).map_err(|e| nl_error(&label, e))?;
        let mut interrupted = false;
        loop {
            let buf = self.recv().map_err(|e| nl_error(&label, e))?;
            for reply in decode_replies(&buf).map_err(|e| nl_error(&label, e))? {
                match reply {
                    Reply::Message {
                        seq: s,
                        kind,
                        flags,
                        family,
                        attrs,
                    } if s == seq => {
                        interrupted |= flags & NLM_F_DUMP_INTR != 0;
                        each(kind, family, attrs).map_err(|e| nl_error(&label, e))?;
                    }
                    Reply::Done { seq: s, flags } if s == seq => {
                        return Ok(Some(interrupted || flags & NLM_F_DUMP_INTR != 0));
                    }
                    Reply::Error { seq: s, errno, .. } if s == seq => {
                        if errno == 2 {
                            return Ok(None);
                        }
                        return Err(nl_error(&label, errno_text(errno)));
                    }
                    _ => {}
                }
            }
        }
    }
}

impl NftSocket {
    /// Looks up `keys` in `set` of `table` (no dump): `found` is called with the index and
    /// the data (`None` in a plain set) of every key the set holds; keys it does not hold
    /// are left out.
    pub fn get_elements<K: AsRef<[u8]>>(
        &mut self,
        table: Table,
        set: &str,
        keys: &[K],
        mut found: impl FnMut(usize, Option<Data>),
    ) -> Result<()> {
        let label = format!("looking up elements of set {set}");
        // Bounded per send, so that the answers fit the receive buffer.
        for (c, chunk) in keys.chunks(GET_CHUNK).enumerate() {
            let base = c * GET_CHUNK;
            let first = self.next_seq(chunk.len() as u32);
            self.send(&encode_get_elements(first, table, set, chunk))
                .map_err(|e| nl_error(&label, e))?;
            let mut done = false;
            while !done {
                let buf = self.recv().map_err(|e| nl_error(&label, e))?;
                for reply in decode_replies(&buf).map_err(|e| nl_error(&label, e))? {
                    let index = |seq: u32| {
                        let i = seq.wrapping_sub(first) as usize;
                        (i < chunk.len()).then_some(i)
                    };
                    match reply {
                        Reply::Message {
                            seq,
                            kind: msg::NEWSETELEM,
                            attrs,
                            ..
                        } => {
                            if let Some(i) = index(seq) {
                                let (_, mut elements) = decode_elements(attrs).map_err(|e| nl_error(&label, e))?;
                                if let Some(e) = elements.pop() {
                                    found(base + i, e.data);
                                }
                            }
                        }
                        Reply::Error { seq, errno, .. } => {
                            let Some(i) = index(seq) else { continue };
                            // The last key's acknowledgement or error: every answer is in.
                            done |= i + 1 == chunk.len();
                            // 0: acknowledged; ENOENT: not in the set.
                            if errno != 0 && errno != 2 {
                                return Err(nl_error(&label, errno_text(errno)));
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }
}

/// Keys looked up per send: the kernel answers them all inside the send, without a pause
/// (about 3 µs a key), so a send is kept well under a millisecond.
const GET_CHUNK: usize = 128;

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::dataplane::nftables::netlink::{decode_rule, BaseHook, Element, SetSpec, Table};
    use crate::dataplane::nftables::netlink::{Data, Verdict};
    use crate::dataplane::nftables::rule::{Field, Key, Rule, SetDecl, SetKind, Stmt};
    use crate::model::{IpFamily, Protocol};

    /// Runs `f` on a thread in a new network namespace (processes it starts share it).
    /// `None` without the privileges for that: the caller skips.
    pub fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            Some(f())
        })
        .join()
        .expect("netns thread")
    }

    pub fn nft(args: &[&str]) -> String {
        let out = std::process::Command::new("nft").args(args).output().expect("nft");
        assert!(
            out.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    const T: Table = Table {
        family: IpFamily::V4,
        name: "kproxy",
    };

    fn map_spec() -> SetSpec {
        SetDecl {
            name: "service-ips".into(),
            kind: SetKind::AddrPortMap,
        }
        .spec(IpFamily::V4)
    }

    fn dnat(ip: &str) -> Vec<crate::dataplane::nftables::netlink::Expr> {
        Rule::new(vec![
            Stmt::L4proto(Protocol::Tcp),
            Stmt::Dnat {
                addr: ip.parse().unwrap(),
                port: 8080,
            },
        ])
        .lower(IpFamily::V4)
    }

    fn rules_of(sock: &mut NftSocket, chain: &str) -> Vec<(u64, Vec<crate::dataplane::nftables::netlink::Expr>)> {
        let mut out = Vec::new();
        sock.dump(Dump::Rules(T, Some(chain)), |_, _, a| {
            let r = decode_rule(a)?;
            out.push((r.handle, r.exprs));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn a_datagram_larger_than_the_buffer_fails_the_call_and_grows_the_buffer() {
        let Some(()) = in_netns(|| {
            let mut sock = NftSocket::connect().unwrap();
            assert_eq!(sock.buf.len(), RECV_BUF);
            sock.buf = vec![0; 16];
            let e = sock.generation().unwrap_err().to_string();
            assert!(e.contains("did not fit the receive buffer"), "{e}");
            assert!(sock.buf.len() > 16);
            sock.generation().unwrap();
        }) else {
            return;
        };
    }

    #[test]
    fn a_batch_writes_what_nft_lists_and_a_refused_one_changes_nothing() {
        let Some(()) = in_netns(|| {
            let mut sock = NftSocket::connect().unwrap();
            let gen = sock.generation().unwrap();
            let vmap = Rule::new(vec![Stmt::Vmap {
                key: vec![Field::Daddr, Field::L4proto, Field::ThDport],
                map: "service-ips".into(),
            }]);
            let requests = vec![
                Request::AddTable(T),
                Request::AddChain {
                    table: T,
                    name: "nat-prerouting".into(),
                    hook: Some(BaseHook {
                        kind: "nat",
                        hook: netlink::hook::PREROUTING,
                        priority: -100,
                    }),
                },
                Request::AddChain {
                    table: T,
                    name: "svc".into(),
                    hook: None,
                },
                Request::AddSet {
                    table: T,
                    spec: map_spec(),
                    id: 1,
                },
                Request::AddRule {
                    table: T,
                    chain: "nat-prerouting".into(),
                    exprs: vmap.lower(IpFamily::V4),
                },
                Request::AddRule {
                    table: T,
                    chain: "svc".into(),
                    exprs: dnat("10.244.1.2"),
                },
                Request::AddElements {
                    table: T,
                    set: "service-ips".into(),
                    elements: vec![Element {
                        key: Key::AddrPort("10.96.0.10".parse().unwrap(), Protocol::Tcp, 80).bytes(),
                        data: Some(Data::Verdict(Verdict::Goto("svc".into()))),
                    }],
                },
            ];
            let done = sock.batch(gen, &requests).expect("batch");
            assert_eq!(done.generation, Some(gen + 1), "the commit's generation is reported");
            let handles: Vec<u64> = done.handles.iter().flatten().copied().collect();
            assert_eq!(handles.len(), 2, "one echo per rule: {done:?}");
            assert!(done.handles[4].is_some() && done.handles[5].is_some());

            let listing = nft(&["list", "ruleset"]);
            for line in [
                "type nat hook prerouting priority dstnat; policy accept;",
                "ip daddr . meta l4proto . th dport vmap @service-ips",
                "meta l4proto tcp dnat to 10.244.1.2:8080",
                "elements = { 10.96.0.10 . tcp . 80 : goto svc }",
                "type ipv4_addr . inet_proto . inet_service : verdict",
            ] {
                assert!(listing.contains(line), "{line:?} missing from\n{listing}");
            }
            let svc = rules_of(&mut sock, "svc");
            assert_eq!(svc, vec![(done.handles[5].unwrap(), dnat("10.244.1.2"))]);

            // Replacing by handle keeps the handle; a refused batch changes nothing.
            let h = done.handles[5].unwrap();
            let replaced = sock
                .batch(
                    gen + 1,
                    &[Request::ReplaceRule {
                        table: T,
                        chain: "svc".into(),
                        handle: h,
                        exprs: dnat("10.244.2.2"),
                    }],
                )
                .expect("replace");
            assert_eq!(replaced.handles, vec![Some(h)]);
            let refused = sock.batch(
                gen + 2,
                &[
                    Request::ReplaceRule {
                        table: T,
                        chain: "svc".into(),
                        handle: h,
                        exprs: dnat("10.244.3.3"),
                    },
                    Request::AddRule {
                        table: T,
                        chain: "missing".into(),
                        exprs: dnat("10.244.4.4"),
                    },
                ],
            );
            match refused {
                Err(BatchError::Refused { index: 1, errno: 2, .. }) => {}
                other => panic!("expected ENOENT for request 1: {other:?}"),
            }
            assert_eq!(rules_of(&mut sock, "svc"), vec![(h, dnat("10.244.2.2"))]);
            assert_eq!(sock.generation().unwrap(), gen + 2, "nothing was committed");

            // Another writer commits: a batch planned against the old generation is refused.
            nft(&["add", "table", "ip", "other"]);
            let stale = sock.batch(
                gen + 2,
                &[Request::DeleteRule {
                    table: T,
                    chain: "svc".into(),
                    handle: h,
                }],
            );
            assert_eq!(stale, Err(BatchError::Generation));
            assert_eq!(rules_of(&mut sock, "svc").len(), 1);

            let now = sock.generation().unwrap();
            sock.batch(now, &[Request::DeleteTable(T)]).expect("delete table");
            assert!(!nft(&["list", "tables"]).contains("kproxy"));
            let mut rules = 0;
            sock.dump(Dump::Rules(T, None), |_, _, _| {
                rules += 1;
                Ok(())
            })
            .unwrap();
            assert_eq!(rules, 0, "a missing table lists no rules");
        }) else {
            eprintln!("skipping: needs root (network namespaces)");
            return;
        };
    }
}
