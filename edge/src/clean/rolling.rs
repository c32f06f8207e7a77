//! A fixed-size rolling window of floats kept sorted, for the rolling median and MAD of spike and anomaly detection.
//!
//! Each push replaces the oldest value: a binary search and a short `memmove` in the sorted copy,
//! no allocation once the window is full. The median is then read in O(1) and the median
//! absolute deviation by merging the distances on either side of the median, O(window / 2),
//! without copying or sorting.

use std::cmp::Ordering;

#[derive(Clone, Debug)]
pub(crate) struct RollingWindow {
    /// Values in arrival order; once full, `next` is the oldest.
    ring: Vec<f64>,
    next: usize,
    sorted: Vec<f64>,
    capacity: usize,
}

impl RollingWindow {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            ring: Vec::with_capacity(capacity),
            next: 0,
            sorted: Vec::with_capacity(capacity),
            capacity,
        }
    }

    /// A window for a disabled step: holds nothing and allocates nothing.
    pub(crate) fn disabled() -> Self {
        Self::new(0)
    }

    pub(crate) fn len(&self) -> usize {
        self.sorted.len()
    }

    /// Adds `x` (finite), dropping the oldest value when full.
    pub(crate) fn push(&mut self, x: f64) {
        if self.capacity == 0 {
            return;
        }
        if self.ring.len() < self.capacity {
            self.ring.push(x);
        } else {
            let oldest = std::mem::replace(&mut self.ring[self.next], x);
            self.next = (self.next + 1) % self.capacity;
            // `total_cmp` equality is bit equality, so this finds the very value pushed earlier.
            let at = self
                .sorted
                .partition_point(|v| v.total_cmp(&oldest) == Ordering::Less);
            self.sorted.remove(at);
        }
        let at = self
            .sorted
            .partition_point(|v| v.total_cmp(&x) != Ordering::Greater);
        self.sorted.insert(at, x);
    }

    /// The median; the mean of the two middle values for an even count. The window must not be empty.
    pub(crate) fn median(&self) -> f64 {
        let n = self.sorted.len();
        debug_assert!(n > 0);
        if n % 2 == 1 {
            self.sorted[n / 2]
        } else {
            midpoint(self.sorted[n / 2 - 1], self.sorted[n / 2])
        }
    }

    /// The median of `|x − median|` over the window. The window must not be empty.
    pub(crate) fn mad(&self, median: f64) -> f64 {
        let values = &self.sorted;
        let n = values.len();
        debug_assert!(n > 0);
        // Distances grow going left from the split and going right from it: merge the two runs.
        let split = values.partition_point(|&v| v < median);
        let (mut left, mut right) = (split, split);
        let mut next_distance = || {
            let from_left = (left > 0).then(|| median - values[left - 1]);
            let from_right = (right < n).then(|| values[right] - median);
            match (from_left, from_right) {
                (Some(l), Some(r)) if l <= r => {
                    left -= 1;
                    l
                }
                (Some(l), None) => {
                    left -= 1;
                    l
                }
                (_, Some(r)) => {
                    right += 1;
                    r
                }
                (None, None) => 0.0,
            }
        };
        for _ in 0..(n - 1) / 2 {
            next_distance();
        }
        let lower = next_distance();
        if n % 2 == 1 {
            lower
        } else {
            midpoint(lower, next_distance())
        }
    }
}

/// `(a + b) / 2` without overflowing to infinity for huge finite values.
fn midpoint(a: f64, b: f64) -> f64 {
    a / 2.0 + b / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive_median(values: &[f64]) -> f64 {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        if n % 2 == 1 {
            sorted[n / 2]
        } else {
            midpoint(sorted[n / 2 - 1], sorted[n / 2])
        }
    }

    #[test]
    fn median_and_mad_by_hand() {
        let check = |values: &[f64], median: f64, mad: f64| {
            let mut window = RollingWindow::new(values.len());
            for &v in values {
                window.push(v);
            }
            assert_eq!(window.median(), median, "{values:?}");
            assert_eq!(window.mad(window.median()), mad, "{values:?}");
        };
        check(&[5.0], 5.0, 0.0);
        check(&[1.0, 3.0], 2.0, 1.0);
        check(&[1.0, 2.0, 3.0, 4.0, 100.0], 3.0, 1.0);
        check(&[20.0, 20.0, 20.0, 20.1, 20.0], 20.0, 0.0);
        check(&[1.0, 1.0, 2.0, 2.0, 4.0, 6.0, 9.0], 2.0, 1.0);
        check(&[-3.0, -1.0, 0.0, 10.0], -0.5, 1.5);
    }

    #[test]
    fn the_oldest_value_leaves_first() {
        let mut window = RollingWindow::new(3);
        for v in [1.0, 2.0, 3.0, 100.0, 100.0] {
            window.push(v);
        }
        // Holds 3, 100, 100.
        assert_eq!(window.len(), 3);
        assert_eq!(window.median(), 100.0);
        assert_eq!(window.mad(100.0), 0.0);
    }

    #[test]
    fn a_disabled_window_stays_empty() {
        let mut window = RollingWindow::disabled();
        window.push(1.0);
        assert_eq!(window.len(), 0);
    }

    proptest! {
        #[test]
        fn matches_a_naive_computation(
            capacity in 1usize..12,
            values in prop::collection::vec(prop_oneof![-5i32..5, -1000i32..1000].prop_map(f64::from), 1..60),
        ) {
            let mut window = RollingWindow::new(capacity);
            for (i, &v) in values.iter().enumerate() {
                window.push(v);
                let start = (i + 1).saturating_sub(capacity);
                let held = &values[start..=i];
                let median = naive_median(held);
                prop_assert_eq!(window.median(), median);
                let deviations: Vec<f64> = held.iter().map(|x| (x - median).abs()).collect();
                prop_assert_eq!(window.mad(median), naive_median(&deviations));
            }
        }
    }
}
