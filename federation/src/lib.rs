//! Federation for meshgate: links between clusters with independent roots of trust.
//!
//! - [`Federation`] holds the links of one cluster and the last known state of each peer
//!   (bundle, exported services, gateway endpoints, witnessed checkpoint heads), persisted
//!   in sled trees prefixed `federation.` so a restart during a partition keeps serving from
//!   cache until the cached bundle expires, then fails closed for that peer.
//! - It exchanges bundles, catalogs, endpoints and checkpoint heads with peer gateways over
//!   the tunnel ([`ControlTransport`]; the paths are in [`control`]), accepting a bundle only
//!   from the authenticated gateway of its own trust domain and only with a higher
//!   `spiffe_sequence` ([`rules::accept_bundle`]).
//! - It is the federated catalog: [`Federation::routes`] (local first, then peers ranked by
//!   health, priority and latency), [`Federation::exported_to`], [`Federation::cluster_of`].
//!   The gateway's traits are implemented in the root crate over these (crate edges:
//!   neither `gateway` nor `federation` depends on the other).
//! - [`MeshDns`] serves the mesh zone with hickory-server; [`discovery`] finds peer gateways
//!   with hickory-resolver; [`witness`] checks a decision log against heads held by peers;
//!   new heads are pushed to peers within a second, and each gateway checks its own log
//!   against what its peers hold ([`Federation::check_witness`]).
//!
//! Decisions (bundle acceptance, freshness, ranking, backoff) live in [`rules`], free of
//! I/O, with `now` passed in.

pub mod control;
pub mod discovery;
mod dns;
mod error;
mod federation;
mod link;
pub mod rules;
mod status;
mod store;
mod sync;
pub mod witness;
mod witnessing;

#[cfg(test)]
mod control_fuzz;

pub use dns::{MESH_TTL, MeshDns, zone_records};
pub use error::FederationError;
pub use federation::{
    ControlTransport, Federation, FederationOptions, FederationParts, LocalCluster, Route,
};
pub use link::{Link, PeerState, bundle_not_after};
pub use status::{LinkStatus, link_status, status_from_db};
pub use store::Store;
pub use witnessing::{PUSH_EVERY, SELF_CHECK_EVERY, WitnessAck};
