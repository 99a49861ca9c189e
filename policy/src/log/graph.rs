//! Who called whom: the service graph of one or more decision logs in a time window.
//!
//! Each edge goes from a caller (a workload's SPIFFE ID, or its namespace) to a service
//! (`<service>.<namespace>.<cluster>`) and counts the decisions on it by kind, so a denied or
//! rate-limited edge is as visible as an allowed one. Every request is recorded by exactly one
//! gateway (the destination's, or the source's when the source refused it), so the graphs of
//! several clusters' logs add up without counting a request twice. Administrative events are
//! not traffic and are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;

use super::{DecisionKind, DecisionLog, DecisionRecord, Filter, LogError};

/// The caller of a record with no authenticated principal.
const UNAUTHENTICATED: &str = "(unauthenticated)";

/// How callers are grouped into nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CallerGrouping {
    /// One node per workload (SPIFFE ID).
    #[default]
    Workload,
    /// One node per namespace (`spiffe://<td>/ns/<ns>`); IDs of another shape stay whole.
    Namespace,
}

/// The decisions counted on one edge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EdgeCounts {
    pub allow: u64,
    pub deny: u64,
    pub quota_exceeded: u64,
    pub error: u64,
    /// Requests a traffic route injected a fault into (not a refusal by policy).
    pub fault: u64,
}

impl EdgeCounts {
    fn add(&mut self, kind: DecisionKind) {
        match kind {
            DecisionKind::Allow => self.allow += 1,
            DecisionKind::Deny => self.deny += 1,
            DecisionKind::QuotaExceeded => self.quota_exceeded += 1,
            DecisionKind::Error => self.error += 1,
            DecisionKind::Fault => self.fault += 1,
            DecisionKind::Admin => {}
        }
    }

    /// Whether any request on the edge was refused (denied, over quota or failed).
    pub fn refused(&self) -> u64 {
        self.deny + self.quota_exceeded + self.error
    }

    /// `allow N`, then each refusal kind that occurred: `allow 2, deny 1, 429 3`.
    pub fn summary(&self) -> String {
        let mut text = format!("allow {}", self.allow);
        for (name, n) in [
            ("deny", self.deny),
            ("429", self.quota_exceeded),
            ("error", self.error),
            ("fault", self.fault),
        ] {
            if n > 0 {
                let _ = write!(text, ", {name} {n}");
            }
        }
        text
    }
}

/// One caller → service edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Edge {
    pub from: String,
    pub to: String,
    #[serde(flatten)]
    pub counts: EdgeCounts,
    /// The first and last decision on the edge (RFC 3339).
    pub first: String,
    pub last: String,
}

/// A node: a caller (workload or namespace, with its trust domain) or a service (with its
/// cluster).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Node {
    pub id: String,
    /// `workload`, `namespace` or `service`.
    pub kind: &'static str,
    /// The caller's trust domain, or the service's cluster.
    pub domain: String,
}

/// The graph: nodes and edges, each sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServiceGraph {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    /// How many decision records were counted.
    pub decisions: u64,
}

/// Accumulates the records of one or more logs into a [`ServiceGraph`].
#[derive(Debug, Default)]
pub struct GraphBuilder {
    grouping: CallerGrouping,
    edges: BTreeMap<(String, String), Edge>,
    decisions: u64,
}

impl GraphBuilder {
    pub fn new(grouping: CallerGrouping) -> Self {
        Self {
            grouping,
            ..Self::default()
        }
    }

    /// Counts every record of `log` that `filter` matches (admin events excluded); returns
    /// how many it counted.
    pub fn add_log(&mut self, log: &DecisionLog, filter: &Filter) -> Result<u64, LogError> {
        let before = self.decisions;
        log.for_each(|r| {
            if filter.matches(&r) {
                self.add(&r);
            }
            true
        })?;
        Ok(self.decisions - before)
    }

    /// Counts one record (admin events are not traffic and are skipped).
    pub fn add(&mut self, r: &DecisionRecord) {
        if r.decision == DecisionKind::Admin {
            return;
        }
        let (from, _) = caller_node(&r.principal, self.grouping);
        let edge = self
            .edges
            .entry((from.clone(), r.resource.clone()))
            .or_insert_with(|| Edge {
                from,
                to: r.resource.clone(),
                counts: EdgeCounts::default(),
                first: r.time.clone(),
                last: r.time.clone(),
            });
        edge.counts.add(r.decision);
        // Compared as times: RFC 3339 text with trimmed fractions does not sort as text.
        let at = r.system_time();
        let parsed = |t: &str| crate::timefmt::parse_rfc3339(t);
        if at < parsed(&edge.first) {
            edge.first.clone_from(&r.time);
        }
        if at > parsed(&edge.last) {
            edge.last.clone_from(&r.time);
        }
        self.decisions += 1;
    }

