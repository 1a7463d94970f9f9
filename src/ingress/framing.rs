//! PURE: HTTP/1 message framing as the proxy reads it: request heads (what the request line and
//! headers say about the body that follows), response heads from backends, and chunked bodies.
//!
//! The proxy parses every request head of an HTTP/1 connection itself ([`parse_request`]), so
//! the framing rules hold for the whole connection: a request with both `Content-Length` and
//! `Transfer-Encoding` is refused (RFC 9112 section 6.1; the classic request-smuggling shape),
//! after an `Upgrade` that was not accepted as much as on the first request. Bodies are
//! followed to their last byte ([`ChunkedDecoder`] for chunked ones), so the next head is
//! always found where the client's framing puts it, never guessed. Only a connection that
//! really switched protocols (a `101` to an Upgrade) stops being HTTP/1, and then no request
//! can follow on it.
//!
//! Everything here works on byte slices, whatever the reads returned; the tests feed inputs
//! whole, byte by byte and in odd-sized pieces.

use std::ops::Range;

/// Largest request head (request line and headers); past it the answer is 431.
pub const MAX_HEAD: usize = 32 * 1024;
/// Header slots for one head; more headers is a 431 (hyper's limit was 100).
pub const MAX_HEADERS: usize = 100;
/// Longest chunk extension (the part of a chunk-size line after the size); past it, 400.
/// Extensions carry nothing a proxy uses, and unbounded ones are a way to make a server
/// buffer or scan without end.
pub const MAX_CHUNK_EXT: usize = 4 * 1024;
/// Largest trailer section of a chunked body.
pub const MAX_TRAILERS: usize = 32 * 1024;

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (responses only).
    UntilClose,
}

/// Why a request head is refused. Each answer closes the connection: after a framing error
/// nothing more on it can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Not complete yet: read more.
    Partial,
    /// Longer than [`MAX_HEAD`], or more than [`MAX_HEADERS`] headers: 431.
    TooLarge,
    /// Not an HTTP/1 request head: 400.
    Malformed(&'static str),
    /// Both Content-Length and Transfer-Encoding: 400.
    BothFramings,
    /// A transfer coding other than a final `chunked`: 501 (RFC 9112 section 6.1).
    UnknownCoding,
}

impl HeadError {
    /// The status code and text it is answered with.
    pub fn answer(self) -> (u16, &'static str) {
        match self {
            HeadError::Partial => (400, "incomplete request"),
            HeadError::TooLarge => (431, "Request Header Fields Too Large"),
            HeadError::Malformed(why) => (400, why),
            HeadError::BothFramings => (400, "both Content-Length and Transfer-Encoding"),
            HeadError::UnknownCoding => (501, "unsupported Transfer-Encoding"),
        }
    }
}

/// What a request head says, as offsets into the buffer it was parsed from (so the head is
/// never copied; [`headers`] walks its header lines again when they are forwarded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the head, including leading empty lines and the final empty line.
    pub len: usize,
    pub method: Range<usize>,
    pub target: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// The first `Host` header's value.
    pub host: Option<Range<usize>>,
    pub body: Body,
    /// `Connection: close` (or HTTP/1.0 without `keep-alive`).
    pub close: bool,
    /// `Connection: upgrade` and an `Upgrade` header, on HTTP/1.1.
    pub upgrade: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// A `Connection` header names other headers (hop-by-hop, not to be forwarded).
    pub connection_names: bool,
    /// The request carries `X-Forwarded-For`.
    pub forwarded_for: bool,
}

/// Whether a `Connection` value lists anything besides `close`, `keep-alive` and `upgrade`.
fn names_headers(value: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|t| {
        let t = t.trim_ascii();
        !t.is_empty()
            && !t.eq_ignore_ascii_case(b"close")
            && !t.eq_ignore_ascii_case(b"keep-alive")
            && !t.eq_ignore_ascii_case(b"upgrade")
    })
}

