//! The journal writer: the one task that appends to the journal. It gathers what ingress hands
//! it into group commits (by time and size), appends each group as one chunk, flushes, and only
//! then tells every sender its readings are durable, which is when devices get their ACKs.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fieldgate_firmware_bridge::session::CommitOutcome;
use fieldgate_shared::Reading;
use tokio::sync::{mpsc, oneshot};

use crate::clean::{Outcome, Pipeline};
use crate::journal::{JournalError, JournalStore};

/// Readings from one ingress message, and where to say whether they are durable (`None` for
/// sources that cannot be told, such as a Modbus poll).
#[derive(Debug)]
pub struct JournalInput {
    pub readings: Vec<Reading>,
    pub commit: Option<oneshot::Sender<CommitOutcome>>,
}

#[derive(Clone, Copy, Debug)]
pub struct GroupCommit {
    /// The longest the first reading of a group waits for its flush.
    pub interval: Duration,
    /// A group is flushed as soon as it holds this many readings.
    pub max_readings: usize,
}

/// Counters of the writer, for `/metrics`.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub readings_in: AtomicU64,
    pub readings_durable: AtomicU64,
    pub groups: AtomicU64,
    pub refused_full: AtomicU64,
    pub failures: AtomicU64,
    /// Sum and maximum of append-and-flush times, in microseconds.
    pub flush_micros_sum: AtomicU64,
    pub flush_micros_max: AtomicU64,
}

/// Runs until every sender of `input` is gone, then returns after the last group is durable.
/// Every reading goes through the cleaning `pipeline` first: what it rejects is counted and kept
/// in its quarantine, never journaled, and still acknowledged (resending would not change it).
pub async fn run_writer<J: JournalStore + 'static>(
    journal: Arc<Mutex<J>>,
    pipeline: Arc<Mutex<Pipeline>>,
    mut input: mpsc::Receiver<JournalInput>,
    group_commit: GroupCommit,
    stats: Arc<WriterStats>,
) {
    let mut readings: Vec<Reading> = Vec::new();
    let mut commits: Vec<oneshot::Sender<CommitOutcome>> = Vec::new();
    while let Some(first) = input.recv().await {
        let deadline = tokio::time::Instant::now() + group_commit.interval;
        take(first, &mut readings, &mut commits);
        while readings.len() < group_commit.max_readings {
            match tokio::time::timeout_at(deadline, input.recv()).await {
                Ok(Some(more)) => take(more, &mut readings, &mut commits),
                Ok(None) | Err(_) => break,
            }
        }
        stats.readings_in.fetch_add(readings.len() as u64, Relaxed);
        let received_ms = now_unix_ms();
        let group: Vec<Reading> = {
            let mut pipeline = pipeline.lock().unwrap_or_else(|e| e.into_inner());
            readings
                .drain(..)
                .filter_map(|reading| match pipeline.process(reading, received_ms) {
                    Outcome::Accepted { reading, .. } => Some(reading),
                    Outcome::Rejected(_) => None,
                })
                .collect()
        };
        let n = group.len() as u64;
        let journal = journal.clone();
        let started = Instant::now();
        // sled blocks on I/O: keep it off the async workers.
        let result = tokio::task::spawn_blocking(move || {
            let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
            journal.append(&group).and_then(|_| journal.flush())
        })
        .await
        .expect("the journal task does not panic");
        let outcome = match result {
            Ok(()) => {
                let micros = started.elapsed().as_micros() as u64;
                stats.flush_micros_sum.fetch_add(micros, Relaxed);
                stats.flush_micros_max.fetch_max(micros, Relaxed);
                stats.readings_durable.fetch_add(n, Relaxed);
                stats.groups.fetch_add(1, Relaxed);
                CommitOutcome::Durable
            }
            Err(JournalError::Full { .. }) => {
                stats.refused_full.fetch_add(n, Relaxed);
                CommitOutcome::Busy
            }
            Err(err) => {
                stats.failures.fetch_add(1, Relaxed);
                tracing::error!(error = %err, readings = n, "journal write failed; devices will resend");
                CommitOutcome::Busy
            }
        };
        for commit in commits.drain(..) {
            let _ = commit.send(outcome);
        }
    }
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn take(
    input: JournalInput,
    readings: &mut Vec<Reading>,
    commits: &mut Vec<oneshot::Sender<CommitOutcome>>,
) {
    readings.extend(input.readings);
    commits.extend(input.commit);
}
