//! The gateway's configuration: one TOML file per cluster, typed, unknown keys refused.
//!
//! Durations are written as humane strings (`"5s"`, `"250ms"`, `"1h"`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::traffic::config::RouteConfig;

/// A whole gateway configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// This cluster's name, e.g. `east`.
    pub cluster: String,
    /// This cluster's trust domain, e.g. `east.example`.
    pub trust_domain: String,
    /// The state directory (sled database, keys, admin socket).
    pub state_dir: PathBuf,
    /// The DNS suffix of mesh names (`orders.shop.west.mesh`).
    #[serde(default = "default_suffix")]
    pub mesh_suffix: String,
    /// Where the gateway listens.
    pub listeners: Listeners,
    /// Cedar policies and quotas.
    pub policy: PolicyConfig,
    /// Services in this cluster that the gateway forwards to.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// Peer clusters known statically (federation links add more at run time).
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Aliases: an authority (as a workload sends it) mapped to a mesh service name.
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    /// Traffic routes (`[[routes]]`): weighted backends, canaries, mirroring, faults,
    /// per-route timeouts and retries. Reloadable with `meshgate routes reload`.
    #[serde(default, deserialize_with = "crate::traffic::config::de_routes")]
    pub routes: Vec<RouteConfig>,
    /// Limits against abuse.
    #[serde(default)]
    pub limits: Limits,
    /// Identity settings.
    #[serde(default)]
    pub identity: IdentitySettings,
    /// The decision log.
    #[serde(default)]
    pub audit: AuditSettings,
    /// The process's async runtime.
    #[serde(default)]
    pub runtime: RuntimeSettings,
    /// How request paths are normalized before Cedar sees them.
    #[serde(default)]
    pub paths: PathSettings,
    /// Distributed traces (`[telemetry]`), off by default.
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    /// The web console, served on `listeners.console` when that is set.
    #[serde(default)]
    pub console: ConsoleSettings,
}

/// Spans of each request exported over OTLP/HTTP (protobuf) when `otlp_endpoint` is set.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// Where spans go, e.g. `http://127.0.0.1:4318/v1/traces` (an OpenTelemetry collector,
    /// Jaeger, Tempo). None: no spans are made.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of this gateway's spans (default `meshgate-<cluster>`).
    pub service_name: Option<String>,
    /// The share of new traces kept, 0–1; a trace a caller started keeps its caller's choice.
    pub sample_ratio: f64,
    /// How often batches of spans are sent.
    #[serde(deserialize_with = "de_duration")]
    pub export_interval: Duration,
    /// A trace viewer's page of one trace, `{trace_id}` replaced (e.g.
    /// `http://jaeger:16686/trace/{trace_id}`): the console links each decision to it.
    pub trace_url: Option<String>,
}

impl TelemetrySettings {
    /// Checks what is read only later (`trace_url`, used by the console).
    pub fn check(&self) -> Result<(), String> {
        if let Some(url) = &self.trace_url
            && (!(url.starts_with("http://") || url.starts_with("https://"))
                || !url.contains("{trace_id}"))
        {
            return Err(format!(
                "`telemetry.trace_url = \"{url}\"`: give an http(s) URL with `{{trace_id}}` where the trace id goes"
            ));
        }
        Ok(())
    }
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: None,
            sample_ratio: 1.0,
            export_interval: Duration::from_secs(1),
            trace_url: None,
        }
    }
}

/// The read-only web console (`[console]`); it runs only when `listeners.console` is set.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSettings {
    /// Who may connect: `"mtls"` (the default) or `"insecure_loopback"`.
    pub access: ConsoleAccess,
    /// A `.cedar` file of console policies (validated against the console schema). When
    /// absent, workloads of this trust domain's `audit` namespace may view every page.
    pub policy: Option<PathBuf>,
}

/// How the console authenticates its viewers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleAccess {
    /// HTTPS; the viewer presents an X.509-SVID of a trust domain this gateway trusts, and
    /// the console policy decides each page view.
    #[default]
    Mtls,
    /// Plain HTTP without authentication, on a loopback address only (a laptop): anyone who
    /// can open a connection on this machine reads the console.
    InsecureLoopback,
}

