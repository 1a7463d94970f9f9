//! Netlink framing shared by every nf_tables message: headers, attributes, nests. Pure.
//!
//! nf_tables puts every integer attribute in network byte order (`nla_put_be32`), unlike most
//! netlink families; register contents (marks, verdict codes in data) are host order.

use crate::dataplane::nlattr::{self, u32_at};

/// `linux/netlink.h`.
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_ECHO: u16 = 0x8;
/// Set on dump messages when the ruleset changed during the dump: the listing is not a snapshot.
pub const NLM_F_DUMP_INTR: u16 = 0x10;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
/// In an `NLMSG_ERROR`: the original message is capped to its header.
pub const NLM_F_CAPPED: u16 = 0x100;
/// In an `NLMSG_ERROR`: extended-ack attributes follow.
pub const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
pub const NLA_F_NESTED: u16 = 0x8000;

/// Appends attributes and messages to one buffer (a whole batch is one buffer).
pub struct Writer<'a> {
    pub buf: &'a mut Vec<u8>,
}

impl Writer<'_> {
    /// Starts a message: `nlmsghdr` (length patched by [`Writer::end_message`]) and `nfgenmsg`.
    pub fn begin_message(&mut self, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel knows ours
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    pub fn end_message(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    pub fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
    }

    fn pad(&mut self) {
        let n = (4 - self.buf.len() % 4) % 4;
        self.buf.resize(self.buf.len() + n, 0);
    }

    /// A NUL-terminated string, as the kernel's `NLA_STRING` policies expect.
    pub fn str(&mut self, kind: u16, s: &str) {
        let len = 4 + s.len() + 1;
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    pub fn be32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_be_bytes());
    }

    pub fn be64(&mut self, kind: u16, v: u64) {
        self.attr(kind, &v.to_be_bytes());
    }

    pub fn u8(&mut self, kind: u16, v: u8) {
        self.attr(kind, &[v]);
    }

    pub fn nest_start(&mut self, kind: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        start
    }

    pub fn nest_end(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// Why bytes from the kernel could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated netlink message")]
    Truncated,
    #[error("missing attribute {0}")]
    Missing(&'static str),
    #[error("unexpected value for {0}")]
    Bad(&'static str),
}

pub type DecodeResult<T> = Result<T, DecodeError>;

impl From<nlattr::Truncated> for DecodeError {
    fn from(_: nlattr::Truncated) -> DecodeError {
        DecodeError::Truncated
    }
}

/// The attributes of one message or nest, by type (flags stripped).
#[derive(Debug, Clone, Copy)]
pub struct Attrs<'a>(pub &'a [u8]);

impl<'a> Attrs<'a> {
    pub fn iter(&self) -> impl Iterator<Item = (u16, &'a [u8])> {
        nlattr::iter(self.0)
    }

    pub fn get(&self, kind: u16) -> Option<&'a [u8]> {
        self.iter().find(|(k, _)| *k == kind).map(|(_, p)| p)
    }

    pub fn nest(&self, kind: u16) -> Option<Attrs<'a>> {
        self.get(kind).map(Attrs)
    }

    pub fn need(&self, kind: u16, name: &'static str) -> DecodeResult<&'a [u8]> {
        self.get(kind).ok_or(DecodeError::Missing(name))
    }

    pub fn be32(&self, kind: u16, name: &'static str) -> DecodeResult<u32> {
        let p = self.need(kind, name)?;
        Ok(u32::from_be_bytes(
            p.get(..4)
                .and_then(|s| s.try_into().ok())
                .ok_or(DecodeError::Truncated)?,
        ))
    }

    pub fn be32_or(&self, kind: u16, default: u32) -> u32 {
        self.be32(kind, "").unwrap_or(default)
    }

    pub fn be64(&self, kind: u16, name: &'static str) -> DecodeResult<u64> {
        let p = self.need(kind, name)?;
        Ok(u64::from_be_bytes(
            p.get(..8)
                .and_then(|s| s.try_into().ok())
                .ok_or(DecodeError::Truncated)?,
        ))
    }

    /// A NUL-terminated string attribute.
    pub fn str(&self, kind: u16, name: &'static str) -> DecodeResult<String> {
        let p = self.need(kind, name)?;
        let end = p.iter().position(|b| *b == 0).unwrap_or(p.len());
        String::from_utf8(p[..end].to_vec()).map_err(|_| DecodeError::Bad(name))
    }
}

