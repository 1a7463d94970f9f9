//! Packet tracer for rendered iptables rules, for tests: where does a new connection land?
//!
//! It replays one NEW connection through the `nat` and `filter` tables the way netfilter
//! would, so tests assert behaviour ("reaches these endpoints, masqueraded") rather than rule
//! text. Upstream kube-proxy's packet-flow tests do the same, but here random
//! (`-m statistic`) and session-affinity (`-m recent --rcheck`) matches are explored both
//! ways, so the answer is the set of every possible outcome.
//!
//! The input is what kproxy feeds to `iptables-restore --noflush`, and the kernel's
//! `--noflush` rules are kept: declaring a user chain flushes it, `-X` only deletes empty,
//! unreferenced chains, and a jump must name a declared chain. Anything the tracer does not
//! model is an error naming the line, because a silently ignored option would let a test pass
//! for the wrong reason.
//!
//! ```text
//! let mut rules = Ruleset::parse(&rendered)?;
//! rules.append(Table::Nat, "PREROUTING", &["-j", "KPROXY-SERVICES"])?;
//! let result = rules.tracer([node_ip]).trace(&Packet::tcp(Origin::Remote, "10.0.0.5", "172.30.0.41:80"))?;
//! assert_eq!(result.to_string(), "10.244.1.2:8080, 10.244.2.3:8080", "{}", result.explain());
//! assert_eq!(result.masquerade(), Some(false));
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// The kernel's limit on chain names (`XT_EXTENSION_MAXNAMELEN` without the NUL).
const MAX_CHAIN_NAME: usize = 28;
/// The kernel's limit on `-m comment` text (`XT_MAX_COMMENT_LEN` without the NUL).
const MAX_COMMENT: usize = 255;
/// iptables refuses DROP (as a target or a policy) in the nat table.
const NAT_DROP: &str = "the nat table is not for filtering; iptables refuses DROP there";
/// Real targets the tracer does not model; jumping to one is "unsupported", not "no such chain".
const UNMODELLED_TARGETS: &[&str] = &[
    "LOG", "NFLOG", "CT", "NOTRACK", "TRACE", "REDIRECT", "NETMAP", "CONNMARK", "TPROXY", "SET", "NFQUEUE", "TCPMSS",
    "CHECKSUM",
];

// ---------------------------------------------------------------------------------------------
// Errors

/// What kind of problem an [`Error`] reports; says who has to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Not valid `iptables-restore` input (bad token, unterminated quote, missing `COMMIT`).
    /// The renderer must change.
    Syntax,
    /// Valid iptables that the tracer does not model (a match, option or target). Extend the
    /// tracer, or the test cannot say anything about this rule.
    Unsupported,
    /// Input the kernel would refuse: undeclared chain, chain loop, DNAT reachable from
    /// POSTROUTING, over-long name. The renderer must change.
    Rejected,
    /// The packet does not fit the ruleset (IPv6 packet through IPv4 rules, mixed families).
    /// The test must change.
    Packet,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Syntax => "syntax error",
            ErrorKind::Unsupported => "not supported by the tracer",
            ErrorKind::Rejected => "the kernel would reject this",
            ErrorKind::Packet => "cannot trace this packet",
        })
    }
}

/// A restore input, rule or packet the tracer cannot use, with the line it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    /// 1-based line in the input given to [`Ruleset::restore`]; `None` for rules given to
    /// [`Ruleset::append`] or [`Ruleset::insert`], and for packet errors.
    pub line: Option<usize>,
    /// The offending line, rule or packet as written.
    pub text: String,
    pub reason: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        write!(f, "{}: {} (in `{}`)", self.kind, self.reason, self.text)
    }
}

impl std::error::Error for Error {}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error before the line it belongs to is known.
#[derive(Debug)]
struct Fail {
    kind: ErrorKind,
    reason: String,
}

impl Fail {
    fn at(self, line: Option<usize>, text: &str) -> Error {
        Error {
            kind: self.kind,
            line,
            text: text.to_string(),
            reason: self.reason,
        }
    }
}

fn syntax(reason: impl Into<String>) -> Fail {
    Fail {
        kind: ErrorKind::Syntax,
        reason: reason.into(),
    }
}

fn unsupported(reason: impl Into<String>) -> Fail {
    Fail {
        kind: ErrorKind::Unsupported,
        reason: reason.into(),
    }
}

fn rejected(reason: impl Into<String>) -> Fail {
    Fail {
        kind: ErrorKind::Rejected,
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Packets and outcomes

/// An iptables table the tracer models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Nat,
    Filter,
}

impl Table {
    /// The builtin chains of this table, which are where traversal starts.
    fn hooks(self) -> &'static [Hook] {
        match self {
            Table::Nat => &[Hook::Prerouting, Hook::Input, Hook::Output, Hook::Postrouting],
            Table::Filter => &[Hook::Input, Hook::Forward, Hook::Output],
        }
    }

    fn is_builtin(self, chain: &str) -> bool {
        self.hooks().iter().any(|hook| hook.chain() == chain)
    }
}

/// Parses "nat" or "filter", as in `-t` and `*table`.
impl std::str::FromStr for Table {
    type Err = String;

    fn from_str(name: &str) -> Result<Table, String> {
        match name {
            "nat" => Ok(Table::Nat),
            "filter" => Ok(Table::Filter),
            other => Err(format!("table {other:?}: only nat and filter are modelled")),
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Table::Nat => "nat",
            Table::Filter => "filter",
        })
    }
}

/// A netfilter hook, named by its builtin chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl Hook {
    pub fn chain(self) -> &'static str {
        match self {
            Hook::Prerouting => "PREROUTING",
            Hook::Input => "INPUT",
            Hook::Forward => "FORWARD",
            Hook::Output => "OUTPUT",
            Hook::Postrouting => "POSTROUTING",
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.chain())
    }
}

/// A transport protocol, spelled as in `-p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    fn from_name(name: &str) -> Option<Protocol> {
        match name {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "sctp" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        })
    }
}

/// Where a packet enters netfilter, which decides the hooks it traverses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Generated on the node: nat OUTPUT, filter OUTPUT, nat POSTROUTING, and then filter
    /// INPUT if the (possibly DNATed) destination is a local address.
    Local,
    /// Arriving at the node (from the network or a pod): nat PREROUTING; then, if the
    /// destination is now a local address, filter INPUT and nat INPUT, otherwise filter
    /// FORWARD and nat POSTROUTING.
    Remote,
}

/// The first packet of a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Protocol,
    pub dport: u16,
    pub from: Origin,
    /// Interface it arrived on; when `None`, rules naming an input interface never match.
    pub in_iface: Option<String>,
    /// Interface it leaves through; when `None`, rules naming an output interface never match.
    pub out_iface: Option<String>,
    /// Firewall mark before these tables run.
    pub mark: u32,
}

impl Packet {
    pub fn new(from: Origin, proto: Protocol, src: IpAddr, dst: SocketAddr) -> Packet {
        Packet {
            src,
            dst: dst.ip(),
            proto,
            dport: dst.port(),
            from,
            in_iface: None,
            out_iface: None,
            mark: 0,
        }
    }

    /// A TCP packet from `src` ("10.0.0.1") to `dst` ("172.30.0.41:80" or "[fd00::1]:80").
    ///
    /// # Panics
    /// If either address does not parse: this is a test shorthand.
    pub fn tcp(from: Origin, src: &str, dst: &str) -> Packet {
        Packet::parse(from, Protocol::Tcp, src, dst)
    }

    /// A UDP packet; see [`Packet::tcp`].
    pub fn udp(from: Origin, src: &str, dst: &str) -> Packet {
        Packet::parse(from, Protocol::Udp, src, dst)
    }

    /// An SCTP packet; see [`Packet::tcp`].
    pub fn sctp(from: Origin, src: &str, dst: &str) -> Packet {
        Packet::parse(from, Protocol::Sctp, src, dst)
    }

    fn parse(from: Origin, proto: Protocol, src: &str, dst: &str) -> Packet {
        let src = src
            .parse()
            .unwrap_or_else(|_| panic!("packet source {src:?} is not an IP"));
        let dst = dst
            .parse()
            .unwrap_or_else(|_| panic!("packet destination {dst:?} is not ip:port"));
        Packet::new(from, proto, src, dst)
    }

    pub fn with_in_iface(mut self, name: &str) -> Packet {
        self.in_iface = Some(name.to_string());
        self
    }

    pub fn with_out_iface(mut self, name: &str) -> Packet {
        self.out_iface = Some(name.to_string());
        self
    }

    pub fn with_mark(mut self, mark: u32) -> Packet {
        self.mark = mark;
        self
    }
}

impl fmt::Display for Packet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let from = match self.from {
            Origin::Local => "local",
            Origin::Remote => "remote",
        };
        let dst = SocketAddr::new(self.dst, self.dport);
        write!(f, "{from} {} {} -> {dst}", self.proto, self.src)
    }
}

/// Where one possible path of the packet ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Destination {
    /// Accepted everywhere after a DNAT to this address.
    Dnat(SocketAddr),
    /// Accepted everywhere with the destination it was sent to.
    Accept,
    /// Stopped by `-j REJECT`.
    Reject,
    /// Stopped by `-j DROP` or a DROP policy.
    Drop,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Dnat(addr) => write!(f, "{addr}"),
            Destination::Accept => f.write_str("ACCEPT"),
            Destination::Reject => f.write_str("REJECT"),
            Destination::Drop => f.write_str("DROP"),
        }
    }
}

/// One possible fate of the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Outcome {
    pub destination: Destination,
    /// Source NATed by MASQUERADE or SNAT; always false for REJECT and DROP.
    pub masquerade: bool,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.destination)?;
        if self.masquerade {
            f.write_str(" (masqueraded)")?;
        }
        Ok(())
    }
}

/// Why a rule appears in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Branch {
    /// Every match held.
    Matched,
    /// A random or `--rcheck` match was taken as matching on this path.
    AssumedMatch,
    /// A random or `--rcheck` match was taken as not matching on this path.
    AssumedNoMatch,
}

/// A rule the packet met on its way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceStep {
    pub table: Table,
    pub hook: Hook,
    /// Line in the restore input the rule came from; `None` for [`Ruleset::append`] and
    /// [`Ruleset::insert`] rules.
    pub line: Option<usize>,
    pub rule: String,
    pub branch: Branch,
}

impl fmt::Display for TraceStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.table, self.hook)?;
        if let Some(line) = self.line {
            write!(f, " line {line}")?;
        }
        write!(f, ": {}", self.rule)?;
        match self.branch {
            Branch::Matched => Ok(()),
            Branch::AssumedMatch => f.write_str("  [assumed to match]"),
            Branch::AssumedNoMatch => f.write_str("  [assumed not to match]"),
        }
    }
}

/// One explored path: its outcome and the rules met on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracePath {
    pub outcome: Outcome,
    pub steps: Vec<TraceStep>,
}

/// Everything that can happen to a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceResult {
    pub outcomes: BTreeSet<Outcome>,
    /// Every explored path, in exploration order: the first takes every random and
    /// `--rcheck` match as matching.
    pub paths: Vec<TracePath>,
}

impl TraceResult {
    /// The DNAT destinations, as "ip:port" ("[ip]:port" for IPv6).
    pub fn endpoints(&self) -> BTreeSet<String> {
        self.outcomes
            .iter()
            .filter_map(|outcome| match outcome.destination {
                Destination::Dnat(addr) => Some(addr.to_string()),
                _ => None,
            })
            .collect()
    }

    /// Whether every outcome is masqueraded (`Some(true)`), none is (`Some(false)`), or it
    /// depends on the path (`None`, e.g. hairpin traffic that picks its own endpoint).
    pub fn masquerade(&self) -> Option<bool> {
        let mut seen = self.outcomes.iter().map(|outcome| outcome.masquerade);
        let first = seen.next()?;
        seen.all(|masquerade| masquerade == first).then_some(first)
    }

    /// The rules met on the first path.
    pub fn first_trace(&self) -> &[TraceStep] {
        self.paths.first().map_or(&[], |path| &path.steps)
    }