impl RequestHead {
    pub fn method<'b>(&self, buf: &'b [u8]) -> &'b str {
        as_str(&buf[self.method.clone()])
    }
    pub fn target<'b>(&self, buf: &'b [u8]) -> &'b str {
        as_str(&buf[self.target.clone()])
    }
    pub fn is_head(&self, buf: &[u8]) -> bool {
        &buf[self.method.clone()] == b"HEAD"
    }
}

/// httparse has checked that methods, targets and header names are tokens or visible ASCII.
fn as_str(b: &[u8]) -> &str {
    std::str::from_utf8(b).unwrap_or_default()
}

/// Whether a comma-separated header value lists `token` (case-insensitive).
pub fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn offset(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

/// Parses a `Content-Length` value: digits only (RFC 9110 section 8.6), no sign, no spaces
/// inside, no overflow.
fn content_length(value: &[u8]) -> Option<u64> {
    let v = value.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Parses the request head at the start of `buf`.
pub fn parse_request(buf: &[u8]) -> Result<RequestHead, HeadError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Err(HeadError::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => return Err(HeadError::Malformed("unsupported HTTP version")),
        Err(_) => return Err(HeadError::Malformed("malformed request")),
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Malformed("malformed request"));
    };
    let mut head = RequestHead {
        len,
        method: offset(buf, method.as_bytes()),
        target: offset(buf, target.as_bytes()),
        minor,
        host: None,
        body: Body::None,
        close: false,
        upgrade: false,
        expect_continue: false,
        connection_names: false,
        forwarded_for: false,
    };
    let mut length: Option<u64> = None;
    let mut coding: Option<&[u8]> = None;
    let mut has_upgrade = false;
    let mut connection_upgrade = false;
    let (mut saw_close, mut saw_keep_alive) = (false, false);
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        if name.eq_ignore_ascii_case(b"host") {
            if head.host.is_some() {
                return Err(HeadError::Malformed("more than one Host"));
            }
            head.host = Some(offset(buf, value.trim_ascii()));
        } else if name.eq_ignore_ascii_case(b"content-length") {
            // Repeated, or a list: only the same number each time is one length (RFC 9110 section 8.6).
            for part in value.split(|&b| b == b',') {
                let n = content_length(part).ok_or(HeadError::Malformed("bad Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(HeadError::Malformed("conflicting Content-Length"));
                }
                length = Some(n);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if coding.is_some() {
                // Several headers form one list whose last coding must be chunked; a second
                // header after a chunked one means chunked is applied twice or not last.
                return Err(HeadError::UnknownCoding);
            }
            coding = Some(value);
        } else if name.eq_ignore_ascii_case(b"connection") {
            saw_close |= has_token(value, "close");
            saw_keep_alive |= has_token(value, "keep-alive");
            connection_upgrade |= has_token(value, "upgrade");
            head.connection_names |= names_headers(value);
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            has_upgrade = true;
        } else if name.eq_ignore_ascii_case(b"expect") {
            head.expect_continue = value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            head.forwarded_for = true;
        }
    }
    // `close` wins over `keep-alive`; HTTP/1.0 closes unless it asks to keep the connection.
    head.close = saw_close || (minor == 0 && !saw_keep_alive);
    head.body = match (coding, length) {
        (Some(_), Some(_)) => return Err(HeadError::BothFramings),
        (Some(_), None) if minor == 0 => return Err(HeadError::UnknownCoding),
        (Some(te), None) if te.trim_ascii().eq_ignore_ascii_case(b"chunked") => Body::Chunked,
        (Some(_), None) => return Err(HeadError::UnknownCoding),
        (None, Some(0)) | (None, None) => Body::None,
        (None, Some(n)) => Body::Length(n),
    };
    head.upgrade = minor == 1 && has_upgrade && connection_upgrade;
    Ok(head)
}

/// Every header line of the head at the start of `buf` (already parsed by [`parse_request`]
/// or [`parse_response`]), in order, as (name, value).
pub fn headers(buf: &[u8], head_len: usize) -> HeaderLines<'_> {
    let head = &buf[..head_len];
    let mut at = 0;
    // Leading empty lines, then the start line.
    while let Some(nl) = memchr::memchr(b'\n', &head[at..]) {
        let line = &head[at..at + nl];
        at += nl + 1;
        if !line.trim_ascii().is_empty() {
            break;
        }
    }
    HeaderLines { head, at }
}

