//! Allow and deny lists: sets of CIDR blocks, merged and sorted once when the config is
//! loaded, then looked up by binary search. A deny list of 100 000 entries (a published
//! blocklist) costs a connection about 17 comparisons, not 100 000.
//!
//! List files hold one CIDR (or bare address) per line; `#` starts a comment, blank lines are
//! ignored. [`parse_list`] is pure and reports every bad line with its line and column.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Largest list file read (bytes); a larger one is refused rather than loaded.
pub(crate) const MAX_LIST_BYTES: usize = 32 << 20;

/// A set of addresses given as CIDR blocks. IPv4-mapped IPv6 blocks (`::ffff:a.b.c.d/n`,
/// n ≥ 96) are stored as IPv4, and looked-up addresses are canonicalised the same way, so a
/// dual-stack listener's mapped clients match IPv4 entries and the other way round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrSet {
    // Each sorted by network address, non-overlapping (merged).
    v4: Vec<Ipv4Net>,
    v6: Vec<Ipv6Net>,
}

impl CidrSet {
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for net in nets {
            match canonical(net) {
                IpNet::V4(net) => v4.push(net),
                IpNet::V6(net) => v6.push(net),
            }
        }
        let mut v4 = Ipv4Net::aggregate(&v4);
        let mut v6 = Ipv6Net::aggregate(&v6);
        v4.sort_unstable_by_key(Ipv4Net::network);
        v6.sort_unstable_by_key(Ipv6Net::network);
        Self { v4, v6 }
    }

    /// Whether any block holds `ip`.
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(ip) => last_at_or_below(&self.v4, ip, Ipv4Net::network)
                .is_some_and(|net| net.contains(&ip)),
            IpAddr::V6(ip) => last_at_or_below(&self.v6, ip, Ipv6Net::network)
                .is_some_and(|net| net.contains(&ip)),
        }
    }

    /// Whether the set holds no address at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Blocks after merging.
    #[must_use]
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// The blocks after merging, IPv4 first, each in address order.
    pub fn blocks(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.v4
            .iter()
            .map(|n| IpNet::V4(*n))
            .chain(self.v6.iter().map(|n| IpNet::V6(*n)))
    }
}

/// Blocks are disjoint and sorted, so only the last one starting at or below `ip` can hold it.
fn last_at_or_below<N, A: Ord>(nets: &[N], ip: A, start: impl Fn(&N) -> A) -> Option<&N> {
    let after = nets.partition_point(|net| start(net) <= ip);
    after.checked_sub(1).map(|i| &nets[i])
}

fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        other => other,
    }
}

/// Parse one CIDR or bare address (a host), with host bits cleared.
///
/// # Errors
/// An operator-facing message naming the text.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    parse_cidr_as_written(text).map(|net| net.trunc())
}

/// Parse one CIDR or bare address, host bits kept as written (see [`parse_cidr`]).
///
/// # Errors
/// An operator-facing message naming the text.
pub fn parse_cidr_as_written(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            format!(
                "invalid CIDR {text:?}: expected an address with a prefix length, such as \
                 \"203.0.113.0/24\" or \"2001:db8::/32\""
            )
        })
}

