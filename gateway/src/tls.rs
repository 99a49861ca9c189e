//! The gateway's rustls configurations, all on the one aws-lc-rs provider, all presenting
//! the rotating gateway SVID and verifying peers with the SPIFFE-aware verifiers.

use std::sync::Arc;

use meshgate_identity::{
    BundleSet, PeerAuthorizer, SpiffeClientVerifier, SpiffeId, SpiffeServerVerifier, TrustDomain,
    crypto_provider,
};

use crate::svid::SvidStore;

/// ALPN for the tunnel.
pub const ALPN_H3: &[u8] = b"h3";

/// The workload listener: SVIDs of the local trust domain; a missing client certificate is
/// let through the handshake so the gateway can answer a clear 401 (and record it).
pub fn workload_server(
    local: &TrustDomain,
    bundles: BundleSet,
    svid: Arc<SvidStore>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let verifier = SpiffeClientVerifier::new(bundles, PeerAuthorizer::TrustDomain(local.clone()))
        .client_auth_mandatory(false);
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(svid);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The tunnel's server side: only `spiffe://<td>/meshgate/gateway` of a trust domain we hold
/// a bundle for; TLS 1.3 (QUIC).
pub fn tunnel_server(
    bundles: BundleSet,
    svid: Arc<SvidStore>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let only_gateways = PeerAuthorizer::Predicate(Arc::new(|id: &SpiffeId| {
        *id == SpiffeId::gateway(id.trust_domain())
    }));
    let verifier = SpiffeClientVerifier::new(bundles, only_gateways).client_auth_mandatory(true);
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(svid);
    config.alpn_protocols = vec![ALPN_H3.to_vec()];
    config.max_early_data_size = 0;
    Ok(config)
}

/// The tunnel's client side toward the gateways of `peer`: the server must be exactly
/// `spiffe://<peer>/meshgate/gateway`.
pub fn tunnel_client(
    peer: &TrustDomain,
    bundles: BundleSet,
    svid: Arc<SvidStore>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let verifier =
        SpiffeServerVerifier::new(bundles, PeerAuthorizer::Exact(SpiffeId::gateway(peer)));
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(svid);
    config.alpn_protocols = vec![ALPN_H3.to_vec()];
    Ok(config)
}

/// The upstream hop with mTLS: the upstream must present `expected`.
pub fn upstream_client(
    expected: SpiffeId,
    bundles: BundleSet,
    svid: Arc<SvidStore>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let verifier = SpiffeServerVerifier::new(bundles, PeerAuthorizer::Exact(expected));
    Ok(
        rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(svid),
    )
}
