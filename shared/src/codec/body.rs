//! The batch body: grouping readings into series and encoding each column (see the format in
//! the parent module).

use std::collections::HashMap;
use std::hash::Hasher;

use super::bytes::{put_varint, zigzag, ByteReader};
use super::{floats, ColumnarBatch, DecodeError, SeriesInfo};
use crate::model::{
    DeviceId, MetricName, NameError, Quality, Reading, ShortStr, Value, ValueKind, MAX_STR_LEN,
};

/// Buffers reused from one batch to the next, so a steady encoder allocates nothing.
#[derive(Default)]
pub struct EncodeScratch {
    body: Vec<u8>,
    series: SeriesTable,
    /// Series index of each reading, in arrival order.
    order: Vec<u32>,
    /// Reading indices grouped by series (a counting sort of `order`).
    by_series: Vec<u32>,
    /// Start of each series in `by_series`, plus one end marker.
    offsets: Vec<usize>,
    strings: HashMap<ShortStr, u32>,
    string_list: Vec<ShortStr>,
    floats: Vec<f64>,
    ints: Vec<i64>,
}

impl EncodeScratch {
    pub fn encode_body(&mut self, readings: &[Reading], decimal_floats: bool) -> &[u8] {
        self.group(readings);
        self.collect_strings(readings);
        let out = &mut self.body;
        out.clear();

        let n_series = self.series.keys.len();
        put_varint(out, n_series as u64);
        put_varint(out, self.string_list.len() as u64);
        for s in &self.string_list {
            put_varint(out, s.as_str().len() as u64);
            out.extend_from_slice(s.as_str().as_bytes());
        }
        for (i, key) in self.series.keys.iter().enumerate() {
            let reading = &readings[key.first as usize];
            super::put_name(out, reading.device.as_str());
            super::put_name(out, reading.metric.as_str());
            out.push(key.kind as u8);
            put_varint(out, (self.offsets[i + 1] - self.offsets[i]) as u64);
        }
        if n_series > 1 {
            for &s in &self.order {
                put_varint(out, s as u64);
            }
        }
        let mut prev_first_ts = 0i64;
        for i in 0..n_series {
            let members = &self.by_series[self.offsets[i]..self.offsets[i + 1]];
            encode_timestamps(members, readings, prev_first_ts, out);
            prev_first_ts = readings[members[0] as usize].ts_ms;
            match self.series.keys[i].kind {
                ValueKind::F64 => {
                    self.floats.clear();
                    self.floats
                        .extend(members.iter().map(|&r| match readings[r as usize].value {
                            Value::F64(v) => v,
                            _ => unreachable!("series are grouped by value kind"),
                        }));
                    floats::encode(&self.floats, decimal_floats, out, &mut self.ints);
                }
                ValueKind::I64 => {
                    let mut prev = 0i64;
                    for &r in members {
                        let Value::I64(v) = readings[r as usize].value else {
                            unreachable!("series are grouped by value kind")
                        };
                        put_varint(out, zigzag(v.wrapping_sub(prev)));
                        prev = v;
                    }
                }
                ValueKind::Bool => encode_bools(members, readings, out),
                ValueKind::Str => {
                    for &r in members {
                        let Value::Str(s) = &readings[r as usize].value else {
                            unreachable!("series are grouped by value kind")
                        };
                        put_varint(out, self.strings[s] as u64);
                    }
                }
            }
            encode_quality(members, readings, out);
        }
        &self.body
    }

    fn group(&mut self, readings: &[Reading]) {
        self.series.clear();
        self.order.clear();
        for i in 0..readings.len() as u32 {
            let s = self.series.find_or_insert(readings, i);
            self.order.push(s);
        }
        let n_series = self.series.keys.len();
        self.offsets.clear();
        self.offsets.resize(n_series + 1, 0);
        for &s in &self.order {
            self.offsets[s as usize + 1] += 1;
        }
        for i in 0..n_series {
            self.offsets[i + 1] += self.offsets[i];
        }
        self.by_series.clear();
        self.by_series.resize(readings.len(), 0);
        let mut next = self.offsets.clone();
        for (i, &s) in self.order.iter().enumerate() {
            self.by_series[next[s as usize]] = i as u32;
            next[s as usize] += 1;
        }
    }

