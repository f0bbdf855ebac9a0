//! Request/reply endpoints of a service on the NATS service API: `lw.v1.svc.<service>.<name>`,
//! shared by the replicas through a queue group named after the service. Requests are answered
//! concurrently (bounded), each in a span that continues the caller's trace; a failure is answered
//! with the `Nats-Service-Error-Code` / `Nats-Service-Error` headers and an empty payload.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_nats::service::{self, ServiceExt};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::observability::adopt_trace_context;
use crate::service::BoxError;

/// Requests answered at once per replica.
const CONCURRENCY: usize = 32;

/// Why a request failed, as the caller sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EndpointError {
    /// 400 bad request, 404 not found, 409 conflict, 503 unavailable.
    pub code: u16,
    /// Safe to show the caller (never internal details).
    pub message: String,
}

impl EndpointError {
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            code: 400,
            message: format!("bad request: {}", message.into()),
        }
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            code: 404,
            message: format!("not found: {}", message.into()),
        }
    }

    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            code: 409,
            message: format!("conflict: {}", message.into()),
        }
    }

    /// 503; `cause` is logged, not returned.
    pub fn unavailable(cause: &dyn std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "request failed");
        Self {
            code: 503,
            message: "unavailable".into(),
        }
    }
}

/// What answering one request produces.
pub type Answer = Pin<Box<dyn Future<Output = Result<Vec<u8>, EndpointError>> + Send>>;

type Requests = Pin<Box<dyn Stream<Item = (usize, service::Request)> + Send>>;

/// Serves `endpoints` of `service` until `shutdown`; `handle(endpoint name, payload)` answers. On
/// shutdown the endpoints unsubscribe, requests already received are still answered, then it
/// returns.
pub async fn serve<H>(
    nats: async_nats::Client,
    service: &str,
    description: &str,
    endpoints: &[&'static str],
    handle: H,
    shutdown: CancellationToken,
) -> Result<(), BoxError>
where
    H: Fn(String, bytes::Bytes) -> Answer + Send + Sync + 'static,
{
    let running = nats
        .service_builder()
        .description(description)
        .queue_group(service)
        .start(service, env!("CARGO_PKG_VERSION"))
        .await?;
    let group = running.group(format!("lw.v1.svc.{service}"));
    let mut streams: Vec<Requests> = Vec::new();
    for (index, &endpoint) in endpoints.iter().enumerate() {
        let requests = group.endpoint(endpoint).await?;
        streams.push(Box::pin(requests.map(move |r| (index, r))));
    }
    let handle = Arc::new(handle);
    let names: Arc<Vec<&'static str>> = Arc::new(endpoints.to_vec());
    let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut requests = futures::stream::select_all(streams);
    let mut running = Some(running);
    let mut answering = tokio::task::JoinSet::new();
    loop {
        let next = tokio::select! {
            next = requests.next() => next,
            _ = shutdown.cancelled(), if running.is_some() => {
                // Unsubscribes the endpoints: what was received is still answered, then the
                // request streams end.
                if let Some(running) = running.take() {
                    running.stop().await?;
                }
                continue;
            }
        };
        let Some((index, request)) = next else { break };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let handle = handle.clone();
        let endpoint = names[index];
        answering.spawn(async move {
            let span = tracing::info_span!("endpoint", endpoint);
            if let Some(headers) = &request.message.headers {
                adopt_trace_context(&span, headers);
            }
            let reply = handle(endpoint.to_owned(), request.message.payload.clone())
                .instrument(span)
                .await
                .map(Into::into)
                .map_err(|e| service::error::Error {
                    status: e.message,
                    code: usize::from(e.code),
                });
            if let Err(e) = request.respond(reply).await {
                tracing::warn!(error = %e, endpoint, "replying failed");
            }
            drop(permit);
        });
        // Reap finished answers so the set stays small.
        while answering.try_join_next().is_some() {}
    }
    while answering.join_next().await.is_some() {}
    Ok(())
}
