//! The issuer API server: HTTP/1.1 over rustls, client certificates optional at the handshake
//! (attest and bundle need none) and required by the renew and JWT routes.

// Handlers short-circuit with the HTTP answer itself as the error; it is built once per
// request, so its size does not matter.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::{
    AttestRequest, ErrorResponse, JwtRequest, JwtResponse, MAX_REQUEST_BYTES, RenewRequest,
    SvidResponse,
};
use crate::bundle::BundleSet;
use crate::csr::csr_der_from_pem;
use crate::error::IssuerError;
use crate::files::unix_secs;
use crate::id::SpiffeId;
use crate::issuer::{DEFAULT_JWT_TTL, Issuer};
use crate::provider::{certified_key, crypto_provider};
use crate::svid::X509Svid;
use crate::verify::{PeerAuthorizer, SpiffeClientVerifier};
use crate::x509::peer_spiffe_id;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 512;

/// A server certificate that can be replaced while serving (renewed listener SVIDs).
#[derive(Debug)]
pub struct SvidCertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl SvidCertResolver {
    /// Serves `svid`, which must carry its private key.
    pub fn new(svid: &X509Svid) -> Result<Self, rustls::Error> {
        Ok(Self {
            current: ArcSwap::from(certified_key(svid)?),
        })
    }

    /// Serves `svid` from the next handshake on.
    pub fn update(&self, svid: &X509Svid) -> Result<(), rustls::Error> {
        self.current.store(certified_key(svid)?);
        Ok(())
    }
}

/// What a listener certificate is issued for: the ID, its extra SANs, its lifetime.
#[derive(Debug, Clone)]
pub struct ListenerCert {
    /// The SPIFFE ID in the URI SAN (the gateway's).
    pub id: SpiffeId,
    /// DNS SANs, for standard clients.
    pub dns_names: Vec<String>,
    /// IP SANs, for standard clients.
    pub ips: Vec<std::net::IpAddr>,
    /// Lifetime of each certificate.
    pub ttl: Duration,
}

impl ListenerCert {
    /// A fresh certificate from `issuer`.
    pub fn issue(&self, issuer: &Issuer, now: SystemTime) -> Result<X509Svid, IssuerError> {
        issuer.issue_x509_svid(&self.id, self.ttl, &self.dns_names, &self.ips, now)
    }

    /// Keeps `resolver` serving a fresh certificate, like any SVID: a new one at half the
    /// lifetime of the one served; a failed renewal is retried after a tenth of the lifetime
    /// (at least a second). Runs until dropped (abort it, or select it against a stop).
    pub async fn keep_renewed(self, issuer: Arc<Issuer>, resolver: Arc<SvidCertResolver>) {
        let retry = (self.ttl / 10)
            .max(Duration::from_secs(1))
            .min(self.ttl / 2);
        let mut next = self.ttl / 2;
        loop {
            tokio::time::sleep(next).await;
            let renewed = self
                .issue(&issuer, SystemTime::now())
                .map_err(|e| e.to_string())
                .and_then(|svid| resolver.update(&svid).map_err(|e| e.to_string()));
            next = match renewed {
                Ok(()) => {
                    tracing::debug!(id = %self.id, "listener certificate renewed");
                    self.ttl / 2
                }
                Err(error) => {
                    tracing::error!(%error, "cannot renew the listener certificate; retrying");
                    retry
                }
            };
        }
    }
}

impl ResolvesServerCert for SvidCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Serves the issuer API on `listener` until `shutdown` completes. Clients may present an
/// X.509-SVID of the issuer's trust domain; it is verified at the handshake.
pub async fn serve_issuer_api(
    listener: TcpListener,
    issuer: Arc<Issuer>,
    server_cert: Arc<SvidCertResolver>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let bundles = BundleSet::from_bundles([issuer.bundle()]);
    let verifier = SpiffeClientVerifier::new(
        bundles.clone(),
        PeerAuthorizer::TrustDomain(issuer.trust_domain().clone()),
    )
    .client_auth_mandatory(false);
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .map_err(std::io::Error::other)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(server_cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut sequence = issuer.bundle_sequence();
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    // Failing accepts (EMFILE and friends) back off, 10 ms doubling to 1 s, not spin.
    let mut backoff: Option<Duration> = None;
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff = None;
                    a
                }
                Err(e) => {
                    let pause = backoff.map_or(Duration::from_millis(10), |p| {
                        (p * 2).min(Duration::from_secs(1))
                    });
                    if backoff.is_none() {
                        tracing::warn!(error = %e, "accept failed; backing off");
                    }
                    backoff = Some(pause);
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(pause) => continue,
                    }
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        // Follow rotations: verify renewals against the current bundle.
        let current = issuer.bundle_sequence();
        if current != sequence {
            bundles.insert(issuer.bundle());
            sequence = current;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many connections; dropping");
            continue;
        };
        let acceptor = acceptor.clone();
        let issuer = issuer.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let caller = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| peer_spiffe_id(c).ok());
            let service = hyper::service::service_fn(move |req| {
                let issuer = issuer.clone();
                let caller = caller.clone();
                async move { Ok::<_, Infallible>(handle(req, issuer, caller).await) }
            });
            let result = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service)
                .await;
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    tasks.shutdown().await;
    Ok(())
}

type Body = Full<Bytes>;

fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json_response(
        status,
        &ErrorResponse {
            error: message.into(),
        },
    )
}

