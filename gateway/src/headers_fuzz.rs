//! Property-based fuzzing of header hygiene: for any header map, no `x-meshgate-*` field
//! survives the source gateway's stripping (in headers or trailers), every other field is
//! kept as it was, and the other header checks never panic.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use meshgate_fuzz::config;
use proptest::prelude::*;

use super::*;

/// Header names: identity headers in any case and spelling near them, hop-by-hop and
/// framing headers, and random tokens.
fn name() -> impl Strategy<Value = HeaderName> {
    let near = proptest::sample::select(
        &[
            "x-meshgate-caller",
            "X-Meshgate-Caller",
            "X-MESHGATE-DECISION-ID",
            "x-meshgate-",
            "x-meshgate",
            "x-meshgatex",
            "x-meshgate--",
            "xx-meshgate-caller",
            "x_meshgate_caller",
            "connection",
            "te",
            "transfer-encoding",
            "content-length",
            "keep-alive",
            "upgrade",
            "proxy-authorization",
            "authorization",
            "cookie",
            "traceparent",
            "host",
            "accept",
        ][..],
    )
    .prop_map(str::to_owned);
    let token = "[!#$%&'*+.^_`|~0-9A-Za-z-]{1,20}";
    prop_oneof![
        3 => near,
        2 => token.prop_map(|t| format!("x-meshgate-{t}")),
        2 => token.prop_map(|t| t),
    ]
    .prop_filter_map("not a header name", |n| {
        HeaderName::from_bytes(n.as_bytes()).ok()
    })
}

/// Header values: visible ASCII, comma lists of header names, or any bytes HTTP allows.
fn value() -> impl Strategy<Value = HeaderValue> {
    prop_oneof![
        3 => "[ -~]{0,30}",
        2 => "(x-meshgate-caller|x-secret|te|trailers|close|keep-alive|accept|, ){0,5}",
        1 => "00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]",
        // Any bytes, control characters (which HTTP refuses) made visible.
        1 => proptest::collection::vec(any::<u8>(), 0..30).prop_map(|b| {
            String::from_utf8_lossy(&b)
                .chars()
                .map(|c| if c.is_ascii_control() && c != '\t' { '!' } else { c })
                .collect::<String>()
        }),
    ]
    .prop_filter_map("not a header value", |v| HeaderValue::from_str(&v).ok())
}

fn header_map() -> impl Strategy<Value = HeaderMap> {
    proptest::collection::vec((name(), value()), 0..16).prop_map(|fields| {
        let mut map = HeaderMap::new();
        for (n, v) in fields {
            map.append(n, v);
        }
        map
    })
}

fn is_meshgate(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-meshgate-")
}

/// The values of every field of `before` whose name passes `keep`, by name. The order of
/// values under one name is kept (it is meaningful); the order between names is not.
fn fields(
    before: &HeaderMap,
    keep: impl Fn(&HeaderName) -> bool,
) -> BTreeMap<String, Vec<Vec<u8>>> {
    let mut out: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for (n, v) in before.iter().filter(|(n, _)| keep(n)) {
        out.entry(n.as_str().to_owned())
            .or_default()
            .push(v.as_bytes().to_vec());
    }
    out
}

/// Spellings of a path into `/.meshgate/`: the prefix spelled with dot segments, duplicate
/// slashes or percent-encodings, then a tail that may hold a double encoding or a `;`.
fn reserved_spelling() -> impl Strategy<Value = String> {
    let token = proptest::sample::select(
        &[
            "/",
            ".",
            "..",
            "%2e",
            "%2E",
            "%2f",
            "%25",
            "61",
            "%2561",
            "x",
            "v1",
            ";",
            "?",
            "m",
            "%6d",
            "meshgate",
            ".meshgate",
        ][..],
    );
    let prefix = proptest::sample::select(
        &[
            "/.meshgate",
            "/%2emeshgate",
            "/%2Emeshgate",
            "//.meshgate",
            "/x/../.meshgate",
            "/./.meshgate",
            "/.%6deshgate",
            "/%2e%6deshgate",
            "",
        ][..],
    );
    (
        proptest::collection::vec(token.clone(), 0..4),
        prefix,
        proptest::collection::vec(token, 0..8),
    )
        .prop_map(|(before, prefix, after)| {
            let mut s = before.concat();
            s.push_str(prefix);
            s.push_str(&after.concat());
            if !s.starts_with('/') {
                s.insert(0, '/');
            }
            s
        })
}

