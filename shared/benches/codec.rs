//! Encode and decode throughput of the batch codec on synthetic sensor data, in readings per
//! second on one core (criterion's "elements"), for gateway-sized batches.
//!
//! Run with `cargo bench -p fieldgate-shared --bench codec`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fieldgate_shared::codec::{BatchMeta, ColumnarBatch, Decoder, EncodeOptions, Encoder};
use fieldgate_shared::generate::{FleetConfig, SensorFleet};
use fieldgate_shared::{GatewayId, Reading, StreamId};
use std::hint::black_box;

const TOTAL: usize = 100_000;

fn batches(batch_size: usize) -> (Vec<Vec<Reading>>, BatchMeta) {
    let readings: Vec<Reading> = SensorFleet::new(FleetConfig::default())
        .take(TOTAL)
        .collect();
    let meta = BatchMeta {
        gateway: GatewayId::new("gw-bench").unwrap(),
        stream: StreamId::new("raw").unwrap(),
        first_seq: 1,
        last_seq: batch_size as u64,
    };
    (
        readings
            .chunks(batch_size)
            .map(<[Reading]>::to_vec)
            .collect(),
        meta,
    )
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(TOTAL as u64));
    group.sample_size(20);
    for batch_size in [1_000, 10_000] {
        let (batches, meta) = batches(batch_size);
        let mut encoder = Encoder::new(EncodeOptions::default()).unwrap();
        let mut out = Vec::new();
        group.bench_with_input(
            BenchmarkId::new("encode", batch_size),
            &batches,
            |b, batches| {
                b.iter(|| {
                    for batch in batches {
                        out.clear();
                        encoder.encode_into(&meta, batch, &mut out).unwrap();
                        black_box(&out);
                    }
                })
            },
        );
        let encoded: Vec<Vec<u8>> = batches
            .iter()
            .map(|batch| encoder.encode(&meta, batch).unwrap())
            .collect();
        let mut decoder = Decoder::new();
        group.bench_with_input(
            BenchmarkId::new("decode", batch_size),
            &encoded,
            |b, encoded| {
                b.iter(|| {
                    for bytes in encoded {
                        black_box(decoder.decode(bytes).unwrap());
                    }
                })
            },
        );
        let mut reused = ColumnarBatch::default();
        group.bench_with_input(
            BenchmarkId::new("decode_into", batch_size),
            &encoded,
            |b, encoded| {
                b.iter(|| {
                    for bytes in encoded {
                        decoder.decode_into(bytes, &mut reused).unwrap();
                        black_box(&reused);
                    }
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("decode_to_rows", batch_size),
            &encoded,
            |b, encoded| {
                b.iter(|| {
                    for bytes in encoded {
                        black_box(decoder.decode(bytes).unwrap().readings());
                    }
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
