//! Traffic management: routes that steer a workload's requests to a service — weighted
//! backends across clusters and subsets, header canaries, mirroring, fault injection, and
//! per-route timeouts and retries.
//!
//! A route only chooses *where* a request goes; it never decides whether it may. The source
//! gateway picks the backend first, then the request goes through admission for that real
//! destination: Cedar at this gateway for a local backend, at the backend cluster's gateway
//! otherwise. A mirror copy is a request of its own, admitted and recorded where it lands.
//! Faults are applied after admission and recorded as `fault` decisions.

pub mod config;
mod steer;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderName, Method, StatusCode};
use meshgate_identity::SpiffeId;
use rand::Rng;

use self::config::{BackendConfig, FaultConfig, HeaderMatch, RetryConfig, RouteConfig};
use crate::dest::{Destination, Resolver};

pub(crate) use steer::{MAX_MIRRORS, Steer};

/// Header between gateways: the subset of the destination service a request is for.
pub(crate) const SUBSET_HEADER: &str = "x-meshgate-subset";
/// Header between gateways: the request is a mirror copy.
pub(crate) const MIRROR_HEADER: &str = "x-meshgate-mirror";

/// Percentages are kept in parts per million, so a roll is an integer comparison.
const MILLION: u32 = 1_000_000;
/// The largest weight of one backend (so sums never overflow).
const MAX_WEIGHT: u32 = 1_000_000;
/// The longest injected delay.
const MAX_DELAY: Duration = Duration::from_secs(300);
/// Most tries of one request a route may ask for.
const MAX_ATTEMPTS: u32 = 10;

/// Labels a subset of a service's endpoints must carry (`version=v2`); empty: the service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct Subset(BTreeMap<String, String>);

impl Subset {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `labels` carry every label of the subset.
    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// A subset from labels, each checked.
    pub(crate) fn from_labels(labels: &BTreeMap<String, String>) -> Result<Subset, String> {
        for (k, v) in labels {
            check_label(k, v)?;
        }
        Ok(Subset(labels.clone()))
    }

    /// Parses `k=v,k2=v2` (the form of [`SUBSET_HEADER`]).
    pub(crate) fn parse(text: &str) -> Result<Subset, String> {
        let mut labels = BTreeMap::new();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let shown: String = text.chars().take(128).collect();
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("subset `{shown}`: a pair is not `label=value`"))?;
            check_label(k.trim(), v.trim()).map_err(|_| {
                format!("subset `{shown}`: labels and values are 1–63 of `A-Za-z0-9-_.`")
            })?;
            labels.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        Ok(Subset(labels))
    }
}

impl fmt::Display for Subset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// Labels and values travel in a header: keep them to a plain alphabet.
fn check_label(key: &str, value: &str) -> Result<(), String> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    if !plain(key) || !plain(value) {
        return Err(format!(
            "`{key} = \"{value}\"`: labels and values are 1–63 of `A-Za-z0-9-_.`"
        ));
    }
    Ok(())
}

/// A place a route sends requests: a cluster, and a subset of the service there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Backend {
    pub cluster: String,
    pub subset: Subset,
    pub weight: u32,
    /// `north` or `north/version=v2`: in records, metrics and the access log.
    pub label: String,
}

impl Backend {
    fn new(cluster: &str, subset: Subset, weight: u32) -> Backend {
        let label = if subset.is_empty() {
            cluster.to_owned()
        } else {
            format!("{cluster}/{subset}")
        };
        Backend {
            cluster: cluster.to_owned(),
            subset,
            weight,
            label,
        }
    }
}

/// A header condition, compiled.
#[derive(Debug, Clone)]
struct HeaderRule {
    name: HeaderName,
    test: HeaderTest,
}

#[derive(Debug, Clone)]
enum HeaderTest {
    Present,
    Exact(String),
    Prefix(String),
}

impl HeaderRule {
    fn matches(&self, headers: &http::HeaderMap) -> bool {
        headers.get_all(&self.name).iter().any(|v| {
            let Ok(v) = v.to_str() else { return false };
            match &self.test {
                HeaderTest::Present => true,
                HeaderTest::Exact(want) => v == want,
                HeaderTest::Prefix(want) => v.starts_with(want.as_str()),
            }
        })
    }
}

