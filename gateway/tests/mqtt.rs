//! The gateway against real MQTT clients, a real nats-server (JetStream) and a real PostgreSQL
//! registry: each of rumqttd's gaps the gateway closes is proven here.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::{connect_packet, envelope, login, provision, servers, Device, Replica, WAIT};
use futures::StreamExt;
use liftwire_gateway::acl::DeviceKind;
use liftwire_proto::mqtt;
use liftwire_proto::naming::{DeviceId, DEAD_LETTER_STREAM, PRESENCE_STREAM, UPLINK_STREAM};
use liftwire_proto::{v1, Message};
use liftwire_runtime::nats::{ensure_stream, NatsConfig};

async fn stream_messages(
    js: &jetstream::Context,
    stream: &str,
    expected: usize,
) -> Vec<jetstream::Message> {
    let stream = js.get_stream(stream).await.unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while out.len() < expected && tokio::time::Instant::now() < deadline {
        let mut batch = consumer
            .fetch()
            .max_messages(100)
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .unwrap();
        let before = out.len();
        while let Some(message) = batch.next().await {
            out.push(message.unwrap());
        }
        if out.len() == before {
            // Nothing yet: let the bridge work instead of asking nats-server again at once.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn device_uplink_lands_in_jetstream_attributed_and_deduplicated() {
    common::tracing_with_opentelemetry();
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let client = nats.client().await.unwrap();
    let mut presence = client.subscribe("lw.v1.presence.b1.elev-1").await.unwrap();
    client.flush().await.unwrap();

    let device = Device::connect(gw.addr, "elev-1", "elev-1", &secret)
        .connected()
        .await;
    let online = tokio::time::timeout(WAIT, presence.next())
        .await
        .unwrap()
        .unwrap();
    let online = v1::Presence::decode(online.payload.as_ref()).unwrap();
    assert_eq!(
        (online.state(), online.gateway_id.as_str()),
        (v1::PresenceState::Online, "gw-1")
    );

    device
        .publish("lw/v1/b1/elev-1/up/event", envelope("elev-1", 1))
        .await;
    // The same sequence number again (a resend): JetStream keeps one copy.
    device
        .publish("lw/v1/b1/elev-1/up/event", envelope("elev-1", 1))
        .await;
    device
        .publish("lw/v1/b1/elev-1/up/event", envelope("elev-1", 2))
        .await;

    let js = jetstream::new(client.clone());
    let stored = stream_messages(&js, UPLINK_STREAM.name, 2).await;
    assert_eq!(stored.len(), 2);
    let seqs: Vec<u64> = stored
        .iter()
        .map(|m| v1::Envelope::decode(m.payload.as_ref()).unwrap().seq)
        .collect();
    assert_eq!(
        seqs,
        [1, 2],
        "seq 2 was published after the resend of 1, so the resend was dropped"
    );
    let mut uplink = js.get_stream(UPLINK_STREAM.name).await.unwrap();
    assert_eq!(uplink.info().await.unwrap().state.messages, 2);
    // Counted as what they were, once the bridge has the acks: two messages stored, one resend.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = gw.metrics();
        if metrics.contains("liftwire_gateway_uplink_messages_total{kind=\"event\"} 2")
            && metrics.contains("liftwire_gateway_uplink_duplicates_total 1")
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = &stored[0];
    assert_eq!(first.subject.as_str(), "lw.v1.up.b1.elev-1.event");
    let headers = first.headers.as_ref().unwrap();
    assert_eq!(
        headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .unwrap()
            .as_str(),
        "elev-1:1"
    );
    assert!(
        headers.get("traceparent").is_some(),
        "trace context travels with the message"
    );
    assert_eq!(v1::Envelope::decode(first.payload.as_ref()).unwrap().seq, 1);

    device.client.disconnect().await.unwrap();
    let offline = tokio::time::timeout(WAIT, presence.next())
        .await
        .unwrap()
        .unwrap();
    let offline = v1::Presence::decode(offline.payload.as_ref()).unwrap();
    assert_eq!(offline.state(), v1::PresenceState::Offline);
    assert_eq!(offline.reason(), v1::DisconnectReason::Graceful);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn each_device_message_is_head_sampled_and_the_decision_travels_in_its_traceparent() {
    common::tracing_with_opentelemetry();
    let (nats, pg) = servers().await;
    let replica = |name, ratio| {
        Replica::start_with_config(&nats, &pg, name, move |config| {
            config.runtime.observability.trace_sample_ratio = ratio;
        })
    };
    let never = replica("gw-never", 0.0).await;
    let always = replica("gw-always", 1.0).await;
    let mut devices = Vec::new();
    for (gw, device) in [(&never, "elev-1"), (&always, "elev-2")] {
        let secret = provision(gw, "b1", device, DeviceKind::Elevator).await;
        let client = Device::connect(gw.addr, device, device, &secret)
            .connected()
            .await;
        for seq in 1..=3 {
            client
                .publish(
                    &format!("lw/v1/b1/{device}/up/event"),
                    envelope(device, seq),
                )
                .await;
        }
        devices.push(client);
    }

    let js = jetstream::new(nats.client().await.unwrap());
    let stored = stream_messages(&js, UPLINK_STREAM.name, 6).await;
    assert_eq!(stored.len(), 6);
    let mut trace_ids = std::collections::HashSet::new();
    for message in &stored {
        let traceparent = message
            .headers
            .as_ref()
            .and_then(|h| h.get("traceparent"))
            .unwrap_or_else(|| panic!("{} has no traceparent", message.subject))
            .to_string();
        let fields: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(fields.len(), 4, "{traceparent}");
        let expected = if message.subject.as_str().contains("elev-1") {
            "00"
        } else {
            "01"
        };
        assert_eq!(fields[3], expected, "{}: {traceparent}", message.subject);
        trace_ids.insert(fields[1].to_owned());
    }
    assert_eq!(trace_ids.len(), 6, "one trace per device message");
    never.stop().await;
    always.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn each_gateway_run_names_itself_in_presence_and_sends_heartbeats_while_it_runs() {
    let (nats, pg) = servers().await;
    let client = nats.client().await.unwrap();
    let mut beats = client
        .subscribe("lw.v1.gateway.gw-1.heartbeat")
        .await
        .unwrap();
    let mut presence = client.subscribe("lw.v1.presence.b1.elev-1").await.unwrap();
    let mut elsewhere = client.subscribe("lw.v1.presence.b2.elev-9").await.unwrap();
    let mut unasked = client.subscribe("lw.v1.presence.b2.elev-8").await.unwrap();
    client.flush().await.unwrap();
    let mut runs = Vec::new();
    let mut secret = None;
    for _ in 0..2 {
        let gw = Replica::start_with_config(&nats, &pg, "gw-1", |config| {
            config.heartbeat_interval = Duration::from_millis(100);
        })
        .await;
        let secret = match &secret {
            Some(secret) => secret,
            None => secret.insert(provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await),
        };
        let device = Device::connect(gw.addr, "elev-1", "elev-1", secret)
            .connected()
            .await;
        let next = async |subscriber: &mut async_nats::Subscriber| {
            tokio::time::timeout(WAIT, subscriber.next())
                .await
                .unwrap()
                .unwrap()
        };
        let online = v1::Presence::decode(next(&mut presence).await.payload.as_ref()).unwrap();
        assert_eq!(online.state(), v1::PresenceState::Online);
        // The previous run's last heartbeats may still be queued.
        let beat = loop {
            let beat =
                v1::GatewayHeartbeat::decode(next(&mut beats).await.payload.as_ref()).unwrap();
            if !runs.contains(&beat.gateway_run) {
                break beat;
            }
        };
        assert_eq!(beat.gateway_id, "gw-1");
        assert_eq!(beat.gateway_run, online.gateway_run, "one run, named alike");
        assert!(beat.at.is_some());
        // Telemetry recorded devices of the run lost while it was silent: asked where they are,
        // the run answers online for the one it holds and offline for the other (a question to
        // another run is ignored).
        let lost = |device: &str, building: &str| v1::presence_refresh::LostDevice {
            device_id: device.into(),
            building_id: building.into(),
        };
        for (run, devices) in [
            ("another-run", vec![lost("elev-8", "b2")]),
            (
                online.gateway_run.as_str(),
                vec![lost("elev-1", "b1"), lost("elev-9", "b2")],
            ),
        ] {
            let refresh = v1::PresenceRefresh {
                gateway_run: run.into(),
                devices,
            };
            client
                .publish(
                    "lw.v1.gateway.gw-1.presence-refresh",
                    refresh.encode_to_vec().into(),
                )
                .await
                .unwrap();
        }
        let again = v1::Presence::decode(next(&mut presence).await.payload.as_ref()).unwrap();
        assert_eq!(again.state(), v1::PresenceState::Online);
        assert_eq!(again.gateway_run, online.gateway_run);
        assert!(again.refresh && !online.refresh);
        assert_eq!(
            again.at, online.at,
            "as of the connection's acceptance, so a newer report through another gateway wins"
        );
        let gone = v1::Presence::decode(next(&mut elsewhere).await.payload.as_ref()).unwrap();
        assert_eq!(
            (gone.state(), gone.refresh, gone.gateway_run.as_str()),
            (
                v1::PresenceState::Offline,
                true,
                online.gateway_run.as_str()
            )
        );
        // The question to another run (asked first) got no answer.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), unasked.next())
                .await
                .is_err(),
            "a question to another run was answered"
        );
        device.client.disconnect().await.unwrap();
        let offline = v1::Presence::decode(next(&mut presence).await.payload.as_ref()).unwrap();
        assert_eq!(offline.gateway_run, online.gateway_run);
        gw.stop().await;
        runs.push(online.gateway_run);
    }
    assert_ne!(runs[0], runs[1], "a restart is a new run");
    // Stopped: the heartbeats stop too (500 ms without one is five intervals).
    let quiet = tokio::time::timeout(WAIT, async {
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(500), beats.next()).await
        {
        }
    })
    .await;
    assert!(quiet.is_ok(), "heartbeats go on after the gateway stopped");
}

#[tokio::test(flavor = "multi_thread")]
async fn keep_alive_closes_a_silent_device_and_spares_one_that_pings() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PINGRESP: [u8; 2] = [0xD0, 0x00];
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let mut streams = Vec::new();
    let mut started = None;
    for device in ["elev-1", "elev-2"] {
        let secret = provision(&gw, "b1", device, DeviceKind::Elevator).await;
        let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        // The silent device's keep-alive runs from its CONNECT, which the gateway reads after
        // this instant (taken before, a late wake-up on the CONNACK cannot shorten the wait).
        started.get_or_insert_with(std::time::Instant::now);
        // Keep-alive 1 s: the gateway may close after 1.5 s without a packet.
        common::login_with_keep_alive(&mut stream, device, &secret, 1).await;
        streams.push(stream);
    }
    let (mut silent, mut pinging) = (streams.remove(0), streams.remove(0));
    let started = started.unwrap();
    let mut ping = tokio::time::interval(Duration::from_millis(400));
    let pong = async |pinging: &mut tokio::net::TcpStream| {
        pinging.write_all(&mqtt::PINGREQ).await.unwrap();
        let mut answer = [0u8; 2];
        tokio::time::timeout(WAIT, pinging.read_exact(&mut answer))
            .await
            .expect("the pinging device is answered")
            .unwrap();
        assert_eq!(answer, PINGRESP);
    };
    tokio::time::timeout(WAIT, async {
        let mut byte = [0u8; 1];
        loop {
            tokio::select! {
                read = silent.read(&mut byte) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => panic!("the silent device was sent {byte:?}"),
                },
                _ = ping.tick() => pong(&mut pinging).await,
            }
        }
    })
    .await
    .expect("the silent device is closed");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "closed after {waited:?}, before 1.5 × its keep-alive"
    );
    // Connected longer than its keep-alive, and still served.
    pong(&mut pinging).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_credentials_unknown_and_reserved_ids_are_refused_and_counted() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;

    for (client_id, username, password) in [
        ("elev-1", "elev-1", "lwd_wrong"),
        ("elev-9", "elev-9", secret.as_str()),
        ("elev-1", "someone-else", secret.as_str()),
        ("_liftwire-bridge", "_liftwire-bridge", secret.as_str()),
    ] {
        let mut device = Device::connect(gw.addr, client_id, username, password);
        let why = device.closed().await;
        assert!(!why.is_empty(), "{client_id}/{username} must be refused");
    }
    let metrics = gw.metrics();
    for reason in [
        "bad_secret",
        "unknown_device",
        "username_mismatch",
        "invalid_client_id",
    ] {
        assert!(
            metrics.contains(&format!(
                "liftwire_gateway_auth_failures_total{{reason=\"{reason}\"}} 1"
            )),
            "{reason}: {metrics}"
        );
    }
    // The right secret still works.
    Device::connect(gw.addr, "elev-1", "elev-1", &secret)
        .connected()
        .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn access_rules_disconnect_offenders_without_hurting_others() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let a = provision(&gw, "b1", "elev-a", DeviceKind::Elevator).await;
    let b = provision(&gw, "b1", "elev-b", DeviceKind::Elevator).await;
    let mut victim = Device::connect(gw.addr, "elev-b", "elev-b", &b)
        .connected()
        .await;
    victim.subscribe("lw/v1/b1/elev-b/down/+").await;

    // Reading everybody's data: refused.
    let mut snoop = Device::connect(gw.addr, "elev-a", "elev-a", &a)
        .connected()
        .await;
    snoop.subscribe("#").await;
    snoop.closed().await;
    // Publishing as another device: refused, and nothing reaches NATS on its behalf.
    let mut spoof = Device::connect(gw.addr, "elev-a", "elev-a", &a)
        .connected()
        .await;
    spoof
        .publish("lw/v1/b1/elev-b/up/event", envelope("elev-b", 1))
        .await;
    spoof.closed().await;
    // Publishing to a device's downlink: refused.
    let mut inject = Device::connect(gw.addr, "elev-a", "elev-a", &a)
        .connected()
        .await;
    inject
        .publish("lw/v1/b1/elev-b/down/command", b"x".to_vec())
        .await;
    inject.closed().await;

    let metrics = gw.metrics();
    assert!(
        metrics.contains("liftwire_gateway_acl_violations_total{reason=\"foreign_filter\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("liftwire_gateway_acl_violations_total{reason=\"foreign_topic\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("liftwire_gateway_acl_violations_total{reason=\"publish_topic\"} 1"),
        "{metrics}"
    );

    // The victim is still connected, received nothing injected, and publishes normally.
    assert!(victim.quiet_for(Duration::from_millis(300)).await);
    victim
        .publish("lw/v1/b1/elev-b/up/event", envelope("elev-b", 1))
        .await;
    let js = jetstream::new(nats.client().await.unwrap());
    let stored = stream_messages(&js, UPLINK_STREAM.name, 1).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].subject.as_str(), "lw.v1.up.b1.elev-b.event");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn untrusted_payloads_are_dead_lettered_and_flawed_ones_bridged() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let device = Device::connect(gw.addr, "elev-1", "elev-1", &secret)
        .connected()
        .await;
    device
        .publish("lw/v1/b1/elev-1/up/event", vec![0xff, 0x01, 0x02])
        .await;
    device
        .publish("lw/v1/b1/elev-1/up/event", envelope("elev-2", 1))
        .await;
    device
        .publish("lw/v1/b1/elev-1/up/telemetry", envelope("elev-1", 1))
        .await;
    device
        .publish("lw/v1/b1/elev-1/up/event", envelope("elev-1", 0))
        .await;
    // Trusted device and sequence number, flawed content: bridged (and counted) for telemetry to
    // keep its place in the sequence, so the device's watermark passes it.
    let mut nul = v1::Envelope::decode(envelope("elev-1", 4).as_slice()).unwrap();
    nul.body = Some(v1::envelope::Body::Event(v1::Event {
        kind: Some(v1::event::Kind::FaultRaised(v1::FaultRaised {
            fault_id: "f-1".into(),
            description: "door\0jammed".into(),
            ..Default::default()
        })),
    }));
    device
        .publish("lw/v1/b1/elev-1/up/event", nul.encode_to_vec())
        .await;
    device
        .publish("lw/v1/b1/elev-1/up/event", envelope("elev-1", 5))
        .await;

    let js = jetstream::new(nats.client().await.unwrap());
    let letters = stream_messages(&js, DEAD_LETTER_STREAM.name, 3).await;
    let mut reasons: Vec<String> = letters
        .iter()
        .map(|m| {
            let letter = v1::DeadLetter::decode(m.payload.as_ref()).unwrap();
            assert_eq!(
                (letter.source.as_str(), letter.device_id.as_str()),
                ("gateway", "elev-1")
            );
            letter.reason
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["decode", "device_mismatch", "zero_sequence"]);
    let stored = stream_messages(&js, UPLINK_STREAM.name, 3).await;
    let stored: Vec<(&str, u64)> = stored
        .iter()
        .map(|m| {
            let envelope = v1::Envelope::decode(m.payload.as_ref()).unwrap();
            (m.subject.as_str(), envelope.seq)
        })
        .collect();
    assert_eq!(
        stored,
        [
            ("lw.v1.up.b1.elev-1.telemetry", 1),
            ("lw.v1.up.b1.elev-1.event", 4),
            ("lw.v1.up.b1.elev-1.event", 5),
        ],
        "the flawed messages and the valid one went through"
    );
    let metrics = gw.metrics();
    for reason in ["kind_mismatch", "nul_in_text"] {
        assert!(
            metrics.contains(&format!(
                "liftwire_gateway_uplink_flaws_total{{reason=\"{reason}\"}} 1"
            )),
            "{metrics}"
        );
    }
    gw.stop().await;
}

