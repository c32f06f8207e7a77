//! Device payloads to readings: the three JSON forms and the compact binary form described in
//! the module docs of [`super`]. Pure functions over a byte slice; a [`PayloadParser`] keeps a
//! per-connection cache of metric names so a reading costs no allocation beyond itself.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use fieldgate_shared::{DeviceId, MetricName, NameError, Quality, Reading, ShortStr, Value};
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// First byte of a binary payload, version 1. JSON never starts with it.
pub const BINARY_VERSION: u8 = 0x01;
/// Metric names a binary payload can refer back to by index.
pub const MAX_BINARY_NAMES: usize = 1024;
/// Metric names kept per connection before the cache starts over.
const MAX_CACHED_METRICS: usize = 4096;

/// Why a payload carries no readings. The message is refused whole: none of its readings are
/// kept.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PayloadError {
    #[error("empty payload")]
    Empty,
    /// Not JSON, or JSON of the wrong shape; serde_json's message says where.
    #[error("not readings JSON: {0}")]
    Json(String),
    #[error("{0}")]
    Shape(&'static str),
    #[error("{0}")]
    Metric(NameError),
    #[error("metric {metric:?}: {reason}")]
    Value {
        metric: String,
        reason: &'static str,
    },
    #[error("binary payload, byte {offset}: {reason}")]
    Binary { offset: usize, reason: &'static str },
    #[error("payload starts with byte {0:#04x}: neither JSON nor a binary version this gateway reads (1)")]
    UnknownFormat(u8),
}

/// What one payload gave.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub readings: usize,
    /// JSON `null` values, skipped (a device's way of saying "no value this time").
    pub nulls_skipped: usize,
}

/// Parses payloads of one device connection.
#[derive(Debug, Default)]
pub struct PayloadParser {
    metrics: HashMap<Box<str>, MetricName>,
    /// Indices into the output of readings waiting for their object's `ts`.
    needs_ts: Vec<usize>,
    binary_names: Vec<MetricName>,
}

impl PayloadParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the readings of `payload` to `out`. `received_ms` is the timestamp of readings
    /// whose payload gives none. On error `out` is left as it was.
    pub fn parse(
        &mut self,
        payload: &[u8],
        device: &DeviceId,
        received_ms: i64,
        out: &mut Vec<Reading>,
    ) -> Result<Parsed, PayloadError> {
        let start = out.len();
        let result = match payload.first() {
            None => Err(PayloadError::Empty),
            Some(&BINARY_VERSION) => self.parse_binary(payload, device, out).map(|()| 0),
            Some(&byte) if byte < 0x20 && !byte.is_ascii_whitespace() => {
                Err(PayloadError::UnknownFormat(byte))
            }
            Some(_) => self.parse_json(payload, device, received_ms, out),
        };
        match result {
            Ok(nulls_skipped) => Ok(Parsed {
                readings: out.len() - start,
                nulls_skipped,
            }),
            Err(err) => {
                out.truncate(start);
                self.needs_ts.clear();
                Err(err)
            }
        }
    }

    fn metric(&mut self, name: &str) -> Result<MetricName, PayloadError> {
        metric_from_cache(&mut self.metrics, name)
    }

    fn parse_json(
        &mut self,
        payload: &[u8],
        device: &DeviceId,
        received_ms: i64,
        out: &mut Vec<Reading>,
    ) -> Result<usize, PayloadError> {
        let mut ctx = JsonCtx {
            metrics: &mut self.metrics,
            needs_ts: &mut self.needs_ts,
            device,
            received_ms,
            out,
            nulls: 0,
            error: None,
        };
        let mut deserializer = serde_json::Deserializer::from_slice(payload);
        let result = TopLevel(&mut ctx)
            .deserialize(&mut deserializer)
            .and_then(|()| deserializer.end());
        match result {
            Ok(()) => Ok(ctx.nulls),
            Err(err) => Err(ctx
                .error
                .take()
                .unwrap_or_else(|| PayloadError::Json(err.to_string()))),
        }
    }

    fn parse_binary(
        &mut self,
        payload: &[u8],
        device: &DeviceId,
        out: &mut Vec<Reading>,
    ) -> Result<(), PayloadError> {
        let mut reader = BinaryReader {
            buf: payload,
            pos: 1,
        };
        let mut ts_ms = unzigzag(reader.varint()?);
        self.binary_names.clear();
        while !reader.is_done() {
            let reference = reader.varint()?;
            let metric = if reference == 0 {
                let len = usize::from(reader.u8()?);
                let at = reader.pos;
                let name = std::str::from_utf8(reader.take(len)?)
                    .map_err(|_| reader.error_at(at, "metric name is not UTF-8"))?;
                let metric = self.metric(name)?;
                if self.binary_names.len() < MAX_BINARY_NAMES {
                    self.binary_names.push(metric.clone());
                }
                metric
            } else {
                let at = reader.pos;
                usize::try_from(reference - 1)
                    .ok()
                    .and_then(|index| self.binary_names.get(index))
                    .cloned()
                    .ok_or_else(|| reader.error_at(at, "metric index refers to no name"))?
            };
            ts_ms = ts_ms.wrapping_add(unzigzag(reader.varint()?));
            let at = reader.pos;
            let tag = reader.u8()?;
            if tag & 0xE0 != 0 {
                return Err(reader.error_at(at, "reserved tag bits set"));
            }
            let quality = Quality::from_u8((tag >> 3) & 0x03)
                .ok_or_else(|| reader.error_at(at, "quality 3 is not defined"))?;
            let value = match tag & 0x07 {
                0 => {
                    let bytes = reader.take(8)?;
                    let mut le = [0u8; 8];
                    le.copy_from_slice(bytes);
                    Value::F64(f64::from_le_bytes(le))
                }
                1 => Value::I64(unzigzag(reader.varint()?)),
                2 => Value::Bool(false),
                3 => Value::Bool(true),
                4 => {
                    let len = usize::from(reader.u8()?);
                    let at = reader.pos;
                    let text = std::str::from_utf8(reader.take(len)?)
                        .map_err(|_| reader.error_at(at, "string value is not UTF-8"))?;
                    // At most 255 bytes by construction.
                    Value::Str(
                        ShortStr::new(text)
                            .map_err(|_| reader.error_at(at, "string value too long"))?,
                    )
                }
                _ => return Err(reader.error_at(at, "unknown value kind")),
            };
            out.push(Reading {
                device: device.clone(),
                metric,
                ts_ms,
                value,
                quality,
            });
        }
        Ok(())
    }
}

