//! Who else wrote to kproxy's table: nf_tables multicasts every committed object on
//! `NFNLGRP_NFTABLES` (what `nft monitor` prints), each message naming its table and the port
//! id of the socket whose commit it reports, and each commit ends with `NFT_MSG_NEWGEN` and
//! the new generation.
//!
//! The ruleset generation alone says only *that* someone else committed; a CNI or a firewall
//! that writes its own tables every few seconds would then make kproxy list and compare its
//! whole table at every periodic sync (seconds of kernel CPU at 10,000 Services). Following the
//! notifications says *what* they touched: only a commit by another socket to kproxy's own
//! table, or notifications lost (the socket overflowed), calls for a check.
//!
//! The reasoning is in order: the kernel queues a commit's notifications before its `NEWGEN`,
//! all before the commit returns, so once the `NEWGEN` of generation G has been read, every
//! object of every commit up to G has been seen or reported lost (`ENOBUFS` is returned by the
//! first read after a message was dropped, before any later message).

use std::os::fd::AsFd;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

use super::command::fixed_set_kind;
use super::names;
use super::netlink::wire::{decode_notifications, Notification};
use super::netlink::{attr, decode_elements, msg, nfproto, Table, SUBSYS_NFTABLES};
use super::plan::Spots;
use super::socket::set_rcvbuf;
use crate::dataplane::{DataplaneError, Result};

/// `NFNLGRP_NFTABLES`.
const GROUP: u32 = 7;
/// Room for the notifications between two reads: a few per change, and another writer's
/// commits. A burst beyond it (a cold start, another writer loading a large ruleset) is
/// reported lost, and a check follows if someone else committed meanwhile.
const RCVBUF: usize = 4 << 20;
/// How long one read waits for a notification that is due (a commit's `NEWGEN`).
const READ_TIMEOUT_MS: i64 = 20;
/// How many such reads before the notifications are counted as lost.
const READS_BEFORE_LOST: usize = 10;
const ENOBUFS: i32 = 105;
/// More touched objects than this are checked by listing the whole table.
const MAX_SPOTS: usize = 4096;

/// What a check due from the notifications lists and compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The whole table. With `lookups`, the notifications have shown every element someone
    /// else added or deleted (their keys are in `also`): large sets may be looked up by those
    /// keys and the committed ones instead of dumped.
    Whole { lookups: bool, also: Spots },
    /// Only these objects: everything someone else's commits touched is among them.
    Spots(Spots),
}

impl Scope {
    /// The whole table, every set dumped: what nothing is known about.
    pub fn dump_all() -> Scope {
        Scope::Whole {
            lookups: false,
            also: Spots::default(),
        }
    }
}

/// Why the notifications call for a check of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Someone else's commit changed an object of kproxy's table.
    Touched(String),
    /// Notifications were dropped (or never arrived): what they said is unknown.
    Lost(String),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Touched(what) => write!(f, "{what}"),
            Reason::Lost(why) => write!(f, "nf_tables notifications were lost ({why})"),
        }
    }
}

/// What the notifications read so far say.
#[derive(Debug, Default)]
struct Seen {
    /// The generation of the last commit whose `NEWGEN` was read.
    generation: Option<u32>,
    /// The first foreign change to the table since the last [`Monitor::clear`].
    touched: Option<String>,
    /// A foreign change in the commit being read (its `NEWGEN` names who committed).
    pending: Option<String>,
    lost: Option<String>,
    /// The objects the foreign changes touched. `whole`: a listing of the whole table is
    /// needed (why), but the touched elements are still known; `untracked`: they are not.
    spots: Spots,
    whole: Option<&'static str>,
    untracked: Option<&'static str>,
}

