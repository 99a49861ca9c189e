//! CSRs at the issuer (attestation and renewal): no panic on any bytes, and an SVID comes
//! out only for the ID the registration allows, for the key the CSR carries.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, SystemTime};

use meshgate_fuzz::{mutate, mutations, runner};
use meshgate_identity::{CsrAndKey, IssuerError, SpiffeId, X509Svid};
use proptest::prelude::*;
use rcgen::string::Ia5String;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::common::{Ca, HOUR, ca, id};

const WEB: &str = "spiffe://east.example/ns/shop/sa/web";

fn web() -> SpiffeId {
    id(WEB)
}

fn registered_ca() -> Ca {
    let ca = ca("east.example");
    ca.issuer
        .create_entry(&web(), Some(HOUR), &[], SystemTime::now())
        .unwrap();
    ca
}

/// What an issued SVID must be: for `web` only, carrying no other SAN, for the CSR's key.
fn check_issued(svid: &X509Svid, csr_der: &[u8]) -> Result<(), TestCaseError> {
    prop_assert_eq!(svid.spiffe_id(), &web());
    let (_, leaf) = x509_parser::parse_x509_certificate(svid.leaf()).unwrap();
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|n| format!("{n:?}"))
                .collect()
        })
        .unwrap_or_default();
    prop_assert_eq!(sans, vec![format!("{:?}", GeneralName::URI(WEB))]);
    let (_, csr) = X509CertificationRequest::from_der(csr_der).unwrap();
    prop_assert_eq!(
        leaf.public_key().raw,
        csr.certification_request_info.subject_pki.raw
    );
    prop_assert!(!leaf.is_ca());
    Ok(())
}

/// Bytes for the issuer: a valid CSR with a few byte edits, or random DER-ish bytes.
fn csr_bytes(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let der_ish = proptest::collection::vec(any::<u8>(), 0..600).prop_map(|mut b| {
        // Mostly a SEQUENCE header, so the parser gets past the first byte.
        if let Some(first) = b.first_mut() {
            *first = 0x30;
        }
        b
    });
    prop_oneof![
        6 => mutations(3).prop_map(move |m| mutate(&valid, &m)),
        1 => der_ish,
        1 => proptest::collection::vec(any::<u8>(), 0..64),
    ]
}

#[test]
fn fuzz_csr_mutated_and_arbitrary_bytes_never_yield_a_foreign_svid() {
    let ca = registered_ca();
    let now = SystemTime::now();
    let valid = CsrAndKey::generate(Some(&web())).unwrap().csr_der;
    let accepted = std::cell::Cell::new(0u32);
    runner(300)
        .run(&csr_bytes(valid.clone()), |bytes| {
            match ca.issuer.sign_csr(&bytes, &web(), HOUR, now) {
                Ok(svid) => {
                    accepted.set(accepted.get() + 1);
                    check_issued(&svid, &bytes)?;
                }
                Err(IssuerError::BadCsr { .. } | IssuerError::CsrIdMismatch { .. }) => {}
                Err(e) => return Err(TestCaseError::fail(format!("unexpected error: {e}"))),
            }
            // Renewal checks the same CSR the same way.
            let renewed = ca.issuer.renew(&web(), &bytes, now);
            if let Ok(svid) = &renewed {
                check_issued(svid, &bytes)?;
            }
            Ok(())
        })
        .unwrap();
    // Sanity: the unmutated CSR is accepted, so the edits are what the issuer refused.
    check_issued(
        &ca.issuer.sign_csr(&valid, &web(), HOUR, now).unwrap(),
        &valid,
    )
    .unwrap();
    eprintln!(
        "csr byte mutations: {} accepted (same key, same ID)",
        accepted.get()
    );
}

/// A subject alternative name a CSR may ask for.
fn san() -> impl Strategy<Value = SanType> {
    let uri = prop_oneof![
        4 => Just(WEB.to_owned()),
        1 => Just(format!("{WEB}/")),
        1 => Just(format!("{WEB}/x")),
        1 => Just(WEB.to_uppercase()),
        1 => Just("spiffe://east.example/meshgate/gateway".to_owned()),
        1 => Just("spiffe://west.example/ns/shop/sa/web".to_owned()),
        1 => Just("spiffe://east.example".to_owned()),
        1 => "spiffe://east\\.example/ns/[a-z]{1,4}/sa/[a-z]{1,4}",
        1 => "[ -~]{0,40}",
    ];
    prop_oneof![
        6 => uri.prop_filter_map("not IA5", |u| Ia5String::try_from(u).ok().map(SanType::URI)),
        1 => "[a-z.]{1,20}".prop_filter_map("not IA5", |d| Ia5String::try_from(d).ok().map(SanType::DnsName)),
        1 => "[a-z]{1,8}@[a-z.]{1,8}".prop_filter_map("not IA5", |d| Ia5String::try_from(d).ok().map(SanType::Rfc822Name)),
        1 => any::<u32>().prop_map(|ip| SanType::IpAddress(IpAddr::V4(Ipv4Addr::from(ip)))),
    ]
}

/// Whether the issuer may honour a CSR asking for `sans` for `web`: only no SAN or the ID
/// itself, repeated or not.
fn allowed(sans: &[SanType]) -> bool {
    sans.iter()
        .all(|s| matches!(s, SanType::URI(u) if u.as_str() == WEB))
}

#[test]
fn fuzz_csr_signed_requests_for_other_names_are_refused() {
    let ca = registered_ca();
    let now = SystemTime::now();
    let keys: Vec<(KeyPair, bool)> = [
        (&rcgen::PKCS_ECDSA_P256_SHA256, true),
        (&rcgen::PKCS_ECDSA_P384_SHA384, false),
        (&rcgen::PKCS_ED25519, false),
    ]
    .into_iter()
    .map(|(alg, ok)| (KeyPair::generate_for(alg).unwrap(), ok))
    .collect();
    let strategy = (
        proptest::collection::vec(san(), 0..4),
        0..keys.len(),
        "[a-zA-Z ]{0,12}",
        any::<bool>(),
    );
    runner(150)
        .run(&strategy, |(sans, key, cn, attest)| {
            let (key, p256) = &keys[key];
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            if !cn.is_empty() {
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, cn.clone());
            }
            params.subject_alt_names = sans.clone();
            let csr = params.serialize_request(key).unwrap().der().to_vec();
            let should = *p256 && allowed(&sans);
            let result = if attest {
                // Attestation: a one-time token bound to `web`.
                let token = ca
                    .issuer
                    .create_join_token(&web(), Duration::from_secs(60), now)
                    .unwrap();
                ca.issuer.attest(&token.token, &csr, now)
            } else {
                ca.issuer.renew(&web(), &csr, now)
            };
            prop_assert_eq!(result.is_ok(), should, "SANs {:?}: {:?}", sans, result);
            if let Ok(svid) = result {
                check_issued(&svid, &csr)?;
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn fuzz_csr_pem_reader_never_panics() {
    let strategy = prop_oneof![
        any::<String>(),
        (proptest::collection::vec(any::<u8>(), 0..300), mutations(2)).prop_map(|(der, m)| {
            let pem = CsrAndKey {
                csr_der: der,
                private_key: rustls_pki_types::PrivateKeyDer::Pkcs8(Vec::new().into()),
            }
            .csr_pem();
            String::from_utf8_lossy(&mutate(pem.as_bytes(), &m)).into_owned()
        }),
    ];
    runner(500)
        .run(&strategy, |pem| {
            let _ = meshgate_identity::csr_der_from_pem(&pem);
            Ok(())
        })
        .unwrap();
}
