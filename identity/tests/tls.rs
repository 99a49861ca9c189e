#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The SPIFFE rustls verifiers in real handshakes over tokio TCP on 127.0.0.1:0.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{Ca, HOUR, ca, id};
use meshgate_identity::{
    BundleSet, PeerAuthorizer, SpiffeClientVerifier, SpiffeServerVerifier, client_config,
    crypto_provider, peer_spiffe_id, server_config,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

type Chain = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn svid_parts(svid: &meshgate_identity::X509Svid) -> Chain {
    (
        svid.cert_chain().to_vec(),
        svid.private_key().unwrap().clone_key(),
    )
}

/// Runs one handshake plus a one-byte echo; returns (server outcome, client outcome).
async fn handshake(
    server: rustls::ServerConfig,
    client: rustls::ClientConfig,
) -> (Result<Option<String>, String>, Result<(), String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| peer_spiffe_id(c).unwrap().to_string());
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        tls.write_all(&b).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok(peer)
    });
    let client_result = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("placeholder.invalid").unwrap();
        let mut tls = TlsConnector::from(Arc::new(client))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        Ok(())
    }
    .await;
    let server_result = tokio::time::timeout(Duration::from_secs(20), server_task)
        .await
        .unwrap()
        .unwrap();
    (server_result, client_result)
}

fn raw_server_config(chain: Chain, verifier: SpiffeClientVerifier) -> rustls::ServerConfig {
    rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain.0, chain.1)
        .unwrap()
}

fn raw_client_config(chain: Option<Chain>, verifier: SpiffeServerVerifier) -> rustls::ClientConfig {
    let b = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    match chain {
        Some((c, k)) => b.with_client_auth_cert(c, k).unwrap(),
        None => b.with_no_client_auth(),
    }
}

fn set(ca: &Ca) -> BundleSet {
    BundleSet::from_bundles([ca.issuer.bundle()])
}

