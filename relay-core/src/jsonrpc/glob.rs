//! The two small pattern languages of the JSON-RPC filter.
//!
//! - Method globs: `*` matches any run of characters (`icx_*`, `eth_sign*`, `*`); everything
//!   else matches itself. Matching is linear-time in practice and bounded by the lengths.
//! - Path globs: `/`-separated segments; a `*` segment matches exactly one non-empty segment
//!   (`/api/v3/*` matches `/api/v3/icon_dex` but not `/api/v3` nor `/api/v3/a/b`); other
//!   segments match themselves. Paths are checked for canonical form before matching (see
//!   [`canonical_path`]), so no spelling of a path reaches a pattern it does not literally
//!   match.

/// Whether `text` matches the method glob `pattern`.
#[must_use]
pub(crate) fn method_matches(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // Position after the last `*` seen, and where in `text` that star's match began.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi + 1, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((after, start)) = star {
            // Let the last star swallow one more character and retry.
            pi = after;
            ti = start + 1;
            star = Some((after, start + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Whether the canonical `path` matches the path glob `pattern`.
#[must_use]
pub fn path_matches(pattern: &str, path: &str) -> bool {
    if !pattern.contains('*') {
        return pattern == path;
    }
    let mut want = pattern.split('/');
    let mut have = path.split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return true,
            (Some("*"), Some(segment)) if !segment.is_empty() => {}
            (Some(w), Some(h)) if w == h => {}
            _ => return false,
        }
    }
}

/// Why a request path is refused before any pattern is consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Not starting with `/`, or longer than [`MAX_PATH`].
    Shape,
    /// A byte outside `A-Z a-z 0-9 - _ . ~ /` and `:` `@` `!` `$` `&` `'` `(` `)` `+` `,` `;`
    /// `=` (RFC 3986 pchar without percent-encoding): `%`, `\`, spaces, controls, non-ASCII.
    Character,
    /// An empty segment (`//`), a dot segment (`.`, `..`), or a segment ending in a dot
    /// (`v3.`), which some servers and file systems treat as another spelling of a name.
    Segment,
}

/// Longest path accepted.
pub(crate) const MAX_PATH: usize = 1024;

/// Check that `path` (without its query) has only one spelling: percent-encoding, dot and
/// empty segments, backslashes and trailing dots are refused rather than decoded, so what
/// the filter matched is exactly what the node will route. A trailing `/` is allowed only
/// for the root path.
///
/// # Errors
/// Why the path is not canonical.
pub fn canonical_path(path: &str) -> Result<(), PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') || bytes.len() > MAX_PATH {
        return Err(PathError::Shape);
    }
    if !bytes.iter().all(|&c| PATH_CHAR[usize::from(c)]) {
        return Err(PathError::Character);
    }
    if path == "/" {
        return Ok(());
    }
    // Every segment is non-empty and does not end in a dot: no `/` follows a `/` or a `.`,
    // and the path ends in neither.
    let segment_end_ok = |c: u8| c != b'/' && c != b'.';
    let inner_ok = bytes
        .windows(2)
        .all(|pair| pair[1] != b'/' || segment_end_ok(pair[0]));
    if inner_ok && bytes.last().copied().is_some_and(segment_end_ok) {
        Ok(())
    } else {
        Err(PathError::Segment)
    }
}

