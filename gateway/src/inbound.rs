//! The destination side: requests from peer gateways over the QUIC tunnel, each on its own
//! HTTP/3 stream, admitted here and forwarded to a local service.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use meshgate_identity::{SpiffeId, TrustDomain};
use meshgate_policy::TrafficNote;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::admission::{Admission, Ask, Hop, Now, RequestMeta, Target, Unfit};
use crate::body::{self, GatewayBody, H3Body};
use crate::caller::{
    self, CALLER_REF_HEADER, CALLER_TOKEN_HEADER, CallerError, ReceivedRefs, VerifiedCallers,
};
use crate::catalog::{Catalog, ControlHandler};
use crate::config::Limits;
use crate::dest::Resolver;
use crate::forward::{Forwarded, Forwarder, Tries};
use crate::gateway::InFlight;
use crate::metrics::{Metrics, RequestLabels, Stage};
use crate::respond;
use crate::telemetry::{self, Spans, Telemetry};
use crate::traffic::{MIRROR_HEADER, SUBSET_HEADER, Subset};
use crate::tunnel;
use crate::upstream::LocalServices;

type ServerStream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

/// Peer trust domains with a control-request counter; past it, idle counters are dropped.
const MAX_CONTROL_PEERS: usize = 4096;

/// What the tunnel listener needs.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub cluster: String,
    pub trust_domain: TrustDomain,
    pub admission: Arc<Admission>,
    pub forwarder: Arc<Forwarder>,
    pub services: Arc<LocalServices>,
    pub catalog: Arc<dyn Catalog>,
    pub control: Option<Arc<dyn ControlHandler>>,
    pub callers: VerifiedCallers,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub in_flight: Arc<InFlight>,
    /// Control requests in progress per peer trust domain.
    pub control_slots: ControlSlots,
    /// Span export, when traces are on.
    pub telemetry: Option<Arc<Telemetry>>,
}

/// Bounds the control requests each peer trust domain has in progress.
#[derive(Debug, Default)]
pub(crate) struct ControlSlots(std::sync::Mutex<HashMap<TrustDomain, Arc<Semaphore>>>);

impl ControlSlots {
    /// A slot for one control request of `td`, if fewer than `max` are in progress.
    fn try_take(&self, td: &TrustDomain, max: usize) -> Option<OwnedSemaphorePermit> {
        let semaphore = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if map.len() >= MAX_CONTROL_PEERS && !map.contains_key(td) {
                // Only counters nobody holds a slot of.
                map.retain(|_, s| Arc::strong_count(s) > 1);
            }
            map.entry(td.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(max)))
                .clone()
        };
        semaphore.try_acquire_owned().ok()
    }
}

/// One authenticated peer connection.
#[derive(Debug)]
struct Peer {
    id: SpiffeId,
    cluster: Option<String>,
    refs: ReceivedRefs,
}

/// Accepts peer connections until the endpoint closes.
pub(crate) async fn serve(ctx: Arc<Inbound>) {
    let endpoint = ctx.forwarder.tunnel().endpoint().clone();
    while let Some(incoming) = endpoint.accept().await {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_connection(ctx, conn).await,
                Err(e) => {
                    ctx.metrics
                        .handshake_failed("tunnel", tunnel::reason_of(&e));
                    tracing::warn!(peer = %remote, error = %e, "peer gateway handshake failed");
                }
            }
        });
    }
}

