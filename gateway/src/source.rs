//! The outbound side: the listeners local workloads call. A caller authenticates (X.509-SVID
//! over mTLS, or a JWT-SVID bearer token on the loopback-only listener), names a destination
//! (proxy absolute-form URI, `CONNECT`, or `Host`/`:authority`), and the request goes to the
//! local upstream (enforced here) or through the tunnel to the destination's gateway
//! (enforced there). Refusals made here are recorded in this gateway's own log.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshgate_identity::SpiffeId;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::body::{self, GatewayBody};
use crate::caller::{self, CALLER_TOKEN_HEADER};
use crate::catalog::{PeerRoute, Route};
use crate::dest::Destination;
use crate::enforce::{RequestMeta, Verdict};
use crate::gateway::Shared;
use crate::headers::{self, CALLER_HEADER};
use crate::metrics::{DirectionLabels, RequestLabels};
use crate::respond;

/// An authenticated caller and whether it used mTLS (its X.509-SVID) to do so.
#[derive(Debug, Clone)]
struct Caller {
    id: SpiffeId,
    mtls: bool,
}

/// How a workload connection authenticated.
#[derive(Debug, Clone)]
enum Auth {
    /// mTLS with an X.509-SVID of the local trust domain.
    Svid(SpiffeId),
    /// The loopback plaintext listener: the caller must send a JWT-SVID bearer token.
    BearerRequired,
    /// TLS without a client certificate.
    None,
}

/// Serves the mTLS workload listener.
pub(crate) async fn serve_tls(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(shared.limits.max_connections));
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
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let handshake =
                tokio::time::timeout(shared.limits.header_read_timeout, acceptor.accept(tcp)).await;
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    shared
                        .metrics
                        .handshake_failed("workload", handshake_reason(&e));
                    tracing::debug!(peer = %remote, error = %e, "workload TLS handshake failed");
                    return;
                }
                Err(_) => {
                    shared.metrics.handshake_failed("workload", "timeout");
                    return;
                }
            };
            let auth = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| meshgate_identity::peer_spiffe_id(certs).ok())
                .map_or(Auth::None, Auth::Svid);
            serve_connection(shared, TokioIo::new(tls), remote, auth).await;
        });
    }
}

/// Serves the loopback-only plaintext listener (HTTP/1.1 and h2c, JWT-SVID bearer auth).
pub(crate) async fn serve_local(shared: Arc<Shared>, listener: TcpListener) {
    let permits = Arc::new(Semaphore::new(shared.limits.max_connections));
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
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            serve_connection(shared, TokioIo::new(tcp), remote, Auth::BearerRequired).await;
        });
    }
}

async fn serve_connection<I>(shared: Arc<Shared>, io: I, remote: SocketAddr, auth: Auth)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.header_read_timeout)
        .max_buf_size(shared.limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(shared.limits.max_concurrent_streams)
        .max_pending_accept_reset_streams(shared.limits.max_pending_resets)
        .max_header_list_size(u32::try_from(shared.limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(shared.limits.idle_timeout / 2)
        .keep_alive_timeout(shared.limits.header_read_timeout);
    // A connection without a client certificate can only ever be told 401: it gets one
    // header-read timeout to hear it, then it is closed, so it cannot hold a permit.
    let deadline = match auth {
        Auth::None => shared.limits.header_read_timeout,
        _ => std::time::Duration::MAX,
    };
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let auth = auth.clone();
        async move { Ok::<_, Infallible>(handle(&shared, req, &auth).await) }
    });
    let conn = builder.serve_connection_with_upgrades(io, service);
    match tokio::time::timeout(deadline, conn).await {
        Ok(Err(e)) => {
            tracing::debug!(peer = %remote, error = %e, "workload connection ended with an error")
        }
        Ok(Ok(())) => {}
        Err(_) => tracing::debug!(peer = %remote, "unauthenticated connection closed"),
    }
}

async fn handle(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    auth: &Auth,
) -> Response<GatewayBody> {
    let started = Instant::now();
    let _in_flight = shared.begin();
    let version = req.version();
    let (mut response, labels) = route(shared, req, auth).await;
    // Responses from the tunnel say HTTP/3; the workload gets its own protocol version.
    *response.version_mut() = version;
    shared
        .metrics
        .latency
        .get_or_create(&DirectionLabels {
            direction: "outbound",
        })
        .observe(started.elapsed().as_secs_f64());
    shared.metrics.requests.get_or_create(&labels).inc();
    tracing::info!(
        target: "meshgate::access",
        source = %labels.source,
        destination = %labels.destination,
        decision = labels.decision,
        status = labels.status,
        micros = started.elapsed().as_micros() as u64,
        "request"
    );
    response
}