impl GatewayConfig {
    /// Checks the console settings against the listener address: the unauthenticated mode
    /// must listen on a loopback address.
    pub fn check_console(&self) -> Result<(), String> {
        match (self.listeners.console, self.console.access) {
            (Some(addr), ConsoleAccess::InsecureLoopback) if !addr.ip().is_loopback() => {
                Err(format!(
                    "`listeners.console = \"{addr}\"` is not a loopback address, but `console.access = \"insecure_loopback\"` serves the console without authentication; listen on 127.0.0.1 or ::1, or use `access = \"mtls\"`"
                ))
            }
            _ => Ok(()),
        }
    }
}

/// Path rules an operator may change (`[paths]`); the rest are fixed (see the README).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PathSettings {
    /// Accept paths that still hold `%25` followed by two hex digits after normalization.
    /// Refused by default: an upstream that decodes twice would read another path than the
    /// one the policies decided on. Only for upstreams that decode exactly once.
    pub allow_double_encoding: bool,
}

impl PathSettings {
    /// The policy engine's path rules.
    pub fn rules(&self) -> meshgate_policy::PathRules {
        meshgate_policy::PathRules::allowing_double_encoding(self.allow_double_encoding)
    }
}

/// The async runtime `meshgate gateway` runs on (`[runtime]`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSettings {
    /// Worker threads; 0 (the default) means one per CPU core.
    pub worker_threads: usize,
}

/// How the decision log is written (`[audit]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// `"process"`: a decision is written to the OS before its answer leaves (it survives the
    /// gateway being killed) and synced to disk within `sync_interval` (a power loss costs at
    /// most that window). `"power"`: a decision is synced to disk before its answer leaves
    /// (group commit; it survives power loss, and every request waits for a disk sync).
    pub durability: meshgate_policy::Durability,
    /// Process mode: the longest time between two disk syncs while decisions are written.
    #[serde(deserialize_with = "de_duration")]
    pub sync_interval: Duration,
    /// A log segment is closed past this many MiB (retention removes whole segments).
    pub segment_mib: u64,
    /// What to do when a peer holds heads of our log that disagree with it (it was rolled
    /// back, truncated or rewritten): `"warn"` (the default: an error line and
    /// `meshgate_audit_witness_mismatch{peer} 1`), or `"strict"`: also refuse to start.
    pub witness_check: WitnessCheck,
    /// The most MiB the log's segments may take; 0 (the default) for no budget. Past 80 % a
    /// warning is logged; at the budget every request is refused (fail closed) until old
    /// segments are pruned. `/metrics` has `meshgate_audit_disk_bytes` and
    /// `meshgate_audit_disk_budget_bytes` to alert on.
    pub max_disk_mib: u64,
}

/// What a disagreement between our log and a peer's witnessed heads does at start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WitnessCheck {
    /// Log it and set the metric.
    #[default]
    Warn,
    /// Also refuse to start.
    Strict,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            durability: meshgate_policy::Durability::Process,
            sync_interval: Duration::from_millis(10),
            segment_mib: 64,
            witness_check: WitnessCheck::Warn,
            max_disk_mib: 0,
        }
    }
}

impl AuditSettings {
    /// The decision log's options.
    pub fn log_options(&self) -> meshgate_policy::LogOptions {
        meshgate_policy::LogOptions {
            durability: self.durability,
            sync_interval: self.sync_interval,
            segment_bytes: self.segment_mib.max(1) << 20,
            max_disk_bytes: (self.max_disk_mib > 0)
                .then_some(self.max_disk_mib.saturating_mul(1 << 20)),
        }
    }
}

/// Listener addresses. Port 0 picks a free port (tests).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listeners {
    /// Workload-facing TLS listener (HTTP/1.1, HTTP/2, gRPC, CONNECT); callers present SVIDs.
    pub workload: SocketAddr,
    /// Optional plaintext (HTTP/1.1 + h2c) listener on a loopback address; callers present a
    /// JWT-SVID bearer token. Refused at start if the address is not loopback.
    #[serde(default)]
    pub workload_local: Option<SocketAddr>,
    /// The QUIC listener peer gateways connect to.
    pub tunnel: SocketAddr,
    /// Metrics, health and readiness (`/metrics`, `/healthz`, `/readyz`).
    pub admin: SocketAddr,
    /// The issuer API (attest, renew, JWT, bundle).
    #[serde(default)]
    pub issuer: Option<SocketAddr>,
    /// DNS names put into the listener certificate, so standard clients verify it.
    #[serde(default = "default_dns_names")]
    pub dns_names: Vec<String>,
    /// IP addresses put into the listener certificate.
    #[serde(default = "default_ip_addrs")]
    pub ip_addrs: Vec<IpAddr>,
    /// The mesh DNS server (UDP and TCP) answering the `mesh_suffix` zone (federation).
    #[serde(default)]
    pub dns: Option<SocketAddr>,
    /// The read-only web console (see `[console]`); off when absent.
    #[serde(default)]
    pub console: Option<SocketAddr>,
}

