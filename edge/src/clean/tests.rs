//! Pipeline-level tests: the steps together, the counters' invariants, the example config, and a property test.

use fieldgate_shared::generate::{FleetConfig, SensorFleet};
use fieldgate_shared::{DeviceId, MetricName, Quality, Reading, ShortStr, Value, ValueKind};
use proptest::prelude::*;
use serde::Deserialize;

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    clean: CleanConfig,
}

/// Parses a `[clean]` section written with its tables relative to it (`[spike.defaults]`).
fn config(text: &str) -> CleanConfig {
    let mut full = String::from("[clean]\n");
    for line in text.lines() {
        let line = line.trim_start();
        if let Some(rest) = line.strip_prefix("[[") {
            full.push_str("[[clean.");
            full.push_str(rest);
        } else if let Some(rest) = line.strip_prefix('[') {
            full.push_str("[clean.");
            full.push_str(rest);
        } else {
            full.push_str(line);
        }
        full.push('\n');
    }
    let text = full;
    toml::from_str::<ConfigFile>(&text)
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
        .clean
}

fn pipeline(text: &str) -> Pipeline {
    Pipeline::new(&config(text)).unwrap()
}

fn reading(device: &str, metric: &str, ts_ms: i64, value: Value) -> Reading {
    Reading {
        device: DeviceId::new(device).unwrap(),
        metric: MetricName::new(metric).unwrap(),
        ts_ms,
        value,
        quality: Quality::Good,
    }
}

fn float(device: &str, metric: &str, ts_ms: i64, x: f64) -> Reading {
    reading(device, metric, ts_ms, Value::F64(x))
}

fn text(s: &str) -> Value {
    Value::Str(ShortStr::new(s).unwrap())
}

/// Only the steps a test is about: every detector and the windows off.
const QUIET: &str = r#"
[spike.defaults]
enabled = false
[anomaly.defaults]
enabled = false
[windows.defaults]
enabled = false
"#;

fn accepted(outcome: &Outcome) -> (&Reading, Flags) {
    outcome
        .accepted()
        .unwrap_or_else(|| panic!("expected acceptance, got {outcome:?}"))
}

fn rejected(outcome: &Outcome) -> Rejection {
    *outcome
        .rejection()
        .unwrap_or_else(|| panic!("expected rejection, got {outcome:?}"))
}

/// The invariants every pipeline keeps, whatever it was fed.
fn check_invariants(pipeline: &Pipeline) {
    let counters = pipeline.counters();
    assert_eq!(counters.accepted + counters.rejected, counters.input);
    let by_reason: u64 = Reason::ALL.iter().map(|&r| counters.rejected_by(r)).sum();
    assert_eq!(by_reason, counters.rejected, "{counters:#?}");
    assert_eq!(
        counters.quarantine.entered + counters.quarantine.duplicates_not_kept,
        counters.rejected
    );
    assert_eq!(
        counters.quarantine.len + counters.quarantine.evicted,
        counters.quarantine.entered
    );
    let flagged: u64 = Flag::ALL.iter().map(|&f| counters.flagged_by(f)).sum();
    assert!(flagged >= counters.accepted_flagged);
    assert!(counters.accepted_flagged <= counters.accepted);
}

#[test]
fn a_clean_reading_passes_unchanged() {
    let mut pipeline = pipeline("");
    let input = float("plc1", "temp", 1_000_000, 21.5);
    let outcome = pipeline.process(input.clone(), 1_000_050);
    assert_eq!(
        outcome,
        Outcome::Accepted {
            reading: input,
            flags: Flags::EMPTY
        }
    );
    let counters = pipeline.counters();
    assert_eq!((counters.input, counters.accepted), (1, 1));
    assert_eq!(counters.series.live, 1);
    assert_eq!(counters.devices.live, 1);
    check_invariants(&pipeline);
}

