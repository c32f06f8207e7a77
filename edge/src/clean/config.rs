//! The `[clean]` configuration section: limits, and per step a `defaults` table plus `rules` selected by globs.
//!
//! Every step has the same shape:
//!
//! ```toml
//! [clean.spike.defaults]          # what applies when no rule matches
//! k = 12.0
//!
//! [[clean.spike.rules]]           # first match wins; device and metric default to "*"
//! metric = "flow*"
//! action = "reject"               # keys left out come from clean.spike.defaults
//! ```
//!
//! Rules are matched once per series (device, metric) when the series is first seen, and the
//! match is cached with the series' state. Clock-skew rules select devices only.
//! Every table is `deny_unknown_fields`: a typo is an error naming the key.

use serde::{Deserialize, Serialize};

/// Why a `[clean]` section was refused: the full key to fix and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    /// The dotted key, e.g. `clean.units.rules[2].to`.
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// What to do with a reading that fails a check: refuse it, or keep it as `Uncertain` with a flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Reject,
    Flag,
}

/// The value kind a metric must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpectedKind {
    /// No check.
    Any,
    /// `f64` or `i64`, each kept as it is.
    Number,
    /// `f64`; an `i64` of at most 2^53 in magnitude is converted to `f64`.
    F64,
    I64,
    Bool,
    Str,
}

impl ExpectedKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExpectedKind::Any => "any",
            ExpectedKind::Number => "number",
            ExpectedKind::F64 => "f64",
            ExpectedKind::I64 => "i64",
            ExpectedKind::Bool => "bool",
            ExpectedKind::Str => "str",
        }
    }
}

/// The whole `[clean]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CleanConfig {
    /// Most series (device, metric) whose state is kept; the least recently seen is evicted
    /// (its open window is emitted first). A series holds about 16 bytes per dedupe history
    /// entry and per spike and anomaly window value, plus ~200: 1.6 KiB with the defaults, so
    /// the default limit bounds series state at ~32 MiB.
    pub max_series: usize,
    /// Most devices whose clock-skew state is kept; least recently seen evicted.
    pub max_devices: usize,
    /// Most closed window aggregates kept until `drain_windows`; beyond, new ones are counted
    /// in `windows.dropped` and dropped.
    pub max_pending_windows: usize,
    pub quarantine: QuarantineConfig,
    pub range: Step<RangeSettings, RangeRule>,
    pub dedupe: Step<DedupeSettings, DedupeRule>,
    pub units: Step<UnitSettings, UnitRule>,
    pub skew: Step<SkewSettings, SkewRule>,
    pub spike: Step<SpikeSettings, SpikeRule>,
    pub stuck: Step<StuckSettings, StuckRule>,
    pub anomaly: Step<AnomalySettings, AnomalyRule>,
    pub windows: Step<WindowSettings, WindowRule>,
}

impl Default for CleanConfig {
    fn default() -> Self {
        Self {
            max_series: 20_000,
            max_devices: 5_000,
            max_pending_windows: 100_000,
            quarantine: QuarantineConfig::default(),
            range: Step::default(),
            dedupe: Step::default(),
            units: Step::default(),
            skew: Step::default(),
            spike: Step::default(),
            stuck: Step::default(),
            anomaly: Step::default(),
            windows: Step::default(),
        }
    }
}

/// `[clean.quarantine]`: the bounded ring of rejected readings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuarantineConfig {
    /// Entries kept; the oldest falls off the end (counted in `evicted`).
    pub capacity: usize,
    /// Whether exact duplicates (resends of a reading already accepted, so no data is lost by
    /// dropping them) go to the quarantine too. They are always counted.
    pub keep_duplicates: bool,
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            keep_duplicates: false,
        }
    }
}

/// One step's section: the defaults and the rules, first match wins.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Step<S, R> {
    pub defaults: S,
    pub rules: Vec<R>,
}

/// Which name a rule's glob selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Selector {
    Device,
    Metric,
}

impl Selector {
    pub(crate) fn key(self) -> &'static str {
        match self {
            Selector::Device => "device",
            Selector::Metric => "metric",
        }
    }
}

/// A rule of one step: its globs, and the settings it resolves to over the step's defaults.
pub(crate) trait StepRule<S> {
    fn resolve(&self, defaults: &S) -> S;
    /// The glob for `which`; `*` for a selector the rule does not have.
    fn selector(&self, which: Selector) -> &str;
}

/// Checks one resolved settings table; `prefix` is its key (`clean.spike.rules[3]`).
pub(crate) trait CheckSettings {
    fn check(&self, prefix: &str) -> Result<(), ConfigError>;
}

