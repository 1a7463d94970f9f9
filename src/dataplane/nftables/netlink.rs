//! The kernel's nf_tables family over NETLINK_NETFILTER as pure values: requests encode to
//! bytes, replies decode from bytes, nothing here touches a socket (see [`super::socket`]).
//! Layout from `linux/netfilter/nfnetlink.h` and `linux/netfilter/nf_tables.h`; attribute
//! order and set user data as nft 1.0.6 writes them, so that `nft list ruleset` prints what
//! kproxy wrote as if nft had written it.
//!
//! A request mirrors the nft command it replaces: [`Request::AddChain`] is `add chain`,
//! [`Request::ReplaceRule`] is `replace rule … handle N`, [`Request::DeleteElements`] is
//! `delete element`. A transaction is [`encode_batch`]: `NFNL_MSG_BATCH_BEGIN` carrying the
//! ruleset generation it was planned against (`NFNL_BATCH_GENID`: the kernel refuses the whole
//! batch with `ERESTART` if anyone committed since), the requests, `NFNL_MSG_BATCH_END`.

pub mod expr;
pub mod wire;

pub use self::expr::{Data, Expr, Verdict};
use self::wire::{
    Attrs, DecodeError, DecodeResult, Writer, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_ECHO,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use crate::model::IpFamily;

/// `NFNL_SUBSYS_NFTABLES`: the high byte of every nf_tables message type.
pub const SUBSYS_NFTABLES: u16 = 10;
/// `NFNL_MSG_BATCH_BEGIN`, `NFNL_MSG_BATCH_END`, `NFNL_BATCH_GENID`.
const MSG_BATCH_BEGIN: u16 = 16;
const MSG_BATCH_END: u16 = 17;
const BATCH_GENID: u16 = 1;

/// `enum nf_tables_msg_types`.
pub mod msg {
    pub const NEWTABLE: u8 = 0;
    pub const GETTABLE: u8 = 1;
    pub const DELTABLE: u8 = 2;
    pub const NEWCHAIN: u8 = 3;
    pub const GETCHAIN: u8 = 4;
    pub const DELCHAIN: u8 = 5;
    pub const NEWRULE: u8 = 6;
    pub const GETRULE: u8 = 7;
    pub const DELRULE: u8 = 8;
    pub const NEWSET: u8 = 9;
    pub const GETSET: u8 = 10;
    pub const DELSET: u8 = 11;
    pub const NEWSETELEM: u8 = 12;
    pub const GETSETELEM: u8 = 13;
    pub const DELSETELEM: u8 = 14;
    pub const NEWGEN: u8 = 15;
    pub const GETGEN: u8 = 16;
    pub const NEWOBJ: u8 = 18;
    pub const DELOBJ: u8 = 20;
    pub const NEWFLOWTABLE: u8 = 22;
    pub const DELFLOWTABLE: u8 = 24;
}

/// `NFPROTO_IPV4`, `NFPROTO_IPV6`: the table families `ip` and `ip6`.
pub fn nfproto(family: IpFamily) -> u8 {
    match family {
        IpFamily::V4 => 2,
        IpFamily::V6 => 10,
    }
}

/// `enum nf_inet_hooks`.
pub mod hook {
    pub const PREROUTING: u32 = 0;
    pub const INPUT: u32 = 1;
    pub const FORWARD: u32 = 2;
    pub const OUTPUT: u32 = 3;
    pub const POSTROUTING: u32 = 4;
}

/// `enum nft_set_flags`.
pub mod set_flags {
    pub const MAP: u32 = 0x8;
    pub const TIMEOUT: u32 = 0x10;
    /// `flags dynamic`: the packet path may add elements (`update @set`).
    pub const EVAL: u32 = 0x20;
}

/// `NFT_DATA_VERDICT`: the data type of a verdict map.
pub const DATA_TYPE_VERDICT: u32 = 0xffff_ff00;

/// A table: `ip kproxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Table {
    pub family: IpFamily,
    pub name: &'static str,
}

/// A base chain's `{ type TYPE hook HOOK priority PRIORITY; policy accept; }`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BaseHook {
    /// `filter` or `nat`.
    pub kind: &'static str,
    pub hook: u32,
    pub priority: i32,
}

