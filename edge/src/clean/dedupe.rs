//! Duplicate suppression: the last N distinct device timestamps of a series, with a fingerprint of each value.
//!
//! Devices resend readings whose ACK was lost; dropping the resends here is what makes delivery
//! exactly-once from device to journal. The key is the device's own timestamp, before any clock
//! correction, because the correction may change between a reading and its resend. A series
//! remembers its last `history` distinct timestamps by arrival; in-order arrival (the usual case)
//! costs one comparison, only an out-of-order timestamp scans the history.
//!
//! Every reading that gets past this step is remembered, whatever later steps decide, so a resend
//! is never judged twice: a rejected reading's resend is a duplicate of it, its first copy is in
//! the quarantine.

use fieldgate_shared::Value;

/// What the history says about a timestamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    New,
    /// Not in the history, but no newer than a timestamp that has fallen out of it: it may be a
    /// resend of something forgotten. It passes, and is counted.
    NewBeyondWindow,
    Duplicate,
    Conflict,
}

#[derive(Clone, Debug)]
pub(crate) struct DedupeState {
    /// (device timestamp, value fingerprint); once full, `next` is the oldest by arrival.
    entries: Vec<(i64, u64)>,
    next: usize,
    newest_ts_ms: i64,
    /// The newest timestamp that has fallen out of the history: at or before it, a timestamp not
    /// in the history may have been seen and forgotten.
    newest_forgotten_ms: i64,
}

impl DedupeState {
    pub(crate) fn new(history: usize) -> Self {
        Self {
            entries: Vec::with_capacity(history),
            next: 0,
            newest_ts_ms: i64::MIN,
            newest_forgotten_ms: i64::MIN,
        }
    }

    pub(crate) fn observe(&mut self, ts_ms: i64, fingerprint: u64, history: usize) -> Seen {
        if self.entries.is_empty() || ts_ms > self.newest_ts_ms {
            self.remember(ts_ms, fingerprint, history);
            return Seen::New;
        }
        if let Some(&(_, first)) = self.entries.iter().find(|&&(ts, _)| ts == ts_ms) {
            return if first == fingerprint {
                Seen::Duplicate
            } else {
                Seen::Conflict
            };
        }
        let maybe_forgotten = ts_ms <= self.newest_forgotten_ms;
        self.remember(ts_ms, fingerprint, history);
        if maybe_forgotten {
            Seen::NewBeyondWindow
        } else {
            Seen::New
        }
    }

    fn remember(&mut self, ts_ms: i64, fingerprint: u64, history: usize) {
        self.newest_ts_ms = self.newest_ts_ms.max(ts_ms);
        if self.entries.len() < history {
            self.entries.push((ts_ms, fingerprint));
        } else {
            let (forgotten_ms, _) =
                std::mem::replace(&mut self.entries[self.next], (ts_ms, fingerprint));
            self.newest_forgotten_ms = self.newest_forgotten_ms.max(forgotten_ms);
            self.next = (self.next + 1) % history;
        }
    }
}

/// A 64-bit fingerprint of a value: equal values (bitwise for floats) always agree, different
/// ones collide with negligible probability. No allocation: strings are hashed in place.
pub(crate) fn fingerprint(value: &Value) -> u64 {
    match value {
        Value::F64(v) => mix(v.to_bits() ^ 0x9e37_79b9_7f4a_7c15),
        Value::I64(v) => mix(*v as u64 ^ 0xc2b2_ae3d_27d4_eb4f),
        Value::Bool(v) => mix(*v as u64 ^ 0x1656_67b1_9e37_79f9),
        Value::Str(s) => {
            // FNV-1a, then mixed, so short strings spread over all 64 bits.
            let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
            for &byte in s.as_str().as_bytes() {
                hash = (hash ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
            mix(hash ^ 0x27d4_eb2f_1656_67c5)
        }
    }
}

/// The SplitMix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fieldgate_shared::ShortStr;

    /// Feeds (ts, value) pairs to one series and checks each verdict.
    fn check(history: usize, steps: &[(i64, f64, Seen)]) {
        let mut state = DedupeState::new(history);
        for (i, &(ts, value, expected)) in steps.iter().enumerate() {
            let seen = state.observe(ts, fingerprint(&Value::F64(value)), history);
            assert_eq!(seen, expected, "step {i}: ts {ts} value {value}");
        }
    }

    #[test]
    fn in_order_readings_are_new_and_resends_are_duplicates() {
        use Seen::*;
        check(
            4,
            &[
                (1000, 1.0, New),
                (2000, 2.0, New),
                (1000, 1.0, Duplicate),
                (2000, 2.0, Duplicate),
                (3000, 3.0, New),
                (2000, 2.5, Conflict),
                // The first value is kept: resending it is still a plain duplicate.
                (2000, 2.0, Duplicate),
                // Out of order, but new.
                (1500, 1.5, New),
                (1500, 1.5, Duplicate),
            ],
        );
    }

    #[test]
    fn duplicates_across_the_window_bound() {
        use Seen::*;
        check(
            4,
            &[
                (1, 1.0, New),
                (2, 2.0, New),
                (3, 3.0, New),
                (4, 4.0, New),
                // Timestamp 1 falls out of the history; 2 is the oldest remembered.
                (5, 5.0, New),
                (2, 2.0, Duplicate),
                // Beyond the window: cannot be told from a late new reading, so it passes,
                // counted. 1 is remembered again, and 2 falls out.
                (1, 1.0, NewBeyondWindow),
                (1, 1.0, Duplicate),
                (2, 2.0, NewBeyondWindow),
            ],
        );
    }

    #[test]
    fn a_history_of_one_remembers_the_last_timestamp() {
        use Seen::*;
        check(
            1,
            &[
                (10, 1.0, New),
                (10, 1.0, Duplicate),
                (20, 2.0, New),
                (10, 1.0, NewBeyondWindow),
                // 20 has fallen out, so anything up to 20 may have been seen.
                (15, 1.0, NewBeyondWindow),
                (21, 1.0, New),
            ],
        );
    }

    #[test]
    fn fingerprints_tell_kinds_and_bits_apart() {
        let values = [
            Value::F64(1.0),
            Value::F64(-0.0),
            Value::F64(0.0),
            Value::F64(f64::NAN),
            Value::I64(1),
            Value::I64(0),
            Value::Bool(true),
            Value::Bool(false),
            Value::Str(ShortStr::new("").unwrap()),
            Value::Str(ShortStr::new("on").unwrap()),
        ];
        for (i, a) in values.iter().enumerate() {
            assert_eq!(fingerprint(a), fingerprint(&a.clone()));
            for b in &values[i + 1..] {
                assert_ne!(fingerprint(a), fingerprint(b), "{a:?} vs {b:?}");
            }
        }
    }
}
