//! Admission without a network: real Cedar, real quotas, a real decision log in a temp dir.

use std::collections::BTreeMap;

use meshgate_policy::{DecisionKind, Filter, LogOptions, SourceFile};

use super::*;
use crate::catalog::PeerRoute;
use crate::config::ServiceConfig;

const POLICIES: &str = r#"
@id("web-reads-orders")
@quota("2/s")
permit (principal == Workload::"spiffe://west.example/ns/shop/sa/web", action in Action::"read", resource == Service::"orders.shop.west");

@id("east-reads-orders")
permit (principal in TrustDomain::"east.example", action == Action::"GET", resource == Service::"orders.shop.west");

@id("no-admin")
forbid (principal, action, resource) when { context.path like "/admin*" };
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    admission: Admission,
    log: Arc<DecisionLog>,
    orders: Arc<LocalService>,
    east_gw: SpiffeId,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(
        DecisionLog::open(&dir.path().join("audit"), None, LogOptions::default()).unwrap(),
    );
    let policy = Arc::new(
        PolicyEngine::from_sources(
            &[SourceFile {
                name: "p.cedar".into(),
                text: POLICIES.into(),
            }],
            None,
        )
        .unwrap(),
    );
    let td: TrustDomain = "west.example".parse().unwrap();
    let admission = Admission::new(
        SpiffeId::gateway(&td),
        "west".into(),
        policy,
        QuotaLimiter::new(None, 1000),
        log.clone(),
        Arc::new(Metrics::new()),
    );
    let orders = Arc::new(
        LocalService::new(
            &ServiceConfig {
                name: "orders".into(),
                namespace: "shop".into(),
                endpoints: vec!["127.0.0.1:9".into()],
                upstream_spiffe_id: None,
                insecure_plaintext: false,
                export_to: vec!["east".into()],
                labels: BTreeMap::new(),
                timeout: Duration::from_secs(1),
                retries: 1,
                protocol: Default::default(),
                proxy_protocol: false,
                subsets: Vec::new(),
            },
            None,
        )
        .unwrap(),
    );
    Fixture {
        _dir: dir,
        admission,
        log,
        orders,
        east_gw: SpiffeId::gateway(&"east.example".parse().unwrap()),
    }
}

