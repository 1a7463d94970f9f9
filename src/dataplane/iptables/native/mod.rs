//! A native writer for the legacy x_tables backend: what `iptables-restore --noflush` does
//! with kproxy's input, without libiptc's parse and re-layout of the whole table. Under the
//! xtables lock it reads the table (`IPT_SO_GET_INFO`, `IPT_SO_GET_ENTRIES`), splices the
//! input's chains into it (everything else kept byte for byte, jumps relocated), replaces it
//! (`IPT_SO_SET_REPLACE`, all or nothing) and gives the kept rules their counters back
//! (`IPT_SO_SET_ADD_COUNTERS`), as libiptc does.
//!
//! It runs in a short-lived child (`kproxy __iptables-native-restore 4|6`, the input on
//! stdin like iptables-restore's), so that the table's copy (spliced in place, 107 MB at
//! 10,000 Services) never counts in kproxy's own memory. An input with anything the encoder does
//! not know exits with [`EXIT_UNSUPPORTED`] before touching the kernel, and the caller runs
//! iptables-restore instead.

mod kernel;
pub mod layout;
pub mod rule;
pub mod splice;
#[cfg(test)]
mod tests;

use std::io::Read;
use std::time::{Duration, Instant};

pub use self::layout::Family;
use self::layout::*;
use self::rule::Parse;

/// The hidden subcommand that runs the writer.
pub const SUBCOMMAND: &str = "__iptables-native-restore";

/// Exit status of a child that wrote nothing because the input is outside what it encodes.
pub const EXIT_UNSUPPORTED: i32 = 3;

/// How long to wait for the xtables lock (`-w 5`, as kube-proxy).
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// How often to start over when another writer (one that does not take the lock) replaced
/// the table between our read and our replace (the kernel's EAGAIN).
const ATTEMPTS: usize = 3;

/// Why nothing (or not everything) was written.
#[derive(Debug)]
pub enum Error {
    /// Outside the encoder's subset: nothing written; run iptables-restore instead.
    Unsupported(String),
    /// Refused (by the input's own content or by the kernel), or the kernel unreachable. Tables
    /// committed before the failing one stay committed, as with iptables-restore.
    Failed(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Unsupported(why) | Error::Failed(why) => f.write_str(why),
        }
    }
}

impl From<Parse> for Error {
    fn from(p: Parse) -> Error {
        match p {
            Parse::Unsupported { .. } => Error::Unsupported(p.to_string()),
            Parse::Invalid { .. } => Error::Failed(p.to_string()),
        }
    }
}

/// What one run did, for the caller's debug log.
#[derive(Debug, Default, Clone)]
pub struct Written {
    pub tables: usize,
    pub rules_written: usize,
    pub entries: usize,
    pub bytes: usize,
    pub read: Duration,
    pub splice: Duration,
    pub replace: Duration,
    pub counters: Duration,
    pub attempts: usize,
}

/// Writes an iptables-restore `--noflush` input natively. Every table's input is parsed and
/// encoded, and every table read and spliced, before the first is replaced: an input outside
/// the subset changes nothing.
pub fn write(family: Family, input: &str) -> Result<Written, Error> {
    write_with(family, input, &mut |_, _| {})
}

