//! Property-based fuzzing of the federation control documents, both sides: what a linked
//! peer gateway may send to our control paths (bundle and checkpoint pushes, any method and
//! path), and what a peer answers to our sync (bundle, services, endpoints, checkpoints,
//! witnessed heads, bundle acks). No input may panic; a bad service name never breaks the
//! DNS zone; only the linked gateway is ever answered.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use hickory_server::proto::rr::Name;
use http::{Method, Request, Response, StatusCode};
use meshgate_fuzz::{json_value, mutate, mutations, runner};
use meshgate_identity::{BundleSet, Issuer, SpiffeId, TrustDomain};
use meshgate_policy::{Checkpoint, CheckpointSigner, DecisionLog};
use proptest::prelude::*;
use serde_json::{Value, json};

use crate::control::{
    BUNDLE_PATH, CHECKPOINTS_PATH, ENDPOINTS_PATH, SERVICES_PATH, WITNESSED_PATH,
};
use crate::{ControlTransport, Federation, FederationParts, Link, LocalCluster};

const WORDS: &[&str] = &[
    "keys",
    "use",
    "x509-svid",
    "jwt-svid",
    "x5c",
    "spiffe_sequence",
    "spiffe_refresh_hint",
    "cluster",
    "services",
    "gateways",
    "trust_domain",
    "checkpoints",
    "seq",
    "head_hash",
    "time",
    "public_key",
    "signature",
    "kind",
    "anchor",
    "checkpoint",
    "accepted",
    "sequence",
    "reason",
    "west.example",
    "east.example",
    "orders.shop",
    "127.0.0.1:4433",
    "[::1]:1",
];

/// A peer's answers by method and path (`GET /.meshgate/v1/bundle`), set per case.
#[derive(Debug, Default)]
struct Scripted {
    answers: Mutex<BTreeMap<String, (StatusCode, Bytes)>>,
}

impl ControlTransport for Scripted {
    fn send(
        &self,
        _addr: SocketAddr,
        _td: &TrustDomain,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, String>> + Send + '_>> {
        let answer = self
            .answers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&format!("{} {}", request.method(), request.uri().path()))
            .cloned();
        Box::pin(async move {
            let (status, body) = answer.ok_or("connection refused")?;
            let mut resp = Response::new(body);
            *resp.status_mut() = status;
            Ok(resp)
        })
    }

    fn disconnect(&self, _td: &TrustDomain) {}
}

struct Fixture {
    _dirs: Vec<tempfile::TempDir>,
    runtime: tokio::runtime::Runtime,
    fed: Arc<Federation>,
    transport: Arc<Scripted>,
    peer: TrustDomain,
    /// The peer's bundle JSON, a valid document to mutate.
    peer_bundle: String,
    /// Heads of the peer's log, validly signed.
    heads: Vec<Checkpoint>,
}

fn issuer(td: &str, dir: &tempfile::TempDir) -> (sled::Db, Arc<Issuer>) {
    let db = sled::Config::new()
        .path(dir.path().join("db"))
        .cache_capacity(1 << 20)
        .open()
        .unwrap();
    std::fs::create_dir_all(dir.path().join("keys")).unwrap();
    let issuer = Issuer::init(
        &db,
        &dir.path().join("keys"),
        td.parse().unwrap(),
        SystemTime::now(),
    )
    .unwrap();
    (db, Arc::new(issuer))
}

