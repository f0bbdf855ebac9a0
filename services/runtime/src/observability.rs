//! Logs and traces: `tracing` everywhere, exported as OpenTelemetry spans when an OTLP endpoint
//! is configured, and W3C trace context carried in NATS message headers so that one trace follows
//! a device message through the gateway, NATS and the services.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Link, SamplingDecision, SamplingResult, SpanKind, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{KeyValue, Value};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SdkTracerProvider, ShouldSample,
};
use opentelemetry_sdk::Resource;
use serde::Deserialize;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written to standard error.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// `[runtime.observability]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObservabilityConfig {
    /// `tracing` filter directives for logs, e.g. `info,liftwire_gateway=debug`. `RUST_LOG` wins
    /// if set. Spans at INFO and above are traced whatever this says.
    pub log_filter: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// OTLP/HTTP traces endpoint, e.g. `http://otel-collector:4318/v1/traces`. Without it spans
    /// still get trace ids and propagate through NATS; they are just not exported.
    pub otlp_endpoint: Option<String>,
    /// Share of traces recorded (0.0–1.0), decided where a trace starts (a device message at the
    /// gateway, a request at the API); every service down the line follows the decision carried
    /// in `traceparent`, so a trace is kept whole or not at all. At tens of thousands of device
    /// messages per second, a small share is what a tracing backend can take.
    pub trace_sample_ratio: f64,
}

impl Default for ObservabilityConfig {
    fn default() -> Self {
        Self {
            log_filter: "info".into(),
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            trace_sample_ratio: 1.0,
        }
    }
}

/// Head sampling: a trace started here is kept with probability `ratio`, unless its root span
/// says its creator already decided to keep it ([`SAMPLING_PRIORITY`] above 0, see
/// [`HeadSampler`]); a trace continued from a caller keeps the caller's decision.
pub fn sampler(ratio: f64) -> Sampler {
    Sampler::ParentBased(Box::new(RootSampler {
        ratio: Sampler::TraceIdRatioBased(ratio),
    }))
}

/// Span field by which the code that starts a trace says it already sampled it (the OpenTracing
/// convention): `tracing::info_span!("mqtt_ingress", sampling.priority = 1)`.
pub const SAMPLING_PRIORITY: &str = "sampling.priority";

/// Decides for root spans: the creator's decision if the span carries one, the ratio otherwise.
#[derive(Debug, Clone)]
struct RootSampler {
    ratio: Sampler,
}

impl ShouldSample for RootSampler {
    fn should_sample(
        &self,
        parent_context: Option<&opentelemetry::Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let decided = attributes.iter().any(|kv| {
            kv.key.as_str() == SAMPLING_PRIORITY && matches!(kv.value, Value::I64(p) if p > 0)
        });
        if decided {
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            };
        }
        self.ratio
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

/// The sampling decision for a hot path that starts traces (the gateway, once per device
/// message), taken before any span exists: a message that is not sampled costs no span at all,
/// only a `traceparent` saying so ([`inject_unsampled_trace_context`]). A sampled one gets a span
/// with [`SAMPLING_PRIORITY`] 1, which the tracer then keeps, so the configured ratio applies
/// once, not twice.
#[derive(Debug, Clone, Copy)]
pub struct HeadSampler {
    ratio: f64,
}

impl HeadSampler {
    /// Keeps a share `ratio` (0.0–1.0, as `trace_sample_ratio`) of the traces it is asked about.
    pub fn new(ratio: f64) -> Self {
        Self { ratio }
    }