    pub fn finish(self) -> ServiceGraph {
        let mut nodes = BTreeSet::new();
        for edge in self.edges.values() {
            let (_, kind) = caller_node(&edge.from, self.grouping);
            let domain = edge
                .from
                .strip_prefix("spiffe://")
                .and_then(|rest| rest.split('/').next())
                .unwrap_or_default()
                .to_owned();
            nodes.insert(Node {
                id: edge.from.clone(),
                kind,
                domain,
            });
            // `<service>.<namespace>.<cluster>`; a refusal of a name that never resolved
            // records what the caller sent, whose cluster is unknown.
            let labels: Vec<&str> = edge.to.split('.').collect();
            let cluster = match labels[..] {
                [_, _, cluster] => cluster,
                _ => "unknown",
            };
            nodes.insert(Node {
                id: edge.to.clone(),
                kind: "service",
                domain: cluster.to_owned(),
            });
        }
        ServiceGraph {
            nodes: nodes.into_iter().collect(),
            edges: self.edges.into_values().collect(),
            decisions: self.decisions,
        }
    }
}

/// The node a principal belongs to, and its kind (`workload` or `namespace`).
fn caller_node(principal: &str, grouping: CallerGrouping) -> (String, &'static str) {
    if principal.is_empty() {
        return (UNAUTHENTICATED.to_owned(), "workload");
    }
    if grouping == CallerGrouping::Namespace
        && let Some(rest) = principal.strip_prefix("spiffe://")
        && let [td, "ns", ns, ..] = rest.split('/').collect::<Vec<_>>()[..]
    {
        return (format!("spiffe://{td}/ns/{ns}"), "namespace");
    }
    (principal.to_owned(), "workload")
}

impl ServiceGraph {
    /// The graph in Graphviz DOT: callers grouped by trust domain and services by cluster;
    /// an edge with refusals is red and labelled with them, an allowed-only edge is green.
    pub fn to_dot(&self) -> String {
        let mut out = String::from(
            "digraph meshgate {\n  rankdir=LR;\n  node [shape=box, fontname=\"sans-serif\"];\n",
        );
        let mut groups: BTreeMap<(&str, &str), Vec<&Node>> = BTreeMap::new();
        for n in &self.nodes {
            let side = if n.kind == "service" {
                "cluster"
            } else {
                "trust domain"
            };
            groups.entry((side, &n.domain)).or_default().push(n);
        }
        for (i, ((side, domain), nodes)) in groups.iter().enumerate() {
            let _ = writeln!(
                out,
                "  subgraph cluster_{i} {{\n    label={};",
                quote(&format!("{side} {domain}"))
            );
            for n in nodes {
                let shape = if n.kind == "service" {
                    "ellipse"
                } else {
                    "box"
                };
                let _ = writeln!(out, "    {} [shape={shape}];", quote(&n.id));
            }
            out.push_str("  }\n");
        }
        for e in &self.edges {
            let c = &e.counts;
            let label = c.summary();
            let style = match (c.allow, c.refused()) {
                (_, 0) => "color=darkgreen",
                (0, _) => "color=red, style=dashed, penwidth=2",
                _ => "color=red",
            };
            let _ = writeln!(
                out,
                "  {} -> {} [label={}, {style}];",
                quote(&e.from),
                quote(&e.to),
                quote(&label)
            );
        }
        out.push_str("}\n");
        out
    }
}

