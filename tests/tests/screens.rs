//! Simulated in-cabin screens show building-wide content: media come from object storage through
//! presigned URLs (never over MQTT), are verified against their reference, and each screen
//! acknowledges what it displayed.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use async_nats::jetstream;
use aws_sdk_s3::presigning::PresigningConfig;
use common::{eventually, gateway, registry_database, sim_settings};
use futures::StreamExt;
use liftwire_firmware_sim::run::run_fleet;
use liftwire_firmware_sim::FleetConfig;
use liftwire_proto::naming::UPLINK_STREAM;
use liftwire_proto::{v1, Message};
use liftwire_testkit::{Nats, Postgres, S3};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

async fn content(
    s3: &S3,
    id: &str,
    version: u64,
    image: &[u8],
    declared_sha256: Vec<u8>,
) -> v1::Downlink {
    let key = format!("content/{id}.png");
    s3.client()
        .put_object()
        .bucket(s3.bucket())
        .key(&key)
        .body(image.to_vec().into())
        .send()
        .await
        .unwrap();
    let url = s3
        .client()
        .get_object()
        .bucket(s3.bucket())
        .key(&key)
        .presigned(PresigningConfig::expires_in(Duration::from_secs(600)).unwrap())
        .await
        .unwrap();
    v1::Downlink {
        message_id: format!("{id}-{version}"),
        issued_at: None,
        body: Some(v1::downlink::Body::ScreenContent(v1::ScreenContent {
            content_id: id.into(),
            version,
            title: "Ascenseur en maintenance lundi".into(),
            media: vec![v1::ObjectRef {
                bucket: s3.bucket().into(),
                key,
                size: image.len() as u64,
                sha256: declared_sha256,
                content_type: "image/png".into(),
                presigned: Some(v1::PresignedUrl {
                    url: url.uri().to_owned(),
                    method: "GET".into(),
                    expires_at: None,
                }),
            }],
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn screens_fetch_media_by_reference_verify_it_and_acknowledge() {
    let nats = Nats::start().unwrap();
    let pg = Postgres::start().await.unwrap();
    let s3 = S3::start().await.unwrap();
    let registry_url = registry_database(&pg).await;
    let gw = gateway(&nats, &registry_url, "127.0.0.1:0".parse().unwrap()).await;

    let data_dir = tempfile::tempdir().unwrap();
    let fleet = FleetConfig {
        buildings: 1,
        elevators_per_building: 2,
        ..Default::default()
    };
    // Elevators stay still (speed 0): only the screens speak.
    let settings = sim_settings(gw.addr, data_dir.path(), 0.0);
    let fleet_stop = CancellationToken::new();
    let fleet_run = tokio::spawn({
        let stop = fleet_stop.clone();
        async move {
            run_fleet(&fleet, settings, Some(&registry_url), stop)
                .await
                .unwrap()
        }
    });
    eventually(
        "the fleet is connected",
        Duration::from_secs(20),
        || async { gw.metrics().contains("liftwire_gateway_connections 4") },
    )
    .await;

    let image = b"\x89PNG fake image bytes of a notice".repeat(50);
    let good = content(&s3, "notice-1", 1, &image, Sha256::digest(&image).to_vec()).await;
    // A reference whose digest does not match the stored bytes must not be shown. (Each audience
    // has one current content, like MQTT retain: so this one goes to one screen's own slot.)
    let tampered = content(&s3, "notice-2", 1, &image, vec![0; 32]).await;
    let js = jetstream::new(nats.client().await.unwrap());
    js.publish(
        "lw.v1.down.sim-b01._all.screen-content",
        good.encode_to_vec().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    js.publish(
        "lw.v1.down.sim-b01.sim-b01-e01-s.screen-content",
        tampered.encode_to_vec().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let stream = js.get_stream(UPLINK_STREAM.name).await.unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut acks = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // Collect for a while after the expected two, so an unexpected third would be seen.
    let mut quiet_until = None;
    while quiet_until.is_none_or(|t| tokio::time::Instant::now() < t)
        && tokio::time::Instant::now() < deadline
    {
        if acks.len() >= 2 && quiet_until.is_none() {
            quiet_until = Some(tokio::time::Instant::now() + Duration::from_secs(1));
        }
        let mut batch = consumer
            .fetch()
            .max_messages(10)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .unwrap();
        while let Some(message) = batch.next().await {
            let message = message.unwrap();
            let envelope = v1::Envelope::decode(message.payload.as_ref()).unwrap();
            if let Some(v1::envelope::Body::ScreenAck(ack)) = envelope.body {
                acks.push((message.subject.to_string(), ack));
            }
        }
    }
    acks.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(acks.len(), 2, "{acks:?}");
    assert_eq!(acks[0].0, "lw.v1.up.sim-b01.sim-b01-e01-s.screen-ack");
    assert_eq!(acks[1].0, "lw.v1.up.sim-b01.sim-b01-e02-s.screen-ack");
    for (_, ack) in &acks {
        assert_eq!(
            (ack.content_id.as_str(), ack.content_version),
            ("notice-1", 1)
        );
        assert!(ack.displayed_at.is_some());
    }
    fleet_stop.cancel();
    fleet_run.await.unwrap();
    gw.running.stop().await;
}
