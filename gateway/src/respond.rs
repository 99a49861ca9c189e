//! Responses the gateway makes itself: refusals and errors, short and plain.

use http::{HeaderValue, Response, StatusCode, header};

use crate::admission::Refusal;
use crate::body::{self, GatewayBody};
use crate::headers::DECISION_ID_HEADER;

/// A plain-text response.
pub fn error(status: StatusCode, message: &str) -> Response<GatewayBody> {
    let mut resp = Response::new(body::full(format!("{message}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The answer to a refused request: its status and message, `Retry-After` for a quota,
/// and the id of its decision record.
pub(crate) fn refusal(refusal: &Refusal) -> Response<GatewayBody> {
    let mut resp = error(refusal.status, &refusal.message);
    if let Some(retry_after) = refusal.retry_after {
        let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    set_decision_id(&mut resp, &refusal.decision_id);
    resp
}

/// Sets `x-meshgate-decision-id`.
/// An empty id (a refusal left unrecorded by the per-source limit) sets nothing.
pub fn set_decision_id<B>(resp: &mut Response<B>, id: &str) {
    if id.is_empty() {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(DECISION_ID_HEADER, v);
    }
}
