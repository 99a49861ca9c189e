//! The admin listener: Prometheus `/metrics`, `/healthz` (the process is up) and `/readyz`
//! (listeners bound, policies loaded).
//!
//! Bounded like the workload listeners: at most `limits.max_connections` connections, a
//! request head within `limits.header_read_timeout`, a connection closed after
//! `limits.idle_timeout`, and accept errors (EMFILE and friends) backed off instead of
//! retried in a spin.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::admission::Admission;
use crate::body::{self, GatewayBody};
use crate::config::Limits;
use crate::metrics::Metrics;

/// First pause after a failed accept; it doubles while accepts keep failing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between accepts that keep failing.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What the metrics listener needs.
#[derive(Debug)]
pub(crate) struct AdminParts {
    pub metrics: Arc<Metrics>,
    pub admission: Arc<Admission>,
    pub limits: Limits,
}

pub(crate) async fn serve(shared: Arc<AdminParts>, listener: TcpListener) {
    let permits = Arc::new(Semaphore::new(shared.limits.max_connections));
    let mut backoff = None;
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(conn) => {
                backoff = None;
                conn
            }
            Err(e) => {
                let pause = next_backoff(backoff);
                if backoff.is_none() {
                    tracing::warn!(error = %e, "admin accept failed; backing off");
                }
                backoff = Some(pause);
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(peer = %remote, "admin connection limit reached; closing new connection");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let lifetime = shared.limits.idle_timeout;
            let header_timeout = shared.limits.header_read_timeout;
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(answer(&shared, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(lifetime, conn).await;
        });
    }
}

/// The pause after an accept failed, given the previous one (`None`: the first failure).
fn next_backoff(previous: Option<Duration>) -> Duration {
    previous.map_or(ACCEPT_BACKOFF_MIN, |p| (p * 2).min(ACCEPT_BACKOFF_MAX))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_accepts_back_off_to_a_second() {
        let mut pause = None;
        let mut seen = Vec::new();
        for _ in 0..10 {
            let next = next_backoff(pause);
            seen.push(next.as_millis());
            pause = Some(next);
        }
        assert_eq!(seen, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
    }
}
