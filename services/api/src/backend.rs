//! Request/reply with the services that own the data (NATS service API), with the caller's trace
//! context in the headers and a bounded wait.

use std::time::Duration;

use liftwire_proto::naming::service_subject;
use prost::Message;

use crate::problem::ApiError;

/// How long a service has to answer.
pub const SERVICE_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks `service`'s `endpoint` and decodes the reply. Service errors map onto API errors: 400 →
/// bad request (the service's message, which names the field), 404 → not found, 409 →
/// conflict; anything else, a timeout or no responder → unavailable (details logged only).
pub async fn ask<Rep: Message + Default>(
    nats: &async_nats::Client,
    service: &str,
    endpoint: &str,
    request: &impl Message,
) -> Result<Rep, ApiError> {
    let subject = service_subject(service, endpoint).map_err(|_| ApiError::Unavailable)?;
    let mut headers = async_nats::HeaderMap::new();
    liftwire_runtime::observability::inject_trace_context(&tracing::Span::current(), &mut headers);
    let reply = tokio::time::timeout(
        SERVICE_TIMEOUT,
        nats.request_with_headers(subject, headers, request.encode_to_vec().into()),
    )
    .await
    .map_err(|_| {
        tracing::warn!(service, endpoint, "service did not answer in time");
        ApiError::Unavailable
    })?
    .map_err(|e| {
        tracing::warn!(service, endpoint, error = %e, "service request failed");
        ApiError::Unavailable
    })?;
    if let Some(headers) = &reply.headers {
        if let Some(code) = headers.get(async_nats::service::NATS_SERVICE_ERROR_CODE) {
            let status = headers
                .get(async_nats::service::NATS_SERVICE_ERROR)
                .map(|s| s.as_str().to_string())
                .unwrap_or_default();
            return Err(match code.as_str() {
                "400" => ApiError::BadRequest(status),
                "404" => ApiError::NotFound,
                "409" => ApiError::Conflict(status),
                _ => {
                    tracing::warn!(service, endpoint, code = code.as_str(), %status, "service refused");
                    ApiError::Unavailable
                }
            });
        }
    }
    Rep::decode(reply.payload.as_ref()).map_err(|e| {
        tracing::warn!(service, endpoint, error = %e, "undecodable service reply");
        ApiError::Unavailable
    })
}
