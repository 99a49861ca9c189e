//! SPIFFE-aware rustls certificate verifiers: roots are chosen by the peer's trust domain from
//! a [`BundleSet`], the chain and validity are checked, the SPIFFE ID is extracted, and then a
//! [`PeerAuthorizer`] decides. The server name is ignored: SVIDs are names by URI SAN.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::bundle::BundleSet;
use crate::id::{SpiffeId, TrustDomain};
use crate::provider::crypto_provider;
use crate::x509::{SvidError, Usage, verify_x509_svid};

/// Which verified SPIFFE IDs may connect.
#[derive(Clone)]
pub enum PeerAuthorizer {
    /// Any ID whose trust domain is in the bundle set.
    Any,
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any ID in this trust domain.
    TrustDomain(TrustDomain),
    /// One of these IDs.
    OneOf(Vec<SpiffeId>),
    /// Whatever the predicate accepts.
    Predicate(Arc<dyn Fn(&SpiffeId) -> bool + Send + Sync>),
}

impl PeerAuthorizer {
    /// Whether `id` (already verified) is accepted.
    pub fn authorize(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(expected) => id == expected,
            Self::TrustDomain(td) => id.trust_domain() == td,
            Self::OneOf(ids) => ids.contains(id),
            Self::Predicate(f) => f(id),
        }
    }
}

impl fmt::Debug for PeerAuthorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("Any"),
            Self::Exact(id) => f.debug_tuple("Exact").field(id).finish(),
            Self::TrustDomain(td) => f.debug_tuple("TrustDomain").field(td).finish(),
            Self::OneOf(ids) => f.debug_tuple("OneOf").field(ids).finish(),
            Self::Predicate(_) => f.write_str("Predicate(..)"),
        }
    }
}

/// Where verifiers take the current time from.
pub type TimeSource = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The shared part of both verifiers.
#[derive(Clone)]
struct Core {
    bundles: BundleSet,
    authorizer: PeerAuthorizer,
    provider: Arc<CryptoProvider>,
    time: Option<TimeSource>,
}

impl Core {
    fn new(bundles: BundleSet, authorizer: PeerAuthorizer) -> Self {
        Self {
            bundles,
            authorizer,
            provider: crypto_provider(),
            time: None,
        }
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: Usage,
    ) -> Result<SpiffeId, rustls::Error> {
        let now = match &self.time {
            Some(clock) => clock(),
            None => UNIX_EPOCH + Duration::from_secs(now.as_secs()),
        };
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let id = verify_x509_svid(&chain, &self.bundles, usage, now).map_err(to_rustls)?;
        if !self.authorizer.authorize(&id) {
            return Err(to_rustls(SvidError::NotAuthorized { id: id.to_string() }));
        }
        Ok(id)
    }

    fn tls12(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }

    fn tls13(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Maps an [`SvidError`] to the rustls error (and TLS alert) that fits best; the SVID error
/// stays reachable through `CertificateError::Other` for the rest.
pub fn to_rustls(e: SvidError) -> rustls::Error {
    let cert_error = match e {
        SvidError::Expired => CertificateError::Expired,
        SvidError::NotYetValid => CertificateError::NotValidYet,
        SvidError::UnknownIssuer { .. } => CertificateError::UnknownIssuer,
        SvidError::Malformed { .. } => CertificateError::BadEncoding,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_error)
}

/// Verifies a server's X.509-SVID (client side). Ignores the server name.
#[derive(Clone)]
pub struct SpiffeServerVerifier {
    core: Core,
}

impl SpiffeServerVerifier {
    /// Verifies against `bundles`, then applies `authorizer`.
    pub fn new(bundles: BundleSet, authorizer: PeerAuthorizer) -> Self {
        Self {
            core: Core::new(bundles, authorizer),
        }
    }

    /// Takes the verification time from `clock` instead of the handshake (tests, simulations).
    pub fn with_time_source(mut self, clock: TimeSource) -> Self {
        self.core.time = Some(clock);
        self
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("authorizer", &self.core.authorizer)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.core
            .verify(end_entity, intermediates, now, Usage::Server)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.core.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.core.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.core.schemes()
    }
}

/// Verifies a client's X.509-SVID (server side). With `client_auth_mandatory(false)` clients
/// without a certificate are let through the handshake (for listeners that authenticate by
/// JWT-SVID instead); a client that does present one is still fully verified.
#[derive(Clone)]
pub struct SpiffeClientVerifier {
    core: Core,
    mandatory: bool,
}

impl SpiffeClientVerifier {
    /// Verifies against `bundles`, then applies `authorizer`; a certificate is mandatory.
    pub fn new(bundles: BundleSet, authorizer: PeerAuthorizer) -> Self {
        Self {
            core: Core::new(bundles, authorizer),
            mandatory: true,
        }
    }

    /// Whether a client must present a certificate.
    pub fn client_auth_mandatory(mut self, mandatory: bool) -> Self {
        self.mandatory = mandatory;
        self
    }

    /// Takes the verification time from `clock` instead of the handshake (tests, simulations).
    pub fn with_time_source(mut self, clock: TimeSource) -> Self {
        self.core.time = Some(clock);
        self
    }
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("authorizer", &self.core.authorizer)
            .field("mandatory", &self.mandatory)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: roots come from many trust domains and change at runtime.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.core
            .verify(end_entity, intermediates, now, Usage::Client)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.core.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.core.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.core.schemes()
    }
}
