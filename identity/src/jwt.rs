//! JWT-SVIDs per the SPIFFE JWT-SVID standard: ES256 only, `kid` in the header, `sub` = the
//! SPIFFE ID, `aud` required and non-empty, `exp` required, `iat`.

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::bundle::BundleSet;
use crate::files::{from_unix_secs, unix_secs};
use crate::id::SpiffeId;
use crate::svid::JwtSvid;

/// Longest token accepted, in bytes.
pub const MAX_JWT_BYTES: usize = 8 * 1024;

/// Why a JWT-SVID was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtSvidError {
    /// Longer than [`MAX_JWT_BYTES`].
    #[error("token is {len} bytes, the limit is 8 KiB")]
    TooLarge {
        /// Its size.
        len: usize,
    },
    /// Not three base64url parts of JSON.
    #[error("token is not a compact JWS: {reason}")]
    Malformed {
        /// What is wrong.
        reason: String,
    },
    /// `alg` is not ES256 (this includes `none` and every HMAC).
    #[error("algorithm `{alg}` is not accepted (only ES256)")]
    UnsupportedAlgorithm {
        /// The header's `alg`.
        alg: String,
    },
    /// The header has no `kid`.
    #[error("token header has no `kid`")]
    MissingKid,
    /// A required claim is missing or has the wrong type.
    #[error("claim `{claim}` is missing or malformed")]
    BadClaim {
        /// The claim.
        claim: &'static str,
    },
    /// `sub` is not a SPIFFE ID.
    #[error("`sub` is not a valid SPIFFE ID: {reason}")]
    BadSubject {
        /// Why.
        reason: String,
    },
    /// No bundle is held for the subject's trust domain.
    #[error("no trust bundle for trust domain `{trust_domain}`")]
    UnknownTrustDomain {
        /// The subject's trust domain.
        trust_domain: String,
    },
    /// The trust domain's bundle has no key with this `kid`.
    #[error("no JWT key `{kid}` in the bundle of `{trust_domain}`")]
    UnknownKeyId {
        /// The header's `kid`.
        kid: String,
        /// The subject's trust domain.
        trust_domain: String,
    },
    /// The signature does not verify with the bundle's key.
    #[error("signature does not verify")]
    BadSignature,
    /// `exp` plus leeway is in the past.
    #[error("token expired")]
    Expired,
    /// `iat` minus leeway is in the future.
    #[error("token issued in the future")]
    IssuedInFuture,
    /// `aud` does not contain the expected audience.
    #[error("audience `{expected}` is not in the token's `aud`")]
    WrongAudience {
        /// The audience this verifier expects.
        expected: String,
    },
    /// Minting failed (signing error or bad input).
    #[error("cannot mint JWT-SVID: {reason}")]
    Mint {
        /// Why.
        reason: String,
    },
}

/// The verified claims of a JWT-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSvidClaims {
    /// `sub`: the caller.
    pub sub: SpiffeId,
    /// `aud`.
    pub aud: Vec<String>,
    /// `exp`.
    pub exp: SystemTime,
    /// `iat`.
    pub iat: SystemTime,
    /// `amr` (RFC 8176): how the subject authenticated to the issuer's gateway, e.g.
    /// `["x509"]` for mTLS with an X.509-SVID, `["jwt"]` for a bearer JWT-SVID. Empty when
    /// the token carries none (treat as "unknown", never as mTLS).
    pub amr: Vec<String>,
}

#[derive(Serialize)]
struct OutClaims<'a> {
    sub: &'a str,
    aud: &'a [String],
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    amr: &'a [String],
}

#[derive(Deserialize)]
struct InClaims {
    sub: Option<String>,
    aud: Option<Value>,
    exp: Option<u64>,
    iat: Option<u64>,
    #[serde(default)]
    amr: Option<Value>,
}

/// Signs a JWT-SVID with an ES256 key (PKCS#8 DER) whose key ID is `kid`.
pub(crate) fn mint(
    key: &EncodingKey,
    kid: &str,
    id: &SpiffeId,
    audience: &[String],
    amr: &[String],
    ttl: Duration,
    now: SystemTime,
) -> Result<JwtSvid, JwtSvidError> {
    if audience.is_empty() || audience.iter().any(String::is_empty) {
        return Err(JwtSvidError::Mint {
            reason: "`aud` must hold at least one non-empty audience".into(),
        });
    }
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    header.typ = Some("JWT".into());
    let iat = unix_secs(now);
    let exp = iat.saturating_add(ttl.as_secs().max(1));
    let claims = OutClaims {
        sub: id.as_str(),
        aud: audience,
        exp,
        iat,
        amr,
    };
    let token = jsonwebtoken::encode(&header, &claims, key).map_err(|e| JwtSvidError::Mint {
        reason: e.to_string(),
    })?;
    Ok(JwtSvid {
        token,
        spiffe_id: id.clone(),
        audience: audience.to_vec(),
        expiry: from_unix_secs(exp),
    })
}

