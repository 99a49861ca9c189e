//! Per-request enforcement: decide → charge the quota → record → verdict.
//!
//! This is the heart of the gateway. [`Enforcer::enforce`] reads top to bottom and no step
//! can be skipped: a verdict that allows exists only after the decision record is durable,
//! and any failure on the way refuses the request (fail closed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshgate_policy::{
    Decision, DecisionKind, DecisionLog, DecisionRecordInput, PolicyEngine, QuotaLimiter,
    QuotaResult, RequestFacts, normalize_path,
};

use crate::metrics::Metrics;

/// Who is asking, around the Cedar facts: ids and the hop the request came over.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    /// The request id, returned as `x-meshgate-decision-id`.
    pub request_id: String,
    /// The W3C trace id.
    pub trace_id: String,
    /// The SPIFFE ID of the gateway the request came from (this gateway for local callers).
    pub source_gateway: String,
}

/// What the gateway does with the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it.
    Allow,
    /// 403 with a short reason.
    Deny(String),
    /// 429 with `Retry-After`.
    QuotaExceeded(Duration),
    /// 5xx: something failed; the request is refused (fail closed).
    Error(String),
}

/// A verdict with the id of its durable decision record.
#[derive(Debug, Clone)]
pub struct Enforced {
    /// The decision record id (the request id).
    pub decision_id: String,
    /// The verdict.
    pub verdict: Verdict,
    /// The normalized path Cedar decided on; an allowed request is forwarded with it, so
    /// the upstream sees exactly what was authorized.
    pub normalized_path: String,
}

/// The policy engine, quotas and decision log of one gateway.
#[derive(Debug)]
pub struct Enforcer {
    policy: Arc<PolicyEngine>,
    quotas: QuotaLimiter,
    log: Arc<DecisionLog>,
    metrics: Arc<Metrics>,
    started: Instant,
}

