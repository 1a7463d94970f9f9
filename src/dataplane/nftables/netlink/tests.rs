//! Encoding checked against the bytes nft 1.0.6 sent to the kernel for the same commands, and
//! decoding against what the kernel listed back for `nft list ruleset`. The vectors in
//! `testdata/` are made by `scripts/nft-capture.py testdata/ipvN.nft` (strace of nft in a
//! throwaway network namespace, Linux 6.18); each `add` command there is one message.

use std::net::IpAddr;

use super::wire::{decode_replies, Attrs, Reply, NLM_F_ACK, NLM_F_ECHO, NLM_F_REQUEST};
use super::*;
use crate::dataplane::nftables::rule::{
    Field, Key, Rule, SetDecl, SetKind, Stmt, Value, CT_STATE_INVALID, CT_STATE_NEW,
};
use crate::model::Protocol;

struct Capture {
    /// (nft command, the message nft sent for it)
    sent: Vec<(String, Vec<u8>)>,
    /// (`list TYPE`, one message of the kernel's dump)
    listed: Vec<(String, Vec<u8>)>,
}

fn load(text: &str) -> Capture {
    let mut c = Capture {
        sent: vec![],
        listed: vec![],
    };
    let mut lines = text.lines();
    while let (Some(label), Some(hex)) = (lines.next(), lines.next()) {
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        match label.split_at(2) {
            ("> ", cmd) => c.sent.push((cmd.to_string(), bytes)),
            ("< ", what) => c.listed.push((what.to_string(), bytes)),
            _ => panic!("bad capture line {label}"),
        }
    }
    c
}

fn v4() -> Capture {
    load(include_str!("testdata/ipv4.txt"))
}

fn v6() -> Capture {
    load(include_str!("testdata/ipv6.txt"))
}

impl Capture {
    fn sent(&self, cmd: &str) -> &[u8] {
        &self
            .sent
            .iter()
            .find(|(c, _)| c == cmd)
            .unwrap_or_else(|| panic!("no capture of {cmd}"))
            .1
    }
}

/// The message without its flags and sequence number: kproxy asks for acknowledgements (and
/// echoes of rules), nft does not; everything else must be byte for byte the same.
fn normalized(msg: &[u8]) -> Vec<u8> {
    let mut m = msg.to_vec();
    m[6..12].fill(0);
    m
}

/// `msg` without its top-level attribute `kind` (nft names sets by name and by id; kproxy by
/// name only, which the kernel resolves first).
fn without_attr(msg: &[u8], kind: u16) -> Vec<u8> {
    let mut out = msg[..20].to_vec();
    for (k, payload) in Attrs(&msg[20..]).iter() {
        if k != kind {
            // Re-encode, preserving the nested flag of the original header.
            let at = payload.as_ptr() as usize - msg.as_ptr() as usize - 4;
            let len = 4 + payload.len();
            out.extend_from_slice(&msg[at..at + len]);
            out.resize(out.len().div_ceil(4) * 4, 0);
        }
    }
    let len = out.len() as u32;
    out[..4].copy_from_slice(&len.to_ne_bytes());
    out
}

fn encode_one(r: &Request) -> Vec<u8> {
    let mut buf = Vec::new();
    r.encode(1, &mut buf);
    buf
}

const V4: Table = Table {
    family: IpFamily::V4,
    name: "kproxy",
};
const V6: Table = Table {
    family: IpFamily::V6,
    name: "kproxy",
};
const SVC: &str = "service-AAAAAAAA-ns/web/tcp/http";

fn net(s: &str) -> ipnet::IpNet {
    match s.parse() {
        Ok(n) => n,
        Err(_) => ipnet::IpNet::from(s.parse::<IpAddr>().unwrap()),
    }
}

fn jump(c: &str) -> Stmt {
    Stmt::Verdict(Verdict::Jump(c.into()))
}

fn goto(c: &str) -> Stmt {
    Stmt::Verdict(Verdict::Goto(c.into()))
}

const DST: [Field; 3] = [Field::Daddr, Field::L4proto, Field::ThDport];

