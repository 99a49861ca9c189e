//! Forwarding admitted requests: to an endpoint of a local service, or through the tunnel to
//! the gateway of the destination's cluster. This is the gateway's one retry layer.
//!
//! **Retries** happen only where a request enters the mesh (the source gateway), with one
//! budget per destination service (20 % of requests plus 10 a second) and one definition of
//! what may be sent twice: an idempotent method without a body. They re-send on a connection
//! failure, a stream broken before the answer, or a 502/503/504 answer, each time to another
//! endpoint (local) or the next gateway (remote). A request from a peer gateway gets exactly
//! one attempt at its upstream: the source retries it, so attempts never multiply.
//!
//! **Failover** is not a retry: a request that provably was not sent (no connection to a
//! gateway, or a stale connection that could not open a stream) goes to the next gateway or
//! cluster at once, any method, outside the budget.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

use crate::admission::{Permit, Target};
use crate::body::{self, GatewayBody, H3Body};
use crate::caller::{self, CALLER_REF_HEADER, CALLER_TOKEN_HEADER, CallerTokens};
use crate::catalog::PeerRoute;
use crate::dest::Destination;
use crate::headers::{self, CALLER_HEADER};
use crate::lb::RetryBudget;
use crate::metrics::{Metrics, Stage};
use crate::respond;
use crate::traffic::RetryPolicy;
use crate::tunnel::{ClientStream, Tunnel};
use crate::upstream::{LocalService, UpstreamError, is_idempotent};

/// Budgets kept per destination service before the table starts over.
const MAX_BUDGETS: usize = 10_000;

/// What forwarding made of a request.
#[derive(Debug)]
pub(crate) enum Forwarded {
    /// An answer for the caller (the upstream's, or a gateway error such as 502 or 504).
    Answer(Response<GatewayBody>),
    /// No gateway of any cluster serving the destination could be reached: the caller of
    /// `forward` records the failure with the permit.
    Unreachable(Box<Unreachable>),
}

/// A request no gateway of its destination could be reached for.
#[derive(Debug)]
pub(crate) struct Unreachable {
    pub permit: Permit,
    pub head: http::request::Parts,
    pub reason: String,
}

/// Where `x-meshgate-caller` and the normalized path come from, and how often to retry.
#[derive(Debug)]
pub(crate) struct Forwarder {
    tunnel: Arc<Tunnel>,
    tokens: CallerTokens,
    budgets: Mutex<HashMap<String, Arc<RetryBudget>>>,
    remote_retries: u32,
    tunnel_timeout: Duration,
    metrics: Arc<Metrics>,
}

/// How many tries a request gets and which failures are tried again.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Tries<'a> {
    /// One try: the request came from a peer gateway, whose source retries it (so tries
    /// never multiply), or it is a mirror copy.
    Once,
    /// The request entered the mesh here and no route says otherwise: the service's
    /// `retries` (local) or `limits.remote_retries` (remote), on the standard failures.
    Standard,
    /// A traffic route's retry policy.
    Route(&'a RetryPolicy),
}

impl<'a> Tries<'a> {
    /// The policy: a route's, or the standard one with `retries` (none for `Once`).
    fn policy(self, retries: u32) -> Cow<'a, RetryPolicy> {
        match self {
            Tries::Once => Cow::Owned(RetryPolicy::standard(0)),
            Tries::Standard => Cow::Owned(RetryPolicy::standard(retries)),
            Tries::Route(p) => Cow::Borrowed(p),
        }
    }
}

/// Whether a failed upstream try is tried again under `policy`.
fn retries_error(policy: &RetryPolicy, e: &UpstreamError) -> bool {
    match e {
        UpstreamError::Timeout { .. } => policy.timeout,
        UpstreamError::Failed { source, .. } if source.is_connect() => policy.connect_failure,
        UpstreamError::Failed { .. } => policy.reset,
        _ => false,
    }
}

/// Whether a request may be sent more than once: the one definition of idempotency.
pub(crate) fn resendable(method: &Method, body: &GatewayBody) -> bool {
    is_idempotent(method) && hyper::body::Body::is_end_stream(body)
}