impl Seen {
    /// Takes in one notification; `own` is the port id of kproxy's writing socket.
    fn note(&mut self, n: &Notification, table: Table, own: u32) {
        if u16::from(n.subsys) != SUBSYS_NFTABLES {
            return;
        }
        if n.kind == msg::NEWGEN {
            self.generation = n.attrs.be32(attr::GEN_ID, "NFTA_GEN_ID").ok();
            if let Some(what) = self.pending.take() {
                let pid = n.attrs.be32(attr::GEN_PROC_PID, "").ok();
                let name = n.attrs.str(attr::GEN_PROC_NAME, "").ok();
                let by = match (name, pid) {
                    (Some(name), Some(pid)) => format!("{name} (pid {pid})"),
                    (None, Some(pid)) => format!("pid {pid}"),
                    _ => format!("netlink port {}", n.port),
                };
                let generation = self.generation.map_or_else(|| "?".into(), |g| g.to_string());
                self.touched
                    .get_or_insert_with(|| format!("{by} committed {what} (generation {generation})"));
            }
            return;
        }
        let Some(kind) = object_kind(n.kind) else {
            return;
        };
        if n.port == own || n.family != nfproto(table.family) {
            return;
        }
        // Every object's first attribute names its table (NFTA_TABLE_NAME, NFTA_CHAIN_TABLE,
        // NFTA_RULE_TABLE, NFTA_SET_TABLE, NFTA_SET_ELEM_LIST_TABLE, NFTA_OBJ_TABLE, ...).
        if n.attrs.str(attr::TABLE_NAME, "").ok().as_deref() != Some(table.name) {
            return;
        }
        self.spot(n);
        if self.pending.is_none() {
            let name = match n.kind {
                msg::NEWTABLE | msg::DELTABLE => String::new(),
                msg::NEWSETELEM | msg::DELSETELEM => n.attrs.str(attr::ELEM_LIST_SET, "").unwrap_or_default(),
                msg::NEWCHAIN | msg::DELCHAIN => n.attrs.str(attr::CHAIN_NAME, "").unwrap_or_default(),
                msg::NEWRULE | msg::DELRULE => n.attrs.str(attr::RULE_CHAIN, "").unwrap_or_default(),
                // NFTA_SET_NAME, and NFTA_OBJ_NAME and NFTA_FLOWTABLE_NAME, which are the same.
                _ => n.attrs.str(attr::SET_NAME, "").unwrap_or_default(),
            };
            let name = if name.is_empty() {
                String::new()
            } else {
                format!(" {name}")
            };
            self.pending = Some(format!("{kind}{name} in table {}", table.name));
        }
    }

    /// Notes what a foreign change to the table touched, for a spot check.
    fn spot(&mut self, n: &Notification) {
        if self.untracked.is_some() {
            return;
        }
        match n.kind {
            msg::NEWCHAIN | msg::DELCHAIN => match n.attrs.str(attr::CHAIN_NAME, "NFTA_CHAIN_NAME") {
                Ok(chain) => {
                    self.spots.chains.insert(chain);
                }
                Err(_) => self.whole = Some("a chain without a name"),
            },
            msg::NEWRULE | msg::DELRULE => match n.attrs.str(attr::RULE_CHAIN, "NFTA_RULE_CHAIN") {
                Ok(chain) => {
                    self.spots.chains.insert(chain);
                }
                Err(_) => self.whole = Some("a rule without its chain"),
            },
            msg::NEWSETELEM | msg::DELSETELEM => match decode_elements(n.attrs) {
                // Elements of per-Service sets (session affinity's) are the kernel's to keep.
                Ok((set, _)) if fixed_set_kind(&set).is_none() => {}
                Ok((set, elements)) => {
                    if elements.iter().any(|e| e.key.is_empty()) {
                        self.untracked = Some("an interval or catch-all element");
                    }
                    // The hairpin set is compared as a whole (its elements are derived).
                    if set == names::HAIRPIN {
                        self.whole = Some("the hairpin set");
                    }
                    self.spots
                        .elements
                        .entry(set)
                        .or_default()
                        .extend(elements.into_iter().map(|e| e.key));
                }
                Err(_) => self.untracked = Some("undecodable elements"),
            },
            // A table, a set's declaration, objects, flowtables.
            _ => self.whole = Some("a table, set or object"),
        }
        if self.spots.len() > MAX_SPOTS {
            self.untracked = Some("too many objects");
            self.spots = Spots::default();
        }
    }

    /// What a check of what was seen lists, and forgets it.
    fn take_scope(&mut self) -> Scope {
        let spots = std::mem::take(&mut self.spots);
        let scope = if self.lost.is_some() || self.untracked.is_some() {
            Scope::dump_all()
        } else if self.whole.is_some() {
            Scope::Whole {
                lookups: true,
                also: spots,
            }
        } else {
            Scope::Spots(spots)
        };
        self.reset();
        scope
    }

    fn reset(&mut self) {
        self.touched = None;
        self.pending = None;
        self.lost = None;
        self.spots = Spots::default();
        self.whole = None;
        self.untracked = None;
    }