/// Every rule of `testdata/ipv4.nft`, as kproxy's values: (chain, rule).
fn v4_rules() -> Vec<(&'static str, Rule)> {
    vec![
        (
            "services",
            Rule::new(vec![Stmt::Vmap {
                key: DST.to_vec(),
                map: "service-ips".into(),
            }]),
        ),
        (
            "services",
            Rule::new(vec![
                Stmt::FibLocal(Field::Daddr),
                Stmt::Addr {
                    field: Field::Daddr,
                    negate: true,
                    net: net("127.0.0.0/8"),
                },
                Stmt::Vmap {
                    key: vec![Field::L4proto, Field::ThDport],
                    map: "service-nodeports".into(),
                },
            ]),
        ),
        ("mark-for-masquerade", Rule::new(vec![Stmt::MarkOr(0x4000)])),
        (
            SVC,
            Rule::new(vec![
                Stmt::Addr {
                    field: Field::Daddr,
                    negate: false,
                    net: net("10.96.0.10"),
                },
                Stmt::Dport {
                    proto: Protocol::Tcp,
                    port: 80,
                },
                Stmt::Addr {
                    field: Field::Saddr,
                    negate: true,
                    net: net("10.244.0.0/16"),
                },
                jump("mark-for-masquerade"),
            ]),
        ),
        (
            SVC,
            Rule::new(vec![
                Stmt::L4proto(Protocol::Tcp),
                Stmt::Numgen { modulus: 2, value: 0 },
                Stmt::Dnat {
                    addr: "10.244.1.2".parse().unwrap(),
                    port: 8080,
                },
            ]),
        ),
        (
            SVC,
            Rule::new(vec![
                Stmt::InSet {
                    key: vec![Field::Saddr],
                    set: "affinity-X".into(),
                    negate: false,
                },
                goto("mark-for-masquerade"),
            ]),
        ),
        (
            SVC,
            Rule::new(vec![Stmt::Update {
                set: "affinity-X".into(),
                key: Field::Saddr,
            }]),
        ),
        (
            "masquerading",
            Rule::new(vec![
                Stmt::MarkTest {
                    mask: 0x4000,
                    zero: true,
                },
                Stmt::Verdict(Verdict::Return),
            ]),
        ),
        ("masquerading", Rule::new(vec![Stmt::MarkXor(0x4000)])),
        ("masquerading", Rule::new(vec![Stmt::Masquerade { fully_random: true }])),
        (
            "filter-input",
            Rule::new(vec![Stmt::CtState(CT_STATE_NEW), jump("mark-for-masquerade")]),
        ),
        (
            "filter-input",
            Rule::new(vec![Stmt::CtState(CT_STATE_INVALID), Stmt::Verdict(Verdict::Drop)]),
        ),
        (
            "filter-input",
            Rule::new(vec![
                Stmt::Iifname {
                    negate: true,
                    name: "veth*".into(),
                },
                Stmt::FibLocal(Field::Saddr),
                Stmt::Reject,
            ]),
        ),
        (
            "filter-input",
            Rule::new(vec![
                Stmt::Iifname {
                    negate: false,
                    name: "cni0".into(),
                },
                Stmt::Addr {
                    field: Field::Saddr,
                    negate: false,
                    net: net("10.1.0.0/20"),
                },
                Stmt::Verdict(Verdict::Return),
            ]),
        ),
        (
            "filter-input",
            Rule::new(vec![
                Stmt::InSet {
                    key: vec![Field::Saddr],
                    set: "affinity-X".into(),
                    negate: true,
                },
                Stmt::Verdict(Verdict::Accept),
            ]),
        ),
    ]
}

