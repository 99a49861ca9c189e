//! Decision records and their canonical encoding.
//!
//! **Canonical encoding.** A record's *body* is its JSON object as serialized by serde_json
//! in compact form, members in the order of [`DecisionRecord`]'s fields, without the `hash`
//! member. Its hash is `SHA-256("meshgate.audit.v1\0" || body)`, hex-encoded. Each body
//! carries `seq` and the previous record's hash in `prev_hash` (64 zeros for the first
//! record), which chains the log. sled stores `hash (32 bytes) || body` under the key
//! `seq` (8 bytes, big-endian) in the tree `audit.records`; verification re-hashes the
//! stored body bytes exactly. An exported JSON line is the body with `"hash":"…"` appended
//! as the last member, so removing that member gives the body back.

use std::time::SystemTime;

use aws_lc_rs::digest;
use serde::{Deserialize, Serialize};

use crate::engine::{Decision, ShadowOutcome};
use crate::facts::{HIDDEN_HEADERS, RequestFacts, action_name};
use crate::timefmt::to_rfc3339;

const HASH_DOMAIN: &[u8] = b"meshgate.audit.v1\0";

/// What a record keeps of a header value that looks like a secret.
pub const REDACTED: &str = "[redacted]";

/// Header names that usually carry a secret (`x-api-key`, `x-auth-token`,
/// `x-amz-security-token`, a session id): policies see them, records keep only their name,
/// so neither the log, its exports nor the console hold the secret. (`authorization` and
/// `cookie` are hidden from policies as well, see [`HIDDEN_HEADERS`].)
pub fn secret_looking(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    [
        "token",
        "secret",
        "password",
        "passwd",
        "api-key",
        "apikey",
        "session",
        "credential",
        "auth",
    ]
    .iter()
    .any(|part| name.contains(part))
}
/// `prev_hash` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What became of a request (or that the record is an admin event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DecisionKind {
    /// Allowed and within quota.
    Allow,
    /// Denied by policy (explicit forbid or default deny).
    Deny,
    /// Allowed by policy but over quota (429).
    QuotaExceeded,
    /// Could not be evaluated (bad facts, log failure): denied.
    Error,
    /// An administrative action (who in `principal`, what in `action`).
    Admin,
    /// A traffic route injected a fault (`traffic.fault`: an abort the caller got instead
    /// of an answer, or a delay before forwarding). Cedar had allowed the request when it
    /// was asked here (then `facts` are kept); for a service in another cluster the source
    /// records the fault without facts, and the destination decides what is forwarded.
    Fault,
}

impl DecisionKind {
    /// The lowercase name used in records and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::QuotaExceeded => "quota_exceeded",
            Self::Error => "error",
            Self::Admin => "admin",
            Self::Fault => "fault",
        }
    }

    /// Whether the policies allowed the request: allow, quota exceeded, or a fault. A fault
    /// record with `facts` was allowed by Cedar here first; one without (a backend in
    /// another cluster) was not decided here, and `policy replay` skips it.
    pub fn policy_allowed(self) -> bool {
        matches!(self, Self::Allow | Self::QuotaExceeded | Self::Fault)
    }
}

impl std::str::FromStr for DecisionKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allow" => Ok(Self::Allow),
            "deny" => Ok(Self::Deny),
            "quota_exceeded" => Ok(Self::QuotaExceeded),
            "error" => Ok(Self::Error),
            "admin" => Ok(Self::Admin),
            "fault" => Ok(Self::Fault),
            _ => Err(format!(
                "`{s}` is not one of allow, deny, quota_exceeded, error, admin, fault"
            )),
        }
    }
}

/// How a traffic route steered a request, in its record (absent when no route was involved).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficNote {
    /// The route that matched (at the source gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// The backend the route chose: a cluster, with its subset (`north/version=v2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The subset of the service the request was sent to (`version=v2`), at the gateway
    /// that chose the endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// This request is a mirror copy: its answer was discarded, nobody waited for it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mirror: bool,
    /// The fault the route injected: `abort 503` or `delay 200ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
}

/// What the caller hands to [`crate::DecisionLog::append`]; the log adds seq, chain and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionRecordInput {
    /// When the decision was made.
    pub time: SystemTime,
    /// The decision id (returned in `x-meshgate-decision-id`); generated when `None`.
    pub id: Option<String>,
    /// The W3C trace id from `traceparent`.
    pub trace_id: Option<String>,
    /// The SPIFFE ID of the gateway the request came through.
    pub source_gateway: Option<String>,
    /// The outcome.
    pub decision: DecisionKind,
    /// The caller (or, for admin events, who acted).
    pub principal: String,
    /// The action (or, for admin events, what was done).
    pub action: String,
    /// The service.
    pub resource: String,
    /// The HTTP method.
    pub method: String,
    /// The path as sent.
    pub raw_path: String,
    /// The normalized path.
    pub path: String,
    /// Determining policy ids.
    pub reasons: Vec<String>,
    /// Evaluation errors.
    pub errors: Vec<String>,
    /// The shadow set's answer.
    pub shadow: Option<ShadowOutcome>,
    /// The enforced set's version.
    pub policy_version: String,
    /// The quota bucket charged.
    pub quota_key: Option<String>,
    /// Tokens left in it after this request.
    pub quota_remaining: Option<u64>,
    /// The HTTP status returned, when known.
    pub status: Option<u16>,
    /// The request facts, so `policy replay` can re-decide the request (credential headers
    /// are removed).
    pub facts: Option<RequestFacts>,
    /// How a traffic route steered the request.
    pub traffic: Option<TrafficNote>,
}

