//! Windowed statistics: per series, tumbling windows producing min, max, sum, mean and count when they close.
//!
//! Windows are aligned to multiples of `length_ms` since the Unix epoch and half-open,
//! `[start, start + length)`, over corrected timestamps. A series holds one open window: a reading
//! of a later window closes it at once; [`Pipeline::drain_windows`](super::Pipeline::drain_windows)
//! closes those whose end plus grace has passed on the gateway's clock. A reading older than the
//! open window, or than the end of the last closed one, is late: it is still accepted to the
//! journal, but counted in `windows.late` instead of reopening a window already sent. Windows
//! with no readings produce nothing. Memory per series is one open window.

use fieldgate_shared::{DeviceId, MetricName};
use serde::{Deserialize, Serialize};

/// A closed window of one series: the record the uplink sends as "1-minute aggregates".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowAggregate {
    pub device: DeviceId,
    pub metric: MetricName,
    /// Inclusive.
    pub start_ms: i64,
    /// Exclusive.
    pub end_ms: i64,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub mean: f64,
}

/// The numbers of a closed window, before the series' names are attached.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct ClosedWindow {
    pub(crate) start_ms: i64,
    pub(crate) end_ms: i64,
    pub(crate) count: u64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) sum: f64,
}

impl ClosedWindow {
    pub(crate) fn into_aggregate(self, device: &DeviceId, metric: &MetricName) -> WindowAggregate {
        WindowAggregate {
            device: device.clone(),
            metric: metric.clone(),
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            count: self.count,
            min: self.min,
            max: self.max,
            sum: self.sum,
            mean: self.sum / self.count as f64,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Added {
    /// Aggregated; the previous window, if this reading closed it.
    Aggregated(Option<ClosedWindow>),
    /// Before the open window or a closed one; or so near the ends of time that its window cannot
    /// be represented.
    Late,
}

#[derive(Clone, Debug)]
pub(crate) struct WindowState {
    open: Option<ClosedWindow>,
    /// The end of the last closed window: earlier readings are late.
    closed_until_ms: i64,
}

impl Default for WindowState {
    fn default() -> Self {
        Self {
            open: None,
            closed_until_ms: i64::MIN,
        }
    }
}

impl WindowState {
    pub(crate) fn add(&mut self, ts_ms: i64, x: f64, length_ms: i64) -> Added {
        if ts_ms < self.closed_until_ms {
            return Added::Late;
        }
        if let Some(open) = &mut self.open {
            if ts_ms < open.start_ms {
                return Added::Late;
            }
            if ts_ms < open.end_ms {
                open.count += 1;
                open.min = open.min.min(x);
                open.max = open.max.max(x);
                open.sum += x;
                return Added::Aggregated(None);
            }
        }
        let Some(start_ms) = ts_ms.checked_sub(ts_ms.rem_euclid(length_ms)) else {
            return Added::Late;
        };
        let Some(end_ms) = start_ms.checked_add(length_ms) else {
            return Added::Late;
        };
        // Past the open window's end (or none is open): close it, then open this reading's.
        let closed = self.close();
        self.open = Some(ClosedWindow {
            start_ms,
            end_ms,
            count: 1,
            min: x,
            max: x,
            sum: x,
        });
        Added::Aggregated(closed)
    }

    /// Closes the open window if `now_ms` has reached its end plus `grace_ms`.
    pub(crate) fn close_if_due(&mut self, now_ms: i64, grace_ms: i64) -> Option<ClosedWindow> {
        match &self.open {
            Some(open) if open.end_ms.saturating_add(grace_ms) <= now_ms => self.close(),
            _ => None,
        }
    }

    pub(crate) fn close(&mut self) -> Option<ClosedWindow> {
        let closed = self.open.take()?;
        self.closed_until_ms = closed.end_ms;
        Some(closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start_ms: i64, end_ms: i64, values: &[f64]) -> ClosedWindow {
        ClosedWindow {
            start_ms,
            end_ms,
            count: values.len() as u64,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            sum: values.iter().sum(),
        }
    }

    #[test]
    fn boundaries_exactly_at_the_edge() {
        let mut state = WindowState::default();
        assert_eq!(state.add(60_000, 1.0, 60_000), Added::Aggregated(None));
        assert_eq!(state.add(119_999, 3.0, 60_000), Added::Aggregated(None));
        // Exactly at the end: the next window, and the first one closes.
        assert_eq!(
            state.add(120_000, 5.0, 60_000),
            Added::Aggregated(Some(window(60_000, 120_000, &[1.0, 3.0])))
        );
        // One ms before the window just closed: late, never a second aggregate for it.
        assert_eq!(state.add(119_999, 9.0, 60_000), Added::Late);
        assert_eq!(
            state.add(300_000, 7.0, 60_000),
            Added::Aggregated(Some(window(120_000, 180_000, &[5.0])))
        );
    }

    #[test]
    fn negative_timestamps_align_downwards() {
        let mut state = WindowState::default();
        state.add(-1, 2.0, 60_000);
        assert_eq!(state.close(), Some(window(-60_000, 0, &[2.0])));
    }

    #[test]
    fn before_the_open_window_is_late() {
        let mut state = WindowState::default();
        state.add(125_000, 1.0, 60_000);
        assert_eq!(state.add(61_000, 1.0, 60_000), Added::Late);
        assert_eq!(state.close(), Some(window(120_000, 180_000, &[1.0])));
    }

    #[test]
    fn closing_by_the_gateway_clock_waits_for_the_grace() {
        let mut state = WindowState::default();
        state.add(0, 4.0, 60_000);
        state.add(59_999, 6.0, 60_000);
        assert_eq!(state.close_if_due(64_999, 5_000), None);
        assert_eq!(
            state.close_if_due(65_000, 5_000),
            Some(window(0, 60_000, &[4.0, 6.0]))
        );
        assert_eq!(state.close_if_due(1_000_000, 5_000), None);
        // The closed window does not reopen.
        assert_eq!(state.add(30_000, 1.0, 60_000), Added::Late);
        assert_eq!(state.add(60_000, 1.0, 60_000), Added::Aggregated(None));
    }

    #[test]
    fn the_ends_of_time_do_not_overflow() {
        let mut state = WindowState::default();
        assert_eq!(state.add(i64::MIN, 1.0, 60_000), Added::Late);
        assert_eq!(state.add(i64::MAX, 1.0, 60_000), Added::Late);
        assert_eq!(state.close(), None);
        assert_eq!(
            state.add(i64::MAX - 60_000, 1.0, 7),
            Added::Aggregated(None)
        );
    }

    #[test]
    fn aggregates_carry_the_mean() {
        let device = DeviceId::new("d").unwrap();
        let metric = MetricName::new("m").unwrap();
        let aggregate = window(0, 10, &[1.0, 2.0, 6.0]).into_aggregate(&device, &metric);
        assert_eq!(aggregate.mean, 3.0);
        assert_eq!(aggregate.count, 3);
        assert_eq!(
            (aggregate.min, aggregate.max, aggregate.sum),
            (1.0, 6.0, 9.0)
        );
    }
}
