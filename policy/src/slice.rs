//! Policy sets sliced by resource, so a decision evaluates only the policies that can apply.
//!
//! Cedar evaluates every policy of a set on every request (≈0.8 µs each here), so a set of
//! 1000 `resource == Service::"…"` policies costs ~0.9 ms a decision. A policy whose scope
//! says `resource == X` cannot be satisfied, nor fail to evaluate, for another resource
//! (scope is checked before conditions), so the engine keeps:
//!
//! * `generic`: every policy whose resource scope is not `==` (any, `in`, `is`), and
//! * `by_resource`: for each resource named with `==`, just the policies naming it,
//!
//! and evaluates the generic set plus the one slice for the request's resource. The two
//! answers are combined with Cedar's own rule (any satisfied forbid denies; otherwise any
//! satisfied permit allows; otherwise deny), so decisions, determining policies and errors
//! are exactly those of the whole set. A test checks that equivalence on random requests.
//!
//! One deliberate difference from plain Cedar, which skips a policy whose condition fails
//! to evaluate: a `forbid` that errors counts as satisfied (fail closed), so an overflow or
//! a missing attribute in a forbid never lets a request through.

use std::collections::HashMap;

use cedar_policy::{
    Authorizer, Decision as CedarDecision, Entities, EntityUid, Policy, PolicySet, PolicySetError,
    Request, ResourceConstraint,
};

/// One set, sliced.
#[derive(Debug, Default)]
pub(crate) struct Sliced {
    generic: PolicySet,
    by_resource: HashMap<EntityUid, PolicySet>,
    forbids: std::collections::HashSet<cedar_policy::PolicyId>,
}

/// What the sliced evaluation concluded, as Cedar would for the whole set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub allowed: bool,
    /// Determining policies (satisfied forbids on a deny, satisfied permits on an allow), sorted.
    pub reasons: Vec<String>,
    /// Evaluation errors, sorted.
    pub errors: Vec<String>,
}

impl Sliced {
    /// Slices `set`. Template-linked policies are re-linked into their slice.
    pub(crate) fn new(set: &PolicySet) -> Result<Sliced, Box<PolicySetError>> {
        let mut sliced = Sliced::default();
        for policy in set.policies() {
            if policy.effect() == cedar_policy::Effect::Forbid {
                sliced.forbids.insert(policy.id().clone());
            }
            let target = match policy.resource_constraint() {
                ResourceConstraint::Eq(uid) => sliced.by_resource.entry(uid).or_default(),
                _ => &mut sliced.generic,
            };
            add(target, set, policy)?;
        }
        Ok(sliced)
    }

    /// Authorizes `request` against the generic policies and its resource's slice.
    pub(crate) fn authorize(
        &self,
        authorizer: &Authorizer,
        request: &Request,
        entities: &Entities,
    ) -> Answer {
        let mut forbids = Vec::new();
        let mut permits = Vec::new();
        let mut errors = Vec::new();
        let slice = request.resource().and_then(|r| self.by_resource.get(r));
        for set in std::iter::once(&self.generic).chain(slice) {
            if set.is_empty() {
                continue;
            }
            let response = authorizer.is_authorized(request, set, entities);
            let reasons = response.diagnostics().reason().map(ToString::to_string);
            match response.decision() {
                CedarDecision::Allow => permits.extend(reasons),
                CedarDecision::Deny => forbids.extend(reasons),
            }
            for error in response.diagnostics().errors() {
                let cedar_policy::AuthorizationError::PolicyEvaluationError(e) = error;
                if self.forbids.contains(e.policy_id()) {
                    forbids.push(e.policy_id().to_string());
                }
                errors.push(error.to_string());
            }
        }
        errors.sort();
        let (allowed, mut reasons) = if forbids.is_empty() && !permits.is_empty() {
            (true, permits)
        } else {
            (false, forbids)
        };
        reasons.sort();
        Answer {
            allowed,
            reasons,
            errors,
        }
    }
}