    /// Whether to trace the next message.
    pub fn sample(&self) -> bool {
        if self.ratio >= 1.0 {
            true
        } else if self.ratio <= 0.0 {
            false
        } else {
            rand::random::<f64>() < self.ratio
        }
    }
}

/// Writes a W3C `traceparent` with fresh ids and the sampled flag off into NATS `headers`, for a
/// message [`HeadSampler`] did not sample: every service down the line follows the decision and
/// records nothing, where without the header each would start (and sample) a trace of its own.
pub fn inject_unsampled_trace_context(headers: &mut async_nats::HeaderMap) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let ids = RandomIdGenerator::default();
    let trace_id = u128::from_be_bytes(ids.new_trace_id().to_bytes());
    let span_id = u64::from_be_bytes(ids.new_span_id().to_bytes());
    // version "00", 32 hex digits of trace id, 16 of span id, flags "00".
    let mut value = *b"00-00000000000000000000000000000000-0000000000000000-00";
    for (i, digit) in value[3..35].iter_mut().enumerate() {
        *digit = HEX[((trace_id >> (124 - 4 * i)) & 0xf) as usize];
    }
    for (i, digit) in value[36..52].iter_mut().enumerate() {
        *digit = HEX[((span_id >> (60 - 4 * i)) & 0xf) as usize];
    }
    // All bytes come from `HEX` and the ASCII template.
    let value = std::str::from_utf8(&value).unwrap_or_default();
    headers.insert("traceparent", value);
}

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ObservabilityError {
    /// The log filter does not parse.
    #[error("invalid log filter {filter:?}: {source}")]
    Filter {
        /// The rejected directives.
        filter: String,
        /// Parser error.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// The OTLP exporter could not be built.
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// The sample ratio is not a share.
    #[error("trace_sample_ratio must be between 0 and 1, got {0}")]
    SampleRatio(f64),
    /// A global subscriber is already installed.
    #[error("a tracing subscriber is already installed: {0}")]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps the tracer provider alive; flushes pending spans when dropped.
#[must_use = "dropping the guard stops span export"]
pub struct TracingGuard {
    provider: SdkTracerProvider,
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("liftwire: flushing spans at exit failed: {e}");
        }
    }
}

/// Installs the global `tracing` subscriber (logs + OpenTelemetry) and the W3C trace-context
/// propagator for `service` (used as the OpenTelemetry `service.name`).
///
/// `rust_log` is the value of `RUST_LOG`, if any; it overrides the configured filter.
pub fn init(
    service: &'static str,
    config: &ObservabilityConfig,
    rust_log: Option<&str>,
) -> Result<TracingGuard, ObservabilityError> {
    let directives = rust_log.unwrap_or(&config.log_filter);
    let filter =
        EnvFilter::builder()
            .parse(directives)
            .map_err(|source| ObservabilityError::Filter {
                filter: directives.to_owned(),
                source,
            })?;

    if !(0.0..=1.0).contains(&config.trace_sample_ratio) {
        return Err(ObservabilityError::SampleRatio(config.trace_sample_ratio));
    }
    let mut builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service).build())
        .with_sampler(sampler(config.trace_sample_ratio));
    if let Some(endpoint) = &config.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint.clone())
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    // Spans are traced at INFO and above whatever the log filter says, so quiet logs do not
    // break traces; the log filter only decides what is printed.
    // No busy/idle timings (kept up on every enter and exit of every span, rumqttd's
    // per-connection spans included: a cost on every poll of every connection) and no thread
    // names (async work moves between threads; the names say nothing).
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service))
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_filter(LevelFilter::INFO);
    let registry = tracing_subscriber::registry().with(otel);
    match config.log_format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init()?,
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init()?,
    }
    Ok(TracingGuard { provider })
}

struct HeaderInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a async_nats::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the W3C `traceparent` (and `tracestate`) of `span` into NATS `headers`.
pub fn inject_trace_context(span: &tracing::Span, headers: &mut async_nats::HeaderMap) {
    let context = span.context();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
}

/// Makes `span` a child of the trace context found in NATS `headers`, if any.
/// A disabled span (no subscriber records it) is left alone: nothing would see its parent.
pub fn adopt_trace_context(span: &tracing::Span, headers: &async_nats::HeaderMap) {
    if span.is_disabled() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    // Headers without a valid traceparent yield an empty context: the span keeps its own root.
    let _ = span.set_parent(parent);
}

struct HttpHeaderExtractor<'a>(&'a axum::http::HeaderMap);

