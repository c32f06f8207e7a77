//! Stuck-sensor detection: the same float value, bit for bit, repeated more than N times or for longer than T ms.

use super::config::StuckSettings;

#[derive(Clone, Debug, Default)]
pub(crate) struct StuckState {
    /// The bits of the current run's value; meaningful once `run_len > 0`.
    value_bits: u64,
    run_len: u32,
    run_start_ms: i64,
}

impl StuckState {
    /// Adds a value at `ts_ms`; true when the run it extends is now stuck.
    pub(crate) fn observe(&mut self, x: f64, ts_ms: i64, settings: &StuckSettings) -> bool {
        if self.run_len > 0 && self.value_bits == x.to_bits() {
            self.run_len = self.run_len.saturating_add(1);
        } else {
            self.value_bits = x.to_bits();
            self.run_len = 1;
            self.run_start_ms = ts_ms;
        }
        let too_many = settings
            .max_repeats
            .is_some_and(|max_repeats| self.run_len > max_repeats);
        let too_long = settings.max_duration_ms.is_some_and(|max_duration_ms| {
            ts_ms.saturating_sub(self.run_start_ms) > max_duration_ms
        });
        too_many || too_long
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(settings: &StuckSettings, samples: &[(i64, f64)]) -> String {
        let mut state = StuckState::default();
        samples
            .iter()
            .map(|&(ts, x)| {
                if state.observe(x, ts, settings) {
                    'S'
                } else {
                    '.'
                }
            })
            .collect()
    }

    #[test]
    fn more_than_n_repeats() {
        let settings = StuckSettings {
            enabled: true,
            max_repeats: Some(3),
            max_duration_ms: None,
        };
        let samples: Vec<(i64, f64)> = [5.0, 5.0, 5.0, 5.0, 5.0, 5.1, 5.1, 5.1, 5.1]
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as i64 * 1000, x))
            .collect();
        // Three in a row is fine, the fourth is stuck; a new value starts a new run.
        assert_eq!(verdicts(&settings, &samples), "...SS...S");
    }

    #[test]
    fn longer_than_t() {
        let settings = StuckSettings {
            enabled: true,
            max_repeats: None,
            max_duration_ms: Some(10_000),
        };
        let samples = [
            (0, 1.0),
            (5_000, 1.0),
            (10_000, 1.0),
            (10_001, 1.0),
            (20_000, 2.0),
            (30_000, 2.0),
            (30_001, 2.0),
        ];
        // Exactly T is not more than T.
        assert_eq!(verdicts(&settings, &samples), "...S..S");
    }

    #[test]
    fn equality_is_bitwise() {
        let settings = StuckSettings {
            enabled: true,
            max_repeats: Some(1),
            max_duration_ms: None,
        };
        assert_eq!(
            verdicts(
                &settings,
                &[(0, 0.0), (1, -0.0), (2, -0.0), (3, 0.1 + 0.2), (4, 0.3)]
            ),
            "..S.."
        );
    }

    #[test]
    fn a_clock_jump_backwards_does_not_flag() {
        let settings = StuckSettings {
            enabled: true,
            max_repeats: None,
            max_duration_ms: Some(10_000),
        };
        assert_eq!(
            verdicts(&settings, &[(100_000, 1.0), (0, 1.0), (i64::MIN, 1.0)]),
            "..."
        );
    }
}
