//! The caller's identity across the tunnel: JWT-SVIDs minted by the source gateway and
//! verified by the destination gateway, both cached so the hot path signs and verifies
//! ECDSA only when a cached result has run out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshgate_identity::{BundleSet, Issuer, SpiffeId, TrustBundle, TrustDomain, verify_jwt_svid};

/// Cached entries per cache before expired ones are swept.
const MAX_ENTRIES: usize = 50_000;

/// The tunnel header that carries the caller's JWT-SVID between gateways. Like every
/// `x-meshgate-*` header, a workload cannot send it: the source gateway strips those.
pub const CALLER_TOKEN_HEADER: &str = "x-meshgate-caller-svid";

/// The JWT-SVID audience for calls to a service (CONTRACTS.md).
pub fn audience(destination_td: &TrustDomain, namespace: &str, service: &str) -> String {
    format!("spiffe://{destination_td}/ns/{namespace}/svc/{service}")
}

/// The `amr` value for how a caller authenticated to its gateway.
fn amr(mtls: bool) -> &'static str {
    if mtls { AMR_MTLS } else { "jwt" }
}

/// `amr` of a caller that authenticated with its X.509-SVID over mTLS.
pub const AMR_MTLS: &str = "x509";

/// A verified caller: who, and whether it used mTLS at its own gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCaller {
    /// The caller's SPIFFE ID.
    pub id: SpiffeId,
    /// Whether the caller authenticated with an X.509-SVID (mTLS) at the source gateway.
    pub mtls: bool,
}

/// (caller, audience, mTLS) → a minted token.
type MintKey = (SpiffeId, String, bool);

/// Source side: mints a caller's JWT-SVID per (caller, audience) and reuses it until it is
/// within `refresh_margin` of expiry.
#[derive(Debug)]
pub struct CallerTokens {
    issuer: Arc<Issuer>,
    ttl: Duration,
    refresh_margin: Duration,
    cache: Mutex<HashMap<MintKey, (String, SystemTime)>>,
}

impl CallerTokens {
    /// Tokens live `ttl` and are replaced a quarter of `ttl` before they expire.
    pub fn new(issuer: Arc<Issuer>, ttl: Duration) -> Self {
        Self {
            issuer,
            ttl,
            refresh_margin: ttl / 4,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// A JWT-SVID for `caller` with audience `aud`, valid at `now`; `mtls` says whether the
    /// caller authenticated with its X.509-SVID (carried signed, as `amr`).
    pub fn token(
        &self,
        caller: &SpiffeId,
        aud: &str,
        mtls: bool,
        now: SystemTime,
    ) -> Result<String, String> {
        let key = (caller.clone(), aud.to_owned(), mtls);
        if let Ok(cache) = self.cache.lock()
            && let Some((token, exp)) = cache.get(&key)
            && now + self.refresh_margin < *exp
        {
            return Ok(token.clone());
        }
        let jwt = self
            .issuer
            .mint_jwt_svid_amr(
                caller,
                &[aud.to_owned()],
                &[amr(mtls).to_owned()],
                self.ttl,
                now,
            )
            .map_err(|e| e.to_string())?;
        let (token, exp) = (jwt.token, jwt.expiry);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= MAX_ENTRIES {
                cache.retain(|_, (_, e)| now < *e);
                if cache.len() >= MAX_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(key, (token.clone(), exp));
        }
        Ok(token)
    }
}

/// Why a caller token was refused at the destination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallerError {
    /// The peer gateway sent no caller token.
    #[error("no caller identity token from the peer gateway")]
    Missing,
    /// The JWT-SVID failed verification.
    #[error("caller token rejected: {0}")]
    Invalid(String),
    /// The token's trust domain differs from the peer gateway's.
    #[error("gateway of `{peer}` may not speak for a caller in `{caller}`")]
    WrongTrustDomain {
        /// The peer gateway's trust domain.
        peer: TrustDomain,
        /// The caller's trust domain.
        caller: TrustDomain,
    },
}

#[derive(Debug, Clone)]
struct Verified {
    caller: SpiffeId,
    mtls: bool,
    exp: SystemTime,
    bundle: Arc<TrustBundle>,
}

/// Destination side: verifies caller JWT-SVIDs, caching a verified token until its expiry or
/// until its trust domain's bundle changes (a rotated or removed bundle re-verifies at once).
#[derive(Debug)]
pub struct VerifiedCallers {
    bundles: BundleSet,
    leeway: Duration,
    cache: Mutex<HashMap<[u8; 32], Verified>>,
}

impl VerifiedCallers {
    /// A verifier over `bundles` with clock-skew `leeway`.
    pub fn new(bundles: BundleSet, leeway: Duration) -> Self {
        Self {
            bundles,
            leeway,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Verifies `token` for audience `aud`, sent by the gateway of `peer_td`.
    pub fn verify(
        &self,
        peer_td: &TrustDomain,
        token: Option<&str>,
        aud: &str,
        now: SystemTime,
    ) -> Result<VerifiedCaller, CallerError> {
        let token = token.ok_or(CallerError::Missing)?;
        // Keyed by a digest: entry size stays fixed whatever the token length.
        let key = cache_key(token, aud);
        if let Ok(cache) = self.cache.lock()
            && let Some(v) = cache.get(&key)
            && now < v.exp
            && self
                .bundles
                .get(v.caller.trust_domain())
                .is_some_and(|b| Arc::ptr_eq(&b, &v.bundle))
        {
            let id = check_domain(peer_td, v.caller.clone())?;
            return Ok(VerifiedCaller { id, mtls: v.mtls });
        }
        let claims = verify_jwt_svid(token, &self.bundles, aud, now, self.leeway)
            .map_err(|e| CallerError::Invalid(e.to_string()))?;
        let caller = check_domain(peer_td, claims.sub.clone())?;
        let mtls = claims.amr.iter().any(|m| m == AMR_MTLS);
        if let Some(bundle) = self.bundles.get(caller.trust_domain())
            && let Ok(mut cache) = self.cache.lock()
        {
            if cache.len() >= MAX_ENTRIES {
                cache.retain(|_, v| now < v.exp);
                if cache.len() >= MAX_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(
                key,
                Verified {
                    caller: caller.clone(),
                    mtls,
                    exp: claims.exp,
                    bundle,
                },
            );
        }
        Ok(VerifiedCaller { id: caller, mtls })
    }
}

fn cache_key(token: &str, aud: &str) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(aud.as_bytes());
    ctx.update(b"\0");
    ctx.update(token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn check_domain(peer_td: &TrustDomain, caller: SpiffeId) -> Result<SpiffeId, CallerError> {
    if caller.trust_domain() != peer_td {
        return Err(CallerError::WrongTrustDomain {
            peer: peer_td.clone(),
            caller: caller.trust_domain().clone(),
        });
    }
    Ok(caller)
}
