//! Proofs about policy sets for *all* requests, not only recorded or written ones: Cedar's
//! symbolic compiler (`cedar-policy-symcc`) turns each question into an SMT query that cvc5
//! answers (see `solver` for finding cvc5).
//!
//! - [`Prover::no_new_access`]: every request the new set allows, the old set allows too.
//! - [`Prover::equivalent`]: both sets decide every request alike.
//! - [`Prover::never_errors`]: no policy can fail to evaluate (a forbid that fails denies
//!   in meshgate; a permit that fails is skipped).
//! - [`Prover::always_denies`]: no request from principals matching a pattern is allowed.
//!
//! Each question is asked once per request environment of the schema (one per action, since
//! every mesh action takes a `Workload` principal and a `Service` resource). A refutation
//! carries a [`Counterexample`] in the shape `policy check` takes, decided again by meshgate's
//! own engines (see `cex`). Each query is first asked about every request the schema allows
//! (quickest, and a proof there holds for the mesh); a refutation whose request the gateway
//! could not build is asked again with more of the mesh model (see `model::levels`).
//!
//! Semantics: meshgate counts a `forbid` whose condition fails to evaluate as satisfied
//! (fail closed), where Cedar (and SymCC) skip it. A forbid of the *old* set that can fail
//! would deny more than SymCC assumes, so [`Prover::no_new_access`] also proves that the new
//! set denies every request on which such a forbid fails.

mod cex;
mod model;
mod pattern;
mod solver;

use std::sync::Arc;
use std::time::Instant;

use cedar_policy::{Effect, Policy, PolicyId, PolicySet, RequestEnv, Schema};
use cedar_policy_symcc::solver::LocalSolver;
use cedar_policy_symcc::term::Term;
use cedar_policy_symcc::{
    CedarSymCompiler, CompiledPolicy, CompiledPolicySet, always_denies_asserts,
    never_errors_asserts, term_factory,
};
use serde::Serialize;
use thiserror::Error;

pub use cex::Counterexample;
pub use pattern::PrincipalPattern;
pub use solver::{INSTALL_HINT, Solver};

use crate::engine::PolicyEngine;
use model::{GUARD_PREFIX, Literals, with_guards};

/// Why a proof could not be attempted or finished (not a refutation: that is a [`Finding`]).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ProveError {
    /// No cvc5 >= 1.3.1 was found.
    #[error("no usable SMT solver: {detail}; {INSTALL_HINT}")]
    SolverMissing {
        /// What was looked at.
        detail: String,
    },
    /// The solver failed, gave up (time limit) or answered something unreadable.
    #[error("the SMT solver failed: {detail}")]
    SolverFailed {
        /// What happened.
        detail: String,
    },
    /// The principal pattern of `--always-denies` is malformed.
    #[error("principal pattern `{pattern}` {why}")]
    BadPattern {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        why: String,
    },
    /// A policy id uses the prefix reserved for the mesh model.
    #[error("policy id `{0}` uses the prefix `meshgate-model/`, which proofs reserve")]
    ReservedId(String),
    /// SymCC could not compile the policies (a feature it does not support, say).
    #[error("cannot compile the policies for action `{action}`: {detail}")]
    Compile {
        /// The request environment's action.
        action: String,
        /// SymCC's message.
        detail: String,
    },
    /// A bug: something meshgate built itself did not work.
    #[error("internal error: {detail}")]
    Internal {
        /// What failed.
        detail: String,
    },
}

/// What one refutation says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The request environment's action (`GET`, …, `connect`).
    pub action: String,
    /// The policy it is about (never-errors), if any.
    pub policy: Option<String>,
    /// What was refuted, in words.
    pub what: String,
    /// A request showing it, when the solver produced one.
    pub counterexample: Option<Counterexample>,
    /// How meshgate's engines decide the counterexample (`new: allow (p1)`, …).
    pub decided: Vec<String>,
}

/// The time one request environment took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnvTime {
    /// The action.
    pub action: String,
    /// The resource type.
    pub resource_type: String,
    /// Solver and compilation time, in milliseconds.
    pub ms: u128,
}

/// The outcome of one proof: proved when there are no findings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Proof {
    /// The property, in words.
    pub property: String,
    /// Refutations (empty: proved).
    pub findings: Vec<Finding>,
    /// Per request environment.
    pub envs: Vec<EnvTime>,
    /// The whole proof, in milliseconds.
    pub ms: u128,
}