async fn serve_connection(ctx: Arc<Inbound>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    // The tunnel's client verifier admits only gateway IDs of known trust domains; read the
    // ID back and refuse anything else (defense in depth).
    let Some(id) = tunnel::peer_id(&conn).filter(|id| *id == SpiffeId::gateway(id.trust_domain()))
    else {
        ctx.metrics.handshake_failed("tunnel", "not_a_gateway");
        conn.close(
            quinn::VarInt::from_u32(0x101),
            b"peer is not a meshgate gateway",
        );
        return;
    };
    ctx.forwarder
        .tunnel()
        .track(id.trust_domain().clone(), conn.clone());
    tracing::info!(peer = %id, addr = %remote, "peer gateway connected");
    let h3_conn = h3::server::builder()
        .max_field_section_size(ctx.limits.max_header_bytes as u64)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn))
        .await;
    let mut h3_conn = match h3_conn {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(peer = %id, error = %e, "HTTP/3 setup with peer failed");
            return;
        }
    };
    let peer = Arc::new(Peer {
        cluster: ctx.catalog.cluster_of(id.trust_domain()),
        id,
        refs: ReceivedRefs::default(),
    });
    loop {
        match h3_conn.accept().await {
            Ok(Some(resolver)) => {
                let ctx = ctx.clone();
                let peer = peer.clone();
                tokio::spawn(async move {
                    ctx.metrics.quic_streams.inc();
                    match resolver.resolve_request().await {
                        Ok((req, stream)) => handle(&ctx, &peer, req, stream).await,
                        Err(e) => {
                            tracing::debug!(peer = %peer.id, error = %e, "bad request stream")
                        }
                    }
                    ctx.metrics.quic_streams.dec();
                });
            }
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(peer = %peer.id, error = %e, "peer connection ended");
                break;
            }
        }
    }
}

async fn handle(ctx: &Inbound, peer: &Peer, req: Request<()>, stream: ServerStream) {
    let started = std::time::Instant::now();
    let _in_flight = ctx.in_flight.begin();
    if req.uri().path().starts_with("/.meshgate/") {
        return control(ctx, peer, req, stream).await;
    }
    let (mut send, recv) = stream.split();
    let mut spans = None;
    let (response, labels) = exchange(ctx, peer, req, H3Body::new(recv).boxed(), &mut spans).await;
    if let (Some(telemetry), Some(spans)) = (&ctx.telemetry, spans) {
        telemetry.finish(
            spans,
            "meshgate destination",
            crate::source::span_attributes(&labels, &response, None),
        );
    }
    ctx.metrics.observe(labels, started.elapsed());
    let responding = std::time::Instant::now();
    let (parts, resp_body) = response.into_parts();
    if let Err(e) = send.send_response(Response::from_parts(parts, ())).await {
        tracing::debug!(error = %e, "could not send response head to peer");
        return;
    }
    if let Err(e) = body::body_to_h3(resp_body, &mut send).await {
        tracing::debug!(error = %e, "response body to peer ended early");
    }
    ctx.metrics.stage(Stage::DestRespond, responding.elapsed());
}

