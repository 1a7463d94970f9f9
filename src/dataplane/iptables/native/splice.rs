//! The kernel's table as it came from `IPT_SO_GET_ENTRIES`, cut into chains, and the new table
//! laid out from it: chains the input does not touch are copied byte for byte, the input's
//! chains are written in their place, and every jump (an absolute byte offset) is relocated.
//! Pure: no socket here, so a synthetic blob tests it.

use std::collections::HashMap;

use super::layout::*;
use super::rule::{standard_target, Op, Parse, Rule, TableInput, Verdict, MAX_CHAIN_NAME};

mod in_place;
pub use self::in_place::{growth_bound, splice_in_place, GET_ENTRIES_AT};

/// What `IPT_SO_GET_INFO` says of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableInfo {
    pub valid_hooks: u32,
    pub hook_entry: [u32; HOOKS],
    pub underflow: [u32; HOOKS],
    pub num_entries: u32,
    pub size: u32,
}

/// The built-in chains by hook number (NF_INET_PRE_ROUTING ... NF_INET_POST_ROUTING).
pub const BUILTIN: [&str; HOOKS] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// A run of whole entries of the old table: bytes and entry numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    off: usize,
    len: usize,
    first: usize,
    count: usize,
}

/// One chain of the old table.
#[derive(Debug)]
struct OldChain {
    name: String,
    hook: Option<usize>,
    /// The ERROR entry naming a user chain.
    head: Option<Span>,
    rules: Span,
    /// A user chain's RETURN entry, or a built-in chain's policy.
    end: Span,
}

/// A chain being read: name, hook (built-in), head (user chain), first rule's offset and number.
type Open = (String, Option<usize>, Option<Span>, usize, usize);

/// The old table cut into chains.
#[derive(Debug)]
pub struct OldTable<'b> {
    family: Family,
    blob: &'b [u8],
    info: TableInfo,
    chains: Vec<OldChain>,
    /// The table's closing ERROR entry.
    end: Span,
}

fn unsupported<T>(why: impl Into<String>) -> Result<T, Parse> {
    Err(Parse::Unsupported {
        line: 0,
        why: why.into(),
    })
}

/// An entry's target: (offset in the blob, size, name).
fn target_of(family: Family, blob: &[u8], off: usize) -> (usize, usize, &[u8]) {
    let at = off + get_u16(blob, off + family.target_offset_at()) as usize;
    let size = get_u16(blob, at) as usize;
    (at, size, get_name(&blob[at + 2..at + 31]))
}

/// Cuts the kernel's table into chains as libiptc does: a hook's entry point starts a built-in
/// chain that ends at its underflow (the policy); an ERROR entry starts a user chain that ends
/// with the entry before the next chain; the last entry is the table's own ERROR.
pub fn parse_table(family: Family, info: TableInfo, blob: &[u8]) -> Result<OldTable<'_>, Parse> {
    if blob.len() != info.size as usize {
        return unsupported(format!(
            "GET_ENTRIES returned {} bytes, GET_INFO said {}",
            blob.len(),
            info.size
        ));
    }
    let hooks: Vec<usize> = (0..HOOKS).filter(|h| info.valid_hooks & (1 << h) != 0).collect();
    let mut chains: Vec<OldChain> = Vec::new();
    // The chain being read: (name, hook, head, first rule's offset and number).
    let mut open: Option<Open> = None;
    let mut last: Option<Span> = None;
    let mut end = None;
    let (mut off, mut n) = (0usize, 0usize);
    let es = family.entry_size();
    while off < blob.len() {
        if off + es > blob.len() {
            return unsupported("a truncated entry");
        }
        let next = get_u16(blob, off + family.next_offset_at()) as usize;
        let toff = get_u16(blob, off + family.target_offset_at()) as usize;
        if next < es + 32 || toff < es || toff + 32 > next || off + next > blob.len() || next % 8 != 0 {
            return unsupported(format!("a malformed entry at offset {off}"));
        }
        let here = Span {
            off,
            len: next,
            first: n,
            count: 1,
        };
        let (_, _, tname) = target_of(family, blob, off);
        let is_error = tname == b"ERROR";
        if let Some(&h) = hooks.iter().find(|&&h| info.hook_entry[h] as usize == off) {
            if open.is_some() {
                if let Some((_, Some(_), ..)) = open {
                    return unsupported("a built-in chain inside another");
                }
                close_user(&mut chains, open.take(), last)?;
            }
            open = Some((BUILTIN[h].to_string(), Some(h), None, off, n));
        }
        if is_error {
            if let Some((_, Some(_), ..)) = open {
                return unsupported("a built-in chain without its policy");
            }
            close_user(&mut chains, open.take(), last)?;
            if off + next == blob.len() {
                end = Some(here);
            } else {
                let (at, _, _) = target_of(family, blob, off);
                let name = get_name(&blob[at + 32..at + 32 + 30]);
                let name =
                    String::from_utf8(name.to_vec()).or_else(|_| unsupported("a chain name that is not UTF-8"))?;
                open = Some((name, None, Some(here), off + next, n + 1));
            }
        } else if let Some((name, Some(h), _, start, first)) = &open {
            if info.underflow[*h] as usize == off {
                chains.push(OldChain {
                    name: name.clone(),
                    hook: Some(*h),
                    head: None,
                    rules: Span {
                        off: *start,
                        len: off - start,
                        first: *first,
                        count: n - first,
                    },
                    end: here,
                });
                open = None;
            }
        } else if open.is_none() {
            return unsupported(format!("an entry outside any chain at offset {off}"));
        }
        last = Some(here);
        off += next;
        n += 1;
    }
    let Some(end) = end else {
        return unsupported("a table without its closing entry");
    };
    if n != info.num_entries as usize {
        return unsupported(format!("{n} entries, GET_INFO said {}", info.num_entries));
    }
    if chains.iter().filter(|c| c.hook.is_some()).count() != hooks.len() {
        return unsupported("a hook without its chain");
    }
    Ok(OldTable {
        family,
        blob,
        info,
        chains,
        end,
    })
}

