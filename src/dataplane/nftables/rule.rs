//! nft rules, set elements and set declarations as values. Each prints as the nft syntax it
//! stands for (what `kproxy render` shows and `nft -f` reads) and lowers to the kernel
//! expressions nft itself would generate for that text, so `nft list ruleset` prints a rule
//! kproxy wrote over netlink exactly as if nft had written it. Pure.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use super::netlink::expr::{self, Data, Expr, Verdict};
use super::netlink::{nfproto, set_flags, SetSpec, DATA_TYPE_VERDICT};
use crate::model::{IpFamily, Protocol};

/// A packet field a rule matches or a set is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// `ip saddr` / `ip6 saddr`
    Saddr,
    /// `ip daddr` / `ip6 daddr`
    Daddr,
    /// `meta l4proto`
    L4proto,
    /// `th dport`: the destination port of any transport header.
    ThDport,
    /// `numgen random mod MODULUS offset OFFSET`: a random slot in `OFFSET..OFFSET+MODULUS`,
    /// host byte order, as the last field of an endpoint map's key.
    Slot { modulus: u32, offset: u32 },
}

impl Field {
    fn len(self, family: IpFamily) -> u32 {
        match self {
            Field::Saddr | Field::Daddr => addr_len(family),
            Field::L4proto => 1,
            Field::ThDport => 2,
            Field::Slot { .. } => 4,
        }
    }

    fn load(self, family: IpFamily, dreg: u32) -> Expr {
        match self {
            Field::Saddr | Field::Daddr => Expr::Payload {
                dreg,
                base: expr::PAYLOAD_NETWORK,
                offset: addr_offset(family, self == Field::Saddr),
                len: addr_len(family),
            },
            Field::L4proto => Expr::Meta {
                key: expr::META_L4PROTO,
                dreg,
            },
            Field::ThDport => Expr::Payload {
                dreg,
                base: expr::PAYLOAD_TRANSPORT,
                offset: 2,
                len: 2,
            },
            Field::Slot { modulus, offset } => Expr::Numgen {
                dreg,
                modulus,
                kind: expr::NG_RANDOM,
                offset,
            },
        }
    }

    fn text(self, family: IpFamily) -> String {
        match self {
            Field::Saddr => format!("{} saddr", sel(family)),
            Field::Daddr => format!("{} daddr", sel(family)),
            Field::L4proto => "meta l4proto".into(),
            Field::ThDport => "th dport".into(),
            Field::Slot { modulus, offset: 0 } => format!("numgen random mod {modulus}"),
            Field::Slot { modulus, offset } => format!("numgen random mod {modulus} offset {offset}"),
        }
    }
}

