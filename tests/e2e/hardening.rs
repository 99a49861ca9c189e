//! Attacks from the security review (issue 11), each performed against real gateways and
//! shown to fail: double-encoded paths, `x-meshgate-*` in trailers, …

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::StreamBody;
use hyper::body::Frame;

use crate::gateway::east_west;
use crate::support::{Client, Cluster, Spec, echo_upstream, futures_stream, service};

/// `GET https://<east's workload listener>/<path>` with `host: <authority>`, by real curl
/// presenting `web`'s SVID; the status and body.
async fn curl_get(east: &Cluster, authority: &str, path: &str) -> (u16, String) {
    let files = east.svid_files("/ns/shop/sa/web");
    let f = |name: &str| files.path().join(name).to_string_lossy().into_owned();
    let port = east.gateway.addrs().workload.port();
    let out = crate::procs::tokio_tool("curl")
        .args(["-sS", "--path-as-is", "-w", "\n%{http_code}"])
        .args(["--cacert", &f("bundle.pem"), "--cert", &f("svid.pem")])
        .args(["--key", &f("key.pem"), "-H", &format!("host: {authority}")])
        .arg(format!("https://localhost:{port}{path}"))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_owned())
}

/// `/%2561dmin` is `/admin` to an upstream that decodes twice; the `no-admin` forbid
/// never saw `/admin`. The gateway refuses it (West decides; the refusal and its reason are
/// recorded there, the caller reads only that evaluation failed)
/// while a single `%25` stays an ordinary character.
#[tokio::test]
async fn double_encoded_paths_are_refused() {
    let (east, west) = east_west().await;
    // The baseline: a single encoding is folded and the forbid applies.
    let (status, body) = curl_get(&east, "orders.shop.west.mesh", "/%61dmin/users").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("no-admin"), "{body}");
    for path in [
        "/%2561dmin/users",
        "/%2561DMIN/users",
        "/x/%252e%252e/admin/users",
    ] {
        let (status, body) = curl_get(&east, "orders.shop.west.mesh", path).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("policy evaluation failed"), "{path}: {body}");
    }
    let records = west.log.query(&meshgate_policy::Filter::default()).unwrap();
    let refused = records
        .iter()
        .filter(|r| r.errors.iter().any(|e| e.contains("double-encoded")))
        .count();
    assert_eq!(refused, 3, "each refusal is recorded at the destination");
    // `%25` not followed by two hex digits is an ordinary `%`.
    let (status, body) = curl_get(&east, "orders.shop.west.mesh", "/v1/100%25off").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["path"], "/v1/100%25off");
}

/// With `paths.allow_double_encoding = true` the operator takes the risk: the path is
/// decided on and forwarded as it is, still encoded.
#[tokio::test]
async fn double_encoding_can_be_allowed_by_the_operator() {
    let upstream = echo_upstream().await;
    let spec = |name| Spec {
        name,
        policies: r#"
@id("reads")
permit (principal, action in Action::"read", resource == Service::"catalog.shop.east");
@id("no-admin")
forbid (principal, action, resource) when { context.path like "/admin*" };
"#,
        services: vec![service("catalog", "shop", upstream, &[])],
        default_quota: None,
    };
    let strict = Cluster::start(spec("east")).await;
    let (status, body) = curl_get(&strict, "catalog.shop.east.mesh", "/%2561dmin").await;
    assert_eq!(status, 403, "{body}");
    let records = strict
        .log
        .query(&meshgate_policy::Filter::default())
        .unwrap();
    assert!(
        records
            .iter()
            .any(|r| r.errors.iter().any(|e| e.contains("double-encoded path"))),
        "{records:?}"
    );

    let lax = Cluster::start_with(spec("east"), |c| c.paths.allow_double_encoding = true).await;
    let (status, body) = curl_get(&lax, "catalog.shop.east.mesh", "/%2561dmin").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["path"], "/%2561dmin");
    let (status, _) = curl_get(&lax, "catalog.shop.east.mesh", "/%61dmin").await;
    assert_eq!(status, 403, "the other rules still hold");
}

