//! Admission: the one place a request is let in or refused.
//!
//! [`Admission::admit`] is a pure function of what the listener verified (the hop, the
//! caller, the target) and the request head, with the time passed in: it checks the request's
//! hygiene, who is calling, where to, asks Cedar, charges the quota, and returns a [`Decided`]
//! — a permit or a refusal, each with the decision record to write. [`Admission::record`]
//! writes that record (durable in the log's mode before anything is answered or forwarded)
//! and only then hands out the [`Permit`]: the one value forwarding accepts. A `Permit`
//! cannot be made anywhere else, cannot be cloned, and its fields are private, so no code
//! path can forward a request that was not admitted and recorded. Refusals made on either
//! side, for any reason, are built and recorded here too.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::StatusCode;
use meshgate_identity::{SpiffeId, TrustDomain};
use meshgate_policy::{
    Decision, DecisionKind, DecisionLog, DecisionRecordInput, PolicyEngine, QuotaLimiter,
    QuotaResult, RequestFacts, TrafficNote, normalize_path_with,
};

use crate::catalog::PeerRoute;
use crate::config::ServiceProtocol;
use crate::dest::Destination;
use crate::headers;
use crate::metrics::Metrics;
use crate::strangers::{Strangers, Verdict, cap_request};
use crate::traffic::Fault;
use crate::upstream::LocalService;

/// Ids that travel with a request: its decision id and W3C trace id.
#[derive(Debug, Clone)]
pub(crate) struct RequestMeta {
    /// The decision id, returned as `x-meshgate-decision-id`.
    pub id: String,
    /// The W3C trace id.
    pub trace_id: String,
    /// The client's address, for requests from workload listeners.
    pub source: Option<std::net::IpAddr>,
    /// How a traffic route steered the request, for its record.
    pub traffic: Option<TrafficNote>,
}

impl RequestMeta {
    /// A fresh decision id, and the trace id of the request's `traceparent` (created if
    /// missing or malformed).
    pub(crate) fn new(headers: &mut http::HeaderMap) -> Self {
        Self {
            trace_id: headers::ensure_traceparent(headers),
            id: headers::new_request_id(),
            source: None,
            traffic: None,
        }
    }
}

/// The caller of a workload request until it is verified.
const UNAUTHENTICATED: &str = "unauthenticated";

/// The hop a request arrived on, as the listener authenticated it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Hop<'a> {
    /// From a local workload, on a workload listener of this gateway.
    Workload,
    /// From a peer gateway over the tunnel (its gateway SVID verified), of `cluster`.
    Peer {
        gateway: &'a SpiffeId,
        cluster: Option<&'a str>,
    },
}

/// A verified caller: who, and whether it presented its X.509-SVID (mTLS) to its gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    pub id: SpiffeId,
    pub mtls: bool,
}

/// Where an admitted request goes.
#[derive(Debug)]
pub(crate) enum Target {
    /// A service of this cluster.
    Local(Arc<LocalService>),
    /// A service in peer clusters, best first (the destination's gateway decides).
    Remote {
        dest: Destination,
        routes: Vec<PeerRoute>,
    },
}

/// Why a request is refused before Cedar is asked, with the status to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unfit {
    pub status: StatusCode,
    /// The metrics label: `unauthenticated`, `unknown_destination`, `deny` or `error`.
    pub label: &'static str,
    /// What the caller is told (and the record keeps).
    pub reason: String,
}

impl Unfit {
    pub(crate) fn new(status: StatusCode, label: &'static str, reason: impl Into<String>) -> Self {
        Self {
            status,
            label,
            reason: reason.into(),
        }
    }
}

