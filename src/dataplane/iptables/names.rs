//! Every iptables name kproxy writes: fixed chains, generated chains, comments.
//!
//! Generated chain names follow kube-proxy's scheme (a prefix and 16 base32 characters from a
//! SHA-256 over the port name, protocol and endpoint), so they are stable across restarts and
//! always fit iptables' 28-character limit. The first 14 characters are the hash's; the last
//! two place the name in iptables-restore's table of chain names (see [`xt_bucket_suffix`]).

use sha2::{Digest, Sha256};

use crate::model::{Endpoint, ServicePortName};

/// Every chain kproxy owns starts with this; nothing else is ever touched.
pub const PREFIX: &str = "KPROXY-";

pub const SERVICES: &str = "KPROXY-SERVICES";
pub const EXTERNAL_SERVICES: &str = "KPROXY-EXTERNAL-SERVICES";
pub const NODEPORTS: &str = "KPROXY-NODEPORTS";
pub const POSTROUTING: &str = "KPROXY-POSTROUTING";
pub const MARK_MASQ: &str = "KPROXY-MARK-MASQ";
pub const FORWARD: &str = "KPROXY-FORWARD";
pub const FIREWALL: &str = "KPROXY-FIREWALL";
/// kube-proxy's canary (`KUBE-PROXY-CANARY`): an empty chain in the mangle table that nothing
/// uses. A firewall reload or an `iptables -F -X` sweep takes it with everything else, and its
/// absence tells kproxy that its rules may be gone too.
pub const CANARY: &str = "KPROXY-CANARY";
/// Where the canary lives: the small table, cheap to list every sync period.
pub const CANARY_TABLE: &str = "mangle";

/// iptables refuses chain names longer than this.
pub const MAX_CHAIN_LEN: usize = 28;

/// A jump from a built-in chain into one of kproxy's chains. These are the only rules kproxy
/// places outside its own chains; `--cleanup` removes exactly these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jump {
    pub table: &'static str,
    pub from: &'static str,
    pub to: &'static str,
    pub comment: &'static str,
    /// Only new connections need the check (established ones are already NATed or accepted).
    pub new_only: bool,
}

/// kube-proxy's jump layout, with kproxy's chains. Each is inserted first in its built-in chain,
/// in this order, so the last one listed for a chain ends up first (the firewall, as upstream).
pub const JUMPS: &[Jump] = &[
    Jump {
        table: "filter",
        from: "INPUT",
        to: EXTERNAL_SERVICES,
        comment: "kproxy externally-visible service portals",
        new_only: true,
    },
    Jump {
        table: "filter",
        from: "FORWARD",
        to: EXTERNAL_SERVICES,
        comment: "kproxy externally-visible service portals",
        new_only: true,
    },
    Jump {
        table: "filter",
        from: "INPUT",
        to: NODEPORTS,
        comment: "kproxy health check service ports",
        new_only: false,
    },
    Jump {
        table: "filter",
        from: "FORWARD",
        to: SERVICES,
        comment: "kproxy service portals",
        new_only: true,
    },
    Jump {
        table: "filter",
        from: "OUTPUT",
        to: SERVICES,
        comment: "kproxy service portals",
        new_only: true,
    },
    Jump {
        table: "filter",
        from: "FORWARD",
        to: FORWARD,
        comment: "kproxy forwarding rules",
        new_only: false,
    },
    Jump {
        table: "filter",
        from: "INPUT",
        to: FIREWALL,
        comment: "kproxy load balancer firewall",
        new_only: true,
    },
    Jump {
        table: "filter",
        from: "OUTPUT",
        to: FIREWALL,
        comment: "kproxy load balancer firewall",
        new_only: true,
    },
    Jump {
        table: "filter",
        from: "FORWARD",
        to: FIREWALL,
        comment: "kproxy load balancer firewall",
        new_only: true,
    },
    Jump {
        table: "nat",
        from: "OUTPUT",
        to: SERVICES,
        comment: "kproxy service portals",
        new_only: false,
    },
    Jump {
        table: "nat",
        from: "PREROUTING",
        to: SERVICES,
        comment: "kproxy service portals",
        new_only: false,
    },
    Jump {
        table: "nat",
        from: "POSTROUTING",
        to: POSTROUTING,
        comment: "kproxy postrouting rules",
        new_only: false,
    },
];