/// A DOT double-quoted string.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                q.push('\\');
                q.push(c);
            }
            '\n' | '\r' => q.push(' '),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::log::{DecisionRecordInput, LogOptions};

    fn input(
        principal: &str,
        resource: &str,
        decision: DecisionKind,
        at: u64,
    ) -> DecisionRecordInput {
        DecisionRecordInput {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + at),
            id: None,
            trace_id: None,
            source_gateway: None,
            decision,
            principal: principal.to_owned(),
            action: "GET".to_owned(),
            resource: resource.to_owned(),
            method: "GET".to_owned(),
            raw_path: "/".to_owned(),
            path: "/".to_owned(),
            reasons: Vec::new(),
            errors: Vec::new(),
            shadow: None,
            policy_version: "v".to_owned(),
            quota_key: None,
            quota_remaining: None,
            status: None,
            facts: None,
            traffic: None,
        }
    }

    const WEB: &str = "spiffe://east.example/ns/shop/sa/web";
    const API: &str = "spiffe://east.example/ns/shop/sa/api";
    const OPS: &str = "spiffe://west.example/ns/ops/sa/root";

    /// A real log in a temp dir with a known mix of decisions.
    fn log(dir: &std::path::Path) -> DecisionLog {
        let log = DecisionLog::open(dir, None, LogOptions::default()).unwrap();
        let records = [
            input(WEB, "orders.shop.west", DecisionKind::Allow, 1),
            input(WEB, "orders.shop.west", DecisionKind::Allow, 2),
            input(WEB, "orders.shop.west", DecisionKind::QuotaExceeded, 3),
            input(API, "orders.shop.west", DecisionKind::Deny, 4),
            input(OPS, "admin.ops.west", DecisionKind::Deny, 5),
            input("", "orders.shop.west", DecisionKind::Deny, 6),
            input("uid:0 (root)", "policy reload", DecisionKind::Admin, 7),
        ];
        for r in records {
            log.append(r).unwrap();
        }
        log
    }

    #[test]
    fn edges_count_every_kind_and_leave_admin_events_out() {
        let tmp = tempfile::tempdir().unwrap();
        let log = log(tmp.path());
        let mut b = GraphBuilder::new(CallerGrouping::Workload);
        assert_eq!(b.add_log(&log, &Filter::default()).unwrap(), 6);
        let g = b.finish();
        assert_eq!(g.decisions, 6);
        let edge = |from: &str, to: &str| {
            g.edges
                .iter()
                .find(|e| e.from == from && e.to == to)
                .unwrap_or_else(|| panic!("no edge {from} -> {to} in {:?}", g.edges))
        };
        let web = edge(WEB, "orders.shop.west");
        assert_eq!((web.counts.allow, web.counts.quota_exceeded), (2, 1));
        assert!(web.first < web.last);
        assert_eq!(edge(API, "orders.shop.west").counts.deny, 1);
        assert_eq!(edge(OPS, "admin.ops.west").counts.deny, 1);
        assert_eq!(edge(UNAUTHENTICATED, "orders.shop.west").counts.deny, 1);
        assert_eq!(g.edges.len(), 4);
        assert!(g.nodes.iter().all(|n| n.id != "policy reload"));
        let orders = g.nodes.iter().find(|n| n.id == "orders.shop.west").unwrap();
        assert_eq!((orders.kind, orders.domain.as_str()), ("service", "west"));
    }

    #[test]
    fn namespaces_merge_workloads_and_windows_and_logs_add_up() {
        let tmp = tempfile::tempdir().unwrap();
        let log = log(tmp.path());
        let mut b = GraphBuilder::new(CallerGrouping::Namespace);
        b.add_log(&log, &Filter::default()).unwrap();
        // The same log twice stands for two clusters' logs: counts add.
        b.add_log(&log, &Filter::default()).unwrap();
        let g = b.finish();
        let shop = g
            .edges
            .iter()
            .find(|e| e.from == "spiffe://east.example/ns/shop")
            .unwrap();
        assert_eq!(
            shop.counts,
            EdgeCounts {
                allow: 4,
                deny: 2,
                quota_exceeded: 2,
                error: 0,
                fault: 0
            }
        );
        let node = g.nodes.iter().find(|n| n.id == shop.from).unwrap();
        assert_eq!(
            (node.kind, node.domain.as_str()),
            ("namespace", "east.example")
        );

        // A window that holds only the third and fourth records.
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s);
        let filter = Filter {
            since: Some(at(3)),
            until: Some(at(5)),
            ..Filter::default()
        };
        let mut b = GraphBuilder::new(CallerGrouping::Workload);
        assert_eq!(b.add_log(&log, &filter).unwrap(), 2);
    }

    #[test]
    fn dot_shows_refused_edges_in_red_and_quotes_names() {
        let tmp = tempfile::tempdir().unwrap();
        let log = log(tmp.path());
        let mut b = GraphBuilder::new(CallerGrouping::Workload);
        b.add_log(&log, &Filter::default()).unwrap();
        let mut g = b.finish();
        g.edges.push(Edge {
            from: "a\"b".to_owned(),
            to: "x.y.z".to_owned(),
            counts: EdgeCounts {
                allow: 1,
                ..EdgeCounts::default()
            },
            first: String::new(),
            last: String::new(),
        });
        let dot = g.to_dot();
        assert!(dot.starts_with("digraph meshgate {"), "{dot}");
        assert!(
            dot.contains(&format!(
                "\"{API}\" -> \"orders.shop.west\" [label=\"allow 0, deny 1\", color=red, style=dashed"
            )),
            "{dot}"
        );
        assert!(
            dot.contains(&format!(
                "\"{WEB}\" -> \"orders.shop.west\" [label=\"allow 2, 429 1\", color=red]"
            )),
            "{dot}"
        );
        assert!(dot.contains("\"a\\\"b\" -> \"x.y.z\" [label=\"allow 1\", color=darkgreen]"));
        assert!(dot.contains("label=\"cluster west\""), "{dot}");
        assert!(dot.contains("label=\"trust domain east.example\""), "{dot}");
    }
}