#[test]
fn each_rejection_is_counted_and_quarantined_as_received() {
    let mut pipeline = pipeline(&format!(
        r#"{QUIET}
        [[range.rules]]
        metric = "temp"
        kind = "f64"
        min = -40.0
        max = 125.0
        [[range.rules]]
        metric = "state"
        kind = "str"
        [[units.rules]]
        metric = "temp_f"
        from = "degF"
        to = "degC"
        [[range.rules]]
        metric = "temp_f"
        max = 90.0
        "#
    ));
    let now = 10_000_000;
    let cases = [
        (
            reading("d", "temp", now, text("21.5")),
            Rejection::WrongKind {
                expected: ExpectedKind::F64,
                got: ValueKind::Str,
            },
        ),
        (
            reading("d", "state", now, Value::F64(1.0)),
            Rejection::WrongKind {
                expected: ExpectedKind::Str,
                got: ValueKind::F64,
            },
        ),
        (
            float("d", "temp", now + 1, f64::NAN),
            Rejection::NonFinite {
                after_conversion: false,
            },
        ),
        (
            float("d", "temp", now + 2, f64::NEG_INFINITY),
            Rejection::NonFinite {
                after_conversion: false,
            },
        ),
        (
            float("d", "temp", now + 3, -40.5),
            Rejection::BelowMin {
                value: -40.5,
                min: -40.0,
            },
        ),
        (
            float("d", "temp", now + 4, 130.0),
            Rejection::AboveMax {
                value: 130.0,
                max: 125.0,
            },
        ),
        // 212 °F is 100 °C: the range is in the normalised unit.
        (
            float("d", "temp_f", now, 212.0),
            Rejection::AboveMax {
                value: 100.0,
                max: 90.0,
            },
        ),
        (
            float("d", "other", now + 3_600_000, 1.0),
            Rejection::Future {
                device_ts_ms: now + 3_600_000,
                corrected_ts_ms: now + 3_600_000,
                latest_ms: now + 60_000,
            },
        ),
    ];
    for (input, expected) in &cases {
        let outcome = pipeline.process(input.clone(), now);
        assert_eq!(rejected(&outcome), *expected, "{input:?}");
    }
    let snapshot = pipeline.quarantine().snapshot();
    assert_eq!(snapshot.len, cases.len());
    for (entry, (input, expected)) in snapshot.entries.iter().zip(&cases) {
        // As received: the 212 °F reading is stored in °F, not converted.
        assert_eq!(entry.reading, *input);
        assert_eq!(entry.rejection, *expected);
        assert_eq!(entry.received_ms, now);
    }
    let counters = pipeline.counters();
    assert_eq!(counters.rejected_by(Reason::WrongKind), 2);
    assert_eq!(counters.rejected_by(Reason::NonFinite), 2);
    assert_eq!(counters.rejected_by(Reason::AboveMax), 2);
    assert_eq!(counters.rejected_by(Reason::Future), 1);
    check_invariants(&pipeline);
}

#[test]
fn resends_are_dropped_and_conflicts_quarantined() {
    let mut pipeline = pipeline(QUIET);
    let first = float("meter-1", "power", 5_000, 1.5);
    assert!(pipeline.process(first.clone(), 5_010).is_accepted());
    assert_eq!(
        rejected(&pipeline.process(first.clone(), 6_000)),
        Rejection::Duplicate
    );
    let changed = float("meter-1", "power", 5_000, 1.6);
    assert_eq!(
        rejected(&pipeline.process(changed.clone(), 6_000)),
        Rejection::Conflict
    );
    // Another device, same metric and timestamp: its own series.
    assert!(pipeline
        .process(float("meter-2", "power", 5_000, 1.6), 6_000)
        .is_accepted());
    let counters = pipeline.counters();
    assert_eq!(
        (counters.dedupe.duplicates, counters.dedupe.conflicts),
        (1, 1)
    );
    assert_eq!(counters.quarantine.duplicates_not_kept, 1);
    let snapshot = pipeline.quarantine().snapshot();
    assert_eq!(snapshot.entries.len(), 1);
    assert_eq!(snapshot.entries[0].reading, changed);
    check_invariants(&pipeline);

    let mut keeping = self::pipeline(&format!("{QUIET}\n[quarantine]\nkeep_duplicates = true"));
    keeping.process(first.clone(), 5_010);
    keeping.process(first, 6_000);
    assert_eq!(keeping.quarantine().len(), 1);
    check_invariants(&keeping);
}

#[test]
fn a_resend_beyond_the_history_passes_and_is_counted() {
    let mut pipeline = pipeline(&format!("{QUIET}\n[dedupe.defaults]\nhistory = 2"));
    for ts in [1_000, 2_000, 3_000] {
        assert!(pipeline.process(float("d", "m", ts, 1.0), ts).is_accepted());
    }
    // 2 000 is still remembered; 1 000 has fallen out of the history.
    assert_eq!(
        rejected(&pipeline.process(float("d", "m", 2_000, 1.0), 3_500)),
        Rejection::Duplicate
    );
    assert!(pipeline
        .process(float("d", "m", 1_000, 1.0), 3_500)
        .is_accepted());
    let counters = pipeline.counters();
    assert_eq!(
        (counters.dedupe.duplicates, counters.dedupe.beyond_window),
        (1, 1)
    );
}

#[test]
fn a_pipeline_can_move_to_its_own_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<Pipeline>();
    assert_send::<Outcome>();
}

