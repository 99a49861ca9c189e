//! Operating the gateway: abuse limits, request smuggling, reserved paths, retries and
//! outlier ejection, SVID rotation without dropping connections, graceful drain, metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::gateway::{EAST_POLICIES, WEST_POLICIES, east_west};
use crate::support::{Client, Cluster, Spec, echo_upstream, service};

/// A raw TLS connection to east's workload listener presenting `web`'s SVID.
async fn raw_tls(east: &Cluster) -> tokio_rustls::client::TlsStream<TcpStream> {
    let svid = east.svid("/ns/shop/sa/web");
    let mut roots = rustls::RootCertStore::empty();
    for root in east.issuer.bundle().x509_roots() {
        roots.add(root.clone()).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(meshgate_identity::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                svid.cert_chain().to_vec(),
                svid.private_key().unwrap().clone_key(),
            )
            .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(east.gateway.addrs().workload)
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1")
        .unwrap()
        .to_owned();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Sends raw bytes and reads the response head (or EOF) within a deadline.
async fn raw_exchange(east: &Cluster, request: &[u8]) -> String {
    let mut tls = raw_tls(east).await;
    tls.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), tls.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn request_smuggling_is_not_possible() {
    let (east, west) = east_west().await;
    // CL.TE: `Content-Length` says 5 bytes, `Transfer-Encoding` says chunked with an empty
    // body, and a second request hides behind it. hyper resolves the ambiguity as RFC 9112
    // requires (Transfer-Encoding wins) and closes the connection after the response, and
    // the gateway re-frames what it forwards, so the hidden request never runs.
    let smuggle = b"GET /v1/orders HTTP/1.1\r\nHost: orders.shop.west.mesh\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/orders/smuggled HTTP/1.1\r\nHost: orders.shop.west.mesh\r\n\r\n";
    let mut tls = raw_tls(&east).await;
    tls.write_all(smuggle).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut all))
        .await
        .expect("the gateway closes the connection")
        .ok();
    let text = String::from_utf8_lossy(&all);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    let records = west.log.query(&meshgate_policy::Filter::default()).unwrap();
    assert!(
        records.iter().all(|r| !r.raw_path.contains("smuggled")),
        "{records:?}"
    );
    // Two different `Content-Length` values: refused outright.
    let dup = b"POST /v1/orders HTTP/1.1\r\nHost: orders.shop.west.mesh\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!";
    let reply = raw_exchange(&east, dup).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
}

