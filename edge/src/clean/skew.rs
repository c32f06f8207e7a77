//! Clock-skew correction: a per-device estimate of `received_ms − ts_ms`, and the future bound.
//!
//! Each distinct device timestamp gives one offset sample, `received_ms − ts_ms`: the device's
//! clock error plus the transport delay, which is never negative. The estimate is the minimum of
//! the last `window` samples (the least-delayed reading is the truest), and it is adopted only
//! when those samples agree within `max_spread_ms`. That one condition keeps out the two things
//! that look like skew but are not:
//!
//! - a device flushing readings it buffered while offline: their samples are large and shrink
//!   quickly as the flush catches up (the spread is about the flush's time span), so the
//!   estimate holds and old readings keep their own, correct, timestamps;
//! - a single wild timestamp: it spreads the window for `window` samples and is never the estimate.
//!
//! A clock that really jumps is followed once `window` samples at the new offset agree. Until
//! then readings are corrected by the old estimate: after a jump backwards they keep their
//! (too early) timestamps; after a jump forwards they land in the future and are rejected to the
//! quarantine by `max_future_ms`, so nothing is silently misplaced.
//! Timestamps are corrected only when the estimate exceeds `threshold_ms` in magnitude, so
//! ordinary transport delay never touches them.

use super::config::SkewSettings;

#[derive(Clone, Debug)]
pub(crate) struct DeviceState {
    /// The device's `clean.skew` rule.
    pub(crate) rule: u32,
    /// Offset samples; once full, `next` is the oldest.
    samples: Vec<i64>,
    next: usize,
    /// The device timestamp of the last sample: readings of several metrics in one frame share
    /// it and give one sample, not several.
    last_sample_ts_ms: Option<i64>,
    estimate_ms: i64,
}

impl DeviceState {
    pub(crate) fn new(rule: u32, settings: &SkewSettings) -> Self {
        let capacity = if settings.enabled { settings.window } else { 0 };
        Self {
            rule,
            samples: Vec::with_capacity(capacity),
            next: 0,
            last_sample_ts_ms: None,
            estimate_ms: 0,
        }
    }

    /// Records the sample of a reading; true when the estimate changed.
    pub(crate) fn observe(
        &mut self,
        ts_ms: i64,
        received_ms: i64,
        settings: &SkewSettings,
    ) -> bool {
        if self.last_sample_ts_ms == Some(ts_ms) {
            return false;
        }
        self.last_sample_ts_ms = Some(ts_ms);
        let sample = received_ms.saturating_sub(ts_ms);
        if self.samples.len() < settings.window {
            self.samples.push(sample);
            if self.samples.len() < settings.window {
                return false;
            }
        } else {
            self.samples[self.next] = sample;
            self.next = (self.next + 1) % settings.window;
        }
        let (low, high) = self
            .samples
            .iter()
            .fold((i64::MAX, i64::MIN), |(low, high), &s| {
                (low.min(s), high.max(s))
            });
        if high.saturating_sub(low) <= settings.max_spread_ms && low != self.estimate_ms {
            self.estimate_ms = low;
            return true;
        }
        false
    }

    /// The current estimate of `received − device time`, in ms.
    pub(crate) fn estimate_ms(&self) -> i64 {
        self.estimate_ms
    }

    /// What to add to a device timestamp: the estimate when it is beyond the threshold, else 0.
    pub(crate) fn correction_ms(&self, settings: &SkewSettings) -> i64 {
        if settings.enabled && self.estimate_ms.unsigned_abs() > settings.threshold_ms as u64 {
            self.estimate_ms
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> SkewSettings {
        SkewSettings {
            window: 4,
            max_spread_ms: 500,
            threshold_ms: 2_000,
            ..SkewSettings::default()
        }
    }

    /// Feeds (device ts, received) pairs and returns the correction after each.
    fn corrections(samples: &[(i64, i64)]) -> Vec<i64> {
        let settings = settings();
        let mut device = DeviceState::new(0, &settings);
        samples
            .iter()
            .map(|&(ts, received)| {
                device.observe(ts, received, &settings);
                device.correction_ms(&settings)
            })
            .collect()
    }

    const HOUR: i64 = 3_600_000;

    #[test]
    fn a_steady_offset_is_adopted_once_the_window_agrees() {
        // The device is 10 s behind; delays of 20–300 ms.
        let samples: Vec<(i64, i64)> = [20, 300, 50, 120, 80]
            .iter()
            .enumerate()
            .map(|(i, delay)| {
                let now = 1_000_000 + i as i64 * 1_000;
                (now - 10_000, now + delay)
            })
            .collect();
        assert_eq!(corrections(&samples), [0, 0, 0, 10_020, 10_050]);
    }

    #[test]
    fn small_offsets_are_left_alone() {
        let samples: Vec<(i64, i64)> = (0..6).map(|i| (i * 1000, i * 1000 + 1_500)).collect();
        assert_eq!(corrections(&samples), [0; 6]);
    }

    #[test]
    fn a_clock_jumping_forwards_is_followed_after_a_window() {
        let mut samples: Vec<(i64, i64)> = (0..4).map(|i| (i * 1000, i * 1000 + 10)).collect();
        samples.extend((4..10).map(|i| (i * 1000 + HOUR, i * 1000 + 10)));
        assert_eq!(
            corrections(&samples),
            [0, 0, 0, 0, 0, 0, 0, -HOUR + 10, -HOUR + 10, -HOUR + 10]
        );
    }

    #[test]
    fn a_clock_jumping_backwards_is_followed_after_a_window() {
        let mut samples: Vec<(i64, i64)> = (0..4).map(|i| (i * 1000, i * 1000 + 10)).collect();
        samples.extend((4..9).map(|i| (i * 1000 - HOUR, i * 1000 + 10)));
        assert_eq!(
            corrections(&samples),
            [0, 0, 0, 0, 0, 0, 0, HOUR + 10, HOUR + 10]
        );
    }

    #[test]
    fn a_flush_of_buffered_readings_does_not_move_the_estimate() {
        // An hour of 1 s readings arrives within a few ms after an outage: the samples fall by
        // almost a second each, so the window never agrees and the old timestamps stand.
        let received = 10 * HOUR;
        let samples: Vec<(i64, i64)> = (0..100)
            .map(|i| (received - HOUR + i * 1000, received + i))
            .collect();
        assert!(corrections(&samples).iter().all(|&c| c == 0));
    }

    #[test]
    fn a_single_wild_timestamp_is_ignored() {
        let mut samples: Vec<(i64, i64)> = (0..4).map(|i| (i * 1000 - 5_000, i * 1000)).collect();
        samples.push((i64::MAX, 4_000));
        samples.extend((5..9).map(|i| (i * 1000 - 5_000, i * 1000)));
        assert_eq!(
            corrections(&samples),
            [0, 0, 0, 5_000, 5_000, 5_000, 5_000, 5_000, 5_000]
        );
    }

    #[test]
    fn metrics_of_one_frame_give_one_sample() {
        let settings = settings();
        let mut device = DeviceState::new(0, &settings);
        for _ in 0..10 {
            device.observe(1_000, 10_000, &settings);
        }
        assert_eq!(
            device.correction_ms(&settings),
            0,
            "one sample is not a window"
        );
    }
}
