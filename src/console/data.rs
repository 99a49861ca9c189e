//! What each console page shows, gathered from the running gateway's parts: the same
//! values serve the HTML pages and the JSON endpoints. Everything here blocks (it reads the
//! log's segment files, like `meshgate audit query` does beside a running gateway, without
//! the writer's lock) and runs on a blocking thread, bounded in memory: a search keeps at
//! most one page of records, lists keep their latest entries.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::SystemTime;

use meshgate_federation::{Federation, LinkStatus};
use meshgate_gateway::GatewayConfig;
use meshgate_policy::{
    CallerGrouping, Checkpoint, ConsolePolicy, DecisionLog, DecisionRecord, GraphBuilder,
    LoadStats, LogError, PolicyEngine, PolicyText, ServiceGraph, VerifyReport,
};
use serde::Serialize;

use super::query::{GraphQuery, Search};

/// Signed heads the integrity page lists.
const RECENT_HEADS: usize = 10;
/// Shadow flips the policies page lists.
const RECENT_FLIPS: usize = 50;

/// The running gateway's parts the console reads.
pub struct Sources {
    pub config: GatewayConfig,
    pub log: Arc<DecisionLog>,
    pub policy: Arc<PolicyEngine>,
    pub federation: Arc<Federation>,
    pub console_policy: Option<ConsolePolicy>,
}

/// One page of a search, newest first.
#[derive(Debug, Serialize)]
pub struct DecisionPage {
    pub search: Search,
    /// Records matching the search (before the cursor), in all.
    pub matched: u64,
    pub records: Vec<DecisionRecord>,
    /// The cursor of the next (older) page, when there is one.
    pub next_before: Option<u64>,
}

/// Finds the newest `search.limit` matching records before `search.before`, reading the log
/// once and keeping one page in memory.
pub fn search(log: &DecisionLog, search: &Search) -> Result<DecisionPage, LogError> {
    let filter = search.filter();
    let mut page: VecDeque<DecisionRecord> = VecDeque::with_capacity(search.limit + 1);
    let mut matched = 0u64;
    log.for_each(|r| {
        if search.before.is_some_and(|b| r.seq >= b) {
            return false; // records are in sequence order: nothing later can match
        }
        if filter.matches(&r) {
            matched += 1;
            page.push_back(r);
            if page.len() > search.limit {
                page.pop_front();
            }
        }
        true
    })?;
    let next_before = (matched > page.len() as u64)
        .then(|| page.front().map(|r| r.seq))
        .flatten();
    Ok(DecisionPage {
        search: search.clone(),
        matched,
        records: page.into_iter().rev().collect(),
        next_before,
    })
}

/// A decision id as the gateway makes them (hex); anything else is no id.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// One record with the text of the policies that determined it.
#[derive(Debug, Serialize)]
pub struct DecisionDetail {
    pub record: DecisionRecord,
    pub policies: Vec<DeterminingPolicy>,
    /// The record's trace in the trace viewer (`telemetry.trace_url`), when configured.
    pub trace_url: Option<String>,
}

/// A determining policy of a record and its Cedar text.
#[derive(Debug, Serialize)]
pub struct DeterminingPolicy {
    pub id: String,
    /// `enforced` or `shadow`.
    pub set: &'static str,
    /// The text in the set loaded now (`None` when the set has no such policy any more).
    pub text: Option<String>,
    /// Whether the record was decided by the set loaded now (same version); otherwise the
    /// text shown is today's, not necessarily the one that decided.
    pub same_version: bool,
}

/// The record with decision id `id`, read until found.
pub fn detail(src: &Sources, id: &str) -> Result<Option<DecisionDetail>, LogError> {
    let mut found = None;
    src.log.for_each(|r| {
        if r.id == id {
            found = Some(r);
            return false;
        }
        true
    })?;
    let Some(record) = found else { return Ok(None) };
    let mut policies = Vec::new();
    let enforced: BTreeMap<String, String> = src
        .policy
        .enforced_policies()
        .into_iter()
        .map(|p| (p.id, p.text))
        .collect();
    let same = record.policy_version == src.policy.version().as_str();
    for id in &record.reasons {
        policies.push(DeterminingPolicy {
            id: id.clone(),
            set: "enforced",
            text: enforced.get(id).cloned(),
            same_version: same,
        });
    }
    if let Some(shadow) = &record.shadow {
        let texts: BTreeMap<String, String> = src
            .policy
            .shadow_policies()
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.id, p.text))
            .collect();
        let same = src
            .policy
            .shadow_version()
            .is_some_and(|v| v.as_str() == shadow.policy_version);
        for id in &shadow.reasons {
            policies.push(DeterminingPolicy {
                id: id.clone(),
                set: "shadow",
                text: texts.get(id).cloned(),
                same_version: same,
            });
        }
    }
    let trace_url = src
        .config
        .telemetry
        .trace_url
        .as_deref()
        .zip(record.trace_id.as_deref())
        .filter(|(_, id)| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|(url, id)| url.replace("{trace_id}", id));
    Ok(Some(DecisionDetail {
        record,
        policies,
        trace_url,
    }))
}