/// The outbound sequence: framing → caller → destination → local enforcement or tunnel.
async fn route(
    shared: &Arc<Shared>,
    mut req: Request<Incoming>,
    auth: &Auth,
) -> (Response<GatewayBody>, RequestLabels) {
    let now = SystemTime::now();
    // CONNECT: the bytes come from the upgraded connection once we answer 200; until then
    // the tunnel's request body is a channel that the relay feeds.
    let connect =
        (req.method() == Method::CONNECT).then(|| (hyper::upgrade::on(&mut req), body::channel()));
    let (mut parts, body) = req.into_parts();
    let mut labels = RequestLabels {
        direction: "outbound",
        source: String::from("unknown"),
        destination: String::from("unknown"),
        decision: "deny",
        status: 400,
    };
    if let Err(e) = headers::check_framing(&parts.headers) {
        return (
            respond::error(StatusCode::BAD_REQUEST, &format!("meshgate: {e}")),
            labels,
        );
    }
    if let Err(e) = headers::check_values(&parts.headers) {
        return (
            respond::error(StatusCode::BAD_REQUEST, &format!("meshgate: {e}")),
            labels,
        );
    }
    let authority = parts.uri.authority().map(|a| a.to_string()).or_else(|| {
        parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
    });
    let bearer = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::to_owned);
    // Identity headers and hop-by-hop headers never pass the source gateway.
    headers::strip_meshgate(&mut parts.headers);
    let trace_id = headers::ensure_traceparent(&mut parts.headers);
    let meta = RequestMeta {
        request_id: headers::new_request_id(),
        trace_id,
        source_gateway: shared.id.to_string(),
    };
    let service_hint = authority.clone().unwrap_or_default();
    let mut facts = shared.facts(
        &parts,
        "unauthenticated",
        &service_hint,
        shared.cluster.clone(),
        now,
    );

    // 1. The caller.
    let caller = match authenticate(shared, auth, bearer.as_deref(), now) {
        // Only a caller that presented its X.509-SVID counts as mTLS for policies.
        Ok(id) => Caller {
            id,
            mtls: matches!(auth, Auth::Svid(_)),
        },
        Err(reason) => {
            labels.decision = "unauthenticated";
            let refusal = Refusal::Deny(StatusCode::UNAUTHORIZED, "unauthenticated: ");
            return refuse_here(shared, &facts, &meta, labels, refusal, reason).await;
        }
    };
    facts.caller = caller.id.to_string();
    facts.mtls = caller.mtls;
    labels.source = caller.id.trust_domain().to_string();
    if bearer.is_some() && matches!(auth, Auth::BearerRequired) {
        parts.headers.remove(http::header::AUTHORIZATION);
    }

    // Reserved control paths never travel from a workload (CONTRACTS.md).
    if headers::is_reserved_path(parts.uri.path()) {
        labels.decision = "deny";
        let reason = "`/.meshgate/` paths are reserved for gateways".to_owned();
        let refusal = Refusal::Deny(StatusCode::FORBIDDEN, "");
        return refuse_here(shared, &facts, &meta, labels, refusal, reason).await;
    }

    // 2. The destination.
    let routes = match shared.resolver.resolve(authority.as_deref()) {
        Ok(dest) => {
            let routes = shared.catalog.routes(&dest);
            if routes.is_empty() {
                Err(format!(
                    "no cluster serves `{dest}` to `{}`",
                    shared.cluster
                ))
            } else {
                Ok((dest, routes))
            }
        }
        Err(e) => Err(e.to_string()),
    };
    let (dest, routes) = match routes {
        Ok(r) => r,
        Err(reason) => {
            labels.decision = "unknown_destination";
            let refusal = Refusal::Deny(StatusCode::NOT_FOUND, "unknown destination: ");
            return refuse_here(shared, &facts, &meta, labels, refusal, reason).await;
        }
    };
    headers::strip_hop_by_hop(&mut parts.headers);

    // 3. Local upstream, or the tunnel with failover over the candidate clusters.
    let (connect, request_body) = match connect {
        Some((upgrade, (tx, rx))) => (Some((upgrade, tx)), rx),
        None => (None, body.map_err(Into::into).boxed()),
    };
    let mut last_error = String::new();
    let mut body = Some(request_body);
    for route in routes {
        let response = match route {
            Route::Local => {
                labels.destination = dest.in_cluster(&shared.cluster);
                local(
                    shared,
                    &caller,
                    &dest,
                    &meta,
                    &mut parts,
                    body.take().unwrap_or_else(body::empty),
                    now,
                )
                .await
            }
            Route::Peer(peer) => {
                labels.destination = dest.in_cluster(&peer.cluster);
                // Only a request whose body was not consumed can fail over.
                let Some(b) = body.take() else { break };
                match remote(shared, &caller, &dest, &peer, &parts, b, now).await {
                    Ok(resp) => resp,
                    Err((e, b)) => {
                        tracing::warn!(cluster = %peer.cluster, error = %e, "peer unreachable; trying the next cluster");
                        last_error = e;
                        body = b;
                        continue;
                    }
                }
            }
        };
        labels.status = response.status().as_u16();
        labels.decision = decision_label(response.status());
        let response = match connect {
            Some((upgrade, to_dest)) if response.status().is_success() => {
                tunnel_connect(upgrade, response, to_dest)
            }
            _ => response,
        };
        return (response, labels);
    }
    labels.decision = "error";
    let reason = format!("no reachable gateway for `{dest}`: {last_error}");
    refuse_here(shared, &facts, &meta, labels, Refusal::Failure, reason).await
}