fn close_user(chains: &mut Vec<OldChain>, open: Option<Open>, last: Option<Span>) -> Result<(), Parse> {
    let Some((name, None, Some(head), start, first)) = open else {
        return Ok(());
    };
    match last {
        Some(tail) if tail.off >= start => {
            chains.push(OldChain {
                name,
                hook: None,
                head: Some(head),
                rules: Span {
                    off: start,
                    len: tail.off - start,
                    first,
                    count: tail.first - first,
                },
                end: tail,
            });
            Ok(())
        }
        _ => unsupported(format!("user chain {name} without its RETURN entry")),
    }
}

/// A chain of the new table.
struct NewChain<'r> {
    name: String,
    hook: Option<usize>,
    old: Option<usize>,
    keep_old_rules: bool,
    prefix: Vec<&'r Rule>,
    suffix: Vec<&'r Rule>,
    /// The `-X` line that deleted it.
    deleted: Option<usize>,
}

/// The new table, ready for `IPT_SO_SET_REPLACE`: `buf` starts with [`REPLACE_HEADER`] bytes
/// (filled in), then the entries.
#[derive(Debug)]
pub struct NewTable {
    pub buf: Vec<u8>,
    pub num_entries: usize,
    /// Runs of entries kept from the old table: (old first, new first, count), to carry their
    /// counters over.
    pub kept: Vec<(usize, usize, usize)>,
    pub rules_written: usize,
}

impl NewTable {
    /// The counters for `IPT_SO_SET_ADD_COUNTERS`: each kept entry's old counters (as the
    /// replace handed them back), zero for the new ones; with the [`COUNTERS_INFO_HEADER`].
    pub fn counters(&self, table: &str, old: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; COUNTERS_INFO_HEADER + self.num_entries * COUNTERS_SIZE];
        put_name(&mut out[..TABLE_NAME_LEN], table);
        put_u32(&mut out, TABLE_NAME_LEN, self.num_entries as u32);
        for &(from, to, count) in &self.kept {
            let src = &old[from * COUNTERS_SIZE..(from + count) * COUNTERS_SIZE];
            let at = COUNTERS_INFO_HEADER + to * COUNTERS_SIZE;
            out[at..at + src.len()].copy_from_slice(src);
        }
        out
    }
}

/// The new table's shape: what the input does to each chain, the chains' order, and where each
/// chain's first rule lands (a jump's target). Shared by [`splice`] and [`splice_in_place`].
struct Plan<'r> {
    chains: Vec<NewChain<'r>>,
    by_name: HashMap<String, usize>,
    order: Vec<usize>,
    start: Vec<usize>,
    size: usize,
    entries: usize,
    /// Old chain number -> new chain number, for jumps in kept entries.
    renumber: Vec<usize>,
    /// A user chain's first rule's old offset -> its old chain number.
    old_starts: HashMap<usize, usize>,
    rules_written: usize,
}

