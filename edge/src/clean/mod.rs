//! The cleaning pipeline between ingress and the journal: pure logic fed readings and the gateway's receive time.
//!
//! ```text
//! let mut pipeline = Pipeline::new(&config.clean)?;
//! match pipeline.process(reading, received_ms) {
//!     Outcome::Accepted { reading, flags } => journal.append(reading),
//!     Outcome::Rejected(rejection) => {} // counted, and in pipeline.quarantine()
//! }
//! pipeline.drain_windows(now_ms, &mut aggregates); // 1-minute aggregates for the uplink
//! ```
//!
//! # Layout
//! - [`config`](CleanConfig): the `[clean]` section: limits, and per step `defaults` plus
//!   `rules` selected by device and metric globs, first match wins; validation naming the key.
//! - `glob`: `*` and `?` globs. `rules`: the config compiled, and the rule matched per series.
//! - [`pipeline`](Pipeline): runs the steps in order; owns the state, counters and quarantine.
//! - `dedupe`: duplicate suppression by (device, metric, device timestamp).
//! - `range`: value kind, finiteness, [min, max]. `units`: the unit table and exact conversions.
//! - `skew`: per-device clock offset estimate, timestamp correction, the future bound.
//! - `spike`, `stuck`, `anomaly`: detectors over `rolling`, a sorted rolling window (median, MAD).
//! - `stats`: tumbling-window aggregates ([`WindowAggregate`]).
//! - `quarantine`: the bounded ring of rejected readings ([`QuarantineSnapshot`]).
//! - `counters`: [`Counters`], per step and per reason. `outcome`: [`Outcome`], [`Rejection`], [`Flags`].
//! - `lru`: the bounded series and device tables.
//!
//! # Order of the steps, and why
//! 1. Duplicates first, on the reading as the device sent it: a resend must be recognised
//!    whatever later steps would make of it, and the clock correction may have moved since.
//! 2. Kind and finiteness, 3. unit conversion, 4. range: so `min` and `max` are written in the
//!    normalised unit, once for every device whatever unit it speaks.
//! 5. Clock skew and the future bound: the timestamps the statistics and the journal use.
//! 6. Spike, 7. stuck, 8. anomaly: numeric readings the device did not itself mark `Bad`.
//! 9. Window aggregates: numeric, accepted, `Good` (and `Uncertain` if configured) readings.
//!
//! # Invariants
//! - No I/O, no clock, no async: time comes in as `received_ms` and `now_ms`.
//! - Every reading is accepted or rejected: `accepted + rejected = input`. A rejected reading
//!   goes to the quarantine as received (exact duplicates only if `keep_duplicates`, since their
//!   first copy was accepted), and the quarantine counts what falls off its end.
//! - Quality is only ever lowered, from `Good` to `Uncertain`, and only with a flag saying why.
//! - Memory is bounded: `max_series` series and `max_devices` devices (least recently seen
//!   evicted), each with fixed-size histories; `max_pending_windows`; the quarantine capacity.
//! - No allocation per reading once a series exists, apart from the aggregates it emits and the
//!   quarantine growing towards its capacity.

mod anomaly;
mod config;
mod counters;
mod dedupe;
mod glob;
mod lru;
mod outcome;
mod pipeline;
mod quarantine;
mod range;
mod rolling;
mod rules;
mod skew;
mod spike;
mod stats;
mod stuck;
mod units;

#[cfg(test)]
mod tests;

pub use config::{
    Action, AnomalyRule, AnomalySettings, CleanConfig, ConfigError, DedupeRule, DedupeSettings,
    ExpectedKind, QuarantineConfig, RangeRule, RangeSettings, SkewRule, SkewSettings, SpikeRule,
    SpikeSettings, Step, StuckRule, StuckSettings, UnitRule, UnitSettings, WindowRule,
    WindowSettings,
};
pub use counters::{
    AnomalyCounters, Counters, DedupeCounters, QuarantineCounters, RangeCounters, SkewCounters,
    SpikeCounters, StuckCounters, TableCounters, UnitCounters, WindowCounters,
};
pub use outcome::{Flag, Flags, Outcome, Reason, Rejection};
pub use pipeline::Pipeline;
pub use quarantine::{Quarantine, QuarantineEntry, QuarantineSnapshot};
pub use stats::WindowAggregate;
