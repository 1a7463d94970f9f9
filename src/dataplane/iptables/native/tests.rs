//! The encoder against the bytes iptables-legacy 1.8.9 writes for the same options (read back
//! from the kernel), the splice on a synthetic table, and, in network namespaces of their own,
//! the native writer against iptables-restore on the real kernel.

use super::layout::*;
use super::rule::{encode_rule, parse_input, Op, Parse, Rule, TableInput, Verdict};
use super::splice::{growth_bound, parse_table, splice, splice_in_place, NewTable, TableInfo, GET_ENTRIES_AT};

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The extension blocks of an entry: (name, revision, data).
fn blocks(family: Family, entry: &[u8]) -> Vec<(String, u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = family.entry_size();
    while at < entry.len() {
        let size = get_u16(entry, at) as usize;
        let name = String::from_utf8(get_name(&entry[at + 2..at + 31]).to_vec()).unwrap();
        out.push((name, entry[at + 31], entry[at + 32..at + size].to_vec()));
        at += size;
    }
    out
}

fn block(family: Family, rule: &Rule, name: &str) -> (u8, Vec<u8>) {
    let (_, rev, data) = blocks(family, &rule.bytes)
        .into_iter()
        .find(|(n, ..)| n == name)
        .unwrap_or_else(|| panic!("no {name} in the entry"));
    (rev, data)
}

#[test]
fn structure_sizes_are_the_uapis() {
    assert_eq!(Family::V4.entry_size(), 112, "sizeof(struct ipt_entry)");
    assert_eq!(Family::V6.entry_size(), 168, "sizeof(struct ip6t_entry)");
    assert_eq!(STANDARD_TARGET_SIZE, 40);
    assert_eq!(ERROR_TARGET_SIZE, 64);
    assert_eq!((xt_align(1), xt_align(8), xt_align(9), xt_align(228)), (8, 8, 16, 232));
    for family in [Family::V4, Family::V6] {
        assert_eq!(family.next_offset_at(), family.target_offset_at() + 2);
        assert_eq!(family.counters_at() % 8, 0, "xt_counters are u64-aligned");
        assert_eq!(family.counters_at() + COUNTERS_SIZE, family.entry_size());
    }
}

