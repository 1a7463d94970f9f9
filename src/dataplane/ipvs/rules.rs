//! The netfilter companion of IPVS mode: one nftables table per family, `kproxy-ipvs`, with a
//! fixed set of chains and rules whose only variable parts are sets.
//!
//! IPVS balances, but cannot decide about sources, refuse, or drop. kube-proxy's IPVS mode adds
//! iptables rules and ipsets for that; kproxy does the same with nftables sets:
//!
//! | set | elements | used for |
//! | --- | --- | --- |
//! | `cluster-ips` | ClusterIP . proto . port | masquerade when the source is not a pod (per `--detect-local-mode`), or always with `--masquerade-all` |
//! | `external` | NodePort/externalIP/LB address . proto . port, `externalTrafficPolicy: Cluster` | always masquerade (the reply must come back through this node) |
//! | `no-endpoints` | any virtual service of a Service without endpoints | reject new connections (refused, not timed out) |
//! | `no-local-endpoints` | a Local-policy virtual service with endpoints only elsewhere | drop new connections |
//! | `service-ips`, `service-ports` | addresses on `kube-ipvs0`; their virtual services | drop new connections to other ports of service addresses |
//! | `hairpin` | endpoint . same endpoint | masquerade a pod reaching itself through its Service |
//! | `firewall`, `firewall-allow` | LoadBalancer IPs with `loadBalancerSourceRanges`; each with its allowed sources | drop new connections from other sources |
//!
//! Chains: `mark-for-masquerade` (from nat prerouting and output, before IPVS) sets the
//! masquerade bit; `postrouting` masquerades marked and hairpin connections after IPVS
//! rewrote the destination (IPVS keeps conntrack with `net.ipv4.vs.conntrack=1`);
//! `filter-input` (priority 0, before IPVS's LOCAL_IN hook) and `filter-output` (priority
//! -150, before IPVS's LOCAL_OUT hook) refuse and drop. Only new connections are refused or
//! dropped, so established ones (e.g. draining real servers) finish.
//!
//! The table is replaced in one `nft -f` transaction, so there is never a moment without it.

use std::fmt::Write;
use std::net::IpAddr;

use ipnet::IpNet;

use super::netlink::VsKey;
use super::plan::{DesiredIpvs, DesiredVs, Traffic};
use crate::dataplane::iptables::render::LocalDetector;
use crate::model::IpFamily;

/// The table's name, the same in the `ip` and `ip6` families.
pub const TABLE: &str = "kproxy-ipvs";

/// What the rules depend on besides the virtual services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesConfig {
    pub family: IpFamily,
    pub masquerade_all: bool,
    /// The fwmark bit that asks for masquerade (`--iptables-masquerade-bit`, 0x4000 by default).
    pub masquerade_mark: u32,
    pub local_detector: LocalDetector,
}

/// The nft family keyword and the address type and selectors of `family`.
fn words(family: IpFamily) -> (&'static str, &'static str, &'static str) {
    match family {
        IpFamily::V4 => ("ip", "ipv4_addr", "ip"),
        IpFamily::V6 => ("ip6", "ipv6_addr", "ip6"),
    }
}

/// The table's sets (see the module's table), in the order they are declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetName {
    ClusterIps,
    External,
    NoEndpoints,
    NoLocalEndpoints,
    ServiceIps,
    ServicePorts,
    Hairpin,
    Firewall,
    FirewallAllow,
}

impl SetName {
    const ALL: [SetName; 9] = [
        SetName::ClusterIps,
        SetName::External,
        SetName::NoEndpoints,
        SetName::NoLocalEndpoints,
        SetName::ServiceIps,
        SetName::ServicePorts,
        SetName::Hairpin,
        SetName::Firewall,
        SetName::FirewallAllow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SetName::ClusterIps => "cluster-ips",
            SetName::External => "external",
            SetName::NoEndpoints => "no-endpoints",
            SetName::NoLocalEndpoints => "no-local-endpoints",
            SetName::ServiceIps => "service-ips",
            SetName::ServicePorts => "service-ports",
            SetName::Hairpin => "hairpin",
            SetName::Firewall => "firewall",
            SetName::FirewallAllow => "firewall-allow",
        }
    }
}