/// The header lines of a head, found with memchr: this walk runs for every forwarded request
/// and answer.
pub struct HeaderLines<'b> {
    head: &'b [u8],
    at: usize,
}

impl<'b> Iterator for HeaderLines<'b> {
    type Item = (&'b [u8], &'b [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = &self.head[self.at..];
        let nl = memchr::memchr(b'\n', rest)?;
        self.at += nl + 1;
        let line = &rest[..nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.at = self.head.len();
            return None;
        }
        let colon = memchr::memchr(b':', line)?;
        Some((&line[..colon], line[colon + 1..].trim_ascii()))
    }
}

/// A backend's response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    pub code: u16,
    pub reason: Range<usize>,
    pub minor: u8,
    pub body: Body,
    /// The backend closes after this response (`Connection: close`, HTTP/1.0 without
    /// keep-alive, or a body delimited by the close).
    pub close: bool,
    /// A `Connection` header names other headers.
    pub connection_names: bool,
}

/// Why a backend's response head is not usable: the request fails with 502.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseError {
    Partial,
    Malformed,
}

/// Parses the response head at the start of `buf`, to a request that was a HEAD if `head_request`.
pub fn parse_response(buf: &[u8], head_request: bool) -> Result<ResponseHead, ResponseError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(ResponseError::Malformed),
        Ok(httparse::Status::Partial) => return Err(ResponseError::Partial),
        Err(_) => return Err(ResponseError::Malformed),
    };
    let (Some(code), Some(minor)) = (resp.code, resp.version) else {
        return Err(ResponseError::Malformed);
    };
    let reason = resp.reason.map_or(0..0, |r| offset(buf, r.as_bytes()));
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let (mut saw_close, mut saw_keep_alive) = (false, false);
    let mut connection_names = false;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            for part in h.value.split(|&b| b == b',') {
                let n = content_length(part).ok_or(ResponseError::Malformed)?;
                if length.is_some_and(|l| l != n) {
                    return Err(ResponseError::Malformed);
                }
                length = Some(n);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            saw_close |= has_token(h.value, "close");
            saw_keep_alive |= has_token(h.value, "keep-alive");
            connection_names |= names_headers(h.value);
        }
    }
    let mut close = saw_close || (minor == 0 && !saw_keep_alive);
    let body = if head_request || (100..200).contains(&code) || code == 204 || code == 304 {
        Body::None
    } else {
        match (chunked, length) {
            (Some(true), _) => Body::Chunked,
            (Some(false), _) => Body::UntilClose,
            (None, Some(0)) => Body::None,
            (None, Some(n)) => Body::Length(n),
            (None, None) => Body::UntilClose,
        }
    };
    // A message with both framings may be an attempt to desynchronise: never reuse that connection.
    if body == Body::UntilClose || (chunked.is_some() && length.is_some()) {
        close = true;
    }
    Ok(ResponseHead {
        len,
        code,
        reason,
        minor,
        body,
        close,
        connection_names,
    })
}

/// Why a chunked body is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// Not a chunk-size line, a missing CRLF after chunk data, a control byte in an extension.
    Malformed,
    /// A chunk extension longer than [`MAX_CHUNK_EXT`].
    ExtensionTooLong,
    /// Trailers longer than [`MAX_TRAILERS`].
    TrailersTooLarge,
}

