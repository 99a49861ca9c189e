//! The source side: the listeners local workloads call. A caller authenticates (X.509-SVID
//! over mTLS, or a JWT-SVID bearer token on the loopback-only listener), names a destination
//! (proxy absolute-form URI, `CONNECT`, or `Host`/`:authority`), and is admitted: a local
//! service is decided here; a service in another cluster is relayed to its gateway, which
//! decides. Refusals made here are recorded in this gateway's own log.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshgate_identity::{BundleSet, SpiffeId, TrustDomain};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::admission::{Admission, Ask, Caller, Hop, Now, RequestMeta, Target, Unfit};
use crate::body::{self, GatewayBody};
use crate::catalog::{Catalog, Route};
use crate::config::Limits;
use crate::dest::{Destination, Resolver};
use crate::forward::{Forwarded, Forwarder, Tries, Unreachable};
use crate::gateway::InFlight;
use crate::headers;
use crate::metrics::{Metrics, RequestLabels, Stage};
use crate::respond;
use crate::telemetry::{self, Spans, Telemetry};
use crate::traffic::{self, Steer, Traffic};
use crate::upstream::LocalServices;

/// How a workload connection authenticated.
#[derive(Debug, Clone)]
enum Auth {
    /// mTLS with an X.509-SVID.
    Svid(SpiffeId),
    /// The loopback plaintext listener: the caller must send a JWT-SVID bearer token.
    BearerRequired,
    /// TLS without a client certificate.
    None,
}

/// What the workload listeners need.
#[derive(Debug)]
pub(crate) struct Source {
    pub cluster: String,
    pub trust_domain: TrustDomain,
    pub id: SpiffeId,
    pub admission: Arc<Admission>,
    pub forwarder: Arc<Forwarder>,
    pub resolver: Resolver,
    pub catalog: Arc<dyn Catalog>,
    pub services: Arc<LocalServices>,
    /// This trust domain's bundle, for bearer JWT-SVIDs.
    pub local_bundles: BundleSet,
    pub jwt_leeway: std::time::Duration,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub in_flight: Arc<InFlight>,
    /// Traffic routes.
    pub traffic: Arc<Traffic>,
    /// Mirror copies in flight (past the limit, copies are skipped, never queued).
    pub mirrors: Arc<Semaphore>,
    /// Span export, when traces are on.
    pub telemetry: Option<Arc<Telemetry>>,
}

/// Serves the mTLS workload listener.
pub(crate) async fn serve_tls(
    ctx: Arc<Source>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(ctx.limits.max_connections));
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "workload accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(peer = %remote, "connection limit reached; closing new connection");
            continue;
        };
        let ctx = ctx.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let handshake =
                tokio::time::timeout(ctx.limits.header_read_timeout, acceptor.accept(tcp)).await;
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    ctx.metrics
                        .handshake_failed("workload", handshake_reason(&e));
                    tracing::debug!(peer = %remote, error = %e, "workload TLS handshake failed");
                    return;
                }
                Err(_) => {
                    ctx.metrics.handshake_failed("workload", "timeout");
                    return;
                }
            };
            let auth = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| meshgate_identity::peer_spiffe_id(certs).ok())
                .map_or(Auth::None, Auth::Svid);
            serve_connection(ctx, TokioIo::new(tls), remote, auth).await;
        });
    }
}

/// Serves the loopback-only plaintext listener (HTTP/1.1 and h2c, JWT-SVID bearer auth).
pub(crate) async fn serve_local(ctx: Arc<Source>, listener: TcpListener) {
    let permits = Arc::new(Semaphore::new(ctx.limits.max_connections));
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "local workload accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        if !remote.ip().is_loopback() {
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            serve_connection(ctx, TokioIo::new(tcp), remote, Auth::BearerRequired).await;
        });
    }
}