/// A set or map declaration: `add map ip kproxy service-ips { type … : verdict; }`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SetSpec {
    pub name: String,
    /// `enum nft_set_flags`.
    pub flags: u32,
    /// nft's data type id of the key (a concatenation packs 6 bits per field).
    pub key_type: u32,
    pub key_len: u32,
    /// For maps: the data type ([`DATA_TYPE_VERDICT`]) and length (0 for verdicts).
    pub data: Option<(u32, u32)>,
    /// Default element timeout in ms (`timeout 600s`), 0 for none.
    pub timeout_ms: u64,
    /// `NFTA_SET_USERDATA`: what nft stores there (key byte order, …), so nft prints the set.
    pub userdata: Vec<u8>,
}

/// One set element: its key and, in a map, its data.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Element {
    pub key: Vec<u8>,
    pub data: Option<Data>,
}

/// One change to the ruleset. The value is inert until it is encoded into a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `add table`: creates the table if missing.
    AddTable(Table),
    /// `delete table`: the table and everything in it.
    DeleteTable(Table),
    /// `add chain`: creates the chain if missing.
    AddChain {
        table: Table,
        name: String,
        hook: Option<BaseHook>,
    },
    /// `delete chain`, with its rules; refused while anything jumps to it.
    DeleteChain { table: Table, name: String },
    /// `flush chain`: deletes every rule of the chain.
    FlushChain { table: Table, name: String },
    /// `add rule`, at the end of the chain; the kernel echoes the new rule with its handle.
    AddRule {
        table: Table,
        chain: String,
        exprs: Vec<Expr>,
    },
    /// `replace rule … handle N`: same position, same handle, new expressions.
    ReplaceRule {
        table: Table,
        chain: String,
        handle: u64,
        exprs: Vec<Expr>,
    },
    /// `delete rule … handle N`.
    DeleteRule { table: Table, chain: String, handle: u64 },
    /// `add set` / `add map`: creates it if missing (an existing one must match).
    AddSet { table: Table, spec: SetSpec, id: u32 },
    /// `delete set` / `delete map`; refused while a rule uses it.
    DeleteSet { table: Table, name: String },
    /// `add element`.
    AddElements {
        table: Table,
        set: String,
        elements: Vec<Element>,
    },
    /// `delete element`: every key must exist.
    DeleteElements {
        table: Table,
        set: String,
        elements: Vec<Element>,
    },
}

/// `enum nft_table_attributes`, `nft_chain_attributes`, … (only what kproxy uses).
pub mod attr {
    pub const TABLE_NAME: u16 = 1;
    pub const TABLE_FLAGS: u16 = 2;
    pub const CHAIN_TABLE: u16 = 1;
    pub const CHAIN_HANDLE: u16 = 2;
    pub const CHAIN_NAME: u16 = 3;
    pub const CHAIN_HOOK: u16 = 4;
    pub const CHAIN_POLICY: u16 = 5;
    pub const CHAIN_TYPE: u16 = 7;
    pub const HOOK_HOOKNUM: u16 = 1;
    pub const HOOK_PRIORITY: u16 = 2;
    pub const RULE_TABLE: u16 = 1;
    pub const RULE_CHAIN: u16 = 2;
    pub const RULE_HANDLE: u16 = 3;
    pub const RULE_EXPRESSIONS: u16 = 4;
    pub const RULE_USERDATA: u16 = 7;
    pub const SET_TABLE: u16 = 1;
    pub const SET_NAME: u16 = 2;
    pub const SET_FLAGS: u16 = 3;
    pub const SET_KEY_TYPE: u16 = 4;
    pub const SET_KEY_LEN: u16 = 5;
    pub const SET_DATA_TYPE: u16 = 6;
    pub const SET_DATA_LEN: u16 = 7;
    pub const SET_ID: u16 = 10;
    pub const SET_TIMEOUT: u16 = 11;
    pub const SET_USERDATA: u16 = 13;
    pub const ELEM_LIST_TABLE: u16 = 1;
    pub const ELEM_LIST_SET: u16 = 2;
    pub const ELEM_LIST_ELEMENTS: u16 = 3;
    pub const ELEM_KEY: u16 = 1;
    pub const ELEM_DATA: u16 = 2;
    pub const ELEM_FLAGS: u16 = 3;
    pub const GEN_ID: u16 = 1;
    /// In `NEWGEN`, since Linux 4.19: who committed.
    pub const GEN_PROC_PID: u16 = 2;
    pub const GEN_PROC_NAME: u16 = 3;
    pub const LIST_ELEM: u16 = 1;
}

