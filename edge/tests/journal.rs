//! The journal against a simple in-memory model, and its quota, corruption and restart paths.

use std::path::Path;

use fieldgate_edge::journal::{
    Journal, JournalConfig, JournalError, JournalStore, MemoryJournal, OverflowPolicy,
};
use fieldgate_shared::generate::{FleetConfig, SensorFleet};
use fieldgate_shared::Reading;
use proptest::prelude::*;

const TARGETS: [&str; 3] = ["private", "public", "archive"];

fn config(path: &Path, quota_bytes: u64, overflow: OverflowPolicy) -> JournalConfig {
    JournalConfig {
        path: path.join("journal"),
        targets: TARGETS.iter().map(|t| t.to_string()).collect(),
        quota_bytes,
        overflow,
        compaction_slack_bytes: 256 * 1024,
    }
}

fn readings(n: usize, seed: u64) -> Vec<Reading> {
    SensorFleet::new(FleetConfig {
        seed,
        devices: 3,
        ..FleetConfig::default()
    })
    .take(n)
    .collect()
}

#[derive(Clone, Debug)]
enum Op {
    Append(usize),
    Flush,
    Ack { target: usize, fraction: f64 },
    Read { target: usize, max: usize },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..80).prop_map(Op::Append),
        1 => Just(Op::Flush),
        3 => (0..TARGETS.len(), 0.0f64..1.2).prop_map(|(target, fraction)| Op::Ack { target, fraction }),
        3 => (0..TARGETS.len(), 1usize..200).prop_map(|(target, max)| Op::Read { target, max }),
        1 => Just(Op::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The sled journal and the in-memory reference model take the same operations, through the
    /// same storage trait, and must always agree.
    #[test]
    fn the_journal_agrees_with_a_model(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let open = || Journal::open(config(dir.path(), u64::MAX, OverflowPolicy::PushBack)).unwrap().0;
        let targets: Vec<String> = TARGETS.iter().map(|t| t.to_string()).collect();
        let mut journal = open();
        let mut model = MemoryJournal::new(&targets);
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Append(n) => {
                    let batch = readings(n, i as u64);
                    prop_assert_eq!(journal.append(&batch).unwrap(), model.append(&batch).unwrap());
                }
                Op::Flush => JournalStore::flush(&mut journal).unwrap(),
                Op::Ack { target, fraction } => {
                    let cursor = model.next_seq() - model.backlog(TARGETS[target]).unwrap();
                    let through = cursor + ((model.next_seq() - cursor) as f64 * fraction) as u64;
                    let through = through.saturating_sub(1);
                    journal.ack(TARGETS[target], through).unwrap();
                    model.ack(TARGETS[target], through).unwrap();
                }
                Op::Read { target, max } => {
                    prop_assert_eq!(
                        journal.read(TARGETS[target], max).unwrap(),
                        model.read(TARGETS[target], max).unwrap()
                    );
                }
                Op::Restart => {
                    journal.flush().unwrap();
                    drop(journal);
                    journal = open();
                }
            }
            prop_assert_eq!(JournalStore::next_seq(&journal), model.next_seq());
            for target in TARGETS {
                prop_assert_eq!(JournalStore::backlog(&journal, target), model.backlog(target));
            }
            // Whole chunks leave the disk, so the journal may hold a little more than the model.
            prop_assert!(journal.readings_held() >= model.readings_held());
        }
    }
}

#[test]
fn drop_oldest_keeps_collecting_and_counts_what_it_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) =
        Journal::open(config(dir.path(), 20_000, OverflowPolicy::DropOldest)).unwrap();
    for i in 0..200 {
        journal.append(&readings(100, i)).unwrap();
    }
    journal.flush().unwrap();
    let stats = journal.stats();
    assert!(journal.held_bytes() <= 20_000);
    assert!(stats.readings_dropped_for_quota > 10_000, "{stats:?}");
    // Every target lost the same oldest readings and reads on from the oldest one held.
    let oldest_held = journal.next_seq() - journal.readings_held();
    let first = journal.read("public", 1).unwrap();
    assert_eq!(first[0].0, oldest_held);
    assert_eq!(stats.readings_dropped_for_quota, oldest_held - 1);
}

#[test]
fn push_back_refuses_when_full_and_accepts_again_once_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) =
        Journal::open(config(dir.path(), 20_000, OverflowPolicy::PushBack)).unwrap();
    let mut appended = 0u64;
    let err = loop {
        match journal.append(&readings(100, appended)) {
            Ok(_) => appended += 100,
            Err(err) => break err,
        }
    };
    assert!(matches!(err, JournalError::Full { .. }), "{err}");
    assert_eq!(journal.stats().appends_refused_full, 1);
    assert_eq!(journal.stats().readings_dropped_for_quota, 0);
    // Nothing stored was lost: every target still reads all of it.
    assert_eq!(
        journal.read("archive", usize::MAX).unwrap().len() as u64,
        appended
    );
    for target in TARGETS {
        journal.ack(target, appended).unwrap();
    }
    assert_eq!(journal.held_bytes(), 0);
    journal.append(&readings(100, 1)).unwrap();
}

