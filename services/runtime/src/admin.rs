//! Operator endpoints served by every binary on its admin address:
//!
//! * `GET /metrics`: Prometheus text exposition of the binary's registry;
//! * `GET /healthz`: liveness, 200 while the process serves requests;
//! * `GET /readyz`: readiness, 200 when every registered check is ready, otherwise 503 with the
//!   names of the checks that are not.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Named readiness checks that components flip as their dependencies come and go.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Readiness {
    /// Registers check `name` as not ready yet and returns a handle to flip it.
    pub fn register(&self, name: &'static str) -> ReadinessCheck {
        self.lock().insert(name, false);
        ReadinessCheck {
            name,
            readiness: self.clone(),
        }
    }

    /// Names of the checks that are not ready; empty when the binary is ready.
    pub fn not_ready(&self) -> Vec<&'static str> {
        self.lock()
            .iter()
            .filter(|(_, ready)| !**ready)
            .map(|(name, _)| *name)
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, bool>> {
        self.checks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Handle to one readiness check.
#[derive(Debug, Clone)]
pub struct ReadinessCheck {
    name: &'static str,
    readiness: Readiness,
}

impl ReadinessCheck {
    /// Whether the check is currently ready.
    pub fn is_ready(&self) -> bool {
        self.readiness
            .lock()
            .get(self.name)
            .copied()
            .unwrap_or(false)
    }

    /// Marks the check ready or not ready.
    pub fn set(&self, ready: bool) {
        self.readiness.lock().insert(self.name, ready);
    }
}

/// Resident memory of this process in bytes (`VmRSS` of `/proc/self/status`), if readable.
pub fn resident_memory_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What the admin endpoints serve.
#[derive(Clone)]
pub struct AdminState {
    /// `process_resident_memory_bytes`, refreshed at every scrape.
    pub resident_memory: prometheus_client::metrics::gauge::Gauge,
    /// Metrics of the binary (written while components register, read when scraped).
    pub registry: Arc<RwLock<Registry>>,
    /// Readiness checks of the binary.
    pub readiness: Readiness,
}

impl AdminState {
    /// The registry in Prometheus text format, as `/metrics` serves it (tests read it here).
    pub fn metrics_text(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        let registry = self.registry.read().unwrap_or_else(PoisonError::into_inner);
        prometheus_client::encoding::text::encode(&mut text, &registry)?;
        Ok(text)
    }
}

/// The admin router (exposed for tests and for binaries that mount it elsewhere).
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves the admin endpoints on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn metrics(State(state): State<AdminState>) -> Response {
    if let Some(rss) = resident_memory_bytes() {
        state.resident_memory.set(rss);
    }
    match state.metrics_text() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let not_ready = state.readiness.not_ready();
    if not_ready.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "not_ready": not_ready })),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let status = response[9..12].parse().unwrap();
        let body = response
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        (status, body)
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register(
            "liftwire_test_events",
            "Events seen by the test",
            counter.clone(),
        );
        counter.inc_by(3);
        let readiness = Readiness::default();
        let nats = readiness.register("nats");

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            AdminState {
                registry: Arc::new(RwLock::new(registry)),
                readiness,
                resident_memory: Default::default(),
            },
            shutdown.clone(),
        ));

        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("liftwire_test_events_total 3"), "{body}");
        let rss = resident_memory_bytes().expect("readable on Linux");
        assert!(rss > 1024 * 1024, "{rss}");
        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("nats"), "{body}");
        nats.set(true);
        assert_eq!(get(addr, "/readyz").await.0, 200);

        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