fn v6_rules() -> Vec<(&'static str, Rule)> {
    vec![
        (
            "c",
            Rule::new(vec![Stmt::Vmap {
                key: DST.to_vec(),
                map: "service-ips".into(),
            }]),
        ),
        (
            "c",
            Rule::new(vec![
                Stmt::Addr {
                    field: Field::Saddr,
                    negate: true,
                    net: net("fd00:244::/64"),
                },
                Stmt::Addr {
                    field: Field::Daddr,
                    negate: true,
                    net: net("::1"),
                },
                Stmt::Reject,
            ]),
        ),
        (
            "c",
            Rule::new(vec![
                Stmt::L4proto(Protocol::Tcp),
                Stmt::Dnat {
                    addr: "fd00:244::2".parse().unwrap(),
                    port: 8080,
                },
            ]),
        ),
        (
            "c",
            Rule::new(vec![
                Stmt::CtStatusDnat,
                Stmt::InSet {
                    key: vec![Field::Saddr, Field::Daddr],
                    set: "hairpin".into(),
                    negate: false,
                },
                jump("c"),
            ]),
        ),
    ]
}

fn family_word(t: Table) -> &'static str {
    match t.family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    }
}

fn rule_command(t: Table, chain: &str, rule: &Rule) -> String {
    format!("add rule {} kproxy {chain} {}", family_word(t), rule.text(t.family))
}

/// The expressions of one captured NEWRULE message, as kproxy decodes them.
fn captured_exprs(msg: &[u8]) -> Vec<Expr> {
    let a = Attrs(&msg[20..]);
    let list = a.nest(4).expect("NFTA_RULE_EXPRESSIONS");
    list.iter().map(|(_, e)| Expr::decode(Attrs(e)).unwrap()).collect()
}

#[test]
fn rules_print_as_the_captured_commands_and_lower_as_nft_does() {
    for (t, cap, rules) in [(V4, v4(), v4_rules()), (V6, v6(), v6_rules())] {
        for (chain, rule) in rules {
            let cmd = rule_command(t, chain, &rule);
            let got = rule.lower(t.family);
            let want = captured_exprs(cap.sent(&cmd));
            assert_eq!(got, want, "{cmd}");
            assert!(
                !want.iter().any(|e| matches!(e, Expr::Other { .. })),
                "{cmd}: every expression nft wrote decodes"
            );
        }
    }
}

#[test]
fn rules_without_set_references_encode_as_nft_does() {
    for (t, cap, rules) in [(V4, v4(), v4_rules()), (V6, v6(), v6_rules())] {
        for (chain, rule) in rules {
            let exprs = rule.lower(t.family);
            // nft adds the set's id to lookups and the (default) operation to the bitwise of
            // `meta mark set`; both mean the same to the kernel and are checked above.
            let skip = exprs
                .iter()
                .any(|e| matches!(e, Expr::Lookup { .. } | Expr::Dynset { .. }))
                || rule
                    .0
                    .iter()
                    .any(|s| matches!(s, Stmt::MarkOr(_) | Stmt::MarkXor(_) | Stmt::MarkTest { .. }));
            if skip {
                continue;
            }
            let cmd = rule_command(t, chain, &rule);
            let mine = encode_one(&Request::AddRule {
                table: t,
                chain: chain.into(),
                exprs,
            });
            assert_eq!(normalized(&mine), normalized(cap.sent(&cmd)), "{cmd}");
        }
    }
}

fn decls(family: IpFamily) -> Vec<SetDecl> {
    let d = |name: &str, kind| SetDecl {
        name: name.into(),
        kind,
    };
    match family {
        IpFamily::V4 => vec![
            d("service-ips", SetKind::AddrPortMap),
            d("service-nodeports", SetKind::ProtoPortMap),
            d("hairpin", SetKind::AddrPair),
            d("affinity-X", SetKind::Affinity { timeout: 600 }),
        ],
        IpFamily::V6 => vec![
            d("service-ips", SetKind::AddrPortMap),
            d("hairpin", SetKind::AddrPair),
            d("affinity-X", SetKind::Affinity { timeout: 10800 }),
        ],
    }
}

