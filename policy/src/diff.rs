//! What changed between two policy sets, policy by policy (`policy diff`): a review aid
//! next to a proof. Policies are matched by id; a policy counts as changed when its meaning
//! as Cedar parses it differs (annotations such as `@quota` included), so reformatting or
//! comments alone are not changes.

use cedar_policy::{Policy, PolicySet};
use serde::Serialize;

use crate::engine::PolicyEngine;

/// One policy and its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyText {
    /// The policy id (`@id`).
    pub id: String,
    /// Its Cedar text (for a template-linked policy: the template and the link's values).
    pub text: String,
}

/// A policy present in both sets with a different meaning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChangedPolicy {
    /// The policy id.
    pub id: String,
    /// The line diff of its text: each line starts with `-` (old only), `+` (new only) or a
    /// space (both).
    pub diff: Vec<String>,
}

/// Policies added, removed and changed from an old set to a new one, sorted by id.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct SetDiff {
    /// Only in the new set.
    pub added: Vec<PolicyText>,
    /// Only in the old set.
    pub removed: Vec<PolicyText>,
    /// In both, with a different meaning.
    pub changed: Vec<ChangedPolicy>,
}

impl SetDiff {
    /// Whether the sets hold the same policies.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Compares the enforced sets of two engines.
pub fn diff_sets(old: &PolicyEngine, new: &PolicyEngine) -> SetDiff {
    let (old, _) = old.set_and_schema();
    let (new, _) = new.set_and_schema();
    let index = |set: &PolicySet| {
        set.policies()
            .map(|p| (p.id().to_string(), (meaning(set, p), text(set, p))))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (old, new) = (index(&old), index(&new));
    let mut out = SetDiff::default();
    for (id, (meaning_new, text_new)) in &new {
        match old.get(id) {
            None => out.added.push(PolicyText {
                id: id.clone(),
                text: text_new.clone(),
            }),
            Some((meaning_old, text_old)) if meaning_old != meaning_new => {
                out.changed.push(ChangedPolicy {
                    id: id.clone(),
                    diff: line_diff(text_old, text_new),
                });
            }
            Some(_) => {}
        }
    }
    for (id, (_, text_old)) in &old {
        if !new.contains_key(id) {
            out.removed.push(PolicyText {
                id: id.clone(),
                text: text_old.clone(),
            });
        }
    }
    out
}

/// Every policy of `set` with its text, sorted by id.
pub(crate) fn texts(set: &PolicySet) -> Vec<PolicyText> {
    let mut out: Vec<PolicyText> = set
        .policies()
        .map(|p| PolicyText {
            id: p.id().to_string(),
            text: text(set, p),
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

impl PolicyEngine {
    /// The enforced set's policies with their text, sorted by id.
    pub fn enforced_policies(&self) -> Vec<PolicyText> {
        texts(&self.set_and_schema().0)
    }

    /// The shadow set's policies with their text, when one is loaded.
    pub fn shadow_policies(&self) -> Option<Vec<PolicyText>> {
        self.shadow_set().map(|set| texts(&set))
    }
}

/// The policy as Cedar understands it: its JSON form, and for a linked policy the
/// template's with the link values.
fn meaning(set: &PolicySet, p: &Policy) -> String {
    let own = p.to_json().map(|j| j.to_string()).unwrap_or_default();
    match p.template_id().and_then(|t| set.template(t)) {
        Some(t) => {
            let mut links: Vec<String> = p
                .template_links()
                .into_iter()
                .flatten()
                .map(|(slot, uid)| format!("{slot}={uid}"))
                .collect();
            links.sort();
            format!(
                "{own}|{}|{}",
                t.to_json().map(|j| j.to_string()).unwrap_or_default(),
                links.join(",")
            )
        }
        None => own,
    }
}

fn text(set: &PolicySet, p: &Policy) -> String {
    if let Some(t) = p.template_id().and_then(|t| set.template(t)) {
        let mut links: Vec<String> = p
            .template_links()
            .into_iter()
            .flatten()
            .map(|(slot, uid)| format!("{slot} = {uid}"))
            .collect();
        links.sort();
        return format!(
            "// linked from template `{}` with {}\n{}",
            t.id(),
            links.join(", "),
            t.to_string().trim_end()
        );
    }
    p.to_cedar()
        .unwrap_or_else(|| p.to_string())
        .trim_end()
        .to_owned()
}

/// A line diff by longest common subsequence (policies are short).
fn line_diff(old: &str, new: &str) -> Vec<String> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let (n, m) = (a.len(), b.len());
    // lcs[i][j]: the LCS length of a[i..] and b[j..].
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            out.push(format!("  {}", a[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(format!("- {}", a[i]));
            i += 1;
        } else {
            out.push(format!("+ {}", b[j]));
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::SourceFile;

    fn engine(text: &str) -> PolicyEngine {
        PolicyEngine::from_sources(
            &[SourceFile {
                name: "p.cedar".into(),
                text: text.into(),
            }],
            None,
        )
        .unwrap()
    }

    #[test]
    fn added_removed_and_changed_policies_are_told_apart_from_reformatting() {
        let old = engine(
            r#"@id("a") permit (principal, action == Action::"GET", resource);
@id("b") forbid (principal, action, resource) when { context.path == "/admin" };
@id("c") permit (principal, action == Action::"PUT", resource);"#,
        );
        let new = engine(
            r#"@id("a")
permit (principal, action == Action::"GET", resource);
@id("b") forbid (principal, action, resource)
when { context.path like "/admin*" };
@id("d") permit (principal, action == Action::"HEAD", resource);"#,
        );
        let d = diff_sets(&old, &new);
        assert_eq!(
            d.added.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["d"]
        );
        assert_eq!(
            d.removed.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        assert_eq!(d.changed.len(), 1, "{d:#?}");
        assert_eq!(d.changed[0].id, "b");
        assert!(
            d.changed[0]
                .diff
                .contains(&"+ when { context.path like \"/admin*\" };".to_owned()),
            "{d:#?}"
        );
        assert!(
            d.changed[0].diff.iter().any(|l| l.starts_with("- ")),
            "{d:#?}"
        );
        assert!(diff_sets(&old, &old).is_empty());
    }

    #[test]
    fn line_diffs_keep_common_lines() {
        assert_eq!(
            line_diff("a\nb\nc", "a\nx\nc"),
            ["  a", "- b", "+ x", "  c"]
        );
    }
}
