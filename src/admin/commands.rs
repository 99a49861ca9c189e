//! The built-in admin commands: their arguments and replies, shared by the CLI (which sends
//! them, or runs the same logic on a directly opened state) and the gateway's handlers.
//!
//! Replies that the policy and identity crates only serialize are mirrored here with the
//! same fields in the same order, so `--json` prints the same document either way.

use std::time::SystemTime;

use meshgate_identity::{JoinToken, RegistrationEntry};
use meshgate_policy::{Checkpoint, DecisionKind, Filter, Tamper, VerifyReport};
use serde::{Deserialize, Serialize};

use super::protocol::AdminCommand;

/// `identity entry create`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryCreate {
    pub spiffe_id: String,
    pub ttl_secs: u64,
    #[serde(default)]
    pub dns_names: Vec<String>,
}

impl AdminCommand for EntryCreate {
    const NAME: &'static str = "identity.entry.create";
    type Reply = RegistrationEntry;
    fn describe(&self) -> String {
        format!("identity entry create `{}`", self.spiffe_id)
    }
}

/// `identity entry list`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryList {}

impl AdminCommand for EntryList {
    const NAME: &'static str = "identity.entry.list";
    type Reply = Vec<RegistrationEntry>;
}

/// `identity entry delete`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryDelete {
    pub spiffe_id: String,
}

impl AdminCommand for EntryDelete {
    const NAME: &'static str = "identity.entry.delete";
    type Reply = RegistrationEntry;
    fn describe(&self) -> String {
        format!("identity entry delete `{}`", self.spiffe_id)
    }
}

/// `identity token create`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub spiffe_id: String,
    pub ttl_secs: u64,
}

impl AdminCommand for TokenCreate {
    const NAME: &'static str = "identity.token.create";
    type Reply = TokenView;
    fn describe(&self) -> String {
        format!("identity token create `{}`", self.spiffe_id)
    }
}

/// A join token as printed (the fields of [`JoinToken`], in its order).
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenView {
    pub token: String,
    pub spiffe_id: String,
    pub expires_at: u64,
}

impl std::fmt::Debug for TokenView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenView")
            .field("token", &"<redacted>")
            .field("spiffe_id", &self.spiffe_id)
            .finish()
    }
}

impl From<JoinToken> for TokenView {
    fn from(t: JoinToken) -> Self {
        Self {
            token: t.token,
            spiffe_id: t.spiffe_id.to_string(),
            expires_at: t.expires_at,
        }
    }
}

/// `identity issue`: an X.509-SVID and its key, issued by the gateway's issuer. The reply
/// carries the private key; the admin socket serves only its owner (mode 0600, `SO_PEERCRED`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityIssue {
    pub spiffe_id: String,
    pub ttl_secs: u64,
    #[serde(default)]
    pub dns_names: Vec<String>,
    #[serde(default)]
    pub ips: Vec<std::net::IpAddr>,
}

impl AdminCommand for IdentityIssue {
    const NAME: &'static str = "identity.issue";
    type Reply = IssuedSvid;
    fn describe(&self) -> String {
        format!("identity issue `{}`", self.spiffe_id)
    }
}

/// An issued X.509-SVID as PEM: the chain (leaf first), its key, the trust bundle's roots.
#[derive(Clone, Serialize, Deserialize)]
pub struct IssuedSvid {
    pub spiffe_id: String,
    pub expires_at: u64,
    pub svid_pem: String,
    pub key_pem: String,
    pub bundle_pem: String,
}

impl std::fmt::Debug for IssuedSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedSvid")
            .field("spiffe_id", &self.spiffe_id)
            .field("expires_at", &self.expires_at)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// `identity bundle`: the trust domain's bundle as the issuer holds it now.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityBundle {}

impl AdminCommand for IdentityBundle {
    const NAME: &'static str = "identity.bundle";
    type Reply = BundleView;
}

/// A trust bundle in both of the CLI's formats.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleView {
    /// The SPIFFE bundle (JWKS) document.
    pub spiffe_json: String,
    /// The X.509 roots as PEM.
    pub pem: String,
}

/// `identity rotate prepare|activate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityRotate {
    /// `false`: prepare a new root; `true`: activate the prepared one.
    pub activate: bool,
}

impl AdminCommand for IdentityRotate {
    const NAME: &'static str = "identity.rotate";
    type Reply = RotateView;
    fn describe(&self) -> String {
        format!(
            "identity rotate {}",
            if self.activate { "activate" } else { "prepare" }
        )
    }
}

/// The root generation a rotation step prepared or activated, and the bundle's sequence.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RotateView {
    pub generation: u32,
    pub sequence: u64,
}