impl Forwarder {
    pub(crate) fn new(
        tunnel: Arc<Tunnel>,
        tokens: CallerTokens,
        remote_retries: u32,
        tunnel_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            tunnel,
            tokens,
            budgets: Mutex::new(HashMap::new()),
            remote_retries,
            tunnel_timeout,
            metrics,
        }
    }

    pub(crate) fn tunnel(&self) -> &Arc<Tunnel> {
        &self.tunnel
    }

    fn budget(&self, service: &str) -> Arc<RetryBudget> {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = budgets.get(service) {
            return b.clone();
        }
        if budgets.len() >= MAX_BUDGETS {
            budgets.clear();
        }
        let b = Arc::new(RetryBudget::new(0.2, 10, 10));
        budgets.insert(service.to_owned(), b.clone());
        b
    }

    /// Sends an admitted request where its permit says, with the tries `tries` allows.
    pub(crate) async fn forward(
        &self,
        permit: Permit,
        head: http::request::Parts,
        body: GatewayBody,
        tries: Tries<'_>,
    ) -> Forwarded {
        // Trailers are relayed end to end: no `x-meshgate-*` field in them passes, either way.
        let body = headers::strip_meshgate_trailers(body);
        let forwarded = match permit.target() {
            Target::Local(svc) => {
                let svc = svc.clone();
                let policy = tries.policy(svc.retries());
                Forwarded::Answer(self.local(&permit, &svc, head, body, &policy).await)
            }
            Target::Remote { dest, routes } => {
                let (dest, routes) = (dest.clone(), routes.clone());
                let policy = tries.policy(self.remote_retries);
                self.remote(permit, &dest, &routes, head, body, &policy)
                    .await
            }
        };
        match forwarded {
            Forwarded::Answer(resp) => {
                Forwarded::Answer(resp.map(headers::strip_meshgate_trailers))
            }
            unreachable => unreachable,
        }
    }

    /// To a local service: the authorized path, the verified caller, one attempt per endpoint.
    async fn local(
        &self,
        permit: &Permit,
        svc: &LocalService,
        mut head: http::request::Parts,
        body: GatewayBody,
        policy: &RetryPolicy,
    ) -> Response<GatewayBody> {
        if let Some(path) = permit.path() {
            use_path(&mut head, path);
        }
        headers::strip_meshgate(&mut head.headers);
        if let Ok(v) = HeaderValue::from_str(permit.caller().id.as_str()) {
            head.headers.insert(CALLER_HEADER, v);
        }
        if head.method == Method::CONNECT {
            let caller = permit.caller().id.as_str();
            return crate::connect::inbound(svc, body, caller, permit.decision_id()).await;
        }
        let _in_flight = match svc.admit() {
            Ok(guard) => guard,
            Err(e) => {
                self.metrics.upstream_failures.inc();
                return respond::error(StatusCode::SERVICE_UNAVAILABLE, &format!("meshgate: {e}"));
            }
        };
        let resend = resendable(&head.method, &body);
        let budget = self.budget(svc.name());
        // Only requests that can be retried fill the budget (not mirror copies, not a peer's).
        if policy.attempts > 1 {
            budget.deposit();
        }
        let mut body = Some(body);
        let mut failed = Vec::new();
        let timeout = policy.per_try_timeout.unwrap_or_else(|| svc.timeout());
        loop {
            let sent = body.take().unwrap_or_else(body::empty);
            let started = Instant::now();
            let (endpoint, result) = svc.attempt(&head, sent, &failed, timeout).await;
            self.metrics.stage(Stage::Upstream, started.elapsed());
            let failed_try = match &result {
                Ok(resp) => policy.retries_status(resp.status()),
                Err(e) => retries_error(policy, e),
            };
            if failed_try
                && resend
                && (failed.len() as u32) + 1 < policy.attempts
                && budget.withdraw(Instant::now())
            {
                tracing::debug!(service = %svc.name(), endpoint, "retrying on another endpoint");
                failed.push(endpoint);
                continue;
            }
            return match result {
                Ok(resp) => {
                    let mut resp = resp.map(|b| b.map_err(Into::into).boxed());
                    headers::strip_hop_by_hop(resp.headers_mut());
                    headers::strip_meshgate(resp.headers_mut());
                    resp
                }
                Err(e) => {
                    self.metrics.upstream_failures.inc();
                    tracing::warn!(service = %svc.name(), error = %e, "upstream failed");
                    respond::error(StatusCode::BAD_GATEWAY, &format!("meshgate: {e}"))
                }
            };
        }
    }

    /// To the destination's gateways, best cluster first.
    async fn remote(
        &self,
        permit: Permit,
        dest: &Destination,
        routes: &[PeerRoute],
        head: http::request::Parts,
        body: GatewayBody,
        policy: &RetryPolicy,
    ) -> Forwarded {
        let timeout = policy.per_try_timeout.unwrap_or(self.tunnel_timeout);
        let candidates: Vec<(&PeerRoute, SocketAddr)> = routes
            .iter()
            .flat_map(|r| r.gateways.iter().map(move |g| (r, *g)))
            .collect();
        let resend = resendable(&head.method, &body);
        let budget = self.budget(&dest.to_string());
        // Only requests that can be retried fill the budget (not mirror copies, not a peer's).
        if policy.attempts > 1 {
            budget.deposit();
        }
        let mut body = Some(body);
        let mut last = String::from("no gateway serves it");
        let mut next = 0usize;
        let mut unsent_in_a_row = 0usize;
        let mut retried = 0u32;
        let mut force_token = false;
        while !candidates.is_empty() && unsent_in_a_row < candidates.len() {
            let (route, gw) = candidates[next % candidates.len()];
            let outcome = self
                .try_gateway(
                    &permit,
                    dest,
                    route,
                    gw,
                    &head,
                    &mut body,
                    (resend, force_token),
                    timeout,
                )
                .await;
            let may_retry = |retried: u32| {
                resend && retried + 1 < policy.attempts && budget.withdraw(Instant::now())
            };
            match outcome {
                Try::NotSent(e) => {
                    tracing::debug!(peer = %gw, cluster = %route.cluster, error = %e, "peer gateway unreachable; failing over");
                    last = e;
                    unsent_in_a_row += 1;
                    next += 1;
                }
                Try::UnknownReference(resp) => {
                    // Refused before it was served: send the token along once more.
                    if force_token || !resend {
                        return Forwarded::Answer(resp);
                    }
                    force_token = true;
                }
                Try::Answered(resp) => {
                    unsent_in_a_row = 0;
                    if policy.retries_status(resp.status()) && may_retry(retried) {
                        retried += 1;
                        next += 1;
                        continue;
                    }
                    return Forwarded::Answer(resp);
                }
                Try::Broken(e) => {
                    unsent_in_a_row = 0;
                    if policy.reset && may_retry(retried) {
                        tracing::warn!(peer = %gw, error = %e, "peer gateway failed before answering; retrying");
                        retried += 1;
                        next += 1;
                        continue;
                    }
                    return Forwarded::Answer(respond::error(
                        StatusCode::BAD_GATEWAY,
                        &format!("meshgate: peer gateway failed: {e}"),
                    ));
                }
                Try::TimedOut(resp) => {
                    unsent_in_a_row = 0;
                    if policy.timeout && may_retry(retried) {
                        tracing::debug!(peer = %gw, "no answer in time; retrying");
                        retried += 1;
                        next += 1;
                        continue;
                    }
                    return Forwarded::Answer(resp);
                }
            }
        }
        Forwarded::Unreachable(Box::new(Unreachable {
            permit,
            head,
            reason: format!("no reachable gateway for `{dest}`: {last}"),
        }))
    }

    /// One request to one peer gateway. A connection that turns out stale (the peer
    /// restarted or closed it) is replaced and the request sent on the new one.
    /// `(resend, force_token)`: the request may be sent again; send the caller's token.
    #[allow(clippy::too_many_arguments)]
    async fn try_gateway(
        &self,
        permit: &Permit,
        dest: &Destination,
        route: &PeerRoute,
        gw: SocketAddr,
        head: &http::request::Parts,
        body: &mut Option<GatewayBody>,
        (resend, force_token): (bool, bool),
        timeout: Duration,
    ) -> Try {
        let td = &route.trust_domain;
        let aud = caller::audience(td, &dest.namespace, &dest.service);
        let token = match self.tokens.token(permit.caller(), &aud, SystemTime::now()) {
            Ok(t) => t,
            Err(e) => return Try::NotSent(format!("cannot mint the caller token: {e}")),
        };
        let mut fresh = false;
        let opening = Instant::now();
        let (link, naming, stream) = loop {
            let link = match self.tunnel.link(gw, td, false).await {
                Ok(l) => l,
                Err(e) => return Try::NotSent(e.to_string()),
            };
            let mut naming = link.refs.naming(&token);
            // A request that cannot be sent again always carries the token, so a lost
            // reference can never fail it.
            naming.with_token |= force_token || !resend;
            let request = match tunnel_head(head, dest, route, &token, naming) {
                Ok(r) => r,
                Err(e) => {
                    return Try::Answered(respond::error(
                        StatusCode::BAD_REQUEST,
                        &format!("meshgate: {e}"),
                    ));
                }
            };
            match link.send_request(request).await {
                Ok(stream) => break (link, naming, stream),
                Err(e) if !fresh => {
                    tracing::debug!(peer = %gw, error = %e, "peer connection unusable; redialing");
                    self.tunnel.discard(gw, td, &link);
                    fresh = true;
                }
                Err(e) => return Try::NotSent(e.to_string()),
            }
        };
        let sent = if resend {
            body::empty()
        } else {
            body.take().unwrap_or_else(body::empty)
        };
        let waiting = Instant::now();
        self.metrics.stage(Stage::TunnelOpen, waiting - opening);
        let answer = exchange(stream, sent, timeout).await;
        self.metrics.stage(Stage::TunnelWait, waiting.elapsed());
        match answer {
            Ok(mut resp) => {
                let answer = resp
                    .headers_mut()
                    .remove(CALLER_REF_HEADER)
                    .and_then(|v| v.to_str().ok().map(str::to_owned));
                if link.refs.answer(&token, naming.id, answer.as_deref()) {
                    return Try::UnknownReference(resp);
                }
                Try::Answered(resp)
            }
            Err(Broken::BeforeAnswer(e)) => Try::Broken(e),
            Err(Broken::Timeout(resp)) => Try::TimedOut(resp),
        }
    }
}