/// The service graph of this gateway's log in a window.
#[derive(Debug, Serialize)]
pub struct GraphView {
    pub query: GraphQuery,
    pub graph: ServiceGraph,
}

pub fn graph(log: &DecisionLog, q: &GraphQuery) -> Result<GraphView, LogError> {
    let mut b = GraphBuilder::new(if q.by == "namespace" {
        CallerGrouping::Namespace
    } else {
        CallerGrouping::Workload
    });
    b.add_log(log, &q.filter)?;
    Ok(GraphView {
        query: q.clone(),
        graph: b.finish(),
    })
}

/// The integrity page: the chain, our signed heads, who witnesses them, what we witness.
#[derive(Debug, Serialize)]
pub struct Integrity {
    /// `verified`, `tampered` (the chain or a signature does not hold), or `disagreed` (the
    /// chain holds, but a peer witnessed heads this log contradicts: truncated or rolled back).
    pub status: &'static str,
    pub verify: VerifyReport,
    /// The checkpoint key pinned in the log.
    pub pinned_key: Option<String>,
    /// Our latest signed heads, newest first.
    pub checkpoints: Vec<HeadView>,
    /// For each peer: whether the heads it holds of our log agree with the log.
    pub witnesses: Vec<WitnessView>,
    /// For each peer: the latest head of its log held here.
    pub witnessed_here: Vec<HeldView>,
}

#[derive(Debug, Serialize)]
pub struct HeadView {
    #[serde(flatten)]
    pub checkpoint: Checkpoint,
    pub signature_valid: bool,
}

