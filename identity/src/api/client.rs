//! A client of the issuer API. It trusts the issuer by its SPIFFE ID
//! (`spiffe://<td>/meshgate/gateway`) under the given bundle, never by DNS name.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{
    AttestRequest, ErrorResponse, JwtRequest, JwtResponse, MAX_RESPONSE_BYTES, RenewRequest,
    SvidResponse,
};
use crate::bundle::{BundleSet, TrustBundle};
use crate::id::{SpiffeId, TrustDomain};
use crate::provider::client_config;
use crate::svid::X509Svid;
use crate::verify::{PeerAuthorizer, SpiffeServerVerifier};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a call to the issuer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IssuerClientError {
    /// The issuer URL is not `https://HOST[:PORT]`.
    #[error("issuer URL `{url}` is invalid: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// TCP connect or TLS handshake failed (the issuer may be down: worth retrying).
    #[error("cannot reach the issuer: {reason}")]
    Unreachable {
        /// What failed.
        reason: String,
    },
    /// The request took longer than the timeout.
    #[error("the issuer did not answer in time")]
    Timeout,
    /// The issuer answered with an error status.
    #[error("the issuer refused the request ({status}): {message}")]
    Refused {
        /// HTTP status code.
        status: u16,
        /// The issuer's error message.
        message: String,
    },
    /// The answer could not be read.
    #[error("malformed answer from the issuer: {reason}")]
    BadResponse {
        /// What is wrong.
        reason: String,
    },
}

impl IssuerClientError {
    /// Whether retrying later may help (transport failures and 5xx), as opposed to a refusal.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Timeout => true,
            Self::Refused { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// A client of one issuer.
#[derive(Debug, Clone)]
pub struct IssuerClient {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    bundles: BundleSet,
    server_id: SpiffeId,
}

impl IssuerClient {
    /// A client for `url` (`https://HOST[:PORT]`), trusting `bundle` and expecting the issuer
    /// to present the gateway ID of the bundle's trust domain.
    pub fn new(url: &str, bundle: TrustBundle) -> Result<Self, IssuerClientError> {
        let bad = |reason: &str| IssuerClientError::Url {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the scheme must be `https`"));
        }
        if uri
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
        {
            return Err(bad("give the origin only, without a path"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| bad("the host is not a DNS name or IP address"))?;
        let server_id = SpiffeId::gateway(bundle.trust_domain());
        Ok(Self {
            host,
            port,
            server_name,
            bundles: BundleSet::from_bundles([bundle]),
            server_id,
        })
    }

    /// The issuer's trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        self.server_id.trust_domain()
    }

    /// Replaces the trusted bundle (after a renewal brought a newer one).
    pub fn update_bundle(&self, bundle: TrustBundle) {
        self.bundles.insert(bundle);
    }

    /// Redeems a join token with a CSR (PEM).
    pub async fn attest(
        &self,
        token: &str,
        csr_pem: &str,
    ) -> Result<SvidResponse, IssuerClientError> {
        let body = AttestRequest {
            token: token.to_owned(),
            csr: csr_pem.to_owned(),
        };
        self.call_json(Method::POST, "/v1/attest", Some(&body), None)
            .await
    }

    /// Renews over mTLS with the current SVID.
    pub async fn renew(
        &self,
        current: &X509Svid,
        csr_pem: &str,
    ) -> Result<SvidResponse, IssuerClientError> {
        let body = RenewRequest {
            csr: csr_pem.to_owned(),
        };
        self.call_json(Method::POST, "/v1/renew", Some(&body), Some(current))
            .await
    }

    /// Fetches a JWT-SVID for `audience` over mTLS with the current SVID.
    pub async fn jwt(
        &self,
        current: &X509Svid,
        audience: &[String],
    ) -> Result<JwtResponse, IssuerClientError> {
        let body = JwtRequest {
            audience: audience.to_vec(),
            ttl_secs: None,
        };
        self.call_json(Method::POST, "/v1/jwt", Some(&body), Some(current))
            .await
    }

    /// Fetches the SPIFFE bundle JSON.
    pub async fn bundle(&self) -> Result<TrustBundle, IssuerClientError> {
        let text = self
            .call::<()>(Method::GET, "/v1/bundle", None, None)
            .await?;
        let text =
            String::from_utf8(text.to_vec()).map_err(|_| IssuerClientError::BadResponse {
                reason: "not UTF-8".into(),
            })?;
        TrustBundle::from_spiffe_json(&text, self.trust_domain()).map_err(|e| {
            IssuerClientError::BadResponse {
                reason: e.to_string(),
            }
        })
    }

    async fn call_json<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        svid: Option<&X509Svid>,
    ) -> Result<T, IssuerClientError> {
        let bytes = self.call(method, path, body, svid).await?;
        serde_json::from_slice(&bytes).map_err(|e| IssuerClientError::BadResponse {
            reason: e.to_string(),
        })
    }

    async fn call<B: serde::Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        svid: Option<&X509Svid>,
    ) -> Result<Bytes, IssuerClientError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.call_inner(method, path, body, svid))
            .await
            .map_err(|_| IssuerClientError::Timeout)?
    }

    async fn call_inner<B: serde::Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        svid: Option<&X509Svid>,
    ) -> Result<Bytes, IssuerClientError> {
        let unreachable = |reason: String| IssuerClientError::Unreachable { reason };
        let verifier = SpiffeServerVerifier::new(
            self.bundles.clone(),
            PeerAuthorizer::Exact(self.server_id.clone()),
        );
        let mut config = client_config(svid, verifier).map_err(|e| unreachable(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // The name only feeds SNI: the certificate is checked by SPIFFE ID.
        let name = self.server_name.clone();
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let payload = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| IssuerClientError::BadResponse {
                reason: e.to_string(),
            })?,
            None => Vec::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, format!("{}:{}", self.host, self.port))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| IssuerClientError::BadResponse {
                reason: e.to_string(),
            })?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| IssuerClientError::BadResponse {
                reason: e.to_string(),
            })?
            .to_bytes();
        driver.abort();
        if status != StatusCode::OK {
            let message = serde_json::from_slice::<ErrorResponse>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| status.canonical_reason().unwrap_or("error").to_owned());
            return Err(IssuerClientError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        Ok(bytes)
    }
}
