//! Readings into the durable journal on one core: append one group commit and flush it (fsync),
//! as the journal writer does. Run with `cargo bench -p fieldgate-edge --bench journal`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fieldgate_edge::journal::{Journal, JournalConfig, OverflowPolicy};
use fieldgate_shared::generate::{FleetConfig, SensorFleet};
use fieldgate_shared::Reading;

fn journal(c: &mut Criterion) {
    let mut group = c.benchmark_group("journal");
    group.sample_size(20);
    for group_size in [1_000usize, 10_000] {
        let readings: Vec<Reading> = SensorFleet::new(FleetConfig {
            devices: 20,
            ..FleetConfig::default()
        })
        .take(group_size)
        .collect();
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(JournalConfig {
            path: dir.path().join("journal"),
            targets: vec!["cloud".into()],
            quota_bytes: u64::MAX,
            overflow: OverflowPolicy::PushBack,
            compaction_slack_bytes: 64 << 20,
        })
        .unwrap();
        group.throughput(Throughput::Elements(group_size as u64));
        group.bench_with_input(
            BenchmarkId::new("append_and_flush", group_size),
            &readings,
            |b, readings| {
                b.iter(|| {
                    let seqs = journal.append(readings).unwrap();
                    journal.flush().unwrap();
                    // Acknowledge as a fast uplink would, so the journal stays small.
                    journal.ack("cloud", seqs.end - 1).unwrap();
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, journal);
criterion_main!(benches);