impl Proof {
    /// No refutation.
    pub fn proved(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Runs proofs with one solver process.
#[derive(Debug)]
pub struct Prover {
    solver: Solver,
}

impl Prover {
    /// A prover using `solver`.
    pub fn new(solver: Solver) -> Self {
        Self { solver }
    }

    /// Proves that `new` allows nothing `old` does not.
    pub async fn no_new_access(
        &self,
        old: &PolicyEngine,
        new: &PolicyEngine,
    ) -> Result<Proof, ProveError> {
        let mut run = Run::start(self, "every request the new set allows, the old set allows")?;
        let sides = Sides::new(old, new)?;
        for env in sides.envs() {
            let t = Instant::now();
            run.subsumed(&sides, &env, Direction::NewWithinOld).await?;
            run.timed(&env, t);
        }
        Ok(run.finish())
    }

    /// Proves that `a` and `b` decide every request alike.
    pub async fn equivalent(
        &self,
        old: &PolicyEngine,
        new: &PolicyEngine,
    ) -> Result<Proof, ProveError> {
        let mut run = Run::start(self, "the old and the new set decide every request alike")?;
        let sides = Sides::new(old, new)?;
        for env in sides.envs() {
            let t = Instant::now();
            run.subsumed(&sides, &env, Direction::NewWithinOld).await?;
            run.subsumed(&sides, &env, Direction::OldWithinNew).await?;
            run.timed(&env, t);
        }
        Ok(run.finish())
    }

    /// Proves that no policy of `set` can fail to evaluate, policy by policy, on a request
    /// the gateway can build.
    pub async fn never_errors(&self, set: &PolicyEngine) -> Result<Proof, ProveError> {
        let mut run = Run::start(self, "no policy can fail to evaluate")?;
        let (policies, schema) = set.set_and_schema();
        check_ids(&policies)?;
        let policies = model::static_set(&policies)?;
        let envs: Vec<RequestEnv> = schema.request_envs().collect();
        let actions: Vec<_> = envs.iter().map(|e| e.action().clone()).collect();
        let levels = model::levels(&Literals::of(&[&policies]), &actions);
        let allow_all = PolicySet::from_policies([Policy::parse(
            Some(PolicyId::new(format!("{GUARD_PREFIX}all"))),
            "permit (principal, action, resource);",
        )
        .map_err(|e| internal(e.to_string()))?])
        .map_err(|e| internal(e.to_string()))?;
        for env in &envs {
            let t = Instant::now();
            for policy in policies.policies() {
                let compiled = CompiledPolicy::compile(policy, env, &schema)
                    .map_err(|e| compile_err(env, e))?;
                // Most policies cannot fail at all; only the others need the probe.
                if run
                    .compiler
                    .check_never_errors_opt(&compiled)
                    .await
                    .map_err(solver_err)?
                {
                    continue;
                }
                let (evaluates, scope) = model::error_probe(policy)?;
                let with = |p: Policy| -> Result<PolicySet, ProveError> {
                    let mut s = allow_all.clone();
                    s.add(p).map_err(|e| internal(e.to_string()))?;
                    Ok(s)
                };
                let (wide, narrow) = (with(evaluates)?, with(scope)?);
                let narrow_c = CompiledPolicySet::compile(&narrow, env, &schema)
                    .map_err(|e| compile_err(env, e))?;
                let id = policy.id().to_string();
                let fails_on = |cex: &Counterexample| {
                    decide(set, cex).is_some_and(|d| d.errors.iter().any(|e| e.contains(&id)))
                };
                let found = run
                    .refute(env, &schema, &wide, Some(&narrow_c), &levels, fails_on)
                    .await?;
                let Some(cex) = found else { continue };
                let d = decide(set, &cex);
                let effect = match policy.effect() {
                    Effect::Forbid => "a forbid: meshgate denies the request",
                    Effect::Permit => "a permit: it is skipped",
                };
                run.findings.push(Finding {
                    action: action_of(env),
                    policy: Some(id.clone()),
                    what: format!("policy `{id}` can fail to evaluate ({effect})"),
                    decided: d.iter().map(|d| describe("set", d)).collect(),
                    counterexample: Some(cex),
                });
            }
            run.timed(env, t);
        }
        Ok(run.finish())
    }

    /// Proves that `set` denies every request whose principal matches `pattern`.
    pub async fn always_denies(
        &self,
        set: &PolicyEngine,
        pattern: &PrincipalPattern,
    ) -> Result<Proof, ProveError> {
        let mut run = Run::start(self, &format!("every request from `{pattern}` is denied"))?;
        let (policies, schema) = set.set_and_schema();
        check_ids(&policies)?;
        let policies = model::static_set(&policies)?;
        let envs: Vec<RequestEnv> = schema.request_envs().collect();
        let actions: Vec<_> = envs.iter().map(|e| e.action().clone()).collect();
        // The pattern is part of the question: every level has it.
        let levels = model::levels(&Literals::of(&[&policies]), &actions);
        let policies = with_guards(&policies, &[pattern.guard()])?;
        for env in &envs {
            let t = Instant::now();
            let allowed_match = |cex: &Counterexample| {
                decide(set, cex).is_some_and(|d| d.allowed) && pattern.matches(&cex.principal)
            };
            let found = run
                .refute(env, &schema, &policies, None, &levels, allowed_match)
                .await?;
            if let Some(cex) = found {
                let d = decide(set, &cex);
                run.findings.push(Finding {
                    action: action_of(env),
                    policy: None,
                    what: format!("the set allows a request from `{pattern}`"),
                    decided: d.iter().map(|d| describe("set", d)).collect(),
                    counterexample: Some(cex),
                });
            }
            run.timed(env, t);
        }
        Ok(run.finish())
    }
}

/// Which way a subsumption goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Everything `new` allows, `old` allows.
    NewWithinOld,
    /// Everything `old` allows, `new` allows.
    OldWithinNew,
}

/// The two sets of a comparison and the mesh model's guards for them.
struct Sides<'a> {
    old: &'a PolicyEngine,
    new: &'a PolicyEngine,
    old_set: PolicySet,
    new_set: PolicySet,
    levels: [Vec<String>; 3],
    schema: Schema,
}

