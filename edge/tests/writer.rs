//! The journal writer under load with a journal that reaches its quota: each overflow policy
//! holds, every sender hears the truth, and the counters say what happened.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldgate_edge::clean::{CleanConfig, Pipeline};
use fieldgate_edge::journal::{Journal, JournalConfig, OverflowPolicy};
use fieldgate_edge::writer::{run_writer, GroupCommit, JournalInput, WriterStats};
use fieldgate_firmware_bridge::session::CommitOutcome;
use fieldgate_shared::generate::{FleetConfig, SensorFleet};
use fieldgate_shared::Reading;
use tokio::sync::{mpsc, oneshot};

struct Run {
    outcomes: Vec<(Vec<Reading>, CommitOutcome)>,
    journal: Arc<Mutex<Journal>>,
    stats: Arc<WriterStats>,
    _dir: tempfile::TempDir,
}

/// The writer on `journal` with the cleaning pipeline's defaults, fed through a channel of
/// `capacity` messages.
fn spawn_writer<J: fieldgate_edge::journal::JournalStore + 'static>(
    journal: Arc<Mutex<J>>,
    capacity: usize,
    group_commit: GroupCommit,
) -> (
    mpsc::Sender<JournalInput>,
    tokio::task::JoinHandle<()>,
    Arc<WriterStats>,
) {
    // The generated readings are from January: no clock-skew correction of them here.
    let clean: CleanConfig = toml::from_str("[skew.defaults]\nenabled = false\n").unwrap();
    let pipeline = Arc::new(Mutex::new(Pipeline::new(&clean).unwrap()));
    let stats = Arc::new(WriterStats::default());
    let (input_tx, input) = mpsc::channel(capacity);
    let writer = tokio::spawn(run_writer(
        journal,
        pipeline,
        input,
        group_commit,
        stats.clone(),
    ));
    (input_tx, writer, stats)
}

/// 400 messages of 50 readings from 8 senders at once into a journal with a 40 kB quota.
async fn run(policy: OverflowPolicy) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(JournalConfig {
        path: dir.path().join("journal"),
        targets: vec!["cloud".into()],
        quota_bytes: 40_000,
        overflow: policy,
        compaction_slack_bytes: 1 << 20,
    })
    .unwrap();
    let journal = Arc::new(Mutex::new(journal));
    let (input_tx, writer, stats) = spawn_writer(
        journal.clone(),
        64,
        GroupCommit {
            linger: Duration::from_millis(2),
            max_readings: 500,
        },
    );
    let readings: Vec<Reading> = SensorFleet::new(FleetConfig {
        devices: 8,
        ..FleetConfig::default()
    })
    .take(20_000)
    .collect();
    let mut senders = Vec::new();
    for (sender, share) in readings.chunks(2_500).enumerate() {
        let input_tx = input_tx.clone();
        let share = share.to_vec();
        senders.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for message in share.chunks(50) {
                let (commit, outcome) = oneshot::channel();
                input_tx
                    .send(JournalInput {
                        readings: message.to_vec(),
                        commit: Some(commit),
                    })
                    .await
                    .unwrap();
                outcomes.push((message.to_vec(), outcome.await.unwrap()));
            }
            let _ = sender;
            outcomes
        }));
    }
    drop(input_tx);
    let mut outcomes = Vec::new();
    for sender in senders {
        outcomes.extend(sender.await.unwrap());
    }
    writer.await.unwrap();
    Run {
        outcomes,
        journal,
        stats,
        _dir: dir,
    }
}

