//! Relaying a long response body from the backend's socket to the client's without copying it
//! through user space: `splice(2)` into a pipe the worker keeps, and from it to the client.
//!
//! A 1 MiB answer relayed through a buffer is copied twice by the CPU that relays it (out of
//! the backend's socket, into the client's), 2 MiB of `memcpy` per answer. Spliced, the kernel
//! moves references to the socket buffer's pages into the pipe and from there into the
//! client's socket. Only for plain TCP on both sides (TLS must see the bytes) and bodies of a
//! known length (the relay stops exactly at the body's end, so the backend connection stays
//! reusable).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// What a pipe asks to hold in flight (its default is 16 pages). The pipe's pages are only
/// references to socket buffers while a body is relayed; an idle pipe holds none.
const PIPE_SIZE: i32 = 256 * 1024;
/// A pipe smaller than this is not worth splicing through (the default pipe is 64 KiB).
const MIN_CAPACITY: usize = 64 * 1024;

/// A pipe, both ends non-blocking. Empty whenever it is not lending a relay a hand.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Its capacity in bytes, as the kernel set it.
    capacity: usize,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A larger pipe can be refused (fs.pipe-max-size, the user's pipe quota): then the default.
        let capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))
            .map_err(io::Error::from)?;
        let capacity = usize::try_from(capacity).unwrap_or(0);
        // Past the user's soft pipe quota (fs.pipe-user-pages-soft) the kernel makes pipes of
        // two pages: a relay through one would take a system call per 8 KiB. Copy instead.
        if capacity < MIN_CAPACITY {
            return Err(io::Error::other("pipe quota reached"));
        }
        Ok(Pipe { read, write, capacity })
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Moves exactly `len` bytes from `from` to `to` through `pipe`. A wait for the backend's
/// bytes is bounded by `read_timeout` (as a buffered read is); writes wait for the client as
/// long as it takes, as buffered writes do. On `Err` the pipe may still hold bytes: drop it.
pub async fn relay(
    pipe: &Pipe,
    from: &TcpStream,
    to: &TcpStream,
    mut len: u64,
    read_timeout: Duration,
) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    // Bytes in the pipe, not yet passed on.
    let mut held = 0usize;
    while len > 0 || held > 0 {
        if len > 0 && held < pipe.capacity {
            let want = (pipe.capacity - held).min(usize::try_from(len).unwrap_or(usize::MAX));
            let moved = from.try_io(Interest::READABLE, || {
                splice(from.as_fd(), None, pipe.write.as_fd(), None, want, flags).map_err(io::Error::from)
            });
            match moved {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    held += n;
                    len -= n as u64;
                }
                // With the pipe empty, only the socket can be what has nothing (a pipe that
                // holds bytes can also be full by its pages before its bytes: write first).
                Err(e) if would_block(&e) && held == 0 => {
                    tokio::time::timeout(read_timeout, from.readable())
                        .await
                        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
                    continue;
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if held > 0 {
            let passed = to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_fd(), None, to.as_fd(), None, held, flags).map_err(io::Error::from)
            });
            match passed {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => held -= n,
                Err(e) if would_block(&e) => to.writable().await?,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn relays_exactly_the_length_and_leaves_what_follows_in_the_source() {
        // backend_tx -> backend_rx (proxy) -spliced-> client_tx (proxy) -> client_rx
        let (mut backend_tx, backend_rx) = pair().await;
        let (client_tx, mut client_rx) = pair().await;
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = body.clone();
        let writer = tokio::spawn(async move {
            backend_tx.write_all(&sent).await.unwrap();
            backend_tx.write_all(b"NEXT").await.unwrap();
            backend_tx
        });
        let reader = tokio::spawn(async move {
            let mut got = vec![0; 3_000_000];
            client_rx.read_exact(&mut got).await.unwrap();
            got
        });
        let pipe = Pipe::new().unwrap();
        relay(
            &pipe,
            &backend_rx,
            &client_tx,
            body.len() as u64,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(reader.await.unwrap(), body);
        let _backend_tx = writer.await.unwrap();
        // The bytes after the body are still the backend connection's, unread.
        let mut rest = [0u8; 4];
        backend_rx.readable().await.unwrap();
        let mut rx = backend_rx;
        rx.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"NEXT");
        // The pipe is empty again: a second relay through it starts clean.
        let (mut b2_tx, b2_rx) = pair().await;
        let (c2_tx, mut c2_rx) = pair().await;
        b2_tx.write_all(b"0123456789").await.unwrap();
        relay(&pipe, &b2_rx, &c2_tx, 10, Duration::from_secs(10)).await.unwrap();
        let mut got = [0u8; 10];
        c2_rx.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"0123456789");
    }

    #[tokio::test]
    async fn a_source_that_closes_early_is_an_error() {
        let (mut backend_tx, backend_rx) = pair().await;
        let (client_tx, _client_rx) = pair().await;
        backend_tx.write_all(&[7u8; 1000]).await.unwrap();
        drop(backend_tx);
        let pipe = Pipe::new().unwrap();
        let r = relay(&pipe, &backend_rx, &client_tx, 5000, Duration::from_secs(10)).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_source_times_out() {
        let (_backend_tx, backend_rx) = pair().await;
        let (client_tx, _client_rx) = pair().await;
        let pipe = Pipe::new().unwrap();
        let r = relay(&pipe, &backend_rx, &client_tx, 10, Duration::from_secs(60)).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }
}
