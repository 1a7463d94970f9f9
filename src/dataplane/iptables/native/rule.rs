//! iptables-restore input (the subset kproxy renders) parsed into table operations, and each
//! rule encoded as the kernel's `ipt_entry`/`ip6t_entry` with its matches and target, byte for
//! byte as iptables-legacy 1.8.9 encodes the same options. Pure.
//!
//! Anything outside the subset is [`Parse::Unsupported`]: the caller hands the whole input to
//! iptables-restore instead, so nothing here ever guesses an encoding.

use std::net::IpAddr;

use ipnet::IpNet;

use super::layout::{put_name, put_u16, put_u32, xt_align, Family, STANDARD_TARGET_SIZE};

/// Why an input is not written natively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// Valid for iptables-restore, perhaps, but not something this encoder knows: fall back.
    Unsupported { line: usize, why: String },
    /// Wrong whatever writes it (iptables-restore would refuse it too): report, do not retry.
    Invalid { line: usize, why: String },
}

impl std::fmt::Display for Parse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Parse::Unsupported { line, why } => write!(f, "line {line}: not written natively: {why}"),
            Parse::Invalid { line, why } => write!(f, "line {line}: {why}"),
        }
    }
}

type Result<T> = std::result::Result<T, Parse>;

/// One `*table ... COMMIT` block: what it does to the table, in input order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInput {
    pub table: String,
    pub ops: Vec<Op>,
    /// The COMMIT line, which a refusal of the kernel names (as iptables-restore does).
    pub commit_line: usize,
}

/// What one input line does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `:NAME - [0:0]`: create the user chain, or flush it if it exists (`--noflush`).
    Declare { chain: String, line: usize },
    /// `-A CHAIN ...`: append a rule.
    Append { chain: String, rule: Rule, line: usize },
    /// `-I CHAIN 1 ...`: insert a rule first.
    InsertFirst { chain: String, rule: Rule, line: usize },
    /// `-X CHAIN`: delete an empty, unreferenced user chain.
    Delete { chain: String, line: usize },
}

/// A rule encoded up to its verdict: a jump's target offset is known only once the table is
/// laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The whole entry; for a jump, a standard target whose verdict is patched at layout.
    pub bytes: Vec<u8>,
    pub verdict: Verdict,
}

/// How a rule's standard target (if it has one) gets its verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// An extension target, or a standard one already complete.
    Fixed,
    /// Jump to this user chain's first rule.
    Jump(String),
    /// No target: fall through to the next entry (libiptc's encoding: a jump to the next entry).
    Fallthrough,
}

/// Chain names the kernel accepts (XT_EXTENSION_MAXNAMELEN 29 plus the NUL).
pub const MAX_CHAIN_NAME: usize = 28;

/// Parses an iptables-restore input for `family`.
pub fn parse_input(family: Family, text: &str) -> Result<Vec<TableInput>> {
    let mut tables = Vec::new();
    let mut current: Option<TableInput> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let unsupported = |why: &str| Parse::Unsupported {
            line,
            why: why.to_string(),
        };
        if let Some(table) = l.strip_prefix('*') {
            if current.is_some() {
                return Err(Parse::Invalid {
                    line,
                    why: "table without COMMIT".into(),
                });
            }
            current = Some(TableInput {
                table: table.to_string(),
                ops: Vec::new(),
                commit_line: 0,
            });
            continue;
        }
        let Some(t) = current.as_mut() else {
            return Err(Parse::Invalid {
                line,
                why: "a line outside a table".into(),
            });
        };
        if l == "COMMIT" {
            let mut t = current.take().expect("checked above");
            t.commit_line = line;
            tables.push(t);
            continue;
        }
        if let Some(decl) = l.strip_prefix(':') {
            let mut words = decl.split_whitespace();
            let chain = words.next().unwrap_or_default();
            let policy = words.next();
            if policy != Some("-") {
                return Err(unsupported("a built-in chain's policy"));
            }
            check_chain_name(chain, line)?;
            t.ops.push(Op::Declare {
                chain: chain.to_string(),
                line,
            });
            continue;
        }
        let words = tokenize(l).ok_or_else(|| unsupported("quoting other than plain double quotes"))?;
        match words.first().map(String::as_str) {
            Some("-A") if words.len() >= 2 => {
                let rule = encode_rule(family, &words[2..]).map_err(|why| why.at(line))?;
                t.ops.push(Op::Append {
                    chain: words[1].clone(),
                    rule,
                    line,
                });
            }
            Some("-I") if words.len() >= 3 && words[2] == "1" => {
                let rule = encode_rule(family, &words[3..]).map_err(|why| why.at(line))?;
                t.ops.push(Op::InsertFirst {
                    chain: words[1].clone(),
                    rule,
                    line,
                });
            }
            Some("-X") if words.len() == 2 => t.ops.push(Op::Delete {
                chain: words[1].clone(),
                line,
            }),
            _ => {
                return Err(unsupported(
                    "a command other than -A, -I CHAIN 1, -X or a chain declaration",
                ))
            }
        }
    }
    if current.is_some() {
        return Err(Parse::Invalid {
            line: text.lines().count(),
            why: "COMMIT expected".into(),
        });
    }
    Ok(tables)
}