fn head(method: &str, path: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::builder().method(method).uri(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn meta() -> RequestMeta {
    RequestMeta {
        id: headers::new_request_id(),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        source: None,
        traffic: None,
    }
}

fn caller(id: &str) -> Result<Caller, Unfit> {
    Ok(Caller {
        id: id.parse().unwrap(),
        mtls: true,
    })
}

const WEB: &str = "spiffe://west.example/ns/shop/sa/web";

async fn decide(
    f: &Fixture,
    hop: Hop<'_>,
    head: &http::request::Parts,
    caller: Result<Caller, Unfit>,
    target: Result<Target, Unfit>,
) -> (Result<Permit, Refusal>, RequestMeta) {
    let meta = meta();
    let decided = f.admission.admit(
        Ask {
            meta: &meta,
            hop,
            head,
            authority: Some("orders.shop.west.mesh"),
            caller,
            target,
            fault: None,
        },
        Now::current(),
    );
    (f.admission.record(decided).await, meta)
}

fn record(f: &Fixture, id: &str) -> meshgate_policy::DecisionRecord {
    f.log
        .query(&Filter::default())
        .unwrap()
        .into_iter()
        .find(|r| r.id == id)
        .expect("the decision was recorded")
}

#[tokio::test]
async fn an_allowed_request_gets_a_permit_only_with_its_record() {
    let f = fixture();
    let h = head("GET", "/v1/../v1/orders/%34%32?x=1", &[("x-env", "prod")]);
    let (permit, meta) = decide(
        &f,
        Hop::Workload,
        &h,
        caller(WEB),
        Ok(Target::Local(f.orders.clone())),
    )
    .await;
    let permit = permit.unwrap();
    assert_eq!(permit.decision_id(), meta.id);
    assert_eq!(permit.path(), Some("/v1/orders/42"));
    assert_eq!(permit.caller().id.as_str(), WEB);
    let r = record(&f, &meta.id);
    assert_eq!(r.decision, DecisionKind::Allow);
    assert_eq!(r.reasons, ["web-reads-orders"]);
    assert_eq!(r.status, Some(200));
    assert_eq!(r.quota_remaining, Some(1));
    assert_eq!(
        r.source_gateway.as_deref(),
        Some("spiffe://west.example/meshgate/gateway")
    );
    assert_eq!(r.trace_id.as_deref(), Some(meta.trace_id.as_str()));
}

#[tokio::test]
async fn refusals_are_recorded_with_their_status_and_reason() {
    let f = fixture();
    let local = || Ok(Target::Local(f.orders.clone()));
    // Each refusal: (what to ask, status, label, part of the message).
    let unauthenticated = Err(Unfit::new(
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
        "present an X.509-SVID",
    ));
    let cases: Vec<(_, _, _, u16, &str, &str)> = vec![
        (
            head("GET", "/admin/users", &[]),
            caller(WEB),
            local(),
            403,
            "deny",
            "forbidden by policy no-admin",
        ),
        (
            head("POST", "/v1/orders", &[]),
            caller(WEB),
            local(),
            403,
            "deny",
            "no policy permits",
        ),
        (
            head("GET", "/v1", &[]),
            unauthenticated,
            local(),
            401,
            "unauthenticated",
            "unauthenticated: present",
        ),
        (
            head("GET", "/.meshgate/v1/bundle", &[]),
            caller(WEB),
            local(),
            403,
            "deny",
            "reserved",
        ),
        (
            head("GET", "//a/../.meshgate/x", &[]),
            caller(WEB),
            local(),
            403,
            "deny",
            "reserved",
        ),
        (
            head(
                "GET",
                "/v1",
                &[("content-length", "1"), ("transfer-encoding", "chunked")],
            ),
            caller(WEB),
            local(),
            400,
            "deny",
            "ambiguous framing",
        ),
        (
            head("GET", "/v1", &[]),
            caller(WEB),
            Err(Unfit::new(
                StatusCode::NOT_FOUND,
                "unknown_destination",
                "`x.y.mesh` is not served",
            )),
            404,
            "unknown_destination",
            "unknown destination: `x.y.mesh`",
        ),
    ];
    for (h, c, t, status, label, message) in cases {
        let (outcome, meta) = decide(&f, Hop::Workload, &h, c, t).await;
        let refusal = outcome.expect_err("refused");
        assert_eq!(
            (refusal.status.as_u16(), refusal.label),
            (status, label),
            "{h:?}"
        );
        assert!(refusal.message.contains(message), "{}", refusal.message);
        assert_eq!(refusal.decision_id, meta.id);
        let r = record(&f, &meta.id);
        assert_eq!(r.status, Some(status), "{h:?}");
        assert_ne!(r.decision, DecisionKind::Allow);
    }
    // A header value that is not visible ASCII is refused before anything else.
    let mut h = head("GET", "/v1", &[]);
    h.headers
        .insert("x-odd", http::HeaderValue::from_bytes(b"caf\xe9").unwrap());
    let (outcome, _) = decide(&f, Hop::Workload, &h, caller(WEB), local()).await;
    assert_eq!(outcome.unwrap_err().status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_quota_refuses_with_retry_after_and_records_it() {
    let f = fixture();
    let h = head("GET", "/v1/orders", &[]);
    for _ in 0..2 {
        let (p, _) = decide(
            &f,
            Hop::Workload,
            &h,
            caller(WEB),
            Ok(Target::Local(f.orders.clone())),
        )
        .await;
        assert!(p.is_ok());
    }
    let (outcome, meta) = decide(
        &f,
        Hop::Workload,
        &h,
        caller(WEB),
        Ok(Target::Local(f.orders.clone())),
    )
    .await;
    let refusal = outcome.unwrap_err();
    assert_eq!(refusal.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(refusal.retry_after.is_some_and(|d| d > Duration::ZERO));
    let r = record(&f, &meta.id);
    assert_eq!(r.decision, DecisionKind::QuotaExceeded);
    assert_eq!(r.quota_remaining, Some(0));
}

#[tokio::test]
async fn a_peer_is_told_about_the_target_before_its_caller_and_a_relay_is_not_recorded() {
    let f = fixture();
    let h = head("GET", "/v1", &[]);
    let peer = Hop::Peer {
        gateway: &f.east_gw,
        cluster: Some("east"),
    };
    // Unknown target with no caller: the target is what the peer hears about.
    let (outcome, meta) = decide(
        &f,
        peer,
        &h,
        Err(Unfit::new(
            StatusCode::FORBIDDEN,
            "unauthenticated",
            "no token",
        )),
        Err(Unfit::new(
            StatusCode::NOT_FOUND,
            "unknown_destination",
            "not here",
        )),
    )
    .await;
    assert_eq!(outcome.unwrap_err().status, StatusCode::NOT_FOUND);
    let r = record(&f, &meta.id);
    assert_eq!(
        r.source_gateway.as_deref(),
        Some("spiffe://east.example/meshgate/gateway")
    );
    // A peer's caller decided by Cedar, with its cluster in the facts.
    let (permit, meta) = decide(
        &f,
        peer,
        &h,
        caller("spiffe://east.example/ns/shop/sa/web"),
        Ok(Target::Local(f.orders.clone())),
    )
    .await;
    assert!(permit.is_ok());
    let r = record(&f, &meta.id);
    assert_eq!(r.reasons, ["east-reads-orders"]);
    assert_eq!(r.facts.unwrap().source_cluster, "east");
    // A request relayed to another cluster is decided there: a permit, no record here.
    let before = f.log.head().0;
    let (permit, _) = decide(
        &f,
        Hop::Workload,
        &h,
        caller(WEB),
        Ok(Target::Remote {
            dest: Destination {
                service: "orders".into(),
                namespace: "shop".into(),
                cluster: None,
            },
            routes: vec![PeerRoute {
                cluster: "east".into(),
                trust_domain: "east.example".parse().unwrap(),
                gateways: vec![],
                credentials: false,
            }],
        }),
    )
    .await;
    assert!(permit.unwrap().path().is_none());
    assert_eq!(f.log.head().0, before);
}

#[tokio::test]
async fn a_decision_that_cannot_be_recorded_refuses_the_request() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    drop(DecisionLog::open(dir.path(), None, LogOptions::default()).unwrap());
    let read_only = Arc::new(DecisionLog::open_read_only(dir.path(), None).unwrap());
    let admission = Admission::new(
        SpiffeId::gateway(&"west.example".parse().unwrap()),
        "west".into(),
        f.admission.policy().clone(),
        QuotaLimiter::new(None, 10),
        read_only,
        Arc::new(Metrics::new()),
    );
    let h = head("GET", "/v1/orders", &[]);
    let meta = meta();
    let decided = admission.admit(
        Ask {
            meta: &meta,
            hop: Hop::Workload,
            head: &h,
            authority: None,
            caller: caller(WEB),
            target: Ok(Target::Local(f.orders.clone())),
            fault: None,
        },
        Now::current(),
    );
    let refusal = admission.record(decided).await.unwrap_err();
    assert_eq!(refusal.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(refusal.message.contains("could not be recorded"));
    assert_eq!(refusal.decision_id, meta.id);
}

#[tokio::test]
async fn what_a_service_speaks_decides_what_reaches_it() {
    let f = fixture();
    // CONNECT into an HTTP service would carry requests no policy saw: refused, recorded.
    let h = head("CONNECT", "orders.shop.west:80", &[]);
    let (outcome, meta) = decide(
        &f,
        Hop::Workload,
        &h,
        caller(WEB),
        Ok(Target::Local(f.orders.clone())),
    )
    .await;
    let refusal = outcome.unwrap_err();
    assert_eq!(refusal.status, StatusCode::FORBIDDEN);
    assert!(
        refusal.message.contains("is an HTTP service"),
        "{}",
        refusal.message
    );
    assert_eq!(record(&f, &meta.id).status, Some(403));
    // Plain HTTP to a TCP service would bypass `connect`: refused too.
    let db = Arc::new(
        LocalService::new(
            &ServiceConfig {
                name: "db".into(),
                namespace: "shop".into(),
                endpoints: vec!["127.0.0.1:9".into()],
                upstream_spiffe_id: None,
                insecure_plaintext: false,
                export_to: vec![],
                labels: BTreeMap::new(),
                timeout: Duration::from_secs(1),
                retries: 0,
                protocol: crate::config::ServiceProtocol::Tcp,
                proxy_protocol: true,
                subsets: Vec::new(),
            },
            None,
        )
        .unwrap(),
    );
    let h = head("GET", "/", &[]);
    let (outcome, _) = decide(&f, Hop::Workload, &h, caller(WEB), Ok(Target::Local(db))).await;
    let refusal = outcome.unwrap_err();
    assert!(
        refusal.message.contains("is a TCP service"),
        "{}",
        refusal.message
    );
    // PROXY protocol only makes sense for TCP services.
    let err = LocalService::new(
        &ServiceConfig {
            name: "web".into(),
            namespace: "shop".into(),
            endpoints: vec!["127.0.0.1:9".into()],
            upstream_spiffe_id: None,
            insecure_plaintext: false,
            export_to: vec![],
            labels: BTreeMap::new(),
            timeout: Duration::from_secs(1),
            retries: 0,
            protocol: crate::config::ServiceProtocol::Http,
            proxy_protocol: true,
            subsets: Vec::new(),
        },
        None,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("needs `protocol = \"tcp\"`"),
        "{err}"
    );
}
