//! Trust bundles in the SPIFFE trust bundle format (a JWKS: `use` = `x509-svid` keys carry
//! one root in `x5c`, `use` = `jwt-svid` keys carry a `kid` and an EC P-256 public key), plus
//! PEM export of the X.509 roots.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, TrustAnchor};
use serde_json::{Map, Value, json};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use crate::files::{pem_encode, sha256};
use crate::id::TrustDomain;

mod set;
pub use set::BundleSet;

/// Largest bundle document accepted, in bytes.
pub const MAX_BUNDLE_BYTES: usize = 1024 * 1024;
/// Most keys accepted in one bundle.
pub const MAX_BUNDLE_KEYS: usize = 256;

/// Why a trust bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The document is larger than [`MAX_BUNDLE_BYTES`].
    #[error("bundle is {len} bytes, the limit is 1 MiB")]
    TooLarge {
        /// Its size in bytes.
        len: usize,
    },
    /// The document is not the JSON shape of a SPIFFE bundle.
    #[error("bundle is not a SPIFFE bundle JSON document: {reason}")]
    Json {
        /// What is wrong.
        reason: String,
    },
    /// More keys than [`MAX_BUNDLE_KEYS`].
    #[error("bundle has {count} keys, the limit is 256")]
    TooManyKeys {
        /// How many keys.
        count: usize,
    },
    /// A key's `use` is missing or not `x509-svid` / `jwt-svid`.
    #[error("key {index}: `use` is `{found}`, expected `x509-svid` or `jwt-svid`")]
    UnknownUse {
        /// Position of the key in `keys`.
        index: usize,
        /// The `use` found (empty when missing).
        found: String,
    },
    /// An `x509-svid` key does not carry exactly one certificate in `x5c`.
    #[error("key {index}: `x5c` must hold exactly one certificate, found {count}")]
    X5cCount {
        /// Position of the key in `keys`.
        index: usize,
        /// Certificates found.
        count: usize,
    },
    /// A field is not valid base64.
    #[error("key {index}: `{field}` is not valid base64")]
    Base64 {
        /// Position of the key in `keys`.
        index: usize,
        /// The field.
        field: &'static str,
    },
    /// A root certificate cannot be used as a trust anchor.
    #[error("key {index}: root certificate is malformed: {reason}")]
    Certificate {
        /// Position of the key (or PEM block) in the bundle.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A `jwt-svid` key has no `kid`.
    #[error("key {index}: a `jwt-svid` key needs a `kid`")]
    MissingKid {
        /// Position of the key in `keys`.
        index: usize,
    },
    /// Two `jwt-svid` keys share a `kid`.
    #[error("duplicate `kid` `{kid}`")]
    DuplicateKid {
        /// The repeated key ID.
        kid: String,
    },
    /// A `jwt-svid` key is not an EC P-256 key with 32-byte `x` and `y`.
    #[error("key {index}: only EC P-256 JWT keys (`kty` `EC`, `crv` `P-256`) are accepted")]
    UnsupportedJwtKey {
        /// Position of the key in `keys`.
        index: usize,
    },
    /// A PEM bundle holds no certificate or an unreadable block.
    #[error("PEM bundle is malformed: {reason}")]
    Pem {
        /// What is wrong.
        reason: String,
    },
}

/// A JWT-SVID verification key: an uncompressed SEC1 P-256 point (`04 || x || y`).
#[derive(Clone, PartialEq, Eq)]
pub struct JwtPublicKey {
    point: Vec<u8>,
}

impl JwtPublicKey {
    /// Wraps an uncompressed P-256 point; `None` unless it is 65 bytes starting with `04`.
    pub fn from_point(point: &[u8]) -> Option<Self> {
        (point.len() == 65 && point.first() == Some(&4)).then(|| Self {
            point: point.to_vec(),
        })
    }

    /// The uncompressed point.
    pub fn point(&self) -> &[u8] {
        &self.point
    }

    /// The stable key ID: base64url of the SHA-256 of the point, first 32 characters.
    pub fn kid(&self) -> String {
        let mut kid = URL_SAFE_NO_PAD.encode(sha256(&self.point));
        kid.truncate(32);
        kid
    }
}

impl std::fmt::Debug for JwtPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtPublicKey({})", self.kid())
    }
}

/// The trust anchors of one trust domain: X.509 roots and JWT keys, with the bundle's
/// sequence number and refresh hint.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    x509_roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    jwt_keys: BTreeMap<String, JwtPublicKey>,
    sequence: u64,
    refresh_hint: Option<Duration>,
}

