//! The issuer's HTTPS API (hyper 1 over tokio-rustls) and its client.
//!
//! | method and path    | auth                    | body in               | body out          |
//! |--------------------|-------------------------|-----------------------|-------------------|
//! | `POST /v1/attest`  | none (the join token)   | [`AttestRequest`]     | [`SvidResponse`]  |
//! | `POST /v1/renew`   | mTLS, current SVID      | [`RenewRequest`]      | [`SvidResponse`]  |
//! | `POST /v1/jwt`     | mTLS, current SVID      | [`JwtRequest`]        | [`JwtResponse`]   |
//! | `GET /v1/bundle`   | none                    | —                     | SPIFFE bundle JSON |
//!
//! Errors answer `{"error": "…"}` with 400 (malformed), 401 (no client certificate),
//! 403 (refused token or entry), 404, 405, 413 or 500.

pub mod agent;
pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

/// Largest request body the server reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Largest response body the client reads.
pub const MAX_RESPONSE_BYTES: usize = 2 * 1024 * 1024;

/// `POST /v1/attest`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestRequest {
    /// The one-time join token.
    pub token: String,
    /// A PKCS#10 CSR, PEM.
    pub csr: String,
}

/// `POST /v1/renew`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// A PKCS#10 CSR, PEM (a new key is recommended).
    pub csr: String,
}

/// `POST /v1/jwt`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtRequest {
    /// `aud` of the JWT-SVID, at least one.
    pub audience: Vec<String>,
    /// Lifetime in seconds (default 300, at most 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// An issued X.509-SVID with the trust domain's bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SvidResponse {
    /// The SPIFFE ID issued.
    pub spiffe_id: String,
    /// The chain, PEM, leaf first.
    pub svid: String,
    /// The X.509 roots, PEM.
    pub bundle: String,
    /// The SPIFFE bundle JSON document.
    pub spiffe_bundle: serde_json::Value,
    /// notAfter, unix seconds.
    pub expires_at: u64,
}

/// A minted JWT-SVID.
#[derive(Clone, Serialize, Deserialize)]
pub struct JwtResponse {
    /// The token.
    pub token: String,
    /// `sub`.
    pub spiffe_id: String,
    /// `exp`, unix seconds.
    pub expires_at: u64,
}

impl std::fmt::Debug for JwtResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtResponse")
            .field("spiffe_id", &self.spiffe_id)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// An error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// What went wrong, one line.
    pub error: String,
}
