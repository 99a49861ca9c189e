//! Exports of a decision search, streamed: a blocking task reads the log and sends chunks
//! through a small channel, so memory stays bounded whatever the log's size and a client
//! that stops reading stops the read.
//!
//! JSON lines are the records as `meshgate audit query --json` and `audit export` print
//! them (with `hash`). CSV has one row per record; a cell that a spreadsheet would take for
//! a formula (starting with `=`, `+`, `-`, `@`, tab or CR) gets a leading `'`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use meshgate_policy::{DecisionLog, DecisionRecord, Filter};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

/// Bytes gathered before a chunk is sent.
const CHUNK: usize = 64 * 1024;
/// Chunks buffered between the reader and a slow client.
const BUFFERED: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Jsonl => "application/x-ndjson",
            Self::Csv => "text/csv; charset=utf-8",
        }
    }

    pub fn file_name(self) -> &'static str {
        match self {
            Self::Jsonl => "decisions.jsonl",
            Self::Csv => "decisions.csv",
        }
    }
}

/// A response body fed by a channel.
#[derive(Debug)]
pub struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

/// Starts streaming every record matching `filter`, oldest first. `permit` (a share of the
/// console's reading capacity) is held until the read ends.
pub fn stream(
    log: Arc<DecisionLog>,
    filter: Filter,
    format: Format,
    permit: OwnedSemaphorePermit,
) -> ChannelBody {
    let (tx, rx) = mpsc::channel::<Bytes>(BUFFERED);
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut buf = Vec::with_capacity(CHUNK + 4096);
        if format == Format::Csv {
            buf.extend_from_slice(CSV_HEADER.as_bytes());
        }
        let mut gone = false;
        let read = log.for_each(|r| {
            if !filter.matches(&r) {
                return true;
            }
            match format {
                Format::Jsonl => {
                    if serde_json::to_writer(&mut buf, &r).is_err() {
                        return true;
                    }
                    buf.push(b'\n');
                }
                Format::Csv => csv_row(&r, &mut buf),
            }
            if buf.len() >= CHUNK {
                let chunk = Bytes::from(std::mem::replace(
                    &mut buf,
                    Vec::with_capacity(CHUNK + 4096),
                ));
                if !send_within(&runtime, &tx, chunk) {
                    gone = true;
                    return false;
                }
            }
            true
        });
        if gone {
            return;
        }
        if let Err(e) = read {
            // The status line is gone already: end the body with the error for a reader to
            // see, rather than end it as if complete.
            tracing::warn!(error = %e, "console export: cannot read the decision log");
            let note = match format {
                Format::Jsonl => format!(
                    "{{\"error\":{}}}\n",
                    serde_json::Value::String(e.to_string())
                ),
                Format::Csv => format!("# error: {e}\n"),
            };
            buf.extend_from_slice(note.as_bytes());
        }
        if !buf.is_empty() {
            send_within(&runtime, &tx, Bytes::from(buf));
        }
    });
    ChannelBody(rx)
}

/// The longest an export waits for its reader to take the next chunk; past it the export is
/// dropped, freeing its share of the console's reading capacity.
const STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// Hands `chunk` to the response within [`STALL`]; false when the reader is gone or stalled.
fn send_within(runtime: &tokio::runtime::Handle, tx: &mpsc::Sender<Bytes>, chunk: Bytes) -> bool {
    matches!(
        runtime.block_on(tokio::time::timeout(STALL, tx.send(chunk))),
        Ok(Ok(()))
    )
}

const CSV_HEADER: &str = "seq,time,id,decision,principal,action,resource,method,path,raw_path,status,reasons,errors,policy_version,shadow_allowed,shadow_differs,shadow_reasons,quota_key,quota_remaining,trace_id,source_gateway,hash,route,backend,fault,subset,mirror\n";

fn csv_row(r: &DecisionRecord, out: &mut Vec<u8>) {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let cells = [
        r.seq.to_string(),
        r.time.clone(),
        r.id.clone(),
        r.decision.as_str().to_owned(),
        r.principal.clone(),
        r.action.clone(),
        r.resource.clone(),
        r.method.clone(),
        r.path.clone(),
        r.raw_path.clone(),
        opt(r.status.map(|s| s.to_string())),
        r.reasons.join(" "),
        r.errors.join("; "),
        r.policy_version.clone(),
        opt(r.shadow.as_ref().map(|s| s.allowed.to_string())),
        opt(r.shadow.as_ref().map(|s| s.differs.to_string())),
        opt(r.shadow.as_ref().map(|s| s.reasons.join(" "))),
        opt(r.quota_key.clone()),
        opt(r.quota_remaining.map(|n| n.to_string())),
        opt(r.trace_id.clone()),
        opt(r.source_gateway.clone()),
        r.hash.clone(),
        opt(r.traffic.as_ref().and_then(|t| t.route.clone())),
        opt(r.traffic.as_ref().and_then(|t| t.backend.clone())),
        opt(r.traffic.as_ref().and_then(|t| t.fault.clone())),
        opt(r.traffic.as_ref().and_then(|t| t.subset.clone())),
        opt(r.traffic.as_ref().map(|t| t.mirror.to_string())),
    ];
    for (i, c) in cells.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        csv_cell(c, out);
    }
    out.push(b'\n');
}

fn csv_cell(value: &str, out: &mut Vec<u8>) {
    let formula = value.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let quote = formula || value.contains([',', '"', '\n', '\r']);
    if quote {
        out.push(b'"');
    }
    if formula {
        out.push(b'\'');
    }
    for b in value.bytes() {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    if quote {
        out.push(b'"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(v: &str) -> String {
        let mut out = Vec::new();
        csv_cell(v, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn csv_cells_are_quoted_and_formulas_defused() {
        assert_eq!(cell("/v1/orders"), "/v1/orders");
        assert_eq!(cell("a,b"), "\"a,b\"");
        assert_eq!(cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(cell("line\nbreak"), "\"line\nbreak\"");
        assert_eq!(CSV_HEADER.matches(',').count(), 26);
    }
}