#[test]
fn declarations_encode_as_nft_does() {
    for (t, cap) in [(V4, v4()), (V6, v6())] {
        let fam = family_word(t);
        let table = encode_one(&Request::AddTable(t));
        assert_eq!(
            normalized(&table),
            normalized(cap.sent(&format!("add table {fam} kproxy")))
        );
        for (id, decl) in decls(t.family).iter().enumerate() {
            let cmd = format!(
                "add {} {fam} kproxy {} {{ {} }}",
                decl.noun(),
                decl.name,
                decl.text(t.family)
            );
            let mine = encode_one(&Request::AddSet {
                table: t,
                spec: decl.spec(t.family),
                id: id as u32 + 1,
            });
            assert_eq!(normalized(&mine), normalized(cap.sent(&cmd)), "{cmd}");
        }
    }
    let cap = v4();
    for (name, hook, cmd) in [
        (
            "nat-prerouting",
            Some(BaseHook {
                kind: "nat",
                hook: hook::PREROUTING,
                priority: -100,
            }),
            "add chain ip kproxy nat-prerouting { type nat hook prerouting priority dstnat; policy accept; }",
        ),
        (
            "filter-input",
            Some(BaseHook {
                kind: "filter",
                hook: hook::INPUT,
                priority: -110,
            }),
            "add chain ip kproxy filter-input { type filter hook input priority -110; policy accept; }",
        ),
        (SVC, None, "add chain ip kproxy service-AAAAAAAA-ns/web/tcp/http"),
    ] {
        let mine = encode_one(&Request::AddChain {
            table: V4,
            name: name.into(),
            hook,
        });
        assert_eq!(normalized(&mine), normalized(cap.sent(cmd)), "{cmd}");
    }
}

#[test]
fn elements_encode_as_nft_does() {
    let cap = v4();
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    for (set, key, data, cmd) in [
        (
            "service-ips",
            Key::AddrPort(ip("10.96.0.10"), Protocol::Tcp, 80),
            Some(Data::Verdict(Verdict::Goto(SVC.into()))),
            "add element ip kproxy service-ips { 10.96.0.10 . tcp . 80 : goto service-AAAAAAAA-ns/web/tcp/http }",
        ),
        (
            "service-nodeports",
            Key::ProtoPort(Protocol::Tcp, 30080),
            Some(Data::Verdict(Verdict::Drop)),
            "add element ip kproxy service-nodeports { tcp . 30080 : drop }",
        ),
        (
            "hairpin",
            Key::Pair(ip("10.244.1.2")),
            None,
            "add element ip kproxy hairpin { 10.244.1.2 . 10.244.1.2 }",
        ),
    ] {
        let mine = encode_one(&Request::AddElements {
            table: V4,
            set: set.into(),
            elements: vec![Element { key: key.bytes(), data }],
        });
        // NFTA_SET_ELEM_LIST_SET_ID (4): nft's second name for the set.
        assert_eq!(normalized(&mine), normalized(&without_attr(cap.sent(cmd), 4)), "{cmd}");
    }
    let v6cap = v6();
    let mine = encode_one(&Request::AddElements {
        table: V6,
        set: "service-ips".into(),
        elements: vec![Element {
            key: Key::AddrPort(ip("fd00::10"), Protocol::Tcp, 80).bytes(),
            data: Some(Data::Verdict(Verdict::Goto("c".into()))),
        }],
    });
    let cmd = "add element ip6 kproxy service-ips { fd00::10 . tcp . 80 : goto c }";
    assert_eq!(normalized(&mine), normalized(&without_attr(v6cap.sent(cmd), 4)));
}

#[test]
fn requests_ask_for_acks_and_rules_for_their_echo() {
    let flags = |r: &Request| u16::from_ne_bytes(encode_one(r)[6..8].try_into().unwrap());
    let rule = Request::AddRule {
        table: V4,
        chain: "c".into(),
        exprs: vec![],
    };
    assert_eq!(flags(&rule), NLM_F_REQUEST | NLM_F_ACK | NLM_F_ECHO | 0x400 | 0x800);
    let replace = Request::ReplaceRule {
        table: V4,
        chain: "c".into(),
        handle: 7,
        exprs: vec![],
    };
    assert_eq!(flags(&replace), NLM_F_REQUEST | NLM_F_ACK | NLM_F_ECHO | 0x100);
    assert_eq!(flags(&Request::DeleteTable(V4)), NLM_F_REQUEST | NLM_F_ACK);
    // The handle travels as a big-endian u64 after table and chain.
    let del = encode_one(&Request::DeleteRule {
        table: V4,
        chain: "c".into(),
        handle: 0x22,
    });
    assert_eq!(&del[del.len() - 12..], &[12, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0x22]);
}

