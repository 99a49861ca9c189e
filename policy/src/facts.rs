//! Request facts and the one builder that turns them into a Cedar request and entities
//! (CONTRACTS.md, "The Cedar model"). The gateway, `policy check`, `policy test` and
//! `policy replay` all go through [`build`].

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::SystemTime;

use cedar_policy::{
    Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, Request, RestrictedExpression,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::path::PathError;

/// Headers that carry credentials: never exposed to policies and never logged.
pub const HIDDEN_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie"];

/// Everything the gateway knows about one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFacts {
    /// The caller's SPIFFE ID, e.g. `spiffe://east.example/ns/shop/sa/web`.
    pub caller: String,
    /// The destination service, `<service>.<namespace>.<cluster>`.
    pub service: String,
    /// The trust domain of the service's cluster.
    pub destination_trust_domain: String,
    /// The HTTP method, or `CONNECT` for raw TCP.
    pub method: String,
    /// The request target as sent (path and query).
    pub raw_path: String,
    /// Request headers (lowercased names) the gateway exposes to policies.
    pub headers: Vec<(String, String)>,
    /// The cluster the request comes from.
    pub source_cluster: String,
    /// The cluster the service runs in.
    pub destination_cluster: String,
    /// Whether the caller was authenticated by mutual TLS on this hop.
    pub mtls: bool,
    /// When the request arrived.
    #[serde(with = "crate::timefmt::serde_system_time")]
    pub time: SystemTime,
    /// Verified end-user JWT claims, if any.
    pub claims: Option<BTreeMap<String, String>>,
    /// The destination service's labels.
    pub service_labels: BTreeMap<String, String>,
}

/// Why request facts could not be turned into a Cedar request (the request is denied).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FactsError {
    /// The caller is not a valid SPIFFE ID.
    #[error("caller `{0}` is not a valid SPIFFE ID")]
    BadCaller(String),
    /// The service is not `<service>.<namespace>.<cluster>`.
    #[error("service `{0}` is not `<service>.<namespace>.<cluster>`")]
    BadService(String),
    /// The destination trust domain is not a valid trust domain name.
    #[error("destination trust domain `{0}` is not a valid trust domain")]
    BadTrustDomain(String),
    /// The method maps to no action of the schema.
    #[error("method `{0}` is not allowed through the mesh")]
    UnknownMethod(String),
    /// The path was refused by normalization.
    #[error(transparent)]
    Path(#[from] PathError),
    /// The request time cannot be expressed as a Cedar datetime.
    #[error("request time cannot be represented as a datetime")]
    Time,
    /// Cedar refused the request or its entities (they do not conform to the schema).
    #[error("cedar refused the request: {0}")]
    Cedar(String),
}

/// A parsed SPIFFE ID: `spiffe://<trust domain><path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    pub trust_domain: String,
    pub namespace: Option<String>,
    pub service_account: Option<String>,
}

impl Caller {
    /// Parses a SPIFFE ID (lowercase trust domain, path segments of `[A-Za-z0-9._-]` that are
    /// neither `.` nor `..`), recognizing `/ns/<namespace>/sa/<account>`.
    pub fn parse(id: &str) -> Result<Self, FactsError> {
        let bad = || FactsError::BadCaller(id.chars().take(200).collect());
        if id.len() > 2048 {
            return Err(bad());
        }
        let rest = id.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if !valid_trust_domain(td) {
            return Err(bad());
        }
        let segments: Vec<&str> = if path.is_empty() {
            Vec::new()
        } else {
            path[1..].split('/').collect()
        };
        let seg_ok = |s: &&str| {
            !s.is_empty()
                && *s != "."
                && *s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        };
        if !segments.iter().all(seg_ok) {
            return Err(bad());
        }
        let (namespace, service_account) = match segments.as_slice() {
            ["ns", ns, "sa", sa] => (Some((*ns).to_owned()), Some((*sa).to_owned())),
            _ => (None, None),
        };
        Ok(Self {
            trust_domain: td.to_owned(),
            namespace,
            service_account,
        })
    }
}

/// A trust domain: non-empty, at most 255 bytes of `[a-z0-9.-_]`.
pub(crate) fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

