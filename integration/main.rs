//! Integration tests: the real kproxy binary, as root, in network namespaces with real servers
//! and real packets. Every scenario runs against every proxy mode and both sources of desired
//! state (manifest files and a fake API server).
//!
//! This binary is also its own test server: `__serve NAME PORT` answers HTTP on TCP and echoes
//! on UDP with the pod name and the peer address; `__udp ADDR` is a one-shot UDP client.

mod fakeapi;
mod faults;
mod gateway;
mod harness;
mod ingress;
mod netns;
mod scenarios;
mod semantics;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

use libtest_mimic::{Arguments, Trial};

/// HTTP/1.1 on TCP: every request gets `NAME PEER_IP` as body. UDP: every datagram gets the same.
fn serve(name: &str, port: u16) -> ! {
    // [::] takes IPv4 too (v4-mapped), so one socket serves both families.
    let udp = UdpSocket::bind(("::", port)).expect("bind udp");
    let udp_name = name.to_string();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        loop {
            if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                let _ = udp.send_to(format!("{udp_name} {}\n", peer.ip().to_canonical()).as_bytes(), peer);
            }
        }
    });
    let tcp = TcpListener::bind(("::", port)).expect("bind tcp");
    for stream in tcp.incoming().flatten() {
        let name = name.to_string();
        std::thread::spawn(move || {
            let peer = match stream.peer_addr() {
                Ok(p) => p.ip().to_canonical(),
                Err(_) => return,
            };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(match stream.try_clone() {
                Ok(s) => s,
                Err(_) => return,
            });
            let mut writer = stream;
            loop {
                // Read one request head; bodies are not used by the tests.
                let mut line = String::new();
                let mut got_any = false;
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if line == "\r\n" || line == "\n" {
                        break;
                    }
                    got_any = true;
                }
                if !got_any {
                    return;
                }
                let body = format!("{name} {peer}\n");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if writer.write_all(resp.as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
    std::process::exit(1)
}

/// Sends one datagram to `addr` from source port `sport` (0: any) and prints the reply; exit 1
/// without one in 2 s. A fixed source port is how a DNS resolver's flow looks to conntrack.
fn udp_client(addr: &str, sport: u16) -> ExitCode {
    let sock = UdpSocket::bind(("0.0.0.0", sport)).expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(2))).ok();
    if sock.send_to(b"ping", addr).is_err() {
        return ExitCode::FAILURE;
    }
    let mut buf = [0u8; 1500];
    match sock.recv_from(&mut buf) {
        Ok((n, _)) => {
            print!("{}", String::from_utf8_lossy(&buf[..n]));
            ExitCode::SUCCESS
        }
        Err(_) => ExitCode::FAILURE,
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    match argv.get(1).map(String::as_str) {
        Some("__serve") => serve(&argv[2], argv[3].parse().expect("port")),
        Some("__udp") => return udp_client(&argv[2], argv.get(3).and_then(|p| p.parse().ok()).unwrap_or(0)),
        Some("__http") => ingress::serve_backend(&argv[2], argv[3].parse().expect("port"), false),
        Some("__https") => ingress::serve_backend(&argv[2], argv[3].parse().expect("port"), true),
        Some("__gwecho") => gateway::serve_echo(
            &argv[2],
            argv[3].parse().expect("port"),
            argv.get(4).map(String::as_str),
        ),
        _ => {}
    }
    let args = Arguments::from_args();
    let is_root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if is_root && !args.list {
        netns::sweep_stale();
    }
    let mut trials = Vec::new();
    for mode in scenarios::modes() {
        for source in [scenarios::SourceKind::Manifests, scenarios::SourceKind::Api] {
            let api_only = scenarios::API_ONLY
                .iter()
                .filter(|_| source == scenarios::SourceKind::Api);
            let iptables_only = scenarios::IPTABLES_ONLY.iter().filter(|_| mode == "iptables");
            let nftables_only = scenarios::NFTABLES_ONLY.iter().filter(|_| mode == "nftables");
            for (name, scenario) in scenarios::ALL
                .iter()
                .chain(api_only)
                .chain(iptables_only)
                .chain(nftables_only)
            {
                let trial = Trial::test(format!("{mode}::{}::{name}", source.name()), move || {
                    scenario(mode, source);
                    Ok(())
                });
                trials.push(trial.with_ignored_flag(!is_root));
            }
        }
    }
    for mode in scenarios::modes() {
        for (name, scenario) in faults::MANIFESTS {
            let trial = Trial::test(format!("{mode}::manifests::{name}"), move || {
                scenario(mode);
                Ok(())
            });
            trials.push(trial.with_ignored_flag(!is_root));
        }
    }
    trials.push(Trial::test("fakeapi::goes_down_and_comes_back", || {
        faults::fake_api_goes_down_and_comes_back();
        Ok(())
    }));
    let first_mode = scenarios::modes()[0];
    for (name, scenario) in faults::API {
        let trial = Trial::test(format!("{first_mode}::api::{name}"), move || {
            scenario(first_mode);
            Ok(())
        });
        trials.push(trial.with_ignored_flag(!is_root));
    }
    for source in [scenarios::SourceKind::Manifests, scenarios::SourceKind::Api] {
        for (name, scenario) in ingress::ALL {
            let trial = Trial::test(format!("ingress::{}::{name}", source.name()), move || {
                scenario(source);
                Ok(())
            });
            trials.push(trial.with_ignored_flag(!is_root));
        }
    }
    for (name, scenario) in ingress::API_ONLY {
        let trial = Trial::test(format!("ingress::api::{name}"), move || {
            scenario();
            Ok(())
        });
        trials.push(trial.with_ignored_flag(!is_root));
    }
    for source in [scenarios::SourceKind::Manifests, scenarios::SourceKind::Api] {
        for (name, scenario) in gateway::ALL {
            let trial = Trial::test(format!("gateway::{}::{name}", source.name()), move || {
                scenario(source);
                Ok(())
            });
            trials.push(trial.with_ignored_flag(!is_root));
        }
    }
    for (name, scenario) in gateway::API_ONLY {
        let trial = Trial::test(format!("gateway::api::{name}"), move || {
            scenario();
            Ok(())
        });
        trials.push(trial.with_ignored_flag(!is_root));
    }
    for (name, scenario) in gateway::MANIFESTS_ONLY {
        let trial = Trial::test(format!("gateway::manifests::{name}"), move || {
            scenario();
            Ok(())
        });
        trials.push(trial.with_ignored_flag(!is_root));
    }
    for (name, scenario) in ingress::MANIFESTS_ONLY {
        let trial = Trial::test(format!("ingress::manifests::{name}"), move || {
            scenario();
            Ok(())
        });
        trials.push(trial.with_ignored_flag(!is_root));
    }
    libtest_mimic::run(&args, trials).exit_code()
}