#[test]
fn a_slow_target_holds_entries_and_a_fast_one_is_not_held_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) =
        Journal::open(config(dir.path(), u64::MAX, OverflowPolicy::PushBack)).unwrap();
    journal.append(&readings(500, 1)).unwrap();
    journal.append(&readings(500, 2)).unwrap();
    journal.ack("private", 1_000).unwrap();
    journal.ack("archive", 1_000).unwrap();
    assert_eq!(journal.backlog("private"), Some(0));
    assert_eq!(journal.backlog("public"), Some(1_000));
    assert!(journal.read("private", 10).unwrap().is_empty());
    assert_eq!(journal.read("public", 10_000).unwrap().len(), 1_000);
    assert_eq!(journal.readings_held(), 1_000);
    journal.ack("public", 500).unwrap();
    assert_eq!(journal.readings_held(), 500);
    assert!(matches!(
        journal.ack("nobody", 1),
        Err(JournalError::UnknownTarget(_))
    ));
}

#[test]
fn cursors_and_entries_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let batch = readings(300, 9);
    {
        let (mut journal, _) =
            Journal::open(config(dir.path(), u64::MAX, OverflowPolicy::PushBack)).unwrap();
        journal.append(&batch).unwrap();
        journal.ack("public", 100).unwrap();
        journal.flush().unwrap();
    }
    let (mut journal, report) =
        Journal::open(config(dir.path(), u64::MAX, OverflowPolicy::PushBack)).unwrap();
    assert_eq!(report.moved_aside, None);
    assert_eq!(report.readings_held, 300);
    assert_eq!(journal.next_seq(), 301);
    let public = journal.read("public", usize::MAX).unwrap();
    assert_eq!(public.first().map(|(seq, _)| *seq), Some(101));
    assert_eq!(
        public.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
        batch[100..]
    );
}

#[test]
fn a_corrupt_store_is_moved_aside_and_a_new_one_started() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut journal, _) =
            Journal::open(config(dir.path(), u64::MAX, OverflowPolicy::PushBack)).unwrap();
        journal.append(&readings(1_000, 1)).unwrap();
        journal.flush().unwrap();
    }
    // Scribble over every file of the store, as a failing SD card might.
    for entry in walk(&dir.path().join("journal")) {
        let len = std::fs::metadata(&entry).unwrap().len() as usize;
        std::fs::write(&entry, vec![0xa5; len.max(64)]).unwrap();
    }
    let (mut journal, report) =
        Journal::open(config(dir.path(), u64::MAX, OverflowPolicy::PushBack)).unwrap();
    let aside = report
        .moved_aside
        .expect("the corrupt store is moved aside");
    assert!(aside.exists(), "{}", aside.display());
    assert_eq!(journal.readings_held(), 0);
    journal.append(&readings(10, 2)).unwrap();
    journal.flush().unwrap();
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// A journal that has taken 400 groups of 1,000 readings, each flushed: enough files for
/// acknowledging them to make it compact.
fn journal_of_400_flushed_groups(dir: &Path) -> Journal {
    let (mut journal, _) = Journal::open(config(dir, u64::MAX, OverflowPolicy::PushBack)).unwrap();
    for i in 0..400 {
        journal.append(&readings(1_000, i)).unwrap();
        journal.flush().unwrap();
    }
    journal
}

#[test]
fn space_comes_back_once_a_backlog_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = journal_of_400_flushed_groups(dir.path());
    let full = disk_usage(&dir.path().join("journal"));
    for target in TARGETS {
        journal.ack(target, journal.next_seq() - 1).unwrap();
    }
    // A live backlog of 1,000 readings remains.
    journal.append(&readings(1_000, 999)).unwrap();
    journal.flush().unwrap();
    let live = journal.held_bytes();
    let after = disk_usage(&dir.path().join("journal"));
    eprintln!("full {full} bytes, after acknowledging {after} bytes, live {live} bytes");
    // sled keeps one 512 KiB segment however little it holds: that is the floor.
    assert!(
        after <= 2 * live + 600 * 1024,
        "disk {after} bytes for {live} live bytes"
    );
    assert_eq!(journal.stats().compactions, 1);
    // Nothing live was lost in the rewrite.
    assert_eq!(journal.read("public", usize::MAX).unwrap().len(), 1_000);
}