/// One element of one of the sets, as a value: rendered only when written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Element {
    /// `address . protocol . port` of a virtual service.
    Vs(VsKey),
    /// A service address (`service-ips`).
    Ip(IpAddr),
    /// `endpoint . endpoint` (`hairpin`).
    Hairpin(IpAddr),
    /// A virtual service and one allowed source range (`firewall-allow`).
    VsSource(VsKey, IpNet),
}

impl std::fmt::Display for Element {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Element::Vs(k) => write!(f, "{} . {} . {}", k.addr, k.protocol, k.port),
            Element::Ip(ip) => write!(f, "{ip}"),
            Element::Hairpin(ip) => write!(f, "{ip} . {ip}"),
            Element::VsSource(k, net) => write!(f, "{} . {} . {} . {net}", k.addr, k.protocol, k.port),
        }
    }
}

/// The elements one virtual service puts into the sets keyed by virtual service. The shared
/// ones (`service-ips`, `hairpin`) depend on every virtual service of an address or an
/// endpoint, and are counted by the caller.
pub fn vs_elements(key: &VsKey, vs: &DesiredVs, mut out: impl FnMut(SetName, Element)) {
    let elem = Element::Vs(*key);
    match vs.traffic {
        Traffic::Internal => out(SetName::ClusterIps, elem),
        Traffic::External if !vs.local_policy => out(SetName::External, elem),
        Traffic::External => {}
    }
    if vs.servers.is_empty() {
        if vs.has_any_endpoint {
            out(SetName::NoLocalEndpoints, elem);
        } else {
            out(SetName::NoEndpoints, elem);
        }
    }
    if !vs.source_ranges.is_empty() {
        out(SetName::Firewall, elem);
        for net in &vs.source_ranges {
            out(SetName::FirewallAllow, Element::VsSource(*key, *net));
        }
    }
    if vs.bound {
        out(SetName::ServicePorts, elem);
    }
}

/// The declaration of one set, with its elements (`elements` is ", "-separated, may be empty).
fn set(out: &mut String, family: IpFamily, name: SetName, elements: &str) {
    let (_, addr_type, _) = words(family);
    let svc_type = format!("{addr_type} . inet_proto . inet_service");
    let (kind, flags) = match name {
        SetName::ServiceIps => (addr_type.to_string(), None),
        SetName::Hairpin => (format!("{addr_type} . {addr_type}"), None),
        SetName::FirewallAllow => (format!("{svc_type} . {addr_type}"), Some("interval")),
        _ => (svc_type, None),
    };
    let _ = writeln!(out, "\tset {} {{\n\t\ttype {kind}", name.as_str());
    if let Some(f) = flags {
        let _ = writeln!(out, "\t\tflags {f}");
    }
    if !elements.is_empty() {
        let _ = writeln!(out, "\t\telements = {{ {elements} }}");
    }
    let _ = writeln!(out, "\t}}");
}

/// Appends `elem` to a ", "-separated list.
fn push_element(list: &mut String, elem: &Element) {
    if !list.is_empty() {
        list.push_str(", ");
    }
    let _ = write!(list, "{elem}");
}

/// Elements per `add element` statement of a full sync's input: about 30 KiB of text each.
pub const ELEMENTS_PER_STATEMENT: usize = 1000;

/// The sets whose elements go inline into the table's declaration. `firewall-allow` is an
/// interval set, and nft checks added intervals against the elements it has cached, which for
/// a table deleted in the same transaction may be the old ones: it stays declared whole (it
/// holds one element per allowed source range of a LoadBalancer: few).
fn declared_inline(name: SetName) -> bool {
    name == SetName::FirewallAllow
}

/// The elements of one set keyed by virtual service, in key order.
fn vs_set_elements(desired: &DesiredIpvs, name: SetName) -> impl Iterator<Item = Element> + '_ {
    desired.services.iter().flat_map(move |(key, vs)| {
        let mut out = Vec::new();
        vs_elements(key, vs, |set, elem| {
            if set == name {
                out.push(elem);
            }
        });
        out
    })
}

