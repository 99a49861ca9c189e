//! The inbound side: requests from peer gateways over the QUIC tunnel, each on its own
//! HTTP/3 stream, enforced and forwarded to a local service.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use meshgate_identity::SpiffeId;
use meshgate_policy::RequestFacts;

use crate::body::{self, GatewayBody};
use crate::caller::{self, CALLER_TOKEN_HEADER};
use crate::dest::Resolver;
use crate::enforce::{Enforced, RequestMeta, Verdict};
use crate::gateway::Shared;
use crate::headers::{self, CALLER_HEADER};
use crate::metrics::{DirectionLabels, RequestLabels};
use crate::respond;
use crate::tunnel;

type ServerStream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Largest control request body from a peer (`/.meshgate/`).
const MAX_CONTROL_BODY: usize = 4 * 1024 * 1024;

/// Accepts peer connections until the endpoint closes.
pub(crate) async fn serve(shared: Arc<Shared>) {
    while let Some(incoming) = shared.tunnel.endpoint().accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_connection(shared, conn).await,
                Err(e) => {
                    shared
                        .metrics
                        .handshake_failed("tunnel", tunnel::reason_of(&e));
                    tracing::warn!(peer = %remote, error = %e, "peer gateway handshake failed");
                }
            }
        });
    }
}

async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    // The tunnel's client verifier admits only gateway IDs of known trust domains; read the
    // ID back and refuse anything else (defense in depth).
    let Some(peer) =
        tunnel::peer_id(&conn).filter(|id| *id == SpiffeId::gateway(id.trust_domain()))
    else {
        shared.metrics.handshake_failed("tunnel", "not_a_gateway");
        conn.close(
            quinn::VarInt::from_u32(0x101),
            b"peer is not a meshgate gateway",
        );
        return;
    };
    shared
        .tunnel
        .track(peer.trust_domain().clone(), conn.clone());
    tracing::info!(peer = %peer, addr = %remote, "peer gateway connected");
    let h3_conn = h3::server::builder()
        .max_field_section_size(shared.limits.max_header_bytes as u64)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn))
        .await;
    let mut h3_conn = match h3_conn {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(peer = %peer, error = %e, "HTTP/3 setup with peer failed");
            return;
        }
    };
    loop {
        match h3_conn.accept().await {
            Ok(Some(resolver)) => {
                let shared = shared.clone();
                let peer = peer.clone();
                tokio::spawn(async move {
                    shared.metrics.quic_streams.inc();
                    match resolver.resolve_request().await {
                        Ok((req, stream)) => handle(&shared, &peer, req, stream).await,
                        Err(e) => tracing::debug!(peer = %peer, error = %e, "bad request stream"),
                    }
                    shared.metrics.quic_streams.dec();
                });
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(peer = %peer, error = %e, "peer connection ended");
                break;
            }
        }
    }
}

async fn handle(shared: &Shared, peer: &SpiffeId, req: Request<()>, stream: ServerStream) {
    let started = Instant::now();
    let _in_flight = shared.begin();
    if req.uri().path().starts_with("/.meshgate/") {
        return control(shared, peer, req, stream).await;
    }
    let (mut send, recv) = stream.split();
    let (parts, ()) = req.into_parts();
    let (tx, req_body) = body::channel();
    let pump = tokio::spawn(body::h3_to_channel(recv, tx));
    let is_connect = parts.method == Method::CONNECT;
    let (response, labels) = enforce_and_forward(shared, peer, parts, req_body).await;
    shared
        .metrics
        .latency
        .get_or_create(&DirectionLabels {
            direction: "inbound",
        })
        .observe(started.elapsed().as_secs_f64());
    shared.metrics.requests.get_or_create(&labels).inc();
    let (parts, resp_body) = response.into_parts();
    if let Err(e) = send.send_response(Response::from_parts(parts, ())).await {
        tracing::debug!(error = %e, "could not send response head to peer");
        pump.abort();
        return;
    }
    if let Err(e) = body::body_to_h3(resp_body, &mut send).await {
        tracing::debug!(error = %e, "response body to peer ended early");
    }
    if !is_connect {
        let _ = pump.await;
    } else {
        pump.abort();
    }
}

