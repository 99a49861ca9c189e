//! What the people who write policies use: what-if requests (`policy check`), test cases
//! (`policy test`) and replay of recorded decisions against a candidate set (`policy replay`).
//! All of them build requests with the same [`RequestFacts`] builder the gateway uses.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::engine::{Decision, PolicyEngine};
use crate::facts::RequestFacts;
use crate::log::{DecisionKind, DecisionLog, Filter, LogError};

/// A partial request context for `policy check --context` and test cases. Every key is
/// optional; unknown keys are refused. Defaults:
/// - `path`: `/`; `raw_path`: the `path`
/// - `source_cluster`: the first label of the caller's trust domain (`east.example` → `east`)
/// - `destination_cluster`: the resource's cluster (`orders.shop.west` → `west`)
/// - `destination_trust_domain`: the caller's trust domain with its first label replaced by
///   the destination cluster (`east.example` → `west.example`), following the mesh's
///   `<cluster>.<domain>` convention; the caller's trust domain when it has a single label
/// - `mtls`: `true`; `time`: now (RFC 3339 otherwise)
/// - `headers`, `labels` (the service's labels): empty; `claims`: none
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckContext {
    /// The request path (normalized like the gateway does).
    pub path: Option<String>,
    /// The raw path, when it should differ from `path`.
    pub raw_path: Option<String>,
    /// The caller's cluster.
    pub source_cluster: Option<String>,
    /// The service's cluster.
    pub destination_cluster: Option<String>,
    /// The service's trust domain.
    pub destination_trust_domain: Option<String>,
    /// Whether the hop was mTLS.
    pub mtls: Option<bool>,
    /// The request time, RFC 3339.
    pub time: Option<String>,
    /// Request headers (names are lowercased).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Verified end-user claims.
    pub claims: Option<BTreeMap<String, String>>,
    /// The service's labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Why a what-if request or a cases file is malformed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ToolInputError {
    /// `time` is not RFC 3339.
    #[error("time `{0}` is not an RFC 3339 time (like `2025-01-02T03:04:05Z`)")]
    Time(String),
    /// The cases file does not parse.
    #[error("malformed test cases: {0}")]
    Cases(String),
}

/// Builds request facts for a what-if request: `action` is an HTTP method or `connect`.
pub fn what_if_facts(
    principal: &str,
    action: &str,
    resource: &str,
    ctx: &CheckContext,
    now: SystemTime,
) -> Result<RequestFacts, ToolInputError> {
    let caller_td = principal
        .strip_prefix("spiffe://")
        .and_then(|r| r.split('/').next())
        .unwrap_or_default();
    let (td_first, td_rest) = caller_td
        .split_once('.')
        .map_or((caller_td, None), |(a, b)| (a, Some(b)));
    let dest_cluster = ctx
        .destination_cluster
        .clone()
        .unwrap_or_else(|| resource.rsplit('.').next().unwrap_or_default().to_owned());
    let dest_td = ctx
        .destination_trust_domain
        .clone()
        .unwrap_or_else(|| match td_rest {
            Some(rest) if !dest_cluster.is_empty() => format!("{dest_cluster}.{rest}"),
            _ => caller_td.to_owned(),
        });
    let time = match &ctx.time {
        Some(t) => {
            crate::timefmt::parse_rfc3339(t).ok_or_else(|| ToolInputError::Time(t.clone()))?
        }
        None => now,
    };
    let path = ctx.path.clone().unwrap_or_else(|| "/".to_owned());
    let method = if action.eq_ignore_ascii_case("connect") {
        "CONNECT".to_owned()
    } else {
        action.to_ascii_uppercase()
    };
    Ok(RequestFacts {
        caller: principal.to_owned(),
        service: resource.to_owned(),
        destination_trust_domain: dest_td,
        method,
        raw_path: ctx.raw_path.clone().unwrap_or(path),
        headers: ctx
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect(),
        source_cluster: ctx
            .source_cluster
            .clone()
            .unwrap_or_else(|| td_first.to_owned()),
        destination_cluster: dest_cluster,
        mtls: ctx.mtls.unwrap_or(true),
        time,
        claims: ctx.claims.clone(),
        service_labels: ctx.labels.clone(),
    })
}

