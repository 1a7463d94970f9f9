//! nf_tables expressions (`enum nft_*_attributes` in `linux/netfilter/nf_tables.h`) as values,
//! one variant per kernel expression, encoded and decoded field for field. What `nft
//! --debug=netlink` prints as `[ payload load 4b @ network header + 16 => reg 1 ]` is
//! `Expr::Payload { dreg: 1, base: NETWORK, offset: 16, len: 4 }`. Pure.

use super::wire::{Attrs, DecodeError, DecodeResult, Writer};

/// `NFT_REG_VERDICT`: where a verdict or a verdict-map lookup writes.
pub const REG_VERDICT: u32 = 0;
/// `NFT_REG_1`: the first 16-byte register; nft puts every single value there.
pub const REG_1: u32 = 1;
/// `NFT_REG_2`: where nft loads a NAT port.
pub const REG_2: u32 = 2;
/// `NFT_REG32_00`: 32-bit registers for concatenations start here (`reg 9` is `NFT_REG32_01`).
pub const REG32_00: u32 = 8;

/// `enum nft_payload_bases`.
pub const PAYLOAD_NETWORK: u32 = 1;
pub const PAYLOAD_TRANSPORT: u32 = 2;
/// `enum nft_meta_keys`.
pub const META_MARK: u32 = 3;
pub const META_IIFNAME: u32 = 6;
pub const META_L4PROTO: u32 = 16;
/// `enum nft_ct_keys`.
pub const CT_STATE: u32 = 0;
pub const CT_STATUS: u32 = 2;
/// `enum nft_cmp_ops`.
pub const CMP_EQ: u32 = 0;
pub const CMP_NEQ: u32 = 1;
/// `NFT_LOOKUP_F_INV`.
pub const LOOKUP_F_INV: u32 = 1;
/// `enum nft_dynset_ops`.
pub const DYNSET_OP_UPDATE: u32 = 1;
/// `enum nft_ng_types`.
pub const NG_RANDOM: u32 = 1;
/// `enum nft_nat_types`.
pub const NAT_DNAT: u32 = 1;
/// `NF_NAT_RANGE_MAP_IPS`: set by the kernel when a NAT statement names an address.
const NAT_F_MAP_IPS: u32 = 0x1;
/// `NF_NAT_RANGE_PROTO_SPECIFIED`: the NAT statement names a port.
pub const NAT_F_PROTO_SPECIFIED: u32 = 0x2;
/// `NF_NAT_RANGE_PROTO_RANDOM_FULLY`.
pub const NAT_F_RANDOM_FULLY: u32 = 0x10;
/// `NFT_REJECT_ICMP_UNREACH`.
pub const REJECT_ICMP_UNREACH: u32 = 0;
/// `NFTA_FIB_F_*` and `NFT_FIB_RESULT_ADDRTYPE`.
pub const FIB_F_SADDR: u32 = 1;
pub const FIB_F_DADDR: u32 = 2;
pub const FIB_RESULT_ADDRTYPE: u32 = 3;

/// A verdict: in an `immediate` to register 0, or as the data of a verdict-map element.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Accept,
    Drop,
    Continue,
    Return,
    Jump(String),
    Goto(String),
}

const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_CONTINUE: i32 = -1;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;

/// `enum nft_data_attributes` and `enum nft_verdict_attributes`.
const DATA_VALUE: u16 = 1;
const DATA_VERDICT: u16 = 2;
const VERDICT_CODE: u16 = 1;
const VERDICT_CHAIN: u16 = 2;

/// `struct nft_data`: a value (key, register contents) or a verdict.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Data {
    Value(Vec<u8>),
    Verdict(Verdict),
}

pub fn put_data(w: &mut Writer, kind: u16, data: &Data) {
    let outer = w.nest_start(kind);
    match data {
        Data::Value(v) => w.attr(DATA_VALUE, v),
        Data::Verdict(v) => {
            let inner = w.nest_start(DATA_VERDICT);
            let (code, chain) = match v {
                Verdict::Accept => (NF_ACCEPT, None),
                Verdict::Drop => (NF_DROP, None),
                Verdict::Continue => (NFT_CONTINUE, None),
                Verdict::Return => (NFT_RETURN, None),
                Verdict::Jump(c) => (NFT_JUMP, Some(c)),
                Verdict::Goto(c) => (NFT_GOTO, Some(c)),
            };
            w.be32(VERDICT_CODE, code as u32);
            if let Some(c) = chain {
                w.str(VERDICT_CHAIN, c);
            }
            w.nest_end(inner);
        }
    }
    w.nest_end(outer);
}

