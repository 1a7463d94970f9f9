//! The HTTP/1 data path: client connections served by hand on each worker thread, requests
//! forwarded over the worker's own keep-alive connections to backends ([`Pool`]).
//!
//! Why not hyper here: a hyper connection owns an 8 KiB+ read buffer for its whole life, and a
//! hyper client needs a task and channels per backend connection; profiles put most of the
//! proxy's user time there. This path holds no buffer while a connection is idle (it waits for
//! readability with none, then takes one from the worker's pool), parses each head once where
//! it lies ([`framing`]), writes the backend's request head in one go, and writes the answer's
//! head and the body bytes read with it in one `writev`.
//!
//! Per request: [`read_head`] -> [`Proxy::decide`] (route lookup, redirects, limits, backend
//! pick) -> [`forward`] (upstream head, body, response) or a local answer; then the connection
//! waits, bufferless, for the next request.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io::{IoSlice, Write as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::balance::affinity_value;
use super::framing::{self, Body, ChunkError, ChunkedDecoder, HeadError, RequestHead, ResponseHead};
use super::gateway::proxy as gateway;
use super::pipe::{self, Pipe};
use super::proxy::{Action, Answer, Conn, Decision, Proxy, RequestLine, RequestView};
use super::routes::{join_values, Route, RouteTable, Upstream};
use super::upstream::{Dest, Pool, UpstreamIo, DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, DEFAULT_SEND_TIMEOUT};
use crate::metrics::metrics;

/// Time to send a complete request head, from its first byte (or from the connection's start
/// for the first request): slow clients are disconnected.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle keep-alive connection is kept (nginx's and ingress-nginx's `keepalive_timeout`).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(75);
/// While draining, how long an idle keep-alive connection may still send one last request
/// (answered with `Connection: close`) before it is closed: a client sending continuously
/// learns of the close from an answer instead of finding its connection gone.
pub const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(2);
/// Size of the buffers connections borrow from their worker while a request is in flight.
const BUF_SIZE: usize = 16 * 1024;
/// What a buffer grows to while it relays a response body longer than [`BUF_SIZE`]: a 1 MiB
/// answer then takes 16 reads and writes instead of 64 (given back at [`BUF_SIZE`]).
const LARGE_BODY_BUF: usize = 64 * 1024;
/// Buffers a worker keeps for reuse; a burst beyond that is given back to the allocator.
const POOLED_BUFFERS: usize = 512;
/// Pipes a worker keeps for reuse (two file descriptors each, and 64 pages of the user's pipe
/// quota, fs.pipe-user-pages-soft, 16,384 by default).
const POOLED_PIPES: usize = 16;
/// A body with more than this left after its first read is spliced from the backend's socket
/// to the client's ([`pipe`]) when both are plain TCP, instead of copied through a buffer.
const SPLICE_MIN: u64 = BUF_SIZE as u64;

