//! Federation links and the last-known state of each peer, as persisted in sled.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshgate_identity::{TrustBundle, TrustDomain};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::FederationError;

/// A link to a peer cluster, as configured (config file or `meshgate federation add`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// The peer's cluster name, e.g. `west`.
    pub cluster: String,
    /// The peer's trust domain, e.g. `west.example`.
    pub trust_domain: String,
    /// The peer gateways' QUIC addresses.
    #[serde(default)]
    pub gateways: Vec<SocketAddr>,
    /// A DNS name for the peer gateways, resolved SRV first, then A/AAAA
    /// (`name:port` gives the port for A/AAAA answers).
    #[serde(default)]
    pub dns: Option<String>,
    /// Lower is preferred when several clusters export a service.
    #[serde(default)]
    pub priority: u32,
    /// The bootstrap trust anchor: the peer's SPIFFE bundle JSON.
    pub bootstrap_bundle: String,
    /// Services the peer is known to export to us (`service.namespace`), used until the
    /// first sync replaces them with what the peer says.
    #[serde(default)]
    pub services: Vec<String>,
    /// Services (`service.namespace`) this peer may serve under their unpinned name: which
    /// clusters share a name is the importing side's choice (a per-peer sameness list).
    #[serde(default)]
    pub shared: Vec<String>,
    /// Services of this peer that receive the caller's `Authorization` and `Cookie` headers.
    #[serde(default)]
    pub credentials: Vec<String>,
}

impl Link {
    /// Checks the link like [`Link::validate`] and writes its trust domain in the one
    /// canonical spelling (`spiffe://west.example` becomes `west.example`), so it is stored,
    /// found, compared and removed under one key.
    pub fn normalize(&mut self) -> Result<(TrustDomain, TrustBundle), FederationError> {
        let (td, bundle) = self.validate()?;
        self.trust_domain = td.to_string();
        Ok((td, bundle))
    }

    /// Checks the link and returns its trust domain and bootstrap bundle.
    pub fn validate(&self) -> Result<(TrustDomain, TrustBundle), FederationError> {
        let td: TrustDomain =
            self.trust_domain
                .parse()
                .map_err(
                    |e: meshgate_identity::IdError| FederationError::TrustDomain {
                        value: self.trust_domain.clone(),
                        reason: e.to_string(),
                    },
                )?;
        if self.cluster.is_empty()
            || !self
                .cluster
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(FederationError::Link {
                cluster: self.cluster.clone(),
                reason: "a cluster name is letters, digits and `-` (it is a DNS label)".into(),
            });
        }
        if self.gateways.is_empty() && self.dns.is_none() {
            return Err(FederationError::Link {
                cluster: self.cluster.clone(),
                reason: "give gateway addresses or a DNS name".into(),
            });
        }
        let bundle = TrustBundle::from_spiffe_json(&self.bootstrap_bundle, &td).map_err(|e| {
            FederationError::Bundle {
                trust_domain: td.to_string(),
                reason: e.to_string(),
            }
        })?;
        if bundle.x509_roots().is_empty() {
            return Err(FederationError::Bundle {
                trust_domain: td.to_string(),
                reason: "the bootstrap bundle holds no X.509 root".into(),
            });
        }
        Ok((td, bundle))
    }
}

/// What this cluster last knew of a peer: survives restarts and partitions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerState {
    /// The peer's bundle (SPIFFE JSON) last accepted.
    pub bundle: Option<String>,
    /// Its `spiffe_sequence`.
    pub bundle_sequence: u64,
    /// Latest `notAfter` among its roots (unix seconds).
    pub bundle_not_after: Option<u64>,
    /// When the bundle was last confirmed by the peer (fetched, pushed, or the link added).
    pub confirmed_at: Option<u64>,
    /// Services the peer exports to us (`service.namespace`).
    pub imported: Vec<String>,
    /// Gateway endpoints the peer advertised.
    pub endpoints: Vec<SocketAddr>,
    /// Last successful sync (unix seconds).
    pub last_sync: Option<u64>,
    /// Last failed sync and why.
    pub last_error: Option<String>,
    /// Services we exported to the peer when it last asked.
    pub exported: Vec<String>,
    /// Our bundle sequence the peer acknowledged (push answer).
    pub acked_sequence: Option<u64>,
    /// The peer's latest decision-log checkpoint sequence we hold as witness.
    pub witnessed_seq: Option<u64>,
}

impl PeerState {
    /// The cached bundle, if any and readable.
    pub fn cached_bundle(&self, td: &TrustDomain) -> Option<TrustBundle> {
        let text = self.bundle.as_deref()?;
        TrustBundle::from_spiffe_json(text, td).ok()
    }

    /// Records `bundle` as accepted at `now`.
    pub fn set_bundle(&mut self, bundle: &TrustBundle, now: SystemTime) {
        self.bundle = Some(bundle.to_spiffe_json());
        self.bundle_sequence = bundle.sequence();
        self.bundle_not_after = bundle_not_after(bundle).map(unix);
        self.confirmed_at = Some(unix(now));
    }
}

/// The latest `notAfter` among a bundle's X.509 roots.
pub fn bundle_not_after(bundle: &TrustBundle) -> Option<SystemTime> {
    bundle
        .x509_roots()
        .iter()
        .filter_map(|der| {
            let (_, cert) = X509Certificate::from_der(der).ok()?;
            let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
            Some(UNIX_EPOCH + Duration::from_secs(secs))
        })
        .max()
}

/// Seconds since the epoch.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The instant of `secs` seconds since the epoch.
pub fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}
