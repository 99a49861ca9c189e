//! Certificate construction, free of I/O: trust-domain roots and X.509-SVID leaves.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;

use crate::files::{offset_dt, random_bytes};
use crate::id::{SpiffeId, TrustDomain};

/// How long a root is valid.
pub(crate) const ROOT_TTL: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// How far notBefore is backdated, for clock skew between issuer and verifiers.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// Why certificate construction failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// rcgen refused the parameters or failed to sign.
    #[error("certificate construction failed: {0}")]
    Rcgen(String),
    /// A DNS name is not a valid IA5 string.
    #[error("DNS name `{0}` is not valid")]
    BadDnsName(String),
}

impl From<rcgen::Error> for CaError {
    fn from(e: rcgen::Error) -> Self {
        CaError::Rcgen(e.to_string())
    }
}

/// A random positive 128-bit serial (the top bit clear, the next set so the DER length is
/// fixed): 126 random bits, well over the 64 the X.509-SVID standard asks for.
pub(crate) fn random_serial() -> Vec<u8> {
    let mut serial = random_bytes::<16>();
    serial[0] = (serial[0] & 0x7f) | 0x40;
    serial.to_vec()
}

/// A new P-256 key pair.
pub(crate) fn generate_key() -> Result<KeyPair, CaError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

/// A self-signed root for `td`, generation `generation`, valid from `now` minus the backdate.
pub(crate) fn root_certificate(
    td: &TrustDomain,
    generation: u32,
    key: &KeyPair,
    now: SystemTime,
) -> Result<CertificateDer<'static>, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshgate");
    dn.push(
        DnType::CommonName,
        format!("meshgate root {td} #{generation}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let uri = rcgen::string::Ia5String::try_from(td.id_string())
        .map_err(|e| CaError::Rcgen(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    params.not_before = offset_dt(now.checked_sub(BACKDATE).unwrap_or(now));
    params.not_after = offset_dt(now + ROOT_TTL);
    Ok(params.self_signed(key)?.der().clone())
}

/// What goes into an X.509-SVID leaf.
pub(crate) struct LeafSpec<'a> {
    pub id: &'a SpiffeId,
    pub dns_names: &'a [String],
    pub ip_addrs: &'a [IpAddr],
    pub serial: &'a [u8],
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Signs an X.509-SVID leaf for `public_key` with the root (`issuer`).
pub(crate) fn sign_leaf(
    spec: &LeafSpec<'_>,
    public_key: &impl PublicKeyData,
    issuer: &rcgen::Issuer<'_, KeyPair>,
) -> Result<CertificateDer<'static>, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshgate");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let uri = rcgen::string::Ia5String::try_from(spec.id.as_str())
        .map_err(|e| CaError::Rcgen(e.to_string()))?;
    let mut sans = vec![SanType::URI(uri)];
    for name in spec.dns_names {
        let dns = rcgen::string::Ia5String::try_from(name.as_str())
            .map_err(|_| CaError::BadDnsName(name.clone()))?;
        sans.push(SanType::DnsName(dns));
    }
    sans.extend(spec.ip_addrs.iter().copied().map(SanType::IpAddress));
    params.subject_alt_names = sans;
    params.serial_number = Some(SerialNumber::from_slice(spec.serial));
    params.not_before = offset_dt(spec.not_before);
    params.not_after = offset_dt(spec.not_after);
    Ok(params.signed_by(public_key, issuer)?.der().clone())
}

/// Checks a DNS name for a SAN: 1–253 bytes, labels of 1–63 letters, digits, `-`, not
/// starting or ending with `-`; a leading `*.` wildcard is refused.
pub fn valid_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}
