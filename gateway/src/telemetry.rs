//! Distributed traces: each request's spans, exported over OTLP/HTTP (protobuf) when
//! `[telemetry] otlp_endpoint` is set, and not made at all otherwise.
//!
//! A request gets, at the gateway where it enters the mesh, a `meshgate source` span (server)
//! with a `meshgate admission` child and a `meshgate tunnel` child (client) for a service in
//! another cluster, or `meshgate upstream` for a local one; at the destination's gateway a
//! `meshgate destination` span (server, child of the tunnel span), with `meshgate admission`
//! and `meshgate upstream` children. The W3C `traceparent` carries the trace: each gateway
//! continues the caller's trace and rewrites the header's parent id to its hop span, so the
//! next hop's spans hang under it. Spans carry the decision id (`meshgate.decision_id`),
//! and decision records carry the trace id: each finds the other.
//!
//! Spans are built when the request is answered, from times taken on the way, and handed to
//! the SDK's batch processor; the request never waits for an export.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use opentelemetry::trace::{
    SamplingDecision, Span as _, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags,
    TraceId, TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, ShouldSample,
};

use crate::config::TelemetrySettings;

const TRACEPARENT: &str = "traceparent";
/// Spans waiting for export at most; past it new spans are dropped (never the request).
const MAX_QUEUED_SPANS: usize = 16_384;
/// The longest one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a stopping gateway waits for its last spans to leave.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// The span exporter of one gateway.
pub(crate) struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// Decides, for a trace this gateway starts, whether it is kept (the SDK's sampler, so
    /// the flag sent on agrees with the spans made).
    sampler: Sampler,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

/// The OTLP exporter runs on the SDK's own thread and polls its futures there; the HTTP
/// request itself runs on the gateway's tokio runtime.
#[derive(Debug)]
struct OnRuntime {
    client: opentelemetry_http::hyper::HyperClient,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        self.runtime
            .spawn(async move { client.send_bytes(request).await })
            .await?
    }
}

/// Where a request went after admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hop {
    /// Through the tunnel to another cluster's gateway.
    Tunnel,
    /// To an endpoint of a local service.
    Upstream,
}

/// The spans of one request, collected as it goes.
#[derive(Debug)]
pub(crate) struct Spans {
    wall: SystemTime,
    mono: Instant,
    trace_id: TraceId,
    /// The caller's span (from its `traceparent`).
    parent: SpanId,
    flags: TraceFlags,
    own: SpanId,
    /// The span of the next hop, named in the forwarded `traceparent`.
    hop: SpanId,
    admission: Option<(Instant, Instant)>,
    forwarded: Option<(Hop, Instant, Instant)>,
}

impl Spans {
    /// Admission ran from `start` until now.
    pub(crate) fn admitted(&mut self, start: Instant) {
        self.admission = Some((start, Instant::now()));
    }

    /// The request was forwarded (`hop`) from `start` until its response head, now.
    pub(crate) fn forwarded(&mut self, hop: Hop, start: Instant) {
        self.forwarded = Some((hop, start, Instant::now()));
    }

    fn at(&self, t: Instant) -> SystemTime {
        self.wall + t.saturating_duration_since(self.mono)
    }
}

