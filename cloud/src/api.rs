//! The HTTP API: every route under `/v1`, the OpenAPI document generated from the handlers'
//! annotations (served at `/v1/openapi.json`), `/healthz`, Prometheus `/metrics`, request size
//! limits and timeouts, and extractors that turn malformed input into JSON errors.

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tower_http::timeout::TimeoutLayer;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::{ApiError, ApiResult};
use crate::{accounts, audit, fleet, ingest, series, AppState};

#[derive(OpenApi)]
#[openapi(
    info(title = "Fieldgate cloud API", version = "1",
        description = "Tenants, people and API keys; gateway enrollment and mutual-TLS ingest; \
            the fleet registry; stored telemetry. Authenticate with `Authorization: Bearer <token>` \
            (a login session or an API key); gateways use their client certificate."),
    paths(
        accounts::login, accounts::logout, accounts::me,
        accounts::list_users, accounts::create_user, accounts::delete_user,
        accounts::list_keys, accounts::create_key, accounts::revoke_key,
        audit::list,
        fleet::list_sites, fleet::create_site, fleet::get_site,
        fleet::create_enrollment_token, fleet::list_enrollment_tokens,
        fleet::enroll, fleet::renew_certificate,
        fleet::list_gateways, fleet::get_gateway, fleet::update_gateway, fleet::decommission_gateway,
        ingest::ingest,
        series::list_series, series::get_series, series::readings,
        healthz,
    ),
    components(schemas(fleet::GatewayStatus)),
    modifiers(&BearerAuth),
    tags((name = "auth"), (name = "people"), (name = "audit"), (name = "fleet"), (name = "gateway"),
        (name = "telemetry"), (name = "service"))
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The whole service's routes.
pub fn router(state: AppState) -> Router {
    let limits = &state.config.limits;
    let json_limit = limits.max_json_bytes;
    let timeout = Duration::from_secs(limits.request_timeout_s);
    let v1 = Router::new()
        .route("/auth/login", post(accounts::login))
        .route("/auth/logout", post(accounts::logout))
        .route("/me", get(accounts::me))
        .route(
            "/users",
            get(accounts::list_users).post(accounts::create_user),
        )
        .route("/users/{id}", delete(accounts::delete_user))
        .route(
            "/api-keys",
            get(accounts::list_keys).post(accounts::create_key),
        )
        .route("/api-keys/{id}", delete(accounts::revoke_key))
        .route("/audit", get(audit::list))
        .route("/sites", get(fleet::list_sites).post(fleet::create_site))
        .route("/sites/{id}", get(fleet::get_site))
        .route(
            "/enrollment-tokens",
            get(fleet::list_enrollment_tokens).post(fleet::create_enrollment_token),
        )
        .route("/enroll", post(fleet::enroll))
        .route("/gateway/certificate", post(fleet::renew_certificate))
        .route("/gateways", get(fleet::list_gateways))
        .route(
            "/gateways/{id}",
            get(fleet::get_gateway).patch(fleet::update_gateway),
        )
        .route(
            "/gateways/{id}/decommission",
            post(fleet::decommission_gateway),
        )
        .route("/ingest", post(ingest::ingest))
        .route("/series", get(series::list_series))
        .route("/series/{id}", get(series::get_series))
        .route("/series/{id}/readings", get(series::readings))
        .route("/openapi.json", get(openapi_json))
        .fallback(not_found);
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(json_limit))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_responses,
        ))
        .with_state(state)
}

async fn count_responses(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    state.metrics.response(response.status().as_u16());
    response
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ServiceHealth {
    /// `ok` when the database answers.
    pub status: String,
}

/// Liveness and database reachability.
#[utoipa::path(get, path = "/healthz", tag = "service",
    responses((status = 200, body = ServiceHealth), (status = 503, body = crate::error::ErrorBody)))]
pub async fn healthz(State(state): State<AppState>) -> Response {
    match sqlx::query("SELECT 1").execute(&state.db.pool).await {
        Ok(_) => Json(ServiceHealth {
            status: "ok".into(),
        })
        .into_response(),
        Err(err) => {
            tracing::error!(error = %err, "health check: the database does not answer");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the database does not answer",
            )
            .into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}

/// A page size from `limit`: `default` when absent, 400 outside 1..=max.
pub fn page_limit(limit: Option<u32>, default: u32, max: u32) -> ApiResult<i64> {
    match limit {
        None => Ok(i64::from(default)),
        Some(n) if (1..=max).contains(&n) => Ok(i64::from(n)),
        Some(_) => Err(ApiError::bad_request(format!("limit is 1..={max}"))),
    }
}

/// A whole number given as `16` or `16.0` (JSON Schema's `integer` allows both).
pub fn whole_u32<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    use serde::Deserialize;
    let number = serde_json::Number::deserialize(deserializer)?;
    number
        .as_u64()
        .or_else(|| {
            number
                .as_f64()
                .filter(|x| x.fract() == 0.0 && *x >= 0.0)
                .map(|x| x as u64)
        })
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "expected a whole number 0..=4294967295, got {number}"
            ))
        })
}

/// [`whole_u32`] for optional fields.
pub fn whole_u32_opt<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u32>, D::Error> {
    #[derive(serde::Deserialize)]
    struct Whole(#[serde(deserialize_with = "whole_u32")] u32);
    use serde::Deserialize;
    Ok(Option::<Whole>::deserialize(deserializer)?.map(|Whole(n)| n))
}

/// A JSON object body (serde would also take a struct from an array; the API does not) whose
/// rejections are API errors.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<serde_json::Value>::from_request(request, state).await {
            Ok(Json(value)) if !value.is_object() => {
                Err(ApiError::bad_request("the body must be a JSON object"))
            }
            Ok(Json(value)) => serde_json::from_value(value)
                .map(ApiJson)
                .map_err(|e| ApiError::bad_request(format!("the body does not fit: {e}"))),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the request body is too large",
                ))
            }
            Err(rejection) => Err(rejection.into()),
        }
    }
}

/// `Query` whose rejections are API errors.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| ApiQuery(value))
            .map_err(ApiError::from)
    }
}

/// `Path` whose rejections are API errors.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| ApiPath(value))
            .map_err(ApiError::from)
    }
}
