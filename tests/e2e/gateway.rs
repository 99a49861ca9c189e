//! Two gateways for two trust domains on 127.0.0.1 with real upstreams: the data plane end
//! to end.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{
    ChannelStream, Client, Cluster, Spec, echo_upstream, futures_stream, service, tcp_echo,
    tcp_service,
};

pub const WEST_POLICIES: &str = r#"
@id("shop-reads-orders")
permit (principal in Namespace::"east.example/shop", action in Action::"read", resource == Service::"orders.shop.west");

@id("web-writes-orders")
@quota("1000/s burst 1000")
permit (principal == Workload::"spiffe://east.example/ns/shop/sa/web", action in Action::"write", resource == Service::"orders.shop.west");

@id("batch-is-slow")
@quota("1/m burst 2")
permit (principal == Workload::"spiffe://east.example/ns/batch/sa/report", action == Action::"GET", resource == Service::"orders.shop.west");

@id("tcp-echo")
permit (principal in TrustDomain::"east.example", action == Action::"connect", resource == Service::"echo.shop.west");

@id("mtls-only")
permit (principal in TrustDomain::"east.example", action == Action::"GET", resource == Service::"vault.shop.west") when { context.mtls };

@id("no-admin")
forbid (principal, action, resource) when { context.path like "/admin/*" };
"#;

pub const EAST_POLICIES: &str = r#"
@id("local-reads")
permit (principal in TrustDomain::"east.example", action in Action::"read", resource == Service::"catalog.shop.east");
"#;

/// East (callers) and West (orders, echo, secret) linked; West exports orders and echo.
pub async fn east_west() -> (Cluster, Cluster) {
    let orders = echo_upstream().await;
    let echo = tcp_echo().await;
    let catalog = echo_upstream().await;
    let west = Cluster::start(Spec {
        name: "west",
        policies: WEST_POLICIES,
        services: vec![
            service("orders", "shop", orders, &["east"]),
            tcp_service("echo", "shop", echo, &["east"]),
            service("secret", "shop", orders, &[]),
            service("vault", "shop", orders, &["east"]),
        ],
        default_quota: None,
    })
    .await;
    let east = Cluster::start(Spec {
        name: "east",
        policies: EAST_POLICIES,
        services: vec![service("catalog", "shop", catalog, &[])],
        default_quota: None,
    })
    .await;
    west.link(
        &east,
        &["orders.shop", "echo.shop", "secret.shop", "vault.shop"],
    );
    east.link(&west, &[]);
    (east, west)
}

fn web_client(east: &Cluster) -> Client {
    Client::new(east, Some(&east.svid("/ns/shop/sa/web")), &[b"http/1.1"])
}

#[tokio::test]
async fn allowed_get_reaches_upstream_with_verified_caller() {
    let (east, west) = east_west().await;
    let reply = web_client(&east)
        .get("orders.shop.west.mesh", "/v1/orders/42")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let json = reply.json();
    assert_eq!(json["caller"], "spiffe://east.example/ns/shop/sa/web");
    assert_eq!(json["path"], "/v1/orders/42");
    assert!(
        json["headers"]["traceparent"]
            .as_str()
            .unwrap()
            .starts_with("00-")
    );
    // The decision id names a record in West's log.
    let id = reply.decision_id();
    let record =
        crate::support::find_record(&west.log, &id).expect("decision record in west's log");
    assert_eq!(record.decision.as_str(), "allow");
    assert_eq!(record.principal, "spiffe://east.example/ns/shop/sa/web");
    assert_eq!(record.reasons, vec!["shop-reads-orders".to_owned()]);
    assert_eq!(
        record.source_gateway.as_deref(),
        Some("spiffe://east.example/meshgate/gateway")
    );
}