proptest! {
    #![proptest_config(config(1000))]

    #[test]
    fn fuzz_strip_meshgate_removes_only_identity_headers(map in header_map()) {
        let mut stripped = map.clone();
        strip_meshgate(&mut stripped);
        prop_assert!(!stripped.keys().any(is_meshgate));
        prop_assert_eq!(fields(&stripped, |_| true), fields(&map, |n| !is_meshgate(n)));
    }

    #[test]
    fn fuzz_source_header_path(map in header_map()) {
        // The source gateway's order: identity headers out, then hop-by-hop ones.
        let mut h = map.clone();
        strip_meshgate(&mut h);
        let connection_named: Vec<String> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|n| n.trim().to_ascii_lowercase())
            .collect();
        strip_hop_by_hop(&mut h);
        prop_assert!(!h.keys().any(is_meshgate));
        for name in HOP_BY_HOP {
            if name == "te" {
                prop_assert!(h.get_all(name).iter().all(|v| v == "trailers"));
            } else {
                prop_assert!(!h.contains_key(name), "{name} kept");
            }
        }
        // Everything else arrives unchanged.
        let ordinary = |n: &HeaderName| {
            !is_meshgate(n)
                && !HOP_BY_HOP.contains(&n.as_str())
                && !connection_named.iter().any(|c| c == n.as_str())
        };
        prop_assert_eq!(fields(&h, |n| ordinary(n)), fields(&map, ordinary));
        // What Cedar sees never holds an identity header or a credential.
        for (n, _) in policy_headers(&map) {
            prop_assert!(!n.starts_with("x-meshgate-") && n != "authorization" && n != "cookie");
        }
        let _ = check_framing(&map);
        let _ = check_values(&map);
        let mut traced = map.clone();
        let trace_id = ensure_traceparent(&mut traced);
        let header = traced.get(TRACEPARENT).and_then(|v| v.to_str().ok()).unwrap_or_default();
        prop_assert_eq!(parse_traceparent(header), Some(trace_id));
    }

    #[test]
    fn fuzz_trailers_lose_identity_fields(map in header_map()) {
        use http_body_util::BodyExt;
        let body = crate::body::full("data")
            .with_trailers(std::future::ready(Some(Ok(map.clone()))))
            .boxed();
        let runtime = tokio::runtime::Builder::new_current_thread().build()?;
        let collected = runtime.block_on(strip_meshgate_trailers(body).collect());
        let trailers = collected
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .trailers()
            .cloned()
            .unwrap_or_default();
        prop_assert!(!trailers.keys().any(is_meshgate));
        prop_assert_eq!(fields(&trailers, |_| true), fields(&map, |n| !is_meshgate(n)));
    }

    #[test]
    fn fuzz_reserved_path_spellings(raw in reserved_spelling()) {
        // Under either path rule set (an operator may allow double encodings), a path that
        // normalizes into the control space is reserved.
        let reserved = is_reserved_path(&raw);
        for allow in [false, true] {
            let rules = meshgate_policy::PathRules::allowing_double_encoding(allow);
            if meshgate_policy::normalize_path_with(&raw, rules)
                .is_ok_and(|p| p == "/.meshgate" || p.starts_with("/.meshgate/"))
            {
                prop_assert!(reserved, "{raw:?} reaches the control space unnoticed");
            }
        }
    }
}
