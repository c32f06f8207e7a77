//! The durable journal: every accepted reading gets a sequence number and is kept on local disk
//! (sled) until every cloud target that needs it has acknowledged it.
//!
//! # Design constraints
//! - Nothing acknowledged to a device may be lost: callers ACK devices only after [`Journal::flush`]
//!   (or a [`Flusher`] taken after the append) returned, which flushes sled explicitly (its 0.34
//!   background flush uses `sync_file_range`, which does not promise durability; see sled issues
//!   1351 and 1452).
//! - Flash wears out: readings are stored in chunks of one group commit each, encoded with the
//!   shared batch codec (about a byte per reading), not one record per reading.
//! - A slow target never blocks another: each target has its own cursor.
//! - The disk is finite: a quota with an explicit [`OverflowPolicy`].
//!
//! # On-disk layout (sled trees)
//! - `chunks`: key = first sequence number of the chunk (u64 big-endian, so keys sort by
//!   sequence), value = a batch in the shared codec's format whose header carries
//!   `first_seq..=last_seq`. Sequence numbers are contiguous across chunks.
//! - `meta`: `next_seq` (u64 BE: the sequence number the next reading gets) and
//!   `cursor/<target>` (u64 BE: the target has acknowledged everything below this).
//!
//! A chunk is removed once every target's cursor is past its last sequence number.
//!
//! # Compaction
//! sled 0.34 does not shrink its files after removals, so a gateway that buffered a long outage
//! would keep the space for ever (peers' buffers have filled SD cards this way). When the files
//! outgrow twice the live chunks plus a slack, the journal copies the live chunks and cursors
//! into `<path>.compact`, flushes it, and swaps it in by renames (`<path>` → `<path>.old`,
//! `<path>.compact` → `<path>`, then deletes `<path>.old`). Opening finishes or undoes an
//! interrupted swap, so a crash at any point loses nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fieldgate_shared::codec::{
    BatchMeta, DecodeError, Decoder, EncodeError, EncodeOptions, Encoder,
};
use fieldgate_shared::{GatewayId, Reading, StreamId};

/// What to do when the journal reaches its quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverflowPolicy {
    /// Remove the oldest chunks, even unsent ones, and count the readings lost: collection goes
    /// on, the oldest data is sacrificed.
    DropOldest,
    /// Refuse new readings ([`JournalError::Full`]): devices keep them (serial devices are NACKed
    /// Busy and resend later), nothing stored is lost.
    PushBack,
}

