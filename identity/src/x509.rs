//! Reading and verifying X.509-SVIDs: the SPIFFE rules on the leaf (exactly one URI SAN,
//! `CA:false`, digitalSignature, no certificate signing) and the chain to the roots of the
//! leaf's own trust domain, at a given time.

use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::bundle::BundleSet;
use crate::files::unix_secs;
use crate::id::{IdError, SpiffeId};
use crate::provider::crypto_provider;

/// Why a certificate chain is not an acceptable X.509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// The peer presented no certificate.
    #[error("no certificate presented")]
    NoCertificate,
    /// The leaf certificate is not valid DER X.509.
    #[error("malformed certificate: {reason}")]
    Malformed {
        /// What the parser said.
        reason: String,
    },
    /// The leaf has no URI SAN, so it names no SPIFFE ID.
    #[error("certificate has no URI SAN (an X.509-SVID carries exactly one)")]
    NoUriSan,
    /// The leaf has more than one URI SAN.
    #[error("certificate has {count} URI SANs (an X.509-SVID carries exactly one)")]
    MultipleUriSans {
        /// How many URI SANs it has.
        count: usize,
    },
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(#[from] IdError),
    /// The URI SAN names a trust domain, not a workload.
    #[error("URI SAN `{id}` is a trust domain ID, not a workload ID")]
    TrustDomainIdInLeaf {
        /// The ID found.
        id: String,
    },
    /// The leaf says `CA:true`.
    #[error("leaf certificate is a CA (`CA:true`)")]
    CaLeaf,
    /// The leaf may sign certificates or CRLs.
    #[error("leaf certificate has key usage keyCertSign or cRLSign")]
    SigningLeaf,
    /// The leaf's key usage lacks digitalSignature.
    #[error("leaf certificate key usage lacks digitalSignature")]
    NoDigitalSignature,
    /// No trust bundle is held for the leaf's trust domain.
    #[error("no trust bundle for trust domain `{trust_domain}`")]
    UnknownTrustDomain {
        /// The leaf's trust domain.
        trust_domain: String,
    },
    /// The leaf's validity ended before the verification time.
    #[error("certificate expired")]
    Expired,
    /// The leaf's validity starts after the verification time.
    #[error("certificate is not valid yet")]
    NotYetValid,
    /// The chain does not lead to a root of the trust domain's bundle.
    #[error("certificate is not signed by a root of trust domain `{trust_domain}`")]
    UnknownIssuer {
        /// The leaf's trust domain.
        trust_domain: String,
    },
    /// Any other chain failure (bad signature, wrong EKU, name constraints, …).
    #[error("certificate chain rejected: {reason}")]
    Chain {
        /// What webpki said.
        reason: String,
    },
    /// The SPIFFE ID is valid but the authorizer does not accept it.
    #[error("SPIFFE ID `{id}` is not authorized here")]
    NotAuthorized {
        /// The refused ID.
        id: String,
    },
}

/// Which side of a TLS connection the leaf authenticates (selects the required EKU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// The leaf is a server's (serverAuth).
    Server,
    /// The leaf is a client's (clientAuth).
    Client,
}

/// The SPIFFE ID of a peer's leaf certificate (the first of `certs`), after checking the
/// SPIFFE leaf rules. Does not verify the chain: see [`verify_x509_svid`].
pub fn peer_spiffe_id(certs: &[CertificateDer<'_>]) -> Result<SpiffeId, SvidError> {
    let leaf = certs.first().ok_or(SvidError::NoCertificate)?;
    leaf_spiffe_id(leaf)
}

/// Parses a leaf and checks the X.509-SVID leaf rules; returns its SPIFFE ID.
pub(crate) fn leaf_spiffe_id(leaf: &[u8]) -> Result<SpiffeId, SvidError> {
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| SvidError::Malformed {
        reason: e.to_string(),
    })?;
    check_leaf(&cert)
}

fn check_leaf(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let malformed = |e: x509_parser::error::X509Error| SvidError::Malformed {
        reason: e.to_string(),
    };
    let uris: Vec<&str> = match cert.subject_alternative_name().map_err(malformed)? {
        Some(san) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };
    let uri = match uris.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [one] => *one,
        many => return Err(SvidError::MultipleUriSans { count: many.len() }),
    };
    let id: SpiffeId = uri.parse()?;
    if id.is_trust_domain_id() {
        return Err(SvidError::TrustDomainIdInLeaf { id: id.to_string() });
    }
    if let Some(bc) = cert.basic_constraints().map_err(malformed)?
        && bc.value.ca
    {
        return Err(SvidError::CaLeaf);
    }
    // The X.509-SVID standard requires key usage with digitalSignature on every leaf.
    let Some(ku) = cert.key_usage().map_err(malformed)? else {
        return Err(SvidError::NoDigitalSignature);
    };
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(SvidError::SigningLeaf);
    }
    if !ku.value.digital_signature() {
        return Err(SvidError::NoDigitalSignature);
    }
    Ok(id)
}

/// Verifies an X.509-SVID chain (leaf first) against the bundle of the leaf's own trust
/// domain in `bundles`, at `now`, for `usage`; returns the SPIFFE ID.
pub fn verify_x509_svid(
    chain: &[CertificateDer<'_>],
    bundles: &BundleSet,
    usage: Usage,
    now: SystemTime,
) -> Result<SpiffeId, SvidError> {
    let (leaf, intermediates) = chain.split_first().ok_or(SvidError::NoCertificate)?;
    let id = leaf_spiffe_id(leaf)?;
    let td = id.trust_domain();
    let bundle = bundles
        .get(td)
        .ok_or_else(|| SvidError::UnknownTrustDomain {
            trust_domain: td.to_string(),
        })?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| SvidError::Malformed {
        reason: format!("{e:?}"),
    })?;
    let key_usage = match usage {
        Usage::Server => webpki::KeyUsage::server_auth(),
        Usage::Client => webpki::KeyUsage::client_auth(),
    };
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(unix_secs(now)));
    ee.verify_for_usage(
        crypto_provider().signature_verification_algorithms.all,
        bundle.trust_anchors(),
        intermediates,
        time,
        key_usage,
        None,
        None,
    )
    .map_err(|e| map_webpki_error(e, td.as_str()))?;
    Ok(id)
}

fn map_webpki_error(e: webpki::Error, td: &str) -> SvidError {
    match e {
        webpki::Error::CertExpired { .. } => SvidError::Expired,
        webpki::Error::CertNotValidYet { .. } => SvidError::NotYetValid,
        // A root with the right name but another key (a rogue CA copying the subject) shows
        // up as a bad signature: either way no trusted root signed the chain.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            SvidError::UnknownIssuer {
                trust_domain: td.to_owned(),
            }
        }
        webpki::Error::CaUsedAsEndEntity => SvidError::CaLeaf,
        other => SvidError::Chain {
            reason: format!("{other:?}"),
        },
    }
}

/// A certificate's notAfter, for callers that hold only DER.
pub(crate) fn not_after(der: &[u8]) -> Result<SystemTime, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| SvidError::Malformed {
        reason: e.to_string(),
    })?;
    let ts = cert.validity().not_after.timestamp();
    Ok(crate::files::from_unix_secs(u64::try_from(ts).unwrap_or(0)))
}
