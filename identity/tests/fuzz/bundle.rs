//! SPIFFE bundle JSON: no panic on any document or bytes, and a bundle that parses
//! re-serializes and re-parses to the same roots, keys, sequence and refresh hint.

use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use meshgate_fuzz::{config, deep_nesting, json_number, json_value, mutate, mutations};
use meshgate_identity::{TrustBundle, TrustDomain};
use proptest::prelude::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use serde_json::{Value, json};

/// Field names and values the bundle parser looks for.
const WORDS: &[&str] = &[
    "keys",
    "use",
    "x509-svid",
    "jwt-svid",
    "x5c",
    "kid",
    "kty",
    "EC",
    "RSA",
    "crv",
    "P-256",
    "P-384",
    "x",
    "y",
    "spiffe_sequence",
    "spiffe_refresh_hint",
    "",
];

/// Real root certificates (P-256, P-384, Ed25519 keys), DER.
fn roots() -> &'static [Vec<u8>] {
    static ROOTS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ]
        .into_iter()
        .map(|alg| {
            let key = KeyPair::generate_for(alg).unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.self_signed(&key).unwrap().der().to_vec()
        })
        .collect()
    })
}

fn td() -> TrustDomain {
    "east.example".parse().unwrap()
}

/// A `x5c` entry: a real root (maybe mutated), random bytes, or not base64 at all.
fn x5c_entry() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0..3usize).prop_map(|i| json!(STANDARD.encode(&roots()[i]))),
        2 => (0..3usize, mutations(2))
            .prop_map(|(i, m)| json!(STANDARD.encode(mutate(&roots()[i], &m)))),
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| json!(STANDARD.encode(b))),
        1 => json_value(WORDS, 1),
    ]
}

/// A coordinate: usually 32 bytes base64url, sometimes another length or not base64url.
fn coordinate() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => proptest::collection::vec(any::<u8>(), 32).prop_map(|b| json!(URL_SAFE_NO_PAD.encode(b))),
        1 => proptest::collection::vec(any::<u8>(), 0..70).prop_map(|b| json!(URL_SAFE_NO_PAD.encode(b))),
        1 => proptest::collection::vec(any::<u8>(), 32).prop_map(|b| json!(STANDARD.encode(b))),
        1 => json_value(WORDS, 1),
    ]
}

/// A key object near the format: each field right most of the time.
fn key() -> impl Strategy<Value = Value> {
    let use_ = prop_oneof![
        4 => Just(json!("x509-svid")),
        4 => Just(json!("jwt-svid")),
        1 => json_value(WORDS, 1),
    ];
    let kid = prop_oneof![
        4 => "[A-Za-z0-9_-]{1,8}".prop_map(|k| json!(k)),
        1 => json_value(WORDS, 1),
    ];
    (
        use_,
        proptest::collection::vec(x5c_entry(), 0..3),
        kid,
        coordinate(),
        coordinate(),
        any::<[bool; 6]>(),
    )
        .prop_map(|(use_, x5c, kid, x, y, drop)| {
            let mut key = serde_json::Map::new();
            let fields = [
                ("use", use_),
                ("x5c", Value::Array(x5c)),
                ("kid", kid),
                ("kty", json!("EC")),
                ("crv", json!("P-256")),
                ("x", x),
            ];
            for ((name, value), dropped) in fields.into_iter().zip(drop) {
                if !dropped {
                    key.insert(name.into(), value);
                }
            }
            key.insert("y".into(), y);
            Value::Object(key)
        })
}

