//! The demo's workload client: HTTPS to its gateway's workload listener, verifying the
//! gateway against the cluster's bundle and presenting the workload's X.509-SVID.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meshgate_identity::{TrustBundle, X509Svid};
use tokio::net::TcpStream;

/// One workload's client.
pub struct Workload {
    config: Arc<rustls::ClientConfig>,
    gateway: SocketAddr,
}

/// A response, read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn decision_id(&self) -> &str {
        self.header("x-meshgate-decision-id")
    }
}

impl Workload {
    /// A workload presenting `svid`; `None` for a caller without a certificate.
    pub fn new(
        svid: Option<&X509Svid>,
        bundle: &TrustBundle,
        gateway: SocketAddr,
    ) -> anyhow::Result<Workload> {
        let mut roots = rustls::RootCertStore::empty();
        for root in bundle.x509_roots() {
            roots.add(root.clone()).context("bundle root")?;
        }
        let builder =
            rustls::ClientConfig::builder_with_provider(meshgate_identity::crypto_provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots);
        let mut config = match svid {
            Some(svid) => {
                let key = svid
                    .private_key()
                    .context("the workload SVID has no key")?
                    .clone_key();
                builder.with_client_auth_cert(svid.cert_chain().to_vec(), key)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Workload {
            config: Arc::new(config),
            gateway,
        })
    }

    /// Sends `method` to `https://<authority><path>` through the gateway (direct style: the
    /// destination in `Host`).
    pub async fn call(
        &self,
        method: &str,
        authority: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        let tcp = TcpStream::connect(self.gateway).await?;
        let name = rustls_pki_types::ServerName::IpAddress(self.gateway.ip().into());
        let tls = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", authority);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = sender
            .send_request(req.body(Full::new(Bytes::new()))?)
            .await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}