fn check_chain_name(chain: &str, line: usize) -> Result<()> {
    if chain.is_empty() || chain.len() > MAX_CHAIN_NAME || chain.starts_with('-') || chain.contains(char::is_whitespace)
    {
        return Err(Parse::Invalid {
            line,
            why: format!("invalid chain name `{chain}'"),
        });
    }
    Ok(())
}

/// Splits a rule line into words: whitespace separates them, double quotes group them. A
/// backslash or a single quote is left to iptables-restore (`None`): kproxy's names and
/// comments never hold one.
fn tokenize(line: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '\\' | '\'' => return None,
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return None;
    }
    if in_word {
        words.push(word);
    }
    Some(words)
}

/// Why one rule is not encoded, before the line is known.
#[derive(Debug)]
pub enum RuleError {
    Unsupported(String),
    Invalid(String),
}

impl RuleError {
    fn at(self, line: usize) -> Parse {
        match self {
            RuleError::Unsupported(why) => Parse::Unsupported { line, why },
            RuleError::Invalid(why) => Parse::Invalid { line, why },
        }
    }
}

fn unsupported<T>(why: impl Into<String>) -> std::result::Result<T, RuleError> {
    Err(RuleError::Unsupported(why.into()))
}

fn invalid<T>(why: impl Into<String>) -> std::result::Result<T, RuleError> {
    Err(RuleError::Invalid(why.into()))
}

/// The `ipt_ip`/`ip6t_ip6` part of a rule.
#[derive(Debug, Default)]
struct IpPart {
    src: Option<(IpNet, bool)>,
    dst: Option<(IpNet, bool)>,
    iniface: Option<(String, bool)>,
    outiface: Option<(String, bool)>,
    proto: Option<u8>,
}

/// One match being built: its name, revision and data (before XT_ALIGN).
struct Match {
    name: &'static str,
    revision: u8,
    data: Vec<u8>,
}