/// Steps for one request from a peer gateway: the peer is authenticated (TLS, gateway ID);
/// then the destination, the caller's token, the decision, the quota and the record.
async fn enforce_and_forward(
    shared: &Shared,
    peer: &SpiffeId,
    parts: http::request::Parts,
    req_body: GatewayBody,
) -> (Response<GatewayBody>, RequestLabels) {
    let mut parts = parts;
    let now = SystemTime::now();
    let peer_td = peer.trust_domain();
    let trace_id = headers::ensure_traceparent(&mut parts.headers);
    let meta = RequestMeta {
        request_id: headers::new_request_id(),
        trace_id,
        source_gateway: peer.to_string(),
    };
    let authority = parts.uri.authority().map(|a| a.as_str().to_owned());
    let dest = authority.as_deref().and_then(Resolver::canonical);
    let service = dest
        .as_ref()
        .map_or_else(|| authority.clone().unwrap_or_default(), |d| d.to_string());
    let token = parts
        .headers
        .get(CALLER_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut facts = shared.facts(
        &parts,
        "unknown",
        &service,
        shared.catalog.cluster_of(peer_td).unwrap_or_default(),
        now,
    );
    let mut labels = RequestLabels {
        direction: "inbound",
        source: peer_td.to_string(),
        destination: service.clone(),
        decision: "deny",
        status: 403,
    };

    if let Err(e) = headers::check_values(&parts.headers) {
        let enforced = shared.enforcer.refuse(&facts, &meta, e).await;
        return finish(enforced, None, labels, StatusCode::BAD_REQUEST);
    }
    // A control path in disguise (`//.meshgate/…`) is never forwarded to a service.
    if headers::is_reserved_path(parts.uri.path()) {
        let reason = "`/.meshgate/` paths are reserved for gateways".to_owned();
        let enforced = shared.enforcer.refuse(&facts, &meta, reason).await;
        return finish(enforced, None, labels, StatusCode::FORBIDDEN);
    }
    // The destination must be a service of this cluster, exported to the peer's cluster.
    let dest = match dest {
        Some(d)
            if d.cluster.as_deref() == Some(shared.cluster.as_str())
                && shared.upstreams.get(&d.short()).is_some() =>
        {
            d
        }
        _ => {
            let reason = format!(
                "`{service}` is not a service of cluster `{}`",
                shared.cluster
            );
            let enforced = shared.enforcer.refuse(&facts, &meta, reason).await;
            labels.decision = "unknown_destination";
            return finish(enforced, None, labels, StatusCode::NOT_FOUND);
        }
    };
    if !shared
        .catalog
        .exported_to(&dest.service, &dest.namespace, peer_td)
    {
        let reason = format!("`{}` is not exported to `{peer_td}`", dest.short());
        let enforced = shared.enforcer.refuse(&facts, &meta, reason).await;
        return finish(enforced, None, labels, StatusCode::FORBIDDEN);
    }
    // The caller: a JWT-SVID from the peer's own trust domain, for this service.
    let aud = caller::audience(&shared.trust_domain, &dest.namespace, &dest.service);
    let caller = match shared.callers.verify(peer_td, token.as_deref(), &aud, now) {
        Ok(caller) => caller,
        Err(e) => {
            let enforced = shared.enforcer.refuse(&facts, &meta, e.to_string()).await;
            labels.decision = "unauthenticated";
            return finish(enforced, None, labels, StatusCode::FORBIDDEN);
        }
    };
    facts.caller = caller.id.to_string();
    // Whether the caller used mTLS at its gateway: signed in its token (`amr`), never a header.
    facts.mtls = caller.mtls;
    let caller = caller.id;
    // Decide, charge, record.
    let enforced = shared.enforcer.enforce(&facts, &meta).await;
    if enforced.verdict != Verdict::Allow {
        return finish(enforced, None, labels, StatusCode::FORBIDDEN);
    }
    // Forward with the verified identity, to the path that was authorized.
    crate::enforce::use_normalized_path(&mut parts, &enforced.normalized_path);
    headers::strip_meshgate(&mut parts.headers);
    headers::strip_hop_by_hop(&mut parts.headers);
    if let Ok(v) = http::HeaderValue::from_str(caller.as_str()) {
        parts.headers.insert(CALLER_HEADER, v);
    }
    let upstream = match shared.upstreams.get(&dest.short()) {
        Some(u) => u.clone(),
        None => return finish(enforced, None, labels, StatusCode::NOT_FOUND),
    };
    labels.decision = "allow";
    if parts.method == Method::CONNECT {
        let response = crate::connect::inbound(&upstream, req_body).await;
        return finish(enforced, Some(response), labels, StatusCode::OK);
    }
    let response = match upstream.forward(Request::from_parts(parts, req_body)).await {
        Ok(resp) => resp.map(|b| b.map_err(Into::into).boxed()),
        Err(e) => {
            shared.metrics.upstream_failures.inc();
            tracing::warn!(service = %dest, error = %e, "upstream failed");
            respond::error(StatusCode::BAD_GATEWAY, &e.to_string())
        }
    };
    finish(enforced, Some(response), labels, StatusCode::OK)
}

/// Turns a verdict (and the upstream's response when allowed) into the response to the peer.
fn finish(
    enforced: Enforced,
    upstream: Option<Response<GatewayBody>>,
    mut labels: RequestLabels,
    refusal_status: StatusCode,
) -> (Response<GatewayBody>, RequestLabels) {
    let mut response = match (&enforced.verdict, upstream) {
        (Verdict::Allow, Some(mut resp)) => {
            headers::strip_hop_by_hop(resp.headers_mut());
            headers::strip_meshgate(resp.headers_mut());
            resp
        }
        (verdict, _) => respond::refusal(verdict, refusal_status),
    };
    labels.decision = match (&enforced.verdict, labels.decision) {
        (Verdict::Allow, d) => d,
        (Verdict::Deny(_), d) if d != "allow" => d,
        (Verdict::Deny(_), _) => "deny",
        (Verdict::QuotaExceeded(_), _) => "quota_exceeded",
        (Verdict::Error(_), _) => "error",
    };
    labels.status = response.status().as_u16();
    respond::set_decision_id(&mut response, &enforced.decision_id);
    (response, labels)
}

async fn control(shared: &Shared, peer: &SpiffeId, req: Request<()>, stream: ServerStream) {
    let (mut send, mut recv) = stream.split();
    let mut body = Vec::new();
    let mut too_large = false;
    loop {
        match body::H3Recv::recv_data(&mut recv).await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_CONTROL_BODY {
                    too_large = true;
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(peer = %peer, error = %e, "control request body failed");
                return;
            }
        }
    }
    let response = match (&shared.control, too_large) {
        (_, true) => Response::builder()
            .status(StatusCode::PAYLOAD_TOO_LARGE)
            .body(Bytes::from_static(b"control body too large")),
        (Some(handler), false) => Ok(handler.handle(peer, req.map(|()| Bytes::from(body))).await),
        (None, false) => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Bytes::from_static(b"no control handler")),
    };
    let Ok(response) = response else { return };
    let (parts, bytes) = response.into_parts();
    if send
        .send_response(Response::from_parts(parts, ()))
        .await
        .is_ok()
    {
        let _ = body::body_to_h3(body::full(bytes), &mut send).await;
    }
}

impl Shared {
    /// Request facts common to both sides; the caller is filled in once verified.
    pub(crate) fn facts(
        &self,
        parts: &http::request::Parts,
        caller: &str,
        service: &str,
        source_cluster: String,
        now: SystemTime,
    ) -> RequestFacts {
        let labels = Resolver::canonical(service)
            .and_then(|d| self.service_labels.get(&d.short()).cloned())
            .unwrap_or_default();
        RequestFacts {
            caller: caller.to_owned(),
            service: service.to_owned(),
            destination_trust_domain: self.trust_domain.to_string(),
            method: parts.method.as_str().to_owned(),
            raw_path: parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned(),
            headers: headers::policy_headers(&parts.headers),
            source_cluster,
            destination_cluster: self.cluster.clone(),
            // Set by each side from how the caller authenticated; false until known.
            mtls: false,
            time: now,
            claims: None,
            service_labels: labels,
        }
    }
}