/// A fault, compiled.
#[derive(Debug, Clone)]
pub(crate) struct Fault {
    pub abort: Option<StatusCode>,
    pub delay: Option<Duration>,
    per_million: u32,
    callers: Vec<String>,
    namespaces: Vec<String>,
    headers: Vec<HeaderRule>,
}

impl Fault {
    /// `delay 200ms` or `abort 503`: what the record says was injected.
    pub(crate) fn describe(&self) -> String {
        match (self.abort, self.delay) {
            (Some(s), _) => format!("abort {}", s.as_u16()),
            (None, Some(d)) => format!("delay {}", humane(d)),
            (None, None) => String::new(),
        }
    }

    fn in_scope(&self, caller: &SpiffeId, headers: &http::HeaderMap) -> bool {
        let caller_ok = (self.callers.is_empty() && self.namespaces.is_empty())
            || self.callers.iter().any(|c| c == caller.as_str())
            || namespace_of(caller).is_some_and(|ns| self.namespaces.iter().any(|n| n == ns));
        caller_ok && self.headers.iter().all(|h| h.matches(headers))
    }
}

/// The namespace of a workload ID (`spiffe://<td>/ns/<namespace>/sa/<account>`).
fn namespace_of(id: &SpiffeId) -> Option<&str> {
    let rest = id.path().strip_prefix("/ns/")?;
    rest.split('/').next().filter(|ns| !ns.is_empty())
}

fn humane(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// When a failed try is tried again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RetryPolicy {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// Time allowed each try until its response head (the service's or tunnel's otherwise).
    pub per_try_timeout: Option<Duration>,
    gateway_error: bool,
    server_error: bool,
    pub connect_failure: bool,
    pub reset: bool,
    pub timeout: bool,
    statuses: Vec<u16>,
}

impl RetryPolicy {
    /// What the gateway does without a route: `retries` retries on 502–504, a failed
    /// connection or a broken stream.
    pub(crate) fn standard(retries: u32) -> RetryPolicy {
        RetryPolicy {
            attempts: retries.saturating_add(1),
            per_try_timeout: None,
            gateway_error: true,
            server_error: false,
            connect_failure: true,
            reset: true,
            timeout: false,
            statuses: Vec::new(),
        }
    }

    /// Whether an answer with this status is tried again.
    pub(crate) fn retries_status(&self, status: StatusCode) -> bool {
        let s = status.as_u16();
        (self.gateway_error && crate::upstream::is_retryable_status(status))
            || (self.server_error && status.is_server_error())
            || self.statuses.contains(&s)
    }

    fn compile(
        c: &RetryConfig,
        route_timeout: Option<Duration>,
        at: &str,
        errors: &mut Vec<String>,
    ) -> RetryPolicy {
        let mut p = RetryPolicy {
            attempts: c.attempts,
            per_try_timeout: c.per_try_timeout,
            gateway_error: false,
            server_error: false,
            connect_failure: false,
            reset: false,
            timeout: false,
            statuses: c.statuses.clone(),
        };
        if !(1..=MAX_ATTEMPTS).contains(&c.attempts) {
            errors.push(format!(
                "{at}.retry.attempts: {} is not between 1 and {MAX_ATTEMPTS} (tries in all, the first included)",
                c.attempts
            ));
        }
        if c.per_try_timeout.is_some_and(|t| t.is_zero()) {
            errors.push(format!("{at}.retry.per_try_timeout: must be more than 0"));
        }
        for on in &c.on {
            match on.as_str() {
                "gateway-error" => p.gateway_error = true,
                "5xx" => p.server_error = true,
                "connect-failure" => p.connect_failure = true,
                "reset" => p.reset = true,
                "timeout" => p.timeout = true,
                other => errors.push(format!(
                    "{at}.retry.on: `{other}` is not one of gateway-error, 5xx, connect-failure, reset, timeout"
                )),
            }
        }
        for s in &c.statuses {
            if !(400..=599).contains(s) {
                errors.push(format!(
                    "{at}.retry.statuses: {s} is not an error status (400–599)"
                ));
            } else if matches!(s, 401 | 403 | 429) {
                errors.push(format!(
                    "{at}.retry.statuses: {s} is a refusal by a gateway (identity, policy or quota); trying again cannot change it"
                ));
            }
        }
        if let (Some(per_try), Some(total)) = (c.per_try_timeout, route_timeout)
            && per_try >= total
        {
            errors.push(format!(
                "{at}.retry.per_try_timeout: {per_try:?} leaves no time for a second try within the route's timeout of {total:?}"
            ));
        }
        p
    }
}

