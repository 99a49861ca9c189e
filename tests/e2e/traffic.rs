//! Traffic routes end to end: three real gateways in-process (east calls, west and north
//! serve `orders.shop`, north with a `version = "v2"` subset), real QUIC, Cedar and logs.
//! Weighted splits, header canaries, drained backends, mirroring, faults scoped to callers,
//! per-route retries within the budget, and reload.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshgate_gateway::{RouteConfig, SubsetConfig};
use meshgate_policy::{DecisionKind, DecisionRecord, Filter};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::procs::tool;
use crate::support::{Client, Cluster, Spec, service};

const WEB: &str = "/ns/shop/sa/web";
const TESTER: &str = "/ns/qa/sa/tester";
/// Allowed at west, not at north: its mirror copies are refused there.
const BOT: &str = "/ns/shop/sa/audit-bot";
const INTRUDER: &str = "/ns/qa/sa/intruder";

fn permit(who: &[&str], service: &str) -> String {
    who.iter()
        .enumerate()
        .map(|(i, w)| {
            format!(
                "@id(\"p{i}-{service}\")\npermit (principal == Workload::\"spiffe://east.example{w}\", action in Action::\"read\", resource == Service::\"{service}\");\n"
            )
        })
        .collect()
}

/// What reached an upstream.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    caller: String,
    /// Names of `x-meshgate-*` headers other than the caller (none may arrive).
    meshgate: Vec<String>,
}

/// An upstream that answers its tag (or status N for `/status/N`), keeps what reached it,
/// and holds each request while its gate is closed.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    gate: watch::Sender<bool>,
}