#[derive(Clone, Debug)]
pub struct JournalConfig {
    pub path: PathBuf,
    /// The cloud targets; each gets a cursor. A target added later starts at the oldest entry
    /// still held; a target removed from the list no longer holds entries back.
    pub targets: Vec<String>,
    pub quota_bytes: u64,
    pub overflow: OverflowPolicy,
    /// sled never gives space back on its own: once its files are larger than twice the live
    /// chunks plus this many bytes (plus what an empty store takes), the journal rewrites itself
    /// into a fresh store.
    pub compaction_slack_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal storage at {path}: {source}")]
    Storage { path: PathBuf, source: sled::Error },
    #[error("journal is full ({used} of {quota} bytes) and its policy is to push back")]
    Full { used: u64, quota: u64 },
    #[error("unknown target {0:?}")]
    UnknownTarget(String),
    #[error("cannot encode a chunk: {0}")]
    Encode(#[from] EncodeError),
    #[error("chunk at sequence {seq} is corrupt: {source}")]
    Corrupt { seq: u64, source: DecodeError },
    #[error("cannot move the corrupt journal at {path} aside: {source}")]
    MoveAside {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Counters of the journal's life, for `/metrics` and `/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct JournalStats {
    pub readings_appended: u64,
    pub chunks_appended: u64,
    pub flushes: u64,
    /// Readings removed unsent under [`OverflowPolicy::DropOldest`].
    pub readings_dropped_for_quota: u64,
    /// Appends refused under [`OverflowPolicy::PushBack`].
    pub appends_refused_full: u64,
    pub chunks_removed: u64,
    pub compactions: u64,
}

/// What opening the journal found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// The store could not be opened and was moved here; a new, empty one took its place. Every
    /// reading in it that was not yet acknowledged by all targets is missing: report loudly.
    pub moved_aside: Option<PathBuf>,
    pub readings_held: u64,
}

/// What [`Journal::read_selected`] found.
#[derive(Debug)]
pub struct Selection {
    /// The selected readings with their sequence numbers.
    pub readings: Vec<(u64, Reading)>,
    /// The first sequence number the journal held from where the read started (greater than
    /// the start when readings there were dropped).
    pub first_seq: u64,
    /// The last sequence number looked at: the last selected one when `max` were found.
    pub last_seq: u64,
}

/// A flush taken from a journal ([`JournalStore::flusher`]) and run without holding it.
pub type Flusher = Box<dyn FnOnce() -> Result<(), JournalError> + Send>;

/// What ingress and the writer need of a journal: the small storage trait the sled [`Journal`]
/// implements, and [`MemoryJournal`], the in-memory reference model it is tested against.
pub trait JournalStore: Send {
    /// Appends readings (one group commit) and returns their sequence numbers; not durable until
    /// [`JournalStore::flush`].
    fn append(&mut self, readings: &[Reading]) -> Result<std::ops::Range<u64>, JournalError>;
    /// Makes everything appended so far durable.
    fn flush(&mut self) -> Result<(), JournalError>;
    /// What makes everything appended so far durable, to run after letting go of the journal:
    /// a flush (an fsync, slow on SD cards) then holds up no reader of the journal.
    fn flusher(&self) -> Flusher;
    /// Up to `max` readings for `target` from its cursor on, with their sequence numbers.
    fn read(&mut self, target: &str, max: usize) -> Result<Vec<(u64, Reading)>, JournalError>;
    /// `target` has everything up to and including `through_seq`.
    fn ack(&mut self, target: &str, through_seq: u64) -> Result<(), JournalError>;
    /// Readings `target` has not acknowledged.
    fn backlog(&self, target: &str) -> Option<u64>;
    /// The sequence number the next reading gets.
    fn next_seq(&self) -> u64;
}

/// The journal's reference model: every reading in memory, a cursor per target, nothing
/// durable. The model-based test runs the same operations on it and on [`Journal`].
#[derive(Debug, Default)]
pub struct MemoryJournal {
    /// Readings still held, the first having sequence number `first_seq`.
    readings: std::collections::VecDeque<Reading>,
    first_seq: u64,
    cursors: BTreeMap<String, u64>,
}

impl MemoryJournal {
    pub fn new(targets: &[String]) -> Self {
        Self {
            readings: Default::default(),
            first_seq: 1,
            cursors: targets.iter().map(|t| (t.clone(), 1)).collect(),
        }
    }

    /// Readings not yet acknowledged by every target.
    pub fn readings_held(&self) -> u64 {
        self.readings.len() as u64
    }
}

impl JournalStore for MemoryJournal {
    fn append(&mut self, readings: &[Reading]) -> Result<std::ops::Range<u64>, JournalError> {
        let start = self.next_seq();
        self.readings.extend(readings.iter().cloned());
        Ok(start..self.next_seq())
    }

    fn flush(&mut self) -> Result<(), JournalError> {
        Ok(())
    }

    fn flusher(&self) -> Flusher {
        Box::new(|| Ok(()))
    }

    fn read(&mut self, target: &str, max: usize) -> Result<Vec<(u64, Reading)>, JournalError> {
        let cursor = *self
            .cursors
            .get(target)
            .ok_or_else(|| JournalError::UnknownTarget(target.to_owned()))?;
        let skip = (cursor - self.first_seq) as usize;
        Ok(self
            .readings
            .iter()
            .skip(skip)
            .take(max)
            .enumerate()
            .map(|(i, r)| (cursor + i as u64, r.clone()))
            .collect())
    }

