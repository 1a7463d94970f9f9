//! The kernel's x_tables structures (linux/netfilter_ipv4/ip_tables.h, netfilter_ipv6/
//! ip6_tables.h, netfilter/x_tables.h) as offsets into byte buffers, for both families. Pure.

use std::net::IpAddr;

use ipnet::IpNet;

use super::rule::RuleError;

/// XT_ALIGN: entries, matches and targets are padded to 8 bytes (`__alignof__(struct
/// _xt_align)`, u64 on x86_64).
pub const fn xt_align(n: usize) -> usize {
    (n + 7) & !7
}

/// `struct xt_entry_target` (32) + `int verdict`, aligned.
pub const STANDARD_TARGET_SIZE: usize = xt_align(32 + 4);
/// `struct xt_error_target`: the header and `char errorname[XT_FUNCTION_MAXNAMELEN]` (30).
pub const ERROR_TARGET_SIZE: usize = xt_align(32 + 30);
/// `struct xt_counters`: packets and bytes, u64 each.
pub const COUNTERS_SIZE: usize = 16;
/// The verdict of a user chain's last entry (XT_RETURN = -NF_REPEAT - 1).
pub const RETURN: i32 = -5;
/// `struct ipt_get_entries`/`ip6t_get_entries` up to `entrytable` (name, size, padding).
pub const GET_ENTRIES_HEADER: usize = 40;
/// `struct ipt_replace`/`ip6t_replace` up to `entries`: name, valid_hooks, num_entries, size,
/// hook_entry[5], underflow[5], num_counters, counters pointer.
pub const REPLACE_HEADER: usize = 96;
/// `struct xt_counters_info` up to `counters`: name, num_counters, padding.
pub const COUNTERS_INFO_HEADER: usize = 40;
/// `struct ipt_getinfo`: name, valid_hooks, hook_entry[5], underflow[5], num_entries, size.
pub const GETINFO_SIZE: usize = 84;
/// NF_INET_NUMHOOKS.
pub const HOOKS: usize = 5;
/// XT_TABLE_MAXNAMELEN.
pub const TABLE_NAME_LEN: usize = 32;

/// The IP family of a table: which entry header and which sockopt level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// The `ipt_ip`/`ip6t_ip6` fields a rule sets.
#[derive(Debug, Default)]
pub struct IpFields {
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
    pub iniface: Option<String>,
    pub outiface: Option<String>,
    pub proto: Option<u8>,
    /// IPT_INV_* / IP6T_INV_* (the same bits).
    pub invflags: u8,
}

impl Family {
    /// `sizeof(struct ipt_entry)` (112) or `sizeof(struct ip6t_entry)` (168).
    pub const fn entry_size(self) -> usize {
        match self {
            Family::V4 => 112,
            Family::V6 => 168,
        }
    }

    pub const fn target_offset_at(self) -> usize {
        match self {
            Family::V4 => 88,
            Family::V6 => 140,
        }
    }

    pub const fn next_offset_at(self) -> usize {
        self.target_offset_at() + 2
    }

    pub const fn counters_at(self) -> usize {
        match self {
            Family::V4 => 96,
            Family::V6 => 152,
        }
    }

    pub fn matches(self, ip: &IpAddr) -> bool {
        matches!((self, ip), (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_)))
    }

    /// Writes the address part of an entry.
    pub fn put_ip(self, entry: &mut [u8], f: &IpFields) -> Result<(), RuleError> {
        let (addr_len, iface_at, proto_at) = match self {
            Family::V4 => (4, 16, 80),
            Family::V6 => (16, 64, 128),
        };
        let mut put_net = |net: &Option<IpNet>, at: usize, mask_at: usize| {
            if let Some(net) = net {
                let (addr, mask) = match net {
                    IpNet::V4(n) => (n.network().octets().to_vec(), n.netmask().octets().to_vec()),
                    IpNet::V6(n) => (n.network().octets().to_vec(), n.netmask().octets().to_vec()),
                };
                entry[at..at + addr_len].copy_from_slice(&addr);
                entry[mask_at..mask_at + addr_len].copy_from_slice(&mask);
            }
        };
        put_net(&f.src, 0, 2 * addr_len);
        put_net(&f.dst, addr_len, 3 * addr_len);
        for (name, at) in [(&f.iniface, iface_at), (&f.outiface, iface_at + 16)] {
            if let Some(name) = name {
                // libxtables: a trailing `+` is a prefix match (the `+` stays in the name, the
                // mask covers what precedes it); otherwise the mask covers the NUL too.
                let bytes = name.as_bytes();
                entry[at..at + bytes.len()].copy_from_slice(bytes);
                let masked = if bytes.ends_with(b"+") {
                    bytes.len() - 1
                } else {
                    bytes.len() + 1
                };
                entry[at + 32..at + 32 + masked].fill(0xff);
            }
        }
        if let Some(p) = f.proto {
            put_u16(entry, proto_at, p as u16);
        }
        match self {
            Family::V4 => entry[83] = f.invflags,
            Family::V6 => {
                // IP6T_F_PROTO: ip6tables matches the protocol only with the flag.
                if f.proto.is_some() {
                    entry[131] = 0x01;
                }
                entry[132] = f.invflags;
            }
        }
        Ok(())
    }
}

pub fn put_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_ne_bytes());
}

pub fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

pub fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

pub fn get_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([buf[at], buf[at + 1]])
}

pub fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

/// A NUL-padded name field; the caller checked the length.
pub fn put_name(field: &mut [u8], name: &str) {
    field[..name.len()].copy_from_slice(name.as_bytes());
}

/// The NUL-terminated string at the start of `field`.
pub fn get_name(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}