    /// Every path with its rules, for assertion messages.
    pub fn explain(&self) -> String {
        use fmt::Write as _;
        let mut text = String::new();
        for (index, path) in self.paths.iter().enumerate() {
            // Writing to a String cannot fail.
            let _ = writeln!(text, "path {}: {}", index + 1, path.outcome);
            for step in &path.steps {
                let _ = writeln!(text, "    {step}");
            }
        }
        text
    }
}

/// The destinations, comma-separated as upstream's packet-flow tests print them
/// ("10.180.0.1:80, 10.180.0.2:80", "REJECT"); masquerading is asked separately.
impl fmt::Display for TraceResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let destinations: BTreeSet<Destination> = self.outcomes.iter().map(|outcome| outcome.destination).collect();
        for (index, destination) in destinations.iter().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{destination}")?;
        }
        Ok(())
    }
}

/// What the `-m recent` lists hold before the packet arrives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RecentHistory {
    /// Unknown: every `--rcheck` is explored both matching and not.
    #[default]
    Unknown,
    /// Exactly these (list name, address) entries exist and are fresh; any other `--rcheck`
    /// misses. Addresses are compared under the rule's `--mask`.
    Known(BTreeSet<(String, IpAddr)>),
}

// ---------------------------------------------------------------------------------------------
// Parsed rules

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

fn family_of(addr: IpAddr) -> Family {
    match addr {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Accept,
    Drop,
}

#[derive(Debug, Clone, Default)]
struct Chain {
    /// `Some` for builtin chains, which apply it when the packet falls off their end.
    policy: Option<Policy>,
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    line: Option<usize>,
    text: String,
    /// `-s -d -p -i -o`: the kernel checks these before any `-m` match.
    header: Vec<Header>,
    /// `-m` matches in rule order; comments and bare protocol loads are left out.
    matches: Vec<Match>,
    target: Target,
}

#[derive(Debug, Clone)]
enum Header {
    Src { net: IpNet, negated: bool },
    Dst { net: IpNet, negated: bool },
    Proto { proto: Protocol, negated: bool },
    InIface { name: String, negated: bool },
    OutIface { name: String, negated: bool },
}

#[derive(Debug, Clone)]
enum Match {
    Dport {
        proto: Protocol,
        port: u16,
        negated: bool,
    },
    /// `-m addrtype` with type LOCAL; `None` means that side is not checked.
    AddrTypeLocal {
        src: Option<bool>,
        dst: Option<bool>,
    },
    CtState {
        states: u8,
        negated: bool,
    },
    Mark {
        value: u32,
        mask: u32,
        negated: bool,
    },
    Statistic {
        probability: f64,
        negated: bool,
    },
    Recent(Recent),
}

#[derive(Debug, Clone)]
struct Recent {
    name: String,
    /// `--rcheck` (with its negation) when `Some`, `--set` when `None`.
    check: Option<bool>,
    mask: Option<IpAddr>,
    /// `--rdest`: key the list on the destination instead of the source.
    dest: bool,
}

#[derive(Debug, Clone)]
enum Target {
    /// No `-j`: the rule only counts packets.
    None,
    Accept,
    Drop,
    Reject,
    Return,
    Dnat {
        ip: IpAddr,
        port: Option<u16>,
    },
    /// SNAT or MASQUERADE: both rewrite the source, which is all the tracer reports.
    Snat {
        masquerade: bool,
    },
    /// Every MARK form as `--set-xmark value/mask`: mark = (mark & !mask) ^ value.
    Mark {
        value: u32,
        mask: u32,
    },
    Jump(String),
    Goto(String),
}

const CT_NEW: u8 = 1;
const CT_ESTABLISHED: u8 = 1 << 1;
const CT_RELATED: u8 = 1 << 2;
const CT_INVALID: u8 = 1 << 3;
const CT_UNTRACKED: u8 = 1 << 4;
const CT_SNAT: u8 = 1 << 5;
const CT_DNAT: u8 = 1 << 6;

fn parse_ctstates(list: &str) -> Result<u8, Fail> {
    let mut states = 0;
    for state in list.split(',') {
        states |= match state {
            "NEW" => CT_NEW,
            "ESTABLISHED" => CT_ESTABLISHED,
            "RELATED" => CT_RELATED,
            "INVALID" => CT_INVALID,
            "UNTRACKED" => CT_UNTRACKED,
            "SNAT" => CT_SNAT,
            "DNAT" => CT_DNAT,
            other => return Err(syntax(format!("unknown conntrack state {other:?}"))),
        };
    }
    Ok(states)
}

// ---------------------------------------------------------------------------------------------
// The ruleset and iptables-restore

/// The `nat` and `filter` tables as the kernel would hold them after the restores so far.
#[derive(Debug, Clone)]
pub struct Ruleset {
    tables: BTreeMap<Table, BTreeMap<String, Chain>>,
    /// Set by the first address seen; iptables and ip6tables rules never mix.
    family: Option<Family>,
}

impl Default for Ruleset {
    fn default() -> Ruleset {
        Ruleset::new()
    }
}

impl Ruleset {
    /// Empty tables with their builtin chains, policy ACCEPT, as on a fresh node.
    pub fn new() -> Ruleset {
        let tables = [Table::Nat, Table::Filter]
            .into_iter()
            .map(|table| {
                let chains = table
                    .hooks()
                    .iter()
                    .map(|hook| {
                        let chain = Chain {
                            policy: Some(Policy::Accept),
                            rules: Vec::new(),
                        };
                        (hook.chain().to_string(), chain)
                    })
                    .collect();
                (table, chains)
            })
            .collect();
        Ruleset { tables, family: None }
    }

    /// A fresh ruleset after one `iptables-restore --noflush` of `input`.
    pub fn parse(input: &str) -> Result<Ruleset> {
        let mut ruleset = Ruleset::new();
        ruleset.restore(input)?;
        Ok(ruleset)
    }

    /// Applies `input` as `iptables-restore --noflush` would. On error nothing is applied.
    pub fn restore(&mut self, input: &str) -> Result<()> {
        let mut next = self.clone();
        // The table being edited: its name, the line of its `*` header, and its chains as
        // they will be at COMMIT (the kernel swaps a table in atomically).
        let mut open: Option<(Table, usize, BTreeMap<String, Chain>)> = None;
        for (index, raw) in input.lines().enumerate() {
            let number = index + 1;
            let line = raw.trim();
            let at = |fail: Fail| fail.at(Some(number), line);
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                if let Some((table, _, _)) = &open {
                    return Err(at(syntax(format!("*{table} has no COMMIT before this table"))));
                }
                let table: Table = name.parse().map_err(|reason: String| at(unsupported(reason)))?;
                open = Some((table, number, next.tables[&table].clone()));
            } else if line == "COMMIT" {
                let (table, _, chains) = open
                    .take()
                    .ok_or_else(|| at(syntax("COMMIT outside a *table section")))?;
                validate_hooks(table, &chains)?;
                next.tables.insert(table, chains);
            } else {
                let Some((table, _, chains)) = open.as_mut() else {
                    return Err(at(syntax("rule outside a *table section")));
                };
                if let Some(declaration) = line.strip_prefix(':') {
                    declare_chain(*table, chains, declaration).map_err(at)?;
                } else {
                    let tokens = tokenize(line).map_err(at)?;
                    next.restore_command(*table, chains, Some(number), line, &tokens)?;
                }
            }
        }
        if let Some((table, header, _)) = open {
            return Err(syntax(format!("*{table} is never committed")).at(Some(header), &format!("*{table}")));
        }
        *self = next;
        Ok(())
    }

    /// Adds one rule as `iptables -t <table> -A <chain> <args...>` would. Args are already
    /// split, as for a command: no quoting.
    pub fn append(&mut self, table: Table, chain: &str, args: &[&str]) -> Result<()> {
        self.command(table, &["-A", chain], args)
    }

    /// Adds one rule as `iptables -t <table> -I <chain> <position> <args...>` would (how
    /// kproxy installs its jumps from the builtin chains); positions start at 1.
    pub fn insert(&mut self, table: Table, chain: &str, position: usize, args: &[&str]) -> Result<()> {
        self.command(table, &["-I", chain, &position.to_string()], args)
    }

    fn command(&mut self, table: Table, command: &[&str], args: &[&str]) -> Result<()> {
        let tokens: Vec<String> = command.iter().chain(args).map(|arg| arg.to_string()).collect();
        let text = tokens.iter().map(|arg| quote(arg)).collect::<Vec<_>>().join(" ");
        let mut next = self.clone();
        let mut chains = next.tables[&table].clone();
        next.restore_command(table, &mut chains, None, &text, &tokens)?;
        validate_hooks(table, &chains)?;
        next.tables.insert(table, chains);
        *self = next;
        Ok(())
    }

    /// A tracer for a node whose own addresses are `local_addrs` (what `-m addrtype
    /// --dst-type LOCAL` matches, besides loopback addresses).
    pub fn tracer<I: IntoIterator<Item = IpAddr>>(&self, local_addrs: I) -> Tracer<'_> {
        Tracer {
            ruleset: self,
            local_addrs: local_addrs.into_iter().collect(),
            recent: RecentHistory::Unknown,
        }
    }

    /// One `-A`, `-I` or `-X` line of a restore input, or an [`Ruleset::append`] or
    /// [`Ruleset::insert`].
    fn restore_command(
        &mut self,
        table: Table,
        chains: &mut BTreeMap<String, Chain>,
        line: Option<usize>,
        text: &str,
        tokens: &[String],
    ) -> Result<()> {
        let at = |fail: Fail| fail.at(line, text);
        let command = tokens.first().map(String::as_str).unwrap_or_default();
        let chain = tokens
            .get(1)
            .ok_or_else(|| at(syntax(format!("{command} needs a chain"))))?;
        match command {
            "-A" | "--append" | "-I" | "--insert" => {
                let Some(existing) = chains.get(chain) else {
                    return Err(at(rejected(format!("chain {chain} is not declared in {table}"))));
                };
                let mut args = &tokens[2..];
                let mut position = 0;
                if matches!(command, "-I" | "--insert") {
                    if let Some(number) = args.first().and_then(|arg| arg.parse::<usize>().ok()) {
                        if number == 0 || number > existing.rules.len() + 1 {
                            return Err(at(rejected(format!("no position {number} in {chain}"))));
                        }
                        position = number - 1;
                        args = &args[1..];
                    }
                }
                let rule = parse_rule(table, chains, args, &mut self.family).map_err(at).map(
                    |(header, matches, target)| Rule {
                        line,
                        text: text.to_string(),
                        header,
                        matches,
                        target,
                    },
                )?;
                let rules = &mut chains.get_mut(chain).expect("checked above").rules;
                if matches!(command, "-A" | "--append") {
                    rules.push(rule);
                } else {
                    rules.insert(position, rule);
                }
                Ok(())
            }
            "-X" | "--delete-chain" => {
                if tokens.len() > 2 {
                    return Err(at(syntax("-X takes one chain")));
                }
                delete_chain(table, chains, chain).map_err(at)
            }
            other => Err(at(unsupported(format!("command {other:?} (only -A, -I and -X)")))),
        }
    }

    fn chain(&self, table: Table, name: &str) -> Option<&Chain> {
        self.tables.get(&table)?.get(name)
    }
}