impl Enforcer {
    /// An enforcer over the given parts.
    pub fn new(
        policy: Arc<PolicyEngine>,
        quotas: QuotaLimiter,
        log: Arc<DecisionLog>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            policy,
            quotas,
            log,
            metrics,
            started: Instant::now(),
        }
    }

    /// The policy engine (for reloads).
    pub fn policy(&self) -> &Arc<PolicyEngine> {
        &self.policy
    }

    /// The decision log.
    pub fn log(&self) -> &Arc<DecisionLog> {
        &self.log
    }

    /// Decides one request, charges its quota, records the decision durably, and returns
    /// the verdict. Every path records; a record that cannot be written refuses the request.
    pub async fn enforce(&self, facts: &RequestFacts, meta: &RequestMeta) -> Enforced {
        let decision = self.policy.decide(facts);
        self.metrics
            .decision_seconds
            .observe(decision.eval_time.as_secs_f64());
        let (verdict, quota) = self.charge(&decision, facts);
        let mut record = DecisionRecordInput::from_decision(facts, &decision);
        if let Verdict::QuotaExceeded(_) = verdict {
            record.decision = DecisionKind::QuotaExceeded;
        }
        if let Some((key, result)) = quota {
            record.quota_key = Some(key);
            record.quota_remaining = match result {
                QuotaResult::Allowed { remaining } => Some(remaining),
                _ => Some(0),
            };
        }
        let mut enforced = self.record(record, meta, verdict).await;
        enforced.normalized_path = decision.normalized_path;
        enforced
    }

    /// Records a refusal made before Cedar could be asked (unauthenticated caller, forged
    /// caller token, unknown or unexported destination) and returns it as a deny.
    pub async fn refuse(
        &self,
        facts: &RequestFacts,
        meta: &RequestMeta,
        reason: String,
    ) -> Enforced {
        self.record_unasked(
            facts,
            meta,
            DecisionKind::Deny,
            Verdict::Deny(reason.clone()),
            reason,
        )
        .await
    }

    /// Records a request the gateway could not serve for an internal reason (no reachable
    /// peer, no caller token) and returns it as an error verdict.
    pub async fn fail(&self, facts: &RequestFacts, meta: &RequestMeta, reason: String) -> Enforced {
        self.record_unasked(
            facts,
            meta,
            DecisionKind::Error,
            Verdict::Error(reason.clone()),
            reason,
        )
        .await
    }

    async fn record_unasked(
        &self,
        facts: &RequestFacts,
        meta: &RequestMeta,
        kind: DecisionKind,
        verdict: Verdict,
        reason: String,
    ) -> Enforced {
        let decision = refused(facts, self.policy.version().to_string());
        let mut record = DecisionRecordInput::from_decision(facts, &decision);
        record.decision = kind;
        record.errors = vec![reason];
        self.record(record, meta, verdict).await
    }

    fn charge(
        &self,
        decision: &Decision,
        facts: &RequestFacts,
    ) -> (Verdict, Option<(String, QuotaResult)>) {
        if !decision.allowed {
            let reason = if decision.errors.is_empty() {
                match decision.reasons.as_slice() {
                    [] => "no policy permits this request".to_owned(),
                    ids => format!("forbidden by policy {}", ids.join(", ")),
                }
            } else {
                "policy evaluation failed".to_owned()
            };
            return (Verdict::Deny(reason), None);
        }
        let Some(spec) = decision.quota.as_ref().or(self.quotas.default_spec()) else {
            return (Verdict::Allow, None);
        };
        let key = spec.key_for(&facts.caller, &facts.service);
        let now = self.started.elapsed();
        let result = self.quotas.check(&key, spec, now);
        let verdict = match &result {
            QuotaResult::Exceeded { retry_after } => {
                self.metrics.quota_rejections.inc();
                Verdict::QuotaExceeded(*retry_after)
            }
            _ => Verdict::Allow,
        };
        (verdict, Some((key, result)))
    }

    async fn record(
        &self,
        mut record: DecisionRecordInput,
        meta: &RequestMeta,
        verdict: Verdict,
    ) -> Enforced {
        let request_id = meta.request_id.as_str();
        record.id = Some(meta.request_id.clone());
        record.trace_id = Some(meta.trace_id.clone());
        record.source_gateway = Some(meta.source_gateway.clone());
        record.status = Some(status_of(&verdict));
        match self.log.append_durable(&record).await {
            Ok(_) => Enforced {
                decision_id: request_id.to_owned(),
                verdict,
                normalized_path: String::new(),
            },
            Err(error) => {
                self.metrics.decision_log_failures.inc();
                tracing::error!(%error, request_id, "decision log write failed; refusing the request");
                Enforced {
                    decision_id: request_id.to_owned(),
                    verdict: Verdict::Error("the decision could not be recorded".to_owned()),
                    normalized_path: String::new(),
                }
            }
        }
    }
}

/// The status the gateway answers for a verdict (an allowed request's upstream status is
/// not known when the record is written; 200 stands for "forwarded").
fn status_of(verdict: &Verdict) -> u16 {
    match verdict {
        Verdict::Allow => 200,
        Verdict::Deny(_) => 403,
        Verdict::QuotaExceeded(_) => 429,
        Verdict::Error(_) => 503,
    }
}

/// The decision behind a refusal made before Cedar was asked.
fn refused(facts: &RequestFacts, policy_version: String) -> Decision {
    Decision {
        allowed: false,
        reasons: Vec::new(),
        errors: Vec::new(),
        policy_version,
        eval_time: Duration::ZERO,
        shadow: None,
        quota: None,
        normalized_path: normalize_path(&facts.raw_path).unwrap_or_default(),
        evaluation_failed: false,
    }
}

/// Rewrites the request target to the normalized path (keeping the query).
pub(crate) fn use_normalized_path(parts: &mut http::request::Parts, normalized: &str) {
    if normalized.is_empty() {
        return;
    }
    let target = match parts.uri.query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized.to_owned(),
    };
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.path_and_query = target.parse().ok();
    if let Ok(new) = http::Uri::from_parts(uri) {
        parts.uri = new;
    }
}
