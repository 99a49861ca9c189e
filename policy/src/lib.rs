//! Cedar authorization, rate quotas and the tamper-evident decision log for meshgate.
//!
//! - [`PolicyEngine`] loads a directory of `.cedar` files (plus `links.toml` for template
//!   links), validates it in strict mode against the mesh schema ([`MESH_SCHEMA`]), and
//!   decides [`RequestFacts`] into a [`Decision`]; an optional shadow set is evaluated
//!   beside it and never enforced. Reloads swap the set atomically; an invalid set is refused.
//! - [`QuotaLimiter`] charges `@quota` annotations (GCRA, sharded, bounded memory, time
//!   passed in).
//! - [`DecisionLog`] is the hash-chained, checkpoint-signed decision log: append-only
//!   segment files with a signed head per flush batch.
//! - [`Prover`] proves properties of policy sets for every request (no new access,
//!   equivalence, never errors, always denies) with Cedar's symbolic compiler and cvc5.
//!
//! This crate knows nothing of sockets or TLS; the gateway hands it facts and a sled `Db`.

mod console;
mod diag;
mod diff;
mod engine;
mod facts;
mod load;
mod log;
mod path;
mod prove;
mod quota;
mod slice;
mod subject;
mod timefmt;
mod tools;

pub use console::{CONSOLE_SCHEMA, ConsoleDecision, ConsolePolicy, ConsoleRequest};
pub use diag::PolicyDiagnostic;
pub use diff::{ChangedPolicy, PolicyText, SetDiff, diff_sets};
pub use engine::{Decision, PolicyEngine, ReloadStatus, ShadowOutcome};
pub use facts::{FactsError, HIDDEN_HEADERS, RequestFacts};
pub use load::{LINKS_FILE, LoadError, LoadStats, MESH_SCHEMA, PolicyVersion, SourceFile};
pub use log::{
    CallerGrouping, Checkpoint, CheckpointSigner, DecisionKind, DecisionLog, DecisionRecord,
    DecisionRecordInput, Durability, Edge, EdgeCounts, Filter, GENESIS_HASH, GraphBuilder,
    HashesAt, LogError, LogOptions, MigrateReport, Node, PruneReport, Receipt, ServiceGraph,
    Tamper, TrafficNote, VerifyReport, migrate_from_sled, new_decision_id, sled_log_present,
};
pub use path::{MAX_PATH_LEN, PathError, PathRules, normalize_path, normalize_path_with};
pub use prove::{
    Counterexample, EnvTime, Finding, INSTALL_HINT, PrincipalPattern, Proof, ProveError, Prover,
    Solver,
};
pub use quota::{QuotaKey, QuotaLimiter, QuotaParseError, QuotaResult, QuotaSpec};
pub use timefmt::{parse_rfc3339, to_rfc3339};
pub use tools::{
    CaseResult, CheckContext, Expect, Flip, ReplaySummary, Side, ToolInputError, replay, run_cases,
    what_if_facts,
};
