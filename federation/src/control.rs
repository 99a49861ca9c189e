//! The control protocol between federated gateways: HTTP/3 requests on reserved paths under
//! `/.meshgate/`, carried by the gateways' mutually authenticated QUIC connection. This module
//! holds the paths, the JSON documents, and the serving side.
//!
//! | request | answer |
//! |---|---|
//! | `GET /.meshgate/v1/bundle` | our SPIFFE bundle JSON |
//! | `POST /.meshgate/v1/bundle` (body: the caller's own SPIFFE bundle) | [`BundleAck`] |
//! | `GET /.meshgate/v1/services` | [`ServicesDoc`]: what we export to the caller |
//! | `GET /.meshgate/v1/endpoints` | [`EndpointsDoc`]: our gateway addresses |
//! | `GET /.meshgate/v1/checkpoints` | [`CheckpointsDoc`]: our signed decision-log heads |
//! | `POST /.meshgate/v1/checkpoints` (body: [`CheckpointsDoc`] of the caller's own log) | [`WitnessAck`](crate::WitnessAck): the heads are held here as its witness |
//! | `GET /.meshgate/v1/witnessed` | [`CheckpointsDoc`]: the caller's heads we hold |
//!
//! Only the gateway of a linked trust domain gets answers; a bundle push can only update the
//! pushing gateway's own trust domain.

use std::net::SocketAddr;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use meshgate_identity::{SpiffeId, TrustBundle};
use meshgate_policy::Checkpoint;
use serde::{Deserialize, Serialize};

use crate::federation::Federation;

/// Our bundle (GET) or a peer's bundle push (POST).
pub const BUNDLE_PATH: &str = "/.meshgate/v1/bundle";
/// The services exported to the asking peer.
pub const SERVICES_PATH: &str = "/.meshgate/v1/services";
/// Our gateway endpoints.
pub const ENDPOINTS_PATH: &str = "/.meshgate/v1/endpoints";
/// Our decision-log checkpoint heads.
pub const CHECKPOINTS_PATH: &str = "/.meshgate/v1/checkpoints";
/// The asking peer's checkpoint heads that we hold as its witness.
pub const WITNESSED_PATH: &str = "/.meshgate/v1/witnessed";

/// How many of our latest checkpoints a peer gets.
const CHECKPOINTS_SERVED: usize = 64;

/// The answer to a bundle push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleAck {
    /// Whether the pushed bundle replaced the held one.
    pub accepted: bool,
    /// The sequence now held for the pusher's trust domain.
    pub sequence: u64,
    /// Why it was not taken, when it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The services one cluster exports to the asking peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicesDoc {
    /// The exporting cluster's name.
    pub cluster: String,
    /// `service.namespace` names, sorted.
    pub services: Vec<String>,
}

/// A cluster's gateway endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointsDoc {
    /// The cluster's name.
    pub cluster: String,
    /// Its gateways' QUIC addresses.
    pub gateways: Vec<SocketAddr>,
}

/// Signed decision-log heads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointsDoc {
    /// Whose log they are of.
    pub trust_domain: String,
    /// Oldest first.
    pub checkpoints: Vec<Checkpoint>,
}

/// Largest `POST /.meshgate/v1/checkpoints` body: a push carries one head (~400 bytes).
pub const MAX_CHECKPOINTS_BODY: usize = 64 * 1024;

impl Federation {
    /// Whether the peer gateway `peer` may send `method path`, and the largest body it may
    /// carry; asked before the body is read, so an unlinked peer or an unknown path costs
    /// nothing and each document has its own bound.
    pub fn control_admit(
        &self,
        peer: &SpiffeId,
        method: &Method,
        path: &str,
    ) -> Result<usize, (StatusCode, String)> {
        let td = peer.trust_domain();
        if *peer != SpiffeId::gateway(td) || !self.is_linked(td) {
            tracing::warn!(peer = %peer, path, "control request from an unlinked peer refused");
            return Err((
                StatusCode::FORBIDDEN,
                format!("`{td}` is not a federation peer of this cluster"),
            ));
        }
        match (method, path) {
            (&Method::POST, BUNDLE_PATH) => Ok(meshgate_identity::MAX_BUNDLE_BYTES),
            (&Method::POST, CHECKPOINTS_PATH) => Ok(MAX_CHECKPOINTS_BODY),
            (
                &Method::GET,
                BUNDLE_PATH | SERVICES_PATH | ENDPOINTS_PATH | CHECKPOINTS_PATH | WITNESSED_PATH,
            ) => Ok(0),
            (_, path) => Err((
                StatusCode::NOT_FOUND,
                format!(
                    "no control path `{}`",
                    path.chars().take(128).collect::<String>()
                ),
            )),
        }
    }