/// `:NAME POLICY [packets:bytes]`: creates a chain, or flushes an existing user chain.
fn declare_chain(table: Table, chains: &mut BTreeMap<String, Chain>, declaration: &str) -> Result<(), Fail> {
    let mut fields = declaration.split_whitespace();
    let name = fields
        .next()
        .ok_or_else(|| syntax("chain declaration without a name"))?;
    let policy = fields
        .next()
        .ok_or_else(|| syntax(format!("chain {name} has no policy")))?;
    if let Some(counters) = fields.next() {
        let valid = counters.starts_with('[') && counters.ends_with(']') && counters.contains(':');
        if !valid || fields.next().is_some() {
            return Err(syntax(format!("unexpected text after the policy of {name}")));
        }
    }
    if table.is_builtin(name) {
        let policy = match policy {
            "ACCEPT" => Policy::Accept,
            "DROP" if table == Table::Nat => return Err(rejected(NAT_DROP)),
            "DROP" => Policy::Drop,
            other => {
                return Err(syntax(format!(
                    "builtin chain {name} needs ACCEPT or DROP, not {other:?}"
                )))
            }
        };
        // Declaring a builtin chain sets its policy and keeps its rules.
        chains.get_mut(name).expect("builtin chains always exist").policy = Some(policy);
        return Ok(());
    }
    if policy != "-" {
        return Err(syntax(format!("user chain {name} must have policy -, not {policy:?}")));
    }
    if name.starts_with('-') || name.starts_with('!') {
        return Err(syntax(format!("{name:?} is not a chain name")));
    }
    if name.len() > MAX_CHAIN_NAME {
        return Err(rejected(format!(
            "chain name {name} is {} bytes; the kernel allows {MAX_CHAIN_NAME}",
            name.len()
        )));
    }
    chains.entry(name.to_string()).or_default().rules.clear();
    Ok(())
}

/// `-X NAME`: the kernel only deletes user chains that are empty and unreferenced.
fn delete_chain(table: Table, chains: &mut BTreeMap<String, Chain>, name: &str) -> Result<(), Fail> {
    if table.is_builtin(name) {
        return Err(rejected(format!("{name} is a builtin chain")));
    }
    let chain = chains
        .get(name)
        .ok_or_else(|| rejected(format!("no chain {name} in {table}")))?;
    if !chain.rules.is_empty() {
        return Err(rejected(format!(
            "chain {name} is not empty ({} rules)",
            chain.rules.len()
        )));
    }
    for (other, chain) in chains.iter() {
        for rule in &chain.rules {
            if let Target::Jump(target) | Target::Goto(target) = &rule.target {
                if target == name {
                    return Err(rejected(format!(
                        "chain {name} is still used by `{}` in {other}",
                        rule.text
                    )));
                }
            }
        }
    }
    chains.remove(name);
    Ok(())
}

/// What the kernel checks at COMMIT, walking from each builtin chain: no chain loops, and
/// NAT targets only in hooks that allow them.
fn validate_hooks(table: Table, chains: &BTreeMap<String, Chain>) -> Result<()> {
    for &hook in table.hooks() {
        let mut done = BTreeSet::new();
        validate_chain(table, hook, chains, hook.chain(), &mut Vec::new(), &mut done)?;
    }
    Ok(())
}

fn validate_chain<'c>(
    table: Table,
    hook: Hook,
    chains: &'c BTreeMap<String, Chain>,
    name: &'c str,
    stack: &mut Vec<&'c str>,
    done: &mut BTreeSet<&'c str>,
) -> Result<()> {
    let Some(chain) = chains.get(name) else {
        return Ok(());
    };
    stack.push(name);
    for rule in &chain.rules {
        let allowed = match rule.target {
            Target::Dnat { .. } => matches!(hook, Hook::Prerouting | Hook::Output),
            Target::Snat { masquerade: false } => matches!(hook, Hook::Postrouting | Hook::Input),
            Target::Snat { masquerade: true } => hook == Hook::Postrouting,
            _ => true,
        };
        if !allowed {
            let reason = format!("its target is reachable from {table} {hook}, where it is not allowed");
            return Err(rejected(reason).at(rule.line, &rule.text));
        }
        if let Target::Jump(next) | Target::Goto(next) = &rule.target {
            if stack.contains(&next.as_str()) {
                let reason = format!("chain loop: {next} is reached again from {}", stack.join(" -> "));
                return Err(rejected(reason).at(rule.line, &rule.text));
            }
            if !done.contains(next.as_str()) {
                validate_chain(table, hook, chains, next, stack, done)?;
            }
        }
    }
    stack.pop();
    done.insert(name);
    Ok(())
}

/// Splits a restore line into arguments as iptables-restore does: whitespace separates,
/// double quotes group, and inside quotes a backslash escapes the next character.
fn tokenize(line: &str) -> Result<Vec<String>, Fail> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut in_token = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '\\' => current.push(chars.next().ok_or_else(|| syntax("line ends inside a quote"))?),
                '"' => quoted = false,
                c => current.push(c),
            }
        } else if c == '"' {
            quoted = true;
            in_token = true;
        } else if c.is_whitespace() {
            if in_token {
                tokens.push(std::mem::take(&mut current));
                in_token = false;
            }
        } else {
            current.push(c);
            in_token = true;
        }
    }
    if quoted {
        return Err(syntax("unterminated quote"));
    }
    if in_token {
        tokens.push(current);
    }
    Ok(tokens)
}

/// Quotes an argument the way iptables-save would, for showing [`Ruleset::append`] rules.
fn quote(arg: &str) -> String {
    if !arg.is_empty() && !arg.chars().any(|c| c.is_whitespace() || c == '"' || c == '\\') {
        return arg.to_string();
    }
    let escaped = arg.replace('\\', "\\\\").replace('"', "\\\"");
    format!("\"{escaped}\"")
}

// ---------------------------------------------------------------------------------------------
// Rule parsing

/// A `-m` module while its options are being read.
#[derive(Debug)]
enum Module {
    Comment {
        text: Option<String>,
    },
    /// `-m tcp|udp|sctp`, or the one `-p` loads implicitly.
    Port {
        proto: Protocol,
        dport: Option<(u16, bool)>,
    },
    AddrType {
        src: Option<bool>,
        dst: Option<bool>,
    },
    Conntrack {
        states: Option<(u8, bool)>,
    },
    Mark {
        mark: Option<(u32, u32, bool)>,
    },
    Statistic {
        mode: Option<String>,
        probability: Option<(f64, bool)>,
    },
    Recent(RecentOptions),
}

#[derive(Debug, Default)]
struct RecentOptions {
    name: Option<String>,
    rcheck: Option<bool>,
    set: bool,
    seconds: bool,
    reap: bool,
    mask: Option<IpAddr>,
    source: bool,
    dest: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ModuleKind {
    Comment,
    Port,
    AddrType,
    Conntrack,
    Mark,
    Statistic,
    Recent,
}

impl ModuleKind {
    fn name(self) -> &'static str {
        match self {
            ModuleKind::Comment => "comment",
            ModuleKind::Port => "tcp, udp or sctp",
            ModuleKind::AddrType => "addrtype",
            ModuleKind::Conntrack => "conntrack",
            ModuleKind::Mark => "mark",
            ModuleKind::Statistic => "statistic",
            ModuleKind::Recent => "recent",
        }
    }
}

impl Module {
    fn load(name: &str) -> Result<Module, Fail> {
        if let Some(proto) = Protocol::from_name(name) {
            return Ok(Module::Port { proto, dport: None });
        }
        Ok(match name {
            "comment" => Module::Comment { text: None },
            "addrtype" => Module::AddrType { src: None, dst: None },
            "conntrack" => Module::Conntrack { states: None },
            "mark" => Module::Mark { mark: None },
            "statistic" => Module::Statistic {
                mode: None,
                probability: None,
            },
            "recent" => Module::Recent(RecentOptions::default()),
            "set" => return Err(unsupported("-m set (ipset) is not modelled")),
            other => return Err(unsupported(format!("match module {other:?}"))),
        })
    }

    fn kind(&self) -> ModuleKind {
        match self {
            Module::Comment { .. } => ModuleKind::Comment,
            Module::Port { .. } => ModuleKind::Port,
            Module::AddrType { .. } => ModuleKind::AddrType,
            Module::Conntrack { .. } => ModuleKind::Conntrack,
            Module::Mark { .. } => ModuleKind::Mark,
            Module::Statistic { .. } => ModuleKind::Statistic,
            Module::Recent(_) => ModuleKind::Recent,
        }
    }

    /// The module owning a `--option`, whether it takes a value, and whether `!` may precede it.
    fn owner(option: &str) -> Option<(ModuleKind, bool, bool)> {
        Some(match option {
            "--comment" => (ModuleKind::Comment, true, false),
            "--dport" | "--destination-port" => (ModuleKind::Port, true, true),
            "--dst-type" | "--src-type" => (ModuleKind::AddrType, true, true),
            "--ctstate" => (ModuleKind::Conntrack, true, true),
            "--mark" => (ModuleKind::Mark, true, true),
            "--mode" => (ModuleKind::Statistic, true, false),
            "--probability" => (ModuleKind::Statistic, true, true),
            "--name" | "--seconds" | "--mask" => (ModuleKind::Recent, true, false),
            "--rcheck" => (ModuleKind::Recent, false, true),
            "--set" | "--reap" | "--rsource" | "--rdest" => (ModuleKind::Recent, false, false),
            _ => return None,
        })
    }

    fn set(
        &mut self,
        option: &str,
        value: Option<&str>,
        negated: bool,
        family: &mut Option<Family>,
    ) -> Result<(), Fail> {
        let value = value.unwrap_or_default();
        let kind = self.kind().name();
        let twice = || syntax(format!("{option} given twice in one -m {kind}"));
        match self {
            Module::Comment { text } => {
                if text.is_some() {
                    return Err(twice());
                }
                if value.len() > MAX_COMMENT {
                    let reason = format!("comment is {} bytes; the kernel keeps {MAX_COMMENT}", value.len());
                    return Err(rejected(reason));
                }
                *text = Some(value.to_string());
            }
            Module::Port { dport, .. } => {
                if dport.is_some() {
                    return Err(twice());
                }
                let port = value
                    .parse()
                    .map_err(|_| unsupported(format!("{option} {value:?}: only a single port is modelled")))?;
                *dport = Some((port, negated));
            }
            Module::AddrType { src, dst } => {
                let slot = if option == "--src-type" { src } else { dst };
                if slot.is_some() {
                    return Err(twice());
                }
                if value != "LOCAL" {
                    return Err(unsupported(format!("{option} {value}: only LOCAL is modelled")));
                }
                *slot = Some(negated);
            }
            Module::Conntrack { states } => {
                if states.is_some() {
                    return Err(twice());
                }
                *states = Some((parse_ctstates(value)?, negated));
            }
            Module::Mark { mark } => {
                if mark.is_some() {
                    return Err(twice());
                }
                let (value, mask) = parse_mark(value)?;
                *mark = Some((value, mask, negated));
            }
            Module::Statistic { mode, probability } => {
                if option == "--mode" {
                    if mode.is_some() {
                        return Err(twice());
                    }
                    *mode = Some(value.to_string());
                } else {
                    if probability.is_some() {
                        return Err(twice());
                    }
                    let p: f64 = value
                        .parse()
                        .map_err(|_| syntax(format!("bad probability {value:?}")))?;
                    if !(0.0..=1.0).contains(&p) {
                        return Err(syntax(format!("probability {value} is outside 0..1")));
                    }
                    *probability = Some((p, negated));
                }
            }
            Module::Recent(recent) => recent.set(option, value, negated, family)?,
        }
        Ok(())
    }

    fn finish(self, header: &[Header]) -> Result<Option<Match>, Fail> {
        Ok(match self {
            Module::Comment { .. } => None,
            Module::Port { proto, dport } => {
                let declared = header
                    .iter()
                    .any(|h| matches!(h, Header::Proto { proto: p, negated: false } if *p == proto));
                if !declared {
                    return Err(rejected(format!("-m {proto} needs -p {proto}")));
                }
                dport.map(|(port, negated)| Match::Dport { proto, port, negated })
            }
            Module::AddrType { src, dst } => {
                if src.is_none() && dst.is_none() {
                    return Err(syntax("-m addrtype needs --src-type or --dst-type"));
                }
                Some(Match::AddrTypeLocal { src, dst })
            }
            Module::Conntrack { states } => {
                let (states, negated) = states.ok_or_else(|| unsupported("-m conntrack without --ctstate"))?;
                Some(Match::CtState { states, negated })
            }
            Module::Mark { mark } => {
                let (value, mask, negated) = mark.ok_or_else(|| syntax("-m mark needs --mark"))?;
                Some(Match::Mark { value, mask, negated })
            }
            Module::Statistic { mode, probability } => {
                match mode.as_deref() {
                    Some("random") => {}
                    Some(other) => return Err(unsupported(format!("statistic --mode {other}"))),
                    None => return Err(syntax("-m statistic needs --mode")),
                }
                let (probability, negated) =
                    probability.ok_or_else(|| syntax("statistic --mode random needs --probability"))?;
                Some(Match::Statistic { probability, negated })
            }
            Module::Recent(recent) => Some(Match::Recent(recent.finish()?)),
        })
    }
}

