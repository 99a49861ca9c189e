//! Principal patterns for `--always-denies`.
//!
//! - `*`: every workload;
//! - `spiffe://TD` or `spiffe://TD/*`: every workload of trust domain TD;
//! - `spiffe://TD/ns/NS/*`: every workload of namespace NS;
//! - `spiffe://TD/ns/NS/sa/SA`: one service account;
//! - any other SPIFFE ID without `*`: that workload;
//! - a Cedar entity, e.g. `Namespace::"east.example/batch"`: every principal in it.
//!
//! TD, NS and SA may contain `*` (any run of characters): `spiffe://*.example/ns/batch/*`.
//! Workload attributes follow from the SPIFFE ID (see `model`), so the pattern is said in
//! Cedar on the attributes: `principal.trust_domain like "*.example"`, and so on.

use std::fmt;
use std::str::FromStr;

use cedar_policy::EntityUid;

use super::ProveError;
use super::model::lit;
use crate::facts::Caller;

/// A set of principals, parsed from the forms in the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalPattern {
    text: String,
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Any,
    Parts {
        td: String,
        ns: Option<String>,
        sa: Option<String>,
    },
    Exact(String),
    In(EntityUid),
}

impl FromStr for PrincipalPattern {
    type Err = ProveError;

    fn from_str(text: &str) -> Result<Self, ProveError> {
        let bad = |why: &str| ProveError::BadPattern {
            pattern: text.to_owned(),
            why: why.to_owned(),
        };
        let kind = if text == "*" {
            Kind::Any
        } else if let Some(rest) = text.strip_prefix("spiffe://") {
            let segs: Vec<&str> = rest.split('/').collect();
            let glob_ok = |s: &str, dots: bool| {
                !s.is_empty()
                    && s.bytes().all(|b| {
                        b.is_ascii_alphanumeric()
                            || matches!(b, b'-' | b'_' | b'*')
                            || (dots && b == b'.')
                    })
            };
            let td = segs.first().copied().unwrap_or_default();
            if !glob_ok(td, true) || td.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(bad(
                    "has no valid trust domain (lowercase letters, digits, `.-_*`)",
                ));
            }
            let part = |s: &str| s.to_owned();
            match segs.as_slice() {
                [_] | [_, "*"] => Kind::Parts {
                    td: part(td),
                    ns: None,
                    sa: None,
                },
                [_, "ns", ns, "*"] if glob_ok(ns, true) => Kind::Parts {
                    td: part(td),
                    ns: Some(part(ns)),
                    sa: None,
                },
                [_, "ns", ns, "sa", sa] if glob_ok(ns, true) && glob_ok(sa, true) => Kind::Parts {
                    td: part(td),
                    ns: Some(part(ns)),
                    sa: Some(part(sa)),
                },
                _ if !text.contains('*') && Caller::parse(text).is_ok() => {
                    Kind::Exact(text.to_owned())
                }
                _ => {
                    return Err(bad(
                        "is not one of `spiffe://TD/*`, `spiffe://TD/ns/NS/*`, \
                         `spiffe://TD/ns/NS/sa/SA` (with `*` inside TD, NS, SA) or an exact SPIFFE ID",
                    ));
                }
            }
        } else {
            match EntityUid::from_str(text) {
                Ok(uid) => Kind::In(uid),
                Err(_) => {
                    return Err(bad(
                        "is neither `*`, a SPIFFE ID pattern (`spiffe://east.example/ns/batch/*`) \
                         nor a Cedar entity (`Namespace::\"east.example/batch\"`)",
                    ));
                }
            }
        };
        Ok(Self {
            text: text.to_owned(),
            kind,
        })
    }
}

impl fmt::Display for PrincipalPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PrincipalPattern {
    /// A guard condition: forbid every request whose principal does not match.
    pub(crate) fn guard(&self) -> String {
        let cond = match &self.kind {
            Kind::Any => "true".to_owned(),
            Kind::Parts { td, ns, sa } => {
                let mut c = format!("principal.trust_domain like {}", lit(td));
                if let Some(ns) = ns {
                    c.push_str(&format!(
                        " && principal has namespace && principal.namespace like {}",
                        lit(ns)
                    ));
                }
                if let Some(sa) = sa {
                    c.push_str(&format!(
                        " && principal has service_account && principal.service_account like {}",
                        lit(sa)
                    ));
                }
                c
            }
            Kind::Exact(id) => format!("principal == Workload::{}", lit(id)),
            Kind::In(uid) => format!("principal in {uid}"),
        };
        format!("unless {{ {cond} }}")
    }

    /// Whether a SPIFFE ID matches (for checking a counterexample; entity patterns are not
    /// decided here and count as matching).
    pub fn matches(&self, id: &str) -> bool {
        match &self.kind {
            Kind::Any | Kind::In(_) => true,
            Kind::Exact(e) => e == id,
            Kind::Parts { td, ns, sa } => {
                let Ok(c) = Caller::parse(id) else {
                    return false;
                };
                let opt = |pat: &Option<String>, v: &Option<String>| match (pat, v) {
                    (None, _) => true,
                    (Some(p), Some(v)) => glob(p, v),
                    (Some(_), None) => false,
                };
                glob(td, &c.trust_domain) && opt(ns, &c.namespace) && opt(sa, &c.service_account)
            }
        }
    }
}

/// `*` matches any run of characters, like Cedar's `like`.
fn glob(pattern: &str, s: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == s,
        Some((head, tail)) => {
            let Some(rest) = s.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .filter(|i| rest.is_char_boundary(*i))
                .any(|i| glob(tail, rest.get(i..).unwrap_or_default()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse_and_match() {
        let p: PrincipalPattern = "spiffe://east.example/ns/batch/*".parse().unwrap();
        assert!(p.matches("spiffe://east.example/ns/batch/sa/report"));
        assert!(!p.matches("spiffe://east.example/ns/shop/sa/web"));
        assert!(!p.matches("spiffe://east.example/meshgate/gateway"));
        let p: PrincipalPattern = "spiffe://*.example/*".parse().unwrap();
        assert!(p.matches("spiffe://west.example/meshgate/gateway"));
        assert!(!p.matches("spiffe://west.org/x"));
        let p: PrincipalPattern = "spiffe://east.example/meshgate/gateway".parse().unwrap();
        assert_eq!(
            p.guard(),
            r#"unless { principal == Workload::"spiffe://east.example/meshgate/gateway" }"#
        );
        assert!(matches!(
            "Namespace::\"east.example/batch\"".parse::<PrincipalPattern>(),
            Ok(PrincipalPattern {
                kind: Kind::In(_),
                ..
            })
        ));
        for bad in [
            "spiffe://East/*",
            "spiffe://east.example/x/*",
            "batch",
            "spiffe://",
        ] {
            let err = bad.parse::<PrincipalPattern>().unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("principal pattern `{bad}`")),
                "{err}"
            );
        }
    }
}