/// A buffer borrowed from the worker: bytes `start..end` are read and not consumed yet.
pub struct Buf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buf {
    fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
    fn consume(&mut self, n: usize) {
        self.start += n.min(self.end - self.start);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
    /// At least `size` bytes of room in all (for reads of a large body).
    fn widen(&mut self, size: usize) {
        if self.data.len() < size {
            self.data.resize(size, 0);
        }
    }
    /// Room to read into, moving unconsumed bytes to the front and growing up to `max` if full.
    fn spare(&mut self, max: usize) -> &mut [u8] {
        if self.start > 0 && self.end == self.data.len() {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.data.len() && self.data.len() < max {
            let to = (self.data.len() * 2).min(max);
            self.data.resize(to, 0);
        }
        &mut self.data[self.end..]
    }
    /// A read that does not wait: what the (non-blocking) socket already holds.
    fn try_read_from(&mut self, mut s: &std::net::TcpStream, max: usize) -> std::io::Result<usize> {
        let n = std::io::Read::read(&mut s, self.spare(max))?;
        self.end += n;
        Ok(n)
    }
    async fn read_from<R: AsyncRead + Unpin>(&mut self, io: &mut R, max: usize) -> std::io::Result<usize> {
        let spare = self.spare(max);
        if spare.is_empty() {
            return Ok(0);
        }
        let n = io.read(spare).await?;
        self.end += n;
        Ok(n)
    }
}

/// What one worker thread shares between its connections: the proxy's routing, buffers,
/// backend connections, and whether it is draining.
pub struct Worker {
    pub proxy: Arc<Proxy>,
    pub pool: Pool,
    /// The worker's handle on the current table: an `Rc` of its own, so that a request's copy
    /// is a plain increment, not an atomic one on the count all workers share (one more
    /// allocation per table change, hence the allowed `redundant_allocation`).
    #[allow(clippy::redundant_allocation)]
    routes: RefCell<Option<Rc<Arc<RouteTable>>>>,
    routes_rx: RefCell<super::proxy::Routes>,
    buffers: RefCell<Vec<Vec<u8>>>,
    heads: RefCell<Vec<Vec<u8>>>,
    /// Empty pipes for spliced bodies ([`pipe`]), made on first use.
    pipes: RefCell<Vec<Pipe>>,
    shutdown: watch::Receiver<bool>,
    draining: Cell<bool>,
    drain: tokio::sync::Notify,
    /// Request counters by (route, status code), for the current route table, in this
    /// worker's own shard of the request metrics (no atomic read-modify-write per request).
    counters: RefCell<foldhash::HashMap<(usize, u16), crate::metrics::ShardCounter>>,
    metrics: Arc<crate::metrics::IngressShard>,
    /// Connections open on this worker (the drain waits for them).
    pub open: Cell<usize>,
    /// Connection tasks that finished their connection and wait for another
    /// (`controller::start_connection`), so a new connection costs no task and no allocation.
    pub waiting_tasks: RefCell<Vec<Rc<super::controller::TaskSlot>>>,
    pub closed: tokio::sync::Notify,
}

impl Worker {
    pub fn new(proxy: Arc<Proxy>, pool: Pool, shutdown: watch::Receiver<bool>) -> Self {
        let routes_rx = proxy.routes().clone();
        let draining = Cell::new(*shutdown.borrow());
        Worker {
            proxy,
            pool,
            routes: RefCell::new(None),
            routes_rx: RefCell::new(routes_rx),
            buffers: RefCell::new(Vec::new()),
            heads: RefCell::new(Vec::new()),
            pipes: RefCell::new(Vec::new()),
            draining,
            drain: tokio::sync::Notify::new(),
            shutdown,
            counters: RefCell::new(foldhash::HashMap::default()),
            metrics: metrics().ingress_shard(),
            open: Cell::new(0),
            waiting_tasks: RefCell::new(Vec::new()),
            closed: tokio::sync::Notify::new(),
        }
    }

    /// Whether the worker drains: answers say `Connection: close`. A flag of the worker's own,
    /// read on every request, rather than the shutdown channel's lock shared by all threads.
    pub fn draining(&self) -> bool {
        self.draining.get()
    }

    /// Called by the worker once shutdown began: idle connections get their last call, and
    /// connection tasks waiting for a connection end.
    pub fn start_draining(&self) {
        self.draining.set(true);
        self.drain.notify_waiters();
        for slot in self.waiting_tasks.borrow_mut().drain(..) {
            slot.wake_empty();
        }
    }

    /// Becomes true when the worker drains.
    pub fn proxy_shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// The current route table, refreshed only when it changed.
    #[allow(clippy::redundant_allocation)]
    fn table(&self) -> Option<Rc<Arc<RouteTable>>> {
        let mut rx = self.routes_rx.borrow_mut();
        if rx.has_changed().unwrap_or(false) || self.routes.borrow().is_none() {
            *self.routes.borrow_mut() = rx.borrow_and_update().clone().map(Rc::new);
            // Keyed by routes of the old table.
            self.counters.borrow_mut().clear();
        }
        self.routes.borrow().clone()
    }

    fn take_buf(&self) -> Buf {
        let data = self.buffers.borrow_mut().pop().unwrap_or_else(|| vec![0; BUF_SIZE]);
        Buf { data, start: 0, end: 0 }
    }

    fn give_buf(&self, buf: Buf) {
        let mut data = buf.data;
        if data.len() != BUF_SIZE {
            // Grown for a large head: back to the usual size.
            data.truncate(BUF_SIZE);
            data.shrink_to_fit();
        }
        let mut pool = self.buffers.borrow_mut();
        if pool.len() < POOLED_BUFFERS {
            pool.push(data);
        }
    }

    /// An empty pipe, or `None` if none can be made (out of file descriptors: bodies are then
    /// copied).
    fn take_pipe(&self) -> Option<Pipe> {
        let pooled = self.pipes.borrow_mut().pop();
        pooled.or_else(|| Pipe::new().ok())
    }

    /// Only an empty pipe may be given back.
    fn give_pipe(&self, p: Pipe) {
        let mut pool = self.pipes.borrow_mut();
        if pool.len() < POOLED_PIPES {
            pool.push(p);
        }
    }

    /// A scratch vector for writing heads.
    fn take_head(&self) -> Vec<u8> {
        self.heads
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(2048))
    }

    fn give_head(&self, mut v: Vec<u8>) {
        if v.capacity() <= 64 * 1024 {
            v.clear();
            let mut pool = self.heads.borrow_mut();
            if pool.len() < POOLED_BUFFERS {
                pool.push(v);
            }
        }
    }
}

/// The client side of a connection, plain or TLS.
pub enum ClientIo {
    /// Accepted (non-blocking) and not registered with the runtime's poller yet. Most new
    /// connections' requests are already there when they are accepted, and a small answer fits
    /// the socket's send buffer: such a connection is read, answered and closed with plain
    /// system calls, without the `epoll_ctl` that adds it, the one that removes it, and the
    /// runtime's state for it. It is registered (becomes `Plain`) the first time a read or a
    /// write would wait. `None` once registering failed, or once closed by `write_last`.
    Fresh(Option<std::net::TcpStream>),
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// A system call on a [`ClientIo::Fresh`] socket: its result, or `None` if it would wait
/// (then the socket is registered and the call retried through the runtime).
fn unless_waiting<T>(r: std::io::Result<T>) -> Option<std::io::Result<T>> {
    match r {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) =>
        {
            None
        }
        r => Some(r),
    }
}

impl ClientIo {
    /// The socket, registered with the runtime (a fresh one is registered now): for waiting on it.
    fn registered(&mut self) -> std::io::Result<&TcpStream> {
        if let ClientIo::Fresh(s) = self {
            let s = s.take().ok_or(std::io::ErrorKind::NotConnected)?;
            *self = ClientIo::Plain(TcpStream::from_std(s)?);
        }
        match self {
            ClientIo::Plain(s) => Ok(s),
            ClientIo::Tls(s) => Ok(s.get_ref().0),
            ClientIo::Fresh(_) => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    /// Writes `a` then `b` as the connection's last bytes and closes it, so that the FIN leaves
    /// in the same segment as the answer: the bytes go out with `MSG_MORE`, which holds them in
    /// the socket until the close adds the FIN and sends both. The client's kernel then takes
    /// one segment instead of two (and acknowledges both at once). For a connection whose
    /// client asked to close and sent nothing more (a close with unread bytes resets the
    /// connection, and held bytes would be lost with it). A TLS connection, or a socket that
    /// does not take all at once, gets ordinary writes and closes later.
    async fn write_last(&mut self, a: &[u8], b: &[u8]) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let send = |fd: std::os::fd::RawFd| {
            let flags = nix::sys::socket::MsgFlags::from_bits_retain(nix::libc::MSG_MORE | nix::libc::MSG_NOSIGNAL);
            nix::sys::socket::sendmsg::<()>(fd, &[IoSlice::new(a), IoSlice::new(b)], &[], flags, None)
                .map_err(std::io::Error::from)
        };
        let sent = match self {
            ClientIo::Fresh(Some(s)) => send(s.as_raw_fd()),
            ClientIo::Plain(s) => s.try_io(tokio::io::Interest::WRITABLE, || send(s.as_raw_fd())),
            _ => Err(std::io::ErrorKind::WouldBlock.into()),
        };
        match sent {
            Ok(n) if n == a.len() + b.len() => {
                // The close: FIN and the held bytes leave together.
                *self = ClientIo::Fresh(None);
                Ok(())
            }
            Ok(n) => {
                let from_a = n.min(a.len());
                write_two(self, &a[from_a..], &b[n - from_a..]).await
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {
                write_two(self, a, b).await
            }
            Err(e) => Err(e),
        }
    }

    /// The plain TCP socket, registered, for splicing into it; `None` for TLS.
    fn plain_tcp(&mut self) -> Option<&TcpStream> {
        if let ClientIo::Tls(_) = self {
            return None;
        }
        self.registered().ok()
    }

    /// Whether bytes may be ready without waiting for the socket (decrypted TLS data not read yet).
    fn has_pending(&mut self) -> bool {
        match self {
            ClientIo::Fresh(_) | ClientIo::Plain(_) => false,
            ClientIo::Tls(s) => s.get_mut().1.process_new_packets().map_or(true, |state| {
                state.plaintext_bytes_to_read() > 0 || state.peer_has_closed()
            }),
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let ClientIo::Fresh(Some(s)) = this {
            if let Some(r) = unless_waiting(std::io::Read::read(&mut &*s, buf.initialize_unfilled())) {
                return Poll::Ready(r.map(|n| buf.advance(n)));
            }
        }
        if let Err(e) = this.registered() {
            return Poll::Ready(Err(e));
        }
        match this {
            ClientIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            ClientIo::Fresh(_) => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let ClientIo::Fresh(Some(s)) = this {
            if let Some(r) = unless_waiting(std::io::Write::write(&mut &*s, buf)) {
                return Poll::Ready(r);
            }
        }
        if let Err(e) = this.registered() {
            return Poll::Ready(Err(e));
        }
        match this {
            ClientIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            ClientIo::Fresh(_) => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let ClientIo::Fresh(Some(s)) = this {
            if let Some(r) = unless_waiting(std::io::Write::write_vectored(&mut &*s, bufs)) {
                return Poll::Ready(r);
            }
        }
        if let Err(e) = this.registered() {
            return Poll::Ready(Err(e));
        }
        match this {
            ClientIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            ClientIo::Fresh(_) => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            ClientIo::Fresh(_) => true,
            ClientIo::Plain(s) => s.is_write_vectored(),
            ClientIo::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientIo::Fresh(_) => Poll::Ready(Ok(())),
            ClientIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientIo::Fresh(Some(s)) => Poll::Ready(s.shutdown(std::net::Shutdown::Write)),
            ClientIo::Fresh(None) => Poll::Ready(Ok(())),
            ClientIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// `tokio::time::timeout`, with the timer made only if `f` has to wait. Most reads and writes
/// here complete at once, and making a timer reads the clock and clones the runtime's handle.
/// The limit then runs from the first wait, microseconds later than from the call.
async fn within<F: Future>(limit: Duration, f: F) -> Result<F::Output, tokio::time::error::Elapsed> {
    within_deadline(&mut None, limit, f).await
}

/// [`within`] for a series of waits under one deadline: `deadline` is set `limit` after the
/// first of them that has to wait, and every later one ends at it.
async fn within_deadline<F: Future>(
    deadline: &mut Option<Instant>,
    limit: Duration,
    f: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut f = std::pin::pin!(f);
    let d = match *deadline {
        Some(d) => d,
        None => {
            if let Poll::Ready(v) = std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await {
                return Ok(v);
            }
            *deadline.insert(Instant::now() + limit)
        }
    };
    tokio::time::timeout_at(d, f).await
}

/// A connection's timer for one kind of wait (for its next request; for a backend's answer),
/// moved on for each wait rather than made anew. Moving a registered timer's deadline later is
/// one atomic exchange; a timer per wait took the runtime's timer lock twice (into the wheel,
/// and out of it when the wait ended first), and read the clock and cloned the runtime's
/// handle to be made.
type Timer<'a> = Pin<&'a mut tokio::time::Sleep>;

/// Writes `a` then `b` with as few `writev`s as the socket takes.
async fn write_two<W: AsyncWrite + Unpin>(io: &mut W, mut a: &[u8], mut b: &[u8]) -> std::io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = if a.is_empty() {
            io.write(b).await?
        } else if b.is_empty() {
            io.write(a).await?
        } else {
            io.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

/// The HTTP/2 connection preface: a plain connection starting with it is handed to hyper.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection does after a request.
enum Next {
    /// Read the next request (bytes already read for it, if pipelined).
    KeepAlive(Option<Buf>),
    Close,
    /// The client speaks HTTP/2 with prior knowledge: these bytes were read already.
    H2(Buf),
}

/// How the connection's first bytes are to be served.
pub enum Served {
    Done,
    /// Hand to HTTP/2 with the bytes read so far.
    H2(ClientIo, Vec<u8>),
}

/// Serves HTTP/1 requests on one client connection until it closes, times out, or the worker
/// drains. Between requests it holds no buffer.
pub async fn serve(w: Rc<Worker>, mut io: ClientIo, conn: Conn) -> Served {
    let mut carry: Option<Buf> = None;
    let mut first = true;
    // When this connection's last request ended (the clock read for its metrics), for the
    // idle wait after it: one clock read per request fewer.
    let mut ended: Option<Instant> = None;
    // One wait for the drain for the connection's whole life, on the worker's own Notify:
    // registering on the shutdown channel on every idle wait cost a lock shared by all workers.
    let draining_began = w.drain.notified();
    tokio::pin!(draining_began);
    draining_began.as_mut().enable();
    let mut draining = w.draining();
    // Not registered with the runtime until first armed (see `Timer`).
    let idle_timer = tokio::time::sleep(KEEPALIVE_TIMEOUT);
    tokio::pin!(idle_timer);
    let upstream_timer = tokio::time::sleep(KEEPALIVE_TIMEOUT);
    tokio::pin!(upstream_timer);
    if let ClientIo::Fresh(Some(s)) = &io {
        // A new connection's request is usually there by the time its task runs: read it
        // now, without a round through the runtime's readiness events and a timer first
        // (and without registering the socket with the runtime; see `ClientIo::Fresh`).
        let mut buf = w.take_buf();
        match buf.try_read_from(s, BUF_SIZE) {
            Ok(n) if n > 0 => carry = Some(buf),
            Ok(_) => {
                w.give_buf(buf);
                return Served::Done;
            }
            Err(_) => w.give_buf(buf),
        }
    }
    loop {
        if carry.is_none() && !io.has_pending() {
            let idle = match (first, draining) {
                (_, true) => DRAIN_IDLE_GRACE,
                (true, false) => HEADER_READ_TIMEOUT,
                (false, false) => KEEPALIVE_TIMEOUT,
            };
            let Ok(socket) = io.registered() else { break };
            let from = ended.take().unwrap_or_else(Instant::now);
            idle_timer.as_mut().reset(from + idle);
            // Biased: in the order written (the socket first), without the random start
            // `select!` otherwise draws on every poll.
            let ready = tokio::select! {
                biased;
                r = socket.readable() => r.is_ok(),
                _ = idle_timer.as_mut() => false,
                _ = &mut draining_began, if !draining => {
                    // Draining began: give the idle connection its last-call grace.
                    draining = true;
                    continue;
                }
            };
            if !ready {
                break;
            }
        }
        let buf = carry.take().unwrap_or_else(|| w.take_buf());
        // Not boxed: a box per request (2.2 KiB) was a malloc and a free on every request, and
        // with mimalloc's purge delay 0 (src/main.rs) the pages those boxes emptied went back
        // to the kernel and faulted in again: 0.43 page faults per keep-alive request (nginx
        // 0.004; BENCHMARKS.md). Inline, the request's state is part of the connection's own
        // allocation, which an idle connection keeps (about 2 KiB more each).
        let (next, end) = request(&w, &mut io, conn, buf, first, upstream_timer.as_mut()).await;
        ended = end;
        first = false;
        match next {
            Next::KeepAlive(c) => carry = c,
            Next::Close => break,
            Next::H2(buf) => {
                let bytes = buf.filled().to_vec();
                w.give_buf(buf);
                return Served::H2(io, bytes);
            }
        }
    }
    if let Some(buf) = carry {
        w.give_buf(buf);
    }
    // TLS says goodbye with close_notify; plain TCP's FIN is sent by the close itself.
    if let ClientIo::Tls(_) = io {
        let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
    }
    Served::Done
}

/// How reading a request head ended, when no head came of it.
enum NoHead {
    /// The client closed, went quiet, or the connection failed: close without an answer.
    Gone,
    /// Answer this and close.
    Refused(HeadError),
    H2,
}

/// Reads until `buf` starts with a complete request head.
async fn read_head(io: &mut ClientIo, buf: &mut Buf, first: bool) -> Result<RequestHead, NoHead> {
    // From the first read that has to wait: the head is usually read whole, at once.
    let mut deadline = None;
    loop {
        if !buf.is_empty() {
            if first && H2_PREFACE.starts_with(&buf.filled()[..buf.filled().len().min(H2_PREFACE.len())]) {
                if buf.filled().len() >= H2_PREFACE.len() {
                    return Err(NoHead::H2);
                }
            } else {
                match framing::parse_request(buf.filled()) {
                    Ok(head) => return Ok(head),
                    Err(HeadError::Partial) => {}
                    Err(e) => return Err(NoHead::Refused(e)),
                }
            }
        }
        let read = within_deadline(
            &mut deadline,
            HEADER_READ_TIMEOUT,
            buf.read_from(io, framing::MAX_HEAD + 1),
        )
        .await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Err(NoHead::Gone),
            Ok(Ok(_)) => {}
        }
    }
}

/// The request target, split: the host of an absolute-form target, the path and query.
struct Target<'b> {
    authority: Option<&'b str>,
    path: &'b str,
    query: Option<&'b str>,
}

fn split_target(target: &str) -> Option<Target<'_>> {
    let (authority, rest) = if target.starts_with('/') {
        (None, target)
    } else {
        let scheme = target.find("://").filter(|&i| {
            let s = &target[..i];
            s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https")
        })?;
        let after = &target[scheme + 3..];
        let end = after.find(['/', '?']).unwrap_or(after.len());
        let rest = &after[end..];
        (Some(&after[..end]), rest)
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let path = if path.is_empty() { "/" } else { path };
    Some(Target { authority, path, query })
}

/// Headers of a parsed request head, for routing decisions.
struct HeadView<'b> {
    buf: &'b [u8],
    len: usize,
}

impl RequestView for HeadView<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        framing::headers(self.buf, self.len)
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
    fn cookie(&self, name: &str) -> Option<&str> {
        framing::headers(self.buf, self.len)
            .filter(|(n, _)| n.eq_ignore_ascii_case(b"cookie"))
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
    fn joined(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        join_values(
            framing::headers(self.buf, self.len)
                .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                .filter_map(|(_, v)| std::str::from_utf8(v).ok()),
        )
    }
}

/// The request's end-to-end headers as a map, for Gateway API filters that edit or copy them
/// (only then: plain requests are written from the head where it lies).
fn forwarded_headers(buf: &[u8], head: &RequestHead) -> HeaderMap {
    let (named, n) = if head.connection_names {
        connection_names(buf, head.len)
    } else {
        ([&[][..]; 8], 0)
    };
    let named = &named[..n];
    let mut map = HeaderMap::new();
    for (name, value) in framing::headers(buf, head.len) {
        if skip_request_header(name) || named.iter().any(|c| c.eq_ignore_ascii_case(name)) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            map.append(n, v);
        }
    }
    map
}

/// What the metrics and the access log record about a request.
struct Record<'t> {
    started: Instant,
    /// When the answer was relayed, if the clock was read then (a backend connection put back).
    ended: Option<Instant>,
    route: Option<&'t Route>,
    upstream: Option<Dest>,
    code: u16,
    /// Method, target and version, kept only when the access log is on.
    line: Option<(String, String, &'static str)>,
}

/// Counts the request; returns when it ended.
#[allow(clippy::redundant_allocation)]
fn record(w: &Worker, table: Option<&Rc<Arc<RouteTable>>>, conn: Conn, r: &Record<'_>) -> Instant {
    let m = metrics();
    let ended = r.ended.unwrap_or_else(Instant::now);
    let took = ended.saturating_duration_since(r.started);
    let labels = || {
        (
            r.route.map_or("", |route| route.ingress.as_str()),
            r.route
                .map(|route| route.backend.service.to_string())
                .unwrap_or_default(),
        )
    };
    // The worker keeps each series' counter while the route table that keys it is current.
    let current = match (table, w.routes.borrow().as_ref()) {
        (Some(t), Some(c)) => Rc::ptr_eq(t, c),
        (None, None) => true,
        _ => false,
    };
    if current {
        let key = (r.route.map_or(0, |route| route as *const Route as usize), r.code);
        let mut counters = w.counters.borrow_mut();
        let counter = counters.entry(key).or_insert_with(|| {
            let (ingress, service) = labels();
            w.metrics.request_counter(ingress, &service, r.code)
        });
        counter.inc();
    } else {
        let (ingress, service) = labels();
        m.inc_ingress_request(ingress, &service, r.code);
    }
    w.metrics.observe_duration(took);
    if let Some((method, uri, version)) = &r.line {
        let service = r.route.map(|route| route.backend.service.to_string());
        tracing::info!(
            target: "kproxy::access",
            client = %conn.peer.ip(),
            method = %method,
            uri = %uri,
            version,
            status = r.code,
            ingress = r.route.map_or("", |route| route.ingress.as_str()),
            service = service.as_deref().unwrap_or(""),
            upstream = %r.upstream.as_ref().map_or_else(|| "-".to_string(), Dest::to_string),
            duration_ms = took.as_secs_f64() * 1000.0,
            "request"
        );
    }
    ended
}

/// One request on a client connection, from its head to the end of its answer.
async fn request(
    w: &Worker,
    io: &mut ClientIo,
    conn: Conn,
    mut buf: Buf,
    first: bool,
    upstream_timer: Timer<'_>,
) -> (Next, Option<Instant>) {
    let head = match read_head(io, &mut buf, first).await {
        Ok(h) => h,
        Err(NoHead::H2) => return (Next::H2(buf), None),
        Err(NoHead::Gone) => {
            w.give_buf(buf);
            return (Next::Close, None);
        }
        Err(NoHead::Refused(e)) => {
            let (code, text) = e.answer();
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
            let _ = answer(w, io, &Answer::text(status, text), true, false).await;
            metrics().inc_ingress_request("", "", code);
            w.give_buf(buf);
            return (Next::Close, None);
        }
    };
    let table = w.table();
    let mut rec = Record {
        // The request's one clock read before its answer: the backend's read timeout and the
        // pool's idle check start from it too.
        started: Instant::now(),
        ended: None,
        route: None,
        upstream: None,
        code: 0,
        line: w.proxy.access_log().then(|| {
            let b = buf.filled();
            let version = if head.minor == 0 { "HTTP/1.0" } else { "HTTP/1.1" };
            (head.method(b).to_string(), head.target(b).to_string(), version)
        }),
    };
    let outcome = match &table {
        Some(table) => route_and_forward(w, io, conn, &mut buf, &head, table, &mut rec, upstream_timer).await,
        None => {
            local(
                w,
                io,
                &mut buf,
                &head,
                &Answer::status(StatusCode::SERVICE_UNAVAILABLE),
                &mut rec,
            )
            .await
        }
    };
    let ended = record(w, table.as_ref(), conn, &rec);
    let next = match outcome {
        Outcome::KeepAlive if buf.is_empty() => {
            w.give_buf(buf);
            Next::KeepAlive(None)
        }
        Outcome::KeepAlive => Next::KeepAlive(Some(buf)),
        Outcome::Close => {
            w.give_buf(buf);
            Next::Close
        }
    };
    (next, Some(ended))
}

/// How a request ended for its connection. On `KeepAlive`, the request (head and body) has
/// been consumed from the buffer: what remains is the next request.
enum Outcome {
    KeepAlive,
    Close,
}

/// Answers locally (404, redirects, 503...). A request with a body the answer does not read
/// closes the connection, so the body is never taken for the next request.
async fn local(
    w: &Worker,
    io: &mut ClientIo,
    buf: &mut Buf,
    head: &RequestHead,
    a: &Answer,
    rec: &mut Record<'_>,
) -> Outcome {
    let close = head.close || head.body != Body::None || w.draining() || a.close;
    rec.code = a.status.as_u16();
    let head_only = head.is_head(buf.filled());
    match answer(w, io, a, close, head_only).await {
        Ok(()) if !close => {
            buf.consume(head.len);
            Outcome::KeepAlive
        }
        _ => Outcome::Close,
    }
}

/// Writes a locally generated answer.
async fn answer(w: &Worker, io: &mut ClientIo, a: &Answer, close: bool, head_only: bool) -> std::io::Result<()> {
    let mut out = w.take_head();
    let code = a.status.as_u16();
    let reason = a.status.canonical_reason().unwrap_or("");
    let _ = write!(out, "HTTP/1.1 {code} {reason}\r\ndate: ");
    out.extend_from_slice(&http_date());
    out.extend_from_slice(b"\r\n");
    match &a.headers {
        Some(headers) => {
            for (name, value) in headers.iter() {
                // The framing is this answer's own.
                if matches!(
                    name.as_str(),
                    "content-length" | "transfer-encoding" | "connection" | "date"
                ) {
                    continue;
                }
                out.extend_from_slice(name.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        None => {
            out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\n");
            if let Some(location) = &a.location {
                let _ = write!(out, "location: {location}\r\n");
            }
        }
    }
    let _ = write!(out, "content-length: {}\r\n", a.text.len() + 1);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(a.text.as_bytes());
        out.push(b'\n');
    }
    // TLS keeps what the socket did not take yet: flush, or the answer's end may wait there.
    let r = match io.write_all(&out).await {
        Ok(()) => io.flush().await,
        Err(e) => Err(e),
    };
    w.give_head(out);
    r
}

/// The `Date` header's value, formatted once per second per thread.
fn http_date() -> [u8; 29] {
    thread_local! {
        static CACHE: Cell<(u64, [u8; 29])> = const { Cell::new((0, [b' '; 29])) };
    }
    let now = std::time::SystemTime::now();
    let secs = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let (at, text) = c.get();
        if at == secs {
            return text;
        }
        let mut out = [b' '; 29];
        let s = httpdate::fmt_http_date(now);
        let n = s.len().min(29);
        out[..n].copy_from_slice(&s.as_bytes()[..n]);
        c.set((secs, out));
        out
    })
}

/// A routed request, once its head has been written for the backend: what the rest of the
/// exchange needs, owning nothing of the client's buffer.
struct Plan<'t> {
    route: &'t Route,
    endpoint: Option<SocketAddr>,
    affinity_in: Option<String>,
    head_len: usize,
    body: Body,
    upgrade: bool,
    is_head: bool,
    idempotent: bool,
    /// The client asked to close, or speaks HTTP/1.0 without keep-alive.
    close: bool,
    minor: u8,
    expect_continue: bool,
    /// The Gateway API rule's filters, for a request one forwards.
    gateway: Option<gateway::Forward<'t>>,
}

#[allow(clippy::too_many_arguments)]
async fn route_and_forward<'t>(
    w: &Worker,
    io: &mut ClientIo,
    conn: Conn,
    buf: &mut Buf,
    head: &RequestHead,
    table: &'t RouteTable,
    rec: &mut Record<'t>,
    upstream_timer: Timer<'_>,
) -> Outcome {
    let mut out = w.take_head();
    let planned = plan(w, conn, buf.filled(), head, table, &mut out);
    match planned {
        Ok(p) => {
            rec.route = Some(p.route);
            forward(w, io, buf, p, out, rec, upstream_timer).await
        }
        Err((route, a)) => {
            w.give_head(out);
            rec.route = route;
            local(w, io, buf, head, &a, rec).await
        }
    }
}

/// Routes the request and writes its head for the backend into `out`; or says what to answer.
fn plan<'t>(
    w: &Worker,
    conn: Conn,
    bytes: &[u8],
    head: &RequestHead,
    table: &'t RouteTable,
    out: &mut Vec<u8>,
) -> Result<Plan<'t>, (Option<&'t Route>, Answer)> {
    let method = head.method(bytes);
    let Some(target) = split_target(head.target(bytes)) else {
        let a = if method == "CONNECT" {
            Answer::status(StatusCode::METHOD_NOT_ALLOWED).closing()
        } else {
            Answer::text(StatusCode::BAD_REQUEST, "bad request target").closing()
        };
        return Err((None, a));
    };
    let host_header = head.host.clone().and_then(|r| std::str::from_utf8(&bytes[r]).ok());
    let host = match target.authority.or(host_header) {
        Some(h) if !h.is_empty() => h,
        _ => return Err((None, Answer::text(StatusCode::BAD_REQUEST, "no Host").closing())),
    };
    let view = HeadView {
        buf: bytes,
        len: head.len,
    };
    let declared = match head.body {
        Body::Length(n) => Some(n),
        _ => None,
    };
    let line = RequestLine {
        host,
        method,
        path: target.path,
        query: target.query,
    };
    let decision: Decision<'t> = w.proxy.decide(table, &conn, line, declared, &view);
    let (route, endpoint, affinity_in) = match (decision.route, decision.action) {
        (route, Action::Answer(a)) => return Err((route, a)),
        (Some(route), Action::Forward { endpoint, affinity_in }) => (route, endpoint, affinity_in),
        (None, Action::Forward { .. }) => return Err((None, Answer::status(StatusCode::BAD_GATEWAY))),
    };
    let upgrade = head.upgrade && head.body == Body::None;
    let mut fwd = Forwarding {
        head,
        host,
        client_host: host,
        path: target.path,
        query: target.query,
        route,
        conn,
        rewritten: None,
        edited: None,
    };
    // Gateway API filters: what the backend sees. Plain requests skip all of this.
    let rewritten;
    let edited;
    if let Some(g) = &decision.gateway {
        fwd.host = g.host(host);
        rewritten = g.path(target.path);
        fwd.rewritten = rewritten.as_deref();
        if g.needs_request_headers() {
            let mut map = forwarded_headers(bytes, head);
            g.edit_request_headers(&mut map);
            let path = fwd.rewritten.unwrap_or(target.path);
            let mirrored = match target.query {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            };
            g.mirror(method, &mirrored, &map, fwd.host, w.proxy.clients());
            edited = map;
            fwd.edited = Some(&edited);
        }
    }
    write_upstream_head(out, bytes, &fwd, head.body, upgrade);
    Ok(Plan {
        route,
        endpoint,
        affinity_in,
        head_len: head.len,
        body: head.body,
        upgrade,
        is_head: method == "HEAD",
        idempotent: matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"),
        close: head.close,
        minor: head.minor,
        expect_continue: head.expect_continue,
        gateway: decision.gateway,
    })
}

/// What writing the backend's request head needs.
struct Forwarding<'a> {
    head: &'a RequestHead,
    /// The backend's `Host`.
    host: &'a str,
    /// As the client sent it (`X-Forwarded-Host`); not `host` after a Gateway API URLRewrite.
    client_host: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    route: &'a Route,
    conn: Conn,
    /// A Gateway API URLRewrite's path, instead of `path`.
    rewritten: Option<&'a str>,
    /// The end-to-end headers after Gateway API filters, instead of the head's.
    edited: Option<&'a HeaderMap>,
}

/// Request headers that are not forwarded as they came: hop-by-hop ones (RFC 9110 section
/// 7.6.1), framing (written anew), `Expect` (answered here), and the forwarding headers kproxy sets.
fn skip_request_header(name: &[u8]) -> bool {
    // Every name below is 2 to 17 bytes long, and most headers clients send are not among them.
    if !(2..=17).contains(&name.len()) {
        return false;
    }
    const SKIP: &[&[u8]] = &[
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"host",
        b"expect",
        b"x-forwarded-for",
        b"x-real-ip",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
    ];
    SKIP.iter()
        .any(|s| s.len() == name.len() && s.eq_ignore_ascii_case(name))
}

/// Response headers not forwarded as they came: hop-by-hop, and the framing kproxy writes.
fn skip_response_header(name: &[u8], own_framing: bool, upgraded: bool) -> bool {
    const HOP: &[&[u8]] = &[
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
    ];
    if HOP.iter().any(|s| s.eq_ignore_ascii_case(name)) {
        return true;
    }
    if upgraded {
        // A 101's Connection and Upgrade say what the connection becomes.
        return false;
    }
    name.eq_ignore_ascii_case(b"connection")
        || name.eq_ignore_ascii_case(b"upgrade")
        || (own_framing && name.eq_ignore_ascii_case(b"content-length"))
}

/// The tokens of every `Connection` header: the headers they name are hop-by-hop too.
fn connection_names(buf: &[u8], len: usize) -> ([&[u8]; 8], usize) {
    let mut names: [&[u8]; 8] = [&[]; 8];
    let mut n = 0;
    for (name, value) in framing::headers(buf, len) {
        if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if !token.is_empty() && n < names.len() {
                    names[n] = token;
                    n += 1;
                }
            }
        }
    }
    (names, n)
}