/// `<service>.<namespace>.<cluster>` split in its three labels.
pub(crate) fn split_service(service: &str) -> Result<(&str, &str, &str), FactsError> {
    let bad = || FactsError::BadService(service.chars().take(200).collect());
    let label_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    let mut parts = service.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(s), Some(n), Some(c), None) if label_ok(s) && label_ok(n) && label_ok(c) => {
            Ok((s, n, c))
        }
        _ => Err(bad()),
    }
}

/// The action id for a method: the uppercased HTTP method, or `connect` for `CONNECT`.
pub(crate) fn action_name(method: &str) -> Result<&'static str, FactsError> {
    const METHODS: &[&str] = &["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"];
    let upper = method.to_ascii_uppercase();
    if upper == "CONNECT" {
        return Ok("connect");
    }
    METHODS
        .iter()
        .find(|m| **m == upper)
        .copied()
        .ok_or_else(|| FactsError::UnknownMethod(method.chars().take(64).collect()))
}

/// A built Cedar request with its entities.
#[derive(Debug)]
pub(crate) struct Built {
    pub request: Request,
    pub entities: crate::subject::RequestEntities,
    pub normalized_path: String,
}

/// The reference builder: request facts → Cedar request + entities, all built for this one
/// request. The engine builds the same from cached parts (`subject::build_cached`); tests
/// check both agree.
///
/// The entities and context conform to the schema by construction (a test checks every
/// shape with Cedar's own validation, `build_checked`), so the hot path skips the
/// per-request schema check and adds the schema's action hierarchy, computed once at load.
#[cfg(test)]
pub(crate) fn build(facts: &RequestFacts, actions: &Actions) -> Result<Built, FactsError> {
    let parts = parts(facts)?;
    // Only the request's action and its groups: Cedar computes the transitive closure of
    // every entity it is handed, per request, and that dominates the cost of a decision.
    let action_entities = actions.get(&parts.action).map_or(&[][..], Vec::as_slice);
    let request = Request::new(
        parts.principal,
        parts.action,
        parts.resource,
        parts.context,
        None,
    )
    .map_err(cedar_err)?;
    let entities = Entities::from_entities(
        parts
            .entities
            .into_iter()
            .chain(action_entities.iter().cloned()),
        None,
    )
    .map_err(cedar_err)?;
    let entities = crate::subject::RequestEntities::Own(entities);
    Ok(Built {
        request,
        entities,
        normalized_path: parts.path,
    })
}

/// The same request, validated by Cedar against `schema`.
#[cfg(test)]
pub(crate) fn build_checked(
    facts: &RequestFacts,
    schema: &cedar_policy::Schema,
) -> Result<Built, FactsError> {
    let parts = parts(facts)?;
    let request = Request::new(
        parts.principal,
        parts.action,
        parts.resource,
        parts.context,
        Some(schema),
    )
    .map_err(cedar_err)?;
    let entities = Entities::from_entities(parts.entities, Some(schema)).map_err(cedar_err)?;
    let entities = crate::subject::RequestEntities::Own(entities);
    Ok(Built {
        request,
        entities,
        normalized_path: parts.path,
    })
}

/// For each action, its entity and the entities of every group it is in (from the schema).
pub(crate) type Actions = std::collections::HashMap<EntityUid, Vec<Entity>>;

/// Indexes the schema's action entities by action, each with its groups.
pub(crate) fn index_actions(all: &Entities) -> Actions {
    all.iter()
        .map(|action| {
            let mut with_groups = vec![action.clone()];
            with_groups.extend(
                all.iter()
                    .filter(|group| all.is_ancestor_of(&group.uid(), &action.uid()))
                    .cloned(),
            );
            (action.uid(), with_groups)
        })
        .collect()
}

#[cfg(test)]
struct Parts {
    principal: EntityUid,
    action: EntityUid,
    resource: EntityUid,
    context: Context,
    entities: Vec<Entity>,
    path: String,
}

#[cfg(test)]
fn parts(facts: &RequestFacts) -> Result<Parts, FactsError> {
    let (principal, resource, mut entities) = subject_parts(facts)?;
    let action = uid("Action", action_name(&facts.method)?)?;
    let path = crate::path::normalize_path(&facts.raw_path)?;
    let (headers, claims, context) = request_parts(facts, &path, crate::subject::Reads::ALL)?;
    entities.push(headers);
    entities.push(claims);
    Ok(Parts {
        principal,
        action,
        resource,
        context,
        entities,
        path,
    })
}

