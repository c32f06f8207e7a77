//! The journal writer: the one task that appends to the journal. It gathers what ingress hands
//! it into group commits (what arrives while the previous flush runs, up to a size), appends
//! each group as one chunk, flushes, and only then tells every sender its readings are durable,
//! which is when devices get their ACKs.

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
    /// How long an idle writer lets a first message wait for others before flushing (zero:
    /// at once). Under load it does not apply: groups gather while the previous flush runs.
    pub linger: Duration,
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
///
/// One flush runs at a time, on the blocking pool; whatever arrives meanwhile gathers into the
/// next group, which is flushed the moment the running one ends. Under load the groups grow by
/// themselves and no reading waits on a timer; an idle writer flushes a lone message at once
/// (or after `group_commit.linger`, when set).
pub async fn run_writer<J: JournalStore + 'static>(
    journal: Arc<Mutex<J>>,
    pipeline: Arc<Mutex<Pipeline>>,
    mut input: mpsc::Receiver<JournalInput>,
    group_commit: GroupCommit,
    stats: Arc<WriterStats>,
) {
    let mut next = Group::default();
    let mut flushing: Option<Flush> = None;
    let mut open = true;
    loop {
        let Some(flush) = flushing.as_mut() else {
            if !next.readings.is_empty() || !next.commits.is_empty() {
                flushing = Some(start_flush(&journal, &pipeline, &stats, &mut next));
                continue;
            }
            if !open {
                return;
            }
            match input.recv().await {
                Some(first) => next.take(first),
                None => open = false,
            }
            if open && !group_commit.linger.is_zero() {
                let deadline = tokio::time::Instant::now() + group_commit.linger;
                while next.readings.len() < group_commit.max_readings {
                    match tokio::time::timeout_at(deadline, input.recv()).await {
                        Ok(Some(more)) => next.take(more),
                        Ok(None) => {
                            open = false;
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
            open &= next.gather_ready(&mut input, group_commit.max_readings);
            continue;
        };
        let room = next.readings.len() < group_commit.max_readings;
        tokio::select! {
            done = &mut flush.task => {
                let result = done.expect("the journal task does not panic");
                let flush = flushing.take().expect("a flush is running");
                finish_flush(flush, result, &stats);
            }
            more = input.recv(), if open && room => match more {
                Some(more) => next.take(more),
                None => open = false,
            },
        }
    }
}

/// Readings waiting for their flush, and the senders to tell.
#[derive(Default)]
struct Group {
    readings: Vec<Reading>,
    commits: Vec<oneshot::Sender<CommitOutcome>>,
}

impl Group {
    fn take(&mut self, input: JournalInput) {
        self.readings.extend(input.readings);
        self.commits.extend(input.commit);
    }

    /// Takes what is already queued, up to `max_readings`; false once every sender is gone.
    fn gather_ready(
        &mut self,
        input: &mut mpsc::Receiver<JournalInput>,
        max_readings: usize,
    ) -> bool {
        while self.readings.len() < max_readings {
            match input.try_recv() {
                Ok(more) => self.take(more),
                Err(mpsc::error::TryRecvError::Empty) => return true,
                Err(mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
        true
    }
}

/// A group being appended and flushed.
struct Flush {
    task: tokio::task::JoinHandle<Result<(), JournalError>>,
    commits: Vec<oneshot::Sender<CommitOutcome>>,
    readings: u64,
    started: Instant,
}

fn start_flush<J: JournalStore + 'static>(
    journal: &Arc<Mutex<J>>,
    pipeline: &Arc<Mutex<Pipeline>>,
    stats: &WriterStats,
    group: &mut Group,
) -> Flush {
    stats
        .readings_in
        .fetch_add(group.readings.len() as u64, Relaxed);
    let received_ms = now_unix_ms();
    let accepted: Vec<Reading> = {
        let mut pipeline = pipeline.lock().unwrap_or_else(|e| e.into_inner());
        group
            .readings
            .drain(..)
            .filter_map(|reading| match pipeline.process(reading, received_ms) {
                Outcome::Accepted { reading, .. } => Some(reading),
                Outcome::Rejected(_) => None,
            })
            .collect()
    };
    let readings = accepted.len() as u64;
    let journal = journal.clone();
    // sled blocks on I/O: keep it off the async workers.
    let task = tokio::task::spawn_blocking(move || {
        // Appended under the journal's lock, flushed after letting go of it: the uplink and
        // the status API read the journal meanwhile.
        let flush = {
            let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
            journal.append(&accepted)?;
            journal.flusher()
        };
        flush()
    });
    Flush {
        task,
        commits: std::mem::take(&mut group.commits),
        readings,
        started: Instant::now(),
    }
}

fn finish_flush(flush: Flush, result: Result<(), JournalError>, stats: &WriterStats) {
    let n = flush.readings;
    let outcome = match result {
        Ok(()) => {
            let micros = flush.started.elapsed().as_micros() as u64;
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
    for commit in flush.commits {
        let _ = commit.send(outcome);
    }
}

fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
