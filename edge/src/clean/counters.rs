//! The pipeline's counters: totals, and per step what passed, was flagged or was rejected, by reason.
//!
//! Invariants, checked by the property test: `accepted + rejected = input`; `rejected` is the sum
//! of [`Counters::rejected_by`] over every [`Reason`]; `quarantine.entered + quarantine.duplicates_not_kept
//! = rejected`.

use serde::{Deserialize, Serialize};

use super::outcome::{Flag, Reason};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Readings given to `process`.
    pub input: u64,
    pub accepted: u64,
    /// Accepted with at least one flag.
    pub accepted_flagged: u64,
    pub rejected: u64,
    pub dedupe: DedupeCounters,
    pub range: RangeCounters,
    pub units: UnitCounters,
    pub skew: SkewCounters,
    pub spike: SpikeCounters,
    pub stuck: StuckCounters,
    pub anomaly: AnomalyCounters,
    pub windows: WindowCounters,
    pub quarantine: QuarantineCounters,
    pub series: TableCounters,
    pub devices: TableCounters,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupeCounters {
    pub passed: u64,
    /// Passed, though older than a timestamp the history has forgotten: possibly a resend.
    pub beyond_window: u64,
    /// Rejected: resends.
    pub duplicates: u64,
    /// Rejected: same timestamp, different value.
    pub conflicts: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeCounters {
    pub passed: u64,
    /// Integers converted to f64 for an `f64` metric (they pass).
    pub coerced: u64,
    pub wrong_kind: u64,
    /// NaN or infinite as received.
    pub non_finite: u64,
    pub below_min: u64,
    pub above_max: u64,
    /// Outside [min, max] with `action = "flag"`.
    pub flagged: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitCounters {
    pub converted: u64,
    /// Of `converted`, those exact to the decimal (the rest used float arithmetic).
    pub exact: u64,
    /// Rejected: the conversion overflowed to infinity.
    pub non_finite: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkewCounters {
    pub passed: u64,
    /// Timestamps corrected (flagged `clock_corrected`).
    pub corrected: u64,
    /// Rejected: beyond `max_future_ms`.
    pub future: u64,
    /// Times a device's offset estimate moved.
    pub estimate_updates: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpikeCounters {
    pub passed: u64,
    /// Not judged: the window is still filling.
    pub warming_up: u64,
    /// Not judged: flat window, no floor and no step.
    pub flat: u64,
    pub flagged: u64,
    pub rejected: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StuckCounters {
    pub passed: u64,
    pub flagged: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnomalyCounters {
    pub passed: u64,
    pub warming_up: u64,
    pub flat: u64,
    pub flagged: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowCounters {
    /// Readings added to a window.
    pub aggregated: u64,
    /// Accepted readings left out: `Bad`, or `Uncertain` without `include_uncertain`.
    pub skipped: u64,
    /// Accepted readings too late for their window.
    pub late: u64,
    /// Aggregates produced (including those handed straight to `drain_windows` or `flush_windows`).
    pub emitted: u64,
    /// Aggregates dropped because `max_pending_windows` were waiting to be drained.
    pub dropped: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineCounters {
    pub entered: u64,
    /// Fell off the end of the ring.
    pub evicted: u64,
    /// Exact duplicates, counted but not stored (`keep_duplicates = false`).
    pub duplicates_not_kept: u64,
    /// Entries held now.
    pub len: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableCounters {
    /// Entries held now.
    pub live: u64,
    pub created: u64,
    /// Evicted as least recently seen to stay within the limit.
    pub evicted: u64,
}

impl Counters {
    /// Rejections of one reason, summed over the steps that can give it.
    pub fn rejected_by(&self, reason: Reason) -> u64 {
        match reason {
            Reason::Duplicate => self.dedupe.duplicates,
            Reason::Conflict => self.dedupe.conflicts,
            Reason::WrongKind => self.range.wrong_kind,
            Reason::NonFinite => self.range.non_finite + self.units.non_finite,
            Reason::BelowMin => self.range.below_min,
            Reason::AboveMax => self.range.above_max,
            Reason::Spike => self.spike.rejected,
            Reason::Future => self.skew.future,
        }
    }

    /// Accepted readings carrying `flag`.
    pub fn flagged_by(&self, flag: Flag) -> u64 {
        match flag {
            Flag::OutOfRange => self.range.flagged,
            Flag::Spike => self.spike.flagged,
            Flag::Stuck => self.stuck.flagged,
            Flag::ClockCorrected => self.skew.corrected,
            Flag::Anomaly => self.anomaly.flagged,
        }
    }
}
