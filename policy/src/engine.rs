//! The policy engine: the enforced set and an optional shadow set, each swapped atomically
//! on reload; decisions with their determining policies, errors, version and quota.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use cedar_policy::Authorizer;
use serde::Serialize;

use crate::facts::{Built, FactsError, RequestFacts};
use crate::load::{
    LoadError, LoadStats, Loaded, PolicyVersion, SourceFile, load_dir, load_sources,
};
use crate::path::{PathRules, normalize_path_with};
use crate::quota::QuotaSpec;
use crate::subject::build_cached;

/// The outcome of one authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the enforced set allows the request (default deny).
    pub allowed: bool,
    /// The `@id`s of the policies that determined the decision (sorted): the satisfied
    /// permits for an allow, the satisfied forbids for an explicit deny, none for a default deny.
    pub reasons: Vec<String>,
    /// Errors: policies that failed to evaluate (they are skipped), or why the request could
    /// not be built at all.
    pub errors: Vec<String>,
    /// The enforced set's version.
    pub policy_version: String,
    /// How long building and evaluating took.
    pub eval_time: Duration,
    /// What the shadow set said, when one is loaded.
    pub shadow: Option<ShadowOutcome>,
    /// The quota to charge for an allow: the strictest `@quota` among the determining
    /// permits (see the `quota` module), `None` when none has one.
    pub quota: Option<QuotaSpec>,
    /// The normalized path (empty when the path was refused).
    pub normalized_path: String,
    /// The request could not be evaluated (bad caller, service, method or path): denied,
    /// and recorded as an `error` decision.
    pub evaluation_failed: bool,
}

/// What the shadow (dry-run) set would have decided. Never enforced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ShadowOutcome {
    /// Whether the shadow set would allow.
    pub allowed: bool,
    /// Its determining policies.
    pub reasons: Vec<String>,
    /// Its evaluation errors.
    pub errors: Vec<String>,
    /// The shadow set's version.
    pub policy_version: String,
    /// Whether the shadow answer differs from the enforced one.
    pub differs: bool,
}

/// What the last [`PolicyEngine::reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadStatus {
    /// When it ran.
    pub at: SystemTime,
    /// Whether the new sets now serve.
    pub applied: bool,
    /// The enforced set's version after it (the old one when refused).
    pub version: String,
    /// Why the new sets were refused: Cedar's diagnostics with file, line and column.
    pub diagnostics: Option<String>,
}

#[derive(Debug, Clone)]
enum Source {
    Dir {
        dir: PathBuf,
        schema: Option<PathBuf>,
    },
    Memory,
}

/// The enforced policy set, an optional shadow set, and how to reload them.
#[derive(Debug)]
pub struct PolicyEngine {
    enforced: ArcSwap<Loaded>,
    shadow: ArcSwapOption<Loaded>,
    source: Source,
    shadow_dir: Option<PathBuf>,
    reload_failures: AtomicU64,
    last_reload: Mutex<Option<ReloadStatus>>,
    authorizer: Authorizer,
    path_rules: PathRules,
}

impl PolicyEngine {
    /// Loads and validates every policy under `dir` against `schema` (the shipped schema
    /// when `None`).
    pub fn load(dir: &Path, schema: Option<&Path>) -> Result<Self, LoadError> {
        let loaded = load_dir(dir, schema)?;
        let source = Source::Dir {
            dir: dir.to_path_buf(),
            schema: schema.map(Path::to_path_buf),
        };
        Ok(Self::new(loaded, source))
    }

    /// Builds an engine from in-memory sources (tests, tools); it cannot be reloaded.
    pub fn from_sources(
        files: &[SourceFile],
        schema: Option<&SourceFile>,
    ) -> Result<Self, LoadError> {
        Ok(Self::new(load_sources(files, schema)?, Source::Memory))
    }

    fn new(loaded: Loaded, source: Source) -> Self {
        Self {
            enforced: ArcSwap::from_pointee(loaded),
            shadow: ArcSwapOption::empty(),
            source,
            shadow_dir: None,
            reload_failures: AtomicU64::new(0),
            last_reload: Mutex::new(None),
            authorizer: Authorizer::new(),
            path_rules: PathRules::default(),
        }
    }

    /// Sets the path rules requests are normalized under (the defaults refuse double
    /// encodings; see the `path` module).
    pub fn with_path_rules(mut self, rules: PathRules) -> Self {
        self.path_rules = rules;
        self
    }

    /// The path rules requests are normalized under.
    pub fn path_rules(&self) -> PathRules {
        self.path_rules
    }

    /// Adds a shadow (dry-run) set from `dir`, validated against the same schema.
    pub fn with_shadow(mut self, dir: &Path) -> Result<Self, LoadError> {
        let schema = match &self.source {
            Source::Dir { schema, .. } => schema.clone(),
            Source::Memory => None,
        };
        let loaded = load_dir(dir, schema.as_deref())?;
        self.shadow.store(Some(Arc::new(loaded)));
        self.shadow_dir = Some(dir.to_path_buf());
        Ok(self)
    }

