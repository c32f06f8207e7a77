//! `POST /v1/ingest`: batches in the shared codec's format from gateways over mutual TLS,
//! stored exactly once.
//!
//! Each (gateway, stream) has a high-water mark, `streams.next_seq`: the next sequence number it
//! accepts. A batch wholly below it is a resend (acknowledged, not stored); one straddling it is
//! trimmed to the readings above it; one starting above it would leave a hole and is refused
//! with `stream_gap` and where to resume, unless the gateway declares the hole lost
//! (`Fieldgate-Declared-Loss: true`, after its journal overflowed), which is recorded. The check
//! and the store run in one transaction that first locks the stream row, so concurrent senders
//! of one stream serialise and every reading is stored once.
//!
//! Readings are stored per series as compressed chunks (the shared codec, one series per chunk)
//! with count/min/max/sum, keyed by (series, first sequence number of the stored range).
//!
//! Limits: batches above `max_batch_bytes`/`max_batch_readings` get 413; a tenant above its
//! readings-per-second rate gets 429 with `Retry-After` (the gateway keeps the batch and
//! retries: a throttled backlog is delayed, never dropped).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use fieldgate_shared::api::IngestAck;
use fieldgate_shared::codec::{
    BatchMeta, ColumnarBatch, DecodeError, Decoder, EncodeOptions, Encoder, SeriesValues,
};
use fieldgate_shared::model::{Reading, ValueKind};

use crate::config::Limits;
use crate::db::{now_ms, Db};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::fleet::{touch_gateway, GatewayIdentity};
use crate::ids::new_id;
use crate::AppState;

/// Rows per multi-row `INSERT` of chunks (11 parameters each, well under SQLite's limit).
const CHUNK_ROWS_PER_INSERT: usize = 200;
/// Remembered series ids; beyond this the cache starts over.
const SERIES_CACHE_MAX: usize = 200_000;

/// Shared ingest state: per-tenant rate buckets, codec contexts, a series-id cache.
pub struct IngestState {
    limits: Limits,
    buckets: Mutex<HashMap<String, TokenBucket>>,
    decoders: Mutex<Vec<Decoder>>,
    encoders: Mutex<Vec<Encoder>>,
    series_ids: Mutex<HashMap<SeriesKey, String>>,
    last_touch: Mutex<HashMap<String, Instant>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    gateway_id: String,
    stream: String,
    device: String,
    metric: String,
}

impl IngestState {
    pub fn new(limits: &Limits) -> Self {
        Self {
            limits: limits.clone(),
            buckets: Mutex::new(HashMap::new()),
            decoders: Mutex::new(Vec::new()),
            encoders: Mutex::new(Vec::new()),
            series_ids: Mutex::new(HashMap::new()),
            last_touch: Mutex::new(HashMap::new()),
        }
    }

    /// Take `readings` tokens from the tenant's bucket, or say how many seconds to wait.
    async fn admit(&self, db: &Db, tenant_id: &str, readings: u64) -> ApiResult<()> {
        let known = lock(&self.buckets).contains_key(tenant_id);
        if !known {
            let (rate,): (Option<i64>,) =
                sqlx::query_as("SELECT ingest_readings_per_s FROM tenants WHERE id = $1")
                    .bind(tenant_id)
                    .fetch_one(&db.pool)
                    .await?;
            let rate = rate
                .map(|r| r.max(1) as u64)
                .unwrap_or(self.limits.ingest_readings_per_s);
            // A bucket holds at least one largest batch, so every batch can pass eventually.
            let capacity = rate.max(u64::from(self.limits.max_batch_readings));
            lock(&self.buckets)
                .entry(tenant_id.to_string())
                .or_insert_with(|| TokenBucket::new(rate, capacity));
        }
        let mut buckets = lock(&self.buckets);
        let bucket = buckets.get_mut(tenant_id).expect("inserted above");
        bucket.take(readings, Instant::now()).map_err(|wait_s| {
            ApiError::rate_limited(
                format!(
                    "the tenant's ingest rate ({} readings/s) is exceeded; retry later",
                    bucket.rate
                ),
                wait_s,
            )
        })
    }

    fn decoder(&self) -> Decoder {
        lock(&self.decoders).pop().unwrap_or_default()
    }

    fn encoder(&self) -> ApiResult<Encoder> {
        match lock(&self.encoders).pop() {
            Some(encoder) => Ok(encoder),
            None => {
                Encoder::new(EncodeOptions::default()).map_err(|e| anyhow::anyhow!("{e}").into())
            }
        }
    }

