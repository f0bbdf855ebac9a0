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
use liftwire_telemetry::presence::PresenceConfig;
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

/// Starts one telemetry replica; returns its context (readiness, metrics), stop token and task.
async fn replica(
    nats: &Nats,
    pg: &Postgres,
    ingest: IngestConfig,
) -> (BuildContext, CancellationToken, tokio::task::JoinHandle<()>) {
    let ctx = BuildContext::new();
    let config = liftwire_telemetry::Config {
        nats: NatsConfig {
            url: nats.url(),
            ..Default::default()
        },
        database: DatabaseConfig {
            url: pg.url(),
            // Short, so that outages surface fast.
            acquire_timeout: Duration::from_secs(1),
            ..Default::default()
        },
        ingest: IngestConfig {
            batch_wait: Duration::from_millis(50),
            max_backoff: Duration::from_millis(300),
            ..ingest
        },
        // Short, so that a silent gateway is noticed fast, yet ten heartbeats (200 ms) long, so
        // that a loaded machine's stall does not pass for a silent gateway.
        presence: PresenceConfig {
            gateway_timeout: Duration::from_secs(2),
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
    (ctx, stop, task)
}

/// Reads a counter (summed over its labels) from a replica's metrics.
fn counter(ctx: &BuildContext, name: &str) -> u64 {
    let text = ctx.admin_state().metrics_text().unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A running telemetry service with its own servers.
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
        Self::start_with(IngestConfig::default()).await
    }

    async fn start_with(ingest: IngestConfig) -> Self {
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
        let (ctx, stop, task) = replica(&nats, &pg, ingest).await;
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

    /// Subscribes to the watermarks published for `device`.
    async fn watermarks(&self, building: &str, device: &str) -> async_nats::Subscriber {
        let client = self.nats.client().await.unwrap();
        let watermarks = client
            .subscribe(format!("lw.v1.down.{building}.{device}.watermark"))
            .await
            .unwrap();
        client.flush().await.unwrap();
        watermarks
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

/// The next watermark at or above `at_least` (batches may split, so lower ones can come first).
async fn watermark_reaching(sub: &mut async_nats::Subscriber, at_least: u64) -> u64 {
    loop {
        let watermark = next_watermark(sub).await;
        if watermark >= at_least {
            return watermark;
        }
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
    let mut watermarks = rig.watermarks("b1", "elev-1").await;

    let topic = "lw/v1/b1/elev-1/up/event";
    for seq in [1, 2, 4] {
        rig.publish(topic, &event("elev-1", seq), true).await;
    }
    // A device resend after JetStream's de-duplication window: only the database can catch it.
    rig.publish(topic, &event("elev-1", 2), false).await;
    assert_eq!(
        watermark_reaching(&mut watermarks, 2).await,
        2,
        "3 is missing, so the watermark stops at 2"
    );
    eventually("3 rows", || async { rig.rows("elev-1").await == 3 }).await;

    rig.publish(topic, &event("elev-1", 3), true).await;
    assert_eq!(
        watermark_reaching(&mut watermarks, 3).await,
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
async fn text_postgresql_cannot_store_is_refused_and_the_watermark_passes_it() {
    // Stored before the gateway refused it: a fault whose description holds a NUL character,
    // which PostgreSQL cannot store in `text`.
    let rig = Rig::start().await;
    let mut watermarks = rig.watermarks("b1", "elev-1").await;
    let topic = "lw/v1/b1/elev-1/up/event";
    let mut fault = event("elev-1", 1);
    fault.body = Some(v1::envelope::Body::Event(v1::Event {
        kind: Some(v1::event::Kind::FaultRaised(v1::FaultRaised {
            fault_id: "f-1".into(),
            description: "door\0jammed".into(),
            ..Default::default()
        })),
    }));
    rig.publish(topic, &fault, true).await;
    rig.publish(topic, &event("elev-1", 2), true).await;
    assert_eq!(
        watermark_reaching(&mut watermarks, 2).await,
        2,
        "the refused message keeps its sequence number, so the watermark passes it"
    );
    assert_eq!(
        rig.rows("elev-1").await,
        2,
        "a placeholder and the valid message"
    );
    rig.stop().await;
}

#[tokio::test]
async fn a_batch_whose_dead_letter_cannot_be_stored_is_handed_back_not_left_to_time_out() {
    // An ack wait far beyond the test: only a negative acknowledgement brings the batch back.
    let rig = Rig::start_with(IngestConfig {
        ack_wait: Duration::from_secs(600),
        ..Default::default()
    })
    .await;
    rig.js.delete_stream(DEAD_LETTER_STREAM.name).await.unwrap();
    // One batch: a poison message and a valid one, published back to back.
    let up = Uplink::from_mqtt_topic("lw/v1/b1/elev-3/up/event").unwrap();
    let poison = rig
        .js
        .publish(up.nats_subject(), vec![0xde, 0xad].into())
        .await
        .unwrap();
    let valid = rig
        .js
        .publish(up.nats_subject(), event("elev-3", 1).encode_to_vec().into())
        .await
        .unwrap();
    poison.await.unwrap();
    valid.await.unwrap();
    eventually("the dead letter attempted", || async {
        counter(&rig.ctx, "liftwire_telemetry_ingest_dead_letters") >= 1
    })
    .await;

    let config = NatsConfig {
        url: rig.nats.url(),
        ..Default::default()
    };
    liftwire_runtime::nats::ensure_stream(&rig.js, &DEAD_LETTER_STREAM, &config)
        .await
        .unwrap();
    eventually("the valid message stored", || async {
        rig.rows("elev-3").await == 1
    })
    .await;
    rig.stop().await;
}

/// Stores a presence change of building b1's `device` in `LW_PRESENCE`, as a gateway that
/// names no run does.
async fn publish_presence(
    js: &jetstream::Context,
    device: &str,
    state: v1::PresenceState,
    seconds: i64,
) {
    publish_presence_from(js, "", device, state, seconds).await;
}

/// Stores a presence change of building b1's `device` in `LW_PRESENCE`, observed by gateway run
/// `run`.
async fn publish_presence_from(
    js: &jetstream::Context,
    run: &str,
    device: &str,
    state: v1::PresenceState,
    seconds: i64,
) {
    publish_presence_message(js, run, device, (state, false), seconds).await;
}

/// Stores gateway run `run`'s answer to a `PresenceRefresh` about building b1's `device`.
async fn publish_answer(
    js: &jetstream::Context,
    run: &str,
    device: &str,
    state: v1::PresenceState,
    seconds: i64,
) {
    publish_presence_message(js, run, device, (state, true), seconds).await;
}

async fn publish_presence_message(
    js: &jetstream::Context,
    run: &str,
    device: &str,
    (state, refresh): (v1::PresenceState, bool),
    seconds: i64,
) {
    use liftwire_proto::naming::{presence_subject, BuildingId, DeviceId};
    let message = v1::Presence {
        device_id: device.into(),
        building_id: "b1".into(),
        state: state as i32,
        at: Some(liftwire_proto::Timestamp { seconds, nanos: 0 }),
        gateway_run: run.into(),
        refresh,
        ..Default::default()
    };
    let subject = presence_subject(
        &BuildingId::new("b1").unwrap(),
        &DeviceId::new(device).unwrap(),
    );
    js.publish(subject, message.encode_to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Every recorded presence: (device, online), by device.
async fn recorded_presence(pg: &Postgres) -> Vec<(String, bool)> {
    let pool = pg.pool().await.unwrap();
    let rows = sqlx::query_as("SELECT device_id, online FROM device_presence ORDER BY device_id")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows
}

#[tokio::test]
async fn presence_changes_during_a_database_outage_are_recorded_once_it_is_back() {
    let mut rig = Rig::start().await;
    let t = 1_795_000_000;
    rig.pg.stop();
    publish_presence(&rig.js, "elev-1", v1::PresenceState::Offline, t).await;
    publish_presence(&rig.js, "elev-1", v1::PresenceState::Online, t + 1).await;
    publish_presence(&rig.js, "elev-2", v1::PresenceState::Offline, t).await;
    eventually("the outage noticed", || async {
        counter(&rig.ctx, "liftwire_telemetry_presence_record_failures") >= 1
    })
    .await;
    eventually("the waiting changes counted", || async {
        counter(&rig.ctx, "liftwire_telemetry_presence_pending") == 3
    })
    .await;
    rig.pg.restart().expect("postgres restarts");

    eventually("both devices recorded", || async {
        recorded_presence(&rig.pg).await.len() == 2
    })
    .await;
    eventually("each device's latest change", || async {
        recorded_presence(&rig.pg).await
            == [("elev-1".to_owned(), true), ("elev-2".to_owned(), false)]
    })
    .await;
    eventually("nothing pending", || async {
        counter(&rig.ctx, "liftwire_telemetry_presence_pending") == 0
    })
    .await;
    rig.stop().await;
}

#[tokio::test]
async fn a_presence_change_postgres_refuses_is_dropped_and_counted_not_retried_for_ever() {
    let rig = Rig::start().await;
    // A NUL in a text column: PostgreSQL refuses it however often it is tried.
    let bad = v1::Presence {
        device_id: "elev\0bad".into(),
        building_id: "b1".into(),
        state: v1::PresenceState::Online as i32,
        ..Default::default()
    };
    rig.js
        .publish("lw.v1.presence.b1.elev-bad", bad.encode_to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
    publish_presence(&rig.js, "elev-1", v1::PresenceState::Online, 1_795_000_000).await;
    eventually("the good change recorded", || async {
        recorded_presence(&rig.pg).await == [("elev-1".to_owned(), true)]
    })
    .await;
    eventually("the bad one dropped, and nothing left", || async {
        counter(&rig.ctx, "liftwire_telemetry_presence_rejected") == 1
            && counter(&rig.ctx, "liftwire_telemetry_presence_pending") == 0
    })
    .await;
    assert_eq!(
        counter(&rig.ctx, "liftwire_telemetry_presence_record_failures"),
        0
    );
    rig.stop().await;
}

#[tokio::test]
async fn presence_is_followed_again_after_its_stream_is_deleted_and_declared_again() {
    let rig = Rig::start().await;
    publish_presence(&rig.js, "elev-1", v1::PresenceState::Online, 1_795_000_000).await;
    eventually("recorded", || async {
        recorded_presence(&rig.pg).await.len() == 1
    })
    .await;
    // An operator wipes the stream; a gateway (or this replica) declares it again.
    rig.js
        .delete_stream(liftwire_proto::naming::PRESENCE_STREAM.name)
        .await
        .unwrap();
    let config = NatsConfig {
        url: rig.nats.url(),
        ..Default::default()
    };
    liftwire_runtime::nats::ensure_stream(
        &rig.js,
        &liftwire_proto::naming::PRESENCE_STREAM,
        &config,
    )
    .await
    .unwrap();
    publish_presence(&rig.js, "elev-2", v1::PresenceState::Online, 1_795_000_001).await;
    eventually("the change after the wipe recorded", || async {
        recorded_presence(&rig.pg).await.len() == 2
    })
    .await;
    rig.stop().await;
}

/// Sends gateway run `run`'s heartbeat every 200 ms until the task is aborted.
fn heartbeats(client: async_nats::Client, run: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let beat = v1::GatewayHeartbeat {
                gateway_id: format!("gw-{run}"),
                gateway_run: run.into(),
                at: Some(liftwire_proto::timestamp(std::time::SystemTime::now())),
            };
            client
                .publish(
                    format!("lw.v1.gateway.gw-{run}.heartbeat"),
                    beat.encode_to_vec().into(),
                )
                .await
                .unwrap();
        }
    })
}

fn unix_now() -> i64 {
    liftwire_proto::timestamp(std::time::SystemTime::now()).seconds
}

#[tokio::test(flavor = "multi_thread")]
async fn devices_of_a_gateway_whose_heartbeats_stop_are_recorded_offline() {
    let rig = Rig::start().await;
    let client = rig.nats.client().await.unwrap();
    let live = heartbeats(client.clone(), "live");
    let crashed = heartbeats(client.clone(), "crashed");
    let t = unix_now() - 60;
    publish_presence_from(&rig.js, "live", "elev-1", v1::PresenceState::Online, t).await;
    publish_presence_from(&rig.js, "crashed", "elev-2", v1::PresenceState::Online, t).await;
    publish_presence_from(&rig.js, "crashed", "elev-3", v1::PresenceState::Online, t).await;
    // A run that never sent a heartbeat at all (it crashed right after its first report).
    publish_presence_from(&rig.js, "never", "elev-4", v1::PresenceState::Online, t).await;
    // The run never heard from is lost once the replica has listened for the whole timeout...
    eventually("elev-4 offline", || async {
        recorded_presence(&rig.pg).await.get(3) == Some(&("elev-4".to_owned(), false))
    })
    .await;
    // ...and by then the runs still beating were judged alive.
    assert_eq!(
        recorded_presence(&rig.pg).await,
        [
            ("elev-1".to_owned(), true),
            ("elev-2".to_owned(), true),
            ("elev-3".to_owned(), true),
            ("elev-4".to_owned(), false),
        ],
        "only the run never heard from is lost so far"
    );

    crashed.abort();
    let _ = crashed.await;
    let silent_since = unix_now();
    eventually("the crashed run's devices offline", || async {
        recorded_presence(&rig.pg).await
            == [
                ("elev-1".to_owned(), true),
                ("elev-2".to_owned(), false),
                ("elev-3".to_owned(), false),
                ("elev-4".to_owned(), false),
            ]
    })
    .await;
    assert_eq!(
        counter(&rig.ctx, "liftwire_telemetry_presence_gateway_runs_lost"),
        2
    );
    assert_eq!(
        counter(&rig.ctx, "liftwire_telemetry_presence_devices_lost"),
        3
    );
    // Lost as of the run's last heartbeat, not of the sweep; the time of the last reported
    // change stays, so a report through another gateway made before the loss was noticed wins.
    let pool = rig.pg.pool().await.unwrap();
    let (at, lost_at): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT at, lost_at FROM device_presence WHERE device_id = 'elev-2'")
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    assert!(
        (silent_since - 2..=silent_since).contains(&lost_at.timestamp()),
        "lost at {lost_at}, heartbeats stopped at {silent_since}"
    );
    assert_eq!(at.timestamp(), t);
    publish_presence_from(&rig.js, "live", "elev-2", v1::PresenceState::Online, t + 1).await;
    eventually("elev-2 online through the live gateway", || async {
        recorded_presence(&rig.pg).await[1] == ("elev-2".to_owned(), true)
    })
    .await;

    // The "crashed" run was only stalled: heard again, it is asked where its lost devices are.
    let mut questions = client
        .subscribe("lw.v1.gateway.gw-crashed.presence-refresh")
        .await
        .unwrap();
    client.flush().await.unwrap();
    let resumed = heartbeats(client.clone(), "crashed");
    let question = tokio::time::timeout(WAIT, questions.next())
        .await
        .expect("a question")
        .unwrap();
    let question = v1::PresenceRefresh::decode(question.payload.as_ref()).unwrap();
    assert_eq!(question.gateway_run, "crashed");
    let asked: Vec<&str> = question
        .devices
        .iter()
        .map(|d| d.device_id.as_str())
        .collect();
    assert_eq!(asked, ["elev-3"], "elev-2 is no longer lost");
    // Its answers count only where a device is still lost under it: elev-2's, to an older
    // question, changes nothing (though newer than elev-2's last report, and online).
    let now = unix_now();
    publish_answer(&rig.js, "crashed", "elev-2", v1::PresenceState::Online, now).await;
    publish_answer(&rig.js, "crashed", "elev-3", v1::PresenceState::Online, now).await;
    eventually("elev-3 online again", || async {
        recorded_presence(&rig.pg).await[2] == ("elev-3".to_owned(), true)
    })
    .await;
    let pool = rig.pg.pool().await.unwrap();
    let (run, at): (String, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT gateway_run, at FROM device_presence WHERE device_id = 'elev-2'")
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    assert_eq!((run.as_str(), at.timestamp()), ("live", t + 1));
    assert!(counter(&rig.ctx, "liftwire_telemetry_presence_gateway_refreshes") >= 1);
    // Nothing of the run is lost any more: the questions stop (3 s without one is more than
    // the 2 s timeout between two questions, plus a heartbeat).
    let quiet = tokio::time::timeout(WAIT, async {
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(3), questions.next()).await
        {
        }
    })
    .await;
    assert!(quiet.is_ok(), "questions never stop");
    for task in [live, resumed] {
        task.abort();
        let _ = task.await;
    }
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leftover_connections_answer_never_beats_the_gateway_the_device_moved_to() {
    let rig = Rig::start().await;
    let client = rig.nats.client().await.unwrap();
    let t0 = unix_now() - 60;
    publish_presence_from(&rig.js, "a", "elev-7", v1::PresenceState::Online, t0).await;
    let a = heartbeats(client.clone(), "a");
    eventually("elev-7 online", || async {
        recorded_presence(&rig.pg).await == [("elev-7".to_owned(), true)]
    })
    .await;
    // Gateway a is cut off: elev-7 is recorded lost.
    a.abort();
    let _ = a.await;
    eventually("elev-7 lost", || async {
        recorded_presence(&rig.pg).await == [("elev-7".to_owned(), false)]
    })
    .await;
    // a comes back still holding the connection elev-7 left (its keep-alive has not closed it),
    // and answers online as of that connection's acceptance; elev-7's report through gateway b,
    // where it is really connected since t0 + 30, is recorded after that answer.
    publish_answer(&rig.js, "a", "elev-7", v1::PresenceState::Online, t0).await;
    publish_presence_from(&rig.js, "b", "elev-7", v1::PresenceState::Online, t0 + 30).await;
    // Then a's keep-alive closes the leftover.
    publish_presence_from(&rig.js, "a", "elev-7", v1::PresenceState::Offline, t0 + 40).await;
    publish_presence_from(&rig.js, "b", "elev-8", v1::PresenceState::Online, t0 + 41).await;
    eventually("every change recorded", || async {
        recorded_presence(&rig.pg).await.len() == 2
    })
    .await;
    let pool = rig.pg.pool().await.unwrap();
    let (online, run): (bool, String) = sqlx::query_as(
        "SELECT online, gateway_run FROM device_presence WHERE device_id = 'elev-7'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    assert_eq!((online, run.as_str()), (true, "b"));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_report_from_a_gateway_that_no_longer_holds_the_device_is_ignored() {
    let rig = Rig::start().await;
    let client = rig.nats.client().await.unwrap();
    let beats = [
        heartbeats(client.clone(), "a"),
        heartbeats(client.clone(), "b"),
    ];
    let t = unix_now() - 60;
    // elev-1 moved from gateway a to gateway b; a noticed its old connection was gone later.
    publish_presence_from(&rig.js, "a", "elev-1", v1::PresenceState::Online, t).await;
    publish_presence_from(&rig.js, "b", "elev-1", v1::PresenceState::Online, t + 1).await;
    publish_presence_from(&rig.js, "a", "elev-1", v1::PresenceState::Offline, t + 2).await;
    // The gateway that holds it reports it offline: that counts.
    publish_presence_from(&rig.js, "b", "elev-2", v1::PresenceState::Online, t).await;
    publish_presence_from(&rig.js, "b", "elev-2", v1::PresenceState::Offline, t + 1).await;
    // Changes are recorded in stream order: elev-2's last one comes after a's report on elev-1.
    eventually("elev-2 offline", || async {
        recorded_presence(&rig.pg).await.get(1) == Some(&("elev-2".to_owned(), false))
    })
    .await;
    assert_eq!(
        recorded_presence(&rig.pg).await,
        [("elev-1".to_owned(), true), ("elev-2".to_owned(), false)]
    );
    for beat in beats {
        beat.abort();
        let _ = beat.await;
    }
    rig.stop().await;
}

#[tokio::test]
async fn presence_changes_made_while_no_replica_runs_are_recorded_when_one_starts() {
    let mut rig = Rig::start().await;
    rig.stop.cancel();
    (&mut rig.task).await.unwrap();

    let t = 1_795_000_000;
    publish_presence(&rig.js, "elev-1", v1::PresenceState::Online, t).await;
    publish_presence(&rig.js, "elev-2", v1::PresenceState::Online, t).await;
    publish_presence(&rig.js, "elev-2", v1::PresenceState::Offline, t + 1).await;
    assert!(recorded_presence(&rig.pg).await.is_empty());

    (rig.ctx, rig.stop, rig.task) = replica(&rig.nats, &rig.pg, IngestConfig::default()).await;
    eventually("the changes recorded by the new replica", || async {
        recorded_presence(&rig.pg).await
            == [("elev-1".to_owned(), true), ("elev-2".to_owned(), false)]
    })
    .await;
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

/// A device's fault raised and cleared: two messages, one incident.
fn fault(device: &str, seq: u64, raised: bool) -> v1::Envelope {
    let mut envelope = event(device, seq);
    let id = format!("f{}", seq.div_ceil(2));
    envelope.body = Some(v1::envelope::Body::Event(v1::Event {
        kind: Some(if raised {
            v1::event::Kind::FaultRaised(v1::FaultRaised {
                fault_id: id,
                code: v1::FaultCode::DoorLock as i32,
                ..Default::default()
            })
        } else {
            v1::event::Kind::FaultCleared(v1::FaultCleared {
                fault_id: id,
                ..Default::default()
            })
        }),
    }));
    envelope
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_share_the_stream_and_never_double_process() {
    let rig = Rig::start().await;
    let small = IngestConfig {
        batch_size: 25,
        ..Default::default()
    };
    let (second, stop_second, task_second) = replica(&rig.nats, &rig.pg, small).await;
    const DEVICES: u64 = 8;
    const PER_DEVICE: u64 = 120;
    for seq in 1..=PER_DEVICE {
        for d in 0..DEVICES {
            let device = format!("elev-{d}");
            let topic = format!("lw/v1/b7/{device}/up/event");
            let envelope = fault(&device, seq, seq % 2 == 1);
            rig.publish(&topic, &envelope, true).await;
            if seq % 10 == 0 {
                // A device resend beyond JetStream's de-duplication: only the database catches it.
                rig.publish(&topic, &envelope, false).await;
            }
        }
    }
    let pool = rig.pg.pool().await.unwrap();
    eventually("every device fully persisted", || {
        let pool = pool.clone();
        async move {
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM device_watermarks WHERE persisted_seq = $1",
            )
            .bind(PER_DEVICE as i64)
            .fetch_one(&pool)
            .await
            .unwrap();
            done == DEVICES as i64
        }
    })
    .await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM device_messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        rows,
        (DEVICES * PER_DEVICE) as i64,
        "each sequence number once"
    );
    // Each raised/cleared pair is one closed fault incident: no message was folded twice.
    let incidents: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT device_id, count(*), count(ended_at) FROM incidents WHERE kind = 'fault'
         GROUP BY device_id ORDER BY device_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(incidents.len(), DEVICES as usize);
    for (device, count, closed) in incidents {
        assert_eq!(
            (count, closed),
            (PER_DEVICE as i64 / 2, PER_DEVICE as i64 / 2),
            "{device}"
        );
    }
    // Three faults in ten minutes is a burst: one alert per device, its repeats counted.
    let bursts: Vec<(i64, i32)> = sqlx::query_as(
        "SELECT count(*), max(occurrences) FROM alerts WHERE rule = 'fault_burst' GROUP BY device_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(bursts.len(), DEVICES as usize);
    assert!(bursts.iter().all(|(alerts, _)| *alerts == 1));
    let ingested = (
        counter(&rig.ctx, "liftwire_telemetry_ingest_messages_total"),
        counter(&second, "liftwire_telemetry_ingest_messages_total"),
    );
    assert!(
        ingested.0 > 0 && ingested.1 > 0,
        "both replicas took part: {ingested:?}"
    );
    stop_second.cancel();
    task_second.await.unwrap();
    rig.stop().await;
}

#[tokio::test]
async fn partitions_past_the_retention_are_dropped_whole() {
    use chrono::{Days, Utc};
    use liftwire_telemetry::partitions::{PartitionConfig, Partitions};
    let pg = Postgres::start().await.unwrap();
    let pool = pg.pool().await.unwrap();
    liftwire_telemetry::migrate(&pool).await.unwrap();
    let partitions = Partitions::new(PartitionConfig {
        retention_days: 30,
        premake_days: 2,
        ..Default::default()
    });
    let now = Utc::now();
    let today = now.date_naive();
    let old = today - Days::new(31);
    let kept = today - Days::new(29);
    partitions
        .ensure(&pool, &[old, kept].into_iter().collect())
        .await
        .unwrap();
    for (day, device) in [(old, "old"), (kept, "kept")] {
        sqlx::query(
            "INSERT INTO device_messages (device_id, seq, building_id, kind, at, received_at, payload)
             VALUES ($1, 1, 'b', 'event', $2, now(), '')",
        )
        .bind(device)
        .bind(day.and_hms_opt(12, 0, 0).unwrap().and_utc())
        .execute(&pool)
        .await
        .unwrap();
    }
    let done = partitions.maintain(&pool, now).await.unwrap();
    assert_eq!(done.dropped, [old]);
    assert_eq!(
        done.created,
        [today, today + Days::new(1), today + Days::new(2)],
        "today and the next days are made ahead"
    );
    let left: Vec<String> = sqlx::query_scalar("SELECT device_id FROM device_messages")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, ["kept"]);
    // A second pass has nothing to do.
    assert_eq!(
        partitions.maintain(&pool, now).await.unwrap(),
        Default::default()
    );

    // Behind a long read of the messages, a pass gives up its DDL rather than wait: waiting, it
    // would hold up every insert queued behind its exclusive lock.
    let expired = today - Days::new(40);
    partitions
        .ensure(&pool, &[expired].into_iter().collect())
        .await
        .unwrap();
    let mut reader = pool.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM device_messages")
        .execute(&mut *reader)
        .await
        .unwrap();
    let pass = tokio::time::timeout(WAIT, partitions.maintain(&pool, now))
        .await
        .expect("the pass gives up instead of waiting for the reader");
    assert!(pass.is_err(), "{pass:?}");
    reader.rollback().await.unwrap();
    assert_eq!(
        partitions.maintain(&pool, now).await.unwrap().dropped,
        [expired],
        "done at the next pass"
    );
}

/// The store writes new messages with a binary COPY, trusting its bookkeeping; a stored message
/// the bookkeeping does not know of (it never should) must not block the stream: the batch is
/// written again, skipping it.
#[tokio::test]
async fn a_stored_message_unknown_to_the_bookkeeping_does_not_block_the_batch() {
    use chrono::Utc;
    use liftwire_telemetry::ingest::{validate, Clock};
    use liftwire_telemetry::partitions::{PartitionConfig, Partitions};
    use liftwire_telemetry::state::FoldRules;
    use liftwire_telemetry::store;
    let pg = Postgres::start().await.unwrap();
    let pool = pg.pool().await.unwrap();
    liftwire_telemetry::migrate(&pool).await.unwrap();
    let clock = Clock {
        received_at: Utc::now(),
        oldest: Utc::now() - chrono::Duration::days(30),
        max_clock_skew: chrono::Duration::seconds(300),
    };
    let subject = "lw.v1.up.b1.elev-9.event";
    let payloads: Vec<bytes::Bytes> = (1..=3)
        .map(|seq| event("elev-9", seq).encode_to_vec().into())
        .collect();
    let rows = |seqs: std::ops::RangeInclusive<usize>| {
        seqs.map(|seq| validate(subject, &payloads[seq - 1], &clock).unwrap())
            .collect::<Vec<_>>()
    };
    let partitions = Partitions::new(PartitionConfig::default());
    partitions
        .ensure(&pool, &store::days(&rows(1..=3)))
        .await
        .unwrap();
    // Message 2 is in the log, but the device's bookkeeping does not know it.
    let stray = rows(2..=2).remove(0);
    sqlx::query(
        "INSERT INTO device_messages (device_id, seq, building_id, kind, at, received_at, payload)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&stray.device)
    .bind(stray.seq)
    .bind(&stray.building)
    .bind(stray.kind)
    .bind(stray.at)
    .bind(stray.received_at)
    .bind(stray.payload.as_ref())
    .execute(&pool)
    .await
    .unwrap();
    let outcome = store::write_batch(&pool, rows(1..=3), &FoldRules::default())
        .await
        .expect("the batch is written despite the stray row");
    assert_eq!(outcome.inserted, 2, "messages 1 and 3; 2 was there");
    assert_eq!(outcome.advanced.len(), 1);
    assert_eq!(outcome.advanced[0].persisted_seq, 3);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM device_messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 3);
    // Written again (a redelivery), nothing changes.
    let again = store::write_batch(&pool, rows(1..=3), &FoldRules::default())
        .await
        .unwrap();
    assert_eq!((again.inserted, again.advanced.len()), (0, 0));
}

#[tokio::test]
async fn a_value_postgresql_refuses_holds_up_neither_its_device_nor_the_batch() {
    use chrono::Utc;
    use liftwire_telemetry::ingest::{validate, Clock};
    use liftwire_telemetry::partitions::{PartitionConfig, Partitions};
    use liftwire_telemetry::state::FoldRules;
    use liftwire_telemetry::store;
    let pg = Postgres::start().await.unwrap();
    let pool = pg.pool().await.unwrap();
    liftwire_telemetry::migrate(&pool).await.unwrap();
    // Stands for any value the checks let through but PostgreSQL refuses (a year it cannot
    // store, a constraint): refused at every redelivery, it must not stall the batch.
    sqlx::query("ALTER TABLE device_messages ADD CONSTRAINT no_floor_13 CHECK (floor <> 13)")
        .execute(&pool)
        .await
        .unwrap();
    let clock = Clock {
        received_at: Utc::now(),
        oldest: Utc::now() - chrono::Duration::days(30),
        max_clock_skew: chrono::Duration::seconds(300),
    };
    let telemetry = |device: &str, seq: u64, floor: i32| {
        let mut envelope = event(device, seq);
        envelope.body = Some(v1::envelope::Body::Telemetry(v1::Telemetry {
            floor,
            ..Default::default()
        }));
        let subject = format!("lw.v1.up.b1.{device}.telemetry");
        validate(&subject, &envelope.encode_to_vec().into(), &clock).unwrap()
    };
    let rows = vec![
        telemetry("elev-7", 1, 13),
        telemetry("elev-7", 2, 2),
        telemetry("elev-8", 1, 4),
    ];
    Partitions::new(PartitionConfig::default())
        .ensure(&pool, &store::days(&rows))
        .await
        .unwrap();
    let outcome = store::write_batch(&pool, rows, &FoldRules::default())
        .await
        .expect("written despite the refused value");
    assert_eq!(outcome.unstorable, 1);
    let mut advanced: Vec<(String, i64)> = outcome
        .advanced
        .iter()
        .map(|a| (a.device_id.clone(), a.persisted_seq))
        .collect();
    advanced.sort();
    assert_eq!(advanced.last(), Some(&("elev-8".to_owned(), 1)));
    assert!(advanced.contains(&("elev-7".to_owned(), 2)), "{advanced:?}");
    let stored: Vec<(String, i64, String, Option<i32>)> = sqlx::query_as(
        "SELECT device_id, seq, kind, floor FROM device_messages ORDER BY device_id, seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        stored,
        [
            ("elev-7".to_owned(), 1, "rejected".to_owned(), None),
            ("elev-7".to_owned(), 2, "telemetry".to_owned(), Some(2)),
            ("elev-8".to_owned(), 1, "telemetry".to_owned(), Some(4)),
        ]
    );

    // Written device by device, a batch can fail part-way (here a device whose rows always
    // fail, as in an outage): what committed before comes back with the error, to be announced.
    store::write_batch(
        &pool,
        vec![telemetry("elev-9", 1, 6)],
        &FoldRules::default(),
    )
    .await
    .unwrap();
    for statement in [
        "CREATE FUNCTION fail_elev_9() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'elev-9 is unreachable'; END $$",
        "CREATE TRIGGER fail_elev_9 BEFORE UPDATE ON device_watermarks
           FOR EACH ROW WHEN (NEW.device_id = 'elev-9') EXECUTE FUNCTION fail_elev_9()",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    let rows = vec![
        telemetry("elev-7", 3, 13),
        telemetry("elev-8", 2, 5),
        telemetry("elev-9", 2, 6),
    ];
    let failed = store::write_batch(&pool, rows, &FoldRules::default())
        .await
        .expect_err("elev-9 fails");
    let mut committed: Vec<(String, i64)> = failed
        .committed
        .advanced
        .iter()
        .map(|a| (a.device_id.clone(), a.persisted_seq))
        .collect();
    committed.sort();
    assert_eq!(
        committed,
        [("elev-7".to_owned(), 3), ("elev-8".to_owned(), 2)],
        "{failed}"
    );
    assert_eq!(failed.committed.unstorable, 1);
}

async fn alert_states(pool: &sqlx::PgPool, device: &str) -> Vec<(String, String)> {
    sqlx::query_as("SELECT rule, state FROM alerts WHERE device_id = $1 ORDER BY rule")
        .bind(device)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn time_based_alerts_open_and_resolve_with_presence_service_and_self_tests() {
    use liftwire_proto::naming::{presence_subject, BuildingId, DeviceId};
    use liftwire_telemetry::alerts::AlertConfig;
    let nats = Nats::start().unwrap();
    let pg = Postgres::start().await.unwrap();
    let pool = pg.pool().await.unwrap();
    liftwire_telemetry::migrate(&pool).await.unwrap();
    let config = liftwire_telemetry::Config {
        nats: NatsConfig {
            url: nats.url(),
            ..Default::default()
        },
        database: DatabaseConfig {
            url: pg.url(),
            ..Default::default()
        },
        ingest: IngestConfig {
            batch_wait: Duration::from_millis(50),
            ..Default::default()
        },
        alerts: AlertConfig {
            out_of_service_after: Duration::from_secs(1),
            offline_after: Duration::from_secs(1),
            self_test_every: Duration::from_secs(2),
            evaluate_every: Duration::from_millis(200),
            ..Default::default()
        },
        ..Default::default()
    };
    let service = Telemetry::build(config, &BuildContext::new())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { service.run(stop).await.unwrap() }
    });
    let client = nats.client().await.unwrap();
    let js = jetstream::new(client.clone());
    let (building, device) = (
        BuildingId::new("b9").unwrap(),
        DeviceId::new("elev-9").unwrap(),
    );
    let presence = |state: v1::PresenceState| v1::Presence {
        device_id: device.to_string(),
        building_id: building.to_string(),
        state: state as i32,
        at: Some(liftwire_proto::timestamp(std::time::SystemTime::now())),
        ..Default::default()
    };
    let send = |seq: u64, kind: v1::event::Kind| {
        let js = js.clone();
        async move {
            let mut envelope = event("elev-9", seq);
            envelope.device_time = Some(liftwire_proto::timestamp(std::time::SystemTime::now()));
            envelope.body = Some(v1::envelope::Body::Event(v1::Event { kind: Some(kind) }));
            js.publish("lw.v1.up.b9.elev-9.event", envelope.encode_to_vec().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };

    let store_presence = |state: v1::PresenceState| {
        let js = js.clone();
        let subject = presence_subject(&building, &device);
        let payload = presence(state).encode_to_vec();
        async move {
            js.publish(subject, payload.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };

    store_presence(v1::PresenceState::Offline).await;
    eventually("the offline device recorded", || async {
        sqlx::query_scalar::<_, bool>("SELECT NOT online FROM device_presence")
            .fetch_optional(&pool)
            .await
            .unwrap()
            == Some(true)
    })
    .await;
    send(
        1,
        v1::event::Kind::FaultRaised(v1::FaultRaised {
            fault_id: "f1".into(),
            blocking: true,
            ..Default::default()
        }),
    )
    .await;
    eventually("offline, out-of-service and self-test alerts", || async {
        alert_states(&pool, "elev-9").await
            == [
                ("device_offline".to_string(), "open".to_string()),
                ("out_of_service".to_string(), "open".to_string()),
                ("self_test_missed".to_string(), "open".to_string()),
            ]
    })
    .await;

    store_presence(v1::PresenceState::Online).await;
    send(
        2,
        v1::event::Kind::FaultCleared(v1::FaultCleared {
            fault_id: "f1".into(),
            ..Default::default()
        }),
    )
    .await;
    send(
        3,
        v1::event::Kind::AlarmSelfTest(v1::AlarmSelfTest {
            passed: true,
            detail: String::new(),
        }),
    )
    .await;
    eventually("each alert resolved by its condition ending", || async {
        alert_states(&pool, "elev-9")
            .await
            .iter()
            .filter(|(_, state)| state == "resolved")
            .count()
            == 3
    })
    .await;
    let live = liftwire_telemetry::query::live_state(&pool, &building)
        .await
        .unwrap();
    assert!(live[0].online && live[0].in_service);
    // The self-test rule fires again once the passed test is older than its period: a new
    // alert, the resolved one stays resolved.
    eventually("a new self-test alert after the period", || async {
        alert_states(&pool, "elev-9").await.len() == 4
    })
    .await;
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_time_based_alert_is_not_raised_for_a_condition_ended_by_a_commit_in_progress() {
    use liftwire_telemetry::alerts::{evaluate, AlertConfig};
    let pg = Postgres::start().await.unwrap();
    let pool = pg.pool().await.unwrap();
    liftwire_telemetry::migrate(&pool).await.unwrap();
    // Out of service for an hour, self-tested just now: only the out-of-service rule matches.
    sqlx::query(
        "INSERT INTO device_watermarks (device_id, building_id, persisted_seq, state, tracked_since,
                                        out_of_service_since, last_passed_self_test_at)
         VALUES ('elev-1', 'b1', 1, '', now(), now() - interval '1 hour', now())",
    )
    .execute(&pool)
    .await
    .unwrap();
    // An ingest batch bringing it back into service, not committed yet.
    let mut ingest = pool.begin().await.unwrap();
    sqlx::query(
        "UPDATE device_watermarks SET out_of_service_since = NULL WHERE device_id = 'elev-1'",
    )
    .execute(&mut *ingest)
    .await
    .unwrap();
    let pass = tokio::spawn({
        let pool = pool.clone();
        async move { evaluate(&pool, &AlertConfig::default()).await }
    });
    // The pass read the old state, and now waits for the batch before raising.
    eventually("the pass waiting for the batch's row", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
            == 1
    })
    .await;
    ingest.commit().await.unwrap();
    let changes = pass.await.unwrap().unwrap();
    assert!(changes.is_empty(), "{} raised", changes.len());
    let alerts: i64 = sqlx::query_scalar("SELECT count(*) FROM alerts")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(alerts, 0);
}

#[tokio::test]
async fn a_partition_dropped_behind_the_replicas_back_is_made_again() {
    let rig = Rig::start().await;
    let mut watermarks = rig.watermarks("b1", "elev-1").await;
    let topic = "lw/v1/b1/elev-1/up/event";
    rig.publish(topic, &event("elev-1", 1), true).await;
    assert_eq!(watermark_reaching(&mut watermarks, 1).await, 1);
    // The replica believes the day's partition exists; an operator (or another replica's
    // retention) drops it.
    let second = event("elev-1", 2);
    let day = liftwire_proto::datetime(second.device_time.as_ref().unwrap())
        .unwrap()
        .date_naive();
    let pool = rig.pg.pool().await.unwrap();
    sqlx::query(&format!(
        "DROP TABLE {}",
        liftwire_telemetry::partitions::partition_name(day)
    ))
    .execute(&pool)
    .await
    .unwrap();
    rig.publish(topic, &second, true).await;
    assert_eq!(
        watermark_reaching(&mut watermarks, 2).await,
        2,
        "stored once the partition is made again"
    );
    let kind: String = sqlx::query_scalar("SELECT kind FROM device_messages WHERE seq = 2")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(kind, "event", "stored as itself, not as a placeholder");
    pool.close().await;
    rig.stop().await;
}
