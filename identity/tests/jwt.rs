#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! JWT-SVIDs: minted by the real issuer, each forgery rejected with a precise error.

mod common;

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{ca, id};
use meshgate_identity::{BundleSet, JwtSvidError, verify_jwt_svid};

const AUD: &str = "spiffe://west.example/ns/shop/svc/orders";
const LEEWAY: Duration = Duration::from_secs(5);

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

fn setup() -> (common::Ca, BundleSet, String, SystemTime) {
    let ca = ca("east.example");
    let now = SystemTime::now();
    let token = ca
        .issuer
        .mint_jwt_svid(
            &id("spiffe://east.example/ns/shop/sa/web"),
            &[AUD.to_owned()],
            Duration::from_secs(300),
            now,
        )
        .unwrap()
        .token;
    let bundles = BundleSet::from_bundles([ca.issuer.bundle()]);
    (ca, bundles, token, now)
}

#[test]
fn valid_token_verifies() {
    let (_ca, bundles, token, now) = setup();
    let claims = verify_jwt_svid(&token, &bundles, AUD, now, LEEWAY).unwrap();
    assert_eq!(claims.sub.as_str(), "spiffe://east.example/ns/shop/sa/web");
    assert_eq!(claims.aud, [AUD]);
    assert!(claims.exp > now);
    let header: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "ES256");
    assert!(header["kid"].is_string());
}

#[test]
fn expired_token_is_rejected() {
    let (_ca, bundles, token, now) = setup();
    let later = now + Duration::from_secs(300) + LEEWAY + Duration::from_secs(1);
    assert_eq!(
        verify_jwt_svid(&token, &bundles, AUD, later, LEEWAY),
        Err(JwtSvidError::Expired)
    );
    // Within the leeway it still passes.
    assert!(
        verify_jwt_svid(
            &token,
            &bundles,
            AUD,
            now + Duration::from_secs(302),
            LEEWAY
        )
        .is_ok()
    );
}

#[test]
fn token_from_the_future_is_rejected() {
    let (_ca, bundles, token, now) = setup();
    let before = now - Duration::from_secs(60);
    assert_eq!(
        verify_jwt_svid(&token, &bundles, AUD, before, LEEWAY),
        Err(JwtSvidError::IssuedInFuture)
    );
}

#[test]
fn wrong_audience_is_rejected() {
    let (_ca, bundles, token, now) = setup();
    let e = verify_jwt_svid(
        &token,
        &bundles,
        "spiffe://west.example/ns/shop/svc/other",
        now,
        LEEWAY,
    )
    .unwrap_err();
    assert!(matches!(e, JwtSvidError::WrongAudience { .. }));
}

#[test]
fn unknown_kid_is_rejected() {
    let (_ca, bundles, token, now) = setup();
    let parts: Vec<&str> = token.split('.').collect();
    let header = b64(&serde_json::json!({"alg": "ES256", "kid": "nope", "typ": "JWT"}));
    let forged = format!("{header}.{}.{}", parts[1], parts[2]);
    let e = verify_jwt_svid(&forged, &bundles, AUD, now, LEEWAY).unwrap_err();
    assert!(
        matches!(e, JwtSvidError::UnknownKeyId { ref kid, .. } if kid == "nope"),
        "{e}"
    );
    let no_kid = format!(
        "{}.{}.{}",
        b64(&serde_json::json!({"alg": "ES256"})),
        parts[1],
        parts[2]
    );
    assert_eq!(
        verify_jwt_svid(&no_kid, &bundles, AUD, now, LEEWAY),
        Err(JwtSvidError::MissingKid)
    );
}

#[test]
fn alg_none_is_rejected() {
    let (_ca, bundles, token, now) = setup();
    let parts: Vec<&str> = token.split('.').collect();
    let header = b64(&serde_json::json!({"alg": "none", "typ": "JWT"}));
    let forged = format!("{header}.{}.", parts[1]);
    let e = verify_jwt_svid(&forged, &bundles, AUD, now, LEEWAY).unwrap_err();
    assert_eq!(e, JwtSvidError::UnsupportedAlgorithm { alg: "none".into() });
}

#[test]
fn hs256_signed_with_the_public_key_is_rejected() {
    let (ca, bundles, token, now) = setup();
    let bundle = ca.issuer.bundle();
    let (kid, key) = bundle.jwt_keys().iter().next().unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(kid.clone());
    let forged = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key.point()),
    )
    .unwrap();
    let e = verify_jwt_svid(&forged, &bundles, AUD, now, LEEWAY).unwrap_err();
    assert_eq!(
        e,
        JwtSvidError::UnsupportedAlgorithm {
            alg: "HS256".into()
        }
    );
}

#[test]
fn tampered_payload_is_rejected() {
    let (_ca, bundles, token, now) = setup();
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["sub"] = "spiffe://east.example/ns/shop/sa/admin".into();
    let forged = format!("{}.{}.{}", parts[0], b64(&claims), parts[2]);
    assert_eq!(
        verify_jwt_svid(&forged, &bundles, AUD, now, LEEWAY),
        Err(JwtSvidError::BadSignature)
    );
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[10] ^= 1;
    let forged = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
    assert_eq!(
        verify_jwt_svid(&forged, &bundles, AUD, now, LEEWAY),
        Err(JwtSvidError::BadSignature)
    );
}

#[test]
fn token_from_a_trust_domain_not_in_the_set_is_rejected() {
    let (_ca, bundles, _token, now) = setup();
    let west = ca("west.example");
    let token = west
        .issuer
        .mint_jwt_svid(
            &id("spiffe://west.example/a"),
            &[AUD.to_owned()],
            Duration::from_secs(60),
            now,
        )
        .unwrap()
        .token;
    let e = verify_jwt_svid(&token, &bundles, AUD, now, LEEWAY).unwrap_err();
    assert_eq!(
        e,
        JwtSvidError::UnknownTrustDomain {
            trust_domain: "west.example".into()
        }
    );
    // A west token re-labelled as east fails on its key, not silently.
    bundles.insert(west.issuer.bundle());
    assert!(verify_jwt_svid(&token, &bundles, AUD, now, LEEWAY).is_ok());
    assert!(bundles.remove(&"west.example".parse().unwrap()));
    assert!(
        verify_jwt_svid(&token, &bundles, AUD, now, LEEWAY).is_err(),
        "removing a bundle distrusts at once"
    );
}

#[test]
fn malformed_tokens_are_rejected() {
    let (_ca, bundles, _token, now) = setup();
    for bad in ["", "a.b", "a.b.c.d", "!!.??.##", &"a".repeat(9000)] {
        assert!(
            verify_jwt_svid(bad, &bundles, AUD, now, LEEWAY).is_err(),
            "{bad:.20}"
        );
    }
    let mint = _ca.issuer.mint_jwt_svid(
        &id("spiffe://east.example/a"),
        &[],
        Duration::from_secs(60),
        now,
    );
    assert!(mint.is_err(), "an empty audience is refused");
}
