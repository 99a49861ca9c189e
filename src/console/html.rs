//! HTML building blocks: escaping, the page frame with its inline style sheet, and small
//! helpers. Every value that comes from a record, a peer, a policy or the request goes
//! through [`esc`] (records hold attacker-chosen paths, header values and SPIFFE IDs);
//! the pages hold no script at all, and the response's CSP forbids any.

use std::fmt::Write as _;

/// Escapes text for HTML element content and quoted attribute values (and SVG).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters would be invisible or break the layout: show them.
            c if c.is_control() && c != '\n' && c != '\t' => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// `text` cut to `max` characters (with an ellipsis), escaped.
pub fn esc_short(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return esc(s);
    }
    let cut: String = s.chars().take(max.saturating_sub(1)).collect();
    format!("{}…", esc(&cut))
}

/// The pages, in the navigation's order: (path, title).
pub const PAGES: &[(&str, &str)] = &[
    ("/decisions", "Decisions"),
    ("/graph", "Service graph"),
    ("/integrity", "Integrity"),
    ("/policies", "Policies"),
    ("/mesh", "Mesh"),
];

/// What the frame says about the gateway and the viewer.
#[derive(Debug)]
pub struct Frame<'a> {
    pub cluster: &'a str,
    pub trust_domain: &'a str,
    /// Who is viewing (a SPIFFE ID, or the loopback note).
    pub viewer: &'a str,
}

/// A whole page: the frame around `body` (already escaped HTML).
pub fn page(
    frame: &Frame<'_>,
    current: &str,
    title: &str,
    api: Option<&str>,
    body: &str,
) -> String {
    let mut nav = String::new();
    for (path, name) in PAGES {
        let here = if *path == current {
            " aria-current=\"page\""
        } else {
            ""
        };
        let _ = write!(nav, "<a href=\"{path}\"{here}>{name}</a>");
    }
    let api = api
        .map(|a| format!(" · data as JSON: <a href=\"{}\">{}</a>", esc(a), esc(a)))
        .unwrap_or_default();
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · meshgate {cluster}</title><style>{CSS}</style></head>\
         <body><header><div class=\"brand\">meshgate <span>console</span></div>\
         <div class=\"where\">cluster <b>{cluster}</b> · trust domain <b>{td}</b></div>\
         <div class=\"who\">viewing as <code>{viewer}</code></div>\
         <nav>{nav}</nav></header>\n<main><h1>{title}</h1>\n{body}\n</main>\
         <footer>Read-only. Every page view is recorded in this gateway's decision log{api}.</footer>\
         </body></html>\n",
        title = esc(title),
        cluster = esc(frame.cluster),
        td = esc(frame.trust_domain),
        viewer = esc(frame.viewer),
    )
}

/// A page that only says why the request was not served.
pub fn message(status: u16, title: &str, text: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{status} {title}</title>\
         <style>{CSS}</style></head><body><main><h1>{status} {title}</h1><p class=\"problem\">{text}</p></main></body></html>\n",
        title = esc(title),
        text = esc(text),
    )
}

/// A `<span class="badge KIND">TEXT</span>`, for decisions and states.
pub fn badge(kind: &str, text: &str) -> String {
    format!("<span class=\"badge {}\">{}</span>", esc(kind), esc(text))
}

/// A `<pre>` of source text.
pub fn code_block(text: &str) -> String {
    format!("<pre class=\"code\">{}</pre>", esc(text))
}