/// One message from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    /// An nf_tables message (a dump entry, an echo, a notification): its type within the
    /// subsystem (`NFT_MSG_*`), flags, family and attributes.
    Message {
        seq: u32,
        kind: u8,
        flags: u16,
        family: u8,
        attrs: Attrs<'a>,
    },
    /// `NLMSG_ERROR`: errno 0 is an acknowledgement, otherwise a positive errno. `message` is
    /// the kernel's extended-ack text, if any.
    Error {
        seq: u32,
        errno: i32,
        message: Option<String>,
    },
    /// `NLMSG_DONE`: the end of a dump.
    Done { seq: u32, flags: u16 },
}

impl PartialEq for Attrs<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for Attrs<'_> {}

/// One multicast notification (`NFNLGRP_NFTABLES`, what `nft monitor` prints): the message
/// type within its netfilter subsystem, the subsystem, the port id of the socket whose commit
/// it reports (`nlmsg_pid`), the object's family and its attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification<'a> {
    pub subsys: u8,
    pub kind: u8,
    pub port: u32,
    pub family: u8,
    pub attrs: Attrs<'a>,
}

/// Splits one datagram of notifications into its messages (control messages are left out).
pub fn decode_notifications(buf: &[u8]) -> DecodeResult<Vec<Notification<'_>>> {
    let mut out = Vec::new();
    for m in nlattr::messages(buf) {
        let m = m?;
        // Types below 16 are netlink's own (NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, ...).
        if m.kind >= 16 {
            if m.body.len() < 4 {
                return Err(DecodeError::Truncated);
            }
            out.push(Notification {
                subsys: (m.kind >> 8) as u8,
                kind: (m.kind & 0xff) as u8,
                port: m.port,
                family: m.body[0],
                attrs: Attrs(&m.body[4..]),
            });
        }
    }
    Ok(out)
}

/// Splits one datagram from the kernel into its messages.
pub fn decode_replies(buf: &[u8]) -> DecodeResult<Vec<Reply<'_>>> {
    let mut out = Vec::new();
    for m in nlattr::messages(buf) {
        let nlattr::Message {
            kind, flags, seq, body, ..
        } = m?;
        out.push(match kind {
            NLMSG_ERROR => {
                let errno = (u32_at(body, 0).ok_or(DecodeError::Truncated)? as i32).wrapping_neg();
                // struct nlmsgerr: the error, then the request's header (and, unless capped,
                // its payload); then, with NLM_F_ACK_TLVS, extended-ack attributes.
                let mut message = None;
                if flags & NLM_F_ACK_TLVS != 0 {
                    let orig_len = u32_at(body, 4).unwrap_or(16) as usize;
                    let skip = if flags & NLM_F_CAPPED != 0 {
                        16
                    } else {
                        orig_len.max(16)
                    };
                    if let Some(tlvs) = body.get(4 + ((skip + 3) & !3)..) {
                        message = Attrs(tlvs).str(NLMSGERR_ATTR_MSG, "NLMSGERR_ATTR_MSG").ok();
                    }
                }
                Reply::Error { seq, errno, message }
            }
            NLMSG_DONE => Reply::Done { seq, flags },
            _ => {
                if body.len() < 4 {
                    return Err(DecodeError::Truncated);
                }
                Reply::Message {
                    seq,
                    kind: (kind & 0xff) as u8,
                    flags,
                    family: body[0],
                    attrs: Attrs(&body[4..]),
                }
            }
        });
    }
    Ok(out)
}