impl DecisionRecordInput {
    /// A record of `decision` on `facts`: `allow`, `deny`, or `error` when the request could
    /// not be evaluated. Set `decision` to `QuotaExceeded` after a refused quota charge, and
    /// fill in id, trace id, gateway, quota and status as known.
    pub fn from_decision(facts: &RequestFacts, decision: &Decision) -> Self {
        let kind = if decision.evaluation_failed {
            DecisionKind::Error
        } else if decision.allowed {
            DecisionKind::Allow
        } else {
            DecisionKind::Deny
        };
        let mut kept = facts.clone();
        kept.headers
            .retain(|(k, _)| !HIDDEN_HEADERS.contains(&k.to_ascii_lowercase().as_str()));
        for (name, value) in &mut kept.headers {
            if secret_looking(name) {
                *value = REDACTED.to_owned();
            }
        }
        Self {
            time: facts.time,
            id: None,
            trace_id: None,
            source_gateway: None,
            decision: kind,
            principal: facts.caller.clone(),
            action: action_name(&facts.method).map_or_else(|_| facts.method.clone(), str::to_owned),
            resource: facts.service.clone(),
            method: facts.method.clone(),
            raw_path: facts.raw_path.clone(),
            path: decision.normalized_path.clone(),
            reasons: decision.reasons.clone(),
            errors: decision.errors.clone(),
            shadow: decision.shadow.clone(),
            policy_version: decision.policy_version.clone(),
            quota_key: None,
            quota_remaining: None,
            status: None,
            facts: Some(kept),
            traffic: None,
        }
    }

    /// An admin event: `who` did `what` at `time`.
    pub fn admin(who: &str, what: &str, time: SystemTime) -> Self {
        Self {
            time,
            id: None,
            trace_id: None,
            source_gateway: None,
            decision: DecisionKind::Admin,
            principal: who.to_owned(),
            action: what.to_owned(),
            resource: String::new(),
            method: String::new(),
            raw_path: String::new(),
            path: String::new(),
            reasons: Vec::new(),
            errors: Vec::new(),
            shadow: None,
            policy_version: String::new(),
            quota_key: None,
            quota_remaining: None,
            status: None,
            facts: None,
            traffic: None,
        }
    }
}

/// One stored record. Field order is the canonical encoding's member order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRecord {
    /// Position in the log, from 1.
    pub seq: u64,
    /// The previous record's hash.
    pub prev_hash: String,
    /// RFC 3339, UTC.
    pub time: String,
    /// The decision id.
    pub id: String,
    /// The W3C trace id.
    pub trace_id: Option<String>,
    /// The source gateway's SPIFFE ID.
    pub source_gateway: Option<String>,
    /// The outcome.
    pub decision: DecisionKind,
    /// The caller (or who, for admin events).
    pub principal: String,
    /// The action (or what, for admin events).
    pub action: String,
    /// The service.
    pub resource: String,
    /// The HTTP method.
    pub method: String,
    /// The path as sent.
    pub raw_path: String,
    /// The normalized path.
    pub path: String,
    /// Determining policy ids.
    pub reasons: Vec<String>,
    /// Evaluation errors.
    pub errors: Vec<String>,
    /// The shadow set's answer.
    pub shadow: Option<ShadowOutcome>,
    /// The enforced set's version.
    pub policy_version: String,
    /// The quota bucket charged.
    pub quota_key: Option<String>,
    /// Tokens left after this request.
    pub quota_remaining: Option<u64>,
    /// The HTTP status returned.
    pub status: Option<u16>,
    /// The request facts (for replay).
    pub facts: Option<RequestFacts>,
    /// How a traffic route steered the request (absent from records that have none, and
    /// from every record written before routes existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<TrafficNote>,
    /// This record's hash (not part of the body).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

impl DecisionRecord {
    #[cfg(test)]
    pub(crate) fn new(input: DecisionRecordInput, seq: u64, prev_hash: String, id: String) -> Self {
        Self {
            seq,
            prev_hash,
            time: to_rfc3339(input.time),
            id,
            trace_id: input.trace_id,
            source_gateway: input.source_gateway,
            decision: input.decision,
            principal: input.principal,
            action: input.action,
            resource: input.resource,
            method: input.method,
            raw_path: input.raw_path,
            path: input.path,
            reasons: input.reasons,
            errors: input.errors,
            shadow: input.shadow,
            policy_version: input.policy_version,
            quota_key: input.quota_key,
            quota_remaining: input.quota_remaining,
            status: input.status,
            facts: input.facts,
            traffic: input.traffic,
            hash: String::new(),
        }
    }

