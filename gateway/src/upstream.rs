//! Forwarding to a local service's endpoints: connection pools, load balancing, per-try
//! timeouts, retries of idempotent body-less requests within a budget, outlier ejection and a
//! cap on requests in flight (circuit breaking).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, Uri};
use hyper::body::{Body as _, Incoming};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::body::GatewayBody;
use crate::config::ServiceConfig;
use crate::lb::{self, Endpoint, RetryBudget};

/// Requests in flight per service before new ones are refused (circuit breaking).
const MAX_IN_FLIGHT: usize = 4096;

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// Every try failed to connect or errored.
    #[error("upstream `{endpoint}` failed: {source}")]
    Failed {
        /// The endpoint of the last try.
        endpoint: String,
        /// The client error.
        source: hyper_util::client::legacy::Error,
    },
    /// The upstream did not answer within the per-try timeout.
    #[error("upstream `{endpoint}` did not answer within {timeout:?}")]
    Timeout {
        /// The endpoint of the last try.
        endpoint: String,
        /// The per-try timeout.
        timeout: Duration,
    },
    /// Too many requests in flight to this service.
    #[error("circuit open: {0} requests in flight to the service")]
    CircuitOpen(usize),
    /// The service has no endpoints.
    #[error("the service has no endpoints")]
    NoEndpoints,
    /// The request could not be rebuilt for the upstream.
    #[error("cannot build the upstream request: {0}")]
    BadRequest(String),
}

/// Why a service's upstream settings are refused at start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamConfigError {
    /// Plaintext to a non-loopback endpoint without the `insecure_plaintext` setting.
    #[error(
        "service `{service}`: endpoint `{endpoint}` is not a loopback address; set `upstream_spiffe_id` for mTLS, or `insecure_plaintext = true` to send plaintext over the network"
    )]
    PlaintextNotLoopback {
        /// The service.
        service: String,
        /// The endpoint.
        endpoint: String,
    },
    /// An endpoint is not `host:port`.
    #[error("service `{service}`: endpoint `{endpoint}` is not `host:port`")]
    BadEndpoint {
        /// The service.
        service: String,
        /// The endpoint.
        endpoint: String,
    },
}

// One `Pool` per service, built once at start: variant size does not matter.
#[allow(clippy::large_enum_variant)]
enum Pool {
    /// Plaintext to loopback: HTTP/1.1, and h2c (prior knowledge) for gRPC.
    Plain(
        Client<HttpConnector, GatewayBody>,
        Client<HttpConnector, GatewayBody>,
    ),
    Tls(Client<HttpsConnector<HttpConnector>, GatewayBody>),
}

/// One local service's upstream side.
pub struct UpstreamService {
    name: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    endpoints: Vec<Endpoint>,
    pool: Pool,
    scheme: &'static str,
    timeout: Duration,
    retries: u32,
    budget: RetryBudget,
    in_flight: AtomicUsize,
}

impl std::fmt::Debug for UpstreamService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamService")
            .field("name", &self.name)
            .field("scheme", &self.scheme)
            .finish()
    }
}

