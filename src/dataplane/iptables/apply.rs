//! The only part of iptables mode that touches the kernel: iptables-restore, iptables-save,
//! and cleanup (the jumps from the built-in chains go in with the restore input).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Stdio;

use futures::TryStreamExt;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::names;
use super::plan::{KernelState, TableText};
use crate::dataplane::{DataplaneError, Result};
use crate::model::IpFamily;

/// A tool that could not be started: missing binaries will not appear by retrying.
fn spawn_error(command: &str, source: std::io::Error) -> DataplaneError {
    if source.kind() == std::io::ErrorKind::NotFound {
        DataplaneError::Unsupported(format!(
            "{command} not found: install iptables (and ip6tables for IPv6)"
        ))
    } else {
        DataplaneError::Spawn {
            command: command.to_string(),
            source,
        }
    }
}

/// Seconds to wait for the xtables lock, as kube-proxy does (`-w 5`).
const LOCK_WAIT: &str = "5";

/// The userspace tools for one IP family.
#[derive(Debug, Clone)]
pub struct Tools {
    iptables: &'static str,
    restore: &'static str,
    save: &'static str,
}

impl Tools {
    pub fn for_family(family: IpFamily) -> Self {
        match family {
            IpFamily::V4 => Tools {
                iptables: "iptables",
                restore: "iptables-restore",
                save: "iptables-save",
            },
            IpFamily::V6 => Tools {
                iptables: "ip6tables",
                restore: "ip6tables-restore",
                save: "ip6tables-save",
            },
        }
    }

    /// Applies `input` atomically per table with `--noflush`: chains it does not declare, and
    /// every rule outside kproxy's chains, stay as they are. On failure nothing changes.
    pub async fn restore(&self, input: &str) -> Result<()> {
        let mut child = Command::new(self.restore)
            .args(["-w", LOCK_WAIT, "--noflush"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| spawn_error(self.restore, source))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A write error means the tool exited early; its stderr says why.
            let _ = stdin.write_all(input.as_bytes()).await;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|source| spawn_error(self.restore, source))?;
        if out.status.success() {
            return Ok(());
        }
        let message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(restore_error(self.restore, input, message))
    }

    /// kproxy's chains currently in `table` (from iptables-save).
    pub async fn chains(&self, table: &str) -> Result<BTreeSet<String>> {
        let out = run(self.save, &["-t", table]).await?;
        Ok(parse_chains(&out))
    }

    /// What a full sync needs to know of the kernel: kproxy's nat chains (to delete strays) and
    /// which jumps from the built-in chains are in place (to add the missing ones).
    pub async fn kernel_state(&self) -> Result<KernelState> {
        let mut state = KernelState::default();
        for table in ["filter", "nat"] {
            let save = run(self.save, &["-t", table]).await?;
            if table == "nat" {
                state.nat_chains = parse_chains(&save);
            }
            state.jumps.extend(parse_jumps(table, &save));
        }
        Ok(state)
    }

    /// Removes the jump rules and every `KPROXY-` chain. Safe to run when nothing is there.
    pub async fn cleanup(&self) -> Result<()> {
        let nat = self.chains("nat").await?;
        let filter = self.chains("filter").await?;
        for jump in names::JUMPS {
            // A jump cannot exist without its target chain; asking iptables to delete one then
            // is an error, not a "no such rule".
            let chains = if jump.table == "nat" { &nat } else { &filter };
            if !chains.contains(jump.to) {
                continue;
            }
            let mut delete = vec!["-w", LOCK_WAIT, "-t", jump.table, "-D", jump.from];
            delete.extend(jump.args());
            // A rule may have been inserted twice by a crashed older run: delete until gone.
            while status(self.iptables, &delete).await? {}
        }
        let mut input = String::new();
        for (table, chains) in [("filter", filter), ("nat", nat)] {
            if chains.is_empty() {
                continue;
            }
            let text = TableText {
                delete: chains.into_iter().collect(),
                ..TableText::default()
            };
            input.push_str(&text.into_text(table));
        }
        if input.is_empty() {
            return Ok(());
        }
        self.restore(&input).await
    }
}

/// Chains with kproxy's prefix declared in iptables-save output.
pub fn parse_chains(save: &str) -> BTreeSet<String> {
    save.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with(names::PREFIX))
        .map(str::to_string)
        .collect()
}

