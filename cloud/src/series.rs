//! Reading stored telemetry back: the series of a tenant (filtered by gateway, device, metric)
//! and a series' readings over a time range, decoded from its chunks.

use axum::extract::State;
use axum::Json;
use fieldgate_shared::codec::chunk::decode_chunk;
use fieldgate_shared::model::{Quality, Value};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::api::{page_limit, ApiPath, ApiQuery};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::fleet::load_gateway;
use crate::AppState;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Series {
    pub id: String,
    pub gateway_id: String,
    pub stream: String,
    pub device: String,
    pub metric: String,
    /// Readings stored.
    pub count: i64,
    /// Earliest and latest reading time (ms), when there are readings.
    pub first_ts: Option<i64>,
    pub last_ts: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SeriesPage {
    pub series: Vec<Series>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next_after: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SeriesQuery {
    pub gateway_id: Option<String>,
    pub device: Option<String>,
    pub metric: Option<String>,
    pub stream: Option<String>,
    /// The `next_after` of the previous page.
    pub after: Option<String>,
    /// 1..=500, default 100.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
}

type SeriesRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

const SERIES_SELECT: &str =
    "SELECT s.id, s.gateway_id, s.stream, s.device, s.metric, g.site_id, g.status, \
     (SELECT CAST(SUM(c.count) AS BIGINT) FROM chunks c WHERE c.series_id = s.id), \
     (SELECT MIN(c.first_ts) FROM chunks c WHERE c.series_id = s.id), \
     (SELECT MAX(c.last_ts) FROM chunks c WHERE c.series_id = s.id) \
     FROM series s JOIN gateways g ON g.id = s.gateway_id AND g.tenant_id = s.tenant_id";

fn series_from_row(row: SeriesRow) -> Series {
    let (id, gateway_id, stream, device, metric, _site, _status, count, first_ts, last_ts) = row;
    Series {
        id,
        gateway_id,
        stream,
        device,
        metric,
        count: count.unwrap_or(0),
        first_ts,
        last_ts,
    }
}

/// Series of the tenant (within the caller's scope), filtered, in pages.
#[utoipa::path(get, path = "/v1/series", tag = "telemetry", security(("bearer" = [])), params(SeriesQuery),
    responses((status = 200, body = SeriesPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn list_series(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<SeriesQuery>,
) -> ApiResult<Json<SeriesPage>> {
    let limit = page_limit(query.limit, 100, 500)?;
    state.compactor.run(&state.db).await?;
    let mut sql = format!("{SERIES_SELECT} WHERE s.tenant_id = $1 AND s.id > $2");
    let mut binds = vec![
        principal.tenant_id.clone(),
        query.after.clone().unwrap_or_default(),
    ];
    let mut filter = |column: &str, value: &Option<String>| {
        if let Some(value) = value {
            binds.push(value.clone());
            sql.push_str(&format!(" AND {column} = ${}", binds.len()));
        }
    };
    filter("s.gateway_id", &query.gateway_id);
    filter("s.device", &query.device);
    filter("s.metric", &query.metric);
    filter("s.stream", &query.stream);
    filter("g.site_id", &principal.scope.site_id);
    if let Some((key, value)) = &principal.scope.label {
        binds.push(key.clone());
        binds.push(value.clone());
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM gateway_labels l WHERE l.gateway_id = g.id AND l.key = ${} AND l.value = ${})",
            binds.len() - 1,
            binds.len()
        ));
    }
    sql.push_str(&format!(" ORDER BY s.id LIMIT {}", limit + 1));
    let mut q = sqlx::query_as::<_, SeriesRow>(&sql);
    for value in &binds {
        q = q.bind(value);
    }
    let mut rows = q.fetch_all(&state.db.pool).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let series: Vec<Series> = rows.into_iter().map(series_from_row).collect();
    let next_after = if more {
        series.last().map(|s| s.id.clone())
    } else {
        None
    };
    Ok(Json(SeriesPage { series, next_after }))
}

async fn load_series(state: &AppState, principal: &Principal, id: &str) -> ApiResult<Series> {
    state.compactor.run(&state.db).await?;
    let row: Option<SeriesRow> = sqlx::query_as(&format!(
        "{SERIES_SELECT} WHERE s.id = $1 AND s.tenant_id = $2"
    ))
    .bind(id)
    .bind(&principal.tenant_id)
    .fetch_optional(&state.db.pool)
    .await?;
    let series = series_from_row(row.ok_or_else(|| ApiError::not_found("series"))?);
    // The key's scope decides through the gateway; outside it the series does not exist.
    load_gateway(&state.db, principal, &series.gateway_id)
        .await
        .map_err(|_| ApiError::not_found("series"))?;
    Ok(series)
}

/// One series.
#[utoipa::path(get, path = "/v1/series/{id}", tag = "telemetry", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = Series), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_series(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Series>> {
    load_series(&state, &principal, &id).await.map(Json)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadingsQuery {
    /// From this time (ms, inclusive).
    pub from: Option<i64>,
    /// Up to this time (ms, exclusive).
    pub to: Option<i64>,
    /// The `next_after` of the previous page.
    #[param(pattern = "^-?[0-9]{1,18}:[0-9]{1,9}$")]
    pub after: Option<String>,
    /// 1..=10000, default 1000.
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReadingOut {
    pub ts_ms: i64,
    /// A number, boolean or string; null for a non-finite float.
    pub value: serde_json::Value,
    /// `good`, `uncertain` or `bad`.
    pub quality: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReadingsPage {
    pub series_id: String,
    /// In the order the gateway received them.
    pub readings: Vec<ReadingOut>,
    pub next_after: Option<String>,
}

/// A series' readings in a time range, in arrival order, in pages.
#[utoipa::path(get, path = "/v1/series/{id}/readings", tag = "telemetry", security(("bearer" = [])),
    params(("id" = String, Path), ReadingsQuery),
    responses((status = 200, body = ReadingsPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn readings(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<ReadingsQuery>,
) -> ApiResult<Json<ReadingsPage>> {
    let limit = page_limit(query.limit, 1000, 10_000)? as usize;
    let series = load_series(&state, &principal, &id).await?;
    let from = query.from.unwrap_or(i64::MIN);
    let to = query.to.unwrap_or(i64::MAX);
    // The cursor is (chunk first_seq, index within the chunk) of the next reading.
    let (after_seq, after_index) = match &query.after {
        None => (i64::MIN, 0usize),
        Some(cursor) => cursor
            .split_once(':')
            .and_then(|(s, i)| Some((s.parse().ok()?, i.parse().ok()?)))
            .ok_or_else(|| ApiError::bad_request("`after` is not a cursor this API returned"))?,
    };
    let mut out = Vec::new();
    let mut next_after = None;
    let mut seq_cursor = after_seq;
    'chunks: loop {
        let chunks: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT first_seq, data FROM chunks WHERE series_id = $1 AND tenant_id = $2 AND first_seq >= $3 \
             AND last_ts >= $4 AND first_ts < $5 ORDER BY first_seq LIMIT 64",
        )
        .bind(&series.id)
        .bind(&principal.tenant_id)
        .bind(seq_cursor)
        .bind(from)
        .bind(to)
        .fetch_all(&state.db.pool)
        .await?;
        if chunks.is_empty() {
            break;
        }
        for (first_seq, data) in &chunks {
            let chunk = decode_chunk(data)
                .map_err(|e| anyhow::anyhow!("stored chunk {first_seq} of {id}: {e}"))?;
            let start = if *first_seq == after_seq {
                after_index
            } else {
                0
            };
            let values = chunk.values.as_series_values();
            for i in start..chunk.len() {
                let ts = chunk.ts_ms[i];
                if ts < from || ts >= to {
                    continue;
                }
                if out.len() == limit {
                    next_after = Some(format!("{first_seq}:{i}"));
                    break 'chunks;
                }
                out.push(ReadingOut {
                    ts_ms: ts,
                    value: match values.get(i) {
                        Value::F64(x) => serde_json::Number::from_f64(x)
                            .map(serde_json::Value::Number)
                            .unwrap_or(serde_json::Value::Null),
                        Value::I64(x) => serde_json::Value::from(x),
                        Value::Bool(b) => serde_json::Value::Bool(b),
                        Value::Str(s) => serde_json::Value::String(s.as_str().to_string()),
                    },
                    quality: match chunk.quality[i] {
                        Quality::Good => "good",
                        Quality::Uncertain => "uncertain",
                        Quality::Bad => "bad",
                    }
                    .to_string(),
                });
            }
        }
        seq_cursor = chunks.last().map(|(s, _)| s + 1).unwrap_or(i64::MAX);
    }
    Ok(Json(ReadingsPage {
        series_id: series.id,
        readings: out,
        next_after,
    }))
}
