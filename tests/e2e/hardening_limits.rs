//! Hardening, continued: the bounds that keep a gateway up under abuse (control requests
//! from peers, the metrics and issuer listeners, the decision log's disk), each attack
//! performed against real processes or the real component.

use bytes::Bytes;
use http::{Request, StatusCode};

use crate::gateway::east_west;
use crate::support::{Client, Cluster, Spec, echo_upstream, service};

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