/// Policy settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of `.cedar` files that are enforced.
    pub dir: PathBuf,
    /// Directory of shadow (dry-run) policies, evaluated but never enforced.
    #[serde(default)]
    pub shadow_dir: Option<PathBuf>,
    /// Optional schema file; the shipped mesh schema when absent.
    #[serde(default)]
    pub schema: Option<PathBuf>,
    /// Quota for permits without a `@quota` annotation, e.g. `"100/s burst 20"`.
    #[serde(default)]
    pub default_quota: Option<String>,
}

/// One local service.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Service name, e.g. `orders`.
    pub name: String,
    /// Namespace, e.g. `shop`.
    pub namespace: String,
    /// Upstream endpoints (`host:port`).
    pub endpoints: Vec<String>,
    /// Expected SPIFFE ID of the upstream: the hop uses mTLS when set.
    #[serde(default)]
    pub upstream_spiffe_id: Option<String>,
    /// Allows plaintext to non-loopback endpoints. Dangerous: traffic leaves unencrypted.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Peer clusters this service is exported to (`"*"` for every peer).
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Labels, visible to Cedar as `resource.labels`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Per-try timeout of a request to this service.
    #[serde(default = "default_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Retries for idempotent requests without a body that enter the mesh here: on 502–504,
    /// a failed connection or a broken stream, not on a timeout (a traffic route's `retry`
    /// can say otherwise).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// What the service speaks: `http` (the default; `CONNECT` to it is refused, so every
    /// request is seen and decided) or `tcp` (only `CONNECT`; plain HTTP to it is refused).
    #[serde(default)]
    pub protocol: ServiceProtocol,
    /// For a `tcp` service: begin each connection to the upstream with a PROXY protocol v2
    /// header carrying the verified caller's SPIFFE ID (TLV `0xE1`) and the decision id (TLV
    /// `0xE2`), so the upstream learns who connected. Off by default.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Subsets of the service's endpoints, told apart by labels, for traffic routes to
    /// pick (`subset = { version = "v2" }`). Requests that name no subset go to
    /// `endpoints`.
    #[serde(default)]
    pub subsets: Vec<SubsetConfig>,
}

/// Endpoints of a service that carry more labels than the service (e.g. a new version).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SubsetConfig {
    /// Labels added to the service's (Cedar sees both on `resource`).
    pub labels: BTreeMap<String, String>,
    /// Upstream endpoints (`host:port`).
    pub endpoints: Vec<String>,
}

/// What a service speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceProtocol {
    /// HTTP/1.1, HTTP/2 or gRPC: every request is decided on its own.
    #[default]
    Http,
    /// Raw TCP through `CONNECT`: decided once per connection with the `connect` action.
    Tcp,
}

/// A statically configured peer cluster.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The peer's cluster name.
    pub cluster: String,
    /// The peer's trust domain.
    pub trust_domain: String,
    /// The peer gateways' QUIC addresses.
    #[serde(default)]
    pub gateways: Vec<SocketAddr>,
    /// A DNS name for the peer gateways instead of (or besides) addresses: SRV first, then
    /// A/AAAA (`name:port` gives the port for A/AAAA answers).
    #[serde(default)]
    pub dns: Option<String>,
    /// The peer's trust bundle (SPIFFE JSON), the bootstrap trust anchor.
    pub bundle: PathBuf,
    /// Services the peer exports to us, as `service.namespace`.
    #[serde(default)]
    pub services: Vec<String>,
    /// Lower is preferred when a service is exported by several clusters.
    #[serde(default)]
    pub priority: u32,
    /// Services (`service.namespace`) this peer may serve under their unpinned name
    /// (`<svc>.<ns>.mesh`): the clusters that share a name are this side's choice, never the
    /// exporter's. Without it the peer serves only `<svc>.<ns>.<cluster>.mesh`.
    #[serde(default)]
    pub shared: Vec<String>,
    /// Services of this peer that receive the caller's `Authorization` and `Cookie` headers;
    /// to every other service of the peer they are not forwarded.
    #[serde(default)]
    pub credentials: Vec<String>,
}

