//! The console's pages as HTML, from the values in [`data`](super::data). Every dynamic
//! value is escaped with [`esc`]; links carry percent-encoded query values.

use std::fmt::Write as _;

use meshgate_policy::{DecisionKind, DecisionRecord};

use super::data::{
    DecisionDetail, DecisionPage, GraphView, HeadView, Integrity, Mesh, Policies, SetView,
};
use super::html::{Frame, badge, code_block, esc, esc_short, page};
use super::query::encode;
use super::svg;

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "<span class=\"muted\">–</span>".to_owned()
    } else {
        esc(s)
    }
}

fn decision_badge(d: DecisionKind) -> String {
    let text = match d {
        DecisionKind::QuotaExceeded => "429 quota",
        other => other.as_str(),
    };
    badge(d.as_str(), text)
}

fn search_link(name: &str, value: &str) -> String {
    format!(
        "<a href=\"/decisions?{name}={}\">{}</a>",
        esc(&encode(value)),
        esc_short(value, 70)
    )
}

/// The Decisions page: the search form, one page of records, the exports.
pub fn decisions(frame: &Frame<'_>, p: &DecisionPage) -> String {
    let s = &p.search;
    let v = |o: &Option<String>| esc(o.as_deref().unwrap_or_default());
    let mut body = String::new();
    let options: String = [
        "",
        "allow",
        "deny",
        "quota_exceeded",
        "error",
        "admin",
        "fault",
    ]
    .iter()
    .map(|d| {
        let selected = if s.decision.map(DecisionKind::as_str).unwrap_or_default() == *d {
            " selected"
        } else {
            ""
        };
        format!(
            "<option value=\"{d}\"{selected}>{}</option>",
            if d.is_empty() { "any" } else { d }
        )
    })
    .collect();
    let _ = write!(
        body,
        "<form class=\"search\" method=\"get\" action=\"/decisions\">\
         <label>caller (SPIFFE ID)<input class=\"wide\" name=\"caller\" value=\"{}\" placeholder=\"spiffe://…\"></label>\
         <label>service<input name=\"service\" value=\"{}\" placeholder=\"orders.shop.west\"></label>\
         <label>decision<select name=\"decision\">{options}</select></label>\
         <label>policy id<input name=\"policy\" value=\"{}\"></label>\
         <label>trace id<input name=\"trace\" value=\"{}\" placeholder=\"32 hex digits\"></label>\
         <label>since<input name=\"since\" value=\"{}\" placeholder=\"1h or RFC 3339\"></label>\
         <label>until<input name=\"until\" value=\"{}\" placeholder=\"RFC 3339\"></label>\
         <label>per page<input name=\"limit\" value=\"{}\" size=\"4\"></label>\
         <button type=\"submit\">Search</button></form>",
        v(&s.caller),
        v(&s.service),
        v(&s.policy),
        v(&s.trace),
        v(&s.since),
        v(&s.until),
        s.limit,
    );
    let q = s.to_query(None);
    let _ = write!(
        body,
        "<p>{} matching record{}{}, newest first. Export this search: \
         <a href=\"/export/decisions.jsonl?{q}\">JSON lines</a> · <a href=\"/export/decisions.csv?{q}\">CSV</a></p>",
        p.matched,
        if p.matched == 1 { "" } else { "s" },
        if s.before.is_some() {
            " (older than the previous page)"
        } else {
            ""
        },
        q = esc(&q),
    );
    body.push_str(
        "<table class=\"decisions\"><thead><tr><th>seq</th><th>time</th><th>decision</th><th>caller</th>\
         <th>action</th><th>service</th><th>path</th><th>status</th><th>policies</th><th>shadow</th></tr></thead><tbody>",
    );
    for r in &p.records {
        let refused = !matches!(r.decision, DecisionKind::Allow | DecisionKind::Admin);
        let _ = write!(
            body,
            "<tr{}><td class=\"num\"><a href=\"/decisions/{id}\">{seq}</a></td><td>{time}</td><td>{decision}</td>\
             <td>{caller}</td><td>{action}</td><td>{service}</td><td>{path}</td><td>{status}</td><td>{reasons}</td><td>{shadow}</td></tr>",
            if refused { " class=\"refused\"" } else { "" },
            id = esc(&encode(&r.id)),
            seq = r.seq,
            time = esc(&r.time),
            decision = decision_badge(r.decision),
            caller = if r.principal.is_empty() {
                or_dash("")
            } else {
                search_link("caller", &r.principal)
            },
            action = esc_short(&r.action, 60),
            service = if r.resource.is_empty() {
                or_dash("")
            } else {
                search_link("service", &r.resource)
            },
            path = if r.path.is_empty() {
                or_dash("")
            } else {
                format!("<code>{}</code>", esc_short(&r.path, 80))
            },
            status = r.status.map_or_else(|| or_dash(""), |s| s.to_string()),
            reasons = r
                .reasons
                .iter()
                .map(|p| search_link("policy", p))
                .collect::<Vec<_>>()
                .join(", "),
            shadow = match &r.shadow {
                Some(sh) if sh.differs => badge(
                    "quota_exceeded",
                    if sh.allowed {
                        "would allow"
                    } else {
                        "would deny"
                    }
                ),
                Some(_) => "<span class=\"muted\">same</span>".to_owned(),
                None => or_dash(""),
            },
        );
    }
    body.push_str("</tbody></table>");
    if p.records.is_empty() {
        body.push_str("<p class=\"muted\">No record matches this search.</p>");
    }
    body.push_str("<div class=\"pager\">");
    if s.before.is_some() {
        let _ = write!(
            body,
            "<a href=\"/decisions?{}\">« newest</a>",
            esc(&s.to_query(None))
        );
    }
    if let Some(b) = p.next_before {
        let _ = write!(
            body,
            "<a href=\"/decisions?{}\">older »</a>",
            esc(&s.to_query(Some(b)))
        );
    }
    body.push_str("</div>");
    let api = format!("/api/decisions?{}", s.to_query(s.before));
    page(frame, "/decisions", "Decisions", Some(&api), &body)
}

