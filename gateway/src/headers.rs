//! Header hygiene at the gateway: identity headers clients may not send, hop-by-hop headers,
//! ambiguous HTTP/1.1 framing (request smuggling), trace context and request ids.

use http::{HeaderMap, HeaderName, HeaderValue, header};

/// The verified caller SPIFFE ID, for the upstream.
pub const CALLER_HEADER: &str = "x-meshgate-caller";
/// The decision record's id, on every response that passed enforcement.
pub const DECISION_ID_HEADER: &str = "x-meshgate-decision-id";
/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// Removes every `x-meshgate-*` header: a client can never claim an identity or a decision.
pub fn strip_meshgate(headers: &mut HeaderMap) {
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|n| n.as_str().starts_with("x-meshgate-"))
        .cloned()
        .collect();
    for name in names {
        headers.remove(&name);
    }
}

/// The same body with every `x-meshgate-*` field removed from its trailers: trailers travel
/// end to end like headers, so a client (or an upstream) could otherwise claim an identity
/// or a decision in them.
pub fn strip_meshgate_trailers(body: crate::body::GatewayBody) -> crate::body::GatewayBody {
    use http_body_util::BodyExt;
    body.map_frame(|frame| match frame.into_trailers() {
        Ok(mut trailers) => {
            strip_meshgate(&mut trailers);
            hyper::body::Frame::trailers(trailers)
        }
        Err(frame) => frame,
    })
    .boxed()
}

/// Removes hop-by-hop headers, including those named by `Connection`. `te: trailers` is kept
/// (gRPC needs it end to end).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let keep_te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if keep_te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Why a request's framing is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FramingError {
    /// Both `Content-Length` and `Transfer-Encoding`: the classic smuggling vector.
    #[error("ambiguous framing: both `content-length` and `transfer-encoding`")]
    LengthAndChunked,
    /// More than one `Content-Length` value.
    #[error("ambiguous framing: more than one `content-length`")]
    DuplicateLength,
}

/// Refuses ambiguous HTTP/1.1 framing (RFC 9112 §6.3; request smuggling).
pub fn check_framing(headers: &HeaderMap) -> Result<(), FramingError> {
    let lengths: Vec<&HeaderValue> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    if !lengths.is_empty() && headers.contains_key(header::TRANSFER_ENCODING) {
        return Err(FramingError::LengthAndChunked);
    }
    let values = lengths
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .count();
    if values > 1 {
        return Err(FramingError::DuplicateLength);
    }
    Ok(())
}

/// Refuses header values that are not visible ASCII (obs-text, bytes ≥ 0x80): Cedar sees
/// headers as strings, and what a policy sees must equal what is forwarded.
pub fn check_values(headers: &HeaderMap) -> Result<(), String> {
    match headers.iter().find(|(_, v)| v.to_str().is_err()) {
        Some((name, _)) => Err(format!(
            "header `{name}` has a value that is not visible ASCII"
        )),
        None => Ok(()),
    }
}

/// The trace id of a valid `traceparent`, creating the header if missing or malformed.
pub fn ensure_traceparent(headers: &mut HeaderMap) -> String {
    if let Some(trace_id) = headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent)
    {
        return trace_id;
    }
    let trace_id = hex::encode(rand::random::<[u8; 16]>());
    let span_id = hex::encode(rand::random::<[u8; 8]>());
    if let Ok(value) = HeaderValue::from_str(&format!("00-{trace_id}-{span_id}-01")) {
        headers.insert(TRACEPARENT, value);
    }
    trace_id
}

/// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`; all-zero ids are invalid.
fn parse_traceparent(value: &str) -> Option<String> {
    let parts: Vec<&str> = value.trim().split('-').collect();
    let [version, trace, span, flags] = parts.as_slice() else {
        return None;
    };
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = hex(version, 2)
        && *version != "ff"
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && span.bytes().any(|b| b != b'0');
    ok.then(|| (*trace).to_owned())
}

/// Whether a request path addresses the reserved `/.meshgate/` control space, however it
/// is spelled (dot segments, duplicate slashes, percent-encoding). Judged under the most
/// permissive path rules (double encodings allowed), so an operator's
/// `paths.allow_double_encoding` cannot open a way around it.
pub fn is_reserved_path(raw: &str) -> bool {
    let reserved = |p: &str| p == "/.meshgate" || p.starts_with("/.meshgate/");
    let permissive = meshgate_policy::PathRules::allowing_double_encoding(true);
    reserved(raw)
        || meshgate_policy::normalize_path_with(raw, permissive).is_ok_and(|p| reserved(&p))
}

/// A new request/decision id: 128 random bits, hex.
pub fn new_request_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// The headers exposed to Cedar: lowercased names, UTF-8 values only.
pub fn policy_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(n, _)| {
            !n.as_str().starts_with("x-meshgate-")
                && *n != header::AUTHORIZATION
                && *n != header::COOKIE
        })
        .filter_map(|(n, v)| {
            v.to_str()
                .ok()
                .map(|v| (n.as_str().to_owned(), v.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_identity_and_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-meshgate-caller",
            HeaderValue::from_static("spiffe://evil/ns/x/sa/y"),
        );
        h.insert("X-Meshgate-Decision-Id", HeaderValue::from_static("forged"));
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers, deflate"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_meshgate(&mut h);
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-meshgate-caller").is_none());
        assert!(h.get("x-meshgate-decision-id").is_none());
        assert!(h.get("x-secret").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert_eq!(h.get("accept").unwrap(), "*/*");
    }

    #[test]
    fn refuses_ambiguous_framing() {
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from_static("5"));
        assert_eq!(check_framing(&h), Ok(()));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        assert_eq!(check_framing(&h), Err(FramingError::LengthAndChunked));
        let mut h = HeaderMap::new();
        h.append("content-length", HeaderValue::from_static("5"));
        h.append("content-length", HeaderValue::from_static("6"));
        assert_eq!(check_framing(&h), Err(FramingError::DuplicateLength));
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from_static("5, 5"));
        assert_eq!(check_framing(&h), Err(FramingError::DuplicateLength));
    }

    #[test]
    fn reserved_paths_in_any_spelling() {
        for p in [
            "/.meshgate/v1/bundle",
            "/.meshgate",
            "//.meshgate/x",
            "/a/../.meshgate/x",
            "/%2emeshgate/x",
            "/./.meshgate/x",
            // Fails the default rules (a double encoding) but is reserved all the same.
            "/%2Emeshgate/x%2561",
        ] {
            assert!(is_reserved_path(p), "{p}");
        }
        for p in ["/meshgate/x", "/v1/.meshgate", "/.meshgatex"] {
            assert!(!is_reserved_path(p), "{p}");
        }
    }

    #[test]
    fn traceparent_kept_or_created() {
        let mut h = HeaderMap::new();
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert(TRACEPARENT, HeaderValue::from_static(valid));
        assert_eq!(
            ensure_traceparent(&mut h),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        for bad in [
            "",
            "00-0000-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "zz",
        ] {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, HeaderValue::from_str(bad).unwrap());
            let id = ensure_traceparent(&mut h);
            assert_eq!(id.len(), 32);
            assert_ne!(h.get(TRACEPARENT).unwrap(), bad);
            assert!(parse_traceparent(h.get(TRACEPARENT).unwrap().to_str().unwrap()).is_some());
        }
    }
}

#[cfg(test)]
#[path = "headers_fuzz.rs"]
mod fuzz;
