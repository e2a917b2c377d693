//! Errors: [`Error`] inside the node, [`ApiError`] at the HTTP edge.
//!
//! Matrix `errcode`s are chosen here and nowhere else: domain code returns
//! typed errors and the API edge maps them.

use http::StatusCode;
use serde_json::{Value, json};

use crate::storage::StorageError;

/// An error answered to a client: status, `errcode`, message and extra fields.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub message: String,
    /// Extra top-level fields (e.g. `retry_after_ms`, UIA flows).
    pub extra: Option<Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, errcode: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, errcode, message: message.into(), extra: None }
    }
    pub fn bad_json(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", m)
    }
    pub fn not_json(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_NOT_JSON", m)
    }
    pub fn invalid_param(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", m)
    }
    pub fn missing_param(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_MISSING_PARAM", m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", m)
    }
    pub fn unrecognized() -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "Unrecognized request")
    }
    pub fn method_not_allowed() -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED", "Method not allowed for this endpoint")
    }
    pub fn missing_token() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "Missing access token")
    }
    pub fn unknown_token(soft_logout: bool) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "Unknown or expired access token");
        e.extra = Some(json!({ "soft_logout": soft_logout }));
        e
    }
    pub fn too_large(m: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", m)
    }
    pub fn limit_exceeded(retry_after_ms: u64) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED", "Too many requests");
        e.extra = Some(json!({ "retry_after_ms": retry_after_ms }));
        e
    }
    pub fn unknown(m: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", m)
    }
    pub fn with_extra(mut self, extra: Value) -> Self {
        self.extra = Some(extra);
        self
    }

    /// The JSON body: `errcode`, `error` and any extra fields. An empty
    /// errcode (the first step of user-interactive auth) sends only the extra fields.
    pub fn body(&self) -> Value {
        let mut body = if self.errcode.is_empty() { json!({}) } else { json!({ "errcode": self.errcode, "error": self.message }) };
        if let (Some(Value::Object(extra)), Value::Object(map)) = (&self.extra, &mut body) {
            for (k, v) in extra {
                map.insert(k.clone(), v.clone());
            }
        }
        body
    }
}

/// Internal errors of the node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("shard {0} is unavailable")]
    ShardUnavailable(usize),
    #[error("event is not allowed: {0}")]
    AuthRules(String),
    #[error("cannot build event: {0}")]
    EventBuild(String),
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::AuthRules(m) => ApiError::forbidden(m),
            Error::Storage(StorageError::Unavailable(m)) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", m),
            Error::ShardUnavailable(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", e.to_string()),
            other => {
                tracing::error!(error = %other, "internal error");
                ApiError::unknown("Internal server error")
            }
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        Error::Storage(e).into()
    }
}

/// Result type of handlers.
pub type ApiResult<T> = Result<T, ApiError>;