impl TrustBundle {
    /// Builds a bundle, checking every root can serve as a trust anchor.
    pub fn new(
        trust_domain: TrustDomain,
        x509_roots: Vec<CertificateDer<'static>>,
        jwt_keys: impl IntoIterator<Item = (String, JwtPublicKey)>,
        sequence: u64,
        refresh_hint: Option<Duration>,
    ) -> Result<Self, BundleError> {
        let anchors = x509_roots
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| BundleError::Certificate {
                        index,
                        reason: format!("{e:?}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut keys = BTreeMap::new();
        for (kid, key) in jwt_keys {
            if keys.insert(kid.clone(), key).is_some() {
                return Err(BundleError::DuplicateKid { kid });
            }
        }
        Ok(Self {
            trust_domain,
            x509_roots,
            anchors,
            jwt_keys: keys,
            sequence,
            refresh_hint,
        })
    }

    /// A bundle that trusts nothing.
    pub fn empty(trust_domain: TrustDomain, sequence: u64) -> Self {
        Self {
            trust_domain,
            x509_roots: Vec::new(),
            anchors: Vec::new(),
            jwt_keys: BTreeMap::new(),
            sequence,
            refresh_hint: None,
        }
    }

    /// The trust domain these anchors are for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The X.509 roots, DER.
    pub fn x509_roots(&self) -> &[CertificateDer<'static>] {
        &self.x509_roots
    }

    /// The roots as webpki trust anchors.
    pub fn trust_anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// The JWT-SVID keys by `kid`.
    pub fn jwt_keys(&self) -> &BTreeMap<String, JwtPublicKey> {
        &self.jwt_keys
    }

    /// The JWT-SVID key with this `kid`.
    pub fn jwt_key(&self, kid: &str) -> Option<&JwtPublicKey> {
        self.jwt_keys.get(kid)
    }

    /// `spiffe_sequence`: grows whenever the content changes.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// `spiffe_refresh_hint`: how often a peer should refetch.
    pub fn refresh_hint(&self) -> Option<Duration> {
        self.refresh_hint
    }

    /// The X.509 roots as concatenated PEM `CERTIFICATE` blocks (`bundle.pem`).
    pub fn to_pem(&self) -> String {
        self.x509_roots
            .iter()
            .map(|c| pem_encode("CERTIFICATE", c))
            .collect()
    }

    /// Reads roots from PEM (`bundle.pem`); the trust domain is not in PEM, so it is given.
    pub fn from_pem(pem: &[u8], trust_domain: TrustDomain) -> Result<Self, BundleError> {
        if pem.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge { len: pem.len() });
        }
        let roots = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BundleError::Pem {
                reason: e.to_string(),
            })?;
        if roots.is_empty() {
            return Err(BundleError::Pem {
                reason: "no `CERTIFICATE` block found".into(),
            });
        }
        Self::new(trust_domain, roots, [], 0, None)
    }

    /// Reads roots from PEM, taking the trust domain from the roots' URI SAN (`spiffe://td`,
    /// which meshgate roots carry); every root must name the same one.
    pub fn from_pem_infer(pem: &[u8]) -> Result<Self, BundleError> {
        let probe = Self::from_pem(pem, TrustDomain::placeholder())?;
        let mut found: Option<TrustDomain> = None;
        for (index, root) in probe.x509_roots.iter().enumerate() {
            let td = root_trust_domain(root).ok_or_else(|| BundleError::Certificate {
                index,
                reason: "root names no trust domain (URI SAN `spiffe://<td>`)".into(),
            })?;
            if found.as_ref().is_some_and(|f| f != &td) {
                return Err(BundleError::Pem {
                    reason: "roots of several trust domains in one file".into(),
                });
            }
            found = Some(td);
        }
        let td = found.ok_or_else(|| BundleError::Pem {
            reason: "no `CERTIFICATE` block found".into(),
        })?;
        Ok(Self {
            trust_domain: td,
            ..probe
        })
    }

    /// The SPIFFE bundle JSON document.
    pub fn to_spiffe_json(&self) -> String {
        let mut keys = Vec::with_capacity(self.x509_roots.len() + self.jwt_keys.len());
        for root in &self.x509_roots {
            let mut key = root_jwk_params(root);
            key.insert("use".into(), json!("x509-svid"));
            key.insert("x5c".into(), json!([STANDARD.encode(root)]));
            keys.push(Value::Object(key));
        }
        for (kid, key) in &self.jwt_keys {
            let (x, y) = key.point[1..].split_at(32);
            keys.push(json!({
                "use": "jwt-svid", "kty": "EC", "crv": "P-256", "kid": kid,
                "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
            }));
        }
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        doc.insert("spiffe_sequence".into(), json!(self.sequence));
        if let Some(hint) = self.refresh_hint {
            doc.insert("spiffe_refresh_hint".into(), json!(hint.as_secs()));
        }
        // Serializing a `Value` cannot fail; an empty object is the safe fallback anyway.
        serde_json::to_string_pretty(&Value::Object(doc)).unwrap_or_else(|_| "{}".into())
    }

    /// Parses a SPIFFE bundle JSON document for `expected` (the format does not name the
    /// trust domain: the caller knows whose bundle it fetched).
    pub fn from_spiffe_json(text: &str, expected: &TrustDomain) -> Result<Self, BundleError> {
        if text.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge { len: text.len() });
        }
        let json_err = |reason: &str| BundleError::Json {
            reason: reason.to_owned(),
        };
        let doc: Value = serde_json::from_str(text).map_err(|e| BundleError::Json {
            reason: e.to_string(),
        })?;
        let doc = doc
            .as_object()
            .ok_or_else(|| json_err("the document is not an object"))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| json_err("`keys` array missing"))?;
        if keys.len() > MAX_BUNDLE_KEYS {
            return Err(BundleError::TooManyKeys { count: keys.len() });
        }
        let sequence = match doc.get("spiffe_sequence") {
            None => 0,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| json_err("`spiffe_sequence` is not a non-negative integer"))?,
        };
        let refresh_hint = match doc.get("spiffe_refresh_hint") {
            None => None,
            Some(v) => Some(Duration::from_secs(v.as_u64().ok_or_else(|| {
                json_err("`spiffe_refresh_hint` is not a non-negative integer")
            })?)),
        };
        let mut roots = Vec::new();
        let mut jwt_keys = Vec::new();
        for (index, key) in keys.iter().enumerate() {
            let key = key
                .as_object()
                .ok_or_else(|| json_err("a key is not an object"))?;
            match key.get("use").and_then(Value::as_str) {
                Some("x509-svid") => roots.push(parse_x509_key(index, key)?),
                Some("jwt-svid") => jwt_keys.push(parse_jwt_key(index, key)?),
                other => {
                    return Err(BundleError::UnknownUse {
                        index,
                        found: other.unwrap_or_default().to_owned(),
                    });
                }
            }
        }
        Self::new(expected.clone(), roots, jwt_keys, sequence, refresh_hint)
    }
}

