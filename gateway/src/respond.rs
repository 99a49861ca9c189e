//! Responses the gateway makes itself: refusals and errors, short and plain.

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{self, GatewayBody};
use crate::enforce::Verdict;
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

/// The response for a refused verdict: 403 (or `status`) on deny, 429 with `Retry-After` on
/// quota, 503 on internal failure.
pub fn refusal(verdict: &Verdict, status: StatusCode) -> Response<GatewayBody> {
    match verdict {
        Verdict::Allow => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "meshgate: allowed request without a response",
        ),
        Verdict::Deny(reason) => error(status, &format!("meshgate: denied: {reason}")),
        Verdict::QuotaExceeded(retry_after) => {
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            let mut resp = error(
                StatusCode::TOO_MANY_REQUESTS,
                "meshgate: rate quota exceeded",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            resp
        }
        Verdict::Error(reason) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("meshgate: refused: {reason}"),
        ),
    }
}

/// Sets `x-meshgate-decision-id`.
pub fn set_decision_id<B>(resp: &mut Response<B>, id: &str) {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(DECISION_ID_HEADER, v);
    }
}
