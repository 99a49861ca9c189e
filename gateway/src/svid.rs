//! The gateway's own X.509-SVID, rotated in place: rustls resolves the certificate per
//! handshake from here, so new connections use a renewed SVID while existing ones go on.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use meshgate_identity::{Issuer, SpiffeId, X509Svid};
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why the gateway's SVID could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// The issuer refused to issue.
    #[error("cannot issue the gateway SVID: {0}")]
    Issue(String),
    /// rustls refused the key.
    #[error("cannot load the gateway SVID key: {0}")]
    Key(#[from] rustls::Error),
}

/// The current SVID and the settings to renew it.
#[derive(Debug)]
pub struct SvidStore {
    current: ArcSwap<Current>,
    id: SpiffeId,
    ttl: Duration,
    dns_names: Vec<String>,
    ip_addrs: Vec<std::net::IpAddr>,
}

#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl SvidStore {
    /// Issues the first SVID for `id` from the local issuer.
    pub fn issue(
        issuer: &Issuer,
        id: SpiffeId,
        ttl: Duration,
        dns_names: Vec<String>,
        ip_addrs: Vec<std::net::IpAddr>,
        now: SystemTime,
    ) -> Result<Self, SvidError> {
        let current = Self::fresh(issuer, &id, ttl, &dns_names, &ip_addrs, now)?;
        Ok(Self {
            current: ArcSwap::from_pointee(current),
            id,
            ttl,
            dns_names,
            ip_addrs,
        })
    }

    fn fresh(
        issuer: &Issuer,
        id: &SpiffeId,
        ttl: Duration,
        dns_names: &[String],
        ip_addrs: &[std::net::IpAddr],
        now: SystemTime,
    ) -> Result<Current, SvidError> {
        let svid = issuer
            .issue_x509_svid(id, ttl, dns_names, ip_addrs, now)
            .map_err(|e| SvidError::Issue(e.to_string()))?;
        certified(&svid, now, ttl)
    }

    /// The gateway's SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The current certified key.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.current.load().key.clone()
    }

    /// When the current SVID expires.
    pub fn not_after(&self) -> SystemTime {
        self.current.load().not_after
    }

    /// Whether the SVID has passed half its lifetime at `now` and should be renewed.
    pub fn needs_renewal(&self, now: SystemTime) -> bool {
        let cur = self.current.load();
        let life = cur
            .not_after
            .duration_since(cur.not_before)
            .unwrap_or_default();
        now >= cur.not_before + life / 2
    }

    /// Issues a new SVID and swaps it in; connections already open keep the old one.
    pub fn renew(&self, issuer: &Issuer, now: SystemTime) -> Result<(), SvidError> {
        let fresh = Self::fresh(
            issuer,
            &self.id,
            self.ttl,
            &self.dns_names,
            &self.ip_addrs,
            now,
        )?;
        self.current.store(Arc::new(fresh));
        Ok(())
    }
}

fn certified(svid: &X509Svid, now: SystemTime, ttl: Duration) -> Result<Current, SvidError> {
    let key = meshgate_identity::certified_key(svid)?;
    let not_after = svid.not_after();
    Ok(Current {
        key,
        not_before: not_after.checked_sub(ttl).unwrap_or(now),
        not_after,
    })
}

impl ResolvesServerCert for SvidStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified_key())
    }
}

impl ResolvesClientCert for SvidStore {
    fn resolve(
        &self,
        _acceptable_issuers: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}