fn b64_json(part: &str, what: &str) -> Result<Value, JwtSvidError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtSvidError::Malformed {
            reason: format!("{what} is not base64url"),
        })?;
    serde_json::from_slice(&bytes).map_err(|_| JwtSvidError::Malformed {
        reason: format!("{what} is not JSON"),
    })
}

/// Verifies a JWT-SVID against the bundle of its subject's trust domain: ES256 only, `kid`
/// must be in that bundle, `aud` must contain `expected_audience`, `exp`/`iat` checked at
/// `now` with `leeway`.
pub fn verify_jwt_svid(
    token: &str,
    bundles: &BundleSet,
    expected_audience: &str,
    now: SystemTime,
    leeway: Duration,
) -> Result<JwtSvidClaims, JwtSvidError> {
    if token.len() > MAX_JWT_BYTES {
        return Err(JwtSvidError::TooLarge { len: token.len() });
    }
    let parts: Vec<&str> = token.split('.').collect();
    let [header, payload, _sig] = parts.as_slice() else {
        return Err(JwtSvidError::Malformed {
            reason: format!("{} parts, expected 3", parts.len()),
        });
    };
    let header = b64_json(header, "header")?;
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if alg != "ES256" {
        return Err(JwtSvidError::UnsupportedAlgorithm {
            alg: alg.to_owned(),
        });
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(JwtSvidError::MissingKid)?;
    // Read `sub` before the signature only to choose the trust domain's keys.
    let unverified: InClaims =
        serde_json::from_value(b64_json(payload, "payload")?).map_err(|_| {
            JwtSvidError::Malformed {
                reason: "payload is not a claims object".into(),
            }
        })?;
    let sub = unverified
        .sub
        .ok_or(JwtSvidError::BadClaim { claim: "sub" })?;
    let sub: SpiffeId = sub
        .parse()
        .map_err(|e: crate::id::IdError| JwtSvidError::BadSubject {
            reason: e.to_string(),
        })?;
    let td = sub.trust_domain();
    let bundle = bundles
        .get(td)
        .ok_or_else(|| JwtSvidError::UnknownTrustDomain {
            trust_domain: td.to_string(),
        })?;
    let key = bundle
        .jwt_key(kid)
        .ok_or_else(|| JwtSvidError::UnknownKeyId {
            kid: kid.to_owned(),
            trust_domain: td.to_string(),
        })?;

    let mut validation = Validation::new(Algorithm::ES256);
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.validate_nbf = false;
    validation.required_spec_claims.clear();
    let data = jsonwebtoken::decode::<InClaims>(
        token,
        &DecodingKey::from_ec_der(key.point()),
        &validation,
    )
    .map_err(|_| JwtSvidError::BadSignature)?;
    let claims = data.claims;
    // The verified payload is the one read above (same bytes), so `sub` is unchanged.
    let exp = claims.exp.ok_or(JwtSvidError::BadClaim { claim: "exp" })?;
    let iat = claims.iat.ok_or(JwtSvidError::BadClaim { claim: "iat" })?;
    let aud: Vec<String> = match claims.aud {
        Some(Value::String(a)) => vec![a],
        Some(Value::Array(list)) => list
            .into_iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or(JwtSvidError::BadClaim { claim: "aud" })
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(JwtSvidError::BadClaim { claim: "aud" }),
    };
    if aud.is_empty() {
        return Err(JwtSvidError::BadClaim { claim: "aud" });
    }
    let now_s = unix_secs(now);
    let leeway = leeway.as_secs();
    if exp.saturating_add(leeway) <= now_s {
        return Err(JwtSvidError::Expired);
    }
    if iat > now_s.saturating_add(leeway) {
        return Err(JwtSvidError::IssuedInFuture);
    }
    if !aud.iter().any(|a| a == expected_audience) {
        return Err(JwtSvidError::WrongAudience {
            expected: expected_audience.to_owned(),
        });
    }
    // `amr` is optional; when present it must be an array of strings.
    let amr = match claims.amr {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(values)) => values
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(JwtSvidError::BadClaim { claim: "amr" }),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(JwtSvidError::BadClaim { claim: "amr" }),
    };
    Ok(JwtSvidClaims {
        sub,
        aud,
        exp: from_unix_secs(exp),
        iat: from_unix_secs(iat),
        amr,
    })
}
