//! The service graph as inline SVG: callers on the left (grouped by trust domain), services
//! on the right (grouped by cluster), one curve per caller → service edge labelled with its
//! counts. An edge with refusals is red; one with only refusals is red and dashed; an
//! allowed-only edge is green. Drawn from [`ServiceGraph`] as `meshgate audit graph` builds
//! it; names are escaped and cut to fit, the full name is in each node's `<title>`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use meshgate_policy::{Edge, ServiceGraph};

use super::html::{esc, esc_short};

/// Nodes drawn per side at most; the edges of the others are only in the table.
pub const MAX_NODES_PER_SIDE: usize = 120;

const WIDTH: u32 = 1100;
const NODE_W: u32 = 360;
const NODE_H: u32 = 26;
const GAP: u32 = 14;
const GROUP_GAP: u32 = 30;
const TOP: u32 = 30;
const LEFT_X: u32 = 10;
const RIGHT_X: u32 = WIDTH - NODE_W - 10;
const NAME_CHARS: usize = 50;

/// The class of an edge: `allowed`, `refused` (some) or `denied` (all refused).
pub fn edge_class(e: &Edge) -> &'static str {
    match (e.counts.allow, e.counts.refused()) {
        (_, 0) => "allowed",
        (0, _) => "denied",
        _ => "refused",
    }
}

/// The graph as an `<svg>` element, and how many nodes were left out.
pub fn render(graph: &ServiceGraph) -> (String, usize) {
    // Busiest nodes first when there are too many to draw.
    let mut weight: BTreeMap<&str, u64> = BTreeMap::new();
    for e in &graph.edges {
        let n = e.counts.allow + e.counts.refused();
        *weight.entry(&e.from).or_default() += n;
        *weight.entry(&e.to).or_default() += n;
    }
    let side = |service: bool| {
        let mut nodes: Vec<_> = graph
            .nodes
            .iter()
            .filter(|n| (n.kind == "service") == service)
            .collect();
        nodes.sort_by_key(|n| std::cmp::Reverse(weight.get(n.id.as_str()).copied()));
        let hidden = nodes.len().saturating_sub(MAX_NODES_PER_SIDE);
        nodes.truncate(MAX_NODES_PER_SIDE);
        nodes.sort_by(|a, b| (&a.domain, &a.id).cmp(&(&b.domain, &b.id)));
        (nodes, hidden)
    };
    let (callers, hidden_callers) = side(false);
    let (services, hidden_services) = side(true);

    let mut body = String::new();
    let (left, left_end) = place(&mut body, &callers, LEFT_X, "trust domain");
    let (right, right_end) = place(&mut body, &services, RIGHT_X, "cluster");
    let height = left_end.max(right_end).max(TOP + NODE_H) + 20;

    let mut edges = String::new();
    let mut labels = String::new();
    for e in &graph.edges {
        let (Some(&y1), Some(&y2)) = (left.get(e.from.as_str()), right.get(e.to.as_str())) else {
            continue;
        };
        let class = edge_class(e);
        let (x1, x2) = (LEFT_X + NODE_W, RIGHT_X);
        let mid = (x1 + x2) / 2;
        let _ = write!(
            edges,
            "<path class=\"edge {class}\" data-from=\"{from}\" data-to=\"{to}\" d=\"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}\" marker-end=\"url(#arrow-{class})\"><title>{from} → {to}: {summary}</title></path>",
            from = esc(&e.from),
            to = esc(&e.to),
            summary = esc(&e.counts.summary()),
        );
        // At the curve's middle: edges into one service, or out of one caller, spread apart.
        let _ = write!(
            labels,
            "<text class=\"label {class}\" x=\"{mid}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            (y1 + y2) / 2 - 4,
            esc(&e.counts.summary())
        );
    }
    let svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" aria-label=\"service graph\" width=\"{WIDTH}\" height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\">\
         <style>\
         .node rect{{fill:#f6f8fa;stroke:#8c959f}}.node.service rect{{fill:#ddf4ff;stroke:#54aeff}}\
         .node text{{font:12px ui-monospace,Menlo,monospace;fill:#1f2328}}\
         .group{{font:600 11px system-ui,sans-serif;fill:#59636e;text-transform:uppercase}}\
         .edge{{fill:none;stroke-width:2}}.edge.allowed{{stroke:#1a7f37}}.edge.refused{{stroke:#cf222e}}\
         .edge.denied{{stroke:#cf222e;stroke-dasharray:7 5;stroke-width:2.5}}\
         .label{{font:600 11px system-ui,sans-serif;paint-order:stroke;stroke:#fff;stroke-width:4px}}\
         .label.allowed{{fill:#1a7f37}}.label.refused,.label.denied{{fill:#cf222e}}\
         </style><defs>{markers}</defs>{edges}{body}{labels}</svg>",
        markers = ["allowed", "refused", "denied"]
            .iter()
            .map(|c| {
                let color = if *c == "allowed" { "#1a7f37" } else { "#cf222e" };
                format!(
                    "<marker id=\"arrow-{c}\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"{color}\"/></marker>"
                )
            })
            .collect::<String>(),
    );
    (svg, hidden_callers + hidden_services)
}