    fn collect_strings(&mut self, readings: &[Reading]) {
        self.strings.clear();
        self.string_list.clear();
        for reading in readings {
            if let Value::Str(s) = &reading.value {
                if !self.strings.contains_key(s) {
                    self.strings
                        .insert(s.clone(), self.string_list.len() as u32);
                    self.string_list.push(s.clone());
                }
            }
        }
    }
}

/// Series of one batch start at about the same time, so each series' first timestamp is stored
/// as a difference from the previous series' first timestamp (`base`).
fn encode_timestamps(members: &[u32], readings: &[Reading], base: i64, out: &mut Vec<u8>) {
    let mut prev_ts = 0i64;
    let mut prev_delta = 0i64;
    for (j, &r) in members.iter().enumerate() {
        let ts = readings[r as usize].ts_ms;
        if j == 0 {
            put_varint(out, zigzag(ts.wrapping_sub(base)));
        } else {
            let delta = ts.wrapping_sub(prev_ts);
            put_varint(out, zigzag(delta.wrapping_sub(prev_delta)));
            prev_delta = delta;
        }
        prev_ts = ts;
    }
}

fn encode_bools(members: &[u32], readings: &[Reading], out: &mut Vec<u8>) {
    let value = |r: u32| matches!(readings[r as usize].value, Value::Bool(true));
    let mut current = value(members[0]);
    out.push(current as u8);
    let mut run = 0u64;
    for &r in members {
        if value(r) == current {
            run += 1;
        } else {
            put_varint(out, run);
            current = !current;
            run = 1;
        }
    }
    put_varint(out, run);
}

fn encode_quality(members: &[u32], readings: &[Reading], out: &mut Vec<u8>) {
    let mut current = readings[members[0] as usize].quality;
    let mut run = 0u64;
    for &r in members {
        let quality = readings[r as usize].quality;
        if quality == current {
            run += 1;
        } else {
            out.push(current as u8);
            put_varint(out, run);
            current = quality;
            run = 1;
        }
    }
    out.push(current as u8);
    put_varint(out, run);
}

/// An open-addressing table from (device, metric, kind) to series index. Keys point at the first
/// reading of their series, so looking a reading up clones nothing.
#[derive(Default)]
struct SeriesTable {
    slots: Vec<u32>,
    keys: Vec<SeriesKey>,
}

struct SeriesKey {
    hash: u64,
    first: u32,
    kind: ValueKind,
}

const EMPTY: u32 = u32::MAX;

impl SeriesTable {
    fn clear(&mut self) {
        self.keys.clear();
        self.slots.iter_mut().for_each(|slot| *slot = EMPTY);
    }

    fn find_or_insert(&mut self, readings: &[Reading], index: u32) -> u32 {
        if self.keys.len() * 2 >= self.slots.len() {
            self.grow();
        }
        let reading = &readings[index as usize];
        let kind = reading.value.kind();
        let hash = series_hash(&reading.device, &reading.metric, kind);
        let mask = self.slots.len() - 1;
        let mut slot = hash as usize & mask;
        loop {
            let s = self.slots[slot];
            if s == EMPTY {
                self.slots[slot] = self.keys.len() as u32;
                self.keys.push(SeriesKey {
                    hash,
                    first: index,
                    kind,
                });
                return self.slots[slot];
            }
            let key = &self.keys[s as usize];
            let first = &readings[key.first as usize];
            if key.hash == hash
                && key.kind == kind
                && first.device == reading.device
                && first.metric == reading.metric
            {
                return s;
            }
            slot = (slot + 1) & mask;
        }
    }

    fn grow(&mut self) {
        let capacity = (self.slots.len() * 2).max(64);
        self.slots.clear();
        self.slots.resize(capacity, EMPTY);
        let mask = capacity - 1;
        for (i, key) in self.keys.iter().enumerate() {
            let mut slot = key.hash as usize & mask;
            while self.slots[slot] != EMPTY {
                slot = (slot + 1) & mask;
            }
            self.slots[slot] = i as u32;
        }
    }
}

fn series_hash(device: &DeviceId, metric: &MetricName, kind: ValueKind) -> u64 {
    let mut hasher = FxHasher::default();
    hasher.write(device.as_str().as_bytes());
    hasher.write_u8(0xff); // names never contain 0xff, so ("ab","c") and ("a","bc") differ
    hasher.write(metric.as_str().as_bytes());
    hasher.write_u8(kind as u8);
    hasher.finish()
}

