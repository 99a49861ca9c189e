//! JWT-SVID verification: no panic on any token, no modified token accepted, and tokens the
//! issuer signs are accepted exactly when audience and times say so.

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use meshgate_fuzz::{json_value, mutate, mutations, runner};
use meshgate_identity::{BundleSet, SpiffeId, verify_jwt_svid};
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::common::{ca, id};

const AUD: &str = "spiffe://west.example/ns/shop/svc/orders";
const LEEWAY: Duration = Duration::from_secs(5);
const WORDS: &[&str] = &[
    "alg", "ES256", "none", "HS256", "ES384", "RS256", "kid", "typ", "JWT", "sub", "aud", "exp",
    "iat", "amr", AUD,
];

fn web() -> SpiffeId {
    id("spiffe://east.example/ns/shop/sa/web")
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

/// A change to one decoded part of a token, re-encoded, with the original signature kept.
#[derive(Debug, Clone)]
enum Edit {
    /// Set (or, with `None`, remove) a header field.
    Header(&'static str, Option<Value>),
    /// Set (or remove) a claim.
    Claim(&'static str, Option<Value>),
    /// Replace a whole part with these bytes, base64url-encoded.
    Part(usize, Vec<u8>),
    /// Byte edits of the whole token text.
    Bytes(Vec<meshgate_fuzz::Mutation>),
}

fn edit() -> impl Strategy<Value = Edit> {
    let alg = prop_oneof![
        Just(json!("none")),
        Just(json!("HS256")),
        Just(json!("ES384")),
        Just(json!("es256")),
        Just(json!("ES256 ")),
        Just(json!(["ES256"])),
        json_value(WORDS, 1),
    ];
    let kid = prop_oneof![
        Just(json!("")),
        "[A-Za-z0-9_-]{1,40}".prop_map(Value::from),
        json_value(WORDS, 1)
    ];
    let aud = prop_oneof![
        Just(json!("spiffe://west.example/ns/shop/svc/payments")),
        Just(json!([])),
        Just(json!([AUD, 1])),
        Just(json!(AUD.to_uppercase())),
        json_value(WORDS, 2),
    ];
    let time = prop_oneof![
        any::<u64>().prop_map(Value::from),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
        Just(json!(1e30)),
        Just(json!("9999999999")),
    ];
    let sub = prop_oneof![
        Just(json!("spiffe://east.example/ns/shop/sa/admin")),
        Just(json!("spiffe://west.example/ns/shop/sa/web")),
        Just(json!("spiffe://east.example/meshgate/gateway")),
        json_value(WORDS, 1),
    ];
    prop_oneof![
        2 => alg.prop_map(|v| Edit::Header("alg", Some(v))),
        1 => Just(Edit::Header("alg", None)),
        2 => kid.prop_map(|v| Edit::Header("kid", Some(v))),
        1 => Just(Edit::Header("kid", None)),
        1 => json_value(WORDS, 2).prop_map(|v| Edit::Header("typ", Some(v))),
        2 => aud.prop_map(|v| Edit::Claim("aud", Some(v))),
        1 => Just(Edit::Claim("aud", None)),
        2 => time.clone().prop_map(|v| Edit::Claim("exp", Some(v))),
        1 => Just(Edit::Claim("exp", None)),
        1 => time.prop_map(|v| Edit::Claim("iat", Some(v))),
        2 => sub.prop_map(|v| Edit::Claim("sub", Some(v))),
        1 => json_value(WORDS, 2).prop_map(|v| Edit::Claim("amr", Some(v))),
        1 => (0..3usize, proptest::collection::vec(any::<u8>(), 0..80)).prop_map(|(i, b)| Edit::Part(i, b)),
        6 => mutations(3).prop_map(Edit::Bytes),
    ]
}

fn apply(token: &str, edit: &Edit) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let decode = |i: usize| -> serde_json::Map<String, Value> {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[i]).unwrap()).unwrap()
    };
    let with = |i: usize, name: &str, value: &Option<Value>| {
        let mut obj = decode(i);
        match value {
            Some(v) => obj.insert(name.to_owned(), v.clone()),
            None => obj.remove(name),
        };
        let mut out: Vec<String> = parts.iter().map(|p| (*p).to_owned()).collect();
        out[i] = b64(&Value::Object(obj));
        out.join(".")
    };
    match edit {
        Edit::Header(name, value) => with(0, name, value),
        Edit::Claim(name, value) => with(1, name, value),
        Edit::Part(i, bytes) => {
            let mut out: Vec<String> = parts.iter().map(|p| (*p).to_owned()).collect();
            out[*i] = URL_SAFE_NO_PAD.encode(bytes);
            out.join(".")
        }
        Edit::Bytes(m) => String::from_utf8_lossy(&mutate(token.as_bytes(), m)).into_owned(),
    }
}

