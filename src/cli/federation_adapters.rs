//! Adapters between federation and the gateway (CONTRACTS.md, crate edges: neither crate
//! depends on the other): the gateway's [`Catalog`] and [`ControlHandler`] over
//! [`Federation`], federation's [`ControlTransport`] over the gateway's [`ControlClient`].
//! Free of CLI types, so the end-to-end tests wire gateways with this very file.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use meshgate_federation::{ControlTransport, Federation, Route};
use meshgate_gateway::{Catalog, ControlClient, ControlHandler, Destination, PeerRoute};
use meshgate_identity::{SpiffeId, TrustDomain};

/// The gateway's view of the federated catalog.
#[derive(Debug)]
pub struct FederatedCatalog(pub Arc<Federation>);

impl Catalog for FederatedCatalog {
    fn routes(&self, dest: &Destination) -> Vec<meshgate_gateway::Route> {
        self.0
            .routes(&dest.service, &dest.namespace, dest.cluster.as_deref())
            .into_iter()
            .map(|r| match r {
                Route::Local => meshgate_gateway::Route::Local,
                Route::Peer {
                    cluster,
                    trust_domain,
                    gateways,
                    credentials,
                } => meshgate_gateway::Route::Peer(PeerRoute {
                    cluster,
                    trust_domain,
                    gateways,
                    credentials,
                }),
            })
            .collect()
    }

    fn exported_to(&self, service: &str, namespace: &str, peer: &TrustDomain) -> bool {
        self.0.exported_to(service, namespace, peer)
    }

    fn cluster_of(&self, td: &TrustDomain) -> Option<String> {
        self.0.cluster_of(td)
    }
}

impl ControlHandler for FederatedCatalog {
    fn admit(
        &self,
        peer: &SpiffeId,
        method: &http::Method,
        path: &str,
    ) -> Result<usize, (http::StatusCode, String)> {
        self.0.control_admit(peer, method, path)
    }

    fn handle(
        &self,
        peer: &SpiffeId,
        request: http::Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = http::Response<Bytes>> + Send + '_>> {
        let peer = peer.clone();
        Box::pin(async move { self.0.handle_control(&peer, request).await })
    }
}

/// Federation's transport: the gateway's tunnel.
#[derive(Debug)]
pub struct TunnelTransport(pub ControlClient);

impl ControlTransport for TunnelTransport {
    fn send(
        &self,
        addr: SocketAddr,
        td: &TrustDomain,
        request: http::Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<http::Response<Bytes>, String>> + Send + '_>> {
        let td = td.clone();
        Box::pin(async move {
            self.0
                .send(addr, &td, request)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn disconnect(&self, td: &TrustDomain) {
        self.0.disconnect(td);
    }
}

/// One gauge family: name, help, and its value for a link.
type Family = (
    &'static str,
    &'static str,
    fn(&meshgate_federation::LinkStatus) -> i64,
);

/// Federation link state on the gateway's `/metrics`, read at each scrape:
/// `meshgate_federation_link_up` (1 when synced), `meshgate_federation_link_expired` (1 when
/// the cached peer state expired and the peer fails closed), `meshgate_federation_sync_lag_seconds`
/// and `meshgate_federation_peer_bundle_sequence`, each labelled with the peer cluster.
///
/// It holds the federation weakly: the federation holds the gateway's tunnel, which holds
/// the metrics, so a strong reference here would be a cycle that never frees the state.
#[derive(Debug)]
pub struct FederationMetrics(std::sync::Weak<Federation>);

impl FederationMetrics {
    pub fn new(federation: &Arc<Federation>) -> Self {
        Self(Arc::downgrade(federation))
    }
}

impl prometheus_client::collector::Collector for FederationMetrics {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType;
        let Some(federation) = self.0.upgrade() else {
            return Ok(());
        };
        let links = federation.status(std::time::SystemTime::now());
        let families: [Family; 5] = [
            (
                "federation_link_up",
                "1 when the link to the peer is synced",
                |s| i64::from(s.state == "synced"),
            ),
            (
                "federation_link_expired",
                "1 when the peer's cached state expired and the peer fails closed",
                |s| i64::from(s.state == "expired"),
            ),
            (
                "federation_sync_lag_seconds",
                "Seconds since the last successful sync with the peer",
                |s| {
                    s.lag_seconds
                        .map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX))
                },
            ),
            (
                "federation_peer_bundle_sequence",
                "The peer bundle's spiffe_sequence held here",
                |s| i64::try_from(s.bundle_sequence).unwrap_or(i64::MAX),
            ),
            (
                "audit_witness_mismatch",
                "1 when the heads this peer holds of our decision log disagree with it (rolled back, truncated or rewritten); 0 when they agree; -1 before the first check",
                |s| s.witness_mismatch.map_or(-1, i64::from),
            ),
        ];
        for (name, help, value) in families {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for link in &links {
                let labels = [("peer", link.cluster.as_str())];
                family.encode_family(&labels)?.encode_gauge(&value(link))?;
            }
        }
        Ok(())
    }
}