#[test]
fn an_interrupted_compaction_is_finished_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let batch = readings(500, 4);
    {
        let (mut journal, _) =
            Journal::open(config(dir.path(), u64::MAX, OverflowPolicy::PushBack)).unwrap();
        journal.append(&batch).unwrap();
        journal.flush().unwrap();
    }
    // A crash after the first rename: only `<path>.old`... and the flushed `<path>.compact`.
    let path = dir.path().join("journal");
    copy_dir(&path, &dir.path().join("journal.compact"));
    std::fs::rename(&path, dir.path().join("journal.old")).unwrap();
    let (mut journal, report) =
        Journal::open(config(dir.path(), u64::MAX, OverflowPolicy::PushBack)).unwrap();
    assert_eq!(report.moved_aside, None);
    assert_eq!(journal.read("private", usize::MAX).unwrap().len(), 500);
    assert!(!dir.path().join("journal.old").exists());
    assert!(!dir.path().join("journal.compact").exists());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn disk_usage(dir: &Path) -> u64 {
    walk(dir)
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum()
}

/// What a target with routing rules reads: only the readings its rule selects, at most `max` of
/// them, looking no further than the scan limit, with the range it covered (so the uplink can
/// move its cursor over what it looked at) and where the journal's readings actually start.
#[test]
fn a_selective_read_stops_at_its_limits_and_says_what_it_covered() {
    let dir = tempfile::tempdir().unwrap();
    let (mut journal, _) =
        Journal::open(config(dir.path(), u64::MAX, OverflowPolicy::PushBack)).unwrap();
    let all = readings(300, 7);
    journal.append(&all[..100]).unwrap();
    journal.append(&all[100..]).unwrap();
    let device = all[0].device.clone();
    let theirs = |from: u64| {
        all.iter()
            .enumerate()
            .map(|(i, r)| (i as u64 + 1, r))
            .filter(|(seq, r)| *seq >= from && r.device == device)
            .collect::<Vec<_>>()
    };

    // Enough to find: stops at the fifth selected reading.
    let found = journal
        .read_selected(50, 5, usize::MAX, |r| r.device == device)
        .unwrap()
        .unwrap();
    let expected = theirs(50);
    assert_eq!(found.readings.len(), 5);
    assert_eq!(found.first_seq, 50);
    assert_eq!(found.last_seq, expected[4].0);
    for ((seq, reading), (want_seq, want)) in found.readings.iter().zip(&expected) {
        assert_eq!(
            (seq, &reading.metric, reading.ts_ms),
            (want_seq, &want.metric, want.ts_ms)
        );
    }

    // The scan limit ends the read across chunk boundaries, covering exactly what it looked at.
    let found = journal
        .read_selected(90, 1_000, 40, |r| r.device == device)
        .unwrap()
        .unwrap();
    assert_eq!((found.first_seq, found.last_seq), (90, 129));
    assert_eq!(
        found
            .readings
            .iter()
            .map(|(seq, _)| *seq)
            .collect::<Vec<_>>(),
        theirs(90)
            .iter()
            .map(|(seq, _)| *seq)
            .filter(|seq| *seq <= 129)
            .collect::<Vec<_>>()
    );

    // Nothing selected still reports the range covered; nothing held reports None.
    let none = journal
        .read_selected(1, 10, 25, |_| false)
        .unwrap()
        .unwrap();
    assert!(none.readings.is_empty());
    assert_eq!((none.first_seq, none.last_seq), (1, 25));
    assert!(journal
        .read_selected(301, 10, 10, |_| true)
        .unwrap()
        .is_none());

    // Readings acknowledged by every target are gone: the read says where the journal resumes.
    for target in TARGETS {
        journal.ack(target, 100).unwrap();
    }
    let after_gap = journal
        .read_selected(1, 10, 100, |_| true)
        .unwrap()
        .unwrap();
    assert_eq!(after_gap.first_seq, 101);
}

/// The writer flushes after letting go of the journal, so a compaction can swap the store while
/// a flush taken before it is still to run: that flush still succeeds, and what was appended
/// before and after is all there after a restart.
#[test]
fn a_flush_taken_before_a_compaction_runs_after_it_safely() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = journal_of_400_flushed_groups(dir.path());
    journal.append(&readings(1_000, 500)).unwrap();
    let flush = journal.flusher();
    // Every target acknowledges all but the last group: the files outgrow the live data and
    // the journal compacts.
    for target in TARGETS {
        journal.ack(target, journal.next_seq() - 1_001).unwrap();
    }
    assert_eq!(journal.stats().compactions, 1);
    flush().unwrap();
    journal.append(&readings(1_000, 501)).unwrap();
    journal.flusher()().unwrap();
    assert!(journal.stats().flushes >= 402);
    let next_seq = journal.next_seq();
    drop(journal);
    let (mut journal, report) =
        Journal::open(config(dir.path(), u64::MAX, OverflowPolicy::PushBack)).unwrap();
    assert!(report.moved_aside.is_none());
    assert_eq!(journal.next_seq(), next_seq);
    let held = journal.read("private", usize::MAX).unwrap();
    assert_eq!(held.len(), 2_000);
    assert_eq!(held[0].0, next_seq - 2_000);
}