/// A leaf signed by the CA's real root, with whatever rcgen parameters the test wants.
fn crafted(ca: &Ca, tweak: impl FnOnce(&mut CertificateParams)) -> Chain {
    let root_key = std::fs::read_to_string(ca.keys_dir().join("identity-root-1.key.pem")).unwrap();
    let root_key = KeyPair::from_pem(&root_key).unwrap();
    let root = ca.issuer.bundle().x509_roots()[0].clone();
    let issuer = rcgen::Issuer::from_ca_cert_der(&root, root_key).unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.subject_alt_names = vec![SanType::URI(
        "spiffe://east.example/web".try_into().unwrap(),
    )];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    tweak(&mut params);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// The client verifies a server presenting `chain`; returns the client's error, if any.
async fn client_sees(ca: &Ca, chain: Chain) -> Result<(), String> {
    let client_svid = ca
        .issuer
        .issue_x509_svid(
            &id("spiffe://east.example/client"),
            HOUR,
            &[],
            &[],
            SystemTime::now(),
        )
        .unwrap();
    let server = raw_server_config(
        chain,
        SpiffeClientVerifier::new(set(ca), PeerAuthorizer::Any).client_auth_mandatory(false),
    );
    let client = raw_client_config(
        Some(svid_parts(&client_svid)),
        SpiffeServerVerifier::new(set(ca), PeerAuthorizer::Any),
    );
    handshake(server, client).await.1
}

#[tokio::test]
async fn mutual_tls_succeeds_and_reports_the_peer_id() {
    let ca = ca("east.example");
    let now = SystemTime::now();
    let server_svid = ca
        .issuer
        .issue_x509_svid(
            &id("spiffe://east.example/meshgate/gateway"),
            HOUR,
            &[],
            &[],
            now,
        )
        .unwrap();
    let client_svid = ca
        .issuer
        .issue_x509_svid(
            &id("spiffe://east.example/ns/shop/sa/web"),
            HOUR,
            &[],
            &[],
            now,
        )
        .unwrap();
    let td = ca.issuer.trust_domain().clone();
    let server = server_config(
        &server_svid,
        SpiffeClientVerifier::new(set(&ca), PeerAuthorizer::TrustDomain(td.clone())),
    )
    .unwrap();
    let client = client_config(
        Some(&client_svid),
        SpiffeServerVerifier::new(
            set(&ca),
            PeerAuthorizer::Exact(meshgate_identity::SpiffeId::gateway(&td)),
        ),
    )
    .unwrap();
    let (s, c) = handshake(server, client).await;
    c.unwrap();
    assert_eq!(
        s.unwrap().as_deref(),
        Some("spiffe://east.example/ns/shop/sa/web")
    );
}

#[tokio::test]
async fn optional_client_auth_admits_clients_without_certificates() {
    let ca = ca("east.example");
    let server_svid = ca
        .issuer
        .issue_x509_svid(
            &id("spiffe://east.example/gw"),
            HOUR,
            &[],
            &[],
            SystemTime::now(),
        )
        .unwrap();
    let optional =
        SpiffeClientVerifier::new(set(&ca), PeerAuthorizer::Any).client_auth_mandatory(false);
    let client = client_config(
        None,
        SpiffeServerVerifier::new(set(&ca), PeerAuthorizer::Any),
    )
    .unwrap();
    let (s, c) = handshake(
        server_config(&server_svid, optional).unwrap(),
        client.clone(),
    )
    .await;
    c.unwrap();
    assert_eq!(s.unwrap(), None);
    let mandatory = SpiffeClientVerifier::new(set(&ca), PeerAuthorizer::Any);
    let (s, _) = handshake(server_config(&server_svid, mandatory).unwrap(), client).await;
    assert!(
        s.unwrap_err().contains("no certificate"),
        "a mandatory verifier refuses"
    );
}

#[tokio::test]
async fn authorizer_refuses_other_ids() {
    let ca = ca("east.example");
    let now = SystemTime::now();
    let server_svid = ca
        .issuer
        .issue_x509_svid(
            &id("spiffe://east.example/not-the-gateway"),
            HOUR,
            &[],
            &[],
            now,
        )
        .unwrap();
    let td = ca.issuer.trust_domain().clone();
    let server = server_config(
        &server_svid,
        SpiffeClientVerifier::new(set(&ca), PeerAuthorizer::Any).client_auth_mandatory(false),
    )
    .unwrap();
    let client = client_config(
        None,
        SpiffeServerVerifier::new(
            set(&ca),
            PeerAuthorizer::Exact(meshgate_identity::SpiffeId::gateway(&td)),
        ),
    )
    .unwrap();
    let e = handshake(server, client).await.1.unwrap_err();
    assert!(e.contains("NotAuthorized"), "{e}");
    let only = PeerAuthorizer::Predicate(Arc::new(|id| id.path().starts_with("/ns/")));
    assert!(!only.authorize(&id("spiffe://east.example/x")));
    assert!(
        PeerAuthorizer::OneOf(vec![id("spiffe://east.example/x")])
            .authorize(&id("spiffe://east.example/x"))
    );
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_rejected() {
    let ca = ca("east.example");
    let now = SystemTime::now();
    let past = ca
        .issuer
        .issue_x509_svid(
            &id("spiffe://east.example/old"),
            HOUR,
            &[],
            &[],
            now - 3 * HOUR,
        )
        .unwrap();
    let e = client_sees(&ca, svid_parts(&past)).await.unwrap_err();
    assert!(e.ends_with("Expired"), "{e}");
    let future = ca
        .issuer
        .issue_x509_svid(
            &id("spiffe://east.example/new"),
            HOUR,
            &[],
            &[],
            now + 3 * HOUR,
        )
        .unwrap();
    let e = client_sees(&ca, svid_parts(&future)).await.unwrap_err();
    assert!(e.ends_with("NotValidYet"), "{e}");
    // The same certificate passes with an injected clock inside its validity.
    let clock: meshgate_identity::TimeSource =
        Arc::new(move || now - 3 * HOUR + Duration::from_secs(60));
    let server = raw_server_config(
        svid_parts(&past),
        SpiffeClientVerifier::new(set(&ca), PeerAuthorizer::Any).client_auth_mandatory(false),
    );
    let client = raw_client_config(
        None,
        SpiffeServerVerifier::new(set(&ca), PeerAuthorizer::Any).with_time_source(clock),
    );
    handshake(server, client).await.1.unwrap();
}

#[tokio::test]
async fn wrong_trust_domain_and_unknown_root_are_rejected() {
    let east = ca("east.example");
    let west = ca("west.example");
    let now = SystemTime::now();
    let west_svid = west
        .issuer
        .issue_x509_svid(&id("spiffe://west.example/gw"), HOUR, &[], &[], now)
        .unwrap();
    let e = client_sees(&east, svid_parts(&west_svid))
        .await
        .unwrap_err();
    assert!(
        e.contains("UnknownTrustDomain { trust_domain: \"west.example\" }"),
        "{e}"
    );
    // A rogue CA minting east IDs: the ID is east's, the root is not.
    let rogue = ca("east.example");
    let rogue_svid = rogue
        .issuer
        .issue_x509_svid(&id("spiffe://east.example/gw"), HOUR, &[], &[], now)
        .unwrap();
    let e = client_sees(&east, svid_parts(&rogue_svid))
        .await
        .unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");
}

#[tokio::test]
async fn malformed_leaves_are_rejected() {
    let ca = ca("east.example");
    client_sees(&ca, crafted(&ca, |_| {}))
        .await
        .expect("the crafted baseline is valid");
    let e = client_sees(
        &ca,
        crafted(&ca, |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
    )
    .await
    .unwrap_err();
    assert!(e.contains("CaLeaf"), "{e}");
    let e = client_sees(
        &ca,
        crafted(&ca, |p| {
            p.subject_alt_names = vec![SanType::DnsName("web".try_into().unwrap())]
        }),
    )
    .await
    .unwrap_err();
    assert!(e.contains("NoUriSan"), "{e}");
    let e = client_sees(
        &ca,
        crafted(&ca, |p| {
            p.subject_alt_names.push(SanType::URI(
                "spiffe://east.example/admin".try_into().unwrap(),
            ));
        }),
    )
    .await
    .unwrap_err();
    assert!(e.contains("MultipleUriSans { count: 2 }"), "{e}");
    let e = client_sees(
        &ca,
        crafted(&ca, |p| p.key_usages.push(KeyUsagePurpose::KeyCertSign)),
    )
    .await
    .unwrap_err();
    assert!(e.contains("SigningLeaf"), "{e}");
    // No key usage extension at all: the X.509-SVID standard requires digitalSignature.
    let e = client_sees(&ca, crafted(&ca, |p| p.key_usages.clear()))
        .await
        .unwrap_err();
    assert!(e.contains("NoDigitalSignature"), "{e}");
    let e = client_sees(
        &ca,
        crafted(&ca, |p| {
            p.subject_alt_names = vec![SanType::URI(
                "spiffe://east.example/a/../b".try_into().unwrap(),
            )]
        }),
    )
    .await
    .unwrap_err();
    assert!(e.contains("BadSpiffeId"), "{e}");
}

#[tokio::test]
async fn client_certificates_get_the_same_checks() {
    let ca = ca("east.example");
    let now = SystemTime::now();
    let server_svid = ca
        .issuer
        .issue_x509_svid(&id("spiffe://east.example/gw"), HOUR, &[], &[], now)
        .unwrap();
    let expired = ca
        .issuer
        .issue_x509_svid(
            &id("spiffe://east.example/old"),
            HOUR,
            &[],
            &[],
            now - 3 * HOUR,
        )
        .unwrap();
    for chain in [
        svid_parts(&expired),
        crafted(&ca, |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
    ] {
        let server = server_config(
            &server_svid,
            SpiffeClientVerifier::new(set(&ca), PeerAuthorizer::Any),
        )
        .unwrap();
        let client = raw_client_config(
            Some(chain),
            SpiffeServerVerifier::new(set(&ca), PeerAuthorizer::Any),
        );
        let (s, _) = handshake(server, client).await;
        assert!(s.is_err(), "server must refuse the client certificate");
    }
}