impl RecentOptions {
    fn set(&mut self, option: &str, value: &str, negated: bool, family: &mut Option<Family>) -> Result<(), Fail> {
        let twice = || syntax(format!("{option} given twice in one -m recent"));
        match option {
            "--name" => {
                if self.name.replace(value.to_string()).is_some() {
                    return Err(twice());
                }
            }
            "--rcheck" => {
                if self.rcheck.replace(negated).is_some() {
                    return Err(twice());
                }
            }
            "--set" => self.set = true,
            "--seconds" => {
                value
                    .parse::<u32>()
                    .map_err(|_| syntax(format!("bad --seconds {value:?}")))?;
                self.seconds = true;
            }
            "--reap" => self.reap = true,
            "--mask" => {
                let mask: IpAddr = value.parse().map_err(|_| syntax(format!("bad --mask {value:?}")))?;
                note_family(family, mask)?;
                self.mask = Some(mask);
            }
            "--rsource" => self.source = true,
            "--rdest" => self.dest = true,
            other => unreachable!("{other} is not a recent option"),
        }
        Ok(())
    }

    fn finish(self) -> Result<Recent, Fail> {
        let check = match (self.rcheck, self.set) {
            (Some(negated), false) => Some(negated),
            (None, true) => None,
            (Some(_), true) => return Err(syntax("-m recent takes one of --rcheck and --set")),
            (None, false) => return Err(unsupported("-m recent without --rcheck or --set")),
        };
        if check.is_none() && (self.seconds || self.reap) {
            return Err(syntax("--seconds and --reap only go with --rcheck"));
        }
        if self.reap && !self.seconds {
            return Err(rejected("--reap needs --seconds"));
        }
        if self.source && self.dest {
            return Err(syntax("--rsource and --rdest together"));
        }
        Ok(Recent {
            name: self.name.unwrap_or_else(|| "DEFAULT".to_string()),
            check,
            mask: self.mask,
            dest: self.dest,
        })
    }
}

/// "V" or "V/M", hex with 0x or decimal; a bare value compares all 32 bits.
fn parse_mark(text: &str) -> Result<(u32, u32), Fail> {
    let number = |s: &str| {
        let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => s.parse(),
        };
        parsed.map_err(|_| syntax(format!("bad mark {text:?}")))
    };
    match text.split_once('/') {
        Some((value, mask)) => Ok((number(value)?, number(mask)?)),
        None => Ok((number(text)?, u32::MAX)),
    }
}

fn note_family(family: &mut Option<Family>, addr: IpAddr) -> Result<(), Fail> {
    match *family {
        Some(known) if known != family_of(addr) => Err(rejected(format!(
            "{addr} is {} but earlier rules are {known}",
            family_of(addr)
        ))),
        _ => {
            *family = Some(family_of(addr));
            Ok(())
        }
    }
}

/// A CIDR or plain address (a host route) as in `-s` and `-d`.
fn parse_net(text: &str, family: &mut Option<Family>) -> Result<IpNet, Fail> {
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match text.parse::<IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) if text.contains(',') => return Err(unsupported(format!("address list {text:?}"))),
            Err(_) => return Err(syntax(format!("{text:?} is not an address or CIDR"))),
        },
    };
    note_family(family, net.addr())?;
    Ok(net)
}

/// "ip", "ip:port", "[ip6]" or "[ip6]:port", as in `--to-destination`.
fn parse_nat_addr(text: &str, family: &mut Option<Family>) -> Result<(IpAddr, Option<u16>), Fail> {
    let parsed = if let Ok(addr) = text.parse::<SocketAddr>() {
        Some((addr.ip(), Some(addr.port())))
    } else if let Ok(ip) = text.parse::<IpAddr>() {
        Some((ip, None))
    } else {
        text.strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|ip| ip.parse().ok())
            .map(|ip| (ip, None))
    };
    let (ip, port) = parsed.ok_or_else(|| {
        if text.contains('-') {
            unsupported(format!("NAT range {text:?}"))
        } else {
            syntax(format!("{text:?} is not ip[:port]"))
        }
    })?;
    note_family(family, ip)?;
    Ok((ip, port))
}

/// The `-j`/`-g` target while its options are being read.
#[derive(Debug)]
struct PendingTarget {
    name: String,
    goto: bool,
    options: Vec<(String, Option<String>)>,
}

/// Whether `option` belongs to target `name`, and if so whether it takes a value.
fn target_option(name: &str, option: &str) -> Option<bool> {
    match (name, option) {
        ("DNAT", "--to-destination") | ("SNAT", "--to-source") => Some(true),
        ("DNAT" | "SNAT", "--random" | "--persistent") => Some(false),
        ("SNAT" | "MASQUERADE", "--random-fully") | ("MASQUERADE", "--random") => Some(false),
        ("MARK", "--set-xmark" | "--set-mark" | "--or-mark" | "--xor-mark" | "--and-mark") => Some(true),
        ("REJECT", "--reject-with") => Some(true),
        _ => None,
    }
}

impl PendingTarget {
    fn finish(
        self,
        table: Table,
        chains: &BTreeMap<String, Chain>,
        family: &mut Option<Family>,
    ) -> Result<Target, Fail> {
        let name = self.name.as_str();
        let value = |option: &str| {
            self.options
                .iter()
                .find(|(o, _)| o == option)
                .and_then(|(_, v)| v.as_deref())
        };
        let builtin = matches!(
            name,
            "ACCEPT" | "DROP" | "REJECT" | "RETURN" | "DNAT" | "SNAT" | "MASQUERADE" | "MARK"
        );
        if builtin && self.goto {
            return Err(syntax(format!("-g needs a chain, not {name}")));
        }
        if name == "DROP" && table == Table::Nat {
            return Err(rejected(NAT_DROP));
        }
        let nat_only = matches!(name, "DNAT" | "SNAT" | "MASQUERADE");
        if (nat_only && table != Table::Nat) || (name == "REJECT" && table != Table::Filter) {
            return Err(rejected(format!("target {name} is not valid in the {table} table")));
        }
        Ok(match name {
            "ACCEPT" => Target::Accept,
            "DROP" => Target::Drop,
            "REJECT" => Target::Reject,
            "RETURN" => Target::Return,
            "MASQUERADE" => Target::Snat { masquerade: true },
            "DNAT" => {
                let to = value("--to-destination").ok_or_else(|| syntax("DNAT needs --to-destination"))?;
                let (ip, port) = parse_nat_addr(to, family)?;
                Target::Dnat { ip, port }
            }
            "SNAT" => {
                let to = value("--to-source").ok_or_else(|| syntax("SNAT needs --to-source"))?;
                parse_nat_addr(to, family)?;
                Target::Snat { masquerade: false }
            }
            "MARK" => {
                let [(option, Some(text))] = self.options.as_slice() else {
                    return Err(syntax(
                        "MARK takes exactly one of --set-xmark, --set-mark, --or-mark, --xor-mark, --and-mark",
                    ));
                };
                let (value, mask) = parse_mark(text)?;
                let has_mask = text.contains('/');
                match option.as_str() {
                    "--set-xmark" => Target::Mark { value, mask },
                    "--set-mark" => Target::Mark {
                        value,
                        mask: mask | value,
                    },
                    _ if has_mask => return Err(syntax(format!("{option} takes no mask"))),
                    "--or-mark" => Target::Mark { value, mask: value },
                    "--xor-mark" => Target::Mark { value, mask: 0 },
                    _ => Target::Mark { value: 0, mask: !value },
                }
            }
            _ if table.is_builtin(name) => {
                return Err(rejected(format!("cannot jump to builtin chain {name}")));
            }
            _ if chains.contains_key(name) => {
                if self.goto {
                    Target::Goto(name.to_string())
                } else {
                    Target::Jump(name.to_string())
                }
            }
            _ if UNMODELLED_TARGETS.contains(&name) => {
                return Err(unsupported(format!("target {name}")));
            }
            _ => return Err(rejected(format!("no chain {name} in the {table} table"))),
        })
    }
}

type ParsedRule = (Vec<Header>, Vec<Match>, Target);

/// Parses the arguments after `-A CHAIN`.
fn parse_rule(
    table: Table,
    chains: &BTreeMap<String, Chain>,
    args: &[String],
    family: &mut Option<Family>,
) -> Result<ParsedRule, Fail> {
    let mut header = Vec::new();
    let mut modules: Vec<Module> = Vec::new();
    let mut target: Option<PendingTarget> = None;
    let mut negated = false;
    let mut args = args.iter().map(String::as_str);
    while let Some(arg) = args.next() {
        if arg == "!" {
            if negated {
                return Err(syntax("! given twice"));
            }
            negated = true;
            continue;
        }
        let mut value = || args.next().ok_or_else(|| syntax(format!("{arg} needs a value")));
        match arg {
            "-s" | "--source" | "-d" | "--destination" | "-p" | "--protocol" | "-i" | "--in-interface" | "-o"
            | "--out-interface" => {
                // The letter after the dashes names it in both spellings ("-s", "--source").
                let flag = if arg.starts_with("--") { &arg[2..3] } else { &arg[1..2] };
                if header.iter().any(|h| header_flag(h) == flag) {
                    return Err(syntax(format!("{arg} given twice")));
                }
                let value = value()?;
                header.push(match flag {
                    "s" => Header::Src {
                        net: parse_net(value, family)?,
                        negated,
                    },
                    "d" => Header::Dst {
                        net: parse_net(value, family)?,
                        negated,
                    },
                    "p" => {
                        let proto =
                            Protocol::from_name(value).ok_or_else(|| unsupported(format!("protocol {value:?}")))?;
                        if !negated {
                            // Like iptables, -p makes the protocol's options (--dport) available.
                            modules.push(Module::Port { proto, dport: None });
                        }
                        Header::Proto { proto, negated }
                    }
                    "i" => Header::InIface {
                        name: value.to_string(),
                        negated,
                    },
                    _ => Header::OutIface {
                        name: value.to_string(),
                        negated,
                    },
                });
            }
            "-m" | "--match" => {
                if negated {
                    return Err(syntax("! cannot precede -m"));
                }
                modules.push(Module::load(value()?)?);
            }
            "-j" | "--jump" | "-g" | "--goto" => {
                if negated {
                    return Err(syntax(format!("! cannot precede {arg}")));
                }
                if target.is_some() {
                    return Err(syntax("more than one -j or -g"));
                }
                let goto = matches!(arg, "-g" | "--goto");
                target = Some(PendingTarget {
                    name: value()?.to_string(),
                    goto,
                    options: Vec::new(),
                });
            }
            option if option.starts_with("--") => {
                if let Some(takes_value) = target.as_ref().and_then(|t| target_option(&t.name, option)) {
                    if negated {
                        return Err(syntax(format!("! cannot precede {option}")));
                    }
                    let value = if takes_value { Some(value()?.to_string()) } else { None };
                    target
                        .as_mut()
                        .expect("checked above")
                        .options
                        .push((option.to_string(), value));
                } else if let Some((kind, takes_value, negatable)) = Module::owner(option) {
                    if negated && !negatable {
                        return Err(unsupported(format!("! {option}")));
                    }
                    let value = if takes_value { Some(value()?) } else { None };
                    let module = modules
                        .iter_mut()
                        .rev()
                        .find(|m| m.kind() == kind)
                        .ok_or_else(|| syntax(format!("{option} needs -m {} first", kind.name())))?;
                    module.set(option, value, negated, family)?;
                } else if let Some(pending) = &target {
                    return Err(unsupported(format!("option {option} (for target {})", pending.name)));
                } else {
                    return Err(unsupported(format!("option {option}")));
                }
            }
            other => return Err(unsupported(format!("argument {other:?}"))),
        }
        negated = false;
    }
    if negated {
        return Err(syntax("! at the end of the rule"));
    }
    let mut matches = Vec::new();
    for module in modules {
        matches.extend(module.finish(&header)?);
    }
    let target = match target {
        Some(pending) => pending.finish(table, chains, family)?,
        None => Target::None,
    };
    Ok((header, matches, target))
}