fn metric_from_cache(
    metrics: &mut HashMap<Box<str>, MetricName>,
    name: &str,
) -> Result<MetricName, PayloadError> {
    if let Some(metric) = metrics.get(name) {
        return Ok(metric.clone());
    }
    let metric = MetricName::new(name).map_err(PayloadError::Metric)?;
    if metrics.len() >= MAX_CACHED_METRICS {
        metrics.clear();
    }
    metrics.insert(name.into(), metric.clone());
    Ok(metric)
}

/// A JSON value's text to a [`Value`]; `None` for `null`. Numbers are parsed from their text,
/// so `21.53` becomes the f64 nearest to 21.53 and `40` an integer.
fn parse_value(text: &str) -> Result<Option<Value>, &'static str> {
    match text.as_bytes().first() {
        Some(b'"') => {
            let text: Cow<'_, str> = match serde_json::from_str::<&str>(text) {
                Ok(borrowed) => Cow::Borrowed(borrowed),
                Err(_) => Cow::Owned(
                    serde_json::from_str::<String>(text).map_err(|_| "unreadable string")?,
                ),
            };
            ShortStr::new(&text)
                .map(|text| Some(Value::Str(text)))
                .map_err(|_| "string longer than 255 bytes")
        }
        Some(b't') => Ok(Some(Value::Bool(true))),
        Some(b'f') => Ok(Some(Value::Bool(false))),
        Some(b'n') => Ok(None),
        Some(b'{' | b'[') => Err("objects and arrays are not values"),
        Some(_) if text.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) => {
            match text.parse::<f64>() {
                Ok(value) if value.is_finite() => Ok(Some(Value::F64(value))),
                Ok(_) => Err("number out of the f64 range"),
                Err(_) => Err("not a number"),
            }
        }
        Some(_) => text
            .parse::<i64>()
            .map(|value| Some(Value::I64(value)))
            .map_err(|_| "integer out of the i64 range"),
        None => Err("empty value"),
    }
}

struct JsonCtx<'c> {
    metrics: &'c mut HashMap<Box<str>, MetricName>,
    needs_ts: &'c mut Vec<usize>,
    device: &'c DeviceId,
    received_ms: i64,
    out: &'c mut Vec<Reading>,
    nulls: usize,
    /// The typed error behind the serde error that stopped the parse.
    error: Option<PayloadError>,
}