/// Encodes the words after `-A CHAIN` into an entry.
pub fn encode_rule(family: Family, words: &[String]) -> std::result::Result<Rule, RuleError> {
    let mut ip = IpPart::default();
    let mut pending: Vec<(&str, Vec<String>)> = Vec::new();
    let mut target: Option<(Vec<u8>, Verdict)> = None;
    let mut i = 0;
    let mut negate = false;
    let arg = |i: usize| -> std::result::Result<&str, RuleError> {
        match words.get(i) {
            Some(w) => Ok(w.as_str()),
            None => invalid(format!("option {} needs an argument", words[i - 1])),
        }
    };
    while i < words.len() {
        let w = words[i].as_str();
        if w == "!" {
            if negate {
                return invalid("double negation");
            }
            negate = true;
            i += 1;
            continue;
        }
        let neg = std::mem::take(&mut negate);
        if target.is_some() && !w.starts_with("--") {
            return unsupported(format!("option {w} after the target"));
        }
        match w {
            "-s" | "--source" | "-d" | "--destination" => {
                let net = parse_net(family, arg(i + 1)?)?;
                let slot = if w.starts_with("-s") || w == "--source" {
                    &mut ip.src
                } else {
                    &mut ip.dst
                };
                if slot.replace((net, neg)).is_some() {
                    return invalid(format!("{w} given twice"));
                }
                i += 2;
            }
            "-i" | "--in-interface" | "-o" | "--out-interface" => {
                let name = arg(i + 1)?;
                if name.is_empty() || name.len() > 15 {
                    return invalid(format!("invalid interface name `{name}'"));
                }
                let slot = if w == "-i" || w == "--in-interface" {
                    &mut ip.iniface
                } else {
                    &mut ip.outiface
                };
                slot.replace((name.to_string(), neg));
                i += 2;
            }
            "-p" | "--protocol" => {
                if neg {
                    return unsupported("! -p");
                }
                ip.proto = Some(match arg(i + 1)? {
                    "tcp" => 6,
                    "udp" => 17,
                    "sctp" => 132,
                    other => return unsupported(format!("protocol {other}")),
                });
                i += 2;
            }
            "-m" | "--match" => {
                if neg {
                    return invalid("! -m");
                }
                let name = arg(i + 1)?;
                i += 2;
                // Its options may come anywhere after it (iptables parses the line with one
                // getopt table for everything loaded): gathered below, encoded at the end.
                pending.push((name, Vec::new()));
            }
            "-j" | "--jump" => {
                if neg {
                    return invalid("! -j");
                }
                let name = arg(i + 1)?;
                i += 2;
                let start = i;
                while i < words.len() {
                    i += 1;
                }
                target = Some(encode_target(family, name, &words[start..i])?);
            }
            "-g" | "--goto" => return unsupported("-g"),
            other => {
                // A loaded match's option. (tcp/udp's --dport without `-m tcp` would load the
                // protocol's match implicitly: kproxy always names it.)
                let Some((_, opts)) = pending.iter_mut().find(|(m, _)| match_takes(m, other)) else {
                    return unsupported(format!("option {other}"));
                };
                if neg {
                    opts.push("!".to_string());
                }
                opts.push(other.to_string());
                i += 1;
                while i < words.len() && !words[i].starts_with('-') && words[i] != "!" {
                    opts.push(words[i].clone());
                    i += 1;
                }
            }
        }
    }
    if negate {
        return invalid("`!' at the end of the rule");
    }
    let mut matches = Vec::new();
    for (name, opts) in &pending {
        matches.push(encode_match(family, name, opts)?);
    }
    for m in &matches {
        let needs = match m.name {
            "tcp" => 6,
            "udp" => 17,
            _ => continue,
        };
        if ip.proto != Some(needs) {
            // iptables refuses `-m tcp` without `-p tcp`: leave the wording to it.
            return unsupported(format!("-m {} without -p {}", m.name, m.name));
        }
    }
    let (target_bytes, verdict) = match target {
        Some(t) => t,
        None => (standard_target(0), Verdict::Fallthrough),
    };
    let entry_size = family.entry_size();
    let matches_size: usize = matches.iter().map(|m| 32 + xt_align(m.data.len())).sum();
    let target_offset = entry_size + matches_size;
    let next_offset = target_offset + target_bytes.len();
    if next_offset > u16::MAX as usize {
        return invalid("rule too large");
    }
    let mut bytes = vec![0u8; next_offset];
    family.put_ip(&mut bytes, &ip_fields(&ip))?;
    put_u16(&mut bytes, family.target_offset_at(), target_offset as u16);
    put_u16(&mut bytes, family.next_offset_at(), next_offset as u16);
    let mut at = entry_size;
    for m in &matches {
        let size = 32 + xt_align(m.data.len());
        put_u16(&mut bytes, at, size as u16);
        put_name(&mut bytes[at + 2..at + 31], m.name);
        bytes[at + 31] = m.revision;
        bytes[at + 32..at + 32 + m.data.len()].copy_from_slice(&m.data);
        at += size;
    }
    bytes[target_offset..].copy_from_slice(&target_bytes);
    Ok(Rule { bytes, verdict })
}