fn sel(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

fn addr_len(family: IpFamily) -> u32 {
    match family {
        IpFamily::V4 => 4,
        IpFamily::V6 => 16,
    }
}

/// Offset of the source (or destination) address in the IPv4 / IPv6 header.
fn addr_offset(family: IpFamily, source: bool) -> u32 {
    match (family, source) {
        (IpFamily::V4, true) => 12,
        (IpFamily::V4, false) => 16,
        (IpFamily::V6, true) => 8,
        (IpFamily::V6, false) => 24,
    }
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

/// Registers of a concatenation, as nft allocates them: fields packed in 4-byte units from
/// `NFT_REG_1`, each named by its 16-byte register where it starts one, else by its 32-bit one.
fn concat_registers(fields: &[Field], family: IpFamily) -> Vec<u32> {
    let mut unit = 0;
    fields
        .iter()
        .map(|f| {
            let reg = if unit % 4 == 0 {
                expr::REG_1 + unit / 4
            } else {
                expr::REG32_00 + unit
            };
            unit += f.len(family).div_ceil(4);
            reg
        })
        .collect()
}

/// `ct state` bits (`IP_CT_*` as nft's `ct_state` type has them).
pub const CT_STATE_INVALID: u32 = 0x01;
pub const CT_STATE_NEW: u32 = 0x08;
/// `IPS_DST_NAT`: `ct status dnat`.
const CT_STATUS_DNAT: u32 = 0x20;
/// `RTN_LOCAL`: `fib … type local`.
const RTN_LOCAL: u32 = 2;
const IFNAMSIZ: usize = 16;

/// One statement of a rule, in nft's words.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Stmt {
    /// `ip daddr 10.96.0.10`, `ip saddr != 10.244.0.0/16`
    Addr { field: Field, negate: bool, net: IpNet },
    /// `tcp dport 80` (nft adds the `meta l4proto tcp` dependency itself)
    Dport { proto: Protocol, port: u16 },
    /// `meta l4proto tcp`
    L4proto(Protocol),
    /// `ct state new` (bits: [`CT_STATE_NEW`], [`CT_STATE_INVALID`])
    CtState(u32),
    /// `ct status dnat`
    CtStatusDnat,
    /// `meta mark & 0x4000 == 0` (`zero`) or `!= 0`
    MarkTest { mask: u32, zero: bool },
    /// `iifname "eth0"`, `iifname != "veth*"` (a trailing `*` matches a prefix)
    Iifname { negate: bool, name: String },
    /// `fib saddr type local` / `fib daddr type local`
    FibLocal(Field),
    /// `numgen random mod N VALUE`: true with probability 1/N
    Numgen { modulus: u32, value: u32 },
    /// `ip saddr . ip daddr @hairpin`, `ip saddr != @set`
    InSet { key: Vec<Field>, set: String, negate: bool },
    /// `ip daddr . meta l4proto . th dport vmap @service-ips`
    Vmap { key: Vec<Field>, map: String },
    /// `meta mark set meta mark | 0x4000`
    MarkOr(u32),
    /// `meta mark set meta mark ^ 0x4000`
    MarkXor(u32),
    /// `update @set { ip saddr }`: adds the key or refreshes its timeout
    Update { set: String, key: Field },
    /// `dnat to 10.244.1.2:8080`, `dnat to [fd00::2]:8080`
    Dnat { addr: IpAddr, port: u16 },
    /// `dnat to ip daddr . meta l4proto . th dport . numgen random mod 3 map @service-endpoints`:
    /// the address and port are the data of the element the key finds (an `addr . port` map).
    DnatMap { key: Vec<Field>, map: String },
    /// `masquerade`, `masquerade fully-random`
    Masquerade { fully_random: bool },
    /// `reject`: ICMP port unreachable (ICMPv6 in `ip6` tables)
    Reject,
    /// `jump C`, `goto C`, `return`, `drop`, `accept`
    Verdict(Verdict),
}

/// One rule: statements evaluated in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule(pub Vec<Stmt>);

impl Rule {
    pub fn new(stmts: Vec<Stmt>) -> Rule {
        Rule(stmts)
    }

    /// The nft text of this rule, for `family`'s table.
    #[cfg(test)]
    pub fn text(&self, family: IpFamily) -> String {
        RuleText(self, family).to_string()
    }

    /// The kernel expressions of this rule, as nft generates them for [`Rule::text`].
    pub fn lower(&self, family: IpFamily) -> Vec<Expr> {
        let mut out = Vec::new();
        for s in &self.0 {
            s.lower(family, &mut out);
        }
        out
    }
}

/// A rule printed in nft syntax.
pub struct RuleText<'a>(pub &'a Rule, pub IpFamily);

impl fmt::Display for RuleText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0 .0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            s.fmt_in(self.1, f)?;
        }
        Ok(())
    }
}

fn fmt_verdict(v: &Verdict, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match v {
        Verdict::Accept => f.write_str("accept"),
        Verdict::Drop => f.write_str("drop"),
        Verdict::Continue => f.write_str("continue"),
        Verdict::Return => f.write_str("return"),
        Verdict::Jump(c) => write!(f, "jump {c}"),
        Verdict::Goto(c) => write!(f, "goto {c}"),
    }
}

/// A verdict in nft syntax (`goto service-…`, `drop`).
pub struct VerdictText<'a>(pub &'a Verdict);

impl fmt::Display for VerdictText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_verdict(self.0, f)
    }
}

fn fmt_concat(key: &[Field], family: IpFamily, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for (i, field) in key.iter().enumerate() {
        if i > 0 {
            f.write_str(" . ")?;
        }
        f.write_str(&field.text(family))?;
    }
    Ok(())
}

