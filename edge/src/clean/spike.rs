//! Spike detection: a value departing from the rolling median by more than k × MAD, or by more than an absolute step.
//!
//! The value is judged against the window of previous values, then enters it whatever the
//! verdict: a spike of one sample cannot move the median, while a real level shift becomes the
//! new median after half a window instead of being refused forever. Until the window holds
//! `min_samples` values nothing is judged, so a spike at the very start of a series passes (it is
//! counted as warming up) and, being one value of many, does not disturb later judgements.

use super::config::SpikeSettings;
use super::rolling::RollingWindow;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum SpikeVerdict {
    WarmingUp,
    /// The window is flat (MAD 0, no floor) and no absolute step is set: no scale to judge by.
    Flat,
    Normal,
    Spike {
        median: f64,
        deviation: f64,
        threshold: f64,
    },
}

pub(crate) fn judge(window: &RollingWindow, x: f64, settings: &SpikeSettings) -> SpikeVerdict {
    if window.len() < settings.min_samples {
        return SpikeVerdict::WarmingUp;
    }
    let median = window.median();
    let deviation = (x - median).abs();
    let scale = window.mad(median).max(settings.mad_floor);
    let by_mad = (scale > 0.0).then_some(settings.k * scale);
    let threshold = match (by_mad, settings.max_step) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => return SpikeVerdict::Flat,
    };
    if deviation > threshold {
        SpikeVerdict::Spike {
            median,
            deviation,
            threshold,
        }
    } else {
        SpikeVerdict::Normal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs values through a window as the pipeline does (judge, then push) and returns the
    /// verdicts, with spikes shortened to `S` for readable tables.
    fn verdicts(settings: &SpikeSettings, values: &[f64]) -> String {
        let mut window = RollingWindow::new(settings.window);
        let mut out = String::new();
        for &x in values {
            out.push(match judge(&window, x, settings) {
                SpikeVerdict::WarmingUp => 'w',
                SpikeVerdict::Flat => 'f',
                SpikeVerdict::Normal => '.',
                SpikeVerdict::Spike { .. } => 'S',
            });
            window.push(x);
        }
        out
    }

    fn settings(window: usize, min_samples: usize, k: f64) -> SpikeSettings {
        SpikeSettings {
            window,
            min_samples,
            k,
            ..SpikeSettings::default()
        }
    }

    #[test]
    fn a_lone_spike_is_caught_and_forgotten() {
        let s = settings(5, 5, 8.0);
        let values = [20.0, 20.2, 19.9, 20.1, 20.0, 20.1, 35.0, 20.0, 19.9, 20.2];
        assert_eq!(verdicts(&s, &values), "wwwww.S...");
    }

    #[test]
    fn a_spike_at_the_start_of_a_series() {
        // The first value is wild: nothing can be judged yet, and it is one value among five
        // when judging begins, so the median and MAD ignore it and normal values pass.
        let s = settings(5, 5, 8.0);
        let values = [999.0, 20.1, 20.2, 20.0, 20.3, 20.1, 20.2, 20.0, 40.0];
        assert_eq!(verdicts(&s, &values), "wwwww...S");
    }

    #[test]
    fn a_level_shift_becomes_the_new_normal() {
        let s = settings(5, 3, 8.0);
        let values = [10.0, 10.1, 9.9, 10.0, 50.0, 50.1, 49.9, 50.0, 50.1, 50.0];
        // The shift is flagged until it holds the majority of the window.
        assert_eq!(verdicts(&s, &values), "www.SSS...");
    }

    #[test]
    fn a_flat_window_needs_a_floor_or_a_step() {
        let flat = [20.0, 20.0, 20.0, 20.0, 20.0, 20.1, 900.0];
        assert_eq!(verdicts(&settings(5, 5, 8.0), &flat), "wwwwwff");
        let floored = SpikeSettings {
            mad_floor: 0.05,
            ..settings(5, 5, 8.0)
        };
        // 0.1 is within 8 × 0.05; 900 is not.
        assert_eq!(verdicts(&floored, &flat), "wwwww.S");
        let stepped = SpikeSettings {
            max_step: Some(50.0),
            ..settings(5, 5, 8.0)
        };
        assert_eq!(verdicts(&stepped, &flat), "wwwww.S");
    }

    #[test]
    fn the_absolute_step_applies_with_a_wide_mad() {
        let s = SpikeSettings {
            max_step: Some(5.0),
            ..settings(5, 5, 8.0)
        };
        // A noisy window (MAD 2, k × MAD = 16): the step of 5 is the tighter threshold.
        let values = [0.0, 4.0, -4.0, 2.0, -2.0, 6.0, 0.0];
        assert_eq!(verdicts(&s, &values), "wwwwwS.");
    }

    #[test]
    fn the_verdict_carries_its_numbers() {
        let s = settings(3, 3, 2.0);
        let mut window = RollingWindow::new(3);
        for x in [1.0, 2.0, 3.0] {
            window.push(x);
        }
        assert_eq!(
            judge(&window, 10.0, &s),
            SpikeVerdict::Spike {
                median: 2.0,
                deviation: 8.0,
                threshold: 2.0
            }
        );
        // Exactly at the threshold is not a spike.
        assert_eq!(judge(&window, 4.0, &s), SpikeVerdict::Normal);
    }
}
