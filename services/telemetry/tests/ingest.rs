//! Ingest against a real nats-server (JetStream) and a real PostgreSQL.

// Helpers outside #[test] functions panic on purpose: a failed setup fails the test.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use liftwire_proto::naming::{uplink_msg_id, Uplink, DEAD_LETTER_STREAM, UPLINK_STREAM};
use liftwire_proto::{v1, Message, SCHEMA_VERSION};
use liftwire_runtime::database::DatabaseConfig;
use liftwire_runtime::nats::NatsConfig;
use liftwire_runtime::service::BuildContext;
use liftwire_runtime::service::Service;
use liftwire_telemetry::ingest::IngestConfig;
use liftwire_telemetry::Telemetry;
use liftwire_testkit::{Nats, Postgres};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

fn event(device: &str, seq: u64) -> v1::Envelope {
    v1::Envelope {
        schema_version: SCHEMA_VERSION,
        device_id: device.into(),
        seq,
        device_time: Some(liftwire_proto::timestamp(
            std::time::SystemTime::now() - Duration::from_secs(3600) + Duration::from_secs(seq),
        )),
        body: Some(v1::envelope::Body::Event(v1::Event {
            kind: Some(v1::event::Kind::DoorCycle(v1::DoorCycle {
                door: 0,
                floor: 2,
                cycle_ms: 5_000,
                reopens: 0,
            })),
        })),
    }
}