#[test]
fn a_rejected_reading_resent_is_a_duplicate_not_a_second_entry() {
    let mut pipeline = pipeline(&format!("{QUIET}\n[range.defaults]\nmax = 10.0"));
    let high = float("d", "m", 1_000, 11.0);
    assert!(matches!(
        rejected(&pipeline.process(high.clone(), 1_000)),
        Rejection::AboveMax { .. }
    ));
    assert_eq!(
        rejected(&pipeline.process(high, 2_000)),
        Rejection::Duplicate
    );
    assert_eq!(pipeline.quarantine().len(), 1);
}

#[test]
fn conversions_and_coercions_change_the_value() {
    let mut pipeline = pipeline(&format!(
        r#"{QUIET}
        [[units.rules]]
        metric = "energy_wh"
        from = "Wh"
        to = "kWh"
        [[units.rules]]
        device = "legacy-*"
        metric = "temp"
        scale = 0.1
        offset = -40.0
        [[range.rules]]
        metric = "level"
        kind = "f64"
        "#
    ));
    let check = |pipeline: &mut Pipeline, input: Reading, expected: Value| {
        let outcome = pipeline.process(input, 1_000);
        let (reading, flags) = accepted(&outcome);
        assert_eq!(reading.value, expected);
        assert!(flags.is_empty());
        assert_eq!(reading.quality, Quality::Good);
    };
    check(
        &mut pipeline,
        reading("m1", "energy_wh", 1_000, Value::I64(1_234_567)),
        Value::F64(1234.567),
    );
    check(
        &mut pipeline,
        reading("legacy-7", "temp", 1_000, Value::I64(654)),
        Value::F64(25.4),
    );
    // Not a legacy device: no conversion.
    check(
        &mut pipeline,
        reading("new-7", "temp", 1_000, Value::I64(654)),
        Value::I64(654),
    );
    check(
        &mut pipeline,
        reading("m1", "level", 1_000, Value::I64(3)),
        Value::F64(3.0),
    );
    let counters = pipeline.counters();
    assert_eq!((counters.units.converted, counters.units.exact), (2, 2));
    assert_eq!(counters.range.coerced, 1);

    // A conversion overflowing to infinity is refused, not stored as inf.
    let mut overflow = self::pipeline(&format!(
        "{QUIET}\n[[units.rules]]\nfrom = \"MWh\"\nto = \"J\""
    ));
    assert_eq!(
        rejected(&overflow.process(float("d", "e", 0, f64::MAX / 4.0), 0)),
        Rejection::NonFinite {
            after_conversion: true
        }
    );
    check_invariants(&overflow);
}

#[test]
fn out_of_range_can_be_flagged_instead() {
    let mut pipeline = pipeline(&format!(
        "{QUIET}\n[range.defaults]\nmin = 0.0\nmax = 100.0\naction = \"flag\""
    ));
    let outcome = pipeline.process(float("d", "m", 0, 101.0), 0);
    let (reading, flags) = accepted(&outcome);
    assert_eq!(flags, Flags::from(Flag::OutOfRange));
    assert_eq!(reading.quality, Quality::Uncertain);
    assert_eq!(reading.value, Value::F64(101.0));
    assert_eq!(pipeline.counters().flagged_by(Flag::OutOfRange), 1);
}

#[test]
fn device_quality_is_only_ever_lowered_from_good() {
    let mut pipeline = pipeline(&format!(
        "{QUIET}\n[range.defaults]\nmax = 0.0\naction = \"flag\""
    ));
    for (quality, expected) in [
        (Quality::Good, Quality::Uncertain),
        (Quality::Uncertain, Quality::Uncertain),
        (Quality::Bad, Quality::Bad),
    ] {
        let mut input = float("d", "m", quality as i64, 5.0);
        input.quality = quality;
        let outcome = pipeline.process(input, 0);
        let (reading, flags) = accepted(&outcome);
        assert_eq!(reading.quality, expected);
        assert!(flags.contains(Flag::OutOfRange));
    }
}