impl From<Checkpoint> for HeadView {
    fn from(checkpoint: Checkpoint) -> Self {
        Self {
            signature_valid: checkpoint.signature_valid(),
            checkpoint,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct WitnessView {
    pub cluster: String,
    pub trust_domain: String,
    /// `agree`, `disagree` or `not_checked`.
    pub verdict: &'static str,
    pub problem: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct HeldView {
    pub cluster: String,
    pub trust_domain: String,
    pub latest: Option<HeadView>,
    /// Why the heads could not be read.
    pub error: Option<String>,
}

pub fn integrity(src: &Sources, now: SystemTime) -> Result<Integrity, LogError> {
    let verify = src.log.verify()?;
    let checkpoints = src
        .log
        .recent_checkpoints()
        .into_iter()
        .rev()
        .take(RECENT_HEADS)
        .map(HeadView::from)
        .collect();
    let links = src.federation.status(now);
    let witnesses: Vec<WitnessView> = links
        .iter()
        .map(|l| WitnessView {
            cluster: l.cluster.clone(),
            trust_domain: l.trust_domain.clone(),
            verdict: match l.witness_mismatch {
                Some(false) => "agree",
                Some(true) => "disagree",
                None => "not_checked",
            },
            problem: l.witness_problem.clone(),
        })
        .collect();
    let witnessed_here = links
        .iter()
        .map(|l| {
            let held = src.federation.witnessed_recent(&l.trust_domain, 1);
            HeldView {
                cluster: l.cluster.clone(),
                trust_domain: l.trust_domain.clone(),
                error: held.as_ref().err().map(ToString::to_string),
                latest: held
                    .ok()
                    .and_then(|h| h.into_iter().last())
                    .map(HeadView::from),
            }
        })
        .collect();
    Ok(Integrity {
        status: if !verify.is_ok() {
            "tampered"
        } else if witnesses.iter().any(|w| w.verdict == "disagree") {
            "disagreed"
        } else {
            "verified"
        },
        pinned_key: src.log.pinned_key().map(str::to_owned),
        verify,
        checkpoints,
        witnesses,
        witnessed_here,
    })
}

/// The policies page.
#[derive(Debug, Serialize)]
pub struct Policies {
    pub enforced: SetView,
    pub shadow: Option<SetView>,
    pub last_reload: Option<ReloadView>,
    pub reload_failures: u64,
    pub flips: Flips,
    /// Who may view this console (`None` in the unauthenticated loopback mode).
    pub console: Option<SetView>,
}

#[derive(Debug, Serialize)]
pub struct SetView {
    pub version: String,
    pub stats: Option<LoadStats>,
    /// Where the set comes from (a directory or file).
    pub source: String,
    pub policies: Vec<PolicyText>,
}

#[derive(Debug, Serialize)]
pub struct ReloadView {
    pub time: String,
    pub applied: bool,
    pub version: String,
    pub diagnostics: Option<String>,
}

/// Decisions whose shadow answer differed from the enforced one.
#[derive(Debug, Default, Serialize)]
pub struct Flips {
    /// Allowed, but the shadow set would have denied.
    pub allow_to_deny: u64,
    /// Denied, but the shadow set would have allowed.
    pub deny_to_allow: u64,
    /// The latest ones, newest first.
    pub recent: Vec<FlipView>,
}

#[derive(Debug, Serialize)]
pub struct FlipView {
    pub seq: u64,
    pub id: String,
    pub time: String,
    pub principal: String,
    pub action: String,
    pub resource: String,
    pub path: String,
    pub enforced_allowed: bool,
    pub enforced_reasons: Vec<String>,
    pub shadow_allowed: bool,
    pub shadow_reasons: Vec<String>,
    pub shadow_version: String,
}

pub fn policies(src: &Sources) -> Result<Policies, LogError> {
    let engine = &src.policy;
    let dir = |p: &std::path::Path| p.display().to_string();
    let enforced = SetView {
        version: engine.version().to_string(),
        stats: Some(engine.stats()),
        source: dir(&src.config.policy.dir),
        policies: engine.enforced_policies(),
    };
    let shadow = engine.shadow_policies().map(|policies| SetView {
        version: engine
            .shadow_version()
            .map(|v| v.to_string())
            .unwrap_or_default(),
        stats: None,
        source: src
            .config
            .policy
            .shadow_dir
            .as_deref()
            .map(dir)
            .unwrap_or_default(),
        policies,
    });
    let last_reload = engine.last_reload().map(|r| ReloadView {
        time: meshgate_policy::to_rfc3339(r.at),
        applied: r.applied,
        version: r.version,
        diagnostics: r.diagnostics,
    });
    let mut flips = Flips::default();
    let mut recent = VecDeque::with_capacity(RECENT_FLIPS + 1);
    src.log.for_each(|r| {
        let Some(shadow) = r.shadow.as_ref().filter(|s| s.differs) else {
            return true;
        };
        let enforced_allowed = r.decision.policy_allowed();
        if enforced_allowed {
            flips.allow_to_deny += 1;
        } else {
            flips.deny_to_allow += 1;
        }
        recent.push_back(FlipView {
            seq: r.seq,
            id: r.id.clone(),
            time: r.time.clone(),
            principal: r.principal.clone(),
            action: r.action.clone(),
            resource: r.resource.clone(),
            path: r.path.clone(),
            enforced_allowed,
            enforced_reasons: r.reasons.clone(),
            shadow_allowed: shadow.allowed,
            shadow_reasons: shadow.reasons.clone(),
            shadow_version: shadow.policy_version.clone(),
        });
        if recent.len() > RECENT_FLIPS {
            recent.pop_front();
        }
        true
    })?;
    flips.recent = recent.into_iter().rev().collect();
    let console = src.console_policy.as_ref().map(|c| SetView {
        version: c.version().to_string(),
        stats: None,
        source: c.source().to_owned(),
        policies: c.policies(),
    });
    Ok(Policies {
        enforced,
        shadow,
        last_reload,
        reload_failures: engine.reload_failures(),
        flips,
        console,
    })
}

/// The mesh page: our services and every federation link.
#[derive(Debug, Serialize)]
pub struct Mesh {
    pub cluster: String,
    pub trust_domain: String,
    pub services: Vec<ServiceView>,
    pub links: Vec<LinkStatus>,
}

#[derive(Debug, Serialize)]
pub struct ServiceView {
    /// `<service>.<namespace>.<cluster>`.
    pub name: String,
    pub protocol: &'static str,
    pub endpoints: usize,
    /// Peer clusters it is exported to (`*`: every peer).
    pub export_to: Vec<String>,
}

pub fn mesh(src: &Sources, now: SystemTime) -> Mesh {
    let c = &src.config;
    Mesh {
        cluster: c.cluster.clone(),
        trust_domain: c.trust_domain.clone(),
        services: c
            .services
            .iter()
            .map(|s| ServiceView {
                name: format!("{}.{}.{}", s.name, s.namespace, c.cluster),
                protocol: match s.protocol {
                    meshgate_gateway::ServiceProtocol::Http => "http",
                    meshgate_gateway::ServiceProtocol::Tcp => "tcp",
                },
                endpoints: s.endpoints.len(),
                export_to: s.export_to.clone(),
            })
            .collect(),
        links: src.federation.status(now),
    }
}
