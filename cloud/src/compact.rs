//! The compactor: turns staged batches (one row per accepted batch, written by ingest) into
//! per-series chunks with count/min/max/sum, many batches at a time, so each series gets one
//! chunk row per run instead of one per batch. Runs every second in the background, and before
//! every read of series, so readers always see everything acknowledged.
//!
//! A run takes the oldest staged rows, deletes them (the delete is the claim: a concurrent run
//! on another node finds them gone and rolls back), decodes them, groups their readings by
//! (stream, device, metric, kind) in sequence order, and inserts the chunks, all in one
//! transaction.

use std::collections::HashMap;
use std::sync::Mutex;

use fieldgate_shared::codec::chunk::{encode_chunk, ChunkValues};
use fieldgate_shared::codec::{ColumnarBatch, Decoder, SeriesValues};
use fieldgate_shared::model::{Quality, ValueKind};

use crate::db::{now_ms, Backend, Db};
use crate::ids::new_id;
use crate::lock;

/// Readings per chunk at most (a single batch's share may exceed it: chunks decode up to the
/// codec's 1,000,000).
const CHUNK_MAX_READINGS: usize = 100_000;
/// Staged batches per run.
const STAGED_PER_RUN: i64 = 512;
/// Rows per multi-row `INSERT` of chunks (11 parameters each, under SQLite's limit).
const CHUNK_ROWS_PER_INSERT: usize = 200;
/// Remembered series ids; beyond this the cache starts over.
const SERIES_CACHE_MAX: usize = 200_000;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    gateway_id: String,
    stream: String,
    device: String,
    metric: String,
}

/// One process's compactor: runs one at a time and remembers series ids.
#[derive(Default)]
pub struct Compactor {
    running: tokio::sync::Mutex<()>,
    series_ids: Mutex<HashMap<SeriesKey, String>>,
}

/// One series' readings gathered from a run's batches.
struct Gathered {
    tenant_id: String,
    key: SeriesKey,
    kind: ValueKind,
    first_seq: i64,
    ts_ms: Vec<i64>,
    values: ChunkValues,
    quality: Vec<Quality>,
}

type StagedRow = (String, i64, i64, String, String, String, Vec<u8>);

impl Compactor {
    /// Compact everything staged; returns how many staged batches were compacted.
    pub async fn run(&self, db: &Db) -> anyhow::Result<usize> {
        let _running = self.running.lock().await;
        let mut total = 0;
        loop {
            let done = self.run_once(db).await?;
            if done == 0 {
                return Ok(total);
            }
            total += done;
        }
    }

    async fn run_once(&self, db: &Db) -> anyhow::Result<usize> {
        let staged: Vec<StagedRow> = sqlx::query_as(
            "SELECT stream_id, first_seq, skip, tenant_id, gateway_id, stream, data FROM staged_batches \
             ORDER BY received_at, stream_id, first_seq LIMIT $1",
        )
        .bind(STAGED_PER_RUN)
        .fetch_all(&db.pool)
        .await?;
        if staged.is_empty() {
            return Ok(0);
        }
        let mut tx = db.pool.begin().await?;
        for (stream_id, first_seq, ..) in &staged {
            let claimed =
                sqlx::query("DELETE FROM staged_batches WHERE stream_id = $1 AND first_seq = $2")
                    .bind(stream_id)
                    .bind(first_seq)
                    .execute(&mut *tx)
                    .await?;
            if claimed.rows_affected() != 1 {
                // Another node compacted it meanwhile: start over with what is left.
                return Ok(1);
            }
        }
        let gathered = gather(&staged)?;
        let now = now_ms();
        let mut new_series = Vec::new();
        let mut rows = Vec::with_capacity(gathered.len());
        for series in &gathered {
            let cached = lock(&self.series_ids).get(&series.key).cloned();
            let id = match cached {
                Some(id) => id,
                None => {
                    let id = series_id(&mut tx, &series.tenant_id, &series.key, now).await?;
                    new_series.push((series.key.clone(), id.clone()));
                    id
                }
            };
            rows.push((id, series));
        }
        for group in rows.chunks(CHUNK_ROWS_PER_INSERT) {
            insert_chunks(&mut tx, db.backend, group).await?;
        }
        tx.commit().await?;
        if !new_series.is_empty() {
            let mut cache = lock(&self.series_ids);
            if cache.len() + new_series.len() > SERIES_CACHE_MAX {
                cache.clear();
            }
            cache.extend(new_series);
        }
        Ok(staged.len())
    }
}