fn kv(rows: &[(&str, String)]) -> String {
    let mut out = String::from("<dl class=\"kv\">");
    for (k, v) in rows {
        let _ = write!(out, "<dt>{}</dt><dd>{v}</dd>", esc(k));
    }
    out.push_str("</dl>");
    out
}

/// One record: everything it holds, and the text of its determining policies.
pub fn decision(frame: &Frame<'_>, d: &DecisionDetail) -> String {
    let r: &DecisionRecord = &d.record;
    let code = |s: &str| {
        if s.is_empty() {
            or_dash("")
        } else {
            format!("<code>{}</code>", esc(s))
        }
    };
    let opt = |s: &Option<String>| code(s.as_deref().unwrap_or_default());
    let mut body = kv(&[
        ("decision", decision_badge(r.decision)),
        ("decision id", code(&r.id)),
        ("time", esc(&r.time)),
        ("caller", code(&r.principal)),
        ("action", esc(&r.action)),
        ("service", code(&r.resource)),
        ("method", or_dash(&r.method)),
        ("path (normalized)", code(&r.path)),
        ("path (as sent)", code(&r.raw_path)),
        (
            "HTTP status",
            r.status.map_or_else(|| or_dash(""), |s| s.to_string()),
        ),
        (
            "reasons",
            if r.reasons.is_empty() {
                "<span class=\"muted\">none (default deny, or not a policy decision)</span>"
                    .to_owned()
            } else {
                r.reasons
                    .iter()
                    .map(|p| code(p))
                    .collect::<Vec<_>>()
                    .join(" ")
            },
        ),
        (
            "errors",
            if r.errors.is_empty() {
                or_dash("")
            } else {
                r.errors
                    .iter()
                    .map(|e| esc(e))
                    .collect::<Vec<_>>()
                    .join("<br>")
            },
        ),
        ("policy version", code(&r.policy_version)),
        (
            "quota",
            match (&r.quota_key, r.quota_remaining) {
                (Some(k), Some(n)) => format!("<code>{}</code>, {n} left", esc(k)),
                (Some(k), None) => code(k),
                _ => or_dash(""),
            },
        ),
        (
            "traffic route",
            match &r.traffic {
                None => or_dash(""),
                Some(t) => {
                    let mut parts = Vec::new();
                    let mut put = |k: &str, v: &Option<String>| {
                        if let Some(v) = v {
                            parts.push(format!("{k} <code>{}</code>", esc(v)));
                        }
                    };
                    put("route", &t.route);
                    put("backend", &t.backend);
                    put("subset", &t.subset);
                    put("fault", &t.fault);
                    if t.mirror {
                        parts.push("a mirror copy (its answer was discarded)".to_owned());
                    }
                    parts.join(" · ")
                }
            },
        ),
        (
            "trace id",
            match &r.trace_id {
                None => or_dash(""),
                Some(id) => {
                    let mut cell = format!(
                        "<code>{}</code> · {}",
                        esc(id),
                        search_link("trace", id).replace(
                            &format!(">{}</a>", esc_short(id, 70)),
                            ">every decision of this trace here</a>"
                        )
                    );
                    if let Some(url) = &d.trace_url {
                        let _ = write!(cell, " · <a href=\"{}\">the trace</a>", esc(url));
                    }
                    cell
                }
            },
        ),
        ("source gateway", opt(&r.source_gateway)),
        ("sequence", r.seq.to_string()),
        ("hash", code(&r.hash)),
        ("previous hash", code(&r.prev_hash)),
    ]);
    body.push_str("<h2>Shadow result</h2>");
    body.push_str(&match &r.shadow {
        None => "<p class=\"muted\">No shadow set was loaded.</p>".to_owned(),
        Some(sh) => kv(&[
            (
                "shadow decision",
                badge(
                    if sh.allowed { "allow" } else { "deny" },
                    if sh.allowed { "allow" } else { "deny" },
                ),
            ),
            (
                "differs from enforced",
                if sh.differs {
                    badge("quota_exceeded", "yes: this decision would flip")
                } else {
                    "no".to_owned()
                },
            ),
            ("shadow reasons", esc(&sh.reasons.join(", "))),
            ("shadow errors", esc(&sh.errors.join("; "))),
            ("shadow version", code(&sh.policy_version)),
        ]),
    });
    body.push_str("<h2>Determining policies</h2>");
    if d.policies.is_empty() {
        body.push_str("<p class=\"muted\">No policy determined this record.</p>");
    }
    for p in &d.policies {
        let _ = write!(
            body,
            "<h3 class=\"policy\"><code>{}</code> <span class=\"muted\">({} set)</span></h3>",
            esc(&p.id),
            p.set
        );
        if !p.same_version {
            body.push_str("<p class=\"note\">The policy set changed since this decision: the text below is the one loaded now.</p>");
        }
        body.push_str(&match &p.text {
            Some(t) => code_block(t),
            None => {
                "<p class=\"note\">This policy is no longer in the set loaded now.</p>".to_owned()
            }
        });
    }
    if let Some(f) = &r.facts {
        body.push_str("<h2>Request facts</h2>");
        body.push_str(&code_block(
            &serde_json::to_string_pretty(f).unwrap_or_default(),
        ));
    }
    let api = format!("/api/decisions/{}", encode(&r.id));
    page(
        frame,
        "/decisions",
        &format!("Decision {}", r.seq),
        Some(&api),
        &body,
    )
}

