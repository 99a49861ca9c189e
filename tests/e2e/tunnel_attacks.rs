//! Attacks on the tunnel from something that holds a certificate: a workload posing as a
//! gateway, a gateway with a forged caller token, a token for another audience, a gateway
//! speaking for another trust domain. Each is refused by the destination gateway.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes};
use meshgate_identity::{PeerAuthorizer, SpiffeId, SpiffeServerVerifier, X509Svid};

use crate::gateway::east_west;
use crate::support::Cluster;

/// A raw HTTP/3 client to `west`'s tunnel presenting `svid`.
async fn h3_to(
    west: &Cluster,
    trusting: &Cluster,
    svid: &X509Svid,
) -> Result<h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>, String> {
    h3_client(
        west.gateway.addrs().tunnel,
        &west.td,
        &trusting.bundles,
        svid,
    )
    .await
}

/// A raw HTTP/3 client to the gateway of `td` at `addr`, verified with `bundles`,
/// presenting `svid`.
pub async fn h3_client(
    addr: std::net::SocketAddr,
    td: &meshgate_identity::TrustDomain,
    bundles: &meshgate_identity::BundleSet,
    svid: &X509Svid,
) -> Result<h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>, String> {
    let verifier = SpiffeServerVerifier::new(
        bundles.clone(),
        PeerAuthorizer::Exact(SpiffeId::gateway(td)),
    );
    let mut tls = rustls::ClientConfig::builder_with_provider(meshgate_identity::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(
            svid.cert_chain().to_vec(),
            svid.private_key().unwrap().clone_key(),
        )
        .unwrap();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(addr, "gateway.meshgate.invalid")
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
    Ok(send)
}

async fn call(
    send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    let mut req = http::Request::get("https://orders.shop.west/v1/orders");
    if let Some(t) = token {
        req = req.header("x-meshgate-caller-svid", t);
    }
    let mut stream = send
        .send_request(req.body(()).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    stream.finish().await.map_err(|e| e.to_string())?;
    let resp = stream.recv_response().await.map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.map_err(|e| e.to_string())? {
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    Ok((
        resp.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

fn gateway_svid(cluster: &Cluster) -> X509Svid {
    cluster
        .issuer
        .issue_x509_svid(
            &SpiffeId::gateway(&cluster.td),
            Duration::from_secs(600),
            &[],
            &[],
            SystemTime::now(),
        )
        .unwrap()
}

#[tokio::test]
async fn a_workload_cannot_pose_as_a_gateway() {
    let (east, west) = east_west().await;
    let workload = east.svid("/ns/shop/sa/web");
    let result = match h3_to(&west, &east, &workload).await {
        Err(e) => Err(e),
        Ok(mut send) => call(&mut send, None).await,
    };
    assert!(
        result.is_err(),
        "a workload SVID was accepted on the tunnel: {result:?}"
    );
}

#[tokio::test]
async fn forged_and_misdirected_caller_tokens_are_refused() {
    let (east, west) = east_west().await;
    let mut send = h3_to(&west, &east, &gateway_svid(&east)).await.unwrap();
    let web = SpiffeId::new(&east.td, "/ns/shop/sa/web").unwrap();
    let aud = "spiffe://west.example/ns/shop/svc/orders".to_owned();
    let now = SystemTime::now();

    // A genuine token works: the baseline, so the refusals below mean something.
    let good = east
        .issuer
        .mint_jwt_svid(
            &web,
            std::slice::from_ref(&aud),
            Duration::from_secs(60),
            now,
        )
        .unwrap();
    let (status, body) = call(&mut send, Some(&good.token)).await.unwrap();
    assert_eq!(status, 200, "{body}");

    // No token at all.
    let (status, body) = call(&mut send, None).await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("no caller identity"), "{body}");

    // A forged token: signed by a trust domain West does not know.
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().temporary(true).open().unwrap();
    let rogue =
        meshgate_identity::Issuer::init(&db, dir.path(), "east.example".parse().unwrap(), now)
            .unwrap();
    let forged = rogue
        .mint_jwt_svid(
            &web,
            std::slice::from_ref(&aud),
            Duration::from_secs(60),
            now,
        )
        .unwrap();
    let (status, body) = call(&mut send, Some(&forged.token)).await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("caller token rejected"), "{body}");

    // A tampered token: payload swapped for another caller's.
    let mut parts: Vec<&str> = good.token.split('.').collect();
    let other = east
        .issuer
        .mint_jwt_svid(
            &SpiffeId::new(&east.td, "/ns/admin/sa/root").unwrap(),
            std::slice::from_ref(&aud),
            Duration::from_secs(60),
            now,
        )
        .unwrap();
    let other_payload = other.token.split('.').nth(1).unwrap().to_owned();
    parts[1] = &other_payload;
    let (status, _) = call(&mut send, Some(&parts.join("."))).await.unwrap();
    assert_eq!(status, 403);

    // A token for another audience.
    let wrong_aud = east
        .issuer
        .mint_jwt_svid(
            &web,
            &["spiffe://west.example/ns/shop/svc/payments".to_owned()],
            Duration::from_secs(60),
            now,
        )
        .unwrap();
    let (status, body) = call(&mut send, Some(&wrong_aud.token)).await.unwrap();
    assert_eq!(status, 403, "{body}");

    // An expired token.
    let old = east
        .issuer
        .mint_jwt_svid(
            &web,
            std::slice::from_ref(&aud),
            Duration::from_secs(60),
            now - Duration::from_secs(600),
        )
        .unwrap();
    let (status, _) = call(&mut send, Some(&old.token)).await.unwrap();
    assert_eq!(status, 403);

    // East's gateway speaking for a West workload: a gateway speaks only for its own domain.
    let west_caller = west
        .issuer
        .mint_jwt_svid(
            &SpiffeId::new(&west.td, "/ns/shop/sa/web").unwrap(),
            std::slice::from_ref(&aud),
            Duration::from_secs(60),
            now,
        )
        .unwrap();
    let (status, body) = call(&mut send, Some(&west_caller.token)).await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("may not speak for"), "{body}");

    // Every refusal is in West's log.
    let records = west.log.query(&meshgate_policy::Filter::default()).unwrap();
    let denies = records
        .iter()
        .filter(|r| r.decision.as_str() == "deny")
        .count();
    assert!(denies >= 6, "{denies} deny records");
}

/// A compromised East gateway signs, with East's real JWT key, a caller token that stays
/// valid for a year (East's own issuer would refuse to mint one). West refuses it: a caller
/// token may live at most `identity.caller_jwt_ttl` plus the leeway.
#[tokio::test]
async fn a_year_long_caller_token_from_a_peer_is_refused() {
    let (east, west) = east_west().await;
    let mut send = h3_to(&west, &east, &gateway_svid(&east)).await.unwrap();
    let keys = east._dir.path().join("keys");
    let key_file = std::fs::read_dir(&keys)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("identity-jwt-"))
        })
        .expect("east's JWT key file");
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&std::fs::read(key_file).unwrap()).unwrap();
    let bundle = east.issuer.bundle();
    let kid = bundle.jwt_keys().keys().next().unwrap().clone();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sign = |lifetime: u64| {
        jsonwebtoken::encode(
            &header,
            &serde_json::json!({
                "sub": "spiffe://east.example/ns/shop/sa/web",
                "aud": ["spiffe://west.example/ns/shop/svc/orders"],
                "iat": now,
                "exp": now + lifetime,
                "amr": ["x509"],
            }),
            &key,
        )
        .unwrap()
    };
    // The same hand-made token with an ordinary lifetime passes: the refusal below is about
    // the lifetime alone.
    let (status, body) = call(&mut send, Some(&sign(60))).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(&mut send, Some(&sign(365 * 24 * 3600))).await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("caller token rejected: it expires in"),
        "{body}"
    );
    let records = west.log.query(&meshgate_policy::Filter::default()).unwrap();
    assert!(
        records
            .iter()
            .any(|r| r.errors.iter().any(|e| e.contains("expires in"))),
        "the refusal is recorded"
    );
}

