//! The only part of iptables mode that touches the kernel: iptables-restore, iptables-save,
//! and cleanup (the jumps from the built-in chains go in with the restore input).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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

    /// Tools by other names (another backend's, or a wrapper in tests).
    pub fn new(iptables: &'static str, restore: &'static str, save: &'static str) -> Self {
        Tools {
            iptables,
            restore,
            save,
        }
    }

    /// Applies an input atomically per table with `--noflush`: chains it does not declare, and
    /// every rule outside kproxy's chains, stay as they are. On failure nothing changes.
    ///
    /// `fill` appends the next lines of the input to its buffer and says false once there are
    /// none: the input goes to the tool's stdin in chunks of about [`CHUNK`] bytes as it is
    /// produced, so a large one is never held whole. A refusal comes back as
    /// [`Refusal`], for the caller to find the line it names in the input.
    pub async fn restore(&self, fill: impl FnMut(&mut Vec<u8>, usize) -> bool) -> Result<RestoreTimes, Refusal> {
        let mut command = Command::new(self.restore);
        command.args(["-w", LOCK_WAIT, "--noflush"]);
        self.run_restore(Writer::Restore(self.restore), command, fill)
            .await
            .map(|(times, _)| times)
    }

    /// Like [`Tools::restore`], through kproxy's native writer for the legacy backend
    /// ([`super::native`]): `exe` (kproxy itself) run with its hidden subcommand. An input
    /// outside what the writer encodes comes back as [`Refusal::Unsupported`], nothing written.
    /// Also returns the writer's one-line summary.
    pub async fn restore_native(
        &self,
        exe: &std::path::Path,
        family: IpFamily,
        fill: impl FnMut(&mut Vec<u8>, usize) -> bool,
    ) -> Result<(RestoreTimes, String), Refusal> {
        let mut command = Command::new(exe);
        command.args([
            super::native::SUBCOMMAND,
            match family {
                IpFamily::V4 => "4",
                IpFamily::V6 => "6",
            },
        ]);
        self.run_restore(Writer::Native, command, fill).await
    }

    async fn run_restore(
        &self,
        writer: Writer,
        mut command: Command,
        mut fill: impl FnMut(&mut Vec<u8>, usize) -> bool,
    ) -> Result<(RestoreTimes, String), Refusal> {
        let mut times = RestoreTimes::default();
        let tool = writer.name();
        // Only the native writer says something on stdout (its summary): iptables-restore's
        // would have to be drained while it reads its input.
        let stdout = match writer {
            Writer::Native => Stdio::piped(),
            Writer::Restore(_) => Stdio::null(),
        };
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| Refusal::Failed(spawn_error(tool, source)))?;
        if let Some(mut stdin) = child.stdin.take() {
            let mut buf = Vec::with_capacity(CHUNK + 4096);
            loop {
                let rendering = Instant::now();
                let more = fill(&mut buf, CHUNK);
                times.rendering += rendering.elapsed();
                if !more {
                    break;
                }
                let writing = Instant::now();
                // A write error means the tool exited early; its stderr says why.
                let written = stdin.write_all(&buf).await;
                times.writing += writing.elapsed();
                if written.is_err() {
                    break;
                }
                buf.clear();
            }
            // Closing stdin ends the input: the tool commits (or refuses) and exits.
            drop(stdin);
        }
        let committing = Instant::now();
        let out = child
            .wait_with_output()
            .await
            .map_err(|source| Refusal::Failed(spawn_error(tool, source)))?;
        times.committing = committing.elapsed();
        if out.status.success() {
            return Ok((times, String::from_utf8_lossy(&out.stdout).trim().to_string()));
        }
        let message = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if matches!(writer, Writer::Native) && out.status.code() == Some(super::native::EXIT_UNSUPPORTED) {
            return Err(Refusal::Unsupported(message));
        }
        Err(Refusal::Refused {
            tool,
            line: refused_line(&message),
            message,
        })
    }

    /// Applies a small input held whole (cleanup).
    async fn restore_text(&self, input: &str) -> Result<RestoreTimes> {
        let mut sent = false;
        let result = self
            .restore(|buf, _| {
                let first = !sent;
                if first {
                    buf.extend_from_slice(input.as_bytes());
                    sent = true;
                }
                first
            })
            .await;
        result.map_err(|refusal| {
            refusal.into_error(|n| input.lines().nth(n.saturating_sub(1)).map(|l| (l.to_string(), None)))
        })
    }

    /// kproxy's chains currently in `table` (from iptables-save).
    pub async fn chains(&self, table: &str) -> Result<BTreeSet<String>> {
        let mut chains = BTreeSet::new();
        self.save_lines(table, |line| {
            if let Some(chain) = chain_of_line(line) {
                chains.insert(chain.to_string());
            }
        })
        .await?;
        Ok(chains)
    }

    /// Starts the iptables-save runs a full sync reads ([`Tools::kernel_state`]), one per
    /// table, so that they load the tables from the kernel while kproxy plans.
    pub fn start_kernel_read(&self) -> Result<KernelRead> {
        let mut saves = Vec::new();
        for table in ["filter", "nat"] {
            saves.push((table, self.spawn_save(table)?));
        }
        Ok(KernelRead { saves })
    }

    /// What a full sync needs to know of the kernel, from the runs `read` started: kproxy's
    /// nat chains for which `stray` holds (to delete them), and which jumps from the built-in
    /// chains are in place (to add the missing ones). iptables-save's output is read a line at
    /// a time and only those facts are kept: at 10,000 Services the nat table prints as 50 MB.
    pub async fn kernel_state(&self, read: KernelRead, mut stray: impl FnMut(&str) -> bool) -> Result<KernelState> {
        let mut state = KernelState::default();
        for (table, child) in read.saves {
            self.read_save(table, child, |line| {
                if table == "nat" {
                    if let Some(chain) = chain_of_line(line) {
                        if stray(chain) {
                            state.nat_chains.insert(chain.to_string());
                        }
                        return;
                    }
                }
                if let Some(i) = jump_of_line(table, line) {
                    state.jumps.insert(i);
                }
            })
            .await?;
        }
        Ok(state)
    }

    /// Runs iptables-save for `table` and hands each line of its output to `each`.
    async fn save_lines(&self, table: &str, each: impl FnMut(&str)) -> Result<()> {
        let child = self.spawn_save(table)?;
        self.read_save(table, child, each).await
    }

    fn spawn_save(&self, table: &str) -> Result<tokio::process::Child> {
        Command::new(self.save)
            .args(["-t", table])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| spawn_error(self.save, source))
    }

    async fn read_save(&self, table: &str, mut child: tokio::process::Child, mut each: impl FnMut(&str)) -> Result<()> {
        let read_error = |e: std::io::Error| DataplaneError::Command {
            command: format!("{} -t {table}", self.save),
            message: format!("reading its output: {e}"),
        };
        if let Some(stdout) = child.stdout.take() {
            let mut reader = BufReader::with_capacity(64 * 1024, stdout);
            let mut line = String::new();
            while reader.read_line(&mut line).await.map_err(read_error)? > 0 {
                each(line.trim_end_matches('\n'));
                line.clear();
            }
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|source| spawn_error(self.save, source))?;
        if !out.status.success() {
            return Err(DataplaneError::Command {
                command: format!("{} -t {table}", self.save),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// Removes the jump rules and every `KPROXY-` chain. Safe to run when nothing is there.
    /// Whether the canary chain ([`names::CANARY`]) is there.
    pub async fn canary_present(&self) -> Result<bool> {
        let list = ["-w", LOCK_WAIT, "-t", names::CANARY_TABLE, "-n", "-L", names::CANARY];
        status(self.iptables, &list).await
    }

    /// Whether these are iptables-legacy's tools (`iptables --version` says `(legacy)`).
    pub async fn is_legacy(&self) -> bool {
        match output(self.iptables, &["--version"]).await {
            Ok((out, _)) => out.status.success() && String::from_utf8_lossy(&out.stdout).contains("(legacy)"),
            Err(_) => false,
        }
    }

    /// How many rules `chain` of `table` holds; `None` if there is no such chain.
    pub async fn chain_rules(&self, table: &str, chain: &str) -> Result<Option<usize>> {
        let (out, err) = output(self.iptables, &["-w", LOCK_WAIT, "-t", table, "-S", chain]).await?;
        match out.status.code() {
            Some(0) => Ok(Some(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A "))
                    .count(),
            )),
            Some(1) => Ok(None),
            _ => Err(err),
        }
    }

    /// Creates the canary chain unless it is there.
    pub async fn ensure_canary(&self) -> Result<()> {
        if !self.canary_present().await? {
            let create = ["-w", LOCK_WAIT, "-t", names::CANARY_TABLE, "-N", names::CANARY];
            let (out, err) = output(self.iptables, &create).await?;
            if !out.status.success() && !self.canary_present().await? {
                return Err(err);
            }
        }
        Ok(())
    }

    pub async fn cleanup(&self) -> Result<()> {
        // A host without the mangle table has no canary either (and a missing tool is reported
        // by the listing below).
        if self.canary_present().await.unwrap_or(false) {
            let delete = ["-w", LOCK_WAIT, "-t", names::CANARY_TABLE, "-X", names::CANARY];
            let (out, err) = output(self.iptables, &delete).await?;
            if !out.status.success() {
                return Err(err);
            }
        }
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
            };
            input.push_str(&text.into_text(table));
        }
        if input.is_empty() {
            return Ok(());
        }
        self.restore_text(&input).await.map(drop)
    }
}

/// iptables-save runs started by [`Tools::start_kernel_read`], one per table, in the order
/// they are read.
#[derive(Debug)]
pub struct KernelRead {
    saves: Vec<(&'static str, tokio::process::Child)>,
}

/// Where the wall time of one iptables-restore run went, as kproxy saw it: what it waits on.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreTimes {
    /// Producing the input (kproxy rendering the next chunk).
    pub rendering: Duration,
    /// Waiting for the tool to read a chunk: the tool parsing (or loading the table) slower
    /// than kproxy renders.
    pub writing: Duration,
    /// From the end of the input to the tool's exit: libiptc building the table and the kernel
    /// replacing it.
    pub committing: Duration,
}

/// How much of a restore input is written to the tool's stdin at a time.
pub const CHUNK: usize = 64 * 1024;

/// iptables-restore refused an input (or could not run).
#[derive(Debug)]
pub enum Refusal {
    /// The tool ran and refused; `line` is the input line its message names, if any.
    Refused {
        tool: &'static str,
        line: Option<usize>,
        message: String,
    },
    Failed(DataplaneError),
    /// The native writer does not encode this input and wrote nothing: run iptables-restore.
    Unsupported(String),
}

/// The native writer, as errors name it.
pub const NATIVE_TOOL: &str = "kproxy (native iptables writer)";

/// What [`Tools::run_restore`] runs: an iptables-restore binary, or kproxy's native writer
/// (which prints a summary, and exits [`super::native::EXIT_UNSUPPORTED`] for an input it
/// leaves to iptables-restore).
#[derive(Debug, Clone, Copy)]
enum Writer {
    Restore(&'static str),
    Native,
}

impl Writer {
    fn name(self) -> &'static str {
        match self {
            Writer::Restore(tool) => tool,
            Writer::Native => NATIVE_TOOL,
        }
    }
}

impl Refusal {
    /// The error to report; `line_of(n)` gives input line `n` and the Service it was written
    /// for, so that the error quotes the line and names the Service.
    pub fn into_error(self, line_of: impl FnOnce(usize) -> Option<(String, Option<String>)>) -> DataplaneError {
        match self {
            Refusal::Failed(e) => e,
            Refusal::Unsupported(message) => DataplaneError::Command {
                command: NATIVE_TOOL.to_string(),
                message,
            },
            Refusal::Refused { tool, line, message } => match line.and_then(|n| Some((n, line_of(n)?))) {
                Some((line, (text, owner))) => DataplaneError::Rejected {
                    tool,
                    line,
                    text,
                    message: match owner {
                        Some(service) => format!("{message} (in the rules of Service {service})"),
                        None => message,
                    },
                },
                None => DataplaneError::Command {
                    command: tool.to_string(),
                    message,
                },
            },
        }
    }
}

/// The input line iptables-restore's complaint names: `line 3: ...` (iptables-nft, and legacy
/// for some errors) or `Error occurred at line: 8000` (legacy, for a rule it cannot parse).
pub fn refused_line(message: &str) -> Option<usize> {
    message.match_indices("line").find_map(|(at, _)| {
        let rest = message[at + 4..].trim_start_matches([':', ' ']);
        let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
        digits.parse::<usize>().ok()
    })
}

/// The chain an iptables-save line declares, if it is one of kproxy's.
fn chain_of_line(line: &str) -> Option<&str> {
    let chain = line.strip_prefix(':')?.split_whitespace().next()?;
    chain.starts_with(names::PREFIX).then_some(chain)
}

/// Chains with kproxy's prefix declared in iptables-save output.
pub fn parse_chains(save: &str) -> BTreeSet<String> {
    save.lines().filter_map(chain_of_line).map(str::to_string).collect()
}

/// Which of [`names::JUMPS`] of `table` an iptables-save line is: a rule in the built-in
/// chain with kproxy's comment and target (what `iptables -C` would find).
fn jump_of_line(table: &str, line: &str) -> Option<usize> {
    let rule = line.strip_prefix("-A ")?;
    let from = rule.split(' ').next()?;
    // Only built-in chains hold jumps: every other rule is passed over before any formatting.
    if from.starts_with(names::PREFIX) {
        return None;
    }
    names::JUMPS.iter().position(|jump| {
        jump.table == table
            && from == jump.from
            && rule.ends_with(&format!(" -j {}", jump.to))
            && rule.contains(&format!("--comment {}", names::quote(jump.comment)))
            && (!jump.new_only || rule.contains("--ctstate NEW"))
    })
}

/// Which of [`names::JUMPS`] of `table` the iptables-save output of that table holds.
pub fn parse_jumps(table: &str, save: &str) -> BTreeSet<usize> {
    save.lines().filter_map(|l| jump_of_line(table, l)).collect()
}

/// Turns iptables-restore's complaint about a whole `input` into an error that quotes the
/// offending line.
pub fn restore_error(tool: &'static str, input: &str, message: String) -> DataplaneError {
    let line = refused_line(&message);
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
    fn refused_line_in_either_backends_words() {
        let legacy = "iptables-restore v1.8.9 (legacy): Couldn't load target `KPROXY-X':No such file or directory\n\n\
            Error occurred at line: 8000\nTry `iptables-restore -h' or 'iptables-restore --help' for more information.";
        assert_eq!(refused_line(legacy), Some(8000));
        assert_eq!(refused_line("iptables-restore: line 12 failed"), Some(12));
        assert_eq!(
            refused_line("iptables-restore v1.8.9 (nf_tables): line 3: RULE_APPEND failed"),
            Some(3)
        );
        assert_eq!(refused_line("iptables-restore: COMMIT expected"), None);
        assert_eq!(refused_line("inline comment: no number"), None);
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
