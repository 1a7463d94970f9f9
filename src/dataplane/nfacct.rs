//! nfacct, the kernel's named packet/byte counters (`nfnetlink_acct`), as kube-proxy uses
//! them: iptables rules count into them with `-m nfacct --nfacct-name NAME` and the metrics
//! read them at scrape time. Unlike a rule's own counters they survive the rule being
//! rewritten by iptables-restore, so the metrics are cumulative.
//!
//! Requests are values encoded to bytes (`nfacct add NAME`, `nfacct list`), replies decoded
//! from bytes; [`ensure`] and [`list`] are the only functions that touch a socket (the one
//! [`nfnetlink::exchange`] keeps).

use super::nfnetlink::{self, Attrs, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST};

/// The counter kproxy's `ctstate INVALID` drop rule counts into (upstream's name).
pub const CT_STATE_INVALID_DROPPED: &str = "ct_state_invalid_dropped_pkts";
/// The counter of NodePort packets accepted on 127.0.0.0/8 (upstream's name).
pub const LOCALHOST_NODEPORTS_ACCEPTED: &str = "localhost_nodeps_accepted_pkts";

const NFNL_SUBSYS_ACCT: u16 = 7;
const NFNL_MSG_ACCT_NEW: u16 = 0;
const NFNL_MSG_ACCT_GET: u16 = 1;
const NFACCT_NAME: u16 = 1;
const NFACCT_PKTS: u16 = 2;
const NFACCT_BYTES: u16 = 3;
/// `EBUSY`: the kernel's answer to creating a counter that exists.
const EBUSY: i32 = 16;

/// One counter as `nfacct list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

/// `nfacct add NAME`: a new counter at zero.
pub fn encode_add(name: &str, seq: u32) -> Vec<u8> {
    let mut attr = name.as_bytes().to_vec();
    attr.push(0);
    nfnetlink::message(
        NFNL_SUBSYS_ACCT,
        NFNL_MSG_ACCT_NEW,
        0,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
        seq,
        Attrs::default().put(NFACCT_NAME, &attr),
    )
}

/// `nfacct list`: a dump of every counter in this network namespace.
pub fn encode_list(seq: u32) -> Vec<u8> {
    nfnetlink::message(
        NFNL_SUBSYS_ACCT,
        NFNL_MSG_ACCT_GET,
        0,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        &Attrs::default(),
    )
}

/// One counter of a dump, from its attributes.
fn decode_counter(attrs: &[u8]) -> Result<Counter, String> {
    let mut c = Counter {
        name: String::new(),
        packets: 0,
        bytes: 0,
    };
    let be64 = |v: &[u8]| {
        v.try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| format!("a counter of {} bytes", v.len()))
    };
    for (kind, value) in super::nlattr::iter(attrs) {
        match kind {
            NFACCT_NAME => c.name = String::from_utf8_lossy(value).trim_end_matches('\0').to_string(),
            NFACCT_PKTS => c.packets = be64(value)?,
            NFACCT_BYTES => c.bytes = be64(value)?,
            _ => {}
        }
    }
    Ok(c)
}

/// Every counter in this network namespace.
pub fn list() -> Result<Vec<Counter>, String> {
    let mut out = Vec::new();
    let mut bad = None;
    nfnetlink::exchange(&encode_list(1), |_, attrs| match decode_counter(attrs) {
        Ok(c) => out.push(c),
        Err(e) => bad = Some(e),
    })
    .map_err(|e| format!("nfacct list: {e}"))?;
    match bad {
        Some(e) => Err(format!("nfacct list: {e}")),
        None => Ok(out),
    }
}

/// Creates the counter unless it exists (kube-proxy's `nfacct.Ensure`).
pub fn ensure(name: &str) -> Result<(), String> {
    match nfnetlink::exchange(&encode_add(name, 1), |_, _| {}) {
        Ok(()) | Err(nfnetlink::Error::Kernel(EBUSY)) => Ok(()),
        Err(e) => Err(format!("nfacct add {name}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::nfnetlink::tests::kept_port;

    /// Scrapes reuse one socket in the process's namespace (closing one costs the kernel's
    /// commit mutex), and threads in other namespaces keep none. Skipped where the kernel has
    /// no nfacct or without root.
    #[test]
    fn the_process_namespace_keeps_its_socket() {
        if list().is_err() {
            eprintln!("skipping: nfacct unavailable here");
            return;
        }
        let first = kept_port().expect("a socket kept after a complete answer");
        list().unwrap();
        list().unwrap();
        // Another test of this process may have taken it meanwhile; none do but this one.
        assert_eq!(kept_port(), Some(first), "the same socket answered again");
        let other = crate::dataplane::nftables::socket::tests::in_netns(|| {
            let before = kept_port();
            let listed = list().is_ok();
            (before, listed, kept_port())
        });
        if let Some((before, listed, after)) = other {
            assert!(listed, "a new namespace's counters are listed too");
            assert_eq!(
                before, after,
                "a thread in another namespace neither took nor replaced the kept socket"
            );
        }
    }

    #[test]
    fn add_request_is_an_acct_new_with_the_name() {
        let msg = encode_add("ct_state_invalid_dropped_pkts", 7);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize, msg.len());
        assert_eq!(
            u16::from_ne_bytes([msg[4], msg[5]]),
            0x0700,
            "NFNL_SUBSYS_ACCT << 8 | NEW"
        );
        assert_eq!(u16::from_ne_bytes([msg[6], msg[7]]), 0x405, "REQUEST|ACK|CREATE");
        assert_eq!(&msg[16..20], &[0, 0, 0, 0], "nfgenmsg AF_UNSPEC v0");
        assert_eq!(
            u16::from_ne_bytes([msg[20], msg[21]]),
            4 + 30,
            "attribute length includes the NUL"
        );
        assert_eq!(&msg[24..53], b"ct_state_invalid_dropped_pkts");
        assert_eq!(msg.len() % 4, 0);
    }

    #[test]
    fn decodes_a_counter_with_big_endian_counts() {
        let mut attrs = Attrs::default();
        attrs
            .put(NFACCT_NAME, b"localhost_nodeps_accepted_pkts\0")
            .put(NFACCT_PKTS, &42u64.to_be_bytes())
            .put(NFACCT_BYTES, &4200u64.to_be_bytes());
        let msg = nfnetlink::message(NFNL_SUBSYS_ACCT, NFNL_MSG_ACCT_NEW, 0, 0, 1, &attrs);
        let [nfnetlink::Reply::Message { attrs, .. }] = nfnetlink::decode(&msg).unwrap()[..] else {
            panic!("one message");
        };
        assert_eq!(
            decode_counter(attrs).unwrap(),
            Counter {
                name: "localhost_nodeps_accepted_pkts".into(),
                packets: 42,
                bytes: 4200
            }
        );
        let short = nfnetlink::message(NFNL_SUBSYS_ACCT, 0, 0, 0, 1, Attrs::default().put(NFACCT_PKTS, &[1, 2]));
        assert_eq!(decode_counter(&short[20..]).unwrap_err(), "a counter of 2 bytes");
    }
}
