//! The meshgate east-west gateway.
//!
//! Local workloads call the gateway's listeners ([`outbound`](crate)); the gateway
//! authenticates them, finds the destination in the [`Catalog`], and either enforces and
//! forwards locally or carries the request over the QUIC/HTTP3 tunnel to the destination's
//! gateway with the caller's identity as a JWT-SVID. Inbound, every request is enforced by
//! [`Enforcer::enforce`]: decide (Cedar) → charge the quota → record (durable) → forward or
//! refuse.

mod admin;
mod body;
mod caller;
mod catalog;
mod config;
mod connect;
mod dest;
mod enforce;
mod gateway;
mod headers;
mod inbound;
mod lb;
mod metrics;
mod outbound;
mod respond;
mod svid;
mod tls;
mod tunnel;
mod upstream;

pub use caller::{CALLER_TOKEN_HEADER, audience};
pub use catalog::{Catalog, ControlHandler, PeerRoute, Route, StaticCatalog};
pub use config::{
    AuditSettings, GatewayConfig, IdentitySettings, Limits, Listeners, PeerConfig, PolicyConfig,
    ServiceConfig, parse_duration,
};
pub use dest::{Destination, DestinationError, Resolver};
pub use enforce::{Enforced, Enforcer, RequestMeta, Verdict};
pub use gateway::{BoundAddrs, Gateway, GatewayError, GatewayParts};
pub use headers::{CALLER_HEADER, DECISION_ID_HEADER};
pub use metrics::Metrics;
pub use tunnel::{ControlClient, TunnelError};
pub use upstream::{UpstreamConfigError, UpstreamError};
