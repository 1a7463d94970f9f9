//! Request framing on HTTP/1 client connections, followed on the bytes hyper is about to read.
//!
//! hyper settles a request head that carries both `Content-Length` and `Transfer-Encoding` on its
//! own: it drops `Content-Length`, reads the body as chunked and closes after the answer. The
//! service never sees the conflict, yet it is the classic request-smuggling shape, and RFC 9112
//! section 6.1 lets a server refuse it; ingress-nginx answers 400. [`FramingWatch`] reads the
//! same bytes as hyper, follows message boundaries (heads, `Content-Length` and chunked bodies,
//! trailers) and records which request on the connection carried both, so the service can
//! answer that request with a 400 and the connection closes.
//!
//! The [`Scanner`] is a pure state machine fed with whatever each read returned, so it is tested
//! byte by byte. Anything it does not understand (HTTP/2's preface, a malformed head, an
//! Upgrade or CONNECT after which bytes are no longer HTTP/1) turns it off for the rest of the
//! connection: hyper then answers as it always does.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest request head followed; past it hyper answers 431 anyway.
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size or trailer line followed.
const MAX_LINE: usize = 8 * 1024;
/// Header slots for parsing one head (hyper's own limit is 100).
const MAX_HEADERS: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head.
    Head,
    /// Skipping this many bytes of a Content-Length body.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping this many bytes of chunk data.
    ChunkData(u64),
    /// Reading the CRLF after chunk data.
    ChunkEnd,
    /// Reading trailer lines until the empty one.
    Trailers,
    /// No longer following this connection.
    Off,
}

/// What a head says about the body that follows it.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Both Content-Length and Transfer-Encoding.
    Conflict,
    /// Not HTTP/1 request bytes after this head, or not a head we can follow.
    Stop,
}

/// Follows HTTP/1 message boundaries through a connection's bytes.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    /// Heads completed so far: the index of the next request.
    heads: u64,
    /// A head or line split across reads.
    pending: Vec<u8>,
    /// Trailer bytes so far (bounded like a head).
    trailer_bytes: usize,
    conflict: Option<u64>,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            state: State::Head,
            heads: 0,
            pending: Vec::new(),
            trailer_bytes: 0,
            conflict: None,
        }
    }
}

/// The end of a request head in `buf` (just past its empty line), searching from `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(2);
    buf[start..].iter().enumerate().find_map(|(i, &b)| {
        if b != b'\n' {
            return None;
        }
        let at = start + i;
        let before = &buf[..at];
        (before.ends_with(b"\n") || before.ends_with(b"\n\r")).then_some(at + 1)
    })
}

/// The framing a parsed request head declares (RFC 9112 section 6).
fn framing_of(head: &[u8]) -> Framing {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Framing::Stop,
    }
    if req.method.is_some_and(|m| m.eq_ignore_ascii_case("CONNECT")) {
        return Framing::Stop;
    }
    let mut lengths = Vec::new();
    let mut codings: Option<&[u8]> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("upgrade") {
            return Framing::Stop;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            lengths.push(h.value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            codings = Some(h.value);
        }
    }
    match (codings, lengths.is_empty()) {
        (Some(_), false) => Framing::Conflict,
        (Some(te), true) => {
            let last = te.rsplit(|&b| b == b',').next().unwrap_or_default();
            if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                Framing::Chunked
            } else {
                Framing::Stop
            }
        }
        (None, false) => {
            let parsed: Option<Vec<u64>> = lengths
                .iter()
                .map(|v| std::str::from_utf8(v).ok()?.trim().parse().ok())
                .collect();
            match parsed.as_deref() {
                Some([first, rest @ ..]) if rest.iter().all(|n| n == first) => Framing::Length(*first),
                _ => Framing::Stop,
            }
        }
        (None, true) => Framing::None,
    }
}

impl Scanner {
    /// The index (0 for the connection's first request) of the first request whose head
    /// carried both Content-Length and Transfer-Encoding, once seen.
    pub fn conflict(&self) -> Option<u64> {
        self.conflict
    }

    /// Whether the scanner still follows the connection.
    pub fn active(&self) -> bool {
        self.state != State::Off
    }