/// Whether `option` belongs to match `name` (so the match's options end before it).
fn match_takes(name: &str, option: &str) -> bool {
    let known: &[&str] = match name {
        "comment" => &["--comment"],
        "tcp" | "udp" => &["--dport", "--destination-port", "--sport", "--source-port"],
        "addrtype" => &["--src-type", "--dst-type"],
        "statistic" => &["--mode", "--probability"],
        "recent" => &[
            "--name",
            "--mask",
            "--rsource",
            "--set",
            "--rcheck",
            "--seconds",
            "--reap",
        ],
        "nfacct" => &["--nfacct-name"],
        "mark" => &["--mark"],
        "conntrack" => &["--ctstate"],
        // Unknown match: take its options, encode_match refuses it by name.
        _ => return option.starts_with("--"),
    };
    known.contains(&option)
}

/// The ip part as the family's encoder takes it.
fn ip_fields(ip: &IpPart) -> super::layout::IpFields {
    let mut invflags = 0u8;
    if ip.iniface.as_ref().is_some_and(|(_, n)| *n) {
        invflags |= 0x01;
    }
    if ip.outiface.as_ref().is_some_and(|(_, n)| *n) {
        invflags |= 0x02;
    }
    if ip.src.as_ref().is_some_and(|(_, n)| *n) {
        invflags |= 0x08;
    }
    if ip.dst.as_ref().is_some_and(|(_, n)| *n) {
        invflags |= 0x10;
    }
    super::layout::IpFields {
        src: ip.src.map(|(n, _)| n),
        dst: ip.dst.map(|(n, _)| n),
        iniface: ip.iniface.as_ref().map(|(n, _)| n.clone()),
        outiface: ip.outiface.as_ref().map(|(n, _)| n.clone()),
        proto: ip.proto,
        invflags,
    }
}

fn parse_net(family: Family, s: &str) -> std::result::Result<IpNet, RuleError> {
    if s.contains(',') {
        return unsupported("a list of addresses");
    }
    let net: IpNet = match s.parse::<IpNet>() {
        Ok(n) => n,
        Err(_) => match s.parse::<IpAddr>() {
            Ok(a) => IpNet::from(a),
            Err(_) => return unsupported(format!("address `{s}'")),
        },
    };
    if family.matches(&net.addr()) {
        Ok(net)
    } else {
        invalid(format!("address `{s}' of the other family"))
    }
}

fn port(s: &str) -> std::result::Result<u16, RuleError> {
    match s.parse::<u16>() {
        Ok(p) => Ok(p),
        Err(_) => unsupported(format!("port `{s}'")),
    }
}

fn port_range(s: &str) -> std::result::Result<(u16, u16), RuleError> {
    match s.split_once(':') {
        Some((a, b)) => Ok((port(a)?, port(b)?)),
        None => {
            let p = port(s)?;
            Ok((p, p))
        }
    }
}

