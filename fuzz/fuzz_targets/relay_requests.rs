//! The small parsers of what crosses a tunnel or an egress listener, on arbitrary bytes: the
//! relay header a sentry sends ([`Header`]), the egress request an agent sends
//! ([`EgressRequest`]), and a SOCKS5 client's greeting and CONNECT request
//! ([`relay_core::relay::socks5`]). The first byte picks the parser. Beyond "never panics":
//! - a header or request that decodes encodes back to exactly the bytes it came from (there
//!   is one wire form of each, so two readers cannot disagree about one);
//! - a decoded egress destination name is a valid host name (nothing else may reach the
//!   sentry's resolver);
//! - the SOCKS5 parsers never claim more bytes than they were given, nor more than their
//!   bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_core::config::{Destination, check_host_name};
use relay_core::relay::socks5::{self, MAX_GREETING, MAX_REQUEST};
use relay_core::relay::{EgressRequest, Header};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => {
            if let Ok(header) = Header::decode(input) {
                assert_eq!(header.encode().as_deref(), Ok(input));
            }
        }
        1 => {
            if let Ok(request) = EgressRequest::decode(input) {
                assert_eq!(request.encode().as_deref(), Ok(input));
                if let Destination::Name(name, _) = &request.destination {
                    assert!(check_host_name(name).is_ok(), "{name:?}");
                }
            }
        }
        _ => {
            if let Ok(Some(len)) = socks5::parse_greeting(input) {
                assert!(len <= input.len() && len <= MAX_GREETING);
            }
            if let Ok(Some((len, destination))) = socks5::parse_request(input) {
                assert!(len <= input.len() && len <= MAX_REQUEST);
                if let Destination::Name(name, _) = destination {
                    assert!(check_host_name(&name).is_ok(), "{name:?}");
                }
            }
        }
    }
});