/// A running ingest with its own servers.
struct Rig {
    nats: Nats,
    pg: Postgres,
    js: jetstream::Context,
    ctx: BuildContext,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Rig {
    async fn start() -> Self {
        let nats = Nats::start().expect("nats");
        let pg = Postgres::start().await.expect("postgres");
        // The service's own pool settings, with a short acquire timeout so outages surface fast.
        let pool = DatabaseConfig {
            url: pg.url(),
            acquire_timeout: Duration::from_secs(1),
            ..Default::default()
        }
        .pool()
        .unwrap();
        liftwire_telemetry::migrate(&pool)
            .await
            .expect("migrations apply");
        // Running them again is a no-op.
        liftwire_telemetry::migrate(&pool)
            .await
            .expect("migrations are idempotent");
        let client = nats.client().await.unwrap();
        let ctx = BuildContext::new();
        let config = liftwire_telemetry::Config {
            nats: NatsConfig {
                url: nats.url(),
                ..Default::default()
            },
            database: DatabaseConfig {
                url: pg.url(),
                acquire_timeout: Duration::from_secs(1),
                ..Default::default()
            },
            ingest: IngestConfig {
                batch_wait: Duration::from_millis(50),
                max_backoff: Duration::from_millis(300),
                ..Default::default()
            },
            ..Default::default()
        };
        let service = Telemetry::build(config, &ctx)
            .await
            .expect("telemetry builds");
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { service.run(stop).await.expect("telemetry runs") }
        });
        Rig {
            nats,
            pg,
            js: jetstream::new(client),
            ctx,
            stop,
            task,
        }
    }

    async fn publish(&self, topic: &str, envelope: &v1::Envelope, dedupe: bool) {
        let up = Uplink::from_mqtt_topic(topic).unwrap();
        let mut headers = async_nats::HeaderMap::new();
        if dedupe {
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                uplink_msg_id(&up.device, envelope.seq).as_str(),
            );
        }
        self.js
            .publish_with_headers(up.nats_subject(), headers, envelope.encode_to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn rows(&self, device: &str) -> i64 {
        let pool = self.pg.pool().await.unwrap();
        let n = sqlx::query_scalar("SELECT count(*) FROM device_messages WHERE device_id = $1")
            .bind(device)
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        n
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

/// Polls `check` until it returns true, failing the test after [`WAIT`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn next_watermark(sub: &mut async_nats::Subscriber) -> u64 {
    let message = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("a watermark")
        .expect("open");
    match v1::Downlink::decode(message.payload.as_ref()).unwrap().body {
        Some(v1::downlink::Body::Watermark(w)) => w.persisted_seq,
        other => panic!("expected a watermark, got {other:?}"),
    }
}

#[tokio::test]
async fn stores_each_sequence_once_and_publishes_contiguous_watermarks() {
    let rig = Rig::start().await;
    let client = rig.nats.client().await.unwrap();
    let mut watermarks = client
        .subscribe("lw.v1.down.b1.elev-1.watermark")
        .await
        .unwrap();
    client.flush().await.unwrap();

    let topic = "lw/v1/b1/elev-1/up/event";
    for seq in [1, 2, 4] {
        rig.publish(topic, &event("elev-1", seq), true).await;
    }
    // A device resend after JetStream's de-duplication window: only the database can catch it.
    rig.publish(topic, &event("elev-1", 2), false).await;
    assert_eq!(
        next_watermark(&mut watermarks).await,
        2,
        "3 is missing, so the watermark stops at 2"
    );
    eventually("3 rows", || async { rig.rows("elev-1").await == 3 }).await;

    rig.publish(topic, &event("elev-1", 3), true).await;
    assert_eq!(
        next_watermark(&mut watermarks).await,
        4,
        "the gap is filled"
    );
    assert_eq!(rig.rows("elev-1").await, 4);

    let mut stream = rig.js.get_stream(UPLINK_STREAM.name).await.unwrap();
    let consumer: jetstream::consumer::PullConsumer =
        stream.get_consumer("telemetry-ingest").await.unwrap();
    eventually("every message acknowledged", || {
        let mut consumer = consumer.clone();
        async move {
            let info = consumer.info().await.unwrap();
            info.num_ack_pending == 0 && info.num_pending == 0
        }
    })
    .await;
    assert_eq!(stream.info().await.unwrap().state.messages, 5);
    rig.stop().await;
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_and_do_not_block_the_stream() {
    let rig = Rig::start().await;
    let up = Uplink::from_mqtt_topic("lw/v1/b1/elev-2/up/event").unwrap();
    rig.js
        .publish(up.nats_subject(), vec![0xde, 0xad, 0xbe, 0xef].into())
        .await
        .unwrap()
        .await
        .unwrap();
    // Valid protobuf, but another device's id: never trusted.
    rig.publish("lw/v1/b1/elev-2/up/event", &event("elev-9", 1), false)
        .await;
    rig.publish("lw/v1/b1/elev-2/up/event", &event("elev-2", 1), true)
        .await;

    eventually("the valid message stored", || async {
        rig.rows("elev-2").await == 1
    })
    .await;
    assert_eq!(rig.rows("elev-9").await, 0);

    let dlq = rig.js.get_stream(DEAD_LETTER_STREAM.name).await.unwrap();
    let consumer = dlq
        .create_consumer(jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut letters = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let mut reasons = Vec::new();
    while let Some(letter) = letters.next().await {
        let letter = v1::DeadLetter::decode(letter.unwrap().payload.as_ref()).unwrap();
        assert_eq!(letter.device_id, "elev-2");
        assert_eq!(letter.source, "telemetry");
        reasons.push(letter.reason);
    }
    reasons.sort();
    assert_eq!(reasons, ["decode", "device_mismatch"]);
    rig.stop().await;
}

#[tokio::test]
async fn postgres_restart_mid_stream_loses_nothing() {
    let mut rig = Rig::start().await;
    let topic = "lw/v1/b2/elev-3/up/event";
    for seq in 1..=20 {
        rig.publish(topic, &event("elev-3", seq), true).await;
    }
    eventually("first half stored", || async {
        rig.rows("elev-3").await == 20
    })
    .await;

    rig.pg.stop();
    for seq in 21..=40 {
        rig.publish(topic, &event("elev-3", seq), true).await;
    }
    let readiness = rig.ctx.readiness.clone();
    eventually("ingest notices the database is down", || {
        let readiness = readiness.clone();
        async move { readiness.not_ready().contains(&"database") }
    })
    .await;
    rig.pg.restart().expect("postgres restarts");

    eventually("second half stored after recovery", || async {
        rig.rows("elev-3").await == 40
    })
    .await;
    eventually("ready again", || {
        let readiness = readiness.clone();
        async move { readiness.not_ready().is_empty() }
    })
    .await;
    let pool = rig.pg.pool().await.unwrap();
    let watermark: i64 = sqlx::query_scalar(
        "SELECT persisted_seq FROM device_watermarks WHERE device_id = 'elev-3'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(watermark, 40);
    rig.stop().await;
}
