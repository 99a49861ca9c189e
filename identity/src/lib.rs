//! SPIFFE identities for meshgate: the trust domain's CA ([`Issuer`]), X.509-SVIDs and
//! JWT-SVIDs, trust bundles in the SPIFFE format ([`TrustBundle`], [`BundleSet`]),
//! registration entries and join-token attestation, the issuer's HTTPS API
//! ([`serve_issuer_api`]) and its client ([`agent`]), and SPIFFE-aware rustls verifiers.
//!
//! Logic takes `now: SystemTime` as an argument; only the API server and the agent read the
//! clock.

mod api;
mod bundle;
mod ca;
mod csr;
mod error;
mod files;
mod id;
mod issuer;
mod jwt;
mod provider;
mod registry;
mod store;
mod svid;
mod verify;
mod x509;

pub use api::agent;
pub use api::client::{IssuerClient, IssuerClientError};
pub use api::server::{ListenerCert, SvidCertResolver, serve_issuer_api};
pub use bundle::{
    BundleError, BundleSet, JwtPublicKey, MAX_BUNDLE_BYTES, MAX_BUNDLE_KEYS, TrustBundle,
};
pub use ca::{BACKDATE, CaError, valid_dns_name};
pub use csr::{CsrAndKey, MAX_CSR_BYTES, csr_der_from_pem};
pub use error::IssuerError;
pub use files::{read_private, write_atomic};
pub use id::{IdError, MAX_SPIFFE_ID_LEN, MAX_TRUST_DOMAIN_LEN, SpiffeId, TrustDomain};
pub use issuer::{
    BUNDLE_REFRESH_HINT, DEFAULT_JWT_TTL, DEFAULT_X509_TTL, Issuer, MAX_JWT_TTL, MAX_X509_TTL,
    RootInfo, RotationStatus,
};
pub use jwt::{JwtSvidClaims, JwtSvidError, MAX_JWT_BYTES, verify_jwt_svid};
pub use provider::{certified_key, client_config, crypto_provider, server_config};
pub use registry::{
    DEFAULT_TOKEN_TTL, JOIN_TOKEN_PREFIX, JoinToken, MAX_TOKEN_TTL, RegistrationEntry,
};
pub use store::RootState;
pub use svid::{JwtSvid, X509Svid};
pub use verify::{
    PeerAuthorizer, SpiffeClientVerifier, SpiffeServerVerifier, TimeSource, to_rustls,
};
pub use x509::{SvidError, Usage, peer_spiffe_id, verify_x509_svid};
