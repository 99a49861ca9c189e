//! Traces over OTLP/HTTP: two real gateways export each request's spans to a receiver made
//! of the opentelemetry-proto types; the spans form one tree under the caller's trace, and
//! the decision id and trace id name each other.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use tokio::net::TcpListener;

use crate::support::{Client, Cluster, Spec, echo_upstream, find_record, service};

/// One received span: its service, name, ids (hex) and string/int attributes.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: BTreeMap<String, String>,
}

/// An OTLP/HTTP trace receiver: `POST /v1/traces` with a protobuf body.
async fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let spans = Arc::new(Mutex::new(Vec::new()));
    let store = spans.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let store = store.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let export = ExportTraceServiceRequest::decode(body).unwrap();
                        let mut out = store.lock().unwrap();
                        for rs in export.resource_spans {
                            let service = rs
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|kv| kv.key == "service.name")
                                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                                .map(text)
                                .unwrap_or_default();
                            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                                out.push(Received {
                                    service: service.clone(),
                                    name: span.name,
                                    trace_id: hex::encode(span.trace_id),
                                    span_id: hex::encode(span.span_id),
                                    parent: hex::encode(span.parent_span_id),
                                    attributes: span
                                        .attributes
                                        .iter()
                                        .filter_map(|kv| {
                                            Some((
                                                kv.key.clone(),
                                                text(kv.value.as_ref()?.value.as_ref()?),
                                            ))
                                        })
                                        .collect(),
                                });
                            }
                        }
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (format!("http://{addr}/v1/traces"), spans)
}

fn text(v: &Value) -> String {
    match v {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

const POLICY: &str = r#"@id("web-reads-orders")
permit (
  principal == Workload::"spiffe://east.example/ns/shop/sa/web",
  action in Action::"read",
  resource == Service::"orders.shop.west"
);"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_a_cross_cluster_call_form_one_tree_under_the_callers_trace() {
    let (endpoint, received) = receiver().await;
    let upstream = echo_upstream().await;
    let traced = |c: &mut meshgate_gateway::GatewayConfig| {
        c.telemetry.otlp_endpoint = Some(endpoint.clone());
        c.telemetry.export_interval = Duration::from_millis(100);
    };
    let west = Cluster::start_with(
        Spec {
            name: "west",
            policies: POLICY,
            services: vec![service("orders", "shop", upstream, &["east"])],
            default_quota: None,
        },
        traced,
    )
    .await;
    let east = Cluster::start_with(
        Spec {
            name: "east",
            policies: "",
            services: vec![],
            default_quota: None,
        },
        traced,
    )
    .await;
    west.link(&east, &["orders.shop"]);

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let web = Client::new(&east, Some(&east.svid("/ns/shop/sa/web")), &[b"http/1.1"]);
    let req = Request::get("/v1/orders/1")
        .header("host", "orders.shop.west.mesh")
        .header("traceparent", format!("00-{trace}-{caller_span}-01"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = web.send(req).await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let decision_id = reply.decision_id();

    let names = [
        ("meshgate-east", "meshgate source"),
        ("meshgate-east", "meshgate tunnel"),
        ("meshgate-east", "meshgate admission"),
        ("meshgate-west", "meshgate destination"),
        ("meshgate-west", "meshgate admission"),
        ("meshgate-west", "meshgate upstream"),
    ];
    let spans = wait_spans(&received, trace, &names).await;
    let find = |service: &str, name: &str| {
        spans
            .iter()
            .find(|s| s.service == service && s.name == name && s.trace_id == trace)
            .unwrap_or_else(|| panic!("no `{name}` span from {service}: {spans:#?}"))
            .clone()
    };
    let source = find("meshgate-east", "meshgate source");
    let tunnel = find("meshgate-east", "meshgate tunnel");
    let dest = find("meshgate-west", "meshgate destination");
    let admission = find("meshgate-west", "meshgate admission");
    let upstream_span = find("meshgate-west", "meshgate upstream");
    // One tree: caller → source → tunnel → destination → (admission, upstream).
    assert_eq!(source.parent, caller_span);
    assert_eq!(tunnel.parent, source.span_id);
    assert_eq!(dest.parent, tunnel.span_id);
    assert_eq!(admission.parent, dest.span_id);
    assert_eq!(upstream_span.parent, dest.span_id);
    // The decision id on the spans; the trace id in the decision record.
    assert_eq!(dest.attributes["meshgate.decision_id"], decision_id);
    assert_eq!(source.attributes["meshgate.decision_id"], decision_id);
    assert_eq!(dest.attributes["meshgate.decision"], "allow");
    assert_eq!(dest.attributes["http.response.status_code"], "200");
    let record = find_record(&west.log, &decision_id).expect("west's record");
    assert_eq!(record.trace_id.as_deref(), Some(trace));
    // …and the trace finds its decisions.
    let of_trace = west
        .log
        .query(&meshgate_policy::Filter {
            trace_id: Some(trace.to_owned()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        of_trace.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [decision_id.as_str()]
    );
    // The upstream got the trace with west's upstream span as its parent.
    let echoed = reply.json();
    let sent = echoed["headers"]["traceparent"].as_str().unwrap();
    assert_eq!(sent, format!("00-{trace}-{}-01", upstream_span.span_id));

    // A caller that sends no `traceparent`: east starts the trace, its source span is a root.
    let reply = web
        .get("orders.shop.west.mesh", "/v1/orders/2")
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    let record = find_record(&west.log, &reply.decision_id()).unwrap();
    let started = record.trace_id.unwrap();
    let spans = wait_spans(&received, &started, &names).await;
    let root = spans
        .iter()
        .find(|s| s.trace_id == started && s.name == "meshgate source")
        .unwrap();
    assert_eq!(
        root.parent, "",
        "the gateway's own trace starts at its source span"
    );
    let tunnel = spans
        .iter()
        .find(|s| s.trace_id == started && s.name == "meshgate tunnel")
        .unwrap();
    assert!(spans.iter().any(|s| s.trace_id == started
        && s.name == "meshgate destination"
        && s.parent == tunnel.span_id));
}

/// Waits until every `(service, name)` span of `trace` has arrived.
async fn wait_spans(
    received: &Mutex<Vec<Received>>,
    trace: &str,
    names: &[(&str, &str)],
) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let spans = received.lock().unwrap().clone();
        let all = names.iter().all(|(service, name)| {
            spans
                .iter()
                .any(|s| s.trace_id == trace && s.service == *service && s.name == *name)
        });
        if all {
            return spans;
        }
        assert!(Instant::now() < deadline, "spans not exported: {spans:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
