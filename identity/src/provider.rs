//! The one rustls crypto provider (aws-lc-rs) and TLS config helpers.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;

use crate::svid::X509Svid;
use crate::verify::{SpiffeClientVerifier, SpiffeServerVerifier};

/// The aws-lc-rs provider used for every rustls config in meshgate. Build configs with
/// `builder_with_provider(crypto_provider())`: with two providers compiled in, rustls cannot
/// choose a default.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// A rustls `CertifiedKey` (chain + signing key) for an SVID that carries its private key.
pub fn certified_key(svid: &X509Svid) -> Result<Arc<CertifiedKey>, rustls::Error> {
    let key = svid
        .private_key()
        .ok_or_else(|| rustls::Error::General("the SVID carries no private key".into()))?;
    let signing = crypto_provider()
        .key_provider
        .load_private_key(key.clone_key())?;
    Ok(Arc::new(CertifiedKey::new(
        svid.cert_chain().to_vec(),
        signing,
    )))
}

/// A server config presenting `svid`, verifying clients with `verifier` (TLS 1.3 and 1.2).
pub fn server_config(
    svid: &X509Svid,
    verifier: SpiffeClientVerifier,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let key = certified_key(svid)?;
    let config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key)));
    Ok(config)
}

/// A client config verifying the server with `verifier`, presenting `svid` when given.
pub fn client_config(
    svid: Option<&X509Svid>,
    verifier: SpiffeServerVerifier,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    match svid {
        Some(svid) => {
            let key = svid
                .private_key()
                .ok_or_else(|| rustls::Error::General("the SVID carries no private key".into()))?;
            builder.with_client_auth_cert(svid.cert_chain().to_vec(), key.clone_key())
        }
        None => Ok(builder.with_no_client_auth()),
    }
}