/// What kind of refusal the source gateway makes itself.
enum Refusal {
    /// Denied: answered with this status, the message prefixed.
    Deny(StatusCode, &'static str),
    /// An internal failure (no reachable peer): 503.
    Failure,
}

/// A refusal made at the source, before any route: recorded in this gateway's own log and
/// answered with its decision id. If the record cannot be written, the answer says so (503).
async fn refuse_here(
    shared: &Shared,
    facts: &meshgate_policy::RequestFacts,
    meta: &RequestMeta,
    mut labels: RequestLabels,
    refusal: Refusal,
    reason: String,
) -> (Response<GatewayBody>, RequestLabels) {
    let (enforced, status, prefix) = match refusal {
        Refusal::Deny(status, prefix) => (
            shared.enforcer.refuse(facts, meta, reason.clone()).await,
            status,
            prefix,
        ),
        Refusal::Failure => (
            shared.enforcer.fail(facts, meta, reason.clone()).await,
            StatusCode::SERVICE_UNAVAILABLE,
            "",
        ),
    };
    let mut resp = match &enforced.verdict {
        // The refusal itself could not be recorded: say that (503), not the refusal.
        Verdict::Error(e) if *e != reason => respond::refusal(&enforced.verdict, status),
        _ => respond::error(status, &format!("meshgate: {prefix}{reason}")),
    };
    respond::set_decision_id(&mut resp, &enforced.decision_id);
    labels.status = resp.status().as_u16();
    (resp, labels)
}

fn authenticate(
    shared: &Shared,
    auth: &Auth,
    bearer: Option<&str>,
    now: SystemTime,
) -> Result<SpiffeId, String> {
    match auth {
        Auth::Svid(id) if id.trust_domain() == &shared.trust_domain => Ok(id.clone()),
        Auth::Svid(id) => Err(format!(
            "`{id}` is not in trust domain `{}`",
            shared.trust_domain
        )),
        Auth::None => Err(format!(
            "present an X.509-SVID of trust domain `{}` as client certificate",
            shared.trust_domain
        )),
        Auth::BearerRequired => {
            let token = bearer.ok_or("send a JWT-SVID as `authorization: Bearer <token>`")?;
            let aud = shared.id.to_string();
            let claims = meshgate_identity::verify_jwt_svid(
                token,
                &shared.local_bundles,
                &aud,
                now,
                shared.jwt_leeway,
            )
            .map_err(|e| format!("bearer token rejected: {e}"))?;
            Ok(claims.sub)
        }
    }
}

/// A destination served by this cluster: enforce here, forward to the upstream.
async fn local(
    shared: &Shared,
    caller: &Caller,
    dest: &Destination,
    meta: &RequestMeta,
    parts: &mut http::request::Parts,
    body: GatewayBody,
    now: SystemTime,
) -> Response<GatewayBody> {
    let service = dest.in_cluster(&shared.cluster);
    let mut facts = shared.facts(
        parts,
        caller.id.as_str(),
        &service,
        shared.cluster.clone(),
        now,
    );
    facts.mtls = caller.mtls;
    let enforced = shared.enforcer.enforce(&facts, meta).await;
    let mut response = match (&enforced.verdict, shared.upstreams.get(&dest.short())) {
        (Verdict::Allow, Some(upstream)) => {
            crate::enforce::use_normalized_path(parts, &enforced.normalized_path);
            if let Ok(v) = HeaderValue::from_str(caller.id.as_str()) {
                parts.headers.insert(CALLER_HEADER, v);
            }
            if parts.method == Method::CONNECT {
                crate::connect::inbound(upstream, body).await
            } else {
                match upstream
                    .forward(Request::from_parts(parts.clone(), body))
                    .await
                {
                    Ok(resp) => {
                        let mut resp = resp.map(|b| b.map_err(Into::into).boxed());
                        headers::strip_hop_by_hop(resp.headers_mut());
                        headers::strip_meshgate(resp.headers_mut());
                        resp
                    }
                    Err(e) => {
                        shared.metrics.upstream_failures.inc();
                        respond::error(StatusCode::BAD_GATEWAY, &format!("meshgate: {e}"))
                    }
                }
            }
        }
        (Verdict::Allow, None) => respond::error(
            StatusCode::NOT_FOUND,
            "meshgate: service has no upstream here",
        ),
        (verdict, _) => respond::refusal(verdict, StatusCode::FORBIDDEN),
    };
    respond::set_decision_id(&mut response, &enforced.decision_id);
    response
}

type Retry = (String, Option<GatewayBody>);

/// A destination in a peer cluster: attach the caller's JWT-SVID and send it through the
/// tunnel. Connection failures hand the body back so the next cluster can be tried.
async fn remote(
    shared: &Shared,
    caller: &Caller,
    dest: &Destination,
    peer: &PeerRoute,
    parts: &http::request::Parts,
    body: GatewayBody,
    now: SystemTime,
) -> Result<Response<GatewayBody>, Retry> {
    let aud = caller::audience(&peer.trust_domain, &dest.namespace, &dest.service);
    let token = match shared.tokens.token(&caller.id, &aud, caller.mtls, now) {
        Ok(t) => t,
        // Recorded by the caller of `remote` when no other route works.
        Err(e) => return Err((format!("cannot mint the caller token: {e}"), Some(body))),
    };
    let authority = dest.in_cluster(&peer.cluster);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = if parts.method == Method::CONNECT {
        authority.clone()
    } else {
        format!("https://{authority}{path}")
    };
    let mut builder = Request::builder().method(parts.method.clone()).uri(uri);
    if let Some(h) = builder.headers_mut() {
        *h = parts.headers.clone();
        h.remove(http::header::HOST);
        if let Ok(v) = HeaderValue::from_str(&token) {
            h.insert(CALLER_TOKEN_HEADER, v);
        }
    }
    let request = match builder.body(()) {
        Ok(r) => r,
        Err(e) => {
            return Ok(respond::error(
                StatusCode::BAD_REQUEST,
                &format!("meshgate: {e}"),
            ));
        }
    };
    // A request that can be sent again (idempotent, no body) fails over to the next
    // gateway when a peer breaks before answering; any other is tied to its first stream.
    let resend = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    ) && hyper::body::Body::is_end_stream(&body);
    let mut body = Some(body);
    let mut last = String::new();
    for gw in &peer.gateways {
        let stream = match shared
            .tunnel
            .open_stream(*gw, &peer.trust_domain, request.clone())
            .await
        {
            Ok(stream) => stream,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let sent = if resend {
            body::empty()
        } else {
            body.take().unwrap_or_else(body::empty)
        };
        match exchange(stream, sent, shared.limits.tunnel_timeout).await {
            Ok(response) => return Ok(response),
            Err(Broken::Timeout(response)) => return Ok(response),
            Err(Broken::BeforeAnswer(e)) if resend => {
                tracing::warn!(peer = %gw, error = %e, "peer gateway failed before answering; failing over");
                last = e;
            }
            Err(Broken::BeforeAnswer(e)) => {
                return Ok(respond::error(
                    StatusCode::BAD_GATEWAY,
                    &format!("meshgate: peer gateway failed: {e}"),
                ));
            }
        }
    }
    Err((last, body))
}

/// How a tunnel exchange broke before the peer's answer.
enum Broken {
    /// The stream or connection failed (e.g. the peer refused our certificate).
    BeforeAnswer(String),
    /// No answer in time: answered 504; never retried (the peer may have acted on it).
    Timeout(Response<GatewayBody>),
}

/// Sends the request body on a tunnel stream and returns the streamed response.
async fn exchange(
    stream: crate::tunnel::ClientStream,
    body: GatewayBody,
    timeout: std::time::Duration,
) -> Result<Response<GatewayBody>, Broken> {
    let (mut send, mut recv) = stream.split();
    tokio::spawn(async move {
        if let Err(e) = body::body_to_h3(body, &mut send).await {
            tracing::debug!(error = %e, "request body to peer ended early");
        }
    });
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
    let (tx, resp_body) = body::channel();
    tokio::spawn(body::h3_to_channel(recv, tx));
    let (parts, ()) = head.into_parts();
    Ok(Response::from_parts(parts, resp_body))
}

/// For an allowed `CONNECT`: answer 200 to the workload, then relay its upgraded connection:
/// its bytes into `to_dest` (the tunnel's request body), the destination's bytes back.
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
