//! One trace follows a device message: the gateway's MQTT ingress span, propagated through NATS
//! headers, is the parent of the telemetry service's ingest span.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{gateway, registry_database, telemetry};
use liftwire_gateway::acl::DeviceKind;
use liftwire_proto::naming::{BuildingId, DeviceId};
use liftwire_proto::{v1, Message, Timestamp, SCHEMA_VERSION};
use liftwire_testkit::{Nats, Postgres};
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

    let nats = Nats::start().unwrap();
    let pg = Postgres::start().await.unwrap();
    let registry_url = registry_database(&pg).await;
    let (_pool, ingest) = telemetry(&nats, &pg).await;
    let gw = gateway(&nats, &registry_url, "127.0.0.1:0".parse().unwrap()).await;
    let addr = gw.addr;
    let secret = gw
        .registry
        .provision(
            &BuildingId::new("b1").unwrap(),
            &DeviceId::new("elev-1").unwrap(),
            DeviceKind::Elevator,
        )
        .await
        .unwrap();

    let mut options = rumqttc::MqttOptions::new("elev-1", addr.ip().to_string(), addr.port());
    options.set_credentials("elev-1", secret);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 8);
    let mqtt = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
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

    gw.running.stop().await;
    ingest.stop().await;
    mqtt.abort();
}