/// Each extension's revision, size and bytes as iptables-legacy 1.8.9 encodes the options
/// kproxy renders (from IPT_SO_GET_ENTRIES after iptables-legacy-restore wrote them).
#[test]
fn extensions_encode_as_iptables_legacy_does() {
    let v4 = Family::V4;
    let r = encode_rule(
        v4,
        &words("-m comment --comment x -m tcp -p tcp -d 10.96.0.1 --dport 80 ! -s 10.244.0.0/16 -j KPROXY-MARK-MASQ"),
    )
    .unwrap();
    assert_eq!(
        &r.bytes[..16],
        &hex("0af400000a600001ffff0000ffffffff")[..],
        "src, dst, masks"
    );
    assert_eq!(&r.bytes[80..84], &hex("06000008")[..], "proto tcp, ! -s");
    assert_eq!(r.verdict, Verdict::Jump("KPROXY-MARK-MASQ".into()));
    let (rev, data) = block(v4, &r, "comment");
    assert_eq!((rev, data.len(), data[0]), (0, 256, b'x'));
    assert_eq!(block(v4, &r, "tcp"), (0, hex("0000ffff500050000000000000000000")));
    assert_eq!(r.bytes.len(), 112 + 288 + 48 + 40);

    let r = encode_rule(v4, &words("-m tcp -p tcp --sport 1000 --dport 80:90 -j ACCEPT")).unwrap();
    assert_eq!(block(v4, &r, "tcp").1, hex("e803e80350005a000000000000000000"));
    assert_eq!(get_u32(&r.bytes, r.bytes.len() - 8) as i32, -2, "ACCEPT");

    let r = encode_rule(
        v4,
        &words("-m recent --name KPROXY-SEP-A --mask 255.255.255.255 --rsource --rcheck --seconds 10800 --reap -j KPROXY-SEP-A"),
    )
    .unwrap();
    let (rev, data) = block(v4, &r, "recent");
    assert_eq!((rev, data.len()), (1, 232));
    assert_eq!(
        &data[..10],
        &hex("302a0000000000002100")[..],
        "seconds, hit_count, check_set, invert"
    );
    assert_eq!(get_name(&data[10..210]), b"KPROXY-SEP-A");
    assert_eq!(&data[212..228], &hex("ffffffff000000000000000000000000")[..], "mask");

    let r = encode_rule(v4, &words("-m statistic --mode random --probability 0.3333333333 -j X")).unwrap();
    assert_eq!(
        block(v4, &r, "statistic"),
        (0, hex("00000000abaaaa2a00000000abaaaa2a0000000000000000"))
    );

    let r = encode_rule(v4, &words("-m udp -p udp -j DNAT --to-destination 10.244.1.2:53")).unwrap();
    assert_eq!(block(v4, &r, "udp"), (0, hex("0000ffff0000ffff0000000000000000")));
    let (rev, data) = block(v4, &r, "DNAT");
    assert_eq!(rev, 2);
    assert_eq!(
        data,
        hex("030000000af401020000000000000000000000000af40102000000000000000000000000003500350000000000000000")
    );

    let r = encode_rule(
        v4,
        &words("-m addrtype --src-type LOCAL -m mark ! --mark 0x4000/0x4000 -j RETURN"),
    )
    .unwrap();
    assert_eq!(block(v4, &r, "addrtype"), (1, hex("0400000000000000")));
    assert_eq!(block(v4, &r, "mark"), (1, hex("00400000004000000100000000000000")));
    assert_eq!(get_u32(&r.bytes, r.bytes.len() - 8) as i32, -5, "RETURN");

    let r = encode_rule(
        v4,
        &words("-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -i br0+ -j RETURN"),
    )
    .unwrap();
    assert_eq!(block(v4, &r, "addrtype").1, hex("0000040000000000"));
    assert_eq!(&r.bytes[16..20], b"br0+", "the + stays in the name");
    assert_eq!(&r.bytes[48..52], &hex("ffffff00")[..], "the mask covers the prefix");
    assert_eq!(r.bytes[83], 0x10, "! -d");

    let r = encode_rule(v4, &words("-j MASQUERADE --random-fully")).unwrap();
    assert_eq!(
        block(v4, &r, "MASQUERADE"),
        (0, hex("010000001000000000000000000000000000000000000000"))
    );
    let r = encode_rule(v4, &words("-j MARK --or-mark 0x4000")).unwrap();
    assert_eq!(block(v4, &r, "MARK"), (2, hex("0040000000400000")));
    let r = encode_rule(v4, &words("-j MARK --xor-mark 0x4000")).unwrap();
    assert_eq!(block(v4, &r, "MARK"), (2, hex("0040000000000000")));
    let r = encode_rule(v4, &words("-m comment --comment fw")).unwrap();
    assert_eq!(r.verdict, Verdict::Fallthrough, "no target: on to the next entry");

    let v6 = Family::V6;
    let r = encode_rule(
        v6,
        &words("-m tcp -p tcp -s fd00::1 -j DNAT --to-destination [fd00::2]:8080"),
    )
    .unwrap();
    assert_eq!(
        &r.bytes[128..133],
        &hex("0600000100")[..],
        "proto, tos, IP6T_F_PROTO, invflags"
    );
    assert_eq!(&r.bytes[32..48], &[0xff; 16][..], "smsk /128");
    let (_, data) = block(v6, &r, "DNAT");
    assert_eq!(&data[36..40], &hex("1f901f90")[..]);
}

#[test]
fn what_the_encoder_does_not_know_is_left_to_iptables_restore() {
    for rule in [
        "-m set --match-set x src -j ACCEPT",
        "-m comment --comment a\\b -j ACCEPT",
        "-j LOG --log-prefix x",
        "-j REJECT --reject-with tcp-reset",
        "-m tcp -p tcp ! --dport 80 -j ACCEPT",
        "-m statistic --mode nth --every 2 -j ACCEPT",
        "-g KPROXY-X",
        "-j DNAT --to-destination 10.0.0.1-10.0.0.3",
    ] {
        let input = format!("*nat\n-A PREROUTING {rule}\nCOMMIT\n");
        match parse_input(Family::V4, &input) {
            Err(Parse::Unsupported { line: 2, .. }) => {}
            other => panic!("{rule}: {other:?}"),
        }
    }
    assert!(matches!(
        parse_input(Family::V4, "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"),
        Err(Parse::Unsupported { line: 2, .. })
    ));
    assert!(matches!(
        parse_input(Family::V4, "*nat\n-A X -d fd00::1 -j ACCEPT\nCOMMIT\n"),
        Err(Parse::Invalid { line: 2, .. })
    ));
    assert!(matches!(
        parse_input(Family::V4, "*nat\n-A X -j ACCEPT\n"),
        Err(Parse::Invalid { .. })
    ));
}