/// One request from a peer gateway, top to bottom: the peer is authenticated (its gateway
/// SVID, by the connection); then the target, the caller, admission, the record, forwarding.
async fn exchange(
    ctx: &Inbound,
    peer: &Peer,
    req: Request<()>,
    body: GatewayBody,
    spans: &mut Option<Spans>,
) -> (Response<GatewayBody>, RequestLabels) {
    let now = Now::current();
    let (mut head, ()) = req.into_parts();
    let mut meta = RequestMeta::new(&mut head.headers);
    *spans = ctx.telemetry.as_ref().map(|t| t.begin(&mut head.headers));
    // What the source gateway's traffic route chose: a subset of the service, a mirror copy.
    let subset = header(&head, SUBSET_HEADER).map(Subset::parse);
    let mirror = header(&head, MIRROR_HEADER) == Some("1");
    if mirror || subset.is_some() {
        meta.traffic = Some(TrafficNote {
            subset: subset
                .as_ref()
                .and_then(|s| s.as_ref().ok())
                .map(ToString::to_string),
            mirror,
            ..TrafficNote::default()
        });
    }
    let mut clock = std::time::Instant::now();
    let mut lap = |stage| {
        let t = std::time::Instant::now();
        ctx.metrics.stage(stage, t - clock);
        clock = t;
    };
    let peer_td = peer.id.trust_domain();
    let authority = head.uri.authority().map(|a| a.as_str().to_owned());
    let target = ctx.target(authority.as_deref(), peer_td, subset);
    let caller = match &target {
        Ok(Target::Local(svc)) => {
            let (service, namespace) = svc.parts();
            let aud = caller::audience(&ctx.trust_domain, namespace, service);
            ctx.callers.verify(
                &peer.refs,
                peer_td,
                header(&head, CALLER_TOKEN_HEADER),
                header(&head, CALLER_REF_HEADER),
                &aud,
                now.wall,
            )
        }
        _ => Err(CallerError::Missing),
    };
    lap(Stage::DestCaller);
    let bound = caller.as_ref().ok().and_then(|n| n.bound);
    let unknown_ref = matches!(caller, Err(CallerError::UnknownReference(_)));
    let mut labels = RequestLabels::new("inbound", peer_td.as_str());
    if let Ok(Target::Local(svc)) = &target {
        labels.destination = svc.in_cluster(&ctx.cluster);
    }
    let ask = Ask {
        meta: &meta,
        hop: Hop::Peer {
            gateway: &peer.id,
            cluster: peer.cluster.as_deref(),
        },
        head: &head,
        authority: authority.as_deref(),
        caller: caller
            .map(|n| n.caller)
            .map_err(|e| Unfit::new(StatusCode::FORBIDDEN, "unauthenticated", e.to_string())),
        target,
        fault: None,
    };
    let admitting = spans.as_ref().map(|_| std::time::Instant::now());
    let decided = ctx.admission.admit(ask, now);
    lap(Stage::Admit);
    let recorded = ctx.admission.record(decided).await;
    lap(Stage::Record);
    if let (Some(spans), Some(admitting)) = (spans.as_mut(), admitting) {
        spans.admitted(admitting);
    }
    let mut response = match recorded {
        Ok(permit) => {
            let id = permit.decision_id().to_owned();
            let forwarding = spans.as_ref().map(|_| std::time::Instant::now());
            let forwarded = ctx.forwarder.forward(permit, head, body, Tries::Once).await;
            if let (Some(spans), Some(since)) = (spans.as_mut(), forwarding) {
                spans.forwarded(telemetry::Hop::Upstream, since);
            }
            let mut resp = match forwarded {
                Forwarded::Answer(resp) => resp,
                // Only remote targets are unreachable; a peer never gets one.
                Forwarded::Unreachable(u) => {
                    respond::error(StatusCode::BAD_GATEWAY, &format!("meshgate: {}", u.reason))
                }
            };
            labels.decision = "allow";
            respond::set_decision_id(&mut resp, &id);
            resp
        }
        Err(refusal) => {
            labels.decision = refusal.label;
            respond::refusal(&refusal)
        }
    };
    // The source learns whether its caller reference is bound on this connection.
    if let Some(id) = bound {
        response
            .headers_mut()
            .insert(CALLER_REF_HEADER, HeaderValue::from(id));
    } else if unknown_ref {
        response
            .headers_mut()
            .insert(CALLER_REF_HEADER, HeaderValue::from_static("unknown"));
    }
    labels.status = response.status().as_u16();
    (response, labels)
}

impl Inbound {
    /// The local service a peer's request names (the canonical `<svc>.<ns>.<cluster>`), if
    /// it is one of this cluster's and exported to the peer's cluster; the subset of its
    /// endpoints the source's route chose, if it named one.
    fn target(
        &self,
        authority: Option<&str>,
        peer_td: &TrustDomain,
        subset: Option<Result<Subset, String>>,
    ) -> Result<Target, Unfit> {
        let not_here = || {
            Unfit::new(
                StatusCode::NOT_FOUND,
                "unknown_destination",
                format!(
                    "`{}` is not a service of cluster `{}`",
                    authority.unwrap_or_default(),
                    self.cluster
                ),
            )
        };
        let dest = authority
            .and_then(Resolver::canonical)
            .ok_or_else(not_here)?;
        if dest.cluster.as_deref() != Some(self.cluster.as_str()) {
            return Err(not_here());
        }
        let svc = self.services.get(&dest.short()).ok_or_else(not_here)?;
        if !self
            .catalog
            .exported_to(&dest.service, &dest.namespace, peer_td)
        {
            return Err(Unfit::new(
                StatusCode::FORBIDDEN,
                "deny",
                format!("`{}` is not exported to `{peer_td}`", dest.short()),
            ));
        }
        let Some(subset) = subset else {
            return Ok(Target::Local(svc.clone()));
        };
        let subset = subset.map_err(|e| Unfit::new(StatusCode::BAD_REQUEST, "deny", e))?;
        svc.subset(&subset).map(Target::Local).ok_or_else(|| {
            Unfit::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "error",
                format!(
                    "`{}` has no subset `{subset}` in cluster `{}`",
                    dest.short(),
                    self.cluster
                ),
            )
        })
    }
}