#[tokio::test]
async fn unpinned_name_and_local_service() {
    let (east, _west) = east_west().await;
    let client = web_client(&east);
    let reply = client.get("orders.shop.mesh", "/v1/orders").await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // A service of the caller's own cluster is enforced by the local gateway.
    let reply = client
        .get("catalog.shop.east.mesh", "/items")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.json()["caller"],
        "spiffe://east.example/ns/shop/sa/web"
    );
    let record = crate::support::find_record(&east.log, &reply.decision_id())
        .expect("local decision record");
    assert_eq!(record.reasons, vec!["local-reads".to_owned()]);
}

#[tokio::test]
async fn denied_request_gets_403_and_a_record() {
    let (east, west) = east_west().await;
    let client = web_client(&east);
    let reply = client
        .get("orders.shop.west.mesh", "/admin/users")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(reply.text().contains("no-admin"), "{}", reply.text());
    let record = crate::support::find_record(&west.log, &reply.decision_id()).unwrap();
    assert_eq!(record.decision.as_str(), "deny");
    assert_eq!(record.reasons, vec!["no-admin".to_owned()]);
    // Default deny: another namespace's workload.
    let other = Client::new(
        &east,
        Some(&east.svid("/ns/billing/sa/api")),
        &[b"http/1.1"],
    );
    let reply = other
        .get("orders.shop.west.mesh", "/v1/orders")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(
        reply.text().contains("no policy permits"),
        "{}",
        reply.text()
    );
}

#[tokio::test]
async fn over_quota_gets_429_with_retry_after() {
    let (east, west) = east_west().await;
    let client = Client::new(
        &east,
        Some(&east.svid("/ns/batch/sa/report")),
        &[b"http/1.1"],
    );
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            client
                .get("orders.shop.west.mesh", "/v1/orders")
                .await
                .unwrap(),
        );
    }
    assert_eq!(statuses[0].status, StatusCode::OK);
    let limited = statuses
        .iter()
        .find(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
        .expect("a 429");
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    let record = crate::support::find_record(&west.log, &limited.decision_id()).unwrap();
    assert_eq!(record.decision.as_str(), "quota_exceeded");
    assert!(record.quota_key.is_some());
}

