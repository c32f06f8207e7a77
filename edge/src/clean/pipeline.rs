//! The [`Pipeline`]: runs each reading through the steps in order and owns the per-series and per-device state, the counters, the pending aggregates and the quarantine.

use std::fmt;

use fieldgate_shared::{DeviceId, Quality, Reading, Value};
use tracing::trace;

use super::anomaly::{self, AnomalyVerdict};
use super::config::{Action, CleanConfig, ConfigError};
use super::counters::Counters;
use super::dedupe::{fingerprint, DedupeState, Seen};
use super::lru::{DeviceKey, Lru, SeriesKey, SeriesKeyView};
use super::outcome::{Flag, Flags, Outcome, Rejection};
use super::quarantine::{Quarantine, QuarantineEntry};
use super::range::{check_bounds, check_kind, rejects, Bounds, KindCheck};
use super::rolling::RollingWindow;
use super::rules::{Rules, SeriesRules};
use super::skew::DeviceState;
use super::spike::{self, SpikeVerdict};
use super::stats::{Added, WindowAggregate, WindowState};
use super::stuck::StuckState;

/// The cleaning pipeline. Pure and synchronous: it is fed readings and the gateway's receive
/// time, and never reads a clock or does I/O. One per ingress thread; not shared.
pub struct Pipeline {
    rules: Rules,
    series: Lru<SeriesKey, SeriesState>,
    devices: Lru<DeviceKey, DeviceState>,
    quarantine: Quarantine,
    keep_duplicates: bool,
    pending_windows: Vec<WindowAggregate>,
    max_pending_windows: usize,
    counters: Counters,
}

/// Everything kept per series, allocated once when the series is first seen.
struct SeriesState {
    rules: SeriesRules,
    /// The device's slot in the device table and its generation then: saves a hash lookup per
    /// reading while the device stays in the table.
    device_cache: (u32, u32),
    dedupe: DedupeState,
    spike: RollingWindow,
    stuck: StuckState,
    anomaly: RollingWindow,
    window: WindowState,
}

impl SeriesState {
    fn new(rules: &Rules, ids: SeriesRules) -> Self {
        let dedupe = rules.dedupe.get(ids.dedupe);
        let spike = rules.spike.get(ids.spike);
        let anomaly = rules.anomaly.get(ids.anomaly);
        Self {
            rules: ids,
            device_cache: (u32::MAX, 0),
            dedupe: DedupeState::new(if dedupe.enabled { dedupe.history } else { 0 }),
            spike: if spike.enabled {
                RollingWindow::new(spike.window)
            } else {
                RollingWindow::disabled()
            },
            stuck: StuckState::default(),
            anomaly: if anomaly.enabled {
                RollingWindow::new(anomaly.window)
            } else {
                RollingWindow::disabled()
            },
            window: WindowState::default(),
        }
    }
}

/// What an accepted reading becomes.
struct Verdict {
    /// The new value, when converted or coerced; always a float.
    value: Option<f64>,
    ts_ms: i64,
    flags: Flags,
}

impl Pipeline {
    /// Validates and compiles `config`; the error names the key to fix.
    pub fn new(config: &CleanConfig) -> Result<Self, ConfigError> {
        let rules = Rules::compile(config)?;
        Ok(Self {
            rules,
            series: Lru::new(config.max_series),
            devices: Lru::new(config.max_devices),
            quarantine: Quarantine::new(config.quarantine.capacity),
            keep_duplicates: config.quarantine.keep_duplicates,
            pending_windows: Vec::new(),
            max_pending_windows: config.max_pending_windows,
            counters: Counters::default(),
        })
    }

    /// Cleans one reading received at `received_ms` (the gateway's UTC ms).
    ///
    /// The steps, in order: duplicates (by the device's own timestamp), value kind and
    /// finiteness, unit conversion, range, clock skew and the future bound, then for numeric
    /// readings not marked `Bad` by the device spike, stuck and anomaly detection, and last the
    /// window aggregates. A rejected reading is quarantined as it was received.
    pub fn process(&mut self, reading: Reading, received_ms: i64) -> Outcome {
        self.counters.input += 1;
        match self.evaluate(&reading, received_ms) {
            Ok(verdict) => self.accept(reading, verdict),
            Err(rejection) => self.reject(reading, rejection, received_ms),
        }
    }

