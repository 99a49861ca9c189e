//! The caller's identity across the tunnel.
//!
//! The source gateway vouches for a caller with a JWT-SVID it mints (`sub` the caller, `aud`
//! the destination service, `amr` how the caller authenticated to it), which the destination
//! verifies against the source trust domain's JWT keys. A token is sent once per QUIC
//! connection: the first requests carry it in `x-meshgate-caller-svid` together with a
//! reference number the source picked in `x-meshgate-caller-ref`; the destination verifies
//! the token, binds the number to it *on that connection only*, and says so by echoing the
//! number in its response. From then on the source sends the number alone. A number means
//! nothing on another connection (each side keeps its table per connection), so it cannot be
//! replayed to another gateway or after a reconnect; the destination checks the bound
//! token's audience and expiry on every use and re-verifies it when the source's bundle
//! changes. A number the destination does not hold (it never confirmed it, or dropped it) is
//! refused with `x-meshgate-caller-ref: unknown`, and the source sends the token again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshgate_identity::{BundleSet, Issuer, SpiffeId, TrustBundle, TrustDomain, verify_jwt_svid};

use crate::admission::Caller;

/// Cached entries per cache before expired ones are swept.
const MAX_ENTRIES: usize = 50_000;
/// References per connection, each side.
const MAX_REFS: usize = 4096;

/// The tunnel header that carries the caller's JWT-SVID between gateways. Like every
/// `x-meshgate-*` header, a workload cannot send it: the source gateway strips those.
pub const CALLER_TOKEN_HEADER: &str = "x-meshgate-caller-svid";
/// The tunnel header with the connection-scoped reference to a caller token (requests), and
/// the destination's answer about it (responses: the number it bound, or `unknown`).
pub const CALLER_REF_HEADER: &str = "x-meshgate-caller-ref";

/// The JWT-SVID audience for calls to a service (CONTRACTS.md).
pub fn audience(destination_td: &TrustDomain, namespace: &str, service: &str) -> String {
    format!("spiffe://{destination_td}/ns/{namespace}/svc/{service}")
}

/// `amr` of a caller that authenticated with its X.509-SVID over mTLS.
pub const AMR_MTLS: &str = "x509";

/// (caller, audience, mTLS) → a minted token.
type MintKey = (SpiffeId, String, bool);

/// Source side: mints a caller's JWT-SVID per (caller, audience) and reuses it until it is
/// within a quarter of its lifetime of expiry.
#[derive(Debug)]
pub(crate) struct CallerTokens {
    issuer: Arc<Issuer>,
    ttl: Duration,
    refresh_margin: Duration,
    cache: Mutex<HashMap<MintKey, (Arc<str>, SystemTime)>>,
}

impl CallerTokens {
    pub(crate) fn new(issuer: Arc<Issuer>, ttl: Duration) -> Self {
        Self {
            issuer,
            ttl,
            refresh_margin: ttl / 4,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// A JWT-SVID for `caller` with audience `aud`, valid at `now`; `amr` says whether the
    /// caller authenticated with its X.509-SVID.
    pub(crate) fn token(
        &self,
        caller: &Caller,
        aud: &str,
        now: SystemTime,
    ) -> Result<Arc<str>, String> {
        let key = (caller.id.clone(), aud.to_owned(), caller.mtls);
        if let Ok(cache) = self.cache.lock()
            && let Some((token, exp)) = cache.get(&key)
            && now + self.refresh_margin < *exp
        {
            return Ok(token.clone());
        }
        let amr = if caller.mtls { AMR_MTLS } else { "jwt" };
        let jwt = self
            .issuer
            .mint_jwt_svid_amr(
                &caller.id,
                &[aud.to_owned()],
                &[amr.to_owned()],
                self.ttl,
                now,
            )
            .map_err(|e| e.to_string())?;
        let token: Arc<str> = Arc::from(jwt.token);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= MAX_ENTRIES {
                cache.retain(|_, (_, e)| now < *e);
                if cache.len() >= MAX_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(key, (token.clone(), jwt.expiry));
        }
        Ok(token)
    }
}

/// Source side, one per peer connection: the reference number of each token sent on it and
/// whether the peer confirmed it.
#[derive(Debug, Default)]
pub(crate) struct SentRefs {
    inner: Mutex<Sent>,
}

#[derive(Debug, Default)]
struct Sent {
    next: u64,
    by_token: HashMap<Arc<str>, (u64, bool)>,
}

/// How to name a caller on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Naming {
    /// The reference number.
    pub id: u64,
    /// Whether the token goes along (not yet confirmed by the peer).
    pub with_token: bool,
}

impl SentRefs {
    /// The reference for `token` on this connection, and whether the token must be sent.
    pub(crate) fn naming(&self, token: &Arc<str>) -> Naming {
        let Ok(mut sent) = self.inner.lock() else {
            return Naming {
                id: 0,
                with_token: true,
            };
        };
        if let Some((id, confirmed)) = sent.by_token.get(token) {
            return Naming {
                id: *id,
                with_token: !confirmed,
            };
        }
        if sent.by_token.len() >= MAX_REFS {
            sent.by_token.clear();
        }
        sent.next += 1;
        let id = sent.next;
        sent.by_token.insert(token.clone(), (id, false));
        Naming {
            id,
            with_token: true,
        }
    }