/// The letter of a header option: "s" for `-s`/`--source`, and so on.
fn header_flag(header: &Header) -> &'static str {
    match header {
        Header::Src { .. } => "s",
        Header::Dst { .. } => "d",
        Header::Proto { .. } => "p",
        Header::InIface { .. } => "i",
        Header::OutIface { .. } => "o",
    }
}

// ---------------------------------------------------------------------------------------------
// Tracing

/// Traces packets through a [`Ruleset`] as seen by one node.
#[derive(Debug, Clone)]
pub struct Tracer<'r> {
    ruleset: &'r Ruleset,
    local_addrs: BTreeSet<IpAddr>,
    recent: RecentHistory,
}

/// The packet on one path, as the rules so far have left it.
#[derive(Debug, Clone)]
struct Flow {
    src: IpAddr,
    dst: IpAddr,
    dport: u16,
    proto: Protocol,
    from: Origin,
    in_iface: Option<String>,
    out_iface: Option<String>,
    mark: u32,
    dnat: bool,
    masquerade: bool,
    /// `-m recent --set` entries made by this packet: (list, masked address).
    recent: BTreeSet<(String, IpAddr)>,
    steps: Vec<TraceStep>,
}

/// How a chain traversal ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Fell off the end or hit RETURN: the caller continues (a builtin chain applies its policy).
    Return,
    /// ACCEPT, or a NAT target, which ends the table for this hook.
    Accept,
    Drop,
    Reject,
}

/// What one rule's matches decide on one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    NoMatch,
    Matched,
    AssumedMatch,
    AssumedNoMatch,
}

/// A match's answer: `Both` when it depends on chance or on history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Yes,
    No,
    Both,
}

/// A table traversal in the packet's path through the hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stage {
    table: Table,
    hook: Hook,
}

impl Tracer<'_> {
    /// Replaces how `-m recent --rcheck` is answered (default: explored both ways).
    pub fn with_recent(mut self, recent: RecentHistory) -> Self {
        self.recent = recent;
        self
    }

    /// Every outcome a new connection can have, with the rules met on each path.
    pub fn trace(&self, packet: &Packet) -> Result<TraceResult> {
        let fail = |reason: String| Error {
            kind: ErrorKind::Packet,
            line: None,
            text: packet.to_string(),
            reason,
        };
        if family_of(packet.src) != family_of(packet.dst) {
            return Err(fail("source and destination are of different families".to_string()));
        }
        if let Some(rules) = self.ruleset.family {
            if rules != family_of(packet.src) {
                return Err(fail(format!(
                    "the rules are {rules}, the packet is {}",
                    family_of(packet.src)
                )));
            }
        }
        let flow = Flow {
            src: packet.src,
            dst: packet.dst,
            dport: packet.dport,
            proto: packet.proto,
            from: packet.from,
            in_iface: packet.in_iface.clone(),
            out_iface: packet.out_iface.clone(),
            mark: packet.mark,
            dnat: false,
            masquerade: false,
            recent: BTreeSet::new(),
            steps: Vec::new(),
        };
        let first = match packet.from {
            Origin::Remote => Stage {
                table: Table::Nat,
                hook: Hook::Prerouting,
            },
            Origin::Local => Stage {
                table: Table::Nat,
                hook: Hook::Output,
            },
        };
        let mut paths = Vec::new();
        self.run_stage(first, flow, &mut paths)?;
        let outcomes = paths.iter().map(|path| path.outcome).collect();
        Ok(TraceResult { outcomes, paths })
    }

    fn is_local(&self, addr: &IpAddr) -> bool {
        addr.is_loopback() || self.local_addrs.contains(addr)
    }

    /// The table traversal after `stage` once it accepted, or `None` when the packet is out.
    fn next_stage(&self, stage: Stage, flow: &Flow) -> Option<Stage> {
        let (table, hook) = match (stage.table, stage.hook) {
            (Table::Nat, Hook::Prerouting) if self.is_local(&flow.dst) => (Table::Filter, Hook::Input),
            (Table::Nat, Hook::Prerouting) => (Table::Filter, Hook::Forward),
            // For a locally generated packet the connection's NAT was settled at OUTPUT and
            // POSTROUTING, so looping back to the node skips nat INPUT.
            (Table::Filter, Hook::Input) if flow.from == Origin::Remote => (Table::Nat, Hook::Input),
            (Table::Filter, Hook::Forward) | (Table::Filter, Hook::Output) => (Table::Nat, Hook::Postrouting),
            (Table::Nat, Hook::Output) => (Table::Filter, Hook::Output),
            (Table::Nat, Hook::Postrouting) if flow.from == Origin::Local && self.is_local(&flow.dst) => {
                (Table::Filter, Hook::Input)
            }
            _ => return None,
        };
        Some(Stage { table, hook })
    }

    fn run_stage(&self, stage: Stage, flow: Flow, paths: &mut Vec<TracePath>) -> Result<()> {
        let builtin = self
            .ruleset
            .chain(stage.table, stage.hook.chain())
            .expect("builtin chains always exist");
        let mut ends = Vec::new();
        self.run_chain(stage, stage.hook.chain(), flow, &mut ends)?;
        for (flow, end) in ends {
            let end = match (end, builtin.policy) {
                (End::Return, Some(Policy::Drop)) => End::Drop,
                (End::Return, _) => End::Accept,
                (end, _) => end,
            };
            let destination = match end {
                End::Accept => match self.next_stage(stage, &flow) {
                    Some(next) => {
                        self.run_stage(next, flow, paths)?;
                        continue;
                    }
                    None if flow.dnat => Destination::Dnat(SocketAddr::new(flow.dst, flow.dport)),
                    None => Destination::Accept,
                },
                End::Drop => Destination::Drop,
                End::Reject => Destination::Reject,
                End::Return => unreachable!("resolved by the policy above"),
            };
            let masquerade = flow.masquerade && matches!(end, End::Accept);
            paths.push(TracePath {
                outcome: Outcome {
                    destination,
                    masquerade,
                },
                steps: flow.steps,
            });
        }
        Ok(())
    }

    fn run_chain(&self, stage: Stage, name: &str, flow: Flow, out: &mut Vec<(Flow, End)>) -> Result<()> {
        let chain = self.ruleset.chain(stage.table, name).ok_or_else(|| Error {
            kind: ErrorKind::Rejected,
            line: None,
            text: name.to_string(),
            reason: format!("no chain {name} in {}", stage.table),
        })?;
        self.run_rules(stage, &chain.rules, 0, flow, out)
    }

    /// Runs `rules[index..]`. Forks recurse; the last continuing path loops, so long chains
    /// (one rule per Service) do not grow the stack.
    fn run_rules(
        &self,
        stage: Stage,
        rules: &[Rule],
        mut index: usize,
        mut flow: Flow,
        out: &mut Vec<(Flow, End)>,
    ) -> Result<()> {
        loop {
            let Some(rule) = rules.get(index) else {
                out.push((flow, End::Return));
                return Ok(());
            };
            let mut continuing = Vec::new();
            for (path, fate) in self.evaluate(rule, flow) {
                self.apply(stage, rule, path, fate, &mut continuing, out)?;
            }
            let Some(last) = continuing.pop() else {
                return Ok(());
            };
            for path in continuing {
                self.run_rules(stage, rules, index + 1, path, out)?;
            }
            flow = last;
            index += 1;
        }
    }

    /// Decides a rule's matches, forking the flow where chance or history decides. Matching
    /// paths come first. The kernel checks `-s -d -p -i -o` before `-m` matches; the fixed
    /// `-m` matches are checked next too, which only differs from the kernel if a
    /// `--set` precedes a failing fixed match and a later `--rcheck` reads that same list.
    fn evaluate(&self, rule: &Rule, flow: Flow) -> Vec<(Flow, Fate)> {
        let fixed = rule.header.iter().all(|header| self.header_matches(header, &flow))
            && rule
                .matches
                .iter()
                .all(|m| self.fixed_answer(m, &flow) != Some(Answer::No));
        if !fixed {
            return vec![(flow, Fate::NoMatch)];
        }
        let mut live = vec![(flow, false)];
        let mut failed: Vec<(Flow, bool)> = Vec::new();
        for m in &rule.matches {
            if !matches!(m, Match::Statistic { .. } | Match::Recent(_)) {
                continue;
            }
            let mut next = Vec::new();
            for (mut path, assumed) in live {
                match self.chancy_answer(m, &mut path) {
                    Answer::Yes => next.push((path, assumed)),
                    Answer::No => failed.push((path, assumed)),
                    Answer::Both => {
                        failed.push((path.clone(), true));
                        next.push((path, true));
                    }
                }
            }
            live = next;
            if live.is_empty() {
                break;
            }
        }
        // Failed paths differ only in what they assumed; keep one per distinct recent state.
        let mut kept: Vec<(Flow, bool)> = Vec::new();
        for (path, assumed) in failed {
            if !kept.iter().any(|(other, _)| other.recent == path.recent) {
                kept.push((path, assumed));
            }
        }
        let matched = live
            .into_iter()
            .map(|(path, assumed)| (path, if assumed { Fate::AssumedMatch } else { Fate::Matched }));
        let unmatched = kept
            .into_iter()
            .map(|(path, assumed)| (path, if assumed { Fate::AssumedNoMatch } else { Fate::NoMatch }));
        matched.chain(unmatched).collect()
    }

    fn header_matches(&self, header: &Header, flow: &Flow) -> bool {
        let iface = |name: &str, negated: bool, actual: &Option<String>| match actual {
            None => false,
            Some(actual) => {
                let equal = match name.strip_suffix('+') {
                    Some(prefix) => actual.starts_with(prefix),
                    None => actual == name,
                };
                equal != negated
            }
        };
        match header {
            Header::Src { net, negated } => net.contains(&flow.src) != *negated,
            Header::Dst { net, negated } => net.contains(&flow.dst) != *negated,
            Header::Proto { proto, negated } => (flow.proto == *proto) != *negated,
            Header::InIface { name, negated } => iface(name, *negated, &flow.in_iface),
            Header::OutIface { name, negated } => iface(name, *negated, &flow.out_iface),
        }
    }

    /// The answer of a match that depends only on the packet, or `None` for chancy ones.
    fn fixed_answer(&self, m: &Match, flow: &Flow) -> Option<Answer> {
        let yes = match m {
            Match::Dport { proto, port, negated } => flow.proto == *proto && (flow.dport == *port) != *negated,
            Match::AddrTypeLocal { src, dst } => {
                let side = |negated: &Option<bool>, addr: &IpAddr| {
                    negated.is_none_or(|negated| self.is_local(addr) != negated)
                };
                side(src, &flow.src) && side(dst, &flow.dst)
            }
            Match::CtState { states, negated } => {
                // A new connection is NEW, and DNAT once a DNAT rule has rewritten it.
                let actual = if flow.dnat { CT_NEW | CT_DNAT } else { CT_NEW };
                (states & actual != 0) != *negated
            }
            Match::Mark { value, mask, negated } => (flow.mark & mask == *value) != *negated,
            Match::Statistic { .. } | Match::Recent(_) => return None,
        };
        Some(if yes { Answer::Yes } else { Answer::No })
    }

    /// The answer of a random or `-m recent` match; `--set` records into the flow.
    fn chancy_answer(&self, m: &Match, flow: &mut Flow) -> Answer {
        let flip = |answer: Answer, negated: bool| match (answer, negated) {
            (Answer::Yes, true) => Answer::No,
            (Answer::No, true) => Answer::Yes,
            (answer, _) => answer,
        };
        match m {
            Match::Statistic { probability, negated } => {
                let answer = if *probability >= 1.0 {
                    Answer::Yes
                } else if *probability <= 0.0 {
                    Answer::No
                } else {
                    Answer::Both
                };
                flip(answer, *negated)
            }
            Match::Recent(recent) => {
                let addr = masked(if recent.dest { flow.dst } else { flow.src }, recent.mask);
                let key = (recent.name.clone(), addr);
                let Some(negated) = recent.check else {
                    flow.recent.insert(key);
                    return Answer::Yes;
                };
                let answer = if flow.recent.contains(&key) {
                    Answer::Yes
                } else {
                    match &self.recent {
                        RecentHistory::Unknown => Answer::Both,
                        RecentHistory::Known(entries) => {
                            let seen = entries
                                .iter()
                                .any(|(name, entry)| *name == recent.name && masked(*entry, recent.mask) == addr);
                            if seen {
                                Answer::Yes
                            } else {
                                Answer::No
                            }
                        }
                    }
                };
                flip(answer, negated)
            }
            _ => unreachable!("fixed matches are answered by fixed_answer"),
        }
    }

    /// Runs a rule's target on one path. Paths that go on to the next rule land in
    /// `continuing`; paths that leave the chain land in `out`.
    fn apply(
        &self,
        stage: Stage,
        rule: &Rule,
        mut flow: Flow,
        fate: Fate,
        continuing: &mut Vec<Flow>,
        out: &mut Vec<(Flow, End)>,
    ) -> Result<()> {
        let branch = match fate {
            Fate::NoMatch => {
                continuing.push(flow);
                return Ok(());
            }
            Fate::Matched => Branch::Matched,
            Fate::AssumedMatch => Branch::AssumedMatch,
            Fate::AssumedNoMatch => Branch::AssumedNoMatch,
        };
        flow.steps.push(TraceStep {
            table: stage.table,
            hook: stage.hook,
            line: rule.line,
            rule: rule.text.clone(),
            branch,
        });
        if branch == Branch::AssumedNoMatch {
            continuing.push(flow);
            return Ok(());
        }
        match &rule.target {
            Target::None => continuing.push(flow),
            Target::Mark { value, mask } => {
                flow.mark = (flow.mark & !mask) ^ value;
                continuing.push(flow);
            }
            Target::Return => out.push((flow, End::Return)),
            Target::Accept => out.push((flow, End::Accept)),
            Target::Drop => out.push((flow, End::Drop)),
            Target::Reject => out.push((flow, End::Reject)),
            Target::Dnat { ip, port } => {
                flow.dst = *ip;
                if let Some(port) = port {
                    flow.dport = *port;
                }
                flow.dnat = true;
                out.push((flow, End::Accept));
            }
            Target::Snat { .. } => {
                flow.masquerade = true;
                out.push((flow, End::Accept));
            }
            Target::Jump(chain) => {
                let mut ends = Vec::new();
                self.run_chain(stage, chain, flow, &mut ends)?;
                for (flow, end) in ends {
                    match end {
                        End::Return => continuing.push(flow),
                        end => out.push((flow, end)),
                    }
                }
            }
            // A goto's RETURN goes back to this chain's caller, so its ends are this chain's.
            Target::Goto(chain) => self.run_chain(stage, chain, flow, out)?,
        }
        Ok(())
    }
}