#[test]
fn clock_skew_is_corrected_after_the_window_agrees() {
    let mut pipeline = pipeline(&format!(
        r#"{QUIET}
        [skew.defaults]
        window = 4
        max_spread_ms = 500
        threshold_ms = 2000
        max_future_ms = 60000
        "#
    ));
    const HOUR: i64 = 3_600_000;
    let start = 1_767_225_600_000;
    // The device's clock is an hour behind; a 30 ms transport delay.
    let mut outcomes = Vec::new();
    for i in 0..6 {
        let now = start + i * 1_000;
        outcomes.push(pipeline.process(float("rtu-3", "temp", now - HOUR, 20.0), now + 30));
    }
    for (i, outcome) in outcomes.iter().enumerate() {
        let (reading, flags) = accepted(outcome);
        let now = start + i as i64 * 1_000;
        if i < 3 {
            assert_eq!(reading.ts_ms, now - HOUR, "{i}: not corrected yet");
            assert!(flags.is_empty());
        } else {
            assert_eq!(reading.ts_ms, now + 30, "{i}: corrected");
            assert_eq!(flags, Flags::from(Flag::ClockCorrected));
            assert_eq!(reading.quality, Quality::Uncertain);
        }
    }
    assert_eq!(
        pipeline.clock_offset_ms(&DeviceId::new("rtu-3").unwrap()),
        Some(HOUR + 30)
    );

    // The clock is fixed (jumps forward by the hour): corrected by the old estimate, readings
    // land an hour in the future and are quarantined, until the window agrees again.
    let mut verdicts = String::new();
    for i in 6..12 {
        let now = start + i * 1_000;
        let outcome = pipeline.process(float("rtu-3", "temp", now, 20.0), now + 30);
        verdicts.push(match outcome {
            Outcome::Accepted { reading, flags } => {
                assert_eq!(reading.ts_ms, now);
                assert!(flags.is_empty());
                'a'
            }
            Outcome::Rejected(Rejection::Future {
                corrected_ts_ms, ..
            }) => {
                assert_eq!(corrected_ts_ms, now + HOUR + 30);
                'F'
            }
            other => panic!("{other:?}"),
        });
    }
    assert_eq!(verdicts, "FFFaaa");
    assert_eq!(pipeline.counters().skew.future, 3);
    assert_eq!(pipeline.quarantine().len(), 3);
    check_invariants(&pipeline);
}

#[test]
fn the_future_bound_applies_without_correction() {
    let mut pipeline = pipeline(&format!(
        "{QUIET}\n[skew.defaults]\nenabled = false\nmax_future_ms = 1000"
    ));
    assert!(pipeline
        .process(float("d", "m", 2_000, 1.0), 1_000)
        .is_accepted());
    assert!(matches!(
        rejected(&pipeline.process(float("d", "m", 2_001, 1.0), 1_000)),
        Rejection::Future { .. }
    ));
    assert_eq!(
        pipeline.clock_offset_ms(&DeviceId::new("d").unwrap()),
        Some(0)
    );
}

#[test]
fn spikes_are_flagged_or_rejected_per_rule() {
    let mut pipeline = pipeline(
        r#"
        [spike.defaults]
        window = 5
        min_samples = 5
        k = 8.0
        [[spike.rules]]
        metric = "flow"
        action = "reject"
        [anomaly.defaults]
        enabled = false
        "#,
    );
    let values = [20.0, 20.2, 19.9, 20.1, 20.0, 20.1, 35.0, 20.0];
    let mut flagged = Vec::new();
    let mut rejections = Vec::new();
    for (i, &x) in values.iter().enumerate() {
        let ts = i as i64 * 1_000;
        let temp = pipeline.process(float("d", "temp", ts, x), ts);
        flagged.push(accepted(&temp).1.contains(Flag::Spike));
        let flow = pipeline.process(float("d", "flow", ts, x), ts);
        rejections.push(flow.rejection().copied());
    }
    assert_eq!(
        flagged,
        [false, false, false, false, false, false, true, false]
    );
    assert_eq!(rejections.iter().filter(|r| r.is_some()).count(), 1);
    match rejections[6] {
        Some(Rejection::Spike {
            value,
            median,
            deviation,
            threshold,
        }) => {
            assert_eq!((value, median), (35.0, 20.1));
            assert!((deviation - 14.9).abs() < 1e-9);
            assert!((threshold - 0.8).abs() < 1e-9);
        }
        other => panic!("{other:?}"),
    }
    let counters = pipeline.counters();
    assert_eq!((counters.spike.flagged, counters.spike.rejected), (1, 1));
    assert_eq!(counters.spike.warming_up, 10);
    check_invariants(&pipeline);
}

#[test]
fn a_spike_at_the_start_of_a_series_does_not_poison_it() {
    let mut pipeline = pipeline(
        r#"
        [spike.defaults]
        window = 5
        min_samples = 5
        action = "reject"
        [anomaly.defaults]
        enabled = false
        "#,
    );
    let values = [999.0, 20.1, 20.2, 20.0, 20.3, 20.1, 20.2, 20.0, 20.1, 20.2];
    for (i, &x) in values.iter().enumerate() {
        let outcome = pipeline.process(float("d", "temp", i as i64, x), i as i64);
        assert!(outcome.is_accepted(), "{i}: {outcome:?}");
    }
    assert_eq!(pipeline.counters().spike.warming_up, 5);
}

