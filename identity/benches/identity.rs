#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Issuer throughput: X.509-SVID issuance, JWT-SVID sign and verify, chain verification.

use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use meshgate_identity::{BundleSet, Issuer, SpiffeId, Usage, verify_jwt_svid, verify_x509_svid};

fn issuer() -> (tempfile::TempDir, Issuer) {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("db"))
        .cache_capacity(8 << 20)
        .open()
        .unwrap();
    let issuer = Issuer::init(
        &db,
        &keys,
        "east.example".parse().unwrap(),
        SystemTime::now(),
    )
    .unwrap();
    (dir, issuer)
}

fn benches(c: &mut Criterion) {
    let (_dir, issuer) = issuer();
    let id: SpiffeId = "spiffe://east.example/ns/shop/sa/web".parse().unwrap();
    let aud = vec!["spiffe://west.example/ns/shop/svc/orders".to_owned()];
    let hour = Duration::from_secs(3600);
    let bundles = BundleSet::from_bundles([issuer.bundle()]);

    c.bench_function(
        "x509_svid_issue (keygen + sign + record serial + flush)",
        |b| {
            b.iter(|| {
                issuer
                    .issue_x509_svid(&id, hour, &[], &[], SystemTime::now())
                    .unwrap()
            })
        },
    );
    let csr = meshgate_identity::CsrAndKey::generate(Some(&id)).unwrap();
    c.bench_function("x509_svid_sign_csr (sign + record serial + flush)", |b| {
        b.iter(|| {
            issuer
                .sign_csr(&csr.csr_der, &id, hour, SystemTime::now())
                .unwrap()
        })
    });
    c.bench_function("jwt_svid_sign", |b| {
        b.iter(|| {
            issuer
                .mint_jwt_svid(&id, &aud, Duration::from_secs(300), SystemTime::now())
                .unwrap()
        })
    });
    let token = issuer
        .mint_jwt_svid(&id, &aud, Duration::from_secs(300), SystemTime::now())
        .unwrap()
        .token;
    c.bench_function("jwt_svid_verify", |b| {
        b.iter(|| {
            verify_jwt_svid(
                &token,
                &bundles,
                &aud[0],
                SystemTime::now(),
                Duration::from_secs(5),
            )
            .unwrap()
        })
    });
    let svid = issuer
        .issue_x509_svid(&id, hour, &[], &[], SystemTime::now())
        .unwrap();
    c.bench_function("x509_chain_verify", |b| {
        b.iter(|| {
            verify_x509_svid(
                svid.cert_chain(),
                &bundles,
                Usage::Client,
                SystemTime::now(),
            )
            .unwrap()
        })
    });
}

criterion_group!(identity, benches);
criterion_main!(identity);
