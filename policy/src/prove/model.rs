//! The mesh model: facts every request the gateway builds satisfies (CONTRACTS.md, "The Cedar
//! model"), written as Cedar `forbid` policies.
//!
//! SymCC reasons about every request the schema allows: any entity ids, any attributes, any
//! hierarchy. The gateway builds far fewer: a workload's attributes and parents follow from
//! its SPIFFE ID, `context.method` is the action, the path is normalized, and so on. A proof
//! over the schema alone is sound for the mesh, but its counterexamples can be requests the
//! gateway never builds (a `Workload::""` in `Namespace::"x"`), which cannot be pasted into
//! `policy check`. Adding these forbids to the set on the "allows" side of a query keeps the
//! solver to requests the mesh can build.
//!
//! Every guard must hold for every request `facts::build` produces: a guard that excluded a
//! real request would make a proof unsound. Each one below names the builder rule it
//! restates. Guards never fail to evaluate (each optional attribute is tested with `has`
//! first), since Cedar skips a policy whose condition errors.

use std::collections::BTreeSet;

use cedar_policy::{EntityUid, Policy, PolicyId, PolicySet};

use crate::facts::{Caller, split_service, valid_trust_domain};

/// The id prefix of guard policies (a policy set may not use it).
pub(crate) const GUARD_PREFIX: &str = "meshgate-model/";

/// Entity and tag-key literals that the policies of some sets mention.
#[derive(Debug, Default)]
pub(crate) struct Literals {
    workloads: BTreeSet<String>,
    services: BTreeSet<String>,
    namespaces: BTreeSet<String>,
    trust_domains: BTreeSet<String>,
    tag_keys: BTreeSet<String>,
}

impl Literals {
    /// Collects the literals of every policy (template links included) of `sets`.
    pub(crate) fn of(sets: &[&PolicySet]) -> Self {
        let mut lits = Self::default();
        for set in sets {
            for policy in set.policies() {
                if let Ok(json) = policy.to_json() {
                    lits.walk(&json);
                }
                for uid in policy
                    .template_links()
                    .into_iter()
                    .flat_map(|l| l.into_values())
                {
                    lits.entity(&uid.type_name().to_string(), uid.id().unescaped());
                }
            }
        }
        lits
    }

    fn walk(&mut self, v: &serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                if let (Some(serde_json::Value::String(ty)), Some(serde_json::Value::String(id))) =
                    (map.get("type"), map.get("id"))
                {
                    self.entity(ty, id);
                }
                for op in ["hasTag", "getTag"] {
                    let key = map
                        .get(op)
                        .and_then(|o| o.get("right"))
                        .and_then(|r| r.get("Value"))
                        .and_then(serde_json::Value::as_str);
                    if let Some(key) = key {
                        self.tag_keys.insert(key.to_owned());
                    }
                }
                map.values().for_each(|v| self.walk(v));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| self.walk(v)),
            _ => {}
        }
    }

    fn entity(&mut self, ty: &str, id: &str) {
        let set = match ty {
            "Workload" => &mut self.workloads,
            "Service" => &mut self.services,
            "Namespace" => &mut self.namespaces,
            "TrustDomain" => &mut self.trust_domains,
            _ => return,
        };
        set.insert(id.to_owned());
    }
}

