//! The configuration compiled: per step, globs and resolved, validated settings; per series, the index of its matching rule.

use super::config::{
    AnomalySettings, CheckSettings, CleanConfig, ConfigError, DedupeSettings, RangeSettings,
    Selector, SkewSettings, SpikeSettings, Step, StepRule, StuckSettings, WindowSettings,
};
use super::glob::Glob;
use super::units::Conversion;

struct CompiledRule<T> {
    device: Glob,
    metric: Glob,
    settings: T,
}

/// One step: its rules in order, then its defaults at index `rules.len()`.
pub(crate) struct CompiledStep<T> {
    rules: Vec<CompiledRule<T>>,
    defaults: T,
}

impl<T> CompiledStep<T> {
    /// Compiles a step's section; `build` checks one resolved settings table (named by its key
    /// prefix) and turns it into what the pipeline uses.
    fn compile<S, R>(
        name: &str,
        step: &Step<S, R>,
        build: impl Fn(&S, &str) -> Result<T, ConfigError>,
    ) -> Result<Self, ConfigError>
    where
        R: StepRule<S>,
    {
        let defaults = build(&step.defaults, &format!("clean.{name}.defaults"))?;
        let mut rules = Vec::with_capacity(step.rules.len());
        for (i, rule) in step.rules.iter().enumerate() {
            let prefix = format!("clean.{name}.rules[{i}]");
            let glob = |which: Selector| {
                let pattern = rule.selector(which);
                Glob::new(pattern).map_err(|reason| {
                    ConfigError::new(
                        format!("{prefix}.{}", which.key()),
                        format!("{pattern:?}: {reason}"),
                    )
                })
            };
            let device = glob(Selector::Device)?;
            let metric = glob(Selector::Metric)?;
            let settings = build(&rule.resolve(&step.defaults), &prefix)?;
            rules.push(CompiledRule {
                device,
                metric,
                settings,
            });
        }
        Ok(Self { rules, defaults })
    }

    /// The index of the first rule matching the series, or of the defaults.
    pub(crate) fn resolve(&self, device: &str, metric: &str) -> u32 {
        self.rules
            .iter()
            .position(|rule| rule.device.is_match(device) && rule.metric.is_match(metric))
            .unwrap_or(self.rules.len()) as u32
    }

    pub(crate) fn get(&self, index: u32) -> &T {
        self.rules
            .get(index as usize)
            .map_or(&self.defaults, |rule| &rule.settings)
    }
}

fn checked<S: CheckSettings + Clone>(settings: &S, prefix: &str) -> Result<S, ConfigError> {
    settings.check(prefix)?;
    Ok(settings.clone())
}

/// Every step, compiled.
pub(crate) struct Rules {
    pub(crate) range: CompiledStep<RangeSettings>,
    pub(crate) dedupe: CompiledStep<DedupeSettings>,
    pub(crate) units: CompiledStep<Option<Conversion>>,
    pub(crate) skew: CompiledStep<SkewSettings>,
    pub(crate) spike: CompiledStep<SpikeSettings>,
    pub(crate) stuck: CompiledStep<StuckSettings>,
    pub(crate) anomaly: CompiledStep<AnomalySettings>,
    pub(crate) windows: CompiledStep<WindowSettings>,
}

/// The rule index of each step for one series, found once when the series is first seen.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SeriesRules {
    pub(crate) range: u32,
    pub(crate) dedupe: u32,
    pub(crate) units: u32,
    pub(crate) spike: u32,
    pub(crate) stuck: u32,
    pub(crate) anomaly: u32,
    pub(crate) windows: u32,
}

impl Rules {
    pub(crate) fn compile(config: &CleanConfig) -> Result<Self, ConfigError> {
        config.check_limits()?;
        Ok(Self {
            range: CompiledStep::compile("range", &config.range, checked)?,
            dedupe: CompiledStep::compile("dedupe", &config.dedupe, checked)?,
            units: CompiledStep::compile("units", &config.units, Conversion::from_settings)?,
            skew: CompiledStep::compile("skew", &config.skew, checked)?,
            spike: CompiledStep::compile("spike", &config.spike, checked)?,
            stuck: CompiledStep::compile("stuck", &config.stuck, checked)?,
            anomaly: CompiledStep::compile("anomaly", &config.anomaly, checked)?,
            windows: CompiledStep::compile("windows", &config.windows, checked)?,
        })
    }

    pub(crate) fn resolve_series(&self, device: &str, metric: &str) -> SeriesRules {
        SeriesRules {
            range: self.range.resolve(device, metric),
            dedupe: self.dedupe.resolve(device, metric),
            units: self.units.resolve(device, metric),
            spike: self.spike.resolve(device, metric),
            stuck: self.stuck.resolve(device, metric),
            anomaly: self.anomaly.resolve(device, metric),
            windows: self.windows.resolve(device, metric),
        }
    }

    /// Skew rules select devices only (their metric glob is always `*`).
    pub(crate) fn resolve_device(&self, device: &str) -> u32 {
        self.skew.resolve(device, "")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clean::config::{RangeRule, SpikeRule};

    #[test]
    fn first_match_wins_and_the_defaults_come_last() {
        let mut config = CleanConfig::default();
        config.range.rules = vec![
            RangeRule {
                device: "plc-*".into(),
                metric: "temp*".into(),
                max: Some(100.0),
                ..RangeRule::default()
            },
            RangeRule {
                metric: "temp*".into(),
                max: Some(50.0),
                ..RangeRule::default()
            },
        ];
        config.spike.rules = vec![SpikeRule {
            device: "sim-?".into(),
            k: Some(3.0),
            ..SpikeRule::default()
        }];
        let rules = Rules::compile(&config).unwrap();
        let default_k = SpikeSettings::default().k;
        let check = |device: &str, metric: &str, max: f64, k: f64| {
            let series = rules.resolve_series(device, metric);
            assert_eq!(rules.range.get(series.range).max, max, "{device}/{metric}");
            assert_eq!(rules.spike.get(series.spike).k, k, "{device}/{metric}");
        };
        check("plc-1", "temperature", 100.0, default_k);
        check("meter-2", "temperature", 50.0, default_k);
        check("meter-2", "power", f64::INFINITY, default_k);
        check("sim-1", "power", f64::INFINITY, 3.0);
        check("sim-10", "temp", 50.0, default_k);
    }
}