/// Encodes `-m name options...`.
fn encode_match(family: Family, name: &str, options: &[String]) -> std::result::Result<Match, RuleError> {
    let mut opts = Options::new(options);
    let m = match name {
        "comment" => {
            // struct xt_comment_info { char comment[256]; }
            let comment = opts
                .value("--comment")?
                .ok_or(RuleError::Invalid("-m comment needs --comment".into()))?;
            if comment.len() > 255 {
                return unsupported("a comment over 255 bytes");
            }
            let mut data = vec![0u8; 256];
            data[..comment.len()].copy_from_slice(comment.as_bytes());
            Match {
                name: "comment",
                revision: 0,
                data,
            }
        }
        "tcp" | "udp" => {
            let sport = match opts.value_either("--sport", "--source-port")? {
                Some(s) => port_range(s)?,
                None => (0, u16::MAX),
            };
            let dport = match opts.value_either("--dport", "--destination-port")? {
                Some(s) => port_range(s)?,
                None => (0, u16::MAX),
            };
            // struct xt_tcp { __u16 spts[2], dpts[2]; __u8 option, flg_mask, flg_cmp, invflags; }
            // struct xt_udp { __u16 spts[2], dpts[2]; __u8 invflags; } (10 with padding)
            let mut data = vec![0u8; if name == "tcp" { 12 } else { 10 }];
            put_u16(&mut data, 0, sport.0);
            put_u16(&mut data, 2, sport.1);
            put_u16(&mut data, 4, dport.0);
            put_u16(&mut data, 6, dport.1);
            Match {
                name: if name == "tcp" { "tcp" } else { "udp" },
                revision: 0,
                data,
            }
        }
        "addrtype" => {
            // Revision 1: struct xt_addrtype_info_v1 { __u16 source, dest; __u32 flags; }
            let mut data = vec![0u8; 8];
            let mut flags = 0u32;
            if let Some((t, neg)) = opts.value_neg("--src-type")? {
                put_u16(&mut data, 0, addr_type(t)?);
                if neg {
                    flags |= 1;
                }
            }
            if let Some((t, neg)) = opts.value_neg("--dst-type")? {
                put_u16(&mut data, 2, addr_type(t)?);
                if neg {
                    flags |= 2;
                }
            }
            put_u32(&mut data, 4, flags);
            Match {
                name: "addrtype",
                revision: 1,
                data,
            }
        }
        "statistic" => {
            if opts.value("--mode")? != Some("random") {
                return unsupported("statistic other than --mode random");
            }
            let p = opts
                .value("--probability")?
                .ok_or(RuleError::Invalid("--probability missing".into()))?;
            let p: f64 = match p.parse() {
                Ok(p) if (0.0..=1.0).contains(&p) => p,
                _ => return invalid(format!("invalid probability `{p}'")),
            };
            let prob = (p * 2147483648.0).round() as u32;
            // struct xt_statistic_info { __u16 mode, flags; union { random { __u32 probability; }
            // nth { __u32 every, packet, count; } } u; master pointer (kernel's) }: iptables
            // leaves the probability in nth.count too, so the encoding is the same bytes.
            let mut data = vec![0u8; 24];
            put_u32(&mut data, 4, prob);
            put_u32(&mut data, 12, prob);
            Match {
                name: "statistic",
                revision: 0,
                data,
            }
        }
        "recent" => {
            // Revision 1: struct xt_recent_mtinfo_v1 { __u32 seconds, hit_count; __u8 check_set,
            // invert; char name[200]; __u8 side; union nf_inet_addr mask; } (232 with padding).
            let mut data = vec![0u8; 228];
            let name = opts.value("--name")?.unwrap_or("DEFAULT");
            if name.is_empty() || name.len() >= 200 {
                return invalid(format!("invalid recent list name `{name}'"));
            }
            data[10..10 + name.len()].copy_from_slice(name.as_bytes());
            let mut check_set = 0u8;
            if opts.flag("--set")? {
                check_set |= 0x02;
            }
            if opts.flag("--rcheck")? {
                check_set |= 0x01;
            }
            if let Some(s) = opts.value("--seconds")? {
                let s: u32 = s
                    .parse()
                    .map_err(|_| RuleError::Invalid(format!("invalid --seconds `{s}'")))?;
                put_u32(&mut data, 0, s);
            }
            if opts.flag("--reap")? {
                check_set |= 0x20;
            }
            if check_set & 0x03 == 0 || check_set & 0x03 == 0x03 {
                return unsupported("recent without exactly one of --set, --rcheck");
            }
            data[8] = check_set;
            opts.flag("--rsource")?;
            // The mask: all ones unless given (libxt_recent's init).
            let mask = match opts.value("--mask")? {
                Some(m) => match m.parse::<IpAddr>() {
                    Ok(a) if family.matches(&a) => a,
                    _ => return unsupported(format!("--mask `{m}'")),
                },
                None => return unsupported("recent without --mask"),
            };
            match mask {
                IpAddr::V4(a) => data[212..216].copy_from_slice(&a.octets()),
                IpAddr::V6(a) => data[212..228].copy_from_slice(&a.octets()),
            }
            Match {
                name: "recent",
                revision: 1,
                data,
            }
        }
        "nfacct" => {
            // struct xt_nfacct_match_info { char name[32]; struct nf_acct *nfacct; } (aligned 8)
            let n = opts
                .value("--nfacct-name")?
                .ok_or(RuleError::Invalid("--nfacct-name missing".into()))?;
            if n.is_empty() || n.len() >= 32 {
                return invalid(format!("invalid nfacct name `{n}'"));
            }
            let mut data = vec![0u8; 40];
            data[..n.len()].copy_from_slice(n.as_bytes());
            Match {
                name: "nfacct",
                revision: 0,
                data,
            }
        }
        "mark" => {
            // Revision 1: struct xt_mark_mtinfo1 { __u32 mark, mask; __u8 invert; } (12)
            let (v, neg) = opts
                .value_neg("--mark")?
                .ok_or(RuleError::Invalid("--mark missing".into()))?;
            let (mark, mask) = value_mask(v)?;
            let mut data = vec![0u8; 12];
            put_u32(&mut data, 0, mark);
            put_u32(&mut data, 4, mask);
            data[8] = neg as u8;
            Match {
                name: "mark",
                revision: 1,
                data,
            }
        }
        "conntrack" => {
            // Revision 3: struct xt_conntrack_mtinfo3: eight union nf_inet_addr (128),
            // expires_min/max, l4proto, four ports, match_flags (at 146), invert_flags,
            // state_mask (at 150), status_mask, four high ports (164 with padding).
            let (states, neg) = opts
                .value_neg("--ctstate")?
                .ok_or(RuleError::Invalid("--ctstate missing".into()))?;
            let mut mask = 0u16;
            for state in states.split(',') {
                mask |= match state {
                    "INVALID" => 1 << 0,
                    "ESTABLISHED" => 1 << 1,
                    "RELATED" => 1 << 2,
                    "NEW" => 1 << 3,
                    "UNTRACKED" => 1 << 8,
                    "SNAT" => 1 << 6,
                    "DNAT" => 1 << 7,
                    other => return unsupported(format!("conntrack state {other}")),
                };
            }
            let mut data = vec![0u8; 164];
            put_u16(&mut data, 146, 1); // XT_CONNTRACK_STATE
            if neg {
                put_u16(&mut data, 148, 1);
            }
            put_u16(&mut data, 150, mask);
            Match {
                name: "conntrack",
                revision: 3,
                data,
            }
        }
        other => return unsupported(format!("match {other}")),
    };
    opts.finish()?;
    Ok(m)
}