/// [`write`], calling `before_replace(table, attempt)` between each table's read and its
/// replace (the tests race another writer there).
fn write_with(family: Family, input: &str, before_replace: &mut dyn FnMut(&str, usize)) -> Result<Written, Error> {
    let tables = rule::parse_input(family, input)?;
    let mut done = Written {
        tables: tables.len(),
        ..Written::default()
    };
    if tables.is_empty() {
        return Ok(done);
    }
    let sock = kernel::Socket::open(family).map_err(|e| Error::Failed(format!("cannot open a raw socket: {e}")))?;
    let _lock = kernel::XtablesLock::take(LOCK_WAIT).map_err(|e| Error::Failed(e.to_string()))?;
    // Read and splice all, so that an unsupported table is found before anything changes.
    let mut prepared = Vec::new();
    for t in &tables {
        prepared.push(prepare(&sock, family, t, &mut done)?);
    }
    for (t, mut new) in tables.iter().zip(prepared) {
        let mut attempt = 1;
        loop {
            let fail = |what: &str, e: std::io::Error| {
                Error::Failed(format!(
                    "line {}: {} table: {what} refused: {}",
                    t.commit_line,
                    t.table,
                    explain(&e)
                ))
            };
            before_replace(&t.table, attempt);
            let started = Instant::now();
            let old_entries = get_u32(&new.buf, 84) as usize;
            let mut old_counters = vec![0u8; old_entries * COUNTERS_SIZE];
            match sock.replace(&mut new.buf, &mut old_counters) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::EAGAIN) && attempt < ATTEMPTS => {
                    // Someone replaced the table since we read it: read it again.
                    attempt += 1;
                    new = prepare(&sock, family, t, &mut done).map_err(|e| match e {
                        Error::Unsupported(why) => Error::Failed(why),
                        e => e,
                    })?;
                    continue;
                }
                Err(e) => return Err(fail("IPT_SO_SET_REPLACE", e)),
            }
            done.replace += started.elapsed();
            let started = Instant::now();
            let counters = new.table.counters(&t.table, &old_counters);
            drop(old_counters);
            sock.add_counters(&counters)
                .map_err(|e| fail("IPT_SO_SET_ADD_COUNTERS", e))?;
            done.counters += started.elapsed();
            done.rules_written += new.table.rules_written;
            done.entries += new.table.num_entries;
            done.bytes += new.buf.len() - REPLACE_HEADER;
            done.attempts = done.attempts.max(attempt);
            break;
        }
    }
    Ok(done)
}

fn prepare(
    sock: &kernel::Socket,
    family: Family,
    t: &rule::TableInput,
    done: &mut Written,
) -> Result<PreparedTable, Error> {
    let started = Instant::now();
    let io = |what: &str, e: std::io::Error| Error::Failed(format!("{} table: {what}: {}", t.table, explain(&e)));
    let mut attempt = 1;
    let slack = splice::growth_bound(family, t);
    let (info, raw) = loop {
        let info = sock.info(&t.table).map_err(|e| io("IPT_SO_GET_INFO", e))?;
        match sock.entries(&t.table, info.size, splice::GET_ENTRIES_AT, slack) {
            Ok(raw) => break (info, raw),
            // The table changed size between the two calls (a writer without the lock).
            Err(e) if e.raw_os_error() == Some(nix::libc::EAGAIN) && attempt < ATTEMPTS => attempt += 1,
            Err(e) => return Err(io("IPT_SO_GET_ENTRIES", e)),
        }
    };
    done.read += started.elapsed();
    let started = Instant::now();
    #[cfg(test)]
    let reference = reference_splice(family, info, &raw, t);
    let table = if in_place() {
        match splice::splice_in_place(family, info, raw, &t.table, t) {
            Ok(Ok(table)) => Ok(table),
            // The old table's chains are not in libiptc's order: splice into a new buffer.
            Ok(Err(raw)) => {
                // The namespace tests' tables come from iptables-legacy-restore: they must take
                // the in-place path, or the comparison below proves nothing.
                if cfg!(test) {
                    panic!("the splice in place handed back a table written by libiptc");
                }
                reference_splice(family, info, &raw, t)
            }
            Err(e) => Err(e),
        }
    } else {
        reference_splice(family, info, &raw, t)
    };
    #[cfg(test)]
    match (&reference, &table) {
        (Ok(r), Ok(t)) => {
            assert!(r.buf == t.buf, "the splice in place differs from the reference");
            assert_eq!((&r.kept, r.num_entries), (&t.kept, t.num_entries));
        }
        (Err(r), Err(t)) => assert_eq!(r.to_string(), t.to_string()),
        (r, t) => panic!(
            "the reference says {:?}, the splice in place {:?}",
            r.as_ref().err(),
            t.as_ref().err()
        ),
    }
    let mut table = table?;
    let buf = std::mem::take(&mut table.buf);
    done.splice += started.elapsed();
    Ok(PreparedTable { table, buf })
}