/// A table as libiptc lays one out: built-in chains (rules, then policy) in hook order, user
/// chains (ERROR head, rules, RETURN) by name, the closing ERROR; jumps by chain name.
struct Synthetic {
    blob: Vec<u8>,
    info: TableInfo,
}

fn synthetic(family: Family, builtins: &[(usize, &[Rule])], users: &[(&str, &[Rule])]) -> Synthetic {
    let head = |name: &str| {
        let mut e = vec![0u8; family.entry_size() + ERROR_TARGET_SIZE];
        put_u16(&mut e, family.target_offset_at(), family.entry_size() as u16);
        let len = e.len() as u16;
        put_u16(&mut e, family.next_offset_at(), len);
        let t = family.entry_size();
        put_u16(&mut e, t, ERROR_TARGET_SIZE as u16);
        put_name(&mut e[t + 2..t + 31], "ERROR");
        put_name(&mut e[t + 32..t + 62], name);
        e
    };
    let standard = |verdict: i32| {
        encode_rule(
            family,
            &words(match verdict {
                -2 => "-j ACCEPT",
                _ => "-j RETURN",
            }),
        )
        .unwrap()
        .bytes
    };
    // First pass for the chains' start offsets, second to write.
    let mut starts = std::collections::HashMap::new();
    let mut off = 0;
    for (_, rules) in builtins {
        off += rules.iter().map(|r| r.bytes.len()).sum::<usize>() + standard(-2).len();
    }
    for (name, rules) in users {
        off += head(name).len();
        starts.insert(name.to_string(), off);
        off += rules.iter().map(|r| r.bytes.len()).sum::<usize>() + standard(-5).len();
    }
    let mut blob = Vec::new();
    let mut info = TableInfo {
        hook_entry: [u32::MAX; HOOKS],
        underflow: [u32::MAX; HOOKS],
        ..TableInfo::default()
    };
    let mut n = 0;
    let put = |blob: &mut Vec<u8>, r: &Rule| {
        let at = blob.len();
        blob.extend_from_slice(&r.bytes);
        let v = at + get_u16(&r.bytes, family.target_offset_at()) as usize + 32;
        match &r.verdict {
            Verdict::Jump(c) => put_u32(blob, v, starts[c] as u32),
            Verdict::Fallthrough => put_u32(blob, v, (at + r.bytes.len()) as u32),
            Verdict::Fixed => {}
        }
    };
    for (hook, rules) in builtins {
        info.valid_hooks |= 1 << hook;
        info.hook_entry[*hook] = blob.len() as u32;
        for r in rules.iter() {
            put(&mut blob, r);
            n += 1;
        }
        info.underflow[*hook] = blob.len() as u32;
        blob.extend_from_slice(&standard(-2));
        n += 1;
    }
    for (name, rules) in users {
        blob.extend_from_slice(&head(name));
        for r in rules.iter() {
            put(&mut blob, r);
            n += 1;
        }
        blob.extend_from_slice(&standard(-5));
        n += 2;
    }
    blob.extend_from_slice(&head("ERROR"));
    n += 1;
    info.num_entries = n;
    info.size = blob.len() as u32;
    Synthetic { blob, info }
}

/// The splice in the buffer as `IPT_SO_GET_ENTRIES` fills it, with `slack` bytes after the
/// entries; `None` if it handed the buffer back (chains out of order).
fn in_place(family: Family, t: &Synthetic, input: &TableInput, slack: usize) -> Option<Result<NewTable, Parse>> {
    let mut buf = vec![0xa5u8; GET_ENTRIES_AT + GET_ENTRIES_HEADER + t.blob.len() + slack];
    buf[REPLACE_HEADER..REPLACE_HEADER + t.blob.len()].copy_from_slice(&t.blob);
    match splice_in_place(family, t.info, buf, "nat", input) {
        Ok(Ok(new)) => Some(Ok(new)),
        Ok(Err(_)) => None,
        Err(e) => Some(Err(e)),
    }
}

