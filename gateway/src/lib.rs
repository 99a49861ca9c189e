//! The meshgate east-west gateway.
//!
//! Local workloads call the gateway's listeners (`source`); the gateway authenticates them,
//! finds the destination in the [`Catalog`], and either admits and forwards to a local service
//! or carries the request over the QUIC/HTTP3 tunnel to the destination's gateway with the
//! caller's identity (`inbound` there). On both sides the request goes through one admission
//! core (`admission`): a pure decision (hygiene, caller, target, Cedar, quota), its record
//! written to the decision log, and only then a `Permit`, which forwarding (`forward`, the one
//! retry layer) requires.

mod admin;
mod admission;
mod body;
mod caller;
mod catalog;
mod config;
mod connect;
mod dest;
mod forward;
mod gateway;
mod headers;
mod inbound;
mod lb;
mod metrics;
mod respond;
mod source;
mod strangers;
mod svid;
mod telemetry;
mod tls;
mod traffic;
mod tunnel;
mod upstream;

pub use caller::{CALLER_REF_HEADER, CALLER_TOKEN_HEADER, audience};
pub use catalog::{Catalog, ControlHandler, PeerRoute, Route, StaticCatalog};
pub use config::{
    AuditSettings, ConsoleAccess, ConsoleSettings, GatewayConfig, IdentitySettings, Limits,
    Listeners, PeerConfig, PolicyConfig, RuntimeSettings, ServiceConfig, ServiceProtocol,
    SubsetConfig, TelemetrySettings, WitnessCheck, parse_duration,
};
pub use dest::{Destination, DestinationError, Resolver};
pub use gateway::{BoundAddrs, Gateway, GatewayError, GatewayParts, Routes, RoutesReport};
pub use headers::{CALLER_HEADER, DECISION_ID_HEADER};
pub use metrics::Metrics;
pub use traffic::check_routes;
pub use traffic::config::{
    BackendConfig, FaultConfig, HeaderMatch, MirrorConfig, RetryConfig, RouteConfig, RouteMatch,
};
pub use tunnel::{ControlClient, ResetSecret, TunnelError};
pub use upstream::{UpstreamConfigError, UpstreamError};
