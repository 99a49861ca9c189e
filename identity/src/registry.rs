//! Registration entries and join-token attestation.
//!
//! An entry says which SPIFFE ID a workload may hold, for how long, with which DNS names. A
//! join token is bound to one entry: random (256 bits), stored only as its SHA-256, one-time
//! (consumed with a compare-and-swap, so two concurrent redemptions cannot both win), and
//! expiring. A workload redeems it with a CSR and renews by proving its current SVID.

use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::error::IssuerError;
use crate::files::{random_bytes, sha256, unix_secs};
use crate::id::SpiffeId;
use crate::issuer::{DEFAULT_X509_TTL, Issuer, MAX_X509_TTL, check_dns_names};
use crate::store::{self, TokenRecord};
use crate::svid::X509Svid;

/// Prefix of every join token, so leaked tokens are recognisable by secret scanners.
pub const JOIN_TOKEN_PREFIX: &str = "mgjt_";
/// Longest join-token lifetime.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default join-token lifetime.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);

/// Which SPIFFE ID a workload may hold, with its SVID lifetime and extra DNS names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationEntry {
    /// The ID.
    pub spiffe_id: SpiffeId,
    /// X.509-SVID lifetime, seconds.
    pub ttl_secs: u64,
    /// DNS names added as SANs.
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// Creation time, unix seconds.
    pub created_at: u64,
}

impl RegistrationEntry {
    /// The SVID lifetime.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_secs)
    }
}

/// A freshly created join token. The secret is shown once; only its hash is stored.
#[derive(Clone, Serialize)]
pub struct JoinToken {
    /// The secret to hand to the workload.
    pub token: String,
    /// The entry it redeems.
    pub spiffe_id: SpiffeId,
    /// Expiry, unix seconds.
    pub expires_at: u64,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("token", &"<redacted>")
            .field("spiffe_id", &self.spiffe_id)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

fn token_key(token: &str) -> String {
    hex::encode(sha256(token.as_bytes()))
}

impl Issuer {
    /// Creates a registration entry. `ttl` defaults to one hour.
    pub fn create_entry(
        &self,
        id: &SpiffeId,
        ttl: Option<Duration>,
        dns_names: &[String],
        now: SystemTime,
    ) -> Result<RegistrationEntry, IssuerError> {
        self.check_id(id)?;
        // Only the gateway process holds the gateway identity (it issues it to itself);
        // registering it would let a workload pose as the gateway and the issuer.
        if *id == SpiffeId::gateway(id.trust_domain()) {
            return Err(IssuerError::ReservedId { id: id.to_string() });
        }
        let ttl = ttl.unwrap_or(DEFAULT_X509_TTL);
        if ttl < Duration::from_secs(1) || ttl > MAX_X509_TTL {
            return Err(IssuerError::BadTtl {
                reason: format!("must be between 1s and {}s", MAX_X509_TTL.as_secs()),
            });
        }
        check_dns_names(dns_names)?;
        let entry = RegistrationEntry {
            spiffe_id: id.clone(),
            ttl_secs: ttl.as_secs(),
            dns_names: dns_names.to_vec(),
            created_at: unix_secs(now),
        };
        let value = store::to_json(&entry)?;
        let swapped =
            self.trees
                .entries
                .compare_and_swap(id.as_str(), None as Option<&[u8]>, Some(value))?;
        if swapped.is_err() {
            return Err(IssuerError::EntryExists { id: id.to_string() });
        }
        self.trees.db.flush()?;
        Ok(entry)
    }

    /// The entry for `id`, if any.
    pub fn entry(&self, id: &SpiffeId) -> Result<Option<RegistrationEntry>, IssuerError> {
        self.trees
            .entries
            .get(id.as_str())?
            .map(|v| store::from_json(&v, "registration entry"))
            .transpose()
    }

    /// Every entry, sorted by SPIFFE ID.
    pub fn list_entries(&self) -> Result<Vec<RegistrationEntry>, IssuerError> {
        self.trees
            .entries
            .iter()
            .map(|item| store::from_json(&item?.1, "registration entry"))
            .collect()
    }