/// The splice, checked against the splice in place: the same bytes, the same counter runs, or
/// the same error.
fn splice_both(family: Family, t: &Synthetic, input: &TableInput) -> Result<NewTable, Parse> {
    let old = parse_table(family, t.info, &t.blob).unwrap();
    let reference = splice(&old, "nat", input);
    let new = in_place(family, t, input, growth_bound(family, input)).expect("chains in order");
    match (&reference, &new) {
        (Ok(r), Ok(n)) => {
            assert!(r.buf == n.buf, "the splice in place differs from the reference");
            assert_eq!(
                (&r.kept, r.num_entries, r.rules_written),
                (&n.kept, n.num_entries, n.rules_written)
            );
        }
        (Err(r), Err(n)) => assert_eq!(r.to_string(), n.to_string()),
        (r, n) => panic!("reference {:?}, in place {:?}", r.as_ref().err(), n.as_ref().err()),
    }
    reference
}

/// The chains of a laid-out table by name, each rule as (its bytes with the verdict zeroed,
/// where it jumps: a chain name, "next" for a fallthrough, or the verdict).
fn chains_of(family: Family, info: &TableInfo, blob: &[u8]) -> Vec<(String, Vec<String>)> {
    let old = parse_table(family, *info, blob).expect("a table the parser reads");
    let _ = old;
    // Walk it by hand: heads name the chains that follow.
    let mut names = std::collections::HashMap::new();
    let mut off = 0;
    while off < blob.len() {
        let next = get_u16(blob, off + family.next_offset_at()) as usize;
        let t = off + get_u16(blob, off + family.target_offset_at()) as usize;
        if get_name(&blob[t + 2..t + 31]) == b"ERROR" {
            names.insert(
                off + next,
                String::from_utf8(get_name(&blob[t + 32..t + 62]).to_vec()).unwrap(),
            );
        }
        off += next;
    }
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut off = 0;
    while off < blob.len() {
        if let Some(h) = (0..HOOKS).find(|&h| info.valid_hooks & (1 << h) != 0 && info.hook_entry[h] as usize == off) {
            out.push((super::splice::BUILTIN[h].to_string(), Vec::new()));
        }
        if let Some(name) = names.get(&off) {
            out.push((name.clone(), Vec::new()));
        }
        let next = get_u16(blob, off + family.next_offset_at()) as usize;
        let t = off + get_u16(blob, off + family.target_offset_at()) as usize;
        let tname = get_name(&blob[t + 2..t + 31]).to_vec();
        if tname == b"ERROR" {
            off += next;
            continue;
        }
        let desc = if tname.is_empty() {
            let v = get_u32(blob, t + 32) as i32;
            if v >= 0 && v as usize == off + next {
                "next".to_string()
            } else if v >= 0 {
                names
                    .get(&(v as usize))
                    .cloned()
                    .unwrap_or_else(|| format!("bad offset {v}"))
            } else {
                v.to_string()
            }
        } else {
            String::from_utf8(tname).unwrap()
        };
        if let Some(last) = out.last_mut() {
            last.1.push(desc);
        }
        off += next;
    }
    out
}

