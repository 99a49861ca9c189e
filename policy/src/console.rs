//! Who may read a gateway's web console: a Cedar policy set of its own, validated in strict
//! mode against the console schema ([`CONSOLE_SCHEMA`]), separate from the mesh's policies
//! so that no service policy (`permit (principal, action, resource)` in a test mesh) ever
//! opens the console by accident.
//!
//! One request per page view: `principal = Workload::"<client SVID's SPIFFE ID>"` (in its
//! namespace and trust domain, built like the mesh's), `action = Action::"view"`,
//! `resource = Console::"<cluster>"`, `context = { page, time }`. Default deny; a `forbid`
//! that fails to evaluate denies (the engine's rule).

use std::path::Path;
use std::time::SystemTime;

use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityUid, Request, RestrictedExpression,
};

use crate::facts::{Caller, FactsError, caller_entities, cedar_err, entity, uid};
use crate::load::{LoadError, Loaded, PolicyVersion, SourceFile, load_sources, read_file};

/// The console schema shipped with meshgate (`policy/schema/console.cedarschema`).
pub const CONSOLE_SCHEMA: &str = include_str!("../schema/console.cedarschema");
const CONSOLE_SCHEMA_NAME: &str = "<meshgate>/console.cedarschema";

/// One page view to decide.
#[derive(Debug, Clone, Copy)]
pub struct ConsoleRequest<'a> {
    /// The viewer's SPIFFE ID (from the verified client certificate).
    pub caller: &'a str,
    /// The gateway's cluster (`Console::"<cluster>"`).
    pub cluster: &'a str,
    /// The gateway's trust domain.
    pub trust_domain: &'a str,
    /// The page (`decisions`, `graph`, …).
    pub page: &'a str,
    /// When the view was asked for.
    pub time: SystemTime,
}

/// What the console policy said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleDecision {
    /// Whether the view is allowed.
    pub allowed: bool,
    /// The determining policies' ids.
    pub reasons: Vec<String>,
    /// Evaluation errors, or why the request could not be built.
    pub errors: Vec<String>,
}

/// A loaded console policy set.
#[derive(Debug)]
pub struct ConsolePolicy {
    loaded: Loaded,
    source: String,
    authorizer: Authorizer,
}

impl ConsolePolicy {
    /// The policy used when the config names none: members of the namespace `audit` of the
    /// gateway's own trust domain may view every page.
    pub fn default_for(trust_domain: &str) -> Result<Self, LoadError> {
        let text = format!(
            "// The default console policy: the `audit` namespace of this trust domain.\n\
             @id(\"console-audit-namespace\")\n\
             permit (\n  principal in Namespace::\"{}/audit\",\n  action == Action::\"view\",\n  resource\n);\n",
            trust_domain.replace(['"', '\\'], "")
        );
        Self::from_sources(&[SourceFile {
            name: "<meshgate>/console-default.cedar".to_owned(),
            text,
        }])
    }

    /// Loads the console policies of one `.cedar` file.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        if path.extension().is_none_or(|e| e != "cedar") {
            return Err(LoadError::NoPolicies(path.to_path_buf()));
        }
        Self::from_sources(&[read_file(path)?])
    }

    /// Builds the set from in-memory `.cedar` sources, validated against the console schema.
    pub fn from_sources(files: &[SourceFile]) -> Result<Self, LoadError> {
        let schema = SourceFile {
            name: CONSOLE_SCHEMA_NAME.to_owned(),
            text: CONSOLE_SCHEMA.to_owned(),
        };
        let loaded = load_sources(files, Some(&schema))?;
        if loaded.stats.policies + loaded.stats.links == 0 {
            let name = files.first().map_or("<none>", |f| f.name.as_str());
            return Err(LoadError::NoPolicies(name.into()));
        }
        Ok(Self {
            loaded,
            source: files
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            authorizer: Authorizer::new(),
        })
    }

    /// Where the policies came from (file names).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The set's version (content hash).
    pub fn version(&self) -> &PolicyVersion {
        &self.loaded.version
    }

    /// The set's policies with their text.
    pub fn policies(&self) -> Vec<crate::PolicyText> {
        crate::diff::texts(&self.loaded.set)
    }

    /// Decides one page view. Never panics; a request that cannot be built is denied with
    /// the reason in `errors`.
    pub fn authorize(&self, req: &ConsoleRequest<'_>) -> ConsoleDecision {
        match build(req) {
            Ok((request, entities)) => {
                let answer = self
                    .loaded
                    .sliced
                    .authorize(&self.authorizer, &request, &entities);
                ConsoleDecision {
                    allowed: answer.allowed,
                    reasons: answer.reasons,
                    errors: answer.errors,
                }
            }
            Err(e) => ConsoleDecision {
                allowed: false,
                reasons: Vec::new(),
                errors: vec![e.to_string()],
            },
        }
    }
}