/// `add element` statements for `elements`, [`ELEMENTS_PER_STATEMENT`] to each.
fn add_statements<'a>(
    family: IpFamily,
    name: SetName,
    elements: impl Iterator<Item = Element> + 'a,
) -> impl Iterator<Item = String> + 'a {
    let (fam, _, _) = words(family);
    let mut elements = elements.peekable();
    std::iter::from_fn(move || {
        elements.peek()?;
        let mut list = String::new();
        for elem in elements.by_ref().take(ELEMENTS_PER_STATEMENT) {
            push_element(&mut list, &elem);
        }
        Some(format!("add element {fam} {TABLE} {} {{ {list} }}\n", name.as_str()))
    })
}

/// The whole `nft -f` input, in pieces to be written one after the other and dropped: the
/// table created if missing, deleted, and declared anew with its chains and (empty) sets, then
/// the sets' elements in `add element` statements of [`ELEMENTS_PER_STATEMENT`]. It is one
/// transaction all the same (nft reads its whole input first), so there is never a moment
/// without the table; and kproxy never holds the whole text, which at 10,000 Services with 10
/// endpoints each is several MiB (100,000 `hairpin` elements alone). `hairpin` are the
/// endpoint addresses of every virtual service, each once, in order.
pub fn render_ruleset<'a>(
    desired: &'a DesiredIpvs,
    hairpin: impl Iterator<Item = IpAddr> + Send + 'a,
    cfg: &RulesConfig,
) -> impl Iterator<Item = String> + Send + 'a {
    let family = cfg.family;
    let mut hairpin = Some(hairpin);
    let elements = SetName::ALL
        .into_iter()
        .filter(|name| !declared_inline(*name))
        .flat_map(move |name| -> Box<dyn Iterator<Item = String> + Send + 'a> {
            match name {
                SetName::ServiceIps => Box::new(add_statements(
                    family,
                    name,
                    desired.bound.keys().map(|ip| Element::Ip(*ip)),
                )),
                SetName::Hairpin => match hairpin.take() {
                    Some(ips) => Box::new(add_statements(family, name, ips.map(Element::Hairpin))),
                    None => Box::new(std::iter::empty()),
                },
                _ => Box::new(add_statements(family, name, vs_set_elements(desired, name))),
            }
        });
    std::iter::once(render_table(desired, cfg)).chain(elements)
}

/// The table's declaration: its sets (only the inline ones with elements) and its chains.
fn render_table(desired: &DesiredIpvs, cfg: &RulesConfig) -> String {
    let (fam, _, sel) = words(cfg.family);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "add table {fam} {TABLE}\ndelete table {fam} {TABLE}\ntable {fam} {TABLE} {{"
    );
    for name in SetName::ALL {
        let mut inline = String::new();
        if declared_inline(name) {
            for elem in vs_set_elements(desired, name) {
                push_element(&mut inline, &elem);
            }
        }
        set(&mut out, cfg.family, name, &inline);
    }

    let dst = format!("{sel} daddr . meta l4proto . th dport");
    let mark = format!("meta mark set meta mark | {:#010x}", cfg.masquerade_mark);
    let _ = writeln!(out, "\tchain mark-for-masquerade {{");
    let not_local = match &cfg.local_detector {
        _ if cfg.masquerade_all => Some(String::new()),
        LocalDetector::None => None,
        LocalDetector::Cidr(net) => Some(format!("{sel} saddr != {net} ")),
        LocalDetector::Bridge(b) => Some(format!("iifname != \"{b}\" ")),
        LocalDetector::InterfacePrefix(p) => Some(format!("iifname != \"{p}*\" ")),
    };
    if let Some(cond) = not_local {
        let _ = writeln!(out, "\t\t{cond}{dst} @cluster-ips {mark}");
    }
    let _ = writeln!(out, "\t\t{dst} @external {mark}\n\t}}");
    // dstnat (-100), before IPVS's hooks; nft spells it by name only for prerouting.
    for (hook, name) in [("prerouting", "nat-prerouting"), ("output", "nat-output")] {
        let _ = writeln!(
            out,
            "\tchain {name} {{\n\t\ttype nat hook {hook} priority -100; policy accept;\n\t\tjump mark-for-masquerade\n\t}}"
        );
    }
    let _ = writeln!(
        out,
        "\tchain nat-postrouting {{\n\t\ttype nat hook postrouting priority 100; policy accept;\n\
         \t\t{sel} saddr . {sel} daddr @hairpin masquerade\n\
         \t\tmeta mark & {m:#010x} != 0 meta mark set meta mark ^ {m:#010x} masquerade\n\t}}",
        m = cfg.masquerade_mark
    );
    let refuse =
        format!("\t\tct state new {dst} @no-endpoints reject\n\t\tct state new {dst} @no-local-endpoints drop\n");
    let _ = writeln!(
        out,
        "\tchain filter-input {{\n\t\ttype filter hook input priority 0; policy accept;\n{refuse}\
         \t\tct state new {dst} @firewall {dst} . {sel} saddr != @firewall-allow drop\n\
         \t\tct state new {sel} daddr @service-ips {dst} != @service-ports drop\n\t}}"
    );
    let _ = writeln!(
        out,
        "\tchain filter-output {{\n\t\ttype filter hook output priority -150; policy accept;\n{refuse}\t}}"
    );
    out.push_str("}\n");
    out
}

