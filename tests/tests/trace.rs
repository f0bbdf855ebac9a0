//! One trace follows a device message: the gateway's MQTT ingress span, propagated through NATS
//! headers, is the parent of the telemetry service's ingest span. Likewise a dashboard request's
//! span (continuing its caller's `traceparent`) is the parent of the telemetry query it causes.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{mqtt_elevator, stack, Stack};
use liftwire_proto::{v1, Message, Timestamp, SCHEMA_VERSION};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// Keeps every finished span.
#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Collected {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().unwrap().extend(batch);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_message_is_one_trace_from_gateway_to_telemetry() {
    let spans = Collected::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(spans.clone())
        .build();
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("liftwire-test"))
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer)).unwrap();

    let Stack {
        nats,
        pg: _pg,
        ingest,
        gw,
        ..
    } = stack().await;
    let (client, mqtt) = mqtt_elevator(&gw, "b1", "elev-1").await;
    let envelope = v1::Envelope {
        schema_version: SCHEMA_VERSION,
        device_id: "elev-1".into(),
        seq: 1,
        device_time: Some(Timestamp {
            seconds: 1_795_000_000,
            nanos: 0,
        }),
        body: Some(v1::envelope::Body::Event(v1::Event {
            kind: Some(v1::event::Kind::AlarmButtonPressed(
                v1::AlarmButtonPressed {},
            )),
        })),
    };
    client
        .publish(
            "lw/v1/b1/elev-1/up/event",
            rumqttc::QoS::AtLeastOnce,
            false,
            envelope.encode_to_vec(),
        )
        .await
        .unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (ingress, ingested) = loop {
        {
            let spans = spans.0.lock().unwrap();
            let ingress = spans.iter().find(|s| s.name == "mqtt_ingress").cloned();
            let ingested = spans.iter().find(|s| s.name == "telemetry_ingest").cloned();
            if let (Some(ingress), Some(ingested)) = (ingress, ingested) {
                break (ingress, ingested);
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans never exported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        ingested.span_context.trace_id(),
        ingress.span_context.trace_id(),
        "one trace"
    );
    assert_eq!(
        ingested.parent_span_id,
        ingress.span_context.span_id(),
        "telemetry continues the gateway's span"
    );
    assert!(ingested.parent_span_is_remote, "the context crossed NATS");

    // A dashboard request continues its caller's trace into the telemetry query.
    let auth = liftwire_api::auth::AuthConfig {
        hs256_secret: Some("trace-test-secret-trace-test-secret-01".into()),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop_api = tokio_util::sync::CancellationToken::new();
    let api = tokio::spawn(liftwire_api::serve_http(
        listener,
        liftwire_api::AppState::new(
            liftwire_api::auth::Authenticator::new(&auth).unwrap(),
            nats.client().await.unwrap(),
            0.0,
            1,
        ),
        1024,
        stop_api.clone(),
    ));
    let token = liftwire_api::auth::mint(
        &auth,
        "tracer",
        liftwire_api::auth::Role::Admin,
        &[],
        Duration::from_secs(60),
    )
    .unwrap();
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = reqwest::Client::new()
        .get(format!("{base}/api/v1/buildings/b1/live"))
        .bearer_auth(token)
        .header(
            "traceparent",
            format!("00-{caller_trace}-00f067aa0ba902b7-01"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (request, query) = loop {
        {
            let spans = spans.0.lock().unwrap();
            let request = spans.iter().find(|s| s.name == "http_request").cloned();
            let query = spans.iter().find(|s| s.name == "endpoint").cloned();
            if let (Some(request), Some(query)) = (request, query) {
                break (request, query);
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "API spans never exported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(request.span_context.trace_id().to_string(), caller_trace);
    assert_eq!(query.span_context.trace_id().to_string(), caller_trace);
    assert_eq!(
        query.parent_span_id,
        request.span_context.span_id(),
        "the telemetry query continues the API request's span"
    );
    stop_api.cancel();
    api.await.unwrap().unwrap();

    gw.running.stop().await;
    ingest.stop().await;
    mqtt.abort();
}
