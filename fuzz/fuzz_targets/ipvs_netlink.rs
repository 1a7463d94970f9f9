//! The IPVS generic-netlink reply decoders: any datagram the kernel (or anything else on the
//! socket) might send must decode to messages or to an error, never a panic.
#![no_main]

use kproxy::dataplane::ipvs::netlink::{
    decode_dest, decode_family_id, decode_info_version, decode_replies, decode_service, Reply,
};
use libfuzzer_sys::fuzz_target;

fn attrs(buf: &[u8]) {
    let _ = decode_family_id(buf);
    let _ = decode_info_version(buf);
    let _ = decode_service(buf);
    let _ = decode_dest(buf, &"10.96.0.10".parse().expect("IPv4"));
    let _ = decode_dest(buf, &"fd00::10".parse().expect("IPv6"));
}

fuzz_target!(|data: &[u8]| {
    if let Ok(replies) = decode_replies(data) {
        for reply in replies {
            if let Reply::Data { attrs: a, .. } = reply {
                attrs(a);
            }
        }
    }
    // Attribute buffers straight from the input too, so the fuzzer need not build headers.
    attrs(data);
});