/// A bad line of a list file: 1-based line and column, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ListError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Parse a list file's text.
///
/// # Errors
/// Every bad line (never a partial list).
pub(crate) fn parse_list(text: &str) -> Result<Vec<IpNet>, Vec<ListError>> {
    let mut nets = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let content = line.split('#').next().unwrap_or("");
        let token = content.trim();
        if token.is_empty() {
            continue;
        }
        let column = content[..content.len() - content.trim_start().len()]
            .chars()
            .count()
            + 1;
        if token.contains(char::is_whitespace) {
            errors.push(ListError {
                line: i + 1,
                column,
                message: format!("one CIDR per line, found {token:?}"),
            });
            continue;
        }
        match parse_cidr(token) {
            Ok(net) => nets.push(net),
            Err(message) => errors.push(ListError {
                line: i + 1,
                column,
                message,
            }),
        }
    }
    if errors.is_empty() {
        Ok(nets)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(list: &[&str]) -> CidrSet {
        CidrSet::new(list.iter().map(|t| parse_cidr(t).unwrap()))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn lookups() {
        let s = set(&[
            "203.0.113.0/25",
            "203.0.113.128/25", // merges with the one above
            "198.51.100.7",
            "2001:db8::/32",
            "::ffff:192.0.2.0/120", // mapped: stored as 192.0.2.0/24
            "10.0.0.0/8",
            "10.1.0.0/16", // inside the one above
        ]);
        assert_eq!(s.len(), 5);
        for (addr, want) in [
            ("203.0.113.0", true),
            ("203.0.113.255", true),
            ("203.0.114.0", false),
            ("198.51.100.7", true),
            ("198.51.100.8", false),
            ("198.51.100.6", false),
            ("::ffff:203.0.113.9", true),
            ("192.0.2.1", true),
            ("::ffff:192.0.2.1", true),
            ("10.1.2.3", true),
            ("11.0.0.0", false),
            ("0.0.0.0", false),
            ("255.255.255.255", false),
            ("2001:db8:ffff::1", true),
            ("2001:db9::", false),
            ("::", false),
        ] {
            assert_eq!(s.contains(ip(addr)), want, "{addr}");
        }
        assert!(CidrSet::default().is_empty());
        assert!(!CidrSet::default().contains(ip("203.0.113.1")));
        let everyone = set(&["0.0.0.0/0", "::/0"]);
        assert!(everyone.contains(ip("255.255.255.255")));
        assert!(everyone.contains(ip("ffff::1")));
    }

    #[test]
    fn list_files() {
        let text = "# office\n203.0.113.0/24\n\n  198.51.100.7   # one host\n2001:db8::/32\n";
        assert_eq!(
            parse_list(text).unwrap(),
            vec![
                parse_cidr("203.0.113.0/24").unwrap(),
                parse_cidr("198.51.100.7/32").unwrap(),
                parse_cidr("2001:db8::/32").unwrap(),
            ]
        );
        assert_eq!(parse_list("").unwrap(), vec![]);
        let errors = parse_list("203.0.113.0/24\n  203.0.113.0/33\nfoo bar\n").unwrap_err();
        assert_eq!(errors.len(), 2);
        assert_eq!((errors[0].line, errors[0].column), (2, 3));
        assert!(
            errors[0].message.contains("invalid CIDR"),
            "{}",
            errors[0].message
        );
        assert_eq!((errors[1].line, errors[1].column), (3, 1));
        assert!(errors[1].message.contains("one CIDR per line"));
    }

    fn net_strategy() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u32>(), 0u8..=32)
                .prop_map(|(a, p)| IpNet::V4(Ipv4Net::new(a.into(), p).unwrap()).trunc()),
            // Short prefixes and addresses near each other, so blocks overlap often.
            (any::<u16>(), 0u8..=128).prop_map(|(a, p)| {
                IpNet::V6(Ipv6Net::new((u128::from(a) << 100).into(), p).unwrap()).trunc()
            }),
        ]
    }

    fn ip_strategy() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|a| IpAddr::from(std::net::Ipv4Addr::from(a))),
            (any::<u16>(), any::<u64>()).prop_map(|(hi, lo)| {
                IpAddr::from(std::net::Ipv6Addr::from(
                    (u128::from(hi) << 100) | u128::from(lo),
                ))
            }),
            any::<IpAddr>(),
        ]
    }

    proptest! {
        /// The merged, binary-searched set answers exactly as a scan of the raw list does.
        #[test]
        fn agrees_with_a_linear_scan(
            nets in proptest::collection::vec(net_strategy(), 0..40),
            probes in proptest::collection::vec(ip_strategy(), 1..40),
        ) {
            let s = CidrSet::new(nets.iter().copied());
            for probe in probes {
                let want = nets.iter().any(|n| n.contains(&probe.to_canonical()));
                prop_assert_eq!(s.contains(probe), want, "{}", probe);
            }
        }

        #[test]
        fn list_parser_never_panics(text in "[ -~\\n\\t]{0,200}") {
            let _ = parse_list(&text);
        }
    }
}