/// One compiled route.
#[derive(Debug)]
pub(crate) struct Route {
    pub name: String,
    service: String,
    path_prefix: Option<String>,
    methods: Vec<Method>,
    headers: Vec<HeaderRule>,
    backends: Vec<Backend>,
    mirror: Option<(Backend, u32)>,
    faults: Vec<Fault>,
    /// Time until the response head, all tries together.
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
}

/// The backend a route picked for one request, with what serving it takes (`T`).
#[derive(Debug)]
pub(crate) enum Pick<'a, T> {
    /// The route names no backends: the name resolves as without a route.
    Unrouted,
    /// This backend.
    Backend(&'a Backend, T),
    /// Every backend is drained or unreachable now.
    NoneAvailable,
}

impl Route {
    fn takes(&self, dest: &Destination, head: &http::request::Parts) -> bool {
        dest.cluster.is_none()
            && self.service.split_once('.')
                == Some((dest.service.as_str(), dest.namespace.as_str()))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| head.uri.path().starts_with(p))
            && (self.methods.is_empty() || self.methods.contains(&head.method))
            && self.headers.iter().all(|h| h.matches(&head.headers))
    }

    /// Picks a backend by weight among those `serve` can serve now (it returns how). A
    /// backend of weight 0 is never picked (drained), whatever else is unavailable. Usually
    /// `serve` runs once: only when the weighted pick cannot serve are the others asked.
    pub(crate) fn pick<T>(
        &self,
        rng: &mut impl Rng,
        mut serve: impl FnMut(&Backend) -> Option<T>,
    ) -> Pick<'_, T> {
        if self.backends.is_empty() {
            return Pick::Unrouted;
        }
        let first = weighted(self.backends.iter(), rng);
        if let Some(b) = first
            && let Some(how) = serve(b)
        {
            return Pick::Backend(b, how);
        }
        let mut live: Vec<(&Backend, T)> = self
            .backends
            .iter()
            .filter(|b| b.weight > 0 && first != Some(*b))
            .filter_map(|b| serve(b).map(|how| (b, how)))
            .collect();
        let Some(b) = weighted(live.iter().map(|(b, _)| *b), rng) else {
            return Pick::NoneAvailable;
        };
        match live.iter().position(|(l, _)| std::ptr::eq(*l, b)) {
            Some(i) => {
                let (b, how) = live.swap_remove(i);
                Pick::Backend(b, how)
            }
            None => Pick::NoneAvailable,
        }
    }

    /// The fault this request gets, if any.
    pub(crate) fn fault(
        &self,
        caller: &SpiffeId,
        headers: &http::HeaderMap,
        rng: &mut impl Rng,
    ) -> Option<&Fault> {
        self.faults
            .iter()
            .find(|f| f.in_scope(caller, headers) && roll(rng, f.per_million))
    }

    /// The mirror backend, when this request is copied.
    pub(crate) fn mirror(&self, rng: &mut impl Rng) -> Option<&Backend> {
        let (backend, per_million) = self.mirror.as_ref()?;
        roll(rng, *per_million).then_some(backend)
    }

    /// Every backend the route may send to (its backends and mirror).
    pub(crate) fn destinations(&self) -> impl Iterator<Item = &Backend> {
        self.backends
            .iter()
            .chain(self.mirror.as_ref().map(|(b, _)| b))
    }

    /// The service (`<service>.<namespace>`).
    pub(crate) fn service(&self) -> &str {
        &self.service
    }

    /// The service as an unpinned destination.
    pub(crate) fn destination(&self) -> Destination {
        let (service, namespace) = self.service.split_once('.').unwrap_or_default();
        Destination {
            service: service.to_owned(),
            namespace: namespace.to_owned(),
            cluster: None,
        }
    }
}

/// One of `backends` by weight (weight 0 never), or `None` when all weigh 0.
fn weighted<'a>(
    backends: impl Iterator<Item = &'a Backend> + Clone,
    rng: &mut impl Rng,
) -> Option<&'a Backend> {
    let total: u64 = backends.clone().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut roll = rng.random_range(0..total);
    for b in backends {
        if roll < u64::from(b.weight) {
            return Some(b);
        }
        roll -= u64::from(b.weight);
    }
    None
}

fn roll(rng: &mut impl Rng, per_million: u32) -> bool {
    per_million >= MILLION || (per_million > 0 && rng.random_range(0..MILLION) < per_million)
}