impl JsonCtx<'_> {
    fn fail<E: de::Error>(&mut self, error: PayloadError) -> E {
        let serde_error = E::custom(&error);
        self.error = Some(error);
        serde_error
    }

    fn push(
        &mut self,
        metric: &str,
        ts_ms: Option<i64>,
        raw: &RawValue,
        quality: Quality,
    ) -> Result<(), PayloadError> {
        let value = parse_value(raw.get()).map_err(|reason| PayloadError::Value {
            metric: metric.to_owned(),
            reason,
        })?;
        let Some(value) = value else {
            self.nulls += 1;
            return Ok(());
        };
        let metric = metric_from_cache(self.metrics, metric)?;
        if ts_ms.is_none() {
            self.needs_ts.push(self.out.len());
        }
        self.out.push(Reading {
            device: self.device.clone(),
            metric,
            ts_ms: ts_ms.unwrap_or(self.received_ms),
            value,
            quality,
        });
        Ok(())
    }
}

/// An object key or string, borrowed from the payload unless it has escapes.
struct StrSeed;

impl<'de> DeserializeSeed<'de> for StrSeed {
    type Value = Cow<'de, str>;
    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for StrSeed {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(text))
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(text.to_owned()))
    }
}

/// The whole payload: one object or an array of objects.
struct TopLevel<'a, 'c>(&'a mut JsonCtx<'c>);

impl<'de> DeserializeSeed<'de> for TopLevel<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopLevel<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of readings or an array of such objects")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        read_object(self.0, map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(ObjectSeed(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

struct ObjectSeed<'a, 'c>(&'a mut JsonCtx<'c>);

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of readings")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        read_object(self.0, map)
    }
}

/// `{"ts": …, "<metric>": <value>, …, "readings": [ … ]}`: flat metrics and explicit readings
/// without their own `ts` take the object's `ts`, wherever in the object it stands.
fn read_object<'de, A: MapAccess<'de>>(ctx: &mut JsonCtx<'_>, mut map: A) -> Result<(), A::Error> {
    let mark = ctx.needs_ts.len();
    let mut ts_ms = None;
    while let Some(key) = map.next_key_seed(StrSeed)? {
        match &*key {
            "ts" => {
                if ts_ms.is_some() {
                    return Err(ctx.fail(PayloadError::Shape("\"ts\" appears twice")));
                }
                ts_ms = Some(map.next_value::<i64>()?);
            }
            "readings" => map.next_value_seed(ExplicitReadings(&mut *ctx))?,
            metric => {
                let raw: &'de RawValue = map.next_value()?;
                if let Err(err) = ctx.push(metric, None, raw, Quality::Good) {
                    return Err(ctx.fail(err));
                }
            }
        }
    }
    let ts_ms = ts_ms.unwrap_or(ctx.received_ms);
    for &index in &ctx.needs_ts[mark..] {
        ctx.out[index].ts_ms = ts_ms;
    }
    ctx.needs_ts.truncate(mark);
    Ok(())
}

/// `[{"metric": …, "value": …, "ts": …, "quality": …}, …]`
struct ExplicitReadings<'a, 'c>(&'a mut JsonCtx<'c>);

impl<'de> DeserializeSeed<'de> for ExplicitReadings<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ExplicitReadings<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of readings")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(ExplicitReading(&mut *self.0))?
            .is_some()
        {}
        Ok(())
    }
}

struct ExplicitReading<'a, 'c>(&'a mut JsonCtx<'c>);

impl<'de> DeserializeSeed<'de> for ExplicitReading<'_, '_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ExplicitReading<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a reading object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let ctx = self.0;
        let mut metric = None;
        let mut ts_ms = None;
        let mut value: Option<&'de RawValue> = None;
        let mut quality = Quality::Good;
        while let Some(key) = map.next_key_seed(StrSeed)? {
            match &*key {
                "metric" => metric = Some(map.next_value_seed(StrSeed)?),
                "ts" => ts_ms = Some(map.next_value::<i64>()?),
                "value" => value = Some(map.next_value()?),
                "quality" => quality = map.next_value()?,
                _ => {
                    return Err(ctx.fail(PayloadError::Shape(
                        "a reading has only \"metric\", \"value\", \"ts\" and \"quality\"",
                    )))
                }
            }
        }
        let Some(metric) = metric else {
            return Err(ctx.fail(PayloadError::Shape("a reading without \"metric\"")));
        };
        let Some(value) = value else {
            return Err(ctx.fail(PayloadError::Shape("a reading without \"value\"")));
        };
        match ctx.push(&metric, ts_ms, value, quality) {
            Ok(()) => Ok(()),
            Err(err) => Err(ctx.fail(err)),
        }
    }
}