    /// Whether to write the gateway's last-seen now (at most once a second per gateway).
    fn should_touch(&self, gateway_id: &str) -> bool {
        let now = Instant::now();
        let mut touched = lock(&self.last_touch);
        match touched.get(gateway_id) {
            Some(at) if now.duration_since(*at).as_secs() < 1 => false,
            _ => {
                touched.insert(gateway_id.to_string(), now);
                true
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Readings-per-second limiter with a burst capacity.
#[derive(Debug)]
struct TokenBucket {
    rate: u64,
    capacity: u64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(rate: u64, capacity: u64) -> Self {
        Self {
            rate,
            capacity,
            tokens: capacity as f64,
            at: Instant::now(),
        }
    }

    /// Take `n` tokens, or the whole seconds until they will be there.
    fn take(&mut self, n: u64, now: Instant) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.capacity as f64);
        self.at = now;
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            Ok(())
        } else {
            Err(((n as f64 - self.tokens) / self.rate as f64)
                .ceil()
                .max(1.0) as u64)
        }
    }
}

/// What the gateway says about itself alongside a batch.
const HEADER_BACKLOG: &str = "fieldgate-backlog";
const HEADER_VERSION: &str = "fieldgate-version";
const HEADER_DECLARED_LOSS: &str = "fieldgate-declared-loss";

/// Ingest one encoded batch (`application/octet-stream`, the shared codec's format). Needs the
/// gateway's client certificate. Optional headers: `Fieldgate-Backlog` (readings waiting in
/// the gateway), `Fieldgate-Version`, `Fieldgate-Declared-Loss: true` (the readings between
/// the stream's high-water mark and this batch were lost at the gateway).
#[utoipa::path(post, path = "/v1/ingest", tag = "gateway",
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = IngestAckBody), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 429, body = ErrorBody)))]
pub async fn ingest(
    State(state): State<AppState>,
    gateway: GatewayIdentity,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<IngestAck>> {
    let result = ingest_inner(&state, &gateway, &headers, body).await;
    match &result {
        Ok(ack) => {
            state.metrics.ingest_batches.inc();
            state.metrics.ingest_readings.add(ack.stored);
            state.metrics.ingest_duplicates.add(ack.duplicates);
        }
        Err(err) => state.metrics.ingest_rejected(&err.body.code),
    }
    if state.ingest.should_touch(&gateway.gateway_id) {
        let backlog = header_str(&headers, HEADER_BACKLOG)
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|v| *v >= 0);
        let version = header_str(&headers, HEADER_VERSION).filter(|v| v.len() <= 64);
        touch_gateway(&state.db, &gateway, version, backlog).await?;
    }
    result.map(Json)
}

/// The acknowledgement of an ingested batch (the shared crate's `IngestAck`).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct IngestAckBody {
    gateway: String,
    stream: String,
    /// Everything up to and including this sequence number is stored.
    high_water_mark: u64,
    /// Readings of this batch stored now.
    stored: u64,
    /// Readings of this batch stored before (resends, overlaps).
    duplicates: u64,
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn ingest_inner(
    state: &AppState,
    gateway: &GatewayIdentity,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<IngestAck> {
    let limits = &state.config.limits;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "a batch is at most {} bytes and {} readings",
                limits.max_batch_bytes, limits.max_batch_readings
            ),
        )
    };
    if header_str(headers, "content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > limits.max_batch_bytes)
    {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, limits.max_batch_bytes)
        .await
        .map_err(|_| too_large())?;
    let header = Decoder::header(&bytes).map_err(bad_batch)?;
    if header.count > limits.max_batch_readings {
        return Err(too_large());
    }
    if header.gateway.as_str() != gateway.gateway_id {
        return Err(ApiError::forbidden(format!(
            "the batch names gateway {:?} but the certificate is gateway {:?}",
            header.gateway.as_str(),
            gateway.gateway_id
        )));
    }
    state
        .ingest
        .admit(&state.db, &gateway.tenant_id, u64::from(header.count))
        .await?;

    let mut decoder = state.ingest.decoder();
    let mut batch = ColumnarBatch::default();
    let decoded = decoder.decode_into(&bytes, &mut batch);
    lock(&state.ingest.decoders).push(decoder);
    decoded.map_err(bad_batch)?;
    let declared_loss =
        header_str(headers, HEADER_DECLARED_LOSS).is_some_and(|v| v.eq_ignore_ascii_case("true"));
    store_batch(state, gateway, &batch, declared_loss).await
}

fn bad_batch(err: DecodeError) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "bad_batch",
        format!("the batch cannot be decoded: {err}"),
    )
}

fn stream_gap(next_seq: u64, first_seq: u64) -> ApiError {
    let mut err = ApiError::new(StatusCode::CONFLICT, "stream_gap", format!(
        "the batch starts at {first_seq} but the stream continues at {next_seq}; resend from {next_seq}"
    ));
    err.body.resume_from = Some(next_seq);
    err
}