/// All routes, in the order written; the first that takes a request wins.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Compiles routes from config, or every problem found, each naming the route and key.
    pub(crate) fn compile(configs: &[RouteConfig]) -> Result<RouteTable, Vec<String>> {
        let mut errors = Vec::new();
        let mut names = HashSet::new();
        let mut routes = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let at = format!("routes[{i}] (`{}`)", c.name);
            if !names.insert(c.name.as_str()) {
                errors.push(format!("{at}.name: another route has this name"));
            }
            routes.push(Arc::new(compile_route(c, &at, &mut errors)));
        }
        if errors.is_empty() {
            Ok(RouteTable { routes })
        } else {
            Err(errors)
        }
    }

    /// The route that takes this request, if any.
    pub(crate) fn route_for(
        &self,
        dest: &Destination,
        head: &http::request::Parts,
    ) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.takes(dest, head))
    }

    /// All routes.
    pub(crate) fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}

fn compile_route(c: &RouteConfig, at: &str, errors: &mut Vec<String>) -> Route {
    let name_ok = !c.name.is_empty()
        && c.name.len() <= 64
        && c.name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !name_ok {
        errors.push(format!(
            "{at}.name: use 1–64 of `A-Za-z0-9-_.` (it is a metric label)"
        ));
    }
    let service = match Resolver::new("mesh", BTreeMap::new())
        .resolve(Some(&format!("{}.mesh", c.service)))
    {
        Ok(d) if d.cluster.is_none() => d.short(),
        _ => {
            errors.push(format!(
                "{at}.service: `{}` is not `<service>.<namespace>` (routes take the unpinned name)",
                c.service
            ));
            String::new()
        }
    };
    let path_prefix = c.matches.path_prefix.clone();
    if path_prefix.as_deref().is_some_and(|p| !p.starts_with('/')) {
        errors.push(format!("{at}.match.path_prefix: must start with `/`"));
    }
    let methods = c
        .matches
        .methods
        .iter()
        .filter_map(
            |m| match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                Ok(m) => Some(m),
                Err(_) => {
                    errors.push(format!("{at}.match.methods: `{m}` is not an HTTP method"));
                    None
                }
            },
        )
        .collect();
    let headers = header_rules(&c.matches.headers, &format!("{at}.match.headers"), errors);
    let backends = backends(&c.backends, at, errors);
    let mirror = c.mirror.as_ref().map(|m| {
        let subset = subset(&m.subset, &format!("{at}.mirror.subset"), errors);
        check_cluster(&m.cluster, &format!("{at}.mirror.cluster"), errors);
        (
            Backend::new(&m.cluster, subset, 0),
            per_million(m.percent, &format!("{at}.mirror.percent"), errors),
        )
    });
    let faults = c
        .faults
        .iter()
        .enumerate()
        .map(|(j, f)| compile_fault(f, &format!("{at}.faults[{j}]"), errors))
        .collect();
    if c.timeout.is_some_and(|t| t.is_zero()) {
        errors.push(format!("{at}.timeout: must be more than 0"));
    }
    let retry = c
        .retry
        .as_ref()
        .map(|r| RetryPolicy::compile(r, c.timeout, at, errors));
    Route {
        name: c.name.clone(),
        service,
        path_prefix,
        methods,
        headers,
        backends,
        mirror,
        faults,
        timeout: c.timeout,
        retry,
    }
}

fn backends(configs: &[BackendConfig], at: &str, errors: &mut Vec<String>) -> Vec<Backend> {
    let mut seen = HashSet::new();
    let list: Vec<Backend> = configs
        .iter()
        .enumerate()
        .map(|(j, b)| {
            let here = format!("{at}.backends[{j}]");
            check_cluster(&b.cluster, &format!("{here}.cluster"), errors);
            let subset = subset(&b.subset, &format!("{here}.subset"), errors);
            if b.weight > MAX_WEIGHT {
                errors.push(format!("{here}.weight: {} is over {MAX_WEIGHT}", b.weight));
            }
            let backend = Backend::new(&b.cluster, subset, b.weight.min(MAX_WEIGHT));
            if !seen.insert(backend.label.clone()) {
                errors.push(format!(
                    "{here}: `{}` is listed twice; give it one weight",
                    backend.label
                ));
            }
            backend
        })
        .collect();
    if !list.is_empty() && list.iter().all(|b| b.weight == 0) {
        errors.push(format!(
            "{at}.backends: every weight is 0, so nothing could serve the route (remove the route, or give a backend weight)"
        ));
    }
    list
}