async fn serve_connection<I>(ctx: Arc<Source>, io: I, remote: SocketAddr, auth: Auth)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.limits.header_read_timeout)
        .max_buf_size(ctx.limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(ctx.limits.max_concurrent_streams)
        .max_pending_accept_reset_streams(ctx.limits.max_pending_resets)
        .max_header_list_size(u32::try_from(ctx.limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(ctx.limits.idle_timeout / 2)
        .keep_alive_timeout(ctx.limits.header_read_timeout);
    // A connection without a client certificate can only ever be told 401: it gets one
    // header-read timeout to hear it, then it is closed, so it cannot hold a permit.
    let deadline = match auth {
        Auth::None => ctx.limits.header_read_timeout,
        _ => std::time::Duration::MAX,
    };
    let caller = match &auth {
        Auth::Svid(id) => Some(id.clone()),
        _ => None,
    };
    let service = {
        let ctx = ctx.clone();
        hyper::service::service_fn(move |req| {
            let ctx = ctx.clone();
            let auth = auth.clone();
            async move { Ok::<_, Infallible>(handle(&ctx, req, &auth, remote).await) }
        })
    };
    let conn = builder.serve_connection_with_upgrades(io, service);
    match tokio::time::timeout(deadline, conn).await {
        Ok(Err(e)) => {
            tracing::debug!(peer = %remote, error = %e, "workload connection ended with an error");
            // Refused by hyper before a request existed: recorded like any refusal.
            if let Some(status) = unreadable_status(e.as_ref()) {
                let reason = format!("request refused by the HTTP layer: {e}");
                ctx.admission
                    .record_unreadable(remote.ip(), caller.as_ref(), status, reason)
                    .await;
            }
        }
        Ok(Ok(())) => {}
        Err(_) => tracing::debug!(peer = %remote, "unauthenticated connection closed"),
    }
}

/// The status hyper answered a request it could not parse with, if that is why the
/// connection ended (not a timeout, a reset or an I/O error).
fn unreadable_status(e: &(dyn std::error::Error + 'static)) -> Option<http::StatusCode> {
    let e = e.downcast_ref::<hyper::Error>()?;
    if e.is_parse_too_large() {
        Some(http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
    } else if e.is_parse() {
        Some(http::StatusCode::BAD_REQUEST)
    } else {
        None
    }
}

async fn handle(
    ctx: &Arc<Source>,
    req: Request<Incoming>,
    auth: &Auth,
    remote: SocketAddr,
) -> Response<GatewayBody> {
    let started = Instant::now();
    let _in_flight = ctx.in_flight.begin();
    let version = req.version();
    let mut spans = None;
    let (mut response, labels, routed) = exchange(ctx, req, auth, remote, &mut spans).await;
    // Responses from the tunnel say HTTP/3; the workload gets its own protocol version.
    *response.version_mut() = version;
    let (route, backend) = routed
        .as_ref()
        .map_or(("", ""), |(r, b)| (r.as_str(), b.as_str()));
    tracing::info!(
        target: "meshgate::access",
        source = %labels.source,
        destination = %labels.destination,
        decision = labels.decision,
        status = labels.status,
        route,
        backend,
        micros = started.elapsed().as_micros() as u64,
        "request"
    );
    if let (Some(telemetry), Some(spans)) = (&ctx.telemetry, spans) {
        telemetry.finish(
            spans,
            "meshgate source",
            span_attributes(&labels, &response, routed.as_ref()),
        );
    }
    if let Some((route, backend)) = routed {
        ctx.metrics
            .route_answered(route, backend, labels.status, started.elapsed());
    }
    ctx.metrics.observe(labels, started.elapsed());
    response
}

/// What a request's server span says: who called what, the decision and its record's id.
pub(crate) fn span_attributes(
    labels: &RequestLabels,
    response: &Response<GatewayBody>,
    routed: Option<&(String, String)>,
) -> Vec<opentelemetry::KeyValue> {
    use opentelemetry::KeyValue;
    let mut attributes = vec![
        KeyValue::new("meshgate.caller_trust_domain", labels.source.clone()),
        KeyValue::new("meshgate.service", labels.destination.clone()),
        KeyValue::new("meshgate.decision", labels.decision),
        KeyValue::new("http.response.status_code", i64::from(labels.status)),
    ];
    if let Some(id) = response
        .headers()
        .get(crate::headers::DECISION_ID_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        attributes.push(KeyValue::new("meshgate.decision_id", id.to_owned()));
    }
    if let Some((route, backend)) = routed {
        attributes.push(KeyValue::new("meshgate.route", route.clone()));
        attributes.push(KeyValue::new("meshgate.backend", backend.clone()));
    }
    attributes
}

/// One request from a workload, top to bottom: authenticate the caller, resolve the target
/// (through a traffic route, if one takes the request), admit, record, forward.
async fn exchange(
    ctx: &Arc<Source>,
    mut req: Request<Incoming>,
    auth: &Auth,
    remote: SocketAddr,
    spans: &mut Option<Spans>,
) -> (
    Response<GatewayBody>,
    RequestLabels,
    Option<(String, String)>,
) {
    let now = Now::current();
    // CONNECT: the bytes come from the upgraded connection once we answer 200.
    let upgrade = (req.method() == Method::CONNECT).then(|| hyper::upgrade::on(&mut req));
    let (mut head, body) = req.into_parts();
    let authority = head.uri.authority().map(|a| a.to_string()).or_else(|| {
        head.headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
    });
    let bearer = bearer_token(&head.headers);
    // Identity headers never pass the source gateway.
    headers::strip_meshgate(&mut head.headers);
    // Traces first: a trace the caller did not start is started (and sampled) there.
    *spans = ctx.telemetry.as_ref().map(|t| t.begin(&mut head.headers));
    let mut meta = RequestMeta::new(&mut head.headers);
    meta.source = Some(remote.ip());
    let mut clock = Instant::now();
    let mut lap = |stage| {
        let t = Instant::now();
        ctx.metrics.stage(stage, t - clock);
        clock = t;
    };
    let caller = ctx.authenticate(auth, bearer.as_deref(), now.wall);
    if bearer.is_some() && matches!(auth, Auth::BearerRequired) {
        head.headers.remove(http::header::AUTHORIZATION);
    }
    let steer = ctx.steer(authority.as_deref(), &head, caller.as_ref().ok());
    meta.traffic = steer.note();
    let Steer {
        target,
        route,
        subset,
        fault,
        mirror,
    } = steer;
    let routed = route
        .as_ref()
        .map(|(r, backend)| (r.name.clone(), backend.clone()));
    lap(Stage::SourceAuthenticate);
    let mut labels = RequestLabels::new(
        "outbound",
        caller
            .as_ref()
            .map_or("unknown", |c| c.id.trust_domain().as_str()),
    );
    labels.destination = match &target {
        Ok(Target::Local(svc)) => svc.in_cluster(&ctx.cluster),
        Ok(Target::Remote { dest, routes }) => routes
            .first()
            .map_or_else(|| dest.to_string(), |r| dest.in_cluster(&r.cluster)),
        Err(_) => "unknown".to_owned(),
    };
    let ask = Ask {
        meta: &meta,
        hop: Hop::Workload,
        head: &head,
        authority: authority.as_deref(),
        caller,
        target,
        fault: fault.as_ref(),
    };
    let admitting = spans.as_ref().map(|_| Instant::now());
    let decided = ctx.admission.admit(ask, now);
    lap(Stage::Admit);
    let recorded = ctx.admission.record(decided).await;
    lap(Stage::Record);
    if let (Some(spans), Some(admitting)) = (spans.as_mut(), admitting) {
        spans.admitted(admitting);
    }
    let permit = match recorded {
        Ok(permit) => permit,
        Err(refusal) => {
            labels.decision = refusal.label;
            let resp = respond::refusal(&refusal);
            labels.status = resp.status().as_u16();
            return (resp, labels, routed);
        }
    };
    headers::strip_hop_by_hop(&mut head.headers);
    if let (Target::Remote { .. }, Some(subset)) = (permit.target(), &subset)
        && let Ok(v) = HeaderValue::from_str(&subset.to_string())
    {
        head.headers.insert(traffic::SUBSET_HEADER, v);
    }
    let local_id =
        matches!(permit.target(), Target::Local(_)).then(|| permit.decision_id().to_owned());
    let (body, relay) = match upgrade {
        Some(upgrade) => {
            let (tx, rx) = body::channel();
            (rx, Some((upgrade, tx)))
        }
        None => match mirror.and_then(|(dest, backend)| {
            let route = routed.as_ref().map_or("", |(r, _)| r.as_str());
            let slot = ctx.mirror_slot(route, &backend)?;
            Some((route, slot, dest, backend))
        }) {
            Some((route, slot, dest, backend)) => match ctx.tee(route, &backend, &head, body).await
            {
                Ok((body, Some(copy))) => {
                    let caller = permit.caller().clone();
                    ctx.mirror(slot, route, caller, &head, copy, dest, backend);
                    (body, None)
                }
                Ok((body, None)) => (body, None),
                Err(mut resp) => {
                    if let Target::Local(_) = permit.target() {
                        respond::set_decision_id(&mut resp, permit.decision_id());
                    }
                    labels.status = resp.status().as_u16();
                    return (resp, labels, routed);
                }
            },
            None => (body.map_err(Into::into).boxed(), None),
        },
    };
    if let Some(delay) = permit.delay() {
        tokio::time::sleep(delay).await;
    }
    let route = route.as_ref().map(|(r, _)| r);
    let tries = route
        .and_then(|r| r.retry.as_ref())
        .map_or(Tries::Standard, Tries::Route);
    let hop = match permit.target() {
        Target::Local(_) => telemetry::Hop::Upstream,
        Target::Remote { .. } => telemetry::Hop::Tunnel,
    };
    let forwarding_since = spans.as_ref().map(|_| Instant::now());
    let forwarding = ctx.forwarder.forward(permit, head, body, tries);
    let forwarded = match route.and_then(|r| r.timeout.map(|t| (r, t))) {
        Some((r, limit)) => match tokio::time::timeout(limit, forwarding).await {
            Ok(forwarded) => forwarded,
            Err(_) => Forwarded::Answer(respond::error(
                StatusCode::GATEWAY_TIMEOUT,
                &format!(
                    "meshgate: no answer within route `{}`'s timeout of {limit:?}",
                    r.name
                ),
            )),
        },
        None => forwarding.await,
    };
    if let (Some(spans), Some(since)) = (spans.as_mut(), forwarding_since) {
        spans.forwarded(hop, since);
    }
    let mut response = match forwarded {
        Forwarded::Answer(resp) => resp,
        Forwarded::Unreachable(unreachable) => {
            let Unreachable {
                permit,
                head,
                reason,
            } = *unreachable;
            tracing::warn!(%reason, "no gateway of the destination reachable");
            let refusal = ctx.admission.fail(permit, &head, reason).await;
            labels.decision = refusal.label;
            let resp = respond::refusal(&refusal);
            labels.status = resp.status().as_u16();
            return (resp, labels, routed);
        }
    };
    if let Some(id) = local_id {
        respond::set_decision_id(&mut response, &id);
    }
    labels.status = response.status().as_u16();
    labels.decision = decision_label(response.status());
    let response = match relay {
        Some((upgrade, to_dest)) if response.status().is_success() => {
            tunnel_connect(upgrade, response, to_dest)
        }
        _ => response,
    };
    (response, labels, routed)
}

pub(crate) fn unknown(why: String) -> Unfit {
    Unfit::new(StatusCode::NOT_FOUND, "unknown_destination", why)
}

fn bearer_token(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::to_owned)
}

impl Source {
    /// The caller: an X.509-SVID of this trust domain, or a bearer JWT-SVID for this gateway.
    fn authenticate(
        &self,
        auth: &Auth,
        bearer: Option<&str>,
        now: SystemTime,
    ) -> Result<Caller, Unfit> {
        let unauthenticated =
            |why: String| Unfit::new(StatusCode::UNAUTHORIZED, "unauthenticated", why);
        match auth {
            Auth::Svid(id) if id.trust_domain() == &self.trust_domain => Ok(Caller {
                id: id.clone(),
                mtls: true,
            }),
            Auth::Svid(id) => Err(unauthenticated(format!(
                "`{id}` is not in trust domain `{}`",
                self.trust_domain
            ))),
            Auth::None => Err(unauthenticated(format!(
                "present an X.509-SVID of trust domain `{}` as client certificate",
                self.trust_domain
            ))),
            Auth::BearerRequired => {
                let token = bearer.ok_or_else(|| {
                    unauthenticated("send a JWT-SVID as `authorization: Bearer <token>`".to_owned())
                })?;
                let claims = meshgate_identity::verify_jwt_svid(
                    token,
                    &self.local_bundles,
                    self.id.as_str(),
                    now,
                    self.jwt_leeway,
                )
                .map_err(|e| unauthenticated(format!("bearer token rejected: {e}")))?;
                Ok(Caller {
                    id: claims.sub,
                    mtls: false,
                })
            }
        }
    }

    /// Where a request goes without a route: this cluster's service when it has one, else
    /// the peer clusters that serve it, best first.
    pub(crate) fn target(&self, dest: Destination) -> Result<Target, Unfit> {
        let routes = self.catalog.routes(&dest);
        if routes.iter().any(|r| matches!(r, Route::Local)) {
            return match self.services.get(&dest.short()) {
                Some(svc) => Ok(Target::Local(svc.clone())),
                None => Err(unknown(format!(
                    "`{dest}` has no upstream in cluster `{}`",
                    self.cluster
                ))),
            };
        }
        let peers: Vec<_> = routes
            .into_iter()
            .filter_map(|r| match r {
                Route::Peer(p) => Some(p),
                Route::Local => None,
            })
            .collect();
        if peers.is_empty() {
            return Err(unknown(format!(
                "no cluster serves `{dest}` to `{}`",
                self.cluster
            )));
        }
        Ok(Target::Remote {
            dest,
            routes: peers,
        })
    }
}

/// For an allowed `CONNECT`: answer 200 to the workload, then relay its upgraded connection:
/// its bytes into `to_dest` (the request body), the destination's bytes back.
fn tunnel_connect(
    upgrade: hyper::upgrade::OnUpgrade,
    response: Response<GatewayBody>,
    to_dest: body::BodySender,
) -> Response<GatewayBody> {
    let (parts, from_dest) = response.into_parts();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => crate::connect::relay(TokioIo::new(upgraded), from_dest, to_dest).await,
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    Response::from_parts(parts, body::empty())
}

fn decision_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "unauthenticated",
        403 => "deny",
        429 => "quota_exceeded",
        500..=599 => "error",
        _ => "allow",
    }
}

fn handshake_reason(e: &std::io::Error) -> &'static str {
    let text = e.to_string();
    if text.contains("expired") {
        "expired"
    } else if text.contains("UnknownIssuer") || text.contains("unknown issuer") {
        "unknown_issuer"
    } else if text.contains("certificate") || text.contains("Certificate") {
        "certificate"
    } else {
        "other"
    }
}
