//! Errors as RFC 7807 `application/problem+json`, each with a stable machine-readable `code`.
//! Internal details are logged, never sent.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Every error the API returns.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No valid bearer token (missing, malformed, expired, wrong issuer/audience, bad signature).
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// Authenticated, but the token's role or building scope does not allow this.
    #[error("not allowed for this token")]
    Forbidden,
    /// No such resource (or not visible to this token).
    #[error("not found")]
    NotFound,
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The change conflicts with the resource's state.
    #[error("{0}")]
    Conflict(String),
    /// The token sent too many requests; retry after the given seconds.
    #[error("too many requests, retry in {0} s")]
    TooManyRequests(u64),
    /// The request body is larger than the configured limit.
    #[error("the request body is too large")]
    PayloadTooLarge,
    /// The request body is not JSON (`Content-Type` must be `application/json`).
    #[error("the request body must be application/json")]
    UnsupportedMediaType,
    /// The route exists, but not with this method.
    #[error("this method is not allowed here")]
    MethodNotAllowed,
    /// A backend service did not answer in time.
    #[error("the service is unavailable, try again")]
    Unavailable,
}

/// An RFC 7807 problem document (`application/problem+json`).
#[derive(Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// URI naming the problem type.
    #[serde(rename = "type")]
    kind: String,
    /// Short summary of the problem type.
    title: &'static str,
    /// HTTP status.
    status: u16,
    /// What went wrong in this request (never internal details).
    detail: String,
    /// Stable machine-readable code: `unauthenticated`, `forbidden`, `not_found`, `bad_request`,
    /// `conflict`, `payload_too_large`, `unsupported_media_type`, `method_not_allowed`,
    /// `too_many_requests`, `unavailable`.
    code: &'static str,
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::Unauthenticated(_) => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "Unauthenticated",
            ),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found", "Not found"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request", "Bad request"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict", "Conflict"),
            ApiError::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "Payload too large",
            ),
            ApiError::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Unsupported media type",
            ),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Method not allowed",
            ),
            ApiError::TooManyRequests(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                "Too many requests",
            ),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, title) = self.parts();
        let body = Problem {
            kind: format!("https://liftwire.dev/problems/{code}"),
            title,
            status: status.as_u16(),
            detail: self.to_string(),
            code,
        };
        let mut response = (status, axum::Json(body)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/problem+json"),
        );
        if let ApiError::TooManyRequests(seconds) = self {
            if let Ok(value) = header::HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
