//! The console's URL parameters: decoding a query string (`application/x-www-form-urlencoded`,
//! what a GET form sends), the decision search and the graph window they describe, and
//! encoding them back into links.

use std::time::SystemTime;

use meshgate_policy::{DecisionKind, Filter};
use serde::Serialize;

/// The longest query string the console reads.
pub const MAX_QUERY_BYTES: usize = 4096;
/// Records on one page of a search, by default and at most.
pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 500;
/// The graph's window when none is given.
pub const DEFAULT_GRAPH_SINCE: &str = "24h";

/// Decoded `name=value` pairs, in order.
#[derive(Debug, Default, Clone)]
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Decodes a query string; malformed percent escapes and invalid UTF-8 are refused.
    pub fn parse(raw: Option<&str>) -> Result<Query, String> {
        let Some(raw) = raw.filter(|r| !r.is_empty()) else {
            return Ok(Query::default());
        };
        if raw.len() > MAX_QUERY_BYTES {
            return Err(format!(
                "the query string is longer than {MAX_QUERY_BYTES} bytes"
            ));
        }
        let mut out = Vec::new();
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            out.push((decode(k)?, decode(v)?));
        }
        Ok(Query(out))
    }

    /// The last non-empty value of `name` (an empty form field means "not set").
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, v)| k == name && !v.trim().is_empty())
            .map(|(_, v)| v.trim())
    }

    /// Refuses parameters the page does not know (a typo is an error, not ignored).
    pub fn only(&self, known: &[&str]) -> Result<(), String> {
        match self.0.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            Some((k, _)) => Err(format!(
                "unknown parameter `{}`; this page takes {}",
                k.chars().take(64).collect::<String>(),
                known
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            None => Ok(()),
        }
    }
}

fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or("a `%` in the query is not followed by two hex digits")?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "the query is not UTF-8".to_owned())
}

/// Percent-encodes `s` for a query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A decision search: what the Decisions page, its JSON and its exports filter on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Search {
    pub caller: Option<String>,
    pub service: Option<String>,
    pub decision: Option<DecisionKind>,
    pub policy: Option<String>,
    /// A W3C trace id: the records of one trace.
    pub trace: Option<String>,
    /// As given (RFC 3339 or a duration ago, like `1h`).
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: usize,
    /// Only records before this sequence number (the next page of older ones).
    pub before: Option<u64>,
    #[serde(skip)]
    since_at: Option<SystemTime>,
    #[serde(skip)]
    until_at: Option<SystemTime>,
}

pub const SEARCH_PARAMS: &[&str] = &[
    "caller", "service", "decision", "policy", "trace", "since", "until", "limit", "before",
];

impl Search {
    pub fn parse(q: &Query, now: SystemTime) -> Result<Search, String> {
        q.only(SEARCH_PARAMS)?;
        let owned = |k: &str| q.get(k).map(str::to_owned);
        let decision = q
            .get("decision")
            .map(|d| d.parse::<DecisionKind>())
            .transpose()
            .map_err(|e| format!("`decision`: {e}"))?;
        let limit = match q.get("limit") {
            None => DEFAULT_LIMIT,
            Some(l) => l
                .parse::<usize>()
                .ok()
                .filter(|l| (1..=MAX_LIMIT).contains(l))
                .ok_or_else(|| format!("`limit` must be a number from 1 to {MAX_LIMIT}"))?,
        };
        let before = q
            .get("before")
            .map(|b| b.parse::<u64>())
            .transpose()
            .map_err(|_| "`before` must be a record's sequence number".to_owned())?;
        Ok(Search {
            since_at: time_or_ago(q.get("since"), "since", now)?,
            until_at: time_or_ago(q.get("until"), "until", now)?,
            caller: owned("caller"),
            service: owned("service"),
            decision,
            policy: owned("policy"),
            trace: q
                .get("trace")
                .map(|t| {
                    if t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
                        Ok(t.to_ascii_lowercase())
                    } else {
                        Err("`trace` is a W3C trace id: 32 hex digits".to_owned())
                    }
                })
                .transpose()?,
            since: owned("since"),
            until: owned("until"),
            limit,
            before,
        })
    }

    /// The log filter (no limit: the console pages itself, newest first).
    pub fn filter(&self) -> Filter {
        Filter {
            principal: self.caller.clone(),
            resource: self.service.clone(),
            decision: self.decision,
            policy: self.policy.clone(),
            since: self.since_at,
            until: self.until_at,
            limit: None,
            trace_id: self.trace.clone(),
        }
    }

    /// The search as a query string, with another page cursor.
    pub fn to_query(&self, before: Option<u64>) -> String {
        let mut parts = Vec::new();
        let mut put = |k: &str, v: Option<&str>| {
            if let Some(v) = v {
                parts.push(format!("{k}={}", encode(v)));
            }
        };
        put("caller", self.caller.as_deref());
        put("service", self.service.as_deref());
        put("decision", self.decision.map(DecisionKind::as_str));
        put("policy", self.policy.as_deref());
        put("trace", self.trace.as_deref());
        put("since", self.since.as_deref());
        put("until", self.until.as_deref());
        if self.limit != DEFAULT_LIMIT {
            parts.push(format!("limit={}", self.limit));
        }
        if let Some(b) = before {
            parts.push(format!("before={b}"));
        }
        parts.join("&")
    }
}