impl Jump {
    /// The rule spec after `-A FROM` / `-C FROM` / `-D FROM`, as iptables arguments.
    pub fn args(&self) -> Vec<&'static str> {
        let mut args = vec![];
        if self.new_only {
            args.extend(["-m", "conntrack", "--ctstate", "NEW"]);
        }
        args.extend(["-m", "comment", "--comment", self.comment, "-j", self.to]);
        args
    }
}

/// Fixed chains per table, declared on every full sync.
pub const FILTER_CHAINS: &[&str] = &[SERVICES, EXTERNAL_SERVICES, FORWARD, NODEPORTS, FIREWALL];
pub const NAT_CHAINS: &[&str] = &[SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ];

fn port_proto_hash(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    base32_prefix(&digest[..10])
}

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// The value of one [`BASE32`] character.
fn base32_digit(c: u8) -> Option<usize> {
    BASE32.iter().position(|&b| b == c)
}

/// RFC 4648 base32 of exactly 10 bytes: 16 characters, no padding needed.
fn base32_prefix(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(16);
    for chunk in bytes.chunks(5) {
        let mut buf = [0u8; 5];
        buf[..chunk.len()].copy_from_slice(chunk);
        let bits = buf.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        for i in (0..8).rev() {
            out.push(char::from(BASE32[((bits >> (i * 5)) & 31) as usize]));
        }
    }
    out
}

/// The kinds of generated chain, in the order [`pack`] numbers them.
const GENERATED: [&str; 5] = ["SVC", "SVL", "EXT", "FW", "SEP"];

/// A generated chain name (`KPROXY-KIND-` and 16 base32 characters) as 11 bytes: its kind and
/// the 10 bytes of hash the characters spell. `None` for any other name. A large cluster
/// keeps a hundred thousand of these between syncs, and the 28-byte text is what [`unpack`]
/// gives back.
pub fn pack(name: &str) -> Option<[u8; 11]> {
    let rest = name.strip_prefix(PREFIX)?;
    let (kind, hash) = rest.split_once('-')?;
    let kind = GENERATED.iter().position(|k| *k == kind)?;
    if hash.len() != 16 {
        return None;
    }
    let mut out = [0u8; 11];
    out[0] = kind as u8;
    for (i, chunk) in hash.as_bytes().chunks(8).enumerate() {
        let mut bits = 0u64;
        for c in chunk {
            let v = base32_digit(*c)?;
            bits = (bits << 5) | v as u64;
        }
        out[1 + i * 5..6 + i * 5].copy_from_slice(&bits.to_be_bytes()[3..]);
    }
    Some(out)
}

/// The name [`pack`] packed, written into `out`; its length.
pub fn unpack(packed: &[u8; 11], out: &mut [u8; MAX_CHAIN_LEN]) -> usize {
    let kind = GENERATED[usize::from(packed[0]).min(GENERATED.len() - 1)];
    let mut len = 0;
    for b in PREFIX.bytes().chain(kind.bytes()).chain(std::iter::once(b'-')) {
        out[len] = b;
        len += 1;
    }
    for chunk in packed[1..].chunks(5) {
        let bits = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        for i in (0..8).rev() {
            out[len] = BASE32[((bits >> (i * 5)) & 31) as usize];
            len += 1;
        }
    }
    len
}

fn service_hash(name: &ServicePortName) -> String {
    port_proto_hash(&format!("{name}{}", name.protocol))
}

/// A generated chain name: prefix plus hash, always within iptables' limit. The hash's last two
/// characters are not the hash's but chosen by [`xt_bucket_suffix`], for iptables-restore's
/// sake (14 characters, 70 bits, still tell a hundred thousand chains apart).
fn chain(kind: &str, hash: &str) -> String {
    let mut name = format!("KPROXY-{kind}-{}", &hash[..hash.len() - 2]);
    let suffix = xt_bucket_suffix(&name, hash);
    name.push(char::from(suffix[0]));
    name.push(char::from(suffix[1]));
    debug_assert!(name.len() <= MAX_CHAIN_LEN, "{name}");
    name
}

/// How many lists libxtables (iptables 1.8) spreads declared chain names over
/// (`NOTARGET_HSIZE`), by [`xt_hash`].
pub const XT_BUCKETS: usize = 512;

