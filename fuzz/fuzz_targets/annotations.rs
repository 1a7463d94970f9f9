//! The ingress-nginx annotations kproxy implements: any value under any known name (and
//! unknown names under both prefixes) must parse to settings or to an error, never a panic.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use kproxy::ingress::annotations::{parse, parse_size, KNOWN as NAMES, KPROXY_PREFIX, NGINX_PREFIX};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    /// (name index, kproxy prefix instead of nginx's, value)
    known: Vec<(u8, bool, String)>,
    /// Any key at all.
    other: Vec<(String, String)>,
    size: String,
}

fuzz_target!(|input: Input| {
    let mut annotations = BTreeMap::new();
    for (name, kproxy, value) in input.known {
        let prefix = if kproxy { KPROXY_PREFIX } else { NGINX_PREFIX };
        let name = NAMES[usize::from(name) % NAMES.len()];
        annotations.insert(format!("{prefix}{name}"), value);
    }
    annotations.extend(input.other);
    let parsed = parse(&annotations);
    let _ = format!("{:?}", parsed.settings);
    let _ = parse_size(&input.size);
});