impl ChunkError {
    pub fn text(self) -> &'static str {
        match self {
            ChunkError::Malformed => "malformed chunked body",
            ChunkError::ExtensionTooLong => "chunk extension too long",
            ChunkError::TrailersTooLarge => "chunked trailers too large",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Hex digits of a chunk size; `digits` seen so far.
    Size {
        size: u64,
        digits: u8,
    },
    /// After the size: optional whitespace, then extensions, to the end of the line.
    Ext {
        size: u64,
        len: usize,
    },
    /// The LF of a chunk-size line.
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the empty line that ends the body).
    TrailerStart,
    TrailerLine,
    EndLf,
    TrailerLf,
    Done,
}

/// Follows a chunked body byte by byte, with no buffer of its own: chunk data is handed back
/// as ranges of the input, everything else (sizes, extensions, trailers) is consumed.
/// Extensions and trailers are checked and dropped: the proxy frames what it forwards itself.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: Chunk,
    trailers: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: Chunk::Size { size: 0, digits: 0 },
            trailers: 0,
        }
    }
}

/// One step of [`ChunkedDecoder::step`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Input bytes consumed by this step.
    pub consumed: usize,
    /// Chunk data within the input (a sub-range of the consumed bytes), if any.
    pub data: Option<Range<usize>>,
}

impl ChunkedDecoder {
    /// Whether the whole body (last chunk and trailers) has been read.
    pub fn done(&self) -> bool {
        self.state == Chunk::Done
    }