/// `addr & mask` when the families agree (a `--mask` of the other family is ignored).
fn masked(addr: IpAddr, mask: Option<IpAddr>) -> IpAddr {
    match (addr, mask) {
        (IpAddr::V4(addr), Some(IpAddr::V4(mask))) => IpAddr::V4((u32::from(addr) & u32::from(mask)).into()),
        (IpAddr::V6(addr), Some(IpAddr::V6(mask))) => IpAddr::V6((u128::from(addr) & u128::from(mask)).into()),
        (addr, _) => addr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE_IP: &str = "192.168.0.10";

    /// kproxy's rules in kube-proxy's shape: ns1/web (ClusterIP + NodePort 30080, two
    /// endpoints), ns2/dns (UDP, ClientIP affinity, two endpoints), ns3/empty (no endpoints,
    /// NodePort 30003). Pod CIDR 10.244.0.0/16.
    const RULES: &str = r#"
*nat
:KPROXY-SERVICES - [0:0]
:KPROXY-NODEPORTS - [0:0]
:KPROXY-POSTROUTING - [0:0]
:KPROXY-MARK-MASQ - [0:0]
:KPROXY-SVC-WEB - [0:0]
:KPROXY-EXT-WEB - [0:0]
:KPROXY-SEP-WEB1 - [0:0]
:KPROXY-SEP-WEB2 - [0:0]
:KPROXY-SVC-DNS - [0:0]
:KPROXY-SEP-DNS1 - [0:0]
:KPROXY-SEP-DNS2 - [0:0]
-A KPROXY-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KPROXY-POSTROUTING -j MARK --xor-mark 0x4000
-A KPROXY-POSTROUTING -m comment --comment "kproxy service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KPROXY-MARK-MASQ -j MARK --or-mark 0x4000
-A KPROXY-SERVICES -m comment --comment "ns1/web:http cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KPROXY-SVC-WEB
-A KPROXY-SERVICES -m comment --comment "ns2/dns:dns cluster IP" -m udp -p udp -d 172.30.0.42 --dport 53 -j KPROXY-SVC-DNS
-A KPROXY-SERVICES -m comment --comment "kproxy service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KPROXY-NODEPORTS
-A KPROXY-NODEPORTS -m comment --comment ns1/web:http -m tcp -p tcp --dport 30080 -j KPROXY-EXT-WEB
-A KPROXY-EXT-WEB -m comment --comment "masquerade traffic for ns1/web:http external destinations" -j KPROXY-MARK-MASQ
-A KPROXY-EXT-WEB -j KPROXY-SVC-WEB
-A KPROXY-SVC-WEB -m comment --comment "ns1/web:http cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.244.0.0/16 -j KPROXY-MARK-MASQ
-A KPROXY-SVC-WEB -m comment --comment "ns1/web:http -> 10.244.1.2:8080" -m statistic --mode random --probability 0.5000000000 -j KPROXY-SEP-WEB1
-A KPROXY-SVC-WEB -m comment --comment "ns1/web:http -> 10.244.2.3:8080" -j KPROXY-SEP-WEB2
-A KPROXY-SEP-WEB1 -m comment --comment ns1/web:http -s 10.244.1.2 -j KPROXY-MARK-MASQ
-A KPROXY-SEP-WEB1 -m comment --comment ns1/web:http -m tcp -p tcp -j DNAT --to-destination 10.244.1.2:8080
-A KPROXY-SEP-WEB2 -m comment --comment ns1/web:http -s 10.244.2.3 -j KPROXY-MARK-MASQ
-A KPROXY-SEP-WEB2 -m comment --comment ns1/web:http -m tcp -p tcp -j DNAT --to-destination 10.244.2.3:8080
-A KPROXY-SVC-DNS -m comment --comment "ns2/dns:dns cluster IP" -m udp -p udp -d 172.30.0.42 --dport 53 ! -s 10.244.0.0/16 -j KPROXY-MARK-MASQ
-A KPROXY-SVC-DNS -m comment --comment "ns2/dns:dns -> 10.244.1.5:53" -m recent --name KPROXY-SEP-DNS1 --rcheck --seconds 10800 --reap -j KPROXY-SEP-DNS1
-A KPROXY-SVC-DNS -m comment --comment "ns2/dns:dns -> 10.244.2.6:53" -m recent --name KPROXY-SEP-DNS2 --rcheck --seconds 10800 --reap -j KPROXY-SEP-DNS2
-A KPROXY-SVC-DNS -m comment --comment "ns2/dns:dns -> 10.244.1.5:53" -m statistic --mode random --probability 0.5000000000 -j KPROXY-SEP-DNS1
-A KPROXY-SVC-DNS -m comment --comment "ns2/dns:dns -> 10.244.2.6:53" -j KPROXY-SEP-DNS2
-A KPROXY-SEP-DNS1 -m comment --comment ns2/dns:dns -s 10.244.1.5 -j KPROXY-MARK-MASQ
-A KPROXY-SEP-DNS1 -m comment --comment ns2/dns:dns -m recent --name KPROXY-SEP-DNS1 --mask 255.255.255.255 --set --rsource -m udp -p udp -j DNAT --to-destination 10.244.1.5:53
-A KPROXY-SEP-DNS2 -m comment --comment ns2/dns:dns -s 10.244.2.6 -j KPROXY-MARK-MASQ
-A KPROXY-SEP-DNS2 -m comment --comment ns2/dns:dns -m recent --name KPROXY-SEP-DNS2 --mask 255.255.255.255 --set --rsource -m udp -p udp -j DNAT --to-destination 10.244.2.6:53
COMMIT
*filter
:KPROXY-SERVICES - [0:0]
:KPROXY-EXTERNAL-SERVICES - [0:0]
:KPROXY-FORWARD - [0:0]
-A KPROXY-SERVICES -m comment --comment "ns3/empty:http has no endpoints" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j REJECT --reject-with icmp-port-unreachable
-A KPROXY-EXTERNAL-SERVICES -m comment --comment "ns3/empty:http has no endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30003 -j REJECT
-A KPROXY-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KPROXY-FORWARD -m comment --comment "kproxy forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
COMMIT
"#;

    /// kproxy's jumps from the builtin chains, installed outside the restore.
    const JUMPS: &str = r#"
*nat
-A PREROUTING -m comment --comment "kproxy service portals" -j KPROXY-SERVICES
-A OUTPUT -m comment --comment "kproxy service portals" -j KPROXY-SERVICES
-A POSTROUTING -m comment --comment "kproxy postrouting rules" -j KPROXY-POSTROUTING
COMMIT
*filter
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kproxy externally-visible service portals" -j KPROXY-EXTERNAL-SERVICES
-A FORWARD -m comment --comment "kproxy forwarding rules" -j KPROXY-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kproxy service portals" -j KPROXY-SERVICES
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kproxy service portals" -j KPROXY-SERVICES
COMMIT
"#;

    fn ruleset() -> Ruleset {
        let mut rules = Ruleset::parse(RULES).unwrap_or_else(|e| panic!("{e}"));
        rules.restore(JUMPS).unwrap_or_else(|e| panic!("{e}"));
        rules
    }

    fn node() -> [IpAddr; 1] {
        [NODE_IP.parse().expect("valid IP")]
    }

    fn trace_in(rules: &Ruleset, packet: &Packet) -> TraceResult {
        rules.tracer(node()).trace(packet).unwrap_or_else(|e| panic!("{e}"))
    }

    fn trace(packet: Packet) -> TraceResult {
        trace_in(&ruleset(), &packet)
    }

    #[track_caller]
    fn assert_flow(result: &TraceResult, destinations: &str, masquerade: Option<bool>) {
        assert_eq!(result.to_string(), destinations, "paths:\n{}", result.explain());
        assert_eq!(result.masquerade(), masquerade, "paths:\n{}", result.explain());
    }

    fn outcome(destination: &str, masquerade: bool) -> Outcome {
        let destination = match destination {
            "ACCEPT" => Destination::Accept,
            "REJECT" => Destination::Reject,
            "DROP" => Destination::Drop,
            addr => Destination::Dnat(addr.parse().expect("ip:port")),
        };
        Outcome {
            destination,
            masquerade,
        }
    }

    fn line_of(input: &str, needle: &str) -> Option<usize> {
        input
            .lines()
            .position(|line| line.contains(needle))
            .map(|index| index + 1)
    }

    #[test]
    fn cluster_ip_from_a_pod_reaches_every_endpoint_unmasqueraded() {
        let result = trace(Packet::tcp(Origin::Remote, "10.244.3.4", "172.30.0.41:80"));
        assert_flow(&result, "10.244.1.2:8080, 10.244.2.3:8080", Some(false));
        let expected: BTreeSet<String> = ["10.244.1.2:8080", "10.244.2.3:8080"].map(String::from).into();
        assert_eq!(result.endpoints(), expected);
    }

    #[test]
    fn cluster_ip_from_outside_the_pod_cidr_is_masqueraded() {
        let result = trace(Packet::tcp(Origin::Remote, "192.168.0.20", "172.30.0.41:80"));
        assert_flow(&result, "10.244.1.2:8080, 10.244.2.3:8080", Some(true));
    }

    #[test]
    fn hairpin_is_masqueraded_only_back_to_the_same_endpoint() {
        let result = trace(Packet::tcp(Origin::Remote, "10.244.1.2", "172.30.0.41:80"));
        let expected = [outcome("10.244.1.2:8080", true), outcome("10.244.2.3:8080", false)].into();
        assert_eq!(result.outcomes, expected, "paths:\n{}", result.explain());
        assert_eq!(result.masquerade(), None);
    }

    #[test]
    fn node_port_on_the_node_ip_is_masqueraded() {
        let result = trace(Packet::tcp(Origin::Remote, "203.0.113.9", "192.168.0.10:30080"));
        assert_flow(&result, "10.244.1.2:8080, 10.244.2.3:8080", Some(true));
    }

    #[test]
    fn node_port_on_an_address_of_another_host_is_forwarded_untouched() {
        let result = trace(Packet::tcp(Origin::Remote, "203.0.113.9", "192.168.0.99:30080"));
        assert_flow(&result, "ACCEPT", Some(false));
    }

    #[test]
    fn local_processes_reach_cluster_ips_and_node_ports_on_loopback() {
        let result = trace(Packet::tcp(Origin::Local, NODE_IP, "172.30.0.41:80"));
        assert_flow(&result, "10.244.1.2:8080, 10.244.2.3:8080", Some(true));
        let result = trace(Packet::tcp(Origin::Local, "127.0.0.1", "127.0.0.1:30080"));
        assert_flow(&result, "10.244.1.2:8080, 10.244.2.3:8080", Some(true));
    }

    #[test]
    fn service_without_endpoints_is_rejected_from_everywhere() {
        let result = trace(Packet::tcp(Origin::Remote, "10.244.3.4", "172.30.0.43:80"));
        assert_flow(&result, "REJECT", Some(false));
        let result = trace(Packet::tcp(Origin::Local, NODE_IP, "172.30.0.43:80"));
        assert_flow(&result, "REJECT", Some(false));
        let result = trace(Packet::tcp(Origin::Remote, "203.0.113.9", "192.168.0.10:30003"));
        assert_flow(&result, "REJECT", Some(false));
    }

    #[test]
    fn other_ports_and_protocols_pass_untouched() {
        let result = trace(Packet::tcp(Origin::Remote, "10.244.3.4", "172.30.0.41:81"));
        assert_flow(&result, "ACCEPT", Some(false));
        let result = trace(Packet::udp(Origin::Remote, "10.244.3.4", "172.30.0.41:80"));
        assert_flow(&result, "ACCEPT", Some(false));
        let result = trace(Packet::tcp(Origin::Remote, "10.244.3.4", "192.168.0.10:22"));
        assert_flow(&result, "ACCEPT", Some(false));
    }

    #[test]
    fn session_affinity_with_unknown_history_explores_every_endpoint() {
        let result = trace(Packet::udp(Origin::Remote, "10.244.3.4", "172.30.0.42:53"));
        assert_flow(&result, "10.244.1.5:53, 10.244.2.6:53", Some(false));
        // Two --rcheck hits, then the two random choices.
        assert_eq!(result.paths.len(), 4, "paths:\n{}", result.explain());
        let first = result.first_trace();
        let rcheck = first
            .iter()
            .find(|step| step.rule.contains("--rcheck"))
            .expect("rcheck met");
        assert_eq!(rcheck.branch, Branch::AssumedMatch);
        assert!(rcheck.rule.contains("--name KPROXY-SEP-DNS1"), "{rcheck}");
    }

    #[test]
    fn session_affinity_with_known_history_sticks_to_the_recorded_endpoint() {
        let rules = ruleset();
        let packet = Packet::udp(Origin::Remote, "10.244.3.4", "172.30.0.42:53");
        let client = packet.src;
        let seen = RecentHistory::Known([("KPROXY-SEP-DNS2".to_string(), client)].into());
        let result = rules
            .tracer(node())
            .with_recent(seen)
            .trace(&packet)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_flow(&result, "10.244.2.6:53", Some(false));

        let fresh = RecentHistory::Known(BTreeSet::new());
        let result = rules
            .tracer(node())
            .with_recent(fresh)
            .trace(&packet)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_flow(&result, "10.244.1.5:53, 10.244.2.6:53", Some(false));
        assert_eq!(
            result.paths.len(),
            2,
            "only the random choice forks:\n{}",
            result.explain()
        );
    }

    #[test]
    fn trace_lists_the_rules_of_each_path_with_their_lines() {
        let result = trace(Packet::tcp(Origin::Remote, "10.244.3.4", "172.30.0.41:80"));
        let steps = result.first_trace();
        let statistic = line_of(RULES, "-> 10.244.1.2:8080\" -m statistic");
        let dnat = line_of(RULES, "--to-destination 10.244.1.2:8080");
        let lines: Vec<Option<usize>> = steps
            .iter()
            .filter(|s| s.hook == Hook::Prerouting)
            .map(|s| s.line)
            .collect();
        let services = line_of(
            RULES,
            "\"ns1/web:http cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j",
        );
        let jump = line_of(JUMPS, "-A PREROUTING");
        assert_eq!(lines, [jump, services, statistic, dnat], "{}", result.explain());
        assert_eq!(steps[2].branch, Branch::AssumedMatch);
        assert_eq!(steps[2].table, Table::Nat);
        // The first path leaves through POSTROUTING's RETURN for unmarked packets.
        let last = steps.last().expect("steps");
        assert_eq!(
            (last.hook, last.rule.as_str()),
            (
                Hook::Postrouting,
                "-A KPROXY-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN"
            )
        );

        let second = &result.paths[1];
        assert_eq!(second.outcome, outcome("10.244.2.3:8080", false));
        assert_eq!(second.steps[2].branch, Branch::AssumedNoMatch);
        assert!(
            result.explain().contains("  [assumed not to match]"),
            "{}",
            result.explain()
        );
    }

    #[test]
    fn builtin_jumps_can_be_appended_as_arguments() {
        let mut rules = Ruleset::parse(RULES).unwrap_or_else(|e| panic!("{e}"));
        let jumps: [(Table, &str, &[&str]); 3] = [
            (
                Table::Nat,
                "PREROUTING",
                &[
                    "-m",
                    "comment",
                    "--comment",
                    "kproxy service portals",
                    "-j",
                    "KPROXY-SERVICES",
                ],
            ),
            (Table::Nat, "POSTROUTING", &["-j", "KPROXY-POSTROUTING"]),
            (Table::Filter, "FORWARD", &["-j", "KPROXY-FORWARD"]),
        ];
        for (table, chain, args) in jumps {
            rules.append(table, chain, args).unwrap_or_else(|e| panic!("{e}"));
        }
        let result = trace_in(
            &rules,
            &Packet::tcp(Origin::Remote, "203.0.113.9", "192.168.0.10:30080"),
        );
        assert_flow(&result, "10.244.1.2:8080, 10.244.2.3:8080", Some(true));
        let first = &result.first_trace()[0];
        assert_eq!(first.line, None);
        assert_eq!(
            first.rule,
            r#"-A PREROUTING -m comment --comment "kproxy service portals" -j KPROXY-SERVICES"#
        );
        assert_eq!(first.to_string(), format!("nat PREROUTING: {}", first.rule));

        let err = rules
            .append(Table::Nat, "PREROUTING", &["-j", "KPROXY-NOPE"])
            .expect_err("undeclared");
        assert_eq!((err.kind, err.line), (ErrorKind::Rejected, None));
    }

    #[test]
    fn insert_puts_the_rule_at_its_position() {
        let mut rules = Ruleset::new();
        rules
            .append(Table::Filter, "FORWARD", &["-j", "DROP"])
            .unwrap_or_else(|e| panic!("{e}"));
        let packet = Packet::tcp(Origin::Remote, "10.0.0.1", "10.0.0.2:80");
        assert_flow(&trace_in(&rules, &packet), "DROP", Some(false));
        let filter: Table = "filter".parse().expect("known table");
        rules
            .insert(filter, "FORWARD", 1, &["-p", "tcp", "-j", "REJECT"])
            .unwrap_or_else(|e| panic!("{e}"));
        let result = trace_in(&rules, &packet);
        assert_flow(&result, "REJECT", Some(false));
        assert_eq!(result.first_trace()[0].rule, "-I FORWARD 1 -p tcp -j REJECT");

        let err = rules
            .insert(Table::Filter, "FORWARD", 4, &["-j", "ACCEPT"])
            .expect_err("past the end");
        assert_eq!((err.kind, err.line), (ErrorKind::Rejected, None));
        assert!("mangle".parse::<Table>().is_err());
    }

    #[test]
    fn redeclaring_a_chain_flushes_it_and_stale_chains_are_deleted() {
        let mut rules = ruleset();
        rules
            .restore(
                r#"*nat
:KPROXY-SVC-WEB - [0:0]
:KPROXY-SEP-WEB1 - [0:0]
-A KPROXY-SVC-WEB -m comment --comment "ns1/web:http -> 10.244.2.3:8080" -j KPROXY-SEP-WEB2
-X KPROXY-SEP-WEB1
COMMIT
"#,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let result = trace_in(&rules, &Packet::tcp(Origin::Remote, "10.244.3.4", "172.30.0.41:80"));
        assert_flow(&result, "10.244.2.3:8080", Some(false));
        // Declaring a builtin chain keeps its rules: the jumps still work after a full restore.
        rules
            .restore(&RULES.replace("*nat\n", "*nat\n:PREROUTING ACCEPT [0:0]\n"))
            .unwrap_or_else(|e| panic!("{e}"));
        let result = trace_in(&rules, &Packet::tcp(Origin::Remote, "10.244.3.4", "172.30.0.41:80"));
        assert_flow(&result, "10.244.1.2:8080, 10.244.2.3:8080", Some(false));
    }

    #[test]
    fn a_failed_restore_changes_nothing() {
        let mut rules = ruleset();
        let err = rules
            .restore("*nat\n:KPROXY-SVC-WEB - [0:0]\nCOMMIT\n*filter\n-A FORWARD -j NOWHERE\nCOMMIT\n")
            .expect_err("undeclared chain");
        assert_eq!((err.kind, err.line), (ErrorKind::Rejected, Some(5)));
        let result = trace_in(&rules, &Packet::tcp(Origin::Remote, "10.244.3.4", "172.30.0.41:80"));
        assert_flow(&result, "10.244.1.2:8080, 10.244.2.3:8080", Some(false));
    }

    #[test]
    fn options_the_tracer_does_not_model_are_errors_naming_the_line() {
        let cases = [
            "-A KPROXY-SERVICES -m set --match-set KPROXY-LB dst,dst -j ACCEPT",
            "-A KPROXY-SERVICES -p tcp -m tcp --sport 80 -j ACCEPT",
            "-A KPROXY-SERVICES -p tcp -m multiport --dports 80,443 -j ACCEPT",
            "-A KPROXY-SERVICES -p tcp --dport 80:90 -j ACCEPT",
            "-A KPROXY-SERVICES -p icmp -j ACCEPT",
            "-A KPROXY-SERVICES -m addrtype --dst-type UNICAST -j ACCEPT",
            "-A KPROXY-SERVICES -m statistic --mode nth --every 2 -j ACCEPT",
            "-A KPROXY-SERVICES -m recent --name X --update -j ACCEPT",
            "-A KPROXY-SERVICES -j LOG --log-prefix x",
            "-A KPROXY-SERVICES -j ACCEPT --log-prefix x",
            "-A KPROXY-SERVICES -s 10.0.0.1,10.0.0.2 -j ACCEPT",
            "-A KPROXY-SERVICES -4 -j ACCEPT",
            "-F KPROXY-SERVICES",
        ];
        for rule in cases {
            let input = format!("*filter\n:KPROXY-SERVICES - [0:0]\n{rule}\nCOMMIT\n");
            let err = Ruleset::parse(&input).expect_err(rule);
            assert_eq!(
                (err.kind, err.line, err.text.as_str()),
                (ErrorKind::Unsupported, Some(3), rule),
                "{err}"
            );
            assert!(
                err.to_string().starts_with("line 3: not supported by the tracer: "),
                "{err}"
            );
        }
        let err = Ruleset::parse("*mangle\nCOMMIT\n").expect_err("mangle");
        assert_eq!((err.kind, err.line), (ErrorKind::Unsupported, Some(1)));
    }

    #[test]
    fn input_the_kernel_would_refuse_is_rejected() {
        let long_name = "KPROXY-SVC-ABCDEFGHIJKLMNOPQRSTU";
        let long_comment = format!("-A X -m comment --comment \"{}\"", "c".repeat(256));
        let cases: Vec<(&str, String, usize)> = vec![
            ("undeclared chain", "*filter\n-A FORWARD -j X2\nCOMMIT".into(), 2),
            ("rule in undeclared chain", "*filter\n-A X2 -j ACCEPT\nCOMMIT".into(), 2),
            (
                "DNAT in filter",
                "*filter\n-A X -p tcp -j DNAT --to-destination 10.0.0.1:80\nCOMMIT".into(),
                3,
            ),
            ("REJECT in nat", "*nat\n:X - [0:0]\n-A X -j REJECT\nCOMMIT".into(), 3),
            (
                "MASQUERADE before routing",
                "*nat\n:X - [0:0]\n-A PREROUTING -j X\n-A X -j MASQUERADE\nCOMMIT".into(),
                4,
            ),
            (
                "DNAT after routing",
                "*nat\n:X - [0:0]\n-A X -j DNAT --to-destination 10.0.0.1\n-A POSTROUTING -j X\nCOMMIT".into(),
                3,
            ),
            (
                "loop",
                "*filter\n:X - [0:0]\n:Y - [0:0]\n-A X -j Y\n-A Y -g X\n-A INPUT -j X\nCOMMIT".into(),
                5,
            ),
            (
                "delete referenced",
                "*filter\n:X - [0:0]\n-A INPUT -j X\n-X X\nCOMMIT".into(),
                4,
            ),
            (
                "delete non-empty",
                "*filter\n:X - [0:0]\n-A X -j ACCEPT\n-X X\nCOMMIT".into(),
                4,
            ),
            ("delete builtin", "*filter\n-X INPUT\nCOMMIT".into(), 2),
            ("long chain name", format!("*filter\n:{long_name} - [0:0]\nCOMMIT"), 2),
            (
                "long comment",
                format!("*filter\n:X - [0:0]\n{long_comment}\nCOMMIT"),
                3,
            ),
            (
                "tcp match without -p tcp",
                "*filter\n:X - [0:0]\n-A X -m tcp --dport 80 -j ACCEPT\nCOMMIT".into(),
                3,
            ),
            (
                "jump to builtin",
                "*filter\n:X - [0:0]\n-A X -j INPUT\nCOMMIT".into(),
                3,
            ),
            ("DROP in nat", "*nat\n:X - [0:0]\n-A X -j DROP\nCOMMIT".into(), 3),
            ("DROP policy in nat", "*nat\n:PREROUTING DROP [0:0]\nCOMMIT".into(), 2),
            (
                "mixed families",
                "*filter\n:X - [0:0]\n-A X -s 10.0.0.0/8 -j ACCEPT\n-A X -d fd00::/8 -j ACCEPT\nCOMMIT".into(),
                4,
            ),
        ];
        for (name, input, line) in cases {
            let input = input.replace("\n-A X -p tcp -j DNAT", "\n:X - [0:0]\n-A X -p tcp -j DNAT");
            let err = Ruleset::parse(&input).expect_err(name);
            assert_eq!((err.kind, err.line), (ErrorKind::Rejected, Some(line)), "{name}: {err}");
        }
    }

    #[test]
    fn malformed_input_is_a_syntax_error() {
        let cases = [
            ("no commit", "*filter\n:X - [0:0]\n", 1),
            ("rule outside table", "-A INPUT -j ACCEPT\n", 1),
            (
                "unterminated quote",
                "*filter\n-A INPUT -m comment --comment \"oops -j ACCEPT\nCOMMIT",
                2,
            ),
            ("missing value", "*filter\n-A INPUT -s\nCOMMIT", 2),
            (
                "twice",
                "*filter\n-A INPUT -s 10.0.0.1 -s 10.0.0.2 -j ACCEPT\nCOMMIT",
                2,
            ),
            (
                "dport without proto",
                "*filter\n-A INPUT --dport 80 -j ACCEPT\nCOMMIT",
                2,
            ),
            ("user chain policy", "*filter\n:X ACCEPT [0:0]\nCOMMIT", 2),
            ("mark with mask", "*nat\n-A OUTPUT -j MARK --or-mark 0x1/0x1\nCOMMIT", 2),
            ("DNAT without address", "*nat\n-A OUTPUT -p tcp -j DNAT\nCOMMIT", 2),
            (
                "recent set and rcheck",
                "*nat\n-A OUTPUT -m recent --set --rcheck -j ACCEPT\nCOMMIT",
                2,
            ),
            ("dangling !", "*nat\n-A OUTPUT -j ACCEPT !\nCOMMIT", 2),
            ("two tables open", "*nat\n*filter\nCOMMIT", 2),
        ];
        for (name, input, line) in cases {
            let err = Ruleset::parse(input).expect_err(name);
            assert_eq!((err.kind, err.line), (ErrorKind::Syntax, Some(line)), "{name}: {err}");
        }
    }

    #[test]
    fn quoted_arguments_follow_iptables_restore() {
        let tokens = tokenize(r#"-A X -m comment --comment "say \"hi\" \\ now" -j "A B""#).expect("valid");
        assert_eq!(
            tokens,
            [
                "-A",
                "X",
                "-m",
                "comment",
                "--comment",
                r#"say "hi" \ now"#,
                "-j",
                "A B"
            ]
        );
        assert_eq!(
            tokenize(r#"--comment a\b """#).expect("valid"),
            ["--comment", r"a\b", ""]
        );
        assert_eq!(quote(r#"say "hi""#), r#""say \"hi\"""#);
        assert_eq!(quote("plain"), "plain");
    }

    #[test]
    fn marks_use_value_and_mask() {
        let rules = Ruleset::parse(
            "*filter
:M - [0:0]
-A OUTPUT -j M
-A OUTPUT -m mark --mark 0xf03 -j REJECT
-A OUTPUT -j DROP
-A M -j MARK --set-xmark 0x10/0xff
-A M -m mark ! --mark 0xf10 -j RETURN
-A M -j MARK --and-mark 0xff00
-A M -j MARK --set-mark 0x3/0xf
-A M -m mark --mark 0x3/0x3 -j RETURN
-A M -j DROP
COMMIT",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // 0xf0f -> set-xmark 0x10/0xff: 0xf10 -> and 0xff00: 0xf00 -> set-mark 0x3/0xf: 0xf03.
        let packet = Packet::tcp(Origin::Local, "10.0.0.1", "10.0.0.2:80").with_mark(0xf0f);
        assert_flow(&trace_in(&rules, &packet), "REJECT", Some(false));
        assert_flow(&trace_in(&rules, &packet.clone().with_mark(0)), "DROP", Some(false));
    }

    #[test]
    fn goto_returns_to_the_caller_of_the_chain_that_jumped() {
        let rules = Ruleset::parse(
            "*filter
:A - [0:0]
:B - [0:0]
-A FORWARD -j A
-A FORWARD -j REJECT
-A A -g B
-A A -j DROP
-A B -j RETURN
COMMIT",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let packet = Packet::tcp(Origin::Remote, "10.0.0.1", "10.0.0.2:80");
        assert_flow(&trace_in(&rules, &packet), "REJECT", Some(false));
    }

    #[test]
    fn interfaces_match_by_name_or_prefix_and_never_when_unknown() {
        let rules = Ruleset::parse(
            "*filter
-A FORWARD -i eth0 -j DROP
-A FORWARD -i cali+ -j REJECT
-A FORWARD ! -o eth1 -j DROP
COMMIT",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let packet = Packet::sctp(Origin::Remote, "10.0.0.1", "10.0.0.2:9");
        assert_flow(&trace_in(&rules, &packet), "ACCEPT", Some(false));
        assert_flow(
            &trace_in(&rules, &packet.clone().with_in_iface("eth0")),
            "DROP",
            Some(false),
        );
        assert_flow(
            &trace_in(&rules, &packet.clone().with_in_iface("cali12ab")),
            "REJECT",
            Some(false),
        );
        assert_flow(
            &trace_in(&rules, &packet.clone().with_out_iface("eth1")),
            "ACCEPT",
            Some(false),
        );
        assert_flow(
            &trace_in(&rules, &packet.clone().with_out_iface("eth2")),
            "DROP",
            Some(false),
        );
    }

    #[test]
    fn filter_sees_the_dnat_and_builtin_policies_apply() {
        let rules = Ruleset::parse(
            "*nat
-A PREROUTING -d 10.0.0.1 -p sctp -m sctp --dport 9 -j DNAT --to-destination 10.0.0.2
COMMIT
*filter
:FORWARD DROP [0:0]
-A FORWARD -m conntrack --ctstate DNAT -d 10.0.0.2 -p sctp -m sctp ! --dport 10 -j ACCEPT
COMMIT",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let packet = Packet::sctp(Origin::Remote, "10.1.0.1", "10.0.0.1:9");
        assert_flow(&trace_in(&rules, &packet), "10.0.0.2:9", Some(false));
        let direct = Packet::sctp(Origin::Remote, "10.1.0.1", "10.0.0.2:9");
        assert_flow(&trace_in(&rules, &direct), "DROP", Some(false));
    }

    #[test]
    fn ipv6_rules_trace_ipv6_packets_only() {
        let rules = Ruleset::parse(
            "*nat
:KPROXY-SEP-V6 - [0:0]
-A PREROUTING -d fd00:30::41/128 -p tcp -m tcp --dport 80 -j KPROXY-SEP-V6
-A KPROXY-SEP-V6 -m recent --name KPROXY-SEP-V6 --mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --set --rsource -p tcp -j DNAT --to-destination [fd00:244::5]:8080
COMMIT",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let packet = Packet::tcp(Origin::Remote, "fd00:244::9", "[fd00:30::41]:80");
        let result = trace_in(&rules, &packet);
        assert_flow(&result, "[fd00:244::5]:8080", Some(false));
        assert_eq!(result.endpoints(), BTreeSet::from(["[fd00:244::5]:8080".to_string()]));

        let err = rules
            .tracer(node())
            .trace(&Packet::tcp(Origin::Remote, "10.0.0.1", "10.0.0.2:80"));
        let err = err.expect_err("IPv4 packet through IPv6 rules");
        assert_eq!((err.kind, err.line), (ErrorKind::Packet, None));
        assert!(
            err.to_string().contains("the rules are IPv6, the packet is IPv4"),
            "{err}"
        );
    }

    #[test]
    fn recent_set_is_seen_by_a_later_rcheck_of_the_same_packet() {
        let rules = Ruleset::parse(
            "*nat
-A OUTPUT -m recent --name L --set
-A OUTPUT -m recent --name L --rcheck --seconds 5 -j DNAT --to-destination 10.0.0.9:1
COMMIT",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let packet = Packet::tcp(Origin::Local, "10.0.0.1", "10.0.0.2:80");
        let result = trace_in(&rules, &packet);
        assert_flow(&result, "10.0.0.9:1", Some(false));
        assert_eq!(result.paths.len(), 1, "{}", result.explain());
    }
}