#[test]
fn fuzz_jwt_modified_tokens_are_refused() {
    let ca = ca("east.example");
    let now = SystemTime::now();
    let token = ca
        .issuer
        .mint_jwt_svid(&web(), &[AUD.to_owned()], Duration::from_secs(300), now)
        .unwrap()
        .token;
    let bundles = BundleSet::from_bundles([ca.issuer.bundle()]);
    assert!(verify_jwt_svid(&token, &bundles, AUD, now, LEEWAY).is_ok());
    runner(800)
        .run(&proptest::collection::vec(edit(), 1..3), |edits| {
            let mut forged = token.clone();
            for e in &edits {
                forged = apply(&forged, e);
                if forged.split('.').count() != 3 || !is_json_parts(&forged) {
                    break;
                }
            }
            let verdict = verify_jwt_svid(&forged, &bundles, AUD, now, LEEWAY);
            if forged == token {
                prop_assert!(verdict.is_ok());
            } else {
                prop_assert!(verdict.is_err(), "modified token accepted: {forged}");
            }
            Ok(())
        })
        .unwrap();
}

/// Whether the header and payload still decode to JSON objects (so `apply` may go on).
fn is_json_parts(token: &str) -> bool {
    token.split('.').take(2).all(|p| {
        URL_SAFE_NO_PAD
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Map<String, Value>>(&b).ok())
            .is_some()
    })
}

#[test]
fn fuzz_jwt_arbitrary_tokens_are_refused() {
    let ca = ca("east.example");
    let now = SystemTime::now();
    let bundles = BundleSet::from_bundles([ca.issuer.bundle()]);
    let kid = ca.issuer.bundle().jwt_keys().keys().next().unwrap().clone();
    // Three parts whose header names the real key, or anything at all.
    let shaped = (
        json_value(WORDS, 3),
        json_value(WORDS, 3),
        proptest::collection::vec(any::<u8>(), 0..80),
    )
        .prop_map(move |(h, p, sig)| {
            let mut header = json!({ "alg": "ES256", "kid": kid });
            if let (Some(obj), Value::Object(extra)) = (header.as_object_mut(), h) {
                obj.extend(extra);
            }
            format!(
                "{}.{}.{}",
                b64(&header),
                b64(&p),
                URL_SAFE_NO_PAD.encode(sig)
            )
        });
    let strategy = prop_oneof![
        any::<String>(),
        "[A-Za-z0-9_=.-]{0,300}",
        shaped,
        (0usize..20_000).prop_map(|n| "a".repeat(n)),
    ];
    runner(800)
        .run(&strategy, |token| {
            prop_assert!(verify_jwt_svid(&token, &bundles, AUD, now, LEEWAY).is_err());
            Ok(())
        })
        .unwrap();
}

#[test]
fn fuzz_jwt_issued_tokens_follow_audience_and_time() {
    let ca = ca("east.example");
    let base = SystemTime::now();
    let bundles = BundleSet::from_bundles([ca.issuer.bundle()]);
    let strategy = (
        proptest::collection::vec(
            prop_oneof![Just(AUD.to_owned()), "spiffe://west\\.example/[a-z]{1,6}"],
            1..4,
        ),
        1u64..600,
        0u64..1200,
    );
    runner(300)
        .run(&strategy, |(aud, ttl, later)| {
            let svid = ca
                .issuer
                .mint_jwt_svid(&web(), &aud, Duration::from_secs(ttl), base)
                .unwrap();
            let at = base + Duration::from_secs(later);
            let verdict = verify_jwt_svid(&svid.token, &bundles, AUD, at, LEEWAY);
            let iat = base
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let now = iat + later;
            let should = aud.iter().any(|a| a == AUD) && iat + ttl + LEEWAY.as_secs() > now;
            prop_assert_eq!(verdict.is_ok(), should, "{:?}", verdict);
            if let Ok(claims) = verdict {
                prop_assert_eq!(claims.sub, web());
                prop_assert_eq!(claims.aud, aud);
            }
            Ok(())
        })
        .unwrap();
}
