//! The sockopts of the legacy x_tables interface and the xtables lock: the only unsafe code
//! of iptables mode (getsockopt/setsockopt take raw buffers whose layout `layout` defines).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::libc;

use super::layout::*;
use super::splice::TableInfo;

const SO_SET_REPLACE: libc::c_int = 64;
const SO_SET_ADD_COUNTERS: libc::c_int = 65;
const SO_GET_INFO: libc::c_int = 64;
const SO_GET_ENTRIES: libc::c_int = 65;

/// A raw socket of one family, through which the table sockopts go.
pub struct Socket {
    fd: OwnedFd,
    level: libc::c_int,
}

fn table_name(table: &str) -> io::Result<[u8; TABLE_NAME_LEN]> {
    let mut name = [0u8; TABLE_NAME_LEN];
    if table.len() >= TABLE_NAME_LEN {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "table name too long"));
    }
    name[..table.len()].copy_from_slice(table.as_bytes());
    Ok(name)
}

impl Socket {
    pub fn open(family: Family) -> io::Result<Socket> {
        let (domain, level) = match family {
            Family::V4 => (libc::AF_INET, libc::SOL_IP),
            Family::V6 => (libc::AF_INET6, libc::SOL_IPV6),
        };
        // SAFETY: socket(2) takes no pointers; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Socket { fd, level })
    }

    fn get(&self, opt: libc::c_int, buf: &mut [u8]) -> io::Result<usize> {
        let mut len = buf.len() as libc::socklen_t;
        // SAFETY: buf is valid for len bytes of reads and writes for the duration of the call,
        // and len points to a live socklen_t; the kernel writes at most len bytes.
        let rc = unsafe { libc::getsockopt(self.fd.as_raw_fd(), self.level, opt, buf.as_mut_ptr().cast(), &mut len) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(len as usize)
    }

    fn set(&self, opt: libc::c_int, buf: &[u8]) -> io::Result<()> {
        // SAFETY: buf is valid for buf.len() bytes of reads; a replace's counters pointer
        // inside it is set by `replace` to a live buffer of the size it declares.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                self.level,
                opt,
                buf.as_ptr().cast(),
                buf.len() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `IPT_SO_GET_INFO`.
    pub fn info(&self, table: &str) -> io::Result<TableInfo> {
        let mut buf = [0u8; GETINFO_SIZE];
        buf[..TABLE_NAME_LEN].copy_from_slice(&table_name(table)?);
        self.get(SO_GET_INFO, &mut buf)?;
        let mut info = TableInfo {
            valid_hooks: get_u32(&buf, 32),
            num_entries: get_u32(&buf, 76),
            size: get_u32(&buf, 80),
            ..TableInfo::default()
        };
        for h in 0..HOOKS {
            info.hook_entry[h] = get_u32(&buf, 36 + 4 * h);
            info.underflow[h] = get_u32(&buf, 56 + 4 * h);
        }
        Ok(info)
    }

    /// `IPT_SO_GET_ENTRIES`: the buffer holds the [`GET_ENTRIES_HEADER`], then `size` bytes of
    /// entries (the kernel refuses any other length, e.g. after another writer changed the
    /// table: EAGAIN then).
    /// The header starts at `at` of the returned buffer, and `slack` zero bytes follow the
    /// entries (room for the splice in place; pages of it never written are never touched).
    pub fn entries(&self, table: &str, size: u32, at: usize, slack: usize) -> io::Result<Vec<u8>> {
        let len = GET_ENTRIES_HEADER + size as usize;
        let mut buf = vec![0u8; at + len + slack];
        let get = &mut buf[at..at + len];
        get[..TABLE_NAME_LEN].copy_from_slice(&table_name(table)?);
        put_u32(get, TABLE_NAME_LEN, size);
        self.get(SO_GET_ENTRIES, get)?;
        Ok(buf)
    }

    /// `IPT_SO_SET_REPLACE` of a table laid out by `splice` (header filled in but for the
    /// counters pointer); `old_counters` receives the replaced table's counters, one
    /// `struct xt_counters` per old entry (the header's num_counters).
    pub fn replace(&self, buf: &mut [u8], old_counters: &mut [u8]) -> io::Result<()> {
        let num_counters = get_u32(buf, 84) as usize;
        assert_eq!(
            old_counters.len(),
            num_counters * COUNTERS_SIZE,
            "one xt_counters per old entry"
        );
        put_u64(buf, 88, old_counters.as_mut_ptr() as u64);
        self.set(SO_SET_REPLACE, buf)
    }

    /// `IPT_SO_SET_ADD_COUNTERS`.
    pub fn add_counters(&self, buf: &[u8]) -> io::Result<()> {
        self.set(SO_SET_ADD_COUNTERS, buf)
    }
}

/// The lock every iptables-legacy tool takes around its read and write of a table
/// (`XTABLES_LOCKFILE`, else /run/xtables.lock), held while this lives.
pub struct XtablesLock {
    _fd: OwnedFd,
}

impl XtablesLock {
    /// Waits up to `wait` for it, as `iptables -w SECONDS`.
    pub fn take(wait: Duration) -> io::Result<XtablesLock> {
        let path = std::env::var("XTABLES_LOCKFILE").unwrap_or_else(|_| "/run/xtables.lock".to_string());
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        let fd: OwnedFd = file.into();
        let deadline = Instant::now() + wait;
        loop {
            // SAFETY: flock(2) on a descriptor we own; no pointers.
            let rc = unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(XtablesLock { _fd: fd });
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("another app is currently holding the xtables lock ({path}); gave up after {wait:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