/// Everything admission looks at. The listener fills it in from what it verified.
#[derive(Debug)]
pub(crate) struct Ask<'a> {
    pub meta: &'a RequestMeta,
    pub hop: Hop<'a>,
    pub head: &'a http::request::Parts,
    /// The authority the request named (for the record when no target was found).
    pub authority: Option<&'a str>,
    pub caller: Result<Caller, Unfit>,
    pub target: Result<Target, Unfit>,
    /// The fault a traffic route injects into this request, applied if it is admitted.
    pub fault: Option<&'a Fault>,
}

/// Reserved control paths never travel to a service (CONTRACTS.md), in any spelling.
fn reserved(head: &http::request::Parts) -> Option<Unfit> {
    headers::is_reserved_path(head.uri.path()).then(|| {
        Unfit::new(
            StatusCode::FORBIDDEN,
            "deny",
            "`/.meshgate/` paths are reserved for gateways",
        )
    })
}

/// The current time, as admission needs it: wall clock for policies and records, the
/// monotonic clock for quotas.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub wall: SystemTime,
    pub mono: Instant,
}

impl Now {
    pub(crate) fn current() -> Self {
        Self {
            wall: SystemTime::now(),
            mono: Instant::now(),
        }
    }
}

/// The outcome of admission, before its record is written.
#[derive(Debug)]
pub(crate) struct Decided {
    outcome: Result<Granted, Refusal>,
    record: Option<DecisionRecordInput>,
}

/// What a permit allows, before it is recorded.
#[derive(Debug)]
struct Granted {
    decision_id: String,
    trace_id: String,
    caller: Caller,
    target: Target,
    /// The normalized path Cedar decided on (local targets); the upstream gets exactly it.
    path: Option<String>,
    /// An injected delay to wait out before forwarding.
    delay: Option<Duration>,
}

/// The right to forward one request, given only after its decision is recorded.
#[derive(Debug)]
pub(crate) struct Permit(Granted);

impl Permit {
    pub(crate) fn decision_id(&self) -> &str {
        &self.0.decision_id
    }

    pub(crate) fn caller(&self) -> &Caller {
        &self.0.caller
    }

    pub(crate) fn target(&self) -> &Target {
        &self.0.target
    }

    /// The path the upstream must see (what was authorized), when decided here.
    pub(crate) fn path(&self) -> Option<&str> {
        self.0.path.as_deref()
    }

    /// The delay a traffic route injected (recorded with the decision).
    pub(crate) fn delay(&self) -> Option<Duration> {
        self.0.delay
    }
}

/// A refused request: what to answer, with the id of its decision record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub status: StatusCode,
    /// The metrics label: `deny`, `quota_exceeded`, `unauthenticated`,
    /// `unknown_destination` or `error`.
    pub label: &'static str,
    pub message: String,
    pub retry_after: Option<Duration>,
    pub decision_id: String,
}

/// Policy, quotas and the decision log of one gateway.
#[derive(Debug)]
pub(crate) struct Admission {
    cluster: String,
    trust_domain: TrustDomain,
    policy: Arc<PolicyEngine>,
    quotas: QuotaLimiter,
    log: Arc<DecisionLog>,
    metrics: Arc<Metrics>,
    /// The quota clock's origin.
    started: Instant,
    /// The gateway's own SPIFFE ID (the source gateway of local requests).
    id: SpiffeId,
    /// Per-source budgets of unauthenticated refusal records.
    strangers: Strangers,
}