#[test]
fn stuck_floats_are_flagged_and_integers_left_alone() {
    let mut pipeline = pipeline(&format!(
        "{QUIET}\n[stuck.defaults]\nenabled = true\nmax_repeats = 3"
    ));
    let mut flags_f = String::new();
    let mut flags_i = String::new();
    for i in 0..6 {
        let f = pipeline.process(float("d", "temp", i, 21.5), i);
        flags_f.push(if accepted(&f).1.contains(Flag::Stuck) {
            'S'
        } else {
            '.'
        });
        let n = pipeline.process(reading("d", "count", i, Value::I64(7)), i);
        flags_i.push(if accepted(&n).1.contains(Flag::Stuck) {
            'S'
        } else {
            '.'
        });
    }
    assert_eq!(flags_f, "...SSS");
    assert_eq!(flags_i, "......");
    assert_eq!(pipeline.counters().stuck.flagged, 3);
}

#[test]
fn anomalies_are_flagged() {
    let mut pipeline = pipeline(
        r#"
        [spike.defaults]
        enabled = false
        [anomaly.defaults]
        window = 8
        min_samples = 8
        threshold = 3.5
        "#,
    );
    let noise = [0.0, 1.0, -1.0, 2.0, -2.0, 1.0, -1.0, 0.0];
    for (i, &x) in noise.iter().enumerate() {
        let outcome = pipeline.process(float("d", "v", i as i64, 50.0 + x), 0);
        assert!(accepted(&outcome).1.is_empty());
    }
    // Median 50, MAD 1: z = 0.6745 · 6 ≈ 4.05 > 3.5.
    let outcome = pipeline.process(float("d", "v", 8, 56.0), 0);
    assert_eq!(accepted(&outcome).1, Flags::from(Flag::Anomaly));
    let outcome = pipeline.process(float("d", "v", 9, 54.0), 0);
    assert!(accepted(&outcome).1.is_empty());
    let counters = pipeline.counters();
    assert_eq!(counters.anomaly.flagged, 1);
    assert_eq!(counters.anomaly.warming_up, 8);
}

#[test]
fn the_device_marked_bad_skips_the_detectors_and_the_windows() {
    let mut pipeline = pipeline(
        r#"
        [spike.defaults]
        window = 3
        min_samples = 3
        action = "reject"
        "#,
    );
    for i in 0..3 {
        pipeline.process(float("d", "m", i, 1.0 + i as f64 * 0.1), 0);
    }
    let mut bad = float("d", "m", 3, 1e9);
    bad.quality = Quality::Bad;
    let outcome = pipeline.process(bad.clone(), 0);
    assert_eq!(accepted(&outcome).0, &bad);
    let counters = pipeline.counters();
    assert_eq!(counters.windows.skipped, 1);
    assert_eq!(counters.windows.aggregated, 3);
}

#[test]
fn windows_close_on_the_next_window_and_on_the_clock() {
    let mut pipeline = pipeline(
        r#"
        [spike.defaults]
        enabled = false
        [anomaly.defaults]
        enabled = false
        [range.defaults]
        max = 100.0
        action = "flag"
        [windows.defaults]
        length_ms = 60000
        grace_ms = 5000
        [[windows.rules]]
        metric = "all"
        include_uncertain = true
        "#,
    );
    let t0 = 1_767_225_600_000; // a multiple of 60 s
    for (metric, ts, x) in [
        ("temp", t0, 20.0),
        ("temp", t0 + 30_000, 22.0),
        ("temp", t0 + 59_999, 24.0),
        // Flagged out of range: left out of the aggregate by default.
        ("temp", t0 + 59_999 - 1, 500.0),
        ("all", t0 + 1, 500.0),
        ("all", t0 + 2, 1.0),
        // Exactly at the boundary: the next window.
        ("temp", t0 + 60_000, 30.0),
    ] {
        assert!(pipeline
            .process(float("d", metric, ts, x), ts)
            .is_accepted());
    }
    assert_eq!(pipeline.pending_windows(), 1);
    let mut out = Vec::new();
    // The "all" window ends at t0 + 60 s; with grace it is due at t0 + 65 s.
    pipeline.drain_windows(t0 + 64_999, &mut out);
    assert_eq!(out.len(), 1);
    pipeline.drain_windows(t0 + 65_000, &mut out);
    assert_eq!(out.len(), 2);
    let temp = &out[0];
    assert_eq!(temp.metric.as_str(), "temp");
    assert_eq!((temp.start_ms, temp.end_ms), (t0, t0 + 60_000));
    assert_eq!(temp.count, 3);
    assert_eq!(
        (temp.min, temp.max, temp.sum, temp.mean),
        (20.0, 24.0, 66.0, 22.0)
    );
    let all = &out[1];
    assert_eq!(all.metric.as_str(), "all");
    assert_eq!((all.count, all.min, all.max), (2, 1.0, 500.0));

    // Late for the closed window: accepted, counted, not aggregated.
    assert!(pipeline
        .process(float("d", "temp", t0 + 10, 21.0), t0 + 70_000)
        .is_accepted());
    let counters = pipeline.counters();
    assert_eq!(counters.windows.late, 1);
    assert_eq!(counters.windows.skipped, 1);
    assert_eq!(counters.windows.emitted, 2);

    let mut flushed = Vec::new();
    pipeline.flush_windows(&mut flushed);
    assert_eq!(flushed.len(), 1);
    assert_eq!((flushed[0].start_ms, flushed[0].count), (t0 + 60_000, 1));
    let json = serde_json::to_value(&flushed[0]).unwrap();
    assert_eq!(json["device"], "d");
    assert_eq!(json["mean"], 30.0);
}

