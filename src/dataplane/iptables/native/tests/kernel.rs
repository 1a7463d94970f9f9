//! The native writer on the real kernel, each test in a network namespace of its own: the
//! same input written by it and by iptables-legacy-restore leaves the same tables
//! (iptables-legacy-save, counters included), and refusals keep the previous table. Skipped
//! without the privileges for a namespace or without iptables-legacy.

use std::process::{Command, Stdio};

use super::super::{write, write_with, Error, Family};

/// Runs `f` on a thread in a new network namespace (the tools it starts share it); the
/// namespace goes away with the thread, whatever `f` does. `None` without privileges or tools.
fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let legacy = Command::new("iptables-legacy-restore")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !legacy {
        return None;
    }
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        Some(f())
    })
    .join()
    .expect("netns thread")
}

fn tool(family: Family, what: &str) -> String {
    match family {
        Family::V4 => format!("iptables-legacy{what}"),
        Family::V6 => format!("ip6tables-legacy{what}"),
    }
}

fn restore(family: Family, args: &[&str], input: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new(tool(family, "-restore"))
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    match out.status.success() {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&out.stderr).to_string()),
    }
}

/// `iptables-legacy-save -c -t TABLE` without its dated comments.
fn save(family: Family, table: &str) -> String {
    let out = Command::new(tool(family, "-save"))
        .args(["-c", "-t", table])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Gives every rule and built-in policy of `table` distinct counters (`restore -c`).
fn set_counters(family: Family, table: &str) {
    let mut n = 0u64;
    let with: String = save(family, table)
        .lines()
        .map(|l| {
            n += 1;
            let counted = format!("[{n}:{}]", n * 100);
            if let Some(rule) = l.strip_prefix("[0:0] ") {
                format!("{counted} {rule}\n")
            } else if l.starts_with(':') && !l.contains(" - ") {
                format!("{}\n", l.replace("[0:0]", &counted))
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    restore(family, &["-c"], &with).unwrap();
    let set = save(family, table);
    assert!(!set.contains("[0:0] -A"), "counters set:\n{set}");
}

/// The tables after `base` (with counters), then `change` by `native` or iptables-restore.
fn after(
    family: Family,
    table: &'static str,
    base: &'static str,
    change: &'static str,
    native: bool,
) -> Option<(String, String)> {
    in_netns(move || {
        restore(family, &["--noflush"], base).expect("base");
        set_counters(family, table);
        let before = save(family, table);
        match native {
            true => write(family, change)
                .map(drop)
                .map_err(|e| e.to_string())
                .expect("native write"),
            false => restore(family, &["--noflush"], change).expect("iptables-restore"),
        }
        (before, save(family, table))
    })
}

fn assert_equivalent(family: Family, table: &'static str, base: &'static str, change: &'static str) {
    let Some((before, by_restore)) = after(family, table, base, change, false) else {
        eprintln!("skipped: no network namespace or no iptables-legacy");
        return;
    };
    let (_, by_native) = after(family, table, base, change, true).unwrap();
    assert_ne!(before, by_restore, "the change changes something");
    for (i, (a, b)) in by_restore.lines().zip(by_native.lines()).enumerate() {
        assert_eq!(a, b, "line {} of {table} differs (iptables-restore, native)", i + 1);
    }
    assert_eq!(by_restore, by_native);
    // Unchanged rules kept their counters.
    assert!(by_native.contains("-A DOCKER -i docker0 -j RETURN"));
    assert!(!by_native.contains("[0:0] -A DOCKER"), "{by_native}");
}

const NAT4: &str = "*nat
:DOCKER - [0:0]
:KPROXY-SERVICES - [0:0]
:KPROXY-SVC-A - [0:0]
:KPROXY-SEP-A - [0:0]
:KPROXY-SEP-OLD - [0:0]
:KPROXY-MARK-MASQ - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A PREROUTING -m comment --comment \"kproxy service portals\" -j KPROXY-SERVICES
-A PREROUTING -s 10.1.0.0/16 -j RETURN
-A OUTPUT -j DOCKER
-A DOCKER -i docker0 -j RETURN
-A DOCKER -m tcp -p tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
-A DOCKER -j KPROXY-MARK-MASQ
-A KPROXY-SERVICES -m comment --comment \"ns/a:http cluster IP\" -m tcp -p tcp -d 10.96.0.1 --dport 80 -j KPROXY-SVC-A
-A KPROXY-SVC-A -m statistic --mode random --probability 0.5000000000 -j KPROXY-SEP-A
-A KPROXY-SVC-A -j KPROXY-SEP-OLD
-A KPROXY-SEP-A -s 10.244.1.2 -j KPROXY-MARK-MASQ
-A KPROXY-SEP-A -m tcp -p tcp -j DNAT --to-destination 10.244.1.2:8080
-A KPROXY-SEP-OLD -s 10.244.1.3 -j KPROXY-MARK-MASQ
-A KPROXY-SEP-OLD -m tcp -p tcp -j DNAT --to-destination 10.244.1.3:8080
-A KPROXY-MARK-MASQ -j MARK --or-mark 0x4000
-A POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A POSTROUTING -j MARK --xor-mark 0x4000
-A POSTROUTING -m comment --comment \"kproxy service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A POSTROUTING -o docker0 -j MASQUERADE
COMMIT
";

/// What a partial sync writes: the changed Service's chains, a new endpoint's, a stale one's
/// deletion; and a jump into a built-in chain as a full sync adds it.
const CHANGE4: &str = "*nat
:KPROXY-SVC-A - [0:0]
:KPROXY-SEP-NEW - [0:0]
:KPROXY-SEP-OLD - [0:0]
-A KPROXY-SVC-A -m comment --comment \"ns/a:http cluster IP\" -m tcp -p tcp -d 10.96.0.1 --dport 80 ! -s 10.244.0.0/16 -j KPROXY-MARK-MASQ
-A KPROXY-SVC-A -m comment --comment \"ns/a:http -> 10.244.1.2:8080\" -m statistic --mode random --probability 0.5000000000 -j KPROXY-SEP-A
-A KPROXY-SVC-A -m comment --comment \"ns/a:http -> 10.244.1.9:8080\" -j KPROXY-SEP-NEW
-A KPROXY-SEP-NEW -m comment --comment ns/a:http -s 10.244.1.9 -j KPROXY-MARK-MASQ
-A KPROXY-SEP-NEW -m comment --comment ns/a:http -m recent --name KPROXY-SEP-NEW --mask 255.255.255.255 --rsource --set -m tcp -p tcp -j DNAT --to-destination 10.244.1.9:8080
-A KPROXY-SEP-NEW -m addrtype --src-type LOCAL ! -d 127.0.0.0/8 -i br0+ -j RETURN
-A KPROXY-SEP-NEW -m comment --comment \"fw: no target\"
-I OUTPUT 1 -m comment --comment \"kproxy service portals\" -j KPROXY-SERVICES
-X KPROXY-SEP-OLD
COMMIT
";

#[test]
fn native_nat_v4_is_iptables_restore_with_counters() {
    assert_equivalent(Family::V4, "nat", NAT4, CHANGE4);
}

#[test]
fn native_nat_v6_is_ip6tables_restore_with_counters() {
    const NAT6: &str = "*nat
:DOCKER - [0:0]
:KPROXY-SERVICES - [0:0]
:KPROXY-SVC-A - [0:0]
:KPROXY-SEP-OLD - [0:0]
:KPROXY-MARK-MASQ - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A PREROUTING -j KPROXY-SERVICES
-A DOCKER -i docker0 -j RETURN
-A DOCKER -m tcp -p tcp --dport 8080 -j DNAT --to-destination [fd00::2]:80
-A KPROXY-SERVICES -m tcp -p tcp -d fd00:96::1 --dport 80 -j KPROXY-SVC-A
-A KPROXY-SVC-A -j KPROXY-SEP-OLD
-A KPROXY-SEP-OLD -s fd00:244::3 -j KPROXY-MARK-MASQ
-A KPROXY-SEP-OLD -m udp -p udp -j DNAT --to-destination [fd00:244::3]:53
-A KPROXY-MARK-MASQ -j MARK --or-mark 0x4000
-A POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A POSTROUTING -j MASQUERADE --random-fully
COMMIT
";
    const CHANGE6: &str = "*nat
:KPROXY-SVC-A - [0:0]
:KPROXY-SEP-NEW - [0:0]
:KPROXY-SEP-OLD - [0:0]
-A KPROXY-SVC-A -m comment --comment \"ns/a:http\" -m recent --name KPROXY-SEP-NEW --mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource --rcheck --seconds 10800 --reap -j KPROXY-SEP-NEW
-A KPROXY-SVC-A -m comment --comment \"ns/a:http -> [fd00:244::9]:8080\" -j KPROXY-SEP-NEW
-A KPROXY-SEP-NEW -s fd00:244::9 -j KPROXY-MARK-MASQ
-A KPROXY-SEP-NEW -m recent --name KPROXY-SEP-NEW --mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource --set -m tcp -p tcp -j DNAT --to-destination [fd00:244::9]:8080
-A KPROXY-SEP-NEW ! -d ::1/128 -m addrtype --dst-type LOCAL -i eth+ -j RETURN
-X KPROXY-SEP-OLD
COMMIT
";
    assert_equivalent(Family::V6, "nat", NAT6, CHANGE6);
}

#[test]
fn native_filter_is_iptables_restore_with_counters() {
    const BASE: &str = "*filter
:DOCKER - [0:0]
:KPROXY-SERVICES - [0:0]
-A INPUT -j DOCKER
-A DOCKER -i docker0 -j RETURN
-A DOCKER -s 10.9.0.0/16 -j ACCEPT
-A KPROXY-SERVICES -m comment --comment \"default/old:http has no endpoints\" -m tcp -p tcp -d 10.96.0.12 --dport 80 -j REJECT
COMMIT
";
    const CHANGE: &str = "*filter
:KPROXY-EXTERNAL-SERVICES - [0:0]
:KPROXY-SERVICES - [0:0]
:KPROXY-FORWARD - [0:0]
-A KPROXY-SERVICES -m comment --comment \"default/empty:http has no endpoints\" -m tcp -p tcp -d 10.96.0.13 --dport 80 -j REJECT
-A KPROXY-EXTERNAL-SERVICES -m comment --comment \"default/x:http has no local endpoints\" -m addrtype --dst-type LOCAL -m udp -p udp --dport 30001 -j DROP
-A KPROXY-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KPROXY-FORWARD -m comment --comment \"kproxy forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KPROXY-FORWARD -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j ACCEPT
-I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment \"kproxy service portals\" -j KPROXY-SERVICES
COMMIT
";
    assert_equivalent(Family::V4, "filter", BASE, CHANGE);
}

/// A rule the kernel refuses (an nfacct counter that does not exist) fails the whole input,
/// names the COMMIT line as iptables-restore does, and leaves the table as it was.
#[test]
fn a_refused_replace_keeps_the_previous_table() {
    let Some((before, after, err)) = in_netns(|| {
        restore(Family::V4, &["--noflush"], NAT4).unwrap();
        let before = save(Family::V4, "nat");
        let input = "*nat\n:KPROXY-SVC-A - [0:0]\n-A KPROXY-SVC-A -m nfacct --nfacct-name no-such-counter -j KPROXY-SEP-A\nCOMMIT\n";
        let err = write(Family::V4, input).unwrap_err();
        (before, save(Family::V4, "nat"), err)
    }) else {
        return;
    };
    match err {
        Error::Failed(message) => {
            assert!(
                message.starts_with("line 4: nat table: IPT_SO_SET_REPLACE refused"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(before, after, "the kernel kept the old table");
}

/// An input the encoder does not know changes nothing, even in a table before it.
#[test]
fn an_unsupported_input_writes_nothing() {
    let Some((before, after, err)) = in_netns(|| {
        restore(Family::V4, &["--noflush"], NAT4).unwrap();
        let before = (save(Family::V4, "nat"), save(Family::V4, "filter"));
        let input = "*filter\n:KPROXY-X - [0:0]\nCOMMIT\n*nat\n:KPROXY-SVC-A - [0:0]\n-A KPROXY-SVC-A -j LOG\nCOMMIT\n";
        let err = write(Family::V4, input).unwrap_err();
        (before, (save(Family::V4, "nat"), save(Family::V4, "filter")), err)
    }) else {
        return;
    };
    assert!(
        matches!(err, Error::Unsupported(ref why) if why.starts_with("line 6:")),
        "{err:?}"
    );
    assert_eq!(before, after);
}

/// A jump to a chain that does not exist: not guessed as an extension, left to
/// iptables-restore (which refuses it naming the line).
#[test]
fn a_jump_to_a_missing_chain_is_left_to_iptables_restore() {
    let Some(err) = in_netns(|| {
        restore(Family::V4, &["--noflush"], NAT4).unwrap();
        write(
            Family::V4,
            "*nat\n:KPROXY-SVC-A - [0:0]\n-A KPROXY-SVC-A -j KPROXY-SEP-GONE\nCOMMIT\n",
        )
        .unwrap_err()
    }) else {
        return;
    };
    assert!(
        matches!(err, Error::Unsupported(ref why) if why.starts_with("line 3:")),
        "{err:?}"
    );
}

/// Another writer that does not wait for kproxy's xtables lock (here iptables-legacy with a
/// lock file of its own) appends a rule to POSTROUTING: the table it replaced has one entry
/// more than the one the native writer read.
fn append_behind_the_lock(n: usize) {
    let lock = std::env::temp_dir().join(format!("kproxy-test-other-writer-{}.lock", std::process::id()));
    let status = Command::new(tool(Family::V4, ""))
        .env("XTABLES_LOCKFILE", &lock)
        .args([
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-d",
            &format!("192.0.2.{n}/32"),
            "-j",
            "ACCEPT",
        ])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The table replaced between the native writer's read and its replace: the kernel refuses
/// the stale replace (EAGAIN: the entry count moved), the writer reads the table again and
/// splices into that, so the other writer's rule and the change are both in the kernel, and
/// the rules kept kept their counters.
#[test]
fn a_table_replaced_behind_the_lock_is_read_again() {
    let Some((written, saved)) = in_netns(|| {
        restore(Family::V4, &["--noflush"], NAT4).unwrap();
        set_counters(Family::V4, "nat");
        let mut raced = Vec::new();
        let written = write_with(Family::V4, CHANGE4, &mut |table, attempt| {
            raced.push((table.to_string(), attempt));
            if attempt == 1 {
                append_behind_the_lock(7);
            }
        })
        .map_err(|e| e.to_string());
        assert_eq!(raced, [("nat".to_string(), 1), ("nat".to_string(), 2)]);
        (written, save(Family::V4, "nat"))
    }) else {
        return;
    };
    let written = written.expect("the second attempt is written");
    assert_eq!(written.attempts, 2);
    assert!(saved.contains("-A POSTROUTING -d 192.0.2.7/32 -j ACCEPT"), "{saved}");
    assert!(saved.contains("-A KPROXY-SEP-NEW -s 10.244.1.9/32"), "{saved}");
    assert!(!saved.contains(":KPROXY-SEP-OLD"), "{saved}");
    assert!(!saved.contains("[0:0] -A DOCKER"), "counters kept:\n{saved}");
}

/// A table replaced behind the lock at every attempt: after the last one the write fails,
/// naming the table and the refused call, and the kernel holds the other writer's table,
/// without any of the change.
#[test]
fn a_table_replaced_at_every_attempt_fails_and_writes_nothing() {
    let Some((err, attempts, saved)) = in_netns(|| {
        restore(Family::V4, &["--noflush"], NAT4).unwrap();
        let mut attempts = 0;
        let err = write_with(Family::V4, CHANGE4, &mut |_, attempt| {
            attempts = attempt;
            append_behind_the_lock(attempt);
        })
        .unwrap_err();
        (err, attempts, save(Family::V4, "nat"))
    }) else {
        return;
    };
    match err {
        Error::Failed(message) => assert!(message.contains("nat table: IPT_SO_SET_REPLACE refused"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(attempts, 3);
    for n in 1..=3 {
        assert!(
            saved.contains(&format!("-A POSTROUTING -d 192.0.2.{n}/32 -j ACCEPT")),
            "{saved}"
        );
    }
    assert!(saved.contains(":KPROXY-SEP-OLD"), "{saved}");
    assert!(!saved.contains("KPROXY-SEP-NEW"), "{saved}");
}