/// `NF_ACCEPT` as a chain policy.
const POLICY_ACCEPT: u32 = 1;

impl Request {
    /// The message type within nf_tables.
    pub fn kind(&self) -> u8 {
        match self {
            Request::AddTable(_) => msg::NEWTABLE,
            Request::DeleteTable(_) => msg::DELTABLE,
            Request::AddChain { .. } => msg::NEWCHAIN,
            Request::DeleteChain { .. } => msg::DELCHAIN,
            Request::FlushChain { .. } | Request::DeleteRule { .. } => msg::DELRULE,
            Request::AddRule { .. } | Request::ReplaceRule { .. } => msg::NEWRULE,
            Request::AddSet { .. } => msg::NEWSET,
            Request::DeleteSet { .. } => msg::DELSET,
            Request::AddElements { .. } => msg::NEWSETELEM,
            Request::DeleteElements { .. } => msg::DELSETELEM,
        }
    }

    fn table(&self) -> Table {
        match self {
            Request::AddTable(t) | Request::DeleteTable(t) => *t,
            Request::AddChain { table, .. }
            | Request::DeleteChain { table, .. }
            | Request::FlushChain { table, .. }
            | Request::AddRule { table, .. }
            | Request::ReplaceRule { table, .. }
            | Request::DeleteRule { table, .. }
            | Request::AddSet { table, .. }
            | Request::DeleteSet { table, .. }
            | Request::AddElements { table, .. }
            | Request::DeleteElements { table, .. } => *table,
        }
    }

    /// Flags as nft sets them, plus an acknowledgement for every message (so the socket layer
    /// can tell a complete answer from a lost one) and an echo of new rules (their handles).
    fn flags(&self) -> u16 {
        NLM_F_REQUEST
            | NLM_F_ACK
            | match self {
                Request::AddTable(_) => 0,
                Request::AddChain { .. } | Request::AddSet { .. } | Request::AddElements { .. } => NLM_F_CREATE,
                Request::AddRule { .. } => NLM_F_CREATE | NLM_F_APPEND | NLM_F_ECHO,
                Request::ReplaceRule { .. } => NLM_F_REPLACE | NLM_F_ECHO,
                _ => 0,
            }
    }

    /// Appends this request as message `seq` to `buf`.
    #[cfg(test)]
    pub fn encode(&self, seq: u32, buf: &mut Vec<u8>) {
        self.encode_with(seq, 0, buf)
    }

