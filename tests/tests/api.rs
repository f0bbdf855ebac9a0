//! The dashboard API over real HTTP, against the real gateway, telemetry, NATS and PostgreSQL:
//! building scope on every route (including guessed ids), roles, validation, pagination, alert
//! transitions, provisioning and device commands.

// Helpers outside #[test] functions panic on purpose: a failed setup fails the test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream;
use chrono::Utc;
use common::sim::{elevator, ingested, publish, simulate, HOUR, MINUTE};
use common::{eventually, stack, Stack};
use liftwire_api::auth::{mint, AuthConfig, Authenticator, Role};
use liftwire_api::{serve_http, AppState};
use liftwire_firmware_sim::Incident;
use liftwire_proto::naming::{uplink_msg_id, BuildingId, DeviceId, Uplink, UplinkKind};
use liftwire_proto::{v1, Message, SCHEMA_VERSION};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "api-test-secret-api-test-secret-0001";

struct Http {
    base: String,
    client: reqwest::Client,
}

impl Http {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut request = match method {
            "GET" => self.client.get(url),
            _ => self.client.post(url),
        }
        .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        if status >= 400 {
            let content_type = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_owned();
            assert_eq!(content_type, "application/problem+json", "{method} {path}");
        }
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.call("GET", path, token, None).await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, token, Some(body)).await
    }
}

