//! The node's side of HTTP/1.1 ([`relay_core::http1`]) on arbitrary bytes: a response head,
//! then its body by the framing the head chose. Beyond "never panics", it checks:
//! - a parsed head never claims more bytes than it was given, and a reusable connection has a
//!   body that ends by its framing;
//! - no hop-by-hop field reaches the client, and `Content-Length` only when it frames;
//! - a chunked body decodes to the same bytes fed whole or in pieces split where the first
//!   input byte says, never more bytes than it was given.
#![no_main]

use bytes::BytesMut;
use hyper::Method;
use libfuzzer_sys::fuzz_target;
use relay_core::http1::{self, Chunked, Decoded, Framing, HOP_BY_HOP};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let method = if selector & 1 == 0 {
        Method::POST
    } else {
        Method::HEAD
    };
    if let Ok(Some((head, used))) = http1::parse_response(input, &method) {
        assert!(used <= input.len());
        for name in head.headers.keys() {
            assert!(!HOP_BY_HOP.contains(&name.as_str()), "{name} relayed");
        }
        if head.headers.contains_key("content-length") {
            assert!(matches!(head.framing, Framing::Length(_) | Framing::Empty));
        }
        if head.reusable {
            assert_ne!(head.framing, Framing::UntilClose);
        }
        if head.framing == Framing::Chunked {
            chunked(&input[used..], usize::from(selector >> 1).max(1));
        }
    }
    // The decoder also on the raw input, as if it followed a head.
    chunked(input, usize::from(selector >> 1).max(1));
});

/// Decode `body` whole, then fed `step` bytes at a time: the same result both ways.
fn chunked(body: &[u8], step: usize) {
    let whole = decode(&[body]);
    let pieces: Vec<&[u8]> = body.chunks(step).collect();
    let split = decode(&pieces);
    assert_eq!(whole, split);
    if let Ok((out, _)) = &whole {
        assert!(out.len() <= body.len());
    }
}

/// The decoded bytes and whether the body ended, or the error.
fn decode(pieces: &[&[u8]]) -> Result<(Vec<u8>, bool), http1::Error> {
    let mut chunked = Chunked::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match chunked.decode(&mut buf)? {
                Decoded::Data(data) => out.extend_from_slice(&data),
                Decoded::More => break,
                Decoded::Done => return Ok((out, true)),
            }
        }
    }
    Ok((out, false))
}