    /// The record's time.
    pub fn system_time(&self) -> Option<SystemTime> {
        crate::timefmt::parse_rfc3339(&self.time)
    }
}

/// A record serialized outside the log's lock: its body without `seq` and `prev_hash`, which
/// only the appender knows. [`body`] puts them in front, giving the bytes serde_json makes of
/// the whole [`DecisionRecord`] (a test checks they are equal).
#[derive(Debug)]
pub(crate) struct Prepared {
    /// `{"time":…,…}`: the remaining members in canonical order.
    tail: Vec<u8>,
    /// The decision id.
    pub id: String,
    /// An administrative event: these may use the log's reserve past its disk budget, so
    /// an operator can still act (prune, reload, remove a link) on a full log.
    pub admin: bool,
}

/// [`DecisionRecord`]'s members after `prev_hash`, borrowed.
#[derive(Serialize)]
struct Tail<'a> {
    time: String,
    id: &'a str,
    trace_id: &'a Option<String>,
    source_gateway: &'a Option<String>,
    decision: DecisionKind,
    principal: &'a str,
    action: &'a str,
    resource: &'a str,
    method: &'a str,
    raw_path: &'a str,
    path: &'a str,
    reasons: &'a [String],
    errors: &'a [String],
    shadow: &'a Option<ShadowOutcome>,
    policy_version: &'a str,
    quota_key: &'a Option<String>,
    quota_remaining: Option<u64>,
    status: Option<u16>,
    facts: &'a Option<RequestFacts>,
    #[serde(skip_serializing_if = "absent")]
    traffic: &'a Option<TrafficNote>,
}

fn absent(traffic: &&Option<TrafficNote>) -> bool {
    traffic.is_none()
}

/// Serializes everything of `input` but its place in the chain.
pub(crate) fn prepare(input: &DecisionRecordInput) -> Result<Prepared, serde_json::Error> {
    let id = input.id.clone().unwrap_or_else(new_decision_id);
    let tail = serde_json::to_vec(&Tail {
        time: to_rfc3339(input.time),
        id: &id,
        trace_id: &input.trace_id,
        source_gateway: &input.source_gateway,
        decision: input.decision,
        principal: &input.principal,
        action: &input.action,
        resource: &input.resource,
        method: &input.method,
        raw_path: &input.raw_path,
        path: &input.path,
        reasons: &input.reasons,
        errors: &input.errors,
        shadow: &input.shadow,
        policy_version: &input.policy_version,
        quota_key: &input.quota_key,
        quota_remaining: input.quota_remaining,
        status: input.status,
        facts: &input.facts,
        traffic: &input.traffic,
    })?;
    Ok(Prepared {
        tail,
        id,
        admin: input.decision == DecisionKind::Admin,
    })
}

/// Appends the canonical body of `prepared` at `seq` after `prev_hash` (hex) to `out`.
pub(crate) fn body(seq: u64, prev_hash: &str, prepared: &Prepared, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(seq.to_string().as_bytes());
    out.extend_from_slice(b",\"prev_hash\":\"");
    out.extend_from_slice(prev_hash.as_bytes());
    out.extend_from_slice(b"\",");
    // The tail is a JSON object: drop its opening brace.
    out.extend_from_slice(prepared.tail.get(1..).unwrap_or_default());
}

/// Encodes a record (hash ignored) into its stored value: `hash || body`; sets `record.hash`.
#[cfg(test)]
pub(crate) fn encode(record: &mut DecisionRecord) -> Result<Vec<u8>, serde_json::Error> {
    record.hash.clear();
    let body = serde_json::to_vec(record)?;
    let hash = hash_body(&body);
    record.hash = hex::encode(hash);
    let mut value = Vec::with_capacity(32 + body.len());
    value.extend_from_slice(&hash);
    value.extend_from_slice(&body);
    Ok(value)
}

/// Splits a stored value into (stored hash, body).
pub(crate) fn split(value: &[u8]) -> Option<(&[u8], &[u8])> {
    (value.len() > 32).then(|| value.split_at(32))
}

/// Decodes a stored value without checking it.
pub(crate) fn decode(value: &[u8]) -> Option<DecisionRecord> {
    let (hash, body) = split(value)?;
    let mut record: DecisionRecord = serde_json::from_slice(body).ok()?;
    record.hash = hex::encode(hash);
    Some(record)
}

pub(crate) fn hash_body(body: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(HASH_DOMAIN);
    ctx.update(body);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// A fresh decision id: 128 random bits, hex.
pub fn new_decision_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}
