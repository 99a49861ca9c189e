//! `meshgate federation status`: one line (or JSON object) per link.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::FederationError;
use crate::federation::{Federation, FederationOptions};
use crate::link::{Link, PeerState, from_unix, unix};
use crate::rules::{self, Freshness};
use crate::store::Store;

/// The state of one link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// The peer cluster.
    pub cluster: String,
    /// Its trust domain.
    pub trust_domain: String,
    /// `synced` (fresh), `stale` (partition, cached state served), `expired` (failed
    /// closed), `never_synced`, or `unhealthy` (the last sync failed, cached state fresh).
    pub state: String,
    /// Configured gateway addresses.
    pub gateways: Vec<String>,
    /// Configured DNS name for discovery.
    pub dns: Option<String>,
    /// Configured priority.
    pub priority: u32,
    /// Last successful sync (RFC 3339).
    pub last_sync: Option<String>,
    /// Seconds since the last successful sync (or since the bundle was confirmed).
    pub lag_seconds: Option<u64>,
    /// The peer bundle's `spiffe_sequence` held here.
    pub bundle_sequence: u64,
    /// Our bundle sequence the peer acknowledged.
    pub our_sequence_at_peer: Option<u64>,
    /// Services the peer exports to us.
    pub imported: Vec<String>,
    /// Services we exported to the peer.
    pub exported: Vec<String>,
    /// The peer's latest decision-log head we hold as witness.
    pub witnessed_seq: Option<u64>,
    /// Whether the heads the peer holds of *our* log disagree with it (the self-check;
    /// `None` until it ran against this peer).
    #[serde(default)]
    pub witness_mismatch: Option<bool>,
    /// The first disagreement the self-check found.
    #[serde(default)]
    pub witness_problem: Option<String>,
    /// The last sync error.
    pub last_error: Option<String>,
}

/// Builds one link's status from its persisted state (`healthy` when known from a running
/// federation).
pub fn link_status(
    link: &Link,
    state: &PeerState,
    healthy: Option<bool>,
    closed: bool,
    options: &FederationOptions,
    now: SystemTime,
) -> LinkStatus {
    let freshness = rules::freshness(
        now,
        state.confirmed_at.map_or(now, from_unix),
        state.bundle_not_after.map(from_unix),
        options.stale_after,
        options.max_stale,
    );
    let label = if closed || freshness == Freshness::Expired {
        "expired"
    } else if state.last_sync.is_none() {
        "never_synced"
    } else if freshness == Freshness::Stale {
        "stale"
    } else if healthy == Some(false) {
        "unhealthy"
    } else {
        "synced"
    };
    let now_s = unix(now);
    LinkStatus {
        cluster: link.cluster.clone(),
        trust_domain: link.trust_domain.clone(),
        state: label.to_owned(),
        gateways: link.gateways.iter().map(ToString::to_string).collect(),
        dns: link.dns.clone(),
        priority: link.priority,
        last_sync: state
            .last_sync
            .map(|s| meshgate_policy::to_rfc3339(from_unix(s))),
        lag_seconds: state
            .last_sync
            .or(state.confirmed_at)
            .map(|s| now_s.saturating_sub(s)),
        bundle_sequence: state.bundle_sequence,
        our_sequence_at_peer: state.acked_sequence,
        imported: state.imported.clone(),
        exported: state.exported.clone(),
        witnessed_seq: state.witnessed_seq,
        witness_mismatch: None,
        witness_problem: None,
        last_error: state.last_error.clone(),
    }
}

/// Status of every link from the state database (no gateway running).
pub fn status_from_db(db: &sled::Db, now: SystemTime) -> Result<Vec<LinkStatus>, FederationError> {
    let store = Store::open(db)?;
    let peers = store.peers()?;
    let options = FederationOptions::default();
    Ok(store
        .links()?
        .iter()
        .map(|(td, link)| {
            let state = peers.get(td).cloned().unwrap_or_default();
            link_status(link, &state, None, false, &options, now)
        })
        .collect())
}

impl Federation {
    /// Status of every link of the running federation.
    pub fn status(&self, now: SystemTime) -> Vec<LinkStatus> {
        self.read()
            .values()
            .map(|p| {
                let mut status = link_status(
                    &p.link,
                    &p.state,
                    Some(p.healthy),
                    p.closed,
                    self.options(),
                    now,
                );
                status.witness_mismatch = p.self_check.mismatch;
                status.witness_problem = p.self_check.problem.clone();
                status
            })
            .collect()
    }
}