async fn store_batch(
    state: &AppState,
    gateway: &GatewayIdentity,
    batch: &ColumnarBatch,
    declared_loss: bool,
) -> ApiResult<IngestAck> {
    let header = batch.header();
    let stream = header.stream.as_str();
    let span = header.seq_span();
    let raw = span == u64::from(header.count);
    let db = &state.db;
    let now = now_ms();

    sqlx::query(
        "INSERT INTO streams (id, tenant_id, gateway_id, name, readings, updated_at) VALUES ($1, $2, $3, $4, 0, $5) \
         ON CONFLICT (gateway_id, name) DO NOTHING",
    )
    .bind(new_id("sm"))
    .bind(&gateway.tenant_id)
    .bind(&gateway.gateway_id)
    .bind(stream)
    .bind(now)
    .execute(&db.pool)
    .await?;

    let mut tx = db.pool.begin().await?;
    // Writing the row first locks it (see db.rs): concurrent senders of this stream wait here.
    let (stream_id, next_seq): (String, Option<i64>) = sqlx::query_as(
        "UPDATE streams SET updated_at = $1 WHERE gateway_id = $2 AND name = $3 AND tenant_id = $4 RETURNING id, next_seq",
    )
    .bind(now)
    .bind(&gateway.gateway_id)
    .bind(stream)
    .bind(&gateway.tenant_id)
    .fetch_one(&mut *tx)
    .await?;
    let next_seq = next_seq.map(|n| n as u64);
    let ack = |high_water_mark: u64, stored: u64, duplicates: u64| IngestAck {
        gateway: header.gateway.clone(),
        stream: header.stream.clone(),
        high_water_mark,
        stored,
        duplicates,
    };
    let skip: u64 = match next_seq {
        None => 0,
        Some(next) if header.last_seq < next => {
            return Ok(ack(next - 1, 0, u64::from(header.count)));
        }
        Some(next) if header.first_seq > next => {
            if !declared_loss {
                return Err(stream_gap(next, header.first_seq));
            }
            sqlx::query(
                "INSERT INTO stream_gaps (stream_id, tenant_id, from_seq, to_seq, recorded_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (stream_id, from_seq) DO NOTHING",
            )
            .bind(&stream_id)
            .bind(&gateway.tenant_id)
            .bind(next as i64)
            .bind(header.first_seq as i64 - 1)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            0
        }
        Some(next) if header.first_seq == next => 0,
        Some(next) => {
            if !raw {
                let mut err = ApiError::conflict(format!(
                    "an aggregate batch ({}..={}) cannot be trimmed; send the batch that starts at {next}",
                    header.first_seq, header.last_seq
                ));
                err.body.resume_from = Some(next);
                return Err(err);
            }
            next - header.first_seq
        }
    };
    let stored_first_seq = header.first_seq + skip;
    let chunks = build_chunks(state, batch, skip as usize, stored_first_seq)?;
    let stored: u64 = chunks.iter().map(|c| c.count as u64).sum();

    let mut new_series = Vec::new();
    let mut rows = Vec::with_capacity(chunks.len());
    for chunk in &chunks {
        let key = SeriesKey {
            gateway_id: gateway.gateway_id.clone(),
            stream: stream.to_string(),
            device: chunk.device.clone(),
            metric: chunk.metric.clone(),
        };
        let cached = lock(&state.ingest.series_ids).get(&key).cloned();
        let series_id = match cached {
            Some(id) => id,
            None => {
                let id = series_id(&mut tx, &gateway.tenant_id, &key, now).await?;
                new_series.push((key, id.clone()));
                id
            }
        };
        rows.push((series_id, chunk));
    }
    for group in rows.chunks(CHUNK_ROWS_PER_INSERT) {
        let mut sql = String::from(
            "INSERT INTO chunks (series_id, first_seq, tenant_id, kind, first_ts, last_ts, count, \
             min_value, max_value, sum_value, data) VALUES ",
        );
        for i in 0..group.len() {
            let b = i * 11;
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!(
                "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 7,
                b + 8,
                b + 9,
                b + 10,
                b + 11
            ));
        }
        let mut query = sqlx::query(&sql);
        for (series_id, chunk) in group {
            query = query
                .bind(series_id)
                .bind(stored_first_seq as i64)
                .bind(&gateway.tenant_id)
                .bind(chunk.kind)
                .bind(chunk.first_ts)
                .bind(chunk.last_ts)
                .bind(chunk.count as i64)
                .bind(chunk.min)
                .bind(chunk.max)
                .bind(chunk.sum)
                .bind(chunk.data.clone());
        }
        query.execute(&mut *tx).await?;
    }
    sqlx::query("UPDATE streams SET next_seq = $1, readings = readings + $2 WHERE id = $3")
        .bind((header.last_seq + 1) as i64)
        .bind(stored as i64)
        .bind(&stream_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;

    if !new_series.is_empty() {
        let mut cache = lock(&state.ingest.series_ids);
        if cache.len() + new_series.len() > SERIES_CACHE_MAX {
            cache.clear();
        }
        cache.extend(new_series);
    }
    Ok(ack(
        header.last_seq,
        stored,
        u64::from(header.count) - stored,
    ))
}