/// The service graph with its window form, the SVG and the edge table.
pub fn graph(frame: &Frame<'_>, v: &GraphView) -> String {
    let q = &v.query;
    let mut body = String::new();
    let sel = |b: &str| if q.by == b { " selected" } else { "" };
    let _ = write!(
        body,
        "<form class=\"search\" method=\"get\" action=\"/graph\">\
         <label>since<input name=\"since\" value=\"{}\" placeholder=\"24h or RFC 3339\"></label>\
         <label>until<input name=\"until\" value=\"{}\" placeholder=\"RFC 3339\"></label>\
         <label>one node per<select name=\"by\"><option value=\"workload\"{}>workload</option><option value=\"namespace\"{}>namespace</option></select></label>\
         <button type=\"submit\">Show</button></form>",
        esc(&q.since),
        esc(q.until.as_deref().unwrap_or_default()),
        sel("workload"),
        sel("namespace"),
    );
    let g = &v.graph;
    let _ = write!(
        body,
        "<p>{} decision{} recorded by this gateway, {} edge{}. \
         <span class=\"legend\"><span><i style=\"border-color:#1a7f37\"></i>allowed</span>\
         <span><i style=\"border-color:#cf222e\"></i>some refused</span>\
         <span><i style=\"border-top-style:dashed;border-color:#cf222e\"></i>all refused</span></span></p>",
        g.decisions,
        if g.decisions == 1 { "" } else { "s" },
        g.edges.len(),
        if g.edges.len() == 1 { "" } else { "s" },
    );
    if g.edges.is_empty() {
        body.push_str("<p class=\"muted\">No traffic in this window.</p>");
    } else {
        let (svg, hidden) = svg::render(g);
        let _ = write!(body, "<div class=\"graph\">{svg}</div>");
        if hidden > 0 {
            let _ = write!(
                body,
                "<p class=\"note\">{hidden} less busy nodes are not drawn; their edges are in the table.</p>"
            );
        }
    }
    body.push_str(
        "<h2>Edges</h2><table class=\"edges\"><thead><tr><th>caller</th><th>service</th><th>allow</th><th>deny</th>\
         <th>429</th><th>error</th><th>first</th><th>last</th></tr></thead><tbody>",
    );
    for e in &g.edges {
        let c = &e.counts;
        let _ = write!(
            body,
            "<tr class=\"{}\"><td><code>{}</code></td><td><code>{}</code></td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            if c.refused() > 0 {
                "refused"
            } else {
                "allowed"
            },
            esc(&e.from),
            esc(&e.to),
            c.allow,
            c.deny,
            c.quota_exceeded,
            c.error,
            esc(&e.first),
            esc(&e.last),
        );
    }
    body.push_str("</tbody></table>");
    let mut api = format!("/api/graph?since={}&by={}", encode(&q.since), encode(&q.by));
    if let Some(u) = &q.until {
        let _ = write!(api, "&until={}", encode(u));
    }
    page(frame, "/graph", "Service graph", Some(&api), &body)
}

