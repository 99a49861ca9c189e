//! Path normalization: the path Cedar sees is the path the upstream gets.
//!
//! Rules, applied to the path part of the request target (everything before `?` or `#`):
//! 1. Percent-encodings of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, so
//!    `%2e%2e` becomes `..` and takes part in step 2. Every other percent-encoding is kept,
//!    with its hex digits uppercased (`%3a` → `%3A`), so equal paths compare equal.
//! 2. Dot segments are removed (RFC 3986 §5.2.4); `..` above the root stays at the root.
//! 3. Runs of `/` are merged into one.
//!
//! Refused (the request is denied with an error, fail closed): a path that, once
//! normalized, still holds an encoded `%` followed by two hex digits (`%2561` is `%61`
//! encoded once more: an upstream that decodes twice reads `a`, so `/%2561dmin` would reach
//! `/admin` past a rule on `/admin*`; [`PathRules::allow_double_encoding`] opts out); an
//! encoded slash or
//! backslash (`%2F`, `%5C`) — upstreams disagree on whether it separates segments, so no
//! `like "/admin/*"` rule could be trusted; a `;` (literal or `%3B`): Java servlet
//! containers and others strip `;params` from segments, so `/admin;x/secret` would reach
//! `/admin/secret` past the rule; a literal backslash; an encoded or literal NUL
//! or other control character; a malformed percent-encoding; a path that does not start
//! with `/` (except `*` for `OPTIONS *`); a path longer than [`MAX_PATH_LEN`].
//!
//! Letter case is kept: `/Admin` and `/admin` are different paths (write a rule for each
//! spelling an upstream treats alike).
//!
//! The gateway forwards the normalized path (plus the original query), never the raw one.

use thiserror::Error;

/// The longest raw path accepted, in bytes.
pub const MAX_PATH_LEN: usize = 8 * 1024;

/// Why a request path was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PathError {
    /// The path is longer than [`MAX_PATH_LEN`] bytes.
    #[error("path is longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    /// The path does not start with `/`.
    #[error("path `{0}` does not start with `/`")]
    NotAbsolute(String),
    /// A `%` is not followed by two hex digits.
    #[error("malformed percent-encoding in path `{0}`")]
    BadEncoding(String),
    /// An encoded `/` or `\`, which upstreams interpret differently.
    #[error("encoded slash or backslash in path `{0}` is refused")]
    EncodedSeparator(String),
    /// A literal backslash, NUL or other control character.
    #[error("forbidden character in path `{0}`")]
    ForbiddenChar(String),
    /// A `;` (segment parameters), which some upstreams strip before routing.
    #[error("`;` in path `{0}` is refused (upstreams strip segment parameters differently)")]
    SegmentParameter(String),
    /// A `%25` followed by two hex digits after normalization: a double encoding, which an
    /// upstream that decodes twice reads as a different path than the one decided on.
    #[error(
        "double-encoded path `{0}` is refused (`%25` followed by hex digits; \
         `paths.allow_double_encoding` opts out)"
    )]
    DoubleEncoded(String),
}

/// Choices in the path rules that an operator may change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PathRules {
    /// Accept paths that still hold `%25` followed by two hex digits after normalization
    /// (refused by default). Only for upstreams that decode a path exactly once.
    pub allow_double_encoding: bool,
}

impl PathRules {
    /// The default rules with double encodings allowed or not.
    pub fn allowing_double_encoding(allow: bool) -> Self {
        Self {
            allow_double_encoding: allow,
        }
    }
}

/// Normalizes a request target's path with the default rules (see the module docs). The
/// query is dropped.
pub fn normalize_path(raw: &str) -> Result<String, PathError> {
    normalize_path_with(raw, PathRules::default())
}

/// Normalizes a request target's path under `rules` (see the module docs).
pub fn normalize_path_with(raw: &str, rules: PathRules) -> Result<String, PathError> {
    if raw.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    let path = raw.split(['?', '#']).next().unwrap_or_default();
    if path.is_empty() {
        return Ok("/".to_owned());
    }
    if path == "*" {
        return Ok("*".to_owned());
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute(shorten(raw)));
    }
    let decoded = decode_unreserved(path)?;
    let normalized = remove_dot_segments(&decoded);
    if !rules.allow_double_encoding && has_double_encoding(&normalized) {
        return Err(PathError::DoubleEncoded(shorten(path)));
    }
    Ok(normalized)
}

/// Whether a normalized path holds `%25` followed by two hex digits. Normalization writes
/// every kept encoding in upper case, so `%25` is the only spelling of an encoded `%`.
fn has_double_encoding(normalized: &str) -> bool {
    normalized
        .as_bytes()
        .windows(5)
        .any(|w| w[..3] == *b"%25" && w[3].is_ascii_hexdigit() && w[4].is_ascii_hexdigit())
}

/// Decodes unreserved percent-encodings; uppercases the rest; refuses dangerous bytes.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).and_then(|c| hex_val(*c)),
                bytes.get(i + 2).and_then(|c| hex_val(*c)),
            ) else {
                return Err(PathError::BadEncoding(shorten(path)));
            };
            let decoded = hi * 16 + lo;
            match decoded {
                b'/' | b'\\' => return Err(PathError::EncodedSeparator(shorten(path))),
                b';' => return Err(PathError::SegmentParameter(shorten(path))),
                0..=0x1f | 0x7f => return Err(PathError::ForbiddenChar(shorten(path))),
                c if is_unreserved(c) => out.push(char::from(c)),
                c => {
                    out.push('%');
                    out.push_str(&format!("{c:02X}"));
                }
            }
            i += 3;
            continue;
        }
        if b == b'\\' || b < 0x20 || b == 0x7f {
            return Err(PathError::ForbiddenChar(shorten(path)));
        }
        if b == b';' {
            return Err(PathError::SegmentParameter(shorten(path)));
        }
        // Copy one whole UTF-8 character (the input is a `str`, so boundaries are valid).
        let ch_len = utf8_len(b);
        out.push_str(path.get(i..i + ch_len).unwrap_or_default());
        i += ch_len;
    }
    Ok(out)
}