/// libxtables' hash of a chain name (djb2, `djb_hash` in xtables.c): which of its
/// [`XT_BUCKETS`] lists the name goes in is this modulo their number.
pub const fn xt_hash(name: &[u8]) -> u32 {
    let mut hash: u32 = 5381;
    let mut i = 0;
    while i < name.len() {
        hash = hash.wrapping_mul(33).wrapping_add(name[i] as u32);
        i += 1;
    }
    hash
}

/// The targets whose lists no generated name joins: the extensions kproxy's rules jump to
/// (each `-j DNAT` walks the whole list of DNAT's hash before loading the extension) and
/// kproxy's fixed chains (KPROXY-MARK-MASQ is the target of two rules per endpoint).
const XT_AVOIDED: &[&str] = &[
    "DNAT",
    "MASQUERADE",
    "MARK",
    "REJECT",
    SERVICES,
    EXTERNAL_SERVICES,
    NODEPORTS,
    POSTROUTING,
    MARK_MASQ,
    FORWARD,
    FIREWALL,
];

/// The buckets generated names go to, in order, and for each value of `33 * x + y` modulo
/// [`XT_BUCKETS`] a pair of base32 characters `x y` that gives it (477 of the 512 values have
/// one).
struct XtBuckets {
    allowed: [u16; XT_BUCKETS],
    count: usize,
    pair: [[u8; 2]; XT_BUCKETS],
    has_pair: [bool; XT_BUCKETS],
}

const XT: XtBuckets = {
    let mut avoided = [false; XT_BUCKETS];
    let mut i = 0;
    while i < XT_AVOIDED.len() {
        avoided[xt_hash(XT_AVOIDED[i].as_bytes()) as usize % XT_BUCKETS] = true;
        i += 1;
    }
    let mut t = XtBuckets {
        allowed: [0; XT_BUCKETS],
        count: 0,
        pair: [[0; 2]; XT_BUCKETS],
        has_pair: [false; XT_BUCKETS],
    };
    let mut b = 0;
    while b < XT_BUCKETS {
        if !avoided[b] {
            t.allowed[t.count] = b as u16;
            t.count += 1;
        }
        b += 1;
    }
    let mut x = 0;
    while x < 32 {
        let mut y = 0;
        while y < 32 {
            let v = (BASE32[x] as usize * 33 + BASE32[y] as usize) % XT_BUCKETS;
            if !t.has_pair[v] {
                t.has_pair[v] = true;
                t.pair[v] = [BASE32[x], BASE32[y]];
            }
            y += 1;
        }
        x += 1;
    }
    t
};

/// The last two characters of a generated name whose first part is `prefix`
/// (`KPROXY-KIND-` and 14 characters of `hash`): chosen so that libxtables files the name in
/// a list that follows the hash's first two characters, in order, and never in a list of
/// [`XT_AVOIDED`].
///
/// Why: iptables-restore remembers every declared chain in one of 512 linked lists and walks
/// the list of a name for each declaration (to skip a duplicate) and for each rule's jump
/// target. kproxy declares its chains sorted (see `plan::table_head`), so with names whose
/// list follows their sort order the nodes of one list are allocated side by side and each
/// walk reads neighbouring memory, where with hashed lists every step of every walk was a
/// cache miss somewhere in 30 MB: 45 % less CPU for iptables-restore at 10,000 Services
/// (BENCHMARKS.md). The names are still a hash of what they name; another iptables only
/// loses the speed.
fn xt_bucket_suffix(prefix: &str, hash: &str) -> [u8; 2] {
    let digit = |c: u8| base32_digit(c).unwrap_or(0);
    let lead = hash.as_bytes();
    let lead = digit(lead[0]) * 32 + digit(lead[1]);
    let at = lead * XT.count / 1024;
    // hash(prefix + x + y) = hash(prefix) * 33 * 33 + x * 33 + y.
    let base = xt_hash(prefix.as_bytes()).wrapping_mul(33 * 33) as usize % XT_BUCKETS;
    (0..XT.count)
        .map(|k| usize::from(XT.allowed[(at + k) % XT.count]))
        .map(|bucket| (bucket + XT_BUCKETS - base) % XT_BUCKETS)
        .find(|&need| XT.has_pair[need])
        .map_or([b'A', b'A'], |need| XT.pair[need])
}

/// `KPROXY-SVC-…`: Cluster-policy load balancing for one Service port.
pub fn svc_chain(name: &ServicePortName) -> String {
    chain("SVC", &service_hash(name))
}