    /// Why a check is due, if it is.
    fn reason(&self) -> Option<Reason> {
        if let Some(why) = &self.lost {
            return Some(Reason::Lost(why.clone()));
        }
        self.touched
            .clone()
            .or_else(|| self.pending.clone())
            .map(Reason::Touched)
    }
}

/// What a notification of `kind` does to an object, for the log; `None` for what is not an
/// object's change (generations, traces, counter resets).
fn object_kind(kind: u8) -> Option<&'static str> {
    Some(match kind {
        msg::NEWTABLE => "a new table",
        msg::DELTABLE => "a table's deletion",
        msg::NEWCHAIN => "a new chain",
        msg::DELCHAIN => "a chain's deletion",
        msg::NEWRULE => "a new rule in chain",
        msg::DELRULE => "a rule's deletion from chain",
        msg::NEWSET => "a new set",
        msg::DELSET => "a set's deletion",
        msg::NEWSETELEM => "new elements of set",
        msg::DELSETELEM => "deleted elements of set",
        msg::NEWOBJ => "a new object",
        msg::DELOBJ => "an object's deletion",
        msg::NEWFLOWTABLE => "a new flowtable",
        msg::DELFLOWTABLE => "a flowtable's deletion",
        _ => return None,
    })
}

/// A subscription to nf_tables' notifications in the current network namespace, for one table.
pub struct Monitor {
    socket: Socket,
    buf: Vec<u8>,
    table: Table,
    seen: Seen,
}