fn token(role: Role, buildings: &[&str]) -> String {
    let config = AuthConfig {
        hs256_secret: Some(SECRET.into()),
        ..Default::default()
    };
    let buildings: Vec<String> = buildings.iter().map(|b| b.to_string()).collect();
    mint(
        &config,
        "user@example.com",
        role,
        &buildings,
        Duration::from_secs(600),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_route_is_scoped_validated_and_paginated() {
    let Stack {
        nats,
        pg: _pg,
        pool,
        ingest: telemetry,
        gw,
        ..
    } = stack().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = Http {
        base: format!("http://{}", listener.local_addr().unwrap()),
        client: reqwest::Client::new(),
    };
    let auth = AuthConfig {
        hs256_secret: Some(SECRET.into()),
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let api = tokio::spawn(serve_http(
        listener,
        AppState::new(
            Authenticator::new(&auth).unwrap(),
            nats.client().await.unwrap(),
            0.0,
            1,
        ),
        4 * 1024,
        stop.clone(),
    ));
    let admin = token(Role::Admin, &[]);
    let manager_a = token(Role::Manager, &["mc-a"]);
    let tech_a = token(Role::Technician, &["mc-a"]);

    // --- Provisioning: admins only, the secret shown once ----------------------------------
    let (status, created) = http
        .post(
            "/api/v1/buildings/mc-a/devices",
            &admin,
            json!({"device_id": "elev-a1", "kind": "elevator"}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let first_secret = created["secret"].as_str().unwrap().to_owned();
    assert!(first_secret.starts_with("lwd_"));
    assert_eq!(created["device"]["kind"], "elevator");
    let (status, _) = http
        .post(
            "/api/v1/buildings/mc-b/devices",
            &admin,
            json!({"device_id": "elev-b1", "kind": "elevator"}),
        )
        .await;
    assert_eq!(status, 201);
    let (status, body) = http
        .post(
            "/api/v1/buildings/mc-b/devices",
            &admin,
            json!({"device_id": "elev-a1", "kind": "elevator"}),
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (409, Some("conflict")));
    for who in [&manager_a, &tech_a] {
        let (status, _) = http
            .post(
                "/api/v1/buildings/mc-a/devices",
                who,
                json!({"device_id": "elev-a9", "kind": "screen"}),
            )
            .await;
        assert_eq!(status, 403, "only admins register devices");
    }
    let (status, rotated) = http
        .post(
            "/api/v1/buildings/mc-a/devices/elev-a1/rotate",
            &admin,
            json!({}),
        )
        .await;
    assert_eq!(status, 200);
    assert_ne!(rotated["secret"].as_str().unwrap(), first_secret);
    assert!(
        gw.registry
            .authenticate("elev-a1", "elev-a1", rotated["secret"].as_str().unwrap())
            .await
            .is_ok(),
        "the rotated secret is the one that works"
    );

    // --- A simulated day for each building ----------------------------------------------------
    let epoch = (Utc::now().date_naive() - chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let epoch_ms = epoch.timestamp_millis();
    let day_a = simulate(
        elevator("elev-a1", HOUR, epoch_ms),
        vec![
            (
                HOUR,
                Incident::Entrapment {
                    duration_ms: 10 * MINUTE,
                },
            ),
            (
                20 * HOUR,
                Incident::Entrapment {
                    duration_ms: 10 * HOUR,
                },
            ),
        ],
        21 * HOUR,
    );
    let day_b = simulate(
        elevator("elev-b1", 2 * HOUR, epoch_ms),
        vec![(
            3 * HOUR,
            Incident::Entrapment {
                duration_ms: 5 * HOUR,
            },
        )],
        4 * HOUR,
    );
    let js = jetstream::new(nats.client().await.unwrap());
    publish(&js, "mc-a", &day_a).await;
    publish(&js, "mc-b", &day_b).await;
    ingested(&pool, &[&day_a, &day_b]).await;

    let (_, alerts_b) = http
        .get("/api/v1/buildings/mc-b/alerts?state=open", &admin)
        .await;
    let alert_b = alerts_b["items"][0]["id"].as_i64().unwrap();
    let (_, alerts_a) = http
        .get(
            "/api/v1/buildings/mc-a/alerts?state=open,acknowledged",
            &manager_a,
        )
        .await;
    let open_a: Vec<&Value> = alerts_a["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["rule"] == "entrapment")
        .collect();
    assert_eq!(open_a.len(), 1, "{alerts_a}");
    let alert_a = open_a[0]["id"].as_i64().unwrap();

    // --- Building scope on every route ---------------------------------------------------------
    let from = epoch.to_rfc3339().replace('+', "%2B");
    let to = (epoch + chrono::Duration::days(1))
        .to_rfc3339()
        .replace('+', "%2B");
    let range = format!("from={from}&to={to}");
    let routes = |b: &str, e: &str, alert: i64| {
        vec![
            ("GET", format!("/api/v1/buildings/{b}/live"), None),
            ("GET", format!("/api/v1/buildings/{b}/elevators"), None),
            (
                "GET",
                format!("/api/v1/buildings/{b}/elevators/{e}/history?{range}"),
                None,
            ),
            ("GET", format!("/api/v1/buildings/{b}/events?{range}"), None),
            (
                "GET",
                format!("/api/v1/buildings/{b}/incidents?{range}"),
                None,
            ),
            ("GET", format!("/api/v1/buildings/{b}/kpis?{range}"), None),
            ("GET", format!("/api/v1/buildings/{b}/alerts"), None),
            ("GET", format!("/api/v1/buildings/{b}/alerts/{alert}"), None),
            (
                "POST",
                format!("/api/v1/buildings/{b}/alerts/{alert}/acknowledge"),
                Some(json!({"note": "x"})),
            ),
            (
                "POST",
                format!("/api/v1/buildings/{b}/alerts/{alert}/resolve"),
                Some(json!({})),
            ),
            ("GET", format!("/api/v1/buildings/{b}/devices"), None),
            (
                "POST",
                format!("/api/v1/buildings/{b}/devices"),
                Some(json!({"device_id": "intruder", "kind": "screen"})),
            ),
            (
                "POST",
                format!("/api/v1/buildings/{b}/devices/{e}/rotate"),
                Some(json!({})),
            ),
            (
                "GET",
                format!("/api/v1/buildings/{b}/elevators/{e}/commands"),
                None,
            ),
            (
                "POST",
                format!("/api/v1/buildings/{b}/elevators/{e}/commands"),
                Some(json!({"kind": "reboot"})),
            ),
            (
                "GET",
                format!("/api/v1/buildings/{b}/elevators/{e}/commands/none"),
                None,
            ),
            ("GET", format!("/api/v1/buildings/{b}/live/stream"), None),
        ]
    };
    for who in [&manager_a, &tech_a] {
        for (method, path, body) in routes("mc-b", "elev-b1", alert_b) {
            let (status, problem) = http.call(method, &path, who, body).await;
            assert_eq!(status, 403, "{method} {path}: {problem}");
            assert_eq!(problem["code"], "forbidden");
        }
    }
    // Building B's elevator and alert ids, guessed under building A: not found, never B's data.
    for (method, path, body) in routes("mc-a", "elev-b1", alert_b) {
        let expected = match path.as_str() {
            p if p.ends_with("/live")
                || p.ends_with("/elevators")
                || p.contains("/events?")
                || p.contains("/incidents?")
                || p.contains("/kpis?")
                || p.ends_with("/alerts")
                || p.ends_with("/devices")
                || p.ends_with("/stream") =>
            {
                continue
            }
            _ => 404,
        };
        let who = if method == "POST" && path.contains("/devices") {
            &admin
        } else {
            &tech_a
        };
        let (status, problem) = http.call(method, &path, who, body).await;
        assert_eq!(status, expected, "{method} {path}: {problem}");
    }
    for query in ["events", "incidents", "kpis"] {
        let path = format!("/api/v1/buildings/mc-a/{query}?{range}&elevator=elev-b1");
        assert_eq!(http.get(&path, &manager_a).await.0, 404, "{path}");
    }
    // Building A's lists hold A's elevator and never B's (both have data in the range).
    for (method, path, _) in routes("mc-a", "elev-a1", alert_a) {
        let list = path.ends_with("/live")
            || path.ends_with("/elevators")
            || path.contains("/events?")
            || path.contains("/incidents?")
            || path.contains("/kpis?")
            || path.ends_with("/alerts")
            || path.ends_with("/devices");
        if method != "GET" || !list {
            continue;
        }
        let (status, body) = http.get(&path, &manager_a).await;
        assert_eq!(status, 200, "{path}: {body}");
        let text = body.to_string();
        assert!(text.contains("elev-a1"), "{path}: {text}");
        assert!(
            !text.contains("elev-b1") && !text.contains("mc-b"),
            "{path}: {text}"
        );
    }
    let (_, buildings) = http.get("/api/v1/buildings", &manager_a).await;
    let ids: Vec<&str> = buildings["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["building_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["mc-a"]);
    let (_, buildings) = http.get("/api/v1/buildings", &admin).await;
    assert_eq!(buildings["items"].as_array().unwrap().len(), 2);

    // --- Validation ------------------------------------------------------------------------
    let bad = [
        format!("/api/v1/buildings/mc-a/kpis?from=yesterday&to={to}"),
        format!("/api/v1/buildings/mc-a/kpis?from={to}&to={from}"),
        "/api/v1/buildings/mc-a/kpis".to_string(),
        format!("/api/v1/buildings/mc-a/events?{range}&limit=5000"),
        format!("/api/v1/buildings/mc-a/incidents?{range}&kind=bogus"),
        "/api/v1/buildings/mc-a/alerts?state=sleeping".to_string(),
        "/api/v1/buildings/mc.a/live".to_string(),
        "/api/v1/buildings/mc-a/alerts/not-a-number".to_string(),
    ];
    for path in bad {
        let (status, problem) = http.get(&path, &manager_a).await;
        assert_eq!(
            (status, problem["code"].as_str()),
            (400, Some("bad_request")),
            "{path}: {problem}"
        );
    }
    let (status, _) = http
        .post(
            "/api/v1/buildings/mc-a/elevators/elev-a1/commands",
            &tech_a,
            json!({"kind": "reboot", "please": true}),
        )
        .await;
    assert_eq!(status, 400, "unknown fields are refused");
    let (status, problem) = http
        .post(
            "/api/v1/buildings/mc-a/alerts/1/acknowledge",
            &tech_a,
            json!({"note": "x".repeat(8 * 1024)}),
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (413, Some("payload_too_large"))
    );

    // --- Pagination ----------------------------------------------------------------------------
    let morning = format!(
        "from={from}&to={}",
        (epoch + chrono::Duration::hours(6))
            .to_rfc3339()
            .replace('+', "%2B")
    );
    let (_, all) = http
        .get(
            &format!("/api/v1/buildings/mc-a/events?{morning}&limit=1000"),
            &manager_a,
        )
        .await;
    assert!(all["next_cursor"].is_null(), "one page holds them all");
    let total = all["items"].as_array().unwrap().len();
    assert!(total > 20, "{total} events");
    let mut seen = HashSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = format!("/api/v1/buildings/mc-a/events?{morning}&limit=7");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = http.get(&path, &manager_a).await;
        assert_eq!(status, 200);
        for event in page["items"].as_array().unwrap() {
            assert!(seen.insert((
                event["device_id"].as_str().unwrap().to_owned(),
                event["seq"].as_u64().unwrap()
            )));
        }
        pages += 1;
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), total);
    assert_eq!(pages, total.div_ceil(7));

    // --- Reads -------------------------------------------------------------------------------
    let (status, kpis) = http
        .get(&format!("/api/v1/buildings/mc-a/kpis?{range}"), &manager_a)
        .await;
    assert_eq!(status, 200);
    assert_eq!(kpis["total"]["units"], 1);
    assert_eq!(kpis["total"]["entrapments"], 2);
    assert!(kpis["total"]["availability"].as_f64().unwrap() < 1.0);
    let (status, history) = http
        .get(
            &format!(
                "/api/v1/buildings/mc-a/elevators/elev-a1/history?{range}&bucket_seconds=3600"
            ),
            &manager_a,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(history["buckets"].as_array().unwrap().len(), 21);
    let (_, incidents) = http
        .get(
            &format!("/api/v1/buildings/mc-a/incidents?{range}&kind=entrapment"),
            &manager_a,
        )
        .await;
    assert_eq!(incidents["items"].as_array().unwrap().len(), 2);

    // --- Alert transitions: technicians act, managers read ------------------------------------
    let ack = format!("/api/v1/buildings/mc-a/alerts/{alert_a}/acknowledge");
    let resolve = format!("/api/v1/buildings/mc-a/alerts/{alert_a}/resolve");
    assert_eq!(http.post(&ack, &manager_a, json!({})).await.0, 403);
    let (status, acked) = http.post(&ack, &tech_a, json!({"note": "on my way"})).await;
    assert_eq!(status, 200, "{acked}");
    assert_eq!(acked["alert"]["state"], "acknowledged");
    let (_, resolved) = http.post(&resolve, &tech_a, json!({})).await;
    assert_eq!(resolved["alert"]["state"], "resolved");
    let steps: Vec<(Value, Value)> = resolved["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["to"].clone(), t["by"].clone()))
        .collect();
    assert_eq!(
        steps,
        [
            (json!("open"), json!("system")),
            (json!("acknowledged"), json!("user@example.com")),
            (json!("resolved"), json!("user@example.com")),
        ]
    );
    assert_eq!(http.post(&resolve, &tech_a, json!({})).await.0, 200);
    let (status, problem) = http.post(&ack, &tech_a, json!({})).await;
    assert_eq!((status, problem["code"].as_str()), (409, Some("conflict")));

    // --- Commands: sent to the device, completed by its result --------------------------------
    let commands = "/api/v1/buildings/mc-a/elevators/elev-a1/commands";
    assert_eq!(
        http.post(commands, &manager_a, json!({"kind": "reboot"}))
            .await
            .0,
        403
    );
    let (status, _) = http
        .post(commands, &tech_a, json!({"kind": "set_telemetry_interval"}))
        .await;
    assert_eq!(status, 400);
    let client = nats.client().await.unwrap();
    let mut downlink = client
        .subscribe("lw.v1.down.mc-a.elev-a1.command")
        .await
        .unwrap();
    client.flush().await.unwrap();
    let (status, sent) = http
        .post(commands, &tech_a, json!({"kind": "request_diagnostics"}))
        .await;
    assert_eq!(status, 202, "{sent}");
    assert_eq!(sent["status"], "pending");
    let command_id = sent["command_id"].as_str().unwrap().to_owned();
    let delivered = tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::next(&mut downlink),
    )
    .await
    .unwrap()
    .unwrap();
    let delivered = v1::Downlink::decode(delivered.payload.as_ref()).unwrap();
    assert!(
        matches!(delivered.body, Some(v1::downlink::Body::Command(c)) if c.command_id == command_id)
    );
    // The device answers on its command-result uplink (as the gateway would store it).
    let seq = day_a.envelopes.last().unwrap().seq + 1;
    let result = v1::Envelope {
        schema_version: SCHEMA_VERSION,
        device_id: "elev-a1".into(),
        seq,
        device_time: Some(liftwire_proto::timestamp(std::time::SystemTime::now())),
        body: Some(v1::envelope::Body::CommandResult(v1::CommandResult {
            command_id: command_id.clone(),
            status: v1::CommandStatus::Succeeded as i32,
            detail: "bundle uploaded".into(),
            output: None,
        })),
    };
    let up = Uplink {
        building: BuildingId::new("mc-a").unwrap(),
        device: DeviceId::new("elev-a1").unwrap(),
        kind: UplinkKind::CommandResult,
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        uplink_msg_id(&up.device, seq).as_str(),
    );
    js.publish_with_headers(up.nats_subject(), headers, result.encode_to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let status_path = format!("{commands}/{command_id}");
    eventually("the command completed", Duration::from_secs(20), || {
        let http = &http;
        let (path, token) = (status_path.clone(), manager_a.clone());
        async move { http.get(&path, &token).await.1["status"] == "succeeded" }
    })
    .await;
    let (_, listed) = http.get(commands, &manager_a).await;
    assert_eq!(listed["items"][0]["detail"], "bundle uploaded");
    // A cursor is one of this elevator's commands: an unknown one is refused rather than read as
    // the end of the list.
    for (cursor, expected) in [(command_id.as_str(), 200), ("garbage", 400)] {
        let path = format!("{commands}?cursor={cursor}");
        let (status, body) = http.get(&path, &manager_a).await;
        assert_eq!(status, expected, "{path}: {body}");
    }

    // --- The OpenAPI document needs no token ----------------------------------------------------
    let doc: Value = reqwest::get(format!("{}/api/v1/openapi.json", http.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["paths"]["/api/v1/buildings/{building}/kpis"]["get"].is_object());

    stop.cancel();
    api.await.unwrap().unwrap();
    gw.running.stop().await;
    telemetry.stop().await;
}
