#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Registration, join tokens, the issuer API over real HTTPS, and the agent.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{Ca, HOUR, ca, id};
use meshgate_identity::agent::{Agent, AgentConfig};
use meshgate_identity::{
    BundleSet, CsrAndKey, IssuerClient, IssuerClientError, IssuerError, SpiffeId, SvidCertResolver,
    Usage, X509Svid, serve_issuer_api, verify_jwt_svid, verify_x509_svid,
};
use tokio::sync::oneshot;

fn web() -> SpiffeId {
    id("spiffe://east.example/ns/shop/sa/web")
}

fn register(ca: &Ca, ttl: Duration) -> String {
    ca.issuer
        .create_entry(&web(), Some(ttl), &[], SystemTime::now())
        .unwrap();
    ca.issuer
        .create_join_token(&web(), Duration::from_secs(600), SystemTime::now())
        .unwrap()
        .token
}

#[test]
fn entries_are_stored_listed_and_deleted() {
    let ca = ca("east.example");
    let now = SystemTime::now();
    let e = ca
        .issuer
        .create_entry(&web(), Some(HOUR), &["web.shop".into()], now)
        .unwrap();
    assert_eq!(e.ttl_secs, 3600);
    assert!(matches!(
        ca.issuer.create_entry(&web(), None, &[], now),
        Err(IssuerError::EntryExists { .. })
    ));
    // The gateway identity can never be registered (so never attested by a workload).
    let gateway = meshgate_identity::SpiffeId::gateway(web().trust_domain());
    assert!(matches!(
        ca.issuer.create_entry(&gateway, None, &[], now),
        Err(IssuerError::ReservedId { .. })
    ));
    assert!(matches!(
        ca.issuer
            .create_entry(&id("spiffe://west.example/x"), None, &[], now),
        Err(IssuerError::ForeignTrustDomain { .. })
    ));
    assert_eq!(ca.issuer.list_entries().unwrap(), std::slice::from_ref(&e));
    assert_eq!(ca.issuer.delete_entry(&web()).unwrap(), e);
    assert!(matches!(
        ca.issuer.delete_entry(&web()),
        Err(IssuerError::NoSuchEntry { .. })
    ));
    assert!(matches!(
        ca.issuer.create_join_token(&web(), HOUR, now),
        Err(IssuerError::NoSuchEntry { .. })
    ));
}

#[test]
fn tokens_are_one_time_expiring_and_stored_hashed() {
    let ca = ca("east.example");
    let now = SystemTime::now();
    let token = register(&ca, HOUR);
    assert!(
        token.starts_with("mgjt_") && token.len() >= 5 + 43,
        "256 random bits"
    );
    let tokens = ca.db.open_tree("identity.tokens").unwrap();
    for item in tokens.iter() {
        let (k, v) = item.unwrap();
        assert!(
            !String::from_utf8_lossy(&k).contains(&token[5..])
                && !String::from_utf8_lossy(&v).contains(&token[5..])
        );
    }
    let csr = CsrAndKey::generate(None).unwrap();
    // A CSR for another ID is refused and does not burn the token.
    let wrong = CsrAndKey::generate(Some(&id("spiffe://east.example/admin"))).unwrap();
    assert!(matches!(
        ca.issuer.attest(&token, &wrong.csr_der, now),
        Err(IssuerError::CsrIdMismatch { .. })
    ));
    assert!(matches!(
        ca.issuer.attest(&token, b"junk", now),
        Err(IssuerError::BadCsr { .. })
    ));
    let svid = ca.issuer.attest(&token, &csr.csr_der, now).unwrap();
    assert_eq!(svid.spiffe_id(), &web());
    assert_eq!(
        ca.issuer.attest(&token, &csr.csr_der, now).unwrap_err(),
        IssuerError::TokenUsed
    );
    assert_eq!(
        ca.issuer
            .attest("mgjt_unknown", &csr.csr_der, now)
            .unwrap_err(),
        IssuerError::UnknownToken
    );
    assert_eq!(
        ca.issuer.attest("garbage", &csr.csr_der, now).unwrap_err(),
        IssuerError::UnknownToken
    );
    let short = ca
        .issuer
        .create_join_token(&web(), Duration::from_secs(60), now)
        .unwrap()
        .token;
    let later = now + Duration::from_secs(61);
    assert_eq!(
        ca.issuer.attest(&short, &csr.csr_der, later).unwrap_err(),
        IssuerError::TokenExpired
    );
}