    fn ack(&mut self, target: &str, through_seq: u64) -> Result<(), JournalError> {
        let next_seq = self.next_seq();
        let cursor = self
            .cursors
            .get_mut(target)
            .ok_or_else(|| JournalError::UnknownTarget(target.to_owned()))?;
        *cursor = (*cursor).max((through_seq + 1).min(next_seq));
        let slowest = self.cursors.values().copied().min().unwrap_or(next_seq);
        while self.first_seq < slowest {
            self.readings.pop_front();
            self.first_seq += 1;
        }
        Ok(())
    }

    fn backlog(&self, target: &str) -> Option<u64> {
        self.cursors.get(target).map(|&c| self.next_seq() - c)
    }

    fn next_seq(&self) -> u64 {
        self.first_seq + self.readings.len() as u64
    }
}

impl JournalStore for Journal {
    fn append(&mut self, readings: &[Reading]) -> Result<std::ops::Range<u64>, JournalError> {
        Journal::append(self, readings)
    }
    fn flush(&mut self) -> Result<(), JournalError> {
        Journal::flush(self)
    }
    fn flusher(&self) -> Flusher {
        Journal::flusher(self)
    }
    fn read(&mut self, target: &str, max: usize) -> Result<Vec<(u64, Reading)>, JournalError> {
        Journal::read(self, target, max)
    }
    fn ack(&mut self, target: &str, through_seq: u64) -> Result<(), JournalError> {
        Journal::ack(self, target, through_seq)
    }
    fn backlog(&self, target: &str) -> Option<u64> {
        Journal::backlog(self, target)
    }
    fn next_seq(&self) -> u64 {
        Journal::next_seq(self)
    }
}

/// The durable journal on sled (see the module docs).
pub struct Journal {
    config: JournalConfig,
    db: sled::Db,
    chunks: sled::Tree,
    meta: sled::Tree,
    next_seq: u64,
    /// Per target: everything below this sequence number is acknowledged.
    cursors: BTreeMap<String, u64>,
    /// Encoded size of every chunk held, by first sequence number.
    chunk_sizes: BTreeMap<u64, u64>,
    held_bytes: u64,
    /// What an empty store takes on disk (sled keeps at least one 512 KiB segment), measured at
    /// open: compaction cannot go below it.
    store_overhead_bytes: u64,
    encoder: Encoder,
    decoder: Decoder,
    stats: JournalStats,
    /// Flushes done, by [`Journal::flush`] or a [`Flusher`] (which runs without the journal).
    flushes: Arc<AtomicU64>,
}

const NEXT_SEQ: &[u8] = b"next_seq";

fn cursor_key(target: &str) -> Vec<u8> {
    format!("cursor/{target}").into_bytes()
}

fn u64_value(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

impl Journal {
    /// Opens the journal at `config.path`, creating it if needed. A store that cannot be opened
    /// is moved aside (never deleted) and replaced by an empty one; the report says so.
    pub fn open(config: JournalConfig) -> Result<(Journal, OpenReport), JournalError> {
        finish_interrupted_compaction(&config.path)?;
        let mut report = OpenReport::default();
        // An I/O error at open is usually the previous owner still letting go of the store (its
        // file lock): wait for it rather than take the store for corrupt.
        let mut opened = Self::open_existing(&config);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while matches!(
            &opened,
            Err(JournalError::Storage {
                source: sled::Error::Io(_),
                ..
            })
        ) && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
            opened = Self::open_existing(&config);
        }
        let journal = match opened {
            Ok(journal) => journal,
            Err(err @ (JournalError::Storage { .. } | JournalError::Corrupt { .. })) => {
                let aside = aside_path(&config.path);
                tracing::error!(error = %err, moved_to = %aside.display(), "journal is corrupt; moving it aside and starting a new one: unsent readings in it are missing");
                std::fs::rename(&config.path, &aside).map_err(|source| {
                    JournalError::MoveAside {
                        path: config.path.clone(),
                        source,
                    }
                })?;
                report.moved_aside = Some(aside);
                Self::open_existing(&config)?
            }
            Err(err) => return Err(err),
        };
        report.readings_held = journal.readings_held();
        Ok((journal, report))
    }

    fn open_existing(config: &JournalConfig) -> Result<Journal, JournalError> {
        let storage = |source| JournalError::Storage {
            path: config.path.clone(),
            source,
        };
        let db = sled_config(&config.path).open().map_err(storage)?;
        let chunks = db.open_tree("chunks").map_err(storage)?;
        let meta = db.open_tree("meta").map_err(storage)?;
        let mut chunk_sizes = BTreeMap::new();
        let mut held_bytes = 0;
        for entry in chunks.iter() {
            let (key, value) = entry.map_err(storage)?;
            let first = u64_value(&key).ok_or(JournalError::Corrupt {
                seq: 0,
                source: DecodeError::Invalid {
                    what: "chunk key",
                    why: "not 8 bytes",
                },
            })?;
            // Checks the header and checksum of every chunk, so corruption is found at start.
            Decoder::header(&value)
                .map_err(|source| JournalError::Corrupt { seq: first, source })?;
            chunk_sizes.insert(first, value.len() as u64);
            held_bytes += value.len() as u64;
        }
        let next_seq = match meta.get(NEXT_SEQ).map_err(storage)? {
            Some(bytes) => u64_value(&bytes).unwrap_or(1),
            None => 1,
        };
        let oldest = chunk_sizes.keys().next().copied().unwrap_or(next_seq);
        let mut cursors = BTreeMap::new();
        for target in &config.targets {
            let cursor = match meta.get(cursor_key(target)).map_err(storage)? {
                Some(bytes) => u64_value(&bytes).unwrap_or(oldest),
                None => oldest,
            };
            cursors.insert(target.clone(), cursor.max(oldest).min(next_seq));
        }
        let mut journal = Journal {
            config: config.clone(),
            db,
            chunks,
            meta,
            next_seq,
            cursors,
            chunk_sizes,
            held_bytes,
            store_overhead_bytes: 0,
            encoder: Encoder::new(EncodeOptions::default())?,
            decoder: Decoder::new(),
            stats: JournalStats::default(),
            flushes: Arc::default(),
        };
        // Targets removed from the configuration no longer hold chunks back.
        journal.remove_acknowledged_chunks()?;
        journal.store_overhead_bytes = journal.size_on_disk().saturating_sub(journal.held_bytes);
        Ok(journal)
    }

    fn storage_error(&self, source: sled::Error) -> JournalError {
        JournalError::Storage {
            path: self.config.path.clone(),
            source,
        }
    }

    /// Appends readings as one chunk (one group commit) and returns their sequence numbers. Not
    /// durable until [`Self::flush`].
    pub fn append(&mut self, readings: &[Reading]) -> Result<std::ops::Range<u64>, JournalError> {
        if readings.is_empty() {
            return Ok(self.next_seq..self.next_seq);
        }
        let first = self.next_seq;
        let last = first + readings.len() as u64 - 1;
        let meta = BatchMeta {
            gateway: GatewayId::new("local").expect("valid name"),
            stream: StreamId::new("journal").expect("valid name"),
            first_seq: first,
            last_seq: last,
        };
        let encoded = self.encoder.encode(&meta, readings)?;
        let size = encoded.len() as u64;
        self.make_room(size)?;
        let mut batch = sled::Batch::default();
        batch.insert(&first.to_be_bytes(), encoded);
        self.chunks
            .apply_batch(batch)
            .map_err(|e| self.storage_error(e))?;
        self.meta
            .insert(NEXT_SEQ, &(last + 1).to_be_bytes())
            .map_err(|e| self.storage_error(e))?;
        self.next_seq = last + 1;
        self.chunk_sizes.insert(first, size);
        self.held_bytes += size;
        self.stats.readings_appended += readings.len() as u64;
        self.stats.chunks_appended += 1;
        Ok(first..last + 1)
    }

    fn make_room(&mut self, size: u64) -> Result<(), JournalError> {
        let quota = self.config.quota_bytes;
        if self.held_bytes + size <= quota {
            return Ok(());
        }
        match self.config.overflow {
            OverflowPolicy::PushBack => {
                self.stats.appends_refused_full += 1;
                Err(JournalError::Full {
                    used: self.held_bytes,
                    quota,
                })
            }
            OverflowPolicy::DropOldest => {
                while self.held_bytes + size > quota {
                    let Some((&first, _)) = self.chunk_sizes.iter().next() else {
                        break;
                    };
                    let end = self.chunk_end(first);
                    let unsent = self
                        .cursors
                        .values()
                        .map(|&cursor| end.saturating_sub(cursor.max(first)))
                        .max()
                        .unwrap_or(0);
                    self.stats.readings_dropped_for_quota += unsent;
                    tracing::warn!(
                        first_seq = first,
                        readings = unsent,
                        "journal over quota: dropping the oldest chunk"
                    );
                    self.remove_chunk(first)?;
                    for cursor in self.cursors.values_mut() {
                        *cursor = (*cursor).max(end);
                    }
                    self.persist_cursors()?;
                }
                Ok(())
            }
        }
    }

    /// One past the last sequence number of the chunk starting at `first`.
    fn chunk_end(&self, first: u64) -> u64 {
        self.chunk_sizes
            .range(first + 1..)
            .next()
            .map_or(self.next_seq, |(&next, _)| next)
    }

    fn remove_chunk(&mut self, first: u64) -> Result<(), JournalError> {
        self.chunks
            .remove(first.to_be_bytes())
            .map_err(|e| self.storage_error(e))?;
        if let Some(size) = self.chunk_sizes.remove(&first) {
            self.held_bytes -= size;
        }
        self.stats.chunks_removed += 1;
        Ok(())
    }

    fn persist_cursors(&self) -> Result<(), JournalError> {
        for (target, cursor) in &self.cursors {
            self.meta
                .insert(cursor_key(target), &cursor.to_be_bytes())
                .map_err(|e| self.storage_error(e))?;
        }
        Ok(())
    }

    /// Makes everything appended so far durable. Acknowledge to devices only after this.
    pub fn flush(&mut self) -> Result<(), JournalError> {
        self.db.flush().map_err(|e| self.storage_error(e))?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// [`Journal::flush`] to run after letting go of the journal. A compaction meanwhile is
    /// harmless: it copies everything appended, flushed, into the new store, and the flusher's
    /// handle keeps the old one open until it is done.
    pub fn flusher(&self) -> Flusher {
        let db = self.db.clone();
        let path = self.config.path.clone();
        let flushes = self.flushes.clone();
        Box::new(move || {
            db.flush()
                .map_err(|source| JournalError::Storage { path, source })?;
            flushes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }

    /// Up to `max` readings for `target` from its cursor on, with their sequence numbers.
    pub fn read(&mut self, target: &str, max: usize) -> Result<Vec<(u64, Reading)>, JournalError> {
        let from = *self
            .cursors
            .get(target)
            .ok_or_else(|| JournalError::UnknownTarget(target.to_owned()))?;
        self.read_from(from, max)
    }

    /// Up to `max` readings from sequence number `from` on.
    pub fn read_from(
        &mut self,
        from: u64,
        max: usize,
    ) -> Result<Vec<(u64, Reading)>, JournalError> {
        Ok(self
            .read_selected(from, max, usize::MAX, |_| true)?
            .map(|selection| selection.readings)
            .unwrap_or_default())
    }

    /// Up to `max` of the readings `keep` selects, from sequence number `from` on, looking at no
    /// more than `scan_limit` readings (whole chunks are decoded). None when the journal holds
    /// nothing from `from` on (or `max` or `scan_limit` is 0).
    pub fn read_selected(
        &mut self,
        from: u64,
        max: usize,
        scan_limit: usize,
        keep: impl Fn(&Reading) -> bool,
    ) -> Result<Option<Selection>, JournalError> {
        let mut selection: Option<Selection> = None;
        let mut scanned = 0usize;
        let done = |selection: &Option<Selection>, scanned: usize| {
            scanned >= scan_limit || selection.as_ref().map_or(0, |s| s.readings.len()) >= max
        };
        // The chunk holding `from` starts at or before it.
        let start = self
            .chunk_sizes
            .range(..=from)
            .next_back()
            .map_or(from, |(&first, _)| first);
        'chunks: for entry in self.chunks.range(start.to_be_bytes()..) {
            if done(&selection, scanned) {
                break; // before decoding a chunk only to stop
            }
            let (key, value) = entry.map_err(|e| self.storage_error(e))?;
            let first = u64_value(&key).unwrap_or(0);
            let batch = self
                .decoder
                .decode(&value)
                .map_err(|source| JournalError::Corrupt { seq: first, source })?;
            for (i, reading) in batch.readings().into_iter().enumerate() {
                let seq = first + i as u64;
                if seq < from {
                    continue;
                }
                if done(&selection, scanned) {
                    break 'chunks;
                }
                let selection = selection.get_or_insert_with(|| Selection {
                    readings: Vec::new(),
                    first_seq: seq,
                    last_seq: seq,
                });
                scanned += 1;
                selection.last_seq = seq;
                if keep(&reading) {
                    selection.readings.push((seq, reading));
                }
            }
        }
        Ok(selection)
    }

    /// Records that `target` has everything up to and including `through_seq`, and removes the
    /// chunks every target has.
    pub fn ack(&mut self, target: &str, through_seq: u64) -> Result<(), JournalError> {
        let next_seq = self.next_seq;
        let cursor = self
            .cursors
            .get_mut(target)
            .ok_or_else(|| JournalError::UnknownTarget(target.to_owned()))?;
        let new_cursor = (through_seq + 1).min(next_seq);
        if new_cursor <= *cursor {
            return Ok(());
        }
        *cursor = new_cursor;
        self.meta
            .insert(cursor_key(target), &new_cursor.to_be_bytes())
            .map_err(|e| self.storage_error(e))?;
        let removed_before = self.stats.chunks_removed;
        self.remove_acknowledged_chunks()?;
        if self.stats.chunks_removed > removed_before && self.needs_compaction() {
            self.compact()?;
        }
        Ok(())
    }

    fn needs_compaction(&self) -> bool {
        self.size_on_disk()
            > self.store_overhead_bytes + 2 * self.held_bytes + self.config.compaction_slack_bytes
    }

    /// Rewrites the live chunks and cursors into a fresh store and swaps it in (see the module
    /// docs), so the files shrink back to the live backlog.
    pub fn compact(&mut self) -> Result<(), JournalError> {
        let before = self.size_on_disk();
        let compact_path = sibling(&self.config.path, ".compact");
        let old_path = sibling(&self.config.path, ".old");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::MoveAside { path, source }
        };
        if compact_path.exists() {
            std::fs::remove_dir_all(&compact_path).map_err(io(&compact_path))?;
        }
        {
            let storage = |source| JournalError::Storage {
                path: compact_path.clone(),
                source,
            };
            let fresh = sled_config(&compact_path).open().map_err(storage)?;
            let chunks = fresh.open_tree("chunks").map_err(storage)?;
            let meta = fresh.open_tree("meta").map_err(storage)?;
            for entry in self.chunks.iter() {
                let (key, value) = entry.map_err(|e| self.storage_error(e))?;
                chunks.insert(key, value).map_err(storage)?;
            }
            for entry in self.meta.iter() {
                let (key, value) = entry.map_err(|e| self.storage_error(e))?;
                meta.insert(key, value).map_err(storage)?;
            }
            fresh.flush().map_err(storage)?;
        }
        self.db.flush().map_err(|e| self.storage_error(e))?;
        // Close the current store (sled closes when its last handle drops) before renaming.
        let placeholder = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(|e| self.storage_error(e))?;
        self.chunks = placeholder
            .open_tree("chunks")
            .map_err(|e| self.storage_error(e))?;
        self.meta = placeholder
            .open_tree("meta")
            .map_err(|e| self.storage_error(e))?;
        self.db = placeholder;
        std::fs::rename(&self.config.path, &old_path).map_err(io(&self.config.path))?;
        std::fs::rename(&compact_path, &self.config.path).map_err(io(&compact_path))?;
        std::fs::remove_dir_all(&old_path).map_err(io(&old_path))?;
        let reopened = Self::open_existing(&self.config)?;
        let (stats, flushes) = (self.stats, self.flushes.clone());
        *self = reopened;
        self.stats = stats;
        self.flushes = flushes;
        self.stats.compactions += 1;
        tracing::info!(before, after = self.size_on_disk(), "journal compacted");
        Ok(())
    }

    fn remove_acknowledged_chunks(&mut self) -> Result<(), JournalError> {
        let slowest = self
            .cursors
            .values()
            .copied()
            .min()
            .unwrap_or(self.next_seq);
        let removable: Vec<u64> = self
            .chunk_sizes
            .keys()
            .copied()
            .take_while(|&first| self.chunk_end(first) <= slowest)
            .collect();
        for first in removable {
            self.remove_chunk(first)?;
        }
        Ok(())
    }

    /// The next sequence number `target` has not acknowledged.
    pub fn cursor(&self, target: &str) -> Option<u64> {
        self.cursors.get(target).copied()
    }

    /// Readings `target` has not acknowledged.
    pub fn backlog(&self, target: &str) -> Option<u64> {
        self.cursors
            .get(target)
            .map(|&cursor| self.next_seq - cursor)
    }

    /// Readings held on disk (not yet acknowledged by every target).
    pub fn readings_held(&self) -> u64 {
        self.chunk_sizes
            .keys()
            .next()
            .map_or(0, |&oldest| self.next_seq - oldest)
    }

    /// Bytes of encoded chunks held (what the quota counts).
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn stats(&self) -> JournalStats {
        JournalStats {
            flushes: self.flushes.load(Ordering::Relaxed),
            ..self.stats
        }
    }

    /// The journal's size on disk, in bytes (sled's files, which lag behind removals until its
    /// segments are reclaimed).
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    pub fn path(&self) -> &Path {
        &self.config.path
    }
}

/// sled's defaults cache up to 1 GiB of pages; the journal is written once and read once per
/// target, so a small cache keeps the agent's memory small without costing throughput.
const SLED_CACHE_BYTES: u64 = 4 << 20;

fn sled_config(path: &Path) -> sled::Config {
    sled::Config::new()
        .path(path)
        .mode(sled::Mode::LowSpace)
        .cache_capacity(SLED_CACHE_BYTES)
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Completes or undoes a compaction a crash interrupted: with `<path>` present, leftovers are
/// removed; with only `<path>.compact` (flushed before any rename) it becomes `<path>`.
fn finish_interrupted_compaction(path: &Path) -> Result<(), JournalError> {
    let compact = sibling(path, ".compact");
    let old = sibling(path, ".old");
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| JournalError::MoveAside { path: p, source }
    };
    if !path.exists() && compact.exists() {
        std::fs::rename(&compact, path).map_err(io(&compact))?;
    }
    if path.exists() {
        for leftover in [compact, old] {
            if leftover.exists() {
                std::fs::remove_dir_all(&leftover).map_err(io(&leftover))?;
            }
        }
    }
    Ok(())
}

fn aside_path(path: &Path) -> PathBuf {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".corrupt-{stamp}"));
    path.with_file_name(name)
}