struct BinaryReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> BinaryReader<'a> {
    fn is_done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn error_at(&self, offset: usize, reason: &'static str) -> PayloadError {
        PayloadError::Binary { offset, reason }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PayloadError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or(PayloadError::Binary {
                offset: self.pos,
                reason: "truncated",
            })?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, PayloadError> {
        Ok(self.take(1)?[0])
    }

    /// LEB128, at most 10 bytes for 64 bits.
    fn varint(&mut self) -> Result<u64, PayloadError> {
        let at = self.pos;
        let mut value = 0u64;
        for i in 0..10 {
            let byte = self.u8()?;
            if i == 9 && byte > 1 {
                break;
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.error_at(at, "varint longer than 64 bits"))
    }
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Writes the binary payload form (for device firmware written in Rust, simulators and tests).
#[derive(Clone, Debug)]
pub struct BinaryPayloadEncoder {
    buf: Vec<u8>,
    names: Vec<MetricName>,
    last_ts_ms: i64,
}

impl BinaryPayloadEncoder {
    pub fn new(base_ts_ms: i64) -> Self {
        let mut buf = vec![BINARY_VERSION];
        put_varint(&mut buf, zigzag(base_ts_ms));
        Self {
            buf,
            names: Vec::new(),
            last_ts_ms: base_ts_ms,
        }
    }

    pub fn push(&mut self, metric: &MetricName, ts_ms: i64, value: &Value, quality: Quality) {
        match self.names.iter().position(|name| name == metric) {
            Some(index) => put_varint(&mut self.buf, index as u64 + 1),
            None => {
                self.buf.push(0);
                // Metric names are at most 64 bytes.
                self.buf.push(metric.as_str().len() as u8);
                self.buf.extend_from_slice(metric.as_str().as_bytes());
                if self.names.len() < MAX_BINARY_NAMES {
                    self.names.push(metric.clone());
                }
            }
        }
        put_varint(&mut self.buf, zigzag(ts_ms.wrapping_sub(self.last_ts_ms)));
        self.last_ts_ms = ts_ms;
        let quality_bits = (quality as u8) << 3;
        match value {
            Value::F64(v) => {
                self.buf.push(quality_bits);
                self.buf.extend_from_slice(&v.to_le_bytes());
            }
            Value::I64(v) => {
                self.buf.push(quality_bits | 1);
                put_varint(&mut self.buf, zigzag(*v));
            }
            Value::Bool(v) => self.buf.push(quality_bits | if *v { 3 } else { 2 }),
            Value::Str(text) => {
                self.buf.push(quality_bits | 4);
                // Short strings are at most 255 bytes.
                self.buf.push(text.as_str().len() as u8);
                self.buf.extend_from_slice(text.as_str().as_bytes());
            }
        }
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECEIVED: i64 = 1_700_000_000_999;

    fn device() -> DeviceId {
        DeviceId::new("meter-1").unwrap()
    }

    fn reading(metric: &str, ts_ms: i64, value: Value) -> Reading {
        Reading {
            device: device(),
            metric: MetricName::new(metric).unwrap(),
            ts_ms,
            value,
            quality: Quality::Good,
        }
    }

    fn parse(payload: &[u8]) -> Result<Vec<Reading>, PayloadError> {
        let mut out = Vec::new();
        PayloadParser::new()
            .parse(payload, &device(), RECEIVED, &mut out)
            .map(|_| out)
    }

    fn check(payload: &str, expected: &[Reading]) {
        assert_eq!(
            parse(payload.as_bytes()).as_deref(),
            Ok(expected),
            "{payload}"
        );
    }

    fn check_err(payload: &[u8], expected: &str) {
        let err = parse(payload).unwrap_err().to_string();
        assert!(err.contains(expected), "{payload:?}: {err}");
    }

    #[test]
    fn flat_object_as_in_the_forward_workload() {
        check(
            r#"{"ts": 1700000000000, "temperature": 21.53, "humidity": 40.2, "pressure": 1013.2, "vibration": 0.013}"#,
            &[
                reading("temperature", 1_700_000_000_000, Value::F64(21.53)),
                reading("humidity", 1_700_000_000_000, Value::F64(40.2)),
                reading("pressure", 1_700_000_000_000, Value::F64(1013.2)),
                reading("vibration", 1_700_000_000_000, Value::F64(0.013)),
            ],
        );
    }

    #[test]
    fn value_kinds_follow_the_json_text() {
        let short = ShortStr::new("on \"A\"").unwrap();
        check(
            r#"{"i": 40, "neg": -7, "f": 40.0, "e": 1e3, "t": true, "b": false, "s": "on \"A\"", "ts": 5}"#,
            &[
                reading("i", 5, Value::I64(40)),
                reading("neg", 5, Value::I64(-7)),
                reading("f", 5, Value::F64(40.0)),
                reading("e", 5, Value::F64(1000.0)),
                reading("t", 5, Value::Bool(true)),
                reading("b", 5, Value::Bool(false)),
                reading("s", 5, Value::Str(short)),
            ],
        );
        // Long digit strings are parsed from their text, correctly rounded.
        check(
            r#"{"ts": 1, "x": 0.30000000000000004441, "y": 2.2250738585072011e-308}"#,
            &[
                reading(
                    "x",
                    1,
                    Value::F64("0.30000000000000004441".parse().unwrap()),
                ),
                reading(
                    "y",
                    1,
                    Value::F64("2.2250738585072011e-308".parse().unwrap()),
                ),
            ],
        );
    }

    #[test]
    fn missing_ts_takes_the_receive_time_and_nulls_are_skipped() {
        let mut out = Vec::new();
        let parsed = PayloadParser::new()
            .parse(br#"{"a": 1, "b": null}"#, &device(), RECEIVED, &mut out)
            .unwrap();
        assert_eq!(
            parsed,
            Parsed {
                readings: 1,
                nulls_skipped: 1
            }
        );
        assert_eq!(out, [reading("a", RECEIVED, Value::I64(1))]);
    }

    #[test]
    fn arrays_of_objects_each_with_their_ts() {
        check(
            r#"[{"ts": 1, "a": 1}, {"a": 2, "ts": 2}, {"a": 3}]"#,
            &[
                reading("a", 1, Value::I64(1)),
                reading("a", 2, Value::I64(2)),
                reading("a", 3, Value::I64(3)).clone_with_ts(RECEIVED),
            ],
        );
    }

    trait WithTs {
        fn clone_with_ts(self, ts_ms: i64) -> Reading;
    }
    impl WithTs for Reading {
        fn clone_with_ts(mut self, ts_ms: i64) -> Reading {
            self.ts_ms = ts_ms;
            self
        }
    }

    #[test]
    fn explicit_readings_with_their_own_or_the_message_ts() {
        let mut uncertain = reading("b", 7, Value::F64(2.5));
        uncertain.quality = Quality::Uncertain;
        check(
            r#"{"readings": [{"metric": "a", "value": 1}, {"metric": "b", "ts": 7, "value": 2.5, "quality": "uncertain"}], "ts": 3}"#,
            &[reading("a", 3, Value::I64(1)), uncertain],
        );
    }

    #[test]
    fn malformed_payloads_say_why() {
        check_err(b"", "empty payload");
        check_err(b"{\"a\": 1", "EOF");
        check_err(b"{\"a\": 1} x", "trailing characters");
        check_err(b"\"text\"", "expected a JSON object of readings");
        check_err(b"42", "expected a JSON object of readings");
        check_err(b"{\"a b\": 1}", "metric name \"a b\"");
        check_err(b"{\"a\": {\"b\": 1}}", "objects and arrays are not values");
        check_err(b"{\"a\": 1e999}", "out of the f64 range");
        check_err(b"{\"a\": 99999999999999999999}", "out of the i64 range");
        check_err(b"{\"ts\": 1.5, \"a\": 1}", "invalid type");
        check_err(b"{\"ts\": 1, \"ts\": 2}", "\"ts\" appears twice");
        check_err(
            format!("{{\"a\": \"{}\"}}", "x".repeat(256)).as_bytes(),
            "longer than 255 bytes",
        );
        check_err(
            b"{\"readings\": [{\"metric\": \"a\"}]}",
            "a reading without \"value\"",
        );
        check_err(
            b"{\"readings\": [{\"metric\": \"a\", \"value\": 1, \"unit\": \"C\"}]}",
            "only \"metric\"",
        );
        check_err(b"\x02abc", "neither JSON nor a binary version");
        check_err(&[0xff, 0xfe], "not readings JSON");
    }

    #[test]
    fn a_refused_payload_leaves_the_output_as_it_was() {
        let mut parser = PayloadParser::new();
        let mut out = vec![reading("kept", 1, Value::I64(1))];
        parser
            .parse(
                br#"{"ts": 2, "a": 1, "b": [1]}"#,
                &device(),
                RECEIVED,
                &mut out,
            )
            .unwrap_err();
        assert_eq!(out, [reading("kept", 1, Value::I64(1))]);
        // The parser is still usable: no stale timestamps waiting.
        parser
            .parse(br#"{"c": 3, "ts": 9}"#, &device(), RECEIVED, &mut out)
            .unwrap();
        assert_eq!(out[1], reading("c", 9, Value::I64(3)));
    }

    #[test]
    fn binary_round_trips_every_value_kind() {
        let temperature = MetricName::new("temperature").unwrap();
        let state = MetricName::new("state").unwrap();
        let mut bad = reading(
            "state",
            1_700_000_000_500,
            Value::Str(ShortStr::new("fault").unwrap()),
        );
        bad.quality = Quality::Bad;
        let expected = vec![
            reading("temperature", 1_700_000_000_000, Value::F64(21.53)),
            reading("temperature", 1_700_000_001_000, Value::F64(f64::NAN)),
            reading("state", 1_699_999_999_000, Value::I64(-42)),
            reading("state", 1_700_000_000_000, Value::Bool(true)),
            bad,
        ];
        let mut encoder = BinaryPayloadEncoder::new(1_700_000_000_000);
        for r in &expected {
            let metric = if r.metric == temperature {
                &temperature
            } else {
                &state
            };
            encoder.push(metric, r.ts_ms, &r.value, r.quality);
        }
        let bytes = encoder.finish();
        assert_eq!(bytes[0], BINARY_VERSION);
        assert_eq!(parse(&bytes).unwrap(), expected);
    }

    #[test]
    fn binary_layout_is_as_documented() {
        // Version 1, base ts 10 (zig-zag 20), then "t" = 2 at ts 11 (delta 1, zig-zag 2) as i64,
        // then the same metric by index 1 at ts 11, true.
        let bytes = [1, 20, 0, 1, b't', 2, 1, 4, 1, 0, 3];
        assert_eq!(
            parse(&bytes).unwrap(),
            [
                reading("t", 11, Value::I64(2)),
                reading("t", 11, Value::Bool(true))
            ]
        );
    }

    #[test]
    fn broken_binary_payloads_are_refused() {
        check_err(&[1], "truncated");
        check_err(&[1, 0, 5], "metric index refers to no name");
        check_err(&[1, 0, 0, 1, b't', 0, 0x07], "unknown value kind");
        check_err(&[1, 0, 0, 1, b't', 0, 0x18], "quality 3");
        check_err(&[1, 0, 0, 1, b't', 0, 0x20], "reserved tag bits");
        check_err(&[1, 0, 0, 1, b't', 0, 0, 1, 2], "truncated");
        check_err(&[1, 0, 0, 2, b'a', b' ', 0, 2], "metric name \"a \"");
        check_err(
            &[
                1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
            "varint",
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..100)) {
            let mut out = Vec::new();
            let _ = PayloadParser::new().parse(&bytes, &device(), RECEIVED, &mut out);
        }

        #[test]
        fn binary_round_trips(values in proptest::collection::vec((0usize..3, -1_000_000i64..1_000_000, proptest::num::i64::ANY, proptest::num::f64::ANY, 0u8..3), 0..50)) {
            let names: Vec<MetricName> = ["a", "b", "c"].iter().map(|n| MetricName::new(n).unwrap()).collect();
            let mut encoder = BinaryPayloadEncoder::new(1_000);
            let mut expected = Vec::new();
            let mut ts_ms = 1_000i64;
            for (metric, delta, int, float, kind) in values {
                ts_ms += delta;
                let value = match kind { 0 => Value::I64(int), 1 => Value::F64(float), _ => Value::Bool(int % 2 == 0) };
                encoder.push(&names[metric], ts_ms, &value, Quality::Good);
                expected.push(Reading { device: device(), metric: names[metric].clone(), ts_ms, value, quality: Quality::Good });
            }
            proptest::prop_assert_eq!(parse(&encoder.finish()).unwrap(), expected);
        }
    }
}