/// Records command `c-1` for elev-1 of b1, as the control endpoint does.
async fn insert_command(pool: &sqlx::PgPool) {
    sqlx::query(
        "INSERT INTO device_commands (command_id, building_id, device_id, kind, requested_by, expires_at)
         VALUES ('c-1', 'b1', 'elev-1', 'reboot', 'tech', now() + interval '1 hour')",
    )
    .execute(pool)
    .await
    .unwrap();
}

/// elev-1's envelope answering `command_id` with `status` and `detail`.
fn command_result(command_id: &str, status: v1::CommandStatus, detail: &str) -> Vec<u8> {
    let mut envelope = v1::Envelope::decode(envelope("elev-1", 1).as_slice()).unwrap();
    envelope.body = Some(v1::envelope::Body::CommandResult(v1::CommandResult {
        command_id: command_id.into(),
        status: status as i32,
        detail: detail.into(),
        output: None,
    }));
    envelope.encode_to_vec()
}

/// Waits until `command_id` has `status` in the registry.
async fn until_status(pool: &sqlx::PgPool, command_id: &str, status: v1::CommandStatus) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now: i32 =
            sqlx::query_scalar("SELECT status FROM device_commands WHERE command_id = $1")
                .bind(command_id)
                .fetch_one(pool)
                .await
                .unwrap();
        if now == status as i32 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{command_id} never {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn command_results_with_unstorable_text_are_dropped_and_late_ones_never_move_a_status_back() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let pool = gw.registry.pool();
    insert_command(pool).await;
    let result_with = |status, detail: &str| command_result("c-1", status, detail);
    let result = |detail: &str| result_with(v1::CommandStatus::Succeeded, detail);
    let subject = "lw.v1.up.b1.elev-1.command-result";
    // Stored before the bridge refused NUL characters: PostgreSQL cannot store it, so it is
    // ignored (and acknowledged) instead of failing at every redelivery.
    let recorded = liftwire_gateway::control::record_result(pool, subject, &result("a\0b"))
        .await
        .expect("not a database error");
    assert!(!recorded);
    assert!(
        liftwire_gateway::control::record_result(pool, subject, &result("rebooted"))
            .await
            .unwrap()
    );
    let detail: String =
        sqlx::query_scalar("SELECT detail FROM device_commands WHERE command_id = 'c-1'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(detail, "rebooted");

    // Recorded late (redelivered, or by another replica): the outcome stays.
    for late in [v1::CommandStatus::Accepted, v1::CommandStatus::Failed] {
        assert!(!liftwire_gateway::control::record_result(
            pool,
            subject,
            &result_with(late, "late")
        )
        .await
        .unwrap());
    }
    let (status, detail): (i32, String) =
        sqlx::query_as("SELECT status, detail FROM device_commands WHERE command_id = 'c-1'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(
        (status, detail.as_str()),
        (v1::CommandStatus::Succeeded as i32, "rebooted")
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_sent_while_its_device_was_away_reaches_it_when_it_subscribes() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let client = nats.client().await.unwrap();
    // A technician reboots the elevator while its controller is offline.
    let request = v1::CommandRequest {
        building_id: "b1".into(),
        device_id: "elev-1".into(),
        command: Some(v1::Command {
            kind: Some(v1::command::Kind::Reboot(v1::Reboot {})),
            ..Default::default()
        }),
        requested_by: "tech".into(),
    };
    let reply = client
        .request(
            liftwire_proto::naming::service_subject("gateway", "command").unwrap(),
            request.encode_to_vec().into(),
        )
        .await
        .unwrap();
    let record = v1::CommandRecord::decode(reply.payload.as_ref()).unwrap();

    let mut device = Device::connect(gw.addr, "elev-1", "elev-1", &secret)
        .connected()
        .await;
    device.subscribe("lw/v1/b1/elev-1/down/+").await;
    let (topic, payload, _) = device.message().await;
    assert_eq!(topic, "lw/v1/b1/elev-1/down/command");
    let Some(v1::downlink::Body::Command(command)) =
        v1::Downlink::decode(payload.as_slice()).unwrap().body
    else {
        panic!("a command")
    };
    assert_eq!(command.command_id, record.command_id);

    // Answered: it is no longer sent at the next subscription.
    device
        .publish(
            "lw/v1/b1/elev-1/up/command-result",
            command_result(&record.command_id, v1::CommandStatus::Accepted, ""),
        )
        .await;
    until_status(
        gw.registry.pool(),
        &record.command_id,
        v1::CommandStatus::Accepted,
    )
    .await;
    drop(device);
    let mut device = Device::connect(gw.addr, "elev-1", "elev-1", &secret)
        .connected()
        .await;
    device.subscribe("lw/v1/b1/elev-1/down/+").await;
    assert!(device.quiet_for(Duration::from_millis(500)).await);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn command_results_are_followed_again_after_their_consumer_is_deleted() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let pool = gw.registry.pool();
    insert_command(pool).await;
    let js = jetstream::new(nats.client().await.unwrap());
    let uplink = js.get_stream(UPLINK_STREAM.name).await.unwrap();
    // Wait for the follower's consumer, then an operator deletes it.
    let deadline = tokio::time::Instant::now() + WAIT;
    while uplink
        .consumer_info(liftwire_gateway::control::RESULTS_CONSUMER)
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no results consumer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    uplink
        .delete_consumer(liftwire_gateway::control::RESULTS_CONSUMER)
        .await
        .unwrap();

    js.publish(
        "lw.v1.up.b1.elev-1.command-result",
        command_result("c-1", v1::CommandStatus::Succeeded, "rebooted").into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    until_status(pool, "c-1", v1::CommandStatus::Succeeded).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_packet_over_the_size_limit_closes_only_its_connection_and_is_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (nats, pg) = servers().await;
    let gw = Replica::start_with(&nats, &pg, "gw-1", |mqtt| mqtt.max_payload_bytes = 1024).await;
    let a = provision(&gw, "b1", "elev-a", DeviceKind::Elevator).await;
    let b = provision(&gw, "b1", "elev-b", DeviceKind::Elevator).await;
    let bystander = Device::connect(gw.addr, "elev-b", "elev-b", &b)
        .connected()
        .await;
    let mut socket = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    login(&mut socket, "elev-a", &a).await;
    let topic = "lw/v1/b1/elev-a/up/event";

    // Accepted first, then a publish one byte over the limit.
    let mut packet = Vec::new();
    mqtt::put_publish(&mut packet, topic, Some(1), false, &envelope("elev-a", 1));
    socket.write_all(&packet).await.unwrap();
    let mut puback = [0u8; 4];
    tokio::time::timeout(WAIT, socket.read_exact(&mut puback))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(puback, [0x40, 0x02, 0, 1]);
    let mut oversized = Vec::new();
    mqtt::put_publish(&mut oversized, topic, Some(2), false, &[0u8; 1025]);
    // The gateway may close before reading it all: the write's outcome is not the point.
    let _ = socket.write_all(&oversized).await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, socket.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the connection is closed after the oversized packet"
    );
    assert!(
        rest.is_empty(),
        "no PUBACK for the refused packet: {rest:?}"
    );

    let metrics = gw.metrics();
    assert!(
        metrics.contains("liftwire_gateway_packet_errors_total{reason=\"too_large\"} 1"),
        "{metrics}"
    );
    // The other device is untouched; only the accepted message and the bystander's are stored.
    bystander
        .publish("lw/v1/b1/elev-b/up/event", envelope("elev-b", 1))
        .await;
    let js = jetstream::new(nats.client().await.unwrap());
    let stored = stream_messages(&js, UPLINK_STREAM.name, 2).await;
    let mut subjects: Vec<&str> = stored.iter().map(|m| m.subject.as_str()).collect();
    subjects.sort_unstable();
    assert_eq!(
        subjects,
        ["lw.v1.up.b1.elev-a.event", "lw.v1.up.b1.elev-b.event"]
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn downlink_reaches_exactly_the_addressed_device_on_any_replica_and_content_is_retained() {
    let (nats, pg) = servers().await;
    let gw1 = Replica::start(&nats, &pg, "gw-1").await;
    let gw2 = Replica::start(&nats, &pg, "gw-2").await;
    let s1 = provision(&gw1, "b1", "screen-1", DeviceKind::Screen).await;
    let s2 = provision(&gw1, "b1", "screen-2", DeviceKind::Screen).await;
    let s3 = provision(&gw1, "b1", "screen-3", DeviceKind::Screen).await;

    let mut one = Device::connect(gw1.addr, "screen-1", "screen-1", &s1)
        .connected()
        .await;
    let mut two = Device::connect(gw2.addr, "screen-2", "screen-2", &s2)
        .connected()
        .await;
    for (device, id) in [(&mut one, "screen-1"), (&mut two, "screen-2")] {
        device.subscribe(&format!("lw/v1/b1/{id}/down/+")).await;
        device.subscribe("lw/v1/b1/_all/down/+").await;
    }

    let client = nats.client().await.unwrap();
    let command = v1::Downlink {
        message_id: "m-1".into(),
        issued_at: None,
        body: Some(v1::downlink::Body::Command(v1::Command {
            command_id: "c-1".into(),
            ..Default::default()
        })),
    };
    client
        .publish(
            "lw.v1.down.b1.screen-2.command",
            command.encode_to_vec().into(),
        )
        .await
        .unwrap();
    let (topic, payload, _) = two.message().await;
    assert_eq!(topic, "lw/v1/b1/screen-2/down/command");
    assert_eq!(v1::Downlink::decode(payload.as_slice()).unwrap(), command);
    assert!(
        one.quiet_for(Duration::from_millis(300)).await,
        "screen-1 must not see screen-2's command"
    );

    let content = v1::Downlink {
        message_id: "m-2".into(),
        issued_at: None,
        body: Some(v1::downlink::Body::ScreenContent(v1::ScreenContent {
            content_id: "notice-1".into(),
            version: 3,
            title: "Lift maintenance on Monday".into(),
            ..Default::default()
        })),
    };
    let js = jetstream::new(client.clone());
    js.publish(
        "lw.v1.down.b1._all.screen-content",
        content.encode_to_vec().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    for device in [&mut one, &mut two] {
        let (topic, payload, _) = device.message().await;
        assert_eq!(topic, "lw/v1/b1/_all/down/screen-content");
        assert_eq!(v1::Downlink::decode(payload.as_slice()).unwrap(), content);
    }

    // A screen that connects later, to either replica, gets the current content at once.
    let mut three = Device::connect(gw2.addr, "screen-3", "screen-3", &s3)
        .connected()
        .await;
    three.subscribe("lw/v1/b1/_all/down/+").await;
    let (topic, payload, retain) = three.message().await;
    assert_eq!(topic, "lw/v1/b1/_all/down/screen-content");
    assert!(retain);
    assert_eq!(v1::Downlink::decode(payload.as_slice()).unwrap(), content);

    // A replica started after the content was published serves it too.
    let gw3 = Replica::start(&nats, &pg, "gw-3").await;
    drop(three);
    let mut late = Device::connect(gw3.addr, "screen-3", "screen-3", &s3)
        .connected()
        .await;
    late.subscribe("lw/v1/b1/_all/down/+").await;
    let (_, payload, retain) = late.message().await;
    assert!(retain);
    assert_eq!(v1::Downlink::decode(payload.as_slice()).unwrap(), content);

    gw1.stop().await;
    gw2.stop().await;
    gw3.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_devices_are_disconnected_and_refused_within_seconds() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let mut device = Device::connect(gw.addr, "elev-1", "elev-1", &secret)
        .connected()
        .await;

    let started = tokio::time::Instant::now();
    gw.registry
        .revoke(&DeviceId::new("elev-1").unwrap())
        .await
        .unwrap();
    device.closed().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "disconnected within seconds"
    );

    let mut again = Device::connect(gw.addr, "elev-1", "elev-1", &secret);
    again.closed().await;
    assert!(gw
        .metrics()
        .contains("liftwire_gateway_auth_failures_total{reason=\"revoked\"} 1"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rotating_a_secret_ends_the_sessions_that_logged_in_with_the_old_one() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let leaked = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let other = provision(&gw, "b1", "elev-2", DeviceKind::Elevator).await;
    // Whoever holds the leaked secret is connected when the operator rotates it.
    let mut intruder = Device::connect(gw.addr, "elev-1", "elev-1", &leaked)
        .connected()
        .await;
    let _bystander = Device::connect(gw.addr, "elev-2", "elev-2", &other)
        .connected()
        .await;
    let fresh = gw
        .registry
        .rotate(&DeviceId::new("elev-1").unwrap())
        .await
        .unwrap();
    intruder.closed().await;
    let mut again = Device::connect(gw.addr, "elev-1", "elev-1", &leaked);
    again.closed().await;
    assert!(gw
        .metrics()
        .contains("liftwire_gateway_auth_failures_total{reason=\"bad_secret\"}"));

    // The device with its new secret gets in and stays; the other device was never touched.
    let mut device = Device::connect(gw.addr, "elev-1", "elev-1", &fresh)
        .connected()
        .await;
    assert!(device.quiet_for(Duration::from_secs(3)).await);
    assert!(gw.metrics().contains("liftwire_gateway_connections 2"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_committed_late_with_an_earlier_time_still_disconnects() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let mut device = Device::connect(gw.addr, "elev-1", "elev-1", &secret)
        .connected()
        .await;
    // A revoking transaction that started long ago and commits now: its `now()` is its start.
    sqlx::query(
        "UPDATE devices SET revoked_at = now() - interval '10 minutes',
                updated_at = now() - interval '10 minutes' WHERE device_id = 'elev-1'",
    )
    .execute(gw.registry.pool())
    .await
    .unwrap();
    device.closed().await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mqtt5_properties_never_reach_mqtt311_clients() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS as QoS5;

    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let old = provision(&gw, "b1", "elev-v4", DeviceKind::Elevator).await;
    let new = provision(&gw, "b1", "elev-v5", DeviceKind::Elevator).await;
    let mut v4 = Device::connect(gw.addr, "elev-v4", "elev-v4", &old)
        .connected()
        .await;
    v4.subscribe("lw/v1/b1/elev-v4/down/+").await;
    v4.subscribe("lw/v1/b1/_all/down/+").await;

    let mut options =
        rumqttc::v5::MqttOptions::new("elev-v5", gw.addr_v5.ip().to_string(), gw.addr_v5.port());
    options.set_credentials("elev-v5", new.as_str());
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 16);
    let events = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(event) = eventloop.poll().await {
            seen.push(format!("{event:?}"));
        }
        seen
    });
    let properties = PublishProperties {
        user_properties: vec![("firmware".into(), "4.2".into())],
        content_type: Some("application/x-protobuf".into()),
        message_expiry_interval: Some(60),
        ..Default::default()
    };
    client
        .publish_with_properties(
            "lw/v1/b1/elev-v5/up/event",
            QoS5::AtLeastOnce,
            false,
            envelope("elev-v5", 1),
            properties.clone(),
        )
        .await
        .unwrap();
    // Trying to reach the v4 device's topics with properties is an access violation.
    client
        .publish_with_properties(
            "lw/v1/b1/_all/down/command",
            QoS5::AtLeastOnce,
            true,
            b"x".to_vec(),
            properties,
        )
        .await
        .unwrap();

    let js = jetstream::new(nats.client().await.unwrap());
    let stored = stream_messages(&js, UPLINK_STREAM.name, 1).await;
    assert_eq!(stored[0].subject.as_str(), "lw.v1.up.b1.elev-v5.event");
    let seen = tokio::time::timeout(WAIT, events).await.unwrap().unwrap();
    assert!(seen.iter().any(|e| e.contains("ConnAck")), "{seen:?}");

    // The v4 client's connection is intact and still gets its downlink.
    let command = v1::Downlink {
        message_id: "m".into(),
        issued_at: None,
        body: Some(v1::downlink::Body::Command(v1::Command::default())),
    };
    let client = nats.client().await.unwrap();
    client
        .publish(
            "lw.v1.down.b1.elev-v4.command",
            command.encode_to_vec().into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    let (topic, _, _) = v4.message().await;
    assert_eq!(topic, "lw/v1/b1/elev-v4/down/command");
    assert!(gw
        .metrics()
        .contains("liftwire_gateway_acl_violations_total{reason=\"publish_topic\"} 1"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flooding_device_is_cut_off_its_limit_outlives_the_connection_and_others_are_not_starved()
{
    let (nats, pg) = servers().await;
    // One token every 100 s: none comes back during the test.
    let gw = Replica::start_with(&nats, &pg, "gw-1", |mqtt| {
        mqtt.rate_limit_per_second = 0.01;
        mqtt.rate_limit_burst = 5.0;
    })
    .await;
    let noisy = provision(&gw, "b1", "elev-noisy", DeviceKind::Elevator).await;
    let calm = provision(&gw, "b1", "elev-calm", DeviceKind::Elevator).await;
    let mut flood = Device::connect(gw.addr, "elev-noisy", "elev-noisy", &noisy)
        .connected()
        .await;
    let quiet = Device::connect(gw.addr, "elev-calm", "elev-calm", &calm)
        .connected()
        .await;
    // The burst passes; the message after it gets no PUBACK and closes the connection, so the
    // device keeps it for its resend.
    for seq in 1..=6 {
        flood
            .publish("lw/v1/b1/elev-noisy/up/event", envelope("elev-noisy", seq))
            .await;
    }
    flood.closed().await;
    // Reconnecting buys no fresh burst, nor does a second connection taking over a live one.
    let mut again = Device::connect(gw.addr, "elev-noisy", "elev-noisy", &noisy)
        .connected()
        .await;
    let mut takeover = Device::connect(gw.addr, "elev-noisy", "elev-noisy", &noisy)
        .connected()
        .await;
    takeover
        .publish("lw/v1/b1/elev-noisy/up/event", envelope("elev-noisy", 6))
        .await;
    takeover.closed().await;
    again.closed().await;
    for seq in 1..=3 {
        quiet
            .publish("lw/v1/b1/elev-calm/up/event", envelope("elev-calm", seq))
            .await;
    }
    let js = jetstream::new(nats.client().await.unwrap());
    let stored = stream_messages(&js, UPLINK_STREAM.name, 8).await;
    let count = |device: &str| stored.iter().filter(|m| m.subject.contains(device)).count();
    assert_eq!(count("elev-calm"), 3, "the calm device is not starved");
    assert_eq!(count("elev-noisy"), 5, "the burst, once");
    assert!(
        gw.metrics()
            .contains("liftwire_gateway_uplink_dropped_total{reason=\"rate_limited\"} 2"),
        "{}",
        gw.metrics()
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mosquitto_clients_publish_and_receive_through_the_gateway() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("envelope.bin");
    std::fs::write(&payload, envelope("elev-1", 1)).unwrap();
    let port = gw.addr.port().to_string();
    let auth = [
        "-h",
        "127.0.0.1",
        "-p",
        port.as_str(),
        "-i",
        "elev-1",
        "-u",
        "elev-1",
        "-P",
        secret.as_str(),
    ];

    let published = tokio::process::Command::new("mosquitto_pub")
        .args(auth)
        .args(["-q", "1", "-t", "lw/v1/b1/elev-1/up/event", "-f"])
        .arg(&payload)
        .output()
        .await
        .expect("mosquitto_pub is installed by deploy/setup.sh");
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );
    let js = jetstream::new(nats.client().await.unwrap());
    assert_eq!(stream_messages(&js, UPLINK_STREAM.name, 1).await.len(), 1);

    // mosquitto_sub gets a retained downlink as soon as it subscribes.
    let watermark = v1::Downlink {
        message_id: "w".into(),
        issued_at: None,
        body: Some(v1::downlink::Body::Watermark(v1::Watermark {
            persisted_seq: 1,
        })),
    };
    js.publish(
        "lw.v1.down.b1.elev-1.watermark",
        watermark.encode_to_vec().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let received = tokio::process::Command::new("mosquitto_sub")
        .args(auth)
        .args(["-t", "lw/v1/b1/elev-1/down/+", "-C", "1", "-W", "10", "-N"])
        .output()
        .await
        .unwrap();
    assert!(
        received.status.success(),
        "{}",
        String::from_utf8_lossy(&received.stderr)
    );
    assert_eq!(
        v1::Downlink::decode(received.stdout.as_slice()).unwrap(),
        watermark
    );

    // Subscribing to everything is refused: mosquitto_sub is disconnected.
    let snoop = tokio::process::Command::new("mosquitto_sub")
        .args(auth)
        .args(["-t", "#", "-C", "1", "-W", "5"])
        .output()
        .await
        .unwrap();
    assert!(!snoop.status.success() && snoop.stdout.is_empty());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_stops_accepting_and_flushes_accepted_messages() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let mut device = Device::connect(gw.addr, "elev-1", "elev-1", &secret)
        .connected()
        .await;
    for seq in 1..=50 {
        device
            .publish("lw/v1/b1/elev-1/up/event", envelope("elev-1", seq))
            .await;
    }
    // Wait until the gateway has read all 50 (they are acknowledged), then stop it.
    until("messages bridged", || {
        gw.metrics()
            .contains("liftwire_gateway_uplink_messages_total{kind=\"event\"} 50")
    })
    .await;
    let addr = gw.addr;
    let stopped = tokio::time::Instant::now();
    gw.stop().await;
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "stopped within the grace period"
    );
    device.closed().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
    let js = jetstream::new(nats.client().await.unwrap());
    let mut stream = js.get_stream(UPLINK_STREAM.name).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 50);
}

#[tokio::test(flavor = "multi_thread")]
async fn downlink_never_stalls_past_the_routers_link_buffer() {
    // rumqttd stops serving an in-process link after ~200 unread notifications unless it answers
    // `Unschedule`; a thousand QoS 1 downlink messages must all arrive.
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let mut device = Device::connect(gw.addr, "elev-1", "elev-1", &secret)
        .connected()
        .await;
    device.subscribe("lw/v1/b1/elev-1/down/+").await;
    let client = nats.client().await.unwrap();
    for i in 0..1_000 {
        let command = v1::Downlink {
            message_id: format!("m-{i}"),
            issued_at: None,
            body: Some(v1::downlink::Body::Command(v1::Command {
                command_id: format!("c-{i}"),
                ..Default::default()
            })),
        };
        client
            .publish(
                "lw.v1.down.b1.elev-1.command",
                command.encode_to_vec().into(),
            )
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    for i in 0..1_000 {
        let (_, payload, _) = device.message().await;
        let Some(v1::downlink::Body::Command(command)) =
            v1::Downlink::decode(payload.as_slice()).unwrap().body
        else {
            panic!("a command")
        };
        assert_eq!(
            command.command_id,
            format!("c-{i}"),
            "in order, none missing"
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_flow_while_the_retained_stream_is_unavailable() {
    let (mut nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let mut device = Device::connect(gw.addr, "elev-1", "elev-1", &secret)
        .connected()
        .await;
    device.subscribe("lw/v1/b1/elev-1/down/+").await;
    // The retained stream is gone, and NATS restarts: the gateway opens its retained consumers
    // again, which keeps failing.
    let js = jetstream::new(nats.client().await.unwrap());
    js.delete_stream(liftwire_proto::naming::RETAINED_STREAM.name)
        .await
        .unwrap();
    nats_outage(&mut nats, &gw).await;
    until("the gateway fails to open the retained consumers", || {
        counter(&gw, "liftwire_gateway_retained_open_failures_total") >= 1
    })
    .await;

    // Commands are core NATS: repeat one until the gateway, reconnected, passes it on.
    let client = nats.client().await.unwrap();
    let command = v1::Downlink {
        message_id: "m-1".into(),
        issued_at: None,
        body: Some(v1::downlink::Body::Command(v1::Command {
            command_id: "c-1".into(),
            ..Default::default()
        })),
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        client
            .publish(
                "lw.v1.down.b1.elev-1.command",
                command.encode_to_vec().into(),
            )
            .await
            .unwrap();
        client.flush().await.unwrap();
        if !device.quiet_for(Duration::from_millis(300)).await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no command passed while LW_RETAINED is unavailable"
        );
    }
    // And they keep flowing while the gateway keeps failing to open the retained consumers.
    while !device.quiet_for(Duration::from_millis(300)).await {
        assert!(
            tokio::time::Instant::now() < deadline + WAIT,
            "the device kept receiving, or closed"
        );
    }
    for _ in 0..5 {
        client
            .publish(
                "lw.v1.down.b1.elev-1.command",
                command.encode_to_vec().into(),
            )
            .await
            .unwrap();
        client.flush().await.unwrap();
        let (topic, _, _) = device.message().await;
        assert_eq!(topic, "lw/v1/b1/elev-1/down/command");
        assert!(device.quiet_for(Duration::from_millis(300)).await);
    }
    gw.stop().await;
}

/// Stops NATS until `gw` has noticed, for a few of its downlink's connection checks (every
/// 250 ms), so that it opens its retained consumers again once NATS is back; then restarts it.
async fn nats_outage(nats: &mut liftwire_testkit::Nats, gw: &Replica) {
    nats.stop();
    until("the gateway notices NATS is gone", || {
        gw.ctx.readiness.not_ready().contains(&"nats")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(750)).await;
    nats.restart().unwrap();
}

/// The value of one of the gateway's metrics (0 when absent).
fn counter(gw: &Replica, name: &str) -> u64 {
    gw.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// Screen `screen-1` of b1, connected and subscribed to its building's downlink.
async fn subscribed_screen(gw: &Replica) -> Device {
    let secret = provision(gw, "b1", "screen-1", DeviceKind::Screen).await;
    let mut screen = Device::connect(gw.addr, "screen-1", "screen-1", &secret)
        .connected()
        .await;
    screen.subscribe("lw/v1/b1/_all/down/+").await;
    screen
}

/// Version `version` of b1's notice for its screens.
fn screen_content(version: u64) -> v1::Downlink {
    v1::Downlink {
        message_id: format!("m-{version}"),
        issued_at: None,
        body: Some(v1::downlink::Body::ScreenContent(v1::ScreenContent {
            content_id: "notice-1".into(),
            version,
            ..Default::default()
        })),
    }
}

/// Stores version `version` of b1's notice in `LW_RETAINED`.
async fn store_screen_content(js: &jetstream::Context, version: u64) {
    js.publish(
        "lw.v1.down.b1._all.screen-content",
        screen_content(version).encode_to_vec().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// Checks that the next message `screen` gets is version `version` of the notice.
async fn expect_screen_content(screen: &mut Device, version: u64) {
    let (_, payload, _) = screen.message().await;
    assert_eq!(
        v1::Downlink::decode(payload.as_slice()).unwrap(),
        screen_content(version)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_nats_restart_retained_downlink_resumes_instead_of_replaying() {
    let (mut nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let mut screen = subscribed_screen(&gw).await;
    let js = jetstream::new(nats.client().await.unwrap());
    store_screen_content(&js, 1).await;
    expect_screen_content(&mut screen, 1).await;

    let opened = counter(&gw, "liftwire_gateway_retained_opens_total");
    nats_outage(&mut nats, &gw).await;
    until("the retained consumers opened again", || {
        counter(&gw, "liftwire_gateway_retained_opens_total") > opened
    })
    .await;
    // Nothing delivered again (with a fleet, every device's content and watermark would be)...
    assert!(screen.quiet_for(Duration::from_millis(500)).await);
    // ...and what is new still comes.
    store_screen_content(&jetstream::new(nats.client().await.unwrap()), 2).await;
    expect_screen_content(&mut screen, 2).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retained_downlink_follows_a_stream_created_again_from_its_start() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let mut screen = subscribed_screen(&gw).await;
    let js = jetstream::new(nats.client().await.unwrap());
    for version in 1..=3 {
        store_screen_content(&js, version).await;
        expect_screen_content(&mut screen, version).await;
    }

    // An operator wipes the stream and declares it again, NATS staying up: sequences restart.
    js.delete_stream(liftwire_proto::naming::RETAINED_STREAM.name)
        .await
        .unwrap();
    let config = NatsConfig {
        url: nats.url(),
        ..Default::default()
    };
    ensure_stream(&js, &liftwire_proto::naming::RETAINED_STREAM, &config)
        .await
        .unwrap();
    store_screen_content(&js, 4).await;
    expect_screen_content(&mut screen, 4).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_connection_is_reported_offline_as_lost() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let client = nats.client().await.unwrap();
    let mut presence = client.subscribe("lw.v1.presence.b1.elev-1").await.unwrap();
    client.flush().await.unwrap();
    let device = Device::connect(gw.addr, "elev-1", "elev-1", &secret)
        .connected()
        .await;
    let online = v1::Presence::decode(
        tokio::time::timeout(WAIT, presence.next())
            .await
            .unwrap()
            .unwrap()
            .payload
            .as_ref(),
    )
    .unwrap();
    assert_eq!(online.state(), v1::PresenceState::Online);
    // The network goes away: no DISCONNECT packet.
    drop(device);
    let offline = v1::Presence::decode(
        tokio::time::timeout(WAIT, presence.next())
            .await
            .unwrap()
            .unwrap()
            .payload
            .as_ref(),
    )
    .unwrap();
    assert_eq!(
        (offline.state(), offline.reason()),
        (
            v1::PresenceState::Offline,
            v1::DisconnectReason::ConnectionLost
        )
    );
    assert!(gw.metrics().contains("liftwire_gateway_connections 0"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_nats_down_a_full_queue_pushes_back_on_devices_instead_of_growing() {
    let (mut nats, pg) = servers().await;
    let gw = Replica::start_with(&nats, &pg, "gw-1", |mqtt| {
        mqtt.uplink_queue = 3;
        mqtt.max_in_flight = 2;
    })
    .await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    nats.stop();
    let mut device = Device::connect(gw.addr, "elev-1", "elev-1", &secret)
        .connected()
        .await;
    for seq in 1..=20 {
        device
            .publish("lw/v1/b1/elev-1/up/event", envelope("elev-1", seq))
            .await;
    }
    // A few in flight, three queued, then the device is pushed back (disconnected).
    device.closed().await;
    let metrics = gw.metrics();
    assert!(
        metrics.contains("liftwire_gateway_uplink_dropped_total{reason=\"queue_full\"} 1"),
        "{metrics}"
    );
    let depth: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("liftwire_gateway_uplink_queue_depth "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(depth <= 3, "the queue stays within its bound: {depth}");

    // NATS comes back: everything accepted is stored (retried with the same message ids).
    nats.restart().unwrap();
    let js = jetstream::new(nats.client().await.unwrap());
    let mut stream = js.get_stream(UPLINK_STREAM.name).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let stored = loop {
        let stored = stream.info().await.unwrap().state.messages;
        let bridged = gw.metrics().contains(&format!(
            "liftwire_gateway_uplink_messages_total{{kind=\"event\"}} {stored}"
        ));
        if stored > 0
            && bridged
            && gw
                .metrics()
                .contains("liftwire_gateway_uplink_queue_depth 0")
        {
            break stored;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "accepted messages never stored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        stored <= 6,
        "only what fit in the bounded queue and in flight was accepted: {stored}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_publishes_wait_out_one_backoff_together_not_one_backoff_each() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let js = jetstream::new(nats.client().await.unwrap());
    // The stream goes away (a wiped JetStream volume, an operator's mistake): JetStream refuses
    // every publish at once, and the gateway retries each with a backoff of 100 ms and more.
    js.delete_stream(UPLINK_STREAM.name).await.unwrap();
    let device = Device::connect(gw.addr, "elev-1", "elev-1", &secret)
        .connected()
        .await;
    const SENT: u64 = 300;
    for seq in 1..=SENT {
        device
            .publish("lw/v1/b1/elev-1/up/event", envelope("elev-1", seq))
            .await;
    }
    until("the messages all failed once", || {
        counter(&gw, "liftwire_gateway_jetstream_retries_total") >= SENT
    })
    .await;

    // Back: everything is stored within one backoff (at most 5 s), not one backoff per message.
    let config = NatsConfig {
        url: nats.url(),
        ..Default::default()
    };
    ensure_stream(&js, &UPLINK_STREAM, &config).await.unwrap();
    let back = tokio::time::Instant::now();
    let stored = stream_messages(&js, UPLINK_STREAM.name, SENT as usize).await;
    assert_eq!(
        stored.len() as u64,
        SENT,
        "stored after {:?}",
        back.elapsed()
    );
    gw.stop().await;
}

/// Polls `done` until it holds, failing the test with `what` after [`WAIT`].
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn presence_changes_jetstream_refused_are_kept_and_stored_once_it_is_back() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let staying = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let leaving = provision(&gw, "b1", "elev-2", DeviceKind::Elevator).await;
    let js = jetstream::new(nats.client().await.unwrap());
    // No presence stream: JetStream refuses every change, and nobody listens on core NATS.
    js.delete_stream(PRESENCE_STREAM.name).await.unwrap();
    let _staying = Device::connect(gw.addr, "elev-1", "elev-1", &staying)
        .connected()
        .await;
    let left = Device::connect(gw.addr, "elev-2", "elev-2", &leaving)
        .connected()
        .await;
    left.client.disconnect().await.unwrap();
    until("elev-2 gone", &|| {
        counter(&gw, "liftwire_gateway_connections") == 1
    })
    .await;
    // Two more rounds of refusals (both devices' latest changes each): elev-2's offline is
    // among the kept changes by now.
    let refused = counter(&gw, "liftwire_gateway_presence_failures_total");
    until("changes refused and kept", || {
        counter(&gw, "liftwire_gateway_presence_failures_total") >= refused + 4
    })
    .await;

    let config = NatsConfig {
        url: nats.url(),
        ..Default::default()
    };
    ensure_stream(&js, &PRESENCE_STREAM, &config).await.unwrap();
    let stored = stream_messages(&js, PRESENCE_STREAM.name, 2).await;
    let mut stream = js.get_stream(PRESENCE_STREAM.name).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 2);
    let mut stored: Vec<(String, v1::PresenceState)> = stored
        .iter()
        .map(|m| {
            let presence = v1::Presence::decode(m.payload.as_ref()).unwrap();
            (presence.device_id.clone(), presence.state())
        })
        .collect();
    stored.sort();
    assert_eq!(
        stored,
        [
            ("elev-1".to_owned(), v1::PresenceState::Online),
            ("elev-2".to_owned(), v1::PresenceState::Offline)
        ],
        "each device's latest change, once (elev-2's online was superseded while kept)"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_gateway_stores_its_devices_offline_at_once() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let js = jetstream::new(nats.client().await.unwrap());
    // Connected and silent: its connection would only notice a kick at its next packet.
    let _device = Device::connect(gw.addr, "elev-1", "elev-1", &secret)
        .connected()
        .await;
    // Its online stored first (a change still waiting would just be replaced by the offline).
    assert_eq!(stream_messages(&js, PRESENCE_STREAM.name, 1).await.len(), 1);
    gw.stop().await;

    let stored = stream_messages(&js, PRESENCE_STREAM.name, 2).await;
    let states: Vec<_> = stored
        .iter()
        .map(|m| {
            let presence = v1::Presence::decode(m.payload.as_ref()).unwrap();
            (presence.state(), presence.reason())
        })
        .collect();
    assert_eq!(
        states,
        [
            (v1::PresenceState::Online, v1::DisconnectReason::Unspecified),
            (
                v1::PresenceState::Offline,
                v1::DisconnectReason::GatewayShutdown
            )
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_sending_garbage_while_dead_letters_go_unanswered_holds_up_nobody_else() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let bad = provision(&gw, "b1", "elev-bad", DeviceKind::Elevator).await;
    let good = provision(&gw, "b1", "elev-good", DeviceKind::Elevator).await;
    let client = nats.client().await.unwrap();
    let js = jetstream::new(client.clone());
    // The dead-letter stream is gone and something else listens on its subject: every dead
    // letter's publish waits for an ack that never comes (5 s, the JetStream timeout).
    js.delete_stream(DEAD_LETTER_STREAM.name).await.unwrap();
    let _listener = client.subscribe("lw.v1.dlq.>").await.unwrap();
    client.flush().await.unwrap();

    let bad = Device::connect(gw.addr, "elev-bad", "elev-bad", &bad)
        .connected()
        .await;
    for _ in 0..5 {
        bad.publish("lw/v1/b1/elev-bad/up/event", vec![0xff, 0x01, 0x02])
            .await;
    }
    // Not all rejected in time: its dead letters were stored one after another.
    until("the garbage all rejected", || {
        gw.metrics()
            .contains("liftwire_gateway_uplink_rejects_total{reason=\"decode\"} 5")
    })
    .await;
    let good = Device::connect(gw.addr, "elev-good", "elev-good", &good)
        .connected()
        .await;
    good.publish("lw/v1/b1/elev-good/up/event", envelope("elev-good", 1))
        .await;
    let mut stream = js.get_stream(UPLINK_STREAM.name).await.unwrap();
    // Stored while the dead letters still wait for their acks (none has timed out yet): it did
    // not wait behind them. Judged against their own clock, not a fixed bound, so a loaded
    // machine cannot fail it.
    while stream.info().await.unwrap().state.messages < 1 {
        assert!(
            gw.metrics()
                .lines()
                .any(|line| line == "liftwire_gateway_dead_letter_failures_total 0"),
            "the good device's message waited behind the dead letters"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Stored before the first dead letter gave up, not just after the last poll.
    assert!(
        gw.metrics()
            .lines()
            .any(|line| line == "liftwire_gateway_dead_letter_failures_total 0"),
        "the good device's message waited behind the dead letters"
    );
    // The unanswered dead letters time out and are counted.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !gw
        .metrics()
        .contains("liftwire_gateway_dead_letter_failures_total 5")
    {
        assert!(tokio::time::Instant::now() < deadline, "{}", gw.metrics());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_dropping_connections_mid_handshake_cannot_poison_the_listener() {
    // rumqttd keeps per-client-id will state that a connection dropped during link setup leaks;
    // the next CONNECT with that client id then panicked while holding a lock every CONNECT
    // needs, and the listener refused everybody from then on. The gateway gives rumqttd a unique
    // id per connection, so this can no longer happen.
    use tokio::io::AsyncWriteExt;
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let flaky = provision(&gw, "b1", "elev-flaky", DeviceKind::Elevator).await;
    let steady = provision(&gw, "b1", "elev-steady", DeviceKind::Elevator).await;
    let packet = connect_packet("elev-flaky", &flaky);
    for round in 0..40 {
        let mut socket = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        socket.write_all(&packet).await.unwrap();
        // Vary the moment the connection dies across the handshake.
        if round % 4 != 0 {
            tokio::time::sleep(Duration::from_micros(200 * (round % 7) as u64)).await;
        }
        drop(socket);
    }
    // Everybody else can still connect, and so can the flaky device.
    Device::connect(gw.addr, "elev-steady", "elev-steady", &steady)
        .connected()
        .await;
    Device::connect(gw.addr, "elev-flaky", "elev-flaky", &flaky)
        .connected()
        .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnecting_device_replaces_its_previous_connection() {
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let client = nats.client().await.unwrap();
    let mut presence = client.subscribe("lw.v1.presence.b1.elev-1").await.unwrap();
    client.flush().await.unwrap();
    let mut old = Device::connect(gw.addr, "elev-1", "elev-1", &secret)
        .connected()
        .await;
    let mut new = Device::connect(gw.addr, "elev-1", "elev-1", &secret)
        .connected()
        .await;
    // Used at once, while the old connection is being closed.
    new.subscribe("lw/v1/b1/elev-1/down/+").await;
    new.publish("lw/v1/b1/elev-1/up/event", envelope("elev-1", 1))
        .await;
    old.closed().await;
    assert!(
        new.quiet_for(Duration::from_millis(300)).await,
        "the new connection stays up"
    );
    let js = jetstream::new(nats.client().await.unwrap());
    assert_eq!(
        stream_messages(&js, UPLINK_STREAM.name, 1).await.len(),
        1,
        "the new connection publishes"
    );
    // Presence: online (once or twice: a change not yet published is replaced by the next one);
    // the replaced connection never reports the device offline.
    let mut states = Vec::new();
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(500), presence.next()).await
    {
        states.push(
            v1::Presence::decode(message.payload.as_ref())
                .unwrap()
                .state(),
        );
    }
    assert!(
        !states.is_empty() && states.iter().all(|s| *s == v1::PresenceState::Online),
        "online, and no offline event: {states:?}"
    );
    assert!(gw.metrics().contains("liftwire_gateway_connections 1"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn uplink_publishes_are_acknowledged_by_the_connection_in_order() {
    // The connection answers bridged publishes itself (the patched rumqttd's `handled`), without
    // the router: every QoS 1 publish gets its PUBACK, with its packet id, in arrival order;
    // QoS 0 gets none; all of them are stored.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let mut socket = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    login(&mut socket, "elev-1", &secret).await;

    // Packet ids out of numeric order, a QoS 0 publish in between, all in one write.
    let topic = "lw/v1/b1/elev-1/up/event";
    let pkids = [9u16, 3, 700, 4];
    let mut burst = Vec::new();
    for (i, pkid) in pkids.iter().enumerate() {
        let seq = i as u64 + 1;
        mqtt::put_publish(
            &mut burst,
            topic,
            Some(*pkid),
            false,
            &envelope("elev-1", seq),
        );
        if i == 1 {
            mqtt::put_publish(&mut burst, topic, None, false, &envelope("elev-1", 10));
        }
    }
    socket.write_all(&burst).await.unwrap();
    let mut acks = [0u8; 16];
    tokio::time::timeout(WAIT, socket.read_exact(&mut acks))
        .await
        .unwrap()
        .unwrap();
    let expected: Vec<u8> = pkids
        .iter()
        .flat_map(|pkid| {
            let [hi, lo] = pkid.to_be_bytes();
            [0x40, 0x02, hi, lo]
        })
        .collect();
    // Anything else (an answer to the QoS 0 publish in the middle) would have shifted these.
    assert_eq!(acks.as_slice(), expected.as_slice());

    let js = jetstream::new(nats.client().await.unwrap());
    let stored = stream_messages(&js, UPLINK_STREAM.name, 5).await;
    let mut seqs: Vec<u64> = stored
        .iter()
        .map(|m| v1::Envelope::decode(m.payload.as_ref()).unwrap().seq)
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, [1, 2, 3, 4, 10]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_connect_on_a_connection_closes_it() {
    // MQTT 3.1.1 §3.1.0-2: a protocol violation. Taken in, it would rename the connection the
    // gateway speaks for (here, as another device of the building).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (nats, pg) = servers().await;
    let gw = Replica::start(&nats, &pg, "gw-1").await;
    let secret = provision(&gw, "b1", "elev-1", DeviceKind::Elevator).await;
    let other = provision(&gw, "b1", "elev-2", DeviceKind::Elevator).await;
    let mut socket = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    login(&mut socket, "elev-1", &secret).await;
    socket
        .write_all(&connect_packet("elev-2", &other))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, socket.read_to_end(&mut rest))
        .await
        .expect("the gateway closes the connection");
    assert!(
        read.is_err() || rest.is_empty(),
        "closed without an answer: {rest:?}"
    );
    assert!(
        gw.metrics()
            .contains("liftwire_gateway_packet_errors_total{reason=\"malformed\"} 1"),
        "{}",
        gw.metrics()
    );
    gw.stop().await;
}
