//! A local service's upstream side: connection pools, load balancing over its endpoints,
//! the per-try timeout, outlier ejection and a cap on requests in flight (circuit breaking).
//! One call here is one attempt; retries are decided by the one retry layer (`forward`).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::body::GatewayBody;
use crate::config::{ServiceConfig, ServiceProtocol};
use crate::lb::{self, Endpoint};

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
    /// `proxy_protocol` on a service that is not `tcp`.
    #[error("service `{service}`: `proxy_protocol = true` needs `protocol = \"tcp\"`")]
    ProxyProtocolNotTcp {
        /// The service.
        service: String,
    },
    /// A subset without labels or endpoints, or with labels that cannot travel.
    #[error("service `{service}`: subsets[{index}]: {problem}")]
    BadSubset {
        /// The service.
        service: String,
        /// The subset's place in the list.
        index: usize,
        /// What is wrong.
        problem: String,
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

/// One service of this cluster: its endpoints, connection pools and settings.
pub(crate) struct LocalService {
    /// `service.namespace`.
    name: String,
    service: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    tls: Option<Arc<rustls::ClientConfig>>,
    endpoints: Vec<Endpoint>,
    pool: Pool,
    scheme: &'static str,
    timeout: Duration,
    retries: u32,
    protocol: ServiceProtocol,
    proxy_protocol: bool,
    in_flight: AtomicUsize,
    /// Subsets of the endpoints with more labels, for traffic routes.
    subsets: Vec<Arc<LocalService>>,
}

impl std::fmt::Debug for LocalService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalService")
            .field("name", &self.name)
            .field("scheme", &self.scheme)
            .finish()
    }
}

