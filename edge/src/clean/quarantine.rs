//! The quarantine: a bounded ring of rejected readings with their reason and receive time, and counts of what fell off.
//!
//! Overflow policy: the oldest entry gives way to the newest, and is counted in `evicted`, so
//! `entered = len + evicted` always holds and nothing leaves unaccounted.

use std::collections::VecDeque;

use fieldgate_shared::Reading;
use serde::{Deserialize, Serialize};

use super::outcome::Rejection;

/// One rejected reading, exactly as it was received.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    /// The gateway's receive time passed to `process`.
    pub received_ms: i64,
    pub rejection: Rejection,
    pub reading: Reading,
}

/// A copy of the quarantine for a read-only view (`/status`, the CLI).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuarantineSnapshot {
    pub capacity: usize,
    /// Entries held now.
    pub len: usize,
    /// Entries ever added.
    pub entered: u64,
    /// Entries that fell off the end to make room.
    pub evicted: u64,
    /// Oldest first (or the newest ones only, newest last, from `snapshot_newest`).
    pub entries: Vec<QuarantineEntry>,
}

#[derive(Clone, Debug)]
pub struct Quarantine {
    entries: VecDeque<QuarantineEntry>,
    capacity: usize,
    entered: u64,
    evicted: u64,
}

impl Quarantine {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            // Grows as needed: a quiet gateway should not hold a full ring's memory.
            entries: VecDeque::new(),
            capacity: capacity.max(1),
            entered: 0,
            evicted: 0,
        }
    }

    pub(crate) fn push(&mut self, entry: QuarantineEntry) {
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
            self.evicted += 1;
        }
        self.entries.push_back(entry);
        self.entered += 1;
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn entered(&self) -> u64 {
        self.entered
    }

    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Oldest first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &QuarantineEntry> + ExactSizeIterator {
        self.entries.iter()
    }

    pub fn snapshot(&self) -> QuarantineSnapshot {
        self.snapshot_newest(self.entries.len())
    }

    /// The newest `limit` entries (oldest of them first), for a view that pages.
    pub fn snapshot_newest(&self, limit: usize) -> QuarantineSnapshot {
        let skip = self.entries.len().saturating_sub(limit);
        QuarantineSnapshot {
            capacity: self.capacity,
            len: self.entries.len(),
            entered: self.entered,
            evicted: self.evicted,
            entries: self.entries.iter().skip(skip).cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clean::ExpectedKind;
    use fieldgate_shared::{DeviceId, MetricName, Quality, Value, ValueKind};

    fn entry(ts_ms: i64) -> QuarantineEntry {
        QuarantineEntry {
            received_ms: ts_ms + 5,
            rejection: Rejection::WrongKind {
                expected: ExpectedKind::Str,
                got: ValueKind::I64,
            },
            reading: Reading {
                device: DeviceId::new("d").unwrap(),
                metric: MetricName::new("m").unwrap(),
                ts_ms,
                value: Value::I64(ts_ms),
                quality: Quality::Good,
            },
        }
    }

    #[test]
    fn the_oldest_falls_off_and_is_counted() {
        let mut quarantine = Quarantine::new(3);
        for ts in 0..5 {
            quarantine.push(entry(ts));
        }
        let snapshot = quarantine.snapshot();
        assert_eq!(
            (snapshot.len, snapshot.entered, snapshot.evicted),
            (3, 5, 2)
        );
        let kept: Vec<i64> = snapshot.entries.iter().map(|e| e.reading.ts_ms).collect();
        assert_eq!(kept, [2, 3, 4]);
        let newest: Vec<i64> = quarantine
            .snapshot_newest(2)
            .entries
            .iter()
            .map(|e| e.reading.ts_ms)
            .collect();
        assert_eq!(newest, [3, 4]);
        assert_eq!(quarantine.snapshot_newest(99).entries.len(), 3);
    }

    #[test]
    fn snapshots_serialise_with_the_reason_named() {
        let mut quarantine = Quarantine::new(2);
        quarantine.push(entry(7));
        let json = serde_json::to_value(quarantine.snapshot()).unwrap();
        assert_eq!(json["entries"][0]["rejection"]["reason"], "wrong_kind");
        assert_eq!(json["entries"][0]["rejection"]["expected"], "str");
        assert_eq!(json["entries"][0]["reading"]["device"], "d");
        assert_eq!(json["entries"][0]["received_ms"], 12);
        let back: QuarantineSnapshot = serde_json::from_value(json).unwrap();
        assert_eq!(back.entries[0].reading.ts_ms, 7);
    }
}