    fn stop(&mut self) {
        self.state = State::Off;
        self.pending = Vec::new();
    }

    /// Follows the next bytes of the connection.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            bytes = match self.state {
                State::Off => return,
                State::Head => self.feed_head(bytes),
                State::Body(left) | State::ChunkData(left) => {
                    let n = left.min(bytes.len() as u64);
                    let left = left - n;
                    self.state = match (self.state, left) {
                        (State::Body(_), 0) => State::Head,
                        (State::Body(_), _) => State::Body(left),
                        (_, 0) => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    &bytes[n as usize..]
                }
                State::ChunkSize | State::ChunkEnd | State::Trailers => self.feed_line(bytes),
            };
        }
    }

    /// Head bytes; returns what follows the head, if it ended.
    fn feed_head<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let mut bytes = bytes;
        if self.pending.is_empty() {
            // Empty lines before a request line are ignored (RFC 9112 section 2.2).
            let skip = bytes.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
            bytes = &bytes[skip..];
            if bytes.is_empty() {
                return bytes;
            }
            // The common case: the whole head in one read, parsed where it lies.
            if let Some(end) = head_end(bytes, 0) {
                self.head_done(framing_of(&bytes[..end]));
                return &bytes[end..];
            }
        }
        let from = self.pending.len();
        self.pending.extend_from_slice(bytes);
        match head_end(&self.pending, from) {
            Some(end) => {
                self.pending.truncate(end);
                let head = std::mem::take(&mut self.pending);
                self.head_done(framing_of(&head));
                &bytes[end - from..]
            }
            None => {
                if self.pending.len() > MAX_HEAD {
                    self.stop();
                }
                &[]
            }
        }
    }

    fn head_done(&mut self, framing: Framing) {
        let index = self.heads;
        self.heads += 1;
        self.state = match framing {
            Framing::None | Framing::Length(0) => State::Head,
            Framing::Length(n) => State::Body(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Conflict => {
                // hyper closes the connection after answering this request: nothing after it matters.
                self.conflict.get_or_insert(index);
                State::Off
            }
            Framing::Stop => State::Off,
        };
        if self.state == State::Off {
            self.stop();
        }
    }

    /// A chunk-size, chunk-end or trailer line; returns what follows the line, if it ended.
    fn feed_line<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let (part, rest, done) = match bytes.iter().position(|&b| b == b'\n') {
            Some(i) => (&bytes[..=i], &bytes[i + 1..], true),
            None => (bytes, &[][..], false),
        };
        if self.pending.len() + part.len() > MAX_LINE {
            self.stop();
            return &[];
        }
        self.pending.extend_from_slice(part);
        if !done {
            return rest;
        }
        let line = std::mem::take(&mut self.pending);
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        self.state = match self.state {
            State::ChunkSize => {
                let size = text.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
                match std::str::from_utf8(size)
                    .ok()
                    .and_then(|s| u64::from_str_radix(s, 16).ok())
                {
                    Some(0) => {
                        self.trailer_bytes = 0;
                        State::Trailers
                    }
                    Some(n) => State::ChunkData(n),
                    None => State::Off,
                }
            }
            State::ChunkEnd if text.is_empty() => State::ChunkSize,
            State::Trailers if text.is_empty() => State::Head,
            State::Trailers => {
                self.trailer_bytes += line.len();
                if self.trailer_bytes > MAX_HEAD {
                    State::Off
                } else {
                    State::Trailers
                }
            }
            _ => State::Off,
        };
        if self.state == State::Off {
            self.stop();
        }
        rest
    }
}

/// Which request on a connection carried both Content-Length and Transfer-Encoding, shared
/// between the connection's [`FramingWatch`] and its service.
#[derive(Debug, Default)]
pub struct Verdict {
    /// The conflicting request's index plus one; 0 while none.
    conflict: AtomicU64,
    /// Requests the service has taken so far.
    served: AtomicU64,
}

impl Verdict {
    /// Called once per HTTP/1 request the service receives, in order: whether this one carried
    /// both framings.
    pub fn next_request_conflicts(&self) -> bool {
        let index = self.served.fetch_add(1, Ordering::AcqRel);
        self.conflict.load(Ordering::Acquire) == index + 1
    }
}