/// The inline style sheet (no external assets).
const CSS: &str = "\
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg:#f6f8fa;--ok:#1a7f37;--bad:#cf222e;--warn:#9a6700;--accent:#0969da}\
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;color:var(--fg);background:#fff}\
header{display:flex;flex-wrap:wrap;gap:6px 24px;align-items:center;padding:10px 24px;background:#24292f;color:#fff}\
header .brand{font-weight:700;font-size:16px}header .brand span{font-weight:400;opacity:.75}\
header .where,header .who{font-size:13px;opacity:.9}header code{color:#fff;background:rgba(255,255,255,.12)}\
nav{flex-basis:100%;display:flex;gap:4px}nav a{color:#fff;text-decoration:none;padding:6px 12px;border-radius:6px}\
nav a[aria-current]{background:rgba(255,255,255,.18);font-weight:600}nav a:hover{background:rgba(255,255,255,.1)}\
main{padding:8px 24px 24px;max-width:1400px}h1{font-size:22px;margin:12px 0}h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid var(--line);padding-bottom:4px}\
footer{padding:12px 24px;color:var(--muted);font-size:12px;border-top:1px solid var(--line)}\
a{color:var(--accent)}code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;background:var(--bg);padding:1px 4px;border-radius:4px;word-break:break-all}\
table{border-collapse:collapse;width:100%;margin:6px 0}th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top}\
th{background:var(--bg);font-weight:600;font-size:12px;color:var(--muted)}tr.refused td{background:#fff5f5}\
td.num{text-align:right;font-variant-numeric:tabular-nums}\
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;border:1px solid}\
.badge.allow,.badge.verified,.badge.agree,.badge.synced,.badge.yes{color:var(--ok);border-color:var(--ok);background:#dafbe1}\
.badge.deny,.badge.error,.badge.tampered,.badge.disagree,.badge.expired,.badge.no{color:var(--bad);border-color:var(--bad);background:#ffebe9}\
.badge.quota_exceeded,.badge.stale,.badge.unhealthy,.badge.not_checked,.badge.never_synced{color:var(--warn);border-color:var(--warn);background:#fff8c5}\
.badge.admin{color:var(--muted);border-color:var(--line);background:var(--bg)}\
form.search{display:flex;flex-wrap:wrap;gap:8px;align-items:end;padding:10px;background:var(--bg);border:1px solid var(--line);border-radius:8px}\
form.search label{display:flex;flex-direction:column;font-size:12px;color:var(--muted)}\
form.search input,form.search select{font:13px system-ui,sans-serif;padding:4px 6px;border:1px solid var(--line);border-radius:6px;min-width:120px}\
form.search input.wide{min-width:330px}button{font:13px system-ui,sans-serif;padding:5px 14px;border-radius:6px;border:1px solid #1f883d;background:#1f883d;color:#fff;cursor:pointer}\
.status{font-size:18px;font-weight:700;padding:12px 16px;border-radius:8px;margin:8px 0}\
.status.ok{background:#dafbe1;color:var(--ok);border:1px solid var(--ok)}.status.bad{background:#ffebe9;color:var(--bad);border:1px solid var(--bad)}\
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:8px 0}dl.kv dt{color:var(--muted)}dl.kv dd{margin:0}\
pre.code{background:var(--bg);border:1px solid var(--line);border-radius:6px;padding:10px;overflow:auto;font:12px/1.5 ui-monospace,Menlo,monospace}\
.muted{color:var(--muted)}.problem{color:var(--bad);font-weight:600}.note{color:var(--warn)}\
.pager{margin:10px 0;display:flex;gap:16px}.graph{border:1px solid var(--line);border-radius:8px;overflow:auto;background:#fff}\
.legend span{margin-right:18px}.legend i{display:inline-block;width:28px;height:0;vertical-align:middle;margin-right:6px;border-top:3px solid}\
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_markup_is_escaped() {
        assert_eq!(
            esc("<script>alert(\"x\")</script>&'"),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
        assert_eq!(esc("a\u{0}b\u{1b}"), "a\\u{0}b\\u{1b}");
        assert_eq!(esc_short("<<<<", 3), "&lt;&lt;…");
        let html = page(
            &Frame {
                cluster: "<c>",
                trust_domain: "t",
                viewer: "\"v\"",
            },
            "/graph",
            "<T>",
            Some("/api/graph?a=<b>"),
            "",
        );
        assert!(!html.contains("<c>") && !html.contains("<T>") && !html.contains("\"v\""));
        assert!(html.contains("<a href=\"/graph\" aria-current=\"page\">"));
    }
}