#[tokio::test]
async fn unauthenticated_callers_are_refused() {
    let (east, west) = east_west().await;
    // No client certificate: a clear 401, recorded in the source's log.
    let anonymous = Client::new(&east, None, &[b"http/1.1"]);
    let reply = anonymous
        .get("orders.shop.west.mesh", "/v1/orders")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.text().contains("X.509-SVID"), "{}", reply.text());
    let record = crate::support::find_record(&east.log, &reply.decision_id())
        .expect("refusal recorded at the source");
    assert_eq!(record.decision.as_str(), "deny");
    // A certificate of another trust domain: the handshake fails.
    let stranger = Client::new(&east, Some(&west.svid("/ns/shop/sa/web")), &[b"http/1.1"]);
    assert!(
        stranger
            .get("orders.shop.west.mesh", "/v1/orders")
            .await
            .is_err()
    );
    // An expired certificate: the handshake fails.
    let id = meshgate_identity::SpiffeId::new(&east.td, "/ns/shop/sa/web").unwrap();
    let past = SystemTime::now() - Duration::from_secs(7200);
    let expired = east
        .issuer
        .issue_x509_svid(&id, Duration::from_secs(600), &[], &[], past)
        .unwrap();
    let client = Client::new(&east, Some(&expired), &[b"http/1.1"]);
    assert!(
        client
            .get("orders.shop.west.mesh", "/v1/orders")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn unknown_and_unexported_destinations() {
    let (east, west) = east_west().await;
    let client = web_client(&east);
    let reply = client.get("nothing.shop.west.mesh", "/").await.unwrap();
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(crate::support::find_record(&east.log, &reply.decision_id()).is_some());
    let reply = client.get("example.com", "/").await.unwrap();
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(reply.text().contains("not a mesh name"), "{}", reply.text());
    // `secret` exists in West but is not exported to East: refused and recorded by West.
    let reply = client.get("secret.shop.west.mesh", "/").await.unwrap();
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(reply.text().contains("not exported"), "{}", reply.text());
    let record = crate::support::find_record(&west.log, &reply.decision_id()).unwrap();
    assert_eq!(record.decision.as_str(), "deny");
}

#[tokio::test]
async fn client_identity_headers_never_reach_the_upstream() {
    let (east, _west) = east_west().await;
    let req = Request::get("/v1/orders")
        .header("host", "orders.shop.west.mesh")
        .header(
            "x-meshgate-caller",
            "spiffe://west.example/ns/admin/sa/root",
        )
        .header("x-meshgate-caller-svid", "forged")
        .header("x-meshgate-decision-id", "forged")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = web_client(&east).send(req).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let json = reply.json();
    assert_eq!(json["caller"], "spiffe://east.example/ns/shop/sa/web");
    let headers = json["headers"].as_object().unwrap();
    assert!(!headers.contains_key("x-meshgate-caller-svid"));
    assert!(!headers.contains_key("x-meshgate-decision-id"));
    assert_ne!(reply.decision_id(), "forged");
}

#[tokio::test]
async fn http2_and_grpc_trailers_pass() {
    let (east, _west) = east_west().await;
    let client = Client::new(&east, Some(&east.svid("/ns/shop/sa/web")), &[b"h2"]);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-request-checksum", "abc".parse().unwrap());
    let frames = vec![
        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\x05hello"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = Request::post("https://orders.shop.west.mesh/grpc")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(futures_stream(frames.into_iter())))
        .unwrap();
    let reply = client.send(req).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let trailers = reply.trailers.clone().expect("response trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    let json = reply.json();
    assert_eq!(json["body_len"], 10);
    assert_eq!(json["request_trailers"]["x-request-checksum"], "abc");
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    // Up and back in lock step through both gateways and the tunnel: each 1 MiB chunk is
    // sent only after the previous one came back from the upstream. A hop that held a
    // whole body before passing it on would stall this for ever, so passing proves every hop
    // streams, however slow the machine (no timeout is raced: the upstream answers at once).
    // 48 MiB is more than every window and buffer on the path (QUIC stream and connection
    // windows, hyper's buffers, the gateways' channels).
    const CHUNK: usize = 1024 * 1024;
    const CHUNKS: usize = 48;
    let (east, _west) = east_west().await;
    let client = web_client(&east);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
    let req = Request::post("/stream-echo")
        .header("host", "orders.shop.west.mesh")
        .body(StreamBody::new(ChannelStream(rx)))
        .unwrap();
    let resp = client.open(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("x-meshgate-decision-id"));
    let mut body = resp.into_body();
    for i in 0..CHUNKS {
        let byte = i as u8;
        tx.send(Ok(Frame::data(Bytes::from(vec![byte; CHUNK]))))
            .await
            .unwrap();
        let mut got = 0;
        while got < CHUNK {
            let frame = body.frame().await.expect("the echo ended early").unwrap();
            let data = frame.into_data().unwrap();
            assert!(
                data.iter().all(|b| *b == byte),
                "chunk {i} came back changed"
            );
            got += data.len();
        }
        assert_eq!(got, CHUNK, "chunk {i}");
    }
    drop(tx);
    while let Some(frame) = body.frame().await {
        assert!(frame.unwrap().into_data().map_or(true, |d| d.is_empty()));
    }
    // Download: 64 MiB, counted as it arrives.
    const SIZE: usize = 64 * 1024 * 1024;
    let req = Request::get(format!("/bytes/{SIZE}"))
        .header("host", "orders.shop.west.mesh")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.open(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        len += frame.unwrap().into_data().map_or(0, |d| d.len());
    }
    assert_eq!(len, SIZE);
}

#[tokio::test]
async fn tcp_through_connect() {
    let (east, west) = east_west().await;
    let client = web_client(&east);
    let mut tunnel = client
        .connect_tunnel("echo.shop.west.mesh:7")
        .await
        .unwrap();
    for round in 0..3 {
        let msg = format!("hello through the mesh {round}");
        tunnel.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), tunnel.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(buf, msg.as_bytes());
    }
    let records = west.log.query(&meshgate_policy::Filter::default()).unwrap();
    assert!(
        records
            .iter()
            .any(|r| r.action == "connect" && r.decision.as_str() == "allow")
    );
    // `connect` to a service without a connect permit is refused.
    assert!(
        client
            .connect_tunnel("orders.shop.west.mesh:80")
            .await
            .unwrap_err()
            .contains("403")
    );
}

#[tokio::test]
async fn curl_calls_through_both_styles() {
    let (east, _west) = east_west().await;
    let files = east.svid_files("/ns/shop/sa/web");
    let f = |name: &str| files.path().join(name).to_string_lossy().into_owned();
    let port = east.gateway.addrs().workload.port();
    // Direct: the destination in `Host`.
    let direct = crate::procs::tokio_tool("curl")
        .args([
            "-sS",
            "--fail-with-body",
            "--cacert",
            &f("bundle.pem"),
            "--cert",
            &f("svid.pem"),
            "--key",
            &f("key.pem"),
        ])
        .args([
            "-H",
            "host: orders.shop.west.mesh",
            &format!("https://localhost:{port}/v1/orders/42"),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        direct.status.success(),
        "{}",
        String::from_utf8_lossy(&direct.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&direct.stdout).unwrap();
    assert_eq!(json["caller"], "spiffe://east.example/ns/shop/sa/web");
    // HTTPS forward proxy: absolute-form URI.
    let proxy = crate::procs::tokio_tool("curl")
        .args([
            "-sS",
            "--fail-with-body",
            "--proxy",
            &format!("https://localhost:{port}"),
        ])
        .args([
            "--proxy-cacert",
            &f("bundle.pem"),
            "--proxy-cert",
            &f("svid.pem"),
            "--proxy-key",
            &f("key.pem"),
        ])
        .arg("http://orders.shop.west.mesh/v1/orders/42")
        .output()
        .await
        .unwrap();
    assert!(
        proxy.status.success(),
        "{}",
        String::from_utf8_lossy(&proxy.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&proxy.stdout).unwrap();
    assert_eq!(json["caller"], "spiffe://east.example/ns/shop/sa/web");
    assert_eq!(json["path"], "/v1/orders/42");
}

#[tokio::test]
async fn a_peer_that_stops_trusting_us_is_failed_over() {
    let (east, west) = east_west().await;
    let north = Cluster::start(Spec {
        name: "north",
        policies: r#"@id("east-reads") permit (principal in TrustDomain::"east.example", action in Action::"read", resource == Service::"orders.shop.north");"#,
        services: vec![service("orders", "shop", echo_upstream().await, &["east"])],
        default_quota: None,
    })
    .await;
    north.link(&east, &["orders.shop"]);
    east.link(&north, &[]);
    let client = web_client(&east);
    let first = client.get("orders.shop.mesh", "/v1/orders").await.unwrap();
    assert_eq!(first.status, StatusCode::OK);
    assert!(
        crate::support::find_record(&west.log, &first.decision_id()).is_some(),
        "west is preferred"
    );
    // West drops east's bundle (its side of the link is gone): east's certificate is now
    // refused there, after east's own handshake completed. GETs fail over to north.
    west.bundles.remove(&east.td);
    west.gateway.disconnect_trust_domain(&east.td);
    for i in 0..5 {
        let reply = client
            .get("orders.shop.mesh", &format!("/v1/orders/{i}"))
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::OK, "call {i}: {}", reply.text());
        assert!(
            crate::support::find_record(&north.log, &reply.decision_id()).is_some(),
            "call {i} served by north"
        );
    }
}