/// A request in flight to a service, counted for circuit breaking until dropped.
pub(crate) struct Admitted<'a>(&'a AtomicUsize);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl LocalService {
    /// Builds a service from config. `tls` is the mTLS client config (our SVID, a verifier
    /// expecting the upstream's SPIFFE ID) when the service has `upstream_spiffe_id`.
    pub(crate) fn new(
        config: &ServiceConfig,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<Self, UpstreamConfigError> {
        let name = format!("{}.{}", config.name, config.namespace);
        let mut subsets = Vec::with_capacity(config.subsets.len());
        for (index, subset) in config.subsets.iter().enumerate() {
            let bad = |problem: String| UpstreamConfigError::BadSubset {
                service: name.clone(),
                index,
                problem,
            };
            if subset.labels.is_empty() || subset.endpoints.is_empty() {
                return Err(bad("give it `labels` and `endpoints`".to_owned()));
            }
            crate::traffic::Subset::from_labels(&subset.labels).map_err(bad)?;
            let mut labels = config.labels.clone();
            labels.extend(subset.labels.clone());
            let derived = ServiceConfig {
                labels,
                endpoints: subset.endpoints.clone(),
                subsets: Vec::new(),
                ..config.clone()
            };
            subsets.push(Arc::new(LocalService::new(&derived, tls.clone())?));
        }
        if config.proxy_protocol && config.protocol != ServiceProtocol::Tcp {
            return Err(UpstreamConfigError::ProxyProtocolNotTcp { service: name });
        }
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
                .pool_max_idle_per_host(256);
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
            service: config.name.clone(),
            namespace: config.namespace.clone(),
            labels: config.labels.clone(),
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
            protocol: config.protocol,
            proxy_protocol: config.proxy_protocol,
            in_flight: AtomicUsize::new(0),
            subsets,
        })
    }

    /// The endpoints of `subset`: the service itself when its own labels carry the subset's
    /// (an empty subset is the service), else the first subset that does.
    pub(crate) fn subset(self: &Arc<Self>, subset: &crate::traffic::Subset) -> Option<Arc<Self>> {
        if subset.matches(&self.labels) {
            return Some(self.clone());
        }
        self.subsets
            .iter()
            .find(|s| subset.matches(&s.labels))
            .cloned()
    }

    /// `service.namespace`.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// `service.namespace.cluster`: the Cedar resource id.
    pub(crate) fn in_cluster(&self, cluster: &str) -> String {
        format!("{}.{}.{cluster}", self.service, self.namespace)
    }

    /// The service name and namespace.
    pub(crate) fn parts(&self) -> (&str, &str) {
        (&self.service, &self.namespace)
    }

    /// Labels, visible to Cedar as tags of the service.
    pub(crate) fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// What the service speaks.
    pub(crate) fn protocol(&self) -> ServiceProtocol {
        self.protocol
    }

    /// Whether connections to the upstream begin with a PROXY protocol v2 header.
    pub(crate) fn proxy_protocol(&self) -> bool {
        self.proxy_protocol
    }

    /// Time allowed each try until the response head, unless a route says otherwise.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How many times a request that enters the mesh here may be retried.
    pub(crate) fn retries(&self) -> u32 {
        self.retries
    }

    /// Counts a request in flight; `None` when the circuit is open (too many in flight).
    pub(crate) fn admit(&self) -> Result<Admitted<'_>, UpstreamError> {
        let n = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        let guard = Admitted(&self.in_flight);
        if n > MAX_IN_FLIGHT {
            return Err(UpstreamError::CircuitOpen(n));
        }
        Ok(guard)
    }

    /// One attempt: picks an endpoint (avoiding those in `avoid` while another is healthy),
    /// sends, and records the outcome for load balancing and ejection. Returns the endpoint's
    /// index with the result; a 502/503/504 from the upstream counts as the endpoint failing
    /// but is returned as an answer.
    pub(crate) async fn attempt(
        &self,
        parts: &http::request::Parts,
        body: GatewayBody,
        avoid: &[usize],
        timeout: Duration,
    ) -> (usize, Result<Response<Incoming>, UpstreamError>) {
        let random = (
            rand::random::<u32>() as usize,
            rand::random::<u32>() as usize,
        );
        let Some((index, endpoint)) =
            lb::pick_avoiding(&self.endpoints, Instant::now(), random, avoid)
        else {
            return (0, Err(UpstreamError::NoEndpoints));
        };
        let request = match self.build(parts, endpoint, body) {
            Ok(r) => r,
            Err(e) => return (index, Err(e)),
        };
        let started = Instant::now();
        let inflight = endpoint.start();
        let result = tokio::time::timeout(timeout, self.send(request)).await;
        let result = match result {
            Ok(Ok(resp)) if !is_retryable_status(resp.status()) => {
                inflight.success(started.elapsed());
                Ok(resp)
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
                    timeout,
                })
            }
        };
        (index, result)
    }

    /// Opens a raw byte stream to one endpoint (for `CONNECT`): TCP, wrapped in mTLS when the
    /// service is configured with an upstream SPIFFE ID.
    pub(crate) async fn connect_tcp(&self) -> std::io::Result<Box<dyn Io>> {
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

/// Whether a request may be sent twice: idempotent methods (RFC 9110 §9.2.2).
pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

/// Statuses that say the upstream did not serve the request: retried where allowed.
pub(crate) fn is_retryable_status(status: http::StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

/// Loopback: `localhost`, 127.0.0.0/8, `::1`.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// All services of this cluster, by `service.namespace`.
#[derive(Debug, Default)]
pub(crate) struct LocalServices {
    services: HashMap<String, Arc<LocalService>>,
}

impl LocalServices {
    /// Adds a service.
    pub(crate) fn insert(&mut self, service: LocalService) {
        self.services
            .insert(service.name.clone(), Arc::new(service));
    }

    /// The service `service.namespace`.
    pub(crate) fn get(&self, name: &str) -> Option<&Arc<LocalService>> {
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
            protocol: ServiceProtocol::Http,
            proxy_protocol: false,
            subsets: Vec::new(),
        }
    }

    #[test]
    fn plaintext_only_to_loopback() {
        assert!(
            LocalService::new(&config(&["127.0.0.1:80", "localhost:81", "[::1]:82"]), None).is_ok()
        );
        let err = LocalService::new(&config(&["10.0.0.1:80"]), None).unwrap_err();
        assert!(err.to_string().contains("insecure_plaintext"), "{err}");
        let mut insecure = config(&["10.0.0.1:80"]);
        insecure.insecure_plaintext = true;
        assert!(LocalService::new(&insecure, None).is_ok());
        assert!(matches!(
            LocalService::new(&config(&["nohost"]), None),
            Err(UpstreamConfigError::BadEndpoint { .. })
        ));
    }
}