    /// Reads the peer's answer about reference `id` (the response's `x-meshgate-caller-ref`):
    /// confirmed when it echoes the number, forgotten when it says `unknown`. Returns true for
    /// `unknown` (the request was refused for it and may be sent again with the token).
    pub(crate) fn answer(&self, token: &Arc<str>, id: u64, answer: Option<&str>) -> bool {
        let Ok(mut sent) = self.inner.lock() else {
            return false;
        };
        match answer {
            Some("unknown") => {
                sent.by_token.remove(token);
                true
            }
            Some(n) if n.parse::<u64>().ok() == Some(id) => {
                if let Some(entry) = sent.by_token.get_mut(token)
                    && entry.0 == id
                {
                    entry.1 = true;
                }
                false
            }
            _ => false,
        }
    }
}

/// Why a caller was refused at the destination.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallerError {
    /// The peer gateway sent neither a caller token nor a reference.
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
    /// A reference this connection does not hold (or held for another audience, or expired).
    #[error("caller reference `{0}` is not known on this connection")]
    UnknownReference(String),
    /// The token expires later than this gateway lets a caller token live
    /// (`identity.caller_jwt_ttl` plus the leeway).
    #[error(
        "caller token rejected: it expires in {remaining_secs} s, longer than the {max_secs} s \
         this gateway accepts"
    )]
    TooLongLived {
        /// Seconds until the token's `exp`.
        remaining_secs: u64,
        /// The longest remaining lifetime accepted, in seconds.
        max_secs: u64,
    },
}

#[derive(Debug, Clone)]
struct Verified {
    caller: Caller,
    exp: SystemTime,
    bundle: Arc<TrustBundle>,
}

/// Destination side, one per peer connection: reference number → the token it stands for.
#[derive(Debug, Default)]
pub(crate) struct ReceivedRefs {
    map: Mutex<HashMap<u64, Bound>>,
}

#[derive(Debug, Clone)]
struct Bound {
    token: Arc<str>,
    aud: String,
    verified: Verified,
}

/// Destination side, global: verifies caller JWT-SVIDs, caching a verified token until its
/// expiry or until its trust domain's bundle changes (a rotated or removed bundle re-verifies
/// at once). A token that would stay valid longer than `max_lifetime` (from `now`) is refused:
/// a peer gateway cannot hand out long-lived passes for its callers.
#[derive(Debug)]
pub(crate) struct VerifiedCallers {
    bundles: BundleSet,
    leeway: Duration,
    max_lifetime: Duration,
    cache: Mutex<HashMap<[u8; 32], Verified>>,
}

/// A verified caller and the reference number bound to it on this request, if any.
#[derive(Debug, Clone)]
pub(crate) struct Named {
    pub caller: Caller,
    pub bound: Option<u64>,
}