#[tokio::test]
async fn reserved_paths_never_leave_a_workload() {
    let (east, west) = east_west().await;
    let client = Client::new(&east, Some(&east.svid("/ns/shop/sa/web")), &[b"http/1.1"]);
    for path in [
        "/.meshgate/v1/bundle",
        "//.meshgate/v1/bundle",
        "/v1/../.meshgate/v1/bundle",
    ] {
        let reply = client.get("orders.shop.west.mesh", path).await.unwrap();
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{path}: {}",
            reply.text()
        );
        assert!(reply.text().contains("reserved"), "{}", reply.text());
    }
    assert!(
        west.log
            .query(&meshgate_policy::Filter::default())
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn oversized_headers_and_slow_headers_are_cut_off() {
    let orders = echo_upstream().await;
    let east = Cluster::start_with(
        Spec {
            name: "east",
            policies: EAST_POLICIES,
            services: vec![service("catalog", "shop", orders, &[])],
            default_quota: None,
        },
        |c| {
            c.limits.max_header_bytes = 8 * 1024;
            c.limits.header_read_timeout = Duration::from_millis(500);
        },
    )
    .await;
    let big = format!(
        "GET /items HTTP/1.1\r\nHost: catalog.shop.east.mesh\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let reply = raw_exchange(&east, big.as_bytes()).await;
    assert!(
        reply.starts_with("HTTP/1.1 431") || reply.is_empty(),
        "{reply}"
    );
    // Slowloris: half a request head, then silence; the gateway closes the connection.
    let mut tls = raw_tls(&east).await;
    tls.write_all(b"GET /items HTTP/1.1\r\nHost: catalog.shop.east.mesh\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(20), tls.read(&mut buf))
        .await
        .expect("the gateway closed the slow connection");
    assert!(started.elapsed() < Duration::from_secs(15));
    let text = String::from_utf8_lossy(&buf[..read.unwrap_or(0)]).into_owned();
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

#[tokio::test]
async fn dead_endpoints_are_retried_around_and_ejected() {
    let live = echo_upstream().await;
    // Two broken endpoints that accept and hang up at once, counting the connections they
    // get: proof that the gateway really tried them (and retried around them).
    let mut broken = Vec::new();
    let tries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        broken.push(listener.local_addr().unwrap().to_string());
        let tries = tries.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                drop(tcp);
            }
        });
    }
    let mut svc = service("catalog", "shop", live, &[]);
    svc.endpoints = vec![broken[0].clone(), broken[1].clone(), live.to_string()];
    svc.retries = 2;
    let east = Cluster::start(Spec {
        name: "east",
        policies: EAST_POLICIES,
        services: vec![svc],
        default_quota: None,
    })
    .await;
    let client = Client::new(&east, Some(&east.svid("/ns/shop/sa/web")), &[b"http/1.1"]);
    for i in 0..30 {
        let reply = client
            .get("catalog.shop.east.mesh", "/items")
            .await
            .unwrap();
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "request {i}: {}",
            reply.text()
        );
    }
    // The broken endpoints were tried, and every such failure was retried around: none
    // reached a caller.
    assert!(
        tries.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the broken endpoints were never tried"
    );
    let metrics = east.gateway.metrics().encode();
    assert!(
        metrics.contains("meshgate_upstream_failures_total 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn svid_rotation_keeps_connections_and_new_ones_get_the_new_cert() {
    let orders = echo_upstream().await;
    let west = Cluster::start_with(
        Spec {
            name: "west",
            policies: WEST_POLICIES,
            services: vec![service("orders", "shop", orders, &["east"])],
            default_quota: None,
        },
        |c| c.identity.svid_ttl = Duration::from_secs(4),
    )
    .await;
    let east = Cluster::start(Spec {
        name: "east",
        policies: EAST_POLICIES,
        services: vec![],
        default_quota: None,
    })
    .await;
    west.link(&east, &["orders.shop"]);
    east.link(&west, &[]);
    let client = Client::new(&east, Some(&east.svid("/ns/shop/sa/web")), &[b"http/1.1"]);
    assert_eq!(
        client
            .get("orders.shop.west.mesh", "/v1/orders")
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    let first = west.gateway.svid_not_after();
    // Wait for the renewal (half of 4 s), then keep calling over the same tunnel connection.
    let deadline = Instant::now() + Duration::from_secs(30);
    while west.gateway.svid_not_after() == first {
        assert!(Instant::now() < deadline, "west never renewed its SVID");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..3 {
        assert_eq!(
            client
                .get("orders.shop.west.mesh", "/v1/orders")
                .await
                .unwrap()
                .status,
            StatusCode::OK
        );
    }
    // Once the original SVID has expired, new connections still verify (they get the new one).
    while std::time::SystemTime::now() <= first {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fresh = Cluster::start(Spec {
        name: "east",
        policies: EAST_POLICIES,
        services: vec![],
        default_quota: None,
    })
    .await;
    west.link(&fresh, &["orders.shop"]);
    fresh.link(&west, &[]);
    let fresh_client = Client::new(&fresh, Some(&fresh.svid("/ns/shop/sa/web")), &[b"http/1.1"]);
    let reply = fresh_client
        .get("orders.shop.west.mesh", "/v1/orders")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test]
async fn graceful_shutdown_drains_requests_in_flight() {
    let (east, west) = east_west().await;
    let client = Arc::new(Client::new(
        &east,
        Some(&east.svid("/ns/shop/sa/web")),
        &[b"http/1.1"],
    ));
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.get("orders.shop.west.mesh", "/delay/1500").await })
    };
    // Wait until the slow request is recorded (it is in flight), then shut West down.
    let deadline = Instant::now() + Duration::from_secs(20);
    while west
        .log
        .query(&meshgate_policy::Filter::default())
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let Cluster { gateway, log, .. } = west;
    gateway.shutdown().await;
    let reply = slow.await.unwrap().unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), "slow\n");
    // After shutdown the peer is gone: a new call fails fast with a clear status.
    let started = Instant::now();
    let reply = client
        .get("orders.shop.west.mesh", "/v1/orders")
        .await
        .unwrap();
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    drop(log);
}

