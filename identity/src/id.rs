//! SPIFFE IDs and trust domains, parsed per the SPIFFE ID standard.
//!
//! Once you hold a [`SpiffeId`] or a [`TrustDomain`] it is valid: the fields are private and
//! the only ways in are [`FromStr`], [`SpiffeId::new`] and serde (which goes through `FromStr`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest SPIFFE ID accepted, in bytes (SPIFFE ID standard, section 2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name accepted, in bytes (SPIFFE ID standard, section 2.1).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a SPIFFE ID or trust domain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The input was empty.
    #[error("SPIFFE ID or trust domain is empty")]
    Empty,
    /// The SPIFFE ID is longer than 2048 bytes.
    #[error("SPIFFE ID is {len} bytes long, the limit is 2048")]
    TooLong {
        /// Length of the input in bytes.
        len: usize,
    },
    /// The scheme is not `spiffe://` (lowercase).
    #[error("`{input}` does not start with `spiffe://`")]
    WrongScheme {
        /// The offending input.
        input: String,
    },
    /// There is no trust domain between `spiffe://` and the path.
    #[error("`{input}` has an empty trust domain")]
    EmptyTrustDomain {
        /// The offending input.
        input: String,
    },
    /// The trust domain is longer than 255 bytes.
    #[error("trust domain is {len} bytes long, the limit is 255")]
    TrustDomainTooLong {
        /// Length of the trust domain in bytes.
        len: usize,
    },
    /// The trust domain carries a port (`:`).
    #[error("`{input}`: a trust domain cannot carry a port")]
    Port {
        /// The offending input.
        input: String,
    },
    /// The trust domain carries userinfo (`@`).
    #[error("`{input}`: a trust domain cannot carry userinfo (`@`)")]
    Userinfo {
        /// The offending input.
        input: String,
    },
    /// A trust domain character outside lowercase letters, digits, `.`, `-`, `_`.
    #[error(
        "`{input}`: trust domain character `{ch}` is not allowed (only a-z, 0-9, `.`, `-`, `_`)"
    )]
    TrustDomainChar {
        /// The offending input.
        input: String,
        /// The first bad character.
        ch: char,
    },
    /// The ID has a query (`?`).
    #[error("`{input}`: a SPIFFE ID cannot have a query (`?`)")]
    Query {
        /// The offending input.
        input: String,
    },
    /// The ID has a fragment (`#`).
    #[error("`{input}`: a SPIFFE ID cannot have a fragment (`#`)")]
    Fragment {
        /// The offending input.
        input: String,
    },
    /// A path that does not start with `/` (only from [`SpiffeId::new`]).
    #[error("path `{path}` must start with `/`")]
    RelativePath {
        /// The offending path.
        path: String,
    },
    /// An empty path segment (`//`).
    #[error("`{input}`: empty path segment (`//`)")]
    EmptySegment {
        /// The offending input.
        input: String,
    },
    /// A `.` or `..` path segment.
    #[error("`{input}`: path segments `.` and `..` are not allowed")]
    DotSegment {
        /// The offending input.
        input: String,
    },
    /// The path ends with `/`.
    #[error("`{input}`: a SPIFFE ID cannot end with `/`")]
    TrailingSlash {
        /// The offending input.
        input: String,
    },
    /// A path character outside letters, digits, `.`, `-`, `_`.
    #[error("`{input}`: path character `{ch}` is not allowed (only A-Z, a-z, 0-9, `.`, `-`, `_`)")]
    PathChar {
        /// The offending input.
        input: String,
        /// The first bad character.
        ch: char,
    },
}

/// A SPIFFE trust domain name, such as `east.example`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TrustDomain(String);

