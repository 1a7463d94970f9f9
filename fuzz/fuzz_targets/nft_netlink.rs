//! The nf_tables netlink decoders: any datagram the kernel (or anything else on the socket)
//! might send, as a dump reply, an echo or an error, must decode to messages or to an error,
//! never a panic. Each decoder also gets the input as a bare attribute buffer, so the fuzzer
//! need not build netlink headers to reach it.
#![no_main]

use kproxy::dataplane::nftables::netlink::wire::{decode_replies, Attrs, Reply};
use kproxy::dataplane::nftables::netlink::{
    decode_chain, decode_elements, decode_gen, decode_rule, decode_set, decode_table, Expr,
};
use libfuzzer_sys::fuzz_target;

fn attrs(family: u8, a: Attrs) {
    let _ = decode_gen(a);
    let _ = decode_table(family, a);
    let _ = decode_chain(family, a);
    let _ = decode_rule(a);
    let _ = decode_set(a);
    let _ = decode_elements(a);
    let _ = Expr::decode(a);
}

fuzz_target!(|data: &[u8]| {
    if let Ok(replies) = decode_replies(data) {
        for reply in replies {
            if let Reply::Message { family, attrs: a, .. } = reply {
                attrs(family, a);
            }
        }
    }
    attrs(2, Attrs(data));
});
