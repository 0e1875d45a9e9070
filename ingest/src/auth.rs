//! Bearer authentication of the product backend's calls (`INTERNAL_API_TOKEN`).

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use secrecy::ExposeSecret;
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::error::ApiError;

/// Present in a handler's arguments: the request carried the internal API token.
#[derive(Debug)]
pub struct InternalCaller;

impl FromRequestParts<AppState> for InternalCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthorized)?;
        let expected = state.internal_api_token.expose_secret().as_bytes();
        if bool::from(presented.trim().as_bytes().ct_eq(expected)) {
            Ok(InternalCaller)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}