/// RFC 3986 §5.2.4 on an absolute path, with empty segments (duplicate slashes) dropped.
fn remove_dot_segments(path: &str) -> String {
    let mut stack: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (idx, seg) in segments.iter().enumerate() {
        let is_last = idx == last;
        match *seg {
            "." => trailing_slash = is_last,
            ".." => {
                stack.pop();
                trailing_slash = is_last;
            }
            "" => trailing_slash = is_last,
            s => {
                stack.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for seg in &stack {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    out
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// User input in messages is cut to a readable length.
fn shorten(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> String {
        normalize_path(p).unwrap()
    }

    #[test]
    fn path_tricks_resolve_to_the_real_target() {
        assert_eq!(n("/admin/../admin"), "/admin");
        assert_eq!(n("/admin/../admin/users"), "/admin/users");
        assert_eq!(n("/%2e%2e/admin/x"), "/admin/x");
        assert_eq!(n("/public/%2e%2e/admin/x"), "/admin/x");
        assert_eq!(n("/public/%2E%2E/admin/x"), "/admin/x");
        assert_eq!(n("/public/.%2e/admin/x"), "/admin/x");
        assert_eq!(n("//admin/x"), "/admin/x");
        assert_eq!(n("/./admin/x"), "/admin/x");
        assert_eq!(n("/admin//./x"), "/admin/x");
        assert_eq!(n("/%61dmin/x"), "/admin/x");
    }

    #[test]
    fn ordinary_paths_keep_their_shape() {
        assert_eq!(n(""), "/");
        assert_eq!(n("/"), "/");
        assert_eq!(n("/v1/orders/42?x=1#frag"), "/v1/orders/42");
        assert_eq!(n("/v1/orders/"), "/v1/orders/");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/../.."), "/");
        assert_eq!(n("/caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(n("/q%3aa"), "/q%3Aa");
        assert_eq!(n("/ünï"), "/ünï");
        assert_eq!(n("*"), "*");
    }

    #[test]
    fn dangerous_paths_are_refused() {
        for p in [
            "/admin;x/secret",
            "/admin%3bx/secret",
            "/admin%3B/secret",
            "/a;",
        ] {
            assert!(
                matches!(normalize_path(p), Err(PathError::SegmentParameter(_))),
                "{p}"
            );
        }
        // A `;` in the query is not part of the path.
        assert_eq!(normalize_path("/a?x=1;2").unwrap(), "/a");
        assert!(matches!(
            normalize_path("/admin%2fx"),
            Err(PathError::EncodedSeparator(_))
        ));
        assert!(matches!(
            normalize_path("/admin%5Cx"),
            Err(PathError::EncodedSeparator(_))
        ));
        assert!(matches!(
            normalize_path("/admin\\x"),
            Err(PathError::ForbiddenChar(_))
        ));
        assert!(matches!(
            normalize_path("/a%00"),
            Err(PathError::ForbiddenChar(_))
        ));
        assert!(matches!(
            normalize_path("/a\u{7}"),
            Err(PathError::ForbiddenChar(_))
        ));
        assert!(matches!(
            normalize_path("/a%2"),
            Err(PathError::BadEncoding(_))
        ));
        assert!(matches!(
            normalize_path("/a%zz"),
            Err(PathError::BadEncoding(_))
        ));
        assert!(matches!(
            normalize_path("admin"),
            Err(PathError::NotAbsolute(_))
        ));
        assert!(matches!(
            normalize_path(&"/a".repeat(5000)),
            Err(PathError::TooLong)
        ));
    }

    #[test]
    fn double_encodings_are_refused_unless_allowed() {
        // `%2561` is `%61` (`a`) encoded again; `%32%35` decodes to `25`, so the second
        // spelling is the same attack assembled by normalization itself.
        for p in [
            "/%2561dmin",
            "/%2561DMIN/users",
            "/x/%252e%252e/admin",
            "/%252F",
            "/%25%32%35%36%31dmin",
            "/ok/../%2561",
        ] {
            assert!(
                matches!(normalize_path(p), Err(PathError::DoubleEncoded(_))),
                "{p}: {:?}",
                normalize_path(p)
            );
        }
        // A `%` encoded alone (not followed by two hex digits) is an ordinary character.
        assert_eq!(n("/100%25"), "/100%25");
        assert_eq!(n("/100%25off"), "/100%25off");
        assert_eq!(n("/a%25z1"), "/a%25z1");
        let allow = PathRules::allowing_double_encoding(true);
        assert_eq!(
            normalize_path_with("/%2561dmin", allow).unwrap(),
            "/%2561dmin"
        );
        let err = normalize_path("/%2561dmin").unwrap_err().to_string();
        assert!(err.contains("paths.allow_double_encoding"), "{err}");
    }

    #[test]
    fn error_messages_quote_the_input() {
        let err = normalize_path("/x%2Fy").unwrap_err();
        assert_eq!(
            err.to_string(),
            "encoded slash or backslash in path `/x%2Fy` is refused"
        );
    }
}

#[cfg(test)]
#[path = "path_fuzz.rs"]
mod fuzz;