fn any_name() -> String {
    "*".to_owned()
}

/// Declares a step's settings table (every key with its default) and its rule table (the same
/// keys, each optional, plus the selecting globs), so the two can never drift apart.
macro_rules! step_settings {
    (
        $(#[$settings_meta:meta])*
        settings $settings:ident;
        $(#[$rule_meta:meta])*
        rule $rule:ident selects [$($selector:ident),+];
        {
            $(
                $(#[$field_meta:meta])*
                $field:ident: $ty:ty = $default:expr
            ),* $(,)?
        }
    ) => {
        $(#[$settings_meta])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $settings {
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        impl Default for $settings {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        $(#[$rule_meta])*
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $rule {
            $(
                #[doc = concat!("Glob over ", stringify!($selector), " names; `*` when left out.")]
                #[serde(default = "any_name")]
                pub $selector: String,
            )+
            $(
                $(#[$field_meta])*
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
        }

        impl Default for $rule {
            fn default() -> Self {
                Self { $( $selector: any_name(), )+ $( $field: None, )* }
            }
        }

        impl StepRule<$settings> for $rule {
            fn resolve(&self, defaults: &$settings) -> $settings {
                $settings {
                    $(
                        $field: match &self.$field {
                            Some(value) => <$ty as Clone>::clone(value),
                            None => <$ty as Clone>::clone(&defaults.$field),
                        },
                    )*
                }
            }

            fn selector(&self, which: Selector) -> &str {
                $(
                    if which.key() == stringify!($selector) {
                        return &self.$selector;
                    }
                )+
                "*"
            }
        }
    };
}

step_settings! {
    /// `clean.range`: the value kind and the acceptable range of a series.
    settings RangeSettings;
    /// A `[[clean.range.rules]]` entry.
    rule RangeRule selects [device, metric];
    {
        /// `any`, `number`, `f64` (integers are converted), `i64`, `bool` or `str`.
        kind: ExpectedKind = ExpectedKind::Any,
        /// Smallest acceptable value, in the normalised unit (after `clean.units`).
        min: f64 = f64::NEG_INFINITY,
        /// Largest acceptable value, in the normalised unit.
        max: f64 = f64::INFINITY,
        /// `reject`, or `flag` to keep the reading as `Uncertain`.
        action: Action = Action::Reject,
    }
}

step_settings! {
    /// `clean.dedupe`: duplicate suppression by (device, metric, device timestamp).
    settings DedupeSettings;
    /// A `[[clean.dedupe.rules]]` entry.
    rule DedupeRule selects [device, metric];
    {
        enabled: bool = true,
        /// Distinct timestamps remembered per series, most recent by arrival. A resend older
        /// than all of them passes (counted as `dedupe.beyond_window`).
        history: usize = 32,
    }
}

step_settings! {
    /// `clean.units`: conversion to the normalised unit, either `from` and `to` from the unit
    /// table or an explicit `scale` and `offset` (`value * scale + offset`). Nothing by default.
    settings UnitSettings;
    /// A `[[clean.units.rules]]` entry.
    rule UnitRule selects [device, metric];
    {
        /// Source unit, e.g. `degF`, `psi`, `Wh`, `mA`.
        from: Option<String> = None,
        /// Target unit of the same dimension, e.g. `degC`, `hPa`, `kWh`, `A`.
        to: Option<String> = None,
        scale: Option<f64> = None,
        offset: Option<f64> = None,
    }
}

step_settings! {
    /// `clean.skew`: per-device clock offset estimation, timestamp correction and the future bound.
    settings SkewSettings;
    /// A `[[clean.skew.rules]]` entry; skew is a property of a device's clock, so rules select
    /// devices only.
    rule SkewRule selects [device];
    {
        /// Estimate the offset and correct timestamps.
        enabled: bool = true,
        /// Offset samples (one per distinct device timestamp) the estimate is taken over.
        window: usize = 16,
        /// The estimate moves only when the window's samples agree within this many ms, so a
        /// burst of buffered old readings or a single wild timestamp cannot move it.
        max_spread_ms: i64 = 1_000,
        /// Timestamps are corrected only when the estimated offset exceeds this, in magnitude.
        threshold_ms: i64 = 2_000,
        /// Readings stamped (after correction) later than receive time plus this are rejected.
        /// Applies even with `enabled = false`.
        max_future_ms: Option<i64> = Some(60_000),
    }
}

step_settings! {
    /// `clean.spike`: departures from the rolling median of numeric series.
    settings SpikeSettings;
    /// A `[[clean.spike.rules]]` entry.
    rule SpikeRule selects [device, metric];
    {
        enabled: bool = true,
        /// Values in the rolling window (the current value is judged against the previous ones).
        /// The MAD of a short window is itself noisy: on Gaussian noise, 9 values and k = 8 flag
        /// about 1% of readings, 25 values and k = 10 about 0.01%.
        window: usize = 25,
        /// No judgement until the window holds this many values.
        min_samples: usize = 15,
        /// A spike departs from the median by more than `k` times the MAD (k = 10 is about 6.7 σ
        /// on Gaussian noise).
        k: f64 = 10.0,
        /// The MAD used is at least this (in the normalised unit); with both at 0 a flat window
        /// (MAD = 0) gives no judgement by MAD.
        mad_floor: f64 = 0.0,
        /// A departure from the median larger than this absolute step is a spike too.
        max_step: Option<f64> = None,
        /// `flag` (default) or `reject`. Rejected values still enter the window, so a real
        /// level shift becomes the new normal instead of being refused forever.
        action: Action = Action::Flag,
    }
}

step_settings! {
    /// `clean.stuck`: the same float value repeated too many times or for too long. Off by
    /// default: enable it for analog metrics (setpoints and flags repeat legitimately).
    settings StuckSettings;
    /// A `[[clean.stuck.rules]]` entry.
    rule StuckRule selects [device, metric];
    {
        enabled: bool = false,
        /// Flag once the same value has come more than this many times in a row.
        max_repeats: Option<u32> = Some(30),
        /// Flag once the same value has lasted more than this many ms (by corrected timestamps).
        max_duration_ms: Option<i64> = None,
    }
}

step_settings! {
    /// `clean.anomaly`: robust z-score, 0.6745 · |x − median| / MAD over a rolling window.
    settings AnomalySettings;
    /// A `[[clean.anomaly.rules]]` entry.
    rule AnomalyRule selects [device, metric];
    {
        enabled: bool = true,
        window: usize = 32,
        min_samples: usize = 16,
        /// Flag when the robust z-score exceeds this (6 is |x − median| > 8.9 MAD).
        threshold: f64 = 6.0,
        /// The MAD used is at least this; a flat window with a zero floor gives no judgement.
        mad_floor: f64 = 0.0,
    }
}

step_settings! {
    /// `clean.windows`: tumbling-window aggregates (min, max, sum, mean, count) per numeric series.
    settings WindowSettings;
    /// A `[[clean.windows.rules]]` entry.
    rule WindowRule selects [device, metric];
    {
        enabled: bool = true,
        /// Window length; windows are aligned to multiples of it since the Unix epoch and are
        /// half-open: a reading at exactly the end belongs to the next window.
        length_ms: i64 = 60_000,
        /// `drain_windows(now)` closes a window once `now >= end + grace_ms`; a later reading of
        /// the series closes it at once.
        grace_ms: i64 = 5_000,
        /// Whether `Uncertain` readings count in aggregates. `Bad` ones never do.
        include_uncertain: bool = false,
    }
}

const MAX_ROLLING_WINDOW: usize = 1024;
const MAX_TABLE_ENTRIES: usize = 10_000_000;

fn check_range<T: PartialOrd + std::fmt::Display>(
    prefix: &str,
    key: &str,
    value: T,
    low: T,
    high: T,
) -> Result<(), ConfigError> {
    if value < low || value > high {
        return Err(ConfigError::new(
            format!("{prefix}.{key}"),
            format!("{value} is out of bounds; use {low} to {high}"),
        ));
    }
    Ok(())
}

fn check_positive_finite(prefix: &str, key: &str, value: f64) -> Result<(), ConfigError> {
    if !(value.is_finite() && value > 0.0) {
        return Err(ConfigError::new(
            format!("{prefix}.{key}"),
            format!("{value} must be a finite number above 0"),
        ));
    }
    Ok(())
}

fn check_non_negative_finite(prefix: &str, key: &str, value: f64) -> Result<(), ConfigError> {
    if !(value.is_finite() && value >= 0.0) {
        return Err(ConfigError::new(
            format!("{prefix}.{key}"),
            format!("{value} must be a finite number, 0 or above"),
        ));
    }
    Ok(())
}

impl CheckSettings for RangeSettings {
    fn check(&self, prefix: &str) -> Result<(), ConfigError> {
        for (key, value) in [("min", self.min), ("max", self.max)] {
            if value.is_nan() {
                return Err(ConfigError::new(
                    format!("{prefix}.{key}"),
                    "nan is not a bound",
                ));
            }
        }
        if self.min > self.max {
            return Err(ConfigError::new(
                format!("{prefix}.max"),
                format!("{} is below min = {}", self.max, self.min),
            ));
        }
        Ok(())
    }
}

impl CheckSettings for DedupeSettings {
    fn check(&self, prefix: &str) -> Result<(), ConfigError> {
        check_range(prefix, "history", self.history, 1, 4096)
    }
}

impl CheckSettings for SkewSettings {
    fn check(&self, prefix: &str) -> Result<(), ConfigError> {
        check_range(prefix, "window", self.window, 1, MAX_ROLLING_WINDOW)?;
        check_range(prefix, "max_spread_ms", self.max_spread_ms, 0, i64::MAX)?;
        check_range(prefix, "threshold_ms", self.threshold_ms, 0, i64::MAX)?;
        if let Some(max_future_ms) = self.max_future_ms {
            check_range(prefix, "max_future_ms", max_future_ms, 0, i64::MAX)?;
        }
        Ok(())
    }
}

impl CheckSettings for SpikeSettings {
    fn check(&self, prefix: &str) -> Result<(), ConfigError> {
        check_range(prefix, "window", self.window, 3, MAX_ROLLING_WINDOW)?;
        check_range(prefix, "min_samples", self.min_samples, 3, self.window)?;
        check_positive_finite(prefix, "k", self.k)?;
        check_non_negative_finite(prefix, "mad_floor", self.mad_floor)?;
        if let Some(max_step) = self.max_step {
            check_positive_finite(prefix, "max_step", max_step)?;
        }
        Ok(())
    }
}

impl CheckSettings for StuckSettings {
    fn check(&self, prefix: &str) -> Result<(), ConfigError> {
        if let Some(max_repeats) = self.max_repeats {
            check_range(prefix, "max_repeats", max_repeats, 1, u32::MAX)?;
        }
        if let Some(max_duration_ms) = self.max_duration_ms {
            check_range(prefix, "max_duration_ms", max_duration_ms, 1, i64::MAX)?;
        }
        if self.enabled && self.max_repeats.is_none() && self.max_duration_ms.is_none() {
            return Err(ConfigError::new(
                format!("{prefix}.enabled"),
                "stuck detection needs max_repeats or max_duration_ms",
            ));
        }
        Ok(())
    }
}

impl CheckSettings for AnomalySettings {
    fn check(&self, prefix: &str) -> Result<(), ConfigError> {
        check_range(prefix, "window", self.window, 3, MAX_ROLLING_WINDOW)?;
        check_range(prefix, "min_samples", self.min_samples, 3, self.window)?;
        check_positive_finite(prefix, "threshold", self.threshold)?;
        check_non_negative_finite(prefix, "mad_floor", self.mad_floor)
    }
}

impl CheckSettings for WindowSettings {
    fn check(&self, prefix: &str) -> Result<(), ConfigError> {
        // Up to a week: aggregates of longer spans are the cloud's rollups.
        check_range(prefix, "length_ms", self.length_ms, 1, 7 * 86_400_000)?;
        check_range(prefix, "grace_ms", self.grace_ms, 0, 7 * 86_400_000)
    }
}

impl CleanConfig {
    /// Checks the limits; the steps are checked when they are compiled (`Pipeline::new`).
    pub(crate) fn check_limits(&self) -> Result<(), ConfigError> {
        check_range("clean", "max_series", self.max_series, 1, MAX_TABLE_ENTRIES)?;
        check_range(
            "clean",
            "max_devices",
            self.max_devices,
            1,
            MAX_TABLE_ENTRIES,
        )?;
        check_range(
            "clean",
            "max_pending_windows",
            self.max_pending_windows,
            1,
            MAX_TABLE_ENTRIES,
        )?;
        check_range(
            "clean.quarantine",
            "capacity",
            self.quarantine.capacity,
            1,
            1_000_000,
        )
    }

    /// Checks the whole section, as [`Pipeline::new`](super::Pipeline::new) would.
    pub fn validate(&self) -> Result<(), ConfigError> {
        super::rules::Rules::compile(self).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CleanConfig, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            clean: CleanConfig,
        }
        toml::from_str::<File>(text)
            .map(|file| file.clean)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn an_empty_section_is_the_defaults() {
        assert_eq!(parse("[clean]").unwrap(), CleanConfig::default());
        CleanConfig::default().validate().unwrap();
    }

    #[test]
    fn rules_inherit_what_they_leave_out() {
        let config = parse(
            r#"
            [clean.spike.defaults]
            k = 6.0
            window = 21
            [[clean.spike.rules]]
            metric = "flow*"
            action = "reject"
            "#,
        )
        .unwrap();
        let rule = &config.spike.rules[0];
        assert_eq!(rule.device, "*");
        assert_eq!(rule.metric, "flow*");
        let resolved = rule.resolve(&config.spike.defaults);
        assert_eq!(resolved.k, 6.0);
        assert_eq!(resolved.window, 21);
        assert_eq!(resolved.action, Action::Reject);
        assert_eq!(resolved.min_samples, SpikeSettings::default().min_samples);
    }

    #[test]
    fn options_in_rules_are_set_when_present() {
        let config = parse(
            r#"
            [[clean.stuck.rules]]
            metric = "temp"
            enabled = true
            max_duration_ms = 600000
            "#,
        )
        .unwrap();
        let resolved = config.stuck.rules[0].resolve(&config.stuck.defaults);
        assert!(resolved.enabled);
        assert_eq!(resolved.max_duration_ms, Some(600_000));
        assert_eq!(resolved.max_repeats, Some(30));
    }

    #[test]
    fn typos_are_errors_naming_the_key() {
        for (text, fragment) in [
            ("[clean]\nmax_seriess = 3", "max_seriess"),
            ("[clean.spike.defaults]\nkk = 3.0", "kk"),
            (
                "[[clean.range.rules]]\nmetric = \"t\"\nmaximum = 3.0",
                "maximum",
            ),
            // Skew rules select devices only.
            ("[[clean.skew.rules]]\nmetric = \"t\"", "metric"),
            ("[clean.range.defaults]\naction = \"drop\"", "drop"),
            ("[clean.range.defaults]\nkind = \"float\"", "float"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(fragment), "{text}: {err}");
        }
    }

    #[test]
    fn bad_values_are_errors_naming_the_key() {
        let check = |text: &str, key: &str, fragment: &str| {
            let config = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let err = config.validate().unwrap_err();
            assert_eq!(err.key, key, "{text}: {err}");
            assert!(err.reason.contains(fragment), "{text}: {err}");
        };
        check(
            "[clean]\nmax_series = 0",
            "clean.max_series",
            "out of bounds",
        );
        check(
            "[clean.quarantine]\ncapacity = 0",
            "clean.quarantine.capacity",
            "out of bounds",
        );
        check(
            "[clean.range.defaults]\nmin = 5.0\nmax = 1.0",
            "clean.range.defaults.max",
            "below min",
        );
        check(
            "[[clean.range.rules]]\nmetric = \"t\"\nmin = nan",
            "clean.range.rules[0].min",
            "nan",
        );
        check(
            "[[clean.range.rules]]\nmetric = \"t\"\n[[clean.range.rules]]\nmetric = \"a/b\"",
            "clean.range.rules[1].metric",
            "'/'",
        );
        check(
            "[[clean.spike.rules]]\nk = -1.0",
            "clean.spike.rules[0].k",
            "above 0",
        );
        check(
            "[clean.spike.defaults]\nwindow = 5\nmin_samples = 6",
            "clean.spike.defaults.min_samples",
            "out of bounds",
        );
        check(
            "[[clean.stuck.rules]]\nenabled = true\nmax_repeats = 0",
            "clean.stuck.rules[0].max_repeats",
            "out of bounds",
        );
        check(
            "[clean.windows.defaults]\nlength_ms = 0",
            "clean.windows.defaults.length_ms",
            "out of bounds",
        );
        check(
            "[clean.dedupe.defaults]\nhistory = 0",
            "clean.dedupe.defaults.history",
            "out of bounds",
        );
        check(
            "[[clean.units.rules]]\nmetric = \"t\"\nfrom = \"degF\"\nto = \"degX\"",
            "clean.units.rules[0].to",
            "\"degX\" is not a known unit",
        );
        check(
            "[[clean.units.rules]]\nmetric = \"t\"\nfrom = \"degF\"\nto = \"hPa\"",
            "clean.units.rules[0].to",
            "temperature",
        );
        check(
            "[[clean.units.rules]]\nmetric = \"t\"\nfrom = \"degF\"",
            "clean.units.rules[0].to",
            "missing",
        );
        check(
            "[[clean.units.rules]]\nmetric = \"t\"\nfrom = \"degF\"\nto = \"degC\"\nscale = 2.0",
            "clean.units.rules[0].scale",
            "not both",
        );
        check(
            "[[clean.units.rules]]\nmetric = \"t\"\nscale = 0.0",
            "clean.units.rules[0].scale",
            "non-zero",
        );
    }
}
