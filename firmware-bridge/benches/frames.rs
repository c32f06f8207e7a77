//! READINGS frames: decode throughput (wire bytes to data-model readings, readings/s on one
//! core) and bytes on the wire per reading against a JSON line per reading. Run with
//! `cargo bench -p fieldgate-firmware-bridge --bench frames`; the byte figures print first.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fieldgate_firmware_bridge::protocol::{
    encode_frame, DeviceReading, DeviceValue, FrameDecoder, List, Message, MAX_WIRE_LEN,
};
use fieldgate_firmware_bridge::session::device_value;
use fieldgate_shared::generate::{FleetConfig, SensorFleet};
use fieldgate_shared::Value;
use std::hint::black_box;

const SAMPLES: usize = 10_000;

/// One device's samples as READINGS frames of `samples_per_frame` samples (6 metrics each), and
/// the same readings as JSON lines.
fn wire(samples_per_frame: usize) -> (Vec<u8>, usize, usize) {
    let config = FleetConfig {
        devices: 1,
        gap_probability: 0.0,
        ..FleetConfig::default()
    };
    let n_metrics = config.metrics.len();
    let readings: Vec<_> = SensorFleet::new(config).take(SAMPLES * n_metrics).collect();
    let mut bytes = Vec::new();
    let mut json_bytes = 0;
    let mut out = [0u8; MAX_WIRE_LEN];
    for (seq, frame) in readings.chunks(n_metrics * samples_per_frame).enumerate() {
        let base_ts_ms = frame[0].ts_ms;
        let device_readings: Vec<DeviceReading<'_>> = frame
            .iter()
            .enumerate()
            .map(|(i, r)| DeviceReading {
                channel: (i % n_metrics) as u8,
                offset_ms: (r.ts_ms - base_ts_ms) as u32,
                value: match r.value {
                    Value::F64(v) => DeviceValue::Decimal {
                        mantissa: (v * 100.0).round() as i64,
                        scale: 2,
                    },
                    Value::I64(v) => DeviceValue::Int(v),
                    Value::Bool(v) => DeviceValue::Bool(v),
                    Value::Str(_) => unreachable!("the generator makes no strings"),
                },
            })
            .collect();
        let message = Message::Readings {
            base_ts_ms,
            readings: List::Items(&device_readings),
        };
        let n = encode_frame(seq as u16, &message, &mut out).unwrap();
        bytes.extend_from_slice(&out[..n]);
        for r in frame {
            json_bytes += format!(
                "{{\"device\":\"{}\",\"metric\":\"{}\",\"ts_ms\":{},\"value\":{}}}\n",
                r.device,
                r.metric,
                r.ts_ms,
                serde_json::to_string(&r.value).unwrap()
            )
            .len();
        }
    }
    (bytes, readings.len(), json_bytes)
}

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("readings_frames");
    for samples_per_frame in [1, 4] {
        let (bytes, n_readings, json_bytes) = wire(samples_per_frame);
        println!(
            "{samples_per_frame} sample(s) per frame: {:.2} wire bytes/reading, JSON lines {:.1} bytes/reading",
            bytes.len() as f64 / n_readings as f64,
            json_bytes as f64 / n_readings as f64
        );
        group.throughput(Throughput::Elements(n_readings as u64));
        group.bench_function(
            format!("decode/{samples_per_frame}_sample_per_frame"),
            |b| {
                b.iter(|| {
                    let mut decoder = FrameDecoder::new();
                    let mut rest = bytes.as_slice();
                    let mut sum = 0.0;
                    while !rest.is_empty() {
                        let (used, frame) = decoder.feed(rest);
                        rest = &rest[used..];
                        if let Some(Ok(frame)) = frame {
                            if let Message::Readings { readings, .. } = frame.message {
                                for reading in readings.iter() {
                                    if let Ok(Value::F64(v)) = device_value(&reading.value) {
                                        sum += v;
                                    }
                                }
                            }
                        }
                    }
                    black_box(sum)
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