fn parse_x509_key(
    index: usize,
    key: &Map<String, Value>,
) -> Result<CertificateDer<'static>, BundleError> {
    let x5c = key
        .get("x5c")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let [cert] = x5c else {
        return Err(BundleError::X5cCount {
            index,
            count: x5c.len(),
        });
    };
    let b64 = cert.as_str().ok_or(BundleError::Base64 {
        index,
        field: "x5c",
    })?;
    let der = STANDARD.decode(b64).map_err(|_| BundleError::Base64 {
        index,
        field: "x5c",
    })?;
    X509Certificate::from_der(&der).map_err(|e| BundleError::Certificate {
        index,
        reason: e.to_string(),
    })?;
    Ok(CertificateDer::from(der))
}

fn parse_jwt_key(
    index: usize,
    key: &Map<String, Value>,
) -> Result<(String, JwtPublicKey), BundleError> {
    let kid = key
        .get("kid")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty())
        .ok_or(BundleError::MissingKid { index })?;
    let field = |name: &'static str| -> Result<Vec<u8>, BundleError> {
        let text = key
            .get(name)
            .and_then(Value::as_str)
            .ok_or(BundleError::UnsupportedJwtKey { index })?;
        URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| BundleError::Base64 { index, field: name })
    };
    if key.get("kty").and_then(Value::as_str) != Some("EC")
        || key.get("crv").and_then(Value::as_str) != Some("P-256")
    {
        return Err(BundleError::UnsupportedJwtKey { index });
    }
    let (x, y) = (field("x")?, field("y")?);
    if x.len() != 32 || y.len() != 32 {
        return Err(BundleError::UnsupportedJwtKey { index });
    }
    let mut point = Vec::with_capacity(65);
    point.push(4);
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    let key = JwtPublicKey::from_point(&point).ok_or(BundleError::UnsupportedJwtKey { index })?;
    Ok((kid.to_owned(), key))
}

fn root_trust_domain(der: &[u8]) -> Option<TrustDomain> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => u
            .parse::<crate::id::SpiffeId>()
            .ok()
            .filter(|id| id.is_trust_domain_id())
            .map(|id| id.trust_domain().clone()),
        _ => None,
    })
}

/// JWK public parameters (`kty`, `crv`/`x`/`y` or `n`/`e`) of a root certificate's key.
fn root_jwk_params(der: &[u8]) -> Map<String, Value> {
    let mut out = Map::new();
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return out;
    };
    match cert.public_key().parsed() {
        Ok(PublicKey::EC(point)) => {
            let data = point.data();
            let (crv, len) = match data.len() {
                65 => ("P-256", 32),
                97 => ("P-384", 48),
                133 => ("P-521", 66),
                _ => return out,
            };
            let (x, y) = data[1..].split_at(len);
            out.insert("kty".into(), json!("EC"));
            out.insert("crv".into(), json!(crv));
            out.insert("x".into(), json!(URL_SAFE_NO_PAD.encode(x)));
            out.insert("y".into(), json!(URL_SAFE_NO_PAD.encode(y)));
        }
        Ok(PublicKey::RSA(rsa)) => {
            let trim = |b: &[u8]| {
                b.iter()
                    .position(|&v| v != 0)
                    .map_or(Vec::new(), |i| b[i..].to_vec())
            };
            out.insert("kty".into(), json!("RSA"));
            out.insert("n".into(), json!(URL_SAFE_NO_PAD.encode(trim(rsa.modulus))));
            out.insert(
                "e".into(),
                json!(URL_SAFE_NO_PAD.encode(trim(rsa.exponent))),
            );
        }
        _ => {}
    }
    out
}