impl Extractor for HttpHeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes `span` a child of the W3C trace context of an HTTP request's `headers`, if any.
pub fn adopt_http_trace_context(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    let parent = TraceContextPropagator::new().extract(&HttpHeaderExtractor(headers));
    let _ = span.set_parent(parent);
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    fn trace_id(span: &tracing::Span) -> opentelemetry::trace::TraceId {
        span.context().span().span_context().trace_id()
    }

    #[test]
    fn trace_context_crosses_nats_headers() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let ingress = tracing::info_span!("mqtt_ingress");
            let mut headers = async_nats::HeaderMap::new();
            inject_trace_context(&ingress, &mut headers);
            let traceparent = headers
                .get("traceparent")
                .expect("traceparent header")
                .as_str()
                .to_owned();
            assert!(traceparent.starts_with("00-"), "{traceparent}");
            assert!(
                traceparent.contains(&trace_id(&ingress).to_string()),
                "{traceparent}"
            );

            // A consumer on the other side of NATS continues the same trace.
            let consume = tracing::info_span!("ingest");
            adopt_trace_context(&consume, &headers);
            assert_eq!(trace_id(&consume), trace_id(&ingress));

            // Without headers a span starts its own trace.
            let unrelated = tracing::info_span!("unrelated");
            adopt_trace_context(&unrelated, &async_nats::HeaderMap::new());
            assert_ne!(trace_id(&unrelated), trace_id(&ingress));
        });
    }

    /// Runs `test` with spans traced by a tracer that samples as [`sampler`]`(ratio)` does.
    fn with_sampler(ratio: f64, test: impl FnOnce()) {
        let provider = SdkTracerProvider::builder()
            .with_sampler(sampler(ratio))
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, test);
    }

    fn sampled(span: &tracing::Span) -> bool {
        span.context().span().span_context().is_sampled()
    }

    #[test]
    fn the_start_of_a_trace_decides_for_everyone_down_the_line() {
        let traceparent = |sampled: bool| {
            let mut headers = async_nats::HeaderMap::new();
            let flags = if sampled { "01" } else { "00" };
            headers.insert(
                "traceparent",
                format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}").as_str(),
            );
            headers
        };
        for (ratio, started_sampled) in [(0.0, false), (1.0, true)] {
            with_sampler(ratio, || {
                let ingress = tracing::info_span!("mqtt_ingress");
                assert_eq!(sampled(&ingress), started_sampled, "ratio {ratio}");
                // What the gateway decided travels in the headers and is followed.
                let mut headers = async_nats::HeaderMap::new();
                inject_trace_context(&ingress, &mut headers);
                let ingest = tracing::info_span!("ingest");
                adopt_trace_context(&ingest, &headers);
                assert_eq!(sampled(&ingest), started_sampled, "ratio {ratio}");
                // A caller's decision wins over this service's ratio either way.
                for caller in [false, true] {
                    let continued = tracing::info_span!("continued");
                    adopt_trace_context(&continued, &traceparent(caller));
                    assert_eq!(sampled(&continued), caller, "ratio {ratio}");
                }
            });
        }
    }

    #[test]
    fn a_head_sampling_decision_is_kept_whatever_the_ratio() {
        with_sampler(0.0, || {
            let decided = tracing::info_span!("mqtt_ingress", sampling.priority = 1);
            assert!(sampled(&decided), "the creator's decision stands");
            let mut headers = async_nats::HeaderMap::new();
            inject_trace_context(&decided, &mut headers);
            let ingest = tracing::info_span!("ingest");
            adopt_trace_context(&ingest, &headers);
            assert!(sampled(&ingest), "and travels down the line");
            let undecided = tracing::info_span!("mqtt_ingress", sampling.priority = 0);
            assert!(!sampled(&undecided), "priority 0 leaves it to the ratio");
        });
    }

    #[test]
    fn an_unsampled_traceparent_is_valid_fresh_and_followed() {
        with_sampler(1.0, || {
            let mut ids = Vec::new();
            for _ in 0..2 {
                let mut headers = async_nats::HeaderMap::new();
                inject_unsampled_trace_context(&mut headers);
                let value = headers.get("traceparent").expect("traceparent").to_string();
                let parts: Vec<&str> = value.split('-').collect();
                assert_eq!(parts.len(), 4, "{value}");
                assert_eq!((parts[0], parts[3]), ("00", "00"), "{value}");
                assert_eq!((parts[1].len(), parts[2].len()), (32, 16), "{value}");
                let ingest = tracing::info_span!("ingest");
                adopt_trace_context(&ingest, &headers);
                assert!(!sampled(&ingest), "ratio 1.0 yields to the head's no");
                assert_eq!(trace_id(&ingest).to_string(), parts[1], "the trace goes on");
                ids.push(parts[1].to_owned());
            }
            assert_ne!(ids[0], ids[1], "every message gets its own trace id");
        });
    }

    #[test]
    fn head_sampler_keeps_about_its_share() {
        assert!((0..100).all(|_| HeadSampler::new(1.0).sample()));
        assert!((0..100).all(|_| !HeadSampler::new(0.0).sample()));
        let kept = (0..10_000)
            .filter(|_| HeadSampler::new(0.1).sample())
            .count();
        // Binomial(10000, 0.1): mean 1000, standard deviation 30; ±200 is over 6 of them.
        assert!((800..=1200).contains(&kept), "{kept}");
    }
}
