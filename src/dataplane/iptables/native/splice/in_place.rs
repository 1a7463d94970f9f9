//! The splice done in the buffer `IPT_SO_GET_ENTRIES` filled: the kept entries move within it
//! (`copy_within`, in an order that reads every byte before it is overwritten) and the input's
//! entries are written into the gaps, so the new table costs no second buffer of the table's
//! size (on a guest whose fresh pages are expensive, the second buffer's first touches were most
//! of the splice's time). Same bytes as [`splice`](super::splice), which stays the reference.

use super::*;

/// The layout of a buffer for [`splice_in_place`]: the `struct ipt_get_entries` header ends
/// where `struct ipt_replace`'s does, so the entries start at [`REPLACE_HEADER`] in both.
pub const GET_ENTRIES_AT: usize = REPLACE_HEADER - GET_ENTRIES_HEADER;

/// How many bytes the input can add to a table at most: every rule it writes, and a head and
/// a tail for every chain it declares (flushes and deletions only shrink it).
pub fn growth_bound(family: Family, input: &TableInput) -> usize {
    let chain = 2 * family.entry_size() + ERROR_TARGET_SIZE + STANDARD_TARGET_SIZE;
    input
        .ops
        .iter()
        .map(|op| match op {
            Op::Declare { .. } => chain,
            Op::Append { rule, .. } | Op::InsertFirst { rule, .. } => rule.bytes.len(),
            Op::Delete { .. } => 0,
        })
        .sum()
}

/// One piece of the new table, at `dst` (an offset in the new entries).
enum Piece<'r> {
    /// Entries of the old table, moved.
    Old(Span),
    /// A rule of the input with its verdict, if it has one to patch.
    Rule(&'r Rule, Option<u32>),
    /// A new user chain's ERROR entry.
    Head(usize),
    /// A new user chain's RETURN entry.
    Tail,
}

