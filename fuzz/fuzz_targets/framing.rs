//! The HTTP/1 framing the proxy follows on a client connection: request heads
//! (`framing::parse_request`) and the bodies they announce (lengths, `ChunkedDecoder`), request
//! after request as h1.rs walks them. Whatever the bytes, it must never panic, never accept a
//! head carrying both Content-Length and Transfer-Encoding (the check holds for the whole
//! connection, after an Upgrade request or a long chunk extension too), and its verdicts must
//! not depend on how the reads split the bytes: the first byte picks a read size, and the same
//! bytes fed whole, in those pieces and one by one must give the same requests and errors.
#![no_main]

use kproxy::ingress::framing::{self, Body, ChunkedDecoder, HeadError};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// A head accepted: method, target, framing.
    Request(String, String, Body),
    /// Chunk data bytes of a chunked body.
    Data(usize),
    /// A head refused (the connection is closed after its answer).
    Refused(HeadError),
    /// A chunked body refused.
    BadChunk(framing::ChunkError),
    /// The input ended inside a head or a body.
    Incomplete,
}

enum State {
    Head,
    Length(u64),
    Chunked(ChunkedDecoder),
}

/// Walks `bytes` as one connection's requests, reading `step` bytes at a time.
fn follow(bytes: &[u8], step: usize) -> Vec<Event> {
    let mut events = Vec::new();
    let mut state = State::Head;
    let (mut pos, mut end) = (0, 0);
    loop {
        let all_read = end == bytes.len();
        let buf = &bytes[pos..end];
        let mut progressed = false;
        match &mut state {
            State::Head if buf.is_empty() => {}
            State::Head => match framing::parse_request(buf) {
                Err(HeadError::Partial) => {}
                Err(e) => {
                    events.push(Event::Refused(e));
                    return events;
                }
                Ok(head) => {
                    let mut length = false;
                    let mut coding = false;
                    for (name, _) in framing::headers(buf, head.len) {
                        length |= name.eq_ignore_ascii_case(b"content-length");
                        coding |= name.eq_ignore_ascii_case(b"transfer-encoding");
                    }
                    assert!(!(length && coding), "a head with both framings was accepted");
                    let method = head.method(buf).to_string();
                    let target = head.target(buf).to_string();
                    events.push(Event::Request(method, target, head.body));
                    pos += head.len;
                    progressed = true;
                    // An Upgrade request that the backend does not accept stays HTTP/1: the
                    // next request is parsed like any other.
                    state = match head.body {
                        Body::Length(n) => State::Length(n),
                        Body::Chunked => State::Chunked(ChunkedDecoder::default()),
                        Body::None | Body::UntilClose => State::Head,
                    };
                }
            },
            State::Length(left) => {
                let n = (*left).min(buf.len() as u64);
                if n > 0 {
                    *left -= n;
                    pos += n as usize;
                    progressed = true;
                }
                if *left == 0 {
                    state = State::Head;
                    progressed = true;
                }
            }
            State::Chunked(decoder) => match decoder.step(buf) {
                Err(e) => {
                    events.push(Event::BadChunk(e));
                    return events;
                }
                Ok(s) => {
                    assert!(s.consumed <= buf.len());
                    if let Some(data) = s.data {
                        assert!(data.end <= s.consumed && data.start <= data.end);
                        // Coalesced: how reads split the data must not show.
                        match events.last_mut() {
                            Some(Event::Data(n)) => *n += data.len(),
                            _ => events.push(Event::Data(data.len())),
                        }
                    }
                    pos += s.consumed;
                    progressed = s.consumed > 0;
                    if decoder.done() {
                        state = State::Head;
                        progressed = true;
                    }
                }
            },
        }
        if progressed {
            continue;
        }
        if all_read {
            if pos < bytes.len() || !matches!(state, State::Head) {
                events.push(Event::Incomplete);
            }
            return events;
        }
        end = (end + step).min(bytes.len());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let step = usize::from(split % 64) + 1;
    let whole = follow(bytes, bytes.len().max(1));
    assert_eq!(whole, follow(bytes, step), "read in pieces of {step}");
    assert_eq!(whole, follow(bytes, 1), "read byte by byte");
});