pub fn get_data(a: Attrs) -> DecodeResult<Data> {
    if let Some(v) = a.get(DATA_VALUE) {
        return Ok(Data::Value(v.to_vec()));
    }
    let v = a
        .nest(DATA_VERDICT)
        .ok_or(DecodeError::Missing("NFTA_DATA_VALUE or NFTA_DATA_VERDICT"))?;
    let code = v.be32(VERDICT_CODE, "NFTA_VERDICT_CODE")? as i32;
    let chain = || v.str(VERDICT_CHAIN, "NFTA_VERDICT_CHAIN");
    Ok(Data::Verdict(match code {
        NF_ACCEPT => Verdict::Accept,
        NF_DROP => Verdict::Drop,
        NFT_CONTINUE => Verdict::Continue,
        NFT_RETURN => Verdict::Return,
        NFT_JUMP => Verdict::Jump(chain()?),
        NFT_GOTO => Verdict::Goto(chain()?),
        _ => return Err(DecodeError::Bad("NFTA_VERDICT_CODE")),
    }))
}

/// One expression of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    /// `[ payload load LENb @ BASE header + OFFSET => reg DREG ]`
    Payload {
        dreg: u32,
        base: u32,
        offset: u32,
        len: u32,
    },
    /// `[ meta load KEY => reg DREG ]`
    Meta { key: u32, dreg: u32 },
    /// `[ meta set KEY with reg SREG ]`
    MetaSet { key: u32, sreg: u32 },
    /// `[ ct load KEY => reg DREG ]`
    Ct { key: u32, dreg: u32 },
    /// `[ cmp OP reg SREG DATA ]`
    Cmp { sreg: u32, op: u32, data: Vec<u8> },
    /// `[ bitwise reg DREG = ( reg SREG & MASK ) ^ XOR ]`
    Bitwise {
        sreg: u32,
        dreg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    /// `[ immediate reg DREG DATA ]`
    Immediate { dreg: u32, data: Data },
    /// `[ lookup reg SREG set SET (dreg DREG) ]`; `flags` has [`LOOKUP_F_INV`] for `!=`.
    Lookup {
        sreg: u32,
        set: String,
        dreg: Option<u32>,
        flags: u32,
    },
    /// `[ dynset OP reg_key SREG set SET ]`; the timeout in ms, 0 for the set's own.
    Dynset {
        op: u32,
        sreg_key: u32,
        set: String,
        timeout_ms: u64,
    },
    /// `[ numgen reg DREG = random mod MODULUS (offset OFFSET) ]`
    Numgen {
        dreg: u32,
        modulus: u32,
        kind: u32,
        offset: u32,
    },
    /// `[ nat dnat ip addr_min reg A proto_min reg P flags F ]`
    Nat {
        kind: u32,
        family: u32,
        reg_addr: Option<u32>,
        reg_proto: Option<u32>,
        flags: u32,
    },
    /// `[ masq flags F ]`
    Masq { flags: u32 },
    /// `[ reject type T code C ]`
    Reject { kind: u32, code: u8 },
    /// `[ fib daddr type => reg 1 ]`
    Fib { flags: u32, result: u32, dreg: u32 },
    /// An expression kproxy never writes (someone else's rule in kproxy's table): kept as the
    /// kernel sent it, so that it compares unequal to anything kproxy wants.
    Other { name: String, data: Vec<u8> },
}

/// `NFTA_EXPR_NAME`, `NFTA_EXPR_DATA`.
const EXPR_NAME: u16 = 1;
const EXPR_DATA: u16 = 2;

impl Expr {
    fn name(&self) -> &str {
        match self {
            Expr::Payload { .. } => "payload",
            Expr::Meta { .. } | Expr::MetaSet { .. } => "meta",
            Expr::Ct { .. } => "ct",
            Expr::Cmp { .. } => "cmp",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Immediate { .. } => "immediate",
            Expr::Lookup { .. } => "lookup",
            Expr::Dynset { .. } => "dynset",
            Expr::Numgen { .. } => "numgen",
            Expr::Nat { .. } => "nat",
            Expr::Masq { .. } => "masq",
            Expr::Reject { .. } => "reject",
            Expr::Fib { .. } => "fib",
            Expr::Other { name, .. } => name,
        }
    }

