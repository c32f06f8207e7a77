//! The batch codec against its promises: lossless round trips for any readings, and no panic on
//! any input, hostile or damaged.

use fieldgate_shared::codec::{
    self, BatchMeta, DecodeError, Decoder, EncodeError, EncodeOptions, Encoder, MAX_BATCH_READINGS,
};
use fieldgate_shared::generate::{FleetConfig, SensorFleet};
use fieldgate_shared::{
    DeviceId, GatewayId, MetricName, Quality, Reading, ShortStr, StreamId, Value,
};
use proptest::prelude::*;

fn meta(first_seq: u64, count: usize) -> BatchMeta {
    BatchMeta {
        gateway: GatewayId::new("gw-1").unwrap(),
        stream: StreamId::new("raw").unwrap(),
        first_seq,
        last_seq: first_seq + count as u64 - 1,
    }
}

fn any_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        // Every bit pattern: NaN payloads, -0.0, infinities, subnormals.
        any::<u64>().prop_map(|bits| Value::F64(f64::from_bits(bits))),
        // Sensor-like decimals, which take the decimal path.
        (-1_000_000i64..1_000_000, 0u32..4)
            .prop_map(|(m, d)| Value::F64(m as f64 / 10f64.powi(d as i32))),
        any::<i64>().prop_map(Value::I64),
        any::<bool>().prop_map(Value::Bool),
        "[a-z é]{0,12}".prop_map(|s| Value::Str(ShortStr::new(&s).unwrap())),
    ]
}

