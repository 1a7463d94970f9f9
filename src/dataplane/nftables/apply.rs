//! The only part of nftables mode that touches the kernel: `nft -f -`, listing the table, and
//! deleting it.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::names;
use super::plan::KernelObjects;
use super::render::words;
use crate::dataplane::{DataplaneError, Result};
use crate::model::IpFamily;

const NFT: &str = "nft";

/// Runs `nft args`, feeding `input` on stdin; stdout on success, `(stderr, error)` otherwise.
async fn nft(args: &[&str], input: Option<&str>) -> Result<Result<String, String>> {
    let mut child = Command::new(NFT)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A write error means nft exited early; its stderr says why.
        let _ = stdin.write_all(text.as_bytes()).await;
    }
    let out = child.wait_with_output().await.map_err(spawn_error)?;
    if out.status.success() {
        Ok(Ok(String::from_utf8_lossy(&out.stdout).into_owned()))
    } else {
        Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// A missing `nft` will not appear by retrying.
fn spawn_error(source: std::io::Error) -> DataplaneError {
    if source.kind() == std::io::ErrorKind::NotFound {
        DataplaneError::Unsupported("nft not found: nftables mode needs the nft command (package nftables)".into())
    } else {
        DataplaneError::Spawn {
            command: NFT.into(),
            source,
        }
    }
}

/// Checks that nft runs and the kernel answers, before anything is programmed.
pub async fn check() -> Result<()> {
    match nft(&["list", "tables"], None).await? {
        Ok(_) => Ok(()),
        Err(message) => Err(DataplaneError::Unsupported(format!(
            "nft list tables failed: {message}"
        ))),
    }
}

/// Applies `text` as one transaction: all of it, or (on error) none of it.
pub async fn apply(text: &str) -> Result<()> {
    match nft(&["-f", "-"], Some(text)).await? {
        Ok(_) => Ok(()),
        Err(message) => Err(nft_error(text, message)),
    }
}

/// Turns nft's complaint (`/dev/stdin:12:1-40: Error: …`) into an error quoting the input line.
pub fn nft_error(input: &str, message: String) -> DataplaneError {
    let line = message.lines().find_map(|l| {
        let rest = l.split_once(':')?.1;
        let (n, _) = rest.split_once(':')?;
        n.parse::<usize>().ok()
    });
    DataplaneError::refused(NFT, "nft -f -", input, line, message)
}

/// The chains and sets of `family`'s table; none when it does not exist. Listed without rules
/// or elements (`-t`), which for a large table would be megabytes of text.
pub async fn list(family: IpFamily) -> Result<KernelObjects> {
    let fam = words(family).family;
    let mut objects = KernelObjects::default();
    for what in ["chains", "sets"] {
        match nft(&["-t", "list", what, fam], None).await? {
            Ok(text) => objects.add_listing(&format!("table {fam} {}", names::TABLE), &text),
            Err(message) => {
                return Err(DataplaneError::Command {
                    command: format!("nft -t list {what} {fam}"),
                    message,
                })
            }
        }
    }
    Ok(objects)
}

/// Deletes `family`'s table; whether there was one.
pub async fn delete_table(family: IpFamily) -> Result<bool> {
    let fam = words(family).family;
    match nft(&["delete", "table", fam, names::TABLE], None).await? {
        Ok(_) => Ok(true),
        Err(message) if message.contains("No such file") => Ok(false),
        // A kernel without nf_tables cannot hold the table.
        Err(message) if message.contains("not supported") => Err(DataplaneError::Unsupported(message)),
        Err(message) => Err(DataplaneError::Command {
            command: format!("nft delete table {fam} {}", names::TABLE),
            message,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_error_quotes_the_line() {
        let input = "add table ip kproxy\nadd chain ip kproxy services\nadd rule ip kproxy services goto nowhere\n";
        let message = "/dev/stdin:3:36-42: Error: Could not process rule: No such file or directory\nadd rule ip kproxy services goto nowhere\n                                   ^^^^^^^".to_string();
        match nft_error(input, message) {
            DataplaneError::Rejected { line, text, .. } => {
                assert_eq!(line, 3);
                assert_eq!(text, "add rule ip kproxy services goto nowhere");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            nft_error(input, "netlink: Error: cache initialization failed".into()),
            DataplaneError::Command { .. }
        ));
    }
}