    /// Closes the windows whose end plus grace is at or before `now_ms` (the gateway's clock) and
    /// moves every closed aggregate into `out`: those closed by readings first, then these, in
    /// no particular order across series.
    pub fn drain_windows(&mut self, now_ms: i64, out: &mut Vec<WindowAggregate>) {
        out.append(&mut self.pending_windows);
        let Pipeline {
            rules,
            series,
            counters,
            ..
        } = self;
        for (key, state) in series.iter_mut() {
            let grace_ms = rules.windows.get(state.rules.windows).grace_ms;
            if let Some(closed) = state.window.close_if_due(now_ms, grace_ms) {
                counters.windows.emitted += 1;
                out.push(closed.into_aggregate(&key.device, &key.metric));
            }
        }
    }

    /// Closes every open window, due or not, and moves all aggregates into `out`: for shutdown.
    pub fn flush_windows(&mut self, out: &mut Vec<WindowAggregate>) {
        out.append(&mut self.pending_windows);
        for (key, state) in self.series.iter_mut() {
            if let Some(closed) = state.window.close() {
                self.counters.windows.emitted += 1;
                out.push(closed.into_aggregate(&key.device, &key.metric));
            }
        }
    }

    /// Aggregates closed by readings and waiting for `drain_windows`.
    pub fn pending_windows(&self) -> usize {
        self.pending_windows.len()
    }

    /// A copy of the counters, with the quarantine's and the tables' current sizes filled in.
    pub fn counters(&self) -> Counters {
        let mut counters = self.counters.clone();
        counters.quarantine.entered = self.quarantine.entered();
        counters.quarantine.evicted = self.quarantine.evicted();
        counters.quarantine.len = self.quarantine.len() as u64;
        counters.series.live = self.series.len() as u64;
        counters.devices.live = self.devices.len() as u64;
        counters
    }

    pub fn quarantine(&self) -> &Quarantine {
        &self.quarantine
    }

    /// The device's current clock-offset estimate (`received − device time`, ms), if it is known.
    pub fn clock_offset_ms(&self, device: &DeviceId) -> Option<i64> {
        let slot = self.devices.find(device.as_str())?;
        Some(self.devices.get(slot).estimate_ms())
    }

    fn accept(&mut self, mut reading: Reading, verdict: Verdict) -> Outcome {
        if let Some(value) = verdict.value {
            reading.value = Value::F64(value);
        }
        reading.ts_ms = verdict.ts_ms;
        if !verdict.flags.is_empty() {
            self.counters.accepted_flagged += 1;
            for flag in verdict.flags.iter() {
                let counter = match flag {
                    Flag::OutOfRange => &mut self.counters.range.flagged,
                    Flag::Spike => &mut self.counters.spike.flagged,
                    Flag::Stuck => &mut self.counters.stuck.flagged,
                    Flag::ClockCorrected => &mut self.counters.skew.corrected,
                    Flag::Anomaly => &mut self.counters.anomaly.flagged,
                };
                *counter += 1;
            }
            if reading.quality == Quality::Good {
                reading.quality = Quality::Uncertain;
            }
        }
        self.counters.accepted += 1;
        Outcome::Accepted {
            reading,
            flags: verdict.flags,
        }
    }

    fn reject(&mut self, reading: Reading, rejection: Rejection, received_ms: i64) -> Outcome {
        self.counters.rejected += 1;
        if rejection == Rejection::Duplicate && !self.keep_duplicates {
            // The first copy was judged already; dropping the resend loses nothing.
            self.counters.quarantine.duplicates_not_kept += 1;
        } else {
            self.quarantine.push(QuarantineEntry {
                received_ms,
                rejection,
                reading,
            });
        }
        Outcome::Rejected(rejection)
    }

    /// The series' slot in the table, created (and the least recently seen evicted) if new.
    fn series_slot(&mut self, reading: &Reading) -> u32 {
        let names = (reading.device.as_str(), reading.metric.as_str());
        if let Some(slot) = self.series.find(&names as &dyn SeriesKeyView) {
            self.series.touch(slot);
            return slot;
        }
        let ids = self.rules.resolve_series(names.0, names.1);
        let state = SeriesState::new(&self.rules, ids);
        let key = SeriesKey {
            device: reading.device.clone(),
            metric: reading.metric.clone(),
        };
        let (slot, evicted) = self.series.insert(key, state);
        self.counters.series.created += 1;
        if let Some((key, mut state)) = evicted {
            self.counters.series.evicted += 1;
            // Its open window is emitted, not lost with it.
            if let Some(closed) = state.window.close() {
                push_pending(
                    &mut self.pending_windows,
                    self.max_pending_windows,
                    &mut self.counters,
                    closed.into_aggregate(&key.device, &key.metric),
                );
            }
            trace!(device = %key.device, metric = %key.metric, "Series state evicted");
        }
        slot
    }