impl Plan<'_> {
    fn jump_target(&self, name: &str, line: &dyn Fn() -> usize) -> Result<usize, Parse> {
        match self.by_name.get(name).map(|&i| &self.chains[i]) {
            Some(c) if c.deleted.is_none() && c.hook.is_none() => Ok(self.start[self.by_name[name]]),
            Some(c) if c.hook.is_some() => Err(Parse::Invalid {
                line: line(),
                why: format!("cannot jump to built-in chain {name}"),
            }),
            // Perhaps an extension target: iptables-restore knows.
            _ => Err(Parse::Unsupported {
                line: line(),
                why: format!("no chain {name}: a target extension?"),
            }),
        }
    }

    /// Where a kept jump to old offset `v` goes now (`v` starts a user chain).
    fn relocate_jump(&self, v: usize) -> Result<usize, Parse> {
        let Some(&o) = self.old_starts.get(&v) else {
            return unsupported(format!("a jump to offset {v} that starts no chain"));
        };
        let c = &self.chains[self.renumber[o]];
        if let Some(line) = c.deleted {
            return Err(Parse::Invalid {
                line,
                why: format!("chain {} is still referenced", c.name),
            });
        }
        Ok(self.start[self.renumber[o]])
    }
}

/// The input line of a rule, for an error.
fn line_of(input: &TableInput, rule: &Rule) -> usize {
    input
        .ops
        .iter()
        .find_map(|op| match op {
            Op::Append { rule: r, line, .. } | Op::InsertFirst { rule: r, line, .. } if std::ptr::eq(r, rule) => {
                Some(*line)
            }
            _ => None,
        })
        .unwrap_or(0)
}

/// Applies the input's operations to the old table's chains and lays out the new one's.
fn plan<'r>(family: Family, old_chains: &[OldChain], old_end: Span, input: &'r TableInput) -> Result<Plan<'r>, Parse> {
    let mut chains: Vec<NewChain<'_>> = old_chains
        .iter()
        .enumerate()
        .map(|(i, c)| NewChain {
            name: c.name.clone(),
            hook: c.hook,
            old: Some(i),
            keep_old_rules: true,
            prefix: Vec::new(),
            suffix: Vec::new(),
            deleted: None,
        })
        .collect();
    let mut by_name: HashMap<String, usize> = chains.iter().enumerate().map(|(i, c)| (c.name.clone(), i)).collect();
    let mut rules_written = 0;
    for op in &input.ops {
        match op {
            Op::Declare { chain, line } => match by_name.get(chain) {
                Some(&i) if chains[i].hook.is_some() => {
                    return Err(Parse::Unsupported {
                        line: *line,
                        why: format!("declaring built-in chain {chain}"),
                    })
                }
                Some(&i) => {
                    let c = &mut chains[i];
                    c.keep_old_rules = false;
                    c.prefix.clear();
                    c.suffix.clear();
                    c.deleted = None;
                }
                None => {
                    if chain.len() > MAX_CHAIN_NAME {
                        return Err(Parse::Invalid {
                            line: *line,
                            why: format!("chain name `{chain}' too long"),
                        });
                    }
                    by_name.insert(chain.clone(), chains.len());
                    chains.push(NewChain {
                        name: chain.clone(),
                        hook: None,
                        old: None,
                        keep_old_rules: false,
                        prefix: Vec::new(),
                        suffix: Vec::new(),
                        deleted: None,
                    });
                }
            },
            Op::Append { chain, rule, line } | Op::InsertFirst { chain, rule, line } => {
                let Some(&i) = by_name.get(chain).filter(|&&i| chains[i].deleted.is_none()) else {
                    return Err(Parse::Invalid {
                        line: *line,
                        why: format!("no chain `{chain}' to add a rule to"),
                    });
                };
                rules_written += 1;
                match op {
                    Op::Append { .. } => chains[i].suffix.push(rule),
                    _ => chains[i].prefix.insert(0, rule),
                }
            }
            Op::Delete { chain, line } => {
                let Some(&i) = by_name.get(chain).filter(|&&i| chains[i].deleted.is_none()) else {
                    return Err(Parse::Invalid {
                        line: *line,
                        why: format!("no chain `{chain}' to delete"),
                    });
                };
                let c = &chains[i];
                let old_rules = c.old.map_or(0, |o| old_chains[o].rules.count);
                if c.hook.is_some() {
                    return Err(Parse::Invalid {
                        line: *line,
                        why: format!("cannot delete built-in chain {chain}"),
                    });
                }
                if !c.prefix.is_empty() || !c.suffix.is_empty() || (c.keep_old_rules && old_rules > 0) {
                    return Err(Parse::Invalid {
                        line: *line,
                        why: format!("chain {chain} is not empty"),
                    });
                }
                chains[i].deleted = Some(*line);
            }
        }
    }
    // libiptc's order: built-in chains in hook order, then user chains by name.
    let mut order: Vec<usize> = (0..chains.len()).filter(|&i| chains[i].deleted.is_none()).collect();
    order.sort_by(|&a, &b| {
        let (ca, cb) = (&chains[a], &chains[b]);
        match (ca.hook, cb.hook) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => ca.name.as_bytes().cmp(cb.name.as_bytes()),
        }
    });
    let head_size = family.entry_size() + ERROR_TARGET_SIZE;
    let tail_size = family.entry_size() + STANDARD_TARGET_SIZE;
    // Pass 1: where each chain's first rule lands (a jump's target).
    let mut start = vec![usize::MAX; chains.len()];
    let mut size = 0usize;
    let mut entries = 0usize;
    for &i in &order {
        let c = &chains[i];
        let oc = c.old.map(|o| &old_chains[o]);
        if c.hook.is_none() {
            size += oc.and_then(|o| o.head).map_or(head_size, |h| h.len);
            entries += 1;
        }
        start[i] = size;
        let kept = oc
            .filter(|_| c.keep_old_rules)
            .map_or((0, 0), |o| (o.rules.len, o.rules.count));
        size += c.prefix.iter().chain(&c.suffix).map(|r| r.bytes.len()).sum::<usize>() + kept.0;
        size += oc.map_or(tail_size, |o| o.end.len);
        entries += c.prefix.len() + c.suffix.len() + kept.1 + 1;
    }
    size += old_end.len;
    entries += 1;
    if size > u32::MAX as usize {
        return unsupported("a table over 4 GiB");
    }
    // Old chain number -> new chain number, for jumps in kept entries.
    let mut renumber = vec![usize::MAX; old_chains.len()];
    for (i, c) in chains.iter().enumerate() {
        if let Some(o) = c.old {
            renumber[o] = i;
        }
    }
    let mut old_starts: HashMap<usize, usize> = HashMap::new();
    for (o, c) in old_chains.iter().enumerate() {
        if c.head.is_some() {
            old_starts.insert(c.rules.off, o);
        }
    }
    Ok(Plan {
        chains,
        by_name,
        order,
        start,
        size,
        entries,
        renumber,
        old_starts,
        rules_written,
    })
}

