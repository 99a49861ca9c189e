//! Turning a solver's counterexample (a Cedar request and entities) into the request facts
//! `policy check` takes: `--principal`, `--action`, `--resource` and a `--context` object.
//!
//! The mesh model guards (see `model`) keep the solver to requests the gateway can build,
//! but some rules cannot be said in Cedar (which characters a trust domain may hold, say).
//! A value that breaks such a rule is replaced by a valid one of the same kind; the request
//! is then decided again by the real engines, and the counterexample says whether that
//! confirmed it.

use std::collections::BTreeMap;

use cedar_policy::{Entities, Entity, EvalResult, Request};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::facts::{Caller, split_service, valid_trust_domain};
use crate::tools::CheckContext;

/// A request that refutes a property, in the shape `policy check` takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Counterexample {
    /// `--principal`: the caller's SPIFFE ID.
    pub principal: String,
    /// `--action`: the HTTP method, or `connect`.
    pub action: String,
    /// `--resource`: `<service>.<namespace>.<cluster>`.
    pub resource: String,
    /// `--context`: a partial context object (every key `policy check` accepts).
    pub context: Value,
    /// Whether deciding this very request with meshgate's engines shows the refutation
    /// (for example: allowed by the new set, denied by the old one).
    pub confirmed: bool,
}

impl Counterexample {
    /// The context as `policy check` parses it.
    pub fn check_context(&self) -> Option<CheckContext> {
        serde_json::from_value(self.context.clone()).ok()
    }
}

/// Reads the solver's request as request facts.
pub(crate) fn from_env(request: &Request, entities: &Entities) -> Counterexample {
    let ctx = request.context();
    let get = |key: &str| ctx.and_then(|c| c.get(key));
    let string = |key: &str| match get(key) {
        Some(EvalResult::String(s)) => Some(s),
        _ => None,
    };
    let principal = request.principal().and_then(|u| entities.get(u));
    let resource = request.resource().and_then(|u| entities.get(u));
    let source_cluster = string("source_cluster").unwrap_or_default();
    let caller = principal.map_or_else(|| "spiffe://example.org/workload".to_owned(), caller_id);
    let (service, dest_td, labels) = resource.map_or_else(
        || {
            (
                "svc.ns.cluster".to_owned(),
                "example.org".to_owned(),
                BTreeMap::new(),
            )
        },
        service_id,
    );
    let action = request
        .action()
        .map(|a| a.id().unescaped().to_owned())
        .unwrap_or_default();
    let path = string("path")
        .filter(|p| crate::path::normalize_path(p).as_deref() == Ok(p.as_str()))
        .unwrap_or_else(|| "/".to_owned());
    let mut context = Map::new();
    context.insert("path".into(), json!(path));
    if let Some(raw) = string("raw_path")
        .filter(|r| r != &path && crate::path::normalize_path(r).as_deref() == Ok(path.as_str()))
    {
        context.insert("raw_path".into(), json!(raw));
    }
    context.insert("source_cluster".into(), json!(label(&source_cluster, true)));
    let dest_cluster = service.rsplit('.').next().unwrap_or_default().to_owned();
    context.insert("destination_cluster".into(), json!(dest_cluster));
    context.insert("destination_trust_domain".into(), json!(dest_td));
    let mtls = matches!(get("mtls"), Some(EvalResult::Bool(true)));
    context.insert("mtls".into(), json!(mtls));
    // Always given, so `policy check` does not fall back to its clock.
    let time = get("time")
        .as_ref()
        .and_then(datetime)
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned());
    context.insert("time".into(), json!(time));
    let tags_of = |key: &str| match get(key) {
        Some(EvalResult::EntityUid(uid)) => entities.get(&uid).map(tags).unwrap_or_default(),
        _ => BTreeMap::new(),
    };
    let headers: BTreeMap<String, String> = tags_of("headers")
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .filter(|(k, _)| !crate::facts::HIDDEN_HEADERS.contains(&k.as_str()))
        .collect();
    if !headers.is_empty() {
        context.insert("headers".into(), json!(headers));
    }
    if matches!(get("has_claims"), Some(EvalResult::Bool(true))) {
        context.insert("claims".into(), json!(tags_of("claims")));
    }
    if !labels.is_empty() {
        context.insert("labels".into(), json!(labels));
    }
    Counterexample {
        principal: caller,
        action,
        resource: service,
        context: Value::Object(context),
        confirmed: false,
    }
}