/// Draws one column of nodes grouped by domain into `body`; returns each node's middle `y`
/// and where the column ends.
fn place<'a>(
    body: &mut String,
    nodes: &[&'a meshgate_policy::Node],
    x: u32,
    label: &str,
) -> (BTreeMap<&'a str, u32>, u32) {
    let mut at = BTreeMap::new();
    let mut y = TOP;
    let mut group: Option<&str> = None;
    for n in nodes {
        if group != Some(n.domain.as_str()) {
            if group.is_some() {
                y += GROUP_GAP - GAP;
            }
            group = Some(&n.domain);
            let _ = write!(
                body,
                "<text class=\"group\" x=\"{x}\" y=\"{}\">{} {}</text>",
                y + 2,
                label,
                esc(&n.domain)
            );
            y += 8;
        }
        let _ = write!(
            body,
            "<g class=\"node {kind}\"><title>{full}</title><rect x=\"{x}\" y=\"{y}\" width=\"{NODE_W}\" height=\"{NODE_H}\" rx=\"{r}\"/>\
             <text x=\"{tx}\" y=\"{ty}\">{name}</text></g>",
            kind = esc(n.kind),
            full = esc(&n.id),
            r = if n.kind == "service" { 13 } else { 4 },
            tx = x + 10,
            ty = y + 17,
            name = esc_short(&n.id, NAME_CHARS),
        );
        at.insert(n.id.as_str(), y + NODE_H / 2);
        y += NODE_H + GAP;
    }
    (at, y)
}

#[cfg(test)]
mod tests {
    use meshgate_policy::{EdgeCounts, Node};

    use super::*;

    fn edge(from: &str, to: &str, allow: u64, deny: u64) -> Edge {
        Edge {
            from: from.into(),
            to: to.into(),
            counts: EdgeCounts {
                allow,
                deny,
                ..EdgeCounts::default()
            },
            first: String::new(),
            last: String::new(),
        }
    }

    #[test]
    fn denied_edges_are_drawn_apart_and_names_are_escaped() {
        let node = |id: &str, kind: &'static str, domain: &str| Node {
            id: id.into(),
            kind,
            domain: domain.into(),
        };
        let graph = ServiceGraph {
            nodes: vec![
                node("spiffe://e/ns/a/sa/<b>", "workload", "e"),
                node("spiffe://e/ns/a/sa/c", "workload", "e"),
                node("orders.shop.west", "service", "west"),
            ],
            edges: vec![
                edge("spiffe://e/ns/a/sa/<b>", "orders.shop.west", 0, 2),
                edge("spiffe://e/ns/a/sa/c", "orders.shop.west", 3, 0),
            ],
            decisions: 5,
        };
        let (svg, hidden) = render(&graph);
        assert_eq!(hidden, 0);
        assert!(!svg.contains("<b>"), "{svg}");
        assert!(svg.contains("class=\"edge denied\" data-from=\"spiffe://e/ns/a/sa/&lt;b&gt;\""));
        assert!(svg.contains("class=\"edge allowed\" data-from=\"spiffe://e/ns/a/sa/c\""));
        assert!(svg.contains(">allow 0, deny 2</text>"));
    }
}