/// What depends only on who calls what: the caller and the service with their parents (the
/// part the engine caches per pair, see `subject`).
pub(crate) fn subject_parts(
    facts: &RequestFacts,
) -> Result<(EntityUid, EntityUid, Vec<Entity>), FactsError> {
    let caller = Caller::parse(&facts.caller)?;
    let (svc_name, svc_ns, svc_cluster) = split_service(&facts.service)?;
    if !valid_trust_domain(&facts.destination_trust_domain) {
        return Err(FactsError::BadTrustDomain(
            facts.destination_trust_domain.chars().take(200).collect(),
        ));
    }
    let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
    let mut entities = Vec::with_capacity(8);
    let principal = caller_entities(&facts.caller, &caller, &facts.source_cluster, &mut entities)?;

    // The service and its namespace in the destination trust domain.
    let svc_ns_uid = namespace_entity(&mut entities, &facts.destination_trust_domain, svc_ns)?;
    let resource = uid("Service", &facts.service)?;
    let labels = facts.service_labels.iter().map(|(k, v)| (k.clone(), s(v)));
    entities.push(entity(
        resource.clone(),
        [
            ("name".to_owned(), s(svc_name)),
            ("namespace".to_owned(), s(svc_ns)),
            ("cluster".to_owned(), s(svc_cluster)),
            (
                "trust_domain".to_owned(),
                s(&facts.destination_trust_domain),
            ),
        ],
        [svc_ns_uid],
        labels,
    )?);
    Ok((principal, resource, entities))
}

/// The caller `Workload::"<id>"` and its parents (trust domain, and namespace when the ID
/// has one) pushed onto `entities`; `cluster` is set when `source_cluster` is not empty.
pub(crate) fn caller_entities(
    id: &str,
    caller: &Caller,
    source_cluster: &str,
    entities: &mut Vec<Entity>,
) -> Result<EntityUid, FactsError> {
    let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
    let caller_td = uid("TrustDomain", &caller.trust_domain)?;
    let mut caller_parents = vec![caller_td.clone()];
    entities.push(Entity::new_no_attrs(caller_td, Default::default()));
    let mut caller_attrs = vec![("trust_domain".to_owned(), s(&caller.trust_domain))];
    if let (Some(ns), Some(sa)) = (&caller.namespace, &caller.service_account) {
        let ns_uid = namespace_entity(entities, &caller.trust_domain, ns)?;
        caller_parents.push(ns_uid);
        caller_attrs.push(("namespace".to_owned(), s(ns)));
        caller_attrs.push(("service_account".to_owned(), s(sa)));
    }
    if !source_cluster.is_empty() {
        caller_attrs.push(("cluster".to_owned(), s(source_cluster)));
    }
    let principal = uid("Workload", id)?;
    entities.push(entity(principal.clone(), caller_attrs, caller_parents, [])?);
    Ok(principal)
}