    /// Adds a shadow set from in-memory sources (not reloaded).
    pub fn with_shadow_sources(
        self,
        files: &[SourceFile],
        schema: Option<&SourceFile>,
    ) -> Result<Self, LoadError> {
        self.shadow
            .store(Some(Arc::new(load_sources(files, schema)?)));
        Ok(self)
    }

    /// Reloads the enforced set (and the shadow set) from disk. All or nothing: if either
    /// is invalid, nothing changes, the failure is counted and logged, and the error
    /// returned. Requests in flight finish on the set they started with.
    pub fn reload(&self) -> Result<PolicyVersion, LoadError> {
        let result = self.try_reload();
        if let Err(e) = &result {
            self.reload_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "policy reload refused; the previous set keeps serving");
        }
        let status = ReloadStatus {
            at: SystemTime::now(),
            applied: result.is_ok(),
            version: self.version().to_string(),
            diagnostics: result.as_ref().err().map(ToString::to_string),
        };
        *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
        result
    }

    fn try_reload(&self) -> Result<PolicyVersion, LoadError> {
        let Source::Dir { dir, schema } = &self.source else {
            return Ok(self.version());
        };
        let enforced = load_dir(dir, schema.as_deref())?;
        let shadow = self
            .shadow_dir
            .as_deref()
            .map(|d| load_dir(d, schema.as_deref()))
            .transpose()?;
        let version = enforced.version.clone();
        self.enforced.store(Arc::new(enforced));
        if let Some(shadow) = shadow {
            self.shadow.store(Some(Arc::new(shadow)));
        }
        tracing::info!(version = %version, "policy set reloaded");
        Ok(version)
    }

    /// How many reloads were refused.
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }

    /// The enforced set's version.
    pub fn version(&self) -> PolicyVersion {
        self.enforced.load().version.clone()
    }

    /// The shadow set's version, when one is loaded.
    pub fn shadow_version(&self) -> Option<PolicyVersion> {
        self.shadow.load().as_ref().map(|s| s.version.clone())
    }

    /// The shadow set, when one is loaded.
    pub(crate) fn shadow_set(&self) -> Option<cedar_policy::PolicySet> {
        self.shadow.load().as_ref().map(|s| s.set.clone())
    }

    /// What the last reload did (`None` before the first one).
    pub fn last_reload(&self) -> Option<ReloadStatus> {
        self.last_reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The enforced set and its schema, for proofs.
    pub(crate) fn set_and_schema(&self) -> (cedar_policy::PolicySet, cedar_policy::Schema) {
        let loaded = self.enforced.load();
        (loaded.set.clone(), loaded.schema.clone())
    }

    /// What the enforced set holds.
    pub fn stats(&self) -> LoadStats {
        self.enforced.load().stats
    }

    /// Decides one request. Never panics; anything that prevents evaluation is a deny with
    /// the reason in `errors`.
    pub fn decide(&self, facts: &RequestFacts) -> Decision {
        let start = Instant::now();
        let set = self.enforced.load();
        let shadow_set = self.shadow.load();
        // Built once, evaluated by the enforced and the shadow set alike (one schema), with
        // what either of them can read.
        let reads = shadow_set
            .as_ref()
            .map_or(set.reads, |sh| set.reads.union(sh.reads));
        let built = build_cached(facts, &set.subjects, &set.actions, reads, self.path_rules);
        let verdict = self.evaluate(&set, &built, facts);
        let shadow = shadow_set.as_ref().map(|sh| {
            let v = self.evaluate(sh, &built, facts);
            ShadowOutcome {
                differs: v.allowed != verdict.allowed,
                allowed: v.allowed,
                reasons: v.reasons,
                errors: v.errors,
                policy_version: sh.version.to_string(),
            }
        });
        let quota = if verdict.allowed {
            verdict
                .reasons
                .iter()
                .filter_map(|id| set.quotas.get(id))
                .min_by(|a, b| a.strictness().cmp(&b.strictness()))
                .cloned()
        } else {
            None
        };
        Decision {
            allowed: verdict.allowed,
            reasons: verdict.reasons,
            errors: verdict.errors,
            policy_version: set.version.to_string(),
            eval_time: start.elapsed(),
            shadow,
            quota,
            normalized_path: verdict.normalized_path,
            evaluation_failed: verdict.failed,
        }
    }

    fn evaluate(
        &self,
        set: &Loaded,
        built: &Result<Built, FactsError>,
        facts: &RequestFacts,
    ) -> Verdict {
        let built = match built {
            Ok(b) => b,
            Err(e) => {
                return Verdict {
                    allowed: false,
                    reasons: Vec::new(),
                    errors: vec![e.to_string()],
                    normalized_path: normalize_path_with(&facts.raw_path, self.path_rules)
                        .unwrap_or_default(),
                    failed: true,
                };
            }
        };
        let answer = set
            .sliced
            .authorize(&self.authorizer, &built.request, &built.entities);
        Verdict {
            allowed: answer.allowed,
            reasons: answer.reasons,
            errors: answer.errors,
            normalized_path: built.normalized_path.clone(),
            failed: false,
        }
    }
}

struct Verdict {
    allowed: bool,
    reasons: Vec<String>,
    errors: Vec<String>,
    normalized_path: String,
    failed: bool,
}

#[cfg(test)]
#[path = "engine_tests.rs"]
pub(crate) mod tests;
