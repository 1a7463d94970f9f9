//! Reading netlink attributes (`struct nlattr`, `linux/netlink.h`), shared by the netlink
//! decoders of IPVS (generic netlink) and nftables (NETLINK_NETFILTER).

/// The attribute type without its `NLA_F_NESTED` / `NLA_F_NET_BYTEORDER` flags.
pub const NLA_TYPE_MASK: u16 = 0x3fff;

/// A native-endian u16 at `at`, if `b` holds it.
pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// A native-endian u32 at `at`, if `b` holds it.
pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The attributes in `buf`, as (type without flags, payload); stops at the first one that is
/// truncated or shorter than its header.
pub fn iter(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = u16_at(buf, at)? as usize;
        let kind = u16_at(buf, at + 2)?;
        if len < 4 || at + len > buf.len() {
            return None;
        }
        let payload = &buf[at + 4..at + len];
        at += (len + 3) & !3;
        Some((kind & NLA_TYPE_MASK, payload))
    })
}
