//! The one trait every proxy mode implements, and what a sync reports.
//!
//! A dataplane turns a [`DesiredState`] into kernel state. It is told what changed since its last
//! successful sync so it can do work proportional to the change; after any error the runner asks
//! for a full sync, which must repair whatever a failed or foreign change left behind.

pub mod conntrack;
pub mod iptables;
pub mod ipvs;
pub mod nfacct;
pub mod nfnetlink;
pub mod nftables;
pub mod nlattr;
pub mod port_policy;

use futures::future::BoxFuture;

use crate::model::{ChangeSet, DesiredState};

/// What one sync did, for the one-line sync log and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Rules (or virtual servers) written in this sync.
    pub rules_written: usize,
    /// Rules in the kernel owned by kproxy after the sync, by table.
    pub rules_total: Vec<(&'static str, usize)>,
    /// Service ports that have no local endpoints for a Local policy (internal, external).
    pub no_local_endpoints: (usize, usize),
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// A restore/transaction was refused; the kernel kept its previous rules.
    #[error("{tool} rejected the ruleset at line {line}: {message}; offending line: {text:?}")]
    Rejected {
        tool: &'static str,
        line: usize,
        text: String,
        message: String,
    },
    /// nf_tables refused a netlink transaction at `command` (nft syntax), written on behalf of
    /// `owner` (a Service, or kproxy's fixed chains); the kernel kept its previous rules.
    #[error("nf_tables refused the transaction at `{command}` ({owner}): {message}")]
    Refused {
        command: String,
        owner: String,
        message: String,
    },
    #[error("{command} failed: {message}")]
    Command { command: String, message: String },
    #[error("could not run {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// The kernel or userspace lacks what this mode needs; retrying will not help.
    #[error("{0}")]
    Unsupported(String),
    #[error("netlink: {0}")]
    Netlink(String),
}

impl DataplaneError {
    /// `input` refused by `tool`: [`DataplaneError::Rejected`] quoting the input line the tool
    /// named, else a plain failure of `command`.
    pub fn refused(tool: &'static str, command: &str, input: &str, line: Option<usize>, message: String) -> Self {
        match line {
            Some(line) => DataplaneError::Rejected {
                tool,
                line,
                text: input
                    .lines()
                    .nth(line.saturating_sub(1))
                    .unwrap_or_default()
                    .to_string(),
                message,
            },
            None => DataplaneError::Command {
                command: command.to_string(),
                message,
            },
        }
    }

    /// Whether the sync runner should retry (with backoff) rather than give up.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, DataplaneError::Unsupported(_))
    }
}

pub type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// A proxy mode. Implementations own their kernel objects and nothing else.
pub trait Dataplane: Send {
    /// The `--proxy-mode` name.
    fn mode(&self) -> &'static str;

    /// Makes the kernel implement `desired`. With `changes.full` every object is rewritten and
    /// strays are removed; otherwise only the Services in `changes.services` need work. On error
    /// the kernel must be left as it was (or consistent enough to serve), and the caller will
    /// retry with a full sync.
    fn sync<'a>(&'a mut self, desired: &'a DesiredState, changes: &'a ChangeSet) -> BoxFuture<'a, Result<SyncStats>>;

    /// Removes everything this mode ever created. Idempotent: succeeds when nothing is left.
    fn cleanup(&mut self) -> BoxFuture<'_, Result<()>>;

    /// Whether a failed sync leaves this dataplane able to take partial change sets: the kernel
    /// and the dataplane's own record of it are as they were before the call. The runner then
    /// keeps programming changes (carrying the failed call's Services along) while it retries
    /// the full sync with backoff; otherwise every sync after a failure is full, and changes
    /// wait for the retry.
    fn partial_after_failure(&self) -> bool {
        false
    }

    /// How long this dataplane trusts its record of the kernel between full syncs while
    /// [`Dataplane::drifted`] sees nothing wrong: the periodic sync (`--sync-period`) is then a
    /// partial one, and a full one runs only this often. `None` (the default): every periodic
    /// sync is full (nftables mode's is a comparison with the kernel, IPVS mode's a rewrite, as
    /// kube-proxy's IPVS mode does).
    fn full_sync_period(&self) -> Option<std::time::Duration> {
        None
    }

    /// Whether something outside kproxy may have removed its kernel objects since the last full
    /// sync: a check cheap enough to run every `--sync-period`. Only asked where
    /// [`Dataplane::full_sync_period`] is set; true makes the periodic sync a full one.
    fn drifted(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async { false })
    }
}

/// One dataplane per IP family (iptables and ip6tables), synced in turn as one.
pub struct PerFamily {
    mode: &'static str,
    families: Vec<Box<dyn Dataplane>>,
}

impl PerFamily {
    pub fn new(mode: &'static str, families: Vec<Box<dyn Dataplane>>) -> Self {
        PerFamily { mode, families }
    }
}

impl Dataplane for PerFamily {
    fn mode(&self) -> &'static str {
        self.mode
    }

    fn sync<'a>(&'a mut self, desired: &'a DesiredState, changes: &'a ChangeSet) -> BoxFuture<'a, Result<SyncStats>> {
        Box::pin(async move {
            let mut total = SyncStats::default();
            for dp in &mut self.families {
                let stats = dp.sync(desired, changes).await?;
                total.rules_written += stats.rules_written;
                for (table, n) in stats.rules_total {
                    match total.rules_total.iter_mut().find(|(t, _)| *t == table) {
                        Some((_, sum)) => *sum += n,
                        None => total.rules_total.push((table, n)),
                    }
                }
                total.no_local_endpoints.0 += stats.no_local_endpoints.0;
                total.no_local_endpoints.1 += stats.no_local_endpoints.1;
            }
            Ok(total)
        })
    }

    fn cleanup(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            for dp in &mut self.families {
                dp.cleanup().await?;
            }
            Ok(())
        })
    }

    fn partial_after_failure(&self) -> bool {
        self.families.iter().all(|dp| dp.partial_after_failure())
    }

    fn full_sync_period(&self) -> Option<std::time::Duration> {
        // The family that trusts its record the least decides; none if any family has none.
        self.families
            .iter()
            .map(|dp| dp.full_sync_period())
            .try_fold(std::time::Duration::MAX, |min, p| p.map(|p| min.min(p)))
    }

    fn drifted(&mut self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let mut drifted = false;
            for dp in &mut self.families {
                drifted |= dp.drifted().await;
            }
            drifted
        })
    }
}