impl UpstreamService {
    /// Builds a service from config. `tls` is the mTLS client config (our SVID, a verifier
    /// expecting the upstream's SPIFFE ID) when the service has `upstream_spiffe_id`.
    pub fn new(
        config: &ServiceConfig,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<Self, UpstreamConfigError> {
        let name = format!("{}.{}", config.name, config.namespace);
        for endpoint in &config.endpoints {
            let Some((host, port)) = endpoint.rsplit_once(':') else {
                return Err(UpstreamConfigError::BadEndpoint {
                    service: name,
                    endpoint: endpoint.clone(),
                });
            };
            if port.parse::<u16>().is_err() || host.is_empty() {
                return Err(UpstreamConfigError::BadEndpoint {
                    service: name,
                    endpoint: endpoint.clone(),
                });
            }
            if tls.is_none() && !config.insecure_plaintext && !is_loopback_host(host) {
                return Err(UpstreamConfigError::PlaintextNotLoopback {
                    service: name,
                    endpoint: endpoint.clone(),
                });
            }
        }
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.timeout.min(Duration::from_secs(5))));
        let builder = {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_idle_timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(64);
            b
        };
        let tls_raw = tls.clone().map(Arc::new);
        let (pool, scheme) = match tls {
            Some(mut tls) => {
                tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(tls)
                    .https_only()
                    .enable_all_versions()
                    .wrap_connector(http);
                (Pool::Tls(builder.build(https)), "https")
            }
            None => {
                let mut h2 = Client::builder(TokioExecutor::new());
                h2.pool_idle_timeout(Duration::from_secs(60))
                    .http2_only(true);
                (
                    Pool::Plain(builder.build(http.clone()), h2.build(http)),
                    "http",
                )
            }
        };
        Ok(Self {
            name,
            tls: tls_raw,
            endpoints: config
                .endpoints
                .iter()
                .cloned()
                .map(Endpoint::new)
                .collect(),
            pool,
            scheme,
            timeout: config.timeout,
            retries: config.retries,
            budget: RetryBudget::new(0.2, 10, 10),
            in_flight: AtomicUsize::new(0),
        })
    }

    /// Forwards a request (origin-form path in the URI) to one endpoint, retrying idempotent
    /// body-less requests on connect errors, timeouts and 502/503/504 within the budget.
    pub async fn forward(
        &self,
        req: Request<GatewayBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let in_flight = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        let _guard = InFlightGuard(&self.in_flight);
        if in_flight > MAX_IN_FLIGHT {
            return Err(UpstreamError::CircuitOpen(in_flight));
        }
        self.budget.deposit();
        let retryable = is_idempotent(req.method()) && req.body().is_end_stream();
        let (parts, body) = req.into_parts();
        let mut body = Some(body);
        let mut attempt = 0u32;
        let mut failed: Option<&Endpoint> = None;
        loop {
            let endpoint = lb::pick_avoiding(
                &self.endpoints,
                Instant::now(),
                (
                    rand::random::<u32>() as usize,
                    rand::random::<u32>() as usize,
                ),
                failed,
            )
            .ok_or(UpstreamError::NoEndpoints)?;
            let body = body.take().unwrap_or_else(crate::body::empty);
            let request = self.build(&parts, endpoint, body)?;
            let started = Instant::now();
            let inflight = endpoint.start();
            let result = tokio::time::timeout(self.timeout, self.send(request)).await;
            let outcome = match result {
                Ok(Ok(resp)) if !is_retryable_status(resp.status()) => {
                    inflight.success(started.elapsed());
                    return Ok(resp);
                }
                Ok(Ok(resp)) => {
                    inflight.failure(Instant::now());
                    Ok(resp)
                }
                Ok(Err(source)) => {
                    inflight.failure(Instant::now());
                    Err(UpstreamError::Failed {
                        endpoint: endpoint.addr.clone(),
                        source,
                    })
                }
                Err(_) => {
                    inflight.failure(Instant::now());
                    Err(UpstreamError::Timeout {
                        endpoint: endpoint.addr.clone(),
                        timeout: self.timeout,
                    })
                }
            };
            attempt += 1;
            if !retryable || attempt > self.retries || !self.budget.withdraw(Instant::now()) {
                return outcome;
            }
            tracing::debug!(service = %self.name, endpoint = %endpoint.addr, attempt, "retrying upstream request");
            failed = Some(endpoint);
        }
    }

    /// Opens a raw byte stream to one endpoint (for `CONNECT`): TCP, wrapped in mTLS when the
    /// service is configured with an upstream SPIFFE ID.
    pub async fn connect_tcp(&self) -> std::io::Result<Box<dyn Io>> {
        let endpoint = lb::pick(
            &self.endpoints,
            Instant::now(),
            (
                rand::random::<u32>() as usize,
                rand::random::<u32>() as usize,
            ),
        )
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "the service has no endpoints")
        })?;
        let inflight = endpoint.start();
        let started = Instant::now();
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(&endpoint.addr).await?;
            tcp.set_nodelay(true)?;
            match &self.tls {
                None => Ok::<Box<dyn Io>, std::io::Error>(Box::new(tcp)),
                Some(tls) => {
                    let name = rustls::pki_types::ServerName::try_from("upstream.meshgate.invalid")
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                    let stream = tokio_rustls::TlsConnector::from(tls.clone())
                        .connect(name, tcp)
                        .await?;
                    Ok(Box::new(stream) as Box<dyn Io>)
                }
            }
        };
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(io)) => {
                inflight.success(started.elapsed());
                Ok(io)
            }
            Ok(Err(e)) => {
                inflight.failure(Instant::now());
                Err(e)
            }
            Err(_) => {
                inflight.failure(Instant::now());
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "upstream connect timed out",
                ))
            }
        }
    }

    fn build(
        &self,
        parts: &http::request::Parts,
        endpoint: &Endpoint,
        body: GatewayBody,
    ) -> Result<Request<GatewayBody>, UpstreamError> {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri: Uri = format!("{}://{}{}", self.scheme, endpoint.addr, path)
            .parse()
            .map_err(|e: http::uri::InvalidUri| UpstreamError::BadRequest(e.to_string()))?;
        let mut req = Request::builder()
            .method(parts.method.clone())
            .uri(uri)
            .version(http::Version::HTTP_11);
        if let Some(headers) = req.headers_mut() {
            *headers = parts.headers.clone();
            headers.remove(http::header::HOST);
        }
        req.body(body)
            .map_err(|e| UpstreamError::BadRequest(e.to_string()))
    }

    async fn send(
        &self,
        req: Request<GatewayBody>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        match &self.pool {
            Pool::Plain(h1, h2) => {
                let grpc = req
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                if grpc {
                    h2.request(req).await
                } else {
                    h1.request(req).await
                }
            }
            Pool::Tls(c) => c.request(req).await,
        }
    }
}