/// How one try at a peer gateway went.
enum Try {
    /// Nothing was sent (no connection): fail over.
    NotSent(String),
    /// The peer answered.
    Answered(Response<GatewayBody>),
    /// The peer refused an unknown caller reference (before serving the request).
    UnknownReference(Response<GatewayBody>),
    /// The stream or connection broke before an answer: the peer may have acted on it.
    Broken(String),
    /// No answer in time: 504, never retried.
    TimedOut(Response<GatewayBody>),
}

/// How a tunnel exchange broke before the peer's answer.
enum Broken {
    BeforeAnswer(String),
    Timeout(Response<GatewayBody>),
}

/// The request head sent to the peer: the canonical authority, the caller's token and/or
/// its reference on this connection.
fn tunnel_head(
    head: &http::request::Parts,
    dest: &Destination,
    route: &PeerRoute,
    token: &str,
    naming: caller::Naming,
) -> Result<Request<()>, http::Error> {
    let authority = dest.in_cluster(&route.cluster);
    let uri = if head.method == Method::CONNECT {
        authority
    } else {
        let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
        format!("https://{authority}{path}")
    };
    let mut builder = Request::builder().method(head.method.clone()).uri(uri);
    if let Some(h) = builder.headers_mut() {
        h.reserve(head.headers.len() + 2);
        for (name, value) in &head.headers {
            // Credentials meant for this gateway's side of the mesh do not cross to another
            // cluster unless the service there is configured to receive them.
            let credential = name == http::header::AUTHORIZATION || name == http::header::COOKIE;
            if name != http::header::HOST && (route.credentials || !credential) {
                h.append(name.clone(), value.clone());
            }
        }
        if naming.with_token
            && let Ok(v) = HeaderValue::from_str(token)
        {
            h.insert(CALLER_TOKEN_HEADER, v);
        }
        h.insert(CALLER_REF_HEADER, HeaderValue::from(naming.id));
    }
    builder.body(())
}