async fn series_id(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    tenant_id: &str,
    key: &SeriesKey,
    now: i64,
) -> Result<String, sqlx::Error> {
    sqlx::query(
        "INSERT INTO series (id, tenant_id, gateway_id, stream, device, metric, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (gateway_id, stream, device, metric) DO NOTHING",
    )
    .bind(new_id("sr"))
    .bind(tenant_id)
    .bind(&key.gateway_id)
    .bind(&key.stream)
    .bind(&key.device)
    .bind(&key.metric)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    let (id,): (String,) = sqlx::query_as("SELECT id FROM series WHERE gateway_id = $1 AND stream = $2 AND device = $3 AND metric = $4")
        .bind(&key.gateway_id)
        .bind(&key.stream)
        .bind(&key.device)
        .bind(&key.metric)
        .fetch_one(&mut **tx)
        .await?;
    Ok(id)
}

/// One series' share of a batch, encoded.
struct Chunk {
    device: String,
    metric: String,
    kind: &'static str,
    first_ts: i64,
    last_ts: i64,
    count: usize,
    min: Option<f64>,
    max: Option<f64>,
    sum: Option<f64>,
    data: Vec<u8>,
}

pub(crate) fn kind_name(kind: ValueKind) -> &'static str {
    match kind {
        ValueKind::F64 => "f64",
        ValueKind::I64 => "i64",
        ValueKind::Bool => "bool",
        ValueKind::Str => "str",
    }
}

/// Split a batch into per-series chunks, leaving out its first `skip` readings (arrival order).
fn build_chunks(
    state: &AppState,
    batch: &ColumnarBatch,
    skip: usize,
    first_seq: u64,
) -> ApiResult<Vec<Chunk>> {
    if skip >= batch.len() {
        return Ok(Vec::new());
    }
    // How many of each series' readings fall in the skipped prefix.
    let mut skipped = vec![0usize; batch.series.len()];
    for &series in &batch.order[..skip] {
        skipped[series as usize] += 1;
    }
    let header = batch.header();
    let meta = BatchMeta {
        gateway: header.gateway.clone(),
        stream: header.stream.clone(),
        first_seq,
        last_seq: header.last_seq,
    };
    let mut encoder = state.ingest.encoder()?;
    let mut chunks = Vec::with_capacity(batch.series.len());
    let mut readings: Vec<Reading> = Vec::new();
    for (info, &from) in batch.series.iter().zip(&skipped) {
        if from >= info.len {
            continue;
        }
        let view = batch.view(info);
        readings.clear();
        let (mut min, mut max, mut sum, mut numeric) =
            (f64::INFINITY, f64::NEG_INFINITY, 0.0f64, false);
        for i in from..info.len {
            let value = view.values.get(i);
            let number = match view.values {
                SeriesValues::F64(v) => Some(v[i]),
                SeriesValues::I64(v) => Some(v[i] as f64),
                _ => None,
            };
            if let Some(x) = number.filter(|x| x.is_finite()) {
                numeric = true;
                min = min.min(x);
                max = max.max(x);
                sum += x;
            }
            readings.push(Reading {
                device: view.device.clone(),
                metric: view.metric.clone(),
                ts_ms: view.ts_ms[i],
                value,
                quality: view.quality[i],
            });
        }
        let ts = &view.ts_ms[from..];
        let data = encoder
            .encode(&meta, &readings)
            .map_err(|e| anyhow::anyhow!("encoding a chunk: {e}"))?;
        chunks.push(Chunk {
            device: view.device.as_str().to_string(),
            metric: view.metric.as_str().to_string(),
            kind: kind_name(info.kind),
            first_ts: ts.iter().copied().min().unwrap_or(0),
            last_ts: ts.iter().copied().max().unwrap_or(0),
            count: readings.len(),
            min: numeric.then_some(min),
            max: numeric.then_some(max),
            sum: numeric.then_some(sum),
            data,
        });
    }
    lock(&state.ingest.encoders).push(encoder);
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn token_bucket_admits_the_burst_then_says_how_long_to_wait() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000, 2000);
        assert!(bucket.take(2000, start).is_ok());
        assert_eq!(bucket.take(1500, start), Err(2));
        assert!(bucket.take(1000, start + Duration::from_secs(1)).is_ok());
        // Never more than the capacity, however long it waited.
        assert!(bucket.take(2001, start + Duration::from_secs(100)).is_err());
    }
}