/// The graph's window and grouping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GraphQuery {
    pub since: String,
    pub until: Option<String>,
    /// `workload` or `namespace`.
    pub by: String,
    #[serde(skip)]
    pub filter: Filter,
}

impl GraphQuery {
    pub fn parse(q: &Query, now: SystemTime) -> Result<GraphQuery, String> {
        q.only(&["since", "until", "by"])?;
        let since = q.get("since").unwrap_or(DEFAULT_GRAPH_SINCE).to_owned();
        let until = q.get("until").map(str::to_owned);
        let by = match q.get("by").unwrap_or("workload") {
            b @ ("workload" | "namespace") => b.to_owned(),
            other => {
                return Err(format!(
                    "`by` is `workload` or `namespace`, not `{}`",
                    other.chars().take(64).collect::<String>()
                ));
            }
        };
        let filter = Filter {
            since: time_or_ago(Some(&since), "since", now)?,
            until: time_or_ago(until.as_deref(), "until", now)?,
            ..Filter::default()
        };
        Ok(GraphQuery {
            since,
            until,
            by,
            filter,
        })
    }
}

/// An RFC 3339 time, or a duration ago (`1h`, `7d`), as `meshgate audit graph` takes them.
fn time_or_ago(v: Option<&str>, name: &str, now: SystemTime) -> Result<Option<SystemTime>, String> {
    let Some(v) = v else { return Ok(None) };
    if let Ok(ago) = humantime::parse_duration(v) {
        return now
            .checked_sub(ago)
            .map(Some)
            .ok_or_else(|| format!("`{name}`: `{v}` reaches before the year 1970"));
    }
    meshgate_policy::parse_rfc3339(v).map(Some).ok_or_else(|| {
        format!(
            "`{name}`: `{}` is neither an RFC 3339 time (like `2025-01-02T03:04:05Z`) nor a duration (like `1h` or `7d`)",
            v.chars().take(64).collect::<String>()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_like_forms_and_refuse_what_is_malformed() {
        let q = Query::parse(Some("caller=spiffe%3A%2F%2Fa%2Fb&service=&x=a+b")).unwrap();
        assert_eq!(q.get("caller"), Some("spiffe://a/b"));
        assert_eq!(q.get("service"), None, "an empty field is not set");
        assert_eq!(q.get("x"), Some("a b"));
        assert!(Query::parse(Some("a=%zz")).is_err());
        assert!(Query::parse(Some("a=%ff")).is_err(), "not UTF-8");
        assert!(Query::parse(Some(&"a".repeat(MAX_QUERY_BYTES + 1))).is_err());
        assert!(q.only(&["caller", "service"]).unwrap_err().contains("`x`"));
    }

    #[test]
    fn a_search_round_trips_through_its_query() {
        let now = SystemTime::now();
        let q = Query::parse(Some(
            "caller=spiffe%3A%2F%2Feast.example%2Fns%2Fshop%2Fsa%2Fweb&decision=deny&since=1h&limit=10&trace=4BF92F3577B34DA6A3CE929D0E0E4736",
        ))
        .unwrap();
        let s = Search::parse(&q, now).unwrap();
        assert_eq!(s.decision, Some(DecisionKind::Deny));
        assert_eq!(s.limit, 10);
        assert_eq!(
            s.filter().trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert!(s.filter().since.is_some());
        let again = Search::parse(&Query::parse(Some(&s.to_query(None))).unwrap(), now).unwrap();
        assert_eq!(again, s);
        assert!(s.to_query(Some(7)).ends_with("before=7"));
        for bad in [
            "decision=maybe",
            "limit=0",
            "limit=501",
            "since=yesterday",
            "before=x",
            "trace=xyz",
            "trace=4bf92f3577b34da6a3ce929d0e0e47",
        ] {
            assert!(
                Search::parse(&Query::parse(Some(bad)).unwrap(), now).is_err(),
                "{bad}"
            );
        }
        assert!(GraphQuery::parse(&Query::parse(Some("by=team")).unwrap(), now).is_err());
    }
}