/// What changes with every request: the headers and claims entities and the context.
pub(crate) fn request_parts(
    facts: &RequestFacts,
    path: &str,
    reads: crate::subject::Reads,
) -> Result<(Entity, Entity, Context), FactsError> {
    let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
    // Headers and claims as tags on their own entities.
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    let exposed = if reads.has("headers") {
        &facts.headers[..]
    } else {
        &[]
    };
    for (name, value) in exposed {
        let name = name.to_ascii_lowercase();
        if HIDDEN_HEADERS.contains(&name.as_str()) {
            continue;
        }
        // Repeated headers are joined as HTTP does (RFC 9110 §5.3).
        let slot = headers.entry(name).or_default();
        if !slot.is_empty() {
            slot.push_str(", ");
        }
        slot.push_str(value);
    }
    let headers = entity(
        request_uid("Headers")?,
        [],
        [],
        headers
            .into_iter()
            .map(|(k, v)| (k, RestrictedExpression::new_string(v))),
    )?;
    let claims = facts
        .claims
        .iter()
        .flatten()
        .filter(|_| reads.has("claims"))
        .map(|(k, v)| (k.clone(), s(v)));
    let claims = entity(request_uid("Claims")?, [], [], claims)?;
    // The time is checked (a request at an unrepresentable time is an error) even when no
    // policy reads it; building its Cedar value is skipped then.
    let time = crate::timefmt::cedar_datetime(facts.time).ok_or(FactsError::Time)?;
    // Only what the policies can read (all of it for tools and tests, see `Reads`).
    let mut pairs = Vec::with_capacity(10);
    let mut put = |key: &str, value: &dyn Fn() -> RestrictedExpression| {
        if reads.has(key) {
            pairs.push((key.to_owned(), value()));
        }
    };
    put("path", &|| s(path));
    put("raw_path", &|| s(&facts.raw_path));
    put("method", &|| s(&facts.method.to_ascii_uppercase()));
    put("source_cluster", &|| s(&facts.source_cluster));
    put("destination_cluster", &|| s(&facts.destination_cluster));
    put("mtls", &|| RestrictedExpression::new_bool(facts.mtls));
    put("time", &|| datetime(facts.time, &time));
    let headers_uid = request_uid("Headers")?;
    let claims_uid = request_uid("Claims")?;
    put("headers", &|| {
        RestrictedExpression::new_entity_uid(headers_uid.clone())
    });
    put("claims", &|| {
        RestrictedExpression::new_entity_uid(claims_uid.clone())
    });
    put("has_claims", &|| {
        RestrictedExpression::new_bool(facts.claims.is_some())
    });
    let context = Context::from_pairs(pairs).map_err(cedar_err)?;
    Ok((headers, claims, context))
}

/// `Headers::"request"` or `Claims::"request"`.
pub(crate) fn request_uid(ty: &str) -> Result<EntityUid, FactsError> {
    uid(ty, "request")
}

/// The request time as a Cedar datetime. Building one parses the extension's name, so the
/// last one made on this thread is reused within the same millisecond.
fn datetime(t: SystemTime, text: &str) -> RestrictedExpression {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(u128, RestrictedExpression)>> =
            const { std::cell::RefCell::new(None) };
    }
    let millis = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .ok();
    if let Some(ms) = millis
        && let Some(expr) = LAST.with_borrow(|last| {
            last.as_ref()
                .filter(|(at, _)| *at == ms)
                .map(|(_, e)| e.clone())
        })
    {
        return expr;
    }
    let expr = RestrictedExpression::new_datetime(text);
    if let Some(ms) = millis {
        LAST.with_borrow_mut(|last| *last = Some((ms, expr.clone())));
    }
    expr
}

fn namespace_entity(
    entities: &mut Vec<Entity>,
    td: &str,
    ns: &str,
) -> Result<EntityUid, FactsError> {
    let ns_uid = uid("Namespace", &format!("{td}/{ns}"))?;
    if entities.iter().any(|e| e.uid() == ns_uid) {
        return Ok(ns_uid);
    }
    let td_uid = uid("TrustDomain", td)?;
    if !entities.iter().any(|e| e.uid() == td_uid) {
        entities.push(Entity::new_no_attrs(td_uid.clone(), Default::default()));
    }
    let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
    entities.push(entity(
        ns_uid.clone(),
        [
            ("trust_domain".to_owned(), s(td)),
            ("name".to_owned(), s(ns)),
        ],
        [td_uid],
        [],
    )?);
    Ok(ns_uid)
}

pub(crate) fn entity(
    uid: EntityUid,
    attrs: impl IntoIterator<Item = (String, RestrictedExpression)>,
    parents: impl IntoIterator<Item = EntityUid>,
    tags: impl IntoIterator<Item = (String, RestrictedExpression)>,
) -> Result<Entity, FactsError> {
    Entity::new_with_tags(uid, attrs, parents, tags).map_err(cedar_err)
}

pub(crate) fn uid(ty: &str, id: &str) -> Result<EntityUid, FactsError> {
    Ok(EntityUid::from_type_name_and_id(
        type_name(ty)?,
        EntityId::new(id),
    ))
}