#[tokio::test]
async fn metrics_and_health_on_the_admin_listener() {
    let (east, west) = east_west().await;
    let client = Client::new(&east, Some(&east.svid("/ns/shop/sa/web")), &[b"http/1.1"]);
    assert_eq!(
        client
            .get("orders.shop.west.mesh", "/v1/orders")
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    assert_eq!(
        client
            .get("orders.shop.west.mesh", "/admin/x")
            .await
            .unwrap()
            .status,
        StatusCode::FORBIDDEN
    );
    let admin = west.gateway.addrs().admin;
    let get = |path: &'static str| async move {
        let tcp = TcpStream::connect(admin).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let resp = sender
            .send_request(
                Request::get(path)
                    .header("host", "admin")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    assert_eq!(get("/healthz").await.0, StatusCode::OK);
    assert_eq!(get("/readyz").await.0, StatusCode::OK);
    let (status, text) = get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains(r#"meshgate_requests_total{direction="inbound",source="east.example",destination="orders.shop.west",decision="allow",status="200"} 1"#), "{text}");
    assert!(
        text.contains(r#"decision="deny",status="403"} 1"#),
        "{text}"
    );
    assert!(text.contains("meshgate_quic_connections 1"), "{text}");
    assert!(
        text.contains("meshgate_svid_expiry_timestamp_seconds"),
        "{text}"
    );
    assert!(
        text.contains("meshgate_policy_decision_seconds_count"),
        "{text}"
    );
}

#[tokio::test]
async fn loopback_listener_takes_jwt_svid_bearer_tokens() {
    let (east, _west) = east_west().await;
    let addr = east
        .gateway
        .addrs()
        .workload_local
        .expect("workload_local listener");
    let web = meshgate_identity::SpiffeId::new(&east.td, "/ns/shop/sa/web").unwrap();
    let now = std::time::SystemTime::now();
    let gateway_aud = "spiffe://east.example/meshgate/gateway".to_owned();
    let good = east
        .issuer
        .mint_jwt_svid(
            &web,
            std::slice::from_ref(&gateway_aud),
            Duration::from_secs(60),
            now,
        )
        .unwrap();
    let other_aud = east
        .issuer
        .mint_jwt_svid(
            &web,
            &["spiffe://east.example/other".to_owned()],
            Duration::from_secs(60),
            now,
        )
        .unwrap();
    let call = |token: Option<String>| async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut req = Request::get("/v1/orders").header("host", "orders.shop.west.mesh");
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = sender
            .send_request(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    let (status, body) = call(Some(good.token)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("\"caller\":\"spiffe://east.example/ns/shop/sa/web\""),
        "{body}"
    );
    // The bearer token is the gateway's, never forwarded.
    assert!(!body.contains("authorization"), "{body}");
    let (status, body) = call(None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    // A bearer-token caller did not use mTLS, and the destination knows it (signed `amr`):
    // a policy that requires `context.mtls` refuses it, and admits the same caller over mTLS.
    let vault = east
        .issuer
        .mint_jwt_svid(
            &web,
            std::slice::from_ref(&gateway_aud),
            Duration::from_secs(60),
            now,
        )
        .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/secret")
        .header("host", "vault.shop.west.mesh")
        .header("authorization", format!("Bearer {}", vault.token))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(
        sender.send_request(req).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let mtls_client = Client::new(&east, Some(&east.svid("/ns/shop/sa/web")), &[b"http/1.1"]);
    assert_eq!(
        mtls_client
            .get("vault.shop.west.mesh", "/secret")
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    let (status, body) = call(Some(other_aud.token)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("bearer token rejected"), "{body}");
}

#[tokio::test]
async fn connection_limit_closes_extra_connections() {
    let orders = echo_upstream().await;
    let east = Cluster::start_with(
        Spec {
            name: "east",
            policies: EAST_POLICIES,
            services: vec![service("catalog", "shop", orders, &[])],
            default_quota: None,
        },
        |c| c.limits.max_connections = 2,
    )
    .await;
    let _a = raw_tls(&east).await;
    let _b = raw_tls(&east).await;
    // The third connection is accepted by the kernel and closed by the gateway at once.
    let tcp = TcpStream::connect(east.gateway.addrs().workload)
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let mut tcp = tcp;
    let n = tokio::time::timeout(Duration::from_secs(20), tcp.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}

#[tokio::test]
async fn header_values_policies_cannot_see_are_refused() {
    let (east, west) = east_west().await;
    // `\xff` is obs-text: hyper accepts it, Cedar could not see it as a string.
    let mut request =
        b"GET /v1/orders HTTP/1.1\r\nHost: orders.shop.west.mesh\r\nX-Admin-Override: 1".to_vec();
    request.push(0xff);
    request.extend_from_slice(b"\r\n\r\n");
    let reply = raw_exchange(&east, &request).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("x-admin-override"), "{reply}");
    assert!(
        west.log
            .query(&meshgate_policy::Filter::default())
            .unwrap()
            .is_empty()
    );
}
