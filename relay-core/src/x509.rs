//! The one thing the sentry reads out of an X.509 certificate itself: when it expires
//! (`notAfter`), for the `sentry_route_tls_not_after_seconds` metric that alerts before a
//! JSON-RPC route's certificate lapses. rustls checks everything else.
//!
//! A bounded DER walk over the operator's own certificate file (never network input): the
//! `Certificate` sequence, its `TBSCertificate`, past the optional version, the serial number,
//! the signature algorithm and the issuer, to `Validity`'s second time (RFC 5280 4.1).

/// `notAfter` of a DER certificate, in seconds since 1970-01-01 UTC; `None` if the bytes are
/// not a certificate this walk can read.
#[must_use]
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (SEQUENCE, certificate, _) = tlv(der)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = tlv(certificate)? else {
        return None;
    };
    let (tag, _, mut rest) = tlv(tbs)?;
    if tag != VERSION {
        // No version field: that was the serial number already.
        rest = tbs;
    }
    // serialNumber, signature, issuer.
    for _ in 0..3 {
        let (_, _, after) = tlv(rest)?;
        rest = after;
    }
    let (SEQUENCE, validity, _) = tlv(rest)? else {
        return None;
    };
    let (_, _, after_not_before) = tlv(validity)?;
    let (tag, time, _) = tlv(after_not_before)?;
    parse_time(tag, time)
}

const SEQUENCE: u8 = 0x30;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// One tag-length-value: (tag, value, what follows).
fn tlv(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// `YYMMDDHHMMSSZ` (UTCTime: years 1950 to 2049) or `YYYYMMDDHHMMSSZ` (GeneralizedTime).
fn parse_time(tag: u8, text: &[u8]) -> Option<i64> {
    let digits = text.strip_suffix(b"Z")?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let number = |from: usize, len: usize| -> Option<i64> {
        digits
            .get(from..from + len)?
            .iter()
            .try_fold(0i64, |acc, d| Some(acc * 10 + i64::from(d - b'0')))
    };
    let (year, at) = match (tag, digits.len()) {
        (UTC_TIME, 12) => {
            let yy = number(0, 2)?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, 2)
        }
        (GENERALIZED_TIME, 14) => (number(0, 4)?, 4),
        _ => return None,
    };
    let (month, day) = (number(at, 2)?, number(at + 2, 2)?);
    let (hour, minute, second) = (number(at + 4, 2)?, number(at + 6, 2)?, number(at + 8, 2)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_not_after_of_a_generated_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["rpc.example.org".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = rcgen::date_time_ymd(2049, 12, 31);
        let cert = params.self_signed(&key).unwrap();
        // 2049-12-31T00:00:00Z
        assert_eq!(not_after(cert.der()), Some(2_524_521_600));
        params.not_after = rcgen::date_time_ymd(2061, 3, 1);
        let cert = params.self_signed(&key).unwrap();
        // After 2049: a GeneralizedTime.
        assert_eq!(not_after(cert.der()), Some(2_876_860_800));
    }

    #[test]
    fn times_and_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(parse_time(UTC_TIME, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(parse_time(UTC_TIME, b"500101000000Z"), Some(-631_152_000));
        assert_eq!(
            parse_time(GENERALIZED_TIME, b"20300102030405Z"),
            Some(1_893_553_445)
        );
        for bad in [
            &b"491231235959"[..],
            b"4912312359Z",
            b"49123123595aZ",
            b"491331000000Z",
        ] {
            assert_eq!(parse_time(UTC_TIME, bad), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = not_after(&bytes);
        }
    }
}