fn compile_fault(f: &FaultConfig, at: &str, errors: &mut Vec<String>) -> Fault {
    let abort = f.abort.and_then(|s| match StatusCode::from_u16(s) {
        Ok(status) if (400..=599).contains(&s) => Some(status),
        _ => {
            errors.push(format!("{at}.abort: {s} is not an error status (400–599)"));
            None
        }
    });
    match (f.abort, f.delay) {
        (None, None) => errors.push(format!(
            "{at}: give `abort` (a status) or `delay` (a duration)"
        )),
        (Some(_), Some(_)) => errors.push(format!(
            "{at}: give `abort` or `delay`, not both (two faults can share a scope)"
        )),
        _ => {}
    }
    if f.delay.is_some_and(|d| d > MAX_DELAY) {
        errors.push(format!("{at}.delay: longer than {}s", MAX_DELAY.as_secs()));
    }
    for caller in &f.callers {
        if caller.parse::<SpiffeId>().is_err() {
            errors.push(format!("{at}.callers: `{caller}` is not a SPIFFE ID"));
        }
    }
    for ns in &f.namespaces {
        if ns.is_empty() || ns.contains('/') {
            errors.push(format!(
                "{at}.namespaces: `{ns}` is not a namespace name (the trust domain is this cluster's)"
            ));
        }
    }
    Fault {
        abort,
        delay: f.delay,
        per_million: per_million(f.percent, &format!("{at}.percent"), errors),
        callers: f.callers.clone(),
        namespaces: f.namespaces.clone(),
        headers: header_rules(&f.headers, &format!("{at}.headers"), errors),
    }
}

fn header_rules(configs: &[HeaderMatch], at: &str, errors: &mut Vec<String>) -> Vec<HeaderRule> {
    configs
        .iter()
        .enumerate()
        .filter_map(|(j, h)| {
            let here = format!("{at}[{j}]");
            let name = match HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes()) {
                Ok(n) => n,
                Err(_) => {
                    errors.push(format!("{here}.name: `{}` is not a header name", h.name));
                    return None;
                }
            };
            if name.as_str().starts_with("x-meshgate-") {
                errors.push(format!(
                    "{here}.name: `{name}` headers are removed from every request before routing; match another header"
                ));
            }
            let test = match (&h.exact, &h.prefix) {
                (Some(_), Some(_)) => {
                    errors.push(format!("{here}: give `exact` or `prefix`, not both"));
                    return None;
                }
                (Some(v), None) => HeaderTest::Exact(v.clone()),
                (None, Some(v)) => HeaderTest::Prefix(v.clone()),
                (None, None) => HeaderTest::Present,
            };
            Some(HeaderRule { name, test })
        })
        .collect()
}

fn subset(labels: &BTreeMap<String, String>, at: &str, errors: &mut Vec<String>) -> Subset {
    Subset::from_labels(labels).unwrap_or_else(|e| {
        errors.push(format!("{at}: {e}"));
        Subset::default()
    })
}

fn check_cluster(cluster: &str, at: &str, errors: &mut Vec<String>) {
    if !crate::dest::valid_label(cluster) {
        errors.push(format!("{at}: `{cluster}` is not a cluster name"));
    }
}

fn per_million(percent: f64, at: &str, errors: &mut Vec<String>) -> u32 {
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
        errors.push(format!("{at}: {percent} is not between 0 and 100"));
        return 0;
    }
    (percent * 10_000.0).round() as u32
}

/// Checks traffic routes as a gateway would load them: every problem, each naming its
/// route and key.
pub fn check_routes(routes: &[RouteConfig]) -> Result<(), Vec<String>> {
    RouteTable::compile(routes).map(|_| ())
}

/// The routes a gateway serves with, replaced whole at a reload.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    table: ArcSwap<RouteTable>,
}

impl Traffic {
    pub(crate) fn new(table: RouteTable) -> Traffic {
        Traffic {
            table: ArcSwap::from_pointee(table),
        }
    }

    /// The routes now (a guard: cheap, not to be held across an await).
    pub(crate) fn table(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.table.load()
    }

    /// Serves with `table` from the next request on.
    pub(crate) fn replace(&self, table: RouteTable) {
        self.table.store(Arc::new(table));
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
