//! Reading netlink messages (`struct nlmsghdr`) and their attributes (`struct nlattr`,
//! `linux/netlink.h`), shared by the netlink decoders of IPVS (generic netlink), nftables and
//! the other nfnetlink subsystems (NETLINK_NETFILTER).

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

/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDRLEN: usize = 16;

/// One netlink message of a datagram: its header's fields and its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub port: u32,
    pub body: &'a [u8],
}

/// A message whose length is shorter than its header or runs past the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated;

/// The messages of one datagram, in order. A truncated one ends it, as an `Err`; bytes too
/// few for another header are ignored.
pub fn messages(buf: &[u8]) -> impl Iterator<Item = Result<Message<'_>, Truncated>> {
    let mut at = 0;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || at + NLMSG_HDRLEN > buf.len() {
            return None;
        }
        let len = u32_at(buf, at)? as usize;
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            failed = true;
            return Some(Err(Truncated));
        }
        let m = Message {
            kind: u16_at(buf, at + 4)?,
            flags: u16_at(buf, at + 6)?,
            seq: u32_at(buf, at + 8)?,
            port: u32_at(buf, at + 12)?,
            body: &buf[at + NLMSG_HDRLEN..at + len],
        };
        at += (len + 3) & !3;
        Some(Ok(m))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u32, kind: u16, seq: u32) -> Vec<u8> {
        let mut h = Vec::new();
        for part in [
            &len.to_ne_bytes()[..],
            &kind.to_ne_bytes(),
            &5u16.to_ne_bytes(),
            &seq.to_ne_bytes(),
            &9u32.to_ne_bytes(),
        ] {
            h.extend_from_slice(part);
        }
        h
    }

    #[test]
    fn messages_are_split_at_their_aligned_lengths_and_a_truncated_one_ends_the_datagram() {
        let mut buf = header(19, 16, 1);
        buf.extend_from_slice(&[1, 2, 3, 0]); // 3 bytes of body, one of padding
        buf.extend(header(16, 3, 2));
        buf.extend_from_slice(&[0; 8]); // too few bytes for another header: ignored
        let got: Vec<_> = messages(&buf).collect();
        assert_eq!(
            got,
            [
                Ok(Message {
                    kind: 16,
                    flags: 5,
                    seq: 1,
                    port: 9,
                    body: &[1, 2, 3]
                }),
                Ok(Message {
                    kind: 3,
                    flags: 5,
                    seq: 2,
                    port: 9,
                    body: &[]
                }),
            ]
        );
        let mut bad = header(64, 16, 1);
        bad.extend(header(16, 3, 2));
        assert_eq!(
            messages(&bad).collect::<Vec<_>>(),
            [Err(Truncated)],
            "runs past the datagram"
        );
        assert_eq!(
            messages(&header(12, 16, 1)).collect::<Vec<_>>(),
            [Err(Truncated)],
            "shorter than its header"
        );
    }
}
