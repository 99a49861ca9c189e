//! The source gateway's side of traffic routes: picking a route's backend and building the
//! target for it, the faults and mirror copies it asks for, and the warnings of a reload.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use meshgate_policy::TrafficNote;
use tokio::sync::OwnedSemaphorePermit;

use super::{Backend, Fault, MIRROR_HEADER, Pick, Route, RouteTable, SUBSET_HEADER, Subset};
use crate::admission::{Ask, Caller, Hop, Now, RequestMeta, Target, Unfit};
use crate::body::{self, GatewayBody};
use crate::dest::Destination;
use crate::forward::{Forwarded, Tries};
use crate::respond;
use crate::source::{Source, unknown};

/// Mirror copies in flight at most, per gateway.
pub(crate) const MAX_MIRRORS: usize = 256;
/// The largest request body copied to a mirror (it is read whole before forwarding).
const MIRROR_BODY_MAX: u64 = 64 * 1024;
/// The most of a mirror's answer read (and dropped) before the stream is dropped.
const MIRROR_ANSWER_MAX: usize = 1024 * 1024;
/// The longest a mirror's answer is read.
const MIRROR_ANSWER_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// Where a request goes, and what its traffic route (if one takes it) does to it.
pub(crate) struct Steer {
    pub target: Result<Target, Unfit>,
    /// The route and the backend it chose (its label, the cluster of the target otherwise).
    pub route: Option<(Arc<Route>, String)>,
    /// The subset to ask the destination's gateway for.
    pub subset: Option<Subset>,
    pub fault: Option<Fault>,
    /// The mirror backend, with the destination, when this request is copied.
    pub mirror: Option<(Destination, Backend)>,
}

impl Steer {
    pub(crate) fn plain(target: Result<Target, Unfit>) -> Steer {
        Steer {
            target,
            route: None,
            subset: None,
            fault: None,
            mirror: None,
        }
    }

    pub(crate) fn note(&self) -> Option<TrafficNote> {
        let (route, backend) = self.route.as_ref()?;
        Some(TrafficNote {
            route: Some(route.name.clone()),
            backend: Some(backend.clone()),
            ..TrafficNote::default()
        })
    }
}

