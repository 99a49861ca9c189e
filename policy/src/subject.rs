//! Request entities without rebuilding them per request.
//!
//! Building a Cedar request used to dominate a decision: every request re-created the caller,
//! the service, their namespaces and trust domains and had Cedar compute their transitive
//! closure. Those entities depend only on who calls what (caller, service, the caller's
//! cluster, the service's trust domain and labels), so each such *subject* is built once with
//! its closure — together with every action of the schema and an empty `Claims` entity — and
//! kept per loaded policy set (a reload starts a fresh cache). A request then only adds its
//! `Headers` entity (and `Claims`, when it has end-user claims) to a clone of the subject's
//! entities and builds its context. The entities are exactly those of the reference builder
//! (`facts::build`); a test checks decisions of both paths agree.
//!
//! What no policy can observe is not built at all ([`Reads`]): when neither the enforced nor
//! the shadow set mentions headers, claims or the time anywhere in its text, the request uses
//! the subject's entities as they are (their `Headers` and `Claims` have no tags) and its
//! context carries no `time`. A decision cannot depend on what no policy reads, so it stays
//! exactly the same (the equivalence test covers both kinds of sets).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use cedar_policy::{Entities, EntityUid, Request};

use crate::facts::{
    Actions, Built, FactsError, RequestFacts, action_name, request_parts, request_uid,
    subject_parts, uid,
};
use crate::path::{PathRules, normalize_path_with};

/// Which per-request parts a policy set can observe: each context attribute, and whether the
/// `Headers` and `Claims` entities need this request's tags. Found by looking for the names in
/// each policy's JSON form (EST): any mention (an attribute, an entity type, a string) counts,
/// and a policy that uses the context record as a whole reads all of it, so a set is only
/// ever told it reads more than it does, never less.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reads(u16);

/// The context attributes, in the schema's order; `headers` and `claims` also stand for the
/// tags of their entities.
pub(crate) const CONTEXT_KEYS: [&str; 10] = [
    "path",
    "raw_path",
    "method",
    "source_cluster",
    "destination_cluster",
    "mtls",
    "time",
    "headers",
    "claims",
    "has_claims",
];

impl Reads {
    /// Everything: what tools and tests build.
    pub(crate) const ALL: Reads = Reads((1 << CONTEXT_KEYS.len()) - 1);

    /// Whether the context attribute `key` (one of [`CONTEXT_KEYS`]) is read.
    pub(crate) fn has(self, key: &str) -> bool {
        CONTEXT_KEYS
            .iter()
            .position(|k| *k == key)
            .is_none_or(|i| self.0 & (1 << i) != 0)
    }