impl Stmt {
    fn fmt_in(&self, family: IpFamily, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let neg = |n: bool| if n { "!= " } else { "" };
        match self {
            Stmt::Addr { field, negate, net } => {
                write!(f, "{} {}", field.text(family), neg(*negate))?;
                if net.prefix_len() == net.max_prefix_len() {
                    write!(f, "{}", net.addr())
                } else {
                    write!(f, "{}", net.trunc())
                }
            }
            Stmt::Dport { proto, port } => write!(f, "{proto} dport {port}"),
            Stmt::L4proto(p) => write!(f, "meta l4proto {p}"),
            Stmt::CtState(bits) => {
                let mut names = Vec::new();
                if bits & CT_STATE_INVALID != 0 {
                    names.push("invalid");
                }
                if bits & CT_STATE_NEW != 0 {
                    names.push("new");
                }
                write!(f, "ct state {}", names.join(","))
            }
            Stmt::CtStatusDnat => f.write_str("ct status dnat"),
            Stmt::MarkTest { mask, zero } => {
                write!(f, "meta mark & {mask:#x} {} 0", if *zero { "==" } else { "!=" })
            }
            Stmt::Iifname { negate, name } => write!(f, "iifname {}\"{name}\"", neg(*negate)),
            Stmt::FibLocal(field) => write!(
                f,
                "fib {} type local",
                if *field == Field::Saddr { "saddr" } else { "daddr" }
            ),
            Stmt::Numgen { modulus, value } => write!(f, "numgen random mod {modulus} {value}"),
            Stmt::InSet { key, set, negate } => {
                fmt_concat(key, family, f)?;
                write!(f, " {}@{set}", neg(*negate))
            }
            Stmt::Vmap { key, map } => {
                fmt_concat(key, family, f)?;
                write!(f, " vmap @{map}")
            }
            Stmt::MarkOr(v) => write!(f, "meta mark set meta mark | {v:#x}"),
            Stmt::MarkXor(v) => write!(f, "meta mark set meta mark ^ {v:#x}"),
            Stmt::Update { set, key } => write!(f, "update @{set} {{ {} }}", key.text(family)),
            Stmt::Dnat { addr, port } => match addr {
                IpAddr::V4(a) => write!(f, "dnat to {a}:{port}"),
                IpAddr::V6(a) => write!(f, "dnat to [{a}]:{port}"),
            },
            Stmt::DnatMap { key, map } => {
                f.write_str("dnat to ")?;
                fmt_concat(key, family, f)?;
                write!(f, " map @{map}")
            }
            Stmt::Masquerade { fully_random } => f.write_str(if *fully_random {
                "masquerade fully-random"
            } else {
                "masquerade"
            }),
            Stmt::Reject => f.write_str("reject"),
            Stmt::Verdict(v) => fmt_verdict(v, f),
        }
    }