fn add(
    target: &mut PolicySet,
    whole: &PolicySet,
    policy: &Policy,
) -> Result<(), Box<PolicySetError>> {
    match (policy.template_id(), policy.template_links()) {
        (Some(template_id), Some(values)) => {
            if target.template(template_id).is_none()
                && let Some(template) = whole.template(template_id)
            {
                target.add_template(template.clone()).map_err(Box::new)?;
            }
            target
                .link(template_id.clone(), policy.id().clone(), values)
                .map_err(Box::new)
        }
        _ => target.add(policy.clone()).map_err(Box::new),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    const POLICIES: &str = r#"
        @id("a") permit (principal, action, resource == Service::"a.shop.west");
        @id("b") permit (principal == Workload::"w1", action, resource == Service::"b.shop.west");
        @id("b2") forbid (principal == Workload::"w2", action, resource == Service::"b.shop.west");
        @id("any") permit (principal == Workload::"w3", action, resource);
        @id("in") permit (principal == Workload::"w4", action, resource in Namespace::"west.example/shop");
        @id("no-w5") forbid (principal == Workload::"w5", action, resource);
        @id("err") permit (principal == Workload::"w6", action, resource == Service::"a.shop.west") when { resource.nope == 1 };
        @id("tpl") permit (principal == ?principal, action, resource == ?resource);
    "#;

    fn set() -> PolicySet {
        let mut set = PolicySet::new();
        let parsed = PolicySet::from_str(POLICIES).unwrap();
        for t in parsed.templates() {
            set.add_template(t.clone()).unwrap();
        }
        for p in parsed.policies() {
            let id = p.annotation("id").unwrap().to_owned();
            set.add(p.new_id(cedar_policy::PolicyId::new(id))).unwrap();
        }
        let tpl = set.templates().next().unwrap().id().clone();
        let vals = HashMap::from([
            (
                cedar_policy::SlotId::principal(),
                EntityUid::from_str(r#"Workload::"w7""#).unwrap(),
            ),
            (
                cedar_policy::SlotId::resource(),
                EntityUid::from_str(r#"Service::"c.shop.west""#).unwrap(),
            ),
        ]);
        set.link(tpl, cedar_policy::PolicyId::new("w7-c"), vals)
            .unwrap();
        set
    }

    #[test]
    fn sliced_answers_equal_the_whole_set() {
        let whole = set();
        let sliced = Sliced::new(&whole).unwrap();
        let authorizer = Authorizer::new();
        let ns = EntityUid::from_str(r#"Namespace::"west.example/shop""#).unwrap();
        let entities = Entities::from_entities(
            ["a", "b", "c", "d"].map(|s| {
                cedar_policy::Entity::new_no_attrs(
                    EntityUid::from_str(&format!(r#"Service::"{s}.shop.west""#)).unwrap(),
                    [ns.clone()].into_iter().collect(),
                )
            }),
            None,
        )
        .unwrap();
        let mut checked = 0;
        for w in 1..=8 {
            for r in ["a", "b", "c", "d"] {
                let request = Request::new(
                    EntityUid::from_str(&format!(r#"Workload::"w{w}""#)).unwrap(),
                    EntityUid::from_str(r#"Action::"GET""#).unwrap(),
                    EntityUid::from_str(&format!(r#"Service::"{r}.shop.west""#)).unwrap(),
                    cedar_policy::Context::empty(),
                    None,
                )
                .unwrap();
                let full = authorizer.is_authorized(&request, &whole, &entities);
                let mut reasons: Vec<String> = full
                    .diagnostics()
                    .reason()
                    .map(ToString::to_string)
                    .collect();
                reasons.sort();
                let mut errors: Vec<String> = full
                    .diagnostics()
                    .errors()
                    .map(ToString::to_string)
                    .collect();
                errors.sort();
                let expected = Answer {
                    allowed: full.decision() == CedarDecision::Allow,
                    reasons,
                    errors,
                };
                assert_eq!(
                    sliced.authorize(&authorizer, &request, &entities),
                    expected,
                    "w{w} → {r}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 32);
        // The slices really are smaller than the whole.
        assert_eq!(sliced.by_resource.len(), 3);
        assert!(sliced.generic.policies().count() < whole.policies().count());
    }

    #[test]
    fn a_forbid_that_fails_to_evaluate_denies() {
        let text = r#"
            @id("allow-all") permit (principal, action, resource);
            @id("broken-forbid") forbid (principal, action, resource) when { resource.nope == 1 };
        "#;
        let parsed = PolicySet::from_str(text).unwrap();
        let mut set = PolicySet::new();
        for p in parsed.policies() {
            let id = p.annotation("id").unwrap().to_owned();
            set.add(p.new_id(cedar_policy::PolicyId::new(id))).unwrap();
        }
        let sliced = Sliced::new(&set).unwrap();
        let request = Request::new(
            EntityUid::from_str(r#"Workload::"w1""#).unwrap(),
            EntityUid::from_str(r#"Action::"GET""#).unwrap(),
            EntityUid::from_str(r#"Service::"a.shop.west""#).unwrap(),
            cedar_policy::Context::empty(),
            None,
        )
        .unwrap();
        let authorizer = Authorizer::new();
        // Plain Cedar skips the broken forbid and allows; meshgate denies.
        let plain = authorizer.is_authorized(&request, &set, &Entities::empty());
        assert_eq!(plain.decision(), CedarDecision::Allow);
        let answer = sliced.authorize(&authorizer, &request, &Entities::empty());
        assert!(!answer.allowed);
        assert_eq!(answer.reasons, vec!["broken-forbid".to_owned()]);
        assert_eq!(answer.errors.len(), 1);
    }
}