/// Applies the input's operations to the old table and lays out the new one in a buffer of
/// its own. The reference for [`splice_in_place`].
pub fn splice(old: &OldTable<'_>, table: &str, input: &TableInput) -> Result<NewTable, Parse> {
    let family = old.family;
    let head_size = family.entry_size() + ERROR_TARGET_SIZE;
    let tail_size = family.entry_size() + STANDARD_TARGET_SIZE;
    let plan = plan(family, &old.chains, old.end, input)?;
    let Plan {
        ref chains,
        ref order,
        ref start,
        size,
        entries,
        ref renumber,
        ref old_starts,
        rules_written,
        ..
    } = plan;
    let jump_target = |name: &str, line: &dyn Fn() -> usize| plan.jump_target(name, line);

    // Pass 2: the bytes.
    let mut buf = Vec::with_capacity(REPLACE_HEADER + size);
    buf.resize(REPLACE_HEADER, 0);
    let mut kept = Vec::new();
    let mut hook_entry = [u32::MAX; HOOKS];
    let mut underflow = [u32::MAX; HOOKS];
    let mut n = 0usize;
    let line_of = |rule: &Rule| line_of(input, rule);
    let copy_span = |buf: &mut Vec<u8>,
                     span: Span,
                     n: &mut usize,
                     kept: Option<&mut Vec<(usize, usize, usize)>>|
     -> Result<(), Parse> {
        if span.count == 0 {
            return Ok(());
        }
        let base = buf.len() - REPLACE_HEADER;
        buf.extend_from_slice(&old.blob[span.off..span.off + span.len]);
        // Relocate the standard targets' jumps.
        let mut at = 0;
        while at < span.len {
            let old_off = span.off + at;
            let len = get_u16(old.blob, old_off + family.next_offset_at()) as usize;
            let (t, tsize, tname) = target_of(family, old.blob, old_off);
            if tsize == STANDARD_TARGET_SIZE && tname.is_empty() {
                let verdict = get_u32(old.blob, t + 32) as i32;
                if verdict >= 0 {
                    let v = verdict as usize;
                    let new_off = base + at;
                    let relocated = if v == old_off + len {
                        new_off + len
                    } else if let Some(&o) = old_starts.get(&v) {
                        let c = &chains[renumber[o]];
                        if let Some(line) = c.deleted {
                            return Err(Parse::Invalid {
                                line,
                                why: format!("chain {} is still referenced", c.name),
                            });
                        }
                        start[renumber[o]]
                    } else {
                        return unsupported(format!("a jump to offset {v} that starts no chain"));
                    };
                    let at_verdict = REPLACE_HEADER + base + (t - span.off) + 32;
                    put_u32(buf, at_verdict, relocated as u32);
                }
            }
            at += len;
        }
        if let Some(kept) = kept {
            kept.push((span.first, *n, span.count));
        }
        *n += span.count;
        Ok(())
    };
    let write_rule = |buf: &mut Vec<u8>, rule: &Rule, n: &mut usize| -> Result<(), Parse> {
        let at = buf.len();
        buf.extend_from_slice(&rule.bytes);
        let verdict_at = at + get_u16(&rule.bytes, family.target_offset_at()) as usize + 32;
        match &rule.verdict {
            Verdict::Fixed => {}
            Verdict::Jump(name) => put_u32(buf, verdict_at, jump_target(name, &|| line_of(rule))? as u32),
            Verdict::Fallthrough => put_u32(buf, verdict_at, (at - REPLACE_HEADER + rule.bytes.len()) as u32),
        }
        *n += 1;
        Ok(())
    };
    for &i in order {
        let c = &chains[i];
        let oc = c.old.map(|o| &old.chains[o]);
        match (c.hook, oc.and_then(|o| o.head)) {
            (Some(_), _) => {}
            (None, Some(head)) => copy_span(&mut buf, head, &mut n, Some(&mut kept))?,
            (None, None) => {
                let mut head = vec![0u8; head_size];
                put_u16(&mut head, family.target_offset_at(), family.entry_size() as u16);
                put_u16(&mut head, family.next_offset_at(), head_size as u16);
                let t = family.entry_size();
                put_u16(&mut head, t, ERROR_TARGET_SIZE as u16);
                put_name(&mut head[t + 2..t + 31], "ERROR");
                put_name(&mut head[t + 32..t + 62], &c.name);
                buf.extend_from_slice(&head);
                n += 1;
            }
        }
        debug_assert_eq!(buf.len() - REPLACE_HEADER, start[i]);
        if let Some(h) = c.hook {
            hook_entry[h] = start[i] as u32;
        }
        for r in &c.prefix {
            write_rule(&mut buf, r, &mut n)?;
        }
        if let Some(o) = oc.filter(|_| c.keep_old_rules) {
            copy_span(&mut buf, o.rules, &mut n, Some(&mut kept))?;
        }
        for r in &c.suffix {
            write_rule(&mut buf, r, &mut n)?;
        }
        if let Some(h) = c.hook {
            underflow[h] = (buf.len() - REPLACE_HEADER) as u32;
        }
        match oc {
            // iptables-restore --noflush starts every built-in chain's policy counters at zero
            // (libiptc does not carry them over without `-c`): so does this writer.
            Some(o) => copy_span(&mut buf, o.end, &mut n, c.hook.is_none().then_some(&mut kept))?,
            None => {
                let mut tail = vec![0u8; tail_size];
                put_u16(&mut tail, family.target_offset_at(), family.entry_size() as u16);
                put_u16(&mut tail, family.next_offset_at(), tail_size as u16);
                tail[family.entry_size()..].copy_from_slice(&standard_target(RETURN));
                buf.extend_from_slice(&tail);
                n += 1;
            }
        }
    }
    copy_span(&mut buf, old.end, &mut n, Some(&mut kept))?;
    debug_assert_eq!(n, entries);
    debug_assert_eq!(buf.len() - REPLACE_HEADER, size);
    // struct ipt_replace; the counters pointer is the caller's.
    put_name(&mut buf[..TABLE_NAME_LEN], table);
    put_u32(&mut buf, 32, old.info.valid_hooks);
    put_u32(&mut buf, 36, entries as u32);
    put_u32(&mut buf, 40, size as u32);
    for h in 0..HOOKS {
        put_u32(&mut buf, 44 + 4 * h, hook_entry[h]);
        put_u32(&mut buf, 64 + 4 * h, underflow[h]);
    }
    put_u32(&mut buf, 84, old.info.num_entries);
    Ok(NewTable {
        buf,
        num_entries: entries,
        kept,
        rules_written,
    })
}
