//! `[egress]`: the sentry's policy for its agents' outbound connections.

use std::net::IpAddr;
use std::ops::RangeInclusive;

use serde::Deserialize;
use toml::Spanned;

use super::Checker;
use super::route::count;
use crate::cidr::CidrSet;
use crate::config::EgressPolicy;
use crate::config::units::{Cidr, HumanDuration, HumanRate};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EgressTable {
    allow: Option<Spanned<Vec<Spanned<Cidr>>>>,
    deny: Option<Vec<Spanned<Cidr>>>,
    allow_private: Option<Vec<Spanned<Cidr>>>,
    ports: Option<Vec<Spanned<String>>>,
    max_connections: Option<Spanned<u64>>,
    connect_rate: Option<HumanRate>,
    source: Option<Spanned<String>>,
    idle_timeout: Option<HumanDuration>,
}

/// The policy of an `[egress]` table (the defaults without one).
pub(super) fn policy(check: &mut Checker<'_>, table: Option<&EgressTable>) -> EgressPolicy {
    let defaults = EgressPolicy::default();
    let Some(table) = table else {
        return defaults;
    };
    let allow = match &table.allow {
        None => defaults.allow,
        Some(list) if list.get_ref().is_empty() => {
            check.fail(
                list,
                "egress.allow",
                "an empty allow list dials nothing; remove the key to allow every public address",
            );
            defaults.allow
        }
        Some(list) => CidrSet::new(check.cidrs(list.get_ref(), "egress.allow")),
    };
    let deny = check.cidrs(table.deny.as_deref().unwrap_or_default(), "egress.deny");
    let allow_private = check.cidrs(
        table.allow_private.as_deref().unwrap_or_default(),
        "egress.allow_private",
    );
    let ports = table
        .ports
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, text)| match port_range(text.get_ref()) {
            Ok(range) => Some(range),
            Err(why) => {
                check.fail(text, format!("egress.ports[{i}]"), why);
                None
            }
        })
        .collect();
    let source = table
        .source
        .as_ref()
        .and_then(|text| match text.get_ref().parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() && !ip.is_multicast() => Some(ip),
            _ => {
                check.fail(
                    text,
                    "egress.source",
                    format!(
                        "{:?} is not a unicast IP address of this host (the address outgoing \
                         connections leave from, such as \"203.0.113.1\")",
                        text.get_ref()
                    ),
                );
                None
            }
        });
    EgressPolicy {
        allow,
        deny: CidrSet::new(deny),
        allow_private: CidrSet::new(allow_private),
        ports,
        max_connections: count(
            check,
            table.max_connections.as_ref(),
            "egress.max_connections",
            defaults.max_connections,
        ),
        connect_rate: table
            .connect_rate
            .as_ref()
            .map_or(defaults.connect_rate, |r| r.0),
        source,
        idle_timeout: table
            .idle_timeout
            .as_ref()
            .map_or(defaults.idle_timeout, |d| d.0),
    }
}

/// `"30303"` or `"26656-26660"`.
fn port_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p != 0);
    let range = match text.split_once('-') {
        None => port(text).map(|p| p..=p),
        Some((low, high)) => match (port(low), port(high)) {
            (Some(low), Some(high)) if low <= high => Some(low..=high),
            _ => None,
        },
    };
    range.ok_or_else(|| {
        format!(
            "invalid port {text:?}: a port from 1 to 65535 such as \"30303\", or a range such \
             as \"26656-26660\""
        )
    })
}

#[cfg(test)]
mod tests {
    use super::port_range;

    #[test]
    fn port_ranges() {
        assert_eq!(port_range("30303"), Ok(30303..=30303));
        assert_eq!(port_range("26656-26660"), Ok(26656..=26660));
        for bad in ["0", "65536", "7100-7000", "x", "", "1-", "-5", "1-2-3"] {
            assert!(port_range(bad).is_err(), "{bad:?}");
        }
    }
}