/// A Cedar string literal.
pub(crate) fn lit(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The guards in the order a query tries them: none (quickest; a proof there holds for the
/// mesh too), those about each entity the policies name (equalities the solver handles
/// well), then also the general rules (their `like` patterns on strings are the slowest
/// part, measured on 200 policies). A refutation moves to the next level only while its
/// counterexample is not one the gateway can build.
pub(crate) fn levels(lits: &Literals, actions: &[EntityUid]) -> [Vec<String>; 3] {
    let entities = entity_guards(lits);
    let mut full = entities.clone();
    full.extend(general_guards(lits, actions));
    [Vec::new(), entities, full]
}

/// The guards about every request, for a schema with `actions` (`GET`, …, `connect`).
fn general_guards(lits: &Literals, actions: &[EntityUid]) -> Vec<String> {
    let mut g = Vec::new();
    // context.headers and context.claims are always these two entities.
    g.push(
        r#"unless { context.headers == Headers::"request" && context.claims == Claims::"request" }"#
            .to_owned(),
    );
    // The action is the method (`action_name`): `Action::"GET"` ⇔ `context.method == "GET"`.
    for action in actions {
        let id = action.id().unescaped();
        let method = if id == "connect" {
            "CONNECT".to_owned()
        } else {
            id.to_ascii_uppercase()
        };
        g.push(format!(
            "when {{ action == {action} && context.method != {} }}",
            lit(&method)
        ));
    }
    // A SPIFFE ID has a namespace and a service account together, or neither (`Caller`);
    // trust domains and names are never empty and hold no `/`; a workload has a `cluster`
    // exactly when the source cluster is known, and it is that cluster.
    g.push(
        "unless { (principal has namespace) == (principal has service_account) \
         && principal.trust_domain != \"\" && !(principal.trust_domain like \"*/*\") \
         && (if principal has namespace then principal.namespace != \"\" \
             && !(principal.namespace like \"*/*\") else true) \
         && (if principal has service_account then principal.service_account != \"\" else true) \
         && (if principal has cluster then principal.cluster == context.source_cluster \
             && context.source_cluster != \"\" else context.source_cluster == \"\") }"
            .to_owned(),
    );
    // A service is `<name>.<namespace>.<cluster>` of non-empty labels without dots
    // (`split_service`), in a valid trust domain.
    g.push(
        "unless { resource.name != \"\" && resource.namespace != \"\" && resource.cluster != \"\" \
         && !(resource.name like \"*.*\") && !(resource.namespace like \"*.*\") \
         && !(resource.cluster like \"*.*\") && resource.trust_domain != \"\" \
         && !(resource.trust_domain like \"*/*\") }"
            .to_owned(),
    );
    // The path is normalized (`normalize_path`): `*`, or absolute without empty or dot
    // segments, query, fragment, `;` or backslash.
    g.push(
        "unless { context.path == \"*\" || (context.path like \"/*\" \
         && !(context.path like \"*//*\") && !(context.path like \"*/./*\") \
         && !(context.path like \"*/../*\") && !(context.path like \"*/.\") \
         && !(context.path like \"*/..\") && !(context.path like \"*?*\") \
         && !(context.path like \"*#*\") && !(context.path like \"*;*\") \
         && !(context.path like \"*\\\\*\")) }"
            .to_owned(),
    );
    // The request time is a Cedar datetime in the years 0000–9999 (`cedar_datetime`).
    g.push(
        "unless { context.time >= datetime(\"0000-01-01\") \
         && context.time <= datetime(\"9999-12-31T23:59:59.999Z\") }"
            .to_owned(),
    );
    // Credentials are never exposed; header names are lowercase; no claims without an end
    // user (`facts::build`).
    let mut hidden: Vec<String> = crate::facts::HIDDEN_HEADERS
        .iter()
        .map(|h| (*h).to_owned())
        .collect();
    hidden.extend(
        lits.tag_keys
            .iter()
            .filter(|k| k.chars().any(|c| c.is_ascii_uppercase()))
            .cloned(),
    );
    let hidden = hidden
        .iter()
        .map(|h| format!("context.headers.hasTag({})", lit(h)))
        .collect::<Vec<_>>()
        .join(" || ");
    g.push(format!("when {{ {hidden} }}"));
    if !lits.tag_keys.is_empty() {
        let any_claim = lits
            .tag_keys
            .iter()
            .map(|k| format!("context.claims.hasTag({})", lit(k)))
            .collect::<Vec<_>>()
            .join(" || ");
        g.push(format!("when {{ !context.has_claims && ({any_claim}) }}"));
    }
    g
}

/// The guards about the entities the policies name.
fn entity_guards(lits: &Literals) -> Vec<String> {
    let mut g = Vec::new();
    // Membership follows the IDs: `Workload` is in `TrustDomain::"<td>"` and, with a
    // namespace, in `Namespace::"<td>/<ns>"`; a service is in `Namespace::"<its td>/<ns>"`.
    for td in &lits.trust_domains {
        g.push(format!(
            "unless {{ (principal in TrustDomain::{l}) == (principal.trust_domain == {l}) \
             && (resource in TrustDomain::{l}) == (resource.trust_domain == {l}) }}",
            l = lit(td)
        ));
    }
    for ns in &lits.namespaces {
        let uid = format!("Namespace::{}", lit(ns));
        match ns.split_once('/') {
            Some((td, name)) if valid_trust_domain(td) && !name.is_empty() => g.push(format!(
                "unless {{ (principal in {uid}) == (principal.trust_domain == {td} \
                 && principal has namespace && principal.namespace == {name}) \
                 && (resource in {uid}) == (resource.trust_domain == {td} \
                 && resource.namespace == {name}) }}",
                td = lit(td),
                name = lit(name)
            )),
            _ => g.push(format!(
                "when {{ principal in {uid} || resource in {uid} }}"
            )),
        }
    }
    // A workload named in a policy has the attributes its ID gives; with an `/ns/…/sa/…`
    // ID those attributes name it and no other workload.
    for id in &lits.workloads {
        let uid = format!("Workload::{}", lit(id));
        match Caller::parse(id) {
            Ok(c) => match (&c.namespace, &c.service_account) {
                (Some(ns), Some(sa)) => g.push(format!(
                    "unless {{ (principal == {uid}) == (principal.trust_domain == {} \
                     && principal has namespace && principal.namespace == {} \
                     && principal has service_account && principal.service_account == {}) }}",
                    lit(&c.trust_domain),
                    lit(ns),
                    lit(sa)
                )),
                _ => g.push(format!(
                    "when {{ principal == {uid} && (principal.trust_domain != {} \
                     || principal has namespace || principal has service_account) }}",
                    lit(&c.trust_domain)
                )),
            },
            Err(_) => g.push(format!("when {{ principal == {uid} }}")),
        }
    }
    // A service's attributes are the labels of its name, and name it.
    for id in &lits.services {
        let uid = format!("Service::{}", lit(id));
        match split_service(id) {
            Ok((name, ns, cluster)) => g.push(format!(
                "unless {{ (resource == {uid}) == (resource.name == {} \
                 && resource.namespace == {} && resource.cluster == {}) }}",
                lit(name),
                lit(ns),
                lit(cluster)
            )),
            Err(_) => g.push(format!("when {{ resource == {uid} }}")),
        }
    }
    g
}

/// `set` plus one `forbid (principal, action, resource) <condition>;` per guard.
pub(crate) fn with_guards(
    set: &PolicySet,
    conditions: &[String],
) -> Result<PolicySet, super::ProveError> {
    let mut out = set.clone();
    // Guards may be added in two steps (a pattern, then a level): number them on.
    let first = set
        .policies()
        .filter(|p| p.id().to_string().starts_with(GUARD_PREFIX))
        .count();
    for (i, cond) in conditions.iter().enumerate() {
        let text = format!("forbid (principal, action, resource) {cond};");
        let id = PolicyId::new(format!("{GUARD_PREFIX}{}", first + i));
        let policy = Policy::parse(Some(id), &text).map_err(|e| super::ProveError::Internal {
            detail: format!("mesh model guard `{text}` does not parse: {e}"),
        })?;
        out.add(policy).map_err(|e| super::ProveError::Internal {
            detail: format!("cannot add mesh model guard `{text}`: {e}"),
        })?;
    }
    Ok(out)
}

/// The set with every template-linked policy written out as a static one (SymCC does not
/// take links) and the templates themselves left out (they decide nothing unlinked).
pub(crate) fn static_set(set: &PolicySet) -> Result<PolicySet, super::ProveError> {
    let internal = |detail: String| super::ProveError::Internal { detail };
    let mut out = PolicySet::new();
    for p in set.policies() {
        let policy = match (
            p.template_id().and_then(|t| set.template(t)),
            p.template_links(),
        ) {
            (Some(t), Some(links)) => {
                let mut json = t
                    .to_json()
                    .map_err(|e| internal(format!("template `{}`: {e}", t.id())))?;
                for (slot, uid) in &links {
                    let slot = slot.to_string();
                    let key = if slot.contains("principal") {
                        "principal"
                    } else {
                        "resource"
                    };
                    if let Some(scope) = json.get_mut(key).and_then(|v| v.as_object_mut())
                        && scope.remove("slot").is_some()
                    {
                        scope.insert(
                            "entity".into(),
                            serde_json::json!({
                                "type": uid.type_name().to_string(),
                                "id": uid.id().unescaped(),
                            }),
                        );
                    }
                }
                Policy::from_json(Some(p.id().clone()), json)
                    .map_err(|e| internal(format!("linked policy `{}`: {e}", p.id())))?
            }
            _ => p.clone(),
        };
        out.add(policy)
            .map_err(|e| internal(format!("policy `{}`: {e}", p.id())))?;
    }
    Ok(out)
}

/// Two policies that tell where `policy` fails to evaluate, as a subsumption: with the
/// same scope, `forbid … when { C || !C }` (satisfied wherever its conditions `C` evaluate)
/// and `forbid …` (satisfied wherever the scope matches). A request denied by the second
/// but not by the first is one on which `C` fails.
pub(crate) fn error_probe(policy: &Policy) -> Result<(Policy, Policy), super::ProveError> {
    let internal = |detail: String| super::ProveError::Internal { detail };
    let mut json = policy
        .to_json()
        .map_err(|e| internal(format!("policy `{}` has no JSON form: {e}", policy.id())))?;
    let Some(obj) = json.as_object_mut() else {
        return Err(internal(format!(
            "policy `{}` is not a JSON object",
            policy.id()
        )));
    };
    let conditions = obj
        .remove("conditions")
        .and_then(|c| c.as_array().cloned())
        .unwrap_or_default();
    obj.remove("annotations");
    obj.insert("effect".into(), serde_json::json!("forbid"));
    let mut all: Option<serde_json::Value> = None;
    for c in conditions {
        let body = c
            .get("body")
            .cloned()
            .unwrap_or(serde_json::json!({"Value": true}));
        let body = if c.get("kind").and_then(serde_json::Value::as_str) == Some("unless") {
            serde_json::json!({ "!": { "arg": body } })
        } else {
            body
        };
        all = Some(match all {
            None => body,
            Some(prev) => serde_json::json!({ "&&": { "left": prev, "right": body } }),
        });
    }
    let mut scope_only = json.clone();
    if let Some(obj) = scope_only.as_object_mut() {
        obj.insert("conditions".into(), serde_json::json!([]));
    }
    if let (Some(c), Some(obj)) = (all, json.as_object_mut()) {
        let evaluates =
            serde_json::json!({ "||": { "left": c.clone(), "right": { "!": { "arg": c } } } });
        obj.insert(
            "conditions".into(),
            serde_json::json!([{ "kind": "when", "body": evaluates }]),
        );
    }
    let parse = |suffix: &str, v: serde_json::Value| {
        let id = PolicyId::new(format!("{GUARD_PREFIX}probe-{suffix}"));
        Policy::from_json(Some(id), v)
            .map_err(|e| internal(format!("probe for policy `{}`: {e}", policy.id())))
    };
    Ok((parse("evaluates", json)?, parse("scope", scope_only)?))
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use cedar_policy::{Schema, ValidationMode, Validator};

    use super::*;

    const SET: &str = r#"
        permit (principal in Namespace::"east.example/shop", action in Action::"read",
                resource == Service::"orders.shop.west")
        when { context.headers.hasTag("x-env") && principal in TrustDomain::"east.example" };
        permit (principal == Workload::"spiffe://east.example/ns/shop/sa/checkout",
                action == Action::"POST", resource in Namespace::"west.example/shop");
        permit (principal == Workload::"spiffe://east.example/meshgate/gateway", action, resource)
        when { context.claims.hasTag("Sub") };
    "#;

    #[test]
    fn literals_are_collected_from_scopes_and_conditions() {
        let set = PolicySet::from_str(SET).unwrap();
        let lits = Literals::of(&[&set]);
        assert!(
            lits.workloads
                .contains("spiffe://east.example/ns/shop/sa/checkout")
        );
        assert!(lits.services.contains("orders.shop.west"));
        assert_eq!(
            lits.namespaces.iter().collect::<Vec<_>>(),
            ["east.example/shop", "west.example/shop"]
        );
        assert!(lits.trust_domains.contains("east.example"));
        assert_eq!(lits.tag_keys.iter().collect::<Vec<_>>(), ["Sub", "x-env"]);
    }

    /// The guards must type-check in strict mode against the mesh schema, like any policy.
    #[test]
    fn guards_validate_against_the_mesh_schema() {
        let schema = Schema::from_cedarschema_str(crate::MESH_SCHEMA).unwrap().0;
        let set = PolicySet::from_str(SET).unwrap();
        let actions: Vec<EntityUid> = schema.actions().cloned().collect();
        let [_, _, full] = levels(&Literals::of(&[&set]), &actions);
        let guarded = with_guards(&set, &full).unwrap();
        let result = Validator::new(schema).validate(&guarded, ValidationMode::Strict);
        let errors: Vec<String> = result
            .validation_errors()
            .map(ToString::to_string)
            .collect();
        assert!(errors.is_empty(), "{errors:#?}");
    }

    #[test]
    fn string_literals_escape_quotes_and_backslashes() {
        assert_eq!(lit(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