fn heads_table(heads: &[&HeadView], with_key: bool) -> String {
    let mut out = String::from(
        "<table><thead><tr><th>seq</th><th>time</th><th>head hash</th><th>signature</th>",
    );
    if with_key {
        out.push_str("<th>key</th>");
    }
    out.push_str("</tr></thead><tbody>");
    for h in heads {
        let c = &h.checkpoint;
        let _ = write!(
            out,
            "<tr><td class=\"num\">{}</td><td>{}</td><td><code>{}</code></td><td>{}</td>",
            c.seq,
            esc(&c.time),
            esc(&c.head_hash),
            if h.signature_valid {
                badge("verified", "valid")
            } else {
                badge("tampered", "invalid")
            },
        );
        if with_key {
            let _ = write!(
                out,
                "<td><code>{}</code></td>",
                esc_short(&c.public_key, 24)
            );
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

/// The integrity page.
pub fn integrity(frame: &Frame<'_>, i: &Integrity) -> String {
    let v = &i.verify;
    let mut body = String::new();
    if let Some(first) = v.problems.first() {
        let _ = write!(
            body,
            "<div class=\"status bad\" id=\"chain-status\">TAMPERED: the decision log does not verify. First bad record: seq {}.</div>\
             <p class=\"problem\">{}</p>",
            first.seq,
            esc(&first.what)
        );
        if v.problems.len() > 1 {
            body.push_str("<ul>");
            for p in v.problems.iter().skip(1).take(50) {
                let _ = write!(body, "<li>seq {}: {}</li>", p.seq, esc(&p.what));
            }
            body.push_str("</ul>");
        }
    } else if i.status == "disagreed" {
        let peers: Vec<String> = i
            .witnesses
            .iter()
            .filter(|w| w.verdict == "disagree")
            .map(|w| format!("<code>{}</code>", esc(&w.cluster)))
            .collect();
        let _ = write!(
            body,
            "<div class=\"status bad\" id=\"chain-status\">WITNESSES DISAGREE: the hash chain holds ({} records), but {} witnessed heads of this log that it contradicts: it was truncated or rolled back. See the witnesses below.</div>",
            v.records,
            peers.join(", ")
        );
    } else {
        let _ = write!(
            body,
            "<div class=\"status ok\" id=\"chain-status\">VERIFIED: the hash chain and every checked signature hold ({} records, {} checkpoints).</div>",
            v.records, v.checkpoints
        );
    }
    body.push_str(&kv(&[
        (
            "records",
            format!("{} (seq {} to {})", v.records, v.first_seq, v.head_seq),
        ),
        ("head hash", format!("<code>{}</code>", esc(&v.head_hash))),
        (
            "last signed record",
            v.signed_seq.map_or_else(
                || "<span class=\"note\">none yet</span>".to_owned(),
                |s| s.to_string(),
            ),
        ),
        (
            "checkpoint key",
            format!(
                "<code>{}</code>",
                esc(i.pinned_key.as_deref().unwrap_or("none"))
            ),
        ),
    ]));
    for n in &v.notes {
        let _ = write!(body, "<p class=\"muted\">note: {}</p>", esc(n));
    }
    body.push_str("<h2>Latest signed checkpoints</h2>");
    let heads: Vec<&HeadView> = i.checkpoints.iter().collect();
    body.push_str(&heads_table(&heads, true));
    body.push_str("<h2>Peers witnessing our heads</h2>");
    if i.witnesses.is_empty() {
        body.push_str("<p class=\"muted\">No federation link: nobody else holds our heads.</p>");
    } else {
        body.push_str("<table><thead><tr><th>cluster</th><th>trust domain</th><th>their copy of our heads</th><th>detail</th></tr></thead><tbody>");
        for w in &i.witnesses {
            let text = match w.verdict {
                "agree" => "agrees with our log",
                "disagree" => "DISAGREES with our log",
                _ => "not checked yet",
            };
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&w.cluster),
                esc(&w.trust_domain),
                badge(w.verdict, text),
                w.problem.as_deref().map(esc).unwrap_or_default()
            );
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("<h2>Heads of peers' logs witnessed here</h2>");
    if i.witnessed_here.is_empty() {
        body.push_str("<p class=\"muted\">None.</p>");
    } else {
        body.push_str("<table><thead><tr><th>cluster</th><th>trust domain</th><th>latest seq</th><th>time</th><th>head hash</th><th>signature</th></tr></thead><tbody>");
        for h in &i.witnessed_here {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td>",
                esc(&h.cluster),
                esc(&h.trust_domain)
            );
            match (&h.latest, &h.error) {
                (Some(l), _) => {
                    let _ = write!(
                        body,
                        "<td class=\"num\">{}</td><td>{}</td><td><code>{}</code></td><td>{}</td>",
                        l.checkpoint.seq,
                        esc(&l.checkpoint.time),
                        esc(&l.checkpoint.head_hash),
                        if l.signature_valid {
                            badge("verified", "valid")
                        } else {
                            badge("tampered", "invalid")
                        }
                    );
                }
                (None, Some(e)) => {
                    let _ = write!(body, "<td colspan=\"4\" class=\"problem\">{}</td>", esc(e));
                }
                (None, None) => {
                    body.push_str("<td colspan=\"4\" class=\"muted\">none held yet</td>")
                }
            }
            body.push_str("</tr>");
        }
        body.push_str("</tbody></table>");
    }
    page(
        frame,
        "/integrity",
        "Integrity",
        Some("/api/integrity"),
        &body,
    )
}

fn set_section(body: &mut String, title: &str, set: &SetView) {
    let _ = write!(
        body,
        "<h2>{}</h2><p>version <code>{}</code> · from <code>{}</code> · {} polic{}</p>",
        esc(title),
        esc(&set.version),
        esc(&set.source),
        set.policies.len(),
        if set.policies.len() == 1 { "y" } else { "ies" },
    );
    for p in &set.policies {
        let _ = write!(
            body,
            "<details open><summary><code>{}</code></summary>{}</details>",
            esc(&p.id),
            code_block(&p.text)
        );
    }
}

/// The policies page.
pub fn policies(frame: &Frame<'_>, p: &Policies) -> String {
    let mut body = String::new();
    body.push_str("<h2>Last reload</h2>");
    match &p.last_reload {
        None => body.push_str("<p class=\"muted\">No reload since the gateway started (the sets below were loaded at start).</p>"),
        Some(r) => {
            let _ = write!(
                body,
                "<p>{} at {}: version <code>{}</code> serves.</p>",
                if r.applied { badge("verified", "applied") } else { badge("tampered", "refused") },
                esc(&r.time),
                esc(&r.version)
            );
            if let Some(d) = &r.diagnostics {
                body.push_str(&code_block(d));
            }
        }
    }
    let _ = write!(
        body,
        "<p class=\"muted\">Refused reloads since start: {}.</p>",
        p.reload_failures
    );
    set_section(&mut body, "Enforced set", &p.enforced);
    match &p.shadow {
        Some(s) => set_section(&mut body, "Shadow set (dry run, never enforced)", s),
        None => body.push_str(
            "<h2>Shadow set</h2><p class=\"muted\">None loaded (`policy.shadow_dir`).</p>",
        ),
    }
    let f = &p.flips;
    let _ = write!(
        body,
        "<h2>Flips the shadow set would have caused</h2><p>{} allowed request{} it would have denied, {} denied request{} it would have allowed.</p>",
        f.allow_to_deny,
        if f.allow_to_deny == 1 { "" } else { "s" },
        f.deny_to_allow,
        if f.deny_to_allow == 1 { "" } else { "s" },
    );
    if !f.recent.is_empty() {
        body.push_str("<table><thead><tr><th>seq</th><th>time</th><th>caller</th><th>action</th><th>service</th><th>path</th><th>enforced</th><th>shadow</th></tr></thead><tbody>");
        for x in &f.recent {
            let side = |allowed: bool, reasons: &[String]| {
                format!(
                    "{} {}",
                    badge(
                        if allowed { "allow" } else { "deny" },
                        if allowed { "allow" } else { "deny" }
                    ),
                    esc(&reasons.join(", "))
                )
            };
            let _ = write!(
                body,
                "<tr><td class=\"num\"><a href=\"/decisions/{}\">{}</a></td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
                esc(&encode(&x.id)),
                x.seq,
                esc(&x.time),
                esc_short(&x.principal, 70),
                esc(&x.action),
                esc(&x.resource),
                esc_short(&x.path, 60),
                side(x.enforced_allowed, &x.enforced_reasons),
                side(x.shadow_allowed, &x.shadow_reasons),
            );
        }
        body.push_str("</tbody></table>");
    }
    match &p.console {
        Some(c) => set_section(&mut body, "Console access policy", c),
        None => body.push_str("<h2>Console access policy</h2><p class=\"note\">This console runs in the unauthenticated loopback mode: whoever can connect to this machine's loopback may view it.</p>"),
    }
    page(frame, "/policies", "Policies", Some("/api/policies"), &body)
}

/// The mesh page.
pub fn mesh(frame: &Frame<'_>, m: &Mesh) -> String {
    let mut body = String::new();
    body.push_str("<h2>Services of this cluster</h2>");
    if m.services.is_empty() {
        body.push_str("<p class=\"muted\">None configured.</p>");
    } else {
        body.push_str("<table><thead><tr><th>service</th><th>protocol</th><th>endpoints</th><th>exported to</th></tr></thead><tbody>");
        for s in &m.services {
            let _ = write!(
                body,
                "<tr><td><code>{}</code></td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                esc(&s.name),
                s.protocol,
                s.endpoints,
                if s.export_to.is_empty() {
                    or_dash("")
                } else {
                    esc(&s.export_to.join(", "))
                }
            );
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("<h2>Federation links</h2>");
    if m.links.is_empty() {
        body.push_str("<p class=\"muted\">No link.</p>");
    } else {
        body.push_str("<table><thead><tr><th>cluster</th><th>trust domain</th><th>state</th><th>last sync</th><th>lag</th>\
            <th>gateways</th><th>imported from it</th><th>exported to it</th><th>bundle seq</th><th>last error</th></tr></thead><tbody>");
        for l in &m.links {
            let list = |v: &[String]| {
                if v.is_empty() {
                    or_dash("")
                } else {
                    esc(&v.join(", "))
                }
            };
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                esc(&l.cluster),
                esc(&l.trust_domain),
                badge(&l.state, &l.state),
                l.last_sync.as_deref().map_or_else(|| or_dash(""), esc),
                l.lag_seconds
                    .map_or_else(|| or_dash(""), |s| format!("{s} s")),
                list(&l.gateways),
                list(&l.imported),
                list(&l.exported),
                l.bundle_sequence,
                l.last_error.as_deref().map_or_else(
                    || or_dash(""),
                    |e| format!("<span class=\"problem\">{}</span>", esc(e))
                ),
            );
        }
        body.push_str("</tbody></table>");
    }
    page(frame, "/mesh", "Mesh", Some("/api/mesh"), &body)
}