#[test]
fn an_evicted_series_emits_its_open_window() {
    let mut pipeline = pipeline("max_series = 1");
    pipeline.process(float("d", "a", 0, 1.0), 0);
    pipeline.process(float("d", "b", 0, 2.0), 0);
    // "a" was evicted: its dedupe history went with it, so the resend passes.
    assert!(pipeline.process(float("d", "a", 0, 1.0), 0).is_accepted());
    let counters = pipeline.counters();
    assert_eq!((counters.series.created, counters.series.evicted), (3, 2));
    assert_eq!(counters.series.live, 1);
    let mut out = Vec::new();
    pipeline.drain_windows(i64::MIN, &mut out);
    let names: Vec<_> = out.iter().map(|w| w.metric.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn pending_aggregates_are_bounded_and_drops_counted() {
    let mut pipeline = pipeline(
        r#"
        max_pending_windows = 2
        [windows.defaults]
        length_ms = 10
        "#,
    );
    for i in 0..6 {
        pipeline.process(float("d", "m", i * 10, 1.0), i * 10);
    }
    let counters = pipeline.counters();
    assert_eq!((counters.windows.emitted, counters.windows.dropped), (2, 3));
    let mut out = Vec::new();
    pipeline.drain_windows(0, &mut out);
    assert_eq!(out.len(), 2);
}

#[test]
fn the_device_table_is_bounded_too() {
    let mut pipeline = pipeline(&format!("max_devices = 2\n{QUIET}"));
    for (i, device) in ["a", "b", "c", "a"].into_iter().enumerate() {
        pipeline.process(float(device, "m", i as i64, 1.0), 0);
    }
    let counters = pipeline.counters();
    assert_eq!(counters.devices.live, 2);
    assert_eq!((counters.devices.created, counters.devices.evicted), (4, 2));
    assert_eq!(pipeline.clock_offset_ms(&DeviceId::new("b").unwrap()), None);
}

#[test]
fn the_example_config_is_valid_and_means_what_it_says() {
    let example = include_str!("../../clean-example.toml");
    let config = toml::from_str::<ConfigFile>(example)
        .unwrap_or_else(|e| panic!("clean-example.toml: {e}"))
        .clean;
    let mut pipeline = Pipeline::new(&config).unwrap();
    let now = 1_767_225_600_000;
    let outcome = pipeline.process(float("boiler-1", "temp_f", now, 212.0), now);
    assert_eq!(accepted(&outcome).0.value, Value::F64(100.0));
    let outcome = pipeline.process(reading("boiler-1", "temperature", now, text("hot")), now);
    assert!(matches!(rejected(&outcome), Rejection::WrongKind { .. }));
}

#[test]
fn counters_serialise_for_the_status_view() {
    let mut pipeline = pipeline("");
    pipeline.process(float("d", "m", 0, f64::NAN), 0);
    let json = serde_json::to_value(pipeline.counters()).unwrap();
    assert_eq!(json["input"], 1);
    assert_eq!(json["range"]["non_finite"], 1);
    assert_eq!(json["quarantine"]["len"], 1);
    let snapshot = serde_json::to_value(pipeline.quarantine().snapshot()).unwrap();
    assert_eq!(snapshot["entries"][0]["rejection"]["reason"], "non_finite");
}

/// The defaults on realistic data (daily cycles, drift, fixed-decimal noise, counters, flags,
/// gaps): nothing rejected and very little flagged (16 of 60,000 when written).
#[test]
fn realistic_data_passes_the_defaults() {
    let mut pipeline = Pipeline::new(&CleanConfig::default()).unwrap();
    let fleet = SensorFleet::new(FleetConfig {
        devices: 5,
        jitter_ms: 20,
        ..FleetConfig::default()
    });
    let n = 60_000;
    let mut out = Vec::new();
    for (i, reading) in fleet.take(n).enumerate() {
        let received = reading.ts_ms + 40;
        pipeline.process(reading, received);
        if i % 1_000 == 0 {
            pipeline.drain_windows(received, &mut out);
        }
    }
    let counters = pipeline.counters();
    assert_eq!(counters.rejected, 0, "{counters:#?}");
    assert!(
        counters.accepted_flagged * 1_000 < n as u64,
        "more than 0.1% flagged: {counters:#?}"
    );
    assert!(!out.is_empty());
    assert_eq!(counters.skew.corrected, 0);
    check_invariants(&pipeline);
}

#[derive(Clone, Debug)]
enum Op {
    Process(Reading, i64),
    Drain(i64),
}

fn arbitrary_reading() -> impl Strategy<Value = Reading> {
    let device = prop::sample::select(vec!["d0", "d1", "d2"]);
    let metric = prop::sample::select(vec!["m0", "m1", "m2", "temp_f", "count"]);
    let ts = prop_oneof![4 => 0i64..20_000, 1 => any::<i64>()];
    let value = prop_oneof![
        any::<f64>().prop_map(Value::F64),
        (-100.0f64..100.0).prop_map(Value::F64),
        prop::sample::select(vec![0.0, 1.0, 1.5]).prop_map(Value::F64),
        (0i64..4).prop_map(Value::I64),
        any::<i64>().prop_map(Value::I64),
        any::<bool>().prop_map(Value::Bool),
        "[a-z]{0,4}".prop_map(|s| Value::Str(ShortStr::new(&s).unwrap())),
    ];
    let quality = prop::sample::select(vec![Quality::Good, Quality::Uncertain, Quality::Bad]);
    (device, metric, ts, value, quality).prop_map(|(device, metric, ts_ms, value, quality)| {
        Reading {
            device: DeviceId::new(device).unwrap(),
            metric: MetricName::new(metric).unwrap(),
            ts_ms,
            value,
            quality,
        }
    })
}

fn arbitrary_op() -> impl Strategy<Value = Op> {
    let time = prop_oneof![4 => 0i64..25_000, 1 => any::<i64>()];
    prop_oneof![
        10 => (arbitrary_reading(), time.clone()).prop_map(|(r, t)| Op::Process(r, t)),
        1 => time.prop_map(Op::Drain),
    ]
}

/// Every step on, small limits, so eviction, overflow and every reason happen often.
const EVERYTHING: &str = r#"
max_series = 4
max_devices = 2
max_pending_windows = 3
[quarantine]
capacity = 5
[dedupe.defaults]
history = 3
[[units.rules]]
metric = "temp_f"
from = "degF"
to = "degC"
[[units.rules]]
metric = "count"
scale = 1e300
[[range.rules]]
metric = "m1"
kind = "f64"
min = -50.0
max = 50.0
action = "flag"
[[range.rules]]
metric = "m2"
kind = "number"
min = -10.0
max = 10.0
[skew.defaults]
window = 2
max_spread_ms = 100
threshold_ms = 10
max_future_ms = 1000
[spike.defaults]
window = 3
min_samples = 3
action = "reject"
max_step = 20.0
[stuck.defaults]
enabled = true
max_repeats = 2
max_duration_ms = 1000
[anomaly.defaults]
window = 4
min_samples = 3
[windows.defaults]
length_ms = 1000
grace_ms = 10
[[windows.rules]]
device = "d1"
include_uncertain = true
"#;

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_and_accounts_for_every_reading(
        ops in prop::collection::vec(arbitrary_op(), 0..300),
    ) {
        let mut pipeline = pipeline(EVERYTHING);
        let (mut n_input, mut n_accepted, mut n_rejected) = (0u64, 0u64, 0u64);
        let mut aggregates = Vec::new();
        for op in ops {
            match op {
                Op::Process(input, received_ms) => {
                    n_input += 1;
                    match pipeline.process(input.clone(), received_ms) {
                        Outcome::Accepted { reading, flags } => {
                            n_accepted += 1;
                            prop_assert_eq!(&reading.device, &input.device);
                            prop_assert_eq!(&reading.metric, &input.metric);
                            let expected_quality = match input.quality {
                                Quality::Good if !flags.is_empty() => Quality::Uncertain,
                                quality => quality,
                            };
                            prop_assert_eq!(reading.quality, expected_quality);
                            if let Value::F64(x) = reading.value {
                                prop_assert!(x.is_finite());
                            }
                            if !flags.contains(Flag::ClockCorrected) {
                                prop_assert_eq!(reading.ts_ms, input.ts_ms);
                            }
                        }
                        Outcome::Rejected(_) => n_rejected += 1,
                    }
                }
                Op::Drain(now_ms) => pipeline.drain_windows(now_ms, &mut aggregates),
            }
            prop_assert!(pipeline.pending_windows() <= 3);
            prop_assert!(pipeline.quarantine().len() <= 5);
        }
        pipeline.flush_windows(&mut aggregates);
        let counters = pipeline.counters();
        prop_assert_eq!(counters.input, n_input);
        prop_assert_eq!(counters.accepted, n_accepted);
        prop_assert_eq!(counters.rejected, n_rejected);
        prop_assert_eq!(n_accepted + n_rejected, n_input);
        check_invariants(&pipeline);
        prop_assert!(counters.series.live <= 4 && counters.devices.live <= 2);
        prop_assert_eq!(counters.windows.emitted, aggregates.len() as u64);
        if counters.windows.dropped == 0 {
            let aggregated: u64 = aggregates.iter().map(|a| a.count).sum();
            prop_assert_eq!(aggregated, counters.windows.aggregated);
        }
        for aggregate in &aggregates {
            prop_assert!(aggregate.count >= 1);
            prop_assert!(aggregate.min <= aggregate.max);
            prop_assert_eq!(aggregate.end_ms - aggregate.start_ms, 1000);
            prop_assert_eq!(aggregate.start_ms.rem_euclid(1000), 0);
        }
    }
}

/// Counts allocations made by the current thread, so tests running in parallel do not disturb
/// each other's counts. Passes everything through to the system allocator.
mod counting_allocator {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Counting;

    thread_local! {
        static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    }

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
            // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on unchanged.
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from `System.alloc` with this layout, through `alloc` above.
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
            // SAFETY: as for `alloc` and `dealloc`.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    pub fn allocations() -> u64 {
        ALLOCATIONS.with(Cell::get)
    }
}

