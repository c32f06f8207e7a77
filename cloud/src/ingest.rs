//! `POST /v1/ingest`: batches in the shared codec's format from gateways over mutual TLS,
//! stored exactly once.
//!
//! Each (gateway, stream) has a high-water mark, `streams.next_seq`: the next sequence number it
//! accepts. A batch wholly below it is a resend (acknowledged, not stored); one straddling it is
//! trimmed to the readings above it; one starting above it would leave a hole and is refused
//! with `stream_gap` and where to resume, unless the gateway declares the hole lost
//! (`Fieldgate-Declared-Loss: <first lost seq>`, after its journal overflowed; accepted only when
//! it names exactly the stream's high-water mark, so a stale or racing declaration loses nothing), which is recorded. The check
//! and the store run in one transaction that first locks the stream row, so concurrent senders
//! of one stream serialise and every reading is stored once.
//!
//! An accepted batch is staged as received (one row, whatever its series count) in the same
//! transaction that moves the high-water mark; [`crate::compact`] later turns staged batches
//! into per-series chunks.
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
use fieldgate_shared::codec::{ColumnarBatch, DecodeError, Decoder};
use fieldgate_shared::model::{GatewayId, StreamId};

use crate::config::Limits;
use crate::db::{now_ms, Db};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::fleet::{touch_gateway, GatewayIdentity};
use crate::ids::new_id;
use crate::{lock, AppState};

/// Shared ingest state: per-tenant rate buckets, decoders, when gateways were last seen.
pub struct IngestState {
    limits: Limits,
    buckets: Mutex<HashMap<String, TokenBucket>>,
    decoders: Mutex<Vec<Decoder>>,
    last_touch: Mutex<HashMap<String, Instant>>,
}

impl IngestState {
    pub fn new(limits: &Limits) -> Self {
        Self {
            limits: limits.clone(),
            buckets: Mutex::new(HashMap::new()),
            decoders: Mutex::new(Vec::new()),
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
const HEADER_STREAM_START: &str = "fieldgate-stream-start";
/// `<first>-<last>`: a range of the gateway's sequence numbers none of which belong to this
/// stream (its routing rules sent them elsewhere); moves the high-water mark past them.
const HEADER_SKIP: &str = "fieldgate-skip";
const HEADER_STREAM: &str = "fieldgate-stream";
/// `aggregate`: the readings summarise the range (never trimmed); absent: raw readings.
const HEADER_FORM: &str = "fieldgate-form";

/// Ingest one encoded batch (`application/octet-stream`, the shared codec's format). Needs the
/// gateway's client certificate. Optional headers: `Fieldgate-Backlog` (readings waiting in
/// the gateway), `Fieldgate-Version`, `Fieldgate-Declared-Loss: <seq>` (the readings from `seq` up
/// to this batch were lost at the gateway; honoured only when `seq` is the stream's high-water
/// mark).
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
    if let Some(range) = header_str(headers, HEADER_SKIP) {
        return skip_range(state, gateway, headers, range, &bytes).await;
    }
    let declared_loss = match header_str(headers, HEADER_DECLARED_LOSS) {
        None => None,
        Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
            ApiError::bad_request("Fieldgate-Declared-Loss is the first lost sequence number")
        })?),
    };
    let stream_start = match header_str(headers, HEADER_STREAM_START) {
        None => None,
        Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
            ApiError::bad_request("Fieldgate-Stream-Start is the stream's first sequence number")
        })?),
    };
    let aggregate =
        header_str(headers, HEADER_FORM).is_some_and(|v| v.eq_ignore_ascii_case("aggregate"));
    ingest_batch(
        state,
        gateway,
        &bytes,
        declared_loss,
        stream_start,
        aggregate,
    )
    .await
}

/// Check, admit, decode and store one encoded batch from `gateway`: the whole of ingest after
/// the HTTP layer (benchmarks call it directly).
pub async fn ingest_batch(
    state: &AppState,
    gateway: &GatewayIdentity,
    bytes: &[u8],
    declared_loss: Option<u64>,
    stream_start: Option<u64>,
    aggregate: bool,
) -> ApiResult<IngestAck> {
    let limits = &state.config.limits;
    let header = Decoder::header(bytes).map_err(bad_batch)?;
    if header.count > limits.max_batch_readings {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("a batch is at most {} readings", limits.max_batch_readings),
        ));
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
    let decoded = decoder.decode_into(bytes, &mut batch);
    lock(&state.ingest.decoders).push(decoder);
    decoded.map_err(bad_batch)?;
    store_batch(
        state,
        gateway,
        &batch,
        bytes,
        declared_loss,
        stream_start,
        aggregate,
    )
    .await
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