/// Writes the request head for the backend into `out`: origin-form target (rewritten if the
/// route says so), `Host` as the client sent it, the client's end-to-end headers, framing,
/// and the forwarding headers.
fn write_upstream_head(out: &mut Vec<u8>, buf: &[u8], req: &Forwarding<'_>, body: Body, upgrade: bool) {
    let head = req.head;
    out.extend_from_slice(head.method(buf).as_bytes());
    out.push(b' ');
    match (&req.route.rewrite, &req.route.settings.rewrite_target, req.rewritten) {
        (_, _, Some(path)) => out.extend_from_slice(path.as_bytes()),
        (Some(_), Some(_), None) => out.extend_from_slice(req.route.rewrite_path(req.path).as_bytes()),
        _ => out.extend_from_slice(req.path.as_bytes()),
    }
    if let Some(q) = req.query {
        out.push(b'?');
        out.extend_from_slice(q.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(req.host.as_bytes());
    out.extend_from_slice(b"\r\n");
    let (named, n) = if head.connection_names {
        connection_names(buf, head.len)
    } else {
        ([&[][..]; 8], 0)
    };
    let named = &named[..n];
    let mut upgrade_value: Option<&[u8]> = None;
    for (name, value) in framing::headers(buf, head.len) {
        if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade_value = Some(value);
        }
        if req.edited.is_some() || skip_request_header(name) || named.iter().any(|c| c.eq_ignore_ascii_case(name)) {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in req.edited.into_iter().flat_map(HeaderMap::iter) {
        // A filter cannot set what kproxy writes itself (framing, Host, forwarding headers).
        if skip_request_header(name.as_str().as_bytes()) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match body {
        Body::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        Body::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Body::None | Body::UntilClose => {}
    }
    if let (true, Some(u)) = (upgrade, upgrade_value) {
        out.extend_from_slice(b"connection: upgrade\r\nupgrade: ");
        out.extend_from_slice(u);
        out.extend_from_slice(b"\r\n");
    }
    // X-Forwarded-For: what the client sent (every such header, in order), then the client.
    out.extend_from_slice(b"x-forwarded-for: ");
    if head.forwarded_for {
        for (name, value) in framing::headers(buf, head.len) {
            if name.eq_ignore_ascii_case(b"x-forwarded-for") && !value.is_empty() {
                out.extend_from_slice(value);
                out.extend_from_slice(b", ");
            }
        }
    }
    let ip = req.conn.ip_text();
    out.extend_from_slice(ip);
    out.extend_from_slice(b"\r\nx-real-ip: ");
    out.extend_from_slice(ip);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(if req.conn.https {
        b"x-forwarded-proto: https\r\n"
    } else {
        b"x-forwarded-proto: http\r\n"
    });
    out.extend_from_slice(b"x-forwarded-host: ");
    out.extend_from_slice(req.client_host.as_bytes());
    out.extend_from_slice(b"\r\nx-forwarded-port: ");
    push_decimal(out, u64::from(req.conn.port));
    out.extend_from_slice(b"\r\n\r\n");
}

/// Appends `n` in decimal (what `write!` does, without the formatting machinery).
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Why forwarding a request body stopped early.
#[derive(Debug)]
enum BodyError {
    /// The client's body is malformed (or a chunk extension too long): 400.
    Bad(ChunkError),
    /// Larger than `proxy-body-size`: 413.
    TooLarge,
    /// The client went quiet for longer than the send timeout: 408.
    ClientTimeout,
    /// The client closed or failed mid-body.
    ClientGone,
    /// Writing to the backend failed or timed out.
    Upstream,
    /// The backend answered (or closed) before taking the whole body.
    EarlyAnswer,
}

/// Follows a request body: what remains of it, and how much was forwarded.
struct RequestBody {
    body: Body,
    left: u64,
    chunks: ChunkedDecoder,
    sent: u64,
    limit: Option<u64>,
}

impl RequestBody {
    fn new(body: Body, limit: Option<u64>) -> Self {
        RequestBody {
            body,
            left: match body {
                Body::Length(n) => n,
                _ => 0,
            },
            chunks: ChunkedDecoder::default(),
            sent: 0,
            limit,
        }
    }

    fn done(&self) -> bool {
        match self.body {
            Body::None | Body::UntilClose => true,
            Body::Length(_) => self.left == 0,
            Body::Chunked => self.chunks.done(),
        }
    }

    /// Moves body bytes from the start of `input` into `out`, framed for the backend;
    /// returns how many input bytes were used.
    fn encode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, BodyError> {
        match self.body {
            Body::None | Body::UntilClose => Ok(0),
            Body::Length(_) => {
                let n = self.left.min(input.len() as u64) as usize;
                out.extend_from_slice(&input[..n]);
                self.left -= n as u64;
                self.sent += n as u64;
                self.check_limit()?;
                Ok(n)
            }
            Body::Chunked => {
                let mut at = 0;
                while at < input.len() && !self.chunks.done() {
                    let step = self.chunks.step(&input[at..]).map_err(BodyError::Bad)?;
                    if let Some(r) = step.data {
                        let data = &input[at + r.start..at + r.end];
                        let _ = write!(out, "{:x}\r\n", data.len());
                        out.extend_from_slice(data);
                        out.extend_from_slice(b"\r\n");
                        self.sent += data.len() as u64;
                        self.check_limit()?;
                    }
                    at += step.consumed;
                }
                if self.chunks.done() {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                Ok(at)
            }
        }
    }

    fn check_limit(&self) -> Result<(), BodyError> {
        match self.limit {
            Some(limit) if self.sent > limit => Err(BodyError::TooLarge),
            _ => Ok(()),
        }
    }
}

/// Timeouts of a route.
struct Limits {
    connect: Duration,
    read: Duration,
    send: Duration,
}

fn limits(route: &Route) -> Limits {
    let s = &route.settings;
    Limits {
        connect: s.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        read: s.read_timeout.unwrap_or(DEFAULT_READ_TIMEOUT),
        send: s.send_timeout.unwrap_or(DEFAULT_SEND_TIMEOUT),
    }
}

fn dest_of(route: &Route, endpoint: Option<SocketAddr>) -> Option<Dest> {
    let https = route.settings.backend_https;
    match (&route.backend.upstream, endpoint) {
        (Upstream::ExternalName { host, port }, _) => Some(Dest::Name(host.clone(), *port, https)),
        (_, Some(ep)) => Some(Dest::Addr(ep, https)),
        (_, None) => None,
    }
}

/// Answers a request whose forwarding failed before any of the backend's answer was sent.
async fn fail(w: &Worker, io: &mut ClientIo, plan: &Plan<'_>, code: StatusCode, rec: &mut Record<'_>) -> Outcome {
    rec.code = code.as_u16();
    // Part of the body may be unread: the connection cannot carry another request.
    let close = plan.close || plan.body != Body::None || w.draining();
    match answer(w, io, &Answer::status(code), close, plan.is_head).await {
        Ok(()) if !close => Outcome::KeepAlive,
        _ => Outcome::Close,
    }
}

async fn body_failed(w: &Worker, io: &mut ClientIo, plan: &Plan<'_>, e: BodyError, rec: &mut Record<'_>) -> Outcome {
    let a = match e {
        BodyError::Bad(c) => Answer::text(StatusCode::BAD_REQUEST, c.text()),
        BodyError::TooLarge => Answer::status(StatusCode::PAYLOAD_TOO_LARGE),
        BodyError::ClientTimeout => Answer::status(StatusCode::REQUEST_TIMEOUT),
        BodyError::Upstream | BodyError::EarlyAnswer => Answer::status(StatusCode::BAD_GATEWAY),
        BodyError::ClientGone => {
            rec.code = 499;
            return Outcome::Close;
        }
    };
    rec.code = a.status.as_u16();
    let _ = answer(w, io, &a, true, plan.is_head).await;
    Outcome::Close
}

/// Reads the rest of a request body from the client and forwards it. A plain backend that
/// answers (or closes) meanwhile ends it with [`BodyError::EarlyAnswer`].
async fn stream_body(
    io: &mut ClientIo,
    up: &mut UpstreamIo,
    buf: &mut Buf,
    body: &mut RequestBody,
    out: &mut Vec<u8>,
    send_timeout: Duration,
) -> Result<(), BodyError> {
    let watch_upstream = matches!(up, UpstreamIo::Plain(_));
    while !body.done() {
        if buf.is_empty() {
            let read = tokio::select! {
                biased;
                _ = up.readable(), if watch_upstream => return Err(BodyError::EarlyAnswer),
                r = tokio::time::timeout(send_timeout, buf.read_from(io, BUF_SIZE)) => r,
            };
            match read {
                Err(_) => return Err(BodyError::ClientTimeout),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(BodyError::ClientGone),
                Ok(Ok(_)) => {}
            }
        }
        out.clear();
        let used = body.encode(buf.filled(), out)?;
        buf.consume(used);
        let sent = async {
            up.write_all(out).await?;
            up.flush().await
        };
        match within(send_timeout, sent).await {
            Ok(Ok(())) => {}
            _ => return Err(BodyError::Upstream),
        }
    }
    Ok(())
}

/// Why no usable response head came from the backend.
enum NoResponse {
    /// Closed (or reset) before sending anything.
    Closed,
    Bad,
    Timeout,
}

/// Reads the backend's response head, skipping interim (1xx) answers other than 101.
async fn read_response_head(
    up: &mut UpstreamIo,
    ub: &mut Buf,
    head_request: bool,
    (from, timeout): (Instant, Duration),
    mut timer: Timer<'_>,
) -> Result<ResponseHead, NoResponse> {
    timer.as_mut().reset(from + timeout);
    let mut got_any = false;
    loop {
        if !ub.is_empty() {
            match framing::parse_response(ub.filled(), head_request) {
                Ok(r) if (100..200).contains(&r.code) && r.code != 101 => {
                    // 100 and 103 are not passed on: kproxy answered Expect itself.
                    ub.consume(r.len);
                    continue;
                }
                Ok(r) => return Ok(r),
                Err(framing::ResponseError::Partial) => {}
                Err(framing::ResponseError::Malformed) => return Err(NoResponse::Bad),
            }
        }
        let read = tokio::select! {
            biased;
            r = ub.read_from(up, framing::MAX_HEAD + 1) => Ok(r),
            _ = timer.as_mut() => Err(()),
        };
        match read {
            Err(()) => return Err(NoResponse::Timeout),
            Ok(Ok(0)) | Ok(Err(_)) if !got_any => return Err(NoResponse::Closed),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(NoResponse::Bad),
            Ok(Ok(_)) => got_any = true,
        }
    }
}

/// Why a request got no response head from the backend.
enum Failed {
    /// Answer this.
    Status(StatusCode),
    /// The request body could not be forwarded.
    Body(BodyError),
}

/// Forwards a routed request and its body, then relays the answer.
async fn forward<'t>(
    w: &Worker,
    io: &mut ClientIo,
    buf: &mut Buf,
    plan: Plan<'t>,
    mut out: Vec<u8>,
    rec: &mut Record<'t>,
    mut upstream_timer: Timer<'_>,
) -> Outcome {
    let route = plan.route;
    let lim = limits(route);
    buf.consume(plan.head_len);
    // Body bytes that came with the head go out with it.
    let mut body = RequestBody::new(plan.body, route.settings.body_limit);
    match body.encode(buf.filled(), &mut out) {
        Ok(n) => buf.consume(n),
        Err(e) => {
            w.give_head(out);
            return body_failed(w, io, &plan, e, rec).await;
        }
    }
    let Some(mut dest) = dest_of(route, plan.endpoint) else {
        w.give_head(out);
        return fail(w, io, &plan, StatusCode::SERVICE_UNAVAILABLE, rec).await;
    };
    let mut endpoint = plan.endpoint;
    let mut fresh = plan.upgrade;
    let mut connect_retried = false;
    let mut stale_retried = false;
    let started = rec.started;
    // Up to the backend's response head: connect (one retry elsewhere), send, stream the body.
    let exchange = async {
        loop {
            rec.upstream = Some(dest.clone());
            let got = match (fresh, w.pool.checkout(&dest, started.into_std())) {
                (false, Some(u)) => Ok(u),
                // Boxed: the connect (and TLS handshake) state is large and needed only now.
                _ => Box::pin(w.pool.connect(&dest, lim.connect)).await,
            };
            let mut up = match got {
                Ok(u) => u,
                Err(e) => {
                    metrics().inc_ingress_connect_error(&route.backend.service.to_string());
                    tracing::debug!(service = %route.backend.service, upstream = %dest, error = %e, "connect failed");
                    // One retry on another endpoint: nothing was sent yet.
                    let next = match (&route.backend.upstream, endpoint, connect_retried) {
                        (Upstream::Endpoints(eps), Some(ep), false) => {
                            w.proxy.balancer().pick(&route.backend, eps, None, Some(ep))
                        }
                        _ => None,
                    };
                    match next.and_then(|n| dest_of(route, Some(n)).map(|d| (n, d))) {
                        Some((n, d)) => {
                            endpoint = Some(n);
                            dest = d;
                            connect_retried = true;
                            continue;
                        }
                        None => return Err(Failed::Status(StatusCode::BAD_GATEWAY)),
                    }
                }
            };
            w.pool.requests.set(w.pool.requests.get() + 1);
            let sent = async {
                up.io.write_all(&out).await?;
                up.io.flush().await
            };
            match within(lim.send, sent).await {
                Ok(Ok(())) => {}
                // A pooled connection the backend closed meanwhile: the same request on a new one.
                Ok(Err(_)) if up.reused => {
                    fresh = true;
                    continue;
                }
                _ => return Err(Failed::Status(StatusCode::BAD_GATEWAY)),
            }
            let streamed = !body.done();
            let mut early = false;
            if streamed {
                if plan.expect_continue
                    && body.sent == 0
                    && io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_ok()
                {
                    let _ = io.flush().await;
                }
                match Box::pin(stream_body(io, &mut up.io, buf, &mut body, &mut out, lim.send)).await {
                    Ok(()) => {}
                    Err(BodyError::EarlyAnswer) => early = true,
                    Err(e) => return Err(Failed::Body(e)),
                }
            }
            // The read timeout runs from the request's start when it went out at once (a pooled
            // connection, no body to stream): microseconds earlier, and no clock read.
            let sent_at = if up.reused && !streamed {
                started
            } else {
                Instant::now()
            };
            let mut ubuf = w.take_buf();
            let timeout = (sent_at, lim.read);
            match read_response_head(&mut up.io, &mut ubuf, plan.is_head, timeout, upstream_timer.as_mut()).await {
                Ok(resp) => return Ok((up, ubuf, resp, early)),
                Err(NoResponse::Closed)
                    if up.reused && !streamed && !stale_retried && (plan.body == Body::None || plan.idempotent) =>
                {
                    // The backend closed an idle connection as the request went out: it never saw it.
                    w.give_buf(ubuf);
                    stale_retried = true;
                    fresh = true;
                    continue;
                }
                Err(e) => {
                    w.give_buf(ubuf);
                    return Err(Failed::Status(match e {
                        NoResponse::Timeout => StatusCode::GATEWAY_TIMEOUT,
                        NoResponse::Closed | NoResponse::Bad => StatusCode::BAD_GATEWAY,
                    }));
                }
            }
        }
    };
    // A Gateway API rule's `timeouts.request` bounds all of it.
    let exchanged = match plan.gateway.and_then(|g| g.request_timeout()) {
        Some(limit) => tokio::time::timeout(limit, exchange)
            .await
            .unwrap_or(Err(Failed::Status(StatusCode::GATEWAY_TIMEOUT))),
        None => exchange.await,
    };
    let (mut up, mut ubuf, resp, early) = match exchanged {
        Ok(x) => x,
        Err(f) => {
            w.give_head(out);
            return match f {
                Failed::Status(code) => fail(w, io, &plan, code, rec).await,
                Failed::Body(e) => body_failed(w, io, &plan, e, rec).await,
            };
        }
    };
    rec.code = resp.code;
    let body_done = body.done();
    if plan.upgrade && resp.code == 101 {
        w.give_head(out);
        return Box::pin(splice(io, buf, up.io, ubuf, &resp)).await;
    }
    if resp.code == 101 {
        // Not asked for: nothing sensible can follow.
        w.give_buf(ubuf);
        w.give_head(out);
        return fail(w, io, &plan, StatusCode::BAD_GATEWAY, rec).await;
    }
    out.clear();
    let set_cookie = match (&route.settings.affinity_cookie, endpoint) {
        (Some(name), Some(ep)) => {
            let value = affinity_value(&ep);
            (plan.affinity_in.as_deref() != Some(value.as_str())).then(|| format!("{name}={value}; Path=/; HttpOnly"))
        }
        _ => None,
    };
    // A declined Upgrade leaves an HTTP/1 connection: the next request is parsed as any other.
    let client_close = plan.close || w.draining() || early || !body_done;
    // The client asked to close and sent nothing after this request: the answer may carry
    // the FIN (see `ClientIo::write_last`).
    let fin_with_answer = plan.close && body_done && !early && buf.is_empty();
    let relayed = relay_response(
        w,
        io,
        &mut up.io,
        &mut ubuf,
        &mut out,
        &plan,
        &resp,
        (client_close, fin_with_answer),
        set_cookie,
        lim.read,
    )
    .await;
    w.give_buf(ubuf);
    w.give_head(out);
    match relayed {
        Ok(close) => {
            if !resp.close && !early && body_done && !plan.upgrade {
                let now = Instant::now();
                w.pool.checkin(&dest, up.io, now.into_std());
                rec.ended = Some(now);
            }
            if close {
                Outcome::Close
            } else {
                Outcome::KeepAlive
            }
        }
        Err(()) => Outcome::Close,
    }
}

/// Writes the backend's answer to the client: head (hop-by-hop headers removed, framing
/// rewritten for this client) and body. Returns whether the client connection closes after.
/// `Err` when either side failed mid-answer: the client connection must close.
#[allow(clippy::too_many_arguments)]
async fn relay_response(
    w: &Worker,
    io: &mut ClientIo,
    up: &mut UpstreamIo,
    ub: &mut Buf,
    out: &mut Vec<u8>,
    plan: &Plan<'_>,
    resp: &ResponseHead,
    (close, fin_with_answer): (bool, bool),
    set_cookie: Option<String>,
    read_timeout: Duration,
) -> Result<bool, ()> {
    let unknown_length = matches!(resp.body, Body::Chunked | Body::UntilClose);
    // HTTP/1.0 clients get bodies of unknown length delimited by the close.
    let rechunk = unknown_length && plan.minor == 1;
    let close = close || (unknown_length && plan.minor == 0);
    {
        let bytes = ub.filled();
        let reason = std::str::from_utf8(&bytes[resp.reason.clone()]).unwrap_or("");
        let reason = if reason.is_empty() {
            StatusCode::from_u16(resp.code)
                .ok()
                .and_then(|c| c.canonical_reason())
                .unwrap_or("")
        } else {
            reason
        };
        out.extend_from_slice(b"HTTP/1.1 ");
        push_decimal(out, u64::from(resp.code));
        out.push(b' ');
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        let own_framing = resp.body != Body::None;
        let (named, n) = if resp.connection_names {
            connection_names(bytes, resp.len)
        } else {
            ([&[][..]; 8], 0)
        };
        let named = &named[..n];
        let mut has_date = false;
        let relayed = framing::headers(bytes, resp.len).filter(|(name, _)| {
            !skip_response_header(name, own_framing, false) && !named.iter().any(|c| c.eq_ignore_ascii_case(name))
        });
        match plan.gateway.filter(|g| g.edits_response()) {
            None => {
                for (name, value) in relayed {
                    has_date |= name.eq_ignore_ascii_case(b"date");
                    out.extend_from_slice(name);
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(value);
                    out.extend_from_slice(b"\r\n");
                }
            }
            Some(g) => {
                // A Gateway API ResponseHeaderModifier: the headers as a map, edited.
                let mut map = HeaderMap::new();
                for (name, value) in relayed {
                    if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
                        map.append(n, v);
                    }
                }
                g.edit_response_headers(&mut map);
                for (name, value) in map.iter() {
                    let name = name.as_str().as_bytes();
                    if skip_response_header(name, own_framing, false) {
                        continue;
                    }
                    has_date |= name == b"date";
                    out.extend_from_slice(name);
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(value.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
        if !has_date {
            out.extend_from_slice(b"date: ");
            out.extend_from_slice(&http_date());
            out.extend_from_slice(b"\r\n");
        }
    }
    if let Some(c) = set_cookie {
        out.extend_from_slice(b"set-cookie: ");
        out.extend_from_slice(c.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match resp.body {
        Body::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        _ if rechunk => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if plan.minor == 0 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    ub.consume(resp.len);
    match resp.body {
        Body::None => {
            io.write_all(out).await.map_err(|_| ())?;
        }
        Body::Length(n) => {
            // The head and the body bytes read with it in one writev, then straight copies.
            let mut left = n;
            let first = left.min(ub.filled().len() as u64) as usize;
            if close && fin_with_answer && first as u64 == n {
                io.write_last(out, &ub.filled()[..first]).await.map_err(|_| ())?;
            } else {
                write_two(io, out, &ub.filled()[..first]).await.map_err(|_| ())?;
            }
            ub.consume(first);
            left -= first as u64;
            if left > SPLICE_MIN {
                if let Some(from) = up.plain_tcp() {
                    if let Some(to) = io.plain_tcp() {
                        if let Some(p) = w.take_pipe() {
                            // `ub` is empty: all it held went out with the head.
                            pipe::relay(&p, from, to, left, read_timeout).await.map_err(|_| ())?;
                            w.give_pipe(p);
                            left = 0;
                        }
                    }
                }
            }
            let read_size = if left > BUF_SIZE as u64 {
                LARGE_BODY_BUF
            } else {
                BUF_SIZE
            };
            ub.widen(read_size);
            while left > 0 {
                match tokio::time::timeout(read_timeout, ub.read_from(up, read_size)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return Err(()),
                }
                let take = left.min(ub.filled().len() as u64) as usize;
                io.write_all(&ub.filled()[..take]).await.map_err(|_| ())?;
                ub.consume(take);
                left -= take as u64;
            }
        }
        Body::Chunked | Body::UntilClose => {
            let mut chunks = ChunkedDecoder::default();
            loop {
                // Decode what was read, re-frame it for the client behind what is pending in `out`.
                let mut at = 0;
                let input = ub.filled();
                let mut ended = false;
                if resp.body == Body::UntilClose {
                    push_data(out, input, rechunk);
                    at = input.len();
                } else {
                    while at < input.len() && !chunks.done() {
                        let step = chunks.step(&input[at..]).map_err(|_| ())?;
                        if let Some(r) = step.data {
                            push_data(out, &input[at + r.start..at + r.end], rechunk);
                        }
                        at += step.consumed;
                    }
                    ended = chunks.done();
                }
                ub.consume(at);
                if ended {
                    if rechunk {
                        out.extend_from_slice(b"0\r\n\r\n");
                    }
                    io.write_all(out).await.map_err(|_| ())?;
                    break;
                }
                if !out.is_empty() {
                    io.write_all(out).await.map_err(|_| ())?;
                    out.clear();
                }
                match tokio::time::timeout(read_timeout, ub.read_from(up, BUF_SIZE)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(Ok(_)) | Ok(Err(_)) if resp.body == Body::UntilClose => {
                        if rechunk {
                            io.write_all(b"0\r\n\r\n").await.map_err(|_| ())?;
                        }
                        break;
                    }
                    _ => return Err(()),
                }
            }
        }
    }
    io.flush().await.map_err(|_| ())?;
    Ok(close)
}

fn push_data(out: &mut Vec<u8>, data: &[u8], rechunk: bool) {
    if data.is_empty() {
        return;
    }
    if rechunk {
        let _ = write!(out, "{:x}\r\n", data.len());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(data);
    }
}

/// After a `101`: the backend's head and whatever followed it go to the client, what the
/// client sent after its request goes to the backend, then bytes flow both ways untouched.
/// No HTTP/1 request can follow on this connection.
async fn splice(io: &mut ClientIo, buf: &mut Buf, mut up: UpstreamIo, mut ub: Buf, resp: &ResponseHead) -> Outcome {
    let mut head = Vec::with_capacity(resp.len + 64);
    {
        let bytes = ub.filled();
        let reason = std::str::from_utf8(&bytes[resp.reason.clone()]).unwrap_or("Switching Protocols");
        let _ = write!(head, "HTTP/1.1 101 {reason}\r\n");
        for (name, value) in framing::headers(bytes, resp.len) {
            if skip_response_header(name, false, true) {
                continue;
            }
            head.extend_from_slice(name);
            head.extend_from_slice(b": ");
            head.extend_from_slice(value);
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
    }
    ub.consume(resp.len);
    let handed = async {
        write_two(io, &head, ub.filled()).await?;
        io.flush().await?;
        up.write_all(buf.filled()).await?;
        up.flush().await
    };
    if handed.await.is_err() {
        return Outcome::Close;
    }
    buf.consume(buf.filled().len());
    drop(ub);
    let _ = tokio::io::copy_bidirectional(io, &mut up).await;
    Outcome::Close
}

/// A connection whose first bytes were already read (an HTTP/2 preface seen by [`serve`]).
pub struct Prefixed {
    read: Vec<u8>,
    at: usize,
    io: ClientIo,
}

impl Prefixed {
    pub fn new(io: ClientIo, read: Vec<u8>) -> Self {
        Prefixed { read, at: 0, io }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.read.len() {
            let n = (this.read.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.read[this.at..this.at + n]);
            this.at += n;
            if this.at == this.read.len() {
                this.read = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Serves an HTTP/2 connection with hyper until it ends; on drain, a GOAWAY lets the streams
/// in flight finish.
pub async fn serve_h2(w: Rc<Worker>, io: Prefixed, conn: Conn) {
    let proxy = w.proxy.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let proxy = proxy.clone();
        async move { Ok::<_, std::convert::Infallible>(proxy.handle_h2(req, conn).await) }
    });
    let connection = super::proxy::h2_builder().serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut shutdown = w.proxy_shutdown();
    tokio::select! {
        _ = connection.as_mut() => return,
        _ = shutdown.wait_for(|s| *s) => connection.as_mut().graceful_shutdown(),
    }
    let _ = connection.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An accepted, unregistered socket that has `first` to read, and the client's end of it.
    fn fresh_pair(first: &[u8]) -> (ClientIo, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        if !first.is_empty() {
            std::io::Write::write_all(&mut client, first).unwrap();
            // Blocks until the bytes arrived.
            accepted.peek(&mut [0u8; 1]).unwrap();
        }
        accepted.set_nonblocking(true).unwrap();
        (ClientIo::Fresh(Some(accepted)), client)
    }

    #[tokio::test]
    async fn a_fresh_socket_reads_and_writes_without_registering_until_it_must_wait() {
        let (mut io, mut client) = fresh_pair(b"GET / HTTP/1.1\r\n\r\n");
        // Already there: read and answered with plain system calls.
        let mut got = [0u8; 64];
        let n = io.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"GET / HTTP/1.1\r\n\r\n");
        assert!(matches!(io, ClientIo::Fresh(Some(_))));
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        assert!(matches!(io, ClientIo::Fresh(Some(_))));

        // Nothing to read yet: registered, and woken when the client sends.
        let mut read = Box::pin(io.read(&mut got));
        assert!(futures::poll!(&mut read).is_pending());
        std::io::Write::write_all(&mut client, b"next").unwrap();
        let n = read.await.unwrap();
        assert_eq!(&got[..n], b"next");
        assert!(matches!(io, ClientIo::Plain(_)));
    }

    #[tokio::test]
    async fn a_fresh_socket_registers_when_an_answer_does_not_fit_its_send_buffer() {
        let (mut io, client) = fresh_pair(b"");
        // Far more than loopback's socket buffers hold: the write must wait for the reader.
        let answer = vec![b'x'; 16 << 20];
        let reader = std::thread::spawn(move || {
            let mut client = client;
            let mut all = Vec::new();
            std::io::Read::read_to_end(&mut client, &mut all).unwrap();
            all.len()
        });
        write_two(&mut io, b"head ", &answer).await.unwrap();
        assert!(matches!(io, ClientIo::Plain(_)));
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(reader.join().unwrap(), answer.len() + 5);
    }

    /// What the client reads until the proxy's side closes.
    fn read_all(client: std::net::TcpStream) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut client = client;
            let mut all = Vec::new();
            std::io::Read::read_to_end(&mut client, &mut all).unwrap();
            all
        })
    }

    #[tokio::test]
    async fn the_last_answer_is_sent_whole_and_closes_the_connection() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n";
        // A fresh socket, and one registered with the runtime (a keep-alive connection that
        // waited): the bytes arrive whole, then the end of the stream.
        for register in [false, true] {
            let (mut io, mut client) = fresh_pair(b"");
            if register {
                // Registered by a read that had to wait, as a keep-alive connection's is.
                let mut read = Box::pin(async {
                    let mut got = [0u8; 8];
                    io.read(&mut got).await.map(|n| n > 0)
                });
                assert!(futures::poll!(&mut read).is_pending());
                std::io::Write::write_all(&mut client, b"x").unwrap();
                assert!(read.await.unwrap());
                assert!(matches!(io, ClientIo::Plain(_)));
            }
            let reader = read_all(client);
            io.write_last(head, b"hello").await.unwrap();
            assert!(matches!(io, ClientIo::Fresh(None)), "closed by the write");
            assert_eq!(reader.join().unwrap(), [&head[..], b"hello"].concat());
        }
        // More than the socket takes at once: the rest is written as usual, all of it arrives.
        let (mut io, client) = fresh_pair(b"");
        let reader = read_all(client);
        let body = vec![b'x'; 16 << 20];
        io.write_last(head, &body).await.unwrap();
        drop(io);
        assert_eq!(reader.join().unwrap().len(), head.len() + body.len());
    }
}
