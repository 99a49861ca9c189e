//! Prometheus metrics of one gateway, served on the admin listener's `/metrics`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a request counted at enforcement.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `inbound` (from a peer gateway) or `outbound` (from a local workload).
    pub direction: &'static str,
    /// The caller's trust domain.
    pub source: String,
    /// The destination service (`service.namespace.cluster`), or `unknown`.
    pub destination: String,
    /// `allow`, `deny`, `quota_exceeded`, `error`, `unauthenticated`, `unknown_destination`.
    pub decision: &'static str,
    /// The HTTP status answered.
    pub status: u16,
}

impl RequestLabels {
    /// Labels of a request not yet decided (refused by default, until it is known better).
    pub(crate) fn new(direction: &'static str, source: &str) -> Self {
        Self {
            direction,
            source: source.to_owned(),
            destination: "unknown".to_owned(),
            decision: "deny",
            status: 0,
        }
    }
}

/// Labels of a traffic route's backend.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route's name.
    pub route: String,
    /// The backend it chose (`north/version=v2`).
    pub backend: String,
}

/// Labels of a route's answers by status class.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteClassLabels {
    /// The route's name.
    pub route: String,
    /// The backend it chose.
    pub backend: String,
    /// `2xx`, `3xx`, `4xx` or `5xx`.
    pub class: &'static str,
}

/// Labels of a mirror copy's fate.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    /// The route's name.
    pub route: String,
    /// The mirror backend.
    pub backend: String,
    /// `sent`, `refused` (4xx where it landed), `failed` (5xx), `unreachable`, a refusal
    /// here (`deny`, `quota_exceeded`, …), or `skipped_body` / `skipped_busy` when no copy
    /// was made.
    pub outcome: String,
}

/// Labels of a failed handshake.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `tunnel` or `workload`.
    pub listener: &'static str,
    /// A short reason.
    pub reason: String,
}

/// Labels with just a direction.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
}

/// A stage of a request's way through the gateway (`meshgate_stage_seconds_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Source: authenticating the caller and resolving the target.
    SourceAuthenticate,
    /// Either side: admission (hygiene, Cedar, quota), without writing the record.
    Admit,
    /// Either side: writing the decision record (durable in the log's mode).
    Record,
    /// Source: getting a stream to the peer gateway and sending the request head.
    TunnelOpen,
    /// Source: waiting for the peer gateway's response head.
    TunnelWait,
    /// Destination: verifying the caller's token or reference.
    DestCaller,
    /// Either side: an upstream attempt, until its response head.
    Upstream,
    /// Destination: sending the response head and body back over the tunnel.
    DestRespond,
}

impl Stage {
    const ALL: [Stage; 8] = [
        Stage::SourceAuthenticate,
        Stage::Admit,
        Stage::Record,
        Stage::TunnelOpen,
        Stage::TunnelWait,
        Stage::DestCaller,
        Stage::Upstream,
        Stage::DestRespond,
    ];

    fn name(self) -> &'static str {
        match self {
            Stage::SourceAuthenticate => "source_authenticate",
            Stage::Admit => "admit",
            Stage::Record => "record",
            Stage::TunnelOpen => "tunnel_open",
            Stage::TunnelWait => "tunnel_wait",
            Stage::DestCaller => "dest_caller",
            Stage::Upstream => "upstream",
            Stage::DestRespond => "dest_respond",
        }
    }
}

/// Labels of a stage counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// The stage's name.
    pub stage: &'static str,
}

