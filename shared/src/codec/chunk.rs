//! Series chunks: one series' readings with no names, header or compression, the form the
//! cloud stores per series (names live in its series table, durability in its database).
//!
//! Layout: version `1`, value kind (u8), reading count (varint), timestamps (the first as a
//! zig-zag varint, then zig-zag deltas of deltas), values (as in a batch body: decimal-aware or
//! XOR floats, zig-zag deltas for ints, run lengths for bools, length-prefixed UTF-8 strings),
//! quality runs. Timestamps and values use the batch codec's column encoders, so a series
//! costs about what it costs inside a batch.

use super::bytes::{put_varint, zigzag, ByteReader};
use super::{body, floats, DecodeError, SeriesValues, MAX_BATCH_READINGS};
use crate::model::{Quality, ShortStr, ValueKind, MAX_STR_LEN};

const CHUNK_VERSION: u8 = 1;

/// The values of a decoded chunk.
#[derive(Clone, Debug, PartialEq)]
pub enum ChunkValues {
    F64(Vec<f64>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
    Str(Vec<ShortStr>),
}

impl ChunkValues {
    pub fn as_series_values(&self) -> SeriesValues<'_> {
        match self {
            ChunkValues::F64(v) => SeriesValues::F64(v),
            ChunkValues::I64(v) => SeriesValues::I64(v),
            ChunkValues::Bool(v) => SeriesValues::Bool(v),
            ChunkValues::Str(v) => SeriesValues::Str(v),
        }
    }
}

/// A decoded chunk: the readings of one series in arrival order.
#[derive(Clone, Debug, PartialEq)]
pub struct SeriesChunk {
    pub ts_ms: Vec<i64>,
    pub values: ChunkValues,
    pub quality: Vec<Quality>,
}

impl SeriesChunk {
    pub fn len(&self) -> usize {
        self.ts_ms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ts_ms.is_empty()
    }
}

/// Append the chunk of these readings (equal, non-zero lengths) to `out`.
pub fn encode_chunk(
    ts_ms: &[i64],
    values: SeriesValues<'_>,
    quality: &[Quality],
    out: &mut Vec<u8>,
) {
    let n = ts_ms.len();
    assert!(
        n > 0 && quality.len() == n,
        "a chunk has readings, each with a quality"
    );
    out.push(CHUNK_VERSION);
    let kind = match values {
        SeriesValues::F64(v) => {
            assert_eq!(v.len(), n);
            ValueKind::F64
        }
        SeriesValues::I64(v) => {
            assert_eq!(v.len(), n);
            ValueKind::I64
        }
        SeriesValues::Bool(v) => {
            assert_eq!(v.len(), n);
            ValueKind::Bool
        }
        SeriesValues::Str(v) => {
            assert_eq!(v.len(), n);
            ValueKind::Str
        }
    };
    out.push(kind as u8);
    put_varint(out, n as u64);
    let mut prev_ts = 0i64;
    let mut prev_delta = 0i64;
    for (j, &ts) in ts_ms.iter().enumerate() {
        if j == 0 {
            put_varint(out, zigzag(ts));
        } else {
            let delta = ts.wrapping_sub(prev_ts);
            put_varint(out, zigzag(delta.wrapping_sub(prev_delta)));
            prev_delta = delta;
        }
        prev_ts = ts;
    }
    match values {
        SeriesValues::F64(v) => floats::encode(v, true, out, &mut Vec::new()),
        SeriesValues::I64(v) => {
            let mut prev = 0i64;
            for &x in v {
                put_varint(out, zigzag(x.wrapping_sub(prev)));
                prev = x;
            }
        }
        SeriesValues::Bool(v) => put_runs(out, v.iter().copied(), |b| b as u8, false),
        SeriesValues::Str(v) => {
            for s in v {
                put_varint(out, s.as_str().len() as u64);
                out.extend_from_slice(s.as_str().as_bytes());
            }
        }
    }
    put_runs(out, quality.iter().copied(), |q| q as u8, true);
}

/// Run-length encode: bools as the first value then run lengths; qualities as (value, run).
fn put_runs<T: PartialEq + Copy>(
    out: &mut Vec<u8>,
    items: impl Iterator<Item = T>,
    tag: impl Fn(T) -> u8,
    tag_each: bool,
) {
    let mut current: Option<T> = None;
    let mut run = 0u64;
    for item in items {
        match current {
            Some(c) if c == item => run += 1,
            Some(c) => {
                if tag_each {
                    out.push(tag(c));
                }
                put_varint(out, run);
                current = Some(item);
                run = 1;
            }
            None => {
                if !tag_each {
                    out.push(tag(item));
                }
                current = Some(item);
                run = 1;
            }
        }
    }
    if let Some(c) = current {
        if tag_each {
            out.push(tag(c));
        }
        put_varint(out, run);
    }
}