#[test]
fn splice_relocates_jumps_and_keeps_foreign_chains_and_counters() {
    let f = Family::V4;
    let r = |s: &str| encode_rule(f, &words(s)).unwrap();
    let pre = [r("-m addrtype --dst-type LOCAL -j DOCKER"), r("-j KPROXY-SERVICES")];
    let docker = [r("-i docker0 -j RETURN"), r("-j KPROXY-SVC-B")];
    let services = [r("-d 10.96.0.1 -j KPROXY-SVC-A"), r("-d 10.96.0.2 -j KPROXY-SVC-B")];
    let svc_a = [r("-j KPROXY-SEP-OLD")];
    let svc_b = [r("-m comment --comment fallthrough"), r("-j ACCEPT")];
    let sep_old = [r("-s 10.244.0.3 -j ACCEPT")];
    let t = synthetic(
        f,
        &[(0, &pre), (4, &[])],
        &[
            ("DOCKER", &docker),
            ("KPROXY-SEP-OLD", &sep_old),
            ("KPROXY-SERVICES", &services),
            ("KPROXY-SVC-A", &svc_a),
            ("KPROXY-SVC-B", &svc_b),
        ],
    );
    let input = parse_input(
        f,
        "*nat\n:KPROXY-SVC-A - [0:0]\n:KPROXY-SEP-NEW - [0:0]\n:KPROXY-SEP-OLD - [0:0]\n\
         -A KPROXY-SVC-A -j KPROXY-SEP-NEW\n-A KPROXY-SEP-NEW -s 10.244.0.9 -j ACCEPT\n\
         -I POSTROUTING 1 -j KPROXY-SERVICES\n-X KPROXY-SEP-OLD\nCOMMIT\n",
    )
    .unwrap();
    let new = splice_both(f, &t, &input[0]).unwrap();
    let blob = &new.buf[REPLACE_HEADER..];
    let mut info = TableInfo {
        valid_hooks: get_u32(&new.buf, 32),
        num_entries: get_u32(&new.buf, 36),
        size: get_u32(&new.buf, 40),
        ..TableInfo::default()
    };
    for h in 0..HOOKS {
        info.hook_entry[h] = get_u32(&new.buf, 44 + 4 * h);
        info.underflow[h] = get_u32(&new.buf, 64 + 4 * h);
    }
    assert_eq!(info.size as usize, blob.len());
    assert_eq!(
        get_u32(&new.buf, 84),
        t.info.num_entries,
        "num_counters: the old table's entries"
    );
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        chains_of(f, &info, blob),
        vec![
            ("PREROUTING".into(), s(&["DOCKER", "KPROXY-SERVICES", "-2"])),
            ("POSTROUTING".into(), s(&["KPROXY-SERVICES", "-2"])),
            ("DOCKER".into(), s(&["-5", "KPROXY-SVC-B", "-5"])),
            ("KPROXY-SEP-NEW".into(), s(&["-2", "-5"])),
            ("KPROXY-SERVICES".into(), s(&["KPROXY-SVC-A", "KPROXY-SVC-B", "-5"])),
            ("KPROXY-SVC-A".into(), s(&["KPROXY-SEP-NEW", "-5"])),
            ("KPROXY-SVC-B".into(), s(&["next", "-2", "-5"])),
        ]
    );
    // Counters: every kept entry's old counters land on its new place; new rules start at 0;
    // the built-in policies start at 0 as with iptables-restore --noflush.
    let old_counters: Vec<u8> = (0..t.info.num_entries as u64)
        .flat_map(|i| [(i + 1).to_ne_bytes(), ((i + 1) * 100).to_ne_bytes()].concat())
        .collect();
    let c = new.counters("nat", &old_counters);
    assert_eq!(get_u32(&c, TABLE_NAME_LEN) as usize, new.num_entries);
    let packets: Vec<u64> = (0..new.num_entries)
        .map(|i| u64::from_ne_bytes(c[COUNTERS_INFO_HEADER + 16 * i..][..8].try_into().unwrap()))
        .collect();
    // Old entry i has i + 1 packets: PREROUTING 1-3 (3 the policy), POSTROUTING 4, DOCKER
    // 5-8, SEP-OLD 9-11, SERVICES 12-15, SVC-A 16-18, SVC-B 19-22, the closing entry 23.
    assert_eq!(
        packets,
        [1, 2, 0, 0, 0, 5, 6, 7, 8, 0, 0, 0, 12, 13, 14, 15, 16, 0, 18, 19, 20, 21, 22, 23]
    );
}

#[test]
fn splice_refuses_to_delete_a_referenced_chain_and_leaves_unknown_targets_to_iptables() {
    let f = Family::V4;
    let r = |s: &str| encode_rule(f, &words(s)).unwrap();
    let t = synthetic(f, &[(0, &[r("-j KPROXY-SEP-X")])], &[("KPROXY-SEP-X", &[])]);
    let input = parse_input(f, "*nat\n:KPROXY-SEP-X - [0:0]\n-X KPROXY-SEP-X\nCOMMIT\n").unwrap();
    match splice_both(f, &t, &input[0]) {
        Err(Parse::Invalid { line: 3, why }) => assert!(why.contains("still referenced"), "{why}"),
        other => panic!("{other:?}"),
    }
    let input = parse_input(f, "*nat\n-A PREROUTING -j SOMETARGET\nCOMMIT\n").unwrap();
    assert!(matches!(
        splice_both(f, &t, &input[0]),
        Err(Parse::Unsupported { line: 2, .. })
    ));
    let input = parse_input(f, "*nat\n-A NOCHAIN -j ACCEPT\nCOMMIT\n").unwrap();
    assert!(matches!(
        splice_both(f, &t, &input[0]),
        Err(Parse::Invalid { line: 2, .. })
    ));
    // Declaring then deleting an unreferenced chain is fine, and so is an empty input.
    let input = parse_input(f, "*nat\n:KPROXY-NEW - [0:0]\n-X KPROXY-NEW\nCOMMIT\n").unwrap();
    let new = splice_both(f, &t, &input[0]).unwrap();
    assert_eq!(new.num_entries, t.info.num_entries as usize);
    assert_eq!(&new.buf[REPLACE_HEADER..], &t.blob[..], "the same table, byte for byte");
    assert!(matches!(input[0].ops[0], Op::Declare { .. }));
}

