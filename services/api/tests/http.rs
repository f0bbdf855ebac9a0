//! The API over real HTTP: authentication failures are RFC 7807 problems, valid tokens work.

// Helpers outside #[test] functions panic on purpose: a failed setup fails the test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use liftwire_api::auth::{mint, AuthConfig, Authenticator, Role};
use liftwire_api::{serve_http, AppState, Me};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "test-secret-test-secret-test-secret!";

fn auth_config() -> AuthConfig {
    AuthConfig {
        hs256_secret: Some(SECRET.into()),
        leeway: Duration::ZERO,
        ..Default::default()
    }
}

struct Server {
    base: String,
    _nats: liftwire_testkit::Nats,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let nats = liftwire_testkit::Nats::start().unwrap();
        let state = AppState::new(
            Authenticator::new(&auth_config()).unwrap(),
            nats.client().await.unwrap(),
            0.0,
            1,
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve_http(listener, state, 1024, stop.clone()));
        Server {
            base,
            _nats: nats,
            stop,
            task,
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (u16, serde_json::Value, String) {
        let mut request = reqwest::Client::new().get(format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (
            status,
            response.json().await.unwrap_or_default(),
            content_type,
        )
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn token_with(config: &AuthConfig, ttl: Duration) -> String {
    mint(config, "alice", Role::Manager, &["mc-larvotto".into()], ttl).unwrap()
}

#[tokio::test]
async fn valid_token_shows_its_principal() {
    let server = Server::start().await;
    let (status, body, _) = server
        .get(
            "/api/v1/me",
            Some(&token_with(&auth_config(), Duration::from_secs(60))),
        )
        .await;
    assert_eq!(status, 200);
    let me: Me = serde_json::from_value(body).unwrap();
    assert_eq!(
        me,
        Me {
            subject: "alice".into(),
            role: Role::Manager,
            buildings: vec!["mc-larvotto".into()]
        }
    );
    server.stop().await;
}

#[tokio::test]
async fn authentication_failures_are_problems() {
    let server = Server::start().await;
    let good = token_with(&auth_config(), Duration::from_secs(60));
    let expired = {
        // Issued two minutes ago with a one-minute lifetime.
        let mut config = auth_config();
        config.leeway = Duration::ZERO;
        let claims = liftwire_api::auth::Claims {
            sub: "alice".into(),
            iss: config.issuer.clone(),
            aud: config.audience.clone(),
            exp: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                - 60,
            iat: 0,
            role: Role::Manager,
            buildings: vec![],
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let wrong_audience = token_with(
        &AuthConfig {
            audience: "another-api".into(),
            ..auth_config()
        },
        Duration::from_secs(60),
    );
    let wrong_key = token_with(
        &AuthConfig {
            hs256_secret: Some("another-secret-another-secret-xxxxx".into()),
            ..auth_config()
        },
        Duration::from_secs(60),
    );
    // Flip one character of the payload: the signature no longer matches.
    let tampered = {
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        let mut payload = parts[1].clone().into_bytes();
        payload[5] = if payload[5] == b'A' { b'B' } else { b'A' };
        parts[1] = String::from_utf8(payload).unwrap();
        parts.join(".")
    };

    for (token, detail) in [
        (None, "missing bearer token"),
        (Some(expired.as_str()), "token expired"),
        (
            Some(wrong_audience.as_str()),
            "token has the wrong audience",
        ),
        (Some(wrong_key.as_str()), "token signature is invalid"),
        (Some(tampered.as_str()), ""),
        (Some("not-a-jwt"), "token is malformed"),
    ] {
        let (status, body, content_type) = server.get("/api/v1/me", token).await;
        assert_eq!(status, 401, "{detail}: {body}");
        assert_eq!(content_type, "application/problem+json");
        assert_eq!(body["code"], "unauthenticated");
        if !detail.is_empty() {
            assert_eq!(body["detail"], detail);
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn unknown_routes_are_problems() {
    let server = Server::start().await;
    let (status, body, content_type) = server.get("/api/v1/nope", None).await;
    assert_eq!(status, 404);
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(body["code"], "not_found");
    server.stop().await;
}

#[tokio::test]
async fn a_live_stream_ends_when_its_token_expires() {
    let server = Server::start().await;
    let token = mint(
        &auth_config(),
        "alice",
        Role::Manager,
        &["mc-larvotto".into()],
        Duration::from_secs(2),
    )
    .unwrap();
    let mut stream = reqwest::Client::new()
        .get(format!(
            "{}/api/v1/buildings/mc-larvotto/live/stream",
            server.base
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    // Keep-alive comments may arrive; the body must end once the token has expired.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while stream.chunk().await.unwrap().is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived its token");
    server.stop().await;
}