impl TrustDomain {
    /// The name, without scheme.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A syntactically valid stand-in, replaced before anyone sees it.
    pub(crate) fn placeholder() -> Self {
        Self("placeholder.invalid".to_owned())
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<td>` (used as the CA's URI SAN).
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

fn check_trust_domain(td: &str, input: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::EmptyTrustDomain {
            input: input.to_owned(),
        });
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong { len: td.len() });
    }
    if td.contains('@') {
        return Err(IdError::Userinfo {
            input: input.to_owned(),
        });
    }
    if td.contains(':') {
        return Err(IdError::Port {
            input: input.to_owned(),
        });
    }
    if let Some(ch) = td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(IdError::TrustDomainChar {
            input: input.to_owned(),
            ch,
        });
    }
    Ok(())
}

impl FromStr for TrustDomain {
    type Err = IdError;

    /// Accepts a bare name (`east.example`) or a trust domain ID (`spiffe://east.example`).
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        let name = match s.strip_prefix(SCHEME) {
            Some(rest) => {
                let id: SpiffeId = s.parse()?;
                if !id.path().is_empty() {
                    return Err(IdError::TrustDomainChar {
                        input: s.to_owned(),
                        ch: '/',
                    });
                }
                rest
            }
            None => s,
        };
        check_no_query_fragment(name, s)?;
        check_trust_domain(name, s)?;
        Ok(Self(name.to_owned()))
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<TrustDomain> for String {
    fn from(td: TrustDomain) -> String {
        td.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

/// A SPIFFE ID, such as `spiffe://east.example/ns/shop/sa/web`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    full: String,
    trust_domain: TrustDomain,
}

fn check_no_query_fragment(s: &str, input: &str) -> Result<(), IdError> {
    if s.contains('?') {
        return Err(IdError::Query {
            input: input.to_owned(),
        });
    }
    if s.contains('#') {
        return Err(IdError::Fragment {
            input: input.to_owned(),
        });
    }
    Ok(())
}

fn check_path(path: &str, input: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(IdError::RelativePath {
            path: path.to_owned(),
        });
    };
    if rest.is_empty() || rest.ends_with('/') {
        return Err(IdError::TrailingSlash {
            input: input.to_owned(),
        });
    }
    for segment in rest.split('/') {
        if segment.is_empty() {
            return Err(IdError::EmptySegment {
                input: input.to_owned(),
            });
        }
        if segment == "." || segment == ".." {
            return Err(IdError::DotSegment {
                input: input.to_owned(),
            });
        }
        if let Some(ch) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(IdError::PathChar {
                input: input.to_owned(),
                ch,
            });
        }
    }
    Ok(())
}

impl SpiffeId {
    /// `spiffe://<td>/meshgate/gateway`: the only ID that may act as a cluster's gateway.
    pub fn gateway(td: &TrustDomain) -> SpiffeId {
        SpiffeId {
            full: format!("{SCHEME}{td}/meshgate/gateway"),
            trust_domain: td.clone(),
        }
    }

    /// Builds an ID from a trust domain and a path such as `/ns/shop/sa/web`.
    pub fn new(td: &TrustDomain, path: &str) -> Result<SpiffeId, IdError> {
        let full = format!("{SCHEME}{td}{path}");
        if full.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong { len: full.len() });
        }
        check_no_query_fragment(path, &full)?;
        check_path(path, &full)?;
        Ok(SpiffeId {
            full,
            trust_domain: td.clone(),
        })
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path, `""` for a trust domain ID, else starting with `/`.
    pub fn path(&self) -> &str {
        &self.full[SCHEME.len() + self.trust_domain.0.len()..]
    }

