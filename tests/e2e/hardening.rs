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

/// Whether requests over `send` stop being answered within a minute (the connection was
/// closed or refused), asking again every 50 ms while they are answered.
async fn refused_soon(
    send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    td: &meshgate_identity::TrustDomain,
) -> bool {
    let refused = async {
        loop {
            let req = http::Request::get(format!(
                "https://{td}{}",
                meshgate_federation::control::BUNDLE_PATH
            ))
            .body(())
            .unwrap();
            let Ok(mut stream) = send.send_request(req).await else {
                return;
            };
            if stream.finish().await.is_err() || stream.recv_response().await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), refused)
        .await
        .is_ok()
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
    // A gateway with a certificate from the rogue root now gets in.
    let rogue_svid = rogue
        .issue_x509_svid(
            &meshgate_identity::SpiffeId::gateway(&b.td),
            std::time::Duration::from_secs(600),
            &[],
            &[],
            std::time::SystemTime::now(),
        )
        .unwrap();
    let tunnel = a.gateway.addrs().tunnel;
    let mut rogue_conn = crate::tunnel_attacks::h3_client(tunnel, &a.td, &b.bundles, &rogue_svid)
        .await
        .unwrap();
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
    // The rogue gateway's connection is closed (it could otherwise push again) and it cannot
    // come back: its certificate no longer chains to a trusted root (in TLS 1.3 the server
    // judges the client's certificate after the client thinks it is done, so a new connection
    // is refused at its first request, if not sooner).
    assert!(
        refused_soon(&mut rogue_conn, &a.td).await,
        "the rogue gateway's connection stayed open"
    );
    if let Ok(mut again) =
        crate::tunnel_attacks::h3_client(tunnel, &a.td, &b.bundles, &rogue_svid).await
    {
        assert!(
            refused_soon(&mut again, &a.td).await,
            "the rogue gateway got back in"
        );
    }
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
