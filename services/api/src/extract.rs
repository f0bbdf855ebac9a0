//! Extractors whose rejections are RFC 7807 problems like every other error.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::problem::ApiError;

/// Why a NUL character is refused at the door: no text column can hold one, so a request carrying
/// it would otherwise fail its query downstream and be answered as an outage.
const NUL_REFUSED: &str = "text must not contain a NUL character";

/// Refuses a percent-encoded NUL in part of a URI (a raw one cannot occur there).
fn refuse_encoded_nul(uri_part: Option<&str>) -> Result<(), ApiError> {
    match uri_part {
        Some(part) if part.contains("%00") => Err(ApiError::BadRequest(NUL_REFUSED.into())),
        _ => Ok(()),
    }
}

/// True if any string (or object key) in `value` holds a NUL.
fn holds_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(text) => text.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(holds_nul),
        serde_json::Value::Object(fields) => fields
            .iter()
            .any(|(key, value)| key.contains('\0') || holds_nul(value)),
        _ => false,
    }
}

/// Query string, rejected as a `bad_request` problem naming what is wrong.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        refuse_encoded_nul(parts.uri.query())?;
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// Path parameters, rejected as a `bad_request` problem.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        refuse_encoded_nul(Some(parts.uri.path()))?;
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// JSON body, rejected as a `bad_request` problem (413 when over the body limit, 415 when not
/// sent as `application/json`). An empty body reads as `{}`, so a body whose fields all have
/// defaults may be left out.
pub struct Json<T>(pub T);

/// True if `headers` name a JSON body (`application/json`, parameters and `+json` types too).
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
        .unwrap_or(false)
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = is_json(req.headers());
        let body = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge
                } else {
                    ApiError::BadRequest(e.body_text())
                }
            })?;
        let value = if body.is_empty() {
            serde_json::Value::Object(serde_json::Map::new())
        } else if !json {
            return Err(ApiError::UnsupportedMediaType);
        } else {
            serde_json::from_slice(&body)
                .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?
        };
        if holds_nul(&value) {
            return Err(ApiError::BadRequest(NUL_REFUSED.into()));
        }
        serde_json::from_value(value)
            .map(Json)
            .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))
    }
}