#[test]
fn the_splice_in_place_moves_runs_both_ways_and_hands_back_a_table_out_of_order() {
    let f = Family::V4;
    let r = |s: &str| encode_rule(f, &words(s)).unwrap();
    let pre = [r("-j KPROXY-SERVICES")];
    let services = [r("-d 10.96.0.1 -j KPROXY-SVC-A"), r("-d 10.96.0.2 -j KPROXY-SVC-B")];
    let a = [r("-j KPROXY-SEP-A1"), r("-j KPROXY-SEP-A2")];
    let b = [r("-m comment --comment fallthrough"), r("-j KPROXY-SEP-B1")];
    let sep = [r("-s 10.244.0.3 -j ACCEPT")];
    let users: [(&str, &[Rule]); 7] = [
        ("KPROXY-SEP-A1", &sep),
        ("KPROXY-SEP-A2", &sep),
        ("KPROXY-SEP-B1", &sep),
        ("KPROXY-SERVICES", &services),
        ("KPROXY-SVC-A", &a),
        ("KPROXY-SVC-B", &b),
        ("ZZZ-FOREIGN", &sep),
    ];
    let t = synthetic(f, &[(0, &pre), (3, &[]), (4, &[])], &users);
    // Grows at the front (a new chain sorted first, a rule in PREROUTING), shrinks in the middle
    // (SVC-A loses a rule, SEP-A2 goes), grows again (SVC-B gets two), keeps the rest.
    let inputs = [
        "*nat\n:KPROXY-AAA - [0:0]\n-A KPROXY-AAA -j ACCEPT\n-I PREROUTING 1 -j KPROXY-AAA\n\
         :KPROXY-SVC-A - [0:0]\n:KPROXY-SEP-A2 - [0:0]\n-A KPROXY-SVC-A -j KPROXY-SEP-A1\n-X KPROXY-SEP-A2\n\
         -A KPROXY-SVC-B -j KPROXY-SEP-A1\n-A KPROXY-SVC-B -j KPROXY-SEP-B1\nCOMMIT\n",
        // Only shrinks: everything moves towards the front.
        "*nat\n:KPROXY-SEP-A1 - [0:0]\n:KPROXY-SEP-A2 - [0:0]\n:KPROXY-SVC-A - [0:0]\n\
         -X KPROXY-SEP-A2\n-A KPROXY-SVC-A -j KPROXY-SEP-A1\nCOMMIT\n",
        // Only grows: everything after POSTROUTING moves towards the back.
        "*nat\n-A POSTROUTING -j KPROXY-SERVICES\n-A OUTPUT -j KPROXY-SERVICES\nCOMMIT\n",
        "*nat\nCOMMIT\n",
    ];
    for text in inputs {
        let input = parse_input(f, text).unwrap();
        let new = splice_both(f, &t, &input[0]).unwrap();
        // More slack than needed changes nothing; less than the growth is refused, not overrun.
        let more = in_place(f, &t, &input[0], 4096).unwrap().unwrap();
        assert!(more.buf == new.buf);
        let growth = (new.buf.len() - REPLACE_HEADER).saturating_sub(t.blob.len());
        if growth > 0 {
            assert!(matches!(
                in_place(f, &t, &input[0], growth - 1),
                Some(Err(Parse::Unsupported { .. }))
            ));
        }
    }
    // User chains not in libiptc's order: the buffer comes back and the caller splices the
    // other way.
    let mut shuffled = users;
    shuffled.swap(0, 6);
    let t = synthetic(f, &[(0, &pre), (4, &[])], &shuffled);
    let input = parse_input(f, "*nat\nCOMMIT\n").unwrap();
    assert!(in_place(f, &t, &input[0], 0).is_none());
}

mod kernel;