impl Upstream {
    async fn start(tag: &'static str, open: bool) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (gate, _) = watch::channel(open);
        let (seen2, gate2) = (seen.clone(), gate.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (seen, gate) = (seen2.clone(), gate2.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (seen, mut gate) = (seen.clone(), gate.subscribe());
                        async move {
                            let path = req.uri().path().to_owned();
                            let caller = req
                                .headers()
                                .get("x-meshgate-caller")
                                .map(|v| v.to_str().unwrap().to_owned())
                                .unwrap_or_default();
                            let meshgate = req
                                .headers()
                                .keys()
                                .map(|k| k.as_str().to_owned())
                                .filter(|k| {
                                    k.starts_with("x-meshgate-") && k != "x-meshgate-caller"
                                })
                                .collect();
                            seen.lock().unwrap().push(Seen {
                                path: path.clone(),
                                caller,
                                meshgate,
                            });
                            let _ = gate.wait_for(|open| *open).await;
                            let status = path
                                .strip_prefix("/status/")
                                .and_then(|n| n.parse().ok())
                                .unwrap_or(200);
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(tag)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Upstream { addr, seen, gate }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// No request reached this upstream with a gateway-to-gateway header.
    fn assert_clean(&self) {
        for seen in self.seen.lock().unwrap().iter() {
            assert!(seen.meshgate.is_empty(), "{seen:?}");
        }
    }
}

struct Mesh {
    east: Cluster,
    west: Cluster,
    north: Cluster,
    east_orders: Upstream,
    west_orders: Upstream,
    north_v1: Upstream,
    north_v2: Upstream,
    east_ledger: Upstream,
}

impl Mesh {
    async fn start() -> Mesh {
        let east_orders = Upstream::start("east", true).await;
        let west_orders = Upstream::start("west", true).await;
        let north_v1 = Upstream::start("north-v1", true).await;
        let north_v2 = Upstream::start("north-v2", true).await;
        let east_ledger = Upstream::start("east-ledger", true).await;
        let west = Cluster::start(Spec {
            name: "west",
            policies: &permit(&[WEB, TESTER, BOT], "orders.shop.west"),
            services: vec![service("orders", "shop", west_orders.addr, &["east"])],
            default_quota: None,
        })
        .await;
        let mut north_orders = service("orders", "shop", north_v1.addr, &["east"]);
        north_orders.subsets = vec![SubsetConfig {
            labels: [("version".to_owned(), "v2".to_owned())].into(),
            endpoints: vec![north_v2.addr.to_string()],
        }];
        let north = Cluster::start(Spec {
            name: "north",
            policies: &permit(&[WEB, TESTER], "orders.shop.north"),
            services: vec![north_orders],
            default_quota: None,
        })
        .await;
        let east_policies = permit(&[WEB, TESTER], "orders.shop.east")
            + &permit(&[WEB, TESTER], "ledger.shop.east");
        let east = Cluster::start(Spec {
            name: "east",
            policies: &east_policies,
            services: vec![
                service("orders", "shop", east_orders.addr, &[]),
                service("ledger", "shop", east_ledger.addr, &[]),
            ],
            default_quota: None,
        })
        .await;
        west.link(&east, &["orders.shop"]);
        north.link(&east, &["orders.shop"]);
        Mesh {
            east,
            west,
            north,
            east_orders,
            west_orders,
            north_v1,
            north_v2,
            east_ledger,
        }
    }

    /// Serves `toml` (`[[routes]]` blocks) at east, through the reload path.
    fn routes(&self, toml_text: &str) {
        let report = self
            .east
            .gateway
            .routes()
            .reload(&parse_routes(toml_text))
            .unwrap_or_else(|e| panic!("routes refused: {e:?}"));
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    }

    fn client(&self, path: &str) -> Client {
        Client::new(&self.east, Some(&self.east.svid(path)), &[b"http/1.1"])
    }
}

fn parse_routes(text: &str) -> Vec<RouteConfig> {
    #[derive(serde::Deserialize)]
    struct File {
        routes: Vec<RouteConfig>,
    }
    toml::from_str::<File>(text).unwrap().routes
}

fn records(cluster: &Cluster) -> Vec<DecisionRecord> {
    cluster.log.query(&Filter::default()).unwrap()
}

fn metrics(cluster: &Cluster) -> String {
    let out = tool("curl")
        .args([
            "-sS",
            &format!("http://{}/metrics", cluster.gateway.addrs().admin),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const SPLIT: &str = r#"
[[routes]]
name = "orders-canary"
service = "orders.shop"
match = { headers = [{ name = "x-canary", exact = "1" }] }
backends = [{ cluster = "north", subset = { version = "v2" } }]

[[routes]]
name = "orders-split"
service = "orders.shop"
backends = [
  { cluster = "west", weight = 90 },
  { cluster = "north", subset = { version = "v2" }, weight = 10 },
  { cluster = "east", weight = 0 },
]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_header_canary_and_a_drained_backend() {
    let mesh = Mesh::start().await;
    mesh.routes(SPLIT);
    let mut web = mesh.client(WEB).session().await;
    const N: usize = 2000;
    for _ in 0..N {
        let reply = web.get("orders.shop.mesh", "/v1/orders", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let (west, north) = (mesh.west_orders.count(), mesh.north_v2.count());
    let share = north as f64 / N as f64;
    println!(
        "90/10 split over {N} requests, real random source: west {west}, north/v2 {north} ({:.2} %)",
        share * 100.0
    );
    assert_eq!(west + north, N, "every request reached one backend");
    // The real random source: ±2 points is ~3 standard deviations at 2000 requests (the
    // fixed-seed unit test holds the split to ±2); ±3.5 keeps this test from ever flaking.
    assert!((share - 0.10).abs() <= 0.035, "north share {share}");
    assert_eq!(
        mesh.east_orders.count(),
        0,
        "weight 0 drains the local backend"
    );
    assert_eq!(
        mesh.north_v1.count(),
        0,
        "the subset, not the whole service"
    );

    // The header canary: every request with `x-canary: 1` goes to north's v2.
    for _ in 0..20 {
        let reply = web
            .get("orders.shop.mesh", "/v1/orders", &[("x-canary", "1")])
            .await;
        assert_eq!(reply.text(), "north-v2");
    }
    assert_eq!(mesh.north_v2.count(), north + 20);

    // North decided each request (Cedar saw `orders.shop.north`) and recorded the subset.
    let at_north: Vec<_> = records(&mesh.north)
        .into_iter()
        .filter(|r| r.decision == DecisionKind::Allow)
        .collect();
    assert_eq!(at_north.len(), north + 20);
    assert!(at_north.iter().all(|r| r.resource == "orders.shop.north"
        && r.traffic.as_ref().and_then(|t| t.subset.as_deref()) == Some("version=v2")));
    assert_eq!(
        records(&mesh.west)
            .iter()
            .filter(|r| r.decision == DecisionKind::Allow)
            .count(),
        west
    );

    // Per route and backend on east's /metrics.
    let text = metrics(&mesh.east);
    for needle in [
        format!("meshgate_route_requests_total{{route=\"orders-split\",backend=\"west\"}} {west}"),
        format!(
            "meshgate_route_requests_total{{route=\"orders-split\",backend=\"north/version=v2\"}} {north}"
        ),
        "meshgate_route_requests_total{route=\"orders-canary\",backend=\"north/version=v2\"} 20"
            .to_owned(),
        "meshgate_route_responses_total{route=\"orders-canary\",backend=\"north/version=v2\",class=\"2xx\"} 20".to_owned(),
        "meshgate_route_request_duration_seconds_count{route=\"orders-split\",backend=\"west\"}"
            .to_owned(),
    ] {
        assert!(text.contains(&needle), "missing {needle} in /metrics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_copy_is_decided_where_it_lands_and_nobody_waits_for_it() {
    let mesh = Mesh::start().await;
    mesh.routes(
        r#"
[[routes]]
name = "orders-mirror"
service = "orders.shop"
backends = [{ cluster = "west" }]
mirror = { cluster = "north", subset = { version = "v2" }, percent = 100 }
"#,
    );
    // North's v2 holds every request until the test opens its gate.
    mesh.north_v2.gate.send_replace(false);
    let reply = mesh
        .client(WEB)
        .get("orders.shop.mesh", "/v1/orders/7")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "west");
    // The caller has its answer; the copy is at north's upstream, still held there.
    wait_until("the mirror copy at north", || mesh.north_v2.count() == 1).await;
    let copy = mesh.north_v2.seen.lock().unwrap()[0].clone();
    assert_eq!(copy.path, "/v1/orders/7");
    assert_eq!(copy.caller, "spiffe://east.example/ns/shop/sa/web");
    mesh.north_v2.gate.send_replace(true);
    // North recorded it as a mirror, allowed by its own policy.
    let mirrored = records(&mesh.north);
    let r = mirrored
        .iter()
        .find(|r| r.traffic.as_ref().is_some_and(|t| t.mirror))
        .expect("a mirror record at north");
    assert_eq!(r.decision, DecisionKind::Allow);
    assert_eq!(r.resource, "orders.shop.north");

    // A caller west allows but north does not: the primary is served, the copy refused
    // and recorded as a refused mirror at north; it never reaches north's upstream.
    let reply = mesh
        .client(BOT)
        .get("orders.shop.mesh", "/v1/orders/8")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    wait_until("the refused mirror's record at north", || {
        records(&mesh.north).iter().any(|r| {
            r.decision == DecisionKind::Deny
                && r.principal.ends_with(BOT)
                && r.traffic.as_ref().is_some_and(|t| t.mirror)
        })
    })
    .await;
    assert_eq!(mesh.north_v2.count(), 1);

    // The copy carries nothing of the original's route: the original goes to north's v2
    // subset, the copy to west, which has no subsets and serves it whole.
    mesh.routes(
        r#"
[[routes]]
name = "orders-mirror"
service = "orders.shop"
backends = [{ cluster = "north", subset = { version = "v2" } }]
mirror = { cluster = "west", percent = 100 }
"#,
    );
    let reply = mesh
        .client(WEB)
        .get("orders.shop.mesh", "/v1/orders/9")
        .await
        .unwrap();
    assert_eq!(reply.text(), "north-v2");
    wait_until("the copy served by west", || {
        mesh.west_orders
            .seen
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.path == "/v1/orders/9")
    })
    .await;
    for upstream in [&mesh.west_orders, &mesh.north_v1, &mesh.north_v2] {
        upstream.assert_clean();
    }
    wait_until("mirror outcomes on /metrics", || {
        let text = metrics(&mesh.east);
        text.contains("meshgate_route_mirrors_total{route=\"orders-mirror\",backend=\"north/version=v2\",outcome=\"sent\"} 1")
            && text.contains("meshgate_route_mirrors_total{route=\"orders-mirror\",backend=\"north/version=v2\",outcome=\"refused\"} 1")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_injected_for_their_callers_only_after_admission_and_recorded() {
    let mesh = Mesh::start().await;
    mesh.routes(
        r#"
[[routes]]
name = "orders-chaos"
service = "orders.shop"
backends = [{ cluster = "west" }]
faults = [{ abort = 503, callers = ["spiffe://east.example/ns/qa/sa/tester"] }]

[[routes]]
name = "ledger-chaos"
service = "ledger.shop"
faults = [
  { delay = "300ms", callers = ["spiffe://east.example/ns/shop/sa/web"], headers = [{ name = "x-slow", exact = "1" }] },
  { abort = 503, namespaces = ["qa"] },
]
"#,
    );
    // Remote backend: the tester gets the injected 503, recorded at east as a fault; web
    // is served.
    let reply = mesh
        .client(TESTER)
        .get("orders.shop.mesh", "/v1/orders")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        reply
            .text()
            .contains("fault injected by route `orders-chaos`")
    );
    let id = reply.decision_id();
    let r = crate::support::find_record(&mesh.east.log, &id).expect("the fault's record");
    assert_eq!(r.decision, DecisionKind::Fault);
    assert_eq!(r.status, Some(503));
    let note = r.traffic.unwrap();
    assert_eq!(
        (
            note.route.as_deref(),
            note.backend.as_deref(),
            note.fault.as_deref()
        ),
        (Some("orders-chaos"), Some("west"), Some("abort 503"))
    );
    assert_eq!(
        mesh.west_orders.count(),
        0,
        "an aborted request is not forwarded"
    );
    let reply = mesh
        .client(WEB)
        .get("orders.shop.mesh", "/v1/orders")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(mesh.west_orders.count(), 1);

    // Local service: Cedar first. The intruder (no policy) is denied, not faulted; the
    // tester (allowed, namespace qa) gets the abort; web gets through.
    let mesh = &mesh;
    let ledger = |path: &'static str| async move {
        mesh.client(path)
            .get("ledger.shop.mesh", "/")
            .await
            .unwrap()
    };
    let denied = ledger(INTRUDER).await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    let aborted = ledger(TESTER).await;
    assert_eq!(aborted.status, StatusCode::SERVICE_UNAVAILABLE);
    let r = crate::support::find_record(&mesh.east.log, &aborted.decision_id()).unwrap();
    assert_eq!(r.decision, DecisionKind::Fault);
    assert_eq!(r.reasons, ["p1-ledger.shop.east"], "Cedar allowed it first");
    assert_eq!(ledger(WEB).await.status, StatusCode::OK);
    assert_eq!(mesh.east_ledger.count(), 1);

    // A delay for requests with `x-slow: 1`: served after at least the delay, recorded.
    let started = Instant::now();
    let req = Request::get("/")
        .header("host", "ledger.shop.mesh")
        .header("x-slow", "1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let slow = mesh.client(WEB).send(req).await.unwrap();
    assert_eq!(slow.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let r = crate::support::find_record(&mesh.east.log, &slow.decision_id()).unwrap();
    assert_eq!(r.decision, DecisionKind::Fault);
    assert_eq!(r.traffic.unwrap().fault.as_deref(), Some("delay 300ms"));
    // The delay is web's alone: the tester with the same header gets its own fault.
    let req = Request::get("/")
        .header("host", "ledger.shop.mesh")
        .header("x-slow", "1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let other = mesh.client(TESTER).send(req).await.unwrap();
    let r = crate::support::find_record(&mesh.east.log, &other.decision_id()).unwrap();
    assert_eq!(r.traffic.unwrap().fault.as_deref(), Some("abort 503"));
    assert!(mesh.east.log.verify().unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_retries_stay_within_the_retry_budget() {
    let mesh = Mesh::start().await;
    mesh.routes(
        r#"
[[routes]]
name = "ledger-retry"
service = "ledger.shop"
retry = { attempts = 5, on = ["5xx"] }
"#,
    );
    let mut web = mesh.client(WEB).session().await;
    const N: usize = 200;
    let started = Instant::now();
    for _ in 0..N {
        let reply = web.get("ledger.shop.mesh", "/status/500", &[]).await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let retries = mesh.east_ledger.count() - N;
    // The budget: 20 % of requests plus 10 a second (10 at the start). Without it the route
    // would retry 4 times each: 800.
    let bound = (0.2 * N as f64 + 10.0 + 10.0 * elapsed.ceil()) as usize;
    println!("{retries} retries for {N} failing requests in {elapsed:.2}s (budget bound {bound})");
    assert!(retries > 0, "the route retries on 5xx");
    assert!(
        retries <= bound,
        "{retries} retries over the budget {bound}"
    );
    assert!(retries < 4 * N);

    // Per-try timeout across the tunnel: north's upstream holds the request, so each try
    // runs out of time; the route retries once, then the caller gets 504.
    mesh.routes(
        r#"
[[routes]]
name = "orders-timeout"
service = "orders.shop"
backends = [{ cluster = "north" }]
retry = { attempts = 2, per_try_timeout = "2s", on = ["timeout"] }
"#,
    );
    mesh.north_v1.gate.send_replace(false);
    let reply = mesh.client(WEB).get("orders.shop.mesh", "/").await.unwrap();
    assert_eq!(
        reply.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        reply.text()
    );
    assert!(reply.text().contains("within 2s"), "{}", reply.text());
    wait_until("both tries at north", || mesh.north_v1.count() == 2).await;
    mesh.north_v1.gate.send_replace(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_route_set_is_refused_and_the_old_one_keeps_serving() {
    let mesh = Mesh::start().await;
    mesh.routes(
        r#"
[[routes]]
name = "orders-to-north"
service = "orders.shop"
backends = [{ cluster = "north" }]
"#,
    );
    let errors = mesh
        .east
        .gateway
        .routes()
        .reload(&parse_routes(
            r#"
[[routes]]
name = "broken"
service = "orders.shop"
backends = [{ cluster = "west", weight = 0 }]
"#,
        ))
        .unwrap_err();
    assert!(
        errors[0].contains("routes[0] (`broken`).backends: every weight is 0"),
        "{errors:?}"
    );
    let reply = mesh.client(WEB).get("orders.shop.mesh", "/").await.unwrap();
    assert_eq!(reply.text(), "north-v1", "the old routes still serve");
    assert_eq!(mesh.east.gateway.routes().count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_cannot_pick_a_subset_or_mark_a_mirror_itself() {
    let mesh = Mesh::start().await;
    let req = Request::get("/v1/orders")
        .header("host", "orders.shop.north.mesh")
        .header("x-meshgate-subset", "version=v2")
        .header("x-meshgate-mirror", "1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = mesh.client(WEB).send(req).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.text(),
        "north-v1",
        "the headers were dropped at the source"
    );
    let r = crate::support::find_record(&mesh.north.log, &reply.decision_id()).unwrap();
    assert_eq!(
        r.traffic, None,
        "no subset and no mirror mark in north's record"
    );
    mesh.north_v1.assert_clean();
    assert_eq!(mesh.north_v2.count(), 0);
}