impl VerifiedCallers {
    /// `ttl` is the longest lifetime a caller token is minted with (`identity.caller_jwt_ttl`);
    /// tokens are accepted while their remaining lifetime is at most `ttl + leeway`.
    pub(crate) fn new(bundles: BundleSet, ttl: Duration, leeway: Duration) -> Self {
        Self {
            bundles,
            leeway,
            max_lifetime: ttl.saturating_add(leeway),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Who a request from the gateway of `peer_td` speaks for: the token (binding `reference`
    /// to it on this connection), or the reference alone.
    pub(crate) fn verify(
        &self,
        refs: &ReceivedRefs,
        peer_td: &TrustDomain,
        token: Option<&str>,
        reference: Option<&str>,
        aud: &str,
        now: SystemTime,
    ) -> Result<Named, CallerError> {
        let id = match reference {
            Some(r) => Some(
                r.parse::<u64>()
                    .map_err(|_| CallerError::UnknownReference(r.chars().take(32).collect()))?,
            ),
            None => None,
        };
        match (token, id) {
            (Some(token), id) => {
                let verified = self.verify_token(peer_td, token, aud, now)?;
                let bound = id.filter(|id| refs.bind(*id, token, aud, &verified, now));
                Ok(Named {
                    caller: verified.caller,
                    bound,
                })
            }
            (None, Some(id)) => {
                let unknown = || CallerError::UnknownReference(id.to_string());
                let bound = refs.get(id).ok_or_else(unknown)?;
                if bound.aud != aud || now >= bound.verified.exp {
                    refs.remove(id);
                    return Err(unknown());
                }
                let current = self.bundles.get(bound.verified.caller.id.trust_domain());
                let fresh = current
                    .as_ref()
                    .is_some_and(|b| Arc::ptr_eq(b, &bound.verified.bundle));
                if fresh {
                    check_domain(peer_td, &bound.verified.caller.id)?;
                    return Ok(Named {
                        caller: bound.verified.caller,
                        bound: None,
                    });
                }
                // The source's keys changed: the token must verify again.
                match self.verify_token(peer_td, &bound.token, aud, now) {
                    Ok(v) => {
                        refs.bind(id, &bound.token, aud, &v, now);
                        Ok(Named {
                            caller: v.caller,
                            bound: None,
                        })
                    }
                    Err(e) => {
                        refs.remove(id);
                        Err(e)
                    }
                }
            }
            (None, None) => Err(CallerError::Missing),
        }
    }

    fn verify_token(
        &self,
        peer_td: &TrustDomain,
        token: &str,
        aud: &str,
        now: SystemTime,
    ) -> Result<Verified, CallerError> {
        // Keyed by a digest: entry size stays fixed whatever the token length.
        let key = cache_key(token, aud);
        if let Ok(cache) = self.cache.lock()
            && let Some(v) = cache.get(&key)
            && now < v.exp
            && self
                .bundles
                .get(v.caller.id.trust_domain())
                .is_some_and(|b| Arc::ptr_eq(&b, &v.bundle))
        {
            check_domain(peer_td, &v.caller.id)?;
            return Ok(v.clone());
        }
        let claims = verify_jwt_svid(token, &self.bundles, aud, now, self.leeway)
            .map_err(|e| CallerError::Invalid(e.to_string()))?;
        check_domain(peer_td, &claims.sub)?;
        let remaining = claims.exp.duration_since(now).unwrap_or_default();
        if remaining > self.max_lifetime {
            return Err(CallerError::TooLongLived {
                remaining_secs: remaining.as_secs(),
                max_secs: self.max_lifetime.as_secs(),
            });
        }
        let bundle = self
            .bundles
            .get(claims.sub.trust_domain())
            .ok_or_else(|| CallerError::Invalid("no bundle for the caller".to_owned()))?;
        let verified = Verified {
            caller: Caller {
                mtls: claims.amr.iter().any(|m| m == AMR_MTLS),
                id: claims.sub,
            },
            exp: claims.exp,
            bundle,
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= MAX_ENTRIES {
                cache.retain(|_, v| now < v.exp);
                if cache.len() >= MAX_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(key, verified.clone());
        }
        Ok(verified)
    }
}

impl ReceivedRefs {
    /// Binds `id` to a verified token; false when the table is full of live entries.
    fn bind(&self, id: u64, token: &str, aud: &str, verified: &Verified, now: SystemTime) -> bool {
        let Ok(mut map) = self.map.lock() else {
            return false;
        };
        if map.len() >= MAX_REFS && !map.contains_key(&id) {
            map.retain(|_, b| now < b.verified.exp);
            if map.len() >= MAX_REFS {
                return false;
            }
        }
        map.insert(
            id,
            Bound {
                token: Arc::from(token),
                aud: aud.to_owned(),
                verified: verified.clone(),
            },
        );
        true
    }

    fn get(&self, id: u64) -> Option<Bound> {
        self.map.lock().ok()?.get(&id).cloned()
    }

    fn remove(&self, id: u64) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(&id);
        }
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

fn check_domain(peer_td: &TrustDomain, caller: &SpiffeId) -> Result<(), CallerError> {
    if caller.trust_domain() != peer_td {
        return Err(CallerError::WrongTrustDomain {
            peer: peer_td.clone(),
            caller: caller.trust_domain().clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        issuer: Arc<Issuer>,
        td: TrustDomain,
        callers: VerifiedCallers,
        bundles: BundleSet,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .cache_capacity(1 << 20)
            .open()
            .unwrap();
        let td: TrustDomain = "east.example".parse().unwrap();
        std::fs::create_dir_all(dir.path().join("keys")).unwrap();
        let issuer = Arc::new(
            Issuer::init(&db, &dir.path().join("keys"), td.clone(), SystemTime::now()).unwrap(),
        );
        let bundles = BundleSet::new();
        bundles.insert(issuer.bundle());
        Fixture {
            callers: VerifiedCallers::new(
                bundles.clone(),
                Duration::from_secs(300),
                Duration::from_secs(5),
            ),
            _dir: dir,
            issuer,
            td,
            bundles,
        }
    }

    fn web(td: &TrustDomain) -> Caller {
        Caller {
            id: SpiffeId::new(td, "/ns/shop/sa/web").unwrap(),
            mtls: true,
        }
    }

    const AUD: &str = "spiffe://west.example/ns/shop/svc/orders";

    #[test]
    fn a_reference_stands_for_its_token_on_its_connection_only() {
        let f = fixture();
        let tokens = CallerTokens::new(f.issuer.clone(), Duration::from_secs(300));
        let now = SystemTime::now();
        let token = tokens.token(&web(&f.td), AUD, now).unwrap();
        let (sent, conn, other_conn) = (
            SentRefs::default(),
            ReceivedRefs::default(),
            ReceivedRefs::default(),
        );
        // First use: the token goes along with a fresh reference, which the peer binds.
        let n = sent.naming(&token);
        assert!(n.with_token);
        let named = f
            .callers
            .verify(
                &conn,
                &f.td,
                Some(&token),
                Some(&n.id.to_string()),
                AUD,
                now,
            )
            .unwrap();
        assert_eq!(named.caller, web(&f.td));
        assert_eq!(named.bound, Some(n.id));
        assert!(!sent.answer(&token, n.id, Some(&n.id.to_string())));
        // Then the reference alone.
        let n2 = sent.naming(&token);
        assert_eq!((n2.id, n2.with_token), (n.id, false));
        let named = f
            .callers
            .verify(&conn, &f.td, None, Some(&n.id.to_string()), AUD, now)
            .unwrap();
        assert_eq!((named.caller, named.bound), (web(&f.td), None));
        // It means nothing on another connection, for another audience, or unbound.
        let id = n.id.to_string();
        for (refs, aud) in [
            (&other_conn, AUD),
            (&conn, "spiffe://west.example/ns/shop/svc/admin"),
        ] {
            assert!(matches!(
                f.callers.verify(refs, &f.td, None, Some(&id), aud, now),
                Err(CallerError::UnknownReference(_))
            ));
        }
        // The audience mismatch dropped it: the source hears `unknown` and sends the token.
        assert!(
            f.callers
                .verify(&conn, &f.td, None, Some(&id), AUD, now)
                .is_err()
        );
        assert!(sent.answer(&token, n.id, Some("unknown")));
        assert!(sent.naming(&token).with_token);
        assert!(matches!(
            f.callers.verify(&conn, &f.td, None, Some("x"), AUD, now),
            Err(CallerError::UnknownReference(_))
        ));
        assert_eq!(
            f.callers
                .verify(&conn, &f.td, None, None, AUD, now)
                .unwrap_err(),
            CallerError::Missing
        );
    }

    #[test]
    fn a_bound_reference_expires_with_its_token_and_is_rechecked_on_a_new_bundle() {
        let f = fixture();
        let tokens = CallerTokens::new(f.issuer.clone(), Duration::from_secs(60));
        let now = SystemTime::now();
        let token = tokens.token(&web(&f.td), AUD, now).unwrap();
        let conn = ReceivedRefs::default();
        f.callers
            .verify(&conn, &f.td, Some(&token), Some("7"), AUD, now)
            .unwrap();
        // Past the token's expiry the reference is gone.
        let later = now + Duration::from_secs(120);
        assert!(matches!(
            f.callers.verify(&conn, &f.td, None, Some("7"), AUD, later),
            Err(CallerError::UnknownReference(_))
        ));
        // A new bundle for the caller's domain (here: the same keys, re-inserted) makes the
        // bound token verify again, and it still does.
        f.callers
            .verify(&conn, &f.td, Some(&token), Some("8"), AUD, now)
            .unwrap();
        f.bundles.insert(f.issuer.bundle());
        assert!(
            f.callers
                .verify(&conn, &f.td, None, Some("8"), AUD, now)
                .is_ok()
        );
        // A bundle without the signing key refuses it.
        let (other, _) = {
            let dir = tempfile::tempdir().unwrap();
            let db = sled::Config::new()
                .path(dir.path().join("db"))
                .open()
                .unwrap();
            std::fs::create_dir_all(dir.path().join("keys")).unwrap();
            let i = Issuer::init(&db, &dir.path().join("keys"), f.td.clone(), now).unwrap();
            (i.bundle(), dir)
        };
        f.bundles.insert(other);
        assert!(matches!(
            f.callers.verify(&conn, &f.td, None, Some("8"), AUD, now),
            Err(CallerError::Invalid(_))
        ));
    }

    #[test]
    fn a_peer_speaks_only_for_its_own_trust_domain() {
        let f = fixture();
        let tokens = CallerTokens::new(f.issuer.clone(), Duration::from_secs(60));
        let now = SystemTime::now();
        let token = tokens.token(&web(&f.td), AUD, now).unwrap();
        let north: TrustDomain = "north.example".parse().unwrap();
        let conn = ReceivedRefs::default();
        assert!(matches!(
            f.callers
                .verify(&conn, &north, Some(&token), Some("1"), AUD, now),
            Err(CallerError::WrongTrustDomain { .. })
        ));
        // Nothing was bound for it either.
        assert!(
            f.callers
                .verify(&conn, &f.td, None, Some("1"), AUD, now)
                .is_err()
        );
    }

    #[test]
    fn a_token_living_longer_than_the_configured_ttl_is_refused() {
        let f = fixture();
        // This gateway mints and accepts caller tokens of at most a minute (plus 5 s).
        let callers = VerifiedCallers::new(
            f.bundles.clone(),
            Duration::from_secs(60),
            Duration::from_secs(5),
        );
        let now = SystemTime::now();
        let conn = ReceivedRefs::default();
        let mint = |ttl: Duration| {
            f.issuer
                .mint_jwt_svid(&web(&f.td).id, &[AUD.to_owned()], ttl, now)
                .unwrap()
                .token
        };
        // An hour-long pass from the peer's real issuer: signed correctly, still refused, and
        // the reference that came with it is not bound.
        let hour = mint(Duration::from_secs(3600));
        let err = callers
            .verify(&conn, &f.td, Some(&hour), Some("1"), AUD, now)
            .unwrap_err();
        assert!(
            matches!(err, CallerError::TooLongLived { max_secs: 65, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("longer than the 65 s"), "{err}");
        assert!(matches!(
            callers.verify(&conn, &f.td, None, Some("1"), AUD, now),
            Err(CallerError::UnknownReference(_))
        ));
        // Just past ttl + leeway is refused; the configured ttl itself is accepted, and so is
        // the long token once its remaining lifetime is within bounds.
        let over = mint(Duration::from_secs(67));
        assert!(matches!(
            callers.verify(&conn, &f.td, Some(&over), None, AUD, now),
            Err(CallerError::TooLongLived { .. })
        ));
        let ok = mint(Duration::from_secs(60));
        assert!(
            callers
                .verify(&conn, &f.td, Some(&ok), None, AUD, now)
                .is_ok()
        );
        let late = now + Duration::from_secs(3600 - 30);
        assert!(
            callers
                .verify(&conn, &f.td, Some(&hour), None, AUD, late)
                .is_ok()
        );
    }
}