/// Which of [`names::JUMPS`] of `table` the iptables-save output of that table holds: a rule in
/// the built-in chain with kproxy's comment and target (what `iptables -C` would find).
pub fn parse_jumps(table: &str, save: &str) -> BTreeSet<usize> {
    let mut found = BTreeSet::new();
    for line in save.lines() {
        let Some(rule) = line.strip_prefix("-A ") else {
            continue;
        };
        for (i, jump) in names::JUMPS.iter().enumerate() {
            let ours = jump.table == table
                && rule.split(' ').next() == Some(jump.from)
                && rule.ends_with(&format!(" -j {}", jump.to))
                && rule.contains(&format!("--comment {}", names::quote(jump.comment)))
                && (!jump.new_only || rule.contains("--ctstate NEW"));
            if ours {
                found.insert(i);
            }
        }
    }
    found
}

/// Turns iptables-restore's complaint into an error that quotes the offending input line.
pub fn restore_error(tool: &'static str, input: &str, message: String) -> DataplaneError {
    let line = message
        .split("line ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<usize>().ok());
    DataplaneError::refused(tool, tool, input, line, message)
}

/// Runs `cmd`; its output, and the error to report if its exit code is not acceptable.
async fn output(cmd: &str, args: &[&str]) -> Result<(std::process::Output, DataplaneError)> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| spawn_error(cmd, source))?;
    let err = DataplaneError::Command {
        command: format!("{cmd} {}", args.join(" ")),
        message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    };
    Ok((out, err))
}

async fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let (out, err) = output(cmd, args).await?;
    if !out.status.success() {
        return Err(err);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a check-style command: exit 0 is true, exit 1 is false, anything else is an error.
async fn status(cmd: &str, args: &[&str]) -> Result<bool> {
    let (out, err) = output(cmd, args).await?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(err),
    }
}

/// Every address configured on this host's interfaces (the netns kproxy runs in), via rtnetlink.
pub async fn local_addresses() -> Result<Vec<IpAddr>> {
    use netlink_packet_route::address::AddressAttribute;
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| DataplaneError::Netlink(e.to_string()))?;
    let task = tokio::spawn(conn);
    let mut stream = handle.address().get().execute();
    let mut out = Vec::new();
    while let Some(msg) = stream
        .try_next()
        .await
        .map_err(|e| DataplaneError::Netlink(e.to_string()))?
    {
        for attr in msg.attributes {
            if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = attr {
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
    }
    task.abort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_error_quotes_the_line() {
        let input = "*nat\n:KPROXY-SERVICES - [0:0]\n-A KPROXY-SERVICES -j NOPE\nCOMMIT\n";
        let err = restore_error(
            "iptables-restore",
            input,
            "iptables-restore v1.8.9 (nf_tables): line 3: RULE_APPEND failed".into(),
        );
        match err {
            DataplaneError::Rejected { line, text, .. } => {
                assert_eq!(line, 3);
                assert_eq!(text, "-A KPROXY-SERVICES -j NOPE");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn jumps_from_save_output() {
        // As iptables-save prints what `iptables -I` put in, beside someone else's rule.
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
            -A PREROUTING -m comment --comment \"kproxy service portals\" -j KPROXY-SERVICES\n\
            -A PREROUTING -j KUBE-SERVICES\n\
            -A OUTPUT -m comment --comment \"kproxy service portals\" -j KPROXY-NODEPORTS\nCOMMIT\n";
        let found: Vec<_> = parse_jumps("nat", save)
            .into_iter()
            .map(|i| (names::JUMPS[i].from, names::JUMPS[i].to))
            .collect();
        assert_eq!(found, [("PREROUTING", names::SERVICES)]);
        let filter = "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kproxy service portals\" -j KPROXY-SERVICES\n\
            -A OUTPUT -m comment --comment \"kproxy service portals\" -j KPROXY-SERVICES\n";
        let found: Vec<_> = parse_jumps("filter", filter)
            .into_iter()
            .map(|i| (names::JUMPS[i].from, names::JUMPS[i].to))
            .collect();
        assert_eq!(found, [("FORWARD", names::SERVICES)], "OUTPUT's lacks --ctstate NEW");
        assert!(parse_jumps("filter", save).is_empty(), "nat's rules are not filter's");
    }

    #[test]
    fn chains_from_save_output() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:KPROXY-SERVICES - [0:0]\n:KUBE-SERVICES - [0:0]\n:KPROXY-SVC-ABC - [0:0]\nCOMMIT\n";
        let chains: Vec<_> = parse_chains(save).into_iter().collect();
        assert_eq!(chains, ["KPROXY-SERVICES", "KPROXY-SVC-ABC"]);
    }
}
