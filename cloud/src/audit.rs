//! The audit log: every change through the API (who, what, when, from where), readable by the
//! tenant's owners at `GET /v1/audit`.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::api::{page_limit, ApiQuery};
use crate::auth::{Principal, Role};
use crate::db::now_ms;
use crate::error::{ApiError, ApiResult};
use crate::ids::new_id;
use crate::AppState;

/// Record a change. Runs on the caller's transaction when given one, so the change and its
/// record commit together.
pub async fn record<'e, E>(
    exec: E,
    principal: &Principal,
    action: &str,
    object: &str,
    detail: serde_json::Value,
) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    record_as(
        exec,
        &principal.tenant_id,
        &principal.actor,
        &principal.source_ip,
        action,
        object,
        detail,
    )
    .await
}

/// Record a change made by someone who is not a [`Principal`] (a gateway, the admin CLI).
pub async fn record_as<'e, E>(
    exec: E,
    tenant_id: &str,
    actor: &str,
    source_ip: &str,
    action: &str,
    object: &str,
    detail: serde_json::Value,
) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query(
        "INSERT INTO audit_log (id, tenant_id, at, actor, action, object, source_ip, detail) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(new_id("au"))
    .bind(tenant_id)
    .bind(now_ms())
    .bind(actor)
    .bind(action)
    .bind(object)
    .bind(source_ip)
    .bind(detail.to_string())
    .execute(exec)
    .await?;
    Ok(())
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub id: String,
    /// UTC milliseconds since the Unix epoch.
    pub at: i64,
    /// `user:<id>`, `key:<id>`, `gateway:<id>` or `admin`.
    pub actor: String,
    pub action: String,
    pub object: String,
    pub source_ip: String,
    pub detail: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Pass as `before` for the next (older) page; absent on the last page.
    pub next_before: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// The `next_before` of the previous page.
    #[param(pattern = "^-?[0-9]{1,18}/[a-z0-9_]{0,64}$")]
    pub before: Option<String>,
    /// At most this many (1..=500, default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

/// The tenant's audit log, newest first.
#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditQuery),
    security(("bearer" = [])),
    responses((status = 200, body = AuditPage), (status = 400, body = crate::error::ErrorBody),
        (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<AuditQuery>,
) -> ApiResult<Json<AuditPage>> {
    principal.require(Role::Owner)?;
    principal.require_unscoped()?;
    let limit = page_limit(query.limit, 100, 500)?;
    let (before_at, before_id) = match &query.before {
        None => (i64::MAX, String::new()),
        Some(cursor) => cursor
            .split_once('/')
            .and_then(|(at, id)| Some((at.parse().ok()?, id.to_string())))
            .ok_or_else(|| ApiError::bad_request("`before` is not a cursor this API returned"))?,
    };
    type Row = (String, i64, String, String, String, String, String);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, at, actor, action, object, source_ip, detail FROM audit_log \
         WHERE tenant_id = $1 AND (at < $2 OR (at = $2 AND id < $3)) \
         ORDER BY at DESC, id DESC LIMIT $4",
    )
    .bind(&principal.tenant_id)
    .bind(before_at)
    .bind(before_id)
    .bind(limit + 1)
    .fetch_all(&state.db.pool)
    .await?;
    let more = rows.len() as i64 > limit;
    let entries: Vec<AuditEntry> = rows
        .into_iter()
        .take(limit as usize)
        .map(
            |(id, at, actor, action, object, source_ip, detail)| AuditEntry {
                id,
                at,
                actor,
                action,
                object,
                source_ip,
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
            },
        )
        .collect();
    let next_before = if more {
        entries.last().map(|e| format!("{}/{}", e.at, e.id))
    } else {
        None
    };
    Ok(Json(AuditPage {
        entries,
        next_before,
    }))
}
