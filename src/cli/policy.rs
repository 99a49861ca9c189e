//! `meshgate policy …`: validate, check, test, prove, diff and replay Cedar policy sets.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::anyhow;
use clap::Subcommand;
use meshgate_policy::{CheckContext, Filter, LoadError, PolicyEngine, what_if_facts};
use serde_json::json;

use super::audit::{open_log, parse_time};
use super::print_json;
use crate::admin::AdminClient;
use crate::admin::commands::PolicyReload;
use crate::exit::{CliError, CliResult, Outcome, ResultExt};

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate every policy in DIR against the schema (strict mode). Exit 0 valid, 1 invalid.
    Validate {
        /// The policy directory (`*.cedar` files and an optional `links.toml`).
        dir: PathBuf,
        /// A Cedar schema file (default: the schema shipped with meshgate).
        #[arg(long)]
        schema: Option<PathBuf>,
    },
    /// Decide one what-if request and show the determining policies (a deny still exits 0).
    Check {
        /// The policy directory.
        dir: PathBuf,
        /// The caller's SPIFFE ID, e.g. `spiffe://east.example/ns/shop/sa/web`.
        #[arg(long)]
        principal: String,
        /// An HTTP method (`GET`, `POST`, …) or `connect`.
        #[arg(long)]
        action: String,
        /// The service, `<service>.<namespace>.<cluster>`.
        #[arg(long)]
        resource: String,
        /// A partial context as JSON: path, raw_path, source_cluster, destination_cluster,
        /// destination_trust_domain, mtls, time, headers, claims, labels (all optional).
        #[arg(long)]
        context: Option<String>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// A Cedar schema file (default: the shipped schema).
        #[arg(long)]
        schema: Option<PathBuf>,
    },
    /// Run a TOML file of request/expected-decision cases. Exit 1 on any failure.
    Test {
        /// The policy directory.
        dir: PathBuf,
        /// The cases file (`[[case]]` tables; see `examples/policy-tests.toml`).
        cases: PathBuf,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
        /// A Cedar schema file (default: the shipped schema).
        #[arg(long)]
        schema: Option<PathBuf>,
    },
    /// Prove a property for every request (SymCC + cvc5): `--no-new-access OLD NEW`,
    /// `--equivalent OLD NEW`, `--never-errors DIR`, `--always-denies PATTERN DIR`. Exit 0
    /// proved, 1 refuted (with a counterexample as a `policy check` line), 2 bad input,
    /// 3 solver missing or failed.
    Prove(super::prove::ProveArgs),
    /// List the policies added, removed or changed from OLD to NEW, with each change's diff.
    /// Exit 0 when the sets hold the same policies, 1 when they differ.
    Diff {
        /// The old policy directory.
        old: PathBuf,
        /// The new policy directory.
        new: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// A Cedar schema file (default: the shipped schema).
        #[arg(long)]
        schema: Option<PathBuf>,
    },
    /// Re-decide recorded requests with a candidate policy set and list every flip. Exit 0
    /// when nothing flips, 1 when something does (a gate for CI).
    Replay {
        /// The state directory holding the decision log.
        #[arg(long)]
        log: PathBuf,
        /// The candidate policy directory.
        #[arg(long)]
        policies: PathBuf,
        /// Only records at or after this time: RFC 3339, or a duration ago (`7d`, `12h`).
        #[arg(long)]
        since: Option<String>,
        /// Only records before this time: RFC 3339, or a duration ago (`1d`).
        #[arg(long)]
        until: Option<String>,
        /// Only flips of one kind count (and are listed).
        #[arg(long, value_enum)]
        only: Option<FlipKind>,
        /// Print one JSON object with the flips and a summary.
        #[arg(long)]
        json: bool,
        /// A Cedar schema file (default: the shipped schema).
        #[arg(long)]
        schema: Option<PathBuf>,
    },
    /// Tell the running gateway to reload its policy set (and shadow set) from disk. An
    /// invalid set is refused and the old one keeps serving. Exit 0 reloaded, 1 refused,
    /// 3 no gateway running.
    Reload {
        /// The state directory of the running gateway.
        #[arg(long)]
        state: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which flips `policy replay --only` keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FlipKind {
    /// Recorded allows the candidate set denies.
    AllowToDeny,
    /// Recorded denies the candidate set allows.
    DenyToAllow,
}

impl PolicyCommand {
    pub fn run(self) -> CliResult<Outcome> {
        match self {
            Self::Validate { dir, schema } => validate(&dir, schema.as_deref()),
            Self::Check {
                dir,
                principal,
                action,
                resource,
                context,
                json,
                schema,
            } => check(
                &dir,
                schema.as_deref(),
                &principal,
                &action,
                &resource,
                context.as_deref(),
                json,
            ),
            Self::Test {
                dir,
                cases,
                json,
                schema,
            } => test(&dir, schema.as_deref(), &cases, json),
            Self::Prove(args) => args.run(),
            Self::Diff {
                old,
                new,
                json,
                schema,
            } => diff(&old, &new, schema.as_deref(), json),
            Self::Replay {
                log,
                policies,
                since,
                until,
                only,
                json,
                schema,
            } => replay(
                &log,
                &policies,
                schema.as_deref(),
                Window {
                    since: since.as_deref(),
                    until: until.as_deref(),
                },
                only,
                json,
            ),
            Self::Reload { state, json } => reload(&state, json),
        }
    }
}

fn validate(dir: &Path, schema: Option<&Path>) -> CliResult<Outcome> {
    match PolicyEngine::load(dir, schema) {
        Ok(engine) => {
            let s = engine.stats();
            println!(
                "valid: {} policies, {} templates, {} template links in `{}` (version {})",
                s.policies,
                s.templates,
                s.links,
                dir.display(),
                engine.version()
            );
            Ok(Outcome::Yes)
        }
        Err(e @ (LoadError::Invalid(_) | LoadError::NoPolicies(_))) => {
            eprintln!("invalid: {e}");
            Ok(Outcome::No)
        }
        Err(e) => Err(load_failure(e)),
    }
}

/// Loads a set for check/test/replay: an invalid set is malformed input (exit 2).
pub(crate) fn load_engine(dir: &Path, schema: Option<&Path>) -> CliResult<PolicyEngine> {
    PolicyEngine::load(dir, schema).map_err(load_failure)
}

fn load_failure(e: LoadError) -> CliError {
    match &e {
        LoadError::Io { source, .. } if source.kind() != std::io::ErrorKind::NotFound => {
            CliError::internal(e)
        }
        _ => CliError::input(e),
    }
}

fn check(
    dir: &Path,
    schema: Option<&Path>,
    principal: &str,
    action: &str,
    resource: &str,
    context: Option<&str>,
    json: bool,
) -> CliResult<Outcome> {
    let engine = load_engine(dir, schema)?;
    let ctx: CheckContext = match context {
        Some(text) => {
            serde_json::from_str(text).input_ctx(|| "`--context` is not a valid context object")?
        }
        None => CheckContext::default(),
    };
    let facts = what_if_facts(principal, action, resource, &ctx, SystemTime::now()).input_err()?;
    let d = engine.decide(&facts);
    if d.evaluation_failed {
        return Err(CliError::input(anyhow!("{}", d.errors.join("; "))));
    }
    let decision = if d.allowed { "allow" } else { "deny" };
    if json {
        print_json(&json!({
            "decision": decision,
            "reasons": d.reasons,
            "errors": d.errors,
            "policy_version": d.policy_version,
            "path": d.normalized_path,
            "quota": d.quota.as_ref().map(ToString::to_string),
            "eval_time_us": d.eval_time.as_micros(),
        }))?;
    } else {
        println!("{decision}");
        println!("  determined by: {}", reasons_text(&d.reasons, d.allowed));
        for e in &d.errors {
            println!("  error: {e}");
        }
        if let Some(q) = &d.quota {
            println!("  quota: {q}");
        }
        println!("  path: {}", d.normalized_path);
        println!("  policy set: {}", d.policy_version);
    }
    Ok(Outcome::Yes)
}

pub(crate) fn reasons_text(reasons: &[String], allowed: bool) -> String {
    match (reasons.is_empty(), allowed) {
        (true, false) => "no policy (default deny)".to_owned(),
        (true, true) => "no policy".to_owned(),
        _ => reasons.join(", "),
    }
}

fn test(dir: &Path, schema: Option<&Path>, cases: &Path, json: bool) -> CliResult<Outcome> {
    let engine = load_engine(dir, schema)?;
    let text = std::fs::read_to_string(cases)
        .input_ctx(|| format!("cannot read `{}`", cases.display()))?;
    let results = meshgate_policy::run_cases(&engine, &text, SystemTime::now())
        .input_ctx(|| format!("in `{}`", cases.display()))?;
    let failed = results.iter().filter(|r| !r.passed).count();
    if json {
        print_json(
            &json!({ "passed": results.len() - failed, "failed": failed, "cases": results }),
        )?;
    } else {
        for r in &results {
            if r.passed {
                println!("PASS {}", r.name);
                continue;
            }
            let got = if r.allowed { "allow" } else { "deny" };
            let want = match r.expected {
                meshgate_policy::Expect::Allow => "allow",
                _ => "deny",
            };
            println!("FAIL {}: expected {want}, got {got}", r.name);
            if let Some(want) = &r.expected_reasons {
                println!("  expected determining policies: {}", want.join(", "));
            }
            println!("  determined by: {}", reasons_text(&r.reasons, r.allowed));
            for e in &r.errors {
                println!("  error: {e}");
            }
        }
        println!("{} passed, {failed} failed", results.len() - failed);
    }
    Ok(if failed == 0 {
        Outcome::Yes
    } else {
        Outcome::No
    })
}

/// Policies live in the running gateway's memory: there is nothing to reload without one.
fn reload(state: &Path, json: bool) -> CliResult<Outcome> {
    let Some(client) = AdminClient::live(state)? else {
        return Err(CliError::internal(anyhow!(
            "no gateway is running on `{}` (no live admin socket); policies are loaded when `meshgate gateway` starts",
            state.display()
        )));
    };
    let reply = client.call(&PolicyReload {})?;
    if json {
        print_json(&reply)?;
    } else if reply.reloaded {
        println!("reloaded: policy set {}", reply.version);
        if let Some(shadow) = &reply.shadow_version {
            println!("  shadow set {shadow}");
        }
    } else {
        eprintln!(
            "refused: {}",
            reply
                .diagnostics
                .as_deref()
                .unwrap_or("the new policy set is invalid")
        );
        eprintln!("the gateway keeps serving policy set {}", reply.version);
    }
    Ok(if reply.reloaded {
        Outcome::Yes
    } else {
        Outcome::No
    })
}

/// `--since`/`--until` as given.
struct Window<'a> {
    since: Option<&'a str>,
    until: Option<&'a str>,
}