    fn lower(&self, family: IpFamily, out: &mut Vec<Expr>) {
        let r1 = expr::REG_1;
        let cmp = |op: u32, data: Vec<u8>| Expr::Cmp { sreg: r1, op, data };
        let op = |negate: bool| if negate { expr::CMP_NEQ } else { expr::CMP_EQ };
        match self {
            Stmt::Addr { field, negate, net } => {
                let full = addr_len(family);
                let prefix = u32::from(net.prefix_len());
                let bytes = ip_bytes(&net.trunc().addr());
                let load = |len| Expr::Payload {
                    dreg: r1,
                    base: expr::PAYLOAD_NETWORK,
                    offset: addr_offset(family, *field == Field::Saddr),
                    len,
                };
                if prefix == full * 8 || (prefix % 8 == 0 && prefix > 0) {
                    // nft loads only the bytes a byte-aligned prefix covers.
                    let len = prefix / 8;
                    out.push(load(len));
                    out.push(cmp(op(*negate), bytes[..len as usize].to_vec()));
                } else {
                    out.push(load(full));
                    out.push(Expr::Bitwise {
                        sreg: r1,
                        dreg: r1,
                        mask: ip_bytes(&net.netmask()),
                        xor: vec![0; full as usize],
                    });
                    out.push(cmp(op(*negate), bytes));
                }
            }
            Stmt::Dport { proto, port } => {
                Stmt::L4proto(*proto).lower(family, out);
                out.push(Field::ThDport.load(family, r1));
                out.push(cmp(expr::CMP_EQ, port.to_be_bytes().to_vec()));
            }
            Stmt::L4proto(p) => {
                out.push(Field::L4proto.load(family, r1));
                out.push(cmp(expr::CMP_EQ, vec![proto_number(*p)]));
            }
            Stmt::CtState(bits) | Stmt::MarkTest { mask: bits, .. } => {
                out.push(match self {
                    Stmt::CtState(_) => Expr::Ct {
                        key: expr::CT_STATE,
                        dreg: r1,
                    },
                    _ => Expr::Meta {
                        key: expr::META_MARK,
                        dreg: r1,
                    },
                });
                out.push(Expr::Bitwise {
                    sreg: r1,
                    dreg: r1,
                    mask: bits.to_ne_bytes().to_vec(),
                    xor: vec![0; 4],
                });
                let zero = matches!(self, Stmt::MarkTest { zero: true, .. });
                out.push(cmp(op(!zero), vec![0; 4]));
            }
            Stmt::CtStatusDnat => {
                out.push(Expr::Ct {
                    key: expr::CT_STATUS,
                    dreg: r1,
                });
                out.push(Expr::Bitwise {
                    sreg: r1,
                    dreg: r1,
                    mask: CT_STATUS_DNAT.to_ne_bytes().to_vec(),
                    xor: vec![0; 4],
                });
                out.push(cmp(expr::CMP_NEQ, vec![0; 4]));
            }
            Stmt::Iifname { negate, name } => {
                out.push(Expr::Meta {
                    key: expr::META_IIFNAME,
                    dreg: r1,
                });
                let data = match name.strip_suffix('*') {
                    Some(prefix) => prefix.as_bytes().to_vec(),
                    None => {
                        let mut d = name.as_bytes().to_vec();
                        d.resize(IFNAMSIZ, 0);
                        d
                    }
                };
                out.push(cmp(op(*negate), data));
            }
            Stmt::FibLocal(field) => {
                out.push(Expr::Fib {
                    flags: if *field == Field::Saddr {
                        expr::FIB_F_SADDR
                    } else {
                        expr::FIB_F_DADDR
                    },
                    result: expr::FIB_RESULT_ADDRTYPE,
                    dreg: r1,
                });
                out.push(cmp(expr::CMP_EQ, RTN_LOCAL.to_ne_bytes().to_vec()));
            }
            Stmt::Numgen { modulus, value } => {
                out.push(Expr::Numgen {
                    dreg: r1,
                    modulus: *modulus,
                    kind: expr::NG_RANDOM,
                    offset: 0,
                });
                out.push(cmp(expr::CMP_EQ, value.to_ne_bytes().to_vec()));
            }
            Stmt::InSet { key, set, negate } => {
                load_concat(key, family, out);
                out.push(Expr::Lookup {
                    sreg: r1,
                    set: set.clone(),
                    dreg: None,
                    flags: if *negate { expr::LOOKUP_F_INV } else { 0 },
                });
            }
            Stmt::Vmap { key, map } => {
                load_concat(key, family, out);
                out.push(Expr::Lookup {
                    sreg: r1,
                    set: map.clone(),
                    dreg: Some(expr::REG_VERDICT),
                    flags: 0,
                });
            }
            Stmt::MarkOr(v) | Stmt::MarkXor(v) => {
                out.push(Expr::Meta {
                    key: expr::META_MARK,
                    dreg: r1,
                });
                let mask = if matches!(self, Stmt::MarkOr(_)) { !v } else { u32::MAX };
                out.push(Expr::Bitwise {
                    sreg: r1,
                    dreg: r1,
                    mask: mask.to_ne_bytes().to_vec(),
                    xor: v.to_ne_bytes().to_vec(),
                });
                out.push(Expr::MetaSet {
                    key: expr::META_MARK,
                    sreg: r1,
                });
            }
            Stmt::Update { set, key } => {
                out.push(key.load(family, r1));
                out.push(Expr::Dynset {
                    op: expr::DYNSET_OP_UPDATE,
                    sreg_key: r1,
                    set: set.clone(),
                    timeout_ms: 0,
                });
            }
            Stmt::Dnat { addr, port } => {
                out.push(Expr::Immediate {
                    dreg: r1,
                    data: Data::Value(ip_bytes(addr)),
                });
                out.push(Expr::Immediate {
                    dreg: expr::REG_2,
                    data: Data::Value(port.to_be_bytes().to_vec()),
                });
                out.push(Expr::Nat {
                    kind: expr::NAT_DNAT,
                    family: u32::from(nfproto(family)),
                    reg_addr: Some(r1),
                    reg_proto: Some(expr::REG_2),
                    flags: expr::NAT_F_PROTO_SPECIFIED,
                });
            }
            Stmt::DnatMap { key, map } => {
                load_concat(key, family, out);
                out.push(Expr::Lookup {
                    sreg: r1,
                    set: map.clone(),
                    dreg: Some(r1),
                    flags: 0,
                });
                // The element's data, `addr . port`, fills registers as a concatenation does.
                let regs = concat_registers(&[Field::Daddr, Field::ThDport], family);
                out.push(Expr::Nat {
                    kind: expr::NAT_DNAT,
                    family: u32::from(nfproto(family)),
                    reg_addr: Some(regs[0]),
                    reg_proto: Some(regs[1]),
                    // nft leaves this flag to the kernel here (which sets it for a port register);
                    // kproxy sends it, so that the rule is what the kernel lists.
                    flags: expr::NAT_F_PROTO_SPECIFIED,
                });
            }
            Stmt::Masquerade { fully_random } => out.push(Expr::Masq {
                flags: if *fully_random { expr::NAT_F_RANDOM_FULLY } else { 0 },
            }),
            Stmt::Reject => out.push(Expr::Reject {
                kind: expr::REJECT_ICMP_UNREACH,
                // ICMP_PORT_UNREACH, ICMPV6_PORT_UNREACH
                code: if family == IpFamily::V4 { 3 } else { 4 },
            }),
            Stmt::Verdict(v) => out.push(Expr::Immediate {
                dreg: expr::REG_VERDICT,
                data: Data::Verdict(v.clone()),
            }),
        }
    }
}