#[test]
fn concurrent_double_redemption_has_one_winner() {
    let ca = Arc::new(ca("east.example"));
    for _ in 0..5 {
        let token = ca.issuer.create_join_token(&web(), HOUR, SystemTime::now());
        let token = match token {
            Ok(t) => t.token,
            Err(_) => register(&ca, HOUR),
        };
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (ca, token, barrier) = (ca.clone(), token.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let csr = CsrAndKey::generate(None).unwrap();
                    barrier.wait();
                    ca.issuer.attest(&token, &csr.csr_der, SystemTime::now())
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            1,
            "{results:?}"
        );
        assert!(
            results
                .iter()
                .filter_map(|r| r.as_ref().err())
                .all(|e| *e == IssuerError::TokenUsed)
        );
    }
}

struct Server {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(ca: &Arc<Ca>) -> Server {
    start_at(ca, "127.0.0.1:0").await
}

async fn start_at(ca: &Arc<Ca>, addr: &str) -> Server {
    let issuer = Arc::new(meshgate_identity::Issuer::open(&ca.db, &ca.keys_dir()).unwrap());
    let gw = SpiffeId::gateway(issuer.trust_domain());
    let svid = issuer
        .issue_x509_svid(&gw, HOUR, &["localhost".into()], &[], SystemTime::now())
        .unwrap();
    let resolver = Arc::new(SvidCertResolver::new(&svid).unwrap());
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let (stop, rx) = oneshot::channel();
    let task = tokio::spawn(serve_issuer_api(listener, issuer, resolver, async {
        let _ = rx.await;
    }));
    Server {
        url,
        stop: Some(stop),
        task,
    }
}

impl Server {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn attest_renew_and_jwt_over_https() {
    let ca = Arc::new(ca("east.example"));
    let token = register(&ca, HOUR);
    let server = start(&ca).await;
    let client = IssuerClient::new(&server.url, ca.issuer.bundle()).unwrap();

    let bundle = client.bundle().await.unwrap();
    assert_eq!(bundle.x509_roots(), ca.issuer.bundle().x509_roots());

    let csr = CsrAndKey::generate(None).unwrap();
    let resp = client.attest(&token, &csr.csr_pem()).await.unwrap();
    assert_eq!(resp.spiffe_id, web().as_str());
    let svid = X509Svid::from_pem(resp.svid.as_bytes(), None).unwrap();
    let svid = X509Svid::from_parts(
        svid.cert_chain().to_vec(),
        Some(csr.private_key.clone_key()),
    )
    .unwrap();
    let bundles = BundleSet::from_bundles([ca.issuer.bundle()]);
    verify_x509_svid(
        svid.cert_chain(),
        &bundles,
        Usage::Client,
        SystemTime::now(),
    )
    .unwrap();

    let again = client.attest(&token, &csr.csr_pem()).await.unwrap_err();
    assert!(
        matches!(again, IssuerClientError::Refused { status: 403, ref message } if message.contains("already used")),
        "{again}"
    );
    let bad = client
        .attest("mgjt_nope", &csr.csr_pem())
        .await
        .unwrap_err();
    assert!(matches!(
        bad,
        IssuerClientError::Refused { status: 403, .. }
    ));
    let bad = client.attest(&token, "not pem").await.unwrap_err();
    assert!(
        matches!(bad, IssuerClientError::Refused { status: 400, .. }),
        "{bad}"
    );

