//! Encoding checked against bytes laid out by hand from `ip_vs.h` and against bytes captured
//! from ipvsadm; decoding checked on replies captured from the kernel (see [`captured`]).

use super::*;

/// `NLM_F_MULTI`: set by the kernel on every message of a dump.
const NLM_F_MULTI: u16 = 0x2;

/// 10.96.0.10:80/tcp, as `ipvsadm -A -t 10.96.0.10:80 -s rr` names it.
fn key() -> VsKey {
    VsKey {
        addr: "10.96.0.10".parse().unwrap(),
        protocol: Protocol::Tcp,
        port: 80,
    }
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The service attributes of 10.96.0.10:80/tcp, without the nest header.
const KEY_ATTRS: &str = "
    0600 0100 0200 0000
    0600 0200 0600 0000
    1400 0300 0a60000a 00000000 00000000 00000000
    0600 0400 0050 0000";

#[test]
#[cfg(target_endian = "little")]
fn new_service_bytes() {
    let svc = VirtualService {
        key: key(),
        scheduler: "rr".into(),
        flags: 0,
        timeout: 0,
    };
    let got = Request::NewService(svc).encode(0x24, 7);
    let want = hex(&format!(
        "
        68000000 2400 0500 07000000 00000000
        01 01 0000
        5400 0180 {KEY_ATTRS}
        0700 0600 7272 0000
        0c00 0700 00000000 ffffffff
        0800 0800 00000000
        0800 0900 ffffffff"
    ));
    assert_eq!(got, want);
}

#[test]
#[cfg(target_endian = "little")]
fn persistent_service_carries_flag_and_timeout() {
    let svc = VirtualService {
        key: key(),
        scheduler: "sh".into(),
        flags: SVC_F_PERSISTENT,
        timeout: 10800,
    };
    let got = Request::SetService(svc).encode(0x24, 1);
    assert_eq!(got[16], 2, "IPVS_CMD_SET_SERVICE");
    let tail = &got[got.len() - 28..];
    assert_eq!(
        tail,
        hex("0c00 0700 01000000 ffffffff  0800 0800 302a0000  0800 0900 ffffffff").as_slice()
    );
}

#[test]
#[cfg(target_endian = "little")]
fn new_dest_bytes() {
    let rs = RealServer {
        addr: "10.244.1.2".parse().unwrap(),
        port: 8080,
        weight: 1,
        fwd_method: FWD_MASQ,
    };
    let got = Request::NewDest(key(), rs).encode(0x24, 2);
    let want = hex(&format!(
        "
        8c000000 2400 0500 02000000 00000000
        05 01 0000
        3000 0180 {KEY_ATTRS}
        4800 0280
          1400 0100 0af40102 00000000 00000000 00000000
          0600 0200 1f90 0000
          0800 0300 00000000
          0800 0400 01000000
          0800 0500 00000000
          0800 0600 00000000
          0600 0b00 0200 0000"
    ));
    assert_eq!(got, want);
}

#[test]
#[cfg(target_endian = "little")]
fn del_dest_names_only_the_server() {
    let rs = RealServer {
        addr: "10.244.1.2".parse().unwrap(),
        port: 8080,
        weight: 0,
        fwd_method: FWD_MASQ,
    };
    let got = Request::DelDest(key(), rs).encode(0x24, 3);
    assert_eq!(got[16], 7, "IPVS_CMD_DEL_DEST");
    let dest = &got[got.len() - 0x28..];
    assert_eq!(
        dest,
        hex("2800 0280  1400 0100 0af40102 00000000 00000000 00000000  0600 0200 1f90 0000  0600 0b00 0200 0000")
            .as_slice()
    );
}

#[test]
#[cfg(target_endian = "little")]
fn dumps_and_family_lookup() {
    assert_eq!(
        encode_dump_services(0x24, 9),
        hex("14000000 2400 0103 09000000 00000000 04 01 0000")
    );
    let d = encode_dump_dests(0x24, 9, &key());
    assert_eq!(&d[4..8], hex("2400 0103").as_slice(), "request + dump");
    assert_eq!(d[16], 8, "IPVS_CMD_GET_DEST");
    assert_eq!(
        encode_get_family("IPVS", 1),
        hex("20000000 1000 0500 01000000 00000000 03 01 0000 0900 0200 49505653 00 000000")
    );
    let t = Request::SetTimeouts {
        tcp: 900,
        tcp_fin: 0,
        udp: 300,
    }
    .encode(0x24, 4);
    assert_eq!(t[16], 12, "IPVS_CMD_SET_CONFIG");
    assert_eq!(&t[20..], hex("0800 0400 84030000 0800 0600 2c010000").as_slice());
}

/// Builds a reply message as the kernel does.
fn reply(kind: u16, flags: u16, seq: u32, command: u8, attrs: &[u8]) -> Vec<u8> {
    message(kind, flags, seq, command, 1, attrs)
}

#[test]
fn decodes_a_service_dump_as_the_kernel_sends_it() {
    // What the kernel puts in a service dump: more than kproxy reads (stats, PE name),
    // and the hashed flag, which it sets itself.
    let mut svc = service_key_attrs(&key());
    put_attr(&mut svc, svc_attr::SCHED_NAME, b"wrr\0");
    let mut flags = (SVC_F_PERSISTENT | SVC_F_HASHED).to_ne_bytes().to_vec();
    flags.extend_from_slice(&u32::MAX.to_ne_bytes());
    put_attr(&mut svc, svc_attr::FLAGS, &flags);
    put_u32(&mut svc, svc_attr::TIMEOUT, 600);
    put_u32(&mut svc, svc_attr::NETMASK, u32::MAX);
    let mut stats = Vec::new();
    put_u32(&mut stats, 1, 42);
    put_nested(&mut svc, 10, &stats);
    let mut attrs = Vec::new();
    put_nested(&mut attrs, cmd_attr::SERVICE, &svc);
    let mut buf = reply(0x24, NLM_F_MULTI, 5, cmd::NEW_SERVICE, &attrs);
    buf.extend(reply(NLMSG_DONE, NLM_F_MULTI, 5, 0, &[0, 0, 0, 0]));

    let replies = decode_replies(&buf).unwrap();
    assert_eq!(replies.len(), 2);
    let Reply::Data { seq: 5, command, attrs } = replies[0] else {
        panic!("{:?}", replies[0])
    };
    assert_eq!(command, cmd::NEW_SERVICE);
    assert_eq!(
        decode_service(attrs).unwrap(),
        Some(VirtualService {
            key: key(),
            scheduler: "wrr".into(),
            flags: SVC_F_PERSISTENT,
            timeout: 600,
        })
    );
    assert_eq!(replies[1], Reply::Done { seq: 5 });
}

#[test]
fn firewall_mark_services_are_skipped() {
    let mut svc = Vec::new();
    put_u16(&mut svc, svc_attr::AF, AF_INET);
    put_u32(&mut svc, 5, 0x4000);
    let mut attrs = Vec::new();
    put_nested(&mut attrs, cmd_attr::SERVICE, &svc);
    assert_eq!(decode_service(&attrs).unwrap(), None);
}

#[test]
fn decodes_dests_and_errors() {
    let rs = RealServer {
        addr: "fd00::2".parse().unwrap(),
        port: 53,
        weight: 0,
        fwd_method: FWD_MASQ,
    };
    let mut d = dest_attrs(&rs, true);
    put_u32(&mut d, dest_attr::ACTIVE_CONNS, 3);
    put_u32(&mut d, dest_attr::INACT_CONNS, 4);
    let mut attrs = Vec::new();
    put_nested(&mut attrs, cmd_attr::DEST, &d);
    let got = decode_dest(&attrs, &"fd00::10".parse().unwrap()).unwrap();
    assert_eq!(got.server, rs);
    assert_eq!((got.active_conns, got.inactive_conns), (3, 4));

    // NLMSG_ERROR carrying -EEXIST (17) and the request's header.
    let mut body = (-17i32).to_ne_bytes().to_vec();
    body.extend_from_slice(&[0u8; 16]);
    let mut buf = Vec::new();
    buf.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    buf.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
    buf.extend_from_slice(&0u16.to_ne_bytes());
    buf.extend_from_slice(&11u32.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&body);
    assert_eq!(
        decode_replies(&buf).unwrap(),
        vec![Reply::Error { seq: 11, errno: -17 }]
    );
    assert_eq!(decode_replies(&buf[..20]), Err(DecodeError::Truncated));
}

#[test]
fn family_id_and_version() {
    let mut attrs = Vec::new();
    put_attr(&mut attrs, CTRL_ATTR_FAMILY_NAME, b"IPVS\0");
    put_u16(&mut attrs, CTRL_ATTR_FAMILY_ID, 0x24);
    assert_eq!(decode_family_id(&attrs), Ok(0x24));
    let mut info = Vec::new();
    put_u32(&mut info, INFO_ATTR_VERSION, 0x010201);
    assert_eq!(version_string(decode_info_version(&info).unwrap()), "1.2.1");
}

/// Generic-netlink payloads (genlmsghdr and attributes, without the nlmsghdr whose family id,
/// sequence and port differ per run) captured with `strace -xx` from ipvsadm v1.31 talking to
/// Debian's 6.1.0-56 kernel inside the `scripts/ipvs-vm.sh` guest (`KPROXY_VM_RUN`).
mod captured {
    /// `ipvsadm -A -t 10.96.0.10:80 -s rr`
    pub const NEW_SERVICE: &str = "010100005400018006000100020000000600020006000000140003000a60000a000000000000000000000000060004000050000007000600727200000c00070000000000ffffffff080008000000000008000900ffffffff";
    /// `ipvsadm -E -t 10.96.0.10:80 -s sh -p 10800`
    pub const SET_SERVICE: &str = "020100005400018006000100020000000600020006000000140003000a60000a000000000000000000000000060004000050000007000600736800000c00070001000000ffffffff08000800302a000008000900ffffffff";
    /// `ipvsadm -a -t 10.96.0.10:80 -r 10.244.1.2:8080 -m -w 1` (ipvsadm repeats the full
    /// service and adds the tunnel attributes; the kernel needs neither)
    pub const NEW_DEST: &str = "050100005400018006000100020000000600020006000000140003000a60000a000000000000000000000000060004000050000005000600000000000c00070000000000ffffffff080008000000000008000900ffffffff6000028006000b0002000000140001000af40102000000000000000000000000060002001f9000000800030000000000080004000100000005000d000000000006000e000000000006000f000000000008000500000000000800060000000000";
    /// The real-server dump request of `ipvsadm -Ln` for 10.96.0.10:80.
    pub const GET_DEST: &str =
        "080100003000018006000100020000000600020006000000140003000a60000a0000000000000000000000000600040000500000";
    /// The kernel's answer to the service dump after the edit above: no NLA_F_NESTED on the
    /// nest, the hashed flag set, and stats the decoder skips.
    pub const SERVICE_DUMP_REPLY: &str = "010100002c01010006000100020000000600020006000000140003000a60000a000000000000000000000000060004000050000007000600736800000c00070003000000ffffffff08000800302a000008000900ffffffff5c000a000800010000000000080002000000000008000300000000000c00040000000000000000000c0005000000000000000000080006000000000008000700000000000800080000000000080009000000000008000a00000000007c000c000c00010000000000000000000c00020000000000000000000c00030000000000000000000c00040000000000000000000c00050000000000000000000c00060000000000000000000c00070000000000000000000c00080000000000000000000c00090000000000000000000c000a000000000000000000";
    /// The kernel's answer to IPVS_CMD_GET_INFO: version 1.2.1, 4096 connection buckets.
    pub const INFO_REPLY: &str = "0e01000008000100010201000800020000100000";
}

#[test]
#[cfg(target_endian = "little")]
fn service_requests_are_byte_for_byte_what_ipvsadm_sends() {
    let mut svc = VirtualService {
        key: key(),
        scheduler: "rr".into(),
        flags: 0,
        timeout: 0,
    };
    assert_eq!(
        Request::NewService(svc.clone()).encode(0x20, 1)[16..],
        hex(captured::NEW_SERVICE)
    );
    svc.scheduler = "sh".into();
    svc.flags = SVC_F_PERSISTENT;
    svc.timeout = 10800;
    assert_eq!(
        Request::SetService(svc).encode(0x20, 1)[16..],
        hex(captured::SET_SERVICE)
    );
    assert_eq!(encode_dump_dests(0x20, 1, &key())[16..], hex(captured::GET_DEST));
}

#[test]
fn ipvsadms_new_dest_names_the_same_real_server_as_ours() {
    let want = RealServer {
        addr: "10.244.1.2".parse().unwrap(),
        port: 8080,
        weight: 1,
        fwd_method: FWD_MASQ,
    };
    let theirs = hex(captured::NEW_DEST);
    assert_eq!(theirs[0], cmd::NEW_DEST);
    assert_eq!(decode_dest(&theirs[4..], &key().addr).unwrap().server, want);
    let ours = Request::NewDest(key(), want).encode(0x20, 1);
    assert_eq!(decode_dest(&ours[20..], &key().addr).unwrap().server, want);
}

#[test]
fn decodes_the_kernels_own_replies() {
    let reply = hex(captured::SERVICE_DUMP_REPLY);
    assert_eq!(reply[0], cmd::NEW_SERVICE);
    assert_eq!(
        decode_service(&reply[4..]).unwrap(),
        Some(VirtualService {
            key: key(),
            scheduler: "sh".into(),
            flags: SVC_F_PERSISTENT,
            timeout: 10800,
        })
    );
    let info = hex(captured::INFO_REPLY);
    assert_eq!(version_string(decode_info_version(&info[4..]).unwrap()), "1.2.1");
}
