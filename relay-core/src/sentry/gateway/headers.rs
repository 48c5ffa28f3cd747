//! Request headers: which ones reach the node, and the client address the node is told.

use std::net::SocketAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::ForwardedHeader;
use crate::http1 as wire;

/// Whether the request asks for a WebSocket upgrade.
pub(in crate::sentry) fn wants_websocket(headers: &HeaderMap) -> bool {
    let has_token = |name: HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket")
}

/// Header fields some node, proxy or framework reads as the client's address (or the scheme
/// and host it used), besides every `X-Forwarded-*`: a client could forge any of them, so the
/// node gets none from the client, only the one the route configures (`forwarded`).
pub(in crate::sentry) const CLIENT_ADDRESS: [&str; 16] = [
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-original-forwarded-for",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
    "x-envoy-external-address",
    "x-proxyuser-ip",
    "x-appengine-user-ip",
    "x-azure-clientip",
];

/// Whether a client's header field reaches the node: not hop-by-hop (nor named by its
/// `Connection`), not `Upgrade`, `Expect` (the body is already read) or the length (set
/// again for the body sent), and no client address header (see [`CLIENT_ADDRESS`]).
pub(in crate::sentry) fn forwarded_field(
    name: &HeaderName,
    named_by_connection: &[String],
) -> bool {
    let name_str = name.as_str();
    !wire::dropped_request_field(name, named_by_connection)
        && !name_str.starts_with("x-forwarded-")
        && !CLIENT_ADDRESS.contains(&name_str)
}

/// The client's headers as the node gets them (see [`forwarded_field`]).
pub(in crate::sentry) fn upstream_headers(from: &HeaderMap) -> HeaderMap {
    let named = wire::connection_tokens(from);
    let mut headers = HeaderMap::with_capacity(from.len() + 2);
    for (name, value) in from {
        if forwarded_field(name, &named) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

/// [`client_address`] as header lines on the wire.
pub(in crate::sentry) fn address_fields(
    client: SocketAddr,
    how: ForwardedHeader,
    https: bool,
) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in client_address(client, how, https) {
        wire::header_field(&mut out, &name, &value);
    }
    out
}

/// Who the client is, in the configured header (and `X-Forwarded-Proto` with
/// `X-Forwarded-For`).
pub(in crate::sentry) fn client_address(
    client: SocketAddr,
    how: ForwardedHeader,
    https: bool,
) -> impl Iterator<Item = (HeaderName, HeaderValue)> {
    let ip = client.ip().to_canonical();
    let proto = if https { "https" } else { "http" };
    let fields: [Option<(HeaderName, HeaderValue)>; 2] = match how {
        ForwardedHeader::XForwardedFor => [
            Some((
                HeaderName::from_static("x-forwarded-proto"),
                HeaderValue::from_static(proto),
            )),
            HeaderValue::from_str(&ip.to_string())
                .ok()
                .map(|v| (HeaderName::from_static("x-forwarded-for"), v)),
        ],
        ForwardedHeader::Forwarded => {
            let value = match ip {
                std::net::IpAddr::V4(v4) => format!("for={v4};proto={proto}"),
                std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto={proto}"),
            };
            [
                HeaderValue::from_str(&value)
                    .ok()
                    .map(|v| (header::FORWARDED, v)),
                None,
            ]
        }
        ForwardedHeader::None => [None, None],
    };
    fields.into_iter().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(in crate::sentry) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    pub(in crate::sentry) fn client_chosen_address_headers_never_reach_the_node() {
        let from = headers(&[
            ("host", "rpc.example"),
            ("content-type", "application/json"),
            ("x-forwarded-for", "10.0.0.1"),
            ("Forwarded", "for=10.0.0.1"),
            ("x-real-ip", "10.0.0.1"),
            ("X-Client-IP", "10.0.0.1"),
            ("True-Client-IP", "10.0.0.1"),
            ("CF-Connecting-IP", "10.0.0.1"),
            ("X-Forwarded-Port", "443"),
            ("X-Forwarded-Server", "evil"),
            ("x-cluster-client-ip", "10.0.0.1"),
            ("Fastly-Client-IP", "10.0.0.1"),
            ("X-Originating-IP", "10.0.0.1"),
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "hop"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("content-length", "99"),
            ("expect", "100-continue"),
        ]);
        let mut out = upstream_headers(&from);
        out.extend(client_address(
            "[::ffff:203.0.113.9]:4000".parse().unwrap(),
            ForwardedHeader::XForwardedFor,
            false,
        ));
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(
            names,
            [
                "host",
                "content-type",
                "x-forwarded-proto",
                "x-forwarded-for"
            ]
        );
        assert_eq!(out["x-forwarded-for"], "203.0.113.9");

        let mut out = upstream_headers(&from);
        out.extend(client_address(
            "[2001:db8::7]:4000".parse().unwrap(),
            ForwardedHeader::Forwarded,
            true,
        ));
        assert_eq!(out["forwarded"], "for=\"[2001:db8::7]\";proto=https");
        assert!(!out.contains_key("x-forwarded-for"));

        let mut out = upstream_headers(&from);
        out.extend(client_address(
            "203.0.113.9:1".parse().unwrap(),
            ForwardedHeader::None,
            false,
        ));
        assert!(!out.contains_key("x-forwarded-for") && !out.contains_key("forwarded"));
    }

    #[test]
    pub(in crate::sentry) fn websocket_upgrade_is_recognised_by_tokens() {
        assert!(wants_websocket(&headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ])));
        assert!(!wants_websocket(&headers(&[("upgrade", "websocket")])));
        assert!(!wants_websocket(&headers(&[
            ("connection", "upgrade"),
            ("upgrade", "h2c"),
        ])));
    }
}