/// `0x4000/0x4000` or `0x4000` (mask all ones), as iptables reads marks.
fn value_mask(s: &str) -> std::result::Result<(u32, u32), RuleError> {
    let num = |s: &str| -> std::result::Result<u32, RuleError> {
        let parsed = match s.strip_prefix("0x") {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => s.parse::<u32>(),
        };
        parsed.map_err(|_| RuleError::Unsupported(format!("mark `{s}'")))
    };
    match s.split_once('/') {
        Some((v, m)) => Ok((num(v)?, num(m)?)),
        None => Ok((num(s)?, u32::MAX)),
    }
}

/// XT_ADDRTYPE_* bit of one type name (1 << RTN_*).
fn addr_type(t: &str) -> std::result::Result<u16, RuleError> {
    const TYPES: [&str; 12] = [
        "UNSPEC",
        "UNICAST",
        "LOCAL",
        "BROADCAST",
        "ANYCAST",
        "MULTICAST",
        "BLACKHOLE",
        "UNREACHABLE",
        "PROHIBIT",
        "THROW",
        "NAT",
        "XRESOLVE",
    ];
    match TYPES.iter().position(|n| *n == t) {
        Some(i) => Ok(1 << i),
        None => unsupported(format!("address type `{t}'")),
    }
}

/// A standard target with a verdict (`-2` ACCEPT, `-1` DROP, `-5` RETURN, or an offset).
pub fn standard_target(verdict: i32) -> Vec<u8> {
    let mut t = vec![0u8; STANDARD_TARGET_SIZE];
    put_u16(&mut t, 0, STANDARD_TARGET_SIZE as u16);
    put_u32(&mut t, 32, verdict as u32);
    t
}