#[test]
fn a_batch_carries_the_generation_it_was_planned_against() {
    let reqs = [Request::AddTable(V4)];
    let batch = encode_batch(0x0b, 5, &reqs);
    // BEGIN: length 28, type 16, flags REQUEST, seq 4, family AF_UNSPEC, res_id htons(10),
    // then NFNL_BATCH_GENID (be32).
    assert_eq!(
        &batch[..28],
        &[28, 0, 0, 0, 16, 0, 1, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10, 8, 0, 1, 0, 0, 0, 0, 0x0b]
    );
    let table = encode_one(&Request::AddTable(V4));
    assert_eq!(&batch[28..28 + 6], &table[..6], "the request follows");
    let flags = u16::from_ne_bytes(batch[34..36].try_into().unwrap());
    assert_eq!(
        flags,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_ECHO,
        "the first asks for an echo"
    );
    assert_eq!(u32::from_ne_bytes(batch[36..40].try_into().unwrap()), 5, "as message 5");
    let end = &batch[batch.len() - 20..];
    assert_eq!(end, &[20, 0, 0, 0, 17, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10]);
    // Without a generation, the begin message is nft's own.
    let plain = encode_batch(0, 1, &reqs);
    assert_eq!(
        &plain[..20],
        &[20, 0, 0, 0, 16, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10]
    );
}

/// The captured dump messages of one kind, decoded as replies.
fn listed<'a>(cap: &'a Capture, what: &str) -> Vec<(u8, Attrs<'a>)> {
    cap.listed
        .iter()
        .filter(|(w, _)| w == what)
        .map(|(_, raw)| match decode_replies(raw).unwrap().remove(0) {
            Reply::Message { family, attrs, .. } => (family, attrs),
            other => panic!("not a message: {other:?}"),
        })
        .collect()
}

#[test]
fn the_kernels_listing_decodes_to_what_was_written() {
    for (t, cap, rules) in [(V4, v4(), v4_rules()), (V6, v6(), v6_rules())] {
        let fam = nfproto(t.family);
        let dumped: Vec<RuleInfo> = listed(&cap, "list rule")
            .into_iter()
            .filter(|(f, _)| *f == fam)
            .map(|(_, a)| decode_rule(a).unwrap())
            .collect();
        assert_eq!(dumped.len(), rules.len());
        let mut handles = std::collections::BTreeSet::new();
        for (chain, rule) in &rules {
            let want = rule.lower(t.family);
            let found = dumped
                .iter()
                .find(|r| r.chain == *chain && r.exprs == want)
                .unwrap_or_else(|| {
                    let there: Vec<_> = dumped.iter().filter(|r| r.chain == *chain).map(|r| &r.exprs).collect();
                    panic!(
                        "{} not read back as {want:?}; {chain} has {there:#?}",
                        rule.text(t.family)
                    )
                });
            assert_eq!(found.table, "kproxy");
            assert!(found.userdata.is_none());
            handles.insert(found.handle);
        }
        assert_eq!(handles.len(), rules.len(), "every rule has its own handle");

        let sets: Vec<SetSpec> = listed(&cap, "list set")
            .into_iter()
            .filter(|(f, _)| *f == fam)
            .map(|(_, a)| decode_set(a).unwrap())
            .collect();
        for decl in decls(t.family) {
            assert!(
                sets.contains(&decl.spec(t.family)),
                "{} reads back as declared: {sets:?}",
                decl.name
            );
        }

        let chains: Vec<ChainInfo> = listed(&cap, "list chain")
            .into_iter()
            .filter(|(f, _)| *f == fam)
            .map(|(f, a)| decode_chain(f, a).unwrap())
            .collect();
        if t.family == IpFamily::V4 {
            let pre = chains.iter().find(|c| c.name == "nat-prerouting").unwrap();
            assert_eq!(
                pre.hook,
                Some(BaseHook {
                    kind: "nat",
                    hook: hook::PREROUTING,
                    priority: -100
                })
            );
            assert_eq!(pre.policy, Some(1));
            assert!(chains.iter().any(|c| c.name == SVC && c.hook.is_none()));
        }
    }

    let cap = v4();
    let elements: Vec<(String, Vec<Element>)> = listed(&cap, "list element")
        .into_iter()
        .filter(|(f, _)| *f == 2)
        .map(|(_, a)| decode_elements(a).unwrap())
        .filter(|(_, e)| !e.is_empty())
        .collect();
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let find = |set: &str| elements.iter().find(|(s, _)| s == set).map(|(_, e)| e.clone()).unwrap();
    assert_eq!(
        find("service-ips"),
        vec![Element {
            key: Key::AddrPort(ip("10.96.0.10"), Protocol::Tcp, 80).bytes(),
            data: Some(Data::Verdict(Verdict::Goto(SVC.into()))),
        }]
    );
    assert_eq!(
        find("hairpin"),
        vec![Element {
            key: Key::Pair(ip("10.244.1.2")).bytes(),
            data: None,
        }]
    );
}