impl Source {
    /// Where a request goes, and what a traffic route that takes it does to it.
    pub(crate) fn steer(
        &self,
        authority: Option<&str>,
        head: &http::request::Parts,
        caller: Option<&Caller>,
    ) -> Steer {
        let dest = match self.resolver.resolve(authority) {
            Ok(d) => d,
            Err(e) => return Steer::plain(Err(unknown(e.to_string()))),
        };
        let table = self.traffic.table();
        let Some(route) = table.route_for(&dest, head).cloned() else {
            return Steer::plain(self.target(dest));
        };
        let mut rng = rand::rng();
        let (target, backend) = match route.pick(&mut rng, |b| self.backend_target(&dest, b).ok()) {
            Pick::Unrouted => (self.target(dest.clone()), None),
            Pick::Backend(b, target) => (Ok(target), Some(b)),
            Pick::NoneAvailable => (
                Err(Unfit::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "error",
                    format!(
                        "route `{}`: no backend of `{dest}` can serve now (each is drained, not linked, or lacks the subset)",
                        route.name
                    ),
                )),
                None,
            ),
        };
        let label = match (backend, &target) {
            (Some(b), _) => b.label.clone(),
            (None, Ok(Target::Local(_))) => self.cluster.clone(),
            (None, Ok(Target::Remote { routes, .. })) => routes
                .first()
                .map_or_else(String::new, |r| r.cluster.clone()),
            (None, Err(_)) => String::from("none"),
        };
        let subset = backend
            .filter(|b| b.cluster != self.cluster && !b.subset.is_empty())
            .map(|b| b.subset.clone());
        let fault = caller
            .and_then(|c| route.fault(&c.id, &head.headers, &mut rng))
            .cloned();
        let mirror = route.mirror(&mut rng).map(|b| (dest.clone(), b.clone()));
        Steer {
            target,
            route: Some((route, label)),
            subset,
            fault,
            mirror,
        }
    }

    /// Backends of `table` that cannot serve now (warnings at start and reload).
    pub(crate) fn route_warnings(&self, table: &RouteTable) -> Vec<String> {
        let mut warnings = Vec::new();
        for route in table.routes() {
            let dest = route.destination();
            for backend in route.destinations() {
                if self.backend_target(&dest, backend).is_err() {
                    warnings.push(format!(
                        "route `{}`: backend `{}` cannot serve `{}` now (not this cluster's, not linked, or without the subset); it is skipped until it can",
                        route.name,
                        backend.label,
                        route.service()
                    ));
                }
            }
        }
        warnings
    }

    /// The target of one backend of a route: the local service's subset, or `dest` pinned to
    /// the backend's cluster (its gateway picks the subset).
    fn backend_target(&self, dest: &Destination, backend: &Backend) -> Result<Target, Unfit> {
        if backend.cluster == self.cluster {
            return self
                .services
                .get(&dest.short())
                .and_then(|s| s.subset(&backend.subset))
                .map(Target::Local)
                .ok_or_else(|| {
                    unknown(format!(
                        "`{dest}` has no subset `{}` in cluster `{}`",
                        backend.subset, self.cluster
                    ))
                });
        }
        self.target(Destination {
            cluster: Some(backend.cluster.clone()),
            ..dest.clone()
        })
    }

    /// Reads a request body a mirror copy needs (up to [`MIRROR_BODY_MAX`]): the body for
    /// the request, and the copy's bytes (`None`: too large to copy, sent uncopied).
    pub(crate) async fn tee(
        &self,
        route: &str,
        backend: &Backend,
        head: &http::request::Parts,
        body: Incoming,
    ) -> Result<(GatewayBody, Option<Bytes>), Response<GatewayBody>> {
        if hyper::body::Body::is_end_stream(&body) {
            return Ok((body::empty(), Some(Bytes::new())));
        }
        let length = head
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if length.is_none_or(|n| n > MIRROR_BODY_MAX) {
            self.metrics
                .route_mirror(route, &backend.label, "skipped_body");
            return Ok((body.map_err(Into::into).boxed(), None));
        }
        match http_body_util::Limited::new(body, MIRROR_BODY_MAX as usize)
            .collect()
            .await
        {
            Ok(collected) => {
                let bytes = collected.to_bytes();
                Ok((body::full(bytes.clone()), Some(bytes)))
            }
            Err(e) => Err(respond::error(
                StatusCode::BAD_REQUEST,
                &format!("meshgate: the request body could not be read: {e}"),
            )),
        }
    }

    /// A slot for one more mirror copy, taken before its body is read; `None` (and counted
    /// as `skipped_busy`) past [`MAX_MIRRORS`] copies in flight.
    pub(crate) fn mirror_slot(
        &self,
        route: &str,
        backend: &Backend,
    ) -> Option<OwnedSemaphorePermit> {
        let slot = self.mirrors.clone().try_acquire_owned().ok();
        if slot.is_none() {
            self.metrics
                .route_mirror(route, &backend.label, "skipped_busy");
        }
        slot
    }

    /// Sends a copy of an admitted request to a mirror backend, in a task of its own: it is
    /// admitted and recorded (marked as a mirror) where it lands, its answer is read and
    /// dropped (at most [`MIRROR_ANSWER_MAX`] bytes within [`MIRROR_ANSWER_TIME`]), and the
    /// caller never waits for it. The copy counts as a request in flight, so a draining
    /// gateway waits for it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mirror(
        self: &Arc<Self>,
        slot: OwnedSemaphorePermit,
        route: &str,
        caller: Caller,
        head: &http::request::Parts,
        copy: Bytes,
        dest: Destination,
        backend: Backend,
    ) {
        let mut head = clone_head(head);
        // The copy carries nothing the original's route added for its own backend.
        crate::headers::strip_meshgate(&mut head.headers);
        let ctx = self.clone();
        let route = route.to_owned();
        tokio::spawn(async move {
            let _slot = slot;
            let _in_flight = ctx.in_flight.begin();
            let mut meta = RequestMeta::new(&mut head.headers);
            meta.traffic = Some(TrafficNote {
                route: Some(route.clone()),
                backend: Some(backend.label.clone()),
                mirror: true,
                ..TrafficNote::default()
            });
            let ask = Ask {
                meta: &meta,
                hop: Hop::Workload,
                head: &head,
                authority: None,
                caller: Ok(caller),
                target: ctx.backend_target(&dest, &backend),
                fault: None,
            };
            let decided = ctx.admission.admit(ask, Now::current());
            let permit = match ctx.admission.record(decided).await {
                Ok(permit) => permit,
                Err(refusal) => {
                    ctx.metrics
                        .route_mirror(&route, &backend.label, refusal.label);
                    return;
                }
            };
            if let Target::Remote { .. } = permit.target() {
                head.headers
                    .insert(MIRROR_HEADER, HeaderValue::from_static("1"));
                if !backend.subset.is_empty()
                    && let Ok(v) = HeaderValue::from_str(&backend.subset.to_string())
                {
                    head.headers.insert(SUBSET_HEADER, v);
                }
            }
            let outcome = match ctx
                .forwarder
                .forward(permit, head, body::full(copy), Tries::Once)
                .await
            {
                Forwarded::Answer(resp) => {
                    let status = resp.status();
                    drain(resp.into_body()).await;
                    match status.as_u16() {
                        400..=499 => "refused",
                        500.. => "failed",
                        _ => "sent",
                    }
                }
                Forwarded::Unreachable(_) => "unreachable",
            };
            ctx.metrics.route_mirror(&route, &backend.label, outcome);
        });
    }
}

/// Reads a mirror's answer to its end, so the connection is reused, dropping the bytes; past
/// [`MIRROR_ANSWER_MAX`] bytes or [`MIRROR_ANSWER_TIME`] it is dropped unread instead.
async fn drain(mut body: GatewayBody) {
    let read = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > MIRROR_ANSWER_MAX {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(MIRROR_ANSWER_TIME, read).await;
}

/// A copy of a request head (method, target, version, headers; no extensions).
fn clone_head(head: &http::request::Parts) -> http::request::Parts {
    let mut builder = Request::builder()
        .method(head.method.clone())
        .uri(head.uri.clone())
        .version(head.version);
    if let Some(h) = builder.headers_mut() {
        *h = head.headers.clone();
    }
    builder
        .body(())
        .map(|r| r.into_parts().0)
        .unwrap_or_else(|_| Request::new(()).into_parts().0)
}
