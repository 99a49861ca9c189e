//! The admin listener: Prometheus `/metrics`, `/healthz` (the process is up) and `/readyz`
//! (listeners bound, policies loaded).

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::admission::Admission;
use crate::body::{self, GatewayBody};
use crate::metrics::Metrics;

/// What the metrics listener needs.
#[derive(Debug)]
pub(crate) struct AdminParts {
    pub metrics: Arc<Metrics>,
    pub admission: Arc<Admission>,
}

pub(crate) async fn serve(shared: Arc<AdminParts>, listener: TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(answer(&shared, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn answer(shared: &AdminParts, req: &Request<Incoming>) -> Response<GatewayBody> {
    let (status, content_type, text) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        // Listeners are bound and the policy set is loaded before the gateway starts serving.
        "/readyz" => (
            StatusCode::OK,
            "text/plain",
            format!(
                "ready\npolicy_version {}\n",
                shared.admission.policy().version()
            ),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(body::full(text));
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}