impl Monitor {
    pub fn open(table: Table) -> Result<Monitor> {
        let err =
            |what: &str, e: std::io::Error| DataplaneError::Netlink(format!("nf_tables notifications: {what}: {e}"));
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(|e| err("socket", e))?;
        socket.bind(&SocketAddr::new(0, 0)).map_err(|e| err("bind", e))?;
        set_rcvbuf(&socket, RCVBUF);
        let timeout = nix::sys::time::TimeVal::new(0, READ_TIMEOUT_MS * 1000);
        nix::sys::socket::setsockopt(&socket.as_fd(), nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(|e| err("SO_RCVTIMEO", e.into()))?;
        socket
            .add_membership(GROUP)
            .map_err(|e| err("joining NFNLGRP_NFTABLES", e))?;
        Ok(Monitor {
            socket,
            buf: vec![0; 64 << 10],
            table,
            seen: Seen::default(),
        })
    }

    /// Reads one datagram (waiting up to [`READ_TIMEOUT_MS`] unless `dont_wait`); false when
    /// there was none.
    fn read_one(&mut self, own: u32, dont_wait: bool) -> bool {
        let flags = if dont_wait { nix::libc::MSG_DONTWAIT } else { 0 } | nix::libc::MSG_TRUNC;
        let mut b = &mut self.buf[..];
        match self.socket.recv(&mut b, flags) {
            Ok(n) if n > self.buf.len() => {
                self.buf = vec![0; n.next_power_of_two()];
                self.seen
                    .lost
                    .get_or_insert_with(|| format!("a notification of {n} bytes did not fit"));
                true
            }
            Ok(n) => {
                match decode_notifications(&self.buf[..n]) {
                    Ok(all) => all.iter().for_each(|m| self.seen.note(m, self.table, own)),
                    Err(e) => {
                        self.seen
                            .lost
                            .get_or_insert_with(|| format!("undecodable notification: {e}"));
                    }
                }
                true
            }
            Err(e) if e.raw_os_error() == Some(ENOBUFS) => {
                self.seen
                    .lost
                    .get_or_insert_with(|| "the notification socket overflowed".into());
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ) =>
            {
                false
            }
            Err(e) => {
                self.seen
                    .lost
                    .get_or_insert_with(|| format!("reading notifications: {e}"));
                false
            }
        }
    }

    /// Reads every queued notification, without waiting. `own` is the port id of the socket
    /// kproxy writes this table through: its own commits are not someone else's.
    pub fn drain(&mut self, own: u32) {
        while self.read_one(own, true) {}
    }

    /// Why a check is due after every commit up to generation `upto` (waiting a moment for
    /// its notifications if they are not there yet), or `None`: then no one else's commit
    /// since the last [`Monitor::clear`] touched the table.
    pub fn check_due(&mut self, own: u32, upto: u32) -> Option<Reason> {
        self.drain(own);
        let mut reads = 0;
        while !self.seen.generation.is_some_and(|g| at_or_after(g, upto)) && self.seen.lost.is_none() {
            if reads == READS_BEFORE_LOST {
                self.seen.lost = Some(format!("no notification of generation {upto}"));
                break;
            }
            reads += 1;
            self.read_one(own, false);
        }
        self.seen.reason()
    }

    /// The last generation up to which every commit was seen and none of someone else's
    /// touched the table (since the last [`Monitor::clear`]), after reading what is queued.
    pub fn clean_up_to(&mut self, own: u32) -> Option<u32> {
        self.drain(own);
        match self.seen.reason() {
            None => self.seen.generation,
            Some(_) => None,
        }
    }

    /// Forgets lost notifications: for when the generation shows that every commit since the
    /// last verified one was kproxy's own, so nothing that was dropped was anyone else's.
    pub fn forget_lost(&mut self) {
        self.seen.lost = None;
    }

    /// A check of the whole table starts (it lists the table after this): what was seen
    /// before is covered by it.
    pub fn clear(&mut self, own: u32) {
        self.drain(own);
        self.seen.reset();
    }

    /// A check due from what was seen starts (it lists after this): what it must list, and
    /// what was seen is forgotten. A commit of the same object after this point is noticed
    /// again.
    pub fn take_scope(&mut self, own: u32) -> Scope {
        self.drain(own);
        self.seen.take_scope()
    }

    /// Why a check is due from what was read so far (nothing is read).
    pub fn due(&self) -> Option<Reason> {
        self.seen.reason()
    }

    /// A check that was due could not be made (what it was for is forgotten): the next one
    /// dumps the whole table.
    pub fn recheck(&mut self, why: &'static str) {
        self.seen.touched.get_or_insert_with(|| why.to_string());
        self.seen.untracked = Some(why);
    }

    /// Marks what happened before the subscription as unknown.
    pub fn mark_unknown(&mut self, why: &str) {
        self.seen.lost.get_or_insert_with(|| why.to_string());
    }
}

/// Whether generation `g` is `upto` or later (generations wrap).
fn at_or_after(g: u32, upto: u32) -> bool {
    (g.wrapping_sub(upto) as i32) >= 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::nftables::netlink::wire::Attrs;
    use crate::model::IpFamily;

    const KPROXY: Table = Table {
        family: IpFamily::V4,
        name: "kproxy",
    };

    fn attrs(list: &[(u16, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (kind, payload) in list {
            let len = 4 + payload.len();
            out.extend_from_slice(&(len as u16).to_ne_bytes());
            out.extend_from_slice(&kind.to_ne_bytes());
            out.extend_from_slice(payload);
            out.resize(out.len().next_multiple_of(4), 0);
        }
        out
    }

    fn note(seen: &mut Seen, kind: u8, port: u32, family: u8, a: &[u8]) {
        let n = Notification {
            subsys: SUBSYS_NFTABLES as u8,
            kind,
            port,
            family,
            attrs: Attrs(a),
        };
        seen.note(&n, KPROXY, 100);
    }

    fn gen(seen: &mut Seen, g: u32, port: u32) {
        let a = attrs(&[
            (attr::GEN_ID, &g.to_be_bytes()),
            (attr::GEN_PROC_PID, &42u32.to_be_bytes()),
            (attr::GEN_PROC_NAME, b"nft\0"),
        ]);
        note(seen, msg::NEWGEN, port, 0, &a);
    }

    #[test]
    fn only_someone_elses_commits_to_kproxys_table_call_for_a_check() {
        let mut seen = Seen::default();
        let kproxy = attrs(&[(1, b"kproxy\0"), (2, b"services\0")]);
        let other = attrs(&[(1, b"cni\0"), (2, b"forward\0")]);
        // kproxy's own commit, another writer's table, kproxy's name in the other family.
        note(&mut seen, msg::NEWRULE, 100, 2, &kproxy);
        gen(&mut seen, 7, 100);
        note(&mut seen, msg::NEWCHAIN, 200, 2, &other);
        gen(&mut seen, 8, 200);
        note(&mut seen, msg::DELCHAIN, 200, 10, &kproxy);
        gen(&mut seen, 9, 200);
        assert_eq!(seen.reason(), None);
        assert_eq!(seen.generation, Some(9));
        // Someone else deletes an element of a set in kproxy's table.
        let elems = attrs(&[(1, b"kproxy\0"), (attr::ELEM_LIST_SET, b"cluster-ips\0")]);
        note(&mut seen, msg::DELSETELEM, 200, 2, &elems);
        assert!(
            matches!(seen.reason(), Some(Reason::Touched(_))),
            "due before its NEWGEN is read"
        );
        gen(&mut seen, 10, 200);
        let Some(Reason::Touched(what)) = seen.reason() else {
            panic!("{:?}", seen.reason())
        };
        assert_eq!(
            what,
            "nft (pid 42) committed deleted elements of set cluster-ips in table kproxy (generation 10)"
        );
    }

    #[test]
    fn a_spot_check_lists_what_was_touched_and_only_that() {
        let mut seen = Seen::default();
        let chain = attrs(&[(1, b"kproxy\0"), (2, &7u64.to_be_bytes()), (3, b"stray\0")]);
        note(&mut seen, msg::NEWCHAIN, 200, 2, &chain);
        let rule = attrs(&[(1, b"kproxy\0"), (2, b"services\0")]);
        note(&mut seen, msg::DELRULE, 200, 2, &rule);
        // One element of a fixed map: NFTA_SET_ELEM_LIST_ELEMENTS > LIST_ELEM > KEY > VALUE.
        let value = attrs(&[(1, &[10, 96, 0, 10])]);
        let key = attrs(&[(attr::ELEM_KEY | 0x8000, &value)]);
        let elem = attrs(&[(attr::LIST_ELEM | 0x8000, &key)]);
        let set = names::service_endpoints(crate::model::Protocol::Tcp);
        let set_name = format!("{set}\0");
        let elems = attrs(&[
            (1, b"kproxy\0"),
            (attr::ELEM_LIST_SET, set_name.as_bytes()),
            (attr::ELEM_LIST_ELEMENTS | 0x8000, &elem),
        ]);
        note(&mut seen, msg::DELSETELEM, 200, 2, &elems);
        gen(&mut seen, 11, 200);
        let Scope::Spots(spots) = seen.take_scope() else {
            panic!("a spot check")
        };
        assert_eq!(spots.chains.iter().collect::<Vec<_>>(), ["services", "stray"]);
        assert_eq!(spots.elements[set], [vec![10, 96, 0, 10]].into());
        assert_eq!(seen.reason(), None, "taken");
        // A table or a set's declaration: the whole table, with the touched keys looked up.
        note(&mut seen, msg::NEWSET, 200, 2, &rule);
        note(&mut seen, msg::NEWSETELEM, 200, 2, &elems);
        let Scope::Whole { lookups: true, also } = seen.take_scope() else {
            panic!("a whole check with lookups")
        };
        assert_eq!(also.elements[set], [vec![10, 96, 0, 10]].into());
        // After lost notifications, nothing is known: every set is dumped.
        note(&mut seen, msg::NEWCHAIN, 200, 2, &chain);
        seen.lost = Some("overflow".into());
        assert_eq!(
            seen.take_scope(),
            Scope::Whole {
                lookups: false,
                also: Spots::default()
            }
        );
    }

    #[test]
    fn lost_notifications_call_for_a_check_until_forgotten() {
        let mut seen = Seen {
            lost: Some("the notification socket overflowed".into()),
            ..Default::default()
        };
        assert!(matches!(seen.reason(), Some(Reason::Lost(_))));
        seen.lost = None;
        assert_eq!(seen.reason(), None);
    }

    #[test]
    fn generations_compare_across_the_wrap() {
        assert!(at_or_after(5, 5) && at_or_after(6, 5) && !at_or_after(4, 5));
        assert!(at_or_after(2, u32::MAX - 1) && !at_or_after(u32::MAX - 1, 2));
    }

    #[test]
    fn notifications_decode_with_their_port() {
        let a = attrs(&[(1, b"kproxy\0")]);
        let mut buf = Vec::new();
        let len = 16 + 4 + a.len();
        buf.extend_from_slice(&(len as u32).to_ne_bytes());
        buf.extend_from_slice(&((SUBSYS_NFTABLES << 8) | msg::NEWCHAIN as u16).to_ne_bytes());
        buf.extend_from_slice(&0u16.to_ne_bytes());
        buf.extend_from_slice(&9u32.to_ne_bytes());
        buf.extend_from_slice(&1234u32.to_ne_bytes());
        buf.extend_from_slice(&[2, 0, 0, 0]);
        buf.extend_from_slice(&a);
        let all = decode_notifications(&buf).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].kind, all[0].port, all[0].family), (msg::NEWCHAIN, 1234, 2));
        assert_eq!(all[0].attrs.str(1, "").unwrap(), "kproxy");
    }
}
