//! What the gateway consumes from federation (CONTRACTS.md, crate edges): the service
//! catalog and the handler of `/.meshgate/` control paths. The gateway defines the traits;
//! `meshgate-federation` implements them; a static catalog from config serves until then
//! and in tests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use meshgate_identity::{SpiffeId, TrustDomain};

use crate::config::{PeerConfig, ServiceConfig};
use crate::dest::Destination;

/// A peer cluster that serves a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRoute {
    /// The peer's cluster name.
    pub cluster: String,
    /// The peer's trust domain: its gateways must present `spiffe://<td>/meshgate/gateway`.
    pub trust_domain: TrustDomain,
    /// The peer's gateway QUIC addresses, preferred first.
    pub gateways: Vec<SocketAddr>,
    /// Whether the caller's `Authorization` and `Cookie` headers go to this cluster for this
    /// service (the importing side's choice; off by default).
    pub credentials: bool,
}

/// Where a destination can be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// By this cluster's own upstreams.
    Local,
    /// Through a peer cluster's gateway.
    Peer(PeerRoute),
}

/// The federated service catalog, as the gateway sees it.
pub trait Catalog: Send + Sync + std::fmt::Debug {
    /// Routes for a destination, best first: the local cluster (if it has the service),
    /// then peers by priority and health. A pinned cluster yields at most one route.
    fn routes(&self, dest: &Destination) -> Vec<Route>;

    /// Whether the local service `service.namespace` is exported to the cluster of `peer`.
    fn exported_to(&self, service: &str, namespace: &str, peer: &TrustDomain) -> bool;

    /// The cluster name of a peer trust domain (for `source_cluster` in decisions).
    fn cluster_of(&self, td: &TrustDomain) -> Option<String>;
}

/// Serves `/.meshgate/` control requests from peer gateways (bundles, catalog, checkpoints).
pub trait ControlHandler: Send + Sync + std::fmt::Debug {
    /// Whether the peer gateway `peer` may send `method path` at all, and the largest body
    /// that request may carry; asked before a byte of the body is read. `Err` answers at
    /// once with that status and message (an unlinked peer, an unknown path).
    fn admit(
        &self,
        peer: &SpiffeId,
        method: &http::Method,
        path: &str,
    ) -> Result<usize, (http::StatusCode, String)>;

    /// Answers one control request from the authenticated peer gateway `peer`.
    fn handle(
        &self,
        peer: &SpiffeId,
        request: http::Request<Bytes>,
    ) -> std::pin::Pin<Box<dyn Future<Output = http::Response<Bytes>> + Send + '_>>;
}

/// A catalog from the gateway's config: local services and statically configured peers.
#[derive(Debug, Clone)]
pub struct StaticCatalog {
    cluster: String,
    local: BTreeMap<String, Vec<String>>,
    peers: Vec<(PeerConfig, TrustDomain)>,
}

impl StaticCatalog {
    /// Builds the catalog. Peer trust domains must already be validated.
    pub fn new(
        cluster: &str,
        services: &[ServiceConfig],
        peers: Vec<(PeerConfig, TrustDomain)>,
    ) -> Arc<Self> {
        let local = services
            .iter()
            .map(|s| (format!("{}.{}", s.name, s.namespace), s.export_to.clone()))
            .collect();
        let mut peers = peers;
        peers.sort_by_key(|(p, _)| p.priority);
        Arc::new(Self {
            cluster: cluster.to_owned(),
            local,
            peers,
        })
    }
}

impl Catalog for StaticCatalog {
    fn routes(&self, dest: &Destination) -> Vec<Route> {
        let short = dest.short();
        let mut routes = Vec::new();
        let wants = |cluster: &str| dest.cluster.as_deref().is_none_or(|c| c == cluster);
        if wants(&self.cluster) && self.local.contains_key(&short) {
            routes.push(Route::Local);
        }
        for (peer, td) in &self.peers {
            // An unpinned name is served by a peer only when this side shares it with them.
            let shared = dest.cluster.is_some() || peer.shared.contains(&short);
            if wants(&peer.cluster) && shared && peer.services.contains(&short) {
                routes.push(Route::Peer(PeerRoute {
                    cluster: peer.cluster.clone(),
                    trust_domain: td.clone(),
                    gateways: peer.gateways.clone(),
                    credentials: peer.credentials.contains(&short),
                }));
            }
        }
        routes
    }

    fn exported_to(&self, service: &str, namespace: &str, peer: &TrustDomain) -> bool {
        let Some(cluster) = self.cluster_of(peer) else {
            return false;
        };
        self.local
            .get(&format!("{service}.{namespace}"))
            .is_some_and(|to| to.iter().any(|c| c == "*" || *c == cluster))
    }

    fn cluster_of(&self, td: &TrustDomain) -> Option<String> {
        self.peers
            .iter()
            .find(|(_, t)| t == td)
            .map(|(p, _)| p.cluster.clone())
    }
}
