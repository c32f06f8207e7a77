//! A deterministic generator of realistic sensor data: the same seed gives the same readings on
//! every machine. Used by benches, tests, the device simulators and the demo.
//!
//! Each simulated device reports, every `interval_ms`, a set of metrics shaped like a plant's
//! sensors: floats with a daily cycle, a slow random-walk drift and noise, rounded to a fixed
//! number of decimals (as a sensor with that resolution reports them); a monotonically increasing
//! integer energy counter; a status flag that rarely toggles. Devices occasionally go silent for a
//! while (gaps), and timestamps can carry jitter.

use crate::model::{DeviceId, MetricName, Quality, Reading, Value};

/// SplitMix64: tiny, fast, and fully specified, so sequences never change under us.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [low, high).
    pub fn range(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(f64::MIN_POSITIVE);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    pub fn chance(&mut self, probability: f64) -> bool {
        self.unit() < probability
    }
}

/// What one metric of a simulated device looks like.
#[derive(Clone, Debug)]
pub enum MetricShape {
    /// `base ± daily_amplitude` over a day, plus a random-walk drift and white noise (standard
    /// deviations per sample), rounded to `decimals`.
    Analog {
        base: f64,
        daily_amplitude: f64,
        drift: f64,
        noise: f64,
        decimals: u32,
    },
    /// A counter that grows by `min_step..=max_step` per sample.
    Counter { min_step: i64, max_step: i64 },
    /// A flag that toggles with this probability per sample.
    Flag { toggle_probability: f64 },
}

/// The metrics every simulated device reports by default: an environment sensor, a vibration
/// probe, an energy meter and a door contact.
pub fn default_metrics() -> Vec<(&'static str, MetricShape)> {
    let analog = |base, daily_amplitude, drift, noise| MetricShape::Analog {
        base,
        daily_amplitude,
        drift,
        noise,
        decimals: 2,
    };
    vec![
        ("temperature", analog(21.5, 3.0, 0.002, 0.02)),
        ("humidity", analog(45.0, 8.0, 0.005, 0.05)),
        ("pressure", analog(1013.2, 1.5, 0.002, 0.03)),
        ("vibration", analog(0.8, 0.05, 0.001, 0.02)),
        (
            "energy_wh",
            MetricShape::Counter {
                min_step: 3,
                max_step: 7,
            },
        ),
        (
            "door_open",
            MetricShape::Flag {
                toggle_probability: 1.0 / 1800.0,
            },
        ),
    ]
}

#[derive(Clone, Debug)]
pub struct FleetConfig {
    pub seed: u64,
    pub devices: usize,
    pub metrics: Vec<(&'static str, MetricShape)>,
    pub start_ms: i64,
    pub interval_ms: i64,
    /// Each sample's timestamp is off by up to this many milliseconds either way.
    pub jitter_ms: i64,
    /// Per device and sample, the chance that the device goes silent for 5 to 120 samples.
    pub gap_probability: f64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            devices: 10,
            metrics: default_metrics(),
            // 2026-01-01T00:00:00Z
            start_ms: 1_767_225_600_000,
            interval_ms: 1_000,
            jitter_ms: 0,
            gap_probability: 1.0 / 2_000.0,
        }
    }
}

struct MetricState {
    name: MetricName,
    shape: MetricShape,
    /// Accumulated drift for analog metrics, current count for counters, flag state for flags.
    state: f64,
    phase: f64,
}

struct DeviceState {
    id: DeviceId,
    metrics: Vec<MetricState>,
    silent_for: u32,
}

/// An endless iterator of readings from a simulated fleet, in arrival order: every device's
/// metrics at one instant, then the next instant.
pub struct SensorFleet {
    config: FleetConfig,
    rng: Rng,
    devices: Vec<DeviceState>,
    tick: i64,
    device: usize,
    metric: usize,
    ts_ms: i64,
}

impl SensorFleet {
    pub fn new(config: FleetConfig) -> Self {
        let mut rng = Rng::new(config.seed);
        let devices = (0..config.devices)
            .map(|d| DeviceState {
                id: DeviceId::new(&format!("dev-{d:04}")).expect("generated names are valid"),
                metrics: config
                    .metrics
                    .iter()
                    .map(|(name, shape)| MetricState {
                        name: MetricName::new(name).expect("metric names are valid"),
                        shape: shape.clone(),
                        state: match shape {
                            MetricShape::Counter { .. } => (rng.next_u64() % 1_000_000) as f64,
                            _ => 0.0,
                        },
                        phase: rng.range(0.0, std::f64::consts::TAU),
                    })
                    .collect(),
                silent_for: 0,
            })
            .collect();
        let ts_ms = config.start_ms;
        Self {
            config,
            rng,
            devices,
            tick: 0,
            device: 0,
            metric: 0,
            ts_ms,
        }
    }

    /// The fleet's device ids.
    pub fn device_ids(&self) -> impl Iterator<Item = &DeviceId> {
        self.devices.iter().map(|d| &d.id)
    }

