//! Issued SVIDs: X.509-SVIDs (chain + optional private key) and JWT-SVIDs (token + expiry).

use std::fmt;
use std::time::SystemTime;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::files::pem_encode;
use crate::id::SpiffeId;
use crate::x509::{SvidError, leaf_spiffe_id, not_after};

/// An X.509-SVID: the certificate chain (leaf first) and, when this process generated the key
/// pair, the private key. SVIDs signed from a CSR carry no private key.
pub struct X509Svid {
    spiffe_id: SpiffeId,
    cert_chain: Vec<CertificateDer<'static>>,
    private_key: Option<PrivateKeyDer<'static>>,
    not_after: SystemTime,
}

impl X509Svid {
    /// Assembles an SVID; the SPIFFE ID and expiry are read from the leaf, which must follow
    /// the X.509-SVID leaf rules.
    pub fn from_parts(
        cert_chain: Vec<CertificateDer<'static>>,
        private_key: Option<PrivateKeyDer<'static>>,
    ) -> Result<Self, SvidError> {
        let leaf = cert_chain.first().ok_or(SvidError::NoCertificate)?;
        let spiffe_id = leaf_spiffe_id(leaf)?;
        let not_after = not_after(leaf)?;
        Ok(Self {
            spiffe_id,
            cert_chain,
            private_key,
            not_after,
        })
    }

    /// Reads an SVID from PEM: a chain (`svid.pem`) and optionally a PKCS#8 key (`key.pem`).
    pub fn from_pem(chain_pem: &[u8], key_pem: Option<&[u8]>) -> Result<Self, SvidError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SvidError::Malformed {
                reason: e.to_string(),
            })?;
        let key = key_pem
            .map(|k| {
                PrivatePkcs8KeyDer::from_pem_slice(k)
                    .map(PrivateKeyDer::Pkcs8)
                    .map_err(|e| SvidError::Malformed {
                        reason: format!("private key: {e}"),
                    })
            })
            .transpose()?;
        Self::from_parts(chain, key)
    }

    /// The SPIFFE ID in the leaf's URI SAN.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// The chain, leaf first.
    pub fn cert_chain(&self) -> &[CertificateDer<'static>] {
        &self.cert_chain
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        // `from_parts` refuses an empty chain, and the chain is never modified afterwards.
        &self.cert_chain[0]
    }

    /// The private key, when this SVID carries one.
    pub fn private_key(&self) -> Option<&PrivateKeyDer<'static>> {
        self.private_key.as_ref()
    }

    /// The leaf's notAfter.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The chain as PEM (`svid.pem`): leaf first, then any intermediates.
    pub fn cert_chain_pem(&self) -> String {
        self.cert_chain
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c))
            .collect()
    }

    /// The private key as PKCS#8 PEM (`key.pem`), when carried.
    pub fn private_key_pem(&self) -> Option<String> {
        self.private_key
            .as_ref()
            .map(|k| pem_encode("PRIVATE KEY", k.secret_der()))
    }
}

impl Clone for X509Svid {
    fn clone(&self) -> Self {
        Self {
            spiffe_id: self.spiffe_id.clone(),
            cert_chain: self.cert_chain.clone(),
            private_key: self.private_key.as_ref().map(PrivateKeyDer::clone_key),
            not_after: self.not_after,
        }
    }
}

impl fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("chain_len", &self.cert_chain.len())
            .field(
                "private_key",
                &self.private_key.as_ref().map(|_| "<redacted>"),
            )
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// A minted JWT-SVID.
#[derive(Clone)]
pub struct JwtSvid {
    /// The compact JWS (`header.payload.signature`).
    pub token: String,
    /// `sub`.
    pub spiffe_id: SpiffeId,
    /// `aud`.
    pub audience: Vec<String>,
    /// `exp`.
    pub expiry: SystemTime,
}

impl fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSvid")
            .field("token", &"<redacted>")
            .field("spiffe_id", &self.spiffe_id)
            .field("audience", &self.audience)
            .field("expiry", &self.expiry)
            .finish()
    }
}