fn header<'a>(head: &'a http::request::Parts, name: &str) -> Option<&'a str> {
    head.headers.get(name).and_then(|v| v.to_str().ok())
}

/// One `/.meshgate/` control request: bounded before anything is read (a slot of the
/// peer's, the handler's admission of peer and path with the largest body it takes), then
/// the body read within `limits.control_read_timeout` and handed to the handler.
async fn control(ctx: &Inbound, peer: &Peer, req: Request<()>, stream: ServerStream) {
    let (mut send, recv) = stream.split();
    let refuse = |status: StatusCode, message: &str| {
        let body = json_error(message);
        Response::builder().status(status).body(Bytes::from(body))
    };
    let response = 'answer: {
        let Some(_slot) = ctx.control_slots.try_take(
            peer.id.trust_domain(),
            ctx.limits.max_control_requests_per_peer,
        ) else {
            tracing::warn!(peer = %peer.id, "too many control requests from the peer; refused");
            break 'answer refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many control requests in progress from this peer",
            );
        };
        let Some(handler) = &ctx.control else {
            break 'answer refuse(StatusCode::NOT_FOUND, "no control handler");
        };
        let limit = match handler.admit(&peer.id, req.method(), req.uri().path()) {
            Ok(limit) => limit,
            Err((status, message)) => break 'answer refuse(status, &message),
        };
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            break 'answer refuse(StatusCode::PAYLOAD_TOO_LARGE, "control body too large");
        }
        let read = read_limited(H3Body::new(recv), limit);
        let bytes = match tokio::time::timeout(ctx.limits.control_read_timeout, read).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(ReadError::TooLarge)) => {
                break 'answer refuse(StatusCode::PAYLOAD_TOO_LARGE, "control body too large");
            }
            Ok(Err(ReadError::Failed(e))) => {
                tracing::debug!(peer = %peer.id, error = %e, "control request body failed");
                return;
            }
            Err(_) => {
                tracing::warn!(peer = %peer.id, "control request body not sent in time; refused");
                break 'answer refuse(
                    StatusCode::REQUEST_TIMEOUT,
                    "control request body not sent in time",
                );
            }
        };
        Ok(handler
            .handle(&peer.id, req.map(|()| Bytes::from(bytes)))
            .await)
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

enum ReadError {
    TooLarge,
    Failed(body::BoxError),
}

/// A body's bytes, refusing it as soon as it passes `limit`.
async fn read_limited<B>(mut body: B, limit: usize) -> Result<Vec<u8>, ReadError>
where
    B: hyper::body::Body<Data = Bytes, Error = body::BoxError> + Unpin,
{
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ReadError::Failed)?;
        if let Ok(chunk) = frame.into_data() {
            if bytes.len() + chunk.len() > limit {
                return Err(ReadError::TooLarge);
            }
            bytes.extend_from_slice(&chunk);
        }
    }
    Ok(bytes)
}

/// `{"error": message}`, as the control handler answers.
fn json_error(message: &str) -> String {
    let escaped: String = message
        .chars()
        .flat_map(|c| match c {
            '"' | '\\' => vec!['\\', c],
            c if c.is_control() => Vec::new(),
            c => vec![c],
        })
        .collect();
    format!("{{\"error\":\"{escaped}\"}}")
}