    /// Deletes the entry for `id`; its tokens stop working and its SVIDs can no longer renew.
    pub fn delete_entry(&self, id: &SpiffeId) -> Result<RegistrationEntry, IssuerError> {
        let old = self
            .trees
            .entries
            .remove(id.as_str())?
            .ok_or_else(|| IssuerError::NoSuchEntry { id: id.to_string() })?;
        self.trees.db.flush()?;
        store::from_json(&old, "registration entry")
    }

    /// Creates a one-time join token for the entry of `id`.
    pub fn create_join_token(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<JoinToken, IssuerError> {
        if self.entry(id)?.is_none() {
            return Err(IssuerError::NoSuchEntry { id: id.to_string() });
        }
        if ttl < Duration::from_secs(1) || ttl > MAX_TOKEN_TTL {
            return Err(IssuerError::BadTtl {
                reason: format!("must be between 1s and {}s", MAX_TOKEN_TTL.as_secs()),
            });
        }
        let token = format!(
            "{JOIN_TOKEN_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(random_bytes::<32>())
        );
        let expires_at = unix_secs(now).saturating_add(ttl.as_secs());
        let record = TokenRecord {
            spiffe_id: id.to_string(),
            expires_at,
            created_at: unix_secs(now),
            used_at: None,
        };
        self.trees
            .tokens
            .insert(token_key(&token), store::to_json(&record)?)?;
        self.trees.db.flush()?;
        Ok(JoinToken {
            token,
            spiffe_id: id.clone(),
            expires_at,
        })
    }

    /// Redeems a join token with a CSR (DER): checks everything first, then consumes the
    /// token atomically, then signs. Bad input changes no state; of two concurrent
    /// redemptions exactly one wins.
    pub fn attest(
        &self,
        token: &str,
        csr_der: &[u8],
        now: SystemTime,
    ) -> Result<X509Svid, IssuerError> {
        if !token.starts_with(JOIN_TOKEN_PREFIX) || token.len() > 128 {
            return Err(IssuerError::UnknownToken);
        }
        let key = token_key(token);
        let stored = self
            .trees
            .tokens
            .get(&key)?
            .ok_or(IssuerError::UnknownToken)?;
        let record: TokenRecord = store::from_json(&stored, "join token")?;
        if record.used_at.is_some() {
            return Err(IssuerError::TokenUsed);
        }
        if unix_secs(now) >= record.expires_at {
            return Err(IssuerError::TokenExpired);
        }
        let id: SpiffeId = record.spiffe_id.parse().map_err(|_| IssuerError::Corrupt {
            reason: "token bound to an invalid ID".into(),
        })?;
        let entry = self
            .entry(&id)?
            .ok_or_else(|| IssuerError::NoSuchEntry { id: id.to_string() })?;
        crate::csr::check_csr(csr_der, &id)?;

        let used = TokenRecord {
            used_at: Some(unix_secs(now)),
            ..record
        };
        let used = store::to_json(&used)?;
        if self
            .trees
            .tokens
            .compare_and_swap(&key, Some(&stored), Some(used.clone()))?
            .is_err()
        {
            return Err(IssuerError::TokenUsed);
        }
        match self.sign_csr_with_names(csr_der, &id, entry.ttl(), &entry.dns_names, now) {
            Ok(svid) => {
                tracing::info!(spiffe_id = %id, "join token redeemed");
                Ok(svid)
            }
            Err(e) => {
                // Nothing was issued: give the token back so the workload can retry.
                let _ = self
                    .trees
                    .tokens
                    .compare_and_swap(&key, Some(used), Some(stored));
                Err(e)
            }
        }
    }

    /// Renews the SVID of `caller` (already authenticated by its current SVID over mTLS)
    /// from a CSR; the registration entry must still exist.
    pub fn renew(
        &self,
        caller: &SpiffeId,
        csr_der: &[u8],
        now: SystemTime,
    ) -> Result<X509Svid, IssuerError> {
        let entry = self
            .entry(caller)?
            .ok_or_else(|| IssuerError::NoSuchEntry {
                id: caller.to_string(),
            })?;
        self.sign_csr_with_names(csr_der, caller, entry.ttl(), &entry.dns_names, now)
    }
}