impl<'a> Sides<'a> {
    fn new(old: &'a PolicyEngine, new: &'a PolicyEngine) -> Result<Self, ProveError> {
        let (old_set, schema) = old.set_and_schema();
        let (new_set, _) = new.set_and_schema();
        check_ids(&old_set)?;
        check_ids(&new_set)?;
        let (old_set, new_set) = (model::static_set(&old_set)?, model::static_set(&new_set)?);
        let actions: Vec<_> = schema.request_envs().map(|e| e.action().clone()).collect();
        Ok(Self {
            levels: model::levels(&Literals::of(&[&old_set, &new_set]), &actions),
            old,
            new,
            old_set,
            new_set,
            schema,
        })
    }

    fn envs(&self) -> Vec<RequestEnv> {
        self.schema.request_envs().collect()
    }
}

/// One proof in progress: the solver session, the findings and the timings.
struct Run {
    compiler: CedarSymCompiler<LocalSolver>,
    property: String,
    findings: Vec<Finding>,
    envs: Vec<EnvTime>,
    started: Instant,
}

impl Run {
    fn start(prover: &Prover, property: &str) -> Result<Self, ProveError> {
        let compiler = CedarSymCompiler::new(prover.solver.start()?).map_err(solver_err)?;
        Ok(Self {
            compiler,
            property: property.to_owned(),
            findings: Vec::new(),
            envs: Vec::new(),
            started: Instant::now(),
        })
    }

    fn timed(&mut self, env: &RequestEnv, since: Instant) {
        self.envs.push(EnvTime {
            action: action_of(env),
            resource_type: env.resource().to_string(),
            ms: since.elapsed().as_millis(),
        });
    }

    fn finish(self) -> Proof {
        Proof {
            property: self.property,
            findings: self.findings,
            envs: self.envs,
            ms: self.started.elapsed().as_millis(),
        }
    }

