//! Traffic routes as an operator writes them: `[[routes]]` blocks of the gateway config.
//!
//! ```toml
//! [[routes]]
//! name = "orders-canary"
//! service = "orders.shop"              # the unpinned name callers use
//! match = { path_prefix = "/v1/", methods = ["GET"] }
//! backends = [
//!   { cluster = "west", weight = 90 },
//!   { cluster = "north", subset = { version = "v2" }, weight = 10 },
//! ]
//! mirror = { cluster = "north", subset = { version = "v2" }, percent = 5 }
//! faults = [{ abort = 503, percent = 100, callers = ["spiffe://east.example/ns/qa/sa/tester"] }]
//! timeout = "2s"
//! retry = { attempts = 3, per_try_timeout = "500ms", on = ["gateway-error", "reset"] }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::config::parse_duration;

/// One traffic route: which requests it matches and where they go.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The route's name: unique, shown in records, metrics and the access log.
    pub name: String,
    /// The service as callers name it, unpinned: `<service>.<namespace>`.
    pub service: String,
    /// Which requests to that service the route takes (all when empty).
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    /// Where the requests go, by weight. Empty: wherever the name resolves without a route.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// A share of the requests also sent, as a copy, to another backend.
    #[serde(default)]
    pub mirror: Option<MirrorConfig>,
    /// Faults to inject; the first whose scope matches and whose percentage comes up wins.
    #[serde(default)]
    pub faults: Vec<FaultConfig>,
    /// Time allowed until the response head, all attempts together.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub timeout: Option<Duration>,
    /// How failed attempts are retried (within the service's retry budget).
    #[serde(default)]
    pub retry: Option<RetryConfig>,
}

/// Which requests a route takes: all conditions must hold.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// The request path (as sent) starts with this.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// The method is one of these (any when empty).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Each of these headers matches.
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
}

/// A header condition: present with exactly this value, with this prefix, or at all.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// The header's name (case-insensitive).
    pub name: String,
    /// The whole value.
    #[serde(default)]
    pub exact: Option<String>,
    /// The value's beginning.
    #[serde(default)]
    pub prefix: Option<String>,
}

/// One weighted backend: a cluster serving the service, optionally one subset of it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// The cluster (this one or a peer).
    pub cluster: String,
    /// Labels the chosen endpoints' subset must carry (`version = "v2"`); none: the service.
    #[serde(default)]
    pub subset: BTreeMap<String, String>,
    /// Relative weight; 0 drains the backend.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// Copies of a share of the requests, sent to another backend; their answers are dropped.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// The cluster the copies go to.
    pub cluster: String,
    /// The subset there.
    #[serde(default)]
    pub subset: BTreeMap<String, String>,
    /// The share of matching requests copied, 0–100.
    #[serde(default = "default_percent")]
    pub percent: f64,
}

/// A fault to inject: answer with `abort` instead of forwarding, or wait `delay` first.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    /// The HTTP status to answer with (400–599) instead of forwarding.
    #[serde(default)]
    pub abort: Option<u16>,
    /// How long to hold the request before forwarding it.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub delay: Option<Duration>,
    /// The share of in-scope requests that get the fault, 0–100.
    #[serde(default = "default_percent")]
    pub percent: f64,
    /// Only these callers (SPIFFE IDs).
    #[serde(default)]
    pub callers: Vec<String>,
    /// Only callers in these namespaces (of this trust domain).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Only requests whose headers match.
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
}

/// Retries of a route's requests. Only requests that may be sent twice (an idempotent
/// method without a body) are retried, and only while the service's retry budget lasts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Tries in all, the first included (1: never retry).
    pub attempts: u32,
    /// Time allowed to each try until its response head.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub per_try_timeout: Option<Duration>,
    /// What is retried: `gateway-error` (502, 503, 504), `5xx`, `connect-failure`, `reset`
    /// (the connection broke before the answer), `timeout` (a try ran out of time).
    #[serde(default = "default_retry_on")]
    pub on: Vec<String>,
    /// More statuses to retry on (e.g. 409).
    #[serde(default)]
    pub statuses: Vec<u16>,
}

fn default_weight() -> u32 {
    1
}

fn default_percent() -> f64 {
    100.0
}

fn default_retry_on() -> Vec<String> {
    ["gateway-error", "connect-failure", "reset"]
        .map(str::to_owned)
        .to_vec()
}

fn de_opt_duration<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(de)?;
    parse_duration(&text).map(Some).map_err(de::Error::custom)
}

/// `routes`: an array of `[[routes]]` tables. The `[routes]` table of authority aliases
/// from earlier versions is refused with a pointer to its new name, `[aliases]`.
pub(crate) fn de_routes<'de, D: Deserializer<'de>>(de: D) -> Result<Vec<RouteConfig>, D::Error> {
    struct Routes;
    impl<'de> Visitor<'de> for Routes {
        type Value = Vec<RouteConfig>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array of `[[routes]]` tables")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut routes = Vec::new();
            while let Some(route) = seq.next_element()? {
                routes.push(route);
            }
            Ok(routes)
        }

        fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(de::Error::custom(
                "`[routes]` is now `[[routes]]`, traffic routes; authority aliases (`\"legacy.host\" = \"orders.shop.west\"`) moved to `[aliases]`",
            ))
        }
    }
    de.deserialize_any(Routes)
}
