//! `meshgate policy prove`: proofs about policy sets for every request, with the
//! counterexample of a refutation printed as a `meshgate policy check` command line.

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use clap::Args;
use meshgate_policy::{Counterexample, PrincipalPattern, Proof, ProveError, Prover, Solver};
use serde_json::json;

use super::policy::load_engine;
use super::{block_on, print_json};
use crate::exit::{CliError, CliResult, Outcome};

/// `policy prove` arguments.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("property").required(true).multiple(false))]
pub struct ProveArgs {
    /// OLD and NEW policy directories (`--no-new-access`, `--equivalent`), or the one
    /// directory to check (`--never-errors`, `--always-denies`).
    #[arg(required = true, num_args = 1..=2, value_name = "DIR")]
    dirs: Vec<PathBuf>,
    /// Prove that every request NEW allows, OLD allows too.
    #[arg(long, group = "property")]
    no_new_access: bool,
    /// Prove that OLD and NEW decide every request alike.
    #[arg(long, group = "property")]
    equivalent: bool,
    /// Prove that no policy can fail to evaluate.
    #[arg(long, group = "property")]
    never_errors: bool,
    /// Prove that every request from principals matching PATTERN is denied:
    /// `spiffe://TD/ns/NS/*`, `spiffe://TD/ns/NS/sa/SA`, `spiffe://TD/*` (with `*` inside the
    /// parts), an exact SPIFFE ID, or a Cedar entity like `Namespace::"east.example/batch"`.
    #[arg(long, group = "property", value_name = "PATTERN")]
    always_denies: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// A Cedar schema file (default: the shipped schema).
    #[arg(long)]
    schema: Option<PathBuf>,
    /// Time limit per solver query, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

impl ProveArgs {
    pub fn run(self) -> CliResult<Outcome> {
        let pair = self.no_new_access || self.equivalent;
        let (old, new) = match (pair, self.dirs.as_slice()) {
            (true, [old, new]) => (Some(old.as_path()), new.as_path()),
            (false, [dir]) => (None, dir.as_path()),
            (true, _) => {
                return Err(CliError::input(anyhow!(
                    "`--no-new-access` and `--equivalent` compare two directories: OLD NEW"
                )));
            }
            (false, _) => {
                return Err(CliError::input(anyhow!(
                    "`--never-errors` and `--always-denies` check one directory"
                )));
            }
        };
        let pattern = self
            .always_denies
            .as_deref()
            .map(str::parse::<PrincipalPattern>)
            .transpose()
            .map_err(prove_err)?;
        let schema = self.schema.as_deref();
        let new_engine = load_engine(new, schema)?;
        let old_engine = old.map(|d| load_engine(d, schema)).transpose()?;
        let solver = Solver::locate()
            .map_err(prove_err)?
            .with_limit_ms(self.timeout.saturating_mul(1000));
        let prover = Prover::new(solver.clone());
        let proof = block_on(async {
            match (&old_engine, &pattern) {
                (Some(old), _) if self.equivalent => prover.equivalent(old, &new_engine).await,
                (Some(old), _) => prover.no_new_access(old, &new_engine).await,
                (None, Some(p)) => prover.always_denies(&new_engine, p).await,
                (None, None) => prover.never_errors(&new_engine).await,
            }
        })?
        .map_err(prove_err)?;
        let dirs = Dirs { old, new };
        if self.json {
            print_json(&json!({
                "proved": proof.proved(),
                "property": proof.property,
                "findings": proof.findings.iter().map(|f| json!({
                    "action": f.action,
                    "policy": f.policy,
                    "what": f.what,
                    "counterexample": f.counterexample,
                    "check": f.counterexample.as_ref().map(|c| check_line(dirs.for_finding(&f.what), c)),
                    "decided": f.decided,
                })).collect::<Vec<_>>(),
                "envs": proof.envs,
                "ms": proof.ms,
                "solver": solver.to_string(),
            }))?;
        } else {
            print_text(&proof, &dirs, &solver);
        }
        Ok(if proof.proved() {
            Outcome::Yes
        } else {
            Outcome::No
        })
    }
}

/// The directories a refutation's `policy check` line should name.
struct Dirs<'a> {
    old: Option<&'a Path>,
    new: &'a Path,
}

impl Dirs<'_> {
    /// The set that allows (or errs on) the counterexample.
    fn for_finding(&self, what: &str) -> &Path {
        match self.old {
            Some(old) if what.starts_with("the old set") => old,
            _ => self.new,
        }
    }
}

fn print_text(proof: &Proof, dirs: &Dirs<'_>, solver: &Solver) {
    let envs = proof.envs.len();
    if proof.proved() {
        println!(
            "proved: {} ({envs} request environments, {} ms, {solver})",
            proof.property, proof.ms
        );
        return;
    }
    println!(
        "refuted: {} ({} findings; {envs} request environments, {} ms, {solver})",
        proof.property,
        proof.findings.len(),
        proof.ms
    );
    for f in &proof.findings {
        println!();
        println!("{} (action {})", f.what, f.action);
        if let Some(c) = &f.counterexample {
            let note = if c.confirmed {
                "confirmed by meshgate's engines"
            } else {
                "NOT confirmed by meshgate's engines: the solver's request could not be rebuilt exactly"
            };
            println!("  counterexample ({note}):");
            println!("  {}", check_line(dirs.for_finding(&f.what), c));
        }
        for d in &f.decided {
            println!("  {d}");
        }
    }
}

/// `meshgate policy check DIR --principal … --action … --resource … --context '…'`.
fn check_line(dir: &Path, c: &Counterexample) -> String {
    format!(
        "meshgate policy check {} --principal {} --action {} --resource {} --context {}",
        shell_quote(&dir.display().to_string()),
        shell_quote(&c.principal),
        shell_quote(&c.action),
        shell_quote(&c.resource),
        shell_quote(&c.context.to_string())
    )
}

/// Single-quotes a word for POSIX shells when it needs quoting.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=@%+,".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Exit 3 for the solver (missing, failed), 2 for bad input, 3 for the rest.
fn prove_err(e: ProveError) -> CliError {
    match e {
        ProveError::BadPattern { .. } | ProveError::ReservedId(_) => CliError::input(e),
        _ => CliError::internal(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_only_when_needed() {
        assert_eq!(shell_quote("orders.shop.west"), "orders.shop.west");
        assert_eq!(
            shell_quote("spiffe://east.example/ns/shop/sa/web"),
            "spiffe://east.example/ns/shop/sa/web"
        );
        assert_eq!(shell_quote(r#"{"path":"/"}"#), r#"'{"path":"/"}'"#);
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