/// RFC 3339, or a duration before now (`7d`, `12h`, `30m`).
pub(crate) fn time_or_ago(value: Option<&str>, now: SystemTime) -> CliResult<Option<SystemTime>> {
    let Some(v) = value else { return Ok(None) };
    if let Ok(ago) = humantime::parse_duration(v) {
        return now
            .checked_sub(ago)
            .map(Some)
            .ok_or_else(|| CliError::input(anyhow!("`{v}` reaches before the year 1970")));
    }
    parse_time(Some(v)).map_err(|_| {
        CliError::input(anyhow!(
            "`{v}` is neither an RFC 3339 time (like `2025-01-02T03:04:05Z`) nor a duration (like `7d` or `12h`)"
        ))
    })
}

fn replay(
    state: &Path,
    policies: &Path,
    schema: Option<&Path>,
    window: Window<'_>,
    only: Option<FlipKind>,
    json: bool,
) -> CliResult<Outcome> {
    let engine = load_engine(policies, schema)?;
    let now = SystemTime::now();
    let filter = Filter {
        since: time_or_ago(window.since, now)?,
        until: time_or_ago(window.until, now)?,
        ..Filter::default()
    };
    let log = open_log(state)?;
    let (mut flips, mut sum) = meshgate_policy::replay(&log, &engine, &filter).internal_err()?;
    match only {
        Some(FlipKind::AllowToDeny) => {
            flips.retain(|f| f.before.allowed);
            sum.deny_to_allow = 0;
        }
        Some(FlipKind::DenyToAllow) => {
            flips.retain(|f| !f.before.allowed);
            sum.allow_to_deny = 0;
        }
        None => {}
    }
    let outcome = if flips.is_empty() {
        Outcome::Yes
    } else {
        Outcome::No
    };
    if json {
        print_json(
            &json!({ "flips": flips, "summary": sum, "candidate_version": engine.version().to_string() }),
        )?;
        return Ok(outcome);
    }
    let word = |a: bool| if a { "allow" } else { "deny" };
    for f in &flips {
        println!(
            "seq {} {} {} {} {} {}: {} -> {}",
            f.seq,
            f.time,
            f.principal,
            f.action,
            f.resource,
            f.path,
            word(f.before.allowed),
            word(f.after.allowed)
        );
        println!(
            "  before: {} (policy set {})",
            reasons_text(&f.before.reasons, f.before.allowed),
            f.before.policy_version
        );
        println!(
            "  after:  {} (policy set {})",
            reasons_text(&f.after.reasons, f.after.allowed),
            f.after.policy_version
        );
        for e in &f.errors {
            println!("  error: {e}");
        }
    }
    let counted = match only {
        Some(FlipKind::AllowToDeny) => " (counting allow -> deny only)",
        Some(FlipKind::DenyToAllow) => " (counting deny -> allow only)",
        None => "",
    };
    println!(
        "{} requests replayed, {} skipped (no request facts); {} flips{counted}: {} allow -> deny, {} deny -> allow",
        sum.replayed,
        sum.skipped,
        sum.allow_to_deny + sum.deny_to_allow,
        sum.allow_to_deny,
        sum.deny_to_allow
    );
    Ok(outcome)
}

fn diff(old: &Path, new: &Path, schema: Option<&Path>, json: bool) -> CliResult<Outcome> {
    let (old_engine, new_engine) = (load_engine(old, schema)?, load_engine(new, schema)?);
    let d = meshgate_policy::diff_sets(&old_engine, &new_engine);
    if json {
        print_json(&d)?;
    } else {
        for p in &d.added {
            println!("added `{}`:", p.id);
            p.text.lines().for_each(|l| println!("+ {l}"));
        }
        for p in &d.removed {
            println!("removed `{}`:", p.id);
            p.text.lines().for_each(|l| println!("- {l}"));
        }
        for c in &d.changed {
            println!("changed `{}`:", c.id);
            c.diff.iter().for_each(|l| println!("{l}"));
        }
        println!(
            "{} added, {} removed, {} changed",
            d.added.len(),
            d.removed.len(),
            d.changed.len()
        );
    }
    Ok(if d.is_empty() {
        Outcome::Yes
    } else {
        Outcome::No
    })
}