    pub(crate) fn of(set: &cedar_policy::PolicySet) -> Reads {
        let mut bits = 0u16;
        let texts = set
            .policies()
            .map(|p| p.to_json().ok().map(|j| j.to_string()))
            .chain(
                set.templates()
                    .map(|t| t.to_json().ok().map(|j| j.to_string())),
            );
        for text in texts {
            // A policy that cannot be rendered is assumed to read everything.
            let Some(text) = text else {
                return Reads::ALL;
            };
            // `context.x` and `context has x` name what they read; any other use of the
            // context (comparing the whole record, say) reads all of it.
            let whole = text.matches(r#"{"Var":"context"}"#).count();
            let named = text.matches(r#"{".":{"left":{"Var":"context"}"#).count()
                + text.matches(r#"{"has":{"left":{"Var":"context"}"#).count();
            if whole > named {
                return Reads::ALL;
            }
            let text = text.to_ascii_lowercase();
            for (i, key) in CONTEXT_KEYS.iter().enumerate() {
                if text.contains(key) {
                    bits |= 1 << i;
                }
            }
        }
        Reads(bits)
    }

    /// What either of two sets reads.
    pub(crate) fn union(self, other: Reads) -> Reads {
        Reads(self.0 | other.0)
    }
}

/// Subjects kept per policy set; past this the cache starts over (bounded memory whatever
/// the callers do).
const MAX_SUBJECTS: usize = 16_384;

/// One (caller, service) pair's entities, closed once.
#[derive(Debug)]
struct Subject {
    principal: EntityUid,
    resource: EntityUid,
    entities: Arc<Entities>,
}

/// Subjects of one policy set.
#[derive(Debug, Default)]
pub(crate) struct SubjectCache {
    subjects: RwLock<HashMap<String, Arc<Subject>>>,
}

impl SubjectCache {
    fn get(&self, facts: &RequestFacts, actions: &Actions) -> Result<Arc<Subject>, FactsError> {
        let key = key(facts);
        if let Some(s) = self
            .subjects
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(s.clone());
        }
        let subject = Arc::new(build_subject(facts, actions)?);
        let mut subjects = self.subjects.write().unwrap_or_else(|e| e.into_inner());
        if subjects.len() >= MAX_SUBJECTS {
            subjects.clear();
        }
        subjects.insert(key, subject.clone());
        Ok(subject)
    }

    /// How many subjects are cached.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.subjects.read().map(|s| s.len()).unwrap_or(0)
    }
}

/// Everything the subject's entities are made of, unambiguously joined.
fn key(facts: &RequestFacts) -> String {
    let mut key = String::with_capacity(
        facts.caller.len()
            + facts.service.len()
            + facts.destination_trust_domain.len()
            + facts.source_cluster.len()
            + 8,
    );
    for part in [
        &facts.caller,
        &facts.service,
        &facts.destination_trust_domain,
        &facts.source_cluster,
    ] {
        key.push_str(part);
        key.push('\0');
    }
    for (k, v) in &facts.service_labels {
        key.push_str(k);
        key.push('\u{1}');
        key.push_str(v);
        key.push('\0');
    }
    key
}

fn build_subject(facts: &RequestFacts, actions: &Actions) -> Result<Subject, FactsError> {
    let (principal, resource, mut entities) = subject_parts(facts)?;
    // Every action with its groups, once each, so one subject serves every method.
    let mut seen = HashSet::new();
    for entity in actions.values().flatten() {
        if seen.insert(entity.uid()) {
            entities.push(entity.clone());
        }
    }
    for ty in ["Headers", "Claims"] {
        entities.push(cedar_policy::Entity::new_no_attrs(
            request_uid(ty)?,
            Default::default(),
        ));
    }
    let entities = Entities::from_entities(entities, None).map_err(cedar_err)?;
    Ok(Subject {
        principal,
        resource,
        entities: Arc::new(entities),
    })
}

/// The entities a request is decided with: the subject's, shared, or a copy with this
/// request's headers and claims when a policy can read them.
#[derive(Debug)]
pub(crate) enum RequestEntities {
    Shared(Arc<Entities>),
    Own(Entities),
}

impl std::ops::Deref for RequestEntities {
    type Target = Entities;
    fn deref(&self) -> &Entities {
        match self {
            Self::Shared(e) => e,
            Self::Own(e) => e,
        }
    }
}

/// Builds a request like `facts::build`, from the cached subject, leaving out what `reads`
/// says no policy observes.
pub(crate) fn build_cached(
    facts: &RequestFacts,
    cache: &SubjectCache,
    actions: &Actions,
    reads: Reads,
    rules: PathRules,
) -> Result<Built, FactsError> {
    let subject = cache.get(facts, actions)?;
    let action = uid("Action", action_name(&facts.method)?)?;
    let path = normalize_path_with(&facts.raw_path, rules)?;
    let (headers, claims, context) = request_parts(facts, &path, reads)?;
    let mut own = Vec::new();
    if reads.has("headers") {
        own.push(headers);
    }
    if reads.has("claims") && facts.claims.is_some() {
        own.push(claims);
    }
    let entities = if own.is_empty() {
        RequestEntities::Shared(subject.entities.clone())
    } else {
        RequestEntities::Own(
            Entities::clone(&subject.entities)
                .upsert_entities(own, None)
                .map_err(cedar_err)?,
        )
    };
    let request = Request::new(
        subject.principal.clone(),
        action,
        subject.resource.clone(),
        context,
        None,
    )
    .map_err(cedar_err)?;
    Ok(Built {
        request,
        entities,
        normalized_path: path,
    })
}

fn cedar_err(e: impl std::fmt::Display) -> FactsError {
    FactsError::Cedar(e.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::{Duration, UNIX_EPOCH};

    use cedar_policy::Authorizer;

    use super::*;
    use crate::facts::build;
    use crate::load::{SourceFile, load_sources};

    /// Policies that read every part of a request: membership, attributes, labels, headers,
    /// claims, context and the action hierarchy.
    const POLICIES: &str = r#"
        @id("ns") permit (principal in Namespace::"east.example/shop", action in Action::"read", resource in Namespace::"west.example/shop");
        @id("td") permit (principal in TrustDomain::"north.example", action == Action::"POST", resource) when { principal has cluster && principal.cluster == "north" };
        @id("label") permit (principal, action, resource) when { resource.hasTag("tier") && resource.getTag("tier") == "gold" && context.mtls };
        @id("header") permit (principal, action == Action::"DELETE", resource) when { context.headers.hasTag("x-env") && context.headers.getTag("x-env") == "prod, eu" };
        @id("claims") permit (principal, action == Action::"PUT", resource) when { context.has_claims && context.claims.hasTag("sub") && context.claims.getTag("sub") == "alice" };
        @id("account") forbid (principal, action, resource) when { principal has service_account && principal.service_account == "evil" };
        @id("path") forbid (principal, action, resource) when { context.path like "/admin*" || context.raw_path like "*debug*" };
        @id("time") forbid (principal, action == Action::"PATCH", resource) when { context.time > datetime("2030-01-01T00:00:00Z") };
        @id("svc") permit (principal, action == Action::"connect", resource) when { resource.name == "db" && resource.cluster == context.destination_cluster && context.source_cluster == "east" };
        @id("method") permit (principal, action, resource) when { context.method == "HEAD" && resource.trust_domain == "west.example" && resource.namespace == "shop" };
    "#;

    fn facts(i: usize) -> RequestFacts {
        let callers = [
            "spiffe://east.example/ns/shop/sa/web",
            "spiffe://east.example/ns/shop/sa/evil",
            "spiffe://north.example/ns/ops/sa/job",
            "spiffe://east.example/x/y",
        ];
        let methods = [
            "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS",
        ];
        let services = ["orders.shop.west", "db.data.west", "orders.other.west"];
        let paths = ["/v1/orders", "/admin/x", "/a/../admin", "/x?debug=1", "/ok"];
        RequestFacts {
            caller: callers[i % callers.len()].to_owned(),
            service: services[(i / 4) % services.len()].to_owned(),
            destination_trust_domain: "west.example".to_owned(),
            method: methods[(i / 12) % methods.len()].to_owned(),
            raw_path: paths[i % paths.len()].to_owned(),
            headers: match i % 3 {
                0 => vec![],
                1 => vec![
                    ("x-env".into(), "prod".into()),
                    ("X-Env".into(), "eu".into()),
                ],
                _ => vec![
                    ("x-env".into(), "prod".into()),
                    ("cookie".into(), "c".into()),
                ],
            },
            source_cluster: ["east", "north", ""][i % 3].to_owned(),
            destination_cluster: ["west", "data"][i % 2].to_owned(),
            mtls: !i.is_multiple_of(5),
            time: UNIX_EPOCH + Duration::from_secs(1_700_000_000 + (i as u64 % 2) * 400_000_000),
            claims: (i % 7 < 3)
                .then(|| BTreeMap::from([("sub".to_owned(), ["alice", "bob"][i % 2].to_owned())])),
            service_labels: if i.is_multiple_of(2) {
                BTreeMap::from([("tier".to_owned(), "gold".to_owned())])
            } else {
                BTreeMap::new()
            },
        }
    }

    /// Policies that read neither headers, claims nor the time: requests for them are built
    /// without those.
    const BLIND: &str = r#"
        @id("ns") permit (principal in Namespace::"east.example/shop", action in Action::"read", resource in Namespace::"west.example/shop");
        @id("label") permit (principal, action, resource) when { resource.hasTag("tier") && resource.getTag("tier") == "gold" && context.mtls };
        @id("account") forbid (principal, action, resource) when { principal has service_account && principal.service_account == "evil" };
        @id("path") forbid (principal, action, resource) when { context.path like "/admin*" || context.raw_path like "*debug*" };
        @id("svc") permit (principal, action == Action::"connect", resource) when { resource.name == "db" && context.source_cluster == "east" };
    "#;

    #[test]
    fn reads_names_what_a_set_can_observe() {
        let of = |text: &str| {
            load_sources(
                &[SourceFile {
                    name: "p.cedar".into(),
                    text: text.into(),
                }],
                None,
            )
            .unwrap()
            .reads
        };
        let all = of(POLICIES);
        assert!(CONTEXT_KEYS.iter().all(|k| all.has(k)), "{all:?}");
        let blind = of(BLIND);
        for key in ["headers", "claims", "time", "has_claims", "method"] {
            assert!(!blind.has(key), "{key}: {blind:?}");
        }
        for key in ["path", "raw_path", "mtls", "source_cluster"] {
            assert!(blind.has(key), "{key}: {blind:?}");
        }
        let one = of(
            r#"@id("h") permit (principal, action, resource) when { context.headers.hasTag("x") };"#,
        );
        assert!(
            one.has("headers") && !one.has("claims") && !one.has("time"),
            "{one:?}"
        );
        assert!(blind.union(one).has("headers") && blind.union(one).has("path"));
        // Using the context as a whole reads all of it (strict validation refuses most such
        // uses; the analysis does not rely on it).
        let whole: cedar_policy::PolicySet =
            r#"permit (principal, action, resource) when { context == {"path": "/"} };"#
                .parse()
                .unwrap();
        assert_eq!(Reads::of(&whole), Reads::ALL);
    }

    #[test]
    fn cached_requests_decide_exactly_as_freshly_built_ones() {
        for text in [POLICIES, BLIND] {
            decide_both_ways(text);
        }
    }

    fn decide_both_ways(text: &str) {
        let loaded = load_sources(
            &[SourceFile {
                name: "p.cedar".into(),
                text: text.into(),
            }],
            None,
        )
        .unwrap();
        let authorizer = Authorizer::new();
        let mut allowed = 0;
        for i in 0..600 {
            let f = facts(i);
            let fresh = build(&f, &loaded.actions).unwrap();
            // Twice: the first builds the subject, the second uses the cached one.
            for _ in 0..2 {
                let cached = build_cached(
                    &f,
                    &loaded.subjects,
                    &loaded.actions,
                    loaded.reads,
                    PathRules::default(),
                )
                .unwrap();
                let a = loaded
                    .sliced
                    .authorize(&authorizer, &fresh.request, &fresh.entities);
                let b = loaded
                    .sliced
                    .authorize(&authorizer, &cached.request, &cached.entities);
                assert_eq!(a, b, "request {i}: {f:?}");
                assert_eq!(fresh.normalized_path, cached.normalized_path);
                allowed += usize::from(b.allowed);
            }
        }
        // The cases cover both answers, and subjects are shared across requests.
        assert!(allowed > 100 && allowed < 1100, "{allowed}");
        assert!(loaded.subjects.len() < 600, "{}", loaded.subjects.len());
    }

    #[test]
    fn subjects_are_keyed_by_everything_they_are_built_from() {
        let a = facts(0);
        let mut b = a.clone();
        b.service_labels.insert("tier".into(), "silver".into());
        assert_ne!(key(&a), key(&b));
        let mut c = a.clone();
        c.source_cluster = "elsewhere".into();
        assert_ne!(key(&a), key(&c));
        // Fields cannot run into each other.
        let mut d = a.clone();
        d.caller.push('x');
        let mut e = a.clone();
        e.service.insert(0, 'x');
        assert_ne!(key(&d), key(&e));
    }
}
