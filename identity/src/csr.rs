//! PKCS#10 CSRs: the workload side makes one (its key never leaves it), the issuer checks one.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, SubjectPublicKeyInfo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

use crate::error::IssuerError;
use crate::files::pem_encode;
use crate::id::SpiffeId;

/// Largest CSR accepted, in bytes (DER).
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// A fresh P-256 key pair and a CSR for it, optionally naming `id` in a URI SAN.
#[derive(Debug)]
pub struct CsrAndKey {
    /// The CSR, DER.
    pub csr_der: Vec<u8>,
    /// The private key, PKCS#8 DER; it stays with the workload.
    pub private_key: PrivateKeyDer<'static>,
}

impl CsrAndKey {
    /// Generates a key pair and its CSR.
    pub fn generate(id: Option<&SpiffeId>) -> Result<Self, IssuerError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(crate::ca::CaError::from)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(id) = id {
            let uri = rcgen::string::Ia5String::try_from(id.as_str()).map_err(|e| {
                IssuerError::BadCsr {
                    reason: e.to_string(),
                }
            })?;
            params.subject_alt_names = vec![SanType::URI(uri)];
        }
        let csr = params
            .serialize_request(&key)
            .map_err(crate::ca::CaError::from)?;
        Ok(Self {
            csr_der: csr.der().to_vec(),
            private_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }

    /// The CSR as PEM (`CERTIFICATE REQUEST`).
    pub fn csr_pem(&self) -> String {
        pem_encode("CERTIFICATE REQUEST", &self.csr_der)
    }
}

/// The DER of the first `CERTIFICATE REQUEST` block in `pem`.
pub fn csr_der_from_pem(pem: &str) -> Result<Vec<u8>, IssuerError> {
    if pem.len() > MAX_CSR_BYTES * 2 {
        return Err(IssuerError::BadCsr {
            reason: "CSR is too large".into(),
        });
    }
    CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map(|d| d.as_ref().to_vec())
        .map_err(|e| IssuerError::BadCsr {
            reason: format!("not a PEM `CERTIFICATE REQUEST`: {e}"),
        })
}

/// Checks a CSR for `expected`: parses, verifies its self-signature, requires an EC P-256
/// key, and allows at most one SAN, a URI equal to `expected`. Returns the public key.
pub(crate) fn check_csr(
    csr_der: &[u8],
    expected: &SpiffeId,
) -> Result<SubjectPublicKeyInfo, IssuerError> {
    let bad = |reason: &str| IssuerError::BadCsr {
        reason: reason.to_owned(),
    };
    if csr_der.len() > MAX_CSR_BYTES {
        return Err(bad("CSR is too large"));
    }
    let (rest, csr) = X509CertificationRequest::from_der(csr_der)
        .map_err(|_| bad("not a DER PKCS#10 request"))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the request"));
    }
    csr.verify_signature()
        .map_err(|_| bad("signature does not verify with the request's own key"))?;
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY
        || curve.as_ref() != Some(&OID_EC_P256)
    {
        return Err(bad("only EC P-256 keys are accepted"));
    }
    if let Some(extensions) = csr.requested_extensions() {
        for ext in extensions {
            let ParsedExtension::SubjectAlternativeName(san) = ext else {
                continue;
            };
            for name in &san.general_names {
                match name {
                    GeneralName::URI(uri) if *uri == expected.as_str() => {}
                    GeneralName::URI(uri) => {
                        return Err(IssuerError::CsrIdMismatch {
                            requested: (*uri).to_owned(),
                            expected: expected.to_string(),
                        });
                    }
                    _ => return Err(bad("a CSR may only request its SPIFFE ID as a URI SAN")),
                }
            }
        }
    }
    SubjectPublicKeyInfo::from_der(spki.raw).map_err(|e| IssuerError::BadCsr {
        reason: e.to_string(),
    })
}