/// A document near the bundle format.
fn near_bundle() -> impl Strategy<Value = Value> {
    let number = prop_oneof![
        4 => (0u64..1_000_000).prop_map(Value::from),
        2 => json_number(),
        1 => json_value(WORDS, 1),
    ];
    (
        proptest::collection::vec(key(), 0..5),
        proptest::option::of(number.clone()),
        proptest::option::of(number),
    )
        .prop_map(|(keys, seq, hint)| {
            let mut doc = serde_json::Map::new();
            doc.insert("keys".into(), Value::Array(keys));
            if let Some(seq) = seq {
                doc.insert("spiffe_sequence".into(), seq);
            }
            if let Some(hint) = hint {
                doc.insert("spiffe_refresh_hint".into(), hint);
            }
            Value::Object(doc)
        })
}

/// Parses `text`; if it is a bundle, its JSON must parse back to the same bundle, and
/// serializing that again must give the same text. Returns whether it parsed.
fn check_bundle(text: &str) -> Result<bool, TestCaseError> {
    let Ok(bundle) = TrustBundle::from_spiffe_json(text, &td()) else {
        return Ok(false);
    };
    let again = bundle.to_spiffe_json();
    let reparsed = TrustBundle::from_spiffe_json(&again, &td())
        .map_err(|e| TestCaseError::fail(format!("re-serialized bundle refused: {e}")))?;
    prop_assert_eq!(reparsed.x509_roots(), bundle.x509_roots());
    prop_assert_eq!(reparsed.jwt_keys(), bundle.jwt_keys());
    prop_assert_eq!(reparsed.sequence(), bundle.sequence());
    prop_assert_eq!(reparsed.refresh_hint(), bundle.refresh_hint());
    prop_assert_eq!(reparsed.trust_domain(), &td());
    prop_assert_eq!(reparsed.to_spiffe_json(), again);
    // The PEM export of the roots reads back to the same roots.
    if !bundle.x509_roots().is_empty() {
        let pem = TrustBundle::from_pem(bundle.to_pem().as_bytes(), td())
            .map_err(|e| TestCaseError::fail(format!("PEM export refused: {e}")))?;
        prop_assert_eq!(pem.x509_roots(), bundle.x509_roots());
    }
    Ok(true)
}

proptest! {
    #![proptest_config(config(600))]

    #[test]
    fn fuzz_bundle_json_generated_values(doc in json_value(WORDS, 6)) {
        check_bundle(&doc.to_string())?;
        check_bundle(&json!({ "keys": [doc] }).to_string())?;
    }

    #[test]
    fn fuzz_bundle_json_near_the_format(doc in near_bundle()) {
        check_bundle(&doc.to_string())?;
    }

    #[test]
    fn fuzz_bundle_json_byte_mutations(doc in near_bundle(), edits in mutations(4)) {
        let bytes = mutate(doc.to_string().as_bytes(), &edits);
        check_bundle(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn fuzz_bundle_json_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_bundle(&String::from_utf8_lossy(&bytes))?;
        // PEM and inferred-PEM readers get the same bytes.
        let _ = TrustBundle::from_pem(&bytes, td());
        let _ = TrustBundle::from_pem_infer(&bytes);
    }

    #[test]
    fn fuzz_bundle_json_deep_nesting(text in deep_nesting(4000)) {
        prop_assert!(!check_bundle(&text)?);
    }
}

#[test]
fn a_bundle_with_every_kind_of_key_round_trips() {
    let doc = json!({
        "keys": [
            { "use": "x509-svid", "x5c": [STANDARD.encode(&roots()[0])] },
            { "use": "x509-svid", "x5c": [STANDARD.encode(&roots()[1])] },
            { "use": "x509-svid", "x5c": [STANDARD.encode(&roots()[2])] },
            { "use": "jwt-svid", "kid": "k1", "kty": "EC", "crv": "P-256",
              "x": URL_SAFE_NO_PAD.encode([1u8; 32]), "y": URL_SAFE_NO_PAD.encode([2u8; 32]) },
        ],
        "spiffe_sequence": 7,
        "spiffe_refresh_hint": 300,
    });
    // The generators reach acceptance with these very pieces: this pins that they can.
    assert!(check_bundle(&doc.to_string()).unwrap());
}
