//! The API over real HTTP: authentication failures are RFC 7807 problems, valid tokens work.

// Helpers outside #[test] functions panic on purpose: a failed setup fails the test.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
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
        Self::start_with(|state| state).await
    }

    /// A server whose state `configure` adjusts.
    async fn start_with(configure: impl FnOnce(AppState) -> AppState) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let nats = liftwire_testkit::Nats::start().unwrap();
        let state = configure(AppState::new(
            Authenticator::new(&auth_config()).unwrap(),
            nats.client().await.unwrap(),
            0.0,
            1,
        ));
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
        self.get_authorized(path, token.map(|token| format!("Bearer {token}")))
            .await
    }

    /// GET with `authorization` as the whole Authorization header.
    async fn get_authorized(
        &self,
        path: &str,
        authorization: Option<String>,
    ) -> (u16, serde_json::Value, String) {
        let mut request = reqwest::Client::new().get(format!("{}{path}", self.base));
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        Self::send(request).await
    }

    /// Sends `request`; returns its status, JSON body (`null` if none) and content type.
    async fn send(request: reqwest::RequestBuilder) -> (u16, serde_json::Value, String) {
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

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Signs `claims` with the test secret, as an identity provider would whatever their shape.
fn signed(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Claims `auth_config()` accepts, valid for a minute, with `changes` applied (`null` removes one).
fn claims_with(changes: serde_json::Value) -> serde_json::Value {
    let config = auth_config();
    let mut claims = serde_json::json!({
        "sub": "alice",
        "iss": config.issuer,
        "aud": config.audience,
        "exp": now() + 60,
        "iat": now(),
        "role": "manager",
        "buildings": ["mc-larvotto"],
    });
    for (name, value) in changes.as_object().unwrap() {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(name);
        } else {
            claims[name] = value.clone();
        }
    }
    claims
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
    let expired = signed(claims_with(serde_json::json!({ "exp": now() - 60 })));
    let wrong_issuer = signed(claims_with(
        serde_json::json!({ "iss": "https://other.example" }),
    ));
    let not_yet_valid = signed(claims_with(serde_json::json!({ "nbf": now() + 60 })));
    let without_subject = signed(claims_with(serde_json::json!({ "sub": null })));
    let without_expiry = signed(claims_with(serde_json::json!({ "exp": null })));
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
        (Some(wrong_issuer.as_str()), "token has the wrong issuer"),
        (Some(not_yet_valid.as_str()), "token is not valid yet"),
        (
            Some(without_subject.as_str()),
            "token lacks a required claim",
        ),
        (
            Some(without_expiry.as_str()),
            "token lacks a required claim",
        ),
        (Some(wrong_key.as_str()), "token signature is invalid"),
        (Some(tampered.as_str()), "token signature is invalid"),
        (Some("not-a-jwt"), "token is malformed"),
    ] {
        let (status, body, content_type) = server.get("/api/v1/me", token).await;
        assert_eq!(status, 401, "{detail}: {body}");
        assert_eq!(content_type, "application/problem+json");
        assert_eq!(body["code"], "unauthenticated");
        assert_eq!(body["detail"], detail, "{token:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn tokens_in_the_shapes_identity_providers_send_are_accepted() {
    let server = Server::start().await;
    let config = auth_config();
    // An audience list (Keycloak's default), no `iat`, an `nbf` already past, and a lower-case
    // scheme (RFC 9110: case-insensitive).
    for (claims, scheme) in [
        (
            claims_with(serde_json::json!({ "aud": [config.audience, "account"] })),
            "Bearer",
        ),
        (claims_with(serde_json::json!({ "iat": null })), "Bearer"),
        (
            claims_with(serde_json::json!({ "nbf": now() - 5 })),
            "Bearer",
        ),
        (claims_with(serde_json::json!({})), "bearer"),
    ] {
        let (status, body, _) = server
            .get_authorized(
                "/api/v1/me",
                Some(format!("{scheme} {}", signed(claims.clone()))),
            )
            .await;
        assert_eq!(status, 200, "{claims} {scheme}: {body}");
        assert_eq!(body["subject"], "alice");
    }
    // An audience list without ours is still refused.
    let (status, body, _) = server
        .get(
            "/api/v1/me",
            Some(&signed(claims_with(
                serde_json::json!({ "aud": ["account", "other"] }),
            ))),
        )
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["detail"], "token has the wrong audience");
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
async fn malformed_requests_are_refused_before_any_service_is_asked() {
    // No telemetry or gateway service runs here: a request that got past the door would be
    // answered 503 (no responders) or 403 (the manager may not act).
    let server = Server::start().await;
    let token = token_with(&auth_config(), Duration::from_secs(60));
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", server.base);
    let acknowledge = url("/api/v1/buildings/mc-larvotto/alerts/1/acknowledge");
    for (request, status, code, detail) in [
        // A NUL would fail the services' queries (PostgreSQL text cannot hold it).
        (
            http.get(url("/api/v1/buildings?cursor=%00")),
            400,
            "bad_request",
            "text must not contain a NUL character",
        ),
        (
            http.get(url("/api/v1/buildings/mc-larvotto%00/events")),
            400,
            "bad_request",
            "text must not contain a NUL character",
        ),
        (
            http.post(&acknowledge)
                .json(&serde_json::json!({ "note": "a\u{0}b" })),
            400,
            "bad_request",
            "text must not contain a NUL character",
        ),
        (
            http.post(&acknowledge)
                .header("content-type", "text/plain")
                .body("note"),
            415,
            "unsupported_media_type",
            "the request body must be application/json",
        ),
        (
            http.delete(url("/api/v1/buildings")),
            405,
            "method_not_allowed",
            "this method is not allowed here",
        ),
        // An empty body reads as `{}` (the note is optional): on to the role check.
        (
            http.post(&acknowledge),
            403,
            "forbidden",
            "not allowed for this token",
        ),
    ] {
        let (got, body, content_type) = Server::send(request.bearer_auth(&token)).await;
        assert_eq!(got, status, "{body}");
        assert_eq!(content_type, "application/problem+json");
        assert_eq!(body["code"], code);
        assert_eq!(body["detail"], detail);
    }
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
        // Long enough to be still valid when the request is verified on a loaded machine.
        Duration::from_secs(5),
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
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while stream.chunk().await.unwrap().is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived its token");
    server.stop().await;
}

#[tokio::test]
async fn live_streams_are_capped_per_user_and_per_replica() {
    let server = Server::start_with(|state| state.with_stream_limits(3, 2)).await;
    let token = |user: &str| {
        mint(
            &auth_config(),
            user,
            Role::Manager,
            &["mc-larvotto".into()],
            Duration::from_secs(60),
        )
        .unwrap()
    };
    let (alice, bob) = (token("alice"), token("bob"));
    let open = |token: String| {
        let url = format!("{}/api/v1/buildings/mc-larvotto/live/stream", server.base);
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
        }
    };
    let first = open(alice.clone()).await;
    let second = open(alice.clone()).await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = open(alice.clone()).await;
    assert_eq!(third.status(), 429, "alice's share is two");
    assert_eq!(third.headers()["retry-after"], "30");
    let bobs = open(bob.clone()).await;
    assert_eq!(bobs.status(), 200);
    assert_eq!(
        open(bob.clone()).await.status(),
        503,
        "the replica holds three"
    );
    // A stream whose client left gives its place back.
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let again = open(bob.clone()).await;
        if again.status() == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop((second, bobs));
    server.stop().await;
}

/// An Ed25519 identity provider: its JWKS served over HTTP, and tokens it signs.
struct IdentityProvider {
    url: String,
    key: jsonwebtoken::EncodingKey,
    task: tokio::task::JoinHandle<()>,
    /// JWKS requests received.
    hits: Arc<AtomicUsize>,
    /// How its JWKS endpoint answers: [`SERVES`], [`FAILS`] or [`HANGS`].
    mode: Arc<AtomicU8>,
}

const SERVES: u8 = 0;
const FAILS: u8 = 1;
const HANGS: u8 = 2;

impl IdentityProvider {
    async fn start() -> Self {
        use base64::Engine;
        let seed = [7u8; 32];
        let public = ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .to_bytes();
        // PKCS#8 v1 wrapping of an Ed25519 seed (RFC 8410).
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&seed);
        let jwks = serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA", "kid": "idp-1",
            "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(public),
        }]});
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let (hits, mode) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicU8::new(SERVES)),
        );
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get({
                let (hits, mode) = (hits.clone(), mode.clone());
                move || {
                    let jwks = jwks.clone();
                    hits.fetch_add(1, Ordering::SeqCst);
                    let mode = mode.load(Ordering::SeqCst);
                    async move {
                        match mode {
                            SERVES => Ok(axum::Json(jwks)),
                            FAILS => Err(axum::http::StatusCode::SERVICE_UNAVAILABLE),
                            _ => std::future::pending().await,
                        }
                    }
                }
            }),
        );
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        IdentityProvider {
            url,
            key: jsonwebtoken::EncodingKey::from_ed_der(&der),
            task,
            hits,
            mode,
        }
    }

    fn token(&self, kid: &str, audience: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = liftwire_api::auth::Claims {
            sub: "carol".into(),
            iss: "https://idp.example".into(),
            aud: audience.into(),
            exp: now + 300,
            iat: now,
            role: Role::Manager,
            buildings: vec!["mc-a".into()],
        };
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

#[tokio::test]
async fn tokens_of_an_identity_provider_are_verified_with_its_jwks() {
    let idp = IdentityProvider::start().await;
    let config = AuthConfig {
        issuer: "https://idp.example".into(),
        audience: "liftwire-api".into(),
        jwks_url: Some(idp.url.clone()),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let nats = liftwire_testkit::Nats::start().unwrap();
    let state = AppState::new(
        Authenticator::new(&config).unwrap(),
        nats.client().await.unwrap(),
        0.0,
        1,
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve_http(listener, state, 1024, stop.clone()));
    let me = |token: String| {
        let base = base.clone();
        async move {
            let response = reqwest::Client::new()
                .get(format!("{base}/api/v1/me"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, body) = me(idp.token("idp-1", "liftwire-api")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["subject"], "carol");
    let (status, body) = me(idp.token("idp-2", "liftwire-api")).await;
    assert_eq!(
        (status, body["detail"].as_str()),
        (401, Some("token is signed with an unknown key"))
    );
    let (status, body) = me(idp.token("idp-1", "another-api")).await;
    assert_eq!(
        (status, body["detail"].as_str()),
        (401, Some("token has the wrong audience"))
    );
    let tampered = {
        let token = idp.token("idp-1", "liftwire-api");
        let (rest, signature) = token.rsplit_once('.').unwrap();
        let flipped = if signature.starts_with('A') { "B" } else { "A" };
        format!("{rest}.{flipped}{}", &signature[1..])
    };
    assert_eq!(me(tampered).await.0, 401);
    // An HS256 token is refused when only the JWKS is configured.
    let hs256 = token_with(
        &AuthConfig {
            issuer: "https://idp.example".into(),
            ..auth_config()
        },
        Duration::from_secs(60),
    );
    assert_eq!(me(hs256).await.0, 401);
    stop.cancel();
    task.await.unwrap().unwrap();
    idp.task.abort();
}

#[tokio::test]
async fn each_token_is_rate_limited_on_its_own() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let nats = liftwire_testkit::Nats::start().unwrap();
    // One request a minute sustained, three at once: time cannot refill the bucket in this test.
    let state = AppState::new(
        Authenticator::new(&auth_config()).unwrap(),
        nats.client().await.unwrap(),
        1.0 / 60.0,
        3,
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve_http(listener, state, 1024, stop.clone()));
    let get = |token: &str| {
        reqwest::Client::new()
            .get(format!("{base}/api/v1/me"))
            .bearer_auth(token)
            .send()
    };
    let busy = token_with(&auth_config(), Duration::from_secs(60));
    for _ in 0..3 {
        assert_eq!(get(&busy).await.unwrap().status(), 200);
    }
    let refused = get(&busy).await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "60");
    let problem: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(problem["code"], "too_many_requests");
    let other = mint(
        &auth_config(),
        "bob",
        Role::Manager,
        &[],
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(
        get(&other).await.unwrap().status(),
        200,
        "another token is not limited"
    );
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_identity_provider_that_fails_or_hangs_is_asked_once_per_pause_and_stalls_nobody() {
    let idp = IdentityProvider::start().await;
    idp.mode.store(FAILS, Ordering::SeqCst);
    let config = |min_refetch: Duration| AuthConfig {
        issuer: "https://idp.example".into(),
        audience: "liftwire-api".into(),
        jwks_url: Some(idp.url.clone()),
        // Every request finds the keys stale and would like them fetched again.
        jwks_refresh: Duration::ZERO,
        jwks_min_refetch: min_refetch,
        ..Default::default()
    };
    let token = idp.token("idp-1", "liftwire-api");

    // Down (errors): the first request asks, the next ones within the pause do not.
    let auth = Authenticator::new(&config(Duration::from_secs(3600))).unwrap();
    for _ in 0..3 {
        assert!(auth.verify(&token).await.is_err(), "no key yet");
    }
    assert_eq!(idp.hits.load(Ordering::SeqCst), 1);

    // Up, then hanging: a request whose key is known does not queue behind the fetch.
    idp.mode.store(SERVES, Ordering::SeqCst);
    let auth = Authenticator::new(&config(Duration::ZERO)).unwrap();
    assert_eq!(auth.verify(&token).await.unwrap().subject, "carol");
    let fetched = idp.hits.load(Ordering::SeqCst);
    idp.mode.store(HANGS, Ordering::SeqCst);
    let fetching = tokio::spawn({
        let (auth, token) = (auth.clone(), token.clone());
        async move { auth.verify(&token).await.map(|p| p.subject) }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while idp.hits.load(Ordering::SeqCst) == fetched {
        assert!(tokio::time::Instant::now() < deadline, "no refetch started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(auth.verify(&token).await.unwrap().subject, "carol");
    assert!(
        !fetching.is_finished(),
        "answered while the other request still waits for the identity provider"
    );
    // The waiting request gives up on the identity provider and uses the keys it has.
    assert_eq!(fetching.await.unwrap().unwrap(), "carol");
    idp.task.abort();
}