    /// The whole ID as a string.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// Whether this is a trust domain ID (`spiffe://td`, no path); no SVID names one.
    pub fn is_trust_domain_id(&self) -> bool {
        self.path().is_empty()
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong { len: s.len() });
        }
        let Some(rest) = s.strip_prefix(SCHEME) else {
            return Err(IdError::WrongScheme {
                input: s.to_owned(),
            });
        };
        check_no_query_fragment(rest, s)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(td, s)?;
        check_path(path, s)?;
        Ok(SpiffeId {
            full: s.to_owned(),
            trust_domain: TrustDomain(td.to_owned()),
        })
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.full
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> IdError {
        s.parse::<SpiffeId>().unwrap_err()
    }

    #[test]
    fn accepts_valid_ids() {
        let id: SpiffeId = "spiffe://east.example/ns/shop/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain().as_str(), "east.example");
        assert_eq!(id.path(), "/ns/shop/sa/web");
        assert_eq!(id.to_string(), "spiffe://east.example/ns/shop/sa/web");
        let id: SpiffeId = "spiffe://a-b_c.9/A.Z-a_z.09".parse().unwrap();
        assert_eq!(id.path(), "/A.Z-a_z.09");
        let root: SpiffeId = "spiffe://east.example".parse().unwrap();
        assert!(root.is_trust_domain_id());
        let td: TrustDomain = "east.example".parse().unwrap();
        assert_eq!(
            SpiffeId::gateway(&td).as_str(),
            "spiffe://east.example/meshgate/gateway"
        );
        assert_eq!(
            SpiffeId::new(&td, "/x/y").unwrap().as_str(),
            "spiffe://east.example/x/y"
        );
    }

    #[test]
    fn rejects_empty() {
        assert_eq!(err(""), IdError::Empty);
        assert_eq!("".parse::<TrustDomain>().unwrap_err(), IdError::Empty);
    }

    #[test]
    fn rejects_wrong_scheme() {
        assert!(matches!(
            err("https://east.example/x"),
            IdError::WrongScheme { .. }
        ));
        assert!(matches!(
            err("SPIFFE://east.example/x"),
            IdError::WrongScheme { .. }
        ));
        assert!(matches!(
            err("spiffe:/east.example/x"),
            IdError::WrongScheme { .. }
        ));
        assert!(matches!(err("east.example/x"), IdError::WrongScheme { .. }));
    }

    #[test]
    fn rejects_empty_trust_domain() {
        assert!(matches!(
            err("spiffe:///x"),
            IdError::EmptyTrustDomain { .. }
        ));
        assert!(matches!(err("spiffe://"), IdError::EmptyTrustDomain { .. }));
    }

    #[test]
    fn rejects_bad_trust_domain_characters() {
        assert!(matches!(
            err("spiffe://East.example/x"),
            IdError::TrustDomainChar { ch: 'E', .. }
        ));
        assert!(matches!(
            err("spiffe://ea st/x"),
            IdError::TrustDomainChar { ch: ' ', .. }
        ));
        assert!(matches!(
            err("spiffe://ea%20st/x"),
            IdError::TrustDomainChar { ch: '%', .. }
        ));
        assert!(matches!(
            "Bad".parse::<TrustDomain>().unwrap_err(),
            IdError::TrustDomainChar { .. }
        ));
    }

    #[test]
    fn rejects_port_and_userinfo() {
        assert!(matches!(
            err("spiffe://east.example:443/x"),
            IdError::Port { .. }
        ));
        assert!(matches!(
            err("spiffe://user@east.example/x"),
            IdError::Userinfo { .. }
        ));
        assert!(matches!(
            err("spiffe://user:pw@east.example/x"),
            IdError::Userinfo { .. }
        ));
    }

    #[test]
    fn rejects_query_and_fragment() {
        assert!(matches!(
            err("spiffe://east.example/x?a=b"),
            IdError::Query { .. }
        ));
        assert!(matches!(
            err("spiffe://east.example/x#frag"),
            IdError::Fragment { .. }
        ));
        assert!(matches!(
            err("spiffe://east.example?a"),
            IdError::Query { .. }
        ));
    }

    #[test]
    fn rejects_bad_segments() {
        assert!(matches!(
            err("spiffe://east.example/a//b"),
            IdError::EmptySegment { .. }
        ));
        assert!(matches!(
            err("spiffe://east.example/a/./b"),
            IdError::DotSegment { .. }
        ));
        assert!(matches!(
            err("spiffe://east.example/a/.."),
            IdError::DotSegment { .. }
        ));
        assert!(matches!(
            err("spiffe://east.example/a/"),
            IdError::TrailingSlash { .. }
        ));
        assert!(matches!(
            err("spiffe://east.example/"),
            IdError::TrailingSlash { .. }
        ));
    }

    #[test]
    fn rejects_bad_path_characters() {
        assert!(matches!(
            err("spiffe://east.example/a b"),
            IdError::PathChar { ch: ' ', .. }
        ));
        assert!(matches!(
            err("spiffe://east.example/a%2Fb"),
            IdError::PathChar { ch: '%', .. }
        ));
        assert!(matches!(
            err("spiffe://east.example/caf\u{e9}"),
            IdError::PathChar { .. }
        ));
        assert!(matches!(
            err("spiffe://east.example/a:b"),
            IdError::PathChar { ch: ':', .. }
        ));
    }

    #[test]
    fn rejects_too_long() {
        let long = format!("spiffe://east.example/{}", "a".repeat(2048));
        assert!(matches!(err(&long), IdError::TooLong { .. }));
        let exact = format!("spiffe://e/{}", "a".repeat(MAX_SPIFFE_ID_LEN - 11));
        assert_eq!(exact.len(), MAX_SPIFFE_ID_LEN);
        assert!(exact.parse::<SpiffeId>().is_ok());
        let td = "a".repeat(256);
        assert!(matches!(
            td.parse::<TrustDomain>().unwrap_err(),
            IdError::TrustDomainTooLong { len: 256 }
        ));
    }

    #[test]
    fn new_validates_path() {
        let td: TrustDomain = "east.example".parse().unwrap();
        assert!(matches!(
            SpiffeId::new(&td, "x"),
            Err(IdError::RelativePath { .. })
        ));
        assert!(matches!(
            SpiffeId::new(&td, "/a/"),
            Err(IdError::TrailingSlash { .. })
        ));
        assert!(matches!(
            SpiffeId::new(&td, "/a?b"),
            Err(IdError::Query { .. })
        ));
    }

    #[test]
    fn serde_round_trips_and_validates() {
        let id: SpiffeId = "spiffe://east.example/ns/a/sa/b".parse().unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://east.example/ns/a/sa/b\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://east.example/a/../b\"").is_err());
        let td: TrustDomain = serde_json::from_str("\"west.example\"").unwrap();
        assert_eq!(td.as_str(), "west.example");
        assert!(serde_json::from_str::<TrustDomain>("\"West\"").is_err());
    }

    #[test]
    fn trust_domain_accepts_id_form() {
        let td: TrustDomain = "spiffe://east.example".parse().unwrap();
        assert_eq!(td.as_str(), "east.example");
        assert!("spiffe://east.example/x".parse::<TrustDomain>().is_err());
    }
}