/// A client connection whose reads are followed by a [`Scanner`].
pub struct FramingWatch<IO> {
    io: IO,
    scanner: Scanner,
    verdict: Arc<Verdict>,
}

impl<IO> FramingWatch<IO> {
    pub fn new(io: IO, verdict: Arc<Verdict>) -> Self {
        FramingWatch {
            io,
            scanner: Scanner::default(),
            verdict,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FramingWatch<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if this.scanner.active() {
            this.scanner.feed(&buf.filled()[before..]);
            if let Some(index) = this.scanner.conflict() {
                this.verdict.conflict.store(index + 1, Ordering::Release);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FramingWatch<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The conflict index after feeding `input` whole, then byte by byte, then in 7-byte reads:
    /// all three must agree.
    fn conflict_of(input: &[u8]) -> Option<u64> {
        let mut whole = Scanner::default();
        whole.feed(input);
        let mut bytewise = Scanner::default();
        for b in input {
            bytewise.feed(std::slice::from_ref(b));
        }
        let mut chunks = Scanner::default();
        for c in input.chunks(7) {
            chunks.feed(c);
        }
        assert_eq!(whole.conflict(), bytewise.conflict(), "byte by byte");
        assert_eq!(whole.conflict(), chunks.conflict(), "7-byte reads");
        assert_eq!(whole.heads, bytewise.heads);
        assert_eq!(whole.state, bytewise.state);
        whole.conflict()
    }

    #[test]
    fn both_framings_are_caught_on_the_request_that_carries_them() {
        let smuggle =
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(conflict_of(smuggle), Some(0));
        let te_first = b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 3\r\n\r\n";
        assert_eq!(conflict_of(te_first), Some(0));
        // Pipelined behind two ordinary requests: it is the third.
        let mut pipelined = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        pipelined.extend(b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello");
        pipelined.extend(smuggle);
        assert_eq!(conflict_of(&pipelined), Some(2));
    }

    #[test]
    fn bodies_are_skipped_so_their_bytes_are_never_read_as_heads() {
        let inner = b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut fixed = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n", inner.len()).into_bytes();
        fixed.extend(inner);
        fixed.extend(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(conflict_of(&fixed), None);

        let mut chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        chunked.extend(format!("{:x};ext=1\r\n", inner.len()).as_bytes());
        chunked.extend(inner);
        chunked.extend(b"\r\n3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n");
        chunked.extend(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n");
        let mut s = Scanner::default();
        s.feed(&chunked);
        assert_eq!(s.conflict(), None);
        assert_eq!(s.heads, 2, "both requests followed");
        assert_eq!(s.state, State::Head);
        assert_eq!(conflict_of(&chunked), None);
    }

    #[test]
    fn heads_with_bare_newlines_and_leading_empty_lines_are_followed() {
        let mut s = Scanner::default();
        s.feed(
            b"\r\n\r\nGET / HTTP/1.1\nHost: a\n\nPOST / HTTP/1.1\nContent-Length: 1\nTransfer-Encoding: chunked\n\n",
        );
        assert_eq!(s.heads, 2);
        assert_eq!(s.conflict(), Some(1));
    }

    #[test]
    fn what_it_cannot_follow_turns_it_off() {
        for input in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"GARBAGE\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let mut s = Scanner::default();
            s.feed(input);
            assert!(!s.active(), "{}", String::from_utf8_lossy(input));
            // Whatever follows is not taken for a request.
            s.feed(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
            assert_eq!(s.conflict(), None);
        }
    }

    #[test]
    fn an_endless_head_is_dropped_not_buffered() {
        let mut s = Scanner::default();
        s.feed(b"GET / HTTP/1.1\r\n");
        for _ in 0..100 {
            s.feed(&[b'x'; 1024]);
        }
        assert!(!s.active());
        assert!(s.pending.capacity() <= MAX_HEAD * 2);
    }

    #[test]
    fn the_service_learns_which_request_conflicted() {
        let v = Verdict::default();
        v.conflict.store(2, Ordering::Release);
        assert!(!v.next_request_conflicts(), "request 0");
        assert!(v.next_request_conflicts(), "request 1");
        assert!(!v.next_request_conflicts(), "request 2");
    }
}