    /// Appends `NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA { … } }`, attributes in the
    /// order nft 1.0.6 writes them.
    pub fn encode(&self, w: &mut Writer) {
        let elem = w.nest_start(1); // NFTA_LIST_ELEM
        w.str(EXPR_NAME, self.name());
        if let Expr::Other { data, .. } = self {
            w.attr(EXPR_DATA | super::wire::NLA_F_NESTED, data);
            w.nest_end(elem);
            return;
        }
        let d = w.nest_start(EXPR_DATA);
        match self {
            Expr::Payload {
                dreg,
                base,
                offset,
                len,
            } => {
                w.be32(1, *dreg);
                w.be32(2, *base);
                w.be32(3, *offset);
                w.be32(4, *len);
            }
            Expr::Meta { key, dreg } => {
                w.be32(2, *key);
                w.be32(1, *dreg);
            }
            Expr::MetaSet { key, sreg } => {
                w.be32(2, *key);
                w.be32(3, *sreg);
            }
            Expr::Ct { key, dreg } => {
                w.be32(2, *key);
                w.be32(1, *dreg);
            }
            Expr::Cmp { sreg, op, data } => {
                w.be32(1, *sreg);
                w.be32(2, *op);
                put_data(w, 3, &Data::Value(data.clone()));
            }
            Expr::Bitwise { sreg, dreg, mask, xor } => {
                w.be32(1, *sreg);
                w.be32(2, *dreg);
                w.be32(3, mask.len() as u32);
                put_data(w, 4, &Data::Value(mask.clone()));
                put_data(w, 5, &Data::Value(xor.clone()));
            }
            Expr::Immediate { dreg, data } => {
                w.be32(1, *dreg);
                put_data(w, 2, data);
            }
            Expr::Lookup { sreg, set, dreg, flags } => {
                w.be32(2, *sreg);
                if let Some(d) = dreg {
                    w.be32(3, *d);
                }
                w.str(1, set);
                if *flags != 0 {
                    w.be32(5, *flags);
                }
            }
            Expr::Dynset {
                op,
                sreg_key,
                set,
                timeout_ms,
            } => {
                w.be32(4, *sreg_key);
                w.be32(3, *op);
                w.str(1, set);
                if *timeout_ms != 0 {
                    w.be64(6, *timeout_ms);
                }
            }
            Expr::Numgen {
                dreg,
                modulus,
                kind,
                offset,
            } => {
                w.be32(1, *dreg);
                w.be32(2, *modulus);
                w.be32(3, *kind);
                w.be32(4, *offset);
            }
            Expr::Nat {
                kind,
                family,
                reg_addr,
                reg_proto,
                flags,
            } => {
                w.be32(1, *kind);
                w.be32(2, *family);
                if let Some(r) = reg_addr {
                    w.be32(3, *r);
                }
                if let Some(r) = reg_proto {
                    w.be32(5, *r);
                }
                if *flags != 0 {
                    w.be32(7, *flags);
                }
            }
            Expr::Masq { flags } => {
                if *flags != 0 {
                    w.be32(1, *flags);
                }
            }
            Expr::Reject { kind, code } => {
                w.be32(1, *kind);
                w.u8(2, *code);
            }
            Expr::Fib { flags, result, dreg } => {
                w.be32(3, *flags);
                w.be32(2, *result);
                w.be32(1, *dreg);
            }
            Expr::Other { .. } => {}
        }
        w.nest_end(d);
        w.nest_end(elem);
    }