    /// Consumes framing bytes from the start of `input` until chunk data begins (returned as a
    /// range) or the input or the body ends.
    pub fn step(&mut self, input: &[u8]) -> Result<Step, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                Chunk::Done => break,
                Chunk::Data { left } => {
                    let n = left.min((input.len() - i) as u64) as usize;
                    let left = left - n as u64;
                    self.state = if left == 0 { Chunk::DataCr } else { Chunk::Data { left } };
                    return Ok(Step {
                        consumed: i + n,
                        data: Some(i..i + n),
                    });
                }
                Chunk::Size { size, digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        // 16 hex digits would overflow past u64; no body is that large.
                        if digits >= 15 {
                            return Err(ChunkError::Malformed);
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        Chunk::Size {
                            size: size << 4 | d,
                            digits: digits + 1,
                        }
                    }
                    _ if digits == 0 => return Err(ChunkError::Malformed),
                    b';' | b' ' | b'\t' => Chunk::Ext { size, len: 1 },
                    b'\r' => Chunk::SizeLf { size },
                    b'\n' => self.after_size(size),
                    _ => return Err(ChunkError::Malformed),
                },
                Chunk::Ext { size, len } => match b {
                    b'\r' => Chunk::SizeLf { size },
                    b'\n' => self.after_size(size),
                    _ if len >= MAX_CHUNK_EXT => return Err(ChunkError::ExtensionTooLong),
                    0..=8 | 10..=31 | 127 => return Err(ChunkError::Malformed),
                    _ => Chunk::Ext { size, len: len + 1 },
                },
                Chunk::SizeLf { size } if b == b'\n' => self.after_size(size),
                Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                Chunk::DataCr | Chunk::DataLf if b == b'\n' => Chunk::Size { size: 0, digits: 0 },
                Chunk::TrailerStart => match b {
                    b'\r' => Chunk::EndLf,
                    b'\n' => Chunk::Done,
                    _ => self.trailer_byte()?,
                },
                Chunk::TrailerLine => match b {
                    b'\r' => Chunk::TrailerLf,
                    b'\n' => Chunk::TrailerStart,
                    _ => self.trailer_byte()?,
                },
                Chunk::TrailerLf if b == b'\n' => Chunk::TrailerStart,
                Chunk::EndLf if b == b'\n' => Chunk::Done,
                Chunk::SizeLf { .. } | Chunk::DataCr | Chunk::DataLf | Chunk::TrailerLf | Chunk::EndLf => {
                    return Err(ChunkError::Malformed)
                }
            };
            i += 1;
        }
        Ok(Step {
            consumed: i,
            data: None,
        })
    }

    fn after_size(&mut self, size: u64) -> Chunk {
        if size == 0 {
            self.trailers = 0;
            Chunk::TrailerStart
        } else {
            Chunk::Data { left: size }
        }
    }

    fn trailer_byte(&mut self) -> Result<Chunk, ChunkError> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS {
            return Err(ChunkError::TrailersTooLarge);
        }
        Ok(Chunk::TrailerLine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` in pieces of `piece` bytes: the data, and whether the body ended.
    fn decode(input: &[u8], piece: usize) -> Result<(Vec<u8>, bool, usize), ChunkError> {
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        let mut used = 0;
        for part in input.chunks(piece) {
            let mut at = 0;
            while at < part.len() && !d.done() {
                let step = d.step(&part[at..])?;
                if let Some(r) = step.data {
                    out.extend_from_slice(&part[at + r.start..at + r.end]);
                }
                at += step.consumed;
            }
            used += at;
            if d.done() {
                break;
            }
        }
        Ok((out, d.done(), used))
    }

    /// The same answer whole, byte by byte, and in 7-byte pieces.
    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, bool, usize), ChunkError> {
        let whole = decode(input, input.len().max(1));
        assert_eq!(whole, decode(input, 1), "byte by byte");
        assert_eq!(whole, decode(input, 7), "7-byte pieces");
        whole
    }

    #[test]
    fn chunked_bodies_decode_and_end_where_the_client_said() {
        let body = b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nGET / HTTP/1.1\r\n";
        let (data, done, used) = decode_all(body).unwrap();
        assert_eq!(data, b"hello world");
        assert!(done);
        assert_eq!(
            &body[used..],
            b"GET / HTTP/1.1\r\n",
            "the next request starts right after"
        );
        let (data, done, _) = decode_all(b"A\nabcdefghij\n0\n\n").unwrap();
        assert_eq!((data.as_slice(), done), (&b"abcdefghij"[..], true), "bare LF lines");
        let (_, done, _) = decode_all(b"5\r\nhel").unwrap();
        assert!(!done, "a body cut short is not done");
    }

    #[test]
    fn bad_chunks_are_refused() {
        for bad in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"5\r\nhelloXX",
            b"5 x\x00\r\n",
            b"fffffffffffffffff\r\n",
            b"-5\r\n",
        ] {
            assert_eq!(
                decode_all(bad),
                Err(ChunkError::Malformed),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut long = b"5;".to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_CHUNK_EXT));
        long.extend(b"\r\nhello\r\n0\r\n\r\n");
        assert_eq!(decode_all(&long), Err(ChunkError::ExtensionTooLong));
        let mut ok = b"5;".to_vec();
        ok.extend(std::iter::repeat_n(b'x', MAX_CHUNK_EXT - 2));
        ok.extend(b"\r\nhello\r\n0\r\n\r\n");
        assert!(decode_all(&ok).unwrap().1, "an extension just under the limit is fine");
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..40 {
            trailers.extend(format!("X-T: {}\r\n", "y".repeat(1000)).as_bytes());
        }
        assert_eq!(decode_all(&trailers), Err(ChunkError::TrailersTooLarge));
    }

    fn head(raw: &[u8]) -> Result<RequestHead, HeadError> {
        parse_request(raw)
    }

    #[test]
    fn request_heads_say_how_their_body_is_framed() {
        let raw = b"POST /a?b HTTP/1.1\r\nHost: h.test\r\nContent-Length: 5\r\n\r\nhello";
        let h = head(raw).unwrap();
        assert_eq!(h.body, Body::Length(5));
        assert_eq!(h.len, raw.len() - 5);
        assert_eq!(h.method(raw), "POST");
        assert_eq!(h.target(raw), "/a?b");
        assert_eq!(&raw[h.host.clone().unwrap()], b"h.test");
        assert!(!h.close);
        let raw = b"\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(head(raw).unwrap().body, Body::Chunked, "after an empty line");
        assert!(head(b"GET / HTTP/1.0\r\n\r\n").unwrap().close);
        assert!(!head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap().close);
        assert!(head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap().close);
        assert_eq!(
            head(b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\n")
                .unwrap()
                .body,
            Body::Length(3)
        );
        assert_eq!(head(b"GET / HTTP/1.1\r\nHost: a").unwrap_err(), HeadError::Partial);
        let up = head(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\n").unwrap();
        assert!(up.upgrade);
        assert!(
            !head(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n").unwrap().upgrade,
            "no Connection: upgrade"
        );
        assert!(
            head(b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
                .unwrap()
                .expect_continue
        );
    }

    #[test]
    fn framings_that_could_smuggle_are_refused() {
        for (raw, want) in [
            (
                &b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
                HeadError::BothFramings,
            ),
            (
                b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 0\r\n\r\n",
                HeadError::BothFramings,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                HeadError::Malformed("conflicting Content-Length"),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
                HeadError::Malformed("bad Content-Length"),
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n",
                HeadError::Malformed("bad Content-Length"),
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
                HeadError::UnknownCoding,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                HeadError::UnknownCoding,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                HeadError::UnknownCoding,
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                HeadError::UnknownCoding,
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                HeadError::Malformed("more than one Host"),
            ),
            (
                b"GET / HTTP/1.1\r\nX : y\r\n\r\n",
                HeadError::Malformed("malformed request"),
            ),
            (
                b"GET / HTTP/1.1\r\nX: y\r\n folded\r\n\r\n",
                HeadError::Malformed("malformed request"),
            ),
            (b"GARBAGE\r\n\r\n", HeadError::Malformed("malformed request")),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                HeadError::Malformed("unsupported HTTP version"),
            ),
        ] {
            assert_eq!(head(raw), Err(want), "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn heads_are_bounded() {
        let mut huge = b"GET / HTTP/1.1\r\n".to_vec();
        while huge.len() <= MAX_HEAD {
            huge.extend(b"X-Big: yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy\r\n");
        }
        assert_eq!(head(&huge), Err(HeadError::TooLarge), "partial and too long");
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        assert_eq!(head(&many), Err(HeadError::TooLarge), "too many headers");
    }

    #[test]
    fn header_lines_are_walked_again_in_order() {
        let raw = b"\r\nGET / HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nX-Two:  b c \r\n\r\nbody";
        let h = head(raw).unwrap();
        let all: Vec<(&[u8], &[u8])> = headers(raw, h.len).collect();
        assert_eq!(all, [(&b"Host"[..], &b"a"[..]), (b"X-Empty", b""), (b"X-Two", b"b c")]);
        let bare = b"GET / HTTP/1.1\nHost: a\n\n";
        let h = head(bare).unwrap();
        assert_eq!(headers(bare, h.len).count(), 1);
    }

    #[test]
    fn response_heads_from_backends() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", false).unwrap();
        assert_eq!((r.code, r.body, r.close), (200, Body::Length(3), false));
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true).unwrap();
        assert_eq!(r.body, Body::None, "HEAD");
        let r = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false).unwrap();
        assert_eq!((r.body, r.close), (Body::Chunked, false));
        let r = parse_response(b"HTTP/1.1 200 OK\r\n\r\n", false).unwrap();
        assert_eq!((r.body, r.close), (Body::UntilClose, true));
        let r = parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false).unwrap();
        assert!(r.close, "HTTP/1.0");
        let r = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n", false).unwrap();
        assert_eq!((r.body, r.close), (Body::None, false));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!((r.body, r.close), (Body::Chunked, true), "never reused after both");
        assert_eq!(parse_response(b"HTTP/1.1 200", false), Err(ResponseError::Partial));
        assert_eq!(
            parse_response(b"HTTP/1.1 abc\r\n\r\n", false),
            Err(ResponseError::Malformed)
        );
    }
}