fn load_concat(key: &[Field], family: IpFamily, out: &mut Vec<Expr>) {
    for (field, reg) in key.iter().zip(concat_registers(key, family)) {
        out.push(field.load(family, reg));
    }
}

/// The data of one map element.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    /// `goto service-…`, `drop`: a verdict map's
    Verdict(Verdict),
    /// `10.244.1.2 . 8080`: where an endpoint map sends a slot
    Endpoint(IpAddr, u16),
}

impl Value {
    /// The data as the kernel stores it (a concatenation: each field padded to 4 bytes).
    pub fn data(&self) -> Data {
        match self {
            Value::Verdict(v) => Data::Verdict(v.clone()),
            Value::Endpoint(ip, port) => {
                let mut b = ip_bytes(ip);
                b.extend(port.to_be_bytes());
                b.extend([0, 0]);
                Data::Value(b)
            }
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Verdict(v) => fmt_verdict(v, f),
            Value::Endpoint(ip, port) => write!(f, "{ip} . {port}"),
        }
    }
}

/// The key of one element of kproxy's sets and maps.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// `10.96.0.10 . tcp . 80` (`service-ips`, `no-endpoint-services`, `firewall-ips`)
    AddrPort(IpAddr, Protocol, u16),
    /// `tcp . 30080` (`service-nodeports`, `no-endpoint-nodeports`)
    ProtoPort(Protocol, u16),
    /// `10.244.1.2 . 10.244.1.2` (`hairpin`)
    Pair(IpAddr),
    /// `10.96.0.10 . 80 . 3`: slot 3 of that address and port (`service-endpoints-tcp`)
    AddrPortSlot(IpAddr, Protocol, u16, u32),
    /// `30080 . 3`: slot 3 of that NodePort (`nodeport-endpoints-tcp`)
    ProtoPortSlot(Protocol, u16, u32),
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::AddrPort(ip, p, port) => write!(f, "{ip} . {p} . {port}"),
            Key::ProtoPort(p, port) => write!(f, "{p} . {port}"),
            Key::Pair(ip) => write!(f, "{ip} . {ip}"),
            Key::AddrPortSlot(ip, _, port, slot) => write!(f, "{ip} . {port} . {slot}"),
            Key::ProtoPortSlot(_, port, slot) => write!(f, "{port} . {slot}"),
        }
    }
}

impl Key {
    /// The key as the kernel stores it: each field padded to 4 bytes, as concatenations are.
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24);
        let pad = |b: &mut Vec<u8>| b.resize(b.len().div_ceil(4) * 4, 0);
        match self {
            Key::AddrPort(ip, p, port) => {
                b.extend(ip_bytes(ip));
                b.push(proto_number(*p));
                pad(&mut b);
                b.extend(port.to_be_bytes());
                pad(&mut b);
            }
            Key::ProtoPort(p, port) => {
                b.push(proto_number(*p));
                pad(&mut b);
                b.extend(port.to_be_bytes());
                pad(&mut b);
            }
            Key::Pair(ip) => {
                b.extend(ip_bytes(ip));
                b.extend(ip_bytes(ip));
            }
            // The protocol is the map's (one endpoint map per protocol), not the key's.
            Key::AddrPortSlot(ip, _, port, slot) => {
                b.extend(ip_bytes(ip));
                b.extend(port.to_be_bytes());
                pad(&mut b);
                b.extend(slot.to_ne_bytes());
            }
            Key::ProtoPortSlot(_, port, slot) => {
                b.extend(port.to_be_bytes());
                pad(&mut b);
                b.extend(slot.to_ne_bytes());
            }
        }
        b
    }
}

/// nft's data type ids (`enum datatypes` in nft's `datatype.h`), which name a set's key type.
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
/// Bits per field of a concatenated type id.
const TYPE_BITS: u32 = 6;
/// `integer`: the type of `numgen`.
const TYPE_INTEGER: u32 = 4;

