//! nft commands as values: what the planner decides, before it is a netlink request. Each
//! prints as the nft command it stands for (`add rule ip kproxy services …`), which is what
//! `kproxy render` shows, what a debug log of a sync shows, and how a refused request is named
//! in the error; [`Command::request`] is the same command over netlink. Pure.

use std::fmt;
use std::net::IpAddr;

use super::names;
use super::netlink::{BaseHook, Element, Expr, Request, Table};
use super::render::{family_word, hook_text};
use super::rule::{Key, Rule, RuleText, SetDecl, SetKind, Value};
use crate::model::{IpFamily, Protocol};

/// An element key: typed when kproxy wrote it (or recognizes it), raw bytes otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ElemKey {
    Key(Key),
    Raw(Vec<u8>),
}

impl ElemKey {
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            ElemKey::Key(k) => k.bytes(),
            ElemKey::Raw(b) => b.clone(),
        }
    }

    /// Reads back a key of a set of `kind` from the kernel's bytes.
    pub fn parse(kind: SetKind, family: IpFamily, b: &[u8]) -> ElemKey {
        parse_key(kind, family, b).map_or_else(|| ElemKey::Raw(b.to_vec()), ElemKey::Key)
    }
}

impl fmt::Display for ElemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElemKey::Key(k) => write!(f, "{k}"),
            // Not nft syntax: only ever printed in an error or a log.
            ElemKey::Raw(b) => {
                f.write_str("0x")?;
                b.iter().try_for_each(|x| write!(f, "{x:02x}"))
            }
        }
    }
}

fn parse_key(kind: SetKind, family: IpFamily, b: &[u8]) -> Option<Key> {
    let alen = match family {
        IpFamily::V4 => 4,
        IpFamily::V6 => 16,
    };
    let addr = |b: &[u8]| -> Option<IpAddr> {
        match family {
            IpFamily::V4 => Some(IpAddr::from(<[u8; 4]>::try_from(b.get(..4)?).ok()?)),
            IpFamily::V6 => Some(IpAddr::from(<[u8; 16]>::try_from(b.get(..16)?).ok()?)),
        }
    };
    let proto = |n: u8| match n {
        6 => Some(Protocol::Tcp),
        17 => Some(Protocol::Udp),
        132 => Some(Protocol::Sctp),
        _ => None,
    };
    let port = |b: &[u8]| Some(u16::from_be_bytes(b.get(..2)?.try_into().ok()?));
    let key = match kind {
        SetKind::AddrPortMap if b.len() == alen + 8 => Key::AddrPort(addr(b)?, proto(b[alen])?, port(&b[alen + 4..])?),
        SetKind::ProtoPortMap if b.len() == 8 => Key::ProtoPort(proto(b[0])?, port(&b[4..])?),
        SetKind::AddrPair if b.len() == 2 * alen && b[..alen] == b[alen..] => Key::Pair(addr(b)?),
        SetKind::AddrPortSet if b.len() == alen + 8 => Key::AddrPort(addr(b)?, proto(b[alen])?, port(&b[alen + 4..])?),
        SetKind::ProtoPortSet if b.len() == 8 => Key::ProtoPort(proto(b[0])?, port(&b[4..])?),
        SetKind::EndpointMap(p) if b.len() == alen + 8 => Key::AddrPortSlot(
            addr(b)?,
            p,
            port(&b[alen..])?,
            u32::from_ne_bytes(b[alen + 4..].try_into().ok()?),
        ),
        SetKind::NodePortEndpointMap(p) if b.len() == 8 => {
            Key::ProtoPortSlot(p, port(b)?, u32::from_ne_bytes(b[4..].try_into().ok()?))
        }
        _ => return None,
    };
    // Padding must be zero, or it is not a key kproxy would write.
    (key.bytes() == b).then_some(key)
}

/// One change to kproxy's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    AddTable,
    AddChain {
        name: String,
        hook: Option<BaseHook>,
    },
    FlushChain(String),
    DeleteChain(String),
    /// `rule` and its expressions (lowered once, for the hash and for the request).
    AddRule {
        chain: String,
        rule: Rule,
        exprs: Vec<Expr>,
    },
    ReplaceRule {
        chain: String,
        handle: u64,
        rule: Rule,
        exprs: Vec<Expr>,
    },
    DeleteRule {
        chain: String,
        handle: u64,
    },
    AddSet(SetDecl),
    DeleteSet(String),
    AddElements {
        set: String,
        elements: Vec<(ElemKey, Option<Value>)>,
    },
    DeleteElements {
        set: String,
        keys: Vec<ElemKey>,
    },
}