    fn evaluate(&mut self, reading: &Reading, received_ms: i64) -> Result<Verdict, Rejection> {
        let slot = self.series_slot(reading);
        let Pipeline {
            rules,
            series,
            devices,
            counters,
            pending_windows,
            max_pending_windows,
            ..
        } = self;
        let state = series.get_mut(slot);
        let ids = state.rules;

        // Duplicates, by the device's own timestamp and the value as received.
        let dedupe = rules.dedupe.get(ids.dedupe);
        if dedupe.enabled {
            let seen =
                state
                    .dedupe
                    .observe(reading.ts_ms, fingerprint(&reading.value), dedupe.history);
            match seen {
                Seen::New => counters.dedupe.passed += 1,
                Seen::NewBeyondWindow => {
                    counters.dedupe.passed += 1;
                    counters.dedupe.beyond_window += 1;
                }
                Seen::Duplicate => {
                    counters.dedupe.duplicates += 1;
                    return Err(Rejection::Duplicate);
                }
                Seen::Conflict => {
                    counters.dedupe.conflicts += 1;
                    return Err(Rejection::Conflict);
                }
            }
        }

        // Kind and finiteness.
        let range = rules.range.get(ids.range);
        let mut replaced = None;
        match check_kind(range.kind, &reading.value) {
            KindCheck::Ok => {}
            KindCheck::Coerced(x) => {
                counters.range.coerced += 1;
                replaced = Some(x);
            }
            KindCheck::Wrong => {
                counters.range.wrong_kind += 1;
                return Err(Rejection::WrongKind {
                    expected: range.kind,
                    got: reading.value.kind(),
                });
            }
        }
        let mut number = match reading.value {
            Value::F64(x) if !x.is_finite() => {
                counters.range.non_finite += 1;
                return Err(Rejection::NonFinite {
                    after_conversion: false,
                });
            }
            Value::F64(x) => Some(x),
            Value::I64(x) => Some(x as f64),
            Value::Bool(_) | Value::Str(_) => None,
        };

        // Unit conversion.
        if let (Some(conversion), Some(x)) = (rules.units.get(ids.units), number) {
            let (y, exact) = match reading.value {
                Value::I64(i) => conversion.apply_i64(i),
                _ => conversion.apply_f64(x),
            };
            if !y.is_finite() {
                counters.units.non_finite += 1;
                return Err(Rejection::NonFinite {
                    after_conversion: true,
                });
            }
            counters.units.converted += 1;
            counters.units.exact += u64::from(exact);
            replaced = Some(y);
            number = Some(y);
        }

        // Range, in the normalised unit.
        let mut flags = Flags::EMPTY;
        let bounds = number.map_or(Bounds::Within, |x| check_bounds(range, x));
        match (bounds, number) {
            (Bounds::Within, _) | (_, None) => counters.range.passed += 1,
            (Bounds::Below, Some(value)) if rejects(range) => {
                counters.range.below_min += 1;
                return Err(Rejection::BelowMin {
                    value,
                    min: range.min,
                });
            }
            (Bounds::Above, Some(value)) if rejects(range) => {
                counters.range.above_max += 1;
                return Err(Rejection::AboveMax {
                    value,
                    max: range.max,
                });
            }
            (Bounds::Below | Bounds::Above, Some(_)) => flags.insert(Flag::OutOfRange),
        }

        // Clock skew, then the future bound.
        let device = device_state(
            devices,
            rules,
            counters,
            &mut state.device_cache,
            &reading.device,
        );
        let skew = rules.skew.get(device.rule);
        let mut ts_ms = reading.ts_ms;
        if skew.enabled {
            if device.observe(reading.ts_ms, received_ms, skew) {
                counters.skew.estimate_updates += 1;
                trace!(
                    device = %reading.device,
                    offset_ms = device.estimate_ms(),
                    "Clock offset estimate moved"
                );
            }
            let correction_ms = device.correction_ms(skew);
            if correction_ms != 0 {
                ts_ms = ts_ms.saturating_add(correction_ms);
                flags.insert(Flag::ClockCorrected);
            }
        }
        if let Some(max_future_ms) = skew.max_future_ms {
            let latest_ms = received_ms.saturating_add(max_future_ms);
            if ts_ms > latest_ms {
                counters.skew.future += 1;
                return Err(Rejection::Future {
                    device_ts_ms: reading.ts_ms,
                    corrected_ts_ms: ts_ms,
                    latest_ms,
                });
            }
        }
        if !flags.contains(Flag::ClockCorrected) {
            counters.skew.passed += 1;
        }

        // Spike, stuck and anomaly: numeric readings the device did not mark Bad.
        if let (Some(x), true) = (number, reading.quality != Quality::Bad) {
            let spike = rules.spike.get(ids.spike);
            if spike.enabled {
                let verdict = spike::judge(&state.spike, x, spike);
                state.spike.push(x);
                match verdict {
                    SpikeVerdict::WarmingUp => counters.spike.warming_up += 1,
                    SpikeVerdict::Flat => counters.spike.flat += 1,
                    SpikeVerdict::Normal => counters.spike.passed += 1,
                    SpikeVerdict::Spike {
                        median,
                        deviation,
                        threshold,
                    } => match spike.action {
                        Action::Reject => {
                            counters.spike.rejected += 1;
                            return Err(Rejection::Spike {
                                value: x,
                                median,
                                deviation,
                                threshold,
                            });
                        }
                        Action::Flag => flags.insert(Flag::Spike),
                    },
                }
            }

            // Only analog (float) series: integers are counters and states that repeat by nature.
            let stuck = rules.stuck.get(ids.stuck);
            let is_float = replaced.is_some() || matches!(reading.value, Value::F64(_));
            if stuck.enabled && is_float {
                if state.stuck.observe(x, ts_ms, stuck) {
                    flags.insert(Flag::Stuck);
                } else {
                    counters.stuck.passed += 1;
                }
            }

            let anomaly = rules.anomaly.get(ids.anomaly);
            if anomaly.enabled {
                let verdict = anomaly::judge(&state.anomaly, x, anomaly);
                state.anomaly.push(x);
                match verdict {
                    AnomalyVerdict::WarmingUp => counters.anomaly.warming_up += 1,
                    AnomalyVerdict::Flat => counters.anomaly.flat += 1,
                    AnomalyVerdict::Normal => counters.anomaly.passed += 1,
                    AnomalyVerdict::Anomaly { .. } => flags.insert(Flag::Anomaly),
                }
            }
        }

        // Window aggregates, by corrected timestamp.
        let windows = rules.windows.get(ids.windows);
        if let (true, Some(x)) = (windows.enabled, number) {
            let include = match reading.quality {
                Quality::Bad => false,
                Quality::Uncertain => windows.include_uncertain,
                Quality::Good => flags.is_empty() || windows.include_uncertain,
            };
            if include {
                match state.window.add(ts_ms, x, windows.length_ms) {
                    Added::Aggregated(closed) => {
                        counters.windows.aggregated += 1;
                        if let Some(closed) = closed {
                            push_pending(
                                pending_windows,
                                *max_pending_windows,
                                counters,
                                closed.into_aggregate(&reading.device, &reading.metric),
                            );
                        }
                    }
                    Added::Late => counters.windows.late += 1,
                }
            } else {
                counters.windows.skipped += 1;
            }
        }

        Ok(Verdict {
            value: replaced,
            ts_ms,
            flags,
        })
    }
}

