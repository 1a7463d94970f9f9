//! The HTTP/1 framing scanner that finds requests carrying both Content-Length and
//! Transfer-Encoding. It sees whatever each read returned, so besides never panicking its
//! verdict must not depend on how the bytes were split: the first byte picks a split size, and
//! the same bytes fed whole, in those pieces and one by one must agree.
#![no_main]

use kproxy::ingress::framing::Scanner;
use libfuzzer_sys::fuzz_target;

fn scan<'a>(pieces: impl Iterator<Item = &'a [u8]>) -> (Option<u64>, bool) {
    let mut scanner = Scanner::default();
    for piece in pieces {
        scanner.feed(piece);
    }
    (scanner.conflict(), scanner.active())
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, bytes)) = data.split_first() else {
        return;
    };
    let step = usize::from(split % 64) + 1;
    let whole = scan(std::iter::once(bytes));
    assert_eq!(whole, scan(bytes.chunks(step)), "split into pieces of {step}");
    assert_eq!(whole, scan(bytes.chunks(1)), "split into single bytes");
});