fn fixture() -> Fixture {
    let (a_dir, b_dir, log_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (a_db, a) = issuer("east.example", &a_dir);
    let (_b_db, b) = issuer("west.example", &b_dir);
    let peer_bundle = b.bundle().to_spiffe_json();
    let link = Link {
        cluster: "west".into(),
        trust_domain: "west.example".into(),
        gateways: vec!["127.0.0.1:1".parse().unwrap()],
        dns: None,
        priority: 0,
        bootstrap_bundle: peer_bundle.clone(),
        services: vec!["orders.shop".into()],
        shared: vec!["orders.shop".into()],
        credentials: vec![],
    };
    let fed = Federation::open(
        &a_db,
        FederationParts {
            local: LocalCluster {
                cluster: "east".into(),
                trust_domain: a.trust_domain().clone(),
                services: BTreeMap::new(),
            },
            issuer: a,
            log: None,
            bundles: BundleSet::new(),
            links: vec![link],
            options: Default::default(),
        },
        SystemTime::now(),
    )
    .unwrap();
    let transport = Arc::new(Scripted::default());
    fed.attach(transport.clone(), vec!["127.0.0.1:2".parse().unwrap()]);
    // The peer's own decision log signs a few heads.
    let (signer, _) = CheckpointSigner::generate().unwrap();
    let log = DecisionLog::open(log_dir.path(), Some(signer), Default::default()).unwrap();
    let mut heads = Vec::new();
    for i in 0..4 {
        log.append_admin_event("admin", &format!("event {i}"), SystemTime::now())
            .unwrap();
        heads.push(log.checkpoint(SystemTime::now()).unwrap());
    }
    Fixture {
        _dirs: vec![a_dir, b_dir, log_dir],
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        fed,
        transport,
        peer: "west.example".parse().unwrap(),
        peer_bundle,
        heads,
    }
}

/// A checkpoint with at most one field changed.
fn head(heads: Vec<Checkpoint>) -> impl Strategy<Value = Value> {
    (0..heads.len(), 0usize..8, any::<u64>(), mutations(2)).prop_map(move |(i, field, n, m)| {
        let mut cp = serde_json::to_value(&heads[i]).unwrap_or_default();
        let name = [
            "seq",
            "head_hash",
            "time",
            "public_key",
            "signature",
            "kind",
        ][field % 6];
        if field < 6
            && let Some(obj) = cp.as_object_mut()
        {
            let edited = match obj.get(name) {
                Some(Value::String(s)) => {
                    json!(String::from_utf8_lossy(&mutate(s.as_bytes(), &m)))
                }
                _ if name == "kind" => json!(["anchor", "checkpoint", "other"][(n % 3) as usize]),
                _ => json!(n),
            };
            obj.insert(name.into(), edited);
        }
        cp
    })
}

/// A string field: usually a string, sometimes any JSON value.
fn text_field(usual: &'static [&'static str]) -> BoxedStrategy<Value> {
    prop_oneof![
        6 => proptest::sample::select(usual).prop_map(Value::from),
        1 => json_value(WORDS, 1),
    ]
    .boxed()
}

/// The peer's bundle, with a `spiffe_sequence` around the held one.
fn bundle_doc(f: &Fixture) -> BoxedStrategy<String> {
    let bundle = f.peer_bundle.clone();
    prop_oneof![
        3 => (0u64..3000).prop_map(move |seq| {
            let mut doc: Value = serde_json::from_str(&bundle).unwrap_or_default();
            doc["spiffe_sequence"] = json!(seq);
            doc.to_string()
        }),
        1 => Just(f.peer_bundle.clone()),
    ]
    .boxed()
}

/// The peer's signed heads, some edited, for its own trust domain or another.
fn checkpoints_doc(f: &Fixture) -> BoxedStrategy<String> {
    (
        text_field(&["west.example", "east.example"]),
        proptest::collection::vec(head(f.heads.clone()), 0..5),
    )
        .prop_map(|(td, cps)| json!({ "trust_domain": td, "checkpoints": cps }).to_string())
        .boxed()
}

/// Exported service names, servable or not: bad labels, over-long labels, any text.
fn services_doc() -> BoxedStrategy<String> {
    let name = prop_oneof![
        4 => "[a-z0-9-]{1,10}\\.[a-z0-9-]{1,10}",
        1 => "[a-z]{60,70}\\.[a-z]{1,3}",
        1 => "[a-z.]{0,12}",
        1 => any::<String>(),
        1 => "[ -~]{0,20}",
    ];
    (text_field(&["west"]), proptest::collection::vec(name, 0..8))
        .prop_map(|(cluster, services)| {
            json!({ "cluster": cluster, "services": services }).to_string()
        })
        .boxed()
}