/// A bidirectional byte stream to an upstream.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

struct InFlightGuard<'a>(&'a AtomicUsize);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

fn is_retryable_status(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

/// Loopback: `localhost`, 127.0.0.0/8, `::1`.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// All upstream services of this cluster, by `service.namespace`.
#[derive(Debug, Default)]
pub struct Upstreams {
    services: std::collections::HashMap<String, Arc<UpstreamService>>,
}

impl Upstreams {
    /// Adds a service.
    pub fn insert(&mut self, service: UpstreamService) {
        self.services
            .insert(service.name.clone(), Arc::new(service));
    }

    /// The service `service.namespace`.
    pub fn get(&self, name: &str) -> Option<&Arc<UpstreamService>> {
        self.services.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoints: &[&str]) -> ServiceConfig {
        ServiceConfig {
            name: "orders".into(),
            namespace: "shop".into(),
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            upstream_spiffe_id: None,
            insecure_plaintext: false,
            export_to: vec![],
            labels: Default::default(),
            timeout: Duration::from_secs(1),
            retries: 1,
        }
    }

    #[test]
    fn plaintext_only_to_loopback() {
        assert!(
            UpstreamService::new(&config(&["127.0.0.1:80", "localhost:81", "[::1]:82"]), None)
                .is_ok()
        );
        let err = UpstreamService::new(&config(&["10.0.0.1:80"]), None).unwrap_err();
        assert!(err.to_string().contains("insecure_plaintext"), "{err}");
        let mut insecure = config(&["10.0.0.1:80"]);
        insecure.insecure_plaintext = true;
        assert!(UpstreamService::new(&insecure, None).is_ok());
        assert!(matches!(
            UpstreamService::new(&config(&["nohost"]), None),
            Err(UpstreamConfigError::BadEndpoint { .. })
        ));
    }
}