/// A workload puts `x-meshgate-caller` (and a caller token) in its request *trailers*, and an
/// upstream puts a forged `x-meshgate-decision-id` in its response trailers. Neither reaches
/// the other side; ordinary trailers still do (gRPC).
#[tokio::test]
async fn meshgate_fields_in_trailers_are_stripped_both_ways() {
    let (east, _west) = east_west().await;
    let client = Client::new(&east, Some(&east.svid("/ns/shop/sa/web")), &[b"h2"]);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-request-checksum", "abc".parse().unwrap());
    trailers.insert(
        "x-meshgate-caller",
        "spiffe://west.example/ns/ops/sa/root".parse().unwrap(),
    );
    trailers.insert("x-meshgate-caller-svid", "e30.e30.sig".parse().unwrap());
    let frames = vec![
        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\x05hello"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = Request::post("https://orders.shop.west.mesh/grpc-forge")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(futures_stream(frames.into_iter())))
        .unwrap();
    let reply = client.send(req).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let json = reply.json();
    let seen = json["request_trailers"]
        .as_object()
        .expect("request trailers");
    assert_eq!(seen["x-request-checksum"], "abc", "{seen:?}");
    assert!(
        seen.keys().all(|k| !k.starts_with("x-meshgate-")),
        "the upstream saw {seen:?}"
    );
    assert_eq!(json["caller"], "spiffe://east.example/ns/shop/sa/web");
    let trailers = reply.trailers.clone().expect("response trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert!(
        trailers
            .keys()
            .all(|k| !k.as_str().starts_with("x-meshgate-")),
        "the workload saw {trailers:?}"
    );
    assert_ne!(reply.decision_id(), "forged");
}

/// A peer exports services whose names cannot be DNS names. They are skipped where the
/// catalog enters (the good name is served by the mesh DNS at once), and a bad name already
/// cached in sled (from an older version, or an edited file) does not stop a restart with
/// `listeners.dns`.
#[tokio::test]
async fn bad_service_names_from_a_peer_never_break_the_mesh_dns() {
    use crate::federation_support::{Member, MemberSpec, fast_options, link_pair};
    let up = echo_upstream().await;
    let mut a = MemberSpec::new("a", vec![]);
    a.dns = true;
    let b = MemberSpec::new(
        "b",
        vec![
            service("orders", "shop", up, &["a"]),
            service("bad name!", "shop", up, &["a"]),
            service("Upper", "shop", up, &["a"]),
            service("x", "a.b", up, &["a"]),
        ],
    );
    let (a, b) = (Member::start(a).await, Member::start(b).await);
    link_pair(&a, 0, &b, 0);
    a.fed.sync_now(&b.td).await.unwrap();
    let status = a.fed.status(std::time::SystemTime::now());
    assert_eq!(
        status[0].imported,
        ["orders.shop"],
        "only the servable name"
    );
    let server = a.dns.as_ref().unwrap().local_addr();
    let workload = a.gateway.addrs().workload;
    let found = meshgate_federation::discovery::resolve("orders.shop.b.mesh", &[server])
        .await
        .unwrap();
    assert_eq!(found, [workload]);

    // A bad name in the cached peer state: the next start drops it and serves the rest.
    let stopped = a.stop().await;
    {
        let db = crate::federation_support::reopen_db(stopped.dir.path()).await;
        let tree = db.open_tree("federation.peers").unwrap();
        let raw = tree.get("b.example").unwrap().expect("b's cached state");
        let mut state: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        state["imported"]
            .as_array_mut()
            .unwrap()
            .push("bad name!.shop".into());
        tree.insert("b.example", serde_json::to_vec(&state).unwrap())
            .unwrap();
        db.flush().unwrap();
    }
    let a = stopped.restart(fast_options(), false).await;
    let server = a.dns.as_ref().expect("mesh DNS started").local_addr();
    let found = meshgate_federation::discovery::resolve("orders.shop.b.mesh", &[server])
        .await
        .unwrap();
    assert_eq!(found, [a.gateway.addrs().workload]);
    drop(b);
}

/// `b`'s gateway (compromised) pushes a bundle to `a` over the real tunnel; the ack.
async fn push_as(
    b: &crate::federation_support::Member,
    a: &crate::federation_support::Member,
    bundle: &meshgate_identity::TrustBundle,
) -> serde_json::Value {
    let req = http::Request::post(format!(
        "https://{}{}",
        a.td,
        meshgate_federation::control::BUNDLE_PATH
    ))
    .body(Bytes::from(bundle.to_spiffe_json()))
    .unwrap();
    let resp = b
        .gateway
        .control_client()
        .send(a.gateway.addrs().tunnel, &a.td, req)
        .await
        .unwrap();
    serde_json::from_slice(resp.body()).unwrap()
}

/// A bundle for `b`'s trust domain with the roots and keys of `parts`, and `sequence`.
fn forged_bundle(
    b: &crate::federation_support::Member,
    parts: &[meshgate_identity::TrustBundle],
    sequence: u64,
) -> meshgate_identity::TrustBundle {
    meshgate_identity::TrustBundle::new(
        b.td.clone(),
        parts.iter().flat_map(|p| p.x509_roots().to_vec()).collect(),
        parts.iter().flat_map(|p| p.jwt_keys().clone().into_iter()),
        sequence,
        None,
    )
    .unwrap()
}

/// A compromised peer gateway pushes its trust domain's bundle with an enormous
/// `spiffe_sequence` (so the genuine peer could never update it again): refused. One that
/// slips in within the bound, with a rogue root, is undone by the operator's `federation
/// add`, after which the genuine peer's rotations are taken again. Accepted bundles are
/// admin events in the decision log, naming the peer gateway.
#[tokio::test]
async fn a_peer_bundle_cannot_outlive_the_operator() {
    use crate::federation_support::{Member, MemberSpec, link_pair};
    let a = Member::start(MemberSpec::new("a", vec![])).await;
    let b = Member::start(MemberSpec::new("b", vec![])).await;
    link_pair(&a, 0, &b, 0);
    let held = |a: &Member| a.bundles.get(&b.td).unwrap();
    let start = held(&a).sequence();

    let huge = forged_bundle(&b, &[b.issuer.bundle()], u64::MAX - 1);
    let ack = push_as(&b, &a, &huge).await;
    assert_eq!(ack["accepted"], false, "{ack}");
    assert!(
        ack["reason"].as_str().unwrap().contains("jumps more than"),
        "{ack}"
    );
    assert_eq!(held(&a).sequence(), start);

    // Within the bound, with a root of the attacker's added: taken (a peer may rotate)...
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().temporary(true).open().unwrap();
    let rogue = meshgate_identity::Issuer::init(
        &db,
        dir.path(),
        b.td.clone(),
        std::time::SystemTime::now(),
    )
    .unwrap();
    let slipped = forged_bundle(&b, &[b.issuer.bundle(), rogue.bundle()], start + 1000);
    assert_eq!(push_as(&b, &a, &slipped).await["accepted"], true);
    let rogue_root = rogue.bundle().x509_roots()[0].clone();
    assert!(held(&a).x509_roots().contains(&rogue_root));
    // ...and the genuine peer's next rotation is now "older".
    let prepared = b
        .issuer
        .rotate_prepare(std::time::SystemTime::now())
        .unwrap();
    let genuine = b.issuer.bundle();
    assert_eq!(genuine.sequence(), prepared.sequence);
    assert_eq!(push_as(&b, &a, &genuine).await["accepted"], false);

    // The operator adds the link again with the genuine bundle: it is authoritative.
    a.fed
        .add_link(b.link(0), std::time::SystemTime::now())
        .unwrap();
    assert_eq!(held(&a).sequence(), genuine.sequence());
    assert!(!held(&a).x509_roots().contains(&rogue_root));
    b.issuer
        .rotate_activate(std::time::SystemTime::now())
        .unwrap();
    let next = b.issuer.bundle();
    assert_eq!(push_as(&b, &a, &next).await["accepted"], true);
    assert_eq!(held(&a).sequence(), next.sequence());

    // Each accepted bundle is an admin event naming the peer gateway; the refusal is not.
    let records = a.log.query(&meshgate_policy::Filter::default()).unwrap();
    let accepted: Vec<&str> = records
        .iter()
        .filter(|r| r.decision.as_str() == "admin")
        .filter(|r| r.principal == "spiffe://b.example/meshgate/gateway")
        .map(|r| r.action.as_str())
        .collect();
    assert_eq!(accepted.len(), 2, "{accepted:?}");
    assert!(
        accepted[0].contains(&format!(
            "accepted: sequence {} (held {start})",
            start + 1000
        )),
        "{accepted:?}"
    );
}

/// Requests the HTTP layer refuses before the gateway sees them (conflicting
/// `Content-Length`s, a bad `Transfer-Encoding`, oversized headers) are answered 400/431 by
/// hyper; each refusal is now in the decision log too, with its reason.
#[tokio::test]
async fn framing_refusals_by_the_http_layer_are_recorded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (east, _west) = east_west().await;
    let addr = east.gateway.addrs().workload_local.unwrap();
    let big = "x".repeat(128 * 1024);
    let cases = [
        "POST /v1 HTTP/1.1\r\nhost: orders.shop.west.mesh\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!".to_owned(),
        "POST /v1 HTTP/1.1\r\nhost: orders.shop.west.mesh\r\ntransfer-encoding: chunked, gzip\r\n\r\n".to_owned(),
        format!("GET /v1 HTTP/1.1\r\nhost: orders.shop.west.mesh\r\nx-big: {big}\r\n\r\n"),
    ];
    let before = east
        .log
        .query(&meshgate_policy::Filter::default())
        .unwrap()
        .len();
    let mut statuses = Vec::new();
    for raw in &cases {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The server may answer and close before it has read everything we send.
        let _ = tcp.write_all(raw.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = tcp.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        statuses.push(answer.lines().next().unwrap_or_default().to_owned());
    }
    assert!(statuses[0].starts_with("HTTP/1.1 400"), "{statuses:?}");
    assert!(statuses[1].starts_with("HTTP/1.1 400"), "{statuses:?}");
    assert!(statuses[2].starts_with("HTTP/1.1 431"), "{statuses:?}");
    // Recorded after hyper answered: poll until all three are in.
    crate::federation_support::eventually("three framing refusals recorded", || {
        let records = east.log.query(&meshgate_policy::Filter::default()).unwrap();
        records[before..]
            .iter()
            .filter(|r| {
                r.errors
                    .iter()
                    .any(|e| e.contains("refused by the HTTP layer"))
            })
            .count()
            == 3
    })
    .await;
    let records = east.log.query(&meshgate_policy::Filter::default()).unwrap();
    // (Each is recorded once its connection closed: in any order.)
    let mut codes: Vec<Option<u16>> = records[before..].iter().map(|r| r.status).collect();
    codes.sort();
    assert_eq!(codes, [Some(400), Some(400), Some(431)]);
}

type H3Stream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// `b`'s gateway opens a control request to `a` over the real tunnel and sends `body`
/// without finishing it (unless `finish`): the stream, to read the answer from.
async fn control_request(
    send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    a: &crate::federation_support::Member,
    path: &str,
    body: Bytes,
    finish: bool,
) -> H3Stream {
    let req = http::Request::post(format!("https://{}{path}", a.td))
        .body(())
        .unwrap();
    let mut stream = send.send_request(req).await.unwrap();
    stream.send_data(body).await.unwrap();
    if finish {
        stream.finish().await.unwrap();
    }
    stream
}

/// The answer's status and body, failing (not hanging) if none comes.
async fn answer(stream: &mut H3Stream) -> (u16, String) {
    use bytes::Buf;
    let wait = std::time::Duration::from_secs(60);
    let resp = tokio::time::timeout(wait, stream.recv_response())
        .await
        .expect("an answer before the body is complete")
        .unwrap();
    let mut body = Vec::new();
    while let Ok(Ok(Some(mut chunk))) = tokio::time::timeout(wait, stream.recv_data()).await {
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    (
        resp.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn gateway_svid_of(m: &crate::federation_support::Member) -> meshgate_identity::X509Svid {
    m.issuer
        .issue_x509_svid(
            &meshgate_identity::SpiffeId::gateway(&m.td),
            std::time::Duration::from_secs(600),
            &[],
            &[],
            std::time::SystemTime::now(),
        )
        .unwrap()
}

/// A peer gateway opens control requests and never finishes their bodies, sends bodies
/// larger than the document can be, and names paths that do not exist. Each is answered
/// before (or without) the body being read: unknown path 404 at once, over the document's
/// bound 413, a body not sent within `limits.control_read_timeout` 408.
#[tokio::test]
async fn control_requests_are_bounded_before_their_bodies() {
    use crate::federation_support::{Member, MemberSpec, link_pair};
    let mut spec = MemberSpec::new("a", vec![]);
    spec.limits.control_read_timeout = std::time::Duration::from_secs(1);
    let a = Member::start(spec).await;
    let b = Member::start(MemberSpec::new("b", vec![])).await;
    link_pair(&a, 0, &b, 0);
    let mut send = crate::tunnel_attacks::h3_client(
        a.gateway.addrs().tunnel,
        &a.td,
        &b.bundles,
        &gateway_svid_of(&b),
    )
    .await
    .unwrap();

    // An unknown path: refused before a byte of its (endless) body is read.
    let mut s = control_request(
        &mut send,
        &a,
        "/.meshgate/v1/nothing",
        Bytes::from_static(b"x"),
        false,
    )
    .await;
    let (status, body) = answer(&mut s).await;
    assert_eq!(status, 404, "{body}");

    // A bundle push over the bundle bound (1 MiB): 413 while it is still being sent.
    let big = Bytes::from(vec![b' '; meshgate_identity::MAX_BUNDLE_BYTES + 1]);
    let mut s = control_request(
        &mut send,
        &a,
        meshgate_federation::control::BUNDLE_PATH,
        big,
        false,
    )
    .await;
    let (status, body) = answer(&mut s).await;
    assert_eq!(status, 413, "{body}");
    // Checkpoints have their own, smaller bound.
    let heads = Bytes::from(vec![
        b' ';
        meshgate_federation::control::MAX_CHECKPOINTS_BODY + 1
    ]);
    let mut s = control_request(&mut send, &a, "/.meshgate/v1/checkpoints", heads, true).await;
    let (status, body) = answer(&mut s).await;
    assert_eq!(status, 413, "{body}");

    // A body that never ends: 408 once the read deadline has passed.
    let mut s = control_request(
        &mut send,
        &a,
        "/.meshgate/v1/checkpoints",
        Bytes::from_static(b"{"),
        false,
    )
    .await;
    let (status, body) = answer(&mut s).await;
    assert_eq!(status, 408, "{body}");

    // The connection still serves a proper request.
    let ok = control_request(
        &mut send,
        &a,
        meshgate_federation::control::BUNDLE_PATH,
        Bytes::from(b.issuer.bundle().to_spiffe_json()),
        true,
    )
    .await;
    let mut ok = ok;
    let (status, body) = answer(&mut ok).await;
    assert!(status == 200 || status == 409, "{status} {body}");
}

/// A peer gateway holds many control requests open at once: past
/// `limits.max_control_requests_per_peer`, more are answered 503 at once.
#[tokio::test]
async fn a_peer_cannot_hold_more_control_requests_than_its_share() {
    use crate::federation_support::{Member, MemberSpec, link_pair};
    let mut spec = MemberSpec::new("a", vec![]);
    spec.limits.control_read_timeout = std::time::Duration::from_secs(120);
    spec.limits.max_control_requests_per_peer = 3;
    let a = Member::start(spec).await;
    let b = Member::start(MemberSpec::new("b", vec![])).await;
    link_pair(&a, 0, &b, 0);
    let mut send = crate::tunnel_attacks::h3_client(
        a.gateway.addrs().tunnel,
        &a.td,
        &b.bundles,
        &gateway_svid_of(&b),
    )
    .await
    .unwrap();
    // Four stalled requests: three hold the peer's slots until the (long) deadline, the
    // fourth is refused at once, whichever of them the gateway took last.
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    for _ in 0..4 {
        let mut s = control_request(
            &mut send,
            &a,
            "/.meshgate/v1/checkpoints",
            Bytes::from_static(b"{"),
            false,
        )
        .await;
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(answer(&mut s).await).await;
        });
    }
    let (status, body) = rx.recv().await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too many control requests"), "{body}");
}

/// Reads from `tcp` until the gateway closes it (or sends something): what it sent.
async fn until_closed(tcp: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tcp.read_to_end(&mut got),
    );
    let _ = read.await.expect("the gateway closes the connection");
    got
}

/// The `/metrics` listener under a slowloris (a request head that never ends) and a
/// connection flood: the slow connection is closed after `limits.header_read_timeout`,
/// connections past `limits.max_connections` are closed at once, and `/metrics` answers
/// again as soon as the flood lets go.
#[tokio::test]
async fn the_metrics_listener_is_bounded() {
    use tokio::io::AsyncWriteExt;
    let spec = |name| Spec {
        name,
        policies: "",
        services: vec![],
        default_quota: None,
    };
    let slow = Cluster::start_with(spec("east"), |c| {
        c.limits.header_read_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let mut tcp = tokio::net::TcpStream::connect(slow.gateway.addrs().admin)
        .await
        .unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let got = until_closed(&mut tcp).await;
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    let flooded = Cluster::start_with(spec("west"), |c| c.limits.max_connections = 3).await;
    let admin = flooded.gateway.addrs().admin;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    // Accepted in order: the fourth finds no slot and is closed without an answer.
    let mut extra = tokio::net::TcpStream::connect(admin).await.unwrap();
    let _ = extra
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    assert!(until_closed(&mut extra).await.is_empty());
    drop(held);
    let get = || async {
        let mut tcp = tokio::net::TcpStream::connect(admin).await.ok()?;
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        Some(until_closed(&mut tcp).await)
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if get().await.is_some_and(|r| r.starts_with(b"HTTP/1.1 200")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/metrics never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A real `meshgate gateway` process of cluster `east` in `dir`, with an issuer listener and
/// `extra` appended to its config, started and listening.
struct GatewayProcess {
    proc: crate::procs::Proc,
    issuer: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    /// The trust bundle's roots.
    roots: meshgate_identity::TrustBundle,
}

fn gateway_process(dir: &std::path::Path, extra: &str) -> GatewayProcess {
    gateway_process_limited(dir, extra, None)
}

/// The same, started with at most `nofile` open file descriptors.
fn gateway_process_limited(
    dir: &std::path::Path,
    extra: &str,
    nofile: Option<usize>,
) -> GatewayProcess {
    use crate::procs::{BIN, Proc, free_tcp, free_udp, meshgate, wait_listening};
    let state = dir.join("east");
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
    meshgate(&[
        "identity",
        "init",
        "--state",
        &s(&state),
        "--trust-domain",
        "east.example",
    ]);
    let pem = meshgate(&[
        "identity",
        "bundle",
        "--state",
        &s(&state),
        "--format",
        "pem",
    ])
    .stdout;
    let roots = meshgate_identity::TrustBundle::from_pem_infer(&pem).unwrap();
    let policies = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policies");
    let (issuer, admin) = (free_tcp(), free_tcp());
    let config = format!(
        r#"cluster = "east"
trust_domain = "east.example"
state_dir = "{state}"
[listeners]
workload = "{workload}"
tunnel = "{tunnel}"
admin = "{admin}"
issuer = "{issuer}"
dns_names = ["localhost"]
[policy]
dir = "{policies}"
{extra}
"#,
        state = state.display(),
        workload = free_tcp(),
        tunnel = free_udp(),
        policies = policies.display(),
    );
    std::fs::write(dir.join("east.toml"), config).unwrap();
    let mut command = match nofile {
        // prlimit sets the limit and execs the gateway (same process).
        Some(n) => {
            let mut c = crate::procs::tool("prlimit");
            c.arg(format!("--nofile={n}:{n}")).arg("--").arg(BIN);
            c
        }
        None => std::process::Command::new(BIN),
    };
    let proc = Proc(
        command
            .args(["gateway", "--config"])
            .arg(dir.join("east.toml"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(issuer);
    wait_listening(admin);
    GatewayProcess {
        proc,
        issuer,
        admin,
        roots,
    }
}

/// The issuer API's TLS certificate of a real `meshgate gateway` process is renewed like
/// any SVID (here with `identity.svid_ttl = "4s"`): clients verifying it with the bundle
/// keep connecting after the first certificate has expired. Before, it lived a day and was
/// never renewed: agents could no longer attest or renew after that.
#[tokio::test]
async fn the_issuer_api_certificate_is_renewed() {
    let tmp = tempfile::tempdir().unwrap();
    let gateway = gateway_process(tmp.path(), "[identity]\nsvid_ttl = \"4s\"");
    let (issuer, roots) = (gateway.issuer, gateway.roots.clone());
    let mut store = rustls::RootCertStore::empty();
    for root in roots.x509_roots() {
        store.add(root.clone()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(meshgate_identity::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    // A full handshake, verified with the bundle at the current time: the served leaf.
    let served = || async {
        let tcp = tokio::net::TcpStream::connect(issuer).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector
            .connect(name, tcp)
            .await
            .expect("the issuer API's certificate verifies");
        tls.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    let first = served().await;
    let first_expired = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut renewed = false;
    // Every handshake verifies, until the first certificate is certainly expired.
    while !renewed || std::time::Instant::now() < first_expired {
        renewed |= served().await != first;
        assert!(std::time::Instant::now() < deadline, "never renewed");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A stranger (no client certificate) floods a gateway with requests carrying large
/// headers. Each is refused (401), but it cannot make the log grow without bound: records of
/// a source's unauthenticated refusals are limited (a burst of 20, then 2 a second), the
/// ones left out are counted in the source's next record and on `/metrics`, and what a record
/// keeps of the request is capped.
#[tokio::test]
async fn strangers_cannot_fill_the_log() {
    let (east, _west) = east_west().await;
    let stranger = Client::new(&east, None, &[b"http/1.1"]);
    let pad = "p".repeat(30 * 1024);
    let before = east
        .log
        .query(&meshgate_policy::Filter::default())
        .unwrap()
        .len();
    let started = std::time::Instant::now();
    let mut without_id = 0;
    for _ in 0..100 {
        let req = Request::get("https://orders.shop.west.mesh/v1/orders")
            .header("x-pad", pad.as_str())
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let reply = stranger.send(req).await.unwrap();
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        without_id += usize::from(!reply.headers.contains_key("x-meshgate-decision-id"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let records = east.log.query(&meshgate_policy::Filter::default()).unwrap();
    let recorded = &records[before..];
    let allowed = 20.0 + 2.0 * elapsed + 1.0;
    assert!(
        (recorded.len() as f64) <= allowed && recorded.len() < 100,
        "{} records in {elapsed:.1} s",
        recorded.len()
    );
    assert_eq!(
        without_id,
        100 - recorded.len(),
        "unrecorded answers carry no decision id"
    );
    for r in recorded {
        let kept: usize = r.facts.as_ref().map_or(0, |f| {
            f.headers.iter().map(|(k, v)| k.len() + v.len()).sum()
        });
        assert!(kept <= 4096, "{kept} header bytes recorded");
    }
    // The next record of this source says how many were left out.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let reply = stranger.get("orders.shop.west.mesh", "/v1").await.unwrap();
        if let Some(id) = reply.headers.get("x-meshgate-decision-id") {
            let record = crate::support::find_record(&east.log, id.to_str().unwrap()).unwrap();
            assert!(
                record
                    .errors
                    .iter()
                    .any(|e| e.contains("more unauthenticated refusals from this source")),
                "{:?}",
                record.errors
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never recorded again");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        !east
            .gateway
            .metrics()
            .encode()
            .contains("meshgate_refusal_records_left_out_total 0"),
    );
}

/// With `audit.max_disk_mib`, the log's disk use is on `/metrics` (to alert on before it is
/// reached), and at the budget requests are refused (503) instead of answered unrecorded.
#[tokio::test]
async fn the_log_has_a_disk_budget_and_fails_closed_at_it() {
    let upstream = echo_upstream().await;
    let spec = Spec {
        name: "east",
        policies: r#"
@id("reads")
permit (principal, action in Action::"read", resource == Service::"catalog.shop.east");
"#,
        services: vec![service("catalog", "shop", upstream, &[])],
        default_quota: None,
    };
    let east = Cluster::start_with(spec, |c| {
        c.audit.max_disk_mib = 1;
        c.audit.segment_mib = 1;
    })
    .await;
    let metrics = east.gateway.metrics().encode();
    assert!(
        metrics.contains("meshgate_audit_disk_budget_bytes 1048576"),
        "{metrics}"
    );
    let client = Client::new(&east, Some(&east.svid("/ns/shop/sa/web")), &[b"http/1.1"]);
    let pad = "p".repeat(48 * 1024);
    let mut statuses = Vec::new();
    for _ in 0..40 {
        let req = Request::get("https://catalog.shop.east.mesh/v1")
            .header("x-pad", pad.as_str())
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let reply = client.send(req).await.unwrap();
        statuses.push(reply.status.as_u16());
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(
                reply.text().contains("could not be recorded"),
                "{}",
                reply.text()
            );
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&503), "{statuses:?}");
    assert!(
        statuses.iter().filter(|s| **s == 200).count() >= 10,
        "{statuses:?}"
    );
    let used: u64 = east
        .gateway
        .metrics()
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix("meshgate_audit_disk_bytes "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(used <= 1 << 20 && used > 900 * 1024, "{used}");
}

/// Cluster `c` exports `orders.shop` too, with a better priority than `b`, the cluster `a`
/// means by that name. `a` shares the unpinned name with `b` only, so a workload calling
/// `orders.shop.mesh` reaches `b`, never `c`; `c` is reached only by its pinned name. The
/// workload's `Authorization` and `Cookie` go to no other cluster unless `a` says a service
/// there receives them.
#[tokio::test]
async fn a_peer_cannot_take_over_a_shared_service_name() {
    use crate::federation_support::{Member, MemberSpec};
    let (up_b, up_c) = (echo_upstream().await, echo_upstream().await);
    let a = Member::start(MemberSpec::new("a", vec![])).await;
    let b = Member::start(MemberSpec::new(
        "b",
        vec![service("orders", "shop", up_b, &["a"])],
    ))
    .await;
    let c = Member::start(MemberSpec::new(
        "c",
        vec![service("orders", "shop", up_c, &["a"])],
    ))
    .await;
    let now = std::time::SystemTime::now();
    let mut to_b = b.link(1);
    to_b.shared = vec!["orders.shop".into()];
    a.fed.add_link(to_b.clone(), now).unwrap();
    a.fed.add_link(c.link(0), now).unwrap();
    b.fed.add_link(a.link(0), now).unwrap();
    c.fed.add_link(a.link(0), now).unwrap();
    a.fed.sync_now(&b.td).await.unwrap();
    a.fed.sync_now(&c.td).await.unwrap();

    let call = |authority: &'static str| {
        let client = a.client("/ns/shop/sa/web");
        async move {
            let req = Request::get(format!("https://{authority}/v1/orders"))
                .header("authorization", "Bearer for-my-own-gateway")
                .header("cookie", "session=secret")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            client.send(req).await.unwrap()
        }
    };
    let served_by = |reply: &crate::support::Reply| {
        let id = reply.decision_id();
        match (
            crate::support::find_record(&b.log, &id),
            crate::support::find_record(&c.log, &id),
        ) {
            (Some(_), None) => "b",
            (None, Some(_)) => "c",
            other => panic!("decided by {other:?}"),
        }
    };
    let reply = call("orders.shop.mesh").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(served_by(&reply), "b");
    let headers = &reply.json()["headers"];
    assert!(headers.get("authorization").is_none(), "{headers}");
    assert!(headers.get("cookie").is_none(), "{headers}");
    // Pinned, `c` serves; the credentials do not go along.
    let reply = call("orders.shop.c.mesh").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(served_by(&reply), "c");
    assert!(reply.json()["headers"].get("authorization").is_none());
    // `a` says b's orders receives them: now they go to it (and still not to `c`).
    to_b.credentials = vec!["orders.shop".into()];
    a.fed.add_link(to_b, std::time::SystemTime::now()).unwrap();
    a.fed.sync_now(&b.td).await.unwrap();
    let reply = call("orders.shop.mesh").await;
    assert_eq!(served_by(&reply), "b");
    let headers = &reply.json()["headers"];
    assert_eq!(
        headers["authorization"], "Bearer for-my-own-gateway",
        "{headers}"
    );
    assert_eq!(headers["cookie"], "session=secret", "{headers}");
    assert!(
        call("orders.shop.c.mesh").await.json()["headers"]
            .get("cookie")
            .is_none()
    );
}

/// CPU time (user + system, in clock ticks) the process `pid` has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after the last `)`.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// The `/metrics` listener and the issuer API out of file descriptors (EMFILE): a real
/// gateway process started with a descriptor limit just above what it holds once running,
/// then flooded with connections. Accepting fails again and again; the listener backs off instead of spinning
/// (the process stays nearly idle), and serves again once the flood lets go.
#[test]
fn the_metrics_listener_backs_off_when_out_of_descriptors() {
    // What a running gateway holds: measured on one, then another started with that + 3.
    let probe_dir = tempfile::tempdir().unwrap();
    let probe = gateway_process(probe_dir.path(), "");
    let held = std::fs::read_dir(format!("/proc/{}/fd", probe.proc.0.id()))
        .unwrap()
        .count();
    drop(probe);
    let tmp = tempfile::tempdir().unwrap();
    let gateway = gateway_process_limited(tmp.path(), "", Some(held + 3));
    let pid = gateway.proc.0.id();
    // Both the admin listener and the issuer API are flooded.
    let mut flood = Vec::new();
    for _ in 0..16 {
        flood.push(std::net::TcpStream::connect(gateway.admin).unwrap());
        flood.push(std::net::TcpStream::connect(gateway.issuer).unwrap());
    }
    // Wait until the process is out of descriptors (the flood took the last ones).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
        < held + 3
    {
        assert!(
            std::time::Instant::now() < deadline,
            "descriptors never ran out"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // What the process uses while accepts fail, over a window of wall time.
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let (t0, c0) = (std::time::Instant::now(), cpu_ticks(pid));
    while t0.elapsed() < std::time::Duration::from_secs(3) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let busy = (cpu_ticks(pid) - c0) as f64 / ticks_per_sec / t0.elapsed().as_secs_f64();
    assert!(
        busy < 0.25,
        "the gateway used {:.0} % of a core while accepts failed",
        busy * 100.0
    );
    // The flood lets go: its connections close, descriptors come back, /healthz answers.
    drop(flood);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let ok = std::net::TcpStream::connect(gateway.admin)
            .ok()
            .and_then(|mut tcp| {
                use std::io::{Read, Write};
                tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                    .ok()?;
                tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    .ok()?;
                let mut got = String::new();
                tcp.read_to_string(&mut got).ok()?;
                Some(got.starts_with("HTTP/1.1 200"))
            });
        if ok == Some(true) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/healthz never came back"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Peer `c` advertises `b`'s gateway address as its own. Dialing it as `c` fails (it is
/// `b` there) and is remembered as unreachable, but only for `c`: `b` itself is reached
/// at once right after, however often `c`'s calls failed.
#[tokio::test]
async fn a_peer_advertising_anothers_address_cannot_black_hole_it() {
    use crate::federation_support::{Member, MemberSpec};
    let up = echo_upstream().await;
    let a = Member::start(MemberSpec::new("a", vec![])).await;
    let b = Member::start(MemberSpec::new(
        "b",
        vec![service("orders", "shop", up, &["a"])],
    ))
    .await;
    let c = Member::start(MemberSpec::new(
        "c",
        vec![service("inventory", "shop", up, &["a"])],
    ))
    .await;
    let now = std::time::SystemTime::now();
    // No sync: the services come from the links, so `a` holds no connection to `b` yet.
    let mut to_b = b.link(0);
    to_b.services = vec!["orders.shop".into()];
    let mut to_c = c.link(0);
    to_c.services = vec!["inventory.shop".into()];
    to_c.gateways = vec![b.gateway.addrs().tunnel];
    a.fed.add_link(to_b, now).unwrap();
    a.fed.add_link(to_c, now).unwrap();
    b.fed.add_link(a.link(0), now).unwrap();
    let web = a.client("/ns/shop/sa/web");
    for _ in 0..6 {
        let reply = web.get("inventory.shop.c.mesh", "/v1").await.unwrap();
        assert!(reply.status.is_server_error(), "{}", reply.status);
    }
    let reply = web.get("orders.shop.b.mesh", "/v1").await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}