/// The Firefox/rustc hash: fast and good enough for short keys that are not chosen by an attacker
/// (a hostile key set only makes encoding of that one batch slower).
#[derive(Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().unwrap()));
        }
        for &byte in chunks.remainder() {
            self.add(byte as u64);
        }
    }

    fn write_u8(&mut self, byte: u8) {
        self.add(byte as u64);
    }

    fn finish(&self) -> u64 {
        // Spread the high bits down: the table indexes by the low bits.
        self.0 ^ (self.0 >> 29)
    }
}

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// Names seen in earlier batches, so a decoder that sees the same devices batch after batch
/// validates and allocates each name once. Bounded: it starts over past `NAME_CACHE_LIMIT`.
#[derive(Default)]
pub struct NameCache {
    devices: FxHashMap<Box<[u8]>, DeviceId>,
    metrics: FxHashMap<Box<[u8]>, MetricName>,
}

type FxHashMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

const NAME_CACHE_LIMIT: usize = 4_096;

impl NameCache {
    fn device(&mut self, reader: &mut ByteReader<'_>) -> Result<DeviceId, DecodeError> {
        cached(&mut self.devices, reader, "device", DeviceId::new)
    }

    fn metric(&mut self, reader: &mut ByteReader<'_>) -> Result<MetricName, DecodeError> {
        cached(&mut self.metrics, reader, "metric", MetricName::new)
    }
}

fn cached<N: Clone>(
    cache: &mut FxHashMap<Box<[u8]>, N>,
    reader: &mut ByteReader<'_>,
    what: &'static str,
    validate: fn(&str) -> Result<N, NameError>,
) -> Result<N, DecodeError> {
    let len = reader.u8(what)? as usize;
    let bytes = reader.bytes(len, what)?;
    if let Some(name) = cache.get(bytes) {
        return Ok(name.clone());
    }
    let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::Invalid {
        what,
        why: "not UTF-8",
    })?;
    let name = validate(text)?;
    if cache.len() >= NAME_CACHE_LIMIT {
        cache.clear();
    }
    cache.insert(bytes.into(), name.clone());
    Ok(name)
}

/// Parses a decompressed body holding `count` readings into `batch`, which starts empty.
pub fn decode_body(
    raw: &[u8],
    count: usize,
    names: &mut NameCache,
    batch: &mut ColumnarBatch,
) -> Result<(), DecodeError> {
    // Every reading takes at least one byte (its timestamp), so counts beyond the body's length
    // are lies; checking this first bounds every allocation below by the body's size.
    if count > raw.len() {
        return Err(DecodeError::Invalid {
            what: "count",
            why: "more readings than body bytes",
        });
    }
    let mut reader = ByteReader::new(raw);
    let n_series = reader.bounded(count, "series count")?;
    if n_series == 0 {
        return Err(DecodeError::Invalid {
            what: "series count",
            why: "zero series in a non-empty batch",
        });
    }
    let n_strings = reader.bounded(reader.remaining(), "string count")?;
    let mut strings = Vec::with_capacity(n_strings);
    for _ in 0..n_strings {
        let len = reader.bounded(MAX_STR_LEN, "string length")?;
        let bytes = reader.bytes(len, "string")?;
        let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::Invalid {
            what: "string",
            why: "not UTF-8",
        })?;
        strings.push(ShortStr::new(s).expect("length checked above"));
    }

    let mut start = 0usize;
    let mut values_start = [0usize; 4];
    for _ in 0..n_series {
        let device = names.device(&mut reader)?;
        let metric = names.metric(&mut reader)?;
        let kind = ValueKind::from_u8(reader.u8("value kind")?).ok_or(DecodeError::Invalid {
            what: "value kind",
            why: "unknown kind",
        })?;
        let len = reader.bounded(count - start, "series length")?;
        if len == 0 {
            return Err(DecodeError::Invalid {
                what: "series length",
                why: "empty series",
            });
        }
        batch.series.push(SeriesInfo {
            device,
            metric,
            kind,
            start,
            values_start: values_start[kind as usize],
            len,
        });
        start += len;
        values_start[kind as usize] += len;
    }
    if start != count {
        return Err(DecodeError::Invalid {
            what: "series lengths",
            why: "do not add up to the header's count",
        });
    }

    if n_series > 1 {
        let mut seen = vec![0usize; n_series];
        batch.order.reserve(count);
        for _ in 0..count {
            let s = reader.varint("order")? as usize;
            let Some(seen) = seen.get_mut(s) else {
                return Err(DecodeError::Invalid {
                    what: "order",
                    why: "series index beyond the series table",
                });
            };
            *seen += 1;
            batch.order.push(s as u32);
        }
        if seen
            .iter()
            .zip(&batch.series)
            .any(|(&seen, series)| seen != series.len)
        {
            return Err(DecodeError::Invalid {
                what: "order",
                why: "series occurrences differ from the series lengths",
            });
        }
    } else {
        batch.order.resize(count, 0);
    }

    batch.ts_ms.reserve(count);
    batch.quality.reserve(count);
    batch.f64s.reserve(values_start[ValueKind::F64 as usize]);
    batch.i64s.reserve(values_start[ValueKind::I64 as usize]);
    batch.bools.reserve(values_start[ValueKind::Bool as usize]);
    batch.strs.reserve(values_start[ValueKind::Str as usize]);
    let mut prev_first_ts = 0i64;
    for series in &batch.series {
        let n = series.len;
        decode_timestamps(&mut reader, n, prev_first_ts, &mut batch.ts_ms)?;
        prev_first_ts = batch.ts_ms[series.start];
        match series.kind {
            ValueKind::F64 => floats::decode(&mut reader, n, &mut batch.f64s)?,
            ValueKind::I64 => {
                let mut v = 0i64;
                for _ in 0..n {
                    v = v.wrapping_add(reader.signed_varint("integer value")?);
                    batch.i64s.push(v);
                }
            }
            ValueKind::Bool => decode_bools(&mut reader, n, &mut batch.bools)?,
            ValueKind::Str => {
                for _ in 0..n {
                    let i = reader.varint("string index")?;
                    let s = strings.get(i as usize).ok_or(DecodeError::Invalid {
                        what: "string index",
                        why: "beyond the dictionary",
                    })?;
                    batch.strs.push(s.clone());
                }
            }
        }
        decode_quality(&mut reader, n, &mut batch.quality)?;
    }
    if reader.remaining() != 0 {
        return Err(DecodeError::Invalid {
            what: "body",
            why: "trailing bytes after the last column",
        });
    }
    Ok(())
}