impl Telemetry {
    /// The exporter the settings ask for, or `None` when traces are off. Needs a tokio
    /// runtime (the exports run on it).
    pub(crate) fn start(
        settings: &TelemetrySettings,
        cluster: &str,
        gateway: &str,
    ) -> Result<Option<Arc<Telemetry>>, String> {
        let Some(endpoint) = &settings.otlp_endpoint else {
            return Ok(None);
        };
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|e| format!("`telemetry.otlp_endpoint = \"{endpoint}\"`: {e}"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(format!(
                "`telemetry.otlp_endpoint = \"{endpoint}\"`: give an `http://host:port/v1/traces` URL (a collector beside the gateway; OTLP over TLS is not supported yet)"
            ));
        }
        if !(0.0..=1.0).contains(&settings.sample_ratio) {
            return Err(format!(
                "`telemetry.sample_ratio = {}`: must be between 0 and 1",
                settings.sample_ratio
            ));
        }
        let client = OnRuntime {
            client: opentelemetry_http::hyper::HyperClient::with_default_connector(
                EXPORT_TIMEOUT,
                None,
            ),
            runtime: tokio::runtime::Handle::try_current()
                .map_err(|e| format!("traces need the tokio runtime: {e}"))?,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("`telemetry.otlp_endpoint`: {e}"))?;
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(settings.export_interval)
                    .with_max_queue_size(MAX_QUEUED_SPANS)
                    .build(),
            )
            .build();
        let name = settings
            .service_name
            .clone()
            .unwrap_or_else(|| format!("meshgate-{cluster}"));
        let sampler =
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.sample_ratio)));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampler.clone())
            .with_resource(
                Resource::builder()
                    .with_service_name(name)
                    .with_attribute(KeyValue::new("meshgate.cluster", cluster.to_owned()))
                    .with_attribute(KeyValue::new("meshgate.gateway", gateway.to_owned()))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("meshgate");
        Ok(Some(Arc::new(Telemetry {
            provider,
            tracer,
            sampler,
        })))
    }

    /// Starts the spans of a request: it continues the caller's trace (a valid
    /// `traceparent`), or starts one, kept or not as the sampler says; then points the header
    /// at this gateway's hop span, with the sampled flag, for the next hop. Runs before the
    /// gateway would make up a `traceparent` of its own.
    pub(crate) fn begin(&self, headers: &mut HeaderMap) -> Spans {
        let (trace_id, parent, flags) = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse)
            .unwrap_or_else(|| {
                let trace_id = random_trace_id();
                let kept = self
                    .sampler
                    .should_sample(
                        None,
                        trace_id,
                        "meshgate source",
                        &SpanKind::Server,
                        &[],
                        &[],
                    )
                    .decision
                    == SamplingDecision::RecordAndSample;
                let flags = if kept {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                };
                (trace_id, SpanId::INVALID, flags)
            });
        let own = random_span_id();
        let hop = random_span_id();
        let value = format!("00-{trace_id}-{hop}-{:02x}", flags.to_u8());
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(TRACEPARENT, v);
        }
        Spans {
            wall: SystemTime::now(),
            mono: Instant::now(),
            trace_id,
            parent,
            flags,
            own,
            hop,
            admission: None,
            forwarded: None,
        }
    }

    /// Hands the request's spans to the exporter: `name` (`meshgate source` or `meshgate
    /// destination`) with `attributes`, ending now, and its children.
    pub(crate) fn finish(&self, spans: Spans, name: &'static str, attributes: Vec<KeyValue>) {
        let end = SystemTime::now();
        let context = |span: SpanId, remote: bool| {
            Context::new().with_remote_span_context(SpanContext::new(
                spans.trace_id,
                span,
                spans.flags,
                remote,
                TraceState::default(),
            ))
        };
        let parent = if spans.parent == SpanId::INVALID {
            Context::new()
        } else {
            context(spans.parent, true)
        };
        let mut server = self.tracer.build_with_context(
            self.tracer
                .span_builder(name)
                .with_kind(SpanKind::Server)
                .with_trace_id(spans.trace_id)
                .with_span_id(spans.own)
                .with_start_time(spans.wall)
                .with_attributes(attributes),
            &parent,
        );
        let under = context(spans.own, false);
        if let Some((start, stop)) = spans.admission {
            let mut span = self.tracer.build_with_context(
                self.tracer
                    .span_builder("meshgate admission")
                    .with_kind(SpanKind::Internal)
                    .with_start_time(spans.at(start)),
                &under,
            );
            span.end_with_timestamp(spans.at(stop));
        }
        if let Some((hop, start, stop)) = spans.forwarded {
            let name = match hop {
                Hop::Tunnel => "meshgate tunnel",
                Hop::Upstream => "meshgate upstream",
            };
            let mut span = self.tracer.build_with_context(
                self.tracer
                    .span_builder(name)
                    .with_kind(SpanKind::Client)
                    .with_span_id(spans.hop)
                    .with_start_time(spans.at(start)),
                &under,
            );
            span.end_with_timestamp(spans.at(stop));
        }
        server.end_with_timestamp(end);
    }

    /// Exports what is queued and stops the exporter (at gateway shutdown), waiting at most
    /// [`SHUTDOWN_WAIT`] for a collector that does not answer.
    pub(crate) async fn shutdown(self: Arc<Self>) {
        let provider = self.provider.clone();
        let stopping = tokio::task::spawn_blocking(move || provider.shutdown());
        if tokio::time::timeout(SHUTDOWN_WAIT, stopping).await.is_err() {
            tracing::warn!("the trace collector did not take the last spans in time");
        }
    }
}