fn any_reading() -> impl Strategy<Value = Reading> {
    (
        prop::sample::select(vec!["dev-1", "dev-2", "m:3", "x"]),
        prop::sample::select(vec!["temperature", "power.l1", "state"]),
        prop_oneof![any::<i64>(), 1_700_000_000_000i64..1_700_000_100_000],
        any_value(),
        prop::sample::select(vec![Quality::Good, Quality::Uncertain, Quality::Bad]),
    )
        .prop_map(|(device, metric, ts_ms, value, quality)| Reading {
            device: DeviceId::new(device).unwrap(),
            metric: MetricName::new(metric).unwrap(),
            ts_ms,
            value,
            quality,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn round_trip_is_lossless(
        readings in prop::collection::vec(any_reading(), 1..300),
        first_seq in 0u64..u64::MAX / 2,
        decimal in any::<bool>(),
    ) {
        let mut encoder = Encoder::new(EncodeOptions { decimal_floats: decimal, ..EncodeOptions::default() }).unwrap();
        let bytes = encoder.encode(&meta(first_seq, readings.len()), &readings).unwrap();
        let batch = codec::decode(&bytes).unwrap();
        prop_assert_eq!(batch.header().first_seq, first_seq);
        prop_assert_eq!(batch.header().count as usize, readings.len());
        prop_assert_eq!(batch.readings(), readings);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = codec::decode(&bytes);
    }

    #[test]
    fn decoding_damaged_batches_never_panics_and_never_accepts_a_change(
        readings in prop::collection::vec(any_reading(), 1..100),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let original = codec::encode(&meta(1, readings.len()), &readings).unwrap();
        let mut damaged = original.clone();
        for (at, byte) in edits {
            let at = at.index(damaged.len());
            damaged[at] = byte;
        }
        if let Ok(batch) = codec::decode(&damaged) {
            // CRC-32 catches every change of up to 3 bytes... except when the edits undo
            // themselves and the bytes equal the original.
            prop_assert_eq!(&damaged, &original);
            prop_assert_eq!(batch.readings(), readings);
        }
    }
}

/// Recomputes the checksum so a hand-made body reaches the body parser.
fn with_valid_checksum(mut bytes: Vec<u8>) -> Vec<u8> {
    let checksum_at = checksum_offset(&bytes);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes[..checksum_at]);
    hasher.update(&bytes[checksum_at + 4..]);
    let crc = hasher.finalize();
    bytes[checksum_at..checksum_at + 4].copy_from_slice(&crc.to_le_bytes());
    bytes
}

fn checksum_offset(bytes: &[u8]) -> usize {
    let gateway_len = bytes[5] as usize;
    let stream_len = bytes[6 + gateway_len] as usize;
    7 + gateway_len + stream_len + 8 + 8 + 4 + 4 + 4
}

/// Builds an uncompressed batch around a hand-written body.
fn raw_batch(count: u32, body: &[u8]) -> Vec<u8> {
    let mut bytes = b"FGB\x01\x00".to_vec();
    bytes.extend_from_slice(b"\x04gw-1\x03raw");
    bytes.extend_from_slice(&1u64.to_le_bytes());
    bytes.extend_from_slice(&(count as u64).to_le_bytes());
    bytes.extend_from_slice(&count.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&[0; 4]);
    bytes.extend_from_slice(body);
    with_valid_checksum(bytes)
}

#[test]
fn a_hand_written_batch_decodes() {
    // One series (dev "d", metric "m", i64), two readings at ts 10 and 12, values 5 and 3.
    let body = [
        1, 0, // one series, no strings
        1, b'd', 1, b'm', 1, 2, // series table: d, m, kind i64, n = 2
        20, 4, // timestamps: zz(10), zz(2 - 0)
        10, 3, // values: zz(5), zz(-2)
        0, 2, // quality: good × 2
    ];
    let batch = codec::decode(&raw_batch(2, &body)).unwrap();
    let readings = batch.readings();
    assert_eq!(readings.len(), 2);
    assert_eq!(
        (readings[0].ts_ms, &readings[0].value),
        (10, &Value::I64(5))
    );
    assert_eq!(
        (readings[1].ts_ms, &readings[1].value),
        (12, &Value::I64(3))
    );
}

#[test]
fn hostile_bodies_are_refused_with_a_reason() {
    let check = |count: u32, body: &[u8], needle: &str| {
        let err = codec::decode(&raw_batch(count, body)).unwrap_err();
        assert!(err.to_string().contains(needle), "{body:?}: {err}");
    };
    // Series lengths that do not add up to the count.
    check(
        3,
        &[1, 0, 1, b'd', 1, b'm', 1, 2, 20, 4, 10, 3, 0, 2],
        "series length",
    );
    // A count larger than the body could possibly hold.
    check(1000, &[1, 0, 1, b'd'], "more readings than body bytes");
    // A string index beyond the dictionary.
    check(
        1,
        &[1, 0, 1, b'd', 1, b'm', 3, 1, 0, 7, 0, 1],
        "beyond the dictionary",
    );
    // A device name with a slash.
    check(
        1,
        &[1, 0, 1, b'/', 1, b'm', 1, 1, 0, 0, 0, 1],
        "device name",
    );
    // Trailing bytes.
    check(
        1,
        &[1, 0, 1, b'd', 1, b'm', 1, 1, 0, 0, 0, 1, 9],
        "trailing",
    );
    // A quality run longer than the series.
    check(
        1,
        &[1, 0, 1, b'd', 1, b'm', 1, 1, 0, 0, 0, 5],
        "quality run",
    );
    // An unknown value kind.
    check(1, &[1, 0, 1, b'd', 1, b'm', 9, 1, 0, 0, 0, 1], "value kind");
}

#[test]
fn every_truncation_is_an_error() {
    let readings: Vec<Reading> = SensorFleet::new(FleetConfig::default()).take(500).collect();
    let bytes = codec::encode(&meta(1, readings.len()), &readings).unwrap();
    for len in 0..bytes.len() {
        assert!(codec::decode(&bytes[..len]).is_err(), "truncated at {len}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(codec::decode(&longer).is_err());
}

#[test]
fn header_errors_name_what_is_wrong() {
    let readings: Vec<Reading> = SensorFleet::new(FleetConfig::default()).take(10).collect();
    let bytes = codec::encode(&meta(1, readings.len()), &readings).unwrap();

    let mut wrong_version = bytes.clone();
    wrong_version[3] = 9;
    assert_eq!(
        codec::decode(&wrong_version).unwrap_err(),
        DecodeError::UnsupportedVersion(9)
    );

    assert_eq!(
        codec::decode(b"{\"json\": 1}").unwrap_err(),
        DecodeError::BadMagic
    );

    let mut flipped = bytes.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    assert!(matches!(
        codec::decode(&flipped),
        Err(DecodeError::ChecksumMismatch { .. })
    ));

    let mut huge_count = bytes.clone();
    let count_at = checksum_offset(&bytes) - 12;
    huge_count[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = codec::decode(&with_valid_checksum(huge_count)).unwrap_err();
    assert!(
        matches!(err, DecodeError::TooLarge { what: "count", .. }),
        "{err}"
    );
}

#[test]
fn encoding_refuses_what_cannot_be_a_batch() {
    let mut encoder = Encoder::new(EncodeOptions::default()).unwrap();
    assert_eq!(
        encoder.encode(&meta(1, 1), &[]).unwrap_err(),
        EncodeError::Empty
    );
    let reading = SensorFleet::new(FleetConfig::default()).next().unwrap();
    let backwards = BatchMeta {
        first_seq: 5,
        last_seq: 4,
        ..meta(1, 1)
    };
    assert!(matches!(
        encoder.encode(&backwards, std::slice::from_ref(&reading)),
        Err(EncodeError::BadSeqRange { .. })
    ));
    let too_many = vec![reading; MAX_BATCH_READINGS as usize + 1];
    assert!(matches!(
        encoder.encode(&meta(1, too_many.len()), &too_many),
        Err(EncodeError::TooManyReadings { .. })
    ));
}

#[test]
fn one_encoder_and_decoder_serve_many_batches() {
    let mut encoder = Encoder::new(EncodeOptions::default()).unwrap();
    let mut decoder = Decoder::new();
    let mut fleet = SensorFleet::new(FleetConfig::default());
    let mut seq = 1;
    for size in [1, 7, 1_000, 3, 10_000] {
        let readings: Vec<Reading> = fleet.by_ref().take(size).collect();
        let bytes = encoder.encode(&meta(seq, size), &readings).unwrap();
        let batch = decoder.decode(&bytes).unwrap();
        assert_eq!(batch.readings(), readings);
        assert_eq!(&Decoder::header(&bytes).unwrap(), batch.header());
        seq += size as u64;
    }
}

#[test]
fn columnar_views_group_each_series_and_a_reused_batch_forgets_the_last() {
    use fieldgate_shared::codec::{ColumnarBatch, SeriesValues};
    let readings: Vec<Reading> = SensorFleet::new(FleetConfig::default()).take(600).collect();
    let bytes = codec::encode(&meta(1, readings.len()), &readings).unwrap();
    let mut decoder = Decoder::new();
    let mut batch = ColumnarBatch::default();
    decoder.decode_into(&bytes, &mut batch).unwrap();
    let mut seen = 0;
    for view in batch.series_views() {
        let expected: Vec<&Reading> = readings
            .iter()
            .filter(|r| &r.device == view.device && &r.metric == view.metric)
            .collect();
        assert_eq!(view.ts_ms.len(), expected.len());
        for (i, reading) in expected.iter().enumerate() {
            assert_eq!(view.ts_ms[i], reading.ts_ms);
            assert_eq!(view.values.get(i), reading.value);
            assert_eq!(view.quality[i], reading.quality);
        }
        if view.metric.as_str() == "temperature" {
            assert!(matches!(view.values, SeriesValues::F64(_)));
        }
        seen += expected.len();
    }
    assert_eq!(seen, readings.len());

    let small: Vec<Reading> = readings[..5].to_vec();
    decoder
        .decode_into(&codec::encode(&meta(601, 5), &small).unwrap(), &mut batch)
        .unwrap();
    assert_eq!(batch.readings(), small);
    assert!(decoder.decode_into(b"garbage", &mut batch).is_err());
    assert!(batch.is_empty() && batch.header.is_none());
}

#[test]
fn synthetic_sensor_data_is_compact() {
    // Guards the format's efficiency against regressions; the measured figures are in
    // BENCHMARKS.md. The bound is loose on purpose: the target is 1.5 bytes per reading.
    let readings: Vec<Reading> = SensorFleet::new(FleetConfig::default())
        .take(100_000)
        .collect();
    let mut encoder = Encoder::new(EncodeOptions::default()).unwrap();
    let total: usize = readings
        .chunks(1_000)
        .map(|chunk| encoder.encode(&meta(1, chunk.len()), chunk).unwrap().len())
        .sum();
    let per_reading = total as f64 / readings.len() as f64;
    assert!(per_reading < 1.5, "{per_reading:.3} bytes per reading");
}