/// The device's skew state, through the series' cached slot when it is still current.
fn device_state<'d>(
    devices: &'d mut Lru<DeviceKey, DeviceState>,
    rules: &Rules,
    counters: &mut Counters,
    cache: &mut (u32, u32),
    device: &DeviceId,
) -> &'d mut DeviceState {
    let slot = if devices.is_current(cache.0, cache.1) {
        cache.0
    } else {
        let slot = match devices.find(device.as_str()) {
            Some(slot) => slot,
            None => {
                let rule = rules.resolve_device(device.as_str());
                let state = DeviceState::new(rule, rules.skew.get(rule));
                let (slot, evicted) = devices.insert(DeviceKey(device.clone()), state);
                counters.devices.created += 1;
                if let Some((key, _)) = evicted {
                    counters.devices.evicted += 1;
                    trace!(device = %key.0, "Device clock state evicted");
                }
                slot
            }
        };
        *cache = (slot, devices.generation(slot));
        slot
    };
    devices.touch(slot);
    devices.get_mut(slot)
}

fn push_pending(
    pending: &mut Vec<WindowAggregate>,
    max_pending: usize,
    counters: &mut Counters,
    aggregate: WindowAggregate,
) {
    if pending.len() < max_pending {
        counters.windows.emitted += 1;
        pending.push(aggregate);
    } else {
        counters.windows.dropped += 1;
    }
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("series", &self.series.len())
            .field("devices", &self.devices.len())
            .field("quarantined", &self.quarantine.len())
            .field("pending_windows", &self.pending_windows.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}