/// What kind of set or map a declaration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SetKind {
    /// `type ADDR . inet_proto . inet_service : verdict`
    AddrPortMap,
    /// `type inet_proto . inet_service : verdict`
    ProtoPortMap,
    /// `type ADDR . ADDR`
    AddrPair,
    /// `type ADDR; flags dynamic,timeout; timeout Ns;`: session affinity
    Affinity { timeout: u32 },
    /// `type ADDR . inet_proto . inet_service`: a plain set of Service addresses and ports
    AddrPortSet,
    /// `type inet_proto . inet_service`: a plain set of NodePorts
    ProtoPortSet,
    /// `typeof ADDR daddr . tcp dport . numgen … : ADDR daddr . tcp dport`: slot to endpoint,
    /// per Service address and port of one protocol. Per protocol, with the protocol's own
    /// payload in its typeof: nft (1.0.6 and 1.1.3) refuses a rule it listed that matches
    /// `tcp dport` against a map declared with `th dport` once that map is in the kernel.
    EndpointMap(Protocol),
    /// `typeof tcp dport . numgen … : ADDR daddr . tcp dport`: the same per NodePort
    NodePortEndpointMap(Protocol),
}

/// One set or map of kproxy's table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SetDecl {
    pub name: String,
    pub kind: SetKind,
}

/// The user data nft stores for an endpoint map of `proto`, by address or by NodePort.
fn endpoint_udata(family: IpFamily, proto: Protocol, by_port: bool) -> &'static [u8] {
    use udata::*;
    match (family, by_port, proto) {
        (IpFamily::V4, false, Protocol::Tcp) => SERVICE_TCP_V4,
        (IpFamily::V4, false, Protocol::Udp) => SERVICE_UDP_V4,
        (IpFamily::V4, false, Protocol::Sctp) => SERVICE_SCTP_V4,
        (IpFamily::V4, true, Protocol::Tcp) => NODEPORT_TCP_V4,
        (IpFamily::V4, true, Protocol::Udp) => NODEPORT_UDP_V4,
        (IpFamily::V4, true, Protocol::Sctp) => NODEPORT_SCTP_V4,
        (IpFamily::V6, false, Protocol::Tcp) => SERVICE_TCP_V6,
        (IpFamily::V6, false, Protocol::Udp) => SERVICE_UDP_V6,
        (IpFamily::V6, false, Protocol::Sctp) => SERVICE_SCTP_V6,
        (IpFamily::V6, true, Protocol::Tcp) => NODEPORT_TCP_V6,
        (IpFamily::V6, true, Protocol::Udp) => NODEPORT_UDP_V6,
        (IpFamily::V6, true, Protocol::Sctp) => NODEPORT_SCTP_V6,
    }
}