pub(super) fn decode_timestamps(
    reader: &mut ByteReader<'_>,
    n: usize,
    base: i64,
    ts_ms: &mut Vec<i64>,
) -> Result<(), DecodeError> {
    let mut ts = base.wrapping_add(reader.signed_varint("timestamp")?);
    ts_ms.push(ts);
    let mut delta = 0i64;
    for _ in 1..n {
        delta = delta.wrapping_add(reader.signed_varint("timestamp")?);
        ts = ts.wrapping_add(delta);
        ts_ms.push(ts);
    }
    Ok(())
}

/// A run length that keeps a column of `n` values within `n`, `filled` being those so far.
fn run_length(
    reader: &mut ByteReader<'_>,
    n: usize,
    filled: usize,
    what: &'static str,
) -> Result<usize, DecodeError> {
    let run = reader.bounded(n - filled, what)?;
    if run == 0 {
        return Err(DecodeError::Invalid {
            what,
            why: "empty run",
        });
    }
    Ok(run)
}

pub(super) fn decode_bools(
    reader: &mut ByteReader<'_>,
    n: usize,
    values: &mut Vec<bool>,
) -> Result<(), DecodeError> {
    let mut current = match reader.u8("bool column")? {
        0 => false,
        1 => true,
        _ => {
            return Err(DecodeError::Invalid {
                what: "bool column",
                why: "first value is neither 0 nor 1",
            })
        }
    };
    let mut filled = 0;
    while filled < n {
        let run = run_length(reader, n, filled, "bool run")?;
        values.resize(values.len() + run, current);
        filled += run;
        current = !current;
    }
    Ok(())
}

pub(super) fn decode_quality(
    reader: &mut ByteReader<'_>,
    n: usize,
    values: &mut Vec<Quality>,
) -> Result<(), DecodeError> {
    let mut filled = 0;
    while filled < n {
        let quality = Quality::from_u8(reader.u8("quality")?).ok_or(DecodeError::Invalid {
            what: "quality",
            why: "unknown quality",
        })?;
        let run = run_length(reader, n, filled, "quality run")?;
        values.resize(values.len() + run, quality);
        filled += run;
    }
    Ok(())
}