/// Gateway addresses, mostly valid socket addresses.
fn endpoints_doc() -> BoxedStrategy<String> {
    let addr = prop_oneof![
        6 => any::<std::net::SocketAddr>().prop_map(|a| Value::from(a.to_string())),
        1 => "[0-9.:\\[\\]a-f]{0,24}".prop_map(Value::from),
        1 => json_value(WORDS, 1),
    ];
    (text_field(&["west"]), proptest::collection::vec(addr, 0..4))
        .prop_map(|(cluster, gateways)| {
            json!({ "cluster": cluster, "gateways": gateways }).to_string()
        })
        .boxed()
}

/// A bundle push's answer.
fn ack_doc() -> BoxedStrategy<String> {
    (
        any::<bool>(),
        meshgate_fuzz::json_number(),
        json_value(WORDS, 1),
    )
        .prop_map(|(accepted, sequence, reason)| {
            json!({ "accepted": accepted, "sequence": sequence, "reason": reason }).to_string()
        })
        .boxed()
}

/// A body near `doc` most of the time; else `doc` with byte edits, generated JSON, deep
/// nesting or raw bytes.
fn around(doc: BoxedStrategy<String>) -> BoxedStrategy<Bytes> {
    prop_oneof![
        12 => doc.clone().prop_map(Bytes::from),
        3 => (doc, mutations(3)).prop_map(|(t, m)| Bytes::from(mutate(t.as_bytes(), &m))),
        2 => json_value(WORDS, 5).prop_map(|v| Bytes::from(v.to_string())),
        1 => meshgate_fuzz::deep_nesting(300).prop_map(Bytes::from),
        1 => proptest::collection::vec(any::<u8>(), 0..256).prop_map(Bytes::from),
    ]
    .boxed()
}

/// Any control document body.
fn body(f: &Fixture) -> BoxedStrategy<Bytes> {
    around(
        prop_oneof![
            bundle_doc(f),
            checkpoints_doc(f),
            services_doc(),
            endpoints_doc(),
            ack_doc(),
        ]
        .boxed(),
    )
}

#[test]
fn fuzz_control_requests_from_a_peer() {
    let f = fixture();
    let gateway = SpiffeId::gateway(&f.peer);
    let stranger: SpiffeId = "spiffe://west.example/ns/shop/sa/web".parse().unwrap();
    let method =
        proptest::sample::select(vec![Method::GET, Method::POST, Method::PUT, Method::DELETE]);
    let path = prop_oneof![
        4 => proptest::sample::select(vec![BUNDLE_PATH, CHECKPOINTS_PATH, SERVICES_PATH, ENDPOINTS_PATH, WITNESSED_PATH])
            .prop_map(str::to_owned),
        1 => "/\\.meshgate/[ -~]{0,20}",
    ];
    let strategy = (method, path, body(&f), any::<bool>());
    let statuses = std::cell::RefCell::new(BTreeMap::new());
    runner(250)
        .run(&strategy, |(method, path, body, as_gateway)| {
            let peer = if as_gateway { &gateway } else { &stranger };
            let admitted = f.fed.control_admit(peer, &method, &path);
            if !as_gateway {
                prop_assert_eq!(
                    admitted.as_ref().err().map(|e| e.0),
                    Some(StatusCode::FORBIDDEN)
                );
            }
            let Ok(uri) = format!("https://west.example{path}").parse::<http::Uri>() else {
                return Ok(());
            };
            let mut req = Request::new(body);
            *req.method_mut() = method;
            *req.uri_mut() = uri;
            let resp = f.runtime.block_on(f.fed.handle_control(peer, req));
            let status = resp.status();
            *statuses.borrow_mut().entry(status.as_u16()).or_insert(0u32) += 1;
            prop_assert!(
                [200, 400, 403, 404, 409].contains(&status.as_u16()),
                "unexpected status {}",
                status
            );
            if !as_gateway {
                prop_assert_eq!(status, StatusCode::FORBIDDEN);
            }
            prop_assert!(serde_json::from_slice::<Value>(resp.body()).is_ok());
            Ok(())
        })
        .unwrap();
    eprintln!("control statuses: {:?}", statuses.borrow());
    // The federation still answers sensibly afterwards.
    assert!(f.fed.is_linked(&f.peer));
}

