//! Anomaly flags: the robust z-score 0.6745 · |x − median| / MAD over a rolling window (Iglewicz and Hoaglin).
//!
//! Like spike detection the value is judged against the previous values and then enters the
//! window; unlike it, this only ever flags, and its window is longer, so it catches values that
//! are unusual for the series' recent behaviour rather than single-sample jumps.

use super::config::AnomalySettings;
use super::rolling::RollingWindow;

/// 0.6745 is the 75th percentile of the standard normal: it makes MAD comparable to σ.
const MAD_TO_Z: f64 = 0.6745;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum AnomalyVerdict {
    WarmingUp,
    /// MAD is 0 and there is no floor: no scale to judge by.
    Flat,
    Normal,
    Anomaly {
        z: f64,
    },
}

pub(crate) fn judge(window: &RollingWindow, x: f64, settings: &AnomalySettings) -> AnomalyVerdict {
    if window.len() < settings.min_samples {
        return AnomalyVerdict::WarmingUp;
    }
    let median = window.median();
    let scale = window.mad(median).max(settings.mad_floor);
    if scale <= 0.0 {
        return AnomalyVerdict::Flat;
    }
    let z = MAD_TO_Z * (x - median).abs() / scale;
    if z > settings.threshold {
        AnomalyVerdict::Anomaly { z }
    } else {
        AnomalyVerdict::Normal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(window: usize, min_samples: usize, threshold: f64) -> AnomalySettings {
        AnomalySettings {
            window,
            min_samples,
            threshold,
            ..AnomalySettings::default()
        }
    }

    #[test]
    fn z_scores_by_hand() {
        let mut window = RollingWindow::new(5);
        for x in [10.0, 11.0, 12.0, 13.0, 14.0] {
            window.push(x);
        }
        // Median 12, MAD 1: z = 0.6745 · |x − 12|.
        let s = settings(5, 5, 3.5);
        for (x, expected) in [
            (12.0, AnomalyVerdict::Normal),
            (17.0, AnomalyVerdict::Normal),
            (17.2, AnomalyVerdict::Anomaly { z: MAD_TO_Z * 5.2 }),
            (6.0, AnomalyVerdict::Anomaly { z: MAD_TO_Z * 6.0 }),
        ] {
            let verdict = judge(&window, x, &s);
            match (verdict, expected) {
                (AnomalyVerdict::Anomaly { z }, AnomalyVerdict::Anomaly { z: want }) => {
                    assert!((z - want).abs() < 1e-12, "{x}: {z} vs {want}")
                }
                _ => assert_eq!(verdict, expected, "{x}"),
            }
        }
    }

    #[test]
    fn warm_up_and_flat_windows_are_not_judged() {
        let mut window = RollingWindow::new(8);
        let s = settings(8, 4, 3.5);
        for x in [1.0, 1.0, 1.0] {
            assert_eq!(judge(&window, 100.0, &s), AnomalyVerdict::WarmingUp);
            window.push(x);
        }
        window.push(1.0);
        assert_eq!(judge(&window, 100.0, &s), AnomalyVerdict::Flat);
        let floored = AnomalySettings {
            mad_floor: 1.0,
            ..s
        };
        assert!(matches!(
            judge(&window, 100.0, &floored),
            AnomalyVerdict::Anomaly { .. }
        ));
        assert_eq!(judge(&window, 2.0, &floored), AnomalyVerdict::Normal);
    }
}
