//! The dashboard API: a thin, stateless HTTP edge under `/api/v1`. It authenticates (JWT bearer
//! tokens), authorizes (role and building scope, enforced server-side on every route), validates,
//! and forwards to the services that own the data over NATS request/reply. It holds no SQL.

pub mod auth;
pub mod backend;
pub mod devices;
pub mod dto;
pub mod extract;
pub mod live;
pub mod openapi;
pub mod problem;
pub mod routes;

use std::net::SocketAddr;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::{Json, Router};
use liftwire_runtime::service::{BoxError, BuildContext, Service};
use liftwire_runtime::RuntimeConfig;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthConfig, Authenticator, Principal, Role};
use crate::problem::ApiError;

/// Configuration of the API.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Shared runtime settings.
    pub runtime: RuntimeConfig,
    /// HTTP listener.
    pub http: HttpConfig,
    /// Token verification.
    pub auth: AuthConfig,
    /// NATS, to ask the services that own the data.
    pub nats: liftwire_runtime::nats::NatsConfig,
}

/// `[http]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address the API listens on.
    pub listen: SocketAddr,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Requests per second sustained per token (per replica; 0 disables the limit).
    pub rate_limit_per_second: f64,
    /// Requests a token may send at once.
    pub rate_limit_burst: u32,
    /// Live-state streams (SSE) open at once on this replica; more are refused (503).
    pub max_live_streams: usize,
    /// Live-state streams one user (token subject) may hold open at once; more are refused (429).
    pub max_live_streams_per_user: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 64 * 1024,
            rate_limit_per_second: 20.0,
            rate_limit_burst: 60,
            max_live_streams: 1_000,
            max_live_streams_per_user: 8,
        }
    }
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// Token verifier.
    pub auth: Authenticator,
    /// NATS client for request/reply with the services.
    pub nats: async_nats::Client,
    /// Per-token rate limit.
    pub limiter: std::sync::Arc<auth::RateLimiter>,
    /// Caps on open live-state streams.
    pub streams: std::sync::Arc<live::StreamLimits>,
}

impl AppState {
    /// State with a per-token limit of `per_second` sustained and `burst` at once.
    pub fn new(auth: Authenticator, nats: async_nats::Client, per_second: f64, burst: u32) -> Self {
        Self {
            auth,
            nats,
            limiter: std::sync::Arc::new(auth::RateLimiter::new(per_second, burst)),
            streams: std::sync::Arc::new(live::StreamLimits::new(
                HttpConfig::default().max_live_streams,
                HttpConfig::default().max_live_streams_per_user,
            )),
        }
    }

    /// At most `total` live-state streams open at once, `per_user` of them for one user.
    pub fn with_stream_limits(mut self, total: usize, per_user: usize) -> Self {
        self.streams = std::sync::Arc::new(live::StreamLimits::new(total, per_user));
        self
    }
}

/// The `/api/v1` router.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/api/v1/me", get(me))
        .route(
            "/api/v1/buildings/{building}/live",
            get(live::building_live_state),
        )
        .route(
            "/api/v1/buildings/{building}/live/stream",
            get(live::building_live_stream),
        )
        .route("/api/v1/openapi.json", get(openapi::document))
        .route("/api/v1/buildings", get(routes::buildings))
        .route(
            "/api/v1/buildings/{building}/elevators",
            get(live::elevators),
        )
        .route(
            "/api/v1/buildings/{building}/elevators/{elevator}/history",
            get(routes::history),
        )
        .route("/api/v1/buildings/{building}/events", get(routes::events))
        .route(
            "/api/v1/buildings/{building}/incidents",
            get(routes::incidents),
        )
        .route("/api/v1/buildings/{building}/kpis", get(routes::kpis))
        .route("/api/v1/buildings/{building}/alerts", get(routes::alerts))
        .route(
            "/api/v1/buildings/{building}/alerts/{alert}",
            get(routes::alert),
        )
        .route(
            "/api/v1/buildings/{building}/alerts/{alert}/acknowledge",
            post(routes::acknowledge),
        )
        .route(
            "/api/v1/buildings/{building}/alerts/{alert}/resolve",
            post(routes::resolve),
        )
        .route(
            "/api/v1/buildings/{building}/devices",
            get(devices::list).post(devices::provision),
        )
        .route(
            "/api/v1/buildings/{building}/devices/{device}/rotate",
            post(devices::rotate),
        )
        .route(
            "/api/v1/buildings/{building}/elevators/{elevator}/commands",
            get(devices::list_commands).post(devices::send),
        )
        .route(
            "/api/v1/buildings/{building}/elevators/{elevator}/commands/{command}",
            get(devices::command),
        )
        .layer(axum::middleware::from_fn(traced))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Runs each routed request in an `http_request` span that continues the caller's W3C trace
/// context; the span's context travels on to the services in NATS headers.
async fn traced(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("", |p| p.as_str())
        .to_owned();
    let span = tracing::info_span!("http_request", method = %request.method(), route, status = tracing::field::Empty);
    liftwire_runtime::observability::adopt_http_trace_context(&span, request.headers());
    let response = next.run(request).instrument(span.clone()).await;
    span.record("status", response.status().as_u16());
    response
}

/// Who the caller is, as the API sees it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Me {
    /// User id.
    pub subject: String,
    /// Role.
    pub role: Role,
    /// Buildings listed in the token; an admin's scope is every building, whatever this lists.
    pub buildings: Vec<String>,
}

/// `GET /api/v1/me`: the caller's identity and scope.
#[utoipa::path(get, path = "/api/v1/me",
    responses((status = 200, body = Me), (status = 401, body = problem::Problem)),
    security(("bearer" = [])), tag = "me")]
pub async fn me(principal: Principal) -> Json<Me> {
    Json(Me {
        subject: principal.subject,
        role: principal.role,
        buildings: principal
            .buildings
            .iter()
            .map(ToString::to_string)
            .collect(),
    })
}

/// Serves the API on `listener` until `shutdown`, finishing in-flight requests.
pub async fn serve_http(
    listener: TcpListener,
    state: AppState,
    max_body_bytes: usize,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state, max_body_bytes))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// The running API.
pub struct Api {
    listener: TcpListener,
    state: AppState,
    max_body_bytes: usize,
}

impl Service for Api {
    const NAME: &'static str = "api";
    type Config = Config;

    fn runtime(config: &Config) -> &RuntimeConfig {
        &config.runtime
    }

    async fn build(config: Config, _ctx: &BuildContext) -> Result<Self, BoxError> {
        let auth = Authenticator::new(&config.auth)?;
        let nats = liftwire_runtime::nats::connect(&config.nats, "liftwire-api").await?;
        let listener = TcpListener::bind(config.http.listen)
            .await
            .map_err(|e| format!("cannot bind {}: {e}", config.http.listen))?;
        tracing::info!(listen = %listener.local_addr()?, "dashboard API under /api/v1");
        Ok(Self {
            listener,
            state: AppState::new(
                auth,
                nats,
                config.http.rate_limit_per_second,
                config.http.rate_limit_burst,
            )
            .with_stream_limits(
                config.http.max_live_streams,
                config.http.max_live_streams_per_user,
            ),
            max_body_bytes: config.http.max_body_bytes,
        })
    }

    async fn run(self, shutdown: CancellationToken) -> Result<(), BoxError> {
        serve_http(self.listener, self.state, self.max_body_bytes, shutdown).await?;
        Ok(())
    }
}