/// Every metric of one gateway.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests by source, destination, decision and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency (through the gateway, until response headers), seconds.
    pub latency: Family<DirectionLabels, Histogram>,
    /// Requests refused by a quota.
    pub quota_rejections: Counter,
    /// Policy decisions' evaluation time, seconds.
    pub decision_seconds: Histogram,
    /// Open QUIC connections to and from peer gateways.
    pub quic_connections: Gauge,
    /// Open QUIC request streams.
    pub quic_streams: Gauge,
    /// Failed handshakes, by listener and reason.
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    /// Failures to write the decision log (requests refused, fail closed).
    pub decision_log_failures: Counter,
    /// Unauthenticated refusals answered without a record (per-source record limit).
    pub refusal_records_left_out: Counter,
    /// Unix time at which the gateway's SVID expires.
    pub svid_expiry: Gauge<f64, AtomicU64>,
    /// Upstream failures (connect, timeout, 5xx from the upstream).
    pub upstream_failures: Counter,
    /// Requests a traffic route took, by route and backend.
    pub route_requests: Family<RouteLabels, Counter>,
    /// Their answers by status class.
    pub route_responses: Family<RouteClassLabels, Counter>,
    /// Their latency until response headers, seconds.
    pub route_latency: Family<RouteLabels, Histogram>,
    /// Mirror copies by outcome.
    pub route_mirrors: Family<MirrorLabels, Counter>,
    /// Time spent per stage (seconds) and how often each ran, by [`Stage`] order.
    stage_time: Vec<Counter<f64, AtomicU64>>,
    stage_count: Vec<Counter>,
}

impl Metrics {
    /// Registers every metric under the `meshgate_` prefix.
    pub fn new() -> Self {
        Self::with_collectors(Vec::new())
    }