/// The workload's SPIFFE ID. What policies can test is kept first: an entity id that is a
/// SPIFFE ID (a literal of the policies, usually) and agrees with the groups the solver put
/// it in; else those groups (namespace, trust domain), then its attributes.
fn caller_id(p: &Entity) -> String {
    let attr = |name: &str| match p.attr(name) {
        Some(Ok(EvalResult::String(s))) => Some(s),
        _ => None,
    };
    let id = p.uid().id().unescaped().to_owned();
    let parents = parents(p);
    if let Ok(c) = Caller::parse(&id) {
        let agrees = parents.iter().all(|(ty, pid)| match ty.as_str() {
            "TrustDomain" => *pid == c.trust_domain,
            "Namespace" => c
                .namespace
                .as_ref()
                .is_some_and(|ns| *pid == format!("{}/{ns}", c.trust_domain)),
            _ => true,
        });
        if agrees {
            return id;
        }
    }
    let mut td = trust_domain(&attr("trust_domain").unwrap_or_default());
    if let Some(parent) = parents
        .iter()
        .find_map(|(ty, id)| (ty == "TrustDomain" && valid_trust_domain(id)).then(|| id.clone()))
    {
        td = parent;
    }
    let mut ns = attr("namespace").map(|s| label(&s, false));
    if let Some((pt, pn)) = parents.iter().find_map(|(ty, id)| namespace_of(ty, id)) {
        td = pt;
        ns = Some(pn);
    }
    let sa = attr("service_account").map(|s| label(&s, false));
    match (ns, sa) {
        (Some(ns), sa) => format!(
            "spiffe://{td}/ns/{ns}/sa/{}",
            sa.unwrap_or_else(|| "x".into())
        ),
        (None, _) => format!("spiffe://{td}/workload"),
    }
}

/// The service id, its trust domain and its labels: the labels of the entity id when it is
/// a service name (else its attributes), with the namespace the solver put it in.
fn service_id(r: &Entity) -> (String, String, BTreeMap<String, String>) {
    let attr = |name: &str| match r.attr(name) {
        Some(Ok(EvalResult::String(s))) => s,
        _ => String::new(),
    };
    let mut td = trust_domain(&attr("trust_domain"));
    let parent = parents(r).iter().find_map(|(ty, id)| namespace_of(ty, id));
    let id = r.uid().id().unescaped().to_owned();
    let (mut name, mut ns, mut cluster) = (
        label(&attr("name"), false),
        label(&attr("namespace"), false),
        label(&attr("cluster"), false),
    );
    if let Ok((n, s, c)) = split_service(&id) {
        (name, ns, cluster) = (n.to_owned(), s.to_owned(), c.to_owned());
    }
    if let Some((pt, pn)) = parent {
        td = pt;
        ns = pn;
    }
    (format!("{name}.{ns}.{cluster}"), td, tags(r))
}

/// The (type, id) of each parent of an entity.
fn parents(e: &Entity) -> Vec<(String, String)> {
    let (_, _, parents) = e.clone().into_inner();
    let mut out: Vec<(String, String)> = parents
        .into_iter()
        .map(|p| (p.type_name().to_string(), p.id().unescaped().to_owned()))
        .collect();
    out.sort();
    out
}