    /// Asks for a request that `wide` allows and `narrow` denies (with no `narrow`: that
    /// `wide` allows), trying the mesh model's guard levels in turn (see `model::levels`):
    /// `None` is a proof. A counterexample is rebuilt as request facts and `confirm`ed with
    /// meshgate's engines; an unconfirmed one is asked again at the next level.
    async fn refute(
        &mut self,
        env: &RequestEnv,
        schema: &Schema,
        wide: &PolicySet,
        narrow: Option<&CompiledPolicySet>,
        levels: &[Vec<String>; 3],
        confirm: impl Fn(&Counterexample) -> bool,
    ) -> Result<Option<Counterexample>, ProveError> {
        let mut last = None;
        for guards in levels {
            let set = with_guards(wide, guards)?;
            let wide_c =
                CompiledPolicySet::compile(&set, env, schema).map_err(|e| compile_err(env, e))?;
            let found = match narrow {
                Some(narrow) => {
                    self.compiler
                        .check_implies_with_counterexample_opt(&wide_c, narrow)
                        .await
                }
                None => {
                    self.compiler
                        .check_always_denies_with_counterexample_opt(&wide_c)
                        .await
                }
            };
            let found = match found {
                // Refuted already; the solver could not say more within its time limit:
                // the unconfirmed counterexample is the answer (not proved).
                Err(cedar_policy_symcc::err::Error::SolverUnknown) if last.is_some() => break,
                other => other.map_err(solver_err)?,
            };
            let Some(found) = found else { return Ok(None) };
            let mut cex = cex::from_env(&found.request, &found.entities);
            cex.confirmed = confirm(&cex);
            if cex.confirmed {
                return Ok(Some(cex));
            }
            last = Some(cex);
        }
        Ok(last)
    }

    /// Proves, for one request environment, that everything the "wide" side allows the
    /// "narrow" side allows too, under meshgate's fail-closed forbids.
    async fn subsumed(
        &mut self,
        sides: &Sides<'_>,
        env: &RequestEnv,
        dir: Direction,
    ) -> Result<(), ProveError> {
        let (wide, narrow_set, names) = match dir {
            Direction::NewWithinOld => (&sides.new_set, &sides.old_set, ("new", "old")),
            Direction::OldWithinNew => (&sides.old_set, &sides.new_set, ("old", "new")),
        };
        let schema = &sides.schema;
        let compile = |set: &PolicySet| {
            CompiledPolicySet::compile(set, env, schema).map_err(|e| compile_err(env, e))
        };
        let narrow_c = compile(narrow_set)?;
        let (wide_engine, narrow_engine) = match dir {
            Direction::NewWithinOld => (sides.new, sides.old),
            Direction::OldWithinNew => (sides.old, sides.new),
        };
        let flips = |cex: &Counterexample| {
            decide(wide_engine, cex).is_some_and(|d| d.allowed)
                && decide(narrow_engine, cex).is_some_and(|d| !d.allowed)
        };
        let found = self
            .refute(env, schema, wide, Some(&narrow_c), &sides.levels, flips)
            .await?;
        if let Some(cex) = found {
            let (new_d, old_d) = (decide(sides.new, &cex), decide(sides.old, &cex));
            self.findings.push(Finding {
                action: action_of(env),
                policy: None,
                what: format!(
                    "the {} set allows a request the {} set denies",
                    names.0, names.1
                ),
                decided: [("new", &new_d), ("old", &old_d)]
                    .iter()
                    .filter_map(|(n, d)| d.as_ref().map(|d| describe(n, d)))
                    .collect(),
                counterexample: Some(cex),
            });
            return Ok(());
        }
        // Without the guards first; a forbid that seems to fail is asked again with them.
        let mut failing = self
            .failing_forbids(&compile(wide)?, narrow_set, env, schema)
            .await?;
        if !failing.is_empty() {
            let [.., full] = &sides.levels;
            let guarded = compile(&with_guards(wide, full)?)?;
            failing = self
                .failing_forbids(&guarded, narrow_set, env, schema)
                .await?;
        }
        for id in failing {
            self.findings.push(Finding {
                action: action_of(env),
                policy: Some(id.clone()),
                what: format!(
                    "forbid `{id}` of the {} set can fail to evaluate (meshgate then denies) \
                     on a request the {} set allows; make it unable to fail so the sets can be \
                     compared (`policy prove --never-errors` shows a request on which it fails)",
                    names.1, names.0
                ),
                decided: Vec::new(),
                counterexample: None,
            });
        }
        Ok(())
    }