/// The schema's entity type names, parsed once (parsing one runs Cedar's parser).
fn type_name(ty: &str) -> Result<EntityTypeName, FactsError> {
    static NAMES: std::sync::OnceLock<Vec<(&'static str, EntityTypeName)>> =
        std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| {
        [
            "TrustDomain",
            "Namespace",
            "Workload",
            "Service",
            "Headers",
            "Claims",
            "Action",
        ]
        .into_iter()
        .filter_map(|t| EntityTypeName::from_str(t).ok().map(|n| (t, n)))
        .collect()
    });
    match names.iter().find(|(t, _)| *t == ty) {
        Some((_, n)) => Ok(n.clone()),
        None => EntityTypeName::from_str(ty).map_err(cedar_err),
    }
}

pub(crate) fn cedar_err(e: impl std::fmt::Display) -> FactsError {
    FactsError::Cedar(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_parse_with_and_without_namespace() {
        let c = Caller::parse("spiffe://east.example/ns/shop/sa/web").unwrap();
        assert_eq!(c.trust_domain, "east.example");
        assert_eq!(c.namespace.as_deref(), Some("shop"));
        assert_eq!(c.service_account.as_deref(), Some("web"));
        let g = Caller::parse("spiffe://east.example/meshgate/gateway").unwrap();
        assert_eq!(g.namespace, None);
        for bad in [
            "http://east.example/ns/a/sa/b",
            "spiffe://",
            "spiffe://East.example/x",
            "spiffe://east.example/ns/../sa/b",
            "spiffe://east.example//x",
            "spiffe://east.example/x/",
            "spiffe://east.example/a b",
        ] {
            assert!(Caller::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn services_and_methods() {
        assert_eq!(
            split_service("orders.shop.west").unwrap(),
            ("orders", "shop", "west")
        );
        assert!(split_service("orders.shop").is_err());
        assert!(split_service("orders.shop.west.mesh").is_err());
        assert!(split_service("Orders.shop.west").is_err());
        assert_eq!(action_name("get").unwrap(), "GET");
        assert_eq!(action_name("CONNECT").unwrap(), "connect");
        assert!(matches!(
            action_name("TRACE"),
            Err(FactsError::UnknownMethod(_))
        ));
    }

    /// Every shape the builder produces conforms to the shipped schema, as Cedar itself
    /// checks it: this is what lets the hot path skip the per-request check.
    #[test]
    fn built_requests_conform_to_the_schema() {
        let schema = cedar_policy::Schema::from_cedarschema_str(crate::MESH_SCHEMA)
            .unwrap()
            .0;
        let actions = index_actions(&schema.action_entities().unwrap());
        let callers = [
            "spiffe://east.example/ns/shop/sa/web",
            "spiffe://east.example/meshgate/gateway",
            "spiffe://east.example/x/y",
        ];
        let methods = [
            "GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "CONNECT",
        ];
        for caller in callers {
            for method in methods {
                for extras in [false, true] {
                    let facts = RequestFacts {
                        caller: caller.to_owned(),
                        service: "orders.shop.west".to_owned(),
                        destination_trust_domain: "west.example".to_owned(),
                        method: method.to_owned(),
                        raw_path: "/v1/orders/42?x=1".to_owned(),
                        headers: if extras {
                            vec![
                                ("x-env".into(), "prod".into()),
                                ("x-env".into(), "eu".into()),
                            ]
                        } else {
                            vec![]
                        },
                        source_cluster: if extras { "east".into() } else { String::new() },
                        destination_cluster: "west".into(),
                        mtls: extras,
                        time: SystemTime::now(),
                        claims: extras
                            .then(|| BTreeMap::from([("sub".to_owned(), "alice".to_owned())])),
                        service_labels: if extras {
                            BTreeMap::from([("tier".to_owned(), "gold".to_owned())])
                        } else {
                            BTreeMap::new()
                        },
                    };
                    let checked = build_checked(&facts, &schema);
                    assert!(
                        checked.is_ok(),
                        "{caller} {method} {extras}: {:?}",
                        checked.err()
                    );
                    let fast = build(&facts, &actions).unwrap();
                    // The request's action group is there without the schema too.
                    let action = uid("Action", action_name(method).unwrap()).unwrap();
                    let group = match method {
                        "GET" | "HEAD" | "OPTIONS" => Some("read"),
                        "CONNECT" => None,
                        _ => Some("write"),
                    };
                    if let Some(group) = group {
                        let group = uid("Action", group).unwrap();
                        assert!(fast.entities.is_ancestor_of(&group, &action), "{method}");
                    }
                }
            }
        }
    }
}