fn build(req: &ConsoleRequest<'_>) -> Result<(Request, Entities), FactsError> {
    let caller = Caller::parse(req.caller)?;
    let mut entities: Vec<Entity> = Vec::with_capacity(6);
    let principal = caller_entities(req.caller, &caller, "", &mut entities)?;
    let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
    let resource = uid("Console", req.cluster)?;
    entities.push(entity(
        resource.clone(),
        [
            ("cluster".to_owned(), s(req.cluster)),
            ("trust_domain".to_owned(), s(req.trust_domain)),
        ],
        [],
        [],
    )?);
    let action: EntityUid = uid("Action", "view")?;
    let time = crate::timefmt::cedar_datetime(req.time).ok_or(FactsError::Time)?;
    let context = Context::from_pairs([
        ("page".to_owned(), s(req.page)),
        ("time".to_owned(), RestrictedExpression::new_datetime(&time)),
    ])
    .map_err(cedar_err)?;
    let request = Request::new(principal, action, resource, context, None).map_err(cedar_err)?;
    let entities = Entities::from_entities(entities, None).map_err(cedar_err)?;
    Ok((request, entities))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(caller: &'a str, page: &'a str) -> ConsoleRequest<'a> {
        ConsoleRequest {
            caller,
            cluster: "east",
            trust_domain: "east.example",
            page,
            time: SystemTime::now(),
        }
    }

    #[test]
    fn the_default_admits_the_audit_namespace_of_its_own_trust_domain_only() {
        let p = ConsolePolicy::default_for("east.example").unwrap();
        let yes = p.authorize(&req("spiffe://east.example/ns/audit/sa/alice", "decisions"));
        assert!(yes.allowed, "{yes:?}");
        assert_eq!(yes.reasons, ["console-audit-namespace"]);
        for caller in [
            "spiffe://east.example/ns/shop/sa/web",
            "spiffe://west.example/ns/audit/sa/alice",
            "spiffe://east.example/audit",
            "not a spiffe id",
            "",
        ] {
            let no = p.authorize(&req(caller, "decisions"));
            assert!(!no.allowed, "{caller}: {no:?}");
        }
        assert!(
            !p.authorize(&req("x", "graph")).errors.is_empty(),
            "a malformed caller is an error, not a quiet deny"
        );
    }

    #[test]
    fn a_policy_file_can_limit_pages_and_is_validated_strictly() {
        let p = ConsolePolicy::from_sources(&[SourceFile {
            name: "console.cedar".into(),
            text: r#"@id("sre-graph")
permit (principal in TrustDomain::"east.example", action == Action::"view", resource == Console::"east")
when { context.page == "graph" };"#
                .into(),
        }])
        .unwrap();
        let sre = "spiffe://east.example/ns/sre/sa/bob";
        assert!(p.authorize(&req(sre, "graph")).allowed);
        assert!(!p.authorize(&req(sre, "decisions")).allowed);
        let mut other = req(sre, "graph");
        other.cluster = "west";
        assert!(!p.authorize(&other).allowed);

        // A typo in an attribute is refused at load, with the file named.
        let bad = ConsolePolicy::from_sources(&[SourceFile {
            name: "console.cedar".into(),
            text: r#"permit (principal, action, resource) when { context.pgae == "graph" };"#
                .into(),
        }])
        .unwrap_err();
        assert!(bad.to_string().contains("console.cedar"), "{bad}");
        // The mesh's actions do not exist here.
        assert!(
            ConsolePolicy::from_sources(&[SourceFile {
                name: "console.cedar".into(),
                text: r#"permit (principal, action == Action::"GET", resource);"#.into(),
            }])
            .is_err()
        );
        // A file with no policy is refused (not a silent deny-all).
        assert!(matches!(
            ConsolePolicy::from_sources(&[SourceFile {
                name: "console.cedar".into(),
                text: "// nothing\n".into(),
            }]),
            Err(LoadError::NoPolicies(_))
        ));
        assert!(matches!(
            ConsolePolicy::load(Path::new("/nonexistent/console.txt")),
            Err(LoadError::NoPolicies(_))
        ));
    }
}