#[tokio::test]
async fn control_requests_share_the_tunnel_without_breaking_it() {
    let (east, west) = east_west().await;
    let control = east.gateway.control_client();
    let addr = west.gateway.addrs().tunnel;
    // A path-only URI is completed by the client (h3 would otherwise fail the connection).
    let reply = control
        .send(
            addr,
            &west.td,
            http::Request::get("/.meshgate/v1/anything")
                .body(Bytes::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        reply.status(),
        http::StatusCode::NOT_FOUND,
        "these test clusters have no control handler"
    );
    // Non-control paths are refused before anything is sent.
    assert!(
        control
            .send(
                addr,
                &west.td,
                http::Request::get("/v1/orders").body(Bytes::new()).unwrap()
            )
            .await
            .is_err()
    );
    // Data calls still flow on the same connection.
    let client =
        crate::support::Client::new(&east, Some(&east.svid("/ns/shop/sa/web")), &[b"http/1.1"]);
    assert_eq!(
        client
            .get("orders.shop.west.mesh", "/v1/orders")
            .await
            .unwrap()
            .status,
        http::StatusCode::OK
    );
    assert!(
        east.gateway
            .metrics()
            .encode()
            .contains("meshgate_quic_connections 1")
    );
}

/// A peer gateway names destinations of its choosing in `:authority`. Only a name West
/// resolved to one of its services becomes a metric label; anything else is `unknown`, so a
/// peer cannot grow West's `/metrics` without bound.
#[tokio::test]
async fn a_peers_authority_never_becomes_a_metric_label_unchecked() {
    let (east, west) = east_west().await;
    let mut send = h3_to(&west, &east, &gateway_svid(&east)).await.unwrap();
    for i in 0..20 {
        let req = http::Request::get(format!("https://junk{i}.shop.west/v1"))
            .body(())
            .unwrap();
        let mut stream = send.send_request(req).await.unwrap();
        stream.finish().await.unwrap();
        let resp = stream.recv_response().await.unwrap();
        assert_eq!(resp.status(), 404);
    }
    let metrics = west.gateway.metrics().encode();
    assert!(!metrics.contains("junk"), "{metrics}");
    assert!(
        metrics.contains(r#"destination="unknown""#),
        "the refusals are counted: {metrics}"
    );
}