    /// The forbids of `narrow` that can fail to evaluate on a request `wide` allows: they
    /// deny it in meshgate (fail closed) where Cedar, and so SymCC, skip them. One query asks
    /// whether any can; only then is each asked alone, to name it.
    async fn failing_forbids(
        &mut self,
        wide: &CompiledPolicySet,
        narrow: &PolicySet,
        env: &RequestEnv,
        schema: &Schema,
    ) -> Result<Vec<String>, ProveError> {
        let mut forbids = Vec::new();
        for forbid in narrow.policies().filter(|p| p.effect() == Effect::Forbid) {
            let compiled =
                CompiledPolicy::compile(forbid, env, schema).map_err(|e| compile_err(env, e))?;
            // Constant `false`: SymCC already knows it cannot fail.
            if !never_errors_asserts(&compiled)
                .asserts()
                .iter()
                .any(|t| *t == false.into())
            {
                forbids.push((forbid.id().to_string(), compiled));
            }
        }
        let allows = always_denies_asserts(wide);
        // The well-formedness facts of every forbid hold together; the failure of any one
        // of them is the disjunction of each one's last assertion (`verify_evaluate_opt`
        // puts the property last, after the facts).
        let mut all: Vec<Term> = allows.asserts().iter().cloned().collect();
        let mut any_fails: Term = false.into();
        for (_, compiled) in &forbids {
            let fails = never_errors_asserts(compiled);
            if let Some((last, facts)) = fails.asserts().split_last() {
                all.extend(facts.iter().cloned());
                any_fails = term_factory::or(any_fails, last.clone());
            }
        }
        all.push(any_fails);
        if forbids.is_empty()
            || self
                .compiler
                .check_unsat_raw(Arc::new(all), allows.symenv())
                .await
                .map_err(solver_err)?
        {
            return Ok(Vec::new());
        }
        let mut failing = Vec::new();
        for (id, compiled) in &forbids {
            let fails = never_errors_asserts(compiled);
            let both: Vec<Term> = allows
                .asserts()
                .iter()
                .chain(fails.asserts().iter())
                .cloned()
                .collect();
            if !self
                .compiler
                .check_unsat_raw(Arc::new(both), allows.symenv())
                .await
                .map_err(solver_err)?
            {
                failing.push(id.clone());
            }
        }
        Ok(failing)
    }
}

/// Policy ids must not collide with the mesh model's.
fn check_ids(set: &PolicySet) -> Result<(), ProveError> {
    match set
        .policies()
        .map(|p| p.id().to_string())
        .find(|id| id.starts_with(GUARD_PREFIX))
    {
        Some(id) => Err(ProveError::ReservedId(id)),
        None => Ok(()),
    }
}

/// Decides a counterexample with a real engine, as `policy check` does.
fn decide(engine: &PolicyEngine, cex: &Counterexample) -> Option<crate::engine::Decision> {
    let ctx = cex.check_context()?;
    let facts = crate::tools::what_if_facts(
        &cex.principal,
        &cex.action,
        &cex.resource,
        &ctx,
        std::time::UNIX_EPOCH,
    )
    .ok()?;
    let d = engine.decide(&facts);
    (!d.evaluation_failed).then_some(d)
}

fn describe(name: &str, d: &crate::engine::Decision) -> String {
    let word = if d.allowed { "allow" } else { "deny" };
    let by = if d.reasons.is_empty() {
        "no policy".to_owned()
    } else {
        d.reasons.join(", ")
    };
    let mut s = format!("{name}: {word} (determined by: {by})");
    for e in &d.errors {
        s.push_str(&format!("; error: {e}"));
    }
    s
}

fn internal(detail: String) -> ProveError {
    ProveError::Internal { detail }
}

fn action_of(env: &RequestEnv) -> String {
    env.action().id().unescaped().to_owned()
}

fn compile_err(env: &RequestEnv, e: cedar_policy_symcc::err::Error) -> ProveError {
    ProveError::Compile {
        action: action_of(env),
        detail: e.to_string(),
    }
}

fn solver_err(e: cedar_policy_symcc::err::Error) -> ProveError {
    use cedar_policy_symcc::err::Error;
    let detail = match &e {
        Error::SolverUnknown => {
            "the solver gave up (time limit per query reached, or an undecided query)".to_owned()
        }
        Error::SolverError(s) => format!("{s}: {s:?}"),
        other => other.to_string(),
    };
    ProveError::SolverFailed { detail }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