/// Whether to splice in the read buffer (the default) or into a second one
/// (`KPROXY_IPTABLES_NATIVE_IN_PLACE=0`, the reference layout, for comparison).
fn in_place() -> bool {
    std::env::var_os("KPROXY_IPTABLES_NATIVE_IN_PLACE").is_none_or(|v| v != "0")
}

/// The splice into a buffer of its own, from a buffer `Socket::entries` filled.
fn reference_splice(
    family: Family,
    info: splice::TableInfo,
    raw: &[u8],
    t: &rule::TableInput,
) -> Result<splice::NewTable, Parse> {
    let at = splice::GET_ENTRIES_AT + GET_ENTRIES_HEADER;
    let old = splice::parse_table(family, info, &raw[at..at + info.size as usize])?;
    splice::splice(&old, &t.table, t)
}

/// A table ready for the kernel: the layout's bookkeeping, and the replace buffer apart so that
/// the replace can write its counters pointer into it.
struct PreparedTable {
    table: splice::NewTable,
    buf: Vec<u8>,
}

/// errno as the iptables tools explain it for a replace.
fn explain(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(nix::libc::ENOENT) => format!("{e} (a match or target this kernel does not have, or no such table)"),
        Some(nix::libc::EINVAL) => format!("{e} (the kernel rejected a rule of this table)"),
        Some(nix::libc::ELOOP) => format!("{e} (a loop of jumps)"),
        Some(nix::libc::EPERM) | Some(nix::libc::EACCES) => format!("{e} (needs CAP_NET_ADMIN)"),
        _ => e.to_string(),
    }
}

/// `kproxy __iptables-native-restore 4|6`: reads the input from stdin, writes it, and exits
/// 0, [`EXIT_UNSUPPORTED`] (nothing written), or 1 with the reason on stderr (naming the line as
/// iptables-restore does). On success a one-line summary goes to stdout.
pub fn child_main(args: &[String]) -> i32 {
    let family = match args.first().map(String::as_str) {
        Some("4") => Family::V4,
        Some("6") => Family::V6,
        _ => {
            eprintln!("usage: kproxy {SUBCOMMAND} 4|6 < restore-input");
            return 2;
        }
    };
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("{SUBCOMMAND}: reading the input: {e}");
        return 1;
    }
    match write(family, &input) {
        Ok(w) => {
            println!(
                "tables={} rules_written={} entries={} bytes={} read_ms={} splice_ms={} replace_ms={} counters_ms={} attempts={}",
                w.tables,
                w.rules_written,
                w.entries,
                w.bytes,
                w.read.as_millis(),
                w.splice.as_millis(),
                w.replace.as_millis(),
                w.counters.as_millis(),
                w.attempts
            );
            // What this process cost, for BENCHMARKS.md: its peak RSS (the tables' copies),
            // its minor page faults (first touches of fresh memory) and CPU.
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            let hwm = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .unwrap_or("?")
                .trim();
            let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
            let ticks: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
            println!(
                "peak_rss={hwm} minflt={} utime_ticks={} stime_ticks={}",
                ticks.get(7).unwrap_or(&"?"),
                ticks.get(11).unwrap_or(&"?"),
                ticks.get(12).unwrap_or(&"?")
            );
            0
        }
        Err(Error::Unsupported(why)) => {
            eprintln!("{SUBCOMMAND}: {why}");
            EXIT_UNSUPPORTED
        }
        Err(Error::Failed(why)) => {
            eprintln!("{SUBCOMMAND}: {why}");
            1
        }
    }
}