/// `KPROXY-SVL-…`: Local-policy load balancing.
pub fn svl_chain(name: &ServicePortName) -> String {
    chain("SVL", &service_hash(name))
}

/// `KPROXY-EXT-…`: entry for NodePort, externalIP and load-balancer traffic.
pub fn ext_chain(name: &ServicePortName) -> String {
    chain("EXT", &service_hash(name))
}

/// `KPROXY-FW-…`: loadBalancerSourceRanges filter.
pub fn fw_chain(name: &ServicePortName) -> String {
    chain("FW", &service_hash(name))
}

/// `KPROXY-SEP-…`: DNAT to one endpoint.
pub fn sep_chain(name: &ServicePortName, ep: &Endpoint) -> String {
    chain(
        "SEP",
        &port_proto_hash(&format!("{name}{}{}", name.protocol, ep.addr_string())),
    )
}

/// Quotes a comment for iptables-restore when it needs it.
pub fn quote(s: &str) -> String {
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c)) {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServiceKey};

    #[test]
    fn base32_matches_rfc4648() {
        // RFC 4648 test vector: "fooba" -> "MZXW6YTB"
        assert_eq!(base32_prefix(b"foobafooba"), "MZXW6YTBMZXW6YTB");
    }

    #[test]
    fn chain_names_fit_and_are_stable() {
        let name = ServicePortName {
            service: ServiceKey::new("a-very-long-namespace-name-indeed", "and-a-long-service-name"),
            port: "https-metrics".into(),
            protocol: Protocol::Tcp,
        };
        for chain in [svc_chain(&name), svl_chain(&name), ext_chain(&name), fw_chain(&name)] {
            assert!(chain.len() <= MAX_CHAIN_LEN, "{chain}");
        }
        assert_eq!(svc_chain(&name), svc_chain(&name.clone()));
        let udp = ServicePortName {
            protocol: Protocol::Udp,
            ..name.clone()
        };
        assert_ne!(svc_chain(&name), svc_chain(&udp));
    }

    #[test]
    fn generated_names_pack_and_unpack() {
        let name = ServicePortName {
            service: ServiceKey::new("ns", "svc"),
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        for chain in [svc_chain(&name), svl_chain(&name), ext_chain(&name), fw_chain(&name)] {
            let packed = pack(&chain).expect("a generated name packs");
            let mut out = [0u8; MAX_CHAIN_LEN];
            let len = unpack(&packed, &mut out);
            assert_eq!(std::str::from_utf8(&out[..len]).unwrap(), chain);
        }
        for other in [
            SERVICES,
            MARK_MASQ,
            "KPROXY-SEP-SHORT",
            "KPROXY-SEP-abcdefghijklmnop",
            "KUBE-SVC-AAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(pack(other), None, "{other}");
        }
    }

    #[test]
    fn generated_names_follow_libxtables_lists_in_sort_order() {
        let avoided: Vec<usize> = XT_AVOIDED
            .iter()
            .map(|n| xt_hash(n.as_bytes()) as usize % XT_BUCKETS)
            .collect();
        // As sep_chain names them, for 3,000 endpoints.
        let mut names: Vec<String> = (0..3000)
            .map(|i| {
                chain(
                    "SEP",
                    &port_proto_hash(&format!("ns/svc-{}:httptcp10.1.0.{i}:8080", i / 10)),
                )
            })
            .collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 3000, "distinct endpoints, distinct chains");
        let buckets: Vec<usize> = names
            .iter()
            .map(|n| xt_hash(n.as_bytes()) as usize % XT_BUCKETS)
            .collect();
        for (name, bucket) in names.iter().zip(&buckets) {
            assert!(
                !avoided.contains(bucket),
                "{name} shares the list of a target kproxy jumps to"
            );
            assert!(pack(name).is_some(), "{name} is still a generated name");
        }
        // Sorted names walk the lists in order: a step back only where a list had no pair of
        // characters for a name, which went to the next list (about 7 % of names; hashed
        // names step back half the time).
        let back = buckets.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(back < names.len() / 8, "{back} of {} steps go back", names.len());
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("ns/svc:http"), "ns/svc:http");
        assert_eq!(quote("ns/svc cluster IP"), "\"ns/svc cluster IP\"");
    }
}