/// `audit prune`: drops whole segments of records before a time, leaving a signed anchor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditPrune {
    pub before: SystemTime,
}

impl AdminCommand for AuditPrune {
    const NAME: &'static str = "audit.prune";
    type Reply = meshgate_policy::PruneReport;
    fn describe(&self) -> String {
        format!(
            "audit prune before {}",
            meshgate_policy::to_rfc3339(self.before)
        )
    }
}

/// `audit query`: matching records stream as items; the reply is how many.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    pub principal: Option<String>,
    pub resource: Option<String>,
    pub decision: Option<DecisionKind>,
    pub policy: Option<String>,
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    pub limit: Option<usize>,
    #[serde(default)]
    pub trace_id: Option<String>,
}

impl AdminCommand for AuditQuery {
    const NAME: &'static str = "audit.query";
    type Reply = u64;
}

impl From<&Filter> for AuditQuery {
    fn from(f: &Filter) -> Self {
        Self {
            principal: f.principal.clone(),
            resource: f.resource.clone(),
            decision: f.decision,
            policy: f.policy.clone(),
            since: f.since,
            until: f.until,
            limit: f.limit,
            trace_id: f.trace_id.clone(),
        }
    }
}

impl From<AuditQuery> for Filter {
    fn from(q: AuditQuery) -> Self {
        Filter {
            principal: q.principal,
            resource: q.resource,
            decision: q.decision,
            policy: q.policy,
            since: q.since,
            until: q.until,
            limit: q.limit,
            trace_id: q.trace_id,
        }
    }
}

/// `audit verify`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditVerify {}

impl AdminCommand for AuditVerify {
    const NAME: &'static str = "audit.verify";
    type Reply = VerifyView;
}

/// A verification report as printed (the fields of [`VerifyReport`], in its order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyView {
    pub records: u64,
    pub checkpoints: u64,
    pub first_seq: u64,
    pub head_seq: u64,
    pub head_hash: String,
    /// The last record covered by a signed head whose signature checked.
    #[serde(default)]
    pub signed_seq: Option<u64>,
    pub problems: Vec<TamperView>,
    /// What is worth knowing but is not tampering (records after the last signed head).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// One problem found by verification (the fields of [`Tamper`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TamperView {
    pub seq: u64,
    pub what: String,
}

impl VerifyView {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl From<VerifyReport> for VerifyView {
    fn from(r: VerifyReport) -> Self {
        Self {
            records: r.records,
            checkpoints: r.checkpoints,
            first_seq: r.first_seq,
            head_seq: r.head_seq,
            head_hash: r.head_hash,
            signed_seq: r.signed_seq,
            notes: r.notes,
            problems: r
                .problems
                .into_iter()
                .map(|Tamper { seq, what }| TamperView { seq, what })
                .collect(),
        }
    }
}

/// `audit export`: every record streams as an item; the reply is how many.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditExport {}

impl AdminCommand for AuditExport {
    const NAME: &'static str = "audit.export";
    type Reply = u64;
}

/// `audit checkpoints`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditCheckpoints {}

impl AdminCommand for AuditCheckpoints {
    const NAME: &'static str = "audit.checkpoints";
    type Reply = Vec<Checkpoint>;
}

/// `audit checkpoint`: sign the head now.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditCheckpoint {}

impl AdminCommand for AuditCheckpoint {
    const NAME: &'static str = "audit.checkpoint";
    type Reply = Checkpoint;
}

/// `policy reload`: reload the enforced (and shadow) set from disk, all or nothing.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyReload {}

impl AdminCommand for PolicyReload {
    const NAME: &'static str = "policy.reload";
    type Reply = ReloadReply;
}

/// `routes reload`: re-read the traffic routes from the gateway's config file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutesReload {}

impl AdminCommand for RoutesReload {
    const NAME: &'static str = "routes.reload";
    type Reply = RoutesReply;
}

/// What a routes reload did. A refused set is an answer ("no"), not an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesReply {
    /// Whether the new routes now serve.
    pub reloaded: bool,
    /// Routes in use now (the old count when refused).
    pub routes: usize,
    /// Why the new routes were refused: every problem, each with its route and key.
    pub errors: Vec<String>,
    /// Backends that cannot serve now (accepted, skipped until they can).
    pub warnings: Vec<String>,
}

/// What a reload did. A refused set is an answer ("no"), not an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReply {
    /// Whether the new set now serves.
    pub reloaded: bool,
    /// The enforced set's version now (the old one when refused).
    pub version: String,
    /// The shadow set's version now, when one is loaded.
    pub shadow_version: Option<String>,
    /// Why the new set was refused: Cedar's diagnostics, rendered with file:line:column.
    pub diagnostics: Option<String>,
}