/// A skip: an empty body, `Fieldgate-Stream` naming the stream, `Fieldgate-Skip: first-last`.
/// Accepted when it starts at the high-water mark (or lies below it: a resend).
async fn skip_range(
    state: &AppState,
    gateway: &GatewayIdentity,
    headers: &HeaderMap,
    range: &str,
    body: &[u8],
) -> ApiResult<IngestAck> {
    let bad = || {
        ApiError::bad_request(
            "Fieldgate-Skip is `<first>-<last>` with an empty body and Fieldgate-Stream",
        )
    };
    if !body.is_empty() {
        return Err(bad());
    }
    let (first, last) = range
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?)))
        .filter(|(a, b)| a <= b)
        .ok_or_else(bad)?;
    let stream = header_str(headers, HEADER_STREAM)
        .and_then(|s| StreamId::new(s).ok())
        .ok_or_else(bad)?;
    let stream_start =
        header_str(headers, HEADER_STREAM_START).and_then(|v| v.trim().parse::<u64>().ok());
    let now = now_ms();
    sqlx::query(
        "INSERT INTO streams (id, tenant_id, gateway_id, name, readings, updated_at) VALUES ($1, $2, $3, $4, 0, $5) \
         ON CONFLICT (gateway_id, name) DO NOTHING",
    )
    .bind(new_id("sm"))
    .bind(&gateway.tenant_id)
    .bind(&gateway.gateway_id)
    .bind(stream.as_str())
    .bind(now)
    .execute(&state.db.pool)
    .await?;
    let mut tx = state.db.pool.begin().await?;
    let row: Option<(String, Option<i64>)> = sqlx::query_as(
        "UPDATE streams SET updated_at = $1 WHERE gateway_id = $2 AND name = $3 AND tenant_id = $4 RETURNING id, next_seq",
    )
    .bind(now)
    .bind(&gateway.gateway_id)
    .bind(stream.as_str())
    .bind(&gateway.tenant_id)
    .fetch_optional(&mut *tx)
    .await?;
    let next = row
        .as_ref()
        .and_then(|(_, n)| n.map(|n| n as u64))
        .or(stream_start);
    let ack = |hwm: u64| IngestAck {
        gateway: GatewayId::new(&gateway.gateway_id).expect("gateway ids are valid names"),
        stream: stream.clone(),
        high_water_mark: hwm,
        stored: 0,
        duplicates: 0,
    };
    match (row, next) {
        (_, Some(next)) if last < next => Ok(ack(next.saturating_sub(1))),
        (Some((stream_id, _)), Some(next)) if first == next => {
            sqlx::query("UPDATE streams SET next_seq = $1 WHERE id = $2")
                .bind((last + 1) as i64)
                .bind(&stream_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(ack(last))
        }
        (_, Some(next)) => Err(stream_gap(next, first)),
        // A stream that has never had a batch and no declared start: nothing to skip yet.
        (_, None) => Ok(ack(last)),
    }
}

async fn store_batch(
    state: &AppState,
    gateway: &GatewayIdentity,
    batch: &ColumnarBatch,
    bytes: &[u8],
    declared_loss: Option<u64>,
    stream_start: Option<u64>,
    aggregate: bool,
) -> ApiResult<IngestAck> {
    let header = batch.header();
    let stream = header.stream.as_str();
    let span = header.seq_span();
    let raw = !aggregate && span == u64::from(header.count);
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
    // A new stream starts where the gateway says (its batches may arrive out of order, so the
    // first to arrive is not necessarily the first); without a declared start, anywhere.
    let next_seq = next_seq.map(|n| n as u64).or(stream_start);
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
            // A loss is accepted only as declared: exactly from the stream's high-water mark.
            if declared_loss != Some(next) {
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
    let stored = u64::from(header.count) - skip;
    // Staged as received, in one append; the compactor turns staged batches into per-series
    // chunks (see compact.rs), so a batch costs one row however many series it holds.
    sqlx::query(
        "INSERT INTO staged_batches (stream_id, first_seq, skip, tenant_id, gateway_id, stream, data, received_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&stream_id)
    .bind(stored_first_seq as i64)
    .bind(skip as i64)
    .bind(&gateway.tenant_id)
    .bind(&gateway.gateway_id)
    .bind(stream)
    .bind(bytes.to_vec())
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE streams SET next_seq = $1, readings = readings + $2 WHERE id = $3")
        .bind((header.last_seq + 1) as i64)
        .bind(stored as i64)
        .bind(&stream_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;

    Ok(ack(
        header.last_seq,
        stored,
        u64::from(header.count) - stored,
    ))
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