impl Drop for Telemetry {
    /// The SDK's provider blocks its dropping thread until the exporter stops, and the
    /// exporter's requests run on the gateway's runtime: stop it on a thread of its own, so
    /// no runtime thread waits on itself.
    fn drop(&mut self) {
        let provider = self.provider.clone();
        let _ = std::thread::Builder::new()
            .name("meshgate-traces-stop".into())
            .spawn(move || {
                let _ = provider.shutdown();
            });
    }
}

fn parse(value: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    let mut parts = value.trim().split('-');
    let (_version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    (trace != TraceId::INVALID).then_some((trace, span, TraceFlags::new(flags)))
}

fn random_trace_id() -> TraceId {
    TraceId::from_bytes(rand::random::<[u8; 16]>())
}

fn random_span_id() -> SpanId {
    loop {
        let id = SpanId::from_bytes(rand::random::<[u8; 8]>());
        if id != SpanId::INVALID {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_continued_with_a_new_parent_id() {
        let settings = TelemetrySettings {
            otlp_endpoint: Some("http://127.0.0.1:9/v1/traces".into()),
            ..Default::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let t = Telemetry::start(&settings, "east", "spiffe://east.example/meshgate/gateway")
            .unwrap()
            .unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let spans = t.begin(&mut h);
        let sent = h.get(TRACEPARENT).unwrap().to_str().unwrap().to_owned();
        assert_eq!(
            sent,
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01", spans.hop)
        );
        assert_eq!(spans.parent.to_string(), "00f067aa0ba902b7");
        assert_ne!(spans.own, spans.hop);
    }

    #[test]
    fn a_trace_the_caller_did_not_start_is_a_root_sampled_by_the_ratio() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        for (ratio, flags) in [(1.0, "01"), (0.0, "00")] {
            let settings = TelemetrySettings {
                otlp_endpoint: Some("http://127.0.0.1:9/v1/traces".into()),
                sample_ratio: ratio,
                ..Default::default()
            };
            let t = Telemetry::start(&settings, "east", "gw").unwrap().unwrap();
            let mut h = HeaderMap::new();
            let spans = t.begin(&mut h);
            assert_eq!(spans.parent, SpanId::INVALID, "a root span");
            let sent = h.get(TRACEPARENT).unwrap().to_str().unwrap().to_owned();
            assert_eq!(
                sent,
                format!("00-{}-{}-{flags}", spans.trace_id, spans.hop),
                "ratio {ratio}"
            );
        }
    }

    #[test]
    fn bad_settings_are_refused_with_the_key() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        for (endpoint, ratio, needle) in [
            ("https://collector:4318/v1/traces", 1.0, "otlp_endpoint"),
            ("not a url", 1.0, "otlp_endpoint"),
            ("http://127.0.0.1:4318/v1/traces", 1.5, "sample_ratio"),
        ] {
            let settings = TelemetrySettings {
                otlp_endpoint: Some(endpoint.into()),
                sample_ratio: ratio,
                ..Default::default()
            };
            let err = Telemetry::start(&settings, "east", "gw").unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
        assert!(
            Telemetry::start(&TelemetrySettings::default(), "east", "gw")
                .unwrap()
                .is_none()
        );
    }
}