/// Limits against abuse, each with a sane default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request head (HTTP/1.1 buffer, HTTP/2 header list, HTTP/3 field section).
    pub max_header_bytes: usize,
    /// Time allowed to send a complete request head (slowloris).
    #[serde(deserialize_with = "de_duration")]
    pub header_read_timeout: Duration,
    /// Idle workload connections are closed after this long.
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// A peer gateway that answers nothing (not even keep-alives, sent every quarter of
    /// this) for this long is declared dead: its connection closes, requests on it fail at
    /// once and fail over, instead of waiting out their timeouts.
    #[serde(deserialize_with = "de_duration")]
    pub peer_dead_after: Duration,
    /// Concurrent workload connections per listener.
    pub max_connections: usize,
    /// Concurrent streams per HTTP/2 connection and per peer QUIC connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 streams reset before being accepted (rapid-reset protection).
    pub max_pending_resets: usize,
    /// How long graceful shutdown waits for requests in flight.
    #[serde(deserialize_with = "de_duration")]
    pub drain_timeout: Duration,
    /// How long the source gateway waits for a peer gateway's response head (the peer's
    /// own per-service timeouts apply behind it); then the caller gets 504.
    #[serde(deserialize_with = "de_duration")]
    pub tunnel_timeout: Duration,
    /// Retries of an idempotent, body-less request to a service in another cluster (on a
    /// broken stream or a 502/503/504 answer, each to the next gateway), within the retry
    /// budget. Local services use their own `retries`.
    pub remote_retries: u32,
    /// Time a peer gateway has to send a whole `/.meshgate/` control request body.
    #[serde(deserialize_with = "de_duration")]
    pub control_read_timeout: Duration,
    /// Control requests one peer trust domain may have in progress at once (over all its
    /// connections); more are answered 503 at once.
    pub max_control_requests_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            peer_dead_after: Duration::from_secs(8),
            max_connections: 10_000,
            max_concurrent_streams: 1024,
            max_pending_resets: 20,
            drain_timeout: Duration::from_secs(10),
            tunnel_timeout: Duration::from_secs(30),
            remote_retries: 2,
            control_read_timeout: Duration::from_secs(10),
            max_control_requests_per_peer: 8,
        }
    }
}

/// Identity settings of the gateway.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentitySettings {
    /// Lifetime of the gateway's own SVID; it is renewed at half its lifetime.
    #[serde(deserialize_with = "de_duration")]
    pub svid_ttl: Duration,
    /// Lifetime of caller JWT-SVIDs minted for the tunnel hop.
    #[serde(deserialize_with = "de_duration")]
    pub caller_jwt_ttl: Duration,
    /// Clock-skew leeway when verifying JWT-SVIDs.
    #[serde(deserialize_with = "de_duration")]
    pub jwt_leeway: Duration,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            svid_ttl: Duration::from_secs(3600),
            caller_jwt_ttl: Duration::from_secs(300),
            jwt_leeway: Duration::from_secs(30),
        }
    }
}

fn default_suffix() -> String {
    "mesh".to_owned()
}
fn default_dns_names() -> Vec<String> {
    vec!["localhost".to_owned()]
}
fn default_ip_addrs() -> Vec<IpAddr> {
    vec![IpAddr::from([127, 0, 0, 1])]
}
fn default_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_retries() -> u32 {
    2
}

/// Parses `"1500ms"`, `"5s"`, `"2m"`, `"1h"` (one number and one unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        format!("invalid duration `{text}`: expected a number and a unit, like `5s`")
    })?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        other => {
            return Err(format!(
                "invalid duration unit `{other}` in `{text}`: use ms, s, m, h or d"
            ));
        }
    };
    if !seconds.is_finite() || !(0.0..=10.0 * 365.0 * 86_400.0).contains(&seconds) {
        return Err(format!("duration `{text}` is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn de_duration<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(de)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_reject() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").unwrap_err().contains("unit"));
        assert!(parse_duration("s").unwrap_err().contains("number"));
        assert!(parse_duration("5 weeks").is_err());
        assert!(
            parse_duration("99999999999h")
                .unwrap_err()
                .contains("out of range")
        );
    }
}