    fn encode_with(&self, seq: u32, extra_flags: u16, buf: &mut Vec<u8>) {
        let table = self.table();
        let mut w = Writer { buf };
        let start = w.begin_message(
            (SUBSYS_NFTABLES << 8) | u16::from(self.kind()),
            self.flags() | extra_flags,
            seq,
            nfproto(table.family),
            0,
        );
        match self {
            Request::AddTable(t) => {
                w.str(attr::TABLE_NAME, t.name);
                w.be32(attr::TABLE_FLAGS, 0);
            }
            Request::DeleteTable(t) => w.str(attr::TABLE_NAME, t.name),
            Request::AddChain { name, hook, .. } => {
                w.str(attr::CHAIN_TABLE, table.name);
                w.str(attr::CHAIN_NAME, name);
                if let Some(h) = hook {
                    w.str(attr::CHAIN_TYPE, h.kind);
                    w.be32(attr::CHAIN_POLICY, POLICY_ACCEPT);
                    let n = w.nest_start(attr::CHAIN_HOOK);
                    w.be32(attr::HOOK_HOOKNUM, h.hook);
                    w.be32(attr::HOOK_PRIORITY, h.priority as u32);
                    w.nest_end(n);
                }
            }
            Request::DeleteChain { name, .. } => {
                w.str(attr::CHAIN_TABLE, table.name);
                w.str(attr::CHAIN_NAME, name);
            }
            Request::FlushChain { name, .. } => {
                w.str(attr::RULE_TABLE, table.name);
                w.str(attr::RULE_CHAIN, name);
            }
            Request::AddRule { chain, exprs, .. } | Request::ReplaceRule { chain, exprs, .. } => {
                w.str(attr::RULE_TABLE, table.name);
                w.str(attr::RULE_CHAIN, chain);
                if let Request::ReplaceRule { handle, .. } = self {
                    w.be64(attr::RULE_HANDLE, *handle);
                }
                let n = w.nest_start(attr::RULE_EXPRESSIONS);
                for e in exprs {
                    e.encode(&mut w);
                }
                w.nest_end(n);
            }
            Request::DeleteRule { chain, handle, .. } => {
                w.str(attr::RULE_TABLE, table.name);
                w.str(attr::RULE_CHAIN, chain);
                w.be64(attr::RULE_HANDLE, *handle);
            }
            Request::AddSet { spec, id, .. } => {
                w.str(attr::SET_TABLE, table.name);
                w.str(attr::SET_NAME, &spec.name);
                w.be32(attr::SET_FLAGS, spec.flags);
                w.be32(attr::SET_KEY_TYPE, spec.key_type);
                w.be32(attr::SET_KEY_LEN, spec.key_len);
                if let Some((kind, len)) = spec.data {
                    w.be32(attr::SET_DATA_TYPE, kind);
                    w.be32(attr::SET_DATA_LEN, len);
                }
                w.be32(attr::SET_ID, *id);
                if spec.timeout_ms != 0 {
                    w.be64(attr::SET_TIMEOUT, spec.timeout_ms);
                }
                if !spec.userdata.is_empty() {
                    w.attr(attr::SET_USERDATA, &spec.userdata);
                }
            }
            Request::DeleteSet { name, .. } => {
                w.str(attr::SET_TABLE, table.name);
                w.str(attr::SET_NAME, name);
            }
            Request::AddElements { set, elements, .. } | Request::DeleteElements { set, elements, .. } => {
                w.str(attr::ELEM_LIST_TABLE, table.name);
                w.str(attr::ELEM_LIST_SET, set);
                let list = w.nest_start(attr::ELEM_LIST_ELEMENTS);
                for e in elements {
                    let n = w.nest_start(attr::LIST_ELEM);
                    expr::put_data(&mut w, attr::ELEM_KEY, &Data::Value(e.key.clone()));
                    if let (Some(d), Request::AddElements { .. }) = (&e.data, self) {
                        expr::put_data(&mut w, attr::ELEM_DATA, d);
                    }
                    w.nest_end(n);
                }
                w.nest_end(list);
            }
        }
        w.end_message(start);
    }
}

/// `NFNL_MSG_BATCH_BEGIN` (checking `genid` unless it is 0), `requests` as messages
/// `first_seq`, `first_seq + 1`, …, and `NFNL_MSG_BATCH_END`. The begin message has
/// sequence number `first_seq - 1`, which is where the kernel reports a refused generation.
/// The first request asks for an echo: the kernel announces the commit's new generation
/// (`NFT_MSG_NEWGEN`) only to a batch whose first message does.
pub fn encode_batch<'a>(genid: u32, first_seq: u32, requests: impl IntoIterator<Item = &'a Request>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(4096);
    encode_batch_into(&mut buf, genid, first_seq, requests);
    buf
}

/// [`encode_batch`] into `buf` (cleared first), so that a writer reuses one buffer.
pub fn encode_batch_into<'a>(
    buf: &mut Vec<u8>,
    genid: u32,
    first_seq: u32,
    requests: impl IntoIterator<Item = &'a Request>,
) {
    buf.clear();
    let mut w = Writer { buf };
    // The batch messages carry the subsystem in res_id, in network order.
    let s = w.begin_message(
        MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        first_seq.wrapping_sub(1),
        0,
        SUBSYS_NFTABLES,
    );
    if genid != 0 {
        w.be32(BATCH_GENID, genid);
    }
    w.end_message(s);
    let mut seq = first_seq;
    for r in requests {
        let echo = if seq == first_seq { NLM_F_ECHO } else { 0 };
        r.encode_with(seq, echo, w.buf);
        seq = seq.wrapping_add(1);
    }
    let mut w = Writer { buf };
    let s = w.begin_message(MSG_BATCH_END, NLM_F_REQUEST, seq, 0, SUBSYS_NFTABLES);
    w.end_message(s);
}

/// `NFT_MSG_GETGEN`: the ruleset's current generation.
pub fn encode_get_gen(seq: u32) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut w = Writer { buf: &mut buf };
    let s = w.begin_message(
        (SUBSYS_NFTABLES << 8) | u16::from(msg::GETGEN),
        NLM_F_REQUEST,
        seq,
        0,
        0,
    );
    w.end_message(s);
    buf
}