    /// Like [`Metrics::new`], plus collectors asked for their metrics at each scrape.
    pub fn with_collectors(
        collectors: Vec<Box<dyn prometheus_client::collector::Collector>>,
    ) -> Self {
        let mut registry = Registry::with_prefix("meshgate");
        for collector in collectors {
            registry.register_collector(collector);
        }
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by direction, source, destination, decision and status",
            requests.clone(),
        );
        let latency = Family::<DirectionLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time until response headers",
            latency.clone(),
        );
        let quota_rejections = Counter::default();
        registry.register(
            "quota_rejections",
            "Requests refused by a rate quota",
            quota_rejections.clone(),
        );
        let decision_seconds = Histogram::new(exponential_buckets(1e-6, 2.0, 20));
        registry.register(
            "policy_decision_seconds",
            "Cedar evaluation time",
            decision_seconds.clone(),
        );
        let quic_connections = Gauge::default();
        registry.register(
            "quic_connections",
            "Open QUIC connections with peer gateways",
            quic_connections.clone(),
        );
        let quic_streams = Gauge::default();
        registry.register(
            "quic_streams",
            "Open QUIC request streams",
            quic_streams.clone(),
        );
        let handshake_failures = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "handshake_failures",
            "Failed TLS/QUIC handshakes by reason",
            handshake_failures.clone(),
        );
        let refusal_records_left_out = Counter::default();
        registry.register(
            "refusal_records_left_out",
            "Unauthenticated refusals answered without a decision record (per-source record limit; the next record of the source counts them)",
            refusal_records_left_out.clone(),
        );
        let decision_log_failures = Counter::default();
        registry.register(
            "decision_log_failures",
            "Decision records that could not be written (the request was refused)",
            decision_log_failures.clone(),
        );
        let svid_expiry = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "svid_expiry_timestamp_seconds",
            "When the gateway's own SVID expires",
            svid_expiry.clone(),
        );
        let upstream_failures = Counter::default();
        registry.register(
            "upstream_failures",
            "Upstream connect errors, timeouts and 502-504",
            upstream_failures.clone(),
        );
        let route_requests = Family::<RouteLabels, Counter>::default();
        registry.register(
            "route_requests",
            "Requests a traffic route took, by route and backend",
            route_requests.clone(),
        );
        let route_responses = Family::<RouteClassLabels, Counter>::default();
        registry.register(
            "route_responses",
            "Answers to requests a traffic route took, by route, backend and status class",
            route_responses.clone(),
        );
        let route_latency = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "route_request_duration_seconds",
            "Time until response headers of requests a traffic route took",
            route_latency.clone(),
        );
        let route_mirrors = Family::<MirrorLabels, Counter>::default();
        registry.register(
            "route_mirrors",
            "Mirror copies by route, backend and outcome",
            route_mirrors.clone(),
        );
        let stage_seconds = Family::<StageLabels, Counter<f64, AtomicU64>>::default();
        registry.register(
            "stage_seconds",
            "Wall time spent in each stage of the request path",
            stage_seconds.clone(),
        );
        let stage_runs = Family::<StageLabels, Counter>::default();
        registry.register(
            "stage_runs",
            "How many times each stage of the request path ran",
            stage_runs.clone(),
        );
        let labels = |stage: Stage| StageLabels {
            stage: stage.name(),
        };
        let stage_time = Stage::ALL
            .iter()
            .map(|s| stage_seconds.get_or_create(&labels(*s)).clone())
            .collect();
        let stage_count = Stage::ALL
            .iter()
            .map(|s| stage_runs.get_or_create(&labels(*s)).clone())
            .collect();
        Self {
            stage_time,
            stage_count,
            registry,
            requests,
            latency,
            quota_rejections,
            decision_seconds,
            quic_connections,
            quic_streams,
            handshake_failures,
            decision_log_failures,
            refusal_records_left_out,
            svid_expiry,
            upstream_failures,
            route_requests,
            route_responses,
            route_latency,
            route_mirrors,
        }
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Adds the time one run of a stage took.
    pub(crate) fn stage(&self, stage: Stage, took: std::time::Duration) {
        let i = stage as usize;
        if let (Some(t), Some(c)) = (self.stage_time.get(i), self.stage_count.get(i)) {
            t.inc_by(took.as_secs_f64());
            c.inc();
        }
    }

    /// Counts one answered request and its latency.
    pub(crate) fn observe(&self, labels: RequestLabels, elapsed: std::time::Duration) {
        self.latency
            .get_or_create(&DirectionLabels {
                direction: labels.direction,
            })
            .observe(elapsed.as_secs_f64());
        self.requests.get_or_create(&labels).inc();
    }

    /// Counts one answered request a traffic route took.
    pub(crate) fn route_answered(
        &self,
        route: String,
        backend: String,
        status: u16,
        elapsed: std::time::Duration,
    ) {
        let class = match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let labels = RouteLabels { route, backend };
        self.route_requests.get_or_create(&labels).inc();
        self.route_latency
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        self.route_responses
            .get_or_create(&RouteClassLabels {
                route: labels.route,
                backend: labels.backend,
                class,
            })
            .inc();
    }

    /// Counts one mirror copy's outcome.
    pub(crate) fn route_mirror(&self, route: &str, backend: &str, outcome: &str) {
        self.route_mirrors
            .get_or_create(&MirrorLabels {
                route: route.to_owned(),
                backend: backend.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts a failed handshake.
    pub fn handshake_failed(&self, listener: &'static str, reason: impl Into<String>) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels {
                listener,
                reason: reason.into(),
            })
            .inc();
    }
}

/// The decision log's disk use on `/metrics`, read at each scrape:
/// `meshgate_audit_disk_bytes` and `meshgate_audit_disk_budget_bytes` (0: no budget). Alert
/// on their ratio before it reaches 1, when every request is refused. Holds the log weakly,
/// so a stopped gateway's metrics do not keep it open.
#[derive(Debug)]
pub(crate) struct AuditDisk(std::sync::Weak<meshgate_policy::DecisionLog>);

impl AuditDisk {
    pub(crate) fn new(log: &Arc<meshgate_policy::DecisionLog>) -> Self {
        Self(Arc::downgrade(log))
    }
}

impl prometheus_client::collector::Collector for AuditDisk {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::metrics::MetricType;
        let Some((used, budget)) = self.0.upgrade().and_then(|log| log.disk_usage()) else {
            return Ok(());
        };
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (name, help, value) in [
            (
                "audit_disk_bytes",
                "Bytes the decision log's segments take",
                used,
            ),
            (
                "audit_disk_budget_bytes",
                "The decision log's disk budget (audit.max_disk_mib); 0 when none. At it every request is refused",
                budget.unwrap_or(0),
            ),
        ] {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&gauge(value))?;
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}