#[test]
fn errors_and_generations_decode() {
    // NLMSG_ERROR for message 3: -ENOENT (2), capped request header, extended ack text.
    let mut m = Vec::new();
    let msg = b"Could not process rule\0\0";
    let len = 16 + 4 + 16 + 4 + msg.len();
    m.extend((len as u32).to_ne_bytes());
    m.extend(2u16.to_ne_bytes());
    m.extend((0x100u16 | 0x200).to_ne_bytes());
    m.extend(3u32.to_ne_bytes());
    m.extend(0u32.to_ne_bytes());
    m.extend((-2i32).to_ne_bytes());
    m.extend(36u32.to_ne_bytes());
    m.extend([0u8; 12]);
    m.extend(((4 + msg.len() - 1) as u16).to_ne_bytes());
    m.extend(1u16.to_ne_bytes());
    m.extend(msg);
    let replies = decode_replies(&m).unwrap();
    assert_eq!(
        replies,
        vec![Reply::Error {
            seq: 3,
            errno: 2,
            message: Some("Could not process rule".into())
        }]
    );
    // NFT_MSG_NEWGEN as the kernel answered nft's GETGEN in the capture run.
    let gen = hex_bytes("2c0000000f0a0000000000007a530000000000090800010000000009080002000000537a080003006e667400");
    match decode_replies(&gen).unwrap().remove(0) {
        Reply::Message { kind, attrs, .. } => {
            assert_eq!(kind, msg::NEWGEN);
            assert_eq!(decode_gen(attrs).unwrap(), 9);
        }
        other => panic!("{other:?}"),
    }
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The endpoint maps, the bucket rules and the slot elements, against
/// `testdata/endpointsN.txt` (`scripts/nft-capture.py testdata/endpointsN.nft`, with the
/// bucket sets `cluster-n2` and `np-n2` created first).
#[test]
fn endpoint_maps_encode_as_nft_does() {
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    let v4 = load(include_str!("testdata/endpoints4.txt"));
    let v6 = load(include_str!("testdata/endpoints6.txt"));
    for (t, cap) in [(V4, &v4), (V6, &v6)] {
        let mut id = 0;
        for p in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            for kind in [SetKind::EndpointMap(p), SetKind::NodePortEndpointMap(p)] {
                id += 1;
                let by = if matches!(kind, SetKind::EndpointMap(_)) {
                    "service"
                } else {
                    "nodeport"
                };
                let decl = SetDecl {
                    name: format!("{by}-endpoints-{p}"),
                    kind,
                };
                let fam = family_word(t);
                let cmd = format!(
                    "add {} {fam} kproxy {} {{ {} }}",
                    decl.noun(),
                    decl.name,
                    decl.text(t.family)
                );
                let mine = encode_one(&Request::AddSet {
                    table: t,
                    spec: decl.spec(t.family),
                    id,
                });
                assert_eq!(normalized(&mine), normalized(cap.sent(&cmd)), "{cmd}");
            }
        }
    }
    let by_addr = Rule::new(vec![
        Stmt::L4proto(Protocol::Tcp),
        Stmt::InSet {
            key: DST.to_vec(),
            set: "cluster-n2".into(),
            negate: false,
        },
        Stmt::DnatMap {
            key: vec![Field::Daddr, Field::ThDport, Field::Slot { modulus: 2, offset: 0 }],
            map: "service-endpoints-tcp".into(),
        },
    ]);
    let by_port = Rule::new(vec![
        Stmt::L4proto(Protocol::Udp),
        Stmt::InSet {
            key: DST[1..].to_vec(),
            set: "np-n2".into(),
            negate: false,
        },
        Stmt::DnatMap {
            key: vec![
                Field::ThDport,
                Field::Slot {
                    modulus: 2,
                    offset: 65536,
                },
            ],
            map: "nodeport-endpoints-udp".into(),
        },
    ]);
    for (t, cap) in [(V4, &v4), (V6, &v6)] {
        for rule in [&by_addr, &by_port] {
            let cmd = rule_command(t, "c", rule);
            // nft leaves the port-mapping flag of a map `dnat` to the kernel, which sets it
            // (and lists it) for a port register; kproxy sends it.
            let want: Vec<Expr> = captured_exprs(cap.sent(&cmd))
                .into_iter()
                .map(|e| match e {
                    Expr::Nat {
                        kind,
                        family,
                        reg_addr,
                        reg_proto: Some(r),
                        flags,
                    } => Expr::Nat {
                        kind,
                        family,
                        reg_addr,
                        reg_proto: Some(r),
                        flags: flags | expr::NAT_F_PROTO_SPECIFIED,
                    },
                    e => e,
                })
                .collect();
            assert_eq!(rule.lower(t.family), want, "{cmd}");
            assert!(!want.iter().any(|e| matches!(e, Expr::Other { .. })), "{cmd}");
        }
    }
    for (t, cap, set, key, data, cmd) in [
        (
            V4,
            &v4,
            "service-endpoints-tcp",
            Key::AddrPortSlot(ip("10.96.0.1"), Protocol::Tcp, 80, 1),
            Value::Endpoint(ip("10.1.1.1"), 8080),
            "add element ip kproxy service-endpoints-tcp { 10.96.0.1 . 80 . 1 : 10.1.1.1 . 8080 }",
        ),
        (
            V4,
            &v4,
            "nodeport-endpoints-udp",
            Key::ProtoPortSlot(Protocol::Udp, 30053, 65536),
            Value::Endpoint(ip("10.1.1.1"), 53),
            "add element ip kproxy nodeport-endpoints-udp { 30053 . 65536 : 10.1.1.1 . 53 }",
        ),
        (
            V6,
            &v6,
            "service-endpoints-tcp",
            Key::AddrPortSlot(ip("fd00::1"), Protocol::Tcp, 80, 1),
            Value::Endpoint(ip("fd00::2"), 8080),
            "add element ip6 kproxy service-endpoints-tcp { fd00::1 . 80 . 1 : fd00::2 . 8080 }",
        ),
    ] {
        assert_eq!(
            format!("add element {} kproxy {set} {{ {key} : {data} }}", family_word(t)),
            cmd
        );
        let mine = encode_one(&Request::AddElements {
            table: t,
            set: set.into(),
            elements: vec![Element {
                key: key.bytes(),
                data: Some(data.data()),
            }],
        });
        // nft also names the set by the id it gave it in the same batch.
        assert_eq!(normalized(&mine), normalized(&without_attr(cap.sent(cmd), 4)), "{cmd}");
    }
}

/// Found by fuzzing (fuzz/fuzz_targets/nft_netlink.rs): an error message whose code is
/// i32::MIN negated with overflow. Whatever the code, it decodes.
#[test]
fn an_error_code_of_any_value_decodes() {
    let mut buf = vec![0x14, 0, 0, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    buf.extend_from_slice(&0x8000_0000u32.to_le_bytes());
    let replies = super::wire::decode_replies(&buf).expect("one error message");
    assert!(matches!(replies[..], [super::wire::Reply::Error { .. }]), "{replies:?}");
}