/// [`splice`](super::splice) in place. `buf` holds, from [`GET_ENTRIES_AT`], what
/// `IPT_SO_GET_ENTRIES` returned (`info.size` bytes of entries after its header), and at least
/// [`growth_bound`] bytes after them. On success the buffer is the new table for
/// `IPT_SO_SET_REPLACE` (header filled in, as [`splice`](super::splice)'s); on an error its
/// content is undefined. `Ok(Err(buf))` hands the buffer back untouched when the old table's
/// chains are not in the new order (a table not laid out by libiptc): the caller splices it the
/// other way.
pub fn splice_in_place<'r>(
    family: Family,
    info: TableInfo,
    mut buf: Vec<u8>,
    table: &str,
    input: &'r TableInput,
) -> Result<Result<NewTable, Vec<u8>>, Parse> {
    let old_size = info.size as usize;
    if buf.len() < REPLACE_HEADER + old_size {
        return unsupported("a buffer shorter than the table");
    }
    let (chains, end) = {
        let old = parse_table(family, info, &buf[REPLACE_HEADER..REPLACE_HEADER + old_size])?;
        (old.chains, old.end)
    };
    let plan = plan(family, &chains, end, input)?;
    let head_size = family.entry_size() + ERROR_TARGET_SIZE;
    let tail_size = family.entry_size() + STANDARD_TARGET_SIZE;

    // The pieces in the new order, as `splice` writes them.
    let mut pieces: Vec<(usize, Piece<'_>)> = Vec::new();
    let mut kept = Vec::new();
    let mut hook_entry = [u32::MAX; HOOKS];
    let mut underflow = [u32::MAX; HOOKS];
    let (mut at, mut n) = (0usize, 0usize);
    let mut old_span = |pieces: &mut Vec<(usize, Piece<'_>)>, at: &mut usize, n: &mut usize, span: Span, keep: bool| {
        if span.count == 0 {
            return;
        }
        // A run that continues the previous one in the old table moves with it: the pieces
        // are as many as the places the input changes, not as the table's chains.
        match pieces.last_mut() {
            Some((_, Piece::Old(prev))) if prev.off + prev.len == span.off => {
                prev.len += span.len;
                prev.count += span.count;
            }
            _ => pieces.push((*at, Piece::Old(span))),
        }
        if keep {
            kept.push((span.first, *n, span.count));
        }
        *at += span.len;
        *n += span.count;
    };
    let rule = |pieces: &mut Vec<(usize, Piece<'r>)>, at: &mut usize, n: &mut usize, r: &'r Rule| {
        let verdict = match &r.verdict {
            Verdict::Fixed => None,
            Verdict::Jump(name) => Some(plan.jump_target(name, &|| line_of(input, r))? as u32),
            Verdict::Fallthrough => Some((*at + r.bytes.len()) as u32),
        };
        pieces.push((*at, Piece::Rule(r, verdict)));
        *at += r.bytes.len();
        *n += 1;
        Ok::<(), Parse>(())
    };
    for &i in &plan.order {
        let c = &plan.chains[i];
        let oc = c.old.map(|o| &chains[o]);
        match (c.hook, oc.and_then(|o| o.head)) {
            (Some(_), _) => {}
            (None, Some(head)) => old_span(&mut pieces, &mut at, &mut n, head, true),
            (None, None) => {
                pieces.push((at, Piece::Head(i)));
                at += head_size;
                n += 1;
            }
        }
        debug_assert_eq!(at, plan.start[i]);
        if let Some(h) = c.hook {
            hook_entry[h] = at as u32;
        }
        for r in &c.prefix {
            rule(&mut pieces, &mut at, &mut n, r)?;
        }
        if let Some(o) = oc.filter(|_| c.keep_old_rules) {
            old_span(&mut pieces, &mut at, &mut n, o.rules, true);
        }
        for r in &c.suffix {
            rule(&mut pieces, &mut at, &mut n, r)?;
        }
        if let Some(h) = c.hook {
            underflow[h] = at as u32;
        }
        match oc {
            // A built-in chain's policy counters start at zero, as in `splice`.
            Some(o) => old_span(&mut pieces, &mut at, &mut n, o.end, c.hook.is_none()),
            None => {
                pieces.push((at, Piece::Tail));
                at += tail_size;
                n += 1;
            }
        }
    }
    old_span(&mut pieces, &mut at, &mut n, end, true);
    debug_assert_eq!(n, plan.entries);
    debug_assert_eq!(at, plan.size);
    if REPLACE_HEADER + plan.size > buf.len() {
        return unsupported("a buffer without room for the new table");
    }
    // The moves below are safe only if the kept runs keep their order.
    let mut last_end = 0;
    for (_, p) in &pieces {
        if let Piece::Old(span) = p {
            if span.off < last_end {
                return Ok(Err(buf));
            }
            last_end = span.off + span.len;
        }
    }

    let entries = &mut buf[REPLACE_HEADER..];
    // Relocate the kept jumps where they are (each entry is read once, before it moves).
    for (dst, p) in &pieces {
        if let Piece::Old(span) = p {
            relocate(
                family,
                &plan,
                &mut entries[span.off..span.off + span.len],
                span.off,
                *dst,
            )?;
        }
    }
    // Runs moving towards the front first, front to back; then those moving towards the back,
    // back to front. With the runs in the same order in both tables, a run's destination
    // overlaps no source not yet moved.
    for (dst, p) in &pieces {
        match p {
            Piece::Old(span) if *dst <= span.off => entries.copy_within(span.off..span.off + span.len, *dst),
            _ => {}
        }
    }
    for (dst, p) in pieces.iter().rev() {
        match p {
            Piece::Old(span) if *dst > span.off => entries.copy_within(span.off..span.off + span.len, *dst),
            _ => {}
        }
    }
    // The input's entries, into the gaps.
    for (dst, p) in &pieces {
        let dst = *dst;
        match p {
            Piece::Old(_) => {}
            Piece::Rule(r, verdict) => {
                entries[dst..dst + r.bytes.len()].copy_from_slice(&r.bytes);
                if let Some(v) = verdict {
                    let verdict_at = dst + get_u16(&r.bytes, family.target_offset_at()) as usize + 32;
                    put_u32(entries, verdict_at, *v);
                }
            }
            Piece::Head(i) => {
                let head = &mut entries[dst..dst + head_size];
                head.fill(0);
                put_u16(head, family.target_offset_at(), family.entry_size() as u16);
                put_u16(head, family.next_offset_at(), head_size as u16);
                let t = family.entry_size();
                put_u16(head, t, ERROR_TARGET_SIZE as u16);
                put_name(&mut head[t + 2..t + 31], "ERROR");
                put_name(&mut head[t + 32..t + 62], &plan.chains[*i].name);
            }
            Piece::Tail => {
                let tail = &mut entries[dst..dst + tail_size];
                tail.fill(0);
                put_u16(tail, family.target_offset_at(), family.entry_size() as u16);
                put_u16(tail, family.next_offset_at(), tail_size as u16);
                tail[family.entry_size()..].copy_from_slice(&standard_target(RETURN));
            }
        }
    }
    buf.truncate(REPLACE_HEADER + plan.size);
    // struct ipt_replace over the GET_ENTRIES header; the counters pointer is the caller's.
    buf[..REPLACE_HEADER].fill(0);
    put_name(&mut buf[..TABLE_NAME_LEN], table);
    put_u32(&mut buf, 32, info.valid_hooks);
    put_u32(&mut buf, 36, plan.entries as u32);
    put_u32(&mut buf, 40, plan.size as u32);
    for h in 0..HOOKS {
        put_u32(&mut buf, 44 + 4 * h, hook_entry[h]);
        put_u32(&mut buf, 64 + 4 * h, underflow[h]);
    }
    put_u32(&mut buf, 84, info.num_entries);
    Ok(Ok(NewTable {
        buf,
        num_entries: plan.entries,
        kept,
        rules_written: plan.rules_written,
    }))
}

/// Relocates the standard targets' jumps of a run of kept entries (`run`, which was at `old_off`
/// in the old table and goes to `new_off`).
fn relocate(family: Family, plan: &Plan<'_>, run: &mut [u8], old_off: usize, new_off: usize) -> Result<(), Parse> {
    let mut at = 0;
    while at < run.len() {
        let len = get_u16(run, at + family.next_offset_at()) as usize;
        let (t, tsize, tname) = target_of(family, run, at);
        if tsize == STANDARD_TARGET_SIZE && tname.is_empty() {
            let verdict = get_u32(run, t + 32) as i32;
            if verdict >= 0 {
                let v = verdict as usize;
                let relocated = if v == old_off + at + len {
                    new_off + at + len
                } else {
                    plan.relocate_jump(v)?
                };
                put_u32(run, t + 32, relocated as u32);
            }
        }
        at += len;
    }
    Ok(())
}