impl Admission {
    pub(crate) fn new(
        id: SpiffeId,
        cluster: String,
        policy: Arc<PolicyEngine>,
        quotas: QuotaLimiter,
        log: Arc<DecisionLog>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            cluster,
            trust_domain: id.trust_domain().clone(),
            policy,
            quotas,
            log,
            metrics,
            started: Instant::now(),
            id,
            strangers: Strangers::default(),
        }
    }

    pub(crate) fn policy(&self) -> &Arc<PolicyEngine> {
        &self.policy
    }

    /// Decides one request (no I/O): hygiene → caller → target → Cedar → quota.
    pub(crate) fn admit(&self, ask: Ask<'_>, now: Now) -> Decided {
        let head = ask.head;
        let (service, labels) = match &ask.target {
            Ok(Target::Local(svc)) => (svc.in_cluster(&self.cluster), svc.labels().clone()),
            Ok(Target::Remote { dest, .. }) => (dest.to_string(), Default::default()),
            // Only a name this gateway resolved becomes a label or a record's resource.
            Err(_) => (String::from("unknown"), Default::default()),
        };
        let mut facts = self.facts(ask.hop, head, service, labels, now.wall);
        if ask.target.is_err()
            && let Some(authority) = ask.authority
        {
            facts.service = authority.chars().take(256).collect();
        }
        let caller = match ask.caller {
            Ok(c) => {
                facts.caller = c.id.to_string();
                facts.mtls = c.mtls;
                Ok(c)
            }
            Err(e) => Err(e),
        };
        // Hygiene first: what Cedar would see must be what is forwarded.
        if let Err(e) = headers::check_values(&head.headers) {
            return self.refuse(
                ask.meta,
                ask.hop,
                facts,
                Unfit::new(StatusCode::BAD_REQUEST, "deny", e),
            );
        }
        if matches!(ask.hop, Hop::Workload)
            && let Err(e) = headers::check_framing(&head.headers)
        {
            let unfit = Unfit::new(StatusCode::BAD_REQUEST, "deny", e.to_string());
            return self.refuse(ask.meta, ask.hop, facts, unfit);
        }
        // A workload learns nothing about destinations before it authenticates; a peer
        // gateway is authenticated by its connection, and its caller's token is checked
        // against the target's audience, so the target comes first there.
        let (caller, target) = match ask.hop {
            Hop::Workload => {
                let caller = match caller {
                    Ok(c) => c,
                    Err(unfit) => return self.refuse(ask.meta, ask.hop, facts, unfit),
                };
                if let Some(unfit) = reserved(head) {
                    return self.refuse(ask.meta, ask.hop, facts, unfit);
                }
                match ask.target {
                    Ok(t) => (caller, t),
                    Err(unfit) => return self.refuse(ask.meta, ask.hop, facts, unfit),
                }
            }
            Hop::Peer { .. } => {
                if let Some(unfit) = reserved(head) {
                    return self.refuse(ask.meta, ask.hop, facts, unfit);
                }
                let target = match ask.target {
                    Ok(t) => t,
                    Err(unfit) => return self.refuse(ask.meta, ask.hop, facts, unfit),
                };
                match caller {
                    Ok(c) => (c, target),
                    Err(unfit) => return self.refuse(ask.meta, ask.hop, facts, unfit),
                }
            }
        };
        // What a service speaks decides what reaches it: a tunnel into an HTTP service would
        // carry requests no policy saw; plain HTTP to a TCP service bypasses `connect`.
        if let Target::Local(svc) = &target {
            let connect = head.method == http::Method::CONNECT;
            let wrong = match (svc.protocol(), connect) {
                (ServiceProtocol::Http, true) => Some(
                    "is an HTTP service: `CONNECT` to it is refused (every request to it is decided on its own)",
                ),
                (ServiceProtocol::Tcp, false) => {
                    Some("is a TCP service: reach it with `CONNECT` only")
                }
                _ => None,
            };
            if let Some(why) = wrong {
                let unfit = Unfit::new(
                    StatusCode::FORBIDDEN,
                    "deny",
                    format!("`{}` {why}", facts.service),
                );
                return self.refuse(ask.meta, ask.hop, facts, unfit);
            }
        }
        if let Target::Remote { .. } = target {
            // Decided by the destination's gateway; nothing to record here but a fault.
            let granted = Granted {
                decision_id: ask.meta.id.clone(),
                trace_id: ask.meta.trace_id.clone(),
                caller,
                target,
                path: None,
                delay: None,
            };
            return match ask.fault {
                Some(fault) => {
                    let mut record =
                        self.record_of(ask.meta, ask.hop, &facts, &self.undecided(&facts));
                    // Cedar was not asked here: nothing for `policy replay` to re-decide.
                    record.facts = None;
                    record.policy_version.clear();
                    self.inject(ask.meta, fault, granted, record)
                }
                None => Decided {
                    outcome: Ok(granted),
                    record: None,
                },
            };
        }
        let decision = self.policy.decide(&facts);
        self.metrics
            .decision_seconds
            .observe(decision.eval_time.as_secs_f64());
        let mut record = self.record_of(ask.meta, ask.hop, &facts, &decision);
        if !decision.allowed {
            let reason = if decision.errors.is_empty() {
                match decision.reasons.as_slice() {
                    [] => "no policy permits this request".to_owned(),
                    ids => format!("forbidden by policy {}", ids.join(", ")),
                }
            } else {
                "policy evaluation failed".to_owned()
            };
            record.status = Some(StatusCode::FORBIDDEN.as_u16());
            return Decided {
                outcome: Err(Refusal {
                    status: StatusCode::FORBIDDEN,
                    label: "deny",
                    message: format!("meshgate: denied: {reason}"),
                    retry_after: None,
                    decision_id: ask.meta.id.clone(),
                }),
                record: Some(record),
            };
        }
        if let Some(spec) = decision.quota.as_ref().or(self.quotas.default_spec()) {
            let key = spec.key_for(&facts.caller, &facts.service);
            let result =
                self.quotas
                    .check(&key, spec, now.mono.saturating_duration_since(self.started));
            record.quota_key = Some(key);
            match result {
                QuotaResult::Exceeded { retry_after } => {
                    self.metrics.quota_rejections.inc();
                    record.decision = DecisionKind::QuotaExceeded;
                    record.quota_remaining = Some(0);
                    record.status = Some(StatusCode::TOO_MANY_REQUESTS.as_u16());
                    return Decided {
                        outcome: Err(Refusal {
                            status: StatusCode::TOO_MANY_REQUESTS,
                            label: "quota_exceeded",
                            message: "meshgate: rate quota exceeded".to_owned(),
                            retry_after: Some(retry_after),
                            decision_id: ask.meta.id.clone(),
                        }),
                        record: Some(record),
                    };
                }
                QuotaResult::Allowed { remaining } => record.quota_remaining = Some(remaining),
                _ => record.quota_remaining = Some(0),
            }
        }
        // 200 stands for "forwarded": the upstream's status is not known when recording.
        record.status = Some(200);
        let granted = Granted {
            decision_id: ask.meta.id.clone(),
            trace_id: ask.meta.trace_id.clone(),
            caller,
            target,
            path: Some(decision.normalized_path),
            delay: None,
        };
        match ask.fault {
            Some(fault) => self.inject(ask.meta, fault, granted, record),
            None => Decided {
                outcome: Ok(granted),
                record: Some(record),
            },
        }
    }

    /// An admitted request a traffic route injects a fault into: recorded as `fault`; an
    /// abort becomes the answer, a delay is waited out before forwarding.
    fn inject(
        &self,
        meta: &RequestMeta,
        fault: &Fault,
        mut granted: Granted,
        mut record: DecisionRecordInput,
    ) -> Decided {
        record.decision = DecisionKind::Fault;
        record
            .traffic
            .get_or_insert_with(TrafficNote::default)
            .fault = Some(fault.describe());
        let Some(status) = fault.abort else {
            granted.delay = fault.delay;
            return Decided {
                outcome: Ok(granted),
                record: Some(record),
            };
        };
        record.status = Some(status.as_u16());
        let route = meta
            .traffic
            .as_ref()
            .and_then(|t| t.route.as_deref())
            .unwrap_or_default();
        Decided {
            outcome: Err(Refusal {
                status,
                label: "fault",
                message: format!(
                    "meshgate: fault injected by route `{route}`: {}",
                    fault.describe()
                ),
                retry_after: None,
                decision_id: meta.id.clone(),
            }),
            record: Some(record),
        }
    }

    /// The decision of a request Cedar was not asked about.
    fn undecided(&self, facts: &RequestFacts) -> Decision {
        Decision {
            allowed: false,
            reasons: Vec::new(),
            errors: Vec::new(),
            policy_version: self.policy.version().to_string(),
            eval_time: Duration::ZERO,
            shadow: None,
            quota: None,
            normalized_path: normalize_path_with(&facts.raw_path, self.policy.path_rules())
                .unwrap_or_default(),
            evaluation_failed: false,
        }
    }

    /// Writes the decision's record (durable in the log's mode) and returns the permit, or
    /// the refusal. A record that cannot be written refuses the request (fail closed).
    pub(crate) async fn record(&self, decided: Decided) -> Result<Permit, Refusal> {
        let Decided { outcome, record } = decided;
        if let Some(record) = record
            && let Err(error) = self.log.append_durable(&record).await
        {
            self.metrics.decision_log_failures.inc();
            let id = record.id.unwrap_or_default();
            tracing::error!(%error, decision_id = %id, "decision log write failed; refusing the request");
            return Err(Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                label: "error",
                message: "meshgate: refused: the decision could not be recorded".to_owned(),
                retry_after: None,
                decision_id: id,
            });
        }
        outcome.map(Permit)
    }

    /// Records a request the HTTP layer refused before the gateway could read it (ambiguous
    /// framing, a malformed request line or header, headers over the limit): hyper answered
    /// it (400, 431) and closed the connection; the record says who, when and why.
    pub(crate) async fn record_unreadable(
        &self,
        source: std::net::IpAddr,
        caller: Option<&SpiffeId>,
        status: StatusCode,
        reason: String,
    ) {
        let (mut head, ()) = http::Request::new(()).into_parts();
        let mut meta = RequestMeta::new(&mut head.headers);
        meta.source = Some(source);
        let mut facts = self.facts(
            Hop::Workload,
            &head,
            String::from("unknown"),
            Default::default(),
            SystemTime::now(),
        );
        facts.method = String::new();
        facts.raw_path = String::new();
        if let Some(id) = caller {
            facts.caller = id.to_string();
        }
        let decided = self.refuse(
            &meta,
            Hop::Workload,
            facts,
            Unfit::new(status, "deny", reason),
        );
        // A log failure is counted and logged by `record`; the client already has its answer.
        let _ = self.record(decided).await;
    }

    /// Records a failure after admission (no gateway of the destination reachable) and
    /// returns its refusal.
    pub(crate) async fn fail(
        &self,
        permit: Permit,
        head: &http::request::Parts,
        reason: String,
    ) -> Refusal {
        let Granted {
            decision_id,
            trace_id,
            caller,
            target,
            ..
        } = permit.0;
        let meta = RequestMeta {
            id: decision_id,
            trace_id,
            source: None,
            traffic: None,
        };
        let service = match &target {
            Target::Local(svc) => svc.in_cluster(&self.cluster),
            Target::Remote { dest, .. } => dest.to_string(),
        };
        let mut facts = self.facts(
            Hop::Workload,
            head,
            service,
            Default::default(),
            SystemTime::now(),
        );
        facts.caller = caller.id.to_string();
        facts.mtls = caller.mtls;
        let unfit = Unfit::new(StatusCode::SERVICE_UNAVAILABLE, "error", reason);
        let decided = self.refuse(&meta, Hop::Workload, facts, unfit);
        match self.record(decided).await {
            Err(refusal) => refusal,
            // `refuse` never grants.
            Ok(_) => Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                label: "error",
                message: "meshgate: refused".to_owned(),
                retry_after: None,
                decision_id: meta.id,
            },
        }
    }

    /// A refusal made before Cedar was asked, with its record.
    fn refuse(
        &self,
        meta: &RequestMeta,
        hop: Hop<'_>,
        facts: RequestFacts,
        unfit: Unfit,
    ) -> Decided {
        let decision = self.undecided(&facts);
        // A stranger (no verified caller yet) can cause these at will: its records are
        // limited per source address, and what any refusal before Cedar keeps of the request
        // is capped.
        let verdict = match (hop, meta.source) {
            (Hop::Workload, Some(ip)) if facts.caller == UNAUTHENTICATED => {
                self.strangers.check(ip, facts.time)
            }
            _ => Verdict::Record {
                left_out: 0,
                since: None,
            },
        };
        let mut record = self.record_of(meta, hop, &facts, &decision);
        record.decision = if unfit.label == "error" {
            DecisionKind::Error
        } else {
            DecisionKind::Deny
        };
        record.errors = vec![unfit.reason.clone()];
        record.status = Some(unfit.status.as_u16());
        if let Some(kept) = record.facts.as_mut() {
            let mut path = std::mem::take(&mut kept.raw_path);
            if let Some(note) = cap_request(&mut kept.headers, &mut path) {
                record.errors.push(note);
            }
            record.raw_path = path.clone();
            kept.raw_path = path;
        }
        let (record, decision_id) = match verdict {
            Verdict::LeaveOut => {
                self.metrics.refusal_records_left_out.inc();
                (None, String::new())
            }
            Verdict::Record { left_out, since } => {
                if left_out > 0 {
                    let since = since.map_or_else(String::new, |t| {
                        format!(" since {}", meshgate_policy::to_rfc3339(t))
                    });
                    record.errors.push(format!(
                        "{left_out} more unauthenticated refusals from this source{since} were not recorded (per-source record limit)"
                    ));
                }
                (Some(record), meta.id.clone())
            }
        };
        let prefix = match unfit.label {
            "unauthenticated" => "unauthenticated: ",
            "unknown_destination" => "unknown destination: ",
            _ => "",
        };
        Decided {
            outcome: Err(Refusal {
                status: unfit.status,
                label: unfit.label,
                message: format!("meshgate: {prefix}{}", unfit.reason),
                retry_after: None,
                decision_id,
            }),
            record,
        }
    }

    fn record_of(
        &self,
        meta: &RequestMeta,
        hop: Hop<'_>,
        facts: &RequestFacts,
        decision: &Decision,
    ) -> DecisionRecordInput {
        let mut record = DecisionRecordInput::from_decision(facts, decision);
        record.id = Some(meta.id.clone());
        record.trace_id = Some(meta.trace_id.clone());
        record.traffic = meta.traffic.clone();
        record.source_gateway = Some(match hop {
            Hop::Workload => self.id.to_string(),
            Hop::Peer { gateway, .. } => gateway.to_string(),
        });
        record
    }

    /// The request facts Cedar and the record see; the caller is filled in once verified.
    fn facts(
        &self,
        hop: Hop<'_>,
        head: &http::request::Parts,
        service: String,
        labels: std::collections::BTreeMap<String, String>,
        now: SystemTime,
    ) -> RequestFacts {
        let (caller, source_cluster) = match hop {
            Hop::Workload => (UNAUTHENTICATED, self.cluster.clone()),
            Hop::Peer { cluster, .. } => ("unknown", cluster.unwrap_or_default().to_owned()),
        };
        RequestFacts {
            caller: caller.to_owned(),
            service,
            destination_trust_domain: self.trust_domain.to_string(),
            method: head.method.as_str().to_owned(),
            raw_path: head
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned(),
            headers: headers::policy_headers(&head.headers),
            source_cluster,
            destination_cluster: self.cluster.clone(),
            mtls: false,
            time: now,
            claims: None,
            service_labels: labels,
        }
    }
}

#[cfg(test)]
#[path = "admission_tests.rs"]
mod tests;