/// nft's set user data (`NFTNL_UDATA_SET_*` TLVs: type, length, value), byte for byte what
/// nft 1.0.6 stores for these declarations, so every nft release lists them alike.
mod udata {
    /// `NFTNL_UDATA_SET_KEYBYTEORDER` = host (0), `NFTNL_UDATA_SET_DATABYTEORDER` = 0, a
    /// concatenation's `NFTNL_UDATA_SET_KEY_TYPEOF` (expression type 13 = concat, no data),
    /// `NFTNL_UDATA_SET_DATA_INTERVAL` = 0.
    pub const CONCAT_MAP: &[u8] = &[
        0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0, 6, 4, 0, 0, 0, 0,
    ];
    /// Key byte order and the concatenation's typeof, for a plain set.
    pub const CONCAT_SET: &[u8] = &[0, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0];
    /// `NFTNL_UDATA_SET_KEYBYTEORDER` = big endian (2): an address.
    pub const ADDR: &[u8] = &[0, 4, 2, 0, 0, 0];
    /// The endpoint maps' `typeof ADDR daddr . tcp dport . numgen random mod 1 : ADDR daddr .
    /// tcp dport` (`SERVICE_*`) and `typeof tcp dport . numgen random mod 1 : …` (`NODEPORT_*`),
    /// per protocol and family: key and data byte order and typeof, the expressions nft parses
    /// the declaration back from, as nft 1.0.6 stores them.
    pub const SERVICE_TCP_V4: &[u8] = &[
        0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 80, 0, 4, 13, 0, 0, 0, 1, 72, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 12,
        0, 0, 0, 1, 4, 12, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 8, 0, 0, 0, 1, 4, 2, 0, 0, 0, 2, 26, 0, 4,
        23, 0, 0, 0, 1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0, 0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44, 0,
        20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 12, 0, 0, 0, 1, 4, 12, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 8, 0,
        0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
    ];
    pub const NODEPORT_TCP_V4: &[u8] = &[
        0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 58, 0, 4, 13, 0, 0, 0, 1, 50, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 8,
        0, 0, 0, 1, 4, 2, 0, 0, 0, 1, 26, 0, 4, 23, 0, 0, 0, 1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0,
        0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 12, 0, 0, 0, 1, 4, 12, 0, 0, 0, 1,
        20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 8, 0, 0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
    ];
    pub const SERVICE_UDP_V4: &[u8] = &[
        0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 80, 0, 4, 13, 0, 0, 0, 1, 72, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 12,
        0, 0, 0, 1, 4, 12, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 6, 0, 0, 0, 1, 4, 2, 0, 0, 0, 2, 26, 0, 4,
        23, 0, 0, 0, 1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0, 0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44, 0,
        20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 12, 0, 0, 0, 1, 4, 12, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 6, 0,
        0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
    ];
    pub const NODEPORT_UDP_V4: &[u8] = &[
        0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 58, 0, 4, 13, 0, 0, 0, 1, 50, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 6,
        0, 0, 0, 1, 4, 2, 0, 0, 0, 1, 26, 0, 4, 23, 0, 0, 0, 1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0,
        0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 12, 0, 0, 0, 1, 4, 12, 0, 0, 0, 1,
        20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 6, 0, 0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
    ];
    pub const SERVICE_SCTP_V4: &[u8] = &[
        0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 80, 0, 4, 13, 0, 0, 0, 1, 72, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 12,
        0, 0, 0, 1, 4, 12, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 10, 0, 0, 0, 1, 4, 2, 0, 0, 0, 2, 26, 0, 4,
        23, 0, 0, 0, 1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0, 0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44, 0,
        20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 12, 0, 0, 0, 1, 4, 12, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 10, 0,
        0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
    ];
    pub const NODEPORT_SCTP_V4: &[u8] = &[
        0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 58, 0, 4, 13, 0, 0, 0, 1, 50, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 10,
        0, 0, 0, 1, 4, 2, 0, 0, 0, 1, 26, 0, 4, 23, 0, 0, 0, 1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0,
        0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 12, 0, 0, 0, 1, 4, 12, 0, 0, 0, 1,
        20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 10, 0, 0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
    ];
    pub const SERVICE_TCP_V6: &[u8] = &[
        0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 80, 0, 4, 13, 0, 0, 0, 1, 72, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 13,
        0, 0, 0, 1, 4, 9, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 8, 0, 0, 0, 1, 4, 2, 0, 0, 0, 2, 26, 0, 4, 23,
        0, 0, 0, 1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0, 0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44, 0, 20,
        0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 13, 0, 0, 0, 1, 4, 9, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 8, 0, 0, 0,
        1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
    ];
    pub const NODEPORT_TCP_V6: &[u8] = &[
        0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 58, 0, 4, 13, 0, 0, 0, 1, 50, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 8,
        0, 0, 0, 1, 4, 2, 0, 0, 0, 1, 26, 0, 4, 23, 0, 0, 0, 1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0,
        0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 13, 0, 0, 0, 1, 4, 9, 0, 0, 0, 1, 20,
        0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 8, 0, 0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
    ];
    pub const SERVICE_UDP_V6: &[u8] = &[
        0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 80, 0, 4, 13, 0, 0, 0, 1, 72, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 13,
        0, 0, 0, 1, 4, 9, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 6, 0, 0, 0, 1, 4, 2, 0, 0, 0, 2, 26, 0, 4, 23,
        0, 0, 0, 1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0, 0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44, 0, 20,
        0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 13, 0, 0, 0, 1, 4, 9, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 6, 0, 0, 0,
        1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
    ];
    pub const NODEPORT_UDP_V6: &[u8] = &[
        0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 58, 0, 4, 13, 0, 0, 0, 1, 50, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 6,
        0, 0, 0, 1, 4, 2, 0, 0, 0, 1, 26, 0, 4, 23, 0, 0, 0, 1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0,
        0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 13, 0, 0, 0, 1, 4, 9, 0, 0, 0, 1, 20,
        0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 6, 0, 0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
    ];
    pub const SERVICE_SCTP_V6: &[u8] = &[
        0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 80, 0, 4, 13, 0, 0, 0, 1, 72, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 13,
        0, 0, 0, 1, 4, 9, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 10, 0, 0, 0, 1, 4, 2, 0, 0, 0, 2, 26, 0, 4,
        23, 0, 0, 0, 1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0, 0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44, 0,
        20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 13, 0, 0, 0, 1, 4, 9, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 10, 0,
        0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
    ];
    pub const NODEPORT_SCTP_V6: &[u8] = &[
        0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 58, 0, 4, 13, 0, 0, 0, 1, 50, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 10,
        0, 0, 0, 1, 4, 2, 0, 0, 0, 1, 26, 0, 4, 23, 0, 0, 0, 1, 18, 0, 4, 1, 0, 0, 0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0,
        0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 13, 0, 0, 0, 1, 4, 9, 0, 0, 0, 1, 20,
        0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 10, 0, 0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
    ];
}