    // Renewal needs the current SVID over mTLS.
    let csr2 = CsrAndKey::generate(Some(&web())).unwrap();
    let renewed = client.renew(&svid, &csr2.csr_pem()).await.unwrap();
    assert_eq!(renewed.spiffe_id, web().as_str());
    let jwt = client
        .jwt(&svid, &["spiffe://west.example/ns/shop/svc/orders".into()])
        .await
        .unwrap();
    let claims = verify_jwt_svid(
        &jwt.token,
        &bundles,
        "spiffe://west.example/ns/shop/svc/orders",
        SystemTime::now(),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(claims.sub, web());

    // Without a client certificate, renew is refused; a foreign one fails the handshake.
    let anon_svid = ca
        .issuer
        .issue_x509_svid(
            &id("spiffe://east.example/unregistered"),
            HOUR,
            &[],
            &[],
            SystemTime::now(),
        )
        .unwrap();
    let e = client.renew(&anon_svid, &csr2.csr_pem()).await.unwrap_err();
    assert!(
        matches!(e, IssuerClientError::Refused { status: 403, .. }),
        "no entry: {e}"
    );
    let west = ca_west();
    let west_svid = west
        .issuer
        .issue_x509_svid(
            &id("spiffe://west.example/x"),
            HOUR,
            &[],
            &[],
            SystemTime::now(),
        )
        .unwrap();
    let e = client.renew(&west_svid, &csr2.csr_pem()).await.unwrap_err();
    assert!(
        matches!(
            e,
            IssuerClientError::Unreachable { .. } | IssuerClientError::Refused { status: 401, .. }
        ),
        "{e}"
    );

    // Deleting the entry stops renewals.
    ca.issuer.delete_entry(&web()).unwrap();
    let e = client.renew(&svid, &csr2.csr_pem()).await.unwrap_err();
    assert!(
        matches!(e, IssuerClientError::Refused { status: 403, .. }),
        "{e}"
    );
    server.stop().await;
}

fn ca_west() -> Ca {
    ca("west.example")
}

#[tokio::test]
async fn client_refuses_an_issuer_that_is_not_the_gateway() {
    let ca = Arc::new(ca("east.example"));
    let server = start(&ca).await;
    // Trusting another trust domain's bundle: the issuer's certificate does not verify.
    let west = ca_west();
    let client = IssuerClient::new(&server.url, west.issuer.bundle()).unwrap();
    assert!(matches!(
        client.bundle().await.unwrap_err(),
        IssuerClientError::Unreachable { .. }
    ));
    assert!(IssuerClient::new("http://127.0.0.1:1", ca.issuer.bundle()).is_err());
    assert!(IssuerClient::new("https://127.0.0.1:1/path", ca.issuer.bundle()).is_err());
    server.stop().await;
}

#[tokio::test]
async fn agent_attests_writes_files_and_renews() {
    let ca = Arc::new(ca("east.example"));
    // A short TTL (renewal at half of it) that still leaves room for a busy machine
    // between the issuer stopping and coming back.
    let token = register(&ca, Duration::from_secs(6));
    let server = start(&ca).await;
    let out = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::new(server.url.clone(), ca.issuer.bundle(), token, out.path());
    config.min_backoff = Duration::from_millis(50);
    let agent = Arc::new(Agent::new(config));
    let mut status = agent.status();
    let (stop, rx) = oneshot::channel::<()>();
    let runner = tokio::spawn({
        let agent = agent.clone();
        async move {
            agent
                .run(async {
                    let _ = rx.await;
                })
                .await
        }
    });
    // Attestation, then at least one renewal.
    tokio::time::timeout(
        Duration::from_secs(90),
        status.wait_for(|s| s.svids_written >= 1),
    )
    .await
    .unwrap()
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(out.path().join("key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600);
    let svid = X509Svid::from_pem(
        &std::fs::read(out.path().join("svid.pem")).unwrap(),
        Some(&std::fs::read(out.path().join("key.pem")).unwrap()),
    )
    .unwrap();
    assert_eq!(svid.spiffe_id(), &web());
    let first_leaf = svid.leaf().clone();
    tokio::time::timeout(
        Duration::from_secs(90),
        status.wait_for(|s| s.svids_written >= 2),
    )
    .await
    .unwrap()
    .unwrap();
    let renewed =
        X509Svid::from_pem(&std::fs::read(out.path().join("svid.pem")).unwrap(), None).unwrap();
    assert_ne!(
        renewed.leaf(),
        &first_leaf,
        "the file holds the renewed SVID"
    );

    // The issuer goes away: the agent keeps the files and counts failures.
    let url = server.url.clone();
    server.stop().await;
    tokio::time::timeout(
        Duration::from_secs(90),
        status.wait_for(|s| s.failures >= 2),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(out.path().join("svid.pem").exists());
    let kept =
        X509Svid::from_pem(&std::fs::read(out.path().join("svid.pem")).unwrap(), None).unwrap();
    // The issuer comes back on the same address: the agent renews on its own (its SVID was
    // still valid, so renewal over mTLS works) and the failure count clears.
    let written = status.borrow().svids_written;
    let server = start_at(&ca, url.trim_start_matches("https://")).await;
    tokio::time::timeout(
        Duration::from_secs(90),
        status.wait_for(|s| s.svids_written > written && s.failures == 0),
    )
    .await
    .unwrap()
    .unwrap();
    let back =
        X509Svid::from_pem(&std::fs::read(out.path().join("svid.pem")).unwrap(), None).unwrap();
    assert_ne!(
        back.leaf(),
        kept.leaf(),
        "renewed after the issuer returned"
    );
    server.stop().await;
    stop.send(()).unwrap();
    runner.await.unwrap().unwrap();
}