/// `Namespace::"<td>/<ns>"` as (td, ns), when both are valid.
fn namespace_of(ty: &str, id: &str) -> Option<(String, String)> {
    let (td, ns) = id.split_once('/')?;
    (ty == "Namespace" && valid_trust_domain(td) && !ns.is_empty() && label(ns, false) == ns)
        .then(|| (td.to_owned(), ns.to_owned()))
}

/// A DNS-label-like name (`[a-z0-9-]`, at most 63): other characters become `-`; empty
/// becomes `x` (or stays empty where empty is allowed).
fn label(s: &str, empty_ok: bool) -> String {
    if s.is_empty() {
        return if empty_ok {
            String::new()
        } else {
            "x".to_owned()
        };
    }
    let out: String = s
        .chars()
        .take(63)
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    out
}

/// A valid trust domain: kept when valid, else made of its valid characters.
fn trust_domain(s: &str) -> String {
    if valid_trust_domain(s) {
        return s.to_owned();
    }
    let cleaned: String = s
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
        .take(255)
        .collect();
    if cleaned.is_empty() {
        "example.org".to_owned()
    } else {
        cleaned
    }
}

fn tags(e: &Entity) -> BTreeMap<String, String> {
    e.tags()
        .filter_map(|(k, v)| match v {
            Ok(EvalResult::String(s)) => Some((k.to_owned(), s)),
            _ => None,
        })
        .collect()
}

/// A Cedar `datetime` value as RFC 3339, when it is one `policy check` can read. Cedar
/// renders it as `datetime("1970-01-01").offset(duration("<n>ms"))` (or a plain literal).
fn datetime(v: &EvalResult) -> Option<String> {
    let EvalResult::ExtensionValue(text) = v else {
        return None;
    };
    if let Some(ms) = text
        .strip_prefix("datetime(\"1970-01-01\").offset(duration(\"")
        .and_then(|t| t.strip_suffix("ms\"))"))
    {
        let ms: i64 = ms.parse().ok()?;
        let epoch = std::time::UNIX_EPOCH;
        let d = std::time::Duration::from_millis(ms.unsigned_abs());
        let t = if ms >= 0 {
            epoch.checked_add(d)?
        } else {
            epoch.checked_sub(d)?
        };
        let text = crate::timefmt::to_rfc3339(t);
        // `to_rfc3339` falls back to the epoch outside 0000–9999.
        return (ms == 0 || text != "1970-01-01T00:00:00Z").then_some(text);
    }
    let inner = text
        .strip_prefix("datetime(\"")
        .and_then(|t| t.strip_suffix("\")"))?;
    crate::timefmt::parse_rfc3339(inner).map(crate::timefmt::to_rfc3339)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_become_valid_ones() {
        assert_eq!(label("Orders_1", false), "orders-1");
        assert_eq!(label("", false), "x");
        assert_eq!(trust_domain("East.Example"), "east.example");
        assert_eq!(trust_domain("A/B"), "ab");
        assert_eq!(trust_domain("/"), "example.org");
        assert_eq!(trust_domain("west.example"), "west.example");
    }

    #[test]
    fn datetimes_are_read_in_the_form_cedar_renders_them() {
        let v = |s: &str| EvalResult::ExtensionValue(s.to_owned());
        assert_eq!(
            datetime(&v(
                r#"datetime("1970-01-01").offset(duration("1700000000123ms"))"#
            )),
            Some("2023-11-14T22:13:20.123Z".to_owned())
        );
        assert_eq!(
            datetime(&v(
                r#"datetime("1970-01-01").offset(duration("-86400000ms"))"#
            )),
            Some("1969-12-31T00:00:00Z".to_owned())
        );
        assert_eq!(
            datetime(&v(r#"datetime("1970-01-01").offset(duration("0ms"))"#)),
            Some("1970-01-01T00:00:00Z".to_owned())
        );
        assert_eq!(datetime(&v("decimal(\"1.0\")")), None);
    }
}