/// Sends the request body on a tunnel stream and returns the response, its body read from
/// the stream as the caller polls it. A body-less request is finished inline; a streamed one
/// is sent by a task of its own, so the answer can come back while it is still uploading.
async fn exchange(
    stream: ClientStream,
    body: GatewayBody,
    timeout: Duration,
) -> Result<Response<GatewayBody>, Broken> {
    let (mut send, mut recv) = stream.split();
    if hyper::body::Body::is_end_stream(&body) {
        if let Err(e) = body::H3Send::finish(&mut send).await {
            return Err(Broken::BeforeAnswer(e.to_string()));
        }
    } else {
        tokio::spawn(async move {
            if let Err(e) = body::body_to_h3(body, &mut send).await {
                tracing::debug!(error = %e, "request body to peer ended early");
            }
        });
    }
    let head = match tokio::time::timeout(timeout, recv.recv_response()).await {
        Ok(Ok(head)) => head,
        Ok(Err(e)) => return Err(Broken::BeforeAnswer(e.to_string())),
        Err(_) => {
            // Dropping the stream cancels it. (h3-quinn 0.0.10 panics on `stop_sending`
            // after a read was cut short, so it is not called here.)
            return Err(Broken::Timeout(respond::error(
                StatusCode::GATEWAY_TIMEOUT,
                &format!("meshgate: no answer from the peer gateway within {timeout:?}"),
            )));
        }
    };
    let (parts, ()) = head.into_parts();
    Ok(Response::from_parts(parts, H3Body::new(recv).boxed()))
}

/// Rewrites the request target to the authorized path (keeping the query).
fn use_path(head: &mut http::request::Parts, path: &str) {
    if path.is_empty() {
        return;
    }
    let target = match head.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut uri = std::mem::take(&mut head.uri).into_parts();
    uri.path_and_query = target.parse().ok();
    if let Ok(new) = http::Uri::from_parts(uri) {
        head.uri = new;
    }
}