    fn sample(rng: &mut Rng, metric: &mut MetricState, tick: i64, interval_ms: i64) -> Value {
        match metric.shape {
            MetricShape::Analog {
                base,
                daily_amplitude,
                drift,
                noise,
                decimals,
            } => {
                metric.state += drift * rng.normal();
                let day_fraction = (tick * interval_ms) as f64 / 86_400_000.0;
                let x = base
                    + daily_amplitude * (std::f64::consts::TAU * day_fraction + metric.phase).sin()
                    + metric.state
                    + noise * rng.normal();
                let scale = 10f64.powi(decimals as i32);
                // Dividing the integer by the power of ten yields exactly the f64 that parsing
                // the decimal string (say "21.53") yields.
                Value::F64((x * scale).round() / scale)
            }
            MetricShape::Counter { min_step, max_step } => {
                let span = (max_step - min_step + 1) as u64;
                metric.state += (min_step + (rng.next_u64() % span) as i64) as f64;
                Value::I64(metric.state as i64)
            }
            MetricShape::Flag { toggle_probability } => {
                if rng.chance(toggle_probability) {
                    metric.state = 1.0 - metric.state;
                }
                Value::Bool(metric.state != 0.0)
            }
        }
    }
}

impl Iterator for SensorFleet {
    type Item = Reading;

    fn next(&mut self) -> Option<Reading> {
        if self.devices.is_empty() || self.config.metrics.is_empty() {
            return None;
        }
        loop {
            if self.metric == 0 {
                // Starting a device's sample: decide whether it is silent and when it sampled.
                let device = &mut self.devices[self.device];
                if device.silent_for == 0 && self.rng.chance(self.config.gap_probability) {
                    device.silent_for = 5 + (self.rng.next_u64() % 116) as u32;
                }
                if device.silent_for > 0 {
                    device.silent_for -= 1;
                    self.advance_device();
                    continue;
                }
                let jitter = if self.config.jitter_ms > 0 {
                    let span = 2 * self.config.jitter_ms as u64 + 1;
                    (self.rng.next_u64() % span) as i64 - self.config.jitter_ms
                } else {
                    0
                };
                self.ts_ms = self.config.start_ms + self.tick * self.config.interval_ms + jitter;
            }
            let device = &mut self.devices[self.device];
            let metric = &mut device.metrics[self.metric];
            let value = Self::sample(&mut self.rng, metric, self.tick, self.config.interval_ms);
            let reading = Reading {
                device: device.id.clone(),
                metric: metric.name.clone(),
                ts_ms: self.ts_ms,
                value,
                quality: Quality::Good,
            };
            self.metric += 1;
            if self.metric == device.metrics.len() {
                self.metric = 0;
                self.advance_device();
            }
            return Some(reading);
        }
    }
}

impl SensorFleet {
    fn advance_device(&mut self) {
        self.device += 1;
        if self.device == self.devices.len() {
            self.device = 0;
            self.tick += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_readings() {
        let a: Vec<_> = SensorFleet::new(FleetConfig::default())
            .take(5_000)
            .collect();
        let b: Vec<_> = SensorFleet::new(FleetConfig::default())
            .take(5_000)
            .collect();
        assert_eq!(a, b);
        let other = FleetConfig {
            seed: 2,
            ..FleetConfig::default()
        };
        let c: Vec<_> = SensorFleet::new(other).take(5_000).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn analog_values_have_the_configured_decimals() {
        for reading in SensorFleet::new(FleetConfig::default()).take(10_000) {
            if let Value::F64(v) = reading.value {
                let text = v.to_string();
                let decimals = text.split('.').nth(1).map_or(0, str::len);
                assert!(decimals <= 2, "{} = {text}", reading.metric);
            }
        }
    }

    #[test]
    fn counters_grow_and_timestamps_follow_the_interval() {
        let config = FleetConfig {
            devices: 1,
            gap_probability: 0.0,
            ..FleetConfig::default()
        };
        let readings: Vec<_> = SensorFleet::new(config).take(600).collect();
        let energy: Vec<i64> = readings
            .iter()
            .filter_map(|r| match r.value {
                Value::I64(v) => Some(v),
                _ => None,
            })
            .collect();
        assert_eq!(energy.len(), 100);
        assert!(energy.windows(2).all(|w| (3..=7).contains(&(w[1] - w[0]))));
        let ts: Vec<i64> = readings.iter().step_by(6).map(|r| r.ts_ms).collect();
        assert!(ts.windows(2).all(|w| w[1] - w[0] == 1_000));
    }

    #[test]
    fn devices_sometimes_go_silent() {
        let config = FleetConfig {
            devices: 4,
            gap_probability: 0.01,
            ..FleetConfig::default()
        };
        let n_metrics = config.metrics.len();
        let readings: Vec<_> = SensorFleet::new(config).take(60_000).collect();
        let last_ts = readings.last().unwrap().ts_ms;
        let ticks = (last_ts - FleetConfig::default().start_ms) / 1_000;
        // Without gaps there would be 4 devices × metrics per tick.
        assert!(readings.len() < (ticks as usize) * 4 * n_metrics);
    }
}
