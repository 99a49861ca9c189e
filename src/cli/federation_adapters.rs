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
                } => meshgate_gateway::Route::Peer(PeerRoute {
                    cluster,
                    trust_domain,
                    gateways,
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