#[test]
fn fuzz_peer_answers_to_our_sync() {
    let f = fixture();
    let paths = [
        format!("GET {BUNDLE_PATH}"),
        format!("GET {SERVICES_PATH}"),
        format!("GET {ENDPOINTS_PATH}"),
        format!("GET {CHECKPOINTS_PATH}"),
        format!("GET {WITNESSED_PATH}"),
        format!("POST {BUNDLE_PATH}"),
    ];
    let status = || {
        prop_oneof![
            12 => Just(StatusCode::OK),
            1 => Just(StatusCode::NOT_FOUND),
            1 => Just(StatusCode::INTERNAL_SERVER_ERROR),
        ]
    };
    // Each path gets bodies near its own document; a third of the cases answer every path
    // with a well-formed document, so syncs also get through to applying what they fetched.
    let clean = |doc: BoxedStrategy<String>| doc.prop_map(|d| (StatusCode::OK, Bytes::from(d)));
    let fuzzed = |doc: BoxedStrategy<String>| (status(), around(doc));
    let strategy = prop_oneof![
        1 => (
            clean(bundle_doc(&f)),
            clean(services_doc()),
            clean(endpoints_doc()),
            clean(checkpoints_doc(&f)),
            clean(checkpoints_doc(&f)),
            clean(ack_doc()),
        )
            .prop_map(|(a, b, c, d, e, g)| vec![a, b, c, d, e, g]),
        2 => (
            fuzzed(bundle_doc(&f)),
            fuzzed(services_doc()),
            fuzzed(endpoints_doc()),
            fuzzed(checkpoints_doc(&f)),
            fuzzed(checkpoints_doc(&f)),
            fuzzed(ack_doc()),
        )
            .prop_map(|(a, b, c, d, e, g)| vec![a, b, c, d, e, g]),
    ];
    let origin = Name::from_ascii("mesh.").unwrap();
    let synced = std::cell::Cell::new(0u32);
    runner(250)
        .run(&strategy, |answers| {
            *f.transport.answers.lock().unwrap() = paths.iter().cloned().zip(answers).collect();
            if f.runtime.block_on(f.fed.sync_now(&f.peer)).is_ok() {
                synced.set(synced.get() + 1);
            }
            let _ = f.runtime.block_on(f.fed.fetch_witnessed(&f.peer));
            f.runtime.block_on(f.fed.push_bundle());
            // What was imported always makes a valid DNS zone and routes.
            let names = f.fed.visible_names();
            prop_assert!(
                crate::zone_records(&origin, &names, "127.0.0.1:53".parse().unwrap(), 1).is_ok(),
                "zone broken by {:?}",
                names
            );
            for name in &names {
                if let Some((svc, ns)) = name.split_once('.') {
                    let _ = f.fed.routes(svc, ns, None);
                }
            }
            let _ = f.fed.witnessed(f.peer.as_str());
            Ok(())
        })
        .unwrap();
    eprintln!("peer answers: {} syncs succeeded", synced.get());
}

#[test]
fn fuzz_link_documents() {
    let f = fixture();
    let link = json!({
        "cluster": "west", "trust_domain": "west.example", "gateways": ["127.0.0.1:1"],
        "bootstrap_bundle": f.peer_bundle,
    })
    .to_string();
    let strategy = prop_oneof![
        (Just(link), mutations(3)).prop_map(|(l, m)| mutate(l.as_bytes(), &m)),
        json_value(WORDS, 4).prop_map(|v| v.to_string().into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..128),
    ];
    runner(300)
        .run(&strategy, |bytes| {
            if let Ok(mut link) = serde_json::from_slice::<Link>(&bytes)
                && let Ok((td, bundle)) = link.normalize()
            {
                prop_assert_eq!(bundle.trust_domain(), &td);
                prop_assert_eq!(link.trust_domain, td.to_string());
            }
            Ok(())
        })
        .unwrap();
}