/// What a dump lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dump<'a> {
    Tables,
    /// Every chain (all tables, all families: the kernel filters only rules and elements).
    Chains,
    /// The rules of `table` (every chain), or of one of its chains.
    Rules(Table, Option<&'a str>),
    Sets(Table),
    /// The elements of one set.
    Elements(Table, &'a str),
}

/// A dump request: `nft list …` over netlink.
pub fn encode_dump(seq: u32, what: Dump) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut w = Writer { buf: &mut buf };
    let (kind, family) = match what {
        Dump::Tables => (msg::GETTABLE, 0),
        Dump::Chains => (msg::GETCHAIN, 0),
        Dump::Rules(t, _) => (msg::GETRULE, nfproto(t.family)),
        Dump::Sets(t) => (msg::GETSET, nfproto(t.family)),
        Dump::Elements(t, _) => (msg::GETSETELEM, nfproto(t.family)),
    };
    let s = w.begin_message(
        (SUBSYS_NFTABLES << 8) | u16::from(kind),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
        0,
    );
    match what {
        Dump::Tables | Dump::Chains => {}
        Dump::Rules(t, chain) => {
            w.str(attr::RULE_TABLE, t.name);
            if let Some(c) = chain {
                w.str(attr::RULE_CHAIN, c);
            }
        }
        Dump::Sets(t) => w.str(attr::SET_TABLE, t.name),
        Dump::Elements(t, set) => {
            w.str(attr::ELEM_LIST_TABLE, t.name);
            w.str(attr::ELEM_LIST_SET, set);
        }
    }
    w.end_message(s);
    buf
}

/// `nft get element`: one `NFT_MSG_GETSETELEM` (not a dump) per key, with sequence numbers
/// from `first`; only the last asks for an acknowledgement (the kernel answers in order, so it
/// ends the answers). The kernel looks each key up in the set and answers with the element or
/// `ENOENT`: the cost of a key, where a dump of the set walks all of it.
pub fn encode_get_elements<K: AsRef<[u8]>>(first: u32, table: Table, set: &str, keys: &[K]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut w = Writer { buf: &mut buf };
    for (i, key) in keys.iter().enumerate() {
        let s = w.begin_message(
            (SUBSYS_NFTABLES << 8) | u16::from(msg::GETSETELEM),
            if i + 1 == keys.len() {
                NLM_F_REQUEST | NLM_F_ACK
            } else {
                NLM_F_REQUEST
            },
            first.wrapping_add(i as u32),
            nfproto(table.family),
            0,
        );
        w.str(attr::ELEM_LIST_TABLE, table.name);
        w.str(attr::ELEM_LIST_SET, set);
        let list = w.nest_start(attr::ELEM_LIST_ELEMENTS);
        let n = w.nest_start(attr::LIST_ELEM);
        expr::put_data(&mut w, attr::ELEM_KEY, &Data::Value(key.as_ref().to_vec()));
        w.nest_end(n);
        w.nest_end(list);
        w.end_message(s);
    }
    buf
}

/// The generation in a `NFT_MSG_NEWGEN` message (the answer to [`encode_get_gen`], and the
/// notification of a commit that echoes).
pub fn decode_gen(a: Attrs) -> DecodeResult<u32> {
    a.be32(attr::GEN_ID, "NFTA_GEN_ID")
}

/// A table as dumped: its family and name.
pub fn decode_table(family: u8, a: Attrs) -> DecodeResult<(u8, String)> {
    Ok((family, a.str(attr::TABLE_NAME, "NFTA_TABLE_NAME")?))
}

/// A chain as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainInfo {
    pub family: u8,
    pub table: String,
    pub name: String,
    pub handle: u64,
    pub hook: Option<BaseHook>,
    /// `NFTA_CHAIN_POLICY` of a base chain.
    pub policy: Option<u32>,
}

pub fn decode_chain(family: u8, a: Attrs) -> DecodeResult<ChainInfo> {
    let hook = match a.nest(attr::CHAIN_HOOK) {
        Some(h) => {
            let kind = match a.str(attr::CHAIN_TYPE, "NFTA_CHAIN_TYPE")?.as_str() {
                "filter" => "filter",
                "nat" => "nat",
                "route" => "route",
                _ => "other",
            };
            Some(BaseHook {
                kind,
                hook: h.be32(attr::HOOK_HOOKNUM, "NFTA_HOOK_HOOKNUM")?,
                priority: h.be32(attr::HOOK_PRIORITY, "NFTA_HOOK_PRIORITY")? as i32,
            })
        }
        None => None,
    };
    Ok(ChainInfo {
        family,
        table: a.str(attr::CHAIN_TABLE, "NFTA_CHAIN_TABLE")?,
        name: a.str(attr::CHAIN_NAME, "NFTA_CHAIN_NAME")?,
        handle: a.be64(attr::CHAIN_HANDLE, "NFTA_CHAIN_HANDLE")?,
        hook,
        policy: a.be32(attr::CHAIN_POLICY, "").ok(),
    })
}