/// Decode a chunk; any damage is an error, never a panic.
pub fn decode_chunk(data: &[u8]) -> Result<SeriesChunk, DecodeError> {
    let mut reader = ByteReader::new(data);
    if reader.u8("chunk version")? != CHUNK_VERSION {
        return Err(DecodeError::Invalid {
            what: "chunk version",
            why: "unknown version",
        });
    }
    let kind = ValueKind::from_u8(reader.u8("value kind")?).ok_or(DecodeError::Invalid {
        what: "value kind",
        why: "unknown kind",
    })?;
    let n = reader.bounded(MAX_BATCH_READINGS as usize, "chunk count")?;
    if n == 0 {
        return Err(DecodeError::Invalid {
            what: "chunk count",
            why: "empty chunk",
        });
    }
    // Every timestamp takes at least one byte: a count beyond the data is a lie.
    if n > data.len() {
        return Err(DecodeError::Invalid {
            what: "chunk count",
            why: "more readings than bytes",
        });
    }
    let mut ts_ms = Vec::with_capacity(n);
    body::decode_timestamps(&mut reader, n, 0, &mut ts_ms)?;
    let values = match kind {
        ValueKind::F64 => {
            let mut v = Vec::with_capacity(n);
            floats::decode(&mut reader, n, &mut v)?;
            ChunkValues::F64(v)
        }
        ValueKind::I64 => {
            let mut v = Vec::with_capacity(n);
            let mut prev = 0i64;
            for _ in 0..n {
                prev = prev.wrapping_add(reader.signed_varint("int value")?);
                v.push(prev);
            }
            ChunkValues::I64(v)
        }
        ValueKind::Bool => {
            let mut v = Vec::with_capacity(n);
            body::decode_bools(&mut reader, n, &mut v)?;
            ChunkValues::Bool(v)
        }
        ValueKind::Str => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let len = reader.bounded(MAX_STR_LEN, "string length")?;
                let bytes = reader.bytes(len, "string")?;
                let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::Invalid {
                    what: "string",
                    why: "not UTF-8",
                })?;
                v.push(ShortStr::new(text).map_err(|_| DecodeError::Invalid {
                    what: "string",
                    why: "too long",
                })?);
            }
            ChunkValues::Str(v)
        }
    };
    let mut quality = Vec::with_capacity(n);
    body::decode_quality(&mut reader, n, &mut quality)?;
    if reader.remaining() != 0 {
        return Err(DecodeError::Invalid {
            what: "chunk",
            why: "trailing bytes",
        });
    }
    Ok(SeriesChunk {
        ts_ms,
        values,
        quality,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(ts: &[i64], values: ChunkValues, quality: &[Quality]) -> usize {
        let mut out = Vec::new();
        encode_chunk(ts, values.as_series_values(), quality, &mut out);
        let decoded = decode_chunk(&out).unwrap();
        assert_eq!(decoded.ts_ms, ts);
        match (&decoded.values, &values) {
            (ChunkValues::F64(a), ChunkValues::F64(b)) => {
                assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()))
            }
            (a, b) => assert_eq!(a, b),
        }
        assert_eq!(decoded.quality, quality);
        // Every truncation is an error, not a panic.
        for cut in 0..out.len() {
            assert!(decode_chunk(&out[..cut]).is_err(), "cut at {cut}");
        }
        out.len()
    }

    #[test]
    fn every_kind_round_trips_and_short_decimals_stay_small() {
        let ts: Vec<i64> = (0..100).map(|i| 1_767_225_600_000 + i * 1000).collect();
        let good = vec![Quality::Good; 100];
        let temps: Vec<f64> = (0..100).map(|i| 20.0 + f64::from(i % 7) / 10.0).collect();
        let bytes = round_trip(&ts, ChunkValues::F64(temps), &good);
        // One byte per timestamp (regular intervals) and about one per value.
        assert!(bytes <= 220, "100 short decimals at 1 s took {bytes} bytes");
        round_trip(
            &ts,
            ChunkValues::F64((0..100).map(|i| (f64::from(i)).sin()).collect()),
            &good,
        );
        round_trip(
            &ts[..3],
            ChunkValues::F64(vec![f64::NAN, -0.0, f64::INFINITY]),
            &good[..3],
        );
        round_trip(
            &ts,
            ChunkValues::I64((0..100).map(|i| i * i - 50).collect()),
            &good,
        );
        let mixed: Vec<Quality> = (0..100)
            .map(|i| {
                if i % 10 == 0 {
                    Quality::Bad
                } else {
                    Quality::Good
                }
            })
            .collect();
        round_trip(
            &ts,
            ChunkValues::Bool((0..100).map(|i| i % 3 == 0).collect()),
            &mixed,
        );
        round_trip(
            &ts[..2],
            ChunkValues::Str(vec![
                ShortStr::new("open").unwrap(),
                ShortStr::new("").unwrap(),
            ]),
            &good[..2],
        );
        round_trip(
            &[i64::MIN, i64::MAX, 0],
            ChunkValues::I64(vec![i64::MAX, i64::MIN, 0]),
            &good[..3],
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..2000 {
            let data: Vec<u8> = (0..len % 64)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 24) as u8
                })
                .collect();
            let mut versioned = vec![CHUNK_VERSION];
            versioned.extend_from_slice(&data);
            let _ = decode_chunk(&data);
            let _ = decode_chunk(&versioned);
        }
    }
}
