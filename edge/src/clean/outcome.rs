//! What the pipeline decides about a reading: [`Outcome`], the [`Rejection`] with its details, and [`Flags`].

use std::fmt;

use fieldgate_shared::{Reading, ValueKind};
use serde::{Deserialize, Serialize};

use super::config::ExpectedKind;

/// The pipeline's decision about one reading.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The reading goes on to the journal, possibly changed: value converted to the target unit
    /// (always an `F64` then), `ts_ms` corrected for clock skew, quality lowered from `Good` to
    /// `Uncertain` when `flags` is not empty.
    Accepted { reading: Reading, flags: Flags },
    /// The reading was refused. Unless it is an exact duplicate of one already accepted (see
    /// `clean.quarantine.keep_duplicates`), it is in the quarantine, as received.
    Rejected(Rejection),
}

impl Outcome {
    pub fn is_accepted(&self) -> bool {
        matches!(self, Outcome::Accepted { .. })
    }

    pub fn accepted(&self) -> Option<(&Reading, Flags)> {
        match self {
            Outcome::Accepted { reading, flags } => Some((reading, *flags)),
            Outcome::Rejected(_) => None,
        }
    }

    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            Outcome::Accepted { .. } => None,
            Outcome::Rejected(rejection) => Some(rejection),
        }
    }
}

/// Why a reading was refused, with what the operator needs to judge it. Values are in the
/// normalised unit (after conversion) where a conversion applies.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Rejection {
    /// The same (device, metric, ts_ms) with the same value was seen before: a resend.
    Duplicate,
    /// The same (device, metric, ts_ms) was seen before with a different value; the first is kept.
    Conflict,
    /// The value's kind is not the one configured for the metric.
    WrongKind {
        expected: ExpectedKind,
        got: ValueKind,
    },
    /// A NaN or an infinity, as received or produced by the unit conversion (an overflow).
    NonFinite {
        after_conversion: bool,
    },
    BelowMin {
        value: f64,
        min: f64,
    },
    AboveMax {
        value: f64,
        max: f64,
    },
    /// The value departs from the series' rolling median by more than the spike threshold.
    Spike {
        value: f64,
        median: f64,
        deviation: f64,
        threshold: f64,
    },
    /// After clock-skew correction the timestamp is beyond `received_ms + max_future_ms`.
    Future {
        device_ts_ms: i64,
        corrected_ts_ms: i64,
        latest_ms: i64,
    },
}

/// The kind of a [`Rejection`], without its details: a label for counters and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Duplicate,
    Conflict,
    WrongKind,
    NonFinite,
    BelowMin,
    AboveMax,
    Spike,
    Future,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::Duplicate,
        Reason::Conflict,
        Reason::WrongKind,
        Reason::NonFinite,
        Reason::BelowMin,
        Reason::AboveMax,
        Reason::Spike,
        Reason::Future,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Duplicate => "duplicate",
            Reason::Conflict => "conflict",
            Reason::WrongKind => "wrong_kind",
            Reason::NonFinite => "non_finite",
            Reason::BelowMin => "below_min",
            Reason::AboveMax => "above_max",
            Reason::Spike => "spike",
            Reason::Future => "future",
        }
    }
}

impl Rejection {
    pub fn reason(&self) -> Reason {
        match self {
            Rejection::Duplicate => Reason::Duplicate,
            Rejection::Conflict => Reason::Conflict,
            Rejection::WrongKind { .. } => Reason::WrongKind,
            Rejection::NonFinite { .. } => Reason::NonFinite,
            Rejection::BelowMin { .. } => Reason::BelowMin,
            Rejection::AboveMax { .. } => Reason::AboveMax,
            Rejection::Spike { .. } => Reason::Spike,
            Rejection::Future { .. } => Reason::Future,
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Rejection::Duplicate => f.write_str("duplicate of a reading already seen"),
            Rejection::Conflict => {
                f.write_str("same timestamp as an earlier reading, different value; the first is kept")
            }
            Rejection::WrongKind { expected, got } => {
                write!(f, "expected a {} value, got {got:?}", expected.as_str())
            }
            Rejection::NonFinite { after_conversion: false } => f.write_str("NaN or infinite value"),
            Rejection::NonFinite { after_conversion: true } => {
                f.write_str("unit conversion overflowed to an infinite value")
            }
            Rejection::BelowMin { value, min } => write!(f, "{value} is below the minimum {min}"),
            Rejection::AboveMax { value, max } => write!(f, "{value} is above the maximum {max}"),
            Rejection::Spike {
                value,
                median,
                deviation,
                threshold,
            } => write!(
                f,
                "spike: {value} departs {deviation} from the rolling median {median} (threshold {threshold})"
            ),
            Rejection::Future {
                device_ts_ms,
                corrected_ts_ms,
                latest_ms,
            } => write!(
                f,
                "timestamp {corrected_ts_ms} (device said {device_ts_ms}) is after the latest acceptable {latest_ms}"
            ),
        }
    }
}

/// Why an accepted reading was lowered to `Uncertain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flag {
    /// Outside [min, max] with `action = "flag"`.
    OutOfRange,
    /// A spike with `action = "flag"`.
    Spike,
    /// The same value for too many samples or too long.
    Stuck,
    /// The timestamp was corrected by the device's estimated clock offset.
    ClockCorrected,
    /// A robust z-score above the threshold.
    Anomaly,
}

impl Flag {
    pub const ALL: [Flag; 5] = [
        Flag::OutOfRange,
        Flag::Spike,
        Flag::Stuck,
        Flag::ClockCorrected,
        Flag::Anomaly,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Flag::OutOfRange => "out_of_range",
            Flag::Spike => "spike",
            Flag::Stuck => "stuck",
            Flag::ClockCorrected => "clock_corrected",
            Flag::Anomaly => "anomaly",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of [`Flag`]s in one byte; serialised as a list of flag names.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Flags(u8);

impl Flags {
    pub const EMPTY: Flags = Flags(0);

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, flag: Flag) -> bool {
        self.0 & flag.bit() != 0
    }

    pub fn insert(&mut self, flag: Flag) {
        self.0 |= flag.bit();
    }

    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    pub fn iter(self) -> impl Iterator<Item = Flag> {
        Flag::ALL
            .into_iter()
            .filter(move |&flag| self.contains(flag))
    }
}

impl From<Flag> for Flags {
    fn from(flag: Flag) -> Self {
        Flags(flag.bit())
    }
}

impl FromIterator<Flag> for Flags {
    fn from_iter<I: IntoIterator<Item = Flag>>(flags: I) -> Self {
        let mut set = Flags::EMPTY;
        for flag in flags {
            set.insert(flag);
        }
        set
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl Serialize for Flags {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Flags {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Vec::<Flag>::deserialize(deserializer)?
            .into_iter()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_a_set() {
        let mut flags = Flags::EMPTY;
        assert!(flags.is_empty());
        flags.insert(Flag::Stuck);
        flags.insert(Flag::Anomaly);
        flags.insert(Flag::Stuck);
        assert_eq!(flags.len(), 2);
        assert!(flags.contains(Flag::Stuck) && !flags.contains(Flag::Spike));
        assert_eq!(
            flags.iter().collect::<Vec<_>>(),
            [Flag::Stuck, Flag::Anomaly]
        );
        assert_eq!(format!("{flags:?}"), "{Stuck, Anomaly}");
    }

    #[test]
    fn reasons_and_flags_have_distinct_labels() {
        let mut labels: Vec<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Reason::ALL.len());
        let mut labels: Vec<_> = Flag::ALL.iter().map(|f| f.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Flag::ALL.len());
    }
}