    /// Answers one control request from the authenticated peer gateway `peer`.
    pub async fn handle_control(
        &self,
        peer: &SpiffeId,
        request: Request<Bytes>,
    ) -> Response<Bytes> {
        let td = peer.trust_domain();
        if *peer != SpiffeId::gateway(td) || !self.is_linked(td) {
            tracing::warn!(peer = %peer, path = %request.uri().path(), "control request from an unlinked peer refused");
            return error(
                StatusCode::FORBIDDEN,
                &format!("`{td}` is not a federation peer of this cluster"),
            );
        }
        let now = SystemTime::now();
        match (request.method(), request.uri().path()) {
            (&Method::GET, BUNDLE_PATH) => {
                let body = self.local_bundle().to_spiffe_json();
                respond(StatusCode::OK, Bytes::from(body))
            }
            (&Method::POST, BUNDLE_PATH) => {
                let ack = match std::str::from_utf8(request.body()) {
                    Ok(text) => match TrustBundle::from_spiffe_json(text, td) {
                        Ok(bundle) => self.offer_bundle(td, bundle, now),
                        Err(e) => {
                            return error(StatusCode::BAD_REQUEST, &format!("not a bundle: {e}"));
                        }
                    },
                    Err(_) => return error(StatusCode::BAD_REQUEST, "bundle is not UTF-8"),
                };
                json(
                    if ack.accepted {
                        StatusCode::OK
                    } else {
                        StatusCode::CONFLICT
                    },
                    &ack,
                )
            }
            (&Method::GET, SERVICES_PATH) => json(StatusCode::OK, &self.services_for(td)),
            (&Method::GET, ENDPOINTS_PATH) => json(
                StatusCode::OK,
                &EndpointsDoc {
                    cluster: self.local().cluster.clone(),
                    gateways: self.advertised(),
                },
            ),
            (&Method::GET, CHECKPOINTS_PATH) => {
                // The latest heads, kept in memory by the log (no scan of the log).
                let mut checkpoints = self
                    .log()
                    .map(|log| log.recent_checkpoints())
                    .unwrap_or_default();
                let skip = checkpoints.len().saturating_sub(CHECKPOINTS_SERVED);
                checkpoints.drain(..skip);
                json(
                    StatusCode::OK,
                    &CheckpointsDoc {
                        trust_domain: self.local().trust_domain.to_string(),
                        checkpoints,
                    },
                )
            }
            (&Method::POST, CHECKPOINTS_PATH) => {
                let doc: CheckpointsDoc = match serde_json::from_slice(request.body()) {
                    Ok(doc) => doc,
                    Err(e) => {
                        return error(StatusCode::BAD_REQUEST, &format!("not checkpoints: {e}"));
                    }
                };
                if doc.trust_domain != td.as_str() {
                    return error(
                        StatusCode::FORBIDDEN,
                        &format!(
                            "the gateway of `{td}` may only push heads of its own log, not `{}`",
                            doc.trust_domain
                        ),
                    );
                }
                json(StatusCode::OK, &self.witness_heads(td, &doc.checkpoints))
            }
            (&Method::GET, WITNESSED_PATH) => match self
                .store()
                .witnessed_recent(td.as_str(), crate::witnessing::MAX_SERVED_HEADS)
            {
                Ok(checkpoints) => json(
                    StatusCode::OK,
                    &CheckpointsDoc {
                        trust_domain: td.to_string(),
                        checkpoints,
                    },
                ),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            },
            (_, path) => error(StatusCode::NOT_FOUND, &format!("no control path `{path}`")),
        }
    }
}

fn respond(status: StatusCode, body: Bytes) -> Response<Bytes> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Bytes> {
    match serde_json::to_vec(value) {
        Ok(body) => respond(status, Bytes::from(body)),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn error(status: StatusCode, message: &str) -> Response<Bytes> {
    let body = serde_json::json!({ "error": message }).to_string();
    respond(status, Bytes::from(body))
}