impl Command {
    /// The netlink request for `table`.
    pub fn request(&self, table: Table) -> Request {
        match self {
            Command::AddTable => Request::AddTable(table),
            Command::AddChain { name, hook } => Request::AddChain {
                table,
                name: name.clone(),
                hook: hook.clone(),
            },
            Command::FlushChain(name) => Request::FlushChain {
                table,
                name: name.clone(),
            },
            Command::DeleteChain(name) => Request::DeleteChain {
                table,
                name: name.clone(),
            },
            Command::AddRule { chain, exprs, .. } => Request::AddRule {
                table,
                chain: chain.clone(),
                exprs: exprs.clone(),
            },
            Command::ReplaceRule {
                chain, handle, exprs, ..
            } => Request::ReplaceRule {
                table,
                chain: chain.clone(),
                handle: *handle,
                exprs: exprs.clone(),
            },
            Command::DeleteRule { chain, handle } => Request::DeleteRule {
                table,
                chain: chain.clone(),
                handle: *handle,
            },
            Command::AddSet(decl) => Request::AddSet {
                table,
                spec: decl.spec(table.family),
                id: 0,
            },
            Command::DeleteSet(name) => Request::DeleteSet {
                table,
                name: name.clone(),
            },
            Command::AddElements { set, elements } => Request::AddElements {
                table,
                set: set.clone(),
                elements: elements
                    .iter()
                    .map(|(k, v)| Element {
                        key: k.bytes(),
                        data: v.as_ref().map(Value::data),
                    })
                    .collect(),
            },
            Command::DeleteElements { set, keys } => Request::DeleteElements {
                table,
                set: set.clone(),
                elements: keys
                    .iter()
                    .map(|k| Element {
                        key: k.bytes(),
                        data: None,
                    })
                    .collect(),
            },
        }
    }

    /// How many rules or elements this command writes.
    pub fn writes(&self) -> usize {
        match self {
            Command::AddRule { .. } | Command::ReplaceRule { .. } => 1,
            Command::AddElements { elements, .. } => elements.len(),
            _ => 0,
        }
    }
}

/// A command in nft syntax for `family`'s table.
pub struct CommandText<'a>(pub &'a Command, pub IpFamily);

impl fmt::Display for CommandText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = self.1;
        let t = format!("{} {}", family_word(family), names::TABLE);
        match self.0 {
            Command::AddTable => write!(f, "add table {t}"),
            Command::AddChain { name, hook: None } => write!(f, "add chain {t} {name}"),
            Command::AddChain { name, hook: Some(h) } => write!(f, "add chain {t} {name} {{ {} }}", hook_text(h)),
            Command::FlushChain(name) => write!(f, "flush chain {t} {name}"),
            Command::DeleteChain(name) => write!(f, "delete chain {t} {name}"),
            Command::AddRule { chain, rule, .. } => write!(f, "add rule {t} {chain} {}", RuleText(rule, family)),
            Command::ReplaceRule {
                chain, handle, rule, ..
            } => write!(f, "replace rule {t} {chain} handle {handle} {}", RuleText(rule, family)),
            Command::DeleteRule { chain, handle } => write!(f, "delete rule {t} {chain} handle {handle}"),
            Command::AddSet(decl) => write!(f, "add {} {t} {} {{ {} }}", decl.noun(), decl.name, decl.text(family)),
            Command::DeleteSet(name) => write!(f, "delete set {t} {name}"),
            Command::AddElements { set, elements } => {
                write!(f, "add element {t} {set} {{ ")?;
                for (i, (k, v)) in elements.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    match v {
                        Some(v) => write!(f, "{k} : {v}")?,
                        None => write!(f, "{k}")?,
                    }
                }
                f.write_str(" }")
            }
            Command::DeleteElements { set, keys } => {
                write!(f, "delete element {t} {set} {{ ")?;
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k}")?;
                }
                f.write_str(" }")
            }
        }
    }
}

/// The set kind of one of kproxy's fixed sets, by name. Asked for every element of a listing
/// (and of a cold start's stray search): the declarations are made once, not per question.
pub fn fixed_set_kind(name: &str) -> Option<SetKind> {
    fixed_set_kinds().get(name).copied()
}

/// Every fixed set's name (the hairpin set's too), from the same table.
pub fn fixed_set_names() -> impl Iterator<Item = &'static str> {
    fixed_set_kinds().keys().map(String::as_str)
}

fn fixed_set_kinds() -> &'static std::collections::HashMap<String, SetKind> {
    static KINDS: std::sync::OnceLock<std::collections::HashMap<String, SetKind>> = std::sync::OnceLock::new();
    KINDS.get_or_init(|| {
        super::render::fixed_sets()
            .into_iter()
            .map(|d| (d.name, d.kind))
            .collect()
    })
}
