//! The node's side of HTTP/1.1 as the JSON-RPC gateway speaks it: a request written as one
//! buffer, a response head parsed with `httparse`, and the response body's framing (RFC 9112
//! section 6.3) decoded so its bytes can be relayed without a second HTTP client.
//!
//! The client's side stays with hyper's server. This half is pure: it takes bytes and returns
//! what they mean, never reads a socket. Everything is bounded: a head over [`MAX_HEAD`] bytes,
//! a chunk-size line over [`MAX_LINE`] bytes or trailers over [`MAX_HEAD`] bytes are errors,
//! not buffering.

use bytes::{Buf, Bytes, BytesMut};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};

/// Largest response head (status line and headers), and largest block of trailers.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Largest chunk-size line (the size and any extensions).
pub(crate) const MAX_LINE: usize = 4 * 1024;
/// Most header fields in one response head.
const MAX_HEADERS: usize = 128;

/// Why a node's response cannot be relayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("malformed response head: {0}")]
    Head(httparse::Error),
    #[error("response head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("a header field is not valid")]
    Header,
    #[error("conflicting or invalid Content-Length")]
    Length,
    #[error("a transfer coding other than chunked, or one with a Content-Length")]
    TransferEncoding,
    #[error("an upgrade that was not asked for")]
    Upgrade,
    #[error("malformed chunked body")]
    Chunk,
}

/// How the body after a response head ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (a `HEAD` request's response, 204, 304).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the node closes the connection.
    UntilClose,
}

/// A final response head from the node.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    /// The node's headers as the client gets them: without hop-by-hop fields (and those its
    /// `Connection` names), `Transfer-Encoding` and `Upgrade`. `Content-Length` stays when it
    /// frames the body.
    pub headers: HeaderMap,
    pub framing: Framing,
    /// Whether the connection can carry another request once the body is read: HTTP/1.1
    /// without `Connection: close`, and a body that ends by its framing.
    pub reusable: bool,
}

/// Hop-by-hop header fields (RFC 9110 section 7.6.1) and `Upgrade`, never relayed.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Parse the node's response at the start of `buf`, skipping informational (1xx) responses.
/// `Ok(None)` until the whole head is there; otherwise the head and the bytes it took.
pub fn parse_response(
    buf: &[u8],
    request_method: &Method,
) -> Result<Option<(ResponseHead, usize)>, Error> {
    let mut offset = 0;
    loop {
        let rest = &buf[offset..];
        let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let used = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            rest,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(used)) => used,
            // The whole buffer counts: endless interim responses are bounded too.
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(Error::HeadTooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Error::Head(e)),
        };
        if used > MAX_HEAD {
            return Err(Error::HeadTooLarge);
        }
        let code = response.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| Error::Head(httparse::Error::Status))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Error::Upgrade);
        }
        if status.is_informational() {
            offset += used;
            continue;
        }
        let head = head(
            status,
            response.version == Some(1),
            response.headers,
            request_method,
        )?;
        return Ok(Some((head, offset + used)));
    }
}

fn head(
    status: StatusCode,
    http11: bool,
    fields: &[httparse::Header<'_>],
    request_method: &Method,
) -> Result<ResponseHead, Error> {
    let mut connection_close = !http11;
    let mut named: Vec<String> = Vec::new();
    let mut chunked = false;
    let mut other_coding = false;
    let mut length: Option<u64> = None;
    // One pass: each name is parsed once (standard names become constants, compared as
    // such), and the fields the client gets are kept as they go.
    let mut headers = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| Error::Header)?;
        if name == header::CONNECTION {
            for token in tokens(field.value) {
                if token.eq_ignore_ascii_case("close") {
                    connection_close = true;
                } else if http11 || !token.eq_ignore_ascii_case("keep-alive") {
                    named.push(token.to_ascii_lowercase());
                }
            }
        } else if name == header::TRANSFER_ENCODING {
            for token in tokens(field.value) {
                // Chunked must be the last coding, and only once.
                if chunked || !token.eq_ignore_ascii_case("chunked") {
                    other_coding = true;
                }
                chunked = chunked || token.eq_ignore_ascii_case("chunked");
            }
        } else if name == header::CONTENT_LENGTH {
            let value = std::str::from_utf8(field.value).map_err(|_| Error::Length)?;
            // A list of identical values is one value (RFC 9110 section 8.6).
            for part in value.split(',') {
                let part = part.trim();
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(Error::Length);
                }
                let n: u64 = part.parse().map_err(|_| Error::Length)?;
                if length.is_some_and(|l| l != n) {
                    return Err(Error::Length);
                }
                length = Some(n);
            }
        }
        if hop_by_hop(&name) {
            continue;
        }
        let value = HeaderValue::from_bytes(field.value).map_err(|_| Error::Header)?;
        headers.append(name, value);
    }
    let no_body = *request_method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::Empty
    } else if chunked || other_coding {
        // Both framings at once is how responses are split and requests smuggled: refused.
        if other_coding || length.is_some() {
            return Err(Error::TransferEncoding);
        }
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    for name in &named {
        headers.remove(name.as_str());
    }
    if !matches!(framing, Framing::Length(_) | Framing::Empty) {
        headers.remove(header::CONTENT_LENGTH);
    }
    let reusable = !connection_close && framing != Framing::UntilClose;
    Ok(ResponseHead {
        status,
        headers,
        framing,
        reusable,
    })
}