#[global_allocator]
static ALLOCATOR: counting_allocator::Counting = counting_allocator::Counting;

#[test]
fn the_hot_path_does_not_allocate_once_series_exist() {
    // Every step on; day-long windows so none closes during the measurement.
    let mut pipeline = pipeline(
        r#"
        [[units.rules]]
        metric = "temp_f"
        from = "degF"
        to = "degC"
        [[range.rules]]
        metric = "temp*"
        kind = "f64"
        min = -50.0
        max = 150.0
        [stuck.defaults]
        enabled = true
        [windows.defaults]
        length_ms = 86400000
        "#,
    );
    let devices: Vec<DeviceId> = (0..4)
        .map(|i| DeviceId::new(&format!("dev-{i}")).unwrap())
        .collect();
    let metrics: Vec<MetricName> = ["temp_f", "temperature", "power"]
        .iter()
        .map(|m| MetricName::new(m).unwrap())
        .collect();
    let start = 1_767_225_600_000; // a day boundary
    let make = |i: i64, device: &DeviceId, metric: &MetricName| Reading {
        device: device.clone(),
        metric: metric.clone(),
        ts_ms: start + i * 1_000,
        value: Value::F64(70.0 + ((i * 7919) % 13) as f64 * 0.1),
        quality: Quality::Good,
    };
    let feed = |pipeline: &mut Pipeline, from: i64, to: i64| {
        for i in from..to {
            for device in &devices {
                for metric in &metrics {
                    let reading = make(i, device, metric);
                    let received = reading.ts_ms + 25;
                    // A resend of every tenth reading: rejected as a duplicate, not stored.
                    let resend = (i % 10 == 0).then(|| reading.clone());
                    assert!(pipeline.process(reading, received).is_accepted());
                    if let Some(resend) = resend {
                        pipeline.process(resend, received + 5);
                    }
                }
            }
        }
    };
    let before = counting_allocator::allocations();
    feed(&mut pipeline, 0, 100);
    assert!(
        counting_allocator::allocations() > before,
        "creating the series allocates, so the counter works"
    );
    let before = counting_allocator::allocations();
    feed(&mut pipeline, 100, 1_100);
    let allocations = counting_allocator::allocations() - before;
    let counters = pipeline.counters();
    assert_eq!(counters.dedupe.duplicates, 110 * 12);
    assert!(counters.units.converted > 0 && counters.stuck.passed > 0);
    assert_eq!(
        allocations, 0,
        "{allocations} allocations for 13,200 readings"
    );
}

/// Throughput with the default config on realistic data. Not a pass/fail test: run it optimised,
/// `cargo test -p fieldgate-edge --release --lib clean::tests::throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput() {
    let n = 1_000_000;
    let readings: Vec<Reading> = SensorFleet::new(FleetConfig {
        devices: 200,
        ..FleetConfig::default()
    })
    .take(n)
    .collect();
    let mut pipeline = Pipeline::new(&CleanConfig::default()).unwrap();
    let mut aggregates = Vec::new();
    let started = std::time::Instant::now();
    for (i, reading) in readings.into_iter().enumerate() {
        let received = reading.ts_ms + 30;
        std::hint::black_box(pipeline.process(reading, received));
        if i % 10_000 == 0 {
            pipeline.drain_windows(received, &mut aggregates);
            aggregates.clear();
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{n} readings in {elapsed:?}: {:.0} readings/s",
        n as f64 / elapsed.as_secs_f64()
    );
    check_invariants(&pipeline);
}