impl SetDecl {
    /// The declaration for `family`'s table.
    pub fn spec(&self, family: IpFamily) -> SetSpec {
        let (addr, alen) = match family {
            IpFamily::V4 => (TYPE_IPADDR, 4),
            IpFamily::V6 => (TYPE_IP6ADDR, 16),
        };
        let concat = |types: &[u32]| types.iter().fold(0, |acc, t| (acc << TYPE_BITS) | t);
        let (flags, key_type, key_len, data, timeout_ms, userdata) = match self.kind {
            SetKind::AddrPortMap => (
                set_flags::MAP,
                concat(&[addr, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
                alen + 8,
                Some((DATA_TYPE_VERDICT, 0)),
                0,
                udata::CONCAT_MAP,
            ),
            SetKind::ProtoPortMap => (
                set_flags::MAP,
                concat(&[TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
                8,
                Some((DATA_TYPE_VERDICT, 0)),
                0,
                udata::CONCAT_MAP,
            ),
            SetKind::AddrPair => (0, concat(&[addr, addr]), 2 * alen, None, 0, udata::CONCAT_SET),
            SetKind::Affinity { timeout } => (
                set_flags::TIMEOUT | set_flags::EVAL,
                addr,
                alen,
                None,
                u64::from(timeout) * 1000,
                udata::ADDR,
            ),
            SetKind::AddrPortSet => (
                0,
                concat(&[addr, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
                alen + 8,
                None,
                0,
                udata::CONCAT_SET,
            ),
            SetKind::ProtoPortSet => (
                0,
                concat(&[TYPE_INET_PROTOCOL, TYPE_INET_SERVICE]),
                8,
                None,
                0,
                udata::CONCAT_SET,
            ),
            SetKind::EndpointMap(p) => (
                set_flags::MAP,
                concat(&[addr, TYPE_INET_SERVICE, TYPE_INTEGER]),
                alen + 8,
                Some((concat(&[addr, TYPE_INET_SERVICE]), alen + 4)),
                0,
                endpoint_udata(family, p, false),
            ),
            SetKind::NodePortEndpointMap(p) => (
                set_flags::MAP,
                concat(&[TYPE_INET_SERVICE, TYPE_INTEGER]),
                8,
                Some((concat(&[addr, TYPE_INET_SERVICE]), alen + 4)),
                0,
                endpoint_udata(family, p, true),
            ),
        };
        SetSpec {
            name: self.name.clone(),
            flags,
            key_type,
            key_len,
            data,
            timeout_ms,
            userdata: userdata.to_vec(),
        }
    }

    /// The body of the nft declaration: `type …; flags …;`.
    pub fn text(&self, family: IpFamily) -> String {
        let addr = match family {
            IpFamily::V4 => "ipv4_addr",
            IpFamily::V6 => "ipv6_addr",
        };
        match self.kind {
            SetKind::AddrPortMap => format!("type {addr} . inet_proto . inet_service : verdict;"),
            SetKind::ProtoPortMap => "type inet_proto . inet_service : verdict;".into(),
            SetKind::AddrPair => format!("type {addr} . {addr};"),
            SetKind::Affinity { timeout } => format!("type {addr}; flags dynamic,timeout; timeout {timeout}s;"),
            SetKind::AddrPortSet => format!("type {addr} . inet_proto . inet_service;"),
            SetKind::ProtoPortSet => "type inet_proto . inet_service;".into(),
            SetKind::EndpointMap(p) => {
                let sel = sel(family);
                format!("typeof {sel} daddr . {p} dport . numgen random mod 1 : {sel} daddr . {p} dport;")
            }
            SetKind::NodePortEndpointMap(p) => {
                let sel = sel(family);
                format!("typeof {p} dport . numgen random mod 1 : {sel} daddr . {p} dport;")
            }
        }
    }

    /// `map` or `set`, as nft's `add` command names it.
    pub fn noun(&self) -> &'static str {
        match self.kind {
            SetKind::AddrPortMap
            | SetKind::ProtoPortMap
            | SetKind::EndpointMap(_)
            | SetKind::NodePortEndpointMap(_) => "map",
            _ => "set",
        }
    }
}