/// The `nft -f` input of a partial sync: only the elements that come and go, in one
/// transaction. Deletions first, so an element that moves between sets never collides.
pub fn render_element_changes(family: IpFamily, delete: &[(SetName, Element)], add: &[(SetName, Element)]) -> String {
    let (fam, _, _) = words(family);
    let mut out = String::new();
    for (verb, list) in [("delete", delete), ("add", add)] {
        for name in SetName::ALL {
            let mut elements = String::new();
            for (_, elem) in list.iter().filter(|(s, _)| *s == name) {
                push_element(&mut elements, elem);
            }
            if !elements.is_empty() {
                let _ = writeln!(out, "{verb} element {fam} {TABLE} {} {{ {elements} }}", name.as_str());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::ipvs::netlink::{VirtualService, VsKey};
    use crate::dataplane::ipvs::plan::DesiredVs;
    use crate::model::{Protocol, ServiceKey};

    fn vs(addr: &str, port: u16, traffic: Traffic, servers: &[&str], has_any: bool, bound: bool) -> (VsKey, DesiredVs) {
        let key = VsKey {
            addr: addr.parse().unwrap(),
            protocol: Protocol::Tcp,
            port,
        };
        let servers: crate::dataplane::ipvs::plan::Servers =
            servers.iter().map(|s| (s.parse().unwrap(), 8080)).collect();
        (
            key,
            DesiredVs {
                service: VirtualService {
                    key,
                    scheduler: "rr".into(),
                    flags: 0,
                    timeout: 0,
                },
                servers,
                owner: ServiceKey::new("default", "web"),
                traffic,
                local_policy: traffic == Traffic::External && !has_any,
                has_any_endpoint: has_any,
                bound,
                source_ranges: vec![],
            },
        )
    }

    fn cfg() -> RulesConfig {
        RulesConfig {
            family: IpFamily::V4,
            masquerade_all: false,
            masquerade_mark: 0x4000,
            local_detector: LocalDetector::Cidr("10.244.0.0/16".parse().unwrap()),
        }
    }

    fn desired() -> DesiredIpvs {
        let mut d = DesiredIpvs::default();
        for (k, v) in [
            vs(
                "10.96.0.10",
                80,
                Traffic::Internal,
                &["10.244.1.2", "10.244.2.2"],
                true,
                true,
            ),
            vs("192.0.2.1", 30080, Traffic::External, &["10.244.1.2"], true, false),
            vs("10.96.0.12", 80, Traffic::Internal, &[], false, true),
        ] {
            if v.bound {
                *d.bound.entry(k.addr).or_default() += 1;
            }
            d.services.insert(k, v);
        }
        d
    }

    /// The whole input, as nft reads it; the hairpin addresses from the real servers.
    fn render(d: &DesiredIpvs, c: &RulesConfig) -> String {
        let hairpin: std::collections::BTreeSet<IpAddr> = d.services.values().flat_map(|vs| vs.servers.ips()).collect();
        render_ruleset(d, hairpin.into_iter(), c).collect()
    }

    /// The elements of set `name` as nft gets them (declared inline or added after the
    /// table), as one "{ a, b }" list, or "" when it has none.
    fn elements(text: &str, name: &str) -> String {
        let start = text.find(&format!("set {name} {{")).unwrap();
        let block = &text[start..start + text[start..].find("\t}").unwrap()];
        let added = format!("add element ip kproxy-ipvs {name} {{ ");
        let list: Vec<&str> = block
            .lines()
            .filter_map(|l| l.trim().strip_prefix("elements = { "))
            .chain(text.lines().filter_map(|l| l.strip_prefix(added.as_str())))
            .map(|l| l.strip_suffix(" }").unwrap())
            .collect();
        if list.is_empty() {
            String::new()
        } else {
            format!("{{ {} }}", list.join(", "))
        }
    }

    #[test]
    fn sets_say_what_happens_to_each_virtual_service() {
        let text = render(&desired(), &cfg());
        assert!(text.starts_with("add table ip kproxy-ipvs\ndelete table ip kproxy-ipvs\ntable ip kproxy-ipvs {"));
        assert_eq!(
            elements(&text, "cluster-ips"),
            "{ 10.96.0.10 . tcp . 80, 10.96.0.12 . tcp . 80 }"
        );
        assert_eq!(elements(&text, "external"), "{ 192.0.2.1 . tcp . 30080 }");
        assert_eq!(elements(&text, "no-endpoints"), "{ 10.96.0.12 . tcp . 80 }");
        assert_eq!(elements(&text, "no-local-endpoints"), "");
        assert_eq!(elements(&text, "service-ips"), "{ 10.96.0.10, 10.96.0.12 }");
        assert_eq!(
            elements(&text, "hairpin"),
            "{ 10.244.1.2 . 10.244.1.2, 10.244.2.2 . 10.244.2.2 }"
        );
        assert!(text.contains(
            "ip saddr != 10.244.0.0/16 ip daddr . meta l4proto . th dport @cluster-ips meta mark set meta mark | 0x00004000"
        ));
        assert!(text.contains("ct state new ip daddr . meta l4proto . th dport @no-endpoints reject"));
    }

    #[test]
    fn local_policy_without_local_endpoints_drops_and_is_not_masqueraded() {
        let mut d = DesiredIpvs::default();
        let (k, v) = vs("192.0.2.1", 30081, Traffic::External, &[], false, false);
        let v = DesiredVs {
            has_any_endpoint: true,
            local_policy: true,
            ..v
        };
        d.services.insert(k, v);
        let text = render(&d, &cfg());
        assert_eq!(elements(&text, "no-local-endpoints"), "{ 192.0.2.1 . tcp . 30081 }");
        assert_eq!(elements(&text, "external"), "", "source IP is preserved");
    }

    #[test]
    fn load_balancer_source_ranges_drop_other_sources() {
        let mut d = DesiredIpvs::default();
        let (k, mut v) = vs("198.51.100.5", 80, Traffic::External, &["10.244.1.2"], true, true);
        v.local_policy = false;
        v.source_ranges = vec!["192.0.2.0/24".parse().unwrap(), "203.0.113.7/32".parse().unwrap()];
        d.bound.insert(k.addr, 1);
        d.services.insert(k, v);
        let text = render(&d, &cfg());
        assert_eq!(elements(&text, "firewall"), "{ 198.51.100.5 . tcp . 80 }");
        assert_eq!(
            elements(&text, "firewall-allow"),
            "{ 198.51.100.5 . tcp . 80 . 192.0.2.0/24, 198.51.100.5 . tcp . 80 . 203.0.113.7/32 }"
        );
        assert!(text.contains(
            "ct state new ip daddr . meta l4proto . th dport @firewall ip daddr . meta l4proto . th dport . ip saddr != @firewall-allow drop"
        ));
    }

    #[test]
    fn detectors_and_ipv6() {
        let mut c = cfg();
        c.local_detector = LocalDetector::None;
        let text = render(&desired(), &c);
        assert!(
            !text.contains("@cluster-ips meta mark"),
            "no detector: ClusterIP traffic is not masqueraded"
        );
        c.masquerade_all = true;
        assert!(render(&desired(), &c).contains("\t\tip daddr . meta l4proto . th dport @cluster-ips meta mark"));
        c.masquerade_all = false;
        c.local_detector = LocalDetector::InterfacePrefix("veth".into());
        assert!(render(&desired(), &c).contains("iifname != \"veth*\" ip daddr"));
        c.family = IpFamily::V6;
        let text = render(&DesiredIpvs::default(), &c);
        assert!(
            text.contains("table ip6 kproxy-ipvs {") && text.contains("type ipv6_addr . inet_proto . inet_service")
        );
        assert!(!text.contains("elements"), "empty sets have no elements line");
    }

    #[test]
    fn large_sets_are_added_in_statements_of_bounded_size_after_the_table() {
        let mut d = DesiredIpvs::default();
        let n = 2 * ELEMENTS_PER_STATEMENT + 7;
        for i in 0..n {
            let addr = format!("10.96.{}.{}", i / 256, i % 256);
            let ep = format!("10.244.{}.{}", i / 256, i % 256);
            let (k, mut v) = vs(&addr, 80, Traffic::Internal, &[&ep], true, true);
            if i == 3 {
                v.source_ranges = vec!["192.0.2.0/24".parse().unwrap()];
            }
            *d.bound.entry(k.addr).or_default() += 1;
            d.services.insert(k, v);
        }
        let hairpin: Vec<IpAddr> = d.services.values().flat_map(|v| v.servers.ips()).collect();
        let pieces: Vec<String> = render_ruleset(&d, hairpin.into_iter(), &cfg()).collect();
        let table = &pieces[0];
        assert!(table.starts_with("add table ip kproxy-ipvs\ndelete table ip kproxy-ipvs\ntable ip kproxy-ipvs {"));
        assert!(
            !table.contains("add element"),
            "the table comes whole, before any element"
        );
        assert!(
            table.contains("elements = { 10.96.0.3 . tcp . 80 . 192.0.2.0/24 }"),
            "the interval set is declared with its elements"
        );
        for piece in &pieces[1..] {
            assert_eq!(piece.lines().count(), 1, "one statement per piece");
            assert!(piece.starts_with("add element ip kproxy-ipvs "), "{piece}");
            assert!(piece.matches(", ").count() < ELEMENTS_PER_STATEMENT, "{piece}");
        }
        let text: String = pieces.concat();
        for name in ["cluster-ips", "service-ports", "service-ips", "hairpin"] {
            let list = elements(&text, name);
            assert_eq!(list.matches(", ").count() + 1, n, "{name}: every element once");
            let statements = text.lines().filter(|l| l.contains(&format!(" {name} {{ "))).count();
            assert_eq!(statements, 3, "{name}: in three statements");
        }
        assert!(elements(&text, "hairpin").starts_with("{ 10.244.0.0 . 10.244.0.0, 10.244.0.1 . 10.244.0.1, "));
        assert_eq!(elements(&text, "no-endpoints"), "");
    }

    #[test]
    fn element_changes_name_each_set_once_per_verb_deletions_first() {
        let k = VsKey {
            addr: "198.51.100.5".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        };
        let net: IpNet = "192.0.2.0/24".parse().unwrap();
        let text = render_element_changes(
            IpFamily::V4,
            &[(SetName::NoEndpoints, Element::Vs(k))],
            &[
                (SetName::FirewallAllow, Element::VsSource(k, net)),
                (SetName::Firewall, Element::Vs(k)),
                (SetName::Hairpin, Element::Hairpin("10.244.1.2".parse().unwrap())),
                (SetName::Hairpin, Element::Hairpin("10.244.1.3".parse().unwrap())),
            ],
        );
        assert_eq!(
            text,
            "delete element ip kproxy-ipvs no-endpoints { 198.51.100.5 . tcp . 80 }\n\
             add element ip kproxy-ipvs hairpin { 10.244.1.2 . 10.244.1.2, 10.244.1.3 . 10.244.1.3 }\n\
             add element ip kproxy-ipvs firewall { 198.51.100.5 . tcp . 80 }\n\
             add element ip kproxy-ipvs firewall-allow { 198.51.100.5 . tcp . 80 . 192.0.2.0/24 }\n"
        );
        assert!(render_element_changes(IpFamily::V6, &[], &[]).is_empty());
    }
}