/// The bytes a canonical path may hold: unreserved and sub-delimiter characters, `:`, `@`
/// and `/` (RFC 3986 `pchar`, without percent-encoding).
const PATH_CHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        table[c] = b.is_ascii_alphanumeric();
        c += 1;
    }
    let others = b"-_.~/:@!$&'()+,;=";
    let mut i = 0;
    while i < others.len() {
        table[others[i] as usize] = true;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_globs() {
        for (pattern, text, expected) in [
            ("icx_*", "icx_getBalance", true),
            ("icx_*", "icx_", true),
            ("icx_*", "icx", false),
            ("icx_*", "xicx_getBalance", false),
            ("eth_sign*", "eth_signTypedData_v4", true),
            ("eth_sign*", "eth_sign", true),
            ("eth_sendTransaction", "eth_sendTransaction", true),
            ("eth_sendTransaction", "eth_sendRawTransaction", false),
            ("*", "", true),
            ("*", "anything", true),
            ("*_*", "a_b", true),
            ("*_*", "ab", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("debug_*", "DEBUG_traceTransaction", false),
            ("", "", true),
            ("", "x", false),
        ] {
            assert_eq!(
                method_matches(pattern, text),
                expected,
                "{pattern:?} vs {text:?}"
            );
        }
    }

    #[test]
    fn path_globs() {
        for (pattern, path, expected) in [
            ("/api/v3", "/api/v3", true),
            ("/api/v3", "/api/v3/icon_dex", false),
            ("/api/v3/*", "/api/v3/icon_dex", true),
            ("/api/v3/*", "/api/v3", false),
            ("/api/v3/*", "/api/v3/a/b", false),
            ("/api/v3/*/block", "/api/v3/icon_dex/block", true),
            ("/api/v3/*/block", "/api/v3/icon_dex/event", false),
            ("/", "/", true),
            ("/*", "/status", true),
            ("/*", "/", false),
        ] {
            assert_eq!(
                path_matches(pattern, path),
                expected,
                "{pattern:?} vs {path:?}"
            );
        }
    }

    #[test]
    fn only_canonical_paths_pass() {
        for ok in [
            "/",
            "/api/v3",
            "/api/v3/icon_dex",
            "/status",
            "/a-b_c~d",
            "/v1.2/x",
        ] {
            assert_eq!(canonical_path(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", PathError::Shape),
            ("api/v3", PathError::Shape),
            ("/api/v3/../admin", PathError::Segment),
            ("/api/v3/./x", PathError::Segment),
            ("/api//v3", PathError::Segment),
            ("/api/v3/", PathError::Segment),
            ("/api/v3.", PathError::Segment),
            ("/admin.", PathError::Segment),
            ("/%61dmin", PathError::Character),
            ("/api/v3%2F..%2Fadmin", PathError::Character),
            ("/api\\v3", PathError::Character),
            ("/api v3", PathError::Character),
            ("/api/v3\u{0}", PathError::Character),
            ("/ápi", PathError::Character),
        ] {
            assert_eq!(canonical_path(bad), Err(why), "{bad:?}");
        }
        assert_eq!(
            canonical_path(&format!("/{}", "a".repeat(MAX_PATH))),
            Err(PathError::Shape)
        );
    }

    proptest::proptest! {
        /// A pattern without `*` matches exactly itself.
        #[test]
        fn literal_patterns_match_only_themselves(a in "[a-z_]{0,12}", b in "[a-z_]{0,12}") {
            proptest::prop_assert_eq!(method_matches(&a, &b), a == b);
        }

        /// `prefix*` is exactly `starts_with`.
        #[test]
        fn prefix_patterns_are_starts_with(p in "[a-z_]{0,6}", t in "[a-z_]{0,12}") {
            proptest::prop_assert_eq!(method_matches(&format!("{p}*"), &t), t.starts_with(&p));
        }
    }

    /// The rule `canonical_path` implements, written the plain way: split into segments.
    fn canonical_by_segments(path: &str) -> Result<(), PathError> {
        if !path.starts_with('/') || path.len() > MAX_PATH {
            return Err(PathError::Shape);
        }
        let allowed = |c: u8| c.is_ascii_alphanumeric() || b"-_.~/:@!$&'()+,;=".contains(&c);
        if !path.bytes().all(allowed) {
            return Err(PathError::Character);
        }
        if path == "/" {
            return Ok(());
        }
        for segment in path[1..].split('/') {
            if segment.is_empty() || segment.ends_with('.') {
                return Err(PathError::Segment);
            }
        }
        Ok(())
    }

    #[test]
    fn canonical_path_agrees_with_the_segment_rule_on_every_short_path() {
        let alphabet = ['/', '.', 'a', '%', '-'];
        let mut paths = vec![String::new()];
        for _ in 0..7 {
            let mut longer = Vec::new();
            for path in &paths {
                assert_eq!(
                    canonical_path(path),
                    canonical_by_segments(path),
                    "{path:?}"
                );
                for c in alphabet {
                    longer.push(format!("{path}{c}"));
                }
            }
            paths = longer;
        }
    }

    proptest::proptest! {
        /// A path pattern without `*` matches exactly the same path.
        #[test]
        fn literal_path_patterns_match_only_themselves(
            a in "(/[a-z.]{0,3}){1,3}",
            b in "(/[a-z.]{0,3}){1,3}",
        ) {
            proptest::prop_assert_eq!(path_matches(&a, &b), a == b);
        }
    }
}