/// The expected answer of a test case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// The request must be allowed.
    Allow,
    /// The request must be denied.
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[serde(default)]
    case: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    principal: String,
    action: String,
    resource: String,
    #[serde(default)]
    context: CheckContext,
    expect: Expect,
    /// When given, the determining policies must be exactly these.
    reasons: Option<Vec<String>>,
}

/// The outcome of one test case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaseResult {
    /// The case's name.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// What was expected.
    pub expected: Expect,
    /// The expected determining policies, if the case names them.
    pub expected_reasons: Option<Vec<String>>,
    /// What the set decided.
    pub allowed: bool,
    /// The policies that decided it.
    pub reasons: Vec<String>,
    /// Evaluation errors.
    pub errors: Vec<String>,
}

/// Runs every case of a TOML cases file (`[[case]]` tables, see `examples/policy-tests.toml`).
pub fn run_cases(
    engine: &PolicyEngine,
    cases_toml: &str,
    now: SystemTime,
) -> Result<Vec<CaseResult>, ToolInputError> {
    let file: CaseFile =
        toml::from_str(cases_toml).map_err(|e| ToolInputError::Cases(e.to_string()))?;
    let mut out = Vec::with_capacity(file.case.len());
    for case in file.case {
        let facts = what_if_facts(
            &case.principal,
            &case.action,
            &case.resource,
            &case.context,
            now,
        )
        .map_err(|e| ToolInputError::Cases(format!("case `{}`: {e}", case.name)))?;
        let d = engine.decide(&facts);
        let mut want_reasons = case.reasons.clone();
        if let Some(r) = &mut want_reasons {
            r.sort();
        }
        let passed = d.allowed == (case.expect == Expect::Allow)
            && want_reasons.as_ref().is_none_or(|r| *r == d.reasons);
        out.push(CaseResult {
            name: case.name,
            passed,
            expected: case.expect,
            expected_reasons: want_reasons,
            allowed: d.allowed,
            reasons: d.reasons,
            errors: d.errors,
        });
    }
    Ok(out)
}

/// One side of a replayed decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Side {
    /// Allowed by policy.
    pub allowed: bool,
    /// Determining policies.
    pub reasons: Vec<String>,
    /// The policy-set version.
    pub policy_version: String,
}

/// A recorded decision that the candidate set decides the other way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flip {
    /// The record's sequence number.
    pub seq: u64,
    /// The decision id.
    pub id: String,
    /// When it was decided.
    pub time: String,
    /// The caller.
    pub principal: String,
    /// The action.
    pub action: String,
    /// The service.
    pub resource: String,
    /// The normalized path.
    pub path: String,
    /// What the recorded set decided.
    pub before: Side,
    /// What the candidate set decides.
    pub after: Side,
    /// The candidate set's evaluation errors.
    pub errors: Vec<String>,
}

/// Totals of a replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReplaySummary {
    /// Records re-decided.
    pub replayed: u64,
    /// Records without request facts (admin events) that were skipped.
    pub skipped: u64,
    /// Decisions that flip from allow to deny.
    pub allow_to_deny: u64,
    /// Decisions that flip from deny to allow.
    pub deny_to_allow: u64,
}