/// Decode staged batches and group their new readings per series, in sequence order.
fn gather(staged: &[StagedRow]) -> anyhow::Result<Vec<Gathered>> {
    let mut order: Vec<&StagedRow> = staged.iter().collect();
    order.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut decoder = Decoder::new();
    let mut batch = ColumnarBatch::default();
    let mut index: HashMap<(String, String, String, ValueKind), usize> = HashMap::new();
    let mut gathered: Vec<Gathered> = Vec::new();
    for (stream_id, first_seq, skip, tenant_id, gateway_id, stream, data) in order {
        decoder.decode_into(data, &mut batch).map_err(|e| {
            anyhow::anyhow!("staged batch {stream_id}/{first_seq} no longer decodes: {e}")
        })?;
        let skip = *skip as usize;
        let mut skipped = vec![0usize; batch.series.len()];
        for &s in &batch.order[..skip.min(batch.len())] {
            skipped[s as usize] += 1;
        }
        for (info, &from) in batch.series.iter().zip(&skipped) {
            if from >= info.len {
                continue;
            }
            let view = batch.view(info);
            let key = (
                stream_id.clone(),
                view.device.as_str().to_string(),
                view.metric.as_str().to_string(),
                info.kind,
            );
            let incoming = info.len - from;
            // A chunk that would outgrow CHUNK_MAX_READINGS is closed and a new one starts at
            // this batch (one batch adds to one chunk per series, so keys stay unique).
            let open = index
                .get(&key)
                .copied()
                .filter(|&slot| gathered[slot].ts_ms.len() + incoming <= CHUNK_MAX_READINGS);
            let slot = match open {
                Some(slot) => slot,
                None => {
                    gathered.push(Gathered {
                        tenant_id: tenant_id.clone(),
                        key: SeriesKey {
                            gateway_id: gateway_id.clone(),
                            stream: stream.clone(),
                            device: view.device.as_str().to_string(),
                            metric: view.metric.as_str().to_string(),
                        },
                        kind: info.kind,
                        first_seq: *first_seq,
                        ts_ms: Vec::new(),
                        values: match info.kind {
                            ValueKind::F64 => ChunkValues::F64(Vec::new()),
                            ValueKind::I64 => ChunkValues::I64(Vec::new()),
                            ValueKind::Bool => ChunkValues::Bool(Vec::new()),
                            ValueKind::Str => ChunkValues::Str(Vec::new()),
                        },
                        quality: Vec::new(),
                    });
                    index.insert(key, gathered.len() - 1);
                    gathered.len() - 1
                }
            };
            let series = &mut gathered[slot];
            series.ts_ms.extend_from_slice(&view.ts_ms[from..]);
            series.quality.extend_from_slice(&view.quality[from..]);
            match (&mut series.values, view.values) {
                (ChunkValues::F64(out), SeriesValues::F64(v)) => out.extend_from_slice(&v[from..]),
                (ChunkValues::I64(out), SeriesValues::I64(v)) => out.extend_from_slice(&v[from..]),
                (ChunkValues::Bool(out), SeriesValues::Bool(v)) => {
                    out.extend_from_slice(&v[from..])
                }
                (ChunkValues::Str(out), SeriesValues::Str(v)) => out.extend_from_slice(&v[from..]),
                _ => unreachable!("series are keyed by value kind"),
            }
        }
    }
    Ok(gathered)
}

pub(crate) fn kind_name(kind: ValueKind) -> &'static str {
    match kind {
        ValueKind::F64 => "f64",
        ValueKind::I64 => "i64",
        ValueKind::Bool => "bool",
        ValueKind::Str => "str",
    }
}

/// Parameter `n` of a long statement: SQLite maps `$n` names to positions by a linear search
/// per parameter (quadratic in a 2,200-parameter insert), so it gets plain `?`.
fn placeholder(backend: Backend, n: usize) -> String {
    match backend {
        Backend::Sqlite => "?".to_string(),
        Backend::Postgres => format!("${n}"),
    }
}

async fn insert_chunks(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    backend: Backend,
    group: &[(String, &Gathered)],
) -> Result<(), sqlx::Error> {
    let mut sql = String::from(
        "INSERT INTO chunks (series_id, first_seq, tenant_id, kind, first_ts, last_ts, count, \
         min_value, max_value, sum_value, data) VALUES ",
    );
    for i in 0..group.len() {
        sql.push_str(if i == 0 { "(" } else { ", (" });
        for column in 0..11 {
            if column > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&placeholder(backend, i * 11 + column + 1));
        }
        sql.push(')');
    }
    // Not kept prepared: PostgreSQL fixes parameter types at the first execution of a text.
    let mut query = sqlx::query(&sql).persistent(false);
    for (series_id, series) in group {
        let numbers: Box<dyn Iterator<Item = f64>> = match &series.values {
            ChunkValues::F64(v) => Box::new(v.iter().copied()),
            ChunkValues::I64(v) => Box::new(v.iter().map(|&x| x as f64)),
            _ => Box::new(std::iter::empty()),
        };
        let (mut min, mut max, mut sum, mut numeric) =
            (f64::INFINITY, f64::NEG_INFINITY, 0.0f64, false);
        for x in numbers.filter(|x| x.is_finite()) {
            numeric = true;
            min = min.min(x);
            max = max.max(x);
            sum += x;
        }
        let mut data = Vec::with_capacity(series.ts_ms.len() * 3 + 8);
        encode_chunk(
            &series.ts_ms,
            series.values.as_series_values(),
            &series.quality,
            &mut data,
        );
        query = query
            .bind(series_id.clone())
            .bind(series.first_seq)
            .bind(series.tenant_id.clone())
            .bind(kind_name(series.kind))
            .bind(series.ts_ms.iter().copied().min().unwrap_or(0))
            .bind(series.ts_ms.iter().copied().max().unwrap_or(0))
            .bind(series.ts_ms.len() as i64)
            .bind(numeric.then_some(min))
            .bind(numeric.then_some(max))
            .bind(numeric.then_some(sum))
            .bind(data);
    }
    query.execute(&mut **tx).await?;
    Ok(())
}

async fn series_id(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    tenant_id: &str,
    key: &SeriesKey,
    now: i64,
) -> Result<String, sqlx::Error> {
    sqlx::query(
        "INSERT INTO series (id, tenant_id, gateway_id, stream, device, metric, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (gateway_id, stream, device, metric) DO NOTHING",
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
    let (id,): (String,) = sqlx::query_as(
        "SELECT id FROM series WHERE gateway_id = $1 AND stream = $2 AND device = $3 AND metric = $4",
    )
    .bind(&key.gateway_id)
    .bind(&key.stream)
    .bind(&key.device)
    .bind(&key.metric)
    .fetch_one(&mut **tx)
    .await?;
    Ok(id)
}
