#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! SPIFFE trust bundles: round trips and malformed documents.

mod common;

use common::ca;
use meshgate_identity::{BundleError, TrustBundle, TrustDomain};
use serde_json::json;

fn td() -> TrustDomain {
    "east.example".parse().unwrap()
}

#[test]
fn spiffe_json_round_trips() {
    let ca = ca("east.example");
    let bundle = ca.issuer.bundle();
    let text = bundle.to_spiffe_json();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let keys = doc["keys"].as_array().unwrap();
    assert!(keys.iter().any(|k| k["use"] == "x509-svid"
        && k["x5c"].as_array().unwrap().len() == 1
        && k["crv"] == "P-256"));
    assert!(
        keys.iter()
            .any(|k| k["use"] == "jwt-svid" && k["kid"].is_string() && k["kty"] == "EC")
    );
    assert_eq!(doc["spiffe_sequence"], 1);
    assert_eq!(doc["spiffe_refresh_hint"], 300);
    let back = TrustBundle::from_spiffe_json(&text, &td()).unwrap();
    assert_eq!(back.x509_roots(), bundle.x509_roots());
    assert_eq!(back.jwt_keys(), bundle.jwt_keys());
    assert_eq!(back.sequence(), 1);
    assert_eq!(back.to_spiffe_json(), text);
}

#[test]
fn pem_round_trips_and_infers_the_trust_domain() {
    let ca = ca("east.example");
    let pem = ca.issuer.bundle().to_pem();
    let back = TrustBundle::from_pem(pem.as_bytes(), td()).unwrap();
    assert_eq!(back.x509_roots(), ca.issuer.bundle().x509_roots());
    let inferred = TrustBundle::from_pem_infer(pem.as_bytes()).unwrap();
    assert_eq!(inferred.trust_domain(), &td());
    assert!(matches!(
        TrustBundle::from_pem(b"nothing here", td()),
        Err(BundleError::Pem { .. })
    ));
}

fn parse(v: serde_json::Value) -> BundleError {
    TrustBundle::from_spiffe_json(&v.to_string(), &td()).unwrap_err()
}

#[test]
fn malformed_bundles_are_rejected() {
    let ca = ca("east.example");
    let good: serde_json::Value =
        serde_json::from_str(&ca.issuer.bundle().to_spiffe_json()).unwrap();
    let root = good["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["use"] == "x509-svid")
        .unwrap()
        .clone();
    let jwt = good["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["use"] == "jwt-svid")
        .unwrap()
        .clone();

    assert!(matches!(
        TrustBundle::from_spiffe_json("not json", &td()),
        Err(BundleError::Json { .. })
    ));
    assert!(matches!(parse(json!([])), BundleError::Json { .. }));
    assert!(matches!(
        parse(json!({"spiffe_sequence": 1})),
        BundleError::Json { .. }
    ));
    assert!(matches!(
        parse(json!({"keys": [], "spiffe_sequence": -1})),
        BundleError::Json { .. }
    ));
    assert!(matches!(
        parse(json!({"keys": [{"kty": "EC"}]})),
        BundleError::UnknownUse { index: 0, .. }
    ));
    assert!(matches!(
        parse(json!({"keys": [{"use": "sig"}]})),
        BundleError::UnknownUse { .. }
    ));

    let mut two = root.clone();
    two["x5c"] = json!([root["x5c"][0], root["x5c"][0]]);
    assert_eq!(
        parse(json!({"keys": [two]})),
        BundleError::X5cCount { index: 0, count: 2 }
    );
    let mut none = root.clone();
    none.as_object_mut().unwrap().remove("x5c");
    assert_eq!(
        parse(json!({"keys": [none]})),
        BundleError::X5cCount { index: 0, count: 0 }
    );
    let mut b64 = root.clone();
    b64["x5c"] = json!(["%%%"]);
    assert!(matches!(
        parse(json!({"keys": [b64]})),
        BundleError::Base64 { field: "x5c", .. }
    ));
    let mut junk = root.clone();
    junk["x5c"] = json!(["AAAA"]);
    assert!(matches!(
        parse(json!({"keys": [junk]})),
        BundleError::Certificate { .. }
    ));

    let mut no_kid = jwt.clone();
    no_kid.as_object_mut().unwrap().remove("kid");
    assert_eq!(
        parse(json!({"keys": [no_kid]})),
        BundleError::MissingKid { index: 0 }
    );
    assert!(matches!(
        parse(json!({"keys": [jwt.clone(), jwt.clone()]})),
        BundleError::DuplicateKid { .. }
    ));
    let mut rsa = jwt.clone();
    rsa["kty"] = json!("RSA");
    assert!(matches!(
        parse(json!({"keys": [rsa]})),
        BundleError::UnsupportedJwtKey { .. }
    ));
    let mut short = jwt.clone();
    short["x"] = json!("AAAA");
    assert!(matches!(
        parse(json!({"keys": [short]})),
        BundleError::UnsupportedJwtKey { .. }
    ));

    let many: Vec<_> = (0..300).map(|_| json!({"use": "x"})).collect();
    assert!(matches!(
        parse(json!({"keys": many})),
        BundleError::TooManyKeys { count: 300 }
    ));
    let huge = " ".repeat(meshgate_identity::MAX_BUNDLE_BYTES + 1);
    assert!(matches!(
        TrustBundle::from_spiffe_json(&huge, &td()),
        Err(BundleError::TooLarge { .. })
    ));
    // The good one still parses.
    TrustBundle::from_spiffe_json(&good.to_string(), &td()).unwrap();
}