/// A rule as the kernel lists or echoes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    pub table: String,
    pub chain: String,
    pub handle: u64,
    pub exprs: Vec<Expr>,
    /// Someone else's comment or other user data: kproxy writes none.
    pub userdata: Option<Vec<u8>>,
}

pub fn decode_rule(a: Attrs) -> DecodeResult<RuleInfo> {
    let mut exprs = Vec::new();
    if let Some(list) = a.nest(attr::RULE_EXPRESSIONS) {
        for (kind, elem) in list.iter() {
            if kind == attr::LIST_ELEM {
                exprs.push(Expr::decode(Attrs(elem))?);
            }
        }
    }
    Ok(RuleInfo {
        table: a.str(attr::RULE_TABLE, "NFTA_RULE_TABLE")?,
        chain: a.str(attr::RULE_CHAIN, "NFTA_RULE_CHAIN")?,
        handle: a.be64(attr::RULE_HANDLE, "NFTA_RULE_HANDLE")?,
        exprs,
        userdata: a.get(attr::RULE_USERDATA).map(<[u8]>::to_vec),
    })
}

/// A set as the kernel lists it; `userdata` as stored.
pub fn decode_set(a: Attrs) -> DecodeResult<SetSpec> {
    let flags = a.be32_or(attr::SET_FLAGS, 0);
    Ok(SetSpec {
        name: a.str(attr::SET_NAME, "NFTA_SET_NAME")?,
        flags,
        key_type: a.be32_or(attr::SET_KEY_TYPE, 0),
        key_len: a.be32(attr::SET_KEY_LEN, "NFTA_SET_KEY_LEN")?,
        data: match a.get(attr::SET_DATA_TYPE) {
            // The kernel reports a verdict's size; nft (and kproxy) declare it as 0.
            Some(_) => Some(match a.be32(attr::SET_DATA_TYPE, "NFTA_SET_DATA_TYPE")? {
                DATA_TYPE_VERDICT => (DATA_TYPE_VERDICT, 0),
                kind => (kind, a.be32_or(attr::SET_DATA_LEN, 0)),
            }),
            None => None,
        },
        timeout_ms: a.be64(attr::SET_TIMEOUT, "").unwrap_or(0),
        userdata: a.get(attr::SET_USERDATA).map(<[u8]>::to_vec).unwrap_or_default(),
    })
}

/// The set a `NFT_MSG_NEWSETELEM` dump message belongs to, and its elements. Elements the
/// packet path added (affinity) carry a timeout; kproxy compares only key and data.
pub fn decode_elements(a: Attrs) -> DecodeResult<(String, Vec<Element>)> {
    let set = a.str(attr::ELEM_LIST_SET, "NFTA_SET_ELEM_LIST_SET")?;
    let mut out = Vec::new();
    if let Some(list) = a.nest(attr::ELEM_LIST_ELEMENTS) {
        for (kind, elem) in list.iter() {
            if kind != attr::LIST_ELEM {
                continue;
            }
            let e = Attrs(elem);
            // Interval ends and catch-all elements are never kproxy's.
            if e.be32_or(attr::ELEM_FLAGS, 0) != 0 {
                out.push(Element {
                    key: Vec::new(),
                    data: None,
                });
                continue;
            }
            let key = match expr::get_data(
                e.nest(attr::ELEM_KEY)
                    .ok_or(DecodeError::Missing("NFTA_SET_ELEM_KEY"))?,
            )? {
                Data::Value(v) => v,
                Data::Verdict(_) => return Err(DecodeError::Bad("NFTA_SET_ELEM_KEY")),
            };
            let data = match e.nest(attr::ELEM_DATA) {
                Some(d) => Some(expr::get_data(d)?),
                None => None,
            };
            out.push(Element { key, data });
        }
    }
    Ok((set, out))
}

#[cfg(test)]
mod tests;