fn journaled(journal: &Arc<Mutex<Journal>>) -> Vec<Reading> {
    let mut journal = journal.lock().unwrap();
    journal
        .read_from(1, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_back_refuses_what_does_not_fit_and_loses_nothing_it_accepted() {
    let run = run(OverflowPolicy::PushBack).await;
    let durable: Vec<&Reading> = run
        .outcomes
        .iter()
        .filter(|(_, outcome)| *outcome == CommitOutcome::Durable)
        .flat_map(|(readings, _)| readings)
        .collect();
    let busy = run
        .outcomes
        .iter()
        .filter(|(_, outcome)| *outcome == CommitOutcome::Busy)
        .count();
    assert!(busy > 0, "the quota must be reached");
    assert!(!durable.is_empty());
    assert!(run.stats.refused_full.load(Relaxed) > 0);
    let journal = run.journal.lock().unwrap();
    assert!(journal.held_bytes() <= 40_000);
    assert_eq!(journal.stats().readings_dropped_for_quota, 0);
    drop(journal);
    let stored = journaled(&run.journal);
    // Everything a sender was told is durable is there, and nothing else (the cleaning
    // pipeline may have lowered a reading's quality to Uncertain, nothing more).
    assert_eq!(stored.len(), durable.len());
    let key = |r: &Reading| {
        (
            r.device.clone(),
            r.metric.clone(),
            r.ts_ms,
            format!("{:?}", r.value),
        )
    };
    let stored: std::collections::HashSet<_> = stored.iter().map(key).collect();
    for reading in durable {
        assert!(
            stored.contains(&key(reading)),
            "{reading:?} is not in the journal"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_accepts_everything_and_counts_what_it_dropped() {
    let run = run(OverflowPolicy::DropOldest).await;
    assert!(run
        .outcomes
        .iter()
        .all(|(_, outcome)| *outcome == CommitOutcome::Durable));
    assert_eq!(run.stats.readings_durable.load(Relaxed), 20_000);
    let journal = run.journal.lock().unwrap();
    let stats = journal.stats();
    assert!(journal.held_bytes() <= 40_000);
    assert!(stats.readings_dropped_for_quota > 0);
    assert_eq!(
        stats.readings_dropped_for_quota + journal.readings_held(),
        20_000,
        "every reading is either held or counted as dropped"
    );
}

/// A journal whose flush takes a while, like fsync on a slow card.
struct SlowFlush(fieldgate_edge::journal::MemoryJournal);

impl fieldgate_edge::journal::JournalStore for SlowFlush {
    fn append(
        &mut self,
        readings: &[Reading],
    ) -> Result<std::ops::Range<u64>, fieldgate_edge::journal::JournalError> {
        self.0.append(readings)
    }
    fn flush(&mut self) -> Result<(), fieldgate_edge::journal::JournalError> {
        std::thread::sleep(Duration::from_millis(30));
        self.0.flush()
    }
    fn flusher(&self) -> fieldgate_edge::journal::Flusher {
        Box::new(|| {
            std::thread::sleep(Duration::from_millis(30));
            Ok(())
        })
    }
    fn read(
        &mut self,
        target: &str,
        max: usize,
    ) -> Result<Vec<(u64, Reading)>, fieldgate_edge::journal::JournalError> {
        self.0.read(target, max)
    }
    fn ack(
        &mut self,
        target: &str,
        through_seq: u64,
    ) -> Result<(), fieldgate_edge::journal::JournalError> {
        self.0.ack(target, through_seq)
    }
    fn backlog(&self, target: &str) -> Option<u64> {
        self.0.backlog(target)
    }
    fn next_seq(&self) -> u64 {
        self.0.next_seq()
    }
}

/// Without a timer, what arrives while a flush runs is the next group: 200 messages sent at
/// once take a handful of flushes, not 200, and every one of them is durable in order of
/// arrival within its sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_arriving_during_a_flush_share_the_next_one() {
    let journal = Arc::new(Mutex::new(SlowFlush(
        fieldgate_edge::journal::MemoryJournal::new(&["cloud".to_string()]),
    )));
    let (input_tx, writer, stats) = spawn_writer(
        journal.clone(),
        1024,
        GroupCommit {
            linger: Duration::ZERO,
            max_readings: 100_000,
        },
    );
    let readings: Vec<Reading> = SensorFleet::new(FleetConfig {
        devices: 4,
        ..FleetConfig::default()
    })
    .take(800)
    .collect();
    let mut outcomes = Vec::new();
    for message in readings.chunks(4) {
        let (commit, outcome) = oneshot::channel();
        input_tx
            .send(JournalInput {
                readings: message.to_vec(),
                commit: Some(commit),
            })
            .await
            .unwrap();
        outcomes.push(outcome);
    }
    for outcome in outcomes {
        assert_eq!(outcome.await.unwrap(), CommitOutcome::Durable);
    }
    drop(input_tx);
    writer.await.unwrap();
    let groups = stats.groups.load(Relaxed);
    assert!(
        (1..=5).contains(&groups),
        "200 messages queued at once took {groups} flushes"
    );
    assert_eq!(stats.readings_durable.load(Relaxed), 800);
    let mut journal = journal.lock().unwrap();
    let stored: Vec<Reading> =
        fieldgate_edge::journal::JournalStore::read(&mut journal.0, "cloud", usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(_, r)| r)
            .collect();
    // The cleaning pipeline may lower a reading's quality, nothing more.
    let key = |r: &Reading| (r.device.clone(), r.metric.clone(), r.ts_ms);
    assert_eq!(
        stored.iter().map(key).collect::<Vec<_>>(),
        readings.iter().map(key).collect::<Vec<_>>(),
        "journaled in the order they arrived"
    );
}