fn issuer_error(e: &IssuerError) -> Response<Body> {
    use IssuerError as E;
    let status = match e {
        E::UnknownToken
        | E::TokenUsed
        | E::TokenExpired
        | E::NoSuchEntry { .. }
        | E::ForeignTrustDomain { .. } => StatusCode::FORBIDDEN,
        _ if e.is_input() => StatusCode::BAD_REQUEST,
        _ => {
            tracing::error!(error = %e, "issuer failure");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
        }
    };
    tracing::info!(error = %e, "request refused");
    error(status, e.to_string())
}

/// Time allowed for a whole request body.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, Response<Body>> {
    // A body must arrive whole within the deadline: a client dribbling bytes cannot hold a
    // connection (and a connection permit) open.
    let collect = Limited::new(req.into_body(), MAX_REQUEST_BYTES).collect();
    let body = tokio::time::timeout(BODY_READ_TIMEOUT, collect)
        .await
        .map_err(|_| {
            error(
                StatusCode::REQUEST_TIMEOUT,
                "request body not received in time",
            )
        })?
        .map_err(|_| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body is too large or unreadable",
            )
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("malformed request body: {e}"),
        )
    })
}

/// Runs a blocking issuer operation (signing, sled flush) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, IssuerError> + Send + 'static,
) -> Result<T, Response<Body>> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(issuer_error(&e)),
        Err(_) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")),
    }
}

async fn handle(
    req: Request<Incoming>,
    issuer: Arc<Issuer>,
    caller: Option<SpiffeId>,
) -> Response<Body> {
    let result = match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/bundle") => Ok(bundle_response(&issuer)),
        (&Method::POST, "/v1/attest") => attest(req, issuer).await,
        (&Method::POST, "/v1/renew") => renew(req, issuer, caller).await,
        (&Method::POST, "/v1/jwt") => jwt(req, issuer, caller).await,
        (_, "/v1/bundle" | "/v1/attest" | "/v1/renew" | "/v1/jwt") => {
            Err(error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"))
        }
        (_, path) => Err(error(StatusCode::NOT_FOUND, format!("no route `{path}`"))),
    };
    result.unwrap_or_else(|resp| resp)
}

/// The bundle with retired roots pruned at the current time (falls back to the unpruned
/// bundle if pruning cannot be persisted: publishing an extra old root is safe).
fn current_bundle(issuer: &Issuer) -> crate::bundle::TrustBundle {
    issuer.bundle_at(SystemTime::now()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot prune retired roots");
        issuer.bundle()
    })
}

fn bundle_response(issuer: &Issuer) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(
        current_bundle(issuer).to_spiffe_json(),
    )));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn svid_response(issuer: &Issuer, svid: &X509Svid) -> Response<Body> {
    let bundle = current_bundle(issuer);
    let spiffe_bundle =
        serde_json::from_str(&bundle.to_spiffe_json()).unwrap_or(serde_json::Value::Null);
    json_response(
        StatusCode::OK,
        &SvidResponse {
            spiffe_id: svid.spiffe_id().to_string(),
            svid: svid.cert_chain_pem(),
            bundle: bundle.to_pem(),
            spiffe_bundle,
            expires_at: unix_secs(svid.not_after()),
        },
    )
}

async fn attest(
    req: Request<Incoming>,
    issuer: Arc<Issuer>,
) -> Result<Response<Body>, Response<Body>> {
    let body: AttestRequest = read_json(req).await?;
    let csr = csr_der_from_pem(&body.csr).map_err(|e| issuer_error(&e))?;
    let svid = {
        let issuer = issuer.clone();
        blocking(move || issuer.attest(&body.token, &csr, SystemTime::now())).await?
    };
    Ok(svid_response(&issuer, &svid))
}

fn require_caller(caller: Option<SpiffeId>) -> Result<SpiffeId, Response<Body>> {
    caller.ok_or_else(|| {
        error(
            StatusCode::UNAUTHORIZED,
            "this route needs a client X.509-SVID (mTLS)",
        )
    })
}

async fn renew(
    req: Request<Incoming>,
    issuer: Arc<Issuer>,
    caller: Option<SpiffeId>,
) -> Result<Response<Body>, Response<Body>> {
    let caller = require_caller(caller)?;
    let body: RenewRequest = read_json(req).await?;
    let csr = csr_der_from_pem(&body.csr).map_err(|e| issuer_error(&e))?;
    let svid = {
        let issuer = issuer.clone();
        blocking(move || issuer.renew(&caller, &csr, SystemTime::now())).await?
    };
    tracing::info!(spiffe_id = %svid.spiffe_id(), "SVID renewed");
    Ok(svid_response(&issuer, &svid))
}

async fn jwt(
    req: Request<Incoming>,
    issuer: Arc<Issuer>,
    caller: Option<SpiffeId>,
) -> Result<Response<Body>, Response<Body>> {
    let caller = require_caller(caller)?;
    let body: JwtRequest = read_json(req).await?;
    let ttl = body.ttl_secs.map_or(DEFAULT_JWT_TTL, Duration::from_secs);
    // Like renewal, minting needs a live registration entry: deleting it cuts the workload off.
    if issuer
        .entry(&caller)
        .map_err(|e| issuer_error(&e))?
        .is_none()
    {
        return Err(issuer_error(&IssuerError::NoSuchEntry {
            id: caller.to_string(),
        }));
    }
    let svid = issuer
        .mint_jwt_svid(&caller, &body.audience, ttl, SystemTime::now())
        .map_err(|e| issuer_error(&e))?;
    Ok(json_response(
        StatusCode::OK,
        &JwtResponse {
            token: svid.token,
            spiffe_id: svid.spiffe_id.to_string(),
            expires_at: unix_secs(svid.expiry),
        },
    ))
}