    /// One `NFTA_LIST_ELEM` as the kernel dumps or echoes it. Attributes the kernel reports
    /// for its own bookkeeping (a lookup's set id, a payload's checksum fields when unused)
    /// are dropped, so a rule reads back equal to the value it was written from.
    pub fn decode(elem: Attrs) -> DecodeResult<Expr> {
        let name = elem.str(EXPR_NAME, "NFTA_EXPR_NAME")?;
        let raw = elem.get(EXPR_DATA).unwrap_or_default();
        let a = Attrs(raw);
        let value = |kind: u16, what: &'static str| -> DecodeResult<Vec<u8>> {
            match get_data(a.nest(kind).ok_or(DecodeError::Missing(what))?)? {
                Data::Value(v) => Ok(v),
                Data::Verdict(_) => Err(DecodeError::Bad(what)),
            }
        };
        let other = || Expr::Other {
            name: name.clone(),
            data: raw.to_vec(),
        };
        Ok(match name.as_str() {
            // A payload write (a set) has an SREG; kproxy only loads.
            "payload" if a.get(5).is_none() => Expr::Payload {
                dreg: a.be32(1, "NFTA_PAYLOAD_DREG")?,
                base: a.be32(2, "NFTA_PAYLOAD_BASE")?,
                offset: a.be32(3, "NFTA_PAYLOAD_OFFSET")?,
                len: a.be32(4, "NFTA_PAYLOAD_LEN")?,
            },
            "meta" => match a.get(1) {
                Some(_) => Expr::Meta {
                    key: a.be32(2, "NFTA_META_KEY")?,
                    dreg: a.be32(1, "NFTA_META_DREG")?,
                },
                None => Expr::MetaSet {
                    key: a.be32(2, "NFTA_META_KEY")?,
                    sreg: a.be32(3, "NFTA_META_SREG")?,
                },
            },
            "ct" if a.get(1).is_some() && a.get(3).is_none() => Expr::Ct {
                key: a.be32(2, "NFTA_CT_KEY")?,
                dreg: a.be32(1, "NFTA_CT_DREG")?,
            },
            "cmp" => Expr::Cmp {
                sreg: a.be32(1, "NFTA_CMP_SREG")?,
                op: a.be32(2, "NFTA_CMP_OP")?,
                data: value(3, "NFTA_CMP_DATA")?,
            },
            // NFT_BITWISE_BOOL (0) is the only operation kproxy writes; shifts stay foreign.
            "bitwise" if a.be32_or(6, 0) == 0 => Expr::Bitwise {
                sreg: a.be32(1, "NFTA_BITWISE_SREG")?,
                dreg: a.be32(2, "NFTA_BITWISE_DREG")?,
                mask: value(4, "NFTA_BITWISE_MASK")?,
                xor: value(5, "NFTA_BITWISE_XOR")?,
            },
            "immediate" => Expr::Immediate {
                dreg: a.be32(1, "NFTA_IMMEDIATE_DREG")?,
                data: get_data(a.nest(2).ok_or(DecodeError::Missing("NFTA_IMMEDIATE_DATA"))?)?,
            },
            "lookup" => Expr::Lookup {
                sreg: a.be32(2, "NFTA_LOOKUP_SREG")?,
                set: a.str(1, "NFTA_LOOKUP_SET")?,
                dreg: a.be32(3, "").ok(),
                flags: a.be32_or(5, 0),
            },
            // With expressions attached (`update @s { ip saddr counter }`) it is not kproxy's.
            "dynset" if a.get(5).is_none() && a.get(7).is_none() && a.get(10).is_none() && a.be32_or(9, 0) == 0 => {
                Expr::Dynset {
                    op: a.be32(3, "NFTA_DYNSET_OP")?,
                    sreg_key: a.be32(4, "NFTA_DYNSET_SREG_KEY")?,
                    set: a.str(1, "NFTA_DYNSET_SET_NAME")?,
                    timeout_ms: a.be64(6, "").unwrap_or(0),
                }
            }
            "numgen" => Expr::Numgen {
                dreg: a.be32(1, "NFTA_NG_DREG")?,
                modulus: a.be32(2, "NFTA_NG_MODULUS")?,
                kind: a.be32(3, "NFTA_NG_TYPE")?,
                offset: a.be32_or(4, 0),
            },
            // The kernel reports a range whose maximum is its minimum, and the address-mapping
            // flag it sets itself when an address register is given.
            "nat"
                if [(4, 3), (6, 5)]
                    .iter()
                    .all(|(max, min)| a.get(*max).is_none() || a.get(*max) == a.get(*min)) =>
            {
                let reg_addr = a.be32(3, "").ok();
                let mut flags = a.be32_or(7, 0);
                if reg_addr.is_some() {
                    flags &= !NAT_F_MAP_IPS;
                }
                Expr::Nat {
                    kind: a.be32(1, "NFTA_NAT_TYPE")?,
                    family: a.be32(2, "NFTA_NAT_FAMILY")?,
                    reg_addr,
                    reg_proto: a.be32(5, "").ok(),
                    flags,
                }
            }
            "masq" if a.get(2).is_none() => Expr::Masq { flags: a.be32_or(1, 0) },
            "reject" => Expr::Reject {
                kind: a.be32(1, "NFTA_REJECT_TYPE")?,
                code: *a
                    .need(2, "NFTA_REJECT_ICMP_CODE")?
                    .first()
                    .ok_or(DecodeError::Truncated)?,
            },
            "fib" => Expr::Fib {
                flags: a.be32(3, "NFTA_FIB_FLAGS")?,
                result: a.be32(2, "NFTA_FIB_RESULT")?,
                dreg: a.be32(1, "NFTA_FIB_DREG")?,
            },
            _ => other(),
        })
    }
}
