//! `meshgate audit …`: query, verify, export the decision log; export and make checkpoints.
//!
//! The commands go through [`AuditBackend`]: while a gateway runs, [`backend`] picks its
//! admin socket ([`AdminClient`]); otherwise it opens the state directly ([`LocalBackend`]).
//! Both produce the same values, so the output is the same either way.

use std::fs;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, anyhow};
use clap::{Subcommand, ValueEnum};
use meshgate_policy::{
    CallerGrouping, Checkpoint, CheckpointSigner, DecisionKind, DecisionLog, DecisionRecord,
    Filter, GraphBuilder,
};

use super::print_json;
use crate::admin::commands::{
    AuditCheckpoint, AuditCheckpoints, AuditExport, AuditPrune, AuditQuery, AuditVerify, VerifyView,
};
use crate::admin::{AdminClient, ops};
use crate::exit::{CliError, CliResult, Outcome, ResultExt};
use crate::state::State;

/// The checkpoint signing key, PKCS#8 PEM, mode 0600, in the state's `keys/` directory.
pub const CHECKPOINT_KEY_FILE: &str = "audit-checkpoint.pem";

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List decision records, oldest first.
    Query {
        /// The state directory.
        state: PathBuf,
        /// Only this caller (SPIFFE ID).
        #[arg(long)]
        principal: Option<String>,
        /// Only this service (`<service>.<namespace>.<cluster>`).
        #[arg(long)]
        resource: Option<String>,
        /// Only this decision: allow, deny, quota_exceeded, error, admin, fault.
        #[arg(long)]
        decision: Option<String>,
        /// Only records this policy id determined (enforced or shadow).
        #[arg(long)]
        policy: Option<String>,
        /// Only records at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only records before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// At most this many records.
        #[arg(long)]
        limit: Option<usize>,
        /// Only the records of this W3C trace id (32 hex digits; also in every span).
        #[arg(long)]
        trace: Option<String>,
        /// Print a JSON array of records.
        #[arg(long)]
        json: bool,
    },
    /// Check the hash chain and every checkpoint. Exit 0 ok, 1 tampering, 3 unreadable.
    Verify {
        /// The state directory.
        state: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Also check the chain against checkpoint heads held by peers (files written by
        /// their `meshgate federation witnessed`).
        #[arg(long, num_args = 1..)]
        witnesses: Vec<PathBuf>,
    },
    /// Export every record (for SIEM ingestion).
    Export {
        /// The state directory.
        state: PathBuf,
        /// The output format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
    },
    /// Print the signed checkpoint heads as JSON, to be held somewhere else.
    Checkpoints {
        /// The state directory.
        state: PathBuf,
    },
    /// Sign the current chain head now (creates `keys/audit-checkpoint.pem` if missing).
    Checkpoint {
        /// The state directory.
        state: PathBuf,
    },
    /// Who called whom: caller → service edges with their allow/deny/429/error counts, from
    /// one or more clusters' logs (each request is recorded by one gateway, so they add up).
    /// Reads the log files directly, also beside a running gateway.
    Graph {
        /// The state directories whose logs to read.
        #[arg(required = true, num_args = 1..)]
        states: Vec<PathBuf>,
        /// Only decisions at or after this time: RFC 3339, or a duration ago (`1h`, `7d`).
        #[arg(long)]
        since: Option<String>,
        /// Only decisions before this time: RFC 3339, or a duration ago.
        #[arg(long)]
        until: Option<String>,
        /// One node per workload or per namespace.
        #[arg(long, value_enum, default_value_t = GraphBy::Workload)]
        by: GraphBy,
        /// JSON (nodes, edges, counts) or Graphviz DOT (refused edges in red).
        #[arg(long, value_enum, default_value_t = GraphFormat::Json)]
        format: GraphFormat,
    },
    /// Drop whole segments whose records are all older than `--before`, leaving a signed
    /// anchor so the rest still verifies (also frees room under `audit.max_disk_mib`).
    Prune {
        /// The state directory.
        state: PathBuf,
        /// Records before this time may go: RFC 3339, or a duration ago (`30d`).
        #[arg(long)]
        before: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move a decision log of an earlier version (kept inside `db/`) into the segment files
    /// of `audit/`, byte for byte, verify it there, then drop the old copy. Run it once with
    /// no gateway running; a gateway refuses to start until it is done.
    Migrate {
        /// The state directory.
        state: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphBy {
    /// One node per caller SPIFFE ID.
    Workload,
    /// One node per caller namespace.
    Namespace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    Json,
    Dot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// One JSON object per line: the canonical record body plus its `hash`.
    Jsonl,
}

impl AuditCommand {
    pub fn run(self) -> CliResult<Outcome> {
        match self {
            Self::Prune {
                state,
                before,
                json,
            } => {
                let before = super::policy::time_or_ago(Some(&before), SystemTime::now())?
                    .ok_or_else(|| CliError::input(anyhow!("`--before` is required")))?;
                let cmd = AuditPrune { before };
                let report = if let Some(client) = AdminClient::live(&state)? {
                    client.call(&cmd)?
                } else {
                    let st = State::open(&state).internal_err()?;
                    let log = open_appender(&st)?;
                    let what = crate::admin::protocol::AdminCommand::describe(&cmd);
                    log.append_admin_event(&whoami(), &what, SystemTime::now())
                        .internal_err()?;
                    log.prune_before(before, SystemTime::now()).internal_err()?
                };
                if json {
                    print_json(&report)?;
                } else {
                    println!(
                        "pruned {} records in {} segments{}",
                        report.removed,
                        report.segments,
                        report
                            .anchor
                            .as_ref()
                            .map(|a| format!("; the log now starts after record {}", a.seq))
                            .unwrap_or_default()
                    );
                }
                Ok(Outcome::Yes)
            }
            Self::Graph {
                states,
                since,
                until,
                by,
                format,
            } => {
                let now = SystemTime::now();
                let filter = Filter {
                    since: super::policy::time_or_ago(since.as_deref(), now)?,
                    until: super::policy::time_or_ago(until.as_deref(), now)?,
                    ..Filter::default()
                };
                let mut graph = GraphBuilder::new(match by {
                    GraphBy::Workload => CallerGrouping::Workload,
                    GraphBy::Namespace => CallerGrouping::Namespace,
                });
                for state in &states {
                    let log = open_log(state)?;
                    graph.add_log(&log, &filter).internal_ctx(|| {
                        format!("cannot read the decision log of `{}`", state.display())
                    })?;
                }
                let graph = graph.finish();
                match format {
                    GraphFormat::Json => print_json(&graph)?,
                    GraphFormat::Dot => print!("{}", graph.to_dot()),
                }
                Ok(Outcome::Yes)
            }
            Self::Query {
                state,
                principal,
                resource,
                decision,
                policy,
                since,
                until,
                limit,
                trace,
                json,
            } => {
                if let Some(t) = &trace
                    && !(t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
                {
                    return Err(CliError::input(anyhow!(
                        "`--trace {t}`: a W3C trace id is 32 hex digits"
                    )));
                }
                let decision = decision
                    .map(|d| {
                        d.parse::<DecisionKind>()
                            .map_err(|e| CliError::input(anyhow!("`--decision`: {e}")))
                    })
                    .transpose()?;
                let filter = Filter {
                    principal,
                    resource,
                    decision,
                    policy,
                    since: parse_time(since.as_deref())?,
                    until: parse_time(until.as_deref())?,
                    limit,
                    trace_id: trace.map(|t| t.to_ascii_lowercase()),
                };
                query(backend(&state)?.as_ref(), &filter, json)
            }
            Self::Verify {
                state,
                json,
                witnesses,
            } => {
                let backend = backend(&state)?;
                let chain = verify(backend.as_ref(), json)?;
                if witnesses.is_empty() {
                    return Ok(chain);
                }
                // Read from the log's own files (the backend may hold the state open).
                let dir = State::audit_dir_in(&state);
                let log = DecisionLog::open_read_only(&dir, None).internal_ctx(|| {
                    format!("cannot open the decision log in `{}`", dir.display())
                })?;
                let witnessed = super::federation::verify_witnesses(&log, &witnesses, json)?;
                Ok(if chain == Outcome::Yes && witnessed == Outcome::Yes {
                    Outcome::Yes
                } else {
                    Outcome::No
                })
            }
            Self::Export {
                state,
                format: ExportFormat::Jsonl,
            } => {
                let stdout = std::io::stdout();
                let n = backend(&state)?.export_jsonl(&mut stdout.lock())?;
                tracing::info!(records = n, "exported");
                Ok(Outcome::Yes)
            }
            Self::Checkpoints { state } => {
                print_json(&backend(&state)?.checkpoints()?)?;
                Ok(Outcome::Yes)
            }
            Self::Checkpoint { state } => {
                let cp = backend(&state)?.checkpoint(&whoami())?;
                print_json(&cp)?;
                Ok(Outcome::Yes)
            }
            Self::Migrate { state } => migrate(&state),
        }
    }
}

/// `meshgate audit migrate`: refuses a running gateway (it holds the state), copies, records
/// the migration as an admin event in the new log.
fn migrate(state: &Path) -> CliResult<Outcome> {
    if AdminClient::live(state)?.is_some() {
        return Err(CliError::internal(anyhow!(
            "a gateway is running on `{}`; stop it, migrate, start it again",
            state.display()
        )));
    }
    let st = State::open(state).internal_err()?;
    if !meshgate_policy::sled_log_present(st.db()).internal_err()? {
        println!(
            "nothing to migrate: `{}` holds no decision log in the old format",
            state.display()
        );
        return Ok(Outcome::Yes);
    }
    let report = meshgate_policy::migrate_from_sled(st.db(), &st.audit_dir()).internal_err()?;
    record_admin(
        &st,
        &format!(
            "audit migrate ({} records, {} checkpoints)",
            report.records, report.checkpoints
        ),
    )?;
    println!(
        "migrated {} records (head seq {}) and {} checkpoints into `{}`{}",
        report.records,
        report.head_seq,
        report.checkpoints,
        st.audit_dir().display(),
        if report.skipped_checkpoints > 0 {
            format!(
                "; {} checkpoints signed by another key were left out",
                report.skipped_checkpoints
            )
        } else {
            String::new()
        }
    );
    Ok(Outcome::Yes)
}

/// What the audit commands need from a decision log, wherever it is.
pub trait AuditBackend {
    fn query(&self, filter: &Filter) -> CliResult<Vec<DecisionRecord>>;
    fn verify(&self) -> CliResult<VerifyView>;
    fn export_jsonl(&self, out: &mut dyn Write) -> CliResult<u64>;
    fn checkpoints(&self) -> CliResult<Vec<Checkpoint>>;
    /// Signs the head now and records the admin event (who, "audit checkpoint"). Through
    /// the admin socket, `who` is the peer's uid as the gateway sees it.
    fn checkpoint(&self, who: &str) -> CliResult<Checkpoint>;
}

/// The state opened directly (no gateway running).
#[derive(Debug)]
pub struct LocalBackend {
    state: State,
    log: DecisionLog,
    /// Set when the key pinned in the log is not the state's checkpoint key file.
    key_mismatch: Option<String>,
}

impl AuditBackend for LocalBackend {
    fn query(&self, filter: &Filter) -> CliResult<Vec<DecisionRecord>> {
        let mut out = Vec::new();
        ops::query(&self.log, filter, |r| {
            out.push(r.clone());
            Ok(())
        })?;
        Ok(out)
    }
    fn verify(&self) -> CliResult<VerifyView> {
        let mut view = ops::verify(&self.log)?;
        if let Some(what) = &self.key_mismatch {
            view.problems.insert(
                0,
                crate::admin::commands::TamperView {
                    seq: 0,
                    what: what.clone(),
                },
            );
        }
        Ok(view)
    }
    fn export_jsonl(&self, out: &mut dyn Write) -> CliResult<u64> {
        self.log.export_jsonl(out).internal_err()
    }
    fn checkpoints(&self) -> CliResult<Vec<Checkpoint>> {
        self.log.checkpoints().internal_err()
    }
    fn checkpoint(&self, who: &str) -> CliResult<Checkpoint> {
        let log = open_appender(&self.state)?;
        log.append_admin_event(who, "audit checkpoint", SystemTime::now())
            .internal_err()?;
        log.checkpoint(SystemTime::now()).internal_err()
    }
}

/// The running gateway's decision log, over its admin socket.
impl AuditBackend for AdminClient {
    fn query(&self, filter: &Filter) -> CliResult<Vec<DecisionRecord>> {
        let mut out = Vec::new();
        self.call_streaming(&AuditQuery::from(filter), |item| {
            out.push(serde_json::from_value(item).internal_err()?);
            Ok(())
        })?;
        Ok(out)
    }
    fn verify(&self) -> CliResult<VerifyView> {
        self.call(&AuditVerify {})
    }
    fn export_jsonl(&self, out: &mut dyn Write) -> CliResult<u64> {
        // The same lines as `DecisionLog::export_jsonl`: each record re-serialized.
        self.call_streaming(&AuditExport {}, |item| {
            let record: DecisionRecord = serde_json::from_value(item).internal_err()?;
            let line = serde_json::to_string(&record).internal_err()?;
            writeln!(out, "{line}").internal_ctx(|| "cannot write the export")
        })
    }
    fn checkpoints(&self) -> CliResult<Vec<Checkpoint>> {
        self.call(&AuditCheckpoints {})
    }
    fn checkpoint(&self, _who: &str) -> CliResult<Checkpoint> {
        self.call(&AuditCheckpoint {})
    }
}

/// Picks the backend for a state directory: the running gateway when one answers on its
/// admin socket, else the state opened directly.
pub fn backend(state: &Path) -> CliResult<Box<dyn AuditBackend>> {
    if let Some(client) = AdminClient::live(state)? {
        return Ok(Box::new(client));
    }
    let state = State::open(state).internal_err()?;
    // Verify against the key file too (not only the key pinned in the log), so a rewritten
    // pin cannot make another key's checkpoints pass.
    let signer = existing_checkpoint_signer(&state)?;
    let log = open_reader(&state, signer.as_ref())?;
    let key_mismatch = match (&signer, log.pinned_key()) {
        (Some(s), Some(pinned)) if pinned != s.public_key_hex() => Some(format!(
            "the checkpoint key pinned in the log (`{pinned}`) is not `keys/{CHECKPOINT_KEY_FILE}` (`{}`)",
            s.public_key_hex()
        )),
        _ => None,
    };
    Ok(Box::new(LocalBackend {
        state,
        log,
        key_mismatch,
    }))
}

/// The state's checkpoint key, if the key file exists (never creates one).
fn existing_checkpoint_signer(state: &State) -> CliResult<Option<CheckpointSigner>> {
    let path = state.keys_dir().join(CHECKPOINT_KEY_FILE);
    if !path.exists() {
        return Ok(None);
    }
    checkpoint_signer(state).map(Some).internal_err()
}

/// Refuses a state whose decision log still has the old format.
fn refuse_old_format(state: &State) -> CliResult<()> {
    if meshgate_policy::sled_log_present(state.db()).internal_err()? {
        return Err(CliError::internal(anyhow!(
            "`{}` holds a decision log in the old format; run `meshgate audit migrate {}` first",
            state.root().display(),
            state.root().display()
        )));
    }
    Ok(())
}

/// The state's decision log opened to read (an empty log if none was written yet).
fn open_reader(state: &State, signer: Option<&CheckpointSigner>) -> CliResult<DecisionLog> {
    refuse_old_format(state)?;
    let dir = state.audit_dir();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .internal_ctx(|| format!("cannot create `{}`", dir.display()))?;
    DecisionLog::open_read_only(&dir, signer)
        .internal_ctx(|| format!("cannot open the decision log in `{}`", dir.display()))
}

/// The state's decision log opened to append (no gateway may be running on it).
fn open_appender(state: &State) -> CliResult<DecisionLog> {
    refuse_old_format(state)?;
    let signer = checkpoint_signer(state).internal_err()?;
    DecisionLog::open(&state.audit_dir(), Some(signer), Default::default()).internal_ctx(|| {
        format!(
            "cannot open the decision log in `{}`",
            state.audit_dir().display()
        )
    })
}

/// Opens a state's decision log to read; unreadable state is exit 3. While a gateway runs
/// on the state it holds the database, but the log's segment files are readable beside it
/// (and a gateway runs only on a log of the current format).
pub fn open_log(state: &Path) -> CliResult<DecisionLog> {
    if AdminClient::live(state)?.is_some() {
        let dir = State::audit_dir_in(state);
        return DecisionLog::open_read_only(&dir, None)
            .internal_ctx(|| format!("cannot open the decision log in `{}`", dir.display()));
    }
    let state = State::open(state).internal_err()?;
    open_reader(&state, None)
}

/// Parses an optional RFC 3339 time flag (malformed → exit 2).
pub fn parse_time(value: Option<&str>) -> CliResult<Option<SystemTime>> {
    value
        .map(|v| {
            meshgate_policy::parse_rfc3339(v).ok_or_else(|| {
                CliError::input(anyhow!(
                    "`{v}` is not an RFC 3339 time (like `2025-01-02T03:04:05Z`)"
                ))
            })
        })
        .transpose()
}

fn query(backend: &dyn AuditBackend, filter: &Filter, json: bool) -> CliResult<Outcome> {
    let records = backend.query(filter)?;
    if json {
        print_json(&records)?;
        return Ok(Outcome::Yes);
    }
    for r in &records {
        let reasons = if r.reasons.is_empty() {
            "-".to_owned()
        } else {
            r.reasons.join(",")
        };
        println!(
            "{} {} {} {} {} {} {} {} policies={} id={}",
            r.seq,
            r.time,
            r.decision.as_str(),
            r.principal,
            r.action,
            if r.resource.is_empty() {
                "-"
            } else {
                &r.resource
            },
            if r.path.is_empty() { "-" } else { &r.path },
            r.status.map_or_else(|| "-".to_owned(), |s| s.to_string()),
            reasons,
            r.id
        );
    }
    Ok(Outcome::Yes)
}

fn verify(backend: &dyn AuditBackend, json: bool) -> CliResult<Outcome> {
    let report = backend.verify()?;
    if json {
        print_json(&report)?;
    } else if let Some(first) = report.problems.first() {
        println!(
            "tampering found: first bad record seq {}: {}",
            first.seq, first.what
        );
        for p in report.problems.iter().skip(1) {
            println!("  also at seq {}: {}", p.seq, p.what);
        }
    } else {
        println!(
            "ok: {} records (seq {} to {}), {} checkpoints verified; head {}",
            report.records, report.first_seq, report.head_seq, report.checkpoints, report.head_hash
        );
    }
    if !json {
        match report.signed_seq {
            Some(seq) => println!("signed head: seq {seq}"),
            None => println!("signed head: none (no record is covered by a signed checkpoint)"),
        }
        for note in &report.notes {
            println!("note: {note}");
        }
    }
    Ok(if report.is_ok() {
        Outcome::Yes
    } else {
        Outcome::No
    })
}

/// Loads `keys/audit-checkpoint.pem`, creating it (0600 from the start, atomically) if
/// missing. A key file readable by others is refused.
pub fn checkpoint_signer(state: &State) -> anyhow::Result<CheckpointSigner> {
    let path = state.keys_dir().join(CHECKPOINT_KEY_FILE);
    match meshgate_identity::read_private(&path) {
        Ok(bytes) => {
            let pem = String::from_utf8(bytes)
                .map_err(|_| anyhow!("`{}` is not a PEM file", path.display()))?;
            Ok(CheckpointSigner::from_pkcs8_pem(&pem)
                .with_context(|| format!("in `{}`", path.display()))?)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let (signer, der) = CheckpointSigner::generate()?;
            crate::state::write_private(&path, CheckpointSigner::pkcs8_pem(&der).as_bytes())?;
            Ok(signer)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read `{}`", path.display())),
    }
}

/// Who runs the command, for admin events: `$USER`, else the numeric uid.
/// Records an admin action taken on a state opened directly (no gateway running): who,
/// what, when. Fails closed: an action that cannot be recorded is not taken.
pub fn record_admin(state: &State, what: &str) -> CliResult<()> {
    let log = open_appender(state)?;
    log.append_admin_event(&whoami(), what, SystemTime::now())
        .internal_ctx(|| "cannot record the admin action; nothing was changed")?;
    Ok(())
}

fn whoami() -> String {
    use std::os::unix::fs::MetadataExt;
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            fs::metadata("/proc/self")
                .ok()
                .map(|m| format!("uid:{}", m.uid()))
        })
        .unwrap_or_else(|| "unknown".to_owned())
}