/// Re-decides every recorded request matching `filter` with `candidate`.
pub fn replay(
    log: &DecisionLog,
    candidate: &PolicyEngine,
    filter: &Filter,
) -> Result<(Vec<Flip>, ReplaySummary), LogError> {
    let mut flips = Vec::new();
    let mut sum = ReplaySummary::default();
    log.for_each(|r| {
        if !filter.matches(&r) {
            return true;
        }
        let Some(facts) = r
            .facts
            .as_ref()
            .filter(|_| r.decision != DecisionKind::Admin)
        else {
            sum.skipped += 1;
            return true;
        };
        sum.replayed += 1;
        let d: Decision = candidate.decide(facts);
        let before = r.decision.policy_allowed();
        if d.allowed != before {
            if before {
                sum.allow_to_deny += 1;
            } else {
                sum.deny_to_allow += 1;
            }
            flips.push(Flip {
                seq: r.seq,
                id: r.id.clone(),
                time: r.time.clone(),
                principal: r.principal.clone(),
                action: r.action.clone(),
                resource: r.resource.clone(),
                path: r.path.clone(),
                before: Side {
                    allowed: before,
                    reasons: r.reasons.clone(),
                    policy_version: r.policy_version.clone(),
                },
                after: Side {
                    allowed: d.allowed,
                    reasons: d.reasons,
                    policy_version: d.policy_version,
                },
                errors: d.errors,
            });
        }
        true
    })?;
    Ok((flips, sum))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::load::SourceFile;
    use crate::log::DecisionRecordInput;

    fn engine(text: &str) -> PolicyEngine {
        PolicyEngine::from_sources(
            &[SourceFile {
                name: "p.cedar".into(),
                text: text.into(),
            }],
            None,
        )
        .unwrap()
    }

    #[test]
    fn what_if_defaults_follow_the_mesh_conventions() {
        let now = UNIX_EPOCH + Duration::from_secs(5);
        let f = what_if_facts(
            "spiffe://east.example/ns/shop/sa/web",
            "get",
            "orders.shop.west",
            &CheckContext::default(),
            now,
        )
        .unwrap();
        assert_eq!(
            (
                f.method.as_str(),
                f.raw_path.as_str(),
                f.source_cluster.as_str()
            ),
            ("GET", "/", "east")
        );
        assert_eq!(
            (
                f.destination_cluster.as_str(),
                f.destination_trust_domain.as_str()
            ),
            ("west", "west.example")
        );
        assert!(f.mtls && f.time == now && f.claims.is_none());
        let ctx: CheckContext =
            serde_json::from_str(r#"{"time":"2030-01-01T00:00:00Z","mtls":false}"#).unwrap();
        assert!(
            !what_if_facts("spiffe://a/b", "connect", "x.y.z", &ctx, now)
                .unwrap()
                .mtls
        );
        assert!(serde_json::from_str::<CheckContext>(r#"{"pth":"/"}"#).is_err());
        let bad = CheckContext {
            time: Some("noon".into()),
            ..CheckContext::default()
        };
        assert_eq!(
            what_if_facts("spiffe://a/b", "GET", "x.y.z", &bad, now)
                .unwrap_err()
                .to_string(),
            "time `noon` is not an RFC 3339 time (like `2025-01-02T03:04:05Z`)"
        );
    }

    #[test]
    fn cases_pass_and_fail_with_the_deciding_policies() {
        let e = engine(r#"@id("gets") permit (principal, action == Action::"GET", resource);"#);
        let cases = r#"
[[case]]
name = "get ok"
principal = "spiffe://east.example/ns/shop/sa/web"
action = "GET"
resource = "orders.shop.west"
expect = "allow"
reasons = ["gets"]

[[case]]
name = "post wrongly expected"
principal = "spiffe://east.example/ns/shop/sa/web"
action = "POST"
resource = "orders.shop.west"
expect = "allow"
"#;
        let r = run_cases(&e, cases, SystemTime::now()).unwrap();
        assert!(r[0].passed && !r[1].passed);
        assert_eq!(r[0].reasons, ["gets"]);
        assert!(matches!(
            run_cases(&e, "[[case]]\nname = 1", SystemTime::now()),
            Err(ToolInputError::Cases(_))
        ));
    }

    #[test]
    fn replay_lists_flips_with_both_sides() {
        let old = engine(r#"@id("all") permit (principal, action, resource);"#);
        let new = engine(r#"@id("gets") permit (principal, action == Action::"GET", resource);"#);
        let dir = tempfile::tempdir().unwrap();
        let log = DecisionLog::open(dir.path(), None, crate::LogOptions::default()).unwrap();
        for m in ["GET", "POST", "DELETE"] {
            let f = crate::engine::tests::facts(
                "spiffe://east.example/ns/shop/sa/web",
                m,
                "orders.shop.west",
                "/",
            );
            log.append(DecisionRecordInput::from_decision(&f, &old.decide(&f)))
                .unwrap();
        }
        log.append_admin_event("alice", "policy reload", SystemTime::now())
            .unwrap();
        let (flips, sum) = replay(&log, &new, &Filter::default()).unwrap();
        assert_eq!(
            sum,
            ReplaySummary {
                replayed: 3,
                skipped: 1,
                allow_to_deny: 2,
                deny_to_allow: 0
            }
        );
        assert_eq!(
            flips.iter().map(|f| f.action.as_str()).collect::<Vec<_>>(),
            ["POST", "DELETE"]
        );
        assert_eq!(flips[0].before.reasons, ["all"]);
        assert!(!flips[0].after.allowed && flips[0].after.reasons.is_empty());
    }
}
