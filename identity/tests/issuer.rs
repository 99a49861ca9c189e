#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The issuer: X.509-SVID properties, CSRs, persistence, rotation.

mod common;

use std::time::{Duration, SystemTime};

use common::{HOUR, ca, id};
use meshgate_identity::{
    BundleSet, CsrAndKey, Issuer, IssuerError, RootState, Usage, X509Svid, verify_x509_svid,
};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

#[test]
fn x509_svid_follows_the_spiffe_standard() {
    let ca = ca("east.example");
    let now = SystemTime::now();
    let svid = ca
        .issuer
        .issue_x509_svid(
            &id("spiffe://east.example/ns/shop/sa/web"),
            HOUR,
            &[],
            &[],
            now,
        )
        .unwrap();
    assert_eq!(
        svid.cert_chain().len(),
        1,
        "root-signed: the chain is the leaf"
    );
    let (_, cert) = X509Certificate::from_der(svid.leaf()).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| {
            if let GeneralName::URI(u) = n {
                Some(*u)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(uris, ["spiffe://east.example/ns/shop/sa/web"]);
    assert_eq!(san.value.general_names.len(), 1);
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(
        cert.raw_serial().len() >= 8 && cert.raw_serial()[0] & 0x80 == 0,
        "positive serial of >= 64 bits"
    );
    let nb = cert.validity().not_before.timestamp();
    let na = cert.validity().not_after.timestamp();
    let now_s = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(nb < now_s - 30, "notBefore backdated");
    assert_eq!(na, now_s + 3600);
    // Two SVIDs never share a serial.
    let other = ca
        .issuer
        .issue_x509_svid(
            &id("spiffe://east.example/ns/shop/sa/web"),
            HOUR,
            &[],
            &[],
            now,
        )
        .unwrap();
    let (_, other) = X509Certificate::from_der(other.leaf()).unwrap();
    assert_ne!(cert.raw_serial(), other.raw_serial());
    // Serials are recorded.
    assert_eq!(ca.db.open_tree("identity.serials").unwrap().len(), 2);
    // The private key is PKCS#8 and matches.
    assert!(
        svid.private_key_pem()
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
    let bundles = BundleSet::from_bundles([ca.issuer.bundle()]);
    assert_eq!(
        verify_x509_svid(svid.cert_chain(), &bundles, Usage::Client, now).unwrap(),
        *svid.spiffe_id()
    );
}

#[test]
fn listener_svid_carries_dns_and_ip_sans() {
    let ca = ca("east.example");
    let td = ca.issuer.trust_domain().clone();
    let svid = ca
        .issuer
        .issue_x509_svid(
            &meshgate_identity::SpiffeId::gateway(&td),
            HOUR,
            &["gw.east.example".into()],
            &["127.0.0.1".parse().unwrap()],
            SystemTime::now(),
        )
        .unwrap();
    let (_, cert) = X509Certificate::from_der(svid.leaf()).unwrap();
    let names = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert!(
        names
            .iter()
            .any(|n| matches!(n, GeneralName::DNSName("gw.east.example")))
    );
    assert!(
        names
            .iter()
            .any(|n| matches!(n, GeneralName::IPAddress([127, 0, 0, 1])))
    );
}

#[test]
fn refuses_bad_issue_requests_without_changing_state() {
    let ca = ca("east.example");
    let now = SystemTime::now();
    let serials = ca.db.open_tree("identity.serials").unwrap();
    let e = ca
        .issuer
        .issue_x509_svid(&id("spiffe://west.example/a"), HOUR, &[], &[], now)
        .unwrap_err();
    assert!(matches!(e, IssuerError::ForeignTrustDomain { .. }), "{e}");
    assert!(e.to_string().contains("`spiffe://west.example/a`"));
    let e = ca
        .issuer
        .issue_x509_svid(&id("spiffe://east.example"), HOUR, &[], &[], now)
        .unwrap_err();
    assert!(matches!(e, IssuerError::TrustDomainId { .. }));
    let e = ca
        .issuer
        .issue_x509_svid(
            &id("spiffe://east.example/a"),
            Duration::ZERO,
            &[],
            &[],
            now,
        )
        .unwrap_err();
    assert!(matches!(e, IssuerError::BadTtl { .. }));
    let e = ca
        .issuer
        .issue_x509_svid(
            &id("spiffe://east.example/a"),
            HOUR,
            &["bad name".into()],
            &[],
            now,
        )
        .unwrap_err();
    assert!(matches!(e, IssuerError::BadDnsName { .. }));
    assert!(e.is_input());
    assert_eq!(serials.len(), 0);
}

#[test]
fn signs_csrs_and_refuses_bad_ones() {
    let ca = ca("east.example");
    let now = SystemTime::now();
    let web = id("spiffe://east.example/web");
    let csr = CsrAndKey::generate(Some(&web)).unwrap();
    let svid = ca.issuer.sign_csr(&csr.csr_der, &web, HOUR, now).unwrap();
    assert_eq!(svid.spiffe_id(), &web);
    assert!(svid.private_key().is_none());
    // No SAN in the CSR is fine too.
    let bare = CsrAndKey::generate(None).unwrap();
    ca.issuer.sign_csr(&bare.csr_der, &web, HOUR, now).unwrap();

    let other = CsrAndKey::generate(Some(&id("spiffe://east.example/admin"))).unwrap();
    let e = ca
        .issuer
        .sign_csr(&other.csr_der, &web, HOUR, now)
        .unwrap_err();
    assert!(matches!(e, IssuerError::CsrIdMismatch { .. }), "{e}");

    let mut forged = csr.csr_der.clone();
    let last = forged.len() - 1;
    forged[last] ^= 0x01; // breaks the signature
    let e = ca.issuer.sign_csr(&forged, &web, HOUR, now).unwrap_err();
    assert!(matches!(e, IssuerError::BadCsr { .. }), "{e}");
    let e = ca
        .issuer
        .sign_csr(b"not a csr", &web, HOUR, now)
        .unwrap_err();
    assert!(matches!(e, IssuerError::BadCsr { .. }));
    let e = ca
        .issuer
        .sign_csr(&vec![0x30; 20_000], &web, HOUR, now)
        .unwrap_err();
    assert!(e.to_string().contains("too large"));
    assert_eq!(
        ca.db.open_tree("identity.serials").unwrap().len(),
        2,
        "refusals record nothing"
    );
}

#[test]
fn state_survives_reopen_and_init_refuses_twice() {
    let ca = ca("east.example");
    let before = ca.issuer.bundle();
    let e = Issuer::init(
        &ca.db,
        &ca.keys_dir(),
        "east.example".parse().unwrap(),
        SystemTime::now(),
    )
    .unwrap_err();
    assert!(matches!(e, IssuerError::AlreadyInitialised { .. }));
    let reopened = Issuer::open(&ca.db, &ca.keys_dir()).unwrap();
    assert_eq!(reopened.bundle().to_spiffe_json(), before.to_spiffe_json());
    // Keys are private.
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(ca.keys_dir()).unwrap() {
        let mode = entry.unwrap().metadata().unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[test]
fn open_refuses_world_readable_keys() {
    use std::os::unix::fs::PermissionsExt;
    let ca = ca("east.example");
    let key = ca.keys_dir().join("identity-root-1.key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Issuer::open(&ca.db, &ca.keys_dir()).unwrap_err();
    assert!(matches!(e, IssuerError::KeyFile { .. }), "{e}");
    assert!(!e.is_input());
}

#[test]
fn rotation_keeps_old_svids_verifying_and_signs_with_the_new_root() {
    let ca = ca("east.example");
    let t0 = SystemTime::now();
    let web = id("spiffe://east.example/web");
    let old = ca.issuer.issue_x509_svid(&web, HOUR, &[], &[], t0).unwrap();
    let seq0 = ca.issuer.bundle().sequence();

    let prepared = ca.issuer.rotate_prepare(t0).unwrap();
    assert_eq!(prepared.generation, 2);
    let bundle = ca.issuer.bundle();
    assert_eq!(
        bundle.x509_roots().len(),
        2,
        "the prepared root is published"
    );
    assert!(bundle.sequence() > seq0);
    assert!(matches!(
        ca.issuer.rotate_prepare(t0),
        Err(IssuerError::AlreadyPrepared { generation: 2 })
    ));
    // Still signing with generation 1.
    let mid = ca.issuer.issue_x509_svid(&web, HOUR, &[], &[], t0).unwrap();
    let (_, mid_cert) = X509Certificate::from_der(mid.leaf()).unwrap();
    assert!(mid_cert.issuer().to_string().contains("#1"));

    ca.issuer.rotate_activate(t0).unwrap();
    assert!(matches!(
        ca.issuer.rotate_activate(t0),
        Err(IssuerError::NothingPrepared)
    ));
    let new = ca.issuer.issue_x509_svid(&web, HOUR, &[], &[], t0).unwrap();
    let (_, new_cert) = X509Certificate::from_der(new.leaf()).unwrap();
    assert!(new_cert.issuer().to_string().contains("#2"));

    let states: Vec<_> = ca.issuer.roots().iter().map(|r| r.state).collect();
    assert_eq!(states, [RootState::Retired, RootState::Active]);
    let bundles = BundleSet::from_bundles([ca.issuer.bundle_at(t0).unwrap()]);
    for svid in [&old, &mid, &new] {
        verify_x509_svid(svid.cert_chain(), &bundles, Usage::Server, t0).unwrap();
    }
    // Once the last generation-1 SVID has expired, the old root leaves the bundle.
    let later = t0 + HOUR + Duration::from_secs(5);
    let pruned = ca.issuer.bundle_at(later).unwrap();
    assert_eq!(pruned.x509_roots().len(), 1);
    assert_eq!(pruned.jwt_keys().len(), 1);
    assert!(
        !ca.keys_dir().join("identity-root-1.key.pem").exists(),
        "retired key deleted"
    );
    let reopened = Issuer::open(&ca.db, &ca.keys_dir()).unwrap();
    assert_eq!(reopened.bundle().sequence(), pruned.sequence());
    let bundles = BundleSet::from_bundles([pruned]);
    let e = verify_x509_svid(old.cert_chain(), &bundles, Usage::Server, t0).unwrap_err();
    assert!(e.to_string().contains("not signed by a root"), "{e}");
}

#[test]
fn svid_pem_round_trip() {
    let ca = ca("east.example");
    let svid = ca
        .issuer
        .issue_x509_svid(
            &id("spiffe://east.example/web"),
            HOUR,
            &[],
            &[],
            SystemTime::now(),
        )
        .unwrap();
    let back = X509Svid::from_pem(
        svid.cert_chain_pem().as_bytes(),
        Some(svid.private_key_pem().unwrap().as_bytes()),
    )
    .unwrap();
    assert_eq!(back.spiffe_id(), svid.spiffe_id());
    assert_eq!(back.cert_chain(), svid.cert_chain());
    assert!(X509Svid::from_pem(b"garbage", None).is_err());
}
