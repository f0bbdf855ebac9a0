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
/// Items per page when a request does not say.
pub const DEFAULT_PAGE: u32 = 100;
/// Most items per page.
pub const MAX_PAGE: u32 = 1_000;

/// The page size a request asks for (`limit` 0 or no page: [`DEFAULT_PAGE`]); above
/// [`MAX_PAGE`] the message says why it is refused.
pub fn page_limit(limit: Option<u32>) -> Result<i64, String> {
    match limit.unwrap_or(0) {
        0 => Ok(i64::from(DEFAULT_PAGE)),
        n if n <= MAX_PAGE => Ok(i64::from(n)),
        _ => Err(format!("page limit is at most {MAX_PAGE}")),
    }
}

/// Keyset pagination: `items` were fetched with one more than `limit`, so an extra item means
/// another page follows. Returns the page and the next page's cursor (`cursor` of its last
/// item), empty on the last page.
pub fn paginate<T>(
    mut items: Vec<T>,
    limit: i64,
    cursor: impl Fn(&T) -> String,
) -> (Vec<T>, String) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if items.len() <= limit {
        return (items, String::new());
    }
    items.truncate(limit);
    let next = items.last().map(cursor).unwrap_or_default();
    (items, next)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_their_cursors() {
        assert_eq!(page_limit(None), Ok(100));
        assert_eq!(page_limit(Some(0)), Ok(100));
        assert_eq!(page_limit(Some(1_000)), Ok(1_000));
        assert!(page_limit(Some(1_001)).is_err());
        let cursor = |n: &u32| n.to_string();
        assert_eq!(paginate(vec![1, 2, 3], 2, cursor), (vec![1, 2], "2".into()));
        assert_eq!(paginate(vec![1, 2], 2, cursor), (vec![1, 2], String::new()));
        assert_eq!(
            paginate(Vec::<u32>::new(), 2, cursor),
            (vec![], String::new())
        );
    }
}
