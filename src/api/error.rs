//! The API's errors: the wire protocol's codes as JSON (`{"code", "message"}`)
//! with the HTTP status each stands for, and request bodies read into typed
//! requests with the same errors.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use confab_proto::v1::ErrorCode;
use confab_protocol::ErrorKind;
use serde::de::DeserializeOwned;

/// A refused or failed request.
#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
}

impl ApiError {
    /// An error with `code` saying `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A `BAD_REQUEST`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// The error of anything with a protocol error code (internal details
    /// stay in the log, as on the wire).
    pub fn of(err: &impl ErrorKind) -> Self {
        if err.code() == ErrorCode::Internal {
            tracing::error!(error = %err, "API request failed");
        }
        Self::new(err.code(), err.client_message())
    }
}

impl<E: ErrorKind> From<E> for ApiError {
    fn from(err: E) -> Self {
        Self::of(&err)
    }
}

/// The HTTP status of a protocol error code.
fn status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest | ErrorCode::UnsupportedVersion | ErrorCode::Unspecified => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::RateLimited | ErrorCode::SlowConsumer => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::AlreadyExists => StatusCode::CONFLICT,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status(self.code);
        if status.is_server_error() {
            tracing::error!(code = ?self.code, message = %self.message, "API request failed");
        } else {
            tracing::info!(code = ?self.code, message = %self.message, "API request refused");
        }
        let code = self.code.as_str_name().trim_start_matches("ERROR_CODE_");
        let body = serde_json::json!({ "code": code, "message": self.message });
        (status, Json(body)).into_response()
    }
}

/// A request body as `T`: 413 past `api.max_body_bytes`, 400 for anything
/// that is not the JSON `T` takes (the message says where).
pub(super) fn json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(ErrorCode::TooLarge, "the request body is too large"),
        _ => ApiError::bad_request(rejection.body_text()),
    })?;
    let deserializer = &mut serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let at = err.path().to_string();
        match at.as_str() {
            "." => ApiError::bad_request(format!("invalid JSON: {}", err.inner())),
            _ => ApiError::bad_request(format!("invalid JSON at {at}: {}", err.inner())),
        }
    })
}