/// Encodes `-j name options...`.
fn encode_target(family: Family, name: &str, options: &[String]) -> std::result::Result<(Vec<u8>, Verdict), RuleError> {
    let mut opts = Options::new(options);
    let fixed = |verdict: i32| (standard_target(verdict), Verdict::Fixed);
    let extension = |name: &str, revision: u8, data: Vec<u8>| {
        let size = 32 + xt_align(data.len());
        let mut t = vec![0u8; size];
        put_u16(&mut t, 0, size as u16);
        put_name(&mut t[2..31], name);
        t[31] = revision;
        t[32..32 + data.len()].copy_from_slice(&data);
        (t, Verdict::Fixed)
    };
    let out = match name {
        "ACCEPT" => fixed(-2),
        "DROP" => fixed(-1),
        "RETURN" => fixed(-5),
        "DNAT" => {
            let to = opts
                .value("--to-destination")?
                .ok_or(RuleError::Invalid("DNAT needs --to-destination".into()))?;
            let (addr, port) = parse_ip_port(family, to)?;
            // Revision 2: struct nf_nat_range2 { unsigned int flags; union nf_inet_addr min_addr,
            // max_addr; union nf_conntrack_man_proto min_proto, max_proto, base_proto; } (44)
            let mut data = vec![0u8; 44];
            let mut flags = 1u32; // NF_NAT_RANGE_MAP_IPS
            let octets: Vec<u8> = match addr {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            data[4..4 + octets.len()].copy_from_slice(&octets);
            data[20..20 + octets.len()].copy_from_slice(&octets);
            if let Some(p) = port {
                flags |= 2; // NF_NAT_RANGE_PROTO_SPECIFIED
                data[36..38].copy_from_slice(&p.to_be_bytes());
                data[38..40].copy_from_slice(&p.to_be_bytes());
            }
            put_u32(&mut data, 0, flags);
            extension("DNAT", 2, data)
        }
        "MASQUERADE" => {
            let mut flags = 0u32;
            if opts.flag("--random-fully")? {
                flags |= 0x10; // NF_NAT_RANGE_PROTO_RANDOM_FULLY
            }
            match family {
                // Revision 0 (IPv4): struct nf_nat_ipv4_multi_range_compat { unsigned int
                // rangesize; struct nf_nat_ipv4_range range[1] { flags, min_ip, max_ip, min, max } }
                Family::V4 => {
                    let mut data = vec![0u8; 20];
                    put_u32(&mut data, 0, 1);
                    put_u32(&mut data, 4, flags);
                    extension("MASQUERADE", 0, data)
                }
                // Revision 0 (IPv6): struct nf_nat_range { flags; min_addr, max_addr; min_proto, max_proto }
                Family::V6 => {
                    let mut data = vec![0u8; 40];
                    put_u32(&mut data, 0, flags);
                    extension("MASQUERADE", 0, data)
                }
            }
        }
        "REJECT" => {
            // struct ipt_reject_info / ip6t_reject_info { __u32 with; }: only the default,
            // icmp(6) port unreachable (IPT_ICMP_PORT_UNREACHABLE 3, IP6T_ICMP6_PORT_UNREACH 4).
            if opts.value("--reject-with")?.is_some() {
                return unsupported("REJECT --reject-with");
            }
            let mut data = vec![0u8; 4];
            put_u32(&mut data, 0, if family == Family::V4 { 3 } else { 4 });
            extension("REJECT", 0, data)
        }
        "MARK" => {
            // Revision 2: struct xt_mark_tginfo2 { __u32 mark, mask; }: mark = (mark & ~mask) ^ value.
            let mut data = vec![0u8; 8];
            let (mark, mask) = if let Some(v) = opts.value("--or-mark")? {
                let (v, _) = value_mask(v)?;
                (v, v)
            } else if let Some(v) = opts.value("--xor-mark")? {
                let (v, _) = value_mask(v)?;
                (v, 0)
            } else if let Some(v) = opts.value("--set-xmark")? {
                value_mask(v)?
            } else {
                return unsupported("MARK other than --or-mark, --xor-mark, --set-xmark");
            };
            put_u32(&mut data, 0, mark);
            put_u32(&mut data, 4, mask);
            extension("MARK", 2, data)
        }
        other => {
            // A name that could be an extension target (REJECT, LOG, ...) or a user chain:
            // only the table knows which; a chain of that name wins at layout, as in libiptc.
            if options.is_empty() && other.len() <= MAX_CHAIN_NAME && !is_known_extension(other) {
                return Ok((standard_target(0), Verdict::Jump(other.to_string())));
            }
            return unsupported(format!("target {other}"));
        }
    };
    opts.finish()?;
    Ok(out)
}

/// Targets that libxtables would load as extensions rather than jumps.
fn is_known_extension(name: &str) -> bool {
    const EXTENSIONS: &[&str] = &[
        "REJECT",
        "LOG",
        "NFLOG",
        "SNAT",
        "REDIRECT",
        "NETMAP",
        "CT",
        "CONNMARK",
        "TPROXY",
        "NOTRACK",
        "TRACE",
        "CHECKSUM",
        "TCPMSS",
        "NFQUEUE",
        "QUEUE",
        "TEE",
        "AUDIT",
        "CLASSIFY",
        "DSCP",
        "TOS",
        "TTL",
        "HL",
        "SET",
        "CONNSECMARK",
        "SECMARK",
        "IDLETIMER",
        "LED",
        "RATEEST",
        "SYNPROXY",
        "ULOG",
        "CLUSTERIP",
        "ECN",
        "MIRROR",
        "HMARK",
        "TCPOPTSTRIP",
        "JOOL",
        "ACCEPT",
        "DROP",
        "RETURN",
        "DNAT",
        "MASQUERADE",
        "MARK",
    ];
    EXTENSIONS.contains(&name)
}

/// `10.0.0.1:80`, `10.0.0.1`, `[fd00::1]:80`, `fd00::1`.
fn parse_ip_port(family: Family, s: &str) -> std::result::Result<(IpAddr, Option<u16>), RuleError> {
    if s.contains('-') || s.contains(',') {
        return unsupported("a DNAT range");
    }
    let (addr, port) = if let Some(rest) = s.strip_prefix('[') {
        match rest.split_once("]:") {
            Some((a, p)) => (a, Some(port(p)?)),
            None => (rest.strip_suffix(']').unwrap_or(rest), None),
        }
    } else if s.matches(':').count() == 1 {
        let (a, p) = s.split_once(':').expect("one colon");
        (a, Some(port(p)?))
    } else {
        (s, None)
    };
    match addr.parse::<IpAddr>() {
        Ok(a) if family.matches(&a) => Ok((a, port)),
        _ => unsupported(format!("--to-destination `{s}'")),
    }
}

/// A match's or target's options, each consumed once; whatever is left over is not ours.
struct Options<'a> {
    words: &'a [String],
    used: Vec<bool>,
}