/// Whether a field is hop-by-hop ([`HOP_BY_HOP`]), compared as a parsed name.
fn hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || *name == header::PROXY_AUTHENTICATE
        || *name == header::PROXY_AUTHORIZATION
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// The comma-separated tokens of a header value, trimmed, empty ones left out.
fn tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(value)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// A chunked body being decoded.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF that ends a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields up to an empty line.
    Trailers,
    Done,
}

/// What [`Chunked::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes, taken from the buffer.
    Data(Bytes),
    /// More bytes are needed.
    More,
    /// The body ended (the last chunk and the trailers were taken; trailers are dropped).
    Done,
}

impl Chunked {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decode from the front of `buf`, taking what it uses.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Error> {
        loop {
            match self.state {
                ChunkState::Size => match httparse::parse_chunk_size(buf) {
                    // The bound holds however the line arrived: whole or in pieces.
                    Ok(httparse::Status::Complete((used, _))) if used > MAX_LINE => {
                        return Err(Error::Chunk);
                    }
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        self.state = if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_LINE => {
                        return Err(Error::Chunk);
                    }
                    Ok(httparse::Status::Partial) => return Ok(Decoded::More),
                    Err(_) => return Err(Error::Chunk),
                },
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Error::Chunk);
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((used, _))) if used > MAX_HEAD => {
                            return Err(Error::Chunk);
                        }
                        Ok(httparse::Status::Complete((used, _))) => {
                            buf.advance(used);
                            self.state = ChunkState::Done;
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                            return Err(Error::Chunk);
                        }
                        Ok(httparse::Status::Partial) => return Ok(Decoded::More),
                        Err(_) => return Err(Error::Chunk),
                    }
                }
                ChunkState::Done => return Ok(Decoded::Done),
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

/// Append a request line and `Host`-free header block start: `METHOD target HTTP/1.1`.
pub fn request_line(out: &mut Vec<u8>, method: &Method, target: &str) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
}

/// Append one header field.
pub(crate) fn header_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Append a `content-length` field.
pub fn content_length(out: &mut Vec<u8>, length: usize) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Whether `name` is one of the fields the gateway never forwards to the node: hop-by-hop ones
/// (and those the request's `Connection` names), `Expect` (the body is read already) and the
/// length (written again for the body sent).
pub(crate) fn dropped_request_field(name: &HeaderName, named_by_connection: &[String]) -> bool {
    let lower = name.as_str();
    HOP_BY_HOP.contains(&lower)
        || named_by_connection.iter().any(|n| n == lower)
        || name == header::EXPECT
        || name == header::CONTENT_LENGTH
}