impl<'a> Options<'a> {
    fn new(words: &'a [String]) -> Self {
        Options {
            words,
            used: vec![false; words.len()],
        }
    }

    fn find(&mut self, name: &str) -> Option<(usize, bool)> {
        let i = self.words.iter().position(|w| w == name)?;
        let neg = i > 0 && self.words[i - 1] == "!";
        self.used[i] = true;
        if neg {
            self.used[i - 1] = true;
        }
        Some((i, neg))
    }

    fn value_neg(&mut self, name: &str) -> std::result::Result<Option<(&'a str, bool)>, RuleError> {
        let Some((i, neg)) = self.find(name) else {
            return Ok(None);
        };
        match self.words.get(i + 1) {
            Some(v) if !v.starts_with("--") => {
                self.used[i + 1] = true;
                Ok(Some((v.as_str(), neg)))
            }
            _ => invalid(format!("{name} needs a value")),
        }
    }

    fn value(&mut self, name: &str) -> std::result::Result<Option<&'a str>, RuleError> {
        match self.value_neg(name)? {
            Some((_, true)) => unsupported(format!("! {name}")),
            Some((v, false)) => Ok(Some(v)),
            None => Ok(None),
        }
    }

    fn value_either(&mut self, a: &str, b: &str) -> std::result::Result<Option<&'a str>, RuleError> {
        match self.value(a)? {
            Some(v) => Ok(Some(v)),
            None => self.value(b),
        }
    }

    fn flag(&mut self, name: &str) -> std::result::Result<bool, RuleError> {
        match self.find(name) {
            Some((_, true)) => unsupported(format!("! {name}")),
            Some(_) => Ok(true),
            None => Ok(false),
        }
    }

    fn finish(self) -> std::result::Result<(), RuleError> {
        match self.used.iter().position(|u| !u) {
            Some(i) => unsupported(format!("option {}", self.words[i])),
            None => Ok(()),
        }
    }
}