/// The field names a request's `Connection` header lists, lowercased.
pub(crate) fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| {
            tokens(v.as_bytes())
                .map(str::to_ascii_lowercase)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<(ResponseHead, usize)>, Error> {
        parse_response(text.as_bytes(), &Method::POST)
    }

    fn body(text: &str) -> Result<(Vec<u8>, bool, usize), Error> {
        let mut buf = BytesMut::from(text.as_bytes());
        let mut chunked = Chunked::new();
        let mut out = Vec::new();
        loop {
            match chunked.decode(&mut buf)? {
                Decoded::Data(data) => out.extend_from_slice(&data),
                Decoded::More => return Ok((out, false, buf.len())),
                Decoded::Done => return Ok((out, true, buf.len())),
            }
        }
    }

    #[test]
    fn hop_by_hop_names_are_exactly_the_list() {
        for name in HOP_BY_HOP {
            assert!(hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
        for name in [
            "content-type",
            "x-keep",
            "keep-alive-x",
            "tex",
            "date",
            "upgrades",
        ] {
            assert!(!hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
    }

    #[test]
    fn heads_are_framed_as_rfc_9112_says() {
        let (head, used) = parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: application/json\r\n\r\nhello",
        )
        .unwrap()
        .unwrap();
        assert_eq!(used, 70);
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.reusable);
        assert_eq!(head.headers["content-length"], "5");

        let (head, _) = parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-Keep: 2\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Chunked);
        assert!(head.reusable);
        let names: Vec<&str> = head.headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-keep"], "hop-by-hop and named fields are dropped");

        let (head, _) = parse("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!head.reusable);
        let (head, _) = parse("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!head.reusable, "HTTP/1.0 is not kept alive");
        let (head, _) = parse("HTTP/1.1 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!(head.framing, Framing::UntilClose);
        assert!(!head.reusable);
        let (head, _) = parse("HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Empty);
        let (head, _) = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            &Method::HEAD,
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.framing, Framing::Empty);
        let (head, _) = parse("HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.framing, Framing::Length(3));
    }

    #[test]
    fn interim_responses_are_skipped_and_partial_heads_wait() {
        let text = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx";
        let (head, used) = parse(text).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(&text[used..], "x");
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Len").unwrap().is_none());
        assert!(
            parse("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn ambiguous_or_hostile_heads_are_refused() {
        for text in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
            "HTTP/1.1 200 OK\nX: a\rb\r\n\r\n",
        ] {
            assert!(parse(text).is_err(), "{text:?} was accepted");
        }
        let huge = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HEAD + 1));
        assert_eq!(parse(&huge).unwrap_err(), Error::HeadTooLarge);
        let interims = "HTTP/1.1 100 Continue\r\n\r\n".repeat(MAX_HEAD / 25 + 1) + "HTTP/1.1 2";
        assert_eq!(parse(&interims).unwrap_err(), Error::HeadTooLarge);
    }

    #[test]
    fn chunked_bodies_decode_in_any_split() {
        let text = "5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        let (out, done, left) = body(text).unwrap();
        assert_eq!(
            (out.as_slice(), done, left),
            (&b"hello world!"[..], true, 4)
        );
        // Fed one byte at a time, the same body.
        let mut chunked = Chunked::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for byte in text.bytes() {
            buf.extend_from_slice(&[byte]);
            while let Decoded::Data(data) = chunked.decode(&mut buf).unwrap() {
                out.extend_from_slice(&data);
            }
        }
        assert_eq!(out, b"hello world!");
        assert!(chunked.is_done());
        assert_eq!(&buf[..], b"NEXT");
    }

    #[test]
    fn malformed_chunks_are_errors_not_buffering() {
        for text in [
            "5\r\nhelloXX",
            "zz\r\n",
            "5 6\r\n",
            "ffffffffffffffffff\r\n",
        ] {
            assert_eq!(body(text).unwrap_err(), Error::Chunk, "{text:?}");
        }
        let long = format!("5;{}", "e".repeat(MAX_LINE + 1));
        assert_eq!(body(&long).unwrap_err(), Error::Chunk);
        // Over the bound even when the whole line is there (as it could be fed in pieces).
        let whole_line = format!("5;{}\r\nhello\r\n", "e".repeat(MAX_LINE + 1));
        assert_eq!(body(&whole_line).unwrap_err(), Error::Chunk);
        let trailers = format!("0\r\nX: {}", "t".repeat(MAX_HEAD + 1));
        assert_eq!(body(&trailers).unwrap_err(), Error::Chunk);
        assert_eq!(body("3\r\nab").unwrap(), (b"ab".to_vec(), false, 0));
    }
}
